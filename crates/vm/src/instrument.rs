//! Module preparation: export every global, so the state hash (and later a snapshot) can read
//! globals the guest keeps private, such as `__stack_pointer`.
//!
//! The rewrite touches only the export section; every other section is copied byte for byte, so
//! code offsets in backtraces stay those of the original module. It is a pure function of the
//! module bytes, so both replicas run the same prepared module.

/// Prefix of the exports we add.
pub const GLOBAL_EXPORT_PREFIX: &str = "__ftvm_global_";

const SECTION_GLOBAL: u8 = 6;
const SECTION_EXPORT: u8 = 7;
const EXTERNAL_GLOBAL: u8 = 3;

fn read_leb(bytes: &[u8], pos: &mut usize) -> Result<u32, String> {
    let mut result: u64 = 0;
    let mut shift = 0;
    loop {
        let b = *bytes.get(*pos).ok_or("truncated LEB128")?;
        *pos += 1;
        result |= ((b & 0x7f) as u64) << shift;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
        if shift > 28 {
            return Err("LEB128 too long".into());
        }
    }
    u32::try_from(result).map_err(|_| "LEB128 out of range".to_string())
}

fn write_leb(out: &mut Vec<u8>, mut v: u32) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            break;
        }
        out.push(byte | 0x80);
    }
}

/// Returns the module with every global exported. Text (WAT) modules and modules that do not
/// parse are returned unchanged: the engine reports their errors.
pub fn export_all_globals(bytes: &[u8]) -> Vec<u8> {
    match try_export(bytes) {
        Ok(Some(out)) => out,
        _ => bytes.to_vec(),
    }
}

fn try_export(bytes: &[u8]) -> Result<Option<Vec<u8>>, String> {
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Ok(None);
    }
    // First pass: section boundaries, global count, already-exported globals.
    let mut sections = Vec::new();
    let mut pos = 8;
    let mut globals = 0u32;
    let mut exported = std::collections::BTreeSet::new();
    while pos < bytes.len() {
        let id = bytes[pos];
        pos += 1;
        let size = read_leb(bytes, &mut pos)? as usize;
        let body = pos..pos
            .checked_add(size)
            .filter(|&e| e <= bytes.len())
            .ok_or("section overruns the module")?;
        match id {
            SECTION_GLOBAL => {
                let mut p = body.start;
                globals = read_leb(bytes, &mut p)?;
            }
            SECTION_EXPORT => {
                let mut p = body.start;
                let count = read_leb(bytes, &mut p)?;
                for _ in 0..count {
                    let len = read_leb(bytes, &mut p)? as usize;
                    p += len;
                    let kind = *bytes.get(p).ok_or("truncated export")?;
                    p += 1;
                    let index = read_leb(bytes, &mut p)?;
                    if kind == EXTERNAL_GLOBAL {
                        exported.insert(index);
                    }
                }
            }
            _ => {}
        }
        sections.push((id, body.clone()));
        pos = body.end;
    }
    let missing: Vec<u32> = (0..globals).filter(|g| !exported.contains(g)).collect();
    if missing.is_empty() {
        return Ok(None);
    }
    let Some((_, export_body)) = sections.iter().find(|(id, _)| *id == SECTION_EXPORT) else {
        return Ok(None);
    };
    // Second pass: copy, replacing the export section.
    let mut p = export_body.start;
    let old_count = read_leb(bytes, &mut p)?;
    let mut body = Vec::new();
    write_leb(&mut body, old_count + missing.len() as u32);
    body.extend_from_slice(&bytes[p..export_body.end]);
    for g in &missing {
        let name = format!("{GLOBAL_EXPORT_PREFIX}{g}");
        write_leb(&mut body, name.len() as u32);
        body.extend_from_slice(name.as_bytes());
        body.push(EXTERNAL_GLOBAL);
        write_leb(&mut body, *g);
    }
    let mut out = bytes[..8].to_vec();
    for (id, range) in &sections {
        out.push(*id);
        if *id == SECTION_EXPORT {
            write_leb(&mut out, body.len() as u32);
            out.extend_from_slice(&body);
        } else {
            write_leb(&mut out, (range.end - range.start) as u32);
            out.extend_from_slice(&bytes[range.clone()]);
        }
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_globals_become_exports_and_the_module_still_runs() {
        let wat = r#"(module
            (global $sp (mut i32) (i32.const 1024))
            (global $k i64 (i64.const 7))
            (global (export "visible") (mut i32) (i32.const 3))
            (memory (export "memory") 1)
            (func (export "_start") (global.set $sp (i32.const 99))))"#;
        let bytes = wat::parse_str(wat).unwrap();
        let out = export_all_globals(&bytes);
        let engine = wasmtime::Engine::default();
        let module = wasmtime::Module::new(&engine, &out).unwrap();
        let names: Vec<_> = module.exports().map(|e| e.name().to_string()).collect();
        assert!(names.contains(&"__ftvm_global_0".to_string()), "{names:?}");
        assert!(names.contains(&"__ftvm_global_1".to_string()));
        assert!(
            !names.contains(&"__ftvm_global_2".to_string()),
            "already exported ones are not doubled"
        );
        let mut store = wasmtime::Store::new(&engine, ());
        let instance = wasmtime::Instance::new(&mut store, &module, &[]).unwrap();
        instance
            .get_typed_func::<(), ()>(&mut store, "_start")
            .unwrap()
            .call(&mut store, ())
            .unwrap();
        let sp = instance
            .get_global(&mut store, "__ftvm_global_0")
            .unwrap()
            .get(&mut store);
        assert_eq!(sp.i32(), Some(99));
    }

    #[test]
    fn garbage_passes_through_unchanged() {
        assert_eq!(
            export_all_globals(b"\0asm\x01\0\0\0\x07\xff"),
            b"\0asm\x01\0\0\0\x07\xff".to_vec()
        );
        assert_eq!(export_all_globals(b"(module)"), b"(module)".to_vec());
    }
}
