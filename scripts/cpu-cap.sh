# Sourced by benchmark scripts: a "host" with a fixed CPU budget for one process, as a cgroup
# (v1 cpu controller) with a CFS quota. Short periods (10 ms), so throttling stalls last
# milliseconds, not the default 100 ms.
#   cpu_cap_setup NAME CPUS   create the cgroup (CPUS=0: no cap; every call below is then a no-op)
#   cpu_cap PID               move PID (with its threads) into it
#   cpu_cap_cleanup           move everything back out and remove it (call from the EXIT trap)
CPU_CAP_CG=""
cpu_cap_setup() {
    [[ "$2" == 0 ]] && return 0
    [[ -d /sys/fs/cgroup/cpu ]] || { echo "no cgroup v1 cpu controller: run with CAP_CPU=0" >&2; exit 1; }
    CPU_CAP_CG=/sys/fs/cgroup/cpu/ftvm-$1
    mkdir -p "$CPU_CAP_CG"
    echo 10000 >"$CPU_CAP_CG/cpu.cfs_period_us"
    echo "$(python3 -c "print(int($2 * 10000))")" >"$CPU_CAP_CG/cpu.cfs_quota_us"
}
cpu_cap() { [[ -z "$CPU_CAP_CG" ]] || echo "$1" >"$CPU_CAP_CG/cgroup.procs"; }
cpu_cap_cleanup() {
    [[ -n "$CPU_CAP_CG" && -d "$CPU_CAP_CG" ]] || return 0
    for p in $(cat "$CPU_CAP_CG/cgroup.procs"); do echo "$p" >/sys/fs/cgroup/cpu/cgroup.procs 2>/dev/null || true; done
    rmdir "$CPU_CAP_CG" 2>/dev/null || true
}
