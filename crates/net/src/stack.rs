//! [`NetStack`]: one NIC's Ethernet/ARP/IPv4/ICMP/TCP state and the socket API the WASI layer
//! calls. See the crate documentation for the contract.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::limits::*;
use crate::rng::Rng;
use crate::tcp::{seq_gt, Out, OutSeg, Tcb, TcpState};
use crate::wire::{self, tcp_flags, ArpPacket, Ipv4Route, TcpHeader, TcpSegment, WireError};
use crate::{NetError, Readiness};

/// Version of the serialized [`NetStack`] layout; bump it whenever a field changes.
pub const STATE_FORMAT_VERSION: u32 = 1;

/// Addresses of the VM's one NIC.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct NicConfig {
    /// Our MAC address.
    pub mac: [u8; 6],
    /// Our IPv4 address.
    pub ip: [u8; 4],
    /// Prefix length of our subnet (clamped to 0..=32).
    pub prefix_len: u8,
    /// Default gateway for off-subnet peers, if any.
    pub gateway: Option<[u8; 4]>,
    /// IP MTU (clamped to [`MIN_MTU`]..=[`MAX_MTU`]); our MSS is `mtu - 40`.
    pub mtu: u16,
}

/// Identifies a listener of one [`NetStack`].
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ListenerId(pub u32);

/// Identifies a connected socket of one [`NetStack`].
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SocketId(pub u32);

/// Counters. All are cumulative except `sockets_open` and `listeners_open`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Frames handed to [`NetStack::receive_frame`].
    pub frames_in: u64,
    /// Bytes handed to [`NetStack::receive_frame`].
    pub bytes_in: u64,
    /// Frames queued for transmission.
    pub frames_out: u64,
    /// Bytes queued for transmission.
    pub bytes_out: u64,
    /// Dropped: longer than [`MAX_FRAME_LEN`], or an echo request whose reply would exceed the MTU.
    pub drop_oversized: u64,
    /// Dropped: truncated or malformed header.
    pub drop_malformed: u64,
    /// Dropped: IPv4, ICMP or TCP checksum wrong.
    pub drop_bad_checksum: u64,
    /// Dropped: IPv4 fragment.
    pub drop_fragment: u64,
    /// Dropped: addressed to another MAC or IP.
    pub drop_not_for_us: u64,
    /// Dropped: EtherType, IP protocol or ICMP type we do not handle.
    pub drop_unsupported: u64,
    /// Dropped: impossible source address (broadcast, multicast, loopback, ours, zero).
    pub drop_martian: u64,
    /// Dropped: IPv4 broadcast (we offer no broadcast service).
    pub drop_broadcast: u64,
    /// Outgoing frames dropped because no MAC was known for the next hop (an ARP request went out).
    pub drop_no_neighbor: u64,
    /// Outgoing frames dropped because the outbox held [`MAX_OUTBOX_FRAMES`].
    pub drop_outbox_full: u64,
    /// SYNs dropped because the backlog or [`MAX_SOCKETS`] was full.
    pub drop_syn_backlog: u64,
    /// TCP segments without a connection that got no answer (RSTs, stray segments).
    pub drop_tcp_no_conn: u64,
    /// Out-of-order segments dropped beyond [`MAX_OOO_SEGMENTS`].
    pub drop_ooo_segment: u64,
    /// ARP replies sent.
    pub arp_replies: u64,
    /// ARP requests sent (resolution and gratuitous).
    pub arp_requests_sent: u64,
    /// ARP packets claiming our IP from another MAC.
    pub arp_conflicts: u64,
    /// ICMP echo replies sent.
    pub icmp_echo_replies: u64,
    /// Connections that completed the handshake.
    pub conn_established: u64,
    /// Connections reset by the peer.
    pub conn_reset_by_peer: u64,
    /// Connections given up after [`MAX_RETRIES`].
    pub conn_timed_out: u64,
    /// RST segments sent.
    pub rst_sent: u64,
    /// Challenge ACKs sent (RFC 5961).
    pub challenge_acks: u64,
    /// Deferred ACKs that no reply carried, sent at the end of a turn.
    #[serde(default)]
    pub deferred_acks_sent: u64,
    /// TCP segments sent again (any reason).
    pub retransmits: u64,
    /// Fast retransmits (three duplicate ACKs).
    pub fast_retransmits: u64,
    /// Retransmission (or persist) timer expirations.
    pub rto_fired: u64,
    /// Zero-window probes sent.
    pub zero_window_probes: u64,
    /// Sockets alive now (all states).
    pub sockets_open: u64,
    /// Listeners alive now.
    pub listeners_open: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
struct Listener {
    port: u16,
    backlog: u32,
    /// Half-open connections (SYN-RECEIVED).
    syn_queue: Vec<u32>,
    /// Established connections not yet accepted.
    accept_queue: VecDeque<u32>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
struct Neighbor {
    mac: [u8; 6],
    seen_ns: u64,
}

type ConnKey = ([u8; 4], u16, u16); // (remote ip, remote port, local port)

/// The deterministic TCP/IPv4 stack of one VM NIC. All fields are plain data in ordered
/// containers: two stacks that were fed the same calls are equal, serialize to the same bytes,
/// and have the same [`NetStack::state_hash`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct NetStack {
    format_version: u32,
    cfg: NicConfig,
    rng: Rng,
    ip_ident: u16,
    /// Latest time seen; time never goes backwards inside the stack.
    now_ns: u64,
    neighbors: BTreeMap<[u8; 4], Neighbor>,
    /// When we last sent an ARP request for an address (rate limit).
    arp_requested: BTreeMap<[u8; 4], u64>,
    listeners: BTreeMap<u32, Listener>,
    ports: BTreeMap<u16, u32>,
    next_listener_id: u32,
    sockets: BTreeMap<u32, Tcb>,
    conns: BTreeMap<ConnKey, u32>,
    next_socket_id: u32,
    outbox: Vec<Vec<u8>>,
    stats: Stats,
    /// ACKs of in-order data wait for [`NetStack::end_turn`] (set by the VM host).
    #[serde(default)]
    defer_acks: bool,
    /// Repeats of the last [`NetStack::announce`] still to send, when the next is due (set by the
    /// first [`NetStack::poll`] after it) and the gap after that one.
    #[serde(default)]
    announce_repeats_left: u8,
    #[serde(default)]
    announce_at_ns: Option<u64>,
    #[serde(default)]
    announce_gap_ns: u64,
}

const INVALID_READINESS: Readiness = Readiness {
    readable: true,
    writable: true,
    hangup: true,
    error: true,
};

impl NetStack {
    /// Creates a stack. `seed` feeds the PRNG that picks initial sequence numbers and IP
    /// identifications; primary and backup must use the same seed.
    pub fn new(cfg: NicConfig, seed: u64) -> Self {
        let cfg = NicConfig {
            prefix_len: cfg.prefix_len.min(32),
            mtu: cfg.mtu.clamp(MIN_MTU, MAX_MTU),
            ..cfg
        };
        let mut rng = Rng::new(seed);
        let ip_ident = rng.next_u32() as u16;
        NetStack {
            format_version: STATE_FORMAT_VERSION,
            cfg,
            rng,
            ip_ident,
            now_ns: 0,
            neighbors: BTreeMap::new(),
            arp_requested: BTreeMap::new(),
            listeners: BTreeMap::new(),
            ports: BTreeMap::new(),
            next_listener_id: 1,
            sockets: BTreeMap::new(),
            conns: BTreeMap::new(),
            next_socket_id: 1,
            outbox: Vec::new(),
            stats: Stats::default(),
            defer_acks: false,
            announce_repeats_left: 0,
            announce_at_ns: None,
            announce_gap_ns: 0,
        }
    }

    /// Deferred ACKs, deterministic (the delayed ACK of RFC 1122 4.2.3.2, with the end of the
    /// VM's turn as its timer): on connections created from now on, the ACK owed for in-order
    /// data is not sent while the segment is processed but at the next [`NetStack::end_turn`], and
    /// only if no segment carried it meanwhile. A request answered within the turn then costs one
    /// frame out (the reply, which carries the ACK) rather than two. Gaps, FINs, window updates
    /// and every second full-sized segment are still acknowledged at once. The caller must call
    /// `end_turn` at every point where the guest waits, which the VM host does: those points are
    /// gate events, so replicas defer and flush identically.
    pub fn set_defer_acks(&mut self, on: bool) {
        self.defer_acks = on;
    }

    /// The guest's turn is over (it is about to wait): sends the ACKs still deferred.
    pub fn end_turn(&mut self) {
        let mut sent = 0;
        self.drive(Tcb::has_deferred_ack, |t, out| {
            if t.flush_deferred_ack(out) {
                sent += 1;
            }
        });
        self.stats.deferred_acks_sent += sent;
    }

    /// The configuration in force (after clamping).
    pub fn config(&self) -> &NicConfig {
        &self.cfg
    }

    fn our_mss(&self) -> u16 {
        self.cfg.mtu - 40
    }

    fn advance(&mut self, now_ns: u64) -> u64 {
        self.now_ns = self.now_ns.max(now_ns);
        self.now_ns
    }

    // -----------------------------------------------------------------------------------------
    // Addresses and neighbors
    // -----------------------------------------------------------------------------------------

    fn netmask(&self) -> u32 {
        if self.cfg.prefix_len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.cfg.prefix_len))
        }
    }

    fn on_subnet(&self, ip: [u8; 4]) -> bool {
        let m = self.netmask();
        u32::from_be_bytes(ip) & m == u32::from_be_bytes(self.cfg.ip) & m
    }

    fn subnet_broadcast(&self) -> Option<[u8; 4]> {
        if self.cfg.prefix_len >= 31 {
            return None;
        }
        Some((u32::from_be_bytes(self.cfg.ip) | !self.netmask()).to_be_bytes())
    }

    /// A plausible unicast address of a remote host.
    fn is_remote_unicast(&self, ip: [u8; 4]) -> bool {
        !(ip == [0; 4]
            || ip == [255; 4]
            || ip[0] == 127
            || ip[0] >= 224
            || ip == self.cfg.ip
            || Some(ip) == self.subnet_broadcast())
    }

    fn learn(&mut self, ip: [u8; 4], mac: [u8; 6], create: bool) {
        if !self.is_remote_unicast(ip)
            || wire::mac_is_group(mac)
            || mac == [0; 6]
            || mac == self.cfg.mac
        {
            return;
        }
        let now = self.now_ns;
        if let Some(n) = self.neighbors.get_mut(&ip) {
            n.mac = mac;
            n.seen_ns = now;
            return;
        }
        if !create {
            return;
        }
        if self.neighbors.len() >= MAX_NEIGHBORS {
            // Evict the least recently seen (ties: lowest address, by map order).
            let victim = self
                .neighbors
                .iter()
                .min_by_key(|(_, n)| n.seen_ns)
                .map(|(ip, _)| *ip);
            if let Some(v) = victim {
                self.neighbors.remove(&v);
            }
        }
        self.neighbors.insert(ip, Neighbor { mac, seen_ns: now });
        self.arp_requested.remove(&ip);
    }

    /// Next-hop MAC for `dst`, or `None` after queueing an ARP request (rate limited).
    fn resolve(&mut self, dst: [u8; 4]) -> Option<[u8; 6]> {
        let hop = match self.cfg.gateway {
            Some(gw) if !self.on_subnet(dst) => {
                if let Some(n) = self.neighbors.get(&gw) {
                    return Some(n.mac);
                }
                gw
            }
            _ => dst,
        };
        // Off-subnet without a known gateway MAC: the MAC the peer's frames came from works too.
        if let Some(n) = self.neighbors.get(&dst) {
            return Some(n.mac);
        }
        let now = self.now_ns;
        let due = match self.arp_requested.get(&hop) {
            Some(&t) => now.saturating_sub(t) >= ARP_REQUEST_INTERVAL_NS,
            None => true,
        };
        if due
            && (self.arp_requested.len() < MAX_NEIGHBORS || self.arp_requested.contains_key(&hop))
        {
            self.arp_requested.insert(hop, now);
            let arp = ArpPacket {
                oper: wire::ARP_REQUEST,
                sha: self.cfg.mac,
                spa: self.cfg.ip,
                tha: [0; 6],
                tpa: hop,
            };
            let f = wire::build_arp_frame(wire::MAC_BROADCAST, self.cfg.mac, &arp);
            self.stats.arp_requests_sent += 1;
            self.push_frame(f);
        }
        None
    }

    fn next_ident(&mut self) -> u16 {
        self.ip_ident = self.ip_ident.wrapping_add(1);
        self.ip_ident
    }

    fn push_frame(&mut self, frame: Vec<u8>) {
        assert!(
            frame.len() <= MAX_FRAME_LEN,
            "netstack: emitted a frame larger than the MTU allows"
        );
        if self.outbox.len() >= MAX_OUTBOX_FRAMES {
            self.stats.drop_outbox_full += 1;
            return;
        }
        self.stats.frames_out += 1;
        self.stats.bytes_out += frame.len() as u64;
        self.outbox.push(frame);
    }

    fn route(&mut self, dst: [u8; 4]) -> Option<Ipv4Route> {
        let Some(mac) = self.resolve(dst) else {
            self.stats.drop_no_neighbor += 1;
            return None;
        };
        Some(Ipv4Route {
            eth_dst: mac,
            eth_src: self.cfg.mac,
            ip_src: self.cfg.ip,
            ip_dst: dst,
            ident: self.next_ident(),
        })
    }

    fn emit_tcp(&mut self, key: ConnKey, seg: &OutSeg) {
        let (remote_ip, remote_port, local_port) = key;
        if seg.flags & tcp_flags::RST != 0 {
            self.stats.rst_sent += 1;
        }
        if seg.retransmit {
            self.stats.retransmits += 1;
        }
        let Some(r) = self.route(remote_ip) else {
            return;
        };
        let h = TcpHeader {
            src_port: local_port,
            dst_port: remote_port,
            seq: seg.seq,
            ack: seg.ack,
            flags: seg.flags,
            window: seg.window,
            mss: seg.mss,
            wscale: seg.wscale,
            sack_permitted: seg.sack_permitted,
            sack: seg.sack,
        };
        let f = wire::build_tcp_frame(&r, &h, &seg.payload);
        self.push_frame(f);
    }

    fn flush(&mut self, key: ConnKey, out: Out) {
        for seg in &out.segs {
            self.emit_tcp(key, seg);
        }
        let s = &mut self.stats;
        s.fast_retransmits += out.fast_retransmits;
        s.rto_fired += out.rto_fired;
        s.zero_window_probes += out.zero_window_probes;
        s.drop_ooo_segment += out.ooo_dropped;
        s.conn_reset_by_peer += out.resets_received;
        s.conn_timed_out += out.timed_out;
        s.challenge_acks += out.challenge_acks;
    }

    // -----------------------------------------------------------------------------------------
    // Socket bookkeeping
    // -----------------------------------------------------------------------------------------

    fn key_of(t: &Tcb) -> ConnKey {
        (t.remote_ip, t.remote_port, t.local_port)
    }

    fn alloc_socket_id(&mut self) -> u32 {
        loop {
            let id = self.next_socket_id;
            self.next_socket_id = self.next_socket_id.checked_add(1).unwrap_or(1);
            if !self.sockets.contains_key(&id) {
                return id;
            }
        }
    }

    fn free_socket(&mut self, id: u32) {
        let Some(t) = self.sockets.remove(&id) else {
            return;
        };
        let key = Self::key_of(&t);
        if self.conns.get(&key) == Some(&id) {
            self.conns.remove(&key);
        }
        if let Some(l) = self.listeners.get_mut(&t.listener) {
            l.syn_queue.retain(|&x| x != id);
            l.accept_queue.retain(|&x| x != id);
        }
    }

    /// After any call into a [`Tcb`]: move newly established connections to the accept queue and
    /// free connections that are finished and that the guest no longer holds.
    fn settle(&mut self, id: u32) {
        let Some(t) = self.sockets.get_mut(&id) else {
            return;
        };
        if t.just_established {
            t.just_established = false;
            let lid = t.listener;
            match self.listeners.get_mut(&lid) {
                Some(l) => {
                    l.syn_queue.retain(|&x| x != id);
                    l.accept_queue.push_back(id);
                    self.stats.conn_established += 1;
                }
                None => {
                    let mut out = Out::default();
                    t.abort(&mut out);
                    let key = Self::key_of(t);
                    self.flush(key, out);
                }
            }
        }
        let Some(t) = self.sockets.get(&id) else {
            return;
        };
        if t.state == TcpState::Closed {
            let key = Self::key_of(t);
            if self.conns.get(&key) == Some(&id) {
                self.conns.remove(&key);
            }
            if t.orphan || !t.accepted {
                self.free_socket(id);
            }
        }
    }

    /// Runs `f` on a socket the guest holds, then transmits and settles.
    fn with_user_tcb<R>(
        &mut self,
        s: SocketId,
        now_ns: u64,
        f: impl FnOnce(&mut Tcb, u64, &mut Out) -> R,
    ) -> Result<R, NetError> {
        let now = self.advance(now_ns);
        let t = match self.sockets.get_mut(&s.0) {
            Some(t) if t.accepted && !t.orphan => t,
            _ => return Err(NetError::InvalidSocket(s.0)),
        };
        let mut out = Out::default();
        let r = f(t, now, &mut out);
        let key = Self::key_of(t);
        self.flush(key, out);
        self.settle(s.0);
        Ok(r)
    }

    fn user_tcb(&self, s: SocketId) -> Option<&Tcb> {
        self.sockets.get(&s.0).filter(|t| t.accepted && !t.orphan)
    }

    // -----------------------------------------------------------------------------------------
    // Guest API
    // -----------------------------------------------------------------------------------------

    /// Starts listening on `port`. The backlog is clamped to 1..=[`MAX_BACKLOG`]; it bounds
    /// half-open plus not-yet-accepted connections.
    pub fn listen(&mut self, port: u16, backlog: u32) -> Result<ListenerId, NetError> {
        if port == 0 {
            return Err(NetError::InvalidArgument {
                what: "port 0 cannot be listened on",
            });
        }
        if self.ports.contains_key(&port) {
            return Err(NetError::AddrInUse { port });
        }
        if self.listeners.len() >= MAX_LISTENERS {
            return Err(NetError::TooManyListeners {
                limit: MAX_LISTENERS,
            });
        }
        let mut id = self.next_listener_id;
        while self.listeners.contains_key(&id) {
            id = id.checked_add(1).unwrap_or(1);
        }
        self.next_listener_id = id.checked_add(1).unwrap_or(1);
        let l = Listener {
            port,
            backlog: backlog.clamp(1, MAX_BACKLOG),
            syn_queue: Vec::new(),
            accept_queue: VecDeque::new(),
        };
        self.listeners.insert(id, l);
        self.ports.insert(port, id);
        Ok(ListenerId(id))
    }

    /// Takes the oldest established connection off the listener's accept queue.
    pub fn accept(&mut self, l: ListenerId) -> Result<SocketId, NetError> {
        let lst = self
            .listeners
            .get_mut(&l.0)
            .ok_or(NetError::InvalidListener(l.0))?;
        let id = lst.accept_queue.pop_front().ok_or(NetError::WouldBlock)?;
        let t = self
            .sockets
            .get_mut(&id)
            .expect("netstack: accept queue names a freed socket");
        t.accepted = true;
        Ok(SocketId(id))
    }

    /// Reads received bytes into `buf` (`peek`: without consuming them). `Ok(0)` means end of
    /// stream (or an empty `buf`); `WouldBlock` means nothing yet; `ConnReset`/`TimedOut` report
    /// an abnormal end. Reading may queue a window update.
    pub fn recv(&mut self, s: SocketId, buf: &mut [u8], peek: bool) -> Result<usize, NetError> {
        let now = self.now_ns;
        self.with_user_tcb(s, now, |t, now, out| t.recv(buf, peek, now, out))?
    }

    /// Queues bytes for sending and transmits what the windows allow. Returns how many bytes
    /// were taken (a partial write when the send buffer fills); `WouldBlock` if none fit.
    pub fn send(&mut self, s: SocketId, data: &[u8], now_ns: u64) -> Result<usize, NetError> {
        self.with_user_tcb(s, now_ns, |t, now, out| t.send(data, now, out))?
    }

    /// Shuts down reading (discard incoming data) and/or writing (send FIN after queued data).
    pub fn shutdown(
        &mut self,
        s: SocketId,
        read: bool,
        write: bool,
        now_ns: u64,
    ) -> Result<(), NetError> {
        self.with_user_tcb(s, now_ns, |t, now, out| {
            if read {
                t.shutdown_read();
            }
            if write {
                t.shutdown_write(now, out)
            } else {
                Ok(())
            }
        })?
    }

    /// Closes a socket: a graceful FIN exchange continues in the background and the socket is
    /// freed when it completes (or times out). With unread received data, sends RST instead.
    /// The id is invalid afterwards. Unknown ids are ignored.
    pub fn close(&mut self, s: SocketId, now_ns: u64) {
        // The only error is an unknown id, which is ignored by contract.
        let _ = self.with_user_tcb(s, now_ns, |t, now, out| t.close(now, out));
    }

    /// Stops listening; connections still in its queues are reset and freed.
    pub fn close_listener(&mut self, l: ListenerId) {
        let Some(lst) = self.listeners.remove(&l.0) else {
            return;
        };
        self.ports.remove(&lst.port);
        let ids: Vec<u32> = lst
            .syn_queue
            .iter()
            .copied()
            .chain(lst.accept_queue.iter().copied())
            .collect();
        for id in ids {
            if let Some(t) = self.sockets.get_mut(&id) {
                let mut out = Out::default();
                t.abort(&mut out);
                let key = Self::key_of(t);
                self.flush(key, out);
            }
            self.free_socket(id);
        }
    }

    /// Poll readiness of a socket. An id the guest does not hold reports everything (so a poll
    /// returns and the next call reports `InvalidSocket`).
    pub fn readiness(&self, s: SocketId) -> Readiness {
        self.user_tcb(s).map_or(INVALID_READINESS, Tcb::readiness)
    }

    /// True if `accept` would return a connection (also true for an unknown listener, so a poll
    /// returns and `accept` reports the error).
    pub fn listener_ready(&self, l: ListenerId) -> bool {
        self.listeners
            .get(&l.0)
            .is_none_or(|lst| !lst.accept_queue.is_empty())
    }

    /// The peer's address and port.
    pub fn peer_addr(&self, s: SocketId) -> Option<([u8; 4], u16)> {
        self.user_tcb(s).map(|t| (t.remote_ip, t.remote_port))
    }

    // -----------------------------------------------------------------------------------------
    // Driving the stack
    // -----------------------------------------------------------------------------------------

    /// Processes one received Ethernet frame. Never panics on any input.
    pub fn receive_frame(&mut self, frame: &[u8], now_ns: u64) {
        self.advance(now_ns);
        self.stats.frames_in += 1;
        self.stats.bytes_in += frame.len() as u64;
        if frame.len() > MAX_FRAME_LEN {
            self.stats.drop_oversized += 1;
            return;
        }
        let eth = match wire::parse_eth(frame) {
            Ok(e) => e,
            Err(_) => {
                self.stats.drop_malformed += 1;
                return;
            }
        };
        if eth.dst != self.cfg.mac && eth.dst != wire::MAC_BROADCAST {
            self.stats.drop_not_for_us += 1;
            return;
        }
        if wire::mac_is_group(eth.src) {
            self.stats.drop_martian += 1;
            return;
        }
        match eth.ethertype {
            wire::ETHERTYPE_ARP => self.handle_arp(eth.payload),
            wire::ETHERTYPE_IPV4 => self.handle_ipv4(eth.src, eth.dst, eth.payload),
            _ => self.stats.drop_unsupported += 1,
        }
    }

    fn count_wire_error(&mut self, e: WireError) {
        match e {
            WireError::Truncated | WireError::Malformed => self.stats.drop_malformed += 1,
            WireError::BadChecksum => self.stats.drop_bad_checksum += 1,
            WireError::Fragment => self.stats.drop_fragment += 1,
        }
    }

    fn handle_arp(&mut self, payload: &[u8]) {
        let arp = match wire::parse_arp(payload) {
            Ok(a) => a,
            Err(e) => return self.count_wire_error(e),
        };
        if arp.spa == self.cfg.ip {
            if arp.sha != self.cfg.mac {
                self.stats.arp_conflicts += 1;
            }
            return;
        }
        let for_us = arp.tpa == self.cfg.ip;
        // RFC 826: update an existing entry from any ARP; create one only when we are the target.
        self.learn(arp.spa, arp.sha, for_us);
        if arp.oper == wire::ARP_REQUEST && for_us && !wire::mac_is_group(arp.sha) {
            let reply = ArpPacket {
                oper: wire::ARP_REPLY,
                sha: self.cfg.mac,
                spa: self.cfg.ip,
                tha: arp.sha,
                tpa: arp.spa,
            };
            let f = wire::build_arp_frame(arp.sha, self.cfg.mac, &reply);
            self.stats.arp_replies += 1;
            self.push_frame(f);
        }
    }

    fn handle_ipv4(&mut self, eth_src: [u8; 6], eth_dst: [u8; 6], payload: &[u8]) {
        let ip = match wire::parse_ipv4(payload) {
            Ok(p) => p,
            Err(e) => return self.count_wire_error(e),
        };
        let to_us = ip.dst == self.cfg.ip;
        let bcast = ip.dst == [255; 4] || Some(ip.dst) == self.subnet_broadcast();
        if !to_us && !bcast {
            self.stats.drop_not_for_us += 1;
            return;
        }
        if !self.is_remote_unicast(ip.src) {
            self.stats.drop_martian += 1;
            return;
        }
        if bcast || eth_dst == wire::MAC_BROADCAST {
            self.stats.drop_broadcast += 1;
            return;
        }
        match ip.proto {
            wire::IPPROTO_ICMP => self.handle_icmp(eth_src, &ip),
            wire::IPPROTO_TCP => self.handle_tcp(eth_src, &ip),
            _ => self.stats.drop_unsupported += 1,
        }
    }

    fn handle_icmp(&mut self, eth_src: [u8; 6], ip: &wire::Ipv4Packet<'_>) {
        let echo = match wire::parse_icmp_echo_request(ip.payload) {
            Ok(Some(e)) => e,
            Ok(None) => {
                self.stats.drop_unsupported += 1;
                return;
            }
            Err(e) => return self.count_wire_error(e),
        };
        if wire::IPV4_HDR_LEN + wire::ICMP_ECHO_HDR_LEN + echo.data.len()
            > usize::from(self.cfg.mtu)
        {
            // The reply would not fit our MTU (we never fragment).
            self.stats.drop_oversized += 1;
            return;
        }
        self.learn(ip.src, eth_src, true);
        let Some(r) = self.route(ip.src) else { return };
        let f = wire::build_icmp_echo_frame(&r, 0, echo.ident, echo.seq, echo.data);
        self.stats.icmp_echo_replies += 1;
        self.push_frame(f);
    }

    fn handle_tcp(&mut self, eth_src: [u8; 6], ip: &wire::Ipv4Packet<'_>) {
        let seg = match wire::parse_tcp(ip.src, ip.dst, ip.payload) {
            Ok(s) => s,
            Err(e) => return self.count_wire_error(e),
        };
        if seg.src_port == 0 || seg.dst_port == 0 {
            self.stats.drop_malformed += 1;
            return;
        }
        // Learn only from checksum-verified segments, so a corrupted frame cannot poison the
        // table.
        self.learn(ip.src, eth_src, true);
        let now = self.now_ns;
        let key: ConnKey = (ip.src, seg.src_port, seg.dst_port);
        if let Some(&id) = self.conns.get(&key) {
            let t = self
                .sockets
                .get_mut(&id)
                .expect("netstack: connection index names a freed socket");
            // A new SYN above the old sequence space may reuse a TIME-WAIT 4-tuple (RFC 9293
            // 3.6.1); we are the server, so this is the common case of a quick reconnect.
            let reuse = t.state == TcpState::TimeWait
                && seg.has(tcp_flags::SYN)
                && !seg.has(tcp_flags::ACK | tcp_flags::RST)
                && seq_gt(seg.seq, t.rcv_nxt())
                && self.ports.contains_key(&seg.dst_port);
            if reuse {
                if t.orphan || !t.accepted {
                    self.free_socket(id);
                } else {
                    // The guest still holds the old socket: it stays (closed) until closed.
                    t.retire();
                    self.conns.remove(&key);
                }
            } else {
                let mut out = Out::default();
                t.on_segment(&seg, now, &mut out);
                self.flush(key, out);
                self.settle(id);
                return;
            }
        }
        if seg.has(tcp_flags::RST) {
            self.stats.drop_tcp_no_conn += 1;
            return;
        }
        let Some(&lid) = self.ports.get(&seg.dst_port) else {
            self.reset_stray(key, &seg);
            return;
        };
        if seg.has(tcp_flags::ACK) {
            self.reset_stray(key, &seg);
            return;
        }
        if !seg.has(tcp_flags::SYN) || seg.has(tcp_flags::FIN) {
            self.stats.drop_tcp_no_conn += 1;
            return;
        }
        let lst = &self.listeners[&lid];
        let queued = lst.syn_queue.len() + lst.accept_queue.len();
        if queued >= lst.backlog as usize || self.sockets.len() >= MAX_SOCKETS {
            self.stats.drop_syn_backlog += 1;
            return;
        }
        let iss = self.rng.next_u32();
        let mut out = Out::default();
        let mut tcb = Tcb::new_passive(&seg, ip.src, lid, iss, self.our_mss(), now, &mut out);
        tcb.set_defer_acks(self.defer_acks);
        let id = self.alloc_socket_id();
        self.sockets.insert(id, tcb);
        self.conns.insert(key, id);
        self.listeners
            .get_mut(&lid)
            .expect("listener vanished")
            .syn_queue
            .push(id);
        self.flush(key, out);
    }

    /// RST for a segment that belongs to no connection (RFC 9293 3.10.7.1).
    fn reset_stray(&mut self, key: ConnKey, seg: &TcpSegment<'_>) {
        let (seq, ack, flags) = if seg.has(tcp_flags::ACK) {
            (seg.ack, 0, tcp_flags::RST)
        } else {
            (
                0,
                seg.seq.wrapping_add(seg.seq_len()),
                tcp_flags::RST | tcp_flags::ACK,
            )
        };
        let out = OutSeg {
            seq,
            ack,
            flags,
            window: 0,
            mss: None,
            wscale: None,
            payload: Vec::new(),
            retransmit: false,
            ..Default::default()
        };
        self.emit_tcp(key, &out);
    }

    /// Runs every timer due at `now_ns` (retransmission, persist, TIME-WAIT, FIN-WAIT-2).
    pub fn poll(&mut self, now_ns: u64) {
        let now = self.advance(now_ns);
        self.drive(
            |t| t.next_deadline().is_some_and(|d| d <= now),
            |t, out| t.on_timer(now, out),
        );
        self.arp_requested
            .retain(|_, t| now.saturating_sub(*t) < ARP_REQUEST_INTERVAL_NS);
        if self.announce_repeats_left > 0 {
            match self.announce_at_ns {
                None => self.announce_at_ns = Some(now + self.announce_gap_ns),
                Some(at) if at <= now => {
                    self.gratuitous_arp();
                    self.announce_repeats_left -= 1;
                    self.announce_gap_ns = self.announce_gap_ns.saturating_mul(2);
                    self.announce_at_ns =
                        (self.announce_repeats_left > 0).then(|| now + self.announce_gap_ns);
                }
                Some(_) => {}
            }
        }
    }

    /// Runs `f` on every connection `due` selects (in id order), then transmits what it queued
    /// and settles the connection.
    fn drive(&mut self, due: impl Fn(&Tcb) -> bool, mut f: impl FnMut(&mut Tcb, &mut Out)) {
        let ids: Vec<u32> = self
            .sockets
            .iter()
            .filter(|(_, t)| due(t))
            .map(|(&id, _)| id)
            .collect();
        for id in ids {
            let Some(t) = self.sockets.get_mut(&id) else {
                continue;
            };
            let mut out = Out::default();
            f(t, &mut out);
            let key = Self::key_of(t);
            self.flush(key, out);
            self.settle(id);
        }
    }

    /// Takes the frames queued for transmission, oldest first.
    pub fn drain_frames(&mut self) -> std::vec::Drain<'_, Vec<u8>> {
        self.outbox.drain(..)
    }

    /// Frames waiting in the outbox.
    pub fn pending_frames(&self) -> usize {
        self.outbox.len()
    }

    /// The earliest time at which [`NetStack::poll`] has work, if any.
    pub fn next_deadline_ns(&self) -> Option<u64> {
        self.sockets
            .values()
            .filter_map(Tcb::next_deadline)
            .chain(self.announce_at_ns)
            .min()
    }

    /// Queues [`GRATUITOUS_ARP_COUNT`] gratuitous ARP requests announcing our MAC for our IP
    /// (failover go-live: switches and peers learn the new location), and sends
    /// [`ANNOUNCE_REPEATS`] more from [`NetStack::poll`], the first [`ANNOUNCE_REPEAT_FIRST_NS`]
    /// after the next poll, each later one twice as long after the one before.
    pub fn announce(&mut self) {
        for _ in 0..GRATUITOUS_ARP_COUNT {
            self.gratuitous_arp();
        }
        self.announce_repeats_left = ANNOUNCE_REPEATS;
        self.announce_at_ns = None;
        self.announce_gap_ns = ANNOUNCE_REPEAT_FIRST_NS;
    }

    fn gratuitous_arp(&mut self) {
        let arp = ArpPacket {
            oper: wire::ARP_REQUEST,
            sha: self.cfg.mac,
            spa: self.cfg.ip,
            tha: [0; 6],
            tpa: self.cfg.ip,
        };
        let f = wire::build_arp_frame(wire::MAC_BROADCAST, self.cfg.mac, &arp);
        self.stats.arp_requests_sent += 1;
        self.push_frame(f);
    }

    /// Immediately re-sends all unacknowledged data, FINs and SYN-ACKs of every connection, plus
    /// an ACK on each (failover go-live). Normal operation continues afterwards.
    pub fn retransmit_all(&mut self, now_ns: u64) {
        let now = self.advance(now_ns);
        let ids: Vec<u32> = self.sockets.keys().copied().collect();
        for id in ids {
            let Some(t) = self.sockets.get_mut(&id) else {
                continue;
            };
            let mut out = Out::default();
            t.retransmit_all(now, &mut out);
            let key = Self::key_of(t);
            self.flush(key, out);
            self.settle(id);
        }
    }

    // -----------------------------------------------------------------------------------------
    // State
    // -----------------------------------------------------------------------------------------

    /// Deterministic serialization of the whole state (postcard).
    pub fn save(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("netstack: serializing plain data cannot fail")
    }

    /// Restores a state produced by [`NetStack::save`] of the same build. The bytes are trusted
    /// to come from a replica; garbage is rejected with an error, but a well-formed state with
    /// broken invariants is not detected here.
    pub fn restore(bytes: &[u8]) -> Result<Self, NetError> {
        let s: NetStack =
            postcard::from_bytes(bytes).map_err(|e| NetError::Decode(e.to_string()))?;
        if s.format_version != STATE_FORMAT_VERSION {
            return Err(NetError::Version {
                found: s.format_version,
                expected: STATE_FORMAT_VERSION,
            });
        }
        Ok(s)
    }

    /// BLAKE3 of [`NetStack::save`]: equal on two replicas exactly when their states are equal.
    pub fn state_hash(&self) -> [u8; 32] {
        blake3::hash(&self.save()).into()
    }

    /// Counters, with the current socket and listener counts filled in.
    pub fn stats(&self) -> Stats {
        Stats {
            sockets_open: self.sockets.len() as u64,
            listeners_open: self.listeners.len() as u64,
            ..self.stats.clone()
        }
    }

    /// Debug dump of the connections (tests only).
    #[cfg(test)]
    pub(crate) fn debug_tcbs(&self) -> Vec<String> {
        self.sockets.values().map(|t| t.debug_summary()).collect()
    }

    /// Asserts the stack-level invariants (bounded tables, consistent indexes). Tests and
    /// simulations call it; a violation is a bug.
    pub fn check_invariants(&self) {
        assert!(
            self.sockets.len() <= MAX_SOCKETS,
            "netstack: more sockets than MAX_SOCKETS"
        );
        assert!(
            self.listeners.len() <= MAX_LISTENERS,
            "netstack: more listeners than MAX_LISTENERS"
        );
        assert!(
            self.outbox.len() <= MAX_OUTBOX_FRAMES,
            "netstack: outbox over its limit"
        );
        assert!(
            self.neighbors.len() <= MAX_NEIGHBORS,
            "netstack: neighbor table over its limit"
        );
        assert!(
            self.arp_requested.len() <= MAX_NEIGHBORS,
            "netstack: ARP request table over its limit"
        );
        for (k, id) in &self.conns {
            let t = self
                .sockets
                .get(id)
                .expect("netstack: conns names a freed socket");
            assert_eq!(Self::key_of(t), *k, "netstack: conns key mismatch");
        }
        for l in self.listeners.values() {
            assert!(
                l.syn_queue.len() + l.accept_queue.len() <= l.backlog as usize,
                "netstack: backlog overrun"
            );
        }
        for t in self.sockets.values() {
            t.check_invariants();
        }
    }
}
