# SPDX-License-Identifier: GPL-2.0-only
"""``ksmlab.invariants.check_invariants``: it passes on real scenarios and catches each corruption.

Every check is shown to fire: a counter, link or frame of a model in a
known-good state is damaged by hand, and the error must be a
:class:`ModelInvariantError` whose message starts with the invariant's name.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from ksmlab import (
    MADV_DONTNEED,
    MADV_MERGEABLE,
    MADV_UNMERGEABLE,
    MAP_ANONYMOUS,
    MAP_SHARED,
    PAGE_SHIFT,
    PAGE_SIZE,
    PR_SET_MEMORY_MERGE,
    PROT_READ,
    VM_SHARED,
    ModelInvariantError,
    SimKernel,
    SimProcess,
)
from ksmlab.invariants import check_invariants
from ksmlab.ksm.ksm import KsmCore
from ksmlab.ksm.types import MmSlot, NodeKind, RmapItem, RmapState, StableNode
from ksmlab.mm.page import Frame

P = PAGE_SIZE
NPAGES = 16


@dataclass
class Scene:
    """A model with every kind of KSM state: a chain with dups, a regular node, KSM zero
    pages, unstable items, volatile items, and a forked child sharing it all."""

    k: SimKernel
    parent: SimProcess
    child: SimProcess
    addr: int


def rich_scene(*, mid_pass: bool = False) -> Scene:
    """7 'A' pages (max_page_sharing 3: a chain of two dups), 2 'B' pages, 2 zero pages
    (use_zero_pages), 5 unique pages; three full scans, then a fork.  With *mid_pass*
    ksmd stops half way through the next pass, so the unstable tree is live."""
    k = SimKernel()
    k.sysfs["max_page_sharing"] = "3"
    k.sysfs["use_zero_pages"] = "1"
    p = k.spawn()
    a = p.mmap(NPAGES * P)
    rnd = random.Random(1)
    p.write(a, b"A" * 7 * P + b"B" * 2 * P + bytes(2 * P)
            + b"".join(rnd.randbytes(P) for _ in range(5)))
    p.madvise(a, NPAGES * P, MADV_MERGEABLE)
    k.sysfs["run"] = "1"
    k.wait_full_scans(3)
    child = p.fork()
    if mid_pass:
        k.ksm.core.ksm_do_scan(13)
    return Scene(k, p, child, a)


@pytest.fixture
def scene() -> Scene:
    """The rich scene between two passes."""
    s = rich_scene()
    check_invariants(s.k)
    return s


def stable_nodes(k: SimKernel) -> list[StableNode]:
    """Regular nodes and dups (nodes owning a KSM page) of the stable tree."""
    out: list[StableNode] = []
    for node in k.ksm.root_stable_tree[0]:
        assert isinstance(node, StableNode)
        out.extend(node.dups if node.kind is NodeKind.CHAIN else [node])
    return out


def chain(k: SimKernel) -> StableNode:
    """The scene's one chain."""
    for node in k.ksm.root_stable_tree[0]:
        assert isinstance(node, StableNode)
        if node.kind is NodeKind.CHAIN:
            return node
    raise AssertionError("no chain")


def items(k: SimKernel) -> list[RmapItem]:
    """Every rmap_item, in scan order."""
    out: list[RmapItem] = []
    for slot in k.ksm.core.mm_slots.values():
        item = slot.rmap_list
        while item is not None:
            out.append(item)
            item = item.rmap_next
    return out


def ksm_frame(s: Scene) -> Frame:
    """The KSM page the parent maps at its first page."""
    frame = s.parent.mm.ptes[s.addr >> PAGE_SHIFT]
    assert frame.ksm
    return frame


# --- it passes on real scenarios ------------------------------------------------------------------


def test_scene_has_every_kind_of_state(scene: Scene) -> None:
    """The corruption tests below start from a state that exercises every check."""
    ksm = scene.k.ksm
    assert (ksm.pages_shared, ksm.pages_sharing, ksm.stable_node_chains, ksm.stable_node_dups) == (3, 5, 1, 2)
    assert ksm.pages_unshared > 0 and ksm.ksm_zero_pages == 4


def test_passes_through_a_merge_lifecycle() -> None:
    """Merge, fork, COW, DONTNEED, partial munmap, unmerge, run=2, exit and reap: always consistent."""
    s = rich_scene()
    k, p, c, a = s.k, s.parent, s.child, s.addr
    steps: list[Callable[[], object]] = [
        lambda: c.write(a, b"x"),
        lambda: k.wait_full_scans(2),
        lambda: p.madvise(a + 2 * P, 3 * P, MADV_DONTNEED),
        lambda: p.munmap(a + 5 * P, 2 * P),
        lambda: k.wait_full_scans(1),
        lambda: c.madvise(a, NPAGES * P, MADV_UNMERGEABLE),
        lambda: p.mprotect(a, P, PROT_READ),
        lambda: k.wait_full_scans(2),
        lambda: k.sysfs.__setitem__("run", "2"),
        lambda: k.sysfs.__setitem__("run", "1"),
        lambda: k.wait_full_scans(3),
        lambda: p.exit(),
        lambda: k.wait_full_scans(1),
        lambda: c.exec(),
    ]
    for step in steps:
        step()
        check_invariants(k)
    assert k.ksm.list_empty()
    assert k.phys.nr_frames == 0


def test_passes_mid_pass_with_a_live_unstable_tree() -> None:
    """Half way through a pass the unstable tree holds this pass's items, as the check expects."""
    s = rich_scene(mid_pass=True)
    assert s.k.ksm.core.scan.mm_slot is not s.k.ksm.core.mm_head
    assert len(s.k.ksm.core.root_unstable_tree[0]) > 0
    check_invariants(s.k)


def test_passes_with_shared_memory_and_prctl() -> None:
    """Shared anonymous memory (never merged) next to prctl-merged private memory."""
    k = SimKernel()
    p = k.spawn()
    p.prctl(PR_SET_MEMORY_MERGE, 1)
    shared = p.mmap(4 * P, flags=MAP_SHARED | MAP_ANONYMOUS)
    private = p.mmap(4 * P)
    p.write(shared, b"S" * 4 * P)
    p.write(private, b"S" * 4 * P)
    k.sysfs["run"] = "1"
    k.wait_full_scans(3)
    check_invariants(k)
    assert (k.ksm.pages_shared, k.ksm.pages_sharing) == (1, 3)
    q = p.fork()
    p.munmap(shared, 4 * P)
    check_invariants(k)
    q.exit()
    p.prctl(PR_SET_MEMORY_MERGE, 0)
    check_invariants(k)
    p.exit()
    k.wait_full_scans(1)
    check_invariants(k)
    assert k.phys.nr_frames == 0


def test_passes_on_a_fresh_kernel() -> None:
    """Nothing at all is consistent too."""
    check_invariants(SimKernel())


# --- each check can fail -----------------------------------------------------------------------------


def _bump(obj: object, attr: str, by: int = 1) -> Callable[[Scene], None]:
    def corrupt(s: Scene) -> None:
        target = obj if not isinstance(obj, str) else {
            "ksm": s.k.ksm.core, "parent_mm": s.parent.mm, "child_mm": s.child.mm, "phys": s.k.phys,
        }[obj]
        setattr(target, attr, getattr(target, attr) + by)
    return corrupt


def _misalign_item(s: Scene) -> None:
    items(s.k)[0].address += 8


def _unsort_items(s: Scene) -> None:
    first, second = items(s.k)[:2]
    first.address, second.address = second.address, first.address


def _drop_slot_from_map(s: Scene) -> None:
    del s.k.ksm.core.mm_slots[s.parent.mm.id]


def _cursor_to_foreign_slot(s: Scene) -> None:
    s.k.ksm.core.scan.mm_slot = MmSlot(s.parent.mm)


def _recolour_stable_root(s: Scene) -> None:
    root = s.k.ksm.root_stable_tree[0].node
    assert root is not None
    root.rb_red = True


def _dup_forgets_chain(s: Scene) -> None:
    chain(s.k).dups[0].chain = None


def _reorder_contents(s: Scene) -> None:
    # Give the 'B' node content that sorts before 'A' while it sits after it.
    node = next(n for n in stable_nodes(s.k) if n.kind is NodeKind.REGULAR)
    assert node.kpage is not None
    node.kpage.data = b"\x00" + node.kpage.data[1:]


def _unflag_stable_item(s: Scene) -> None:
    item = next(i for i in items(s.k) if i.state is RmapState.STABLE)
    item.state = RmapState.NONE


def _age_unstable_item(s: Scene) -> None:
    tree_item = s.k.ksm.core.root_unstable_tree[0].node
    assert isinstance(tree_item, RmapItem)
    tree_item.seqnr = (tree_item.seqnr - 1) & 0xFF


def _ksm_frame_forgets_node(s: Scene) -> None:
    ksm_frame(s).stable_node = None


def _ksm_frame_in_shared_vma(s: Scene) -> None:
    vma = s.parent.mm.vma_lookup(s.addr)
    assert vma is not None
    vma.flags |= VM_SHARED


def _free_mapped_frame(s: Scene) -> None:
    frame = s.parent.mm.ptes[(s.addr >> PAGE_SHIFT) + NPAGES - 1]
    frame.freed = True


def _pte_outside_vmas(s: Scene) -> None:
    s.parent.mm.ptes[0x10] = s.k.phys.zero_page


def _leak_a_frame(s: Scene) -> None:
    assert s.k.phys.alloc(bytes(P), 0, anon=True) is not None


def _warn_overflow(s: Scene) -> None:
    s.k.ksm.core.warned_overflow = True


CORRUPTIONS: list[tuple[str, Callable[[Scene], None], str]] = [
    ("pages_shared counter", _bump("ksm", "pages_shared"), "pages_shared"),
    ("pages_sharing counter", _bump("ksm", "pages_sharing", -1), "pages_sharing"),
    ("pages_unshared counter", _bump("ksm", "pages_unshared"), "pages_unshared"),
    ("rmap_items counter", _bump("ksm", "rmap_items"), "rmap_items"),
    ("an mm's ksm_rmap_items", _bump("parent_mm", "ksm_rmap_items"), "rmap_items"),
    ("an mm's ksm_merging_pages", _bump("parent_mm", "ksm_merging_pages"), "ksm_merging_pages"),
    ("stable_node_chains counter", _bump("ksm", "stable_node_chains"), "stable_node_chains"),
    ("stable_node_dups counter", _bump("ksm", "stable_node_dups", -1), "stable_node_dups"),
    ("global ksm_zero_pages", _bump("ksm", "ksm_zero_pages"), "ksm_zero_pages"),
    ("an mm's ksm_zero_pages", _bump("child_mm", "ksm_zero_pages", -1), "ksm_zero_pages"),
    ("nr_frames", _bump("phys", "nr_frames"), "frame leak"),
    ("an unmapped frame still allocated", _leak_a_frame, "frame leak"),
    ("an item address off the page boundary", _misalign_item, "rmap_list"),
    ("items out of address order", _unsort_items, "rmap_list"),
    ("a slot missing from mm_slots", _drop_slot_from_map, "mm_slot list"),
    ("ksmd's cursor on an unlisted slot", _cursor_to_foreign_slot, "scan cursor"),
    ("a red stable-tree root", _recolour_stable_root, "rbtree"),
    ("a dup that forgot its chain", _dup_forgets_chain, "stable tree shape"),
    ("stable tree out of content order", _reorder_contents, "stable tree order"),
    ("a stable item flagged as in no tree", _unflag_stable_item, "stable items"),
    ("a mapped KSM frame without its node", _ksm_frame_forgets_node, "ksm frames"),
    ("a KSM frame writable in place", _ksm_frame_in_shared_vma, "ksm frames"),
    ("a mapped frame marked freed", _free_mapped_frame, "mapcount"),
    ("a PTE outside every vma", _pte_outside_vmas, "mapcount"),
    ("an append past max_page_sharing", _warn_overflow, "max_page_sharing"),
]


@pytest.mark.parametrize(("corrupt", "invariant"), [(c, inv) for _, c, inv in CORRUPTIONS],
                         ids=[name for name, _, _ in CORRUPTIONS])
def test_each_check_fires(scene: Scene, corrupt: Callable[[Scene], None], invariant: str) -> None:
    """Damage one thing: ModelInvariantError names the invariant that broke."""
    corrupt(scene)
    with pytest.raises(ModelInvariantError, match=f"^{invariant}: "):
        check_invariants(scene.k)


@pytest.mark.parametrize("delta", [1, -1])
def test_mapcount_check_fires(scene: Scene, delta: int) -> None:
    """A frame's mapcount off by one either way is caught."""
    ksm_frame(scene).mapcount += delta
    with pytest.raises(ModelInvariantError, match=r"^mapcount: "):
        check_invariants(scene.k)


def test_unstable_tree_check_fires_mid_pass() -> None:
    """Mid-pass, an item in the unstable tree from another pass is caught."""
    s = rich_scene(mid_pass=True)
    check_invariants(s.k)
    _age_unstable_item(s)
    with pytest.raises(ModelInvariantError, match=r"^unstable tree: "):
        check_invariants(s.k)


def test_pages_volatile_check_fires(scene: Scene, monkeypatch: pytest.MonkeyPatch) -> None:
    """pages_volatile must be the formula over the other counters."""
    monkeypatch.setattr(KsmCore, "pages_volatile", property(lambda self: 99))
    with pytest.raises(ModelInvariantError, match=r"^pages_volatile: "):
        check_invariants(scene.k)


def test_model_invariant_error_is_an_assertion_error(scene: Scene) -> None:
    """The error is an AssertionError (never caught inside ksmlab) and is not an OSError."""
    scene.k.ksm.pages_shared += 1
    with pytest.raises(AssertionError) as info:
        check_invariants(scene.k)
    assert isinstance(info.value, ModelInvariantError)
    assert not isinstance(info.value, OSError)
