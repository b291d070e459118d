"""ksmd's walk over the registered mms: ``ksm_do_scan`` and what it calls (``mm/ksm.c``).

One batch of ksmd (:meth:`KsmScanner.ksm_do_scan`) advances a cursor
(``ksm_scan``) over the mms on ksmd's list, their VM_MERGEABLE areas and
their pages, gives each page an rmap_item, lets smart scan skip pages that
have long failed to merge, and hands the others to
:meth:`~ksmlab.ksm.ksm.KsmCore.cmp_and_merge_page`.  A pass over the whole
list is a full scan: the unstable tree is emptied at its start, the
scan-time advisor adjusts ``pages_to_scan`` at its end.  The ksmd thread that
calls ``ksm_do_scan`` on the virtual clock is :mod:`ksmlab.ksm.ksmd`.
"""

from __future__ import annotations

from enum import Enum

from ksmlab.constants import HPAGE_PMD_NR, PAGE_SHIFT, PAGE_SIZE, VM_MERGEABLE
from ksmlab.ksm import advisor as ksm_advisor
from ksmlab.ksm.defaults import AGE_MAX
from ksmlab.ksm.ksm import KsmCore
from ksmlab.ksm.types import MmSlot, RmapItem, StableNode, is_stable_node_chain
from ksmlab.mm.mm_types import MmStruct
from ksmlab.mm.page import Frame

_EXTENT_MASK = ~(HPAGE_PMD_NR - 1)
"""A page number's 2 MiB extent (its first page number): where a PMD would map it."""


def skip_age(age: int) -> int:
    """How many scans smart scan skips a page of this age (``skip_age``); the bulk engine's too."""
    if age <= 3:
        return 1
    if age <= 5:
        return 2
    if age <= 8:
        return 4
    return 8


class AllocFailed(Enum):
    """Marker returned by ``_scan_mm``: an rmap_item allocation failed, the batch ends."""

    ALLOC_FAILED = 0


ALLOC_FAILED = AllocFailed.ALLOC_FAILED



class KsmScanner(KsmCore):
    """:class:`~ksmlab.ksm.ksm.KsmCore` plus ksmd's walk over the mms (see the module doc).

    This is KSM's whole core: :class:`ksmlab.ksm.interface.Ksm` owns one as
    :attr:`~ksmlab.ksm.interface.Ksm.core`, and ksmd runs its batches on it.
    """

    def get_next_rmap_item(self, slot: MmSlot, addr: int) -> RmapItem | None:
        """The item for *addr*, freeing items of addresses passed over (``get_next_rmap_item``)."""
        prev = self.scan.rmap_prev
        while (item := self._cursor_get(slot, prev)) is not None:
            if item.address == addr:
                return item
            if item.address > addr:
                break
            self._cursor_set(slot, prev, item.rmap_next)
            self.remove_rmap_item_from_tree(item)
            self.free_rmap_item(item)
        assert slot.mm is not None
        new = self.alloc_rmap_item(slot.mm, addr)
        if new is not None:
            new.rmap_next = self._cursor_get(slot, prev)
            self._cursor_set(slot, prev, new)
        return new

    def should_skip_rmap_item(self, page: Frame, item: RmapItem) -> bool:
        """Smart scan: skip pages that have long failed to merge (``should_skip_rmap_item``)."""
        if not self.smart_scan or page.ksm:
            return False
        age = item.age
        if age != AGE_MAX:
            item.age += 1
        if age < 3:
            return False
        if not item.remaining_skips:
            item.remaining_skips = skip_age(age)
            return False
        self.pages_skipped += 1
        self.work.skipped += 1
        item.remaining_skips -= 1
        self.remove_rmap_item_from_tree(item)
        return True

    def scan_get_next_rmap_item(self) -> tuple[RmapItem, Frame] | None:
        """Advance ksmd's cursor to the next page to look at (``scan_get_next_rmap_item``).

        Returns None at the end of a full scan (and ``full_scans`` grows), when
        no mm is registered, or when an rmap_item cannot be allocated.
        """
        if self.list_empty():
            return None
        scan = self.scan
        slot = scan.mm_slot
        if slot is self.mm_head:
            self.work.scan_starts += 1
            self.work.stable_base = self.live_stable_entries()
            self.advisor_start_scan()
            self.trace("ksm_start_scan", seq=scan.seqnr, rss=self.rmap_items)
            for root in self.root_unstable_tree:
                root.node = None
            slot = scan.mm_slot = self.mm_head.next
            if slot is self.mm_head:
                return None
            scan.address, scan.rmap_prev = 0, None
        while True:  # "next_mm"
            mm = slot.mm
            assert mm is not None
            if not self.ksm_test_exit(mm):
                found = self._scan_mm(slot, mm)
                if found is not None:
                    return found if isinstance(found, tuple) else None
            else:
                scan.address, scan.rmap_prev = 0, None
            self.work.mm_ends += 1
            self.remove_trailing_rmap_items(slot, scan.rmap_prev)
            scan.mm_slot = slot.next
            if scan.address == 0:
                # No VM_MERGEABLE vma (or the mm is exiting): drop the slot.
                # Since 6.18 MMF_VM_MERGE_ANY survives this.
                self.free_mm_slot(slot, clear_merge_any=self.ksm_test_exit(mm))
            slot = scan.mm_slot
            if slot is self.mm_head:
                break
            scan.address, scan.rmap_prev = 0, None
        self.advisor_stop_scan()
        self.trace("ksm_stop_scan", seq=scan.seqnr, rss=self.rmap_items)
        scan.seqnr += 1
        return None

    def _scan_mm(self, slot: MmSlot, mm: MmStruct) -> tuple[RmapItem, Frame] | AllocFailed | None:
        """Walk *mm*'s mergeable vmas from the cursor.

        Returns the (item, page) found, ALLOC_FAILED, or None at the end of the mm.
        """
        scan = self.scan
        i = mm.find_vma_index(scan.address)
        while i < len(mm.vmas):
            vma = mm.vmas[i]
            i += 1
            if not vma.flags & VM_MERGEABLE:
                continue
            if scan.address < vma.start:
                scan.address = vma.start
            if vma.anon_vma is None:
                scan.address = vma.end
            ptes = mm.ptes
            while scan.address < vma.end:
                page = ptes.get(scan.address >> PAGE_SHIFT)
                if page is not None and page.anon:
                    item = self.get_next_rmap_item(slot, scan.address)
                    if item is None:
                        return ALLOC_FAILED
                    scan.rmap_prev = item
                    scan.address += PAGE_SIZE
                    if self.should_skip_rmap_item(page, item):
                        continue
                    thp = page.thp
                    if thp is None or mm.pmds.get(
                            ((scan.address - PAGE_SIZE) >> PAGE_SHIFT) & _EXTENT_MASK) is not thp:
                        self.work.pte_pages += 1  # not under a PMD of this mm mapping its THP
                    return item, page
                if page is not None:
                    self.work.pte_walk += 1  # present, nothing to scan: the zero page
                scan.address += PAGE_SIZE
        return None

    def ksm_do_scan(self, scan_npages: int) -> int:
        """One batch of ksmd: up to *scan_npages* pages (``ksm_do_scan``); returns pages scanned."""
        done = 0
        self.ksm_frames_met.clear()  # distinct KSM pages are counted per batch
        while done < scan_npages:
            found = self.scan_get_next_rmap_item()
            if found is None:
                break
            item, page = found
            self.cmp_and_merge_page(page, item)
            self.pages_scanned += 1
            done += 1
        self.work.pages += done
        self.ksm_frames_met.clear()  # hold no freed frame until the next batch
        return done

    def live_stable_entries(self) -> int:
        """Stable-tree entries (regular nodes and chains) with a KSM page still mapped.

        The cost model's stable-tree size at a full scan's start: it leaves out
        stale nodes, which the bulk engine finds at other moments than the
        kernel's walk, so that both engines see the same size.
        """
        def live(node: StableNode) -> bool:
            page = node.kpage
            return page is not None and not page.freed and page.stable_node is node

        n = 0
        for root in self.root_stable_tree:
            for node in root:
                assert isinstance(node, StableNode)
                if any(live(d) for d in node.dups) if is_stable_node_chain(node) else live(node):
                    n += 1
        return n

    # --- the advisor (ksmlab.ksm.advisor's, which every engine runs) ------------------------
    def advisor_start_scan(self) -> None:
        """Record the start of a full scan for the scan-time advisor."""
        ksm_advisor.advisor_start_scan(self, self._now_ms())

    def advisor_stop_scan(self) -> None:
        """At the end of a full scan, let the advisor set pages_to_scan."""
        if ksm_advisor.advisor_stop_scan(self, self._now_ms(), self._cpu_ns()):
            self.trace("ksm_advisor", scan_time=self.advisor_ctx.scan_time_s,
                       pages_to_scan=self.pages_to_scan)
