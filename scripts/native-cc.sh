# Sourced by scripts that build a small native helper from scripts/*.c with the repo's zig (run
# scripts/setup.sh first). Needs REPO.
#   native_cc SRC OUT   build SRC into OUT (x86_64 musl, -O2) unless OUT is newer than SRC
native_cc() {
    export ZIG_GLOBAL_CACHE_DIR="${ZIG_GLOBAL_CACHE_DIR:-$REPO/guests/build/.zig-cache}"
    export ZIG_LOCAL_CACHE_DIR="$ZIG_GLOBAL_CACHE_DIR"
    mkdir -p "$(dirname "$2")"
    if [[ ! -x "$2" || "$1" -nt "$2" ]]; then
        "$REPO/.venv/bin/python" -m ziglang cc -target x86_64-linux-musl -O2 -Wall -Wextra "$1" -o "$2"
    fi
}
