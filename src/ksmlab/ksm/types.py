"""KSM's data types (``struct ksm_rmap_item``, ``ksm_stable_node``, ``ksm_mm_slot``, ``ksm_scan``).

The kernel packs state into flag bits of ``rmap_item->address`` and into a
magic ``rmap_hlist_len``; ksmlab spells the same states out as enums and
optional fields, each guarded by a predicate with the kernel's name.
"""

from __future__ import annotations

from enum import Enum

from ksmlab.ksm.defaults import SEQNR_MASK as SEQNR_MASK  # re-exported: rmap_item's field width
from ksmlab.ksm.rbtree import RbNode
from ksmlab.mm.mm_types import AnonVma, MmStruct
from ksmlab.mm.page import Frame


class RmapState(Enum):
    """Which tree an rmap_item is in (the kernel's UNSTABLE_FLAG / STABLE_FLAG)."""

    NONE = 0
    UNSTABLE = 1
    STABLE = 2


class RmapItem(RbNode):
    """Reverse mapping item for one virtual address ksmd has seen (``ksm_rmap_item``).

    Attributes:
        mm: the address space.
        address: page-aligned virtual address.
        rmap_next: next item of this mm, in address order (``rmap_list``).
        oldchecksum: checksum seen at the previous visit (0 for a new item).
        age: visits so far, saturating at 255 (smart scan).
        remaining_skips: visits still to skip (smart scan).
        state: tree membership.
        seqnr: when unstable, ``full_scans & 0xff`` at insertion.
        nid: when unstable, the tree (NUMA node) it was inserted in.
        head: when stable, the stable node (regular node or dup) it hangs off.
        anon_vma: when stable, the anon_vma of its vma at merge time.
    """

    __slots__ = ("address", "age", "anon_vma", "head", "mm", "nid", "oldchecksum",
                 "remaining_skips", "rmap_next", "seqnr", "state")

    def __init__(self, mm: MmStruct, address: int) -> None:
        super().__init__()
        self.mm = mm
        self.address = address
        self.rmap_next: RmapItem | None = None
        self.oldchecksum = 0
        self.age = 0
        self.remaining_skips = 0
        self.state = RmapState.NONE
        self.seqnr = 0
        self.nid = 0
        self.head: StableNode | None = None
        self.anon_vma: AnonVma | None = None

    def __repr__(self) -> str:
        return f"<RmapItem mm={self.mm.id} addr={self.address:#x} {self.state.name}>"


class NodeKind(Enum):
    """A stable node is a regular node, a chain head, or a dup inside a chain."""

    REGULAR = 0
    CHAIN = 1
    DUP = 2


class StableNode(RbNode):
    """Node of the stable tree (``ksm_stable_node``).

    Attributes:
        kind: regular node (in the tree), chain (in the tree, holds dups), or dup.
        kpage: the KSM page (the kernel keeps its pfn, ``kpfn``); None for a chain.
        items: when regular or dup, the rmap_items mapping kpage; the *last*
            element is the hlist head (most recently added).
        dups: when a chain, its dups; index 0 is the hlist head.
        chain: when a dup, the chain holding it.
        chain_prune_time: when a chain, jiffies (ms) of its last full prune.
        nid: NUMA tree the node is filed in.
        on_migrate_list: the node sits on ``migrate_nodes`` (its page moved node).
    """

    __slots__ = ("chain", "chain_prune_time", "dups", "items", "kind", "kpage", "nid",
                 "on_migrate_list")

    def __init__(self, kind: NodeKind, kpage: Frame | None, nid: int) -> None:
        super().__init__()
        self.kind = kind
        self.kpage = kpage
        self.items: dict[RmapItem, None] = {}
        self.dups: list[StableNode] = []
        self.chain: StableNode | None = None
        self.chain_prune_time = 0
        self.nid = nid
        self.on_migrate_list = False

    @property
    def rmap_hlist_len(self) -> int:
        """Number of rmap_items on this node."""
        return len(self.items)

    def __repr__(self) -> str:
        pfn = self.kpage.pfn if self.kpage is not None else None
        return f"<StableNode {self.kind.name} kpfn={pfn} items={len(self.items)}>"


def is_stable_node_chain(node: StableNode) -> bool:
    """``is_stable_node_chain``."""
    return node.kind is NodeKind.CHAIN


def is_stable_node_dup(node: StableNode) -> bool:
    """``is_stable_node_dup``."""
    return node.kind is NodeKind.DUP


class ListHead:
    """A node of a circular doubly linked list (``struct list_head``); alone it is a list.

    Attributes:
        prev, next: neighbours (itself when unlinked).
    """

    __slots__ = ("next", "prev")

    def __init__(self) -> None:
        self.prev: ListHead = self
        self.next: ListHead = self

    def list_del(self) -> None:
        """Unlink from the list."""
        self.prev.next = self.next
        self.next.prev = self.prev
        self.prev = self.next = self

    def list_add_before(self, other: ListHead) -> None:
        """Link just before *other* (``list_add_tail(&self, &other)``)."""
        self.prev, self.next = other.prev, other
        other.prev.next = self
        other.prev = self

    def list_add_after(self, other: ListHead) -> None:
        """Link just after *other* (``list_add(&self, &other)``)."""
        self.prev, self.next = other, other.next
        other.next.prev = self
        other.next = self


class MmSlot(ListHead):
    """An mm registered with ksmd (``ksm_mm_slot``), linked in a circular list.

    Attributes:
        mm: the address space; None only for the list head sentinel.
        rmap_list: first rmap_item of the mm (address order).
        prev, next: neighbours in ksmd's circular scan list.
    """

    __slots__ = ("mm", "rmap_list")
    prev: MmSlot
    next: MmSlot

    def __init__(self, mm: MmStruct | None) -> None:
        super().__init__()
        self.mm = mm
        self.rmap_list: RmapItem | None = None


class KsmScan:
    """ksmd's cursor (``struct ksm_scan``).

    Attributes:
        mm_slot: the slot being scanned, or the list head between full scans.
        address: next address to look at in that mm.
        rmap_prev: the item whose ``rmap_next`` is the cursor position, or None
            for the slot's list head (the kernel's ``rmap_list`` double pointer).
        seqnr: completed full scans (``full_scans``).
    """

    __slots__ = ("address", "mm_slot", "rmap_prev", "seqnr")

    def __init__(self, head: MmSlot) -> None:
        self.mm_slot = head
        self.address = 0
        self.rmap_prev: RmapItem | None = None
        self.seqnr = 0
