"""mmap, munmap, mprotect and the vma split/merge machinery (``mm/mmap.c``, ``mm/vma.c``)."""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterable

from ksmlab.constants import (
    HPAGE_PMD_SIZE,
    MAP_ANONYMOUS,
    MAP_DROPPABLE,
    MAP_FIXED,
    MAP_FIXED_NOREPLACE,
    MAP_GROWSDOWN,
    MAP_HUGETLB,
    MAP_LOCKED,
    MAP_NORESERVE,
    MAP_POPULATE,
    MAP_PRIVATE,
    MAP_SHARED,
    MAP_SHARED_VALIDATE,
    MAP_TYPE,
    PAGE_SHIFT,
    PAGE_SIZE,
    PROT_EXEC,
    PROT_READ,
    PROT_WRITE,
    TASK_SIZE,
    VM_ACCOUNT,
    VM_DONTDUMP,
    VM_DROPPABLE,
    VM_EXEC,
    VM_GROWSDOWN,
    VM_HUGETLB,
    VM_LOCKED,
    VM_MAYEXEC,
    VM_MAYREAD,
    VM_MAYSHARE,
    VM_MAYWRITE,
    VM_NORESERVE,
    VM_READ,
    VM_SHARED,
    VM_WIPEONFORK,
    VM_WRITE,
)
from ksmlab.errors import KernelError, kernel_error
from ksmlab.mm.memory import Fault, Memory
from ksmlab.mm.mm_types import MappedFile, MmStruct, Vma

PROT_MASK = PROT_READ | PROT_WRITE | PROT_EXEC
_ACCESS = VM_READ | VM_WRITE | VM_EXEC
_PROT_SEM = 0x8
PROT_GROWSDOWN = 0x01000000
PROT_GROWSUP = 0x02000000
_MAX_LFS_FILESIZE = (1 << 63) - 1
_U64 = (1 << 64) - 1


def page_align(n: int) -> int:
    """Round *n* up to a page multiple (``PAGE_ALIGN``)."""
    return (n + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


def calc_vm_prot_bits(prot: int) -> int:
    """VM_READ/WRITE/EXEC for a PROT_* mask."""
    return ((VM_READ if prot & PROT_READ else 0) | (VM_WRITE if prot & PROT_WRITE else 0)
            | (VM_EXEC if prot & PROT_EXEC else 0))




# --- the checks and the placement every engine shares (the bulk engine has no vmas) ---------
def unmapped_area_topdown(spans: Iterable[tuple[int, int]], mmap_base: int, length: int,
                          *, pmd_align: bool = False) -> int:
    """Where a new mapping of *length* bytes goes: the top of the highest gap below
    *mmap_base* that fits it (``vm_unmapped_area``, top-down).

    *spans* are the (start, end) of the mapped areas, highest first; only the
    mapped addresses matter, not how they are cut into vmas.  Raises
    KernelError(ENOMEM) when no gap above the 16-page floor fits.

    *pmd_align*: Linux 6.18 places an anonymous mapping without address hint
    whose length is a multiple of 2 MiB on a 2 MiB boundary, so that it can
    hold transparent huge pages (``thp_get_unmapped_area``; measured, THP
    enabled or not): the highest gap that fits *length* + 2 MiB, the address
    rounded down to 2 MiB; if no gap fits that, the ordinary placement.
    """
    if pmd_align:
        spans = list(spans)
        try:
            top = _gap_top(spans, mmap_base, length + HPAGE_PMD_SIZE)
        except KernelError:
            pass
        else:
            return (top - length) & ~(HPAGE_PMD_SIZE - 1)
    return _gap_top(spans, mmap_base, length) - length


def _gap_top(spans: Iterable[tuple[int, int]], mmap_base: int, length: int) -> int:
    """The top of the highest gap below *mmap_base* that fits *length* bytes."""
    top = mmap_base
    for start, end in spans:
        if start >= top:
            continue
        if end <= top - length:
            return top
        top = start
    if top - length >= PAGE_SIZE * 16:
        return top
    raise kernel_error(errno.ENOMEM, "no room in the address space")


def munmap_end(start: int, length: int) -> int:
    """The end of the range munmap(*start*, *length*) covers, after ``do_vmi_munmap``'s
    checks: an unaligned start, a start at or past TASK_SIZE, a range running past
    it, or a length rounding to 0 are KernelError(EINVAL)."""
    if start % PAGE_SIZE or start >= TASK_SIZE or length > TASK_SIZE - start:
        raise kernel_error(errno.EINVAL, f"munmap({start:#x}, {length:#x})")
    size = page_align(length)
    if size == 0:
        raise kernel_error(errno.EINVAL, "munmap length 0")
    return start + size


def mprotect_args(start: int, length: int, prot: int) -> tuple[int, int, int] | None:
    """``do_mprotect_pkey``'s checks that need no vma, in Linux 6.18's order.

    Returns (end, prot without the GROWS bits, the GROWS bits), or None for a
    zero length (success, nothing to do).  Both GROWS bits, then an unaligned
    start, are KernelError(EINVAL); a range wrapping past 2**64 ENOMEM; then
    unknown PROT bits (PROT_SEM is allowed) EINVAL.
    """
    grows = prot & (PROT_GROWSDOWN | PROT_GROWSUP)
    prot &= ~(PROT_GROWSDOWN | PROT_GROWSUP)
    if grows == PROT_GROWSDOWN | PROT_GROWSUP:
        raise kernel_error(errno.EINVAL, "mprotect cannot grow both ways")
    if start % PAGE_SIZE:
        raise kernel_error(errno.EINVAL, f"mprotect start {start:#x} not page aligned")
    if length == 0:
        return None
    end = start + (page_align(length) & _U64)
    if end <= start or end > _U64:
        raise kernel_error(errno.ENOMEM, "mprotect range overflows")
    if prot & ~(PROT_MASK | _PROT_SEM):
        raise kernel_error(errno.EINVAL, f"mprotect prot {prot:#x}")
    return end, prot, grows


class VmaOps:
    """Address-space operations of one machine.

    Attributes:
        memory: faults and page-table helpers.
        max_map_count: ``vm.max_map_count``: a split that would reach it fails.
    """

    def __init__(self, memory: Memory, max_map_count: int = 65530) -> None:
        self.memory = memory
        self.max_map_count = max_map_count

    # --- merging ---------------------------------------------------------------------
    @staticmethod
    def can_merge(a: Vma, b: Vma, flags_a: int | None = None, flags_b: int | None = None) -> bool:
        """Whether *a* (ending where *b* starts) and *b* could form one vma.

        Models ``is_mergeable_vma`` + ``is_mergeable_anon_vma``: same flags,
        same file with contiguous offsets, compatible anon_vmas, same policy.
        """
        fa = a.flags if flags_a is None else flags_a
        fb = b.flags if flags_b is None else flags_b
        if a.end != b.start or fa != fb or a.file is not b.file or a.nid != b.nid:
            return False
        if b.pgoff != a.pgoff + a.pages:
            return False
        if a.anon_vma is None or b.anon_vma is None:
            other = a if a.anon_vma is not None else b
            return other.anon_vma is None or other.anon_vma_singular
        return a.anon_vma is b.anon_vma

    def _absorb(self, mm: MmStruct, keep: Vma, gone: Vma) -> None:
        """Merge adjacent *gone* into *keep* (they are already known compatible)."""
        if keep.anon_vma is None:
            keep.anon_vma, keep.anon_vma_singular = gone.anon_vma, gone.anon_vma_singular
        if gone.start < keep.start:
            keep.start, keep.pgoff = gone.start, gone.pgoff
        else:
            keep.end = gone.end
        self.memory.remove_vma(mm, gone)

    def split_vma(self, mm: MmStruct, vma: Vma, addr: int) -> Vma:
        """Split *vma* at *addr*; return the upper part (``__split_vma``).

        Raises KernelError(ENOMEM) when map_count has reached max_map_count.
        """
        if mm.map_count >= self.max_map_count:
            raise kernel_error(errno.ENOMEM, "vm.max_map_count reached")
        upper = Vma(addr, vma.end, vma.flags, vma.linear_pgoff(addr), vma.file, vma.anon_vma,
                    vma.anon_vma_singular, vma.nid)
        self.memory.split_pmd_at(mm, addr)
        vma.end = addr
        mm.insert_vma(upper)
        return upper

    def vma_modify_flags(self, mm: MmStruct, vma: Vma, start: int, end: int,
                         newflags: int) -> Vma:
        """Give [start, end) of *vma* the flags *newflags*, merging or splitting as needed.

        Models ``vma_modify_flags``: first try to merge the range with the
        previous and/or next vma, else split *vma* at start and/or end.
        Returns the vma now covering [start, end).  A failed split raises
        KernelError(ENOMEM); a first split that succeeded stays.
        """
        if newflags == vma.flags:
            return vma
        i = mm.vma_index(vma)
        prev = mm.vmas[i - 1] if i > 0 else None
        nxt = mm.vmas[i + 1] if i + 1 < len(mm.vmas) else None
        piece = Vma(start, end, newflags, vma.linear_pgoff(start), vma.file, vma.anon_vma,
                    vma.anon_vma_singular, vma.nid)
        left = (start == vma.start and prev is not None
                and self.can_merge(prev, piece))
        right = (end == vma.end and nxt is not None and self.can_merge(piece, nxt))
        if left and right:
            assert prev is not None and nxt is not None
            if not (prev.anon_vma is None or nxt.anon_vma is None
                    or prev.anon_vma is nxt.anon_vma):
                right = False  # prev and next cannot share one anon_vma
        if left:
            assert prev is not None
            if end == vma.end:
                self._absorb(mm, prev, vma)
            else:
                self.memory.split_pmd_at(mm, end)
                prev.end = end
                vma.start, vma.pgoff = end, vma.linear_pgoff(end)
                if prev.anon_vma is None:
                    prev.anon_vma, prev.anon_vma_singular = vma.anon_vma, vma.anon_vma_singular
            if right:
                assert nxt is not None
                self._absorb(mm, prev, nxt)
            return prev
        if right:
            assert nxt is not None
            if start == vma.start:
                self._absorb(mm, nxt, vma)
            else:
                self.memory.split_pmd_at(mm, start)
                vma.end = start
                nxt.start, nxt.pgoff = start, piece.pgoff
                if nxt.anon_vma is None:
                    nxt.anon_vma, nxt.anon_vma_singular = vma.anon_vma, vma.anon_vma_singular
            return nxt
        target = vma
        if start > target.start:
            target = self.split_vma(mm, target, start)
        if end < target.end:
            self.split_vma(mm, target, end)
        target.flags = newflags
        return target

    # --- mmap ----------------------------------------------------------------------
    def get_unmapped_area(self, mm: MmStruct, length: int, hint: int, *,
                          anonymous: bool = False) -> int:
        """Pick an address for a new mapping: the hint if free, else top-down below
        mmap_base (2 MiB-aligned for an *anonymous* one of a multiple of 2 MiB with no
        hint, see :func:`unmapped_area_topdown`)."""
        if hint and hint + length <= TASK_SIZE and self._is_free(mm, hint, hint + length):
            return hint
        return unmapped_area_topdown(((v.start, v.end) for v in reversed(mm.vmas)),
                                     mm.mmap_base, length,
                                     pmd_align=anonymous and not hint
                                     and length % HPAGE_PMD_SIZE == 0)

    @staticmethod
    def _is_free(mm: MmStruct, start: int, end: int) -> bool:
        vma = mm.find_vma(start)
        return vma is None or vma.start >= end

    def do_mmap(self, mm: MmStruct, length: int, prot: int, flags: int, *, addr: int,
                file: MappedFile | None, offset: int, nid: int | None,
                extra_vm_flags: int = 0,
                ksm_vma_flags: Callable[[MmStruct, Vma], int]) -> int:
        """Create a mapping and return its address (``do_mmap`` + ``mmap_region``).

        Unknown PROT_* bits are ignored, as Linux 6.18 does (checked: prot
        0x80 or -1 maps ``---p`` or ``rwxp``).
        """
        if length <= 0:
            raise kernel_error(errno.EINVAL, f"mmap length {length}")
        if offset % PAGE_SIZE:
            raise kernel_error(errno.EINVAL, f"mmap offset {offset:#x} not page aligned")
        size = page_align(length)
        if size > TASK_SIZE:
            raise kernel_error(errno.ENOMEM, f"mmap length {length:#x}")
        maptype = flags & MAP_TYPE
        if maptype not in (MAP_SHARED, MAP_PRIVATE, MAP_SHARED_VALIDATE, MAP_DROPPABLE):
            raise kernel_error(errno.EINVAL, f"mmap flags {flags:#x}: bad map type")
        anonymous = bool(flags & MAP_ANONYMOUS)
        if not anonymous and file is None:
            raise kernel_error(errno.EBADF, "mmap of a file needs a path")
        if not anonymous and (offset & _U64) >> PAGE_SHIFT > (_MAX_LFS_FILESIZE - size) >> PAGE_SHIFT:
            # A file offset (an unsigned page offset in the kernel) past the largest
            # file: EOVERFLOW (checked on Linux 6.18 with offset=-4096).
            raise kernel_error(errno.EOVERFLOW, f"mmap offset {offset:#x}")
        if maptype == MAP_DROPPABLE and not anonymous:
            raise kernel_error(errno.EINVAL, "MAP_DROPPABLE needs MAP_ANONYMOUS")
        fixed = bool(flags & (MAP_FIXED | MAP_FIXED_NOREPLACE))
        if fixed and addr % PAGE_SIZE:
            raise kernel_error(errno.EINVAL, f"MAP_FIXED address {addr:#x} not page aligned")
        vm_flags = calc_vm_prot_bits(prot) | VM_MAYREAD | VM_MAYWRITE | VM_MAYEXEC
        shared = maptype in (MAP_SHARED, MAP_SHARED_VALIDATE)
        if shared:
            vm_flags |= VM_SHARED | VM_MAYSHARE
            if anonymous:
                file = MappedFile("/dev/zero (deleted)", b"", shmem=True)
                offset = 0
        elif maptype == MAP_DROPPABLE:
            vm_flags |= VM_DROPPABLE | VM_WIPEONFORK | VM_DONTDUMP
        if flags & MAP_HUGETLB:
            vm_flags |= VM_HUGETLB
        if flags & MAP_LOCKED:
            vm_flags |= VM_LOCKED
        if flags & MAP_GROWSDOWN:
            vm_flags |= VM_GROWSDOWN
        if flags & MAP_NORESERVE:
            vm_flags |= VM_NORESERVE
        elif not shared and vm_flags & VM_WRITE:
            vm_flags |= VM_ACCOUNT
        vm_flags |= extra_vm_flags
        if fixed:
            start = addr
            if start + size > TASK_SIZE:
                raise kernel_error(errno.ENOMEM, "mapping beyond TASK_SIZE")
            if not self._is_free(mm, start, start + size):
                if flags & MAP_FIXED_NOREPLACE:
                    raise kernel_error(errno.EEXIST, f"{start:#x} already mapped")
                self.do_munmap(mm, start, size)
        else:
            # MAP_SHARED|MAP_ANONYMOUS has its shmem file already (shmem's own
            # placement aligns only for huge shmem, not modelled).
            start = self.get_unmapped_area(mm, size, addr & ~(PAGE_SIZE - 1),
                                           anonymous=file is None)
        if mm.map_count >= self.max_map_count:
            raise kernel_error(errno.ENOMEM, "vm.max_map_count reached")
        pgoff = offset >> PAGE_SHIFT if file is not None else start >> PAGE_SHIFT
        vma = Vma(start, start + size, vm_flags, pgoff, file, None, True, nid)
        vma.flags |= ksm_vma_flags(mm, vma)
        mm.insert_vma(vma)
        vma = self._merge_new(mm, vma)
        if flags & MAP_POPULATE:
            write = bool(vma.flags & VM_WRITE) and not vma.flags & VM_SHARED
            for a in range(start, start + size, PAGE_SIZE):
                if self.memory.handle_mm_fault(mm, vma, a, write=write) is Fault.OOM:
                    break
        return start

    def _merge_new(self, mm: MmStruct, vma: Vma) -> Vma:
        """Merge a freshly inserted vma with compatible neighbours (``vma_merge_new_range``)."""
        i = mm.vma_index(vma)
        prev = mm.vmas[i - 1] if i > 0 else None
        nxt = mm.vmas[i + 1] if i + 1 < len(mm.vmas) else None
        left = prev is not None and self.can_merge(prev, vma)
        right = nxt is not None and self.can_merge(vma, nxt)
        if left and right:
            assert prev is not None and nxt is not None
            # can_vma_merge_right: prev and next must also suit each other;
            # if they do not, the kernel merges with prev only (found by the
            # differential suite: the model used to prefer next).
            right = (prev.anon_vma is None or nxt.anon_vma is None
                     or prev.anon_vma is nxt.anon_vma)
        if right:
            assert nxt is not None
            self._absorb(mm, vma, nxt)
        if left:
            assert prev is not None
            self._absorb(mm, prev, vma)
            return prev
        return vma

    # --- munmap ------------------------------------------------------------------
    def do_munmap(self, mm: MmStruct, start: int, length: int) -> None:
        """Unmap [start, start+length) (``do_vmi_munmap``)."""
        end = munmap_end(start, length)
        victims = [v for v in mm.vmas if v.start < end and v.end > start]
        if not victims:
            return
        # The kernel needs room for the extra vma a split in the middle creates.
        if (victims[0].start < start and victims[-1].end > end
                and mm.map_count >= self.max_map_count):
            raise kernel_error(errno.ENOMEM, "vm.max_map_count reached")
        for vma in victims:
            if vma.start < start:
                vma = self.split_vma(mm, vma, start)
            if vma.end > end:
                self.split_vma(mm, vma, end)
            self.memory.zap_range(mm, vma.start, vma.end)
            self.memory.remove_vma(mm, vma)

    # --- mprotect ------------------------------------------------------------------
    def do_mprotect(self, mm: MmStruct, start: int, length: int, prot: int) -> None:
        """Change protections of [start, start+length) (``do_mprotect_pkey``).

        The checks come in Linux 6.18's order (each checked on the real
        kernel): both GROWSDOWN and GROWSUP, then an unaligned start, are
        EINVAL; a zero length succeeds; a range wrapping past 2**64 is
        ENOMEM; then unknown PROT bits (PROT_SEM is allowed) are EINVAL; then
        an unmapped start is ENOMEM; PROT_GROWSDOWN needs a VM_GROWSDOWN area
        (which it extends down to the area's start) and PROT_GROWSUP one that
        grows up, which x86-64 has not (EINVAL).
        """
        checked = mprotect_args(start, length, prot)
        if checked is None:
            return
        end, prot, grows = checked
        vma = mm.find_vma(start)
        if vma is None or vma.start >= end:
            raise kernel_error(errno.ENOMEM, f"{start:#x} is not mapped")
        if grows == PROT_GROWSDOWN:
            if not vma.flags & VM_GROWSDOWN:
                raise kernel_error(errno.EINVAL, "PROT_GROWSDOWN on an area that does not grow")
            start = vma.start
        elif vma.start > start:
            raise kernel_error(errno.ENOMEM, f"{start:#x} is not mapped")
        elif grows:
            raise kernel_error(errno.EINVAL, "PROT_GROWSUP: x86-64 has no VM_GROWSUP area")
        newbits = calc_vm_prot_bits(prot)
        pos = start
        while pos < end:
            vma = mm.find_vma(pos)
            if vma is None or vma.start > pos:
                raise kernel_error(errno.ENOMEM, f"{pos:#x} is not mapped")
            if newbits & VM_WRITE and not vma.flags & VM_MAYWRITE:
                raise kernel_error(errno.EACCES, "area cannot be made writable")
            piece_end = min(end, vma.end)
            newflags = (vma.flags & ~_ACCESS) | newbits
            if newbits & VM_WRITE and not vma.flags & (VM_SHARED | VM_NORESERVE):
                newflags |= VM_ACCOUNT
            elif (not newbits & VM_WRITE and vma.flags & VM_ACCOUNT and vma.is_anonymous()
                  and vma.anon_vma is None):
                # mprotect_fixup: a private anonymous area that never had a page
                # gives its commit charge back when it stops being writable, so
                # it may then merge with a never-writable neighbour (found by
                # the differential suite against Linux 6.18).
                newflags &= ~VM_ACCOUNT
            self.vma_modify_flags(mm, vma, pos, piece_end, newflags)
            pos = piece_end

