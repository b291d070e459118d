"""``ksmlab calibrate``: the fit on synthetic measurements, and the command on the real kernel.

The fit is checked against samples made from known parameters (arithmetic: the
model's features times those parameters), so it must give them back; the
command itself runs (``--quick``) only where the real KSM is usable.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ksmlab.calibrate.fit import Residual, cpu_scale, disturbance, fit_clock, fit_cpu, nnls, replay_ns
from ksmlab.calibrate.measure import ScanSample, run_model
from ksmlab.calibrate.workloads import workloads
from ksmlab.ksm.cost import FEATURES, KsmdClock, KsmdCost, default_cost

SRC = Path(__file__).resolve().parents[1] / "src"


def test_nnls_solves_and_keeps_to_non_negative() -> None:
    rng = np.random.default_rng(1)
    a = rng.random((30, 5))
    x = np.array([1.0, 0.0, 2.5, 0.3, 4.0])
    assert nnls(a, a @ x) == pytest.approx(x, abs=1e-8)
    # b pulls x[0] negative: the answer puts it at 0, where the gradient points outwards (KKT).
    b = a @ np.array([-1.0, 2.0, 1.0, 1.0, 1.0])
    got = nnls(a, b)
    assert (got >= 0).all() and got[0] == 0
    grad = a.T @ (b - a @ got)
    assert grad[0] <= 1e-9 and np.abs(grad[got > 0]).max() < 1e-8


@pytest.fixture(scope="module")
def model_scans() -> dict[str, list[ScanSample]]:
    """Every calibration workload at 256 pages on the model, as samples without a kernel."""
    out = {}
    for w in workloads(256):
        scans = run_model(w)
        out[w.name] = [ScanSample(w.name, 0, i, 0, 0,
                                  {f: sum(b[f] for b in m.batches) for f in FEATURES},
                                  m.batches, w.sleep_ms, m.pages, m.pages)
                       for i, m in enumerate(scans)]
    return out


def test_every_workload_exercises_its_terms(model_scans: dict[str, list[ScanSample]]) -> None:
    """Each term of the cost is met by some workload (else the fit could not see it)."""
    totals = {f: sum(s.features[f] for ss in model_scans.values() for s in ss) for f in FEATURES}
    assert all(v > 0 for v in totals.values()), totals


def test_fit_gives_back_the_parameters_of_the_samples(
        model_scans: dict[str, list[ScanSample]]) -> None:
    """Samples whose CPU time is features x known parameters: with a negligible pull towards
    the prior (the shipped model, far from them) every sample is predicted within 1%, and
    with the default pull towards a prior off by a factor of 2 within 10% (the prior only
    settles what the samples leave open, such as how a merge's cost splits between its
    write-protect and its full compare)."""
    true = {f: 100.0 + 37.0 * i for i, f in enumerate(FEATURES)}
    samples = []
    for ss in model_scans.values():
        for s in ss:
            s.cpu_ns = round(sum(true[f] * s.features[f] for f in FEATURES))
            samples.append(s)
    params, residuals = fit_cpu(samples, default_cost(), prior_weight=1e-9)
    assert max(abs(r.error) for r in residuals) < 0.01
    assert set(params) == set(FEATURES) and all(v >= 0 for v in params.values())
    # A prior off by a factor of 2 either way, with the default pull:
    prior = KsmdCost({f: true[f] * (2.0 if i % 2 else 0.5) for i, f in enumerate(FEATURES)})
    _, residuals = fit_cpu(samples, prior)
    assert max(abs(r.error) for r in residuals) < 0.10


def test_a_term_the_prior_never_fitted_is_not_pulled_to_zero(
        model_scans: dict[str, list[ScanSample]]) -> None:
    """A term added since the prior was fitted costs 0 there (a cost file without it reads
    as 0).  With the default pull, samples made with that term at 200 ns still give about
    200 ns back (a pull towards 0 with the 1 ns floor would hold it near 0), and every
    sample is predicted within 10%."""
    true = {f: 100.0 + 37.0 * i for i, f in enumerate(FEATURES)}
    true["ksm_frame"] = 200.0
    samples = []
    for ss in model_scans.values():
        for s in ss:
            s.cpu_ns = round(sum(true[f] * s.features[f] for f in FEATURES))
            samples.append(s)
    prior = KsmdCost({f: 0.0 if f == "ksm_frame" else true[f] for f in FEATURES})
    params, residuals = fit_cpu(samples, prior)
    assert params["ksm_frame"] == pytest.approx(200.0, rel=0.10)
    assert max(abs(r.error) for r in residuals) < 0.10


def _sample(cpu_ns: int) -> ScanSample:
    return ScanSample("w", 0, 0, cpu_ns, 0, dict.fromkeys(FEATURES, 0.0), [], 20, 1, 1)


def test_busy_machine_factor_is_measured_over_predicted_summed() -> None:
    """Ten scans predicted 10 ms each: eight measured 10 ms, two disturbed at 30 ms.  The sum
    measured is 8 x 10 + 2 x 30 = 140 ms against 100 predicted: a factor of 1.4, though the
    median scan is as predicted; 2 of 10 scans (60 of 140 ms) cost 2x or more."""
    res = [Residual(_sample(10_000_000 if i < 8 else 30_000_000), 10_000_000.0)
           for i in range(10)]
    assert cpu_scale(res) == pytest.approx(1.4)
    d = disturbance(res)
    assert d["median_ratio"] == 1.0
    assert d["slow_share"] == pytest.approx(0.2)
    assert d["slow_cpu_share"] == pytest.approx(60 / 140)
    assert cpu_scale([]) == 1.0


def test_fit_clock_finds_the_delay_and_stretch(model_scans: dict[str, list[ScanSample]]) -> None:
    """Wall times replayed with a 1 ms mean delay and a stretch of 1.5 (a quarter of the wake-ups
    a jiffy late) give that pair back."""
    ns = dict(default_cost().ns)
    clock = KsmdClock(hz=250, wake_delay_ns=1_000_000.0, late_fraction=0.25, run_stretch=1.5)
    samples = [s for ss in model_scans.values() for s in ss if len(s.batches) > 1]
    assert len(samples) >= 8
    tick = 4_000_000
    for s in samples:
        costs = [round(sum(ns[f] * b[f] for f in FEATURES)) for b in s.batches]
        s.wall_ns = round(sum(replay_ns(costs, s.sleep_ms, clock, tick * q // 4)
                              for q in range(4)) / 4)
    got, walls = fit_clock(samples, ns, 250, late=0.25)
    assert (got.wake_delay_ns, got.run_stretch) == (1_000_000.0, 1.5)
    assert all(abs(p - s.wall_ns) <= 1 for s, p in walls)


@pytest.mark.linux
@pytest.mark.slow
def test_calibrate_quick_writes_a_model_the_kernels_load(tmp_path: Path) -> None:
    """`ksmlab calibrate --quick` on the real kernel writes a cost file that loads, whose fit
    records the kernel and its samples, and `ksmlab run --cost` runs with it."""
    from ksmlab.backends.linux import linux_ksm_unavailable_reason

    reason = linux_ksm_unavailable_reason()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "cost.json"
    env = {"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"}
    p = subprocess.run([sys.executable, "-m", "ksmlab", "calibrate", "--quick", "-o", str(out)],
                       capture_output=True, text=True, timeout=900, env=env, check=False)
    assert p.returncode == 0, p.stderr
    cost = KsmdCost.load(out)
    assert cost.fit["clean_samples"] > 0 and cost.fit["kernel"].startswith("Linux ")
    assert json.loads(out.read_text())["format"] == "ksmlab-ksmd-cost"
    r = subprocess.run([sys.executable, "-m", "ksmlab", "run", "--cost", str(out), "--until",
                        "2s", "--json"], capture_output=True, text=True, timeout=300, env=env,
                       check=False)
    assert r.returncode == 0, r.stderr


def test_run_cost_file_prices_ksmd(tmp_path: Path) -> None:
    """`ksmlab run --cost FILE` uses the file: with every term 0 but 1 ms per batch, and a clock
    without delays, the built-in scenario's ksmd CPU at 1 s is its batches: one at 0, then one
    every 24 ms (20 ms = 5 jiffies at HZ=250, fired on the 6th tick), 42 by 984 ms: 42 ms."""
    from ksmlab.cli import main

    ns = dict.fromkeys(FEATURES, 0.0) | {"batch": 1e6}
    path = tmp_path / "c.json"
    KsmdCost(ns, KsmdClock(hz=250)).save(path)
    out = tmp_path / "r.json"
    env_out = subprocess.run([sys.executable, "-m", "ksmlab", "run", "--cost", str(path),
                              "--until", "1s", "--json"], capture_output=True, text=True,
                             timeout=300, env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"},
                             check=False)
    assert env_out.returncode == 0, env_out.stderr
    out.write_text(env_out.stdout)
    doc = json.loads(out.read_text())
    assert doc["checkpoints"][-1]["ksmd_cpu_s"] == pytest.approx(0.042)
    assert main(["run", "--cost", str(path), "--until", "1s", "--json"]) == 0


@pytest.mark.parametrize(("argv", "message"), [
    (["run", "--cost", "/nonexistent/c.json"], "ksmlab: --cost: cannot read /nonexistent/c.json"),
    (["run", "--backend", "linux", "--cost", "c.json"], "--cost applies to the model"),
    (["calibrate", "--repeat", "0"], "--repeat: expected an integer >= 1, got 0"),
    (["calibrate", "--scale", "10"], "--scale: expected at least 64 pages, got 10"),
])
def test_bad_cost_and_calibrate_arguments_exit_2(argv: list[str], message: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Refused before anything runs (no kernel is touched), one line on stderr, exit 2."""
    from ksmlab.cli import main

    assert main(argv) == 2
    assert message in capsys.readouterr().err
