//! Behavior tests with hand-made segments: each one drives one protocol rule and checks the
//! exact frames that come out.

use super::*;
use crate::wire::{tcp_flags::*, ArpPacket};
use crate::*;

fn stack() -> NetStack {
    NetStack::new(cfg(), 42)
}

#[test]
fn arp_request_for_our_ip_is_answered_and_sender_learned() {
    let mut s = stack();
    let req = ArpPacket {
        oper: wire::ARP_REQUEST,
        sha: CLIENT_MAC,
        spa: CLIENT_IP,
        tha: [0; 6],
        tpa: SERVER_IP,
    };
    s.receive_frame(
        &wire::build_arp_frame(wire::MAC_BROADCAST, CLIENT_MAC, &req),
        0,
    );
    let out: Vec<Vec<u8>> = s.drain_frames().collect();
    assert_eq!(out.len(), 1);
    let eth = wire::parse_eth(&out[0]).unwrap();
    assert_eq!(
        (eth.dst, eth.src, eth.ethertype),
        (CLIENT_MAC, SERVER_MAC, wire::ETHERTYPE_ARP)
    );
    let rep = wire::parse_arp(eth.payload).unwrap();
    assert_eq!(
        rep,
        ArpPacket {
            oper: wire::ARP_REPLY,
            sha: SERVER_MAC,
            spa: SERVER_IP,
            tha: CLIENT_MAC,
            tpa: CLIENT_IP
        }
    );
    assert_eq!(s.stats().arp_replies, 1);

    // A request for another address gets no answer.
    let other = ArpPacket {
        tpa: [198, 18, 0, 99],
        ..req
    };
    s.receive_frame(
        &wire::build_arp_frame(wire::MAC_BROADCAST, CLIENT_MAC, &other),
        0,
    );
    assert_eq!(s.drain_frames().count(), 0);

    // The learned MAC is used for an ICMP reply (no ARP request needed).
    let r = Ipv4Route {
        eth_dst: SERVER_MAC,
        eth_src: CLIENT_MAC,
        ip_src: CLIENT_IP,
        ip_dst: SERVER_IP,
        ident: 1,
    };
    s.receive_frame(&wire::build_icmp_echo_frame(&r, 8, 1, 1, b"x"), 0);
    let out: Vec<Vec<u8>> = s.drain_frames().collect();
    assert_eq!(out.len(), 1);
    assert_eq!(wire::parse_eth(&out[0]).unwrap().dst, CLIENT_MAC);
}

#[test]
fn announce_sends_gratuitous_arps_again_with_growing_gaps() {
    let mut s = stack();
    let t0 = 5_000_000_000;
    s.announce();
    assert_eq!(s.drain_frames().count(), GRATUITOUS_ARP_COUNT);
    s.poll(t0);
    let mut at = t0;
    let mut gap = ANNOUNCE_REPEAT_FIRST_NS;
    for repeat in 0..ANNOUNCE_REPEATS {
        assert_eq!(s.next_deadline_ns(), Some(at + gap), "repeat {repeat}");
        s.poll(at + gap - 1);
        assert_eq!(s.drain_frames().count(), 0, "not before its time");
        at += gap;
        s.poll(at);
        let out: Vec<Vec<u8>> = s.drain_frames().collect();
        assert_eq!(out.len(), 1, "repeat {repeat}");
        let eth = wire::parse_eth(&out[0]).unwrap();
        assert_eq!((eth.dst, eth.src), (wire::MAC_BROADCAST, SERVER_MAC));
        assert_eq!(wire::parse_arp(eth.payload).unwrap().spa, SERVER_IP);
        gap *= 2;
    }
    assert_eq!(s.next_deadline_ns(), None, "no more after the last");
    s.poll(at + 100 * gap);
    assert_eq!(s.drain_frames().count(), 0);
}

#[test]
fn announce_queues_three_gratuitous_arps() {
    let mut s = stack();
    s.announce();
    let out: Vec<Vec<u8>> = s.drain_frames().collect();
    assert_eq!(out.len(), GRATUITOUS_ARP_COUNT);
    for f in &out {
        let eth = wire::parse_eth(f).unwrap();
        assert_eq!((eth.dst, eth.src), (wire::MAC_BROADCAST, SERVER_MAC));
        let a = wire::parse_arp(eth.payload).unwrap();
        assert_eq!(
            a,
            ArpPacket {
                oper: wire::ARP_REQUEST,
                sha: SERVER_MAC,
                spa: SERVER_IP,
                tha: [0; 6],
                tpa: SERVER_IP
            }
        );
    }
}

#[test]
fn icmp_echo_request_gets_reply_and_bad_ones_do_not() {
    let mut s = stack();
    let r = Ipv4Route {
        eth_dst: SERVER_MAC,
        eth_src: CLIENT_MAC,
        ip_src: CLIENT_IP,
        ip_dst: SERVER_IP,
        ident: 9,
    };
    let payload: Vec<u8> = (0..56u8).collect();
    s.receive_frame(&wire::build_icmp_echo_frame(&r, 8, 0xbeef, 3, &payload), 5);
    let out: Vec<Vec<u8>> = s.drain_frames().collect();
    assert_eq!(out.len(), 1);
    let eth = wire::parse_eth(&out[0]).unwrap();
    assert_eq!(eth.dst, CLIENT_MAC);
    let ip = wire::parse_ipv4(eth.payload).unwrap();
    assert_eq!(
        (ip.src, ip.dst, ip.proto),
        (SERVER_IP, CLIENT_IP, wire::IPPROTO_ICMP)
    );
    let icmp = ip.payload;
    assert_eq!((icmp[0], icmp[1]), (0, 0), "echo reply");
    assert_eq!(
        wire::checksum_fold(wire::checksum_add(0, icmp)),
        0,
        "reply checksum verifies"
    );
    assert_eq!(&icmp[4..8], &[0xbe, 0xef, 0, 3]);
    assert_eq!(&icmp[8..], &payload[..]);

    // Corrupt the ICMP payload: no reply, counted.
    let mut bad = wire::build_icmp_echo_frame(&r, 8, 1, 1, b"abcd");
    let n = bad.len();
    bad[n - 1] ^= 0xff;
    s.receive_frame(&bad, 6);
    assert_eq!(s.drain_frames().count(), 0);
    assert_eq!(s.stats().drop_bad_checksum, 1);
    // Broadcast ping: no reply (no amplification).
    let rb = Ipv4Route {
        eth_dst: wire::MAC_BROADCAST,
        ip_dst: [198, 18, 0, 255],
        ..r
    };
    s.receive_frame(&wire::build_icmp_echo_frame(&rb, 8, 1, 1, b"abcd"), 7);
    assert_eq!(s.drain_frames().count(), 0);
    assert_eq!(s.stats().drop_broadcast, 1);
}

#[test]
fn handshake_negotiates_mss_and_window_scale() {
    let mut s = stack();
    let l = s.listen(80, 8).unwrap();
    assert!(!s.listener_ready(l));
    let mut p = Peer::new(40000, 80);
    let syn = p.syn(Some(1000), Some(7));
    s.receive_frame(&syn, 0);
    let sa = drain_segs(&mut s).remove(0);
    assert_eq!(sa.flags, SYN | ACK);
    assert_eq!(sa.ack, p.seq + 1);
    assert_eq!(sa.mss, Some(1460), "we advertise MTU - 40");
    assert_eq!(sa.wscale, Some(WINDOW_SHIFT));
    assert_eq!(sa.window, 65535, "SYN-ACK windows are never scaled");
    assert_eq!(
        (sa.eth_dst, sa.ip_dst, sa.src_port, sa.dst_port),
        (CLIENT_MAC, CLIENT_IP, 80, 40000)
    );
    assert_eq!(
        s.accept(l),
        Err(NetError::WouldBlock),
        "not established yet"
    );
    p.seq += 1;
    p.ack = sa.seq + 1;
    // Window 100 scaled by 2^7 = 12800 bytes.
    let ack = p.ack_with_window(100);
    s.receive_frame(&ack, MS);
    assert!(s.listener_ready(l));
    let sock = s.accept(l).unwrap();
    assert_eq!(s.peer_addr(sock), Some((CLIENT_IP, 40000)));
    assert!(s.readiness(sock).writable && !s.readiness(sock).readable);

    // Peer MSS 1000 is respected; the 12800-byte window limits what is sent (cwnd is 10 * 1000).
    let data = vec![7u8; 20000];
    assert_eq!(s.send(sock, &data, 2 * MS), Ok(20000));
    let segs = drain_segs(&mut s);
    assert!(segs.iter().all(|g| g.payload.len() <= 1000));
    let total: usize = segs.iter().map(|g| g.payload.len()).sum();
    assert_eq!(total, 10000, "cwnd of 10 segments limits the first flight");
    assert_eq!(segs[0].seq, p.ack);
    // Our window field is scaled by our shift.
    assert_eq!(
        u32::from(segs[0].window) << WINDOW_SHIFT,
        RECV_BUF_BYTES as u32
    );
    assert_eq!(s.stats().conn_established, 1);
}

#[test]
fn data_flows_both_ways_with_immediate_acks() {
    let mut s = stack();
    let l = s.listen(7, 4).unwrap();
    let mut p = Peer::new(5000, 7);
    let (sock, _) = connect(&mut s, l, &mut p, Some(1460), None, 0);
    let mut buf = [0u8; 64];
    assert_eq!(s.recv(sock, &mut buf, false), Err(NetError::WouldBlock));

    let f = p.data(b"hello", 65535);
    s.receive_frame(&f, MS);
    let acks = drain_segs(&mut s);
    assert_eq!(acks.len(), 1, "{acks:?}");
    assert_eq!((acks[0].flags, acks[0].ack), (ACK, p.seq));
    assert!(s.readiness(sock).readable);
    assert_eq!(s.recv(sock, &mut buf, true), Ok(5), "peek");
    assert_eq!(s.recv(sock, &mut buf, false), Ok(5));
    assert_eq!(&buf[..5], b"hello");
    assert_eq!(s.recv(sock, &mut buf, false), Err(NetError::WouldBlock));

    assert_eq!(s.send(sock, b"world", 2 * MS), Ok(5));
    let out = drain_segs(&mut s);
    assert_eq!(out.len(), 1);
    assert_eq!(
        (out[0].seq, out[0].ack, out[0].payload.as_slice()),
        (p.ack, p.seq, &b"world"[..])
    );
    assert!(out[0].has(PSH) && out[0].has(ACK));
    assert!(
        s.next_deadline_ns().is_some(),
        "unacknowledged data arms the RTO"
    );
    p.ack += 5;
    let a = p.ack_with_window(65535);
    s.receive_frame(&a, 3 * MS);
    assert!(drain_segs(&mut s).is_empty());
    assert_eq!(
        s.next_deadline_ns(),
        None,
        "everything acknowledged: no timer"
    );
}

#[test]
fn stray_segments_get_rst() {
    let mut s = stack();
    let _l = s.listen(80, 4).unwrap();
    // SYN to a port nobody listens on: RST|ACK acknowledging the SYN.
    let mut p = Peer::new(1234, 81);
    let syn = p.syn(None, None);
    s.receive_frame(&syn, 0);
    let out = drain_segs(&mut s);
    assert_eq!(out.len(), 1);
    assert_eq!(
        (out[0].flags, out[0].seq, out[0].ack),
        (RST | ACK, 0, p.seq + 1)
    );
    // ACK to a listening port without a connection: RST with SEQ = SEG.ACK.
    let mut p = Peer::new(1235, 80);
    let f = p.frame(ACK, 5, 777, 100, b"");
    s.receive_frame(&f, 0);
    let out = drain_segs(&mut s);
    assert_eq!((out[0].flags, out[0].seq), (RST, 777));
    // An RST for nothing gets nothing.
    let f = p.frame(RST, 5, 0, 0, b"");
    s.receive_frame(&f, 0);
    assert!(drain_segs(&mut s).is_empty());
    assert_eq!(s.stats().rst_sent, 2);
}

#[test]
fn lost_data_is_retransmitted_with_backoff_then_times_out() {
    let mut s = stack();
    let l = s.listen(80, 4).unwrap();
    let mut p = Peer::new(4000, 80);
    let (sock, _) = connect(&mut s, l, &mut p, Some(1460), None, 0);
    s.send(sock, b"lost", 10 * MS).unwrap();
    let first = drain_segs(&mut s).remove(0);
    let mut deadlines = vec![];
    let mut now = 10 * MS;
    for _ in 0..MAX_RETRIES {
        let d = s.next_deadline_ns().unwrap();
        deadlines.push(d - now);
        now = d;
        s.poll(now);
        let re = drain_segs(&mut s);
        assert_eq!(re.len(), 1);
        assert_eq!(
            (re[0].seq, re[0].payload.as_slice()),
            (first.seq, &b"lost"[..])
        );
    }
    // Exponential backoff, capped.
    for w in deadlines.windows(2) {
        assert!(
            w[1] == (w[0] * 2).min(RTO_MAX_NS),
            "backoff doubles: {deadlines:?}"
        );
    }
    // The next expiry gives up: RST, and the socket reports the timeout.
    let d = s.next_deadline_ns().unwrap();
    s.poll(d);
    let out = drain_segs(&mut s);
    assert_eq!(out.len(), 1);
    assert!(out[0].has(RST));
    assert!(s.readiness(sock).error && s.readiness(sock).hangup);
    let mut buf = [0u8; 4];
    assert_eq!(s.recv(sock, &mut buf, false), Err(NetError::TimedOut));
    assert_eq!(s.send(sock, b"x", d), Err(NetError::TimedOut));
    assert_eq!(s.stats().conn_timed_out, 1);
    assert_eq!(s.stats().sockets_open, 1, "held until the guest closes it");
    s.close(sock, d);
    assert_eq!(s.stats().sockets_open, 0);
    assert_eq!(s.next_deadline_ns(), None);
    assert_eq!(
        s.recv(sock, &mut buf, false),
        Err(NetError::InvalidSocket(sock.0))
    );
}

#[test]
fn three_dup_acks_trigger_fast_retransmit_and_newreno_recovery() {
    let mut s = stack();
    let l = s.listen(80, 4).unwrap();
    let mut p = Peer::new(4001, 80);
    let (sock, _) = connect(&mut s, l, &mut p, Some(1000), None, 0);
    let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
    s.send(sock, &data, MS).unwrap();
    let segs = drain_segs(&mut s);
    assert_eq!(segs.len(), 10);
    let base = p.ack;
    // Segment 1 is lost; segments 2.. arrive and each draws a duplicate ACK for `base`.
    for _ in 0..2 {
        let f = p.ack_with_window(65535);
        s.receive_frame(&f, 20 * MS);
        assert!(
            drain_segs(&mut s).is_empty(),
            "fewer than three duplicates: wait"
        );
    }
    let f = p.ack_with_window(65535);
    s.receive_frame(&f, 20 * MS);
    let re = drain_segs(&mut s);
    assert_eq!(
        re.len(),
        1,
        "third duplicate: retransmit at once, before any timer"
    );
    assert_eq!((re[0].seq, re[0].payload.len()), (base, 1000));
    assert_eq!(s.stats().fast_retransmits, 1);
    // A partial ACK (segments 1..=3 now received, 4 lost too) retransmits segment 4 (NewReno).
    p.ack = base + 3000;
    let f = p.ack_with_window(65535);
    s.receive_frame(&f, 30 * MS);
    let re = drain_segs(&mut s);
    assert!(
        re.iter()
            .any(|g| g.seq == base + 3000 && g.payload.len() == 1000),
        "partial ack retransmits: {re:?}"
    );
    // Full ACK ends recovery; the rest of the data (none left) and no more retransmissions.
    p.ack = base + 10_000;
    let f = p.ack_with_window(65535);
    s.receive_frame(&f, 40 * MS);
    assert!(drain_segs(&mut s).is_empty());
    assert_eq!(s.next_deadline_ns(), None);
}

#[test]
fn zero_window_is_probed_until_it_opens() {
    let mut s = stack();
    let l = s.listen(80, 4).unwrap();
    let mut p = Peer::new(4002, 80);
    let (sock, _) = connect(&mut s, l, &mut p, Some(1000), None, 0);
    s.send(sock, &[1u8; 3000], MS).unwrap();
    let segs = drain_segs(&mut s);
    assert_eq!(segs.len(), 3);
    // Peer takes the first 2000 bytes and closes its window.
    p.ack += 2000;
    let f = p.ack_with_window(0);
    s.receive_frame(&f, 10 * MS);
    let o = drain_segs(&mut s);
    assert!(o.is_empty(), "{o:?}");
    // Peer takes the last 1000 too, window still 0; more data is queued.
    p.ack += 1000;
    let f = p.ack_with_window(0);
    s.receive_frame(&f, 11 * MS);
    s.send(sock, &[2u8; 500], 12 * MS).unwrap();
    assert!(
        drain_segs(&mut s).is_empty(),
        "nothing may be sent into a zero window"
    );
    // Probes: one byte, repeated with growing intervals while the peer keeps answering 0.
    let mut last_gap = 0;
    let mut now = 12 * MS;
    for i in 0..MAX_RETRIES + 3 {
        let d = s.next_deadline_ns().expect("persist timer armed");
        assert!(d - now >= last_gap, "probe intervals do not shrink");
        last_gap = d - now;
        now = d;
        s.poll(now);
        let probe = drain_segs(&mut s);
        assert_eq!(probe.len(), 1, "probe {i}");
        assert_eq!(
            (probe[0].seq, probe[0].payload.as_slice()),
            (p.ack, &[2u8][..])
        );
        // The peer drops the byte and answers with a zero window: a live peer keeps the
        // connection open past MAX_RETRIES.
        let f = p.ack_with_window(0);
        s.receive_frame(&f, now);
        assert!(drain_segs(&mut s).is_empty());
    }
    assert!(s.stats().zero_window_probes > u64::from(MAX_RETRIES));
    assert!(!s.readiness(sock).error);
    // Window opens: the rest flows at once.
    let f = p.ack_with_window(8000);
    s.receive_frame(&f, now + MS);
    let out = drain_segs(&mut s);
    let total: usize = out.iter().map(|g| g.payload.len()).sum();
    assert_eq!(total, 500);
    assert_eq!(out[0].seq, p.ack);
}

#[test]
fn our_zero_window_and_window_update_after_read() {
    let mut s = stack();
    let l = s.listen(80, 4).unwrap();
    let mut p = Peer::new(4003, 80);
    let (sock, _) = connect(&mut s, l, &mut p, Some(1460), Some(0), 0);
    // Fill our receive buffer completely.
    let chunk = vec![9u8; 1460];
    let mut sent = 0;
    let mut last_win = None;
    while sent < RECV_BUF_BYTES {
        let n = chunk.len().min(RECV_BUF_BYTES - sent);
        let f = p.data(&chunk[..n], 65535);
        s.receive_frame(&f, MS);
        sent += n;
        let acks = drain_segs(&mut s);
        last_win = Some(acks.last().unwrap().window);
    }
    assert_eq!(last_win, Some(0), "full buffer advertises a zero window");
    // A byte beyond the window is not taken, but is answered with an ACK.
    let f = p.frame(ACK, p.seq, p.ack, 65535, b"z");
    s.receive_frame(&f, 2 * MS);
    let a = drain_segs(&mut s);
    assert_eq!((a.len(), a[0].ack, a[0].window), (1, p.seq, 0));
    // Reading frees space and sends a window update.
    let mut buf = vec![0u8; 64 * 1024];
    assert_eq!(s.recv(sock, &mut buf, false), Ok(64 * 1024));
    let upd = drain_segs(&mut s);
    assert_eq!(upd.len(), 1);
    assert_eq!(u32::from(upd[0].window) << WINDOW_SHIFT, 64 * 1024);
}

#[test]
fn out_of_order_segments_are_reassembled() {
    let mut s = stack();
    let l = s.listen(80, 4).unwrap();
    let mut p = Peer::new(4004, 80);
    let (sock, _) = connect(&mut s, l, &mut p, Some(1460), None, 0);
    let base = p.seq;
    let f3 = p.frame(ACK, base + 6, p.ack, 65535, b"third");
    let f2 = p.frame(ACK, base + 3, p.ack, 65535, b"two");
    let f1 = p.frame(ACK, base, p.ack, 65535, b"one");
    s.receive_frame(&f3, MS);
    s.receive_frame(&f2, MS);
    let dups = drain_segs(&mut s);
    assert_eq!(dups.len(), 2);
    assert!(
        dups.iter().all(|d| d.ack == base),
        "out-of-order data draws immediate duplicate ACKs"
    );
    let mut buf = [0u8; 32];
    assert_eq!(s.recv(sock, &mut buf, false), Err(NetError::WouldBlock));
    s.receive_frame(&f1, MS);
    let a = drain_segs(&mut s);
    assert_eq!(a[0].ack, base + 11);
    assert_eq!(s.recv(sock, &mut buf, false), Ok(11));
    assert_eq!(&buf[..11], b"onetwothird");
}

#[test]
fn acks_carry_sack_blocks_when_the_peer_offered_sack() {
    let mut s = stack();
    let l = s.listen(80, 4).unwrap();
    let mut p = Peer::new(4014, 80);
    p.sack_permitted = true;
    let (sock, syn_ack) = connect(&mut s, l, &mut p, Some(1460), Some(2), 0);
    assert!(
        syn_ack.sack_permitted,
        "SACK-permitted answered in the SYN-ACK"
    );
    let b = p.seq;
    // Segments of 10 bytes at b+0, [hole], b+20, b+30, [hole], b+50.
    let seg = |p: &mut Peer, at: u32| p.frame(ACK, b + at, p.ack, 65535, &[at as u8; 10]);
    for at in [0, 20, 30, 50] {
        let f = seg(&mut p, at);
        s.receive_frame(&f, MS);
    }
    let acks = drain_segs(&mut s);
    assert_eq!(acks.len(), 4);
    assert_eq!(acks[0].sack, vec![], "in-order data needs no SACK");
    assert_eq!(acks[1].sack, vec![(b + 20, b + 30)]);
    assert_eq!(
        acks[2].sack,
        vec![(b + 20, b + 40)],
        "adjacent ranges coalesce"
    );
    assert_eq!(
        acks[3].sack,
        vec![(b + 50, b + 60), (b + 20, b + 40)],
        "the range that grew last comes first"
    );
    assert!(acks.iter().all(|a| a.ack == b + 10));
    // Filling the first hole moves the ACK and leaves one block.
    let f = seg(&mut p, 10);
    s.receive_frame(&f, 2 * MS);
    let a = drain_segs(&mut s);
    assert_eq!(
        (a[0].ack, a[0].sack.clone()),
        (b + 40, vec![(b + 50, b + 60)])
    );
    // Our own data segments carry the blocks too (the full-duplex case).
    assert_eq!(s.send(sock, b"reply", 2 * MS), Ok(5));
    let d = drain_segs(&mut s);
    assert_eq!(d[0].payload, b"reply");
    assert_eq!(d[0].sack, vec![(b + 50, b + 60)]);
    let f = seg(&mut p, 40);
    s.receive_frame(&f, 3 * MS);
    let a = drain_segs(&mut s);
    assert_eq!((a[0].ack, a[0].sack.clone()), (b + 60, vec![]));
    let mut buf = [0u8; 64];
    assert_eq!(s.recv(sock, &mut buf, false), Ok(60));
    for at in 0..6 {
        assert!(buf[at * 10..at * 10 + 10]
            .iter()
            .all(|&x| x == (at * 10) as u8));
    }
}

#[test]
fn no_sack_blocks_unless_the_peer_offered_sack() {
    let mut s = stack();
    let l = s.listen(80, 4).unwrap();
    let mut p = Peer::new(4015, 80);
    let (_sock, syn_ack) = connect(&mut s, l, &mut p, Some(1460), Some(2), 0);
    assert!(!syn_ack.sack_permitted);
    let f = p.frame(ACK, p.seq + 10, p.ack, 65535, b"later");
    s.receive_frame(&f, MS);
    let a = drain_segs(&mut s);
    assert_eq!(a.len(), 1);
    assert_eq!((a[0].ack, a[0].sack.clone()), (p.seq, vec![]));
}

#[test]
fn peer_closes_first_then_we_close() {
    let mut s = stack();
    let l = s.listen(80, 4).unwrap();
    let mut p = Peer::new(4005, 80);
    let (sock, _) = connect(&mut s, l, &mut p, Some(1460), None, 0);
    let f = p.data(b"bye", 65535);
    s.receive_frame(&f, MS);
    let f = p.fin(65535);
    s.receive_frame(&f, MS);
    let acks = drain_segs(&mut s);
    assert_eq!(acks.last().unwrap().ack, p.seq, "FIN acknowledged");
    let mut buf = [0u8; 8];
    assert_eq!(s.recv(sock, &mut buf, false), Ok(3));
    assert_eq!(s.recv(sock, &mut buf, false), Ok(0), "EOF after the data");
    // Half-close: we can still send.
    assert_eq!(s.send(sock, b"late", 2 * MS), Ok(4));
    let d = drain_segs(&mut s);
    assert_eq!(d[0].payload, b"late");
    p.ack += 4;
    s.close(sock, 3 * MS);
    let fin = drain_segs(&mut s);
    assert_eq!(fin.len(), 1);
    assert!(fin[0].has(FIN));
    assert_eq!(fin[0].seq, p.ack);
    assert_eq!(
        s.stats().sockets_open,
        1,
        "LAST-ACK until our FIN is acknowledged"
    );
    p.ack += 1;
    let f = p.ack_with_window(65535);
    s.receive_frame(&f, 4 * MS);
    assert_eq!(s.stats().sockets_open, 0);
    assert_eq!(s.next_deadline_ns(), None);
}

#[test]
fn we_close_first_and_pass_through_time_wait() {
    let mut s = stack();
    let l = s.listen(80, 4).unwrap();
    let mut p = Peer::new(4006, 80);
    let (sock, _) = connect(&mut s, l, &mut p, Some(1460), None, 0);
    s.shutdown(sock, false, true, MS).unwrap();
    let fin = drain_segs(&mut s);
    assert!(fin[0].has(FIN));
    assert_eq!(s.send(sock, b"x", MS), Err(NetError::BrokenPipe));
    p.ack += 1;
    let f = p.ack_with_window(65535);
    s.receive_frame(&f, 2 * MS);
    // FIN-WAIT-2, still open for reading.
    let f = p.data(b"tail", 65535);
    s.receive_frame(&f, 3 * MS);
    drain_segs(&mut s);
    let f = p.fin(65535);
    s.receive_frame(&f, 4 * MS);
    let a = drain_segs(&mut s);
    assert_eq!(a.last().unwrap().ack, p.seq);
    let mut buf = [0u8; 8];
    assert_eq!(s.recv(sock, &mut buf, false), Ok(4));
    assert_eq!(s.recv(sock, &mut buf, false), Ok(0));
    assert!(s.readiness(sock).hangup);
    s.close(sock, 5 * MS);
    assert_eq!(s.stats().sockets_open, 1, "TIME-WAIT");
    // A retransmitted FIN in TIME-WAIT is acknowledged again.
    let f = p.frame(ACK | FIN, p.seq - 1, p.ack, 65535, b"");
    s.receive_frame(&f, 6 * MS);
    let a = drain_segs(&mut s);
    assert_eq!((a.len(), a[0].ack), (1, p.seq));
    let d = s.next_deadline_ns().unwrap();
    assert_eq!(d, 6 * MS + TIME_WAIT_NS);
    s.poll(d);
    assert_eq!(s.stats().sockets_open, 0);
}

#[test]
fn orphaned_socket_gives_up_in_fin_wait_2() {
    let mut s = stack();
    let l = s.listen(80, 4).unwrap();
    let mut p = Peer::new(4007, 80);
    let (sock, _) = connect(&mut s, l, &mut p, Some(1460), None, 0);
    s.close(sock, MS);
    drain_segs(&mut s);
    p.ack += 1;
    let f = p.ack_with_window(65535);
    s.receive_frame(&f, 2 * MS);
    assert_eq!(s.next_deadline_ns(), Some(2 * MS + FIN_WAIT_2_TIMEOUT_NS));
    s.poll(2 * MS + FIN_WAIT_2_TIMEOUT_NS);
    assert_eq!(s.stats().sockets_open, 0);
}

#[test]
fn close_with_unread_data_sends_rst() {
    let mut s = stack();
    let l = s.listen(80, 4).unwrap();
    let mut p = Peer::new(4008, 80);
    let (sock, _) = connect(&mut s, l, &mut p, Some(1460), None, 0);
    let f = p.data(b"unread", 65535);
    s.receive_frame(&f, MS);
    drain_segs(&mut s);
    s.close(sock, 2 * MS);
    let out = drain_segs(&mut s);
    assert_eq!(out.len(), 1);
    assert!(out[0].has(RST));
    assert_eq!(s.stats().sockets_open, 0);
}

#[test]
fn rst_must_match_rcv_nxt_exactly() {
    let mut s = stack();
    let l = s.listen(80, 4).unwrap();
    let mut p = Peer::new(4009, 80);
    let (sock, _) = connect(&mut s, l, &mut p, Some(1460), None, 0);
    // Out of window: ignored silently.
    let f = p.frame(RST, p.seq.wrapping_add(1 << 30), 0, 0, b"");
    s.receive_frame(&f, MS);
    assert!(drain_segs(&mut s).is_empty());
    // In window but not exact: challenge ACK, connection survives (RFC 5961).
    let f = p.frame(RST, p.seq + 100, 0, 0, b"");
    s.receive_frame(&f, MS);
    let c = drain_segs(&mut s);
    assert_eq!((c.len(), c[0].flags, c[0].ack), (1, ACK, p.seq));
    assert!(!s.readiness(sock).error);
    // A SYN on the established connection: challenge ACK too.
    let f = p.frame(SYN, p.seq + 5, 0, 1000, b"");
    s.receive_frame(&f, MS);
    assert_eq!(drain_segs(&mut s)[0].flags, ACK);
    assert_eq!(s.stats().challenge_acks, 2);
    // Exact: reset.
    let f = p.frame(RST, p.seq, 0, 0, b"");
    s.receive_frame(&f, MS);
    assert!(drain_segs(&mut s).is_empty());
    let r = s.readiness(sock);
    assert!(r.error && r.readable && r.hangup);
    let mut buf = [0u8; 4];
    assert_eq!(s.recv(sock, &mut buf, false), Err(NetError::ConnReset));
    assert_eq!(s.send(sock, b"x", MS), Err(NetError::ConnReset));
    assert_eq!(s.stats().conn_reset_by_peer, 1);
    s.close(sock, MS);
    assert_eq!(s.stats().sockets_open, 0);
}

#[test]
fn syn_flood_beyond_backlog_is_bounded_and_drains() {
    let mut s = stack();
    let backlog = 16;
    let _l = s.listen(80, backlog).unwrap();
    for i in 0..10_000u32 {
        let mut p = Peer::new(1024 + (i % 60000) as u16, 80);
        p.ip = [198, 18, 1 + (i / 60000) as u8, 7];
        let f = p.syn(Some(1460), None);
        s.receive_frame(&f, u64::from(i) * 1000);
        s.drain_frames().for_each(drop);
    }
    let st = s.stats();
    assert_eq!(st.sockets_open, u64::from(backlog));
    assert_eq!(st.drop_syn_backlog, 10_000 - u64::from(backlog));
    s.check_invariants();
    // Half-open connections die after their SYN-ACK retries.
    let mut now = 10 * MS;
    while let Some(d) = s.next_deadline_ns() {
        now = d.max(now);
        s.poll(now);
        s.drain_frames().for_each(drop);
    }
    assert_eq!(s.stats().sockets_open, 0);
    assert!(
        now < 100 * SEC,
        "half-open connections are dropped within ~a minute"
    );
    // The listener works again afterwards.
    let mut p = Peer::new(9999, 80);
    let f = p.syn(None, None);
    s.receive_frame(&f, now);
    assert_eq!(drain_segs(&mut s).len(), 1);
}

#[test]
fn synack_is_retransmitted_and_duplicate_syn_answered() {
    let mut s = stack();
    let l = s.listen(80, 4).unwrap();
    let mut p = Peer::new(4010, 80);
    let syn = p.syn(Some(1460), None);
    s.receive_frame(&syn, 0);
    let sa = drain_segs(&mut s).remove(0);
    // Our SYN-ACK was lost; the peer retransmits its SYN.
    s.receive_frame(&syn, 500 * MS);
    let sa2 = drain_segs(&mut s).remove(0);
    assert_eq!(sa2, sa);
    // Timer retransmission.
    s.poll(RTO_INITIAL_NS);
    let sa3 = drain_segs(&mut s).remove(0);
    assert_eq!(sa3.seq, sa.seq);
    // Completing the handshake with a wrong ACK number draws an RST and keeps the half-open one.
    let f = p.frame(ACK, p.seq + 1, sa.seq + 77, 65535, b"");
    s.receive_frame(&f, RTO_INITIAL_NS + MS);
    let r = drain_segs(&mut s);
    assert_eq!((r[0].flags, r[0].seq), (RST, sa.seq + 77));
    assert_eq!(s.accept(l), Err(NetError::WouldBlock));
    // The right ACK, carrying data, establishes and delivers.
    p.seq += 1;
    p.ack = sa.seq + 1;
    let f = p.data(b"early", 65535);
    s.receive_frame(&f, RTO_INITIAL_NS + 2 * MS);
    let sock = s.accept(l).unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(s.recv(sock, &mut buf, false), Ok(5));
}

#[test]
fn malformed_and_foreign_frames_are_dropped_and_counted() {
    let mut s = stack();
    let _l = s.listen(80, 4).unwrap();
    let mut p = Peer::new(4011, 80);
    let good = p.syn(Some(1460), None);
    s.receive_frame(&[], 0);
    s.receive_frame(&good[..10], 0);
    s.receive_frame(&vec![0u8; MAX_FRAME_LEN + 1], 0);
    // Other unicast MAC.
    let mut other = good.clone();
    other[0..6].copy_from_slice(&[0x02, 9, 9, 9, 9, 9]);
    s.receive_frame(&other, 0);
    // Truncated IP.
    s.receive_frame(&good[..good.len() - 3], 0);
    // Corrupted TCP checksum.
    let mut bad = good.clone();
    let n = bad.len();
    bad[n - 1] ^= 1;
    s.receive_frame(&bad, 0);
    // A fragment (MF set, checksum fixed).
    let mut frag = good.clone();
    frag[20] = 0x20;
    frag[24] = 0;
    frag[25] = 0;
    let c = wire::checksum_fold(wire::checksum_add(0, &frag[14..34]));
    frag[24..26].copy_from_slice(&c.to_be_bytes());
    s.receive_frame(&frag, 0);
    // Unknown EtherType (IPv6).
    let mut v6 = good.clone();
    v6[12] = 0x86;
    v6[13] = 0xdd;
    s.receive_frame(&v6, 0);
    assert_eq!(s.drain_frames().count(), 0);
    let st = s.stats();
    assert_eq!(st.frames_in, 8);
    assert_eq!(st.drop_malformed, 3);
    assert_eq!(st.drop_oversized, 1);
    assert_eq!(st.drop_not_for_us, 1);
    assert_eq!(st.drop_bad_checksum, 1);
    assert_eq!(st.drop_fragment, 1);
    assert_eq!(st.drop_unsupported, 1);
    assert_eq!(st.sockets_open, 0);
    // The intact frame still works.
    s.receive_frame(&good, 0);
    assert_eq!(drain_segs(&mut s).len(), 1);
}

#[test]
fn off_subnet_replies_go_via_gateway() {
    let gw_ip = [198, 18, 0, 254];
    let gw_mac = [0x02, 0, 0, 0, 0, 0xfe];
    let mut s = NetStack::new(
        NicConfig {
            gateway: Some(gw_ip),
            ..cfg()
        },
        1,
    );
    let _l = s.listen(80, 4).unwrap();
    // A SYN from a far host, relayed by a router whose MAC we do not know yet: we answer to the
    // MAC the frame came from (learned per IP) ...
    let mut far = Peer::new(4012, 80);
    far.ip = [203, 0, 113, 5];
    far.mac = [0x02, 0, 0, 0, 0, 0x77];
    let f = far.syn(None, None);
    s.receive_frame(&f, 0);
    let out: Vec<Vec<u8>> = s.drain_frames().collect();
    assert_eq!(out.len(), 1);
    assert_eq!(parse_seg(&out[0]).unwrap().eth_dst, far.mac);
    // ... and once the gateway is known (it ARPs for us), through the gateway.
    let req = ArpPacket {
        oper: wire::ARP_REQUEST,
        sha: gw_mac,
        spa: gw_ip,
        tha: [0; 6],
        tpa: SERVER_IP,
    };
    s.receive_frame(&wire::build_arp_frame(wire::MAC_BROADCAST, gw_mac, &req), 1);
    s.drain_frames().for_each(drop);
    let mut far2 = Peer::new(4013, 80);
    far2.ip = [203, 0, 113, 6];
    let f = far2.syn(None, None);
    s.receive_frame(&f, 2);
    let seg = drain_segs(&mut s).remove(0);
    assert_eq!((seg.eth_dst, seg.ip_dst), (gw_mac, far2.ip));
}

#[test]
fn unknown_next_hop_triggers_rate_limited_arp() {
    let mut s = stack();
    let l = s.listen(80, 4).unwrap();
    let mut p = Peer::new(4014, 80);
    let (sock, _) = connect(&mut s, l, &mut p, Some(1460), None, 0);
    // Forget the neighbor by restoring a state without it: easiest is to fill the table with
    // newer entries so the peer is evicted.
    for i in 0..MAX_NEIGHBORS as u32 {
        let ip = [10, 1, (i >> 8) as u8, i as u8];
        let arp = ArpPacket {
            oper: wire::ARP_REQUEST,
            sha: [0x02, 1, 1, 1, (i >> 8) as u8, i as u8],
            spa: ip,
            tha: [0; 6],
            tpa: SERVER_IP,
        };
        s.receive_frame(
            &wire::build_arp_frame(wire::MAC_BROADCAST, arp.sha, &arp),
            SEC + u64::from(i),
        );
    }
    s.drain_frames().for_each(drop);
    s.check_invariants();
    s.send(sock, b"x", 2 * SEC).unwrap();
    let out: Vec<Vec<u8>> = s.drain_frames().collect();
    assert_eq!(out.len(), 1);
    let arp = wire::parse_arp(wire::parse_eth(&out[0]).unwrap().payload).unwrap();
    assert_eq!((arp.oper, arp.tpa), (wire::ARP_REQUEST, CLIENT_IP));
    assert_eq!(s.stats().drop_no_neighbor, 1);
    // The retransmission shortly after is dropped without another ARP request (rate limit).
    s.send(sock, b"y", 2 * SEC + MS).unwrap();
    assert_eq!(s.drain_frames().count(), 0);
}

#[test]
fn retransmit_all_resends_everything_in_flight() {
    let mut s = stack();
    let l = s.listen(80, 4).unwrap();
    let mut p = Peer::new(4015, 80);
    let (sock, _) = connect(&mut s, l, &mut p, Some(1000), None, 0);
    s.send(sock, &[5u8; 2500], MS).unwrap();
    s.shutdown(sock, false, true, MS).unwrap();
    let first = drain_segs(&mut s);
    assert_eq!(first.len(), 4, "1000 + 1000 + 500 bytes, then the FIN");
    assert!(first[3].has(FIN) && first[3].payload.is_empty());
    // These frames were "held back by the dead primary": never delivered.
    s.retransmit_all(2 * MS);
    let again = drain_segs(&mut s);
    // Same bytes from the same sequence number; the FIN now rides on the last data segment.
    assert_eq!(again.len(), 3);
    assert_eq!(again[0].seq, first[0].seq);
    let bytes = |v: &[Seg]| {
        v.iter()
            .flat_map(|g| g.payload.clone())
            .collect::<Vec<u8>>()
    };
    assert_eq!(bytes(&again), bytes(&first));
    assert!(again[2].has(FIN) && again[2].seq + 500 == first[3].seq);
    assert_eq!(s.stats().retransmits, 3);
    // With nothing in flight, go-live still sends an ACK (the peer may wait for one).
    p.ack = first[3].seq + 1;
    let f = p.ack_with_window(65535);
    s.receive_frame(&f, 3 * MS);
    assert!(drain_segs(&mut s).is_empty());
    s.retransmit_all(4 * MS);
    let a = drain_segs(&mut s);
    assert_eq!(a.len(), 1);
    assert!(a[0].payload.is_empty() && a[0].flags == ACK && a[0].ack == p.seq);
}

#[test]
fn listener_limits_and_close_listener() {
    let mut s = stack();
    assert!(matches!(
        s.listen(0, 1),
        Err(NetError::InvalidArgument { .. })
    ));
    let l = s.listen(80, 4).unwrap();
    assert_eq!(s.listen(80, 4), Err(NetError::AddrInUse { port: 80 }));
    for port in 1..MAX_LISTENERS as u16 {
        s.listen(1000 + port, 1).unwrap();
    }
    assert_eq!(
        s.listen(9, 1),
        Err(NetError::TooManyListeners {
            limit: MAX_LISTENERS
        })
    );
    // One established-but-unaccepted and one half-open connection, then close the listener.
    let mut p1 = Peer::new(5001, 80);
    let syn = p1.syn(None, None);
    s.receive_frame(&syn, 0);
    let sa = drain_segs(&mut s).remove(0);
    p1.seq += 1;
    p1.ack = sa.seq + 1;
    let f = p1.ack_with_window(1000);
    s.receive_frame(&f, 0);
    let mut p2 = Peer::new(5002, 80);
    let f = p2.syn(None, None);
    s.receive_frame(&f, 0);
    drain_segs(&mut s);
    assert_eq!(s.stats().sockets_open, 2);
    s.close_listener(l);
    let rsts = drain_segs(&mut s);
    assert_eq!(rsts.len(), 2);
    assert!(rsts.iter().all(|r| r.has(RST)));
    assert_eq!(s.stats().sockets_open, 0);
    assert_eq!(s.accept(l), Err(NetError::InvalidListener(l.0)));
    assert!(
        s.listener_ready(l),
        "unknown listener polls ready so accept reports the error"
    );
    s.listen(80, 4).expect("port is free again");
}

#[test]
fn save_restore_and_hash_are_exact() {
    let mut s = stack();
    let l = s.listen(80, 4).unwrap();
    let mut p = Peer::new(4016, 80);
    let (sock, _) = connect(&mut s, l, &mut p, Some(1460), Some(2), 0);
    s.send(sock, b"in flight", MS).unwrap();
    let f = p.data(b"unread", 65535);
    s.receive_frame(&f, MS);
    let bytes = s.save();
    let r = NetStack::restore(&bytes).unwrap();
    assert_eq!(r, s);
    assert_eq!(r.state_hash(), s.state_hash());
    let mut t = r.clone();
    t.poll(10 * SEC);
    assert_ne!(
        t.state_hash(),
        s.state_hash(),
        "a retransmission changes the state"
    );
    assert!(matches!(
        NetStack::restore(&bytes[..bytes.len() / 2]),
        Err(NetError::Decode(_))
    ));
    assert!(NetStack::restore(b"").is_err());
}

#[test]
fn in_window_rst_storm_draws_bounded_challenge_acks() {
    let mut s = stack();
    let l = s.listen(80, 4).unwrap();
    let mut p = Peer::new(4017, 80);
    let (sock, _) = connect(&mut s, l, &mut p, Some(1460), None, 0);
    let mut replies = 0;
    for i in 0..1000u32 {
        let f = p.frame(RST, p.seq + 1 + i, 0, 0, b"");
        s.receive_frame(&f, MS + u64::from(i) * 1000);
        replies += drain_segs(&mut s).len();
    }
    assert_eq!(replies, MAX_CHALLENGE_ACKS_PER_SEC as usize);
    assert!(!s.readiness(sock).error, "inexact RSTs never reset");
    // The next second has a fresh budget.
    let f = p.frame(RST, p.seq + 7, 0, 0, b"");
    s.receive_frame(&f, 2 * SEC);
    assert_eq!(drain_segs(&mut s).len(), 1);
}

#[test]
fn new_syn_reuses_a_time_wait_tuple() {
    let mut s = stack();
    let l = s.listen(80, 4).unwrap();
    let mut p = Peer::new(4018, 80);
    let (sock, _) = connect(&mut s, l, &mut p, Some(1460), None, 0);
    s.close(sock, MS);
    drain_segs(&mut s);
    p.ack += 1;
    let f = p.fin(65535);
    s.receive_frame(&f, 2 * MS);
    drain_segs(&mut s);
    assert_eq!(s.stats().sockets_open, 1, "TIME-WAIT");
    // The client reconnects from the same port with a higher ISN.
    p.seq += 100_000;
    let (sock2, sa) = connect(&mut s, l, &mut p, Some(1460), None, 3 * MS);
    assert_ne!(sock2, sock);
    assert_eq!(sa.ack, p.seq, "fresh handshake");
    assert_eq!(
        s.stats().sockets_open,
        1,
        "the TIME-WAIT socket was replaced"
    );
    // An old-sequence SYN into TIME-WAIT would only be re-acknowledged, but the tuple is now live:
    // it gets a challenge ACK.
    let f = p.frame(SYN, p.seq - 5, 0, 100, b"");
    s.receive_frame(&f, 4 * MS);
    assert_eq!(drain_segs(&mut s)[0].flags, ACK);
}

#[test]
fn extreme_times_do_not_overflow() {
    let mut s = stack();
    let l = s.listen(80, 4).unwrap();
    let mut p = Peer::new(4019, 80);
    let (sock, _) = connect(&mut s, l, &mut p, Some(1460), None, u64::MAX - 10 * SEC);
    s.send(sock, b"data", u64::MAX - 5).unwrap();
    p.ack += 4;
    let f = p.ack_with_window(65535);
    s.receive_frame(&f, u64::MAX);
    s.send(sock, b"more", u64::MAX).unwrap();
    s.poll(u64::MAX);
    s.poll(0); // time never goes backwards inside the stack
    s.check_invariants();
    drain_segs(&mut s);
}

#[test]
fn full_buffers_save_restore_exactly() {
    let mut s = stack();
    let l = s.listen(80, 4).unwrap();
    let mut p = Peer::new(4020, 80);
    let (sock, _) = connect(&mut s, l, &mut p, Some(1460), Some(7), 0);
    // Fill the receive buffer (the guest reads nothing) ...
    let chunk = vec![3u8; 1460];
    let mut got = 0;
    while got < RECV_BUF_BYTES {
        let n = chunk.len().min(RECV_BUF_BYTES - got);
        let f = p.data(&chunk[..n], 0);
        s.receive_frame(&f, MS);
        got += n;
    }
    // ... and the send buffer (the peer's window is zero), after wrapping it around once.
    let data: Vec<u8> = (0..SEND_BUF_BYTES).map(|i| (i * 7) as u8).collect();
    assert_eq!(s.send(sock, &data, MS), Ok(SEND_BUF_BYTES));
    assert_eq!(s.send(sock, b"x", MS), Err(NetError::WouldBlock));
    assert!(!s.readiness(sock).writable);
    drain_segs(&mut s);
    let t = std::time::Instant::now();
    let bytes = s.save();
    let h = s.state_hash();
    let elapsed = t.elapsed();
    assert!(bytes.len() > RECV_BUF_BYTES + SEND_BUF_BYTES);
    assert!(
        bytes.len() < RECV_BUF_BYTES + SEND_BUF_BYTES + 16 * 1024,
        "byte buffers encode compactly"
    );
    let r = NetStack::restore(&bytes).unwrap();
    assert_eq!(r, s);
    assert_eq!(r.state_hash(), h);
    if std::env::var_os("FTVM_NET_SIM_VERBOSE").is_some() {
        eprintln!("save + hash of one socket with full buffers: {elapsed:?}");
    }
}

fn deferring_stack() -> NetStack {
    let mut s = stack();
    s.set_defer_acks(true);
    s
}

#[test]
fn deferred_ack_rides_on_the_reply_of_the_same_turn() {
    let mut s = deferring_stack();
    let l = s.listen(7, 4).unwrap();
    let mut p = Peer::new(5001, 7);
    let (sock, _) = connect(&mut s, l, &mut p, Some(1460), None, 0);
    let f = p.data(b"PING", 65535);
    s.receive_frame(&f, MS);
    assert!(
        drain_segs(&mut s).is_empty(),
        "the ACK of in-order data waits for the end of the turn"
    );
    let mut buf = [0u8; 16];
    assert_eq!(s.recv(sock, &mut buf, false), Ok(4));
    assert_eq!(s.send(sock, b"PONG", MS), Ok(4));
    let out = drain_segs(&mut s);
    assert_eq!(
        out.len(),
        1,
        "one frame: the reply, carrying the ACK: {out:?}"
    );
    assert_eq!(
        (out[0].ack, out[0].payload.as_slice()),
        (p.seq, &b"PONG"[..])
    );
    s.end_turn();
    assert!(drain_segs(&mut s).is_empty(), "nothing left owed");
    assert_eq!(s.stats().deferred_acks_sent, 0);

    // No reply this turn: the ACK goes out when the turn ends.
    let f = p.data(b"quiet", 65535);
    s.receive_frame(&f, 2 * MS);
    assert!(drain_segs(&mut s).is_empty());
    s.end_turn();
    let out = drain_segs(&mut s);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!((out[0].flags, out[0].ack), (ACK, p.seq));
    assert_eq!(s.stats().deferred_acks_sent, 1);
}

#[test]
fn deferred_acks_still_ack_every_second_full_segment_gaps_and_fins_at_once() {
    let mut s = deferring_stack();
    let l = s.listen(7, 4).unwrap();
    let mut p = Peer::new(5002, 7);
    let (_sock, _) = connect(&mut s, l, &mut p, Some(1460), None, 0);
    let full = vec![7u8; 1460];
    // The first full segment waits; the second makes two unacknowledged: ACK at once.
    let f = p.data(&full, 65535);
    s.receive_frame(&f, MS);
    assert!(drain_segs(&mut s).is_empty());
    let f = p.data(&full, 65535);
    s.receive_frame(&f, MS);
    let out = drain_segs(&mut s);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].ack, p.seq, "one ACK covers both segments");

    // A gap: the out-of-order segment draws a duplicate ACK at once, and so does the segment
    // that fills it.
    let base = p.seq;
    let later = p.frame(ACK, base + 3, p.ack, 65535, b"def");
    s.receive_frame(&later, 2 * MS);
    let out = drain_segs(&mut s);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].ack, base, "duplicate ACK for the gap");
    let fill = p.frame(ACK, base, p.ack, 65535, b"abc");
    s.receive_frame(&fill, 2 * MS);
    let out = drain_segs(&mut s);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(
        out[0].ack,
        base + 6,
        "the filled gap is acknowledged at once"
    );
    p.seq = base + 6;

    // Data with FIN is acknowledged at once.
    let f = p.frame(ACK | FIN, p.seq, p.ack, 65535, b"bye");
    s.receive_frame(&f, 3 * MS);
    let out = drain_segs(&mut s);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].ack, p.seq + 4, "data and FIN acknowledged");
    s.end_turn();
    assert!(drain_segs(&mut s).is_empty());
    assert_eq!(s.stats().deferred_acks_sent, 0);
}

#[test]
fn without_deferral_every_data_segment_is_acknowledged_at_once() {
    let mut s = stack();
    let l = s.listen(7, 4).unwrap();
    let mut p = Peer::new(5003, 7);
    let (_sock, _) = connect(&mut s, l, &mut p, Some(1460), None, 0);
    for i in 0..3u64 {
        let f = p.data(b"x", 65535);
        s.receive_frame(&f, (i + 1) * MS);
        let out = drain_segs(&mut s);
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0].ack, p.seq);
    }
    s.end_turn();
    assert!(drain_segs(&mut s).is_empty());
}
