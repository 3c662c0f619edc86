//! The replica's status, written as JSON to a file for `ftvm status` (atomically, a few times a
//! second), so that an operator or a test sees role, epoch, lag and held outputs without a
//! control socket.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// How often the status file is rewritten.
pub const STATUS_INTERVAL_MS: u64 = 200;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub role: String,
    pub vm: String,
    pub epoch: u64,
    pub peer: Option<String>,
    pub last_seq: u64,
    pub acked_seq: u64,
    pub lag_entries: u64,
    pub lag_ms: u64,
    /// Primary: bytes sent on the log channel; backup: bytes received.
    pub log_bytes_sent: u64,
    pub outputs_held: u64,
    pub outputs_held_bytes: u64,
    pub slowdown_permille: u64,
    /// Primary: `Records` and other frames written to the log channel; backup: frames received.
    #[serde(default)]
    pub log_frames: u64,
    /// Writes to the log channel (each a syscall carrying one or more frames).
    #[serde(default)]
    pub log_writes: u64,
    /// Primary: smoothed time from writing records to the backup's own ack (µs): the latency the
    /// Output Rule adds to an output, unless outputs leave on host acks (`host_acks`).
    #[serde(default)]
    pub ack_rtt_us: u64,
    /// A replica running as a primary: how long ago its epoch was last confirmed with the
    /// tiebreaker, and whether it holds its outputs because it cannot be (see `Tenure`).
    #[serde(default)]
    pub epoch_confirmed_ms_ago: Option<u64>,
    #[serde(default)]
    pub holding_for_tiebreaker: bool,
    /// A primary: whether outputs may leave on the backup's host's TCP acknowledgment of the log
    /// (a direct connection, see `ft::primary`), or wait for the backup's own acks; `None` on a
    /// backup, on a primary alone, and before the backup has said what it sees (`Endpoints`).
    #[serde(default)]
    pub host_acks: Option<bool>,
    /// The last record seq whose write the backup's host acknowledged.
    #[serde(default)]
    pub host_acked_seq: u64,
    /// Writes whose acknowledgment by the backup's host had come back when the write returned
    /// (a host that acknowledges at once, on this machine): their outputs waited for nothing.
    #[serde(default)]
    pub writes_acked_at_once: u64,
}

pub struct StatusWriter {
    path: Option<PathBuf>,
    last_ms: u64,
    last_bytes: u64,
}

impl StatusWriter {
    pub fn new(path: Option<PathBuf>) -> StatusWriter {
        StatusWriter {
            path,
            last_ms: 0,
            last_bytes: 0,
        }
    }

    pub fn maybe_write(&mut self, now_ms: u64, make: impl FnOnce() -> Status) {
        let Some(path) = &self.path else { return };
        if now_ms < self.last_ms + STATUS_INTERVAL_MS {
            return;
        }
        let status = make();
        let elapsed = (now_ms - self.last_ms).max(1);
        let bandwidth_bps =
            (status.log_bytes_sent.saturating_sub(self.last_bytes)) * 8 * 1000 / elapsed;
        self.last_ms = now_ms;
        self.last_bytes = status.log_bytes_sent;
        let mut value = serde_json::to_value(&status).expect("status serializes");
        value["log_bandwidth_bps"] = serde_json::json!(bandwidth_bps);
        value["updated_ms"] = serde_json::json!(now_ms);
        // So that `ftvm status` can tell a replica's last word from a live one's.
        value["pid"] = serde_json::json!(std::process::id());
        let tmp = path.with_extension("tmp");
        if std::fs::write(&tmp, serde_json::to_vec_pretty(&value).expect("json")).is_ok() {
            let _ = std::fs::rename(&tmp, path);
        }
    }
}

/// `ftvm status FILE`: prints a replica's status.
pub fn show(args: &[String]) -> Result<i32, crate::opts::Failure> {
    let [file] = args else {
        return Err(crate::opts::Failure::usage(
            "usage: ftvm status STATUS_FILE",
        ));
    };
    let text = std::fs::read_to_string(file)
        .map_err(|e| crate::opts::Failure::usage(format!("cannot read {file}: {e}")))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| crate::opts::Failure::usage(format!("{file}: {e}")))?;
    let g = |k: &str| v.get(k).cloned().unwrap_or(serde_json::Value::Null);
    println!("role          {}", g("role").as_str().unwrap_or("?"));
    if let Some(pid) = g("pid").as_u64() {
        // The file outlives its writer; a replica that stopped leaves its last status behind.
        // (A zombie, exited but not yet reaped by its parent, is gone too.)
        let running = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                let state = stat.get(stat.rfind(')')? + 2..)?.chars().next()?;
                Some(!matches!(state, 'Z' | 'X'))
            })
            .unwrap_or(false);
        let age = std::fs::metadata(file)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .map(|d| format!(", written {:.1} s ago", d.as_secs_f64()))
            .unwrap_or_default();
        if running {
            println!("process       {pid} (running{age})");
        } else {
            println!("process       {pid} (gone: this is the replica's last status{age})");
        }
    }
    println!("vm            {}", g("vm").as_str().unwrap_or("?"));
    println!("epoch         {}", g("epoch"));
    println!("peer          {}", g("peer").as_str().unwrap_or("none"));
    println!("log seq       {} (acked {})", g("last_seq"), g("acked_seq"));
    println!(
        "lag           {} entries, {} ms",
        g("lag_entries"),
        g("lag_ms")
    );
    let bw = g("log_bandwidth_bps").as_u64().unwrap_or(0) as f64 / 1e6;
    println!(
        "log bandwidth {bw:.3} Mbit/s ({} bytes in all)",
        g("log_bytes_sent")
    );
    println!(
        "outputs held  {} ({} bytes)",
        g("outputs_held"),
        g("outputs_held_bytes")
    );
    println!("slowdown      {} per mille", g("slowdown_permille"));
    println!(
        "log frames    {} in {} writes",
        g("log_frames").as_u64().unwrap_or(0),
        g("log_writes").as_u64().unwrap_or(0)
    );
    if let Some(us) = g("ack_rtt_us").as_u64().filter(|&us| us > 0) {
        println!(
            "ack rtt       {us} us (records written to the backup's own ack: the Output Rule's delay unless host acks are on)"
        );
    }
    match g("host_acks").as_bool() {
        Some(true) => println!(
            "host acks     on: outputs leave once the backup's host has the log (seq {}; {} of {} writes acked within the write)",
            g("host_acked_seq"),
            g("writes_acked_at_once").as_u64().unwrap_or(0),
            g("log_writes").as_u64().unwrap_or(0)
        ),
        Some(false) => println!(
            "host acks     off: outputs wait for the backup's own acks (no direct connection to its host)"
        ),
        None => {}
    }
    if let Some(ms) = g("epoch_confirmed_ms_ago").as_u64() {
        let holding = if g("holding_for_tiebreaker").as_bool() == Some(true) {
            "; outputs held until the tiebreaker answers"
        } else {
            ""
        };
        println!(
            "tiebreaker    epoch confirmed {:.1} s ago{holding}",
            ms as f64 / 1000.0
        );
    }
    Ok(0)
}
