"""The bulk engine: its vectorised path against its per-page path, and both against SimKernel.

Expected values come from SimKernel (itself checked against the real kernel
by the differential suite) or from arithmetic stated in the test.
"""

from __future__ import annotations

import errno
import random
from collections.abc import Callable
from math import ceil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bulk_programs import (
    Op,
    bulk,
    canonical,
    clock,
    counters,
    execute,
    keep_tree_stable,
    numa_program,
    page,
    program,
    sim,
    unmap_program,
    unmerge_program,
    walk_insensitive,
)
from ksmlab import MADV_MERGEABLE, MADV_UNMERGEABLE, PAGE_SIZE, SimKernel
from ksmlab.api import Kernel
from ksmlab.bulk import BulkKernel
from ksmlab.constants import (
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_PRIVATE,
    PROT_EXEC,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
    TASK_SIZE,
)
from ksmlab.errors import NotModelledError, ProcessExitedError, ScanStalledError

KNOBS = {"pages_to_scan": "100", "sleep_millisecs": "0"}

WORKLOADS: dict[str, Callable[[int, int], int]] = {
    "64-images": lambda i, n: i % 64,
    "distinct": lambda i, n: i + 1,
    "half-pairs": lambda i, n: i // 2 + 1 if i < n // 2 else n + i,
    "identical": lambda i, n: 7,
    "zero": lambda i, n: 0 if i % 3 else i + 1,
}


def fill_and_scan(k: SimKernel | BulkKernel, n: int, tag: Callable[[int, int], int],
                  knobs: dict[str, str], scans: int) -> list[dict[str, str]]:
    """One process with n pages of the workload; counters after each full scan."""
    for name, value in knobs.items():
        k.sysfs[name] = value
    p = k.spawn()
    a = p.mmap(n * PAGE_SIZE)
    p.write(a, b"".join(page(tag(i, n)) for i in range(n)))
    p.madvise(a, n * PAGE_SIZE, MADV_MERGEABLE)
    k.sysfs["run"] = "1"
    out = []
    for _ in range(scans):
        k.wait_full_scans(1)
        out.append(counters(k))
    return out


@pytest.mark.parametrize("vectorize", [True, False], ids=["vector", "per-page"])
@pytest.mark.parametrize("mps", ["2", "5", "256"])
@pytest.mark.parametrize("zero", ["0", "1"])
@pytest.mark.parametrize("name", list(WORKLOADS))
def test_workloads_match_simkernel(name: str, zero: str, mps: str, vectorize: bool) -> None:
    """Every counter after each of 5 full scans equals SimKernel's (no mutation, so exact)."""
    knobs = dict(KNOBS, max_page_sharing=mps, use_zero_pages=zero)
    want = fill_and_scan(SimKernel(trace=False), 700, WORKLOADS[name], knobs, 5)
    got = fill_and_scan(BulkKernel(vectorize=vectorize), 700, WORKLOADS[name], knobs, 5)
    assert got == want


def test_64_images_by_arithmetic() -> None:
    """N pages cycling through 64 images: 64 * ceil(N/64/256) KSM pages after two scans."""
    n = 1 << 17
    k = BulkKernel()
    k.sysfs["pages_to_scan"] = "100000"
    images = k.contents.fresh(64)
    p = k.spawn()
    a = p.mmap(n * PAGE_SIZE)
    p.write_contents(a, images[np.arange(n) % 64])
    p.madvise(a, n * PAGE_SIZE, MADV_MERGEABLE)
    k.sysfs["run"] = "1"
    k.wait_full_scans(2)
    shared = 64 * ceil(n / 64 / 256)
    assert counters(k, ("pages_shared", "pages_sharing", "stable_node_chains",
                        "stable_node_dups")) == {
        "pages_shared": str(shared), "pages_sharing": str(n - shared),
        "stable_node_chains": "64", "stable_node_dups": str(shared)}
    assert p.ksm_stat()["ksm_merging_pages"] == n


SEEDS = range(120)


@pytest.mark.parametrize("seed", SEEDS)
def test_vector_path_equals_per_page_path(seed: int) -> None:
    """The whole state (nodes named by their KSM page) is identical after every step."""
    ops = program(random.Random(seed))
    want = execute(bulk(ops, vectorize=False), ops, canonical)
    got = execute(bulk(ops, vectorize=True), ops, canonical)
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g == w, f"log entry {i} ({g[0]}) of seed {seed}"


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.randoms(use_true_random=False), st.integers(20, 120))
def test_vector_path_equals_per_page_path_hypothesis(r: random.Random, steps: int) -> None:
    """The same property on Hypothesis-chosen programs."""
    ops = program(r, steps)
    assert (execute(bulk(ops, vectorize=True), ops, canonical)
            == execute(bulk(ops, vectorize=False), ops, canonical))


@pytest.mark.parametrize("content", ["bytes", "fingerprint"])
@pytest.mark.parametrize("seed", SEEDS)
def test_random_programs_match_simkernel(seed: int, content: str) -> None:
    """Against SimKernel, everything that does not depend on the kernel's tree walk matches.

    See bulk/engine.py: mutations of pages in the current unstable tree are
    left out, and the stable tree's stale nodes and chain collapses are
    compared through what they leave (live nodes and their sharers).  The
    programs run on 1 to 3 NUMA nodes with merge_across_nodes changes, half
    of them under the advisor: every knob (pages_to_scan as the advisor sets
    it), ksmd's clock and CPU time and every page's node are compared too.
    """
    ops = keep_tree_stable(program(random.Random(seed)))
    want = execute(sim(ops, content), ops, walk_insensitive)
    got = execute(bulk(ops), ops, walk_insensitive)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g == w, f"log entry {i} ({g[0]}) of seed {seed}"


STALE_DUP_PROGRAM: list[Op] = [
    ("knob", "max_page_sharing", "2"), ("spawn",), ("mmap", 0, 8),
    ("madvise", 0, 0, 0, 8, True), ("run", "1"),
    ("write", 0, 0, 0, [1, 2, 3, 3, 3, 3, 3, 3]),  # p0 B, p1 C, p2..p7 A
    ("batches", 2),  # scan 2: p2..p7 merge in pairs: A's chain [k3, k2, k1], all full
    ("write", 0, 0, 1, [3]),  # p1 becomes A: its checksum is new in scan 3
    ("batches", 1),
    ("write", 0, 0, 2, [4, 5]),  # k1 (p2, p3) freed: a stale dup of A's chain
    ("batches", 1),  # scan 4: p0's search (B) passes A's chain, then p1 searches it
]
"""A stale dup dropped by another content's search: in scan 4 the kernel's search for
p0 (B) passes A's chain on its way, dropping the stale k1 (uncharged: not its content),
before p1's search of A walks the chain; the bulk engine has no tree order, so its walk
for p1 is the first to meet k1.  By hand: scan 2 charges p6's search (k2, k1: both full,
2), p7's search (2) and the insert of p7's new KSM page k3 (2); scan 4 charges p1's
search the live k3 and k2 (2): 8.  Before the fix the bulk engine charged k1 too (9)."""

HEAD_MOVE_PROGRAM: list[Op] = [
    ("knob", "max_page_sharing", "3"), ("spawn",), ("mmap", 0, 8),
    ("madvise", 0, 0, 0, 8, True), ("run", "1"),
    ("write", 0, 0, 0, [1, 3, 3, 3, 3, 3, 3, 2]),  # p0 B, p1..p6 A, p7 C
    ("batches", 2),  # scan 2: k1 (p1..p3), k2 (p4..p6): A's chain [k2, k1], both full
    ("write", 0, 0, 1, [4, 5]),  # scan 3 takes p1 and p2 out of k1: one sharer left
    ("write", 0, 0, 7, [3]),  # p7 becomes A: its checksum is new in scan 3
    ("batches", 2),  # scan 4: p0's search (B) passes A's chain, then p7 searches it
]
"""A dup moved to its chain's head by another content's search: in scan 4 the kernel's
search for p0 (B) walks A's chain past the full k2 to k1 (room for two more) and moves
k1 to the head, before p7's search of A.  By hand: scan 2 charges p6's search (k2 at the
head, with room: 1); scan 4 charges p7's search one dup (k1, at the head or moved
there): 2.  Before the fix the bulk engine charged k2 too (3)."""


@pytest.mark.parametrize("vectorize", [True, False], ids=["vector", "per-page"])
@pytest.mark.parametrize(("ops", "chain_dups"), [(STALE_DUP_PROGRAM, 8), (HEAD_MOVE_PROGRAM, 2)],
                         ids=["stale-dup", "head-move"])
def test_chain_walk_after_a_passing_search_costs_the_same(
        ops: list[Op], chain_dups: int, vectorize: bool) -> None:
    """Both engines count the same chain dups when a search for another content walks
    a chain first (docs/cost-model.md: the stale dups a walk drops and the dups before
    one it moves to the head are not charged, since which walk does it depends on the
    tree's shape)."""
    assert keep_tree_stable(ops) == ops
    want = execute(sim(ops), ops, clock)
    got = execute(bulk(ops, vectorize=vectorize), ops, clock)
    assert got == want  # the clock, ksmd's CPU time and all of KsmdWork, after every step
    assert got[-1][-1][-1]["chain_dups"] == chain_dups


@pytest.mark.parametrize("seed", range(60))
def test_unmerge_programs_vector_equals_per_page(seed: int) -> None:
    """run=2 and max_page_sharing changes leave the same whole state on both paths."""
    ops = unmerge_program(random.Random(seed))
    want = execute(bulk(ops, vectorize=False), ops, canonical)
    got = execute(bulk(ops, vectorize=True), ops, canonical)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g == w, f"log entry {i} ({g[0]}) of seed {seed}"


@pytest.mark.parametrize("content", ["bytes", "fingerprint"])
@pytest.mark.parametrize("seed", range(60))
def test_unmerge_programs_match_simkernel(seed: int, content: str) -> None:
    """run=2, max_page_sharing and merge_across_nodes changes (EBUSY or not) match SimKernel
    step by step."""
    ops = keep_tree_stable(unmerge_program(random.Random(seed)))
    want = execute(sim(ops, content), ops, walk_insensitive)
    got = execute(bulk(ops), ops, walk_insensitive)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g == w, f"log entry {i} ({g[0]}) of seed {seed}"


@pytest.mark.parametrize("seed", range(60))
def test_numa_programs_vector_equals_per_page(seed: int) -> None:
    """merge_across_nodes flipped mid-scan leaves the same whole state on both paths."""
    ops = numa_program(random.Random(seed))
    want = execute(bulk(ops, vectorize=False), ops, canonical)
    got = execute(bulk(ops, vectorize=True), ops, canonical)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g == w, f"log entry {i} ({g[0]}) of seed {seed}"


@pytest.mark.parametrize("content", ["bytes", "fingerprint"])
@pytest.mark.parametrize("seed", range(60))
def test_numa_programs_match_simkernel(seed: int, content: str) -> None:
    """merge_across_nodes flipped mid-scan (EBUSY or not; unstable trees holding pages of
    other nodes, refused partners) matches SimKernel step by step, pages' nodes included."""
    ops = keep_tree_stable(numa_program(random.Random(seed)))
    want = execute(sim(ops, content), ops, walk_insensitive)
    got = execute(bulk(ops), ops, walk_insensitive)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g == w, f"log entry {i} ({g[0]}) of seed {seed}"


@pytest.mark.parametrize("seed", range(60))
def test_unmap_programs_vector_equals_per_page(seed: int) -> None:
    """munmap, remapping in the gaps, mprotect and forks of split address spaces leave the
    same whole state (address spaces, ghosts and every row) on both paths."""
    ops = unmap_program(random.Random(seed))
    want = execute(bulk(ops, vectorize=False), ops, canonical)
    got = execute(bulk(ops, vectorize=True), ops, canonical)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g == w, f"log entry {i} ({g[0]}) of seed {seed}"


@pytest.mark.parametrize("content", ["bytes", "fingerprint"])
@pytest.mark.parametrize("seed", range(60))
def test_unmap_programs_match_simkernel(seed: int, content: str) -> None:
    """The same programs match SimKernel step by step: counters, ksm_stat, errnos, where
    each mmap goes and what every page holds."""
    ops = keep_tree_stable(unmap_program(random.Random(seed)))
    want = execute(sim(ops, content), ops, walk_insensitive)
    got = execute(bulk(ops), ops, walk_insensitive)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g == w, f"log entry {i} ({g[0]}) of seed {seed}"


UNMAPPED_NODE = [
    ("knob", "pages_to_scan", "2"), ("knob", "sleep_millisecs", "0"), ("spawn",),
    ("mmap", 0, 2), ("write", 0, 0, 0, [3, 3]), ("madvise", 0, 0, 0, 2, True),
    ("run", "1"), ("batches", 4),  # two full scans: one KSM page, two items
    ("run", "0"), ("fork", 0),  # the child maps the KSM page twice, with no items
    ("write", 0, 0, 0, [4, 5]),  # the parent's pages leave it
    ("run", "1"), ("batches", 1), ("run", "0"),  # ksmd drops the parent's items: 0 sharers
    ("madvise", 1, 0, 0, 2, False),  # the child's copies: the KSM page is freed
    ("knob", "max_page_sharing", "3"),  # its node is removed first, so no EBUSY
    ("run", "1"), ("batches", 10),
]
"""A stable node with no sharers whose page is no longer mapped, when max_page_sharing changes."""


@pytest.mark.parametrize("content", ["bytes", "fingerprint"])
def test_max_page_sharing_removes_unmapped_nodes_first(content: str) -> None:
    """The change is allowed (the kernel removes the node first) on both engines, and all
    that follows matches SimKernel; the vector path equals the per-page one."""
    want = execute(SimKernel(trace=False, content=content), UNMAPPED_NODE, walk_insensitive)
    got = execute(BulkKernel(), UNMAPPED_NODE, walk_insensitive)
    assert got == want
    k = BulkKernel()
    log = execute(k, UNMAPPED_NODE, canonical)
    assert "errno" not in [entry[1] for entry in log]
    assert k.sysfs["max_page_sharing"] == "3"
    assert log == execute(BulkKernel(vectorize=False), UNMAPPED_NODE, canonical)


def test_run_2_unmerges_everything() -> None:
    """300 identical pages merged into 2 KSM pages (max_page_sharing 256: 256 + 44 mappings);
    run=2 gives all 300 private copies, frees every item and node, and resets full_scans."""
    k = BulkKernel()
    fill_and_scan(k, 300, WORKLOADS["identical"], KNOBS, 2)
    assert counters(k, ("pages_shared", "pages_sharing")) == {
        "pages_shared": "2", "pages_sharing": "298"}
    k.sysfs["run"] = "2"
    p = next(iter(k.processes.values()))
    assert len(set(k.ksm.pages.frame[:300].tolist())) == 300
    assert counters(k, ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
                        "full_scans", "stable_node_chains", "stable_node_dups")) == {
        "pages_shared": "0", "pages_sharing": "0", "pages_unshared": "0", "pages_volatile": "0",
        "full_scans": "0", "stable_node_chains": "0", "stable_node_dups": "0"}
    assert p.ksm_stat()["ksm_merging_pages"] == 0
    assert p.ksm_stat()["ksm_rmap_items"] == 0
    assert k.ksmd.batch() is False  # ksmd does not run under run=2
    k.sysfs["max_page_sharing"] = "3"  # nothing is busy any more
    assert k.sysfs["max_page_sharing"] == "3"


# --- the interface ------------------------------------------------------------------------------

def test_partial_write_is_refused_and_changes_nothing() -> None:
    k = BulkKernel()
    p = k.spawn()
    a = p.mmap(2 * PAGE_SIZE)
    p.write(a, page(1) * 2)
    before = canonical(k)
    with pytest.raises(NotModelledError, match="whole pages"):
        p.write(a, b"x" * 100)
    assert canonical(k) == before


def test_unmapped_range_gives_the_kernels_errno() -> None:
    """madvise's errnos (as on Linux 6.18, see test_fuzz_api.py): EINVAL for an unaligned
    start, changing nothing; ENOMEM for a hole, after advising the mapped part."""
    k = BulkKernel()
    p = k.spawn()
    a = p.mmap(2 * PAGE_SIZE)
    with pytest.raises(OSError) as info:
        p.madvise(a + 1, PAGE_SIZE, MADV_MERGEABLE)
    assert info.value.errno == errno.EINVAL
    assert p.ksm_stat()["ksm_mergeable"] is False
    with pytest.raises(OSError) as info:
        p.madvise(a, 3 * PAGE_SIZE, MADV_MERGEABLE)
    assert info.value.errno == errno.ENOMEM
    assert p.ksm_stat()["ksm_mergeable"] is True


def test_unmodelled_calls_say_so() -> None:
    k = BulkKernel()
    p = k.spawn()
    with pytest.raises(NotModelledError, match="anonymous"):
        p.mmap(PAGE_SIZE, PROT_READ, MAP_PRIVATE, path="/etc/hostname")


@pytest.mark.parametrize(("name", "value", "err"), [
    ("run", "3", errno.EINVAL), ("pages_to_scan", "-1", errno.EINVAL),
    ("max_page_sharing", "1", errno.EINVAL), ("smart_scan", "maybe", errno.EINVAL),
    ("pages_shared", "1", errno.EACCES),
])
def test_sysfs_errors(name: str, value: str, err: int) -> None:
    """The kernel's errno for each bad write (same values as SimKernel's table)."""
    k = BulkKernel()
    s = SimKernel(trace=False)
    for kernel in (k, s):
        with pytest.raises(OSError) as info:
            kernel.sysfs[name] = value
        assert info.value.errno == err
    assert k.sysfs[name] == s.sysfs[name]


def test_max_page_sharing_busy_while_ksm_pages_exist() -> None:
    k = BulkKernel()
    fill_and_scan(k, 8, WORKLOADS["identical"], KNOBS, 2)
    with pytest.raises(OSError) as info:
        k.sysfs["max_page_sharing"] = "3"
    assert info.value.errno == errno.EBUSY
    assert k.sysfs["max_page_sharing"] == "256"


def test_bad_content_ids_are_refused() -> None:
    k = BulkKernel()
    p = k.spawn()
    a = p.mmap(PAGE_SIZE)
    with pytest.raises(ValueError, match="content ids"):
        p.write_contents(a, [len(k.contents) + 5])


def test_exited_process_and_stalled_scan() -> None:
    k = BulkKernel()
    p = k.spawn()
    p.exit()
    with pytest.raises(ProcessExitedError):
        p.mmap(PAGE_SIZE)
    with pytest.raises(ScanStalledError, match="run=0"):
        k.wait_full_scans(1)


def test_unmerge_breaks_every_ksm_page() -> None:
    """MADV_UNMERGEABLE gives each page a private copy; ksmd then frees the items."""
    k = BulkKernel()
    fill_and_scan(k, 300, WORKLOADS["identical"], KNOBS, 2)
    p = next(iter(k.processes.values()))
    a = p.mm.segments[0].addr
    assert p.ksm_stat()["ksm_merging_pages"] == 300
    p.madvise(a, 300 * PAGE_SIZE, MADV_UNMERGEABLE)
    frames = k.ksm.pages.frame[:300]
    assert len(set(frames.tolist())) == 300
    k.wait_full_scans(1)
    assert counters(k, ("pages_shared", "pages_sharing")) == {
        "pages_shared": "0", "pages_sharing": "0"}
    assert p.ksm_stat()["ksm_rmap_items"] == 0


# --- munmap and mprotect ------------------------------------------------------------------------

P = PAGE_SIZE
A, B = b"A" * P, b"B" * P
BASE = 0x7F0000000000
"""mmap_base: the first mapping of a process ends there (top-down placement)."""
ANON = MAP_PRIVATE | MAP_ANONYMOUS


def _numbers(k: Kernel, p: object) -> tuple[int, int, int, int, int, int]:
    """(shared, sharing, unshared, volatile, the process's rmap_items, merging_pages)."""
    stat = p.ksm_stat()  # type: ignore[attr-defined]
    return (int(k.sysfs["pages_shared"]), int(k.sysfs["pages_sharing"]),
            int(k.sysfs["pages_unshared"]), int(k.sysfs["pages_volatile"]),
            int(stat["ksm_rmap_items"]), int(stat["ksm_merging_pages"]))


def remap_program(k: Kernel, checkpoint: Callable[[str], None], *, scan_between: bool,
                  fixed: bool) -> list[int]:
    """4 pages of A merged; the last unmapped, mapped again at its address (MAP_FIXED, or
    the gap reuse of the top-down placement) and written with A again, with or without a
    scan between; then 2 pages made PROT_NONE, a refused and a forced write, and a fork
    whose child unmaps 2 pages.  Written against ksmlab.api, to run on Linux too (where
    the differential runner records a refused call instead of raising it); returns the
    errnos raised."""
    k.sysfs["pages_to_scan"] = "10000"
    k.sysfs["sleep_millisecs"] = "0"
    k.sysfs["smart_scan"] = "0"
    p = k.spawn()
    a = p.mmap(4 * P)
    p.write(a, A * 4)
    p.madvise(a, 4 * P, MADV_MERGEABLE)
    k.sysfs["run"] = "1"
    k.wait_full_scans(2)
    checkpoint("merged")
    p.munmap(a + 3 * P, P)
    checkpoint("unmapped")
    if scan_between:
        k.wait_full_scans(1)
        checkpoint("scanned")
    b = (p.mmap(P, PROT_READ | PROT_WRITE, ANON | MAP_FIXED, addr=a + 3 * P) if fixed
         else p.mmap(P))
    assert b == a + 3 * P
    p.write(b, A)
    p.madvise(b, P, MADV_MERGEABLE)
    k.wait_full_scans(1)
    checkpoint("remapped, 1 scan")
    k.wait_full_scans(1)
    checkpoint("2 scans")
    p.mprotect(a, 2 * P, PROT_NONE)
    raised = []
    try:
        p.write(a, B)
    except OSError as e:
        raised.append(e.errno)
    p.write(a, B, force=True)
    checkpoint("forced write")
    k.wait_full_scans(1)
    checkpoint("scanned")
    c = p.fork()
    c.munmap(a + P, 2 * P)
    k.wait_full_scans(2)
    checkpoint("fork, child munmap")
    return raised


REMAP_ON_LINUX = {
    False: [("merged", (1, 3, 0, 0, 4, 4)), ("unmapped", (1, 3, 0, 0, 4, 4)),
            ("remapped, 1 scan", (1, 3, 0, 0, 4, 4)), ("2 scans", (1, 3, 0, 0, 4, 4)),
            ("forced write", (1, 3, 0, 0, 4, 4)), ("scanned", (1, 2, 0, 1, 4, 3)),
            ("fork, child munmap", (1, 3, 1, 1, 4, 3))],
    True: [("merged", (1, 3, 0, 0, 4, 4)), ("unmapped", (1, 3, 0, 0, 4, 4)),
           ("scanned", (1, 2, 0, 0, 3, 3)), ("remapped, 1 scan", (1, 2, 0, 1, 4, 3)),
           ("2 scans", (1, 3, 0, 0, 4, 4)), ("forced write", (1, 3, 0, 0, 4, 4)),
           ("scanned", (1, 2, 0, 1, 4, 3)), ("fork, child munmap", (1, 3, 1, 1, 4, 3))],
}
"""What Linux 6.18 showed at each checkpoint of :func:`remap_program` (run through the
differential runner's quiescence protocol: test_remap_program_on_linux), as
(pages_shared, pages_sharing, pages_unshared, pages_volatile, and the parent's
ksm_rmap_items and ksm_merging_pages).  Without a scan between, the page mapped again
finds the item its predecessor left, checksum and all, and merges in one scan; after
one, ksmd has freed that item, so the new page needs two (volatile for one)."""


@pytest.mark.parametrize("vectorize", [True, False], ids=["vector", "per-page"])
@pytest.mark.parametrize("scan_between", [False, True], ids=["at-once", "scan-between"])
def test_remap_finds_the_items_its_predecessor_left(scan_between: bool,
                                                    vectorize: bool) -> None:
    """The bulk engine gives Linux's figures at every checkpoint of remap_program."""
    k = BulkKernel(vectorize=vectorize)
    seen: list[tuple[str, tuple[int, ...]]] = []
    raised = remap_program(k, lambda name: seen.append((name, _numbers(k, k.processes[1000]))),
                           scan_between=scan_between, fixed=False)
    assert seen == REMAP_ON_LINUX[scan_between]
    assert raised == [errno.EFAULT]  # the write to a PROT_NONE page
    child = k.processes[1001]
    assert child.ksm_stat()["ksm_rmap_items"] == 2  # its pages at a and a + 3 pages
    assert child.ksm_stat()["ksm_merging_pages"] == 1


@pytest.mark.linux
@pytest.mark.parametrize("scan_between", [False, True], ids=["at-once", "scan-between"])
def test_remap_program_on_linux(scan_between: bool) -> None:
    """REMAP_ON_LINUX is what the real kernel shows (and SimKernel agrees in full)."""
    from ksmlab.backends.linux import helper_unavailable_reason, linux_ksm_unavailable_reason
    from ksmlab.differential import differential

    reason = linux_ksm_unavailable_reason() or helper_unavailable_reason()
    if reason:
        pytest.skip(reason)

    def prog(k: Kernel, cp: Callable[[str], None]) -> None:
        remap_program(k, cp, scan_between=scan_between, fixed=True)

    report = differential(prog, name=f"remap, scan between: {scan_between}")
    assert report.ok, str(report)
    writes = [c.result for c in report.kernel.calls if c.call.startswith("write(")]
    assert "EFAULT" in writes
    got = []
    for record in report.kernel.checkpoints[:-1]:  # the last one is "(end)"
        c = record.counters
        stat = record.processes[0].ksm_stat
        got.append((record.name, (c["pages_shared"], c["pages_sharing"], c["pages_unshared"],
                                  c["pages_volatile"], int(stat["ksm_rmap_items"]),
                                  int(stat["ksm_merging_pages"]))))
    assert got == REMAP_ON_LINUX[scan_between]


@pytest.mark.parametrize("vectorize", [True, False], ids=["vector", "per-page"])
def test_spec_trace_2_with_munmap(vectorize: bool) -> None:
    """Spec 7 trace 2 (verified on Linux), with munmap where the trace has MADV_DONTNEED
    (for ksmd both leave an address with no page): 300 identical pages, smart_scan 0."""
    k = BulkKernel(vectorize=vectorize)
    for name, value in {"pages_to_scan": "10000", "sleep_millisecs": "0",
                        "smart_scan": "0"}.items():
        k.sysfs[name] = value
    p = k.spawn()
    a = p.mmap(300 * P)
    p.write(a, A * 300)
    p.madvise(a, 300 * P, MADV_MERGEABLE)
    names = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
             "stable_node_chains", "stable_node_dups")
    k.sysfs["run"] = "1"
    k.wait_full_scans(1)
    assert counters(k, ("pages_volatile",)) == {"pages_volatile": "300"}
    k.wait_full_scans(1)
    assert counters(k, names) == dict(zip(names, ["2", "298", "0", "0", "1", "2"], strict=True))
    p.write(a + 7 * P, B)
    k.wait_full_scans(1)
    assert counters(k, ("pages_sharing", "pages_volatile")) == {
        "pages_sharing": "297", "pages_volatile": "1"}
    p.munmap(a + 20 * P, P)
    p.munmap(a + 299 * P, P)
    # Nothing changes before ksmd passes (spec 3.12: munmap never updates the counters).
    assert counters(k, ("pages_sharing", "pages_volatile")) == {
        "pages_sharing": "297", "pages_volatile": "1"}
    assert p.ksm_stat()["ksm_rmap_items"] == 300
    k.wait_full_scans(1)
    assert counters(k, ("pages_sharing", "pages_unshared")) == {
        "pages_sharing": "295", "pages_unshared": "1"}
    assert p.ksm_stat()["ksm_rmap_items"] == 298


@pytest.mark.parametrize("vectorize", [True, False], ids=["vector", "per-page"])
def test_munmap_drops_ksm_zero_pages_at_once(vectorize: bool) -> None:
    """use_zero_pages: 6 zero pages become KSM zero pages (2 scans); unmapping 2 lowers
    ksm_zero_pages by 2 at once (spec 3.9), the items stay until ksmd passes."""
    k = BulkKernel(vectorize=vectorize)
    k.sysfs["use_zero_pages"] = "1"
    k.sysfs["pages_to_scan"] = "100"
    k.sysfs["sleep_millisecs"] = "0"
    p = k.spawn()
    a = p.mmap(6 * P)
    p.write(a, bytes(6 * P))
    p.madvise(a, 6 * P, MADV_MERGEABLE)
    k.sysfs["run"] = "1"
    k.wait_full_scans(2)
    assert k.sysfs["ksm_zero_pages"] == "6"
    k.sysfs["run"] = "0"
    p.munmap(a + 2 * P, 2 * P)
    assert (k.sysfs["ksm_zero_pages"], p.ksm_stat()["ksm_zero_pages"]) == ("4", 4)
    assert p.ksm_stat()["ksm_rmap_items"] == 6
    assert p.content_ids(a, 6 * P) == [0, 0, None, None, 0, 0]


@pytest.mark.parametrize("engine", ["sim", "bulk"])
def test_mmap_reuses_gaps_top_down(engine: str) -> None:
    """Mappings of 4, 4 and 4 pages end at BASE, BASE - 4 and BASE - 8 pages; unmapping
    the middle one leaves a 4-page gap: 2 pages go at its top, a 5-page mapping below
    everything, the next 2 pages fill the gap.  A mapping reaching below 16 pages (the
    floor) is ENOMEM (before the bulk engine allocates any row)."""
    k: Kernel = SimKernel(trace=False) if engine == "sim" else BulkKernel()
    p = k.spawn()
    got = [p.mmap(4 * P) for _ in range(3)]
    p.munmap(got[1], 4 * P)
    got += [p.mmap(2 * P), p.mmap(5 * P), p.mmap(2 * P)]
    assert [(BASE - x) // P for x in got] == [4, 8, 12, 6, 17, 8]
    with pytest.raises(OSError) as info:
        p.mmap(BASE - 17 * P - 15 * P)
    assert info.value.errno == errno.ENOMEM
    assert p.mmap(P) == BASE - 18 * P


@pytest.mark.parametrize("vectorize", [True, False], ids=["vector", "per-page"])
def test_munmap_across_mappings_and_holes(vectorize: bool) -> None:
    """One munmap over 3 mappings and a hole: a fork child keeps its copies of the pages
    (their mapcounts drop from 2 to 1), the parent's range reads as unmapped."""
    k = BulkKernel(vectorize=vectorize)
    p = k.spawn()
    a = [p.mmap(3 * P) for _ in range(3)]  # a[2] < a[1] < a[0], adjacent
    for i, x in enumerate(a):
        p.write(x, page(i + 1) * 3)
    p.munmap(a[1] + P, P)  # a hole in the middle mapping
    c = p.fork()
    p.munmap(a[2] + P, 7 * P)  # the rest of a[2], what is left of a[1], most of a[0]
    assert p.content_ids(a[2], 9 * P) == [k.contents.of_pages(page(3))[0]] + [None] * 7 + [
        k.contents.of_pages(page(1))[0]]
    frames = k.ksm.pages.frame[c.mm.segments[0].row:c.mm.segments[-1].row
                               + c.mm.segments[-1].pages]
    assert sorted(k.ksm.frames.mapcount[frames].tolist()) == [1] * 6 + [2] * 2
    assert [(s.addr, s.pages) for s in p.mm.segments] == [(a[2], 1), (a[0] + 2 * P, 1)]
    assert p.mm.ghosts == []  # no item was there: nothing for ksmd to free
    for bad in ((a[0] + 1, P), (a[0], 0), (TASK_SIZE, P), (TASK_SIZE - P, 2 * P)):
        with pytest.raises(OSError) as info:
            p.munmap(*bad)
        assert info.value.errno == errno.EINVAL
    p.munmap(0x10000, P)  # nothing there: success


@pytest.mark.parametrize("vectorize", [True, False], ids=["vector", "per-page"])
def test_mprotect_what_ksm_and_writes_see(vectorize: bool) -> None:
    """8 identical pages made read-only or PROT_NONE are madvised and merged all the same
    (1 KSM page, 7 sharers: spec 6, 'PROT_NONE private areas stay mergeable and
    scanned'); a write is EFAULT and changes nothing, a forced one copies the KSM page;
    MADV_UNMERGEABLE unmerges read-only pages."""
    k = BulkKernel(vectorize=vectorize)
    k.sysfs["pages_to_scan"] = "100"
    k.sysfs["sleep_millisecs"] = "0"
    p = k.spawn()
    a = p.mmap(8 * P)
    p.write(a, A * 8)
    p.mprotect(a, 4 * P, PROT_READ)
    p.mprotect(a + 4 * P, 4 * P, PROT_NONE)
    p.madvise(a, 8 * P, MADV_MERGEABLE)
    k.sysfs["run"] = "1"
    k.wait_full_scans(2)
    assert counters(k, ("pages_shared", "pages_sharing")) == {
        "pages_shared": "1", "pages_sharing": "7"}
    before = canonical(k)
    for addr in (a, a + 5 * P, a - P):
        with pytest.raises(OSError) as info:
            p.write(addr, B)
        assert info.value.errno == errno.EFAULT
        with pytest.raises(OSError) as info:
            p.write_contents(addr, [1])
        assert info.value.errno == errno.EFAULT
    assert canonical(k) == before
    p.write(a + 5 * P, B, force=True)
    assert len(set(p.content_ids(a, 8 * P))) == 2
    k.wait_full_scans(1)
    assert k.sysfs["pages_sharing"] == "6"
    p.madvise(a, 4 * P, MADV_UNMERGEABLE)
    assert len(set(k.ksm.pages.frame[p.mm.segments[0].row:][:4].tolist())) == 4
    p.mprotect(a, 8 * P, PROT_READ | PROT_WRITE)
    assert len(p.mm.segments) == 1  # the pieces join again
    p.write(a, B)


@pytest.mark.parametrize("call", [
    (0, 3 * P, PROT_READ), (P, 3 * P, PROT_READ), (0, 0, 0x10), (0, P, 0x10),
    (P + 1, P, PROT_READ), (4 * P, P, PROT_READ), (3 * P, 2 * P, PROT_NONE),
    (0, 2 ** 64 - P, PROT_READ), (0, P, 0x01000000 | PROT_READ), (0, P, 0x02000000),
    (0, 0, 0x03000000), (4 * P, P, 0x02000000), (0, P, 0x8 | PROT_EXEC),
])
def test_mprotect_errnos_and_partial_effects_match_simkernel(call: tuple[int, int, int]) -> None:
    """Over mappings [0, 3) and [5, 8) pages (a hole at 3 and 4): the errno, and which
    pages end writable (mprotect changes the part before a hole, then ENOMEM), as
    SimKernel's (itself checked on Linux 6.18)."""
    outcomes = []
    for k in (SimKernel(trace=False), BulkKernel()):
        p = k.spawn()
        a = p.mmap(8 * P)
        p.munmap(a + 3 * P, 2 * P)
        off, length, prot = call
        try:
            p.mprotect(a + off, length, prot)
            err = None
        except OSError as e:
            err = e.errno
        writable = []
        for i in (0, 1, 2, 5, 6, 7):
            try:
                p.write(a + i * P, A)
                writable.append(i)
            except OSError:
                pass
        outcomes.append((err, writable))
    assert outcomes[0] == outcomes[1]


@pytest.mark.parametrize("vectorize", [True, False], ids=["vector", "per-page"])
def test_fork_of_split_mappings(vectorize: bool) -> None:
    """A parent whose mapping was cut by munmap and mprotect forks: the child has the same
    layout, holes, protections and pages; a munmap in the child leaves the parent's
    pages (mapcount 2 -> 1); both then merge as SimKernel's processes do."""
    kernels: list[Kernel] = [SimKernel(trace=False), BulkKernel(vectorize=vectorize)]
    seen = []
    for k in kernels:
        k.sysfs["pages_to_scan"] = "100"
        k.sysfs["sleep_millisecs"] = "0"
        p = k.spawn()
        a = p.mmap(10 * P)
        p.write(a, A * 10)
        p.munmap(a + 2 * P, 2 * P)
        p.mprotect(a + 6 * P, 2 * P, PROT_READ)
        p.madvise(a, 2 * P, MADV_MERGEABLE)
        p.madvise(a + 4 * P, 6 * P, MADV_MERGEABLE)
        c = p.fork()
        results = []
        for proc in (p, c):
            for i in (0, 2, 6, 8):
                try:
                    proc.write(a + i * P, A)
                    results.append((proc.pid, i, "ok"))
                except OSError as e:
                    results.append((proc.pid, i, e.errno))
        c.munmap(a, 2 * P)
        k.sysfs["run"] = "1"
        k.wait_full_scans(2)
        seen.append((results, counters(k), p.ksm_stat(), c.ksm_stat()))
    assert seen[0] == seen[1]
    assert seen[1][0] == [(pid, i, r) for pid in (1000, 1001)
                          for i, r in ((0, "ok"), (2, errno.EFAULT), (6, errno.EFAULT),
                                       (8, "ok"))]


@pytest.mark.parametrize("vectorize", [True, False], ids=["vector", "per-page"])
def test_munmap_of_a_big_merged_range(vectorize: bool) -> None:
    """2**16 pages of 64 images (each image's 1024 pages on 4 KSM pages of 256 mappings, a
    chain of 4 dups): after munmap nothing changes; one full scan frees all 65536 items
    and, the KSM pages being freed, removes every stable node.  The 64 emptied chains
    stay until a search passes them (spec 6, "Stale empty chain")."""
    n = 1 << 16
    k = BulkKernel(vectorize=vectorize)
    k.sysfs["pages_to_scan"] = "100000"
    images = k.contents.fresh(64)
    p = k.spawn()
    a = p.mmap(n * P)
    p.write_contents(a, images[np.arange(n) % 64])
    p.madvise(a, n * P, MADV_MERGEABLE)
    k.sysfs["run"] = "1"
    k.wait_full_scans(2)
    names = ("pages_shared", "pages_sharing", "stable_node_chains", "stable_node_dups")
    merged = {"pages_shared": "256", "pages_sharing": str(n - 256),
              "stable_node_chains": "64", "stable_node_dups": "256"}
    assert counters(k, names) == merged
    p.munmap(a, n * P)
    assert counters(k, names) == merged
    assert p.ksm_stat()["ksm_rmap_items"] == n
    k.wait_full_scans(1)
    names += ("pages_unshared", "pages_volatile", "general_profit")
    assert counters(k, names) == {**dict.fromkeys(names, "0"), "stable_node_chains": "64"}
    assert p.ksm_stat()["ksm_rmap_items"] == 0
    assert p.mm.ghosts == []
