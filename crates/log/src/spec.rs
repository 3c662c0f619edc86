//! The VM definition: everything both replicas must agree on before the guest runs.
//!
//! A `VmSpec` is plain data. It travels in the log header (so a log names the VM it belongs to)
//! and in the replication handshake (so a backup refuses a primary running a different VM).

use serde::{Deserialize, Serialize};

/// Default cap on guest linear memory. Fixed caps make `memory.grow` answer the same on both hosts.
pub const MEMORY_BYTES_MAX_DEFAULT: u64 = 256 << 20;
/// Default cap on table elements.
pub const TABLE_ELEMENTS_MAX_DEFAULT: u32 = 100_000;
/// Default number of gate events between two checkpoints (output digest + state hash).
pub const CHECKPOINT_EVENTS_DEFAULT: u64 = 4096;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    /// argv as the guest sees it; argv[0] is the module's name.
    pub args: Vec<String>,
    /// Environment, in order.
    pub env: Vec<(String, String)>,
    /// Preopened directories (the VM's disk), by guest path, in fd order starting at 3.
    pub preopens: Vec<String>,
    /// TCP listeners preopened after the directories, by port.
    pub listeners: Vec<u16>,
    /// The VM's NIC, if it has one.
    pub nic: Option<NicSpec>,
    pub limits: Limits,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicSpec {
    pub mac: [u8; 6],
    pub ip: [u8; 4],
    pub prefix_len: u8,
    pub gateway: Option<[u8; 4]>,
    /// Seed of the netstack's PRNG (ISNs). Part of the spec so both replicas agree on it.
    pub seed: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub memory_bytes_max: u64,
    pub table_elements_max: u32,
    /// Gate events between checkpoints; 0 disables periodic checkpoints (exit still checks).
    pub checkpoint_events: u64,
    /// Count wasm instructions with fuel and check the count at checkpoints (slower, stricter).
    pub fuel: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes_max: MEMORY_BYTES_MAX_DEFAULT,
            table_elements_max: TABLE_ELEMENTS_MAX_DEFAULT,
            checkpoint_events: CHECKPOINT_EVENTS_DEFAULT,
            fuel: false,
        }
    }
}

/// Formats a MAC as `02:00:00:00:00:01`.
pub fn mac_to_string(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `02:00:00:00:00:01`.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = text.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (slot, part) in mac.iter_mut().zip(parts) {
        if part.len() != 2 {
            return None;
        }
        *slot = u8::from_str_radix(part, 16).ok()?;
    }
    Some(mac)
}
