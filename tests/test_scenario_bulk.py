"""Scenarios on the bulk engine (``ksmlab run --backend bulk``), against SimKernel."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bulk_programs import TREE_WALK
from ksmlab.constants import PAGE_SIZE
from ksmlab.mm.page import fingerprint
from ksmlab.report.document import to_document
from ksmlab.scenario.backends import BulkBackend, SimBackend
from ksmlab.scenario.content import ContentSource
from ksmlab.scenario.loader import load_builtin, load_scenario, parse_scenario
from ksmlab.scenario.model import Content, Scenario
from ksmlab.scenario.runner import RunError, run_scenario

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"



def document(sc: Scenario, backend: SimBackend | BulkBackend) -> dict[str, Any]:
    """The run's JSON document, without the backend's name and description."""
    try:
        doc = to_document(run_scenario(sc, backend))
    finally:
        backend.close()
    assert isinstance(doc, dict)
    doc.pop("backend")
    doc.pop("machine")
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


UNMERGE_ALL = """
[scenario]
name = "run=2, then merge again with another max_page_sharing"
seed = 3
[ksm]
pages_to_scan = 2000
sleep_millisecs = 10
[content.same]
kind = "image"
pages = 64
[[process]]
name = "p"
count = 4
[[process.mapping]]
name = "buf"
pages = 64
content = "same"
[[checkpoint]]
name = "merged"
at = "2s"
expect = { pages_shared = 64, pages_sharing = 192 }
[[event]]
at = "3s"
action = "knobs"
set = { run = 2 }
[[checkpoint]]
name = "unmerged"
at = "4s"
expect = { pages_shared = 0, pages_sharing = 0, pages_unshared = 0, pages_volatile = 0 }
expect_process = { p = { ksm_rmap_items = 0, ksm_merging_pages = 0 } }
[[event]]
at = "5s"
action = "knobs"
set = { max_page_sharing = 3, run = 1 }
[[checkpoint]]
name = "merged again"
at = "8s"
expect = { pages_shared = 64, pages_sharing = 128 }
expect_process = { p = { ksm_merging_pages = 192 } }
"""
"""4 x 64 identical pages: 64 KSM pages of 4 sharers; no KSM page nor rmap_item after
run=2; then, with max_page_sharing 3, each content's KSM page takes 3 of its 4 pages
(64 shared, 128 sharing, 192 merging) and the 4th has no twin left to merge with."""


def test_unmerge_all_and_max_page_sharing_identical_to_simkernel() -> None:
    """run=2 and a max_page_sharing change as scenario events: every checkpoint and
    sample of the run is SimKernel's, and the expectations (arithmetic above) hold."""
    sc = parse_scenario(UNMERGE_ALL, source="<test>", base_dir=Path("."))
    got = document(sc, BulkBackend())
    assert got == document(sc, SimBackend("fingerprint"))
    checks = [ch for c in got["checkpoints"] for ch in c["checks"]]
    assert len(checks) == 11
    assert all(ch["ok"] for ch in checks), checks


@pytest.mark.slow
def test_zero_pages_example_matches_but_for_tree_walk_timing() -> None:
    """After the unmerge at 12 s, SimKernel frees the emptied zero-page chain when a
    search for another content passes it; the bulk engine keeps it until a search
    for its own content, which use_zero_pages=1 no longer makes.  All else matches."""
    sc = load_scenario(EXAMPLES / "zero-pages.toml")
    bulk, sim = document(sc, BulkBackend()), document(sc, SimBackend())
    assert without(bulk, TREE_WALK) == without(sim, TREE_WALK)
    assert bulk["ok"] and sim["ok"]


@pytest.mark.slow
def test_fork_server_example_matches_but_for_tree_walk_timing() -> None:
    """prctl(PR_SET_MEMORY_MERGE) before mapping, fork x6 (merge-any and the marks
    inherited), COW writes, exits and an unmerge: every checkpoint and sample is
    SimKernel's, but for stable_node_chains after the unmerge at 30 s (SimKernel frees the
    emptied zero-page chain when a search for another content passes it, the bulk engine
    keeps it: see TREE_WALK), and the other tree-walk counters in the samples of the half
    second after it: the unmerge frees the server's KSM pages, and their stale nodes go when
    SimKernel's next search passes them but when the bulk engine's walk revisits their items,
    a batch or two later (ksmd's batches fall where the cost model puts them)."""
    sc = load_scenario(EXAMPLES / "fork-server.toml")
    bulk, sim = document(sc, BulkBackend()), document(sc, SimBackend())
    assert without(bulk, ("stable_node_chains",))["checkpoints"] == without(
        sim, ("stable_node_chains",))["checkpoints"]
    window = [row[0] for row in bulk["timeline"]["rows"] if 30.0 < row[0] <= 30.5]
    assert window  # the samples of the half second after the unmerge
    inside = [json.loads(json.dumps(d)) for d in (bulk, sim)]
    for doc in inside:
        doc["timeline"]["rows"] = [r for r in doc["timeline"]["rows"] if r[0] in window]
    assert without(inside[0], TREE_WALK)["timeline"] == without(inside[1], TREE_WALK)["timeline"]
    for doc in (bulk, sim):
        doc["timeline"]["rows"] = [r for r in doc["timeline"]["rows"] if r[0] not in window]
    assert without(bulk, ("stable_node_chains",)) == without(sim, ("stable_node_chains",))
    assert bulk["ok"] and sim["ok"]
    before, running, _left, end = bulk["checkpoints"]
    # 1024 zero pages, at most 256 mappings per KSM page: a chain of 4, 1020 sharing.
    assert {n: before["counters"][n] for n in ("pages_shared", "pages_sharing",
                                               "stable_node_chains", "stable_node_dups")} == {
        "pages_shared": 4, "pages_sharing": 1020, "stable_node_chains": 1, "stable_node_dups": 4}
    # Nothing madvised: merge-any makes all 2048 + 1024 pages of each process mergeable.
    assert running["processes"]["server"]["ksm_rmap_items"] == 3072
    assert running["processes"]["worker"]["ksm_rmap_items"] == 6 * 3072
    assert (end["counters"]["pages_shared"], end["counters"]["pages_sharing"]) == (0, 0)


NODES_EVENT = """
[scenario]
name = "merge_across_nodes as an event"
duration = "1s"
[content.z]
kind = "zero"
[[process]]
name = "p"
[[process.mapping]]
name = "buf"
pages = 4
content = "z"
[[event]]
at = "0.5s"
action = "knobs"
set = { merge_across_nodes = 0 }
[[checkpoint]]
name = "end"
at = "1s"
"""


def test_unmodelled_call_fails_the_run_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    """A call the engine does not model stops the run, naming the time and the call.

    Every call a scenario can make is modelled by the bulk engine now, so the
    refusal is injected where the knob event lands (a stand-in for any call
    a future scenario feature might make first)."""
    from ksmlab.bulk.engine import BulkKsm
    from ksmlab.errors import NotModelledError

    def refuse(self: BulkKsm, knob: int) -> None:
        raise NotModelledError("merge_across_nodes: refused for this test")

    monkeypatch.setattr(BulkKsm, "set_merge_across_nodes", refuse)
    sc = parse_scenario(NODES_EVENT, source="<test>", base_dir=Path("."))
    with pytest.raises(RunError, match=r"at 500 ms, .* cannot run this scenario: "
                                       r"merge_across_nodes: refused for this test"):
        run_scenario(sc, BulkBackend())


def test_merge_across_nodes_event_runs_as_on_simkernel() -> None:
    """The same file, with the knob written before ksmd's first scan (later it is EBUSY on
    every engine, as on Linux: the zero pages are merged by then), runs whole on the bulk
    engine and gives SimKernel's JSON document."""
    text = NODES_EVENT.replace('at = "0.5s"', 'at = "0s"')
    sc = parse_scenario(text, source="<test>", base_dir=Path("."))
    assert document(sc, BulkBackend()) == document(sc, SimBackend())


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


@pytest.mark.parametrize("content", [
    Content("z", "zero", seed=1),
    Content("f", "fill", seed=1, byte=0x2A, zero_fraction=0.3),
    Content("f0", "fill", seed=1, byte=0),
    Content("img", "image", seed=5, pages=7, offset=2, zero_fraction=0.25,
            private_fraction=0.25),
    Content("r", "random", seed=9, zero_fraction=0.5),
], ids=lambda c: c.name)
def test_fingerprints_are_those_of_the_built_bytes(content: Content) -> None:
    """The bulk engine's fill path (no bytes) names exactly the pages build() makes:
    each page's fingerprint, and None where build() makes a page of random bytes."""
    data = ContentSource().build(content, 40, "p[0].m")
    pages = [data[i:i + PAGE_SIZE] for i in range(0, len(data), PAGE_SIZE)]
    fps = ContentSource().fingerprints(content, 40, "p[0].m")
    assert len(fps) == len(pages) == 40
    for page, fp in zip(pages, fps, strict=True):
        if fp is None:
            assert pages.count(page) == 1 and page != bytes(PAGE_SIZE)  # unique random
        else:
            assert fp == fingerprint(page)


def test_file_pages_are_fingerprinted_from_the_file(tmp_path: Path) -> None:
    f = tmp_path / "disk.img"
    f.write_bytes(bytes(PAGE_SIZE) + b"a" * PAGE_SIZE + b"b" * 100)
    c = Content("d", "file", seed=3, path=f)
    data = ContentSource().build(c, 6, "p[0].m")
    assert ContentSource().fingerprints(c, 6, "p[0].m") == [
        fingerprint(data[i:i + PAGE_SIZE]) for i in range(0, len(data), PAGE_SIZE)]
