# Sourced by benchmark scripts: HALT_POLL_NS=N sets the guest kernel's idle halt polling
# (/sys/module/haltpoll/parameters/guest_halt_poll_ns: an idle vCPU polls for up to N ns before
# it halts, so a wake-up sent to it needs no interrupt) for the run and restores it afterwards.
# This machine's default is 0: a wake-up across vCPUs then costs ~35 µs (scripts/wake-cost.sh).
#   halt_poll_setup      apply HALT_POLL_NS if set (no-op otherwise)
#   halt_poll_cleanup    restore the saved value (call from the EXIT trap)
HALT_POLL_FILE=/sys/module/haltpoll/parameters/guest_halt_poll_ns
HALT_POLL_SAVED=""
halt_poll_setup() {
    [[ -n "${HALT_POLL_NS:-}" ]] || return 0
    [[ -w "$HALT_POLL_FILE" ]] || { echo "no $HALT_POLL_FILE: HALT_POLL_NS needs the haltpoll cpuidle driver" >&2; exit 1; }
    HALT_POLL_SAVED="$(cat "$HALT_POLL_FILE")"
    echo "$HALT_POLL_NS" >"$HALT_POLL_FILE"
}
halt_poll_cleanup() {
    [[ -z "$HALT_POLL_SAVED" ]] || echo "$HALT_POLL_SAVED" >"$HALT_POLL_FILE"
}
