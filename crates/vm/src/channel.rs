//! The VM side of the log channel: a sink that hands records and outputs, in program order, to
//! the replication driver, and a source that feeds a replaying VM from it.
//!
//! Records and outputs travel on one bounded queue so that the driver sees an output only after
//! the records it depends on (the Output Rule's tag is then simply "the last record before it").
//! When the queue is full the VM blocks: that is the paper's stall of a primary whose log buffer
//! is full.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use ftvm_log::Entry;

use crate::gate::{LogSink, LogSource, Output, OutputPort};
use crate::VmError;

/// Most items queued between the VM and the replication driver.
pub const VM_QUEUE_ITEMS_MAX: usize = 16 * 1024;

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

pub struct ChannelSink {
    tx: Sender<ToDriver>,
    pacing: Arc<Pacing>,
    scratch: Vec<u8>,
    last_pace: std::time::Instant,
}

impl ChannelSink {
    pub fn new(tx: Sender<ToDriver>, pacing: Arc<Pacing>) -> ChannelSink {
        ChannelSink {
            tx,
            pacing,
            scratch: Vec::new(),
            last_pace: std::time::Instant::now(),
        }
    }
}

fn driver_gone() -> VmError {
    VmError::Halted("the replication driver stopped (this replica is halting)".into())
}

impl LogSink for ChannelSink {
    fn append(&mut self, seq: u64, entry: &Entry) -> Result<(), VmError> {
        self.scratch.clear();
        entry.encode_framed(seq, &mut self.scratch);
        self.tx
            .send(ToDriver::Record {
                seq,
                bytes: self.scratch.clone(),
            })
            .map_err(|_| driver_gone())
    }
    fn flush(&mut self) -> Result<(), VmError> {
        self.tx.send(ToDriver::Flush).map_err(|_| driver_gone())
    }
    fn pace(&mut self) -> Duration {
        // Host time, used only to size a pause: it never reaches the guest.
        let ran = self.last_pace.elapsed();
        self.last_pace = std::time::Instant::now();
        let s = self
            .pacing
            .slowdown_permille
            .load(Ordering::Relaxed)
            .min(900);
        if s == 0 {
            return Duration::ZERO;
        }
        (ran * s as u32 / (1000 - s as u32)).min(Duration::from_millis(PACE_PAUSE_MS_MAX))
    }
}

/// Outputs of a primary: queued to the driver, which releases them under the Output Rule.
pub struct HeldOutputs {
    tx: Sender<ToDriver>,
}

impl HeldOutputs {
    pub fn new(tx: Sender<ToDriver>) -> HeldOutputs {
        HeldOutputs { tx }
    }
}

impl OutputPort for HeldOutputs {
    fn emit(&mut self, output: Output, seq: u64) -> Result<(), VmError> {
        self.tx
            .send(ToDriver::Output { seq, output })
            .map_err(|_| driver_gone())
    }
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
