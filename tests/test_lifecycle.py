# SPDX-License-Identifier: GPL-2.0-only
"""Process lifecycle and KSM: fork, exit, exec and prctl(PR_SET_MEMORY_MERGE).

Expected values come from ``docs/kernel-behaviour.md`` sections 2 (mm-level
state, lifecycle, prctl), 4 (counters), 6 (edge cases) and 7 (traces), or
from arithmetic shown next to them.
"""

from __future__ import annotations

import errno

import pytest

from helpers import counters, fill, merge, page_of, raises_errno, shared_sharing
from ksmlab import (
    MADV_MERGEABLE,
    MADV_UNMERGEABLE,
    MAP_ANONYMOUS,
    MAP_SHARED,
    PAGE_SIZE,
    PR_GET_MEMORY_MERGE,
    PR_SET_MEMORY_MERGE,
    PROT_READ,
    PROT_WRITE,
    ProcessExitedError,
    ScanStalledError,
    SimKernel,
    SimProcess,
)

RW = PROT_READ | PROT_WRITE


def merged_process(k: SimKernel, npages: int = 10, byte: int = ord("*")) -> tuple[SimProcess, int]:
    """A process with *npages* identical pages, advised and merged (two full scans)."""
    p = k.spawn()
    a = p.mmap(npages * PAGE_SIZE)
    fill(p, a, npages, byte)
    p.madvise(a, npages * PAGE_SIZE, MADV_MERGEABLE)
    merge(k)
    return p, a


def mg(p: SimProcess) -> list[bool]:
    """VM_MERGEABLE of each vma, in address order."""
    return [e.mergeable for e in p.smaps()]


# --- callouts (include/linux/ksm.h: the hooks test MMF_VM_MERGEABLE first) ------------------------

def test_no_callouts_for_never_advised_process(kernel: SimKernel) -> None:
    """fork and exit of an mm without MMF_VM_MERGEABLE never call into KSM (2.3, 2.4)."""
    p = kernel.spawn()
    a = p.mmap(4 * PAGE_SIZE)
    fill(p, a, 4, ord("n"))
    child = p.fork()
    child.exit()
    grandchild = p.fork()
    grandchild.exec()
    grandchild.exit()
    p.exit()
    assert kernel.ksm.callouts == {"ksm_fork": 0, "ksm_exit": 0, "ksm_execve": 0}


def test_callouts_for_registered_process(kernel: SimKernel) -> None:
    """A registered mm calls ksm_fork once per fork and ksm_exit once per exit; the child is
    registered too, so its exit calls out as well (2.3, 2.4)."""
    p = kernel.spawn()
    a = p.mmap(4 * PAGE_SIZE)
    p.madvise(a, 4 * PAGE_SIZE, MADV_MERGEABLE)
    child = p.fork()
    assert kernel.ksm.callouts == {"ksm_fork": 1, "ksm_exit": 0, "ksm_execve": 0}
    child.exit()
    p.exit()
    assert kernel.ksm.callouts == {"ksm_fork": 1, "ksm_exit": 2, "ksm_execve": 0}


# --- fork ------------------------------------------------------------------------------------------

def test_fork_of_merged_process(kernel: SimKernel) -> None:
    """Fork of a merged mm (6, the verified 297-style case, with our own numbers).

    Parent: 200 pages 'A' and one page 'U', smart_scan 0.  After 2 scans:
    shared 1, sharing 199 (one KSM page with 200 mappings), unshared 1 ('U').
    The child starts with rmap_items 0 and merging_pages 0 and global counters
    do not move until ksmd scans it.  One scan later each of its 200 KSM
    mappings is appended to the same node, past max_page_sharing (256):
    sharing 199 + 200 = 399, shared still 1.  Its copy of 'U' is the parent's
    own page, never merged with its twin: volatile 1 (first visit), and still
    volatile a scan later (the unstable tree refuses the same physical page).
    After the child exits, one scan later everything is as before the fork.
    """
    k = kernel
    k.sysfs["smart_scan"] = "0"
    p = k.spawn()
    a = p.mmap(201 * PAGE_SIZE)
    fill(p, a, 200, ord("A"))
    p.write(a + 200 * PAGE_SIZE, page_of(ord("U")))
    p.madvise(a, 201 * PAGE_SIZE, MADV_MERGEABLE)
    merge(k)
    before = counters(k, "pages_shared", "pages_sharing", "pages_unshared", "pages_volatile")
    assert before == {"pages_shared": 1, "pages_sharing": 199, "pages_unshared": 1,
                      "pages_volatile": 0}
    child = p.fork()
    stat = child.ksm_stat()
    assert (stat["ksm_rmap_items"], stat["ksm_merging_pages"], stat["ksm_zero_pages"]) == (0, 0, 0)
    assert child.ksm_merging_pages() == 0
    assert p.ksm_merging_pages() == 200
    assert counters(k, *before) == before  # nothing until ksmd scans the child
    assert [e.ksm for e in child.smaps()] == [200 * PAGE_SIZE]  # it maps the KSM page
    k.wait_full_scans(1)
    assert counters(k, *before) == {"pages_shared": 1, "pages_sharing": 399,
                                    "pages_unshared": 1, "pages_volatile": 1}
    assert child.ksm_stat()["ksm_rmap_items"] == 201
    assert child.ksm_merging_pages() == 200
    # general_profit = sharing * 4096 - rmap_items * 64 = 399*4096 - 402*64
    assert int(k.sysfs["general_profit"]) == 399 * 4096 - 402 * 64 == 1_608_576
    k.wait_full_scans(1)
    assert counters(k, *before) == {"pages_shared": 1, "pages_sharing": 399,
                                    "pages_unshared": 1, "pages_volatile": 1}
    child.exit()
    assert counters(k, *before) == {"pages_shared": 1, "pages_sharing": 399,
                                    "pages_unshared": 1, "pages_volatile": 1}
    k.wait_full_scans(1)
    assert counters(k, *before) == before
    assert p.ksm_stat()["ksm_rmap_items"] == 201


def test_fork_writes_are_private(kernel: SimKernel) -> None:
    """After fork, writes to merged pages in parent and child COW; each reads back its own bytes (3.10)."""
    p, a = merged_process(kernel, 4, ord("*"))
    child = p.fork()
    cow = kernel.cow_ksm
    p.write(a, b"parent")
    child.write(a, b"child!")
    child.write(a + PAGE_SIZE, b"C")
    assert kernel.cow_ksm == cow + 3  # every write to a KSM page COWs
    assert p.read(a, PAGE_SIZE) == page_of(b"parent")
    assert child.read(a, PAGE_SIZE) == page_of(b"child!")
    assert p.read(a + PAGE_SIZE, PAGE_SIZE) == page_of(ord("*"))
    assert child.read(a + PAGE_SIZE, PAGE_SIZE) == page_of(b"C")
    assert p.read(a + 2 * PAGE_SIZE, 2 * PAGE_SIZE) == child.read(a + 2 * PAGE_SIZE, 2 * PAGE_SIZE)


def test_fork_of_unmerged_process_copies_content(kernel: SimKernel) -> None:
    """A child sees the parent's bytes, and later writes on either side stay private."""
    p = kernel.spawn()
    a = p.mmap(2 * PAGE_SIZE)
    p.write(a, b"hello")
    child = p.fork()
    p.write(a, b"HELLO")
    assert child.read(a, 5) == b"hello"
    assert p.read(a, 5) == b"HELLO"


# --- exit ------------------------------------------------------------------------------------------

def test_exit_with_run_0_leaves_counters_stale(kernel: SimKernel) -> None:
    """Exit with run=0: counters stay as they were until run=1 and one scan (2.3, verified)."""
    p, _ = merged_process(kernel, 10)
    assert shared_sharing(kernel) == (1, 9)
    kernel.sysfs["run"] = "0"
    p.exit()
    kernel.advance(60_000)
    assert shared_sharing(kernel) == (1, 9)
    assert int(kernel.sysfs["pages_volatile"]) == 0
    merge(kernel, 1)
    assert shared_sharing(kernel) == (0, 0)
    assert counters(kernel, "pages_unshared", "pages_volatile", "general_profit") == {
        "pages_unshared": 0, "pages_volatile": 0, "general_profit": 0}


def test_exit_then_one_scan_returns_to_zero(kernel: SimKernel) -> None:
    """Exit, one scan: every counter is 0 and full_scans stops, the list being empty (7 trace 1)."""
    p, _ = merged_process(kernel, 4)
    assert shared_sharing(kernel) == (1, 3)
    p.exit()
    assert shared_sharing(kernel) == (1, 3)  # ksmd has not reached the slot yet
    kernel.wait_full_scans(1)
    c = counters(kernel)
    assert (c["pages_shared"], c["pages_sharing"], c["pages_unshared"], c["pages_volatile"],
            c["general_profit"]) == (0, 0, 0, 0, 0)
    full = c["full_scans"]
    with pytest.raises(ScanStalledError):
        kernel.wait_full_scans(1)
    kernel.advance(1000)
    assert int(kernel.sysfs["full_scans"]) == full


def test_exit_of_process_without_items_frees_slot_at_once(kernel: SimKernel) -> None:
    """A registered mm with no items is unregistered at exit itself (2.3): ksmd goes idle."""
    p = kernel.spawn()
    a = p.mmap(4 * PAGE_SIZE)
    p.madvise(a, 4 * PAGE_SIZE, MADV_MERGEABLE)
    p.exit()
    kernel.sysfs["run"] = "1"
    with pytest.raises(ScanStalledError):
        kernel.wait_full_scans(1)


def test_operations_on_exited_process_raise(kernel: SimKernel) -> None:
    """Every call on an exited process raises ProcessExitedError."""
    p = kernel.spawn()
    a = p.mmap(4 * PAGE_SIZE)
    p.exit()
    assert not p.alive
    calls = [
        lambda: p.mmap(PAGE_SIZE),
        lambda: p.munmap(a, PAGE_SIZE),
        lambda: p.mprotect(a, PAGE_SIZE, PROT_READ),
        lambda: p.madvise(a, PAGE_SIZE, MADV_MERGEABLE),
        lambda: p.prctl(PR_GET_MEMORY_MERGE),
        lambda: p.write(a, b"x"),
        lambda: p.read(a, 1),
        lambda: p.fork(),
        lambda: p.exec(),
        lambda: p.exit(),
        lambda: p.ksm_stat(),
        lambda: p.ksm_merging_pages(),
        lambda: p.smaps(),
        lambda: p.pfns(a, PAGE_SIZE),
    ]
    for call in calls:
        with pytest.raises(ProcessExitedError):
            call()


# --- exec ------------------------------------------------------------------------------------------

def test_exec_gives_empty_address_space(kernel: SimKernel) -> None:
    """exec: a new, empty mm; MMF_VM_MERGEABLE and madvised areas do not survive (2.5)."""
    p = kernel.spawn()
    a = p.mmap(4 * PAGE_SIZE)
    fill(p, a, 4, ord("e"))
    p.madvise(a, 4 * PAGE_SIZE, MADV_MERGEABLE)
    p.exec()
    assert p.smaps() == []
    assert p.pfns(a, 4 * PAGE_SIZE) == [None] * 4
    stat = p.ksm_stat()
    assert stat == {"ksm_rmap_items": 0, "ksm_zero_pages": 0, "ksm_merging_pages": 0,
                    "ksm_process_profit": 0, "ksm_merge_any": False, "ksm_mergeable": False}
    assert kernel.ksm.callouts["ksm_execve"] == 0  # not MERGE_ANY: the new mm is not registered
    with raises_errno(errno.EFAULT):
        p.read(a, 1)
    b = p.mmap(4 * PAGE_SIZE)
    assert mg(p) == [False]
    assert p.read(b, 4 * PAGE_SIZE) == bytes(4 * PAGE_SIZE)  # fresh memory, not the old 'e's


# --- prctl (2.6, 2.7) --------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [(1, 1), (1, 0, 1), (1, 0, 0, 1), (0, 1), (0, 0, 0, 1)])
def test_prctl_set_extra_args_einval(kernel: SimKernel, args: tuple[int, ...]) -> None:
    """PR_SET_MEMORY_MERGE with a non-zero arg3, arg4 or arg5 is EINVAL (2.6, verified)."""
    p = kernel.spawn()
    with raises_errno(errno.EINVAL):
        p.prctl(PR_SET_MEMORY_MERGE, *args)
    assert p.prctl(PR_GET_MEMORY_MERGE) == 0


@pytest.mark.parametrize("args", [(1,), (0, 1), (0, 0, 1), (0, 0, 0, 1)])
def test_prctl_get_extra_args_einval(kernel: SimKernel, args: tuple[int, ...]) -> None:
    """PR_GET_MEMORY_MERGE with any non-zero argument is EINVAL (2.6, verified)."""
    p = kernel.spawn()
    with raises_errno(errno.EINVAL):
        p.prctl(PR_GET_MEMORY_MERGE, *args)


def test_prctl_enable_any_nonzero(kernel: SimKernel) -> None:
    """Any non-zero arg2 enables merge-any (7 works, verified) and marks existing vmas (2.6)."""
    p = kernel.spawn()
    p.mmap(4 * PAGE_SIZE)
    assert p.prctl(PR_SET_MEMORY_MERGE, 7) == 0
    assert p.prctl(PR_GET_MEMORY_MERGE) == 1
    assert mg(p) == [True]
    assert p.ksm_stat()["ksm_merge_any"] is True


def test_prctl_enable_marks_in_place_without_merging_vmas(kernel: SimKernel) -> None:
    """Enabling sets VM_MERGEABLE on each vma in place: no split and no merge (2.6)."""
    p = kernel.spawn()
    a = p.mmap(4 * PAGE_SIZE)
    p.madvise(a, 2 * PAGE_SIZE, MADV_MERGEABLE)
    assert mg(p) == [True, False]
    p.prctl(PR_SET_MEMORY_MERGE, 1)
    assert mg(p) == [True, True]  # still two vmas


def test_prctl_enable_is_idempotent(kernel: SimKernel) -> None:
    """A second enable does nothing: vmas un-marked since are not re-marked (2.6)."""
    p = kernel.spawn()
    a = p.mmap(4 * PAGE_SIZE)
    b = p.mmap(4 * PAGE_SIZE)
    p.prctl(PR_SET_MEMORY_MERGE, 1)
    p.madvise(b, 4 * PAGE_SIZE, MADV_UNMERGEABLE)
    before = p.smaps()
    assert [e.mergeable for e in before] == [False, True]  # b is below a
    assert p.prctl(PR_SET_MEMORY_MERGE, 1) == 0
    assert p.smaps() == before
    assert a > b


def test_prctl_disable_when_not_set_is_noop(kernel: SimKernel) -> None:
    """Disable without merge-any returns 0 and leaves madvised vmas mg and merged (2.6, verified)."""
    p, a = merged_process(kernel, 4)
    before = p.smaps()
    assert p.prctl(PR_SET_MEMORY_MERGE, 0) == 0
    assert p.smaps() == before
    assert mg(p) == [True]
    assert p.pfns(a, 4 * PAGE_SIZE).count(p.pfns(a, PAGE_SIZE)[0]) == 4  # still merged


def test_prctl_disable_unmerges_everything(kernel: SimKernel) -> None:
    """Disable un-merges and un-marks every mg vma, madvised ones included (2.6, verified)."""
    p = kernel.spawn()
    a = p.mmap(4 * PAGE_SIZE)
    fill(p, a, 4, ord("d"))
    p.prctl(PR_SET_MEMORY_MERGE, 1)
    b = p.mmap(4 * PAGE_SIZE, RW, MAP_SHARED | MAP_ANONYMOUS)
    merge(kernel)
    assert shared_sharing(kernel) == (1, 3)
    cow = kernel.cow_ksm
    assert p.prctl(PR_SET_MEMORY_MERGE, 0) == 0
    assert kernel.cow_ksm == cow + 4
    assert len(set(p.pfns(a, 4 * PAGE_SIZE))) == 4
    stat = p.ksm_stat()
    assert (stat["ksm_merge_any"], stat["ksm_mergeable"]) == (False, False)
    assert mg(p) == [False, False]
    assert b < a


def test_prctl_enable_registration_failure_enomem(kernel: SimKernel) -> None:
    """If __ksm_enter fails, prctl returns ENOMEM unconverted and merge-any stays off (2.6)."""
    p = kernel.spawn()
    p.mmap(4 * PAGE_SIZE)
    kernel.slab.limit = 0
    with raises_errno(errno.ENOMEM):
        p.prctl(PR_SET_MEMORY_MERGE, 1)
    assert p.prctl(PR_GET_MEMORY_MERGE) == 0
    assert mg(p) == [False]


def test_merge_any_inherited_on_fork_and_exec(kernel: SimKernel) -> None:
    """MMF_VM_MERGE_ANY is in MMF_INIT_MASK: kept by fork and by exec (2.1, 2.4, 2.5, verified)."""
    p = kernel.spawn()
    p.prctl(PR_SET_MEMORY_MERGE, 1)
    child = p.fork()
    assert child.prctl(PR_GET_MEMORY_MERGE) == 1
    child.exec()
    assert child.prctl(PR_GET_MEMORY_MERGE) == 1
    assert kernel.ksm.callouts["ksm_execve"] == 1  # the new mm registers at exec
    a = child.mmap(4 * PAGE_SIZE)
    fill(child, a, 4, ord("x"))
    assert mg(child) == [True]
    merge(kernel)
    assert child.ksm_merging_pages() == 4


def test_merge_any_inherited_by_unregistered_parent(kernel: SimKernel) -> None:
    """The flag is inherited whether or not the parent is on ksmd's list (2.4, verified)."""
    p = kernel.spawn()
    p.prctl(PR_SET_MEMORY_MERGE, 1)
    p.mmap(PAGE_SIZE)
    merge(kernel, 1)  # registered by the prctl; the mg vma keeps the slot
    p.munmap(p.smaps()[0].start, PAGE_SIZE)
    kernel.wait_full_scans(1)  # no mg vma left: ksmd drops the slot, MERGE_ANY survives (6.18)
    assert p.prctl(PR_GET_MEMORY_MERGE) == 1
    child = p.fork()
    assert kernel.ksm.callouts["ksm_fork"] == 0  # the parent was not registered
    assert child.prctl(PR_GET_MEMORY_MERGE) == 1


def test_new_mmap_in_merge_any_process(kernel: SimKernel) -> None:
    """A new anonymous private mmap of a MERGE_ANY process is mg; a shared one is not (2.7, verified)."""
    p = kernel.spawn()
    p.prctl(PR_SET_MEMORY_MERGE, 1)
    priv = p.mmap(4 * PAGE_SIZE)
    shared = p.mmap(4 * PAGE_SIZE, RW, MAP_SHARED | MAP_ANONYMOUS)
    flags = {e.start: e.mergeable for e in p.smaps()}
    assert flags == {priv: True, shared: False}


def test_merge_any_reregisters_after_slot_dropped(kernel: SimKernel) -> None:
    """After ksmd dropped the slot, a new mmap registers the MERGE_ANY mm again and merges (2.1, 2.7)."""
    p = kernel.spawn()
    p.prctl(PR_SET_MEMORY_MERGE, 1)
    a = p.mmap(PAGE_SIZE)
    merge(kernel, 1)
    p.munmap(a, PAGE_SIZE)
    kernel.wait_full_scans(1)  # slot dropped
    with pytest.raises(ScanStalledError):
        kernel.wait_full_scans(1)
    b = p.mmap(4 * PAGE_SIZE)
    fill(p, b, 4, ord("r"))
    assert mg(p) == [True]
    merge(kernel)
    assert shared_sharing(kernel) == (1, 3)


# --- CONFIG_KSM=n --------------------------------------------------------------------------------------

def test_config_ksm_off() -> None:
    """Without CONFIG_KSM: both prctl options are EINVAL and /sys/kernel/mm/ksm does not exist (2.6)."""
    k = SimKernel(config_ksm=False)
    p = k.spawn()
    for option, arg in ((PR_SET_MEMORY_MERGE, 1), (PR_SET_MEMORY_MERGE, 0), (PR_GET_MEMORY_MERGE, 0)):
        with raises_errno(errno.EINVAL):
            p.prctl(option, arg)
    with raises_errno(errno.ENOENT):
        _ = k.sysfs
    child = p.fork()
    child.exit()
    p.exit()
    assert k.ksm.callouts == {"ksm_fork": 0, "ksm_exit": 0, "ksm_execve": 0}


def test_prctl_disable_failure_remarks_everything(kernel: SimKernel) -> None:
    """If an un-merge fails, disable re-marks every compatible vma, keeps merge-any and
    returns ENOMEM unconverted (2.6)."""
    p = kernel.spawn()
    hi = p.mmap(2 * PAGE_SIZE)
    fill(p, hi, 2, ord("q"))
    lo = p.mmap(2 * PAGE_SIZE, PROT_READ)  # a separate vma, below
    p.prctl(PR_SET_MEMORY_MERGE, 1)
    p.madvise(lo, 2 * PAGE_SIZE, MADV_UNMERGEABLE)
    assert mg(p) == [False, True]
    merge(kernel)
    assert shared_sharing(kernel) == (1, 1)
    kernel.phys.max_frames = kernel.phys.nr_frames
    with raises_errno(errno.ENOMEM):
        p.prctl(PR_SET_MEMORY_MERGE, 0)
    assert p.prctl(PR_GET_MEMORY_MERGE) == 1
    assert mg(p) == [True, True]  # ksm_add_vmas marks the madvised-off vma too


def test_exec_registration_failure_enomem(kernel: SimKernel) -> None:
    """exec of a MERGE_ANY process fails with ENOMEM if __ksm_enter fails; the old mm stays (2.5)."""
    p = kernel.spawn()
    a = p.mmap(PAGE_SIZE)
    p.write(a, b"old")
    p.prctl(PR_SET_MEMORY_MERGE, 1)
    kernel.slab.limit = 0
    with raises_errno(errno.ENOMEM):
        p.exec()
    assert p.read(a, 3) == b"old"
    assert p.prctl(PR_GET_MEMORY_MERGE) == 1


def test_merge_any_mmap_mergeable_even_if_reregistration_fails(kernel: SimKernel) -> None:
    """A new mmap of a MERGE_ANY mm whose slot ksmd dropped is mg even if __ksm_enter fails:
    ksm_vma_flags ignores its result (2.7; upstream "ksm: fix exec/fork inheritance")."""
    p = kernel.spawn()
    p.prctl(PR_SET_MEMORY_MERGE, 1)
    a = p.mmap(PAGE_SIZE)
    merge(kernel, 1)
    p.munmap(a, PAGE_SIZE)
    kernel.wait_full_scans(1)  # slot dropped
    kernel.slab.limit = 0
    p.mmap(4 * PAGE_SIZE)
    assert mg(p) == [True]
    kernel.slab.limit = None
    with pytest.raises(ScanStalledError):  # not registered: ksmd has nothing to scan
        kernel.wait_full_scans(1)


def test_exit_with_run_0_then_run_2_reaps(kernel: SimKernel) -> None:
    """Exit with run=0, then run=2: the exiting mm's slot and items are freed, counters 0 (2.3, 3.10)."""
    p, _ = merged_process(kernel, 10)
    kernel.sysfs["run"] = "0"
    p.exit()
    assert shared_sharing(kernel) == (1, 9)
    kernel.sysfs["run"] = "2"
    assert shared_sharing(kernel) == (0, 0)
    assert counters(kernel, "pages_volatile", "general_profit") == {
        "pages_volatile": 0, "general_profit": 0}
    kernel.sysfs["run"] = "1"
    with pytest.raises(ScanStalledError):  # the slot is gone: empty list
        kernel.wait_full_scans(1)
