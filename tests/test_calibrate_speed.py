"""``ksmlab calibrate --speed``: the speed ratio by arithmetic, the refusals, and the command
on the real kernel (only where KSM is usable)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ksmlab.calibrate.measure import ScanSample
from ksmlab.calibrate.speed import SPEED_WORKLOADS, reference_of, speed_ratio, speed_workloads
from ksmlab.ksm.cost import FEATURES, KsmdClock, KsmdCost, default_cost

SRC = Path(__file__).resolve().parents[1] / "src"


def _sample(workload: str, cpu_ns: int, pages: int, ok: bool = True) -> ScanSample:
    feats = dict.fromkeys(FEATURES, 0.0) | {"pte_page": float(pages), "batch": 1.0}
    return ScanSample(workload, 0, 0, cpu_ns, 0, feats, [feats], 20, pages, pages, ok)


def test_speed_ratio_sums_the_clean_scans_of_the_speed_workloads() -> None:
    ns = dict.fromkeys(FEATURES, 0.0) | {"pte_page": 300.0, "batch": 10_000.0}
    samples = [
        _sample(SPEED_WORKLOADS[0], 50_000, 100),   # predicted 30000 + 10000 = 40000
        _sample(SPEED_WORKLOADS[3], 70_000, 200),   # predicted 60000 + 10000 = 70000
        _sample("tiny, sleep 10", 1_000_000, 1),    # not a speed workload: left out
        _sample(SPEED_WORKLOADS[1], 9_000_000, 10, ok=False),  # not clean: left out
    ]
    # (50000 + 70000) / (40000 + 70000) = 12 / 11
    assert speed_ratio(samples, ns) == pytest.approx(12 / 11)
    assert speed_ratio(samples[2:], ns) is None


def test_the_speed_workloads_are_calibration_workloads() -> None:
    assert [w.name for w in speed_workloads(256)] == list(SPEED_WORKLOADS)


def test_the_shipped_model_has_a_speed_reference() -> None:
    ref, at_fit = reference_of(default_cost())
    assert ref > 0 and at_fit > 0


def test_a_file_without_a_speed_reference_is_refused_by_name(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]
                                                               ) -> None:
    from ksmlab.cli import main

    path = tmp_path / "old.json"
    KsmdCost(dict.fromkeys(FEATURES, 1.0), KsmdClock(hz=250), fit={"date": "x"}).save(path)
    with pytest.raises(ValueError, match=r"no fit\.speed_reference"):
        reference_of(KsmdCost.load(path))
    assert main(["calibrate", "--speed", "--cost", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"ksmlab calibrate: --speed: {path}: no fit.speed_reference" in err


def test_reference_of_falls_back_to_cpu_scale_without_a_measured_one() -> None:
    cost = KsmdCost(dict.fromkeys(FEATURES, 1.0), KsmdClock(hz=250),
                    fit={"speed_reference": 1.25}, cpu_scale=1.5)
    assert reference_of(cost) == (1.25, 1.5)


@pytest.mark.parametrize(("argv", "message"), [
    (["calibrate", "--cost", "c.json"], "--cost: only with --speed"),
    (["calibrate", "--speed", "--samples", "s.json"], "--samples: not with --speed"),
    (["calibrate", "--speed", "--cost", "/nonexistent/c.json"],
     "--cost: cannot read /nonexistent/c.json"),
])
def test_bad_speed_arguments_exit_2(argv: list[str], message: str,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Refused before anything runs (no kernel is touched), one line on stderr, exit 2."""
    from ksmlab.cli import main

    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.linux
@pytest.mark.slow
def test_calibrate_speed_rescales_the_shipped_terms(tmp_path: Path) -> None:
    """`ksmlab calibrate --speed --quick` on the real kernel keeps the shipped terms and writes
    cpu_scale = the fit's own factor x (ratio now / ratio at fit), as the file records them."""
    from ksmlab.backends.linux import linux_ksm_unavailable_reason

    reason = linux_ksm_unavailable_reason()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "speed.json"
    env = {"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"}
    p = subprocess.run([sys.executable, "-m", "ksmlab", "calibrate", "--speed", "--quick",
                        "-o", str(out)], capture_output=True, text=True, timeout=900, env=env,
                       check=False)
    assert p.returncode == 0, p.stderr
    shipped, got = default_cost(), KsmdCost.load(out)
    assert got.ns == shipped.ns
    speed = got.fit["speed"]
    ref, at_fit = reference_of(shipped)
    assert speed["reference"] == ref and speed["cpu_scale_at_fit"] == at_fit
    assert speed["clean_samples"] > 0 and speed["factor"] == pytest.approx(speed["ratio"] / ref)
    assert got.cpu_scale == pytest.approx(at_fit * speed["factor"])
    assert 0.0 <= got.clock.late_fraction <= 1.0
    assert json.loads(out.read_text())["format"] == "ksmlab-ksmd-cost"
    assert "x as slow" in p.stdout and f"wrote {out}" in p.stdout
