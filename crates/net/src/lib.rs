//! `ftvm-net`: a sans-I/O, deterministic, fully serializable TCP/IPv4 stack for one VM NIC.
//!
//! # Bird's-eye view
//!
//! The stack is part of the replicated VM state. The primary and the backup each run one
//! [`NetStack`], feed it the same frames and the same socket calls at the same virtual times, and
//! get byte-identical outputs. After a failover the backup's stack holds the same connections, so
//! real clients keep their TCP sessions; the new primary calls [`NetStack::announce`] and
//! [`NetStack::retransmit_all`] to go live.
//!
//! It does no I/O, reads no clock and uses no randomness except a seeded SplitMix64 kept in its
//! state (initial sequence numbers, IP identification). Time comes in as `now_ns`: virtual,
//! monotonic nanoseconds (a smaller value than one seen before is treated as the latest one).
//!
//! # Code map
//!
//! - `wire`: parse and emit Ethernet II, ARP, IPv4, ICMP echo, TCP (checksums checked both ways).
//! - `tcp`: one connection's control block and state machine (RFC 9293, 6298, 5681/6582, 7323).
//! - `stack`: [`NetStack`]: dispatch, ARP/neighbor table, ICMP echo, listeners, the socket API.
//! - `limits`: every bound, as named constants (re-exported at the crate root).
//! - `rng`: the seeded PRNG.
//! - `bytes_serde`: socket buffers serialize as byte strings (fast `save`/`state_hash`).
//! - `tests/`: hand-made segments (`unit`), smoltcp as an independent client over a seeded lossy
//!   link with lockstep replicas, snapshots and failover (`sim`), seeded fuzzing (`fuzz`).
//!   `fuzz/` holds the cargo-fuzz target (`cargo +nightly fuzz run frames`, not in CI).
//!
//! # API
//!
//! ```text
//! NetStack::new(cfg: NicConfig, seed: u64) -> NetStack
//! listen(&mut self, port: u16, backlog: u32) -> Result<ListenerId, NetError>
//! accept(&mut self, l: ListenerId) -> Result<SocketId, NetError>            // WouldBlock if none
//! recv(&mut self, s: SocketId, buf: &mut [u8], peek: bool) -> Result<usize, NetError> // Ok(0) = EOF
//! send(&mut self, s: SocketId, data: &[u8], now_ns: u64) -> Result<usize, NetError>  // partial writes
//! shutdown(&mut self, s: SocketId, read: bool, write: bool, now_ns: u64) -> Result<(), NetError>
//! close(&mut self, s: SocketId, now_ns: u64)
//! close_listener(&mut self, l: ListenerId)
//! readiness(&self, s: SocketId) -> Readiness
//! listener_ready(&self, l: ListenerId) -> bool
//! peer_addr(&self, s: SocketId) -> Option<([u8; 4], u16)>
//! receive_frame(&mut self, frame: &[u8], now_ns: u64)                       // never panics
//! poll(&mut self, now_ns: u64)                                              // run due timers
//! drain_frames(&mut self) -> std::vec::Drain<'_, Vec<u8>>                   // frames to send, in order
//! next_deadline_ns(&self) -> Option<u64>
//! announce(&mut self)                                                       // 3 gratuitous ARPs
//! retransmit_all(&mut self, now_ns: u64)
//! save(&self) -> Vec<u8>;  NetStack::restore(&[u8]) -> Result<NetStack, NetError>
//! state_hash(&self) -> [u8; 32]                                             // BLAKE3 of save()
//! stats(&self) -> Stats
//! config(&self) -> &NicConfig;  pending_frames(&self) -> usize;  check_invariants(&self)
//! ```
//!
//! # How the caller drives it
//!
//! - Every frame from the wire goes to [`NetStack::receive_frame`]. After *any* call that takes
//!   `&mut self` frames may be waiting (`recv` can queue a window update, `send` data, `close` a
//!   FIN or RST, `poll` retransmissions, `receive_frame` ACKs, ARP and ICMP replies): take them
//!   with [`NetStack::drain_frames`] and transmit them in order. On the primary they are outputs
//!   under the Output Rule; on the backup they are produced identically and discarded.
//! - Call [`NetStack::poll`] whenever virtual time reaches [`NetStack::next_deadline_ns`]. Calling
//!   it more often is harmless; calling it late only delays retransmissions. The deadline can
//!   change after any call, so read it again after each one.
//! - `recv` has no `now_ns`: it uses the latest time the stack has seen. The window update it may
//!   send is timed by that.
//! - Frames queue in an outbox of at most [`MAX_OUTBOX_FRAMES`]; beyond that they are dropped
//!   (counted in [`Stats::drop_outbox_full`]) and TCP recovers. Drain often.
//! - After failover: `announce()`, then `retransmit_all(now)`, then drain and send.
//! - A socket that ended (reset, timed out, or closed by both sides) stays allocated until the
//!   guest calls `close`; only then is it freed. Sockets never accepted are freed by the stack.
//! - [`NetStack::state_hash`] serializes the whole state: cost is linear in buffered bytes
//!   (worst case [`MAX_SOCKETS`] x ([`SEND_BUF_BYTES`] + [`RECV_BUF_BYTES`])).
//!
//! # Architecture invariants
//!
//! - Same inputs, same outputs: no `HashMap`, no clocks, no global state, no threads. All
//!   containers are ordered (`BTreeMap`, `Vec`, `VecDeque`).
//! - Every table and buffer is bounded by a constant in `limits`; malformed input is counted and
//!   dropped, never a panic. Assertions (kept in release) guard internal invariants only.
//! - The state is plain data (`Serialize + Deserialize + Clone + PartialEq`): a stack restored
//!   from [`NetStack::save`] in the middle of a transfer continues it.
//!
//! # API boundary: what is deliberately absent
//!
//! Active open (`connect`), UDP, IPv6, IP options, fragment reassembly, SACK, TCP timestamps,
//! urgent data (treated as ordinary data), keep-alives, and ICMP errors (unreachable ports get
//! a TCP RST; other protocols are silently dropped). ISNs come from the seeded PRNG, not from a
//! secret hash (RFC 6528): anyone knowing the seed can predict them. Frames to an unknown next
//! hop are dropped after an ARP request goes out (TCP retransmits); there is no ARP wait queue.

mod bytes_serde;
mod limits;
mod rng;
mod stack;
mod tcp;
pub mod wire;

#[cfg(test)]
mod tests;

pub use limits::*;
pub use stack::{ListenerId, NetStack, NicConfig, SocketId, Stats, STATE_FORMAT_VERSION};
pub use tcp::{SocketError, TcpState};

/// Errors of the socket API. Each names what failed and what to do about it.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum NetError {
    /// Nothing to accept or read, or no buffer space to write: wait for readiness and retry.
    #[error("the operation would block: no connection, data or buffer space is ready; wait for readiness and retry")]
    WouldBlock,
    /// The socket id is unknown, was never accepted, or was already closed.
    #[error(
        "socket {0} is not an open socket of this netstack (never accepted, or already closed)"
    )]
    InvalidSocket(u32),
    /// The listener id is unknown or closed.
    #[error("listener {0} is not an open listener of this netstack")]
    InvalidListener(u32),
    /// Another listener has the port.
    #[error("port {port} already has a listener; close it first or choose another port")]
    AddrInUse {
        /// The port asked for.
        port: u16,
    },
    /// [`MAX_LISTENERS`] reached.
    #[error("too many listeners (the limit is {limit}); close one first")]
    TooManyListeners {
        /// The limit.
        limit: usize,
    },
    /// An argument is out of range.
    #[error("invalid argument: {what}")]
    InvalidArgument {
        /// What was wrong.
        what: &'static str,
    },
    /// Writing after shutdown(write) or close of the sending side.
    #[error("the sending side of this connection is shut down; no more data can be sent")]
    BrokenPipe,
    /// The peer reset the connection.
    #[error("the peer reset the connection; close the socket")]
    ConnReset,
    /// The peer stopped answering: the retransmission limit was reached.
    #[error(
        "the peer stopped acknowledging data (retransmission limit reached); close the socket"
    )]
    TimedOut,
    /// The connection is no longer connected.
    #[error("the connection is closed; close the socket")]
    NotConnected,
    /// `restore` was given bytes that are not a saved netstack.
    #[error("the saved netstack state could not be decoded ({0}); it must come from NetStack::save of the same build")]
    Decode(String),
    /// `restore` was given a state of another layout version.
    #[error("the saved netstack state has layout version {found}, this build reads version {expected}; run the same build on both replicas")]
    Version {
        /// Version in the bytes.
        found: u32,
        /// Version this build reads.
        expected: u32,
    },
}

/// Poll readiness of one socket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Readiness {
    /// `recv` would not block: data, end of stream, or an error to report.
    pub readable: bool,
    /// `send` would not block: buffer space, or an error to report.
    pub writable: bool,
    /// The connection is over in at least the receiving direction and ours is shut, or it ended.
    pub hangup: bool,
    /// It ended abnormally (reset or timed out).
    pub error: bool,
}
