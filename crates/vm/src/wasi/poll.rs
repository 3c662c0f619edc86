//! `poll_oneoff`: the guest's one way to wait, for clocks and for descriptors.
//!
//! Every call is at least one gate `wait` (a non-blocking one first), so the virtual time a call
//! observes, the frames delivered while it waits and when it wakes are all recorded. The loop
//! below is a pure function of those recorded wake-ups, so replay takes the same path.

use ftvm_log::entry::{CLOCK_MONOTONIC, CLOCK_REALTIME};
use wasmtime::{Caller, Linker};

use super::errno::{self, Errno};
use super::fd::FdKind;
use super::{after_gate, split, wasi_fn, Host, HostResult, POLL_SUBSCRIPTIONS_MAX};
use crate::VmError;

const SUBSCRIPTION_BYTES: u32 = 48;
const EVENT_BYTES: u32 = 32;
const EVENTTYPE_CLOCK: u8 = 0;
const EVENTTYPE_FD_READ: u8 = 1;
const EVENTTYPE_FD_WRITE: u8 = 2;
const SUBCLOCK_ABSTIME: u16 = 1;
const EVENT_FD_READWRITE_HANGUP: u16 = 1;

enum Sub {
    /// Absolute deadline on the virtual monotonic clock, or realtime when `realtime`.
    #[allow(dead_code)]
    Clock {
        userdata: u64,
        deadline_ns: u64,
        realtime: bool,
    },
    Fd {
        userdata: u64,
        fd: u32,
        write: bool,
    },
}

struct Event {
    userdata: u64,
    error: Errno,
    kind: u8,
    nbytes: u64,
    hangup: bool,
}

pub(super) fn add_to_linker(linker: &mut Linker<Host>) -> Result<(), VmError> {
    wasi_fn!(
        linker,
        "poll_oneoff",
        |c, subs: i32, events: i32, n: i32, out: i32| poll_oneoff(
            &mut c,
            subs as u32,
            events as u32,
            n as u32,
            out as u32
        )
    );
    Ok(())
}

fn poll_oneoff(
    c: &mut Caller<'_, Host>,
    subs_ptr: u32,
    events_ptr: u32,
    count: u32,
    out: u32,
) -> HostResult<()> {
    if count == 0 || count > POLL_SUBSCRIPTIONS_MAX {
        return Err(errno::INVAL.into());
    }
    // Validate every pointer before the gate is consulted, so a bad call records nothing.
    {
        let (mem, _) = split(c);
        mem.slice(subs_ptr, count * SUBSCRIPTION_BYTES)?;
        mem.slice(events_ptr, count * EVENT_BYTES)?;
        mem.slice(out, 4)?;
    }
    // First, a non-blocking look at the world: the time now, and any frames that have arrived.
    let start = wait_and_deliver(c, Some(0))?;
    let realtime_start = c.data().gate.realtime_ns();
    let subs = {
        let (mem, _) = split(c);
        let mut subs = Vec::with_capacity(count as usize);
        for i in 0..count {
            let at = subs_ptr + i * SUBSCRIPTION_BYTES;
            let userdata = mem.read_u64(at)?;
            match mem.read_u8(at + 8)? {
                EVENTTYPE_CLOCK => {
                    let id = mem.read_u32(at + 16)?;
                    let timeout = mem.read_u64(at + 24)?;
                    let flags = mem.read_u16(at + 40)?;
                    let abs = flags & SUBCLOCK_ABSTIME != 0;
                    let (deadline_ns, realtime) = match id {
                        CLOCK_MONOTONIC => (
                            if abs {
                                timeout
                            } else {
                                start.saturating_add(timeout)
                            },
                            false,
                        ),
                        // Realtime deadlines: measured against the last realtime reading the
                        // guest made, then converted to a monotonic wait.
                        CLOCK_REALTIME => {
                            let rel = if abs {
                                timeout.saturating_sub(realtime_start)
                            } else {
                                timeout
                            };
                            (start.saturating_add(rel), true)
                        }
                        _ => return Err(errno::INVAL.into()),
                    };
                    subs.push(Sub::Clock {
                        userdata,
                        deadline_ns,
                        realtime,
                    });
                }
                EVENTTYPE_FD_READ | EVENTTYPE_FD_WRITE => {
                    let write = mem.read_u8(at + 8)? == EVENTTYPE_FD_WRITE;
                    subs.push(Sub::Fd {
                        userdata,
                        fd: mem.read_u32(at + 16)?,
                        write,
                    });
                }
                _ => return Err(errno::INVAL.into()),
            }
        }
        subs
    };
    let mut now = start;
    loop {
        let events = ready_events(c.data_mut(), &subs, now);
        if !events.is_empty() {
            let (mut mem, _) = split(c);
            for (i, e) in events.iter().enumerate() {
                let at = events_ptr + i as u32 * EVENT_BYTES;
                mem.slice_mut(at, EVENT_BYTES)?.fill(0);
                mem.write_u64(at, e.userdata)?;
                mem.write_u16(at + 8, e.error)?;
                mem.write_u8(at + 10, e.kind)?;
                mem.write_u64(at + 16, e.nbytes)?;
                mem.write_u16(
                    at + 24,
                    if e.hangup {
                        EVENT_FD_READWRITE_HANGUP
                    } else {
                        0
                    },
                )?;
            }
            mem.write_u32(out, events.len() as u32)?;
            return Ok(());
        }
        let deadline = subs
            .iter()
            .filter_map(|s| match s {
                Sub::Clock { deadline_ns, .. } => Some(*deadline_ns),
                Sub::Fd { .. } => None,
            })
            .min();
        now = wait_and_deliver(c, deadline)?;
    }
}

/// One gate wait, with the frames it delivered handed to the netstack and its timers run.
/// Returns the virtual time the wait ended at.
pub(crate) fn wait_and_deliver(c: &mut Caller<'_, Host>, deadline: Option<u64>) -> HostResult<u64> {
    let pause = c.data_mut().gate.pace();
    if !pause.is_zero() {
        std::thread::sleep(pause);
    }
    let host = c.data_mut();
    // The guest's turn ends here: ACKs its replies did not carry go out before it waits.
    if let Some(net) = host.net.as_mut() {
        net.end_turn();
    }
    super::flush_net(host)?;
    let net_deadline = host.net.as_ref().and_then(|n| n.next_deadline_ns());
    let deadline = match (deadline, net_deadline) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let wake = host.gate.wait(deadline)?;
    if wake.control.is_some() {
        return Err(super::Fail::Fatal(VmError::PoweredOff));
    }
    let go_live = host.gate.take_go_live_duties();
    if let Some(net) = host.net.as_mut() {
        if go_live {
            // The paper's go-live: take over the VM's MAC/IP on the wire, and resend everything
            // the dead primary may have held back under the Output Rule.
            net.announce();
            net.retransmit_all(wake.now_ns);
        }
        for frame in &wake.frames {
            net.receive_frame(frame, wake.now_ns);
        }
        net.poll(wake.now_ns);
    }
    super::flush_net(host)?;
    after_gate(c)?;
    Ok(wake.now_ns)
}

fn ready_events(host: &mut Host, subs: &[Sub], now: u64) -> Vec<Event> {
    let mut events = Vec::new();
    for sub in subs {
        match sub {
            Sub::Clock {
                userdata,
                deadline_ns,
                ..
            } => {
                if now >= *deadline_ns {
                    events.push(Event {
                        userdata: *userdata,
                        error: 0,
                        kind: EVENTTYPE_CLOCK,
                        nbytes: 0,
                        hangup: false,
                    });
                }
            }
            Sub::Fd {
                userdata,
                fd,
                write,
            } => {
                let kind = if *write {
                    EVENTTYPE_FD_WRITE
                } else {
                    EVENTTYPE_FD_READ
                };
                let event = |error, nbytes, hangup| Event {
                    userdata: *userdata,
                    error,
                    kind,
                    nbytes,
                    hangup,
                };
                match host.fds.get(*fd).map(|e| e.kind.clone()) {
                    Err(e) => events.push(event(e, 0, false)),
                    // Files, directories and the console never block.
                    Ok(
                        FdKind::File { .. }
                        | FdKind::Dir { .. }
                        | FdKind::Stdin
                        | FdKind::Stdout
                        | FdKind::Stderr,
                    ) => events.push(event(0, 0, false)),
                    Ok(FdKind::Listener { id, .. }) => {
                        if !*write && super::sock::listener_ready(host, id) {
                            events.push(event(0, 1, false));
                        }
                    }
                    Ok(FdKind::Socket { id }) => {
                        if let Some((nbytes, hangup)) = super::sock::socket_ready(host, id, *write)
                        {
                            events.push(event(0, nbytes, hangup));
                        }
                    }
                }
            }
        }
    }
    events
}
