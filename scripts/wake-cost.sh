#!/usr/bin/env bash
# What a wake-up costs on this machine, on one CPU and across two (see scripts/wake-cost.c), three
# times. Builds the program with the repo's zig (run scripts/setup.sh first).
# Usage: scripts/wake-cost.sh [ROUND_TRIPS]
#        HALT_POLL_NS=200000 scripts/wake-cost.sh   (idle vCPUs poll before they halt: root)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO/scripts/halt-poll.sh"
trap halt_poll_cleanup EXIT
halt_poll_setup
OUT="$REPO/target/wake-cost"
export ZIG_GLOBAL_CACHE_DIR="${ZIG_GLOBAL_CACHE_DIR:-$REPO/guests/build/.zig-cache}"
export ZIG_LOCAL_CACHE_DIR="$ZIG_GLOBAL_CACHE_DIR"
mkdir -p "$REPO/target"
if [[ ! -x "$OUT" || "$REPO/scripts/wake-cost.c" -nt "$OUT" ]]; then
    "$REPO/.venv/bin/python" -m ziglang cc -target x86_64-linux-musl -O2 -Wall -Wextra \
        "$REPO/scripts/wake-cost.c" -o "$OUT"
fi
for _ in 1 2 3; do "$OUT" "${1:-20000}"; done
