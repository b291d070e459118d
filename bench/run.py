"""Benchmarks: the model's engines against the real ksmd, on the same workloads, in the same run.

For each workload the real kernel (LinuxKernel) and each engine of the model
run the same program:

* ``model``: SimKernel, pages holding their bytes (the reference model);
* ``fingerprint``: SimKernel(content="fingerprint"), pages holding a 128-bit
  fingerprint;
* ``bulk``: BulkKernel, the columnar engine with its vectorised batch path.

The script checks that every engine's final counters equal the kernel's and
prints ksmd's CPU time (from /proc/<ksmd>/schedstat), each engine's CPU time
for the same phase (time.process_time, building the workload excluded), the
ratio engine/ksmd, and each engine's memory: the growth of its process's peak
RSS while it ran, per simulated page (every engine runs in a child process of
its own, so the figures do not mix).

Usage (root, KSM available; takes the ksmlab lock like every LinuxKernel user)::

    python bench/run.py                       # all workloads at 1 GiB where sized
    python bench/run.py --pages 65536         # smaller
    python bench/run.py --sim-only            # no real kernel (no ratios)
    python bench/run.py --engines bulk        # chosen engines

Timings are printed, never asserted; docs/performance.md records results.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ksmlab import MADV_MERGEABLE, MADV_UNMERGEABLE, PAGE_SIZE, SimKernel
from ksmlab.api import Kernel, Process
from ksmlab.bulk import BulkKernel
from ksmlab.scenario import host

ENGINES: dict[str, Callable[[], Any]] = {
    "model": lambda: SimKernel(trace=False),
    "fingerprint": lambda: SimKernel(trace=False, content="fingerprint"),
    "bulk": BulkKernel,
}

COUNTERS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
            "stable_node_chains", "stable_node_dups", "ksm_zero_pages")


def ksmd_cpu_ns() -> int:
    """CPU time the real ksmd thread has used, in ns."""
    cpu = host.ksmd_cpu_ns()
    if cpu is None:
        raise RuntimeError("cannot read ksmd's CPU time from /proc")
    return cpu


class Clock:
    """Measures the timed phase.

    ksmd's phases: ksmd's CPU on the kernel, this process's CPU on the model.
    Phases that run in the user process (COW writes, MADV_UNMERGEABLE; set
    ``wall``): wall time on both, since on the kernel the work happens in the
    helper process, not in this one.
    """

    def __init__(self, real: bool) -> None:
        self.real = real
        self.wall = False
        self.start = 0
        self.total = 0

    def _now(self) -> int:
        if self.wall:
            return time.perf_counter_ns()
        return ksmd_cpu_ns() if self.real else time.process_time_ns()

    def __enter__(self) -> Clock:
        self.start = self._now()
        return self

    def __exit__(self, *exc: object) -> None:
        self.total += self._now() - self.start


@dataclass(frozen=True)
class Workload:
    """A benchmark program: *build* maps and fills memory, *measure* runs the timed phase."""

    name: str
    build: Callable[[Kernel, int], list[tuple[Process, int]]]
    measure: Callable[[Kernel, list[tuple[Process, int]], Clock], None]
    pages: Callable[[int], int]
    """Pages the workload maps when the sized workloads have n pages (memory per page)."""


def fill(k: Kernel, pages: int, content: Callable[[int], bytes]) -> list[tuple[Process, int]]:
    """One process with *pages* pages, page i holding content(i), madvised MERGEABLE."""
    p = k.spawn()
    a = p.mmap(pages * PAGE_SIZE)
    chunk = 256
    for i in range(0, pages, chunk):
        n = min(chunk, pages - i)
        p.write(a + i * PAGE_SIZE, b"".join(content(j) for j in range(i, i + n)))
    return [(p, a)]


def page_of(tag: int) -> bytes:
    """A page whose content is determined by *tag* (distinct tags, distinct pages)."""
    head = tag.to_bytes(8, "little")
    return head * (PAGE_SIZE // 8)


def advise_all(procs: list[tuple[Process, int]], pages: int) -> None:
    for p, a in procs:
        p.madvise(a, pages * PAGE_SIZE, MADV_MERGEABLE)


def run_ksmd(k: Kernel, scans: int = 2) -> None:
    """Let ksmd make *scans* full scans, then stop it."""
    k.sysfs["run"] = "1"
    k.wait_full_scans(scans, timeout=600)
    k.sysfs["run"] = "0"


def merge_until_stable(k: Kernel, procs: list[tuple[Process, int]], clock: Clock,
                       pages: int, scans: int) -> None:
    advise_all(procs, pages)
    with clock:
        run_ksmd(k, scans)


def sized(name: str, content: Callable[[int], bytes], scans: int,
          pages: int | None = None) -> Workload:
    """A one-process workload of *pages* pages (default: the --pages size), merged by *scans*."""
    def build(k: Kernel, n: int) -> list[tuple[Process, int]]:
        return fill(k, pages or n, content)

    def measure(k: Kernel, procs: list[tuple[Process, int]], clock: Clock) -> None:
        merge_until_stable(k, procs, clock, pages or _pages[0], scans)
    return Workload(name, build, measure, lambda n: pages or n)


_pages = [262144]


def cow_workload() -> Workload:
    """ksm_tests -C: COW-break time of 2000 merged pairs (the timed phase is the writes)."""
    def content(i: int) -> bytes:
        k_ = i // 2
        return b"+" * (k_ + 1) + b"*" * (PAGE_SIZE - k_ - 1)

    def build(k: Kernel, _n: int) -> list[tuple[Process, int]]:
        procs = fill(k, 4000, content)
        advise_all(procs, 4000)
        run_ksmd(k)
        return procs

    def measure(k: Kernel, procs: list[tuple[Process, int]], clock: Clock) -> None:
        p, a = procs[0]
        # ksm_tests writes one byte, "-", at the start of each pair's first
        # page.  The fingerprint and bulk engines keep no bytes, so every
        # engine writes the whole resulting page (the same bytes) instead; on
        # the kernel the cost is the same COW fault plus a 4 KiB copy.
        pages = [b"-" + content(i)[1:] for i in range(0, 4000, 2)]
        clock.wall = True  # the writes run in the writer, not in ksmd
        with clock:
            for i, data in zip(range(0, 4000, 2), pages, strict=True):
                p.write(a + i * PAGE_SIZE, data)
    return Workload("cow-2000-pairs (-C)", build, measure, lambda _n: 4000)


def unmerge_workload(pages: int) -> Workload:
    """ksm_tests -D: time of MADV_UNMERGEABLE over merged identical pages."""
    def build(k: Kernel, _n: int) -> list[tuple[Process, int]]:
        procs = fill(k, pages, lambda i: b"*" * PAGE_SIZE)
        advise_all(procs, pages)
        run_ksmd(k)
        return procs

    def measure(k: Kernel, procs: list[tuple[Process, int]], clock: Clock) -> None:
        p, a = procs[0]
        clock.wall = True
        with clock:
            p.madvise(a, pages * PAGE_SIZE, MADV_UNMERGEABLE)
    return Workload(f"unmerge-{pages}-pages (-D)", build, measure, lambda _n: pages)


def fork_workload(pages: int) -> Workload:
    """A parent with merged memory forks 16 children that each write 10% of their pages."""
    def build(k: Kernel, _n: int) -> list[tuple[Process, int]]:
        procs = fill(k, pages, lambda i: page_of(i % 64))
        advise_all(procs, pages)
        run_ksmd(k)
        p, a = procs[0]
        for c in range(16):
            child = p.fork()
            for i in range(c, pages, 10):
                child.write(a + i * PAGE_SIZE, page_of(1000 + c * pages + i))
            procs.append((child, a))
        return procs

    def measure(k: Kernel, procs: list[tuple[Process, int]], clock: Clock) -> None:
        with clock:
            run_ksmd(k)
    return Workload(f"fork-16-children-{pages}", build, measure, lambda _n: 17 * pages)


def run_one(make: Callable[[], Any], w: Workload, pages: int, real: bool,
            knobs: dict[str, str]) -> tuple[float, dict[str, str]]:
    """Run workload *w* on a new kernel; (seconds of the timed phase, final counters)."""
    with make() as k:
        for name, value in knobs.items():
            k.sysfs[name] = value
        procs = w.build(k, pages)
        clock = Clock(real)
        w.measure(k, procs, clock)
        counters = {c: k.sysfs[c] for c in COUNTERS}
        for p, _a in procs:
            p.exit()
    gc.collect()  # free the previous machine before timing the next one
    return clock.total / 1e9, counters


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _child(engine: str, w: Workload, pages: int, knobs: dict[str, str],
           out: Any) -> None:
    base = _rss_bytes()
    seconds, counters = run_one(ENGINES[engine], w, pages, False, knobs)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out.send((seconds, counters, max(0, peak - base)))


def run_engine(engine: str, w: Workload, pages: int,
               knobs: dict[str, str]) -> tuple[float, dict[str, str], int]:
    """Run *w* on *engine* in a child process; (seconds, counters, peak RSS growth in bytes)."""
    ctx = multiprocessing.get_context("fork")
    here, there = ctx.Pipe()
    child = ctx.Process(target=_child, args=(engine, w, pages, knobs, there))
    child.start()
    result = here.recv()
    child.join()
    return result  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pages", type=int, default=262144, help="pages of the sized workloads")
    ap.add_argument("--sim-only", action="store_true", help="do not run the real kernel")
    ap.add_argument("--only", help="run only workloads whose name contains this")
    ap.add_argument("--engines", nargs="+", choices=list(ENGINES), default=list(ENGINES),
                    help="engines of the model to run (default: all)")
    args = ap.parse_args(argv)
    n = args.pages
    _pages[0] = n
    knobs = {"pages_to_scan": "100000", "sleep_millisecs": "0", "smart_scan": "1"}
    workloads = [
        sized(f"64-images-{n}", lambda i: page_of(i % 64), 2),
        sized(f"all-distinct-{n}", page_of, 2),
        sized(f"half-pairs-{n}", lambda i: page_of(i // 2 if i < n // 2 else n + i), 2),
        sized("identical-25600 (-P)", lambda i: b"*" * PAGE_SIZE, 2, pages=25600),
        cow_workload(),
        unmerge_workload(25600),
        fork_workload(min(n, 16384)),
    ]
    if args.only:
        workloads = [w for w in workloads if args.only in w.name]
    head = "".join(f" {e + ' s':>14} {'ratio':>6}" for e in args.engines)
    mem = "".join(f" {e[:5] + ' B/pg':>10}" for e in args.engines)
    print(f"{'workload':34} {'ksmd s':>8}{head}{mem}  counters equal", flush=True)
    for w in workloads:
        results = {e: run_engine(e, w, n, knobs) for e in args.engines}
        real_s: float | None = None
        real_c: dict[str, str] | None = None
        if not args.sim_only:
            from ksmlab.backends.linux import LinuxKernel
            real_s, real_c = run_one(LinuxKernel, w, n,
                                     not w.name.startswith(("cow", "unmerge")), knobs)
        line = f"{w.name:34} " + (f"{real_s:8.3f}" if real_s is not None else f"{'-':>8}")
        for e in args.engines:
            s = results[e][0]
            ratio = f"{s / real_s:6.2f}" if real_s else f"{'-':>6}"
            line += f" {s:14.3f} {ratio}"
        pages = w.pages(n)
        for e in args.engines:
            line += f" {results[e][2] / pages:10.0f}"
        want = real_c if real_c is not None else results[args.engines[0]][1]
        bad = [e for e in args.engines if results[e][1] != want]
        line += "  " + ("yes" if not bad else
                        "NO: " + "; ".join(f"{e} {results[e][1]}" for e in bad)
                        + f"; {'kernel' if real_c else args.engines[0]} {want}")
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
