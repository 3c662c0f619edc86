//! The primary: records the VM, streams the log, holds outputs until the backup acked them.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crossbeam_channel::bounded;
use ftvm_log::ControlOp;
use ftvm_repl::wire::{Frame, GoodbyeReason};
use ftvm_repl::{Action, OutputRule, PrimaryLink, Record};
use ftvm_vm::channel::{Pacing, ToDriver};
use ftvm_vm::gate::Output;
use ftvm_vm::{exit_code, Gate, Vm, VmError, VmOutcome, World};

use super::status::{Status, StatusWriter};
use super::{config_hash, disk_hash_bytes, link, now_ms, Node};
use crate::opts::Failure;

/// The driver thread's period while something waits on it: outputs held for an ack (it polls
/// the backup's host acknowledgment), the VM's end, a primary alone, a VM stalled on a full buffer.
const TICK_MS: u64 = 5;
/// Otherwise it sleeps until the link's next deadline (a batch, a heartbeat, the failure timeout),
/// but at most this long. Under load the VM thread's own turns send the log and the outputs, and a
/// 5 ms tick would only wake the driver (and preempt the VM) 200 times a second for nothing. A
/// record made while it sleeps waits at most this long (not the batch delay) if the guest makes
/// no output meanwhile; an output held meanwhile wakes it (`Driver::dozing`).
const DRIVER_SLEEP_MAX_MS: u64 = 25;

pub fn run(node: Node) -> Result<i32, Failure> {
    let header = node.image.header()?;
    // Listen first: a second start on an address in use stops here, before it claims an epoch
    // (a claim would depose the pair that runs there).
    let listener = TcpListener::bind(node.log_addr).map_err(|e| {
        Failure::usage(format!(
            "cannot listen for the log channel on {}: {e}",
            node.log_addr
        ))
    })?;
    // Not beside a pair of this VM that runs: its primary's beats say so.
    let stood_still = super::refuse_if_running(&*node.tiebreak, &node.vm_id)?;
    // Claim the pair's epoch: a new pair starts one past whatever was claimed before.
    let epoch = node
        .tiebreak
        .current(&node.vm_id)
        .map_err(|e| Failure::usage(format!("tiebreaker: {e}")))?
        .map(|(e, _)| e)
        .unwrap_or(0)
        + 1;
    let claim_started = now_ms();
    if !crate::tiebreak_spec::claim(&*node.tiebreak, &node.vm_id, epoch, &node.owner)
        .map_err(Failure::usage)?
    {
        return Err(Failure {
            code: exit_code::HALTED,
            message: format!("another replica holds epoch {epoch}"),
            detail: String::new(),
        });
    }
    eprintln!(
        "ftvm: primary of {} at epoch {epoch}; waiting for the backup on {}",
        node.vm_id, node.log_addr
    );
    // Beats from the claim on (a pair started meanwhile sees this one), and the epoch watch.
    let tenure = super::Tenure::new(
        node.tiebreak.clone(),
        node.vm_id.clone(),
        node.owner.clone(),
        epoch,
        claim_started,
    );
    super::spawn_epoch_watch(tenure.clone(), node.epoch_check_ms)?;
    if stood_still {
        // The last primary may be alive without a backup, paused or cut off from the
        // tiebreaker: it emits nothing past its tenure, and this pair nothing before.
        eprintln!(
            "ftvm: letting the last primary's tenure run out ({} ms)",
            super::TENURE_MS
        );
        std::thread::sleep(Duration::from_millis(super::TENURE_MS));
    }

    let (stream, hs, link) = match accept_backup(&listener, &node, &header, epoch) {
        Ok(accepted) => accepted,
        Err(f) => {
            // The VM never ran: a new pair of it may start at once.
            super::beat_stopped(&*node.tiebreak, &node.vm_id, &node.owner, epoch);
            return Err(f);
        }
    };
    eprintln!(
        "ftvm: backup connected from {}",
        stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_default()
    );

    let attachment = super::attach(&node, true)?;
    let (control_tx, control_rx) = bounded::<ControlOp>(4);
    let pacing = Arc::new(Pacing::default());
    let power_off = super::install_power_off_signal(control_tx);

    let frames_rx = attachment.as_ref().map(|a| a.frame_source());
    let transmit = attachment.as_ref().map(|a| a.transmitter());
    let host_acks = Arc::new(HostAcks::default());
    let open_below = Arc::new(AtomicU64::new(0));
    let ends = (
        super::addr_text(stream.peer_addr()),
        super::addr_text(stream.local_addr()),
    );
    let shared = Arc::new(Shared {
        driver: Mutex::new(Driver::new(
            &node,
            tenure.clone(),
            link,
            pacing.clone(),
            host_acks.clone(),
            ends,
            open_below.clone(),
        )),
        tenure,
        host_acks,
        open_below,
        last_turn_ms: AtomicU64::new(0),
        wake: Condvar::new(),
        channel: Mutex::new(LogWriter {
            stream: Some(stream),
            buf: Vec::new(),
            written: 0,
            marks: std::collections::VecDeque::new(),
        }),
        emitter: Mutex::new(Emitter {
            transmit,
            pending: Vec::new(),
        }),
    });
    // Acks are handled on the reader thread as they arrive (they release the outputs they
    // cover), records and outputs on the VM thread as they are produced: no hop to another
    // thread on the Output Rule's round trip. The driver thread does the timed work.
    let s = shared.clone();
    hs.spawn_reader(move |event| Shared::deliver(&s, event))
        .map_err(|e| Failure::usage(format!("cannot start the log reader: {e}")))?;
    let s = shared.clone();
    std::thread::Builder::new()
        .name("ftvm-refuser".into())
        .spawn(move || refuse_late_backups(&listener, &s))
        .map_err(|e| Failure::usage(format!("cannot start the listener thread: {e}")))?;
    let s = shared.clone();
    let driver_thread = std::thread::Builder::new()
        .name("ftvm-driver".into())
        .spawn(move || Shared::run(&s))
        .expect("spawn driver");

    let channel: Box<dyn ftvm_vm::LogSink> = Box::new(DirectSink {
        shared: shared.clone(),
        pacing,
        last_pace: Instant::now(),
        record_len_hint: 0,
        unflushed: false,
        corrupt_record: node.corrupt_record,
        fail_at_record: node.fail_at_record,
    });
    let sink: Box<dyn ftvm_vm::LogSink> = match &node.record {
        // The file is a debugging copy: if it cannot be written, the VM goes on replicated.
        Some(path) => Box::new(ftvm_vm::gate::TeeSink::new(
            channel,
            Box::new(ftvm_vm::logfile::FileSink::create(path, &header)?),
        )),
        None => channel,
    };
    let gate = Gate::record(
        sink,
        World::new(frames_rx, Some(control_rx)),
        Box::new(DirectOutputs {
            shared: shared.clone(),
            pause_ms: stood_still_ms(node.ft.failure_timeout_ms),
            outputs: 0,
            stop_before_shortcut: node.stop_before_shortcut,
        }),
        node.image.spec.limits.checkpoint_events,
    );
    let mut vm = Vm::boot(&node.image, gate)?;
    let outcome = vm.run();
    drop(power_off);
    let code = match &outcome {
        Ok(VmOutcome::Exited(c)) => (*c & 0xff) as i32,
        Ok(VmOutcome::PoweredOff) => 0,
        Err(e) => e.exit_code(),
    };
    if let Err(e) = &outcome {
        if !e.ends_the_vm_everywhere() {
            // This host failed, not the VM: stop as a crashed primary would, without a goodbye,
            // so that the backup takes over (a goodbye would end it too). Held outputs stay
            // unsent, as in a crash; the backup's replay produces them again.
            eprintln!(
                "ftvm: this replica failed: {e}; it stops without a goodbye, so that the backup \
                 goes live"
            );
            std::process::exit(code);
        }
    }
    // Tell the driver the VM is done; it waits for the final acks and says goodbye.
    Shared::vm_finished(&shared);
    drop(vm);
    let driver_result = driver_thread.join().expect("driver thread");
    driver_result?;
    // The VM has ended everywhere: a new pair of it may start at once.
    let last_epoch = shared.lock().epoch;
    super::beat_stopped(&*node.tiebreak, &node.vm_id, &node.owner, last_epoch);
    match outcome {
        Ok(VmOutcome::PoweredOff) => eprintln!("ftvm: the VM was powered off"),
        Ok(VmOutcome::Exited(c)) => eprintln!("ftvm: guest exited with {c}"),
        Err(e) => return Err(e.into()),
    }
    Ok(code)
}

/// How long a refusal to a late backup may take to write.
const REFUSAL_WRITE_TIMEOUT_MS: u64 = 1_000;
/// At most one line about refused backups per this long (a flood of connections is counted).
const REFUSAL_LOG_INTERVAL_MS: u64 = 1_000;
/// The pause after a failed accept (out of descriptors, say), so that it is not retried hot.
const ACCEPT_RETRY_MS: u64 = 100;

/// Answers every backup that connects after the pair formed with a refusal (`HelloAck` with
/// `ok: false`, in our epoch), so that it stops at once with the reason, instead of waiting out
/// its handshake timeout. One connection at a time; runs until the process ends.
fn refuse_late_backups(listener: &TcpListener, shared: &Shared) {
    if listener.set_nonblocking(false).is_err() {
        return;
    }
    let mut last_logged: Option<Instant> = None;
    let mut unlogged = 0u64;
    for stream in listener.incoming() {
        let Ok(stream) = stream else {
            std::thread::sleep(Duration::from_millis(ACCEPT_RETRY_MS));
            continue;
        };
        let (epoch, reason) = {
            let d = shared.lock();
            let reason = if d.alone {
                format!(
                    "it runs {} alone in epoch {}; a backup joins a VM only before it starts \
                     (adding one to a running VM needs cloning, which ftvm does not do yet)",
                    d.vm_id, d.epoch
                )
            } else {
                format!("{} already has its backup (one backup per VM)", d.vm_id)
            };
            (d.epoch, reason)
        };
        unlogged += 1;
        if last_logged.is_none_or(|t| t.elapsed() >= Duration::from_millis(REFUSAL_LOG_INTERVAL_MS))
        {
            let count = if unlogged > 1 {
                format!(" ({unlogged} since the last such line)")
            } else {
                String::new()
            };
            eprintln!("ftvm: refused a backup that connected late{count}: {reason}");
            last_logged = Some(Instant::now());
            unlogged = 0;
        }
        let refusal = Frame::new(
            epoch,
            ftvm_repl::wire::Message::HelloAck { ok: false, reason },
        );
        let _ = stream.set_write_timeout(Some(Duration::from_millis(REFUSAL_WRITE_TIMEOUT_MS)));
        let _ = link::write_frame(&stream, &refusal);
        let _ = stream.shutdown(std::net::Shutdown::Write);
    }
}

type Accepted = (TcpStream, link::Handshaker, PrimaryLink);

fn accept_backup(
    listener: &TcpListener,
    node: &Node,
    header: &ftvm_log::LogHeader,
    epoch: u64,
) -> Result<Accepted, Failure> {
    listener
        .set_nonblocking(true)
        .map_err(|e| Failure::usage(e.to_string()))?;
    let deadline = Instant::now() + Duration::from_millis(node.wait_ms);
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream
                    .set_nonblocking(false)
                    .map_err(|e| Failure::usage(e.to_string()))?;
                super::set_stream_options(&stream).map_err(|e| Failure::usage(e.to_string()))?;
                match handshake(stream, node, header, epoch) {
                    Ok(accepted) => return Ok(accepted),
                    Err(why) => eprintln!("ftvm: a backup failed the handshake: {why}"),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return Err(Failure {
                        code: exit_code::HALTED,
                        message: format!("no backup connected within {} ms", node.wait_ms),
                        detail: String::new(),
                    });
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(Failure::usage(format!("accepting the backup: {e}"))),
        }
    }
}

/// Sends Hello, waits for the backup's answer. The reader thread is started first, so no byte the
/// backup sends after its answer is lost.
fn handshake(
    stream: TcpStream,
    node: &Node,
    header: &ftvm_log::LogHeader,
    epoch: u64,
) -> Result<Accepted, String> {
    let mut hs = stream
        .try_clone()
        .and_then(link::Handshaker::new)
        .map_err(|e| e.to_string())?;
    let hello = link::hello(node, config_hash(header), disk_hash_bytes(header));
    let (mut plink, actions) = PrimaryLink::new(link::config(&node.ft), epoch, hello, now_ms())
        .map_err(|e| e.to_string())?;
    let mut pending = actions;
    let deadline = Instant::now() + Duration::from_millis(link::HANDSHAKE_TIMEOUT_MS);
    loop {
        for action in std::mem::take(&mut pending) {
            match action {
                Action::Send(frame) => {
                    link::write_frame(&stream, &frame).map_err(|e| e.to_string())?
                }
                Action::HandshakeDone => return Ok((stream, hs, plink)),
                Action::HandshakeRejected { reason } => {
                    return Err(format!("the backup refused: {reason}"))
                }
                Action::Superseded { theirs, .. } | Action::StaleEpoch { theirs, .. } => {
                    return Err(format!("the backup is in epoch {theirs}"))
                }
                _ => {}
            }
        }
        if Instant::now() > deadline {
            return Err("handshake timed out".into());
        }
        let frame = hs.next_frame()?;
        pending = plink
            .on_message(frame, now_ms())
            .map_err(|e| e.to_string())?;
    }
}

/// The primary's replication driver: owns the link state machine and the Output Rule.
struct Driver {
    vm_id: String,
    owner: String,
    epoch: u64,
    /// `epoch` and its confirmations, shared with the epoch watch's thread.
    tenure: Arc<super::Tenure>,
    failure_timeout_ms: u64,
    link: PrimaryLink,
    rule: OutputRule<Held>,
    /// The log channel is given up (backup failed, or goodbye said).
    channel_closed: bool,
    pacing: Arc<Pacing>,
    /// Frames to send at the end of this turn, with one write.
    outbox: Vec<Frame>,
    /// Outputs to emit at the end of this turn, in this order.
    to_emit: Vec<Output>,
    tiebreak: Arc<dyn ftvm_tiebreak::TestAndSet>,
    alone: bool,
    status: StatusWriter,
    bytes_sent: Arc<AtomicU64>,
    frames_sent: u64,
    /// Writes to the log channel (one per turn that had frames).
    writes: u64,
    corrupt_frame: Option<u64>,
    last_loop_ms: u64,
    last_tick_ms: u64,
    /// A failure found on the reader thread, for the driver thread to return.
    failed: Option<Failure>,
    /// Said goodbye: whatever the channel does now is not a failure.
    finished: bool,
    /// The reader saw the channel end; the driver thread handles it after its own work of the
    /// turn, so a backup that leaves right after acking the guest's last entry is not a failure.
    peer_closed: Option<String>,
    vm_done: bool,
    /// The VM thread waits on `Shared::wake` (the link is stalled or the Output Rule is full).
    vm_waiting: bool,
    last_record_seq: u64,
    lag_ms: u64,
    /// Records sent and not yet acked: (last seq of a write, when it was handed to the socket),
    /// for the ack round trip. At most [`RTT_SAMPLES_MAX`]; older ones are not timed.
    rtt_pending: std::collections::VecDeque<(u64, Instant)>,
    host_acks: Arc<HostAcks>,
    /// This side's view of the log channel: (the backup's address, ours), for `Endpoints`.
    ends: (String, String),
    /// Smoothed time from writing records to their ack (µs): the Output Rule's added latency.
    ack_rtt_us: u64,
    /// `Shared::open_below`, for closing the output shortcut before an epoch claim.
    open_below: Arc<AtomicU64>,
    /// The driver thread sleeps longer than [`TICK_MS`]: an output held now must wake it, so
    /// that it polls the backup's host acknowledgment at the usual period.
    dozing: bool,
    /// Set by a turn that held an output while the driver dozed: notify it at the turn's end.
    wake_driver: bool,
}

/// Acknowledgments by the backup's host (TCP) of the log channel: an output may leave once its
/// log is there, because a backup replays everything its host received before the channel ended
/// (`ft::backup`). Only on a direct connection: a relay that ends TCP would acknowledge for it.
/// Written where the log is written (outside the driver lock), read by the driver.
#[derive(Default)]
struct HostAcks {
    /// The last record seq whose write the backup's host acknowledged.
    seq: AtomicU64,
    /// The backup's `Endpoints` matched this side's view: host acks count.
    direct: AtomicBool,
    /// The backup's `Endpoints` arrived (until then `direct` says nothing).
    known: AtomicBool,
    /// Writes that the backup's host had acknowledged by the time they returned (for status).
    at_once: AtomicU64,
}

impl HostAcks {
    /// After a write, or on a tick: takes what the writer says the backup's host acknowledged.
    /// Returns whether host acks count and cover everything written so far.
    fn take_from(&self, writer: &mut LogWriter) -> bool {
        if !self.direct.load(Ordering::Acquire) {
            return false;
        }
        if let Some(seq) = writer.host_acked() {
            self.seq.fetch_max(seq, Ordering::Release);
        }
        writer.marks.is_empty()
    }
}

/// A primary whose driver saw no turn for longer than this stood still (paused, stalled) and may
/// have been replaced meanwhile: half the failure timeout, after which a backup may go live.
fn stood_still_ms(failure_timeout_ms: u64) -> u64 {
    failure_timeout_ms / 2
}

/// Writes in flight timed for the ack round trip.
const RTT_SAMPLES_MAX: usize = 64;

impl Driver {
    fn new(
        node: &Node,
        tenure: Arc<super::Tenure>,
        link: PrimaryLink,
        pacing: Arc<Pacing>,
        host_acks: Arc<HostAcks>,
        ends: (String, String),
        open_below: Arc<AtomicU64>,
    ) -> Driver {
        let now = now_ms();
        let epoch = tenure.epoch();
        Driver {
            tenure,
            vm_id: node.vm_id.clone(),
            owner: node.owner.clone(),
            epoch,
            failure_timeout_ms: node.ft.failure_timeout_ms,
            link,
            rule: OutputRule::new(0),
            channel_closed: false,
            pacing,
            outbox: Vec::new(),
            to_emit: Vec::new(),
            tiebreak: node.tiebreak.clone(),
            alone: false,
            status: StatusWriter::new(node.status_file.clone()),
            bytes_sent: Arc::new(AtomicU64::new(0)),
            frames_sent: 0,
            writes: 0,
            corrupt_frame: node.corrupt_frame,
            last_loop_ms: now,
            last_tick_ms: now,
            failed: None,
            finished: false,
            peer_closed: None,
            vm_done: false,
            vm_waiting: false,
            last_record_seq: 0,
            lag_ms: 0,
            rtt_pending: std::collections::VecDeque::new(),
            host_acks,
            ends,
            open_below,
            ack_rtt_us: 0,
            dozing: false,
            wake_driver: false,
        }
    }

    /// Every turn, on either thread: a primary that was paused (SIGSTOP, a long stall) may have
    /// been replaced meanwhile, so before it touches anything it asks the tiebreaker whether its
    /// epoch is still current.
    fn turn_start(&mut self, now: u64) -> Result<(), Failure> {
        if let Some(f) = self.failed.take() {
            return Err(f);
        }
        if now.saturating_sub(self.last_loop_ms) > stood_still_ms(self.failure_timeout_ms) {
            self.check_still_current()?;
        }
        self.last_loop_ms = now;
        let host = self.host_acks.seq.load(Ordering::Acquire);
        if !self.alone && host > self.rule.acked_seq() {
            self.release(host);
        }
        Ok(())
    }

    /// How long the driver thread may sleep from `now` before its next look (ms).
    fn sleep_ms(&self, now: u64) -> u64 {
        let waited_on = self.alone
            || self.vm_done
            || self.vm_waiting
            || self.rule.held_count() > 0
            || self.failed.is_some()
            || self.peer_closed.is_some();
        match self.link.next_deadline_ms() {
            Some(due) if !waited_on => due.saturating_sub(now).clamp(1, DRIVER_SLEEP_MAX_MS),
            _ => TICK_MS,
        }
    }

    fn accept_vm(&self) -> bool {
        !self.vm_done && (self.alone || (!self.link.is_stalled() && !self.rule.is_full()))
    }

    fn on_vm(&mut self, item: ToDriver, now: u64) -> Result<(), Failure> {
        match item {
            ToDriver::Record { seq, bytes } => {
                self.last_record_seq = seq;
                if !self.alone {
                    match self.link.on_record(Record { seq, bytes }, now) {
                        Ok(actions) => self.apply(actions, now)?,
                        Err(e) => halt(format!("the log channel refused record {seq}: {e}")),
                    }
                }
            }
            ToDriver::Flush => {
                if !self.alone {
                    let actions = self.link.flush(now);
                    self.apply(actions, now)?;
                }
            }
            ToDriver::Output { seq, output } => {
                if self.alone {
                    self.emit(output);
                } else {
                    match self.rule.push(seq, Held(output)) {
                        Ok(Some(Held(out))) => self.emit(out),
                        Ok(None) => self.wake_driver |= self.dozing,
                        Err(e) => halt(format!("{e}")),
                    }
                }
            }
        }
        Ok(())
    }

    fn on_peer(&mut self, event: link::FromPeer, now: u64) -> Result<(), Failure> {
        match event {
            link::FromPeer::Frames(frames) => {
                for frame in frames {
                    if self.alone {
                        return Ok(());
                    }
                    match self.link.on_message(frame, now) {
                        Ok(actions) => self.apply(actions, now)?,
                        Err(e) => {
                            eprintln!("ftvm: log channel protocol error: {e}");
                            return self.backup_failed();
                        }
                    }
                }
                Ok(())
            }
            link::FromPeer::Closed(why) | link::FromPeer::Corrupt(why) => {
                if self.alone {
                    return Ok(());
                }
                eprintln!("ftvm: log channel to the backup ended: {why}");
                self.backup_failed()
            }
        }
    }

    fn apply(&mut self, actions: Vec<Action>, _now: u64) -> Result<(), Failure> {
        for action in actions {
            match action {
                Action::Send(frame) => self.send(frame),
                Action::Release { acked_seq } => {
                    self.time_ack(acked_seq);
                    self.release(acked_seq);
                }
                Action::PeerFailed { silent_ms } => {
                    if !self.alone {
                        eprintln!("ftvm: no word from the backup for {silent_ms} ms");
                        self.backup_failed()?;
                    }
                }
                Action::Pace(p) => {
                    self.lag_ms = p.lag_ms;
                    self.pacing
                        .slowdown_permille
                        .store(p.slowdown_permille as u64, Ordering::Relaxed);
                }
                Action::Superseded { theirs, ours } => halt(format!(
                    "the backup runs epoch {theirs}, above ours ({ours}): this primary was deposed"
                )),
                Action::PeerClosed { reason } => {
                    eprintln!("ftvm: the backup closed the log channel ({reason:?})");
                    self.backup_failed()?;
                }
                Action::StaleEpoch { theirs, ours } => {
                    eprintln!("ftvm: ignored a frame from stale epoch {theirs} (ours is {ours})");
                }
                Action::PeerEndpoints { backup, primary } => {
                    self.host_acks.known.store(true, Ordering::Release);
                    let (ours_peer, ours_local) = &self.ends;
                    if &backup == ours_peer && &primary == ours_local {
                        eprintln!(
                            "ftvm: the backup's host holds the other end of the log channel: \
                             outputs leave once its TCP has acknowledged their log"
                        );
                        self.host_acks.direct.store(true, Ordering::Release);
                    } else {
                        eprintln!(
                            "ftvm: the backup sees the log channel as {backup} to {primary}, this \
                             host as {ours_peer} to {ours_local}: something in between ends TCP, \
                             so outputs wait for the backup's own acks"
                        );
                    }
                }
                Action::Stall
                | Action::Resume
                | Action::HandshakeDone
                | Action::HandshakeRejected { .. } => {}
            }
        }
        Ok(())
    }

    fn send(&mut self, frame: Frame) {
        self.outbox.push(frame);
    }

    /// Whether this turn has frames to write (none once the channel is given up).
    fn has_outbox(&mut self) -> bool {
        if self.channel_closed {
            self.outbox.clear();
        }
        !self.outbox.is_empty()
    }

    /// Encodes the frames of this turn into `bytes` (cleared first), for one write. Returns the
    /// last record seq sent.
    fn encode_outbox(&mut self, bytes: &mut Vec<u8>) -> u64 {
        bytes.clear();
        // Drained, not taken: the outbox keeps its capacity for the next turn.
        for frame in self.outbox.drain(..) {
            let start = bytes.len();
            frame
                .encode_into(bytes)
                .expect("frames built by ftvm are within the wire limits");
            self.frames_sent += 1;
            if self.corrupt_frame == Some(self.frames_sent) {
                // Test hook: flip one bit in the middle of this frame.
                let at = start + (bytes.len() - start) / 2;
                bytes[at] ^= 0x04;
                eprintln!(
                    "ftvm: test hook: corrupted log-channel frame {}",
                    self.frames_sent
                );
            }
        }
        self.bytes_sent
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        self.writes += 1;
        let sent = self.link.sent_seq();
        if self.rtt_pending.back().is_none_or(|&(s, _)| s < sent)
            && self.rtt_pending.len() < RTT_SAMPLES_MAX
        {
            self.rtt_pending.push_back((sent, Instant::now()));
        }
        sent
    }

    /// The ack round trip of the newest write this ack covers (host time, for status only).
    fn time_ack(&mut self, acked: u64) {
        if let Some(at) = pop_through(&mut self.rtt_pending, acked) {
            let us = at.elapsed().as_micros() as u64;
            // EWMA with gain 1/8, as TCP's SRTT.
            self.ack_rtt_us = if self.ack_rtt_us == 0 {
                us
            } else {
                (7 * self.ack_rtt_us + us) / 8
            };
        }
    }

    fn release(&mut self, acked: u64) {
        for Held(output) in self.rule.release_iter(acked) {
            self.to_emit.push(output);
        }
    }

    fn emit(&mut self, output: Output) {
        self.to_emit.push(output);
    }

    /// The paper: the primary also wins the tiebreaker before it goes on alone.
    fn backup_failed(&mut self) -> Result<(), Failure> {
        self.channel_closed = true;
        // Nothing by the shortcut while the claim runs: if the backup won it, it is live.
        self.open_below.store(0, Ordering::Release);
        let next = self.epoch + 1;
        let claim_started = now_ms();
        match crate::tiebreak_spec::claim(&*self.tiebreak, &self.vm_id, next, &self.owner) {
            Ok(true) => {
                eprintln!("ftvm: backup lost; won epoch {next}, going on alone");
                self.epoch = next;
                self.tenure.won(next, claim_started);
                self.alone = true;
                self.pacing.slowdown_permille.store(0, Ordering::Relaxed);
                for Held(output) in self.rule.go_alone() {
                    self.emit(output);
                }
                Ok(())
            }
            Ok(false) => halt(format!(
                "the backup took over epoch {next}; this primary halts"
            )),
            Err(e) => halt(format!(
                "the tiebreaker could not be reached ({e}); halting rather than risk two primaries"
            )),
        }
    }

    fn check_still_current(&mut self) -> Result<(), Failure> {
        match self.tiebreak.current(&self.vm_id) {
            Ok(Some((e, holder))) if e > self.epoch => {
                halt(format!("this primary was paused and epoch {e} now belongs to {holder}; it halts without emitting"))
            }
            Ok(_) => Ok(()),
            Err(e) => halt(format!("paused, and cannot confirm the epoch with the tiebreaker ({e}); halting")),
        }
    }

    /// Queues the goodbye; the channel is closed after it is written.
    fn goodbye(&mut self) {
        self.finished = true;
        for action in self.link.goodbye(GoodbyeReason::Shutdown, now_ms()) {
            if let Action::Send(frame) = action {
                self.send(frame);
            }
        }
    }

    fn publish(&mut self, now: u64) {
        let acked = self.link.acked_seq();
        self.status.maybe_write(now, || Status {
            role: if self.alone {
                "primary (alone)".into()
            } else {
                "primary".into()
            },
            vm: self.vm_id.clone(),
            epoch: self.epoch,
            peer: if self.alone {
                None
            } else {
                Some("backup".into())
            },
            last_seq: self.last_record_seq,
            acked_seq: acked,
            lag_entries: self
                .last_record_seq
                .saturating_sub(self.link.replayed_seq()),
            lag_ms: self.lag_ms,
            log_bytes_sent: self.bytes_sent.load(Ordering::Relaxed),
            outputs_held: self.rule.held_count() as u64,
            outputs_held_bytes: self.rule.held_bytes() as u64,
            slowdown_permille: self.pacing.slowdown_permille.load(Ordering::Relaxed),
            log_frames: self.frames_sent,
            log_writes: self.writes,
            ack_rtt_us: self.ack_rtt_us,
            epoch_confirmed_ms_ago: Some(self.tenure.confirmed_age_ms()),
            holding_for_tiebreaker: self.tenure.is_holding(),
            host_acks: (!self.alone && self.host_acks.known.load(Ordering::Acquire))
                .then(|| self.host_acks.direct.load(Ordering::Acquire)),
            host_acked_seq: self.host_acks.seq.load(Ordering::Acquire),
            writes_acked_at_once: self.host_acks.at_once.load(Ordering::Relaxed),
        });
    }
}

/// The primary's replication state, shared by the VM thread (records, outputs), the reader
/// thread (acks) and the driver thread (timers).
struct Shared {
    driver: Mutex<Driver>,
    /// Signalled when acks arrive: a stalled VM may go on, the driver may finish; and when an
    /// output is held while the driver dozes.
    wake: Condvar,
    /// The log channel's write side. Taken before the driver lock is let go, so bytes leave in
    /// the order the driver decided them; the write itself happens outside the driver lock.
    channel: Mutex<LogWriter>,
    /// The same for outputs.
    emitter: Mutex<Emitter>,
    /// Checked before outputs that leave without a backup's ack.
    tenure: Arc<super::Tenure>,
    /// What the backup's host acknowledged, shared with the driver.
    host_acks: Arc<HostAcks>,
    /// Outputs tagged below this may leave straight from the VM thread, under the emitter lock
    /// alone (`DirectOutputs`): the log below it is acknowledged, the Output Rule holds nothing,
    /// and a backup is there (alone, outputs pass the tenure check). 0: none may. Set at the end
    /// of every turn from the driver's state; raised only while the emitter lock is held if the
    /// turn released outputs, so an output that takes the shortcut never overtakes one the rule
    /// released before it. Lowered by the VM thread's own turn when an output of it is held,
    /// before it makes the next one. Closed by the driver before it claims the next epoch when
    /// the backup is lost: the claim may lose to a backup that went live.
    open_below: Arc<AtomicU64>,
    /// The driver's clock (`now_ms`) at the start of its last turn: the shortcut is only for a
    /// primary whose driver ran lately. One that was paused (SIGSTOP, a stall) may have been
    /// replaced meanwhile, and its outputs go through the driver, which asks the tiebreaker.
    last_turn_ms: AtomicU64,
}

/// The log channel's write side and the buffer a turn's frames are encoded into (it keeps its
/// capacity from write to write).
struct LogWriter {
    stream: Option<TcpStream>,
    buf: Vec<u8>,
    /// Bytes written to the stream so far.
    written: u64,
    /// (stream offset after a write, the last record seq it carried), oldest first: the writes
    /// whose acknowledgment by the backup's host is not yet known.
    marks: std::collections::VecDeque<(u64, u64)>,
}

/// Writes whose host acknowledgment is tracked; past this, the oldest are forgotten (a later
/// write's acknowledgment covers them).
const HOST_ACK_MARKS_MAX: usize = 1024;

impl LogWriter {
    fn note_written(&mut self, seq: u64) {
        self.written += self.buf.len() as u64;
        if self.marks.len() == HOST_ACK_MARKS_MAX {
            self.marks.pop_front();
        }
        self.marks.push_back((self.written, seq));
    }

    /// The last record seq whose write the backup's host has acknowledged (TCP), if that moved.
    fn host_acked(&mut self) -> Option<u64> {
        use std::os::fd::AsRawFd;
        let fd = self.stream.as_ref()?.as_raw_fd();
        if self.marks.is_empty() {
            return None;
        }
        let mut queued: libc::c_int = 0;
        // SAFETY: SIOCOUTQ writes one int, the bytes the peer has not acknowledged yet.
        if unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut queued) } != 0 {
            return None;
        }
        let acked = self.written.saturating_sub(queued.max(0) as u64);
        pop_through(&mut self.marks, acked)
    }
}

/// Pops the entries of `queue` (ordered by their key) whose key is at most `upto`; returns the
/// value of the last one popped.
fn pop_through<T: Copy>(queue: &mut std::collections::VecDeque<(u64, T)>, upto: u64) -> Option<T> {
    let mut last = None;
    while let Some(&(key, value)) = queue.front() {
        if key > upto {
            break;
        }
        last = Some(value);
        queue.pop_front();
    }
    last
}

struct Emitter {
    transmit: Option<crate::nic::NicTx>,
    /// The outputs of the turn being emitted; swapped with the driver's list, so neither
    /// allocates again.
    pending: Vec<Output>,
}

impl Emitter {
    fn emit(&mut self, output: Output) {
        match output {
            Output::Frame(frame) => {
                if let Some(tx) = &self.transmit {
                    tx.send(frame);
                }
            }
            Output::Console { fd, bytes } => {
                let _ = if fd == 2 {
                    std::io::stderr().lock().write_all(&bytes)
                } else {
                    let mut out = std::io::stdout().lock();
                    out.write_all(&bytes).and_then(|_| out.flush())
                };
            }
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Driver> {
        self.driver.lock().expect("driver lock")
    }

    /// Ends a turn: writes the frames and emits the outputs it produced, outside the driver lock
    /// but in the order it produced them.
    fn end_turn(&self, mut d: MutexGuard<'_, Driver>) {
        let has_bytes = d.has_outbox();
        let alone = d.alone;
        let close = d.channel_closed || d.finished;
        let mut channel = (has_bytes || close).then(|| self.channel.lock().expect("channel lock"));
        let mut sent_seq = 0;
        if let (true, Some(channel)) = (has_bytes, channel.as_mut()) {
            sent_seq = d.encode_outbox(&mut channel.buf);
        }
        let mut emitter =
            (!d.to_emit.is_empty()).then(|| self.emitter.lock().expect("emitter lock"));
        if let Some(emitter) = emitter.as_mut() {
            std::mem::swap(&mut d.to_emit, &mut emitter.pending);
        }
        // Where outputs may take the shortcut from now on; if this turn released any, the
        // emitter lock is held here and until they have left.
        let open = if d.alone || d.failed.is_some() || d.rule.held_count() > 0 {
            0
        } else {
            d.rule.acked_seq() + 1
        };
        self.last_turn_ms.store(d.last_loop_ms, Ordering::Release);
        self.open_below.store(open, Ordering::Release);
        drop(d);
        if let Some(channel) = channel.as_mut() {
            let writer = &mut **channel;
            if let (true, Some(s)) = (has_bytes, writer.stream.as_mut()) {
                if let Err(e) = s.write_all(&writer.buf) {
                    eprintln!("ftvm: cannot write to the log channel: {e}");
                    let _ = s.shutdown(std::net::Shutdown::Both);
                    writer.stream = None;
                } else {
                    writer.note_written(sent_seq);
                    // Where the backup's host acknowledges at once and is this one (the lab),
                    // the acknowledgment came back within this write: the turn's outputs may
                    // leave as they are made.
                    if self.host_acks.take_from(writer) {
                        self.host_acks.at_once.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            if close {
                if let Some(s) = writer.stream.take() {
                    let _ = s.shutdown(std::net::Shutdown::Write);
                }
            }
        }
        drop(channel);
        if let Some(emitter) = emitter.as_mut() {
            if alone {
                // No backup's ack covers these: only the tenure keeps them from leaving beside
                // a newer pair. (Outputs held under the Output Rule were acked: safe.)
                self.tenure.before_output();
            }
            let mut outputs = std::mem::take(&mut emitter.pending);
            for output in outputs.drain(..) {
                emitter.emit(output);
            }
            emitter.pending = outputs;
        }
    }

    /// A record, flush or output from the VM thread. Blocks while the link is stalled or the
    /// Output Rule's buffer is full: the paper's stalled primary.
    fn take_from_vm(&self, item: ToDriver) -> Result<(), VmError> {
        let mut d = self.lock();
        while !d.accept_vm() {
            if d.vm_done {
                return Err(VmError::Halted("the replication driver stopped".into()));
            }
            d.vm_waiting = true;
            d = self
                .wake
                .wait_timeout(d, Duration::from_millis(TICK_MS))
                .expect("driver lock")
                .0;
            d.vm_waiting = false;
        }
        let now = now_ms();
        let result = d.turn_start(now).and_then(|_| d.on_vm(item, now));
        let wake_driver = std::mem::take(&mut d.wake_driver);
        self.end_turn(d);
        if wake_driver {
            self.wake.notify_all();
        }
        result.map_err(|f| VmError::Halted(f.message))
    }

    /// The VM has stopped: the driver thread waits for the final acks and says goodbye.
    fn vm_finished(&self) {
        let mut d = self.lock();
        d.vm_done = true;
        if !d.alone {
            let now = now_ms();
            let actions = d.link.flush(now);
            let _ = d.apply(actions, now);
        }
        self.end_turn(d);
        self.wake.notify_all();
    }

    /// Runs on the reader thread for what one read brought. Returns false to stop reading.
    fn deliver(&self, event: link::FromPeer) -> bool {
        let mut d = self.lock();
        if d.finished {
            return false;
        }
        // From the backup a bad frame is only the channel's end: it carries no records.
        let event = match event {
            link::FromPeer::Corrupt(why) => link::FromPeer::Closed(format!("corrupt frame: {why}")),
            other => other,
        };
        if let link::FromPeer::Closed(why) = event {
            // Handled by the driver thread after its own work of the turn, so a backup that
            // leaves right after acking the guest's last entry is not taken for a failure.
            d.peer_closed = Some(why);
            drop(d);
            self.wake.notify_all();
            return false;
        }
        let now = now_ms();
        let result = d.turn_start(now).and_then(|_| d.on_peer(event, now));
        let go_on = match result {
            Ok(()) => !d.alone,
            Err(f) => {
                d.failed = Some(f);
                false
            }
        };
        // Wake only a thread that waits for this: a stalled VM thread, or the driver thread
        // finishing (final acks) or handling a failure. Waking the driver on every ack costs a
        // context switch per ack and does nothing.
        let wake = d.vm_waiting || d.vm_done || !go_on;
        self.end_turn(d);
        if wake {
            self.wake.notify_all();
        }
        go_on
    }

    /// The driver thread: heartbeats, the failure timeout, a closed channel, status, the end.
    fn run(&self) -> Result<(), Failure> {
        loop {
            // An acknowledgment by the backup's host that came after its write (not taken
            // before the driver lock: `end_turn` takes the two the other way round).
            if let Ok(mut channel) = self.channel.try_lock() {
                self.host_acks.take_from(&mut channel);
            }
            let mut d = self.lock();
            let sleep_ms = d.sleep_ms(now_ms());
            d.dozing = sleep_ms > TICK_MS;
            let (mut d, _) = self
                .wake
                .wait_timeout(d, Duration::from_millis(sleep_ms))
                .expect("driver lock");
            d.dozing = false;
            let now = now_ms();
            d.turn_start(now)?;
            let due = d.link.next_deadline_ms().is_some_and(|due| now >= due);
            if !d.alone && (due || now.saturating_sub(d.last_tick_ms) >= TICK_MS) {
                d.last_tick_ms = now;
                let actions = d.link.tick(now);
                d.apply(actions, now)?;
            }
            d.publish(now);
            if d.vm_done && d.rule.held_count() == 0 {
                if !d.alone && d.link.acked_seq() >= d.last_record_seq {
                    d.goodbye();
                    self.end_turn(d);
                    return Ok(());
                }
                if d.alone {
                    self.end_turn(d);
                    return Ok(());
                }
            }
            if let Some(why) = d.peer_closed.take() {
                d.on_peer(link::FromPeer::Closed(why), now)?;
            }
            self.end_turn(d);
        }
    }
}

/// The VM's log sink on a primary: records go straight into the link state machine.
struct DirectSink {
    shared: Arc<Shared>,
    pacing: Arc<Pacing>,
    last_pace: Instant,
    /// The length of the last record: the next one's buffer starts with that capacity.
    record_len_hint: usize,
    /// Whether a record was handed over since the last flush. A flush with nothing new is a
    /// no-op for the link (an output's flush usually is: a turn's records precede its outputs),
    /// so it skips the driver lock.
    unflushed: bool,
    /// Test hook: flip a bit inside this record (its own checksum fails, the frame's holds).
    corrupt_record: Option<u64>,
    /// Test hook: fail the VM, as a host-local error, instead of logging this record.
    fail_at_record: Option<u64>,
}

impl ftvm_vm::LogSink for DirectSink {
    fn append(&mut self, seq: u64, entry: &ftvm_log::Entry) -> Result<(), VmError> {
        if self.fail_at_record == Some(seq) {
            return Err(VmError::Internal(format!(
                "test hook: this host failed at log record {seq}"
            )));
        }
        let mut bytes = Vec::with_capacity(self.record_len_hint);
        entry.encode_framed(seq, &mut bytes);
        self.record_len_hint = bytes.len();
        if self.corrupt_record == Some(seq) {
            let at = bytes.len() - 1;
            bytes[at] ^= 0x01;
            eprintln!("ftvm: test hook: corrupted log record {seq}");
        }
        self.unflushed = true;
        self.shared.take_from_vm(ToDriver::Record { seq, bytes })
    }
    fn flush(&mut self) -> Result<(), VmError> {
        if !self.unflushed {
            return Ok(());
        }
        self.unflushed = false;
        self.shared.take_from_vm(ToDriver::Flush)
    }
    /// The guest blocks: its records since the last output (the wake-up that carried the
    /// client's ACK, clock readings) wait in the link for the next output's flush or the batch
    /// delay. No output depends on them, so the Output Rule does not need them on the backup yet,
    /// and a write of their own at every blocking wait doubled the log writes of a
    /// request-reply client and put the second one in the way of its next request.
    fn idle(&mut self) -> Result<(), VmError> {
        Ok(())
    }
    fn pace(&mut self) -> Duration {
        ftvm_vm::channel::pace_pause(&self.pacing, &mut self.last_pace)
    }
}

/// The VM's outputs on a primary: held under the Output Rule.
struct DirectOutputs {
    shared: Arc<Shared>,
    /// A driver turn longer ago than this ([`stood_still_ms`]) sends outputs the long way,
    /// through `Driver::turn_start`'s check that this primary is current.
    pause_ms: u64,
    /// Outputs handed over so far (for the test hook).
    outputs: u64,
    /// Test hook: stop before the first output from this one on that the shortcut would pass.
    stop_before_shortcut: Option<u64>,
}

impl DirectOutputs {
    /// Whether an output tagged `seq` may leave by the shortcut as things stand.
    fn shortcut_open(&self, seq: u64) -> bool {
        let shared = &self.shared;
        seq < shared.open_below.load(Ordering::Acquire)
            && coarse_now_ms().saturating_sub(shared.last_turn_ms.load(Ordering::Acquire))
                <= self.pause_ms
    }
}

/// The monotonic clock at its coarse resolution (a tick; read without a system call): enough
/// to tell a primary that stood still for half a failure timeout from one that runs.
fn coarse_now_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

impl ftvm_vm::OutputPort for DirectOutputs {
    fn emit(&mut self, output: Output, seq: u64) -> Result<(), VmError> {
        // The common case under load: the log up to this output is acknowledged already (the
        // turn's first output waited for its write) and nothing is held before it. It leaves at
        // once, without the driver lock (and with a coarse clock reading instead of the full one a
        // turn of the driver takes).
        self.outputs += 1;
        if self
            .stop_before_shortcut
            .is_some_and(|n| self.outputs >= n && self.shortcut_open(seq))
        {
            self.stop_before_shortcut = None;
            eprintln!(
                "ftvm: test hook: stopping before output {}, which the shortcut would let through",
                self.outputs
            );
            // SAFETY: raise has no preconditions; the process stops here until SIGCONT.
            unsafe { libc::raise(libc::SIGSTOP) };
        }
        if self.shortcut_open(seq) {
            let mut emitter = self.shared.emitter.lock().expect("emitter lock");
            // Under the emitter lock: any output released before this one has left.
            if seq < self.shared.open_below.load(Ordering::Acquire) {
                emitter.emit(output);
                return Ok(());
            }
        }
        self.shared.take_from_vm(ToDriver::Output { seq, output })
    }
}

/// An output held under the Output Rule.
#[derive(Debug)]
struct Held(Output);

impl ftvm_repl::OutputLen for Held {
    fn output_len(&self) -> usize {
        self.0.len()
    }
}

pub(super) fn halt(message: String) -> ! {
    eprintln!("ftvm: HALT: {message}");
    // Fail-stop: nothing this process still holds may leave it.
    std::process::exit(exit_code::HALTED);
}
