//! Every limit of the stack, in one place. Units are last in the names.
//!
//! These are part of the replicated state machine's definition: primary and backup must be built
//! with the same values, or their outputs diverge.

/// Largest Ethernet frame accepted: 14-byte header + 1500-byte MTU + 4 bytes of margin (a frame
/// check sequence some taps leave on). Larger frames are dropped and counted.
pub const MAX_FRAME_LEN: usize = 1518;
/// Smallest MTU a [`crate::NicConfig`] may ask for (it is clamped up to this).
pub const MIN_MTU: u16 = 576;
/// Largest MTU a [`crate::NicConfig`] may ask for (it is clamped down to this).
pub const MAX_MTU: u16 = 1500;

/// Most TCP sockets alive at once: half-open, waiting in accept queues, accepted, and closing.
pub const MAX_SOCKETS: usize = 512;
/// Most listeners at once.
pub const MAX_LISTENERS: usize = 64;
/// Largest backlog a listener gets; half-open plus not-yet-accepted connections count against it.
pub const MAX_BACKLOG: u32 = 128;

/// Bytes a socket buffers for sending (written by the guest, not yet acknowledged by the peer).
pub const SEND_BUF_BYTES: usize = 256 * 1024;
/// Bytes a socket buffers for receiving (in order, not yet read by the guest).
pub const RECV_BUF_BYTES: usize = 256 * 1024;
/// Out-of-order segments kept per socket; more are dropped (the peer retransmits them).
pub const MAX_OOO_SEGMENTS: usize = 64;
/// Window scale shift we advertise (RFC 7323): `RECV_BUF_BYTES >> 3` fits in 16 bits.
pub const WINDOW_SHIFT: u8 = 3;

/// Frames waiting in the outbox; further frames are dropped and counted (TCP recovers).
pub const MAX_OUTBOX_FRAMES: usize = 4096;
/// Entries in the neighbor (IP to MAC) table; the least recently seen is evicted.
pub const MAX_NEIGHBORS: usize = 256;
/// Minimum interval between two ARP requests for the same address.
pub const ARP_REQUEST_INTERVAL_NS: u64 = 1_000_000_000;
/// Gratuitous ARP requests queued by [`crate::NetStack::announce`].
pub const GRATUITOUS_ARP_COUNT: usize = 3;
/// Gratuitous ARP requests [`crate::NetStack::announce`] sends again later, one at a time: a
/// frame of the old location that a switch sees after the first ones (still queued on the failed
/// host's side when it died) would otherwise leave the switch pointing there.
pub const ANNOUNCE_REPEATS: u8 = 5;
/// The gap before the first repeat; each later gap is twice the one before (0.1, 0.3, 0.7, 1.5
/// and 3.1 s after the announcement).
pub const ANNOUNCE_REPEAT_FIRST_NS: u64 = 100_000_000;

/// MSS assumed when the peer's SYN has no MSS option (RFC 9293).
pub const DEFAULT_PEER_MSS: u16 = 536;
/// Smallest peer MSS we honor; smaller values are raised to this to bound the frame count.
pub const MIN_PEER_MSS: u16 = 64;
/// Initial congestion window in segments (RFC 6928).
pub const INITIAL_CWND_SEGMENTS: u32 = 10;

/// Initial retransmission timeout, before any RTT sample (RFC 6298).
pub const RTO_INITIAL_NS: u64 = 1_000_000_000;
/// Lower bound of the retransmission timeout.
pub const RTO_MIN_NS: u64 = 200_000_000;
/// Upper bound of the retransmission timeout, backoff included.
pub const RTO_MAX_NS: u64 = 60_000_000_000;
/// Clock granularity `G` of RFC 6298.
pub const RTO_CLOCK_GRANULARITY_NS: u64 = 1_000_000;
/// Retransmissions (or unanswered zero-window probes) of one segment before the connection is
/// reset and reported as timed out.
pub const MAX_RETRIES: u32 = 8;
/// SYN-ACK retransmissions before a half-open connection is dropped.
pub const MAX_SYNACK_RETRIES: u32 = 4;

/// How long a connection stays in TIME-WAIT. Short, because we are the server and a new SYN
/// with a higher sequence number may reuse the 4-tuple anyway.
pub const TIME_WAIT_NS: u64 = 2_000_000_000;
/// How long a socket the guest has closed waits in FIN-WAIT-2 for the peer's FIN.
pub const FIN_WAIT_2_TIMEOUT_NS: u64 = 30_000_000_000;

/// Challenge ACKs (RFC 5961) one connection sends per second at most; an RST or SYN storm with
/// in-window sequence numbers then costs at most this many replies.
pub const MAX_CHALLENGE_ACKS_PER_SEC: u32 = 10;
