//! `ftvm ft`: one replica of a fault-tolerant VM pair (the paper's primary or backup).
//!
//! ```text
//!   primary host                                   backup host
//!   ┌──────────────┐  records, outputs  ┌────────┐   log channel (TCP)   ┌────────┐  entries  ┌──────────────┐
//!   │ VM (record)  │───── in order ────►│ driver │══ Records/Heartbeat ═►│ driver │──────────►│ VM (replay)  │
//!   │ gate + WASI  │                    │ Output │◄═══ Ack/Heartbeat ════│        │           │ outputs      │
//!   └──────▲───────┘                    │ Rule   │                       └────────┘           │ dropped      │
//!          │ frames                      └───┬────┘                                            └──────────────┘
//!        TAP ◄──────── released outputs ─────┘
//! ```
//!
//! The VM thread runs the guest; the driver thread owns the replication state machine
//! (`ftvm_repl`), the socket writes and the Output Rule; a reader thread decodes the channel.
//! Failure of the peer (EOF without goodbye, corrupt frame, or silence past the timeout) makes the
//! survivor claim the next epoch with the tiebreaker before it goes on; the loser halts.

mod backup;
pub use backup::DEFAULT_REPLAY_NICE;
mod link;
mod primary;
mod route;
mod status;

pub use status::show as status_main;

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use crate::nic::Nic;
use ftvm_tiebreak::TestAndSet;
use ftvm_vm::VmImage;

use crate::opts::{parse, Failure};
use crate::vmdef::{FtDef, VmDef};

/// How long a primary waits for its backup to connect before it gives up (`--wait-ms`); it
/// never starts a VM without one.
pub const BACKUP_WAIT_MS_DEFAULT: u64 = 30_000;
/// How long a backup keeps trying to reach its primary at start-up.
pub const CONNECT_WAIT_MS_DEFAULT: u64 = 30_000;
/// Write timeout on the log channel: a peer that stops reading is a failed peer.
pub const CHANNEL_WRITE_TIMEOUT_MS: u64 = 2_000;
/// Read chunk of the log channel reader.
pub const CHANNEL_READ_BYTES: usize = 256 << 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Primary,
    Backup,
}

/// Everything one replica needs, from the command line and the VM definition.
pub struct Node {
    #[allow(dead_code)]
    pub role: Role,
    pub vm_id: String,
    pub image: VmImage,
    pub ft: FtDef,
    pub log_addr: SocketAddr,
    pub tap: Option<String>,
    pub fault: Option<String>,
    pub tiebreak: std::sync::Arc<dyn TestAndSet>,
    pub owner: String,
    pub status_file: Option<PathBuf>,
    pub wait_ms: u64,
    /// Test hook (backup): sleep this long per replayed entry, to make the backup lag.
    pub slow_replay_us: u64,
    /// The epoch watch's period: [`EPOCH_CHECK_MS`], or longer as a test hook, so a test can
    /// see what a replica does before its watch acts.
    pub epoch_check_ms: u64,
    /// Primary: also write the log to this file, for a debugging replay with `ftvm replay`.
    pub record: Option<PathBuf>,
    /// Test hook: corrupt the Nth frame this primary sends on the log channel.
    pub corrupt_frame: Option<u64>,
    /// Test hook: corrupt log record N before it is framed (the frame's checksum holds).
    pub corrupt_record: Option<u64>,
    /// Test hook (primary): the VM fails for a reason of this host's own at log record N, as
    /// when the host's random source fails.
    pub fail_at_record: Option<u64>,
    /// Test hook (primary): stop this process (SIGSTOP) just before the first output from the Nth
    /// on that would leave by the shortcut (`ft::primary`), as a pause could.
    pub stop_before_shortcut: Option<u64>,
}

pub fn main(args: &[String]) -> Result<i32, Failure> {
    let p = parse(
        args,
        &[
            "vm",
            "as",
            "log",
            "tap",
            "fault",
            "tiebreak",
            "owner",
            "status-file",
            "disk",
            "wait-ms",
            "corrupt-log-frame",
            "corrupt-log-record",
            "fail-at-record",
            "stop-before-shortcut",
            "record",
            "slow-replay-us",
            "epoch-check-ms",
        ],
        &[],
        false,
    )?;
    let need = |k: &str| {
        p.one(k)
            .ok_or_else(|| Failure::usage(format!("ftvm ft needs --{k}")))
    };
    let role = match need("as")?.as_str() {
        "primary" => Role::Primary,
        "backup" => Role::Backup,
        other => {
            return Err(Failure::usage(format!(
                "--as {other}: expected primary or backup"
            )))
        }
    };
    let (def, base) = VmDef::load(std::path::Path::new(&need("vm")?))?;
    let mut disks = Vec::new();
    for d in p.all("disk") {
        let (h, g) = d
            .split_once("::")
            .ok_or_else(|| Failure::usage(format!("--disk {d:?}: expected HOST_DIR::GUEST_DIR")))?;
        disks.push((PathBuf::from(h), g.to_string()));
    }
    let (spec, dirs) = def.spec(&base, &disks)?;
    let module_path = def.module_path(&base);
    let (name, bytes) = crate::cli::read_module(module_path.to_str().unwrap_or_default())?;
    let image = VmImage {
        name,
        module_bytes: bytes,
        spec,
        dirs,
    };
    let log_addr: SocketAddr = need("log")?
        .parse()
        .map_err(|_| Failure::usage("--log: expected ADDR:PORT"))?;
    let tiebreak: std::sync::Arc<dyn TestAndSet> =
        crate::tiebreak_spec::parse(&need("tiebreak")?)?.into();
    let owner = p
        .one("owner")
        .unwrap_or_else(|| format!("{}-{:?}-{}", hostname(), role, std::process::id()));
    let wait_ms = p.number::<u64>("wait-ms")?.unwrap_or(match role {
        Role::Primary => BACKUP_WAIT_MS_DEFAULT,
        Role::Backup => CONNECT_WAIT_MS_DEFAULT,
    });
    let node = Node {
        role,
        vm_id: def.name.clone(),
        image,
        ft: def.ft.clone(),
        log_addr,
        tap: p.one("tap"),
        fault: p.one("fault"),
        tiebreak,
        owner,
        status_file: p.one("status-file").map(PathBuf::from),
        wait_ms,
        corrupt_frame: p.number::<u64>("corrupt-log-frame")?,
        corrupt_record: p.number::<u64>("corrupt-log-record")?,
        fail_at_record: p.number::<u64>("fail-at-record")?,
        stop_before_shortcut: p.number::<u64>("stop-before-shortcut")?,
        record: p.one("record").map(PathBuf::from),
        slow_replay_us: p.number::<u64>("slow-replay-us")?.unwrap_or(0),
        epoch_check_ms: p
            .number::<u64>("epoch-check-ms")?
            .unwrap_or(EPOCH_CHECK_MS)
            .max(EPOCH_CHECK_MS),
    };
    if !(0..=19).contains(&node.ft.replay_nice) {
        return Err(Failure::usage(format!(
            "[ft] replay_nice = {}: expected 0 (unchanged) to 19",
            node.ft.replay_nice
        )));
    }
    if node.image.spec.nic.is_some() != node.tap.is_some() {
        return Err(Failure::usage(
            "a VM with a [nic] needs --tap NAME (and --tap needs a [nic])",
        ));
    }
    match role {
        Role::Primary => primary::run(node),
        Role::Backup => backup::run(node),
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "host".into())
}

/// The hash both replicas compare in the handshake: log format, module, VM definition and engine.
pub fn config_hash(header: &ftvm_log::LogHeader) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    // Builds that write different log formats must not pair: the backup could not read the log.
    h.update(&ftvm_log::FORMAT_VERSION.to_le_bytes());
    h.update(header.module_hash.as_bytes());
    h.update(&serde_json::to_vec(&header.spec).expect("spec serializes"));
    h.update(header.engine.as_bytes());
    *h.finalize().as_bytes()
}

pub fn disk_hash_bytes(header: &ftvm_log::LogHeader) -> [u8; 32] {
    *blake3::hash(header.disk_hash.as_bytes()).as_bytes()
}

/// Opens the VM's NIC attachment (TAP), if it has one.
pub fn attach(node: &Node, enabled: bool) -> Result<Option<Nic>, Failure> {
    let Some(tap) = &node.tap else {
        return Ok(None);
    };
    let att = Nic::open(tap, node.fault.as_deref()).map_err(|e| Failure {
        code: ftvm_vm::exit_code::IO,
        message: format!("cannot attach to TAP device {tap}: {e}"),
        detail: String::new(),
    })?;
    att.set_enabled(enabled);
    Ok(Some(att))
}

pub fn now_ms() -> u64 {
    // The replication protocol's own clock (timeouts, heartbeats): the host's monotonic clock.
    // It never reaches the guest.
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

fn set_stream_options(stream: &TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_write_timeout(Some(Duration::from_millis(CHANNEL_WRITE_TIMEOUT_MS)))
}

/// How often a replica running as a primary asks the tiebreaker whether its epoch is still the
/// newest. A pair started for the same VM elsewhere (an operator's mistake) claims a newer one;
/// this replica then halts, so the two never both emit for much longer than this.
pub const EPOCH_CHECK_MS: u64 = 1_000;

/// How long a starting primary watches the VM's liveness record ([`ftvm_tiebreak::Beat`]) for a
/// running primary's beats, written every [`EPOCH_CHECK_MS`].
pub const LIVENESS_WAIT_MS: u64 = 2 * EPOCH_CHECK_MS + EPOCH_CHECK_MS / 2;

/// Refuses to start a pair of a VM whose primary runs: its liveness record changes within
/// [`LIVENESS_WAIT_MS`]. A record that says the primary stopped, or none at all, lets the start
/// go on at once; one that stands still that long is a primary that died without a word, or one
/// that is paused or cut off from the tiebreaker: then this returns true, and the new primary must
/// let that one's [`Tenure`] run out after its claim.
pub fn refuse_if_running(
    tiebreak: &dyn ftvm_tiebreak::TestAndSet,
    vm_id: &str,
) -> Result<bool, crate::opts::Failure> {
    let store =
        |e: ftvm_tiebreak::TiebreakError| crate::opts::Failure::usage(format!("tiebreaker: {e}"));
    let Some(first) = tiebreak.last_beat(vm_id).map_err(store)? else {
        return Ok(false);
    };
    if first.count == ftvm_tiebreak::BEAT_STOPPED {
        return Ok(false);
    }
    eprintln!(
        "ftvm: {vm_id} had a primary ({}, epoch {}); watching for its beats for {LIVENESS_WAIT_MS} ms \
         (an etcd tiebreaker: its lease's TTL and a half second, if longer)",
        first.owner, first.epoch
    );
    let again = tiebreak
        .beats_again(vm_id, &first, Duration::from_millis(LIVENESS_WAIT_MS))
        .map_err(store)?;
    match again {
        Some(now) => Err(crate::opts::Failure {
            code: ftvm_vm::exit_code::HALTED,
            message: format!(
                "{vm_id} is running: its primary {} (epoch {}) is alive; stop that pair \
                 before starting another (two would run side by side)",
                now.owner, now.epoch
            ),
            detail: String::new(),
        }),
        None => {
            eprintln!("ftvm: no beat from {}: taken as stopped", first.owner);
            Ok(true)
        }
    }
}

/// Writes the liveness record's last word, "stopped", for a primary whose VM has ended, if it
/// still holds the newest epoch (a replica that lost it must not silence the one that won).
pub fn beat_stopped(
    tiebreak: &dyn ftvm_tiebreak::TestAndSet,
    vm_id: &str,
    owner: &str,
    epoch: u64,
) {
    if let Ok(Some((e, holder))) = tiebreak.current(vm_id) {
        if e == epoch && holder == owner {
            let beat = ftvm_tiebreak::Beat {
                epoch,
                count: ftvm_tiebreak::BEAT_STOPPED,
                owner: owner.to_string(),
            };
            if let Err(e) = tiebreak.beat(vm_id, &beat) {
                eprintln!("ftvm: cannot record the stop in the tiebreaker: {e}");
            }
        }
    }
}

/// Starts the thread that writes this replica's beats and checks its [`Tenure`] with the
/// tiebreaker every `period_ms` ([`EPOCH_CHECK_MS`] but in tests), for a replica that runs as a
/// primary. A thread of its own: a slow tiebreaker must not hold up heartbeats or acks. Only a
/// newer epoch held by another owner halts (our own newer claim, made while going on alone, does
/// not); an unreachable store is no evidence and only warns here (a replica without a backup then
/// holds its outputs: [`Tenure::before_output`]). The thread ends with the process.
pub fn spawn_epoch_watch(
    tenure: std::sync::Arc<Tenure>,
    period_ms: u64,
) -> Result<(), crate::opts::Failure> {
    std::thread::Builder::new()
        .name("ftvm-epoch-watch".into())
        .spawn(move || {
            // The checks start every `period_ms` however long the store takes to answer (as
            // long as it answers within that), so a slow store does not eat the tenure's margin.
            for count in 0.. {
                let started = now_ms();
                if count > 0 {
                    if let Err(e) = tenure.check() {
                        eprintln!("ftvm: cannot check the epoch with the tiebreaker: {e}");
                    }
                }
                let beat = ftvm_tiebreak::Beat {
                    epoch: tenure.epoch(),
                    count,
                    owner: tenure.owner.clone(),
                };
                if let Err(e) = tenure.tiebreak.beat(&tenure.vm_id, &beat) {
                    eprintln!("ftvm: cannot write this primary's beat to the tiebreaker: {e}");
                }
                let spent = now_ms().saturating_sub(started);
                std::thread::sleep(Duration::from_millis(period_ms.saturating_sub(spent)));
            }
        })
        .map(|_| ())
        .map_err(|e| crate::opts::Failure::usage(format!("cannot start the epoch watch: {e}")))
}

/// How long a confirmation of a replica's epoch lets it emit without a backup: its epoch watch
/// confirms every [`EPOCH_CHECK_MS`], so this runs out only when the watch could not (a pause,
/// a tiebreaker out of reach). A new pair started after [`refuse_if_running`] found a record
/// that stood still waits this long after its claim before it runs.
pub const TENURE_MS: u64 = EPOCH_CHECK_MS + EPOCH_CHECK_MS / 2;

/// How long a replica without a backup holds its outputs while it cannot confirm its epoch with
/// the tiebreaker, before it halts.
pub const TENURE_WAIT_MS: u64 = 30_000;

/// How often it asks the tiebreaker meanwhile.
pub const TENURE_RETRY_MS: u64 = 100;

/// A replica's hold on its VM's epoch, for the outputs it emits without a backup's ack: a primary
/// that went on alone, or a backup that went live. A newer pair of the same VM (an operator's
/// second start) may claim the next epoch once that replica's beats stood still, when it is
/// paused or cut off from the tiebreaker; the Output Rule cannot stop a replica that has no
/// backup from emitting beside it. So it emits only within [`TENURE_MS`] of the start of a check
/// that found its epoch the newest, and the new pair waits as long after its claim. A check
/// that began before a claim cannot have seen it, so every output of the old replica leaves
/// before the new pair runs. (An output already in a write system call when the replica is
/// paused is beyond any check.)
pub struct Tenure {
    tiebreak: std::sync::Arc<dyn TestAndSet>,
    vm_id: String,
    owner: String,
    epoch: std::sync::atomic::AtomicU64,
    /// [`now_ms`] at the start of the newest confirmation (or winning claim).
    confirmed_ms: std::sync::atomic::AtomicU64,
    /// An output waits in [`Tenure::before_output`] for the tiebreaker to answer.
    holding: std::sync::atomic::AtomicBool,
}

impl Tenure {
    /// A replica that won `epoch` with a claim it began at `claim_started_ms`.
    pub fn new(
        tiebreak: std::sync::Arc<dyn TestAndSet>,
        vm_id: String,
        owner: String,
        epoch: u64,
        claim_started_ms: u64,
    ) -> std::sync::Arc<Tenure> {
        std::sync::Arc::new(Tenure {
            tiebreak,
            vm_id,
            owner,
            epoch: epoch.into(),
            confirmed_ms: claim_started_ms.into(),
            holding: false.into(),
        })
    }

    /// How long ago the epoch was last confirmed (for status).
    pub fn confirmed_age_ms(&self) -> u64 {
        now_ms().saturating_sub(self.confirmed_ms.load(std::sync::atomic::Ordering::SeqCst))
    }

    /// Whether an output waits for the tiebreaker (for status).
    pub fn is_holding(&self) -> bool {
        self.holding.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// This replica won `epoch` with a claim it began at `claim_started_ms` (going on alone).
    pub fn won(&self, epoch: u64, claim_started_ms: u64) {
        self.epoch.store(epoch, std::sync::atomic::Ordering::SeqCst);
        self.confirmed_ms
            .fetch_max(claim_started_ms, std::sync::atomic::Ordering::SeqCst);
    }

    /// Asks the tiebreaker once. Halts if another owner holds a newer epoch; otherwise the
    /// epoch is confirmed as of the moment the question was asked.
    pub fn check(&self) -> Result<(), ftvm_tiebreak::TiebreakError> {
        let asked = now_ms();
        let ours = self.epoch();
        match self.tiebreak.current(&self.vm_id)? {
            Some((e, holder)) if e > ours && holder != self.owner => primary::halt(format!(
                "epoch {e} of {} was claimed by {holder} while this replica ran as its primary \
                 in epoch {ours} (another pair of this VM was started): it halts without \
                 emitting",
                self.vm_id
            )),
            _ => {
                self.confirmed_ms
                    .fetch_max(asked, std::sync::atomic::Ordering::SeqCst);
                Ok(())
            }
        }
    }

    /// Returns once this replica may emit an output without a backup: at once within its
    /// tenure; otherwise after a check, retried while the tiebreaker cannot answer (the VM's
    /// outputs, and with them the VM, wait), for at most [`TENURE_WAIT_MS`] before it halts.
    pub fn before_output(&self) {
        let confirmed = self.confirmed_ms.load(std::sync::atomic::Ordering::SeqCst);
        if now_ms().saturating_sub(confirmed) <= TENURE_MS {
            return;
        }
        let since = now_ms();
        let mut warned = false;
        loop {
            match self.check() {
                Ok(()) => {
                    if warned {
                        self.holding
                            .store(false, std::sync::atomic::Ordering::SeqCst);
                        eprintln!("ftvm: epoch confirmed with the tiebreaker; outputs go on");
                    }
                    return;
                }
                Err(e) if now_ms().saturating_sub(since) >= TENURE_WAIT_MS => {
                    primary::halt(format!(
                        "cannot confirm epoch {} with the tiebreaker for {TENURE_WAIT_MS} ms \
                         ({e}); halting rather than risk two primaries",
                        self.epoch()
                    ))
                }
                Err(e) => {
                    if !warned {
                        eprintln!(
                            "ftvm: holding outputs: cannot confirm epoch {} with the tiebreaker \
                             ({e})",
                            self.epoch()
                        );
                        warned = true;
                        self.holding
                            .store(true, std::sync::atomic::Ordering::SeqCst);
                    }
                    std::thread::sleep(Duration::from_millis(TENURE_RETRY_MS));
                }
            }
        }
    }
}

/// Installs SIGTERM/SIGINT handlers that request a power-off, delivered to the VM through the
/// log (a control operation), so every replica stops at the same point. Returns a guard; the
/// watcher thread ends when the VM's control channel closes.
pub fn install_power_off_signal(
    control: crossbeam_channel::Sender<ftvm_log::ControlOp>,
) -> std::thread::JoinHandle<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    static FLAG: AtomicBool = AtomicBool::new(false);
    extern "C" fn on_signal(_: libc::c_int) {
        FLAG.store(true, Ordering::SeqCst);
    }
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
    std::thread::spawn(move || loop {
        if FLAG.swap(false, Ordering::SeqCst) {
            eprintln!("ftvm: power-off requested");
            if control.send(ftvm_log::ControlOp::PowerOff).is_err() {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    })
}

/// A socket's address as text for the `Endpoints` message (empty if the socket cannot say).
fn addr_text(addr: std::io::Result<std::net::SocketAddr>) -> String {
    addr.map(|a| a.to_string()).unwrap_or_default()
}
