"""Kernel object allocation with failure injection.

The kernel's slab allocations (mm_slot, rmap_item, stable_node, vma) can fail
under memory pressure, which is how madvise comes to return EAGAIN.  The
model cannot run out of Python memory in a controlled way, so every such
allocation asks this allocator, whose ``limit`` makes failures reachable in
tests: ``Slab.limit = 0`` makes the next allocation fail.
"""

from __future__ import annotations

from collections import Counter


class Slab:
    """Counts kernel object allocations and fails them past a limit.

    Attributes:
        limit: allocations still allowed; None for unlimited.
        allocated: successful allocations per object kind (for reports).
        failed: failed allocations per object kind.
    """

    __slots__ = ("allocated", "failed", "limit")

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self.allocated: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()

    def alloc(self, kind: str) -> bool:
        """Try to allocate one object of *kind*; False means ENOMEM."""
        if self.limit is not None:
            if self.limit <= 0:
                self.failed[kind] += 1
                return False
            self.limit -= 1
        self.allocated[kind] += 1
        return True
