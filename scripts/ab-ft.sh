#!/usr/bin/env bash
# A/B of FT builds (issue 4): the KV guest under `ftvm run`, then as an FT pair once per build,
# round after round in the same lab, driven by redis-benchmark from the `client` namespace. For
# each it prints requests/s per test, CPU µs per request of the primary (or the plain server) and
# of the backup, the primary's context switches per thread (voluntary+involuntary, from
# /proc/PID/task/*/status) and CPU clock ticks per thread (both since the process started), and
# its log writes, and the machine's inter-processor interrupts per request (rescheduling, function
# call, TLB shootdown: a wake-up or TLB flush that crosses vCPUs; system-wide, from
# /proc/interrupts); at the end the medians, each build's FT ÷ run, and the median of the rounds'
# paired ratios with a 90% bootstrap interval.
# Usage: scripts/ab-ft.sh [ROUNDS]                    (root; run scripts/setup.sh first)
#   FT_BINS="NAME=PATH ..."   the builds to compare (default: head=target/release/ftvm); `ftvm
#                             run` uses the first
#   CAP_CPU=0.5               the server/primary process's CPU budget (scripts/cpu-cap.sh); 0: none
#   CONC=50 N=100000 TESTS=set,get   redis-benchmark's -c, -n and -t
#   PIN=P:B:C                 pin the server/primary to CPU P, the backup to B, the client to C
#   HALT_POLL_NS=N            idle vCPUs poll N ns before they halt, for this run (scripts/halt-poll.sh)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
G="$REPO/guests/build"
ROUNDS="${1:-3}"
FT_BINS="${FT_BINS:-head=$REPO/target/release/ftvm}"
CAP_CPU="${CAP_CPU:-0.5}"
CONC="${CONC:-50}"
N="${N:-100000}"
TESTS="${TESTS:-set,get}"
read -r -a BINS <<<"$FT_BINS"
F="${BINS[0]#*=}"
LAB=bab
S=61
MAC=02:f7:00:00:3d:50
TMP="$(mktemp -d)"
PIDS=()
source "$REPO/scripts/cpu-cap.sh"
source "$REPO/scripts/kv-lab.sh"
trap kv_lab_cleanup EXIT
cpu_pin "${PIN:-}"
for b in "${BINS[@]}"; do
    [[ -x "${b#*=}" ]] || { echo "not an executable: ${b#*=}" >&2; exit 2; }
done
cpu_cap_setup "ab-$LAB" "$CAP_CPU"
halt_poll_setup
kv_lab_up ab-ft
inns() { local h="$1"; shift; ip netns exec "$LAB-$h" "$@"; }
switches() { # per thread name: voluntary+involuntary context switches so far
    for t in /proc/"$1"/task/*; do
        echo "$(cat "$t/comm") $(awk '/^(voluntary|nonvoluntary)_ctxt_switches/ { s += $2 } END { print s }' "$t/status")"
    done | awk '{ s[$1] += $2 } END { for (k in s) printf "%s=%d ", k, s[k] }'
}
thread_ticks() { # per thread name: user+system clock ticks so far
    for t in /proc/"$1"/task/*; do
        echo "$(cat "$t/comm") $(awk '{ print $14 + $15 }' "$t/stat")"
    done | awk '{ s[$1] += $2 } END { for (k in s) printf "%s=%d ", k, s[k] }'
}
ipis() { # rescheduling, function call and TLB shootdown interrupts so far, all CPUs
    awk '$1 == "RES:" || $1 == "CAL:" || $1 == "TLB:" { s = 0; for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) s += $i; printf "%d ", s }' /proc/interrupts
}
stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }
bench() { # bench NAME SERVER_PID [BACKUP_PID]
    local s0 b0 sw i0 i1
    s0=$(ticks "$2"); b0=$(ticks "${3:-0}"); read -r -a i0 <<<"$(ipis)"
    inns client "${PIN_C[@]}" redis-benchmark -h $VM -p 6379 -t "$TESTS" -n "$N" -c "$CONC" --csv 2>/dev/null |
        awk -F',' -v name="$1" 'NR > 1 { for (i = 1; i <= NF; i++) gsub(/"/, "", $i); print name, $1, $2 }' \
            | tee -a "$TMP/rps"
    read -r -a i1 <<<"$(ipis)"
    sw=$(switches "$2")
    awk -v n="$1" -v s="$(( $(ticks "$2") - s0 ))" -v b="$(( $(ticks "${3:-0}") - b0 ))" -v hz="$HZ" \
        -v r="$(( N * $(tr ',' '\n' <<<"$TESTS" | wc -l) ))" -v sw="$sw" -v tt="$(thread_ticks "$2")" \
        -v res="$(( i1[0] - i0[0] ))" -v cal="$(( i1[1] - i0[1] ))" -v tlb="$(( i1[2] - i0[2] ))" \
        'BEGIN { printf "%s cpu_us %.2f %.2f ipis_per_req %.3f %.3f %.3f switches %s ticks %s\n", n, s * 1e6 / hz / r,
                 b * 1e6 / hz / r, res / r, cal / r, tlb / r, sw, tt }' \
            | tee -a "$TMP/cpu"
}
for ((r = 0; r < ROUNDS; r++)); do
    echo "round $((r + 1))"
    ip netns exec $LAB-host-a "${PIN_A[@]}" "$F" run --nic "tap=tap0,mac=$MAC,ip=$VM/24" --listen 6379 "$G/kv.wasm" >/dev/null 2>&1 &
    p=$!; PIDS+=($p)
    cpu_cap $p
    wait_port
    bench run $p
    stop $p
    for b in "${BINS[@]}"; do
        name="${b%%=*}"; bin="${b#*=}"
        rm -rf "$TMP/tb" "$TMP/a.json"
        ip netns exec $LAB-host-a "${PIN_A[@]}" "$bin" ft --vm "$TMP/kv.toml" --as primary --log $HA:7400 --tiebreak "dir:$TMP/tb" \
            --tap tap0 --status-file "$TMP/a.json" >/dev/null 2>&1 &
        pa=$!; PIDS+=($pa)
        ip netns exec $LAB-host-b "${PIN_B[@]}" "$bin" ft --vm "$TMP/kv.toml" --as backup --log $HA:7400 --tiebreak "dir:$TMP/tb" \
            --tap tap0 >/dev/null 2>&1 &
        pb=$!; PIDS+=($pb)
        cpu_cap $pa
        wait_port
        bench "ft-$name" $pa $pb
        sleep 0.3 # the status file is rewritten every 200 ms
        python3 -c "import json; d = json.load(open('$TMP/a.json')); print('ft-$name log_writes', d['log_writes'])" |
            tee -a "$TMP/writes"
        stop $pa; stop $pb
    done
done
echo "medians over $ROUNDS rounds; redis-benchmark -t $TESTS -n $N -c $CONC, CAP_CPU=$CAP_CPU, PIN=${PIN:-none}, HALT_POLL_NS=${HALT_POLL_NS:-unchanged}"
python3 - "$TMP/rps" "$TMP/cpu" "$TMP/writes" <<'PY'
import sys, statistics as st, collections as co
rps, cpu, writes = co.defaultdict(list), co.defaultdict(list), co.defaultdict(list)
for line in open(sys.argv[1]):
    name, test, v = line.split()
    rps[(name, test)].append(float(v))
for line in open(sys.argv[2]):
    f = line.split()
    cpu[f[0]].append((float(f[2]), float(f[3]), float(f[5]), float(f[6]), float(f[7])))
for line in open(sys.argv[3]):
    f = line.split()
    writes[f[0]].append(int(f[2]))
names = list(dict.fromkeys(n for n, _ in rps))
tests = list(dict.fromkeys(t for _, t in rps))
for n in names:
    cells = []
    for t in tests:
        m = st.median(rps[(n, t)])
        ratio = m / st.median(rps[("run", t)])
        cells.append(f"{t} {m:.0f} req/s ({ratio:.3f} of run)")
    c = cpu[n]
    line = f"{n:<12} " + ", ".join(cells)
    line += f"; CPU µs/req {st.median(x[0] for x in c):.2f}"
    line += "; IPIs/req res {:.3f} cal {:.3f} tlb {:.3f}".format(*(st.median(x[i] for x in c) for i in (2, 3, 4)))
    if n != "run":
        line += f" + backup {st.median(x[1] for x in c):.2f}; log writes {st.median(writes[n]):.0f}"
    print(line)
# Each round's FT ÷ run (the build's rate over the plain run's of the same round, the tests'
# rates summed): their median, and a 90% bootstrap interval of that median (resampling the
# rounds, fixed seed), so a goal can be read as met, missed, or not told apart by this run.
import random
rng = random.Random(4)
rounds = len(rps[("run", tests[0])])
def per_round(n):
    return [sum(rps[(n, t)][r] for t in tests) / sum(rps[("run", t)][r] for t in tests)
            for r in range(rounds)]
for n in names[1:]:
    x = per_round(n)
    boot = sorted(st.median(rng.choices(x, k=len(x))) for _ in range(2000))
    print(f"{n:<12} per-round FT ÷ run ({len(x)} rounds): median {st.median(x):.3f}, "
          f"90% interval {boot[100]:.3f}..{boot[1899]:.3f}, range {min(x):.3f}..{max(x):.3f}")
PY
