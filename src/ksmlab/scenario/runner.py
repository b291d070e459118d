"""Run a validated scenario on a backend: a small discrete-event loop on the backend's clock.

Everything that happens at a time (a group of processes starting, an event,
one write of an activity, a timeline sample, a checkpoint) is an item in a
heap ordered by ``(time, kind, sequence)``, so simultaneous items run in a
fixed order: process starts, then events (in file order), then a
controller's turn (:mod:`~ksmlab.scenario.control`, e.g. ksmtuned's model),
then activity writes, then the timeline sample, then checkpoints; a
checkpoint therefore sees what happened at its own time.  Between items the backend's clock is
advanced, which on :class:`~ksmlab.SimKernel` runs ksmd exactly as
``ksm_scan_thread`` would, and on the real kernel sleeps.  A checkpoint
given in full scans is reached by waiting for ``full_scans`` between the
timed items.

Write activities are not items of the heap one write at a time: their
writes are drawn in arrays (:mod:`~ksmlab.scenario.churn`) and every write
due before the next item, and before ksmd's next batch, is handed to the
backend as one batch, in time order.  Nothing observes the machine between
those writes, so the result is that of writing them one by one at their
times; the bulk engine applies a batch as one array step.

Set-up, at time 0 before ksmd starts: the knobs other than ``run`` are
written (only those that differ, in the kernel's order), the processes
starting at 0 are spawned, their mappings made, filled and madvised; then
``run`` is written (1 unless the scenario says otherwise) and the clock
starts.  Every random choice comes from the scenario seed, so a run on the
model is reproducible to the byte.

A run can be stopped early (``ksmlab run`` does so on Ctrl-C): given a
*stop* callable, the runner asks it at safe points (between items, between
processes being set up, and between steps of about :data:`STEP_WALL_S` of
wall time while the clock advances) and, once it names a reason, ends there
with the checkpoints reached so far, a last timeline sample, and the result
marked interrupted.  Advancing in steps changes nothing on the model: ksmd
runs the batches due by each step's end, the same batches as in one go.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

from ksmlab.api import Process
from ksmlab.constants import (
    MADV_DONTNEED,
    MADV_MERGEABLE,
    MADV_UNMERGEABLE,
    PAGE_SIZE,
    PR_SET_MEMORY_MERGE,
)
from ksmlab.errors import KsmSimError, ScanStalledError
from ksmlab.scenario.backends import Backend
from ksmlab.scenario.churn import Churn, WriteBatch, WriteTarget, event_batches
from ksmlab.scenario.content import ContentSource
from ksmlab.scenario.control import Controller, ControlView
from ksmlab.scenario.knobs import KNOBS, WRITE_ORDER, read_knob
from ksmlab.scenario.model import (
    DELTA_COUNTERS,
    GLOBAL_COUNTERS,
    PROCESS_COUNTERS,
    Checkpoint,
    Event,
    ExitEvent,
    ForkEvent,
    KnobsEvent,
    MadviseEvent,
    PrctlEvent,
    ProcessGroup,
    Region,
    Scenario,
    Selector,
    WriteActivity,
    WriteEvent,
)
from ksmlab.scenario.result import (
    CheckpointResult,
    CheckResult,
    RunResult,
    ScenarioInfo,
    advisor_start_note,
    describe_action,
)
from ksmlab.scenario.units import NS_PER_S, format_duration

_ADVICE = {"mergeable": MADV_MERGEABLE, "unmergeable": MADV_UNMERGEABLE,
           "dontneed": MADV_DONTNEED}

STEP_WALL_S = 0.05
"""With a stop callable, the clock advances in steps of about this much wall time."""

_FIRST_STEP_NS = 1_000_000
_MIN_STEP_NS = 1_000
_MAX_STEP_NS = 3600 * NS_PER_S

StopCheck = Callable[[], str | None]
"""Asked at safe points: None to go on, or why the run stops (e.g. ``"SIGINT"``)."""


class RunError(KsmSimError, RuntimeError):
    """The run could not go on: a kernel call failed.  The message says when and what."""


class _Kind(IntEnum):
    """Order of items due at the same time."""

    START = 0
    EVENT = 1
    CONTROL = 2
    WRITE = 3
    SAMPLE = 4
    CHECKPOINT = 5
    SCAN_DEADLINE = 6
    END = 7


@dataclass(frozen=True, slots=True)
class ProgressInfo:
    """Where a run is, for a progress display.

    Attributes:
        now_s: time reached.
        planned_end_s: where the run is expected to end (it may go on longer
            while a full-scan checkpoint is pending).
        full_scans: full scans completed since the start.
        checkpoints_done: checkpoints recorded so far.
        checkpoints_total: checkpoints in the scenario.
        setting_up: the processes present at time 0 are being created and
            filled (the clock has not started).
        pages_filled: pages of theirs filled so far.
        pages_to_fill: their pages in all.
    """

    now_s: float
    planned_end_s: float
    full_scans: int
    checkpoints_done: int
    checkpoints_total: int
    setting_up: bool = False
    pages_filled: int = 0
    pages_to_fill: int = 0


@dataclass(slots=True)
class _Instance:
    """One process of a group: its handle and where its mappings are."""

    name: str
    proc: Process | None
    addrs: dict[str, int]


class Runner:
    """Runs one scenario once on one backend; use :func:`run_scenario`."""

    def __init__(self, sc: Scenario, backend: Backend,
                 progress: Callable[[ProgressInfo], None] | None = None,
                 stop: StopCheck | None = None, controller: Controller | None = None) -> None:
        self.sc = sc
        self.controller = controller
        self.backend = backend
        self.kernel = backend.kernel
        self.progress = progress
        self.stop = stop
        self.stopped: str | None = None
        self._started = False
        self._step_ns = _FIRST_STEP_NS
        self.groups: dict[str, list[_Instance]] = {}
        self.pages: dict[str, dict[str, int]] = {}
        self.content = ContentSource()
        self.churn = Churn(sc.seed, backend.wants_bytes)
        self._shown = 0.0  # wall clock of the last progress report
        self._setting_up = False
        self._filled = 0
        self._to_fill = sum(g.count * m.pages for g in sc.processes if g.start_ns == 0
                            for m in g.mappings)
        self._heap: list[tuple[int, int, int, object]] = []
        self._seq = itertools.count()
        self._base: dict[str, int] = {}
        self._last: dict[str, int] = {}
        self._acc: dict[str, int] = {}
        self._pending_scans: list[Checkpoint] = []
        self._ending = False
        self.checkpoints: list[CheckpointResult] = []
        self.timeline: list[tuple[float, ...]] = []
        self.failures: list[str] = []
        self.knobs: dict[str, int | str] = {}
        self.notes: list[str] = []

    # --- scheduling ------------------------------------------------------------------
    def _push(self, t_ns: int, kind: _Kind, item: object) -> None:
        heapq.heappush(self._heap, (t_ns, kind, next(self._seq), item))

    def run(self) -> RunResult:
        """Set up, run every item in time order, and return the result."""
        try:
            if not self._stopping():  # a stop asked for before anything was built
                self._setup()
            if self._started and not self._stopping():
                self._loop()
            if self._started:
                self._sample(self.backend.now_ns(), final=True)
            self._report_progress(force=True)
        except NotImplementedError as e:  # a call outside what this machine models
            when = format_duration(self.backend.now_ns() / NS_PER_S)
            msg = f"at {when}, {self.backend.describe()} cannot run this scenario: {e}"
            raise RunError(msg) from e
        finally:
            self.content.close()
        cpu0 = self.backend.ksmd_cpu_at_start_ns() if self._started else None
        return RunResult(ScenarioInfo.of(self.sc), self.backend.name, self.backend.describe(),
                         self.knobs, tuple(self.checkpoints), tuple(self.timeline),
                         self.backend.now_ns() / NS_PER_S, tuple(self.failures), self.stopped,
                         None if cpu0 is None else cpu0 / NS_PER_S, tuple(self.notes))

    # --- stopping early -------------------------------------------------------------------
    def _stopping(self) -> bool:
        """Whether the run is to stop here (asks the stop callable once more if not yet)."""
        if self.stopped is None and self.stop is not None:
            self.stopped = self.stop()
        return self.stopped is not None

    def _step_end(self, t_ns: int) -> int:
        """Where the next step of advancing towards *t_ns* ends."""
        if self.stop is None:
            return t_ns
        return min(t_ns, self.backend.now_ns() + self._step_ns)

    def _adapt_step(self, wall_s: float) -> None:
        """Keep steps near :data:`STEP_WALL_S` of wall time, whatever the backend's speed."""
        if wall_s < STEP_WALL_S / 2:
            self._step_ns = min(self._step_ns * 2, _MAX_STEP_NS)
        elif wall_s > STEP_WALL_S * 2:
            self._step_ns = max(self._step_ns // 2, _MIN_STEP_NS)

    def _advance_to(self, t_ns: int) -> bool:
        """Advance the clock to *t_ns* in steps; False if a stop came first."""
        while self.backend.now_ns() < t_ns:
            if self._stopping():
                return False
            end = self._step_end(t_ns)
            started = time.perf_counter()
            self.backend.advance_to(end)
            self._adapt_step(time.perf_counter() - started)
        return True

    def _wait_scans(self, full_scans: int, t_ns: int) -> bool:
        """Wait until ``full_scans`` reaches *full_scans*, no later than *t_ns*; True if it did."""
        while (need := full_scans - self._counter("full_scans")) > 0:
            now = self.backend.now_ns()
            if now >= t_ns or self._stopping():
                return False
            end = self._step_end(t_ns)
            started = time.perf_counter()
            try:
                self.kernel.wait_full_scans(need, timeout=(end - now) / NS_PER_S)
            except ScanStalledError:
                # ksmd cannot go on (the clock has not reached the step's end), or the
                # step's end came first: then wait on, unless it was the deadline too.
                if self.backend.now_ns() < end or end >= t_ns:
                    return False
            self._adapt_step(time.perf_counter() - started)
        return True

    def _setup(self) -> None:
        sc, sysfs = self.sc, self.kernel.sysfs
        # Before any knob: the advisor's first step counts ksmd's CPU since boot.
        if not self.backend.seed_ksmd_cpu(sc.ksmd_cpu_at_start_ns) and sc.ksmd_cpu_at_start_ns:
            self.notes.append(
                f"[scenario] ksmd_cpu_at_start = "
                f"{format_duration(sc.ksmd_cpu_at_start_ns / NS_PER_S)} was ignored: "
                f"{self.backend.describe()} has its own ksmd, whose CPU time since boot counts")
        if sysfs["run"] != "0":
            self._write_knob("run", "0", "setting up")
        for name, value in sc.knobs:
            if name != "run":
                self._write_knob(name, value, "[ksm]")
        self._setting_up = True
        self._report_progress(force=True)
        for g in sc.processes:
            if g.start_ns == 0:
                self._start_group(g)
                if self._stopping():
                    return  # interrupted while setting up: nothing was measured
            else:
                self._push(g.start_ns, _Kind.START, g)
        self._setting_up = False
        self._report_progress(force=True)
        self._write_knob("run", dict(sc.knobs).get("run", "1"), "[ksm]")
        self.backend.start_clock()
        self._started = True
        self.knobs = {n: read_knob(sysfs[n]) for n in WRITE_ORDER if n in sysfs}
        cpu0 = self.backend.ksmd_cpu_at_start_ns()
        if self.knobs.get("advisor_mode") == "scan-time" and cpu0 is not None:
            whose = ("the real ksmd's" if self.backend.name == "linux"
                     else "[scenario] ksmd_cpu_at_start")
            self.notes.append(advisor_start_note(cpu0, whose))
        for name in DELTA_COUNTERS:
            self._base[name] = self._last[name] = self._raw(name)
            self._acc[name] = 0
        for e in sc.events:
            self._push(e.at_ns, _Kind.EVENT, e)
        for a in sc.activities:
            self._push(a.start_ns, _Kind.WRITE, a)
        for c in sc.checkpoints:
            if c.at_ns is not None:
                self._push(c.at_ns, _Kind.CHECKPOINT, c)
            else:
                self._pending_scans.append(c)
                self._push(c.timeout_ns, _Kind.SCAN_DEADLINE, c)
        self._pending_scans.sort(key=lambda c: (c.full_scans or 0, c.index))
        self._push(0, _Kind.SAMPLE, None)
        self._push(sc.planned_end_ns, _Kind.END, None)
        if self.controller is not None and (first := self.controller.first_ns()) is not None:
            self._push(first, _Kind.CONTROL, self.controller)

    def _loop(self) -> None:
        while self._heap:
            t, kind, _, item = self._heap[0]
            nt = self.churn.next_ns()
            if nt is not None and (nt < t or (nt == t and kind > _Kind.WRITE)):
                # Writes come before this item: the ones due before it and before ksmd's
                # next batch go as one batch.
                if not self._reach(nt):
                    return  # stopped on the way
                if self._ending and not self._pending_scans:
                    return
                self._churn(t if kind <= _Kind.WRITE else t + 1)
                self._report_progress()
                continue
            if not self._reach(t):
                return  # stopped on the way
            if self._ending and not self._pending_scans:
                return
            heapq.heappop(self._heap)
            if kind == _Kind.END:
                if not self._pending_scans:
                    return
                self._ending = True
                self._push(max(c.timeout_ns for c in self._pending_scans), _Kind.END, None)
                continue
            self._apply(t, _Kind(kind), item)
            self._report_progress()

    def _reach(self, t_ns: int) -> bool:
        """Advance to *t_ns*, recording full-scan checkpoints reached on the way.

        False if the run is to stop before *t_ns* (then the clock stands where it stopped).
        """
        while self._pending_scans:
            cp = self._pending_scans[0]
            assert cp.full_scans is not None
            if not self._wait_scans(cp.full_scans, t_ns):
                break
            self._pending_scans.pop(0)
            self._checkpoint(cp, self.backend.now_ns(), reached=True)
            self._report_progress()
        return self._advance_to(t_ns) and not self._stopping()

    def _churn(self, limit_ns: int) -> None:
        """Apply, as one batch, the writes due before *limit_ns* and before ksmd's next batch.

        A batch due at the current time runs after the writes due now (as after any
        item due now), before later ones.
        """
        now = self.backend.now_ns()
        wake = self.backend.batch_horizon_ns()
        if wake is not None:
            limit_ns = min(limit_ns, wake if wake > now else now + 1)
        self._write_batch(self.churn.take(limit_ns))

    def _write_batch(self, batch: WriteBatch) -> None:
        if len(batch):
            self._guard(batch.targets[int(batch.which[0])].what,
                        lambda: self.backend.write_batch(batch))

    def _report_progress(self, *, force: bool = False) -> None:
        """Tell the progress display where the run is, at most 20 times a second.

        Reading the counters here must not change what the run records (a progress
        display is on in a terminal only), so full_scans is peeked, not counted.
        """
        if self.progress is None:
            return
        wall = time.monotonic()
        if not force and wall - self._shown < 0.05:
            return
        self._shown = wall
        self.progress(ProgressInfo(self.backend.now_ns() / NS_PER_S if self._base else 0.0,
                                   self.sc.planned_end_ns / NS_PER_S,
                                   self._peek("full_scans"), len(self.checkpoints),
                                   len(self.sc.checkpoints), self._setting_up, self._filled,
                                   self._to_fill))

    def _apply(self, t_ns: int, kind: _Kind, item: object) -> None:
        if kind == _Kind.START:
            assert isinstance(item, ProcessGroup)
            self._guard(f"starting {item.name}", lambda: self._start_group(item))
        elif kind == _Kind.EVENT:
            assert isinstance(item, Event)
            self._guard(f"event[{item.index}] {describe_action(item)}", lambda: self._event(item))
        elif kind == _Kind.CONTROL:
            self._guard("the controller", lambda: self._control(t_ns))
        elif kind == _Kind.WRITE:
            assert isinstance(item, WriteActivity)
            self._start_activity(item)
        elif kind == _Kind.SAMPLE:
            self._sample(t_ns)
            self._push(t_ns + self.sc.sample_interval_ns, _Kind.SAMPLE, None)
        elif kind == _Kind.CHECKPOINT:
            assert isinstance(item, Checkpoint)
            self._checkpoint(item, t_ns, reached=True)
        elif kind == _Kind.SCAN_DEADLINE:
            assert isinstance(item, Checkpoint)
            if item in self._pending_scans:
                self._pending_scans.remove(item)
                self._checkpoint(item, t_ns, reached=False)

    def _guard(self, what: str, action: Callable[[], None]) -> None:
        try:
            action()
        except OSError as e:
            when = format_duration(self.backend.now_ns() / NS_PER_S)
            msg = f"at {when}, {what}: {e}"
            raise RunError(msg) from e

    # --- kernel operations --------------------------------------------------------------
    def _write_knob(self, name: str, value: str, where: str) -> None:
        sysfs = self.kernel.sysfs
        if name not in sysfs:
            msg = f"{where}: knob {name} does not exist on this kernel ({self.backend.describe()})"
            raise RunError(msg)
        if read_knob(sysfs[name]) == read_knob(value):
            return
        try:
            sysfs[name] = value
        except OSError as e:
            hint = (" (the kernel refuses it while KSM pages exist; stop other KSM users or "
                    "write run=2 first)" if name in ("max_page_sharing", "merge_across_nodes")
                    else "")
            msg = f"{where}: writing {name}={value} failed: {e}{hint}"
            raise RunError(msg) from e

    def _control(self, t_ns: int) -> None:
        """Let the controller look at the machine, make its writes, and plan its next time."""
        ctl = self.controller
        assert ctl is not None
        sysfs = self.kernel.sysfs
        resident = sum(pages for group, instances in self.groups.items()
                       for inst in instances if inst.proc is not None
                       for pages in self.pages[group].values())
        view = ControlView(t_ns, {n: self._raw(n) for n in GLOBAL_COUNTERS},
                           {n: read_knob(sysfs[n]) for n in WRITE_ORDER if n in sysfs}, resident)
        action = ctl.act(view)
        writes = dict(action.writes)
        for name in WRITE_ORDER:
            if name in writes:
                self._write_knob(name, writes[name], f"controller {ctl.name}")
        if action.next_ns is not None:
            self._push(max(action.next_ns, t_ns + 1), _Kind.CONTROL, ctl)

    def _start_group(self, g: ProcessGroup) -> None:
        instances: list[_Instance] = []
        for i in range(g.count):
            if self._stopping():
                break  # the group stays as far as it got; the run ends
            proc = self.kernel.spawn()
            name = g.instance_name(i)
            inst = _Instance(name, proc, {})
            if g.merge_any:
                proc.prctl(PR_SET_MEMORY_MERGE, 1)
            for m in g.mappings:
                length = m.pages * PAGE_SIZE
                addr = proc.mmap(length)
                inst.addrs[m.name] = addr
                content, where = self.sc.contents[m.content], f"{g.name}[{i}].{m.name}"
                for n in self.backend.fill(proc, addr, self.content, content, m.pages, where):
                    if self._setting_up:
                        self._filled += n
                        self._report_progress()
                if m.mergeable:
                    proc.madvise(addr, length, MADV_MERGEABLE)
            instances.append(inst)
        self.groups[g.name] = instances
        self.pages[g.name] = {m.name: m.pages for m in g.mappings}

    def _select(self, sel: Selector) -> list[_Instance]:
        group = self.groups[sel.group]
        return [group[i] for i in sel.indices(len(group)) if group[i].proc is not None]

    def _span(self, group: str, mapping: str, region: Region | None) -> tuple[int, int]:
        """(first page, pages) of *region* of *mapping*."""
        if region is None:
            return 0, self.pages[group][mapping]
        return region.first, region.pages

    def _event(self, e: Event) -> None:
        if isinstance(e, KnobsEvent):
            for name, value in e.knobs:
                self._write_knob(name, value, f"event[{e.index}]")
            return
        if isinstance(e, WriteEvent):
            first, n = self._span(e.process.group, e.mapping, e.region)
            targets = [WriteTarget(inst.proc, inst.addrs[e.mapping], e.data, e.nbytes,
                                   f"event[{e.index}] {describe_action(e)}")
                       for inst in self._select(e.process)]
            for batch in event_batches(self.sc.seed, e, targets, first, n,
                                       self.backend.wants_bytes(e.nbytes)):
                self.backend.write_batch(batch)
        elif isinstance(e, MadviseEvent):
            first, n = self._span(e.process.group, e.mapping, e.region)
            for inst in self._select(e.process):
                assert inst.proc is not None
                inst.proc.madvise(inst.addrs[e.mapping] + first * PAGE_SIZE, n * PAGE_SIZE,
                                  _ADVICE[e.advice])
        elif isinstance(e, PrctlEvent):
            for inst in self._select(e.process):
                assert inst.proc is not None
                inst.proc.prctl(PR_SET_MEMORY_MERGE, int(e.merge_any))
        elif isinstance(e, ExitEvent):
            for inst in self._select(e.process):
                assert inst.proc is not None
                inst.proc.exit()
                self.churn.forget(inst.proc)  # its writes stop
                inst.proc = None
        elif isinstance(e, ForkEvent):
            children: list[_Instance] = []
            parents = self._select(e.process)
            size = len(parents) * e.count
            for inst in parents:
                assert inst.proc is not None
                for _ in range(e.count):
                    i = len(children)
                    name = e.child if size == 1 else f"{e.child}[{i}]"
                    children.append(_Instance(name, inst.proc.fork(), dict(inst.addrs)))
            self.groups[e.child] = children
            self.pages[e.child] = dict(self.pages[e.process.group])

    def _start_activity(self, a: WriteActivity) -> None:
        group = self.groups.get(a.process.group, [])
        first, n = self._span(a.process.group, a.mapping, a.region)
        end = a.stop_ns if a.stop_ns is not None else self.sc.duration_ns
        for i in a.process.indices(len(group)):
            inst = group[i]
            if inst.proc is None:
                continue
            target = WriteTarget(inst.proc, inst.addrs[a.mapping], a.data, a.nbytes,
                                 f"write activity[{a.index}]")
            self.churn.start(a, a.process.group, i, target, first, n, end)

    # --- observation ---------------------------------------------------------------------
    def _raw(self, name: str) -> int:
        try:
            return int(self.kernel.sysfs[name])
        except (OSError, KeyError, ValueError):
            return 0

    def _peek(self, name: str) -> int:
        """What :meth:`_counter` would answer, without recording anything."""
        raw = self._raw(name)
        if name not in DELTA_COUNTERS or name not in self._last:
            return raw
        if raw < self._last[name]:
            return self._acc[name] + self._last[name] - self._base[name] + raw
        return self._acc[name] + raw - self._base[name]

    def _counter(self, name: str) -> int:
        """A global counter; the delta ones counted from the start (surviving run=2 resets)."""
        raw = self._raw(name)
        if name not in DELTA_COUNTERS:
            return raw
        if raw < self._last[name]:  # reset by run=2: keep what was counted before
            self._acc[name] += self._last[name] - self._base[name]
            self._base[name] = 0
        self._last[name] = raw
        return self._acc[name] + raw - self._base[name]

    def _counters(self) -> dict[str, int]:
        return {name: self._counter(name) for name in GLOBAL_COUNTERS}

    def _cpu_s(self) -> float | None:
        cpu = self.backend.ksmd_cpu_ns()
        return None if cpu is None else cpu / NS_PER_S

    def _sample(self, t_ns: int, *, final: bool = False) -> None:
        if final and self.timeline and self.timeline[-1][0] >= t_ns / NS_PER_S:
            return
        c = self._counters()
        cpu = self._cpu_s()
        self.timeline.append((t_ns / NS_PER_S, *(float(c[n]) for n in GLOBAL_COUNTERS),
                              float("nan") if cpu is None else cpu))

    def _process_stats(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for group, instances in self.groups.items():
            sums = dict.fromkeys(("alive", *PROCESS_COUNTERS), 0)
            for inst in instances:
                if inst.proc is None:
                    continue
                stat = inst.proc.ksm_stat()
                sums["alive"] += 1
                for n in PROCESS_COUNTERS:
                    sums[n] += int(stat.get(n, 0))
            out[group] = sums
        return out

    def _checkpoint(self, cp: Checkpoint, t_ns: int, *, reached: bool) -> None:
        counters = self._counters()
        procs = self._process_stats()
        checks: list[CheckResult] = []
        for x in cp.expect:
            if x.process is None:
                actual = counters[x.counter]
            else:
                group = self.groups.get(x.process.group, [])
                actual = 0
                for i in x.process.indices(len(group)):
                    proc = group[i].proc
                    if proc is not None:
                        actual += int(proc.ksm_stat().get(x.counter, 0))
            checks.append(CheckResult.of(x, actual))
        when = format_duration(t_ns / NS_PER_S)
        if not reached:
            self.failures.append(
                f"checkpoint '{cp.name}': full_scans reached {counters['full_scans']}, not "
                f"{cp.full_scans}, by its timeout at {when}")
        for r in checks:
            if not r.ok:
                self.failures.append(f"checkpoint '{cp.name}' at {when}: expected {r.check}, "
                                     f"got {r.actual}")
        self.checkpoints.append(CheckpointResult(cp.name, t_ns / NS_PER_S, reached, counters,
                                                 self._cpu_s(), procs, tuple(checks)))
        if not self.timeline or self.timeline[-1][0] < t_ns / NS_PER_S:
            self._sample(t_ns)


def run_scenario(sc: Scenario, backend: Backend,
                 progress: Callable[[ProgressInfo], None] | None = None,
                 stop: StopCheck | None = None,
                 controller: Controller | None = None) -> RunResult:
    """Run *sc* on *backend* (which the caller closes) and return the result.

    *stop*, if given, is asked at safe points; once it returns a reason the run
    ends there and the result is marked interrupted (see the module's doc).
    *controller*, if given, rewrites knobs during the run from what it sees
    (:mod:`ksmlab.scenario.control`).

    Raises:
        RunError: a kernel call failed (the message says when and which).
    """
    return Runner(sc, backend, progress, stop, controller).run()


assert set(KNOBS) == set(WRITE_ORDER)

__all__ = ["STEP_WALL_S", "ProgressInfo", "RunError", "Runner", "StopCheck", "run_scenario"]
