"""Transparent huge pages in the bulk engine's columns (the rules of docs/bulk.md, "THP").

Only THP mode ``madvise`` is modelled (this machine's, and the common
default): a THP is allocated on a write fault in a VM_HUGEPAGE area, never
otherwise.  The state is two columns:

* ``PageCols.thp``: per page, the vma's VM_HUGEPAGE / VM_NOHUGEPAGE bits
  (``THP_HUGE``, ``THP_NOHUGE``) and ``THP_PMD``: this mm maps the page's
  2 MiB extent with one PMD;
* ``FrameCols.thp``: per frame, the first of the 512 consecutive frames of its
  THP, or -1.

A page is *PMD-mapped* when its ``THP_PMD`` bit is set and its frame's THP
still exists.  So splitting a THP (a KSM merge attempt) is one write of 512
frame entries, whatever maps it: every mm that mapped it by PMD maps its
pages by PTE from then on, as the kernel's ``split_huge_page`` leaves them.
While a page is PMD-mapped its extent's rows are consecutive and map the
THP's frames in order, so the extent's first row is ``row - (frame - head)``.
"""

from __future__ import annotations

from bisect import bisect_right
from itertools import pairwise
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from ksmlab.bulk.columns import NO_FRAME
from ksmlab.bulk.content import ZERO_CONTENT
from ksmlab.constants import HPAGE_PMD_NR, HPAGE_PMD_SIZE
from ksmlab.errors import vm_bug_on

if TYPE_CHECKING:
    from ksmlab.bulk.engine import BulkKsm
    from ksmlab.bulk.mm import BulkMm

Ints = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]

THP_HUGE = 1
"""``PageCols.thp`` bit: the page's vma carries VM_HUGEPAGE (MADV_HUGEPAGE)."""
THP_NOHUGE = 2
"""``PageCols.thp`` bit: the page's vma carries VM_NOHUGEPAGE (MADV_NOHUGEPAGE)."""
THP_PMD = 4
"""``PageCols.thp`` bit: this mm maps the page's extent by one PMD (while its THP exists)."""
HPAGE_MASK = ~(HPAGE_PMD_SIZE - 1)

_SPAN = np.arange(HPAGE_PMD_NR, dtype=np.int64)


def pmd_mapped(ksm: BulkKsm, rows: Ints | slice, frames: npt.NDArray[np.integer]) -> Bools:
    """Which of the pages *rows* (mapping *frames*) are PMD-mapped in their mm now."""
    pmd: Bools = (ksm.pages.thp[rows] & THP_PMD) != 0
    if not bool(pmd.any()):
        return pmd
    f = np.where(frames >= 0, frames, 0)
    out: Bools = pmd & (frames >= 0) & (ksm.frames.thp[f] >= 0)
    return out


def split_thps(ksm: BulkKsm, frames: npt.NDArray[np.integer], triggers: Ints | int) -> None:
    """Split the THPs of *frames* (a KSM merge attempt on them: ``try_to_merge_one_page``
    splits a large folio first), each once, counted in ``work.thp_splits``.

    *triggers* are the scanned pages' rows whose merge attempt this is (one per
    frame, or one for all).  During a vectorised step (``ksm.split_log`` set) the
    splits wait in the log until :func:`end_step`: the step handles pages out of
    scan order, and each THP is split by the first of them in scan order.
    """
    if not ksm.thps:
        return
    fr = np.asarray(frames, dtype=np.int64)
    trig = np.broadcast_to(np.asarray(triggers, dtype=np.int64), fr.shape)
    ok = fr >= 0
    heads = np.full(fr.shape, -1, np.int64)
    heads[ok] = ksm.frames.thp[fr[ok]]
    sel = heads >= 0
    if not bool(sel.any()):
        return
    if ksm.split_log is not None:
        ksm.split_log.append((heads[sel], trig[sel]))
        return
    _split(ksm, np.unique(heads[sel]))


def _split(ksm: BulkKsm, heads: Ints) -> None:
    """Split the THPs *heads* (distinct, all unsplit)."""
    ksm.work.thp_splits += len(heads)
    ksm.frames.thp[(heads[:, None] + _SPAN).ravel()] = -1


def end_step(ksm: BulkKsm, rows: Ints, pmd0: Bools, heads0: Ints) -> int:
    """Split the THPs the step's log holds and return how many of the visited pages
    *rows* (ascending: scan order) the walk reached through a PTE, given which were
    PMD-mapped before the step (*pmd0*, their THPs *heads0*): a page is, when a page
    before it split its THP."""
    log = ksm.split_log or []
    pmd_rows = rows[pmd0]
    if not log:
        return len(rows) - len(pmd_rows)
    heads = np.concatenate([h for h, _t in log])
    trig = np.concatenate([t for _h, t in log])
    order = np.lexsort((trig, heads))  # per THP, its first trigger in scan order
    heads, trig = heads[order], trig[order]
    first = np.r_[True, heads[1:] != heads[:-1]]
    heads, trig = heads[first], trig[first]
    _split(ksm, heads)
    i = np.minimum(np.searchsorted(heads, heads0), len(heads) - 1)
    split = (heads[i] == heads0) & (trig[i] < pmd_rows)
    return len(rows) - (len(pmd_rows) - int(np.count_nonzero(split)))


def _uniform_vma(ksm: BulkKsm, mm: BulkMm, start: int, r0: int) -> bool:
    """Whether the 512 consecutive rows from *r0*, mapped at *start*, are one vma's: one
    protection, mergeable mark, THP bits and NUMA policy (else a vma boundary lies inside)."""
    segs = mm.segments
    i = bisect_right(segs, start, key=lambda s: s.end)
    end = start + HPAGE_PMD_SIZE
    prots = set()
    while i < len(segs) and segs[i].addr < end:
        prots.add(segs[i].prot)
        i += 1
    if len(prots) != 1:
        return False
    sl = slice(r0, r0 + HPAGE_PMD_NR)
    pages = ksm.pages
    flags = pages.thp[sl] & (THP_HUGE | THP_NOHUGE)
    if not bool((flags == THP_HUGE).all()):
        return False
    merge = pages.mergeable[sl]
    if bool(merge.any()) and not bool(merge.all()):
        return False
    return not (ksm.numa_nodes > 1 and bool((pages.nid[sl] != pages.nid[r0]).any()))


def fault(ksm: BulkKsm, mm: BulkMm, addrs: Ints, rows: Ints) -> None:
    """Rule 2 for writes at *addrs* (rows *rows*) of *mm*: a write fault in a VM_HUGEPAGE
    area whose aligned 2 MiB extent lies in one vma with no page present allocates a
    THP: its 512 zero-filled frames, PMD-mapped (the write then stores in place)."""
    pages, frames = ksm.pages, ksm.frames
    cand = (pages.frame[rows] == NO_FRAME) & ((pages.thp[rows] & (THP_HUGE | THP_NOHUGE))
                                              == THP_HUGE)
    if not bool(cand.any()):
        return
    for start in np.unique(addrs[cand] & HPAGE_MASK).tolist():
        pieces, hole = mm.pieces(start, start + HPAGE_PMD_SIZE)
        if hole or any(b[1] != a[1] + a[2] for a, b in pairwise(pieces)):
            continue  # not wholly mapped, or by rows of different mappings
        r0 = pieces[0][1]
        sl = slice(r0, r0 + HPAGE_PMD_NR)
        if bool((pages.frame[sl] != NO_FRAME).any()) or not _uniform_vma(ksm, mm, start, r0):
            continue
        first = frames.append(HPAGE_PMD_NR)
        fsl = slice(first, first + HPAGE_PMD_NR)
        frames.content[fsl] = ZERO_CONTENT
        frames.mapcount[fsl] = 1
        frames.thp[fsl] = first
        if ksm.numa_nodes > 1:
            frames.nid[fsl] = pages.nid[r0]
        pages.frame[sl] = np.arange(first, first + HPAGE_PMD_NR, dtype=np.int32)
        pages.thp[sl] |= THP_PMD
        ksm.thps += 1


def map_pmd(ksm: BulkKsm, r0: int) -> None:
    """Map the 512 rows from *r0* (one vma's, at a 2 MiB-aligned extent, already mapping a
    THP's frames in order, with their mapcounts) by one PMD, as fork's ``copy_huge_pmd``
    leaves a child (fork copies the bits with its rows; ksmlab.estimate's loader, whose
    fork child of a snapshot is not at its parent's addresses, calls this)."""
    sl = slice(r0, r0 + HPAGE_PMD_NR)
    f = ksm.pages.frame[sl].astype(np.int64)
    head = int(ksm.frames.thp[f[0]]) if f[0] >= 0 else -1
    vm_bug_on(head != f[0] or bool((f != head + _SPAN).any()),
              f"bulk: rows {r0}.. do not map one THP's frames in order")
    ksm.pages.thp[sl] |= THP_PMD
    ksm.mutations += 1


def cow_split(ksm: BulkKsm, rows: Ints) -> None:
    """Rule 4 for writes at *rows*: where the writer maps a THP by PMD and another mm maps
    it too (some frame of it mapped twice), the writer's PMD is split (its pages stay,
    mapped by PTE); the other mms keep theirs.  The write itself is then as for a small page."""
    if not ksm.thps:
        return
    f = ksm.pages.frame[rows].astype(np.int64)
    pmd = pmd_mapped(ksm, rows, f)
    if not bool(pmd.any()):
        return
    rows, f = rows[pmd], f[pmd]
    heads = ksm.frames.thp[f].astype(np.int64)
    first_rows = rows - (f - heads)
    ur, at = np.unique(first_rows, return_index=True)  # each extent once (its THP: heads[at])
    shared = ksm.frames.mapcount[(heads[at][:, None] + _SPAN)].max(axis=1) > 1
    for r0 in ur[shared].tolist():
        ksm.pages.thp[r0:r0 + HPAGE_PMD_NR] &= 0xFF ^ THP_PMD


def split_pmd_at(ksm: BulkKsm, mm: BulkMm, addr: int) -> None:
    """Rule 5: a vma boundary made at *addr* strictly inside a 2 MiB extent splits this mm's
    PMD mapping of it (its pages stay, mapped by PTE)."""
    if not ksm.thps or not addr & ~HPAGE_MASK:
        return
    start = addr & HPAGE_MASK
    pieces, _hole = mm.pieces(start, start + HPAGE_PMD_SIZE)
    for _a, r, n in pieces:
        ksm.pages.thp[r:r + n] &= 0xFF ^ THP_PMD
