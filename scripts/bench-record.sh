#!/usr/bin/env bash
# Record overhead (issue 2): the compute guest under `ftvm run`, `ftvm run --record`, and the same C
# program built natively, interleaved round by round so machine noise hits all three alike.
# Prints medians and ratios; also the log size per second of a clock-heavy guest.
# Usage: scripts/bench-record.sh [ROUNDS] [ITERATIONS]
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FTVM="$REPO/target/release/ftvm"
G="$REPO/guests/build"
ROUNDS="${1:-7}"
ITER="${2:-1300}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

now_ns() { date +%s%N; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

for ((r = 0; r < ROUNDS; r++)); do
    t0=$(now_ns); "$G/native/compute" "$ITER" >/dev/null; t1=$(now_ns)
    "$FTVM" run "$G/compute.wasm" "$ITER" >/dev/null; t2=$(now_ns)
    "$FTVM" run --record "$TMP/c.log" "$G/compute.wasm" "$ITER" >/dev/null; t3=$(now_ns)
    echo $(( (t1 - t0) / 1000000 )) >>"$TMP/native"
    echo $(( (t2 - t1) / 1000000 )) >>"$TMP/run"
    echo $(( (t3 - t2) / 1000000 )) >>"$TMP/record"
done
n=$(median <"$TMP/native"); p=$(median <"$TMP/run"); rec=$(median <"$TMP/record")
echo "compute guest, $ITER iterations, median of $ROUNDS interleaved rounds (wall ms, includes compile):"
echo "  native (zig cc x86_64)  $n ms"
echo "  ftvm run                $p ms"
echo "  ftvm run --record       $rec ms"
awk -v n="$n" -v p="$p" -v r="$rec" 'BEGIN {
  printf "  ratios: record/run throughput = %.3f   run/native throughput = %.3f   record/native = %.3f\n", p/r, n/p, n/r }'

# Clock-heavy guest: log bytes per second of guest run time.
t0=$(now_ns)
"$FTVM" run --record "$TMP/clock.log" "$G/clockrand.wasm" 200 >/dev/null
t1=$(now_ns)
bytes=$(stat -c %s "$TMP/clock.log")
awk -v b="$bytes" -v ms=$(( (t1 - t0) / 1000000 )) 'BEGIN {
  printf "clockrand 200 rounds: log %d bytes in %d ms = %.1f KiB/s (%.3f Mbit/s)\n", b, ms, b/1024/(ms/1000), b*8/1e6/(ms/1000) }'
"$FTVM" inspect "$TMP/clock.log" | sed -n '/^summary/,$p'
