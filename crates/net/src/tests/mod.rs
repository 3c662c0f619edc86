//! Tests that drive the whole stack: hand-made segments (`unit`), a second TCP implementation
//! over a lossy link (`sim`), and random frames (`fuzz`).

mod fuzz;
mod sim;
mod unit;

use crate::wire::{self, tcp_flags, Ipv4Route, TcpHeader};
use crate::{NetStack, NicConfig};

pub const SERVER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const SERVER_IP: [u8; 4] = [198, 18, 0, 1];
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub const CLIENT_IP: [u8; 4] = [198, 18, 0, 2];
pub const MS: u64 = 1_000_000;
pub const SEC: u64 = 1_000_000_000;

pub fn cfg() -> NicConfig {
    NicConfig {
        mac: SERVER_MAC,
        ip: SERVER_IP,
        prefix_len: 24,
        gateway: None,
        mtu: 1500,
    }
}

/// A TCP segment the stack emitted, parsed into owned fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seg {
    pub eth_dst: [u8; 6],
    pub ip_dst: [u8; 4],
    pub src_port: u16,
    pub dst_port: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    pub mss: Option<u16>,
    pub wscale: Option<u8>,
    pub sack_permitted: bool,
    pub sack: Vec<(u32, u32)>,
    pub payload: Vec<u8>,
}

impl Seg {
    pub fn has(&self, f: u8) -> bool {
        self.flags & f != 0
    }
}

/// Parses a frame the stack emitted as TCP, checking every checksum on the way.
pub fn parse_seg(frame: &[u8]) -> Option<Seg> {
    let eth = wire::parse_eth(frame).ok()?;
    if eth.ethertype != wire::ETHERTYPE_IPV4 {
        return None;
    }
    let ip = wire::parse_ipv4(eth.payload).ok()?;
    if ip.proto != wire::IPPROTO_TCP {
        return None;
    }
    assert_eq!(ip.src, SERVER_IP);
    assert_eq!(ip.ttl, 64);
    let t = wire::parse_tcp(ip.src, ip.dst, ip.payload)
        .expect("the stack emitted a TCP segment that does not parse");
    Some(Seg {
        eth_dst: eth.dst,
        ip_dst: ip.dst,
        src_port: t.src_port,
        dst_port: t.dst_port,
        seq: t.seq,
        ack: t.ack,
        flags: t.flags,
        window: t.window,
        mss: t.mss,
        wscale: t.wscale,
        sack_permitted: t.sack_permitted,
        sack: t.sack.as_slice().to_vec(),
        payload: t.payload.to_vec(),
    })
}

/// Drains the stack's outbox and parses every frame as TCP (panics on non-TCP frames).
pub fn drain_segs(s: &mut NetStack) -> Vec<Seg> {
    let frames: Vec<Vec<u8>> = s.drain_frames().collect();
    frames
        .iter()
        .map(|f| parse_seg(f).expect("expected only TCP frames"))
        .collect()
}

/// A hand-driven TCP client: builds segments, tracks its sequence numbers.
pub struct Peer {
    pub mac: [u8; 6],
    pub ip: [u8; 4],
    pub port: u16,
    pub server_port: u16,
    /// Next sequence number we send.
    pub seq: u32,
    /// Next sequence number we expect from the server (what we acknowledge).
    pub ack: u32,
    pub ident: u16,
    /// Offer SACK in our SYN.
    pub sack_permitted: bool,
}

impl Peer {
    pub fn new(port: u16, server_port: u16) -> Self {
        Peer {
            mac: CLIENT_MAC,
            ip: CLIENT_IP,
            port,
            server_port,
            seq: 1_000_000,
            ack: 0,
            ident: 0,
            sack_permitted: false,
        }
    }

    pub fn frame(&mut self, flags: u8, seq: u32, ack: u32, window: u16, payload: &[u8]) -> Vec<u8> {
        self.frame_opts(flags, seq, ack, window, None, None, payload)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn frame_opts(
        &mut self,
        flags: u8,
        seq: u32,
        ack: u32,
        window: u16,
        mss: Option<u16>,
        wscale: Option<u8>,
        payload: &[u8],
    ) -> Vec<u8> {
        self.ident = self.ident.wrapping_add(1);
        let r = Ipv4Route {
            eth_dst: SERVER_MAC,
            eth_src: self.mac,
            ip_src: self.ip,
            ip_dst: SERVER_IP,
            ident: self.ident,
        };
        let h = TcpHeader {
            src_port: self.port,
            dst_port: self.server_port,
            seq,
            ack,
            flags,
            window,
            mss,
            wscale,
            sack_permitted: self.sack_permitted && flags & tcp_flags::SYN != 0,
            ..Default::default()
        };
        wire::build_tcp_frame(&r, &h, payload)
    }

    pub fn syn(&mut self, mss: Option<u16>, wscale: Option<u8>) -> Vec<u8> {
        self.frame_opts(tcp_flags::SYN, self.seq, 0, 65535, mss, wscale, b"")
    }

    /// A segment at our current sequence number carrying `payload` (advances `seq`).
    pub fn data(&mut self, payload: &[u8], window: u16) -> Vec<u8> {
        let f = self.frame(
            tcp_flags::ACK | tcp_flags::PSH,
            self.seq,
            self.ack,
            window,
            payload,
        );
        self.seq = self.seq.wrapping_add(payload.len() as u32);
        f
    }

    pub fn ack_with_window(&mut self, window: u16) -> Vec<u8> {
        self.frame(tcp_flags::ACK, self.seq, self.ack, window, b"")
    }

    pub fn fin(&mut self, window: u16) -> Vec<u8> {
        let f = self.frame(
            tcp_flags::ACK | tcp_flags::FIN,
            self.seq,
            self.ack,
            window,
            b"",
        );
        self.seq = self.seq.wrapping_add(1);
        f
    }
}

/// Listens on `port`, runs a handshake for `peer` (SYN with MSS 1460 and window scale 0 unless
/// given), and accepts. Returns the socket and the SYN-ACK.
pub fn connect(
    s: &mut NetStack,
    l: crate::ListenerId,
    peer: &mut Peer,
    mss: Option<u16>,
    wscale: Option<u8>,
    now: u64,
) -> (crate::SocketId, Seg) {
    let syn = peer.syn(mss, wscale);
    s.receive_frame(&syn, now);
    let out = drain_segs(s);
    assert_eq!(out.len(), 1, "expected exactly a SYN-ACK, got {out:?}");
    let sa = out[0].clone();
    assert!(sa.has(tcp_flags::SYN) && sa.has(tcp_flags::ACK));
    assert_eq!(sa.ack, peer.seq.wrapping_add(1));
    peer.seq = peer.seq.wrapping_add(1);
    peer.ack = sa.seq.wrapping_add(1);
    let ack = peer.ack_with_window(65535);
    s.receive_frame(&ack, now);
    assert!(
        drain_segs(s).is_empty(),
        "the final handshake ACK needs no answer"
    );
    let sock = s
        .accept(l)
        .expect("an established connection is acceptable");
    (sock, sa)
}
