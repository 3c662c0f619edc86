//! User-mode networking end to end, without root: `ftvm run --nic user,hostfwd=HOSTPORT:GUESTPORT`
//! with the real guests, reached over loopback by plain sockets and `redis-cli`; a recorded
//! user-mode session replays; bad options fail with a clear message and exit code.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

fn spawn_ftvm(args: &[&str], dir: &Path, tag: &str) -> Proc {
    Proc::spawn(Command::new(ftvm()).args(args), dir, tag)
}

/// A VM with a user-mode NIC forwarding 127.0.0.1:`port` to `guest_port`.
fn start_vm(guest_name: &str, port: u16, guest_port: u16, extra: &[&str], dir: &Path) -> Proc {
    let nic = format!("user,hostfwd={port}:{guest_port}");
    let g = guest(guest_name);
    let listen = guest_port.to_string();
    let mut args = vec!["run"];
    args.extend_from_slice(extra);
    args.extend(["--nic", &nic, "--listen", &listen, g.to_str().unwrap()]);
    let vm = spawn_ftvm(&args, dir, guest_name);
    let said = format!("forwarding 127.0.0.1:{port} -> port {guest_port}");
    wait_until(Duration::from_secs(30), || vm.stderr().contains(&said));
    vm
}

/// Connects once ftvm listens on the host port (it binds before the VM boots).
fn connect(port: u16) -> TcpStream {
    let mut stream = None;
    wait_until(Duration::from_secs(30), || {
        stream = TcpStream::connect(("127.0.0.1", port)).ok();
        stream.is_some()
    });
    let s = stream.unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s
}

/// One RESP request (multibulk) and its reply, as text without the final CRLF.
fn resp(reader: &mut BufReader<TcpStream>, args: &[&str]) -> String {
    let mut req = format!("*{}\r\n", args.len());
    for a in args {
        req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    reader.get_mut().write_all(req.as_bytes()).unwrap();
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    if let Some(len) = line.strip_prefix('$') {
        let len: i64 = len.trim().parse().unwrap();
        if len >= 0 {
            let mut body = vec![0u8; len as usize + 2];
            reader.read_exact(&mut body).unwrap();
            line.push_str(&String::from_utf8_lossy(&body));
        }
    }
    line.trim_end_matches("\r\n").to_string()
}

fn stop(vm: &mut Proc) {
    vm.signal(libc::SIGTERM);
    vm.expect_exit(0, Duration::from_secs(20));
}

#[test]
fn kv_guest_answers_resp_and_redis_cli_through_a_forwarded_port() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut vm = start_vm("kv", port, 6379, &[], dir.path());

    let mut a = BufReader::new(connect(port));
    assert_eq!(resp(&mut a, &["PING"]), "+PONG");
    assert_eq!(resp(&mut a, &["SET", "greeting", "hello world"]), "+OK");
    assert_eq!(resp(&mut a, &["GET", "greeting"]), "$11\r\nhello world");
    assert_eq!(resp(&mut a, &["GET", "missing"]), "$-1");
    assert_eq!(resp(&mut a, &["INCR", "n"]), ":1");
    assert_eq!(resp(&mut a, &["INCRBY", "n", "41"]), ":42");
    // A second connection, open at the same time, sees the same store.
    let mut b = BufReader::new(connect(port));
    assert_eq!(resp(&mut b, &["INCR", "n"]), ":43");
    assert_eq!(resp(&mut a, &["GET", "n"]), "$2\r\n43");
    assert_eq!(resp(&mut b, &["DEL", "greeting", "missing"]), ":1");
    assert_eq!(resp(&mut a, &["EXISTS", "greeting"]), ":0");
    drop(b);
    // A value larger than one TCP window crosses intact.
    let big: String = (0..300_000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    assert_eq!(resp(&mut a, &["SET", "big", &big]), "+OK");
    assert_eq!(
        resp(&mut a, &["GET", "big"]),
        format!("${}\r\n{big}", big.len())
    );
    drop(a);

    if Command::new("redis-cli").arg("--version").output().is_ok() {
        let cli = |args: &[&str]| {
            let out = Command::new("redis-cli")
                .args(["-h", "127.0.0.1", "-p", &port.to_string()])
                .args(args)
                .output()
                .unwrap();
            assert!(out.status.success(), "redis-cli {args:?}: {out:?}");
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        };
        assert_eq!(cli(&["ping"]), "PONG");
        assert_eq!(cli(&["SET", "cli", "works"]), "OK");
        assert_eq!(cli(&["GET", "cli"]), "works");
        assert_eq!(cli(&["INCR", "n"]), "44");
    } else {
        eprintln!("redis-cli is not installed: skipping its part (scripts/setup.sh installs it)");
    }
    stop(&mut vm);
    assert!(vm.stdout().contains("kv: listening"), "{}", vm.stdout());
}

/// Streams `total` pseudo-random bytes through the echo guest on one connection, then half-closes;
/// returns once the echo (and the guest's FIN) came back, checking length and BLAKE3 hash.
fn echo_round_trip(port: u16, total: usize, seed: u64) {
    let stream = connect(port);
    let mut writer = stream.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let mut h = blake3::Hasher::new();
        let mut x = seed | 1;
        let mut chunk = vec![0u8; 64 << 10];
        let mut sent = 0;
        while sent < total {
            let n = chunk.len().min(total - sent);
            for b in chunk[..n].iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            writer.write_all(&chunk[..n]).unwrap();
            h.update(&chunk[..n]);
            sent += n;
        }
        // Our FIN goes to the guest, which closes once everything is echoed.
        writer.shutdown(Shutdown::Write).unwrap();
        h.finalize()
    });
    let mut reader = stream;
    let mut h = blake3::Hasher::new();
    let mut got = 0;
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => panic!("echo read after {got} bytes: {e}"),
        };
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        got += n;
    }
    let sent_hash = sender.join().unwrap();
    assert_eq!(got, total, "bytes echoed before the guest's FIN");
    assert_eq!(
        h.finalize(),
        sent_hash,
        "the echo differs from what was sent"
    );
}

#[test]
fn echo_guest_round_trips_mebibytes_and_passes_half_closes_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut vm = start_vm("echo", port, 7000, &[], dir.path());
    echo_round_trip(port, 6 << 20, 0x1234_5678);
    // Two at once, after the first one ended.
    let other = std::thread::spawn(move || echo_round_trip(port, 1 << 20, 99));
    echo_round_trip(port, 1 << 20, 7);
    other.join().unwrap();
    stop(&mut vm);
}

#[test]
fn a_recorded_user_mode_session_replays_identically() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let log = dir.path().join("echo.log");
    let mut vm = start_vm(
        "echo",
        port,
        7000,
        &[
            "--record",
            log.to_str().unwrap(),
            // Few events carry many frames (up to 64 per wake-up): check often.
            "--checkpoint-events",
            "4",
        ],
        dir.path(),
    );
    echo_round_trip(port, 2 << 20, 0xfeed);
    stop(&mut vm);
    let recorded = vm.stdout();
    assert!(recorded.contains("echo: listening"), "{recorded}");

    // The session's frames are in the log, taken at gate points like TAP frames.
    let file = std::fs::File::open(&log).unwrap();
    let mut reader = ftvm_log::LogReader::open(std::io::BufReader::new(file)).unwrap();
    let (mut frames, mut bytes, mut checkpoints) = (0usize, 0usize, 0usize);
    while let Some((_, entry)) = reader.next_entry().unwrap() {
        match entry {
            ftvm_log::Entry::Input { frames: f, .. } => {
                frames += f.len();
                bytes += f.iter().map(Vec::len).sum::<usize>();
            }
            ftvm_log::Entry::Checkpoint(_) => checkpoints += 1,
            _ => {}
        }
    }
    assert!(
        bytes > 2 << 20,
        "the 2 MiB sent reached the VM through the log: {bytes} bytes in {frames} frames"
    );
    assert!(checkpoints > 5, "checked at many points: {checkpoints}");

    // Replay: no network at all; every checkpoint (output digest of every frame sent, state
    // hash) must match, and the console output is the same.
    let echo = guest("echo");
    let replay = run(&["replay", log.to_str().unwrap(), echo.to_str().unwrap()]);
    assert_eq!(code(&replay), 0, "{}", stderr(&replay));
    assert_eq!(String::from_utf8_lossy(&replay.stdout), recorded);
}

#[test]
fn bad_user_mode_options_fail_with_a_clear_message() {
    let kv = guest("kv");
    let kv = kv.to_str().unwrap();
    let port = free_port().to_string();
    let check = |nic: &str, listen: &str, want_code: i32, want: &str| {
        let out = run(&["run", "--nic", nic, "--listen", listen, kv]);
        let err = stderr(&out);
        assert_eq!(code(&out), want_code, "--nic {nic}: {err}");
        assert!(
            err.contains(want),
            "--nic {nic}: {err:?} does not say {want:?}"
        );
        assert!(!err.contains("panicked"), "--nic {nic}: {err}");
    };
    check(
        &format!("user,hostfwd={port}:6379,colour=red"),
        "6379",
        2,
        "unknown key \"colour\"",
    );
    check("user,hostfwd=99999:6379", "6379", 2, "not a TCP port");
    check("user,hostfwd=0:6379", "6379", 2, "not a TCP port");
    check(
        &format!("user,hostfwd={port}"),
        "6379",
        2,
        "HOSTPORT:GUESTPORT",
    );
    check("user", "6379", 2, "at least one hostfwd");
    check(
        &format!("user,hostfwd={port}:6380"),
        "6379",
        2,
        "does not listen on port 6380",
    );
    check(
        &format!("user,tap=tap0,hostfwd={port}:6379"),
        "6379",
        2,
        "cannot be combined",
    );
    // A host port another program holds.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap().port();
    check(
        &format!("user,hostfwd={busy}:6379"),
        "6379",
        125,
        &format!("cannot listen on 127.0.0.1:{busy}"),
    );
}
