//! The paper's Output Rule: the primary may not send an output until the backup has received and
//! acknowledged the log entry of the operation that produced it.
//!
//! Each output is tagged with the sequence number of the last log record produced before it. The
//! output is held until the backup acknowledged that record; only the output waits, the VM runs on.
//! Outputs leave in the order they were produced.
//!
//! Held outputs are bounded ([`MAX_HELD_OUTPUTS`], [`MAX_HELD_BYTES`], or other limits given to
//! [`OutputRule::with_limits`]). When full, [`OutputRule::push`] hands the output back and the
//! primary must stall until acks release some. An output is accepted into an empty rule even if it is
//! larger than the byte limit, so that no single output can block forever.
//!
//! Without a backup (before one is attached, or after the primary won the tiebreak and went on
//! alone) the rule is [`OutputRule::alone`] and lets every output through at once.

use std::collections::VecDeque;

/// Most outputs held at once.
pub const MAX_HELD_OUTPUTS: usize = 65_536;
/// Most output bytes held at once.
pub const MAX_HELD_BYTES: usize = 64 << 20;

/// An output's size, for the byte limit.
pub trait OutputLen {
    fn output_len(&self) -> usize;
}

impl OutputLen for Vec<u8> {
    fn output_len(&self) -> usize {
        self.len()
    }
}

impl OutputLen for Box<[u8]> {
    fn output_len(&self) -> usize {
        self.len()
    }
}

impl OutputLen for String {
    fn output_len(&self) -> usize {
        self.len()
    }
}

impl OutputLen for &[u8] {
    fn output_len(&self) -> usize {
        self.len()
    }
}

/// `push` refused an output because the rule is full. The output is handed back.
#[derive(Debug, thiserror::Error)]
#[error(
    "the Output Rule holds {held_count} outputs ({held_bytes} bytes) waiting for the backup's ack, \
     its limit; stall the primary until acks release some"
)]
pub struct OutputRuleFull<T: std::fmt::Debug> {
    pub output: T,
    pub held_count: usize,
    pub held_bytes: usize,
}

#[derive(Debug)]
pub struct OutputRule<T> {
    held: VecDeque<(u64, T)>,
    held_bytes: usize,
    /// Highest sequence number the backup acknowledged.
    acked_seq: u64,
    /// Tag of the last output pushed: tags never go down.
    last_tag: u64,
    alone: bool,
    max_outputs: usize,
    max_bytes: usize,
}

impl<T: OutputLen + std::fmt::Debug> OutputRule<T> {
    /// A rule for a primary with a backup that has acknowledged records up to `acked_seq` (the
    /// point its state starts from; 0 for a fresh VM).
    pub fn new(acked_seq: u64) -> Self {
        OutputRule {
            held: VecDeque::new(),
            held_bytes: 0,
            acked_seq,
            last_tag: 0,
            alone: false,
            max_outputs: MAX_HELD_OUTPUTS,
            max_bytes: MAX_HELD_BYTES,
        }
    }

    /// A rule for a VM without a backup: every output is released at once.
    pub fn alone() -> Self {
        OutputRule {
            alone: true,
            ..Self::new(0)
        }
    }

    pub fn with_limits(mut self, max_outputs: usize, max_bytes: usize) -> Self {
        assert!(
            max_outputs > 0,
            "an Output Rule must be able to hold at least one output"
        );
        self.max_outputs = max_outputs;
        self.max_bytes = max_bytes;
        self
    }

    /// Offers an output produced after log record `seq`. `Ok(Some(output))`: send it now (no
    /// backup, or `seq` is acked and nothing older waits). `Ok(None)`: held until
    /// [`OutputRule::release`] returns it. `Err`: full; the output is handed back.
    ///
    /// Panics if `seq` is lower than a previous output's tag: outputs are produced in log order,
    /// and anything else is a broken invariant.
    pub fn push(&mut self, seq: u64, output: T) -> Result<Option<T>, OutputRuleFull<T>> {
        assert!(
            seq >= self.last_tag,
            "Output Rule: output tagged {seq} after one tagged {}; outputs must follow log order",
            self.last_tag
        );
        self.last_tag = seq;
        if self.alone || (self.held.is_empty() && seq <= self.acked_seq) {
            return Ok(Some(output));
        }
        let len = output.output_len();
        let full = self.held.len() >= self.max_outputs
            || self.held_bytes.saturating_add(len) > self.max_bytes;
        if full && !self.held.is_empty() {
            return Err(OutputRuleFull {
                output,
                held_count: self.held.len(),
                held_bytes: self.held_bytes,
            });
        }
        self.held_bytes += len;
        self.held.push_back((seq, output));
        Ok(None)
    }

    /// The backup acknowledged every record up to `acked_seq`: returns the outputs that may now be
    /// sent, oldest first. An ack lower than one seen before changes nothing.
    pub fn release(&mut self, acked_seq: u64) -> Vec<T> {
        self.release_iter(acked_seq).collect()
    }

    /// [`OutputRule::release`] without collecting: the released outputs, oldest first, taken as
    /// the iterator goes (outputs it does not reach stay held).
    pub fn release_iter(&mut self, acked_seq: u64) -> impl Iterator<Item = T> + '_ {
        self.acked_seq = self.acked_seq.max(acked_seq);
        std::iter::from_fn(move || {
            let (tag, _) = self.held.front()?;
            if *tag > self.acked_seq {
                return None;
            }
            let (_, output) = self.held.pop_front().expect("front exists");
            self.held_bytes -= output.output_len();
            Some(output)
        })
    }

    /// The primary lost its backup and won the tiebreak: from now on nothing is held. Returns
    /// every held output, oldest first, to send now.
    pub fn go_alone(&mut self) -> Vec<T> {
        self.alone = true;
        self.held_bytes = 0;
        self.held.drain(..).map(|(_, o)| o).collect()
    }

    /// A new backup starts from the state after record `acked_seq` (restoring redundancy): hold
    /// outputs again. Only valid when alone (nothing is held then).
    pub fn attach_backup(&mut self, acked_seq: u64) {
        assert!(
            self.alone && self.held.is_empty(),
            "attach_backup on a rule that has a backup"
        );
        assert!(
            acked_seq >= self.last_tag,
            "the new backup starts before outputs already sent"
        );
        self.alone = false;
        self.acked_seq = acked_seq;
    }

    pub fn is_alone(&self) -> bool {
        self.alone
    }

    pub fn acked_seq(&self) -> u64 {
        self.acked_seq
    }

    pub fn held_count(&self) -> usize {
        self.held.len()
    }

    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    /// True when another output would be refused (unless it is the first).
    pub fn is_full(&self) -> bool {
        self.held.len() >= self.max_outputs || self.held_bytes >= self.max_bytes
    }

    /// Tag of the oldest held output: the record whose ack the next release waits for.
    pub fn oldest_held_seq(&self) -> Option<u64> {
        self.held.front().map(|(tag, _)| *tag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng::Rng;

    #[test]
    fn outputs_wait_for_the_ack_of_their_record() {
        let mut rule = OutputRule::new(0);
        assert_eq!(
            rule.push(0, b"boot".to_vec()).unwrap(),
            Some(b"boot".to_vec())
        );
        assert_eq!(rule.push(3, b"a".to_vec()).unwrap(), None);
        assert_eq!(rule.push(3, b"b".to_vec()).unwrap(), None);
        assert_eq!(rule.push(5, b"c".to_vec()).unwrap(), None);
        assert_eq!((rule.held_count(), rule.held_bytes()), (3, 3));
        assert!(rule.release(2).is_empty());
        assert_eq!(rule.release(4), vec![b"a".to_vec(), b"b".to_vec()]);
        // An acked tag still waits behind nothing now, so it goes at once...
        assert_eq!(
            rule.push(5, b"d".to_vec()).unwrap(),
            None,
            "...unless older ones wait"
        );
        assert!(rule.release(3).is_empty(), "a lower ack changes nothing");
        assert_eq!(rule.release(5), vec![b"c".to_vec(), b"d".to_vec()]);
        assert_eq!(rule.push(5, b"e".to_vec()).unwrap(), Some(b"e".to_vec()));
        assert_eq!((rule.held_count(), rule.held_bytes()), (0, 0));
    }

    #[test]
    fn an_iterator_release_takes_only_what_it_reaches() {
        let mut rule = OutputRule::new(0);
        rule.push(1, b"ab".to_vec()).unwrap();
        rule.push(2, b"c".to_vec()).unwrap();
        rule.push(3, b"d".to_vec()).unwrap();
        // Acked up to 2, but only the first output is taken: the second stays held.
        assert_eq!(rule.release_iter(2).next(), Some(b"ab".to_vec()));
        assert_eq!((rule.held_count(), rule.held_bytes()), (2, 2));
        // The ack is remembered: the next call releases the rest it covers, not beyond.
        assert_eq!(
            rule.release_iter(0).collect::<Vec<_>>(),
            vec![b"c".to_vec()]
        );
        assert_eq!((rule.held_count(), rule.held_bytes()), (1, 1));
    }

    #[test]
    fn a_full_rule_hands_the_output_back() {
        let mut rule = OutputRule::new(0).with_limits(2, 10);
        assert_eq!(rule.push(1, vec![0; 4]).unwrap(), None);
        assert_eq!(rule.push(1, vec![0; 4]).unwrap(), None);
        let full = rule.push(2, vec![1; 1]).unwrap_err();
        assert_eq!(full.output, vec![1]);
        assert!(full.to_string().contains("stall the primary"));
        assert!(rule.is_full());
        assert_eq!(rule.release(1).len(), 2);
        // Over the byte limit on its own, but alone in the rule: accepted.
        assert_eq!(rule.push(2, vec![0; 50]).unwrap(), None);
        assert!(rule.push(2, vec![0; 1]).is_err(), "bytes are full now");
    }

    #[test]
    fn alone_releases_at_once_and_going_alone_flushes() {
        let mut alone = OutputRule::alone();
        assert_eq!(
            alone.push(9, "x".to_string()).unwrap(),
            Some("x".to_string())
        );
        let mut rule = OutputRule::new(0);
        rule.push(1, "a".to_string()).unwrap();
        rule.push(2, "b".to_string()).unwrap();
        assert_eq!(rule.go_alone(), vec!["a".to_string(), "b".to_string()]);
        assert_eq!(
            rule.push(3, "c".to_string()).unwrap(),
            Some("c".to_string())
        );
        rule.attach_backup(10);
        assert_eq!(
            rule.push(10, "d".to_string()).unwrap(),
            Some("d".to_string())
        );
        assert_eq!(rule.push(11, "e".to_string()).unwrap(), None);
    }

    #[test]
    #[should_panic(expected = "outputs must follow log order")]
    fn tags_never_go_down() {
        let mut rule = OutputRule::new(0);
        rule.push(5, vec![1]).unwrap();
        rule.push(4, vec![2]).unwrap();
    }

    /// Section 2.2 of the paper: no output leaves before the ack of the record that produced it.
    /// A seeded random schedule of records, outputs, acks (delayed, in order) and bounded holding.
    #[test]
    fn output_rule_never_releases_before_the_ack() {
        for seed in 0..200u64 {
            let mut rng = Rng::new(seed);
            let mut rule = OutputRule::new(0).with_limits(1 + rng.below(20) as usize, 64);
            let mut produced_seq = 0u64;
            let mut acked = 0u64;
            let mut next_output = 0u64;
            let mut sent: Vec<(u64, u64)> = Vec::new(); // (output id, its tag)
            let mut tags = std::collections::HashMap::new();
            for _ in 0..2_000 {
                match rng.below(10) {
                    0..=3 => produced_seq += 1,
                    4..=6 => {
                        let id = next_output;
                        // Outputs leave in order, so ids are tracked by position; bytes give sizes.
                        let output = vec![0u8; 1 + rng.below(7) as usize];
                        match rule.push(produced_seq, output) {
                            Ok(Some(_)) => {
                                assert!(produced_seq <= acked, "seed {seed}: sent unacked at once");
                                sent.push((id, produced_seq));
                                next_output += 1;
                            }
                            Ok(None) => {
                                tags.insert(id, produced_seq);
                                next_output += 1;
                            }
                            Err(full) => assert_eq!(full.held_count, rule.held_count()),
                        }
                    }
                    _ => {
                        acked = (acked + rng.below(3)).min(produced_seq);
                        let first_held = next_output - rule.held_count() as u64;
                        for (i, _) in rule.release(acked).into_iter().enumerate() {
                            let id = first_held + i as u64;
                            let tag = tags.remove(&id).expect("released an output never held");
                            assert!(
                                tag <= acked,
                                "seed {seed}: output {id} tagged {tag} left at ack {acked}"
                            );
                            sent.push((id, tag));
                        }
                    }
                }
            }
            acked = produced_seq;
            let first_held = next_output - rule.held_count() as u64;
            for (i, _) in rule.release(acked).into_iter().enumerate() {
                sent.push((first_held + i as u64, tags[&(first_held + i as u64)]));
            }
            assert_eq!(rule.held_count(), 0);
            let ids: Vec<u64> = sent.iter().map(|(id, _)| *id).collect();
            assert_eq!(
                ids,
                (0..next_output).collect::<Vec<_>>(),
                "seed {seed}: order or loss"
            );
        }
    }
}
