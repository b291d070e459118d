"""The timeline as a picture (``ksmlab plot``, ``ksmlab run --plot FILE``).

Three panels over time, sharing the time axis:

1. **memory saved**: ``general_profit`` (what KSM saves net of its metadata)
   and the gross saving ``(pages_sharing + ksm_zero_pages) x 4 KiB``, with
   the value at every checkpoint written on the curve;
2. **pages**: ``pages_shared``, ``pages_sharing``, ``pages_unshared``,
   ``pages_volatile``, ``ksm_zero_pages``;
3. **what ksmd costs**: its CPU use (percent of one CPU, averaged over a few
   samples) and the full scans completed.

The title names the scenario, the knobs and the machine, so the picture
explains itself; the legend says what each counter counts, and the time axis
whether time is virtual (the model's engines) or real (``--backend linux``).
The PNG is exactly :data:`WIDTH` x :data:`HEIGHT` pixels; the same figure can
be written as SVG or PDF (:data:`PLOT_FORMATS`, chosen by the file's
extension), without the date in their metadata, so the same run gives the
same file.  Only matplotlib's object API is used (no pyplot global state).
"""

from __future__ import annotations

import io
import math
import textwrap
from pathlib import PurePath

from matplotlib import rc_context
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from ksmlab.constants import PAGE_SIZE
from ksmlab.report.counters import PLOT_LABELS
from ksmlab.report.table import knobs_line
from ksmlab.scenario.result import TIMELINE_COLUMNS, RunResult
from ksmlab.scenario.units import format_bytes, format_duration

WIDTH, HEIGHT, DPI = 1200, 800, 100
MIB = float(1 << 20)

_COL = {name: i for i, name in enumerate(TIMELINE_COLUMNS)}
_PAGE_SERIES = tuple((name, PLOT_LABELS[name], color) for name, color in (
    ("pages_sharing", "tab:green"), ("pages_shared", "tab:blue"), ("pages_unshared", "tab:orange"),
    ("pages_volatile", "tab:red"), ("ksm_zero_pages", "tab:purple")))

PLOT_FORMATS = ("png", "svg", "pdf")
"""The formats a plot can be written in, named by the file's extension."""

PLOT_FILE_NAMES = "a file name ending in .png, .svg or .pdf (the format it is written in)"
"""What :func:`plot_format` accepts, for error messages."""


def plot_format(path: str | PurePath) -> str:
    """The format *path*'s extension names (``"svg"`` for ``t.SVG``); ValueError for another."""
    ext = PurePath(path).suffix.lower().removeprefix(".")
    if ext not in PLOT_FORMATS:
        msg = f"path: expected {PLOT_FILE_NAMES}, got {str(path)!r}"
        raise ValueError(msg)
    return ext


def _time_unit(end_s: float) -> tuple[float, str]:
    if end_s >= 2 * 3600:
        return 3600.0, "h"
    if end_s >= 180:
        return 60.0, "min"
    return 1.0, "s"


def _column(r: RunResult, name: str) -> list[float]:
    i = _COL[name]
    return [row[i] for row in r.timeline]


def _cpu_percent(times: list[float], cpu: list[float]) -> tuple[list[float], list[float]]:
    """ksmd's CPU use as percent of one CPU, averaged over windows of a few samples.

    The window (1/25 of the samples, at least one interval) smooths the
    aliasing between the sampling period and ksmd's batch period.
    """
    xs: list[float] = []
    ys: list[float] = []
    k = max(1, len(times) // 25)
    for i in range(k, len(times)):
        t0, t1, c0, c1 = times[i - k], times[i], cpu[i - k], cpu[i]
        if t1 > t0 and not (math.isnan(c0) or math.isnan(c1)):
            xs.append(t1)
            ys.append(100.0 * (c1 - c0) / (t1 - t0))
    return xs, ys


def render_figure(r: RunResult) -> Figure:
    """The figure of *r* (not yet saved)."""
    fig = Figure(figsize=(WIDTH / DPI, HEIGHT / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax_mem, ax_pages, ax_cpu = fig.subplots(3, 1, sharex=True, height_ratios=(3, 2.2, 1.4))
    times = _column(r, "time_s")
    scale, unit = _time_unit(max(times, default=r.end_s))
    x = [t / scale for t in times]
    fig.suptitle(textwrap.shorten(r.scenario.name, 90), fontsize=14, fontweight="bold")
    ax_mem.set_title("\n".join(textwrap.wrap(f"{knobs_line(r)}  ·  {r.machine}", 150)),
                     loc="center", fontsize=9, color="dimgray", pad=22)

    profit = [v / MIB for v in _column(r, "general_profit")]
    gross = [(s + z) * PAGE_SIZE / MIB for s, z in
             zip(_column(r, "pages_sharing"), _column(r, "ksm_zero_pages"), strict=True)]
    ax_mem.fill_between(x, profit, 0, color="tab:green", alpha=0.15, step=None)
    ax_mem.plot(x, profit, color="tab:green", linewidth=2.5,
                label="general_profit (net of KSM's metadata)")
    ax_mem.plot(x, gross, color="tab:gray", linestyle="--", linewidth=1.2,
                label="(pages_sharing + ksm_zero_pages) × 4 KiB")
    ax_mem.set_ylabel("memory saved (MiB)")
    ax_mem.axhline(0, color="black", linewidth=0.6)
    mapped = r.scenario.total_pages * PAGE_SIZE
    ax_mem.text(0, 1.02, f"Memory saved ({format_bytes(mapped)} mapped at the start)",
                transform=ax_mem.transAxes, fontsize=11)
    top = max([*profit, *gross, 0.0])
    bottom = min([*profit, 0.0])
    ax_mem.set_ylim(bottom - 0.05 * (top - bottom or 1), top + 0.25 * (top - bottom or 1))
    _mark_checkpoints(ax_mem, r, scale, max(x, default=0.0))

    for name, label, color in _PAGE_SERIES:
        ax_pages.plot(x, _column(r, name), label=label, color=color, linewidth=1.6)
    ax_pages.set_ylabel("pages")
    ax_pages.set_title("Pages in each KSM state", loc="left", fontsize=11)
    ax_pages.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    peak = max((max(_column(r, n), default=0.0) for n, _, _ in _PAGE_SERIES), default=0.0)
    ax_pages.set_ylim(0, peak * 1.5 or 1)
    ax_pages.legend(loc="upper left", fontsize=8, ncols=2, framealpha=0.85)

    cx, cy = _cpu_percent(times, _column(r, "ksmd_cpu_s"))
    if cy:
        ax_cpu.plot([t / scale for t in cx], cy, color="tab:brown", linewidth=1.4,
                    label="ksmd CPU (% of one CPU)")
    ax_cpu.set_ylabel("ksmd CPU %")
    ax_cpu.set_ylim(0, max(cy, default=0.0) * 1.6 or 1)
    scans_ax = ax_cpu.twinx()
    scans_ax.plot(x, _column(r, "full_scans"), color="tab:cyan", linewidth=1.2,
                  drawstyle="steps-post", label="full scans done")
    scans_ax.set_ylabel("full scans")
    scans_ax.set_ylim(0, max(_column(r, "full_scans"), default=0.0) * 1.6 or 1)
    last = r.checkpoints[-1] if r.checkpoints else None
    cost = ("" if last is None or last.ksmd_cpu_s is None else
            f": {format_duration(last.ksmd_cpu_s)} of CPU in {format_duration(last.time_s)}")
    ax_cpu.set_title(f"What ksmd costs{cost}", loc="left", fontsize=11)
    handles = ax_cpu.get_legend_handles_labels()
    more = scans_ax.get_legend_handles_labels()
    ax_cpu.legend(handles[0] + more[0], handles[1] + more[1], loc="upper left", fontsize=8,
                  framealpha=0.85)
    ax_cpu.set_xlabel(f"time ({unit}, {'real' if r.backend == 'linux' else 'virtual'})")
    for ax in (ax_mem, ax_pages, ax_cpu):
        ax.grid(True, alpha=0.3)
        ax.set_xlim(left=0, right=max(x, default=1.0) or 1.0)
    ax_mem.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncols=2, fontsize=9,
                  frameon=False, borderaxespad=0.1)
    return fig


def _mark_checkpoints(ax: Axes, r: RunResult, scale: float, end: float) -> None:
    """A dotted line at each checkpoint, labelled with its name and profit."""
    for c in r.checkpoints:
        xc = c.time_s / scale
        ax.axvline(xc, color="black", linestyle=":", linewidth=1)
        y = c.counters["general_profit"] / MIB
        ax.plot([xc], [y], marker="o", color="tab:green", markersize=6)
        label = textwrap.shorten(c.name, 24) + ": " + format_bytes(c.counters["general_profit"])
        right = end > 0 and xc > 0.8 * end
        ax.annotate(label, (xc, y), textcoords="offset points", xytext=(-6 if right else 6, 8),
                    ha="right" if right else "left", fontsize=9, fontweight="bold",
                    bbox={"boxstyle": "round,pad=0.25", "fc": "white", "alpha": 0.85, "lw": 0})


def plot_png(r: RunResult) -> bytes:
    """The PNG image of *r*'s timeline, :data:`WIDTH` x :data:`HEIGHT` pixels."""
    return plot_image(r, "png")


def plot_image(r: RunResult, fmt: str) -> bytes:
    """*r*'s timeline as a file of format *fmt*, one of :data:`PLOT_FORMATS`."""
    if fmt not in PLOT_FORMATS:
        msg = f"fmt: expected one of {', '.join(PLOT_FORMATS)}, got {fmt!r}"
        raise ValueError(msg)
    fig = render_figure(r)
    buf = io.BytesIO()
    # No creation date (and, for SVG, fixed element ids): the same run gives the same bytes.
    metadata = {"png": {}, "svg": {"Date": None}, "pdf": {"CreationDate": None}}[fmt]
    with rc_context({"svg.hashsalt": "ksmlab"}):
        fig.savefig(buf, format=fmt, dpi=DPI, metadata=metadata)
    return buf.getvalue()


__all__ = ["DPI", "HEIGHT", "PLOT_FILE_NAMES", "PLOT_FORMATS", "WIDTH", "plot_format", "plot_image", "plot_png",
           "render_figure"]
