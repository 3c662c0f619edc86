//! The gate: the one way a non-deterministic value enters the VM.
//!
//! Every clock reading, random byte, network frame, wake-up time of a blocking call and operator
//! control operation the guest can observe is asked of the gate. In record mode the gate asks the
//! real world (`World`) and appends a log entry; in replay mode it returns the recorded value and
//! checks that the guest asked for the same kind of thing at the same point. Nothing else in the
//! VM reads a clock, a random source or the network.
//!
//! The gate also owns the VM's output path, because outputs are what the Output Rule delays: every
//! output is tagged with the sequence number of the last entry recorded before it, digested (so
//! replay can compare what it produced), and handed to an `OutputPort`, which decides when it may
//! leave (at once for a plain run, after the backup's ack on a primary, never on a backup).
//!
//! Checkpoints: every `checkpoint_events` gate events the recorder writes the output digest and a
//! hash of the VM state; the replayer computes its own at the same event and stops on a mismatch.

use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError};
use ftvm_log::entry::{
    hex, CLOCK_MONOTONIC, CLOCK_PROCESS_CPUTIME, CLOCK_REALTIME, CLOCK_THREAD_CPUTIME,
};
use ftvm_log::entry::{INPUT_FRAMES_MAX, RANDOM_CHUNK_BYTES_MAX};
use ftvm_log::{Checkpoint, ControlOp, Entry, EntryKind};

use crate::VmError;

/// Where recorded entries go: a file, the log channel, both, or nowhere (a plain run).
pub trait LogSink: Send {
    fn append(&mut self, seq: u64, entry: &Entry) -> Result<(), VmError>;
    /// An output tagged with the last appended entry is waiting: send everything now.
    fn flush(&mut self) -> Result<(), VmError>;
    /// The guest is blocking; a good moment to push buffered entries out.
    fn idle(&mut self) -> Result<(), VmError> {
        self.flush()
    }
    /// Flow control: how long the primary should pause before going on (0 when the backup keeps up).
    fn pace(&mut self) -> Duration {
        Duration::ZERO
    }
}

/// Where replayed entries come from: a log file or the log channel.
pub trait LogSource: Send {
    /// The next entry, blocking until it is there. `Ok(None)`: the log has ended.
    fn next_entry(&mut self) -> Result<Option<(u64, Entry)>, VmError>;
}

/// The way out of the VM for its outputs.
pub trait OutputPort: Send {
    /// `seq` is the last log entry recorded before the output was produced.
    fn emit(&mut self, output: Output, seq: u64) -> Result<(), VmError>;
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// Bytes the guest wrote to fd 1 or 2.
    Console { fd: u8, bytes: Vec<u8> },
    /// An Ethernet frame the VM's NIC transmits.
    Frame(Vec<u8>),
}

impl Output {
    pub fn len(&self) -> usize {
        match self {
            Output::Console { bytes, .. } => bytes.len(),
            Output::Frame(frame) => frame.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Discards outputs (a backup's). They are still digested by the gate.
pub struct DropOutputs;
impl OutputPort for DropOutputs {
    fn emit(&mut self, _: Output, _: u64) -> Result<(), VmError> {
        Ok(())
    }
}

/// A sink that keeps nothing: a plain run still goes through the gate, it just records nothing.
pub struct NullSink;
impl LogSink for NullSink {
    fn append(&mut self, _: u64, _: &Entry) -> Result<(), VmError> {
        Ok(())
    }
    fn flush(&mut self) -> Result<(), VmError> {
        Ok(())
    }
}

/// What a wait point delivered.
#[derive(Debug, Default)]
pub struct Wake {
    pub now_ns: u64,
    pub frames: Vec<Vec<u8>>,
    pub control: Option<ControlOp>,
}

/// The inbound side of the VM's NIC as a recording gate sees it: the I/O edge (a TAP device, user
/// mode networking) implements it. Only `World::wait` calls it, so frames enter only at wait
/// points and are recorded there.
pub trait FrameSource: Send {
    /// Moves frames that have arrived into `into`, without blocking, until it holds `max`.
    fn take_ready(&mut self, into: &mut Vec<Vec<u8>>, max: usize);
    /// Blocks until a frame may have arrived, `control` has an operation (returned), or about
    /// `timeout` has passed. May return early.
    fn wait(
        &mut self,
        timeout: Duration,
        control: Option<&Receiver<ControlOp>>,
    ) -> Option<ControlOp>;
}

/// Frames queued by another thread.
pub struct ChannelFrames {
    rx: Receiver<Vec<u8>>,
    /// A frame `wait` received, handed out by the next `take_ready`.
    early: Option<Vec<u8>>,
}

impl ChannelFrames {
    pub fn boxed(rx: Receiver<Vec<u8>>) -> Box<dyn FrameSource> {
        Box::new(ChannelFrames { rx, early: None })
    }
}

impl FrameSource for ChannelFrames {
    fn take_ready(&mut self, into: &mut Vec<Vec<u8>>, max: usize) {
        if into.len() < max {
            if let Some(f) = self.early.take() {
                into.push(f);
            }
        }
        while into.len() < max {
            match self.rx.try_recv() {
                Ok(frame) => into.push(frame),
                Err(_) => break,
            }
        }
    }

    fn wait(
        &mut self,
        timeout: Duration,
        control: Option<&Receiver<ControlOp>>,
    ) -> Option<ControlOp> {
        if self.early.is_some() {
            return None;
        }
        match control {
            Some(control) => crossbeam_channel::select! {
                recv(self.rx) -> f => match f {
                    Ok(f) => self.early = Some(f),
                    // The edge is gone; only the control channel and the clock remain.
                    Err(_) => return control.recv_timeout(timeout).ok(),
                },
                recv(control) -> c => return c.ok(),
                default(timeout) => {}
            },
            None => match self.rx.recv_timeout(timeout) {
                Ok(f) => self.early = Some(f),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => std::thread::sleep(timeout),
            },
        }
        None
    }
}

/// The real world, as seen by a recording gate: clocks, the OS random source, the NIC's inbound
/// frames and the channel on which operator control operations arrive.
pub struct World {
    /// Added to the host's monotonic clock so that virtual time never goes backwards when a VM
    /// moves to another host (go-live, migration).
    mono_offset_ns: i128,
    frames: Option<Box<dyn FrameSource>>,
    control: Option<Receiver<ControlOp>>,
}

impl World {
    pub fn new(
        frames: Option<Box<dyn FrameSource>>,
        control: Option<Receiver<ControlOp>>,
    ) -> World {
        World {
            mono_offset_ns: 0,
            frames,
            control,
        }
    }

    /// Makes this host's monotonic clock continue from `last_ns` (the last virtual time observed).
    pub fn continue_from(&mut self, last_ns: u64) {
        let host = host_clock(libc::CLOCK_MONOTONIC) as i128;
        self.mono_offset_ns = (last_ns as i128 + 1 - host).max(0);
    }

    fn mono_ns(&self) -> u64 {
        (host_clock(libc::CLOCK_MONOTONIC) as i128 + self.mono_offset_ns) as u64
    }

    fn clock(&self, clock_id: u32) -> u64 {
        match clock_id {
            CLOCK_REALTIME => host_clock(libc::CLOCK_REALTIME),
            CLOCK_MONOTONIC => self.mono_ns(),
            CLOCK_PROCESS_CPUTIME => host_clock(libc::CLOCK_PROCESS_CPUTIME_ID),
            _ => host_clock(libc::CLOCK_THREAD_CPUTIME_ID),
        }
    }

    fn random(&self, buf: &mut [u8]) -> Result<(), VmError> {
        let mut filled = 0;
        while filled < buf.len() {
            // SAFETY: the pointer and length describe the unfilled tail of `buf`, which we own.
            let n = unsafe {
                libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0)
            };
            if n < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(VmError::Internal(format!(
                    "the host's random source failed: {err}"
                )));
            }
            filled += n as usize;
        }
        Ok(())
    }

    /// Waits until a frame or control operation arrives or the virtual clock reaches `deadline`.
    fn wait(&mut self, deadline_ns: Option<u64>) -> Wake {
        let mut wake = Wake::default();
        loop {
            if let Some(control) = &self.control {
                if let Ok(op) = control.try_recv() {
                    wake.control = Some(op);
                }
            }
            if let Some(frames) = self.frames.as_mut() {
                frames.take_ready(&mut wake.frames, INPUT_FRAMES_MAX);
            }
            let now = self.mono_ns();
            if wake.control.is_some()
                || !wake.frames.is_empty()
                || deadline_ns.is_some_and(|d| now >= d)
            {
                wake.now_ns = now;
                return wake;
            }
            // Sleep until something arrives or the deadline passes. Without a frame channel and
            // a deadline this sleeps in bounded steps so a control operation is still noticed.
            let step = deadline_ns
                .map(|d| Duration::from_nanos(d - now))
                .unwrap_or(Duration::from_millis(100));
            let step = step.min(Duration::from_millis(100));
            match (self.frames.as_mut(), &self.control) {
                (Some(frames), control) => {
                    if let Some(op) = frames.wait(step, control.as_ref()) {
                        wake.control = Some(op);
                    }
                }
                (None, Some(control)) => match control.recv_timeout(step) {
                    Ok(c) => wake.control = Some(c),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => std::thread::sleep(step),
                },
                (None, None) => std::thread::sleep(step),
            }
        }
    }
}

fn host_clock(id: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(id, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime({id}) failed");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// What a replaying gate does when its log ends before the guest does.
pub trait ReplayEnd: Send {
    /// Return `Some` to go live (record from here on), `None` to stop with an error.
    fn on_log_end(&mut self, last_seq: u64, last_mono_ns: u64) -> Result<Option<GoLive>, VmError>;
}

/// Everything a replaying VM needs to start recording: the backup's go-live.
pub struct GoLive {
    pub sink: Box<dyn LogSink>,
    pub world: World,
    pub port: Box<dyn OutputPort>,
}

enum Mode {
    Record {
        sink: Box<dyn LogSink>,
        world: World,
    },
    Replay {
        source: Box<dyn LogSource>,
        end: Option<Box<dyn ReplayEnd>>,
    },
}

pub struct Gate {
    mode: Mode,
    /// Last log entry written or read.
    seq: u64,
    /// Gate events so far (checkpoints not counted).
    events: u64,
    /// The guest's WASI calls so far (the current one included): with `disk_ops`, names the disk
    /// operation a `HostError`/`HostShort` entry belongs to.
    host_calls: u64,
    /// Disk operations of the current WASI call so far.
    disk_ops: u32,
    /// Replay: the next entry, read ahead to see whether the recording's disk failed the
    /// operation about to run.
    lookahead: Option<(u64, Entry)>,
    /// Replay without a `ReplayEnd`: the log ended during a look-ahead; the next request fails.
    source_ended: bool,
    checkpoint_events: u64,
    digest: blake3::Hasher,
    output_bytes: u64,
    port: Box<dyn OutputPort>,
    /// Virtual time as last observed through the gate; deterministic, so the VM may use it.
    last_mono_ns: u64,
    last_realtime_ns: u64,
    /// The entry at which a replaying gate went live.
    went_live_at: Option<u64>,
    /// Went live and the VM has not yet done its go-live duties (announce, retransmit).
    live_duties_pending: bool,
    /// A debugging capture of every frame in and out, stamped with virtual time.
    capture: Option<crate::pcap::Capture>,
}

impl Gate {
    pub fn record(
        sink: Box<dyn LogSink>,
        world: World,
        port: Box<dyn OutputPort>,
        checkpoint_events: u64,
    ) -> Gate {
        Gate::new(Mode::Record { sink, world }, port, checkpoint_events)
    }

    pub fn replay(
        source: Box<dyn LogSource>,
        end: Option<Box<dyn ReplayEnd>>,
        port: Box<dyn OutputPort>,
        checkpoint_events: u64,
    ) -> Gate {
        Gate::new(Mode::Replay { source, end }, port, checkpoint_events)
    }

    fn new(mode: Mode, port: Box<dyn OutputPort>, checkpoint_events: u64) -> Gate {
        Gate {
            mode,
            seq: 0,
            events: 0,
            host_calls: 0,
            disk_ops: 0,
            lookahead: None,
            source_ended: false,
            checkpoint_events,
            digest: blake3::Hasher::new(),
            output_bytes: 0,
            port,
            last_mono_ns: 0,
            last_realtime_ns: 0,
            went_live_at: None,
            live_duties_pending: false,
            capture: None,
        }
    }

    /// Captures every frame the VM takes in or sends out (see `pcap`).
    pub fn set_capture(&mut self, capture: crate::pcap::Capture) {
        self.capture = Some(capture);
    }

    /// True once after going live: the caller announces the VM's addresses and retransmits.
    pub fn take_go_live_duties(&mut self) -> bool {
        std::mem::take(&mut self.live_duties_pending)
    }

    pub fn is_replaying(&self) -> bool {
        matches!(self.mode, Mode::Replay { .. })
    }
    pub fn seq(&self) -> u64 {
        self.seq
    }
    pub fn events(&self) -> u64 {
        self.events
    }
    /// The entry at which this VM stopped replaying and went live, if it did.
    pub fn went_live_at(&self) -> Option<u64> {
        self.went_live_at
    }
    pub fn output_bytes(&self) -> u64 {
        self.output_bytes
    }
    /// Virtual monotonic time as last observed through the gate.
    pub fn now_ns(&self) -> u64 {
        self.last_mono_ns
    }
    /// Virtual wall-clock time as last observed through the gate (0 before the first reading).
    pub fn realtime_ns(&self) -> u64 {
        self.last_realtime_ns
    }

    /// A clock reading (`clock_time_get`).
    pub fn clock(&mut self, clock_id: u32) -> Result<u64, VmError> {
        let ns = match &mut self.mode {
            Mode::Record { world, .. } => {
                let mut ns = world.clock(clock_id);
                if clock_id == CLOCK_MONOTONIC {
                    // Monotonic means monotonic, even across a change of host.
                    ns = ns.max(self.last_mono_ns);
                }
                self.append(Entry::Clock { clock_id, ns })?;
                ns
            }
            Mode::Replay { .. } => match self.next_replayed(EntryKind::Clock)? {
                Some(Entry::Clock { clock_id: id, ns }) if id == clock_id => ns,
                Some(Entry::Clock { clock_id: id, .. }) => {
                    return Err(self.diverged(format!(
                        "the guest read clock {clock_id}, the log has clock {id}"
                    )))
                }
                Some(other) => return Err(self.kind_mismatch(EntryKind::Clock, &other)),
                None => return self.clock(clock_id),
            },
        };
        match clock_id {
            CLOCK_MONOTONIC => self.last_mono_ns = self.last_mono_ns.max(ns),
            CLOCK_REALTIME => self.last_realtime_ns = ns,
            CLOCK_PROCESS_CPUTIME | CLOCK_THREAD_CPUTIME => {}
            _ => {}
        }
        self.events += 1;
        Ok(ns)
    }

    /// Random bytes (`random_get`), split into bounded entries.
    pub fn random(&mut self, buf: &mut [u8]) -> Result<(), VmError> {
        for chunk in buf.chunks_mut(RANDOM_CHUNK_BYTES_MAX) {
            match &mut self.mode {
                Mode::Record { world, .. } => {
                    world.random(chunk)?;
                    self.append(Entry::Random {
                        bytes: chunk.to_vec(),
                    })?;
                }
                Mode::Replay { .. } => match self.next_replayed(EntryKind::Random)? {
                    Some(Entry::Random { bytes }) if bytes.len() == chunk.len() => {
                        chunk.copy_from_slice(&bytes)
                    }
                    Some(Entry::Random { bytes }) => {
                        return Err(self.diverged(format!(
                            "the guest asked for {} random bytes, the log has {}",
                            chunk.len(),
                            bytes.len()
                        )))
                    }
                    Some(other) => return Err(self.kind_mismatch(EntryKind::Random, &other)),
                    None => return self.random(buf),
                },
            }
            self.events += 1;
        }
        Ok(())
    }

    /// A wait point: returns when the virtual clock reaches `deadline_ns`, a frame arrives or an
    /// operator control operation is pending. `Some(0)` (or any past deadline) polls without
    /// blocking. Always advances `now_ns`.
    pub fn wait(&mut self, deadline_ns: Option<u64>) -> Result<Wake, VmError> {
        let wake = match &mut self.mode {
            Mode::Record { world, sink } => {
                let blocking = deadline_ns.is_none_or(|d| d > self.last_mono_ns);
                if blocking {
                    sink.idle()?;
                }
                let mut wake = world.wait(deadline_ns);
                wake.now_ns = wake.now_ns.max(self.last_mono_ns);
                if let Some(op) = wake.control {
                    self.append(Entry::Control(op))?;
                }
                // Recorded without a copy: the entry lends the frames and hands them back.
                let entry = Entry::Input {
                    now_ns: wake.now_ns,
                    frames: std::mem::take(&mut wake.frames),
                };
                self.append_ref(&entry)?;
                if let Entry::Input { frames, .. } = entry {
                    wake.frames = frames;
                }
                wake
            }
            Mode::Replay { .. } => {
                let mut control = None;
                let first = self.next_replayed(EntryKind::Input)?;
                let entry = match first {
                    Some(Entry::Control(op)) => {
                        control = Some(op);
                        self.next_replayed(EntryKind::Input)?
                    }
                    other => other,
                };
                match entry {
                    Some(Entry::Input { now_ns, frames }) => Wake {
                        now_ns,
                        frames,
                        control,
                    },
                    Some(other) => return Err(self.kind_mismatch(EntryKind::Input, &other)),
                    // The log ended (we may have gone live): ask again, now in record mode.
                    None => {
                        let mut wake = self.wait(deadline_ns)?;
                        wake.control = wake.control.or(control);
                        return Ok(wake);
                    }
                }
            }
        };
        self.last_mono_ns = self.last_mono_ns.max(wake.now_ns);
        self.events += 1;
        if let Some(c) = self.capture.as_mut() {
            for f in &wake.frames {
                c.frame(wake.now_ns, f);
            }
        }
        Ok(wake)
    }

    /// Flow control: a pause the primary should take (the backup is lagging).
    pub fn pace(&mut self) -> Duration {
        match &mut self.mode {
            Mode::Record { sink, .. } => sink.pace(),
            Mode::Replay { .. } => Duration::ZERO,
        }
    }

    /// An external output: digested, tagged and handed to the output port.
    pub fn output(&mut self, output: Output) -> Result<(), VmError> {
        let (kind, bytes) = match &output {
            Output::Console { fd, bytes } => (*fd, bytes.as_slice()),
            Output::Frame(frame) => (0xff, frame.as_slice()),
        };
        self.digest.update(&[kind]);
        self.digest.update(&(bytes.len() as u64).to_le_bytes());
        self.digest.update(bytes);
        self.output_bytes += bytes.len() as u64;
        if let (Some(c), Output::Frame(f)) = (self.capture.as_mut(), &output) {
            c.frame(self.last_mono_ns, f);
        }
        if let Mode::Record { sink, .. } = &mut self.mode {
            // The Output Rule: the entries this output depends on leave now, not at the next batch.
            sink.flush()?;
        }
        self.port.emit(output, self.seq)
    }

    /// Whether a checkpoint is due after the events so far.
    pub fn checkpoint_due(&self) -> bool {
        self.checkpoint_events > 0
            && self.events > 0
            && self.events.is_multiple_of(self.checkpoint_events)
    }

    fn checkpoint_now(&self, state_hash: [u8; 32], fuel: Option<u64>) -> Checkpoint {
        Checkpoint {
            events: self.events,
            output_bytes: self.output_bytes,
            output_digest: *self.digest.clone().finalize().as_bytes(),
            state_hash,
            fuel,
        }
    }

    /// Records a checkpoint, or checks the recorded one.
    pub fn checkpoint(&mut self, state_hash: [u8; 32], fuel: Option<u64>) -> Result<(), VmError> {
        let mine = self.checkpoint_now(state_hash, fuel);
        match &mut self.mode {
            Mode::Record { .. } => self.append(Entry::Checkpoint(mine)),
            Mode::Replay { .. } => match self.next_replayed(EntryKind::Checkpoint)? {
                Some(Entry::Checkpoint(logged)) => self.compare_checkpoint(&logged, &mine),
                Some(other) => Err(self.kind_mismatch(EntryKind::Checkpoint, &other)),
                None => self.checkpoint(state_hash, fuel),
            },
        }
    }

    fn compare_checkpoint(&self, logged: &Checkpoint, mine: &Checkpoint) -> Result<(), VmError> {
        if logged.events != mine.events {
            return Err(self.diverged(format!(
                "checkpoint after {} events in the log, but the replay is at event {}",
                logged.events, mine.events
            )));
        }
        if logged.output_bytes != mine.output_bytes || logged.output_digest != mine.output_digest {
            return Err(self.diverged(format!(
                "outputs differ at event {}: the log has {} bytes (digest {}), the replay produced {} bytes (digest {})",
                mine.events,
                logged.output_bytes,
                hex(&logged.output_digest[..8]),
                mine.output_bytes,
                hex(&mine.output_digest[..8])
            )));
        }
        if logged.state_hash != mine.state_hash {
            return Err(self.diverged(format!(
                "VM state differs at event {}: the log has state hash {}, the replay has {}",
                mine.events,
                hex(&logged.state_hash[..8]),
                hex(&mine.state_hash[..8])
            )));
        }
        if let (Some(a), Some(b)) = (logged.fuel, mine.fuel) {
            if a != b {
                return Err(self.diverged(format!(
                    "instruction counts differ at event {}: the log has {a} fuel, the replay {b}",
                    mine.events
                )));
            }
        }
        Ok(())
    }

    /// The guest ended with `code`: record it, or check it against the log.
    pub fn exit(&mut self, code: u32) -> Result<(), VmError> {
        match &mut self.mode {
            Mode::Record { .. } => {
                self.append(Entry::Exit { code })?;
                if let Mode::Record { sink, .. } = &mut self.mode {
                    sink.flush()?;
                }
                Ok(())
            }
            Mode::Replay { .. } => match self.next_replayed(EntryKind::Exit)? {
                Some(Entry::Exit { code: logged }) if logged == code => Ok(()),
                Some(Entry::Exit { code: logged }) => Err(self.diverged(format!(
                    "the guest exited with {code}, the log says {logged}"
                ))),
                Some(other) => Err(self.kind_mismatch(EntryKind::Exit, &other)),
                None => self.exit(code),
            },
        }
    }

    /// The guest trapped: record it, or check that the recording trapped here too.
    pub fn trap(&mut self, message: &str) -> Result<(), VmError> {
        match &mut self.mode {
            Mode::Record { .. } => {
                self.append(Entry::Trap {
                    message: message.to_string(),
                })?;
                if let Mode::Record { sink, .. } = &mut self.mode {
                    sink.flush()?;
                }
                Ok(())
            }
            Mode::Replay { .. } => match self.next_replayed(EntryKind::Trap)? {
                Some(Entry::Trap { .. }) => Ok(()),
                Some(other) => Err(self.kind_mismatch(EntryKind::Trap, &other)),
                None => self.trap(message),
            },
        }
    }

    /// A WASI call of the guest begins (every one, so both replicas count alike).
    pub fn host_call(&mut self) {
        self.host_calls += 1;
        self.disk_ops = 0;
    }

    /// The next disk operation of the current call, and whether the recording's host did less
    /// with it (replay only): its `HostError`/`HostShort` entry, consumed.
    fn begin_disk_op(&mut self) -> Result<(u64, u32, Option<Entry>), VmError> {
        let (call, op) = (self.host_calls, self.disk_ops);
        self.disk_ops += 1;
        if !self.is_replaying() || !self.fill_lookahead()? {
            return Ok((call, op, None));
        }
        let ours = matches!(
            self.lookahead,
            Some((_, Entry::HostError { call: c, op: o, .. } | Entry::HostShort { call: c, op: o, .. }))
                if c == call && o == op
        );
        if !ours {
            return Ok((call, op, None));
        }
        let (seq, entry) = self.lookahead.take().expect("looked ahead");
        self.seq = seq;
        self.events += 1;
        Ok((call, op, Some(entry)))
    }

    /// One disk operation of the guest (open, stat, read, rename, ...: all or nothing), run by
    /// `op`. Record: a failure is logged (`HostError`). Replay: if the recording's host failed
    /// it, it fails the same way here without asking this host's disk, so the replicas' disks
    /// stay alike; if it fails only here, that is a divergence: this replica cannot follow.
    /// Returns the value or the errno for the guest.
    pub fn disk_op<T>(
        &mut self,
        op: impl FnOnce() -> std::io::Result<T>,
    ) -> Result<Result<T, u16>, VmError> {
        let (call, index, recorded) = self.begin_disk_op()?;
        match recorded {
            Some(Entry::HostError { errno, .. }) => return Ok(Err(errno)),
            Some(other) => {
                return Err(self.diverged(format!(
                "disk call {call} operation {index} is not a write here; the recording has a {}",
                other.kind()
            )))
            }
            None => {}
        }
        match op() {
            Ok(v) => Ok(Ok(v)),
            Err(e) => {
                let errno = crate::wasi::errno::from_io(&e);
                self.disk_failed(call, index, errno)?;
                Ok(Err(errno))
            }
        }
    }

    /// The guest's write of `data` to a host file: `write(bytes, at)` writes a prefix of `bytes`
    /// at offset `at` within `data`, as `pwrite` does, and is repeated until everything is
    /// written. Returns the bytes written, fewer than asked when the disk took only part (a
    /// short write, logged as `HostShort`; replay writes exactly as many), or the errno when it
    /// took nothing (logged as `HostError`; replay does not write). A replica whose disk takes
    /// less than the recording's diverges.
    pub fn disk_write(
        &mut self,
        data: &[u8],
        mut write: impl FnMut(&[u8], u64) -> std::io::Result<usize>,
    ) -> Result<Result<usize, u16>, VmError> {
        let (call, index, recorded) = self.begin_disk_op()?;
        let target = match recorded {
            Some(Entry::HostError { errno, .. }) => return Ok(Err(errno)),
            Some(Entry::HostShort { done, .. }) if done < data.len() as u64 => done as usize,
            Some(other) => {
                return Err(self.diverged(format!(
                    "disk call {call} operation {index} writes {} bytes here; the recording has \
                     a {} ({})",
                    data.len(),
                    other.kind(),
                    other.summary()
                )))
            }
            None => data.len(),
        };
        let mut done = 0;
        let mut failure = None;
        while done < target {
            match write(&data[done..target], done as u64) {
                Ok(0) => break,
                Ok(n) => done += n.min(target - done),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    failure = Some(crate::wasi::errno::from_io(&e));
                    break;
                }
            }
        }
        if done == target {
            return Ok(Ok(done));
        }
        let errno = failure.unwrap_or(crate::wasi::errno::NOSPC);
        if self.is_replaying() {
            return Err(self.diverged(format!(
                "disk call {call} operation {index} wrote {done} of {target} bytes here ({}); the \
                 recording's host wrote all {target}: the replicas' disks differ",
                crate::wasi::errno::name(errno)
            )));
        }
        if done == 0 {
            self.append(Entry::HostError {
                call,
                op: index,
                errno,
            })?;
            self.events += 1;
            return Ok(Err(errno));
        }
        self.append(Entry::HostShort {
            call,
            op: index,
            done: done as u64,
        })?;
        self.events += 1;
        Ok(Ok(done))
    }

    /// A disk operation failed on this host: logged when recording, a divergence in replay (the
    /// recording's host did it).
    fn disk_failed(&mut self, call: u64, op: u32, errno: u16) -> Result<(), VmError> {
        if self.is_replaying() {
            return Err(self.diverged(format!(
                "disk call {call} operation {op} failed with {} here and succeeded in the \
                 recording: the replicas' disks differ",
                crate::wasi::errno::name(errno)
            )));
        }
        self.append(Entry::HostError { call, op, errno })?;
        self.events += 1;
        Ok(())
    }

    /// Records an operator power-off that ended the VM between gate points (at its end).
    pub fn power_off(&mut self) -> Result<(), VmError> {
        if let Mode::Record { sink, .. } = &mut self.mode {
            sink.flush()?;
        }
        Ok(())
    }

    fn append(&mut self, entry: Entry) -> Result<(), VmError> {
        self.append_ref(&entry)
    }

    fn append_ref(&mut self, entry: &Entry) -> Result<(), VmError> {
        let Mode::Record { sink, .. } = &mut self.mode else {
            unreachable!("append in replay mode")
        };
        self.seq += 1;
        sink.append(self.seq, entry)
    }

    /// Reads the next entry in replay. `Ok(None)` means the log ended and the gate went live: the
    /// caller must redo its request in record mode.
    fn next_replayed(&mut self, want: EntryKind) -> Result<Option<Entry>, VmError> {
        if !self.fill_lookahead()? {
            if self.is_replaying() {
                return Err(VmError::LogEnded(format!(
                    "the log ends after entry {} (event {}) while the guest asked for a {want}; \
                     everything up to there replayed identically",
                    self.seq, self.events
                )));
            }
            return Ok(None);
        }
        let (seq, entry) = self.lookahead.take().expect("looked ahead");
        self.seq = seq;
        Ok(Some(entry))
    }

    /// Makes `lookahead` hold the next entry. False at the log's end: then a backup has gone
    /// live here (the gate records from now on), and a plain replay remembers the end.
    fn fill_lookahead(&mut self) -> Result<bool, VmError> {
        if self.lookahead.is_some() {
            return Ok(true);
        }
        if self.source_ended {
            return Ok(false);
        }
        let Mode::Replay { source, end } = &mut self.mode else {
            unreachable!("fill_lookahead in record mode")
        };
        match source.next_entry()? {
            Some((seq, entry)) => {
                if seq != self.seq + 1 {
                    return Err(VmError::LogCorrupt(format!(
                        "entry {seq} follows entry {}: entries are missing or out of order",
                        self.seq
                    )));
                }
                self.lookahead = Some((seq, entry));
                Ok(true)
            }
            None => {
                let go_live = match end {
                    Some(end) => end.on_log_end(self.seq, self.last_mono_ns)?,
                    None => None,
                };
                let Some(mut live) = go_live else {
                    self.source_ended = true;
                    return Ok(false);
                };
                live.world.continue_from(self.last_mono_ns);
                self.went_live_at = Some(self.seq);
                self.live_duties_pending = true;
                self.port = live.port;
                self.mode = Mode::Record {
                    sink: live.sink,
                    world: live.world,
                };
                Ok(false)
            }
        }
    }

    fn kind_mismatch(&self, want: EntryKind, got: &Entry) -> VmError {
        match got {
            Entry::HostError { call, op, errno } => {
                return self.diverged(format!(
                    "disk call {call} operation {op} failed with {} in the recording, and this \
                     replica never did it (the guest asked for a {want} instead)",
                    crate::wasi::errno::name(*errno)
                ))
            }
            Entry::HostShort { call, op, done } => {
                return self.diverged(format!(
                    "disk call {call} operation {op} was a short write ({done} bytes) in the \
                     recording, and this replica never did it (the guest asked for a {want} \
                     instead)"
                ))
            }
            _ => {}
        }
        self.diverged(format!(
            "the guest asked for a {want}, the log has a {} ({})",
            got.kind(),
            got.summary()
        ))
    }

    fn diverged(&self, what: String) -> VmError {
        VmError::Divergence {
            seq: self.seq,
            event: self.events,
            what,
        }
    }
}

/// Writes every entry to the sink replication depends on (the log channel) and to a copy (a
/// file, for a later debugging replay). The copy is best effort: when it fails (its disk filled
/// up, say) a warning says so and the copy ends there, while the VM goes on, still replicated.
/// The file is then a prefix of the log (its last entry may be cut), which replays as far as
/// it goes.
pub struct TeeSink {
    main: Box<dyn LogSink>,
    copy: Option<Box<dyn LogSink>>,
}

impl TeeSink {
    pub fn new(main: Box<dyn LogSink>, copy: Box<dyn LogSink>) -> TeeSink {
        TeeSink {
            main,
            copy: Some(copy),
        }
    }

    fn on_copy(&mut self, f: impl FnOnce(&mut dyn LogSink) -> Result<(), VmError>) {
        if let Some(copy) = self.copy.as_mut() {
            if let Err(e) = f(copy.as_mut()) {
                eprintln!(
                    "ftvm: WARNING: the log's copy failed ({e}); it ends here, and the VM goes \
                     on without it"
                );
                self.copy = None;
            }
        }
    }
}

impl LogSink for TeeSink {
    fn append(&mut self, seq: u64, entry: &Entry) -> Result<(), VmError> {
        self.main.append(seq, entry)?;
        self.on_copy(|c| c.append(seq, entry));
        Ok(())
    }
    fn flush(&mut self) -> Result<(), VmError> {
        self.main.flush()?;
        self.on_copy(|c| c.flush());
        Ok(())
    }
    fn idle(&mut self) -> Result<(), VmError> {
        self.main.idle()?;
        self.on_copy(|c| c.idle());
        Ok(())
    }
    fn pace(&mut self) -> Duration {
        let copy = self.copy.as_mut().map_or(Duration::ZERO, |c| c.pace());
        self.main.pace().max(copy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<(u64, Entry)>>>);
    impl LogSink for Shared {
        fn append(&mut self, seq: u64, entry: &Entry) -> Result<(), VmError> {
            self.0.lock().unwrap().push((seq, entry.clone()));
            Ok(())
        }
        fn flush(&mut self) -> Result<(), VmError> {
            Ok(())
        }
    }
    struct VecSource(std::vec::IntoIter<(u64, Entry)>);
    impl LogSource for VecSource {
        fn next_entry(&mut self) -> Result<Option<(u64, Entry)>, VmError> {
            Ok(self.0.next())
        }
    }
    #[derive(Clone, Default)]
    struct Collect(Arc<Mutex<Vec<(Output, u64)>>>);
    impl OutputPort for Collect {
        fn emit(&mut self, output: Output, seq: u64) -> Result<(), VmError> {
            self.0.lock().unwrap().push((output, seq));
            Ok(())
        }
    }

    fn session(gate: &mut Gate) -> Vec<u64> {
        let mut seen = Vec::new();
        seen.push(gate.clock(CLOCK_REALTIME).unwrap());
        let mut buf = [0u8; 100_000];
        gate.random(&mut buf).unwrap();
        seen.push(buf.iter().map(|&b| b as u64).sum());
        let wake = gate.wait(Some(0)).unwrap();
        seen.push(wake.now_ns);
        gate.output(Output::Console {
            fd: 1,
            bytes: b"hi".to_vec(),
        })
        .unwrap();
        gate.checkpoint([1; 32], None).unwrap();
        gate.exit(0).unwrap();
        seen
    }

    #[test]
    fn a_wake_up_takes_the_waiting_frames_up_to_the_entry_limit_and_loses_none() {
        // Under load (a couple of hundred clients) more frames wait than one entry may carry:
        // each wake-up takes as many as it may, in arrival order, and the next one the rest.
        let (tx, rx) = crossbeam_channel::unbounded();
        let count = INPUT_FRAMES_MAX + 10;
        for i in 0..count {
            tx.send((i as u32).to_le_bytes().to_vec()).unwrap();
        }
        let sink = Shared::default();
        let mut rec = Gate::record(
            Box::new(sink.clone()),
            World::new(Some(ChannelFrames::boxed(rx)), None),
            Box::new(Collect::default()),
            0,
        );
        let first = rec.wait(Some(0)).unwrap().frames;
        let second = rec.wait(Some(0)).unwrap().frames;
        assert_eq!((first.len(), second.len()), (INPUT_FRAMES_MAX, 10));
        let delivered: Vec<Vec<u8>> = first.into_iter().chain(second).collect();
        let sent: Vec<Vec<u8>> = (0..count)
            .map(|i| (i as u32).to_le_bytes().to_vec())
            .collect();
        assert_eq!(delivered, sent);
        // The log holds the same frames, one Input entry per wake-up.
        let logged: Vec<Vec<u8>> = sink
            .0
            .lock()
            .unwrap()
            .iter()
            .flat_map(|(_, e)| match e {
                Entry::Input { frames, .. } => frames.clone(),
                _ => Vec::new(),
            })
            .collect();
        assert_eq!(logged, sent);
    }

    #[test]
    fn replay_returns_what_was_recorded_and_tags_outputs() {
        let sink = Shared::default();
        let outputs = Collect::default();
        let mut rec = Gate::record(
            Box::new(sink.clone()),
            World::new(None, None),
            Box::new(outputs.clone()),
            0,
        );
        let recorded = session(&mut rec);
        let log = sink.0.lock().unwrap().clone();
        // 1 clock + 2 random chunks + 1 input come before the output.
        assert_eq!(outputs.0.lock().unwrap()[0].1, 4);
        let mut rep = Gate::replay(
            Box::new(VecSource(log.into_iter())),
            None,
            Box::new(DropOutputs),
            0,
        );
        assert_eq!(session(&mut rep), recorded);
    }

    #[test]
    fn asking_for_something_else_diverges() {
        let sink = Shared::default();
        let mut rec = Gate::record(
            Box::new(sink.clone()),
            World::new(None, None),
            Box::new(DropOutputs),
            0,
        );
        rec.clock(CLOCK_MONOTONIC).unwrap();
        let log = sink.0.lock().unwrap().clone();
        let mut rep = Gate::replay(
            Box::new(VecSource(log.clone().into_iter())),
            None,
            Box::new(DropOutputs),
            0,
        );
        let err = rep.clock(CLOCK_REALTIME).unwrap_err();
        assert!(err.to_string().contains("diverge"), "{err}");
        let mut rep = Gate::replay(
            Box::new(VecSource(log.into_iter())),
            None,
            Box::new(DropOutputs),
            0,
        );
        let err = rep.random(&mut [0u8; 4]).unwrap_err();
        assert!(matches!(err, VmError::Divergence { .. }), "{err}");
    }

    #[test]
    fn what_a_disk_did_not_do_is_logged_and_mirrored_in_replay() {
        use crate::wasi::errno::NOSPC;
        let full = || std::io::Error::from_raw_os_error(libc::ENOSPC);
        let sink = Shared::default();
        let mut rec = Gate::record(
            Box::new(sink.clone()),
            World::new(None, None),
            Box::new(DropOutputs),
            0,
        );
        rec.host_call();
        assert_eq!(rec.disk_op(|| Ok(7)).unwrap(), Ok(7));
        rec.host_call();
        assert_eq!(rec.disk_op(|| Err::<(), _>(full())).unwrap(), Err(NOSPC));
        // A write the disk takes 4 bytes of, then refuses.
        let mut took = 0;
        let short = rec.disk_write(&[1; 10], |b, _| {
            if took >= 4 {
                return Err(full());
            }
            took += b.len().min(4);
            Ok(b.len().min(4))
        });
        assert_eq!(short.unwrap(), Ok(4));
        rec.host_call();
        rec.clock(CLOCK_MONOTONIC).unwrap();
        let log: Vec<Entry> = sink
            .0
            .lock()
            .unwrap()
            .iter()
            .map(|(_, e)| e.clone())
            .collect();
        assert_eq!(
            log[..2],
            [
                Entry::HostError {
                    call: 2,
                    op: 0,
                    errno: NOSPC
                },
                Entry::HostShort {
                    call: 2,
                    op: 1,
                    done: 4
                }
            ]
        );
        let replay = || {
            let mut rep = Gate::replay(
                Box::new(VecSource(sink.0.lock().unwrap().clone().into_iter())),
                None,
                Box::new(DropOutputs),
                0,
            );
            rep.host_call();
            rep
        };
        let says = |err: VmError, what: &str| {
            assert!(matches!(err, VmError::Divergence { .. }), "{err}");
            assert!(err.to_string().contains(what), "{err}");
        };
        // A replayer whose disk would do everything does what the recording's did, no more.
        let mut rep = replay();
        assert_eq!(rep.disk_op(|| Ok(7)).unwrap(), Ok(7));
        rep.host_call();
        let mirrored = rep.disk_op(|| -> std::io::Result<()> { panic!("the failed op ran") });
        assert_eq!(mirrored.unwrap(), Err(NOSPC));
        let mut wrote = Vec::new();
        let short = rep.disk_write(&[1; 10], |b, _| {
            wrote.extend_from_slice(b);
            Ok(b.len())
        });
        assert_eq!(short.unwrap(), Ok(4));
        assert_eq!(
            wrote.len(),
            4,
            "wrote exactly what the recording's disk took"
        );
        rep.host_call();
        rep.clock(CLOCK_MONOTONIC).unwrap();
        // Its disk fails where the recording's did not.
        says(
            replay()
                .disk_op(|| Err::<(), _>(std::io::Error::from_raw_os_error(libc::EIO)))
                .unwrap_err(),
            "disk call 1 operation 0 failed with EIO here and succeeded",
        );
        // It never does the operation that failed.
        let mut rep = replay();
        rep.disk_op(|| Ok(7)).unwrap().unwrap();
        rep.host_call();
        says(
            rep.clock(CLOCK_MONOTONIC).unwrap_err(),
            "disk call 2 operation 0 failed with ENOSPC in the recording, and this replica never did it",
        );
        // Its disk takes less of the write than the recording's.
        let mut rep = replay();
        rep.disk_op(|| Ok(7)).unwrap().unwrap();
        rep.host_call();
        rep.disk_op(|| Ok(())).unwrap().unwrap_err();
        says(
            rep.disk_write(&[1; 10], |_, at| if at < 2 { Ok(2) } else { Err(full()) })
                .unwrap_err(),
            "disk call 2 operation 1 wrote 2 of 4 bytes here (ENOSPC)",
        );
    }

    #[test]
    fn different_outputs_fail_the_checkpoint() {
        let sink = Shared::default();
        let mut rec = Gate::record(
            Box::new(sink.clone()),
            World::new(None, None),
            Box::new(DropOutputs),
            0,
        );
        rec.output(Output::Console {
            fd: 1,
            bytes: b"a".to_vec(),
        })
        .unwrap();
        rec.checkpoint([0; 32], None).unwrap();
        let log = sink.0.lock().unwrap().clone();
        let mut rep = Gate::replay(
            Box::new(VecSource(log.into_iter())),
            None,
            Box::new(DropOutputs),
            0,
        );
        rep.output(Output::Console {
            fd: 1,
            bytes: b"b".to_vec(),
        })
        .unwrap();
        let err = rep.checkpoint([0; 32], None).unwrap_err();
        assert!(err.to_string().contains("outputs differ"), "{err}");
    }

    #[test]
    fn log_end_without_takeover_is_an_error_and_with_takeover_goes_live() {
        let mut rep = Gate::replay(
            Box::new(VecSource(Vec::new().into_iter())),
            None,
            Box::new(DropOutputs),
            0,
        );
        assert!(matches!(
            rep.clock(CLOCK_REALTIME),
            Err(VmError::LogEnded(_))
        ));

        struct Live(Shared);
        impl ReplayEnd for Live {
            fn on_log_end(&mut self, _: u64, _: u64) -> Result<Option<GoLive>, VmError> {
                Ok(Some(GoLive {
                    sink: Box::new(self.0.clone()),
                    world: World::new(None, None),
                    port: Box::new(DropOutputs),
                }))
            }
        }
        let sink = Shared::default();
        let mut rep = Gate::replay(
            Box::new(VecSource(
                vec![(
                    1,
                    Entry::Clock {
                        clock_id: 1,
                        ns: u64::MAX / 2,
                    },
                )]
                .into_iter(),
            )),
            Some(Box::new(Live(sink.clone()))),
            Box::new(DropOutputs),
            0,
        );
        let first = rep.clock(CLOCK_MONOTONIC).unwrap();
        let second = rep.clock(CLOCK_MONOTONIC).unwrap();
        assert!(
            second >= first,
            "virtual monotonic time went backwards at go-live: {first} -> {second}"
        );
        assert_eq!(rep.went_live_at(), Some(1));
        assert_eq!(
            sink.0.lock().unwrap()[0].0,
            2,
            "the new primary's log continues the sequence"
        );
    }
}
