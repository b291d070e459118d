"""The bulk engine's counters, kept as its state changes instead of counted when read.

``pages_shared``, ``pages_sharing``, ``pages_unshared``, the rmap_items behind
``pages_volatile`` and ``general_profit``, and ``ksm_zero_pages`` are sums over
the columns.  Counting them on every read costs O(pages) (tens of
milliseconds on a 40 GiB host), and a run reads them after every ksmd batch
(a timeline, a progress bar), so the engine keeps them as SimKernel does: each
change of an item's state, of a stable node's sharers or of a KSM zero page
mapping goes through :class:`Tally`, which adjusts the sums by the
difference.  :func:`count_columns` counts the same sums from scratch, and the
engine's invariant check (``BulkKsm.check``) compares the two, so a change
that bypassed the tally is caught by every test that runs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ksmlab.bulk.columns import ABSENT, KSM_ZERO, UNSTABLE
from ksmlab.ksm import counters

if TYPE_CHECKING:
    from ksmlab.bulk.engine import BulkKsm


class Tally:
    """Sums over the columns, kept up to date by the code that changes them.

    Attributes:
        items: rmap_items (pages whose ``state`` is not ABSENT).
        unstable: items whose state is UNSTABLE (``pages_unshared``).
        sharers: items hanging off live stable nodes (the sum of their ``count``).
        shared: live stable nodes with at least one item (``pages_shared``).
        zero_pages: pages mapping the KSM zero page (``ksm_zero_pages``).
    """

    __slots__ = ("items", "shared", "sharers", "unstable", "zero_pages")

    def __init__(self) -> None:
        self.items = 0
        self.unstable = 0
        self.sharers = 0
        self.shared = 0
        self.zero_pages = 0

    def as_tuple(self) -> tuple[int, int, int, int, int]:
        """(items, unstable, sharers, shared, zero_pages)."""
        return self.items, self.unstable, self.sharers, self.shared, self.zero_pages

    # --- item states ----------------------------------------------------------------------
    def restate(self, state: npt.NDArray[np.int8], index: Any, new: int) -> None:
        """``state[index] = new``, for an array view and any numpy index (mask or rows)."""
        old = state[index]
        n = int(old.size)
        self.items += (n if new != ABSENT else 0) - int(np.count_nonzero(old))
        self.unstable += (n if new == UNSTABLE else 0) - int(np.count_nonzero(old == UNSTABLE))
        state[index] = new

    def restate_one(self, state: npt.NDArray[np.int8], g: int, new: int) -> None:
        """``state[g] = new`` for one page (the per-page path, without array overheads)."""
        old = int(state[g])
        self.items += (new != ABSENT) - (old != ABSENT)
        self.unstable += (new == UNSTABLE) - (old == UNSTABLE)
        state[g] = new

    # --- stable nodes' sharers --------------------------------------------------------------
    def join(self, count: npt.NDArray[np.int32], nodes: npt.NDArray[Any]) -> None:
        """One more item on each of *nodes* (live; repeats allowed): ``count[nodes] += 1``."""
        if not len(nodes):
            return
        distinct = np.unique(nodes)
        self.shared += int(np.count_nonzero(count[distinct] == 0))
        self.sharers += len(nodes)
        np.add.at(count, nodes, 1)

    def join_one(self, count: npt.NDArray[np.int32], d: int) -> None:
        """One more item on live node *d*."""
        if count[d] == 0:
            self.shared += 1
        self.sharers += 1
        count[d] += 1

    def leave_one(self, count: npt.NDArray[np.int32], d: int) -> None:
        """One item fewer on live node *d*."""
        count[d] -= 1
        self.sharers -= 1
        if count[d] == 0:
            self.shared -= 1

    def leave(self, count: npt.NDArray[np.int32], nodes: npt.NDArray[Any],
              items: npt.NDArray[Any]) -> None:
        """``items[i]`` items fewer on each of the distinct live *nodes*."""
        if not len(nodes):
            return
        count[nodes] -= items.astype(count.dtype)
        self.sharers -= int(items.sum())
        self.shared -= int(np.count_nonzero(count[nodes] == 0))

    def new_nodes(self, n: int, sharers: int) -> None:
        """*n* new live nodes of *sharers* items each (``merge_two`` of *n* pairs)."""
        self.sharers += n * sharers
        if sharers:
            self.shared += n

    def drop_node(self, count: int) -> None:
        """A live node of *count* items is removed from the stable tree."""
        self.sharers -= count
        if count:
            self.shared -= 1

    # --- KSM zero pages ---------------------------------------------------------------------
    def zero_mapped(self, frames: npt.NDArray[np.int32], sign: int = 1) -> None:
        """The pages of *frames* that map the KSM zero page are mapped (+1) or unmapped (-1)."""
        self.zero_pages += sign * int(np.count_nonzero(frames == KSM_ZERO))


def count_columns(ksm: BulkKsm) -> tuple[int, int, int, int, int]:
    """What the :class:`Tally` of *ksm* must hold, counted from its columns (O(pages))."""
    pages, nodes = ksm.pages, ksm.nodes
    state = pages.state[:pages.n]
    n = nodes.n
    counts = nodes.count[:n][nodes.alive[:n]]
    return (int(np.count_nonzero(state)), int(np.count_nonzero(state == UNSTABLE)),
            int(counts.sum()), int(np.count_nonzero(counts)),
            int(np.count_nonzero(pages.frame[:pages.n] == KSM_ZERO)))


def sysfs_counters(ksm: BulkKsm) -> dict[str, int]:
    """The counter files of /sys/kernel/mm/ksm, from the tally (O(1) but for the chains)."""
    t = ksm.tally
    shared, sharing, items = t.shared, t.sharers - t.shared, t.items
    return {
        "pages_shared": shared, "pages_sharing": sharing, "pages_unshared": t.unstable,
        "pages_volatile": counters.pages_volatile(items, shared, sharing, t.unstable),
        "pages_scanned": ksm.pages_scanned, "pages_skipped": ksm.pages_skipped,
        "full_scans": ksm.full_scans,
        # Every node's stable tree (merge_across_nodes=0), not only node 0's.
        "stable_node_chains": sum(len(ix.chains) for ix in ksm.trees),
        "stable_node_dups": sum(len(ch.dups) for ix in ksm.trees for ch in ix.chains.values()),
        "ksm_zero_pages": t.zero_pages,
        "general_profit": counters.general_profit(sharing, t.zero_pages, items),
        "rmap_items": items,
    }


def live_stable_entries(ksm: BulkKsm) -> int:
    """Stable-tree entries (a content's regular node or chain, in each tree) with a KSM
    page still mapped: SimKernel's :meth:`~ksmlab.ksm.scan.KsmScanner.live_stable_entries`,
    the cost model's stable-tree size at a full scan's start (O(nodes))."""
    nodes, n = ksm.nodes, ksm.nodes.n
    kframe = nodes.kframe[:n]
    live = nodes.alive[:n] & (ksm.frames.mapcount[kframe] > 0)
    key = nodes.content[:n][live].astype(np.int64)
    if ksm.per_node:  # one pair of trees per NUMA node: an entry per (node, content)
        key = key * ksm.numa_nodes + ksm.frames.nid[kframe[live]]
    return int(np.unique(key).size)


__all__ = ["Tally", "count_columns", "live_stable_entries", "sysfs_counters"]
