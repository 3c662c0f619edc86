//! Shared helpers for the integration tests: paths, running `ftvm`, temporary disks.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("repo root")
}

pub fn ftvm() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ftvm"))
}

/// A built guest; the test fails with a clear message if setup has not built it.
pub fn guest(name: &str) -> PathBuf {
    let path = repo().join("guests/build").join(format!("{name}.wasm"));
    assert!(path.exists(), "{} is missing: run `bash scripts/setup.sh` first", path.display());
    path
}

pub fn native(name: &str) -> PathBuf {
    let path = repo().join("guests/build/native").join(name);
    assert!(path.exists(), "{} is missing: run `bash scripts/setup.sh` first", path.display());
    path
}

pub fn run(args: &[&str]) -> Output {
    Command::new(ftvm()).args(args).output().expect("ftvm runs")
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn code(out: &Output) -> i32 {
    out.status.code().expect("exited normally, not by a signal")
}

/// Copies a directory tree (a disk) so that record and replay start from the same contents.
pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &dest);
        } else {
            std::fs::copy(entry.path(), dest).unwrap();
        }
    }
}
