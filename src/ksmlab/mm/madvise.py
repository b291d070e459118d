"""madvise(2) (``mm/madvise.c``): argument checks, the vma walk, and the advices the model knows."""

from __future__ import annotations

import errno
from collections.abc import Callable

from ksmlab.constants import (
    MADV_COLD,
    MADV_DODUMP,
    MADV_DOFORK,
    MADV_DONTDUMP,
    MADV_DONTFORK,
    MADV_DONTNEED,
    MADV_FREE,
    MADV_HUGEPAGE,
    MADV_KEEPONFORK,
    MADV_MERGEABLE,
    MADV_NOHUGEPAGE,
    MADV_NORMAL,
    MADV_PAGEOUT,
    MADV_RANDOM,
    MADV_SEQUENTIAL,
    MADV_UNMERGEABLE,
    MADV_WILLNEED,
    MADV_WIPEONFORK,
    PAGE_SIZE,
    VM_DONTCOPY,
    VM_DONTDUMP,
    VM_HUGEPAGE,
    VM_IO,
    VM_LOCKED,
    VM_NOHUGEPAGE,
    VM_PFNMAP,
    VM_SHARED,
    VM_WIPEONFORK,
)
from ksmlab.errors import KernelError, kernel_error
from ksmlab.mm.mm_types import MmStruct, Vma
from ksmlab.mm.mmap import VmaOps, page_align

U64 = (1 << 64) - 1

# Advices that only set or clear vma flags: advice -> (set, clear).  VM_HUGEPAGE
# makes later write faults take transparent huge pages (ksmlab.mm.memory; host
# THP mode "madvise"); setting or clearing it splits nothing already there.
_FLAG_ADVICE = {
    MADV_DONTFORK: (VM_DONTCOPY, 0),
    MADV_DOFORK: (0, VM_DONTCOPY),
    MADV_WIPEONFORK: (VM_WIPEONFORK, 0),
    MADV_KEEPONFORK: (0, VM_WIPEONFORK),
    MADV_DONTDUMP: (VM_DONTDUMP, 0),
    MADV_DODUMP: (0, VM_DONTDUMP),
    MADV_HUGEPAGE: (VM_HUGEPAGE, VM_NOHUGEPAGE),
    MADV_NOHUGEPAGE: (VM_NOHUGEPAGE, VM_HUGEPAGE),
}
# Advices accepted as hints with no effect in the model (model choice: no
# readahead or page reclaim, so these change nothing observable here).
_HINTS = {MADV_NORMAL, MADV_RANDOM, MADV_SEQUENTIAL, MADV_WILLNEED, MADV_COLD, MADV_PAGEOUT}

KsmMadvise = Callable[[MmStruct, Vma, int, int, int, int], int]
"""``ksm_madvise(mm, vma, start, end, advice, vm_flags) -> new vm_flags``."""


def madvise_behavior_valid(advice: int, config_ksm: bool) -> bool:
    """Whether the kernel knows *advice* (``madvise_behavior_valid``)."""
    if advice in (MADV_MERGEABLE, MADV_UNMERGEABLE):
        return config_ksm
    return (advice in _FLAG_ADVICE or advice in _HINTS
            or advice in (MADV_DONTNEED, MADV_FREE))


UNMODELLED_ADVICE = frozenset({
    9,    # MADV_REMOVE
    22,   # MADV_POPULATE_READ
    23,   # MADV_POPULATE_WRITE
    24,   # MADV_DONTNEED_LOCKED
    25,   # MADV_COLLAPSE
    102,  # MADV_GUARD_INSTALL
    103,  # MADV_GUARD_REMOVE
})
"""Advices Linux 6.18 accepts (checked on the real kernel: a zero-length madvise of each
value 0..129 succeeds exactly for these and the modelled ones) that the model does not
implement: the engines raise NotModelledError for them."""


def madvise_check(start: int, len_in: int, advice: int, *, config_ksm: bool) -> int:
    """madvise's argument checks: the end of the range, or KernelError(EINVAL).

    *start* and *len_in* are unsigned 64-bit values (see ksmlab.argcheck).
    """
    if not madvise_behavior_valid(advice, config_ksm):
        raise kernel_error(errno.EINVAL, f"unknown or unsupported advice {advice}")
    if start % PAGE_SIZE:
        raise kernel_error(errno.EINVAL, f"start {start:#x} is not page aligned")
    if not 0 <= len_in <= U64 or not 0 <= start <= U64:
        raise kernel_error(errno.EINVAL, "start or length out of range")
    size = page_align(len_in) & U64
    if len_in and not size:
        raise kernel_error(errno.EINVAL, f"length {len_in:#x} overflows")
    end = start + size
    if end > U64:
        raise kernel_error(errno.EINVAL, "start + length wraps around")
    return end


def do_madvise(ops: VmaOps, mm: MmStruct, start: int, len_in: int, advice: int, *,
               config_ksm: bool, ksm_madvise: KsmMadvise) -> None:
    """madvise(start, len_in, advice) on *mm*; raises KernelError like the syscall.

    Every mapped part of the range is processed even when the range has
    holes; ENOMEM for the holes is reported at the end.  A real error from
    one vma stops the walk; vmas already processed keep their new state.
    """
    end = madvise_check(start, len_in, advice, config_ksm=config_ksm)
    if end == start:
        return
    unmapped_error = 0
    prev: Vma | None = None
    vma = mm.find_vma(start)
    while True:
        if vma is None:
            raise kernel_error(errno.ENOMEM, f"{start:#x}.. is not mapped")
        if start < vma.start:
            unmapped_error = errno.ENOMEM
            start = vma.start
            if start >= end:
                break
        tmp = min(vma.end, end)
        prev = _madvise_vma(ops, mm, vma, start, tmp, advice, ksm_madvise)
        start = tmp
        if start < prev.end:
            start = prev.end
        if start >= end:
            break
        vma = mm.find_vma(prev.end)
    if unmapped_error:
        raise kernel_error(unmapped_error, "part of the range is not mapped")


def _madvise_vma(ops: VmaOps, mm: MmStruct, vma: Vma, start: int, end: int, advice: int,
                 ksm_madvise: KsmMadvise) -> Vma:
    """Apply *advice* to [start, end) inside *vma*; return the vma now covering it."""
    if advice in (MADV_DONTNEED, MADV_FREE):
        if vma.flags & (VM_LOCKED | VM_PFNMAP | VM_IO):
            raise kernel_error(errno.EINVAL, "cannot discard pages of a locked or special area")
        if advice == MADV_FREE and vma.flags & VM_SHARED:
            raise kernel_error(errno.EINVAL, "MADV_FREE on a shared area")
        # Model choice: MADV_FREE discards at once, as if reclaim ran immediately.
        ops.memory.zap_range(mm, start, end)
        return vma
    if advice in _HINTS:
        return vma
    new_flags = vma.flags
    try:
        if advice in (MADV_MERGEABLE, MADV_UNMERGEABLE):
            new_flags = ksm_madvise(mm, vma, start, end, advice, new_flags)
        else:
            set_, clear = _FLAG_ADVICE[advice]
            if advice == MADV_WIPEONFORK and (vma.flags & VM_SHARED or vma.file is not None):
                raise kernel_error(errno.EINVAL, "MADV_WIPEONFORK needs private anonymous memory")
            new_flags = (new_flags | set_) & ~clear
        if new_flags == vma.flags:
            return vma
        return ops.vma_modify_flags(mm, vma, start, end, new_flags)
    except KernelError as e:
        # madvise reports out-of-memory from a per-vma step as EAGAIN.
        if e.errno == errno.ENOMEM:
            raise kernel_error(errno.EAGAIN, e.strerror or "out of memory") from None
        raise
