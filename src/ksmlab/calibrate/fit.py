"""Fit the cost model's parameters to the samples of ``ksmlab calibrate``.

**CPU.**  Each clean sample is a full scan: the real ksmd's CPU time ``y``
and the model's features ``x`` (:mod:`ksmlab.ksm.cost`), so the parameters
``p`` (ns per unit of each feature) solve ``x · p ≈ y``.  The fit minimises
the *relative* squared error (rows weighted by ``1 / y``), each workload
weighing as much as any other whatever its number of scans, keeps every
parameter >= 0 (non-negative least squares, Lawson and Hanson's active-set
method on numpy), and adds a weak pull towards prior values (weight
:data:`PRIOR_WEIGHT`, relative to each prior), so that a direction the
workloads cannot separate (two terms that always occur together) stays near
a plausible split instead of swinging to an extreme.

**The busy machine.**  The relative weighting makes the terms fit the
typical scan: a scan that a disturbed machine made 2 to 10 times dearer
weighs little.  What a checkpoint of a scenario measures is a sum over many
scans, disturbed ones included, so :func:`cpu_scale` then measures, over
all clean scans, the measured CPU time over the terms' prediction
(``KsmdCost.cpu_scale``, see :mod:`ksmlab.ksm.cost`).

**Clock.**  The share of late wake-ups (a whole jiffy late,
:func:`~ksmlab.ksm.jiffies.late_wake`) is measured directly: the gaps between
the batches of a one-page workload (a batch per full scan) at
``sleep_millisecs=20`` are 6 jiffies or, late, 7 or more
(:func:`late_fraction`).  Late wake-ups come in streaks of minutes, so the
probe runs before every workload and the share is their average.  Then,
with the CPU parameters fixed, each sample of more than one batch is
replayed on the jiffy clock
(:mod:`ksmlab.ksm.jiffies`) for every pair of a mean scheduling delay and a
run stretch on a grid, at four phases of the first batch within its jiffy
(the real scan starts at any point of a jiffy), and the pair whose predicted
scan times are closest (relative squared error) to the measured ones is kept.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ksmlab.calibrate.measure import ScanSample
from ksmlab.ksm.cost import FEATURES, KsmdClock, KsmdCost
from ksmlab.ksm.jiffies import sleep_end_ns, tick_nsec

PRIOR_WEIGHT = 1e-4
"""How strongly each parameter is pulled towards its prior, against one sample's relative error."""

DELAYS_NS = (0, 100_000, 250_000, 500_000, 750_000, 1_000_000, 1_500_000, 2_000_000,
             3_000_000, 4_000_000)
STRETCHES = (1.0, 1.1, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0)

Vec = npt.NDArray[np.float64]


def nnls(a: Vec, b: Vec, max_iter: int = 1000) -> Vec:
    """``argmin ||a x - b||`` subject to ``x >= 0`` (Lawson and Hanson's active-set method)."""
    m, n = a.shape
    x = np.zeros(n)
    passive = np.zeros(n, bool)
    w = a.T @ (b - a @ x)
    tol = 1e-10 * max(1.0, float(np.abs(a).max())) * max(m, n)
    for _ in range(max_iter):
        if passive.all() or (w[~passive] <= tol).all():
            break
        j = int(np.argmax(np.where(passive, -np.inf, w)))
        passive[j] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            neg = passive & (z <= 0)
            alpha = float(np.min(x[neg] / (x[neg] - z[neg])))
            x = x + alpha * (z - x)
            passive &= x > tol
            x[~passive] = 0.0
        w = a.T @ (b - a @ x)
    return x


@dataclass
class Residual:
    """How one sample fits: measured and predicted CPU time, and the relative error."""

    sample: ScanSample
    predicted_ns: float

    @property
    def error(self) -> float:
        """(predicted - measured) / measured."""
        return (self.predicted_ns - self.sample.cpu_ns) / self.sample.cpu_ns


def fit_cpu(samples: Sequence[ScanSample], prior: KsmdCost, *,
            prior_weight: float = PRIOR_WEIGHT) -> tuple[dict[str, float], list[Residual]]:
    """The CPU parameters that best explain *samples* (see the module doc), and the residuals."""
    rows = [s for s in samples if s.ok and s.cpu_ns > 0]
    if not rows:
        raise ValueError("no clean sample to fit")
    x = np.array([[s.features[f] for f in FEATURES] for s in rows], dtype=np.float64)
    y = np.array([s.cpu_ns for s in rows], dtype=np.float64)
    per: dict[str, int] = {}
    for s in rows:
        per[s.workload] = per.get(s.workload, 0) + 1
    share = np.sqrt(np.array([1.0 / per[s.workload] for s in rows]))
    a = x / y[:, None] * share[:, None]
    b = share
    # A term the prior never fitted (0: added since, LATER_FEATURES) is not pulled: a pull
    # towards 0 relative to a 1 ns floor would outweigh every workload that measures it.
    known = np.array([prior.ns[f] > 0 for f in FEATURES])
    priors = np.array([max(prior.ns[f], 1.0) for f in FEATURES])
    reg = math.sqrt(prior_weight)
    a = np.vstack([a, np.diag(np.where(known, reg / priors, 0.0))])
    b = np.concatenate([b, np.where(known, reg, 0.0)])
    p = nnls(a, b)
    params = {f: float(v) for f, v in zip(FEATURES, p, strict=True)}
    pred = x @ p
    return params, [Residual(s, float(v)) for s, v in zip(rows, pred, strict=True)]


def batch_costs(sample: ScanSample, ns: dict[str, float]) -> list[int]:
    """The CPU time of each of the sample's batches under parameters *ns*."""
    return [round(sum(ns[f] * b[f] for f in FEATURES)) for b in sample.batches]


def replay_ns(costs: Sequence[int], sleep_ms: int, clock: KsmdClock, phase_ns: int) -> int:
    """Wall time of a scan whose batches cost *costs*, the first starting at *phase_ns*."""
    t = phase_ns
    for i, c in enumerate(costs):
        t += round(c * clock.run_stretch)
        if i < len(costs) - 1:
            t = clock.wake_after(t, sleep_ms, i)
    return t - phase_ns


def late_fraction(gaps_ns: Sequence[int], sleep_ms: int, hz: int) -> float:
    """The share of *gaps_ns* (between batches that each start on a timer wake-up and take
    far less than a jiffy) that are longer than the timer's period by half a jiffy or more."""
    if not gaps_ns:
        return 0.0
    tick = tick_nsec(hz)
    period = sleep_end_ns(1, sleep_ms, hz)  # from just after a tick
    return sum(g >= period + tick // 2 for g in gaps_ns) / len(gaps_ns)


def fit_clock(samples: Sequence[ScanSample], ns: dict[str, float], hz: int,
              late: float = 0.0) -> tuple[KsmdClock, list[tuple[ScanSample, float]]]:
    """The scheduling delay and run stretch that best explain the multi-batch samples' times.

    Returns the clock and each such sample with its predicted wall time.
    """
    rows = [(s, batch_costs(s, ns)) for s in samples if s.ok and len(s.batches) > 1]
    if not rows:
        return KsmdClock(hz, late_fraction=late), []
    tick = tick_nsec(hz)
    phases = [tick * q // 4 for q in range(4)]

    def predict(clock: KsmdClock, costs: list[int], sleep_ms: int) -> float:
        return statistics.fmean(replay_ns(costs, sleep_ms, clock, ph) for ph in phases)

    best: tuple[float, KsmdClock] | None = None
    for delay in DELAYS_NS:
        for stretch in STRETCHES:
            clock = KsmdClock(hz, float(delay), late, stretch)
            err = sum(((predict(clock, c, s.sleep_ms) - s.wall_ns) / s.wall_ns) ** 2
                      for s, c in rows)
            if best is None or err < best[0]:
                best = (err, clock)
    assert best is not None
    clock = best[1]
    return clock, [(s, predict(clock, c, s.sleep_ms)) for s, c in rows]


def summarise(residuals: Sequence[Residual]) -> dict[str, dict[str, float]]:
    """Per workload: samples, mean and worst relative error of the CPU fit."""
    by: dict[str, list[float]] = {}
    for r in residuals:
        by.setdefault(r.sample.workload, []).append(r.error)
    return {name: {"samples": len(errs), "mean_error": statistics.fmean(errs),
                   "worst_error": max(errs, key=abs)} for name, errs in by.items()}


def cpu_scale(residuals: Sequence[Residual]) -> float:
    """The busy machine's factor: every scan's measured CPU time over what the fitted terms
    predict for it, summed (so the model's sums, a checkpoint's CPU time, are right on
    average, disturbed scans included); 1.0 with no residual."""
    measured = sum(r.sample.cpu_ns for r in residuals)
    predicted = sum(r.predicted_ns for r in residuals)
    return measured / predicted if predicted > 0 and measured > 0 else 1.0


def disturbance(residuals: Sequence[Residual], factor: float = 2.0) -> dict[str, float]:
    """How heavy the tail is: the median measured/predicted ratio, and the share of scans
    and of the measured CPU time in scans that cost at least *factor* times the prediction."""
    ratios = [r.sample.cpu_ns / r.predicted_ns for r in residuals if r.predicted_ns > 0]
    slow = [r for r in residuals if r.predicted_ns > 0 and r.sample.cpu_ns >= factor * r.predicted_ns]
    total = sum(r.sample.cpu_ns for r in residuals)
    return {"median_ratio": statistics.median(ratios) if ratios else 1.0,
            "slow_share": len(slow) / len(ratios) if ratios else 0.0,
            "slow_cpu_share": sum(r.sample.cpu_ns for r in slow) / total if total else 0.0}


__all__ = ["Residual", "batch_costs", "cpu_scale", "disturbance", "fit_clock", "fit_cpu",
           "late_fraction", "nnls", "replay_ns", "summarise"]
