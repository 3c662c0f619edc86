#!/usr/bin/env bash
# What a neighbour's cache footprint costs the plain KV server on a CPU it shares (BENCHMARKS.md,
# the thirteenth session): the FT primary shares CPU 0 with its backup's replay in the one-CPU
# placement, which the paper's hosts did not. The plain server (`ftvm run`, a 0.5-CPU budget,
# pinned to CPU 0) serves redis-benchmark (SET, CONC clients, from the `client` namespace on CPU 1)
# in slices, round by round: alone, beside a neighbour on CPU 0 that only computes, and beside
# one that walks a buffer of MB megabytes (scripts/neighbour.c); each neighbour has a budget of
# NEIGHBOUR_CPU of its own and is stopped outside its slices. Prints each round's req/s and the
# ratios, and the median of mem ÷ alu: the cost of the footprint alone, the CPU share being
# equal.
# Usage: scripts/cache-neighbour.sh [ROUNDS]   (root; run scripts/setup.sh first; default 12)
#   MB=4 NEIGHBOUR_CPU=0.3 CONC=200 N=50000
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
F="$REPO/target/release/ftvm"
G="$REPO/guests/build"
ROUNDS="${1:-12}"
MB="${MB:-4}"
CONC="${CONC:-200}"
N="${N:-50000}"
LAB=cnb
S=66
MAC=02:f7:00:00:42:50
PLAIN_MAC=02:f7:00:00:42:51
[[ "$ROUNDS" =~ ^[0-9]+$ && "$ROUNDS" -ge 1 && "$ROUNDS" -le 200 ]] || { echo "ROUNDS: 1..200" >&2; exit 2; }
TMP="$(mktemp -d)"
PIDS=()
source "$REPO/scripts/cpu-cap.sh"
source "$REPO/scripts/kv-lab.sh"
PLAIN=198.18.$S.51
trap kv_lab_cleanup EXIT
OUT="$REPO/target/neighbour"
source "$REPO/scripts/native-cc.sh"
native_cc "$REPO/scripts/neighbour.c" "$OUT"
cpu_cap_setup "$LAB-server" 0.5
SERVER_CG="$CPU_CAP_CG"
cpu_cap_setup "$LAB-neighbour" "${NEIGHBOUR_CPU:-0.3}"
NEIGHBOUR_CG="$CPU_CAP_CG"
kv_lab_up cache-neighbour
kv_lab_plain_tap
ip netns exec "$LAB-host-a" taskset -c 0 "$F" run --nic "tap=tap1,mac=$PLAIN_MAC,ip=$PLAIN/24" \
    --listen 6379 "$G/kv.wasm" >/dev/null 2>"$TMP/plain.err" &
pp=$!; PIDS+=($pp)
cpu_cap $pp "$SERVER_CG"
declare -A NB
for kind in alu mem; do
    taskset -c 0 "$OUT" $kind "$MB" &
    NB[$kind]=$!; PIDS+=(${NB[$kind]})
    kill -STOP ${NB[$kind]}
    cpu_cap ${NB[$kind]} "$NEIGHBOUR_CG"
done
wait_port $PLAIN
slice() {
    local rps
    rps=$(ip netns exec "$LAB-client" taskset -c 1 timeout 120 redis-benchmark -h $PLAIN -p 6379 \
        -t set -n "$N" -c "$CONC" --csv 2>/dev/null | awk -F',' 'NR == 2 { gsub(/"/, "", $2); print $2 }')
    [[ -n "$rps" ]] || { echo "redis-benchmark gave no result" >&2; exit 1; }
    echo "$rps"
}
beside() { # beside KIND: one slice with that neighbour running
    kill -CONT ${NB[$1]}
    sleep 0.2
    slice
    kill -STOP ${NB[$1]}
}
echo "redis-benchmark -t set -n $N -c $CONC per slice; neighbours of $MB MB with ${NEIGHBOUR_CPU:-0.3} CPU"
for ((i = 0; i < ROUNDS; i++)); do
    alone=$(slice)
    # Alternate the neighbours' order, so a trend within a round favours neither.
    if ((i % 2 == 0)); then alu=$(beside alu); mem=$(beside mem); else mem=$(beside mem); alu=$(beside alu); fi
    echo "$alone $alu $mem" >>"$TMP/rounds"
    echo -n "." >&2
done
echo >&2
kill -0 $pp || { echo "the server died during the run" >&2; exit 1; }
python3 - "$TMP/rounds" <<'PY'
import statistics as st, sys
rows = [list(map(float, l.split())) for l in open(sys.argv[1])]
for alone, alu, mem in rows:
    print(f"alone {alone:8.0f}  alu {alu:8.0f}  mem {mem:8.0f}   alu/alone {alu/alone:.3f}  mem/alone {mem/alone:.3f}  mem/alu {mem/alu:.3f}")
ratios = sorted(mem / alu for _, alu, mem in rows)
print(f"mem ÷ alu: median {st.median(ratios):.3f}, range {ratios[0]:.3f}..{ratios[-1]:.3f} over {len(ratios)} rounds; "
      f"alu ÷ alone median {st.median(alu / alone for alone, alu, _ in rows):.3f}")
PY
