#!/usr/bin/env bash
# FT ÷ non-FT for the KV guest (issue 4) with both servers up at once: a plain `ftvm run` of the
# KV guest and an FT pair of it (primary on host-a, backup on host-b) in one lab, each with its
# own address, and redis-benchmark from the `client` namespace alternating between them in short
# slices (plain, FT, FT, plain, ...). Slices a second or so apart see the same machine, so their
# ratios vary much less than those of rounds that restart the servers (scripts/ab-ft.sh).
# Prints each slice pair's FT ÷ run, their median with a 90% bootstrap interval, and CPU µs per
# request of the plain server, the primary (each with the part spent in the kernel) and the
# backup over all slices, and how often the client had to sleep (its voluntary context switches
# a request: FT's replies leave in bursts, and each wake-up of a sleeping client is paid for by
# the server whose reply wakes it).
# Usage: scripts/ratio-kv.sh [PAIRS]              (root; run scripts/setup.sh first; default 20)
#   CAP_CPU=0.5            the plain server's and the primary's CPU budget, each its own cgroup
#                          (scripts/cpu-cap.sh); 0: none
#   PIN=P:B:C              pin the plain server and the primary to CPU P, the backup to B, the
#                          client to C (0:0:1: bench-kv.sh's one-CPU placement)
#   CONC=50 N=50000 TEST=set   redis-benchmark's -c, -n (per slice) and -t (one test)
#   HALT_POLL_NS=N         idle vCPUs poll N ns before they halt, for this run (scripts/halt-poll.sh)
#   FTVM=PATH              the ftvm build to measure (default target/release/ftvm)
#   PERF=DIR               also profile the whole machine over the slices (perf record -a -g,
#                          kept in DIR/perf.data, the servers' PIDs in DIR/pids) and print each
#                          server's CPU per request split by system call (scripts/perf-split.py);
#                          installs linux-perf
#   SYSCALLS=1             also count the servers' system calls and context switches over the
#                          slices (perf stat on tracepoints) and print them per request; installs
#                          linux-perf
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
F="${FTVM:-$REPO/target/release/ftvm}"
G="$REPO/guests/build"
PAIRS="${1:-20}"
CAP_CPU="${CAP_CPU:-0.5}"
CONC="${CONC:-50}"
N="${N:-50000}"
TEST="${TEST:-set}"
LAB=brk
S=63
MAC=02:f7:00:00:3f:50
PLAIN_MAC=02:f7:00:00:3f:51
TMP="$(mktemp -d)"
PIDS=()
source "$REPO/scripts/cpu-cap.sh"
source "$REPO/scripts/kv-lab.sh"
PLAIN=198.18.$S.51
trap kv_lab_cleanup EXIT
[[ "$PAIRS" =~ ^[0-9]+$ && "$PAIRS" -ge 2 && "$PAIRS" -le 500 ]] || { echo "PAIRS: 2..500" >&2; exit 2; }
[[ -z "${PERF:-}" && -z "${SYSCALLS:-}" ]] || need_perf
cpu_pin "${PIN:-}"
# Two budgets: the plain server's and the primary's, so neither's idle ticks eat the other's.
cpu_cap_setup "rk-$LAB-plain" "$CAP_CPU"
PLAIN_CG="$CPU_CAP_CG"
cpu_cap_setup "rk-$LAB-ft" "$CAP_CPU"
FT_CG="$CPU_CAP_CG"
halt_poll_setup
kv_lab_up ratio-kv
kv_lab_plain_tap
inns() { local h="$1"; shift; ip netns exec "$LAB-$h" "$@"; }
sys_ticks() { awk '{print $15}' "/proc/$1/stat"; }
# "periods throttled" of a CPU budget so far (0 0 without one): a server that is not throttled
# in a period left part of its budget unused (it waited, or something else had the CPU).
throttles() { [[ -n "$1" ]] && awk '/^nr_periods/ {p = $2} /^nr_throttled/ {t = $2} END {print p, t}' "$1/cpu.stat" || echo 0 0; }
ip netns exec "$LAB-host-a" "${PIN_A[@]}" "$F" run --nic "tap=tap1,mac=$PLAIN_MAC,ip=$PLAIN/24" --listen 6379 "$G/kv.wasm" \
    >/dev/null 2>"$TMP/plain.err" &
pp=$!; PIDS+=($pp)
cpu_cap $pp "$PLAIN_CG"
ip netns exec "$LAB-host-a" "${PIN_A[@]}" "$F" ft --vm "$TMP/kv.toml" --as primary --log $HA:7400 --tiebreak "dir:$TMP/tb" \
    --tap tap0 >/dev/null 2>"$TMP/primary.err" &
pa=$!; PIDS+=($pa)
ip netns exec "$LAB-host-b" "${PIN_B[@]}" "$F" ft --vm "$TMP/kv.toml" --as backup --log $HA:7400 --tiebreak "dir:$TMP/tb" \
    --tap tap0 >/dev/null 2>"$TMP/backup.err" &
pb=$!; PIDS+=($pb)
cpu_cap $pa
wait_port $PLAIN
wait_port $VM
PERF_HZ=999
if [[ -n "${PERF:-}" ]]; then
    mkdir -p "$PERF"
    # System-wide: no per-task events, so the servers' context switches cost what they cost.
    perf record -a -g -e cpu-clock -F $PERF_HZ -o "$PERF/perf.data" >/dev/null 2>"$PERF/perf.err" &
    perf_pid=$!; PIDS+=($perf_pid)
fi
COUNTED=(sendto write read recvfrom ppoll ioctl futex)
if [[ -n "${SYSCALLS:-}" ]]; then
    events=$(printf 'syscalls:sys_enter_%s,' "${COUNTED[@]}")sched:sched_switch
    perf stat -e "$events" -p $pp,$pa,$pb --per-thread -x, -o "$TMP/syscalls.csv" 2>/dev/null &
    stat_pid=$!; PIDS+=($stat_pid)
fi
# Runs a command and writes its voluntary context switches (with those of the children it
# waited for: timeout's redis-benchmark) to the file named first.
cat >"$TMP/rusage.py" <<'PY'
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, ru = os.wait4(pid, 0)
open(sys.argv[1], "w").write(f"{ru.ru_nvcsw}\n")
sys.exit(os.waitstatus_to_exitcode(status))
PY
slice() { # slice NAME ADDR PID CG: one redis-benchmark run; appends
    # "NAME rps ticks backup_ticks sys_ticks client_sleeps periods throttled"
    local t0 b0 k0 rps th0 th1
    t0=$(ticks "$3"); b0=$(ticks $pb); k0=$(sys_ticks "$3"); th0=($(throttles "$4"))
    rm -f "$TMP/client-sleeps" # never a previous slice's figure
    rps=$(inns client "${PIN_C[@]}" python3 "$TMP/rusage.py" "$TMP/client-sleeps" timeout 120 redis-benchmark \
        -h "$2" -p 6379 -t "$TEST" -n "$N" -c "$CONC" --csv 2>/dev/null | awk -F',' 'NR == 2 { gsub(/"/, "", $2); print $2 }')
    [[ -n "$rps" ]] || { echo "redis-benchmark against $1 ($2) gave no result" >&2; exit 1; }
    [[ -s "$TMP/client-sleeps" ]] || { echo "no rusage for the client of $1" >&2; exit 1; }
    th1=($(throttles "$4"))
    echo "$1 $rps $(( $(ticks "$3") - t0 )) $(( $(ticks $pb) - b0 )) $(( $(sys_ticks "$3") - k0 )) $(cat "$TMP/client-sleeps")" \
        "$(( th1[0] - th0[0] )) $(( th1[1] - th0[1] ))" >>"$TMP/slices"
}
for ((i = 0; i < PAIRS; i++)); do
    # Alternate the order (ABBA), so a trend within a pair does not favour either side.
    if ((i % 2 == 0)); then slice run $PLAIN $pp "$PLAIN_CG"; slice ft $VM $pa "$FT_CG"; else slice ft $VM $pa "$FT_CG"; slice run $PLAIN $pp "$PLAIN_CG"; fi
    echo -n "." >&2
done
echo >&2
if [[ -n "${PERF:-}" ]]; then
    kill -INT $perf_pid
    wait $perf_pid || true
fi
if [[ -n "${SYSCALLS:-}" ]]; then
    kill -INT $stat_pid
    wait $stat_pid || true
fi
kill -0 $pa $pb $pp || { echo "a server died during the run" >&2; exit 1; }
echo "redis-benchmark -t $TEST -n $N -c $CONC per slice, $PAIRS pairs; CAP_CPU=$CAP_CPU, PIN=${PIN:-none}, HALT_POLL_NS=${HALT_POLL_NS:-unchanged}"
python3 - "$TMP/slices" "$HZ" "$N" <<'PY'
import sys, random, statistics as st
hz, n = int(sys.argv[2]), int(sys.argv[3])
rows = [l.split() for l in open(sys.argv[1])]
run = [r for r in rows if r[0] == "run"]
ft = [r for r in rows if r[0] == "ft"]
ratios = [float(f[1]) / float(p[1]) for p, f in zip(run, ft)]
rng = random.Random(4)
boot = sorted(st.median(rng.choices(ratios, k=len(ratios))) for _ in range(2000))
print("req/s per slice, run:", " ".join(r[1].split(".")[0] for r in run))
print("req/s per slice, FT: ", " ".join(r[1].split(".")[0] for r in ft))
print("FT ÷ run per pair:", " ".join(f"{x:.3f}" for x in ratios))
print(f"median {st.median(ratios):.3f}, 90% bootstrap interval {boot[100]:.3f}..{boot[1899]:.3f}, "
      f"range {min(ratios):.3f}..{max(ratios):.3f}")
us = lambda rs, col: sum(int(r[col]) for r in rs) * 1e6 / hz / (n * len(rs))
print(f"req/s, median: run {st.median(float(r[1]) for r in run):.0f}, FT {st.median(float(r[1]) for r in ft):.0f}; "
      f"CPU µs per request: run {us(run, 2):.2f} (kernel {us(run, 4):.2f}), "
      f"FT primary {us(ft, 2):.2f} (kernel {us(ft, 4):.2f}), backup {us(ft, 3):.2f}")
sleeps = lambda rs: sum(int(r[5]) for r in rs) / (n * len(rs))
print(f"client's voluntary context switches per request: run {sleeps(run):.4f}, FT {sleeps(ft):.4f}")
periods = lambda rs: sum(int(r[6]) for r in rs)
if periods(run) and periods(ft):
    share = lambda rs: 100 * sum(int(r[7]) for r in rs) / periods(rs)
    print(f"CPU budget periods that ran out (throttled): run {share(run):.0f}% of {periods(run)}, "
          f"FT primary {share(ft):.0f}% of {periods(ft)}")
PY
if [[ -n "${PERF:-}" ]]; then
    echo "run=$pp primary=$pa backup=$pb" >"$PERF/pids"
    perf script -i "$PERF/perf.data" -F pid,tid,comm,ip,sym 2>/dev/null |
        python3 "$REPO/scripts/perf-split.py" $PERF_HZ $((PAIRS * N)) $(cat "$PERF/pids")
fi
if [[ -n "${SYSCALLS:-}" ]]; then
    # perf stat -x, --per-thread: "comm-tid,count,unit,event,...". Each server served PAIRS * N
    # requests over its own slices; the other slices it idled.
    python3 - "$TMP/syscalls.csv" $((PAIRS * N)) "run=$pp" "primary=$pa" "backup=$pb" <<'PY'
import collections, os, sys
requests = int(sys.argv[2])
tids = {}
for arg in sys.argv[3:]:
    name, pid = arg.split("=")
    for tid in os.listdir(f"/proc/{pid}/task"):
        tids[tid] = name
counts = collections.defaultdict(collections.Counter)
for line in open(sys.argv[1]):
    f = line.strip().split(",")
    if len(f) < 4 or not f[1].isdigit():
        continue
    tid = f[0].rsplit("-", 1)[-1]
    event = f[3].split(":")[-1].removeprefix("sys_enter_")
    if tid in tids:
        counts[event][tids[tid]] += int(f[1])
print("per request (all threads of each server):   run  primary   backup")
for event in sorted(counts, key=lambda e: -sum(counts[e].values())):
    c = counts[event]
    print(f"  {event:<38} " + " ".join(f"{c[n] / requests:8.4f}" for n in ("run", "primary", "backup")))
PY
fi
