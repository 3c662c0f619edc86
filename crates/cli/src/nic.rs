//! The VM's NIC on the host: a TAP device. The VM thread reads it itself at its wait points
//! (`TapFrames`, a `FrameSource` of the gate: no thread and no hand-off between the frame's
//! arrival and the VM), and writes it directly. With seeded faults for tests (`tc netem` is not
//! available on our machines) a reader thread reads it instead, applies the faults (which may
//! sleep) and queues the frames for the VM.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};
use ftvm_log::ControlOp;
use ftvm_vm::gate::{ChannelFrames, FrameSource};

/// Inbound frames queued between the TAP reader and the VM; more are dropped, like a full NIC ring.
pub const NIC_QUEUE_FRAMES_MAX: usize = 4096;
/// Largest frame read or written (Ethernet 1514 plus a VLAN tag).
pub const NIC_FRAME_BYTES_MAX: usize = 1518;
/// How often the reader looks at its stop flag while the device is idle.
const READER_POLL_MS: i32 = 100;
/// Longest a VM thread waiting on the device goes without looking at its control channel (the
/// power-off signal watcher itself looks every 20 ms).
const CONTROL_POLL_MS: u64 = 20;
/// Read buffer: larger than any frame, so an oversized one is seen whole and dropped.
const READ_BUF_BYTES: usize = 65536;

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Counters of the attachment.
#[derive(Default, Debug)]
pub struct NicStats {
    pub frames_in: AtomicU64,
    pub frames_out: AtomicU64,
    pub dropped_queue_full: AtomicU64,
    pub dropped_disabled: AtomicU64,
    pub dropped_fault: AtomicU64,
    pub dropped_oversized: AtomicU64,
}

/// A TAP attachment: frames in (read by the VM thread, or by a reader thread when faults are
/// injected), frames out.
pub struct Nic {
    fd: Arc<OwnedFd>,
    /// Frames from the reader thread (fault injection only).
    rx: Option<Receiver<Vec<u8>>>,
    enabled: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    pub stats: Arc<NicStats>,
    reader: Option<std::thread::JoinHandle<()>>,
}

/// Sends frames out of the NIC; cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct NicTx {
    fd: Arc<OwnedFd>,
    stats: Arc<NicStats>,
}

fn open_tap(name: &str) -> std::io::Result<OwnedFd> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "TAP name must be 1 to 15 bytes",
        ));
    }
    // SAFETY: a NUL-terminated path literal; the returned fd is checked below.
    let fd = unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a freshly opened descriptor that we own from here on.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes an `ifreq`, whose layout `IfReq` matches (name, flags, padding).
    let rc = unsafe { libc::ioctl(owned.as_raw_fd(), TUNSETIFF as _, &mut req as *mut IfReq) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(owned)
}

impl Nic {
    /// Attaches to TAP device `tap` with an optional seeded fault spec (`drop=..,dup=..`).
    pub fn open(tap: &str, fault: Option<&str>) -> Result<Nic, String> {
        let faults = match fault {
            Some(spec) => Some(Faults::parse(spec)?),
            None => None,
        };
        let fd = Arc::new(open_tap(tap).map_err(|e| {
            format!("{e} (needs root or CAP_NET_ADMIN, and the device in this network namespace)")
        })?);
        let enabled = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(NicStats::default());
        let Some(faults) = faults else {
            return Ok(Nic {
                fd,
                rx: None,
                enabled,
                stop,
                stats,
                reader: None,
            });
        };
        let faults = Some(faults);
        let (tx, rx) = bounded(NIC_QUEUE_FRAMES_MAX);
        let reader = {
            let (fd, enabled, stop, stats) =
                (fd.clone(), enabled.clone(), stop.clone(), stats.clone());
            std::thread::Builder::new()
                .name(format!("ftvm-tap-{tap}"))
                .spawn(move || read_loop(fd, tx, enabled, stop, stats, faults))
                .map_err(|e| e.to_string())?
        };
        Ok(Nic {
            fd,
            rx: Some(rx),
            enabled,
            stop,
            stats,
            reader: Some(reader),
        })
    }

    /// The inbound frames, for the VM's `World`.
    pub fn frame_source(&self) -> Box<dyn FrameSource> {
        match &self.rx {
            Some(rx) => ChannelFrames::boxed(rx.clone()),
            None => Box::new(TapFrames {
                fd: self.fd.clone(),
                stats: self.stats.clone(),
                buf: vec![0u8; READ_BUF_BYTES],
            }),
        }
    }

    pub fn transmitter(&self) -> NicTx {
        NicTx {
            fd: self.fd.clone(),
            stats: self.stats.clone(),
        }
    }

    /// A backup attaches deaf: inbound frames are discarded until go-live (without a reader
    /// thread, nobody reads the device meanwhile and the kernel drops what does not fit its
    /// queue).
    pub fn set_enabled(&self, enabled: bool) {
        if enabled {
            // Whatever queued while deaf is stale.
            match &self.rx {
                Some(rx) => while rx.try_recv().is_ok() {},
                None => {
                    let mut buf = vec![0u8; READ_BUF_BYTES];
                    while read_frame(&self.fd, &mut buf).is_some() {
                        self.stats.dropped_disabled.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        self.enabled.store(enabled, Ordering::SeqCst);
    }
}

impl Drop for Nic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

impl NicTx {
    pub fn send(&self, frame: Vec<u8>) {
        if frame.len() > NIC_FRAME_BYTES_MAX {
            self.stats.dropped_oversized.fetch_add(1, Ordering::Relaxed);
            return;
        }
        loop {
            // SAFETY: writes `frame.len()` bytes from a live buffer to our own descriptor.
            let n = unsafe { libc::write(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
            if n >= 0 {
                self.stats.frames_out.fetch_add(1, Ordering::Relaxed);
                return;
            }
            let err = std::io::Error::last_os_error();
            match err.kind() {
                std::io::ErrorKind::Interrupted => continue,
                // The device queue is full: wait a moment once, then drop (TCP will resend).
                std::io::ErrorKind::WouldBlock => {
                    wait_fd(self.fd.as_raw_fd(), libc::POLLOUT, 10);
                    // SAFETY: as above.
                    let n = unsafe {
                        libc::write(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len())
                    };
                    if n >= 0 {
                        self.stats.frames_out.fetch_add(1, Ordering::Relaxed);
                    }
                    return;
                }
                _ => return,
            }
        }
    }
}

/// Reads one frame without blocking: its length, or `None` when the device has nothing (or
/// failed: the VM then sees no more frames, as with an unplugged cable).
fn read_frame(fd: &OwnedFd, buf: &mut [u8]) -> Option<usize> {
    loop {
        // SAFETY: reads into our own buffer of `buf.len()` bytes.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n > 0 {
            return Some(n as usize);
        }
        if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        return None;
    }
}

/// The TAP device as the VM thread's frame source: read at wait points, no thread in between.
struct TapFrames {
    fd: Arc<OwnedFd>,
    stats: Arc<NicStats>,
    buf: Vec<u8>,
}

impl FrameSource for TapFrames {
    fn take_ready(&mut self, into: &mut Vec<Vec<u8>>, max: usize) {
        while into.len() < max {
            let Some(n) = read_frame(&self.fd, &mut self.buf) else {
                return;
            };
            if n > NIC_FRAME_BYTES_MAX {
                self.stats.dropped_oversized.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            self.stats.frames_in.fetch_add(1, Ordering::Relaxed);
            into.push(self.buf[..n].to_vec());
        }
    }

    fn wait(
        &mut self,
        timeout: Duration,
        control: Option<&Receiver<ControlOp>>,
    ) -> Option<ControlOp> {
        if let Some(op) = control.and_then(|c| c.try_recv().ok()) {
            return Some(op);
        }
        let step = timeout.min(Duration::from_millis(CONTROL_POLL_MS));
        let ts = libc::timespec {
            tv_sec: step.as_secs() as libc::time_t,
            tv_nsec: step.subsec_nanos() as libc::c_long,
        };
        let mut p = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd and a valid timespec for the duration of the call; no signal
        // mask is passed.
        let n = unsafe { libc::ppoll(&mut p, 1, &ts, std::ptr::null()) };
        if n > 0 && p.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
            // The device is gone (its namespace was torn down, say): an unplugged cable. Wait
            // out the step rather than spin on the error.
            std::thread::sleep(step);
        }
        control.and_then(|c| c.try_recv().ok())
    }
}

fn wait_fd(fd: i32, events: libc::c_short, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut p, 1, ms) > 0 }
}

fn read_loop(
    fd: Arc<OwnedFd>,
    tx: Sender<Vec<u8>>,
    enabled: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    stats: Arc<NicStats>,
    mut faults: Option<Faults>,
) {
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::SeqCst) {
        if !wait_fd(fd.as_raw_fd(), libc::POLLIN, READER_POLL_MS) {
            continue;
        }
        loop {
            // SAFETY: reads into our own buffer of `buf.len()` bytes.
            let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break;
            }
            let n = n as usize;
            if n > NIC_FRAME_BYTES_MAX {
                stats.dropped_oversized.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if !enabled.load(Ordering::SeqCst) {
                stats.dropped_disabled.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let frames = match faults.as_mut() {
                Some(f) => f.apply(buf[..n].to_vec(), &stats),
                None => vec![buf[..n].to_vec()],
            };
            for frame in frames {
                match tx.try_send(frame) {
                    Ok(()) => {
                        stats.frames_in.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(TrySendError::Full(_)) => {
                        stats.dropped_queue_full.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(TrySendError::Disconnected(_)) => return,
                }
            }
        }
    }
    let _ = Duration::ZERO;
}

/// Seeded faults on the inbound path: drop, duplicate, reorder (hold one frame back and release
/// it after the next) and delay. Deterministic for a seed and a frame sequence.
pub struct Faults {
    drop: f64,
    dup: f64,
    reorder: f64,
    delay_ms: u64,
    state: u64,
    held: Option<Vec<u8>>,
}

impl Faults {
    /// `drop=0.05,dup=0.01,reorder=0.01,delay=5,seed=7` (any subset).
    pub fn parse(spec: &str) -> Result<Faults, String> {
        let mut f = Faults {
            drop: 0.0,
            dup: 0.0,
            reorder: 0.0,
            delay_ms: 0,
            state: 0x9e37_79b9_7f4a_7c15,
            held: None,
        };
        for part in spec.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("fault {part:?}: expected KEY=VALUE"))?;
            let prob = || {
                v.parse::<f64>()
                    .ok()
                    .filter(|p| (0.0..=1.0).contains(p))
                    .ok_or_else(|| format!("fault {k}={v}: expected a probability 0..1"))
            };
            match k {
                "drop" => f.drop = prob()?,
                "dup" => f.dup = prob()?,
                "reorder" => f.reorder = prob()?,
                "delay" => {
                    f.delay_ms = v
                        .parse()
                        .map_err(|_| format!("fault delay={v}: expected milliseconds"))?
                }
                "seed" => {
                    f.state = v
                        .parse::<u64>()
                        .map_err(|_| format!("fault seed={v}: expected a number"))?
                        | 1
                }
                other => {
                    return Err(format!(
                        "unknown fault {other:?} (drop, dup, reorder, delay, seed)"
                    ))
                }
            }
        }
        Ok(f)
    }

    fn next(&mut self) -> f64 {
        // splitmix64
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    /// The frames to deliver now for one arriving frame.
    pub fn apply(&mut self, frame: Vec<u8>, stats: &NicStats) -> Vec<Vec<u8>> {
        if self.delay_ms > 0 {
            std::thread::sleep(Duration::from_millis(self.delay_ms));
        }
        if self.next() < self.drop {
            stats.dropped_fault.fetch_add(1, Ordering::Relaxed);
            return Vec::new();
        }
        let mut out = Vec::new();
        if self.held.is_none() && self.next() < self.reorder {
            self.held = Some(frame);
            return out;
        }
        let dup = self.next() < self.dup;
        if dup {
            out.push(frame.clone());
        }
        out.push(frame);
        if let Some(h) = self.held.take() {
            out.push(h);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_are_seeded_and_roughly_at_their_rates() {
        let stats = NicStats::default();
        let run = |seed: u64| {
            let mut f =
                Faults::parse(&format!("drop=0.05,dup=0.01,reorder=0.01,seed={seed}")).unwrap();
            (0..100_000u32)
                .flat_map(|i| f.apply(i.to_le_bytes().to_vec(), &stats))
                .collect::<Vec<_>>()
        };
        let a = run(7);
        assert_eq!(a, run(7), "same seed, same frames");
        assert_ne!(a, run(8));
        let n = a.len() as f64;
        assert!((n - 100_000.0 * 0.96).abs() < 1500.0, "delivered {n}");
        let reordered = a
            .windows(2)
            .filter(|w| {
                u32::from_le_bytes(w[1][..4].try_into().unwrap())
                    < u32::from_le_bytes(w[0][..4].try_into().unwrap())
            })
            .count();
        assert!(reordered > 500, "reordered {reordered}");
        assert!(Faults::parse("drop=2").is_err());
        assert!(Faults::parse("bogus=1").is_err());
    }
}
