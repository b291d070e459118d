"""``ksmlab calibrate --speed``: this machine's speed now, against a fitted model's terms.

The real ksmd's CPU time per unit of work moves over the day on a shared
machine: the same scenario with the same knobs took 254, 297 and 334 ms of
ksmd on this project's machine within two hours (docs/tune.md), while the
terms of the cost model were fitted once.  A full calibration takes a
quarter of an hour; this takes about a minute.  It keeps a cost file's terms
and re-measures only the two things that move with the machine's state:

* the **speed ratio** *R*: over the scans of :data:`SPEED_WORKLOADS` (a host's
  usual mix, steady KSM pages, unique pages under smart scan, pairs merging),
  the real ksmd's CPU time over what the terms predict, summed.  The file
  recorded the same ratio when its terms were fitted (``fit.speed_reference``),
  so *R* / ``speed_reference`` is how much slower (> 1) or faster the machine
  is now than then, and the new ``cpu_scale`` is the fit's own measured
  factor (``fit.cpu_scale_measured``, the busy machine's factor at fit time)
  times that;
* the **late share** of ksmd's timer wake-ups, from the same probe
  ``ksmlab calibrate`` runs before each workload.

Model choice: one factor for every term.  A disturbed machine need not slow
every step of ksmd alike (a cache miss more than a checksum); the
calibration's per-workload factors spread by about 15 % around their mean at
one moment (docs/cost-model.md), and a one-minute probe cannot separate terms.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ksmlab.api import Kernel
from ksmlab.calibrate.fit import late_fraction
from ksmlab.calibrate.measure import PROBE_SLEEP_MS, ScanSample, measure
from ksmlab.calibrate.workloads import Workload, workloads
from ksmlab.ksm.cost import FEATURES, KsmdCost

Log = Callable[[str], None]

SPEED_WORKLOADS = (
    "identical",
    "unique, smart_scan 1",
    "defaults: pairs",
    "host mix: 8 processes, defaults",
    "host mix: 1 process, defaults",
    "host mix: 8 processes, smart_scan 0",
)
"""The calibration workloads whose scans measure the speed ratio (see the module doc)."""


def speed_workloads(scale: int = 16384) -> list[Workload]:
    """The workloads of :data:`SPEED_WORKLOADS`, at *scale* pages (as :func:`workloads`)."""
    by_name = {w.name: w for w in workloads(scale)}
    return [by_name[name] for name in SPEED_WORKLOADS]


def speed_ratio(samples: Sequence[ScanSample], ns: dict[str, float]) -> float | None:
    """Measured CPU time over the terms' prediction (*ns*, without ``cpu_scale``), summed over
    the clean scans of *samples* that belong to :data:`SPEED_WORKLOADS`; None with none."""
    measured = predicted = 0.0
    for s in samples:
        if s.ok and s.cpu_ns > 0 and s.workload in SPEED_WORKLOADS:
            measured += s.cpu_ns
            predicted += sum(ns[f] * s.features[f] for f in FEATURES)
    return measured / predicted if measured > 0 and predicted > 0 else None


@dataclass
class Speed:
    """What :func:`measure_speed` found.

    Attributes:
        cost: the base model with ``cpu_scale`` and the late share measured now.
        ratio: the speed ratio now (see the module doc).
        reference: the base file's ratio when its terms were fitted.
        factor: ``ratio / reference``: the machine's slowness now against then.
        late_fraction: the share of late timer wake-ups now.
        samples: the scans measured.
    """

    cost: KsmdCost
    ratio: float
    reference: float
    factor: float
    late_fraction: float
    samples: list[ScanSample]


def reference_of(base: KsmdCost) -> tuple[float, float]:
    """The base file's speed reference and busy-machine factor at fit time.

    Raises:
        ValueError: the file has no ``fit.speed_reference`` (a file written before
            ``--speed`` existed: run a full ``ksmlab calibrate`` once).
    """
    ref = base.fit.get("speed_reference")
    if isinstance(ref, bool) or not isinstance(ref, int | float) or not ref > 0:
        raise ValueError(f"{base.source}: no fit.speed_reference to measure the speed against "
                         "(a cost file from before `ksmlab calibrate --speed`: run a full "
                         "`ksmlab calibrate` first)")
    at_fit = base.fit.get("cpu_scale_measured", base.cpu_scale)
    if isinstance(at_fit, bool) or not isinstance(at_fit, int | float) or not at_fit > 0:
        at_fit = base.cpu_scale
    return float(ref), float(at_fit)


def measure_speed(k: Kernel, base: KsmdCost, *, repeats: int = 1, scale: int = 16384,
                  log: Log = lambda _: None) -> Speed:
    """Run :data:`SPEED_WORKLOADS` *repeats* times on *k* (a LinuxKernel session) and return
    *base* rescaled to this machine now (see the module doc).

    Raises:
        ValueError: *base* has no speed reference, or no scan was clean.
    """
    reference, at_fit = reference_of(base)
    chosen = speed_workloads(scale)
    started = datetime.datetime.now(datetime.UTC)
    samples, gaps = measure(k, chosen, repeats, log)
    ratio = speed_ratio(samples, base.ns)
    if ratio is None:
        raise ValueError("no clean scan to measure the speed from")
    factor = ratio / reference
    late = late_fraction(gaps, PROBE_SLEEP_MS, base.clock.hz)
    fit = dict(base.fit)
    fit["speed"] = {
        "date": started.isoformat(timespec="seconds"),
        "workloads": list(SPEED_WORKLOADS), "repeats": repeats, "scale_pages": scale,
        "samples": len(samples), "clean_samples": sum(s.ok for s in samples),
        "ratio": ratio, "reference": reference, "factor": factor,
        "cpu_scale_at_fit": at_fit, "cpu_scale_before": base.cpu_scale,
        "late_fraction_before": base.clock.late_fraction, "timer_gaps": len(gaps),
    }
    cost = KsmdCost(dict(base.ns), base.with_clock(late_fraction=late).clock,
                    "ksmlab calibrate --speed", fit, at_fit * factor)
    return Speed(cost, ratio, reference, factor, late, samples)


def measure_speed_now(base: KsmdCost | None = None, *, lock_timeout: float = 3600.0,
                      log: Log = lambda _: None) -> Speed:
    """:func:`measure_speed` in a LinuxKernel session of its own (the machine-wide lock, every
    knob put back), against *base* (default: the shipped model).

    For a bench that compares the model with the real kernel: the machine's speed just before
    its real runs, so a drift of the machine over the day is not counted as the model's error.
    """
    from ksmlab.backends.linux import LinuxKernel
    from ksmlab.ksm.cost import default_cost

    with LinuxKernel(lock_timeout=lock_timeout) as k:
        return measure_speed(k, base or default_cost(), log=log)


__all__ = ["SPEED_WORKLOADS", "Speed", "measure_speed", "measure_speed_now", "reference_of",
           "speed_ratio", "speed_workloads"]
