"""Loading a snapshot's pages into a model engine: processes, areas, frames, the KSM pages of the capture.

:func:`load_machine` builds, from a :class:`~ksmlab.estimate.plan.LoadPlan`,
a machine of either engine with the same calls on both, so that both give
the same answer:

1. the knobs are written (all but ``run``, in the kernel's safe order);
2. each process is spawned in pid order (the order ksmd's list gets them),
   made mergeable as the snapshot's policy says: ``merge-any``: every area
   by ``prctl(PR_SET_MEMORY_MERGE)``; ``as-is``: ``MADV_MERGEABLE`` on each
   area that was ``mg`` at capture.  An area is mapped with exactly its
   loaded pages, in address order (see :mod:`ksmlab.estimate.plan`), but for
   the transparent huge pages below;
3. the pages that were KSM pages at capture are written and merged again:
   ksmd runs with no sleep and a batch covering them all until they are
   (three full scans: checksum, merge, settle), then stops.  The clock, CPU
   time and full scans the estimate reports start after this;
4. the other pages are written, each frame once, by its first mapping;
5. the other mappings of a frame (a page a fork parent and child still
   share) are mapped to it, as ``fork`` shares a page: one physical page,
   mapped twice, copy-on-write.  ksmd then sees it as the kernel does: it
   never merges a page with itself, and once it merges the page with another
   copy, every mapping counts in ``pages_sharing``.

Transparent huge pages: an extent the plan takes as PMD-mapped at capture
(:attr:`~ksmlab.estimate.plan.LoadPlan.pmd`) whose pages own their frames is placed on a 2 MiB boundary
of the model's address space (its area is mapped with a gap before it and
its length rounded up to 2 MiB, so that mmap aligns it, as Linux 6.18 does),
and given ``madvise(MADV_HUGEPAGE)`` before its pages are written: the first
write faults the whole THP in, through the engine's own fault path, and the
others store into it.  A fork child's view of its parent's THP (an extent
whose 512 pages map, in order, the frames of one such extent of another
process: page j, frame j) is placed and advised the same way, mapped to
those frames as in step 5, and then mapped by one PMD, as fork's
``copy_huge_pmd`` leaves a child (the engine's own bookkeeping: SimKernel's
:meth:`~ksmlab.mm.memory.Memory.map_thp_pmd`, the bulk engine's
:func:`~ksmlab.bulk.thp.map_pmd`): ksmd reaches its pages under the PMD, and
a write by the child or a merge splits it as on the host.  The model's child
is not at its parent's addresses (an mm may map a THP by PMD at an extent of
its own).  Where the owner's extent did not load as a THP or the child's
is not on a 2 MiB boundary (either mapping was not aligned by mmap), the
child's pages stay mapped by PTE.  Any other extent with shared pages
(some pages of its own, or frames not of one THP in order) loads as small
pages, the shared ones mapped by PTE.

Contents: on SimKernel (fingerprint mode) a page holds its fingerprint; on
the bulk engine each distinct content gets one fresh id (equal pages, equal
ids), the zero-filled content the engine's zero id.  A page of unknown
content (raced at capture) gets a content of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
import numpy.typing as npt

from ksmlab.api import Process
from ksmlab.constants import (
    HPAGE_PMD_NR,
    HPAGE_PMD_SIZE,
    MADV_HUGEPAGE,
    MADV_MERGEABLE,
    PAGE_SHIFT,
    PAGE_SIZE,
    PR_SET_MEMORY_MERGE,
)
from ksmlab.estimate.plan import AreaPlan, LoadPlan
from ksmlab.kernel import SimKernel, SimProcess
from ksmlab.ksm.cost import KsmdCost
from ksmlab.mm.page import fingerprint
from ksmlab.scenario.knobs import WRITE_ORDER, read_knob

if TYPE_CHECKING:
    from ksmlab.bulk import BulkKernel

__all__ = ["ENGINES", "SIM_MAX_PAGES", "EngineName", "Machine", "choose_engine", "load_machine"]

EngineName = Literal["sim", "bulk"]
ENGINES: tuple[str, ...] = ("auto", "sim", "bulk")

SIM_MAX_PAGES = 50_000
"""``--engine auto`` loads up to this many pages into SimKernel (about 0.7 KB each in
fingerprint mode), more into the bulk engine (about 40 bytes each)."""

PREMERGE_SCANS = 3
"""Full scans that merge the capture's KSM pages again: the first records checksums,
the second merges, the third finds nothing more to do."""

Ints = npt.NDArray[np.int64]
Progress = Callable[[int, int], None]
"""Called with (pages loaded, pages to load) while loading."""


def choose_engine(name: str, pages: int) -> EngineName:
    """The engine ``--engine NAME`` means for a snapshot of *pages* loaded pages."""
    if name == "auto":
        return "sim" if pages <= SIM_MAX_PAGES else "bulk"
    if name in ("sim", "bulk"):
        return "sim" if name == "sim" else "bulk"
    msg = f"engine: expected one of {', '.join(ENGINES)}, got {name!r}"
    raise ValueError(msg)


@dataclass
class Machine:
    """A model engine holding a snapshot's pages (built by :func:`load_machine`)."""

    kernel: SimKernel | BulkKernel
    engine: EngineName
    plan: LoadPlan
    procs: list[Process]
    proc_of: npt.NDArray[np.int32]
    """Each page's process (index into :attr:`procs`)."""
    addr: npt.NDArray[np.uint64]
    """Each page's address in the model."""
    engine_row: Ints | None = None
    """Bulk engine only: each page's row in the engine's page table."""
    bulk_ids: Ints | None = None
    """Bulk engine only: the engine's content id of each plan content."""
    rewrites: int = 0
    knob_notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """The engine's name, for reports."""
        if self.engine == "sim":
            return "SimKernel (model, fingerprint content)"
        return "BulkKernel (model, bulk engine)"

    # --- page contents ---------------------------------------------------------------
    def _fingerprints(self, contents: Ints) -> list[bytes]:
        table = self.plan.fingerprints
        out: list[bytes] = []
        for c in contents.tolist():
            if c < len(table):
                out.append(table[c].tobytes())
            else:  # read raced at capture: a content of its own
                out.append(fingerprint(b"ksmlab estimate: unread page" + c.to_bytes(8, "little")))
        return out

    def _write_runs(self, idx: Ints, contents: Ints | list[bytes]) -> None:
        """Write *contents* to the plan pages *idx* (ascending), one call per run of
        consecutive pages of one process."""
        if not idx.size:
            return
        addr = self.addr[idx]
        proc = self.proc_of[idx]
        brk = np.flatnonzero((np.diff(addr.astype(np.int64)) != PAGE_SIZE)
                             | (np.diff(proc) != 0)) + 1
        starts = np.r_[0, brk].tolist()
        ends = np.r_[brk, idx.size].tolist()
        for s, e in zip(starts, ends, strict=True):
            p = self.procs[int(proc[s])]
            if isinstance(contents, list):
                assert isinstance(p, SimProcess)
                p.write_fingerprints(int(addr[s]), contents[s:e])
            else:
                p.write_contents(int(addr[s]), contents[s:e])  # type: ignore[attr-defined]

    def write_pages(self, idx: Ints) -> None:
        """Write the plan's content into the pages *idx* (ascending)."""
        c = self.plan.content[idx]
        if self.engine == "sim":
            self._write_runs(idx, self._fingerprints(c))
        else:
            assert self.bulk_ids is not None
            self._write_runs(idx, self.bulk_ids[c])

    def rewrite(self, idx: Ints) -> None:
        """Give each of the pages *idx* (ascending, distinct) new content of its own, as a
        program rewriting them would (a copy-on-write fault where the page is shared)."""
        if not idx.size:
            return
        n0 = self.rewrites
        self.rewrites += idx.size
        if self.engine == "sim":
            fps = [fingerprint(b"ksmlab estimate: rewrite" + i.to_bytes(8, "little"))
                   for i in range(n0, n0 + idx.size)]
            self._write_runs(idx, fps)
        else:
            k = self.kernel
            assert not isinstance(k, SimKernel)
            self._write_runs(idx, k.contents.fresh(int(idx.size)))

    # --- frames shared by several mappings ------------------------------------------------
    def share_frames(self, idx: Ints) -> None:
        """Map each page of *idx* to its owner's frame (as fork's copy_page_range shares a
        page: one more mapping, copy-on-write); the pages must not be mapped yet."""
        if not idx.size:
            return
        owners = self.plan.owner[idx]
        if self.engine == "sim":
            self._share_sim(idx, owners)
        else:
            self._share_bulk(idx, owners)

    def _share_sim(self, idx: Ints, owners: Ints) -> None:
        k = self.kernel
        assert isinstance(k, SimKernel)
        for i, o in zip(idx.tolist(), owners.tolist(), strict=True):
            src = self.procs[int(self.proc_of[o])]
            dst = self.procs[int(self.proc_of[i])]
            assert isinstance(src, SimProcess) and isinstance(dst, SimProcess)
            frame = src.mm.ptes[int(self.addr[o]) >> PAGE_SHIFT]
            vpn = int(self.addr[i]) >> PAGE_SHIFT
            vma = dst.mm.find_vma(int(self.addr[i]))
            assert vma is not None and vpn not in dst.mm.ptes and not frame.zero
            k.memory.anon_vma_prepare(dst.mm, vma)  # anon_vma_fork gives the child's area one
            k.memory.copy_present_pte(dst.mm, vpn, frame)

    def map_forked_thps(self, forked: Ints) -> None:
        """Map each fork child's extent of *forked* (rows: first entry of the child's extent,
        first entry of its owner's; see :func:`_thp_extents`), whose pages already map the
        owner's frames, by one PMD, as fork leaves a child: where the owner's extent is a
        THP mapped by PMD in the engine and the child's extent is 2 MiB-aligned (else its
        pages stay mapped by PTE, as after a split)."""
        for c, o in forked.tolist():
            if int(self.addr[c]) % HPAGE_PMD_SIZE:
                continue
            src, dst = self.procs[int(self.proc_of[o])], self.procs[int(self.proc_of[c])]
            k = self.kernel
            if isinstance(k, SimKernel):
                assert isinstance(src, SimProcess) and isinstance(dst, SimProcess)
                thp = src.mm.pmds.get(int(self.addr[o]) >> PAGE_SHIFT)
                if thp is not None:
                    k.memory.map_thp_pmd(dst.mm, int(self.addr[c]) >> PAGE_SHIFT, thp)
                continue
            from ksmlab.bulk import thp as bulk_thp

            assert self.engine_row is not None
            ro = int(self.engine_row[o])
            f = int(k.ksm.pages.frame[ro])
            if k.ksm.pages.thp[ro] & bulk_thp.THP_PMD and f >= 0 and k.ksm.frames.thp[f] == f:
                bulk_thp.map_pmd(k.ksm, int(self.engine_row[c]))

    def _share_bulk(self, idx: Ints, owners: Ints) -> None:
        from ksmlab.bulk.columns import NO_FRAME

        k = self.kernel
        assert not isinstance(k, SimKernel) and self.engine_row is not None
        ksm = k.ksm
        src = self.engine_row[owners]
        dst = self.engine_row[idx]
        frames = ksm.pages.frame[src]
        assert bool((ksm.pages.frame[dst] == NO_FRAME).all()) and bool((frames >= 0).all())
        ksm.pages.frame[dst] = frames
        np.add.at(ksm.frames.mapcount, frames, 1)
        ksm.mutations += 1


def _thp_extents(plan: LoadPlan) -> tuple[npt.NDArray[np.bool_], Ints]:
    """The plan's PMD-mapped extents the loader places on 2 MiB boundaries (see the module
    doc): the pages of those that load as THPs (their 512 pages all own their frame: the
    first write faults the THP in), and the fork children's views of those THPs, as rows
    (first entry of the child's extent, first entry of the owner's): all 512 pages map the
    frames of one such extent of another process, page j frame j."""
    own = np.zeros(len(plan), bool)
    idx = np.flatnonzero(plan.pmd).reshape(-1, HPAGE_PMD_NR)
    if not idx.size:
        return own, np.zeros((0, 2), np.int64)
    mine = ~plan.shared[idx].any(axis=1)
    own[idx[mine].ravel()] = True
    owners = plan.owner[idx]
    head = owners[:, 0]
    pid = plan.snapshot.pages.pid[plan.row]
    forked = (~mine & (owners == head[:, None] + np.arange(HPAGE_PMD_NR)).all(axis=1)
              & np.isin(head, idx[mine, 0]) & (pid[head] != pid[idx[:, 0]]))
    return own, np.stack([idx[forked, 0], head[forked]], axis=1).astype(np.int64)


def _layout(area: AreaPlan, pmd: npt.NDArray[np.bool_]) -> tuple[Ints, int, list[tuple[int, int]]]:
    """Where an area's pages go in the model: each page's offset in its mapping (in pages),
    the mapping's length, and the (offset, pages) runs of its THP extents.

    Pages keep their order without the holes between them, but each THP extent starts on
    a multiple of 512 pages and the length is rounded up to one, so that mmap places the
    mapping, and so the extents, on 2 MiB boundaries (see the module doc).
    """
    n = area.pages
    offsets = np.arange(n, dtype=np.int64)
    ext = np.flatnonzero(pmd[area.start:area.start + n])[::HPAGE_PMD_NR]
    if not ext.size:
        return offsets, n, []
    pad = 0
    gaps = np.zeros(n, np.int64)
    runs: list[tuple[int, int]] = []
    for j in ext.tolist():  # one step per extent; the pages move by arrays below
        gap = -(j + pad) % HPAGE_PMD_NR
        gaps[j] = gap
        pad += gap
        off = j + pad
        if runs and runs[-1][0] + runs[-1][1] == off:
            runs[-1] = (runs[-1][0], runs[-1][1] + HPAGE_PMD_NR)
        else:
            runs.append((off, HPAGE_PMD_NR))
    offsets += np.cumsum(gaps)
    length = int(offsets[-1]) + 1
    return offsets, length + -length % HPAGE_PMD_NR, runs


def write_knobs(k: SimKernel | BulkKernel, knobs: dict[str, str]) -> None:
    """Write *knobs* (all but ``run``) in the kernel's safe order, skipping equal values."""
    sysfs = k.sysfs
    for name in WRITE_ORDER:
        if name == "run" or name not in knobs or name not in sysfs:
            continue
        if name == "pages_to_scan" and read_knob(sysfs["advisor_mode"]) == "scan-time":
            continue  # the advisor sets it (a write is refused, EINVAL)
        if read_knob(sysfs[name]) != read_knob(knobs[name]):
            sysfs[name] = knobs[name]


def _premerge(m: Machine) -> None:
    """Merge the capture's KSM pages again, with ksmd at full speed, then stop it."""
    k = m.kernel
    idx = np.flatnonzero(m.plan.ksm).astype(np.int64)
    m.write_pages(idx)
    sysfs = k.sysfs
    saved = {n: str(read_knob(sysfs[n])) for n in ("advisor_mode", "pages_to_scan",
                                                     "sleep_millisecs")}
    sysfs["advisor_mode"] = "none"
    sysfs["pages_to_scan"] = str(max(100, int(idx.size)))
    sysfs["sleep_millisecs"] = "0"
    sysfs["run"] = "1"
    k.wait_full_scans(PREMERGE_SCANS)
    sysfs["run"] = "0"
    write_knobs(k, saved)


def load_machine(plan: LoadPlan, engine: EngineName, knobs: dict[str, str], *,
                 seed: int = 0, progress: Progress | None = None,
                 cost: KsmdCost | None = None) -> Machine:
    """A machine of *engine* holding *plan*'s pages, ksmd stopped, *knobs* written (see the
    module doc).  Raises OSError if the engine refuses a knob (the caller checked them)."""
    n = len(plan)
    if engine == "sim":
        kernel: SimKernel | BulkKernel = SimKernel(trace=False, content="fingerprint", cost=cost)
    else:
        from ksmlab.bulk import BulkKernel
        from ksmlab.bulk.content import ZERO_CONTENT

        kernel = BulkKernel(seed=seed, cost=cost)
        kernel.reserve(pages=n, frames=n, contents=plan.n_contents + 1)
    write_knobs(kernel, knobs)
    m = Machine(kernel, engine, plan, [], np.zeros(n, np.int32), np.zeros(n, np.uint64))
    if engine == "bulk":
        m.engine_row = np.zeros(n, np.int64)
        assert not isinstance(kernel, SimKernel)
        ids = kernel.contents.fresh(plan.n_contents)
        ids[np.unique(plan.content[plan.zero])] = ZERO_CONTENT  # the engine's zero-filled page
        m.bulk_ids = ids
    merge_any = plan.snapshot.policy == "merge-any"
    own_thp, forked = _thp_extents(plan)
    pmd = own_thp.copy()  # the extents placed on 2 MiB boundaries and advised MADV_HUGEPAGE
    for c in forked[:, 0].tolist():
        pmd[c:c + HPAGE_PMD_NR] = True
    for pi, pp in enumerate(plan.processes):
        p = kernel.spawn()
        m.procs.append(p)
        if merge_any:
            p.prctl(PR_SET_MEMORY_MERGE, 1)
        # Mappings go top-down: map the highest area first so addresses keep their order.
        for area in reversed(pp.areas):
            if not area.pages:
                continue
            offsets, length, huge = _layout(area, pmd)
            a = p.mmap(length * PAGE_SIZE)
            sl = slice(area.start, area.start + area.pages)
            m.proc_of[sl] = pi
            m.addr[sl] = np.uint64(a) + offsets.astype(np.uint64) * np.uint64(PAGE_SIZE)
            if m.engine_row is not None:
                from ksmlab.bulk import BulkProcess

                assert isinstance(p, BulkProcess)
                seg = next(s for s in p.mm.segments if s.addr == a)
                m.engine_row[sl] = seg.row + offsets
            if not merge_any and area.mergeable:
                p.madvise(a, length * PAGE_SIZE, MADV_MERGEABLE)
            if a % HPAGE_PMD_SIZE == 0:  # else its THPs load as small pages
                for off, pages in huge:
                    p.madvise(a + off * PAGE_SIZE, pages * PAGE_SIZE, MADV_HUGEPAGE)
    if bool(plan.ksm.any()):
        _premerge(m)
    own = np.flatnonzero(~plan.ksm & ~plan.shared).astype(np.int64)
    step = 1 << 16
    for s in range(0, own.size, step):
        m.write_pages(own[s:s + step])
        if progress is not None:
            progress(min(s + step, own.size), n)
    m.share_frames(np.flatnonzero(plan.shared).astype(np.int64))
    m.map_forked_thps(forked)
    if progress is not None:
        progress(n, n)
    return m

