//! The replication protocol between a primary VM and its backup, without I/O.
//!
//! The primary's log records stream to the backup over one connection (the *log channel*); acks
//! and heartbeats come back. This crate holds everything about that channel that is not a socket or
//! a clock:
//!
//! - [`wire`]: the frame format and a streaming [`Decoder`] (diagram and versioning in its docs);
//! - [`OutputRule`]: holds external outputs until the backup acknowledged the log up to them;
//! - [`PrimaryLink`] and [`BackupLink`]: the two ends of the channel as state machines.
//!
//! Records are opaque here ([`Record`]: a sequence number and bytes); the VM layer encodes and
//! decodes log entries.
//!
//! # Driving the state machines (sans-I/O)
//!
//! Nothing here reads a clock, sleeps or touches a socket, in the manner of raft-rs and
//! Firecracker's `dumbo`: the caller passes `now_ms` (any monotonic millisecond clock) into every
//! call, and carries out the returned [`Action`]s in order.
//!
//! ```text
//!  VM thread / I/O edge                           PrimaryLink
//!    record produced ─────── on_record(r, now) ──►  buffers; batches; may say Stall
//!    output queued ───────── flush(now) ────────►  sends the batch at once (Output Rule latency)
//!    bytes from socket ──► Decoder ── on_message(frame, now) ──► acks → Release{acked_seq}
//!    timer at next_deadline_ms() ── tick(now) ──►  batch timeout, heartbeat, failure detection
//!                         ◄── Vec<Action>: Send(frame) → encode, write; Release → OutputRule;
//!                                          Stall/Resume → block the VM; PeerFailed → tiebreak
//! ```
//!
//! The backup is driven the same way; it hands records to the VM through
//! [`BackupLink::pop_record`] and is told of replay progress by [`BackupLink::replayed`].
//!
//! # Architecture invariants
//!
//! - No record is acknowledged before it was received in sequence; gaps are errors, duplicates are
//!   ignored. The Output Rule therefore never releases an output whose record the backup lacks.
//! - Every buffer is bounded: unacked records on the primary, the replay queue on the backup, held
//!   outputs, frame payloads. A full buffer is backpressure (`Stall`, `wants_records() == false`,
//!   `OutputRuleFull`), never growth.
//! - A clean `Goodbye` is not a failure, and a link reports `PeerFailed` at most once.
//! - A protocol error (`Err(ReplError)` from `on_message`) breaks the link for good: drop the
//!   connection and treat it as a failure of the peer.
//!
//! # Deliberately absent
//!
//! Retransmission (TCP delivers in order or the connection dies, which is a failure), reconnection
//! (a new pair is a new link with a new `Hello`), and the tiebreak itself (`ftvm-tiebreak`).

pub mod output_rule;
pub mod wire;

mod backup;
mod primary;
#[cfg(test)]
mod sim_tests;
#[cfg(test)]
mod test_rng;

pub use backup::{BackupExpect, BackupLink};
pub use output_rule::{OutputLen, OutputRule, OutputRuleFull, MAX_HELD_BYTES, MAX_HELD_OUTPUTS};
pub use primary::PrimaryLink;
pub use wire::{
    Decoder, Frame, GoodbyeReason, Hello, Message, Outbox, Role, WireError, MAX_PAYLOAD_BYTES,
    MAX_RECORD_BYTES, WIRE_VERSION,
};

/// One log record as the channel sees it: opaque bytes with a sequence number. Sequence numbers
/// start at 1 and are contiguous.
#[derive(Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub bytes: Vec<u8>,
}

impl std::fmt::Debug for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The bytes can be a megabyte: an error message needs only their size.
        write!(
            f,
            "Record {{ seq: {}, {} bytes }}",
            self.seq,
            self.bytes.len()
        )
    }
}

/// Heartbeats go out when nothing else was sent for this long.
pub const DEFAULT_HEARTBEAT_INTERVAL_MS: u64 = 50;
/// The peer is declared failed when nothing was heard from it for this long.
///
/// Why 1000 ms: it is 20 heartbeat intervals. On a loaded 2-core machine the thread that drives a
/// link competes with the VM's own thread, with compilation (wasmtime compiles in parallel) and
/// with the other replica's threads when both run on one host in tests; we have seen stalls of a
/// few hundred milliseconds. A false failover is expensive (a full clone to restore redundancy, and
/// the primary stalls on the tiebreak), while the paper's own timeout is "a few seconds". Time to
/// go live is roughly this timeout plus the backup's lag (kept near [`DEFAULT_LAG_TARGET_MS`]).
pub const DEFAULT_FAILURE_TIMEOUT_MS: u64 = 1_000;
/// Records wait at most this long for more records to share a frame, if the link is ticked at
/// its deadline (`ftvm ft`'s primary may tick up to 25 ms late for records made while its driver
/// sleeps, when no output flushes them first). Outputs flush at once.
pub const DEFAULT_BATCH_DELAY_MS: u64 = 2;
/// A batch is sent as soon as it holds this many bytes.
pub const DEFAULT_BATCH_BYTES: usize = 256 << 10;
/// Most records the primary holds that the backup has not acknowledged.
pub const MAX_UNACKED_RECORDS: usize = 65_536;
/// Most record bytes the primary holds that the backup has not acknowledged.
pub const MAX_UNACKED_BYTES: usize = 64 << 20;
/// The backup's replay lag the primary aims to stay under (the paper: about 100 ms).
pub const DEFAULT_LAG_TARGET_MS: u64 = 100;
/// While the lag stays over the target, the slowdown grows by one step this often.
pub const DEFAULT_SLOWDOWN_STEP_MS: u64 = 100;
/// One step of slowdown: the share of time (in ‰) the primary should spend paused.
pub const SLOWDOWN_STEP_PERMILLE: u16 = 100;
/// The slowdown never exceeds this: the primary always keeps making some progress.
pub const SLOWDOWN_MAX_PERMILLE: u16 = 900;
/// The backup reports replay progress at most this often (besides acking every `Records`).
pub const DEFAULT_ACK_INTERVAL_MS: u64 = 10;
/// Most records waiting on the backup to be replayed.
pub const MAX_REPLAY_QUEUE_RECORDS: usize = 65_536;
/// Most record bytes waiting on the backup to be replayed.
pub const MAX_REPLAY_QUEUE_BYTES: usize = 64 << 20;

/// Timing and limits of a link. Both ends should use the same values. Deserializes from a
/// partial table (e.g. TOML): missing fields take their defaults.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LinkConfig {
    pub heartbeat_interval_ms: u64,
    pub failure_timeout_ms: u64,
    pub batch_delay_ms: u64,
    pub batch_bytes: usize,
    pub unacked_records_max: usize,
    pub unacked_bytes_max: usize,
    pub lag_target_ms: u64,
    pub slowdown_step_ms: u64,
    pub ack_interval_ms: u64,
    pub replay_queue_records_max: usize,
    pub replay_queue_bytes_max: usize,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            heartbeat_interval_ms: DEFAULT_HEARTBEAT_INTERVAL_MS,
            failure_timeout_ms: DEFAULT_FAILURE_TIMEOUT_MS,
            batch_delay_ms: DEFAULT_BATCH_DELAY_MS,
            batch_bytes: DEFAULT_BATCH_BYTES,
            unacked_records_max: MAX_UNACKED_RECORDS,
            unacked_bytes_max: MAX_UNACKED_BYTES,
            lag_target_ms: DEFAULT_LAG_TARGET_MS,
            slowdown_step_ms: DEFAULT_SLOWDOWN_STEP_MS,
            ack_interval_ms: DEFAULT_ACK_INTERVAL_MS,
            replay_queue_records_max: MAX_REPLAY_QUEUE_RECORDS,
            replay_queue_bytes_max: MAX_REPLAY_QUEUE_BYTES,
        }
    }
}

impl LinkConfig {
    pub fn validate(&self) -> Result<(), ReplError> {
        let bad = |what: &str| Err(ReplError::Config(what.to_string()));
        if self.heartbeat_interval_ms == 0 {
            return bad("heartbeat_interval_ms must be above 0");
        }
        if self.failure_timeout_ms < 2 * self.heartbeat_interval_ms {
            return bad("failure_timeout_ms must be at least two heartbeat intervals");
        }
        if self.ack_interval_ms == 0 || self.ack_interval_ms >= self.failure_timeout_ms {
            return bad("ack_interval_ms must be above 0 and below failure_timeout_ms");
        }
        if self.batch_bytes == 0 || self.batch_bytes > MAX_PAYLOAD_BYTES {
            return bad("batch_bytes must be between 1 and MAX_PAYLOAD_BYTES");
        }
        if self.unacked_records_max == 0 || self.unacked_bytes_max == 0 {
            return bad("the unacked limits must be above 0");
        }
        if self.replay_queue_records_max == 0 || self.replay_queue_bytes_max == 0 {
            return bad("the replay queue limits must be above 0");
        }
        if self.slowdown_step_ms == 0 {
            return bad("slowdown_step_ms must be above 0");
        }
        Ok(())
    }
}

/// Where a link is in its life. Everything after `Connected` is final.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkState {
    /// Hello sent (primary) or awaited (backup).
    Handshaking,
    Connected,
    /// Nothing was heard from the peer within the failure timeout.
    Failed,
    /// A Goodbye was sent or received.
    Closed,
    /// The handshake was refused.
    Rejected,
    /// The peer runs in a higher epoch: this primary was deposed.
    Superseded,
    /// A protocol error: the connection is unusable.
    Broken,
}

impl LinkState {
    pub fn is_final(self) -> bool {
        !matches!(self, LinkState::Handshaking | LinkState::Connected)
    }

    fn name(self) -> &'static str {
        match self {
            LinkState::Handshaking => "handshaking",
            LinkState::Connected => "connected",
            LinkState::Failed => "failed",
            LinkState::Closed => "closed",
            LinkState::Rejected => "rejected",
            LinkState::Superseded => "superseded",
            LinkState::Broken => "broken",
        }
    }
}

/// How much the primary should slow down so that the backup keeps up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pacing {
    /// The backup's replay lag as it last reported it.
    pub lag_ms: u64,
    /// Records produced but not yet replayed by the backup.
    pub lag_records: u64,
    /// Share of time the primary should spend paused, in ‰ (0 = full speed).
    pub slowdown_permille: u16,
}

impl Pacing {
    /// How long to pause after running for `ran_ms`, so that pauses take `slowdown_permille` of the
    /// time.
    pub fn sleep_ms(&self, ran_ms: u64) -> u64 {
        let s = u64::from(self.slowdown_permille.min(SLOWDOWN_MAX_PERMILLE));
        ran_ms * s / (1000 - s)
    }
}

/// What the caller must do, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Encode and write this frame to the peer.
    Send(Frame),
    /// Primary: the backup has received every record up to `acked_seq`; release outputs tagged
    /// up to it ([`OutputRule::release`]).
    Release {
        acked_seq: u64,
    },
    /// Primary: the send buffer is full; produce no more records until `Resume`.
    Stall,
    Resume,
    /// Primary: the slowdown changed.
    Pace(Pacing),
    /// The handshake succeeded.
    HandshakeDone,
    /// The handshake was refused (by the peer, or by us). Not a failure of the peer: the pair
    /// cannot work, so do not fail over.
    HandshakeRejected {
        reason: String,
    },
    /// Nothing was heard from the peer for `silent_ms`: run the tiebreak (the paper: go live, or
    /// go on alone, only after winning it).
    PeerFailed {
        silent_ms: u64,
    },
    /// The peer said Goodbye: a clean end, not a failure.
    PeerClosed {
        reason: GoodbyeReason,
    },
    /// A frame from a lower epoch was ignored: a deposed primary is still talking.
    StaleEpoch {
        theirs: u64,
        ours: u64,
    },
    /// Primary: the backup's view of the connection's two ends (its own address, the primary's).
    /// The I/O layer compares them with its own: equal (reversed), no relay terminates TCP
    /// between the replicas.
    PeerEndpoints {
        backup: String,
        primary: String,
    },
    /// Primary: the peer runs in a higher epoch, so this primary was deposed. Stop the VM.
    Superseded {
        theirs: u64,
        ours: u64,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ReplError {
    #[error("invalid link configuration: {0}")]
    Config(String),
    #[error("record {found} was offered, but the next record must be {expected}: records are contiguous")]
    RecordOutOfOrder { expected: u64, found: u64 },
    #[error("record {seq} is {len} bytes, over the {max}-byte limit of one log-channel frame")]
    RecordTooLarge { seq: u64, len: usize, max: usize },
    #[error(
        "the send buffer is full ({records} records, {bytes} bytes not acknowledged by the backup); \
         wait for Resume before offering record {}", record.seq
    )]
    SendBufferFull {
        record: Record,
        records: usize,
        bytes: usize,
    },
    #[error("records are missing: record {found} arrived, but the next expected was {expected}")]
    Gap { expected: u64, found: u64 },
    #[error("the backup acknowledged record {acked}, but only records up to {sent} were sent")]
    AckBeyondSent { acked: u64, sent: u64 },
    #[error("the backup's {field} went backwards from {previous} to {found}")]
    AckRegressed {
        field: &'static str,
        previous: u64,
        found: u64,
    },
    #[error("unexpected {message} message from the {peer} while {state}")]
    Unexpected {
        message: &'static str,
        peer: &'static str,
        state: &'static str,
    },
    #[error(
        "a frame in epoch {theirs} arrived after the handshake in epoch {ours}; a new epoch needs a \
         new connection"
    )]
    EpochChanged { theirs: u64, ours: u64 },
    #[error("the {peer}'s heartbeat says its last record is {theirs}, but ours is {ours}")]
    HeartbeatMismatch {
        peer: &'static str,
        theirs: u64,
        ours: u64,
    },
    #[error(
        "the replay queue was already full ({records} records, {bytes} bytes) when more records \
         arrived; the I/O layer must stop reading while wants_records() is false"
    )]
    ReplayQueueOverflow { records: usize, bytes: usize },
    #[error(
        "replayed({seq}) is out of order: records up to {popped} were handed out and up to \
         {replayed} reported replayed"
    )]
    ReplayedOutOfOrder {
        seq: u64,
        popped: u64,
        replayed: u64,
    },
}
