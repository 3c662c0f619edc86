//! The primary's end of the log channel.

use std::collections::VecDeque;

use crate::wire::{
    records_payload_len, Frame, GoodbyeReason, Hello, Message, Role, MAX_RECORD_BYTES,
};
use crate::{
    Action, LinkConfig, LinkState, Pacing, Record, ReplError, SLOWDOWN_MAX_PERMILLE,
    SLOWDOWN_STEP_PERMILLE,
};

/// The primary's end of the log channel: batches records to the backup, tracks its acks and lag,
/// sends heartbeats, and detects its failure. See the crate docs for how to drive it.
#[derive(Debug)]
pub struct PrimaryLink {
    config: LinkConfig,
    epoch: u64,
    state: LinkState,
    /// Last record accepted from the VM.
    last_seq: u64,
    /// Last record sent to the backup.
    sent_seq: u64,
    /// Last record the backup acknowledged receiving.
    acked_seq: u64,
    /// Last record the backup reported replayed.
    replayed_seq: u64,
    /// Accepted, not yet sent.
    unsent: VecDeque<Record>,
    unsent_bytes: usize,
    /// Sent, not yet acknowledged: (seq, length). The bytes are gone: TCP delivers them or the
    /// connection dies, and then the backup is gone too.
    unacked: VecDeque<(u64, usize)>,
    unacked_bytes: usize,
    /// When the oldest unsent record was accepted.
    batch_since_ms: Option<u64>,
    last_sent_ms: u64,
    last_heard_ms: u64,
    stalled: bool,
    pacing: Pacing,
    /// Since when the lag has been over the target, and when the slowdown last grew.
    over_target_since_ms: Option<u64>,
    last_slowdown_step_ms: u64,
    /// We sent Goodbye: the link is closed, but acks still release outputs.
    goodbye_sent: bool,
}

impl PrimaryLink {
    /// Starts a link: the returned actions send `hello`. `hello.start_seq` is the first record the
    /// VM will offer; the backup's state is that after `start_seq - 1`.
    pub fn new(
        config: LinkConfig,
        epoch: u64,
        hello: Hello,
        now_ms: u64,
    ) -> Result<(PrimaryLink, Vec<Action>), ReplError> {
        config.validate()?;
        if hello.role != Role::Primary {
            return Err(ReplError::Config(
                "a PrimaryLink's Hello must have role Primary".into(),
            ));
        }
        if hello.start_seq == 0 {
            return Err(ReplError::Config("start_seq must be at least 1".into()));
        }
        let before = hello.start_seq - 1;
        let link = PrimaryLink {
            config,
            epoch,
            state: LinkState::Handshaking,
            last_seq: before,
            sent_seq: before,
            acked_seq: before,
            replayed_seq: before,
            unsent: VecDeque::new(),
            unsent_bytes: 0,
            unacked: VecDeque::new(),
            unacked_bytes: 0,
            batch_since_ms: None,
            last_sent_ms: now_ms,
            last_heard_ms: now_ms,
            stalled: false,
            pacing: Pacing::default(),
            over_target_since_ms: None,
            last_slowdown_step_ms: now_ms,
            goodbye_sent: false,
        };
        let hello = Action::Send(Frame::new(epoch, Message::Hello(hello)));
        Ok((link, vec![hello]))
    }

    /// The VM produced a record. It is batched, and sent when the batch is full or old, or on
    /// [`PrimaryLink::flush`]. Refused (and handed back) when the send buffer is full: the VM
    /// must wait for [`Action::Resume`]. Ignored once the link is final.
    pub fn on_record(&mut self, record: Record, now_ms: u64) -> Result<Vec<Action>, ReplError> {
        if self.state.is_final() {
            return Ok(Vec::new());
        }
        if record.seq != self.last_seq + 1 {
            return Err(ReplError::RecordOutOfOrder {
                expected: self.last_seq + 1,
                found: record.seq,
            });
        }
        if record.bytes.len() > MAX_RECORD_BYTES {
            return Err(ReplError::RecordTooLarge {
                seq: record.seq,
                len: record.bytes.len(),
                max: MAX_RECORD_BYTES,
            });
        }
        if self.is_full() {
            return Err(ReplError::SendBufferFull {
                record,
                records: self.unacked_records(),
                bytes: self.unacked_bytes(),
            });
        }
        self.last_seq = record.seq;
        self.unsent_bytes += record.bytes.len();
        self.unsent.push_back(record);
        self.batch_since_ms.get_or_insert(now_ms);

        let mut actions = Vec::new();
        let batch_len = records_payload_len(self.unsent.iter().map(|r| r.bytes.len()));
        if self.config.batch_delay_ms == 0 || batch_len >= self.config.batch_bytes {
            self.send_unsent(now_ms, &mut actions);
        }
        if self.is_full() && !self.stalled {
            self.stalled = true;
            actions.push(Action::Stall);
        }
        Ok(actions)
    }

    /// Sends every batched record now. Call it when an output is queued: the Output Rule holds the
    /// output until these records are acked, so any batching delay would add to its latency.
    pub fn flush(&mut self, now_ms: u64) -> Vec<Action> {
        let mut actions = Vec::new();
        self.send_unsent(now_ms, &mut actions);
        actions
    }

    /// Time passes: sends a batch that waited long enough, a heartbeat when idle, and declares the
    /// backup failed after the failure timeout. Call at [`PrimaryLink::next_deadline_ms`].
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
            if let Some(since) = self.batch_since_ms {
                if now_ms.saturating_sub(since) >= self.config.batch_delay_ms {
                    self.send_unsent(now_ms, &mut actions);
                }
            }
            if now_ms.saturating_sub(self.last_sent_ms) >= self.config.heartbeat_interval_ms {
                let heartbeat = Message::Heartbeat {
                    now_ms,
                    last_seq: self.sent_seq,
                };
                actions.push(Action::Send(Frame::new(self.epoch, heartbeat)));
                self.last_sent_ms = now_ms;
            }
        }
        actions
    }

    /// A frame from the backup. An `Err` is a protocol violation: the link is broken for good.
    pub fn on_message(&mut self, frame: Frame, now_ms: u64) -> Result<Vec<Action>, ReplError> {
        if self.state.is_final() {
            return Ok(self.after_goodbye(frame, now_ms));
        }
        let ours = self.epoch;
        if frame.epoch < ours {
            return Ok(vec![Action::StaleEpoch {
                theirs: frame.epoch,
                ours,
            }]);
        }
        if frame.epoch > ours {
            self.state = LinkState::Superseded;
            return Ok(vec![Action::Superseded {
                theirs: frame.epoch,
                ours,
            }]);
        }
        self.last_heard_ms = now_ms;
        let result = self.handle(frame.message, now_ms);
        if result.is_err() {
            self.state = LinkState::Broken;
        }
        result
    }

    /// Ends the link cleanly: sends every batched record, then a Goodbye. The backup's acks for
    /// those records may still arrive and still release outputs (`Release`), so keep reading until
    /// [`PrimaryLink::acked_seq`] reaches [`PrimaryLink::last_seq`] or the backup closes the
    /// connection. Nothing else is detected any more: no heartbeats, no failure.
    pub fn goodbye(&mut self, reason: GoodbyeReason, now_ms: u64) -> Vec<Action> {
        let mut actions = Vec::new();
        if self.state.is_final() {
            return actions;
        }
        self.send_unsent(now_ms, &mut actions);
        actions.push(Action::Send(Frame::new(
            self.epoch,
            Message::Goodbye { reason },
        )));
        self.state = LinkState::Closed;
        self.goodbye_sent = true;
        actions
    }

    /// After our Goodbye, acks still count; everything else is ignored.
    fn after_goodbye(&mut self, frame: Frame, now_ms: u64) -> Vec<Action> {
        let mut actions = Vec::new();
        if let (
            true,
            Message::Ack {
                received_seq,
                replayed_seq,
                replay_lag_ms,
            },
        ) = (
            self.goodbye_sent && frame.epoch == self.epoch,
            frame.message,
        ) {
            // A bad ack here cannot break anything that still runs: ignore it.
            let _ = self.on_ack(
                received_seq,
                replayed_seq,
                replay_lag_ms,
                now_ms,
                &mut actions,
            );
            actions.retain(|a| matches!(a, Action::Release { .. }));
        }
        actions
    }

    fn handle(&mut self, message: Message, now_ms: u64) -> Result<Vec<Action>, ReplError> {
        let mut actions = Vec::new();
        match (self.state, message) {
            (LinkState::Handshaking, Message::HelloAck { ok: true, .. }) => {
                self.state = LinkState::Connected;
                actions.push(Action::HandshakeDone);
                // Records the VM produced during the handshake go now.
                self.send_unsent(now_ms, &mut actions);
            }
            (LinkState::Handshaking, Message::HelloAck { ok: false, reason }) => {
                self.state = LinkState::Rejected;
                actions.push(Action::HandshakeRejected { reason });
            }
            (
                LinkState::Connected,
                Message::Ack {
                    received_seq,
                    replayed_seq,
                    replay_lag_ms,
                },
            ) => {
                self.on_ack(
                    received_seq,
                    replayed_seq,
                    replay_lag_ms,
                    now_ms,
                    &mut actions,
                )?;
            }
            (LinkState::Connected, Message::Heartbeat { last_seq, .. }) => {
                // The backup's last received record: never below what it acked, never above what
                // we sent.
                if last_seq < self.acked_seq || last_seq > self.sent_seq {
                    return Err(ReplError::HeartbeatMismatch {
                        peer: "backup",
                        theirs: last_seq,
                        ours: self.sent_seq,
                    });
                }
            }
            (LinkState::Connected, Message::Endpoints { backup, primary }) => {
                actions.push(Action::PeerEndpoints { backup, primary });
            }
            (_, Message::Goodbye { reason }) => {
                self.state = LinkState::Closed;
                actions.push(Action::PeerClosed { reason });
            }
            (state, message) => {
                return Err(ReplError::Unexpected {
                    message: message.kind_name(),
                    peer: "backup",
                    state: state.name(),
                })
            }
        }
        Ok(actions)
    }

    fn on_ack(
        &mut self,
        received_seq: u64,
        replayed_seq: u64,
        replay_lag_ms: u64,
        now_ms: u64,
        actions: &mut Vec<Action>,
    ) -> Result<(), ReplError> {
        if received_seq > self.sent_seq {
            return Err(ReplError::AckBeyondSent {
                acked: received_seq,
                sent: self.sent_seq,
            });
        }
        if received_seq < self.acked_seq {
            return Err(ReplError::AckRegressed {
                field: "received_seq",
                previous: self.acked_seq,
                found: received_seq,
            });
        }
        if replayed_seq < self.replayed_seq {
            return Err(ReplError::AckRegressed {
                field: "replayed_seq",
                previous: self.replayed_seq,
                found: replayed_seq,
            });
        }
        while let Some(&(seq, len)) = self.unacked.front() {
            if seq > received_seq {
                break;
            }
            self.unacked.pop_front();
            self.unacked_bytes -= len;
        }
        if received_seq > self.acked_seq {
            self.acked_seq = received_seq;
            actions.push(Action::Release {
                acked_seq: received_seq,
            });
        }
        self.replayed_seq = replayed_seq;
        self.update_pacing(replay_lag_ms, now_ms, actions);
        if self.stalled && !self.is_full() {
            self.stalled = false;
            actions.push(Action::Resume);
        }
        Ok(())
    }

    /// Flow control (the paper's section 2.5): when the backup's lag exceeds the target, slow the
    /// primary down, one step at once and one more per `slowdown_step_ms` while it stays over;
    /// back to full speed as soon as the lag is under the target again.
    fn update_pacing(&mut self, lag_ms: u64, now_ms: u64, actions: &mut Vec<Action>) {
        let before = self.pacing.slowdown_permille;
        self.pacing.lag_ms = lag_ms;
        self.pacing.lag_records = self.last_seq - self.replayed_seq;
        if lag_ms > self.config.lag_target_ms {
            if self.over_target_since_ms.is_none() {
                self.over_target_since_ms = Some(now_ms);
                self.last_slowdown_step_ms = now_ms;
                self.pacing.slowdown_permille = SLOWDOWN_STEP_PERMILLE;
            } else if now_ms.saturating_sub(self.last_slowdown_step_ms)
                >= self.config.slowdown_step_ms
            {
                self.last_slowdown_step_ms = now_ms;
                self.pacing.slowdown_permille =
                    (before + SLOWDOWN_STEP_PERMILLE).min(SLOWDOWN_MAX_PERMILLE);
            }
        } else {
            self.over_target_since_ms = None;
            self.pacing.slowdown_permille = 0;
        }
        if self.pacing.slowdown_permille != before {
            actions.push(Action::Pace(self.pacing));
        }
    }

    /// Moves batched records into `Records` frames of at most `batch_bytes` payload each.
    fn send_unsent(&mut self, now_ms: u64, actions: &mut Vec<Action>) {
        if self.state != LinkState::Connected {
            return;
        }
        while let Some(first) = self.unsent.front() {
            let first_seq = first.seq;
            let mut payload_len = records_payload_len([]);
            let mut records = Vec::new();
            while let Some(next) = self.unsent.front() {
                let grown =
                    payload_len + records_payload_len([next.bytes.len()]) - records_payload_len([]);
                if !records.is_empty() && grown > self.config.batch_bytes {
                    break;
                }
                let record = self.unsent.pop_front().expect("front exists");
                payload_len = grown;
                self.unsent_bytes -= record.bytes.len();
                self.unacked_bytes += record.bytes.len();
                self.unacked.push_back((record.seq, record.bytes.len()));
                self.sent_seq = record.seq;
                records.push(record.bytes);
            }
            actions.push(Action::Send(Frame::new(
                self.epoch,
                Message::Records { first_seq, records },
            )));
            self.last_sent_ms = now_ms;
        }
        self.batch_since_ms = None;
    }

    /// When [`PrimaryLink::tick`] must next be called (`None` once the link is final).
    pub fn next_deadline_ms(&self) -> Option<u64> {
        if self.state.is_final() {
            return None;
        }
        let mut deadline = self.last_heard_ms + self.config.failure_timeout_ms;
        if self.state == LinkState::Connected {
            deadline = deadline.min(self.last_sent_ms + self.config.heartbeat_interval_ms);
            if let Some(since) = self.batch_since_ms {
                deadline = deadline.min(since + self.config.batch_delay_ms);
            }
        }
        Some(deadline)
    }

    /// True when the next record would be refused.
    pub fn is_full(&self) -> bool {
        self.unacked_records() >= self.config.unacked_records_max
            || self.unacked_bytes() >= self.config.unacked_bytes_max
    }

    pub fn is_stalled(&self) -> bool {
        self.stalled
    }

    /// Records accepted but not acknowledged (sent or not).
    pub fn unacked_records(&self) -> usize {
        (self.last_seq - self.acked_seq) as usize
    }

    /// Bytes of records accepted but not acknowledged (sent or not).
    pub fn unacked_bytes(&self) -> usize {
        self.unsent_bytes + self.unacked_bytes
    }

    pub fn state(&self) -> LinkState {
        self.state
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn config(&self) -> &LinkConfig {
        &self.config
    }

    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    pub fn sent_seq(&self) -> u64 {
        self.sent_seq
    }

    /// The last record the backup acknowledged: outputs tagged up to it may be released.
    pub fn acked_seq(&self) -> u64 {
        self.acked_seq
    }

    pub fn replayed_seq(&self) -> u64 {
        self.replayed_seq
    }

    pub fn pacing(&self) -> Pacing {
        self.pacing
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DEFAULT_FAILURE_TIMEOUT_MS;

    pub(crate) fn hello(start_seq: u64) -> Hello {
        Hello {
            vm_id: "vm1".into(),
            role: Role::Primary,
            config_hash: [1; 32],
            disk_hash: [2; 32],
            start_seq,
        }
    }

    fn rec(seq: u64, len: usize) -> Record {
        Record {
            seq,
            bytes: vec![seq as u8; len],
        }
    }

    fn connected(config: LinkConfig) -> PrimaryLink {
        let (mut link, actions) = PrimaryLink::new(config, 5, hello(1), 0).unwrap();
        assert!(matches!(
            &actions[..],
            [Action::Send(Frame {
                message: Message::Hello(_),
                ..
            })]
        ));
        let got = link.on_message(ack_frame(true), 0).unwrap();
        assert_eq!(got, vec![Action::HandshakeDone]);
        link
    }

    fn ack_frame(ok: bool) -> Frame {
        Frame::new(
            5,
            Message::HelloAck {
                ok,
                reason: if ok { String::new() } else { "no".into() },
            },
        )
    }

    fn ack(received: u64, replayed: u64, lag: u64) -> Frame {
        Frame::new(
            5,
            Message::Ack {
                received_seq: received,
                replayed_seq: replayed,
                replay_lag_ms: lag,
            },
        )
    }

    fn sent_records(actions: &[Action]) -> Vec<(u64, usize)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send(Frame {
                    message: Message::Records { first_seq, records },
                    ..
                }) => Some((*first_seq, records.len())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn the_backups_view_of_the_connection_is_handed_to_the_io_layer() {
        let mut link = connected(LinkConfig::default());
        let ends = Message::Endpoints {
            backup: "10.0.0.2:5000".into(),
            primary: "10.0.0.1:7400".into(),
        };
        assert_eq!(
            link.on_message(Frame::new(5, ends.clone()), 1).unwrap(),
            vec![Action::PeerEndpoints {
                backup: "10.0.0.2:5000".into(),
                primary: "10.0.0.1:7400".into(),
            }]
        );
        // Before the handshake it is out of place, as any message but the HelloAck.
        let (mut early, _) = PrimaryLink::new(LinkConfig::default(), 5, hello(1), 0).unwrap();
        assert!(early.on_message(Frame::new(5, ends), 1).is_err());
    }

    #[test]
    fn records_are_batched_until_the_delay_or_a_flush() {
        let mut link = connected(LinkConfig {
            batch_delay_ms: 5,
            ..LinkConfig::default()
        });
        assert!(link.on_record(rec(1, 10), 10).unwrap().is_empty());
        assert!(link.on_record(rec(2, 10), 12).unwrap().is_empty());
        assert!(
            link.tick(14).is_empty(),
            "the batch is 4 ms old, the delay is 5"
        );
        assert_eq!(link.next_deadline_ms(), Some(15));
        assert_eq!(
            link.tick(15),
            vec![Action::Send(Frame::new(
                5,
                Message::Records {
                    first_seq: 1,
                    records: vec![vec![1; 10], vec![2; 10]],
                }
            ))]
        );
        // An output was queued: flush at once, whatever the batch's age.
        link.on_record(rec(3, 10), 16).unwrap();
        assert_eq!(sent_records(&link.flush(16)), vec![(3, 1)]);
        assert!(link.flush(16).is_empty(), "nothing left to flush");
        assert_eq!(link.sent_seq(), 3);
    }

    #[test]
    fn a_full_batch_goes_at_once_and_batches_respect_the_byte_limit() {
        let mut link = connected(LinkConfig {
            batch_bytes: 100,
            ..LinkConfig::default()
        });
        assert!(link.on_record(rec(1, 40), 0).unwrap().is_empty());
        // 12 + (4 + 40) + (4 + 60) = 120 >= 100: sent, split so that each frame fits.
        assert_eq!(
            sent_records(&link.on_record(rec(2, 60), 0).unwrap()),
            vec![(1, 1), (2, 1)]
        );
        // A record bigger than a batch travels alone.
        assert_eq!(
            sent_records(&link.on_record(rec(3, 500), 0).unwrap()),
            vec![(3, 1)]
        );
    }

    #[test]
    fn records_wait_for_the_handshake() {
        let (mut link, _) = PrimaryLink::new(LinkConfig::default(), 5, hello(7), 0).unwrap();
        assert!(matches!(
            link.on_record(rec(1, 1), 0),
            Err(ReplError::RecordOutOfOrder {
                expected: 7,
                found: 1
            })
        ));
        link.on_record(rec(7, 1), 0).unwrap();
        assert!(link.flush(1).is_empty(), "not connected yet");
        assert!(
            link.tick(10).is_empty(),
            "no heartbeats before the handshake"
        );
        let actions = link.on_message(ack_frame(true), 11).unwrap();
        assert_eq!(actions[0], Action::HandshakeDone);
        assert_eq!(sent_records(&actions), vec![(7, 1)]);
    }

    #[test]
    fn a_refused_handshake_is_not_a_failure() {
        let (mut link, _) = PrimaryLink::new(LinkConfig::default(), 5, hello(1), 0).unwrap();
        let actions = link.on_message(ack_frame(false), 1).unwrap();
        assert_eq!(
            actions,
            vec![Action::HandshakeRejected {
                reason: "no".into()
            }]
        );
        assert_eq!(link.state(), LinkState::Rejected);
        assert!(link.tick(10_000).is_empty());
    }

    #[test]
    fn heartbeats_when_idle_and_failure_after_the_timeout() {
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
        assert!(link.tick(99).is_empty());
        // Sending records counts as traffic: no heartbeat right after.
        link.on_record(rec(1, 1), 95).unwrap();
        link.flush(95);
        assert!(link.tick(144).is_empty());
        assert_eq!(link.tick(145).len(), 1);
        // Hearing from the backup pushes the failure back.
        link.on_message(
            Frame::new(
                5,
                Message::Heartbeat {
                    now_ms: 0,
                    last_seq: 0,
                },
            ),
            600,
        )
        .unwrap();
        assert!(!link
            .tick(1_599)
            .iter()
            .any(|a| matches!(a, Action::PeerFailed { .. })));
        // The failure deadline (600 + 1000) comes before the next heartbeat (1599 + 50).
        assert_eq!(link.next_deadline_ms(), Some(1_600));
        assert_eq!(
            link.tick(1_600),
            vec![Action::PeerFailed {
                silent_ms: DEFAULT_FAILURE_TIMEOUT_MS
            }]
        );
        assert_eq!(link.state(), LinkState::Failed);
        assert!(link.tick(5_000).is_empty(), "PeerFailed is reported once");
        assert_eq!(link.next_deadline_ms(), None);
    }

    #[test]
    fn a_silent_backup_fails_during_the_handshake_too() {
        let (mut link, _) = PrimaryLink::new(LinkConfig::default(), 5, hello(1), 1_000).unwrap();
        assert!(link.tick(1_999).is_empty());
        assert!(matches!(link.tick(2_000)[..], [Action::PeerFailed { .. }]));
    }

    #[test]
    fn acks_release_and_a_full_buffer_stalls_then_resumes() {
        let mut link = connected(LinkConfig {
            unacked_records_max: 3,
            batch_delay_ms: 0,
            ..LinkConfig::default()
        });
        link.on_record(rec(1, 1), 0).unwrap();
        link.on_record(rec(2, 1), 0).unwrap();
        let actions = link.on_record(rec(3, 1), 0).unwrap();
        assert_eq!(actions.last(), Some(&Action::Stall));
        assert!(link.is_stalled());
        let refused = link.on_record(rec(4, 1), 0).unwrap_err();
        let ReplError::SendBufferFull {
            record, records: 3, ..
        } = refused
        else {
            panic!("{refused}")
        };
        assert_eq!(record.seq, 4, "the record is handed back");
        assert_eq!(link.last_seq(), 3);

        let actions = link.on_message(ack(2, 0, 0), 1).unwrap();
        assert_eq!(
            actions,
            vec![Action::Release { acked_seq: 2 }, Action::Resume]
        );
        assert_eq!(link.acked_seq(), 2);
        assert_eq!(link.unacked_records(), 1);
        link.on_record(rec(4, 1), 1).unwrap();
        // The same ack again releases nothing new.
        assert!(link.on_message(ack(2, 0, 0), 2).unwrap().is_empty());
    }

    #[test]
    fn the_byte_limit_stalls_too() {
        let mut link = connected(LinkConfig {
            unacked_bytes_max: 100,
            ..LinkConfig::default()
        });
        assert!(link.on_record(rec(1, 60), 0).unwrap().is_empty());
        assert_eq!(link.on_record(rec(2, 60), 0).unwrap(), vec![Action::Stall]);
        assert_eq!(link.unacked_bytes(), 120);
    }

    #[test]
    fn bad_acks_break_the_link() {
        let mut link = connected(LinkConfig {
            batch_delay_ms: 0,
            ..LinkConfig::default()
        });
        link.on_record(rec(1, 1), 0).unwrap();
        let err = link.on_message(ack(2, 0, 0), 1).unwrap_err();
        assert!(
            matches!(err, ReplError::AckBeyondSent { acked: 2, sent: 1 }),
            "{err}"
        );
        assert_eq!(link.state(), LinkState::Broken);

        let mut link = connected(LinkConfig {
            batch_delay_ms: 0,
            ..LinkConfig::default()
        });
        link.on_record(rec(1, 1), 0).unwrap();
        link.on_message(ack(1, 1, 0), 1).unwrap();
        let err = link.on_message(ack(1, 0, 0), 1).unwrap_err();
        assert!(
            matches!(
                err,
                ReplError::AckRegressed {
                    field: "replayed_seq",
                    ..
                }
            ),
            "{err}"
        );

        let mut link = connected(LinkConfig::default());
        let hello_again = Frame::new(5, Message::Hello(hello(1)));
        assert!(matches!(
            link.on_message(hello_again, 0),
            Err(ReplError::Unexpected { .. })
        ));
    }

    #[test]
    fn epochs_stale_frames_are_ignored_and_a_newer_epoch_deposes_us() {
        let mut link = connected(LinkConfig::default());
        let stale = Frame::new(
            4,
            Message::Heartbeat {
                now_ms: 0,
                last_seq: 0,
            },
        );
        assert_eq!(
            link.on_message(stale, 900).unwrap(),
            vec![Action::StaleEpoch { theirs: 4, ours: 5 }]
        );
        // A stale frame is not a sign of life from our backup.
        assert!(matches!(link.tick(1_000)[..], [Action::PeerFailed { .. }]));

        let mut link = connected(LinkConfig::default());
        let newer = Frame::new(
            6,
            Message::HelloAck {
                ok: false,
                reason: "stale".into(),
            },
        );
        assert_eq!(
            link.on_message(newer, 1).unwrap(),
            vec![Action::Superseded { theirs: 6, ours: 5 }]
        );
        assert_eq!(link.state(), LinkState::Superseded);
    }

    #[test]
    fn goodbye_flushes_first_and_a_peer_goodbye_is_not_a_failure() {
        let mut link = connected(LinkConfig::default());
        link.on_record(rec(1, 1), 0).unwrap();
        let actions = link.goodbye(GoodbyeReason::PowerOff, 1);
        assert_eq!(sent_records(&actions), vec![(1, 1)]);
        assert_eq!(
            actions.last(),
            Some(&Action::Send(Frame::new(
                5,
                Message::Goodbye {
                    reason: GoodbyeReason::PowerOff
                }
            )))
        );
        assert_eq!(link.state(), LinkState::Closed);
        assert!(
            link.tick(10_000).is_empty(),
            "no heartbeats or failures after Goodbye"
        );
        // The backup's ack for the last records still releases their outputs.
        assert_eq!(
            link.on_message(ack(1, 0, 0), 10_001).unwrap(),
            vec![Action::Release { acked_seq: 1 }]
        );

        let mut link = connected(LinkConfig::default());
        let bye = Frame::new(
            5,
            Message::Goodbye {
                reason: GoodbyeReason::Shutdown,
            },
        );
        assert_eq!(
            link.on_message(bye, 1).unwrap(),
            vec![Action::PeerClosed {
                reason: GoodbyeReason::Shutdown
            }]
        );
        assert!(
            link.tick(1_000_000).is_empty(),
            "a closed link never reports PeerFailed"
        );
    }

    /// Section 2.5 of the paper: lag over the target slows the primary gradually; lag under the
    /// target restores full speed.
    #[test]
    fn lag_slowdown_grows_gradually_and_recovers() {
        let mut link = connected(LinkConfig {
            batch_delay_ms: 0,
            ..LinkConfig::default()
        });
        for seq in 1..=50 {
            link.on_record(rec(seq, 1), 0).unwrap();
        }
        let actions = link.on_message(ack(50, 40, 80), 10).unwrap();
        assert_eq!(
            actions,
            vec![Action::Release { acked_seq: 50 }],
            "under the target: no pacing"
        );
        assert_eq!(link.pacing().lag_records, 10);

        let mut levels = Vec::new();
        let mut t = 20;
        for _ in 0..20 {
            link.on_message(ack(50, 40, 250), t).unwrap();
            levels.push(link.pacing().slowdown_permille);
            t += 50;
        }
        // One step at once, then one step per 100 ms (acks every 50 ms), up to the maximum.
        assert_eq!(levels[..4], [100, 100, 200, 200]);
        assert_eq!(*levels.last().unwrap(), SLOWDOWN_MAX_PERMILLE);
        assert!(levels
            .windows(2)
            .all(|w| w[1] >= w[0] && w[1] - w[0] <= SLOWDOWN_STEP_PERMILLE));
        assert_eq!(
            link.pacing().sleep_ms(10),
            90,
            "at 900‰, 10 ms of running earns 90 ms of pause"
        );

        let actions = link.on_message(ack(50, 50, 5), t).unwrap();
        let pace = Pacing {
            lag_ms: 5,
            lag_records: 0,
            slowdown_permille: 0,
        };
        assert_eq!(actions, vec![Action::Pace(pace)]);
        assert_eq!(link.pacing().sleep_ms(10), 0);
    }
}
