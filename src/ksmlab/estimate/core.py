"""``estimate``: from a snapshot to the static bound, the predicted curve and the exposure.

The steps (each its own module): the pages to load (:mod:`~ksmlab.estimate.plan`),
the static bound (:mod:`~ksmlab.estimate.static`), the exposure
(:mod:`~ksmlab.estimate.exposure`), the machine (:mod:`~ksmlab.estimate.load`)
and ksmd's run on it (:mod:`~ksmlab.estimate.simulate`).  The knobs are the
host's at capture (the snapshot's metadata; a kernel's boot values if it had
no KSM), with ``knobs`` overriding them; ``run`` is not one of them: the
estimate is of ksmd running.  ksmd starts with the host's CPU time since boot at
capture (the snapshot's ``ksmd_cpu_ns``), which the scan-time advisor's first
step counts.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ksmlab.estimate.exposure import Exposure, exposure
from ksmlab.estimate.load import ENGINES, Machine, choose_engine, load_machine
from ksmlab.estimate.plan import LoadPlan, load_plan
from ksmlab.estimate.simulate import Outcome, RunProgress, StopCheck, run_machine
from ksmlab.estimate.static import GROUPINGS, Bound, GroupBound, groups_bound, plan_bound
from ksmlab.ksm.cost import KsmdCost
from ksmlab.scenario.control import Controller
from ksmlab.scenario.knobs import KNOBS, KnobValue, knob_text, read_knob
from ksmlab.scenario.result import (
    MappingInfo,
    ProcessInfo,
    RunResult,
    ScenarioInfo,
    advisor_start_note,
)
from ksmlab.scenario.units import MAX_DURATION_NS, NS_PER_S, format_duration
from ksmlab.snapshot.reader import Snapshot

__all__ = ["Estimate", "resolve_knobs", "run_estimate"]


@dataclass(frozen=True)
class Estimate:
    """Everything ``ksmlab estimate`` reports.

    Attributes:
        result: the predicted run, as ``ksmlab run``'s result (timeline, checkpoints, knobs).
        plan: the loaded pages.
        knob_sources: where each knob written came from: ``snapshot``, ``boot`` or ``--knob``.
        static: the static bound of the whole snapshot.
        by: the grouping asked for, or None.
        groups: the per-group bounds of *by* (None without it).
        exposure: with ``by`` uid or cgroup, the cross-domain figures.
        processes: each process's own bound.
        settled: without ``until``, whether the saving settled before the caps.
        rewrites: page rewrites applied during the run.
        ksmd_cpu_ns: ksmd's CPU time since boot the model's ksmd started with (the
            scan-time advisor's first step counts it).
        ksmd_cpu_source: where it came from: ``snapshot`` (the host at capture),
            ``--ksmd-cpu-at-start``, or ``unknown`` (a snapshot that does not record
            it: 0, a freshly booted host).
    """

    result: RunResult
    plan: LoadPlan
    knob_sources: dict[str, str]
    static: Bound
    by: str | None
    groups: list[GroupBound] | None
    exposure: Exposure | None
    processes: list[GroupBound]
    settled: bool | None
    rewrites: int
    ksmd_cpu_ns: int = 0
    ksmd_cpu_source: str = "unknown"


def resolve_knobs(snap: Snapshot, overrides: Mapping[str, KnobValue]
                  ) -> tuple[dict[str, str], dict[str, str]]:
    """The knobs to run with (text as written to sysfs) and where each came from.

    Raises:
        ValueError: an unknown knob, ``run``, or a value out of range (the message names
            the knob and what it accepts).
    """
    for name in overrides:
        if name == "run":
            msg = ("--knob run: the estimate is of ksmd running (run=1); set the other "
                   "knobs to change what it does")
            raise ValueError(msg)
        if name not in KNOBS:
            msg = (f"--knob {name}: expected one of {', '.join(n for n in KNOBS if n != 'run')}, "
                   f"got {name!r}")
            raise ValueError(msg)
    base: dict[str, str]
    if snap.ksm_knobs is not None:
        base, source = dict(snap.ksm_knobs), "snapshot"
    else:
        from ksmlab.backends.linux_knobs import boot_knobs

        base, source = boot_knobs(), "boot"
    knobs = {n: str(read_knob(v)) for n, v in base.items() if n in KNOBS and n != "run"}
    sources = dict.fromkeys(knobs, source)
    for name, value in overrides.items():
        try:
            knobs[name] = knob_text(name, value)
        except ValueError as e:
            raise ValueError(f"--knob {name}: expected {e}, got {value!r}") from None
        sources[name] = "--knob"
    if (knobs.get("advisor_mode") == "scan-time" and "pages_to_scan" in overrides):
        msg = ("--knob pages_to_scan: the scan-time advisor sets pages_to_scan (the kernel "
               "refuses the write, EINVAL); set advisor_mode=none too, or drop it")
        raise ValueError(msg)
    return knobs, sources


def _scenario(plan: LoadPlan, snap: Snapshot, end_s: float, sample_s: float, seed: int,
              outcome: Outcome) -> ScenarioInfo:
    created = str(snap.meta.get("created", ""))
    desc = (f"{len(plan.processes)} processes on {snap.host or 'an unnamed host'} "
            f"(Linux {snap.kernel or '?'}), captured {created or 'at an unknown time'}, "
            f"policy {snap.policy}; {len(plan)} pages loaded")
    procs = tuple(ProcessInfo(p.label, 1, 0.0, snap.policy == "merge-any",
                              (MappingInfo("anonymous", p.pages, "snapshot", "snapshot", True),))
                  for p in plan.processes)
    writers = int((plan.rate > 0).sum())
    activities: tuple[str, ...] = ()
    if writers:
        activities = (f"{writers} pages rewritten at their sampled rates, "
                      f"{float(plan.rate.sum()):.4g} writes/s in all "
                      f"({outcome.rewrites} rewrites in the run; from {snap.samples} samples "
                      f"{format_duration(snap.interval_s)} apart)",)
    events: tuple[str, ...] = ()
    if plan.ksm.any():
        events = (f"before the start: {int(plan.ksm.sum())} pages that were KSM pages at "
                  f"capture merged again",)
    return ScenarioInfo(f"estimate: {os.path.basename(snap.path)}", desc, snap.path, seed, end_s,
                        len(plan), procs, activities, events, sample_s)


def run_estimate(snap: Snapshot, *, knobs: Mapping[str, KnobValue] | None = None,
                 until_ns: int | None = None, sample_ns: int | None = None,
                 engine: str = "auto", by: str | None = None, seed: int = 0,
                 load_progress: Callable[[int, int], None] | None = None,
                 run_progress: Callable[[RunProgress], None] | None = None,
                 stop: StopCheck | None = None, cost: KsmdCost | None = None,
                 controller: Controller | None = None,
                 ksmd_cpu_at_start_ns: int | None = None) -> Estimate:
    """Estimate what KSM would do for the processes of *snap* (see the module doc).

    Args:
        knobs: knob overrides (``--knob``), values as TOML would give them.
        until_ns: virtual time to run to; None: until the saving settles.
        sample_ns: the timeline's period (None: automatic).
        engine: ``auto``, ``sim`` or ``bulk``.
        by: ``uid``, ``cgroup`` (also the exposure) or ``comm``, or None.
        seed: the rewrites' random draws (and the bulk engine's).
        cost: ksmd's cost and clock model (None: the shipped one, docs/cost-model.md).
        controller: rewrites knobs during the run (``ksmlab tune``'s ksmtuned reference).
        ksmd_cpu_at_start_ns: ksmd's CPU time since boot at the start, which the
            scan-time advisor's first step counts; None: the host's at capture (the
            snapshot's ``ksmd_cpu_ns``), or 0 where the snapshot does not record it.

    Raises:
        ValueError: a bad knob, engine, grouping or time (the message names it).
    """
    if engine not in ENGINES:
        raise ValueError(f"engine: expected one of {', '.join(ENGINES)}, got {engine!r}")
    if by is not None and by not in GROUPINGS:
        raise ValueError(f"by: expected one of {', '.join(GROUPINGS)}, got {by!r}")
    if until_ns is not None and until_ns <= 0:
        raise ValueError(f"until: expected a duration > 0, got {until_ns / NS_PER_S:g} s")
    if sample_ns is not None and sample_ns <= 0:
        raise ValueError(f"sample: expected a duration > 0, got {sample_ns / NS_PER_S:g} s")
    if ksmd_cpu_at_start_ns is not None and not 0 <= ksmd_cpu_at_start_ns <= MAX_DURATION_NS:
        raise ValueError(f"ksmd_cpu_at_start: expected a duration from 0 to about 292 years, "
                         f"got {ksmd_cpu_at_start_ns} ns")
    cpu0, cpu_source = _ksmd_cpu(snap, ksmd_cpu_at_start_ns)
    written, sources = resolve_knobs(snap, knobs or {})
    plan = load_plan(snap)
    static = plan_bound(plan, written)
    groups = groups_bound(plan, written, by) if by is not None else None
    expo = exposure(plan, written, by) if by in ("uid", "cgroup") else None
    procs = groups_bound(plan, written, "pid")
    name = choose_engine(engine, len(plan))
    m: Machine = load_machine(plan, name, written, seed=seed, progress=load_progress,
                              cost=cost)
    outcome = run_machine(m, until_ns=until_ns, sample_ns=sample_ns, seed=seed,
                          progress=run_progress, stop=stop, controller=controller,
                          ksmd_cpu_ns=cpu0)
    end_s = outcome.end_s if until_ns is None else until_ns / NS_PER_S
    info = _scenario(plan, snap, end_s, outcome.sample_interval_s, seed, outcome)
    notes: tuple[str, ...] = ()
    if outcome.knobs.get("advisor_mode") == "scan-time":
        notes = (advisor_start_note(cpu0, _CPU_SOURCES[cpu_source]),)
    result = RunResult(info, name, f"{m.describe()}, predicting {snap.host or 'the host'}",
                       outcome.knobs, tuple(outcome.checkpoints), tuple(outcome.timeline),
                       outcome.end_s, (), outcome.interrupted, cpu0 / NS_PER_S, notes)
    return Estimate(result, plan, sources, static, by, groups, expo, procs, outcome.settled,
                    outcome.rewrites, cpu0, cpu_source)


_CPU_SOURCES = {
    "snapshot": "the host's at capture, from the snapshot",
    "--ksmd-cpu-at-start": "--ksmd-cpu-at-start",
    "unknown": "unknown: the snapshot does not record it, so a freshly booted host's; "
               "give --ksmd-cpu-at-start",
}


def _ksmd_cpu(snap: Snapshot, given: int | None) -> tuple[int, str]:
    """ksmd's CPU time since boot to start the model's ksmd with, and its source."""
    if given is not None:
        return given, "--ksmd-cpu-at-start"
    if snap.ksmd_cpu_ns is not None:
        return snap.ksmd_cpu_ns, "snapshot"
    return 0, "unknown"

