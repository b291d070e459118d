"""The bulk engine's invariant check: what its columns, chains and address spaces must
satisfy, recomputed from scratch (the bulk counterpart of :mod:`ksmlab.invariants`).

Tests run it after every step of the lockstep programs; a violation is a
broken model (:class:`~ksmlab.errors.ModelInvariantError`).
"""

from __future__ import annotations

from itertools import pairwise
from typing import TYPE_CHECKING

import numpy as np

from ksmlab.bulk.columns import NO_FRAME, STABLE
from ksmlab.errors import vm_bug_on

if TYPE_CHECKING:
    from ksmlab.bulk.engine import BulkKsm
    from ksmlab.bulk.mm import BulkMm
    from ksmlab.bulk.trees import TreeIndex


def check_bulk(ksm: BulkKsm) -> None:
    """Node counts against the items, every live node filed once in its node's tree,
    chains against their columns and open sets, and every registered address space
    (O(pages))."""
    pages, nodes = ksm.pages, ksm.nodes
    st = pages.state[:pages.n] == STABLE
    heads = pages.head[:pages.n][st]
    live = heads[nodes.alive[heads]]
    want = np.bincount(live, minlength=nodes.n)[:nodes.n]
    have = np.where(nodes.alive[:nodes.n], nodes.count[:nodes.n], 0)
    vm_bug_on(bool((want != have).any()), "bulk: node counts disagree with the items")
    # Every live node is filed once, in the tree of its KSM page's node.
    filed: dict[int, TreeIndex] = {}
    for ix in ksm.trees:
        stable = ix.ctab.stable[:ix.ctab.n]
        for d in [*stable[stable >= 0].tolist(),
                  *(d for ch in ix.chains.values() for d in ch.dups)]:
            vm_bug_on(d in filed or ksm.node_tree(d) is not ix,
                      f"bulk: node {d} filed twice or in node {ix.nid}'s tree")
            filed[d] = ix
    vm_bug_on(filed.keys() != set(np.flatnonzero(nodes.alive[:nodes.n]).tolist()),
              "bulk: the live nodes are not those filed in the trees")
    for c, chain in ((c, ch) for ix in ksm.trees for c, ch in ix.chains.items()):
        vm_bug_on(not chain.open <= set(chain.dups), f"bulk: chain {c} opens a stranger")
        for d in chain.dups:
            full_alive = nodes.count[d] >= ksm.max_page_sharing and not ksm.stale(d)
            vm_bug_on(not full_alive and d not in chain.open,
                      f"bulk: dup {d} of chain {c} has room or a freed page but is closed")
        head = chain.dups[0] if chain.dups else -1  # emptied by exits: kept until searched
        vm_bug_on(ksm.chain_cols.head[chain.id] != head
                  or ksm.chain_cols.ndups[chain.id] != len(chain.dups)
                  or ksm.chain_cols.others_open[chain.id] != len(chain.open - {head}),
                  f"bulk: chain {c} and its columns disagree")
    if ksm.thps:
        check_thps(ksm)
    mm = ksm.head.next
    while mm is not ksm.head:
        check_mm(ksm, mm)
        mm = mm.next


def check_thps(ksm: BulkKsm) -> None:
    """Each THP's 512 frames name it, and no KSM page is one; a PMD-mapped page's extent
    is 512 consecutive rows, all PMD-mapped, mapping the THP's frames in order."""
    from ksmlab.bulk.thp import THP_PMD
    from ksmlab.constants import HPAGE_PMD_NR

    frames, pages = ksm.frames, ksm.pages
    thp = frames.thp[:frames.n].astype(np.int64)
    heads = np.unique(thp[thp >= 0])
    span = np.arange(HPAGE_PMD_NR)
    vm_bug_on(bool((thp[(heads[:, None] + span)] != heads[:, None]).any()),
              "bulk: a THP's frames do not all name it")
    vm_bug_on(bool(((thp >= 0) & (frames.knode[:frames.n] >= 0)).any()), "bulk: a KSM page in a THP")
    f = pages.frame[:pages.n].astype(np.int64)
    mapped = np.flatnonzero(((pages.thp[:pages.n] & THP_PMD) != 0) & (f >= 0))
    fm = f[mapped]
    pmd = mapped[thp[fm] >= 0]
    if len(pmd):
        head = thp[f[pmd]]
        first = np.unique(pmd - (f[pmd] - head))
        rows = first[:, None] + span
        h = thp[f[first]]
        vm_bug_on(bool((f[rows] != h[:, None] + span).any()
                       or ((pages.thp[rows] & THP_PMD) == 0).any()),
                  "bulk: a PMD-mapped extent's rows do not map its THP in order")


def check_mm(ksm: BulkKsm, mm: BulkMm) -> None:
    """Segments and ghosts each sorted, all disjoint; ghost rows map nothing and are not
    mergeable (munmap cleared them; an mmap over them takes them out of the ghosts)."""
    for ranges in (mm.segments, mm.ghosts):
        vm_bug_on([s.addr for s in ranges] != sorted(s.addr for s in ranges),
                  f"bulk: mm {mm.id}: ranges out of order")
    spans = sorted((s.addr, s.end) for s in mm.ranges())
    for (_start, end), (start, _end) in pairwise(spans):
        vm_bug_on(end > start, f"bulk: mm {mm.id}: ranges overlap at {start:#x}")
    for g in mm.ghosts:
        sl = slice(g.row, g.row + g.pages)
        vm_bug_on(bool((ksm.pages.frame[sl] != NO_FRAME).any() or ksm.pages.mergeable[sl].any()
                       or ksm.pages.thp[sl].any()),
                  f"bulk: mm {mm.id}: ghost at {g.addr:#x} maps a page, is mergeable or "
                  f"has THP bits")
