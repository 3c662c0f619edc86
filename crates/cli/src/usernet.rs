//! User-mode networking for `ftvm run` (`--nic user,hostfwd=HOSTPORT:GUESTPORT`): reach a guest's
//! TCP listeners from this host without root, a TAP device or CAP_NET_ADMIN.
//!
//! ```text
//!  host client ─TCP─► 127.0.0.1:HOSTPORT        one thread, `ftvm-usernet`
//!                         │ accept              ┌────────────────────────────────────────────┐
//!                         └────────────────────►│ smoltcp Interface (host side, 10.0.2.2)    │
//!                                               │ one TCP client socket per host connection, │
//!                                               │ connected to GUESTIP:GUESTPORT             │
//!                                               └───────┬───────────────────────▲────────────┘
//!                                     frames to the VM  │ bounded channel       │ bounded channel
//!                                                       ▼                       │ + wake-up
//!                                World (the gate: recorded) ──► VM ──► ConsolePort (frames out)
//! ```
//!
//! Each accepted host connection gets a smoltcp TCP socket that connects from the host side's
//! address (an ephemeral port) to the guest's port; the guest sees an ordinary client on its
//! subnet. Bytes are copied both ways with the smoltcp socket buffers as the only buffers: we read
//! from the host only while the socket's transmit buffer has room, and take from its receive
//! buffer only what the host socket accepts, so a slow reader on either side holds the other back.
//! A half-close either way is passed on as a half-close (FIN ↔ `shutdown(Write)`). A reset guest
//! connection, a refused one (no listener) or a guest silent for [`USERNET_GUEST_SILENCE_MAX_S`]
//! resets the host connection; a failed host connection resets the guest's.
//!
//! # Why nondeterminism is fine here
//!
//! All of this is the host edge, like the TAP device in `nic.rs`: the VM sees only Ethernet
//! frames, which enter at gate points and are recorded as `Input` entries. `ftvm run --record`
//! and `ftvm replay` reproduce a user-mode session exactly; the replay needs no network.
//!
//! # What it is not
//!
//! Not a real L2 segment: only forwarded host ports reach the guest (over loopback only), the
//! guest cannot open connections (its netstack is server-side anyway), and there is no
//! gratuitous-ARP takeover after a failover. It is for single-host `ftvm run`, not `ftvm ft`.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};
use ftvm_log::NicSpec;
use ftvm_vm::exit_code;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::{Duration as NetDuration, Instant as NetInstant};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr};

use crate::nic::NIC_FRAME_BYTES_MAX;
use crate::opts::Failure;

/// The guest's MAC when `mac=` is not given (QEMU's default; locally administered, unicast).
pub const USERNET_DEFAULT_GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// The guest's address when `ip=` is not given (as QEMU's slirp; the prefix is /24).
pub const USERNET_DEFAULT_GUEST_IP: [u8; 4] = [10, 0, 2, 15];
/// The host side's MAC (as QEMU's slirp; locally administered, unicast).
pub const USERNET_HOST_MAC: [u8; 6] = [0x52, 0x55, 0x0a, 0x00, 0x02, 0x02];
/// Most `hostfwd=` rules in one `--nic`.
pub const USERNET_FORWARDS_MAX: usize = 16;
/// Most forwarded connections open at once (the guest's netstack has 512 sockets); more wait in
/// the host listener's backlog until one ends.
pub const USERNET_CONNECTIONS_MAX: usize = 256;
/// Each forwarded connection's smoltcp buffer, per direction (the only buffering on the way; at
/// most 64 MiB in all, allocated per connection).
pub const USERNET_SOCKET_BUFFER_BYTES: usize = 128 << 10;
/// Frames queued in each direction between this thread and the VM; more are dropped, like a full
/// NIC ring (TCP resends).
pub const USERNET_QUEUE_FRAMES_MAX: usize = 4096;
/// A guest that sends nothing for this long while we wait for it (a connect, unacknowledged
/// data) has its connection reset, and the host's with it.
pub const USERNET_GUEST_SILENCE_MAX_S: u64 = 60;
/// Longest sleep of the thread without a timer, a frame or a host socket to wake it.
const WAIT_MS_MAX: i32 = 1000;
/// After an `accept` error other than "nothing to accept" (out of descriptors, say), listeners
/// rest this long instead of failing in a busy loop.
const ACCEPT_BACKOFF_MS: u64 = 100;
/// Host-side local ports for connections to the guest (the IANA ephemeral range).
const LOCAL_PORT_FIRST: u16 = 49152;
/// Bytes of wake-up signals read per call.
const WAKE_READ_BYTES: usize = 64;

/// One `hostfwd=HOSTPORT:GUESTPORT` rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostForward {
    pub host_port: u16,
    pub guest_port: u16,
}

/// The host side of a user-mode NIC (the guest side is the VM's `NicSpec`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserNetConfig {
    /// The host side's address on the guest's subnet (smoltcp answers ARP for it).
    pub host_ip: Ipv4Addr,
    pub forwards: Vec<HostForward>,
}

/// Counters of the attachment (for tests and debugging).
#[derive(Default, Debug)]
pub struct UserNetStats {
    pub frames_to_vm: AtomicU64,
    pub frames_from_vm: AtomicU64,
    pub dropped_to_vm_queue_full: AtomicU64,
    pub dropped_from_vm_queue_full: AtomicU64,
    pub dropped_oversized: AtomicU64,
    pub connections_accepted: AtomicU64,
    /// Accepted, then reset: a connection to the guest could not be started.
    pub connections_refused: AtomicU64,
    pub connections_reset: AtomicU64,
}

fn count(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// A running user-mode NIC: host listeners and the forwarding thread. Dropping it stops the
/// thread and closes every host socket.
pub struct UserNet {
    to_vm_rx: Receiver<Vec<u8>>,
    /// Held so the VM's channel never reports a disconnect (which would wake it in a loop) while
    /// the attachment lives, even if the thread ended.
    _to_vm_tx: Sender<Vec<u8>>,
    from_vm_tx: Sender<Vec<u8>>,
    waker: Arc<Waker>,
    stop: Arc<AtomicBool>,
    pub stats: Arc<UserNetStats>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Wakes the thread from `poll`: one byte on a socket pair, written only when none is pending,
/// so the VM thread makes at most one system call per batch of frames.
struct Waker {
    pending: AtomicBool,
    tx: UnixStream,
}

impl Waker {
    fn wake(&self) {
        if !self.pending.swap(true, Ordering::SeqCst) {
            // A full socket buffer already holds a wake-up; nothing else can fail usefully.
            let _ = (&self.tx).write(&[1]);
        }
    }
}

fn io_failure(message: String) -> Failure {
    Failure {
        code: exit_code::IO,
        message,
        detail: String::new(),
    }
}

impl UserNet {
    /// Binds every host port (on 127.0.0.1 only) and starts the thread. `guest_listeners` are the
    /// VM's `--listen` ports: a rule to any other port could only ever be refused.
    pub fn start(
        spec: &NicSpec,
        cfg: &UserNetConfig,
        guest_listeners: &[u16],
    ) -> Result<UserNet, Failure> {
        for f in &cfg.forwards {
            if !guest_listeners.contains(&f.guest_port) {
                return Err(Failure::usage(format!(
                    "--nic hostfwd={}:{}: the guest does not listen on port {} (add --listen {})",
                    f.host_port, f.guest_port, f.guest_port, f.guest_port
                )));
            }
        }
        let mut listeners = Vec::new();
        for f in &cfg.forwards {
            let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, f.host_port);
            let listener = TcpListener::bind(addr).map_err(|e| {
                let hint = if e.kind() == ErrorKind::AddrInUse {
                    "; another program has that port: choose another HOSTPORT"
                } else {
                    ""
                };
                io_failure(format!(
                    "--nic hostfwd={}:{}: cannot listen on {addr}: {e}{hint}",
                    f.host_port, f.guest_port
                ))
            })?;
            listener
                .set_nonblocking(true)
                .map_err(|e| io_failure(format!("cannot make {addr} non-blocking: {e}")))?;
            listeners.push((listener, f.guest_port));
        }
        let (wake_tx, wake_rx) = UnixStream::pair()
            .map_err(|e| io_failure(format!("cannot create the user-mode NIC's wake-up: {e}")))?;
        for s in [&wake_tx, &wake_rx] {
            s.set_nonblocking(true).map_err(|e| {
                io_failure(format!("cannot create the user-mode NIC's wake-up: {e}"))
            })?;
        }
        let waker = Arc::new(Waker {
            pending: AtomicBool::new(false),
            tx: wake_tx,
        });
        let (to_vm_tx, to_vm_rx) = bounded(USERNET_QUEUE_FRAMES_MAX);
        let (from_vm_tx, from_vm_rx) = bounded(USERNET_QUEUE_FRAMES_MAX);
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(UserNetStats::default());
        let engine = Engine::new(
            spec,
            cfg,
            listeners,
            to_vm_tx.clone(),
            from_vm_rx,
            wake_rx,
            waker.clone(),
            stop.clone(),
            stats.clone(),
        );
        let thread = std::thread::Builder::new()
            .name("ftvm-usernet".into())
            .spawn(move || engine.run())
            .map_err(|e| io_failure(format!("cannot start the user-mode NIC's thread: {e}")))?;
        Ok(UserNet {
            to_vm_rx,
            _to_vm_tx: to_vm_tx,
            from_vm_tx,
            waker,
            stop,
            stats,
            thread: Some(thread),
        })
    }

    /// Frames into the VM (for `World::new`).
    pub fn receiver(&self) -> Receiver<Vec<u8>> {
        self.to_vm_rx.clone()
    }

    /// Takes the frames the VM sends (for `ConsolePort`); never blocks the VM thread.
    pub fn transmit_fn(&self) -> Box<dyn FnMut(Vec<u8>) + Send> {
        let tx = self.from_vm_tx.clone();
        let waker = self.waker.clone();
        let stats = self.stats.clone();
        Box::new(move |frame: Vec<u8>| {
            if frame.len() > NIC_FRAME_BYTES_MAX {
                count(&stats.dropped_oversized);
                return;
            }
            match tx.try_send(frame) {
                Ok(()) => count(&stats.frames_from_vm),
                Err(TrySendError::Full(_)) => count(&stats.dropped_from_vm_queue_full),
                Err(TrySendError::Disconnected(_)) => return,
            }
            waker.wake();
        })
    }
}

/// One line for the operator: the addresses and every forward.
pub fn describe(spec: &NicSpec, cfg: &UserNetConfig) -> String {
    let forwards: Vec<String> = cfg
        .forwards
        .iter()
        .map(|f| format!("127.0.0.1:{} -> port {}", f.host_port, f.guest_port))
        .collect();
    format!(
        "user-mode NIC: guest {}/{} ({}), host side {}; forwarding {}",
        Ipv4Addr::from(spec.ip),
        spec.prefix_len,
        ftvm_log::spec::mac_to_string(&spec.mac),
        cfg.host_ip,
        forwards.join(", ")
    )
}

impl Drop for UserNet {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.waker.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The virtual device between smoltcp and the VM's frame channels
// ---------------------------------------------------------------------------------------------

struct FrameDevice {
    /// Frames the VM sent, not yet seen by smoltcp.
    rx: VecDeque<Vec<u8>>,
    to_vm: Sender<Vec<u8>>,
    stats: Arc<UserNetStats>,
}

struct RxFrame(Vec<u8>);

struct TxFrame<'a> {
    to_vm: &'a Sender<Vec<u8>>,
    stats: &'a UserNetStats,
}

impl smoltcp::phy::RxToken for RxFrame {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl smoltcp::phy::TxToken for TxFrame<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0; len];
        let r = f(&mut frame);
        match self.to_vm.try_send(frame) {
            Ok(()) => count(&self.stats.frames_to_vm),
            // The VM is behind (or not taking frames yet): drop like a full NIC ring.
            Err(_) => count(&self.stats.dropped_to_vm_queue_full),
        }
        r
    }
}

impl Device for FrameDevice {
    type RxToken<'a> = RxFrame;
    type TxToken<'a> = TxFrame<'a>;

    fn receive(&mut self, _now: NetInstant) -> Option<(RxFrame, TxFrame<'_>)> {
        let frame = self.rx.pop_front()?;
        Some((
            RxFrame(frame),
            TxFrame {
                to_vm: &self.to_vm,
                stats: &self.stats,
            },
        ))
    }

    fn transmit(&mut self, _now: NetInstant) -> Option<TxFrame<'_>> {
        Some(TxFrame {
            to_vm: &self.to_vm,
            stats: &self.stats,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        // Ethernet header included: a 1500-byte IP MTU, as the guest's netstack.
        c.max_transmission_unit = 1514;
        c
    }
}

// ---------------------------------------------------------------------------------------------
// The forwarding thread
// ---------------------------------------------------------------------------------------------

/// One forwarded connection: a host socket and its smoltcp socket to the guest.
struct Conn {
    host: TcpStream,
    handle: SocketHandle,
    local_port: u16,
    /// The host finished sending; the guest got (or will get, after the data) our FIN.
    host_eof: bool,
    /// The guest finished sending and the host got everything; its write half is shut.
    guest_eof: bool,
    /// Reading from or writing to the host failed: the guest's connection was aborted (RST).
    host_failed: bool,
}

struct Engine {
    iface: Interface,
    dev: FrameDevice,
    sockets: SocketSet<'static>,
    listeners: Vec<(TcpListener, u16)>,
    conns: Vec<Conn>,
    guest_ip: Ipv4Addr,
    from_vm: Receiver<Vec<u8>>,
    wake_rx: UnixStream,
    waker: Arc<Waker>,
    stop: Arc<AtomicBool>,
    stats: Arc<UserNetStats>,
    start: std::time::Instant,
    next_local_port: u16,
    accept_paused_until: Option<std::time::Instant>,
    /// The connection limit was reached once (and said so).
    limit_reported: bool,
    pollfds: Vec<libc::pollfd>,
}

/// What one read from the host gave.
enum HostRead {
    Data,
    Blocked,
    Eof,
    Failed,
}

fn read_host(host: &TcpStream, buf: &mut [u8]) -> (usize, HostRead) {
    if buf.is_empty() {
        return (0, HostRead::Blocked);
    }
    loop {
        return match (&*host).read(buf) {
            Ok(0) => (0, HostRead::Eof),
            Ok(n) => (n, HostRead::Data),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock => (0, HostRead::Blocked),
            Err(_) => (0, HostRead::Failed),
        };
    }
}

/// Writes what the host takes now: `(bytes taken, Ok(bytes) | Err(failed))`.
fn write_host(host: &TcpStream, buf: &mut [u8]) -> (usize, Result<usize, ()>) {
    if buf.is_empty() {
        return (0, Ok(0));
    }
    loop {
        return match (&*host).write(buf) {
            Ok(n) => (n, Ok(n)),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock => (0, Ok(0)),
            Err(_) => (0, Err(())),
        };
    }
}

/// Makes closing `stream` send a reset instead of a FIN (SO_LINGER with a zero timeout), so the
/// host's client sees "connection reset", as it would from a real server.
fn reset_on_close(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: passes a live `linger` of the size given to setsockopt on a descriptor we own.
    let _ = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
}

impl Conn {
    /// Copies what can be copied now, both ways, and passes on half-closes and host failures.
    fn pump(&mut self, sock: &mut tcp::Socket<'_>) {
        if self.host_failed {
            return;
        }
        // Guest to host: dequeue only what the host socket took.
        loop {
            match sock.recv(|buf| write_host(&self.host, buf)) {
                Ok(Ok(0)) => break,
                Ok(Ok(_)) => continue,
                Ok(Err(())) => {
                    self.host_failed = true;
                    sock.abort();
                    return;
                }
                // The guest's FIN, after all its data went to the host.
                Err(tcp::RecvError::Finished) => {
                    if !self.guest_eof {
                        self.guest_eof = true;
                        let _ = self.host.shutdown(Shutdown::Write);
                    }
                    break;
                }
                // Not connected yet, or reset: `Engine::reap` decides.
                Err(tcp::RecvError::InvalidState) => break,
            }
        }
        // Host to guest: read only into free transmit buffer space.
        while !self.host_eof && sock.can_send() {
            match sock.send(|buf| read_host(&self.host, buf)) {
                Ok(HostRead::Data) => continue,
                Ok(HostRead::Blocked) | Err(_) => break,
                Ok(HostRead::Eof) => {
                    self.host_eof = true;
                    sock.close();
                }
                Ok(HostRead::Failed) => {
                    self.host_failed = true;
                    sock.abort();
                    return;
                }
            }
        }
    }

    /// The host events worth waking for.
    fn interest(&self, sock: &tcp::Socket<'_>) -> libc::c_short {
        if self.host_failed {
            return 0;
        }
        let mut events = 0;
        if !self.host_eof && sock.can_send() {
            events |= libc::POLLIN;
        }
        if sock.recv_queue() > 0 {
            events |= libc::POLLOUT;
        }
        events
    }
}

impl Engine {
    #[allow(clippy::too_many_arguments)]
    fn new(
        spec: &NicSpec,
        cfg: &UserNetConfig,
        listeners: Vec<(TcpListener, u16)>,
        to_vm: Sender<Vec<u8>>,
        from_vm: Receiver<Vec<u8>>,
        wake_rx: UnixStream,
        waker: Arc<Waker>,
        stop: Arc<AtomicBool>,
        stats: Arc<UserNetStats>,
    ) -> Engine {
        let mut dev = FrameDevice {
            rx: VecDeque::new(),
            to_vm,
            stats: stats.clone(),
        };
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(USERNET_HOST_MAC)));
        // Initial sequence numbers and the like: fresh each run, as a real host's. Host edge,
        // so nondeterminism is fine (the VM sees the frames through the gate).
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        config.random_seed = nanos ^ (u64::from(std::process::id()) << 32);
        let start = std::time::Instant::now();
        let mut iface = Interface::new(config, &mut dev, NetInstant::from_micros(0));
        iface.update_ip_addrs(|addrs| {
            // One address on an empty list cannot overflow it.
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(cfg.host_ip), spec.prefix_len));
        });
        Engine {
            iface,
            dev,
            sockets: SocketSet::new(Vec::new()),
            listeners,
            conns: Vec::new(),
            guest_ip: Ipv4Addr::from(spec.ip),
            from_vm,
            wake_rx,
            waker,
            stop,
            stats,
            start,
            next_local_port: LOCAL_PORT_FIRST,
            accept_paused_until: None,
            limit_reported: false,
            pollfds: Vec::new(),
        }
    }

    fn now(&self) -> NetInstant {
        NetInstant::from_micros(self.start.elapsed().as_micros() as i64)
    }

    fn run(mut self) {
        while !self.stop.load(Ordering::SeqCst) {
            self.take_wakeups();
            // Frames the VM sent; the channel is bounded, so this loop is too.
            while let Ok(frame) = self.from_vm.try_recv() {
                self.dev.rx.push_back(frame);
            }
            self.accept();
            let now = self.now();
            // Ingress (the VM's frames) and due timers, then the host sockets, then the frames
            // those produced (data, FINs, RSTs, window updates), then the verdicts.
            self.iface.poll(now, &mut self.dev, &mut self.sockets);
            for c in &mut self.conns {
                c.pump(self.sockets.get_mut::<tcp::Socket>(c.handle));
            }
            self.iface.poll(now, &mut self.dev, &mut self.sockets);
            self.reap();
            let delay = self.iface.poll_delay(self.now(), &self.sockets);
            self.wait(delay);
        }
    }

    /// Reads the pending wake-up bytes, then re-arms the waker (in this order: a frame queued
    /// after the re-arm writes a new byte, one queued before it is taken by the caller next).
    fn take_wakeups(&mut self) {
        let mut buf = [0u8; WAKE_READ_BYTES];
        while matches!((&self.wake_rx).read(&mut buf), Ok(n) if n > 0) {}
        self.waker.pending.store(false, Ordering::SeqCst);
    }

    fn accept(&mut self) {
        if let Some(until) = self.accept_paused_until {
            if std::time::Instant::now() < until {
                return;
            }
            self.accept_paused_until = None;
        }
        for i in 0..self.listeners.len() {
            loop {
                if self.conns.len() >= USERNET_CONNECTIONS_MAX {
                    // New connections wait in the kernel's backlog (a full server's behavior);
                    // `wait` stops watching the listeners until one of ours ends.
                    if !self.limit_reported {
                        self.limit_reported = true;
                        eprintln!(
                            "ftvm: user-mode NIC: {USERNET_CONNECTIONS_MAX} forwarded connections \
                             are open; new ones wait until some close (reported once)"
                        );
                    }
                    return;
                }
                let stream = match self.listeners[i].0.accept() {
                    Ok((stream, _)) => stream,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e)
                        if matches!(
                            e.kind(),
                            ErrorKind::Interrupted | ErrorKind::ConnectionAborted
                        ) =>
                    {
                        continue
                    }
                    Err(e) => {
                        eprintln!(
                            "ftvm: user-mode NIC: accept on {:?} failed: {e}; pausing {ACCEPT_BACKOFF_MS} ms",
                            self.listeners[i].0.local_addr().ok()
                        );
                        self.accept_paused_until = Some(
                            std::time::Instant::now()
                                + std::time::Duration::from_millis(ACCEPT_BACKOFF_MS),
                        );
                        return;
                    }
                };
                let guest_port = self.listeners[i].1;
                if !self.open(stream, guest_port) {
                    count(&self.stats.connections_refused);
                }
            }
        }
    }

    /// Starts a connection to the guest for `stream`; false (and `stream` reset) if it cannot.
    fn open(&mut self, stream: TcpStream, guest_port: u16) -> bool {
        let refuse = |stream: TcpStream| {
            reset_on_close(&stream);
            false
        };
        if stream.set_nonblocking(true).is_err() {
            return refuse(stream);
        }
        // Segments from the guest are passed on as they come; batching is the client's call.
        let _ = stream.set_nodelay(true);
        let Some(local_port) = self.free_local_port() else {
            return refuse(stream);
        };
        let mut sock = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; USERNET_SOCKET_BUFFER_BYTES]),
            tcp::SocketBuffer::new(vec![0; USERNET_SOCKET_BUFFER_BYTES]),
        );
        sock.set_nagle_enabled(false);
        sock.set_timeout(Some(NetDuration::from_secs(USERNET_GUEST_SILENCE_MAX_S)));
        let remote = (IpAddress::Ipv4(self.guest_ip), guest_port);
        if sock
            .connect(self.iface.context(), remote, local_port)
            .is_err()
        {
            return refuse(stream);
        }
        let handle = self.sockets.add(sock);
        self.conns.push(Conn {
            host: stream,
            handle,
            local_port,
            host_eof: false,
            guest_eof: false,
            host_failed: false,
        });
        count(&self.stats.connections_accepted);
        true
    }

    fn free_local_port(&mut self) -> Option<u16> {
        let span = usize::from(u16::MAX - LOCAL_PORT_FIRST) + 1;
        for _ in 0..span {
            let port = self.next_local_port;
            self.next_local_port = if port == u16::MAX {
                LOCAL_PORT_FIRST
            } else {
                port + 1
            };
            if !self.conns.iter().any(|c| c.local_port == port) {
                return Some(port);
            }
        }
        None
    }

    /// Drops the connections that are over, resetting the host side unless both sides closed
    /// cleanly.
    fn reap(&mut self) {
        let mut i = 0;
        while i < self.conns.len() {
            let c = &self.conns[i];
            let sock = self.sockets.get::<tcp::Socket>(c.handle);
            let done = if c.host_failed {
                // The abort's RST went out in the poll before this.
                true
            } else {
                match sock.state() {
                    // Data still on its way to the host goes first (a clean end is then seen by
                    // `pump` as `Finished`).
                    tcp::State::Closed if sock.recv_queue() > 0 => false,
                    tcp::State::Closed => {
                        if !(c.host_eof && c.guest_eof) {
                            // Reset, refused (no listener) or silent too long.
                            reset_on_close(&c.host);
                            count(&self.stats.connections_reset);
                        }
                        true
                    }
                    // Both FINs exchanged and everything delivered: nothing left to wait for.
                    tcp::State::TimeWait => c.host_eof && c.guest_eof,
                    _ => false,
                }
            };
            if done {
                let c = self.conns.swap_remove(i);
                self.sockets.remove(c.handle);
            } else {
                i += 1;
            }
        }
    }

    /// Sleeps until a wake-up (VM frames, stop), a host socket event or smoltcp's next timer.
    fn wait(&mut self, delay: Option<NetDuration>) {
        let pollfd = |fd, events| libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        self.pollfds.clear();
        self.pollfds
            .push(pollfd(self.wake_rx.as_raw_fd(), libc::POLLIN));
        if self.accept_paused_until.is_none() && self.conns.len() < USERNET_CONNECTIONS_MAX {
            for (l, _) in &self.listeners {
                self.pollfds.push(pollfd(l.as_raw_fd(), libc::POLLIN));
            }
        }
        for c in &self.conns {
            // A socket with nothing wanted stays out: POLLHUP would wake us for nothing.
            let events = c.interest(self.sockets.get::<tcp::Socket>(c.handle));
            if events != 0 {
                self.pollfds.push(pollfd(c.host.as_raw_fd(), events));
            }
        }
        let mut timeout_ms = match delay {
            Some(d) => d.total_micros().div_ceil(1000).min(WAIT_MS_MAX as u64) as i32,
            None => WAIT_MS_MAX,
        };
        if self.accept_paused_until.is_some() {
            timeout_ms = timeout_ms.min(ACCEPT_BACKOFF_MS as i32);
        }
        // SAFETY: `pollfds` is a live, initialized array of `len` pollfd structs for the call.
        let _ = unsafe {
            libc::poll(
                self.pollfds.as_mut_ptr(),
                self.pollfds.len() as libc::nfds_t,
                timeout_ms,
            )
        };
    }
}

#[cfg(test)]
mod tests {
    //! The forwarder against the VM's own netstack (`ftvm-net`) run on a test thread in place of
    //! a VM: no wasm, so closes and resets can be driven precisely.

    use super::*;
    use ftvm_net::{NetStack, NicConfig, SocketId};
    use std::time::{Duration, Instant};

    const GUEST_PORT: u16 = 7000;
    const UNLISTENED_PORT: u16 = 7001;

    /// What the fake guest does with its connections.
    #[derive(Clone, Copy, PartialEq)]
    enum Behavior {
        /// Echo everything; close after the peer's FIN once all is echoed.
        Echo,
        /// Send a greeting, then close without reading anything (a reset, since data is unread).
        GreetAndReset,
    }

    struct FakeGuest {
        stop: Arc<AtomicBool>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl Drop for FakeGuest {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::SeqCst);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    fn spec() -> NicSpec {
        NicSpec {
            mac: USERNET_DEFAULT_GUEST_MAC,
            ip: USERNET_DEFAULT_GUEST_IP,
            prefix_len: 24,
            gateway: Some([10, 0, 2, 2]),
            seed: 1,
        }
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    /// A user-mode NIC forwarding a free host port to GUEST_PORT and another to UNLISTENED_PORT
    /// (where nothing listens: `start` is told it does, to test the refusal).
    fn start(behavior: Behavior) -> (UserNet, FakeGuest, u16, u16) {
        let (p, q) = (free_port(), free_port());
        let cfg = UserNetConfig {
            host_ip: Ipv4Addr::new(10, 0, 2, 2),
            forwards: vec![
                HostForward {
                    host_port: p,
                    guest_port: GUEST_PORT,
                },
                HostForward {
                    host_port: q,
                    guest_port: UNLISTENED_PORT,
                },
            ],
        };
        let net = UserNet::start(&spec(), &cfg, &[GUEST_PORT, UNLISTENED_PORT]).unwrap();
        let rx = net.receiver();
        let mut tx = net.transmit_fn();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let s = spec();
            let mut stack = NetStack::new(
                NicConfig {
                    mac: s.mac,
                    ip: s.ip,
                    prefix_len: s.prefix_len,
                    gateway: s.gateway,
                    mtu: 1500,
                },
                7,
            );
            let listener = stack.listen(GUEST_PORT, 16).unwrap();
            let t0 = Instant::now();
            let mut socks: Vec<(SocketId, Vec<u8>, bool)> = Vec::new();
            let mut buf = vec![0u8; 64 << 10];
            while !stop2.load(Ordering::SeqCst) {
                let now = t0.elapsed().as_nanos() as u64;
                if let Ok(f) = rx.recv_timeout(Duration::from_millis(2)) {
                    stack.receive_frame(&f, now);
                    while let Ok(f) = rx.try_recv() {
                        stack.receive_frame(&f, now);
                    }
                }
                stack.poll(now);
                while let Ok(s) = stack.accept(listener) {
                    if behavior == Behavior::GreetAndReset {
                        stack.send(s, b"hello, then reset\n", now).unwrap();
                    }
                    socks.push((s, Vec::new(), false));
                }
                socks.retain_mut(|(s, pending, eof)| match behavior {
                    Behavior::GreetAndReset => {
                        if stack.readiness(*s).readable {
                            stack.close(*s, now);
                            return false;
                        }
                        true
                    }
                    Behavior::Echo => {
                        while !*eof && pending.len() < (1 << 20) {
                            match stack.recv(*s, &mut buf, false) {
                                Ok(0) => *eof = true,
                                Ok(n) => pending.extend_from_slice(&buf[..n]),
                                Err(_) => break,
                            }
                        }
                        while !pending.is_empty() {
                            match stack.send(*s, pending, now) {
                                Ok(n) => {
                                    pending.drain(..n);
                                }
                                Err(_) => break,
                            }
                        }
                        if *eof && pending.is_empty() {
                            stack.close(*s, now);
                            return false;
                        }
                        true
                    }
                });
                for f in stack.drain_frames() {
                    tx(f);
                }
            }
        });
        let guest = FakeGuest {
            stop,
            thread: Some(thread),
        };
        (net, guest, p, q)
    }

    fn connect(port: u16) -> TcpStream {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s
    }

    #[test]
    fn bytes_and_half_closes_cross_both_ways() {
        let (net, _guest, port, _) = start(Behavior::Echo);
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let mut s = connect(port);
        let mut w = s.try_clone().unwrap();
        let sent = data.clone();
        let writer = std::thread::spawn(move || {
            w.write_all(&sent).unwrap();
            // Our FIN must reach the guest, whose echo then ends with its own FIN.
            w.shutdown(Shutdown::Write).unwrap();
        });
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        writer.join().unwrap();
        assert_eq!(got.len(), data.len());
        assert!(got == data, "echoed bytes differ");
        let accepted = net.stats.connections_accepted.load(Ordering::Relaxed);
        assert_eq!(accepted, 1);
        assert_eq!(net.stats.connections_reset.load(Ordering::Relaxed), 0);
        assert!(net.stats.frames_to_vm.load(Ordering::Relaxed) > 2000);
    }

    #[test]
    fn a_reset_by_the_guest_resets_the_host_connection() {
        let (net, _guest, port, _) = start(Behavior::GreetAndReset);
        let mut s = connect(port);
        s.write_all(b"unread request").unwrap();
        let mut got = Vec::new();
        let err = s
            .read_to_end(&mut got)
            .expect_err("a reset, not a clean end");
        assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
        assert_eq!(net.stats.connections_reset.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_port_without_a_guest_listener_resets_the_host_connection() {
        let (net, _guest, _, unlistened) = start(Behavior::Echo);
        let mut s = connect(unlistened);
        let mut got = Vec::new();
        let err = s.read_to_end(&mut got).expect_err("refused by the guest");
        assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
        assert!(got.is_empty());
        assert_eq!(net.stats.connections_reset.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn many_connections_at_once_each_get_their_own_bytes() {
        let (net, _guest, port, _) = start(Behavior::Echo);
        let clients: Vec<_> = (0..8u8)
            .map(|k| {
                std::thread::spawn(move || {
                    let mut s = connect(port);
                    let data = vec![k; 100_000 + usize::from(k)];
                    s.write_all(&data).unwrap();
                    s.shutdown(Shutdown::Write).unwrap();
                    let mut got = Vec::new();
                    s.read_to_end(&mut got).unwrap();
                    assert!(got == data, "client {k} got other bytes");
                })
            })
            .collect();
        for c in clients {
            c.join().unwrap();
        }
        assert_eq!(net.stats.connections_accepted.load(Ordering::Relaxed), 8);
    }

    #[test]
    fn a_host_port_in_use_or_a_guest_port_not_listened_on_is_refused() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let cfg = |host_port| UserNetConfig {
            host_ip: Ipv4Addr::new(10, 0, 2, 2),
            forwards: vec![HostForward {
                host_port,
                guest_port: 80,
            }],
        };
        let e = UserNet::start(&spec(), &cfg(port), &[80])
            .err()
            .expect("port in use");
        assert_eq!(e.code, exit_code::IO);
        assert!(
            e.message.contains("choose another HOSTPORT"),
            "{}",
            e.message
        );
        let e = UserNet::start(&spec(), &cfg(free_port()), &[81])
            .err()
            .expect("no guest listener");
        assert_eq!(e.code, exit_code::USAGE);
        assert!(e.message.contains("--listen 80"), "{}", e.message);
    }

    #[test]
    fn dropping_the_attachment_stops_its_thread_and_closes_the_ports() {
        let (net, guest, port, _) = start(Behavior::Echo);
        let s = connect(port);
        let start = Instant::now();
        drop(guest);
        drop(net);
        assert!(start.elapsed() < Duration::from_secs(2), "a prompt stop");
        // The listener is gone and the open connection ended.
        assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
        let mut got = Vec::new();
        let _ = (&s).read_to_end(&mut got);
        assert!(got.is_empty());
    }
}
