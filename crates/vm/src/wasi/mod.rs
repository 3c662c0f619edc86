//! Our own `wasi_snapshot_preview1`: every function a C or Zig program built for wasm32-wasi
//! imports. One file per interface; every non-deterministic value comes through `Host::gate`.
//!
//! Functions we do not support return an errno (`ENOSYS`/`ENOTSUP`), never a trap. A trap from
//! a host function means the VM must stop: the guest exited, the replay diverged, or the log broke.

pub mod errno;
pub mod fd;
mod fs;
pub mod mem;
mod poll;
pub(crate) mod sock;

use ftvm_log::entry::{
    CLOCK_MONOTONIC, CLOCK_PROCESS_CPUTIME, CLOCK_REALTIME, CLOCK_THREAD_CPUTIME,
};
use ftvm_log::VmSpec;
use serde::Serialize;
use wasmtime::{AsContextMut, Caller, Global, Linker, Memory};

use crate::gate::{Gate, Output};
use crate::vdisk::{DiskMeta, VDisk};
use crate::VmError;
use errno::Errno;
use fd::{FdKind, FdTable};
use mem::GuestMem;

pub use crate::engine::WASI_MODULE;

/// Most iovecs in one call.
pub const IOVECS_MAX: u32 = 1024;
/// Largest single read or write the host performs for the guest; longer requests are partial.
pub const IO_BYTES_MAX: usize = 1 << 20;
/// Largest console output chunk handed to the output path at once.
pub const CONSOLE_CHUNK_BYTES_MAX: usize = 64 << 10;
/// Most subscriptions in one `poll_oneoff`.
pub const POLL_SUBSCRIPTIONS_MAX: u32 = 4096;
/// Fuel a store starts with when counting instructions; consumption is measured from here.
pub const FUEL_START: u64 = u64::MAX / 2;

/// All rights: we check access by how a file was opened, not by rights bits.
const RIGHTS_ALL: u64 = (1 << 30) - 1;

/// Host-side VM state: the fd table, the disk's metadata, the netstack, the gate.
pub struct Host {
    pub spec: VmSpec,
    pub gate: Gate,
    pub fds: FdTable,
    pub disk: VDisk,
    pub net: Option<ftvm_net::NetStack>,
    pub limits: VmLimiter,
    pub memory: Option<Memory>,
    pub globals: Vec<Global>,
    pub fuel: bool,
}

/// Fixed caps on memory and tables, so `memory.grow` answers the same on every host. Remembers a
/// refusal so that a trap after it can be reported as running out of memory.
pub struct VmLimiter {
    pub memory_bytes_max: u64,
    pub table_elements_max: u32,
    pub memory_refused: bool,
}

impl wasmtime::ResourceLimiter for VmLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let ok = desired as u64 <= self.memory_bytes_max && maximum.is_none_or(|m| desired <= m);
        if !ok {
            self.memory_refused = true;
        }
        Ok(ok)
    }
    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(
            desired as u64 <= self.table_elements_max as u64
                && maximum.is_none_or(|m| desired <= m),
        )
    }
    fn instances(&self) -> usize {
        1
    }
    fn memories(&self) -> usize {
        1
    }
    fn tables(&self) -> usize {
        4
    }
}

/// Why a host function did not succeed: an errno for the guest, or a reason to stop the VM.
pub enum Fail {
    Errno(Errno),
    Fatal(VmError),
}

/// What the gate said of a disk operation (`Gate::disk_op`, `Gate::disk_write`), as a result.
pub(crate) fn disk<T>(outcome: Result<Result<T, Errno>, VmError>) -> HostResult<T> {
    match outcome {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Fail::Errno(e)),
        Err(fatal) => Err(Fail::Fatal(fatal)),
    }
}
impl From<Errno> for Fail {
    fn from(e: Errno) -> Fail {
        Fail::Errno(e)
    }
}
impl From<VmError> for Fail {
    fn from(e: VmError) -> Fail {
        Fail::Fatal(e)
    }
}
pub type HostResult<T> = Result<T, Fail>;

pub(crate) fn finish(result: HostResult<()>) -> wasmtime::Result<i32> {
    match result {
        Ok(()) => Ok(0),
        Err(Fail::Errno(e)) => Ok(e as i32),
        Err(Fail::Fatal(v)) => Err(wasmtime::Error::new(v)),
    }
}

/// Guest memory and host state at once.
pub(crate) fn split<'a>(caller: &'a mut Caller<'_, Host>) -> (GuestMem<'a>, &'a mut Host) {
    let memory = caller
        .data()
        .memory
        .expect("memory is set before the guest runs");
    let (bytes, host) = memory.data_and_store_mut(caller);
    (GuestMem(bytes), host)
}

/// Serializable snapshot of host-side state, hashed into checkpoints.
#[derive(Serialize)]
struct HostStateView<'a> {
    fds: &'a FdTable,
    disk: &'a DiskMeta,
    net: Option<[u8; 32]>,
    now_ns: u64,
    realtime_ns: u64,
}

/// Hash of the VM's state: linear memory, exported globals and host-side state.
pub fn state_hash(mut ctx: impl AsContextMut<Data = Host>) -> [u8; 32] {
    let mut ctx = ctx.as_context_mut();
    let mut hasher = blake3::Hasher::new();
    let memory = ctx.data().memory.expect("memory is set");
    hasher.update(memory.data(&ctx));
    let globals = ctx.data().globals.clone();
    for g in globals {
        let v = match g.get(&mut ctx) {
            wasmtime::Val::I32(v) => v as u64,
            wasmtime::Val::I64(v) => v as u64,
            wasmtime::Val::F32(v) => v as u64,
            wasmtime::Val::F64(v) => v,
            _ => 0,
        };
        hasher.update(&v.to_le_bytes());
    }
    let host = ctx.data();
    let view = HostStateView {
        fds: &host.fds,
        disk: &host.disk.meta,
        net: host.net.as_ref().map(|n| n.state_hash()),
        now_ns: host.gate.now_ns(),
        realtime_ns: host.gate.realtime_ns(),
    };
    hasher.update(&serde_json::to_vec(&view).expect("host state serializes"));
    *hasher.finalize().as_bytes()
}

/// Fuel consumed since instantiation, when counting.
pub fn fuel_used(ctx: &impl wasmtime::AsContext<Data = Host>) -> Option<u64> {
    let ctx = ctx.as_context();
    if !ctx.data().fuel {
        return None;
    }
    ctx.get_fuel().ok().map(|left| FUEL_START - left)
}

/// Call after every gate event: records or checks a checkpoint when one is due.
pub(crate) fn after_gate(caller: &mut Caller<'_, Host>) -> HostResult<()> {
    if caller.data().gate.checkpoint_due() {
        let hash = state_hash(&mut *caller);
        let fuel = fuel_used(caller);
        caller.data_mut().gate.checkpoint(hash, fuel)?;
    }
    Ok(())
}

/// Exit requested by the guest (`proc_exit`); carried out of wasm as an error.
#[derive(Debug)]
pub struct GuestExit(pub u32);
impl std::fmt::Display for GuestExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "guest exited with code {}", self.0)
    }
}
impl std::error::Error for GuestExit {}

/// An operator power-off delivered at a gate point; carried out of wasm as an error.
#[derive(Debug)]
pub struct PoweredOff;
impl std::fmt::Display for PoweredOff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the VM was powered off")
    }
}
impl std::error::Error for PoweredOff {}

macro_rules! wasi_fn {
    ($linker:expr, $name:literal, |$c:ident $(, $arg:ident : $ty:ty)*| $body:expr) => {
        $linker
            .func_wrap($crate::engine::WASI_MODULE, $name, |mut $c: wasmtime::Caller<'_, $crate::wasi::Host> $(, $arg: $ty)*| -> wasmtime::Result<i32> {
                // Calls are counted so that a disk operation can be named across replicas.
                $c.data_mut().gate.host_call();
                // A closure, so that `?` in the body ends the call with its error.
                #[allow(clippy::redundant_closure_call)]
                let result: $crate::wasi::HostResult<()> = (|| $body)();
                $crate::wasi::finish(result)
            })
            .map_err(|e| $crate::VmError::Internal(format!("cannot define {}: {e}", $name)))?;
    };
}
pub(crate) use wasi_fn;

/// Defines every preview1 function in `linker`.
pub fn add_to_linker(linker: &mut Linker<Host>) -> Result<(), VmError> {
    add_args_env_clocks(linker)?;
    fs::add_to_linker(linker)?;
    poll::add_to_linker(linker)?;
    sock::add_to_linker(linker)?;
    Ok(())
}

fn write_strings(
    mem: &mut GuestMem<'_>,
    strings: &[String],
    ptrs: u32,
    buf: u32,
) -> Result<(), Errno> {
    let mut at = buf;
    for (i, s) in strings.iter().enumerate() {
        mem.write_u32(ptrs + 4 * i as u32, at)?;
        mem.write_bytes(at, s.as_bytes())?;
        mem.write_u8(at + s.len() as u32, 0)?;
        at += s.len() as u32 + 1;
    }
    Ok(())
}

fn environ(spec: &VmSpec) -> Vec<String> {
    spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()
}

fn add_args_env_clocks(linker: &mut Linker<Host>) -> Result<(), VmError> {
    wasi_fn!(linker, "args_sizes_get", |c, argc: i32, size: i32| {
        let (mut mem, host) = split(&mut c);
        let args = &host.spec.args;
        mem.write_u32(argc as u32, args.len() as u32)?;
        mem.write_u32(size as u32, args.iter().map(|a| a.len() as u32 + 1).sum())?;
        Ok(())
    });
    wasi_fn!(linker, "args_get", |c, ptrs: i32, buf: i32| {
        let (mut mem, host) = split(&mut c);
        let args = host.spec.args.clone();
        write_strings(&mut mem, &args, ptrs as u32, buf as u32)?;
        Ok(())
    });
    wasi_fn!(linker, "environ_sizes_get", |c, count: i32, size: i32| {
        let (mut mem, host) = split(&mut c);
        let env = environ(&host.spec);
        mem.write_u32(count as u32, env.len() as u32)?;
        mem.write_u32(size as u32, env.iter().map(|a| a.len() as u32 + 1).sum())?;
        Ok(())
    });
    wasi_fn!(linker, "environ_get", |c, ptrs: i32, buf: i32| {
        let (mut mem, host) = split(&mut c);
        let env = environ(&host.spec);
        write_strings(&mut mem, &env, ptrs as u32, buf as u32)?;
        Ok(())
    });
    wasi_fn!(linker, "clock_res_get", |c, id: i32, out: i32| {
        // Resolutions are constants, not host readings: they are part of the VM's definition.
        let res: u64 = match id as u32 {
            CLOCK_REALTIME | CLOCK_MONOTONIC => 1_000,
            CLOCK_PROCESS_CPUTIME | CLOCK_THREAD_CPUTIME => 1_000,
            _ => return Err(errno::INVAL.into()),
        };
        let (mut mem, _) = split(&mut c);
        mem.write_u64(out as u32, res)?;
        Ok(())
    });
    wasi_fn!(
        linker,
        "clock_time_get",
        |c, id: i32, _precision: i64, out: i32| {
            let id = id as u32;
            if id > CLOCK_THREAD_CPUTIME {
                return Err(errno::INVAL.into());
            }
            // Check the pointer before consulting the gate so a bad pointer records nothing.
            split(&mut c).0.slice(out as u32, 8)?;
            let ns = c.data_mut().gate.clock(id)?;
            split(&mut c).0.write_u64(out as u32, ns)?;
            after_gate(&mut c)
        }
    );
    wasi_fn!(linker, "random_get", |c, buf: i32, len: i32| {
        let (buf, len) = (buf as u32, len as u32);
        if len as usize > IO_BYTES_MAX {
            return Err(errno::INVAL.into());
        }
        split(&mut c).0.slice(buf, len)?;
        let mut bytes = vec![0u8; len as usize];
        c.data_mut().gate.random(&mut bytes)?;
        split(&mut c).0.write_bytes(buf, &bytes)?;
        after_gate(&mut c)
    });
    wasi_fn!(linker, "sched_yield", |c| {
        // A single-threaded VM has no one to yield to; a pure function of state, not a gate event.
        let _ = &mut c;
        Ok(())
    });
    linker
        .func_wrap(
            WASI_MODULE,
            "proc_exit",
            |_c: Caller<'_, Host>, code: i32| -> wasmtime::Result<()> {
                Err(wasmtime::Error::new(GuestExit(code as u32)))
            },
        )
        .map_err(|e| VmError::Internal(format!("cannot define proc_exit: {e}")))?;
    wasi_fn!(linker, "proc_raise", |c, _sig: i32| {
        let _ = &mut c;
        Err(errno::NOSYS.into())
    });
    Ok(())
}

/// Writes console bytes through the output path.
pub(crate) fn console_write(host: &mut Host, fd: u8, data: &[u8]) -> HostResult<()> {
    for chunk in data.chunks(CONSOLE_CHUNK_BYTES_MAX) {
        host.gate.output(Output::Console {
            fd,
            bytes: chunk.to_vec(),
        })?;
    }
    Ok(())
}

/// Sends the frames the netstack queued through the output path.
pub(crate) fn flush_net(host: &mut Host) -> HostResult<()> {
    let Some(net) = host.net.as_mut() else {
        return Ok(());
    };
    let frames: Vec<Vec<u8>> = net.drain_frames().collect();
    for frame in frames {
        host.gate.output(Output::Frame(frame))?;
    }
    Ok(())
}

pub(crate) fn is_nonblocking(flags: u16) -> bool {
    flags & fd::FDFLAG_NONBLOCK != 0
}

pub(crate) fn filetype_of(kind: &FdKind) -> u8 {
    match kind {
        FdKind::Stdin | FdKind::Stdout | FdKind::Stderr => 2, // character device
        FdKind::Dir { .. } => 3,
        FdKind::File { .. } => 4,
        FdKind::Listener { .. } | FdKind::Socket { .. } => 6, // socket_stream
    }
}

pub(crate) const RIGHTS: u64 = RIGHTS_ALL;
