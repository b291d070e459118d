"""Kernel Samepage Merging: KSM's state, the stable and unstable trees, merging (``mm/ksm.c``).

Overview (our own words for ksm.c's ``DOC: Overview``)
-------------------------------------------------------
ksmd walks the VM_MERGEABLE areas of every registered mm, one page at a time,
and tries to find another page with identical content.  It keeps two trees,
both ordered by page content:

* the **stable tree** holds KSM pages: merged, write-protected pages whose
  content therefore cannot change.  Every mapping of a KSM page is recorded
  by an rmap_item hanging off the page's stable node.
* the **unstable tree** holds ordinary pages seen during the current full
  scan.  Their content can change under ksmd, so the tree is only a hint; it
  is thrown away and rebuilt at every full scan.

Four techniques make the unstable tree usable: (1) it is rebuilt from empty
every full scan; (2) only pages whose checksum did not change since the last
visit are inserted, so hot pages stay out; (3) the stable tree is searched
first; (4) a merge re-checks content with a full comparison while the pages
are write-protected.

A KSM page may be shared by at most ``max_page_sharing`` mappings.  More
identical pages form further KSM pages with the same content ("dups"); the
tree then holds a **chain** node for that content, whose dups are the pages.

The code is split as ksm.c's parts are: this module holds the state, the
trees and ``cmp_and_merge_page``; :mod:`ksmlab.ksm.scan` ksmd's walk over the
registered mms (``ksm_do_scan``): together KSM's core, owned (composition, not a
subclass) by :class:`ksmlab.ksm.interface.Ksm`, the entry points and sysfs stores;
:mod:`ksmlab.ksm.ksmd` the ksmd thread on the virtual clock, shared with the bulk engine.

Model choices (differences from the kernel that are not observable, or are
marked here as deliberate):

* Single-threaded: no locks, no trylock failures, no GUP pins, so
  ``write_protect_page`` always succeeds and no lookup returns -EBUSY.
* No page migration, swap or memory hot-remove: the ``migrate_nodes``
  list is never populated, and KSM pages never change NUMA node.
* Transparent huge pages (:mod:`ksmlab.mm.memory`): a merge attempt on a page
  of a THP splits the THP first (``split_huge_page`` in
  ``try_to_merge_one_page``), which always succeeds except in the one case
  the kernel's refcount makes fail: an unstable-tree match inside the same
  THP (see :meth:`KsmCore.cmp_and_merge_page`).  Inserting a THP page into
  the unstable tree splits nothing (measured on Linux 6.18).
* No signals: unmerging never returns -ERESTARTSYS.
* Slab allocations (mm_slot, rmap_item, stable_node, vma) go through
  :class:`ksmlab.mm.slab.Slab`, whose limit makes ENOMEM paths reachable.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

from ksmlab.constants import (
    MMF_VM_MERGE_ANY,
    MMF_VM_MERGEABLE,
    PAGE_SHIFT,
    VM_DROPPABLE,
    VM_HUGETLB,
    VM_MAYSHARE,
    VM_MERGEABLE,
    VM_SHARED,
    VM_SPECIAL,
)
from ksmlab.errors import ModelInvariantError, vm_bug_on
from ksmlab.ksm import counters
from ksmlab.ksm.cost import KsmdWork
from ksmlab.ksm.rbtree import RbRoot, rb_erase, rb_insert_color, rb_link_node, rb_replace_node
from ksmlab.ksm.tunables import KsmTunables
from ksmlab.ksm.types import (
    SEQNR_MASK,
    KsmScan,
    MmSlot,
    NodeKind,
    RmapItem,
    RmapState,
    StableNode,
    is_stable_node_chain,
    is_stable_node_dup,
)
from ksmlab.mm.memory import Fault, Memory, present_vpns
from ksmlab.mm.mm_types import MmStruct, Vma
from ksmlab.mm.page import Frame, Thp
from ksmlab.mm.slab import Slab

Tracer = Callable[..., None]


def memcmp_pages(a: Frame, b: Frame) -> int:
    """Compare two pages' content like ``memcmp``: negative, zero or positive (``memcmp_pages``).

    Model choice: in fingerprint mode the content is the page's fingerprint,
    so the trees are ordered by fingerprint rather than by the bytes.
    """
    if a.data == b.data:
        return 0
    return -1 if a.data < b.data else 1


def vma_ksm_compatible(vma: Vma) -> bool:
    """Whether KSM may ever touch *vma* (``vma_ksm_compatible``).

    Shared, special (PFN/IO/DONTEXPAND/MIXEDMAP), hugetlb and droppable areas
    are never merged; the advice is silently ignored there.  (DAX, VM_SAO and
    VM_SPARC_ADI do not exist in the model's x86-64 world.)
    """
    return not vma.flags & (VM_SHARED | VM_MAYSHARE | VM_SPECIAL | VM_HUGETLB | VM_DROPPABLE)


class KsmCore(KsmTunables):
    """All of KSM's state for one machine, and what ksmd does to one page.

    Tunables, counters, the trees and ksmd's cursor live here; counters and
    tunables carry the names of their sysfs files.  ksmd's walk over the mms
    (:meth:`~ksmlab.ksm.scan.KsmScanner.ksm_do_scan`) is added by
    :class:`ksmlab.ksm.scan.KsmScanner`; the entry points the rest of mm
    calls (madvise, fork, exit, exec, prctl) and the sysfs stores are
    :class:`ksmlab.ksm.interface.Ksm`'s, which owns a KsmScanner as its core.
    """

    def __init__(self, memory: Memory, slab: Slab, *, numa_nodes: int,
                 now_ms: Callable[[], float], cpu_ns: Callable[[], int],
                 trace: Tracer) -> None:
        self.memory = memory
        self.slab = slab
        self.numa_nodes = numa_nodes
        self._now_ms = now_ms
        self._cpu_ns = cpu_ns
        self._trace = trace
        self.calc_checksum = memory.phys.calc_checksum
        """``calc_checksum`` of a page's content in the machine's content mode."""
        self.zero_checksum = memory.phys.zero_checksum
        """``zero_checksum``: the zero page's checksum, computed once (``ksm_init``)."""
        super().__init__()  # the tunables (and the advisor's state), at their boot values
        # --- counters ------------------------------------------------------------------
        self.pages_shared = 0
        self.pages_sharing = 0
        self.pages_unshared = 0
        self.rmap_items = 0
        self.pages_scanned = 0
        self.pages_skipped = 0
        self.stable_node_chains = 0
        self.stable_node_dups = 0
        self.ksm_zero_pages = 0
        self.callouts = {"ksm_fork": 0, "ksm_exit": 0, "ksm_execve": 0}
        """How often fork/exit/exec called into KSM (only for mms with MMF_VM_MERGEABLE)."""
        # --- trees and lists -------------------------------------------------------------
        self.root_stable_tree = [RbRoot() for _ in range(numa_nodes)]
        self.root_unstable_tree = [RbRoot() for _ in range(numa_nodes)]
        self.mm_head = MmSlot(None)
        self.mm_slots: dict[int, MmSlot] = {}
        self.scan = KsmScan(self.mm_head)
        self.warned_overflow = False
        self.work = KsmdWork()  # what ksmd's current batch did, for its cost model
        self.ksm_frames_met: set[Frame] = set()
        """KSM pages ksmd's current batch has met (``work.ksm_frames`` counts each once)."""
        self._dups_walked = 0
        self._held_thp: Thp | None = None
        """A THP whose split fails for now (cmp_and_merge_page's same-THP case)."""
        self.wake_ksmd: Callable[[], None] = lambda: None
        """Set by the kernel to its ksmd's ``wake_up``: ksmd runs its next batch now."""

    def trace(self, name: str, **fields: Any) -> None:
        """Emit a tracepoint record (``trace_ksm_*``)."""
        self._trace(name, **fields)

    # --- derived counters ---------------------------------------------------------------
    @property
    def pages_volatile(self) -> int:
        """``pages_volatile``: items in no tree (:func:`ksmlab.ksm.counters.pages_volatile`)."""
        return counters.pages_volatile(self.rmap_items, self.pages_shared, self.pages_sharing,
                                       self.pages_unshared)

    @property
    def general_profit(self) -> int:
        """``general_profit`` in bytes, signed (:func:`ksmlab.ksm.counters.general_profit`)."""
        return counters.general_profit(self.pages_sharing, self.ksm_zero_pages, self.rmap_items)

    @property
    def full_scans(self) -> int:
        """``full_scans``: completed passes (``ksm_scan.seqnr``)."""
        return self.scan.seqnr

    def counter(self, name: str) -> int:
        """The counter file *name* of /sys/kernel/mm/ksm (an attribute of that name)."""
        return int(getattr(self, name))

    def list_empty(self) -> bool:
        """No mm is registered."""
        return self.mm_head.next is self.mm_head

    # --- allocation helpers ----------------------------------------------------------------
    def alloc_rmap_item(self, mm: MmStruct, address: int) -> RmapItem | None:
        """``alloc_rmap_item``: a zeroed item, counted in rmap_items (None on ENOMEM)."""
        if not self.slab.alloc("rmap_item"):
            return None
        self.rmap_items += 1
        mm.ksm_rmap_items += 1
        self.work.items += 1
        return RmapItem(mm, address)

    def free_rmap_item(self, item: RmapItem) -> None:
        """``free_rmap_item``."""
        if item.state is not RmapState.NONE:  # hot path: format only on failure
            raise ModelInvariantError(f"freeing {item!r} still in a tree")
        self.rmap_items -= 1
        item.mm.ksm_rmap_items -= 1
        self.work.items += 1

    @staticmethod
    def ksm_test_exit(mm: MmStruct) -> bool:
        """``ksm_test_exit``: the mm has no users left (its process exited)."""
        return mm.mm_users == 0

    def get_kpfn_nid(self, frame: Frame) -> int:
        """Index of the tree pair a page belongs to (``get_kpfn_nid``)."""
        return 0 if self.merge_across_nodes else frame.nid

    # --- COW breaking ---------------------------------------------------------------------
    def break_ksm(self, mm: MmStruct, vma: Vma, addr: int) -> int:
        """Replace a KSM page (or KSM zero page) at *addr* by a private copy (``break_ksm``).

        Returns 0, or ENOMEM if the unshare fault ran out of memory.
        """
        frame = mm.ptes.get(addr >> PAGE_SHIFT)
        if frame is None or not (frame.ksm or frame is self.memory.phys.ksm_zero_page):
            return 0
        fault = self.memory.handle_mm_fault(mm, vma, addr, unshare=True)
        return errno.ENOMEM if fault is Fault.OOM else 0

    def find_mergeable_vma(self, mm: MmStruct, addr: int) -> Vma | None:
        """The VM_MERGEABLE vma with an anon_vma at *addr*, if any (``find_mergeable_vma``)."""
        if self.ksm_test_exit(mm):
            return None
        vma = mm.vma_lookup(addr)
        if vma is None or not vma.flags & VM_MERGEABLE or vma.anon_vma is None:
            return None
        return vma

    def break_cow(self, item: RmapItem) -> None:
        """Undo a merge of *item*'s page (``break_cow``)."""
        item.anon_vma = None
        vma = self.find_mergeable_vma(item.mm, item.address)
        if vma is not None:
            self.break_ksm(item.mm, vma, item.address)

    def get_mergeable_page(self, item: RmapItem) -> Frame | None:
        """The anonymous page mapped at *item*'s address, if still mergeable (``get_mergeable_page``)."""
        if self.find_mergeable_vma(item.mm, item.address) is None:
            return None
        frame = item.mm.ptes.get(item.address >> PAGE_SHIFT)
        return frame if frame is not None and frame.anon else None

    # --- stable node helpers ------------------------------------------------------------------
    def stable_node_chain_add_dup(self, dup: StableNode, chain: StableNode) -> None:
        """Make *dup* the head dup of *chain* (``stable_node_chain_add_dup``)."""
        vm_bug_on(is_stable_node_dup(dup), f"{dup!r} is already a dup")
        dup.kind = NodeKind.DUP
        dup.chain = chain
        chain.dups.insert(0, dup)
        self.stable_node_dups += 1

    def stable_node_dup_del(self, node: StableNode) -> None:
        """Take *node* out of its chain or out of the tree (``stable_node_dup_del``)."""
        vm_bug_on(is_stable_node_chain(node), "stable_node_dup_del on a chain")
        if is_stable_node_dup(node):
            assert node.chain is not None
            node.chain.dups.remove(node)
            node.chain = None
            self.stable_node_dups -= 1
        else:
            rb_erase(node, self.root_stable_tree[node.nid])

    def alloc_stable_node_chain(self, dup: StableNode, root: RbRoot) -> StableNode | None:
        """Put a chain in *dup*'s tree position and demote *dup* to its first dup."""
        if not self.slab.alloc("stable_node"):
            return None
        chain = StableNode(NodeKind.CHAIN, None, dup.nid)
        chain.chain_prune_time = int(self._now_ms())
        self.stable_node_chains += 1
        rb_replace_node(dup, chain, root)
        self.stable_node_chain_add_dup(dup, chain)
        return chain

    def free_stable_node_chain(self, chain: StableNode, root: RbRoot) -> None:
        """``free_stable_node_chain``."""
        rb_erase(chain, root)
        self.stable_node_chains -= 1

    def remove_node_from_stable_tree(self, node: StableNode) -> None:
        """Drop a stale node, uncounting all its items at once (``remove_node_from_stable_tree``)."""
        vm_bug_on(is_stable_node_chain(node), "remove_node_from_stable_tree on a chain")
        items = list(reversed(node.items))  # hlist order: newest first
        for i, item in enumerate(items):
            if i < len(items) - 1:
                self.pages_sharing -= 1
                self.trace("ksm_remove_rmap_item", pfn=self._kpfn(node), rmap_item=item.address,
                           mm=item.mm.id)
            else:
                self.pages_shared -= 1
            item.mm.ksm_merging_pages -= 1
            item.state = RmapState.NONE
            item.head = None
            item.anon_vma = None
        node.items.clear()
        self.trace("ksm_remove_ksm_page", pfn=self._kpfn(node))
        self.stable_node_dup_del(node)

    @staticmethod
    def _kpfn(node: StableNode) -> int:
        return node.kpage.pfn if node.kpage is not None else -1

    def ksm_get_folio(self, node: StableNode) -> Frame | None:
        """The node's KSM page if it is still that page; else drop the stale node (``ksm_get_folio``).

        The node holds no reference on its page: it checks through the
        "keyhole" that the page still points back to it.
        """
        page = node.kpage
        if page is None or page.freed or page.stable_node is not node:
            self.remove_node_from_stable_tree(node)
            return None
        return page

    def remove_rmap_item_from_tree(self, item: RmapItem) -> None:
        """Take *item* out of the stable or unstable tree, with counters (``remove_rmap_item_from_tree``)."""
        if item.state is RmapState.STABLE:
            node = item.head
            assert node is not None
            if self.ksm_get_folio(node) is None:
                return  # the stale node was removed together with all its items
            del node.items[item]
            if node.items:
                self.pages_sharing -= 1
            else:
                self.pages_shared -= 1
            item.mm.ksm_merging_pages -= 1
            item.anon_vma = None
            item.head = None
            item.state = RmapState.NONE
        elif item.state is RmapState.UNSTABLE:
            # The unstable root was reset at the start of this full scan, so only
            # an item inserted during this scan is still linked in the tree.
            age = (self.scan.seqnr - item.seqnr) & SEQNR_MASK
            if age > 1:  # hot path: format only on failure
                raise ModelInvariantError(f"{item!r} left in the unstable tree for {age} scans")
            if age == 0:
                rb_erase(item, self.root_unstable_tree[item.nid])
            self.pages_unshared -= 1
            item.state = RmapState.NONE

    def _cursor_get(self, slot: MmSlot, prev: RmapItem | None) -> RmapItem | None:
        return slot.rmap_list if prev is None else prev.rmap_next

    def _cursor_set(self, slot: MmSlot, prev: RmapItem | None, item: RmapItem | None) -> None:
        if prev is None:
            slot.rmap_list = item
        else:
            prev.rmap_next = item

    def remove_trailing_rmap_items(self, slot: MmSlot, prev: RmapItem | None) -> None:
        """Free every item after the cursor (``remove_trailing_rmap_items``)."""
        while (item := self._cursor_get(slot, prev)) is not None:
            self._cursor_set(slot, prev, item.rmap_next)
            self.remove_rmap_item_from_tree(item)
            self.free_rmap_item(item)

    def unmerge_ksm_pages(self, mm: MmStruct, vma: Vma, start: int, end: int) -> int:
        """COW-break every KSM page in [start, end) of *vma* (``unmerge_ksm_pages``).

        Returns 0 or ENOMEM.  Only page-table entries that exist are visited;
        break_ksm does nothing on the others, so the result is the kernel's.
        """
        for vpn in present_vpns(mm, start, end):
            if self.ksm_test_exit(mm):
                break
            err = self.break_ksm(mm, vma, vpn << PAGE_SHIFT)
            if err:
                return err
        return 0

    # --- mm slots ---------------------------------------------------------------------------
    def free_mm_slot(self, slot: MmSlot, *, clear_merge_any: bool) -> None:
        """Unregister *slot*'s mm from ksmd (``mm_slot_free`` and the flags it clears)."""
        mm = slot.mm
        assert mm is not None
        del self.mm_slots[mm.id]
        slot.list_del()
        mm.clear_flag(MMF_VM_MERGEABLE)
        if clear_merge_any:
            mm.clear_flag(MMF_VM_MERGE_ANY)

    # --- merging --------------------------------------------------------------------------
    def replace_page(self, mm: MmStruct, addr: int, kpage: Frame) -> None:
        """Map *kpage* at *addr* instead of the page there (``replace_page``)."""
        vpn = addr >> PAGE_SHIFT
        if kpage.zero:
            self.memory.zap_pte(mm, vpn)
            mm.ptes[vpn] = self.memory.phys.ksm_zero_page
            mm.ksm_zero_pages += 1  # ksm_map_zero_page
            self.ksm_zero_pages += 1
            self.work.zero_merges += 1
        else:
            self.memory.replace_pte(mm, vpn, kpage)
            self.work.merges += 1

    def split_huge_page(self, thp: Thp) -> None:
        """ksmd splits *thp* to merge a page of it (``split_huge_page``), counted as ksmd's work."""
        self.memory.split_thp(thp)
        self.work.thp_splits += 1

    def try_to_merge_one_page(self, mm: MmStruct, addr: int, page: Frame,
                              kpage: Frame | None) -> int:
        """Merge *page* (mapped at *addr*) into *kpage*, or make it a KSM page (``try_to_merge_one_page``).

        Returns 0 on success, EFAULT otherwise.
        """
        if page is kpage:  # ksm page forked
            return 0
        if not page.anon:
            return errno.EFAULT
        if page.thp is not None:
            if page.thp is self._held_thp:
                # split_huge_page fails: the unstable tree's page of the same THP
                # holds a reference (cmp_and_merge_page splits it afterwards).
                return errno.EFAULT
            self.split_huge_page(page.thp)
        # write_protect_page: in the model nothing else holds a reference, so
        # write-protecting always succeeds (no GUP pins, no swap cache).
        if kpage is None:
            page.ksm = True
            page.stable_node = None
            self.work.new_ksm += 1
            return 0
        if page.data == kpage.data:  # pages_identical
            self.replace_page(mm, addr, kpage)
            return 0
        return errno.EFAULT

    def try_to_merge_with_zero_page(self, item: RmapItem, page: Frame) -> int:
        """Merge a zero-filled page with the zero page when use_zero_pages is on.

        Returns 0 if merged or if the vma has gone (stop here), EFAULT to go on.
        """
        if not (self.use_zero_pages and item.oldchecksum == self.zero_checksum):
            return errno.EFAULT
        if self.find_mergeable_vma(item.mm, item.address) is None:
            return 0
        zero = self.memory.phys.zero_page
        err = self.try_to_merge_one_page(item.mm, item.address, page, zero)
        self.trace("ksm_merge_one_page", pfn=zero.pfn, rmap_item=item.address, mm=item.mm.id,
                   err=-err)
        return err

    def try_to_merge_with_ksm_page(self, item: RmapItem, page: Frame,
                                   kpage: Frame | None) -> int:
        """Merge *item*'s page into *kpage* (or make it a KSM page) (``try_to_merge_with_ksm_page``)."""
        err = errno.EFAULT
        vma = self.find_mergeable_vma(item.mm, item.address)
        if vma is not None:
            err = self.try_to_merge_one_page(item.mm, item.address, page, kpage)
            if not err:
                self.remove_rmap_item_from_tree(item)
                item.anon_vma = vma.anon_vma
        self.trace("ksm_merge_with_ksm_page", ksm_page=kpage.pfn if kpage else None,
                   pfn=(kpage or page).pfn, rmap_item=item.address, mm=item.mm.id, err=-err)
        return err

    def try_to_merge_two_pages(self, item: RmapItem, page: Frame, tree_item: RmapItem,
                               tree_page: Frame) -> Frame | None:
        """Make *page* a KSM page and merge *tree_page* into it (``try_to_merge_two_pages``)."""
        err = self.try_to_merge_with_ksm_page(item, page, None)
        if not err:
            err = self.try_to_merge_with_ksm_page(tree_item, tree_page, page)
            if err:
                # A KSM page with a single mapping and no node: break it again.
                self.break_cow(item)
        return None if err else page

    # --- the stable tree --------------------------------------------------------------------
    def __is_page_sharing_candidate(self, node: StableNode, offset: int) -> bool:
        # Hot path: node is never a chain here (callers pass regular nodes and dups).
        n = len(node.items)
        return n > 0 and n + offset < self.max_page_sharing

    def is_page_sharing_candidate(self, node: StableNode) -> bool:
        """Node has at least one mapping and room for one more (``is_page_sharing_candidate``)."""
        return self.__is_page_sharing_candidate(node, 0)

    def stable_node_dup(self, chain: StableNode, root: RbRoot,
                        prune: bool) -> tuple[Frame | None, StableNode | None, StableNode]:
        """Pick the best dup of *chain* (``stable_node_dup``).

        Returns (its page, the dup, the tree node): the tree node is the dup
        itself if the chain collapsed to a single dup.  A page of None means
        every dup was stale and the chain has been freed.
        """
        now = int(self._now_ms())
        if not prune or now < chain.chain_prune_time + self.stable_node_chains_prune_millisecs:
            prune = False
        else:
            chain.chain_prune_time = now
        found: StableNode | None = None
        found_len = 0
        tree_page: Frame | None = None
        walked = 0
        for dup in list(chain.dups):
            page = self.ksm_get_folio(dup)
            if page is None:
                # A stale dup is not charged: a search for another content passing the
                # chain may drop it first, which the bulk engine cannot see (cost model).
                continue
            walked += 1
            if found is None or (self.is_page_sharing_candidate(dup) and (
                    not self.is_page_sharing_candidate(found) or dup.rmap_hlist_len > found_len)):
                found, found_len, tree_page = dup, dup.rmap_hlist_len, page
                if not prune and self.is_page_sharing_candidate(found):
                    break
        self._dups_walked = walked
        if found is None:
            self.free_stable_node_chain(chain, root)
            return None, None, chain
        if len(chain.dups) == 1:
            # A single dup left: it replaces the chain in the tree.  Model choice (cost):
            # this walk is not charged, as the kernel's may happen on the way to another
            # content, which the bulk engine does not see (docs/cost-model.md).
            self._dups_walked = 0
            rb_replace_node(chain, found, root)
            chain.dups.clear()
            found.kind = NodeKind.REGULAR
            found.chain = None
            self.stable_node_chains -= 1
            self.stable_node_dups -= 1
            return tree_page, found, found
        if chain.dups[0] is not found and self.__is_page_sharing_candidate(found, 1):
            chain.dups.remove(found)
            chain.dups.insert(0, found)
            if not prune:
                # Charged as if found were at the head already (cost model): a search
                # for another content passing the chain may have moved it there first.
                self._dups_walked = 1
        return tree_page, found, chain

    def __stable_node_chain(self, node: StableNode, root: RbRoot,
                            prune: bool) -> tuple[Frame | None, StableNode | None, StableNode]:
        if not is_stable_node_chain(node):
            self._dups_walked = 0
            return self.ksm_get_folio(node), node, node
        return self.stable_node_dup(node, root, prune)

    def stable_tree_search(self, page: Frame) -> Frame | None:
        """A KSM page identical to *page* that can take one more mapping (``stable_tree_search``)."""
        if page.ksm and page.stable_node is not None:
            return page  # ksm page forked
        work = self.work
        work.stable_searches += 1
        root = self.root_stable_tree[self.get_kpfn_nid(page)]
        while True:  # "again": restart after a stale node rebalanced the tree
            cur = root.node
            restart = False
            while cur is not None:
                assert isinstance(cur, StableNode)
                tree_page, dup, node = self.__stable_node_chain(cur, root, True)
                if tree_page is None:
                    restart = True
                    break
                assert dup is not None
                ret = memcmp_pages(page, tree_page)
                if ret < 0:
                    cur = node.rb_left
                elif ret > 0:
                    cur = node.rb_right
                else:
                    work.stable_equal += 1
                    work.chain_dups += self._dups_walked  # the searched content's own chain
                    if not self.is_page_sharing_candidate(dup):
                        # All dups are full: let the page find a partner in the
                        # unstable tree and form a new dup later.
                        return None
                    if self.ksm_get_folio(dup) is None:
                        restart = True
                        break
                    return tree_page
            if not restart:
                return None

    def stable_tree_insert(self, kpage: Frame) -> StableNode | None:
        """File a new KSM page in the stable tree, forming a chain if needed (``stable_tree_insert``)."""
        nid = self.get_kpfn_nid(kpage)
        root = self.root_stable_tree[nid]
        work = self.work
        work.stable_inserts += 1
        while True:
            parent: StableNode | None = None
            left = False
            cur = root.node
            equal: StableNode | None = None
            restart = False
            while cur is not None:
                assert isinstance(cur, StableNode)
                tree_page, _dup, node = self.__stable_node_chain(cur, root, False)
                if tree_page is None:
                    restart = True
                    break
                ret = memcmp_pages(kpage, tree_page)
                parent = node
                if ret < 0:
                    cur, left = node.rb_left, True
                elif ret > 0:
                    cur, left = node.rb_right, False
                else:
                    equal = node
                    work.chain_dups += self._dups_walked
                    break
            if not restart:
                break
        if not self.slab.alloc("stable_node"):
            return None
        dup = StableNode(NodeKind.REGULAR, kpage, nid)
        if equal is None:
            work.stable_new += 1
            rb_link_node(dup, parent, left, root)
            rb_insert_color(dup, root)
        else:
            chain: StableNode | None = equal
            if not is_stable_node_chain(equal):
                chain = self.alloc_stable_node_chain(equal, root)
                if chain is None:
                    return None
            assert chain is not None
            self.stable_node_chain_add_dup(dup, chain)
        kpage.stable_node = dup
        return dup

    def unstable_tree_search_insert(self, item: RmapItem,
                                    page: Frame) -> tuple[RmapItem, Frame] | None:
        """Find an identical page in the unstable tree, else insert *item* (``unstable_tree_search_insert``)."""
        nid = self.get_kpfn_nid(page)
        root = self.root_unstable_tree[nid]
        parent: RmapItem | None = None
        left = False
        cur = root.node
        self.work.unstable_searches += 1
        while cur is not None:
            assert isinstance(cur, RmapItem)
            tree_page = self.get_mergeable_page(cur)
            if tree_page is None:
                return None
            if tree_page is page:  # don't substitute a ksm page for a forked page
                return None
            ret = memcmp_pages(page, tree_page)
            parent = cur
            if ret < 0:
                cur, left = cur.rb_left, True
            elif ret > 0:
                cur, left = cur.rb_right, False
            elif not self.merge_across_nodes and tree_page.nid != nid:
                return None
            else:
                self.work.unstable_equal += 1
                return cur, tree_page
        item.state = RmapState.UNSTABLE
        item.seqnr = self.scan.seqnr & SEQNR_MASK
        item.nid = nid
        rb_link_node(item, parent, left, root)
        rb_insert_color(item, root)
        self.pages_unshared += 1
        self.work.unstable_inserts += 1
        return None

    def stable_tree_append(self, item: RmapItem, node: StableNode, bypass: bool) -> None:
        """Hang *item* off *node* (``stable_tree_append``)."""
        vm_bug_on(is_stable_node_chain(node), "append to a chain")
        node.items[item] = None
        if not bypass and node.rmap_hlist_len > self.max_page_sharing and not self.warned_overflow:
            self.warned_overflow = True  # WARN_ON_ONCE: possibly non fatal, only warn
            self.trace("warn_on_once", what="rmap_hlist_len > max_page_sharing")
        item.head = node
        item.state = RmapState.STABLE
        if node.rmap_hlist_len > 1:
            self.pages_sharing += 1
        else:
            self.pages_shared += 1
        item.mm.ksm_merging_pages += 1

    # --- the per-page decision ----------------------------------------------------------------
    def cmp_and_merge_page(self, page: Frame, item: RmapItem) -> None:
        """Try to merge *page* via the stable tree, else the unstable tree (``cmp_and_merge_page``)."""
        bypass = False
        stable_node = page.stable_node if page.ksm else None
        if stable_node is not None:
            if page not in self.ksm_frames_met:  # its folio and stable node: a cache miss
                self.ksm_frames_met.add(page)
                self.work.ksm_frames += 1
            if item.head is stable_node:
                return  # steady state of a merged page
            # A KSM page mapped by a fork child (or re-mapped): join its node,
            # even past max_page_sharing.
            if not self.is_page_sharing_candidate(stable_node):
                bypass = True
        else:
            self.remove_rmap_item_from_tree(item)
            checksum = self.calc_checksum(page.data)
            self.work.checksums += 1
            if item.oldchecksum != checksum:
                item.oldchecksum = checksum  # volatile this round
                return
            if not self.try_to_merge_with_zero_page(item, page):
                return
        kpage = self.stable_tree_search(page)
        if kpage is page and item.head is stable_node:
            return
        self.remove_rmap_item_from_tree(item)
        if kpage is not None:
            if not self.try_to_merge_with_ksm_page(item, page, kpage):
                assert kpage.stable_node is not None
                self.stable_tree_append(item, kpage.stable_node, bypass)
            return
        found = self.unstable_tree_search_insert(item, page)
        if found is None:
            return
        tree_item, tree_page = found
        # Both pages in one THP: the merge fails (its split cannot succeed while
        # tree_page is held); once tree_page is released ksmd splits the THP and
        # merges nothing on this visit (measured on Linux 6.18: one page of such
        # a THP merges a full scan later than the others).
        same_thp = page.thp is not None and page.thp is tree_page.thp
        self._held_thp = page.thp if same_thp else None
        try:
            kpage = self.try_to_merge_two_pages(item, page, tree_item, tree_page)
        finally:
            self._held_thp = None
        if kpage is None:
            if same_thp and page.thp is not None:
                self.split_huge_page(page.thp)
            return
        node = self.stable_tree_insert(kpage)
        if node is not None:
            self.stable_tree_append(tree_item, node, False)
            self.stable_tree_append(item, node, False)
        else:
            self.break_cow(tree_item)
            self.break_cow(item)
