//! Shared helpers for the integration tests: paths, running `ftvm`, temporary disks.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

/// A replica's status file (`--status-file`) as JSON; `Null` while it is missing or half written.
pub fn status_json(file: &Path) -> serde_json::Value {
    std::fs::read_to_string(file)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default()
}

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repo root")
}

pub fn ftvm() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ftvm"))
}

/// A built guest; the test fails with a clear message if setup has not built it.
pub fn guest(name: &str) -> PathBuf {
    let path = repo().join("guests/build").join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "{} is missing: run `bash scripts/setup.sh` first",
        path.display()
    );
    path
}

pub fn native(name: &str) -> PathBuf {
    let path = repo().join("guests/build/native").join(name);
    assert!(
        path.exists(),
        "{} is missing: run `bash scripts/setup.sh` first",
        path.display()
    );
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

/// Slow soak tests run when FTVM_SOAK=1 or in CI.
pub fn soak() -> bool {
    std::env::var("FTVM_SOAK").is_ok_and(|v| v == "1")
        || std::env::var("CI").is_ok_and(|v| v == "true")
}

/// A real etcd server on loopback (Debian `etcd-server`), killed on drop.
pub struct Etcd {
    child: std::process::Child,
    pub url: String,
    _dir: tempfile::TempDir,
    ns: Option<String>,
}

impl Etcd {
    /// On loopback, in this namespace.
    pub fn start() -> Etcd {
        let free = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        };
        Etcd::start_at(None, "127.0.0.1", free(), free())
    }

    /// Inside network namespace `ns` (a lab host), listening on `ip`.
    pub fn start_in(ns: &str, ip: &str) -> Etcd {
        Etcd::start_at(Some(ns.to_string()), ip, 2379, 2380)
    }

    fn start_at(ns: Option<String>, ip: &str, client: u16, peer: u16) -> Etcd {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("http://{ip}:{client}");
        let peer_url = format!("http://{ip}:{peer}");
        let mut cmd = match &ns {
            Some(ns) => {
                let mut c = std::process::Command::new("ip");
                c.args(["netns", "exec", ns, "etcd"]);
                c
            }
            None => std::process::Command::new("etcd"),
        };
        let child = cmd
            .args([
                "--name",
                "ftvm-test",
                "--data-dir",
                dir.path().join("data").to_str().unwrap(),
            ])
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args([
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
            ])
            .args(["--initial-cluster", &format!("ftvm-test={peer_url}")])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("etcd is not installed: run `bash scripts/setup.sh` (Debian etcd-server)");
        let etcd = Etcd {
            child,
            url,
            _dir: dir,
            ns,
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            if etcd.healthy() {
                return etcd;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "etcd did not become healthy within 30 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    fn healthy(&self) -> bool {
        let url = self.url.clone();
        match &self.ns {
            Some(ns) => in_netns_thread(ns, move || Etcd::probe(&url))
                .join()
                .unwrap_or(false),
            None => Etcd::probe(&url),
        }
    }

    fn probe(url: &str) -> bool {
        use std::io::{Read, Write};
        let addr = url.trim_start_matches("http://");
        let Ok(mut s) = std::net::TcpStream::connect(addr) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(2)));
        if s.write_all(format!("GET /health HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .is_err()
        {
            return false;
        }
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body.contains("\"health\":\"true\"")
    }
}

/// Runs `f` on a thread that has entered network namespace `ns` (sockets it opens live there).
pub fn in_netns_thread<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    use std::os::fd::AsRawFd;
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: setns on this thread only, with a valid namespace fd.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A process killed and reaped on drop.
pub struct Proc {
    pub child: Option<Child>,
    pub out: PathBuf,
    pub err: PathBuf,
}

impl Proc {
    /// Starts `cmd` with no stdin and its stdout/stderr in `dir/TAG.out` and `dir/TAG.err`.
    pub fn spawn(cmd: &mut Command, dir: &Path, tag: &str) -> Proc {
        let out = dir.join(format!("{tag}.out"));
        let err = dir.join(format!("{tag}.err"));
        let child = cmd
            .stdin(std::process::Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap();
        Proc {
            child: Some(child),
            out,
            err,
        }
    }
    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }
    /// Signals the process; `ip netns exec` execs the program, so the pid is the program's.
    pub fn signal(&self, sig: i32) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid(), sig) };
    }
    pub fn wait(&mut self, limit: Duration) -> i32 {
        let deadline = Instant::now() + limit;
        let child = self.child.as_mut().unwrap();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < deadline,
                "process did not exit within {limit:?}: {}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    /// Waits for the process and asserts its exit code, showing its stderr if it differs.
    pub fn expect_exit(&mut self, code: i32, limit: Duration) {
        let got = self.wait(limit);
        assert_eq!(
            got,
            code,
            "exit code {got}, expected {code}: {}",
            self.stderr()
        );
    }
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits until `f` holds (bounded).
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "condition not met within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A loopback TCP port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A small tmpfs on a temporary directory: a disk that fills up. Unmounted on drop, even when
/// the test fails. Needs root.
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    pub fn mount(size_bytes: u64) -> Tmpfs {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        assert!(
            root,
            "the full-disk tests need root (they mount a small tmpfs)"
        );
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_bytes}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("mount runs");
        assert!(
            out.status.success(),
            "mount tmpfs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Every path below `dir` (relative, sorted) with its file's bytes (`None` for a directory).
pub fn read_tree(dir: &Path) -> std::collections::BTreeMap<PathBuf, Option<Vec<u8>>> {
    let mut all = std::collections::BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            let rel = path.strip_prefix(dir).unwrap().to_path_buf();
            if path.is_dir() {
                all.insert(rel, None);
                todo.push(path);
            } else {
                all.insert(rel, Some(std::fs::read(&path).unwrap()));
            }
        }
    }
    all
}
