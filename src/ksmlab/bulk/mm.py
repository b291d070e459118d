"""Address spaces of the bulk engine: segments of rows in the page table.

A :class:`BulkMm` is a process's address space reduced to what ksmd walks:
its anonymous private mappings (segments), in address order, each a range of
consecutive rows of :class:`ksmlab.bulk.columns.PageCols`.  It is also a slot
of ksmd's circular scan list (``ksm_mm_slot``).

Segments are not vmas: the engine keeps no vma flags, so it never merges
them as the kernel merges vmas, and a mapping may be cut into several
segments (by munmap, mprotect, or rows taken over from a :class:`Ghost`).
Only the mapped addresses, each page's row and each segment's protection
are observable, and those are the kernel's.

munmap leaves each unmapped page's rmap_item where it was, as the kernel
leaves it on the mm's list (keyed by address) until ksmd's walk passes that
address: the unmapped rows that still hold items are kept as *ghosts*, in
address order.  ksmd's walk frees their items as it passes them; a later
mmap at those addresses takes their rows over, so a page mapped there again
finds its old item, as the kernel's walk would.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import TypeVar

from ksmlab.constants import HPAGE_PMD_SIZE, PAGE_SHIFT, PAGE_SIZE, PROT_READ, PROT_WRITE
from ksmlab.ksm.types import ListHead
from ksmlab.mm.mmap import unmapped_area_topdown


@dataclass(slots=True)
class Segment:
    """A run of consecutive rows mapped at consecutive addresses.

    Attributes:
        addr: its first virtual address.
        row: row of its first page in the page table.
        pages: its length in pages.
        prot: its PROT_READ/PROT_WRITE/PROT_EXEC bits (mmap: read-write; mprotect).
    """

    addr: int
    row: int
    pages: int
    prot: int = PROT_READ | PROT_WRITE

    @property
    def end(self) -> int:
        """First address after the segment."""
        return self.addr + (self.pages << PAGE_SHIFT)


@dataclass(slots=True)
class Ghost(Segment):
    """Unmapped rows some of which still hold an rmap_item (see the module doc); ``prot`` unused."""


S = TypeVar("S", bound=Segment)



def _first_ending_after(ranges: list[S], addr: int) -> int:
    """Index of the first range of *ranges* (sorted, disjoint) that ends after *addr*."""
    return bisect_right(ranges, addr, key=lambda s: s.end)


def _split(ranges: list[S], addr: int) -> int:
    """Cut the range of *ranges* holding *addr* in its middle there; return the index
    of the first range at or above *addr*."""
    i = _first_ending_after(ranges, addr)
    if i < len(ranges) and ranges[i].addr < addr:
        seg = ranges[i]
        k = (addr - seg.addr) >> PAGE_SHIFT
        ranges.insert(i + 1, replace(seg, addr=addr, row=seg.row + k, pages=seg.pages - k))
        seg.pages = k
        return i + 1
    return i


def _cut(ranges: list[S], start: int, end: int) -> tuple[int, int]:
    """Split *ranges* at *start* and *end*; return the slice [i, j) of those inside."""
    i = _split(ranges, start)
    return i, _split(ranges, end)


class BulkMm(ListHead):
    """An address space and its ksmd slot.

    Attributes:
        id: identity (the process's pid).
        segments: mappings sorted by address.
        ghosts: unmapped rows that still hold rmap_items, sorted by address,
            disjoint from the segments (see the module doc).
        exiting: the process exited (``ksm_test_exit``); ksmd reaps the slot.
        registered: MMF_VM_MERGEABLE: the mm is on ksmd's list.
        merge_any: MMF_VM_MERGE_ANY: prctl(PR_SET_MEMORY_MERGE) is in effect (fork and
            exec keep it; ksmd dropping the slot does not clear it, as in 6.18).
        prev, next: neighbours on the list (the list head is a BulkMm with id -1).
        mmap_base: mappings are placed top-down below this address, as SimKernel does.
    """

    __slots__ = ("exiting", "ghosts", "id", "merge_any", "mmap_base", "registered", "segments")
    prev: BulkMm
    next: BulkMm

    def __init__(self, mm_id: int) -> None:
        super().__init__()
        self.id = mm_id
        self.segments: list[Segment] = []
        self.ghosts: list[Ghost] = []
        self.exiting = False
        self.registered = False
        self.merge_any = False
        self.mmap_base = 0x7F0000000000

    def ranges(self) -> list[Segment]:
        """The segments and the ghosts: every row that can hold an rmap_item of this mm."""
        return [*self.segments, *self.ghosts] if self.ghosts else self.segments

    def in_address_order(self) -> Iterable[Segment]:
        """Segments and ghosts merged in address order (the order of ksmd's walk)."""
        if not self.ghosts:
            return self.segments
        return list(heapq.merge(self.segments, self.ghosts, key=lambda s: s.addr))

    def drop_passed_ghosts(self) -> None:
        """Forget ghosts whose items ksmd's walk has all freed (trimmed to 0 pages)."""
        self.ghosts = [g for g in self.ghosts if g.pages]

    # --- mmap, munmap, mprotect ---------------------------------------------------------------
    def unmapped_area(self, size: int) -> int:
        """Where mmap puts *size* bytes (SimKernel's top-down placement); KernelError(ENOMEM).

        A length that is a multiple of 2 MiB is placed on a 2 MiB boundary, as Linux
        6.18 places it (measured; docs/bulk.md, "THP"): the highest gap that fits *size* + 2 MiB,
        the address rounded down; if none does, the ordinary placement.
        """
        spans = [(s.addr, s.end) for s in reversed(self.segments)]
        return unmapped_area_topdown(spans, self.mmap_base, size,
                                     pmd_align=size % HPAGE_PMD_SIZE == 0)

    def map_area(self, start: int, pages: int,
                 alloc: Callable[[int], int]) -> list[tuple[int, int]]:
        """Map *pages* pages at the unmapped *start*; return its rows as (first row, count)
        runs, for the caller to give them the new mapping's attributes.

        Ghost rows there are taken over, items and all (munmap left them
        mapping nothing and not mergeable, as a new mapping's rows are); the
        other pages get fresh rows, from one ``alloc(count)`` call (it returns
        the first row; it may raise, before anything has changed).  The runs
        are taken before the new segments are joined to their neighbours,
        whose rows they may continue.
        """
        end = start + (pages << PAGE_SHIFT)
        ghosts = self.ghosts
        lo = _first_ending_after(ghosts, start)
        hi = bisect_left(ghosts, end, key=lambda g: g.addr)
        taken = sum((min(end, g.end) - max(start, g.addr)) >> PAGE_SHIFT for g in ghosts[lo:hi])
        fresh = alloc(pages - taken) if pages > taken else 0
        i, j = _cut(ghosts, start, end)
        reused = ghosts[i:j]
        del ghosts[i:j]
        new: list[Segment] = []
        pos = start
        for g in [*reused, None]:
            stop = end if g is None else g.addr
            if stop > pos:  # a hole between ghosts: fresh rows
                n = (stop - pos) >> PAGE_SHIFT
                new.append(Segment(pos, fresh, n))
                fresh += n
            if g is not None:
                new.append(Segment(g.addr, g.row, g.pages))
                pos = g.end
        runs = [(seg.row, seg.pages) for seg in new]
        k = _first_ending_after(self.segments, start)
        self.segments[k:k] = new
        self._coalesce(k - 1, k + len(new) + 1)
        return runs

    def unmap(self, start: int, end: int) -> list[Segment]:
        """Take the mapped parts of [start, end) out of the segments and return them."""
        i, j = _cut(self.segments, start, end)
        gone = self.segments[i:j]
        del self.segments[i:j]
        return gone

    def add_ghost(self, seg: Segment) -> None:
        """Keep the unmapped *seg*'s rows as a ghost (their items stay for ksmd)."""
        k = bisect_left(self.ghosts, seg.addr, key=lambda g: g.addr)
        self.ghosts.insert(k, Ghost(seg.addr, seg.row, seg.pages))

    def mapped_from(self, start: int, end: int) -> int:
        """The end of the mapped run of [start, end) that begins at *start* (start if none)."""
        pos = start
        for seg in self.segments[_first_ending_after(self.segments, start):]:
            if seg.addr > pos or pos >= end:
                break
            pos = min(end, seg.end)
        return pos

    def protect(self, start: int, end: int, prot: int) -> None:
        """Give the mapped [start, end) the protection *prot*."""
        i, j = _cut(self.segments, start, end)
        for seg in self.segments[i:j]:
            seg.prot = prot
        self._coalesce(i - 1, j + 1)

    def _coalesce(self, lo: int, hi: int) -> None:
        """Join neighbours among segments [lo, hi) that continue each other (rows and prot)."""
        segs = self.segments
        k = max(lo, 0)
        hi = min(hi, len(segs))
        while k + 1 < hi:
            a, b = segs[k], segs[k + 1]
            if a.end == b.addr and a.row + a.pages == b.row and a.prot == b.prot:
                a.pages += b.pages
                del segs[k + 1]
                hi -= 1
            else:
                k += 1

    # --- lookups --------------------------------------------------------------------------------
    def all_have(self, start: int, end: int, prot: int) -> bool:
        """Whether [start, end) is all mapped, by segments that all have the bits *prot*."""
        pos = start
        for seg in self.segments[_first_ending_after(self.segments, start):]:
            if pos >= end or seg.addr > pos:
                break
            if seg.prot & prot != prot:
                return False
            pos = seg.end
        return pos >= end

    def pieces(self, start: int, end: int) -> tuple[list[tuple[int, int, int]], bool]:
        """The mapped parts of [start, end) (page aligned) as (address, first row, pages),
        in address order, and whether the range has a hole (an unmapped page)."""
        out: list[tuple[int, int, int]] = []
        pos = start
        hole = False
        for seg in self.segments[_first_ending_after(self.segments, start):]:
            if seg.addr >= end:
                break
            if seg.addr > pos:
                hole = True
                pos = seg.addr
            stop = min(end, seg.end)
            out.append((pos, seg.row + ((pos - seg.addr) >> PAGE_SHIFT), (stop - pos) >> PAGE_SHIFT))
            pos = stop
        return out, hole or pos < end

    def rows(self, addr: int, length: int) -> list[tuple[int, int, int]]:
        """(first row, first page index, pages) of each segment piece in [addr, addr+length).

        Raises ValueError if part of the range is not mapped.
        """
        if addr % PAGE_SIZE or length % PAGE_SIZE or length <= 0:
            msg = f"address {addr:#x} and length {length} must be positive page multiples"
            raise ValueError(msg)
        out: list[tuple[int, int, int]] = []
        pos, end = addr, addr + length
        for seg in self.segments[_first_ending_after(self.segments, addr):]:
            if seg.addr >= end or seg.addr > pos:
                break
            stop = min(end, seg.end)
            first = (pos - seg.addr) >> PAGE_SHIFT
            out.append((seg.row + first, first, (stop - pos) >> PAGE_SHIFT))
            pos = stop
            if pos == end:
                return out
        msg = (f"[{addr:#x}, {end:#x}) is not entirely mapped in process {self.id}: "
               f"the bulk engine models only calls on mapped memory")
        raise ValueError(msg)
