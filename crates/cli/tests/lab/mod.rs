//! Lab helpers for the networked tests: a lab torn down on drop, processes run inside host
//! namespaces and killed on drop, and a RESP client that runs inside the client namespace.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

#[allow(unused_imports)]
pub use super::common::{ftvm, wait_until, Proc};

/// A lab (network namespaces on a switch), removed on drop even when the test fails.
pub struct Lab {
    pub name: String,
    pub subnet: u8,
}

impl Lab {
    pub fn up(name: &str, subnet: u8) -> Lab {
        assert!(
            is_root(),
            "the lab tests need root (network namespaces and TAP devices)"
        );
        let out = Command::new(ftvm())
            .args(["lab", "up", "--name", name, "--subnet", &subnet.to_string()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "lab up: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Lab {
            name: name.into(),
            subnet,
        }
    }
    pub fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.name)
    }
    pub fn ip(&self, last: u8) -> String {
        format!("198.18.{}.{last}", self.subnet)
    }
    pub fn vm_ip(&self) -> String {
        self.ip(50)
    }
    pub fn host_ip(&self, host: &str) -> String {
        self.ip(match host {
            "host-a" => 11,
            "host-b" => 12,
            "host-c" => 13,
            _ => 100,
        })
    }
    pub fn vm_mac(&self) -> String {
        format!("02:f7:00:00:{:02x}:50", self.subnet)
    }
    pub fn add_tap(&self, host: &str) {
        let ns = self.ns(host);
        for args in [
            vec!["-n", &ns, "tuntap", "add", "dev", "tap0", "mode", "tap"],
            vec!["-n", &ns, "link", "set", "tap0", "master", "br0", "up"],
        ] {
            let out = Command::new("ip").args(&args).output().unwrap();
            assert!(
                out.status.success(),
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    /// A command run inside `host`'s namespace.
    pub fn cmd(&self, host: &str, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(host)]).arg(program);
        c
    }
    pub fn spawn(&self, host: &str, program: &Path, args: &[&str], dir: &Path, tag: &str) -> Proc {
        Proc::spawn(self.cmd(host, program).args(args), dir, tag)
    }
    /// A VM definition for the KV guest on this lab's VM address.
    pub fn kv_toml(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kv.toml");
        std::fs::write(
            &path,
            format!(
                "name = \"kv-{}\"\nmodule = \"{}\"\nlisten = [6379]\n[nic]\nmac = \"{}\"\nip = \"{}/24\"\n",
                self.name,
                super::common::guest("kv").display(),
                self.vm_mac(),
                self.vm_ip()
            ),
        )
        .unwrap();
        path
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = Command::new(ftvm())
            .args(["lab", "down", "--name", &self.name])
            .output();
    }
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

pub use super::common::in_netns_thread as in_netns;

/// What an INCR-counting client saw.
#[derive(Debug, Default, Clone)]
pub struct IncrReport {
    /// Replies received: every one is an acknowledged write.
    pub acked: u64,
    /// The last value the server returned.
    pub last_value: i64,
    pub errors: Vec<String>,
    /// Longest wait for one reply.
    pub max_stall: Duration,
}

/// Sends INCR `key` one at a time (each waits for its reply) for `count` requests or until
/// `stop` says so; bounded by `limit`.
pub fn incr_client(
    addr: String,
    key: String,
    count: u64,
    limit: Duration,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> IncrReport {
    let mut report = IncrReport::default();
    let deadline = Instant::now() + limit;
    let mut stream = match connect_retry(&addr, Duration::from_secs(10)) {
        Ok(s) => s,
        Err(e) => {
            report.errors.push(e);
            return report;
        }
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let req = format!("*2\r\n$4\r\nINCR\r\n${}\r\n{key}\r\n", key.len());
    let mut buf = [0u8; 64];
    for _ in 0..count {
        if stop.load(std::sync::atomic::Ordering::SeqCst) || Instant::now() > deadline {
            break;
        }
        let sent = Instant::now();
        if let Err(e) = stream.write_all(req.as_bytes()) {
            report.errors.push(format!("write: {e}"));
            break;
        }
        let mut reply = Vec::new();
        while !reply.ends_with(b"\r\n") {
            match stream.read(&mut buf) {
                Ok(0) => {
                    report.errors.push("connection closed by the server".into());
                    return report;
                }
                Ok(n) => reply.extend_from_slice(&buf[..n]),
                Err(e) => {
                    report.errors.push(format!("read: {e}"));
                    return report;
                }
            }
        }
        report.max_stall = report.max_stall.max(sent.elapsed());
        match std::str::from_utf8(&reply)
            .ok()
            .and_then(|r| r.strip_prefix(':'))
            .and_then(|r| r.trim_end().parse::<i64>().ok())
        {
            Some(v) => {
                report.acked += 1;
                report.last_value = v;
            }
            None => report.errors.push(format!(
                "unexpected reply {:?}",
                String::from_utf8_lossy(&reply)
            )),
        }
    }
    report
}

pub fn connect_retry(addr: &str, limit: Duration) -> Result<TcpStream, String> {
    let deadline = Instant::now() + limit;
    loop {
        match TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_millis(500)) {
            Ok(s) => {
                s.set_nodelay(true).unwrap();
                return Ok(s);
            }
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(format!("connect {addr}: {e}")),
        }
    }
}

/// One RESP command over a fresh connection; returns the raw reply.
pub fn command(addr: &str, args: &[&str]) -> String {
    let mut s = connect_retry(addr, Duration::from_secs(10)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = format!("*{}\r\n", args.len());
    for a in args {
        req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    s.write_all(req.as_bytes()).unwrap();
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}
