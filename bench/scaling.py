"""How SimKernel's cost grows with the simulated memory size (model only).

Runs the "64 distinct images" workload (two full scans to full merge) at
1, 2, 4 and 8 GiB by default and prints the model's CPU time, the CPU time
per simulated page, and the process's peak RSS::

    python bench/scaling.py                 # 1, 2, 4, 8 GiB
    python bench/scaling.py --gib 1 2       # chosen sizes

The expected final counters follow from arithmetic: each of the 64 images
has N/64 copies, split into KSM pages of at most max_page_sharing (256)
mappings, so pages_shared = 64 * ceil(N/64/256) and pages_sharing =
N - pages_shared; the script checks them.
"""

from __future__ import annotations

import argparse
import gc
import math
import resource
import sys
import time

from ksmlab import MADV_MERGEABLE, PAGE_SIZE, SimKernel


def image(tag: int) -> bytes:
    """Page content number *tag*."""
    return tag.to_bytes(8, "little") * (PAGE_SIZE // 8)


def run(pages: int) -> tuple[float, int, int]:
    """Build and merge; return (model CPU seconds of the two scans, shared, sharing)."""
    k = SimKernel(trace=False)
    k.sysfs["pages_to_scan"] = "100000"
    k.sysfs["sleep_millisecs"] = "0"
    p = k.spawn()
    a = p.mmap(pages * PAGE_SIZE)
    images = [image(i) for i in range(64)]
    chunk = 256
    for i in range(0, pages, chunk):
        p.write(a + i * PAGE_SIZE, b"".join(images[j % 64] for j in range(i, i + chunk)))
    p.madvise(a, pages * PAGE_SIZE, MADV_MERGEABLE)
    t = time.process_time()
    k.sysfs["run"] = "1"
    k.wait_full_scans(2)
    cpu = time.process_time() - t
    return cpu, int(k.sysfs["pages_shared"]), int(k.sysfs["pages_sharing"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gib", type=float, nargs="+", default=[1, 2, 4, 8])
    args = ap.parse_args(argv)
    print(f"{'size':>8} {'pages':>9} {'model s':>8} {'us/page':>8} {'peak RSS':>9}  counters")
    for gib in args.gib:
        pages = int(gib * 2**30) // PAGE_SIZE
        cpu, shared, sharing = run(pages)
        want_shared = 64 * math.ceil(pages / 64 / 256)
        ok = (shared, sharing) == (want_shared, pages - want_shared)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"{gib:6g} GiB {pages:9d} {cpu:8.2f} {cpu / pages * 1e6:8.2f} {rss:7.0f} MiB  "
              f"{'as expected' if ok else f'WRONG: {shared} {sharing}'}", flush=True)
        gc.collect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
