# Sourced by benchmark scripts: a "host" with a fixed CPU budget for one process, as a cgroup
# (v1 cpu controller) with a CFS quota. Short periods (10 ms), so throttling stalls last
# milliseconds, not the default 100 ms.
#   cpu_cap_setup NAME CPUS   create the cgroup and make it CPU_CAP_CG (CPUS=0: no cap; every call
#                             below is then a no-op); called again, another budget of its own
#   cpu_cap PID [CG]          move PID (with its threads) into CG (default: CPU_CAP_CG)
#   cpu_cap_cleanup           move everything back out and remove them (call from the EXIT trap)
# and a placement of the benchmark's processes on CPUs:
#   cpu_pin P:B:C             set PIN_A, PIN_B, PIN_C to the command prefixes that pin the server
#                             (or primary), the backup and the client to CPUs P, B and C; an empty
#                             argument leaves all three empty (no pinning)
CPU_CAP_CG=""
CPU_CAP_CGS=()
cpu_cap_setup() {
    [[ "$2" == 0 ]] && return 0
    [[ -d /sys/fs/cgroup/cpu ]] || { echo "no cgroup v1 cpu controller: run with CAP_CPU=0" >&2; exit 1; }
    CPU_CAP_CG=/sys/fs/cgroup/cpu/ftvm-$1
    CPU_CAP_CGS+=("$CPU_CAP_CG")
    mkdir -p "$CPU_CAP_CG"
    echo 10000 >"$CPU_CAP_CG/cpu.cfs_period_us"
    echo "$(python3 -c "print(int($2 * 10000))")" >"$CPU_CAP_CG/cpu.cfs_quota_us"
}
cpu_pin() {
    PIN_A=() PIN_B=() PIN_C=()
    [[ -n "$1" ]] || return 0
    local a b c
    IFS=: read -r a b c <<<"$1"
    [[ -n "$a" && -n "$b" && -n "$c" ]] || { echo "placement $1: expected P:B:C" >&2; exit 2; }
    PIN_A=(taskset -c "$a") PIN_B=(taskset -c "$b") PIN_C=(taskset -c "$c")
}
cpu_cap() { [[ -z "$CPU_CAP_CG" ]] || echo "$1" >"${2:-$CPU_CAP_CG}/cgroup.procs"; }
cpu_cap_cleanup() {
    local cg p
    for cg in "${CPU_CAP_CGS[@]}"; do
        [[ -d "$cg" ]] || continue
        for p in $(cat "$cg/cgroup.procs"); do echo "$p" >/sys/fs/cgroup/cpu/cgroup.procs 2>/dev/null || true; done
        rmdir "$cg" 2>/dev/null || true
    done
}
