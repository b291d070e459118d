"""Address-space types: files, anon_vmas, vmas and the mm (``include/linux/mm_types.h``)."""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field

from ksmlab.constants import (
    MMF_VM_MERGE_ANY,
    MMF_VM_MERGEABLE,
    PAGE_SHIFT,
    PAGE_SIZE,
    VM_ACCOUNT,
    VM_DONTCOPY,
    VM_DONTDUMP,
    VM_DONTEXPAND,
    VM_DROPPABLE,
    VM_EXEC,
    VM_GROWSDOWN,
    VM_HUGEPAGE,
    VM_HUGETLB,
    VM_IO,
    VM_LOCKED,
    VM_MAYEXEC,
    VM_MAYREAD,
    VM_MAYSHARE,
    VM_MAYWRITE,
    VM_MERGEABLE,
    VM_MIXEDMAP,
    VM_NOHUGEPAGE,
    VM_NORESERVE,
    VM_PFNMAP,
    VM_READ,
    VM_SHARED,
    VM_WIPEONFORK,
    VM_WRITE,
)
from ksmlab.mm.page import Frame, Thp

_anon_vma_ids = itertools.count(1)


class MappedFile:
    """A file (or shmem object) that vmas map; its page cache lives here.

    Attributes:
        name: the path for a host file, or ``"/dev/zero (deleted)"``-like name for shmem.
        data: the file's bytes (model choice: read once from the host at mmap time
            and never written back; SimKernel never modifies host files).
        shmem: anonymous shared memory (MAP_SHARED|MAP_ANONYMOUS); its pages start zeroed.
        pagecache: page-cache frames by page offset.
        nr_vmas: vmas mapping the object (their ``vm_file`` references); a shmem
            object's pages are freed when the last one goes away.
    """

    __slots__ = ("data", "name", "nr_vmas", "pagecache", "shmem")

    def __init__(self, name: str, data: bytes, *, shmem: bool = False) -> None:
        self.name = name
        self.data = data
        self.shmem = shmem
        self.pagecache: dict[int, Frame] = {}
        self.nr_vmas = 0

    def page_data(self, pgoff: int) -> bytes:
        """The content of page *pgoff* (zero-filled past the end of file)."""
        chunk = self.data[pgoff * PAGE_SIZE:(pgoff + 1) * PAGE_SIZE]
        return chunk + bytes(PAGE_SIZE - len(chunk)) if len(chunk) < PAGE_SIZE else chunk


class AnonVma:
    """Identity of an anon_vma: vmas may merge only if theirs are compatible."""

    __slots__ = ("id",)

    def __init__(self) -> None:
        self.id = next(_anon_vma_ids)

    def __repr__(self) -> str:
        return f"<AnonVma {self.id}>"


@dataclass(slots=True, eq=False)
class Vma:
    """A virtual memory area (``struct vm_area_struct``).

    Attributes:
        start: first address (page aligned).
        end: first address after the area.
        flags: VM_* flags.
        pgoff: page offset of ``start`` in the file; for anonymous areas
            ``start >> PAGE_SHIFT`` at creation, as the kernel sets it.
        file: mapped file or shmem object; None for private anonymous memory.
        anon_vma: set at the first anonymous page fault (anon_vma_prepare).
        anon_vma_singular: the vma's anon_vma chain has one entry (False for a
            forked child's vmas, whose chain also links the parent's anon_vma);
            the kernel refuses to merge or share anon_vmas otherwise.
        nid: NUMA node pages of this area are allocated on (mbind); None = node 0.
    """

    start: int
    end: int
    flags: int
    pgoff: int
    file: MappedFile | None = None
    anon_vma: AnonVma | None = None
    anon_vma_singular: bool = True
    nid: int | None = None

    @property
    def pages(self) -> int:
        """Number of pages the area spans."""
        return (self.end - self.start) >> PAGE_SHIFT

    def linear_pgoff(self, addr: int) -> int:
        """File page offset of *addr* (``linear_page_index``)."""
        return self.pgoff + ((addr - self.start) >> PAGE_SHIFT)

    def is_anonymous(self) -> bool:
        """Private anonymous memory (no file, not shmem)."""
        return self.file is None

    def perms(self) -> str:
        """The ``rwxp`` string of /proc/PID/maps."""
        return (("r" if self.flags & VM_READ else "-") + ("w" if self.flags & VM_WRITE else "-")
                + ("x" if self.flags & VM_EXEC else "-")
                + ("s" if self.flags & VM_MAYSHARE else "p"))

    def mnemonics(self) -> tuple[str, ...]:
        """The ``VmFlags:`` line of smaps, in the kernel's order."""
        return tuple(m for bit, m in _MNEMONICS if self.flags & bit)


# show_smap_vma_flags() order, for the flags the model uses.
_MNEMONICS: tuple[tuple[int, str], ...] = (
    (VM_READ, "rd"), (VM_WRITE, "wr"), (VM_EXEC, "ex"), (VM_SHARED, "sh"),
    (VM_MAYREAD, "mr"), (VM_MAYWRITE, "mw"), (VM_MAYEXEC, "me"), (VM_MAYSHARE, "ms"),
    (VM_GROWSDOWN, "gd"), (VM_PFNMAP, "pf"), (VM_LOCKED, "lo"), (VM_IO, "io"),
    (VM_DONTCOPY, "dc"), (VM_DONTEXPAND, "de"), (VM_ACCOUNT, "ac"), (VM_NORESERVE, "nr"),
    (VM_HUGETLB, "ht"), (VM_WIPEONFORK, "wf"), (VM_DONTDUMP, "dd"), (VM_MIXEDMAP, "mm"),
    (VM_HUGEPAGE, "hg"), (VM_NOHUGEPAGE, "nh"), (VM_MERGEABLE, "mg"), (VM_DROPPABLE, "dp"),
)


@dataclass(slots=True, eq=False)
class MmStruct:
    """An address space (``struct mm_struct``).

    Attributes:
        id: identity for trace events (the kernel prints the mm pointer).
        vmas: the areas, sorted by start address, never overlapping.
        ptes: the page table: page number -> mapped frame.  A KSM-placed zero
            page is the PhysMem's ``ksm_zero_page`` handle (the kernel's dirty
            zero PTE).
        flags: MMF_* bits.
        mm_users: 1 while a process uses the mm, 0 once it exits (``ksm_test_exit``).
        ksm_rmap_items: rmap_items ksmd holds for this mm.
        ksm_merging_pages: this mm's rmap_items in the stable tree.
        ksm_zero_pages: KSM-placed zero-page PTEs currently mapped here.
        mmap_base: top of the mmap area; new mappings go just below it (top-down).
        pmds: the transparent huge pages this mm maps with one PMD, by extent
            (first page number of the 2 MiB extent, a multiple of 512).  Their
            512 frames are in ``ptes`` too: the PMD is an overlay that says the
            extent is mapped whole (what ksmd's walk and smaps AnonHugePages see).
    """

    id: int
    vmas: list[Vma] = field(default_factory=list)
    ptes: dict[int, Frame] = field(default_factory=dict)
    flags: int = 0
    mm_users: int = 1
    ksm_rmap_items: int = 0
    ksm_merging_pages: int = 0
    ksm_zero_pages: int = 0
    mmap_base: int = 0x7F0000000000
    pmds: dict[int, Thp] = field(default_factory=dict)

    # --- flags -------------------------------------------------------------------
    def test_flag(self, bit: int) -> bool:
        """``test_bit(bit, &mm->flags)``."""
        return bool(self.flags >> bit & 1)

    def set_flag(self, bit: int) -> None:
        """``set_bit``."""
        self.flags |= 1 << bit

    def clear_flag(self, bit: int) -> None:
        """``clear_bit``."""
        self.flags &= ~(1 << bit)

    @property
    def ksm_registered(self) -> bool:
        """MMF_VM_MERGEABLE: the mm has a slot on ksmd's list."""
        return self.test_flag(MMF_VM_MERGEABLE)

    @property
    def merge_any(self) -> bool:
        """MMF_VM_MERGE_ANY: prctl(PR_SET_MEMORY_MERGE, 1) is in effect."""
        return self.test_flag(MMF_VM_MERGE_ANY)

    # --- vma lookup --------------------------------------------------------------
    def find_vma_index(self, addr: int) -> int:
        """Position of the first vma with ``end > addr`` (``len(vmas)`` if there is none)."""
        return bisect.bisect_right(self.vmas, addr, key=_vma_end)

    def find_vma(self, addr: int) -> Vma | None:
        """The first vma with ``end > addr`` (``find_vma``), or None."""
        i = self.find_vma_index(addr)
        return self.vmas[i] if i < len(self.vmas) else None

    def vma_lookup(self, addr: int) -> Vma | None:
        """The vma containing *addr* (``vma_lookup``), or None."""
        vma = self.find_vma(addr)
        return vma if vma is not None and vma.start <= addr else None

    def vma_index(self, vma: Vma) -> int:
        """Position of *vma* in the sorted list."""
        i = bisect.bisect_left(self.vmas, vma.start, key=lambda v: v.start)
        if i >= len(self.vmas) or self.vmas[i] is not vma:
            raise AssertionError(f"vma {vma.start:#x} not in its mm")
        return i

    def insert_vma(self, vma: Vma) -> None:
        """Insert *vma* in address order (it takes a reference on its file)."""
        if vma.file is not None:
            vma.file.nr_vmas += 1
        bisect.insort(self.vmas, vma, key=lambda v: v.start)

    @property
    def map_count(self) -> int:
        """Number of vmas (``mm->map_count``)."""
        return len(self.vmas)


def _vma_end(vma: Vma) -> int:
    return vma.end
