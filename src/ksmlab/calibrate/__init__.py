"""``ksmlab calibrate``: fit the model's ksmd cost and clock to this machine's real ksmd.

:func:`calibrate` runs the micro-workloads of :mod:`ksmlab.calibrate.workloads`
on the real kernel (through a :class:`~ksmlab.backends.linux.LinuxKernel`
session, which holds the machine-wide lock and restores every knob) and on
the model (:mod:`ksmlab.calibrate.measure`), fits the parameters
(:mod:`ksmlab.calibrate.fit`) and returns them as a
:class:`~ksmlab.ksm.cost.KsmdCost` whose ``fit`` records the machine, the
load it was fitted under and the residuals; ``KsmdCost.save`` writes the
file that ``SimKernel(cost=KsmdCost.load(path))`` and ``ksmlab run --cost``
read.  docs/cost-model.md describes the model, the fit and its results.
"""

from __future__ import annotations

import contextlib
import datetime
import gzip
import os
import platform
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ksmlab import __version__
from ksmlab.api import Kernel
from ksmlab.calibrate.fit import (
    Residual,
    cpu_scale,
    disturbance,
    fit_clock,
    fit_cpu,
    late_fraction,
    summarise,
)
from ksmlab.calibrate.measure import PROBE_SLEEP_MS, ScanSample, measure
from ksmlab.calibrate.speed import speed_ratio
from ksmlab.calibrate.workloads import Workload, workloads
from ksmlab.ksm.cost import FEATURES, KsmdClock, KsmdCost, default_cost
from ksmlab.ksm.jiffies import sleep_end_ns

Log = Callable[[str], None]


@dataclass
class Calibration:
    """What :func:`calibrate` found.

    Attributes:
        cost: the fitted model (its ``fit`` holds the metadata and residuals).
        samples: every full scan measured (clean or not).
        residuals: the CPU fit's residuals (clean samples).
        walls: the clock fit's samples with their predicted wall time (ns).
        per_repeat: the CPU parameters fitted to each repetition alone.
    """

    cost: KsmdCost
    samples: list[ScanSample]
    residuals: list[Residual]
    walls: list[tuple[ScanSample, float]]
    per_repeat: list[dict[str, float]] = field(default_factory=list)


def config_hz(release: str | None = None) -> int | None:
    """This kernel's ``CONFIG_HZ`` from /proc/config.gz or /boot/config-RELEASE, or None."""
    release = release or platform.release()
    texts = []
    with contextlib.suppress(OSError):
        texts.append(gzip.decompress(Path("/proc/config.gz").read_bytes()).decode())
    with contextlib.suppress(OSError):
        texts.append(Path(f"/boot/config-{release}").read_text())
    for text in texts:
        m = re.search(r"^CONFIG_HZ=(\d+)$", text, re.MULTILINE)
        if m:
            return int(m.group(1))
    return None


def _loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return []


def calibrate(k: Kernel, *, repeats: int = 1, scale: int = 16384,
              chosen: list[Workload] | None = None, log: Log = lambda _: None) -> Calibration:
    """Measure every workload *repeats* times on *k* (a LinuxKernel session) and fit.

    *scale* sizes the big workloads (pages); *chosen* replaces the set.
    """
    wl = chosen if chosen is not None else workloads(scale)
    load_before = _loadavg()
    started = datetime.datetime.now(datetime.UTC)
    samples, gaps = measure(k, wl, repeats, log)
    prior = default_cost()
    params, residuals = fit_cpu(samples, prior)
    per_repeat = [fit_cpu([s for s in samples if s.repeat == r], prior)[0]
                  for r in range(repeats)] if repeats > 1 else []
    # The terms fit the typical scan; the busy machine's factor makes sums right on average.
    busy = cpu_scale(residuals)
    busy_per_repeat = [cpu_scale([x for x in residuals if x.sample.repeat == r])
                        for r in range(repeats)] if repeats > 1 else []
    hz = config_hz()
    if hz is None:  # the period of a 20 ms sleep tells HZ apart
        period = statistics.median(gaps) if gaps else 0
        hz = min((100, 250, 300, 1000),
                 key=lambda h: abs(sleep_end_ns(1, PROBE_SLEEP_MS, h) - period))
    late = late_fraction(gaps, PROBE_SLEEP_MS, hz)
    clock, walls = fit_clock(samples, params, hz, late)
    errors = [r.error for r in residuals]
    fit = {
        "date": started.isoformat(timespec="seconds"),
        "kernel": f"Linux {platform.release()} ({platform.machine()})",
        "cpus": os.cpu_count(),
        "loadavg_before": load_before, "loadavg_after": _loadavg(),
        "ksmlab": __version__, "repeats": repeats, "scale_pages": scale,
        "samples": len(samples), "clean_samples": len(residuals),
        "cpu_rms_error": float(statistics.fmean(e * e for e in errors) ** 0.5),
        "cpu_worst_error": max(errors, key=abs),
        "workloads": summarise(residuals),
        "wall_rms_error": _wall_error(walls),
        "timer_gaps": len(gaps), "timer_gap_median_ms": statistics.median(gaps) / 1e6 if gaps
        else None,
        "per_repeat": per_repeat,
        "cpu_scale_per_repeat": busy_per_repeat,
        "disturbance": disturbance(residuals),
        # What `ksmlab calibrate --speed` later measures the machine against.
        "cpu_scale_measured": busy,
        "speed_reference": speed_ratio(samples, params),
    }
    cost = KsmdCost(params, clock, "ksmlab calibrate", fit, busy)
    return Calibration(cost, samples, residuals, walls, per_repeat)


def _wall_error(walls: list[tuple[ScanSample, float]]) -> float:
    if not walls:
        return 0.0
    return float(statistics.fmean(((p - s.wall_ns) / s.wall_ns) ** 2 for s, p in walls) ** 0.5)


def spread(per_repeat: list[dict[str, float]]) -> dict[str, tuple[float, float]]:
    """Each parameter's (min, max) over the repetitions."""
    return {f: (min(p[f] for p in per_repeat), max(p[f] for p in per_repeat))
            for f in FEATURES} if per_repeat else {}


__all__ = ["Calibration", "KsmdClock", "calibrate", "config_hz", "spread", "workloads"]
