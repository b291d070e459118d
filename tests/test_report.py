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

from ksmlab.report.document import SCHEMA, DocumentError, from_document, to_document
from ksmlab.report.html import render_html
from ksmlab.report.plot import HEIGHT, WIDTH, plot_png
from ksmlab.report.stat import KsmSnapshot, rates
from ksmlab.report.table import summary_table
from ksmlab.report.timeline import timeline_csv
from ksmlab.scenario.backends import SimBackend
from ksmlab.scenario.loader import parse_scenario
from ksmlab.scenario.result import RunResult
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
