"""Physical page frames, page content, and the allocator that hands frames out.

A :class:`Frame` is one 4 KiB page of simulated RAM.  Its content is an
immutable ``bytes`` object: a write replaces it, and pages with equal content
compare with one ``memcmp``-like bytes comparison.

What that object holds depends on the machine's *content mode*
(``SimKernel(content=...)``, kept on :class:`PhysMem`):

* ``"bytes"`` (the default): the page's 4096 bytes; ksmd's checksum is the
  kernel's (:func:`calc_checksum`).
* ``"fingerprint"``: a 16-byte :func:`fingerprint` of those bytes, so a large
  host fits in memory.  Equal fingerprints stand for equal pages, ``<`` on
  fingerprints orders the trees (model choice, see docs/design.md), and the
  checksum is :func:`fingerprint_checksum`.  No byte of the page is kept, so
  only whole pages can be written.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal, get_args

import xxhash

from ksmlab.constants import HPAGE_PMD_NR, PAGE_SIZE
from ksmlab.errors import ModelInvariantError

if TYPE_CHECKING:
    from ksmlab.ksm.types import StableNode
    from ksmlab.mm.mm_types import MmStruct

ZERO_DATA = bytes(PAGE_SIZE)


def calc_checksum(data: bytes) -> int:
    """The kernel's page checksum (``calc_checksum``): low 32 bits of XXH64, seed 0."""
    return xxhash.xxh64_intdigest(data) & 0xFFFFFFFF


ZERO_CHECKSUM = calc_checksum(ZERO_DATA)
"""Checksum of the zero page, computed once as ksm_init does."""

ContentMode = Literal["bytes", "fingerprint"]
"""How a machine stores page content: the bytes themselves, or a fingerprint of them."""

CONTENT_MODES: tuple[ContentMode, ...] = get_args(ContentMode)

FINGERPRINT_SIZE = 16
"""Bytes in a page fingerprint (128 bits)."""


def fingerprint(data: bytes) -> bytes:
    """The 128-bit fingerprint of one full page's bytes: XXH3-128, canonical (big-endian) digest.

    Model only: in fingerprint mode a frame holds this instead of its bytes.
    Model choice: XXH3-128 rather than a cryptographic hash, because it runs
    at memory speed (about 12 GiB/s per core here, BLAKE2b 0.3-0.8), which is
    what fills a big host and captures a snapshot; the model only needs
    distinct pages to get distinct fingerprints, and nobody picks page bytes
    to collide with another's (docs/design.md, "Model choices").
    """
    return xxhash.xxh3_128_digest(data)


def fingerprint_checksum(fp: bytes) -> int:
    """The page checksum in fingerprint mode (stands in for ``calc_checksum``): the
    fingerprint's first 4 bytes, little endian.

    ksmd uses the checksum only to tell whether a page changed since its last
    visit and to recognise the zero page (use_zero_pages=1); any 32 bits of a
    fingerprint do both as well as XXH64 does for the bytes.
    """
    return int.from_bytes(fp[:4], "little")


ZERO_FINGERPRINT = fingerprint(ZERO_DATA)
"""Fingerprint of a zero-filled page."""


class Frame:
    """One physical page (the kernel's ``struct page``/small folio).

    Attributes:
        pfn: page frame number; unique for the frame's lifetime (pagemap shows it).
        data: the page's content: its 4096 bytes, or in fingerprint mode its
            16-byte :func:`fingerprint` (see :class:`PhysMem`).
        nid: NUMA node the frame lives on.
        mapcount: number of page-table entries mapping this frame.
        anon: anonymous page (private process memory), as opposed to page cache.
        zero: this is the shared zero page (never freed, never written).
        ksm: this is a KSM page (PageKsm): write-protected everywhere, COW on write.
        stable_node: when ``ksm``, the stable node it belongs to (None between
            the merge and stable_tree_insert); the "keyhole" ksm.c checks.
        freed: the frame went back to the allocator; a stable node pointing
            here is stale.
        thp: the transparent huge page this frame is one of (None for a small
            page, and again after the THP is split).
    """

    __slots__ = ("anon", "data", "freed", "ksm", "mapcount", "nid", "pfn", "stable_node",
                 "thp", "zero")

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
        self.thp: Thp | None = None

    def __repr__(self) -> str:
        kind = "zero" if self.zero else "ksm" if self.ksm else "anon" if self.anon else "file"
        return f"<Frame pfn={self.pfn} {kind} mapcount={self.mapcount} nid={self.nid}>"


class Thp:
    """A transparent huge page (an anonymous PMD-sized folio): 512 frames of one
    2 MiB-aligned virtual extent, allocated together (docs/kernel-behaviour.md, THP).

    Which mms map it with one PMD is kept on each mm (``MmStruct.pmds``, by
    extent) and mirrored here so that a split can find them.  Each mm maps it at
    most once, at an extent of its own address space: a fork child at its
    parent's, a loaded snapshot's fork child (ksmlab.estimate) wherever its
    mapping is.

    Attributes:
        frames: the 512 frames, in address order.
        extent: the first page number (a multiple of 512) of the extent it was
            faulted in at; other mms may map it by PMD elsewhere (``pmd_mms``).
        pmd_mms: the mms mapping it whole by PMD, by mm id: the mm and its
            extent there (first page number, a multiple of 512).
        mapcount: page-table entries mapping any of its frames, over all mms
            (the sum of the frames' mapcounts; 512 when one mm maps it).
    """

    __slots__ = ("extent", "frames", "mapcount", "pmd_mms")

    def __init__(self, frames: list[Frame], extent: int) -> None:
        self.frames = frames
        self.extent = extent
        self.pmd_mms: dict[int, tuple[MmStruct, int]] = {}
        self.mapcount = 0
        for f in frames:
            f.thp = self

    def __repr__(self) -> str:
        return (f"<Thp extent={self.extent:#x} head pfn={self.frames[0].pfn} "
                f"pmd_mms={sorted(self.pmd_mms)}>")


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
        content: the content mode, ``"bytes"`` or ``"fingerprint"`` (module doc).
        fingerprint_mode: ``content == "fingerprint"``.
        zero_data: the content of a zero-filled page in this mode.
        page_content: turns one full page's bytes into the content a frame
            holds in this mode (``bytes`` itself, or :func:`fingerprint`).
        calc_checksum: ksmd's page checksum over a frame's ``data`` in this
            mode (:func:`calc_checksum` or :func:`fingerprint_checksum`).
        zero_checksum: ``calc_checksum(zero_data)``, computed once as ksm_init does.
    """

    def __init__(self, numa_nodes: int = 1, max_frames: int | None = None,
                 content: ContentMode = "bytes") -> None:
        if content not in CONTENT_MODES:
            msg = f"content must be one of {', '.join(map(repr, CONTENT_MODES))}, got {content!r}"
            raise ValueError(msg)
        self.numa_nodes = numa_nodes
        self.max_frames = max_frames
        self.nr_frames = 0
        self.content: ContentMode = content
        self.fingerprint_mode = content == "fingerprint"
        # The mode is resolved here, once: callers (ksmd's checksum is a hot
        # path) call these without testing the mode.
        self.zero_data = ZERO_FINGERPRINT if self.fingerprint_mode else ZERO_DATA
        self.page_content: Callable[[bytes], bytes] = (
            fingerprint if self.fingerprint_mode else bytes)
        self.calc_checksum: Callable[[bytes], int] = (
            fingerprint_checksum if self.fingerprint_mode else calc_checksum)
        self.zero_checksum = self.calc_checksum(self.zero_data)
        self._pfns = itertools.count(0x1000)
        self.zero_page = Frame(next(self._pfns), self.zero_data, 0, anon=False)
        self.zero_page.zero = True
        self.ksm_zero_page = Frame(self.zero_page.pfn, self.zero_data, 0, anon=False)
        self.ksm_zero_page.zero = True

    def alloc(self, data: bytes, nid: int, *, anon: bool) -> Frame | None:
        """Allocate a frame holding *data* on node *nid*; None when memory is exhausted."""
        if self.max_frames is not None and self.nr_frames >= self.max_frames:
            return None
        self.nr_frames += 1
        return Frame(next(self._pfns), data, nid, anon=anon)

    def alloc_thp(self, data: bytes, nid: int, extent: int) -> Thp | None:
        """Allocate a THP for the extent starting at page *extent*, every frame holding
        *data*; None when the 512 frames do not fit (the fault then takes a small page,
        as the kernel falls back when a huge page cannot be had)."""
        if self.max_frames is not None and self.nr_frames + HPAGE_PMD_NR > self.max_frames:
            return None
        self.nr_frames += HPAGE_PMD_NR
        return Thp([Frame(next(self._pfns), data, nid, anon=True)
                    for _ in range(HPAGE_PMD_NR)], extent)

    def free(self, frame: Frame) -> None:
        """Return *frame*; a KSM frame keeps its ``stable_node`` so the node can see it is stale."""
        # Checked inline rather than through vm_bug_on so that the messages
        # are only formatted on failure (this is a hot path).
        if frame.zero or frame.freed or frame.mapcount:
            raise ModelInvariantError(f"bad free of {frame!r}")
        frame.freed = True
        self.nr_frames -= 1
