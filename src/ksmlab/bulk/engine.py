"""ksmd's algorithm over the bulk engine's columns (``mm/ksm.c``, as in :mod:`ksmlab.ksm.ksm`).

This module is the bulk engine's *per-page path*: every function here (and in
:mod:`ksmlab.bulk.trees`, the trees) does for one page what the same-named
method of :class:`ksmlab.ksm.ksm.KsmCore` does for one rmap_item, on numpy
rows instead of objects.  The vectorised
batch path (:mod:`ksmlab.bulk.vector`) does the same for many pages at once
and falls back to these functions for anything unusual; tests run both
against SimKernel.

Model choices of the bulk engine (besides those of SimKernel, which it
shares), each because there is no content-ordered tree to walk:

* **The unstable tree is an exact index by content.**  The kernel walks an
  rbtree ordered by the pages' *current* bytes, so a page written after its
  insertion can make a search for another content miss, and a page that
  stopped being mergeable makes any search passing it give up.  Here a search
  for content C looks only at the page last inserted with content C.  The
  two agree unless a page inserted in the current full scan is written,
  unmerged or unmapped before that scan ends.
* **Stale stable nodes are found when their own content is searched or one
  of their items is revisited**, never because a search for another content
  passed them.  Counters can therefore drop at a different moment within a
  scan; the set of merges does not change.
* Only what the bulk API can do is modelled: anonymous private memory, whole-
  page writes, munmap, mprotect, fork, exit, MADV_(UN)MERGEABLE, run=2, NUMA
  nodes with ``merge_across_nodes`` 0 or 1 (no page migration, as in
  SimKernel) and the scan-time advisor (:mod:`ksmlab.ksm.advisor`, SimKernel's
  own).
"""

from __future__ import annotations

import errno
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from ksmlab.bulk.columns import (
    ABSENT,
    KSM_ZERO,
    NONE,
    STABLE,
    STABLE_NONE,
    ChainCols,
    ContentCols,
    FrameCols,
    NodeCols,
    PageCols,
)
from ksmlab.bulk.content import ZERO_CONTENT, ContentTable
from ksmlab.bulk.invariants import check_bulk
from ksmlab.bulk.mm import BulkMm, Ghost
from ksmlab.bulk.tally import Tally, count_columns, live_stable_entries, sysfs_counters
from ksmlab.bulk.thp import THP_PMD, split_thps
from ksmlab.bulk.trees import StableTrees, TreeIndex
from ksmlab.constants import KSM_RUN_MERGE, KSM_RUN_UNMERGE, PAGE_SHIFT
from ksmlab.errors import kernel_error, vm_bug_on
from ksmlab.ksm import advisor as ksm_advisor
from ksmlab.ksm.cost import KsmdWork
from ksmlab.ksm.defaults import AGE_MAX
from ksmlab.ksm.scan import skip_age
from ksmlab.ksm.tunables import KsmTunables


class BulkKsm(StableTrees, KsmTunables):
    """KSM state for a bulk machine: knobs, columns, chains, ksmd's cursor.

    Counters that SimKernel keeps incrementally (pages_shared, rmap_items...)
    are kept the same way, in :attr:`tally` (:mod:`ksmlab.bulk.tally`): every
    change of an item's state goes through ``tally.restate``, of a node's
    sharers through ``tally.join``/``leave_one``.  It is the
    engine the virtual ksmd (:class:`ksmlab.ksm.ksmd.Ksmd`) and the sysfs
    table (:class:`ksmlab.ksm.sysfs.KsmSysfs`) work on, as SimKernel's
    :class:`~ksmlab.ksm.interface.Ksm` is.

    Args:
        contents: the machine's content ids.
        now_ms: the virtual clock in ms (ksmd's), read by chain pruning and the advisor.
        cpu_ns: ksmd's CPU time (ksmd's), read by the advisor.
        numa_nodes: NUMA nodes of the machine (pages and frames carry their
            node only when there are several).
    """

    # Slots for the state the scan reads per page: CPython 3.11 specialises an
    # instance attribute read well only while the instance dict has fewer than
    # 30 keys (measured: 10% slower per-page path past it).  The knobs stay in
    # the dict (KsmTunables); an attribute a subclass adds goes there too.
    __slots__ = ("address", "chain_cols", "chains", "contents", "cpu_ns", "ctab", "cursor",
                 "dups_walked", "frames", "full_scans", "head", "ksm_frames_met", "mutations", "nodes",
                 "now_ms",
                 "numa_nodes", "pages", "pages_scanned", "pages_skipped", "tally",
                 "tree_of_node", "trees", "wake_ksmd", "work", "zero_checksum")

    def __init__(self, contents: ContentTable, *,
                 now_ms: Callable[[], float] = lambda: 0.0,
                 cpu_ns: Callable[[], int] = lambda: 0, numa_nodes: int = 1) -> None:
        self.contents = contents
        self.numa_nodes = numa_nodes
        self.pages = PageCols(numa=numa_nodes > 1)
        self.frames = FrameCols(numa=numa_nodes > 1)
        self.ctab = ContentCols()
        self.nodes = NodeCols()
        self.chains = {}
        """Node 0's chains, by content (another node's: ``trees``)."""
        self.trees = [TreeIndex(0, self.ctab, self.chains)]
        self.tree_of_node = {0: self.trees[0]}
        self.chain_cols = ChainCols()
        super().__init__()  # the knobs and the advisor's state, at their boot values
        # --- incremental counters ---
        self.tally = Tally()
        self.full_scans = 0
        self.pages_scanned = 0
        self.pages_skipped = 0
        self.cow_ksm = 0
        """vmstat ``cow_ksm``: COW and unshare faults on KSM pages (not on the zero page)."""
        # --- ksmd's list and cursor ---
        self.head = BulkMm(-1)
        self.cursor: BulkMm = self.head
        self.address = 0
        self.now_ms = now_ms
        self.cpu_ns = cpu_ns
        self.zero_checksum = int(contents.checksum[ZERO_CONTENT])
        self.wake_ksmd: Callable[[], None] = lambda: None
        """Set by the kernel to its ksmd's ``wake_up``: ksmd runs its next batch now."""
        self.mutations = 0
        """Bumped by every call that changes the state outside ksmd's batches (the
        process calls of :class:`~ksmlab.bulk.kernel.BulkProcess` and the sysfs stores)."""
        self.work = KsmdWork()
        """What ksmd's current batch did, as the kernel's walk would have done it (for
        the cost model: :mod:`ksmlab.ksm.cost`)."""
        self.dups_walked = 0
        """The dups the last ``stable_node_dup`` walk looked at, as the kernel's would."""
        self.ksm_frames_met: set[int] = set()
        """KSM frames ksmd's current batch has met (``work.ksm_frames`` counts each once)."""
        self.thps = 0
        """THPs ever allocated (:mod:`ksmlab.bulk.thp`); while 0 no THP step costs anything."""
        self.thp_advised = False
        """Some page was given MADV_HUGEPAGE or MADV_NOHUGEPAGE (writes look for THP faults)."""
        self.split_log: list[tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]] | None = None
        """While a vectorised step runs: the THPs it split and the rows that split them."""

    # --- content and frames ---------------------------------------------------------------
    def sync_contents(self) -> None:
        """Give every content id of the table a row in each tree index (after the table grew)."""
        for ix in self.trees:
            extra = len(self.contents) - ix.ctab.n
            if extra > 0:
                ix.ctab.append(extra)

    def new_frames(self, contents: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Allocate one frame per content id for the pages at *rows* (on their mappings'
        node), each mapped once; return their indices."""
        first = self.frames.append(len(contents))
        idx = np.arange(first, first + len(contents), dtype=np.int32)
        self.frames.content[idx] = contents
        self.frames.mapcount[idx] = 1
        if self.numa_nodes > 1:
            self.frames.nid[idx] = self.pages.nid[rows]
        return idx

    def unmap(self, frames: np.ndarray) -> None:
        """Drop one mapping of each frame in *frames* (repeats allowed); KSM_ZERO ignored."""
        f = frames[frames >= 0]
        np.subtract.at(self.frames.mapcount, f, 1)
        knode = self.frames.knode[f]
        freed = (knode >= 0) & (self.frames.mapcount[f] == 0)
        if bool(freed.any()):  # each node once: a munmap or exit may free thousands of mappings
            self.reopen(np.unique(knode[freed]).tolist())

    # --- merging -------------------------------------------------------------------------
    def replace_page(self, g: int, kframe: int, scanned: int | None = None) -> None:
        """Map *kframe* at page *g* instead of its frame (``replace_page``); the merge
        attempt is the scanned page *scanned*'s (*g* itself if None)."""
        old = int(self.pages.frame[g])
        if self.thps:
            split_thps(self, np.array([old]), g if scanned is None else scanned)
        self.frames.mapcount[old] -= 1
        self.pages.frame[g] = kframe
        if kframe >= 0:
            self.frames.mapcount[kframe] += 1
            self.work.merges += 1
        else:
            self.tally.zero_pages += 1  # KSM_ZERO (old is an ordinary frame)
            self.work.zero_merges += 1

    def merge_two(self, ix: TreeIndex, g: int, f: int, y: int, c: int) -> None:
        """Make *f* a KSM page, map it at *y* too, and file it in *ix* (``try_to_merge_two_pages``
        + ``stable_tree_insert``)."""
        self.work.new_ksm += 1
        if self.thps:  # the scanned page's THP splits (the tree page's in replace_page)
            split_thps(self, np.array([f]), g)
        self.replace_page(y, f, g)
        self.remove_rmap_item_from_tree(y)
        d = self.stable_tree_insert(ix, c, f)
        self.stable_tree_append(y, d)
        self.stable_tree_append(g, d)

    def cmp_and_merge_page(self, g: int, f: int) -> None:
        """Try to merge page *g* (frame *f*) via the stable tree, else the unstable tree."""
        pages, frames = self.pages, self.frames
        knode = int(frames.knode[f])
        if knode >= 0:
            self.meet_ksm_frame(f)
            if pages.state[g] == STABLE and pages.head[g] == knode:
                return  # steady state of a merged page
            # A KSM page mapped by a fork child: join its node (past the limit if need be).
            self.remove_rmap_item_from_tree(g)
            self.stable_tree_append(g, knode)
            return
        self.remove_rmap_item_from_tree(g)
        c = int(frames.content[f])
        checksum = int(self.contents.checksum[c])
        self.work.checksums += 1
        if pages.oldsum[g] != checksum:
            pages.oldsum[g] = checksum
            return
        if self.use_zero_pages and checksum == self.zero_checksum and c == ZERO_CONTENT:
            self.replace_page(g, KSM_ZERO)
            return
        self.merge_unchanged(g, f, c)

    def meet_ksm_frame(self, f: int) -> None:
        """The walk reached KSM frame *f* (already one): counted once per batch."""
        if f not in self.ksm_frames_met:
            self.ksm_frames_met.add(f)
            self.work.ksm_frames += 1

    def merge_unchanged(self, g: int, f: int, c: int) -> None:
        """The rest of ``cmp_and_merge_page`` for an ordinary page whose checksum held,
        in the trees of its frame's node (``get_kpfn_nid``)."""
        ix = self.trees[0] if self.merge_across_nodes or self.numa_nodes == 1 else self.tree_of(f)
        d = self.stable_tree_search(ix, c)
        if d >= 0:
            self.replace_page(g, int(self.nodes.kframe[d]))
            self.stable_tree_append(g, d)
            return
        y = self.unstable_tree_search_insert(ix, g, f, c)
        if y >= 0:
            if self.thps and self.frames.thp[f] >= 0 and (
                    self.frames.thp[f] == self.frames.thp[self.pages.frame[y]]):
                # Both pages in one THP: its split fails while the tree page is held, so
                # the merge fails; then ksmd splits it and merges nothing on this visit
                # (measured on Linux 6.18); the page is not inserted either.
                split_thps(self, np.array([f]), g)
                return
            self.merge_two(ix, g, f, y, c)

    # --- the scanner ---------------------------------------------------------------------
    def should_skip(self, g: int, f: int) -> bool:
        """Smart scan (``should_skip_rmap_item``); the caller made sure *g* has an item."""
        if not self.smart_scan or self.frames.knode[f] >= 0:
            return False
        pages = self.pages
        age = int(pages.age[g])
        if age != AGE_MAX:
            pages.age[g] = age + 1
        if age < 3:
            return False
        if not pages.skips[g]:
            pages.skips[g] = skip_age(age)
            return False
        self.pages_skipped += 1
        self.work.skipped += 1
        pages.skips[g] -= 1
        self.remove_rmap_item_from_tree(g)
        return True

    def new_item(self, g: int) -> None:
        """``alloc_rmap_item`` for page *g*."""
        pages = self.pages
        self.tally.restate_one(pages.state, g, NONE)
        pages.oldsum[g] = 0
        pages.age[g] = 0
        pages.skips[g] = 0
        pages.head[g] = -1
        self.work.items += 1

    def list_empty(self) -> bool:
        """No mm is registered."""
        return self.head.next is self.head

    def walk_mm(self, mm: BulkMm, budget: int) -> tuple[int, bool]:
        """Visit up to *budget* pages of *mm* from the cursor, a window of rows at a time.

        Returns (pages visited, whether the end of the mm was reached).  Items
        of pages passed over are freed on the way, as get_next_rmap_item and
        remove_trailing_rmap_items free them; so are those of unmapped pages
        (ghosts), which the walk passes in address order too.
        """
        done = 0
        for seg in mm.in_address_order():
            if seg.end <= self.address:
                continue
            if self.address < seg.addr:
                self.address = seg.addr
            i = (self.address - seg.addr) >> PAGE_SHIFT
            if isinstance(seg, Ghost):
                self.address = seg.end
                self.free_items(seg.row + i, seg.pages - i)
                seg.pages = i  # what lies below the cursor waits for the next pass
                continue
            while i < seg.pages:
                want = budget - done
                visited, used = self.scan_window(seg.row + i, self.window(want, seg.pages - i),
                                                 want)
                done += visited
                i += used
                self.address = seg.addr + (i << PAGE_SHIFT)
                if done == budget:
                    mm.drop_passed_ghosts()
                    return done, False
        mm.drop_passed_ghosts()
        return done, True

    def window(self, want: int, rest: int) -> int:
        """Rows to hand to scan_window when *want* visits are due and *rest* rows remain."""
        return rest

    def scan_window(self, first: int, width: int, want: int) -> tuple[int, int]:
        """Visit rows from *first* (at most *width*) until *want* visits, page by page.

        Returns (visits, rows passed); the cursor stops just after the last visit.
        """
        done = used = 0
        while used < width and done < want:
            if self.visit_row(first + used):
                done += 1
            used += 1
        return done, used

    def visit_row(self, g: int) -> bool:
        """What ksmd does at page *g* as its cursor passes; True if the page counts as scanned.

        A page that is not mapped or not mergeable loses its item
        (``get_next_rmap_item`` frees items it passes over); a mergeable page
        gets an item, may be skipped by smart scan, else goes to
        ``cmp_and_merge_page``.
        """
        pages = self.pages
        f = int(pages.frame[g])
        if f < 0 or not pages.mergeable[g]:
            if f == KSM_ZERO and pages.mergeable[g]:
                self.work.pte_walk += 1  # present, nothing to scan
            if pages.state[g] != ABSENT:
                self.free_rmap_item(g)
            return False
        if pages.state[g] == ABSENT:
            self.new_item(g)
        if self.should_skip(g, f):
            return False
        if not (self.thps and pages.thp[g] & THP_PMD and self.frames.thp[f] >= 0):
            self.work.pte_pages += 1  # reached through a PTE, not a THP's PMD
        self.cmp_and_merge_page(g, f)
        return True

    def has_mergeable(self, mm: BulkMm) -> bool:
        """Whether some mapping of *mm* carries VM_MERGEABLE."""
        return any(bool(self.pages.mergeable[s.row:s.row + s.pages].any()) for s in mm.segments)

    def free_items(self, first: int, count: int) -> None:
        """Free the items of rows [first, first + count), in order (what a walk passing
        them does when they map nothing)."""
        for g in np.flatnonzero(self.pages.state[first:first + count] != ABSENT).tolist():
            self.free_rmap_item(first + g)

    def remove_all_items(self, mm: BulkMm) -> None:
        """Free every item of *mm* (``remove_trailing_rmap_items`` from the start)."""
        for seg in mm.ranges():
            self.free_items(seg.row, seg.pages)
        mm.ghosts.clear()

    def unregister(self, mm: BulkMm) -> None:
        """Take *mm* off ksmd's list (MMF_VM_MERGEABLE cleared)."""
        mm.list_del()
        mm.registered = False

    def ksm_do_scan(self, budget: int) -> int:
        """One batch of ksmd (``ksm_do_scan``): up to *budget* pages; returns pages scanned."""
        done = 0
        work = self.work
        self.ksm_frames_met.clear()  # distinct KSM frames are counted per batch
        while done < budget:
            if self.cursor is self.head:
                if self.list_empty():
                    break
                # A full scan starts (every unstable tree is emptied by the seqnr).
                work.scan_starts += 1
                work.stable_base = live_stable_entries(self)
                ksm_advisor.advisor_start_scan(self, self.now_ms())
                self.cursor, self.address = self.head.next, 0
            mm = self.cursor
            if mm.exiting:
                self.remove_all_items(mm)
                self.address = 0
            else:
                if self.address == 0 and not self.has_mergeable(mm):
                    self.remove_all_items(mm)  # address stays 0: the slot goes
                else:
                    # Any non-zero address means "a mergeable vma was found" (the
                    # walk moves it to the first mapping at once).
                    self.address = max(self.address, 1)
                    n, finished = self.walk_mm(mm, budget - done)
                    done += n
                    if not finished:
                        break
            work.mm_ends += 1
            nxt = mm.next
            if self.address == 0:
                self.unregister(mm)
            self.cursor, self.address = nxt, 0
            if nxt is self.head:
                ksm_advisor.advisor_stop_scan(self, self.now_ms(), self.cpu_ns())
                self.full_scans += 1
                break
        self.pages_scanned += done
        work.pages += done
        return done

    # --- the sysfs stores (ksmlab.ksm.sysfs's table calls them, as SimKernel's) -----------
    def counter(self, name: str) -> int:
        """The value of counter file *name*."""
        return self.counters()[name]

    def set_run(self, flags: int) -> None:
        """``run_store`` after parsing: start, stop, or unmerge everything (run=2)."""
        if self.run != flags:
            self.run = flags
            if flags & KSM_RUN_UNMERGE:
                # No allocation can fail here (no OOM is modelled), so never ENOMEM.
                self.unmerge_and_remove_all_rmap_items()
        if flags & KSM_RUN_MERGE:
            self.wake_ksmd()

    def set_max_page_sharing(self, knob: int) -> None:
        """``max_page_sharing_store`` after parsing; EBUSY while KSM pages exist.

        As the kernel: refused at once while some stable node has sharers,
        else nodes whose KSM page is no longer mapped are removed first and
        it is refused if a KSM page is still mapped (see
        :meth:`remove_all_stable_nodes` for the one model choice).
        """
        if knob == self.max_page_sharing:
            return
        self.check_no_ksm_pages()
        self.max_page_sharing = knob

    def check_no_ksm_pages(self) -> None:
        """What ``max_page_sharing_store`` and ``merge_across_nodes_store`` check first:
        EBUSY at once while a stable node has sharers (``ksm_pages_shared``), else the
        nodes of pages no longer mapped are removed, and EBUSY if a KSM page is mapped."""
        n = self.nodes.n
        if bool((self.nodes.count[:n][self.nodes.alive[:n]] > 0).any()) \
                or self.remove_all_stable_nodes():
            raise kernel_error(errno.EBUSY, "KSM pages exist")

    # --- whole-tree operations of the sysfs stores -------------------------------------------
    def break_ksm(self, rows: np.ndarray) -> None:
        """Give each of *rows* that maps a KSM page (or the KSM zero page) a private copy
        (``break_ksm``: the unshare fault always copies a KSM page)."""
        frames = self.pages.frame[rows]
        ksm_page = frames == KSM_ZERO
        ok = frames >= 0
        ksm_page[ok] = self.frames.knode[frames[ok]] >= 0
        old = frames[ksm_page]
        self.cow_ksm += int(np.count_nonzero(old >= 0))
        self.tally.zero_mapped(old, -1)
        contents = np.where(old >= 0, self.frames.content[np.maximum(old, 0)], ZERO_CONTENT)
        self.unmap(old)
        self.pages.frame[rows[ksm_page]] = self.new_frames(contents, rows[ksm_page])

    def remove_all_stable_nodes(self) -> int:
        """Remove every stable node whose KSM page is no longer mapped; EBUSY if one still is.

        Model choice: the kernel walks its tree from the root and stops at the
        first busy node, so which unmapped nodes it removes before giving up
        depends on the tree's shape; here all of them are removed.  Only the
        chain and dup counts can differ, until ksmd meets those nodes.
        """
        self.mutations += 1
        err = 0
        for ix in self.trees:
            stable = ix.ctab.stable[:ix.ctab.n]
            for c in np.flatnonzero(stable != STABLE_NONE).tolist():
                s = int(stable[c])
                if s > STABLE_NONE:
                    if self.stale(s):
                        self.remove_node(s)
                    else:
                        err = errno.EBUSY
                    continue
                chain = ix.chains[c]
                for d in list(chain.dups):
                    if self.stale(d):
                        self.remove_node(d)
                    else:
                        err = errno.EBUSY
                if not chain.dups:
                    self.drop_chain(ix, c, STABLE_NONE)
        return err

    def unmerge_and_remove_all_rmap_items(self) -> int:
        """What ``run=2`` does (``unmerge_and_remove_all_rmap_items``): every KSM page in a
        mergeable area of a registered mm is broken, every item freed, exiting mms'
        slots freed, the stable tree emptied and ``full_scans`` (``seqnr``) reset."""
        self.mutations += 1
        mm = self.head.next
        while mm is not self.head:
            nxt = mm.next
            if not mm.exiting:
                for seg in mm.segments:
                    rows = np.arange(seg.row, seg.row + seg.pages, dtype=np.int64)
                    self.break_ksm(rows[self.pages.mergeable[rows]])
            self.remove_all_items(mm)
            if mm.exiting:
                self.unregister(mm)
            mm = nxt
        self.cursor, self.address = self.head, 0
        self.remove_all_stable_nodes()
        self.full_scans = 0
        return 0

    def set_merge_across_nodes(self, knob: int) -> None:
        """``merge_across_nodes_store`` after parsing; EBUSY while KSM pages exist, as for
        ``max_page_sharing``.  Pages then go to their node's trees (0) or to node 0's (1);
        unstable trees keep what they hold until the next full scan empties them."""
        if knob == self.merge_across_nodes:
            return
        self.check_no_ksm_pages()
        self.merge_across_nodes = knob

    def set_advisor_mode(self, scan_time: bool) -> None:
        """``advisor_mode_store`` after parsing (:func:`ksmlab.ksm.advisor.set_advisor_mode`)."""
        ksm_advisor.set_advisor_mode(self, scan_time)

    # --- counters --------------------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        """The sysfs counters, from :attr:`tally` (kept as the state changes)."""
        return sysfs_counters(self)

    def check(self) -> None:
        """The invariant check (:func:`ksmlab.bulk.invariants.check_bulk`, O(pages)), and
        the counters kept against a count from scratch."""
        check_bulk(self)
        vm_bug_on(self.tally.as_tuple() != count_columns(self),
                  f"bulk: counters kept {self.tally.as_tuple()} disagree with the columns "
                  f"{count_columns(self)}")
