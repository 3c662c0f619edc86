//! The primary: records the VM, streams the log, holds outputs until the backup acked them.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, select, Receiver};
use ftvm_log::ControlOp;
use ftvm_repl::wire::{Frame, GoodbyeReason};
use ftvm_repl::{Action, OutputRule, PrimaryLink, Record};
use ftvm_vm::channel::{ChannelSink, HeldOutputs, Pacing, ToDriver, VM_QUEUE_ITEMS_MAX};
use ftvm_vm::gate::Output;
use ftvm_vm::{exit_code, Gate, Vm, VmOutcome, World};

use super::status::{Status, StatusWriter};
use super::{config_hash, disk_hash_bytes, link, now_ms, Node};
use crate::opts::Failure;

/// Driver loop period: heartbeats, timeouts and status are checked at least this often.
const TICK_MS: u64 = 5;
/// Most VM items handled in one turn of the driver loop (one write to the log channel per turn).
const DRAIN_ITEMS_MAX: usize = 256;

pub fn run(node: Node) -> Result<i32, Failure> {
    let header = node.image.header()?;
    // Claim the pair's epoch: a new pair starts one past whatever was claimed before.
    let epoch = node
        .tiebreak
        .current(&node.vm_id)
        .map_err(|e| Failure::usage(format!("tiebreaker: {e}")))?
        .map(|(e, _)| e)
        .unwrap_or(0)
        + 1;
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

    let listener = TcpListener::bind(node.log_addr).map_err(|e| {
        Failure::usage(format!(
            "cannot listen for the log channel on {}: {e}",
            node.log_addr
        ))
    })?;
    let (stream, hs, link) = accept_backup(&listener, &node, &header, epoch)?;
    eprintln!(
        "ftvm: backup connected from {}",
        stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_default()
    );

    let attachment = super::attach(&node, true)?;
    let (vm_tx, vm_rx) = bounded::<ToDriver>(VM_QUEUE_ITEMS_MAX);
    let (control_tx, control_rx) = bounded::<ControlOp>(4);
    let pacing = Arc::new(Pacing::default());
    let power_off = super::install_power_off_signal(control_tx);

    let frames_rx = attachment.as_ref().map(|a| a.receiver());
    let transmit = attachment.as_ref().map(|a| a.transmitter());
    let driver = Driver::new(
        &node,
        epoch,
        link,
        stream,
        transmit,
        pacing.clone(),
    );
    let driver = Arc::new(Mutex::new(driver));
    // Acks are handled on the reader thread as they arrive (release the outputs they cover): no
    // hop to another thread on the Output Rule's round trip.
    let d = driver.clone();
    hs.spawn_reader(move |event| Driver::deliver(&d, event))
        .map_err(|e| Failure::usage(format!("cannot start the log reader: {e}")))?;
    let driver_thread = std::thread::Builder::new()
        .name("ftvm-driver".into())
        .spawn(move || Driver::run(&driver, vm_rx))
        .expect("spawn driver");

    let channel: Box<dyn ftvm_vm::LogSink> = Box::new(ChannelSink::new(vm_tx.clone(), pacing));
    let sink: Box<dyn ftvm_vm::LogSink> = match &node.record {
        Some(path) => Box::new(ftvm_vm::gate::TeeSink(
            channel,
            Box::new(ftvm_vm::logfile::FileSink::create(path, &header)?),
        )),
        None => channel,
    };
    let gate = Gate::record(
        sink,
        World::new(frames_rx, Some(control_rx)),
        Box::new(HeldOutputs::new(vm_tx.clone())),
        node.image.spec.limits.checkpoint_events,
    );
    let mut vm = Vm::boot(&node.image, gate)?;
    let outcome = vm.run();
    drop(power_off);
    // Tell the driver the VM is done; it drains, waits for the final acks and says goodbye.
    let code = match &outcome {
        Ok(VmOutcome::Exited(c)) => (*c & 0xff) as i32,
        Ok(VmOutcome::PoweredOff) => 0,
        Err(e) => e.exit_code(),
    };
    let _ = vm_tx.send(ToDriver::Flush);
    drop(vm);
    drop(vm_tx);
    let driver_result = driver_thread.join().expect("driver thread");
    if let Err(halt) = driver_result {
        return Err(halt);
    }
    match outcome {
        Ok(VmOutcome::PoweredOff) => eprintln!("ftvm: the VM was powered off"),
        Ok(VmOutcome::Exited(c)) => eprintln!("ftvm: guest exited with {c}"),
        Err(e) => return Err(e.into()),
    }
    Ok(code)
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
    failure_timeout_ms: u64,
    link: PrimaryLink,
    rule: OutputRule<Held>,
    stream: Option<TcpStream>,
    transmit: Option<crate::nic::NicTx>,
    pacing: Arc<Pacing>,
    /// Frames to send at the end of this turn of the loop, with one write.
    outbox: Vec<Frame>,
    tiebreak: Arc<dyn ftvm_tiebreak::TestAndSet>,
    alone: bool,
    status: StatusWriter,
    bytes_sent: Arc<AtomicU64>,
    frames_sent: u64,
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
    last_record_seq: u64,
    lag_ms: u64,
}

impl Driver {
    #[allow(clippy::too_many_arguments)]
    fn new(
        node: &Node,
        epoch: u64,
        link: PrimaryLink,
        stream: TcpStream,
        transmit: Option<crate::nic::NicTx>,
        pacing: Arc<Pacing>,
    ) -> Driver {
        let now = now_ms();
        Driver {
            vm_id: node.vm_id.clone(),
            owner: node.owner.clone(),
            epoch,
            failure_timeout_ms: node.ft.failure_timeout_ms,
            link,
            rule: OutputRule::new(0),
            stream: Some(stream),
            transmit,
            pacing,
            outbox: Vec::new(),
            tiebreak: node.tiebreak.clone(),
            alone: false,
            status: StatusWriter::new(node.status_file.clone()),
            bytes_sent: Arc::new(AtomicU64::new(0)),
            frames_sent: 0,
            corrupt_frame: node.corrupt_frame,
            last_loop_ms: now,
            last_tick_ms: now,
            failed: None,
            finished: false,
            peer_closed: None,
            vm_done: false,
            last_record_seq: 0,
            lag_ms: 0,
        }
    }

    fn run(shared: &Mutex<Driver>, vm_rx: Receiver<ToDriver>) -> Result<(), Failure> {
        loop {
            let accept_vm = {
                let mut d = shared.lock().expect("driver lock");
                d.turn_start(now_ms())?;
                d.accept_vm()
            };
            let never = crossbeam_channel::never();
            let item = select! {
                recv(if accept_vm { &vm_rx } else { &never }) -> item => Some(item),
                default(Duration::from_millis(TICK_MS)) => None,
            };
            let mut d = shared.lock().expect("driver lock");
            let now = now_ms();
            d.turn_start(now)?;
            match item {
                Some(Ok(item)) => {
                    d.on_vm(item, now)?;
                    // Take what else the VM already queued: its records and flushes then leave
                    // in one write.
                    let mut more = 0;
                    while more < DRAIN_ITEMS_MAX && d.accept_vm() {
                        let Ok(item) = vm_rx.try_recv() else { break };
                        d.on_vm(item, now)?;
                        more += 1;
                    }
                }
                Some(Err(_)) => {
                    d.vm_done = true;
                    if !d.alone {
                        let actions = d.link.flush(now);
                        d.apply(actions, now)?;
                    }
                }
                None => {}
            }
            if !d.alone && now.saturating_sub(d.last_tick_ms) >= TICK_MS {
                d.last_tick_ms = now;
                let actions = d.link.tick(now);
                d.apply(actions, now)?;
            }
            d.send_outbox();
            d.publish(now);
            if d.vm_done && vm_rx.is_empty() && d.rule.held_count() == 0 {
                if !d.alone && d.link.acked_seq() >= d.last_record_seq {
                    d.goodbye();
                    return Ok(());
                }
                if d.alone {
                    return Ok(());
                }
            }
            if let Some(why) = d.peer_closed.take() {
                d.on_peer(link::FromPeer::Closed(why), now)?;
            }
        }
    }

    /// Runs on the reader thread for what one read brought. Returns false to stop reading.
    fn deliver(shared: &Mutex<Driver>, event: link::FromPeer) -> bool {
        let mut d = shared.lock().expect("driver lock");
        if d.finished {
            return false;
        }
        let now = now_ms();
        if let link::FromPeer::Closed(why) = event {
            d.peer_closed = Some(why);
            return false;
        }
        let result = d.turn_start(now).and_then(|_| d.on_peer(event, now));
        d.send_outbox();
        match result {
            Ok(()) => !d.alone,
            Err(f) => {
                d.failed = Some(f);
                false
            }
        }
    }

    /// Every turn, on either thread: a primary that was paused (SIGSTOP, a long stall) may have
    /// been replaced meanwhile, so before it touches anything it asks the tiebreaker whether its
    /// epoch is still current.
    fn turn_start(&mut self, now: u64) -> Result<(), Failure> {
        if let Some(f) = self.failed.take() {
            return Err(f);
        }
        if now.saturating_sub(self.last_loop_ms) > self.failure_timeout_ms / 2 {
            self.check_still_current()?;
        }
        self.last_loop_ms = now;
        Ok(())
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
                        Ok(None) => {}
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
            link::FromPeer::Closed(why) => {
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
                Action::Release { acked_seq } => self.release(acked_seq),
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

    /// Writes the frames of this turn with one write.
    fn send_outbox(&mut self) {
        if self.outbox.is_empty() {
            return;
        }
        let frames = std::mem::take(&mut self.outbox);
        let Some(stream) = self.stream.as_mut() else {
            return;
        };
        let mut bytes = Vec::new();
        for frame in &frames {
            let start = bytes.len();
            bytes.extend_from_slice(
                &frame
                    .encode()
                    .expect("frames built by ftvm are within the wire limits"),
            );
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
        if let Err(e) = stream.write_all(&bytes) {
            eprintln!("ftvm: cannot write to the log channel: {e}");
            self.stream = None;
            return;
        }
        self.bytes_sent
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
    }

    fn release(&mut self, acked: u64) {
        for Held(output) in self.rule.release(acked) {
            self.emit(output);
        }
    }

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

    /// The paper: the primary also wins the tiebreaker before it goes on alone.
    fn backup_failed(&mut self) -> Result<(), Failure> {
        self.stream = None;
        let next = self.epoch + 1;
        match crate::tiebreak_spec::claim(&*self.tiebreak, &self.vm_id, next, &self.owner) {
            Ok(true) => {
                eprintln!("ftvm: backup lost; won epoch {next}, going on alone");
                self.epoch = next;
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

    fn goodbye(&mut self) {
        self.finished = true;
        for action in self.link.goodbye(GoodbyeReason::Shutdown, now_ms()) {
            if let Action::Send(frame) = action {
                self.send(frame);
            }
        }
        self.send_outbox();
        if let Some(s) = self.stream.take() {
            let _ = s.shutdown(std::net::Shutdown::Write);
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
        });
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
