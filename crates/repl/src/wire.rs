//! The log channel's wire format: frames, messages, and a streaming decoder.
//!
//! Every message travels in one frame. Integers are little-endian (as in the log file format).
//!
//! ```text
//!  0        4        6    7    8                16       20       24
//!  +--------+--------+----+----+----------------+--------+--------+------------------------+
//!  | magic  |version |kind|flag| epoch          |pay_len | crc32  | payload (pay_len bytes) |
//!  | u32    | u16    | u8 | u8 | u64            | u32    | u32    |                        |
//!  +--------+--------+----+----+----------------+--------+--------+------------------------+
//!   "FTRL"    1                                            CRC-32 (IEEE) of bytes 0..20
//!                                                          followed by the payload
//! ```
//!
//! - `magic` is the ASCII bytes `FTRL` ("ftvm replication log").
//! - `epoch` is the sender's epoch: the generation of the fault-tolerant pair, as won from the
//!   tiebreaker. Receivers reject frames from a lower epoch (a deposed primary).
//! - `pay_len` is at most [`MAX_PAYLOAD_BYTES`]; a larger value is refused as soon as the header
//!   arrives, before any payload is buffered.
//! - The checksum covers the header (without the checksum field) and the payload, so a flipped bit
//!   anywhere in a frame is detected: in `magic` or `version` by their checks, in the length by the
//!   limit or by the checksum once the (wrong) number of bytes has arrived, elsewhere by the
//!   checksum. A frame is decoded only after its checksum matched, and decoded exhaustively (every
//!   byte accounted for, every enum tag known), so a corrupt frame is never applied.
//!
//! Messages (`kind`) and their payloads:
//!
//! | kind | message     | payload |
//! |------|-------------|---------|
//! | 1    | `Hello`     | vm_id (u16 len + UTF-8) · role u8 (1 primary, 2 backup) · config_hash (32 bytes) · disk_hash (32 bytes) · start_seq u64 |
//! | 2    | `HelloAck`  | ok u8 (0/1) · reason (u16 len + UTF-8) |
//! | 3    | `Records`   | first_seq u64 · count u32 · count × (len u32 · bytes) |
//! | 4    | `Ack`       | received_seq u64 · replayed_seq u64 · replay_lag_ms u64 |
//! | 5    | `Heartbeat` | now_ms u64 · last_seq u64 |
//! | 6    | `Goodbye`   | reason u8 (1 shutdown, 2 power-off, 3 guest exit) · code i32 (only for 3) |
//! | 7    | `Endpoints` | backup (u16 len + UTF-8) · primary (u16 len + UTF-8): the connection's two socket addresses as the backup sees them |
//!
//! One connection, primary → backup:
//!
//! ```text
//!   primary                                   backup
//!      |---- Hello(vm, hashes, start_seq) ------>|  checks vm id, hashes, start_seq
//!      |<--- HelloAck(ok) ------------------------|
//!      |<--- Endpoints(backup, primary) ----------|  no TCP relay between them?
//!      |---- Records(first_seq, [r, r, r]) ----->|  queued for replay
//!      |<--- Ack(received, replayed, lag) --------|  one per Records, plus periodic ones
//!      |---- Heartbeat (when idle) ------------->|
//!      |<--- Heartbeat (when idle) ---------------|
//!      |---- Goodbye(reason) ------------------->|  clean end: not a failure
//! ```
//!
//! A primary that will not pair (it has its backup, or it runs alone) answers a connection with
//! `HelloAck(ok = false, reason)` in its epoch instead of a `Hello`, and closes it; the backup
//! takes that as a refused handshake. (A backup of a build before this rule reports an
//! unexpected message instead: a refusal too, only a less helpful one.)
//!
//! # Versioning
//!
//! `version` is [`WIRE_VERSION`]. It is bumped for any change that a reader of the previous version
//! would misread: a new message kind, a new field, a changed meaning. A receiver refuses every other
//! version with [`WireError::BadVersion`] on the first frame; there is no negotiation and no silent
//! upgrade, because both replicas must run the same ftvm build anyway (the same engine, the same
//! log format). Version 2 added `Endpoints`. `flags` is reserved: versions 1 and 2 define no
//! flags and refuse frames that set any, so a future version can give them meaning (compression,
//! say) without being misread.
//!
//! After any decoding error the stream has lost its framing: the [`Decoder`] stays failed and keeps
//! returning the same error, and the connection must be dropped.

use std::collections::VecDeque;

/// `FTRL` on the wire.
pub const MAGIC: u32 = u32::from_le_bytes(*b"FTRL");
pub const WIRE_VERSION: u16 = 2;
pub const HEADER_BYTES: usize = 24;
/// Largest payload of one frame.
pub const MAX_PAYLOAD_BYTES: usize = 4 << 20;
/// Longest VM id in a `Hello`.
pub const MAX_VM_ID_BYTES: usize = 128;
/// Longest reason text in a `HelloAck`.
pub const MAX_REASON_BYTES: usize = 1024;
/// Longest socket address in an `Endpoints` message (an IPv6 address with scope and port fits).
pub const MAX_ENDPOINT_BYTES: usize = 64;
/// Bytes of a `Records` payload besides the records' bytes: first_seq and count.
pub const RECORDS_HEADER_BYTES: usize = 12;
/// Bytes each record adds to a `Records` payload besides its own bytes: its length.
pub const RECORD_OVERHEAD_BYTES: usize = 4;
/// Largest single record: one that fills a `Records` frame on its own.
pub const MAX_RECORD_BYTES: usize =
    MAX_PAYLOAD_BYTES - RECORDS_HEADER_BYTES - RECORD_OVERHEAD_BYTES;

const KIND_HELLO: u8 = 1;
const KIND_HELLO_ACK: u8 = 2;
const KIND_RECORDS: u8 = 3;
const KIND_ACK: u8 = 4;
const KIND_HEARTBEAT: u8 = 5;
const KIND_GOODBYE: u8 = 6;
const KIND_ENDPOINTS: u8 = 7;

/// One decoded frame: the sender's epoch and its message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub epoch: u64,
    pub message: Message,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Hello(Hello),
    HelloAck {
        ok: bool,
        reason: String,
    },
    /// Records `first_seq`, `first_seq + 1`, ... in order.
    Records {
        first_seq: u64,
        records: Vec<Vec<u8>>,
    },
    /// The backup has received every record up to `received_seq` and replayed every record up to
    /// `replayed_seq`; its oldest unreplayed record has waited `replay_lag_ms`.
    Ack {
        received_seq: u64,
        replayed_seq: u64,
        replay_lag_ms: u64,
    },
    /// "I am alive." `last_seq` is the last record the sender sent (primary) or received (backup).
    Heartbeat {
        now_ms: u64,
        last_seq: u64,
    },
    /// A clean end of the channel: not a failure.
    Goodbye {
        reason: GoodbyeReason,
    },
    /// Backup → primary, after the handshake: the connection's two ends as the backup's socket
    /// sees them ("ip:port"). When they are the primary's own two ends reversed, no relay
    /// terminates TCP between the replicas, so a TCP acknowledgment comes from the backup's host.
    Endpoints {
        backup: String,
        primary: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub vm_id: String,
    pub role: Role,
    /// Hash of everything that must match for replay: module, VM spec, engine version.
    pub config_hash: [u8; 32],
    /// Hash of the disk the backup starts from.
    pub disk_hash: [u8; 32],
    /// The first record the sender will send; the backup's state is that after `start_seq - 1`.
    pub start_seq: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Primary,
    Backup,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GoodbyeReason {
    /// The operator stopped fault tolerance; the VM goes on.
    Shutdown,
    /// The VM was powered off.
    PowerOff,
    /// The guest exited with this code.
    GuestExit(i32),
}

impl Message {
    pub fn kind_name(&self) -> &'static str {
        kind_name(self.kind())
    }

    fn kind(&self) -> u8 {
        match self {
            Message::Hello(_) => KIND_HELLO,
            Message::HelloAck { .. } => KIND_HELLO_ACK,
            Message::Records { .. } => KIND_RECORDS,
            Message::Ack { .. } => KIND_ACK,
            Message::Heartbeat { .. } => KIND_HEARTBEAT,
            Message::Goodbye { .. } => KIND_GOODBYE,
            Message::Endpoints { .. } => KIND_ENDPOINTS,
        }
    }
}

fn kind_name(kind: u8) -> &'static str {
    match kind {
        KIND_HELLO => "Hello",
        KIND_HELLO_ACK => "HelloAck",
        KIND_RECORDS => "Records",
        KIND_ACK => "Ack",
        KIND_HEARTBEAT => "Heartbeat",
        KIND_GOODBYE => "Goodbye",
        KIND_ENDPOINTS => "Endpoints",
        _ => "unknown",
    }
}

/// The payload size of a `Records` message holding records of these lengths.
pub fn records_payload_len(record_lens: impl IntoIterator<Item = usize>) -> usize {
    RECORDS_HEADER_BYTES
        + record_lens
            .into_iter()
            .map(|l| l + RECORD_OVERHEAD_BYTES)
            .sum::<usize>()
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error(
        "bad magic {found:#010x} at byte {offset} of the log channel: the peer is not an ftvm log \
         channel, or the stream lost its framing; drop the connection"
    )]
    BadMagic { offset: u64, found: u32 },
    #[error(
        "the frame at byte {offset} has wire version {found}, but this ftvm speaks version \
         {supported}: both hosts must run the same ftvm build"
    )]
    BadVersion {
        offset: u64,
        found: u16,
        supported: u16,
    },
    #[error(
        "the frame at byte {offset} announces a {len}-byte payload, over the {max}-byte limit"
    )]
    Oversized { offset: u64, len: u64, max: usize },
    #[error(
        "checksum mismatch in the frame at byte {offset}: stored {stored:#010x}, computed \
         {computed:#010x}; the frame is corrupt and was not applied; drop the connection"
    )]
    ChecksumMismatch {
        offset: u64,
        stored: u32,
        computed: u32,
    },
    #[error("the frame at byte {offset} sets flags {flags:#04x}, but wire version 1 defines none")]
    BadFlags { offset: u64, flags: u8 },
    #[error("the frame at byte {offset} has unknown message kind {kind}")]
    UnknownKind { offset: u64, kind: u8 },
    #[error("the {kind} frame at byte {offset} is malformed: {what}")]
    Malformed {
        offset: u64,
        kind: &'static str,
        what: String,
    },
    #[error(
        "the log channel ended in the middle of the frame at byte {offset} ({buffered} bytes of it \
         arrived)"
    )]
    Truncated { offset: u64, buffered: usize },
    #[error("cannot encode this {kind} message: {what}")]
    Unencodable { kind: &'static str, what: String },
}

impl Frame {
    pub fn new(epoch: u64, message: Message) -> Frame {
        Frame { epoch, message }
    }

    /// The frame's bytes, ready to send.
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        let mut out = Vec::new();
        self.encode_into(&mut out)?;
        Ok(out)
    }

    /// Appends the frame's bytes to `out`. On error nothing is appended.
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        let start = out.len();
        out.extend_from_slice(&[0u8; HEADER_BYTES]);
        if let Err(e) = encode_payload(&self.message, out) {
            out.truncate(start);
            return Err(e);
        }
        let payload_len = out.len() - start - HEADER_BYTES;
        if payload_len > MAX_PAYLOAD_BYTES {
            out.truncate(start);
            return Err(WireError::Unencodable {
                kind: self.message.kind_name(),
                what: format!("its payload is {payload_len} bytes, over {MAX_PAYLOAD_BYTES}"),
            });
        }
        let header = &mut out[start..start + HEADER_BYTES];
        header[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        header[4..6].copy_from_slice(&WIRE_VERSION.to_le_bytes());
        header[6] = self.message.kind();
        header[7] = 0; // flags: none in version 1
        header[8..16].copy_from_slice(&self.epoch.to_le_bytes());
        header[16..20].copy_from_slice(&(payload_len as u32).to_le_bytes());
        let crc = frame_crc(&out[start..start + 20], &out[start + HEADER_BYTES..]);
        out[start + 20..start + 24].copy_from_slice(&crc.to_le_bytes());
        Ok(())
    }
}

fn frame_crc(header: &[u8], payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(header);
    hasher.update(payload);
    hasher.finalize()
}

fn encode_payload(message: &Message, out: &mut Vec<u8>) -> Result<(), WireError> {
    let unencodable = |what: String| WireError::Unencodable {
        kind: message.kind_name(),
        what,
    };
    match message {
        Message::Hello(h) => {
            if h.vm_id.len() > MAX_VM_ID_BYTES {
                return Err(unencodable(format!(
                    "the VM id is over {MAX_VM_ID_BYTES} bytes"
                )));
            }
            put_str(out, &h.vm_id);
            out.push(match h.role {
                Role::Primary => 1,
                Role::Backup => 2,
            });
            out.extend_from_slice(&h.config_hash);
            out.extend_from_slice(&h.disk_hash);
            out.extend_from_slice(&h.start_seq.to_le_bytes());
        }
        Message::HelloAck { ok, reason } => {
            if reason.len() > MAX_REASON_BYTES {
                return Err(unencodable(format!(
                    "the reason is over {MAX_REASON_BYTES} bytes"
                )));
            }
            out.push(u8::from(*ok));
            put_str(out, reason);
        }
        Message::Records { first_seq, records } => {
            if records.is_empty() {
                return Err(unencodable("it holds no records".into()));
            }
            if *first_seq == 0 || first_seq.checked_add(records.len() as u64).is_none() {
                return Err(unencodable(format!(
                    "first_seq {first_seq} is out of range"
                )));
            }
            let len = records_payload_len(records.iter().map(Vec::len));
            if len > MAX_PAYLOAD_BYTES {
                return Err(unencodable(format!("its payload would be {len} bytes")));
            }
            out.extend_from_slice(&first_seq.to_le_bytes());
            out.extend_from_slice(&(records.len() as u32).to_le_bytes());
            for record in records {
                out.extend_from_slice(&(record.len() as u32).to_le_bytes());
                out.extend_from_slice(record);
            }
        }
        Message::Ack {
            received_seq,
            replayed_seq,
            replay_lag_ms,
        } => {
            if replayed_seq > received_seq {
                return Err(unencodable("replayed_seq is above received_seq".into()));
            }
            out.extend_from_slice(&received_seq.to_le_bytes());
            out.extend_from_slice(&replayed_seq.to_le_bytes());
            out.extend_from_slice(&replay_lag_ms.to_le_bytes());
        }
        Message::Heartbeat { now_ms, last_seq } => {
            out.extend_from_slice(&now_ms.to_le_bytes());
            out.extend_from_slice(&last_seq.to_le_bytes());
        }
        Message::Goodbye { reason } => match reason {
            GoodbyeReason::Shutdown => out.push(1),
            GoodbyeReason::PowerOff => out.push(2),
            GoodbyeReason::GuestExit(code) => {
                out.push(3);
                out.extend_from_slice(&code.to_le_bytes());
            }
        },
        Message::Endpoints { backup, primary } => {
            if backup.len() > MAX_ENDPOINT_BYTES || primary.len() > MAX_ENDPOINT_BYTES {
                return Err(unencodable(format!(
                    "an endpoint is over {MAX_ENDPOINT_BYTES} bytes"
                )));
            }
            put_str(out, backup);
            put_str(out, primary);
        }
    }
    Ok(())
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let len = u16::try_from(s.len()).expect("string lengths are checked before encoding");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Reads a payload field by field; every read is bounds-checked.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        if self.bytes.len() - self.pos < n {
            return Err(format!(
                "it ends inside {what} (needs {n} bytes at payload byte {}, has {})",
                self.pos,
                self.bytes.len() - self.pos
            ));
        }
        let slice = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(slice)
    }

    fn u8(&mut self, what: &str) -> Result<u8, String> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &str) -> Result<u16, String> {
        Ok(u16::from_le_bytes(
            self.take(2, what)?.try_into().expect("2 bytes"),
        ))
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.take(4, what)?.try_into().expect("4 bytes"),
        ))
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8, what)?.try_into().expect("8 bytes"),
        ))
    }

    fn hash(&mut self, what: &str) -> Result<[u8; 32], String> {
        Ok(self.take(32, what)?.try_into().expect("32 bytes"))
    }

    fn bool(&mut self, what: &str) -> Result<bool, String> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(format!("{what} is {other}, not 0 or 1")),
        }
    }

    fn str(&mut self, max: usize, what: &str) -> Result<String, String> {
        let len = self.u16(what)? as usize;
        if len > max {
            return Err(format!("{what} is {len} bytes, over the {max}-byte limit"));
        }
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| format!("{what} is not UTF-8"))
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn finish(&self) -> Result<(), String> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(format!("{n} bytes are left over after the last field")),
        }
    }
}

fn decode_payload(kind: u8, payload: &[u8]) -> Result<Message, String> {
    let mut r = Reader {
        bytes: payload,
        pos: 0,
    };
    let message = match kind {
        KIND_HELLO => {
            let vm_id = r.str(MAX_VM_ID_BYTES, "the VM id")?;
            let role = match r.u8("the role")? {
                1 => Role::Primary,
                2 => Role::Backup,
                other => return Err(format!("the role is {other}, not 1 or 2")),
            };
            let config_hash = r.hash("the config hash")?;
            let disk_hash = r.hash("the disk hash")?;
            let start_seq = r.u64("start_seq")?;
            if start_seq == 0 {
                return Err("start_seq is 0; sequence numbers start at 1".into());
            }
            Message::Hello(Hello {
                vm_id,
                role,
                config_hash,
                disk_hash,
                start_seq,
            })
        }
        KIND_HELLO_ACK => {
            let ok = r.bool("ok")?;
            let reason = r.str(MAX_REASON_BYTES, "the reason")?;
            Message::HelloAck { ok, reason }
        }
        KIND_RECORDS => {
            let first_seq = r.u64("first_seq")?;
            let count = r.u32("the record count")? as usize;
            if first_seq == 0 {
                return Err("first_seq is 0; sequence numbers start at 1".into());
            }
            if count == 0 {
                return Err("it holds no records".into());
            }
            if first_seq.checked_add(count as u64).is_none() {
                return Err(format!(
                    "{count} records from {first_seq} overflow the sequence"
                ));
            }
            // Each record takes at least its length field: refuse a count the payload cannot
            // hold before allocating for it.
            if count > r.remaining() / RECORD_OVERHEAD_BYTES {
                return Err(format!(
                    "it claims {count} records but has {} bytes",
                    r.remaining()
                ));
            }
            let mut records = Vec::with_capacity(count);
            for i in 0..count {
                let len = r.u32("a record length")? as usize;
                records.push(r.take(len, &format!("record {i}"))?.to_vec());
            }
            Message::Records { first_seq, records }
        }
        KIND_ACK => {
            let received_seq = r.u64("received_seq")?;
            let replayed_seq = r.u64("replayed_seq")?;
            let replay_lag_ms = r.u64("replay_lag_ms")?;
            if replayed_seq > received_seq {
                return Err(format!(
                    "replayed_seq {replayed_seq} is above received_seq {received_seq}"
                ));
            }
            Message::Ack {
                received_seq,
                replayed_seq,
                replay_lag_ms,
            }
        }
        KIND_HEARTBEAT => {
            let now_ms = r.u64("now_ms")?;
            let last_seq = r.u64("last_seq")?;
            Message::Heartbeat { now_ms, last_seq }
        }
        KIND_GOODBYE => {
            let reason = match r.u8("the reason")? {
                1 => GoodbyeReason::Shutdown,
                2 => GoodbyeReason::PowerOff,
                3 => GoodbyeReason::GuestExit(r.u32("the exit code")? as i32),
                other => return Err(format!("the reason is {other}, not 1, 2 or 3")),
            };
            Message::Goodbye { reason }
        }
        KIND_ENDPOINTS => Message::Endpoints {
            backup: r.str(MAX_ENDPOINT_BYTES, "the backup's endpoint")?,
            primary: r.str(MAX_ENDPOINT_BYTES, "the primary's endpoint")?,
        },
        _ => unreachable!("kinds are checked before payloads are decoded"),
    };
    r.finish()?;
    Ok(message)
}

/// Turns a byte stream (arbitrary chunks, as TCP delivers them) into frames.
///
/// Feed bytes with [`Decoder::push`] and take frames with [`Decoder::next_frame`] until it returns
/// `Ok(None)`. Call [`Decoder::finish`] when the stream ends to learn whether it ended cleanly.
/// After an error the decoder stays failed (see the module docs).
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    /// Start of the first unconsumed byte in `buf`.
    pos: usize,
    /// Stream offset of `buf[pos]`.
    offset: u64,
    failed: Option<WireError>,
}

impl Decoder {
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// Appends received bytes. Take the frames out with [`Decoder::next_frame`] before pushing much
    /// more: the decoder holds whatever has not been taken.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.failed.is_none() {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed, or the error that broke the
    /// stream (again on every later call).
    pub fn next_frame(&mut self) -> Result<Option<Frame>, WireError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        match self.decode_one() {
            Ok(frame) => Ok(frame),
            Err(e) => {
                self.failed = Some(e.clone());
                self.buf = Vec::new();
                self.pos = 0;
                Err(e)
            }
        }
    }

    /// Pushes `bytes` and returns every frame they complete.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Vec<Frame>, WireError> {
        self.push(bytes);
        let mut frames = Vec::new();
        while let Some(frame) = self.next_frame()? {
            frames.push(frame);
        }
        Ok(frames)
    }

    /// Call at the end of the stream: an error if it stopped inside a frame, or had failed before.
    pub fn finish(&self) -> Result<(), WireError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        match self.buffered() {
            0 => Ok(()),
            buffered => Err(WireError::Truncated {
                offset: self.offset,
                buffered,
            }),
        }
    }

    /// Stream offset of the next frame's first byte (bytes consumed so far).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Bytes received but not yet part of a returned frame.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn decode_one(&mut self) -> Result<Option<Frame>, WireError> {
        let avail = &self.buf[self.pos..];
        let offset = self.offset;
        // Check the header fields that can be checked as soon as they arrive, so that garbage is
        // refused before we wait for (or buffer) a payload it announces.
        if avail.len() >= 4 {
            let magic = u32::from_le_bytes(avail[0..4].try_into().expect("4 bytes"));
            if magic != MAGIC {
                return Err(WireError::BadMagic {
                    offset,
                    found: magic,
                });
            }
        }
        if avail.len() >= 6 {
            let version = u16::from_le_bytes(avail[4..6].try_into().expect("2 bytes"));
            if version != WIRE_VERSION {
                return Err(WireError::BadVersion {
                    offset,
                    found: version,
                    supported: WIRE_VERSION,
                });
            }
        }
        if avail.len() < HEADER_BYTES {
            return Ok(None);
        }
        let payload_len = u32::from_le_bytes(avail[16..20].try_into().expect("4 bytes")) as usize;
        if payload_len > MAX_PAYLOAD_BYTES {
            return Err(WireError::Oversized {
                offset,
                len: payload_len as u64,
                max: MAX_PAYLOAD_BYTES,
            });
        }
        if avail.len() < HEADER_BYTES + payload_len {
            return Ok(None);
        }
        let header = &avail[..HEADER_BYTES];
        let payload = &avail[HEADER_BYTES..HEADER_BYTES + payload_len];
        let stored = u32::from_le_bytes(header[20..24].try_into().expect("4 bytes"));
        let computed = frame_crc(&header[..20], payload);
        if stored != computed {
            return Err(WireError::ChecksumMismatch {
                offset,
                stored,
                computed,
            });
        }
        let kind = header[6];
        let flags = header[7];
        if flags != 0 {
            return Err(WireError::BadFlags { offset, flags });
        }
        if !(KIND_HELLO..=KIND_ENDPOINTS).contains(&kind) {
            return Err(WireError::UnknownKind { offset, kind });
        }
        let epoch = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
        let message = decode_payload(kind, payload).map_err(|what| WireError::Malformed {
            offset,
            kind: kind_name(kind),
            what,
        })?;

        let consumed = HEADER_BYTES + payload_len;
        self.pos += consumed;
        self.offset += consumed as u64;
        // Drop consumed bytes once they are at least half the buffer: amortised O(1) per byte.
        if self.pos * 2 >= self.buf.len() {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        Ok(Some(Frame { epoch, message }))
    }
}

/// Frames waiting to be written to a socket, with partial writes. A convenience for the I/O layer.
#[derive(Debug, Default)]
pub struct Outbox {
    bytes: VecDeque<u8>,
}

impl Outbox {
    pub fn new() -> Outbox {
        Outbox::default()
    }

    pub fn push(&mut self, frame: &Frame) -> Result<(), WireError> {
        let encoded = frame.encode()?;
        self.bytes.extend(encoded);
        Ok(())
    }

    /// Bytes not yet written.
    pub fn pending(&self) -> usize {
        self.bytes.len()
    }

    /// The next contiguous bytes to write; call [`Outbox::consume`] with how many were written.
    pub fn chunk(&mut self) -> &[u8] {
        self.bytes.make_contiguous();
        self.bytes.as_slices().0
    }

    pub fn consume(&mut self, written: usize) {
        self.bytes.drain(..written);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Frame> {
        vec![
            Frame::new(
                3,
                Message::Hello(Hello {
                    vm_id: "web-1".into(),
                    role: Role::Primary,
                    config_hash: [7; 32],
                    disk_hash: [9; 32],
                    start_seq: 101,
                }),
            ),
            Frame::new(
                3,
                Message::HelloAck {
                    ok: true,
                    reason: String::new(),
                },
            ),
            Frame::new(
                3,
                Message::HelloAck {
                    ok: false,
                    reason: "disk hash differs".into(),
                },
            ),
            Frame::new(
                3,
                Message::Records {
                    first_seq: 101,
                    records: vec![b"abc".to_vec(), vec![], vec![0xff; 300]],
                },
            ),
            Frame::new(
                3,
                Message::Ack {
                    received_seq: 103,
                    replayed_seq: 101,
                    replay_lag_ms: 12,
                },
            ),
            Frame::new(
                3,
                Message::Heartbeat {
                    now_ms: 123_456,
                    last_seq: 103,
                },
            ),
            Frame::new(
                3,
                Message::Goodbye {
                    reason: GoodbyeReason::Shutdown,
                },
            ),
            Frame::new(
                3,
                Message::Goodbye {
                    reason: GoodbyeReason::PowerOff,
                },
            ),
            Frame::new(
                u64::MAX,
                Message::Goodbye {
                    reason: GoodbyeReason::GuestExit(-2),
                },
            ),
            Frame::new(
                3,
                Message::Endpoints {
                    backup: "198.18.3.12:41234".into(),
                    primary: "[fe80::1%2]:7400".into(),
                },
            ),
        ]
    }

    fn decode_all(bytes: &[u8]) -> Result<Vec<Frame>, WireError> {
        let mut d = Decoder::new();
        let frames = d.feed(bytes)?;
        d.finish()?;
        Ok(frames)
    }

    #[test]
    fn every_message_round_trips() {
        for frame in samples() {
            let bytes = frame.encode().unwrap();
            assert_eq!(
                decode_all(&bytes).unwrap(),
                vec![frame.clone()],
                "{frame:?}"
            );
        }
    }

    #[test]
    fn frames_split_at_every_byte_boundary_decode_the_same() {
        let frames = samples();
        let mut stream = Vec::new();
        for f in &frames {
            f.encode_into(&mut stream).unwrap();
        }
        for cut in 0..=stream.len() {
            let mut d = Decoder::new();
            let mut got = d.feed(&stream[..cut]).unwrap();
            got.extend(d.feed(&stream[cut..]).unwrap());
            d.finish().unwrap();
            assert_eq!(got, frames, "cut at {cut}");
        }
        // And one byte at a time.
        let mut d = Decoder::new();
        let mut got = Vec::new();
        for b in &stream {
            got.extend(d.feed(std::slice::from_ref(b)).unwrap());
        }
        assert_eq!(got, frames);
        assert_eq!(d.offset(), stream.len() as u64);
    }

    /// Flips every bit of every sample frame. The corrupt frame must never decode: either the
    /// decoder reports an error at once, or (a length that grew) it waits for more bytes, and then
    /// reports an error once they arrive or the stream ends.
    #[test]
    fn every_single_bit_flip_is_detected() {
        for frame in samples() {
            let good = frame.encode().unwrap();
            for bit in 0..good.len() * 8 {
                let mut bad = good.clone();
                bad[bit / 8] ^= 1 << (bit % 8);
                let mut d = Decoder::new();
                match d.feed(&bad) {
                    Err(_) => continue,
                    Ok(frames) => assert!(frames.is_empty(), "bit {bit} of {frame:?} decoded"),
                }
                assert!(d.finish().is_err(), "bit {bit}: end of stream not reported");
                // The stream goes on: the bytes it waits for arrive, and then it must fail.
                let announced = u32::from_le_bytes(bad[16..20].try_into().unwrap()) as usize;
                assert!(announced <= MAX_PAYLOAD_BYTES && announced + HEADER_BYTES > bad.len());
                let more = vec![0u8; announced + HEADER_BYTES - bad.len()];
                let err = d
                    .feed(&more)
                    .expect_err("a corrupt frame decoded once complete");
                assert!(
                    matches!(err, WireError::ChecksumMismatch { offset: 0, .. }),
                    "{err}"
                );
            }
        }
    }

    #[test]
    fn errors_name_the_offset_and_the_problem() {
        let a = samples()[4].encode().unwrap();
        let mut stream = a.clone();
        let mut b = samples()[5].encode().unwrap();
        let last = b.len() - 1;
        b[last] ^= 0x10;
        stream.extend_from_slice(&b);
        let mut d = Decoder::new();
        assert_eq!(d.next_frame(), Ok(None));
        d.push(&stream);
        assert!(d.next_frame().unwrap().is_some());
        let err = d.next_frame().unwrap_err();
        assert!(
            matches!(err, WireError::ChecksumMismatch { offset, .. } if offset == a.len() as u64)
        );
        assert!(
            err.to_string().contains(&format!("at byte {}", a.len())),
            "{err}"
        );
        // It stays failed.
        d.push(&a);
        assert_eq!(d.next_frame().unwrap_err(), err);
        assert_eq!(d.finish().unwrap_err(), err);

        let mut bad = a.clone();
        bad[0] = b'X';
        assert!(matches!(
            decode_all(&bad[..4]),
            Err(WireError::BadMagic { offset: 0, .. })
        ));
        let mut bad = a.clone();
        bad[4] = 1;
        let err = decode_all(&bad[..6]).unwrap_err();
        assert!(
            matches!(
                err,
                WireError::BadVersion {
                    found: 1,
                    supported: 2,
                    ..
                }
            ),
            "{err}"
        );
        let mut bad = a.clone();
        bad[16..20].copy_from_slice(&(MAX_PAYLOAD_BYTES as u32 + 1).to_le_bytes());
        // Refused from the header alone, before any payload is buffered.
        assert!(matches!(
            decode_all(&bad[..HEADER_BYTES]),
            Err(WireError::Oversized { .. })
        ));
        assert!(matches!(
            decode_all(&a[..a.len() - 1]),
            Err(WireError::Truncated { offset: 0, buffered }) if buffered == a.len() - 1
        ));
    }

    /// Re-checksums a frame after tampering, to reach the checks behind the checksum.
    fn reseal(mut bytes: Vec<u8>) -> Vec<u8> {
        let len = bytes.len() - HEADER_BYTES;
        bytes[16..20].copy_from_slice(&(len as u32).to_le_bytes());
        let crc = frame_crc(&bytes[..20], &bytes[HEADER_BYTES..]);
        bytes[20..24].copy_from_slice(&crc.to_le_bytes());
        bytes
    }

    #[test]
    fn well_checksummed_nonsense_is_refused() {
        let ack = samples()[4].encode().unwrap();
        let mut flags = ack.clone();
        flags[7] = 1;
        assert!(matches!(
            decode_all(&reseal(flags)),
            Err(WireError::BadFlags { .. })
        ));
        let mut kind = ack.clone();
        kind[6] = 99;
        assert!(matches!(
            decode_all(&reseal(kind)),
            Err(WireError::UnknownKind { kind: 99, .. })
        ));
        let mut trailing = ack.clone();
        trailing.push(0);
        let err = decode_all(&reseal(trailing)).unwrap_err();
        assert!(err.to_string().contains("left over"), "{err}");
        let mut short = ack.clone();
        short.pop();
        assert!(matches!(
            decode_all(&reseal(short)),
            Err(WireError::Malformed { .. })
        ));
        // replayed > received
        let mut order = ack.clone();
        order[HEADER_BYTES + 8..HEADER_BYTES + 16].copy_from_slice(&500u64.to_le_bytes());
        assert!(matches!(
            decode_all(&reseal(order)),
            Err(WireError::Malformed { .. })
        ));
        // A record count the payload cannot hold is refused before allocating.
        let records = samples()[3].encode().unwrap();
        let mut count = records.clone();
        count[HEADER_BYTES + 8..HEADER_BYTES + 12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode_all(&reseal(count)),
            Err(WireError::Malformed { .. })
        ));
        let mut bool_byte = samples()[1].encode().unwrap();
        bool_byte[HEADER_BYTES] = 2;
        assert!(matches!(
            decode_all(&reseal(bool_byte)),
            Err(WireError::Malformed { .. })
        ));
    }

    #[test]
    fn limits_are_enforced_when_encoding() {
        let big = Frame::new(
            1,
            Message::Records {
                first_seq: 1,
                records: vec![vec![0; MAX_RECORD_BYTES]],
            },
        );
        let bytes = big.encode().unwrap();
        assert_eq!(bytes.len(), HEADER_BYTES + MAX_PAYLOAD_BYTES);
        assert_eq!(decode_all(&bytes).unwrap(), vec![big]);
        let too_big = Frame::new(
            1,
            Message::Records {
                first_seq: 1,
                records: vec![vec![0; MAX_RECORD_BYTES + 1]],
            },
        );
        let mut out = vec![1, 2, 3];
        assert!(too_big.encode_into(&mut out).is_err());
        assert_eq!(out, [1, 2, 3], "nothing appended on error");
        let empty = Frame::new(
            1,
            Message::Records {
                first_seq: 1,
                records: vec![],
            },
        );
        assert!(empty.encode().is_err());
        let long_id = Frame::new(
            1,
            Message::Hello(Hello {
                vm_id: "x".repeat(MAX_VM_ID_BYTES + 1),
                role: Role::Primary,
                config_hash: [0; 32],
                disk_hash: [0; 32],
                start_seq: 1,
            }),
        );
        assert!(long_id.encode().is_err());
    }

    #[test]
    fn the_outbox_hands_out_what_was_pushed() {
        let mut outbox = Outbox::new();
        let frames = samples();
        for f in &frames {
            outbox.push(f).unwrap();
        }
        let mut d = Decoder::new();
        let mut got = Vec::new();
        while outbox.pending() > 0 {
            let chunk = outbox.chunk();
            let n = chunk.len().min(7);
            got.extend(d.feed(&chunk[..n]).unwrap());
            outbox.consume(n);
        }
        assert_eq!(got, frames);
    }
}
