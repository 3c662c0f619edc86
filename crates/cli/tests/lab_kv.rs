//! The VM's network in the lab: the KV guest behind a TAP device, real clients (`ping`,
//! `redis-cli`, `redis-benchmark`) in another namespace; record/replay of a network session; bulk
//! data through the echo guest with loss, duplication and reordering injected at the attachment.

mod common;
mod lab;

use std::io::{Read, Write};
use std::sync::Mutex;
use std::time::Duration;

use common::*;
use lab::*;

/// Lab tests share two cores: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn nic(lab: &Lab, extra: &str) -> String {
    format!("tap=tap0,mac={},ip={}/24{extra}", lab.vm_mac(), lab.vm_ip())
}

#[test]
fn kv_guest_answers_ping_redis_cli_and_redis_benchmark() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::up("ftk1", 10);
    lab.add_tap("host-a");
    let kv = guest("kv");
    let mut vm = lab.spawn(
        "host-a",
        &ftvm(),
        &[
            "run",
            "--nic",
            &nic(&lab, ""),
            "--listen",
            "6379",
            kv.to_str().unwrap(),
        ],
        dir.path(),
        "vm",
    );
    let addr = format!("{}:6379", lab.vm_ip());
    let a2 = addr.clone();
    assert_eq!(
        in_netns(&lab.ns("client"), move || command(&a2, &["PING"]))
            .join()
            .unwrap(),
        "+PONG\r\n"
    );

    let ping = lab
        .cmd("client", "ping".as_ref())
        .args(["-c", "3", "-i", "0.2", "-W", "2", &lab.vm_ip()])
        .output()
        .unwrap();
    assert!(
        ping.status.success(),
        "ping: {}",
        String::from_utf8_lossy(&ping.stdout)
    );
    assert!(String::from_utf8_lossy(&ping.stdout).contains("3 received"));

    let cli = |args: &[&str]| {
        let out = lab
            .cmd("client", "redis-cli".as_ref())
            .args(["-h", &lab.vm_ip()])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(cli(&["SET", "lab", "works"]), "OK");
    assert_eq!(cli(&["GET", "lab"]), "works");
    assert_eq!(cli(&["INCRBY", "n", "41"]), "41");
    assert_eq!(cli(&["INCR", "n"]), "42");
    assert_eq!(cli(&["DEL", "lab", "n", "missing"]), "2");

    let n = if soak() { "200000" } else { "50000" };
    for pipeline in ["1", "16"] {
        let out = lab
            .cmd("client", "redis-benchmark".as_ref())
            .args([
                "-h",
                &lab.vm_ip(),
                "-t",
                "ping,set,get,incr",
                "-n",
                n,
                "-c",
                "50",
                "-P",
                pipeline,
                "-q",
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "redis-benchmark -P {pipeline}: {text}"
        );
        let finals: Vec<&str> = text
            .split(['\r', '\n'])
            .filter(|l| l.contains("requests per second"))
            .collect();
        assert!(
            finals.len() >= 5,
            "every test finished (-P {pipeline}): {finals:?}"
        );
        assert!(
            !text.to_lowercase().contains("error"),
            "errors under -P {pipeline}: {text}"
        );
    }
    vm.signal(libc::SIGTERM);
    vm.expect_exit(0, Duration::from_secs(10));
}

#[test]
fn a_recorded_network_session_replays_identically() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::up("ftk2", 11);
    lab.add_tap("host-a");
    let kv = guest("kv");
    let log = dir.path().join("kv.log");
    let mut vm = lab.spawn(
        "host-a",
        &ftvm(),
        &[
            "run",
            "--record",
            log.to_str().unwrap(),
            "--checkpoint-events",
            "512",
            "--nic",
            &nic(&lab, ""),
            "--listen",
            "6379",
            kv.to_str().unwrap(),
        ],
        dir.path(),
        "vm",
    );
    let addr = format!("{}:6379", lab.vm_ip());
    let a2 = addr.clone();
    assert_eq!(
        in_netns(&lab.ns("client"), move || command(&a2, &["PING"]))
            .join()
            .unwrap(),
        "+PONG\r\n"
    );
    let out = lab
        .cmd("client", "redis-benchmark".as_ref())
        .args([
            "-h",
            &lab.vm_ip(),
            "-t",
            "set,get,incr",
            "-n",
            "20000",
            "-c",
            "20",
            "-q",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    vm.signal(libc::SIGTERM);
    vm.expect_exit(0, Duration::from_secs(10));

    // Replay: no network at all, the frames come from the log; every checkpoint (output digest
    // of every frame sent, VM state hash) must match.
    let replay = run(&[
        "replay",
        log.to_str().unwrap(),
        "--quiet",
        kv.to_str().unwrap(),
    ]);
    assert_eq!(code(&replay), 0, "{}", stderr(&replay));
    let inspect = run(&["inspect", log.to_str().unwrap(), "--entries", "0"]);
    let summary = String::from_utf8_lossy(&inspect.stdout);
    let checkpoints: u64 = summary
        .lines()
        .find(|l| l.trim_start().starts_with("checkpoint"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        checkpoints > 10,
        "the session was checked at many points, not just the end: {summary}"
    );
}

#[test]
fn bulk_data_through_the_echo_guest_survives_loss_duplication_and_reordering() {
    echo_stream("ftk3", 12, ",fault=drop=0.05;dup=0.01;reorder=0.01;seed=11");
}

#[test]
fn bulk_data_through_the_echo_guest_survives_duplication_and_reordering() {
    echo_stream("ftk4", 13, ",fault=dup=0.01;reorder=0.01;seed=11");
}

fn echo_stream(name: &str, subnet: u8, faults: &str) {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::up(name, subnet);
    lab.add_tap("host-a");
    let echo = guest("echo");
    let mut vm = lab.spawn(
        "host-a",
        &ftvm(),
        &[
            "run",
            "--nic",
            &nic(&lab, faults),
            "--listen",
            "7000",
            echo.to_str().unwrap(),
        ],
        dir.path(),
        "vm",
    );
    let total: u64 = if soak() { 1 << 30 } else { 32 << 20 };
    let addr = format!("{}:7000", lab.vm_ip());
    let result = in_netns(&lab.ns("client"), move || {
        let stream = connect_retry(&addr, std::time::Duration::from_secs(10)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut writer = stream.try_clone().unwrap();
        let sender = std::thread::spawn(move || {
            let mut h = blake3::Hasher::new();
            let mut x: u64 = 0x1234_5678;
            let mut chunk = vec![0u8; 64 << 10];
            let mut sent = 0u64;
            while sent < total {
                for b in chunk.iter_mut() {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *b = x as u8;
                }
                writer.write_all(&chunk).unwrap();
                h.update(&chunk);
                sent += chunk.len() as u64;
            }
            h.finalize()
        });
        let mut reader = stream;
        let mut h = blake3::Hasher::new();
        let mut got = 0u64;
        let mut buf = vec![0u8; 256 << 10];
        let start = std::time::Instant::now();
        while got < total {
            let n = reader.read(&mut buf).unwrap();
            assert!(n > 0, "the echo connection closed after {got} bytes");
            h.update(&buf[..n]);
            got += n as u64;
        }
        (sender.join().unwrap(), h.finalize(), got, start.elapsed())
    })
    .join()
    .unwrap();
    let (sent_hash, got_hash, got, elapsed) = result;
    assert_eq!(got, total);
    assert_eq!(
        sent_hash, got_hash,
        "the echoed bytes differ from what was sent"
    );
    eprintln!(
        "echo: {} MiB both ways in {:.1} s with faults {faults}",
        total >> 20,
        elapsed.as_secs_f64()
    );
    vm.signal(libc::SIGTERM);
    vm.expect_exit(0, Duration::from_secs(10));
}
