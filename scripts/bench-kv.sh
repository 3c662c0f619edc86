#!/usr/bin/env bash
# KV and network benchmarks in the lab (issues 3 and 4), all configurations in one run, interleaved:
#   (a) the KV guest under `ftvm run` (our netstack behind a TAP)
#   (b) the same C server built natively (kernel TCP) in the same host namespace
#   (c) real redis-server in the same host namespace
#   (d) the KV guest as a fault-tolerant pair (primary host-a, backup host-b)
#   (e), (f) = (a), (d) with the primary's "host" given a fixed CPU budget (a cgroup CPU quota of
#       CAP_CPU, default 0.5 CPU, on the ftvm process in both): the primary is the bottleneck, the
#       backup and the client get the rest of the machine, as with hosts of their own
#   (g), (h) = (e), (f) with the replicas (or the plain server) pinned to CPU 0 and the client to
#       CPU 1: the log channel's wake-ups then stay on one CPU (a wake-up across CPUs costs this
#       machine about 20 times as much: scripts/wake-cost.sh), the client has a CPU of its own
# with the CPU time the server (primary) and the backup processes used per request; then
# single-stream echo throughput (ftvm vs native), the log bandwidth of the FT pair under load,
# and the client-visible stall of a failover (SIGKILL of the primary during an INCR loop).
# Usage: scripts/bench-kv.sh [REQUESTS] [ROUNDS]      (root; run scripts/setup.sh first)
#        PIPELINE=16 scripts/bench-kv.sh ...            (redis-benchmark -P 16)
#        CONC=200 scripts/bench-kv.sh ...               (200 clients instead of 50)
#        CAP_CPU=0 scripts/bench-kv.sh ...              (no capped or pinned configurations)
#        HALT_POLL_NS=200000 scripts/bench-kv.sh ...    (idle vCPUs poll before they halt, for
#                                                        this run: scripts/halt-poll.sh)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
F="$REPO/target/release/ftvm"
G="$REPO/guests/build"
N="${1:-100000}"
ROUNDS="${2:-3}"
CAP_CPU="${CAP_CPU:-0.5}"
CONC="${CONC:-50}"
LAB=bkv
S=60
VM=198.18.$S.50
HA=198.18.$S.11
TMP="$(mktemp -d)"
PIDS=()
# The capped primary's "host": a cgroup CPU quota (scripts/cpu-cap.sh).
source "$REPO/scripts/cpu-cap.sh"
source "$REPO/scripts/halt-poll.sh"
cleanup() {
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    cpu_cap_cleanup
    halt_poll_cleanup
    "$F" lab down --name $LAB || true
    rm -rf "$TMP"
}
trap cleanup EXIT
cpu_cap_setup "bench-$LAB" "$CAP_CPU"
halt_poll_setup
"$F" lab up --name $LAB --subnet $S >/dev/null
for h in host-a host-b; do
    ip -n $LAB-$h tuntap add dev tap0 mode tap
    ip -n $LAB-$h link set tap0 master br0 up
done
inns() { local h="$1"; shift; ip netns exec "$LAB-$h" "$@"; }
NIC="tap=tap0,mac=02:f7:00:00:3c:50,ip=$VM/24"
cat >"$TMP/kv.toml" <<TOML
name = "bench-kv"
module = "$G/kv.wasm"
listen = [6379]
[nic]
mac = "02:f7:00:00:3c:50"
ip = "$VM/24"
TOML
wait_port() { for _ in $(seq 100); do inns client redis-cli -h "$1" -p "$2" PING >/dev/null 2>&1 && return 0; sleep 0.1; done; echo "no server at $1:$2" >&2; return 1; }
ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; } # user+system, clock ticks
HZ=$(getconf CLK_TCK)
PIN_A=() PIN_B=() PIN_C=() # set by run_vm and ft_pair (cpu_pin) for the pinned configurations
bench() { # bench NAME HOST PORT [SERVER_PID [BACKUP_PID]] -> appends "name test rps p50 p99" lines
    local s0 b0
    s0=$(ticks "${4:-0}"); b0=$(ticks "${5:-0}")
    inns client "${PIN_C[@]}" redis-benchmark -h "$2" -p "$3" -t ping,set,get,incr -n "$N" -c "$CONC" ${PIPELINE:+-P "$PIPELINE"} --csv 2>/dev/null |
        awk -F',' -v name="$1" 'NR>1 { for (i = 1; i <= NF; i++) gsub(/"/, "", $i); print name, $1, $2, $5, $7 }' >>"$TMP/results"
    # CPU microseconds per request of the server (primary) and of the backup, over all 4 tests.
    awk -v n="$1" -v s="$(( $(ticks "${4:-0}") - s0 ))" -v b="$(( $(ticks "${5:-0}") - b0 ))" -v hz="$HZ" -v r="$((4 * N))" \
        'BEGIN { printf "%s %.2f %.2f\n", n, s * 1e6 / hz / r, b * 1e6 / hz / r }' >>"$TMP/cpu"
}
stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

# placement MODE: "" or cap (the CPU cap only) leave every process unpinned; pin (the cap as
# well) puts the replicas on CPU 0 and the client on CPU 1.
placement() {
    if [[ "$1" == pin ]]; then cpu_pin 0:0:1; else cpu_pin ""; fi
}
run_vm() { # run_vm NAME [cap|pin]
    placement "${2:-}"
    ip netns exec $LAB-host-a "${PIN_A[@]}" "$F" run --nic "$NIC" --listen 6379 "$G/kv.wasm" >/dev/null 2>&1 & p=$!; PIDS+=($p)
    [[ -n "${2:-}" ]] && cpu_cap $p
    wait_port $VM 6379; bench "$1" $VM 6379 $p; stop $p
}
ft_pair() { # ft_pair NAME [cap|pin]
    placement "${2:-}"
    rm -rf "$TMP/tb" "$TMP/a.json"
    ip netns exec $LAB-host-a "${PIN_A[@]}" "$F" ft --vm "$TMP/kv.toml" --as primary --log $HA:7400 --tiebreak "dir:$TMP/tb" --tap tap0 \
        --status-file "$TMP/a.json" >/dev/null 2>&1 & pa=$!; PIDS+=($pa)
    ip netns exec $LAB-host-b "${PIN_B[@]}" "$F" ft --vm "$TMP/kv.toml" --as backup --log $HA:7400 --tiebreak "dir:$TMP/tb" --tap tap0 \
        >/dev/null 2>&1 & pb=$!; PIDS+=($pb)
    [[ -n "${2:-}" ]] && cpu_cap $pa
    wait_port $VM 6379
    for _ in $(seq 50); do [[ -s "$TMP/a.json" ]] && break; sleep 0.1; done
    b0=$(python3 -c "import json;print(json.load(open('$TMP/a.json'))['log_bytes_sent'])"); t0=$(date +%s%N)
    # The ack round trip under load, sampled half-way (the status file is rewritten every 200 ms).
    ( sleep 1; python3 -c "import json;print(json.load(open('$TMP/a.json'))['ack_rtt_us'])" >>"$TMP/rtt-$1" 2>/dev/null ) &
    bench "$1" $VM 6379 $pa $pb
    b1=$(python3 -c "import json;print(json.load(open('$TMP/a.json'))['log_bytes_sent'])"); t1=$(date +%s%N)
    [[ "$1" == ftvm-ft ]] && awk -v a="$b0" -v b="$b1" -v t=$(( (t1 - t0) / 1000000 )) 'BEGIN { printf "%.2f\n", (b-a)*8/1e6/(t/1000) }' >>"$TMP/logbw"
    stop $pa; stop $pb
}
for ((r = 0; r < ROUNDS; r++)); do
    run_vm ftvm-run
    ip netns exec $LAB-host-a "$G/native/kv" 6380 >/dev/null 2>&1 & p=$!; PIDS+=($p)
    wait_port $HA 6380; bench native-kv $HA 6380 $p; stop $p
    ip netns exec $LAB-host-a redis-server --port 6381 --bind $HA --protected-mode no --save "" --appendonly no >/dev/null 2>&1 & p=$!; PIDS+=($p)
    wait_port $HA 6381; bench redis-server $HA 6381 $p; stop $p
    ft_pair ftvm-ft
    if [[ "$CAP_CPU" != 0 ]]; then
        run_vm run-cap cap
        ft_pair ft-cap cap
        run_vm run-1cpu pin
        ft_pair ft-1cpu pin
    fi
done

echo "redis-benchmark -t ping,set,get,incr -n $N -c $CONC ${PIPELINE:+-P $PIPELINE}, median over $ROUNDS interleaved rounds${HALT_POLL_NS:+, guest_halt_poll_ns=$HALT_POLL_NS} (requests/s, p50/p99 ms):"
python3 - "$TMP/results" <<'PY'
import sys, statistics, collections
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    name, rest = line.split(" ", 1)
    parts = rest.rsplit(" ", 3)
    test, rps, p50, p99 = parts[0], float(parts[1]), float(parts[2]), float(parts[3])
    rows[(name, test)].append((rps, p50, p99))
names = ["ftvm-run", "native-kv", "redis-server", "ftvm-ft", "run-cap", "ft-cap", "run-1cpu", "ft-1cpu"]
names = [n for n in names if any(k[0] == n for k in rows)]
tests = sorted({t for (_, t) in rows})
print(f"{'test':<14}" + "".join(f"{n:>26}" for n in names) + f"{'run/native':>12}{'ft/run':>9}{'capped ft/run':>15}{'one-CPU ft/run':>16}")
for t in tests:
    cells, med = "", {}
    for n in names:
        v = rows.get((n, t))
        if not v:
            cells += f"{'-':>26}"; continue
        rps = statistics.median(x[0] for x in v); p50 = statistics.median(x[1] for x in v); p99 = statistics.median(x[2] for x in v)
        med[n] = rps
        cells += f"{rps:>12.0f} {p50:>5.3f}/{p99:>6.3f}"
    r = lambda a, b: med.get(a, 0) / med[b] if med.get(b) else 0
    print(f"{t:<14}{cells}{r('ftvm-run', 'native-kv'):>12.3f}{r('ftvm-ft', 'ftvm-run'):>9.3f}{r('ft-cap', 'run-cap'):>15.3f}{r('ft-1cpu', 'run-1cpu'):>16.3f}")
PY
echo "CPU per request (us, median over rounds, all 4 tests): server or primary process / backup process"
python3 - "$TMP/cpu" <<'PY'
import sys, statistics, collections
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    name, s, b = line.split()
    rows[name].append((float(s), float(b)))
for name, v in rows.items():
    print(f"  {name:<14}{statistics.median(x[0] for x in v):>6.2f} / {statistics.median(x[1] for x in v):.2f}")
PY
for f in "$TMP"/rtt-*; do [[ -e "$f" ]] && echo "ack round trip under load (us, per round) ${f##*/rtt-}: $(tr '\n' ' ' <"$f")"; done
echo "FT log bandwidth under this load (Mbit/s, per round): $(tr '\n' ' ' <"$TMP/logbw")"

# Single-stream echo throughput.
cat >"$TMP/echo.py" <<'PY'
import socket, sys, threading, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2]))); total = int(sys.argv[3]); s.settimeout(30)
data = bytes(range(256)) * 256
threading.Thread(target=lambda: [s.sendall(data) for _ in range(total // len(data))], daemon=True).start()
got, t0 = 0, time.time()
while got < total:
    b = s.recv(1 << 18)
    if not b: break
    got += len(b)
print(f"{got / (time.time() - t0) / 1e6:.1f}")
PY
ip netns exec $LAB-host-a "$F" run --nic "tap=tap0,mac=02:f7:00:00:3c:50,ip=$VM/24" --listen 7000 "$G/echo.wasm" >/dev/null 2>&1 & p=$!; PIDS+=($p)
sleep 0.5; e1=$(inns client python3 "$TMP/echo.py" $VM 7000 67108864); stop $p
ip netns exec $LAB-host-a "$G/native/echo" 7001 >/dev/null 2>&1 & p=$!; PIDS+=($p)
sleep 0.3; e2=$(inns client python3 "$TMP/echo.py" $HA 7001 67108864); stop $p
echo "echo, one stream of 64 MiB each way: ftvm run $e1 MB/s, native $e2 MB/s"

# Failover stall: an INCR loop across a SIGKILL of the primary.
cat >"$TMP/incr.py" <<'PY'
import socket, sys, time
s = socket.create_connection((sys.argv[1], 6379)); s.settimeout(20)
n, worst, errors = int(sys.argv[2]), 0.0, 0
for i in range(n):
    t = time.time(); s.sendall(b"*2\r\n$4\r\nINCR\r\n$1\r\nc\r\n"); r = s.recv(64)
    if not r.startswith(b":"): errors += 1
    worst = max(worst, time.time() - t)
    if i == n // 3: open(sys.argv[3], "w").write("go")
print(f"{n} INCRs, {errors} errors, worst reply {worst*1000:.0f} ms, final {r.decode().strip()}")
PY
rm -rf "$TMP/tb" "$TMP/go"
ip netns exec $LAB-host-a "$F" ft --vm "$TMP/kv.toml" --as primary --log $HA:7400 --tiebreak "dir:$TMP/tb" --tap tap0 >/dev/null 2>&1 & pa=$!; PIDS+=($pa)
ip netns exec $LAB-host-b "$F" ft --vm "$TMP/kv.toml" --as backup --log $HA:7400 --tiebreak "dir:$TMP/tb" --tap tap0 >/dev/null 2>&1 & pb=$!; PIDS+=($pb)
wait_port $VM 6379
ip netns exec $LAB-client python3 "$TMP/incr.py" $VM 3000 "$TMP/go" & c=$!
for _ in $(seq 200); do [[ -e "$TMP/go" ]] && break; sleep 0.05; done
kill -9 $pa
wait $c
stop $pb
