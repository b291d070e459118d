"""A finished (or interrupted) sweep: its configurations, their outcomes, the front, the choice."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ksmlab.ksm.defaults import DEFAULT_PAGES_TO_SCAN, DEFAULT_SLEEP_MILLISECS
from ksmlab.tune.grid import Config, Grid
from ksmlab.tune.pareto import Point, Recommendation, pareto_front, recommend
from ksmlab.tune.sweep import SweepResult
from ksmlab.tune.work import Outcome, Workload

__all__ = ["TuneResult", "assemble"]


@dataclass(frozen=True, slots=True)
class TuneResult:
    """Everything ``ksmlab tune`` reports.

    Attributes:
        workload: what ran.
        grid: the axes swept.
        configs: the grid's configurations (indices ``0 .. n_grid-1``), then the references.
        n_grid: how many of *configs* are grid points.
        sweep: the outcomes, by index, and how the sweep went.
        cpu_budget_percent: ``--cpu-budget`` (percent of one CPU), or None.
        front: the grid configurations on the Pareto front of saving against CPU.
        recommendation: the rule's choice among the grid's configurations.
    """

    workload: Workload
    grid: Grid
    configs: tuple[Config, ...]
    n_grid: int
    sweep: SweepResult
    cpu_budget_percent: float | None
    front: tuple[int, ...]
    recommendation: Recommendation

    @property
    def partial(self) -> bool:
        """The sweep was interrupted: some configurations did not finish."""
        return self.sweep.interrupted is not None and len(self.sweep.outcomes) < len(self.configs)

    def outcome(self, index: int) -> Outcome | None:
        """The outcome of configuration *index*, or None if it did not finish."""
        return self.sweep.outcomes.get(index)

    def reference(self, name: str) -> tuple[int, Config, Outcome | None]:
        """The reference called *name*: its index, configuration and outcome."""
        for i in range(self.n_grid, len(self.configs)):
            if self.configs[i].reference == name:
                return i, self.configs[i], self.outcome(i)
        raise KeyError(name)

    @property
    def failed(self) -> list[int]:
        """The configurations whose run failed."""
        return [i for i, o in sorted(self.sweep.outcomes.items()) if o.status == "failed"]


def scan_rate(knobs: dict[str, str]) -> float:
    """Pages per second *knobs* let ksmd scan (the recommendation's last tie-break): infinite
    with no sleep, or when the scan-time advisor sets ``pages_to_scan``."""
    if knobs.get("advisor_mode") == "scan-time":
        return math.inf
    pages = int(knobs.get("pages_to_scan", DEFAULT_PAGES_TO_SCAN))
    sleep = int(knobs.get("sleep_millisecs", DEFAULT_SLEEP_MILLISECS))
    return math.inf if sleep == 0 else pages * 1000 / sleep


def points(outcomes: dict[int, Outcome], indices: range,
           knobs: dict[int, dict[str, str]] | None = None) -> list[Point]:
    """The finished configurations among *indices*, as points of the front (*knobs*: each
    configuration's knobs as run, for its scan rate)."""
    out = []
    for i in indices:
        o = outcomes.get(i)
        if o is not None and o.ok and o.ksmd_cpu_percent is not None:
            assert o.saved_bytes is not None
            rate = scan_rate(knobs[i]) if knobs is not None else 0.0
            out.append(Point(i, o.ksmd_cpu_percent, o.saved_bytes, rate))
    return out


def assemble(w: Workload, grid: Grid, configs: list[Config], n_grid: int, sweep: SweepResult,
             cpu_budget_percent: float | None) -> TuneResult:
    """The sweep's result, with the front and the recommendation over the grid's points."""
    base = dict(w.scenario.knobs) if w.scenario is not None else {}
    knobs = {i: base | dict(configs[i].knobs) for i in range(n_grid)}
    pts = points(sweep.outcomes, range(n_grid), knobs)
    return TuneResult(w, grid, tuple(configs), n_grid, sweep, cpu_budget_percent,
                      tuple(pareto_front(pts)), recommend(pts, cpu_budget_percent))
