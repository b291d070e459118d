"""``ksmlab stat``: the KSM counters of the machine it runs on, with rates.

It only reads (``/sys/kernel/mm/ksm/*`` and ``/proc/<pid of ksmd>/stat``, both
world-readable), so it works unprivileged.  Rates come from two snapshots:

* **merged/s**: growth of ``pages_sharing + ksm_zero_pages`` per second, i.e.
  pages freed by merging per second (negative while pages are un-merged);
* **scanned/s**: growth of ``pages_scanned`` per second;
* **full scans/min**: growth of ``full_scans`` per minute;
* **ksmd CPU**: ksmd's CPU time per elapsed time, percent of one CPU.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from rich.table import Table

from ksmlab.errors import KsmSimError
from ksmlab.scenario import host
from ksmlab.scenario.knobs import read_knob
from ksmlab.scenario.units import format_bytes

STAT_COUNTERS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
                 "ksm_zero_pages", "general_profit", "full_scans", "pages_scanned",
                 "pages_skipped", "stable_node_chains", "stable_node_dups")
STAT_KNOBS = ("run", "pages_to_scan", "sleep_millisecs", "use_zero_pages", "smart_scan",
              "max_page_sharing", "merge_across_nodes", "advisor_mode")
STAT_SCHEMA = "ksmlab.stat/1"


class KsmUnreadableError(KsmSimError, RuntimeError):
    """The KSM sysfs directory is missing or unreadable; the message says which."""


@dataclass(frozen=True, slots=True)
class KsmSnapshot:
    """The KSM files at one moment.

    Attributes:
        monotonic_ns: when it was taken (``time.monotonic_ns``).
        counters: the counters of :data:`STAT_COUNTERS` that exist here.
        knobs: the knobs of :data:`STAT_KNOBS` that exist here.
        ksmd_cpu_ns: ksmd's CPU time since boot (None: not found).
    """

    monotonic_ns: int
    counters: dict[str, int]
    knobs: dict[str, int | str]
    ksmd_cpu_ns: int | None


@dataclass(frozen=True, slots=True)
class Rates:
    """Rates between two snapshots (see the module docstring)."""

    seconds: float
    merged_per_s: float
    scanned_per_s: float
    full_scans_per_min: float
    ksmd_cpu_percent: float | None


def take_snapshot(directory: str = host.KSM_SYSFS_DIR, proc: str = "/proc") -> KsmSnapshot:
    """Read the KSM files now.

    Raises:
        KsmUnreadableError: *directory* does not exist or cannot be read.
    """
    if not os.path.isdir(directory):
        msg = (f"{directory} does not exist: this kernel has no KSM (CONFIG_KSM is not set)"
               if directory == host.KSM_SYSFS_DIR else f"{directory} is not a directory")
        raise KsmUnreadableError(msg)
    try:
        files = host.read_ksm_files(directory)
    except OSError as e:
        msg = f"cannot read {directory}: {e.strerror}"
        raise KsmUnreadableError(msg) from None
    if not any(n in files for n in STAT_COUNTERS):
        msg = f"no KSM counter could be read in {directory}"
        raise KsmUnreadableError(msg)
    counters = {}
    for n in STAT_COUNTERS:
        if n in files:
            try:
                counters[n] = int(files[n])
            except ValueError:
                continue
    knobs = {n: read_knob(files[n]) for n in STAT_KNOBS if n in files}
    return KsmSnapshot(time.monotonic_ns(), counters, knobs, host.ksmd_cpu_ns(proc))


def rates(prev: KsmSnapshot, cur: KsmSnapshot) -> Rates | None:
    """The rates from *prev* to *cur*, or None if no time passed."""
    dt = (cur.monotonic_ns - prev.monotonic_ns) / 1e9
    if dt <= 0:
        return None

    def delta(*names: str) -> float:
        return float(sum(cur.counters.get(n, 0) - prev.counters.get(n, 0) for n in names))

    cpu = None
    if cur.ksmd_cpu_ns is not None and prev.ksmd_cpu_ns is not None:
        cpu = 100.0 * (cur.ksmd_cpu_ns - prev.ksmd_cpu_ns) / 1e9 / dt
    return Rates(dt, delta("pages_sharing", "ksm_zero_pages") / dt, delta("pages_scanned") / dt,
                 60.0 * delta("full_scans") / dt, cpu)


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 10 else f"{x:,.1f}"


def snapshot_table(cur: KsmSnapshot, r: Rates | None, title: str) -> Table:
    """The ``top``-like view: counters, profit, rates and knobs."""
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("name", style="bold")
    table.add_column("value", justify="right")
    table.add_column("name2", style="bold")
    table.add_column("value2", justify="right")
    c = cur.counters
    left = [("general_profit", format_bytes(c.get("general_profit", 0)))]
    left += [(n, f"{c[n]:,}") for n in STAT_COUNTERS if n in c and n != "general_profit"]
    right: list[tuple[str, str]] = []
    if r is None:
        right.append(("rates", "(need two samples)"))
    else:
        right += [("merged/s", _fmt(r.merged_per_s)), ("scanned/s", _fmt(r.scanned_per_s)),
                  ("full scans/min", _fmt(r.full_scans_per_min)),
                  ("ksmd CPU", "n/a" if r.ksmd_cpu_percent is None
                   else f"{r.ksmd_cpu_percent:.1f}%")]
    if r is None and cur.ksmd_cpu_ns is not None:
        right.append(("ksmd CPU total", f"{cur.ksmd_cpu_ns / 1e9:,.2f} s"))
    right.append(("", ""))
    right += [(n, str(v)) for n, v in cur.knobs.items()]
    for i in range(max(len(left), len(right))):
        a = left[i] if i < len(left) else ("", "")
        b = right[i] if i < len(right) else ("", "")
        table.add_row(a[0], a[1], b[0], b[1])
    return table


LINE_COLUMNS = (("profit", 11), ("shared", 9), ("sharing", 10), ("unshared", 9),
                ("volatile", 9), ("zero", 8), ("scans", 7), ("merged/s", 10), ("scanned/s", 11),
                ("scans/min", 10), ("cpu%", 6))


def line_header() -> str:
    """The header of the ``vmstat``-like output (when stdout is not a terminal)."""
    return " ".join(f"{n:>{w}}" for n, w in LINE_COLUMNS)


def line(cur: KsmSnapshot, r: Rates | None) -> str:
    """One ``vmstat``-like line."""
    c = cur.counters
    dash = "-"
    cells = [format_bytes(c.get("general_profit", 0)), str(c.get("pages_shared", dash)),
             str(c.get("pages_sharing", dash)), str(c.get("pages_unshared", dash)),
             str(c.get("pages_volatile", dash)), str(c.get("ksm_zero_pages", dash)),
             str(c.get("full_scans", dash))]
    if r is None:
        cells += [dash] * 4
    else:
        cells += [_fmt(r.merged_per_s), _fmt(r.scanned_per_s), _fmt(r.full_scans_per_min),
                  dash if r.ksmd_cpu_percent is None else f"{r.ksmd_cpu_percent:.1f}"]
    return " ".join(f"{v:>{w}}" for v, (_, w) in zip(cells, LINE_COLUMNS, strict=True))


def snapshot_document(cur: KsmSnapshot, r: Rates | None, directory: str) -> dict[str, Any]:
    """The ``ksmlab stat --json`` object (schema ``ksmlab.stat/1``)."""
    return {
        "schema": STAT_SCHEMA,
        "sysfs": directory,
        "counters": dict(cur.counters),
        "general_profit_human": format_bytes(cur.counters.get("general_profit", 0)),
        "knobs": dict(cur.knobs),
        "ksmd_cpu_s": None if cur.ksmd_cpu_ns is None else cur.ksmd_cpu_ns / 1e9,
        "rates": None if r is None else {
            "interval_s": r.seconds, "merged_per_s": r.merged_per_s,
            "scanned_per_s": r.scanned_per_s, "full_scans_per_min": r.full_scans_per_min,
            "ksmd_cpu_percent": r.ksmd_cpu_percent},
    }


__all__ = ["LINE_COLUMNS", "STAT_COUNTERS", "STAT_KNOBS", "STAT_SCHEMA", "KsmSnapshot",
           "KsmUnreadableError", "Rates", "line", "line_header", "rates", "snapshot_document",
           "snapshot_table", "take_snapshot"]
