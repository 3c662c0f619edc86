//! WASI preview1 errno values and the mapping from host I/O errors.

pub type Errno = u16;

pub const SUCCESS: Errno = 0;
pub const TOOBIG: Errno = 1;
pub const ACCES: Errno = 2;
pub const ADDRINUSE: Errno = 3;
pub const AGAIN: Errno = 6;
pub const BADF: Errno = 8;
pub const BUSY: Errno = 10;
pub const CONNRESET: Errno = 15;
pub const DQUOT: Errno = 19;
pub const EXIST: Errno = 20;
pub const FAULT: Errno = 21;
pub const FBIG: Errno = 22;
pub const INVAL: Errno = 28;
pub const IO: Errno = 29;
pub const ISDIR: Errno = 31;
pub const LOOP: Errno = 32;
pub const MFILE: Errno = 33;
pub const NAMETOOLONG: Errno = 37;
pub const NOBUFS: Errno = 42;
pub const NOENT: Errno = 44;
pub const NOMEM: Errno = 48;
pub const NOSPC: Errno = 51;
pub const NOSYS: Errno = 52;
pub const NOTCONN: Errno = 53;
pub const NOTDIR: Errno = 54;
pub const NOTEMPTY: Errno = 55;
pub const NOTSOCK: Errno = 57;
pub const NOTSUP: Errno = 58;
pub const OVERFLOW: Errno = 61;
pub const PERM: Errno = 63;
pub const PIPE: Errno = 64;
pub const ROFS: Errno = 69;
pub const SPIPE: Errno = 70;
pub const TIMEDOUT: Errno = 73;
pub const XDEV: Errno = 75;
pub const NOTCAPABLE: Errno = 76;

/// The POSIX name of an errno we hand out, for messages ("errno 51" says little).
pub fn name(e: Errno) -> &'static str {
    match e {
        SUCCESS => "success",
        TOOBIG => "E2BIG",
        ACCES => "EACCES",
        ADDRINUSE => "EADDRINUSE",
        AGAIN => "EAGAIN",
        BADF => "EBADF",
        BUSY => "EBUSY",
        CONNRESET => "ECONNRESET",
        DQUOT => "EDQUOT",
        EXIST => "EEXIST",
        FAULT => "EFAULT",
        FBIG => "EFBIG",
        INVAL => "EINVAL",
        IO => "EIO",
        ISDIR => "EISDIR",
        LOOP => "ELOOP",
        MFILE => "EMFILE",
        NAMETOOLONG => "ENAMETOOLONG",
        NOBUFS => "ENOBUFS",
        NOENT => "ENOENT",
        NOMEM => "ENOMEM",
        NOSPC => "ENOSPC",
        NOSYS => "ENOSYS",
        NOTCONN => "ENOTCONN",
        NOTDIR => "ENOTDIR",
        NOTEMPTY => "ENOTEMPTY",
        NOTSOCK => "ENOTSOCK",
        NOTSUP => "ENOTSUP",
        OVERFLOW => "EOVERFLOW",
        PERM => "EPERM",
        PIPE => "EPIPE",
        ROFS => "EROFS",
        SPIPE => "ESPIPE",
        TIMEDOUT => "ETIMEDOUT",
        XDEV => "EXDEV",
        NOTCAPABLE => "ENOTCAPABLE",
        _ => "an errno",
    }
}

/// Maps a host I/O error on the virtual disk to the errno the guest sees.
pub fn from_io(err: &std::io::Error) -> Errno {
    match err.raw_os_error() {
        Some(libc::ENOENT) => NOENT,
        Some(libc::EEXIST) => EXIST,
        Some(libc::ENOTDIR) => NOTDIR,
        Some(libc::EISDIR) => ISDIR,
        Some(libc::ENOTEMPTY) => NOTEMPTY,
        Some(libc::EACCES) => ACCES,
        Some(libc::EPERM) => PERM,
        Some(libc::ENOSPC) => NOSPC,
        Some(libc::EDQUOT) => DQUOT,
        Some(libc::EFBIG) => FBIG,
        Some(libc::EINVAL) => INVAL,
        Some(libc::EROFS) => ROFS,
        Some(libc::EMFILE) | Some(libc::ENFILE) => MFILE,
        Some(libc::ENAMETOOLONG) => NAMETOOLONG,
        Some(libc::EXDEV) => XDEV,
        Some(libc::EBUSY) => BUSY,
        Some(libc::ELOOP) => LOOP,
        Some(libc::ENOMEM) => NOMEM,
        _ => IO,
    }
}
