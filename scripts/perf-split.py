#!/usr/bin/env python3
"""Splits a system-wide profile (`perf record -a -g -e cpu-clock -F HZ`) by server process and by
where their kernel time went, per request. Used by `PERF=DIR scripts/ratio-kv.sh`.

Reads `perf script -F pid,tid,comm,ip,sym` on stdin.
Usage: perf-split.py HZ REQUESTS NAME=PID [NAME=PID ...]

A system-wide profile has no per-task events, so unlike `perf record -p` it does not make the
profiled processes' context switches dearer (BENCHMARKS.md: that inflated FT's switching).
"""
import collections
import sys

# The system call a kernel sample ran under, by the syscall entry seen in its call chain.
SYSCALLS = [
    ("ksys_write", "write (TAP)"),
    ("ksys_read", "read (TAP)"),
    ("__sys_sendto", "sendto (log channel)"),
    ("__sys_recvfrom", "recvfrom (log channel)"),
    ("do_sys_poll", "ppoll (waits)"),
    ("do_futex", "futex (locks, wake-ups)"),
    ("hrtimer_nanosleep", "clock_nanosleep"),
]


def main():
    hz, requests = float(sys.argv[1]), float(sys.argv[2])
    names = {}
    for arg in sys.argv[3:]:
        name, pid = arg.split("=", 1)
        names[pid] = name
    total = collections.Counter()
    user = collections.Counter()
    where = collections.Counter()
    wake = collections.Counter()
    threads = collections.Counter()

    def account(head, chain):
        pid, comm = head
        name = names.get(pid)
        if name is None or not chain:
            return
        total[name] += 1
        threads[(name, comm)] += 1
        if not chain[0][0].startswith("ffffffff"):
            user[name] += 1
            return
        syms = [s for _, s in chain]
        bucket = "other kernel (interrupts, faults, scheduling)"
        for marker, label in SYSCALLS:
            if any(s.startswith(marker) for s in syms):
                bucket = label
                break
        where[(name, bucket)] += 1
        # Waking a socket's reader: cpu-clock samples taken while interrupts were off land where
        # they come back on, here the wait queue's unlock after the wake-up (and its IPI).
        if len(syms) > 1 and syms[0].startswith("_raw_spin_unlock_irqrestore") and \
                syms[1].startswith("sock_def_readable"):
            wake[name] += 1

    head, chain = None, []
    for line in sys.stdin:
        if not line.strip():
            continue
        if line[0] not in " \t":
            if head:
                account(head, chain)
            parts = line.split()
            head, chain = (parts[1].split("/")[0], parts[0]), []
        else:
            frame = line.strip().split(None, 1)
            chain.append((frame[0], frame[1] if len(frame) > 1 else "?"))
    if head:
        account(head, chain)

    us = lambda samples: samples / hz / requests * 1e6
    order = list(dict.fromkeys(names.values()))
    print(f"CPU µs per request, from a system-wide profile ({requests:.0f} requests each):")
    print(f"  {'':<52}" + "".join(f"{n:>12}" for n in order))
    rows = [("all", total), ("user space", user)]
    rows.append(("kernel", collections.Counter({n: total[n] - user[n] for n in order})))
    for _, label in SYSCALLS:
        rows.append(("  " + label, collections.Counter({n: where[(n, label)] for n in order})))
    label = "other kernel (interrupts, faults, scheduling)"
    rows.append(("  " + label, collections.Counter({n: where[(n, label)] for n in order})))
    rows.append(("  of the kernel: waking a socket's reader (irqs off)", wake))
    for title, counts in rows:
        print(f"  {title:<52}" + "".join(f"{us(counts[n]):>12.2f}" for n in order))
    for n in order:
        per = ", ".join(f"{c} {us(v):.2f}" for (m, c), v in sorted(threads.items()) if m == n)
        print(f"  {n} by thread: {per}")


if __name__ == "__main__":
    main()
