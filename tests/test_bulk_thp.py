"""Transparent huge pages in the bulk engine (docs/bulk.md, "THP").

Expected values come from the THP rules (measured on Linux 6.18) and arithmetic stated in each test;
the two paths of the engine are compared with each other (whole state), and
with SimKernel in lockstep.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bulk_programs import (
    HPAGE,
    bulk,
    canonical,
    execute,
    keep_tree_stable,
    sim,
    thp_program,
    walk_insensitive,
)
from ksmlab import MADV_HUGEPAGE, MADV_MERGEABLE, PAGE_SIZE
from ksmlab.bulk import BulkKernel, BulkProcess
from ksmlab.bulk.content import ZERO_CONTENT
from ksmlab.constants import MADV_NOHUGEPAGE, PROT_READ

EXTENT = HPAGE * PAGE_SIZE  # 2 MiB
PATHS = pytest.mark.parametrize("vectorize", [True, False], ids=["vector", "per-page"])


def machine(vectorize: bool, **knobs: str) -> BulkKernel:
    k = BulkKernel(vectorize=vectorize)
    for name, value in {"pages_to_scan": "100000", "sleep_millisecs": "0", **knobs}.items():
        k.sysfs[name] = value
    return k


def present(p: BulkProcess, addr: int, pages: int) -> int:
    return sum(c is not None for c in p.content_ids(addr, pages * PAGE_SIZE))


def huge_area(k: BulkKernel, extents: int) -> tuple[BulkProcess, int]:
    """A process with *extents* 2 MiB extents of MADV_HUGEPAGE | MADV_MERGEABLE memory.
    Mappings go top-down from an aligned base, so a whole number of extents is aligned."""
    p = k.spawn()
    a = p.mmap(extents * EXTENT)
    assert a % EXTENT == 0
    p.madvise(a, extents * EXTENT, MADV_HUGEPAGE)
    p.madvise(a, extents * EXTENT, MADV_MERGEABLE)
    return p, a


def full_scan(k: BulkKernel) -> dict[str, int]:
    """The ksmd work of the next full scan (pages, pte_pages, thp_splits, ...)."""
    before = k.ksmd.meter.total.as_dict()
    k.sysfs["run"] = "1"
    k.wait_full_scans(1)
    after = k.ksmd.meter.total.as_dict()
    return {name: after[name] - before[name] for name in after}


# --- rule 2: the fault -------------------------------------------------------------------------

@PATHS
def test_one_write_in_a_hugepage_extent_makes_512_pages_resident(vectorize: bool) -> None:
    k = machine(vectorize)
    p, a = huge_area(k, 2)
    cid = int(k.contents.fresh(1)[0])
    p.write_contents(a + 7 * PAGE_SIZE, [cid])
    ids = p.content_ids(a, 2 * EXTENT)
    assert sum(c is not None for c in ids) == HPAGE  # the first extent, not the second
    assert ids[7] == cid
    assert ids[:7] + ids[8:HPAGE] == [ZERO_CONTENT] * (HPAGE - 1)  # zero-filled
    assert k.ksm.frames.n == HPAGE and k.ksm.thps == 1


def test_bytes_writes_and_write_pages_fault_thps_too() -> None:
    k = machine(True)
    p, a = huge_area(k, 3)
    p.write(a, b"x" * PAGE_SIZE)
    p.write(a + EXTENT + 3 * PAGE_SIZE, b"y" * 2 * PAGE_SIZE)
    k.write_pages([p.pid], [a + 2 * EXTENT + 9 * PAGE_SIZE], [int(k.contents.fresh(1)[0])])
    assert present(p, a, 3 * HPAGE) == 3 * HPAGE and k.ksm.thps == 3


def test_no_thp_where_the_extent_crosses_the_vma_or_without_the_advice() -> None:
    k = machine(True)
    p = k.spawn()
    a = p.mmap(3 * EXTENT // 2)  # 3 MiB top-down: starts 1 MiB into an extent
    assert a % EXTENT == EXTENT // 2
    p.madvise(a, 3 * EXTENT // 2, MADV_HUGEPAGE)
    p.write_contents(a, [ZERO_CONTENT])  # its extent begins below the vma: a small page
    assert present(p, a, 3 * HPAGE // 2) == 1
    p.write_contents(a + EXTENT // 2 + PAGE_SIZE, [ZERO_CONTENT])  # the aligned extent inside
    assert present(p, a, 3 * HPAGE // 2) == 1 + HPAGE
    q = k.spawn()
    b = q.mmap(2 * EXTENT)
    q.write_contents(b, [ZERO_CONTENT])  # no MADV_HUGEPAGE (mode "madvise")
    q.madvise(b + EXTENT, EXTENT, MADV_NOHUGEPAGE)
    q.write_contents(b + EXTENT, [ZERO_CONTENT])
    q.madvise(b + EXTENT, EXTENT, MADV_HUGEPAGE)  # a page is present there now: no THP
    q.write_contents(b + EXTENT + PAGE_SIZE, [ZERO_CONTENT])
    assert present(q, b, 2 * HPAGE) == 3 and k.ksm.thps == 1


def test_no_thp_where_the_extent_has_two_protections() -> None:
    k = machine(True)
    p, a = huge_area(k, 1)
    p.mprotect(a + 100 * PAGE_SIZE, PAGE_SIZE, PROT_READ)
    p.write_contents(a, [ZERO_CONTENT])
    assert present(p, a, HPAGE) == 1 and k.ksm.thps == 0


# --- rule 3 and the counts: splits on a merge attempt ----------------------------------------------

@PATHS
def test_merging_identical_thps_splits_each_once(vectorize: bool) -> None:
    """4 THPs whose page i holds content i (512 contents, the same in each THP).

    Scan 1 records checksums: no merge attempt, every page PMD-mapped: pte_pages 0.
    Scan 2: THP 0's pages go into the unstable tree (PMD-mapped, no attempt); THP 1's
    page 0 matches THP 0's page 0: both split; THP 1's other 511 pages are reached
    through PTEs; THPs 2 and 3 likewise (their page 0 finds the stable node): 4 splits,
    pte_pages 3 * 511.  Scan 3: all 2048 pages through PTEs, nothing left to split.
    """
    k = machine(vectorize)
    p, a = huge_area(k, 4)
    ids = k.contents.fresh(HPAGE)
    p.write_contents(a, np.tile(ids, 4))
    assert k.ksm.thps == 4
    first, second, third = full_scan(k), full_scan(k), full_scan(k)
    assert (first["pages"], first["pte_pages"], first["thp_splits"]) == (4 * HPAGE, 0, 0)
    assert (second["pages"], second["pte_pages"], second["thp_splits"]) == (4 * HPAGE,
                                                                           3 * (HPAGE - 1), 4)
    assert (third["pages"], third["pte_pages"], third["thp_splits"]) == (4 * HPAGE, 4 * HPAGE, 0)
    assert k.counters()["pages_sharing"] == 3 * HPAGE


@PATHS
def test_zero_pages_of_a_thp_merge_and_split_it(vectorize: bool) -> None:
    """use_zero_pages=1: a THP of zero-filled pages; its first page's merge with the zero
    page splits it (one split), the 511 after it are reached through PTEs."""
    k = machine(vectorize, use_zero_pages="1")
    p, a = huge_area(k, 1)
    p.write_contents(a, [ZERO_CONTENT])
    assert full_scan(k)["pte_pages"] == 0
    second = full_scan(k)
    assert (second["thp_splits"], second["pte_pages"], second["zero_merges"]) == (1, HPAGE - 1,
                                                                                  HPAGE)


@PATHS
def test_unique_thps_stay_pmd_mapped(vectorize: bool) -> None:
    k = machine(vectorize)
    p, a = huge_area(k, 2)
    p.write_contents(a, k.contents.fresh(2 * HPAGE))
    for _ in range(3):
        work = full_scan(k)
        assert (work["pages"], work["pte_pages"], work["thp_splits"]) == (2 * HPAGE, 0, 0)


@pytest.mark.parametrize("zero", ["0", "1"])
@pytest.mark.parametrize("batch", [1, 37, 511, 513, 5000])
def test_batches_cut_inside_thps_count_as_the_per_page_walk(batch: int, zero: str) -> None:
    """Batches ending inside an extent: both paths count the same pte_pages and splits,
    and reach the same state (pages mixing merges, zero pages and unique ones; with
    use_zero_pages=0 the zero pages of a THP meet each other in the unstable tree)."""
    kernels = []
    for vectorize in (True, False):
        k = machine(vectorize, pages_to_scan=str(batch), use_zero_pages=zero)
        p, a = huge_area(k, 3)
        ids = k.contents.fresh(700)
        r = np.random.default_rng(5)
        p.write_contents(a, np.where(r.random(3 * HPAGE) < 0.2, ZERO_CONTENT,
                                     ids[r.integers(0, 700, 3 * HPAGE)]))
        k.sysfs["run"] = "1"
        k.wait_full_scans(3)
        kernels.append(k)
    vec, per_page = kernels
    assert vec.ksmd.meter.total.as_dict() == per_page.ksmd.meter.total.as_dict()
    assert canonical(vec) == canonical(per_page)
    assert vec.ksmd.meter.total.thp_splits == 3


# --- rule 4: COW of a fork-shared THP ------------------------------------------------------------

@PATHS
def test_cow_of_a_fork_shared_thp_splits_only_the_writers_pmd(vectorize: bool) -> None:
    """Parent and child PMD-map one THP after fork; the child writes one page: the
    child's 511 other pages and its new page are reached through PTEs (512), the
    parent's 512 through its PMD; no THP is split (no merge attempt: all unique)."""
    k = machine(vectorize)
    p, a = huge_area(k, 1)
    p.write_contents(a, k.contents.fresh(HPAGE))
    child = p.fork()
    child.write_contents(a + 5 * PAGE_SIZE, k.contents.fresh(1))
    work = full_scan(k)
    assert (work["pages"], work["pte_pages"], work["thp_splits"]) == (2 * HPAGE, HPAGE, 0)
    p.write_contents(a + 6 * PAGE_SIZE, k.contents.fresh(1))  # the THP is still mapped twice
    assert full_scan(k)["pte_pages"] == 2 * HPAGE


@PATHS
def test_a_write_by_the_only_mapper_keeps_the_pmd(vectorize: bool) -> None:
    k = machine(vectorize)
    p, a = huge_area(k, 1)
    p.write_contents(a, k.contents.fresh(HPAGE))
    p.write_contents(a + 9 * PAGE_SIZE, k.contents.fresh(3))
    assert full_scan(k)["pte_pages"] == 0 and k.ksm.frames.n == HPAGE


# --- rule 5: vma changes inside an extent ----------------------------------------------------------

@pytest.mark.parametrize("change", ["munmap", "mprotect", "madvise", "aligned-mprotect"])
def test_a_vma_boundary_inside_an_extent_splits_its_pmd(change: str) -> None:
    k = machine(True)
    p, a = huge_area(k, 2)
    p.write_contents(a, k.contents.fresh(2 * HPAGE))
    if change == "munmap":
        p.munmap(a + 10 * PAGE_SIZE, PAGE_SIZE)
        pages, pte = 2 * HPAGE - 1, HPAGE - 1
    elif change == "mprotect":
        p.mprotect(a + 10 * PAGE_SIZE, PAGE_SIZE, PROT_READ)
        pages, pte = 2 * HPAGE, HPAGE
    elif change == "madvise":  # unmerge half of the second extent: only its other half scanned
        p.madvise(a + EXTENT, EXTENT // 2, 13)  # MADV_UNMERGEABLE
        pages, pte = HPAGE + HPAGE // 2, HPAGE // 2
    else:  # a boundary on the extents' border splits nothing
        p.mprotect(a + EXTENT, EXTENT, PROT_READ)
        pages, pte = 2 * HPAGE, 0
    work = full_scan(k)
    assert (work["pages"], work["pte_pages"], work["thp_splits"]) == (pages, pte, 0)
    assert k.ksm.thps == 2  # the THPs themselves are not split (their PMDs are)


# --- both paths, and SimKernel ---------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(12))
def test_thp_programs_on_both_paths(seed: int) -> None:
    ops = thp_program(random.Random(seed))
    assert execute(bulk(ops), ops, canonical) == execute(bulk(ops, vectorize=False), ops,
                                                         canonical)


FUZZ_EXAMPLES = int(os.environ.get("KSMLAB_FUZZ_EXAMPLES", "8"))
"""Hypothesis budget of the THP fuzz test (bench/soak.py raises it)."""


@settings(max_examples=FUZZ_EXAMPLES, deadline=None,
          # A long program draws many choices from the Random; that is its size, not a fault.
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.randoms(use_true_random=False), st.integers(10, 60))
def test_thp_programs_on_both_paths_hypothesis(r: random.Random, steps: int) -> None:
    ops = thp_program(r, steps)
    assert execute(bulk(ops), ops, canonical) == execute(bulk(ops, vectorize=False), ops,
                                                         canonical)


@pytest.mark.parametrize("seed", range(16))
def test_thp_programs_match_simkernel(seed: int) -> None:
    """Lockstep against SimKernel: counters, ksm_stat, what every page holds, ksmd's clock,
    CPU time and work (pte_pages, thp_splits and chain_dups included) after every step.  As
    the random programs of tests/test_bulk.py: mutations of pages in the current unstable
    tree are left out.
    """
    ops = keep_tree_stable(thp_program(random.Random(seed)))
    want = execute(sim(ops, "fingerprint"), ops, walk_insensitive)
    got = execute(bulk(ops), ops, walk_insensitive)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g == w, f"log entry {i} ({g[0]}) of seed {seed}"
