//! Stateless parsing and emitting of Ethernet II, ARP, IPv4, ICMP echo and TCP.
//!
//! Written here rather than borrowed so that every byte the replicated stack looks at is under our
//! control: every parser checks lengths before it indexes and verifies checksums, and returns a
//! [`WireError`] instead of panicking. The emitters always produce well-formed frames with correct
//! checksums.

use std::fmt;

/// Length of an Ethernet II header (no VLAN tag).
pub const ETH_HDR_LEN: usize = 14;
/// EtherType of IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// EtherType of ARP.
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// Length of an ARP packet for Ethernet/IPv4.
pub const ARP_LEN: usize = 28;
/// Length of an IPv4 header without options (we never emit options).
pub const IPV4_HDR_LEN: usize = 20;
/// Length of a TCP header without options.
pub const TCP_HDR_LEN: usize = 20;
/// Length of the ICMP echo header.
pub const ICMP_ECHO_HDR_LEN: usize = 8;
/// IP protocol number of ICMP.
pub const IPPROTO_ICMP: u8 = 1;
/// IP protocol number of TCP.
pub const IPPROTO_TCP: u8 = 6;
/// TTL of every IPv4 packet we emit.
pub const IPV4_TTL: u8 = 64;
/// The Ethernet broadcast address.
pub const MAC_BROADCAST: [u8; 6] = [0xff; 6];

/// TCP flag bits.
pub mod tcp_flags {
    /// No more data from sender.
    pub const FIN: u8 = 0x01;
    /// Synchronize sequence numbers.
    pub const SYN: u8 = 0x02;
    /// Reset the connection.
    pub const RST: u8 = 0x04;
    /// Push function.
    pub const PSH: u8 = 0x08;
    /// Acknowledgment field is significant.
    pub const ACK: u8 = 0x10;
    /// Urgent pointer is significant (we treat urgent data as ordinary data).
    pub const URG: u8 = 0x20;
}

/// Why a frame could not be parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireError {
    /// The buffer is shorter than the header or than a length field says.
    Truncated,
    /// A field has a value we do not accept (version, header length, ARP types, ...).
    Malformed,
    /// The checksum does not verify.
    BadChecksum,
    /// An IPv4 fragment (we do not reassemble).
    Fragment,
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            WireError::Truncated => "truncated",
            WireError::Malformed => "malformed",
            WireError::BadChecksum => "bad checksum",
            WireError::Fragment => "IPv4 fragment",
        };
        f.write_str(s)
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn mac_at(b: &[u8], at: usize) -> [u8; 6] {
    let mut m = [0u8; 6];
    m.copy_from_slice(&b[at..at + 6]);
    m
}

fn ip_at(b: &[u8], at: usize) -> [u8; 4] {
    let mut m = [0u8; 4];
    m.copy_from_slice(&b[at..at + 4]);
    m
}

// ---------------------------------------------------------------------------------------------
// Checksums (RFC 1071)
// ---------------------------------------------------------------------------------------------

/// Adds `data` to a running one's-complement sum (not yet folded).
pub fn checksum_add(mut sum: u64, data: &[u8]) -> u64 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u64::from(u16::from_be_bytes([*last, 0]));
    }
    sum
}

/// Folds a running sum into the final 16-bit one's-complement checksum.
pub fn checksum_fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn pseudo_header_sum(src: [u8; 4], dst: [u8; 4], proto: u8, len: usize) -> u64 {
    let mut sum = checksum_add(0, &src);
    sum = checksum_add(sum, &dst);
    sum += u64::from(proto);
    sum += len as u64;
    sum
}

// ---------------------------------------------------------------------------------------------
// Ethernet
// ---------------------------------------------------------------------------------------------

/// A parsed Ethernet II frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EthFrame<'a> {
    /// Destination MAC.
    pub dst: [u8; 6],
    /// Source MAC.
    pub src: [u8; 6],
    /// EtherType.
    pub ethertype: u16,
    /// Everything after the header (may include padding).
    pub payload: &'a [u8],
}

/// Parses an Ethernet II header.
pub fn parse_eth(frame: &[u8]) -> Result<EthFrame<'_>, WireError> {
    if frame.len() < ETH_HDR_LEN {
        return Err(WireError::Truncated);
    }
    Ok(EthFrame {
        dst: mac_at(frame, 0),
        src: mac_at(frame, 6),
        ethertype: be16(frame, 12),
        payload: &frame[ETH_HDR_LEN..],
    })
}

fn push_eth(out: &mut Vec<u8>, dst: [u8; 6], src: [u8; 6], ethertype: u16) {
    out.extend_from_slice(&dst);
    out.extend_from_slice(&src);
    out.extend_from_slice(&ethertype.to_be_bytes());
}

/// True for a group (multicast or broadcast) MAC address.
pub fn mac_is_group(mac: [u8; 6]) -> bool {
    mac[0] & 1 == 1
}

// ---------------------------------------------------------------------------------------------
// ARP (RFC 826)
// ---------------------------------------------------------------------------------------------

/// ARP operation: request.
pub const ARP_REQUEST: u16 = 1;
/// ARP operation: reply.
pub const ARP_REPLY: u16 = 2;

/// An ARP packet for Ethernet/IPv4.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArpPacket {
    /// [`ARP_REQUEST`] or [`ARP_REPLY`].
    pub oper: u16,
    /// Sender hardware address.
    pub sha: [u8; 6],
    /// Sender protocol address.
    pub spa: [u8; 4],
    /// Target hardware address.
    pub tha: [u8; 6],
    /// Target protocol address.
    pub tpa: [u8; 4],
}

/// Parses an ARP packet (Ethernet/IPv4 only).
pub fn parse_arp(b: &[u8]) -> Result<ArpPacket, WireError> {
    if b.len() < ARP_LEN {
        return Err(WireError::Truncated);
    }
    let (htype, ptype, hlen, plen, oper) = (be16(b, 0), be16(b, 2), b[4], b[5], be16(b, 6));
    if htype != 1 || ptype != ETHERTYPE_IPV4 || hlen != 6 || plen != 4 {
        return Err(WireError::Malformed);
    }
    if oper != ARP_REQUEST && oper != ARP_REPLY {
        return Err(WireError::Malformed);
    }
    Ok(ArpPacket {
        oper,
        sha: mac_at(b, 8),
        spa: ip_at(b, 14),
        tha: mac_at(b, 18),
        tpa: ip_at(b, 24),
    })
}

/// Builds a complete Ethernet frame carrying `arp`.
pub fn build_arp_frame(eth_dst: [u8; 6], eth_src: [u8; 6], arp: &ArpPacket) -> Vec<u8> {
    let mut out = Vec::with_capacity(ETH_HDR_LEN + ARP_LEN);
    push_eth(&mut out, eth_dst, eth_src, ETHERTYPE_ARP);
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    out.push(6);
    out.push(4);
    out.extend_from_slice(&arp.oper.to_be_bytes());
    out.extend_from_slice(&arp.sha);
    out.extend_from_slice(&arp.spa);
    out.extend_from_slice(&arp.tha);
    out.extend_from_slice(&arp.tpa);
    out
}

// ---------------------------------------------------------------------------------------------
// IPv4 (RFC 791)
// ---------------------------------------------------------------------------------------------

/// A parsed, checksum-verified, unfragmented IPv4 packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Packet<'a> {
    /// Source address.
    pub src: [u8; 4],
    /// Destination address.
    pub dst: [u8; 4],
    /// Protocol number.
    pub proto: u8,
    /// Time to live.
    pub ttl: u8,
    /// Identification field.
    pub ident: u16,
    /// Payload, cut at the header's total length (Ethernet padding removed).
    pub payload: &'a [u8],
}

/// Parses an IPv4 packet, verifying its header checksum. Fragments are rejected with
/// [`WireError::Fragment`]. IP options are skipped.
pub fn parse_ipv4(b: &[u8]) -> Result<Ipv4Packet<'_>, WireError> {
    if b.len() < IPV4_HDR_LEN {
        return Err(WireError::Truncated);
    }
    let version = b[0] >> 4;
    let ihl = usize::from(b[0] & 0x0f) * 4;
    if version != 4 || ihl < IPV4_HDR_LEN {
        return Err(WireError::Malformed);
    }
    let total_len = usize::from(be16(b, 2));
    if total_len < ihl {
        return Err(WireError::Malformed);
    }
    if b.len() < total_len || b.len() < ihl {
        return Err(WireError::Truncated);
    }
    if checksum_fold(checksum_add(0, &b[..ihl])) != 0 {
        return Err(WireError::BadChecksum);
    }
    let flags_frag = be16(b, 6);
    let more_fragments = flags_frag & 0x2000 != 0;
    let frag_offset = flags_frag & 0x1fff;
    if more_fragments || frag_offset != 0 {
        return Err(WireError::Fragment);
    }
    Ok(Ipv4Packet {
        src: ip_at(b, 12),
        dst: ip_at(b, 16),
        proto: b[9],
        ttl: b[8],
        ident: be16(b, 4),
        payload: &b[ihl..total_len],
    })
}

fn push_ipv4(
    out: &mut Vec<u8>,
    src: [u8; 4],
    dst: [u8; 4],
    proto: u8,
    ident: u16,
    payload_len: usize,
) {
    let start = out.len();
    let total = (IPV4_HDR_LEN + payload_len) as u16;
    out.push(0x45);
    out.push(0);
    out.extend_from_slice(&total.to_be_bytes());
    out.extend_from_slice(&ident.to_be_bytes());
    out.extend_from_slice(&0x4000u16.to_be_bytes()); // DF: we never fragment.
    out.push(IPV4_TTL);
    out.push(proto);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&src);
    out.extend_from_slice(&dst);
    let csum = checksum_fold(checksum_add(0, &out[start..start + IPV4_HDR_LEN]));
    out[start + 10..start + 12].copy_from_slice(&csum.to_be_bytes());
}

// ---------------------------------------------------------------------------------------------
// ICMP echo (RFC 792)
// ---------------------------------------------------------------------------------------------

/// A parsed ICMP echo request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcmpEcho<'a> {
    /// Identifier.
    pub ident: u16,
    /// Sequence number.
    pub seq: u16,
    /// Data to echo back.
    pub data: &'a [u8],
}

/// Parses an ICMP message and returns it if it is a valid echo request (type 8, code 0).
/// Returns `Ok(None)` for other valid ICMP messages.
pub fn parse_icmp_echo_request(b: &[u8]) -> Result<Option<IcmpEcho<'_>>, WireError> {
    if b.len() < ICMP_ECHO_HDR_LEN {
        return Err(WireError::Truncated);
    }
    if checksum_fold(checksum_add(0, b)) != 0 {
        return Err(WireError::BadChecksum);
    }
    if b[0] != 8 || b[1] != 0 {
        return Ok(None);
    }
    Ok(Some(IcmpEcho {
        ident: be16(b, 4),
        seq: be16(b, 6),
        data: &b[ICMP_ECHO_HDR_LEN..],
    }))
}

/// Addresses of one emitted IPv4 packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Route {
    /// Destination MAC (next hop).
    pub eth_dst: [u8; 6],
    /// Source MAC.
    pub eth_src: [u8; 6],
    /// Source IP.
    pub ip_src: [u8; 4],
    /// Destination IP.
    pub ip_dst: [u8; 4],
    /// IPv4 identification.
    pub ident: u16,
}

/// Builds an ICMP echo message (type 0 = reply, 8 = request) in a complete Ethernet frame.
pub fn build_icmp_echo_frame(
    r: &Ipv4Route,
    icmp_type: u8,
    ident: u16,
    seq: u16,
    data: &[u8],
) -> Vec<u8> {
    let icmp_len = ICMP_ECHO_HDR_LEN + data.len();
    let mut out = Vec::with_capacity(ETH_HDR_LEN + IPV4_HDR_LEN + icmp_len);
    push_eth(&mut out, r.eth_dst, r.eth_src, ETHERTYPE_IPV4);
    push_ipv4(
        &mut out,
        r.ip_src,
        r.ip_dst,
        IPPROTO_ICMP,
        r.ident,
        icmp_len,
    );
    let start = out.len();
    out.push(icmp_type);
    out.push(0);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&ident.to_be_bytes());
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(data);
    let csum = checksum_fold(checksum_add(0, &out[start..]));
    out[start + 2..start + 4].copy_from_slice(&csum.to_be_bytes());
    out
}

// ---------------------------------------------------------------------------------------------
// TCP (RFC 9293, options from RFC 7323)
// ---------------------------------------------------------------------------------------------

/// A parsed, checksum-verified TCP segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpSegment<'a> {
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgment number (meaningful only with ACK).
    pub ack: u32,
    /// Flag bits, see [`tcp_flags`].
    pub flags: u8,
    /// Window field, unscaled.
    pub window: u16,
    /// MSS option, if present.
    pub mss: Option<u16>,
    /// Window scale option (shift count), if present.
    pub wscale: Option<u8>,
    /// SACK-permitted option (RFC 2018), meaningful on a SYN.
    pub sack_permitted: bool,
    /// SACK blocks (RFC 2018), if present.
    pub sack: SackBlocks,
    /// Payload.
    pub payload: &'a [u8],
}

/// Most SACK blocks one segment carries: with no timestamps, 4 blocks (2 + 4 * 8 bytes, plus
/// two NOPs for alignment) fit in the 40 bytes of TCP options.
pub const TCP_SACK_BLOCKS_MAX: usize = 4;
/// Bytes of TCP options a header can carry.
const TCP_OPTIONS_MAX: usize = 40;

/// Up to [`TCP_SACK_BLOCKS_MAX`] SACK blocks `[left, right)` in sequence space.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SackBlocks {
    len: u8,
    blocks: [(u32, u32); TCP_SACK_BLOCKS_MAX],
}

impl SackBlocks {
    /// Adds a block; false (and nothing added) when full.
    pub fn push(&mut self, left: u32, right: u32) -> bool {
        let i = usize::from(self.len);
        if i == TCP_SACK_BLOCKS_MAX {
            return false;
        }
        self.blocks[i] = (left, right);
        self.len += 1;
        true
    }
    /// The blocks, in the order they were added (first is the most recent, RFC 2018 4).
    pub fn as_slice(&self) -> &[(u32, u32)] {
        &self.blocks[..usize::from(self.len)]
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Bytes the blocks take in a header, alignment included (0 for none).
    pub fn option_bytes(&self) -> usize {
        if self.len == 0 {
            0
        } else {
            4 + 8 * usize::from(self.len)
        }
    }
    fn truncate(&mut self, n: usize) {
        self.len = self.len.min(n as u8);
    }
}

impl TcpSegment<'_> {
    /// True if flag `f` is set.
    pub fn has(&self, f: u8) -> bool {
        self.flags & f != 0
    }

    /// Sequence space the segment occupies: payload plus one for SYN and one for FIN.
    pub fn seq_len(&self) -> u32 {
        self.payload.len() as u32
            + u32::from(self.has(tcp_flags::SYN))
            + u32::from(self.has(tcp_flags::FIN))
    }
}

/// Parses a TCP segment carried from `src` to `dst`, verifying its checksum. Unknown or garbled
/// options end option parsing; they do not reject the segment.
pub fn parse_tcp(src: [u8; 4], dst: [u8; 4], b: &[u8]) -> Result<TcpSegment<'_>, WireError> {
    if b.len() < TCP_HDR_LEN {
        return Err(WireError::Truncated);
    }
    let data_off = usize::from(b[12] >> 4) * 4;
    if data_off < TCP_HDR_LEN {
        return Err(WireError::Malformed);
    }
    if data_off > b.len() {
        return Err(WireError::Truncated);
    }
    let sum = checksum_add(pseudo_header_sum(src, dst, IPPROTO_TCP, b.len()), b);
    if checksum_fold(sum) != 0 {
        return Err(WireError::BadChecksum);
    }
    let (mut mss, mut wscale) = (None, None);
    let (mut sack_permitted, mut sack) = (false, SackBlocks::default());
    let opts = &b[TCP_HDR_LEN..data_off];
    let mut i = 0;
    while i < opts.len() {
        match opts[i] {
            0 => break,
            1 => i += 1,
            kind => {
                let Some(&len) = opts.get(i + 1) else { break };
                let len = usize::from(len);
                if len < 2 || i + len > opts.len() {
                    break;
                }
                match (kind, len) {
                    (2, 4) => mss = Some(be16(opts, i + 2)),
                    (3, 3) => wscale = Some(opts[i + 2]),
                    (4, 2) => sack_permitted = true,
                    (5, l) if l >= 10 && (l - 2) % 8 == 0 => {
                        for b in opts[i + 2..i + l].chunks_exact(8) {
                            sack.push(be32(b, 0), be32(b, 4));
                        }
                    }
                    _ => {}
                }
                i += len;
            }
        }
    }
    Ok(TcpSegment {
        src_port: be16(b, 0),
        dst_port: be16(b, 2),
        seq: be32(b, 4),
        ack: be32(b, 8),
        flags: b[13] & 0x3f,
        window: be16(b, 14),
        mss,
        wscale,
        sack_permitted,
        sack,
        payload: &b[data_off..],
    })
}

/// The header fields of a TCP segment to emit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpHeader {
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgment number (sent as 0 unless ACK is in `flags`).
    pub ack: u32,
    /// Flag bits.
    pub flags: u8,
    /// Window field (already scaled down).
    pub window: u16,
    /// MSS option to include.
    pub mss: Option<u16>,
    /// Window scale option to include.
    pub wscale: Option<u8>,
    /// SACK-permitted option to include (on a SYN).
    pub sack_permitted: bool,
    /// SACK blocks to include; the ones that do not fit beside the other options are left out.
    pub sack: SackBlocks,
}

/// Builds a complete Ethernet frame carrying one TCP segment.
pub fn build_tcp_frame(r: &Ipv4Route, h: &TcpHeader, payload: &[u8]) -> Vec<u8> {
    let mut opt_len = 0;
    if h.mss.is_some() {
        opt_len += 4;
    }
    if h.wscale.is_some() {
        opt_len += 4; // NOP + 3-byte option keeps the header 32-bit aligned.
    }
    if h.sack_permitted {
        opt_len += 4; // NOP NOP + 2-byte option.
    }
    let mut sack = h.sack;
    sack.truncate(TCP_OPTIONS_MAX.saturating_sub(opt_len + 4) / 8);
    opt_len += sack.option_bytes(); // NOP NOP + kind, length, blocks.
    let tcp_len = TCP_HDR_LEN + opt_len + payload.len();
    let mut out = Vec::with_capacity(ETH_HDR_LEN + IPV4_HDR_LEN + tcp_len);
    push_eth(&mut out, r.eth_dst, r.eth_src, ETHERTYPE_IPV4);
    push_ipv4(&mut out, r.ip_src, r.ip_dst, IPPROTO_TCP, r.ident, tcp_len);
    let start = out.len();
    out.extend_from_slice(&h.src_port.to_be_bytes());
    out.extend_from_slice(&h.dst_port.to_be_bytes());
    out.extend_from_slice(&h.seq.to_be_bytes());
    let ack = if h.flags & tcp_flags::ACK != 0 {
        h.ack
    } else {
        0
    };
    out.extend_from_slice(&ack.to_be_bytes());
    out.push((((TCP_HDR_LEN + opt_len) / 4) as u8) << 4);
    out.push(h.flags);
    out.extend_from_slice(&h.window.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    if let Some(mss) = h.mss {
        out.extend_from_slice(&[2, 4]);
        out.extend_from_slice(&mss.to_be_bytes());
    }
    if let Some(ws) = h.wscale {
        out.extend_from_slice(&[1, 3, 3, ws]);
    }
    if h.sack_permitted {
        out.extend_from_slice(&[1, 1, 4, 2]);
    }
    if !sack.is_empty() {
        out.extend_from_slice(&[1, 1, 5, (2 + 8 * sack.as_slice().len()) as u8]);
        for (left, right) in sack.as_slice() {
            out.extend_from_slice(&left.to_be_bytes());
            out.extend_from_slice(&right.to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
    let sum = checksum_add(
        pseudo_header_sum(r.ip_src, r.ip_dst, IPPROTO_TCP, tcp_len),
        &out[start..],
    );
    let csum = checksum_fold(sum);
    out[start + 16..start + 18].copy_from_slice(&csum.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const B: [u8; 6] = [2, 0, 0, 0, 0, 2];

    fn route() -> Ipv4Route {
        Ipv4Route {
            eth_dst: B,
            eth_src: A,
            ip_src: [10, 0, 0, 1],
            ip_dst: [10, 0, 0, 2],
            ident: 7,
        }
    }

    #[test]
    fn checksum_matches_rfc1071_example() {
        // RFC 1071 section 3 example: the sum of these words is 0xddf2, checksum is its complement.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum_fold(checksum_add(0, &data)), !0xddf2);
        // Odd length pads with a zero byte.
        assert_eq!(checksum_fold(checksum_add(0, &[0xff])), !0xff00);
    }

    #[test]
    fn sack_options_round_trip_and_fit_in_forty_bytes() {
        let mut sack = SackBlocks::default();
        for i in 0..TCP_SACK_BLOCKS_MAX as u32 {
            assert!(sack.push(1000 * i, 1000 * i + 500));
        }
        assert!(!sack.push(1, 2), "a fifth block does not fit");
        let h = TcpHeader {
            flags: tcp_flags::ACK,
            sack,
            ..Default::default()
        };
        let f = build_tcp_frame(&route(), &h, b"x");
        let ip = parse_ipv4(parse_eth(&f).unwrap().payload).unwrap();
        let t = parse_tcp(ip.src, ip.dst, ip.payload).unwrap();
        assert_eq!(t.sack, sack);
        assert_eq!(t.payload, b"x");
        // Beside MSS and window scale only three blocks fit; SACK-permitted round-trips.
        let h = TcpHeader {
            flags: tcp_flags::SYN,
            mss: Some(1460),
            wscale: Some(3),
            sack_permitted: true,
            sack,
            ..Default::default()
        };
        let f = build_tcp_frame(&route(), &h, b"");
        let ip = parse_ipv4(parse_eth(&f).unwrap().payload).unwrap();
        let t = parse_tcp(ip.src, ip.dst, ip.payload).unwrap();
        assert!(t.sack_permitted);
        assert_eq!((t.mss, t.wscale), (Some(1460), Some(3)));
        assert_eq!(t.sack.as_slice(), &sack.as_slice()[..3]);
        assert!(usize::from(ip.payload[12] >> 4) * 4 <= TCP_HDR_LEN + TCP_OPTIONS_MAX);
    }

    #[test]
    fn tcp_round_trip_with_options() {
        let h = TcpHeader {
            src_port: 80,
            dst_port: 40000,
            seq: 0xdead_beef,
            ack: 0x0102_0304,
            flags: tcp_flags::SYN | tcp_flags::ACK,
            window: 1234,
            mss: Some(1460),
            wscale: Some(7),
            ..Default::default()
        };
        let f = build_tcp_frame(&route(), &h, b"hello");
        let eth = parse_eth(&f).unwrap();
        assert_eq!((eth.dst, eth.src, eth.ethertype), (B, A, ETHERTYPE_IPV4));
        let ip = parse_ipv4(eth.payload).unwrap();
        assert_eq!(
            (ip.src, ip.dst, ip.proto, ip.ttl, ip.ident),
            ([10, 0, 0, 1], [10, 0, 0, 2], 6, 64, 7)
        );
        let t = parse_tcp(ip.src, ip.dst, ip.payload).unwrap();
        assert_eq!(
            (t.src_port, t.dst_port, t.seq, t.ack, t.window),
            (80, 40000, 0xdead_beef, 0x0102_0304, 1234)
        );
        assert_eq!(
            (t.mss, t.wscale, t.payload),
            (Some(1460), Some(7), &b"hello"[..])
        );
        assert!(t.has(tcp_flags::SYN) && t.has(tcp_flags::ACK) && !t.has(tcp_flags::FIN));
        assert_eq!(t.seq_len(), 6);
    }

    #[test]
    fn tcp_checksum_and_lengths_are_checked() {
        let h = TcpHeader {
            src_port: 1,
            dst_port: 2,
            seq: 3,
            ack: 4,
            flags: tcp_flags::ACK,
            window: 5,
            mss: None,
            wscale: None,
            ..Default::default()
        };
        let mut f = build_tcp_frame(&route(), &h, b"data");
        let n = f.len();
        f[n - 1] ^= 0x40;
        let ip = parse_ipv4(&f[ETH_HDR_LEN..]).unwrap();
        assert_eq!(
            parse_tcp(ip.src, ip.dst, ip.payload),
            Err(WireError::BadChecksum)
        );
        // Wrong pseudo header (different destination) also fails.
        f[n - 1] ^= 0x40;
        let ip = parse_ipv4(&f[ETH_HDR_LEN..]).unwrap();
        assert!(parse_tcp(ip.src, [10, 0, 0, 9], ip.payload).is_err());
        assert_eq!(
            parse_tcp(ip.src, ip.dst, &ip.payload[..10]),
            Err(WireError::Truncated)
        );
        // Data offset below 5 words.
        let mut bad = ip.payload.to_vec();
        bad[12] = 0x40;
        assert_eq!(parse_tcp(ip.src, ip.dst, &bad), Err(WireError::Malformed));
    }

    #[test]
    fn tcp_garbage_options_do_not_reject() {
        // Header with 8 bytes of options: kind 9 with length 0 (garbage), rest ignored.
        let h = TcpHeader {
            src_port: 1,
            dst_port: 2,
            seq: 3,
            ack: 0,
            flags: tcp_flags::SYN,
            window: 5,
            mss: Some(1000),
            wscale: Some(2),
            ..Default::default()
        };
        let f = build_tcp_frame(&route(), &h, b"");
        let mut seg = f[ETH_HDR_LEN + IPV4_HDR_LEN..].to_vec();
        seg[20] = 9;
        seg[21] = 0;
        seg[16] = 0;
        seg[17] = 0;
        let sum = checksum_add(
            pseudo_header_sum([10, 0, 0, 1], [10, 0, 0, 2], IPPROTO_TCP, seg.len()),
            &seg,
        );
        let c = checksum_fold(sum);
        seg[16..18].copy_from_slice(&c.to_be_bytes());
        let t = parse_tcp([10, 0, 0, 1], [10, 0, 0, 2], &seg).unwrap();
        assert_eq!((t.mss, t.wscale), (None, None));
    }

    #[test]
    fn ipv4_rejects_fragments_bad_checksum_and_truncation() {
        let h = TcpHeader {
            src_port: 1,
            dst_port: 2,
            seq: 3,
            ack: 0,
            flags: 0,
            window: 0,
            mss: None,
            wscale: None,
            ..Default::default()
        };
        let f = build_tcp_frame(&route(), &h, b"");
        let ip = &f[ETH_HDR_LEN..];
        assert!(parse_ipv4(ip).is_ok());
        let mut bad = ip.to_vec();
        bad[8] = 1; // TTL changed without fixing the checksum
        assert_eq!(parse_ipv4(&bad), Err(WireError::BadChecksum));
        let mut frag = ip.to_vec();
        frag[6] = 0x20; // MF
        frag[10] = 0;
        frag[11] = 0;
        let c = checksum_fold(checksum_add(0, &frag[..20]));
        frag[10..12].copy_from_slice(&c.to_be_bytes());
        assert_eq!(parse_ipv4(&frag), Err(WireError::Fragment));
        assert_eq!(parse_ipv4(&ip[..19]), Err(WireError::Truncated));
        assert_eq!(parse_ipv4(&ip[..30]), Err(WireError::Truncated)); // total length says 40
        let mut v6 = ip.to_vec();
        v6[0] = 0x65;
        assert_eq!(parse_ipv4(&v6), Err(WireError::Malformed));
        // Ethernet padding beyond the total length is cut off.
        let mut padded = ip.to_vec();
        padded.extend_from_slice(&[0u8; 6]);
        assert_eq!(parse_ipv4(&padded).unwrap().payload.len(), TCP_HDR_LEN);
    }

    #[test]
    fn arp_and_icmp_round_trip() {
        let arp = ArpPacket {
            oper: ARP_REQUEST,
            sha: A,
            spa: [1, 2, 3, 4],
            tha: [0; 6],
            tpa: [5, 6, 7, 8],
        };
        let f = build_arp_frame(MAC_BROADCAST, A, &arp);
        let eth = parse_eth(&f).unwrap();
        assert_eq!(eth.ethertype, ETHERTYPE_ARP);
        assert_eq!(parse_arp(eth.payload).unwrap(), arp);
        let mut bad = eth.payload.to_vec();
        bad[7] = 9;
        assert_eq!(parse_arp(&bad), Err(WireError::Malformed));
        assert_eq!(parse_arp(&eth.payload[..27]), Err(WireError::Truncated));

        let f = build_icmp_echo_frame(&route(), 8, 0x1234, 9, b"ping!");
        let ip = parse_ipv4(&f[ETH_HDR_LEN..]).unwrap();
        let e = parse_icmp_echo_request(ip.payload).unwrap().unwrap();
        assert_eq!((e.ident, e.seq, e.data), (0x1234, 9, &b"ping!"[..]));
        let reply = build_icmp_echo_frame(&route(), 0, 1, 2, b"x");
        let ip = parse_ipv4(&reply[ETH_HDR_LEN..]).unwrap();
        assert_eq!(parse_icmp_echo_request(ip.payload), Ok(None));
        let mut corrupt = ip.payload.to_vec();
        corrupt[8] ^= 1;
        assert_eq!(
            parse_icmp_echo_request(&corrupt),
            Err(WireError::BadChecksum)
        );
    }
}
