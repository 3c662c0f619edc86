#!/usr/bin/env bash
# The main job: install what is needed, build, and run the fault-tolerance demo.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
bash scripts/setup.sh
exec "$REPO/target/release/ftvm" demo "$@"
