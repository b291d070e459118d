"""From a parsed TOML document to a :class:`~ksmlab.scenario.model.Scenario`, and the overrides.

:func:`build_scenario` reads the sections in dependency order (knobs,
contents, processes, then events in time order, activities, checkpoints) and
refuses unknown top-level tables; ``--seed`` replaces ``[scenario] seed``
before anything derives from it.  :func:`apply_knob_overrides` (``--knob``),
:func:`truncate` (``--until``, also past the end with ``--extend``) and
:func:`with_sample_interval` (``--sample``) and :func:`with_ksmd_cpu_at_start`
(``--ksmd-cpu-at-start``) turn a valid scenario into another.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ksmlab.scenario.groups import Groups
from ksmlab.scenario.knobs import KnobValue, ordered, pages_to_scan_refused
from ksmlab.scenario.model import Checkpoint, ForkEvent, Scenario
from ksmlab.scenario.parse import ScenarioError, Table
from ksmlab.scenario.schema import TOP_TABLES, ScenarioTable, TimelineTable
from ksmlab.scenario.sections import (
    activities,
    check_time,
    checked_knobs,
    checkpoints,
    contents,
    events,
    ksm_knobs,
    processes,
)
from ksmlab.scenario.units import MAX_DURATION_NS, NS_PER_S, format_duration

BUILTIN_SOURCE = "<built-in>"
"""The ``source`` of the built-in default scenario."""


def build_scenario(data: dict[str, Any], *, source: str, base_dir: Path,
                   seed: int | None = None) -> Scenario:
    """The scenario the TOML document *data* describes (see ``parse_scenario``)."""
    if seed is not None and isinstance(data.setdefault("scenario", {}), dict):
        data["scenario"]["seed"] = seed
    groups = Groups()
    top = Table(source, data, "")

    meta = top.table("scenario") or Table(source, {}, "scenario")
    name = meta.read(ScenarioTable.NAME,
                     Path(source).stem if source != BUILTIN_SOURCE else "default")
    description = meta.read(ScenarioTable.DESCRIPTION)
    seed = meta.read(ScenarioTable.SEED)
    duration = meta.read(ScenarioTable.DURATION)
    ksmd_cpu = meta.read(ScenarioTable.KSMD_CPU_AT_START)
    meta.done()

    knobs = ksm_knobs(top.table("ksm") or Table(source, {}, "ksm"))
    known = contents(source, top.table("content"), seed, base_dir)
    groups_read = processes(groups, top, known)
    for g in groups_read:
        check_time(meta, duration, g.start_ns, f"{groups.known[g.name].where}.start")
    evs = events(groups, top, duration)
    acts = activities(groups, top, duration)
    cps = checkpoints(groups, top, duration)

    tl = top.table("timeline")
    interval = None
    if tl is not None:
        interval = tl.read(TimelineTable.INTERVAL)
        tl.done()
    top.done(", ".join(TOP_TABLES))

    sc = Scenario(source=source, name=name, description=description, seed=seed,
                  duration_ns=duration, sample_interval_ns=1, knobs=knobs, contents=known,
                  processes=groups_read, activities=acts, events=evs, checkpoints=cps,
                  ksmd_cpu_at_start_ns=ksmd_cpu)
    return dataclasses.replace(sc, sample_interval_ns=interval or default_interval(sc))


def default_interval(sc: Scenario) -> int:
    """The timeline period when the file gives none: 1/200 of the run, at least 1 ms."""
    end = sc.planned_end_ns
    return max(1_000_000, end // 200) if end else 10_000_000


def apply_knob_overrides(sc: Scenario, overrides: dict[str, KnobValue]) -> Scenario:
    """*sc* with the ``--knob NAME=VALUE`` overrides applied (validated like ``[ksm]``)."""
    values = checked_knobs(overrides.items(), dict(sc.knobs),
                           lambda name, expected, got: ScenarioError("--knob", name, expected, got))
    if pages_to_scan_refused(values):
        raise ScenarioError("--knob", "pages_to_scan",
                            "no pages_to_scan with advisor_mode = \"scan-time\"",
                            values["pages_to_scan"])
    return dataclasses.replace(sc, knobs=ordered(values))


MAX_SAMPLES = 1_000_000
"""At most this many timeline samples over a run (``--sample``): each is a row kept in memory."""


def latest_end_ns(sc: Scenario) -> int:
    """The latest a run of *sc* can end: its planned end, or a full-scan checkpoint's timeout."""
    return max([sc.planned_end_ns, *(c.timeout_ns for c in sc.checkpoints if c.at_ns is None)])


def with_sample_interval(sc: Scenario, interval_ns: int, source: str = "--sample") -> Scenario:
    """*sc* sampled every *interval_ns* (``--sample``), at most :data:`MAX_SAMPLES` times a run."""
    def show(ns: int) -> str:  # below a millisecond too
        return f"{ns} ns" if ns < 1000 else (f"{ns / 1000:g} µs" if ns < 1_000_000
                                             else format_duration(ns / NS_PER_S))

    end = latest_end_ns(sc)
    least = max(1, -(-end // MAX_SAMPLES))
    if interval_ns < least:
        expected = ("an interval > 0" if least == 1 else
                    f"an interval of at least {show(least)} (at most {MAX_SAMPLES:,} samples "
                    f"over the {format_duration(end / NS_PER_S)} run)")
        raise ScenarioError(source, "interval", expected, show(interval_ns))
    return dataclasses.replace(sc, sample_interval_ns=interval_ns)


def with_ksmd_cpu_at_start(sc: Scenario, cpu_ns: int) -> Scenario:
    """*sc* starting with ksmd's CPU time since boot *cpu_ns* (``--ksmd-cpu-at-start``).

    Raises:
        ScenarioError: *cpu_ns* is negative or past a 64-bit ns clock.
    """
    if not 0 <= cpu_ns <= MAX_DURATION_NS:
        raise ScenarioError("--ksmd-cpu-at-start", "ksmd_cpu_at_start",
                            "a duration from 0 to about 292 years", f"{cpu_ns} ns")
    return dataclasses.replace(sc, ksmd_cpu_at_start_ns=cpu_ns)


def truncate(sc: Scenario, until_ns: int) -> Scenario:
    """*sc* cut at *until_ns* (``--until``): later items are dropped and the run ends there.

    A checkpoint at *until_ns* is added if none is there already, so the
    summary shows where the run stopped.  Past the scenario's end (which the
    command line allows only with ``--extend``) the scenario goes on as it
    was: ksmd scans, activities without a ``stop`` keep writing, until *until_ns*.
    """
    groups_born = {g.name for g in sc.processes if g.start_ns <= until_ns}
    evs = tuple(e for e in sc.events if e.at_ns <= until_ns)
    for e in evs:
        if isinstance(e, ForkEvent):
            groups_born.add(e.child)
    acts = tuple(dataclasses.replace(a, stop_ns=min(a.stop_ns or until_ns, until_ns))
                 for a in sc.activities
                 if a.process.group in groups_born and a.start_ns < until_ns)
    cps = [dataclasses.replace(c, timeout_ns=min(c.timeout_ns, until_ns)) if c.full_scans
           else c for c in sc.checkpoints if c.at_ns is None or c.at_ns <= until_ns]
    cps = [c for c in cps if all(x.process is None or x.process.group in groups_born
                                 for x in c.expect)]
    if not any(c.at_ns == until_ns for c in cps):
        cps.append(Checkpoint(len(sc.checkpoints), f"--until {format_duration(until_ns / NS_PER_S)}",
                              until_ns, None, until_ns))
    out = dataclasses.replace(
        sc, duration_ns=until_ns, events=evs, activities=acts, checkpoints=tuple(cps),
        processes=tuple(g for g in sc.processes if g.start_ns <= until_ns))
    return dataclasses.replace(out, sample_interval_ns=min(sc.sample_interval_ns,
                                                           default_interval(out)))


__all__ = ["BUILTIN_SOURCE", "MAX_SAMPLES", "apply_knob_overrides", "build_scenario",
           "default_interval", "latest_end_ns", "truncate", "with_ksmd_cpu_at_start",
           "with_sample_interval"]
