#!/usr/bin/env python3
"""Measure the per-page costs the pre-flight estimate uses (docs/performance.md, "Pre-flight").

Every measurement runs one scenario through the same path as ``ksmlab run``
(load, open the backend, run) in a fresh child process, and reads that
child's peak RSS (``ru_maxrss``) and the wall time of its set-up and of its
run.  Each cost is the difference between two runs that differ in one thing
only, divided by how much that thing differs, so the interpreter's baseline
cancels out:

* **page**: every page of its own content (``kind = "random"``: nothing
  merges, so nothing is freed), in mappings of 1024 pages, two full scans
  (every page has its rmap_item): 64 Ki pages against 256 Ki pages;
* **fill**: the same 256 Ki pages as one mapping against 256 mappings of
  1024 pages (what a mapping's contents cost while they are built);
* **image page**: a mapping of an image of 64 Ki distinct pages against the
  same mapping of random pages, each followed by a mapping of 64 Ki random
  pages (what the content source keeps per image page while it fills others);
* **forked page**: 64 processes of 1024 pages forking 4 children each, against
  no fork;
* **write**: the same 64 processes, one of them writing 200,000 times, against
  no write (what a rewritten page leaves behind);
* **baseline**: a one-page scenario.

The sizes are for SimKernel; the bulk engine's are 8 times larger (its writes 2 times),
as its costs are too small to see at 256 Ki pages.

Times, in CPU seconds (the machine is shared): set-up seconds per page (the
fill), ksmd's page visits (seconds of the run per page visited) in the first
two full scans of unique pages (checksums, trees), the visits of the next
eight full scans of 64 processes mapping the same 1024 image pages
(**rescan**: merged pages, checked or skipped by smart scan), and seconds per
write.

    python bench/preflight_costs.py            # every engine, about 2 minutes
    python bench/preflight_costs.py --json costs.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from dataclasses import dataclass

ENGINES = {"sim": ("sim", "bytes"), "fingerprint": ("sim", "fingerprint"), "bulk": ("bulk", "bytes")}
SCALE = {"sim": 1, "fingerprint": 1, "bulk": 8}
"""Sizes are multiplied by this: the bulk engine's costs are too small to see at 256 Ki pages."""

KSM = """
[scenario]
name = "cost"
seed = 1

[ksm]
pages_to_scan = 100000
sleep_millisecs = 0
"""


def scenario(*, count: int, pages: int, before: str = "", forks: int = 0, writes: int = 0,
             scans: int = 2, image: bool = False) -> str:
    """A scenario of *count* processes with one mapping of *pages* random pages (*image*:
    the same image pages in every process), run to *scans* full scans; *before* (``image``
    or ``random``): a first mapping of as many pages."""
    text = KSM + '\n[content.c]\nkind = "random"\n'
    text += f'\n[content.image]\nkind = "image"\npages = {pages}\n'
    text += f'\n[[process]]\nname = "p"\ncount = {count}\n'
    if before:
        text += (f'\n[[process.mapping]]\nname = "first"\npages = {pages}\n'
                 f'content = "{"image" if before == "image" else "c"}"\n')
    text += (f'\n[[process.mapping]]\nname = "m"\npages = {pages}\n'
             f'content = "{"image" if image else "c"}"\n')
    if forks:
        text += f'\n[[event]]\nat = "1ms"\naction = "fork"\nprocess = "p"\nchild = "kid"\ncount = {forks}\n'
    if writes:
        # One writer, 1 ms of virtual time per 1000 writes: the scan stays small beside them.
        text += (f'\n[[activity]]\nprocess = "p[0:1]"\nmapping = "m"\nrate = 1000000\n'
                 f'stop = "{writes // 1000}ms"\n')
        text += f'\n[[checkpoint]]\nat = "{writes // 1000}ms"\n'
    text += f"\n[[checkpoint]]\nfull_scans = {scans}\n"
    return text


def child(spec: dict[str, object]) -> None:
    """Run one scenario in this process and print its figures as JSON."""
    from pathlib import Path

    import ksmlab.cli  # noqa: F401  (the baseline is that of `ksmlab run`: rich, numpy, ...)
    from ksmlab.scenario.backends import open_backend
    from ksmlab.scenario.loader import parse_scenario
    from ksmlab.scenario.preflight import plan
    from ksmlab.scenario.runner import Runner

    sc = parse_scenario(str(spec["text"]), source="<bench>", base_dir=Path.cwd())
    backend, content = ENGINES[str(spec["engine"])]
    plan(sc, backend, content)  # type: ignore[arg-type]  (as run does: it imports the engines)
    b = open_backend(backend, content)  # type: ignore[arg-type]
    r = Runner(sc, b)
    # CPU time: the machine is shared, and the wall clock measures the neighbours too.
    t0 = time.process_time()
    r._setup()
    t1 = time.process_time()
    r._loop()
    t2 = time.process_time()
    visits = r._counter("pages_scanned")
    b.close()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"rss": rss, "setup_s": t1 - t0, "run_s": t2 - t1, "visits": visits}))


def measure(engine: str, text: str) -> dict[str, float]:
    """Run *text* on *engine* in a fresh interpreter."""
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps({"engine": engine,
                                                                          "text": text})],
                         check=True, capture_output=True, text=True)
    return dict(json.loads(out.stdout))


@dataclass
class Costs:
    """The figures of one engine."""

    baseline: float
    page: float
    fill: float
    image_page: float
    forked_page: float
    write: float
    fill_s: float
    visit_s: float
    rescan_s: float
    write_s: float


def costs(engine: str) -> Costs:
    """Every figure of *engine* (see the module doc)."""
    scale = SCALE[engine]
    small, big = 64 * 1024 * scale, 256 * 1024 * scale
    base = measure(engine, scenario(count=1, pages=1))
    a = measure(engine, scenario(count=small // 1024, pages=1024))
    # Later scans of pages that merged: mostly stable pages, checked or skipped.
    img2 = measure(engine, scenario(count=small // 1024, pages=1024, image=True))
    img10 = measure(engine, scenario(count=small // 1024, pages=1024, image=True, scans=10))
    b = measure(engine, scenario(count=big // 1024, pages=1024))
    one = measure(engine, scenario(count=1, pages=big))
    # The image's pages are kept while the next mapping is filled: its fill is the peak.
    img = measure(engine, scenario(count=1, pages=small, before="image"))
    rnd = measure(engine, scenario(count=1, pages=small, before="random"))
    # Forks and writes are compared with run a, whose mappings are small: a big
    # mapping's fill would be the peak, and hide what comes after it.
    fork = measure(engine, scenario(count=small // 1024, pages=1024, forks=4))
    writes = 200_000 * min(scale, 2)
    wr = measure(engine, scenario(count=small // 1024, pages=1024, writes=writes))
    page = (b["rss"] - a["rss"]) / (big - small)
    return Costs(
        baseline=base["rss"],
        page=page,
        fill=(one["rss"] - b["rss"]) / big,
        image_page=(img["rss"] - rnd["rss"]) / small,
        forked_page=(fork["rss"] - a["rss"]) / (4 * small),
        write=(wr["rss"] - a["rss"]) / writes,
        fill_s=(b["setup_s"] - a["setup_s"]) / (big - small),
        visit_s=(b["run_s"] - a["run_s"]) / (b["visits"] - a["visits"]),
        rescan_s=(img10["run_s"] - img2["run_s"]) / (img10["visits"] - img2["visits"]),
        write_s=max(0.0, (wr["run_s"] - a["run_s"])) / writes,
    )


def main() -> None:
    """Measure every engine (or run one child)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--engine", choices=ENGINES, action="append",
                    help="measure only this engine (repeatable)")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = ap.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    results = {}
    print(f"{'engine':12} {'baseline':>10} {'page B':>8} {'fill B':>8} {'image B':>8} "
          f"{'fork B':>8} {'write B':>8} {'fill us':>8} {'visit us':>8} {'rescan us':>9} "
          f"{'write us':>8}")
    for engine in args.engine or ENGINES:
        c = costs(engine)
        results[engine] = vars(c)
        print(f"{engine:12} {c.baseline / 2**20:8.1f}Mi {c.page:8.0f} {c.fill:8.0f} "
              f"{c.image_page:8.0f} {c.forked_page:8.0f} {c.write:8.0f} {c.fill_s * 1e6:8.2f} "
              f"{c.visit_s * 1e6:8.2f} {c.rescan_s * 1e6:9.2f} {c.write_s * 1e6:8.2f}", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
