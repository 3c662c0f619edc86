#!/usr/bin/env bash
# Project setup for a fresh Debian machine (runs as root). Idempotent: a second run is fast.
#   - Python venv at .venv with pinned ziglang (the C -> wasm32-wasi compiler for guests)
#   - Debian packages: redis-tools, redis-server, etcd-server, iproute2, binaryen
#   - guest builds (guests/build.sh)
#   - cargo release build of the workspace
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

ZIG_VERSION="0.17.1"
APT_PACKAGES=(redis-tools redis-server etcd-server iproute2 binaryen iputils-ping)

log() { printf '[setup] %s\n' "$*"; }

# ---------------------------------------------------------------- Debian packages
missing=()
for p in "${APT_PACKAGES[@]}"; do
    if ! dpkg -s "$p" 2>/dev/null | grep -q '^Status: install ok installed'; then
        missing+=("$p")
    fi
done
# The venv needs python3 with venv/ensurepip (python3-venv on a stock Debian).
if ! command -v python3 >/dev/null 2>&1; then
    missing+=(python3 python3-venv)
elif ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    missing+=(python3-venv)
fi

if ((${#missing[@]})); then
    log "installing Debian packages: ${missing[*]}"
    # Keep the package scripts from starting redis-server / etcd as services.
    policy=/usr/sbin/policy-rc.d
    policy_backup=""
    if [[ -e "$policy" ]]; then
        policy_backup="$(mktemp)"
        cp -p "$policy" "$policy_backup"
    fi
    restore_policy() {
        if [[ -n "$policy_backup" ]]; then
            mv -f "$policy_backup" "$policy"
        else
            rm -f "$policy"
        fi
    }
    trap restore_policy EXIT
    printf '#!/bin/sh\n# temporary: ftvm setup.sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
    restore_policy
    trap - EXIT
    # The lab starts its own redis/etcd instances on its own ports: no services at boot either.
    for svc in redis-server etcd; do
        systemctl disable "$svc" >/dev/null 2>&1 || true
        update-rc.d "$svc" disable >/dev/null 2>&1 || true
    done
else
    log "Debian packages present"
fi

# Make sure no packaged redis/etcd service is left running (started by an install or a package
# script). Only the service users' daemons are touched: lab instances run as root and stay.
# stop_service PROCESS_NAME SERVICE_USER SERVICE_NAME
stop_service() {
    local name="$1" user="$2" svc="$3" pids
    pids="$(pgrep -x -u "$user" "$name" 2>/dev/null || true)"
    [[ -z "$pids" ]] && return 0
    log "stopping the $svc service ($pids)"
    if [[ -d /run/systemd/system ]]; then
        systemctl stop "$svc" >/dev/null 2>&1 || true
    elif [[ -x "/etc/init.d/$svc" ]]; then
        "/etc/init.d/$svc" stop >/dev/null 2>&1 || true
    fi
    for _ in $(seq 1 25); do
        pgrep -x -u "$user" "$name" >/dev/null 2>&1 || return 0
        pkill -x -u "$user" "$name" 2>/dev/null || true
        sleep 0.2
    done
    pkill -9 -x -u "$user" "$name" 2>/dev/null || true
}
stop_service redis-server redis redis-server
stop_service etcd etcd etcd

# ---------------------------------------------------------------- Python venv + zig
VENV="$REPO/.venv"
if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating venv at $VENV"
    python3 -m venv "$VENV"
fi
have_zig="$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("ziglang"))' 2>/dev/null || true)"
if [[ "$have_zig" != "$ZIG_VERSION" ]]; then
    log "installing ziglang==$ZIG_VERSION into venv"
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q "ziglang==$ZIG_VERSION"
else
    log "ziglang $ZIG_VERSION present"
fi

# ---------------------------------------------------------------- guests
log "building guests"
bash "$REPO/guests/build.sh"

# ---------------------------------------------------------------- Rust workspace
# >>> cargo build step (owned by the lead) >>>
log "cargo build --release --workspace"
cargo build --release --workspace
# <<< cargo build step <<<

log "done"
