//! The paper's atomic test-and-set: the tiebreaker that decides which replica of a VM may run.
//!
//! When the primary and the backup lose contact, each of them may believe the other is dead. Before
//! either goes on alone (the backup going live, or the primary dropping its backup) it must win an
//! atomic test-and-set on storage outside both hosts. Exactly one of them wins; the loser halts
//! itself. If the storage cannot be reached, the caller waits and retries: it must not guess.
//!
//! Claims are per `(vm_id, epoch)`. An epoch is a generation of the fault-tolerant pair: a new pair
//! (after a failover, or after restoring redundancy) claims a higher epoch, and the epoch travels in
//! every log-channel frame, so a deposed primary is recognised as stale. Epochs start at 1; `0`
//! means "none claimed".
//!
//! Two implementations:
//! - [`SharedDirTiebreaker`]: a directory on storage every host sees; a claim is an exclusively
//!   created file.
//! - [`EtcdTiebreaker`]: an etcd v3 cluster through its JSON gateway; a claim is a transaction that
//!   puts a key only if it was never created.
//!
//! Besides claims, each store keeps one liveness record per VM, a [`Beat`], which whatever runs
//! as the VM's primary renews every so often: a starter of a new pair watches it for a while
//! ([`TestAndSet::beats_again`]) to tell a running pair from a dead one. It is advisory; claims
//! alone decide.
//!
//! **API boundary.** This crate does no retrying: an unreachable store is an error
//! ([`TiebreakError::is_transient`] says so) and the caller decides how long to wait; the only
//! waiting is `beats_again`'s, which the caller asks for. It keeps no cache of answers: every
//! answer comes from the store (the etcd tiebreaker remembers only the lease its beats renew).
//!
//! **Owners must be unique per claimant** (for example `host/pid/nonce`). A claim whose holder is
//! the same owner string is reported as [`Outcome::Won`]: that makes a retry safe after an error
//! that hid a successful claim (a timeout after etcd committed, say). Two claimants sharing an owner
//! string would both "win", so do not share them.

mod etcd;
mod shared_dir;

pub use etcd::{
    EtcdTiebreaker, BEAT_LEASE_MARGIN_MS, BEAT_LEASE_TTL_S, BEAT_LEASE_WAIT_MAX_S, ETCD_KEY_PREFIX,
    ETCD_TIMEOUT_CONNECT_MS, ETCD_TIMEOUT_REQUEST_MS,
};
pub use shared_dir::SharedDirTiebreaker;

/// Longest VM id we accept, in bytes.
pub const VM_ID_BYTES_MAX: usize = 128;
/// Longest owner string we accept, in bytes.
pub const OWNER_BYTES_MAX: usize = 256;
/// Epochs are written with this many decimal digits, zero-padded, so that names sort like numbers
/// (`u64::MAX` has 20 digits).
pub const EPOCH_DIGITS: usize = 20;

/// The atomic test-and-set of the paper.
pub trait TestAndSet: Send + Sync {
    /// Atomically claim `epoch` of VM `vm_id` for `owner`. Exactly one caller ever wins a given
    /// `(vm_id, epoch)`.
    fn test_and_set(&self, vm_id: &str, epoch: u64, owner: &str) -> Result<Outcome, TiebreakError>;
    /// Highest epoch claimed so far for `vm_id` (`None` if none) and its owner — for status and for
    /// starting a new pair.
    fn current(&self, vm_id: &str) -> Result<Option<(u64, String)>, TiebreakError>;
    /// Overwrites the liveness record of `vm_id` with `beat`: whatever runs as the VM's primary
    /// writes one every so often, and a last one saying it stopped when it ends cleanly. Not a
    /// claim: any writer may overwrite it, and it decides nothing by itself.
    fn beat(&self, vm_id: &str, beat: &Beat) -> Result<(), TiebreakError>;
    /// The last [`Beat`] written for `vm_id`, if any. (etcd keeps the first beat of a run and
    /// its "stopped": see [`EtcdTiebreaker`].)
    fn last_beat(&self, vm_id: &str) -> Result<Option<Beat>, TiebreakError>;
    /// For a starter that read `first` (not "stopped") from the liveness record: watches the
    /// record for at least `wait` and returns the beat that shows a primary still runs, or
    /// `None` if the record stood still (or says it stopped). By default the record is read
    /// again after `wait` and a primary runs if it changed; a store whose beats do not rewrite
    /// the record answers in its own way.
    fn beats_again(
        &self,
        vm_id: &str,
        first: &Beat,
        wait: std::time::Duration,
    ) -> Result<Option<Beat>, TiebreakError> {
        std::thread::sleep(wait);
        Ok(self
            .last_beat(vm_id)?
            .filter(|now| now != first && now.count != BEAT_STOPPED))
    }
}

/// A liveness record: `owner`, the primary of the VM in `epoch`, wrote its `count`th beat, or,
/// with `count == BEAT_STOPPED`, stopped cleanly. A starter of a new pair reads it twice, some
/// time apart: if it changed, a primary runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Beat {
    pub epoch: u64,
    pub count: u64,
    pub owner: String,
}

/// The `count` of the last beat of a primary that stopped cleanly.
pub const BEAT_STOPPED: u64 = u64::MAX;

impl Beat {
    fn encode(&self) -> String {
        format!("{} {} {}\n", self.epoch, self.count, self.owner)
    }

    fn decode(text: &str) -> Option<Beat> {
        let line = text.strip_suffix('\n')?;
        let mut parts = line.splitn(3, ' ');
        let epoch = parts.next()?.parse().ok()?;
        let count = parts.next()?.parse().ok()?;
        let owner = parts.next()?.to_string();
        validate_owner(&owner).ok()?;
        Some(Beat {
            epoch,
            count,
            owner,
        })
    }
}

/// The answer of a test-and-set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// This owner holds the epoch (it claimed it now, or it had claimed it before).
    Won,
    /// Someone else holds the epoch. The caller must not run the VM in that epoch.
    Lost { holder: String },
}

/// Stands in for a holder whose claim exists but whose name cannot be read: a claimant that crashed
/// between creating its claim file and writing its name. The epoch is taken all the same.
pub const HOLDER_UNKNOWN: &str = "(unknown: the claim was created but its owner was never written)";

#[derive(Debug, thiserror::Error)]
pub enum TiebreakError {
    #[error("invalid VM id {vm_id:?}: {why}")]
    InvalidVmId { vm_id: String, why: &'static str },
    #[error("invalid owner {owner:?}: {why}")]
    InvalidOwner { owner: String, why: &'static str },
    #[error("epoch 0 cannot be claimed: epochs start at 1 (0 means none)")]
    ZeroEpoch,
    #[error(
        "the shared tiebreak storage is unreachable: {op} {path} failed: {source}; wait and retry"
    )]
    Storage {
        op: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the shared tiebreak storage holds something unexpected at {path}: {what}")]
    CorruptStorage {
        path: std::path::PathBuf,
        what: String,
    },
    #[error("the etcd tiebreaker is misconfigured: {0}")]
    EtcdConfig(String),
    #[error("no etcd endpoint answered ({attempts}); wait and retry")]
    EtcdUnreachable { attempts: String },
    #[error("etcd endpoint {endpoint} gave an answer we do not understand: {what}")]
    EtcdProtocol { endpoint: String, what: String },
}

impl TiebreakError {
    /// True for errors where the store could not be reached and the same call may succeed later
    /// (the paper: if the storage is unreachable, wait). False for errors in the arguments, the
    /// configuration or the stored data, where retrying cannot help.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            TiebreakError::Storage { .. } | TiebreakError::EtcdUnreachable { .. }
        )
    }
}

/// Checks a VM id: it becomes a directory name and part of an etcd key, so it must not contain a
/// path separator or anything that could escape or alias another VM's claims.
pub fn validate_vm_id(vm_id: &str) -> Result<(), TiebreakError> {
    let bad = |why| {
        Err(TiebreakError::InvalidVmId {
            vm_id: vm_id.to_string(),
            why,
        })
    };
    if vm_id.is_empty() {
        return bad("it is empty");
    }
    if vm_id.len() > VM_ID_BYTES_MAX {
        return bad("it is longer than 128 bytes");
    }
    if vm_id.starts_with('.') {
        return bad("it starts with '.'");
    }
    if !vm_id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return bad(
            "only ASCII letters, digits, '-', '_' and '.' are allowed (no path separators)",
        );
    }
    Ok(())
}

/// Checks an owner string: it is stored as one line, so no control characters.
pub fn validate_owner(owner: &str) -> Result<(), TiebreakError> {
    let bad = |why| {
        Err(TiebreakError::InvalidOwner {
            owner: owner.to_string(),
            why,
        })
    };
    if owner.is_empty() {
        return bad("it is empty");
    }
    if owner.len() > OWNER_BYTES_MAX {
        return bad("it is longer than 256 bytes");
    }
    if owner.chars().any(char::is_control) {
        return bad("it contains control characters");
    }
    if owner == HOLDER_UNKNOWN {
        return bad("it is the placeholder for an unknown holder");
    }
    Ok(())
}

fn validate_claim(vm_id: &str, epoch: u64, owner: &str) -> Result<(), TiebreakError> {
    validate_vm_id(vm_id)?;
    validate_owner(owner)?;
    if epoch == 0 {
        return Err(TiebreakError::ZeroEpoch);
    }
    Ok(())
}

/// The epoch as a fixed-width decimal string, so lexical order is numeric order.
pub fn epoch_digits(epoch: u64) -> String {
    format!("{epoch:0width$}", width = EPOCH_DIGITS)
}

/// Parses what [`epoch_digits`] wrote; `None` for anything else.
fn parse_epoch_digits(s: &str) -> Option<u64> {
    if s.len() != EPOCH_DIGITS || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn outcome_for(holder: String, owner: &str) -> Outcome {
    if holder == owner {
        Outcome::Won
    } else {
        Outcome::Lost { holder }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_ids_that_could_escape_are_refused() {
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "a\\b",
            ".hidden",
            "a b",
            "a\0b",
            &"x".repeat(129),
        ] {
            assert!(validate_vm_id(bad).is_err(), "{bad:?} was accepted");
        }
        for good in ["vm1", "web-01.prod", "A_b-9", &"x".repeat(128)] {
            validate_vm_id(good).unwrap();
        }
    }

    #[test]
    fn owners_are_single_lines() {
        assert!(validate_owner("").is_err());
        assert!(validate_owner("a\nb").is_err());
        assert!(validate_owner(&"o".repeat(257)).is_err());
        assert!(validate_owner(HOLDER_UNKNOWN).is_err());
        validate_owner("host-a/1234/9f1c").unwrap();
    }

    #[test]
    fn epoch_digits_sort_like_numbers() {
        assert_eq!(epoch_digits(1), "00000000000000000001");
        assert_eq!(epoch_digits(u64::MAX).len(), EPOCH_DIGITS);
        assert!(epoch_digits(9) < epoch_digits(10));
        assert_eq!(parse_epoch_digits(&epoch_digits(u64::MAX)), Some(u64::MAX));
        assert_eq!(parse_epoch_digits("123"), None);
        assert_eq!(parse_epoch_digits("0000000000000000000x"), None);
        assert_eq!(
            parse_epoch_digits("99999999999999999999"),
            None,
            "overflows u64"
        );
    }

    #[test]
    fn beats_round_trip_and_nonsense_is_not_a_beat() {
        let beat = Beat {
            epoch: 7,
            count: BEAT_STOPPED,
            owner: "host a/12".into(),
        };
        assert_eq!(Beat::decode(&beat.encode()), Some(beat));
        for bad in ["", "7 1 a", "7 x a\n", "7 1 \n", "x 1 a\n"] {
            assert_eq!(Beat::decode(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn only_store_failures_are_transient() {
        assert!(!TiebreakError::ZeroEpoch.is_transient());
        assert!(TiebreakError::EtcdUnreachable {
            attempts: String::new()
        }
        .is_transient());
    }
}
