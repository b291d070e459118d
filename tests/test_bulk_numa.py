"""NUMA on the bulk engine: ``BulkKernel(numa_nodes=N)``, ``mmap(node=)``, ``merge_across_nodes``.

Expected values come from the kernel's rules (docs/kernel-behaviour.md, spec
3.5, 3.7 and 3.12; the selftest ``ksm_tests -N``) worked out by hand in each
test, and every test also runs SimKernel, which must agree.  The random
programs of tests/test_bulk.py (``program``, ``numa_program``) cover the rest.
"""

from __future__ import annotations

import errno
from collections.abc import Callable

import pytest

from bulk_programs import page_nodes
from ksmlab import MADV_MERGEABLE, MADV_UNMERGEABLE, PAGE_SIZE, SimKernel
from ksmlab.bulk import BulkKernel

Kernel = SimKernel | BulkKernel

ENGINES: dict[str, Callable[[int], Kernel]] = {
    "sim": lambda nodes: SimKernel(trace=False, numa_nodes=nodes),
    "bulk": lambda nodes: BulkKernel(numa_nodes=nodes),
    "bulk-per-page": lambda nodes: BulkKernel(numa_nodes=nodes, vectorize=False),
}


def star(n: int = 1) -> bytes:
    """*n* pages of '*' (the selftest's content)."""
    return b"*" * (n * PAGE_SIZE)


def shared_sharing(k: Kernel) -> tuple[int, int]:
    return int(k.sysfs["pages_shared"]), int(k.sysfs["pages_sharing"])


def nodes_of(k: Kernel) -> list[int]:
    """The node of each mapped page of the one process, in address order."""
    [(_pid, pages)] = page_nodes(k)
    return [node for _addr, node in pages]


def two_areas(k: Kernel, n: int, pages_to_scan: str = "1000") -> tuple[int, int]:
    """One process: *n* '*' pages on node 0, then *n* on node 1 (mapped top-down, so
    node 1's are at the lower addresses and scanned first); madvised, ksmd not started."""
    k.sysfs["pages_to_scan"] = pages_to_scan
    k.sysfs["sleep_millisecs"] = "0"
    p = k.spawn()
    a0 = p.mmap(n * PAGE_SIZE, node=0)
    a1 = p.mmap(n * PAGE_SIZE, node=1)
    assert a1 < a0
    for a in (a0, a1):
        p.write(a, star(n))
        p.madvise(a, n * PAGE_SIZE, MADV_MERGEABLE)
    return a0, a1


@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize(("mode", "expected"), [("1", (1, 1)), ("0", (0, 0))])
def test_ksm_tests_numa_merge(engine: str, mode: str, expected: tuple[int, int]) -> None:
    """ksm_tests -N: one '*' page on each of two nodes merges only across nodes (1/1 or 0/0)."""
    k = ENGINES[engine](2)
    k.sysfs["merge_across_nodes"] = mode
    two_areas(k, 1)
    k.sysfs["run"] = "1"
    k.wait_full_scans(3)
    assert shared_sharing(k) == expected


@pytest.mark.parametrize("engine", list(ENGINES))
def test_each_node_merges_its_own_pages(engine: str) -> None:
    """100 '*' pages per node.  merge_across_nodes=0: one KSM page per node, each on its
    node (2 shared, 2*100 - 2 sharing); =1: one KSM page for all 200 (1 shared, 199
    sharing), on node 1: the second page scanned (node 1's, scanned first) becomes it."""
    k = ENGINES[engine](2)
    k.sysfs["merge_across_nodes"] = "0"
    two_areas(k, 100)
    k.sysfs["run"] = "1"
    k.wait_full_scans(2)
    assert shared_sharing(k) == (2, 198)
    assert nodes_of(k) == [1] * 100 + [0] * 100
    k.sysfs["run"] = "2"  # the documented way to change the knob
    k.sysfs["merge_across_nodes"] = "1"
    k.sysfs["run"] = "1"
    k.wait_full_scans(2)
    assert shared_sharing(k) == (1, 199)
    assert nodes_of(k) == [1] * 200


@pytest.mark.parametrize("engine", list(ENGINES))
def test_knob_is_busy_while_ksm_pages_exist(engine: str) -> None:
    """EBUSY while KSM pages exist, the value unchanged; writing the value it has is no
    change and succeeds; after run=2 the change is allowed (spec 3.12)."""
    k = ENGINES[engine](2)
    two_areas(k, 3)
    k.sysfs["run"] = "1"
    k.wait_full_scans(2)
    assert shared_sharing(k) == (1, 5)
    with pytest.raises(OSError) as info:
        k.sysfs["merge_across_nodes"] = "0"
    assert info.value.errno == errno.EBUSY
    assert k.sysfs["merge_across_nodes"] == "1"
    k.sysfs["merge_across_nodes"] = "1"
    k.sysfs["run"] = "2"
    k.sysfs["merge_across_nodes"] = "0"
    assert k.sysfs["merge_across_nodes"] == "0"


def step(k: Kernel, batches: int) -> None:
    for _ in range(batches):
        assert k.ksmd.batch()


@pytest.mark.parametrize("engine", list(ENGINES))
def test_partner_on_another_node_is_refused(engine: str) -> None:
    """A '*' page B on node 1 (scanned first) and A on node 0, one page per batch.

    Batches 1-3 are the first full scan (checksums).  Batch 4 files B in the one
    unstable tree (merge_across_nodes=1).  The knob then becomes 0 (no KSM page
    exists).  Batch 5: A searches node 0's tree, finds B, equal but on node 1:
    given up, A not inserted (spec 3.7), so 1 unshared and 1 volatile item.
    Batch 6 ends the scan.  In the next scan (batches 7, 8) each goes to its own
    node's tree: 2 unshared, and they never merge.
    """
    k = ENGINES[engine](2)
    two_areas(k, 1, pages_to_scan="1")
    k.sysfs["run"] = "1"
    step(k, 4)
    assert (k.sysfs["pages_unshared"], k.sysfs["pages_volatile"]) == ("1", "1")
    k.sysfs["merge_across_nodes"] = "0"
    step(k, 1)
    assert (k.sysfs["pages_unshared"], k.sysfs["pages_volatile"]) == ("1", "1")
    step(k, 3)
    assert k.sysfs["full_scans"] == "2"
    assert (k.sysfs["pages_unshared"], k.sysfs["pages_volatile"]) == ("2", "0")
    k.wait_full_scans(3)
    assert shared_sharing(k) == (0, 0)


@pytest.mark.parametrize("engine", list(ENGINES))
def test_node_tree_unsearched_after_switch_to_one_tree(engine: str) -> None:
    """The other way: B filed in node 1's tree (batch 4, merge_across_nodes=0), then the
    knob becomes 1.  Batch 5: A searches the one tree (node 0's), empty: A is inserted
    (2 unshared).  Next scan: B finds A there (batch 7, A still flagged from the last
    scan), then A finds B and merges: A's page, on node 0, becomes the KSM page (spec
    3.5: the page being scanned), mapped at B on node 1 too.  MADV_UNMERGEABLE on B
    then gives B a copy on its own node."""
    k = ENGINES[engine](2)
    k.sysfs["merge_across_nodes"] = "0"
    a0, a1 = two_areas(k, 1, pages_to_scan="1")
    k.sysfs["run"] = "1"
    step(k, 4)
    k.sysfs["merge_across_nodes"] = "1"
    step(k, 1)
    assert k.sysfs["pages_unshared"] == "2"
    step(k, 2)  # end of the scan, then B: out of the old tree, into the new one
    assert k.sysfs["pages_unshared"] == "2"
    step(k, 1)
    assert shared_sharing(k) == (1, 1)
    assert nodes_of(k) == [0, 0]
    p = next(iter(k.processes.values()))
    p.madvise(a1, PAGE_SIZE, MADV_UNMERGEABLE)
    assert nodes_of(k) == [1, 0]
    assert a0 > a1


@pytest.mark.parametrize("make", [SimKernel, BulkKernel], ids=["sim", "bulk"])
def test_nodes_are_checked(make: Callable[..., Kernel]) -> None:
    """numa_nodes is a count from 1 to MAX_NUMNODES (1024); mmap(node=) names an existing
    node; both ValueError naming the argument, as SimKernel's."""
    for bad in (0, 1025):
        with pytest.raises(ValueError, match="numa_nodes"):
            make(numa_nodes=bad)
    k = make(numa_nodes=2)
    p = k.spawn()
    with pytest.raises(ValueError, match=r"node 2 does not exist \(nodes: \[0, 1\]\)"):
        p.mmap(PAGE_SIZE, node=2)
    with pytest.raises(ValueError, match="node 1 does not exist"):
        make().spawn().mmap(PAGE_SIZE, node=1)


def test_one_node_machine_pays_nothing_for_numa() -> None:
    """Pages and frames carry a node only on a machine of several (bytes per page)."""
    one, two = BulkKernel(), BulkKernel(numa_nodes=2)
    assert "nid" not in one.ksm.pages.fields and "nid" not in one.ksm.frames.fields
    assert {"nid", "unid"} <= two.ksm.pages.fields.keys() and "nid" in two.ksm.frames.fields
    assert one.memory_bytes() < two.memory_bytes()


@pytest.mark.parametrize("vectorize", [True, False], ids=["vector", "per-page"])
@pytest.mark.parametrize(("nodes", "mode", "shared"), [(2, "1", 64), (2, "0", 128), (3, "0", 192)])
def test_guests_share_an_image_per_node(vectorize: bool, nodes: int, mode: str,
                                        shared: int) -> None:
    """6 guests of 256 pages (a 64-page image, then their own pages), placed on the nodes in
    turn: one KSM page per image page and tree, so 64 x (number of trees) shared and
    6 x 64 - shared sharing; every page maps a frame of its own node under 0."""
    k = BulkKernel(numa_nodes=nodes, vectorize=vectorize)
    k.sysfs["merge_across_nodes"] = mode
    k.sysfs["pages_to_scan"] = "10000"
    image = k.contents.fresh(64)
    for g in range(6):
        p = k.spawn()
        a = p.mmap(256 * PAGE_SIZE, node=g % nodes)
        p.write_contents(a, [*image.tolist(), *k.contents.fresh(192).tolist()])
        p.madvise(a, 256 * PAGE_SIZE, MADV_MERGEABLE)
    k.sysfs["run"] = "1"
    k.wait_full_scans(2)
    assert shared_sharing(k) == (shared, 6 * 64 - shared)
    if mode == "0":
        first = min(k.processes)
        assert all(node == (pid - first) % nodes for pid, pages in page_nodes(k)
                   for _a, node in pages)
