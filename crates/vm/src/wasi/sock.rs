//! `sock_*` and socket reads and writes, on the VM's own netstack.
//!
//! The netstack is host-side VM state (serializable, hashed into checkpoints). Socket calls are
//! pure functions of that state and of the virtual time last observed through the gate; only the
//! waits of blocking calls go through the gate. Frames a call makes the stack send leave through
//! the output path (and so obey the Output Rule).

use ftvm_net::NetError;
use wasmtime::{Caller, Linker};

use super::errno::{self, Errno};
use super::fd::{FdKind, FDFLAG_NONBLOCK};
use super::poll::wait_and_deliver;
use super::{flush_net, is_nonblocking, split, wasi_fn, Host, HostResult, IO_BYTES_MAX};
use crate::VmError;

const RIFLAG_PEEK: u16 = 1;
const RIFLAG_WAITALL: u16 = 2;
const SDFLAG_RD: u8 = 1;
const SDFLAG_WR: u8 = 2;
/// Backlog of every preopened listener.
pub const LISTEN_BACKLOG: u32 = 128;

pub(super) fn add_to_linker(linker: &mut Linker<Host>) -> Result<(), VmError> {
    wasi_fn!(linker, "sock_accept", |c, fd: i32, flags: i32, out: i32| {
        sock_accept(&mut c, fd as u32, flags as u16, out as u32)
    });
    wasi_fn!(
        linker,
        "sock_recv",
        |c, fd: i32, iovs: i32, n: i32, flags: i32, out: i32, out_flags: i32| {
            let iov = split(&mut c).0.iovecs(iovs as u32, n as u32)?;
            split(&mut c).0.slice(out_flags as u32, 2)?;
            recv(&mut c, fd as u32, iov, out as u32, flags as u16)?;
            split(&mut c).0.write_u16(out_flags as u32, 0)?;
            Ok(())
        }
    );
    wasi_fn!(
        linker,
        "sock_send",
        |c, fd: i32, iovs: i32, n: i32, _flags: i32, out: i32| {
            let data = split(&mut c)
                .0
                .gather(iovs as u32, n as u32, IO_BYTES_MAX)?;
            write(&mut c, fd as u32, &data, out as u32)
        }
    );
    wasi_fn!(linker, "sock_shutdown", |c, fd: i32, how: i32| {
        let (_, host) = split(&mut c);
        let FdKind::Socket { id } = host.fds.get(fd as u32)?.kind else {
            return Err(errno::NOTSOCK.into());
        };
        let how = how as u8;
        if how == 0 || how & !(SDFLAG_RD | SDFLAG_WR) != 0 {
            return Err(errno::INVAL.into());
        }
        let now = host.gate.now_ns();
        net(host)?
            .shutdown(sid(id), how & SDFLAG_RD != 0, how & SDFLAG_WR != 0, now)
            .map_err(map_err)?;
        flush_net(host)
    });
    Ok(())
}

fn net(host: &mut Host) -> Result<&mut ftvm_net::NetStack, Errno> {
    host.net.as_mut().ok_or(errno::NOTSOCK)
}

fn sid(id: u32) -> ftvm_net::SocketId {
    ftvm_net::SocketId(id)
}

fn lid(id: u32) -> ftvm_net::ListenerId {
    ftvm_net::ListenerId(id)
}

fn map_err(e: NetError) -> Errno {
    match e {
        NetError::WouldBlock => errno::AGAIN,
        NetError::ConnReset => errno::CONNRESET,
        NetError::TimedOut => errno::TIMEDOUT,
        NetError::NotConnected => errno::NOTCONN,
        NetError::BrokenPipe => errno::PIPE,
        NetError::InvalidSocket(_) | NetError::InvalidListener(_) => errno::BADF,
        NetError::AddrInUse { .. } => errno::ADDRINUSE,
        _ => errno::IO,
    }
}

/// Opens the preopened listeners (after the directories) on the VM's netstack.
pub(crate) fn preopen_listeners(host: &mut Host) -> Result<(), VmError> {
    let ports = host.spec.listeners.clone();
    for port in ports {
        let Some(net) = host.net.as_mut() else {
            return Err(VmError::Config(format!(
                "listener on port {port} needs a NIC (--nic)"
            )));
        };
        let id = net
            .listen(port, LISTEN_BACKLOG)
            .map_err(|e| VmError::Config(format!("cannot listen on port {port}: {e:?}")))?;
        host.fds
            .insert(FdKind::Listener { id: id.0, port }, 0)
            .map_err(|_| VmError::Config("too many preopens".into()))?;
    }
    Ok(())
}

fn sock_accept(c: &mut Caller<'_, Host>, fd: u32, flags: u16, out: u32) -> HostResult<()> {
    split(c).0.slice(out, 4)?;
    loop {
        let (_, host) = split(c);
        let entry = host.fds.get(fd)?;
        let FdKind::Listener { id, .. } = entry.kind else {
            return Err(errno::NOTSOCK.into());
        };
        let nonblocking = is_nonblocking(entry.flags);
        match net(host)?.accept(lid(id)) {
            Ok(s) => {
                let new = host
                    .fds
                    .insert(FdKind::Socket { id: s.0 }, flags & FDFLAG_NONBLOCK)?;
                split(c).0.write_u32(out, new)?;
                return Ok(());
            }
            Err(NetError::WouldBlock) if !nonblocking => {
                wait_and_deliver(c, None)?;
            }
            Err(e) => return Err(map_err(e).into()),
        }
    }
}

/// Reads from a socket into iovecs (`fd_read` or `sock_recv`).
pub(super) fn read(
    c: &mut Caller<'_, Host>,
    fd: u32,
    iov: Vec<(u32, u32)>,
    out: u32,
) -> HostResult<()> {
    recv(c, fd, iov, out, 0)
}

fn recv(
    c: &mut Caller<'_, Host>,
    fd: u32,
    iov: Vec<(u32, u32)>,
    out: u32,
    flags: u16,
) -> HostResult<()> {
    split(c).0.slice(out, 4)?;
    let want = iov
        .iter()
        .map(|&(_, l)| l as usize)
        .sum::<usize>()
        .min(IO_BYTES_MAX);
    let peek = flags & RIFLAG_PEEK != 0;
    let waitall = flags & RIFLAG_WAITALL != 0 && !peek;
    let mut got: Vec<u8> = Vec::new();
    loop {
        let (_, host) = split(c);
        let entry = host.fds.get(fd)?;
        let FdKind::Socket { id } = entry.kind else {
            return Err(errno::NOTSOCK.into());
        };
        let nonblocking = is_nonblocking(entry.flags);
        let mut buf = vec![0u8; want - got.len()];
        let result = net(host)?.recv(sid(id), &mut buf, peek);
        // Reading opens the receive window: the stack may have an update to send.
        flush_net(host)?;
        match result {
            Ok(0) => break,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                if !waitall || got.len() == want {
                    break;
                }
            }
            Err(NetError::WouldBlock) if !got.is_empty() && nonblocking => break,
            Err(NetError::WouldBlock) if !nonblocking => {
                wait_and_deliver(c, None)?;
            }
            Err(e) if !got.is_empty() => {
                let _ = e;
                break;
            }
            Err(e) => return Err(map_err(e).into()),
        }
    }
    let (mut mem, _) = split(c);
    let placed = mem.scatter(&iov, &got)?;
    mem.write_u32(out, placed as u32)?;
    Ok(())
}

/// Writes to a socket (`fd_write` or `sock_send`).
pub(super) fn write(c: &mut Caller<'_, Host>, fd: u32, data: &[u8], out: u32) -> HostResult<()> {
    split(c).0.slice(out, 4)?;
    let mut sent = 0;
    loop {
        let (_, host) = split(c);
        let entry = host.fds.get(fd)?;
        let FdKind::Socket { id } = entry.kind else {
            return Err(errno::NOTSOCK.into());
        };
        let nonblocking = is_nonblocking(entry.flags);
        let now = host.gate.now_ns();
        let result = net(host)?.send(sid(id), &data[sent..], now);
        flush_net(host)?;
        match result {
            Ok(n) => {
                sent += n;
                if sent == data.len() || nonblocking {
                    break;
                }
            }
            Err(NetError::WouldBlock) if sent > 0 && nonblocking => break,
            Err(NetError::WouldBlock) if !nonblocking => {
                wait_and_deliver(c, None)?;
            }
            Err(e) if sent > 0 => {
                let _ = e;
                break;
            }
            Err(e) => return Err(map_err(e).into()),
        }
    }
    split(c).0.write_u32(out, sent as u32)?;
    Ok(())
}

/// A descriptor was closed: release what it held in the netstack.
pub(super) fn closed(host: &mut Host, kind: &FdKind) -> HostResult<()> {
    let now = host.gate.now_ns();
    match kind {
        FdKind::Socket { id } => {
            net(host)?.close(sid(*id), now);
            flush_net(host)
        }
        FdKind::Listener { id, .. } => {
            net(host)?.close_listener(lid(*id));
            flush_net(host)
        }
        _ => Ok(()),
    }
}

pub(super) fn listener_ready(host: &mut Host, id: u32) -> bool {
    host.net.as_ref().is_some_and(|n| n.listener_ready(lid(id)))
}

/// Readiness for poll: `Some((nbytes, hangup))` when ready.
pub(super) fn socket_ready(host: &mut Host, id: u32, write: bool) -> Option<(u64, bool)> {
    let net = host.net.as_ref()?;
    let r = net.readiness(sid(id));
    let ready = if write {
        r.writable || r.hangup || r.error
    } else {
        r.readable || r.hangup || r.error
    };
    // nbytes is advisory in WASI; wasi-libc's poll() does not use it.
    ready.then_some((1, r.hangup))
}
