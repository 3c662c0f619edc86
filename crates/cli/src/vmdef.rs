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
//! replay_nice = 10                   # the backup's replay thread's nice value (0: unchanged)
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
    /// The nice value the backup's replay (VM) thread runs at until it goes live; 0 leaves it
    /// alone. See `ft::DEFAULT_REPLAY_NICE`.
    pub replay_nice: i32,
}

impl Default for FtDef {
    fn default() -> Self {
        FtDef {
            heartbeat_ms: 50,
            failure_timeout_ms: 1000,
            lag_target_ms: 100,
            replay_nice: crate::ft::DEFAULT_REPLAY_NICE,
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

/// A parsed `--nic` option: the VM's NIC (part of the replicated spec) and how this host attaches
/// it (host edge only, not recorded).
///
/// - `tap=NAME,mac=MAC,ip=ADDR/PREFIX[,gw=ADDR][,seed=N][,fault=SPEC]`: a TAP device; the fault
///   spec uses `;` between its own items (`fault=drop=0.05;seed=3`).
/// - `user,hostfwd=HOSTPORT:GUESTPORT[,hostfwd=...][,mac=MAC][,ip=ADDR/PREFIX][,gw=ADDR][,seed=N]`:
///   user-mode networking (`crate::usernet`), no privileges. Defaults as QEMU's slirp: guest
///   10.0.2.15/24, host side `gw` (default: the subnet's `.2`, 10.0.2.2).
pub struct NicOption {
    pub spec: NicSpec,
    pub attachment: NicAttachment,
}

/// How the NIC reaches the host.
pub enum NicAttachment {
    Tap { name: String, fault: Option<String> },
    User(crate::usernet::UserNetConfig),
}

const NIC_KEYS: &[&str] = &["tap", "mac", "ip", "gw", "seed", "fault", "hostfwd"];

pub fn parse_nic_option(text: &str) -> Result<NicOption, Failure> {
    let mut user = false;
    let mut fields: BTreeMap<&str, &str> = BTreeMap::new();
    let mut hostfwd: Vec<&str> = Vec::new();
    for part in text.split(',') {
        if part == "user" {
            if user {
                return Err(Failure::usage("--nic: `user` is given twice"));
            }
            user = true;
            continue;
        }
        let (k, v) = part.split_once('=').ok_or_else(|| {
            Failure::usage(format!(
                "--nic {text:?}: {part:?} is neither KEY=VALUE nor `user`"
            ))
        })?;
        if !NIC_KEYS.contains(&k) {
            return Err(Failure::usage(format!(
                "--nic: unknown key {k:?} (user, tap, mac, ip, gw, seed, fault, hostfwd)"
            )));
        }
        if k == "hostfwd" {
            hostfwd.push(v);
        } else if fields.insert(k, v).is_some() {
            return Err(Failure::usage(format!("--nic: {k}= is given twice")));
        }
    }
    let seed = match fields.get("seed") {
        Some(s) => s
            .parse()
            .map_err(|_| Failure::usage(format!("--nic seed {s:?} is not a number")))?,
        None => 1,
    };
    if user {
        return parse_user_nic(&fields, &hostfwd, seed);
    }
    if !hostfwd.is_empty() {
        return Err(Failure::usage(
            "--nic: hostfwd= is for user-mode networking (--nic user,hostfwd=HOSTPORT:GUESTPORT)",
        ));
    }
    let need = |k: &str| {
        fields.get(k).copied().ok_or_else(|| {
            Failure::usage(format!(
                "--nic needs {k}= (or `user` for user-mode networking without a TAP device)"
            ))
        })
    };
    let spec = parse_nic_parts(need("mac")?, need("ip")?, fields.get("gw").copied(), seed)?;
    Ok(NicOption {
        spec,
        attachment: NicAttachment::Tap {
            name: need("tap")?.to_string(),
            fault: fields.get("fault").map(|f| f.replace(';', ",")),
        },
    })
}

/// `--nic user,...`: fills in the slirp-like defaults and finds the host side's address.
fn parse_user_nic(
    fields: &BTreeMap<&str, &str>,
    hostfwd: &[&str],
    seed: u64,
) -> Result<NicOption, Failure> {
    use crate::usernet::{
        HostForward, UserNetConfig, USERNET_DEFAULT_GUEST_IP, USERNET_DEFAULT_GUEST_MAC,
        USERNET_FORWARDS_MAX, USERNET_HOST_MAC,
    };
    for k in ["tap", "fault"] {
        if fields.contains_key(k) {
            return Err(Failure::usage(format!(
                "--nic: {k}= cannot be combined with `user` (user mode has no TAP device)"
            )));
        }
    }
    if hostfwd.is_empty() {
        return Err(Failure::usage(
            "--nic user needs at least one hostfwd=HOSTPORT:GUESTPORT (nothing could reach the guest)",
        ));
    }
    if hostfwd.len() > USERNET_FORWARDS_MAX {
        return Err(Failure::usage(format!(
            "--nic: at most {USERNET_FORWARDS_MAX} hostfwd= rules"
        )));
    }
    let mut forwards: Vec<HostForward> = Vec::new();
    for rule in hostfwd {
        let port = |p: &str| {
            p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| {
                Failure::usage(format!(
                    "--nic hostfwd={rule}: {p:?} is not a TCP port (1 to 65535)"
                ))
            })
        };
        let (host, guest) = rule.split_once(':').ok_or_else(|| {
            Failure::usage(format!("--nic hostfwd={rule}: expected HOSTPORT:GUESTPORT"))
        })?;
        let f = HostForward {
            host_port: port(host)?,
            guest_port: port(guest)?,
        };
        if forwards.iter().any(|o| o.host_port == f.host_port) {
            return Err(Failure::usage(format!(
                "--nic: host port {} is forwarded twice",
                f.host_port
            )));
        }
        forwards.push(f);
    }
    let mac = ftvm_log::spec::mac_to_string(&USERNET_DEFAULT_GUEST_MAC);
    let ip = format!("{}/24", Ipv4Addr::from(USERNET_DEFAULT_GUEST_IP));
    let mac = fields.get("mac").copied().unwrap_or(&mac);
    let ip = fields.get("ip").copied().unwrap_or(&ip);
    let mut spec = parse_nic_parts(mac, ip, fields.get("gw").copied(), seed)?;
    if spec.mac == USERNET_HOST_MAC {
        return Err(Failure::usage(format!(
            "--nic user: mac={mac} is the host side's MAC; choose another"
        )));
    }
    let mask = u32::MAX << (32 - spec.prefix_len);
    let guest = u32::from_be_bytes(spec.ip);
    let host = match spec.gateway {
        Some(gw) => u32::from_be_bytes(gw),
        None => (guest & mask) | 2,
    };
    let host_ip = Ipv4Addr::from(host);
    if host & mask != guest & mask || host & !mask == 0 || host & !mask == !mask {
        return Err(Failure::usage(format!(
            "--nic user: the host side {host_ip} must be a host address in the guest's subnet {}/{} (set gw=)",
            Ipv4Addr::from(guest & mask),
            spec.prefix_len
        )));
    }
    if host == guest {
        return Err(Failure::usage(format!(
            "--nic user: the guest's ip {host_ip} is also the host side's address; choose another ip= or set gw="
        )));
    }
    // The host side is the guest's gateway, as in QEMU's slirp.
    spec.gateway = Some(host_ip.octets());
    Ok(NicOption {
        spec,
        attachment: NicAttachment::User(UserNetConfig { host_ip, forwards }),
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
        assert_eq!(n.spec.ip, [198, 18, 0, 50]);
        assert_eq!(n.spec.prefix_len, 24);
        assert_eq!(n.spec.gateway, Some([198, 18, 0, 1]));
        let NicAttachment::Tap { name, fault } = n.attachment else {
            panic!("a TAP attachment");
        };
        assert_eq!(name, "tap0");
        assert_eq!(fault.as_deref(), Some("drop=0.05,seed=3"));
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
    fn user_mode_nic_option_parses_with_slirp_defaults() {
        use crate::usernet::{HostForward, USERNET_DEFAULT_GUEST_MAC};
        let n = parse_nic_option("user,hostfwd=8080:80,hostfwd=16379:6379").unwrap();
        assert_eq!(n.spec.mac, USERNET_DEFAULT_GUEST_MAC);
        assert_eq!(n.spec.ip, [10, 0, 2, 15]);
        assert_eq!(n.spec.prefix_len, 24);
        assert_eq!(
            n.spec.gateway,
            Some([10, 0, 2, 2]),
            "the host side is the gateway"
        );
        assert_eq!(n.spec.seed, 1);
        let NicAttachment::User(cfg) = n.attachment else {
            panic!("a user-mode attachment");
        };
        assert_eq!(cfg.host_ip, Ipv4Addr::new(10, 0, 2, 2));
        assert_eq!(
            cfg.forwards,
            vec![
                HostForward {
                    host_port: 8080,
                    guest_port: 80
                },
                HostForward {
                    host_port: 16379,
                    guest_port: 6379
                }
            ]
        );

        // Everything given, in any order; `user` need not come first.
        let n = parse_nic_option(
            "hostfwd=1:2,mac=02:f7:00:00:00:09,user,ip=192.168.7.20/16,gw=192.168.0.1,seed=9",
        )
        .unwrap();
        assert_eq!(n.spec.mac, [0x02, 0xf7, 0, 0, 0, 9]);
        assert_eq!(n.spec.ip, [192, 168, 7, 20]);
        assert_eq!(n.spec.prefix_len, 16);
        assert_eq!(n.spec.gateway, Some([192, 168, 0, 1]));
        assert_eq!(n.spec.seed, 9);
        let NicAttachment::User(cfg) = n.attachment else {
            panic!("a user-mode attachment");
        };
        assert_eq!(cfg.host_ip, Ipv4Addr::new(192, 168, 0, 1));

        // Without gw=, the host side is the guest subnet's .2.
        let n = parse_nic_option("user,hostfwd=1:2,ip=172.16.5.9/24").unwrap();
        assert_eq!(n.spec.gateway, Some([172, 16, 5, 2]));
    }

    #[test]
    fn user_mode_nic_option_rejects_bad_input_with_a_usage_error() {
        let bad = [
            ("user", "at least one hostfwd"),
            ("user,hostfwd=8080", "HOSTPORT:GUESTPORT"),
            ("user,hostfwd=8080:", "not a TCP port"),
            ("user,hostfwd=0:80", "not a TCP port"),
            ("user,hostfwd=65536:80", "not a TCP port"),
            ("user,hostfwd=80:http", "not a TCP port"),
            ("user,hostfwd=-1:80", "not a TCP port"),
            ("user,hostfwd=8080:80,hostfwd=8080:81", "forwarded twice"),
            ("user,hostfwd=8080:80,colour=red", "unknown key"),
            ("user,user,hostfwd=8080:80", "twice"),
            (
                "user,hostfwd=8080:80,ip=10.0.2.15/24,ip=10.0.2.16/24",
                "given twice",
            ),
            ("user,hostfwd=8080:80,tap=tap0", "cannot be combined"),
            ("user,hostfwd=8080:80,fault=drop=0.1", "cannot be combined"),
            ("user,hostfwd=8080:80,mac=01:00:00:00:00:01", "unicast"),
            (
                "user,hostfwd=8080:80,mac=52:55:0a:00:02:02",
                "host side's MAC",
            ),
            ("user,hostfwd=8080:80,ip=10.0.2.15", "ADDR/PREFIX"),
            ("user,hostfwd=8080:80,ip=10.0.2.2/24", "also the host side"),
            ("user,hostfwd=8080:80,gw=10.0.3.2", "in the guest's subnet"),
            (
                "user,hostfwd=8080:80,gw=10.0.2.255",
                "in the guest's subnet",
            ),
            ("user,hostfwd=8080:80,gw=10.0.2.15", "also the host side"),
            ("user,hostfwd=8080:80,seed=x", "not a number"),
            ("users,hostfwd=8080:80", "neither KEY=VALUE nor `user`"),
            (
                "tap=tap0,mac=02:00:00:00:00:05,ip=1.2.3.4/24,hostfwd=1:2",
                "user-mode",
            ),
            ("mac=02:00:00:00:00:05,ip=1.2.3.4/24", "needs tap="),
        ];
        for (text, expected) in bad {
            let Err(e) = parse_nic_option(text) else {
                panic!("{text:?} was accepted");
            };
            assert_eq!(e.code, ftvm_vm::exit_code::USAGE, "{text:?}");
            assert!(
                e.message.contains(expected),
                "{text:?}: {:?} does not say {expected:?}",
                e.message
            );
        }
        let many: Vec<String> = (1..=crate::usernet::USERNET_FORWARDS_MAX as u16 + 1)
            .map(|p| format!("hostfwd={p}:80"))
            .collect();
        let e = parse_nic_option(&format!("user,{}", many.join(",")))
            .err()
            .expect("too many rules");
        assert!(e.message.contains("at most"), "{}", e.message);
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
