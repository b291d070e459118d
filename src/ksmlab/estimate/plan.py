"""What a snapshot asks the model to load: the pages ksmd would scan, their frames and rewrite rates.

:func:`load_plan` reads a :class:`~ksmlab.snapshot.Snapshot` into numpy
arrays that every later step uses (the engines, the static bound, the
exposure), one entry per *loaded page*:

* **which pages**: the present anonymous pages of the captured areas, but
  not the shared zero page (KSM never scans page-cache pages or the zero
  page; docs/snapshot.md, "candidates").  A present anonymous page whose
  fingerprint could not be read (it raced with the capture) is loaded with a
  content of its own.  Swapped and absent pages are left out: ksmd skips them.
* **content**: an id per distinct fingerprint (equal ids, equal bytes).
* **frame**: rows of one PFN are one physical page, e.g. a page a fork parent
  and child still share.  The first row of a frame (in pid, address order)
  *owns* it; the others map the owner's frame (:attr:`LoadPlan.owner`).
  Without PFNs (a capture without CAP_SYS_ADMIN) every row is its own frame.
* **already merged**: rows that were KSM pages at capture (:attr:`LoadPlan.ksm`);
  the engines merge them again before the clock starts.
* **transparent huge pages** (:attr:`LoadPlan.pmd`): a 2 MiB-aligned virtual
  extent of one process and one area whose 512 pages are all loaded and all
  THP-flagged (``/proc/kpageflags`` bit 22) is taken as a THP mapped by one PMD
  at capture, and loaded as one.  The flags cannot tell a PMD mapping from a
  large folio mapped by PTEs (after a partial munmap, mprotect or a fork child's
  COW, say): a THP-flagged page of an extent not wholly present and flagged
  loads as a small page, and an extent of a THP whose PMD was split but whose
  512 pages are all still mapped loads as PMD-mapped.
* **rewrite rate** per second, from ``changes`` / ``compared`` over the
  sampling interval (:func:`rewrite_rates`).

Pages keep their order: processes by pid (the order they would have
registered with ksmd), areas and pages by address, so ksmd visits them in
the order it would on the host.  Holes between pages are not kept (ksmd
only counts present pages against ``pages_to_scan``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ksmlab.constants import HPAGE_PMD_NR
from ksmlab.mm.page import ZERO_FINGERPRINT
from ksmlab.snapshot.reader import Snapshot

__all__ = ["AreaPlan", "LoadPlan", "ProcessPlan", "load_plan", "rewrite_rates"]

Ints = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]

_ZERO = np.frombuffer(ZERO_FINGERPRINT, np.uint8)


@dataclass(frozen=True, slots=True)
class AreaPlan:
    """One captured area of a process, as loaded: its pages are plan entries ``start..start+pages``."""

    vma: int
    """Index of the area in the process's ``vmas`` (snapshot metadata)."""
    start: int
    pages: int
    mergeable: bool
    """``mg`` at capture (VM_MERGEABLE)."""


@dataclass(frozen=True, slots=True)
class ProcessPlan:
    """One captured process and its loaded areas (plan entries ``start..start+pages``)."""

    pid: int
    comm: str
    uid: int | None
    cgroup: str
    start: int
    pages: int
    areas: tuple[AreaPlan, ...]

    @property
    def label(self) -> str:
        """``comm[pid]``, for reports."""
        return f"{self.comm}[{self.pid}]"


@dataclass(frozen=True, slots=True)
class LoadPlan:
    """The loaded pages of a snapshot (see the module doc); arrays have one entry per page."""

    snapshot: Snapshot
    processes: tuple[ProcessPlan, ...]
    row: Ints
    """The page's row in the snapshot."""
    content: Ints
    """Content id: ``< len(fingerprints)`` a fingerprint of :attr:`fingerprints`, above it a
    page of unknown content (raced at capture), different from every other."""
    fingerprints: npt.NDArray[np.uint8]
    """Shape (k, 16): the distinct fingerprints."""
    n_contents: int
    frame: Ints
    """Physical page id: equal ids, one page."""
    owner: Ints
    """The entry whose frame this page maps: itself for the first mapping of a frame."""
    ksm: Bools
    """A KSM page at capture."""
    zero: Bools
    """Zero-filled content (merged with the zero page under ``use_zero_pages``)."""
    rate: npt.NDArray[np.float64]
    """Rewrites per second."""
    pfn_known: bool
    thp: int
    """Loaded pages that were part of a transparent huge page (THP-flagged)."""
    pmd: Bools
    """A page of an extent taken as a PMD-mapped THP at capture (see the module doc):
    such extents are runs of 512 consecutive entries."""
    zero_page_rows: int
    """Rows mapping the shared zero page (not loaded: KSM never scans it)."""
    swapped_rows: int
    """Rows in swap (not loaded: ksmd skips them)."""

    def __len__(self) -> int:
        return int(self.content.size)

    @property
    def shared(self) -> Bools:
        """Pages that map another page's frame (a fork relative's page)."""
        shared: Bools = self.owner != np.arange(len(self), dtype=np.int64)
        return shared


def rewrite_rates(changes: npt.NDArray[np.uint16], compared: npt.NDArray[np.uint16],
                  interval_s: float) -> npt.NDArray[np.float64]:
    """Rewrites per second of each page, from the samples.

    A page changed in ``changes`` of ``compared`` intervals of *interval_s*.
    Writes are taken as a Poisson process: the chance that an interval sees
    at least one is ``p = 1 - exp(-rate * interval_s)``, so
    ``rate = -ln(1 - p) / interval_s`` with ``p = changes / compared``.  A
    page that changed in every interval may change far more often; ``p`` is
    then taken as ``1 - 1/(2 compared)`` (it is at least that likely, given
    what was seen), a floor rather than a guess.  No comparison, no rate.
    """
    rates = np.zeros(changes.size, np.float64)
    if interval_s <= 0:
        return rates
    seen = (compared > 0) & (changes > 0)
    c = changes[seen].astype(np.float64)
    n = compared[seen].astype(np.float64)
    p = np.minimum(c / n, 1.0 - 0.5 / n)
    rates[seen] = -np.log1p(-p) / interval_s
    return rates


def _interval_s(snap: Snapshot) -> float:
    """The time between passes: the mean of the recorded pass starts (a pass can overrun)."""
    starts = (snap.meta.get("capture") or {}).get("pass_starts_s")
    if isinstance(starts, list) and len(starts) >= 2:
        try:
            span = float(starts[-1]) - float(starts[0])
        except (TypeError, ValueError):
            span = 0.0
        if span > 0 and math.isfinite(span):
            return span / (len(starts) - 1)
    return snap.interval_s


def load_plan(snap: Snapshot) -> LoadPlan:
    """The pages of *snap* the model loads (see the module doc)."""
    pages = snap.pages
    load = pages.present & ~pages.file & ~pages.zero_page
    rows = np.flatnonzero(load).astype(np.int64)
    if rows.size and bool((np.diff(pages.pid[rows]) < 0).any()):  # the writer sorts by pid
        rows = rows[np.argsort(pages.pid[rows], kind="stable")]
    n = rows.size
    table, ids = pages.content_ids()
    content = ids[rows]
    unknown = content < 0
    content[unknown] = len(table) + np.arange(int(unknown.sum()), dtype=np.int64)
    n_contents = len(table) + int(unknown.sum())
    zero_id = _zero_id(table)
    zero = content == zero_id if zero_id is not None else np.zeros(n, bool)

    pfn_known = bool((snap.meta.get("privileges") or {}).get("pfn", False))
    pfn = pages.pfn[rows]
    ksm = pages.ksm[rows]
    frame = np.arange(n, dtype=np.int64)
    owner = np.arange(n, dtype=np.int64)
    if pfn_known and n:
        # One frame per PFN; a KSM page's mappings are merged again before the
        # start instead (each loaded as its own page), so they are not shared here.
        shareable = (pfn != 0) & ~ksm
        idx = np.flatnonzero(shareable)
        uniq, first, inverse = np.unique(pfn[idx], return_index=True, return_inverse=True)
        owners = idx[first][inverse.ravel()]
        owner[idx] = owners
        frame[idx] = owners
        content[idx] = content[owners]  # a page rewritten between two reads: the first's
        zero[idx] = zero[owners]
        del uniq
    pmd = _pmd_extents(pages.pid[rows], pages.vma[rows], pages.addr[rows],
                       pages.thp[rows] & ~ksm)
    rate = rewrite_rates(pages.changes[rows], pages.compared[rows], _interval_s(snap))
    procs = _processes(snap, rows)
    return LoadPlan(snapshot=snap, processes=procs, row=rows, content=content,
                    fingerprints=table, n_contents=n_contents, frame=frame, owner=owner,
                    ksm=ksm, zero=zero, rate=rate, pfn_known=pfn_known,
                    thp=int(pages.thp[rows].sum()), pmd=pmd,
                    zero_page_rows=int((pages.present & pages.zero_page).sum()),
                    swapped_rows=int(pages.swapped.sum()))




def _pmd_extents(pid: npt.NDArray[np.int32], vma: npt.NDArray[np.uint32],
                 addr: npt.NDArray[np.uint64], thp: Bools) -> Bools:
    """Which loaded pages (in plan order) lie in a 2 MiB-aligned extent of one process and
    one area whose 512 pages are all loaded, in address order, and all THP-flagged."""
    n = addr.size
    out = np.zeros(n, bool)
    if not n or not bool(thp.any()):
        return out
    page = (addr >> np.uint64(12)).astype(np.int64)
    ext = page >> 9
    brk = np.flatnonzero((np.diff(ext) != 0) | (np.diff(pid) != 0) | (np.diff(vma) != 0)
                         | (np.diff(page) != 1)) + 1
    starts = np.r_[0, brk]
    sizes = np.diff(np.r_[starts, n])
    full = (sizes == HPAGE_PMD_NR) & (page[starts] % HPAGE_PMD_NR == 0)
    flagged = np.add.reduceat(thp.astype(np.int64), starts) == sizes
    for s in starts[full & flagged].tolist():
        out[s:s + HPAGE_PMD_NR] = True
    return out


def _zero_id(table: npt.NDArray[np.uint8]) -> int | None:
    if not len(table):
        return None
    hit = np.flatnonzero((table == _ZERO).all(axis=1))
    return int(hit[0]) if hit.size else None


def _processes(snap: Snapshot, rows: Ints) -> tuple[ProcessPlan, ...]:
    pages = snap.pages
    pid_of = pages.pid[rows]
    vma_of = pages.vma[rows].astype(np.int64)
    out: list[ProcessPlan] = []
    for p in sorted((p for p in snap.processes if p.state == "captured"), key=lambda p: p.pid):
        lo = int(np.searchsorted(pid_of, p.pid, "left"))
        hi = int(np.searchsorted(pid_of, p.pid, "right"))
        if lo == hi:
            out.append(ProcessPlan(p.pid, p.comm, p.uid, p.cgroup, lo, 0, ()))
            continue
        vmas = vma_of[lo:hi]
        breaks = np.flatnonzero(np.diff(vmas) != 0) + 1
        starts = np.r_[0, breaks]
        ends = np.r_[breaks, hi - lo]
        areas = tuple(AreaPlan(int(vmas[s]), lo + int(s), int(e - s),
                               p.vmas[int(vmas[s])].mergeable)
                      for s, e in zip(starts.tolist(), ends.tolist(), strict=True))
        out.append(ProcessPlan(p.pid, p.comm, p.uid, p.cgroup, lo, hi - lo, areas))
    return tuple(out)
