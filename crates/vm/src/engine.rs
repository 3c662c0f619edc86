//! The wasmtime engine, configured so that the same module computes the same thing on every host,
//! and the checks a module must pass before it may run.

use wasmtime::{Config, Engine, ExternType, Module, OptLevel};

use crate::VmError;

/// The engine identity recorded in logs: replay needs the same wasmtime and the same settings.
pub const ENGINE_ID: &str = "wasmtime-48.0.8/cranelift/nan-canonical/no-threads/no-relaxed-simd/v1";

/// The only import module a guest may use.
pub const WASI_MODULE: &str = "wasi_snapshot_preview1";

/// Builds an engine whose results are a pure function of the module and its inputs.
pub fn deterministic_engine(fuel: bool) -> Result<Engine, VmError> {
    let mut config = Config::new();
    config
        .cranelift_opt_level(OptLevel::Speed)
        // NaN bit patterns are otherwise whatever the host CPU produces.
        .cranelift_nan_canonicalization(true)
        // Relaxed SIMD results are implementation-defined; disable it outright.
        .wasm_relaxed_simd(false)
        // Threads: wasmtime is built without its `threads` feature, so shared memory and
        // atomics-wait cannot be enabled at all.
        // Epochs are wall-clock driven and would make interruption points differ between hosts.
        .epoch_interruption(false)
        .consume_fuel(fuel)
        .wasm_backtrace_max_frames(std::num::NonZeroUsize::new(64))
        // Memory size is bounded by our ResourceLimiter, never by how much address space a host has.
        .memory_reservation(4 << 30)
        .memory_guard_size(2 << 30);
    Engine::new(&config)
        .map_err(|e| VmError::Internal(format!("cannot build the wasm engine: {e}")))
}

/// The blake3 hash of a module's bytes, as recorded in logs and compared in handshakes.
pub fn module_hash(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// Compiles and checks a module: it must be a WASI preview1 command.
pub fn load_module(engine: &Engine, bytes: &[u8], name: &str) -> Result<Module, VmError> {
    let looks_binary = bytes.starts_with(b"\0asm");
    let looks_text = std::str::from_utf8(bytes).is_ok_and(|t| t.trim_start().starts_with('('));
    if !looks_binary && !looks_text {
        return Err(VmError::BadModule(format!(
            "{name} is not a WebAssembly module (it starts with neither the \\0asm magic nor WAT text)"
        )));
    }
    let module = Module::new(engine, bytes).map_err(|e| {
        VmError::BadModule(format!(
            "{name} is not a valid WebAssembly module: {}",
            first_line(&e)
        ))
    })?;
    for import in module.imports() {
        if import.module() != WASI_MODULE {
            return Err(VmError::BadModule(format!(
                "{name} imports `{}::{}`, but ftvm provides only `{WASI_MODULE}` (is it a WASI preview1 program?)",
                import.module(),
                import.name()
            )));
        }
        if !matches!(import.ty(), ExternType::Func(_)) {
            return Err(VmError::BadModule(format!(
                "{name} imports `{WASI_MODULE}::{}` as something other than a function",
                import.name()
            )));
        }
    }
    let exports: Vec<_> = module.exports().map(|e| e.name().to_string()).collect();
    if !exports.iter().any(|e| e == "_start") {
        return Err(VmError::BadModule(format!(
            "{name} has no `_start` export: ftvm runs WASI commands, not reactors or libraries"
        )));
    }
    if !exports.iter().any(|e| e == "memory") {
        return Err(VmError::BadModule(format!("{name} exports no `memory`")));
    }
    Ok(module)
}

pub(crate) fn first_line(e: &impl std::fmt::Display) -> String {
    let text = format!("{e:#}");
    text.lines().next().unwrap_or("").to_string()
}
