# SPDX-License-Identifier: GPL-2.0-only
"""The kernel's own KSM selftests, re-created against SimKernel.

Sources: ``tools/testing/selftests/mm/ksm_tests.c`` and
``ksm_functional_tests.c`` as summarised in ``docs/kernel-selftests.md``
(the "inventory").  Sizes, knob settings and expected values are the
inventory's; the order of operations is the C code's.  Only the
userfaultfd test (test_unmerge_uffd_wp) is left out: the model has no
userfaultfd.
"""

from __future__ import annotations

import struct

import pytest

from helpers import MiB, expect, ksm_stop, merge, range_maps_duplicates, shared_sharing
from ksmlab import (
    MADV_DONTNEED,
    MADV_MERGEABLE,
    MADV_NOHUGEPAGE,
    MADV_UNMERGEABLE,
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    PAGE_SIZE,
    PR_GET_MEMORY_MERGE,
    PR_SET_MEMORY_MERGE,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
    SimKernel,
    SimProcess,
)

# ---------------------------------------------------------------------------------------
# ksm_tests.c
# ---------------------------------------------------------------------------------------

KSM_MERGE_MADVISE, KSM_MERGE_PRCTL = 0, 1  # the -t option


def ksm_tests_setup(k: SimKernel, page_count: int = 10) -> None:
    """main()'s tunable set-up: run=2, sleep_millisecs=0, merge_across_nodes=1,
    pages_to_scan = the -p page count (10 by default)."""
    k.sysfs["run"] = "2"
    k.sysfs["sleep_millisecs"] = "0"
    k.sysfs["merge_across_nodes"] = "1"
    k.sysfs["pages_to_scan"] = str(page_count)


def allocate_memory(p: SimProcess, npages: int, fill: int,
                    prot: int = PROT_READ | PROT_WRITE) -> int:
    """ksm_tests.c allocate_memory: mmap PROT_WRITE, memset the whole area, mprotect to *prot*."""
    size = npages * PAGE_SIZE
    addr = p.mmap(size, PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS)
    p.write(addr, bytes([fill]) * size)
    p.mprotect(addr, size, prot)
    return addr


def ksm_merge_pages(k: SimKernel, p: SimProcess, addr: int, size: int, merge_type: int) -> None:
    """ksm_tests.c ksm_merge_pages: madvise or prctl, run=1, then the two-scan wait."""
    if merge_type == KSM_MERGE_MADVISE:
        p.madvise(addr, size, MADV_MERGEABLE)
    else:
        p.prctl(PR_SET_MEMORY_MERGE, 1)
    k.sysfs["run"] = "1"
    # ksm_tests reads the start value of full_scans *after* writing run=1.
    k.wait_full_scans(2)


def assert_ksm_pages_count(k: SimKernel, dupl_page_count: int) -> None:
    """ksm_tests.c assert_ksm_pages_count, i.e. the expect(N) check with M read from sysfs."""
    m = int(k.sysfs["max_page_sharing"])
    assert shared_sharing(k) == expect(dupl_page_count, m)


@pytest.mark.parametrize("merge_type", [KSM_MERGE_MADVISE, KSM_MERGE_PRCTL],
                         ids=["madvise", "prctl"])
def test_ksm_tests_merge(merge_type: int) -> None:
    """ksm_tests -M -p 10 (-t 0/1): 10 identical pages merge into pages_shared=1, pages_sharing=9."""
    k = SimKernel()
    ksm_tests_setup(k, 10)
    p = k.spawn()
    addr = allocate_memory(p, 10, ord("*"))
    ksm_merge_pages(k, p, addr, 10 * PAGE_SIZE, merge_type)
    assert_ksm_pages_count(k, 10)
    assert shared_sharing(k) == (1, 9)  # the inventory's numbers for N=10
    assert (k.sysfs["pages_scanned"], k.sysfs["full_scans"]) == ("20", "2")
    if merge_type == KSM_MERGE_PRCTL:
        p.prctl(PR_SET_MEMORY_MERGE, 0)
        assert p.prctl(PR_GET_MEMORY_MERGE) == 0
        assert not range_maps_duplicates(p, addr, 10 * PAGE_SIZE)
    p.munmap(addr, 10 * PAGE_SIZE)


def test_ksm_tests_unmerge() -> None:
    """ksm_tests -U: two merged pages, a one-byte write to each, one more full scan: 0/0."""
    k = SimKernel()
    ksm_tests_setup(k, 10)  # -p is not passed: pages_to_scan = 10, the page count stays 2
    p = k.spawn()
    addr = allocate_memory(p, 2, ord("*"))
    ksm_merge_pages(k, p, addr, 2 * PAGE_SIZE, KSM_MERGE_MADVISE)
    assert_ksm_pages_count(k, 2)
    assert shared_sharing(k) == (1, 1)
    p.write(addr, b"-")
    p.write(addr + PAGE_SIZE, b"+")
    # Stale stable-tree entries are dropped by the scanner, not at COW time.
    assert shared_sharing(k) == (1, 1)
    k.wait_full_scans(1)
    assert_ksm_pages_count(k, 0)
    assert shared_sharing(k) == (0, 0)


@pytest.mark.parametrize(("use_zero_pages", "expected"), [(0, (1, 9)), (1, (0, 0))])
def test_ksm_tests_zero_pages(use_zero_pages: int, expected: tuple[int, int]) -> None:
    """ksm_tests -Z -p 10 -z 0/1: ten zero-filled pages give 1/9, or 0/0 when merged with the zero page."""
    k = SimKernel()
    ksm_tests_setup(k, 10)
    k.sysfs["use_zero_pages"] = str(use_zero_pages)
    p = k.spawn()
    addr = allocate_memory(p, 10, 0)
    ksm_merge_pages(k, p, addr, 10 * PAGE_SIZE, KSM_MERGE_MADVISE)
    assert_ksm_pages_count(k, 0 if use_zero_pages else 10)
    assert shared_sharing(k) == expected
    # Not checked by ksm_tests, but the reason for 0/0: every page is now a KSM zero page.
    assert int(k.sysfs["ksm_zero_pages"]) == (10 if use_zero_pages else 0)


@pytest.mark.parametrize(("merge_across_nodes", "expected"), [(1, (1, 1)), (0, (0, 0))])
def test_ksm_tests_numa_merge(merge_across_nodes: int, expected: tuple[int, int]) -> None:
    """ksm_tests -N -m 1/0: one '*' page on each of 2 nodes, merged separately: 1/1, or 0/0 per node."""
    k = SimKernel(numa_nodes=2)
    ksm_tests_setup(k, 10)
    k.sysfs["merge_across_nodes"] = str(merge_across_nodes)
    p = k.spawn()
    # First node: the first node with memory after the highest id, wrapping: 0; then 1.
    numa1 = p.mmap(PAGE_SIZE, node=0)  # numa_alloc_onnode, then memset '*'
    numa2 = p.mmap(PAGE_SIZE, node=1)
    p.write(numa1, b"*" * PAGE_SIZE)
    p.write(numa2, b"*" * PAGE_SIZE)
    ksm_merge_pages(k, p, numa1, PAGE_SIZE, KSM_MERGE_MADVISE)
    ksm_merge_pages(k, p, numa2, PAGE_SIZE, KSM_MERGE_MADVISE)
    assert_ksm_pages_count(k, 2 if merge_across_nodes else 0)
    assert shared_sharing(k) == expected
    assert int(k.sysfs["full_scans"]) >= 4


@pytest.mark.parametrize(("n", "expected"), [
    (10, (1, 9)),      # inventory: expect(10)
    (2, (1, 1)),       # inventory: expect(2)
    (257, (1, 255)),   # inventory: 257 mod 256 = 1, the leftover page has no partner
    (258, (2, 256)),   # inventory: expect(258)
    (1000, (4, 996)),  # 1000 = 3*256 + 232: S = 3 + 1 = 4, H = 1000 - 4 = 996
])
def test_ksm_tests_merge_expect_formula(n: int, expected: tuple[int, int]) -> None:
    """ksm_tests -M -p N: N identical pages give expect(N) with max_page_sharing 256."""
    k = SimKernel()
    ksm_tests_setup(k, n)
    assert k.sysfs["max_page_sharing"] == "256"
    assert expect(n) == expected
    p = k.spawn()
    addr = allocate_memory(p, n, ord("*"))
    ksm_merge_pages(k, p, addr, n * PAGE_SIZE, KSM_MERGE_MADVISE)
    assert_ksm_pages_count(k, n)
    assert shared_sharing(k) == expected
    # Two full scans, each handing every page to cmp_and_merge_page once.
    assert (k.sysfs["pages_scanned"], k.sysfs["full_scans"]) == (str(2 * n), "2")


def test_expect_formula_edge_values() -> None:
    """The inventory's expect() values for N = 0 and 1 (no merge possible)."""
    assert expect(0) == (0, 0)
    assert expect(1) == (0, 0)


# ---------------------------------------------------------------------------------------
# ksm_functional_tests.c
# ---------------------------------------------------------------------------------------

SIZE = 2 * MiB  # 512 pages
MADVISE, PRCTL, NONE = "madvise", "prctl", "none"


def init_global_file_handles(k: SimKernel) -> None:
    """Start-up: ksm_stop (run=2).  No tunable is set (pages_to_scan 100, sleep 20 ms remain)."""
    ksm_stop(k)


@pytest.fixture
def fk() -> SimKernel:
    """A fresh machine after the functional tests' start-up (kernel default tunables)."""
    k = SimKernel()
    assert (k.sysfs["pages_to_scan"], k.sysfs["sleep_millisecs"]) == ("100", "20")
    init_global_file_handles(k)
    return k


def mmap_and_merge_range(k: SimKernel, p: SimProcess, val: int, size: int, prot: int,
                         mode: str) -> int:
    """The shared helper: run=2, mmap, MADV_NOHUGEPAGE, memset, mprotect, advise, ksm_start."""
    ksm_stop(k)
    assert p.ksm_merging_pages() == 0, "Still pages merged"
    addr = p.mmap(size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS)
    p.madvise(addr, size, MADV_NOHUGEPAGE)
    p.write(addr, bytes([val]) * size)
    p.mprotect(addr, size, prot)
    if mode == PRCTL:
        p.prctl(PR_SET_MEMORY_MERGE, 1)
    elif mode == MADVISE:
        p.madvise(addr, size, MADV_MERGEABLE)
    merge(k, 2)  # ksm_start: full_scans is read before run=1 here
    if val:
        assert p.ksm_merging_pages() > 0, "Merging memory failed"
    return addr


def end_test(k: SimKernel, p: SimProcess, addr: int, size: int) -> None:
    """Every test of the newest copy ends with ksm_stop and munmap."""
    ksm_stop(k)
    p.munmap(addr, size)


def test_unmerge(fk: SimKernel) -> None:
    """test_unmerge: MADV_UNMERGEABLE over 2 MiB of merged 0xCF pages leaves no duplicates."""
    p = fk.spawn()
    addr = mmap_and_merge_range(fk, p, 0xCF, SIZE, PROT_READ | PROT_WRITE, MADVISE)
    # [background] with M=256 the 512 identical pages are 2 full KSM pages.
    assert shared_sharing(fk) == expect(512) == (2, 510)
    assert range_maps_duplicates(p, addr, SIZE)
    p.madvise(addr, SIZE, MADV_UNMERGEABLE)
    assert not range_maps_duplicates(p, addr, SIZE), "Pages were not unmerged"
    end_test(fk, p, addr, SIZE)


def test_unmerge_zero_pages(fk: SimKernel) -> None:
    """test_unmerge_zero_pages: KSM zero pages count 512, 256 after half unmerge, 0 after writes."""
    fk.sysfs["use_zero_pages"] = "1"
    p = fk.spawn()
    addr = mmap_and_merge_range(fk, p, 0x00, SIZE, PROT_READ | PROT_WRITE, MADVISE)
    assert p.ksm_stat()["ksm_zero_pages"] == SIZE // PAGE_SIZE == 512
    p.madvise(addr, SIZE // 2, MADV_UNMERGEABLE)
    assert p.ksm_stat()["ksm_zero_pages"] == 256
    for offs in range(SIZE // 2, SIZE, PAGE_SIZE):
        p.write(addr + offs, struct.pack("<I", offs))
    assert p.ksm_stat()["ksm_zero_pages"] == 0
    assert not range_maps_duplicates(p, addr, SIZE), "KSM zero pages were not unmerged"
    end_test(fk, p, addr, SIZE)


def test_unmerge_discarded(fk: SimKernel) -> None:
    """test_unmerge_discarded: unmerge copes with a MADV_DONTNEED hole in the first half."""
    p = fk.spawn()
    addr = mmap_and_merge_range(fk, p, 0xCF, SIZE, PROT_READ | PROT_WRITE, MADVISE)
    p.madvise(addr, SIZE // 2, MADV_DONTNEED)
    assert p.pfns(addr, SIZE // 2) == [None] * 256
    p.madvise(addr, SIZE, MADV_UNMERGEABLE)
    assert not range_maps_duplicates(p, addr, SIZE), "Pages were not unmerged"
    end_test(fk, p, addr, SIZE)


def test_prot_none(fk: SimKernel) -> None:
    """test_prot_none: PROT_NONE pages merge; forced writes and MADV_UNMERGEABLE unmerge them."""
    p = fk.spawn()
    addr = mmap_and_merge_range(fk, p, 0x11, SIZE, PROT_NONE, MADVISE)
    # Store an int (the byte offset) at the start of each page of the first half,
    # through /proc/self/mem: ptrace-style access that ignores PROT_NONE.
    for offs in range(0, SIZE // 2, PAGE_SIZE):
        p.write(addr + offs, struct.pack("<I", offs), force=True)
    p.madvise(addr + SIZE // 2, SIZE // 2, MADV_UNMERGEABLE)
    assert not range_maps_duplicates(p, addr, SIZE), "Pages were not unmerged"
    end_test(fk, p, addr, SIZE)


def test_prctl(fk: SimKernel) -> None:
    """test_prctl: setting and clearing PR_SET_MEMORY_MERGE reads back 1, then 0."""
    p = fk.spawn()
    assert p.prctl(PR_SET_MEMORY_MERGE, 1) == 0
    assert p.prctl(PR_GET_MEMORY_MERGE) == 1
    assert p.prctl(PR_SET_MEMORY_MERGE, 0) == 0
    assert p.prctl(PR_GET_MEMORY_MERGE) == 0


def child_check(k: SimKernel, child: SimProcess) -> None:
    """The child side of test_prctl_fork and of ``ksm_fork_exec_child``.

    An inherited merge-any flag must make a new, never-advised area merge.
    """
    init_global_file_handles(k)
    assert child.prctl(PR_GET_MEMORY_MERGE) == 1  # exit code 1 otherwise
    addr = mmap_and_merge_range(k, child, 0xCF, SIZE, PROT_READ | PROT_WRITE, NONE)
    assert [e.mergeable for e in child.smaps() if e.start == addr] == [True]
    assert child.ksm_merging_pages() > 0  # exit code 2 otherwise
    ksm_stop(k)
    child.munmap(addr, SIZE)
    child.exit()



def test_prctl_fork(fk: SimKernel) -> None:
    """test_prctl_fork: PR_SET_MEMORY_MERGE is inherited by a forked child, whose new area merges."""
    p = fk.spawn()
    p.prctl(PR_SET_MEMORY_MERGE, 1)
    child = p.fork()
    child_check(fk, child)
    p.prctl(PR_SET_MEMORY_MERGE, 0)
    assert p.prctl(PR_GET_MEMORY_MERGE) == 0


def test_prctl_fork_exec(fk: SimKernel) -> None:
    """test_prctl_fork_exec: PR_SET_MEMORY_MERGE survives fork and then execve."""
    fk.sysfs["run"] = "1"
    fk.sysfs["pages_to_scan"] = "2000"
    fk.sysfs["sleep_millisecs"] = "0"
    p = fk.spawn()
    p.prctl(PR_SET_MEMORY_MERGE, 1)
    child = p.fork()
    child.exec()  # execv("./ksm_functional_tests", "ksm_fork_exec_child")
    assert child.smaps() == []
    child_check(fk, child)
    p.prctl(PR_SET_MEMORY_MERGE, 0)
    fk.sysfs["run"] = "2"
    fk.sysfs["pages_to_scan"] = "100"
    fk.sysfs["sleep_millisecs"] = "20"
    assert p.prctl(PR_GET_MEMORY_MERGE) == 0


def test_prctl_unmerge(fk: SimKernel) -> None:
    """test_prctl_unmerge: clearing merge-any unmerges the areas prctl made mergeable."""
    p = fk.spawn()
    addr = mmap_and_merge_range(fk, p, 0xCF, SIZE, PROT_READ | PROT_WRITE, PRCTL)
    assert range_maps_duplicates(p, addr, SIZE)
    p.prctl(PR_SET_MEMORY_MERGE, 0)
    assert not range_maps_duplicates(p, addr, SIZE), "Pages were not unmerged"
    stat = p.ksm_stat()
    assert (stat["ksm_merge_any"], stat["ksm_mergeable"]) == (False, False)
    end_test(fk, p, addr, SIZE)


def test_fork_ksm_merging_page_count(fk: SimKernel) -> None:
    """test_fork_ksm_merging_page_count: a forked child's ksm_merging_pages is 0."""
    p = fk.spawn()
    addr = mmap_and_merge_range(fk, p, 0xCF, SIZE, PROT_READ | PROT_WRITE, MADVISE)
    parent_count = p.ksm_merging_pages()
    assert parent_count == 512  # every page of the range is a KSM mapping
    child = p.fork()
    # Stronger than the selftest (whose child runs run=2 first): 0 right after fork.
    assert child.ksm_merging_pages() == 0
    init_global_file_handles(fk)  # the child's start-up: run=2
    status = child.ksm_merging_pages()
    child.exit()
    assert status == 0, "ksm_merging_pages is not inherited after fork"
    end_test(fk, p, addr, SIZE)
