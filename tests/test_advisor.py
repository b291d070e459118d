"""The scan-time advisor (spec §3.11), checked against hand arithmetic, on every engine."""

from __future__ import annotations

import errno
from collections.abc import Callable

import pytest

from ksmlab import MADV_MERGEABLE, PAGE_SIZE, SimKernel
from ksmlab.bulk import BulkKernel
from ksmlab.ksm.advisor import AdvisorCtx, AdvisorKnobs, scan_time_advisor


def test_first_scan_is_held_at_ten_percent_cpu() -> None:
    """A 3 s first scan using 300 ms of CPU keeps pages_to_scan at 500.

    scan_s = 3, cpu_pct = 300*100 // 3000 = 10, factor = 20000 // 3 = 6666,
    change = (70*0 + 30*100) // 100 = 30, pages = 500*100 // 6666 = 7 -> 7*30 // 100 = 2,
    per_pct = 500 // 10 = 50, min(2, 50*70) = 2, max(2, 50*10) = 500, min(500, 30000) = 500.
    """
    ctx = AdvisorCtx(start_scan_ms=0.0)
    assert scan_time_advisor(ctx, AdvisorKnobs(), now_ms=3000.0,
                                    cpu_ns=300_000_000, pages_to_scan=500) == 500
    assert (ctx.change, ctx.scan_time_s, ctx.cpu_time_ns) == (30, 3, 300_000_000)


def test_slow_scan_grows_until_the_cpu_cap() -> None:
    """A 400 s scan (twice the 200 s target) at 5% CPU asks for more pages, capped by max_cpu.

    Previous state: change 100, last scan 200 s.  scan_s = 400, cpu_ms = 20000,
    cpu_pct = 20000*100 // 400000 = 5, factor = 20000 // 400 = 50,
    change_raw = 400*100 // 200 = 200, change = (7000 + 6000) // 100 = 130,
    pages = 1000*100 // 50 = 2000 -> 2000*130 // 100 = 2600, per_pct = 1000 // 5 = 200,
    min(2600, 200*70 = 14000) = 2600, max(2600, 2000) = 2600, min(2600, 30000) = 2600.
    """
    ctx = AdvisorCtx(start_scan_ms=1000.0, scan_time_s=200, change=100, cpu_time_ns=0)
    knobs = AdvisorKnobs()
    assert scan_time_advisor(ctx, knobs, now_ms=401_000.0, cpu_ns=20_000_000_000,
                                     pages_to_scan=1000) == 2600
    knobs.max_pages_to_scan = 2500
    ctx = AdvisorCtx(start_scan_ms=1000.0, scan_time_s=200, change=100, cpu_time_ns=0)
    assert scan_time_advisor(ctx, knobs, now_ms=401_000.0, cpu_ns=20_000_000_000,
                                     pages_to_scan=1000) == 2500


def test_advisor_runs_at_the_end_of_each_full_scan() -> None:
    """With advisor_mode=scan-time, every full scan ends with one ksm_advisor event."""
    k = SimKernel()
    k.sysfs["advisor_mode"] = "scan-time"
    assert k.sysfs["pages_to_scan"] == "500"  # advisor_min_pages_to_scan, spec §3.11
    p = k.spawn()
    a = p.mmap(64 * PAGE_SIZE)
    p.write(a, b"x" * 64 * PAGE_SIZE)
    p.madvise(a, 64 * PAGE_SIZE, MADV_MERGEABLE)
    k.sysfs["run"] = "1"
    k.wait_full_scans(3)
    assert sum(1 for e in k.events if e.name == "ksm_advisor") == 3


# --- every engine runs this advisor ---------------------------------------------------------

ENGINES: dict[str, Callable[[], SimKernel | BulkKernel]] = {
    "sim": lambda: SimKernel(trace=False),
    "sim-fingerprint": lambda: SimKernel(trace=False, content="fingerprint"),
    "bulk": BulkKernel,
    "bulk-per-page": lambda: BulkKernel(vectorize=False),
}


@pytest.mark.parametrize("engine", list(ENGINES))
def test_pages_to_scan_sequence_by_arithmetic(engine: str) -> None:
    """100 distinct pages, advisor_min_pages_to_scan 10, sleep_millisecs 1000, ksmd's cost
    model (2 us a batch + 3 us a page scanned): pages_to_scan goes 10 -> 100 -> 1000.

    Scan 1 starts at 0 ms; batches 1-10 scan 10 pages each (32 us) and sleep 1 s;
    batch 11 finds the end at 10 * 1000 ms + 10 * 0.032 ms: scan_s = 10, cpu_ms =
    320 us // 1 ms = 0 so cpu_pct = 1, factor = 20000 // 10 = 2000, change = 30 * 100
    // 100 = 30, pages = 10 * 100 // 2000 = 0, per_pct = 10: max(0, 10 * 10) = 100.
    Scan 2 starts at batch 12, which scans all 100 pages; batch 13 ends it 1000.302 ms
    later: scan_s = 1, cpu_ms = (624 - 320) us // 1 ms = 0 so cpu_pct = 1, factor =
    20000, change_raw = 100 // 10 = 10, change = (70 * 30 + 30 * 10) // 100 = 24,
    pages = 0, per_pct = 100: max(0, 100 * 10) = 1000.
    """
    k = ENGINES[engine]()
    k.sysfs["advisor_min_pages_to_scan"] = "10"
    k.sysfs["advisor_mode"] = "scan-time"
    k.sysfs["sleep_millisecs"] = "1000"
    p = k.spawn()
    a = p.mmap(100 * PAGE_SIZE)
    p.write(a, b"".join(i.to_bytes(8, "little") * (PAGE_SIZE // 8) for i in range(1, 101)))
    p.madvise(a, 100 * PAGE_SIZE, MADV_MERGEABLE)
    k.sysfs["run"] = "1"
    seen = [k.sysfs["pages_to_scan"]]
    for _ in range(2):
        k.wait_full_scans(1)
        seen.append(k.sysfs["pages_to_scan"])
    assert seen == ["10", "100", "1000"]
    assert k.ksmd.batches == 13


@pytest.mark.parametrize("engine", list(ENGINES))
def test_mode_switch_resets_and_locks_pages_to_scan(engine: str) -> None:
    """Spec 3.11: to scan-time, pages_to_scan = advisor_min_pages_to_scan (kept as 32 bits:
    2**32 + 7 gives 7), and writing pages_to_scan is EINVAL; writing the mode it has
    changes nothing; back to none, pages_to_scan = 100."""
    k = ENGINES[engine]()
    k.sysfs["advisor_min_pages_to_scan"] = str(2**32 + 7)
    k.sysfs["advisor_mode"] = "scan-time"
    assert (k.sysfs["advisor_mode"], k.sysfs["pages_to_scan"]) == ("none [scan-time]", "7")
    with pytest.raises(OSError) as info:
        k.sysfs["pages_to_scan"] = "5"
    assert info.value.errno == errno.EINVAL
    k.sysfs["advisor_min_pages_to_scan"] = "9"
    k.sysfs["advisor_mode"] = "scan-time\n"
    assert k.sysfs["pages_to_scan"] == "7"
    k.sysfs["advisor_mode"] = "none"
    assert (k.sysfs["advisor_mode"], k.sysfs["pages_to_scan"]) == ("[none] scan-time", "100")
    with pytest.raises(OSError) as info:
        k.sysfs["advisor_mode"] = "scan_time"
    assert info.value.errno == errno.EINVAL


ADVISED_SCENARIO = """
[scenario]
name = "the advisor paces ksmd"
seed = 2
[ksm]
advisor_min_pages_to_scan = 20
advisor_target_scan_time = 2
advisor_mode = "scan-time"
sleep_millisecs = 200
[content.same]
kind = "image"
pages = 96
[[process]]
name = "p"
count = 3
[[process.mapping]]
name = "buf"
pages = 96
content = "same"
[[checkpoint]]
name = "merged"
at = "40s"
expect = { pages_shared = 96, pages_sharing = 192 }
"""
"""3 x 96 identical pages under the advisor: 96 KSM pages of 3 sharers once merged."""


def test_advised_scenario_on_the_bulk_engine_is_simkernels() -> None:
    """A scenario with the advisor's knobs runs on the bulk engine (ksmlab run --backend
    bulk) and gives SimKernel's run: every checkpoint and timeline sample, whose pace
    (full_scans, pages_scanned over time) is the advisor's."""
    from pathlib import Path

    from ksmlab.report.document import to_document
    from ksmlab.scenario.backends import BulkBackend, SimBackend
    from ksmlab.scenario.loader import parse_scenario
    from ksmlab.scenario.runner import run_scenario

    sc = parse_scenario(ADVISED_SCENARIO, source="<test>", base_dir=Path("."))
    docs = []
    for backend in (BulkBackend(), SimBackend("fingerprint")):
        try:
            doc = to_document(run_scenario(sc, backend))
        finally:
            backend.close()
        assert isinstance(doc, dict)
        doc.pop("backend"), doc.pop("machine")
        docs.append(doc)
    assert docs[0] == docs[1]
    assert docs[0]["ok"], docs[0]["checkpoints"]
    assert docs[0]["knobs"]["advisor_mode"] == "scan-time"
