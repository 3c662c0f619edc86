//! `ftvm demo`: a fault-tolerant pair, a failure, and a report.
//!
//! The console demo runs on loopback and needs no privileges: a guest that prints a numbered
//! line every 50 ms runs as primary and backup; the primary is killed with SIGKILL mid-run; the
//! backup goes live and the guest carries on. The report counts lines, gaps and repeats, and
//! measures the stall a reader of the console saw.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::opts::{parse, Failure};

/// Bounds of the demo, so it always ends by itself.
const DEMO_LINES: u32 = 80;
const DEMO_LINE_MS: u32 = 50;
const DEMO_KILL_AFTER_LINES: usize = 20;
const DEMO_TIMEOUT_S: u64 = 60;

struct Killer(Vec<Child>);
impl Drop for Killer {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn main(args: &[String]) -> Result<i32, Failure> {
    let p = parse(args, &["guest"], &["console"], false)?;
    let exe = std::env::current_exe().map_err(|e| Failure::usage(e.to_string()))?;
    let find = |name: &str| {
        exe.parent()
            .and_then(|d| d.parent())
            .and_then(|d| d.parent())
            .map(|root| root.join("guests/build").join(name))
            .filter(|g| g.exists())
            .ok_or_else(|| {
                Failure::usage(format!(
                    "guests/build/{name} not found: run scripts/setup.sh"
                ))
            })
    };
    let dir = tempdir()?;
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let result = if p.flag("console") || !root {
        if !root {
            println!("(not root: no lab; running the console demo on loopback instead)");
        }
        let guest = match p.one("guest") {
            Some(g) => PathBuf::from(g),
            None => find("sleeper.wasm")?,
        };
        run_console_demo(&exe, &guest, &dir)
    } else {
        run_lab_demo(&exe, &find("kv.wasm")?, &dir)
    };
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Requests the demo's client sends, one at a time.
const LAB_DEMO_REQUESTS: u64 = 6000;

/// The paper's demo: the KV guest as a pair in the lab, a client counting INCRs, SIGKILL.
fn run_lab_demo(exe: &Path, kv: &Path, dir: &Path) -> Result<i32, Failure> {
    use std::io::{Read, Write};
    let name = format!("demo{}", std::process::id() % 10000);
    let subnet = 100;
    println!(
        "ftvm demo: building the lab {name} (198.18.{subnet}.0/24: client, host-a, host-b, host-c)"
    );
    let lab = crate::lab::Lab::up(&name, subnet).map_err(Failure::usage)?;
    for host in ["host-a", "host-b"] {
        lab.add_tap(host, "tap0").map_err(Failure::usage)?;
    }
    let vm_ip = crate::lab::vm_ip(subnet, 0);
    let host_a = crate::lab::host_ip(subnet, "host-a");
    let vm = dir.join("kv.toml");
    std::fs::write(
        &vm,
        format!("name = \"demo-kv\"\nmodule = \"{}\"\nlisten = [6379]\n[nic]\nmac = \"02:f7:00:00:64:50\"\nip = \"{vm_ip}/24\"\n", kv.display()),
    )
    .map_err(|e| Failure::usage(e.to_string()))?;
    let tb = format!("dir:{}", dir.join("tiebreak").display());
    println!("ftvm demo: tiebreaker {tb}; KV guest primary on host-a, backup on host-b, VM address {vm_ip}");
    let spawn = |host: &str, role: &str| {
        lab.exec(host, exe.to_str().unwrap_or("ftvm"))
            .args([
                "ft",
                "--vm",
                vm.to_str().unwrap(),
                "--as",
                role,
                "--log",
                &format!("{host_a}:7400"),
                "--tiebreak",
                &tb,
                "--tap",
                "tap0",
            ])
            .args([
                "--owner",
                &format!("demo-{role}"),
                "--status-file",
                dir.join(format!("{role}.json")).to_str().unwrap(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Failure::usage(format!("cannot start {}: {e}", exe.display())))
    };
    let mut procs = Killer(vec![
        spawn("host-a", "primary")?,
        spawn("host-b", "backup")?,
    ]);
    let (tx, _rx) = mpsc::channel();
    follow(&mut procs.0[0], "primary", tx.clone());
    follow(&mut procs.0[1], "backup", tx);
    let status = dir.join("primary.json");
    let start = Instant::now();
    while !status.exists() {
        if start.elapsed() > Duration::from_secs(30) {
            return Err(Failure::usage("the pair did not start within 30 s"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // The client, in the client namespace: INCR one at a time, timing every reply.
    let ns = crate::lab::netns(&name, "client");
    let addr = format!("{vm_ip}:6379");
    let (progress_tx, progress_rx) = mpsc::channel::<u64>();
    let client = std::thread::spawn(move || -> Result<(u64, i64, u64, Duration), String> {
        let file = std::fs::File::open(format!("/run/netns/{ns}")).map_err(|e| e.to_string())?;
        // SAFETY: setns on this thread only, with a valid namespace fd.
        if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        let deadline = Instant::now() + Duration::from_secs(DEMO_TIMEOUT_S);
        let mut s = loop {
            match std::net::TcpStream::connect_timeout(
                &addr.parse().unwrap(),
                Duration::from_millis(500),
            ) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(e.to_string()),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .map_err(|e| e.to_string())?;
        let (mut acked, mut last, mut errors, mut worst) = (0u64, 0i64, 0u64, Duration::ZERO);
        let mut buf = [0u8; 64];
        for i in 0..LAB_DEMO_REQUESTS {
            let t = Instant::now();
            if s.write_all(b"*2\r\n$4\r\nINCR\r\n$4\r\ndemo\r\n").is_err() {
                errors += 1;
                break;
            }
            let mut reply = Vec::new();
            while !reply.ends_with(b"\r\n") {
                match s.read(&mut buf) {
                    Ok(n) if n > 0 => reply.extend_from_slice(&buf[..n]),
                    _ => return Ok((acked, last, errors + 1, worst)),
                }
            }
            worst = worst.max(t.elapsed());
            match std::str::from_utf8(&reply)
                .ok()
                .and_then(|r| r.trim().strip_prefix(':'))
                .and_then(|v| v.parse().ok())
            {
                Some(v) => {
                    acked += 1;
                    last = v;
                }
                None => errors += 1,
            }
            if i % 500 == 0 {
                let _ = progress_tx.send(acked);
            }
        }
        Ok((acked, last, errors, worst))
    });
    // Kill the primary a third of the way through.
    let mut killed_at = None;
    let mut status_at_kill = None;
    while let Ok(acked) = progress_rx.recv_timeout(Duration::from_secs(DEMO_TIMEOUT_S)) {
        println!("  client | {acked} INCRs acknowledged");
        if killed_at.is_none() && acked >= LAB_DEMO_REQUESTS / 3 {
            // The driver rewrites the status every 200 ms; a fast client can get here before the
            // first rewrite with log traffic in it (and the backup's word on the channel's
            // endpoints, for host acks), so wait for one (at most a second).
            status_at_kill = wait_for_status(&status, Duration::from_secs(1), |b| {
                b["log_bytes_sent"].as_u64().unwrap_or(0) > 0 && !b["host_acks"].is_null()
            });
            if let Some(b) = &status_at_kill {
                println!(
                    "  status | primary epoch {} log bandwidth {:.2} Mbit/s, outputs held {}",
                    b["epoch"],
                    b["log_bandwidth_bps"].as_u64().unwrap_or(0) as f64 / 1e6,
                    b["outputs_held"]
                );
            }
            println!("  ------ | SIGKILL to the primary on host-a");
            let _ = procs.0[0].kill();
            killed_at = Some(Instant::now());
        }
    }
    let (acked, last, errors, worst) = client
        .join()
        .map_err(|_| Failure::usage("client thread panicked"))?
        .map_err(Failure::usage)?;
    std::thread::sleep(Duration::from_millis(300));
    println!();
    println!("report");
    println!("  requests sent          {LAB_DEMO_REQUESTS}");
    println!("  acknowledged           {acked}");
    println!("  client errors          {errors}");
    println!(
        "  counter on the server  {last} (acknowledged writes lost: {})",
        acked.saturating_sub(last.max(0) as u64)
    );
    println!(
        "  client-visible stall   {} ms (longest wait for one reply)",
        worst.as_millis()
    );
    if let Some(b) = &status_at_kill {
        println!(
            "  log bandwidth          {:.2} Mbit/s just before the kill ({} bytes of log until then)",
            b["log_bandwidth_bps"].as_u64().unwrap_or(0) as f64 / 1e6,
            b["log_bytes_sent"]
        );
        let writes = b["log_writes"].as_u64().unwrap_or(0);
        if b["host_acks"].is_null() {
            println!("  output rule            not known yet when the primary was killed");
        } else if b["host_acks"] == true {
            println!(
                "  output rule            outputs left once the backup's host had their log: {} of {writes} log writes came back acknowledged",
                b["writes_acked_at_once"].as_u64().unwrap_or(0)
            );
        } else {
            println!(
                "  output rule            outputs waited for the backup's own acks ({writes} log writes)"
            );
        }
    }
    // A backup that went live rewrites its status from a thread of its own, a few hundred ms
    // after the go-live; a client that finished quickly may be done before that, so wait for it
    // (at most two seconds).
    let backup_status = wait_for_status(&dir.join("backup.json"), Duration::from_secs(2), |b| {
        b["role"].as_str() != Some("backup")
    });
    if let Some(b) = backup_status {
        println!(
            "  backup status          role {} epoch {}",
            b["role"].as_str().unwrap_or("?"),
            b["epoch"]
        );
    }
    let ok =
        errors == 0 && acked == LAB_DEMO_REQUESTS && last as u64 >= acked && killed_at.is_some();
    println!(
        "  verdict                {}",
        if ok {
            "the clients never noticed the failure"
        } else {
            "FAILED"
        }
    );
    drop(procs);
    drop(lab);
    println!("ftvm demo: lab {name} removed");
    Ok(if ok { 0 } else { 1 })
}

fn tempdir() -> Result<PathBuf, Failure> {
    let dir = std::env::temp_dir().join(format!("ftvm-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| Failure::usage(format!("{}: {e}", dir.display())))?;
    Ok(dir)
}

/// Lines a process prints, with the time each arrived.
fn follow(child: &mut Child, tag: &'static str, tx: mpsc::Sender<(&'static str, Instant, String)>) {
    let out = child.stdout.take().expect("piped stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send((tag, Instant::now(), line)).is_err() {
                return;
            }
        }
    });
    let err = child.stderr.take().expect("piped stderr");
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            eprintln!("    [{tag}] {line}");
        }
    });
}

fn run_console_demo(exe: &Path, guest: &Path, dir: &Path) -> Result<i32, Failure> {
    let vm = dir.join("demo.toml");
    std::fs::write(
        &vm,
        format!(
            "name = \"demo\"\nmodule = \"{}\"\nargs = [\"{DEMO_LINES}\", \"{DEMO_LINE_MS}\"]\n",
            guest.display()
        ),
    )
    .map_err(|e| Failure::usage(e.to_string()))?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| Failure::usage(e.to_string()))?
        .port();
    let tb = format!("dir:{}", dir.join("tiebreak").display());
    let spawn = |role: &str, status: &str| {
        Command::new(exe)
            .args([
                "ft",
                "--vm",
                vm.to_str().unwrap(),
                "--as",
                role,
                "--log",
                &format!("127.0.0.1:{port}"),
                "--tiebreak",
                &tb,
            ])
            .args([
                "--owner",
                &format!("demo-{role}"),
                "--status-file",
                dir.join(status).to_str().unwrap(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Failure::usage(format!("cannot start {}: {e}", exe.display())))
    };
    println!("ftvm demo: a guest printing {DEMO_LINES} numbered lines, {DEMO_LINE_MS} ms apart, as a fault-tolerant pair");
    let mut procs = Killer(vec![
        spawn("primary", "primary.json")?,
        spawn("backup", "backup.json")?,
    ]);
    let (tx, rx) = mpsc::channel();
    follow(&mut procs.0[0], "primary", tx.clone());
    follow(&mut procs.0[1], "backup", tx);
    let start = Instant::now();
    let mut lines: Vec<(&str, Instant, u32)> = Vec::new();
    let mut killed_at = None;
    let mut status_before_kill = None;
    while start.elapsed() < Duration::from_secs(DEMO_TIMEOUT_S) {
        let Ok((tag, at, line)) = rx.recv_timeout(Duration::from_millis(200)) else {
            if procs.0[1].try_wait().ok().flatten().is_some() {
                break;
            }
            continue;
        };
        println!("  {tag:>7} | {line}");
        if let Some(n) = line
            .strip_prefix("i=")
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
        {
            lines.push((tag, at, n));
        }
        if killed_at.is_none() && lines.len() >= DEMO_KILL_AFTER_LINES {
            status_before_kill = std::fs::read_to_string(dir.join("primary.json")).ok();
            println!("  ------- | SIGKILL to the primary");
            let _ = procs.0[0].kill();
            killed_at = Some(Instant::now());
        }
        if line.starts_with("sleeper: done") {
            break;
        }
    }
    let backup_code = procs.0[1].wait().ok().and_then(|s| s.code());
    // Report.
    let numbers: Vec<u32> = lines.iter().map(|l| l.2).collect();
    let repeats = numbers.windows(2).filter(|w| w[1] <= w[0]).count();
    let missing = (0..DEMO_LINES).filter(|n| !numbers.contains(n)).count();
    let last_primary = lines.iter().filter(|l| l.0 == "primary").map(|l| l.1).max();
    let first_backup = lines.iter().filter(|l| l.0 == "backup").map(|l| l.1).min();
    let stall = match (last_primary, first_backup) {
        (Some(a), Some(b)) if b > a => Some(b - a),
        _ => None,
    };
    println!();
    println!("report");
    println!(
        "  lines printed          {} of {DEMO_LINES} (primary {}, backup after going live {})",
        numbers.len(),
        lines.iter().filter(|l| l.0 == "primary").count(),
        lines.iter().filter(|l| l.0 == "backup").count()
    );
    println!("  lines repeated         {repeats}");
    println!("  lines lost             {missing} (console bytes the dead primary still held under the Output Rule)");
    if let Some(s) = stall {
        println!("  client-visible stall   {} ms between the last line of the primary and the first of the backup (normal gap {DEMO_LINE_MS} ms)", s.as_millis());
    }
    if let Some(k) = killed_at {
        if let Some(b) = first_backup {
            println!(
                "  kill to first output   {} ms",
                b.saturating_duration_since(k).as_millis()
            );
        }
    }
    if let Some(s) =
        status_before_kill.and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
    {
        println!(
            "  log bandwidth          {:.3} Mbit/s before the kill",
            s["log_bandwidth_bps"].as_u64().unwrap_or(0) as f64 / 1e6
        );
    }
    println!(
        "  backup exit code       {}",
        backup_code
            .map(|c| c.to_string())
            .unwrap_or_else(|| "none".into())
    );
    let ok = backup_code == Some(0) && repeats == 0 && missing <= 1;
    println!(
        "  verdict                {}",
        if ok {
            "the guest survived the failure"
        } else {
            "FAILED"
        }
    );
    Ok(if ok { 0 } else { 1 })
}

/// A replica's status file, read again every 20 ms until `done` holds or `limit` has passed:
/// the last reading (`None` if it never parsed).
fn wait_for_status(
    file: &Path,
    limit: Duration,
    done: impl Fn(&serde_json::Value) -> bool,
) -> Option<serde_json::Value> {
    let read = || {
        std::fs::read_to_string(file)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
    };
    let started = Instant::now();
    let mut last = read();
    while !last.as_ref().is_some_and(&done) && started.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(20));
        last = read();
    }
    last
}
