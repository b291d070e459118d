"""Scenarios give the same results whatever the model's content mode (``--content``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ksmlab.report.document import to_document
from ksmlab.scenario.backends import SimBackend, open_backend
from ksmlab.scenario.loader import load_scenario
from ksmlab.scenario.model import Scenario
from ksmlab.scenario.runner import run_scenario

ROOT = Path(__file__).resolve().parents[1]
FAST_EXAMPLES = [p for p in sorted((ROOT / "examples").glob("*.toml"))
                 if p.stem != "twelve-vms"]  # minutes per run: covered by the built-in scenario


def result(sc: Scenario, content: str) -> dict[str, Any]:
    """The JSON document of a run, without the line naming the machine."""
    backend = SimBackend(content)  # type: ignore[arg-type]
    try:
        doc = to_document(run_scenario(sc, backend))
    finally:
        backend.close()
    assert isinstance(doc, dict)
    assert doc.pop("machine").startswith("SimKernel (model")
    return doc


def before(doc: dict[str, Any], t_s: float) -> dict[str, Any]:
    """*doc* reduced to its checkpoints and timeline samples before *t_s* seconds."""
    cols = doc["timeline"]["columns"]
    t = cols.index("time_s")
    return {"checkpoints": [c for c in doc["checkpoints"] if c["time_s"] < t_s],
            "rows": [row for row in doc["timeline"]["rows"] if row[t] < t_s]}


def same_results(sc: Scenario) -> None:
    """Identical results, all of them, unless pages are rewritten while ksmd scans.

    A write activity rewrites pages that may sit in the current unstable
    tree; the kernel's search then walks a tree whose order no longer holds,
    and where it goes depends on the exact bytes (memcmp) or, here, on the
    fingerprints.  From the first such write on, the two modes can differ as
    two byte-mode runs with different random bytes do (docs/design.md,
    "Content mode"); before it, they must not.
    """
    fp, by = result(sc, "fingerprint"), result(sc, "bytes")
    if not sc.activities:
        assert fp == by
        return
    first = min(a.start_ns for a in sc.activities) / 1e9
    assert before(fp, first) == before(by, first)
    assert before(by, first)["rows"], "nothing compared"


@pytest.mark.slow
@pytest.mark.parametrize("path", FAST_EXAMPLES, ids=[p.stem for p in FAST_EXAMPLES])
def test_examples_same_in_both_modes(path: Path) -> None:
    """Every checkpoint, counter, check and timeline sample (see same_results)."""
    same_results(load_scenario(path))


def test_describe_names_the_mode() -> None:
    assert "fingerprint" in SimBackend("fingerprint").describe()
    assert "fingerprint" not in SimBackend().describe()


def test_content_mode_is_for_the_model_only() -> None:
    with pytest.raises(ValueError, match="model"):
        open_backend("linux", "fingerprint")


def test_cli_refuses_content_with_linux_backend() -> None:
    """Exit 2 (invalid input), before anything touches the kernel."""
    p = subprocess.run([sys.executable, "-m", "ksmlab", "run", "--backend", "linux",
                        "--content", "fingerprint"], capture_output=True, text=True,
                       check=False)
    assert p.returncode == 2
    assert "--content fingerprint applies to --backend sim only" in p.stderr


def test_cli_run_with_fingerprint_content() -> None:
    """``ksmlab run --content fingerprint --json`` runs the model in that mode and says so."""
    p = subprocess.run([sys.executable, "-m", "ksmlab", "run", "--json", "--content",
                        "fingerprint", "--no-progress", str(ROOT / "examples" / "identical-pages.toml")],
                       capture_output=True, text=True, check=True)
    doc = json.loads(p.stdout)
    assert doc["machine"] == "SimKernel (model, fingerprint content)"
    assert doc["ok"] is True  # the example's own checks (formula values) hold
