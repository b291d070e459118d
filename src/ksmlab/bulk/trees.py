"""The bulk engine's stable and unstable trees, one pair per NUMA node (``mm/ksm.c``).

The kernel keeps one stable and one unstable rbtree, ordered by content, or,
with ``merge_across_nodes=0``, one pair per NUMA node, chosen by the node of
the page being scanned (``get_kpfn_nid``; for a stable node, the node of its
KSM page).  The bulk engine keeps no ordered trees: a pair of trees is a
:class:`TreeIndex`, an exact index by content id (the unstable tree's page
and the stable node or chain of each content, :class:`ContentCols`) plus the
chains' dup lists.  Node 0's index always exists (it is the one pair of trees
when ``merge_across_nodes=1``); another node's is made the first time a page
of that node is filed under ``merge_across_nodes=0``, and kept, as the kernel
keeps its per-node roots once allocated.

:class:`StableTrees` is the part of :class:`ksmlab.bulk.engine.BulkKsm` that
works on them: what ``stable_tree_search``, ``stable_node_dup``,
``stable_tree_insert``, ``stable_tree_append``, ``remove_rmap_item_from_tree``
and ``unstable_tree_search_insert`` do to one page, each method taking the
index of the tree it works in.  The model choices these imply are listed in
:mod:`ksmlab.bulk.engine`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ksmlab.bulk.columns import (
    ABSENT,
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
from ksmlab.bulk.content import ContentTable
from ksmlab.bulk.tally import Tally
from ksmlab.ksm.cost import KsmdWork
from ksmlab.ksm.defaults import SEQNR_MASK


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


class TreeIndex:
    """One NUMA node's pair of trees (``root_stable_tree[nid]``, ``root_unstable_tree[nid]``).

    Attributes:
        nid: the node.
        ctab: per content id, the unstable tree's page and the stable node or chain.
        chains: the chains of this stable tree, by content.
    """

    __slots__ = ("chains", "ctab", "nid")

    def __init__(self, nid: int, ctab: ContentCols, chains: dict[int, Chain]) -> None:
        self.nid = nid
        self.ctab = ctab
        self.chains = chains


class StableTrees:
    """The trees' operations of :class:`ksmlab.bulk.engine.BulkKsm` (see the module doc).

    A mixin: the engine owns the columns and knobs declared here.
    """

    contents: ContentTable
    pages: PageCols
    frames: FrameCols
    ctab: ContentCols
    nodes: NodeCols
    chains: dict[int, Chain]
    chain_cols: ChainCols
    now_ms: Callable[[], float]
    full_scans: int
    max_page_sharing: int
    merge_across_nodes: int
    stable_node_chains_prune_millisecs: int
    numa_nodes: int
    trees: list[TreeIndex]
    """The pairs of trees made so far; node 0's (``ctab``, ``chains``) first."""
    tree_of_node: dict[int, TreeIndex]
    tally: Tally
    """The counters kept as items and nodes change (every change here goes through it)."""
    work: KsmdWork
    """What ksmd's current batch did, for its cost model (:mod:`ksmlab.ksm.cost`)."""
    dups_walked: int
    """The dups the last :meth:`stable_node_dup` walk looked at, as the kernel's would."""

    # --- which pair of trees ----------------------------------------------------------------
    @property
    def per_node(self) -> bool:
        """Pages go to their own node's trees (``merge_across_nodes=0`` on several nodes)."""
        return self.numa_nodes > 1 and not self.merge_across_nodes

    def index(self, nid: int) -> TreeIndex:
        """Node *nid*'s pair of trees, made (empty) the first time it is needed."""
        ix = self.tree_of_node.get(nid)
        if ix is None:
            ctab = ContentCols()
            ctab.append(len(self.contents))
            ix = self.tree_of_node[nid] = TreeIndex(nid, ctab, {})
            self.trees.append(ix)
        return ix

    def tree_of(self, f: int) -> TreeIndex:
        """The pair of trees frame *f* is filed in (``get_kpfn_nid``)."""
        if self.numa_nodes > 1 and not self.merge_across_nodes:  # per_node, inlined: hot
            return self.index(int(self.frames.nid[f]))
        return self.trees[0]

    def node_tree(self, d: int) -> TreeIndex:
        """The stable tree live node *d* is in: its KSM page's (the knob cannot change
        while a live node exists)."""
        return self.tree_of(int(self.nodes.kframe[d]))

    def reopen(self, nodes: Iterable[int]) -> None:
        """Put dups whose count dropped or whose page was freed back in their chain's open set."""
        one = len(self.trees) == 1
        if one and not self.chains:
            return
        for d in nodes:
            if not self.nodes.alive[d]:
                continue
            ix = self.trees[0] if one else self.node_tree(d)
            c = int(self.nodes.content[d])
            chain = ix.chains.get(c)
            if chain is not None and ix.ctab.stable[c] != d:
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
        ix = self.node_tree(d)
        self.tally.drop_node(int(self.nodes.count[d]))
        self.nodes.alive[d] = False
        c = int(self.nodes.content[d])
        if ix.ctab.stable[c] == d:
            ix.ctab.stable[c] = STABLE_NONE
        else:
            chain = ix.chains[c]
            chain.dups.remove(d)
            chain.open.discard(d)
            self.sync_chain(chain)

    def new_chain(self, ix: TreeIndex, c: int, dup: int) -> Chain:
        """A chain for content *c* in place of its regular node *dup* (``alloc_stable_node_chain``)."""
        chain = Chain(self.chain_cols.append(1), [dup], {dup})
        self.chain_cols.prune_time[chain.id] = int(self.now_ms())
        ix.chains[c] = chain
        ix.ctab.stable[c] = STABLE_CHAIN - chain.id
        self.sync_chain(chain)
        return chain

    def drop_chain(self, ix: TreeIndex, c: int, node: int) -> None:
        """Free content *c*'s chain; *node* (a dup or STABLE_NONE) takes its place."""
        chain = ix.chains.pop(c)
        chain.dups.clear()
        self.sync_chain(chain)
        ix.ctab.stable[c] = node

    def sync_chain(self, chain: Chain) -> None:
        """Copy *chain*'s head, length and open set's size to ``chain_cols``."""
        cols = self.chain_cols
        head = chain.dups[0] if chain.dups else -1
        cols.head[chain.id] = head
        cols.ndups[chain.id] = len(chain.dups)
        cols.others_open[chain.id] = len(chain.open) - (head in chain.open)

    def stable_node_dup(self, ix: TreeIndex, c: int, prune: bool) -> int:
        """Best dup of content *c*'s chain, collapsing or freeing the chain (``stable_node_dup``).

        Returns the dup, or -1 if every dup was stale (the chain is gone).
        The kernel looks at every dup up to the first one with room (all of
        them when pruning); dups not in ``chain.open`` are full with their page
        alive, so they can only be the answer when they come first, and the
        walk stops once it has seen every open dup.  ``dups_walked`` is what
        the cost model charges: the live dups looked at, 1 when the dup found
        moves to the head, 0 when the chain collapses (docs/cost-model.md).
        """
        chain = ix.chains[c]
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
        i = 0
        walked = -1  # the live dups looked at, if the walk stops at one with room
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
                continue
            candidate = self.is_candidate(d)
            if count[d] >= self.max_page_sharing:
                open_dups.discard(d)  # full and alive
            if found < 0 or (candidate and (
                    not self.is_candidate(found) or int(count[d]) > found_len)):
                found, found_len = d, int(count[d])
                if not prune and candidate:
                    walked = i + 1
                    break
            i += 1
        # Else every live dup (stale ones, which it drops, are not charged).
        self.dups_walked = walked if walked >= 0 else len(dups)
        if found < 0:
            self.drop_chain(ix, c, STABLE_NONE)
            return -1
        if len(chain.dups) == 1:
            self.dups_walked = 0  # a collapsing walk is not charged (SimKernel's model choice)
            self.drop_chain(ix, c, found)
            return found
        if chain.dups[0] != found and self.is_candidate(found, 1):
            chain.dups.remove(found)
            chain.dups.insert(0, found)
            if not prune:
                self.dups_walked = 1  # as if at the head already (SimKernel's model choice)
        self.sync_chain(chain)
        return found

    def stable_tree_search(self, ix: TreeIndex, c: int) -> int:
        """A KSM page of content *c* with room for one more mapping, or -1 (``stable_tree_search``)."""
        work = self.work
        work.stable_searches += 1
        while True:
            s = int(ix.ctab.stable[c])
            if s == STABLE_NONE:
                return -1
            if s <= STABLE_CHAIN:
                d = self.stable_node_dup(ix, c, True)
                if d < 0:
                    continue
                work.chain_dups += self.dups_walked
            else:
                d = s
                if self.stale(d):
                    self.remove_node(d)
                    continue
            work.stable_equal += 1
            return d if self.is_candidate(d) else -1

    def stable_tree_insert(self, ix: TreeIndex, c: int, kframe: int) -> int:
        """File KSM page *kframe* of content *c*, forming a chain if needed (``stable_tree_insert``)."""
        work = self.work
        work.stable_inserts += 1
        while True:
            s = int(ix.ctab.stable[c])
            if s <= STABLE_CHAIN:
                if self.stable_node_dup(ix, c, False) < 0:
                    continue
                work.chain_dups += self.dups_walked
                s = int(ix.ctab.stable[c])
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
            ix.ctab.stable[c] = d
        else:
            chain = ix.chains[c] if s <= STABLE_CHAIN else self.new_chain(ix, c, s)
            chain.dups.insert(0, d)
            chain.open.add(d)
            self.sync_chain(chain)
        return d

    def stable_tree_append(self, g: int, d: int) -> None:
        """Hang page *g*'s item off node *d* (``stable_tree_append``)."""
        self.pages.head[g] = d
        self.tally.restate_one(self.pages.state, g, STABLE)
        self.tally.join_one(self.nodes.count, d)

    def remove_rmap_item_from_tree(self, g: int) -> None:
        """Take page *g*'s item out of its tree (``remove_rmap_item_from_tree``)."""
        state = int(self.pages.state[g])
        if state == STABLE:
            d = int(self.pages.head[g])
            self.tally.restate_one(self.pages.state, g, NONE)
            self.pages.head[g] = -1
            if not self.nodes.alive[d]:
                return
            if self.stale(d):
                self.remove_node(d)
                return
            self.tally.leave_one(self.nodes.count, d)
            self.reopen((d,))
        elif state == UNSTABLE:
            self.tally.restate_one(self.pages.state, g, NONE)

    def free_rmap_item(self, g: int) -> None:
        """Free page *g*'s item, out of its tree first (``remove_rmap_item_from_tree`` + free)."""
        self.remove_rmap_item_from_tree(g)
        self.tally.restate_one(self.pages.state, g, ABSENT)
        self.work.items += 1

    # --- the unstable tree ------------------------------------------------------------------
    def cur_seqnr(self) -> int:
        """``ksm_scan.seqnr & SEQNR_MASK``."""
        return self.full_scans & SEQNR_MASK

    def unstable_tree_search_insert(self, ix: TreeIndex, g: int, f: int, c: int) -> int:
        """The page to merge *g* with, or -1 after inserting *g* or giving up.

        Models ``unstable_tree_search_insert`` in tree *ix*.  The trees are
        emptied at each full scan's start: a page is in *ix* while its item is
        UNSTABLE with the current seqnr and was inserted there (and it is the
        content's latest).
        """
        pages = self.pages
        work = self.work
        work.unstable_searches += 1
        y = int(ix.ctab.uindex[c])
        if y >= 0 and pages.state[y] == UNSTABLE and pages.seqnr[y] == self.cur_seqnr() and (
                self.numa_nodes == 1 or pages.unid[y] == ix.nid):
            fy = int(pages.frame[y])
            if fy < 0 or not pages.mergeable[y] or fy == f:
                return -1  # get_mergeable_page failed, or the same (forked) page
            if self.frames.content[fy] == c:
                if self.per_node and self.frames.nid[fy] != ix.nid:
                    # Filed while merge_across_nodes was 1: the partner is on another node.
                    return -1
                work.unstable_equal += 1
                return y
            # Model choice: a tree page whose content changed is not found.
        work.unstable_inserts += 1
        self.tally.restate_one(pages.state, g, UNSTABLE)
        pages.seqnr[g] = self.cur_seqnr()
        if self.numa_nodes > 1:
            pages.unid[g] = ix.nid
        ix.ctab.uindex[c] = g
        return -1
