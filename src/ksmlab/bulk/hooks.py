"""KSM's entry points on a bulk machine's address spaces (``mm/ksm.c``'s hooks).

What mm/ksm.c offers the rest of the kernel, for :class:`ksmlab.bulk.BulkKernel`:
registering an mm with ksmd (``__ksm_enter``) and letting it go at exit
(``__ksm_exit``), the exec and mmap hooks of merge-any (``ksm_execve``,
``ksm_vma_flags``), prctl's ``ksm_enable_merge_any`` / ``ksm_disable_merge_any``,
and the end of an address space (``mmput``, at exit or exec).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from ksmlab.bulk.columns import ABSENT, NO_FRAME
from ksmlab.bulk.engine import BulkKsm
from ksmlab.bulk.mm import BulkMm
from ksmlab.ksm.ksmd import Ksmd


class KsmHooks:
    """The entry points (a mixin of :class:`~ksmlab.bulk.BulkKernel`, which owns ``ksm``
    and ``ksmd``)."""

    ksm: BulkKsm
    ksmd: Ksmd

    def ksm_enter(self, mm: BulkMm) -> None:
        """Register *mm* just behind ksmd's cursor (``__ksm_enter``)."""
        needs_wakeup = self.ksm.list_empty()
        mm.list_add_before(self.ksm.cursor)
        mm.registered = True
        if needs_wakeup:
            self.ksmd.wake_up()

    def ksm_exit(self, mm: BulkMm) -> None:
        """``__ksm_exit``: unregister at once if ksmd holds nothing of *mm*, else leave it to ksmd."""
        if not mm.registered or self.ksm.cursor is mm:
            return
        pages = self.ksm.pages
        if not any(bool((pages.state[s.row:s.row + s.pages] != ABSENT).any())
                   for s in mm.ranges()):
            self.ksm.unregister(mm)
        else:
            mm.list_del()
            mm.list_add_after(self.ksm.cursor)

    def ksm_execve(self, mm: BulkMm) -> None:
        """Exec hook: register the new *mm* of a merge-any process (``ksm_execve``)."""
        if mm.merge_any:
            self.ksm_enter(mm)

    def ksm_vma_flags(self, mm: BulkMm) -> bool:
        """Whether a new mapping of *mm* is born mergeable (``ksm_vma_flags``): under
        merge-any, registering *mm* again if ksmd dropped its slot (6.18)."""
        if not mm.merge_any:
            return False
        if not mm.registered:
            self.ksm_enter(mm)
        return True

    def ksm_enable_merge_any(self, mm: BulkMm) -> None:
        """prctl(PR_SET_MEMORY_MERGE, 1) (``ksm_enable_merge_any``): nothing if already on
        (mappings unmarked since stay so); else register *mm* and mark every mapping."""
        if mm.merge_any:
            return
        if not mm.registered:
            self.ksm_enter(mm)
        mm.merge_any = True
        self.ksm.mutations += 1
        for seg in mm.segments:  # ksm_add_vmas: every mapping here is KSM-compatible
            self.ksm.pages.mergeable[seg.row:seg.row + seg.pages] = True

    def ksm_disable_merge_any(self, mm: BulkMm) -> None:
        """prctl(PR_SET_MEMORY_MERGE, 0) (``ksm_disable_merge_any``): nothing if off; else
        every mergeable page, madvised ones too, is unmerged and unmarked.  The mm stays on
        ksmd's list until ksmd finds nothing mergeable in it."""
        if not mm.merge_any:
            return
        self.ksm.mutations += 1
        rows = mm_rows(mm)
        rows = rows[self.ksm.pages.mergeable[rows]]
        self.ksm.break_ksm(rows)  # ksm_del_vmas; no allocation fails here, so no ENOMEM
        self.ksm.pages.mergeable[rows] = False
        mm.merge_any = False

    def mmput(self, mm: BulkMm) -> None:
        """The address space *mm* goes (exit, or exec's old mm): KSM's exit hook, then
        every page is unmapped; ksmd frees the items it still holds when it gets there."""
        self.ksm.mutations += 1
        mm.exiting = True
        self.ksm_exit(mm)
        for seg in mm.segments:
            sl = slice(seg.row, seg.row + seg.pages)
            self.ksm.unmap(self.ksm.pages.frame[sl])
            self.ksm.tally.zero_mapped(self.ksm.pages.frame[sl], -1)
            self.ksm.pages.frame[sl] = NO_FRAME


def mm_rows(mm: BulkMm) -> npt.NDArray[np.int64]:
    """The page rows of every mapping of *mm*, in address order."""
    return np.concatenate([np.arange(s.row, s.row + s.pages, dtype=np.int64)
                           for s in mm.segments] or [np.zeros(0, np.int64)])
