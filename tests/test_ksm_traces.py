# SPDX-License-Identifier: GPL-2.0-only
"""The verified traces of ``docs/kernel-behaviour.md``, reproduced scan by scan.

Section 7's traces 1-4 were recorded on Linux 6.18.44 with a large
pages_to_scan (one batch = one full scan); the ``kernel`` fixture sets that
up.  Other sections' verified numbers (3.6 chains, 3.9 zero pages, 3.10
run=2, 3.11 advisor, 5 EBUSY) follow, with arithmetic where the spec gives
a rule rather than a number.
"""

from __future__ import annotations

import errno

import pytest

from helpers import counters, expect, fill, merge, page_of, raises_errno, range_maps_duplicates
from ksmlab import (
    MADV_DONTNEED,
    MADV_MERGEABLE,
    MADV_UNMERGEABLE,
    PAGE_SIZE,
    ScanStalledError,
    SimKernel,
    SimProcess,
)

ROW = ("pages_scanned", "pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
       "pages_skipped")


def row(k: SimKernel) -> tuple[int, ...]:
    """The trace columns: scanned shared sharing unshared volatile skipped."""
    return tuple(int(k.sysfs[n]) for n in ROW)


def process_with_pages(k: SimKernel, pages: list[bytes | None]) -> tuple[SimProcess, int]:
    """One advised mapping whose pages hold *pages* (None = never touched)."""
    p = k.spawn()
    a = p.mmap(len(pages) * PAGE_SIZE)
    for i, data in enumerate(pages):
        if data is not None:
            p.write(a + i * PAGE_SIZE, data)
    p.madvise(a, len(pages) * PAGE_SIZE, MADV_MERGEABLE)
    return p, a


A, B, C, D = (page_of(ord(c)) for c in "ABCD")
ZERO = page_of(0)


# --- section 7 ------------------------------------------------------------------------------

def test_trace1_smart_scan(kernel: SimKernel) -> None:
    """Trace 1: pages A,A,B,C with smart_scan=1 over 12 full scans, then exit.

    Scans 10-12 are given only as skipped 8, 10, 12; the rest follows from the
    3.4 visit pattern (B and C skipped at visits 10-12; the two KSM mappings
    are scanned every time): scanned +2 per scan, B and C out of the
    unstable tree (unshared 0, volatile 2).
    """
    assert kernel.sysfs["smart_scan"] == "1"
    p, _ = process_with_pages(kernel, [A, A, B, C])
    expected = {
        1: (4, 0, 0, 0, 4, 0),
        2: (8, 1, 1, 2, 0, 0),
        3: (12, 1, 1, 2, 0, 0),
        4: (16, 1, 1, 2, 0, 0),
        5: (18, 1, 1, 0, 2, 2),
        6: (22, 1, 1, 2, 0, 2),
        7: (24, 1, 1, 0, 2, 4),
        8: (26, 1, 1, 0, 2, 6),
        9: (30, 1, 1, 2, 0, 6),
        10: (32, 1, 1, 0, 2, 8),
        11: (34, 1, 1, 0, 2, 10),
        12: (36, 1, 1, 0, 2, 12),
    }
    kernel.sysfs["run"] = "1"
    for scan, want in expected.items():
        kernel.wait_full_scans(1)
        assert int(kernel.sysfs["full_scans"]) == scan
        assert row(kernel) == want, f"after full scan {scan}"
        if scan == 1:
            assert int(kernel.sysfs["general_profit"]) == -256  # 0 - 4 items * 64
        if scan >= 2:
            assert int(kernel.sysfs["general_profit"]) == 3840  # 1*4096 - 4*64
            stat = p.ksm_stat()
            assert (stat["ksm_rmap_items"], stat["ksm_merging_pages"],
                    stat["ksm_process_profit"]) == (4, 2, 7936)  # 2*4096 - 4*64
    p.exit()
    kernel.wait_full_scans(1)
    after = counters(kernel)
    assert {n: after[n] for n in ("pages_shared", "pages_sharing", "pages_unshared",
                                  "pages_volatile", "general_profit")} == dict.fromkeys(
        ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile", "general_profit"), 0)
    assert after["full_scans"] == 13
    kernel.advance(1000)
    assert kernel.sysfs["full_scans"] == "13"  # empty list: full_scans stopped


def test_trace2_300_identical_pages(kernel: SimKernel) -> None:
    """Trace 2: 300 x A with smart_scan=0; a write, then DONTNEED + munmap of one page each."""
    kernel.sysfs["smart_scan"] = "0"
    p, a = process_with_pages(kernel, [A] * 300)
    kernel.sysfs["run"] = "1"
    kernel.wait_full_scans(1)
    assert int(kernel.sysfs["pages_volatile"]) == 300
    kernel.wait_full_scans(1)
    assert counters(kernel, "pages_shared", "pages_sharing", "stable_node_chains",
                    "stable_node_dups") == {"pages_shared": 2, "pages_sharing": 298,
                                            "stable_node_chains": 1, "stable_node_dups": 2}
    cow = kernel.cow_ksm
    p.write(a + 10 * PAGE_SIZE, b"written")
    assert kernel.cow_ksm == cow + 1  # at once
    assert counters(kernel, "pages_sharing", "pages_volatile") == {
        "pages_sharing": 298, "pages_volatile": 0}  # unchanged until the next scan
    kernel.wait_full_scans(1)
    assert counters(kernel, "pages_shared", "pages_sharing", "pages_volatile") == {
        "pages_shared": 2, "pages_sharing": 297, "pages_volatile": 1}
    p.madvise(a + 20 * PAGE_SIZE, PAGE_SIZE, MADV_DONTNEED)
    p.munmap(a + 30 * PAGE_SIZE, PAGE_SIZE)
    kernel.wait_full_scans(1)
    # The written page had been stable (same checksum) for one pass: now unstable.
    assert counters(kernel, "pages_shared", "pages_sharing", "pages_unshared",
                    "pages_volatile") == {"pages_shared": 2, "pages_sharing": 295,
                                          "pages_unshared": 1, "pages_volatile": 0}
    assert p.ksm_stat()["ksm_rmap_items"] == 298


def test_trace3_use_zero_pages(kernel: SimKernel) -> None:
    """Trace 3: use_zero_pages=1, pages 0,0,0,A,A,(untouched); then write, DONTNEED, fork, kill, run=2."""
    kernel.sysfs["use_zero_pages"] = "1"
    p, a = process_with_pages(kernel, [ZERO, ZERO, ZERO, A, A, None])
    kernel.sysfs["run"] = "1"
    kernel.wait_full_scans(1)
    assert counters(kernel, "pages_volatile", "ksm_zero_pages") == {
        "pages_volatile": 5, "ksm_zero_pages": 0}
    kernel.wait_full_scans(1)
    assert counters(kernel, "pages_shared", "pages_sharing", "ksm_zero_pages",
                    "pages_volatile") == {"pages_shared": 1, "pages_sharing": 1,
                                          "ksm_zero_pages": 3, "pages_volatile": 3}
    assert p.ksm_stat()["ksm_rmap_items"] == 5
    kernel.wait_full_scans(1)
    assert p.ksm_stat()["ksm_rmap_items"] == 2
    assert int(kernel.sysfs["pages_volatile"]) == 0
    # general_profit = (sharing 1 + zero pages 3) * 4096 - 2 items * 64
    assert int(kernel.sysfs["general_profit"]) == 4 * 4096 - 2 * 64
    p.write(a, b"\1")
    assert (kernel.sysfs["ksm_zero_pages"], p.ksm_stat()["ksm_zero_pages"]) == ("2", 2)
    p.madvise(a + PAGE_SIZE, PAGE_SIZE, MADV_DONTNEED)
    assert (kernel.sysfs["ksm_zero_pages"], p.ksm_stat()["ksm_zero_pages"]) == ("1", 1)
    child = p.fork()
    assert child.ksm_stat()["ksm_zero_pages"] == 1
    assert kernel.sysfs["ksm_zero_pages"] == "2"
    child.exit()
    assert kernel.sysfs["ksm_zero_pages"] == "1"
    kernel.sysfs["run"] = "2"
    c = counters(kernel)
    assert {n: c[n] for n in ("pages_shared", "pages_sharing", "ksm_zero_pages",
                              "full_scans")} == dict.fromkeys(
        ("pages_shared", "pages_sharing", "ksm_zero_pages", "full_scans"), 0)
    assert p.ksm_stat()["ksm_zero_pages"] == 0


def test_trace4_two_processes(kernel: SimKernel) -> None:
    """Trace 4: processes A,B,C and A,B,D: shared 2, sharing 2, unshared 2; profit 8000 each."""
    p1, _ = process_with_pages(kernel, [A, B, C])
    p2, _ = process_with_pages(kernel, [A, B, D])
    merge(kernel)
    assert counters(kernel, "pages_shared", "pages_sharing", "pages_unshared") == {
        "pages_shared": 2, "pages_sharing": 2, "pages_unshared": 2}
    for p in (p1, p2):
        stat = p.ksm_stat()
        # 2 merging pages * 4096 - 3 items * 64 = 8000
        assert (stat["ksm_merging_pages"], stat["ksm_process_profit"]) == (2, 8000)


# --- 3.6 chains -------------------------------------------------------------------------------

def test_300_identical_pages_form_a_chain(kernel: SimKernel) -> None:
    """3.6 (verified): 300 identical pages with max_page_sharing 256: shared 2, sharing 298, 1 chain, 2 dups."""
    process_with_pages(kernel, [A] * 300)
    merge(kernel)
    assert counters(kernel, "pages_shared", "pages_sharing", "stable_node_chains",
                    "stable_node_dups") == {"pages_shared": 2, "pages_sharing": 298,
                                            "stable_node_chains": 1, "stable_node_dups": 2}


def test_max_page_sharing_2_with_1000_pages(kernel: SimKernel) -> None:
    """max_page_sharing=2, 1000 identical pages: 500 KSM pages of 2 mappings, all dups of one chain.

    In scan 2, page 1 enters the unstable tree and page 2 merges with it:
    KSM page K1 with 2 items, which is full (a sharing candidate needs
    1 <= items < 2).  Page 3 finds only full KSM pages, so it enters the
    unstable tree; page 4 merges with it into K2, an equal node: the tree
    node becomes a chain of 2 dups.  Each further pair adds one dup.  So
    shared = 1000/2 = 500, sharing = 500 * (2-1) = 500 (expect(1000) with
    M=2), chains 1, dups 500, and general_profit = 500*4096 - 1000*64.
    """
    kernel.sysfs["max_page_sharing"] = "2"
    process_with_pages(kernel, [A] * 1000)
    merge(kernel)
    want = {"pages_shared": 500, "pages_sharing": 500, "stable_node_chains": 1,
            "stable_node_dups": 500, "pages_unshared": 0, "pages_volatile": 0,
            "general_profit": 500 * 4096 - 1000 * 64}
    assert expect(1000, 2) == (500, 500)
    assert counters(kernel, *want) == want
    kernel.wait_full_scans(1)  # steady state
    assert counters(kernel, *want) == want


# --- 3.9 zero pages ------------------------------------------------------------------------------

def test_zero_pages_knob_affects_later_merges_only(kernel: SimKernel) -> None:
    """3.9: zero pages merged while use_zero_pages=0 stay an ordinary KSM page after it turns 1;
    zero pages merged afterwards go to the zero page."""
    p, a = process_with_pages(kernel, [ZERO] * 4)
    merge(kernel)
    assert counters(kernel, "pages_shared", "pages_sharing", "ksm_zero_pages") == {
        "pages_shared": 1, "pages_sharing": 3, "ksm_zero_pages": 0}
    kernel.sysfs["use_zero_pages"] = "1"
    kernel.wait_full_scans(2)
    assert counters(kernel, "pages_shared", "pages_sharing", "ksm_zero_pages") == {
        "pages_shared": 1, "pages_sharing": 3, "ksm_zero_pages": 0}
    b = p.mmap(2 * PAGE_SIZE)
    fill(p, b, 2, 0)
    p.madvise(b, 2 * PAGE_SIZE, MADV_MERGEABLE)
    kernel.wait_full_scans(2)
    assert counters(kernel, "pages_shared", "pages_sharing", "ksm_zero_pages") == {
        "pages_shared": 1, "pages_sharing": 3, "ksm_zero_pages": 2}
    assert p.ksm_stat()["ksm_zero_pages"] == 2
    assert a != b


def test_zero_page_merge_effects(kernel: SimKernel) -> None:
    """3.9: a zero-page merge lowers Rss by a page, is not counted in smaps KSM, and its item is
    volatile until freed at the next pass."""
    kernel.sysfs["use_zero_pages"] = "1"
    p, a = process_with_pages(kernel, [ZERO, ZERO, A, A])
    assert p.smaps()[0].rss == 4 * PAGE_SIZE
    merge(kernel)
    e = p.smaps()[0]
    assert (e.rss, e.ksm) == (2 * PAGE_SIZE, 2 * PAGE_SIZE)  # zero pages in neither
    assert counters(kernel, "pages_volatile", "ksm_zero_pages") == {
        "pages_volatile": 2, "ksm_zero_pages": 2}
    kernel.wait_full_scans(1)
    assert (int(kernel.sysfs["pages_volatile"]), p.ksm_stat()["ksm_rmap_items"]) == (0, 2)
    assert p.read(a, 2 * PAGE_SIZE) == bytes(2 * PAGE_SIZE)
    assert range_maps_duplicates(p, a, 2 * PAGE_SIZE)  # both map the zero page


def test_read_fault_zero_pages_are_not_ksm(kernel: SimKernel) -> None:
    """3.9: pages that only map the zero page after read faults are never scanned or counted."""
    kernel.sysfs["use_zero_pages"] = "1"
    p = kernel.spawn()
    a = p.mmap(8 * PAGE_SIZE)
    assert p.read(a, 8 * PAGE_SIZE) == bytes(8 * PAGE_SIZE)
    p.madvise(a, 8 * PAGE_SIZE, MADV_MERGEABLE)
    merge(kernel)
    assert counters(kernel, "pages_scanned", "ksm_zero_pages") == {
        "pages_scanned": 0, "ksm_zero_pages": 0}
    assert p.ksm_stat()["ksm_rmap_items"] == 0


@pytest.mark.parametrize("how", ["munmap", "dontneed", "write", "unmergeable", "exit"])
def test_ksm_zero_pages_drop_eagerly(kernel: SimKernel, how: str) -> None:
    """3.9: the KSM zero count drops at once when such a PTE goes away (zap, write, unshare, exit)."""
    kernel.sysfs["use_zero_pages"] = "1"
    p, a = process_with_pages(kernel, [ZERO] * 4)
    merge(kernel)
    assert kernel.sysfs["ksm_zero_pages"] == "4"
    cow = kernel.cow_ksm
    if how == "munmap":
        p.munmap(a, PAGE_SIZE)
    elif how == "dontneed":
        p.madvise(a, PAGE_SIZE, MADV_DONTNEED)
    elif how == "write":
        p.write(a, b"\0")  # even writing a zero: the write fault COWs
    elif how == "unmergeable":
        p.madvise(a, PAGE_SIZE, MADV_UNMERGEABLE)
    else:
        p.exit()
    want = 0 if how == "exit" else 3
    assert kernel.sysfs["ksm_zero_pages"] == str(want)
    if how != "exit":
        assert p.ksm_stat()["ksm_zero_pages"] == 3
    if how == "unmergeable":
        assert p.pfns(a, PAGE_SIZE) != p.pfns(a + PAGE_SIZE, PAGE_SIZE)  # a fresh page
    assert kernel.cow_ksm == cow  # zero pages are not KSM pages for cow_ksm


# --- 3.10 run=2 ------------------------------------------------------------------------------------

def test_run2_unmerges_everything(kernel: SimKernel) -> None:
    """3.10 (verified): run=2 zeroes every KSM counter and full_scans, keeps pages_scanned and
    pages_skipped, frees all items, and leaves the mm registered with its mg vmas.

    Pages: 300 x A (a chain of 2 dups), 3 zero pages (use_zero_pages=1) and
    two unique pages B, C, over 6 full scans with smart_scan on.  Scanned:
    305 in scans 1 and 2; then the zero pages map the zero page and are not
    scannable: 302 in scans 3, 4 and 6, 300 in scan 5 (B and C skipped at their
    5th visit).  Total 2*305 + 3*302 + 300 = 1816; skipped 2.
    """
    k = kernel
    k.sysfs["use_zero_pages"] = "1"
    p, a = process_with_pages(k, [A] * 300 + [ZERO] * 3 + [B, C])
    merge(k, 6)
    before = counters(k)
    assert before == {
        "pages_scanned": 1816, "pages_shared": 2, "pages_sharing": 298, "pages_unshared": 2,
        "pages_volatile": 0, "pages_skipped": 2, "full_scans": 6, "ksm_zero_pages": 3,
        "stable_node_chains": 1, "stable_node_dups": 2,
        "general_profit": (298 + 3) * 4096 - 302 * 64}
    k.sysfs["run"] = "2"
    after = counters(k)
    assert after == {
        "pages_scanned": 1816, "pages_shared": 0, "pages_sharing": 0, "pages_unshared": 0,
        "pages_volatile": 0, "pages_skipped": 2, "full_scans": 0, "ksm_zero_pages": 0,
        "stable_node_chains": 0, "stable_node_dups": 0, "general_profit": 0}
    stat = p.ksm_stat()
    assert stat == {"ksm_rmap_items": 0, "ksm_zero_pages": 0, "ksm_merging_pages": 0,
                    "ksm_process_profit": 0, "ksm_merge_any": False, "ksm_mergeable": True}
    assert not range_maps_duplicates(p, a, 305 * PAGE_SIZE)
    assert [e.mergeable for e in p.smaps()] == [True]
    k.sysfs["run"] = "2"  # the same value again: a no-op
    assert counters(k) == after
    # Still registered: run=1 merges everything again (A pages and zero pages).
    merge(k)
    assert counters(k, "pages_shared", "pages_sharing", "ksm_zero_pages") == {
        "pages_shared": 2, "pages_sharing": 298, "ksm_zero_pages": 3}


def test_run_1_to_0_freezes(kernel: SimKernel) -> None:
    """3.10: run 1 -> 0 only stops scanning; merged pages and counters stay."""
    p, a = process_with_pages(kernel, [A] * 4)
    merge(kernel)
    kernel.sysfs["run"] = "0"
    frozen = counters(kernel)
    p.write(a, b"x")
    kernel.advance(60_000)
    assert counters(kernel) == frozen
    assert len(set(p.pfns(a + PAGE_SIZE, 3 * PAGE_SIZE))) == 1


# --- 5 EBUSY -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("knob", "value", "current"), [
    ("max_page_sharing", "100", "256"), ("merge_across_nodes", "0", "1")])
def test_knob_ebusy_while_pages_shared(knob: str, value: str, current: str) -> None:
    """5, 3.12 (verified): max_page_sharing / merge_across_nodes cannot change while pages_shared > 0;
    writing the current value succeeds; after run=2 the change is allowed."""
    k = SimKernel(numa_nodes=2)
    k.sysfs["sleep_millisecs"] = "0"
    k.sysfs["pages_to_scan"] = "100000"
    process_with_pages(k, [A] * 4)
    merge(k)
    assert k.sysfs["pages_shared"] == "1"
    with raises_errno(errno.EBUSY):
        k.sysfs[knob] = value
    assert k.sysfs[knob] == current
    k.sysfs[knob] = current  # the current value: success without checks
    k.sysfs["run"] = "2"
    k.sysfs[knob] = value
    assert k.sysfs[knob] == value


# --- 3.11 advisor -------------------------------------------------------------------------------

def test_advisor_mode_switch() -> None:
    """3.11 (verified): switching to scan-time resets pages_to_scan to advisor_min_pages_to_scan
    and locks it (EINVAL); back to none sets 100; a non-change resets nothing."""
    k = SimKernel()
    assert k.sysfs["advisor_mode"] == "[none] scan-time"
    k.sysfs["pages_to_scan"] = "1234"
    k.sysfs["advisor_mode"] = "none"  # no real change: pages_to_scan kept
    assert k.sysfs["pages_to_scan"] == "1234"
    k.sysfs["advisor_mode"] = "scan-time\n"
    assert k.sysfs["advisor_mode"] == "none [scan-time]"
    assert k.sysfs["pages_to_scan"] == "500"
    with raises_errno(errno.EINVAL):
        k.sysfs["pages_to_scan"] = "100"
    k.sysfs["advisor_min_pages_to_scan"] = "800"
    k.sysfs["advisor_mode"] = "scan-time"  # no real change
    assert k.sysfs["pages_to_scan"] == "500"
    with raises_errno(errno.EINVAL):
        k.sysfs["advisor_mode"] = "scan_time"
    k.sysfs["advisor_mode"] = "none"
    assert k.sysfs["pages_to_scan"] == "100"
    k.sysfs["pages_to_scan"] = "42"
    k.sysfs["advisor_mode"] = "scan-time"
    assert k.sysfs["pages_to_scan"] == "800"  # the (new) start value


def test_run2_failure_sets_run_0(kernel: SimKernel) -> None:
    """3.10: if run=2 cannot un-merge (out of memory) the write fails with ENOMEM and run reads 0."""
    k = kernel
    process_with_pages(k, [A] * 4)
    merge(k)
    k.phys.max_frames = k.phys.nr_frames
    with raises_errno(errno.ENOMEM):
        k.sysfs["run"] = "2"
    assert k.sysfs["run"] == "0"


def test_single_mapping_ksm_pages_stay(kernel: SimKernel) -> None:
    """3.6 (verified): after one of two sharers exits, shared=2, sharing=0: each KSM page keeps
    its one remaining mapping and stays a KSM page."""
    p1, a1 = process_with_pages(kernel, [A, B])
    p2, _ = process_with_pages(kernel, [A, B])
    merge(kernel)
    assert counters(kernel, "pages_shared", "pages_sharing") == {
        "pages_shared": 2, "pages_sharing": 2}
    p2.exit()
    kernel.wait_full_scans(1)
    assert counters(kernel, "pages_shared", "pages_sharing") == {
        "pages_shared": 2, "pages_sharing": 0}
    assert p1.smaps()[0].ksm == 2 * PAGE_SIZE
    cow = kernel.cow_ksm
    p1.write(a1, b"a")  # still write-protected: COW even with a single mapping
    assert kernel.cow_ksm == cow + 1


def test_mprotect_keeps_ksm_pages(kernel: SimKernel) -> None:
    """3.10 (verified): mprotect neither un-merges nor makes KSM pages writable; mg is kept on the pieces."""
    p, a = process_with_pages(kernel, [A] * 4)
    merge(kernel)
    cow = kernel.cow_ksm
    p.mprotect(a, 2 * PAGE_SIZE, 0)
    p.mprotect(a, 2 * PAGE_SIZE, 3)
    assert [(e.mergeable, e.ksm) for e in p.smaps()] == [(True, 4 * PAGE_SIZE)]
    p.mprotect(a, PAGE_SIZE, 1)
    assert [(e.mergeable, e.ksm) for e in p.smaps()] == [(True, PAGE_SIZE), (True, 3 * PAGE_SIZE)]
    assert kernel.cow_ksm == cow
    p.write(a + PAGE_SIZE, b"w")
    assert kernel.cow_ksm == cow + 1


def test_knob_ebusy_while_stable_node_still_mapped() -> None:
    """5: with pages_shared 0, a KSM page still mapped (by an unscanned fork child) keeps its
    stable node, which cannot be removed: max_page_sharing and merge_across_nodes give EBUSY.

    Parent: pages A,A,A,A,Z.  After merging, fork; the parent unmaps its A pages.
    One batch of one page: ksmd frees the parent's 4 A items on its way to Z
    (shared 1 -> 0) and stops before reaching the child, whose 4 mappings of the
    KSM page are not yet counted.
    """
    k = SimKernel(numa_nodes=2)
    k.sysfs["sleep_millisecs"] = "0"
    k.sysfs["pages_to_scan"] = "100000"
    p, a = process_with_pages(k, [A] * 4 + [page_of(ord("Z"))])
    merge(k)
    assert counters(k, "pages_shared", "pages_sharing") == {"pages_shared": 1, "pages_sharing": 3}
    child = p.fork()
    p.munmap(a, 4 * PAGE_SIZE)
    k.sysfs["pages_to_scan"] = "1"
    k.sysfs["sleep_millisecs"] = "1000"
    k.advance(1)  # exactly one batch
    k.sysfs["run"] = "0"
    assert counters(k, "pages_shared", "pages_sharing") == {"pages_shared": 0, "pages_sharing": 0}
    assert child.smaps()[0].ksm == 4 * PAGE_SIZE
    for knob, value in (("max_page_sharing", "100"), ("merge_across_nodes", "0")):
        with raises_errno(errno.EBUSY):
            k.sysfs[knob] = value


# --- 3.2 batches, 3.5 visits, 3.12 NUMA, 6 edge cases ---------------------------------------------

def test_batches_never_span_two_full_scans(kernel: SimKernel) -> None:
    """3.2 (verified): 10 pages with pages_to_scan=3 go in batches of 3, 3, 3, then 1 that ends
    full scan #1."""
    process_with_pages(kernel, [page_of(bytes([i])) for i in range(10)])
    kernel.sysfs["pages_to_scan"] = "3"
    kernel.sysfs["sleep_millisecs"] = "1000"
    kernel.sysfs["run"] = "1"
    seen = []
    for _ in range(4):
        kernel.advance(1000)  # one batch: each is followed by a 1 s sleep
        seen.append((int(kernel.sysfs["pages_scanned"]), int(kernel.sysfs["full_scans"])))
    assert seen == [(3, 0), (6, 0), (9, 0), (10, 1)]


def test_pages_to_scan_0_never_completes_a_scan(kernel: SimKernel) -> None:
    """3.2 (verified): with pages_to_scan=0 ksmd scans nothing and full_scans never moves."""
    process_with_pages(kernel, [A, A])
    kernel.sysfs["pages_to_scan"] = "0"
    kernel.sysfs["sleep_millisecs"] = "20"
    kernel.sysfs["run"] = "1"
    kernel.advance(10_000)  # 500 empty batches
    assert (kernel.sysfs["full_scans"], kernel.sysfs["pages_scanned"]) == ("0", "0")
    with pytest.raises(ScanStalledError):
        kernel.wait_full_scans(1)


def test_new_page_joins_existing_ksm_page_after_two_visits(kernel: SimKernel) -> None:
    """3.5 (verified): a new page identical to an existing KSM page is volatile after one scan
    (checksum first) and joins at the second."""
    p, _ = process_with_pages(kernel, [A, A])
    merge(kernel)
    b = p.mmap(PAGE_SIZE)
    p.write(b, A)
    p.madvise(b, PAGE_SIZE, MADV_MERGEABLE)
    kernel.wait_full_scans(1)
    assert counters(kernel, "pages_shared", "pages_sharing", "pages_volatile") == {
        "pages_shared": 1, "pages_sharing": 1, "pages_volatile": 1}
    kernel.wait_full_scans(1)
    assert counters(kernel, "pages_shared", "pages_sharing", "pages_volatile") == {
        "pages_shared": 1, "pages_sharing": 2, "pages_volatile": 0}


def test_merge_across_nodes_0_per_node_trees() -> None:
    """3.12: with merge_across_nodes=0 each node has its own trees: two A pages on each of two
    nodes make two KSM pages, shared 2, sharing 2; with 1 they make one, 1/3."""
    for mac, want in (("0", (2, 2)), ("1", (1, 3))):
        k = SimKernel(numa_nodes=2)
        k.sysfs["sleep_millisecs"] = "0"
        k.sysfs["pages_to_scan"] = "100000"
        k.sysfs["merge_across_nodes"] = mac
        p = k.spawn()
        for node in (0, 1):
            a = p.mmap(2 * PAGE_SIZE, node=node)
            p.write(a, A * 2)
            p.madvise(a, 2 * PAGE_SIZE, MADV_MERGEABLE)
        merge(k)
        assert (int(k.sysfs["pages_shared"]), int(k.sysfs["pages_sharing"])) == want


def test_dontneed_all_mappings_makes_node_stale(kernel: SimKernel) -> None:
    """6: DONTNEED of every mapping frees the KSM page at once; the next scan drops the stale
    node and all its items (counters fall together)."""
    p, a = process_with_pages(kernel, [A] * 4)
    merge(kernel)
    p.madvise(a, 4 * PAGE_SIZE, MADV_DONTNEED)
    assert counters(kernel, "pages_shared", "pages_sharing") == {
        "pages_shared": 1, "pages_sharing": 3}
    kernel.wait_full_scans(1)
    assert counters(kernel, "pages_shared", "pages_sharing", "pages_volatile") == {
        "pages_shared": 0, "pages_sharing": 0, "pages_volatile": 0}
    assert p.ksm_stat()["ksm_rmap_items"] == 0
    assert p.ksm_merging_pages() == 0


def test_munmap_all_mergeable_drops_slot_then_readvise(kernel: SimKernel) -> None:
    """6: after munmap of every mergeable vma the next pass drops the slot (ksmd idles);
    a later MADV_MERGEABLE registers the mm again."""
    p, a = process_with_pages(kernel, [A] * 2)
    merge(kernel)
    p.munmap(a, 2 * PAGE_SIZE)
    kernel.wait_full_scans(1)
    assert counters(kernel, "pages_shared", "pages_sharing") == {
        "pages_shared": 0, "pages_sharing": 0}
    with pytest.raises(ScanStalledError):
        kernel.wait_full_scans(1)
    b = p.mmap(2 * PAGE_SIZE)
    p.write(b, B * 2)
    p.madvise(b, 2 * PAGE_SIZE, MADV_MERGEABLE)
    kernel.wait_full_scans(2)
    assert counters(kernel, "pages_shared", "pages_sharing") == {
        "pages_shared": 1, "pages_sharing": 1}


def one_batch_at_a_time(k: SimKernel, pages_to_scan: int) -> None:
    """Make each ``advance(1000)`` run exactly one batch of *pages_to_scan* pages."""
    k.sysfs["pages_to_scan"] = str(pages_to_scan)
    k.sysfs["sleep_millisecs"] = "1000"


def test_new_mm_queued_behind_the_cursor(kernel: SimKernel) -> None:
    """2.2: an mm registered mid-scan goes just before the cursor's slot, so the current
    full scan does not visit it; the next one does.

    P1 has 4 distinct pages, batches are 2 pages.  After batch 1 the cursor is
    in P1; P2 (2 pages) registers.  Batch 2 ends P1; batch 3 finds the end of
    the list: full scan 1 ends with 4 pages scanned, none of them P2's.
    """
    process_with_pages(kernel, [page_of(bytes([i])) for i in range(4)])
    one_batch_at_a_time(kernel, 2)
    kernel.sysfs["run"] = "1"
    kernel.advance(1000)
    assert (kernel.sysfs["pages_scanned"], kernel.sysfs["full_scans"]) == ("2", "0")
    p2, _ = process_with_pages(kernel, [B, C])
    kernel.advance(1000)
    kernel.advance(1000)
    assert (kernel.sysfs["pages_scanned"], kernel.sysfs["full_scans"]) == ("4", "1")
    assert p2.ksm_stat()["ksm_rmap_items"] == 0
    kernel.advance(1000)  # full scan 2 starts with P2
    assert p2.ksm_stat()["ksm_rmap_items"] == 2


def test_exiting_mm_moved_after_the_cursor(kernel: SimKernel) -> None:
    """2.3: an exiting mm with items is moved just after the cursor, so ksmd reaps it before
    the current full scan ends, even though its slot had already been passed.

    P1, P2, P3 each hold two pages of their own content: shared 3, sharing 3.
    With one-page batches, the cursor is in P2 when P1 exits; the rest of
    this full scan reaps P1: shared 2, sharing 2.
    """
    for content in (A, B, C):
        process_with_pages(kernel, [content, content])
    merge(kernel)
    assert counters(kernel, "pages_shared", "pages_sharing") == {
        "pages_shared": 3, "pages_sharing": 3}
    p1 = next(iter(kernel.processes.values()))
    one_batch_at_a_time(kernel, 1)
    for _ in range(3):  # P1's two pages, then P2's first
        kernel.advance(1000)
    p1.exit()
    kernel.wait_full_scans(1)
    assert counters(kernel, "pages_shared", "pages_sharing") == {
        "pages_shared": 2, "pages_sharing": 2}


def test_empty_chain_lingers_until_run2(kernel: SimKernel) -> None:
    """3.6 (verified): after MADV_UNMERGEABLE of 300 merged pages, the next scan removes both
    dups but the empty chain lingers (chains 1, dups 0) until run=2 frees it."""
    p, a = process_with_pages(kernel, [A] * 300)
    merge(kernel)
    p.madvise(a, 300 * PAGE_SIZE, MADV_UNMERGEABLE)
    kernel.wait_full_scans(1)
    assert counters(kernel, "pages_shared", "pages_sharing", "stable_node_chains",
                    "stable_node_dups") == {"pages_shared": 0, "pages_sharing": 0,
                                            "stable_node_chains": 1, "stable_node_dups": 0}
    kernel.sysfs["run"] = "2"
    assert kernel.sysfs["stable_node_chains"] == "0"


def test_cow_with_unchanged_content_remerges_in_one_visit(kernel: SimKernel) -> None:
    """3.10: a write that leaves a KSM page's content unchanged still COWs (cow_ksm + 1); at
    the next visit the copy's checksum is unchanged, so it merges back at once."""
    p, a = process_with_pages(kernel, [A] * 4)
    merge(kernel)
    kpfn = p.pfns(a + PAGE_SIZE, PAGE_SIZE)[0]
    cow = kernel.cow_ksm
    p.write(a, A[:1])
    assert kernel.cow_ksm == cow + 1
    assert p.pfns(a, PAGE_SIZE)[0] != kpfn
    kernel.wait_full_scans(1)
    assert p.pfns(a, 4 * PAGE_SIZE) == [kpfn] * 4
    assert counters(kernel, "pages_shared", "pages_sharing", "pages_volatile") == {
        "pages_shared": 1, "pages_sharing": 3, "pages_volatile": 0}
