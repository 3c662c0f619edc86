//! Deterministic replay, end to end: `ftvm run --record` then `ftvm replay` on real guests.

mod common;

use std::path::Path;

use common::*;
use ftvm_log::{write_header, Entry, LogReader};

/// Rounds of record+replay per guest; 100 is the bar, override with FTVM_REPLAY_ROUNDS.
fn rounds() -> usize {
    std::env::var("FTVM_REPLAY_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100)
}

struct Case {
    guest: &'static str,
    args: &'static [&'static str],
    disk: bool,
}

const CASES: &[Case] = &[
    Case {
        guest: "hello",
        args: &["3", "x"],
        disk: false,
    },
    Case {
        guest: "clockrand",
        args: &["2"],
        disk: false,
    },
    Case {
        guest: "sleeper",
        args: &["3", "2"],
        disk: false,
    },
    Case {
        guest: "compute",
        args: &["2"],
        disk: false,
    },
    Case {
        guest: "fsx",
        args: &["/data"],
        disk: true,
    },
];

/// Records one run and replays it; returns (recorded stdout, exit code).
fn record_and_replay(case: &Case, dir: &Path, round: usize) -> (Vec<u8>, i32) {
    let log = dir.join(format!("{}-{round}.log", case.guest));
    let rec_disk = dir.join(format!("rec-{round}"));
    let rep_disk = dir.join(format!("rep-{round}"));
    std::fs::create_dir_all(&rec_disk).unwrap();
    std::fs::write(rec_disk.join("seed.txt"), format!("round {round}\n")).unwrap();
    copy_tree(&rec_disk, &rep_disk);
    let guest = guest(case.guest);
    let mut args: Vec<String> = vec!["run".into(), "--record".into(), log.display().to_string()];
    let mut rep: Vec<String> = vec!["replay".into(), log.display().to_string()];
    if case.disk {
        args.extend(["--dir".into(), format!("{}::/data", rec_disk.display())]);
        rep.extend(["--dir".into(), format!("{}::/data", rep_disk.display())]);
    }
    args.push(guest.display().to_string());
    args.extend(case.args.iter().map(|a| a.to_string()));
    rep.push(guest.display().to_string());
    let recorded = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let replayed = run(&rep.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(
        recorded.stdout,
        replayed.stdout,
        "{} round {round}: replay printed something else\n--- replay stderr:\n{}",
        case.guest,
        stderr(&replayed)
    );
    assert_eq!(
        recorded.stderr, replayed.stderr,
        "{} round {round}: stderr differs",
        case.guest
    );
    assert_eq!(
        code(&recorded),
        code(&replayed),
        "{} round {round}: exit codes differ: {}",
        case.guest,
        stderr(&replayed)
    );
    std::fs::remove_file(&log).unwrap();
    std::fs::remove_dir_all(&rec_disk).unwrap();
    std::fs::remove_dir_all(&rep_disk).unwrap();
    let rc = code(&recorded);
    (recorded.stdout, rc)
}

#[test]
fn every_guest_replays_identically_round_after_round() {
    let dir = tempfile::tempdir().unwrap();
    for case in CASES {
        let mut outputs = std::collections::HashSet::new();
        for round in 0..rounds() {
            let (stdout, code) = record_and_replay(case, dir.path(), round);
            let expected = if case.guest == "hello" { 3 } else { 0 };
            assert_eq!(code, expected, "{} exited {code}", case.guest);
            outputs.insert(stdout);
        }
        // The clock/random guest sees new values every round: the replays above reproduced
        // different recordings, not one fixed output.
        if case.guest == "clockrand" && rounds() > 1 {
            assert!(
                outputs.len() > 1,
                "clockrand printed the same values every round"
            );
        }
    }
}

#[test]
fn plain_runs_see_different_clocks_and_random() {
    let g = guest("clockrand");
    let a = run(&["run", g.to_str().unwrap(), "1"]);
    let b = run(&["run", g.to_str().unwrap(), "1"]);
    assert_eq!(code(&a), 0, "{}", stderr(&a));
    let text = |o: &std::process::Output| String::from_utf8_lossy(&o.stdout).into_owned();
    let entropy = |t: &str| {
        t.lines()
            .find(|l| l.contains("entropy"))
            .map(str::to_string)
            .expect("entropy line")
    };
    assert_ne!(
        entropy(&text(&a)),
        entropy(&text(&b)),
        "two runs got the same random bytes"
    );
    assert_ne!(text(&a), text(&b));
}

fn record(guest_name: &str, args: &[&str], dir_arg: Option<&str>, log: &Path) {
    let g = guest(guest_name);
    let mut all = vec!["run", "--record", log.to_str().unwrap()];
    if let Some(d) = dir_arg {
        all.extend(["--dir", d]);
    }
    all.push(g.to_str().unwrap());
    all.extend(args);
    let out = run(&all);
    assert_eq!(code(&out), 0, "recording failed: {}", stderr(&out));
}

#[test]
fn a_changed_disk_or_module_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk");
    std::fs::create_dir(&disk).unwrap();
    std::fs::write(disk.join("seed.txt"), "x").unwrap();
    let pristine = dir.path().join("pristine");
    copy_tree(&disk, &pristine);
    let log = dir.path().join("fsx.log");
    let dir_arg = format!("{}::/data", disk.display());
    record("fsx", &["/data"], Some(&dir_arg), &log);
    // The recording changed `disk`; replaying against it is refused.
    let out = run(&[
        "replay",
        log.to_str().unwrap(),
        "--dir",
        &dir_arg,
        guest("fsx").to_str().unwrap(),
    ]);
    assert_eq!(code(&out), 121, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("starting disk differs"),
        "{}",
        stderr(&out)
    );
    // Against the pristine copy it replays.
    let ok_arg = format!("{}::/data", pristine.display());
    let out = run(&[
        "replay",
        log.to_str().unwrap(),
        "--dir",
        &ok_arg,
        guest("fsx").to_str().unwrap(),
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    // Another module is refused.
    let out = run(&[
        "replay",
        log.to_str().unwrap(),
        "--dir",
        &ok_arg,
        guest("hello").to_str().unwrap(),
    ]);
    assert_eq!(code(&out), 121);
    assert!(
        stderr(&out).contains("recorded with module"),
        "{}",
        stderr(&out)
    );
}

/// Rewrites a log with one entry changed (checksums recomputed, as a deliberate tamper would).
fn tamper(log: &Path, out: &Path, change: impl Fn(&mut Entry) -> bool) {
    let mut reader = LogReader::open(std::fs::File::open(log).unwrap()).unwrap();
    let mut bytes = Vec::new();
    write_header(&mut bytes, reader.header()).unwrap();
    let mut changed = false;
    while let Some((seq, mut entry)) = reader.next_entry().unwrap() {
        if !changed {
            changed = change(&mut entry);
        }
        entry.encode_framed(seq, &mut bytes);
    }
    assert!(changed, "nothing to tamper with");
    std::fs::write(out, bytes).unwrap();
}

#[test]
fn a_tampered_entry_is_caught_as_divergence() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("clockrand.log");
    record("clockrand", &["2"], None, &log);
    let g = guest("clockrand");

    let random = dir.path().join("random.log");
    tamper(&log, &random, |e| match e {
        Entry::Random { bytes } => {
            bytes[0] ^= 0xff;
            true
        }
        _ => false,
    });
    let out = run(&["replay", random.to_str().unwrap(), g.to_str().unwrap()]);
    assert_eq!(code(&out), 122, "{}", stderr(&out));
    assert!(stderr(&out).contains("diverge"), "{}", stderr(&out));

    // A clock entry turned into a random entry: the guest asks for a clock, the log has bytes.
    let kind = dir.path().join("kind.log");
    tamper(&log, &kind, |e| {
        if let Entry::Clock { .. } = e {
            *e = Entry::Random {
                bytes: vec![1, 2, 3],
            };
            return true;
        }
        false
    });
    let out = run(&["replay", kind.to_str().unwrap(), g.to_str().unwrap()]);
    assert_eq!(code(&out), 122, "{}", stderr(&out));
    assert!(stderr(&out).contains("diverge"), "{}", stderr(&out));

    // The exit code in the log differs from what the guest does.
    let exit = dir.path().join("exit.log");
    tamper(&log, &exit, |e| match e {
        Entry::Exit { code } => {
            *code = 9;
            true
        }
        _ => false,
    });
    let out = run(&["replay", exit.to_str().unwrap(), g.to_str().unwrap()]);
    assert_eq!(code(&out), 122, "{}", stderr(&out));
}

#[test]
fn truncated_and_corrupt_logs_say_where() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("c.log");
    record("clockrand", &["2"], None, &log);
    let bytes = std::fs::read(&log).unwrap();
    let g = guest("clockrand");

    let cut = dir.path().join("cut.log");
    std::fs::write(&cut, &bytes[..bytes.len() - 10]).unwrap();
    let out = run(&["replay", cut.to_str().unwrap(), g.to_str().unwrap()]);
    assert_eq!(code(&out), 121);
    assert!(
        stderr(&out).contains("truncated at byte"),
        "{}",
        stderr(&out)
    );

    let bad = dir.path().join("bad.log");
    let mut flipped = bytes.clone();
    let at = bytes.len() - 40;
    flipped[at] ^= 0x20;
    std::fs::write(&bad, &flipped).unwrap();
    let out = run(&["replay", bad.to_str().unwrap(), g.to_str().unwrap()]);
    assert_eq!(code(&out), 121);
    assert!(stderr(&out).contains("corrupt at byte"), "{}", stderr(&out));

    let inspect = run(&["inspect", cut.to_str().unwrap()]);
    assert_eq!(code(&inspect), 121);
    assert!(
        String::from_utf8_lossy(&inspect.stdout).contains("clock id="),
        "inspect shows entries before the cut"
    );

    let out = run(&["inspect", g.to_str().unwrap()]);
    assert_eq!(code(&out), 121);
    assert!(stderr(&out).contains("not an ftvm log"), "{}", stderr(&out));
}

#[test]
fn a_full_disk_under_the_log_stops_the_vm_and_keeps_what_was_written() {
    // The log's file system fills up mid-run (about 1,100 of clockrand's ~4,000 entries fit).
    let full = Tmpfs::mount(32 << 10);
    let log = full.path().join("c.log");
    let g = guest("clockrand");
    let out = run(&[
        "run",
        "--record",
        log.to_str().unwrap(),
        g.to_str().unwrap(),
        "300",
    ]);
    assert_eq!(code(&out), 125, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("No space left on device")
            && stderr(&out).contains("nothing goes unrecorded"),
        "{}",
        stderr(&out)
    );
    let printed = out.stdout;
    assert!(
        !printed.is_empty(),
        "the guest printed before the disk filled"
    );
    assert!(
        !String::from_utf8_lossy(&printed).contains("clockrand: done"),
        "the run cannot have finished"
    );

    // What was written replays, and yields exactly what the run let out before it stopped: no
    // output left the VM that the log does not account for.
    let copy = tempfile::tempdir().unwrap();
    let kept = copy.path().join("kept.log");
    std::fs::copy(&log, &kept).unwrap();
    drop(full);
    let replay = run(&["replay", kept.to_str().unwrap(), g.to_str().unwrap()]);
    assert_eq!(code(&replay), 121, "{}", stderr(&replay));
    assert!(
        stderr(&replay).contains("truncated at byte"),
        "{}",
        stderr(&replay)
    );
    assert_eq!(
        String::from_utf8_lossy(&replay.stdout),
        String::from_utf8_lossy(&printed)
    );
}

#[test]
fn a_full_guest_disk_is_enospc_for_the_guest_not_a_crash() {
    let full = Tmpfs::mount(4 << 10);
    let g = guest("fsx");
    let dir = format!("{}::/data", full.path().display());
    let out = run(&["run", "--dir", &dir, g.to_str().unwrap(), "/data"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("ENOSPC"), "{text}\n{}", stderr(&out));
    // fsx counts its unexpected failures as its exit code: the guest ran to its end and reported.
    assert!(text.contains("fsx: failures="), "{text}");
    assert!((1..=100).contains(&code(&out)), "{}", stderr(&out));
}

#[test]
fn a_host_symlink_in_a_guest_path_is_refused_through_the_gate() {
    // The refusal reads the host's disk, so it is a disk failure of the gate's, in the log like
    // any other: a replica whose disk had lost the link would refuse alike.
    let dir = tempfile::tempdir().unwrap();
    let disks = [dir.path().join("rec"), dir.path().join("rep")];
    for d in &disks {
        std::fs::create_dir(d).unwrap();
        std::fs::write(d.join("target.txt"), "7\n").unwrap();
        std::os::unix::fs::symlink("target.txt", d.join("counter.txt")).unwrap();
    }
    let log = dir.path().join("fsx.log");
    let g = guest("fsx");
    let rec = format!("{}::/data", disks[0].display());
    let out = run(&[
        "run",
        "--record",
        log.to_str().unwrap(),
        "--dir",
        &rec,
        g.to_str().unwrap(),
        "/data",
    ]);
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.contains("FAIL open counter.txt: EPERM"),
        "{printed}"
    );
    let inspect = run(&["inspect", log.to_str().unwrap()]);
    let listing = String::from_utf8_lossy(&inspect.stdout);
    assert!(
        listing
            .lines()
            .any(|l| l.contains("host disk error call=") && l.contains("(EPERM)")),
        "the refusal is not in the log: {listing}"
    );
    let rep = format!("{}::/data", disks[1].display());
    let replay = run(&[
        "replay",
        log.to_str().unwrap(),
        "--dir",
        &rep,
        g.to_str().unwrap(),
    ]);
    assert_eq!(code(&replay), code(&out), "{}", stderr(&replay));
    assert_eq!(replay.stdout, out.stdout);
}

#[test]
fn a_recorded_disk_failure_replays_on_any_disk() {
    // What the recording's disk did not do (refused or short writes of a full disk) is in the
    // log; a replay does the same, so it reproduces the run, and leaves the same disk behind,
    // on a disk with room to spare. Two cases: fsx's usual work on a disk with no room at all,
    // and its `fill` mode on one that takes 2.6 of its 100,000-byte writes.
    let g = guest("fsx");
    for (size, args, entry, detail) in [
        (4 << 10, &["/data"][..], "host disk error call=", "(ENOSPC)"),
        (
            256 << 10,
            &["/data", "fill"][..],
            "short disk write call=",
            "done=",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("fsx.log");
        let full = Tmpfs::mount(size);
        let disk = format!("{}::/data", full.path().display());
        let mut all = vec!["run", "--record", log.to_str().unwrap(), "--dir", &disk];
        all.push(g.to_str().unwrap());
        all.extend(args);
        let out = run(&all);
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("ENOSPC"),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        let inspect = run(&["inspect", log.to_str().unwrap()]);
        let listing = String::from_utf8_lossy(&inspect.stdout);
        assert!(
            listing
                .lines()
                .any(|l| l.contains(entry) && l.contains(detail)),
            "no {entry:?} with {detail:?} in the log: {listing}"
        );

        let roomy = dir.path().join("roomy");
        std::fs::create_dir(&roomy).unwrap();
        let disk = format!("{}::/data", roomy.display());
        let replay = run(&[
            "replay",
            log.to_str().unwrap(),
            "--dir",
            &disk,
            g.to_str().unwrap(),
        ]);
        assert_eq!(code(&replay), code(&out), "{}", stderr(&replay));
        assert_eq!(
            String::from_utf8_lossy(&replay.stdout),
            String::from_utf8_lossy(&out.stdout)
        );
        assert_eq!(read_tree(&roomy), read_tree(full.path()));
    }
}

#[test]
fn bad_modules_and_guest_failures_get_distinct_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let garbage = write("garbage.wasm", "\u{1}\u{2}not wasm");
    let out = run(&["run", &garbage]);
    assert_eq!(code(&out), 120, "{}", stderr(&out));
    assert!(stderr(&out).contains("not a WebAssembly module"));

    let non_wasi = write(
        "env.wat",
        r#"(module (import "env" "f" (func)) (memory (export "memory") 1) (func (export "_start")))"#,
    );
    let out = run(&["run", &non_wasi]);
    assert_eq!(code(&out), 120);
    assert!(stderr(&out).contains("env::f"), "{}", stderr(&out));

    let reactor = write(
        "lib.wat",
        r#"(module (memory (export "memory") 1) (func (export "_initialize")))"#,
    );
    let out = run(&["run", &reactor]);
    assert_eq!(code(&out), 120);
    assert!(stderr(&out).contains("_start"));

    let trap = write(
        "trap.wat",
        r#"(module (memory (export "memory") 1) (func $boom unreachable) (func (export "_start") call $boom))"#,
    );
    let out = run(&["run", &trap]);
    assert_eq!(code(&out), 123);
    assert!(stderr(&out).contains("unreachable"), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("backtrace"),
        "the wasm backtrace is printed: {}",
        stderr(&out)
    );

    let oom = write(
        "oom.wat",
        r#"(module (memory (export "memory") 1)
             (func (export "_start") (loop $l (br_if $l (i32.ne (memory.grow (i32.const 100)) (i32.const -1)))) unreachable))"#,
    );
    let out = run(&["run", "--memory-max-mib", "32", &oom]);
    assert_eq!(code(&out), 124, "{}", stderr(&out));
    assert!(stderr(&out).contains("out of memory"));

    // A trap is recorded and replays as the same trap.
    let log = dir.path().join("trap.log");
    let out = run(&["run", "--record", log.to_str().unwrap(), &trap]);
    assert_eq!(code(&out), 123);
    let out = run(&["replay", log.to_str().unwrap(), &trap]);
    assert_eq!(code(&out), 123, "{}", stderr(&out));

    let out = run(&[
        "run",
        "--dir",
        "/nonexistent-ftvm-dir::/data",
        guest("hello").to_str().unwrap(),
    ]);
    assert_eq!(code(&out), 125, "{}", stderr(&out));
    assert!(stderr(&out).contains("/nonexistent-ftvm-dir"));

    let out = run(&["run", dir.path().join("missing.wasm").to_str().unwrap()]);
    assert_eq!(code(&out), 120);
    let out = run(&["frobnicate"]);
    assert_eq!(code(&out), 2);
}

#[test]
fn guest_exit_codes_pass_through_and_stdout_is_the_guests() {
    let out = run(&["run", guest("hello").to_str().unwrap(), "42"]);
    assert_eq!(code(&out), 42);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("hello from ftvm"), "{text}");
    assert!(text.contains("argv[1]=42"));
}

#[test]
fn fuel_counts_replay_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("fuel.log");
    let g = guest("compute");
    let out = run(&[
        "run",
        "--fuel",
        "--record",
        log.to_str().unwrap(),
        g.to_str().unwrap(),
        "1",
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = run(&["replay", log.to_str().unwrap(), g.to_str().unwrap()]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let mut reader = LogReader::open(std::fs::File::open(&log).unwrap()).unwrap();
    let mut fuel = None;
    while let Some((_, e)) = reader.next_entry().unwrap() {
        if let Entry::Checkpoint(c) = e {
            fuel = c.fuel;
        }
    }
    assert!(
        fuel.is_some_and(|f| f > 1_000_000),
        "the final checkpoint carries an instruction count: {fuel:?}"
    );
}

#[test]
fn inspect_into_a_closed_pipe_ends_quietly() {
    // `ftvm inspect LOG | head`: the reader goes away. Rust ignores SIGPIPE by default, and a
    // failed print panicked; a printing command should end as other Unix tools do.
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("c.log");
    record("clockrand", &["2"], None, &log);
    let mut child = std::process::Command::new(ftvm())
        .args(["inspect", log.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Closed before the child can have written (it still has to read the log).
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        out.status.signal() == Some(libc::SIGPIPE) || out.status.code() == Some(0),
        "{:?}: {err}",
        out.status
    );
}
