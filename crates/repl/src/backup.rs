//! The backup's end of the log channel.

use std::collections::VecDeque;

use crate::wire::{Frame, Hello, Message, Role};
use crate::{Action, LinkConfig, LinkState, Record, ReplError};

/// What the backup knows about the VM it replicates; the primary's `Hello` must match it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupExpect {
    pub vm_id: String,
    pub config_hash: [u8; 32],
    pub disk_hash: [u8; 32],
    /// The first record the backup needs: its state is that after `next_seq - 1`.
    pub next_seq: u64,
}

/// The backup's end of the log channel: checks the handshake, accepts records strictly in
/// sequence, queues them for replay, acks, sends heartbeats, and detects the primary's failure.
#[derive(Debug)]
pub struct BackupLink {
    config: LinkConfig,
    epoch: u64,
    expect: BackupExpect,
    state: LinkState,
    /// Last record received (and queued).
    received_seq: u64,
    /// Last record handed to the VM by `pop_record`.
    popped_seq: u64,
    /// Last record the VM reported replayed.
    replayed_seq: u64,
    queue: VecDeque<Record>,
    queue_bytes: usize,
    /// (last seq of a `Records` message, when it arrived) for every message not fully replayed:
    /// the replay lag is the age of the oldest.
    arrivals: VecDeque<(u64, u64)>,
    last_heard_ms: u64,
    last_sent_ms: u64,
    last_ack_ms: u64,
    /// `replayed_seq` as of the last Ack sent.
    acked_replayed_seq: u64,
}

impl BackupLink {
    /// A backup waiting for the primary's `Hello`. `epoch` is the epoch it was set up in; a Hello
    /// from a higher epoch is accepted (that primary won a newer tiebreak), one from a lower epoch
    /// is refused.
    pub fn new(
        config: LinkConfig,
        epoch: u64,
        expect: BackupExpect,
        now_ms: u64,
    ) -> Result<BackupLink, ReplError> {
        config.validate()?;
        if expect.next_seq == 0 {
            return Err(ReplError::Config("next_seq must be at least 1".into()));
        }
        let before = expect.next_seq - 1;
        Ok(BackupLink {
            config,
            epoch,
            expect,
            state: LinkState::Handshaking,
            received_seq: before,
            popped_seq: before,
            replayed_seq: before,
            queue: VecDeque::new(),
            queue_bytes: 0,
            arrivals: VecDeque::new(),
            last_heard_ms: now_ms,
            last_sent_ms: now_ms,
            last_ack_ms: now_ms,
            acked_replayed_seq: before,
        })
    }

    /// A frame from the primary. An `Err` is a protocol violation (a gap, say): the link is broken
    /// for good, and the records already queued are still valid to replay.
    pub fn on_message(&mut self, frame: Frame, now_ms: u64) -> Result<Vec<Action>, ReplError> {
        if self.state.is_final() {
            return Ok(Vec::new());
        }
        let ours = self.epoch;
        if frame.epoch < ours {
            let mut actions = vec![Action::StaleEpoch {
                theirs: frame.epoch,
                ours,
            }];
            if matches!(frame.message, Message::Hello(_)) {
                // Tell the deposed primary: our reply carries our epoch, which supersedes it.
                let reason = format!(
                    "stale epoch {}: this backup is in epoch {ours}",
                    frame.epoch
                );
                self.send(
                    Message::HelloAck { ok: false, reason },
                    now_ms,
                    &mut actions,
                );
            }
            return Ok(actions);
        }
        if frame.epoch > ours {
            // The primary's Hello, or its refusal to pair, brings the epoch it runs in.
            let opening = matches!(
                frame.message,
                Message::Hello(_) | Message::HelloAck { ok: false, .. }
            );
            if self.state == LinkState::Handshaking && opening {
                self.epoch = frame.epoch;
            } else {
                self.state = LinkState::Broken;
                return Err(ReplError::EpochChanged {
                    theirs: frame.epoch,
                    ours,
                });
            }
        }
        self.last_heard_ms = now_ms;
        let result = self.handle(frame.message, now_ms);
        if result.is_err() {
            self.state = LinkState::Broken;
        }
        result
    }

    fn handle(&mut self, message: Message, now_ms: u64) -> Result<Vec<Action>, ReplError> {
        let mut actions = Vec::new();
        match (self.state, message) {
            (LinkState::Handshaking, Message::Hello(hello)) => match self.check_hello(&hello) {
                Ok(()) => {
                    self.state = LinkState::Connected;
                    let ok = Message::HelloAck {
                        ok: true,
                        reason: String::new(),
                    };
                    self.send(ok, now_ms, &mut actions);
                    self.last_ack_ms = now_ms;
                    actions.push(Action::HandshakeDone);
                }
                Err(reason) => {
                    self.state = LinkState::Rejected;
                    let refusal = Message::HelloAck {
                        ok: false,
                        reason: reason.clone(),
                    };
                    self.send(refusal, now_ms, &mut actions);
                    actions.push(Action::HandshakeRejected { reason });
                }
            },
            (LinkState::Handshaking, Message::HelloAck { ok: false, reason }) => {
                // A primary that will not pair (it has a backup, or it runs alone): no Hello.
                self.state = LinkState::Rejected;
                actions.push(Action::HandshakeRejected {
                    reason: format!("the primary refused: {reason}"),
                });
            }
            (LinkState::Connected, Message::Records { first_seq, records }) => {
                self.on_records(first_seq, records, now_ms)?;
                // Ack every Records message at once: the primary's outputs wait for it.
                self.send_ack(now_ms, &mut actions);
            }
            (LinkState::Connected, Message::Heartbeat { last_seq, .. }) => {
                // TCP is in order: everything the primary sent before its heartbeat has arrived.
                if last_seq > self.received_seq {
                    return Err(ReplError::Gap {
                        expected: self.received_seq + 1,
                        found: last_seq,
                    });
                }
                if last_seq < self.received_seq {
                    return Err(ReplError::HeartbeatMismatch {
                        peer: "primary",
                        theirs: last_seq,
                        ours: self.received_seq,
                    });
                }
            }
            (_, Message::Goodbye { reason }) => {
                self.state = LinkState::Closed;
                actions.push(Action::PeerClosed { reason });
            }
            (state, message) => {
                return Err(ReplError::Unexpected {
                    message: message.kind_name(),
                    peer: "primary",
                    state: state.name(),
                })
            }
        }
        Ok(actions)
    }

    fn check_hello(&self, hello: &Hello) -> Result<(), String> {
        let expect = &self.expect;
        if hello.role != Role::Primary {
            return Err("the peer introduced itself as a backup; two backups cannot pair".into());
        }
        if hello.vm_id != expect.vm_id {
            return Err(format!(
                "this backup replicates VM {:?}, not {:?}",
                expect.vm_id, hello.vm_id
            ));
        }
        if hello.config_hash != expect.config_hash {
            return Err(
                "the configuration hash differs: the two hosts run a different module, VM \
                        spec, engine or log format (run the same ftvm build on both)"
                    .into(),
            );
        }
        if hello.disk_hash != expect.disk_hash {
            return Err(
                "the disk hash differs: the backup's disk is not the primary's starting disk"
                    .into(),
            );
        }
        if hello.start_seq != expect.next_seq {
            return Err(format!(
                "the backup's state is that after record {}, so the log must start at record {}, \
                 not {}",
                expect.next_seq - 1,
                expect.next_seq,
                hello.start_seq
            ));
        }
        Ok(())
    }

    fn on_records(
        &mut self,
        first_seq: u64,
        records: Vec<Vec<u8>>,
        now_ms: u64,
    ) -> Result<(), ReplError> {
        let next = self.received_seq + 1;
        if first_seq > next {
            return Err(ReplError::Gap {
                expected: next,
                found: first_seq,
            });
        }
        let last_seq = first_seq + records.len() as u64 - 1;
        if last_seq < next {
            return Ok(()); // all duplicates
        }
        if !self.wants_records() {
            return Err(ReplError::ReplayQueueOverflow {
                records: self.queue.len(),
                bytes: self.queue_bytes,
            });
        }
        let skip = (next - first_seq) as usize;
        for (i, bytes) in records.into_iter().enumerate().skip(skip) {
            let seq = first_seq + i as u64;
            self.queue_bytes += bytes.len();
            self.queue.push_back(Record { seq, bytes });
        }
        self.received_seq = last_seq;
        self.arrivals.push_back((last_seq, now_ms));
        Ok(())
    }

    /// A frame read after the link failed or broke, from bytes this host had received (and its
    /// TCP had acknowledged) before the I/O layer shut the channel. The primary releases outputs
    /// on that acknowledgment, so the records are still taken, in sequence; nothing is sent and
    /// no other message matters any more. An `Err`: they cannot be taken (a gap, a newer epoch, a
    /// full queue), and this backup can never go live consistently.
    pub fn on_drained(&mut self, frame: Frame, now_ms: u64) -> Result<(), ReplError> {
        if frame.epoch > self.epoch {
            return Err(ReplError::EpochChanged {
                theirs: frame.epoch,
                ours: self.epoch,
            });
        }
        match frame.message {
            Message::Records { first_seq, records } if frame.epoch == self.epoch => {
                self.on_records(first_seq, records, now_ms)
            }
            _ => Ok(()),
        }
    }

    /// The next record to replay, in sequence. Records stay available after the link failed or
    /// closed: the backup replays everything it received before it goes live.
    pub fn pop_record(&mut self) -> Option<Record> {
        let record = self.queue.pop_front()?;
        self.queue_bytes -= record.bytes.len();
        self.popped_seq = record.seq;
        Some(record)
    }

    /// The VM has replayed every record up to `seq`. May send an ack reporting progress (at most
    /// every `ack_interval_ms`).
    pub fn replayed(&mut self, seq: u64, now_ms: u64) -> Result<Vec<Action>, ReplError> {
        if seq < self.replayed_seq || seq > self.popped_seq {
            return Err(ReplError::ReplayedOutOfOrder {
                seq,
                popped: self.popped_seq,
                replayed: self.replayed_seq,
            });
        }
        self.replayed_seq = seq;
        while self.arrivals.front().is_some_and(|&(last, _)| last <= seq) {
            self.arrivals.pop_front();
        }
        let mut actions = Vec::new();
        if self.state == LinkState::Connected
            && now_ms.saturating_sub(self.last_ack_ms) >= self.config.ack_interval_ms
            && self.replayed_seq > self.acked_replayed_seq
        {
            self.send_ack(now_ms, &mut actions);
        }
        Ok(actions)
    }

    /// Time passes: periodic acks while replay progresses or lags, heartbeats when idle, and the
    /// primary declared failed after the failure timeout.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Action> {
        let mut actions = Vec::new();
        if self.state.is_final() {
            return actions;
        }
        let silent_ms = now_ms.saturating_sub(self.last_heard_ms);
        if silent_ms >= self.config.failure_timeout_ms {
            self.state = LinkState::Failed;
            actions.push(Action::PeerFailed { silent_ms });
            return actions;
        }
        if self.state == LinkState::Connected {
            if self.ack_due(now_ms) {
                self.send_ack(now_ms, &mut actions);
            }
            if now_ms.saturating_sub(self.last_sent_ms) >= self.config.heartbeat_interval_ms {
                let beat = Message::Heartbeat {
                    now_ms,
                    last_seq: self.received_seq,
                };
                self.send(beat, now_ms, &mut actions);
            }
        }
        actions
    }

    /// A periodic ack is due when replay moved since the last one, or is behind (so the primary
    /// keeps seeing the lag grow).
    fn ack_due(&self, now_ms: u64) -> bool {
        let pending =
            self.replayed_seq > self.acked_replayed_seq || self.replayed_seq < self.received_seq;
        pending && now_ms.saturating_sub(self.last_ack_ms) >= self.config.ack_interval_ms
    }

    fn send_ack(&mut self, now_ms: u64, actions: &mut Vec<Action>) {
        let ack = Message::Ack {
            received_seq: self.received_seq,
            replayed_seq: self.replayed_seq,
            replay_lag_ms: self.replay_lag_ms(now_ms),
        };
        self.send(ack, now_ms, actions);
        self.last_ack_ms = now_ms;
        self.acked_replayed_seq = self.replayed_seq;
    }

    fn send(&mut self, message: Message, now_ms: u64, actions: &mut Vec<Action>) {
        actions.push(Action::Send(Frame::new(self.epoch, message)));
        self.last_sent_ms = now_ms;
    }

    /// How long the oldest received but unreplayed record has waited (0 when replay is caught up).
    pub fn replay_lag_ms(&self, now_ms: u64) -> u64 {
        self.arrivals
            .front()
            .map_or(0, |&(_, at)| now_ms.saturating_sub(at))
    }

    /// When [`BackupLink::tick`] must next be called (`None` once the link is final).
    pub fn next_deadline_ms(&self) -> Option<u64> {
        if self.state.is_final() {
            return None;
        }
        let mut deadline = self.last_heard_ms + self.config.failure_timeout_ms;
        if self.state == LinkState::Connected {
            deadline = deadline.min(self.last_sent_ms + self.config.heartbeat_interval_ms);
            if self.replayed_seq > self.acked_replayed_seq || self.replayed_seq < self.received_seq
            {
                deadline = deadline.min(self.last_ack_ms + self.config.ack_interval_ms);
            }
        }
        Some(deadline)
    }

    /// False while the replay queue is full: the I/O layer must stop reading the socket (TCP's
    /// window then stalls the primary).
    pub fn wants_records(&self) -> bool {
        self.queue.len() < self.config.replay_queue_records_max
            && self.queue_bytes < self.config.replay_queue_bytes_max
    }

    /// Every received record has been replayed: the backup may go live (after the tiebreak).
    pub fn is_drained(&self) -> bool {
        self.replayed_seq == self.received_seq
    }

    pub fn state(&self) -> LinkState {
        self.state
    }

    /// Our epoch: the one configured, or the primary's if its Hello carried a higher one.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn received_seq(&self) -> u64 {
        self.received_seq
    }

    pub fn replayed_seq(&self) -> u64 {
        self.replayed_seq
    }

    pub fn queued_records(&self) -> usize {
        self.queue.len()
    }

    pub fn queued_bytes(&self) -> usize {
        self.queue_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::GoodbyeReason;

    fn expect() -> BackupExpect {
        BackupExpect {
            vm_id: "vm1".into(),
            config_hash: [1; 32],
            disk_hash: [2; 32],
            next_seq: 1,
        }
    }

    fn hello_frame(epoch: u64, start_seq: u64) -> Frame {
        Frame::new(
            epoch,
            Message::Hello(Hello {
                vm_id: "vm1".into(),
                role: Role::Primary,
                config_hash: [1; 32],
                disk_hash: [2; 32],
                start_seq,
            }),
        )
    }

    fn connected(config: LinkConfig) -> BackupLink {
        let mut link = BackupLink::new(config, 5, expect(), 0).unwrap();
        let actions = link.on_message(hello_frame(5, 1), 0).unwrap();
        assert_eq!(
            actions,
            vec![
                Action::Send(Frame::new(
                    5,
                    Message::HelloAck {
                        ok: true,
                        reason: String::new()
                    }
                )),
                Action::HandshakeDone
            ]
        );
        link
    }

    fn records(first_seq: u64, n: usize) -> Frame {
        let records = (0..n)
            .map(|i| vec![(first_seq + i as u64) as u8; 3])
            .collect();
        Frame::new(5, Message::Records { first_seq, records })
    }

    fn acks(actions: &[Action]) -> Vec<(u64, u64, u64)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send(Frame {
                    message:
                        Message::Ack {
                            received_seq,
                            replayed_seq,
                            replay_lag_ms,
                        },
                    ..
                }) => Some((*received_seq, *replayed_seq, *replay_lag_ms)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn every_records_message_is_acked_at_once() {
        let mut link = connected(LinkConfig::default());
        assert_eq!(
            acks(&link.on_message(records(1, 3), 10).unwrap()),
            vec![(3, 0, 0)]
        );
        assert_eq!(
            acks(&link.on_message(records(4, 1), 20).unwrap()),
            vec![(4, 0, 10)]
        );
        assert_eq!(link.queued_records(), 4);
        assert_eq!(
            link.pop_record().unwrap(),
            Record {
                seq: 1,
                bytes: vec![1; 3]
            }
        );
    }

    #[test]
    fn gaps_are_errors_and_duplicates_are_ignored() {
        let mut link = connected(LinkConfig::default());
        link.on_message(records(1, 3), 0).unwrap();
        // Records 2..=5: 2 and 3 are duplicates, 4 and 5 are new.
        assert_eq!(
            acks(&link.on_message(records(2, 4), 0).unwrap()),
            vec![(5, 0, 0)]
        );
        assert_eq!(
            acks(&link.on_message(records(1, 2), 0).unwrap()),
            vec![(5, 0, 0)],
            "all duplicates"
        );
        let seqs: Vec<u64> = std::iter::from_fn(|| link.pop_record())
            .map(|r| r.seq)
            .collect();
        assert_eq!(seqs, [1, 2, 3, 4, 5]);
        let err = link.on_message(records(7, 1), 0).unwrap_err();
        assert!(
            matches!(
                err,
                ReplError::Gap {
                    expected: 6,
                    found: 7
                }
            ),
            "{err}"
        );
        assert!(err
            .to_string()
            .contains("record 7 arrived, but the next expected was 6"));
        assert_eq!(link.state(), LinkState::Broken);
        assert!(
            link.on_message(records(6, 1), 0).unwrap().is_empty(),
            "a broken link ignores input"
        );
    }

    #[test]
    fn a_heartbeat_announcing_unseen_records_is_a_gap() {
        let mut link = connected(LinkConfig::default());
        link.on_message(records(1, 2), 0).unwrap();
        let fine = Frame::new(
            5,
            Message::Heartbeat {
                now_ms: 0,
                last_seq: 2,
            },
        );
        assert!(link.on_message(fine, 1).unwrap().is_empty());
        let ahead = Frame::new(
            5,
            Message::Heartbeat {
                now_ms: 0,
                last_seq: 4,
            },
        );
        assert!(matches!(
            link.on_message(ahead, 2),
            Err(ReplError::Gap {
                expected: 3,
                found: 4
            })
        ));
    }

    #[test]
    fn the_handshake_checks_everything() {
        let cases: Vec<(Frame, &str)> = vec![
            (hello_frame(5, 2), "must start at record 1, not 2"),
            (
                Frame::new(
                    5,
                    Message::Hello(Hello {
                        vm_id: "vm2".into(),
                        ..hello_of(hello_frame(5, 1))
                    }),
                ),
                "replicates VM \"vm1\", not \"vm2\"",
            ),
            (
                Frame::new(
                    5,
                    Message::Hello(Hello {
                        disk_hash: [0; 32],
                        ..hello_of(hello_frame(5, 1))
                    }),
                ),
                "disk hash differs",
            ),
            (
                Frame::new(
                    5,
                    Message::Hello(Hello {
                        config_hash: [0; 32],
                        ..hello_of(hello_frame(5, 1))
                    }),
                ),
                "configuration hash differs",
            ),
            (
                Frame::new(
                    5,
                    Message::Hello(Hello {
                        role: Role::Backup,
                        ..hello_of(hello_frame(5, 1))
                    }),
                ),
                "two backups",
            ),
        ];
        for (frame, why) in cases {
            let mut link = BackupLink::new(LinkConfig::default(), 5, expect(), 0).unwrap();
            let actions = link.on_message(frame, 0).unwrap();
            let Action::HandshakeRejected { reason } = &actions[1] else {
                panic!("{actions:?}")
            };
            assert!(reason.contains(why), "{reason:?} lacks {why:?}");
            assert!(matches!(
                &actions[0],
                Action::Send(Frame {
                    message: Message::HelloAck { ok: false, .. },
                    ..
                })
            ));
            assert_eq!(link.state(), LinkState::Rejected);
        }
        // Records before the handshake are a protocol error.
        let mut link = BackupLink::new(LinkConfig::default(), 5, expect(), 0).unwrap();
        assert!(matches!(
            link.on_message(records(1, 1), 0),
            Err(ReplError::Unexpected { .. })
        ));
    }

    #[test]
    fn a_primary_that_will_not_pair_is_a_rejection_not_a_protocol_error() {
        // A primary in a later epoch (it went on alone) answers a late backup with a refusal.
        let mut link = BackupLink::new(LinkConfig::default(), 1, expect(), 0).unwrap();
        let refusal = Frame::new(
            3,
            Message::HelloAck {
                ok: false,
                reason: "it runs alone".into(),
            },
        );
        let actions = link.on_message(refusal, 0).unwrap();
        assert_eq!(
            actions,
            vec![Action::HandshakeRejected {
                reason: "the primary refused: it runs alone".into()
            }],
            "nothing is sent back"
        );
        assert_eq!(link.state(), LinkState::Rejected);
        assert_eq!(link.epoch(), 3);
        // After the handshake the same message is a protocol error, as before.
        let mut link = BackupLink::new(LinkConfig::default(), 5, expect(), 0).unwrap();
        link.on_message(hello_frame(5, 1), 0).unwrap();
        let late = Frame::new(
            5,
            Message::HelloAck {
                ok: false,
                reason: String::new(),
            },
        );
        assert!(matches!(
            link.on_message(late, 0),
            Err(ReplError::Unexpected { .. })
        ));
    }

    fn hello_of(frame: Frame) -> Hello {
        match frame.message {
            Message::Hello(h) => h,
            _ => unreachable!(),
        }
    }

    #[test]
    fn epochs_stale_primaries_are_refused_and_newer_ones_adopted() {
        let mut link = BackupLink::new(LinkConfig::default(), 5, expect(), 0).unwrap();
        let actions = link.on_message(hello_frame(4, 1), 0).unwrap();
        assert_eq!(actions[0], Action::StaleEpoch { theirs: 4, ours: 5 });
        let Action::Send(reply) = &actions[1] else {
            panic!("{actions:?}")
        };
        assert_eq!(
            reply.epoch, 5,
            "the refusal carries our epoch, which deposes the sender"
        );
        assert_eq!(
            link.state(),
            LinkState::Handshaking,
            "the real primary may still come"
        );

        link.on_message(hello_frame(7, 1), 0).unwrap();
        assert_eq!((link.state(), link.epoch()), (LinkState::Connected, 7));
        let stale = Frame::new(
            5,
            Message::Heartbeat {
                now_ms: 0,
                last_seq: 0,
            },
        );
        assert_eq!(
            link.on_message(stale, 1).unwrap(),
            vec![Action::StaleEpoch { theirs: 5, ours: 7 }]
        );
        let newer = Frame::new(
            8,
            Message::Heartbeat {
                now_ms: 0,
                last_seq: 0,
            },
        );
        assert!(matches!(
            link.on_message(newer, 1),
            Err(ReplError::EpochChanged { theirs: 8, ours: 7 })
        ));
    }

    #[test]
    fn heartbeats_periodic_acks_and_failure_timing() {
        let mut link = connected(LinkConfig::default());
        assert!(link.tick(49).is_empty());
        let beat = link.tick(50);
        assert_eq!(
            beat,
            vec![Action::Send(Frame::new(
                5,
                Message::Heartbeat {
                    now_ms: 50,
                    last_seq: 0
                }
            ))]
        );

        // Records arrive at 60; the VM replays slowly. Acks report progress every 10 ms at most.
        link.on_message(records(1, 3), 60).unwrap();
        link.pop_record();
        assert!(
            link.replayed(1, 65).unwrap().is_empty(),
            "5 ms after the last ack"
        );
        assert_eq!(link.next_deadline_ms(), Some(70));
        assert_eq!(acks(&link.tick(70)), vec![(3, 1, 10)]);
        // No progress, but still behind: the lag keeps being reported.
        assert_eq!(acks(&link.tick(80)), vec![(3, 1, 20)]);
        link.pop_record();
        link.pop_record();
        assert_eq!(acks(&link.replayed(3, 90).unwrap()), vec![(3, 3, 0)]);
        assert!(link.is_drained());
        // Caught up and reported: no more acks, only heartbeats.
        assert!(acks(&link.tick(200)).is_empty());

        assert!(!link
            .tick(1_059)
            .iter()
            .any(|a| matches!(a, Action::PeerFailed { .. })));
        assert_eq!(
            link.tick(1_060),
            vec![Action::PeerFailed { silent_ms: 1_000 }]
        );
        assert!(link.tick(9_999).is_empty(), "reported once");
    }

    #[test]
    fn records_drained_after_the_failure_are_still_taken_in_sequence() {
        let mut link = connected(LinkConfig::default());
        link.on_message(records(1, 2), 0).unwrap();
        assert!(matches!(link.tick(5_000)[..], [Action::PeerFailed { .. }]));
        assert!(
            link.on_message(records(3, 2), 5_001).unwrap().is_empty(),
            "a failed link takes nothing new"
        );
        link.on_drained(records(3, 2), 5_001).unwrap();
        link.on_drained(records(4, 2), 5_001).unwrap(); // 4 again: a duplicate is skipped
        let heartbeat = Frame::new(
            5,
            Message::Heartbeat {
                now_ms: 1,
                last_seq: 5,
            },
        );
        link.on_drained(heartbeat, 5_002).unwrap();
        let seqs: Vec<u64> = std::iter::from_fn(|| link.pop_record().map(|r| r.seq)).collect();
        assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
        assert!(matches!(
            link.on_drained(records(9, 1), 5_003),
            Err(ReplError::Gap {
                expected: 6,
                found: 9
            })
        ));
        assert!(matches!(
            link.on_drained(Frame::new(6, records(6, 1).message), 5_003),
            Err(ReplError::EpochChanged { theirs: 6, ours: 5 })
        ));
    }

    #[test]
    fn a_backup_without_a_hello_gives_up_after_the_timeout() {
        let mut link = BackupLink::new(LinkConfig::default(), 5, expect(), 100).unwrap();
        assert!(
            link.tick(1_099).is_empty(),
            "no heartbeats before the handshake"
        );
        assert!(matches!(link.tick(1_100)[..], [Action::PeerFailed { .. }]));
    }

    #[test]
    fn goodbye_is_a_clean_end_and_queued_records_stay_replayable() {
        let mut link = connected(LinkConfig::default());
        link.on_message(records(1, 2), 0).unwrap();
        let bye = Frame::new(
            5,
            Message::Goodbye {
                reason: GoodbyeReason::GuestExit(3),
            },
        );
        assert_eq!(
            link.on_message(bye, 1).unwrap(),
            vec![Action::PeerClosed {
                reason: GoodbyeReason::GuestExit(3)
            }]
        );
        assert_eq!(link.state(), LinkState::Closed);
        assert!(
            link.tick(100_000).is_empty(),
            "a clean Goodbye is never a failure"
        );
        assert_eq!(link.pop_record().map(|r| r.seq), Some(1));
        assert!(
            link.replayed(1, 100_001).unwrap().is_empty(),
            "no acks on a closed link"
        );
    }

    #[test]
    fn the_replay_queue_is_bounded() {
        let mut link = connected(LinkConfig {
            replay_queue_records_max: 4,
            ..LinkConfig::default()
        });
        link.on_message(records(1, 3), 0).unwrap();
        assert!(link.wants_records());
        link.on_message(records(4, 3), 0).unwrap(); // overshoots by at most one message
        assert!(!link.wants_records());
        let err = link.on_message(records(7, 1), 0).unwrap_err();
        assert!(
            matches!(err, ReplError::ReplayQueueOverflow { records: 6, .. }),
            "{err}"
        );
    }

    #[test]
    fn replayed_must_follow_pop_record() {
        let mut link = connected(LinkConfig::default());
        link.on_message(records(1, 2), 0).unwrap();
        assert!(matches!(
            link.replayed(1, 0),
            Err(ReplError::ReplayedOutOfOrder { .. })
        ));
        link.pop_record();
        link.replayed(1, 0).unwrap();
        link.replayed(1, 0).unwrap();
        assert!(matches!(
            link.replayed(0, 0),
            Err(ReplError::ReplayedOutOfOrder { .. })
        ));
    }
}
