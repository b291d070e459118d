"""The scan-time advisor: adapts pages_to_scan to hit a target full-scan time (``scan_time_advisor``).

Every engine runs this one advisor: its scan calls :func:`advisor_start_scan`
and :func:`advisor_stop_scan` where the kernel's ``scan_get_next_rmap_item``
does (a full scan's start and end), with the virtual clock and ksmd's CPU
time of the shared ksmd (:mod:`ksmlab.ksm.ksmd`), and its ``advisor_mode``
store calls :func:`set_advisor_mode`.  The state they work on is the
engine's :class:`AdvisedScan` part (the tunables of
:class:`ksmlab.ksm.tunables.KsmTunables`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ksmlab.ksm.defaults import (
    DEFAULT_ADVISOR_MAX_CPU,
    DEFAULT_ADVISOR_MAX_PAGES_TO_SCAN,
    DEFAULT_ADVISOR_MIN_PAGES_TO_SCAN,
    DEFAULT_ADVISOR_TARGET_SCAN_TIME,
    DEFAULT_PAGES_TO_SCAN,
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


class AdvisedScan(Protocol):
    """What the advisor reads and sets on an engine's KSM state."""

    pages_to_scan: int
    advisor_scan_time: bool
    advisor: AdvisorKnobs
    advisor_ctx: AdvisorCtx


def advisor_start_scan(ksm: AdvisedScan, now_ms: float) -> None:
    """A full scan starts: note the time if the advisor is on (``advisor_start_scan``)."""
    if ksm.advisor_scan_time:
        ksm.advisor_ctx.start_scan_ms = now_ms


def advisor_stop_scan(ksm: AdvisedScan, now_ms: float, cpu_ns: int) -> bool:
    """A full scan ended: the advisor sets ``pages_to_scan`` (``advisor_stop_scan``).

    Returns whether the advisor ran (it is on), for the caller's trace record.
    """
    if not ksm.advisor_scan_time:
        return False
    ksm.pages_to_scan = scan_time_advisor(ksm.advisor_ctx, ksm.advisor, now_ms=now_ms,
                                          cpu_ns=cpu_ns, pages_to_scan=ksm.pages_to_scan)
    return True


def set_advisor_mode(ksm: AdvisedScan, scan_time: bool) -> None:
    """``advisor_mode_store`` after parsing: a real change resets ``pages_to_scan``
    (``set_advisor_defaults``): to ``advisor_min_pages_to_scan`` with fresh advisor
    state under scan-time, to the boot value under none (spec 3.11)."""
    if scan_time == ksm.advisor_scan_time:
        return
    ksm.advisor_scan_time = scan_time
    if scan_time:
        ksm.advisor_ctx = AdvisorCtx()
        ksm.pages_to_scan = ksm.advisor.min_pages_to_scan & U32
    else:
        ksm.pages_to_scan = DEFAULT_PAGES_TO_SCAN
