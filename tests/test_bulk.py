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
    bulk,
    canonical,
    counters,
    execute,
    keep_tree_stable,
    numa_program,
    page,
    program,
    sim,
    unmerge_program,
    walk_insensitive,
)
from ksmlab import MADV_MERGEABLE, MADV_UNMERGEABLE, PAGE_SIZE, SimKernel
from ksmlab.bulk import BulkKernel
from ksmlab.constants import MAP_PRIVATE, PROT_READ
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
