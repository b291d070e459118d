"""What ``ksmlab estimate`` prints and writes: ``ksmlab run``'s reports, with the static bound beside.

The predicted run is a :class:`~ksmlab.scenario.result.RunResult`, so the
answer, the checkpoint table, the timeline, the plot and the HTML report are
``ksmlab run``'s (:mod:`ksmlab.report`).  This module adds what only an
estimate has: the static bound (a line in the answer, a level on the plot, a
section of the HTML report), the per-group figures and the exposure, and the
JSON document, schema ``ksmlab.estimate/1`` (docs/cli.md), whose
``timeline``, ``checkpoints`` and ``summary`` are those of ``ksmlab.run/1``.
"""

from __future__ import annotations

import pwd
from html import escape
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from ksmlab import __version__
from ksmlab.constants import PAGE_SIZE
from ksmlab.estimate.core import Estimate
from ksmlab.estimate.static import GroupBound
from ksmlab.scenario.result import TIMELINE_COLUMNS
from ksmlab.scenario.units import NS_PER_S, format_bytes

__all__ = ["SCHEMA", "GrossFigures", "answer_lines", "estimate_document",
           "gross_figures", "plot_references", "render_terminal", "static_html"]

SCHEMA = "ksmlab.estimate/1"

_T = TIMELINE_COLUMNS.index("time_s")
_SHARING = TIMELINE_COLUMNS.index("pages_sharing")
_ZERO = TIMELINE_COLUMNS.index("ksm_zero_pages")

MAX_ROWS_SHOWN = 15
"""Groups, processes and domain pairs listed in the terminal (the JSON has them all)."""


class GrossFigures:
    """The saving as KSM counts it, ``pages_sharing + ksm_zero_pages`` (not net of metadata),
    at the end of a timeline, and the first sample reaching 50 % and 90 % of it."""

    def __init__(self, timeline: tuple[tuple[float, ...], ...] | list[tuple[float, ...]]) -> None:
        self.saved_pages = int(timeline[-1][_SHARING] + timeline[-1][_ZERO]) if timeline else 0
        self.time_to_50_s = self._first(timeline, 0.5)
        self.time_to_90_s = self._first(timeline, 0.9)

    def _first(self, timeline: Any, share: float) -> float | None:
        if self.saved_pages <= 0:
            return None
        for row in timeline:
            if row[_SHARING] + row[_ZERO] >= share * self.saved_pages:
                return float(row[_T])
        return None

    def to_json(self) -> dict[str, Any]:
        """As the summary's ``gross`` object."""
        return {"saved_pages": self.saved_pages, "saved_bytes": self.saved_pages * PAGE_SIZE,
                "time_to_50_percent_s": self.time_to_50_s,
                "time_to_90_percent_s": self.time_to_90_s}


def gross_figures(timeline: tuple[tuple[float, ...], ...] | list[tuple[float, ...]]) -> GrossFigures:
    """:class:`GrossFigures` of *timeline* (rows of ``TIMELINE_COLUMNS``)."""
    return GrossFigures(timeline)


def _domain(by: str | None, name: str) -> str:
    """A uid with its user name where known."""
    if by == "uid" and name.isdigit():
        try:
            return f"{name} ({pwd.getpwuid(int(name)).pw_name})"
        except KeyError:
            return name
    return name


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f}%" if whole > 0 else "-"


def answer_lines(e: Estimate) -> list[tuple[str, str]]:
    """The lines the estimate adds to the run's answer: the static bound, what the
    prediction reaches of it, and notes on what the model leaves out."""
    s, g = e.static, gross_figures(e.result.timeline)
    lines = [("Static bound",
              f"{format_bytes(s.saved_bytes)} if every duplicate merged "
              f"(pages_sharing {s.pages_sharing} + ksm_zero_pages {s.ksm_zero_pages}): "
              f"{s.duplicate_pages} duplicate pages and {s.zero_pages} zero-filled pages in "
              f"{s.pages} pages ({s.frames} physical)"),
             ("Predicted", f"{format_bytes(g.saved_pages * PAGE_SIZE)} merged "
                           f"(pages_sharing + ksm_zero_pages) at the end, "
                           f"{_share(g.saved_pages, s.saved_pages)} of the static bound")]
    if e.exposure is not None:
        x = e.exposure
        lines.append(("Exposure", f"{x.cross_pages} pages hold {x.cross_contents} contents that "
                                  f"several {x.by}s hold ({len(x.pairs)} pairs); merging only "
                                  f"within each {x.by} would save "
                                  f"{format_bytes(x.salted_saved_pages * PAGE_SIZE)} instead of "
                                  f"{format_bytes(x.together.saved_bytes)}"))
    notes = _notes(e)
    if notes:
        lines.append(("Notes", "; ".join(notes)))
    return lines


def _notes(e: Estimate) -> list[str]:
    p = e.plan
    out = []
    if not p.pfn_known:
        out.append("the snapshot has no PFNs (taken without root): pages shared with a fork "
                   "relative count as separate pages, so the saving may be overstated")
    if p.thp:
        pmd = int(p.pmd.sum())
        partial = (f", {p.thp - pmd} in partial extents (a THP mapped by PTEs), loaded as "
                   f"small pages" if p.thp > pmd else "")
        out.append(f"{p.thp} pages were in transparent huge pages: {pmd} in whole 2 MiB extents, "
                   f"loaded as PMD-mapped THPs (ksmd splits one to merge a page of it, as the "
                   f"kernel does; a fork child's whole extent of its parent's THP maps it by "
                   f"PMD too, as after fork)"
                   f"{partial}")
    if e.settled is False:
        out.append("the saving was still moving when the run stopped at its cap; give --until")
    if p.swapped_rows:
        out.append(f"{p.swapped_rows} swapped pages were left out (ksmd skips them)")
    return out


def _group_table(title: str, rows: list[GroupBound], by: str | None) -> Table:
    t = Table(title=title, title_justify="left")
    t.add_column(by or "process")
    for col in ("processes", "pages", "duplicates", "zero", "bound", "shared outside"):
        t.add_column(col, justify="right", no_wrap=True)
    shown = sorted(rows, key=lambda g: -g.bound.saved_pages)
    for g in shown[:MAX_ROWS_SHOWN]:
        b = g.bound
        t.add_row(_domain(by, g.name), str(g.processes), str(b.pages), str(b.duplicate_pages),
                  str(b.zero_pages), format_bytes(b.saved_bytes), str(g.shared_outside))
    if len(shown) > MAX_ROWS_SHOWN:
        t.caption = f"{len(shown) - MAX_ROWS_SHOWN} more in --json"
    return t


def _pairs_table(e: Estimate) -> Table:
    assert e.exposure is not None
    x = e.exposure
    t = Table(title=f"Contents held by two {x.by}s (would be merged across them)",
              title_justify="left")
    t.add_column(f"{x.by} a")
    t.add_column(f"{x.by} b")
    for col in ("contents", "pages of a", "pages of b"):
        t.add_column(col, justify="right")
    for pair in x.pairs[:MAX_ROWS_SHOWN]:
        t.add_row(_domain(x.by, pair.a), _domain(x.by, pair.b), str(pair.contents),
                  str(pair.pages_a), str(pair.pages_b))
    if len(x.pairs) > MAX_ROWS_SHOWN:
        t.caption = f"{len(x.pairs) - MAX_ROWS_SHOWN} more pairs in --json"
    return t


def render_terminal(e: Estimate, width: int | None) -> RenderableType:
    """The answer (with the static bound), the checkpoint table, and the groups' and the
    exposure's tables."""
    from ksmlab.report.table import summary

    parts: list[RenderableType] = [summary(e.result, width, answer_lines(e))]
    if e.groups is not None:
        parts += [Text(""), _group_table(f"Per {e.by}: static bound of merging within each",
                                         e.groups, e.by)]
    if e.exposure is not None and e.exposure.pairs:
        parts += [Text(""), _pairs_table(e)]
    return Group(*parts)


def plot_references(e: Estimate) -> list[tuple[str, float]]:
    """The static bound as a level of the plot's memory panel."""
    return [(f"static bound: {format_bytes(e.static.saved_bytes)} if every duplicate merged",
             float(e.static.saved_bytes))]


def _html_table(head: list[str], rows: list[list[str]]) -> str:
    out = ["<table>", "<tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr>"]
    num = ' class="num"'
    out += ["<tr>" + "".join(f"<td{num if i else ''}>{escape(c)}</td>"
                             for i, c in enumerate(r)) + "</tr>" for r in rows]
    return "\n".join([*out, "</table>"])


def _bound_rows(rows: list[GroupBound], by: str | None) -> list[list[str]]:
    return [[_domain(by, g.name), str(g.processes), str(g.bound.pages), str(g.bound.duplicate_pages),
             str(g.bound.zero_pages), format_bytes(g.bound.saved_bytes), str(g.shared_outside)]
            for g in sorted(rows, key=lambda g: -g.bound.saved_pages)]


def static_html(e: Estimate) -> str:
    """The estimate's own sections of the HTML report: the bound, groups, exposure, knobs' origin."""
    s = e.static
    parts = ["<h2>Static bound and prediction</h2>", "<table class=\"answer\">"]
    parts += [f"<tr><th scope=\"row\">{escape(k)}</th><td>{escape(v)}</td></tr>"
              for k, v in answer_lines(e)]
    parts.append("</table>")
    parts.append(_html_table(
        ["figure", "pages"],
        [["loaded pages (present, anonymous, not the zero page)", str(s.pages)],
         ["physical pages among them", str(s.frames)],
         ["distinct contents", str(s.contents)],
         ["duplicate pages (pages - contents)", str(s.duplicate_pages)],
         ["zero-filled pages", str(s.zero_pages)],
         ["physical pages merging could free", str(s.freeable_frames)],
         ["bound: pages_shared", str(s.pages_shared)],
         ["bound: pages_sharing", str(s.pages_sharing)],
         ["bound: ksm_zero_pages", str(s.ksm_zero_pages)]]))
    head = ["", "processes", "pages", "duplicates", "zero", "bound", "shared outside"]
    if e.groups is not None:
        parts += [f"<h3>Per {escape(str(e.by))}: merging within each</h3>",
                  _html_table([e.by or "", *head[1:]], _bound_rows(e.groups, e.by))]
    parts += ["<h3>Per process: merging within each</h3>",
              _html_table(["process", *head[1:]], _bound_rows(e.processes, None))]
    if e.exposure is not None:
        x = e.exposure
        parts += [f"<h3>Exposure across {escape(x.by)}s</h3>",
                  _html_table([f"{x.by} a", f"{x.by} b", "contents", "pages of a", "pages of b"],
                              [[_domain(x.by, p.a), _domain(x.by, p.b), str(p.contents),
                                str(p.pages_a), str(p.pages_b)] for p in x.pairs[:200]])]
    parts += ["<p class=\"muted\">Knobs: " + escape(", ".join(
        f"{n}={v} ({e.knob_sources.get(n, 'model')})" for n, v in e.result.knobs.items()))
        + "</p>"]
    return "\n".join(parts)


def estimate_document(e: Estimate) -> dict[str, Any]:
    """The JSON document of *e*, schema ``ksmlab.estimate/1`` (docs/cli.md)."""
    from ksmlab.report.document import to_document

    r, p = e.result, e.plan
    run = to_document(r)
    g = gross_figures(r.timeline)
    snap = p.snapshot
    summary = {**run["summary"], "gross": g.to_json(),
               "static_bound_bytes": e.static.saved_bytes,
               "predicted_percent_of_bound": (100 * g.saved_pages / e.static.saved_pages
                                              if e.static.saved_pages else None),
               "settled": e.settled}
    return {
        "schema": SCHEMA,
        "ksmlab_version": __version__,
        "engine": r.backend,
        "machine": r.machine,
        "partial": r.partial,
        "interrupted": r.interrupted,
        "summary": summary,
        "snapshot": {
            "path": snap.path, "host": snap.host, "kernel": snap.kernel,
            "created": snap.meta.get("created"), "policy": snap.policy,
            "samples": snap.samples, "interval_s": snap.interval_s,
            "processes": len(p.processes), "pages_loaded": len(p),
            "pfn_known": p.pfn_known, "thp_pages": p.thp, "thp_pmd_pages": int(p.pmd.sum()),
            "zero_page_mapped": p.zero_page_rows, "swapped_pages": p.swapped_rows,
            "ksm_pages_at_capture": int(p.ksm.sum()), "fork_shared_pages": int(p.shared.sum()),
            "rewritten_pages": int((p.rate > 0).sum()), "rewrites_per_s": float(p.rate.sum()),
        },
        "knobs": run["knobs"],
        "knob_sources": dict(e.knob_sources),
        "ksmd_cpu_at_start": {"s": e.ksmd_cpu_ns / NS_PER_S, "source": e.ksmd_cpu_source},
        "notes": list(r.notes),
        "static": e.static.to_json(),
        "processes": [x.to_json() | {"pid": pp.pid, "comm": pp.comm, "uid": pp.uid,
                                     "cgroup": pp.cgroup}
                      for x, pp in zip(e.processes, p.processes, strict=True)],
        "groups": None if e.groups is None else {"by": e.by,
                                                 "groups": [x.to_json() for x in e.groups]},
        "exposure": None if e.exposure is None else e.exposure.to_json(),
        "rewrites": e.rewrites,
        "end_s": r.end_s,
        "checkpoints": run["checkpoints"],
        "timeline": run["timeline"],
    }

