//! VM definition files (TOML) and the `--nic` option: how a user describes a VM.
//!
//! ```toml
//! name = "kv"                        # the VM's id: tiebreaker key, handshake check
//! module = "guests/build/kv.wasm"    # relative to this file
//! args = []
//! env = { GREETING = "hi" }
//! listen = [6379]                    # preopened TCP listeners
//! [[disk]]
//! host = "disk"                      # this host's copy of the VM's disk (relative to this file)
//! guest = "/data"
//! [nic]
//! mac = "02:f7:00:00:00:50"
//! ip = "198.18.0.50/24"
//! gateway = "198.18.0.1"             # optional
//! seed = 7                           # netstack PRNG seed (ISNs)
//! [limits]                           # optional
//! memory_max_mib = 256
//! checkpoint_events = 4096
//! fuel = false
//! [ft]                               # optional: replication tuning
//! heartbeat_ms = 50
//! failure_timeout_ms = 1000
//! lag_target_ms = 100
//! ```

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ftvm_log::{Limits, NicSpec, VmSpec};
use serde::Deserialize;

use crate::opts::Failure;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmDef {
    pub name: String,
    pub module: PathBuf,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub listen: Vec<u16>,
    #[serde(default)]
    pub disk: Vec<DiskDef>,
    pub nic: Option<NicDef>,
    #[serde(default)]
    pub limits: LimitsDef,
    #[serde(default)]
    pub ft: FtDef,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskDef {
    pub host: PathBuf,
    pub guest: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicDef {
    pub mac: String,
    pub ip: String,
    pub gateway: Option<String>,
    #[serde(default = "default_seed")]
    pub seed: u64,
}

fn default_seed() -> u64 {
    1
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsDef {
    pub memory_max_mib: Option<u64>,
    pub checkpoint_events: Option<u64>,
    #[serde(default)]
    pub fuel: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FtDef {
    pub heartbeat_ms: u64,
    pub failure_timeout_ms: u64,
    pub lag_target_ms: u64,
}

impl Default for FtDef {
    fn default() -> Self {
        FtDef {
            heartbeat_ms: 50,
            failure_timeout_ms: 1000,
            lag_target_ms: 100,
        }
    }
}

/// Largest VM definition file read.
const VMDEF_BYTES_MAX: u64 = 1 << 20;

impl VmDef {
    pub fn load(path: &Path) -> Result<(VmDef, PathBuf), Failure> {
        let meta = std::fs::metadata(path)
            .map_err(|e| Failure::usage(format!("cannot read {}: {e}", path.display())))?;
        if meta.len() > VMDEF_BYTES_MAX {
            return Err(Failure::usage(format!(
                "{} is larger than {VMDEF_BYTES_MAX} bytes",
                path.display()
            )));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| Failure::usage(format!("cannot read {}: {e}", path.display())))?;
        let def: VmDef = toml::from_str(&text)
            .map_err(|e| Failure::usage(format!("{}: {e}", path.display())))?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Ok((def, base))
    }

    /// The VM spec and this host's disk directories.
    pub fn spec(
        &self,
        base: &Path,
        disk_override: &[(PathBuf, String)],
    ) -> Result<(VmSpec, Vec<PathBuf>), Failure> {
        let module_name = self
            .module
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut args = vec![module_name];
        args.extend(self.args.iter().cloned());
        let mut limits = Limits::default();
        if let Some(m) = self.limits.memory_max_mib {
            limits.memory_bytes_max = m << 20;
        }
        if let Some(n) = self.limits.checkpoint_events {
            limits.checkpoint_events = n;
        }
        limits.fuel = self.limits.fuel;
        let nic = match &self.nic {
            Some(n) => Some(parse_nic_parts(
                &n.mac,
                &n.ip,
                n.gateway.as_deref(),
                n.seed,
            )?),
            None => None,
        };
        let mut dirs = Vec::new();
        let mut preopens = Vec::new();
        for d in &self.disk {
            let host = disk_override
                .iter()
                .find(|(_, g)| *g == d.guest)
                .map(|(h, _)| h.clone())
                .unwrap_or_else(|| base.join(&d.host));
            dirs.push(host);
            preopens.push(d.guest.clone());
        }
        let spec = VmSpec {
            args,
            env: self
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            preopens,
            listeners: self.listen.clone(),
            nic,
            limits,
        };
        Ok((spec, dirs))
    }

    pub fn module_path(&self, base: &Path) -> PathBuf {
        base.join(&self.module)
    }
}

pub fn parse_nic_parts(
    mac: &str,
    ip: &str,
    gateway: Option<&str>,
    seed: u64,
) -> Result<NicSpec, Failure> {
    let mac = ftvm_log::spec::parse_mac(mac)
        .ok_or_else(|| Failure::usage(format!("bad MAC address {mac:?}")))?;
    if mac[0] & 1 != 0 {
        return Err(Failure::usage(
            "the NIC's MAC must be unicast (lowest bit of the first byte clear)",
        ));
    }
    let (addr, prefix) = ip
        .split_once('/')
        .ok_or_else(|| Failure::usage(format!("NIC ip {ip:?}: expected ADDR/PREFIX")))?;
    let addr: Ipv4Addr = addr
        .parse()
        .map_err(|_| Failure::usage(format!("bad IPv4 address {addr:?}")))?;
    let prefix: u8 = prefix
        .parse()
        .ok()
        .filter(|p| (1..=30).contains(p))
        .ok_or_else(|| Failure::usage(format!("bad prefix length {prefix:?}")))?;
    let gateway = match gateway {
        Some(g) => Some(
            g.parse::<Ipv4Addr>()
                .map_err(|_| Failure::usage(format!("bad gateway {g:?}")))?
                .octets(),
        ),
        None => None,
    };
    Ok(NicSpec {
        mac,
        ip: addr.octets(),
        prefix_len: prefix,
        gateway,
        seed,
    })
}

/// `--nic tap=NAME,mac=MAC,ip=ADDR/PREFIX[,gw=ADDR][,seed=N][,fault=SPEC]`. Returns the spec, the
/// TAP name and an optional fault spec (`drop=..;dup=..` with `;` separators inside `fault=`).
pub struct NicOption {
    pub spec: NicSpec,
    pub tap: String,
    pub fault: Option<String>,
}

pub fn parse_nic_option(text: &str) -> Result<NicOption, Failure> {
    let mut fields: BTreeMap<&str, &str> = BTreeMap::new();
    for part in text.split(',') {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| Failure::usage(format!("--nic {text:?}: {part:?} is not KEY=VALUE")))?;
        if !["tap", "mac", "ip", "gw", "seed", "fault"].contains(&k) {
            return Err(Failure::usage(format!(
                "--nic: unknown key {k:?} (tap, mac, ip, gw, seed, fault)"
            )));
        }
        fields.insert(k, v);
    }
    let need = |k: &str| {
        fields
            .get(k)
            .copied()
            .ok_or_else(|| Failure::usage(format!("--nic needs {k}=")))
    };
    let seed = match fields.get("seed") {
        Some(s) => s
            .parse()
            .map_err(|_| Failure::usage(format!("--nic seed {s:?} is not a number")))?,
        None => 1,
    };
    let spec = parse_nic_parts(need("mac")?, need("ip")?, fields.get("gw").copied(), seed)?;
    Ok(NicOption {
        spec,
        tap: need("tap")?.to_string(),
        fault: fields.get("fault").map(|f| f.replace(';', ",")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nic_option_parses_and_rejects() {
        let n = parse_nic_option(
            "tap=tap0,mac=02:00:00:00:00:05,ip=198.18.0.50/24,gw=198.18.0.1,fault=drop=0.05;seed=3",
        )
        .unwrap();
        assert_eq!(n.tap, "tap0");
        assert_eq!(n.spec.ip, [198, 18, 0, 50]);
        assert_eq!(n.spec.prefix_len, 24);
        assert_eq!(n.spec.gateway, Some([198, 18, 0, 1]));
        assert_eq!(n.fault.as_deref(), Some("drop=0.05,seed=3"));
        assert!(
            parse_nic_option("tap=t,mac=03:00:00:00:00:05,ip=1.2.3.4/24").is_err(),
            "multicast MAC"
        );
        assert!(
            parse_nic_option("tap=t,mac=02:00:00:00:00:05,ip=1.2.3.4").is_err(),
            "no prefix"
        );
        assert!(parse_nic_option("tap=t,mac=02:00:00:00:00:05,ip=1.2.3.4/24,colour=red").is_err());
    }

    #[test]
    fn vm_definition_file_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kv.toml");
        std::fs::write(
            &path,
            "name = \"kv\"\nmodule = \"kv.wasm\"\nlisten = [6379]\n[[disk]]\nhost = \"d\"\nguest = \"/data\"\n\
             [nic]\nmac = \"02:f7:00:00:00:50\"\nip = \"198.18.0.50/24\"\n[ft]\nfailure_timeout_ms = 700\n",
        )
        .unwrap();
        let (def, base) = VmDef::load(&path).unwrap();
        let (spec, dirs) = def.spec(&base, &[]).unwrap();
        assert_eq!(spec.args, vec!["kv.wasm"]);
        assert_eq!(spec.listeners, vec![6379]);
        assert_eq!(dirs, vec![dir.path().join("d")]);
        assert_eq!(def.ft.failure_timeout_ms, 700);
        assert_eq!(def.ft.heartbeat_ms, 50);
        std::fs::write(&path, "name = \"kv\"\nmodule = \"kv.wasm\"\nbogus = 1\n").unwrap();
        assert!(VmDef::load(&path).is_err(), "unknown keys are refused");
    }
}
