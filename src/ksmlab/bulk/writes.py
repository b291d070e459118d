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
from ksmlab.bulk.content import NEW_CONTENT
from ksmlab.constants import PAGE_SHIFT, PAGE_SIZE, PROT_WRITE, TASK_SIZE
from ksmlab.errors import kernel_error

if TYPE_CHECKING:
    from ksmlab.bulk.engine import BulkKsm
    from ksmlab.bulk.kernel import BulkKernel

Ints = npt.NDArray[np.int64]


def store_pages(ksm: BulkKsm, rows: Ints, cids: Ints) -> None:
    """Write content ``cids[i]`` to page row ``rows[i]``, for each i in order (rows may
    repeat), with the faults and copy-on-write of each write (see the module doc).
    ``NEW_CONTENT`` (-1) is new random data (see :data:`ksmlab.bulk.content.NEW_CONTENT`).

    The caller has checked the rows (mapped pages) and the ids (known contents, or -1).
    """
    if not len(rows):
        return
    explicit = cids[cids >= 0]
    if bool(ksm.contents.unique[explicit].any()):
        # A unique content written to another page: it is unique no more, from that write
        # on, which the step below cannot order.  (Nothing in ksmlab writes such ids.)
        for r, c in zip(rows.tolist(), cids.tolist(), strict=True):
            if c >= 0:
                ksm.contents.unique[c] = False
            store_pages(ksm, np.array([r]), np.array([c]))
        return
    pages, frames = ksm.pages, ksm.frames
    # The writes grouped by row, each row's in write order: one sort of (row, index) keys.
    n = len(rows)
    if int(rows.max()) < 1 << 31 and n < 1 << 32:
        keys = np.sort((rows << 32) | np.arange(n, dtype=np.int64))
        order, by_row = keys & 0xFFFFFFFF, keys >> 32
    else:  # a machine of more than 8 TiB of pages
        order = np.argsort(rows, kind="stable")
        by_row = rows[order]
    starts = np.r_[True, by_row[1:] != by_row[:-1]]
    if bool(starts.all()):
        f = pages.frame[rows].astype(np.int64)
        fm = np.maximum(f, 0)
        if bool(((f >= 0) & (frames.knode[fm] < 0) & (frames.mapcount[fm] == 1)).all()):
            _write_own_frames(ksm, f, cids)  # the common case of churn
            return
    ends = np.r_[starts[1:], True]
    first = order[starts]
    # The distinct rows in the order of their first write (first positions are distinct).
    slot = np.full(n, -1, np.int64)
    slot[first] = np.arange(len(first))
    seq = slot[slot >= 0]
    urows = by_row[starts][seq]
    f = pages.frame[urows].astype(np.int64)
    mapped = f >= 0
    fm = np.where(mapped, f, 0)
    knode = np.where(mapped, frames.knode[fm], -1)
    ordinary = mapped & (knode < 0)
    # Rank of each writer among the writers of its frame, in first-write order (1-based):
    # only frames that several pages map (fork) can have more than one.
    mapcount = frames.mapcount[fm]
    rank = np.ones(len(urows), np.int64)
    shared = ordinary & (mapcount > 1)
    if bool(shared.any()):
        idx = np.flatnonzero(shared)
        fo = f[idx]
        o = np.argsort(fo, kind="stable")
        sf = fo[o]
        group_start = np.flatnonzero(np.r_[True, sf[1:] != sf[:-1]])
        pos = np.arange(len(sf)) - np.repeat(group_start, np.diff(np.r_[group_start, len(sf)]))
        rank[idx[o]] = pos + 1
    in_place = ordinary & (rank == mapcount)
    if bool((cids < 0).any()):
        # in_place and the old content, by row in the grouped order.
        back = np.empty(len(urows), np.int64)
        back[seq] = np.arange(len(urows))
        row_of = np.cumsum(starts) - 1  # each grouped write's distinct row (grouped order)
        g_in_place = in_place[back][row_of]
        g_old = frames.content[fm][back][row_of].astype(np.int64)
        cids = _name_new(ksm, order, starts, cids, g_in_place, g_old)
    final = cids[order[ends]][seq]
    ksm.sync_contents()
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
    pages.frame[urows[copy]] = ksm.new_frames(final[copy], urows[copy])


def _write_own_frames(ksm: BulkKsm, f: Ints, cids: Ints) -> None:
    """store_pages when every row is written once and its frame is its own (mapped once,
    not a KSM page): every write is in place, and a NEW one to a frame holding a unique
    content changes that content (see :func:`_name_new`)."""
    ksm.frames.content[f] = name_new_distinct(ksm, f, np.ones(len(f), np.bool_), cids)


def name_new_distinct(ksm: BulkKsm, f: Ints, in_place: npt.NDArray[np.bool_], cids: Ints) -> Ints:
    """*cids* with each NEW_CONTENT named, for writes to distinct rows whose frames are *f*
    (*in_place*: the write finds the frame its own): in place on a unique content, that
    content (with a new checksum), else a fresh unique one; one checksum drawn per NEW
    write, in write order, as writing them one by one does (see :func:`_name_new`)."""
    new = cids < 0
    if not bool(new.any()):
        return cids
    table = ksm.contents
    old = ksm.frames.content[np.maximum(f[new], 0)].astype(np.int64)
    reuse = in_place[new] & table.unique[old]
    draws = table.draw(len(old))
    named = old.copy()
    named[~reuse] = table.add(draws[~reuse], unique=True)
    table.checksum[old[reuse]] = draws[reuse]  # distinct frames: distinct contents
    out = cids.copy()
    out[new] = named
    ksm.sync_contents()
    return out


def _name_new(ksm: BulkKsm, order: Ints, starts: npt.NDArray[np.bool_], cids: Ints,
              in_place: npt.NDArray[np.bool_], old: Ints) -> Ints:
    """*cids* with each NEW_CONTENT named as writing them in turn would name it.

    A NEW write to a page whose frame is its own and holds a unique content
    changes that content in place (a new checksum); any other gets a fresh
    unique content.  Each NEW write draws one checksum, in write order, as one
    by one.  *order* groups the writes by row (each row's in write order),
    *starts* marks each row's first write there, *in_place* and *old* say, per
    grouped write, whether its row's first write is in place and the frame's
    content before it.
    """
    table = ksm.contents
    c = cids[order]
    new = c < 0
    prev_new = np.r_[False, new[:-1]]
    # A row's first write: its frame's content, if the frame is its own and it is unique;
    # a later one: the content the previous write left, unique if that write was NEW.
    reuse = new & np.where(starts, in_place & table.unique[np.maximum(old, 0)], prev_new)
    fresh = new & ~reuse
    # Checksums drawn in write order, one per NEW write; fresh ids numbered in write order.
    is_new = cids < 0
    rank = np.cumsum(is_new) - 1  # per write (write order): its draw
    draws = table.draw(int(np.count_nonzero(is_new)))
    fresh_w = np.zeros(len(cids), np.bool_)
    fresh_w[order[fresh]] = True
    ids = table.add(draws[rank[fresh_w]], unique=True)
    named = cids.copy()
    named[fresh_w] = ids
    # A reused content is the one the row held: carry it forward within each row.
    g = named[order]
    g[reuse & starts] = old[reuse & starts]
    have = np.where(g >= 0, np.arange(len(g)), 0)
    g = g[np.maximum.accumulate(have)]
    named[order] = g
    # A reused content's checksum: the draw of the last NEW write that named it.  One row
    # names it, in a run of consecutive writes there (in the grouped order): the run's end.
    run_end = np.r_[(g[1:] != g[:-1]) | starts[1:], True]
    last = reuse & run_end
    if bool(last.any()):
        table.checksum[g[last]] = draws[rank[order[last]]]
    return named


def rows_of(spaces: list[list[tuple[int, int, int]]], which: Ints, addrs: Ints) -> Ints:
    """Page rows of the page addresses *addrs*, each in address space ``spaces[which[i]]``
    (its segments ``(addr, first row, pages)`` sorted by address); -1 where nothing is
    mapped.  One search for all: segments are keyed by (space, address)."""
    segs = [(i, *seg) for i, space in enumerate(spaces) for seg in space]
    if not segs:
        return np.full(len(addrs), -1, np.int64)
    seg = np.array(segs, dtype=np.int64)
    key = (seg[:, 0] << _SPACE_SHIFT) | seg[:, 1]  # addresses are below 2**47
    j = np.searchsorted(key, (which << _SPACE_SHIFT) | addrs, side="right") - 1
    jc = np.maximum(j, 0)
    page = (addrs - seg[jc, 1]) >> PAGE_SHIFT
    ok = (j >= 0) & (seg[jc, 0] == which) & (page >= 0) & (page < seg[jc, 3])
    return np.where(ok, seg[jc, 2] + page, -1)


_SPACE_SHIFT = 48


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
        return values.astype(np.int64, copy=False)
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


def _distinct(values: Ints) -> tuple[Ints, Ints]:
    """``np.unique(values, return_inverse=True)``, without a sort when the values are
    close together (pids are)."""
    if not len(values):
        return values, values
    lo, hi = int(values.min()), int(values.max())
    if hi - lo > 1 << 16:
        distinct, inverse = np.unique(values, return_inverse=True)
        return distinct, inverse.astype(np.int64)
    present = np.flatnonzero(np.bincount(values - lo)) + lo
    lut = np.zeros(hi - lo + 1, np.int64)
    lut[present - lo] = np.arange(len(present))
    return present, lut[values - lo]


def checked_writes(k: BulkKernel, pids: object, addrs: object, cids: object) -> tuple[Ints, Ints]:
    """The page rows and content ids of ``BulkKernel.write_pages``'s arguments, checked
    in its order (see there); nothing is changed."""
    p, a, c = int_vector("pids", pids), int_vector("addrs", addrs), int_vector("cids", cids)
    if not len(p) == len(a) == len(c):
        raise ValueError(f"pids, addrs and cids must have one length, got {len(p)}, {len(a)} "
                         f"and {len(c)}")
    if len(c) and (int(c.min()) < NEW_CONTENT or int(c.max()) >= len(k.contents)):
        raise ValueError(f"cids must be content ids of this kernel's ContentTable "
                         f"(0 <= id < {len(k.contents)}), or NEW_CONTENT ({NEW_CONTENT}), "
                         f"got {argcheck.describe(cids)}")
    bad = a[(a & (PAGE_SIZE - 1) != 0) | (a < 0) | (a >= TASK_SIZE)]
    if len(bad):
        raise ValueError(f"addrs must be page-aligned user addresses, got {int(bad[0]):#x}")
    distinct, which = _distinct(p)
    spaces = []
    for pid in distinct.tolist():
        proc = k.processes.get(pid)
        if proc is None:
            raise ValueError(f"pids must be live processes of this kernel, got {pid}")
        # A write to a page without PROT_WRITE is EFAULT, as write_contents's: only
        # writable segments are searched.
        spaces.append([(s.addr, s.row, s.pages) for s in proc.mm.segments
                       if s.prot & PROT_WRITE])
    rows = rows_of(spaces, which.astype(np.int64), a)
    hole = np.flatnonzero(rows < 0)
    if len(hole):
        i = int(hole[0])
        raise kernel_error(errno.EFAULT, f"page {int(a[i]):#x} of process {int(p[i])} is not "
                                         f"mapped and writable")
    return rows, c


__all__ = ["checked_writes", "int_vector", "name_new_distinct", "rows_of", "store_pages"]
