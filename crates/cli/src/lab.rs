//! The lab: network namespaces as hosts on one switch, with addresses from 198.18.0.0/15, built
//! with iproute2 and removed again. Nothing is created in the root namespace: the switch is a
//! bridge inside its own namespace, so lab traffic cannot leave the machine.
//!
//! ```text
//!   <name>-client ─eth0┐
//!   <name>-host-a ─br0─eth0┤           (each host: br0 = eth0 + tap devices for VMs)
//!   <name>-host-b ─br0─eth0┼── br0 in <name>-switch
//!   <name>-host-c ─br0─eth0┘
//! ```
//!
//! Addresses on 198.18.<subnet>.0/24: client .100, host-a .11, host-b .12, host-c .13; VMs use
//! .50 and up. The hosts' route to the subnet has `quickack`: their TCP acknowledges at once.

use std::process::Command;

use crate::opts::{parse, Failure};

pub const HOSTS: [&str; 4] = ["client", "host-a", "host-b", "host-c"];
/// Longest lab name (namespace names get a suffix; interface names stay short regardless).
pub const LAB_NAME_BYTES_MAX: usize = 24;

pub fn host_ip(subnet: u8, host: &str) -> String {
    let last = match host {
        "client" => 100,
        "host-a" => 11,
        "host-b" => 12,
        "host-c" => 13,
        _ => 99,
    };
    format!("198.18.{subnet}.{last}")
}

pub fn vm_ip(subnet: u8, index: u8) -> String {
    format!("198.18.{subnet}.{}", 50 + index)
}

pub fn netns(name: &str, host: &str) -> String {
    format!("{name}-{host}")
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e} (install iproute2)"))?;
    if !out.status.success() {
        return Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// The lab's bridges forward frames without passing them through iptables, as on a hypervisor
/// host: where the kernel's br_netfilter is loaded (Docker loads it) its default, per network
/// namespace, sends every bridged IPv4 frame through the iptables hooks. Nothing to do where the
/// module is absent.
fn bridge_without_netfilter(ns: &str) {
    for key in [
        "net.bridge.bridge-nf-call-iptables",
        "net.bridge.bridge-nf-call-ip6tables",
        "net.bridge.bridge-nf-call-arptables",
    ] {
        let _ = in_ns(ns, &["sysctl", "-qw", &format!("{key}=0")]);
    }
}

fn in_ns(ns: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "in {ns}: {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

fn valid_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > LAB_NAME_BYTES_MAX
        || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(format!(
            "lab name {name:?}: 1 to {LAB_NAME_BYTES_MAX} letters, digits or '-'"
        ));
    }
    Ok(())
}

/// A lab; torn down on drop unless kept.
pub struct Lab {
    pub name: String,
    pub subnet: u8,
    keep: bool,
}

impl Lab {
    pub fn up(name: &str, subnet: u8) -> Result<Lab, String> {
        valid_name(name)?;
        if subnet > 254 {
            return Err("subnet index must be 0 to 254".into());
        }
        // A crashed earlier run with the same name leaves namespaces behind: clear them first.
        Lab::down(name);
        let lab = Lab {
            name: name.to_string(),
            subnet,
            keep: false,
        };
        lab.build()?;
        Ok(lab)
    }

    fn build(&self) -> Result<(), String> {
        let sw = netns(&self.name, "switch");
        ip(&["netns", "add", &sw])?;
        in_ns(&sw, &["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"])?;
        bridge_without_netfilter(&sw);
        ip(&["-n", &sw, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &sw,
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "stp_state",
            "0",
            "forward_delay",
            "0",
        ])?;
        ip(&["-n", &sw, "link", "set", "br0", "up"])?;
        for (i, host) in HOSTS.iter().enumerate() {
            let ns = netns(&self.name, host);
            ip(&["netns", "add", &ns])?;
            in_ns(&ns, &["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"])?;
            bridge_without_netfilter(&ns);
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            let port = format!("p{i}");
            ip(&[
                "-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", &port, "netns",
                &sw,
            ])?;
            ip(&["-n", &sw, "link", "set", &port, "master", "br0", "up"])?;
            let addr = format!("{}/24", host_ip(self.subnet, host));
            if *host == "client" {
                ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"])?;
                ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            } else {
                ip(&[
                    "-n",
                    &ns,
                    "link",
                    "add",
                    "br0",
                    "type",
                    "bridge",
                    "stp_state",
                    "0",
                    "forward_delay",
                    "0",
                ])?;
                ip(&["-n", &ns, "link", "set", "eth0", "master", "br0", "up"])?;
                ip(&["-n", &ns, "addr", "add", &addr, "dev", "br0"])?;
                ip(&["-n", &ns, "link", "set", "br0", "up"])?;
                // The hosts acknowledge TCP at once on the lab network, as a dedicated FT
                // logging network should: a backup's host then acknowledges the log within the
                // primary's write, and the backup yields the CPU (`ft::route`).
                let net = format!("198.18.{}.0/24", self.subnet);
                let src = host_ip(self.subnet, host);
                ip(&[
                    "-n", &ns, "route", "replace", &net, "dev", "br0", "proto", "kernel", "scope",
                    "link", "src", &src, "quickack", "1",
                ])?;
            }
        }
        Ok(())
    }

    /// Creates TAP device `tap` in `host`, bridged onto the lab switch.
    pub fn add_tap(&self, host: &str, tap: &str) -> Result<(), String> {
        let ns = netns(&self.name, host);
        ip(&["-n", &ns, "tuntap", "add", "dev", tap, "mode", "tap"])?;
        ip(&["-n", &ns, "link", "set", tap, "master", "br0", "up"])
    }

    /// A command that runs inside `host`'s namespace.
    pub fn exec(&self, host: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &netns(&self.name, host), program]);
        c
    }

    pub fn keep(mut self) {
        self.keep = true;
    }

    /// Removes every namespace of lab `name` (and with them their links). Idempotent.
    pub fn down(name: &str) {
        for host in HOSTS.iter().chain(std::iter::once(&"switch")) {
            let _ = Command::new("ip")
                .args(["netns", "del", &netns(name, host)])
                .output();
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if !self.keep {
            Lab::down(&self.name);
        }
    }
}

/// `ftvm lab up|down [--name N] [--subnet I]`.
pub fn main(args: &[String]) -> Result<i32, Failure> {
    let p = parse(args, &["name", "subnet"], &[], false)?;
    let name = p.one("name").unwrap_or_else(|| "ftvm".into());
    let subnet = p.number::<u8>("subnet")?.unwrap_or(0);
    match p.positional.first().map(String::as_str) {
        Some("up") => {
            let lab = Lab::up(&name, subnet).map_err(Failure::usage)?;
            for host in HOSTS {
                println!(
                    "{:<8} netns {:<20} {}",
                    host,
                    netns(&name, host),
                    host_ip(subnet, host)
                );
            }
            println!("VMs: 198.18.{subnet}.50 and up; add a TAP with `ip -n {} tuntap add dev tap0 mode tap` + `ip -n {} link set tap0 master br0 up`", netns(&name, "host-a"), netns(&name, "host-a"));
            lab.keep();
            Ok(0)
        }
        Some("down") => {
            Lab::down(&name);
            Ok(0)
        }
        _ => Err(Failure::usage(
            "usage: ftvm lab up|down [--name NAME] [--subnet I]",
        )),
    }
}
