"""The mm side of fork and exit: copying and tearing down an address space.

Models the address-space part of ``kernel/fork.c`` (``dup_mm``,
``dup_mmap``, ``mmput``) and of ``mm/mmap.c`` (``exit_mmap``).  KSM's
callouts are passed in as plain callables, as the kernel's ``ksm_fork`` and
``ksm_exit`` are inline wrappers that call into KSM only for an mm with
MMF_VM_MERGEABLE: the mm slice does not depend on KSM's state.  The process
side (pids, the process table) stays in :mod:`ksmlab.kernel`.
"""

from __future__ import annotations

from collections.abc import Callable

from ksmlab.constants import MMF_VM_MERGE_ANY, VM_DONTCOPY, VM_WIPEONFORK
from ksmlab.mm.memory import Memory
from ksmlab.mm.mm_types import AnonVma, MmStruct, Vma

MMF_INIT_MASK = 1 << MMF_VM_MERGE_ANY
"""The mm flags fork and exec carry into the new mm (of those the model has)."""

KsmForkHook = Callable[[MmStruct, MmStruct], None]
"""``ksm_fork(child, parent)``."""

KsmExitHook = Callable[[MmStruct], None]
"""``ksm_exit(mm)``."""


def mmf_init_flags(flags: int) -> int:
    """The flags a new mm inherits from *flags* (``mmf_init_flags``)."""
    return flags & MMF_INIT_MASK


def dup_mmap(mm: MmStruct, oldmm: MmStruct, memory: Memory, ksm_fork: KsmForkHook) -> None:
    """Copy *oldmm*'s vmas and page tables into the new *mm* (``dup_mmap``).

    VM_DONTCOPY areas are left out; VM_WIPEONFORK areas are copied empty.
    Anonymous pages are shared copy-on-write (``copy_page_range``).  KSM's
    fork hook runs after the copy succeeded, as in 6.18.
    """
    mm.mmap_base = oldmm.mmap_base
    for vma in oldmm.vmas:
        if vma.flags & VM_DONTCOPY:
            continue
        copy = Vma(vma.start, vma.end, vma.flags, vma.pgoff, vma.file, None, True, vma.nid)
        if vma.anon_vma is not None and not vma.flags & VM_WIPEONFORK:
            # anon_vma_fork: the child's chain also links the parent's anon_vma.
            copy.anon_vma, copy.anon_vma_singular = AnonVma(), False
        mm.insert_vma(copy)
        if not vma.flags & VM_WIPEONFORK:
            memory.copy_page_range(mm, oldmm, vma)
    # dup_mm copies the counters; the KSM zero PTEs really are shared.
    # Model choice: count the copied ones (the same unless a
    # DONTCOPY/WIPEONFORK area held KSM zero pages).
    zero = memory.phys.ksm_zero_page
    mm.ksm_zero_pages = sum(1 for f in mm.ptes.values() if f is zero)
    ksm_fork(mm, oldmm)


def dup_mm(oldmm: MmStruct, mm: MmStruct, memory: Memory, ksm_fork: KsmForkHook) -> MmStruct:
    """Make the fresh *mm* a copy of *oldmm* for a fork child and return it (``dup_mm``).

    ``mm_init`` keeps only the inheritable flags; :func:`dup_mmap` does the rest.
    """
    mm.flags = mmf_init_flags(oldmm.flags)
    dup_mmap(mm, oldmm, memory, ksm_fork)
    return mm


def exit_mmap(mm: MmStruct, memory: Memory) -> None:
    """Unmap every page, then free every vma of a dying *mm* (``exit_mmap``)."""
    for vma in mm.vmas:
        memory.zap_range(mm, vma.start, vma.end)
    for vma in list(mm.vmas):
        memory.remove_vma(mm, vma)


def mmput(mm: MmStruct, memory: Memory, ksm_exit: KsmExitHook) -> None:
    """Drop the last user of *mm*: KSM's exit hook, then tear it down (``mmput``/``__mmput``).

    The model has one user per mm, so every mmput is the last one.
    """
    mm.mm_users = 0
    ksm_exit(mm)
    exit_mmap(mm, memory)
