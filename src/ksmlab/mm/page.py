"""Physical page frames and the allocator that hands them out.

A :class:`Frame` is one 4 KiB page of simulated RAM.  Its content is an
immutable ``bytes`` object: a write replaces it, so the checksum can be
cached per content object and pages with equal content compare with one
``memcmp``-like bytes comparison.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import xxhash

from ksmlab.constants import PAGE_SIZE
from ksmlab.errors import ModelInvariantError

if TYPE_CHECKING:
    from ksmlab.ksm.types import StableNode

ZERO_DATA = bytes(PAGE_SIZE)


def calc_checksum(data: bytes) -> int:
    """The kernel's page checksum (``calc_checksum``): low 32 bits of XXH64, seed 0."""
    return xxhash.xxh64_intdigest(data) & 0xFFFFFFFF


ZERO_CHECKSUM = calc_checksum(ZERO_DATA)
"""Checksum of the zero page, computed once as ksm_init does."""


class Frame:
    """One physical page (the kernel's ``struct page``/small folio).

    Attributes:
        pfn: page frame number; unique for the frame's lifetime (pagemap shows it).
        data: the page's 4096 bytes.
        nid: NUMA node the frame lives on.
        mapcount: number of page-table entries mapping this frame.
        anon: anonymous page (private process memory), as opposed to page cache.
        zero: this is the shared zero page (never freed, never written).
        ksm: this is a KSM page (PageKsm): write-protected everywhere, COW on write.
        stable_node: when ``ksm``, the stable node it belongs to (None between
            the merge and stable_tree_insert); the "keyhole" ksm.c checks.
        freed: the frame went back to the allocator; a stable node pointing
            here is stale.
    """

    __slots__ = ("anon", "data", "freed", "ksm", "mapcount", "nid", "pfn", "stable_node",
                 "zero")

    def __init__(self, pfn: int, data: bytes, nid: int, *, anon: bool) -> None:
        self.pfn = pfn
        self.data = data
        self.nid = nid
        self.mapcount = 0
        self.anon = anon
        self.zero = False
        self.ksm = False
        self.stable_node: StableNode | None = None
        self.freed = False

    def __repr__(self) -> str:
        kind = "zero" if self.zero else "ksm" if self.ksm else "anon" if self.anon else "file"
        return f"<Frame pfn={self.pfn} {kind} mapcount={self.mapcount} nid={self.nid}>"


class PhysMem:
    """The simulated RAM: allocates and frees frames, with a failure-injection limit.

    Attributes:
        numa_nodes: number of NUMA nodes; frames are placed on a node on request.
        zero_page: the shared zero page (pfn 0 is not used for it; it has its own pfn).
        ksm_zero_page: a second handle on the *same* physical zero page (same pfn),
            used for page-table entries placed by KSM.  The kernel marks those
            PTEs with the dirty bit; ksmlab marks them by pointing at this handle.
        max_frames: if set, allocations beyond this many frames in use fail (OOM).
        nr_frames: frames currently in use (zero page excluded).
    """

    def __init__(self, numa_nodes: int = 1, max_frames: int | None = None) -> None:
        self.numa_nodes = numa_nodes
        self.max_frames = max_frames
        self.nr_frames = 0
        self._pfns = itertools.count(0x1000)
        self.zero_page = Frame(next(self._pfns), ZERO_DATA, 0, anon=False)
        self.zero_page.zero = True
        self.ksm_zero_page = Frame(self.zero_page.pfn, ZERO_DATA, 0, anon=False)
        self.ksm_zero_page.zero = True

    def alloc(self, data: bytes, nid: int, *, anon: bool) -> Frame | None:
        """Allocate a frame holding *data* on node *nid*; None when memory is exhausted."""
        if self.max_frames is not None and self.nr_frames >= self.max_frames:
            return None
        self.nr_frames += 1
        return Frame(next(self._pfns), data, nid, anon=anon)

    def free(self, frame: Frame) -> None:
        """Return *frame*; a KSM frame keeps its ``stable_node`` so the node can see it is stale."""
        # Checked inline rather than through vm_bug_on so that the messages
        # are only formatted on failure (this is a hot path).
        if frame.zero or frame.freed or frame.mapcount:
            raise ModelInvariantError(f"bad free of {frame!r}")
        frame.freed = True
        self.nr_frames -= 1
