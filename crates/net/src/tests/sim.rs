//! Whole-connection simulation against an independent TCP: smoltcp's client socket, wired
//! frame by frame to our stack through a seeded link that drops, duplicates and reorders.
//!
//! The server side runs as replicas in lockstep, the way primary and backup do: every replica is
//! fed the same frames, timer calls and guest calls at the same virtual times, and their output
//! frames must be identical. Scenarios add a snapshot/restore in the middle of the transfer, a
//! backup cloned from a snapshot, and a failover with held-back outputs.

use std::collections::{BTreeMap, VecDeque};

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr};

use super::*;
use crate::rng::Rng;
use crate::{ListenerId, NetError, NetStack, SocketId};

const US: u64 = 1_000;
const PORT: u16 = 7777;

// ---------------------------------------------------------------------------------------------
// The client: smoltcp over an in-memory device
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Dev {
    rx: VecDeque<Vec<u8>>,
    tx: Vec<Vec<u8>>,
}

struct Rx(Vec<u8>);
struct Tx<'a>(&'a mut Vec<Vec<u8>>);

impl smoltcp::phy::RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl smoltcp::phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut b = vec![0; len];
        let r = f(&mut b);
        self.0.push(b);
        r
    }
}

impl Device for Dev {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _t: Instant) -> Option<(Rx, Tx<'_>)> {
        let b = self.rx.pop_front()?;
        Some((Rx(b), Tx(&mut self.tx)))
    }

    fn transmit(&mut self, _t: Instant) -> Option<Tx<'_>> {
        Some(Tx(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = 1514;
        c
    }
}

fn inst(ns: u64) -> Instant {
    Instant::from_micros((ns / US) as i64)
}

struct ClientConn {
    handle: SocketHandle,
    local_port: u16,
    to_send: Vec<u8>,
    sent: usize,
    received: Vec<u8>,
    closed: bool,
}

struct Client {
    dev: Dev,
    iface: Interface,
    sockets: SocketSet<'static>,
    conns: Vec<ClientConn>,
}

impl Client {
    fn new(seed: u64, data: Vec<(u16, Vec<u8>)>) -> Client {
        let mut dev = Dev::default();
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(CLIENT_MAC)));
        config.random_seed = seed;
        let mut iface = Interface::new(config, &mut dev, inst(0));
        iface.update_ip_addrs(|a| {
            a.push(IpCidr::new(IpAddress::v4(198, 18, 0, 2), 24))
                .unwrap();
        });
        let mut sockets = SocketSet::new(Vec::new());
        let mut conns = Vec::new();
        for (local_port, to_send) in data {
            let sock = tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0; 256 * 1024]),
                tcp::SocketBuffer::new(vec![0; 256 * 1024]),
            );
            let handle = sockets.add(sock);
            let s = sockets.get_mut::<tcp::Socket>(handle);
            s.connect(
                iface.context(),
                (IpAddress::v4(198, 18, 0, 1), PORT),
                local_port,
            )
            .unwrap();
            conns.push(ClientConn {
                handle,
                local_port,
                to_send,
                sent: 0,
                received: Vec::new(),
                closed: false,
            });
        }
        Client {
            dev,
            iface,
            sockets,
            conns,
        }
    }

    fn step(&mut self, now: u64, reading: bool) {
        self.iface.poll(inst(now), &mut self.dev, &mut self.sockets);
        let mut buf = [0u8; 16 * 1024];
        for c in &mut self.conns {
            let s = self.sockets.get_mut::<tcp::Socket>(c.handle);
            while reading && s.can_recv() {
                let n = s.recv_slice(&mut buf).expect("client recv");
                if n == 0 {
                    break;
                }
                c.received.extend_from_slice(&buf[..n]);
            }
            while s.can_send() && c.sent < c.to_send.len() {
                let n = s.send_slice(&c.to_send[c.sent..]).expect("client send");
                if n == 0 {
                    break;
                }
                c.sent += n;
            }
            if c.sent == c.to_send.len() && !c.closed && s.state() == tcp::State::Established {
                s.close();
                c.closed = true;
            }
        }
        self.iface.poll(inst(now), &mut self.dev, &mut self.sockets);
    }

    fn received(&self) -> usize {
        self.conns.iter().map(|c| c.received.len()).sum()
    }

    fn all_done(&self, expected: &BTreeMap<u16, Vec<u8>>) -> bool {
        self.conns.iter().all(|c| {
            let st = self.sockets.get::<tcp::Socket>(c.handle).state();
            matches!(st, tcp::State::TimeWait | tcp::State::Closed)
                && c.received.len() == expected[&c.local_port].len()
        })
    }

    fn poll_at(&mut self, now: u64) -> Option<u64> {
        self.iface
            .poll_at(inst(now), &self.sockets)
            .map(|i| i.total_micros() as u64 * US)
    }
}

// ---------------------------------------------------------------------------------------------
// The server guest: accept connections, send each its data, read theirs, close when both done.
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq)]
struct SrvConn {
    peer_port: u16,
    sent: usize,
    received: Vec<u8>,
    eof: bool,
    closed: bool,
}

#[derive(Clone, Debug, PartialEq)]
struct ServerApp {
    listener: ListenerId,
    conns: BTreeMap<u32, SrvConn>,
}

impl ServerApp {
    fn new(stack: &mut NetStack) -> ServerApp {
        let listener = stack.listen(PORT, 16).unwrap();
        ServerApp {
            listener,
            conns: BTreeMap::new(),
        }
    }

    fn step(&mut self, st: &mut NetStack, to_send: &BTreeMap<u16, Vec<u8>>, now: u64) {
        loop {
            match st.accept(self.listener) {
                Ok(s) => {
                    let (ip, peer_port) = st.peer_addr(s).expect("accepted socket has a peer");
                    assert_eq!(ip, CLIENT_IP);
                    let c = SrvConn {
                        peer_port,
                        sent: 0,
                        received: Vec::new(),
                        eof: false,
                        closed: false,
                    };
                    self.conns.insert(s.0, c);
                }
                Err(NetError::WouldBlock) => break,
                Err(e) => panic!("accept: {e}"),
            }
        }
        let mut buf = [0u8; 16 * 1024];
        for (&id, c) in &mut self.conns {
            let s = SocketId(id);
            if c.closed {
                continue;
            }
            let data = &to_send[&c.peer_port];
            loop {
                match st.recv(s, &mut buf, false) {
                    Ok(0) => {
                        c.eof = true;
                        break;
                    }
                    Ok(n) => c.received.extend_from_slice(&buf[..n]),
                    Err(NetError::WouldBlock) => break,
                    Err(e) => panic!("server recv: {e}"),
                }
            }
            while c.sent < data.len() {
                match st.send(s, &data[c.sent..], now) {
                    Ok(n) => c.sent += n,
                    Err(NetError::WouldBlock) => break,
                    Err(e) => panic!("server send: {e}"),
                }
            }
            if c.sent == data.len() && c.eof {
                st.close(s, now);
                c.closed = true;
            }
        }
    }

    fn received(&self) -> usize {
        self.conns.values().map(|c| c.received.len()).sum()
    }
}

// ---------------------------------------------------------------------------------------------
// The link
// ---------------------------------------------------------------------------------------------

struct Link {
    rng: Rng,
    /// (delivery time, insertion order) -> (to the server?, frame)
    queue: BTreeMap<(u64, u64), (bool, Vec<u8>)>,
    order: u64,
    loss_ppm: u64,
    dup_ppm: u64,
    reorder_ppm: u64,
    latency_ns: u64,
}

impl Link {
    fn chance(&mut self, ppm: u64) -> bool {
        self.rng.next_u64() % 1_000_000 < ppm
    }

    fn send(&mut self, to_server: bool, frame: Vec<u8>, now: u64) {
        if self.chance(self.loss_ppm) {
            return;
        }
        let copies = if self.chance(self.dup_ppm) { 2 } else { 1 };
        for _ in 0..copies {
            let mut t = now + self.latency_ns;
            if self.chance(self.reorder_ppm) {
                t += (1 + self.rng.next_u64() % 3000) * US;
            }
            self.queue
                .insert((t, self.order), (to_server, frame.clone()));
            self.order += 1;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The simulation
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum Event {
    /// Replace the primary by `restore(save())` of itself.
    SnapshotRestore,
    /// Add a backup cloned from a snapshot of the primary (FT VMotion).
    CloneBackup,
    /// Hold the primary's outputs for this long (they are never sent), then fail over to the
    /// first backup: `announce()` and `retransmit_all()`.
    Failover { hold_ns: u64 },
}

struct SimCfg {
    seed: u64,
    /// Parallel connections.
    conns: usize,
    /// Bytes the server sends on each connection.
    server_bytes: usize,
    /// Bytes the client sends on each connection.
    client_bytes: usize,
    loss_ppm: u64,
    dup_ppm: u64,
    reorder_ppm: u64,
    replicas: usize,
    /// Events fired when the bytes delivered (both directions, all connections) reach a count.
    events: Vec<(usize, Event)>,
    /// The client stops reading for this long once this many bytes were delivered.
    client_read_pause: Option<(usize, u64)>,
    /// The server defers ACKs to the end of each step (`NetStack::set_defer_acks`).
    defer_acks: bool,
}

impl SimCfg {
    fn new(seed: u64, bytes_each_way: usize) -> SimCfg {
        SimCfg {
            seed,
            conns: 1,
            server_bytes: bytes_each_way,
            client_bytes: bytes_each_way,
            loss_ppm: 0,
            dup_ppm: 0,
            reorder_ppm: 0,
            replicas: 1,
            events: vec![],
            client_read_pause: None,
            defer_acks: false,
        }
    }

    /// 5% loss, 1% duplication, 2% reordering.
    fn lossy(self) -> SimCfg {
        SimCfg {
            loss_ppm: 50_000,
            dup_ppm: 10_000,
            reorder_ppm: 20_000,
            ..self
        }
    }
}

struct Outcome {
    output_hash: [u8; 32],
    final_state_hash: [u8; 32],
    stats: crate::Stats,
    virtual_ns: u64,
}

fn pattern(seed: u64, n: usize) -> Vec<u8> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.next_u64() as u8).collect()
}

fn run(cfg: SimCfg) -> Outcome {
    let ports: Vec<u16> = (0..cfg.conns as u16).map(|i| 49152 + i).collect();
    let server_data: BTreeMap<u16, Vec<u8>> = ports
        .iter()
        .map(|&p| {
            (
                p,
                pattern(cfg.seed ^ 0x5e00 ^ u64::from(p), cfg.server_bytes),
            )
        })
        .collect();
    let client_data: BTreeMap<u16, Vec<u8>> = ports
        .iter()
        .map(|&p| {
            (
                p,
                pattern(cfg.seed ^ 0xc100 ^ u64::from(p), cfg.client_bytes),
            )
        })
        .collect();
    let mut link = Link {
        rng: Rng::new(cfg.seed),
        queue: BTreeMap::new(),
        order: 0,
        loss_ppm: cfg.loss_ppm,
        dup_ppm: cfg.dup_ppm,
        reorder_ppm: cfg.reorder_ppm,
        latency_ns: 500 * US,
    };
    let mut client = Client::new(
        cfg.seed,
        client_data.iter().map(|(&p, d)| (p, d.clone())).collect(),
    );
    let mut replicas: Vec<(NetStack, ServerApp)> = Vec::new();
    for _ in 0..cfg.replicas.max(1) {
        let mut st = NetStack::new(super::cfg(), cfg.seed);
        st.set_defer_acks(cfg.defer_acks);
        let app = ServerApp::new(&mut st);
        replicas.push((st, app));
    }
    let mut events = cfg.events.clone();
    let mut output_hasher = blake3::Hasher::new();
    let mut hold_until: Option<u64> = None;
    let mut read_pause = cfg.client_read_pause;
    let mut paused_until: Option<u64> = None;
    let mut now: u64 = 0;
    let mut steps: u64 = 0;
    let ctx = format!("seed {}", cfg.seed);
    loop {
        steps += 1;
        assert!(
            steps < 3_000_000,
            "{ctx}: simulation did not finish (now = {now} ns)"
        );
        if now >= 3_600 * SEC {
            let st = &replicas[0].0;
            panic!(
                "{ctx}: simulation ran an hour of virtual time: client got {}, server got {}, stats {:?}, stack {:#?}",
                client.received(),
                replicas[0].1.received(),
                st.stats(),
                st.debug_tcbs()
            );
        }

        // Deliver due frames.
        while let Some((&k, _)) = link.queue.first_key_value() {
            if k.0 > now {
                break;
            }
            let (to_server, f) = link.queue.remove(&k).unwrap();
            if to_server {
                for (st, _) in &mut replicas {
                    st.receive_frame(&f, now);
                }
            } else {
                client.dev.rx.push_back(f);
            }
        }

        let reading = paused_until.is_none_or(|t| now >= t);
        client.step(now, reading);
        for f in client.dev.tx.drain(..) {
            link.send(true, f, now);
        }

        // Server replicas in lockstep.
        let mut outputs: Vec<Vec<Vec<u8>>> = Vec::new();
        for (st, app) in &mut replicas {
            st.poll(now);
            app.step(st, &server_data, now);
            // The end of the server's turn, as at a VM's wait point.
            st.end_turn();
            outputs.push(st.drain_frames().collect());
        }
        for (i, o) in outputs.iter().enumerate().skip(1) {
            assert!(o == &outputs[0], "{ctx}: replica {i} diverged at {now} ns");
        }
        if steps.is_multiple_of(256) {
            let h0 = replicas[0].0.state_hash();
            for (i, (st, _)) in replicas.iter().enumerate().skip(1) {
                assert_eq!(
                    st.state_hash(),
                    h0,
                    "{ctx}: replica {i} state hash diverged at {now} ns"
                );
            }
            replicas[0].0.check_invariants();
        }
        let holding = hold_until.is_some();
        for f in outputs.swap_remove(0) {
            output_hasher.update(&f);
            if !holding {
                link.send(false, f, now);
            }
        }

        // Events.
        let progress = client.received() + replicas[0].1.received();
        if let Some((at, dur)) = read_pause {
            if progress >= at {
                paused_until = Some(now + dur);
                read_pause = None;
            }
        }
        while let Some(&(at, ev)) = events.first() {
            if progress < at {
                break;
            }
            events.remove(0);
            match ev {
                Event::SnapshotRestore => {
                    let (st, app) = &replicas[0];
                    let restored = NetStack::restore(&st.save()).expect("restore");
                    assert_eq!(&restored, st);
                    let app = app.clone();
                    replicas[0] = (restored, app);
                }
                Event::CloneBackup => {
                    let (st, app) = &replicas[0];
                    let clone = NetStack::restore(&st.save()).expect("restore");
                    let app = app.clone();
                    replicas.push((clone, app));
                }
                Event::Failover { hold_ns } => {
                    assert!(replicas.len() >= 2, "{ctx}: failover needs a backup");
                    hold_until = Some(now + hold_ns);
                }
            }
        }
        if let Some(t) = hold_until {
            if now >= t {
                // The primary dies with its held outputs; the backup goes live.
                replicas.remove(0);
                hold_until = None;
                let (st, _) = &mut replicas[0];
                st.announce();
                st.retransmit_all(now);
                let live: Vec<Vec<u8>> = st.drain_frames().collect();
                for f in live {
                    output_hasher.update(&f);
                    link.send(false, f, now);
                }
            }
        }

        // Done?
        let (st, app) = &replicas[0];
        if app.conns.len() == cfg.conns
            && app.conns.values().all(|c| c.closed)
            && client.all_done(&server_data)
            && st.stats().sockets_open == 0
            && events.is_empty()
        {
            break;
        }

        // Advance virtual time to the next event.
        let mut next = u64::MAX;
        if let Some((&(t, _), _)) = link.queue.first_key_value() {
            next = next.min(t);
        }
        if let Some(d) = replicas[0].0.next_deadline_ns() {
            next = next.min(d);
        }
        if let Some(t) = client.poll_at(now) {
            next = next.min(t);
        }
        for t in [hold_until, paused_until.filter(|&t| t > now)]
            .into_iter()
            .flatten()
        {
            next = next.min(t);
        }
        assert!(
            next != u64::MAX,
            "{ctx}: deadlock at {now} ns: nothing scheduled"
        );
        let next = next.max(now + US);
        now = next.div_ceil(US) * US;
    }

    let (st, app) = &replicas[0];
    for c in &client.conns {
        assert!(
            c.received == server_data[&c.local_port],
            "{ctx}: client port {} got wrong bytes",
            c.local_port
        );
    }
    for c in app.conns.values() {
        assert!(
            c.received == client_data[&c.peer_port],
            "{ctx}: server got wrong bytes from port {}",
            c.peer_port
        );
    }
    st.check_invariants();
    if std::env::var_os("FTVM_NET_SIM_VERBOSE").is_some() {
        eprintln!(
            "sim {ctx}: {} ms virtual, {steps} steps, {:?}",
            now / MS,
            st.stats()
        );
    }
    Outcome {
        output_hash: output_hasher.finalize().into(),
        final_state_hash: st.state_hash(),
        stats: st.stats(),
        virtual_ns: now,
    }
}

const MIB: usize = 1024 * 1024;

#[test]
fn bulk_both_ways_clean_link() {
    let o = run(SimCfg::new(1, 4 * MIB));
    assert_eq!(
        o.stats.retransmits, 0,
        "a clean link needs no retransmission"
    );
    assert_eq!(o.stats.conn_established, 1);
    assert!(
        o.virtual_ns < 2 * SEC,
        "4 MiB each way on a clean 1 ms link: {} ns",
        o.virtual_ns
    );
}

#[test]
fn bulk_both_ways_lossy_duplicating_reordering_link() {
    let o = run(SimCfg::new(7, 4 * MIB).lossy());
    assert!(
        o.stats.retransmits > 50,
        "5% loss must cause retransmissions: {:?}",
        o.stats
    );
    assert!(
        o.stats.fast_retransmits > 0,
        "some losses are repaired by fast retransmit: {:?}",
        o.stats
    );
}

#[test]
fn bulk_both_ways_with_deferred_acks_on_clean_and_lossy_links() {
    let clean = run(SimCfg {
        defer_acks: true,
        ..SimCfg::new(3, 4 * MIB)
    });
    assert_eq!(clean.stats.retransmits, 0, "{:?}", clean.stats);
    assert!(
        clean.virtual_ns < 2 * SEC,
        "4 MiB each way on a clean link with deferred ACKs: {} ns",
        clean.virtual_ns
    );
    let lossy = run(SimCfg {
        defer_acks: true,
        ..SimCfg::new(7, 4 * MIB).lossy()
    });
    assert!(lossy.stats.fast_retransmits > 0, "{:?}", lossy.stats);
    for seed in [11, 12, 13] {
        run(SimCfg {
            defer_acks: true,
            ..SimCfg::new(seed, MIB).lossy()
        });
    }
}

#[test]
fn our_sender_recovers_mostly_by_fast_retransmit() {
    // Server to client only, so the time measured is our sender's (smoltcp's RTO floor is 1 s).
    let o = run(SimCfg {
        client_bytes: 1,
        ..SimCfg::new(8, 4 * MIB).lossy()
    });
    assert!(
        o.stats.fast_retransmits > o.stats.rto_fired,
        "NewReno + limited transmit should repair most losses without a timeout: {:?}",
        o.stats
    );
    assert!(
        o.virtual_ns < 60 * SEC,
        "4 MiB at 5% loss took {} s of virtual time",
        o.virtual_ns / SEC
    );
}

#[test]
fn lossy_sweep_over_seeds() {
    for seed in 100..106 {
        run(SimCfg::new(seed, 512 * 1024).lossy());
    }
}

#[test]
fn many_parallel_connections() {
    let o = run(SimCfg {
        conns: 12,
        ..SimCfg::new(41, 256 * 1024).lossy()
    });
    assert_eq!(o.stats.conn_established, 12);
}

#[test]
fn client_that_stops_reading_is_probed_then_resumes() {
    // The client stops reading for 20 s: its 256 KiB buffer fills, its window closes, we probe.
    let o = run(SimCfg {
        client_read_pause: Some((64 * 1024, 20 * SEC)),
        ..SimCfg::new(51, MIB)
    });
    assert!(o.stats.zero_window_probes > 0, "{:?}", o.stats);
    assert!(o.virtual_ns > 20 * SEC);
}

#[test]
fn replicas_stay_identical_and_runs_repeat_exactly() {
    let cfg = || SimCfg {
        replicas: 2,
        ..SimCfg::new(11, MIB).lossy()
    };
    let a = run(cfg());
    let b = run(cfg());
    assert_eq!(
        a.output_hash, b.output_hash,
        "same seed, same output frames"
    );
    assert_eq!(a.final_state_hash, b.final_state_hash);
    let c = run(SimCfg { seed: 12, ..cfg() });
    assert_ne!(
        a.output_hash, c.output_hash,
        "the seed matters (ISNs, losses)"
    );
}

#[test]
fn snapshot_restore_mid_transfer_continues() {
    run(SimCfg {
        replicas: 2,
        events: vec![
            (MIB / 2, Event::SnapshotRestore),
            (2 * MIB, Event::SnapshotRestore),
        ],
        ..SimCfg::new(21, 2 * MIB).lossy()
    });
}

#[test]
fn cloned_backup_takes_over_after_failover() {
    let o = run(SimCfg {
        conns: 3,
        events: vec![
            (MIB / 2, Event::CloneBackup),
            (3 * MIB / 2, Event::Failover { hold_ns: 30 * MS }),
        ],
        ..SimCfg::new(31, MIB).lossy()
    });
    assert!(o.stats.retransmits > 0);
}

#[test]
fn failover_with_long_hold_on_clean_link() {
    // Nothing is lost on the wire, so everything the client gets after the hold comes from
    // retransmit_all and the normal timers of the new primary.
    let o = run(SimCfg {
        replicas: 2,
        events: vec![(MIB, Event::Failover { hold_ns: 200 * MS })],
        ..SimCfg::new(61, MIB)
    });
    assert!(
        o.stats.retransmits > 0,
        "go-live re-sends what was held: {:?}",
        o.stats
    );
    assert_eq!(
        o.stats.arp_requests_sent,
        crate::GRATUITOUS_ARP_COUNT as u64
    );
}
