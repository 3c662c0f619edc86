//! The etcd tiebreaker against a real etcd (Debian's `etcd-server`), one private server per test on
//! loopback with fresh ports and a temporary data directory.
//!
//! If `etcd` is not installed these tests fail (install it with `apt-get install -y etcd-server`),
//! unless `FTVM_SKIP_ETCD=1` is set, in which case they print "skipped" and return. `FTVM_ETCD_BIN`
//! names another etcd binary.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use ftvm_tiebreak::{EtcdTiebreaker, Outcome, TestAndSet};

/// How long a fresh single-node etcd may take to become healthy.
const ETCD_START_TIMEOUT: Duration = Duration::from_secs(30);

/// A private etcd server. Killed when dropped, including when the test panics.
struct EtcdServer {
    child: Child,
    client_url: String,
    log_path: PathBuf,
    _data: tempfile::TempDir,
}

impl EtcdServer {
    /// Starts a server, or returns `None` when the environment asks to skip etcd tests.
    fn start(test: &str) -> Option<EtcdServer> {
        if std::env::var("FTVM_SKIP_ETCD").as_deref() == Ok("1") {
            println!("{test}: skipped (FTVM_SKIP_ETCD=1)");
            return None;
        }
        let binary = etcd_binary().unwrap_or_else(|| {
            panic!(
                "etcd is not installed, so the etcd tiebreaker cannot be tested: install it with \
                 `apt-get install -y etcd-server` (or set FTVM_ETCD_BIN), or set FTVM_SKIP_ETCD=1 \
                 to skip these tests"
            )
        });
        // A port picked from a closed listener can be taken by someone else before etcd binds it;
        // then etcd exits at once and we try again with new ports.
        let mut last_failure = String::new();
        for _ in 0..3 {
            match Self::try_start(&binary) {
                Ok(server) => return Some(server),
                Err(why) => last_failure = why,
            }
        }
        panic!("{test}: could not start etcd: {last_failure}");
    }

    fn try_start(binary: &PathBuf) -> Result<EtcdServer, String> {
        let data = tempfile::tempdir().map_err(|e| format!("no temporary directory: {e}"))?;
        let (client_port, peer_port) = two_free_ports();
        let client_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let log_path = data.path().join("etcd.log");
        let log = std::fs::File::create(&log_path).map_err(|e| format!("no log file: {e}"))?;
        let mut command = Command::new(binary);
        command
            .args(["--name", "ftvm-test"])
            .arg("--data-dir")
            .arg(data.path().join("data"))
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("ftvm-test={peer_url}")])
            .args(["--initial-cluster-state", "new"])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        die_with_parent(&mut command);
        let child = command
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", binary.display()))?;
        let mut server = EtcdServer {
            child,
            client_url,
            log_path,
            _data: data,
        };
        server.wait_healthy()?;
        Ok(server)
    }

    /// Polls `/health` until etcd has a leader and answers, or it exits, or time runs out.
    fn wait_healthy(&mut self) -> Result<(), String> {
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_millis(500))
            .try_proxy_from_env(false)
            .build();
        let url = format!("{}/health", self.client_url);
        let deadline = Instant::now() + ETCD_START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "etcd exited with {status} while starting:\n{}",
                    self.log()
                ));
            }
            if let Ok(response) = agent.get(&url).call() {
                if response
                    .into_string()
                    .is_ok_and(|body| body.contains("\"health\":\"true\""))
                {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "etcd was not healthy at {url} after {ETCD_START_TIMEOUT:?}:\n{}",
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn tiebreaker(&self) -> EtcdTiebreaker {
        EtcdTiebreaker::new(&[&self.client_url]).unwrap()
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn etcd_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("FTVM_ETCD_BIN") {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("etcd"))
        .find(|p| p.is_file())
}

fn two_free_ports() -> (u16, u16) {
    let a = TcpListener::bind("127.0.0.1:0").unwrap();
    let b = TcpListener::bind("127.0.0.1:0").unwrap();
    (
        a.local_addr().unwrap().port(),
        b.local_addr().unwrap().port(),
    )
}

/// Makes the kernel kill etcd if the test process dies without running destructors.
fn die_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and only calls prctl, which is
    // async-signal-safe; it touches no memory shared with the parent.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[test]
fn etcd_sixteen_racers_one_winner() {
    let Some(etcd) = EtcdServer::start("etcd_sixteen_racers_one_winner") else {
        return;
    };
    for epoch in 1..=3u64 {
        let barrier = Arc::new(Barrier::new(16));
        let handles: Vec<_> = (0..16)
            .map(|i| {
                let barrier = barrier.clone();
                // One client per thread, as on separate hosts.
                let tb = etcd.tiebreaker();
                std::thread::spawn(move || {
                    let owner = format!("host-{i}");
                    barrier.wait();
                    (
                        owner.clone(),
                        tb.test_and_set("vm1", epoch, &owner).unwrap(),
                    )
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let winners: Vec<_> = results
            .iter()
            .filter(|(_, o)| *o == Outcome::Won)
            .map(|(w, _)| w.clone())
            .collect();
        assert_eq!(winners.len(), 1, "epoch {epoch}: winners {winners:?}");
        for (owner, outcome) in &results {
            if let Outcome::Lost { holder } = outcome {
                assert_eq!(*holder, winners[0], "{owner} was told the wrong holder");
            }
        }
        assert_eq!(
            etcd.tiebreaker().current("vm1").unwrap(),
            Some((epoch, winners[0].clone()))
        );
    }
}

fn beat(epoch: u64, count: u64, owner: &str) -> ftvm_tiebreak::Beat {
    ftvm_tiebreak::Beat {
        epoch,
        count,
        owner: owner.into(),
    }
}

/// A range request for `key` straight to the gateway.
fn range(etcd: &EtcdServer, key: &str) -> serde_json::Value {
    use base64::Engine as _;
    let key = base64::engine::general_purpose::STANDARD.encode(key);
    let text = ureq::post(&format!("{}/v3/kv/range", etcd.client_url))
        .send_string(&format!(r#"{{"key": "{key}"}}"#))
        .unwrap()
        .into_string()
        .unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The cluster's current revision: it grows with every write to the key space.
fn revision(etcd: &EtcdServer) -> u64 {
    range(etcd, "ftvm/")["header"]["revision"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn etcd_beats_are_overwritten_and_are_not_claims() {
    let Some(etcd) = EtcdServer::start("etcd_beats_are_overwritten_and_are_not_claims") else {
        return;
    };
    let tb = etcd.tiebreaker();
    assert_eq!(tb.last_beat("vm1").unwrap(), None);
    // A run's first beat is the record; a new run (epoch or owner) and "stopped" overwrite it.
    for (first, later) in [
        (beat(3, 0, "a"), beat(3, 7, "a")),
        (beat(4, 0, "a"), beat(4, 1, "a")),
        (beat(4, 2, "b"), beat(4, 3, "b")),
    ] {
        tb.beat("vm1", &first).unwrap();
        tb.beat("vm1", &later).unwrap();
        assert_eq!(tb.last_beat("vm1").unwrap(), Some(first));
    }
    let stopped = beat(4, ftvm_tiebreak::BEAT_STOPPED, "b");
    tb.beat("vm1", &stopped).unwrap();
    assert_eq!(tb.last_beat("vm1").unwrap(), Some(stopped));
    assert_eq!(tb.current("vm1").unwrap(), None, "a beat claims nothing");
    assert_eq!(tb.last_beat("vm10").unwrap(), None);
}

/// The beats of one run renew a lease instead of writing: etcd's history does not grow with
/// them. A starter sees a run that beats as alive, and one that stopped beating as stood still
/// once its lease ran out; the same run beating again afterwards is alive again.
#[test]
fn etcd_beats_renew_a_lease_and_a_run_that_stops_beating_stands_still() {
    let Some(etcd) = EtcdServer::start("etcd_beats_renew_a_lease") else {
        return;
    };
    let tb = etcd.tiebreaker();
    let first = beat(5, 0, "a");
    tb.beat("vm1", &first).unwrap();
    let after_first = revision(&etcd);
    for count in 1..=20 {
        tb.beat("vm1", &beat(5, count, "a")).unwrap();
    }
    assert_eq!(
        revision(&etcd),
        after_first,
        "beats of one run wrote to the key space"
    );

    // Beating once a second, as a primary does, while a starter watches: alive.
    let beating = |tb: EtcdTiebreaker, until: Instant| {
        std::thread::spawn(move || {
            let mut count = 100;
            while Instant::now() < until {
                tb.beat("vm1", &beat(5, count, "a")).unwrap();
                count += 1;
                std::thread::sleep(Duration::from_millis(1_000));
            }
        })
    };
    let watch = Duration::from_millis(2_500);
    let beater = beating(tb.clone(), Instant::now() + Duration::from_secs(5));
    let started = Instant::now();
    let seen = tb.beats_again("vm1", &first, watch).unwrap();
    let waited = started.elapsed();
    beater.join().unwrap();
    assert_eq!(
        seen,
        Some(first.clone()),
        "a beating run was taken as stopped"
    );
    let lease_wait = Duration::from_secs(ftvm_tiebreak::BEAT_LEASE_TTL_S);
    assert!(
        waited > lease_wait,
        "watched {waited:?}, not past the lease's TTL"
    );

    // No more beats: the lease runs out within its TTL, and the watch outlasts it.
    let seen = tb.beats_again("vm1", &first, watch).unwrap();
    assert_eq!(seen, None, "a run that stopped beating was taken as alive");
    assert_eq!(
        tb.last_beat("vm1").unwrap(),
        Some(first.clone()),
        "who ran last is kept"
    );

    // The same run beats again (it was paused): a new lease, alive again.
    let beater = beating(tb.clone(), Instant::now() + Duration::from_secs(5));
    let seen = tb.beats_again("vm1", &first, watch).unwrap();
    beater.join().unwrap();
    assert!(
        seen.is_some(),
        "a run that beats again was taken as stopped"
    );

    // Another writer replaces the record (a deposed primary's last beat): the running one's
    // next beat puts its own back, without a new lease.
    let deposed = etcd.tiebreaker();
    deposed.beat("vm1", &beat(4, 9, "old")).unwrap();
    assert_eq!(tb.last_beat("vm1").unwrap(), Some(beat(4, 9, "old")));
    tb.beat("vm1", &beat(5, 300, "a")).unwrap();
    assert_eq!(tb.last_beat("vm1").unwrap(), Some(beat(5, 300, "a")));
    let after_repair = revision(&etcd);
    tb.beat("vm1", &beat(5, 301, "a")).unwrap();
    assert_eq!(
        revision(&etcd),
        after_repair,
        "a repaired record is renewed, not rewritten"
    );

    // A clean stop: the record says so at once, and the lease goes with its key.
    assert!(range(&etcd, "ftvm/vm1/alive").get("kvs").is_some());
    let stopped = beat(5, ftvm_tiebreak::BEAT_STOPPED, "a");
    tb.beat("vm1", &stopped).unwrap();
    assert_eq!(tb.last_beat("vm1").unwrap(), Some(stopped));
    assert!(
        range(&etcd, "ftvm/vm1/alive").get("kvs").is_none(),
        "a stopped run's lease outlived it"
    );
    assert_eq!(tb.beats_again("vm1", &first, Duration::ZERO).unwrap(), None);
}

#[test]
fn etcd_epochs_and_vms_are_independent() {
    let Some(etcd) = EtcdServer::start("etcd_epochs_and_vms_are_independent") else {
        return;
    };
    let tb = etcd.tiebreaker();
    assert_eq!(tb.current("vm1").unwrap(), None);
    assert_eq!(tb.test_and_set("vm1", 1, "a").unwrap(), Outcome::Won);
    assert_eq!(
        tb.test_and_set("vm1", 1, "b").unwrap(),
        Outcome::Lost { holder: "a".into() }
    );
    assert_eq!(
        tb.test_and_set("vm1", 1, "a").unwrap(),
        Outcome::Won,
        "a retry by the holder"
    );
    assert_eq!(tb.test_and_set("vm1", 2, "b").unwrap(), Outcome::Won);
    assert_eq!(tb.test_and_set("vm1", 10, "c").unwrap(), Outcome::Won);
    assert_eq!(tb.test_and_set("vm1", 9, "d").unwrap(), Outcome::Won);
    assert_eq!(tb.test_and_set("vm10", 11, "e").unwrap(), Outcome::Won);
    assert_eq!(tb.current("vm1").unwrap(), Some((10, "c".into())));
    assert_eq!(tb.current("vm10").unwrap(), Some((11, "e".into())));
    assert_eq!(tb.current("vm2").unwrap(), None);
}

#[test]
fn etcd_endpoints_are_tried_in_order_and_a_dead_cluster_is_transient() {
    let Some(mut etcd) = EtcdServer::start("etcd_endpoints_are_tried_in_order") else {
        return;
    };
    let (dead_port, _) = two_free_ports();
    let dead = format!("http://127.0.0.1:{dead_port}");
    let tb = EtcdTiebreaker::new(&[dead.as_str(), etcd.client_url.as_str()]).unwrap();
    assert_eq!(tb.test_and_set("vm1", 1, "a").unwrap(), Outcome::Won);
    assert_eq!(tb.current("vm1").unwrap(), Some((1, "a".into())));

    etcd.kill();
    let err = tb.test_and_set("vm1", 2, "a").unwrap_err();
    assert!(err.is_transient(), "{err}");
    let text = err.to_string();
    assert!(
        text.contains(&dead) && text.contains(&etcd.client_url),
        "{text}"
    );
    assert!(text.contains("wait and retry"), "{text}");
}
