"""Growable numpy columns: the bulk engine's pages, frames, contents and stable nodes.

Every table is a set of same-length numpy arrays, one per field, that grow
together by doubling.  A row index is the object's identity (a page, a frame,
a stable node); rows are never reused, so an index stays valid for the life
of the engine.  Fields only a machine of several NUMA nodes needs (``nid``)
exist only in its tables, so a one-node machine pays nothing for them.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

ABSENT, NONE, UNSTABLE, STABLE = 0, 1, 2, 3
"""Page ``state``: no rmap_item; an item in no tree; in the unstable tree; in the stable tree."""

NO_FRAME = -1
"""``PageCols.frame`` of a page with no page-table entry."""
KSM_ZERO = -2
"""``PageCols.frame`` of a page KSM mapped to the zero page (use_zero_pages)."""

STABLE_NONE = -1
"""``ContentCols.stable``: no stable node has this content."""
STABLE_CHAIN = -2
"""``ContentCols.stable`` values up to this one name a chain: chain ``STABLE_CHAIN - stable``."""


class _Table:
    """Arrays of one length, growing together; subclasses declare ``FIELDS``, and
    ``NUMA_FIELDS``, which only tables made with ``numa=True`` have."""

    FIELDS: ClassVar[dict[str, tuple[Any, int]]] = {}
    NUMA_FIELDS: ClassVar[dict[str, tuple[Any, int]]] = {}

    def __init__(self, capacity: int = 1024, *, numa: bool = False) -> None:
        self.n = 0
        self.fields = {**self.FIELDS, **self.NUMA_FIELDS} if numa else self.FIELDS
        for name, (dtype, fill) in self.fields.items():
            setattr(self, name, np.full(capacity, fill, dtype))

    @property
    def capacity(self) -> int:
        """Rows the arrays can hold before they grow."""
        return len(getattr(self, next(iter(self.fields))))

    def reserve(self, rows: int) -> None:
        """Make room for *rows* rows in all, at once (a big machine avoids regrowing)."""
        if rows <= self.capacity:
            return
        # Every array first, then the swap: a MemoryError leaves the table as it was.
        # np.empty, then each part written once (np.full would write the copied part twice).
        grown = {name: np.empty(rows, dtype) for name, (dtype, _fill) in self.fields.items()}
        for name, new in grown.items():
            new[:self.n] = getattr(self, name)[:self.n]
            new[self.n:] = self.fields[name][1]
            setattr(self, name, new)

    def append(self, count: int) -> int:
        """Add *count* rows (holding each field's fill value); return the first index.

        Arrays grow by a quarter at least: at most 25% unused capacity, which
        matters at a billion rows, for a constant amortised copying cost.
        """
        first = self.n
        if first + count > self.capacity:
            self.reserve(max(first + count, self.capacity + self.capacity // 4))
        self.n = first + count
        return first

    def nbytes(self) -> int:
        """Bytes held by the arrays (capacity, not only used rows)."""
        return sum(int(getattr(self, name).nbytes) for name in self.fields)


class PageCols(_Table):
    """One row per virtual page of every process, with its rmap_item.

    Attributes:
        frame: frame mapped here, NO_FRAME, or KSM_ZERO.
        mergeable: the page's vma carries VM_MERGEABLE.
        state: rmap_item state (ABSENT, NONE, UNSTABLE, STABLE).  A STABLE item
            whose ``head`` is no longer alive is in no tree (its stale node was
            removed; the kernel clears each item, the engine lets the node's
            ``alive`` flag speak for all of them).
        seqnr: when UNSTABLE, ``full_scans & 0xff`` at insertion; the item is in
            the current unstable tree only if this equals the current value.
        oldsum: checksum at the previous visit (``rmap_item->oldchecksum``).
        age, skips: smart scan's ``age`` and ``remaining_skips``.
        head: when STABLE, the stable node (dup) the item hangs off.
        thp: transparent huge page bits (:mod:`ksmlab.bulk.thp`): the page's vma
            carries VM_HUGEPAGE (``THP_HUGE``) or VM_NOHUGEPAGE (``THP_NOHUGE``), and
            ``THP_PMD``: this mm maps the page's 2 MiB extent with one PMD, which
            holds while the frame's THP exists (``FrameCols.thp``).
        nid: (NUMA machines only) the node the page's mapping allocates on
            (``mmap(node=)``, the vma's policy).
        unid: (NUMA machines only) when UNSTABLE, the node whose unstable tree
            the item went into (``rmap_item->nid``).
    """

    frame: npt.NDArray[np.int32]
    mergeable: npt.NDArray[np.bool_]
    state: npt.NDArray[np.int8]
    seqnr: npt.NDArray[np.uint8]
    oldsum: npt.NDArray[np.uint32]
    age: npt.NDArray[np.uint8]
    skips: npt.NDArray[np.uint8]
    head: npt.NDArray[np.int32]
    thp: npt.NDArray[np.uint8]
    FIELDS: ClassVar[dict[str, tuple[Any, int]]] = {
        "frame": (np.int32, NO_FRAME), "mergeable": (np.bool_, 0), "state": (np.int8, ABSENT),
        "seqnr": (np.uint8, 0), "oldsum": (np.uint32, 0), "age": (np.uint8, 0),
        "skips": (np.uint8, 0), "head": (np.int32, -1), "thp": (np.uint8, 0),
    }
    nid: npt.NDArray[np.int16]
    unid: npt.NDArray[np.int16]
    NUMA_FIELDS: ClassVar[dict[str, tuple[Any, int]]] = {"nid": (np.int16, 0),
                                                          "unid": (np.int16, 0)}


class FrameCols(_Table):
    """One row per physical page ever allocated.

    Attributes:
        content: content id (see :class:`ksmlab.bulk.content.ContentTable`).
        mapcount: page-table entries mapping the frame; 0 means freed.
        knode: stable node of a KSM page, -1 for an ordinary page.
        thp: the first frame of the transparent huge page this frame is one of
            (its 512 frames are consecutive rows), -1 for a small page or once
            the THP was split.
        nid: (NUMA machines only) the node the frame lives on.
    """

    content: npt.NDArray[np.int32]
    mapcount: npt.NDArray[np.int32]
    knode: npt.NDArray[np.int32]
    thp: npt.NDArray[np.int32]
    FIELDS: ClassVar[dict[str, tuple[Any, int]]] = {
        "content": (np.int32, 0), "mapcount": (np.int32, 0), "knode": (np.int32, -1),
        "thp": (np.int32, -1)}
    nid: npt.NDArray[np.int16]
    NUMA_FIELDS: ClassVar[dict[str, tuple[Any, int]]] = {"nid": (np.int16, 0)}


class ContentCols(_Table):
    """One row per content id, for one NUMA node's pair of trees (see ``bulk/trees.py``).

    Attributes:
        uindex: page last inserted into the unstable tree with this content (or
            -1); only valid while that page's item is UNSTABLE with the current
            seqnr and its page still holds this content.
        stable: the stable node for this content: a node index, STABLE_NONE, or
            for a chain ``STABLE_CHAIN - chain id``.
    """

    uindex: npt.NDArray[np.int64]
    stable: npt.NDArray[np.int32]
    FIELDS: ClassVar[dict[str, tuple[Any, int]]] = {"uindex": (np.int64, -1), "stable": (np.int32, STABLE_NONE)}


class NodeCols(_Table):
    """One row per stable node (a regular node or a dup; see ChainCols for chains).

    Attributes:
        count: rmap_items hanging off the node (``rmap_hlist_len``).
        kframe: the KSM page's frame.
        content: its content id.
        alive: still in the stable tree (False once removed as stale).
    """

    count: npt.NDArray[np.int32]
    kframe: npt.NDArray[np.int32]
    content: npt.NDArray[np.int32]
    alive: npt.NDArray[np.bool_]
    FIELDS: ClassVar[dict[str, tuple[Any, int]]] = {
        "count": (np.int32, 0), "kframe": (np.int32, -1), "content": (np.int32, 0),
        "alive": (np.bool_, 0)}


class ChainCols(_Table):
    """One row per stable node chain ever made, mirroring ``BulkKsm.chains`` for vector code.

    Attributes:
        head: the chain's first dup (``dups[0]``), -1 once the chain is gone.
        ndups: number of dups (0 once the chain is gone).
        prune_time: ms of the chain's last full prune (kept here only).
        others_open: open dups other than the head (see ``Chain.open``); when
            0, every other dup is full with its page alive.
    """

    head: npt.NDArray[np.int32]
    ndups: npt.NDArray[np.int32]
    prune_time: npt.NDArray[np.int64]
    others_open: npt.NDArray[np.int32]
    FIELDS: ClassVar[dict[str, tuple[Any, int]]] = {
        "head": (np.int32, -1), "ndups": (np.int32, 0), "prune_time": (np.int64, 0),
        "others_open": (np.int32, 0)}
