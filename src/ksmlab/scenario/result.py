"""What a run produces: plain, immutable data, independent of the backend.

A :class:`RunResult` holds everything the reports need (the scenario's
description, the knobs, the checkpoint rows, the timeline), so the table,
the JSON document, the CSV, the plot and the HTML page are all rendered from
it, and a result read back from JSON renders the same.  It never refers to a
kernel or a process.
"""

from __future__ import annotations

from dataclasses import dataclass

from ksmlab.scenario.model import (
    GLOBAL_COUNTERS,
    Event,
    ExitEvent,
    Expectation,
    ForkEvent,
    KnobsEvent,
    MadviseEvent,
    PrctlEvent,
    Region,
    Scenario,
    WriteActivity,
    WriteEvent,
)
from ksmlab.scenario.units import NS_PER_S, format_duration

TIMELINE_COLUMNS = ("time_s", *GLOBAL_COUNTERS, "ksmd_cpu_s")
"""Columns of the timeline (CSV header, JSON ``timeline.columns``)."""


@dataclass(frozen=True, slots=True)
class MappingInfo:
    """A mapping of a process group, for reports."""

    name: str
    pages: int
    content: str
    kind: str
    mergeable: bool


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    """A declared process group, for reports."""

    name: str
    count: int
    start_s: float
    merge_any: bool
    mappings: tuple[MappingInfo, ...]


@dataclass(frozen=True, slots=True)
class ScenarioInfo:
    """The scenario as reports describe it.

    Attributes:
        name, description, source, seed: as in the file.
        planned_end_s: the end the file fixes (full-scan checkpoints may run longer).
        total_pages: pages mapped by the declared processes (forks not counted).
        processes: the declared groups.
        activities: one line per write activity.
        events: one line per event, in time order.
        sample_interval_s: the timeline's sampling period (None: not known, in a
            document written before it was recorded).
    """

    name: str
    description: str
    source: str
    seed: int
    planned_end_s: float
    total_pages: int
    processes: tuple[ProcessInfo, ...]
    activities: tuple[str, ...]
    events: tuple[str, ...]
    sample_interval_s: float | None = None

    @property
    def mergeable_pages(self) -> int:
        """Pages the declared groups make mergeable as they start (madvise, or prctl merge_any).

        Forks, exits and later madvise calls are not counted, as in :attr:`total_pages`.
        """
        return sum(p.count * m.pages for p in self.processes for m in p.mappings
                   if m.mergeable or p.merge_any)

    @classmethod
    def of(cls, sc: Scenario) -> ScenarioInfo:
        """The description of *sc*."""
        procs = tuple(
            ProcessInfo(g.name, g.count, g.start_ns / NS_PER_S, g.merge_any, tuple(
                MappingInfo(m.name, m.pages, m.content, sc.contents[m.content].kind, m.mergeable)
                for m in g.mappings))
            for g in sc.processes)
        return cls(sc.name, sc.description, sc.source, sc.seed, sc.planned_end_ns / NS_PER_S,
                   sc.total_pages(), procs, tuple(describe_activity(a) for a in sc.activities),
                   tuple(describe_event(e) for e in sc.events), sc.sample_interval_ns / NS_PER_S)


def _region(mapping: str, region: Region | None) -> str:
    if region is None:
        return mapping
    return f"{mapping} pages {region.first}..{region.first + region.pages - 1}"


def describe_activity(a: WriteActivity) -> str:
    """``guest: 10 writes/s to ram pages 0..511 (random pages, 8 random bytes), 0 s to end``."""
    what = "zeroing the page" if a.data == "zero" else f"{a.nbytes} random bytes"
    stop = "end" if a.stop_ns is None else format_duration(a.stop_ns / NS_PER_S)
    rate = (f"{a.rate:g} writes/s" if a.share is None
            else f"{a.share * 100:g}%/s of the region ({a.rate:g} writes/s)")
    return (f"{a.process.text}: {rate} each to {_region(a.mapping, a.region)} "
            f"({a.pick} page, {what}, {a.arrivals} arrivals), "
            f"{format_duration(a.start_ns / NS_PER_S)} to {stop}")


def describe_event(e: Event) -> str:
    """``at 30 s: fork guest[0] -> clone (x2)`` and the like."""
    return f"at {format_duration(e.at_ns / NS_PER_S)}: {describe_action(e)}"


def describe_action(e: Event) -> str:
    """What event *e* does: ``fork guest[0] -> clone (x2)`` and the like."""
    if isinstance(e, WriteEvent):
        return f"write {e.process.text} {_region(e.mapping, e.region)} ({e.data})"
    if isinstance(e, ForkEvent):
        return f"fork {e.process.text} -> {e.child}" + (f" (x{e.count})" if e.count > 1 else "")
    if isinstance(e, ExitEvent):
        return f"exit {e.process.text}"
    if isinstance(e, MadviseEvent):
        return f"madvise {e.process.text} {_region(e.mapping, e.region)} {e.advice}"
    if isinstance(e, PrctlEvent):
        return f"prctl {e.process.text} PR_SET_MEMORY_MERGE={int(e.merge_any)}"
    if isinstance(e, KnobsEvent):
        return "set " + ", ".join(f"{n}={v}" for n, v in e.knobs)
    return e.action


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One expectation at one checkpoint, with the value found."""

    check: str
    counter: str
    process: str | None
    min: int | None
    max: int | None
    actual: int
    ok: bool

    @classmethod
    def of(cls, x: Expectation, actual: int) -> CheckResult:
        """The result of *x* for value *actual*."""
        return cls(x.describe(), x.counter, x.process.text if x.process else None, x.min, x.max,
                   actual, x.holds(actual))


@dataclass(frozen=True, slots=True)
class CheckpointResult:
    """The counters recorded at one checkpoint.

    Attributes:
        name: the checkpoint's label.
        time_s: when (seconds since the start).
        reached: False for a full-scan checkpoint that timed out (then the
            counters are those at the timeout).
        counters: :data:`~ksmlab.scenario.model.GLOBAL_COUNTERS` by name.
        ksmd_cpu_s: ksmd's CPU time since the start (None: unknown).
        processes: per process group, ``alive`` and the summed ksm_stat numbers.
        checks: the expectations of the checkpoint.
    """

    name: str
    time_s: float
    reached: bool
    counters: dict[str, int]
    ksmd_cpu_s: float | None
    processes: dict[str, dict[str, int]]
    checks: tuple[CheckResult, ...] = ()


@dataclass(frozen=True, slots=True)
class RunResult:
    """A finished run, or the part of it reached before it was interrupted.

    Attributes:
        scenario: what ran.
        backend: ``sim``, ``bulk`` or ``linux``.
        machine: one line naming the machine (the model, or the kernel release).
        knobs: every KSM knob as read right after the start (ints; advisor_mode a word).
        checkpoints: one row per checkpoint, in the order they were reached.
        timeline: rows of :data:`TIMELINE_COLUMNS`.
        end_s: when the run ended.
        failures: one line per failed expectation or checkpoint not reached.
        interrupted: why the run stopped before its end (``"SIGINT"``,
            ``"SIGTERM"``), or None for a run that went to its end.  An
            interrupted run holds the checkpoints reached and the timeline up to
            :attr:`end_s`.
        ksmd_cpu_at_start_s: ksmd's CPU time since boot at the start, which the
            scan-time advisor's first step counts: the scenario's
            ``ksmd_cpu_at_start`` on a model, the real ksmd's on the real kernel
            (None: unknown, or a document written before it was recorded).
        notes: remarks on how the run was made (e.g. a scenario field the
            backend ignored), one sentence each.
    """

    scenario: ScenarioInfo
    backend: str
    machine: str
    knobs: dict[str, int | str]
    checkpoints: tuple[CheckpointResult, ...]
    timeline: tuple[tuple[float, ...], ...]
    end_s: float
    failures: tuple[str, ...] = ()
    interrupted: str | None = None
    ksmd_cpu_at_start_s: float | None = None
    notes: tuple[str, ...] = ()

    @property
    def partial(self) -> bool:
        """The run was interrupted: later checkpoints are missing."""
        return self.interrupted is not None

    @property
    def ok(self) -> bool:
        """No expectation failed, every checkpoint was reached, and the run went to its end."""
        return not self.failures and not self.partial


def advisor_start_note(cpu_ns: int, whose: str) -> str:
    """The note of a run under the scan-time advisor: the ksmd CPU time its first step counts."""
    return (f"ksmd's CPU time since boot at the start was {format_duration(cpu_ns / NS_PER_S)} "
            f"({whose}): the scan-time advisor's first step counts all of it (on a host up for "
            f"a while it starts with ksmd nearly stalled; docs/scenarios.md)")


__all__ = ["TIMELINE_COLUMNS", "CheckResult", "CheckpointResult", "MappingInfo", "ProcessInfo",
           "RunResult", "ScenarioInfo", "advisor_start_note", "describe_action",
           "describe_activity", "describe_event"]
