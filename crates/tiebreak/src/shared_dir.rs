//! Test-and-set on a directory that every host sees (shared storage, as in the paper).
//!
//! Layout:
//!
//! ```text
//! <dir>/                                  must exist: it is the shared mount; never created here
//!   <vm_id>/                              created on the first claim for that VM
//!     epoch-00000000000000000001          "<owner>\n"
//!     epoch-00000000000000000002          "<owner>\n"
//!     beat                                "<epoch> <count> <owner>\n", replaced whole (rename)
//! ```
//!
//! A claim creates its file with `O_CREAT | O_EXCL`: the file system lets exactly one creator
//! succeed. The winner writes its owner and a newline, then fsyncs the file and the directory so the
//! claim survives a crash of the storage server. A loser reads the holder; a file without its final
//! newline is a claim still being written, so the loser waits briefly (at most
//! [`HOLDER_WRITE_WAIT_MS`]) and then reports [`HOLDER_UNKNOWN`](crate::HOLDER_UNKNOWN).
//!
//! Why the root directory is never created: if the shared storage is not mounted, creating `<dir>`
//! would give each host its own private "shared" directory, and both would win. A missing root is
//! reported as unreachable storage instead.
//!
//! Exclusive create is atomic on local file systems and on NFSv3 and later; it is not on NFSv2.
//!
//! Reads ([`TestAndSet::current`], the beat) see what the directory holds only if the file system
//! shows other hosts' new files at once. A replica's checks of its epoch (the epoch watch, the
//! tenure of one that runs without a backup) rely on that; claims do not (a claim made from a
//! stale listing fails its exclusive create). So an NFS mount must not cache directory contents
//! (`noac`, or `actimeo=0` with `lookupcache=none`); where that is too slow, use etcd.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{
    epoch_digits, outcome_for, parse_epoch_digits, validate_claim, validate_vm_id, Beat, Outcome,
    TestAndSet, TiebreakError, HOLDER_UNKNOWN, OWNER_BYTES_MAX,
};

/// How long a loser waits for the winner to finish writing its owner line.
pub const HOLDER_WRITE_WAIT_MS: u64 = 500;
const CLAIM_PREFIX: &str = "epoch-";

/// The tiebreaker on a shared directory.
#[derive(Clone, Debug)]
pub struct SharedDirTiebreaker {
    dir: PathBuf,
}

impl SharedDirTiebreaker {
    /// `dir` is the shared directory. It must already exist (see the module docs for why).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        SharedDirTiebreaker { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn vm_dir(&self, vm_id: &str) -> PathBuf {
        self.dir.join(vm_id)
    }

    /// Creates `<dir>/<vm_id>` if needed, without ever creating `<dir>`.
    fn ensure_vm_dir(&self, vm_dir: &Path) -> Result<(), TiebreakError> {
        match fs::create_dir(vm_dir) {
            Ok(()) => sync_dir(&self.dir),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Err(self.missing_root(e)),
            Err(e) => Err(storage("create directory", vm_dir, e)),
        }
    }

    fn missing_root(&self, e: std::io::Error) -> TiebreakError {
        storage(
            "find the shared tiebreak directory (is the shared storage mounted?)",
            &self.dir,
            e,
        )
    }
}

impl TestAndSet for SharedDirTiebreaker {
    fn test_and_set(&self, vm_id: &str, epoch: u64, owner: &str) -> Result<Outcome, TiebreakError> {
        validate_claim(vm_id, epoch, owner)?;
        let vm_dir = self.vm_dir(vm_id);
        self.ensure_vm_dir(&vm_dir)?;
        let path = vm_dir.join(format!("{CLAIM_PREFIX}{}", epoch_digits(epoch)));

        let mut file = match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                return Ok(outcome_for(read_holder(&path)?, owner));
            }
            Err(e) => return Err(storage("create claim file", &path, e)),
        };

        // We created the file: the epoch is ours once our name is in it.
        let line = format!("{owner}\n");
        if let Err(e) = file.write_all(line.as_bytes()) {
            // A half-written name would leave the epoch taken by nobody we could name. Nobody has
            // won it yet (we are not returning Won), so give it back; if even that fails, the epoch
            // is burned and the caller moves on to a higher one.
            drop(file);
            let _ = fs::remove_file(&path);
            return Err(storage("write claim file", &path, e));
        }
        // From here on the claim is complete and readable: if a sync fails we report the error
        // but keep the file, and a retry by the same owner finds it and wins.
        file.sync_all()
            .map_err(|e| storage("fsync claim file", &path, e))?;
        sync_dir(&vm_dir)?;
        Ok(Outcome::Won)
    }

    fn current(&self, vm_id: &str) -> Result<Option<(u64, String)>, TiebreakError> {
        validate_vm_id(vm_id)?;
        let vm_dir = self.vm_dir(vm_id);
        let entries = match fs::read_dir(&vm_dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                // No claims yet, unless the shared directory itself is missing.
                return match fs::metadata(&self.dir) {
                    Ok(m) if m.is_dir() => Ok(None),
                    Ok(_) => Err(TiebreakError::CorruptStorage {
                        path: self.dir.clone(),
                        what: "it is not a directory".into(),
                    }),
                    Err(e) => Err(self.missing_root(e)),
                };
            }
            Err(e) => return Err(storage("list directory", &vm_dir, e)),
        };
        let mut highest: Option<u64> = None;
        for entry in entries {
            let entry = entry.map_err(|e| storage("list directory", &vm_dir, e))?;
            let name = entry.file_name();
            let Some(epoch) = name
                .to_str()
                .and_then(|n| n.strip_prefix(CLAIM_PREFIX))
                .and_then(parse_epoch_digits)
            else {
                continue; // not a claim (an editor's backup file, say): not ours to judge
            };
            highest = highest.max(Some(epoch));
        }
        match highest {
            None => Ok(None),
            Some(epoch) => {
                let path = vm_dir.join(format!("{CLAIM_PREFIX}{}", epoch_digits(epoch)));
                Ok(Some((epoch, read_holder(&path)?)))
            }
        }
    }

    fn beat(&self, vm_id: &str, beat: &Beat) -> Result<(), TiebreakError> {
        self.write_beat(vm_id, beat)
    }

    fn last_beat(&self, vm_id: &str) -> Result<Option<Beat>, TiebreakError> {
        self.read_beat(vm_id)
    }
}

const BEAT_FILE: &str = "beat";

impl SharedDirTiebreaker {
    fn beat_path(&self, vm_id: &str) -> PathBuf {
        self.vm_dir(vm_id).join(BEAT_FILE)
    }

    pub(crate) fn write_beat(&self, vm_id: &str, beat: &Beat) -> Result<(), TiebreakError> {
        validate_claim(vm_id, beat.epoch, &beat.owner)?;
        let vm_dir = self.vm_dir(vm_id);
        self.ensure_vm_dir(&vm_dir)?;
        // Written aside and renamed over the old one, so a reader sees one whole record. The
        // temporary name is the writer's own: its pid and a hash of its owner string (owners
        // are unique per claimant; pids alone may repeat across hosts).
        let owner_hash = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            beat.owner.hash(&mut h);
            h.finish()
        };
        let tmp = vm_dir.join(format!(
            ".{BEAT_FILE}.{}.{owner_hash:016x}",
            std::process::id()
        ));
        fs::write(&tmp, beat.encode()).map_err(|e| storage("write beat file", &tmp, e))?;
        let path = self.beat_path(vm_id);
        fs::rename(&tmp, &path).map_err(|e| storage("rename beat file", &path, e))
    }

    pub(crate) fn read_beat(&self, vm_id: &str) -> Result<Option<Beat>, TiebreakError> {
        validate_vm_id(vm_id)?;
        let path = self.beat_path(vm_id);
        let mut bytes = Vec::new();
        match File::open(&path) {
            Ok(f) => f
                .take(OWNER_BYTES_MAX as u64 + 64)
                .read_to_end(&mut bytes)
                .map_err(|e| storage("read beat file", &path, e))?,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(storage("read beat file", &path, e)),
        };
        std::str::from_utf8(&bytes)
            .ok()
            .and_then(Beat::decode)
            .map(Some)
            .ok_or_else(|| TiebreakError::CorruptStorage {
                path,
                what: "the beat file does not hold one beat line".into(),
            })
    }
}

/// Reads the owner line of a claim file, waiting briefly for a claim that is still being written.
fn read_holder(path: &Path) -> Result<String, TiebreakError> {
    let deadline = Instant::now() + Duration::from_millis(HOLDER_WRITE_WAIT_MS);
    let mut pause = Duration::from_micros(200);
    loop {
        let mut bytes = Vec::new();
        File::open(path)
            .and_then(|f| f.take(OWNER_BYTES_MAX as u64 + 2).read_to_end(&mut bytes))
            .map_err(|e| storage("read claim file", path, e))?;
        if let Some(line) = bytes.strip_suffix(b"\n") {
            return match std::str::from_utf8(line) {
                Ok(owner) if !owner.is_empty() && !owner.contains('\n') => Ok(owner.to_string()),
                _ => Err(TiebreakError::CorruptStorage {
                    path: path.to_path_buf(),
                    what: "the claim file does not hold one owner line".into(),
                }),
            };
        }
        if bytes.len() > OWNER_BYTES_MAX {
            return Err(TiebreakError::CorruptStorage {
                path: path.to_path_buf(),
                what: "the claim file is longer than any owner line".into(),
            });
        }
        if Instant::now() >= deadline {
            return Ok(HOLDER_UNKNOWN.to_string());
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// fsync a directory, so that an entry created in it survives a crash.
fn sync_dir(dir: &Path) -> Result<(), TiebreakError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| storage("fsync directory", dir, e))
}

fn storage(op: &'static str, path: &Path, source: std::io::Error) -> TiebreakError {
    TiebreakError::Storage {
        op,
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Barrier};

    use super::*;

    #[test]
    fn sixteen_racers_one_winner() {
        let tmp = tempfile::tempdir().unwrap();
        for round in 1..=5u64 {
            let barrier = Arc::new(Barrier::new(16));
            let handles: Vec<_> = (0..16)
                .map(|i| {
                    let barrier = barrier.clone();
                    // A separate tiebreaker per thread, as on separate hosts.
                    let tb = SharedDirTiebreaker::new(tmp.path());
                    std::thread::spawn(move || {
                        let owner = format!("host-{i}");
                        barrier.wait();
                        (
                            owner.clone(),
                            tb.test_and_set("vm1", round, &owner).unwrap(),
                        )
                    })
                })
                .collect();
            let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
            let winners: Vec<_> = results
                .iter()
                .filter(|(_, o)| *o == Outcome::Won)
                .map(|(w, _)| w)
                .collect();
            assert_eq!(winners.len(), 1, "round {round}: winners {winners:?}");
            for (owner, outcome) in &results {
                if let Outcome::Lost { holder } = outcome {
                    assert_eq!(holder, winners[0], "{owner} was told the wrong holder");
                }
            }
            let tb = SharedDirTiebreaker::new(tmp.path());
            assert_eq!(
                tb.current("vm1").unwrap(),
                Some((round, winners[0].clone()))
            );
        }
    }

    #[test]
    fn beats_are_overwritten_whole_and_are_not_claims() {
        let tmp = tempfile::tempdir().unwrap();
        let tb = SharedDirTiebreaker::new(tmp.path());
        assert_eq!(tb.last_beat("vm1").unwrap(), None);
        for count in 1..=3 {
            let beat = Beat {
                epoch: 2,
                count,
                owner: "a".into(),
            };
            tb.beat("vm1", &beat).unwrap();
            assert_eq!(tb.last_beat("vm1").unwrap(), Some(beat));
        }
        assert_eq!(tb.current("vm1").unwrap(), None, "a beat claims nothing");
        std::fs::write(tmp.path().join("vm1/beat"), "garbage").unwrap();
        assert!(matches!(
            tb.last_beat("vm1"),
            Err(TiebreakError::CorruptStorage { .. })
        ));
    }

    #[test]
    fn epochs_and_vms_are_independent() {
        let tmp = tempfile::tempdir().unwrap();
        let tb = SharedDirTiebreaker::new(tmp.path());
        assert_eq!(tb.current("vm1").unwrap(), None);
        assert_eq!(tb.test_and_set("vm1", 1, "a").unwrap(), Outcome::Won);
        assert_eq!(
            tb.test_and_set("vm1", 1, "b").unwrap(),
            Outcome::Lost { holder: "a".into() }
        );
        assert_eq!(tb.test_and_set("vm1", 2, "b").unwrap(), Outcome::Won);
        assert_eq!(tb.test_and_set("vm2", 1, "c").unwrap(), Outcome::Won);
        // Epoch 10 must sort above 9 and 2.
        assert_eq!(tb.test_and_set("vm1", 10, "d").unwrap(), Outcome::Won);
        assert_eq!(tb.test_and_set("vm1", 9, "e").unwrap(), Outcome::Won);
        assert_eq!(tb.current("vm1").unwrap(), Some((10, "d".into())));
        assert_eq!(tb.current("vm2").unwrap(), Some((1, "c".into())));
        assert_eq!(tb.current("vm3").unwrap(), None);
    }

    #[test]
    fn a_retry_by_the_same_owner_wins_again() {
        let tmp = tempfile::tempdir().unwrap();
        let tb = SharedDirTiebreaker::new(tmp.path());
        assert_eq!(tb.test_and_set("vm1", 3, "a").unwrap(), Outcome::Won);
        assert_eq!(tb.test_and_set("vm1", 3, "a").unwrap(), Outcome::Won);
        assert_eq!(
            tb.test_and_set("vm1", 3, "b").unwrap(),
            Outcome::Lost { holder: "a".into() }
        );
    }

    #[test]
    fn a_missing_shared_directory_is_unreachable_storage_and_is_not_created() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("not-mounted");
        let tb = SharedDirTiebreaker::new(&root);
        let err = tb.test_and_set("vm1", 1, "a").unwrap_err();
        assert!(err.is_transient(), "{err}");
        assert!(
            err.to_string().contains("is the shared storage mounted"),
            "{err}"
        );
        let err = tb.current("vm1").unwrap_err();
        assert!(err.is_transient(), "{err}");
        assert!(!root.exists(), "the shared root must never be created");
    }

    #[test]
    fn a_claim_that_was_never_completed_is_lost_to_an_unknown_holder() {
        let tmp = tempfile::tempdir().unwrap();
        let tb = SharedDirTiebreaker::new(tmp.path());
        fs::create_dir(tmp.path().join("vm1")).unwrap();
        let claim = tmp
            .path()
            .join("vm1")
            .join(format!("epoch-{}", epoch_digits(4)));
        fs::write(&claim, b"half-writ").unwrap();
        let started = Instant::now();
        assert_eq!(
            tb.test_and_set("vm1", 4, "a").unwrap(),
            Outcome::Lost {
                holder: HOLDER_UNKNOWN.into()
            }
        );
        assert!(started.elapsed() >= Duration::from_millis(HOLDER_WRITE_WAIT_MS));
        assert_eq!(tb.current("vm1").unwrap(), Some((4, HOLDER_UNKNOWN.into())));
    }

    #[test]
    fn bad_arguments_are_refused_before_touching_storage() {
        let tmp = tempfile::tempdir().unwrap();
        let tb = SharedDirTiebreaker::new(tmp.path());
        assert!(matches!(
            tb.test_and_set("../x", 1, "a"),
            Err(TiebreakError::InvalidVmId { .. })
        ));
        assert!(matches!(
            tb.test_and_set("vm", 0, "a"),
            Err(TiebreakError::ZeroEpoch)
        ));
        assert!(matches!(
            tb.test_and_set("vm", 1, "a\n"),
            Err(TiebreakError::InvalidOwner { .. })
        ));
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 0);
    }
}
