//! The virtual disk: preopened host directories as the VM's own, deterministic disk.
//!
//! Each replica has its own copy of the disk (the paper's non-shared disk): guest reads and writes
//! execute on both replicas, so disk writes are not outputs and are not delayed. For replay to
//! hold, everything the guest can see of the disk must be a function of its starting contents and
//! of what the guest did, never of the host. The choices:
//!
//! - **Directory order**: entries are listed sorted by name bytes, after `.` and `..`.
//! - **Inode numbers**: a hash of the path inside the disk (so a rename changes the inode; no
//!   guest we know of depends on inode stability across rename). `dev` is the preopen's index + 1.
//! - **Timestamps**: a file the guest wrote or created carries the virtual wall-clock time of the
//!   VM's last clock reading at that moment (from the gate, so identical on both replicas); a file
//!   it never touched shows time 0. atime = mtime = ctime. Explicit `set_times` are honoured.
//! - **Link counts**: always 1. **Sizes**: the real size, which the contents determine.
//! - **Symlinks** are not part of the virtual disk: creating one fails with `ENOTSUP`, and a host
//!   symlink found while resolving a path is refused with `EPERM` (it could point outside the disk
//!   or at different things on different hosts). Paths cannot leave the preopen (`..` past its root
//!   is `ENOTCAPABLE`).
//! - **What the host's disk does not do** is an input from the host like any other. Every host
//!   file-system operation goes through the gate (`Gate::disk_op`, `Gate::disk_write`), named
//!   by the guest's WASI call number and its index within the call. When recording, a failure
//!   (the operation did nothing: every failing operation here is all-or-nothing) is logged as
//!   `HostError` with its errno, and a write that a full disk took only part of as `HostShort`
//!   with the bytes it took; the guest sees the errno or, as with write(2), the short count.
//!   A replayer does the same without asking its own disk: it fails that operation with the
//!   logged errno, or writes exactly the logged bytes. So the replicas' disks stay alike even
//!   when only the primary's is full, and a recorded failure replays on any disk. A replayer
//!   whose own disk does less than the recording's (fails where it succeeded, takes less of a
//!   write) cannot follow and stops with a divergence at that operation: a backup never goes
//!   live with a disk that differs.
//!
//! The metadata the disk keeps (timestamps) is plain, serializable data (`DiskMeta`).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::wasi::errno::{self, Errno};

/// Longest path the guest may pass.
pub const PATH_BYTES_MAX: usize = 4096;
/// Deepest directory nesting hashed or resolved.
pub const PATH_DEPTH_MAX: usize = 64;

/// Timestamps the guest caused, keyed by preopen index, then path inside it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskMeta {
    pub times: BTreeMap<u32, BTreeMap<String, u64>>,
}

pub struct VDisk {
    /// Host directories backing each preopen; local configuration, not replicated state.
    roots: Vec<PathBuf>,
    pub meta: DiskMeta,
}

impl VDisk {
    pub fn new(roots: Vec<PathBuf>) -> VDisk {
        VDisk {
            roots,
            meta: DiskMeta::default(),
        }
    }

    pub fn root_count(&self) -> usize {
        self.roots.len()
    }

    /// Resolves `path` relative to directory `base` of preopen `root` into a path inside the disk,
    /// by the names alone: the host's disk is not asked (see [`VDisk::refuse_symlinks`]).
    pub fn resolve(&self, root: u32, base: &str, path: &str) -> Result<String, Errno> {
        if path.len() > PATH_BYTES_MAX {
            return Err(errno::NAMETOOLONG);
        }
        if path.is_empty() {
            return Err(errno::NOENT);
        }
        if path.starts_with('/') {
            return Err(errno::NOTCAPABLE);
        }
        let mut parts: Vec<&str> = base.split('/').filter(|p| !p.is_empty()).collect();
        for part in path.split('/') {
            match part {
                "" | "." => {}
                ".." => {
                    if parts.pop().is_none() {
                        return Err(errno::NOTCAPABLE);
                    }
                }
                other => {
                    if other.contains('\0') {
                        return Err(errno::INVAL);
                    }
                    parts.push(other);
                }
            }
            if parts.len() > PATH_DEPTH_MAX {
                return Err(errno::NAMETOOLONG);
            }
        }
        self.root_path(root)?;
        Ok(parts.join("/"))
    }

    /// Fails with `EPERM` if a host symlink lies on the way to `rel` inside preopen `root` (the
    /// components that exist; the last may not yet). This reads the host's file metadata, a
    /// gate input: call it through `Gate::disk_op`, as every other disk operation.
    pub fn refuse_symlinks(&self, root: u32, rel: &str) -> std::io::Result<()> {
        let Ok(base) = self.root_path(root) else {
            return Err(std::io::Error::from_raw_os_error(libc::EBADF));
        };
        let mut host = base.to_path_buf();
        for part in rel.split('/').filter(|p| !p.is_empty()) {
            host.push(part);
            match std::fs::symlink_metadata(&host) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(std::io::Error::from_raw_os_error(libc::EPERM))
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        Ok(())
    }

    pub fn root_path(&self, root: u32) -> Result<&Path, Errno> {
        self.roots
            .get(root as usize)
            .map(PathBuf::as_path)
            .ok_or(errno::BADF)
    }

    pub fn host_path(&self, root: u32, rel: &str) -> Result<PathBuf, Errno> {
        let base = self.root_path(root)?;
        Ok(if rel.is_empty() {
            base.to_path_buf()
        } else {
            base.join(rel)
        })
    }

    pub fn ino(root: u32, rel: &str) -> u64 {
        // FNV-1a: stable across hosts and builds, unlike std's hasher.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in root.to_le_bytes().iter().chain(rel.as_bytes()) {
            h ^= *b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h | 1
    }

    pub fn mtime(&self, root: u32, rel: &str) -> u64 {
        self.meta
            .times
            .get(&root)
            .and_then(|t| t.get(rel))
            .copied()
            .unwrap_or(0)
    }

    pub fn touch(&mut self, root: u32, rel: &str, now_ns: u64) {
        self.meta
            .times
            .entry(root)
            .or_default()
            .insert(rel.to_string(), now_ns);
    }

    pub fn forget(&mut self, root: u32, rel: &str) {
        let prefix = format!("{rel}/");
        if let Some(times) = self.meta.times.get_mut(&root) {
            times.retain(|p, _| !(p == rel || p.starts_with(&prefix)));
        }
    }

    pub fn renamed(&mut self, root: u32, from: &str, to_root: u32, to: &str) {
        let prefix = format!("{from}/");
        let moved: Vec<(String, u64)> = self
            .meta
            .times
            .get(&root)
            .map(|t| {
                t.iter()
                    .filter(|(p, _)| *p == from || p.starts_with(&prefix))
                    .map(|(p, v)| (p.clone(), *v))
                    .collect()
            })
            .unwrap_or_default();
        self.forget(root, from);
        self.forget(to_root, to);
        for (p, t) in moved {
            let new = format!("{to}{}", &p[from.len()..]);
            self.touch(to_root, &new, t);
        }
    }

    /// Hash of the starting contents of every preopen: paths, kinds, sizes and bytes.
    pub fn content_hash(roots: &[PathBuf]) -> Result<String, String> {
        let mut hasher = blake3::Hasher::new();
        for (i, root) in roots.iter().enumerate() {
            hasher.update(&(i as u64).to_le_bytes());
            hash_tree(root, root, &mut hasher, 0)?;
        }
        Ok(hasher.finalize().to_hex().to_string())
    }
}

fn hash_tree(
    root: &Path,
    dir: &Path,
    hasher: &mut blake3::Hasher,
    depth: usize,
) -> Result<(), String> {
    if depth > PATH_DEPTH_MAX {
        return Err(format!(
            "{} nests deeper than {PATH_DEPTH_MAX} directories",
            dir.display()
        ));
    }
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| format!("cannot read directory {}: {e}", dir.display()))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("cannot read directory {}: {e}", dir.display()))?;
    names.sort();
    for name in names {
        let path = dir.join(&name);
        let rel = path
            .strip_prefix(root)
            .expect("inside root")
            .to_string_lossy()
            .into_owned();
        let meta = std::fs::symlink_metadata(&path)
            .map_err(|e| format!("cannot stat {}: {e}", path.display()))?;
        hasher.update(rel.as_bytes());
        hasher.update(&[0]);
        if meta.file_type().is_symlink() {
            hasher.update(b"L");
            let target = std::fs::read_link(&path)
                .map_err(|e| format!("cannot read link {}: {e}", path.display()))?;
            hasher.update(target.to_string_lossy().as_bytes());
        } else if meta.is_dir() {
            hasher.update(b"D");
            hash_tree(root, &path, hasher, depth + 1)?;
        } else {
            hasher.update(b"F");
            hasher.update(&meta.len().to_le_bytes());
            let mut file = std::fs::File::open(&path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = file
                    .read(&mut buf)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_inside_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("a")).unwrap();
        let disk = VDisk::new(vec![dir.path().to_path_buf()]);
        assert_eq!(disk.resolve(0, "", "a/./b/../c").unwrap(), "a/c");
        assert_eq!(disk.resolve(0, "a", "..").unwrap(), "");
        assert_eq!(disk.resolve(0, "", ".."), Err(errno::NOTCAPABLE));
        assert_eq!(disk.resolve(0, "a", "../../x"), Err(errno::NOTCAPABLE));
        assert_eq!(disk.resolve(0, "", "/etc/passwd"), Err(errno::NOTCAPABLE));
        std::os::unix::fs::symlink("/etc", dir.path().join("a/out")).unwrap();
        let rel = disk.resolve(0, "", "a/out/passwd").unwrap();
        let refused = disk.refuse_symlinks(0, &rel).unwrap_err();
        assert_eq!(errno::from_io(&refused), errno::PERM);
        disk.refuse_symlinks(0, "a/new").unwrap();
    }

    #[test]
    fn content_hash_sees_bytes_and_names() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"one").unwrap();
        let roots = vec![dir.path().to_path_buf()];
        let h1 = VDisk::content_hash(&roots).unwrap();
        assert_eq!(h1, VDisk::content_hash(&roots).unwrap());
        std::fs::write(dir.path().join("f"), b"two").unwrap();
        let h2 = VDisk::content_hash(&roots).unwrap();
        assert_ne!(h1, h2);
        std::fs::rename(dir.path().join("f"), dir.path().join("g")).unwrap();
        assert_ne!(h2, VDisk::content_hash(&roots).unwrap());
    }

    #[test]
    fn rename_moves_timestamps_of_a_subtree() {
        let mut disk = VDisk::new(vec![PathBuf::from("/nonexistent")]);
        disk.touch(0, "d/x", 5);
        disk.touch(0, "dx", 6);
        disk.renamed(0, "d", 0, "e");
        assert_eq!(disk.mtime(0, "e/x"), 5);
        assert_eq!(disk.mtime(0, "d/x"), 0);
        assert_eq!(disk.mtime(0, "dx"), 6);
    }
}
