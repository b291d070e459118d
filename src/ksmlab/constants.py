"""The kernel's numeric constants, with the values of Linux on x86-64.

Everything a caller passes to :class:`ksmlab.SimKernel` or
:class:`ksmlab.LinuxKernel` uses these numbers, so a program written against
one backend runs unchanged on the other.  The values are those of the uapi
headers (``asm-generic/mman-common.h``, ``linux/mman.h``, ``linux/prctl.h``)
and of ``include/linux/mm.h`` / ``mm_types.h`` for the in-kernel flags.
"""

from __future__ import annotations

from typing import Final

PAGE_SHIFT: Final = 12
PAGE_SIZE: Final = 1 << PAGE_SHIFT
"""Size of a base page in bytes (4096 on x86-64)."""

HPAGE_PMD_NR: Final = 512
"""Pages of a PMD-mapped transparent huge page (x86-64)."""
HPAGE_PMD_SIZE: Final = HPAGE_PMD_NR * PAGE_SIZE
"""Bytes of a PMD-mapped transparent huge page: 2 MiB, the extent one PMD maps."""

TASK_SIZE: Final = 1 << 47
"""Top of the user address space on x86-64 with 4-level page tables."""

# --- mmap(2) protections ------------------------------------------------------
PROT_NONE: Final = 0x0
PROT_READ: Final = 0x1
PROT_WRITE: Final = 0x2
PROT_EXEC: Final = 0x4

# --- mmap(2) flags -------------------------------------------------------------
MAP_SHARED: Final = 0x01
MAP_PRIVATE: Final = 0x02
MAP_SHARED_VALIDATE: Final = 0x03
MAP_DROPPABLE: Final = 0x08
MAP_TYPE: Final = 0x0F
MAP_FIXED: Final = 0x10
MAP_ANONYMOUS: Final = 0x20
MAP_GROWSDOWN: Final = 0x0100
MAP_DENYWRITE: Final = 0x0800
MAP_EXECUTABLE: Final = 0x1000
MAP_LOCKED: Final = 0x2000
MAP_NORESERVE: Final = 0x4000
MAP_POPULATE: Final = 0x8000
MAP_NONBLOCK: Final = 0x10000
MAP_STACK: Final = 0x20000
MAP_HUGETLB: Final = 0x40000
MAP_FIXED_NOREPLACE: Final = 0x100000

# --- madvise(2) advice -----------------------------------------------------------
MADV_NORMAL: Final = 0
MADV_RANDOM: Final = 1
MADV_SEQUENTIAL: Final = 2
MADV_WILLNEED: Final = 3
MADV_DONTNEED: Final = 4
MADV_FREE: Final = 8
MADV_REMOVE: Final = 9
MADV_DONTFORK: Final = 10
MADV_DOFORK: Final = 11
MADV_MERGEABLE: Final = 12
MADV_UNMERGEABLE: Final = 13
MADV_HUGEPAGE: Final = 14
MADV_NOHUGEPAGE: Final = 15
MADV_DONTDUMP: Final = 16
MADV_DODUMP: Final = 17
MADV_WIPEONFORK: Final = 18
MADV_KEEPONFORK: Final = 19
MADV_COLD: Final = 20
MADV_PAGEOUT: Final = 21

# --- prctl(2) ------------------------------------------------------------------------
PR_SET_MEMORY_MERGE: Final = 67
PR_GET_MEMORY_MERGE: Final = 68

# --- vma flags (include/linux/mm.h, 64-bit) ------------------------------------------
VM_NONE: Final = 0x00000000
VM_READ: Final = 0x00000001
VM_WRITE: Final = 0x00000002
VM_EXEC: Final = 0x00000004
VM_SHARED: Final = 0x00000008
VM_MAYREAD: Final = 0x00000010
VM_MAYWRITE: Final = 0x00000020
VM_MAYEXEC: Final = 0x00000040
VM_MAYSHARE: Final = 0x00000080
VM_GROWSDOWN: Final = 0x00000100
VM_PFNMAP: Final = 0x00000400
VM_LOCKED: Final = 0x00002000
VM_IO: Final = 0x00004000
VM_DONTCOPY: Final = 0x00020000
VM_DONTEXPAND: Final = 0x00040000
VM_ACCOUNT: Final = 0x00100000
VM_NORESERVE: Final = 0x00200000
VM_HUGETLB: Final = 0x00400000
VM_WIPEONFORK: Final = 0x02000000
VM_DONTDUMP: Final = 0x04000000
VM_MIXEDMAP: Final = 0x10000000
VM_HUGEPAGE: Final = 0x20000000
VM_NOHUGEPAGE: Final = 0x40000000
VM_MERGEABLE: Final = 0x80000000
VM_DROPPABLE: Final = 1 << 40
VM_SPECIAL: Final = VM_IO | VM_DONTEXPAND | VM_PFNMAP | VM_MIXEDMAP
"""Areas the core mm must not merge, map pages into, or let KSM touch."""

# --- mm flags (include/linux/mm_types.h) ---------------------------------------------
MMF_VM_MERGEABLE: Final = 16
"""Bit number: the mm has a KSM mm_slot on ksmd's list."""
MMF_VM_MERGE_ANY: Final = 30
"""Bit number: prctl(PR_SET_MEMORY_MERGE) is in effect; inherited on fork and exec."""

# --- KSM -------------------------------------------------------------------------------
KSM_RUN_STOP: Final = 0
KSM_RUN_MERGE: Final = 1
KSM_RUN_UNMERGE: Final = 2

RMAP_ITEM_SIZE: Final = 64
"""sizeof(struct ksm_rmap_item) on 64-bit; used by general_profit and ksm_process_profit."""
