//! Log entries: one per value that crossed the gate, plus checks and control operations.
//!
//! Binary layout of one entry on disk and on the log channel (all integers little-endian):
//!
//! ```text
//! +-----------+-----------+------------------------------------------+
//! | len u32   | crc32 u32 | body (len bytes)                         |
//! +-----------+-----------+------------------------------------------+
//! body = seq u64 | tag u8 | fields of the tag
//! ```
//!
//! `crc32` (IEEE) covers the body. `seq` starts at 1 and grows by one per entry, so a lost or
//! reordered entry is caught as well as a flipped bit. Variable-length fields are `u32 length`
//! followed by the bytes. Tags are never reused; a new kind of entry gets a new tag and a format
//! version bump (see `FORMAT_VERSION`).

use crate::LogError;

/// Largest body of one entry. Bounds what a reader allocates for a corrupt length field.
pub const ENTRY_BYTES_MAX: usize = 1 << 20;
/// Largest `random_get` chunk in one entry; bigger requests are split over several entries.
pub const RANDOM_CHUNK_BYTES_MAX: usize = 64 << 10;
/// Most frames delivered by one `Input` entry.
pub const INPUT_FRAMES_MAX: usize = 256;
/// Largest frame carried by an `Input` entry (Ethernet MTU 1500 + header, with headroom).
pub const FRAME_BYTES_MAX: usize = 2048;
/// Framing overhead: length and checksum.
pub const ENTRY_FRAMING_BYTES: usize = 8;

/// Clock ids as in WASI preview1.
pub const CLOCK_REALTIME: u32 = 0;
pub const CLOCK_MONOTONIC: u32 = 1;
pub const CLOCK_PROCESS_CPUTIME: u32 = 2;
pub const CLOCK_THREAD_CPUTIME: u32 = 3;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    /// A clock reading returned to the guest by `clock_time_get`.
    Clock { clock_id: u32, ns: u64 },
    /// Bytes returned to the guest by `random_get`.
    Random { bytes: Vec<u8> },
    /// The outcome of a wait point: the virtual monotonic time it ended at and the network
    /// frames delivered to the NIC there, in arrival order.
    Input { now_ns: u64, frames: Vec<Vec<u8>> },
    /// A check the replayer must reproduce: after `events` gate events, the outputs so far hash
    /// to `output_digest` and the VM state to `state_hash`.
    Checkpoint(Checkpoint),
    /// An operator's control operation, delivered to the VM at this point.
    Control(ControlOp),
    /// The guest exited with this code.
    Exit { code: u32 },
    /// The guest trapped; the message is for humans and is not compared.
    Trap { message: String },
    /// Disk operation `op` (from 0) of the guest's WASI call number `call` (counting every call
    /// from 1) failed on the host's file system with this (WASI) errno, having done nothing. A
    /// replayer fails it the same way without asking its own disk, so the disks stay alike.
    HostError { call: u64, op: u32, errno: u16 },
    /// The same operation, a write, wrote only `done` bytes (the disk filled up): a replayer
    /// writes exactly as many.
    HostShort { call: u64, op: u32, done: u64 },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub events: u64,
    pub output_bytes: u64,
    pub output_digest: [u8; 32],
    pub state_hash: [u8; 32],
    /// Fuel consumed since instantiation, when fuel counting is on.
    pub fuel: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlOp {
    /// Stop the VM on every replica; not a failure.
    PowerOff,
}

/// The kind of a gate request, used to check that replay asks for what the record answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKind {
    Clock,
    Random,
    Input,
    Checkpoint,
    Control,
    Exit,
    Trap,
    HostError,
    HostShort,
}

impl std::fmt::Display for EntryKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            EntryKind::Clock => "clock reading",
            EntryKind::Random => "random bytes",
            EntryKind::Input => "input (wake-up/frames)",
            EntryKind::Checkpoint => "checkpoint",
            EntryKind::Control => "control operation",
            EntryKind::Exit => "guest exit",
            EntryKind::Trap => "guest trap",
            EntryKind::HostError => "host disk error",
            EntryKind::HostShort => "short disk write",
        };
        f.write_str(name)
    }
}

const TAG_CLOCK: u8 = 1;
const TAG_RANDOM: u8 = 2;
const TAG_INPUT: u8 = 3;
const TAG_CHECKPOINT: u8 = 4;
const TAG_CONTROL: u8 = 5;
const TAG_EXIT: u8 = 6;
const TAG_TRAP: u8 = 7;
const TAG_HOST_ERROR: u8 = 8;
const TAG_HOST_SHORT: u8 = 9;

const CONTROL_POWER_OFF: u8 = 1;

impl Entry {
    pub fn kind(&self) -> EntryKind {
        match self {
            Entry::Clock { .. } => EntryKind::Clock,
            Entry::Random { .. } => EntryKind::Random,
            Entry::Input { .. } => EntryKind::Input,
            Entry::Checkpoint(_) => EntryKind::Checkpoint,
            Entry::Control(_) => EntryKind::Control,
            Entry::Exit { .. } => EntryKind::Exit,
            Entry::Trap { .. } => EntryKind::Trap,
            Entry::HostError { .. } => EntryKind::HostError,
            Entry::HostShort { .. } => EntryKind::HostShort,
        }
    }

    /// Appends the framed entry (length, checksum, body) to `out`.
    pub fn encode_framed(&self, seq: u64, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0u8; ENTRY_FRAMING_BYTES]);
        self.encode_body(seq, out);
        let body_len = out.len() - start - ENTRY_FRAMING_BYTES;
        assert!(
            body_len <= ENTRY_BYTES_MAX,
            "log entry of {body_len} bytes exceeds ENTRY_BYTES_MAX"
        );
        let crc = crc32fast::hash(&out[start + ENTRY_FRAMING_BYTES..]);
        out[start..start + 4].copy_from_slice(&(body_len as u32).to_le_bytes());
        out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    }

    fn encode_body(&self, seq: u64, out: &mut Vec<u8>) {
        out.extend_from_slice(&seq.to_le_bytes());
        match self {
            Entry::Clock { clock_id, ns } => {
                out.push(TAG_CLOCK);
                out.extend_from_slice(&clock_id.to_le_bytes());
                out.extend_from_slice(&ns.to_le_bytes());
            }
            Entry::Random { bytes } => {
                out.push(TAG_RANDOM);
                put_bytes(out, bytes);
            }
            Entry::Input { now_ns, frames } => {
                out.push(TAG_INPUT);
                out.extend_from_slice(&now_ns.to_le_bytes());
                out.extend_from_slice(&(frames.len() as u32).to_le_bytes());
                for frame in frames {
                    put_bytes(out, frame);
                }
            }
            Entry::Checkpoint(c) => {
                out.push(TAG_CHECKPOINT);
                out.extend_from_slice(&c.events.to_le_bytes());
                out.extend_from_slice(&c.output_bytes.to_le_bytes());
                out.extend_from_slice(&c.output_digest);
                out.extend_from_slice(&c.state_hash);
                match c.fuel {
                    Some(fuel) => {
                        out.push(1);
                        out.extend_from_slice(&fuel.to_le_bytes());
                    }
                    None => out.push(0),
                }
            }
            Entry::Control(op) => {
                out.push(TAG_CONTROL);
                out.push(match op {
                    ControlOp::PowerOff => CONTROL_POWER_OFF,
                });
            }
            Entry::Exit { code } => {
                out.push(TAG_EXIT);
                out.extend_from_slice(&code.to_le_bytes());
            }
            Entry::Trap { message } => {
                out.push(TAG_TRAP);
                put_bytes(out, message.as_bytes());
            }
            Entry::HostError { call, op, errno } => {
                out.push(TAG_HOST_ERROR);
                out.extend_from_slice(&call.to_le_bytes());
                out.extend_from_slice(&op.to_le_bytes());
                out.extend_from_slice(&errno.to_le_bytes());
            }
            Entry::HostShort { call, op, done } => {
                out.push(TAG_HOST_SHORT);
                out.extend_from_slice(&call.to_le_bytes());
                out.extend_from_slice(&op.to_le_bytes());
                out.extend_from_slice(&done.to_le_bytes());
            }
        }
    }

    /// Decodes one body (without framing). `offset` is only used in error messages.
    pub fn decode_body(body: &[u8], offset: u64) -> Result<(u64, Entry), LogError> {
        let mut r = Reader {
            buf: body,
            pos: 0,
            offset,
        };
        let seq = r.u64()?;
        let tag = r.u8()?;
        let entry = match tag {
            TAG_CLOCK => Entry::Clock {
                clock_id: r.u32()?,
                ns: r.u64()?,
            },
            TAG_RANDOM => Entry::Random {
                bytes: r.bytes(RANDOM_CHUNK_BYTES_MAX)?,
            },
            TAG_INPUT => {
                let now_ns = r.u64()?;
                let count = r.u32()? as usize;
                if count > INPUT_FRAMES_MAX {
                    return Err(r.bad(format!(
                        "input entry claims {count} frames (max {INPUT_FRAMES_MAX})"
                    )));
                }
                let mut frames = Vec::with_capacity(count);
                for _ in 0..count {
                    frames.push(r.bytes(FRAME_BYTES_MAX)?);
                }
                Entry::Input { now_ns, frames }
            }
            TAG_CHECKPOINT => {
                let events = r.u64()?;
                let output_bytes = r.u64()?;
                let output_digest = r.array32()?;
                let state_hash = r.array32()?;
                let fuel = match r.u8()? {
                    0 => None,
                    1 => Some(r.u64()?),
                    other => {
                        return Err(
                            r.bad(format!("checkpoint fuel flag {other} is neither 0 nor 1"))
                        )
                    }
                };
                Entry::Checkpoint(Checkpoint {
                    events,
                    output_bytes,
                    output_digest,
                    state_hash,
                    fuel,
                })
            }
            TAG_CONTROL => match r.u8()? {
                CONTROL_POWER_OFF => Entry::Control(ControlOp::PowerOff),
                other => return Err(r.bad(format!("unknown control operation {other}"))),
            },
            TAG_EXIT => Entry::Exit { code: r.u32()? },
            TAG_TRAP => {
                let bytes = r.bytes(ENTRY_BYTES_MAX)?;
                Entry::Trap {
                    message: String::from_utf8_lossy(&bytes).into_owned(),
                }
            }
            TAG_HOST_ERROR => Entry::HostError {
                call: r.u64()?,
                op: r.u32()?,
                errno: r.u16()?,
            },
            TAG_HOST_SHORT => Entry::HostShort {
                call: r.u64()?,
                op: r.u32()?,
                done: r.u64()?,
            },
            other => return Err(r.bad(format!("unknown entry tag {other}"))),
        };
        if r.pos != body.len() {
            return Err(r.bad(format!(
                "{} trailing bytes after the entry",
                body.len() - r.pos
            )));
        }
        Ok((seq, entry))
    }

    /// A one-line human summary for `ftvm inspect`.
    pub fn summary(&self) -> String {
        match self {
            Entry::Clock { clock_id, ns } => format!("clock id={clock_id} ns={ns}"),
            Entry::Random { bytes } => format!("random {} bytes", bytes.len()),
            Entry::Input { now_ns, frames } => {
                let bytes: usize = frames.iter().map(Vec::len).sum();
                format!(
                    "input now_ns={now_ns} frames={} ({bytes} bytes)",
                    frames.len()
                )
            }
            Entry::Checkpoint(c) => format!(
                "checkpoint events={} output_bytes={} output={} state={}{}",
                c.events,
                c.output_bytes,
                hex(&c.output_digest[..8]),
                hex(&c.state_hash[..8]),
                c.fuel.map(|f| format!(" fuel={f}")).unwrap_or_default()
            ),
            Entry::Control(op) => format!("control {op:?}"),
            Entry::Exit { code } => format!("exit code={code}"),
            Entry::Trap { message } => format!("trap {message:?}"),
            Entry::HostError { call, op, errno } => {
                format!("host disk error call={call} op={op} errno={errno}")
            }
            Entry::HostShort { call, op, done } => {
                format!("short disk write call={call} op={op} done={done}")
            }
        }
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    offset: u64,
}

impl Reader<'_> {
    fn bad(&self, what: String) -> LogError {
        LogError::Corrupt {
            offset: self.offset,
            what,
        }
    }
    fn take(&mut self, n: usize) -> Result<&[u8], LogError> {
        if self.buf.len() - self.pos < n {
            return Err(self.bad(format!(
                "entry body ends early (need {n} more bytes at body byte {})",
                self.pos
            )));
        }
        let slice = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(slice)
    }
    fn u8(&mut self) -> Result<u8, LogError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, LogError> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32, LogError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, LogError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn array32(&mut self) -> Result<[u8; 32], LogError> {
        Ok(self.take(32)?.try_into().expect("32 bytes"))
    }
    fn bytes(&mut self, max: usize) -> Result<Vec<u8>, LogError> {
        let len = self.u32()? as usize;
        if len > max {
            return Err(self.bad(format!("field of {len} bytes exceeds its limit of {max}")));
        }
        Ok(self.take(len)?.to_vec())
    }
}
