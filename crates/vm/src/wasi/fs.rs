//! `fd_*` and `path_*`: stdio, the virtual disk and descriptor bookkeeping.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use wasmtime::{Caller, Linker};

use super::errno::{self, Errno};
use super::fd::{FdEntry, FdKind, FDFLAG_APPEND};
use super::mem::GuestMem;
use super::{
    console_write, disk, filetype_of, sock, split, wasi_fn, Host, HostResult, IO_BYTES_MAX, RIGHTS,
};
use crate::gate::Gate;
use crate::vdisk::VDisk;
use crate::VmError;

const OFLAG_CREAT: u16 = 1;
const OFLAG_DIRECTORY: u16 = 2;
const OFLAG_EXCL: u16 = 4;
const OFLAG_TRUNC: u16 = 8;
const RIGHT_FD_READ: u64 = 1 << 1;
const RIGHT_FD_WRITE: u64 = 1 << 6;
const FST_ATIM: u16 = 1;
const FST_ATIM_NOW: u16 = 2;
const FST_MTIM: u16 = 4;
const FST_MTIM_NOW: u16 = 8;
const FILESTAT_BYTES: u32 = 64;
const DIRENT_HEADER_BYTES: u32 = 24;
/// Most entries one directory listing reads.
const DIR_ENTRIES_MAX: usize = 100_000;

pub(super) fn add_to_linker(linker: &mut Linker<Host>) -> Result<(), VmError> {
    wasi_fn!(
        linker,
        "fd_write",
        |c, fd: i32, iovs: i32, n: i32, out: i32| fd_write(
            &mut c,
            fd as u32,
            iovs as u32,
            n as u32,
            out as u32,
            None
        )
    );
    wasi_fn!(
        linker,
        "fd_pwrite",
        |c, fd: i32, iovs: i32, n: i32, off: i64, out: i32| fd_write(
            &mut c,
            fd as u32,
            iovs as u32,
            n as u32,
            out as u32,
            Some(off as u64)
        )
    );
    wasi_fn!(
        linker,
        "fd_read",
        |c, fd: i32, iovs: i32, n: i32, out: i32| fd_read(
            &mut c,
            fd as u32,
            iovs as u32,
            n as u32,
            out as u32,
            None
        )
    );
    wasi_fn!(
        linker,
        "fd_pread",
        |c, fd: i32, iovs: i32, n: i32, off: i64, out: i32| fd_read(
            &mut c,
            fd as u32,
            iovs as u32,
            n as u32,
            out as u32,
            Some(off as u64)
        )
    );
    wasi_fn!(linker, "fd_close", |c, fd: i32| {
        let (_, host) = split(&mut c);
        let entry = host.fds.remove(fd as u32)?;
        sock::closed(host, &entry.kind)
    });
    wasi_fn!(
        linker,
        "fd_seek",
        |c, fd: i32, offset: i64, whence: i32, out: i32| {
            let (mut mem, host) = split(&mut c);
            let entry = host.fds.get_mut(fd as u32)?;
            let FdKind::File { pos, .. } = &entry.kind else {
                return Err(seek_errno(&entry.kind).into());
            };
            let base: i128 = match whence {
                0 => 0,
                1 => *pos as i128,
                2 => {
                    let file = handle(&mut host.disk, entry)?;
                    disk(host.gate.disk_op(|| file.metadata()))?.len() as i128
                }
                _ => return Err(errno::INVAL.into()),
            };
            let new = base + offset as i128;
            if new < 0 || new > i64::MAX as i128 {
                return Err(errno::INVAL.into());
            }
            let FdKind::File { pos, .. } = &mut host.fds.get_mut(fd as u32)?.kind else {
                unreachable!()
            };
            *pos = new as u64;
            mem.write_u64(out as u32, new as u64)?;
            Ok(())
        }
    );
    wasi_fn!(linker, "fd_tell", |c, fd: i32, out: i32| {
        let (mut mem, host) = split(&mut c);
        let entry = host.fds.get(fd as u32)?;
        let FdKind::File { pos, .. } = &entry.kind else {
            return Err(seek_errno(&entry.kind).into());
        };
        mem.write_u64(out as u32, *pos)?;
        Ok(())
    });
    wasi_fn!(linker, "fd_fdstat_get", |c, fd: i32, out: i32| {
        let (mut mem, host) = split(&mut c);
        let entry = host.fds.get(fd as u32)?;
        let out = out as u32;
        mem.slice_mut(out, 24)?.fill(0);
        mem.write_u8(out, filetype_of(&entry.kind))?;
        mem.write_u16(out + 2, entry.flags)?;
        mem.write_u64(out + 8, RIGHTS)?;
        mem.write_u64(out + 16, RIGHTS)?;
        Ok(())
    });
    wasi_fn!(linker, "fd_fdstat_set_flags", |c, fd: i32, flags: i32| {
        let (_, host) = split(&mut c);
        let entry = host.fds.get_mut(fd as u32)?;
        entry.flags = flags as u16;
        Ok(())
    });
    wasi_fn!(
        linker,
        "fd_fdstat_set_rights",
        |c, fd: i32, _base: i64, _inh: i64| {
            split(&mut c).1.fds.get(fd as u32)?;
            Ok(())
        }
    );
    wasi_fn!(linker, "fd_prestat_get", |c, fd: i32, out: i32| {
        let (mut mem, host) = split(&mut c);
        let len = preopen_name(host, fd)?.len() as u32;
        mem.write_u32(out as u32, 0)?;
        mem.write_u32(out as u32 + 4, len)?;
        Ok(())
    });
    wasi_fn!(
        linker,
        "fd_prestat_dir_name",
        |c, fd: i32, buf: i32, len: i32| {
            let (mut mem, host) = split(&mut c);
            let name = preopen_name(host, fd)?;
            if (len as usize) < name.len() {
                return Err(errno::NAMETOOLONG.into());
            }
            mem.write_bytes(buf as u32, name.as_bytes())?;
            Ok(())
        }
    );
    wasi_fn!(linker, "fd_filestat_get", |c, fd: i32, out: i32| {
        let (mut mem, host) = split(&mut c);
        let entry = host.fds.get(fd as u32)?.clone();
        let stat = match &entry.kind {
            FdKind::File { root, rel, .. } | FdKind::Dir { root, rel, .. } => {
                disk_stat(&mut host.gate, &host.disk, *root, rel)?
            }
            other => Stat {
                filetype: filetype_of(other),
                ..Stat::default()
            },
        };
        write_filestat(&mut mem, out as u32, &stat)?;
        Ok(())
    });
    wasi_fn!(linker, "fd_filestat_set_size", |c, fd: i32, size: i64| {
        let (_, host) = split(&mut c);
        let now = host.gate.realtime_ns();
        let entry = host.fds.get(fd as u32)?.clone();
        let FdKind::File {
            root,
            rel,
            write: true,
            ..
        } = &entry.kind
        else {
            return Err(errno::BADF.into());
        };
        let file = handle(&mut host.disk, host.fds.get_mut(fd as u32)?)?;
        disk(host.gate.disk_op(|| file.set_len(size as u64)))?;
        host.disk.touch(*root, rel, now);
        Ok(())
    });
    wasi_fn!(
        linker,
        "fd_allocate",
        |c, fd: i32, offset: i64, len: i64| {
            let (_, host) = split(&mut c);
            let file = handle(&mut host.disk, host.fds.get_mut(fd as u32)?)?;
            let want = (offset as u64).saturating_add(len as u64);
            let have = disk(host.gate.disk_op(|| file.metadata()))?.len();
            if want > have {
                disk(host.gate.disk_op(|| file.set_len(want)))?;
            }
            Ok(())
        }
    );
    wasi_fn!(
        linker,
        "fd_filestat_set_times",
        |c, fd: i32, atim: i64, mtim: i64, flags: i32| {
            let (_, host) = split(&mut c);
            let entry = host.fds.get(fd as u32)?.clone();
            let (FdKind::File { root, rel, .. } | FdKind::Dir { root, rel, .. }) = &entry.kind
            else {
                return Err(errno::BADF.into());
            };
            set_times(host, *root, rel, atim as u64, mtim as u64, flags as u16)
        }
    );
    wasi_fn!(linker, "fd_sync", |c, fd: i32| sync(&mut c, fd as u32));
    wasi_fn!(linker, "fd_datasync", |c, fd: i32| sync(&mut c, fd as u32));
    wasi_fn!(
        linker,
        "fd_advise",
        |c, fd: i32, _o: i64, _l: i64, _a: i32| {
            split(&mut c).1.fds.get(fd as u32)?;
            Ok(())
        }
    );
    wasi_fn!(linker, "fd_renumber", |c, from: i32, to: i32| {
        let (_, host) = split(&mut c);
        host.fds.get(from as u32)?;
        host.fds.get(to as u32)?;
        if from == to {
            return Ok(());
        }
        let entry = host.fds.remove(from as u32)?;
        let old = host.fds.remove(to as u32)?;
        sock::closed(host, &old.kind)?;
        host.fds.insert_at(to as u32, entry);
        Ok(())
    });
    wasi_fn!(
        linker,
        "fd_readdir",
        |c, fd: i32, buf: i32, len: i32, cookie: i64, out: i32| fd_readdir(
            &mut c,
            fd as u32,
            buf as u32,
            len as u32,
            cookie as u64,
            out as u32
        )
    );
    wasi_fn!(
        linker,
        "path_open",
        |c,
         dirfd: i32,
         _lookup: i32,
         path: i32,
         path_len: i32,
         oflags: i32,
         base: i64,
         _inh: i64,
         fdflags: i32,
         out: i32| {
            path_open(
                &mut c,
                dirfd as u32,
                path as u32,
                path_len as u32,
                oflags as u16,
                base as u64,
                fdflags as u16,
                out as u32,
            )
        }
    );
    wasi_fn!(
        linker,
        "path_filestat_get",
        |c, dirfd: i32, _flags: i32, path: i32, len: i32, out: i32| {
            let (mut mem, host) = split(&mut c);
            let (root, rel) = resolve(&mem, host, dirfd as u32, path as u32, len as u32)?;
            let stat = disk_stat(&mut host.gate, &host.disk, root, &rel)?;
            write_filestat(&mut mem, out as u32, &stat)?;
            Ok(())
        }
    );
    wasi_fn!(
        linker,
        "path_filestat_set_times",
        |c, dirfd: i32, _flags: i32, path: i32, len: i32, atim: i64, mtim: i64, fst: i32| {
            let (mem, host) = split(&mut c);
            let (root, rel) = resolve(&mem, host, dirfd as u32, path as u32, len as u32)?;
            disk_stat(&mut host.gate, &host.disk, root, &rel)?;
            set_times(host, root, &rel, atim as u64, mtim as u64, fst as u16)
        }
    );
    wasi_fn!(
        linker,
        "path_create_directory",
        |c, dirfd: i32, path: i32, len: i32| {
            let (mem, host) = split(&mut c);
            let (root, rel) = resolve(&mem, host, dirfd as u32, path as u32, len as u32)?;
            let path = host.disk.host_path(root, &rel)?;
            disk(host.gate.disk_op(|| std::fs::create_dir(&path)))?;
            let now = host.gate.realtime_ns();
            host.disk.touch(root, &rel, now);
            Ok(())
        }
    );
    wasi_fn!(
        linker,
        "path_remove_directory",
        |c, dirfd: i32, path: i32, len: i32| {
            let (mem, host) = split(&mut c);
            let (root, rel) = resolve(&mem, host, dirfd as u32, path as u32, len as u32)?;
            if rel.is_empty() {
                return Err(errno::BUSY.into());
            }
            let path = host.disk.host_path(root, &rel)?;
            disk(host.gate.disk_op(|| std::fs::remove_dir(&path)))?;
            host.disk.forget(root, &rel);
            Ok(())
        }
    );
    wasi_fn!(
        linker,
        "path_unlink_file",
        |c, dirfd: i32, path: i32, len: i32| {
            let (mem, host) = split(&mut c);
            let (root, rel) = resolve(&mem, host, dirfd as u32, path as u32, len as u32)?;
            let host_path = host.disk.host_path(root, &rel)?;
            if disk(host.gate.disk_op(|| std::fs::symlink_metadata(&host_path)))?.is_dir() {
                return Err(errno::ISDIR.into());
            }
            disk(host.gate.disk_op(|| std::fs::remove_file(&host_path)))?;
            host.disk.forget(root, &rel);
            Ok(())
        }
    );
    wasi_fn!(
        linker,
        "path_rename",
        |c, fd1: i32, p1: i32, l1: i32, fd2: i32, p2: i32, l2: i32| {
            let (mem, host) = split(&mut c);
            let (r1, from) = resolve(&mem, host, fd1 as u32, p1 as u32, l1 as u32)?;
            let (r2, to) = resolve(&mem, host, fd2 as u32, p2 as u32, l2 as u32)?;
            if from.is_empty() || to.is_empty() {
                return Err(errno::BUSY.into());
            }
            let (a, b) = (
                host.disk.host_path(r1, &from)?,
                host.disk.host_path(r2, &to)?,
            );
            disk(host.gate.disk_op(|| std::fs::rename(&a, &b)))?;
            host.disk.renamed(r1, &from, r2, &to);
            Ok(())
        }
    );
    // Symlinks and hard links are not part of the virtual disk (see `vdisk`).
    wasi_fn!(
        linker,
        "path_symlink",
        |c, _p1: i32, _l1: i32, fd: i32, _p2: i32, _l2: i32| {
            split(&mut c).1.fds.get(fd as u32)?;
            Err(errno::NOTSUP.into())
        }
    );
    wasi_fn!(
        linker,
        "path_link",
        |c, fd1: i32, _f: i32, _p1: i32, _l1: i32, _fd2: i32, _p2: i32, _l2: i32| {
            split(&mut c).1.fds.get(fd1 as u32)?;
            Err(errno::NOTSUP.into())
        }
    );
    wasi_fn!(
        linker,
        "path_readlink",
        |c, dirfd: i32, path: i32, len: i32, _buf: i32, _buf_len: i32, _out: i32| {
            let (mem, host) = split(&mut c);
            let (root, rel) = resolve(&mem, host, dirfd as u32, path as u32, len as u32)?;
            disk_stat(&mut host.gate, &host.disk, root, &rel)?;
            // Whatever exists in the virtual disk is not a symlink.
            Err(errno::INVAL.into())
        }
    );
    Ok(())
}

fn seek_errno(kind: &FdKind) -> Errno {
    match kind {
        FdKind::Dir { .. } => errno::ISDIR,
        _ => errno::SPIPE,
    }
}

/// The guest name of a preopened directory. Anything else is EBADF: wasi-libc's scan for
/// preopens stops at the first such descriptor.
fn preopen_name(host: &Host, fd: i32) -> HostResult<String> {
    match host.fds.get(fd as u32) {
        Ok(FdEntry {
            kind:
                FdKind::Dir {
                    preopen: Some(name),
                    ..
                },
            ..
        }) => Ok(name.clone()),
        _ => Err(errno::BADF.into()),
    }
}

/// The host file behind a file descriptor: the handle `path_open` got, or, after a restore (handles
/// are not serialized), the file reopened from its path.
fn handle(vdisk: &mut VDisk, entry: &mut FdEntry) -> HostResult<Arc<File>> {
    let FdKind::File {
        root,
        rel,
        write,
        handle,
        ..
    } = &mut entry.kind
    else {
        return Err(match entry.kind {
            FdKind::Dir { .. } => errno::ISDIR,
            _ => errno::BADF,
        }
        .into());
    };
    if let Some(h) = handle {
        return Ok(h.clone());
    }
    // Not a disk operation of the guest's (the other replica has its handle from `path_open`):
    // a replica that cannot reopen a file its guest has open cannot go on.
    let path = vdisk.host_path(*root, rel)?;
    let file = OpenOptions::new()
        .read(true)
        .write(*write)
        .open(&path)
        .map_err(|e| VmError::Disk(format!("cannot reopen {}: {e}", path.display())))?;
    let file = Arc::new(file);
    *handle = Some(file.clone());
    Ok(file)
}

fn fd_write(
    c: &mut Caller<'_, Host>,
    fd: u32,
    iovs: u32,
    n: u32,
    out: u32,
    at: Option<u64>,
) -> HostResult<()> {
    let (mut mem, host) = split(c);
    let data = mem.gather(iovs, n, IO_BYTES_MAX)?;
    let entry = host.fds.get_mut(fd)?;
    let written = match &entry.kind {
        FdKind::Stdout | FdKind::Stderr if at.is_none() => {
            let target = if matches!(entry.kind, FdKind::Stdout) {
                1
            } else {
                2
            };
            console_write(host, target, &data)?;
            data.len()
        }
        FdKind::Socket { .. } if at.is_none() => return sock::write(c, fd, &data, out),
        FdKind::File { write: false, .. } => return Err(errno::BADF.into()),
        FdKind::File { .. } => {
            let append = entry.flags & FDFLAG_APPEND != 0;
            let file = handle(&mut host.disk, entry)?;
            let FdKind::File { root, rel, pos, .. } = &mut entry.kind else {
                unreachable!()
            };
            let offset = match at {
                Some(o) => o,
                None if append => disk(host.gate.disk_op(|| file.metadata()))?.len(),
                None => *pos,
            };
            // A full disk may take part of it: the guest is told how much, as by write(2).
            let written = disk(
                host.gate
                    .disk_write(&data, |bytes, done| file.write_at(bytes, offset + done)),
            )?;
            if at.is_none() {
                *pos = offset + written as u64;
            }
            let (root, rel) = (*root, rel.clone());
            let now = host.gate.realtime_ns();
            host.disk.touch(root, &rel, now);
            written
        }
        FdKind::Dir { .. } => return Err(errno::ISDIR.into()),
        FdKind::Stdin => return Err(errno::BADF.into()),
        _ => return Err(errno::SPIPE.into()),
    };
    mem.write_u32(out, written as u32)?;
    Ok(())
}

fn fd_read(
    c: &mut Caller<'_, Host>,
    fd: u32,
    iovs: u32,
    n: u32,
    out: u32,
    at: Option<u64>,
) -> HostResult<()> {
    let (mut mem, host) = split(c);
    let iov = mem.iovecs(iovs, n)?;
    let want = iov
        .iter()
        .map(|&(_, l)| l as usize)
        .sum::<usize>()
        .min(IO_BYTES_MAX);
    let entry = host.fds.get_mut(fd)?;
    let data = match &entry.kind {
        // The VM has no console input: stdin is at end of file.
        FdKind::Stdin => Vec::new(),
        FdKind::Socket { .. } if at.is_none() => return sock::read(c, fd, iov, out),
        FdKind::File { read: false, .. } => return Err(errno::BADF.into()),
        FdKind::File { .. } => {
            let file = handle(&mut host.disk, entry)?;
            let FdKind::File { pos, .. } = &mut entry.kind else {
                unreachable!()
            };
            let offset = at.unwrap_or(*pos);
            let buf = disk(host.gate.disk_op(|| {
                let mut buf = vec![0u8; want];
                let mut got = 0;
                while got < want {
                    match file.read_at(&mut buf[got..], offset + got as u64) {
                        Ok(0) => break,
                        Ok(k) => got += k,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                buf.truncate(got);
                Ok(buf)
            }))?;
            let got = buf.len();
            if at.is_none() {
                *pos = offset + got as u64;
            }
            buf
        }
        FdKind::Dir { .. } => return Err(errno::ISDIR.into()),
        _ => return Err(errno::BADF.into()),
    };
    let placed = mem.scatter(&iov, &data)?;
    mem.write_u32(out, placed as u32)?;
    Ok(())
}

fn sync(c: &mut Caller<'_, Host>, fd: u32) -> HostResult<()> {
    let (_, host) = split(c);
    let entry = host.fds.get_mut(fd)?;
    if let FdKind::Dir { .. } = entry.kind {
        return Ok(());
    }
    let file = handle(&mut host.disk, entry)?;
    disk(host.gate.disk_op(|| file.sync_all()))?;
    Ok(())
}

fn set_times(
    host: &mut Host,
    root: u32,
    rel: &str,
    _atim: u64,
    mtim: u64,
    flags: u16,
) -> HostResult<()> {
    if flags & (FST_ATIM | FST_ATIM_NOW) == (FST_ATIM | FST_ATIM_NOW)
        || flags & (FST_MTIM | FST_MTIM_NOW) == (FST_MTIM | FST_MTIM_NOW)
    {
        return Err(errno::INVAL.into());
    }
    // One timestamp per file (atime = mtime = ctime); setting either sets it.
    if flags & FST_MTIM_NOW != 0 || (flags & FST_ATIM_NOW != 0 && flags & FST_MTIM == 0) {
        let now = host.gate.realtime_ns();
        host.disk.touch(root, rel, now);
    } else if flags & FST_MTIM != 0 {
        host.disk.touch(root, rel, mtim);
    }
    Ok(())
}

/// Resolves a guest path against a directory descriptor. The check for host symlinks on the
/// way reads the host's disk, so it is a disk operation of the gate's.
fn resolve(
    mem: &GuestMem<'_>,
    host: &mut Host,
    dirfd: u32,
    path: u32,
    len: u32,
) -> HostResult<(u32, String)> {
    let path = mem.string(path, len)?;
    let FdKind::Dir { root, rel, .. } = &host.fds.get(dirfd)?.kind else {
        return Err(errno::NOTDIR.into());
    };
    let root = *root;
    let rel = host.disk.resolve(root, rel, &path)?;
    let vdisk = &host.disk;
    disk(host.gate.disk_op(|| vdisk.refuse_symlinks(root, &rel)))?;
    Ok((root, rel))
}

#[derive(Default)]
struct Stat {
    dev: u64,
    ino: u64,
    filetype: u8,
    size: u64,
    time: u64,
}

fn disk_stat(gate: &mut Gate, vdisk: &VDisk, root: u32, rel: &str) -> HostResult<Stat> {
    let path = vdisk.host_path(root, rel)?;
    let meta = disk(gate.disk_op(|| std::fs::symlink_metadata(&path)))?;
    let ft = meta.file_type();
    let (filetype, size) = if ft.is_dir() {
        (3, 0)
    } else if ft.is_file() {
        (4, meta.len())
    } else if ft.is_symlink() {
        (7, 0)
    } else {
        (0, 0)
    };
    Ok(Stat {
        dev: root as u64 + 1,
        ino: VDisk::ino(root, rel),
        filetype,
        size,
        time: vdisk.mtime(root, rel),
    })
}

fn write_filestat(mem: &mut GuestMem<'_>, out: u32, s: &Stat) -> Result<(), Errno> {
    mem.slice_mut(out, FILESTAT_BYTES)?.fill(0);
    mem.write_u64(out, s.dev)?;
    mem.write_u64(out + 8, s.ino)?;
    mem.write_u8(out + 16, s.filetype)?;
    mem.write_u64(out + 24, 1)?;
    mem.write_u64(out + 32, s.size)?;
    mem.write_u64(out + 40, s.time)?;
    mem.write_u64(out + 48, s.time)?;
    mem.write_u64(out + 56, s.time)?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn path_open(
    c: &mut Caller<'_, Host>,
    dirfd: u32,
    path: u32,
    path_len: u32,
    oflags: u16,
    rights: u64,
    fdflags: u16,
    out: u32,
) -> HostResult<()> {
    let (mut mem, host) = split(c);
    let (root, rel) = resolve(&mem, host, dirfd, path, path_len)?;
    let host_path = host.disk.host_path(root, &rel)?;
    let existing = match host.gate.disk_op(|| std::fs::metadata(&host_path))? {
        Ok(m) => Some(m),
        Err(errno::NOENT) => None,
        Err(e) => return Err(e.into()),
    };
    if oflags & OFLAG_CREAT != 0 && oflags & OFLAG_EXCL != 0 && existing.is_some() {
        return Err(errno::EXIST.into());
    }
    if existing.as_ref().is_some_and(|m| m.is_dir()) || (oflags & OFLAG_DIRECTORY != 0) {
        match existing {
            Some(m) if m.is_dir() => {
                if oflags & OFLAG_TRUNC != 0
                    || (rights & RIGHT_FD_WRITE != 0 && oflags & OFLAG_DIRECTORY == 0)
                {
                    return Err(errno::ISDIR.into());
                }
                let fd = host.fds.insert(
                    FdKind::Dir {
                        root,
                        rel,
                        preopen: None,
                    },
                    fdflags,
                )?;
                mem.write_u32(out, fd)?;
                return Ok(());
            }
            Some(_) => return Err(errno::NOTDIR.into()),
            None => return Err(errno::NOENT.into()),
        }
    }
    let read = rights & RIGHT_FD_READ != 0;
    let write = rights & RIGHT_FD_WRITE != 0 || oflags & OFLAG_TRUNC != 0;
    let file = host.gate.disk_op(|| {
        OpenOptions::new()
            .read(true)
            .write(write)
            .create(oflags & OFLAG_CREAT != 0 && write)
            .create_new(oflags & OFLAG_CREAT != 0 && oflags & OFLAG_EXCL != 0)
            .truncate(oflags & OFLAG_TRUNC != 0)
            .open(&host_path)
    })?;
    let file = match file {
        Ok(f) => f,
        // O_CREAT on a read-only open still creates, as POSIX does.
        Err(errno::NOENT) if oflags & OFLAG_CREAT != 0 && !write => {
            disk(host.gate.disk_op(|| {
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&host_path)
            }))?;
            disk(
                host.gate
                    .disk_op(|| OpenOptions::new().read(true).open(&host_path)),
            )?
        }
        Err(e) => return Err(e.into()),
    };
    if existing.is_none() || oflags & OFLAG_TRUNC != 0 {
        let now = host.gate.realtime_ns();
        host.disk.touch(root, &rel, now);
    }
    let kind = FdKind::File {
        root,
        rel,
        pos: 0,
        read,
        write,
        handle: Some(Arc::new(file)),
    };
    let fd = host.fds.insert(kind, fdflags)?;
    mem.write_u32(out, fd)?;
    Ok(())
}

fn fd_readdir(
    c: &mut Caller<'_, Host>,
    fd: u32,
    buf: u32,
    len: u32,
    cookie: u64,
    out: u32,
) -> HostResult<()> {
    let (mut mem, host) = split(c);
    let FdKind::Dir { root, rel, .. } = host.fds.get(fd)?.kind.clone() else {
        return Err(errno::NOTDIR.into());
    };
    let dir = host.disk.host_path(root, &rel)?;
    // One disk operation: the listing (at most DIR_ENTRIES_MAX + 1 entries, one more says "too
    // many").
    let mut names = disk(host.gate.disk_op(|| {
        let mut names: Vec<(String, u8)> = Vec::new();
        for item in std::fs::read_dir(&dir)? {
            let item = item?;
            let ft = item.file_type()?;
            let kind = if ft.is_dir() {
                3
            } else if ft.is_file() {
                4
            } else if ft.is_symlink() {
                7
            } else {
                0
            };
            names.push((item.file_name().to_string_lossy().into_owned(), kind));
            if names.len() > DIR_ENTRIES_MAX {
                break;
            }
        }
        Ok(names)
    }))?;
    if names.len() > DIR_ENTRIES_MAX {
        return Err(errno::NOBUFS.into());
    }
    names.sort();
    let parent = rel
        .rsplit_once('/')
        .map(|(p, _)| p.to_string())
        .unwrap_or_default();
    let mut all = vec![
        (".".to_string(), 3u8, VDisk::ino(root, &rel)),
        ("..".to_string(), 3u8, VDisk::ino(root, &parent)),
    ];
    for (name, kind) in names {
        let child = if rel.is_empty() {
            name.clone()
        } else {
            format!("{rel}/{name}")
        };
        all.push((name, kind, VDisk::ino(root, &child)));
    }
    let mut used: u32 = 0;
    for (i, (name, kind, ino)) in all.iter().enumerate().skip(cookie as usize) {
        let mut dirent = Vec::with_capacity(DIRENT_HEADER_BYTES as usize + name.len());
        dirent.extend_from_slice(&(i as u64 + 1).to_le_bytes());
        dirent.extend_from_slice(&ino.to_le_bytes());
        dirent.extend_from_slice(&(name.len() as u32).to_le_bytes());
        dirent.push(*kind);
        dirent.extend_from_slice(&[0, 0, 0]);
        dirent.extend_from_slice(name.as_bytes());
        // A partly written last entry tells the caller its buffer was too small.
        let room = (len - used) as usize;
        let take = dirent.len().min(room);
        mem.write_bytes(buf + used, &dirent[..take])?;
        used += take as u32;
        if used == len {
            break;
        }
    }
    mem.write_u32(out, used)?;
    Ok(())
}
