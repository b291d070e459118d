"""Whole-model consistency checks: recompute KSM's state from scratch and compare.

:func:`check_invariants` walks every structure the model keeps (ksmd's mm_slot
list and each slot's rmap_list, the stable trees with their chains and dups,
the unstable trees, every address space's page table and the page caches),
recomputes what the incremental counters claim, and raises
:class:`~ksmlab.errors.ModelInvariantError` at the first disagreement.  The
message starts with the name of the broken invariant, e.g.
``"pages_sharing: counter says 3, the stable tree holds 2"``.

The checks follow ``docs/kernel-behaviour.md`` sections 3 and 4 and the kernel's own
comments.  Each invariant has its own helper, so a failure points at one rule:

* ``mm_slot list``: the circular list, ``mm_slots`` and MMF_VM_MERGEABLE agree.
* ``rmap_list``: items are page aligned, strictly sorted, and belong to their slot's mm.
* ``rmap_items``: global and per-mm item counts.
* ``rbtree``: every stable and unstable tree is a valid red-black tree.
* ``stable tree shape``: regular/chain nodes in the tree, dups only inside chains;
  ``stable_node_chains`` and ``stable_node_dups``.
* ``stable tree order``: in-order traversal is strictly increasing by page content.
* ``stable items``: item ↔ node links; ``pages_shared``, ``pages_sharing``,
  per-mm ``ksm_merging_pages``.
* ``unstable tree``: its members are this pass's UNSTABLE items; ``pages_unshared``.
* ``pages_volatile``: the derived counter equals the items in no tree.
* ``ksm frames``: stable nodes point at KSM frames that point back, and a mapped
  KSM frame can never be written in place.
* ``ksm_zero_pages``: KSM-placed zero PTEs, globally and per mm.
* ``mapcount``: each frame's mapcount is the number of PTEs mapping it; nothing
  mapped or cached is freed; every PTE lies inside a vma.
* ``frame leak``: frames in use are exactly those mapped or in a page cache.
* ``thp``: a PMD-mapped THP lies inside one vma, its mm's PTEs map its 512 frames in
  order, it and its mms point at each other, and its mapcount is its frames' sum.
* ``max_page_sharing``: no append went past the limit without the fork bypass.
* ``scan cursor``: ksmd's cursor points into the slot list and the slot's items.

The module only reads the model; it never changes it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NoReturn

from ksmlab.constants import HPAGE_PMD_NR, PAGE_SHIFT, PAGE_SIZE
from ksmlab.errors import ModelInvariantError
from ksmlab.ksm.rbtree import RbRoot, rb_check
from ksmlab.ksm.types import SEQNR_MASK, MmSlot, NodeKind, RmapItem, RmapState, StableNode
from ksmlab.mm.mm_types import MappedFile, MmStruct
from ksmlab.mm.page import Frame, Thp

if TYPE_CHECKING:
    from ksmlab.kernel import SimKernel

__all__ = ["check_invariants"]


def _fail(invariant: str, detail: str) -> NoReturn:
    raise ModelInvariantError(f"{invariant}: {detail}")


# --- the census: one walk over everything --------------------------------------------------


@dataclass
class _Census:
    """Everything reachable in the model, gathered once per check."""

    slots: list[MmSlot] = field(default_factory=list)
    """ksmd's mm_slot list, in list order (head excluded)."""
    items: list[RmapItem] = field(default_factory=list)
    """Every rmap_item of every slot, in scan order."""
    mms: dict[int, MmStruct] = field(default_factory=dict)
    """Every reachable mm by id: live processes' and registered (possibly exiting) ones."""
    tree_nodes: list[tuple[int, StableNode]] = field(default_factory=list)
    """(nid, node) for every node linked in a stable tree, in order per tree."""
    dups: list[StableNode] = field(default_factory=list)
    """Every dup of every chain."""

    @property
    def ksm_pages(self) -> Iterator[StableNode]:
        """The nodes standing for one KSM page each: regular nodes and dups."""
        for _nid, node in self.tree_nodes:
            if node.kind is NodeKind.REGULAR:
                yield node
        yield from self.dups


def _walk_slots(k: SimKernel) -> list[MmSlot]:
    head = k.ksm.core.mm_head
    slots: list[MmSlot] = []
    slot = head.next
    while slot is not head:
        if len(slots) > len(k.ksm.core.mm_slots):
            _fail("mm_slot list", "the circular list is longer than mm_slots (a cycle?)")
        if slot.next.prev is not slot:
            _fail("mm_slot list", f"broken prev link after the slot of mm {_mm_id(slot)}")
        slots.append(slot)
        slot = slot.next
    if head.next.prev is not head:
        _fail("mm_slot list", "broken prev link at the list head")
    return slots


def _mm_id(slot: MmSlot) -> int | None:
    return slot.mm.id if slot.mm is not None else None


def _walk_rmap_list(slot: MmSlot, limit: int) -> list[RmapItem]:
    out: list[RmapItem] = []
    item = slot.rmap_list
    while item is not None:
        if len(out) > limit:
            _fail("rmap_list", f"mm {_mm_id(slot)}: the list is longer than rmap_items (a cycle?)")
        out.append(item)
        item = item.rmap_next
    return out


def _iter_tree(root: RbRoot) -> Iterator[StableNode]:
    for node in root:
        if not isinstance(node, StableNode):
            _fail("stable tree shape", f"{node!r} in a stable tree is not a stable node")
        yield node


def _take_census(k: SimKernel) -> _Census:
    census = _Census()
    census.slots = _walk_slots(k)
    limit = k.ksm.core.rmap_items + 1
    for slot in census.slots:
        if slot.mm is None:
            _fail("mm_slot list", "a slot other than the head has no mm")
        census.mms[slot.mm.id] = slot.mm
        census.items.extend(_walk_rmap_list(slot, limit))
    for proc in k.processes.values():
        census.mms.setdefault(proc.mm.id, proc.mm)
    for nid, root in enumerate(k.ksm.core.root_stable_tree):
        for node in _iter_tree(root):
            census.tree_nodes.append((nid, node))
            if node.kind is NodeKind.CHAIN:
                census.dups.extend(node.dups)
    return census


# --- ksmd's lists ------------------------------------------------------------------------------


def _check_mm_slot_list(k: SimKernel, c: _Census) -> None:
    """The scan list, the mm -> slot map and MMF_VM_MERGEABLE describe the same set."""
    listed = {id(s) for s in c.slots}
    if len(listed) != len(c.slots) or len(c.slots) != len(k.ksm.core.mm_slots):
        _fail("mm_slot list", f"{len(c.slots)} slots on the list, {len(k.ksm.core.mm_slots)} in mm_slots")
    for mm_id, slot in k.ksm.core.mm_slots.items():
        if id(slot) not in listed or slot.mm is None or slot.mm.id != mm_id:
            _fail("mm_slot list", f"mm_slots[{mm_id}] is not on the scan list under that mm")
    for mm in c.mms.values():
        if mm.ksm_registered != (mm.id in k.ksm.core.mm_slots):
            _fail("mm_slot list", f"mm {mm.id}: MMF_VM_MERGEABLE={mm.ksm_registered} but "
                  f"{'a' if mm.id in k.ksm.core.mm_slots else 'no'} slot")


def _check_rmap_lists(c: _Census) -> None:
    """Each slot's items are page aligned, strictly sorted by address, and its mm's."""
    for slot in c.slots:
        prev = -1
        item = slot.rmap_list
        while item is not None:
            if item.address % PAGE_SIZE:
                _fail("rmap_list", f"{item!r}: address not page aligned")
            if item.address <= prev:
                _fail("rmap_list", f"mm {_mm_id(slot)}: {item!r} is out of address order")
            if item.mm is not slot.mm:
                _fail("rmap_list", f"{item!r} is on the list of mm {_mm_id(slot)}")
            prev = item.address
            item = item.rmap_next


def _check_rmap_item_counts(k: SimKernel, c: _Census) -> None:
    """``rmap_items`` = items on all lists = Σ mm.ksm_rmap_items; each mm counts its own."""
    if k.ksm.core.rmap_items != len(c.items):
        _fail("rmap_items", f"counter says {k.ksm.core.rmap_items}, the slot lists hold {len(c.items)}")
    per_mm = Counter(item.mm.id for item in c.items)
    for mm in c.mms.values():
        if mm.ksm_rmap_items != per_mm[mm.id]:
            _fail("rmap_items", f"mm {mm.id}: ksm_rmap_items says {mm.ksm_rmap_items}, "
                  f"its list holds {per_mm[mm.id]}")
    registered = sum(slot.mm.ksm_rmap_items for slot in c.slots if slot.mm is not None)
    if registered != k.ksm.core.rmap_items:
        _fail("rmap_items", f"Σ mm.ksm_rmap_items over registered mms is {registered}, "
              f"counter says {k.ksm.core.rmap_items}")


def _check_scan_cursor(k: SimKernel, c: _Census) -> None:
    """ksmd's cursor is the list head or a listed slot, and its item is on that slot's list."""
    scan = k.ksm.core.scan
    if scan.mm_slot is k.ksm.core.mm_head:
        return
    if all(scan.mm_slot is not s for s in c.slots):
        _fail("scan cursor", "ksm_scan.mm_slot is neither the head nor a listed slot")
    if scan.rmap_prev is not None:
        item = scan.mm_slot.rmap_list
        while item is not None and item is not scan.rmap_prev:
            item = item.rmap_next
        if item is None:
            _fail("scan cursor", f"{scan.rmap_prev!r} is not on the cursor slot's rmap_list")
        if scan.rmap_prev.address >= scan.address:
            _fail("scan cursor", f"cursor address {scan.address:#x} is not past {scan.rmap_prev!r}")


# --- trees ---------------------------------------------------------------------------------------


def _check_rbtrees(k: SimKernel) -> None:
    """Every stable and unstable root holds a valid red-black tree."""
    roots = [("stable", r) for r in k.ksm.core.root_stable_tree]
    roots += [("unstable", r) for r in k.ksm.core.root_unstable_tree]
    for nid_kind, root in roots:
        try:
            rb_check(root)
        except AssertionError as e:
            _fail("rbtree", f"{nid_kind} tree: {e}")


def _check_stable_tree_shape(k: SimKernel, c: _Census) -> None:
    """Regular and chain nodes are in the trees, dups only in their chain; chain/dup counts."""
    for nid, node in c.tree_nodes:
        if node.nid != nid:
            _fail("stable tree shape", f"{node!r} has nid {node.nid} but is in tree {nid}")
        if node.kind is NodeKind.DUP:
            _fail("stable tree shape", f"{node!r}: a dup is linked in the tree itself")
        if node.kind is NodeKind.CHAIN and (node.kpage is not None or node.items):
            _fail("stable tree shape", f"{node!r}: a chain has a page or items of its own")
        if node.kind is NodeKind.CHAIN:
            for dup in node.dups:
                if dup.kind is not NodeKind.DUP or dup.chain is not node or dup.nid != nid:
                    _fail("stable tree shape", f"{dup!r} in chain {node!r} is not its dup")
    if len({id(d) for d in c.dups}) != len(c.dups):
        _fail("stable tree shape", "a dup is on more than one chain")
    chains = sum(1 for _nid, n in c.tree_nodes if n.kind is NodeKind.CHAIN)
    if k.ksm.core.stable_node_chains != chains:
        _fail("stable_node_chains", f"counter says {k.ksm.core.stable_node_chains}, the trees hold {chains}")
    if k.ksm.core.stable_node_dups != len(c.dups):
        _fail("stable_node_dups", f"counter says {k.ksm.core.stable_node_dups}, the chains hold {len(c.dups)}")


def _content(node: StableNode) -> bytes | None:
    """The page content a tree node stands for (None for a chain with no dup left)."""
    if node.kind is NodeKind.CHAIN:
        return _content(node.dups[0]) if node.dups else None
    if node.kpage is None:
        _fail("ksm frames", f"{node!r} has no KSM page")
    return node.kpage.data


def _check_stable_tree_order(c: _Census) -> None:
    """In-order traversal is strictly increasing by content; a chain's dups are all equal."""
    prev: dict[int, bytes] = {}
    for nid, node in c.tree_nodes:
        data = _content(node)
        if (node.kind is NodeKind.CHAIN and data is not None
                and any(_content(dup) != data for dup in node.dups)):
            _fail("stable tree order", f"chain {node!r} holds dups of different content")
        if data is None:
            continue
        if nid in prev and not prev[nid] < data:
            _fail("stable tree order", f"{node!r} is not after its in-order predecessor by content")
        prev[nid] = data


def _check_stable_items(k: SimKernel, c: _Census) -> None:
    """Item ↔ node links; pages_shared, pages_sharing and each mm's ksm_merging_pages."""
    on_nodes: set[int] = set()
    shared = sharing = 0
    for node in c.ksm_pages:
        for item in node.items:
            if item.state is not RmapState.STABLE or item.head is not node:
                _fail("stable items", f"{item!r} on {node!r} is not a stable item of that node")
            if item.anon_vma is None:
                _fail("stable items", f"{item!r} is stable but has no anon_vma")
            on_nodes.add(id(item))
        if node.items:
            shared += 1
            sharing += len(node.items) - 1
    merging: Counter[int] = Counter()
    for item in c.items:
        if item.state is RmapState.STABLE:
            merging[item.mm.id] += 1
            if id(item) not in on_nodes:
                _fail("stable items", f"{item!r} is STABLE but on no node linked in a stable tree")
        elif item.head is not None or item.anon_vma is not None:
            _fail("stable items", f"{item!r} is not stable but keeps a stable node or anon_vma")
    if len(on_nodes) != sum(merging.values()):
        _fail("stable items", "a stable node holds an item that is on no mm's rmap_list")
    if k.ksm.core.pages_shared != shared:
        _fail("pages_shared", f"counter says {k.ksm.core.pages_shared}, {shared} KSM pages have items")
    if k.ksm.core.pages_sharing != sharing:
        _fail("pages_sharing", f"counter says {k.ksm.core.pages_sharing}, the stable tree holds {sharing}")
    for mm in c.mms.values():
        if mm.ksm_merging_pages != merging[mm.id]:
            _fail("ksm_merging_pages", f"mm {mm.id}: counter says {mm.ksm_merging_pages}, "
                  f"{merging[mm.id]} of its items are stable")


def _check_unstable_tree(k: SimKernel, c: _Census) -> None:
    """pages_unshared counts UNSTABLE items; mid-pass, the tree holds exactly this pass's ones.

    Between two passes (cursor at the list head) the unstable roots still
    hold the last pass's tree, which the next pass discards unread, so only
    the counter and item ages are checked then.
    """
    seqnr = k.ksm.core.scan.seqnr & SEQNR_MASK
    unstable = [item for item in c.items if item.state is RmapState.UNSTABLE]
    if k.ksm.core.pages_unshared != len(unstable):
        _fail("pages_unshared", f"counter says {k.ksm.core.pages_unshared}, "
              f"{len(unstable)} items are UNSTABLE")
    for item in unstable:
        if (seqnr - item.seqnr) & SEQNR_MASK > 1:
            _fail("unstable tree", f"{item!r} has been UNSTABLE for more than one pass")
    if k.ksm.core.scan.mm_slot is k.ksm.core.mm_head:
        return
    in_tree: set[int] = set()
    for nid, root in enumerate(k.ksm.core.root_unstable_tree):
        for node in root:
            if (not isinstance(node, RmapItem) or node.state is not RmapState.UNSTABLE
                    or node.seqnr != seqnr or node.nid != nid):
                _fail("unstable tree", f"{node!r} in unstable tree {nid} is not an item "
                      "inserted there during this pass")
            in_tree.add(id(node))
    current = {id(item) for item in unstable if item.seqnr == seqnr}
    if in_tree != current:
        _fail("unstable tree", f"{len(in_tree)} items linked in the unstable trees, "
              f"{len(current)} UNSTABLE items inserted during this pass")
    listed = {id(item) for item in c.items}
    if not in_tree <= listed:
        _fail("unstable tree", "an item in the unstable tree is on no mm's rmap_list")


def _check_pages_volatile(k: SimKernel, c: _Census) -> None:
    """pages_volatile = max(0, rmap_items − shared − sharing − unshared) = items in no tree."""
    ksm = k.ksm
    expected = max(0, ksm.rmap_items - ksm.pages_shared - ksm.pages_sharing - ksm.pages_unshared)
    if ksm.pages_volatile != expected:
        _fail("pages_volatile", f"reads {ksm.pages_volatile}, the formula gives {expected}")
    in_no_tree = sum(1 for item in c.items if item.state is RmapState.NONE)
    if expected != in_no_tree:
        _fail("pages_volatile", f"formula gives {expected}, {in_no_tree} items are in no tree")


# --- frames ----------------------------------------------------------------------------------------


def _pte_refs(c: _Census) -> tuple[Counter[int], dict[int, Frame]]:
    """How many PTEs map each (non zero-page) frame, over every reachable mm."""
    refs: Counter[int] = Counter()
    frames: dict[int, Frame] = {}
    for mm in c.mms.values():
        for frame in mm.ptes.values():
            if not frame.zero:
                refs[id(frame)] += 1
                frames[id(frame)] = frame
    return refs, frames


def _files(k: SimKernel, c: _Census) -> list[MappedFile]:
    """Every file or shmem object whose page cache the model can still reach."""
    seen: dict[int, MappedFile] = {}
    for mm in c.mms.values():
        for vma in mm.vmas:
            if vma.file is not None:
                seen.setdefault(id(vma.file), vma.file)
    mapped: dict[str, MappedFile] = k.__dict__.get("_mapped_files", {})
    for f in mapped.values():
        seen.setdefault(id(f), f)
    return list(seen.values())


def _check_ksm_frames(k: SimKernel, c: _Census) -> None:
    """Stable nodes and KSM frames point at each other; no mapped KSM frame is writable in place."""
    for node in c.ksm_pages:
        page = node.kpage
        if page is None or not page.ksm:
            _fail("ksm frames", f"{node!r} does not point at a KSM frame")
        if not page.freed and page.stable_node is not node:
            _fail("ksm frames", f"{page!r} of {node!r} does not point back at its node")
    nodes = {id(n) for n in c.ksm_pages}
    for mm in c.mms.values():
        for vpn, frame in mm.ptes.items():
            if not frame.ksm:
                continue
            vma = mm.vma_lookup(vpn << PAGE_SHIFT)
            if vma is not None and k.memory.can_write_in_place(vma, frame):
                _fail("ksm frames", f"mm {mm.id} {vpn << PAGE_SHIFT:#x}: {frame!r} is writable in place")
            if not frame.anon or frame.stable_node is None or id(frame.stable_node) not in nodes:
                _fail("ksm frames", f"mm {mm.id} {vpn << PAGE_SHIFT:#x}: mapped {frame!r} has no "
                      "stable node in the tree")


def _check_ksm_zero_pages(k: SimKernel, c: _Census) -> None:
    """KSM-placed zero PTEs: each mm's count, and the global count = Σ over mms."""
    zero = k.phys.ksm_zero_page
    total = 0
    for mm in c.mms.values():
        n = sum(1 for f in mm.ptes.values() if f is zero)
        if mm.ksm_zero_pages != n:
            _fail("ksm_zero_pages", f"mm {mm.id}: counter says {mm.ksm_zero_pages}, "
                  f"{n} PTEs map the KSM zero page")
        total += n
    if k.ksm.core.ksm_zero_pages != total:
        _fail("ksm_zero_pages", f"counter says {k.ksm.core.ksm_zero_pages}, {total} PTEs map the "
              "KSM zero page")


def _check_mapcounts(k: SimKernel, c: _Census) -> None:
    """mapcount = PTEs mapping the frame; nothing mapped or cached is freed; PTEs lie in vmas."""
    refs, frames = _pte_refs(c)
    for key, frame in frames.items():
        if frame.freed:
            _fail("mapcount", f"{frame!r} is mapped but freed")
        if frame.mapcount != refs[key]:
            _fail("mapcount", f"{frame!r}: mapcount {frame.mapcount}, mapped by {refs[key]} PTEs")
    for f in _files(k, c):
        for pgoff, frame in f.pagecache.items():
            if frame.freed:
                _fail("mapcount", f"page {pgoff} of {f.name} is in the page cache but freed")
            if frame.mapcount != refs[id(frame)]:
                _fail("mapcount", f"page-cache {frame!r}: mapcount {frame.mapcount}, "
                      f"mapped by {refs[id(frame)]} PTEs")
    for mm in c.mms.values():
        for vpn in mm.ptes:
            if mm.vma_lookup(vpn << PAGE_SHIFT) is None:
                _fail("mapcount", f"mm {mm.id} has a PTE at {vpn << PAGE_SHIFT:#x} outside any vma")


def _check_frame_leaks(k: SimKernel, c: _Census) -> None:
    """Frames in use = distinct non-zero frames mapped by a PTE or held in a page cache."""
    _refs, frames = _pte_refs(c)
    in_use = dict(frames)
    for f in _files(k, c):
        for frame in f.pagecache.values():
            in_use[id(frame)] = frame
    if k.phys.nr_frames != len(in_use):
        _fail("frame leak", f"nr_frames is {k.phys.nr_frames}, {len(in_use)} frames are "
              "mapped or cached")


def _check_thps(c: _Census) -> None:
    """PMD mappings and THPs agree (ksmlab.mm.memory, transparent huge pages)."""
    thps: dict[int, Thp] = {}
    for mm in c.mms.values():
        for frame in mm.ptes.values():
            if frame.thp is not None:
                thps[id(frame.thp)] = frame.thp
        for extent, thp in mm.pmds.items():
            thps[id(thp)] = thp
            if extent % HPAGE_PMD_NR or thp.pmd_mms.get(mm.id) != (mm, extent):
                _fail("thp", f"mm {mm.id} maps {thp!r} by PMD at {extent:#x}, not recorded there")
            vma = mm.vma_lookup(extent << PAGE_SHIFT)
            if vma is None or vma.end < (extent + HPAGE_PMD_NR) << PAGE_SHIFT:
                _fail("thp", f"mm {mm.id}: the PMD at {extent << PAGE_SHIFT:#x} is not inside "
                      "one vma")
            if any(mm.ptes.get(extent + i) is not f or f.thp is not thp
                   for i, f in enumerate(thp.frames)):
                _fail("thp", f"mm {mm.id}: the PTEs under the PMD at {extent << PAGE_SHIFT:#x} "
                      f"do not map {thp!r}'s frames in order")
    for thp in thps.values():
        for mm_id, (mm, extent) in thp.pmd_mms.items():
            if mm.id != mm_id or mm.pmds.get(extent) is not thp:
                _fail("thp", f"{thp!r} says mm {mm_id} maps it by PMD, which it does not")
        if thp.mapcount != sum(f.mapcount for f in thp.frames):
            _fail("thp", f"{thp!r}: mapcount {thp.mapcount}, its frames' sum "
                  f"{sum(f.mapcount for f in thp.frames)}")


def _check_max_page_sharing(k: SimKernel) -> None:
    """No append without the fork bypass went past max_page_sharing (the kernel's WARN_ON_ONCE)."""
    if k.ksm.core.warned_overflow:
        _fail("max_page_sharing", "an rmap_item was appended to a full stable node without the "
              "fork bypass")


def check_invariants(k: SimKernel) -> None:
    """Recompute the model's KSM state from scratch and compare it with the counters.

    Raises:
        ModelInvariantError: the first broken invariant, named at the start of the message.
    """
    c = _take_census(k)
    _check_mm_slot_list(k, c)
    _check_rmap_lists(c)
    _check_rmap_item_counts(k, c)
    _check_scan_cursor(k, c)
    _check_rbtrees(k)
    _check_stable_tree_shape(k, c)
    _check_stable_tree_order(c)
    _check_stable_items(k, c)
    _check_unstable_tree(k, c)
    _check_pages_volatile(k, c)
    _check_ksm_frames(k, c)
    _check_ksm_zero_pages(k, c)
    _check_mapcounts(k, c)
    _check_frame_leaks(k, c)
    _check_thps(c)
    _check_max_page_sharing(k)
