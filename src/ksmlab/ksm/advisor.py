"""The scan-time advisor: adapts pages_to_scan to hit a target full-scan time (``scan_time_advisor``)."""

from __future__ import annotations

from dataclasses import dataclass

from ksmlab.ksm.defaults import (
    DEFAULT_ADVISOR_MAX_CPU,
    DEFAULT_ADVISOR_MAX_PAGES_TO_SCAN,
    DEFAULT_ADVISOR_MIN_PAGES_TO_SCAN,
    DEFAULT_ADVISOR_TARGET_SCAN_TIME,
    NS_PER_MS,
    U32,
)


@dataclass(slots=True)
class AdvisorCtx:
    """State carried between full scans (the kernel's ``struct advisor_ctx``).

    Attributes:
        start_scan_ms: virtual time the current full scan started.
        scan_time_s: duration of the previous full scan, in whole seconds.
        change: smoothed change factor (percent, EWMA).
        cpu_time_ns: ksmd's CPU time at the end of the previous full scan.
    """

    start_scan_ms: float = 0.0
    scan_time_s: int = 0
    change: int = 0
    cpu_time_ns: int = 0


@dataclass(slots=True)
class AdvisorKnobs:
    """The advisor's sysfs knobs and their defaults.

    Attributes:
        max_cpu: ``advisor_max_cpu``, percent of one CPU (stored as 32 bits).
        min_pages_to_scan: ``advisor_min_pages_to_scan``: start value of pages_to_scan.
        max_pages_to_scan: ``advisor_max_pages_to_scan``: upper bound.
        target_scan_time: ``advisor_target_scan_time`` in seconds (>= 1).
    """

    max_cpu: int = DEFAULT_ADVISOR_MAX_CPU
    min_pages_to_scan: int = DEFAULT_ADVISOR_MIN_PAGES_TO_SCAN
    max_pages_to_scan: int = DEFAULT_ADVISOR_MAX_PAGES_TO_SCAN
    target_scan_time: int = DEFAULT_ADVISOR_TARGET_SCAN_TIME


def scan_time_advisor(ctx: AdvisorCtx, knobs: AdvisorKnobs, *, now_ms: float,
                      cpu_ns: int, pages_to_scan: int) -> int:
    """New pages_to_scan at the end of a full scan (``scan_time_advisor``).

    Integer arithmetic throughout, as in the kernel; the result is truncated
    to the 32 bits of ``ksm_thread_pages_to_scan``.
    """
    scan_time_s = max(1, int(now_ms - ctx.start_scan_ms) // 1000)
    cpu_ms = (cpu_ns - ctx.cpu_time_ns) // NS_PER_MS
    cpu_percent = max(1, cpu_ms * 100 // (scan_time_s * 1000))
    last_scan_time = ctx.scan_time_s if ctx.scan_time_s else scan_time_s
    factor = max(1, knobs.target_scan_time * 100 // scan_time_s)
    change_raw = max(1, scan_time_s * 100 // last_scan_time)
    change = (70 * ctx.change + 30 * change_raw) // 100
    pages = pages_to_scan * 100 // factor
    pages = pages * change // 100
    per_percent = max(1, pages_to_scan // cpu_percent)
    pages = min(pages, per_percent * knobs.max_cpu)
    pages = max(pages, per_percent * 10)
    pages = min(pages, knobs.max_pages_to_scan)
    ctx.change, ctx.scan_time_s, ctx.cpu_time_ns = change, scan_time_s, cpu_ns
    return pages & U32
