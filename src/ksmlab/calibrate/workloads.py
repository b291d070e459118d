"""The micro-workloads ``ksmlab calibrate`` runs on the real ksmd and on the model.

Each one isolates a few terms of the cost model (:mod:`ksmlab.ksm.cost`):
tiny lists for the per-batch and per-full-scan costs, identical pages for
merging into one KSM page and then steady KSM pages, the same contents in
several processes for steady scans that meet a different KSM page at every
page (a cache miss each, against one KSM page met again), unique pages for the
unstable tree, pairs for new KSM pages, many contents for a deep stable
tree, zero pages with ``use_zero_pages`` 0 and 1, pages rewritten between
scans for checksums alone, long chains (``max_page_sharing`` = 2) for dup
walks, many processes for the per-mm cost, a host's usual mix (a shared
image, zero pages and private pages at scattered places, several processes),
several ``pages_to_scan`` and ``sleep_millisecs`` values for the batch cost
and the clock, and transparent huge pages (``MADV_HUGEPAGE`` before the
first write): unique ones, which ksmd walks under a PMD and never splits, and
identical ones, each split at its first merge (``pte_page``, ``thp_split``).

A workload is the same program on any :class:`ksmlab.api.Kernel`: the pages
get bytes made from a *tag* per page (0 is the zero page; any other tag
repeats its 8-byte value over the page, so two different pages differ in
their first bytes, as most real pages do).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from ksmlab.api import Kernel, Process
from ksmlab.constants import HPAGE_PMD_NR, HPAGE_PMD_SIZE, MADV_HUGEPAGE, MADV_MERGEABLE, PAGE_SIZE
from ksmlab.ksm.defaults import (
    DEFAULT_MAX_PAGE_SHARING,
    DEFAULT_PAGES_TO_SCAN,
    DEFAULT_SLEEP_MILLISECS,
    DEFAULT_SMART_SCAN,
    DEFAULT_STABLE_NODE_CHAINS_PRUNE_MILLISECS,
    DEFAULT_USE_ZERO_PAGES,
)

Tag = Callable[[int, int, int], int]
"""(process, page, scan) -> the page's tag at that scan (scan 0 is the first)."""


@dataclass(frozen=True)
class Workload:
    """One micro-workload.

    Attributes:
        name: how reports name it.
        procs: processes, each with one mapping of *pages* pages.
        pages: pages per process.
        tag: the content of each page (see :data:`Tag`); a tag that changes
            with the scan makes the page be rewritten before that scan.
        scans: full scans to measure.
        knobs: the knobs besides ``run`` (the kernel's boot values otherwise).
        churn: whether any tag changes between scans (pages are then rewritten).
        thp: the mapping is madvised MADV_HUGEPAGE before it is written, so that it
            is made of transparent huge pages (*pages* must be a multiple of 512;
            the kernel places such a mapping on a 2 MiB boundary).
    """

    name: str
    procs: int
    pages: int
    tag: Tag
    scans: int
    knobs: dict[str, str] = field(default_factory=dict)
    churn: bool = False
    thp: bool = False

    def __post_init__(self) -> None:
        if self.thp and (self.pages <= 0 or self.pages % HPAGE_PMD_NR):
            msg = (f"workload {self.name!r}: a THP workload's pages must be a positive "
                   f"multiple of {HPAGE_PMD_NR}, got {self.pages}")
            raise ValueError(msg)

    @property
    def sleep_ms(self) -> int:
        """The workload's ``sleep_millisecs``."""
        return int(self.knobs.get("sleep_millisecs", "20"))



BOOT_KNOBS = {
    "max_page_sharing": str(DEFAULT_MAX_PAGE_SHARING),
    "use_zero_pages": str(int(DEFAULT_USE_ZERO_PAGES)),
    "smart_scan": str(int(DEFAULT_SMART_SCAN)),
    "pages_to_scan": str(DEFAULT_PAGES_TO_SCAN),
    "sleep_millisecs": str(DEFAULT_SLEEP_MILLISECS),
    "stable_node_chains_prune_millisecs": str(DEFAULT_STABLE_NODE_CHAINS_PRUNE_MILLISECS),
}
"""The knobs a workload sets, at their boot values (``max_page_sharing`` first: it needs
no KSM page, which ``run=2`` before each workload ensures)."""


def page_bytes(tag: int) -> bytes:
    """The bytes of a page with *tag* (0: the zero page)."""
    return bytes(PAGE_SIZE) if tag == 0 else tag.to_bytes(8, "little") * (PAGE_SIZE // 8)


def _fill(w: Workload, proc: int, scan: int) -> bytes:
    cache: dict[int, bytes] = {}
    out = []
    for i in range(w.pages):
        t = w.tag(proc, i, scan)
        if t not in cache:
            cache[t] = page_bytes(t)
        out.append(cache[t])
    return b"".join(out)


def build(k: Kernel, w: Workload) -> list[tuple[Process, int]]:
    """Set *w*'s knobs (``run`` untouched), start its processes and fill and madvise their memory."""
    for name, boot in BOOT_KNOBS.items():  # every knob, so none is left from a workload before
        k.sysfs[name] = w.knobs.get(name, boot)
    maps = []
    for proc in range(w.procs):
        p = k.spawn()
        a = p.mmap(w.pages * PAGE_SIZE)
        if w.thp:
            if a % (HPAGE_PMD_SIZE):
                raise RuntimeError(f"workload {w.name!r}: mapping at {a:#x} is not 2 MiB-aligned")
            p.madvise(a, w.pages * PAGE_SIZE, MADV_HUGEPAGE)
        p.write(a, _fill(w, proc, 0))
        p.madvise(a, w.pages * PAGE_SIZE, MADV_MERGEABLE)
        maps.append((p, a))
    return maps


def thp_shortfall(w: Workload, maps: list[tuple[Process, int]]) -> str:
    """Why *w*'s memory is not all transparent huge pages right after :func:`build`
    ("" when it is, or when *w* has none): a fragmented host may fall back to 4 KiB
    pages.  Read from smaps ``AnonHugePages`` of each process's mapping."""
    if not w.thp:
        return ""
    want = w.pages * PAGE_SIZE
    for proc, (p, a) in enumerate(maps):
        got = sum(e.anon_huge for e in p.smaps() if e.start < a + want and e.end > a)
        if got < want:
            return (f"process {proc} got {got // 1024} kB of transparent huge pages of "
                    f"{want // 1024} kB (memory too fragmented?)")
    return ""


def rewrite(w: Workload, maps: list[tuple[Process, int]], scan: int) -> None:
    """Before *scan*: write the pages whose tag changed since the scan before."""
    if not w.churn:
        return
    for proc, (p, a) in enumerate(maps):
        p.write(a, _fill(w, proc, scan))


def teardown(maps: list[tuple[Process, int]]) -> None:
    """End the workload's processes."""
    for p, _ in maps:
        p.exit()


def _knobs(pts: int, sleep: int, **extra: str) -> dict[str, str]:
    return {"pages_to_scan": str(pts), "sleep_millisecs": str(sleep), **extra}


def workloads(scale: int = 16384) -> list[Workload]:
    """The calibration set; *scale* is the size of the big ones, in pages (16384 = 64 MiB).

    The big ones run large batches (``pages_to_scan`` 1000, ``sleep_millisecs`` 10); a
    quarter-size copy of the main ones runs at the kernel's defaults (100 pages every 20 ms),
    where a batch's tree searches share fewer nodes and per-page costs are higher.
    """
    n, q = scale, max(64, scale // 4)
    h = max(HPAGE_PMD_NR, n - n % HPAGE_PMD_NR)  # the THP workloads' size: whole huge pages
    unique: Tag = lambda p, i, s: 1 + p * n + i  # noqa: E731
    same: Tag = lambda p, i, s: 7  # noqa: E731
    pairs: Tag = lambda p, i, s: 1 + i // 2  # noqa: E731
    images: Tag = lambda p, i, s: 1 + i % 1024  # noqa: E731
    zero: Tag = lambda p, i, s: 0  # noqa: E731
    rewritten: Tag = lambda p, i, s: 1 + p * n + i + s * 2 * n * 64  # noqa: E731

    def mixed(size: int) -> Tag:
        return lambda p, i, s: 1 + i // 2 if i < size // 2 else 1 + n + i

    def host(p: int, i: int, s: int) -> int:
        # Half the pages from a common image of 2048 pages (at scattered places), a fifth
        # zero, the rest the process's own: the usual mix of guests or containers.
        r = random.Random(p * 100003 + i).random()
        if r < 0.5:
            return 1 + (i * 7919 + p * 31) % 2048
        return 0 if r < 0.7 else 1 + 4 * n + p * n + i

    big = _knobs(1000, 10)
    big0 = _knobs(1000, 10, smart_scan="0")
    dflt = _knobs(100, 20)
    dflt0 = _knobs(100, 20, smart_scan="0")
    return [
        Workload("tiny, sleep 10", 1, 1, same, 12, _knobs(100, 10)),
        Workload("tiny, sleep 50", 1, 1, same, 8, _knobs(100, 50)),
        Workload("tiny, 8 processes", 8, 1, same, 10, _knobs(100, 10)),
        Workload("identical", 1, n, same, 4, big),
        Workload("unique, smart_scan 0", 1, n, unique, 4, big0),
        Workload("unique, smart_scan 1", 1, n, unique, 8, _knobs(2000, 10)),
        Workload("pairs", 1, n, pairs, 4, big),
        Workload("1024 images", 1, n, images, 4, big),
        Workload("pairs and unique, smart_scan 0", 1, n, mixed(n), 5, big0),
        Workload("zero, use_zero_pages 1", 1, n, zero, 4, _knobs(1000, 10, use_zero_pages="1")),
        Workload("zero, use_zero_pages 0", 1, n, zero, 4, big),
        Workload("rewritten every scan", 1, n, rewritten, 4, big, churn=True),
        Workload("chain, max_page_sharing 2", 1, n // 8, same, 4,
                 _knobs(1000, 10, max_page_sharing="2")),
        Workload("64 processes", 64, 64, lambda p, i, s: 1 + i, 4, big),
        # The steady state of guests from one image: every page of a large batch maps a
        # different KSM page, shared by 8 processes (measured 1.2 to 1.6 times what the
        # terms fitted without it predict, docs/cost-model.md).
        Workload("8 processes, a different KSM page per page", 8, n // 8,
                 lambda p, i, s: 1 + i, 5, big),
        Workload("defaults: identical", 1, q, same, 4, dflt),
        # Page i of every process holds content i: once merged, each page of a batch maps a
        # different KSM page (ksm_frame), against one KSM page for all in "identical".
        Workload("defaults: 8 processes, a different KSM page per page", 8, q // 8,
                 lambda p, i, s: 1 + i, 4, dflt),
        Workload("defaults: unique, smart_scan 0", 1, q, unique, 3, dflt0),
        Workload("defaults: pairs", 1, q, pairs, 3, dflt),
        Workload("defaults: 1024 images", 1, q, images, 3, dflt),
        Workload("defaults: pairs and unique, smart_scan 0", 1, q, mixed(q), 4, dflt0),
        Workload("defaults: zero, use_zero_pages 1", 1, q, zero, 3,
                 _knobs(100, 20, use_zero_pages="1")),
        Workload("defaults: rewritten every scan", 1, q, rewritten, 3, dflt, churn=True),
        Workload("defaults: 8 processes, unique", 8, q // 8, unique, 3, dflt0),
        Workload("host mix: 8 processes, defaults", 8, q // 4, host, 4, dflt),
        Workload("host mix: 1 process, defaults", 1, q * 2, host, 4, dflt),
        Workload("host mix: 8 processes, smart_scan 0", 8, n // 8, host, 4, big0),
        Workload("clock, sleep 1", 1, 2048, unique, 3, _knobs(100, 1, smart_scan="0")),
        Workload("clock, sleep 5", 1, 2048, unique, 3, _knobs(100, 5, smart_scan="0")),
        # Checksummed, then in the unstable tree, never merged: walked under PMDs
        # (pte_page differs from page); identical: every THP split at its first merge.
        Workload("THP: unique, smart_scan 0", 1, h, unique, 4, big0, thp=True),
        Workload("THP: identical", 1, h, same, 4, big, thp=True),
    ]


__all__ = ["Workload", "build", "page_bytes", "rewrite", "teardown", "thp_shortfall",
           "workloads"]
