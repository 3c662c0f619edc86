#!/usr/bin/env bash
# The full test suite: installs what it needs (scripts/setup.sh), then runs every test.
# Slow soak tests run when FTVM_SOAK=1 or CI=true.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
bash scripts/setup.sh
# Lab tests create network namespaces; run test binaries one test at a time per binary is not
# needed (each test uses its own lab name and subnet), but keep the build and tests in release.
cargo test --release --workspace 2>&1
