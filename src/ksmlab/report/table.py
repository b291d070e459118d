"""What ``ksmlab run`` prints: the answer in a few lines, then one row per checkpoint."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console, Group, RenderableType
from rich.constrain import Constrain
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from ksmlab.constants import PAGE_SIZE
from ksmlab.report.headline import headline_lines
from ksmlab.scenario.result import CheckpointResult, RunResult
from ksmlab.scenario.units import format_bytes, format_duration

CAPTION = ("shared: KSM pages; sharing: further mappings of them (memory freed); unshared: unique "
           "pages in the unstable tree; volatile: pages in no tree (new, changed, or unique and "
           "skipped by smart scan); profit: general_profit, memory saved net of KSM's metadata "
           "(`ksmlab run --help` says what each counter counts)")

KNOBS_SHOWN = ("pages_to_scan", "sleep_millisecs", "use_zero_pages", "smart_scan",
               "max_page_sharing", "advisor_mode")
"""The knobs named in titles (the others are in the JSON and the HTML report)."""


def knobs_line(r: RunResult) -> str:
    """``pages_to_scan=100, sleep_millisecs=20, ...`` for titles."""
    return ", ".join(f"{k}={r.knobs[k]}" for k in KNOBS_SHOWN if k in r.knobs)


def cpu_text(c: CheckpointResult) -> str:
    """ksmd's CPU time at *c* and its share of one CPU: ``0.891 s (1.5%)``."""
    if c.ksmd_cpu_s is None:
        return "n/a"
    share = f" ({100 * c.ksmd_cpu_s / c.time_s:.1f}%)" if c.time_s > 0 else ""
    return f"{format_duration(c.ksmd_cpu_s)}{share}"


def checks_text(c: CheckpointResult) -> Text:
    """``ok 2/2`` in green, ``FAIL 1/2`` in red, or nothing."""
    if not c.checks and c.reached:
        return Text("")
    good = sum(x.ok for x in c.checks)
    if c.reached and good == len(c.checks):
        return Text(f"ok {good}/{len(c.checks)}", style="green")
    return Text("not reached" if not c.reached else f"FAIL {good}/{len(c.checks)}",
                style="bold red")


def summary_table(r: RunResult) -> Table:
    """The checkpoint table of *r*."""
    mapped = r.scenario.total_pages * PAGE_SIZE
    nproc = sum(p.count for p in r.scenario.processes)
    table = Table(title=f"{r.scenario.name}\n[dim]{knobs_line(r)}[/dim]",
                  caption=f"{r.machine}; {format_bytes(mapped)} mapped by "
                          f"{nproc} process{'es' if nproc != 1 else ''} at the start.",
                  caption_justify="left")
    table.add_column("checkpoint")
    for col in ("time", "full scans", "shared", "sharing", "unshared", "volatile", "zero pages",
                "profit", "ksmd CPU"):
        table.add_column(col, justify="right", no_wrap=True)
    has_checks = any(c.checks or not c.reached for c in r.checkpoints)
    if has_checks:
        table.add_column("checks")
    for c in r.checkpoints:
        k = c.counters
        row: list[RenderableType] = [
            c.name, format_duration(c.time_s), str(k["full_scans"]), str(k["pages_shared"]),
            str(k["pages_sharing"]), str(k["pages_unshared"]), str(k["pages_volatile"]),
            str(k["ksm_zero_pages"]), format_bytes(k["general_profit"]), cpu_text(c)]
        if has_checks:
            row.append(checks_text(c))
        table.add_row(*row)
    return table


def transposed_table(r: RunResult) -> Table:
    """The checkpoint table turned sideways (a column per checkpoint), for narrow terminals."""
    mapped = r.scenario.total_pages * PAGE_SIZE
    table = Table(title=f"{r.scenario.name}\n[dim]{knobs_line(r)}[/dim]",
                  caption=f"{r.machine}; {format_bytes(mapped)} mapped at the start",
                  caption_justify="left")
    table.add_column("", style="bold")
    for c in r.checkpoints:
        table.add_column(c.name, justify="right")
    rows: list[tuple[str, list[RenderableType]]] = [
        ("time", [format_duration(c.time_s) for c in r.checkpoints]),
        ("full_scans", [str(c.counters["full_scans"]) for c in r.checkpoints]),
    ]
    rows += [(n, [str(c.counters[n]) for c in r.checkpoints])
             for n in ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
                       "ksm_zero_pages")]
    rows += [("general_profit", [format_bytes(c.counters["general_profit"]) for c in r.checkpoints]),
             ("ksmd CPU", [cpu_text(c) for c in r.checkpoints])]
    if any(c.checks or not c.reached for c in r.checkpoints):
        rows.append(("checks", [checks_text(c) for c in r.checkpoints]))
    for label, cells in rows:
        table.add_row(label, *cells)
    return table


def answer_grid(r: RunResult, more: Sequence[tuple[str, str]] = ()) -> Table:
    """The answer (saving, time to merge, ksmd's cost) as a two-column grid, then the
    (label, sentence) lines *more* (``ksmlab estimate``'s static bound)."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    for label, text in [*headline_lines(r), *more]:
        grid.add_row(Text(label, style="bold red" if label == "Interrupted" else "bold"), text)
    return grid


def summary(r: RunResult, width: int | None = None,
            more: Sequence[tuple[str, str]] = ()) -> RenderableType:
    """The answer (and the lines *more*), the table (sideways if wider than *width* columns),
    then one line per failure and per note."""
    table = summary_table(r)
    wide = Console(width=10_000)  # measure unclamped
    if width is not None and Measurement.get(wide, wide.options, table).maximum > width:
        table = transposed_table(r)
    parts: list[RenderableType] = [answer_grid(r, more), Text("")]
    if r.checkpoints:
        # The legend wraps at the table's width, or 80 columns for a narrow table.
        legend_width = max(80, Measurement.get(wide, wide.options, table).maximum)
        parts += [table, Constrain(Text(CAPTION, style="dim"), legend_width)]
    else:
        parts.append(Text("No checkpoint was reached."))
    parts += [Text(f"FAILED: {f}", style="bold red") for f in r.failures]
    parts += [Text(f"Note: {n}", style="yellow") for n in r.notes]
    return Group(*parts)


__all__ = ["CAPTION", "KNOBS_SHOWN", "answer_grid", "checks_text", "cpu_text", "knobs_line",
           "summary", "summary_table", "transposed_table"]
