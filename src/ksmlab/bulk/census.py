"""Whole-state counts of the bulk engine, computed from its columns.

The sysfs counters (SimKernel keeps them incrementally), the engine's
invariant check, and the stable tree's live entries that the cost model
(:mod:`ksmlab.ksm.cost`) takes as the tree's size at a full scan's start.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ksmlab.bulk.columns import KSM_ZERO, STABLE, UNSTABLE
from ksmlab.errors import vm_bug_on
from ksmlab.ksm import counters as ksm_counters

if TYPE_CHECKING:
    from ksmlab.bulk.engine import BulkKsm


def counters(ksm: BulkKsm) -> dict[str, int]:
    """The sysfs counters, computed from the columns."""
    pages, nodes = ksm.pages, ksm.nodes
    state = pages.state[:pages.n]
    n = nodes.n
    alive = nodes.alive[:n]
    counts = nodes.count[:n][alive]
    shared = int(np.count_nonzero(counts))
    sharing = int(counts.sum()) - shared
    rmap_items = int(np.count_nonzero(state))
    unshared = int(np.count_nonzero(state == UNSTABLE))
    zero = int(np.count_nonzero(pages.frame[:pages.n] == KSM_ZERO))
    return {
        "pages_shared": shared, "pages_sharing": sharing, "pages_unshared": unshared,
        "pages_volatile": ksm_counters.pages_volatile(rmap_items, shared, sharing, unshared),
        "pages_scanned": ksm.pages_scanned, "pages_skipped": ksm.pages_skipped,
        "full_scans": ksm.full_scans,
        "stable_node_chains": len(ksm.chains),
        "stable_node_dups": sum(len(ch.dups) for ch in ksm.chains.values()),
        "ksm_zero_pages": zero,
        "general_profit": ksm_counters.general_profit(sharing, zero, rmap_items),
        "rmap_items": rmap_items,
    }


def check(ksm: BulkKsm) -> None:
    """Recompute node counts from the items and compare (invariant check, O(pages))."""
    pages, nodes = ksm.pages, ksm.nodes
    st = pages.state[:pages.n] == STABLE
    heads = pages.head[:pages.n][st]
    live = heads[nodes.alive[heads]]
    want = np.bincount(live, minlength=nodes.n)[:nodes.n]
    have = np.where(nodes.alive[:nodes.n], nodes.count[:nodes.n], 0)
    vm_bug_on(bool((want != have).any()), "bulk: node counts disagree with the items")
    for c, chain in ksm.chains.items():
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


def live_stable_entries(ksm: BulkKsm) -> int:
    """Contents with a stable node whose KSM page is still mapped (SimKernel's
    :meth:`~ksmlab.ksm.scan.KsmScanner.live_stable_entries`: the cost model's
    stable-tree size at a full scan's start)."""
    n = ksm.nodes.n
    nodes = ksm.nodes
    live = nodes.alive[:n] & (ksm.frames.mapcount[nodes.kframe[:n]] > 0)
    return int(np.unique(nodes.content[:n][live]).size)


__all__ = ["check", "counters", "live_stable_entries"]
