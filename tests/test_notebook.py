"""The Python API for notebooks (``ksmlab.load_scenario``, ``ksmlab.run``, ``ksmlab.Result``).

The worked example of docs/python.md is run here as it is written, and its output
compared with the output the page shows, so the page cannot drift.  Expected counters
are the arithmetic of examples/identical-pages.toml (256 contents in 4 processes:
pages_shared = 256, pages_sharing = 256 x 3 = 768, general_profit = 768 x 4096 -
1024 x 64 = 3080192).  The memory available is given (KSMLAB_MEM_AVAILABLE), so
nothing reads the host but the test marked ``linux``.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

import ksmlab
from ksmlab import notebook
from ksmlab.bulk import BulkKernel
from ksmlab.capabilities import ALL_CAPABILITIES, Capability
from ksmlab.errors import NotModelledError
from ksmlab.scenario import ScenarioError, preflight
from ksmlab.scenario.backends import open_backend
from ksmlab.scenario.result import TIMELINE_COLUMNS
from ksmlab.scenario.runner import RunError

ROOT = Path(__file__).resolve().parents[1]
IDENTICAL = ROOT / "examples" / "identical-pages.toml"


@pytest.fixture(autouse=True)
def _memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(preflight.MEM_ENV, "16GiB")


@pytest.fixture(scope="module")
def result() -> ksmlab.Result:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(preflight.MEM_ENV, "16GiB")
        return ksmlab.run(IDENTICAL)


# --- the worked example of docs/python.md -----------------------------------------------------

def _worked_example() -> tuple[str, str]:
    """The code and the output shown under "## A worked example"."""
    text = (ROOT / "docs" / "python.md").read_text(encoding="utf-8")
    section = text.split("## A worked example", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(\w+)\n(.*?)```", section, re.S)
    assert [lang for lang, _ in blocks] == ["python", "text"], blocks
    return blocks[0][1], blocks[1][1]


def test_worked_example_runs_as_documented(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The code of docs/python.md, run from a copy of the repository's examples, prints
    exactly what the page says and writes the PNG it names."""
    code, shown = _worked_example()
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "docs/python.md", "exec"), {"__name__": "__docs__"})
    assert out.getvalue() == shown
    assert (tmp_path / "identical-pages.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- load_scenario ------------------------------------------------------------------------------

def test_load_scenario_from_path_text_or_builtin() -> None:
    by_path = ksmlab.load_scenario(IDENTICAL)
    by_str = ksmlab.load_scenario(str(IDENTICAL))
    by_text = ksmlab.load_scenario(IDENTICAL.read_text())
    assert by_path.name == by_str.name == by_text.name == "256 identical pages in 4 processes"
    assert by_text.source == "<text>"
    assert ksmlab.load_scenario().source == "<built-in>"
    assert ksmlab.load_scenario(IDENTICAL, seed=9).seed == 9


def test_load_scenario_errors() -> None:
    with pytest.raises(ScenarioError, match=r"^<text>: process\[0\]\.count: expected an integer >= 1, "
                                            r"got 0$"):
        ksmlab.load_scenario(IDENTICAL.read_text().replace("count = 4", "count = 0"))
    with pytest.raises(ScenarioError, match=r"no-such\.toml"):
        ksmlab.load_scenario("no-such.toml")
    with pytest.raises(TypeError, match="source must be a path, TOML text or None, not int: 5"):
        ksmlab.load_scenario(5)  # type: ignore[arg-type]


# --- the result ---------------------------------------------------------------------------------

def test_counters_are_integers(result: ksmlab.Result) -> None:
    merged = result.checkpoint("merged")
    assert merged.counters["pages_shared"] == 256
    assert merged.counters["pages_sharing"] == 768
    assert merged.counters["general_profit"] == 768 * 4096 - 1024 * 64
    assert merged.processes["p"] == {"alive": 4, "ksm_rmap_items": 1024, "ksm_zero_pages": 0,
                                     "ksm_merging_pages": 1024,
                                     "ksm_process_profit": 1024 * 4096 - 1024 * 64}
    for sample in result.timeline:
        assert type(sample.time_s) is float
        assert all(type(getattr(sample, n)) is int for n in TIMELINE_COLUMNS[1:-1])
    assert result.timeline[-1].pages_sharing == 768
    assert result.ok and result.failures == () and result.backend == "sim"


def test_sample_fields_are_the_timeline_columns() -> None:
    assert ksmlab.Sample._fields == TIMELINE_COLUMNS


def test_unknown_checkpoint_names_the_known(result: ksmlab.Result) -> None:
    with pytest.raises(KeyError, match=r"no checkpoint 'done'; the checkpoints are \['merged'\]"):
        result.checkpoint("done")


def test_to_pandas_timeline(result: ksmlab.Result) -> None:
    df = result.to_pandas()
    assert list(df.columns) == list(TIMELINE_COLUMNS)
    assert len(df) == len(result.timeline)
    assert {str(df[n].dtype) for n in TIMELINE_COLUMNS[1:-1]} == {"int64"}
    assert str(df["time_s"].dtype) == str(df["ksmd_cpu_s"].dtype) == "float64"
    assert df["pages_sharing"].iloc[-1] == 768
    assert df["time_s"].tolist() == [s.time_s for s in result.timeline]


def test_to_pandas_checkpoints(result: ksmlab.Result) -> None:
    df = result.to_pandas("checkpoints")
    assert df["name"].tolist() == ["merged"]
    assert bool(df["reached"].iloc[0])
    assert df["pages_sharing"].iloc[0] == 768
    assert df["p.ksm_merging_pages"].iloc[0] == 1024 and df["p.alive"].iloc[0] == 4
    assert str(df["p.ksm_merging_pages"].dtype) == "int64"


def test_to_pandas_group_born_later() -> None:
    """A group forked after the first checkpoint has 0 processes there, not NaN."""
    r = ksmlab.run(ROOT / "examples" / "fork-server.toml", backend="sim", until="5s")
    df = r.to_pandas("checkpoints")
    first, last = df.iloc[0], df.iloc[-1]
    assert first["worker.alive"] == 0 and last["worker.alive"] == 6
    assert str(df["worker.alive"].dtype) == "int64"


def test_to_pandas_bad_table(result: ksmlab.Result) -> None:
    with pytest.raises(ValueError, match="table must be 'timeline' or 'checkpoints', got 'rows'"):
        result.to_pandas("rows")  # type: ignore[arg-type]


def test_to_pandas_without_pandas_names_the_extra(result: ksmlab.Result,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pandas", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"pip install 'ksmlab\[pandas\]'"):
        result.to_pandas()


def test_pandas_is_not_imported_by_ksmlab() -> None:
    """The command line and the rest of the API work without pandas."""
    import subprocess

    code = ("import sys, ksmlab, ksmlab.cli, ksmlab.notebook; "
            "print('pandas' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": ":".join(sys.path)})
    assert out.stdout.strip() == "False"


def test_plot_returns_the_figure(result: ksmlab.Result, tmp_path: Path) -> None:
    from matplotlib.figure import Figure

    fig = result.plot()
    assert isinstance(fig, Figure)
    titles = [ax.get_title(loc="left") for ax in fig.axes]
    assert "Pages in each KSM state" in titles
    fig.savefig(tmp_path / "r.svg")
    assert (tmp_path / "r.svg").read_text().lstrip().startswith("<?xml")


def test_to_json_is_the_run_document(result: ksmlab.Result) -> None:
    doc = result.to_json()
    assert doc["schema"] == "ksmlab.run/1"
    assert doc["checkpoints"][0]["counters"]["pages_sharing"] == 768


def test_plan_says_why(result: ksmlab.Result) -> None:
    assert result.plan.backend == "sim"
    assert result.plan.describe().startswith("--backend auto chose sim (SimKernel): it needs ")
    assert "16.0 GiB available (KSMLAB_MEM_AVAILABLE)" in result.plan.describe()
    assert repr(result) == ("<ksmlab.Result '256 identical pages in 4 processes' on SimKernel "
                            "(model): ok, last checkpoint 'merged': pages_sharing=768, "
                            "general_profit=3080192>")


# --- run's arguments ----------------------------------------------------------------------------

def test_knobs_until_seed() -> None:
    r = ksmlab.run(IDENTICAL, knobs={"pages_to_scan": 256, "use_zero_pages": True}, until=0.05,
                   seed=3)
    assert (r.knobs["pages_to_scan"], r.knobs["use_zero_pages"]) == (256, 1)
    assert r.end_s == 0.05 and r.scenario.seed == 3
    # 256 pages a batch need three full scans of four batches, 10 ms apart (docs/python.md):
    # not merged by 50 ms.
    assert [(c.name, c.time_s, c.reached) for c in r.checkpoints] == [
        ("--until 50 ms", 0.05, True), ("merged", 0.05, False)]
    assert not r.ok
    assert ksmlab.run(IDENTICAL, until="50ms").end_s == 0.05


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"until": 0}, ValueError, "until must be a duration > 0"),
    ({"until": "soon"}, ValueError, "until must be a duration such as"),
    ({"until": [1]}, TypeError, r"until must be a duration \(\"30s\"\) or seconds, not list"),
    ({"knobs": {"pages_to_scan": -1}}, ScenarioError, r"--knob: pages_to_scan: expected"),
    ({"knobs": {"nope": 1}}, ScenarioError, "nope"),
    ({"backend": "vm"}, ValueError, "backend must be one of auto, sim, bulk, linux, got 'vm'"),
    ({"content": "hash"}, ValueError, "content must be one of bytes, fingerprint, got 'hash'"),
    ({"content": "fingerprint", "backend": "bulk"}, ValueError,
     "content='fingerprint' applies to backend 'sim'"),
    ({"mem_available_bytes": 0}, ValueError, "mem_available_bytes must be a number of bytes > 0"),
])
def test_bad_arguments_name_themselves(kwargs: dict[str, Any], error: type[Exception],
                                       message: str) -> None:
    with pytest.raises(error, match=message):
        ksmlab.run(IDENTICAL, **kwargs)


def test_seed_with_a_loaded_scenario_is_refused() -> None:
    sc = ksmlab.load_scenario(IDENTICAL)
    with pytest.raises(ValueError, match=r"seed=4: a loaded Scenario's seeds are already derived"):
        ksmlab.run(sc, seed=4)


def test_fingerprint_content() -> None:
    r = ksmlab.run(IDENTICAL, content="fingerprint")
    assert r.machine == "SimKernel (model, fingerprint content)"
    assert r.checkpoint("merged").counters["pages_sharing"] == 768


def test_bulk_backend() -> None:
    r = ksmlab.run(IDENTICAL, backend="bulk")
    assert r.backend == "bulk" and r.checkpoint("merged").counters["pages_sharing"] == 768


def test_refused_before_anything_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """Too little memory, or a call the engine does not model: raised before a backend opens."""
    opened: list[str] = []
    monkeypatch.setattr(notebook, "open_backend", lambda *a: opened.append(str(a)))
    with pytest.raises(ksmlab.WontFitError, match=r"SimKernel needs about .* and 1\.0 MiB is "
                                                  r"available \(mem_available_bytes\)"):
        ksmlab.run(IDENTICAL, mem_available_bytes=1 << 20)
    monkeypatch.setattr(BulkKernel, "MODELS",
                        frozenset(ALL_CAPABILITIES - {Capability.PR_SET_MEMORY_MERGE}))
    with pytest.raises(NotModelledError, match=r"does not model prctl\(PR_SET_MEMORY_MERGE\)"):
        ksmlab.run(ROOT / "examples" / "fork-server.toml", backend="bulk")
    assert opened == []


def test_backend_closed_however_the_run_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    """run() closes the backend after a run, and after a failed one."""
    closed: list[str] = []

    def tracked(name: str, content: str) -> Any:
        b = open_backend(name, content)  # type: ignore[arg-type]
        close = b.close

        def close_and_note() -> None:
            closed.append(name)
            close()
        b.close = close_and_note  # type: ignore[method-assign]
        return b

    monkeypatch.setattr(notebook, "open_backend", tracked)
    ksmlab.run(IDENTICAL)
    assert closed == ["sim"]

    def failing(*args: object) -> None:
        raise RunError("at 1 s, event[0]: a kernel call failed (test)")
    monkeypatch.setattr(notebook, "run_scenario", failing)
    with pytest.raises(RunError, match="a kernel call failed"):
        ksmlab.run(IDENTICAL)
    assert closed == ["sim", "sim"]


def test_progress_callback() -> None:
    seen: list[float] = []
    ksmlab.run(IDENTICAL, progress=lambda p: seen.append(p.now_s))
    assert seen and seen == sorted(seen) and not any(math.isnan(t) for t in seen)


@pytest.mark.linux
def test_linux_backend_from_python() -> None:
    """The same example on this machine's kernel, from Python: the same arithmetic."""
    from ksmlab.backends.linux import helper_unavailable_reason, linux_ksm_unavailable_reason

    reason = linux_ksm_unavailable_reason() or helper_unavailable_reason()
    if reason:
        pytest.skip(reason)
    r = ksmlab.run(IDENTICAL, backend="linux")
    assert r.backend == "linux" and r.machine.startswith("Linux ")
    merged = r.checkpoint("merged")
    assert merged.reached
    assert (merged.counters["pages_shared"], merged.counters["pages_sharing"]) == (256, 768)
