"""Scenarios on the bulk engine (``ksmlab run --backend bulk``), against SimKernel."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ksmlab.report.document import to_document
from ksmlab.scenario.backends import BulkBackend, SimBackend
from ksmlab.scenario.loader import load_builtin, load_scenario
from ksmlab.scenario.model import Scenario
from ksmlab.scenario.runner import RunError, run_scenario

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

TREE_WALK = ("pages_shared", "pages_sharing", "pages_volatile", "general_profit",
             "stable_node_chains", "stable_node_dups")
"""Counters that may drop at another moment on the bulk engine, which finds stale
KSM pages and emptied chains only through their own content (docs/bulk.md)."""


def document(sc: Scenario, backend: SimBackend | BulkBackend) -> dict[str, Any]:
    """The run's JSON document, without the backend's name and description."""
    try:
        doc = to_document(run_scenario(sc, backend))
    finally:
        backend.close()
    assert isinstance(doc, dict)
    doc.pop("backend")
    doc.pop("machine")
    # The bulk engine has no advisor: compare the knobs both machines have.
    doc["knobs"] = {k: v for k, v in doc["knobs"].items() if k in BulkBackend().bulk.sysfs}
    return doc


def without(doc: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """*doc* without the counters *names*, in checkpoints and timeline."""
    doc = json.loads(json.dumps(doc))
    for c in doc["checkpoints"]:
        for name in names:
            c["counters"].pop(name, None)
    cols = doc["timeline"]["columns"]
    keep = [i for i, col in enumerate(cols) if col not in names]
    doc["timeline"]["columns"] = [cols[i] for i in keep]
    doc["timeline"]["rows"] = [[row[i] for i in keep] for row in doc["timeline"]["rows"]]
    return doc


@pytest.mark.parametrize("name", ["identical-pages", "disk-image"])
def test_examples_identical_to_simkernel(name: str) -> None:
    """No KSM page goes stale in these: every checkpoint and sample is the same."""
    sc = load_scenario(EXAMPLES / f"{name}.toml")
    assert document(sc, BulkBackend()) == document(sc, SimBackend("fingerprint"))


def test_zero_pages_example_matches_but_for_tree_walk_timing() -> None:
    """After the unmerge at 12 s, SimKernel frees the emptied zero-page chain when a
    search for another content passes it; the bulk engine keeps it until a search
    for its own content, which use_zero_pages=1 no longer makes.  All else matches."""
    sc = load_scenario(EXAMPLES / "zero-pages.toml")
    bulk, sim = document(sc, BulkBackend()), document(sc, SimBackend())
    assert without(bulk, TREE_WALK) == without(sim, TREE_WALK)
    assert bulk["ok"] and sim["ok"]


def test_unmodelled_call_fails_the_run_clearly() -> None:
    """fork-server uses prctl(PR_SET_MEMORY_MERGE): the run stops, naming the call."""
    sc = load_scenario(EXAMPLES / "fork-server.toml")
    backend = BulkBackend()
    with pytest.raises(RunError, match="prctl is not modelled by the bulk engine"):
        run_scenario(sc, backend)


def test_builtin_runs_with_write_activity() -> None:
    """Partial random writes become new contents; the built-in scenario runs and merges."""
    doc = document(load_builtin(), BulkBackend())
    assert doc["ok"] is True
    assert doc["checkpoints"][-1]["counters"]["pages_sharing"] > 0


def test_cli_backend_bulk() -> None:
    p = subprocess.run([sys.executable, "-m", "ksmlab", "run", "--backend", "bulk", "--json",
                        "--no-progress", str(EXAMPLES / "identical-pages.toml")],
                       capture_output=True, text=True, check=True)
    doc = json.loads(p.stdout)
    assert doc["backend"] == "bulk"
    assert doc["machine"] == "BulkKernel (model, bulk engine)"
    p = subprocess.run([sys.executable, "-m", "ksmlab", "run", "--backend", "bulk",
                        "--content", "fingerprint"], capture_output=True, text=True,
                       check=False)
    assert p.returncode == 2
    assert "bulk engine always keeps fingerprints" in p.stderr
