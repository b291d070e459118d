"""What ``ksmlab tune`` prints and writes: the table, the JSON document, the plot, the HTML page.

All four come from a :class:`~ksmlab.tune.result.TuneResult`.  The JSON
schema (``ksmlab.tune/1``) is documented in docs/cli.md.  The plot has two
panels: the saving against ksmd's CPU share of every configuration, with
the Pareto front, the budget, the recommendation and the references; and
the saving over time of the recommendation and of the references.
"""

from __future__ import annotations

import base64
import io
from html import escape
from typing import TYPE_CHECKING, Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from ksmlab import __version__
from ksmlab.report.html import _STYLE, _table
from ksmlab.scenario.units import NS_PER_S, format_bytes, format_duration
from ksmlab.tune.grid import REFERENCES
from ksmlab.tune.result import TuneResult
from ksmlab.tune.work import Outcome

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["SCHEMA", "answer_lines", "render_table", "tune_document", "tune_html", "tune_plot"]

SCHEMA = "ksmlab.tune/1"

_REF_TEXT = {"kernel-defaults": "the kernel's defaults",
             "scan-time-advisor": "the scan-time advisor (advisor_mode=scan-time, its defaults)",
             "ksmtuned": "ksmtuned's policy (modelled, its defaults)"}
_REF_STYLE = {"kernel-defaults": ("s", "#444444"), "scan-time-advisor": ("^", "#2e7d32"),
              "ksmtuned": ("D", "#8e24aa")}
MIB = float(1 << 20)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}%"


def _saved(o: Outcome) -> str:
    if o.saved_bytes is None:
        return "n/a"
    share = "" if o.saved_percent is None else f" ({o.saved_percent:.0f}%)"
    return f"{format_bytes(o.saved_bytes)}{share}"


def _t90(o: Outcome) -> str:
    return "-" if o.time_to_90_s is None else format_duration(o.time_to_90_s)


def _config_text(r: TuneResult, i: int) -> str:
    c = r.configs[i]
    if c.reference is not None:
        return c.reference
    return " ".join(f"{n}={v}" for n, v in c.knobs)


def answer_lines(r: TuneResult) -> list[tuple[str, str]]:
    """(label, sentence) pairs: the recommendation beside the references, in words."""
    lines: list[tuple[str, str]] = []
    total, done = len(r.configs), len(r.sweep.outcomes)
    if r.sweep.interrupted is not None:
        lines.append(("Interrupted", f"by {r.sweep.interrupted}: a partial result, {done} of "
                                     f"{total} configurations finished"))
    rec = r.recommendation
    budget = ("" if r.cpu_budget_percent is None
              else f" within {r.cpu_budget_percent:g}% of one CPU")
    if rec.index is None:
        lines.append(("Recommended", f"none{budget}: {rec.reason}"))
    else:
        o = r.outcome(rec.index)
        assert o is not None
        lines.append(("Recommended", f"{_config_text(r, rec.index)}: {_figures(o)} of one CPU; "
                                     f"{rec.reason}"))
        if rec.equivalent:
            lines.append(("Equivalent", "; ".join(_equivalent_text(r, i)
                                                  for i in rec.equivalent)
                          + " (within the same tolerances: a close call)"))
    for name in REFERENCES:
        _, _, o = r.reference(name)
        if o is None:
            text = "did not finish"
        elif not o.ok:
            text = f"failed: {o.error}"
        else:
            text = _figures(o)
        lines.append((name, f"{_REF_TEXT[name]}: {text}"))
    clock = "real" if r.workload.backend == "linux" else "virtual"
    lines.append(("Sweep", f"{done} of {total} runs ({r.n_grid} grid configurations and "
                           f"{total - r.n_grid} references) on {r.workload.backend}, "
                           f"{_where(r)}, in {r.sweep.wall_s:.1f} s of wall time; figures at each "
                           f"run's end ({clock} time)"))
    return lines


def _figures(o: Outcome) -> str:
    """A finished run's answer in words: the saving, the time to 90 % of it, ksmd's CPU."""
    return f"saves {_saved(o)}, 90% by {_t90(o)}, ksmd {_pct(o.ksmd_cpu_percent)}"


def _equivalent_text(r: TuneResult, i: int) -> str:
    o = r.outcome(i)
    assert o is not None
    return f"{_config_text(r, i)}: {_figures(o)}"


def _where(r: TuneResult) -> str:
    s = r.sweep
    if s.scheduler == "sequential":
        return "one after the other"
    if s.scheduler == "local":
        return f"{s.workers} Dask worker{'s' if s.workers != 1 else ''} on this machine"
    return f"the Dask cluster at {s.scheduler} ({s.workers} workers)"


def render_table(r: TuneResult) -> RenderableType:
    """The terminal output: the answer, then one row per configuration."""
    answer = Table.grid(padding=(0, 2))
    answer.add_column(style="bold")
    answer.add_column()
    for label, text in answer_lines(r):
        answer.add_row(label, text)
    w = r.workload
    table = Table(title=f"ksmlab tune: {w.name}",
                  caption="saved: general_profit at the end (share of the memory made mergeable); "
                          "90%: time to 90% of that saving; CPU: ksmd's share of one CPU; "
                          "front: on the Pareto front of saving against CPU; *: recommended",
                  caption_justify="left")
    table.add_column("#", justify="right")
    table.add_column("configuration")
    for head in ("saved", "90%", "ksmd CPU", "pages_volatile"):
        table.add_column(head, justify="right")
    table.add_column("front")
    front = set(r.front)
    for i in range(len(r.configs)):
        o = r.outcome(i)
        mark = "*" if i == r.recommendation.index else ""
        name = Text(f"{_config_text(r, i)}{' *' if mark else ''}",
                     style="bold" if mark else ("italic" if i >= r.n_grid else ""))
        if o is None or not o.ok:
            status = Text("not run") if o is None else Text("failed", style="red")
            table.add_row(str(i), name, status, "", "", "", "")
        else:
            table.add_row(str(i), name, _saved(o), _t90(o), _pct(o.ksmd_cpu_percent),
                          str(o.pages_volatile), "yes" if i in front else "")
        if i == r.n_grid - 1 and r.n_grid < len(r.configs):
            table.add_section()
    return Group(answer, Text(""), table)


def _outcome_doc(r: TuneResult, i: int) -> dict[str, Any]:
    c = r.configs[i]
    o = r.outcome(i)
    doc: dict[str, Any] = {"index": i, "knobs": dict(c.knobs)}
    if c.reference is not None:
        doc["reference"] = c.reference
    if o is None:
        return doc | {"status": "not run"}
    doc |= {"status": o.status, "error": o.error, "saved_bytes": o.saved_bytes,
            "saved_percent_of_mergeable": o.saved_percent, "mergeable_bytes": o.mergeable_bytes,
            "time_to_90_percent_s": o.time_to_90_s, "ksmd_cpu_s": o.ksmd_cpu_s,
            "ksmd_cpu_percent": o.ksmd_cpu_percent, "pages_volatile": o.pages_volatile,
            "end_s": o.end_s, "wall_s": o.wall_s, "machine": o.machine,
            "on_front": i in r.front}
    if o.controller:
        doc["controller"] = [{"time_s": t, "decision": d} for t, d in o.controller]
    return doc


def tune_document(r: TuneResult) -> dict[str, Any]:
    """The ``--json`` document (schema ``ksmlab.tune/1``, docs/cli.md)."""
    w = r.workload
    rec = r.recommendation
    return {
        "schema": SCHEMA,
        "workload": {"kind": w.kind, "name": w.name, "source": w.source,
                     "until_s": None if w.until_ns is None else w.until_ns / NS_PER_S,
                     "backend": w.backend, "ksmtuned_host_bytes": w.host_bytes},
        "grid": {n: list(v) for n, v in r.grid.axes},
        "cpu_budget_percent": r.cpu_budget_percent,
        "partial": r.partial,
        "interrupted": r.sweep.interrupted,
        "sweep": {"scheduler": r.sweep.scheduler, "workers": r.sweep.workers,
                  "wall_s": r.sweep.wall_s, "runs": len(r.configs),
                  "finished": len(r.sweep.outcomes)},
        "configurations": [_outcome_doc(r, i) for i in range(r.n_grid)],
        "references": {c.reference: _outcome_doc(r, i)
                       for i, c in enumerate(r.configs) if c.reference is not None},
        "pareto_front": list(r.front),
        "recommendation": {"index": rec.index, "reason": rec.reason,
                           "knobs": None if rec.index is None else dict(r.configs[rec.index].knobs),
                           "equivalent": list(rec.equivalent)},
    }


def render_figure(r: TuneResult) -> Figure:
    """The two panels (see the module doc) as a matplotlib Figure."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 5), dpi=100, layout="constrained")
    ax, ax2 = fig.subplots(1, 2, width_ratios=(3, 2))
    grid = [(i, o) for i in range(r.n_grid) if (o := r.outcome(i)) is not None and o.ok]
    ax.scatter([o.ksmd_cpu_percent or 0 for _, o in grid],
               [(o.saved_bytes or 0) / MIB for _, o in grid], s=22, color="#90a4ae",
               label="grid configuration", zorder=2)
    front = [r.outcome(i) for i in r.front]
    ax.plot([o.ksmd_cpu_percent or 0 for o in front if o is not None],
            [(o.saved_bytes or 0) / MIB for o in front if o is not None], "-o", color="#1565c0",
            markersize=5, label="Pareto front", zorder=3)
    for name in REFERENCES:
        _, _, o = r.reference(name)
        if o is not None and o.ok:
            marker, color = _REF_STYLE[name]
            ax.scatter([o.ksmd_cpu_percent or 0], [(o.saved_bytes or 0) / MIB], marker=marker,
                       s=70, color=color, label=name, zorder=4)
    rec = r.recommendation.index
    o_rec = None if rec is None else r.outcome(rec)
    if o_rec is not None:
        ax.scatter([o_rec.ksmd_cpu_percent or 0], [(o_rec.saved_bytes or 0) / MIB], marker="*",
                   s=260, color="#d32f2f", label=f"recommended (#{rec})", zorder=5)
    if r.cpu_budget_percent is not None:
        ax.axvline(r.cpu_budget_percent, color="#d32f2f", linestyle="--", linewidth=1,
                   label=f"CPU budget {r.cpu_budget_percent:g}%")
    ax.set_xlabel("ksmd CPU, % of one CPU (over the run)")
    ax.set_ylabel("memory saved at the end, MiB (general_profit)")
    ax.set_title(f"{r.workload.name}: saving against ksmd's CPU")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    curves: list[tuple[str, Outcome, str]] = []
    if o_rec is not None:
        curves.append((f"recommended (#{rec})", o_rec, "#d32f2f"))
    for name in REFERENCES:
        _, _, o = r.reference(name)
        if o is not None and o.ok:
            curves.append((name, o, _REF_STYLE[name][1]))
    for label, o, color in curves:
        ax2.plot([p[0] for p in o.curve], [p[1] / MIB for p in o.curve], color=color, label=label)
    clock = "real" if r.workload.backend == "linux" else "virtual"
    ax2.set_xlabel(f"{clock} time, s")
    ax2.set_ylabel("memory saved, MiB")
    ax2.set_title("saving over time")
    ax2.grid(True, alpha=0.3)
    if curves:
        ax2.legend(fontsize=8, loc="lower right")
    if r.partial:
        fig.suptitle(f"partial: interrupted by {r.sweep.interrupted}", color="#b3261e")
    return fig


def tune_plot(r: TuneResult, fmt: str = "png") -> bytes:
    """The figure as *fmt* (``png``, ``svg`` or ``pdf``) bytes."""
    buf = io.BytesIO()
    render_figure(r).savefig(buf, format=fmt)
    return buf.getvalue()


def tune_html(r: TuneResult, png: bytes | None = None) -> str:
    """A self-contained HTML page: the answer, the plot, the table, the ksmtuned log."""
    png = tune_plot(r) if png is None else png
    data = base64.b64encode(png).decode("ascii")
    rows = []
    front = set(r.front)
    for i in range(len(r.configs)):
        o = r.outcome(i)
        name = escape(_config_text(r, i)) + (" <b>(recommended)</b>"
                                             if i == r.recommendation.index else "")
        if o is None or not o.ok:
            status = "not run" if o is None else f"failed: {escape(o.error or '')}"
            rows.append([str(i), name, status, "", "", "", ""])
        else:
            rows.append([str(i), name, escape(_saved(o)), escape(_t90(o)),
                         escape(_pct(o.ksmd_cpu_percent)), str(o.pages_volatile),
                         "yes" if i in front else ""])
    answer = "\n".join(f"<tr><th scope=\"row\">{escape(k)}</th><td>{escape(v)}</td></tr>"
                       for k, v in answer_lines(r))
    _, _, tuned = r.reference("ksmtuned")
    log = ""
    if tuned is not None and tuned.controller:
        items = "".join(f"<li>{escape(format_duration(t))}: {escape(d)}</li>"
                        for t, d in tuned.controller)
        log = f"<h2>ksmtuned's decisions</h2>\n<ul>{items}</ul>"
    w = r.workload
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="generator" content="ksmlab {escape(__version__)}">
<title>ksmlab tune: {escape(w.name)}</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>ksmlab tune: {escape(w.name)}</h1>
<table class="answer" id="answer">
{answer}
</table>
<img id="plot" class="plot" alt="memory saved against ksmd CPU for every configuration"
 src="data:image/png;base64,{data}">
<h2>Configurations</h2>
{_table(["#", "configuration", "saved", "90%", "ksmd CPU", "pages_volatile", "front"], rows,
        numeric_from=2)}
{log}
<p class="muted">Workload: {escape(w.source)} ({escape(w.kind)}), on {escape(w.backend)};
ksmtuned's host: {escape(format_bytes(w.host_bytes))}. Generated by ksmlab {escape(__version__)}.</p>
</body>
</html>
"""
