#!/usr/bin/env bash
# Where the CPU goes while redis-benchmark drives the KV guest (issue 3's profile of the gap to the
# native server): system-wide `perf record -e cpu-clock` in the lab for (a) `ftvm run` and (b) the
# same C server built natively, then the share of samples per thread and code object, and the
# kernel entry points of the server thread.
# Usage: scripts/profile-kv.sh [SECONDS]     (root; run scripts/setup.sh first; installs linux-perf)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
F="$REPO/target/release/ftvm"
G="$REPO/guests/build"
SECS="${1:-5}"
LAB=pkv
S=63
VM=198.18.$S.50
HA=198.18.$S.11
TMP="$(mktemp -d)"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    "$F" lab down --name $LAB >/dev/null 2>&1 || true
    rm -rf "$TMP"
}
trap cleanup EXIT
if ! command -v perf >/dev/null; then
    echo "[profile] installing Debian's linux-perf" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends linux-perf >/dev/null
fi
"$F" lab up --name $LAB --subnet $S >/dev/null
ip -n $LAB-host-a tuntap add dev tap0 mode tap
ip -n $LAB-host-a link set tap0 master br0 up
inns() { local h="$1"; shift; ip netns exec "$LAB-$h" "$@"; }
wait_port() { for _ in $(seq 100); do inns client redis-cli -h "$1" -p "$2" PING >/dev/null 2>&1 && return 0; sleep 0.1; done; return 1; }

profile() { # profile NAME ADDR PORT SERVER_COMM
    # `ip netns exec` directly (not the shell function), so $! is redis-benchmark itself and the
    # kill below (and cleanup's) ends it; bounded by -n and by `timeout` all the same.
    ip netns exec "$LAB-client" timeout $((SECS + 30)) redis-benchmark -h "$2" -p "$3" -t set -n 5000000 -c 50 -q >"$TMP/$1.bench" 2>&1 & local b=$!
    PIDS+=($b)
    sleep 1
    perf record -a -g -e cpu-clock -F 1999 -o "$TMP/$1.data" -- sleep "$SECS" >/dev/null 2>&1
    kill $b 2>/dev/null || true; wait $b 2>/dev/null || true
    local rps; rps=$(tr '\r' '\n' <"$TMP/$1.bench" | grep -o 'rps=[0-9.]*' | tail -1 | cut -d= -f2)
    echo "== $1: about $rps SET/s during the profile; samples per thread and code object (% of 2 CPUs):"
    perf report -i "$TMP/$1.data" --stdio --no-children -g none --sort comm,dso 2>/dev/null |
        grep -v '^#' | grep -v '^$' | head -12
    echo "   server thread ($4), inclusive share of its main kernel entry points and user code:"
    perf report -i "$TMP/$1.data" --stdio --children -g none --comm "$4" --sort sym 2>/dev/null |
        grep -E '\] (ksys_write|ksys_read|__x64_sys_(sendto|recvfrom|write|read|poll|ppoll|epoll_wait|futex)|tun_get_user|br_handle_frame|tcp_v4_rcv|tcp_sendmsg|wasmtime::runtime::vm::traphandlers::catch_traps|ftvm_net::stack::NetStack::receive_frame)$' |
        head -12
}

ip netns exec $LAB-host-a "$F" run --nic "tap=tap0,mac=02:f7:00:00:3f:50,ip=$VM/24" --listen 6379 "$G/kv.wasm" >/dev/null 2>&1 & p=$!; PIDS+=($p)
wait_port $VM 6379; profile ftvm-run $VM 6379 ftvm; kill $p; wait $p 2>/dev/null || true
ip netns exec $LAB-host-a "$G/native/kv" 6380 >/dev/null 2>&1 & p=$!; PIDS+=($p)
wait_port $HA 6380; profile native-kv $HA 6380 kv; kill $p; wait $p 2>/dev/null || true
