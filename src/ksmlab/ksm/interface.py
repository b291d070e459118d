"""The mm interface to KSM: the entry points the rest of mm calls, and sysfs stores.

This is the part of ``mm/ksm.c`` (and ``include/linux/ksm.h``) the 2009 seed
"ksm: the mm interface to ksm" defined: ``ksm_madvise``, ``__ksm_enter`` and
``__ksm_exit``, the fork and exit callouts (made only for mms that carry
MMF_VM_MERGEABLE), plus what came later: exec, prctl merge-any, and the
sysfs knobs whose writes have side effects, with the whole-tree operations
they run (``run=2``, a new ``max_page_sharing`` or ``merge_across_nodes``).

:class:`Ksm` is that interface (``include/linux/ksm.h``'s side) and owns the
algorithm's state and functions (``mm/ksm.c``'s inside) as its
:attr:`Ksm.core`, a :class:`~ksmlab.ksm.scan.KsmScanner`: composition, so the
entry points and the core are separate objects with no inheritance between them.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Generic, TypeVar, cast, overload

from ksmlab.constants import (
    KSM_RUN_MERGE,
    KSM_RUN_UNMERGE,
    MADV_MERGEABLE,
    MADV_UNMERGEABLE,
    MMF_VM_MERGE_ANY,
    MMF_VM_MERGEABLE,
    VM_MERGEABLE,
)
from ksmlab.errors import kernel_error, vm_bug_on
from ksmlab.ksm import advisor as ksm_advisor
from ksmlab.ksm.advisor import AdvisorCtx, AdvisorKnobs
from ksmlab.ksm.ksm import Tracer, vma_ksm_compatible
from ksmlab.ksm.rbtree import RbRoot
from ksmlab.ksm.scan import KsmScanner
from ksmlab.ksm.types import MmSlot, StableNode, is_stable_node_chain
from ksmlab.mm.memory import Memory
from ksmlab.mm.mm_types import MmStruct, Vma
from ksmlab.mm.slab import Slab

T = TypeVar("T")


class _CoreAttr(Generic[T]):
    """A knob or counter of the core, read and written through :class:`Ksm`.

    The sysfs table (:class:`ksmlab.ksm.sysfs.KsmFiles`) and tests read
    KSM's tunables and counters on the object the kernel holds; they live in
    the core, so these forward to it rather than keep a second copy.
    """

    __slots__ = ("name",)

    def __init__(self) -> None:
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> _CoreAttr[T]: ...

    @overload
    def __get__(self, obj: Ksm, owner: type | None = None) -> T: ...

    def __get__(self, obj: Ksm | None, owner: type | None = None) -> T | _CoreAttr[T]:
        if obj is None:
            return self
        return cast(T, getattr(obj.core, self.name))

    def __set__(self, obj: Ksm, value: T) -> None:
        setattr(obj.core, self.name, value)


class Ksm:
    """KSM as the rest of the kernel sees it: its entry points, over a core it owns.

    :attr:`core` (a :class:`~ksmlab.ksm.scan.KsmScanner`) is ``mm/ksm.c``'s
    inside: the state, the trees, merging and ksmd's walk.  This object is
    ``include/linux/ksm.h``'s side: what madvise, fork, exit, exec, prctl and
    the sysfs stores call.  The two are composed, not a class hierarchy; the
    tunables and counters are readable (and the plain knobs writable) here
    too, forwarded to the core.
    """

    __slots__ = ("core",)  # a stray attribute set on Ksm would silently miss the core: refuse it

    # --- the core's knobs and counters, forwarded (see _CoreAttr) -------------------------------
    run = _CoreAttr[int]()
    pages_to_scan = _CoreAttr[int]()
    sleep_millisecs = _CoreAttr[int]()
    max_page_sharing = _CoreAttr[int]()
    merge_across_nodes = _CoreAttr[int]()
    use_zero_pages = _CoreAttr[bool]()
    smart_scan = _CoreAttr[bool]()
    stable_node_chains_prune_millisecs = _CoreAttr[int]()
    advisor_scan_time = _CoreAttr[bool]()
    advisor = _CoreAttr[AdvisorKnobs]()
    advisor_ctx = _CoreAttr[AdvisorCtx]()
    pages_shared = _CoreAttr[int]()
    pages_sharing = _CoreAttr[int]()
    pages_unshared = _CoreAttr[int]()
    rmap_items = _CoreAttr[int]()
    pages_scanned = _CoreAttr[int]()
    pages_skipped = _CoreAttr[int]()
    stable_node_chains = _CoreAttr[int]()
    stable_node_dups = _CoreAttr[int]()
    ksm_zero_pages = _CoreAttr[int]()
    callouts = _CoreAttr[dict[str, int]]()
    root_stable_tree = _CoreAttr[list[RbRoot]]()
    full_scans = _CoreAttr[int]()
    pages_volatile = _CoreAttr[int]()
    general_profit = _CoreAttr[int]()

    def __init__(self, memory: Memory, slab: Slab, *, numa_nodes: int,
                 now_ms: Callable[[], float], cpu_ns: Callable[[], int],
                 trace: Tracer) -> None:
        self.core = KsmScanner(memory, slab, numa_nodes=numa_nodes, now_ms=now_ms,
                               cpu_ns=cpu_ns, trace=trace)
        """KSM's state and algorithm (``mm/ksm.c``'s internals)."""

    def counter(self, name: str) -> int:
        """The counter file *name* of /sys/kernel/mm/ksm (the core's attribute of that name)."""
        return self.core.counter(name)

    def list_empty(self) -> bool:
        """No mm is registered."""
        return self.core.list_empty()

    def wake_ksmd(self) -> None:
        """Wake ksmd now (the core's ``wake_ksmd``, set by the kernel)."""
        self.core.wake_ksmd()

    # --- entry points from the rest of mm ------------------------------------------------------
    def __ksm_enter(self, mm: MmStruct) -> int:
        """Register *mm* with ksmd (``__ksm_enter``); 0 or ENOMEM."""
        if not self.core.slab.alloc("mm_slot"):
            return errno.ENOMEM
        slot = MmSlot(mm)
        needs_wakeup = self.core.list_empty()
        self.core.mm_slots[mm.id] = slot
        if self.core.run & KSM_RUN_UNMERGE:
            slot.list_add_before(self.core.mm_head)
        else:
            # Just behind the cursor: scanned last in the next full scan, which
            # lets the area settle (and wastes nothing on fork + exec).
            slot.list_add_before(self.core.scan.mm_slot)
        mm.set_flag(MMF_VM_MERGEABLE)
        if needs_wakeup:
            self.core.wake_ksmd()
        self.core.trace("ksm_enter", mm=mm.id)
        return 0

    def __ksm_exit(self, mm: MmStruct) -> None:
        """Unregister an exiting mm, or leave it for ksmd to reap (``__ksm_exit``)."""
        slot = self.core.mm_slots.get(mm.id)
        easy_to_free = False
        if slot is not None and self.core.scan.mm_slot is not slot:
            if slot.rmap_list is None:
                del self.core.mm_slots[mm.id]
                slot.list_del()
                easy_to_free = True
            else:
                slot.list_del()
                slot.list_add_after(self.core.scan.mm_slot)
        if easy_to_free:
            mm.clear_flag(MMF_VM_MERGE_ANY)
            mm.clear_flag(MMF_VM_MERGEABLE)
        self.core.trace("ksm_exit", mm=mm.id)

    def ksm_exit(self, mm: MmStruct) -> None:
        """Exit hook: only mms with MMF_VM_MERGEABLE call into KSM (``ksm_exit``)."""
        if mm.ksm_registered:
            self.core.callouts["ksm_exit"] += 1
            self.__ksm_exit(mm)

    def ksm_fork(self, child: MmStruct, parent: MmStruct) -> None:
        """Fork hook, after a successful address-space copy (``ksm_fork``, 6.18)."""
        if parent.ksm_registered:
            self.core.callouts["ksm_fork"] += 1
            child.ksm_merging_pages = 0
            child.ksm_rmap_items = 0
            self.core.ksm_zero_pages += child.ksm_zero_pages
            self.__ksm_enter(child)  # best effort: a failure does not fail fork

    def ksm_execve(self, mm: MmStruct) -> int:
        """Exec hook: re-register a MERGE_ANY mm (``ksm_execve``); 0 or ENOMEM."""
        if mm.merge_any:
            self.core.callouts["ksm_execve"] += 1
            return self.__ksm_enter(mm)
        return 0

    def ksm_vma_flags(self, mm: MmStruct, vma: Vma) -> int:
        """VM_MERGEABLE for a new vma of a MERGE_ANY process (``ksm_vma_flags``, 6.16+)."""
        if not mm.merge_any or not vma_ksm_compatible(vma):
            return 0
        if not mm.ksm_registered:
            # ksmd dropped the slot (6.18): register again.  The kernel ignores
            # __ksm_enter's result here; the vma is mergeable either way.
            self.__ksm_enter(mm)
        return VM_MERGEABLE

    def ksm_madvise(self, mm: MmStruct, vma: Vma, start: int, end: int, advice: int,
                    vm_flags: int) -> int:
        """New vm_flags for MADV_(UN)MERGEABLE on [start, end) of *vma* (``ksm_madvise``).

        Raises KernelError(ENOMEM) if registering or unmerging runs out of memory.
        """
        if advice == MADV_MERGEABLE:
            if vma.flags & VM_MERGEABLE or not vma_ksm_compatible(vma):
                return vm_flags  # already mergeable, or just ignore the advice
            if not mm.ksm_registered and self.__ksm_enter(mm):
                raise kernel_error(errno.ENOMEM, "cannot allocate a KSM mm_slot")
            return vm_flags | VM_MERGEABLE
        if advice == MADV_UNMERGEABLE:
            if not vm_flags & VM_MERGEABLE:
                return vm_flags
            if vma.anon_vma is not None:
                err = self.core.unmerge_ksm_pages(mm, vma, start, end)
                if err:
                    raise kernel_error(err, "unmerging KSM pages")
            return vm_flags & ~VM_MERGEABLE
        raise ValueError(f"ksm_madvise: unexpected advice {advice}")

    def ksm_add_vmas(self, mm: MmStruct) -> None:
        """Flag every compatible vma VM_MERGEABLE in place (``ksm_add_vmas``)."""
        for vma in mm.vmas:
            if not vma.flags & VM_MERGEABLE and vma_ksm_compatible(vma):
                vma.flags |= VM_MERGEABLE

    def ksm_del_vmas(self, mm: MmStruct) -> int:
        """Unmerge and unflag every mergeable vma (``ksm_del_vmas``); 0 or ENOMEM."""
        for vma in mm.vmas:
            if not vma.flags & VM_MERGEABLE:
                continue
            if vma.anon_vma is not None:
                err = self.core.unmerge_ksm_pages(mm, vma, vma.start, vma.end)
                if err:
                    return err
            vma.flags &= ~VM_MERGEABLE
        return 0

    def ksm_enable_merge_any(self, mm: MmStruct) -> int:
        """prctl(PR_SET_MEMORY_MERGE, 1) (``ksm_enable_merge_any``); 0 or ENOMEM."""
        if mm.merge_any:
            return 0
        if not mm.ksm_registered:
            err = self.__ksm_enter(mm)
            if err:
                return err
        mm.set_flag(MMF_VM_MERGE_ANY)
        self.ksm_add_vmas(mm)
        return 0

    def ksm_disable_merge_any(self, mm: MmStruct) -> int:
        """prctl(PR_SET_MEMORY_MERGE, 0) (``ksm_disable_merge_any``); 0 or ENOMEM."""
        if not mm.merge_any:
            return 0
        err = self.ksm_del_vmas(mm)
        if err:
            self.ksm_add_vmas(mm)
            return err
        mm.clear_flag(MMF_VM_MERGE_ANY)
        return 0

    def ksm_process_mergeable(self, mm: MmStruct) -> bool:
        """Any vma currently VM_MERGEABLE (``ksm_process_mergeable``)."""
        return any(v.flags & VM_MERGEABLE for v in mm.vmas)

    def on_ksm_zero_unmap(self, mm: MmStruct) -> None:
        """A KSM-placed zero PTE went away: decrement both zero-page counts at once."""
        mm.ksm_zero_pages -= 1
        self.core.ksm_zero_pages -= 1

    # --- sysfs stores with side effects ---------------------------------------------------------
    def set_run(self, flags: int) -> None:
        """``run_store`` after parsing: start, stop, or unmerge everything."""
        if self.core.run != flags:
            self.core.run = flags
            if flags & KSM_RUN_UNMERGE:
                err = self.unmerge_and_remove_all_rmap_items()
                if err:
                    self.core.run = 0
                    raise kernel_error(err, "run=2 could not unmerge everything")
        if flags & KSM_RUN_MERGE:
            self.core.wake_ksmd()

    def set_max_page_sharing(self, knob: int) -> None:
        """``max_page_sharing_store`` after parsing; EBUSY while KSM pages exist."""
        if self.core.max_page_sharing == knob:
            return
        if self.core.pages_shared or self.remove_all_stable_nodes():
            raise kernel_error(errno.EBUSY, "KSM pages exist")
        self.core.max_page_sharing = knob

    def set_merge_across_nodes(self, knob: int) -> None:
        """``merge_across_nodes_store`` after parsing; EBUSY while KSM pages exist."""
        if self.core.merge_across_nodes == knob:
            return
        if self.core.pages_shared or self.remove_all_stable_nodes():
            raise kernel_error(errno.EBUSY, "KSM pages exist")
        if not knob and not self.core.slab.alloc("stable_roots"):
            raise kernel_error(errno.ENOMEM, "cannot allocate per-node tree roots")
        self.core.merge_across_nodes = knob

    def set_advisor_mode(self, scan_time: bool) -> None:
        """``advisor_mode_store`` after parsing: a real change resets pages_to_scan
        (:func:`ksmlab.ksm.advisor.set_advisor_mode`, every engine's)."""
        ksm_advisor.set_advisor_mode(self.core, scan_time)

    # --- sysfs-driven whole-tree operations ---------------------------------------------------
    def remove_stable_node(self, node: StableNode) -> int:
        """Remove *node* if its page is no longer mapped; EBUSY otherwise (``remove_stable_node``)."""
        page = self.core.ksm_get_folio(node)
        if page is None:
            return 0
        if page.mapcount:
            return errno.EBUSY
        page.stable_node = None
        self.core.remove_node_from_stable_tree(node)
        return 0

    def remove_stable_node_chain(self, node: StableNode, root: RbRoot) -> bool:
        """Remove a tree node and all its dups; True if one was busy."""
        if not is_stable_node_chain(node):
            return bool(self.remove_stable_node(node))
        for dup in list(node.dups):
            if self.remove_stable_node(dup):
                return True
        vm_bug_on(bool(node.dups), "chain not empty after removing its dups")
        self.core.free_stable_node_chain(node, root)
        return False

    def remove_all_stable_nodes(self) -> int:
        """Remove every removable stable node; EBUSY if some page is still mapped."""
        err = 0
        for root in self.core.root_stable_tree:
            while root.node is not None:
                node = root.node
                assert isinstance(node, StableNode)
                if self.remove_stable_node_chain(node, root):
                    err = errno.EBUSY
                    break
        return err

    def unmerge_and_remove_all_rmap_items(self) -> int:
        """What ``run=2`` does: unmerge everything, free all items (``unmerge_and_remove_all_rmap_items``)."""
        self.core.scan.mm_slot = self.core.mm_head.next
        while (slot := self.core.scan.mm_slot) is not self.core.mm_head:
            mm = slot.mm
            assert mm is not None
            if not self.core.ksm_test_exit(mm):
                for vma in list(mm.vmas):
                    if not vma.flags & VM_MERGEABLE or vma.anon_vma is None:
                        continue
                    err = self.core.unmerge_ksm_pages(mm, vma, vma.start, vma.end)
                    if err:
                        self.core.scan.mm_slot = self.core.mm_head
                        return err
            self.core.remove_trailing_rmap_items(slot, None)
            self.core.scan.mm_slot = slot.next
            if self.core.ksm_test_exit(mm):
                self.core.free_mm_slot(slot, clear_merge_any=True)
        self.remove_all_stable_nodes()
        self.core.scan.seqnr = 0
        return 0
