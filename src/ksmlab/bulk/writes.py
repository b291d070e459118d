"""Many whole-page writes as one array step: the churn between two ksmd batches.

A scenario's write activities make thousands of single-page writes between
two ksmd batches, in many processes.  Nothing observes the machine between
them, so they can be applied at once, provided the state afterwards is the
one that writing them one by one (``BulkProcess._write_one``) leaves:

* a page written several times holds the content of its last write; only its
  first write can fault, later ones find an exclusive ordinary page and write
  in place;
* at a page's first write, a KSM page (or the KSM zero page, or no page) is
  replaced by a new frame (copy-on-write); an ordinary frame mapped once is
  written in place; an ordinary frame that *m* pages map (after fork) is
  copied for the first *m - 1* of them to write, in order, and the *m*-th
  writes in place, its mapcount being 1 by then;
* new frames are numbered in the order of the writes that allocate them, and
  a KSM page whose last mapping went puts its node back in its chain's open
  set (``BulkKsm.reopen``), as the one-by-one path does.

:func:`store_pages` is that; ``tests/test_churn.py`` checks it against the
one-by-one path, whole state, on random writes to forked, merged and zero pages.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from ksmlab import argcheck
from ksmlab.constants import PAGE_SHIFT, PAGE_SIZE
from ksmlab.errors import kernel_error

if TYPE_CHECKING:
    from ksmlab.bulk.engine import BulkKsm
    from ksmlab.bulk.kernel import BulkKernel

Ints = npt.NDArray[np.int64]


def store_pages(ksm: BulkKsm, rows: Ints, cids: Ints) -> None:
    """Write content ``cids[i]`` to page row ``rows[i]``, for each i in order (rows may
    repeat), with the faults and copy-on-write of each write (see the module doc).

    The caller has checked the rows (mapped pages) and the ids (known contents).
    """
    if not len(rows):
        return
    ksm.sync_contents()
    pages, frames = ksm.pages, ksm.frames
    # Each distinct row: where its first write is, and the content of its last.
    order = np.argsort(rows, kind="stable")
    by_row = rows[order]
    starts = np.r_[True, by_row[1:] != by_row[:-1]]
    ends = np.r_[by_row[1:] != by_row[:-1], True]
    first = order[starts]
    final = cids[order[ends]]
    # The distinct rows in the order of their first write.
    seq = np.argsort(first, kind="stable")
    urows, final = by_row[starts][seq], final[seq]
    f = pages.frame[urows]
    mapped = f >= 0
    fm = np.where(mapped, f, 0)
    knode = np.where(mapped, frames.knode[fm], -1)
    ordinary = mapped & (knode < 0)
    # Rank of each writer among the writers of its frame, in first-write order (1-based).
    rank = np.zeros(len(urows), np.int64)
    if bool(ordinary.any()):
        idx = np.flatnonzero(ordinary)
        fo = f[idx]
        o = np.argsort(fo, kind="stable")
        sf = fo[o]
        group_start = np.flatnonzero(np.r_[True, sf[1:] != sf[:-1]])
        pos = np.arange(len(sf)) - np.repeat(group_start, np.diff(np.r_[group_start, len(sf)]))
        rank[idx[o]] = pos + 1
    in_place = ordinary & (rank == frames.mapcount[fm])
    copy = ~in_place
    # In-place writes: the frame takes the last content written.
    frames.content[f[in_place]] = final[in_place]
    # Copies: the old frame loses a mapping (a KSM page: a COW fault each, and its node
    # goes back to its chain's open set once nothing maps it).
    ksm.cow_ksm += int(np.count_nonzero(knode[copy] >= 0))
    ksm.tally.zero_mapped(f[copy], -1)
    np.subtract.at(frames.mapcount, f[copy & mapped], 1)
    kcopy = copy & (knode >= 0)
    if bool(kcopy.any()):
        gone = frames.mapcount[f[kcopy]] == 0
        if bool(gone.any()):
            ksm.reopen(np.unique(knode[kcopy][gone]).tolist())
    pages.frame[urows[copy]] = ksm.new_frames(final[copy])


def rows_of(segments: list[tuple[int, int, int]], addrs: Ints) -> Ints:
    """Page rows of the page addresses *addrs* in an address space of *segments*
    ``(addr, first row, pages)`` sorted by address; -1 where nothing is mapped."""
    if not segments:
        return np.full(len(addrs), -1, np.int64)
    seg = np.array(segments, dtype=np.int64)
    i = np.searchsorted(seg[:, 0], addrs, side="right") - 1
    ok = i >= 0
    ic = np.maximum(i, 0)
    page = (addrs - seg[ic, 0]) >> PAGE_SHIFT
    ok &= page < seg[ic, 2]
    return np.where(ok, seg[ic, 1] + page, -1)


def int_vector(name: str, values: object) -> Ints:
    """*values* (a flat sequence or array of ints) as an int64 array; TypeError naming
    *name* otherwise, ValueError for an int outside int64."""
    def bad(what: str) -> TypeError:
        return TypeError(f"{name} must be a flat sequence of ints, not {what}: "
                         f"{argcheck.describe(values)}")
    if isinstance(values, np.ndarray):
        if values.ndim != 1 or (values.size and values.dtype.kind not in "iu"):
            raise bad(f"a {values.ndim}-dimensional array of {values.dtype}")
        if values.dtype == np.uint64 and values.size and int(values.max()) > np.iinfo(np.int64).max:
            raise ValueError(f"{name} holds an int past 2**63 - 1: {argcheck.describe(values)}")
        return values.astype(np.int64)
    if isinstance(values, str | bytes | bytearray | memoryview) or not isinstance(values, list
                                                                                   | tuple):
        raise bad(type(values).__name__)
    out: list[int] = []
    for i, x in enumerate(values):
        try:
            out.append(argcheck.integer(name, x))
        except TypeError:
            raise bad(f"one holding {type(x).__name__} {argcheck.describe(x)} at index {i}") from None
    try:
        return np.array(out, dtype=np.int64)
    except OverflowError:
        raise ValueError(f"{name} holds an int outside int64: {argcheck.describe(values)}") from None


def checked_writes(k: BulkKernel, pids: object, addrs: object, cids: object) -> tuple[Ints, Ints]:
    """The page rows and content ids of ``BulkKernel.write_pages``'s arguments, checked
    in its order (see there); nothing is changed."""
    p, a, c = int_vector("pids", pids), int_vector("addrs", addrs), int_vector("cids", cids)
    if not len(p) == len(a) == len(c):
        raise ValueError(f"pids, addrs and cids must have one length, got {len(p)}, {len(a)} "
                         f"and {len(c)}")
    if len(c) and (int(c.min()) < 0 or int(c.max()) >= len(k.contents)):
        raise ValueError(f"cids must be content ids of this kernel's ContentTable "
                         f"(0 <= id < {len(k.contents)}), got {argcheck.describe(cids)}")
    bad = a[(a % PAGE_SIZE != 0) | (a < 0)]
    if len(bad):
        raise ValueError(f"addrs must be page-aligned addresses, got {int(bad[0]):#x}")
    rows = np.full(len(a), -1, np.int64)
    for pid in np.unique(p).tolist():
        proc = k.processes.get(pid)
        if proc is None:
            raise ValueError(f"pids must be live processes of this kernel, got {pid}")
        mine = p == pid
        rows[mine] = rows_of([(s.addr, s.row, s.pages) for s in proc.mm.segments], a[mine])
    hole = np.flatnonzero(rows < 0)
    if len(hole):
        i = int(hole[0])
        raise kernel_error(errno.EFAULT, f"page {int(a[i]):#x} of process {int(p[i])} is not "
                                         f"mapped")
    return rows, c


__all__ = ["checked_writes", "int_vector", "rows_of", "store_pages"]
