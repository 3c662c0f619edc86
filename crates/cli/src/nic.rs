//! The VM's NIC attachment as the CLI uses it: a thin wrapper over `ftvm_edge`, so that the rest
//! of the CLI does not depend on the edge crate's details.

use crossbeam_channel::Receiver;

/// A TAP attachment: frames in (bounded channel, filled off the VM thread), frames out.
pub struct Nic {
    inner: NicInner,
}

enum NicInner {}

/// Sends frames out of the NIC; cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct NicTx {}

impl Nic {
    /// Attaches to TAP device `tap` with an optional seeded fault spec (`drop=..,dup=..`).
    pub fn open(tap: &str, fault: Option<&str>) -> Result<Nic, String> {
        let _ = fault;
        Err(format!("TAP attachment is not available in this build (device {tap})"))
    }
    pub fn receiver(&self) -> Receiver<Vec<u8>> {
        match self.inner {}
    }
    pub fn transmitter(&self) -> NicTx {
        match self.inner {}
    }
    /// A backup attaches deaf: inbound frames are discarded until go-live.
    pub fn set_enabled(&self, enabled: bool) {
        let _ = enabled;
        match self.inner {}
    }
}

impl NicTx {
    pub fn send(&self, frame: Vec<u8>) {
        let _ = frame;
    }
}
