# SPDX-License-Identifier: GPL-2.0-only
"""The red-black tree of ``ksmlab.ksm.rbtree`` against a sorted list.

KSM descends its trees itself and then calls ``rb_link_node`` +
``rb_insert_color``; it removes with ``rb_erase`` and swaps a node in place
with ``rb_replace_node``.  These tests drive the same four calls with random
sequences and check, after every operation, the red-black properties
(``rb_check``), the in-order sequence against a sorted Python list, and the
height bound those properties guarantee.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ksmlab.ksm.rbtree import RbNode, RbRoot, rb_check, rb_erase, rb_insert_color, rb_link_node, rb_replace_node


class KeyNode(RbNode):
    """A tree element with an integer key (KSM's elements compare page contents instead)."""

    __slots__ = ("key",)

    def __init__(self, key: int) -> None:
        super().__init__()
        self.key = key


def insert(root: RbRoot, node: KeyNode) -> None:
    """Descend as ksm.c does (equal keys go right), link the leaf, rebalance."""
    parent: RbNode | None = None
    left = False
    cur = root.node
    while cur is not None:
        assert isinstance(cur, KeyNode)
        parent = cur
        left = node.key < cur.key
        cur = cur.rb_left if left else cur.rb_right
    rb_link_node(node, parent, left, root)
    rb_insert_color(node, root)


def height(node: RbNode | None) -> int:
    """Number of nodes on the longest root-to-leaf path."""
    if node is None:
        return 0
    return 1 + max(height(node.rb_left), height(node.rb_right))


def check(root: RbRoot, expected: list[KeyNode]) -> None:
    """Red-black properties, in-order = sorted model (same node objects), height ≤ 2·log2(n+1)."""
    rb_check(root)
    got = [n for n in root if isinstance(n, KeyNode)]
    assert len(got) == len(root)
    assert [n.key for n in got] == sorted(n.key for n in expected)
    assert {id(n) for n in got} == {id(n) for n in expected}
    assert len(root) == len(expected)
    assert height(root.node) <= 2 * math.log2(len(expected) + 1)


@dataclass(frozen=True)
class Op:
    """One tree operation: insert *key*, erase the *index*-th node, or replace it in place."""

    kind: str
    key: int = 0
    index: int = 0


ops = st.one_of(
    st.builds(Op, st.just("insert"), st.integers(-50, 50)),
    st.builds(Op, st.just("erase"), st.just(0), st.integers(0, 10**6)),
    st.builds(Op, st.just("replace"), st.just(0), st.integers(0, 10**6)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(ops, max_size=120))
def test_random_operations_keep_rb_properties_and_order(sequence: list[Op]) -> None:
    """Any mix of insert / erase / replace keeps a valid red-black tree holding the sorted keys."""
    root = RbRoot()
    model: list[KeyNode] = []
    for op in sequence:
        if op.kind == "insert":
            node = KeyNode(op.key)
            insert(root, node)
            model.append(node)
        elif model:
            in_order = list(root)
            victim = in_order[op.index % len(in_order)]
            assert isinstance(victim, KeyNode)
            model.remove(victim)
            if op.kind == "erase":
                rb_erase(victim, root)
                assert victim.rb_parent is victim.rb_left is victim.rb_right is None
            else:
                fresh = KeyNode(victim.key)
                rb_replace_node(victim, fresh, root)
                model.append(fresh)
        check(root, model)


@settings(max_examples=50, deadline=None)
@given(st.permutations(list(range(64))), st.permutations(list(range(64))))
def test_insert_all_then_erase_all(insert_order: list[int], erase_order: list[int]) -> None:
    """64 distinct keys inserted in one random order and erased in another: valid at every step."""
    root = RbRoot()
    nodes = {key: KeyNode(key) for key in insert_order}
    model: list[KeyNode] = []
    for key in insert_order:
        insert(root, nodes[key])
        model.append(nodes[key])
        check(root, model)
    for key in erase_order:
        rb_erase(nodes[key], root)
        model.remove(nodes[key])
        check(root, model)
    assert root.node is None


def test_ascending_inserts_stay_balanced() -> None:
    """Sorted input (the worst case for a plain BST) still gives logarithmic height."""
    root = RbRoot()
    model = [KeyNode(i) for i in range(1000)]
    for node in model:
        insert(root, node)
    check(root, model)
    assert rb_check(root) >= 2


def _three_node_tree() -> tuple[RbRoot, RbNode, RbNode, RbNode]:
    """A valid tree of three nodes: black root, red children."""
    root = RbRoot()
    for key in range(3):
        insert(root, KeyNode(key))
    top = root.node
    assert top is not None and top.rb_left is not None and top.rb_right is not None
    return root, top, top.rb_left, top.rb_right


def _red_root(top: RbNode, left: RbNode, right: RbNode) -> None:
    top.rb_red = True


def _red_red(top: RbNode, left: RbNode, right: RbNode) -> None:
    child = KeyNode(-1)
    child.rb_red, child.rb_parent = True, left
    left.rb_left = child


def _unequal_black_heights(top: RbNode, left: RbNode, right: RbNode) -> None:
    right.rb_red = False


def _bad_parent(top: RbNode, left: RbNode, right: RbNode) -> None:
    left.rb_parent = None


@pytest.mark.parametrize(("corrupt", "message"), [
    (_red_root, "red root"),
    (_red_red, "red node with a red child"),
    (_unequal_black_heights, "unequal black heights"),
    (_bad_parent, "broken parent link"),
])
def test_rb_check_rejects_a_broken_tree(corrupt: Callable[[RbNode, RbNode, RbNode], None],
                                        message: str) -> None:
    """rb_check notices each kind of damage (so the property tests above can fail)."""
    root, top, left, right = _three_node_tree()
    rb_check(root)
    corrupt(top, left, right)
    with pytest.raises(AssertionError, match=message):
        rb_check(root)
