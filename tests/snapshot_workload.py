# SPDX-License-Identifier: GPL-2.0-only
"""A process with known memory, for the snapshot tests (run as a script; no ksmlab import).

It maps one private anonymous region of ``REGION_PAGES`` pages and fills it:

* pages 0..29: ``pattern(i % 10)``, ten contents three times each;
* pages 30..33: written with zeros (private pages whose bytes are zero);
* pages 34..37: only read, so they map the shared zero page;
* pages 38..63: never touched (absent).

Then it forks.  The child touches nothing more, so it shares pages 5..33
with the parent (same PFNs); the parent rewrites pages 0..4 with
``parent_pattern(i)`` (copy-on-write: new PFNs).  With ``--thp`` it also maps a
2 MiB-aligned region of 512 pages with MADV_HUGEPAGE and fills it with
``pattern(100 + i % 4)``.

It prints one JSON line (its pid, the child's, the addresses) and both stay
until stdin closes.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import mmap
import os
import sys

PAGE = 4096
REGION_PAGES = 64
THP_PAGES = 512


def pattern(k: int) -> bytes:
    """A page of content class *k*."""
    return hashlib.sha256(f"class {k}".encode()).digest() * (PAGE // 32)


def parent_pattern(i: int) -> bytes:
    """What the parent writes to page *i* (0..4) after the fork."""
    return hashlib.sha256(f"parent {i}".encode()).digest() * (PAGE // 32)


def _addr(m: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(m))


def main() -> None:
    region = mmap.mmap(-1, REGION_PAGES * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for i in range(30):
        region[i * PAGE:(i + 1) * PAGE] = pattern(i % 10)
    for i in range(30, 34):
        region[i * PAGE:(i + 1) * PAGE] = bytes(PAGE)
    for i in range(34, 38):
        _ = region[i * PAGE]
    out = {"region": _addr(region)}
    thp = None
    if "--thp" in sys.argv:
        size = THP_PAGES * PAGE
        big = mmap.mmap(-1, 2 * size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        base = _addr(big)
        offset = (-base) % size
        big.madvise(mmap.MADV_HUGEPAGE, offset, size)
        for i in range(THP_PAGES):
            o = offset + i * PAGE
            big[o:o + PAGE] = pattern(100 + i % 4)
        thp = (big, base + offset)
        out["thp"] = base + offset
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(w)
        sys.stdin.close()
        os.read(r, 1)  # until the parent goes
        os._exit(0)
    os.close(r)
    for i in range(5):
        region[i * PAGE:(i + 1) * PAGE] = parent_pattern(i)
    out.update(pid=os.getpid(), child=child)
    print(json.dumps(out), flush=True)
    sys.stdin.read()
    os.close(w)
    os.waitpid(child, 0)
    del thp


if __name__ == "__main__":
    main()
