# SPDX-License-Identifier: GPL-2.0-only
"""Reports rendered from a run: JSON round trip, CSV cells, stat rates, and the HTML page in a browser.

The browser test renders the self-contained HTML report in headless
Chromium (Debian's ``chromium``, installed by ``.ci/run``; the test installs
nothing) and checks that the plot is visible in the screenshot.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path
from typing import cast

import pytest
from PIL import Image

from ksmlab.constants import PAGE_SIZE
from ksmlab.report.counters import COUNTER_HELP, PLOT_LABELS
from ksmlab.report.document import SCHEMA, DocumentError, from_document, to_document
from ksmlab.report.headline import headline, headline_lines
from ksmlab.report.html import render_html
from ksmlab.report.plot import HEIGHT, WIDTH, plot_format, plot_image, plot_png, render_figure
from ksmlab.report.stat import KsmSnapshot, rates
from ksmlab.report.table import summary_table
from ksmlab.report.timeline import timeline_csv
from ksmlab.scenario.backends import SimBackend
from ksmlab.scenario.loader import parse_scenario
from ksmlab.scenario.result import (
    TIMELINE_COLUMNS,
    MappingInfo,
    ProcessInfo,
    RunResult,
    ScenarioInfo,
)
from ksmlab.scenario.runner import run_scenario

SMALL = """
[scenario]
name = "report test"
description = "3 processes x 64 pages of one image, writes to 8 of them."
seed = 3
duration = "3s"
[ksm]
pages_to_scan = 1000
sleep_millisecs = 20
[content.img]
kind = "image"
zero_fraction = 0.25
[[process]]
name = "p"
count = 3
[[process.mapping]]
name = "m"
pages = 64
content = "img"
[[activity]]
process = "p[0]"
mapping = "m"
region = { first_page = 0, pages = 8 }
rate = 5
[[event]]
at = "2s"
action = "exit"
process = "p[2]"
[[checkpoint]]
name = "merged"
at = "1s"
expect = { pages_shared = { min = 1 } }
[[checkpoint]]
name = "end"
at = "3s"
"""


@pytest.fixture(scope="module")
def result() -> RunResult:
    """One run of :data:`SMALL` on the model."""
    backend = SimBackend()
    try:
        return run_scenario(parse_scenario(SMALL, source="small.toml", base_dir=Path(".")),
                            backend)
    finally:
        backend.close()


def test_document_round_trip(result: RunResult) -> None:
    """to_document -> JSON -> from_document gives back the same document."""
    doc = to_document(result)
    again = to_document(from_document(json.loads(json.dumps(doc, allow_nan=False))))
    assert doc == again
    assert doc["schema"] == SCHEMA
    assert doc["scenario"]["events"] == ["at 2 s: exit p[2]"]
    assert doc["scenario"]["activities"][0].startswith("p[0]: 5 writes/s each to m pages 0..7")


@pytest.mark.parametrize(("doc", "message"), [
    ({}, "schema: missing"),
    ({"schema": "ksmlab.run/0"}, "schema: expected 'ksmlab.run/1', got 'ksmlab.run/0'"),
    ({"schema": SCHEMA}, "scenario: missing"),
])
def test_document_errors(doc: dict[str, object], message: str) -> None:
    """A document that is not a run result is refused naming the field."""
    with pytest.raises(DocumentError, match=f"^{message}"):
        from_document(doc)


def test_reports_do_not_change_the_result(result: RunResult) -> None:
    """Rendering never mutates the result (tracemalloc's rule)."""
    before = to_document(result)
    timeline_csv(result)
    summary_table(result)
    render_html(result, b"\x89PNG")
    assert before == to_document(result)


def test_csv_cells(result: RunResult) -> None:
    """CSV: times in seconds, counters as integers, every row the same width."""
    lines = timeline_csv(result).splitlines()
    assert lines[0].startswith("time_s,pages_shared,")
    assert lines[1].startswith("0,0,0,0,")
    widths = {len(ln.split(",")) for ln in lines}
    assert {13} == widths
    assert all(cell.lstrip("-").isdigit() for ln in lines[1:] for cell in ln.split(",")[1:-1])


def test_plot_png_size(result: RunResult) -> None:
    """The PNG is exactly WIDTH x HEIGHT."""
    import io

    with Image.open(io.BytesIO(plot_png(result))) as img:
        assert img.size == (WIDTH, HEIGHT)


# --- the answer: saving, time to merge, ksmd's cost ----------------------------------------------

def _made_up(profits: list[int], cpus: list[float], *, backend: str = "sim",
             interrupted: str | None = None) -> RunResult:
    """A result with a timeline sampled every 2 s; 2 groups: 2 x 256 pages mergeable,
    1 x 512 pages not mergeable (no merge_any), 1 x 128 pages of a merge_any group."""
    procs = (ProcessInfo("vm", 2, 0.0, False, (MappingInfo("ram", 256, "img", "image", True),
                                               MappingInfo("io", 512, "img", "image", False))),
             ProcessInfo("srv", 1, 0.0, True, (MappingInfo("heap", 128, "img", "image", False),)))
    info = ScenarioInfo("made up", "", "m.toml", 0, 2.0 * (len(profits) - 1), 2 * 768 + 128,
                        procs, (), (), 2.0)
    width = len(TIMELINE_COLUMNS)
    rows = []
    for i, (profit, cpu) in enumerate(zip(profits, cpus, strict=True)):
        row = [0.0] * width
        row[0], row[TIMELINE_COLUMNS.index("general_profit")], row[-1] = 2.0 * i, profit, cpu
        rows.append(tuple(row))
    return RunResult(info, backend, "test", {}, (), tuple(rows), rows[-1][0], (), interrupted)


def test_headline_arithmetic() -> None:
    """Saving, share, times to 50 % and 90 %, CPU share and CPU-seconds per GiB, by hand."""
    mib = 1 << 20
    r = _made_up([0, -6400, 1 * mib, 2 * mib, 3 * mib, 4 * mib, 4 * mib],
                 [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    h = headline(r)
    # Mergeable: 2 x 256 madvised pages + 128 pages of the merge_any group = 640 pages.
    assert h.mergeable_bytes == 640 * PAGE_SIZE == 2_621_440
    assert (h.at_s, h.saved_bytes) == (12.0, 4 * mib)
    assert h.saved_percent == 160.0  # 4 MiB / 2.5 MiB (made-up numbers: more than mergeable)
    # 50 % of 4 MiB = 2 MiB, first reached at the sample of 6 s; 90 % = 3.6 MiB at 10 s.
    assert (h.time_to_50_s, h.time_to_90_s, h.sample_interval_s) == (6.0, 10.0, 2.0)
    # 0.6 s of CPU in 12 s = 5 % of one CPU; 0.6 s / (4 MiB / 1 GiB) = 0.6 x 256 = 153.6.
    assert h.ksmd_cpu_s == 0.6
    assert h.ksmd_cpu_percent == pytest.approx(5.0)
    assert h.cpu_s_per_gib_saved == pytest.approx(153.6)
    labels = [label for label, _ in headline_lines(r)]
    assert labels == ["Memory saved", "Time to merge", "ksmd's cost"]


def test_headline_without_saving_or_cpu() -> None:
    """Nothing saved: no times to merge and no cost per GiB; an unreadable CPU time: none."""
    h = headline(_made_up([0, -6400, -12800], [0.0, float("nan"), float("nan")]))
    assert (h.saved_bytes, h.time_to_50_s, h.time_to_90_s) == (-12800, None, None)
    assert (h.ksmd_cpu_s, h.ksmd_cpu_percent, h.cpu_s_per_gib_saved) == (None, None, None)
    lines = dict(headline_lines(_made_up([0, -6400], [0.0, 0.1])))
    assert lines["Memory saved"] == ("-6.2 KiB at 2 s: nothing saved (KSM's metadata outweighs "
                                     "the pages merged) of the 2.5 MiB made mergeable")
    assert "Time to merge" not in lines


def test_headline_of_an_interrupted_run() -> None:
    """A partial result says so first, with the signal and the time (real on the kernel)."""
    lines = headline_lines(_made_up([0, 4096], [0.0, 0.1], backend="linux", interrupted="SIGINT"))
    assert lines[0] == ("Interrupted", "by SIGINT at 2 s (real time): a partial result, 0 "
                                       "checkpoints reached; the figures are at the interruption")


def test_summary_of_a_run_stopped_before_any_checkpoint() -> None:
    """No table of nothing: the answer, then a line saying no checkpoint was reached."""
    from rich.console import Console

    from ksmlab.report.table import summary

    console = Console(width=100, record=True)
    console.print(summary(_made_up([0, 4096], [0.0, 0.1], interrupted="SIGINT"), 100))
    text = console.export_text()
    assert text.startswith("Interrupted ")
    assert "No checkpoint was reached." in text and "┏" not in text


def test_partial_result_round_trip_and_older_documents(result: RunResult) -> None:
    """partial/interrupted survive JSON; a document without the newer fields still reads."""
    import dataclasses

    cut = dataclasses.replace(result, interrupted="SIGTERM")
    doc = to_document(cut)
    assert (doc["partial"], doc["interrupted"], doc["ok"]) == (True, "SIGTERM", False)
    back = from_document(json.loads(json.dumps(doc, allow_nan=False)))
    assert (back.interrupted, back.partial) == ("SIGTERM", True)
    old = json.loads(json.dumps(to_document(result)))
    for key in ("partial", "interrupted", "summary"):
        del old[key]
    del old["scenario"]["sample_interval_s"]
    again = from_document(old)
    assert (again.partial, again.scenario.sample_interval_s) == (False, None)
    assert to_document(again)["summary"]["time_to_50_percent_s"] == \
        doc["summary"]["time_to_50_percent_s"]


def test_summary_in_the_document_matches_the_timeline(result: RunResult) -> None:
    """The JSON summary is the last timeline row's profit and CPU, and SMALL's mergeable memory."""
    doc = to_document(result)
    s, last = doc["summary"], doc["timeline"]["rows"][-1]
    cols = doc["timeline"]["columns"]
    assert s["saved_bytes"] == last[cols.index("general_profit")]
    assert s["ksmd_cpu_s"] == last[cols.index("ksmd_cpu_s")]
    assert s["mergeable_bytes"] == 3 * 64 * PAGE_SIZE  # SMALL: 3 processes x 64 pages
    assert s["at_s"] == doc["end_s"] == 3.0


# --- plot: formats, labels, legends ----------------------------------------------------------------

def test_plot_formats(result: RunResult) -> None:
    """SVG and PDF by extension, the same bytes twice (no date); other extensions refused."""
    import xml.etree.ElementTree as ET

    svg = plot_image(result, "svg")
    assert ET.fromstring(svg).tag == "{http://www.w3.org/2000/svg}svg"
    assert svg == plot_image(result, "svg")
    pdf = plot_image(result, "pdf")
    assert pdf.startswith(b"%PDF-") and pdf.rstrip().endswith(b"%%EOF")
    assert pdf == plot_image(result, "pdf")
    assert [plot_format(n) for n in ("a.png", "b.SVG", "c.pdf")] == ["png", "svg", "pdf"]
    for bad in ("p.jpg", "p", "p.png.gz"):
        with pytest.raises(ValueError, match=r"^path: expected a file name ending in \.png, \.svg "
                                             r"or \.pdf \(the format it is written in\), got "):
            plot_format(bad)


@pytest.mark.parametrize(("backend", "clock"), [("sim", "virtual"), ("bulk", "virtual"),
                                                ("linux", "real")])
def test_plot_time_axis_names_the_clock(result: RunResult, backend: str, clock: str) -> None:
    """The model's engines run in virtual time, only the real kernel in real time."""
    import dataclasses

    fig = render_figure(dataclasses.replace(result, backend=backend))
    assert fig.axes[2].get_xlabel() == f"time (s, {clock})"


def test_plot_legend_says_what_counters_count(result: RunResult) -> None:
    """The page panel's legend is the counters' meanings, volatile's skipped unique pages too."""
    fig = render_figure(result)
    legend = fig.axes[1].get_legend()
    assert legend is not None
    texts = [t.get_text() for t in legend.get_texts()]
    assert texts == [PLOT_LABELS[n] for n in ("pages_sharing", "pages_shared", "pages_unshared",
                                              "pages_volatile", "ksm_zero_pages")]
    assert "skipped by smart scan" in PLOT_LABELS["pages_volatile"]
    assert "smart scan skips" in COUNTER_HELP["pages_volatile"]


def test_html_answer_and_partial_status(result: RunResult) -> None:
    """The report opens with the answer table, and says when the result is partial."""
    import dataclasses

    html = render_html(result, b"\x89PNG")
    assert '<table class="answer" id="answer">' in html
    assert "<th scope=\"row\" class=\"\">Memory saved</th>" in html
    assert "partial result" not in html
    html = render_html(dataclasses.replace(result, interrupted="SIGINT"), b"\x89PNG")
    assert "partial result: interrupted by SIGINT at 3 s" in html
    assert "smart scan skips" in html  # the counters' meanings


def test_stat_rates_arithmetic() -> None:
    """Rates: 500 more sharing + 100 zero pages in 2 s is 300 merged/s; 3 scans in 2 s is 90/min."""
    a = KsmSnapshot(0, {"pages_sharing": 1000, "ksm_zero_pages": 0, "pages_scanned": 0,
                        "full_scans": 7}, {}, 1_000_000_000)
    b = KsmSnapshot(2_000_000_000, {"pages_sharing": 1500, "ksm_zero_pages": 100,
                                    "pages_scanned": 40_000, "full_scans": 10}, {}, 1_100_000_000)
    r = rates(a, b)
    assert r is not None
    got = (r.seconds, r.merged_per_s, r.scanned_per_s, r.full_scans_per_min)
    assert got == (2.0, 300.0, 20_000.0, 90.0)
    assert r.ksmd_cpu_percent is not None and math.isclose(5.0, r.ksmd_cpu_percent)
    assert rates(a, a) is None


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_html_report_renders_the_plot_in_chromium(result: RunResult, tmp_path: Path) -> None:
    """Headless Chromium shows the embedded plot: the plot region is not blank.

    The report puts the plot right under a two-line header, so in a
    1200 x 900 window it fills most of the rows from ~120 px down.  The
    region must hold many non-white pixels, the profit curve's green
    (matplotlib tab:green, #2ca02c) among them.
    """
    chromium = _chromium()
    if chromium is None:
        pytest.skip("chromium is not installed (Debian package chromium; .ci/run installs it)")
    page = tmp_path / "report.html"
    page.write_text(render_html(result))
    shot = tmp_path / "shot.png"
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}",
           f"--screenshot={shot}", "--window-size=1200,900", page.as_uri()]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert shot.exists(), p.stderr[-2000:]
    with Image.open(shot) as img:
        rgb = img.convert("RGB")
        assert rgb.size == (1200, 900)
        region = rgb.crop((40, 150, 1160, 880))
        found = region.getcolors(maxcolors=1 << 22)
        assert found is not None
        colors = [(n, cast(tuple[int, int, int], c)) for n, c in found]
        total = region.width * region.height
        background = sum(n for n, c in colors if min(c) >= 250)
        assert total - background > 0.05 * total, "the plot region is blank"
        green = sum(n for n, (r, g, b) in colors if g > 120 and r < 90 and b < 90)
        assert green > 500, "no profit curve (tab:green) visible"
