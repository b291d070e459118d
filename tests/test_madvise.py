# SPDX-License-Identifier: GPL-2.0-only
"""madvise(MADV_MERGEABLE / MADV_UNMERGEABLE): the seed's errno rules, unit by unit.

Expected values come from ``docs/kernel-behaviour.md`` section 1 (the
madvise interface) and section 4 (ksm_stat); section numbers are cited
per test.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from helpers import fill, merge, raises_errno, vma_layout
from ksmlab import (
    MADV_MERGEABLE,
    MADV_UNMERGEABLE,
    MAP_ANONYMOUS,
    MAP_DROPPABLE,
    MAP_HUGETLB,
    MAP_PRIVATE,
    MAP_SHARED,
    PAGE_SIZE,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
    VM_IO,
    VM_PFNMAP,
    ScanStalledError,
    SimKernel,
    SimProcess,
)

RW = PROT_READ | PROT_WRITE
P = PAGE_SIZE
ANON = MAP_PRIVATE | MAP_ANONYMOUS
U64 = (1 << 64) - 1
ADVICES = pytest.mark.parametrize("advice", [MADV_MERGEABLE, MADV_UNMERGEABLE],
                                  ids=["MERGEABLE", "UNMERGEABLE"])


@pytest.fixture
def proc(kernel: SimKernel) -> SimProcess:
    """A process of the ``kernel`` fixture."""
    return kernel.spawn()


@pytest.fixture
def host_file(tmp_path: Path) -> str:
    """A 4-page file to map."""
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(range(256)) * (4 * PAGE_SIZE // 256))
    return str(path)


def mg(p: SimProcess) -> list[bool]:
    """VM_MERGEABLE of each vma, in address order."""
    return [e.mergeable for e in p.smaps()]


def assert_not_registered(k: SimKernel) -> None:
    """No mm is on ksmd's list: with run=1, ksmd sleeps and full_scans cannot move (spec 3.2)."""
    k.sysfs["run"] = "1"
    with pytest.raises(ScanStalledError):
        k.wait_full_scans(1)


# --- 1.1 checks before any vma is touched ------------------------------------------------

@ADVICES
def test_config_ksm_off_einval(advice: int) -> None:
    """Without CONFIG_KSM both advices are unknown: EINVAL (1.1, 1.6)."""
    k = SimKernel(config_ksm=False)
    p = k.spawn()
    a = p.mmap(4 * PAGE_SIZE)
    before = p.smaps()
    with raises_errno(errno.EINVAL):
        p.madvise(a, 4 * PAGE_SIZE, advice)
    assert p.smaps() == before


def test_unknown_advice_einval(proc: SimProcess) -> None:
    """An unknown advice value (12345) is EINVAL and changes nothing (1.1)."""
    a = proc.mmap(4 * PAGE_SIZE)
    before = proc.smaps()
    with raises_errno(errno.EINVAL):
        proc.madvise(a, 4 * PAGE_SIZE, 12345)
    assert proc.smaps() == before


@ADVICES
@pytest.mark.parametrize("length", [0, PAGE_SIZE, 3 * PAGE_SIZE])
def test_unaligned_start_einval(proc: SimProcess, advice: int, length: int) -> None:
    """An unaligned start is EINVAL, even with len 0 (1.1 step 2, verified)."""
    a = proc.mmap(4 * PAGE_SIZE)
    before = proc.smaps()
    with raises_errno(errno.EINVAL):
        proc.madvise(a + 1, length, advice)
    assert proc.smaps() == before


@ADVICES
@pytest.mark.parametrize("length", [U64, U64 - PAGE_SIZE + 2, U64 - PAGE_SIZE + 1,
                                    (1 << 64) - 8192],
                         ids=["-1", "rounds-to-0", "-4096", "-8192"])
def test_length_overflow_einval(proc: SimProcess, advice: int, length: int) -> None:
    """A len that rounds to 0, or a start+len that wraps, is EINVAL (1.1 steps 3-4, verified)."""
    a = proc.mmap(4 * PAGE_SIZE)
    assert a > 8192  # so that start + (2^64 - 8192) wraps
    before = proc.smaps()
    with raises_errno(errno.EINVAL):
        proc.madvise(a, length, advice)
    assert proc.smaps() == before


@ADVICES
def test_zero_length_succeeds(proc: SimProcess, advice: int) -> None:
    """len 0 with an aligned start returns 0 at once, even at an unmapped address (1.1 step 5)."""
    a = proc.mmap(4 * PAGE_SIZE)
    before = proc.smaps()
    proc.madvise(a, 0, advice)
    proc.madvise(0x10000, 0, advice)  # nothing mapped there
    assert proc.smaps() == before
    assert proc.ksm_stat()["ksm_mergeable"] is False


def test_length_rounded_up_to_pages(proc: SimProcess) -> None:
    """len is rounded up to a page multiple: 1 byte covers the whole first page (1.1 step 3)."""
    a = proc.mmap(4 * PAGE_SIZE)
    proc.madvise(a, 1, MADV_MERGEABLE)
    assert vma_layout(proc) == [(a, 1, True), (a + PAGE_SIZE, 3, False)]


# --- 1.2 holes -------------------------------------------------------------------------------

def make_hole(p: SimProcess) -> int:
    """6 pages with a 2-page hole in the middle: [2 pages][hole][2 pages]; returns the start."""
    a = p.mmap(6 * PAGE_SIZE)
    p.munmap(a + 2 * PAGE_SIZE, 2 * PAGE_SIZE)
    assert vma_layout(p) == [(a, 2, False), (a + 4 * PAGE_SIZE, 2, False)]
    return a


def test_mergeable_over_hole_enomem_but_applied(proc: SimProcess) -> None:
    """MERGEABLE over a range with a 2-page hole: ENOMEM, and both mapped pieces are mg (1.2, verified)."""
    a = make_hole(proc)
    with raises_errno(errno.ENOMEM):
        proc.madvise(a, 6 * PAGE_SIZE, MADV_MERGEABLE)
    assert mg(proc) == [True, True]
    assert proc.ksm_stat()["ksm_mergeable"] is True


def test_unmergeable_over_hole_enomem_but_applied(proc: SimProcess) -> None:
    """UNMERGEABLE over a hole: ENOMEM, and both pieces lose mg (1.2, verified)."""
    a = make_hole(proc)
    proc.madvise(a, 2 * PAGE_SIZE, MADV_MERGEABLE)
    proc.madvise(a + 4 * PAGE_SIZE, 2 * PAGE_SIZE, MADV_MERGEABLE)
    assert mg(proc) == [True, True]
    with raises_errno(errno.ENOMEM):
        proc.madvise(a, 6 * PAGE_SIZE, MADV_UNMERGEABLE)
    assert mg(proc) == [False, False]


def test_hole_before_first_vma_enomem(proc: SimProcess) -> None:
    """A range starting in a hole still processes the vma after it (1.2)."""
    a = proc.mmap(4 * PAGE_SIZE)
    proc.munmap(a, 2 * PAGE_SIZE)
    with raises_errno(errno.ENOMEM):
        proc.madvise(a, 4 * PAGE_SIZE, MADV_MERGEABLE)
    assert vma_layout(proc) == [(a + 2 * PAGE_SIZE, 2, True)]


@ADVICES
def test_entirely_unmapped_enomem(proc: SimProcess, advice: int) -> None:
    """A range with no vma at all is ENOMEM (1.2, verified)."""
    a = proc.mmap(4 * PAGE_SIZE)
    proc.munmap(a, 4 * PAGE_SIZE)
    with raises_errno(errno.ENOMEM):
        proc.madvise(a, 4 * PAGE_SIZE, advice)
    assert proc.smaps() == []
    with raises_errno(errno.ENOMEM):
        proc.madvise(0x10000, PAGE_SIZE, advice)  # below every mapping


def test_range_past_last_vma_enomem_but_applied(proc: SimProcess) -> None:
    """A range running past the last vma is ENOMEM; the mapped part before is processed (1.2, 1.6)."""
    a = proc.mmap(4 * PAGE_SIZE)
    assert proc.smaps()[-1].end == a + 4 * PAGE_SIZE  # the highest mapping
    with raises_errno(errno.ENOMEM):
        proc.madvise(a, 8 * PAGE_SIZE, MADV_MERGEABLE)
    assert mg(proc) == [True]


def test_range_over_two_adjacent_vmas_succeeds(proc: SimProcess) -> None:
    """A range spanning two contiguous vmas is fine and returns 0 (1.2)."""
    a = proc.mmap(4 * PAGE_SIZE)
    proc.mprotect(a, 2 * PAGE_SIZE, PROT_READ)  # two vmas, no hole
    assert len(proc.smaps()) == 2
    proc.madvise(a, 4 * PAGE_SIZE, MADV_MERGEABLE)
    assert mg(proc) == [True, True]


# --- 1.3 ksm_madvise on one vma -----------------------------------------------------------------

def test_advice_accepted_with_run_0(kernel: SimKernel, proc: SimProcess) -> None:
    """MERGEABLE needs no run=1: it only registers the area; nothing merges until ksmd runs (1.3)."""
    assert kernel.sysfs["run"] == "0"
    a = proc.mmap(4 * PAGE_SIZE)
    fill(proc, a, 4, ord("x"))
    proc.madvise(a, 4 * PAGE_SIZE, MADV_MERGEABLE)
    assert mg(proc) == [True]
    kernel.advance(10_000)
    assert (kernel.sysfs["full_scans"], kernel.sysfs["pages_sharing"]) == ("0", "0")
    merge(kernel)
    assert (kernel.sysfs["pages_shared"], kernel.sysfs["pages_sharing"]) == ("1", "3")


def test_mergeable_without_pages(kernel: SimKernel, proc: SimProcess) -> None:
    """The vma needs no pages or anon_vma yet to become mg and register the mm (1.3)."""
    a = proc.mmap(4 * PAGE_SIZE)
    proc.madvise(a, 4 * PAGE_SIZE, MADV_MERGEABLE)
    assert mg(proc) == [True]
    merge(kernel, 1)  # registered: ksmd runs full scans over it
    assert kernel.sysfs["pages_scanned"] == "0"


def test_already_mergeable_is_noop(proc: SimProcess) -> None:
    """MERGEABLE on an already-mg vma changes nothing, in particular no split (1.3 step 1)."""
    a = proc.mmap(4 * PAGE_SIZE)
    proc.madvise(a, 4 * PAGE_SIZE, MADV_MERGEABLE)
    before = proc.smaps()
    proc.madvise(a + PAGE_SIZE, PAGE_SIZE, MADV_MERGEABLE)
    assert proc.smaps() == before


def test_unmergeable_on_never_mergeable_is_noop(proc: SimProcess) -> None:
    """UNMERGEABLE on a range that was never mergeable returns 0 and does nothing (1.4 step 1)."""
    a = proc.mmap(4 * PAGE_SIZE)
    before = proc.smaps()
    proc.madvise(a + PAGE_SIZE, PAGE_SIZE, MADV_UNMERGEABLE)
    assert proc.smaps() == before


IGNORED = {
    "shared-anon": dict(flags=MAP_SHARED | MAP_ANONYMOUS),
    "hugetlb": dict(flags=ANON | MAP_HUGETLB, length=512 * PAGE_SIZE),
    "droppable": dict(flags=MAP_DROPPABLE | MAP_ANONYMOUS),
    "pfnmap-io": dict(vm_flags=VM_PFNMAP | VM_IO),
}


@pytest.mark.parametrize("how", IGNORED.values(), ids=IGNORED.keys())
def test_incompatible_vma_silently_ignored(kernel: SimKernel, proc: SimProcess,
                                           how: dict[str, int]) -> None:
    """MERGEABLE on a shared/hugetlb/droppable/PFNMAP|IO area: success, no mg, no registration (1.3 step 2)."""
    length = how.get("length", 4 * PAGE_SIZE)
    a = proc.mmap(length, RW, how.get("flags", ANON), vm_flags=how.get("vm_flags", 0))
    before = proc.smaps()
    proc.madvise(a, length, MADV_MERGEABLE)
    assert proc.smaps() == before
    assert mg(proc) == [False]
    assert proc.ksm_stat()["ksm_mergeable"] is False
    assert_not_registered(kernel)


def test_shared_file_mapping_ignored(kernel: SimKernel, proc: SimProcess, host_file: str) -> None:
    """MERGEABLE on a MAP_SHARED file mapping (read-only, too) is silently ignored (1.3 step 2, verified)."""
    for prot in (RW, PROT_READ):
        a = proc.mmap(4 * PAGE_SIZE, prot, MAP_SHARED, path=host_file)
        proc.madvise(a, 4 * PAGE_SIZE, MADV_MERGEABLE)
        assert [e.mergeable for e in proc.smaps() if e.start == a] == [False]
    assert_not_registered(kernel)


def test_private_file_mapping_becomes_mergeable(kernel: SimKernel, proc: SimProcess,
                                                host_file: str) -> None:
    """A MAP_PRIVATE file mapping becomes mg; only its COWed anonymous pages can merge (1.3, verified)."""
    a = proc.mmap(4 * PAGE_SIZE, RW, MAP_PRIVATE, path=host_file)
    proc.read(a, 4 * PAGE_SIZE)  # page cache mapped, not scannable
    proc.madvise(a, 4 * PAGE_SIZE, MADV_MERGEABLE)
    assert mg(proc) == [True]
    merge(kernel)
    assert (kernel.sysfs["pages_shared"], kernel.sysfs["pages_scanned"]) == ("0", "0")
    fill(proc, a, 2, ord("c"))  # two COWed anonymous copies with equal content
    merge(kernel)
    assert (kernel.sysfs["pages_shared"], kernel.sysfs["pages_sharing"]) == ("1", "1")


def test_prot_none_private_becomes_mergeable(proc: SimProcess) -> None:
    """A PROT_NONE private mapping becomes mg (1.3, verified)."""
    a = proc.mmap(4 * PAGE_SIZE, PROT_NONE)
    proc.madvise(a, 4 * PAGE_SIZE, MADV_MERGEABLE)
    assert mg(proc) == [True]
    assert proc.smaps()[0].perms == "---p"


# --- 1.5 vma splitting and merging --------------------------------------------------------------

def test_split_and_merge_sequence(proc: SimProcess) -> None:
    """The verified 8-page sequence of 1.5: split into 3, extend, merge to 1, split, merge back."""
    a = proc.mmap(8 * P)
    proc.madvise(a + P, 2 * P, MADV_MERGEABLE)
    assert vma_layout(proc) == [(a, 1, False), (a + P, 2, True), (a + 3 * P, 5, False)]
    proc.madvise(a + 3 * P, 2 * P, MADV_MERGEABLE)  # merges with its mg neighbour
    assert vma_layout(proc) == [(a, 1, False), (a + P, 4, True), (a + 5 * P, 3, False)]
    proc.madvise(a, 8 * P, MADV_MERGEABLE)
    assert vma_layout(proc) == [(a, 8, True)]
    proc.madvise(a + 4 * P, P, MADV_UNMERGEABLE)
    assert vma_layout(proc) == [(a, 4, True), (a + 4 * P, 1, False), (a + 5 * P, 3, True)]
    proc.madvise(a, 8 * P, MADV_UNMERGEABLE)
    assert vma_layout(proc) == [(a, 8, False)]


def test_unmark_merges_with_unrelated_neighbour(proc: SimProcess) -> None:
    """Un-marking can merge the vma with an unrelated adjacent anonymous vma:
    VM_MERGEABLE is one of the flags that must match (1.5)."""
    hi = proc.mmap(4 * P)
    proc.madvise(hi, 4 * P, MADV_MERGEABLE)
    lo = proc.mmap(4 * P)  # placed just below, but not merged: the flags differ
    assert lo + 4 * P == hi
    assert vma_layout(proc) == [(lo, 4, False), (hi, 4, True)]
    proc.madvise(hi, 4 * P, MADV_UNMERGEABLE)
    assert vma_layout(proc) == [(lo, 8, False)]


# --- 1.6 EAGAIN --------------------------------------------------------------------------------

def test_mm_slot_allocation_failure_eagain(kernel: SimKernel, proc: SimProcess) -> None:
    """If __ksm_enter cannot allocate the mm_slot, madvise is EAGAIN and nothing changes (1.3 step 3, 2.2)."""
    a = proc.mmap(8 * PAGE_SIZE)
    fill(proc, a, 8, ord("s"))
    before = proc.smaps()
    kernel.slab.limit = 0
    with raises_errno(errno.EAGAIN):
        proc.madvise(a + PAGE_SIZE, 2 * PAGE_SIZE, MADV_MERGEABLE)
    assert proc.smaps() == before
    assert proc.ksm_stat()["ksm_mergeable"] is False
    kernel.slab.limit = None
    assert_not_registered(kernel)
    proc.madvise(a + PAGE_SIZE, 2 * PAGE_SIZE, MADV_MERGEABLE)  # works once memory is back
    assert mg(proc) == [False, True, False]


def test_split_at_max_map_count_eagain() -> None:
    """A split with map_count already at vm.max_map_count fails: EAGAIN, nothing split (1.5, 1.6)."""
    k = SimKernel(max_map_count=1)
    p = k.spawn()
    a = p.mmap(8 * PAGE_SIZE)
    before = p.smaps()
    with raises_errno(errno.EAGAIN):
        p.madvise(a + PAGE_SIZE, 2 * PAGE_SIZE, MADV_MERGEABLE)
    assert p.smaps() == before
    p.madvise(a, 8 * PAGE_SIZE, MADV_MERGEABLE)  # no split needed: fine
    assert mg(p) == [True]


def test_second_split_fails_first_stays() -> None:
    """With max_map_count 2 the split at start succeeds and the one at end fails:
    EAGAIN, and the first split stays in place without the new flag (1.5)."""
    k = SimKernel(max_map_count=2)
    p = k.spawn()
    a = p.mmap(8 * PAGE_SIZE)
    with raises_errno(errno.EAGAIN):
        p.madvise(a + PAGE_SIZE, 2 * PAGE_SIZE, MADV_MERGEABLE)
    # split_vma refuses when map_count >= max_map_count: 1 < 2 splits, 2 >= 2 fails.
    assert vma_layout(p) == [(a, 1, False), (a + PAGE_SIZE, 7, False)]


# --- MMF registration and ksm_stat -----------------------------------------------------------------

def test_ksm_mergeable_flips_immediately(proc: SimProcess) -> None:
    """ksm_stat's ksm_mergeable is 'yes' right after MERGEABLE and 'no' right after un-marking (4)."""
    a = proc.mmap(4 * PAGE_SIZE)
    assert proc.ksm_stat()["ksm_mergeable"] is False
    proc.madvise(a, PAGE_SIZE, MADV_MERGEABLE)
    assert proc.ksm_stat()["ksm_mergeable"] is True
    proc.madvise(a, PAGE_SIZE, MADV_UNMERGEABLE)
    assert proc.ksm_stat()["ksm_mergeable"] is False
    assert proc.ksm_stat()["ksm_merge_any"] is False


def test_unmergeable_unmerges_at_once_counters_lazily(kernel: SimKernel, proc: SimProcess) -> None:
    """UNMERGEABLE COW-breaks each KSM page at once (cow_ksm += 1 each); ksmd's counters
    change only at its next visit (1.4)."""
    a = proc.mmap(4 * PAGE_SIZE)
    fill(proc, a, 4, ord("u"))
    proc.madvise(a, 4 * PAGE_SIZE, MADV_MERGEABLE)
    merge(kernel)
    assert (kernel.sysfs["pages_shared"], kernel.sysfs["pages_sharing"]) == ("1", "3")
    cow = kernel.cow_ksm
    proc.madvise(a, 3 * PAGE_SIZE, MADV_UNMERGEABLE)
    assert kernel.cow_ksm == cow + 3
    assert (kernel.sysfs["pages_shared"], kernel.sysfs["pages_sharing"]) == ("1", "3")
    assert proc.read(a, 4 * PAGE_SIZE) == b"u" * 4 * PAGE_SIZE
    kernel.wait_full_scans(1)
    # The 3 un-marked pages are no longer scanned; their items go. The last page
    # still maps the KSM page, alone: shared 1, sharing 0.
    assert (kernel.sysfs["pages_shared"], kernel.sysfs["pages_sharing"]) == ("1", "0")
    assert proc.ksm_stat()["ksm_rmap_items"] == 1


@pytest.mark.parametrize(("start_off", "length", "advice"), [
    (1, PAGE_SIZE, MADV_MERGEABLE),
    (0, U64, MADV_MERGEABLE),
    (0, PAGE_SIZE, 12345),
    (1, 0, MADV_UNMERGEABLE),
])
def test_bad_input_leaves_state_unchanged(kernel: SimKernel, proc: SimProcess, start_off: int,
                                          length: int, advice: int) -> None:
    """An EINVAL call changes no vma, no flag and no counter (1.1)."""
    a = proc.mmap(4 * PAGE_SIZE)
    fill(proc, a, 4, ord("b"))
    proc.madvise(a + 2 * PAGE_SIZE, PAGE_SIZE, MADV_MERGEABLE)
    smaps, stat, sysfs = proc.smaps(), proc.ksm_stat(), kernel.sysfs.snapshot()
    with raises_errno(errno.EINVAL):
        proc.madvise(a + start_off, length, advice)
    assert (proc.smaps(), proc.ksm_stat(), kernel.sysfs.snapshot()) == (smaps, stat, sysfs)


# --- 1.4 un-merge failures ----------------------------------------------------------------------

def test_unmergeable_oom_eagain_keeps_flag(kernel: SimKernel, proc: SimProcess) -> None:
    """OOM while un-merging: EAGAIN; pages already un-merged stay so, VM_MERGEABLE stays set (1.4)."""
    a = proc.mmap(4 * PAGE_SIZE)
    fill(proc, a, 4, ord("o"))
    proc.madvise(a, 4 * PAGE_SIZE, MADV_MERGEABLE)
    merge(kernel)
    kpfn = proc.pfns(a, PAGE_SIZE)[0]
    assert proc.pfns(a, 4 * PAGE_SIZE) == [kpfn] * 4
    kernel.phys.max_frames = kernel.phys.nr_frames + 2  # room for two private copies
    cow = kernel.cow_ksm
    with raises_errno(errno.EAGAIN):
        proc.madvise(a, 4 * PAGE_SIZE, MADV_UNMERGEABLE)
    # do_wp_page counts COW_KSM before wp_page_copy allocates: the failed third
    # attempt counts too (mm/memory.c).
    assert kernel.cow_ksm == cow + 3
    pfns = proc.pfns(a, 4 * PAGE_SIZE)
    assert pfns[2:] == [kpfn, kpfn] and kpfn not in pfns[:2]
    assert mg(proc) == [True]


def test_real_error_stops_the_walk(kernel: SimKernel, proc: SimProcess) -> None:
    """A per-vma error stops the walk at once and is returned instead of the hole's ENOMEM (1.2)."""
    a = make_hole(proc)
    fill(proc, a, 2, ord("w"))
    fill(proc, a + 4 * PAGE_SIZE, 2, ord("w"))
    with raises_errno(errno.ENOMEM):
        proc.madvise(a, 6 * PAGE_SIZE, MADV_MERGEABLE)
    merge(kernel)
    assert (kernel.sysfs["pages_shared"], kernel.sysfs["pages_sharing"]) == ("1", "3")
    kernel.phys.max_frames = kernel.phys.nr_frames  # no private copy possible
    with raises_errno(errno.EAGAIN):
        proc.madvise(a, 6 * PAGE_SIZE, MADV_UNMERGEABLE)
    assert mg(proc) == [True, True]  # the second piece was never reached
