"""Benchmarks: SimKernel against the real ksmd, on the same workloads, in the same run.

For each workload the real kernel (LinuxKernel) and the model (SimKernel) run
the same program; the script checks that the final counters are identical and
prints ksmd's CPU time (from /proc/<ksmd>/schedstat), the model's CPU time for
the same phase (time.process_time, building the workload excluded), their
ratio, and the model's peak RSS per simulated page.

Usage (root, KSM available; takes the ksmlab lock like every LinuxKernel user)::

    python bench/run.py                # all workloads at 1 GiB where sized
    python bench/run.py --pages 65536  # smaller
    python bench/run.py --sim-only     # no real kernel (the ratio column is empty)

Timings are printed, never asserted; docs/performance.md records results.
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from ksmlab import MADV_MERGEABLE, MADV_UNMERGEABLE, PAGE_SIZE, SimKernel
from ksmlab.api import Kernel, Process
from ksmlab.scenario import host

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


def merge_until_stable(k: Kernel, procs: list[tuple[Process, int]], clock: Clock,
                       pages: int, scans: int) -> None:
    advise_all(procs, pages)
    with clock:
        k.sysfs["run"] = "1"
        k.wait_full_scans(scans, timeout=600)
        k.sysfs["run"] = "0"


def sized(name: str, content: Callable[[int], bytes], scans: int,
          pages: int | None = None) -> Workload:
    """A one-process workload of *pages* pages (default: the --pages size), merged by *scans*."""
    def build(k: Kernel, n: int) -> list[tuple[Process, int]]:
        return fill(k, pages or n, content)

    def measure(k: Kernel, procs: list[tuple[Process, int]], clock: Clock) -> None:
        merge_until_stable(k, procs, clock, pages or _pages[0], scans)
    return Workload(name, build, measure)


_pages = [262144]


def cow_workload() -> Workload:
    """ksm_tests -C: COW-break time of 2000 merged pairs (the timed phase is the writes)."""
    def build(k: Kernel, _n: int) -> list[tuple[Process, int]]:
        def content(i: int) -> bytes:
            k_ = i // 2
            return b"+" * (k_ + 1) + b"*" * (PAGE_SIZE - k_ - 1)
        procs = fill(k, 4000, content)
        advise_all(procs, 4000)
        k.sysfs["run"] = "1"
        k.wait_full_scans(2, timeout=600)
        k.sysfs["run"] = "0"
        return procs

    def measure(k: Kernel, procs: list[tuple[Process, int]], clock: Clock) -> None:
        p, a = procs[0]
        clock.wall = True  # the writes run in the writer, not in ksmd
        with clock:
            for i in range(0, 4000, 2):
                p.write(a + i * PAGE_SIZE, b"-")
    return Workload("cow-2000-pairs (-C)", build, measure)


def unmerge_workload(pages: int) -> Workload:
    """ksm_tests -D: time of MADV_UNMERGEABLE over merged identical pages."""
    def build(k: Kernel, _n: int) -> list[tuple[Process, int]]:
        procs = fill(k, pages, lambda i: b"*" * PAGE_SIZE)
        advise_all(procs, pages)
        k.sysfs["run"] = "1"
        k.wait_full_scans(2, timeout=600)
        k.sysfs["run"] = "0"
        return procs

    def measure(k: Kernel, procs: list[tuple[Process, int]], clock: Clock) -> None:
        p, a = procs[0]
        clock.wall = True
        with clock:
            p.madvise(a, pages * PAGE_SIZE, MADV_UNMERGEABLE)
    return Workload(f"unmerge-{pages}-pages (-D)", build, measure)


def fork_workload(pages: int) -> Workload:
    """A parent with merged memory forks 16 children that each write 10% of their pages."""
    def build(k: Kernel, _n: int) -> list[tuple[Process, int]]:
        procs = fill(k, pages, lambda i: page_of(i % 64))
        advise_all(procs, pages)
        k.sysfs["run"] = "1"
        k.wait_full_scans(2, timeout=600)
        k.sysfs["run"] = "0"
        p, a = procs[0]
        for c in range(16):
            child = p.fork()
            for i in range(c, pages, 10):
                child.write(a + i * PAGE_SIZE, page_of(1000 + c * pages + i))
            procs.append((child, a))
        return procs

    def measure(k: Kernel, procs: list[tuple[Process, int]], clock: Clock) -> None:
        with clock:
            k.sysfs["run"] = "1"
            k.wait_full_scans(2, timeout=600)
            k.sysfs["run"] = "0"
    return Workload(f"fork-16-children-{pages}", build, measure)


def run_one(make: Callable[[], Kernel], w: Workload, pages: int, real: bool,
            knobs: dict[str, str]) -> tuple[float, dict[str, str]]:
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pages", type=int, default=262144, help="pages of the sized workloads")
    ap.add_argument("--sim-only", action="store_true", help="do not run the real kernel")
    ap.add_argument("--only", help="run only workloads whose name contains this")
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
    print(f"{'workload':34} {'ksmd s':>8} {'model s':>8} {'ratio':>6}  counters equal")
    for w in workloads:
        sim_s, sim_c = run_one(lambda: SimKernel(trace=False), w, n, False, knobs)
        if args.sim_only:
            print(f"{w.name:34} {'-':>8} {sim_s:8.3f} {'-':>6}  -", flush=True)
            continue
        from ksmlab.backends.linux import LinuxKernel
        real_s, real_c = run_one(LinuxKernel, w, n, not w.name.startswith(("cow", "unmerge")),
                                 knobs)
        same = "yes" if sim_c == real_c else f"NO: model {sim_c} kernel {real_c}"
        ratio = sim_s / real_s if real_s else float("inf")
        print(f"{w.name:34} {real_s:8.3f} {sim_s:8.3f} {ratio:6.2f}  {same}", flush=True)
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"peak RSS of this process: {rss_kib / 1024:.0f} MiB "
          f"({rss_kib * 1024 / n:.0f} bytes per simulated page of the largest workload)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
