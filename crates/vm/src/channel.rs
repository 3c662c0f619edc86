//! The VM side of the log channel: what the VM hands the replication driver (records, flushes
//! and outputs, in program order, so an output's tag is simply "the last record before it"),
//! the flow-control pause, and a source that feeds a replaying VM from the driver.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Receiver;
use ftvm_log::Entry;

use crate::gate::{LogSource, Output};
use crate::VmError;

/// What the VM thread tells the replication driver.
#[derive(Debug)]
pub enum ToDriver {
    /// A framed log entry.
    Record { seq: u64, bytes: Vec<u8> },
    /// Send what is batched now: an output depends on it, or the guest is idle.
    Flush,
    /// An external output produced after record `seq`.
    Output { seq: u64, output: Output },
}

/// Shared numbers the driver publishes for the VM thread.
#[derive(Debug, Default)]
pub struct Pacing {
    /// Flow control: the share of time (‰) the primary should spend paused, because the backup
    /// lags. The paper slows the primary's CPU gradually; we pause it at its wait points.
    pub slowdown_permille: AtomicU64,
}

/// Longest single flow-control pause.
pub const PACE_PAUSE_MS_MAX: u64 = 100;

/// Flow control: the pause to take now so that paused time is `slowdown_permille` of all time.
pub fn pace_pause(pacing: &Pacing, last_pace: &mut std::time::Instant) -> Duration {
    // Host time, used only to size a pause: it never reaches the guest.
    let now = std::time::Instant::now();
    let ran = now.saturating_duration_since(*last_pace);
    *last_pace = now;
    let s = pacing.slowdown_permille.load(Ordering::Relaxed).min(900);
    if s == 0 {
        return Duration::ZERO;
    }
    (ran * s as u32 / (1000 - s as u32)).min(Duration::from_millis(PACE_PAUSE_MS_MAX))
}

/// A replaying VM's log source: decoded entries from the driver. The driver drops its sender
/// when the log has ended (primary failed or said goodbye); the source then reports the end.
pub struct ChannelSource {
    rx: Receiver<(u64, Entry)>,
    replayed: Arc<AtomicU64>,
}

impl ChannelSource {
    pub fn new(rx: Receiver<(u64, Entry)>, replayed: Arc<AtomicU64>) -> ChannelSource {
        ChannelSource { rx, replayed }
    }
}

impl LogSource for ChannelSource {
    fn next_entry(&mut self) -> Result<Option<(u64, Entry)>, VmError> {
        match self.rx.recv() {
            Ok((seq, entry)) => {
                // Replayed means consumed by the VM; the driver reports it in acks for lag.
                self.replayed.store(seq, Ordering::Relaxed);
                Ok(Some((seq, entry)))
            }
            Err(_) => Ok(None),
        }
    }
}
