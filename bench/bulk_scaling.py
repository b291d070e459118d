"""How the bulk engine scales, from 1 GiB to 1 TiB of simulated memory (model only).

Each size is a host of 1 GiB guests (262144 pages each) with a mixed content
typical of virtual machines running the same OS (anchored on the production
figures reported for VMware ESX Server, Waldspurger, OSDI 2002: 7-33% reclaimed
for Linux and Windows guests, best cases around 60%):

* 10% zero pages;
* 20% pages of a common OS image (the same image page in every guest);
* 5% pages duplicated within the guest (pairs);
* 65% pages of the guest's own.

Positions are shuffled per guest.  The host is built, madvised
MADV_MERGEABLE, and ksmd (``pages_to_scan=100000``, ``sleep_millisecs=0``)
runs two full scans: the first records checksums, the second merges
everything that can merge.  The script checks the final counters against
arithmetic (see :func:`expected`) and reports the CPU time of the two scans
(the time to full merge), the peak RSS of the process, and both per
simulated page.  Every size runs in a fresh process so peak RSS is its own::

    python bench/bulk_scaling.py                        # 1, 2, 4, ... 1024 GiB
    python bench/bulk_scaling.py --gib 1 8 64           # chosen sizes
    python bench/bulk_scaling.py --json results.json --plot docs/bulk-scaling.png
    python bench/bulk_scaling.py --from-json results.json --plot scaling.png   # redraw

Timings are printed, never asserted; docs/performance.md records results.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time

import numpy as np

from ksmlab import MADV_MERGEABLE, PAGE_SIZE
from ksmlab.bulk import BulkKernel
from ksmlab.bulk.content import ZERO_CONTENT

GUEST_PAGES = 262144
ZERO, IMAGE, PAIRS = 0.10, 0.20, 0.05
MAX_PAGE_SHARING = 256


def layout(pages: int) -> tuple[int, int, int, int]:
    """(zero, image, paired, own) pages of one guest."""
    zero = int(pages * ZERO)
    image = int(pages * IMAGE)
    paired = 2 * int(pages * PAIRS / 2)
    return zero, image, paired, pages - zero - image - paired


def expect(n: int, m: int = MAX_PAGE_SHARING) -> tuple[int, int]:
    """(pages_shared, pages_sharing) for n identical pages, as ksm_tests.c computes it."""
    if n < 2:
        return 0, 0
    if n % m in (0, 1):
        return n // m, (n // m) * (m - 1)
    shared = n // m + 1
    return shared, n - shared


def expected(guests: int) -> tuple[int, int]:
    """Final (pages_shared, pages_sharing) of the whole host, by arithmetic.

    Zero pages are one content with guests*zero copies; each image page one
    content with `guests` copies; each pair one KSM page with one sharer;
    own pages never merge.
    """
    zero, image, paired, _own = layout(GUEST_PAGES)
    zs, zg = expect(guests * zero)
    is_, ig = expect(guests)
    pairs = guests * paired // 2
    return zs + image * is_ + pairs, zg + image * ig + pairs


def build(k: BulkKernel, guests: int) -> None:
    """Spawn the guests and fill their memory."""
    zero, image, paired, own = layout(GUEST_PAGES)
    k.reserve(pages=guests * GUEST_PAGES, frames=guests * GUEST_PAGES,
              contents=1 + image + guests * (paired // 2 + own))
    images = k.contents.fresh(image)
    rng = np.random.default_rng(1)
    for _ in range(guests):
        pairs = k.contents.fresh(paired // 2)
        ids = np.concatenate([np.full(zero, ZERO_CONTENT, np.int64), images,
                              np.repeat(pairs, 2), k.contents.fresh(own)])
        rng.shuffle(ids)
        p = k.spawn()
        a = p.mmap(GUEST_PAGES * PAGE_SIZE)
        p.write_contents(a, ids)
        p.madvise(a, GUEST_PAGES * PAGE_SIZE, MADV_MERGEABLE)


def one(gib: int) -> dict[str, object]:
    """Build and merge one host of *gib* guests; the measurements."""
    t0 = time.perf_counter()
    k = BulkKernel()
    k.sysfs["pages_to_scan"] = "100000"
    k.sysfs["sleep_millisecs"] = "0"
    build(k, gib)
    build_s = time.perf_counter() - t0
    cpu0 = time.process_time()
    k.sysfs["run"] = "1"
    for scan in (1, 2):
        k.wait_full_scans(1)
        print(f"  {gib} GiB: full scan {scan} done after {time.process_time() - cpu0:.1f} s CPU",
              file=sys.stderr, flush=True)
    merge_s = time.process_time() - cpu0
    shared, sharing = int(k.sysfs["pages_shared"]), int(k.sysfs["pages_sharing"])
    pages = gib * GUEST_PAGES
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"gib": gib, "pages": pages, "build_s": round(build_s, 2),
            "merge_cpu_s": round(merge_s, 3), "ns_per_page": round(merge_s / pages * 1e9, 1),
            "peak_rss_bytes": rss, "rss_bytes_per_page": round(rss / pages, 1),
            "engine_bytes_per_page": round(k.memory_bytes() / pages, 1),
            "pages_shared": shared, "pages_sharing": sharing,
            "saved_percent": round(100 * sharing / pages, 1),
            "as_expected": (shared, sharing) == expected(gib)}


def plot(rows: list[dict[str, object]], path: str) -> None:
    """Time to full merge and bytes per page against size, log-log."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    gib = [float(str(r["gib"])) for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))

    ax1.loglog(gib, [float(str(r["merge_cpu_s"])) for r in rows], "o-", base=2,
               label="bulk engine, 2 full scans")
    ax1.loglog(gib, [15 * 60 * g / 1024 for g in gib], ":", base=2, color="grey",
               label="linear, reaching 15 min at 1 TiB")
    ax1.set_xlabel("simulated memory (GiB)")
    ax1.set_ylabel("CPU seconds to full merge")
    ax1.legend()
    ax2.semilogx(gib, [float(str(r["rss_bytes_per_page"])) for r in rows], "o-", base=2,
                 label="peak RSS / simulated page")
    ax2.semilogx(gib, [float(str(r["engine_bytes_per_page"])) for r in rows], "s--", base=2,
                 label="engine arrays / simulated page")
    ax2.axhline(64, color="grey", linestyle=":", label="64 bytes (a kernel rmap_item)")
    ax2.set_xlabel("simulated memory (GiB)")
    ax2.set_ylabel("bytes per simulated page")
    ax2.set_ylim(bottom=0)
    ax2.legend()
    size = FuncFormatter(lambda v, _p: f"{v / 1024:g} TiB" if v >= 1024 else f"{v:g} GiB")
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(FixedLocator([g for g in gib if math.log2(g) % 2 == 0]))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(size)
    ax1.yaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:g}"))
    fig.suptitle("ksmlab bulk engine: 1 GiB guests, 10% zero, 20% common image, 5% pairs")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gib", type=int, nargs="+", default=[2**i for i in range(11)],
                    help="host sizes in GiB (one 1 GiB guest per GiB)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--plot", help="write a PNG of the scaling curves here")
    ap.add_argument("--from-json", metavar="FILE",
                    help="do not run: draw --plot from the results a previous --json wrote")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child process mode
    args = ap.parse_args(argv)
    if args.from_json:
        if not args.plot:
            ap.error("--from-json needs --plot")
        with open(args.from_json) as f:
            plot(json.load(f), args.plot)
        return 0
    if args.one:
        print(json.dumps(one(args.one)), flush=True)
        return 0
    print(f"{'size':>9} {'pages':>11} {'build s':>8} {'merge s':>8} {'ns/page':>8} "
          f"{'RSS B/pg':>9} {'saved':>6}  counters", flush=True)
    rows = []
    for gib in args.gib:
        out = subprocess.run([sys.executable, __file__, "--one", str(gib)], check=True,
                             stdout=subprocess.PIPE, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        rows.append(r)
        print(f"{gib:5d} GiB {r['pages']:11d} {r['build_s']:8.1f} {r['merge_cpu_s']:8.2f} "
              f"{r['ns_per_page']:8.1f} {r['rss_bytes_per_page']:9.1f} "
              f"{r['saved_percent']:5.1f}%  "
              f"{'as expected' if r['as_expected'] else 'WRONG'}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
