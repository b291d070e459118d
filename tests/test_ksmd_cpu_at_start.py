"""ksmd's CPU time since boot at the start (``ksmd_cpu_at_start``), which the scan-time
advisor's first step counts: the advisor by hand-worked arithmetic, the scenario field and
``--ksmd-cpu-at-start``, the snapshot's ``ksmd_cpu_ns``, the estimate's seeding, and the real
kernel's first step on this host.

The kernel (mm/ksm.c): writing ``advisor_mode=scan-time`` over ``none`` zeroes the advisor's
context (``set_advisor_defaults``), its ``cpu_time`` among it; at the end of the first full
scan ``scan_time_advisor`` takes ksmd's CPU (``task_sched_runtime``, since ksmd started at
boot) minus that zero: all of ksmd's CPU since boot, over the first scan's time.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from estimate_snapshots import HOST_KNOBS, Page, Pfns, Proc, write_snapshot
from ksmlab import MADV_MERGEABLE, PAGE_SIZE, SimKernel
from ksmlab.bulk import BulkKernel
from ksmlab.ksm.advisor import AdvisorCtx, AdvisorKnobs, scan_time_advisor
from ksmlab.scenario.backends import BulkBackend, SimBackend
from ksmlab.scenario.host import ksmd_cpu_ns
from ksmlab.scenario.loader import ScenarioError, parse_scenario
from ksmlab.scenario.runner import run_scenario
from ksmlab.scenario.transform import with_ksmd_cpu_at_start
from test_cli import ksmlab, one_line_error

NS = 1_000_000_000
ENGINES: dict[str, type[SimKernel] | type[BulkKernel]] = {"sim": SimKernel, "bulk": BulkKernel}


def test_first_step_after_four_minutes_of_cpu_is_the_floor() -> None:
    """240 s of ksmd CPU since boot, a first full scan of 1 s, min 500 pages: 10 pages.

    Fresh context (all zero).  scan_time = 1000 ms // 1000 = 1 s; cpu_time_diff_ms =
    240_000 - 0; cpu_percent = 240_000 * 100 // (1 * 1000) = 24_000; factor = 200 * 100 // 1
    = 20_000; change = 1 * 100 // 1 = 100, ewma(0, 100) = (70 * 0 + 30 * 100) // 100 = 30;
    pages = 500 * 100 // 20_000 = 2, then 2 * 30 // 100 = 0; per_page_cost = 500 // 24_000
    = 0 -> 1; min(0, 1 * 70) = 0; max(0, 1 * KSM_ADVISOR_MIN_CPU 10) = 10; min(10, 30_000)
    = 10.

    On a freshly booted host the same scan using 5 ms of CPU: cpu_percent = 5 * 100 //
    1000 = 0 -> 1, per_page_cost = 500 // 1 = 500, max(0, 500 * 10) = 5000.
    """
    ctx = AdvisorCtx()
    assert scan_time_advisor(ctx, AdvisorKnobs(), now_ms=1000.0, cpu_ns=240 * NS,
                             pages_to_scan=500) == 10
    assert (ctx.change, ctx.scan_time_s, ctx.cpu_time_ns) == (30, 1, 240 * NS)
    assert scan_time_advisor(AdvisorCtx(), AdvisorKnobs(), now_ms=1000.0, cpu_ns=5_000_000,
                             pages_to_scan=500) == 5000


@pytest.mark.parametrize("engine", list(ENGINES))
def test_engines_first_step_counts_the_seeded_cpu(engine: str) -> None:
    """A model whose ksmd has 240 s of CPU since boot: the first full scan (64 pages, one
    batch of 500, well under a second: scan_time clamps to 1 s) ends with pages_to_scan 10,
    as the docstring of the test above works out (the scan's own CPU, microseconds, moves
    cpu_percent by nothing that matters: 240_000 ms or a little more gives per_page_cost 1).
    Without the seed: 5000 (cpu_percent 1)."""
    seen = []
    for seed in (240 * NS, 0):
        k = ENGINES[engine]()
        k.ksmd.cpu_ns = seed
        k.sysfs["advisor_mode"] = "scan-time"
        p = k.spawn()
        a = p.mmap(64 * PAGE_SIZE)
        p.write(a, b"x" * 64 * PAGE_SIZE)
        p.madvise(a, 64 * PAGE_SIZE, MADV_MERGEABLE)
        k.sysfs["run"] = "1"
        k.wait_full_scans(1)
        assert k.now_ns < NS  # the first full scan took under a second
        seen.append(k.sysfs["pages_to_scan"])
        k.close()
    assert seen == ["10", "5000"]


SCENARIO = """
[scenario]
name = "advisor start"
{field}
[ksm]
advisor_mode = "scan-time"
[content.same]
kind = "fill"
byte = 7
[[process]]
name = "p"
count = 2
[[process.mapping]]
name = "buf"
pages = 32
content = "same"
[[checkpoint]]
name = "first full scan"
full_scans = 1
"""


def _scenario(field: str = "") -> object:
    return parse_scenario(SCENARIO.format(field=field), source="<test>", base_dir=Path("."))


@pytest.mark.parametrize("backend", [SimBackend, BulkBackend])
def test_scenario_field_seeds_the_models_ksmd(backend: type[SimBackend | BulkBackend]) -> None:
    """``ksmd_cpu_at_start = "4min"``: the model's advisor's first step gives 10 (the
    arithmetic above), the timeline's ksmd CPU still starts at 0 (relative to the start),
    and the result records 240 s and a note naming it."""
    sc = _scenario('ksmd_cpu_at_start = "4min"')
    assert sc.ksmd_cpu_at_start_ns == 240 * NS  # type: ignore[attr-defined]
    b = backend()
    try:
        r = run_scenario(sc, b)  # type: ignore[arg-type]
        assert b.kernel.sysfs["pages_to_scan"] == "10"
    finally:
        b.close()
    assert r.ok, r.failures
    assert r.ksmd_cpu_at_start_s == 240.0
    assert r.timeline[0][-1] == 0.0
    assert r.checkpoints[0].ksmd_cpu_s is not None and r.checkpoints[0].ksmd_cpu_s < 1.0
    assert any("4 min" in n and "ksmd_cpu_at_start" in n for n in r.notes), r.notes


def test_scenario_field_default_is_a_freshly_booted_host() -> None:
    """No field: 0, and the first step of the same scan gives 5000 (cpu_percent 1)."""
    sc = _scenario()
    assert sc.ksmd_cpu_at_start_ns == 0  # type: ignore[attr-defined]
    b = SimBackend()
    try:
        r = run_scenario(sc, b)  # type: ignore[arg-type]
        assert b.kernel.sysfs["pages_to_scan"] == "5000"
    finally:
        b.close()
    assert r.ksmd_cpu_at_start_s == 0.0


@pytest.mark.parametrize(("value", "expected"), [
    ('"-1s"', "expected a duration"), ('"4 parsecs"', "expected a duration"),
    ("true", "expected a duration"), ('"3000000h"', "292 years"), ("-5", "expected a duration"),
])
def test_scenario_field_bad_values_name_the_field(value: str, expected: str) -> None:
    with pytest.raises(ScenarioError) as info:
        _scenario(f"ksmd_cpu_at_start = {value}")
    assert "scenario.ksmd_cpu_at_start" in str(info.value)
    assert expected in str(info.value)


def test_transform_refuses_out_of_range() -> None:
    sc = _scenario()
    assert with_ksmd_cpu_at_start(sc, 7).ksmd_cpu_at_start_ns == 7  # type: ignore[arg-type]
    with pytest.raises(ScenarioError, match="ksmd_cpu_at_start"):
        with_ksmd_cpu_at_start(sc, -1)  # type: ignore[arg-type]


# --- the command line ------------------------------------------------------------------------

def _scenario_file(tmp_path: Path) -> Path:
    f = tmp_path / "adv.toml"
    f.write_text(SCENARIO.format(field=""))
    return f


def test_cli_option_overrides_the_field(tmp_path: Path) -> None:
    import json

    p = ksmlab("run", str(_scenario_file(tmp_path)), "--ksmd-cpu-at-start", "4min", "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["ksmd_cpu_at_start_s"] == 240.0
    assert any("4 min" in n for n in doc["notes"])


@pytest.mark.linux
def test_cli_option_host_reads_this_machines_ksmd(tmp_path: Path) -> None:
    import json

    before = ksmd_cpu_ns()
    if before is None:
        pytest.skip("no ksmd on this machine")
    p = ksmlab("run", str(_scenario_file(tmp_path)), "--ksmd-cpu-at-start", "host", "--json")
    assert p.returncode == 0, p.stderr
    after = ksmd_cpu_ns()
    assert after is not None
    assert before / NS <= json.loads(p.stdout)["ksmd_cpu_at_start_s"] <= after / NS


@pytest.mark.parametrize(("args", "message"), [
    (["--ksmd-cpu-at-start", "soon"], "--ksmd-cpu-at-start: expected a duration"),
    (["--ksmd-cpu-at-start=-3s"], "--ksmd-cpu-at-start: expected a duration"),
    (["--ksmd-cpu-at-start", "4min", "--backend", "linux"],
     "--ksmd-cpu-at-start applies to the model"),
])
def test_cli_option_bad_values_are_one_line_exit_2(tmp_path: Path, args: list[str],
                                                   message: str) -> None:
    p = ksmlab("run", str(_scenario_file(tmp_path)), *args)
    assert p.returncode == 2, p.stderr
    assert message in one_line_error(p)


def test_cli_option_host_unreadable_is_exit_3(monkeypatch: pytest.MonkeyPatch) -> None:
    """``host`` where no ksmd can be read: a CliError naming the option, exit 3."""
    from ksmlab import cli_common
    from ksmlab.scenario import host

    monkeypatch.setattr(host, "ksmd_cpu_ns", lambda proc="/proc": None)
    with pytest.raises(cli_common.CliError) as info:
        cli_common.resolve_ksmd_cpu("host", "ksmlab")
    assert info.value.code == cli_common.EXIT_UNAVAILABLE
    assert "--ksmd-cpu-at-start host" in str(info.value)
    assert cli_common.resolve_ksmd_cpu(5, "ksmlab") == 5


def test_tune_passes_the_option_to_every_configuration(tmp_path: Path) -> None:
    """``ksmlab tune --ksmd-cpu-at-start 4min``: the scan-time advisor reference runs from
    the floor (10 pages a batch after its first scan) and so saves less than the same
    sweep from a freshly booted host, whose advisor starts at 5000."""
    import json

    out = {}
    for cpu in ("0", "4min"):
        p = ksmlab("tune", str(_scenario_file(tmp_path)), "--grid", "sleep_millisecs=20",
                   "--until", "2s", "--extend", "--backend", "sim", "--workers", "1",
                   "--ksmd-cpu-at-start", cpu, "--json", "--no-progress", timeout=600)
        assert p.returncode == 0, p.stderr
        doc = json.loads(p.stdout)
        out[cpu] = doc["references"]["scan-time-advisor"]
    assert out["4min"]["ksmd_cpu_s"] < out["0"]["ksmd_cpu_s"]


# --- snapshots and the estimate --------------------------------------------------------------

def _snapshot(tmp_path: Path, **meta: object) -> Path:
    pfn = Pfns()
    procs = [Proc(100 + i, [Page(1, pfn()) for _ in range(16)]) for i in range(2)]
    return write_snapshot(tmp_path / "s.parquet", procs,
                          knobs=HOST_KNOBS | {"advisor_mode": "scan-time", "pages_to_scan": "500"},
                          extra_meta=dict(meta))


def test_snapshot_metadata_round_trip(tmp_path: Path) -> None:
    from ksmlab.snapshot.reader import SnapshotFormatError, read_snapshot

    assert read_snapshot(_snapshot(tmp_path, ksmd_cpu_ns=240 * NS)).ksmd_cpu_ns == 240 * NS
    assert read_snapshot(_snapshot(tmp_path, ksmd_cpu_ns=None)).ksmd_cpu_ns is None
    assert read_snapshot(_snapshot(tmp_path)).ksmd_cpu_ns is None  # an older snapshot
    for bad in (-1, "240", True, 1.5):
        with pytest.raises(SnapshotFormatError, match="ksmd_cpu_ns"):
            read_snapshot(_snapshot(tmp_path, ksmd_cpu_ns=bad))


@pytest.mark.linux
def test_snapshot_records_the_hosts_ksmd_cpu(tmp_path: Path) -> None:
    """``ksmlab snapshot`` of this process: the metadata's ksmd_cpu_ns lies between two
    readings of ksmd's CPU taken around the capture."""
    import os

    from ksmlab.snapshot.reader import read_metadata

    before = ksmd_cpu_ns()
    if before is None:
        pytest.skip("no ksmd on this machine")
    out = tmp_path / "me.parquet"
    p = ksmlab("snapshot", "--pid", str(os.getpid()), "-o", str(out))
    assert p.returncode == 0, p.stderr
    after = ksmd_cpu_ns()
    assert after is not None
    assert before <= read_metadata(str(out))["ksmd_cpu_ns"] <= after


@pytest.mark.parametrize("engine", ["sim", "bulk"])
def test_estimate_seeds_the_model_with_the_snapshots_cpu(tmp_path: Path, engine: str) -> None:
    """A snapshot taken when ksmd had 240 s of CPU, under the scan-time advisor: the model's
    first full scan (32 pages, one batch) ends with pages_to_scan 10 (the arithmetic of the
    first test); with --ksmd-cpu-at-start 0 (a freshly booted host), 5000.  10 ms of virtual
    time hold the first batch (at 0), which makes the first full scan, and not the second
    (after the 20 ms sleep)."""
    from ksmlab.estimate.core import resolve_knobs
    from ksmlab.estimate.load import load_machine
    from ksmlab.estimate.plan import load_plan
    from ksmlab.estimate.simulate import run_machine
    from ksmlab.snapshot.reader import read_snapshot

    snap = read_snapshot(_snapshot(tmp_path, ksmd_cpu_ns=240 * NS))
    knobs, _ = resolve_knobs(snap, {})
    seen = []
    for cpu in (snap.ksmd_cpu_ns, 0):
        m = load_machine(load_plan(snap), engine, knobs)  # type: ignore[arg-type]
        before = int(m.kernel.sysfs["full_scans"])  # the loader's own scans, if any
        out = run_machine(m, until_ns=10_000_000, ksmd_cpu_ns=cpu)
        assert int(m.kernel.sysfs["full_scans"]) == before + 1
        seen.append(m.kernel.sysfs["pages_to_scan"])
        assert out.timeline[0][-1] == 0.0  # the CPU column stays relative to the start
    assert seen == ["10", "5000"]


def test_estimate_reports_where_the_cpu_came_from(tmp_path: Path) -> None:
    from ksmlab.estimate.core import run_estimate
    from ksmlab.estimate.report import estimate_document
    from ksmlab.snapshot.reader import read_snapshot

    snap = read_snapshot(_snapshot(tmp_path, ksmd_cpu_ns=240 * NS))
    e = run_estimate(snap, until_ns=NS)
    assert (e.ksmd_cpu_ns, e.ksmd_cpu_source) == (240 * NS, "snapshot")
    doc = estimate_document(e)
    assert doc["ksmd_cpu_at_start"] == {"s": 240.0, "source": "snapshot"}
    assert any("4 min" in n and "at capture" in n for n in doc["notes"])
    e = run_estimate(snap, until_ns=NS, ksmd_cpu_at_start_ns=3 * NS)
    assert (e.ksmd_cpu_ns, e.ksmd_cpu_source) == (3 * NS, "--ksmd-cpu-at-start")
    old = read_snapshot(_snapshot(tmp_path))
    e = run_estimate(old, until_ns=NS)
    assert (e.ksmd_cpu_ns, e.ksmd_cpu_source) == (0, "unknown")
    assert any("does not record it" in n for n in e.result.notes)
    with pytest.raises(ValueError, match="ksmd_cpu_at_start"):
        run_estimate(snap, until_ns=NS, ksmd_cpu_at_start_ns=-1)
    e = run_estimate(snap, until_ns=NS, knobs={"advisor_mode": "none"})
    assert e.result.notes == ()  # the note is about the advisor only


def test_estimate_cli_option(tmp_path: Path) -> None:
    import json

    f = _snapshot(tmp_path, ksmd_cpu_ns=240 * NS)
    p = ksmlab("estimate", str(f), "--until", "1s", "--ksmd-cpu-at-start", "2min", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["ksmd_cpu_at_start"] == {"s": 120.0,
                                                         "source": "--ksmd-cpu-at-start"}
    p = ksmlab("estimate", str(f), "--until", "1s", "--ksmd-cpu-at-start", "later")
    assert p.returncode == 2
    assert "--ksmd-cpu-at-start: expected a duration" in one_line_error(p)


# --- the real kernel -------------------------------------------------------------------------

@pytest.mark.linux
def test_real_advisors_first_step_follows_the_formula() -> None:
    """On this (long-running) host: the real advisor's first step, from the measured inputs.

    ksmd's CPU time is read right after the first full scan of a 64-page area ends (polled);
    the wall time from ``run=1`` bounds the scan's scan_time.  The expected
    pages_to_scan is the kernel's formula (:func:`scan_time_advisor`) on those inputs; where
    ksmd has used more than 5 s per second of the scan since boot (cpu_percent > 500,
    per_page_cost 1) that is the floor, 10.
    """
    from ksmlab.backends.linux import LinuxKernel
    from linux_support import skip_unless_ksm_usable

    skip_unless_ksm_usable()
    with LinuxKernel(lock_timeout=600) as k:
        sysfs = k.sysfs
        sysfs["run"] = "0"
        sysfs["sleep_millisecs"] = "20"
        sysfs["advisor_mode"] = "none"
        sysfs["advisor_mode"] = "scan-time"  # a real change: the context is zeroed
        assert sysfs["pages_to_scan"] == "500"
        p = k.spawn()
        a = p.mmap(64 * PAGE_SIZE)
        p.write(a, b"x" * 64 * PAGE_SIZE)
        p.madvise(a, 64 * PAGE_SIZE, MADV_MERGEABLE)
        base = int(sysfs["full_scans"])
        started = time.monotonic()
        sysfs["run"] = "1"
        # Polled, not wait_full_scans: the first scan (one batch) may end before a wait
        # reads its base; the second, at 10 pages a batch, takes 7 batches (140 ms or more).
        while int(sysfs["full_scans"]) == base:
            assert time.monotonic() - started < 60, "no full scan in 60 s"
            time.sleep(0.001)
        cpu = ksmd_cpu_ns()
        pages = int(sysfs["pages_to_scan"])
        wall_ms = (time.monotonic() - started) * 1000
        assert int(sysfs["full_scans"]) == base + 1  # still the first step's value
    assert cpu is not None
    expected = {scan_time_advisor(AdvisorCtx(), AdvisorKnobs(), now_ms=ms, cpu_ns=cpu,
                                  pages_to_scan=500) for ms in (0.0, wall_ms)}
    assert pages in expected, (pages, expected, cpu, wall_ms)
    if cpu // 1_000_000 * 100 // (max(1, int(wall_ms) // 1000) * 1000) > 500:
        assert pages == 10
