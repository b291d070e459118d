"""munmap and mprotect on the bulk engine together with merge-any, exec and NUMA nodes.

Each test runs on both paths of the bulk engine and on SimKernel in both
content modes (SimKernel is checked against the real kernel by the
differential suite), and asserts values worked out by hand in the test.
The random lockstep programs of tests/test_bulk.py draw all these calls
together; these tests pin the cases where they meet: rows taken over from
unmapped pages (ghosts) get the new mapping's node and mergeable mark and
nothing else does, the items of unmapped pages outlive an exec until ksmd
reaps the old address space, and a fork copies a split address space with
its protections, nodes and merge-any.
"""

from __future__ import annotations

import errno
from collections.abc import Callable

import pytest

from bulk_programs import canonical, page, page_nodes
from helpers import raises_errno
from ksmlab import MADV_MERGEABLE, PAGE_SIZE, SimKernel
from ksmlab.bulk import BulkKernel
from ksmlab.constants import PR_GET_MEMORY_MERGE, PR_SET_MEMORY_MERGE, PROT_READ

P = PAGE_SIZE
Kernel = SimKernel | BulkKernel

ENGINES: dict[str, Callable[[], Kernel]] = {
    "bulk-vector": lambda: BulkKernel(numa_nodes=2),
    "bulk-per-page": lambda: BulkKernel(numa_nodes=2, vectorize=False),
    "sim-bytes": lambda: SimKernel(trace=False, numa_nodes=2),
    "sim-fingerprint": lambda: SimKernel(trace=False, numa_nodes=2, content="fingerprint"),
}


@pytest.fixture(params=list(ENGINES))
def k(request: pytest.FixtureRequest) -> Kernel:
    """A machine of 2 NUMA nodes (merge_across_nodes=1), ksmd fast and not started."""
    kernel = ENGINES[request.param]()
    kernel.sysfs["pages_to_scan"] = "100"
    kernel.sysfs["sleep_millisecs"] = "0"
    return kernel


def shared_sharing(k: Kernel) -> tuple[int, int]:
    if isinstance(k, BulkKernel):
        canonical(k)  # runs the engine's invariant check
    return int(k.sysfs["pages_shared"]), int(k.sysfs["pages_sharing"])


def nodes(k: Kernel, pid: int) -> list[int]:
    """The node of each mapped page of process *pid*, in address order."""
    return [node for _addr, node in dict(page_nodes(k))[pid]]


def merged_area(k: Kernel, *, merge_any: bool) -> tuple[object, int]:
    """One process, 4 pages of page(5) on node 1 merged: 1 KSM page, 4 mappings."""
    p = k.spawn()
    if merge_any:
        p.prctl(PR_SET_MEMORY_MERGE, 1)
    a = p.mmap(4 * P, node=1)
    p.write(a, page(5) * 4)
    if not merge_any:
        p.madvise(a, 4 * P, MADV_MERGEABLE)
    k.sysfs["run"] = "1"
    k.wait_full_scans(2)
    assert shared_sharing(k) == (1, 3)
    return p, a


def test_remap_over_unmapped_pages_leaves_the_neighbour_alone(k: Kernel) -> None:
    """The lower 2 pages are unmapped (their items stay) and a 2-page mapping on node 0
    goes into the gap, continuing the upper pages.  It is not advised, so its pages are
    not mergeable and their old items go at the next scan; the upper 2 pages keep their
    mark and node and stay merged: 1 KSM page of 2 mappings, 2 items."""
    p, a = merged_area(k, merge_any=False)
    p.munmap(a, 2 * P)  # type: ignore[attr-defined]
    assert p.ksm_stat()["ksm_rmap_items"] == 4  # type: ignore[attr-defined]
    b = p.mmap(2 * P, node=0)  # type: ignore[attr-defined]
    assert b == a  # top-down placement reuses the gap
    p.write(b, page(5) * 2)  # type: ignore[attr-defined]
    k.wait_full_scans(2)
    assert shared_sharing(k) == (1, 1)
    stat = p.ksm_stat()  # type: ignore[attr-defined]
    assert (stat["ksm_rmap_items"], stat["ksm_merging_pages"], stat["ksm_mergeable"]) == (
        2, 2, True)
    assert nodes(k, p.pid) == [0, 0, 1, 1]  # type: ignore[attr-defined]


def test_remap_in_a_merge_any_process(k: Kernel) -> None:
    """Under merge-any the mapping made in the gap is born mergeable, and its pages find
    the items the unmapped ones left, checksums and all: written with the old content on
    node 0, they merge into the KSM page on node 1 (merge_across_nodes=1) in one scan,
    as a remapped page does on Linux (test_bulk.py's REMAP_ON_LINUX)."""
    p, a = merged_area(k, merge_any=True)
    p.munmap(a, 2 * P)  # type: ignore[attr-defined]
    assert shared_sharing(k) == (1, 3)  # the items stay until ksmd passes them
    b = p.mmap(2 * P, node=0)  # type: ignore[attr-defined]
    assert b == a
    p.write(b, page(5) * 2)  # type: ignore[attr-defined]
    assert nodes(k, p.pid) == [0, 0, 1, 1]  # type: ignore[attr-defined]
    k.wait_full_scans(1)
    assert shared_sharing(k) == (1, 3)
    stat = p.ksm_stat()  # type: ignore[attr-defined]
    assert (stat["ksm_rmap_items"], stat["ksm_merging_pages"], stat["ksm_merge_any"]) == (
        4, 4, True)
    assert nodes(k, p.pid) == [1, 1, 1, 1]  # type: ignore[attr-defined]


def test_exec_takes_the_items_of_unmapped_pages_with_the_old_mm(k: Kernel) -> None:
    """The upper 2 pages are unmapped (their items stay), then the process execs: every
    page goes at once, but the 4 items (2 of them of unmapped pages) stay counted until
    ksmd reaches the old address space, then all go.  The new one is empty and, merge-any
    kept, registered: its next mapping is born mergeable."""
    p, a = merged_area(k, merge_any=True)
    p.munmap(a + 2 * P, 2 * P)  # type: ignore[attr-defined]
    p.exec()  # type: ignore[attr-defined]
    assert shared_sharing(k) == (1, 3)
    assert p.ksm_stat()["ksm_rmap_items"] == 0  # type: ignore[attr-defined]
    assert p.prctl(PR_GET_MEMORY_MERGE) == 1  # type: ignore[attr-defined]
    k.wait_full_scans(1)
    assert shared_sharing(k) == (0, 0)
    assert int(k.sysfs["pages_unshared"]) == int(k.sysfs["pages_volatile"]) == 0
    b = p.mmap(2 * P)  # type: ignore[attr-defined]
    p.write(b, page(6) * 2)  # type: ignore[attr-defined]
    k.wait_full_scans(2)
    assert shared_sharing(k) == (1, 1)


def test_fork_of_a_split_merge_any_address_space(k: Kernel) -> None:
    """A merge-any process's 4 pages on node 1 (contents 1, 2, 3, 4) are cut by mprotect
    (page 1 read-only) and munmap (page 3 gone).  The child keeps merge-any, each piece's
    protection and node: a write to its read-only page is EFAULT unless forced, one to
    the hole EFAULT; its copies are made on node 1.  Then content 2 is at the parent's
    page 1 (read-only, still merged) and the child's pages 0 and 1: 1 KSM page of 3
    mappings; page 2 maps one frame in both (a fork's COW sharing, never merged)."""
    p = k.spawn()
    p.prctl(PR_SET_MEMORY_MERGE, 1)
    a = p.mmap(4 * P, node=1)
    p.write(a, page(1) + page(2) + page(3) + page(4))
    p.mprotect(a + P, P, PROT_READ)
    p.munmap(a + 3 * P, P)
    c = p.fork()
    assert c.prctl(PR_GET_MEMORY_MERGE) == 1
    c.write(a, page(2))
    with raises_errno(errno.EFAULT):
        c.write(a + P, page(2))
    c.write(a + P, page(2), force=True)
    with raises_errno(errno.EFAULT):
        c.write(a + 3 * P, page(2))
    assert nodes(k, c.pid) == [1, 1, 1]
    k.sysfs["run"] = "1"
    k.wait_full_scans(2)
    assert shared_sharing(k) == (1, 2)
    assert (p.ksm_stat()["ksm_merging_pages"], c.ksm_stat()["ksm_merging_pages"]) == (1, 2)
    assert nodes(k, p.pid) == nodes(k, c.pid) == [1, 1, 1]
    with raises_errno(errno.EFAULT):  # still read-only in the parent
        p.write(a + P, page(7))
