"""Page faults, copy-on-write, and tearing down mappings (``mm/memory.c``).

The model keeps no separate "writable" bit per page-table entry.  Whether a
write may go straight to the mapped frame is decided at write time, the way
``do_wp_page`` decides whether it can reuse a page: only an anonymous,
non-KSM frame mapped exactly once is written in place; every other mapped
frame (KSM page, zero page, page shared with a fork relative, page cache of
a private file mapping) is copied first.  That is observationally the same as
tracking write-protection per PTE, and it cannot drift out of sync.

Transparent huge pages (THP), in the host mode ``madvise`` only (model
choice: ``always`` and ``never`` are not modelled; docs/kernel-behaviour.md,
"Transparent huge pages"): a first write in a VM_HUGEPAGE private anonymous
area whose 2 MiB-aligned extent lies wholly inside the area, with nothing but
the zero page of a read mapped there yet, allocates a :class:`~ksmlab.mm.page.Thp`
of 512 frames and maps it by PMD (``MmStruct.pmds``; a fork child maps it by PMD
too, :meth:`Memory.map_thp_pmd`: each mm at most once, at an extent of its own
address space).  The PMD is split (the extent stays mapped, by PTE) when any
page-table entry of the extent goes (munmap, MADV_DONTNEED, a COW copy, KSM's
replace_page), when a vma boundary comes to lie inside the extent
(:meth:`Memory.split_pmd_at`), and when the writer's THP is also mapped by
another mm (fork).  KSM splits the THP itself
before merging a page of it (:meth:`Memory.split_thp`).  Model choices: the
huge zero page of a read is the ordinary zero page in each PTE (so a write
still gets a THP; a read made before MADV_HUGEPAGE would block it on Linux);
khugepaged (which collapses 4 KiB pages back into THPs) and the deferred
split of partly unmapped THPs are not modelled.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

from ksmlab.constants import (
    HPAGE_PMD_NR,
    HPAGE_PMD_SIZE,
    PAGE_SHIFT,
    PAGE_SIZE,
    VM_EXEC,
    VM_HUGEPAGE,
    VM_NOHUGEPAGE,
    VM_READ,
    VM_SHARED,
    VM_WRITE,
)
from ksmlab.errors import ModelInvariantError, vm_bug_on
from ksmlab.mm.mm_types import AnonVma, MmStruct, Vma
from ksmlab.mm.page import Frame, PhysMem, Thp

_ANON_COMPAT_IGNORE = VM_READ | VM_WRITE | VM_EXEC
FAULT_AROUND_PAGES = 16
"""``fault_around_bytes`` (64 KiB, the default) in pages."""
PTRS_PER_PTE = 512


class Fault(Enum):
    """Result of a fault (the parts of ``vm_fault_t`` the model needs)."""

    OK = 0
    OOM = 1


class Memory:
    """Faults and page-table manipulation over one PhysMem.

    Attributes:
        phys: the simulated RAM.
        cow_ksm: vmstat ``cow_ksm``: COW or unshare faults on KSM pages.
        on_ksm_zero_unmap: called with the mm whenever a KSM-placed zero PTE
            goes away (KSM decrements its zero-page counters eagerly).
    """

    def __init__(self, phys: PhysMem, on_ksm_zero_unmap: Callable[[MmStruct], None]) -> None:
        self.phys = phys
        self.cow_ksm = 0
        self.on_ksm_zero_unmap = on_ksm_zero_unmap

    # --- anon_vma ------------------------------------------------------------------
    def anon_vma_prepare(self, mm: MmStruct, vma: Vma) -> None:
        """Give *vma* an anon_vma, reusing a compatible neighbour's (``__anon_vma_prepare``)."""
        if vma.anon_vma is not None:
            return
        i = mm.vma_index(vma)
        for j in (i + 1, i - 1):  # find_mergeable_anon_vma looks at next, then prev
            if 0 <= j < len(mm.vmas):
                other = mm.vmas[j]
                a, b = (vma, other) if j > i else (other, vma)
                if (other.anon_vma is not None and other.anon_vma_singular
                        and _anon_vma_compatible(a, b)):
                    vma.anon_vma = other.anon_vma
                    return
        vma.anon_vma = AnonVma()
        vma.anon_vma_singular = True

    # --- mapping helpers -----------------------------------------------------------
    def _node(self, vma: Vma) -> int:
        return vma.nid if vma.nid is not None else 0

    def _map(self, mm: MmStruct, vpn: int, frame: Frame) -> None:
        if not frame.zero:
            frame.mapcount += 1
            if frame.thp is not None:
                frame.thp.mapcount += 1
        mm.ptes[vpn] = frame

    def zap_pte(self, mm: MmStruct, vpn: int) -> None:
        """Remove one page-table entry, freeing an anonymous frame nobody maps any more."""
        frame = mm.ptes.pop(vpn)
        if frame is self.phys.ksm_zero_page:
            self.on_ksm_zero_unmap(mm)
        elif not frame.zero:
            thp = frame.thp
            if thp is not None:
                # An entry of the extent goes: the PMD mapping it whole is split first.
                thp.mapcount -= 1
                first = vpn & ~(HPAGE_PMD_NR - 1)
                if mm.pmds.get(first) is thp:
                    self.split_pmd(mm, first)
            frame.mapcount -= 1
            if frame.mapcount < 0:  # hot path: the message is formatted only on failure
                raise ModelInvariantError(f"negative mapcount on {frame!r}")
            if frame.mapcount == 0 and frame.anon:
                self.phys.free(frame)

    # --- transparent huge pages ----------------------------------------------------
    def split_pmd(self, mm: MmStruct, extent: int) -> None:
        """Map the THP *mm* maps by PMD at *extent* by PTE instead (``__split_huge_pmd``);
        the frames, their contents and the other mms' mappings stay."""
        thp = mm.pmds.pop(extent, None)
        if thp is not None:
            del thp.pmd_mms[mm.id]

    def split_pmd_at(self, mm: MmStruct, addr: int) -> None:
        """A vma boundary comes to lie at *addr*: split the PMD whose extent it cuts
        (``vma_adjust_trans_huge``); an aligned boundary cuts none."""
        if addr % HPAGE_PMD_SIZE:
            self.split_pmd(mm, (addr >> PAGE_SHIFT) & ~(HPAGE_PMD_NR - 1))

    def map_thp_pmd(self, mm: MmStruct, extent: int, thp: Thp) -> None:
        """Record that *mm* maps *thp* whole by one PMD at *extent* (a first page number,
        a multiple of 512), as a THP fault or fork's ``copy_huge_pmd`` leaves it.

        The caller has mapped the THP's 512 frames by PTE at the extent, in order (with
        their mapcounts): the PMD is the overlay of ``MmStruct.pmds``.  Used by the fault,
        by fork, and by ksmlab.estimate's loader for a fork child of a snapshot, whose
        extent may lie elsewhere than its parent's.
        """
        ptes = mm.ptes
        vm_bug_on(extent % HPAGE_PMD_NR != 0 or mm.id in thp.pmd_mms or extent in mm.pmds
                  or any(ptes.get(extent + i) is not f for i, f in enumerate(thp.frames)),
                  f"mm {mm.id}: cannot map {thp!r} by PMD at {extent << PAGE_SHIFT:#x}")
        mm.pmds[extent] = thp
        thp.pmd_mms[mm.id] = (mm, extent)

    def split_thp(self, thp: Thp) -> None:
        """Split *thp* into 512 small pages (``split_huge_page``): every mm that mapped
        it by PMD now maps the same frames by PTE; contents and mapcounts stay."""
        for mm, extent in thp.pmd_mms.values():
            del mm.pmds[extent]
        thp.pmd_mms.clear()
        for frame in thp.frames:
            frame.thp = None

    def thp_eligible(self, mm: MmStruct, vma: Vma, vpn: int) -> bool:
        """Whether a write fault at *vpn* allocates a THP (docs: the fault rule).

        A private anonymous VM_HUGEPAGE area (not VM_NOHUGEPAGE), the 2 MiB-aligned
        extent of *vpn* wholly inside it, and nothing mapped in the extent but the
        zero page of a read (which stands for the kernel's huge zero page).
        """
        if vma.file is not None or not vma.flags & VM_HUGEPAGE or vma.flags & VM_NOHUGEPAGE:
            return False
        first = vpn & ~(HPAGE_PMD_NR - 1)
        if first << PAGE_SHIFT < vma.start or (first + HPAGE_PMD_NR) << PAGE_SHIFT > vma.end:
            return False
        ptes, zero = mm.ptes, self.phys.zero_page
        return all(ptes.get(v, zero) is zero for v in range(first, first + HPAGE_PMD_NR))

    def _alloc_thp(self, mm: MmStruct, vma: Vma, vpn: int) -> bool:
        """Fault in a zero-filled THP for *vpn*'s extent, mapped by PMD (``do_huge_pmd_anonymous_page``).

        False when the 512 frames cannot be had: the caller takes a small page.
        """
        first = vpn & ~(HPAGE_PMD_NR - 1)
        thp = self.phys.alloc_thp(self.phys.zero_data, self._node(vma), first)
        if thp is None:
            return False
        ptes = mm.ptes
        for i, frame in enumerate(thp.frames):
            if first + i in ptes:
                self.zap_pte(mm, first + i)  # the zero page a read mapped
            self._map(mm, first + i, frame)
        self.map_thp_pmd(mm, first, thp)
        return True

    def zap_range(self, mm: MmStruct, start: int, end: int) -> None:
        """Unmap every page in [start, end) (``zap_page_range_single``)."""
        for vpn in present_vpns(mm, start, end):
            self.zap_pte(mm, vpn)

    def remove_vma(self, mm: MmStruct, vma: Vma) -> None:
        """Take *vma* out of *mm* and drop its file reference (``remove_vma`` + ``fput``).

        When the last vma of a shmem object goes, the object is gone and its
        pages are freed; a host file keeps its page cache.
        """
        mm.vmas.pop(mm.vma_index(vma))
        file = vma.file
        if file is None:
            return
        file.nr_vmas -= 1
        vm_bug_on(file.nr_vmas < 0, f"negative vma count on {file.name}")
        if file.nr_vmas == 0 and file.shmem:
            for page in file.pagecache.values():
                self.phys.free(page)
            file.pagecache.clear()

    def replace_pte(self, mm: MmStruct, vpn: int, new: Frame) -> None:
        """Point the PTE at *vpn* to *new* instead of its current frame."""
        self.zap_pte(mm, vpn)
        self._map(mm, vpn, new)

    # --- faults ----------------------------------------------------------------------
    def handle_mm_fault(self, mm: MmStruct, vma: Vma, addr: int, *, write: bool = False,
                        unshare: bool = False) -> Fault:
        """Make *addr* readable (or privately writable if *write*) (``handle_mm_fault``).

        ``unshare`` is ``FAULT_FLAG_UNSHARE`` as break_ksm raises it: replace a
        KSM page or a KSM-placed zero page by a private copy, touch nothing else.
        """
        vpn = addr >> PAGE_SHIFT
        frame = mm.ptes.get(vpn)
        if frame is None:
            if unshare:
                return Fault.OK
            return self._do_fault_none(mm, vma, vpn, write=write)
        if unshare:
            if frame is self.phys.ksm_zero_page or frame.ksm:
                return self._do_wp_page(mm, vma, vpn, frame)
            return Fault.OK
        if write:
            if not self.can_write_in_place(vma, frame):
                return self._do_wp_page(mm, vma, vpn, frame)  # (splits a PMD in zap_pte)
            thp = frame.thp
            if thp is not None and thp.mapcount > HPAGE_PMD_NR:
                first = vpn & ~(HPAGE_PMD_NR - 1)
                if mm.pmds.get(first) is thp:
                    # Another mm (a fork relative) maps part of this THP: the writer's PMD is
                    # split; the page itself is written in place, as a small page would be.
                    self.split_pmd(mm, first)
        return Fault.OK

    def can_write_in_place(self, vma: Vma, frame: Frame) -> bool:
        """Whether a write may go to *frame* itself (shared mapping, or exclusive anon page)."""
        if vma.flags & VM_SHARED:
            return True
        return frame.anon and not frame.ksm and not frame.zero and frame.mapcount == 1

    def _do_fault_none(self, mm: MmStruct, vma: Vma, vpn: int, *, write: bool) -> Fault:
        if vma.file is not None:
            pgoff = vma.linear_pgoff(vpn << PAGE_SHIFT)
            page = vma.file.pagecache.get(pgoff)
            if page is None:
                data = (self.phys.zero_data if vma.file.shmem
                        else self.phys.page_content(vma.file.page_data(pgoff)))
                page = self.phys.alloc(data, self._node(vma), anon=False)
                if page is None:
                    return Fault.OOM
                vma.file.pagecache[pgoff] = page
            if write and not vma.flags & VM_SHARED:
                return self._cow_copy(mm, vma, vpn, page.data, old=None)
            self._map(mm, vpn, page)
            if not write:
                self._fault_around(mm, vma, vpn)
            return Fault.OK
        if not write:
            # do_anonymous_page maps the shared zero page on a read; no anon_vma needed.
            self._map(mm, vpn, self.phys.zero_page)
            return Fault.OK
        return self._cow_copy(mm, vma, vpn, self.phys.zero_data, old=None)

    def _fault_around(self, mm: MmStruct, vma: Vma, vpn: int) -> None:
        """Map the cached pages around a read fault on a file or shmem area (``do_fault_around``).

        ``do_read_fault`` also maps every page already in the page cache
        within the 16-page (``fault_around_bytes`` = 64 KiB) aligned window of
        the faulting address, clipped to the vma and to its page table, where
        no PTE exists yet (``filemap_map_pages``).  The window depends on the
        absolute address (found by the differential suite on Linux 6.18: a
        fork child's read of one page of a shared area mapped 16).
        """
        assert vma.file is not None
        pte_off = vpn % PTRS_PER_PTE
        vma_off = vpn - (vma.start >> PAGE_SHIFT)
        from_pte = max(pte_off - pte_off % FAULT_AROUND_PAGES, pte_off - min(pte_off, vma_off))
        to_pte = min(from_pte + FAULT_AROUND_PAGES, PTRS_PER_PTE,
                     pte_off + vma.pages - vma_off)
        for v in range(vpn - pte_off + from_pte, vpn - pte_off + to_pte):
            if v not in mm.ptes:
                page = vma.file.pagecache.get(vma.linear_pgoff(v << PAGE_SHIFT))
                if page is not None:
                    self._map(mm, v, page)

    def _do_wp_page(self, mm: MmStruct, vma: Vma, vpn: int, old: Frame) -> Fault:
        if old.ksm:
            self.cow_ksm += 1
        return self._cow_copy(mm, vma, vpn, old.data, old=old)

    def _cow_copy(self, mm: MmStruct, vma: Vma, vpn: int, data: bytes,
                  old: Frame | None) -> Fault:
        self.anon_vma_prepare(mm, vma)
        if ((old is None or old is self.phys.zero_page) and self.thp_eligible(mm, vma, vpn)
                and self._alloc_thp(mm, vma, vpn)):
            return Fault.OK
        new = self.phys.alloc(data, self._node(vma), anon=True)
        if new is None:
            return Fault.OOM
        if old is not None:
            self.zap_pte(mm, vpn)
        self._map(mm, vpn, new)
        return Fault.OK

    # --- user access -------------------------------------------------------------------
    def write_page(self, mm: MmStruct, vma: Vma, addr: int, offset: int, chunk: bytes) -> Fault:
        """Write *chunk* at *offset* of the page at *addr*, faulting as a CPU store would.

        Byte mode only: a partial write needs the page's bytes (SimProcess.write
        refuses one in fingerprint mode before calling this).
        """
        if len(chunk) == PAGE_SIZE:
            return self.store_page(mm, vma, addr, self.phys.page_content(chunk))
        fault = self.handle_mm_fault(mm, vma, addr, write=True)
        if fault is not Fault.OK:
            return fault
        frame = mm.ptes[addr >> PAGE_SHIFT]
        vm_bug_on(not self.can_write_in_place(vma, frame), f"write to protected {frame!r}")
        frame.data = frame.data[:offset] + chunk + frame.data[offset + len(chunk):]
        return Fault.OK

    def store_page(self, mm: MmStruct, vma: Vma, addr: int, content: bytes) -> Fault:
        """Replace the whole page at *addr* by *content* (already in the machine's
        content mode), faulting as a CPU store of a full page would."""
        fault = self.handle_mm_fault(mm, vma, addr, write=True)
        if fault is not Fault.OK:
            return fault
        frame = mm.ptes[addr >> PAGE_SHIFT]
        vm_bug_on(not self.can_write_in_place(vma, frame), f"write to protected {frame!r}")
        frame.data = content
        return Fault.OK

    def read_page(self, mm: MmStruct, vma: Vma, addr: int) -> tuple[Fault, bytes]:
        """The content of the page at *addr*, faulting it in as a CPU load would."""
        fault = self.handle_mm_fault(mm, vma, addr)
        if fault is not Fault.OK:
            return fault, b""
        return Fault.OK, mm.ptes[addr >> PAGE_SHIFT].data

    # --- fork ---------------------------------------------------------------------------
    def copy_page_range(self, dst: MmStruct, src: MmStruct, vma: Vma) -> None:
        """Share *vma*'s mapped pages with the child (``copy_page_range``).

        Like the kernel, areas without an anon_vma are not copied: the child
        faults their pages in again when it touches them.
        """
        if vma.anon_vma is None:
            return
        first, last = vma.start >> PAGE_SHIFT, vma.end >> PAGE_SHIFT
        for vpn in range(first, last):
            frame = src.ptes.get(vpn)
            if frame is not None:
                self.copy_present_pte(dst, vpn, frame)
        for extent, thp in src.pmds.items():  # copy_huge_pmd: the child maps it by PMD too
            if first <= extent < last:
                self.map_thp_pmd(dst, extent, thp)

    def copy_present_pte(self, dst: MmStruct, vpn: int, frame: Frame) -> None:
        """Map the parent's page *frame* at *vpn* of the child *dst* too (``copy_present_pte``):
        one more mapping of the same page, copy-on-write for both."""
        self._map(dst, vpn, frame)


def _anon_vma_compatible(a: Vma, b: Vma) -> bool:
    """``anon_vma_compatible``: *a* directly precedes *b* and could share its anon_vma."""
    return (a.end == b.start and a.file is b.file
            and not (a.flags ^ b.flags) & ~_ANON_COMPAT_IGNORE
            and b.pgoff == a.pgoff + ((b.start - a.start) >> PAGE_SHIFT))


def present_vpns(mm: MmStruct, start: int, end: int) -> list[int]:
    """Page numbers in [start, end) that have a page-table entry, in address order."""
    first, last = start >> PAGE_SHIFT, end >> PAGE_SHIFT
    if last - first <= 4 * len(mm.ptes):
        return [v for v in range(first, last) if v in mm.ptes]
    return sorted(v for v in mm.ptes if first <= v < last)
