"""ksmd's clock and CPU cost model (ksmlab.ksm.jiffies, ksmlab.ksm.cost, ksmlab.ksm.ksmd).

Expected values are arithmetic stated next to each check: the kernel's
``msecs_to_jiffies`` and timer wheel (``calc_wheel_index``), whose periods
were measured on this machine's kernel (HZ=250: median gaps between batches
of 8, 12, 16, 24, 320 and 1024 ms for sleep_millisecs 1, 5, 10, 20, 300 and
1000, docs/cost-model.md; ``test_real_ksmd_period_follows_the_timer_wheel``
checks two of them again), and the steps of ``cmp_and_merge_page`` for small
programs (docs/kernel-behaviour.md, spec 3.5 and 3.6).
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import pytest

from ksmlab import MADV_MERGEABLE, PAGE_SIZE, SimKernel
from ksmlab.bulk import BulkKernel
from ksmlab.ksm.cost import (
    FEATURES,
    WALK_START_PAGES,
    KsmdClock,
    KsmdCost,
    KsmdWork,
    default_cost,
    features,
    mean_depth,
)
from ksmlab.ksm.jiffies import (
    MAX_JIFFY_OFFSET,
    msecs_to_jiffies,
    sleep_end_ns,
    tick_nsec,
    timer_fire_jiffy,
    wake_delay_ns,
)

MS = 1_000_000
EXACT = default_cost().with_clock(hz=250, wake_delay_ns=0.0, late_fraction=0.0,
                                   run_stretch=1.0)
"""The shipped CPU costs on a 250 Hz clock without scheduling delay: ksmd wakes on its timer's tick."""


# --- jiffies -------------------------------------------------------------------------------

@pytest.mark.parametrize(("hz", "ms", "jiffies"), [
    (250, 0, 0), (250, 1, 1), (250, 4, 1), (250, 5, 2), (250, 20, 5), (250, 1000, 250),
    (100, 1, 1), (100, 10, 1), (100, 11, 2), (1000, 7, 7), (300, 10, 3), (300, 11, 4),
    (250, 2**31 - 1, (2**31 - 1 + 3) // 4), (250, 2**31, MAX_JIFFY_OFFSET),
])
def test_msecs_to_jiffies_rounds_up(hz: int, ms: int, jiffies: int) -> None:
    """ms * HZ / 1000 rounded up (300 Hz: 10 ms is 3 jiffies, 11 ms 3.3 -> 4); an unsigned
    value that is negative as an int gives MAX_JIFFY_OFFSET."""
    assert msecs_to_jiffies(ms, hz) == jiffies


def test_tick_is_rounded_as_the_kernel_rounds_it() -> None:
    """TICK_NSEC = (NSEC_PER_SEC + HZ/2) / HZ."""
    assert (tick_nsec(250), tick_nsec(1000), tick_nsec(300)) == (4 * MS, MS, 3_333_333)


@pytest.mark.parametrize(("expires", "clk", "fires"), [
    (105, 100, 106),      # level 0 (under 63 jiffies ahead): one jiffy late
    (162, 100, 163),      # 62 ahead: still level 0
    (163, 100, 168),      # 63 ahead: level 1, the next multiple of 8 above
    (168, 100, 176),      # a multiple of 8 goes to the next one
    (100 + 250, 100, 352),  # 1 s at 250 Hz: level 1
    (100 + 504, 100, 640),  # 504 ahead: level 2, multiples of 64
])
def test_timer_wheel_never_fires_early(expires: int, clk: int, fires: int) -> None:
    """calc_wheel_index: level n has a granularity of 8**n jiffies and the bucket's expiry is
    strictly above the timer's (LVL_START(1) = 63, LVL_START(2) = 504)."""
    assert timer_fire_jiffy(expires, clk, 250) == fires


def test_huge_timeouts_are_cut_to_the_wheel() -> None:
    """Beyond WHEEL_TIMEOUT_CUTOFF = 63 << 24 jiffies (9 levels at HZ > 100) the timer is cut
    to the wheel's capacity: the cutoff minus the last level's granularity 8**8, rounded up
    to that granularity."""
    cutoff, gran = 63 << 24, 8**8
    assert timer_fire_jiffy(MAX_JIFFY_OFFSET, 0, 250) == cutoff - gran + gran
    assert timer_fire_jiffy(cutoff - 1, 0, 250) == cutoff - gran + gran


@pytest.mark.parametrize(("sleep_ms", "period_ms"), [
    (1, 8), (4, 8), (5, 12), (8, 12), (10, 16), (20, 24), (50, 56), (100, 104), (300, 320),
    (1000, 1024),
])
def test_sleep_from_a_tick(sleep_ms: int, period_ms: int) -> None:
    """A sleep that starts just after a tick ends on the tick the kernel's timer fires: 20 ms
    is 5 jiffies, fired on the 6th tick (24 ms); 300 ms is 75 jiffies (level 1): from tick 8
    the timer expires at 83, the next multiple of 8 above is 88, 80 jiffies (320 ms); 1000
    ms is 250 jiffies: 258 -> 264, 256 jiffies (1024 ms).  A ksmd woken on a tick of a
    coarse level's granularity sleeps again from there, so these are its periods: the median
    gaps measured on this machine's kernel."""
    start = 8 * 4 * MS + 1000  # 1 us after tick 8
    end = sleep_end_ns(start, sleep_ms, 250)
    assert end == 8 * 4 * MS + period_ms * MS


def test_a_sleep_of_zero_does_not_sleep() -> None:
    assert sleep_end_ns(123, 0, 250) == 123


def test_wake_delays_are_deterministic_with_the_mean_asked() -> None:
    """Exponential quantiles along the golden-ratio sequence: the same every time, mean as given."""
    delays = [wake_delay_ns(k, 2 * MS) for k in range(20000)]
    assert delays == [wake_delay_ns(k, 2 * MS) for k in range(20000)]
    assert statistics.fmean(delays) == pytest.approx(2 * MS, rel=0.02)
    assert statistics.median(delays) == pytest.approx(2 * MS * math.log(2), rel=0.02)
    assert wake_delay_ns(5, 0.0) == 0


# --- the virtual ksmd's clock -------------------------------------------------------------

def machine(kind: type, pages: int, cost: KsmdCost = EXACT, **knobs: str) -> Any:
    """A kernel with one process of *pages* distinct pages, knobs set, run=1 written at 0."""
    k = kind(cost=cost)
    for name, value in knobs.items():
        k.sysfs[name] = value
    p = k.spawn()
    a = p.mmap(pages * PAGE_SIZE)
    p.write(a, b"".join((i + 1).to_bytes(8, "little") * 512 for i in range(pages)))
    p.madvise(a, pages * PAGE_SIZE, MADV_MERGEABLE)
    k.sysfs["run"] = "1"
    return k


@pytest.mark.parametrize("kind", [SimKernel, BulkKernel])
def test_batches_follow_the_timer(kind: type) -> None:
    """pages_to_scan=10 over 35 pages: 4 batches a full scan; the first at once (0), then one
    every 24 ms (20 ms = 5 jiffies, fired on the 6th tick; a batch of 10 pages takes far less
    than a jiffy): the first scan ends with the batch at 72 ms, the second with the one at
    168 ms."""
    k = machine(kind, 35, pages_to_scan="10")
    k.wait_full_scans(1)
    assert k.ksmd.batches == 4
    start = k.now_ns - (k.ksmd.busy_until - k.ksmd.now_ns)
    assert 72 * MS < k.now_ns < 73 * MS
    k.wait_full_scans(1)
    assert k.ksmd.batches == 8 and 168 * MS < k.now_ns < 169 * MS
    assert start <= k.now_ns


@pytest.mark.parametrize("kind", [SimKernel, BulkKernel])
def test_sleep_millisecs_wakes_only_when_changed(kind: type) -> None:
    """ksm_iter_wait's condition is a *changed* sleep_millisecs: the same value written during
    the sleep changes nothing (next batch on the 24 ms tick), a new one runs a batch at once."""
    k = machine(kind, 35, pages_to_scan="10")
    k.advance(5)
    assert k.ksmd.batches == 1
    k.sysfs["sleep_millisecs"] = "20"
    assert k.ksmd.next_wake() == 24 * MS
    k.sysfs["sleep_millisecs"] = "30"
    assert k.ksmd.next_wake() == 5 * MS
    k.advance(0)
    assert k.ksmd.batches == 2


@pytest.mark.parametrize("kind", [SimKernel, BulkKernel])
def test_run_does_not_cut_a_timed_sleep(kind: type) -> None:
    """run=1 wakes ksm_thread_wait only: written again during ksmd's sleep it changes nothing;
    after run=0 and the end of the sleep ksmd blocks, and run=1 then runs a batch at once."""
    k = machine(kind, 35, pages_to_scan="10")
    k.advance(5)
    k.sysfs["run"] = "1"
    assert k.ksmd.next_wake() == 24 * MS
    k.sysfs["run"] = "0"
    k.advance(30)  # the timer fired at 24 ms: ksmd found run=0 and blocked
    assert k.ksmd.batches == 1 and k.ksmd.next_wake() is None
    k.sysfs["run"] = "1"
    assert k.ksmd.next_wake() == 35 * MS


@pytest.mark.parametrize("kind", [SimKernel, BulkKernel])
def test_advance_stops_inside_a_batch(kind: type) -> None:
    """A batch is atomic but takes its CPU time: advance() ends at its target even while the
    batch runs, and the next sleep starts at the batch's end."""
    k = machine(kind, 2000, pages_to_scan="2000")
    k.advance(0.001)  # 1 us: the first batch (2000 new pages) runs from 0 for far longer
    assert k.now_ns == 1000 and k.ksmd.batches == 1
    assert k.ksmd.busy_until == k.ksmd.cpu_ns > 1000


def test_scheduling_delay_is_added_to_timer_wakes_only() -> None:
    """With a mean delay, the k-th timer wake is late by wake_delay_ns(k); the first batch
    after run=1 is not."""
    cost = EXACT.with_clock(wake_delay_ns=float(MS))
    k = machine(SimKernel, 35, cost, pages_to_scan="10")
    k.advance(0)
    assert k.ksmd.batches == 1
    assert k.ksmd.next_wake() == 24 * MS + wake_delay_ns(0, MS)


# --- what each engine counts --------------------------------------------------------------

def ten_identical(kind: type, mps: str = "256", pages: int = 10) -> Any:
    k = kind(cost=EXACT)
    k.sysfs["max_page_sharing"] = mps
    k.sysfs["sleep_millisecs"] = "0"
    p = k.spawn()
    a = p.mmap(pages * PAGE_SIZE)
    p.write(a, b"z" * pages * PAGE_SIZE)
    p.madvise(a, pages * PAGE_SIZE, MADV_MERGEABLE)
    k.sysfs["run"] = "1"
    return k


def counts(k: Any) -> dict[str, int]:
    d = {n: v for n, v in k.ksmd.meter.total.as_dict().items() if v and n != "stable_base"}
    # No THP here, so every page scanned is reached through a PTE (docs/cost-model.md).
    assert d.pop("pte_pages", 0) == d.get("pages", 0), d
    return d


@pytest.mark.parametrize("kind", [SimKernel, BulkKernel])
def test_work_of_ten_identical_pages(kind: type) -> None:
    """Scan 1: 10 new items, checksums (all volatile).  Scan 2: every checksum holds; page 1
    finds nothing and goes into the unstable tree, page 2 finds it there (a new KSM page,
    the tree page merged into it, a new stable entry), pages 3-10 find the KSM page in the
    stable tree and merge (8 equal searches, 8 merges; no page was a KSM page when reached).
    Scan 3: 10 mappings of one KSM page in one batch: that page met once, nothing else."""
    k = ten_identical(kind)
    k.wait_full_scans(1)
    assert counts(k) == {"scan_starts": 1, "mm_ends": 1, "pages": 10, "items": 10,
                         "checksums": 10}
    k.wait_full_scans(1)
    assert counts(k) == {"scan_starts": 2, "mm_ends": 2, "pages": 20, "items": 10,
                         "checksums": 20, "stable_searches": 10, "stable_equal": 8,
                         "unstable_searches": 2, "unstable_inserts": 1, "unstable_equal": 1,
                         "new_ksm": 1, "merges": 9, "stable_inserts": 1, "stable_new": 1}
    k.wait_full_scans(1)
    assert counts(k)["pages"] == 30 and counts(k)["checksums"] == 20
    assert counts(k)["ksm_frames"] == 1


ENGINES = [SimKernel, BulkKernel, functools.partial(BulkKernel, vectorize=False)]
"""SimKernel, and the bulk engine's vectorised and per-page paths."""


def merged(kind: Any, procs: int, pages: int, tag: Any) -> Any:
    """*procs* processes of *pages* pages, page i of process p holding ``tag(p, i)``, at the
    default 100 pages every 20 ms, after the two full scans that merge them."""
    k = kind(cost=EXACT)
    for p in range(procs):
        proc = k.spawn()
        a = proc.mmap(pages * PAGE_SIZE)
        proc.write(a, b"".join(tag(p, i).to_bytes(8, "little") * 512 for i in range(pages)))
        proc.madvise(a, pages * PAGE_SIZE, MADV_MERGEABLE)
    k.sysfs["run"] = "1"
    k.wait_full_scans(2)
    return k


def frames_met_per_batch(k: Any) -> list[int]:
    """Each batch's ``ksm_frames`` over the next full scan."""
    scans, out = k.ksmd.engine.full_scans, []
    while k.ksmd.engine.full_scans == scans:
        assert k.ksmd.batch()
        out.append(int(k.ksmd.meter.last["ksm_frame"]))
    return out


@pytest.mark.parametrize("kind", ENGINES)
def test_a_batch_meets_each_ksm_page_once(kind: Any) -> None:
    """8 processes x 30 identical pages: 240 mappings of one KSM page (under max_page_sharing
    256).  The merging scan reaches no page that is a KSM page already (merged pages do not
    count): 0.  A steady scan of 240 pages at 100 a batch is ceil(240 / 100) = 3 batches
    (100, 100, 40 pages), each meeting that one page: 1, 1, 1.  A fork of one process adds
    30 mappings of it (270 pages, still 3 batches): the scan where the child's pages join
    the node and the steady one after it meet that one page once a batch."""
    k = merged(kind, 8, 30, lambda p, i: 7)
    assert k.ksmd.meter.total.ksm_frames == 0 and k.sysfs["pages_sharing"] == "239"
    assert frames_met_per_batch(k) == [1, 1, 1]
    next(iter(k.processes.values())).fork()
    assert frames_met_per_batch(k) == [1, 1, 1]  # the child's mappings join the node
    assert frames_met_per_batch(k) == [1, 1, 1] and k.sysfs["pages_sharing"] == "269"


@pytest.mark.parametrize("kind", ENGINES)
def test_every_page_of_a_batch_a_different_ksm_page(kind: Any) -> None:
    """256 contents x 8 processes, process-major (page i of every process holds content i):
    256 KSM pages of 8 mappings.  A steady scan of 2048 pages at 100 a batch is 20 batches of
    100 and one of 48; within a process a batch's pages are all different contents, and a
    batch across two processes takes the end of one (contents >= 156) and the start of the
    next (contents < 100): 100 distinct KSM pages a batch, 48 in the last, 2048 in all."""
    k = merged(kind, 8, 256, lambda p, i: 1 + i)
    assert k.sysfs["pages_shared"] == "256" and k.sysfs["pages_sharing"] == str(256 * 7)
    assert frames_met_per_batch(k) == [100] * 20 + [48]


@pytest.mark.parametrize("kind", [SimKernel, BulkKernel])
def test_chain_walks_are_counted(kind: type) -> None:
    """max_page_sharing=2, 6 identical pages, scan 2: pages 1-2 form KSM page A (full);
    page 3 finds A full (a regular node: no dup walked) and is inserted in the unstable tree;
    page 4 finds A full, then page 3: KSM page B, filed as a dup beside A (a chain of 2);
    page 5 walks both full dups (2) and goes to the unstable tree; page 6 walks them (2),
    finds page 5: KSM page C, whose insert walks the chain again (2): 6 dups in all."""
    k = ten_identical(kind, mps="2", pages=6)
    k.wait_full_scans(2)
    c = counts(k)
    assert c["chain_dups"] == 6 and c["new_ksm"] == 3 and c["stable_new"] == 1
    assert (c["stable_equal"], c["unstable_inserts"], c["unstable_equal"]) == (4, 3, 3)
    assert k.sysfs["stable_node_dups"] == "3"


def test_the_model_of_tree_walks() -> None:
    """A search of a tree of s entries visits log2(s + 1) nodes, averaged over a batch's growth:
    empty tree 0, one entry 1, 3 entries 2; from 0 to 1 entries the mean of log2(x + 1) over
    [0, 1] is 2 log2(2) - 1/ln 2 = 2 - 1.4427 = 0.5573."""
    assert (mean_depth(0, 0), mean_depth(1, 1), mean_depth(3, 3)) == (0.0, 1.0, 2.0)
    assert mean_depth(0, 1) == pytest.approx(2 - 1 / math.log(2))
    w = KsmdWork(stable_searches=4, stable_equal=3, unstable_searches=2, unstable_equal=1,
                 merges=3, pages=4, checksums=4)
    f = features(w, (3, 3), (1, 1))
    # Stable: 4 walks x 2 nodes, of which 3 are equal compares; unstable: 2 x 1, 1 equal.
    assert (f["stable_step"], f["unstable_step"]) == (5.0, 1.0)
    assert f["full_cmp"] == 3 + 1 + 3  # the equal nodes and each merge's pages_identical
    assert set(f) == set(FEATURES)


def test_cost_of_a_batch_is_the_sum_of_its_terms() -> None:
    ns = dict.fromkeys(FEATURES, 0.0) | {"batch": 1000.0, "page": 10.0, "checksum": 2.5}
    cost = KsmdCost(ns)
    w = KsmdWork(pages=4, checksums=4)
    assert cost.cost_ns(features(w, (0, 0), (0, 0))) == 1000 + 4 * 10 + 10


def test_the_busy_machine_factor_scales_every_batch() -> None:
    """cpu_scale multiplies the terms' sum: (1000 + 4 x 10 + 4 x 2.5) x 1.25 = 1312.5 -> 1312
    (rounded half to even, as Python rounds)."""
    ns = dict.fromkeys(FEATURES, 0.0) | {"batch": 1000.0, "page": 10.0, "checksum": 2.5}
    w = KsmdWork(pages=4, checksums=4)
    assert KsmdCost(ns, cpu_scale=1.25).cost_ns(features(w, (0, 0), (0, 0))) == 1312
    assert KsmdCost(ns).cpu_scale == 1.0  # no factor unless asked


@pytest.mark.parametrize(("value", "error", "message"), [
    (0, ValueError, "cpu_scale must be > 0, got 0"),
    (-1.5, ValueError, r"cpu_scale must be a finite number >= 0, got -1.5"),
    (math.inf, ValueError, "cpu_scale must be a finite number"),
    (True, TypeError, "cpu_scale must be a number, got True"),
    ("1.2", TypeError, "cpu_scale must be a number, got '1.2'"),
])
def test_a_bad_busy_machine_factor_is_refused(value: Any, error: type[Exception],
                                              message: str) -> None:
    with pytest.raises(error, match=message):
        KsmdCost(dict(EXACT.ns), cpu_scale=value)


@pytest.mark.parametrize("kind", [SimKernel, BulkKernel])
def test_both_engines_charge_the_factor(kind: type) -> None:
    """Every term 0 but 1 ms per batch, and a factor of 1.5: each batch costs 1.5 ms, in
    either engine (the first batch runs at once after run=1)."""
    ns = dict.fromkeys(FEATURES, 0.0) | {"batch": 1e6}
    k = kind(cost=KsmdCost(ns, KsmdClock(hz=250), cpu_scale=1.5))
    p = k.spawn()
    a = p.mmap(4 * PAGE_SIZE)
    p.write(a, b"x" * 4 * PAGE_SIZE)
    p.madvise(a, 4 * PAGE_SIZE, MADV_MERGEABLE)
    k.sysfs["run"] = "1"
    assert k.ksmd.batch()
    assert k.ksmd.cpu_ns == 1_500_000


# --- the cost file -----------------------------------------------------------------------

def test_cost_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    EXACT.save(path)
    loaded = KsmdCost.load(path)
    assert loaded.ns == EXACT.ns and loaded.clock == EXACT.clock
    assert loaded.source == str(path)
    scaled = KsmdCost(dict(EXACT.ns), EXACT.clock, cpu_scale=1.2)
    scaled.save(path)
    assert KsmdCost.load(path).cpu_scale == 1.2


def test_a_cost_file_without_the_factor_has_none(tmp_path: Path) -> None:
    """Files written before the busy-machine factor load with cpu_scale 1 (no disturbance)."""
    doc = EXACT.to_dict()
    del doc["cpu_scale"]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(doc))
    assert KsmdCost.load(path).cpu_scale == 1.0


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d.pop("format"), 'not a ksmd cost file'),
    (lambda d: d.update(version=2), "version 2 is not 1"),
    (lambda d: d.update(extra=1), "unknown field.*extra"),
    (lambda d: d["ns"].pop("page"), '"ns" must give exactly'),
    (lambda d: d["ns"].update(page=-1), r"ns\.page must be a finite number >= 0, got -1"),
    (lambda d: d["ns"].update(page=True), r"ns\.page must be a number, got True"),
    (lambda d: d["ns"].update(page="5"), r"ns\.page must be a number"),
    (lambda d: d["clock"].update(run_stretch=0.5), "run_stretch must be >= 1"),
    (lambda d: d["clock"].update(hz=0), "clock.hz"),
    (lambda d: d["clock"].pop("hz"), '"clock" must give'),
    (lambda d: d.update(cpu_scale=0), "cpu_scale must be > 0"),
    (lambda d: d.update(cpu_scale="x"), "cpu_scale must be a number"),
])
def test_bad_cost_files_are_refused_naming_the_field(tmp_path: Path, change: Any,
                                                     message: str) -> None:
    doc = EXACT.to_dict()
    change(doc)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=message) as e:
        KsmdCost.load(path)
    assert str(path) in str(e.value)


def test_not_json_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text("{")
    with pytest.raises(ValueError, match="not JSON"):
        KsmdCost.load(tmp_path / "x.json")
    with pytest.raises(FileNotFoundError):
        KsmdCost.load(tmp_path / "none.json")


def test_kernels_take_a_cost_model_only() -> None:
    with pytest.raises(TypeError, match="cost must be a KsmdCost or None"):
        SimKernel(cost="ksmd-cost.json")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="cost must be a KsmdCost or None"):
        BulkKernel(cost=KsmdClock())  # type: ignore[arg-type]


def test_the_shipped_model_is_a_fitted_file() -> None:
    cost = default_cost()
    assert cost.source == "defaults" and cost.clock.hz == 250
    assert all(cost.ns[f] >= 0 for f in FEATURES)


# --- the real ksmd --------------------------------------------------------------------------

@pytest.mark.linux
@pytest.mark.slow
def test_real_ksmd_period_follows_the_timer_wheel() -> None:
    """On this machine's kernel the median gap between ksmd's batches (one page: a batch per
    full scan) is the model's: 8 ms for sleep_millisecs=1 and 24 ms for 20 at HZ=250
    (delays only lengthen some gaps, so the median stays on the tick)."""
    from ksmlab.backends.linux import LinuxKernel, linux_ksm_unavailable_reason
    from ksmlab.calibrate import config_hz

    reason = linux_ksm_unavailable_reason()
    if reason:
        pytest.skip(reason)
    hz = config_hz() or 250
    with LinuxKernel() as k:
        p = k.spawn()
        a = p.mmap(PAGE_SIZE)
        p.write(a, b"x" * PAGE_SIZE)
        p.madvise(a, PAGE_SIZE, MADV_MERGEABLE)
        for sleep in (1, 20):
            k.sysfs["sleep_millisecs"] = str(sleep)
            k.sysfs["run"] = "1"
            times, last = [], int(k.sysfs["full_scans"])
            end = time.monotonic() + 1.5
            while time.monotonic() < end:
                cur = int(k.sysfs["full_scans"])
                if cur != last:
                    times.append((time.monotonic(), cur - last))
                    last = cur
                time.sleep(0.0003)
            k.sysfs["run"] = "0"
            gaps = [b[0] - a[0] for a, b in itertools.pairwise(times) if b[1] == 1]
            want = (sleep_end_ns(1000, sleep, hz) - 0) / 1e9  # from just after a tick
            assert statistics.median(gaps) == pytest.approx(want, abs=0.0015), gaps


@pytest.mark.linux
def test_real_ksmd_wait_queues() -> None:
    """On this machine's kernel, during a 5 s sleep: writing run=1 again or the same
    sleep_millisecs leaves ksmd asleep (no batch within 0.5 s); a changed sleep_millisecs
    runs a batch at once (the model's Ksmd.wake_up follows this)."""
    from ksmlab.backends.linux import LinuxKernel, linux_ksm_unavailable_reason

    reason = linux_ksm_unavailable_reason()
    if reason:
        pytest.skip(reason)
    with LinuxKernel() as k:
        p = k.spawn()
        a = p.mmap(PAGE_SIZE)
        p.write(a, b"w" * PAGE_SIZE)
        p.madvise(a, PAGE_SIZE, MADV_MERGEABLE)
        k.sysfs["sleep_millisecs"] = "5000"
        before = int(k.sysfs["full_scans"])
        k.sysfs["run"] = "1"  # a batch (a whole full scan) at once, then a 5 s sleep
        deadline = time.monotonic() + 2
        while int(k.sysfs["full_scans"]) == before and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(0.05)
        scans = k.sysfs["full_scans"]
        assert int(scans) == before + 1
        k.sysfs["run"] = "1"
        k.sysfs["sleep_millisecs"] = "5000"
        time.sleep(0.5)
        assert k.sysfs["full_scans"] == scans
        k.sysfs["sleep_millisecs"] = "4000"
        time.sleep(0.2)
        assert int(k.sysfs["full_scans"]) == int(scans) + 1
        k.sysfs["run"] = "0"


def walk_start_per_batch(k: Any) -> list[float]:
    """Each batch's ``walk_start`` feature over the next full scan."""
    scans, out = k.ksmd.engine.full_scans, []
    while k.ksmd.engine.full_scans == scans:
        assert k.ksmd.batch()
        out.append(k.ksmd.meter.last["walk_start"])
    return out


@pytest.mark.parametrize("kind", ENGINES)
def test_walk_start_counts_the_first_pages_of_each_batch(kind: Any) -> None:
    """8 processes x 30 pages at 100 pages a batch: a full scan of 240 pages is batches of
    100, 100 and 40 pages, each paying walk_start for its first WALK_START_PAGES (16)
    pages: 16, 16, 16.  At pages_to_scan 7 the 240 pages are 34 batches of 7 and one of 2:
    7 each, then 2."""
    assert WALK_START_PAGES == 16
    k = merged(kind, 8, 30, lambda p, i: 7)
    assert walk_start_per_batch(k) == [16.0, 16.0, 16.0]
    k.sysfs["pages_to_scan"] = "7"
    walk_start_per_batch(k)  # the scan the new batch size starts in the middle of
    assert walk_start_per_batch(k) == [7.0] * 34 + [2.0]

