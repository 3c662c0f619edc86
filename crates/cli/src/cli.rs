//! The `ftvm` subcommands.

use std::path::{Path, PathBuf};

use ftvm_log::{Limits, LogReader, VmSpec};
use ftvm_vm::console::ConsolePort;
use ftvm_vm::gate::{DropOutputs, NullSink};
use ftvm_vm::logfile::{FileSink, FileSource};
use ftvm_vm::{exit_code, Gate, LogSink, Vm, VmImage, VmOutcome, World};

use crate::opts::{parse, Failure, Parsed};

const HELP: &str = "\
ftvm: fault-tolerant WebAssembly virtual machines

usage:
  ftvm run [--record LOG] [--pcap FILE] [--dir HOST_DIR::GUEST_DIR]... [--env K=V]... [VM OPTIONS] MODULE [ARGS...]
      Run a WASI preview1 program. The exit code is the guest's.
  ftvm replay LOG [--dir HOST_DIR::GUEST_DIR]... [--quiet] [--pcap FILE] MODULE
      Replay a recorded run against a copy of its starting disk; reproduces its output and exit
      code exactly, or stops with a divergence error. --pcap writes every frame the VM took in
      or sent out, stamped with virtual time, for tcpdump or tshark.
  ftvm inspect LOG [--entries N]
      Print a log's header and a summary of its entries.

  ftvm ft --vm VM.toml --as primary|backup --log ADDR:PORT --tiebreak dir:PATH|etcd:URL
          [--tap NAME] [--fault SPEC] [--status-file FILE] [--disk HOST_DIR::GUEST_DIR]... [--record LOG]
      Run one replica of a fault-tolerant pair. The primary listens on --log for its backup; the
      backup connects to it there. [--owner NAME] names this replica in the tiebreaker (default
      host-role-pid); [--wait-ms N] bounds the wait for the peer. A primary does not start beside
      a running pair of the same VM (the running primary's beats in the tiebreaker say so). A
      replica running without a backup holds its outputs while it cannot confirm its epoch with
      the tiebreaker, and halts after 30 s of that.
  ftvm demo
      A fault-tolerant pair, a SIGKILL of the primary mid-run, and a report.
  ftvm lab up|down [--name NAME] [--subnet I]
      Build (or remove) the lab: network namespaces NAME-client, NAME-host-a/b/c on one switch,
      198.18.I.0/24.
  ftvm status STATUS_FILE
      Show a replica's role, whether it still runs, epoch, lag, log bandwidth and held outputs,
      and, for a primary, when the tiebreaker last confirmed its epoch.

VM options:
  --nic tap=NAME,mac=MAC,ip=ADDR/PREFIX[,gw=ADDR][,seed=N][,fault=drop=P;dup=P;reorder=P;delay=MS;seed=N]
                            attach the VM's NIC to a TAP device (root or CAP_NET_ADMIN)
  --nic user,hostfwd=HOSTPORT:GUESTPORT[,hostfwd=...][,mac=MAC][,ip=ADDR/PREFIX][,gw=ADDR][,seed=N]
                            user-mode NIC, no root needed (ftvm run only): connections to
                            127.0.0.1:HOSTPORT reach the guest's GUESTPORT (a --listen port).
                            Defaults: mac 52:54:00:12:34:56, ip 10.0.2.15/24, host side gw
                            (default: the subnet's .2, 10.0.2.2). Not for ftvm ft: no failover.
  --listen PORT             preopen a TCP listener on the VM's netstack (repeatable)
  --memory-max-mib N        cap on guest memory (default 256)
  --checkpoint-events N     gate events between checkpoints (default 4096; 0: only at exit)
  --fuel                    count instructions and check the count at checkpoints

exit codes of ftvm itself: 2 usage, 120 bad module, 121 bad or mismatched log, 122 divergence,
123 guest trap, 124 guest out of memory, 125 disk or log I/O, 126 internal, 127 halted.
";

pub fn main(args: Vec<String>) -> Result<i32, Failure> {
    let Some((command, rest)) = args.split_first() else {
        print!("{HELP}");
        return Err(Failure::usage("no command given"));
    };
    if matches!(
        command.as_str(),
        "inspect" | "status" | "help" | "--help" | "-h"
    ) {
        // Commands that only print: a reader that goes away (`ftvm inspect LOG | head`) ends
        // them quietly, as it ends other Unix tools. The rest keep Rust's default (SIGPIPE
        // ignored), so that a VM's console on a closed pipe is an error, not a killed replica.
        // SAFETY: setting a signal's disposition to the default has no preconditions.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    match command.as_str() {
        "run" => run(rest),
        "replay" => replay(rest),
        "inspect" => inspect(rest),
        "ft" => crate::ft::main(rest),
        "demo" => crate::demo::main(rest),
        "lab" => crate::lab::main(rest),
        "status" => crate::ft::status_main(rest),
        "help" | "--help" | "-h" => {
            print!("{HELP}");
            Ok(0)
        }
        other => Err(Failure::usage(format!(
            "unknown command `{other}` (see `ftvm help`)"
        ))),
    }
}

const VM_OPTIONS: &[&str] = &[
    "dir",
    "env",
    "memory-max-mib",
    "checkpoint-events",
    "nic",
    "listen",
];
const VM_FLAGS: &[&str] = &["fuel"];

/// Reads the module file.
pub fn read_module(path: &str) -> Result<(String, Vec<u8>), Failure> {
    let bytes = std::fs::read(path).map_err(|e| Failure {
        code: exit_code::BAD_MODULE,
        message: format!("cannot read module {path}: {e}"),
        detail: String::new(),
    })?;
    let name = Path::new(path)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.to_string());
    Ok((name, bytes))
}

/// `HOST::GUEST` pairs.
fn parse_dirs(p: &Parsed) -> Result<Vec<(PathBuf, String)>, Failure> {
    p.all("dir")
        .into_iter()
        .map(|d| {
            let (host, guest) = d.split_once("::").unwrap_or((d.as_str(), d.as_str()));
            if host.is_empty() || guest.is_empty() {
                return Err(Failure::usage(format!(
                    "--dir {d:?}: expected HOST_DIR::GUEST_DIR"
                )));
            }
            Ok((PathBuf::from(host), guest.to_string()))
        })
        .collect()
}

/// Builds the VM definition from command-line options.
pub fn spec_from_options(
    p: &Parsed,
    name: &str,
    guest_args: &[String],
) -> Result<(VmSpec, Vec<PathBuf>), Failure> {
    let dirs = parse_dirs(p)?;
    let mut env = Vec::new();
    for kv in p.all("env") {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| Failure::usage(format!("--env {kv:?}: expected K=V")))?;
        env.push((k.to_string(), v.to_string()));
    }
    let mut limits = Limits::default();
    if let Some(mib) = p.number::<u64>("memory-max-mib")? {
        limits.memory_bytes_max = mib << 20;
    }
    if let Some(n) = p.number::<u64>("checkpoint-events")? {
        limits.checkpoint_events = n;
    }
    limits.fuel = p.flag("fuel");
    let nic = match p.one("nic") {
        Some(text) => Some(crate::vmdef::parse_nic_option(&text)?.spec),
        None => None,
    };
    let mut listeners = Vec::new();
    for port in p.all("listen") {
        listeners.push(
            port.parse::<u16>()
                .map_err(|_| Failure::usage(format!("--listen {port:?}: expected a TCP port")))?,
        );
    }
    let mut args = vec![name.to_string()];
    args.extend(guest_args.iter().cloned());
    let spec = VmSpec {
        args,
        env,
        preopens: dirs.iter().map(|(_, g)| g.clone()).collect(),
        listeners,
        nic,
        limits,
    };
    Ok((spec, dirs.into_iter().map(|(h, _)| h).collect()))
}

/// `--pcap FILE`: a capture of the VM's NIC stamped with virtual time.
fn open_capture(p: &Parsed) -> Result<Option<ftvm_vm::pcap::Capture>, Failure> {
    let Some(path) = p.one("pcap") else {
        return Ok(None);
    };
    let io = |e: std::io::Error| Failure {
        code: exit_code::IO,
        message: format!("cannot write the capture {path}: {e}"),
        detail: String::new(),
    };
    let file = std::fs::File::create(&path).map_err(io)?;
    let capture =
        ftvm_vm::pcap::Capture::new(Box::new(std::io::BufWriter::new(file))).map_err(io)?;
    Ok(Some(capture))
}

fn finish(outcome: Result<VmOutcome, ftvm_vm::VmError>) -> Result<i32, Failure> {
    match outcome? {
        VmOutcome::Exited(code) => Ok((code & 0xff) as i32),
        VmOutcome::PoweredOff => {
            eprintln!("ftvm: the VM was powered off");
            Ok(0)
        }
    }
}

fn run(args: &[String]) -> Result<i32, Failure> {
    let mut with_value = vec!["record", "pcap"];
    with_value.extend_from_slice(VM_OPTIONS);
    let p = parse(args, &with_value, VM_FLAGS, true)?;
    let Some((module, guest_args)) = p.positional.split_first() else {
        return Err(Failure::usage("ftvm run needs a MODULE"));
    };
    let (name, bytes) = read_module(module)?;
    let (spec, dirs) = spec_from_options(&p, &name, guest_args)?;
    let image = VmImage {
        name,
        module_bytes: bytes,
        spec,
        dirs,
    };
    let sink: Box<dyn LogSink> = match p.one("record") {
        Some(path) => Box::new(FileSink::create(Path::new(&path), &image.header()?)?),
        None => Box::new(NullSink),
    };
    let checkpoint_events = image.spec.limits.checkpoint_events;
    // The NIC: a TAP device, or user-mode networking (usernet.rs), attached off the VM thread;
    // frames enter at the next gate point either way.
    let mut tap = None;
    let mut usernet = None;
    let (frames_rx, frames_out) = match p.one("nic") {
        Some(text) => match crate::vmdef::parse_nic_option(&text)? {
            crate::vmdef::NicOption {
                attachment: crate::vmdef::NicAttachment::Tap { name, fault },
                ..
            } => {
                let att = crate::nic::Nic::open(&name, fault.as_deref()).map_err(|e| Failure {
                    code: exit_code::IO,
                    message: format!("cannot attach to TAP device {name}: {e}"),
                    detail: String::new(),
                })?;
                let tx = att.transmitter();
                let rx = att.frame_source();
                tap = Some(att);
                let out: Box<dyn FnMut(Vec<u8>) + Send> = Box::new(move |frame| tx.send(frame));
                (Some(rx), Some(out))
            }
            crate::vmdef::NicOption {
                spec,
                attachment: crate::vmdef::NicAttachment::User(cfg),
            } => {
                let att = crate::usernet::UserNet::start(&spec, &cfg, &image.spec.listeners)?;
                eprintln!("ftvm: {}", crate::usernet::describe(&spec, &cfg));
                let io = (
                    Some(ftvm_vm::gate::ChannelFrames::boxed(att.receiver())),
                    Some(att.transmit_fn()),
                );
                usernet = Some(att);
                io
            }
        },
        None => (None, None),
    };
    let (control_tx, control_rx) = crossbeam_channel::bounded(4);
    let _power_off = crate::ft::install_power_off_signal(control_tx);
    let mut gate = Gate::record(
        sink,
        World::new(frames_rx, Some(control_rx)),
        Box::new(ConsolePort { frames: frames_out }),
        checkpoint_events,
    );
    if let Some(c) = open_capture(&p)? {
        gate.set_capture(c);
    }
    let mut vm = Vm::boot(&image, gate)?;
    let outcome = vm.run();
    drop(tap);
    drop(usernet);
    finish(outcome)
}

fn replay(args: &[String]) -> Result<i32, Failure> {
    let p = parse(args, &["dir", "pcap"], &["quiet"], false)?;
    let [log, module] = p.positional.as_slice() else {
        return Err(Failure::usage(
            "usage: ftvm replay LOG [--dir HOST_DIR::GUEST_DIR]... MODULE",
        ));
    };
    let (name, bytes) = read_module(module)?;
    let source = FileSource::open(Path::new(log))?;
    let spec = source.header().spec.clone();
    let dirs = parse_dirs(&p)?;
    // The disk is mapped by guest path, in the order the recording preopened it.
    let mut host_dirs = Vec::new();
    for guest in &spec.preopens {
        let Some((host, _)) = dirs.iter().find(|(_, g)| g == guest) else {
            return Err(Failure::usage(format!(
                "the log preopens {guest}: pass --dir HOST_DIR::{guest}"
            )));
        };
        host_dirs.push(host.clone());
    }
    let image = VmImage {
        name,
        module_bytes: bytes,
        spec,
        dirs: host_dirs,
    };
    image.check_log_header(source.header())?;
    let port: Box<dyn ftvm_vm::OutputPort> = if p.flag("quiet") {
        Box::new(DropOutputs)
    } else {
        Box::new(ConsolePort { frames: None })
    };
    let mut gate = Gate::replay(
        Box::new(source),
        None,
        port,
        image.spec.limits.checkpoint_events,
    );
    if let Some(c) = open_capture(&p)? {
        gate.set_capture(c);
    }
    let mut vm = Vm::boot(&image, gate)?;
    finish(vm.run())
}

fn inspect(args: &[String]) -> Result<i32, Failure> {
    let p = parse(args, &["entries"], &[], false)?;
    let [log] = p.positional.as_slice() else {
        return Err(Failure::usage("usage: ftvm inspect LOG [--entries N]"));
    };
    let limit = p.number::<u64>("entries")?.unwrap_or(u64::MAX);
    let file = std::fs::File::open(log).map_err(|e| Failure {
        code: exit_code::BAD_LOG,
        message: format!("cannot open {log}: {e}"),
        detail: String::new(),
    })?;
    let bad = |e: ftvm_log::LogError| Failure {
        code: exit_code::BAD_LOG,
        message: format!("{log}: {e}"),
        detail: String::new(),
    };
    let mut reader = LogReader::open(std::io::BufReader::new(file)).map_err(bad)?;
    let h = reader.header().clone();
    println!("log {log}");
    println!("  format version {}", reader.version());
    println!("  engine         {}", h.engine);
    println!("  module         {}", h.module_hash);
    println!("  disk           {}", h.disk_hash);
    println!("  args           {:?}", h.spec.args);
    println!("  env            {:?}", h.spec.env);
    println!("  preopens       {:?}", h.spec.preopens);
    println!("  listeners      {:?}", h.spec.listeners);
    if let Some(nic) = &h.spec.nic {
        println!(
            "  nic            mac {} ip {}/{}",
            ftvm_log::spec::mac_to_string(&nic.mac),
            std::net::Ipv4Addr::from(nic.ip),
            nic.prefix_len
        );
    }
    println!("  limits         {:?}", h.spec.limits);
    let mut counts: std::collections::BTreeMap<String, (u64, u64)> = Default::default();
    let mut shown = 0;
    let mut last_offset = reader.offset();
    let end = loop {
        match reader.next_entry() {
            Ok(Some((seq, entry))) => {
                let size = reader.offset() - last_offset;
                last_offset = reader.offset();
                let c = counts.entry(entry.kind().to_string()).or_default();
                c.0 += 1;
                c.1 += size;
                if shown < limit {
                    match &entry {
                        // The log crate knows errno numbers only; the name is WASI's.
                        ftvm_log::Entry::HostError { errno, .. } => println!(
                            "{seq:>8} {} ({})",
                            entry.summary(),
                            ftvm_vm::wasi::errno::name(*errno)
                        ),
                        _ => println!("{seq:>8} {}", entry.summary()),
                    }
                    shown += 1;
                }
            }
            Ok(None) => break None,
            Err(e) => break Some(e),
        }
    };
    println!(
        "summary: {} entries, {} bytes",
        reader.last_seq(),
        reader.offset()
    );
    for (kind, (n, bytes)) in counts {
        println!("  {kind:<24} {n:>10} entries {bytes:>12} bytes");
    }
    match end {
        None => Ok(0),
        Some(e) => Err(bad(e)),
    }
}
