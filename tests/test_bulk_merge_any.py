"""prctl(PR_SET_MEMORY_MERGE / PR_GET_MEMORY_MERGE), fork and exec on the bulk engine.

Each test runs on both paths of the bulk engine and on SimKernel in both
content modes, and asserts values from arithmetic or from the real kernel
(docs/kernel-behaviour.md sections 2.1 to 2.7, whose "verified" facts were
checked on Linux 6.18).  The random lockstep programs of tests/test_bulk.py
cover the same calls step by step against SimKernel.
"""

from __future__ import annotations

import errno
from collections.abc import Callable

import pytest

from bulk_programs import canonical, counters, page
from helpers import raises_errno
from ksmlab import MADV_MERGEABLE, MADV_UNMERGEABLE, PAGE_SIZE, SimKernel
from ksmlab.bulk import BulkKernel
from ksmlab.constants import PR_GET_MEMORY_MERGE, PR_SET_MEMORY_MERGE
from ksmlab.errors import ScanStalledError

P = PAGE_SIZE
Kernel = SimKernel | BulkKernel

ENGINES: dict[str, Callable[[], Kernel]] = {
    "bulk-vector": lambda: BulkKernel(),
    "bulk-per-page": lambda: BulkKernel(vectorize=False),
    "sim-bytes": lambda: SimKernel(trace=False),
    "sim-fingerprint": lambda: SimKernel(trace=False, content="fingerprint"),
}


@pytest.fixture(params=list(ENGINES))
def k(request: pytest.FixtureRequest) -> Kernel:
    kernel = ENGINES[request.param]()
    kernel.sysfs["pages_to_scan"] = "100"
    kernel.sysfs["sleep_millisecs"] = "0"
    return kernel


def shared_sharing(k: Kernel) -> tuple[int, int]:
    return int(k.sysfs["pages_shared"]), int(k.sysfs["pages_sharing"])


def check(k: Kernel) -> None:
    """The bulk engine's invariant check (canonical runs it)."""
    if isinstance(k, BulkKernel):
        canonical(k)


def test_merge_any_marks_old_and_new_mappings(k: Kernel) -> None:
    """Enabling marks every mapping, later ones are born mergeable (2.6, 2.7): 12 identical
    pages, never madvised, become 1 KSM page of 12 mappings.  A second enable does nothing,
    so an area unmarked since stays so; disabling unmerges and unmarks everything."""
    p = k.spawn()
    a = p.mmap(8 * P)
    p.write(a, page(5) * 8)
    assert p.prctl(PR_GET_MEMORY_MERGE) == 0
    assert p.prctl(PR_SET_MEMORY_MERGE, 7) == 0  # any non-zero arg2 enables (verified)
    assert p.prctl(PR_GET_MEMORY_MERGE) == 1
    b = p.mmap(4 * P)
    p.write(b, page(5) * 4)
    assert (p.ksm_stat()["ksm_merge_any"], p.ksm_stat()["ksm_mergeable"]) == (True, True)
    k.sysfs["run"] = "1"
    k.wait_full_scans(2)
    assert shared_sharing(k) == (1, 11)
    assert p.ksm_merging_pages() == 12
    p.madvise(b, 4 * P, MADV_UNMERGEABLE)
    k.wait_full_scans(1)  # ksmd drops b's items: 8 mappings left
    assert shared_sharing(k) == (1, 7)
    assert p.prctl(PR_SET_MEMORY_MERGE, 1) == 0  # already on: b stays unmarked
    k.wait_full_scans(2)
    assert shared_sharing(k) == (1, 7)
    assert p.prctl(PR_SET_MEMORY_MERGE, 0) == 0
    stat = p.ksm_stat()
    assert (stat["ksm_merge_any"], stat["ksm_mergeable"]) == (False, False)
    assert p.prctl(PR_GET_MEMORY_MERGE) == 0
    k.wait_full_scans(1)  # the items go with the last mergeable area; so does the slot
    assert shared_sharing(k) == (0, 0)
    assert p.ksm_stat()["ksm_rmap_items"] == 0
    with pytest.raises(ScanStalledError):
        k.wait_full_scans(1)  # nothing registered any more
    check(k)


def test_disable_without_merge_any_leaves_madvised_areas(k: Kernel) -> None:
    """Disable when merge-any is off returns 0 and changes nothing (2.6, verified)."""
    p = k.spawn()
    a = p.mmap(4 * P)
    p.write(a, page(6) * 4)
    p.madvise(a, 4 * P, MADV_MERGEABLE)
    k.sysfs["run"] = "1"
    k.wait_full_scans(2)
    assert p.prctl(PR_SET_MEMORY_MERGE, 0) == 0
    k.wait_full_scans(1)
    assert shared_sharing(k) == (1, 3)
    assert p.ksm_stat()["ksm_mergeable"] is True


def test_fork_and_exec_keep_merge_any(k: Kernel) -> None:
    """Fork inherits merge-any and the marks (the child starts with no items, 2.4); exec
    gives an empty address space that keeps merge-any and is registered again (2.5), so
    the exec'd child's new pages merge with the parent's: 8 mappings of one KSM page."""
    p = k.spawn()
    p.prctl(PR_SET_MEMORY_MERGE, 1)
    a = p.mmap(4 * P)
    p.write(a, page(9) * 4)
    k.sysfs["run"] = "1"
    k.wait_full_scans(2)
    assert shared_sharing(k) == (1, 3)
    k.sysfs["run"] = "0"
    c = p.fork()
    assert c.prctl(PR_GET_MEMORY_MERGE) == 1
    stat = c.ksm_stat()
    assert (stat["ksm_merge_any"], stat["ksm_mergeable"], stat["ksm_rmap_items"],
            stat["ksm_merging_pages"]) == (True, True, 0, 0)
    c.exec()
    assert c.prctl(PR_GET_MEMORY_MERGE) == 1
    assert c.ksm_stat() == {"ksm_rmap_items": 0, "ksm_zero_pages": 0, "ksm_merging_pages": 0,
                            "ksm_process_profit": 0, "ksm_merge_any": True,
                            "ksm_mergeable": False}
    b = c.mmap(4 * P)
    assert b == a  # a fresh address space places its first mapping where p's went
    assert c.ksm_stat()["ksm_mergeable"] is True
    c.write(b, page(9) * 4)
    k.sysfs["run"] = "1"
    k.wait_full_scans(2)
    assert shared_sharing(k) == (1, 7)
    assert (p.ksm_merging_pages(), c.ksm_merging_pages()) == (4, 4)
    check(k)


def test_exec_tears_down_as_exit(k: Kernel) -> None:
    """Without merge-any, the exec'd mm is not registered and its madvised areas are gone;
    the old mm's items stay counted until ksmd reaches it, as after exit with run=0 (2.3,
    2.5, verified)."""
    p, q = k.spawn(), k.spawn()
    for proc in (p, q):
        a = proc.mmap(4 * P)
        proc.write(a, page(3) * 4)
        proc.madvise(a, 4 * P, MADV_MERGEABLE)
    k.sysfs["run"] = "1"
    k.wait_full_scans(2)
    assert shared_sharing(k) == (1, 7)
    k.sysfs["run"] = "0"
    q.exec()
    assert shared_sharing(k) == (1, 7)  # stale until ksmd reaps the old mm
    assert q.ksm_stat() == {"ksm_rmap_items": 0, "ksm_zero_pages": 0, "ksm_merging_pages": 0,
                            "ksm_process_profit": 0, "ksm_merge_any": False,
                            "ksm_mergeable": False}
    b = q.mmap(4 * P)
    q.write(b, page(3) * 4)
    assert q.ksm_stat()["ksm_mergeable"] is False  # not merge-any: born unmergeable
    k.sysfs["run"] = "1"
    k.wait_full_scans(1)
    assert shared_sharing(k) == (1, 3)
    check(k)


def test_merge_any_registers_again_after_slot_dropped(k: Kernel) -> None:
    """ksmd drops the slot of an mm with nothing mergeable; merge-any survives (6.18), a
    second enable does not register, but a new mapping does (2.1, 2.6, 2.7); so does a fork
    child's inheritance of the flag whether or not the parent is registered (2.4)."""
    p = k.spawn()
    p.prctl(PR_SET_MEMORY_MERGE, 1)
    a = p.mmap(P)
    k.sysfs["run"] = "1"
    k.wait_full_scans(1)
    p.madvise(a, P, MADV_UNMERGEABLE)
    k.wait_full_scans(1)  # the slot is dropped
    assert p.prctl(PR_SET_MEMORY_MERGE, 1) == 0
    with pytest.raises(ScanStalledError):
        k.wait_full_scans(1)
    assert p.prctl(PR_GET_MEMORY_MERGE) == 1
    assert p.fork().prctl(PR_GET_MEMORY_MERGE) == 1
    b = p.mmap(4 * P)
    p.write(b, page(4) * 4)
    k.wait_full_scans(2)
    assert shared_sharing(k) == (1, 3)
    check(k)


@pytest.mark.parametrize("args", [
    (PR_SET_MEMORY_MERGE, 1, 1), (PR_SET_MEMORY_MERGE, 0, 0, 0, 1), (PR_GET_MEMORY_MERGE, 1),
    (PR_GET_MEMORY_MERGE, 0, 0, 1), (12345,), (-1,),
], ids=str)
def test_prctl_einval_changes_nothing(k: Kernel, args: tuple[int, ...]) -> None:
    """A non-zero unused argument is EINVAL (2.6, verified), an option other than the two
    too; merge-any stays off."""
    p = k.spawn()
    p.mmap(2 * P)
    with raises_errno(errno.EINVAL):
        p.prctl(*args)
    assert p.prctl(PR_GET_MEMORY_MERGE) == 0
    assert (p.ksm_stat()["ksm_merge_any"], p.ksm_stat()["ksm_mergeable"]) == (False, False)


def test_emptied_chain_is_kept_until_searched(k: Kernel) -> None:
    """4 identical pages with max_page_sharing 2: a chain of 2 KSM pages of 2 mappings.
    Once their process exits and ksmd reaps it, the dups are gone but the emptied chain
    stays until a search for its content (on Linux 6.18: stable_node_chains 1,
    stable_node_dups 0, run by hand with LinuxKernel)."""
    k.sysfs["max_page_sharing"] = "2"
    c = k.spawn().fork()
    a = c.mmap(4 * P)
    c.write(a, page(4444) * 4)
    c.madvise(a, 4 * P, MADV_MERGEABLE)
    k.sysfs["run"] = "1"
    k.wait_full_scans(3)
    names = ("pages_shared", "pages_sharing", "stable_node_chains", "stable_node_dups")
    assert counters(k, names) == dict(zip(names, "2212", strict=True))
    c.exit()
    k.wait_full_scans(1)
    assert counters(k, names) == dict(zip(names, "0010", strict=True))
    check(k)  # the bulk engine's invariant check used to fail on an empty chain
