//! One TCP connection (passive side only): the transmission control block and its state machine.
//!
//! Follows RFC 9293 for the state machine, RFC 6298 for the retransmission timer, RFC 5681 and
//! RFC 6582 (NewReno) for congestion control, RFC 7323 for window scaling (no timestamps), RFC 2018
//! SACK as a data receiver (the blocks tell the peer which segments after a hole arrived, so it
//! can repair several losses per round trip even when our ACKs carry data), and the in-window
//! checks of RFC 5961 for RST and SYN. A [`Tcb`] does no I/O: every method that may send
//! pushes [`OutSeg`]s into an [`Out`] that the stack turns into frames.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::limits::*;
use crate::wire::tcp_flags::{ACK, FIN, PSH, RST, SYN};
use crate::wire::{SackBlocks, TcpSegment};
use crate::NetError;

/// `a < b` in sequence space.
pub(crate) fn seq_lt(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}
/// `a <= b` in sequence space.
pub(crate) fn seq_le(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) <= 0
}
/// `a > b` in sequence space.
pub(crate) fn seq_gt(a: u32, b: u32) -> bool {
    seq_lt(b, a)
}
/// `a >= b` in sequence space.
pub(crate) fn seq_ge(a: u32, b: u32) -> bool {
    seq_le(b, a)
}

/// Congestion window cap: more than the send buffer can ever fill is pointless.
const MAX_CWND_BYTES: u32 = 2 * SEND_BUF_BYTES as u32;

/// RFC 9293 connection states (the active-open states do not exist: we are only a server).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpState {
    /// SYN received, SYN-ACK sent, waiting for the final ACK.
    SynReceived,
    /// Data flows both ways.
    Established,
    /// The peer has sent FIN; we may still send.
    CloseWait,
    /// We have sent FIN; waiting for its ACK (and the peer's FIN).
    FinWait1,
    /// Our FIN is acknowledged; waiting for the peer's FIN.
    FinWait2,
    /// Both sides sent FIN at once; waiting for the ACK of ours.
    Closing,
    /// The peer closed first, then we sent FIN; waiting for its ACK.
    LastAck,
    /// Both FINs are acknowledged; absorbing stray segments for a while.
    TimeWait,
    /// Nothing left: closed normally, reset, or timed out.
    Closed,
}

/// Why a connection ended abnormally.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SocketError {
    /// The peer sent an acceptable RST.
    Reset,
    /// The retransmission limit was reached: the peer vanished.
    TimedOut,
}

impl From<SocketError> for NetError {
    fn from(e: SocketError) -> Self {
        match e {
            SocketError::Reset => NetError::ConnReset,
            SocketError::TimedOut => NetError::TimedOut,
        }
    }
}

/// One segment to emit, addressed by the stack from the connection's 4-tuple.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct OutSeg {
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    pub mss: Option<u16>,
    pub wscale: Option<u8>,
    pub sack_permitted: bool,
    pub sack: SackBlocks,
    pub payload: Vec<u8>,
    pub retransmit: bool,
}

/// What a [`Tcb`] call produced besides state changes: segments and counters for [`crate::Stats`].
#[derive(Default, Debug)]
pub(crate) struct Out {
    pub segs: Vec<OutSeg>,
    pub fast_retransmits: u64,
    pub rto_fired: u64,
    pub zero_window_probes: u64,
    pub ooo_dropped: u64,
    pub resets_received: u64,
    pub timed_out: u64,
    pub challenge_acks: u64,
}

/// An out-of-order segment waiting for the hole before it to fill.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
struct OooSeg {
    seq: u32,
    #[serde(with = "crate::bytes_serde::vec")]
    data: Vec<u8>,
}

/// Transmission control block of one connection. Plain data: cloning or serializing it mid-flight
/// and continuing from the copy is exactly as good as continuing from the original.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub(crate) struct Tcb {
    pub state: TcpState,
    pub local_port: u16,
    pub remote_ip: [u8; 4],
    pub remote_port: u16,
    /// The listener whose queues hold this connection until it is accepted.
    pub listener: u32,
    /// Handed to the guest by `accept`.
    pub accepted: bool,
    /// The guest closed it; the stack frees it once the close completes.
    pub orphan: bool,
    /// Set when the connection became established; the stack moves it to the accept queue.
    pub just_established: bool,
    pub error: Option<SocketError>,
    pub rd_shut: bool,

    our_mss: u16,
    send_mss: u16,
    wscale_ok: bool,
    /// The peer offered SACK (RFC 2018): our ACKs carry SACK blocks for out-of-order data.
    sack_ok: bool,
    /// Start of the out-of-order range that most recently grew: reported first.
    sack_recent: Option<u32>,
    snd_shift: u8,
    rcv_shift: u8,

    iss: u32,
    irs: u32,
    snd_una: u32,
    snd_nxt: u32,
    /// Highest sequence number sent plus one (`snd_nxt` goes back below it after a timeout).
    snd_max: u32,
    snd_wnd: u32,
    max_snd_wnd: u32,
    snd_wl1: u32,
    snd_wl2: u32,
    /// Bytes from `snd_una` on: sent-unacknowledged, then unsent.
    #[serde(with = "crate::bytes_serde::deque")]
    send_buf: VecDeque<u8>,
    /// The guest shut down writing: a FIN follows the last byte of `send_buf`.
    fin_queued: bool,
    fin_acked: bool,

    rcv_nxt: u32,
    /// Right edge of the window we last advertised (never moves left).
    rcv_adv: u32,
    #[serde(with = "crate::bytes_serde::deque")]
    recv_buf: VecDeque<u8>,
    ooo: Vec<OooSeg>,
    ooo_fin: Option<u32>,
    fin_received: bool,

    cwnd: u32,
    ssthresh: u32,
    dup_acks: u32,
    in_recovery: bool,
    /// RFC 6582 `recover`, as "highest sequence sent plus one"; `None` once passed.
    recover: Option<u32>,

    srtt_ns: u64,
    rttvar_ns: u64,
    has_rtt: bool,
    rto_ns: u64,
    backoff: u32,
    /// One timed segment (Karn's algorithm): (sequence that acknowledges it, time sent).
    rtt_sample: Option<(u32, u64)>,
    retries: u32,
    /// Retransmission timer, also the persist timer while the peer's window is zero.
    rtx_deadline: Option<u64>,
    /// TIME-WAIT end, or FIN-WAIT-2 give-up time for a closed socket.
    linger_deadline: Option<u64>,
    ack_pending: bool,
    /// The owed ACK (`ack_pending`) is for in-order data only and may wait for the end of the
    /// VM's turn ([`Tcb::flush_deferred_ack`]), so that the guest's reply carries it.
    ack_deferred: bool,
    /// Deferring ACKs is allowed on this connection (the stack's setting when it was created).
    defer_acks: bool,
    /// `rcv_nxt` as carried by the last segment we sent: what the peer knows we have.
    rcv_acked: u32,
    /// Challenge ACK rate limit: start of the current one-second window and ACKs sent in it.
    challenge_window_ns: u64,
    challenge_count: u32,
}

fn copy_range(buf: &VecDeque<u8>, off: usize, len: usize) -> Vec<u8> {
    let (a, b) = buf.as_slices();
    let mut v = Vec::with_capacity(len);
    if off < a.len() {
        let end = (off + len).min(a.len());
        v.extend_from_slice(&a[off..end]);
        let rest = len - (end - off);
        v.extend_from_slice(&b[..rest]);
    } else {
        let o = off - a.len();
        v.extend_from_slice(&b[o..o + len]);
    }
    v
}

impl Tcb {
    /// Creates a connection from a listener's SYN and queues the SYN-ACK.
    pub fn new_passive(
        syn: &TcpSegment<'_>,
        remote_ip: [u8; 4],
        listener: u32,
        iss: u32,
        our_mss: u16,
        now: u64,
        out: &mut Out,
    ) -> Tcb {
        let wscale_ok = syn.wscale.is_some();
        let (snd_shift, rcv_shift) = match syn.wscale {
            Some(ws) => (ws.min(14), WINDOW_SHIFT),
            None => (0, 0),
        };
        let send_mss = syn
            .mss
            .unwrap_or(DEFAULT_PEER_MSS)
            .clamp(MIN_PEER_MSS, our_mss);
        let rcv_nxt = syn.seq.wrapping_add(1);
        let mut t = Tcb {
            state: TcpState::SynReceived,
            local_port: syn.dst_port,
            remote_ip,
            remote_port: syn.src_port,
            listener,
            accepted: false,
            orphan: false,
            just_established: false,
            error: None,
            rd_shut: false,
            our_mss,
            send_mss,
            wscale_ok,
            sack_ok: syn.sack_permitted,
            sack_recent: None,
            snd_shift,
            rcv_shift,
            iss,
            irs: syn.seq,
            snd_una: iss,
            snd_nxt: iss.wrapping_add(1),
            snd_max: iss.wrapping_add(1),
            // The window in a SYN is never scaled (RFC 7323 2.2).
            snd_wnd: u32::from(syn.window),
            max_snd_wnd: u32::from(syn.window),
            snd_wl1: syn.seq,
            snd_wl2: iss,
            send_buf: VecDeque::new(),
            fin_queued: false,
            fin_acked: false,
            rcv_nxt,
            rcv_adv: rcv_nxt,
            recv_buf: VecDeque::new(),
            ooo: Vec::new(),
            ooo_fin: None,
            fin_received: false,
            cwnd: INITIAL_CWND_SEGMENTS * u32::from(send_mss),
            ssthresh: u32::MAX / 2,
            dup_acks: 0,
            in_recovery: false,
            recover: None,
            srtt_ns: 0,
            rttvar_ns: 0,
            has_rtt: false,
            rto_ns: RTO_INITIAL_NS,
            backoff: 0,
            rtt_sample: Some((iss.wrapping_add(1), now)),
            retries: 0,
            rtx_deadline: Some(now.saturating_add(RTO_INITIAL_NS)),
            linger_deadline: None,
            ack_pending: false,
            ack_deferred: false,
            defer_acks: false,
            rcv_acked: rcv_nxt,
            challenge_window_ns: now,
            challenge_count: 0,
        };
        t.send_syn_ack(false, out);
        t
    }

    // -----------------------------------------------------------------------------------------
    // Small helpers
    // -----------------------------------------------------------------------------------------

    fn recv_free(&self) -> u32 {
        (RECV_BUF_BYTES - self.recv_buf.len()) as u32
    }

    fn current_rto(&self) -> u64 {
        self.rto_ns
            .saturating_mul(1u64 << self.backoff.min(30))
            .min(RTO_MAX_NS)
    }

    fn mss32(&self) -> u32 {
        u32::from(self.send_mss)
    }

    /// Remaining advertised window (from `rcv_nxt` to the advertised right edge).
    fn adv_remaining(&self) -> u32 {
        if seq_ge(self.rcv_adv, self.rcv_nxt) {
            self.rcv_adv.wrapping_sub(self.rcv_nxt)
        } else {
            0
        }
    }

    /// The window field for a non-SYN segment, with receiver silly-window avoidance
    /// (RFC 9293 3.8.6.2.2): the right edge moves only by at least min(buffer/2, MSS).
    fn window_field(&mut self) -> u16 {
        let free = self.recv_free().min(65535 << self.rcv_shift);
        let remaining = self.adv_remaining().min(free);
        let threshold = ((RECV_BUF_BYTES / 2) as u32).min(u32::from(self.our_mss));
        let wnd = if free >= remaining.saturating_add(threshold) {
            free
        } else {
            remaining
        };
        let field = (wnd >> self.rcv_shift).min(65535);
        let edge = self.rcv_nxt.wrapping_add(field << self.rcv_shift);
        if seq_gt(edge, self.rcv_adv) {
            self.rcv_adv = edge;
        }
        field as u16
    }

    fn send_syn_ack(&mut self, retransmit: bool, out: &mut Out) {
        let window = self.recv_free().min(65535);
        let edge = self.rcv_nxt.wrapping_add(window);
        if seq_gt(edge, self.rcv_adv) {
            self.rcv_adv = edge;
        }
        out.segs.push(OutSeg {
            seq: self.iss,
            ack: self.rcv_nxt,
            flags: SYN | ACK,
            window: window as u16,
            mss: Some(self.our_mss),
            wscale: if self.wscale_ok {
                Some(WINDOW_SHIFT)
            } else {
                None
            },
            sack_permitted: self.sack_ok,
            sack: SackBlocks::default(),
            payload: Vec::new(),
            retransmit,
        });
    }

    /// SACK blocks for the out-of-order ranges held: the one that grew last first, then the
    /// others from the lowest (RFC 2018 4).
    fn sack_blocks(&self) -> SackBlocks {
        let mut blocks = SackBlocks::default();
        if !self.sack_ok {
            return blocks;
        }
        let range = |s: &OooSeg| (s.seq, s.seq.wrapping_add(s.data.len() as u32));
        let recent = self.sack_recent.and_then(|r| {
            self.ooo
                .iter()
                .find(|s| seq_le(s.seq, r) && seq_gt(range(s).1, r))
        });
        if let Some(s) = recent {
            blocks.push(range(s).0, range(s).1);
        }
        for s in &self.ooo {
            if recent.is_some_and(|r| r.seq == s.seq) {
                continue;
            }
            if !blocks.push(range(s).0, range(s).1) {
                break;
            }
        }
        blocks
    }

    fn push_seg(&mut self, seq: u32, flags: u8, payload: Vec<u8>, retransmit: bool, out: &mut Out) {
        let window = self.window_field();
        let sack = self.sack_blocks();
        out.segs.push(OutSeg {
            seq,
            ack: self.rcv_nxt,
            flags: flags | ACK,
            window,
            mss: None,
            wscale: None,
            sack_permitted: false,
            sack,
            payload,
            retransmit,
        });
        self.ack_pending = false;
        self.ack_deferred = false;
        self.rcv_acked = self.rcv_nxt;
    }

    /// An ACK is owed and goes out with the next segment, at the latest at the end of this call.
    fn owe_ack(&mut self) {
        self.ack_pending = true;
        self.ack_deferred = false;
    }

    /// Whether the ACK for in-order data just accepted may wait for the end of the VM's turn:
    /// deferring is on, nothing is out of order (a gap must be reported at once, RFC 5681 4.2),
    /// no ACK owed for another reason is pending, and the peer has less than two full segments
    /// unacknowledged (RFC 1122 4.2.3.2: ACK at least every second full-sized segment).
    fn may_defer_ack(&self) -> bool {
        self.defer_acks
            && self.ooo.is_empty()
            && (!self.ack_pending || self.ack_deferred)
            && self.rcv_nxt.wrapping_sub(self.rcv_acked) < 2 * u32::from(self.our_mss)
    }

    /// Allows this connection to defer ACKs of in-order data (see [`Tcb::flush_deferred_ack`]).
    pub fn set_defer_acks(&mut self, on: bool) {
        self.defer_acks = on;
    }

    /// The end of the VM's turn: the ACK deferred for in-order data goes out now if no segment
    /// carried it meanwhile.
    pub fn flush_deferred_ack(&mut self, out: &mut Out) -> bool {
        if self.ack_pending && self.ack_deferred {
            self.send_pure_ack(out);
            return true;
        }
        false
    }

    /// An ACK is deferred to the end of the turn.
    pub fn has_deferred_ack(&self) -> bool {
        self.ack_pending && self.ack_deferred
    }

    fn send_pure_ack(&mut self, out: &mut Out) {
        self.push_seg(self.snd_nxt, 0, Vec::new(), false, out);
    }

    fn push_rst(&self, seq: u32, out: &mut Out) {
        out.segs.push(OutSeg {
            seq,
            ack: self.rcv_nxt,
            flags: RST | ACK,
            window: 0,
            mss: None,
            wscale: None,
            payload: Vec::new(),
            retransmit: false,
            ..Default::default()
        });
    }

    /// Emits the segment starting at `seq` with at most `max_len` data bytes (and the FIN if it
    /// follows them and `allow_fin`). Returns the sequence space it occupies (0: nothing to send).
    fn emit_at(
        &mut self,
        seq: u32,
        max_len: usize,
        allow_fin: bool,
        retransmit: bool,
        out: &mut Out,
    ) -> u32 {
        let off = seq.wrapping_sub(self.snd_una) as usize;
        let buf_len = self.send_buf.len();
        if off > buf_len {
            return 0;
        }
        // The MSS bounds data plus options (RFC 6691): SACK blocks take room from the data.
        let room = usize::from(self.send_mss)
            .saturating_sub(self.sack_blocks().option_bytes())
            .max(1);
        let len = max_len.min(buf_len - off).min(room);
        let fin = allow_fin && self.fin_queued && !self.fin_acked && off + len == buf_len;
        if len == 0 && !fin {
            return 0;
        }
        let payload = copy_range(&self.send_buf, off, len);
        let mut flags = 0;
        if len > 0 && off + len == buf_len {
            flags |= PSH;
        }
        if fin {
            flags |= FIN;
        }
        self.push_seg(seq, flags, payload, retransmit, out);
        len as u32 + u32::from(fin)
    }

    fn unsent_bytes(&self) -> usize {
        let off = self.snd_nxt.wrapping_sub(self.snd_una) as usize;
        self.send_buf.len().saturating_sub(off)
    }

    fn arm_rtx(&mut self, now: u64) {
        let outstanding = self.snd_max != self.snd_una;
        let persist = self.snd_wnd == 0 && self.unsent_bytes() > 0;
        if outstanding || persist {
            if self.rtx_deadline.is_none() {
                self.rtx_deadline = Some(now.saturating_add(self.current_rto()));
            }
        } else {
            self.rtx_deadline = None;
        }
    }

    fn rtt_update(&mut self, r: u64) {
        // A sample beyond the RTO ceiling carries no information and could overflow the sums.
        let r = r.min(RTO_MAX_NS);
        if self.has_rtt {
            let diff = self.srtt_ns.abs_diff(r);
            self.rttvar_ns = (3 * self.rttvar_ns + diff) / 4;
            self.srtt_ns = (7 * self.srtt_ns + r) / 8;
        } else {
            self.srtt_ns = r;
            self.rttvar_ns = r / 2;
            self.has_rtt = true;
        }
        let var = RTO_CLOCK_GRANULARITY_NS.max(4 * self.rttvar_ns);
        self.rto_ns = (self.srtt_ns + var).clamp(RTO_MIN_NS, RTO_MAX_NS);
    }

    fn enter_time_wait(&mut self, now: u64) {
        self.state = TcpState::TimeWait;
        self.snd_una = self.snd_max;
        self.snd_nxt = self.snd_max;
        self.rtx_deadline = None;
        self.linger_deadline = Some(now.saturating_add(TIME_WAIT_NS));
        self.send_buf = VecDeque::new();
        self.ooo.clear();
    }

    fn close_down(&mut self) {
        self.state = TcpState::Closed;
        self.snd_una = self.snd_max;
        self.snd_nxt = self.snd_max;
        self.rtx_deadline = None;
        self.linger_deadline = None;
        self.send_buf = VecDeque::new();
        self.ooo.clear();
        self.ack_pending = false;
    }

    /// Sends RST and closes: used for close-with-unread-data, retransmission timeout, and listener
    /// teardown.
    pub fn abort(&mut self, out: &mut Out) {
        if !matches!(self.state, TcpState::Closed | TcpState::TimeWait) {
            self.push_rst(self.snd_max, out);
        }
        self.close_down();
        self.recv_buf = VecDeque::new();
    }

    fn reset_by_peer(&mut self, out: &mut Out) {
        out.resets_received += 1;
        self.error = Some(SocketError::Reset);
        self.close_down();
        self.recv_buf = VecDeque::new();
    }

    /// Sends a challenge ACK (RFC 5961 3.2, 4.2) unless this second's budget is spent.
    fn challenge_ack(&mut self, now: u64, out: &mut Out) {
        if now.saturating_sub(self.challenge_window_ns) >= 1_000_000_000 {
            self.challenge_window_ns = now;
            self.challenge_count = 0;
        }
        if self.challenge_count >= MAX_CHALLENGE_ACKS_PER_SEC {
            return;
        }
        self.challenge_count += 1;
        out.challenge_acks += 1;
        self.owe_ack();
        self.output(now, out);
    }

    /// Closes without sending anything: the 4-tuple is being reused by a new connection while
    /// this one sat in TIME-WAIT.
    pub fn retire(&mut self) {
        self.close_down();
    }

    // -----------------------------------------------------------------------------------------
    // Incoming segments
    // -----------------------------------------------------------------------------------------

    fn seq_acceptable(&self, seg: &TcpSegment<'_>) -> bool {
        let len = seg.seq_len();
        let wnd = self.recv_free();
        let in_wnd = |x: u32| seq_le(self.rcv_nxt, x) && seq_lt(x, self.rcv_nxt.wrapping_add(wnd));
        match (len, wnd) {
            // Like Linux, and unlike the letter of RFC 9293, a bare ACK exactly at the right edge
            // is taken: a peer that filled our window sends its ACKs with that sequence number.
            (0, _) => {
                seq_le(self.rcv_nxt, seg.seq) && seq_le(seg.seq, self.rcv_nxt.wrapping_add(wnd))
            }
            // A bare FIN at RCV.NXT is taken even with a full buffer: it needs no buffer space.
            (_, 0) => seg.payload.is_empty() && seg.has(FIN) && seg.seq == self.rcv_nxt,
            (_, _) => in_wnd(seg.seq) || in_wnd(seg.seq.wrapping_add(len - 1)),
        }
    }

    /// Processes one segment of this connection.
    pub fn on_segment(&mut self, seg: &TcpSegment<'_>, now: u64, out: &mut Out) {
        match self.state {
            TcpState::Closed => return,
            TcpState::TimeWait => {
                // RFC 1337: RSTs in TIME-WAIT are ignored. Anything else (a retransmitted FIN)
                // is acknowledged again.
                if !seg.has(RST) && (seg.seq_len() > 0) {
                    if seg.has(FIN) {
                        self.linger_deadline = Some(now.saturating_add(TIME_WAIT_NS));
                    }
                    self.send_pure_ack(out);
                }
                return;
            }
            TcpState::SynReceived if seg.has(SYN) && !seg.has(ACK) && !seg.has(RST) => {
                // The peer did not get our SYN-ACK and retransmitted its SYN.
                if seg.seq == self.irs {
                    self.send_syn_ack(true, out);
                }
                return;
            }
            _ => {}
        }

        if !self.seq_acceptable(seg) {
            if seg.has(RST) {
                return;
            }
            // RFC 9293 3.10.7.4: with a zero window, still take the ACK of a segment at RCV.NXT.
            if self.recv_free() == 0
                && seg.seq == self.rcv_nxt
                && seg.has(ACK)
                && self.state != TcpState::SynReceived
            {
                self.process_ack(seg, now, out);
                if self.state == TcpState::Closed {
                    return;
                }
            }
            self.owe_ack();
            self.output(now, out);
            return;
        }

        if seg.has(RST) {
            // RFC 5961 3.2: only an exact match resets; in-window gets a challenge ACK.
            if seg.seq == self.rcv_nxt {
                self.reset_by_peer(out);
            } else {
                self.challenge_ack(now, out);
            }
            return;
        }
        if seg.has(SYN) {
            // RFC 5961 4.2: a SYN on a synchronized connection gets a challenge ACK.
            self.challenge_ack(now, out);
            return;
        }
        if !seg.has(ACK) {
            return;
        }

        if self.state == TcpState::SynReceived {
            if seg.ack != self.snd_nxt {
                // Not an acknowledgment of our SYN-ACK: <SEQ=SEG.ACK><CTL=RST>.
                out.segs.push(OutSeg {
                    seq: seg.ack,
                    ack: 0,
                    flags: RST,
                    window: 0,
                    mss: None,
                    wscale: None,
                    payload: Vec::new(),
                    retransmit: false,
                    ..Default::default()
                });
                return;
            }
            self.state = TcpState::Established;
            self.just_established = true;
            self.snd_una = seg.ack;
            self.snd_wnd = u32::from(seg.window) << self.snd_shift;
            self.max_snd_wnd = self.snd_wnd;
            self.snd_wl1 = seg.seq;
            self.snd_wl2 = seg.ack;
            if let Some((s, t)) = self.rtt_sample.take() {
                if seq_ge(seg.ack, s) {
                    self.rtt_update(now.saturating_sub(t));
                }
            }
            self.retries = 0;
            self.backoff = 0;
            self.rtx_deadline = None;
        }

        if !self.process_ack(seg, now, out) {
            self.output(now, out);
            return;
        }
        if self.state == TcpState::Closed {
            return;
        }

        if !seg.payload.is_empty() {
            match self.state {
                TcpState::Established | TcpState::FinWait1 | TcpState::FinWait2 => {
                    if self.orphan {
                        // Data for a socket the guest has closed cannot be delivered (RFC 9293
                        // 3.10.7.4, "data after close"): reset.
                        self.abort(out);
                        return;
                    }
                    let before = self.rcv_nxt;
                    let filled_gap = !self.ooo.is_empty();
                    self.accept_data(seg.seq, seg.payload, now, out);
                    // Deferrable: this segment was the next in order and moved RCV.NXT, did not
                    // fill a gap, and carries no FIN (those are acknowledged at once).
                    let deferrable =
                        seg.seq == before && self.rcv_nxt != before && !filled_gap && !seg.has(FIN);
                    if deferrable && self.may_defer_ack() {
                        self.ack_pending = true;
                        self.ack_deferred = true;
                    } else {
                        self.owe_ack();
                    }
                }
                // The peer already sent FIN: later data is a protocol error, ignore it.
                _ => {}
            }
        }
        if seg.has(FIN) {
            let fin_seq = seg.seq.wrapping_add(seg.payload.len() as u32);
            if matches!(
                self.state,
                TcpState::Established | TcpState::FinWait1 | TcpState::FinWait2
            ) {
                if fin_seq == self.rcv_nxt {
                    self.process_fin(now);
                } else if seq_gt(fin_seq, self.rcv_nxt)
                    && fin_seq.wrapping_sub(self.rcv_nxt) <= self.recv_free()
                {
                    self.ooo_fin = Some(fin_seq);
                }
            }
            self.owe_ack();
        }
        self.output(now, out);
    }

    /// The ACK part of segment processing. Returns false if the segment must be dropped.
    fn process_ack(&mut self, seg: &TcpSegment<'_>, now: u64, out: &mut Out) -> bool {
        let ack = seg.ack;
        if seq_gt(ack, self.snd_max) {
            // Acknowledges something never sent: answer with an ACK and drop.
            self.owe_ack();
            return false;
        }
        if seq_lt(ack, self.snd_una) {
            return true; // old duplicate: ignore the ACK field
        }
        let old_wnd = self.snd_wnd;
        let seg_wnd = u32::from(seg.window) << self.snd_shift;
        if seq_lt(self.snd_wl1, seg.seq) || (self.snd_wl1 == seg.seq && seq_le(self.snd_wl2, ack)) {
            self.snd_wnd = seg_wnd;
            self.snd_wl1 = seg.seq;
            self.snd_wl2 = ack;
            self.max_snd_wnd = self.max_snd_wnd.max(seg_wnd);
        }
        if old_wnd == 0 && self.snd_wnd > 0 {
            // Window reopened: leave persist mode with a fresh timer, and resend from SND.UNA
            // whatever this ACK does not cover (probe bytes sent into the zero window).
            self.backoff = 0;
            self.rtx_deadline = None;
            if seq_lt(self.snd_una, ack) {
                // handled by on_new_ack below
            } else {
                self.snd_nxt = self.snd_una;
            }
        }

        if seq_gt(ack, self.snd_una) {
            self.on_new_ack(ack, now, out);
        } else {
            // ack == snd_una: duplicate ACK per RFC 5681 section 2?
            let outstanding = self.snd_max != self.snd_una;
            if self.snd_wnd == 0 && !self.orphan {
                // The peer answers our zero-window probes: it is alive.
                self.retries = 0;
            }
            // RFC 5681 wants the window unchanged too; we also count ACKs that only *grow* the
            // window, because a receiver whose application reads while a hole is open (smoltcp,
            // for one) sends its first duplicates with a larger window, and without SACK those
            // duplicates are our only fast loss signal. Not while the window is zero: those ACKs
            // answer zero-window probes, not losses.
            if outstanding
                && self.snd_wnd > 0
                && seg.payload.is_empty()
                && !seg.has(SYN | FIN)
                && seg_wnd >= old_wnd
            {
                self.dup_acks += 1;
                if self.dup_acks == 3
                    && !self.in_recovery
                    && self.recover.is_none_or(|r| seq_gt(ack, r))
                {
                    // Fast retransmit, then fast recovery (RFC 6582 3.2 step 2).
                    out.fast_retransmits += 1;
                    let flight = self.snd_max.wrapping_sub(self.snd_una);
                    self.ssthresh = (flight / 2).max(2 * self.mss32());
                    self.recover = Some(self.snd_max);
                    self.in_recovery = true;
                    self.retransmit_first(out);
                    self.cwnd = self.ssthresh + 3 * self.mss32();
                    self.rtx_deadline = Some(now.saturating_add(self.current_rto()));
                } else if self.dup_acks > 3 && self.in_recovery {
                    self.cwnd = (self.cwnd + self.mss32()).min(MAX_CWND_BYTES);
                }
            }
        }

        if self.fin_acked {
            match self.state {
                TcpState::FinWait1 => {
                    self.state = TcpState::FinWait2;
                    if self.orphan {
                        self.linger_deadline = Some(now.saturating_add(FIN_WAIT_2_TIMEOUT_NS));
                    }
                }
                TcpState::Closing => self.enter_time_wait(now),
                TcpState::LastAck => self.close_down(),
                _ => {}
            }
        }
        true
    }

    fn on_new_ack(&mut self, ack: u32, now: u64, out: &mut Out) {
        let acked = ack.wrapping_sub(self.snd_una);
        let fin_seq = self.snd_una.wrapping_add(self.send_buf.len() as u32);
        let data_acked = (acked as usize).min(self.send_buf.len());
        self.send_buf.drain(..data_acked);
        if self.fin_queued && !self.fin_acked && ack == fin_seq.wrapping_add(1) {
            self.fin_acked = true;
        }
        self.snd_una = ack;
        if seq_lt(self.snd_nxt, self.snd_una) {
            self.snd_nxt = self.snd_una;
        }
        if let Some((s, t)) = self.rtt_sample {
            if seq_ge(ack, s) {
                self.rtt_update(now.saturating_sub(t));
                self.rtt_sample = None;
            }
        }
        self.retries = 0;
        self.backoff = 0;
        let mss = self.mss32();
        if self.in_recovery {
            let recover = self.recover.unwrap_or(ack);
            if seq_ge(ack, recover) {
                // Full acknowledgment: leave fast recovery (RFC 6582 3.2 step 3).
                let flight = self.snd_max.wrapping_sub(self.snd_una);
                self.cwnd = self.ssthresh.min(flight.max(mss) + mss);
                self.in_recovery = false;
                self.recover = None;
                self.dup_acks = 0;
            } else {
                // Partial acknowledgment: retransmit the next hole, deflate (step 4).
                self.retransmit_first(out);
                self.cwnd = self.cwnd.saturating_sub(acked);
                if acked >= mss {
                    self.cwnd += mss;
                }
                self.cwnd = self.cwnd.max(mss);
            }
        } else {
            self.dup_acks = 0;
            if let Some(r) = self.recover {
                if seq_gt(ack, r) {
                    self.recover = None;
                }
            }
            if self.cwnd < self.ssthresh {
                // Appropriate byte counting with L = 2 SMSS (RFC 3465): delayed ACKs cover two
                // segments and must not halve the slow-start growth.
                self.cwnd += acked.min(2 * mss);
            } else {
                self.cwnd += (mss * mss / self.cwnd.max(1)).max(1);
            }
        }
        self.cwnd = self.cwnd.min(MAX_CWND_BYTES);
        self.rtx_deadline = if self.snd_max != self.snd_una {
            Some(now.saturating_add(self.current_rto()))
        } else {
            None
        };
    }

    /// Retransmits the first unacknowledged segment (fast retransmit, partial ACK).
    fn retransmit_first(&mut self, out: &mut Out) {
        let seq = self.snd_una;
        let consumed = self.emit_at(seq, usize::from(self.send_mss), true, true, out);
        let end = seq.wrapping_add(consumed);
        if seq_gt(end, self.snd_nxt) {
            self.snd_nxt = end;
        }
        if seq_gt(end, self.snd_max) {
            self.snd_max = end;
        }
        self.rtt_sample = None; // Karn: never time a retransmitted segment.
    }

    fn accept_data(&mut self, seq: u32, payload: &[u8], now: u64, out: &mut Out) {
        let (mut seq, mut data) = (seq, payload);
        if seq_lt(seq, self.rcv_nxt) {
            let behind = self.rcv_nxt.wrapping_sub(seq) as usize;
            if behind >= data.len() {
                return;
            }
            data = &data[behind..];
            seq = self.rcv_nxt;
        }
        let free = self.recv_free() as usize;
        let off = seq.wrapping_sub(self.rcv_nxt) as usize;
        if off >= free {
            return;
        }
        if data.len() > free - off {
            data = &data[..free - off];
        }
        if off == 0 {
            self.deliver(data);
            self.drain_ooo();
            if self.ooo_fin == Some(self.rcv_nxt) {
                self.process_fin(now);
            }
        } else {
            self.store_ooo(seq, data, out);
        }
    }

    fn deliver(&mut self, data: &[u8]) {
        if !self.rd_shut {
            self.recv_buf.extend(data);
        }
        self.rcv_nxt = self.rcv_nxt.wrapping_add(data.len() as u32);
    }

    fn drain_ooo(&mut self) {
        loop {
            let mut progressed = false;
            let mut i = 0;
            while i < self.ooo.len() {
                if seq_le(self.ooo[i].seq, self.rcv_nxt) {
                    let seg = self.ooo.remove(i);
                    let end = seg.seq.wrapping_add(seg.data.len() as u32);
                    if seq_gt(end, self.rcv_nxt) {
                        let skip = self.rcv_nxt.wrapping_sub(seg.seq) as usize;
                        let take = (seg.data.len() - skip).min(self.recv_free() as usize);
                        self.deliver(&seg.data[skip..skip + take]);
                        progressed = true;
                    }
                    continue;
                }
                i += 1;
            }
            if !progressed {
                break;
            }
        }
    }

    fn store_ooo(&mut self, seq: u32, data: &[u8], out: &mut Out) {
        if data.is_empty() {
            return;
        }
        let end = seq.wrapping_add(data.len() as u32);
        let covered = self.ooo.iter().any(|s| {
            let s_end = s.seq.wrapping_add(s.data.len() as u32);
            seq_le(s.seq, seq) && seq_ge(s_end, end)
        });
        if covered {
            return;
        }
        // Kept sorted and coalesced, so the count is the number of disjoint ranges; the limit
        // only bites on a peer that sends many scattered fragments.
        let pos = self
            .ooo
            .iter()
            .position(|s| seq_gt(s.seq, seq))
            .unwrap_or(self.ooo.len());
        self.ooo.insert(
            pos,
            OooSeg {
                seq,
                data: data.to_vec(),
            },
        );
        self.sack_recent = Some(seq);
        let mut i = pos.saturating_sub(1);
        while i + 1 < self.ooo.len() {
            let cur_end = self.ooo[i].seq.wrapping_add(self.ooo[i].data.len() as u32);
            let next_seq = self.ooo[i + 1].seq;
            if seq_lt(cur_end, next_seq) {
                if i > pos {
                    break;
                }
                i += 1;
                continue;
            }
            let next = self.ooo.remove(i + 1);
            let next_end = next_seq.wrapping_add(next.data.len() as u32);
            if seq_gt(next_end, cur_end) {
                let skip = cur_end.wrapping_sub(next_seq) as usize;
                self.ooo[i].data.extend_from_slice(&next.data[skip..]);
            }
        }
        if self.ooo.len() > MAX_OOO_SEGMENTS {
            // Drop the range farthest from RCV.NXT: it is the least urgent.
            self.ooo.pop();
            out.ooo_dropped += 1;
        }
    }

    fn process_fin(&mut self, now: u64) {
        self.rcv_nxt = self.rcv_nxt.wrapping_add(1);
        self.fin_received = true;
        self.ooo_fin = None;
        self.ooo.clear();
        match self.state {
            TcpState::Established => self.state = TcpState::CloseWait,
            TcpState::FinWait1 => {
                if self.fin_acked {
                    self.enter_time_wait(now);
                } else {
                    self.state = TcpState::Closing;
                }
            }
            TcpState::FinWait2 => self.enter_time_wait(now),
            _ => {}
        }
        self.owe_ack();
    }

    // -----------------------------------------------------------------------------------------
    // Output
    // -----------------------------------------------------------------------------------------

    /// Sends whatever the windows allow, then a pure ACK if one is still owed.
    pub fn output(&mut self, now: u64, out: &mut Out) {
        match self.state {
            TcpState::Closed => {
                self.ack_pending = false;
                return;
            }
            TcpState::SynReceived | TcpState::TimeWait | TcpState::FinWait2 => {
                if self.ack_pending {
                    self.send_pure_ack(out);
                }
                return;
            }
            _ => {}
        }
        loop {
            let flight = self.snd_nxt.wrapping_sub(self.snd_una);
            let off = flight as usize;
            let buf_len = self.send_buf.len();
            if off > buf_len {
                break; // FIN already sent
            }
            let avail = buf_len - off;
            // Limited transmit (RFC 3042): the first two duplicate ACKs each let one new segment
            // out beyond cwnd, so a small window still produces the third duplicate.
            let limited = if self.in_recovery {
                0
            } else {
                self.dup_acks.min(2) * self.mss32()
            };
            let wnd = self.snd_wnd.min(self.cwnd + limited);
            let usable = wnd.saturating_sub(flight) as usize;
            let len = avail.min(usize::from(self.send_mss)).min(usable);
            let fin_ready = self.fin_queued && !self.fin_acked && off + len == buf_len;
            if len == 0 && !fin_ready {
                break;
            }
            // Sender silly-window avoidance (RFC 9293 3.8.6.2.1), Nagle off: hold a runt back
            // while data is in flight (its ACK will open the window further).
            let runt = len < usize::from(self.send_mss) && len < avail;
            if len > 0 && runt && flight > 0 && (len as u32) < self.max_snd_wnd / 2 {
                break;
            }
            let seq = self.snd_nxt;
            let retransmit = seq_lt(seq, self.snd_max);
            let consumed = self.emit_at(seq, len, true, retransmit, out);
            assert!(
                consumed > 0,
                "tcp output: a segment was chosen but emitted nothing"
            );
            if !retransmit && len > 0 && self.rtt_sample.is_none() {
                self.rtt_sample = Some((seq.wrapping_add(consumed), now));
            }
            self.snd_nxt = seq.wrapping_add(consumed);
            if seq_gt(self.snd_nxt, self.snd_max) {
                self.snd_max = self.snd_nxt;
            }
        }
        if self.ack_pending && !self.ack_deferred {
            self.send_pure_ack(out);
        }
        self.arm_rtx(now);
        self.check_invariants();
    }

    // -----------------------------------------------------------------------------------------
    // Timers
    // -----------------------------------------------------------------------------------------

    /// Earliest time this connection needs [`Tcb::on_timer`].
    pub fn next_deadline(&self) -> Option<u64> {
        match (self.rtx_deadline, self.linger_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Runs the timers due at `now`.
    pub fn on_timer(&mut self, now: u64, out: &mut Out) {
        if let Some(d) = self.linger_deadline {
            if now >= d {
                self.linger_deadline = None;
                match self.state {
                    TcpState::TimeWait => self.close_down(),
                    TcpState::FinWait2 => self.abort(out),
                    _ => {}
                }
            }
        }
        let Some(d) = self.rtx_deadline else { return };
        if now < d || matches!(self.state, TcpState::Closed | TcpState::TimeWait) {
            return;
        }
        self.rtx_deadline = None;
        out.rto_fired += 1;
        if self.state == TcpState::SynReceived {
            if self.retries >= MAX_SYNACK_RETRIES {
                self.close_down();
                return;
            }
            self.retries += 1;
            self.backoff += 1;
            self.rtt_sample = None;
            self.send_syn_ack(true, out);
            self.rtx_deadline = Some(now.saturating_add(self.current_rto()));
            return;
        }
        if self.retries >= MAX_RETRIES {
            out.timed_out += 1;
            self.abort(out);
            self.error = Some(SocketError::TimedOut);
            return;
        }
        self.retries += 1;
        self.backoff += 1;
        self.rtt_sample = None;
        if self.snd_wnd == 0 && !self.send_buf.is_empty() {
            // Persist timer: probe the zero window with one byte (RFC 9293 3.8.6.1).
            out.zero_window_probes += 1;
            let seq = self.snd_una;
            let consumed = self.emit_at(seq, 1, false, seq_lt(seq, self.snd_max), out);
            let end = seq.wrapping_add(consumed);
            if seq_gt(end, self.snd_nxt) {
                self.snd_nxt = end;
            }
            if seq_gt(end, self.snd_max) {
                self.snd_max = end;
            }
        } else {
            // Retransmission timeout (RFC 5681 eq. 4, RFC 6298 5.4-5.6): go back to SND.UNA
            // with a one-segment window.
            let flight = self.snd_max.wrapping_sub(self.snd_una);
            self.ssthresh = (flight / 2).max(2 * self.mss32());
            self.cwnd = self.mss32();
            self.in_recovery = false;
            self.dup_acks = 0;
            self.recover = Some(self.snd_max);
            self.snd_nxt = self.snd_una;
            self.output(now, out);
        }
        self.rtx_deadline = Some(now.saturating_add(self.current_rto()));
    }

    /// Re-sends everything unacknowledged at once, plus an ACK (failover go-live: the outputs the
    /// old primary held back were never sent).
    pub fn retransmit_all(&mut self, now: u64, out: &mut Out) {
        match self.state {
            TcpState::Closed => {}
            TcpState::SynReceived => self.send_syn_ack(true, out),
            TcpState::TimeWait | TcpState::FinWait2 => self.send_pure_ack(out),
            _ => {
                // An ACK goes out even if nothing is in flight (emit_at clears this flag).
                self.owe_ack();
                let end = self.snd_max;
                let mut seq = self.snd_una;
                while seq_lt(seq, end) {
                    let c = self.emit_at(seq, usize::from(self.send_mss), true, true, out);
                    if c == 0 {
                        break;
                    }
                    seq = seq.wrapping_add(c);
                }
                if seq_gt(seq, self.snd_nxt) {
                    self.snd_nxt = seq;
                }
                self.rtt_sample = None;
                self.rtx_deadline = None;
                self.output(now, out);
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Guest operations
    // -----------------------------------------------------------------------------------------

    /// Queues data for sending; returns how much was taken.
    pub fn send(&mut self, data: &[u8], now: u64, out: &mut Out) -> Result<usize, NetError> {
        if let Some(e) = self.error {
            return Err(e.into());
        }
        if !matches!(self.state, TcpState::Established | TcpState::CloseWait) || self.fin_queued {
            return Err(NetError::BrokenPipe);
        }
        if data.is_empty() {
            return Ok(0);
        }
        let room = SEND_BUF_BYTES - self.send_buf.len();
        if room == 0 {
            return Err(NetError::WouldBlock);
        }
        let n = room.min(data.len());
        self.send_buf.extend(&data[..n]);
        self.output(now, out);
        Ok(n)
    }

    /// Reads (or peeks at) received data. `Ok(0)` is end of stream.
    pub fn recv(
        &mut self,
        buf: &mut [u8],
        peek: bool,
        now: u64,
        out: &mut Out,
    ) -> Result<usize, NetError> {
        if !self.recv_buf.is_empty() {
            let n = buf.len().min(self.recv_buf.len());
            let (a, b) = self.recv_buf.as_slices();
            let from_a = n.min(a.len());
            buf[..from_a].copy_from_slice(&a[..from_a]);
            buf[from_a..n].copy_from_slice(&b[..n - from_a]);
            if !peek && n > 0 {
                self.recv_buf.drain(..n);
                self.maybe_window_update(now, out);
            }
            return Ok(n);
        }
        if let Some(e) = self.error {
            return Err(e.into());
        }
        if self.fin_received || self.rd_shut || self.state == TcpState::Closed {
            return Ok(0);
        }
        Err(NetError::WouldBlock)
    }

    /// After the guest read data: tell the peer about the larger window if what it knows is less
    /// than half of what we could offer now (this also ends a zero-window stall promptly).
    fn maybe_window_update(&mut self, now: u64, out: &mut Out) {
        if !matches!(
            self.state,
            TcpState::Established | TcpState::FinWait1 | TcpState::FinWait2
        ) {
            return;
        }
        // Without window scaling we can never offer more than 65535 bytes.
        let free = self.recv_free().min(65535 << self.rcv_shift);
        let remaining = self.adv_remaining();
        let threshold = ((RECV_BUF_BYTES / 2) as u32).min(u32::from(self.our_mss));
        if remaining.saturating_mul(2) <= free && free >= remaining.saturating_add(threshold) {
            self.owe_ack();
            self.output(now, out);
        }
    }

    /// Shuts down the sending direction: FIN after the queued data.
    pub fn shutdown_write(&mut self, now: u64, out: &mut Out) -> Result<(), NetError> {
        if let Some(e) = self.error {
            return Err(e.into());
        }
        match self.state {
            TcpState::Established => self.state = TcpState::FinWait1,
            TcpState::CloseWait => self.state = TcpState::LastAck,
            TcpState::Closed => return Err(NetError::NotConnected),
            _ => return Ok(()),
        }
        self.fin_queued = true;
        self.output(now, out);
        Ok(())
    }

    /// The guest closed the socket: finish gracefully (FIN) and let the stack free it when done,
    /// or reset at once if received data was never read (RFC 9293 3.10.4; what Linux does).
    pub fn close(&mut self, now: u64, out: &mut Out) {
        self.orphan = true;
        if self.state == TcpState::Closed {
            return;
        }
        if self.has_unread_data() {
            self.abort(out);
            return;
        }
        match self.state {
            TcpState::Established | TcpState::CloseWait => {
                // Cannot fail: no error is set in these states.
                let _ = self.shutdown_write(now, out);
            }
            TcpState::FinWait2 => {
                self.linger_deadline = Some(now.saturating_add(FIN_WAIT_2_TIMEOUT_NS))
            }
            _ => {}
        }
    }

    /// Shuts down the receiving direction: buffered and future data is discarded.
    pub fn shutdown_read(&mut self) {
        self.rd_shut = true;
        self.recv_buf = VecDeque::new();
    }

    /// RCV.NXT: the next sequence number expected from the peer.
    pub fn rcv_nxt(&self) -> u32 {
        self.rcv_nxt
    }

    /// True if the guest has not read everything that arrived.
    pub fn has_unread_data(&self) -> bool {
        !self.recv_buf.is_empty()
    }

    /// Poll readiness.
    pub fn readiness(&self) -> crate::Readiness {
        let open_for_write = matches!(self.state, TcpState::Established | TcpState::CloseWait)
            && !self.fin_queued
            && self.error.is_none();
        crate::Readiness {
            readable: !self.recv_buf.is_empty()
                || self.fin_received
                || self.rd_shut
                || self.error.is_some()
                || self.state == TcpState::Closed,
            // Writable also when writing would fail at once, so the guest learns the error.
            writable: !open_for_write || self.send_buf.len() < SEND_BUF_BYTES,
            hangup: self.error.is_some()
                || self.state == TcpState::Closed
                || (self.fin_received && self.fin_queued),
            error: self.error.is_some(),
        }
    }

    /// Internal consistency; a violation is a bug in this module, never a property of input.
    pub fn check_invariants(&self) {
        assert!(
            seq_le(self.snd_una, self.snd_nxt),
            "tcp: snd_una beyond snd_nxt"
        );
        assert!(
            seq_le(self.snd_nxt, self.snd_max),
            "tcp: snd_nxt beyond snd_max"
        );
        let outstanding = self.snd_max.wrapping_sub(self.snd_una) as usize;
        assert!(
            outstanding <= self.send_buf.len() + 1,
            "tcp: more in flight than buffered"
        );
        assert!(
            self.send_buf.len() <= SEND_BUF_BYTES,
            "tcp: send buffer over its limit"
        );
        assert!(
            self.recv_buf.len() <= RECV_BUF_BYTES,
            "tcp: receive buffer over its limit"
        );
        assert!(
            self.ooo.len() <= MAX_OOO_SEGMENTS,
            "tcp: too many out-of-order segments"
        );
    }

    /// One-line summary for test failure messages.
    #[cfg(test)]
    pub fn debug_summary(&self) -> String {
        format!(
            "{:?} una={} nxt={} max={} wnd={} cwnd={} ssthresh={} sbuf={} fin_q={} fin_acked={} rcv_nxt={} rbuf={} ooo={} rtx={:?} retries={} backoff={} rto={} recovery={} dup={}",
            self.state, self.snd_una.wrapping_sub(self.iss), self.snd_nxt.wrapping_sub(self.iss), self.snd_max.wrapping_sub(self.iss),
            self.snd_wnd, self.cwnd, self.ssthresh, self.send_buf.len(), self.fin_queued, self.fin_acked,
            self.rcv_nxt.wrapping_sub(self.irs), self.recv_buf.len(), self.ooo.len(), self.rtx_deadline, self.retries, self.backoff, self.rto_ns, self.in_recovery, self.dup_acks
        )
    }
}
