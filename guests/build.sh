#!/usr/bin/env bash
# Build every guests/*.c to guests/build/NAME.wasm (wasm32-wasi, zig cc from the repo venv),
# plus native x86_64-linux-musl builds of the benchmark/server guests into guests/build/native/.
# Rebuilds a target only when its source (or this script) is newer than the output.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GUESTS="$REPO/guests"
OUT="$GUESTS/build"
NATIVE_OUT="$OUT/native"
PY="$REPO/.venv/bin/python"
NATIVE=(compute kv echo)
SELF="${BASH_SOURCE[0]}"

if [[ ! -x "$PY" ]] || ! "$PY" -c 'import ziglang' >/dev/null 2>&1; then
    echo "guests/build.sh: $PY with ziglang not found; run scripts/setup.sh first" >&2
    exit 1
fi

# zig keeps a cache; put it inside the build directory unless the caller chose one.
export ZIG_GLOBAL_CACHE_DIR="${ZIG_GLOBAL_CACHE_DIR:-$OUT/.zig-cache}"
export ZIG_LOCAL_CACHE_DIR="${ZIG_LOCAL_CACHE_DIR:-$OUT/.zig-cache}"
mkdir -p "$OUT" "$NATIVE_OUT"

CFLAGS=(-std=c11 -O2 -Wall -Wextra -Werror=implicit-function-declaration)

# needs_build OUT SRC: true when OUT is missing or older than SRC or this script.
needs_build() {
    [[ ! -e "$1" || "$2" -nt "$1" || "$SELF" -nt "$1" ]]
}

built=0

# compile TARGET SRC OUT [extra flags...]
compile() {
    local target="$1" src="$2" out="$3"
    shift 3
    if needs_build "$out" "$src"; then
        echo "  CC [$target] $(basename "$src") -> ${out#"$REPO"/}"
        # Build to a temp name so a failed compile never leaves a stale-but-newer output.
        if ! "$PY" -m ziglang cc -target "$target" "${CFLAGS[@]}" "$@" "$src" -o "$out.tmp"; then
            rm -f "$out.tmp"
            echo "guests/build.sh: FAILED to compile $src for $target" >&2
            exit 1
        fi
        mv -f "$out.tmp" "$out"
        built=1
    fi
}

shopt -s nullglob
srcs=("$GUESTS"/*.c)
if ((${#srcs[@]} == 0)); then
    echo "guests/build.sh: no guests/*.c found" >&2
    exit 1
fi

for src in "${srcs[@]}"; do
    name="$(basename "$src" .c)"
    compile wasm32-wasi "$src" "$OUT/$name.wasm" -s
done

for name in "${NATIVE[@]}"; do
    compile x86_64-linux-musl "$GUESTS/$name.c" "$NATIVE_OUT/$name" -s
done

# Every wasm guest may import only wasi_snapshot_preview1 functions (the hypervisor's gate).
if ((built)); then
    if ! "$PY" "$GUESTS/wasm-imports.py" --check "$OUT"/*.wasm >/dev/null; then
        echo "guests/build.sh: a guest imports something other than wasi_snapshot_preview1" >&2
        exit 1
    fi
fi

echo "guests: built in ${OUT#"$REPO"/}"
