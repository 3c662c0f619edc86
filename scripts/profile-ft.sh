#!/usr/bin/env bash
# Where an FT primary's extra CPU goes (issue 4): `perf record -g` of the server process only, for
# (a) the KV guest under `ftvm run` and (b) the same guest as an FT primary with its backup, each
# driven by `redis-benchmark -t set -c 50` in the lab. Prints throughput, CPU µs per request and,
# per request, the µs under the code paths that differ (inclusive: a path's callees count).
# Usage: scripts/profile-ft.sh [SECONDS]     (root; run scripts/setup.sh first; installs linux-perf)
#        CAP_CPU=0.5 scripts/profile-ft.sh ...  (the server process, in both, capped to 0.5 CPU by a
#                                                cgroup CFS quota, as in bench-kv.sh's capped runs)
#        PIN=0:0:1 scripts/profile-ft.sh ...    (pin the server or primary, the backup and the client
#                                                to these CPUs; 0:0:1 is bench-kv.sh's one-CPU
#                                                placement)
#        HALT_POLL_NS=N scripts/profile-ft.sh ...  (idle vCPUs poll N ns before they halt: halt-poll.sh)
#        KEEP=DIR scripts/profile-ft.sh ...      (copy the perf.data files, run.data and ft-primary.data, to DIR)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
F="$REPO/target/release/ftvm"
G="$REPO/guests/build"
SECS="${1:-5}"
CAP_CPU="${CAP_CPU:-0}"
LAB=pft
S=64
MAC=02:f7:00:00:40:50
TMP="$(mktemp -d)"
PIDS=()
source "$REPO/scripts/cpu-cap.sh"
source "$REPO/scripts/kv-lab.sh"
trap kv_lab_cleanup EXIT
cpu_pin "${PIN:-}"
cpu_cap_setup "profile-$LAB" "$CAP_CPU"
halt_poll_setup
need_perf
kv_lab_up profile-ft
profile() { # profile NAME PID: load for SECS+1 s, record the process for SECS s, report
    ip netns exec $LAB-client "${PIN_C[@]}" timeout $((SECS + 30)) redis-benchmark -h $VM -p 6379 -t set \
        -n 100000000 -c 50 -q >"$TMP/$1.bench" 2>&1 &
    local b=$!
    PIDS+=($b)
    sleep 1
    perf record -g -e cpu-clock -F 1999 -p "$2" -o "$TMP/$1.data" -- sleep "$SECS" >/dev/null 2>&1
    kill $b 2>/dev/null || true
    wait $b 2>/dev/null || true
    local rps
    rps=$(tr '\r' '\n' <"$TMP/$1.bench" | grep -o 'rps=[0-9.]*' | tail -1 | cut -d= -f2)
    # cpu-clock's event count is CPU nanoseconds of the process over SECS seconds.
    local ns
    ns=$(perf report -i "$TMP/$1.data" --stdio 2>/dev/null | sed -n 's/^# Event count (approx.): //p')
    local per=$(awk -v ns="$ns" -v r="$rps" -v s="$SECS" 'BEGIN { printf "%.2f", ns / 1000 / (r * s) }')
    echo "$1: $rps req/s, $per µs CPU per request; per request, inclusive:"
    perf report -i "$TMP/$1.data" --stdio --children -g none --sort sym 2>/dev/null |
        awk -v per="$per" '$1 ~ /%$/ && $2 ~ /%$/ {
            sym = $NF
            if (sym ~ /^(__GI___libc_write|__send|__libc_recv|ppoll|finish_task_switch.isra.0|tcp_v4_rcv|syscall)$/) {
                sub(/%/, "", $1); printf "    %-28s %5.2f µs (%s%%)\n", sym, $1 * per / 100, $1
            }
        }'
    # Self time of the scheduler's switch and wake-up paths: with cpu-clock sampling, time with
    # interrupts off is counted where they come back on, at the end of a context switch
    # (finish_task_switch) or of a wake-up (_raw_spin_unlock_irqrestore).
    perf report -i "$TMP/$1.data" --stdio --no-children -g none --sort sym 2>/dev/null |
        awk -v per="$per" '$1 ~ /%$/ && $NF ~ /^(finish_task_switch.isra.0|_raw_spin_unlock_irqrestore)$/ {
            sub(/%/, "", $1); s += $1
        } END { printf "    %-28s %5.2f µs (%.2f%%)\n", "switches+wake-ups, self", s * per / 100, s }'
    # Self time in user space (ftvm, the guest's code, libc): what the process computes itself.
    perf report -i "$TMP/$1.data" --stdio --no-children -g none --sort sym 2>/dev/null |
        awk -v per="$per" '$1 ~ /%$/ && $2 == "[.]" { sub(/%/, "", $1); s += $1 }
            END { printf "    %-28s %5.2f µs (%.2f%%)\n", "user space, self", s * per / 100, s }'
}
ip netns exec $LAB-host-a "${PIN_A[@]}" "$F" run --nic "tap=tap0,mac=$MAC,ip=$VM/24" --listen 6379 "$G/kv.wasm" \
    >/dev/null 2>&1 &
p=$!
PIDS+=($p)
cpu_cap $p
wait_port
profile run $p
kill $p
wait $p 2>/dev/null || true
ip netns exec $LAB-host-a "${PIN_A[@]}" "$F" ft --vm "$TMP/kv.toml" --as primary --log $HA:7400 \
    --tiebreak "dir:$TMP/tb" --tap tap0 >/dev/null 2>&1 &
pa=$!
PIDS+=($pa)
cpu_cap $pa
ip netns exec $LAB-host-b "${PIN_B[@]}" "$F" ft --vm "$TMP/kv.toml" --as backup --log $HA:7400 \
    --tiebreak "dir:$TMP/tb" --tap tap0 >/dev/null 2>&1 &
PIDS+=($!)
wait_port
profile ft-primary $pa
[[ -n "${KEEP:-}" ]] && mkdir -p "$KEEP" && cp "$TMP"/*.data "$KEEP"/
echo "(__GI___libc_write: TAP writes, with the client's TCP receive they run on one machine;"
echo " __send: log writes; __libc_recv: ack reads; finish_task_switch: context switches)"
