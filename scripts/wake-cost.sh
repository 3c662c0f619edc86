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
source "$REPO/scripts/native-cc.sh"
native_cc "$REPO/scripts/wake-cost.c" "$OUT"
for _ in 1 2 3; do "$OUT" "${1:-20000}"; done
