#!/usr/bin/env python3
"""List the imports of wasm modules, and check that they come only from wasi_snapshot_preview1.

usage: wasm-imports.py [--check] FILE.wasm...
Prints "FILE: module.name module.name ..." per file. With --check, exits 1 if any import is
not a function from wasi_snapshot_preview1.
"""
import sys

ALLOWED_MODULE = "wasi_snapshot_preview1"


class Reader:
    def __init__(self, data, pos=0, end=None):
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def byte(self):
        if self.pos >= self.end:
            raise ValueError("unexpected end of section")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def uleb(self):
        result = shift = 0
        while True:
            b = self.byte()
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7
            if shift > 63:
                raise ValueError("LEB128 too long")

    def name(self):
        n = self.uleb()
        if self.pos + n > self.end:
            raise ValueError("name runs past section")
        s = self.data[self.pos:self.pos + n].decode("utf-8")
        self.pos += n
        return s

    def limits(self):
        flags = self.byte()
        self.uleb()
        if flags & 1:
            self.uleb()


KINDS = {0: "func", 1: "table", 2: "memory", 3: "global", 4: "tag"}


def imports(path):
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\0asm":
        raise ValueError("not a wasm module")
    r = Reader(data, 8)
    out = []
    while r.pos < len(data):
        sid = r.byte()
        size = r.uleb()
        start = r.pos
        if sid == 2:
            s = Reader(data, start, start + size)
            for _ in range(s.uleb()):
                module = s.name()
                field = s.name()
                kind = s.byte()
                if kind == 0:
                    s.uleb()  # type index
                elif kind == 1:
                    s.byte()  # reference type
                    s.limits()
                elif kind == 2:
                    s.limits()
                elif kind == 3:
                    s.byte()  # value type
                    s.byte()  # mutability
                elif kind == 4:
                    s.byte()  # attribute
                    s.uleb()  # type index
                else:
                    raise ValueError("unknown import kind %d" % kind)
                out.append((module, field, KINDS[kind]))
        r.pos = start + size
    return out


def main(argv):
    check = "--check" in argv
    files = [a for a in argv if a != "--check"]
    bad = False
    for path in files:
        try:
            imps = imports(path)
        except (OSError, ValueError) as e:
            print("%s: error: %s" % (path, e), file=sys.stderr)
            bad = True
            continue
        print("%s: %s" % (path, " ".join(sorted(f for _, f, _ in imps))))
        for module, field, kind in imps:
            if module != ALLOWED_MODULE or kind != "func":
                print("%s: forbidden import %s.%s (%s)" % (path, module, field, kind),
                      file=sys.stderr)
                bad = True
    return 1 if check and bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
