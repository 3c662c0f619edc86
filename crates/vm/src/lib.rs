//! The ftvm virtual machine: a WASI preview1 guest in wasmtime, with every non-deterministic input
//! passing through one gate (`gate`), so that a run can be recorded and replayed exactly.
//!
//! - `engine`: wasmtime configured for determinism; module checks.
//! - `gate`: the one gate, record and replay, output digest, checkpoints.
//! - `wasi`: our own `wasi_snapshot_preview1`, one file per interface.
//! - `vdisk`: preopened directories as a deterministic virtual disk.
//! - `logfile`: log sinks and sources backed by files.
//! - `console`: the console output port.

pub mod channel;
pub mod console;
pub mod engine;
pub mod gate;
pub mod instrument;
pub mod logfile;
pub mod pcap;
pub mod vdisk;
pub mod wasi;

use std::path::PathBuf;

use ftvm_log::{LogHeader, VmSpec};
use wasmtime::{Engine, Instance, Linker, Module, Store};

pub use gate::{Gate, GoLive, LogSink, LogSource, Output, OutputPort, ReplayEnd, World};
use wasi::fd::FdKind;
use wasi::{GuestExit, Host, PoweredOff};

/// Process exit codes of `ftvm` for its own failures (the guest's exit code passes through).
pub mod exit_code {
    pub const USAGE: i32 = 2;
    pub const BAD_MODULE: i32 = 120;
    pub const BAD_LOG: i32 = 121;
    pub const DIVERGENCE: i32 = 122;
    pub const TRAP: i32 = 123;
    pub const OUT_OF_MEMORY: i32 = 124;
    pub const IO: i32 = 125;
    pub const INTERNAL: i32 = 126;
    pub const HALTED: i32 = 127;
}

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("bad module: {0}")]
    BadModule(String),
    #[error("the log does not belong to this VM: {0}")]
    LogMismatch(String),
    #[error("bad log: {0}")]
    LogCorrupt(String),
    #[error("replay stopped: {0}")]
    LogEnded(String),
    #[error("replay diverged at log entry {seq} (gate event {event}): {what}")]
    Divergence { seq: u64, event: u64, what: String },
    #[error("guest trapped: {message}")]
    Trap { message: String, backtrace: String },
    #[error("guest ran out of memory: it asked to grow its memory past the cap of {cap_bytes} bytes and then trapped ({message})")]
    OutOfMemory { cap_bytes: u64, message: String },
    #[error("bad VM configuration: {0}")]
    Config(String),
    #[error("cannot use the disk: {0}")]
    Disk(String),
    #[error("cannot write the log: {0}; the VM stopped so that nothing goes unrecorded")]
    LogWrite(String),
    #[error("the VM was powered off")]
    PoweredOff,
    #[error("halted: {0}")]
    Halted(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl VmError {
    /// Whether every replica ends the same way here: the guest's own trap or running out of its
    /// fixed memory, or a power-off from the log. Anything else (a host's failure, a halt, a
    /// divergence) is one replica's failure.
    pub fn ends_the_vm_everywhere(&self) -> bool {
        matches!(
            self,
            VmError::Trap { .. } | VmError::OutOfMemory { .. } | VmError::PoweredOff
        )
    }

    pub fn exit_code(&self) -> i32 {
        match self {
            VmError::BadModule(_) => exit_code::BAD_MODULE,
            VmError::LogMismatch(_) | VmError::LogCorrupt(_) | VmError::LogEnded(_) => {
                exit_code::BAD_LOG
            }
            VmError::Divergence { .. } => exit_code::DIVERGENCE,
            VmError::Trap { .. } => exit_code::TRAP,
            VmError::OutOfMemory { .. } => exit_code::OUT_OF_MEMORY,
            VmError::Config(_) => exit_code::USAGE,
            VmError::Disk(_) | VmError::LogWrite(_) => exit_code::IO,
            VmError::PoweredOff => 0,
            VmError::Halted(_) => exit_code::HALTED,
            VmError::Internal(_) => exit_code::INTERNAL,
        }
    }
}

/// How a VM ended, when it ended normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmOutcome {
    Exited(u32),
    PoweredOff,
}

/// A VM definition bound to this host: the module bytes and where its disk lives here.
pub struct VmImage {
    pub name: String,
    pub module_bytes: Vec<u8>,
    pub spec: VmSpec,
    /// Host directories backing `spec.preopens`, in the same order.
    pub dirs: Vec<PathBuf>,
}

impl VmImage {
    /// The log header for this VM (hashes the disk's current contents).
    pub fn header(&self) -> Result<LogHeader, VmError> {
        Ok(LogHeader {
            module_hash: engine::module_hash(&self.module_bytes),
            disk_hash: VmImage::disk_hash(&self.dirs)?,
            spec: self.spec.clone(),
            engine: engine::ENGINE_ID.to_string(),
        })
    }

    pub fn disk_hash(dirs: &[PathBuf]) -> Result<String, VmError> {
        for d in dirs {
            if !d.is_dir() {
                return Err(VmError::Disk(format!(
                    "{} is not a readable directory",
                    d.display()
                )));
            }
        }
        vdisk::VDisk::content_hash(dirs).map_err(VmError::Disk)
    }

    /// Refuses to replay a log recorded for another VM.
    pub fn check_log_header(&self, header: &LogHeader) -> Result<(), VmError> {
        let mine = self.header()?;
        if header.engine != mine.engine {
            return Err(VmError::LogMismatch(format!(
                "it was recorded by engine `{}`, this is `{}`",
                header.engine, mine.engine
            )));
        }
        if header.module_hash != mine.module_hash {
            return Err(VmError::LogMismatch(format!(
                "it was recorded with module {}…, this module is {}…",
                &header.module_hash[..16],
                &mine.module_hash[..16]
            )));
        }
        if header.spec != mine.spec {
            return Err(VmError::LogMismatch(format!(
                "it was recorded with a different VM configuration (args, env, preopens, listeners, NIC or limits): \
                 log has {:?}, replay has {:?}",
                header.spec, mine.spec
            )));
        }
        if header.disk_hash != mine.disk_hash {
            return Err(VmError::LogMismatch(format!(
                "the starting disk differs from the recording's (disk hash {}… in the log, {}… here); \
                 replay needs a copy of the disk as it was when recording started",
                &header.disk_hash[..16],
                &mine.disk_hash[..16]
            )));
        }
        Ok(())
    }
}

/// A booted VM, ready to run its guest.
pub struct Vm {
    store: Store<Host>,
    instance: Instance,
}

impl Vm {
    pub fn boot(image: &VmImage, gate: Gate) -> Result<Vm, VmError> {
        let spec = image.spec.clone();
        if image.dirs.len() != spec.preopens.len() {
            return Err(VmError::Config(
                "every preopen needs a host directory".into(),
            ));
        }
        for d in &image.dirs {
            std::fs::read_dir(d).map_err(|e| {
                VmError::Disk(format!(
                    "cannot read preopened directory {}: {e}",
                    d.display()
                ))
            })?;
        }
        let engine: Engine = engine::deterministic_engine(spec.limits.fuel)?;
        // Prepared so every global is reachable for the state hash; unparseable bytes pass
        // through unchanged, so the engine's error is about the user's module.
        let prepared = instrument::export_all_globals(&image.module_bytes);
        let module: Module = engine::load_module(&engine, &prepared, &image.name)?;
        let mut linker = Linker::new(&engine);
        wasi::add_to_linker(&mut linker)?;

        let limits = wasi::VmLimiter {
            memory_bytes_max: spec.limits.memory_bytes_max,
            table_elements_max: spec.limits.table_elements_max,
            memory_refused: false,
        };
        let net = spec.nic.as_ref().map(|nic| {
            let mut net = ftvm_net::NetStack::new(
                ftvm_net::NicConfig {
                    mac: nic.mac,
                    ip: nic.ip,
                    prefix_len: nic.prefix_len,
                    gateway: nic.gateway,
                    mtu: 1500,
                },
                nic.seed,
            );
            // Announce the VM's MAC/IP at power-on (switches may remember it elsewhere, say where
            // a previous incarnation of this VM ran). Sent at the first wait point, on every
            // replica alike, so it is part of the replayed output.
            net.announce();
            // ACKs of in-order data wait for the end of the guest's turn (its next wait point),
            // so a reply carries them: one frame out per request instead of two.
            net.set_defer_acks(true);
            net
        });
        let mut host = Host {
            spec: spec.clone(),
            gate,
            fds: Default::default(),
            disk: vdisk::VDisk::new(image.dirs.clone()),
            net,
            limits,
            memory: None,
            globals: Vec::new(),
            fuel: spec.limits.fuel,
        };
        host.fds.insert(FdKind::Stdin, 0).expect("fd 0");
        host.fds.insert(FdKind::Stdout, 0).expect("fd 1");
        host.fds.insert(FdKind::Stderr, 0).expect("fd 2");
        for (i, guest) in spec.preopens.iter().enumerate() {
            host.fds
                .insert(
                    FdKind::Dir {
                        root: i as u32,
                        rel: String::new(),
                        preopen: Some(guest.clone()),
                    },
                    0,
                )
                .map_err(|_| VmError::Config("too many preopens".into()))?;
        }
        wasi::sock::preopen_listeners(&mut host)?;

        let mut store = Store::new(&engine, host);
        store.limiter(|h| &mut h.limits);
        let instance = linker
            .instantiate(&mut store, &module)
            .map_err(|e| classify(&mut store, e))?;
        if spec.limits.fuel {
            store
                .set_fuel(wasi::FUEL_START)
                .map_err(|e| VmError::Internal(e.to_string()))?;
        }
        let memory = instance
            .get_memory(&mut store, "memory")
            .ok_or_else(|| VmError::BadModule(format!("{} exports no memory", image.name)))?;
        let globals: Vec<_> = module
            .exports()
            .filter(|e| matches!(e.ty(), wasmtime::ExternType::Global(_)))
            .map(|e| e.name().to_string())
            .collect::<Vec<_>>()
            .into_iter()
            .filter_map(|name| instance.get_global(&mut store, &name))
            .collect();
        store.data_mut().memory = Some(memory);
        store.data_mut().globals = globals;
        Ok(Vm { store, instance })
    }

    pub fn host(&self) -> &Host {
        self.store.data()
    }

    pub fn host_mut(&mut self) -> &mut Host {
        self.store.data_mut()
    }

    /// Runs the guest to its end, recording or checking the end in the log.
    pub fn run(&mut self) -> Result<VmOutcome, VmError> {
        let start = self
            .instance
            .get_typed_func::<(), ()>(&mut self.store, "_start")
            .map_err(|e| {
                VmError::BadModule(format!("`_start` is not a function of no arguments: {e}"))
            })?;
        let result = start.call(&mut self.store, ());
        let code = match result {
            Ok(()) => 0,
            Err(e) => {
                if let Some(GuestExit(code)) = e.downcast_ref::<GuestExit>() {
                    *code
                } else if e.downcast_ref::<PoweredOff>().is_some() {
                    self.store.data_mut().gate.power_off()?;
                    return Ok(VmOutcome::PoweredOff);
                } else {
                    let err = classify(&mut self.store, e);
                    if let VmError::PoweredOff = err {
                        self.store.data_mut().gate.power_off()?;
                        return Ok(VmOutcome::PoweredOff);
                    }
                    if let VmError::Trap { message, .. } | VmError::OutOfMemory { message, .. } =
                        &err
                    {
                        let message = message.clone();
                        self.final_checkpoint()?;
                        self.store.data_mut().gate.trap(&message)?;
                    }
                    return Err(err);
                }
            }
        };
        self.final_checkpoint()?;
        self.store.data_mut().gate.exit(code)?;
        Ok(VmOutcome::Exited(code))
    }

    fn final_checkpoint(&mut self) -> Result<(), VmError> {
        let hash = wasi::state_hash(&mut self.store);
        let fuel = wasi::fuel_used(&self.store);
        self.store.data_mut().gate.checkpoint(hash, fuel)
    }

    /// Hash of the VM's whole state now.
    pub fn state_hash(&mut self) -> [u8; 32] {
        wasi::state_hash(&mut self.store)
    }
}

/// Turns an error out of wasm into a `VmError`.
fn classify(store: &mut Store<Host>, e: wasmtime::Error) -> VmError {
    let e = match e.downcast::<VmError>() {
        Ok(vm) => return vm,
        Err(e) => e,
    };
    let backtrace = e
        .downcast_ref::<wasmtime::WasmBacktrace>()
        .map(|b| format!("{b}"))
        .unwrap_or_default();
    let message = match e.downcast_ref::<wasmtime::Trap>() {
        Some(trap) => trap.to_string(),
        None => engine::first_line(&e),
    };
    if store.data().limits.memory_refused {
        return VmError::OutOfMemory {
            cap_bytes: store.data().spec.limits.memory_bytes_max,
            message,
        };
    }
    VmError::Trap { message, backtrace }
}
