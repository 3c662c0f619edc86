# Sourced by benchmark scripts that run the KV guest in a lab of their own, alone or as an FT
# pair (primary on host-a, backup on host-b), after they set F (the ftvm binary), G (the built
# guests), LAB, S (the lab's subnet), MAC, TMP and PIDS, and sourced scripts/cpu-cap.sh. It sources
# scripts/halt-poll.sh (halt_poll_setup applies HALT_POLL_NS, if set):
#   kv_lab_up NAME    the lab, a TAP on host-a and host-b, and $TMP/kv.toml (VM name NAME)
#   kv_lab_plain_tap  a second TAP on host-a (tap1), for a plain `ftvm run` server beside the pair
#   kv_lab_cleanup    kill PIDS and whatever else runs in the lab's namespaces, drop the CPU
#                     cap, restore halt polling, remove the lab and TMP
#                     (call from the EXIT trap)
#   wait_port [ADDR]  wait until the KV guest answers at ADDR:6379 (default $VM; fails after 10 s)
#   ticks PID         user+system clock ticks of PID so far (0 once it is gone); HZ: ticks a second
#   need_perf         install Debian's linux-perf unless perf is there
source "$(dirname "${BASH_SOURCE[0]}")/halt-poll.sh"
VM=198.18.$S.50
HA=198.18.$S.11
kv_lab_up() {
    "$F" lab up --name "$LAB" --subnet "$S" >/dev/null
    for h in host-a host-b; do
        ip -n "$LAB-$h" tuntap add dev tap0 mode tap
        ip -n "$LAB-$h" link set tap0 master br0 up
    done
    cat >"$TMP/kv.toml" <<TOML
name = "$1"
module = "$G/kv.wasm"
listen = [6379]
[nic]
mac = "$MAC"
ip = "$VM/24"
TOML
}
kv_lab_plain_tap() {
    ip -n "$LAB-host-a" tuntap add dev tap1 mode tap
    ip -n "$LAB-host-a" link set tap1 master br0 up
}
kv_lab_cleanup() {
    local ns
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    # Whatever still runs in the lab (a client cut short by a signal) goes with it.
    for ns in $(ip netns list | awk -v lab="$LAB-" 'index($1, lab) == 1 { print $1 }'); do
        ip netns pids "$ns" | xargs -r kill -9 2>/dev/null || true
    done
    cpu_cap_cleanup
    halt_poll_cleanup
    "$F" lab down --name "$LAB" >/dev/null 2>&1 || true
    rm -rf "$TMP"
}
wait_port() {
    local addr="${1:-$VM}"
    for _ in $(seq 100); do
        ip netns exec "$LAB-client" redis-cli -h "$addr" -p 6379 PING >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "no server at $addr:6379" >&2
    return 1
}
ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
HZ=$(getconf CLK_TCK)
need_perf() {
    command -v perf >/dev/null && return 0
    echo "[kv-lab] installing Debian's linux-perf" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends linux-perf >/dev/null
}
