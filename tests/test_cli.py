# SPDX-License-Identifier: GPL-2.0-only
"""The ``ksmlab`` command, run as users run it: the installed entry point, in a subprocess.

Checked here: the table, the JSON document against its documented schema
(docs/cli.md), the timeline CSV, the PNG and HTML outputs, the one-line error
of invalid input with its exit code, the help of every subcommand, ``stat``
on a fake and on the real sysfs, ``init``, ``check``, ``plot``, and the Linux
backend on a tiny scenario.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from ksmlab.backends.linux import linux_ksm_unavailable_reason
from ksmlab.cli_stop import graceful_stop
from ksmlab.constants import PAGE_SIZE
from ksmlab.ksm.cost import default_cost
from ksmlab.scenario.loader import builtin_scenario_text

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TIMELINE_COLUMNS = ["time_s", "pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
                    "ksm_zero_pages", "general_profit", "full_scans", "pages_scanned",
                    "pages_skipped", "stable_node_chains", "stable_node_dups", "ksmd_cpu_s"]
COUNTERS = TIMELINE_COLUMNS[1:-1]


def _entry_point() -> list[str]:
    """The installed ``ksmlab`` script next to this interpreter, else ``python -m ksmlab``."""
    script = Path(sys.executable).with_name("ksmlab")
    if script.exists():
        return [str(script)]
    found = shutil.which("ksmlab")
    return [found] if found else [sys.executable, "-m", "ksmlab"]


def ksmlab(*args: str, cwd: Path | None = None, timeout: float = 300,
           user: int | None = None) -> subprocess.CompletedProcess[str]:
    """Run the command; *user* runs it under that uid (root only)."""
    env = dict(os.environ, COLUMNS="200")
    env.pop("FORCE_COLOR", None)
    # The pre-flight's memory figure, so that these tests do not read the host's /proc.
    env.setdefault("KSMLAB_MEM_AVAILABLE", "16GiB")
    kwargs: dict[str, Any] = {}
    if user is not None:
        kwargs["user"] = user
        kwargs["group"] = user
        env["HOME"] = str(cwd or "/tmp")
    return subprocess.run([*_entry_point(), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env, check=False, **kwargs)


def one_line_error(p: subprocess.CompletedProcess[str]) -> str:
    """The error of a failed command, checked to be exactly one line on stderr (besides the
    pre-flight's status line of a run that started: which engine, and why)."""
    lines = [ln for ln in p.stderr.strip("\n").split("\n")
             if not ln.startswith("ksmlab: --backend auto chose ")]
    assert len(lines) == 1, p.stderr
    return lines[0]


# --- the built-in scenario ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``ksmlab run --json`` with every output, once for the module."""
    d = tmp_path_factory.mktemp("default")
    p = ksmlab("run", "--json", "--timeline", "t.csv", "--plot", "p.png", "--html", "r.html",
               "--progress", cwd=d)
    assert p.returncode == 0, p.stderr
    return {"dir": d, "doc": json.loads(p.stdout), "stderr": p.stderr}


def test_readme_command_prints_the_table(tmp_path: Path) -> None:
    """`ksmlab run` (the README's command) runs the built-in scenario and prints the table."""
    p = ksmlab("run", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    # stderr: the pre-flight's one line, saying which engine --backend auto chose and why
    assert re.fullmatch(r"ksmlab: --backend auto chose sim \(SimKernel\): .*\n", p.stderr), p.stderr
    out = p.stdout
    assert "12 guests from one image" in out
    assert "pages_to_scan=100, sleep_millisecs=20" in out
    for header in ("checkpoint", "time", "full scans", "shared", "sharing", "unshared",
                   "volatile", "zero pages", "profit", "ksmd CPU"):
        assert header in out
    rows = [ln for ln in out.splitlines() if re.match(r"^│ (1 s|10 s|1 min) ", ln)]
    assert len(rows) == 3, out
    # The answer comes first: the saving as a size and a share of the 12 x 8 MiB made
    # mergeable, the time to 50 % and 90 % of it (virtual time), ksmd's cost.
    lines = out.splitlines()
    assert re.match(r"^Memory saved +\d+\.\d MiB at 1 min, \d+% of the 96\.0 MiB made mergeable "
                    r"\(general_profit\)", lines[0]), out
    assert re.match(r"^Time to merge +50% of that saving by [\d.]+ s, 90% by [\d.]+ s \(virtual "
                    r"time, to within the 300 ms between samples\)", lines[1]), out
    assert re.match(r"^ksmd's cost +\d+ ms of CPU in 1 min, [\d.]+% of one CPU; [\d.]+ "
                    r"CPU-seconds per GiB saved", lines[2]), out
    assert out.index("Memory saved") < out.index("┏")
    assert "MiB" in rows[-1]  # the profit, in human units
    assert re.search(r"\d+ ms \(\d+\.\d%\)", rows[-1])  # ksmd's CPU time and share
    assert list(tmp_path.iterdir()) == []  # writes nothing unless asked


def test_progress_bar_on_long_runs(default_run: dict[str, Any]) -> None:
    """A run longer than a second shows virtual time and full scans on stderr."""
    err = default_run["stderr"]
    assert "virtual time" in err
    assert "full scans" in err


def _check_types(obj: Any, schema: dict[str, Any], where: str) -> None:
    assert isinstance(obj, dict), where
    assert set(schema) == set(obj), f"{where}: {sorted(obj)}"
    for key, kind in schema.items():
        if isinstance(kind, dict):
            _check_types(obj[key], kind, f"{where}.{key}")
        else:
            assert isinstance(obj[key], kind), f"{where}.{key}: {obj[key]!r}"


NUMBER_OR_NULL = (int, float, type(None))
RUN_SCHEMA = {
    "schema": str, "ksmlab_version": str, "backend": str, "machine": str, "ok": bool,
    "partial": bool, "interrupted": (str, type(None)),
    "failures": list, "notes": list, "ksmd_cpu_at_start_s": NUMBER_OR_NULL,
    "knobs": dict, "end_s": (int, float), "checkpoints": list,
    "timeline": {"columns": list, "rows": list},
    "scenario": {"name": str, "description": str, "source": str, "seed": int,
                 "planned_end_s": (int, float), "sample_interval_s": NUMBER_OR_NULL,
                 "total_pages": int, "processes": list, "activities": list, "events": list},
    "summary": {"at_s": (int, float), "saved_bytes": (int, type(None)), "mergeable_bytes": int,
                "saved_percent_of_mergeable": NUMBER_OR_NULL,
                "time_to_50_percent_s": NUMBER_OR_NULL, "time_to_90_percent_s": NUMBER_OR_NULL,
                "sample_interval_s": NUMBER_OR_NULL, "ksmd_cpu_s": NUMBER_OR_NULL,
                "ksmd_cpu_percent": NUMBER_OR_NULL, "ksmd_cpu_s_per_gib_saved": NUMBER_OR_NULL},
}
CHECKPOINT_SCHEMA = {"name": str, "time_s": (int, float), "reached": bool,
                     "ksmd_cpu_s": (int, float, type(None)), "counters": dict, "processes": dict,
                     "checks": list}


def test_json_schema(default_run: dict[str, Any]) -> None:
    """--json follows schema ksmlab.run/1 as docs/cli.md documents it."""
    doc = default_run["doc"]
    _check_types(doc, RUN_SCHEMA, "doc")
    assert doc["schema"] == "ksmlab.run/1"
    assert (doc["backend"], doc["ok"], doc["failures"]) == ("sim", True, [])
    assert (doc["partial"], doc["interrupted"]) == (False, None)
    assert (doc["notes"], doc["ksmd_cpu_at_start_s"]) == ([], 0.0)  # a freshly booted model
    assert doc["scenario"]["source"] == "<built-in>"
    assert doc["scenario"]["total_pages"] == 12 * 8 * 2**20 // PAGE_SIZE
    knobs = doc["knobs"]
    assert (knobs["pages_to_scan"], knobs["sleep_millisecs"], knobs["run"]) == (100, 20, 1)
    assert doc["knobs"]["advisor_mode"] == "none"
    assert [c["name"] for c in doc["checkpoints"]] == ["1 s", "10 s", "1 min"]
    assert [c["time_s"] for c in doc["checkpoints"]] == [1.0, 10.0, 60.0]
    for c in doc["checkpoints"]:
        _check_types(c, CHECKPOINT_SCHEMA, "checkpoint")
        assert list(c["counters"]) == COUNTERS
        assert all(isinstance(v, int) for v in c["counters"].values())
        assert {"alive", "ksm_rmap_items", "ksm_zero_pages", "ksm_merging_pages",
                "ksm_process_profit"} == set(c["processes"]["guest"])
        k = c["counters"]
        # Spec 4: general_profit = (sharing + zero) * 4096 - rmap_items * 64, and the items
        # are those of the 12 guests (nothing else runs on the model).
        rmap_items = c["processes"]["guest"]["ksm_rmap_items"]
        assert (k["pages_sharing"] + k["ksm_zero_pages"]) * PAGE_SIZE - rmap_items * 64 == \
            k["general_profit"]
        assert rmap_items == k["pages_shared"] + k["pages_sharing"] + k["pages_unshared"] + \
            k["pages_volatile"]
    first, ten, minute = (c["counters"] for c in doc["checkpoints"])
    # A full scan is 12 x 2048 = 24576 pages: 246 batches of 100.  ksmd sleeps 20 ms =
    # msecs_to_jiffies(20) = 5 jiffies at HZ=250, and the timer fires on the 6th tick, so a
    # batch follows the last every 24 ms, 28 ms when the wake-up comes a jiffy late (the
    # model's late_fraction, docs/cost-model.md), rarely more: the first scan ends between
    # 245 x 24 = 5.9 s and 245 x 28 = 6.9 s, the second between 11.8 s and 13.7 s: none is
    # complete at 1 s, one is at 10 s.  Later, smart scan skips pages that never merge
    # without using the batch budget (spec 3.4), so scans get shorter: at least
    # 60 / 6.9 s = 8 by 1 min, but for longer delays, at least 7.
    assert (first["full_scans"], ten["full_scans"]) == (0, 1)
    assert minute["full_scans"] >= 7 and minute["pages_skipped"] > 0
    # At 1 s ksmd has run a batch of 100 pages at 0 and one every 24 to 28 ms (36 to 42
    # batches): all new pages, all volatile.
    assert first["pages_shared"] == 0 and first["pages_volatile"] % 100 == 0
    assert 3600 <= first["pages_volatile"] <= 4200
    # By 10 s the second scan has visited at least (10 - 6.9) / 6.9 = 45% of the pages, in
    # guest order: guests 2-5 merge most of their image pages (55%) with guest 1's and their
    # zero pages (25%) into the zero page's chain, i.e. ~0.8 x 4 x 2048 = 6500 sharing.
    assert ten["pages_sharing"] > 4_000 and ten["general_profit"] > 15 * 2**20


def test_json_summary_is_the_answer(default_run: dict[str, Any]) -> None:
    """The JSON summary: saving, share of mergeable memory, times to merge, ksmd's cost."""
    doc = default_run["doc"]
    s = doc["summary"]
    cols, rows = doc["timeline"]["columns"], doc["timeline"]["rows"]
    t, profit = cols.index("time_s"), cols.index("general_profit")
    last = doc["checkpoints"][-1]  # the checkpoint at 1 min is the end of the run
    assert s["at_s"] == last["time_s"] == doc["end_s"] == 60.0
    assert s["saved_bytes"] == last["counters"]["general_profit"] == rows[-1][profit]
    # Every mapping of the 12 guests (8 MiB each) is madvised mergeable.
    assert s["mergeable_bytes"] == 12 * 8 * 2**20
    assert s["saved_percent_of_mergeable"] == pytest.approx(100 * s["saved_bytes"] / (96 * 2**20))
    # Sampled every 60 s / 200 = 300 ms.  A full scan takes 5.9 to 6.9 s (see
    # test_json_schema) and new pages only merge in the second one (spec 3.5), so half and
    # 90 % of the saving come between 5.9 s and the end of the second scan, by 13.7 s (plus
    # a sample interval).
    assert s["sample_interval_s"] == 0.3
    assert 5.8 < s["time_to_50_percent_s"] <= s["time_to_90_percent_s"] <= 14.0
    for key, share in (("time_to_50_percent_s", 0.5), ("time_to_90_percent_s", 0.9)):
        reached = [r[t] for r in rows if r[profit] >= share * s["saved_bytes"]]
        assert s[key] == reached[0]
    cpu = last["ksmd_cpu_s"]
    assert s["ksmd_cpu_s"] == cpu
    assert s["ksmd_cpu_percent"] == pytest.approx(100 * cpu / 60)
    assert s["ksmd_cpu_s_per_gib_saved"] == pytest.approx(cpu / (s["saved_bytes"] / 2**30))


def test_timeline_csv(default_run: dict[str, Any]) -> None:
    """--timeline: the documented columns, one row per sample, equal to the checkpoints."""
    text = (default_run["dir"] / "t.csv").read_text()
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == TIMELINE_COLUMNS
    data = [[float(v) for v in row] for row in rows[1:]]
    times = [row[0] for row in data]
    # Sampled every 60 s / 200 = 300 ms from 0 to 60 s, and at each checkpoint.
    expected = sorted({round(i * 0.3, 6) for i in range(201)} | {1.0, 10.0, 60.0})
    assert expected == [round(t, 6) for t in times]
    doc = default_run["doc"]
    assert [r[:-1] for r in doc["timeline"]["rows"]] == [
        [row[0], *(int(v) for v in row[1:-1])] for row in data]
    # ksmd_cpu_s: the CSV gives it to the microsecond (half a microsecond off at most, plus
    # the float's own error when the value falls on a half).
    assert [r[-1] for r in doc["timeline"]["rows"]] == pytest.approx([row[-1] for row in data],
                                                                     abs=5.01e-7)
    for c in doc["checkpoints"]:
        row = data[times.index(c["time_s"])]
        assert [c["counters"][n] for n in COUNTERS] == [int(v) for v in row[1:-1]]


def test_png_output(default_run: dict[str, Any]) -> None:
    """--plot: a real 1200 x 800 PNG with a drawing in it."""
    path = default_run["dir"] / "p.png"
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size == (1200, 800)
        rgb = img.convert("RGB")
        colors = rgb.getcolors(maxcolors=1 << 20)
        assert colors is not None and len(colors) > 50
        white = sum(n for n, c in colors if c == (255, 255, 255))
        assert white < 0.9 * 1200 * 800


def test_html_output(default_run: dict[str, Any]) -> None:
    """--html: self-contained, the same PNG embedded, the numbers and the knobs in tables."""
    html = (default_run["dir"] / "r.html").read_text()
    m = re.search(r'<img id="plot"[^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert m, "no embedded plot"
    assert (default_run["dir"] / "p.png").read_bytes() == base64.b64decode(m.group(1))
    assert not re.search(r'(src|href)="(?!data:)', html)  # nothing fetched from outside
    doc = default_run["doc"]
    for c in doc["checkpoints"]:
        k = c["counters"]
        assert f"<td class=\"num\">{k['pages_sharing']}</td>" in html
        assert f"<td class=\"num\">{k['pages_shared']}</td>" in html
    assert "pages_to_scan" in html and "sleep_millisecs" in html
    assert "12 guests from one image" in html


def test_plot_command_from_saved_json(default_run: dict[str, Any], tmp_path: Path) -> None:
    """`ksmlab plot RESULT.json` draws the saved run without running it."""
    saved = tmp_path / "r.json"
    saved.write_text(json.dumps(default_run["doc"]))
    p = ksmlab("plot", str(saved), "-o", "again.png", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "wrote again.png and again.html"
    with Image.open(tmp_path / "again.png") as img:
        assert img.size == (1200, 800)
    html = (tmp_path / "again.html").read_text()
    assert "data:image/png;base64," in html


# --- scenarios from files ----------------------------------------------------------------------

def test_identical_pages_example_checks_pass(tmp_path: Path) -> None:
    """The formula example: its checks (N, N(P-1), the profit) pass on the model."""
    p = ksmlab("run", str(EXAMPLES / "identical-pages.toml"), "--json", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    (cp,) = doc["checkpoints"]
    assert all(x["ok"] for x in cp["checks"]) and len(cp["checks"]) == 5
    assert (cp["counters"]["pages_shared"], cp["counters"]["pages_sharing"]) == (256, 768)


def test_failed_check_exits_1(tmp_path: Path) -> None:
    """A check that fails: the table still printed, exit 1, one line on stderr."""
    f = tmp_path / "s.toml"
    f.write_text(FORMULA.replace("pages_sharing = 3", "pages_sharing = 4"))
    cost = tmp_path / "exact.json"
    default_cost().with_clock(hz=250, wake_delay_ns=0.0, late_fraction=0.0,
                              run_stretch=1.0).save(cost)
    p = ksmlab("run", str(f), "--cost", str(cost), cwd=tmp_path)
    assert p.returncode == 1
    # Batches at 0 and 16 ms, one full scan each: sleep_millisecs=10 is 3 jiffies at HZ=250,
    # and the timer fires on the 4th tick (no scheduling delay in this cost model): the
    # second ends at 16 ms and its CPU time (microseconds).
    assert one_line_error(p) == ("ksmlab: 1 check failed; first: checkpoint 'merged' at 16 ms: expected "
            "pages_sharing == 4, got 3")
    assert "FAIL 1/2" in p.stdout


FORMULA = """
[ksm]
pages_to_scan = 1000
sleep_millisecs = 10
[content.img]
kind = "image"
[[process]]
name = "p"
count = 4
[[process.mapping]]
pages = 1
content = "img"
[[checkpoint]]
name = "merged"
full_scans = 2
expect = { pages_shared = 1, pages_sharing = 3 }
"""


def test_knob_seed_until_options(tmp_path: Path) -> None:
    """--knob, --seed and --until change the run as documented."""
    f = tmp_path / "s.toml"
    f.write_text(FORMULA + '[[checkpoint]]\nat = "1h"\n')
    p = ksmlab("run", str(f), "--json", "--knob", "pages_to_scan=2", "--knob",
               "use_zero_pages=true", "--seed", "5", "--until", "1s", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    knobs = doc["knobs"]
    assert (knobs["pages_to_scan"], knobs["use_zero_pages"], doc["scenario"]["seed"]) == (2, 1, 5)
    assert [c["name"] for c in doc["checkpoints"]] == ["merged", "--until 1 s"]
    assert doc["end_s"] == 1.0


def test_timeout_of_full_scan_checkpoint_exits_1(tmp_path: Path) -> None:
    """A full-scan checkpoint that cannot be reached fails the run when its timeout passes."""
    f = tmp_path / "s.toml"
    f.write_text(FORMULA.replace("[ksm]\n", "[ksm]\nrun = 0\n")
                 .replace("full_scans = 2", 'full_scans = 2\ntimeout = "3s"'))
    p = ksmlab("run", str(f), cwd=tmp_path)
    assert p.returncode == 1
    assert one_line_error(p).startswith("ksmlab: 3 checks failed; first: checkpoint 'merged': "
                                        "full_scans reached 0, not 2, by its timeout at 3 s")


ONE_SECOND = '[scenario]\nduration = "1s"\n' + FORMULA


def test_sample_sets_the_timeline_interval(tmp_path: Path) -> None:
    """--sample 100ms: a sample every 100 ms, so the time to merge is resolved to it."""
    f = tmp_path / "s.toml"
    f.write_text(ONE_SECOND)
    p = ksmlab("run", str(f), "--json", "--sample", "100ms", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    times = [round(row[0], 6) for row in doc["timeline"]["rows"]]
    # Batches at 0 and 10 ms, one full scan each: the 4 identical pages merge in the second
    # (spec 3.5), and the checkpoint is recorded as that batch ends, before the third at 20 ms.
    (merged,) = doc["checkpoints"]
    assert 0.01 <= merged["time_s"] < 0.02
    # A sample every 100 ms from 0 to 1 s, and one at the checkpoint.
    assert times == sorted({round(i * 0.1, 6) for i in range(11)} | {round(merged["time_s"], 6)})
    s = doc["summary"]
    assert (s["sample_interval_s"], s["time_to_50_percent_s"], s["time_to_90_percent_s"]) == \
        (0.1, merged["time_s"], merged["time_s"])
    # 1 KSM page + 3 sharing: 3 x 4096 - 4 rmap items x 64 = 12032 bytes of 4 x 4096 mergeable.
    assert (s["saved_bytes"], s["mergeable_bytes"]) == (12032, 16384)
    assert s["saved_percent_of_mergeable"] == 73.4375


def test_until_past_the_end_needs_extend(tmp_path: Path) -> None:
    """--until past the scenario's end: refused naming both times, or run on with --extend."""
    f = tmp_path / "s.toml"
    f.write_text(ONE_SECOND)
    p = ksmlab("run", str(f), "--until", "3s", cwd=tmp_path)
    assert p.returncode == 2
    assert one_line_error(p) == ("ksmlab: --until: expected a time within the scenario, which ends "
                                 "at 1 s (add --extend to run it on past its end), got 3 s")
    p = ksmlab("run", str(f), "--until", "3s", "--extend", "--json", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert (doc["end_s"], doc["scenario"]["planned_end_s"]) == (3.0, 3.0)
    assert [c["name"] for c in doc["checkpoints"]] == ["merged", "--until 3 s"]


def test_plot_in_the_format_of_its_extension(tmp_path: Path) -> None:
    """--plot p.svg writes SVG, plot -o x.pdf writes PDF; the HTML still embeds a PNG."""
    f = tmp_path / "s.toml"
    f.write_text(ONE_SECOND)
    p = ksmlab("run", str(f), "--json", "--plot", "p.svg", "--html", "r.html", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "p.svg").read_bytes().startswith(b"<?xml")
    assert b"<svg" in (tmp_path / "p.svg").read_bytes()[:500]
    assert 'src="data:image/png;base64,' in (tmp_path / "r.html").read_text()
    (tmp_path / "r.json").write_text(p.stdout)
    p = ksmlab("plot", "r.json", "-o", "again.PDF", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "wrote again.PDF and again.html"
    assert (tmp_path / "again.PDF").read_bytes().startswith(b"%PDF-")


# --- Ctrl-C and SIGTERM: stop at a safe point, keep what was reached ------------------------------

CUE = """
import sys
from ksmlab.cli import main
from ksmlab.scenario import runner

checkpoint = runner.Runner._checkpoint


def announce(self, *args, **kwargs):  # one line per checkpoint: the test's cue to signal
    checkpoint(self, *args, **kwargs)
    print(f"test: checkpoint {self.checkpoints[-1].name}", file=sys.stderr, flush=True)


runner.Runner._checkpoint = announce
sys.exit(main(sys.argv[1:]))
"""

LONG_RUN = """
[scenario]
name = "a long run"
duration = "1h"
[ksm]
pages_to_scan = 1000
sleep_millisecs = 20
[content.img]
kind = "image"
[[process]]
name = "p"
count = 4
[[process.mapping]]
size = "4MiB"
content = "img"
[[checkpoint]]
at = "1s"
[[checkpoint]]
at = "2s"
[[checkpoint]]
at = "1h"
"""
"""An hour of 4 x 1024 pages at 50,000 page visits per virtual second: many minutes of wall
time after the checkpoint at 2 s, so a signal sent then arrives long before the end."""


def interrupt_after(args: list[str], cwd: Path, checkpoints: int, sig: signal.Signals,
                    timeout: float = 120) -> tuple[int, str, list[str]]:
    """Run ``ksmlab ARGS`` (announcing checkpoints), send *sig* after *checkpoints* of them.

    Returns the exit code, stdout and the lines of stderr.
    """
    import ksmlab

    src = str(Path(ksmlab.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
               COLUMNS="200")
    proc = subprocess.Popen([sys.executable, "-c", CUE, *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    err: list[str] = []
    try:
        while sum(ln.startswith("test: checkpoint") for ln in err) < checkpoints:
            line = proc.stderr.readline()
            assert line, f"ended before {checkpoints} checkpoints: {err}"
            err.append(line.rstrip("\n"))
        proc.send_signal(sig)
        out, rest = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, err + rest.splitlines()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_run_keeps_the_checkpoints_reached(tmp_path: Path, sig: signal.Signals) -> None:
    """Ctrl-C (or a kill) after two checkpoints: every output is written with those two, exit 130."""
    f = tmp_path / "long.toml"
    f.write_text(LONG_RUN)
    code, out, err = interrupt_after(["run", str(f), "--json", "--timeline", "t.csv", "--plot",
                                      "p.png", "--html", "r.html"], tmp_path, 2, sig)
    assert code == 130, err
    doc = json.loads(out)
    assert (doc["partial"], doc["interrupted"], doc["ok"]) == (True, sig.name, False)
    assert [c["name"] for c in doc["checkpoints"]] == ["1 s", "2 s"]
    end = doc["end_s"]
    assert 2.0 <= end < 3600.0
    rows = doc["timeline"]["rows"]
    assert rows[-1][0] == end and all(r[0] <= end for r in rows)
    assert doc["summary"]["at_s"] == end
    csv_rows = list(csv.reader(io.StringIO((tmp_path / "t.csv").read_text())))
    assert len(csv_rows) == 1 + len(rows)
    with Image.open(tmp_path / "p.png") as img:
        assert img.size == (1200, 800)
    assert f"partial result: interrupted by {sig.name}" in (tmp_path / "r.html").read_text()
    assert err[-2] == (f"ksmlab: {sig.name}: stopping at the next safe point to save what was "
                       f"reached (Ctrl-C again to abort)")
    assert re.fullmatch(rf"ksmlab: interrupted by {sig.name} at [\d.]+ (s|min)( \d+ s)? \(virtual "
                        r"time\): partial result, 2 of 3 checkpoints reached", err[-1]), err


def test_interrupted_table_says_partial_first(tmp_path: Path) -> None:
    """Without --json the answer opens with the interruption, then the table of what was reached."""
    f = tmp_path / "long.toml"
    f.write_text(LONG_RUN)
    code, out, _err = interrupt_after(["run", str(f)], tmp_path, 1, signal.SIGINT)
    assert code == 130
    assert re.match(r"^Interrupted +by SIGINT at [\d.]+ s \(virtual time\): a partial result, "
                    r"1 checkpoint reached", out), out
    assert re.search(r"^│ 1 s ", out, re.MULTILINE) and not re.search(r"^│ 2 s ", out, re.MULTILINE)


def test_first_signal_asks_to_stop_and_the_second_aborts() -> None:
    """graceful_stop: SIGINT or SIGTERM becomes a stop request, a second one KeyboardInterrupt."""
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with graceful_stop() as stop:
        assert stop() is None
        signal.raise_signal(signal.SIGTERM)
        assert stop() == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_a_linux_session_lets_the_graceful_handler_decide() -> None:
    """Under a LinuxSession's handlers the first signal is still a stop request (so the run ends
    at a safe point and the session restores the host); the second aborts, and the session holds
    every later one until it has restored the knobs."""
    from ksmlab.backends.linux_signals import SessionSignals

    with graceful_stop() as stop:
        session = SessionSignals()
        session.install()
        try:
            signal.raise_signal(signal.SIGINT)
            assert stop() == "SIGINT"
            with pytest.raises(KeyboardInterrupt):
                signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGTERM)  # held, not raised
            assert session.take_held() == [signal.SIGTERM]
        finally:
            session.uninstall()


# --- installation -------------------------------------------------------------------------------

def test_runtime_install_pulls_no_test_tools() -> None:
    """`pip install .` brings the runtime dependencies only: the test tools are the `test` extra,
    and every third-party module the package imports is a runtime dependency (or an optional
    extra's, imported on demand)."""
    import ast
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(reqs: list[str]) -> set[str]:
        return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in reqs}

    runtime = names(project["dependencies"])
    extras = project["optional-dependencies"]
    tools = {"pytest", "hypothesis", "ruff", "mypy"}
    assert tools <= names(extras["test"])
    assert not runtime & tools
    optional = set().union(*(names(v) for k, v in extras.items() if k != "test"))
    imported = set()
    for path in (ROOT / "src" / "ksmlab").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = {m for m in imported if m not in sys.stdlib_module_names and m != "ksmlab"}
    assert third_party <= runtime | optional, third_party - runtime - optional
    assert not third_party & tools


# --- invalid input: one line, exit 2, nothing runs ----------------------------------------------

INVALID_FILES = {
    "syntax.toml": ("[ksm\n", "(syntax): expected valid TOML"),
    "knob.toml": ("[ksm]\nmax_page_sharing = 1\n" + FORMULA.replace("[ksm]\n", ""),
                  "ksm.max_page_sharing: expected an integer from 2 to 2147483647, got 1"),
    "content.toml": (FORMULA.replace('kind = "image"', 'kind = "lava"'),
                     'content.img.kind: expected "zero" or "random" or "fill" or "image" or '
                     '"file", got "lava"'),
    "file.toml": (FORMULA.replace('kind = "image"', 'kind = "file"\npath = "missing.img"'),
                  'content.img.path: expected a readable file, got "missing.img" (No such file'),
    "mapping.toml": (FORMULA.replace("pages = 1\n", "size = 100\n"),
                     "process[0].mapping[0].size: expected a non-zero multiple of the page size"),
    "selector.toml": (FORMULA + '[[event]]\nat = 1\naction = "exit"\nprocess = "p[9]"\n',
                      'event[0].process: expected instances of p within 0..3, got "p[9]"'),
    "lifecycle.toml": (FORMULA + '[[event]]\nat = 1\naction = "exit"\nprocess = "p"\n'
                       '[[event]]\nat = 2\naction = "prctl"\nprocess = "p[0]"\nmerge_any = true\n',
                       "event[1].process: expected processes alive at 2 s (p[0] exited at 1 s)"),
    "activity.toml": (FORMULA + '[[activity]]\nprocess = "p"\nmapping = "mem"\nrate = -1\n',
                      "activity[0].rate: expected a number > 0, got -1"),
    "checkpoint.toml": (FORMULA.replace("pages_shared = 1", "pages_shard = 1"),
                        'checkpoint[0].expect.pages_shard: expected a counter'),
    "empty.toml": ("", "content: expected at least one content model ([content.NAME]), got nothing"),
    "units.toml": (FORMULA.replace("pages = 1\n", 'size = "4 KB"\n'),
                   'process[0].mapping[0].size: expected a size such as 4096, "64KiB", "8MiB" or '
                   '"1GiB" (units B, K or KiB, M or MiB, G or GiB, T or TiB, P or PiB, E or EiB, '
                   'each 1024 times the one before, as the kernel\'s memparse() reads them; "KB" '
                   'is refused as ambiguous: decimal or binary, bits or bytes?), got "4 KB"'),
}


def test_check_names_every_invalid_file(tmp_path: Path) -> None:
    """`ksmlab check` prints one error line per invalid file (and ok lines), exit 2."""
    for name, (text, _) in INVALID_FILES.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "good.toml").write_text(FORMULA)
    names = [*INVALID_FILES, "good.toml"]
    p = ksmlab("check", *names, cwd=tmp_path)
    assert p.returncode == 2
    errors = p.stderr.strip().split("\n")
    assert len(INVALID_FILES) == len(errors)
    for line, (name, (_, fragment)) in zip(errors, INVALID_FILES.items(), strict=True):
        assert line.startswith(f"{name}: "), line
        assert fragment in line, line
        assert ": expected " in line and ", got " in line
    assert p.stdout.startswith("good.toml: ok: 'good': 4 processes in 1 group, 16.0 KiB mapped, "
                               "0 activities, 0 events, 1 checkpoint, planned end 0 ms")


@pytest.mark.parametrize("backend", ["sim", "linux"])
def test_invalid_file_runs_nothing(tmp_path: Path, backend: str) -> None:
    """`ksmlab run BAD` fails before anything runs, on either backend: exit 2, one line."""
    f = tmp_path / "bad.toml"
    f.write_text(INVALID_FILES["lifecycle.toml"][0])
    p = ksmlab("run", str(f), "--backend", backend, "--html", "r.html", cwd=tmp_path)
    assert p.returncode == 2
    assert one_line_error(p).startswith(f"{f}: event[1].process: expected processes alive")
    assert p.stdout == ""
    assert not (tmp_path / "r.html").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["run", "missing.toml"], "missing.toml: (file): expected an existing scenario file, got no such file"),
    (["run", "--bogus"], "ksmlab: unrecognized arguments: --bogus (see ksmlab --help)"),
    (["run", "--until", "soon"], "ksmlab run: argument --until: expected a duration such as"),
    (["run", "--knob", "pages_to_scan"], "ksmlab run: argument --knob: expected NAME=VALUE"),
    (["run", "--knob", "nope=1"], "--knob: nope: expected a KSM knob (run, pages_to_scan"),
    (["run", "--knob", "pages_to_scan=-1"], "--knob: pages_to_scan: expected an integer from 0 to "
                                            "4294967295, got -1"),
    (["run", "--backend", "vm"], "ksmlab run: argument --backend: invalid choice: 'vm'"),
    (["run", "--plot", "no/such/dir/p.png"], "ksmlab: --plot: expected a file in an existing "
                                             "writable directory, got 'no/such/dir/p.png'"),
    (["plot", "nothing.json"], "nothing.json: (file): expected an existing result file"),
    (["run", "--plot", "p.jpg"], "ksmlab: --plot: expected a file name ending in .png, .svg or "
                                 ".pdf (the format it is written in), got 'p.jpg'"),
    (["plot", "-o", "p.gif"], "ksmlab: --output: expected a file name ending in .png, .svg or "
                              ".pdf (the format it is written in), got 'p.gif'"),
    (["run", "--until", "1h"], "ksmlab: --until: expected a time within the scenario, which "
                               "ends at 1 min (add --extend to run it on past its end), got 1 h"),
    (["run", "--extend"], "ksmlab: --extend: expected --until TIME too (how far to run the "
                          "scenario on past its end), got no --until"),
    # The built-in scenario runs 1 min: at most 1,000,000 samples is one per 60 µs.
    (["run", "--sample", "0"], "--sample: interval: expected an interval of at least 60 µs (at "
                               "most 1,000,000 samples over the 1 min run), got 0 ns"),
    ([], "ksmlab: the following arguments are required: COMMAND (see ksmlab --help)"),
    (["stat", "--interval", "0"], "ksmlab stat: --interval: expected a number of seconds > 0"),
])
def test_usage_errors(tmp_path: Path, args: list[str], message: str) -> None:
    """Bad command lines: exit 2 and one line saying what was expected; nothing runs or is written."""
    p = ksmlab(*args, cwd=tmp_path)
    assert p.returncode == 2
    assert one_line_error(p).startswith(message), p.stderr
    assert p.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_plot_rejects_a_json_that_is_no_result(tmp_path: Path) -> None:
    """A JSON file of another kind is refused with the field."""
    (tmp_path / "x.json").write_text('{"schema": "other/1"}')
    p = ksmlab("plot", "x.json", cwd=tmp_path)
    assert p.returncode == 2
    assert one_line_error(p) == "x.json: schema: expected 'ksmlab.run/1', got 'other/1'"


# --- help, version, init -----------------------------------------------------------------------

@pytest.mark.parametrize(("command", "expected"), [
    ([], ["run", "plot", "stat", "check", "init", "exit codes:", "130"]),
    (["run"], ["SCENARIO", "--json", "--timeline", "--plot", "--html", "--backend", "--until",
               "--seed", "--knob", "--progress", "exit codes:"]),
    (["plot"], ["SOURCE", "--output", "--html", "--backend", "exit codes:"]),
    (["stat"], ["--once", "--interval", "--count", "--json", "--sysfs-dir", "merged/s",
                "full scans/min", "unprivileged", "exit codes:"]),
    (["check"], ["SCENARIO", "exit codes:"]),
    (["init"], ["FILE", "--force", "exit codes:"]),
])
def test_help(command: list[str], expected: Sequence[str]) -> None:
    """`--help` of the command and of every subcommand documents its options and exit codes."""
    p = ksmlab(*command, "--help")
    assert p.returncode == 0
    for word in expected:
        assert word in p.stdout, word


def test_version() -> None:
    """--version prints the package version."""
    p = ksmlab("--version")
    assert p.returncode == 0
    assert re.fullmatch(r"ksmlab \d+\.\d+\.\d+\n", p.stdout)


def test_init_writes_the_builtin(tmp_path: Path) -> None:
    """`ksmlab init` prints the built-in scenario, or writes it, refusing to overwrite."""
    p = ksmlab("init")
    assert (0, builtin_scenario_text()) == (p.returncode, p.stdout)
    p = ksmlab("init", "mine.toml", cwd=tmp_path)
    assert p.returncode == 0
    assert builtin_scenario_text() == (tmp_path / "mine.toml").read_text()
    p = ksmlab("init", "mine.toml", cwd=tmp_path)
    assert p.returncode == 2
    assert one_line_error(p) == "ksmlab init: mine.toml exists (use --force to overwrite)"
    assert ksmlab("check", "mine.toml", cwd=tmp_path).returncode == 0


# --- stat --------------------------------------------------------------------------------------

def fake_sysfs(d: Path, **values: int) -> Path:
    """A directory laid out like /sys/kernel/mm/ksm."""
    files: dict[str, str] = {
        "pages_shared": "100", "pages_sharing": "900", "pages_unshared": "50",
        "pages_volatile": "7", "ksm_zero_pages": "24", "general_profit": "3833856",
        "full_scans": "42", "pages_scanned": "123456", "pages_skipped": "99",
        "stable_node_chains": "1", "stable_node_dups": "3", "run": "1", "pages_to_scan": "100",
        "sleep_millisecs": "20", "use_zero_pages": "0", "smart_scan": "1",
        "max_page_sharing": "256", "merge_across_nodes": "1", "advisor_mode": "[none] scan-time",
    }
    files.update({k: str(v) for k, v in values.items()})
    d.mkdir(exist_ok=True)
    for name, text in files.items():
        (d / name).write_text(text + "\n")
    return d


def test_stat_once(tmp_path: Path) -> None:
    """`stat --once`: the counters, the profit in human units, the knobs."""
    d = fake_sysfs(tmp_path / "ksm")
    p = ksmlab("stat", "--once", "--sysfs-dir", str(d))
    assert p.returncode == 0, p.stderr
    assert "3.7 MiB" in p.stdout  # 3833856 = (900 + 24) * 4096 - 1081 * 64 bytes
    for word in ("pages_sharing", "900", "full_scans", "42", "pages_to_scan", "advisor_mode",
                 "none", "need two samples"):
        assert word in p.stdout, word


def test_stat_once_json(tmp_path: Path) -> None:
    """`stat --once --json`: schema ksmlab.stat/1."""
    d = fake_sysfs(tmp_path / "ksm")
    p = ksmlab("stat", "--once", "--json", "--sysfs-dir", str(d))
    doc = json.loads(p.stdout)
    assert {"schema", "sysfs", "counters", "general_profit_human", "knobs", "ksmd_cpu_s",
            "rates"} == set(doc)
    assert doc["schema"] == "ksmlab.stat/1"
    assert doc["rates"] is None
    assert doc["general_profit_human"] == "3.7 MiB"
    assert doc["counters"]["pages_sharing"] == 900
    assert doc["knobs"]["advisor_mode"] == "none"


def test_stat_lines_like_vmstat(tmp_path: Path) -> None:
    """Not on a terminal, `stat -n 3` prints a header and one line per sample, with rates."""
    d = fake_sysfs(tmp_path / "ksm")
    p = ksmlab("stat", "-n", "3", "-i", "0.05", "--sysfs-dir", str(d))
    assert p.returncode == 0, p.stderr
    lines = p.stdout.rstrip("\n").split("\n")
    assert len(lines) == 4
    assert lines[0].split() == ["profit", "shared", "sharing", "unshared", "volatile", "zero",
                                "scans", "merged/s", "scanned/s", "scans/min", "cpu%"]
    assert lines[1].split()[:9] == ["3.7", "MiB", "100", "900", "50", "7", "24", "42", "-"]
    # Nothing changes in the fake directory: every rate is 0.
    assert lines[2].split()[8:11] == ["0.0", "0.0", "0.0"]
    p = ksmlab("stat", "-n", "2", "-i", "0.05", "--json", "--sysfs-dir", str(d))
    docs = [json.loads(ln) for ln in p.stdout.splitlines()]
    assert docs[0]["rates"] is None
    assert docs[1]["rates"]["merged_per_s"] == 0.0


def test_stat_without_ksm_exits_3(tmp_path: Path) -> None:
    """No KSM directory: exit 3 with the reason."""
    p = ksmlab("stat", "--once", "--sysfs-dir", str(tmp_path / "none"))
    assert p.returncode == 3
    assert f"ksmlab stat: {tmp_path / 'none'} is not a directory" == one_line_error(p)


@pytest.mark.linux
@pytest.mark.skipif(not Path("/sys/kernel/mm/ksm").is_dir(), reason="this kernel has no KSM")
def test_stat_on_this_machine_unprivileged(tmp_path: Path) -> None:
    """`stat --once` reads the real counters, also as an unprivileged user."""
    as_user = 65534 if os.geteuid() == 0 else None
    if as_user is not None:
        tmp_path.chmod(0o777)
        if not _can_run_as(as_user, tmp_path):
            pytest.skip("ksmlab's installation is not readable by an unprivileged user here")
    p = ksmlab("stat", "--once", "--json", cwd=tmp_path, user=as_user)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert {"pages_shared", "pages_sharing", "full_scans", "general_profit"} <= set(doc["counters"])


def _can_run_as(uid: int, cwd: Path) -> bool:
    """Whether the entry point can run as *uid* (the interpreter and sources readable)."""
    try:
        p = subprocess.run([*_entry_point(), "--version"], cwd=cwd, user=uid, group=uid,
                           capture_output=True, timeout=60, check=False)
    except OSError:
        return False
    return p.returncode == 0


# --- the Linux backend -------------------------------------------------------------------------

@pytest.mark.linux
def test_linux_backend_runs_the_same_file(tmp_path: Path) -> None:
    """--backend linux runs the formula example on the real kernel with the same result.

    The per-process check (ksm_merging_pages = 4 x 256) holds whatever else
    runs on the machine; the global counters only on a machine where nothing
    else uses KSM, so they are checked as lower bounds here.
    """
    reason = linux_ksm_unavailable_reason()
    if reason:
        pytest.skip(reason)
    f = tmp_path / "id.toml"
    text = (EXAMPLES / "identical-pages.toml").read_text()
    f.write_text(text.replace(
        "expect = { pages_shared = 256, pages_sharing = 768, pages_unshared = 0, "
        "general_profit = 3080192 }",
        "expect = { pages_shared = { min = 256 }, pages_sharing = { min = 768 } }"))
    p = ksmlab("run", str(f), "--backend", "linux", "--json", cwd=tmp_path, timeout=120)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["backend"] == "linux" and doc["machine"].startswith("Linux ")
    (cp,) = doc["checkpoints"]
    assert cp["reached"] and all(x["ok"] for x in cp["checks"]), cp["checks"]
    assert cp["processes"]["p"]["ksm_merging_pages"] == 1024


LINUX_LONG_RUN = """
[scenario]
name = "interrupted on the kernel"
duration = "60s"
[ksm]
pages_to_scan = 1000
sleep_millisecs = 10
[content.same]
kind = "fill"
byte = 7
[[process]]
name = "p"
count = 2
[[process.mapping]]
pages = 64
content = "same"
[[checkpoint]]
at = "500ms"
[[checkpoint]]
at = "1s"
[[checkpoint]]
at = "50s"
"""


@pytest.mark.linux
def test_interrupted_linux_run_keeps_checkpoints_and_restores_the_host(tmp_path: Path) -> None:
    """Ctrl-C on --backend linux: the partial result with the two checkpoints reached, exit 130,
    and the session puts every knob back as it found it."""
    from linux_support import after_session, ksmlab_lock, read_knobs, read_knobs_locked

    reason = linux_ksm_unavailable_reason()
    if reason:
        pytest.skip(reason)
    before = read_knobs_locked()
    f = tmp_path / "lin.toml"
    f.write_text(LINUX_LONG_RUN)
    code, out, err = interrupt_after(["run", str(f), "--backend", "linux", "--json"], tmp_path, 2,
                                     signal.SIGINT, timeout=120)
    assert code == 130, err
    doc = json.loads(out)
    assert (doc["backend"], doc["partial"], doc["interrupted"]) == ("linux", True, "SIGINT")
    assert [c["name"] for c in doc["checkpoints"]] == ["500 ms", "1 s"]
    assert 1.0 <= doc["end_s"] < 50.0
    # 2 x 64 pages of one content, ksmd scanning 1000 pages every 10 ms: merged within a few
    # batches, so by 1 s all 128 pages are KSM pages (ksm_stat counts them per process, whatever
    # else runs on the machine).
    assert doc["checkpoints"][1]["processes"]["p"]["ksm_merging_pages"] == 128
    assert err[-1].startswith("ksmlab: interrupted by SIGINT at ") and err[-1].endswith(
        "(real time): partial result, 2 of 3 checkpoints reached"), err
    with ksmlab_lock():
        assert read_knobs() == after_session(before, merged=True)


def test_linux_backend_unavailable_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Where KSM cannot be driven, --backend linux exits 3 with the reason.

    In-process (``cli.main``), because the machine's KSM cannot be switched
    off for a subprocess: the availability check is replaced instead.
    """
    from ksmlab import cli
    from ksmlab.backends import linux

    monkeypatch.setattr(linux, "linux_ksm_unavailable_reason",
                        lambda: "/sys/kernel/mm/ksm does not exist (test).")
    monkeypatch.setenv("KSMLAB_MEM_AVAILABLE", "16GiB")  # the pre-flight reads no /proc
    f = tmp_path / "s.toml"
    f.write_text(FORMULA)
    assert cli.main(["run", str(f), "--backend", "linux"]) == 3
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err == ("ksmlab: the linux backend is unavailable: /sys/kernel/mm/ksm does not exist "
            "(test).\n")


@pytest.mark.skipif(os.geteuid() != 0 and linux_ksm_unavailable_reason() is None,
                    reason="this user can drive KSM, so the backend is available")
def test_linux_backend_unavailable_exits_3(tmp_path: Path) -> None:
    """Without root (or KSM), --backend linux exits 3 with the reason, after validating."""
    as_user = 65534 if os.geteuid() == 0 else None
    if as_user is not None:
        tmp_path.chmod(0o777)
        if not _can_run_as(as_user, tmp_path):
            pytest.skip("ksmlab's installation is not readable by an unprivileged user here")
    f = tmp_path / "s.toml"
    f.write_text(FORMULA)
    f.chmod(0o644)
    p = ksmlab("run", str(f), "--backend", "linux", cwd=tmp_path, user=as_user)
    assert p.returncode == 3
    assert one_line_error(p).startswith("ksmlab: the linux backend is unavailable: ")
