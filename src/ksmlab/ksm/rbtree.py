"""A red-black tree with the kernel's interface (``lib/rbtree.c``).

KSM's stable and unstable trees are ordered by page *content*, and the
content of an unstable-tree page may change after insertion, so the tree is
not a search structure over fixed keys: ksm.c descends it itself, comparing
the scanned page with the page behind each node, and then calls
``rb_link_node`` + ``rb_insert_color`` at the leaf it reached.  Which nodes a
descent visits is observable (a stale node met on the way is removed, with
counter updates, and a vanished unstable page on the path aborts the insert),
so ksmlab keeps a real red-black tree with the same operations instead of a
dict keyed by content.

Model choice: this is the textbook (CLRS) algorithm, erasing a node with two
children by putting its in-order successor in its place, as lib/rbtree.c
does; the case analysis of the fix-ups is the same, so the shapes match.
"""

from __future__ import annotations

from collections.abc import Iterator


class RbNode:
    """A node embedded in a tree element (the kernel's ``struct rb_node``).

    Attributes:
        rb_parent: parent node, None at the root.
        rb_left: left child (smaller content).
        rb_right: right child (larger content).
        rb_red: colour; True for red.
    """

    __slots__ = ("rb_left", "rb_parent", "rb_red", "rb_right")

    def __init__(self) -> None:
        self.rb_parent: RbNode | None = None
        self.rb_left: RbNode | None = None
        self.rb_right: RbNode | None = None
        self.rb_red = False


class RbRoot:
    """The root of a tree (``struct rb_root``); ``node`` is None when empty."""

    __slots__ = ("node",)

    def __init__(self) -> None:
        self.node: RbNode | None = None

    def __iter__(self) -> Iterator[RbNode]:
        """In-order traversal (``rb_first``/``rb_next``)."""
        stack: list[RbNode] = []
        cur = self.node
        while stack or cur is not None:
            while cur is not None:
                stack.append(cur)
                cur = cur.rb_left
            cur = stack.pop()
            yield cur
            cur = cur.rb_right

    def __len__(self) -> int:
        return sum(1 for _ in self)


def rb_link_node(node: RbNode, parent: RbNode | None, left: bool, root: RbRoot) -> None:
    """Attach *node* as a red leaf below *parent* (``rb_link_node``); then call insert_color."""
    node.rb_parent = parent
    node.rb_left = node.rb_right = None
    node.rb_red = True
    if parent is None:
        root.node = node
    elif left:
        parent.rb_left = node
    else:
        parent.rb_right = node


def _rotate_left(root: RbRoot, x: RbNode) -> None:
    y = x.rb_right
    assert y is not None
    x.rb_right = y.rb_left
    if y.rb_left is not None:
        y.rb_left.rb_parent = x
    _replace_child(root, x, y)
    y.rb_left = x
    x.rb_parent = y


def _rotate_right(root: RbRoot, x: RbNode) -> None:
    y = x.rb_left
    assert y is not None
    x.rb_left = y.rb_right
    if y.rb_right is not None:
        y.rb_right.rb_parent = x
    _replace_child(root, x, y)
    y.rb_right = x
    x.rb_parent = y


def _replace_child(root: RbRoot, old: RbNode, new: RbNode | None) -> None:
    """Make *new* take *old*'s place under old's parent (or as root)."""
    parent = old.rb_parent
    if new is not None:
        new.rb_parent = parent
    if parent is None:
        root.node = new
    elif parent.rb_left is old:
        parent.rb_left = new
    else:
        parent.rb_right = new


def rb_insert_color(node: RbNode, root: RbRoot) -> None:
    """Rebalance after linking *node* (``rb_insert_color``)."""
    z = node
    while (p := z.rb_parent) is not None and p.rb_red:
        g = p.rb_parent
        assert g is not None  # a red node is never the root
        if p is g.rb_left:
            uncle = g.rb_right
            if uncle is not None and uncle.rb_red:
                p.rb_red = uncle.rb_red = False
                g.rb_red = True
                z = g
                continue
            if z is p.rb_right:
                _rotate_left(root, p)
                z, p = p, z
            p.rb_red = False
            g.rb_red = True
            _rotate_right(root, g)
        else:
            uncle = g.rb_left
            if uncle is not None and uncle.rb_red:
                p.rb_red = uncle.rb_red = False
                g.rb_red = True
                z = g
                continue
            if z is p.rb_left:
                _rotate_right(root, p)
                z, p = p, z
            p.rb_red = False
            g.rb_red = True
            _rotate_left(root, g)
    assert root.node is not None
    root.node.rb_red = False


def rb_erase(node: RbNode, root: RbRoot) -> None:
    """Remove *node* from the tree and rebalance (``rb_erase``)."""
    z = node
    if z.rb_left is None or z.rb_right is None:
        child = z.rb_left if z.rb_left is not None else z.rb_right
        parent = z.rb_parent
        _replace_child(root, z, child)
        removed_red = z.rb_red
    else:
        # Two children: the successor takes z's place and colour.
        y = z.rb_right
        while y.rb_left is not None:
            y = y.rb_left
        removed_red = y.rb_red
        child = y.rb_right
        if y.rb_parent is z:
            parent = y
        else:
            parent = y.rb_parent
            _replace_child(root, y, child)
            y.rb_right = z.rb_right
            y.rb_right.rb_parent = y
        _replace_child(root, z, y)
        y.rb_left = z.rb_left
        y.rb_left.rb_parent = y
        y.rb_red = z.rb_red
    z.rb_parent = z.rb_left = z.rb_right = None
    if not removed_red:
        _erase_color(root, child, parent)


def _erase_color(root: RbRoot, x: RbNode | None, parent: RbNode | None) -> None:
    while x is not root.node and (x is None or not x.rb_red):
        assert parent is not None
        if x is parent.rb_left:
            w = parent.rb_right
            assert w is not None
            if w.rb_red:
                w.rb_red = False
                parent.rb_red = True
                _rotate_left(root, parent)
                w = parent.rb_right
                assert w is not None
            if not _red(w.rb_left) and not _red(w.rb_right):
                w.rb_red = True
                x, parent = parent, parent.rb_parent
                continue
            if not _red(w.rb_right):
                assert w.rb_left is not None
                w.rb_left.rb_red = False
                w.rb_red = True
                _rotate_right(root, w)
                w = parent.rb_right
                assert w is not None
            w.rb_red = parent.rb_red
            parent.rb_red = False
            if w.rb_right is not None:
                w.rb_right.rb_red = False
            _rotate_left(root, parent)
            x = root.node
            break
        w = parent.rb_left
        assert w is not None
        if w.rb_red:
            w.rb_red = False
            parent.rb_red = True
            _rotate_right(root, parent)
            w = parent.rb_left
            assert w is not None
        if not _red(w.rb_left) and not _red(w.rb_right):
            w.rb_red = True
            x, parent = parent, parent.rb_parent
            continue
        if not _red(w.rb_left):
            assert w.rb_right is not None
            w.rb_right.rb_red = False
            w.rb_red = True
            _rotate_left(root, w)
            w = parent.rb_left
            assert w is not None
        w.rb_red = parent.rb_red
        parent.rb_red = False
        if w.rb_left is not None:
            w.rb_left.rb_red = False
        _rotate_right(root, parent)
        x = root.node
        break
    if x is not None:
        x.rb_red = False


def _red(node: RbNode | None) -> bool:
    return node is not None and node.rb_red


def rb_replace_node(old: RbNode, new: RbNode, root: RbRoot) -> None:
    """Put *new* exactly where *old* is, keeping colour and shape (``rb_replace_node``)."""
    new.rb_parent = old.rb_parent
    new.rb_left = old.rb_left
    new.rb_right = old.rb_right
    new.rb_red = old.rb_red
    if old.rb_left is not None:
        old.rb_left.rb_parent = new
    if old.rb_right is not None:
        old.rb_right.rb_parent = new
    _replace_child(root, old, new)
    old.rb_parent = old.rb_left = old.rb_right = None


def rb_check(root: RbRoot) -> int:
    """Check the red-black properties; return the black height (for tests and invariants)."""

    def walk(n: RbNode | None, parent: RbNode | None) -> int:
        if n is None:
            return 1
        if n.rb_parent is not parent:
            raise AssertionError("rbtree: broken parent link")
        if n.rb_red and (_red(n.rb_left) or _red(n.rb_right)):
            raise AssertionError("rbtree: red node with a red child")
        lh, rh = walk(n.rb_left, n), walk(n.rb_right, n)
        if lh != rh:
            raise AssertionError("rbtree: unequal black heights")
        return lh + (0 if n.rb_red else 1)

    if _red(root.node):
        raise AssertionError("rbtree: red root")
    return walk(root.node, None)
