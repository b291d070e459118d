"""A self-contained HTML report (``ksmlab run --html FILE``, ``ksmlab plot --html FILE``).

One file, no external resource: the plot is embedded as a ``data:`` URI
(base64 PNG), the style is inline.  In order: the scenario's name, the answer
(the saving as a size and a share of the mergeable memory, the time to 50 %
and 90 % of it, ksmd's cost; :mod:`ksmlab.report.headline`), the plot, the
checkpoint table (with the checks) and what each counter counts, the
scenario, the processes and their memory, the activities and events, the knobs.
"""

from __future__ import annotations

import base64
from html import escape

from ksmlab import __version__
from ksmlab.constants import PAGE_SIZE
from ksmlab.report.counters import COUNTER_HELP
from ksmlab.report.headline import headline_lines
from ksmlab.report.plot import HEIGHT, WIDTH, plot_png
from ksmlab.report.table import cpu_text
from ksmlab.scenario.result import RunResult
from ksmlab.scenario.units import format_bytes, format_duration

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em auto;
       max-width: 1220px; padding: 0 1em; color: #1d1d1f; background: #fff; }
h1 { font-size: 1.6em; margin: 0 0 .2em 0; }
h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
p.lead { font-size: 1.1em; margin: .3em 0 .8em 0; }
table.answer th, table.answer td { border: none; background: none; text-align: left;
                                   padding: .1em 1em .1em 0; font-size: 1.05em; }
dl.counters dt { font-family: monospace; font-weight: 600; } dl.counters dd { margin: 0 0 .3em 2em; }
img.plot { display: block; width: 100%; max-width: 100%; height: auto; box-sizing: border-box;
           border: 1px solid #ddd; }
table { border-collapse: collapse; margin: .5em 0; font-size: .92em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.ok { color: #137333; font-weight: 600; } .fail { color: #b3261e; font-weight: 700; }
.muted { color: #666; font-size: .9em; }
"""


def _table(head: list[str], rows: list[list[str]], numeric_from: int = 1) -> str:
    out = ["<table>", "<tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr>"]
    for row in rows:
        num = ' class="num"'
        cells = [f"<td{num if i >= numeric_from else ''}>{c}</td>" for i, c in enumerate(row)]
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def answer(r: RunResult) -> str:
    """The answer (:func:`~ksmlab.report.headline.headline_lines`) as an HTML table."""
    rows = "\n".join(
        f"<tr><th scope=\"row\" class=\"{'fail' if label == 'Interrupted' else ''}\">"
        f"{escape(label)}</th><td>{escape(text)}</td></tr>" for label, text in headline_lines(r))
    return f'<table class="answer" id="answer">\n{rows}\n</table>'


def _counter_list() -> str:
    items = "".join(f"<dt>{escape(n)}</dt><dd>{escape(h)}</dd>" for n, h in COUNTER_HELP.items())
    return f'<dl class="counters">{items}</dl>'



def render_html(r: RunResult, png: bytes | None = None) -> str:
    """The report of *r*; *png* is the plot if already rendered (else it is drawn now)."""
    png = plot_png(r) if png is None else png
    data = base64.b64encode(png).decode("ascii")
    s = r.scenario
    if r.partial:
        status = (f"<span class=\"fail\">partial result: interrupted by {escape(str(r.interrupted))}"
                  f" at {escape(format_duration(r.end_s))}</span>")
    elif r.ok:
        status = "<span class=\"ok\">all checks passed</span>"
    else:
        status = f"<span class=\"fail\">{len(r.failures)} check(s) failed</span>"
    if r.partial and r.failures:
        status += f"; <span class=\"fail\">{len(r.failures)} check(s) failed</span>"
    cp_rows = []
    for c in r.checkpoints:
        k = c.counters
        checks = "; ".join(
            f"<span class=\"{'ok' if x.ok else 'fail'}\">{escape(x.check)}"
            f"{'' if x.ok else f' (got {x.actual})'}</span>" for x in c.checks)
        if not c.reached:
            checks = "<span class=\"fail\">not reached</span>" + (f"; {checks}" if checks else "")
        cp_rows.append([escape(c.name), format_duration(c.time_s), str(k["full_scans"]),
                        str(k["pages_shared"]), str(k["pages_sharing"]), str(k["pages_unshared"]),
                        str(k["pages_volatile"]), str(k["ksm_zero_pages"]),
                        escape(format_bytes(k["general_profit"])), escape(cpu_text(c)), checks])
    cp_table = _table(["checkpoint", "time", "full scans", "pages_shared", "pages_sharing",
                       "pages_unshared", "pages_volatile", "ksm_zero_pages", "general_profit",
                       "ksmd CPU", "checks"], cp_rows)
    knob_table = _table(["knob", "value"], [[escape(k), escape(str(v))] for k, v in r.knobs.items()])
    proc_rows = []
    for p in s.processes:
        maps = ", ".join(f"{escape(m.name)}: {m.pages} pages ({escape(format_bytes(m.pages * PAGE_SIZE))}) "
                         f"of {escape(m.content)} [{escape(m.kind)}]"
                         f"{'' if m.mergeable else ', not mergeable'}" for m in p.mappings)
        proc_rows.append([escape(p.name), str(p.count), format_duration(p.start_s),
                          "yes" if p.merge_any else "no", maps])
    proc_table = _table(["group", "processes", "start", "prctl merge_any", "mappings"], proc_rows,
                        numeric_from=1)
    per_group = ""
    if r.checkpoints and r.checkpoints[-1].processes:
        last = r.checkpoints[-1]
        per_group = (f"<p class=\"muted\">/proc/PID/ksm_stat summed per group at "
                     f"{escape(last.name)}:</p>" + _table(
                         ["group", "alive", "ksm_rmap_items", "ksm_zero_pages", "ksm_merging_pages",
                          "ksm_process_profit"],
                         [[escape(g), str(v.get("alive", 0)), str(v.get("ksm_rmap_items", 0)),
                           str(v.get("ksm_zero_pages", 0)), str(v.get("ksm_merging_pages", 0)),
                           escape(format_bytes(v.get("ksm_process_profit", 0)))]
                          for g, v in last.processes.items()]))
    activity = "".join(f"<li>{escape(a)}</li>" for a in s.activities) or "<li>none</li>"
    events = "".join(f"<li>{escape(e)}</li>" for e in s.events) or "<li>none</li>"
    failures = "".join(f"<li class=\"fail\">{escape(f)}</li>" for f in r.failures)
    failures = f"<ul>{failures}</ul>" if failures else ""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="ksmlab {escape(__version__)}">
<title>ksmlab: {escape(s.name)}</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>{escape(s.name)}</h1>
{answer(r)}
<p class="lead">{status}.</p>
<img id="plot" class="plot" width="{WIDTH}" height="{HEIGHT}"
 alt="KSM memory saved, pages by state and ksmd CPU over time for {escape(s.name)}"
 src="data:image/png;base64,{data}">
<h2>Checkpoints</h2>
{cp_table}
{failures}
<p class="muted">full scans, pages_scanned and pages_skipped count from the start of the scenario;
the other counters are the values of /sys/kernel/mm/ksm. What each counts:</p>
{_counter_list()}
<h2>Scenario</h2>
<p>{escape(s.description) or '<span class="muted">(no description)</span>'}</p>
<p class="muted">Source: {escape(s.source)}; seed {s.seed}; run on {escape(r.backend)}
({escape(r.machine)}); ended at {escape(format_duration(r.end_s))}.</p>
{proc_table}
{per_group}
<h3>Activity</h3>
<ul>{activity}</ul>
<h3>Events</h3>
<ul>{events}</ul>
<h2>KSM knobs</h2>
{knob_table}
<p class="muted">Generated by ksmlab {escape(__version__)}.</p>
</body>
</html>
"""


__all__ = ["answer", "render_html"]
