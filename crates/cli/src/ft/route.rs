//! Whether this host's route to an address has the `quickack` metric (`ip route ... quickack 1`):
//! then its TCP acknowledges every segment at once instead of delaying the ACK (40 ms and more on
//! Linux). A backup whose host acknowledges the log channel at once lets its primary release
//! outputs on that acknowledgment, so its own log reader need not hurry (`ft::backup`).
//!
//! One rtnetlink request (`RTM_GETROUTE`, the lookup `ip route get` makes), answered by the
//! kernel with the route it would use and that route's metrics.

use std::io;
use std::net::IpAddr;

const NLMSG_HDR: usize = 16;
const RTMSG: usize = 12;
const RTA_HDR: usize = 4;
const RTA_DST: u16 = 1;
const RTA_METRICS: u16 = 8;
const RTAX_QUICKACK: u16 = 15;
const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;
const NLMSG_ERROR: u16 = 2;
/// The kernel's answer to one route lookup fits easily (a few hundred bytes).
const ANSWER_BYTES_MAX: usize = 8192;

/// Whether the route this host would use to reach `dst` has `quickack` set.
pub fn acks_at_once(dst: IpAddr) -> io::Result<bool> {
    let answer = ask(&request(dst))?;
    parse_answer(&answer)
}

fn request(dst: IpAddr) -> Vec<u8> {
    let (family, bits, addr): (u8, u8, Vec<u8>) = match dst {
        IpAddr::V4(a) => (libc::AF_INET as u8, 32, a.octets().to_vec()),
        IpAddr::V6(a) => (libc::AF_INET6 as u8, 128, a.octets().to_vec()),
    };
    let len = NLMSG_HDR + RTMSG + RTA_HDR + addr.len();
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&RTM_GETROUTE.to_ne_bytes());
    m.extend_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // sequence number
    m.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
                                              // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type; flags (u32).
    m.extend_from_slice(&[family, bits, 0, 0, 0, 0, 0, 0]);
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&((RTA_HDR + addr.len()) as u16).to_ne_bytes());
    m.extend_from_slice(&RTA_DST.to_ne_bytes());
    m.extend_from_slice(&addr);
    m
}

fn ask(request: &[u8]) -> io::Result<Vec<u8>> {
    // SAFETY: plain socket(2); the descriptor is owned below and closed on every path.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    use std::os::fd::AsRawFd;
    // SAFETY: a zeroed sockaddr_nl is the kernel as destination.
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as u16;
    let timeout = libc::timeval {
        tv_sec: 1,
        tv_usec: 0,
    };
    // SAFETY: the pointers and lengths describe live values of the right types.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &timeout as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as u32,
        );
        if libc::sendto(
            fd.as_raw_fd(),
            request.as_ptr() as *const libc::c_void,
            request.len(),
            0,
            &kernel as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        ) < 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    let mut buf = vec![0u8; ANSWER_BYTES_MAX];
    // SAFETY: `buf` is writable for its whole length.
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
            0,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Route attributes from `b`, as (type, payload); stops at the first malformed one.
fn attributes(b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut at = 0;
    std::iter::from_fn(move || {
        let len = u16_at(b, at)? as usize;
        let kind = u16_at(b, at + 2)?;
        if len < RTA_HDR {
            return None;
        }
        let payload = b.get(at + RTA_HDR..at + len)?;
        at += (len + 3) & !3;
        Some((kind & 0x3fff, payload)) // without the nested and byte-order flags
    })
}

fn parse_answer(b: &[u8]) -> io::Result<bool> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let len = u32_at(b, 0).ok_or_else(|| bad("short rtnetlink answer"))? as usize;
    let kind = u16_at(b, 4).ok_or_else(|| bad("short rtnetlink answer"))?;
    let msg = b
        .get(..len)
        .ok_or_else(|| bad("truncated rtnetlink answer"))?;
    if kind == NLMSG_ERROR {
        let errno = u32_at(msg, NLMSG_HDR).map(|e| -(e as i32)).unwrap_or(0);
        return Err(io::Error::from_raw_os_error(errno));
    }
    if kind != RTM_NEWROUTE {
        return Err(bad("unexpected rtnetlink answer"));
    }
    let attrs = msg
        .get(NLMSG_HDR + RTMSG..)
        .ok_or_else(|| bad("short route"))?;
    for (kind, payload) in attributes(attrs) {
        if kind == RTA_METRICS {
            for (metric, value) in attributes(payload) {
                if metric == RTAX_QUICKACK {
                    return Ok(u32_at(value, 0).unwrap_or(0) != 0);
                }
            }
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(metrics: &[(u16, u32)]) -> Vec<u8> {
        let mut nested = Vec::new();
        for &(k, v) in metrics {
            nested.extend_from_slice(&8u16.to_ne_bytes());
            nested.extend_from_slice(&k.to_ne_bytes());
            nested.extend_from_slice(&v.to_ne_bytes());
        }
        let mut attrs = Vec::new();
        attrs.extend_from_slice(&8u16.to_ne_bytes()); // RTA_DST, 4 bytes
        attrs.extend_from_slice(&RTA_DST.to_ne_bytes());
        attrs.extend_from_slice(&[10, 0, 0, 1]);
        attrs.extend_from_slice(&((RTA_HDR + nested.len()) as u16).to_ne_bytes());
        attrs.extend_from_slice(&(RTA_METRICS | 0x8000).to_ne_bytes());
        attrs.extend_from_slice(&nested);
        let len = NLMSG_HDR + RTMSG + attrs.len();
        let mut m = Vec::new();
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&RTM_NEWROUTE.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(&[0; RTMSG]);
        m.extend_from_slice(&attrs);
        m
    }

    #[test]
    fn the_quickack_metric_is_found_among_the_routes_metrics() {
        assert!(parse_answer(&answer(&[(2, 1500), (RTAX_QUICKACK, 1)])).unwrap());
        assert!(!parse_answer(&answer(&[(RTAX_QUICKACK, 0)])).unwrap());
        assert!(!parse_answer(&answer(&[(2, 1500)])).unwrap());
        assert!(!parse_answer(&answer(&[])).unwrap());
    }

    #[test]
    fn a_malformed_or_refused_answer_is_an_error_not_a_yes() {
        let full = answer(&[(RTAX_QUICKACK, 1)]);
        assert!(parse_answer(&full[..10]).is_err());
        let mut refused = Vec::new();
        refused.extend_from_slice(&36u32.to_ne_bytes());
        refused.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        refused.extend_from_slice(&[0; 10]);
        refused.extend_from_slice(&(-(libc::ENETUNREACH)).to_ne_bytes());
        refused.extend_from_slice(&[0; 16]);
        let e = parse_answer(&refused).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENETUNREACH));
    }

    #[test]
    fn the_kernel_answers_for_loopback() {
        // A real lookup: loopback's route exists everywhere and has no quickack by default.
        assert!(!acks_at_once("127.0.0.1".parse().unwrap()).unwrap());
    }
}
