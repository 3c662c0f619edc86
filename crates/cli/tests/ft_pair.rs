//! Fault-tolerant pairs on loopback with a console guest (`sleeper`): real `ftvm ft` processes,
//! real signals, a real TCP log channel. The networked versions (a KV guest behind a TAP, real
//! clients) are in `lab_failover.rs`.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// A fault-tolerant pair of the console guest `sleeper` with a shared-directory tiebreaker.
struct Pair {
    dir: tempfile::TempDir,
    vm: PathBuf,
    tb: String,
}

impl Pair {
    fn new(lines: u32, ms: u32) -> Pair {
        Pair::with_tiebreak(lines, ms, None)
    }

    fn with_tiebreak(lines: u32, ms: u32, tiebreak: Option<String>) -> Pair {
        Pair::with_args(&[lines, ms], tiebreak)
    }

    /// The sleeper's arguments: lines, ms between them[, copies of each line].
    fn with_args(args: &[u32], tiebreak: Option<String>) -> Pair {
        let dir = tempfile::tempdir().unwrap();
        let vm = dir.path().join("sleeper.toml");
        let args: Vec<String> = args.iter().map(|a| format!("\"{a}\"")).collect();
        std::fs::write(
            &vm,
            format!(
                "name = \"sleeper\"\nmodule = \"{}\"\nargs = [{}]\n[ft]\nfailure_timeout_ms = 600\n",
                guest("sleeper").display(),
                args.join(", ")
            ),
        )
        .unwrap();
        let tb = tiebreak.unwrap_or_else(|| format!("dir:{}", dir.path().join("tb").display()));
        Pair { dir, vm, tb }
    }

    fn start(&self, name: &str, role: &str, log: u16, extra: &[&str]) -> Proc {
        let mut cmd = Command::new(ftvm());
        cmd.args([
            "ft",
            "--vm",
            self.vm.to_str().unwrap(),
            "--as",
            role,
            "--log",
            &format!("127.0.0.1:{log}"),
        ])
        .args([
            "--tiebreak",
            &self.tb,
            "--owner",
            name,
            "--wait-ms",
            "10000",
        ])
        .args(extra);
        Proc::spawn(&mut cmd, self.dir.path(), name)
    }

    /// Starts primary "a" and backup "b" on `log` and waits until the primary printed `lines`
    /// lines: a pair that runs.
    fn running(&self, log: u16, lines: usize) -> (Proc, Proc) {
        let primary = self.start("a", "primary", log, &[]);
        let backup = self.start("b", "backup", log, &[]);
        wait_until(Duration::from_secs(20), || {
            iterations(&primary.stdout()).len() >= lines
        });
        (primary, backup)
    }

    fn claims(&self) -> Vec<String> {
        let dir = self.dir.path().join("tb/sleeper");
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .filter(|name| name.starts_with("epoch-"))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
}

/// The iteration numbers a sleeper printed, in order.
fn iterations(text: &str) -> Vec<u32> {
    text.lines()
        .filter_map(|l| {
            l.strip_prefix("i=")
                .and_then(|r| r.split_whitespace().next())
                .and_then(|n| n.parse().ok())
        })
        .collect()
}

fn assert_in_order_no_duplicates(seen: &[u32]) {
    for w in seen.windows(2) {
        assert!(
            w[1] > w[0],
            "console lines repeated or out of order across the failover: {seen:?}"
        );
    }
}

#[test]
fn primary_killed_backup_goes_live_and_the_guest_carries_on() {
    let pair = Pair::new(40, 50);
    let log = free_port();
    let mut primary = pair.start("a", "primary", log, &[]);
    let mut backup = pair.start("b", "backup", log, &[]);
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        // The replay runs at a low priority (DEFAULT_REPLAY_NICE)...
        wait_until(Duration::from_secs(20), || {
            vm_thread_nice(backup.pid()) == Some(10)
        });
    }
    wait_until(Duration::from_secs(20), || {
        iterations(&primary.stdout()).len() >= 8
    });
    primary.signal(libc::SIGKILL);
    primary.wait(Duration::from_secs(5));
    if root {
        // ...and the new primary at normal priority.
        wait_until(Duration::from_secs(20), || backup.stderr().contains("LIVE"));
        assert_eq!(vm_thread_nice(backup.pid()), Some(0), "{}", backup.stderr());
    }
    backup.expect_exit(0, Duration::from_secs(30));
    assert!(backup.stderr().contains("LIVE"), "{}", backup.stderr());
    let mut seen = iterations(&primary.stdout());
    seen.extend(iterations(&backup.stdout()));
    assert_in_order_no_duplicates(&seen);
    // Console bytes the dead primary still held under the Output Rule are gone (the backup's
    // replayed copies were dropped): at most the line in flight.
    assert!(seen.len() >= 39, "lost more than one line: {seen:?}");
    assert_eq!(*seen.last().unwrap(), 39);
    assert!(backup.stdout().contains("sleeper: done"));
    assert_eq!(
        pair.claims(),
        vec!["epoch-00000000000000000001", "epoch-00000000000000000002"]
    );
}

#[test]
fn backup_killed_primary_goes_on_alone() {
    let pair = Pair::new(30, 40);
    let log = free_port();
    let mut primary = pair.start("a", "primary", log, &[]);
    let mut backup = pair.start("b", "backup", log, &[]);
    wait_until(Duration::from_secs(20), || {
        iterations(&primary.stdout()).len() >= 5
    });
    backup.signal(libc::SIGKILL);
    backup.wait(Duration::from_secs(5));
    primary.expect_exit(0, Duration::from_secs(30));
    assert_eq!(
        iterations(&primary.stdout()),
        (0..30).collect::<Vec<_>>(),
        "the primary printed every line once"
    );
    assert!(
        primary.stderr().contains("going on alone"),
        "{}",
        primary.stderr()
    );
    assert_eq!(
        pair.claims().len(),
        2,
        "the primary claimed the next epoch before going on alone"
    );
}

#[test]
fn a_clean_exit_is_not_a_failure() {
    let pair = Pair::new(5, 20);
    let log = free_port();
    let saved = pair.dir.path().join("primary.log");
    let mut primary = pair.start("a", "primary", log, &["--record", saved.to_str().unwrap()]);
    let mut backup = pair.start("b", "backup", log, &[]);
    primary.expect_exit(0, Duration::from_secs(30));
    backup.expect_exit(0, Duration::from_secs(30));
    assert!(
        backup.stderr().contains("(replayed)"),
        "{}",
        backup.stderr()
    );
    // The primary's log, saved to a file, replays the session for debugging.
    let replay = run(&[
        "replay",
        saved.to_str().unwrap(),
        guest("sleeper").to_str().unwrap(),
    ]);
    assert_eq!(code(&replay), 0, "{}", stderr(&replay));
    assert_eq!(String::from_utf8_lossy(&replay.stdout), primary.stdout());
    assert!(!backup.stderr().contains("LIVE"));
    assert_eq!(backup.stdout(), "", "a backup's outputs are dropped");
    assert_eq!(
        pair.claims(),
        vec!["epoch-00000000000000000001"],
        "nobody claimed a new epoch"
    );
}

#[test]
fn a_primary_whose_host_fails_hands_over_to_the_backup() {
    // The VM stops on the primary for a reason of that host's own (a test hook standing for,
    // say, a failed random source): the primary leaves without a goodbye, and the backup takes
    // over as after a crash, instead of ending too.
    let pair = Pair::new(30, 20);
    let log = free_port();
    let mut primary = pair.start("a", "primary", log, &["--fail-at-record", "20"]);
    let mut backup = pair.start("b", "backup", log, &[]);
    primary.expect_exit(126, Duration::from_secs(30));
    assert!(
        primary.stderr().contains("stops without a goodbye"),
        "{}",
        primary.stderr()
    );
    backup.expect_exit(0, Duration::from_secs(30));
    assert!(backup.stderr().contains("LIVE"), "{}", backup.stderr());
    let mut seen = iterations(&primary.stdout());
    seen.extend(iterations(&backup.stdout()));
    assert_in_order_no_duplicates(&seen);
    assert!(
        backup.stdout().contains("sleeper: done"),
        "{}",
        backup.stdout()
    );
}

#[test]
fn a_full_disk_under_the_primarys_log_copy_does_not_stop_the_vm() {
    // `--record FILE` on a replica is a debugging copy of the log; the log channel is what the
    // backup replays. When the copy's disk fills, the primary says so and goes on replicated.
    let pair = Pair::new(150, 2);
    let full = Tmpfs::mount(4 << 10);
    let saved = full.path().join("primary.log");
    let log = free_port();
    let mut primary = pair.start("a", "primary", log, &["--record", saved.to_str().unwrap()]);
    let mut backup = pair.start("b", "backup", log, &[]);
    primary.expect_exit(0, Duration::from_secs(30));
    backup.expect_exit(0, Duration::from_secs(30));
    assert!(
        primary.stderr().contains("the log's copy failed")
            && primary.stderr().contains("No space left on device"),
        "{}",
        primary.stderr()
    );
    assert_eq!(iterations(&primary.stdout()), (0..150).collect::<Vec<_>>());
    assert!(
        backup.stderr().contains("(replayed)"),
        "{}",
        backup.stderr()
    );
    assert!(!backup.stderr().contains("LIVE"), "{}", backup.stderr());
    // The copy is a prefix of the session: it replays as far as it goes.
    let replay = run(&[
        "replay",
        saved.to_str().unwrap(),
        guest("sleeper").to_str().unwrap(),
    ]);
    assert_eq!(code(&replay), 121, "{}", stderr(&replay));
    let replayed = String::from_utf8_lossy(&replay.stdout).into_owned();
    assert!(!replayed.is_empty());
    assert!(primary.stdout().starts_with(&replayed), "{replayed}");
}

#[test]
fn power_off_travels_through_the_log_and_stops_both() {
    let pair = Pair::new(1000, 20);
    let log = free_port();
    let (mut primary, mut backup) = pair.running(log, 3);
    primary.signal(libc::SIGTERM);
    primary.expect_exit(0, Duration::from_secs(10));
    backup.expect_exit(0, Duration::from_secs(10));
    assert!(primary.stderr().contains("powered off"));
    assert!(
        backup.stderr().contains("powered off"),
        "{}",
        backup.stderr()
    );
    assert_eq!(pair.claims().len(), 1);
}

#[test]
fn a_paused_primary_never_speaks_after_the_backup_went_live() {
    let pair = Pair::new(1000, 20);
    let log = free_port();
    let (primary, backup) = pair.running(log, 3);
    primary.signal(libc::SIGSTOP);
    resumed_after_go_live_halts_silently(primary, backup);
}

/// A stopped primary, resumed once its backup went live, halts without emitting anything more.
fn resumed_after_go_live_halts_silently(mut primary: Proc, mut backup: Proc) {
    wait_until(Duration::from_secs(10), || backup.stderr().contains("LIVE"));
    let before = primary.stdout();
    primary.signal(libc::SIGCONT);
    assert_eq!(
        primary.wait(Duration::from_secs(10)),
        127,
        "the stale primary halts: {}",
        primary.stderr()
    );
    assert_eq!(
        primary.stdout(),
        before,
        "the stale primary emitted output after the backup went live"
    );
    assert!(primary.stderr().contains("HALT"));
    backup.signal(libc::SIGTERM);
    backup.expect_exit(0, Duration::from_secs(10));
}

#[test]
fn a_primary_paused_at_the_output_shortcut_never_speaks_after_the_backup_went_live() {
    // Each line twice: the second copy follows the first with no log record between, so it would
    // leave straight from the VM thread (the shortcut). The primary stops itself right there.
    let pair = Pair::with_args(&[1000, 20, 2], None);
    let log = free_port();
    let primary = pair.start("a", "primary", log, &["--stop-before-shortcut", "20"]);
    let backup = pair.start("b", "backup", log, &[]);
    wait_until(Duration::from_secs(20), || {
        primary
            .stderr()
            .contains("which the shortcut would let through")
    });
    resumed_after_go_live_halts_silently(primary, backup);
}

/// A TCP relay between backup and primary that the test can cut, or hold: while `hold` is set
/// it forwards nothing from the primary to the backup (the connection stays up).
struct Relay {
    port: u16,
    cut: Arc<AtomicBool>,
    hold: Arc<AtomicBool>,
}

impl Relay {
    fn start(to: u16) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let hold = Arc::new(AtomicBool::new(false));
        let flag = cut.clone();
        let held = hold.clone();
        std::thread::spawn(move || {
            let (a, _) = listener.accept().unwrap();
            // The primary may not be listening yet: retry, bounded.
            let deadline = Instant::now() + Duration::from_secs(10);
            let b = loop {
                match TcpStream::connect(("127.0.0.1", to)) {
                    Ok(b) => break b,
                    Err(e) if Instant::now() < deadline => {
                        let _ = e;
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => panic!("relay cannot reach the primary: {e}"),
                }
            };
            // `a` is the backup's connection, `b` the one to the primary.
            let directions = [
                (a.try_clone().unwrap(), b.try_clone().unwrap(), None),
                (b, a, Some(held)),
            ];
            for (mut from, mut into, hold) in directions {
                let flag = flag.clone();
                std::thread::spawn(move || {
                    from.set_read_timeout(Some(Duration::from_millis(50)))
                        .unwrap();
                    let mut buf = [0u8; 65536];
                    while !flag.load(Ordering::SeqCst) {
                        if hold.as_ref().is_some_and(|h| h.load(Ordering::SeqCst)) {
                            std::thread::sleep(Duration::from_millis(2));
                            continue;
                        }
                        match from.read(&mut buf) {
                            Ok(0) => break,
                            Ok(n) => {
                                if into.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                            Err(e)
                                if e.kind() == std::io::ErrorKind::WouldBlock
                                    || e.kind() == std::io::ErrorKind::TimedOut => {}
                            Err(_) => break,
                        }
                    }
                    let _ = from.shutdown(std::net::Shutdown::Both);
                    let _ = into.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        Relay { port, cut, hold }
    }
}

fn exactly_one_survives(primary: &mut Proc, backup: &mut Proc) {
    // The survivor runs the guest to its end; the loser halts with 127.
    let a = primary.wait(Duration::from_secs(60));
    let b = backup.wait(Duration::from_secs(60));
    let mut codes = [a, b];
    codes.sort();
    assert_eq!(
        codes,
        [0, 127],
        "exactly one side lives on: primary {a} ({}), backup {b} ({})",
        primary.stderr(),
        backup.stderr()
    );
}

#[test]
fn a_cut_log_channel_leaves_exactly_one_live() {
    let pair = Pair::new(60, 20);
    let log = free_port();
    let relay = Relay::start(log);
    let file = pair.dir.path().join("a.json");
    let mut primary = pair.start(
        "a",
        "primary",
        log,
        &["--status-file", file.to_str().unwrap()],
    );
    let mut backup = pair.start("b", "backup", relay.port, &[]);
    wait_until(Duration::from_secs(20), || {
        iterations(&primary.stdout()).len() >= 5
    });
    // Its status says why outputs wait longer here.
    let show = || status_text(&file);
    wait_until(Duration::from_secs(10), || {
        show().contains("host acks     off: outputs wait for the backup's own acks")
    });
    relay.cut.store(true, Ordering::SeqCst);
    exactly_one_survives(&mut primary, &mut backup);
    assert_eq!(pair.claims().len(), 2, "one new epoch, claimed once");
    // The relay ends TCP on both sides, so its acknowledgments are not the backup's host's: the
    // primary saw the endpoints differ and released outputs only on the backup's own acks.
    assert!(
        primary
            .stderr()
            .contains("outputs wait for the backup's own acks"),
        "{}",
        primary.stderr()
    );
}

#[test]
fn no_output_leaves_before_the_backup_acknowledged_its_log() {
    // A line every 10 ms; the relay ends TCP, so only the backup's own acks release outputs.
    let pair = Pair::new(400, 10);
    let log = free_port();
    let relay = Relay::start(log);
    let mut primary = pair.start("a", "primary", log, &[]);
    let mut backup = pair.start("b", "backup", relay.port, &[]);
    wait_until(Duration::from_secs(20), || {
        iterations(&primary.stdout()).len() >= 20
    });
    // The backup receives nothing for 300 ms (well inside the 600 ms failure timeout): the guest
    // goes on printing, and every line it prints waits. Lines whose log was acknowledged before
    // the hold may still come out in its first moments.
    relay.hold.store(true, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(100));
    let at_hold = iterations(&primary.stdout()).len();
    std::thread::sleep(Duration::from_millis(200));
    let during = iterations(&primary.stdout()).len();
    relay.hold.store(false, Ordering::SeqCst);
    wait_until(Duration::from_secs(10), || {
        iterations(&primary.stdout()).len() >= during + 20
    });
    assert_eq!(
        during,
        at_hold,
        "the primary printed {} lines while its log did not reach the backup",
        during - at_hold
    );
    // The held lines and those made after the release, which may take the shortcut, come out in
    // the order the guest printed them, none lost or repeated.
    let seen = iterations(&primary.stdout());
    assert!(
        seen.windows(2).all(|w| w[1] == w[0] + 1),
        "lines out of order, lost or repeated around the hold: {seen:?}"
    );
    relay.cut.store(true, Ordering::SeqCst);
    exactly_one_survives(&mut primary, &mut backup);
}

#[test]
fn a_corrupted_log_frame_is_detected_not_applied() {
    let pair = Pair::new(40, 20);
    let log = free_port();
    let mut primary = pair.start("a", "primary", log, &["--corrupt-log-frame", "12"]);
    let mut backup = pair.start("b", "backup", log, &[]);
    exactly_one_survives(&mut primary, &mut backup);
    let err = backup.stderr();
    assert!(
        err.contains("corrupt log-channel frame detected, not applied"),
        "{err}"
    );
    assert!(err.contains("checksum"), "{err}");
    // Its bytes had reached the backup's host, whose TCP acknowledged them, and the primary
    // releases outputs on that (a direct connection): the backup may never go live without
    // them. The primary goes on.
    assert!(
        primary
            .stderr()
            .contains("the backup's host holds the other end"),
        "{}",
        primary.stderr()
    );
    assert!(err.contains("can never go live consistently"), "{err}");
    assert!(!err.contains("LIVE"), "{err}");
    assert!(
        primary.stderr().contains("going on alone"),
        "{}",
        primary.stderr()
    );
}

#[test]
fn an_acked_record_that_cannot_be_replayed_halts_the_backup_not_the_primary() {
    // The record's own checksum fails inside a frame whose checksum holds: the backup acked it,
    // so the primary may have released outputs that depend on it. The backup must never go
    // live; the primary goes on alone.
    let pair = Pair::new(30, 20);
    let log = free_port();
    let mut primary = pair.start("a", "primary", log, &["--corrupt-log-record", "15"]);
    let mut backup = pair.start("b", "backup", log, &[]);
    backup.expect_exit(127, Duration::from_secs(30));
    assert!(
        backup
            .stderr()
            .contains("log record 15 was acknowledged but cannot be replayed"),
        "{}",
        backup.stderr()
    );
    assert!(!backup.stderr().contains("LIVE"), "{}", backup.stderr());
    primary.expect_exit(0, Duration::from_secs(30));
    assert!(
        primary.stderr().contains("going on alone"),
        "{}",
        primary.stderr()
    );
    assert_eq!(iterations(&primary.stdout()), (0..30).collect::<Vec<_>>());
}

#[test]
fn a_backup_of_another_vm_is_refused() {
    let pair = Pair::new(50, 20);
    let other = Pair::new(51, 20); // different args: a different VM definition
    let log = free_port();
    let _primary = pair.start("a", "primary", log, &[]);
    let out = Command::new(ftvm())
        .args([
            "ft",
            "--vm",
            other.vm.to_str().unwrap(),
            "--as",
            "backup",
            "--log",
            &format!("127.0.0.1:{log}"),
        ])
        .args(["--tiebreak", &pair.tb, "--wait-ms", "5000"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(127));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("configuration hash differs"), "{err}");
}

#[test]
fn a_backup_that_comes_late_is_refused_at_once_with_the_reason() {
    let pair = Pair::new(40, 100);
    let log = free_port();
    let (mut primary, mut backup) = pair.running(log, 3);
    // The handshake timeout is 5 s: a refusal must come well before it.
    let mut second = pair.start("c", "backup", log, &[]);
    second.expect_exit(127, Duration::from_secs(3));
    assert!(
        second.stderr().contains("already has its backup"),
        "{}",
        second.stderr()
    );

    backup.signal(libc::SIGKILL);
    backup.wait(Duration::from_secs(5));
    wait_until(Duration::from_secs(10), || {
        primary.stderr().contains("going on alone")
    });
    let mut late = pair.start("d", "backup", log, &[]);
    late.expect_exit(127, Duration::from_secs(3));
    let err = late.stderr();
    assert!(
        err.contains("runs sleeper alone in epoch 2") && err.contains("cloning"),
        "{err}"
    );

    primary.expect_exit(0, Duration::from_secs(30));
    assert_eq!(
        iterations(&primary.stdout()),
        (0..40).collect::<Vec<_>>(),
        "the primary went on undisturbed"
    );
    assert_eq!(
        pair.claims(),
        vec!["epoch-00000000000000000001", "epoch-00000000000000000002"],
        "refused backups claim nothing"
    );
}

#[test]
fn a_second_pair_of_a_running_vm_never_makes_two_primaries() {
    let pair = Pair::new(60, 100);
    second_pair_never_makes_two_primaries(&pair, &|| {
        let claims = pair.claims();
        claims.last().map(|c| c["epoch-".len()..].parse().unwrap())
    });
    // Every claim there is: the refused starts made none.
    assert_eq!(
        pair.claims(),
        vec!["epoch-00000000000000000001", "epoch-00000000000000000002"]
    );
}

/// The same with etcd, whose beats renew a lease rather than rewrite the record.
#[test]
fn a_second_pair_of_a_running_vm_never_makes_two_primaries_with_etcd() {
    let etcd = Etcd::start();
    let pair = Pair::with_tiebreak(60, 100, Some(format!("etcd:{}", etcd.url)));
    let tb = ftvm_tiebreak::EtcdTiebreaker::new(&[etcd.url.as_str()]).unwrap();
    second_pair_never_makes_two_primaries(&pair, &|| {
        use ftvm_tiebreak::TestAndSet as _;
        tb.current("sleeper").unwrap().map(|(epoch, _)| epoch)
    });
}

/// A second pair is refused beside a running one, and starts beside one that stands still,
/// which then halts without emitting. `newest` is the newest epoch claimed.
fn second_pair_never_makes_two_primaries(pair: &Pair, newest: &dyn Fn() -> Option<u64>) {
    let log = free_port();
    let (mut primary, mut backup) = pair.running(log, 3);
    // The same log address: refused before it claims anything.
    let mut twin = pair.start("t", "primary", log, &[]);
    twin.expect_exit(2, Duration::from_secs(5));
    assert!(twin.stderr().contains("cannot listen"), "{}", twin.stderr());
    // Another address: the running primary's beats keep the new one from claiming.
    let mut second = pair.start("c", "primary", free_port(), &[]);
    second.expect_exit(127, Duration::from_secs(10));
    assert!(
        second
            .stderr()
            .contains("sleeper is running: its primary a (epoch 1) is alive"),
        "{}",
        second.stderr()
    );
    assert_eq!(newest(), Some(1), "the refused pairs claimed nothing");

    // A pair that stands still (both paused) beats no more: a new pair starts and claims epoch
    // 2; when the old pair wakes up, both of its replicas halt, and only the new pair emits.
    primary.signal(libc::SIGSTOP);
    backup.signal(libc::SIGSTOP);
    let log2 = free_port();
    let mut third = pair.start("e", "primary", log2, &[]);
    let mut third_backup = pair.start("f", "backup", log2, &[]);
    wait_until(Duration::from_secs(10), || {
        third.stderr().contains("at epoch 2")
    });
    let printed = primary.stdout();
    primary.signal(libc::SIGCONT);
    backup.signal(libc::SIGCONT);
    primary.expect_exit(127, Duration::from_secs(5));
    backup.expect_exit(127, Duration::from_secs(10));
    assert!(!backup.stderr().contains("LIVE"), "{}", backup.stderr());
    assert_eq!(
        primary.stdout(),
        printed,
        "the deposed primary printed nothing more"
    );
    third.expect_exit(0, Duration::from_secs(30));
    third_backup.expect_exit(0, Duration::from_secs(30));
    assert_eq!(newest(), Some(2));
}

#[test]
fn no_pair_starts_beside_a_backup_that_went_live_and_one_starts_at_once_after_it_ended() {
    // 6 s of guest: the backup must still run when the second start's 2.5 s watch ends.
    let pair = Pair::new(60, 100);
    let log = free_port();
    let (mut primary, mut backup) = pair.running(log, 3);
    primary.signal(libc::SIGKILL);
    primary.wait(Duration::from_secs(5));
    wait_until(Duration::from_secs(10), || backup.stderr().contains("LIVE"));
    let mut second = pair.start("c", "primary", free_port(), &[]);
    second.expect_exit(127, Duration::from_secs(10));
    assert!(
        second.stderr().contains("its primary b (epoch 2) is alive"),
        "{}",
        second.stderr()
    );
    backup.expect_exit(0, Duration::from_secs(30));
    // Its last beat says it stopped: the next pair need not wait for beats.
    let log2 = free_port();
    let mut third = pair.start("e", "primary", log2, &[]);
    let mut third_backup = pair.start("f", "backup", log2, &[]);
    third.expect_exit(0, Duration::from_secs(30));
    third_backup.expect_exit(0, Duration::from_secs(30));
    assert!(
        !third.stderr().contains("watching for its beats"),
        "{}",
        third.stderr()
    );
    assert_eq!(
        pair.claims(),
        vec![
            "epoch-00000000000000000001",
            "epoch-00000000000000000002",
            "epoch-00000000000000000003"
        ]
    );
}

#[test]
fn a_backup_that_went_live_and_stood_still_halts_silently_when_it_finds_a_newer_pair() {
    // A line every 2 ms: a replica that resumed and emitted before it checked would print some.
    let pair = Pair::new(3000, 2);
    let log = free_port();
    let mut primary = pair.start("a", "primary", log, &[]);
    // Its epoch watch checks once a minute: what keeps it silent is its tenure, which a pause
    // outlasts: it must ask the tiebreaker before its next output.
    let mut backup = pair.start("b", "backup", log, &["--epoch-check-ms", "60000"]);
    wait_until(Duration::from_secs(20), || {
        iterations(&primary.stdout()).len() >= 3
    });
    primary.signal(libc::SIGKILL);
    primary.wait(Duration::from_secs(5));
    wait_until(Duration::from_secs(10), || backup.stderr().contains("LIVE"));
    // Paused, it beats no more: a new pair starts after watching for 2.5 s.
    backup.signal(libc::SIGSTOP);
    let log2 = free_port();
    let mut second = pair.start("c", "primary", log2, &[]);
    let mut second_backup = pair.start("d", "backup", log2, &[]);
    wait_until(Duration::from_secs(10), || {
        second.stderr().contains("at epoch 3")
    });
    let before = backup.stdout();
    backup.signal(libc::SIGCONT);
    // It finds epoch 3 held by another owner before it emits anything.
    backup.expect_exit(127, Duration::from_secs(5));
    assert!(
        backup.stderr().contains(
            "epoch 3 of sleeper was claimed by c while this replica ran as its primary in epoch 2"
        ),
        "{}",
        backup.stderr()
    );
    assert_eq!(
        backup.stdout(),
        before,
        "the replica that went live emitted output after it resumed, beside a newer pair"
    );
    second.expect_exit(0, Duration::from_secs(30));
    second_backup.expect_exit(0, Duration::from_secs(30));
}

#[test]
fn a_backup_that_went_live_cut_off_from_the_tiebreaker_goes_quiet_before_a_newer_pair_runs() {
    alone_and_cut_off_from_the_tiebreaker(Survivor::Backup);
}

#[test]
fn a_primary_gone_on_alone_cut_off_from_the_tiebreaker_goes_quiet_before_a_newer_pair_runs() {
    alone_and_cut_off_from_the_tiebreaker(Survivor::Primary);
}

#[test]
fn a_pair_cut_off_from_the_tiebreaker_halts_when_it_finds_a_newer_pair() {
    // The case the tenure leaves to the epoch watch: a running pair (its outputs acked, so not
    // held) loses sight of the tiebreaker, and a second pair of its VM is started meanwhile.
    // Once the first can ask again, its primary's watch finds the newer epoch and halts it;
    // its backup, left alone, cannot win the next epoch and halts too.
    let CutOff {
        store: _store, // kept to the end: the store's directory
        tb,
        view,
        first,
        second,
    } = CutOff::new();
    let log = free_port();
    let (mut primary, mut backup) = first.running(log, 3);
    std::fs::remove_file(&view).unwrap();
    let log2 = free_port();
    let mut c = second.start("c", "primary", log2, &[]);
    let mut d = second.start("d", "backup", log2, &[]);
    wait_until(Duration::from_secs(15), || {
        c.stderr().contains("at epoch 2")
    });
    std::os::unix::fs::symlink(&tb, &view).unwrap();
    primary.expect_exit(127, Duration::from_secs(10));
    assert!(
        primary
            .stderr()
            .contains("epoch 2 of sleeper was claimed by c while this replica ran"),
        "{}",
        primary.stderr()
    );
    backup.expect_exit(127, Duration::from_secs(10));
    c.expect_exit(0, Duration::from_secs(30));
    d.expect_exit(0, Duration::from_secs(30));
}

/// One directory store that a first pair sees through a symbolic link (remove `view` to cut
/// the pair off from it, link it again to let it back) and a second pair sees directly. The
/// first pair's guest prints a line every 2 ms for 12 s.
struct CutOff {
    store: tempfile::TempDir,
    tb: PathBuf,
    view: PathBuf,
    first: Pair,
    second: Pair,
}

impl CutOff {
    fn new() -> CutOff {
        let store = tempfile::tempdir().unwrap();
        let tb = store.path().join("tb");
        let view = store.path().join("view");
        std::fs::create_dir(&tb).unwrap();
        std::os::unix::fs::symlink(&tb, &view).unwrap();
        let first = Pair::with_tiebreak(6000, 2, Some(format!("dir:{}", view.display())));
        let second = Pair::with_tiebreak(200, 2, Some(format!("dir:{}", tb.display())));
        CutOff {
            store,
            tb,
            view,
            first,
            second,
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Survivor {
    Primary,
    Backup,
}

/// One replica of a pair runs alone (the other was killed) when it loses sight of the
/// tiebreaker, and a second pair of its VM starts (an operator's mistake): the first emits
/// nothing once the second has claimed, and halts when it can ask again.
fn alone_and_cut_off_from_the_tiebreaker(survivor: Survivor) {
    // One store, which the first pair sees through a symbolic link that the test removes. The
    // survivor's beats stop with it, so the second pair starts after watching them for 2.5 s.
    let CutOff {
        store,
        tb,
        view,
        first,
        second,
    } = CutOff::new();
    let log = free_port();
    let files = ["a", "b"].map(|n| store.path().join(format!("{n}.json")));
    let with_status = |i: usize| ["--status-file", files[i].to_str().unwrap()];
    let primary = first.start("a", "primary", log, &with_status(0));
    let backup = first.start("b", "backup", log, &with_status(1));
    wait_until(Duration::from_secs(20), || {
        iterations(&primary.stdout()).len() >= 3
    });
    let (mut dead, mut alone, alone_msg, status_file) = match survivor {
        Survivor::Backup => (primary, backup, "LIVE", &files[1]),
        Survivor::Primary => (backup, primary, "going on alone", &files[0]),
    };
    let status = || status_text(status_file);
    dead.signal(libc::SIGKILL);
    dead.wait(Duration::from_secs(5));
    wait_until(Duration::from_secs(10), || {
        alone.stderr().contains(alone_msg)
    });
    let printed = iterations(&alone.stdout()).len();
    wait_until(Duration::from_secs(10), || {
        iterations(&alone.stdout()).len() > printed + 100
    });
    std::fs::remove_file(&view).unwrap();
    let log2 = free_port();
    let mut c = second.start("c", "primary", log2, &[]);
    let mut d = second.start("d", "backup", log2, &[]);
    wait_until(Duration::from_secs(15), || {
        c.stderr().contains("at epoch 3")
    });
    // From the new pair's claim on, the first is silent: its tenure ran out before.
    let at_claim = alone.stdout();
    assert!(
        alone
            .stderr()
            .contains("holding outputs: cannot confirm epoch 2"),
        "{}",
        alone.stderr()
    );
    // Its status says why it is quiet.
    wait_until(Duration::from_secs(5), || {
        status().contains("outputs held until the tiebreaker answers")
    });
    wait_until(Duration::from_secs(15), || {
        iterations(&c.stdout()).len() >= 100
    });
    assert_eq!(
        alone.stdout(),
        at_claim,
        "the replica cut off from the tiebreaker emitted beside the newer pair"
    );
    // Back in touch, it finds the newer epoch and halts, still silent.
    std::os::unix::fs::symlink(&tb, &view).unwrap();
    alone.expect_exit(127, Duration::from_secs(10));
    assert!(
        alone
            .stderr()
            .contains("epoch 3 of sleeper was claimed by c while this replica ran"),
        "{}",
        alone.stderr()
    );
    assert_eq!(alone.stdout(), at_claim);
    c.expect_exit(0, Duration::from_secs(30));
    d.expect_exit(0, Duration::from_secs(30));
}

/// An `fsx` pair that ran to its end: the replicas and their exit codes.
struct FsxPair {
    primary: Proc,
    primary_code: i32,
    backup: Proc,
    backup_code: i32,
    _dir: tempfile::TempDir,
}

/// Runs `fsx ARGS` (a TOML list) as a pair whose replicas' disks are `a` and `b` (both empty at
/// the start), until both have exited.
fn fsx_pair(args: &str, a: &std::path::Path, b: &std::path::Path) -> FsxPair {
    let dir = tempfile::tempdir().unwrap();
    let vm = dir.path().join("fsx.toml");
    std::fs::write(
        &vm,
        format!(
            "name = \"fsx\"\nmodule = \"{}\"\nargs = {args}\n[[disk]]\nhost = \"unused\"\nguest = \"/data\"\n",
            guest("fsx").display()
        ),
    )
    .unwrap();
    let log = free_port();
    let tb = format!("dir:{}", dir.path().join("tb").display());
    let start = |name: &str, role: &str, disk: &std::path::Path| {
        let mut cmd = Command::new(ftvm());
        cmd.args(["ft", "--vm", vm.to_str().unwrap(), "--as", role])
            .args(["--log", &format!("127.0.0.1:{log}"), "--tiebreak", &tb])
            .args(["--owner", name, "--wait-ms", "10000"])
            .args(["--disk", &format!("{}::/data", disk.display())]);
        Proc::spawn(&mut cmd, dir.path(), name)
    };
    let mut primary = start("a", "primary", a);
    let mut backup = start("b", "backup", b);
    let primary_code = primary.wait(Duration::from_secs(60));
    let backup_code = backup.wait(Duration::from_secs(60));
    FsxPair {
        primary,
        primary_code,
        backup,
        backup_code,
        _dir: dir,
    }
}

#[test]
fn a_full_disk_on_one_replica_is_mirrored_or_stops_that_replica() {
    // The replicas have disks of their own (the paper's non-shared disk). What the primary's
    // disk did not do (a write refused or cut short by a full disk) is in the log, and the
    // backup does the same, whatever its own disk could do: the disks stay alike and the pair
    // goes on. A backup whose disk fails where the primary's did not cannot follow: it stops
    // at that operation and never goes live; the primary goes on alone.
    let full = Tmpfs::mount(4 << 10);
    let roomy = tempfile::tempdir().unwrap();
    let run = fsx_pair(r#"["/data"]"#, full.path(), roomy.path());
    let (primary, backup) = (&run.primary, &run.backup);
    let out = primary.stdout();
    assert!(out.contains("ENOSPC"), "{out}");
    let failures: i32 = out
        .split("fsx: failures=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("fsx reports its failures");
    assert!(failures > 0, "{out}");
    assert_eq!(run.primary_code, failures.min(100), "{}", primary.stderr());
    assert_eq!(run.backup_code, run.primary_code, "{}", backup.stderr());
    assert!(
        backup.stderr().contains("(replayed)"),
        "{}",
        backup.stderr()
    );
    assert_eq!(
        read_tree(roomy.path()),
        read_tree(full.path()),
        "the backup's roomy disk holds exactly what the primary's full one does"
    );
    // A write the full disk cut short: the guest is told so, and the backup writes as much.
    let full = Tmpfs::mount(256 << 10);
    let roomy = tempfile::tempdir().unwrap();
    let run = fsx_pair(r#"["/data", "fill"]"#, full.path(), roomy.path());
    let out = run.primary.stdout();
    let short = out.lines().any(|l| {
        l.strip_prefix("fill: write ")
            .and_then(|r| r.split_once(": "))
            .and_then(|(_, n)| n.strip_suffix(" bytes"))
            .and_then(|n| n.parse::<u32>().ok())
            .is_some_and(|n| n < 100_000)
    });
    assert!(short && out.contains("ENOSPC"), "{out}");
    assert_eq!(run.primary_code, 0, "{}", run.primary.stderr());
    assert_eq!(run.backup_code, 0, "{}", run.backup.stderr());
    assert_eq!(read_tree(roomy.path()), read_tree(full.path()));

    let roomy = tempfile::tempdir().unwrap();
    let full = Tmpfs::mount(4 << 10);
    let run = fsx_pair(r#"["/data"]"#, roomy.path(), full.path());
    let (primary, backup) = (&run.primary, &run.backup);
    assert_eq!(run.primary_code, 0, "{}", primary.stderr());
    assert!(
        primary.stdout().contains("fsx: failures=0"),
        "{}",
        primary.stdout()
    );
    assert_eq!(run.backup_code, 122, "{}", backup.stderr());
    let err = backup.stderr();
    assert!(
        err.contains("bytes here (ENOSPC)") && err.contains("the replicas' disks differ"),
        "{err}"
    );
    assert!(!err.contains("LIVE"), "{err}");
}

/// The soak: many kill rounds, a fresh pair each, with both tiebreakers. Console lines never
/// repeat or reorder across a failover, and the guest always finishes.
fn kill_rounds(rounds: usize, tiebreak: impl Fn(usize) -> Option<String>) {
    for round in 0..rounds {
        let pair = Pair::with_tiebreak(12, 15, tiebreak(round));
        let log = free_port();
        let mut primary = pair.start("a", "primary", log, &[]);
        let mut backup = pair.start("b", "backup", log, &[]);
        let kill_after = 1 + round % 6;
        wait_until(Duration::from_secs(20), || {
            iterations(&primary.stdout()).len() >= kill_after
        });
        primary.signal(libc::SIGKILL);
        primary.wait(Duration::from_secs(5));
        assert_eq!(
            backup.wait(Duration::from_secs(30)),
            0,
            "round {round}: {}",
            backup.stderr()
        );
        let mut seen = iterations(&primary.stdout());
        seen.extend(iterations(&backup.stdout()));
        assert_in_order_no_duplicates(&seen);
        assert!(
            seen.len() >= 11,
            "round {round}: lost more than one line: {seen:?}"
        );
        assert!(backup.stdout().contains("sleeper: done"), "round {round}");
    }
}

#[test]
fn kill_rounds_with_the_shared_directory_tiebreaker() {
    kill_rounds(if soak() { 50 } else { 5 }, |_| None);
}

#[test]
fn kill_rounds_with_the_etcd_tiebreaker() {
    let etcd = Etcd::start();
    // One etcd for all rounds and one VM name: each new pair claims the epoch after the last
    // round's, as pairs in a real cluster would.
    kill_rounds(if soak() { 50 } else { 5 }, |_| {
        Some(format!("etcd:{}", etcd.url))
    });
}

#[test]
fn a_lagging_backup_slows_the_primary_down() {
    let pair = Pair::new(300, 2);
    let log = free_port();
    let status = pair.dir.path().join("a.json");
    let mut primary = pair.start(
        "a",
        "primary",
        log,
        &["--status-file", status.to_str().unwrap()],
    );
    let mut backup = pair.start("b", "backup", log, &["--slow-replay-us", "4000"]);
    let mut max_slowdown = 0;
    let mut max_lag = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while primary
        .child
        .as_mut()
        .unwrap()
        .try_wait()
        .unwrap()
        .is_none()
    {
        assert!(Instant::now() < deadline, "primary did not finish");
        let v = status_json(&status);
        max_slowdown = max_slowdown.max(v["slowdown_permille"].as_u64().unwrap_or(0));
        max_lag = max_lag.max(v["lag_ms"].as_u64().unwrap_or(0));
        std::thread::sleep(Duration::from_millis(50));
    }
    primary.expect_exit(0, Duration::from_secs(1));
    backup.expect_exit(0, Duration::from_secs(60));
    assert!(
        max_lag > 100,
        "the backup was made to lag past the 100 ms target (saw {max_lag} ms)"
    );
    assert!(
        max_slowdown > 0,
        "the primary was slowed down (lag {max_lag} ms, slowdown {max_slowdown}‰)"
    );
}

#[test]
fn status_tells_a_running_replica_from_its_last_word() {
    // 4 s of guest: time enough to see it running, even on a loaded machine.
    let pair = Pair::new(40, 100);
    let log = free_port();
    let file = pair.dir.path().join("a.json");
    let mut primary = pair.start(
        "a",
        "primary",
        log,
        &["--status-file", file.to_str().unwrap()],
    );
    let mut backup = pair.start("b", "backup", log, &[]);
    let show = || status_text(&file);
    let pid = primary.pid();
    let running = format!("process       {pid} (running, written ");
    wait_until(Duration::from_secs(20), || show().contains(&running));
    let text = show();
    assert!(text.contains("role          primary"), "{text}");
    assert!(text.contains("tiebreaker    epoch confirmed"), "{text}");
    assert!(!text.contains("outputs held until"), "{text}");
    // Loopback is a direct connection: the backup's host acknowledges the log, and the primary
    // sees it do so.
    wait_until(Duration::from_secs(10), || {
        status_json(&file)["host_acked_seq"].as_u64().unwrap_or(0) > 0
    });
    let text = show();
    assert!(
        text.contains("host acks     on: outputs leave once the backup's host has the log (seq "),
        "{text}"
    );
    primary.expect_exit(0, Duration::from_secs(30));
    backup.expect_exit(0, Duration::from_secs(30));
    let text = show();
    assert!(text.contains("role          primary"), "{text}");
    assert!(
        text.contains(&format!(
            "process       {pid} (gone: this is the replica's last status"
        )),
        "{text}"
    );
}

#[test]
fn a_backup_that_went_live_keeps_its_status_current() {
    // 6 s of guest: it runs on for seconds after the failover.
    let pair = Pair::new(60, 100);
    let log = free_port();
    let file = pair.dir.path().join("b.json");
    let mut primary = pair.start("a", "primary", log, &[]);
    let mut backup = pair.start(
        "b",
        "backup",
        log,
        &["--status-file", file.to_str().unwrap()],
    );
    wait_until(Duration::from_secs(20), || {
        iterations(&primary.stdout()).len() >= 3
    });
    primary.signal(libc::SIGKILL);
    primary.wait(Duration::from_secs(5));
    let status = || status_json(&file);
    wait_until(Duration::from_secs(10), || {
        status()["role"] == "primary (alone, went live)"
    });
    let first = status()["updated_ms"].as_u64().unwrap();
    // Rewritten while it runs (it was written once, at the go-live, before).
    wait_until(Duration::from_secs(5), || {
        status()["updated_ms"].as_u64().unwrap_or(0) > first
    });
    assert_eq!(status()["epoch"], 2);
    backup.expect_exit(0, Duration::from_secs(30));
}

/// What `ftvm status` says of a replica's status file.
fn status_text(file: &std::path::Path) -> String {
    String::from_utf8_lossy(&run(&["status", file.to_str().unwrap()]).stdout).into_owned()
}

/// The nice value of a replica's VM thread (its main thread), from /proc.
fn vm_thread_nice(pid: i32) -> Option<i64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/stat")).ok()?;
    // Fields after the command name in parentheses: state is field 3, nice field 19.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(16)?.parse().ok()
}

/// The voluntary context switches so far of the thread named `name` in process `pid`.
fn thread_sleeps(pid: i32, name: &str) -> u64 {
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = task.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let status = std::fs::read_to_string(dir.join("status")).unwrap();
        let line = status
            .lines()
            .find(|l| l.starts_with("voluntary_ctxt_switches:"))
            .unwrap();
        return line.split_whitespace().nth(1).unwrap().parse().unwrap();
    }
    panic!("process {pid} has no thread {name}");
}

#[test]
fn the_drivers_sleep_between_deadlines_instead_of_ticking() {
    // A guest that prints a line every 100 ms and sleeps in between (the lines are outputs, the
    // clock reads records): 6 s of it. The drivers used to wake every 5 ms (200 times a second);
    // now they sleep until their link's next deadline (heartbeats every 50 ms, the backup's
    // progress acks every 10 ms while replay moves), at most 25 ms.
    let pair = Pair::new(60, 100);
    let log = free_port();
    let (mut primary, mut backup) = pair.running(log, 5);
    let pids = [("primary", primary.pid()), ("backup", backup.pid())];
    let before = pids.map(|(_, pid)| thread_sleeps(pid, "ftvm-driver"));
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    for ((role, pid), before) in pids.into_iter().zip(before) {
        let wakes = thread_sleeps(pid, "ftvm-driver") - before;
        let per_s = wakes as f64 / started.elapsed().as_secs_f64();
        eprintln!("the {role}'s driver woke {per_s:.0} times a second");
        assert!(
            per_s < 100.0,
            "the {role}'s driver woke {per_s:.0} times a second"
        );
    }
    // And the pair works as before: every line, in order, and a clean end on both sides.
    primary.expect_exit(0, Duration::from_secs(30));
    backup.expect_exit(0, Duration::from_secs(30));
    let seen = iterations(&primary.stdout());
    assert_eq!(seen.len(), 60, "{seen:?}");
    assert_in_order_no_duplicates(&seen);
}
