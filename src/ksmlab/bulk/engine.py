"""ksmd's algorithm over the bulk engine's columns (``mm/ksm.c``, as in :mod:`ksmlab.ksm.ksm`).

This module is the bulk engine's *per-page path*: every function here does
for one page what the same-named method of :class:`ksmlab.ksm.ksm.KsmCore`
does for one rmap_item, on numpy rows instead of objects.  The vectorised
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
  page writes, fork, exit, MADV_(UN)MERGEABLE and run=2; one NUMA node.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from ksmlab.bulk import census
from ksmlab.bulk.columns import (
    ABSENT,
    KSM_ZERO,
    NONE,
    STABLE,
    STABLE_CHAIN,
    STABLE_NONE,
    UNSTABLE,
    ChainCols,
    ContentCols,
    FrameCols,
    NodeCols,
    PageCols,
)
from ksmlab.bulk.content import ZERO_CONTENT, ContentTable
from ksmlab.bulk.mm import BulkMm
from ksmlab.constants import KSM_RUN_MERGE, KSM_RUN_UNMERGE, PAGE_SHIFT
from ksmlab.errors import NotModelledError, kernel_error
from ksmlab.ksm.cost import KsmdWork
from ksmlab.ksm.defaults import (
    AGE_MAX,
    SEQNR_MASK,
)
from ksmlab.ksm.scan import skip_age
from ksmlab.ksm.tunables import KsmTunables


@dataclass(slots=True)
class Chain:
    """A stable node chain: KSM pages with one content (``ksm_stable_node`` chain).

    Attributes:
        id: its row in ``BulkKsm.chain_cols``, which mirrors it for vector code
            and holds its prune time.
        dups: its dups (node indices); index 0 is the hlist head.
    """

    id: int
    dups: list[int] = field(default_factory=list)
    open: set[int] = field(default_factory=set)
    """Dups that may have room or a freed page: a superset of those, kept so that
    a walk of a long chain looks only at them (the others are full and alive and
    cannot change the walk's result).  Closed again lazily when seen full."""


class BulkKsm(KsmTunables):
    """KSM state for a bulk machine: knobs, columns, chains, ksmd's cursor.

    Counters that SimKernel keeps incrementally (pages_shared, rmap_items...)
    are computed from the columns when read (:meth:`counters`).  It is the
    engine the virtual ksmd (:class:`ksmlab.ksm.ksmd.Ksmd`) and the sysfs
    table (:class:`ksmlab.ksm.sysfs.KsmSysfs`) work on, as SimKernel's
    :class:`~ksmlab.ksm.interface.Ksm` is.

    Args:
        contents: the machine's content ids.
        now_ms: the virtual clock in ms (ksmd's), read by chain pruning.
    """

    def __init__(self, contents: ContentTable, *,
                 now_ms: Callable[[], float] = lambda: 0.0) -> None:
        self.contents = contents
        self.pages = PageCols()
        self.frames = FrameCols()
        self.ctab = ContentCols()
        self.nodes = NodeCols()
        self.chains: dict[int, Chain] = {}
        """Chains by content."""
        self.chain_cols = ChainCols()
        # The knobs, at their boot values.  merge_across_nodes stays 1 (one NUMA
        # node is modelled) and advisor_scan_time False (the advisor is not).
        super().__init__()
        # --- incremental counters ---
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
        self.zero_checksum = int(contents.checksum[ZERO_CONTENT])
        self.wake_ksmd: Callable[[], None] = lambda: None
        """Set by the kernel to its ksmd's ``wake_up``: ksmd runs its next batch now."""
        self.read_counters: Callable[[], dict[str, int]] = self.counters
        """What :meth:`counter` reads; the kernel sets its cached :meth:`counters`."""
        self.mutations = 0
        """Bumped by every call that can change the counters outside ksmd's batches (the
        process calls of :class:`~ksmlab.bulk.kernel.BulkProcess` and the sysfs stores)."""
        self.work = KsmdWork()
        """What ksmd's current batch did, as the kernel's walk would have done it (for
        the cost model: :mod:`ksmlab.ksm.cost`)."""
        self._dups_walked = 0

    # --- content and frames ---------------------------------------------------------------
    def sync_contents(self) -> None:
        """Give every content id of the table a row (after the table grew)."""
        extra = len(self.contents) - self.ctab.n
        if extra > 0:
            self.ctab.append(extra)

    def new_frames(self, contents: np.ndarray) -> np.ndarray:
        """Allocate one frame per content id, each mapped once; return their indices."""
        first = self.frames.append(len(contents))
        idx = np.arange(first, first + len(contents), dtype=np.int32)
        self.frames.content[idx] = contents
        self.frames.mapcount[idx] = 1
        return idx

    def unmap(self, frames: np.ndarray) -> None:
        """Drop one mapping of each frame in *frames* (repeats allowed); KSM_ZERO ignored."""
        f = frames[frames >= 0]
        np.subtract.at(self.frames.mapcount, f, 1)
        knode = self.frames.knode[f]
        freed = (knode >= 0) & (self.frames.mapcount[f] == 0)
        if bool(freed.any()):
            self.reopen(knode[freed].tolist())

    def reopen(self, nodes: Iterable[int]) -> None:
        """Put dups whose count dropped or whose page was freed back in their chain's open set."""
        if not self.chains:
            return
        for d in nodes:
            c = int(self.nodes.content[d])
            chain = self.chains.get(c)
            if chain is not None and self.nodes.alive[d] and self.ctab.stable[c] != d:
                chain.open.add(d)
                self.sync_chain(chain)

    # --- the stable tree -------------------------------------------------------------------
    def stale(self, d: int) -> bool:
        """The node's KSM page was freed (``ksm_get_folio`` fails)."""
        return int(self.frames.mapcount[self.nodes.kframe[d]]) == 0

    def is_candidate(self, d: int, offset: int = 0) -> bool:
        """``__is_page_sharing_candidate``."""
        n = int(self.nodes.count[d])
        return n > 0 and n + offset < self.max_page_sharing

    def remove_node(self, d: int) -> None:
        """Drop a stale node with all its items (``remove_node_from_stable_tree``)."""
        self.nodes.alive[d] = False
        c = int(self.nodes.content[d])
        if self.ctab.stable[c] == d:
            self.ctab.stable[c] = STABLE_NONE
        else:
            chain = self.chains[c]
            chain.dups.remove(d)
            chain.open.discard(d)
            self.sync_chain(chain)

    def new_chain(self, c: int, dup: int) -> Chain:
        """A chain for content *c* in place of its regular node *dup* (``alloc_stable_node_chain``)."""
        chain = Chain(self.chain_cols.append(1), [dup], {dup})
        self.chain_cols.prune_time[chain.id] = int(self.now_ms())
        self.chains[c] = chain
        self.ctab.stable[c] = STABLE_CHAIN - chain.id
        self.sync_chain(chain)
        return chain

    def drop_chain(self, c: int, node: int) -> None:
        """Free content *c*'s chain; *node* (a dup or STABLE_NONE) takes its place."""
        chain = self.chains.pop(c)
        chain.dups.clear()
        self.sync_chain(chain)
        self.ctab.stable[c] = node

    def sync_chain(self, chain: Chain) -> None:
        """Copy *chain*'s head, length and open set's size to ``chain_cols``."""
        cols = self.chain_cols
        head = chain.dups[0] if chain.dups else -1
        cols.head[chain.id] = head
        cols.ndups[chain.id] = len(chain.dups)
        cols.others_open[chain.id] = len(chain.open) - (head in chain.open)

    def stable_node_dup(self, c: int, prune: bool) -> int:
        """Best dup of content *c*'s chain, collapsing or freeing the chain (``stable_node_dup``).

        Returns the dup, or -1 if every dup was stale (the chain is gone).
        The kernel looks at every dup up to the first one with room (all of
        them when pruning); dups not in ``chain.open`` are full with their page
        alive, so they can only be the answer when they come first, and the
        walk stops once it has seen every open dup.
        """
        chain = self.chains[c]
        now = int(self.now_ms())
        prune_time = self.chain_cols.prune_time
        if not prune or now < prune_time[chain.id] + self.stable_node_chains_prune_millisecs:
            prune = False
        else:
            prune_time[chain.id] = now
        count = self.nodes.count
        found, found_len = -1, 0
        dups, open_dups = chain.dups, chain.open
        todo = len(open_dups)
        i = removed = 0
        # The kernel's walk looks at every dup unless it stops at the first with room.
        self._dups_walked = len(dups)
        while i < len(dups) and (todo or found < 0):
            d = dups[i]
            if d not in open_dups:
                if found < 0:
                    found, found_len = d, int(count[d])
                i += 1
                continue
            todo -= 1
            if self.stale(d):
                self.remove_node(d)  # out of dups: i now names the next one
                removed += 1
                continue
            candidate = self.is_candidate(d)
            if count[d] >= self.max_page_sharing:
                open_dups.discard(d)  # full and alive
            if found < 0 or (candidate and (
                    not self.is_candidate(found) or int(count[d]) > found_len)):
                found, found_len = d, int(count[d])
                if not prune and candidate:
                    self._dups_walked = i + removed + 1
                    break
            i += 1
        if found < 0:
            self.drop_chain(c, STABLE_NONE)
            return -1
        if len(chain.dups) == 1:
            self.drop_chain(c, found)
            return found
        if chain.dups[0] != found and self.is_candidate(found, 1):
            chain.dups.remove(found)
            chain.dups.insert(0, found)
        self.sync_chain(chain)
        return found

    def stable_tree_search(self, c: int) -> int:
        """A KSM page of content *c* with room for one more mapping, or -1 (``stable_tree_search``)."""
        work = self.work
        work.stable_searches += 1
        while True:
            s = int(self.ctab.stable[c])
            if s == STABLE_NONE:
                return -1
            if s <= STABLE_CHAIN:
                d = self.stable_node_dup(c, True)
                if d < 0:
                    continue
                work.chain_dups += self._dups_walked
            else:
                d = s
                if self.stale(d):
                    self.remove_node(d)
                    continue
            work.stable_equal += 1
            return d if self.is_candidate(d) else -1

    def stable_tree_insert(self, c: int, kframe: int) -> int:
        """File KSM page *kframe* of content *c*, forming a chain if needed (``stable_tree_insert``)."""
        work = self.work
        work.stable_inserts += 1
        while True:
            s = int(self.ctab.stable[c])
            if s <= STABLE_CHAIN:
                if self.stable_node_dup(c, False) < 0:
                    continue
                work.chain_dups += self._dups_walked
                s = int(self.ctab.stable[c])
            elif s != STABLE_NONE and self.stale(s):
                self.remove_node(s)
                continue
            break
        d = self.nodes.append(1)
        self.nodes.kframe[d] = kframe
        self.nodes.content[d] = c
        self.nodes.alive[d] = True
        self.frames.knode[kframe] = d
        if s == STABLE_NONE:
            work.stable_new += 1
            self.ctab.stable[c] = d
        else:
            chain = self.chains[c] if s <= STABLE_CHAIN else self.new_chain(c, s)
            chain.dups.insert(0, d)
            chain.open.add(d)
            self.sync_chain(chain)
        return d

    def stable_tree_append(self, g: int, d: int) -> None:
        """Hang page *g*'s item off node *d* (``stable_tree_append``)."""
        self.pages.head[g] = d
        self.pages.state[g] = STABLE
        self.nodes.count[d] += 1

    def remove_rmap_item_from_tree(self, g: int) -> None:
        """Take page *g*'s item out of its tree (``remove_rmap_item_from_tree``)."""
        state = int(self.pages.state[g])
        if state == STABLE:
            d = int(self.pages.head[g])
            self.pages.state[g] = NONE
            self.pages.head[g] = -1
            if not self.nodes.alive[d]:
                return
            if self.stale(d):
                self.remove_node(d)
                return
            self.nodes.count[d] -= 1
            self.reopen((d,))
        elif state == UNSTABLE:
            self.pages.state[g] = NONE

    def free_rmap_item(self, g: int) -> None:
        """Free page *g*'s item, out of its tree first (``remove_rmap_item_from_tree`` + free)."""
        self.remove_rmap_item_from_tree(g)
        self.pages.state[g] = ABSENT
        self.work.items += 1

    # --- merging -------------------------------------------------------------------------
    def replace_page(self, g: int, kframe: int) -> None:
        """Map *kframe* at page *g* instead of its frame (``replace_page``)."""
        old = int(self.pages.frame[g])
        self.frames.mapcount[old] -= 1
        self.pages.frame[g] = kframe
        if kframe >= 0:
            self.frames.mapcount[kframe] += 1
            self.work.merges += 1
        else:
            self.work.zero_merges += 1

    def cur_seqnr(self) -> int:
        """``ksm_scan.seqnr & SEQNR_MASK``."""
        return self.full_scans & SEQNR_MASK

    def unstable_tree_search_insert(self, g: int, f: int, c: int) -> int:
        """The page to merge *g* with, or -1 after inserting *g* or giving up.

        Models ``unstable_tree_search_insert``.
        """
        pages = self.pages
        work = self.work
        work.unstable_searches += 1
        y = int(self.ctab.uindex[c])
        if y >= 0 and pages.state[y] == UNSTABLE and pages.seqnr[y] == self.cur_seqnr():
            fy = int(pages.frame[y])
            if fy < 0 or not pages.mergeable[y] or fy == f:
                return -1  # get_mergeable_page failed, or the same (forked) page
            if self.frames.content[fy] == c:
                work.unstable_equal += 1
                return y
            # Model choice: a tree page whose content changed is not found.
        work.unstable_inserts += 1
        pages.state[g] = UNSTABLE
        pages.seqnr[g] = self.cur_seqnr()
        self.ctab.uindex[c] = g
        return -1

    def merge_two(self, g: int, f: int, y: int, c: int) -> None:
        """Make *f* a KSM page, map it at *y* too, and file it (``try_to_merge_two_pages`` + insert)."""
        self.work.new_ksm += 1
        self.replace_page(y, f)
        self.remove_rmap_item_from_tree(y)
        d = self.stable_tree_insert(c, f)
        self.stable_tree_append(y, d)
        self.stable_tree_append(g, d)

    def cmp_and_merge_page(self, g: int, f: int) -> None:
        """Try to merge page *g* (frame *f*) via the stable tree, else the unstable tree."""
        pages, frames = self.pages, self.frames
        knode = int(frames.knode[f])
        if knode >= 0:
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

    def merge_unchanged(self, g: int, f: int, c: int) -> None:
        """The rest of ``cmp_and_merge_page`` for an ordinary page whose checksum held."""
        d = self.stable_tree_search(c)
        if d >= 0:
            self.replace_page(g, int(self.nodes.kframe[d]))
            self.stable_tree_append(g, d)
            return
        y = self.unstable_tree_search_insert(g, f, c)
        if y >= 0:
            self.merge_two(g, f, y, c)

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
        pages.state[g] = NONE
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
        remove_trailing_rmap_items free them.
        """
        done = 0
        for seg in mm.segments:
            if seg.end <= self.address:
                continue
            if self.address < seg.addr:
                self.address = seg.addr
            i = (self.address - seg.addr) >> PAGE_SHIFT
            while i < seg.pages:
                want = budget - done
                visited, used = self.scan_window(seg.row + i, self.window(want, seg.pages - i),
                                                 want)
                done += visited
                i += used
                self.address = seg.addr + (i << PAGE_SHIFT)
                if done == budget:
                    return done, False
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
        self.cmp_and_merge_page(g, f)
        return True

    def has_mergeable(self, mm: BulkMm) -> bool:
        """Whether some mapping of *mm* carries VM_MERGEABLE."""
        return any(bool(self.pages.mergeable[s.row:s.row + s.pages].any()) for s in mm.segments)

    def remove_all_items(self, mm: BulkMm) -> None:
        """Free every item of *mm* (``remove_trailing_rmap_items`` from the start)."""
        for seg in mm.segments:
            rows = np.flatnonzero(self.pages.state[seg.row:seg.row + seg.pages] != ABSENT)
            for g in rows + seg.row:
                self.free_rmap_item(int(g))

    def unregister(self, mm: BulkMm) -> None:
        """Take *mm* off ksmd's list (MMF_VM_MERGEABLE cleared)."""
        mm.list_del()
        mm.registered = False

    def ksm_do_scan(self, budget: int) -> int:
        """One batch of ksmd (``ksm_do_scan``): up to *budget* pages; returns pages scanned."""
        done = 0
        work = self.work
        while done < budget:
            if self.cursor is self.head:
                if self.list_empty():
                    break
                work.scan_starts += 1
                work.stable_base = census.live_stable_entries(self)
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
                self.full_scans += 1
                break
        self.pages_scanned += done
        work.pages += done
        return done



    # --- the sysfs stores (ksmlab.ksm.sysfs's table calls them, as SimKernel's) -----------
    def counter(self, name: str) -> int:
        """The value of counter file *name* (see :attr:`read_counters`)."""
        return self.read_counters()[name]

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
        n = self.nodes.n
        if bool((self.nodes.count[:n][self.nodes.alive[:n]] > 0).any()) \
                or self.remove_all_stable_nodes():
            raise kernel_error(errno.EBUSY, "KSM pages exist")
        self.max_page_sharing = knob

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
        contents = np.where(old >= 0, self.frames.content[np.maximum(old, 0)], ZERO_CONTENT)
        self.unmap(old)
        self.pages.frame[rows[ksm_page]] = self.new_frames(contents)

    def remove_all_stable_nodes(self) -> int:
        """Remove every stable node whose KSM page is no longer mapped; EBUSY if one still is.

        Model choice: the kernel walks its tree from the root and stops at the
        first busy node, so which unmapped nodes it removes before giving up
        depends on the tree's shape; here all of them are removed.  Only the
        chain and dup counts can differ, until ksmd meets those nodes.
        """
        self.mutations += 1
        err = 0
        stable = self.ctab.stable[:self.ctab.n]
        for c in np.flatnonzero(stable != STABLE_NONE).tolist():
            s = int(stable[c])
            if s > STABLE_NONE:
                if self.stale(s):
                    self.remove_node(s)
                else:
                    err = errno.EBUSY
                continue
            chain = self.chains[c]
            for d in list(chain.dups):
                if self.stale(d):
                    self.remove_node(d)
                else:
                    err = errno.EBUSY
            if not chain.dups:
                self.drop_chain(c, STABLE_NONE)
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
        """``merge_across_nodes_store`` after parsing: only the value it has (1) is modelled."""
        if knob != self.merge_across_nodes:
            raise NotModelledError("the bulk engine models one NUMA node "
                                   "(merge_across_nodes=1 only)")

    def set_advisor_mode(self, scan_time: bool) -> None:
        """Not modelled (the kernel's sysfs view hides the advisor's files)."""
        raise NotModelledError("advisor_mode: the scan-time advisor is not modelled by the "
                               "bulk engine; use SimKernel")

    # --- counters --------------------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        """The sysfs counters, computed from the columns (:func:`ksmlab.bulk.census.counters`)."""
        return census.counters(self)

    def check(self) -> None:
        """Recompute node counts from the items and compare (:func:`ksmlab.bulk.census.check`)."""
        census.check(self)
