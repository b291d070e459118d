"""The answer first: what a run saved, how fast, and what ksmd cost, in a few figures.

Computed from a :class:`~ksmlab.scenario.result.RunResult` alone (so a result
read back from JSON gives the same figures), at the end of the run, i.e. the
last timeline sample (an interrupted run: where it stopped):

* **memory saved**: ``general_profit`` (bytes saved net of KSM's metadata),
  and as a percentage of the **mergeable memory**: the pages the declared
  process groups make mergeable as they start (``mergeable`` mappings, or
  every mapping of a ``merge_any`` group); forks and later madvise calls are
  not counted;
* **time to 50 % and to 90 %** of that saving: the first timeline sample at
  which ``general_profit`` reached that share of its final value (so they are
  resolved to the sampling interval, ``--sample``); none when nothing is saved;
* **ksmd's cost**: its CPU time, as a share of one CPU over the run, and in
  CPU-seconds per GiB saved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ksmlab.constants import PAGE_SIZE
from ksmlab.scenario.result import TIMELINE_COLUMNS, RunResult
from ksmlab.scenario.units import format_bytes, format_duration

GIB = 1 << 30
_TIME = TIMELINE_COLUMNS.index("time_s")
_PROFIT = TIMELINE_COLUMNS.index("general_profit")
_CPU = TIMELINE_COLUMNS.index("ksmd_cpu_s")


@dataclass(frozen=True, slots=True)
class Headline:
    """The figures of :func:`headline`; None where a figure does not exist (see the module)."""

    at_s: float
    saved_bytes: int | None
    mergeable_bytes: int
    saved_percent: float | None
    time_to_50_s: float | None
    time_to_90_s: float | None
    sample_interval_s: float | None
    ksmd_cpu_s: float | None
    ksmd_cpu_percent: float | None
    cpu_s_per_gib_saved: float | None


def _first_reaching(rows: tuple[tuple[float, ...], ...], level: float) -> float | None:
    for row in rows:
        if row[_PROFIT] >= level:
            return row[_TIME]
    return None


def headline(r: RunResult) -> Headline:
    """The figures of *r*, at its last timeline sample."""
    mergeable = r.scenario.mergeable_pages * PAGE_SIZE
    interval = r.scenario.sample_interval_s
    if not r.timeline:  # interrupted while setting up: nothing measured
        return Headline(r.end_s, None, mergeable, None, None, None, interval, None, None, None)
    last = r.timeline[-1]
    at, saved = last[_TIME], int(last[_PROFIT])
    cpu = None if math.isnan(last[_CPU]) else last[_CPU]
    t50 = t90 = per_gib = None
    if saved > 0:
        t50 = _first_reaching(r.timeline, 0.5 * saved)
        t90 = _first_reaching(r.timeline, 0.9 * saved)
        per_gib = None if cpu is None else cpu / (saved / GIB)
    return Headline(
        at, saved, mergeable, 100 * saved / mergeable if mergeable else None, t50, t90, interval,
        cpu, None if cpu is None or at <= 0 else 100 * cpu / at, per_gib)


def headline_document(h: Headline) -> dict[str, Any]:
    """The JSON ``summary`` object (docs/cli.md)."""
    return {
        "at_s": h.at_s,
        "saved_bytes": h.saved_bytes,
        "mergeable_bytes": h.mergeable_bytes,
        "saved_percent_of_mergeable": h.saved_percent,
        "time_to_50_percent_s": h.time_to_50_s,
        "time_to_90_percent_s": h.time_to_90_s,
        "sample_interval_s": h.sample_interval_s,
        "ksmd_cpu_s": h.ksmd_cpu_s,
        "ksmd_cpu_percent": h.ksmd_cpu_percent,
        "ksmd_cpu_s_per_gib_saved": h.cpu_s_per_gib_saved,
    }


def _percent(x: float) -> str:
    return f"{x:.1f}%" if abs(x) < 10 else f"{x:.0f}%"


def headline_lines(r: RunResult, h: Headline | None = None) -> list[tuple[str, str]]:
    """(label, sentence) pairs, the answer in words, for the terminal and the HTML report."""
    h = headline(r) if h is None else h
    clock = "real" if r.backend == "linux" else "virtual"
    when = format_duration(h.at_s)
    lines: list[tuple[str, str]] = []
    if r.interrupted is not None:
        total = len(r.checkpoints)
        lines.append(("Interrupted", f"by {r.interrupted} at {when} ({clock} time): a partial "
                                     f"result, {total} checkpoint{'s' if total != 1 else ''} "
                                     f"reached; the figures are at the interruption"))
    if h.saved_bytes is None:
        lines.append(("Memory saved", "nothing was measured (stopped while setting up)"))
        return lines
    of = f"the {format_bytes(h.mergeable_bytes)} made mergeable"
    if h.saved_bytes <= 0:
        saved = (f"{format_bytes(h.saved_bytes)} at {when}: nothing saved (KSM's metadata "
                 f"outweighs the pages merged) of {of}")
    else:
        share = "" if h.saved_percent is None else f", {_percent(h.saved_percent)} of {of}"
        saved = f"{format_bytes(h.saved_bytes)} at {when}{share} (general_profit)"
    lines.append(("Memory saved", saved))
    if h.time_to_50_s is not None and h.time_to_90_s is not None:
        every = ("" if h.sample_interval_s is None
                 else f", to within the {format_duration(h.sample_interval_s)} between samples")
        lines.append(("Time to merge", f"50% of that saving by {format_duration(h.time_to_50_s)}, "
                                       f"90% by {format_duration(h.time_to_90_s)} ({clock} "
                                       f"time{every})"))
    if h.ksmd_cpu_s is None:
        lines.append(("ksmd's cost", "its CPU time could not be read"))
    else:
        share = "" if h.ksmd_cpu_percent is None else f", {h.ksmd_cpu_percent:.2g}% of one CPU"
        per = ("" if h.cpu_s_per_gib_saved is None
               else f"; {h.cpu_s_per_gib_saved:.3g} CPU-seconds per GiB saved")
        lines.append(("ksmd's cost", f"{format_duration(h.ksmd_cpu_s)} of CPU in {when}{share}"
                                     f"{per}"))
    return lines


__all__ = ["Headline", "headline", "headline_document", "headline_lines"]
