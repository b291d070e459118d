"""The scan-time advisor (spec §3.11), checked against hand arithmetic."""

from __future__ import annotations

from ksmlab import MADV_MERGEABLE, PAGE_SIZE, SimKernel
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
