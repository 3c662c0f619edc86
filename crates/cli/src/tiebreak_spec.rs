//! `--tiebreak dir:PATH` or `--tiebreak etcd:URL[,URL...]`, and the waiting the paper asks for when
//! the tiebreaker cannot be reached.

use std::time::{Duration, Instant};

use ftvm_tiebreak::{EtcdTiebreaker, Outcome, SharedDirTiebreaker, TestAndSet};

use crate::opts::Failure;

/// How long a replica waits for an unreachable tiebreaker before it gives up and halts.
pub const TIEBREAK_WAIT_MS_MAX: u64 = 30_000;
const TIEBREAK_RETRY_MS: u64 = 100;

pub fn parse(spec: &str) -> Result<Box<dyn TestAndSet>, Failure> {
    if let Some(path) = spec.strip_prefix("dir:") {
        std::fs::create_dir_all(path)
            .map_err(|e| Failure::usage(format!("tiebreak directory {path}: {e}")))?;
        return Ok(Box::new(SharedDirTiebreaker::new(path)));
    }
    if let Some(urls) = spec.strip_prefix("etcd:") {
        let endpoints: Vec<String> = urls.split(',').map(str::to_string).collect();
        let tb = EtcdTiebreaker::new(&endpoints)
            .map_err(|e| Failure::usage(format!("--tiebreak {spec}: {e}")))?;
        return Ok(Box::new(tb));
    }
    Err(Failure::usage(format!(
        "--tiebreak {spec:?}: expected dir:PATH or etcd:URL[,URL...]"
    )))
}

/// Test-and-set, waiting (bounded) while the store is unreachable. `Ok(true)`: won.
pub fn claim(tb: &dyn TestAndSet, vm: &str, epoch: u64, owner: &str) -> Result<bool, String> {
    let start = Instant::now();
    loop {
        match tb.test_and_set(vm, epoch, owner) {
            Ok(Outcome::Won) => return Ok(true),
            Ok(Outcome::Lost { holder }) => {
                eprintln!("ftvm: lost the tiebreak for epoch {epoch} of {vm} to {holder}");
                return Ok(false);
            }
            Err(e)
                if e.is_transient()
                    && start.elapsed() < Duration::from_millis(TIEBREAK_WAIT_MS_MAX) =>
            {
                eprintln!("ftvm: tiebreaker unreachable, waiting: {e}");
                std::thread::sleep(Duration::from_millis(TIEBREAK_RETRY_MS));
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}
