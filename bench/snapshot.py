"""How fast ``ksmlab snapshot`` captures, and how big its files are (Linux, root for PFNs).

Starts ``--procs`` plain Python processes holding ``--gib`` GiB of private
anonymous memory between them (a share ``--dup`` of the pages copies of 16
templates, the rest random), captures them with the merge-any policy, and
prints:

* the resident bytes fingerprinted, the wall time and the CPU time of the
  capture (this process's user + system time: the kernel's work for the
  ``/proc`` reads is counted), and GiB/s per core = bytes / CPU seconds;
* the same for the fingerprint function alone (``ksmlab.mm.page.fingerprint``
  over 256 MiB of pages already in memory): the ceiling of a capture;
* the file's bytes per page, and the time ``read_snapshot`` takes.

::

    sudo python bench/snapshot.py                   # 1 GiB in 4 processes
    sudo python bench/snapshot.py --gib 4 --json r.json

Issue 10's targets: >= 1 GiB/s of resident memory per core, <= 24 bytes per page.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ksmlab.mm.page import fingerprint
from ksmlab.snapshot import Selection, capture_snapshot, read_snapshot

PAGE = 4096

CHILD = """
import mmap, sys
import numpy as np
n, seed, dup = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
m = mmap.mmap(-1, n * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
a = np.frombuffer(m, np.uint8).reshape(n, 4096)
rng = np.random.default_rng(seed)
templates = np.random.default_rng(0).integers(0, 256, (16, 4096), dtype=np.uint8)
for i in range(0, n, 4096):
    k = min(4096, n - i)
    block = rng.integers(0, 256, (k, 4096), dtype=np.uint8)
    same = rng.random(k) < dup
    block[same] = templates[rng.integers(0, 16, int(same.sum()))]
    a[i:i + k] = block
print("ready", flush=True)
sys.stdin.read()
"""


def fingerprint_ceiling(mib: int = 256) -> float:
    """GiB/s per core of the fingerprint function alone, over pages already in memory."""
    buf = memoryview(os.urandom(mib << 20))
    t = time.process_time()
    for o in range(0, len(buf), PAGE):
        fingerprint(buf[o:o + PAGE])  # type: ignore[arg-type]  # hashlib reads any buffer
    return len(buf) / (time.process_time() - t) / 2**30


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=1.0, help="memory of the workload (default 1)")
    ap.add_argument("--procs", type=int, default=4, help="processes (default 4)")
    ap.add_argument("--dup", type=float, default=0.5, help="share of duplicate pages (default 0.5)")
    ap.add_argument("--json", metavar="FILE", help="write the results as JSON")
    args = ap.parse_args()
    pages = int(args.gib * 2**30) // PAGE // args.procs
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(pages), str(i), str(args.dup)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for i in range(args.procs)]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline() == "ready\n"
        with tempfile.TemporaryDirectory() as d:
            out = Path(d) / "bench.parquet"
            wall, cpu = time.perf_counter(), time.process_time()
            s = capture_snapshot(str(out), Selection(pids=tuple(p.pid for p in procs)),
                                 policy="merge-any")
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            t = time.perf_counter()
            snap = read_snapshot(out)
            read_s = time.perf_counter() - t
            assert len(snap.pages) == s.pages
    finally:
        for p in procs:
            p.kill()
            p.wait()
    ceiling = fingerprint_ceiling()
    res = {
        "gib_resident_read": s.bytes_read / 2**30, "processes": args.procs, "pages": s.pages,
        "hashed": s.hashed, "raced": s.raced, "wall_s": wall, "cpu_s": cpu,
        "gib_per_s_per_core": s.bytes_read / cpu / 2**30, "gib_per_s_wall": s.bytes_read / wall / 2**30,
        "fingerprint_only_gib_per_s_per_core": ceiling,
        "file_bytes": s.file_bytes, "bytes_per_page": s.file_bytes / s.pages,
        "read_snapshot_s": read_s, "pfns": s.show_pfn, "kpageflags": s.kpageflags,
        "kernel": os.uname().release, "python": sys.version.split()[0],
    }
    print(f"captured {res['gib_resident_read']:.2f} GiB ({s.pages} pages, {args.procs} processes) "
          f"in {wall:.2f} s wall, {cpu:.2f} s CPU")
    print(f"  capture:          {res['gib_per_s_per_core']:.2f} GiB/s per core "
          f"({res['gib_per_s_wall']:.2f} GiB/s wall)")
    print(f"  fingerprint only: {ceiling:.2f} GiB/s per core (the ceiling)")
    print(f"  file: {s.file_bytes} bytes, {res['bytes_per_page']:.1f} bytes per page; "
          f"read_snapshot {read_s:.2f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
