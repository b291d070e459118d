"""One configuration of a sweep: run the workload with its knobs and boil the result down.

:func:`run_config` is what a Dask worker runs (it is a module-level function
of an installed package, so any worker with ksmlab installed can import it),
and what ``--backend linux`` runs in turn in the command's own process.  It
reuses the runs ``ksmlab run`` and ``ksmlab estimate`` make: the scenario
runner (:func:`~ksmlab.scenario.runner.run_scenario`) on a backend opened
as ``run`` opens it, or the estimator's load and run of a snapshot
(:func:`~ksmlab.estimate.core.run_estimate`).  What comes back is small
(:class:`Outcome`): the figures of the table and a thinned curve for the plot.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Literal

from ksmlab.constants import PAGE_SIZE
from ksmlab.errors import NotModelledError
from ksmlab.ksm.cost import KsmdCost
from ksmlab.report.headline import headline
from ksmlab.scenario.backends import Backend, LinuxBackend, open_backend
from ksmlab.scenario.loader import apply_knob_overrides
from ksmlab.scenario.model import Scenario
from ksmlab.scenario.result import TIMELINE_COLUMNS, RunResult
from ksmlab.scenario.runner import RunError, StopCheck, run_scenario
from ksmlab.tune.grid import Config
from ksmlab.tune.ksmtuned import KsmtunedController

__all__ = ["CURVE_POINTS", "Outcome", "Workload", "configured", "outcome_of", "run_config"]

CURVE_POINTS = 200
"""At most this many (time, saving, CPU) points of each run's curve are kept for the plot."""

_TIME = TIMELINE_COLUMNS.index("time_s")
_PROFIT = TIMELINE_COLUMNS.index("general_profit")
_VOLATILE = TIMELINE_COLUMNS.index("pages_volatile")
_CPU = TIMELINE_COLUMNS.index("ksmd_cpu_s")


@dataclass(frozen=True, slots=True)
class Workload:
    """What every configuration runs on (pickled to the workers).

    Attributes:
        name: the scenario's or snapshot's name, for reports.
        source: the scenario file (``<built-in>``) or the snapshot file.
        backend: the engine every configuration runs on: ``sim``, ``bulk`` or ``linux``.
        host_bytes: the host's memory in ksmtuned's model.
        scenario: the scenario (with ``--until`` and ``--seed`` applied), or None for a snapshot.
        snapshot: the snapshot file, for a snapshot workload.
        until_ns: how long a snapshot's configurations run (virtual time).
        seed: the snapshot's rewrites' draws.
        content: SimKernel's content mode.
        cost: the model's ksmd cost and clock (``--cost``; None: the shipped one).
        lock_timeout_s: on the real kernel, how long each run waits for another
            session's lock (None: LinuxKernel's default).
        ksmd_cpu_at_start_ns: a snapshot's ksmd CPU time since boot at the start
            (``--ksmd-cpu-at-start``; None: the host's at capture).  A scenario
            carries its own (``ksmd_cpu_at_start``).
    """

    name: str
    source: str
    backend: str
    host_bytes: int
    scenario: Scenario | None = None
    snapshot: str | None = None
    until_ns: int | None = None
    seed: int = 0
    content: str = "bytes"
    cost: KsmdCost | None = None
    lock_timeout_s: float | None = None
    ksmd_cpu_at_start_ns: int | None = None

    @property
    def kind(self) -> Literal["scenario", "snapshot"]:
        """``scenario`` or ``snapshot``."""
        return "scenario" if self.scenario is not None else "snapshot"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one configuration gave (:func:`outcome_of`); the figures are at the run's end.

    Attributes:
        index: the configuration's place in the sweep.
        status: ``ok``, or ``failed`` (*error* says why).
        saved_bytes: ``general_profit`` at the end.
        mergeable_bytes: the memory the workload made mergeable.
        time_to_90_s: when the saving first reached 90% of its final value (None: nothing saved).
        ksmd_cpu_s: ksmd's CPU time over the run.
        ksmd_cpu_percent: that, as a share of one CPU over the run.
        pages_volatile: ``pages_volatile`` at the end.
        end_s: where the run ended (virtual time on the model).
        wall_s: how long the run took on the worker (wall clock).
        machine: the engine or kernel.
        curve: ``(time_s, general_profit, ksmd_cpu_s)``, thinned to :data:`CURVE_POINTS`.
        controller: the controller's decisions ``(time_s, note)`` (ksmtuned).
    """

    index: int
    status: Literal["ok", "failed"]
    error: str | None = None
    saved_bytes: int | None = None
    mergeable_bytes: int = 0
    time_to_90_s: float | None = None
    ksmd_cpu_s: float | None = None
    ksmd_cpu_percent: float | None = None
    pages_volatile: int | None = None
    end_s: float = 0.0
    wall_s: float = 0.0
    machine: str = ""
    curve: tuple[tuple[float, float, float], ...] = ()
    controller: tuple[tuple[float, str], ...] = ()

    @property
    def ok(self) -> bool:
        """The run finished and its figures exist."""
        return self.status == "ok" and self.saved_bytes is not None

    @property
    def saved_percent(self) -> float | None:
        """The saving as a share of the mergeable memory."""
        if self.saved_bytes is None or not self.mergeable_bytes:
            return None
        return 100 * self.saved_bytes / self.mergeable_bytes


def configured(sc: Scenario, config: Config) -> Scenario:
    """*sc* with *config*'s knobs written over its own (checked as ``--knob`` is).

    Under ``advisor_mode=scan-time`` the scenario's own ``pages_to_scan`` is dropped
    too: the advisor sets it.

    Raises:
        ScenarioError: a knob the scenario cannot take with its own (the message names it).
    """
    knobs = dict(config.knobs)
    if knobs.get("advisor_mode") == "scan-time":
        sc = dataclasses.replace(sc, knobs=tuple((n, v) for n, v in sc.knobs
                                                 if n != "pages_to_scan"))
    return apply_knob_overrides(sc, config.overrides())


def _thin(rows: tuple[tuple[float, ...], ...]) -> tuple[tuple[float, float, float], ...]:
    step = max(1, math.ceil(len(rows) / CURVE_POINTS))
    keep = list(rows[::step])
    if rows and keep[-1] is not rows[-1]:
        keep.append(rows[-1])
    return tuple((r[_TIME], r[_PROFIT], 0.0 if math.isnan(r[_CPU]) else r[_CPU]) for r in keep)


def outcome_of(index: int, r: RunResult, wall_s: float,
               controller: tuple[tuple[float, str], ...] = ()) -> Outcome:
    """The figures of the run *r* (:func:`~ksmlab.report.headline.headline`'s)."""
    h = headline(r)
    volatile = int(r.timeline[-1][_VOLATILE]) if r.timeline else None
    return Outcome(index, "ok", None, h.saved_bytes, h.mergeable_bytes, h.time_to_90_s,
                   h.ksmd_cpu_s, h.ksmd_cpu_percent, volatile, r.end_s, wall_s, r.machine,
                   _thin(r.timeline), controller)


def _controller(w: Workload, config: Config) -> KsmtunedController | None:
    return KsmtunedController(w.host_bytes) if config.reference == "ksmtuned" else None


def _log(ctl: KsmtunedController | None) -> tuple[tuple[float, str], ...]:
    if ctl is None:
        return ()
    return tuple((t, f"{a.action} pages_to_scan={a.npages} sleep_millisecs={a.sleep_ms}: "
                     f"{a.reason}" if a.action == "start" else f"stop: {a.reason}")
                 for t, a in ctl.log)


def _run_snapshot(w: Workload, config: Config, stop: StopCheck | None,
                  ctl: KsmtunedController | None) -> RunResult:
    from ksmlab.estimate.core import run_estimate
    from ksmlab.snapshot.reader import read_snapshot

    assert w.snapshot is not None
    snap = read_snapshot(w.snapshot)
    est = run_estimate(snap, knobs=config.overrides(), until_ns=w.until_ns, engine=w.backend,
                       seed=w.seed, stop=stop, cost=w.cost, controller=ctl,
                       ksmd_cpu_at_start_ns=w.ksmd_cpu_at_start_ns)
    return est.result


def run_config(w: Workload, index: int, config: Config,
               stop: StopCheck | None = None) -> Outcome:
    """Run *config* on *w* and return its figures; a run the machine cannot make (a
    kernel call failed, a call not modelled) is an outcome with status ``failed``."""
    started = time.perf_counter()
    ctl = _controller(w, config)
    try:
        if w.scenario is None:
            r = _run_snapshot(w, config, stop, ctl)
        else:
            sc = configured(w.scenario, config)
            backend: Backend = (LinuxBackend(w.lock_timeout_s)
                       if w.backend == "linux" and w.lock_timeout_s is not None
                       else open_backend(w.backend, "fingerprint" if w.content == "fingerprint"
                                         else "bytes", w.cost))
            try:
                r = run_scenario(sc, backend, None, stop, ctl)
            finally:
                backend.close()
    except (RunError, NotModelledError) as e:
        return Outcome(index, "failed", str(e), wall_s=time.perf_counter() - started)
    return outcome_of(index, r, time.perf_counter() - started, _log(ctl))


def mergeable_bytes(sc: Scenario) -> int:
    """The memory *sc*'s process groups map (ksmtuned's default host: all of it committed)."""
    return sc.total_pages() * PAGE_SIZE
