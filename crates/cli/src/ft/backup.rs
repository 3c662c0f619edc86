//! The backup: replays the primary's log as it arrives, acks it, and goes live when the primary
//! fails (after draining the log and winning the tiebreaker).

use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};
use ftvm_log::{ControlOp, Entry};
use ftvm_repl::wire::{Frame, Message};
use ftvm_repl::{Action, BackupLink};
use ftvm_vm::channel::ChannelSource;
use ftvm_vm::console::ConsolePort;
use ftvm_vm::gate::{DropOutputs, GoLive, NullSink, ReplayEnd};
use ftvm_vm::{exit_code, Gate, Vm, VmError, VmOutcome, World};

use super::primary::halt;
use super::status::{Status, StatusWriter};
use super::{config_hash, disk_hash_bytes, link, now_ms, Node};
use crate::opts::Failure;

/// Most decoded entries queued for the replaying VM; past it the driver stops reading the
/// channel, the primary's unacked buffer fills, and the primary stalls (flow control).
pub const REPLAY_QUEUE_ENTRIES_MAX: usize = 64 * 1024;
/// The driver thread's period once the log has ended (it hands the rest of the log to the
/// replaying VM as the queue drains, and sees go-live).
const TICK_MS: u64 = 5;
/// Before that it sleeps until the link's next deadline (a progress ack every
/// `ack_interval_ms` while replay moves, a heartbeat, the failure timeout), at most this long:
/// the reader handles arrivals, and a fixed 5 ms tick only woke this thread 200 times a second.
const DRIVER_SLEEP_MAX_MS: u64 = 25;
/// The nice value of the backup's replay thread until it goes live (`[ft] replay_nice`).
///
/// Why lower: the replay only has to keep up on average (flow control watches its lag), while the
/// threads it competes with on a shared host are latency-critical: this backup's log reader (its
/// ack is on the Output Rule's round trip), primaries of other VMs, clients. Measured with the
/// primary, the backup and the client on the same two cores (BENCHMARKS.md): 7-12% more
/// requests per second at c=50, replay lag unchanged (0 ms). At go-live it is set back to 0.
pub const DEFAULT_REPLAY_NICE: i32 = 10;

/// Puts the calling thread (Linux: per thread; threads it starts inherit it) in `SCHED_BATCH`,
/// whose wake-ups do not preempt the running thread, or back in the normal policy.
fn set_thread_batch(batch: bool) -> std::io::Result<()> {
    let policy = if batch {
        libc::SCHED_BATCH
    } else {
        libc::SCHED_OTHER
    };
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param.
    if unsafe { libc::sched_setscheduler(0, policy, &param) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Sets the calling thread's nice value (Linux: per thread).
fn set_thread_nice(nice: i32) -> std::io::Result<()> {
    // SAFETY: gettid has no preconditions; setpriority on our own thread id reads nothing of ours.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, nice) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

pub fn run(node: Node) -> Result<i32, Failure> {
    let header = node.image.header()?;
    let stream = connect(&node)?;
    let mut hs = stream
        .try_clone()
        .and_then(link::Handshaker::new)
        .map_err(|e| Failure::usage(e.to_string()))?;
    let blink = handshake(&stream, &mut hs, &node, &header).map_err(|why| Failure {
        code: exit_code::HALTED,
        message: format!("no pairing with the primary: {why}"),
        detail: String::new(),
    })?;
    let epoch = blink.epoch();
    eprintln!("ftvm: backup of {} at epoch {epoch}, replaying", node.vm_id);
    // Tell the primary how this end sees the connection: if no relay ends TCP in between, this
    // host's TCP acknowledgments count for the Output Rule (see `yields` below).
    let endpoints = Frame::new(
        epoch,
        Message::Endpoints {
            backup: super::addr_text(stream.local_addr()),
            primary: super::addr_text(stream.peer_addr()),
        },
    );
    link::write_frame(&stream, &endpoints)
        .map_err(|e| Failure::usage(format!("cannot write to the log channel: {e}")))?;

    // Attached but deaf until go-live: the backup's input is the log, not the wire.
    let attachment = super::attach(&node, false)?;
    // The primary releases an output once this host's TCP has acknowledged the log up to it
    // (what it acknowledged is replayed: `Driver::end_of_log`). Where this host acknowledges at
    // once (its route to the primary has `quickack`), the backup's own threads need not hurry:
    // they run as SCHED_BATCH until go-live, so their wake-ups do not preempt the primary or a
    // client on a shared CPU. Otherwise the backup's acks are the ones that count, and its reader
    // keeps the normal policy.
    let yields = match super::route::acks_at_once(node.log_addr.ip()) {
        Ok(at_once) => at_once,
        Err(e) => {
            eprintln!("ftvm: cannot look up the route to the primary ({e}); the log reader does not yield");
            false
        }
    };
    if yields {
        match set_thread_batch(true) {
            Ok(()) => eprintln!(
                "ftvm: this host acknowledges the log channel at once (route quickack): the \
                 backup yields the CPU until go-live"
            ),
            Err(e) => eprintln!("ftvm: cannot make the backup yield ({e}); it runs as it is"),
        }
    }
    let (replay_tx, replay_rx) = bounded::<(u64, Entry)>(REPLAY_QUEUE_ENTRIES_MAX);
    let replayed = Arc::new(AtomicU64::new(0));
    let live = Arc::new(AtomicBool::new(false));
    let clean_end = Arc::new(AtomicBool::new(false));

    let driver = Driver {
        vm_id: node.vm_id.clone(),
        epoch,
        link: blink,
        stream: Some(stream),
        outbox: Vec::new(),
        replay_tx: Some(replay_tx),
        log_ended: false,
        reader_done: false,
        replayed: replayed.clone(),
        live: live.clone(),
        clean_end: clean_end.clone(),
        status: StatusWriter::new(node.status_file.clone()),
        received_seq: 0,
        bytes_received: 0,
        frames_received: 0,
        writes: 0,
        last_replayed: 0,
    };
    let driver = Arc::new(Mutex::new(driver));
    // Frames are handled on the reader thread as they arrive (ack, queue for replay): no hop to
    // another thread on the Output Rule's round trip. The driver thread does the timed work.
    let d = driver.clone();
    hs.spawn_reader(move |event| Driver::deliver(&d, event))
        .map_err(|e| Failure::usage(format!("cannot start the log reader: {e}")))?;
    let driver_thread = std::thread::Builder::new()
        .name("ftvm-driver".into())
        .spawn(move || Driver::run(&driver))
        .expect("spawn driver");

    let (control_tx, control_rx) = bounded::<ControlOp>(4);
    let takeover = Takeover {
        vm_id: node.vm_id.clone(),
        owner: node.owner.clone(),
        epoch,
        tiebreak: node.tiebreak.clone(),
        attachment: Mutex::new(attachment),
        control_rx: Some(control_rx),
        control_tx: Some(control_tx),
        live: live.clone(),
        clean_end: clean_end.clone(),
        status_file: node.status_file.clone(),
        epoch_check_ms: node.epoch_check_ms,
        yields,
    };
    let source: Box<dyn ftvm_vm::LogSource> = Box::new(ChannelSource::new(replay_rx, replayed));
    let source = if node.slow_replay_us > 0 {
        Box::new(SlowSource(source, node.slow_replay_us))
    } else {
        source
    };
    let gate = Gate::replay(
        source,
        Some(Box::new(takeover)),
        Box::new(DropOutputs),
        node.image.spec.limits.checkpoint_events,
    );
    let mut vm = Vm::boot(&node.image, gate)?;
    // Only root can raise the priority back at go-live; others replay at normal priority.
    // SAFETY: geteuid has no preconditions.
    if node.ft.replay_nice != 0 && unsafe { libc::geteuid() } == 0 {
        if let Err(e) = set_thread_nice(node.ft.replay_nice) {
            eprintln!("ftvm: cannot lower the replay thread's priority ({e}); it stays as it is");
        }
    }
    let outcome = vm.run();
    let went_live = vm.host().gate.went_live_at();
    drop(vm);
    live.store(true, Ordering::SeqCst);
    let _ = driver_thread.join();
    let ended_everywhere = match &outcome {
        Ok(_) => true,
        Err(e) => e.ends_the_vm_everywhere(),
    };
    if went_live.is_some() && ended_everywhere {
        // This replica was the VM's primary, and the VM has ended: a new pair may start at once.
        super::beat_stopped(&*node.tiebreak, &node.vm_id, &node.owner, epoch + 1);
    }
    match outcome {
        Ok(VmOutcome::Exited(c)) => {
            eprintln!(
                "ftvm: guest exited with {c}{}",
                if went_live.is_some() {
                    " (after going live)"
                } else {
                    " (replayed)"
                }
            );
            Ok((c & 0xff) as i32)
        }
        Ok(VmOutcome::PoweredOff) => {
            eprintln!("ftvm: the VM was powered off");
            Ok(0)
        }
        Err(VmError::Halted(why)) => halt(why),
        Err(e) => Err(e.into()),
    }
}

/// Waits for the primary's Hello and answers it.
fn handshake(
    stream: &TcpStream,
    hs: &mut link::Handshaker,
    node: &Node,
    header: &ftvm_log::LogHeader,
) -> Result<BackupLink, String> {
    // Any epoch the primary won is acceptable at pairing time: the link adopts the Hello's epoch.
    let mut blink = BackupLink::new(
        link::config(&node.ft),
        1,
        link::expect(node, config_hash(header), disk_hash_bytes(header)),
        now_ms(),
    )
    .map_err(|e| e.to_string())?;
    loop {
        let frame = hs.next_frame()?;
        for action in blink
            .on_message(frame, now_ms())
            .map_err(|e| e.to_string())?
        {
            match action {
                Action::Send(f) => link::write_frame(stream, &f).map_err(|e| e.to_string())?,
                Action::HandshakeDone => return Ok(blink),
                Action::HandshakeRejected { reason } => return Err(reason),
                Action::StaleEpoch { theirs, ours } => {
                    return Err(format!("the primary is in epoch {theirs}, below {ours}"))
                }
                _ => {}
            }
        }
    }
}

fn connect(node: &Node) -> Result<TcpStream, Failure> {
    let deadline = Instant::now() + Duration::from_millis(node.wait_ms);
    loop {
        match TcpStream::connect_timeout(&node.log_addr, Duration::from_millis(500)) {
            Ok(s) => {
                super::set_stream_options(&s).map_err(|e| Failure::usage(e.to_string()))?;
                return Ok(s);
            }
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                return Err(Failure {
                    code: exit_code::HALTED,
                    message: format!("cannot reach the primary at {}: {e}", node.log_addr),
                    detail: String::new(),
                })
            }
        }
    }
}

struct Driver {
    vm_id: String,
    epoch: u64,
    link: BackupLink,
    stream: Option<TcpStream>,
    /// Frames to send at the end of this turn of the loop, with one write.
    outbox: Vec<Frame>,
    /// Dropped when the log has ended and every record received was handed over: the replaying
    /// VM then drains the queue and goes live.
    replay_tx: Option<Sender<(u64, Entry)>>,
    /// No more log will come (failure, goodbye): the channel is shut, so this host's TCP
    /// acknowledges nothing more; what it had received is still read and applied.
    log_ended: bool,
    /// The reader reached the channel's end: with `log_ended`, `replay_tx` is dropped once the
    /// link's queue is empty.
    reader_done: bool,
    replayed: Arc<AtomicU64>,
    live: Arc<AtomicBool>,
    clean_end: Arc<AtomicBool>,
    status: StatusWriter,
    received_seq: u64,
    bytes_received: u64,
    frames_received: u64,
    writes: u64,
    last_replayed: u64,
}

impl Driver {
    /// The timed work: heartbeats, the failure timeout, progress acks, records the replay queue
    /// had no room for, status.
    fn run(shared: &Mutex<Driver>) {
        loop {
            let sleep_ms = {
                let mut d = shared.lock().expect("driver lock");
                if d.live.load(Ordering::SeqCst) {
                    return;
                }
                let now = now_ms();
                d.forward_records();
                let actions = d.link.tick(now);
                d.apply(actions);
                d.progress(now);
                d.send_outbox();
                d.publish(now);
                d.sleep_ms(now)
            };
            std::thread::sleep(Duration::from_millis(sleep_ms));
        }
    }

    /// Runs on the reader thread for what one read brought. Returns false to stop reading.
    fn deliver(shared: &Mutex<Driver>, event: link::FromPeer) -> bool {
        let mut d = shared.lock().expect("driver lock");
        let now = now_ms();
        d.on_peer(event, now);
        // The ack is on the Output Rule's round trip: it leaves before the records are handed to
        // the replaying VM thread, whose wake-up may take this CPU.
        d.send_outbox();
        d.forward_records();
        d.progress(now);
        d.send_outbox();
        // Flow control: read no more until the replay queue has room; meanwhile the primary's
        // unacked buffer fills and it stalls.
        loop {
            if d.reader_done || d.live.load(Ordering::SeqCst) {
                return false;
            }
            if d.replay_room() {
                return true;
            }
            drop(d);
            std::thread::sleep(Duration::from_millis(1));
            d = shared.lock().expect("driver lock");
            d.forward_records();
        }
    }

    /// Tells the link how far the VM has replayed (it acks progress now and then).
    fn progress(&mut self, now: u64) {
        let replayed = self.replayed.load(Ordering::Relaxed);
        if replayed != self.last_replayed {
            self.last_replayed = replayed;
            if let Ok(actions) = self.link.replayed(replayed, now) {
                self.apply(actions);
            }
        }
    }

    /// How long the driver thread may sleep from `now` (ms).
    fn sleep_ms(&self, now: u64) -> u64 {
        match self.link.next_deadline_ms() {
            Some(due) if !self.log_ended => due.saturating_sub(now).clamp(1, DRIVER_SLEEP_MAX_MS),
            _ => TICK_MS,
        }
    }

    fn replay_room(&self) -> bool {
        self.replay_tx.as_ref().is_some_and(|tx| !tx.is_full()) && self.link.wants_records()
    }

    fn on_peer(&mut self, event: link::FromPeer, now: u64) {
        match event {
            link::FromPeer::Frames(frames) => self.on_frames(frames, now),
            link::FromPeer::Closed(why) => {
                self.send_outbox();
                if !self.clean_end.load(Ordering::SeqCst) {
                    eprintln!("ftvm: log channel from the primary ended: {why}");
                }
                self.reader_done = true;
                self.end_of_log();
            }
            link::FromPeer::Corrupt(why) => halt(format!(
                "a log-channel frame failed its checksum ({why}) after this host had \
                 acknowledged its bytes, so the primary may have released outputs that depend \
                 on it; this backup can never go live consistently"
            )),
        }
    }

    fn on_frames(&mut self, frames: Vec<Frame>, now: u64) {
        for frame in frames {
            self.bytes_received += link::approx_size(&frame.message);
            self.frames_received += 1;
            if self.log_ended {
                // Read after the channel was shut, so it reached this host before: its TCP
                // acknowledged it, and the primary may have released outputs on that.
                if let Err(e) = self.link.on_drained(frame, now) {
                    halt(format!(
                        "the log this host acknowledged before the channel ended cannot be \
                         applied ({e}); this backup can never go live consistently"
                    ));
                }
            } else {
                match self.link.on_message(frame, now) {
                    Ok(actions) => self.apply(actions),
                    // Acknowledged bytes (TCP) the backup cannot make sense of: the primary may
                    // have released outputs that depend on them.
                    Err(e) => halt(format!(
                        "log channel protocol error: {e}; this backup can never go live \
                         consistently"
                    )),
                }
            }
            // Records wait in the link until the whole read is acked (`deliver`), unless its
            // queue is filling up.
            if !self.link.wants_records() {
                self.forward_records();
            }
        }
    }

    fn apply(&mut self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Send(frame) => self.send(frame),
                Action::PeerFailed { silent_ms } => {
                    eprintln!("ftvm: no word from the primary for {silent_ms} ms; it is considered failed");
                    self.forward_records();
                    self.end_of_log();
                }
                Action::PeerClosed { reason } => {
                    eprintln!("ftvm: the primary closed the log channel cleanly ({reason:?})");
                    self.clean_end.store(true, Ordering::SeqCst);
                    self.forward_records();
                    self.end_of_log();
                }
                Action::StaleEpoch { theirs, ours } => {
                    eprintln!(
                        "ftvm: a frame from stale epoch {theirs} (ours is {ours}) was not applied"
                    );
                }
                _ => {}
            }
        }
    }

    fn send(&mut self, frame: Frame) {
        self.outbox.push(frame);
    }

    /// Writes the frames of this turn with one write (acks coalesced).
    fn send_outbox(&mut self) {
        if self.outbox.is_empty() {
            return;
        }
        link::coalesce_acks(&mut self.outbox);
        let frames = std::mem::take(&mut self.outbox);
        if let Some(stream) = self.stream.as_ref() {
            self.writes += 1;
            if link::write_frames(stream, &frames).is_err() {
                self.stream = None;
            }
        }
    }

    /// Moves received records to the replaying VM, checking each entry's own checksum. After the
    /// end of the log, closes the queue once everything received was handed over: every record
    /// the backup acknowledged is replayed before it goes live (the Output Rule's promise).
    fn forward_records(&mut self) {
        while self.replay_tx.as_ref().is_some_and(|tx| !tx.is_full()) {
            let Some(record) = self.link.pop_record() else {
                if self.log_ended && self.reader_done {
                    self.replay_tx = None;
                }
                return;
            };
            match ftvm_log::decode_framed(&record.bytes, record.seq) {
                Ok((s, entry)) if s == record.seq => {
                    self.received_seq = record.seq;
                    if let Some(tx) = &self.replay_tx {
                        let _ = tx.send((record.seq, entry));
                    }
                }
                Ok((s, _)) => self.record_unusable(record.seq, &format!("it carries entry {s}")),
                Err(e) => self.record_unusable(record.seq, &format!("it is corrupt ({e})")),
            }
        }
    }

    /// No more log will come: the channel is shut both ways, so from here this host's TCP
    /// acknowledges nothing (data that still arrives is answered with a reset); what it had
    /// received before is read to the end and applied, and the VM replays everything (then it
    /// goes live or ends). What the replay queue has no room for yet follows as the VM makes
    /// room (the driver thread forwards every tick).
    fn end_of_log(&mut self) {
        self.send_outbox();
        self.log_ended = true;
        if let Some(s) = self.stream.take() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        self.forward_records();
    }

    /// A record came in a frame whose checksum held, so it was acknowledged, and the primary may
    /// have released outputs that depend on it; yet it cannot be replayed. This replica can never
    /// carry on consistently: fail-stop. The primary sees the channel end and goes on alone.
    fn record_unusable(&mut self, seq: u64, why: &str) -> ! {
        halt(format!(
            "log record {seq} was acknowledged but cannot be replayed: {why}; this backup can \
             never go live consistently"
        ))
    }

    fn publish(&mut self, now: u64) {
        let replayed = self.replayed.load(Ordering::Relaxed);
        self.status.maybe_write(now, || Status {
            role: "backup".into(),
            vm: self.vm_id.clone(),
            epoch: self.epoch,
            peer: (!self.log_ended).then(|| "primary".into()),
            last_seq: self.received_seq,
            acked_seq: self.received_seq,
            lag_entries: self.received_seq.saturating_sub(replayed),
            lag_ms: self.link.replay_lag_ms(now),
            log_bytes_sent: self.bytes_received,
            outputs_held: 0,
            outputs_held_bytes: 0,
            slowdown_permille: 0,
            log_frames: self.frames_received,
            log_writes: self.writes,
            ack_rtt_us: 0,
            epoch_confirmed_ms_ago: None,
            holding_for_tiebreaker: false,
            host_acks: None,
            host_acked_seq: 0,
            writes_acked_at_once: 0,
        });
    }
}

/// The backup's go-live: runs in the VM thread when the replayed log has ended.
struct Takeover {
    vm_id: String,
    owner: String,
    epoch: u64,
    tiebreak: Arc<dyn ftvm_tiebreak::TestAndSet>,
    attachment: Mutex<Option<crate::nic::Nic>>,
    control_rx: Option<Receiver<ControlOp>>,
    control_tx: Option<Sender<ControlOp>>,
    live: Arc<AtomicBool>,
    clean_end: Arc<AtomicBool>,
    status_file: Option<std::path::PathBuf>,
    epoch_check_ms: u64,
    /// The threads run as SCHED_BATCH until go-live.
    yields: bool,
}

impl ReplayEnd for Takeover {
    fn on_log_end(&mut self, last_seq: u64, _last_mono_ns: u64) -> Result<Option<GoLive>, VmError> {
        if self.clean_end.load(Ordering::SeqCst) {
            // The primary said goodbye yet the guest wants more: the log is short, not failed.
            return Ok(None);
        }
        let next = self.epoch + 1;
        eprintln!("ftvm: replayed the whole log (entry {last_seq}); claiming epoch {next}");
        let claim_started = now_ms();
        match crate::tiebreak_spec::claim(&*self.tiebreak, &self.vm_id, next, &self.owner) {
            Ok(true) => {}
            Ok(false) => {
                return Err(VmError::Halted(format!(
                    "the primary kept epoch {next}; this backup halts"
                )))
            }
            Err(e) => {
                return Err(VmError::Halted(format!(
                    "tiebreaker unreachable ({e}); halting rather than risk two primaries"
                )))
            }
        }
        self.live.store(true, Ordering::SeqCst);
        // This thread runs the primary now: back to normal priority (see DEFAULT_REPLAY_NICE).
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            if let Err(e) = set_thread_nice(0) {
                eprintln!("ftvm: cannot restore the VM thread's priority after go-live ({e})");
            }
        }
        if self.yields {
            if let Err(e) = set_thread_batch(false) {
                eprintln!("ftvm: cannot restore the VM thread's policy after go-live ({e})");
            }
        }
        let attachment = self.attachment.lock().expect("attachment lock").take();
        let (frames, transmit) = match &attachment {
            Some(a) => {
                a.set_enabled(true);
                (Some(a.frame_source()), Some(a.transmitter()))
            }
            None => (None, None),
        };
        // The attachment must outlive the VM: it owns the TAP reader thread.
        std::mem::forget(attachment);
        if let Some(tx) = self.control_tx.take() {
            let _ = super::install_power_off_signal(tx);
        }
        eprintln!("ftvm: LIVE: won epoch {next}; this replica is now the primary (alone)");
        let tenure = super::Tenure::new(
            self.tiebreak.clone(),
            self.vm_id.clone(),
            self.owner.clone(),
            next,
            claim_started,
        );
        if let Err(f) = super::spawn_epoch_watch(tenure.clone(), self.epoch_check_ms) {
            return Err(VmError::Internal(f.message));
        }
        // Keep the status file current for `ftvm status` from when the driver (which is
        // stopping) is gone; off this thread, so going live is not delayed.
        let (status_file, vm_id) = (self.status_file.clone(), self.vm_id.clone());
        let held = tenure.clone();
        let spawned = std::thread::Builder::new()
            .name("ftvm-status".into())
            .spawn(move || {
                let mut status = StatusWriter::new(status_file);
                std::thread::sleep(Duration::from_millis(2 * super::status::STATUS_INTERVAL_MS));
                loop {
                    status.maybe_write(now_ms(), || Status {
                        role: "primary (alone, went live)".into(),
                        vm: vm_id.clone(),
                        epoch: next,
                        peer: None,
                        last_seq,
                        acked_seq: last_seq,
                        lag_entries: 0,
                        lag_ms: 0,
                        log_bytes_sent: 0,
                        outputs_held: 0,
                        outputs_held_bytes: 0,
                        slowdown_permille: 0,
                        log_frames: 0,
                        log_writes: 0,
                        ack_rtt_us: 0,
                        epoch_confirmed_ms_ago: Some(held.confirmed_age_ms()),
                        holding_for_tiebreaker: held.is_holding(),
                        host_acks: None,
                        host_acked_seq: 0,
                        writes_acked_at_once: 0,
                    });
                    std::thread::sleep(Duration::from_millis(super::status::STATUS_INTERVAL_MS));
                }
            });
        if let Err(e) = spawned {
            return Err(VmError::Internal(format!(
                "cannot start the status thread: {e}"
            )));
        }
        let frames_out: Option<Box<dyn FnMut(Vec<u8>) + Send>> = transmit.map(|t| {
            let f: Box<dyn FnMut(Vec<u8>) + Send> = Box::new(move |frame| t.send(frame));
            f
        });
        Ok(Some(GoLive {
            sink: Box::new(NullSink),
            world: World::new(frames, self.control_rx.take()),
            port: Box::new(TenuredPort {
                tenure,
                port: ConsolePort { frames: frames_out },
            }),
        }))
    }
}

/// The outputs of a backup that went live: emitted at once (there is no backup to wait for),
/// within the replica's [`super::Tenure`].
struct TenuredPort {
    tenure: Arc<super::Tenure>,
    port: ConsolePort,
}

impl ftvm_vm::OutputPort for TenuredPort {
    fn emit(&mut self, output: ftvm_vm::gate::Output, seq: u64) -> Result<(), VmError> {
        self.tenure.before_output();
        self.port.emit(output, seq)
    }
}

/// Test hook: a backup that replays slowly, to exercise flow control.
struct SlowSource(Box<dyn ftvm_vm::LogSource>, u64);

impl ftvm_vm::LogSource for SlowSource {
    fn next_entry(&mut self) -> Result<Option<(u64, Entry)>, VmError> {
        std::thread::sleep(Duration::from_micros(self.1));
        self.0.next_entry()
    }
}
