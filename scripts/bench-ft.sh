#!/usr/bin/env bash
# Fault tolerance overhead on loopback (issue 4, the paper's Table 1 in miniature):
#  - compute guest: `ftvm run` vs an `ftvm ft` primary with a live backup, interleaved rounds:
#    wall time of the process (start-up, compile and pairing included) and the guest's own
#    compute time (its `elapsed_ms`, read through the gate around its loop: steady state);
#  - log bandwidth of an idle guest (heartbeats and acks only) and of a clock-heavy guest.
# Usage: scripts/bench-ft.sh [ROUNDS] [ITERATIONS]
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FTVM="$REPO/target/release/ftvm"
G="$REPO/guests/build"
ROUNDS="${1:-5}"
ITER="${2:-1300}"
TMP="$(mktemp -d)"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done; rm -rf "$TMP"; }
trap cleanup EXIT
now_ns() { date +%s%N; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
port=$((20000 + RANDOM % 20000))

pair() { # pair NAME TOML -> runs a primary and backup to completion, prints primary wall ms
    local name="$1" toml="$2" t0 t1
    port=$((port + 1))
    t0=$(now_ns)
    "$FTVM" ft --vm "$toml" --as primary --log "127.0.0.1:$port" --tiebreak "dir:$TMP/tb-$name" \
        --status-file "$TMP/$name.pstatus" >"$TMP/$name.pout" 2>"$TMP/$name.perr" &
    local pa=$!; PIDS+=("$pa")
    "$FTVM" ft --vm "$toml" --as backup --log "127.0.0.1:$port" --tiebreak "dir:$TMP/tb-$name" \
        >/dev/null 2>"$TMP/$name.berr" &
    local pb=$!; PIDS+=("$pb")
    wait "$pa"; t1=$(now_ns); wait "$pb"
    echo $(( (t1 - t0) / 1000000 ))
}

cat >"$TMP/compute.toml" <<TOML
name = "compute"
module = "$G/compute.wasm"
args = ["$ITER"]
TOML
for ((r = 0; r < ROUNDS; r++)); do
    t0=$(now_ns); "$FTVM" run "$G/compute.wasm" "$ITER" >"$TMP/run$r.out"; t1=$(now_ns)
    echo $(( (t1 - t0) / 1000000 )) >>"$TMP/plain"
    pair "c$r" "$TMP/compute.toml" >>"$TMP/ft"
    elapsed() { sed -n 's/^compute: elapsed_ms=//p' "$1"; }
    elapsed "$TMP/run$r.out" >>"$TMP/plain-guest"
    elapsed "$TMP/c$r.pout" >>"$TMP/ft-guest"
done
p=$(median <"$TMP/plain"); f=$(median <"$TMP/ft")
pg=$(median <"$TMP/plain-guest"); fg=$(median <"$TMP/ft-guest")
echo "compute guest ($ITER iterations), median of $ROUNDS interleaved rounds:"
echo "  wall time of the process (start-up, compile, pairing):"
echo "    ftvm run                 $p ms"
echo "    ftvm ft primary+backup   $f ms"
awk -v p="$p" -v f="$f" 'BEGIN { printf "    FT / non-FT throughput = %.3f\n", p/f }'
echo "  the guest's own compute time (steady state):"
echo "    ftvm run                 $pg ms   (all rounds: $(tr '\n' ' ' <"$TMP/plain-guest"))"
echo "    ftvm ft primary          $fg ms   (all rounds: $(tr '\n' ' ' <"$TMP/ft-guest"))"
awk -v p="$pg" -v f="$fg" 'BEGIN { printf "    FT / non-FT throughput = %.3f\n", p/f }'

# Idle guest: one long sleep; sample the primary's status after it settles.
cat >"$TMP/idle.toml" <<TOML
name = "idle"
module = "$G/sleeper.wasm"
args = ["1", "4000"]
TOML
port=$((port + 1))
"$FTVM" ft --vm "$TMP/idle.toml" --as primary --log "127.0.0.1:$port" --tiebreak "dir:$TMP/tb-idle" \
    --status-file "$TMP/idle.status" >/dev/null 2>&1 &
PIDS+=($!); pa=$!
"$FTVM" ft --vm "$TMP/idle.toml" --as backup --log "127.0.0.1:$port" --tiebreak "dir:$TMP/tb-idle" \
    --status-file "$TMP/idle.bstatus" >/dev/null 2>&1 &
PIDS+=($!); pb=$!
sleep 1.5; b0=$(python3 -c "import json;print(json.load(open('$TMP/idle.status'))['log_bytes_sent'])")
r0=$(python3 -c "import json;print(json.load(open('$TMP/idle.bstatus'))['log_bytes_sent'])")
sleep 2; b1=$(python3 -c "import json;print(json.load(open('$TMP/idle.status'))['log_bytes_sent'])")
r1=$(python3 -c "import json;print(json.load(open('$TMP/idle.bstatus'))['log_bytes_sent'])")
wait "$pa" "$pb"
awk -v a="$b0" -v b="$b1" 'BEGIN { printf "idle guest: primary -> backup %.4f Mbit/s over 2 s\n", (b-a)*8/2/1e6 }'
echo "  (backup's received counter advanced $((r1 - r0)) bytes in the same 2 s)"
