//! A seeded simulation of a primary and a backup talking through the real wire format over an
//! in-order byte stream with random delays and random chunking (as TCP delivers), with a VM on each
//! side that produces or replays at random speeds. Every failing assertion prints its seed.
//!
//! Checkers: the Output Rule never lets an output out before the backup holds its record; the
//! backup replays exactly the primary's records; no false failure while both sides are alive and
//! ticked only at their announced deadlines; a partition is detected on time; Goodbye is clean.

use std::collections::VecDeque;

use crate::test_rng::Rng;
use crate::wire::{Decoder, Frame, GoodbyeReason, Hello, Role};
use crate::{
    Action, BackupExpect, BackupLink, LinkConfig, LinkState, OutputRule, PrimaryLink, Record,
};

/// One direction of a TCP connection: chunks arrive in order, each no earlier than the last.
struct Pipe {
    chunks: VecDeque<(u64, Vec<u8>)>,
    last_arrival_ms: u64,
    decoder: Decoder,
    cut: bool,
    /// Each chunk takes up to this long (a loaded link when large).
    delay_max_ms: u64,
}

impl Pipe {
    fn new(delay_max_ms: u64) -> Pipe {
        Pipe {
            chunks: VecDeque::new(),
            last_arrival_ms: 0,
            decoder: Decoder::new(),
            cut: false,
            delay_max_ms,
        }
    }

    fn send(&mut self, frame: &Frame, now_ms: u64, rng: &mut Rng) {
        if self.cut {
            return;
        }
        let mut bytes = frame.encode().expect("links only build encodable frames");
        while !bytes.is_empty() {
            let n = (1 + rng.below(bytes.len() as u64) as usize).min(bytes.len());
            let rest = bytes.split_off(n);
            self.last_arrival_ms = self
                .last_arrival_ms
                .max(now_ms + rng.below(self.delay_max_ms + 1));
            self.chunks.push_back((self.last_arrival_ms, bytes));
            bytes = rest;
        }
    }

    fn receive(&mut self, now_ms: u64) -> Vec<Frame> {
        let mut frames = Vec::new();
        while self.chunks.front().is_some_and(|(at, _)| *at <= now_ms) {
            let (_, chunk) = self.chunks.pop_front().unwrap();
            frames.extend(
                self.decoder
                    .feed(&chunk)
                    .expect("an undamaged stream decodes"),
            );
        }
        frames
    }
}

struct Sim {
    seed: u64,
    rng: Rng,
    now: u64,
    primary: PrimaryLink,
    backup: BackupLink,
    rule: OutputRule<Vec<u8>>,
    p2b: Pipe,
    b2p: Pipe,
    /// Every record the primary produced, by seq - 1.
    produced: Vec<Vec<u8>>,
    stalled: bool,
    slowdown_permille: u16,
    released: u64,
    pending_output: Option<(u64, Vec<u8>)>,
    primary_events: Vec<Action>,
    backup_events: Vec<Action>,
    replay_percent: u64,
}

impl Sim {
    fn new(seed: u64, config: LinkConfig) -> Sim {
        let mut rng = Rng::new(seed);
        let hello = Hello {
            vm_id: "vm".into(),
            role: Role::Primary,
            config_hash: [3; 32],
            disk_hash: [4; 32],
            start_seq: 1,
        };
        let expect = BackupExpect {
            vm_id: "vm".into(),
            config_hash: [3; 32],
            disk_hash: [4; 32],
            next_seq: 1,
        };
        let (primary, actions) = PrimaryLink::new(config.clone(), 1, hello, 0).unwrap();
        let backup = BackupLink::new(config, 1, expect, 0).unwrap();
        let replay_percent = [100, 60, 20][rng.below(3) as usize];
        let delay_max_ms = [5, 40][rng.below(2) as usize];
        let mut sim = Sim {
            seed,
            rng,
            now: 0,
            primary,
            backup,
            rule: OutputRule::new(0).with_limits(8, 1 << 20),
            p2b: Pipe::new(delay_max_ms),
            b2p: Pipe::new(delay_max_ms),
            produced: Vec::new(),
            stalled: false,
            slowdown_permille: 0,
            released: 0,
            pending_output: None,
            primary_events: Vec::new(),
            backup_events: Vec::new(),
            replay_percent,
        };
        sim.primary_actions(actions);
        sim
    }

    fn primary_actions(&mut self, actions: Vec<Action>) {
        for action in actions {
            match &action {
                Action::Send(frame) => self.p2b.send(frame, self.now, &mut self.rng),
                Action::Release { acked_seq } => {
                    assert!(
                        *acked_seq <= self.backup.received_seq(),
                        "seed {}: ack {acked_seq} for records the backup lacks",
                        self.seed
                    );
                    for output in self.rule.release(*acked_seq) {
                        self.check_output(&output);
                    }
                }
                Action::Stall => self.stalled = true,
                Action::Resume => self.stalled = false,
                Action::Pace(p) => self.slowdown_permille = p.slowdown_permille,
                _ => {}
            }
            self.primary_events.push(action);
        }
    }

    fn backup_actions(&mut self, actions: Vec<Action>) {
        for action in actions {
            if let Action::Send(frame) = &action {
                self.b2p.send(frame, self.now, &mut self.rng);
            }
            self.backup_events.push(action);
        }
    }

    /// An output leaves the primary: the record it depends on must be on the backup.
    fn check_output(&mut self, output: &[u8]) {
        let tag = u64::from_le_bytes(output[..8].try_into().unwrap());
        assert!(
            tag <= self.backup.received_seq(),
            "seed {}: output tagged {tag} released while the backup holds only {}",
            self.seed,
            self.backup.received_seq()
        );
        self.released += 1;
    }

    fn step(&mut self, vm_running: bool) {
        // The primary's VM: produces records and outputs, honouring stalls and the slowdown.
        let speed = 1000 - u64::from(self.slowdown_permille);
        if vm_running && !self.stalled && self.rng.below(1000) < speed {
            for _ in 0..self.rng.below(4) {
                if self.stalled {
                    break;
                }
                let seq = self.produced.len() as u64 + 1;
                let bytes = vec![(seq % 251) as u8; 1 + self.rng.below(300) as usize];
                self.produced.push(bytes.clone());
                let actions = self
                    .primary
                    .on_record(Record { seq, bytes }, self.now)
                    .unwrap();
                self.primary_actions(actions);
            }
            if self.pending_output.is_none() && self.rng.chance(30) {
                let tag = self.primary.last_seq();
                self.pending_output = Some((tag, tag.to_le_bytes().to_vec()));
            }
        }
        if let Some((tag, output)) = self.pending_output.take() {
            match self.rule.push(tag, output) {
                Ok(Some(output)) => self.check_output(&output),
                Ok(None) => {
                    let actions = self.primary.flush(self.now);
                    self.primary_actions(actions);
                }
                Err(full) => self.pending_output = Some((tag, full.output)),
            }
        }

        // The network, both ways.
        for frame in self.p2b.receive(self.now) {
            let actions = self.backup.on_message(frame, self.now).unwrap();
            self.backup_actions(actions);
        }
        for frame in self.b2p.receive(self.now) {
            let actions = self.primary.on_message(frame, self.now).unwrap();
            self.primary_actions(actions);
        }

        // The backup's VM replays at its own speed.
        if self.rng.chance(self.replay_percent) {
            for _ in 0..self.rng.below(5) {
                let Some(record) = self.backup.pop_record() else {
                    break;
                };
                assert_eq!(
                    record.bytes,
                    self.produced[record.seq as usize - 1],
                    "seed {}: record {} differs on the backup",
                    self.seed,
                    record.seq
                );
                let actions = self.backup.replayed(record.seq, self.now).unwrap();
                self.backup_actions(actions);
            }
        }

        // Timers fire only at the deadlines the links announce.
        if self
            .primary
            .next_deadline_ms()
            .is_some_and(|d| d <= self.now)
        {
            let actions = self.primary.tick(self.now);
            self.primary_actions(actions);
        }
        if self
            .backup
            .next_deadline_ms()
            .is_some_and(|d| d <= self.now)
        {
            let actions = self.backup.tick(self.now);
            self.backup_actions(actions);
        }
        self.now += 1;
    }

    fn failed(events: &[Action]) -> bool {
        events
            .iter()
            .any(|a| matches!(a, Action::PeerFailed { .. }))
    }
}

fn small_config() -> LinkConfig {
    LinkConfig {
        unacked_records_max: 64,
        replay_queue_records_max: 10_000,
        ..LinkConfig::default()
    }
}

#[test]
fn simulated_pairs_keep_the_output_rule_and_replay_exactly() {
    let (mut stalled_seeds, mut held_outputs, mut released_outputs) = (0, 0, 0);
    for seed in 0..40 {
        let mut sim = Sim::new(seed, small_config());
        for _ in 0..3_000 {
            sim.step(true);
        }
        assert!(
            !Sim::failed(&sim.primary_events),
            "seed {seed}: false failure on the primary"
        );
        assert!(
            !Sim::failed(&sim.backup_events),
            "seed {seed}: false failure on the backup"
        );
        assert!(
            sim.produced.len() > 100,
            "seed {seed}: the primary barely ran"
        );

        // Clean shutdown: Goodbye, let everything arrive, replay the rest.
        let actions = sim.primary.goodbye(GoodbyeReason::PowerOff, sim.now);
        sim.primary_actions(actions);
        for _ in 0..200 {
            sim.step(false);
        }
        while let Some(record) = sim.backup.pop_record() {
            sim.backup.replayed(record.seq, sim.now).unwrap();
        }
        assert_eq!(sim.backup.state(), LinkState::Closed, "seed {seed}");
        assert!(sim.backup_events.contains(&Action::PeerClosed {
            reason: GoodbyeReason::PowerOff
        }));
        assert_eq!(
            sim.backup.replayed_seq(),
            sim.produced.len() as u64,
            "seed {seed}"
        );
        assert!(
            !Sim::failed(&sim.backup_events),
            "seed {seed}: Goodbye taken for a failure"
        );
        sim.p2b.decoder.finish().unwrap();
        stalled_seeds += u32::from(sim.primary_events.contains(&Action::Stall));
        held_outputs += sim.rule.held_count();
        released_outputs += sim.released;
    }
    // The schedule must have exercised the interesting paths, or the checks above proved little.
    assert!(
        stalled_seeds >= 5,
        "only {stalled_seeds} seeds ever stalled"
    );
    assert!(
        released_outputs >= 40 * 100,
        "only {released_outputs} outputs were released"
    );
    assert_eq!(
        held_outputs, 0,
        "outputs still held after every record was acked"
    );
}

#[test]
fn a_slow_backup_slows_the_primary_down() {
    // Find seeds whose backup replays slowly; the primary must have been told to slow down, and
    // the buffer bound must have stalled it rather than let it run away.
    let mut slow_seeds = 0;
    for seed in 0..40 {
        let mut sim = Sim::new(
            seed,
            LinkConfig {
                unacked_records_max: 100_000,
                ..small_config()
            },
        );
        if sim.replay_percent != 20 {
            continue;
        }
        slow_seeds += 1;
        for _ in 0..3_000 {
            sim.step(true);
        }
        let paced = sim
            .primary_events
            .iter()
            .any(|a| matches!(a, Action::Pace(p) if p.slowdown_permille > 0));
        assert!(
            paced,
            "seed {seed}: lag {:?} but never slowed",
            sim.primary.pacing()
        );
        assert!(!Sim::failed(&sim.primary_events), "seed {seed}");
    }
    assert!(slow_seeds > 3);
}

#[test]
fn a_partition_is_detected_by_both_sides_on_time() {
    for seed in 0..10 {
        let mut sim = Sim::new(seed, small_config());
        for _ in 0..500 {
            sim.step(true);
        }
        // Cut both directions; whatever is in flight still arrives.
        sim.p2b.cut = true;
        sim.b2p.cut = true;
        let cut_at = sim.now;
        while !(Sim::failed(&sim.primary_events) && Sim::failed(&sim.backup_events)) {
            sim.step(true);
            assert!(sim.now < cut_at + 2_000, "seed {seed}: no failure detected");
        }
        let timeout = small_config().failure_timeout_ms;
        assert!(
            sim.now >= cut_at + timeout - 10,
            "seed {seed}: failure declared too early"
        );
        for events in [&sim.primary_events, &sim.backup_events] {
            let silent = events.iter().find_map(|a| match a {
                Action::PeerFailed { silent_ms } => Some(*silent_ms),
                _ => None,
            });
            assert_eq!(
                silent,
                Some(timeout),
                "seed {seed}: declared at the deadline, not later"
            );
        }
        // Nothing released after the cut was unacked by the backup (checked in check_output), and
        // the backup can still replay everything it received.
        while let Some(record) = sim.backup.pop_record() {
            sim.backup.replayed(record.seq, sim.now).unwrap();
        }
        assert!(sim.backup.is_drained());
    }
}
