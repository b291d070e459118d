"""The bulk engine's vectorised batch path: many pages of one mapping at a time.

ksmd's per-page decision (:meth:`BulkKsm.visit_row`) depends on other pages
only through the trees, and the trees are keyed by content: what happens to a
page of content C depends on earlier pages of content C and on nothing else.
So a run of pages can be handled out of order, one content group at a time,
as long as every group sees its own pages in scan order.  This module does
that with numpy:

1. take a window of the mapping from the cursor, compute which pages ksmd
   will visit (mapped and mergeable, not skipped by smart scan) and stop
   after the batch's budget, exactly where the per-page walk would stop;
2. rows whose outcome could depend on another content group, or on pages
   handled later in the window, are *irregular* and go through the per-page
   path in their place, splitting the window around them: a page whose frame
   other pages also map (fork), a page whose item leaves a live stable node,
   a KSM page being joined by a new mapping, a zero page under
   use_zero_pages;
3. every other row is handled by array operations: items freed, created and
   aged, checksums updated, and the pages whose checksum held grouped by
   content.  Groups of one page, and groups of two with nothing in either
   tree, are merged or inserted all at once; larger groups run a short loop
   that merges whole runs of pages into one KSM page at a time.  Under
   ``merge_across_nodes=0`` the groups are formed per NUMA node, each in its
   node's trees (:mod:`ksmlab.bulk.trees`).

Tests check that this path and the per-page path leave identical state.

ksmd's cost model (:mod:`ksmlab.ksm.cost`) needs the steps the kernel's walk
would take; where a step is done for many pages at once, each page's step is
counted as the kernel would take it: a group merged into one KSM page is a
stable search finding its node, and a merge, per page; a chain's walk stops at
its head (which has room) unless a prune is due, which walks every dup; a KSM
frame the rows reach is counted once per batch (``ksm_frames``, the set the
per-page path counts in too).  The tests compare these counts with the per-page path's and with SimKernel's.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from ksmlab.bulk.columns import (
    ABSENT,
    KSM_ZERO,
    NONE,
    STABLE,
    STABLE_CHAIN,
    STABLE_NONE,
    UNSTABLE,
)
from ksmlab.bulk.content import ZERO_CONTENT
from ksmlab.bulk.engine import BulkKsm
from ksmlab.bulk.thp import end_step, pmd_mapped, split_thps
from ksmlab.bulk.trees import TreeIndex
from ksmlab.errors import vm_bug_on
from ksmlab.ksm.defaults import AGE_MAX
from ksmlab.ksm.scan import skip_age

Rows = npt.NDArray[np.int64]

_SKIP_AGE = np.array([skip_age(age) for age in range(AGE_MAX + 1)], dtype=np.uint8)
"""``skip_age(age)`` for every age."""


class VectorKsm(BulkKsm):
    """BulkKsm whose walk handles windows of pages with numpy (see the module doc)."""

    min_window = 4096
    """Pages looked at per step when the batch budget is smaller."""


    def window(self, want: int, rest: int) -> int:
        """A little more than the budget: enough rows for *want* visits in most windows."""
        return min(rest, max(self.min_window, want + want // 4))

    def scan_window(self, first: int, width: int, want: int) -> tuple[int, int]:
        """Handle rows from *first* (at most *width*) until *want* visits; return (visits, rows).

        Falls back to the per-page loop where a window holds a shared frame.
        """
        pages, frames = self.pages, self.frames
        sl = slice(first, first + width)
        frame = pages.frame[sl]
        elig = (frame >= 0) & pages.mergeable[sl]
        f = np.where(elig, frame, 0)
        ksm = elig & (frames.knode[f] >= 0)
        if bool((elig & ~ksm & (frames.mapcount[f] > 1)).any()):
            # A frame other pages map too (fork): one page's merge can change
            # what ksmd sees at another, so take the exact per-page walk.
            return super().scan_window(first, width, want)
        state = pages.state[sl]
        absent = state == ABSENT
        if self.smart_scan:
            age = np.where(absent, 0, pages.age[sl])
            skip = elig & ~ksm & (age >= 3) & (np.where(absent, 0, pages.skips[sl]) > 0)
        else:
            skip = np.zeros(width, bool)
        visit = elig & ~skip
        cum = np.cumsum(visit)
        total = int(cum[-1]) if width else 0
        cut = int(np.searchsorted(cum, want)) + 1 if total >= want else width
        visited = min(total, want)
        # Irregular rows, which the per-page path handles in place.
        sl = slice(first, first + cut)
        elig, ksm, visit, skip, state = elig[:cut], ksm[:cut], visit[:cut], skip[:cut], state[:cut]
        f = f[:cut]
        head = pages.head[sl]
        live_stable = (state == STABLE) & self.nodes.alive[np.maximum(head, 0)] & (head >= 0)
        steady = visit & ksm & live_stable & (head == frames.knode[f])
        irregular = live_stable & ~steady
        if self.use_zero_pages:
            # A page whose checksum is the zero page's but is not zero-filled.
            content = frames.content[f]
            irregular |= visit & ~ksm & (self.contents.checksum[content] == self.zero_checksum) & (
                content != ZERO_CONTENT)
        if self.thps:
            # Pages that may meet a page of their own THP in the unstable tree (whose merge
            # fails, docs/bulk.md "THP"): the outcome depends on when the THP is split.
            irregular[self._same_thp_matches(first, f, visit & ~ksm)] = True
        odd = np.flatnonzero(irregular)
        if len(odd) > cut // 8 + 16:
            vm_bug_on(super().scan_window(first, cut, want) != (visited, cut),
                      "bulk: window miscounted")
            return visited, cut
        start = 0
        for j in odd.tolist():
            if j > start:
                self._regular(first + start, first + j, visit[start:j], skip[start:j],
                              elig[start:j])
            self.visit_row(first + j)
            start = j + 1
        if cut > start:
            self._regular(first + start, first + cut, visit[start:], skip[start:], elig[start:])
        return visited, cut

    def _same_thp_matches(self, first: int, f: npt.NDArray[np.int32],
                          plain: npt.NDArray[np.bool_]) -> npt.NDArray[np.int64]:
        """The offsets of the window's pages (*plain*: visited ordinary pages, frames *f*)
        that may find a page of their own THP in the unstable tree: the second page of a
        THP and content in the window (the first was filed, or merged and split the THP,
        so once the second is visited the THP is split), or a page whose content's tree
        page is in its THP.  Only pages whose checksum held search the trees.  The THPs
        are those at the window's start: a split during the window only removes risks."""
        none = np.zeros(0, np.int64)
        off = np.flatnonzero(plain)
        fr = f[off]
        heads = self.frames.thp[fr]
        t = heads >= 0
        if not bool(t.any()):
            return none
        off, fr, heads = off[t], fr[t], heads[t].astype(np.int64)
        content = self.frames.content[fr].astype(np.int64)
        g = off + first
        oldsum = np.where(self.pages.state[g] == ABSENT, 0, self.pages.oldsum[g])
        held = oldsum == self.contents.checksum[content]
        if self.use_zero_pages:
            held &= content != ZERO_CONTENT  # they merge with the zero page, not a tree page
        off, heads, content = off[held], heads[held], content[held]
        if not len(off):
            return none
        order = np.lexsort((off, content, heads))
        h, c = heads[order], content[order]
        risky = np.zeros(len(off), bool)
        same = np.r_[False, (h[1:] == h[:-1]) & (c[1:] == c[:-1])]
        second = same & ~np.r_[False, same[:-1]]  # the second of each run, not the third
        risky[order[second]] = True
        for ix in self.trees:
            y = ix.ctab.uindex[content]
            has = y >= 0
            fy = self.pages.frame[y[has]]
            risky[has] |= (fy >= 0) & (self.frames.thp[np.maximum(fy, 0)] == heads[has])
        out: npt.NDArray[np.int64] = off[risky]
        return out

    def free_items(self, first: int, count: int) -> None:
        """BulkKsm.free_items with array operations (a munmap of a terabyte leaves that many
        items for ksmd to free).

        Freeing items of one node commutes with freeing another's: a stale
        node is removed once (its other items find it dead), a live node loses
        one sharer per item and is reopened in its chain.
        """
        sl = slice(first, first + count)
        state = self.pages.state[sl]
        stable = state == STABLE
        if bool(stable.any()):
            heads = self.pages.head[sl]
            live = heads[stable][self.nodes.alive[heads[stable]]]
            if len(live):
                nodes, items = np.unique(live, return_counts=True)
                stale = self.frames.mapcount[self.nodes.kframe[nodes]] == 0
                for d in nodes[stale].tolist():
                    self.remove_node(d)
                keep = nodes[~stale]
                self.tally.leave(self.nodes.count, keep, items[~stale])
                self.reopen(keep.tolist())
            heads[stable] = -1
        had = state != ABSENT
        self.work.items += int(np.count_nonzero(had))
        self.tally.restate(state, had, ABSENT)

    def _regular(self, lo: int, hi: int, visit: npt.NDArray[np.bool_],
                 skip: npt.NDArray[np.bool_], elig: npt.NDArray[np.bool_]) -> None:
        """Handle rows [lo, hi), none of them irregular, with array operations."""
        vrows = np.flatnonzero(visit) + lo
        if not self.thps:
            self.work.pte_pages += len(vrows)
            self._regular_steps(lo, hi, visit, skip, elig)
            return
        # Which pages the walk reaches through a THP's PMD: those PMD-mapped now whose
        # THP no page before them splits (end_step, from the splits logged).
        vf = self.pages.frame[vrows]
        pmd0 = pmd_mapped(self, vrows, vf)
        heads0 = self.frames.thp[vf[pmd0]].astype(np.int64)
        self.split_log = []
        try:
            self._regular_steps(lo, hi, visit, skip, elig)
            self.work.pte_pages += end_step(self, vrows, pmd0, heads0)
        finally:
            self.split_log = None

    def _regular_steps(self, lo: int, hi: int, visit: npt.NDArray[np.bool_],
                       skip: npt.NDArray[np.bool_], elig: npt.NDArray[np.bool_]) -> None:
        """_regular's steps (the pages' items, checksums and merges)."""
        pages, frames, tally = self.pages, self.frames, self.tally
        sl = slice(lo, hi)
        state = pages.state[sl]
        # Items of pages passed over are freed; they are in no live stable
        # node (else the row would be irregular), so only the state changes.
        gone = ~elig & (state != ABSENT)
        tally.restate(state, gone, ABSENT)
        new = elig & (state == ABSENT)
        tally.restate(state, new, NONE)
        work = self.work
        work.items += int(np.count_nonzero(gone)) + int(np.count_nonzero(new))
        work.pte_walk += int(np.count_nonzero((pages.frame[sl] == KSM_ZERO) & pages.mergeable[sl]))
        pages.oldsum[sl][new] = 0
        pages.age[sl][new] = 0
        pages.skips[sl][new] = 0
        pages.head[sl][new] = -1
        frame = pages.frame[sl]
        f = np.where(elig, frame, 0)
        knode = frames.knode[f]
        ksm = elig & (knode >= 0)
        # A KSM page mapped here but not by this item (a fork child's): join its node.
        join = visit & ksm & ~((state == STABLE) & (pages.head[sl] == knode))
        met = visit & ksm  # KSM pages reached, steady or joined: each frame once per batch
        if bool(met.any()):
            self._meet_ksm_frames(frame[met])
        tally.restate(state, join, NONE)
        if self.smart_scan:
            aging = elig & ~ksm
            age = pages.age[sl].copy()
            bump = aging & (age != AGE_MAX)
            pages.age[sl][bump] = age[bump] + 1
            old = aging & (age >= 3)
            skips = pages.skips[sl]
            arm = old & (skips == 0)
            skips[arm] = _SKIP_AGE[age[arm]]
            skips[skip] -= 1
            skipped = int(np.count_nonzero(skip))
            self.pages_skipped += skipped
            work.skipped += skipped
            tally.restate(state, skip, NONE)  # out of the unstable tree (lazily) or a dead node
        # Ordinary pages visited: out of their tree, then the checksum test.
        plain = visit & ~ksm
        tally.restate(state, plain, NONE)
        rows = np.flatnonzero(plain) + lo
        fr = frame[plain]
        content = frames.content[fr]
        checksum = self.contents.checksum[content]
        work.checksums += len(rows)
        changed = pages.oldsum[rows] != checksum
        pages.oldsum[rows[changed]] = checksum[changed]
        held = ~changed
        if self.use_zero_pages:
            # try_to_merge_with_zero_page: map the zero page, the item stays.
            zero = held & (content == ZERO_CONTENT)
            work.zero_merges += int(np.count_nonzero(zero))
            split_thps(self, fr[zero], rows[zero])
            self.unmap(fr[zero])
            pages.frame[rows[zero]] = KSM_ZERO
            tally.zero_pages += int(np.count_nonzero(zero))
            held &= ~zero
        rows, fr, content = rows[held], fr[held].astype(np.int64), content[held].astype(np.int64)
        jrows = np.flatnonzero(join) + lo
        jnode = knode[join].astype(np.int64)
        if len(jrows):
            jcontent = self.nodes.content[jnode].astype(np.int64)
            both = np.intersect1d(jcontent, content)
            if len(both):
                # Joins and merges of the same content interact: one loop, in scan order.
                jmix = np.isin(jcontent, both)
                mix = np.isin(content, both)
                self._mixed(jrows[jmix], jnode[jmix], rows[mix], content[mix])
                jrows, jnode = jrows[~jmix], jnode[~jmix]
                rows, fr, content = rows[~mix], fr[~mix], content[~mix]
            tally.join(self.nodes.count, jnode)
            tally.restate(pages.state, jrows, STABLE)
            pages.head[jrows] = jnode
        self._merge_groups(rows, fr, content)

    def _meet_ksm_frames(self, met: npt.NDArray[np.int32]) -> None:
        """``meet_ksm_frame`` for every frame of *met* (repeats allowed)."""
        seen = self.ksm_frames_met
        if len(met) > 1:  # runs of one frame first (identical pages), cheaper than the sort
            met = met[np.r_[True, met[1:] != met[:-1]]]
        new = [f for f in np.unique(met).tolist() if f not in seen]
        seen.update(new)
        self.work.ksm_frames += len(new)

    def _mixed(self, jrows: Rows, jnode: Rows, rows: Rows, content: Rows) -> None:
        """Joins and merges of shared contents, one page at a time in scan order."""
        join = dict(zip(jrows.tolist(), jnode.tolist(), strict=True))
        merge = dict(zip(rows.tolist(), content.tolist(), strict=True))
        for g in sorted(join.keys() | merge.keys()):
            if g in join:
                self.stable_tree_append(g, join[g])
            else:
                self.merge_unchanged(g, int(self.pages.frame[g]), merge[g])

    def _merge_groups(self, rows: Rows, fr: Rows, content: Rows) -> None:
        """``merge_unchanged`` for each row, grouped by content, each group in scan order
        (and by node first when each node has its trees: they are independent)."""
        if not len(rows):
            return
        if not self.per_node:
            self._merge_tree_groups(self.trees[0], rows, fr, content)
            return
        nid = self.frames.nid[fr]
        for t in np.unique(nid).tolist():
            sel = nid == t
            self._merge_tree_groups(self.index(t), rows[sel], fr[sel], content[sel])

    def _merge_tree_groups(self, ix: TreeIndex, rows: Rows, fr: Rows, content: Rows) -> None:
        """``_merge_groups`` for pages filed in the trees *ix*."""
        order = np.argsort(content, kind="stable")
        rows, fr, content = rows[order], fr[order], content[order]
        starts = np.flatnonzero(np.r_[True, content[1:] != content[:-1]])
        sizes = np.diff(np.r_[starts, len(rows)])
        gc = content[starts]
        no_stable = ix.ctab.stable[gc] == STABLE_NONE
        # Whether the unstable tree holds a page for the group's content now.
        y = ix.ctab.uindex[gc]
        ys = np.maximum(y, 0)
        intree = (y >= 0) & (self.pages.state[ys] == UNSTABLE) & (
            self.pages.seqnr[ys] == self.cur_seqnr())
        if self.numa_nodes > 1:  # and inserted in this node's tree
            intree &= self.pages.unid[ys] == ix.nid
        single = no_stable & (sizes == 1)
        pair = no_stable & (sizes == 2) & ~intree
        work = self.work
        # Each page of both: a stable search that finds nothing, then an unstable one.
        n_pair = int(np.count_nonzero(pair))
        n_alone = int(np.count_nonzero(single)) + 2 * n_pair
        work.stable_searches += n_alone
        work.unstable_searches += n_alone
        work.unstable_inserts += n_pair
        work.unstable_equal += n_pair
        if bool(single.any()):
            self._singles(ix, rows[starts[single]], fr[starts[single]], gc[single], y[single],
                          intree[single])
        if bool(pair.any()):
            # The first page goes into the unstable tree, the second finds it.
            s = starts[pair]
            self.pages.seqnr[rows[s]] = self.cur_seqnr()
            if self.numa_nodes > 1:
                self.pages.unid[rows[s]] = ix.nid
            ix.ctab.uindex[gc[pair]] = rows[s]
            self._merge_pairs(ix, rows[s + 1], fr[s + 1], rows[s], gc[pair])
        rest = ~(single | pair)
        fits, target, walked = self._room_for_all(ix, gc, sizes)
        fast = rest & fits
        if bool(fast.any()):
            searches = int(sizes[fast].sum())  # each page's search finds the target
            work.stable_searches += searches
            work.stable_equal += searches
            work.chain_dups += int(walked[fast].sum())
            group = np.repeat(np.arange(len(gc)), sizes)
            sel = fast[group]
            self._merge_into(rows[sel], target[group[sel]])
        for k in np.flatnonzero(rest & ~fast).tolist():
            a, n = int(starts[k]), int(sizes[k])
            self._group(ix, rows[a:a + n], int(gc[k]))

    def _room_for_all(self, ix: TreeIndex, gc: Rows,
                      sizes: Rows) -> tuple[npt.NDArray[np.bool_], Rows, Rows]:
        """Groups whose every page stable_tree_search would send to the same KSM page.

        That is the content's regular node, or the first dup of its chain when
        no prune is due (the search then takes the first dup with room) or
        every other dup is full (a prune then finds nothing better, and only
        records its time), if that node's page is alive and it has room for
        the whole group.  Returns (which groups, each group's node, the dups the
        kernel's searches of each group's pages would walk).
        """
        stable = ix.ctab.stable[gc].astype(np.int64)
        chain = stable <= STABLE_CHAIN
        cid = np.where(chain, STABLE_CHAIN - stable, 0)
        cols = self.chain_cols
        now = int(self.now_ms())
        due = now >= cols.prune_time[cid] + self.stable_node_chains_prune_millisecs
        # A due prune walks every dup and keeps the fullest with room: still the
        # first dup when every other one is full with its page alive.
        chain_ok = chain & (~due | (cols.others_open[cid] == 0)) & (cols.ndups[cid] >= 2)
        target = np.where(chain, cols.head[cid], stable)
        ok: npt.NDArray[np.bool_] = (stable >= 0) | chain_ok
        t = np.maximum(target, 0)
        count = self.nodes.count[t]
        ok &= ((self.frames.mapcount[self.nodes.kframe[t]] > 0) & (count > 0)
               & (count + sizes <= self.max_page_sharing))
        pruned = cid[ok & chain & due]
        cols.prune_time[pruned] = now
        # The dups the kernel's searches walk: a chain's walk stops at its head (which
        # has room) unless a prune is due, which walks every dup: once per group, or
        # every time when the prune interval is 0.
        nd = cols.ndups[cid].astype(np.int64)
        if self.stable_node_chains_prune_millisecs == 0:
            walked = sizes * nd
        else:
            walked = np.where(due, nd + sizes - 1, sizes)
        return ok, target, np.where(chain, walked, 0)

    def _count_repeats(self, ix: TreeIndex, c: int, n: int) -> None:
        """Count *n* more searches of content *c* in *ix* that find the dup just found again.

        That dup has room for them all, so the search moved it to its chain's
        head: each walk stops there, unless the prune interval is 0 (every
        search then prunes, walking every dup).
        """
        work = self.work
        work.stable_searches += n
        work.stable_equal += n
        chain = ix.chains.get(c)
        if chain is not None:
            prune_all = self.stable_node_chains_prune_millisecs == 0
            work.chain_dups += n * (len(chain.dups) if prune_all else 1)

    def _merge_into(self, rows: Rows, nodes: Rows) -> None:
        """Merge each page into its stable node (``replace_page`` + ``stable_tree_append``)."""
        pages, frames = self.pages, self.frames
        kframe = self.nodes.kframe[nodes]
        self.work.merges += len(rows)
        split_thps(self, pages.frame[rows], rows)
        np.subtract.at(frames.mapcount, pages.frame[rows], 1)
        pages.frame[rows] = kframe
        np.add.at(frames.mapcount, kframe, 1)
        self.tally.restate(pages.state, rows, STABLE)
        pages.head[rows] = nodes
        self.tally.join(self.nodes.count, nodes)

    def _singles(self, ix: TreeIndex, rows: Rows, fr: Rows, c: Rows, y: Rows,
                 intree: npt.NDArray[np.bool_]) -> None:
        """One page of its content, none in the stable tree: merge with the tree page or insert."""
        pages, frames = self.pages, self.frames
        fy = np.where(intree, pages.frame[np.maximum(y, 0)], -1)
        ok = intree & (fy >= 0)
        ok[ok] = pages.mergeable[y[ok]]
        abort = intree & ~ok  # get_mergeable_page failed: no insert
        match = ok.copy()
        match[ok] = frames.content[fy[ok]] == c[ok]
        if self.per_node:
            # Filed while merge_across_nodes was 1: a partner on another node, no insert.
            elsewhere = match.copy()
            elsewhere[match] = frames.nid[fy[match]] != ix.nid
            abort |= elsewhere
            match &= ~elsewhere
        insert = ~abort & ~match
        self.work.unstable_equal += int(np.count_nonzero(match))
        self.work.unstable_inserts += int(np.count_nonzero(insert))
        if bool(match.any()):
            self._merge_pairs(ix, rows[match], fr[match], y[match], c[match])
        ins = rows[insert]
        self.tally.restate(pages.state, ins, UNSTABLE)
        pages.seqnr[ins] = self.cur_seqnr()
        if self.numa_nodes > 1:
            pages.unid[ins] = ix.nid
        ix.ctab.uindex[c[insert]] = ins

    def _merge_pairs(self, ix: TreeIndex, rows: Rows, fr: Rows, ys: Rows, c: Rows) -> None:
        """``merge_two`` for each (row, y) pair, each with a content of its own."""
        pages, frames, nodes = self.pages, self.frames, self.nodes
        n = len(rows)
        work = self.work  # the tree page merged into a new KSM page, filed as a new entry
        work.merges += n
        work.new_ksm += n
        work.stable_inserts += n
        work.stable_new += n
        split_thps(self, np.concatenate([fr, pages.frame[ys]]), np.concatenate([rows, rows]))
        np.subtract.at(frames.mapcount, pages.frame[ys], 1)
        pages.frame[ys] = fr
        frames.mapcount[fr] += 1
        d0 = nodes.append(len(rows))
        d = np.arange(d0, d0 + len(rows), dtype=np.int64)
        nodes.count[d] = 2
        nodes.kframe[d] = fr
        nodes.content[d] = c
        nodes.alive[d] = True
        frames.knode[fr] = d
        ix.ctab.stable[c] = d
        self.tally.new_nodes(len(rows), 2)
        for g in (ys, rows):
            self.tally.restate(pages.state, g, STABLE)
            pages.head[g] = d

    def _group(self, ix: TreeIndex, rows: Rows, c: int) -> None:
        """Pages of one content in scan order, merging whole runs into one KSM page at a time."""
        pages, nodes = self.pages, self.nodes
        i, n = 0, len(rows)
        while i < n:
            d = self.stable_tree_search(ix, c)
            if d >= 0:
                # Every page of the run would find this node again until it is full.
                k = min(n - i, self.max_page_sharing - int(nodes.count[d]))
                self._count_repeats(ix, c, k - 1)
                self._merge_into(rows[i:i + k], np.full(k, d, np.int64))
                i += k
                continue
            g = int(rows[i])
            f = int(pages.frame[g])
            y = self.unstable_tree_search_insert(ix, g, f, c)
            if y >= 0:
                self.merge_two(ix, g, f, y, c)
            i += 1
