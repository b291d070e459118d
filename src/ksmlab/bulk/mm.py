"""Address spaces of the bulk engine: segments of rows in the page table.

A :class:`BulkMm` is a process's address space reduced to what ksmd walks:
its anonymous private mappings (segments), in address order, each a range of
consecutive rows of :class:`ksmlab.bulk.columns.PageCols`.  It is also a slot
of ksmd's circular scan list (``ksm_mm_slot``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ksmlab.constants import PAGE_SHIFT, PAGE_SIZE
from ksmlab.ksm.types import ListHead


@dataclass(slots=True)
class Segment:
    """One anonymous private mapping.

    Attributes:
        addr: its first virtual address.
        row: row of its first page in the page table.
        pages: its length in pages.
    """

    addr: int
    row: int
    pages: int

    @property
    def end(self) -> int:
        """First address after the mapping."""
        return self.addr + (self.pages << PAGE_SHIFT)


class BulkMm(ListHead):
    """An address space and its ksmd slot.

    Attributes:
        id: identity (the process's pid).
        segments: mappings sorted by address.
        exiting: the process exited (``ksm_test_exit``); ksmd reaps the slot.
        registered: MMF_VM_MERGEABLE: the mm is on ksmd's list.
        merge_any: MMF_VM_MERGE_ANY: prctl(PR_SET_MEMORY_MERGE) is in effect (fork and
            exec keep it; ksmd dropping the slot does not clear it, as in 6.18).
        prev, next: neighbours on the list (the list head is a BulkMm with id -1).
        mmap_base: mappings are placed top-down below this address, as SimKernel does.
    """

    __slots__ = ("exiting", "id", "merge_any", "mmap_base", "registered", "segments")
    prev: BulkMm
    next: BulkMm

    def __init__(self, mm_id: int) -> None:
        super().__init__()
        self.id = mm_id
        self.segments: list[Segment] = []
        self.exiting = False
        self.registered = False
        self.merge_any = False
        self.mmap_base = 0x7F0000000000

    def pieces(self, start: int, end: int) -> tuple[list[tuple[int, int, int]], bool]:
        """The mapped parts of [start, end) (page aligned) as (address, first row, pages),
        in address order, and whether the range has a hole (an unmapped page)."""
        out: list[tuple[int, int, int]] = []
        pos = start
        hole = False
        for seg in self.segments:
            if seg.end <= pos:
                continue
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
        for seg in self.segments:
            if seg.end <= pos or seg.addr >= end:
                continue
            if seg.addr > pos:
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
