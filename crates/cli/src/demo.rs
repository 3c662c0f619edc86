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
    let p = parse(args, &["guest"], &[], false)?;
    let exe = std::env::current_exe().map_err(|e| Failure::usage(e.to_string()))?;
    let guest = match p.one("guest") {
        Some(g) => PathBuf::from(g),
        None => exe
            .parent()
            .and_then(|d| d.parent())
            .and_then(|d| d.parent())
            .map(|root| root.join("guests/build/sleeper.wasm"))
            .filter(|g| g.exists())
            .ok_or_else(|| Failure::usage("guests/build/sleeper.wasm not found: run scripts/setup.sh, or pass --guest"))?,
    };
    let dir = tempdir()?;
    let result = run_console_demo(&exe, &guest, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
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
        format!("name = \"demo\"\nmodule = \"{}\"\nargs = [\"{DEMO_LINES}\", \"{DEMO_LINE_MS}\"]\n", guest.display()),
    )
    .map_err(|e| Failure::usage(e.to_string()))?;
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_err(|e| Failure::usage(e.to_string()))?.port();
    let tb = format!("dir:{}", dir.join("tiebreak").display());
    let spawn = |role: &str, status: &str| {
        Command::new(exe)
            .args(["ft", "--vm", vm.to_str().unwrap(), "--as", role, "--log", &format!("127.0.0.1:{port}"), "--tiebreak", &tb])
            .args(["--owner", &format!("demo-{role}"), "--status-file", dir.join(status).to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Failure::usage(format!("cannot start {}: {e}", exe.display())))
    };
    println!("ftvm demo: a guest printing {DEMO_LINES} numbered lines, {DEMO_LINE_MS} ms apart, as a fault-tolerant pair");
    let mut procs = Killer(vec![spawn("primary", "primary.json")?, spawn("backup", "backup.json")?]);
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
        if let Some(n) = line.strip_prefix("i=").and_then(|r| r.split_whitespace().next()).and_then(|n| n.parse().ok()) {
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
    println!("  lines printed          {} of {DEMO_LINES} (primary {}, backup after going live {})", numbers.len(),
        lines.iter().filter(|l| l.0 == "primary").count(), lines.iter().filter(|l| l.0 == "backup").count());
    println!("  lines repeated         {repeats}");
    println!("  lines lost             {missing} (console bytes the dead primary still held under the Output Rule)");
    if let Some(s) = stall {
        println!("  client-visible stall   {} ms between the last line of the primary and the first of the backup (normal gap {DEMO_LINE_MS} ms)", s.as_millis());
    }
    if let Some(k) = killed_at {
        if let Some(b) = first_backup {
            println!("  kill to first output   {} ms", b.saturating_duration_since(k).as_millis());
        }
    }
    if let Some(s) = status_before_kill.and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok()) {
        println!("  log bandwidth          {:.3} Mbit/s before the kill", s["log_bandwidth_bps"].as_u64().unwrap_or(0) as f64 / 1e6);
    }
    println!("  backup exit code       {}", backup_code.map(|c| c.to_string()).unwrap_or_else(|| "none".into()));
    let ok = backup_code == Some(0) && repeats == 0 && missing <= 1;
    println!("  verdict                {}", if ok { "the guest survived the failure" } else { "FAILED" });
    Ok(if ok { 0 } else { 1 })
}
