"""Running ksmd over a loaded snapshot in virtual time, with the pages' rewrites, into a run's result.

ksmd runs as :class:`~ksmlab.ksm.ksmd.Ksmd` always does (a batch of
``pages_to_scan`` pages, then ``sleep_millisecs``), driven batch by batch so
that the pages' rewrites land between batches at their own times.  Rewrites
follow each page's rate (:func:`ksmlab.estimate.plan.rewrite_rates`) as
independent Poisson processes, drawn from a seeded generator, so a run is
reproducible and both engines see the same writes; every rewrite gives the
page new content of its own (the snapshot says that a page changed, not to
what).  All the rewrites due before a batch are applied before it: ksmd
cannot tell them apart from writes at their exact times, since it runs only
at batches.

The timeline has ``ksmlab run``'s columns (:data:`~ksmlab.scenario.result.TIMELINE_COLUMNS`);
full scans, pages scanned and skipped count from the start.  It ends at
``until``, or without one once the saving has settled: at the end of a full
scan (after the third) whose ``pages_sharing + ksm_zero_pages`` differs from
the previous scan's by at most :data:`SETTLED_SHARE` of it (and of the
loaded pages, so rewrites' noise does not keep it going), or at
:data:`MAX_AUTO_SCANS` full scans.  The result is a
:class:`~ksmlab.scenario.result.RunResult`, so every report of ``ksmlab run``
renders it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ksmlab.estimate.load import Machine, write_knobs
from ksmlab.ksm.defaults import NS_PER_MS
from ksmlab.scenario.control import Controller, ControlView
from ksmlab.scenario.knobs import WRITE_ORDER, read_knob
from ksmlab.scenario.model import DELTA_COUNTERS, GLOBAL_COUNTERS, PROCESS_COUNTERS
from ksmlab.scenario.result import CheckpointResult
from ksmlab.scenario.units import NS_PER_S

__all__ = [
    "MAX_AUTO_SCANS",
    "MAX_SAMPLES",
    "SETTLED_SHARE",
    "Outcome",
    "RewriteSchedule",
    "RunProgress",
    "run_machine",
]

SETTLED_SHARE = 0.005
"""Without ``until``: the saving has settled once a full scan changes it by at most this
share of itself (or of this share of a tenth of the loaded pages, whichever is larger)."""
MAX_AUTO_SCANS = 200
"""Without ``until``: stop after this many full scans even if the saving still moves."""
MAX_AUTO_NS = 30 * 86400 * NS_PER_S
"""Without ``until``: stop after 30 days of virtual time."""
MAX_SAMPLES = 4000
"""Samples kept; past it every other one is dropped and the period doubles."""
CHECKPOINT_SCANS = (1, 2, 3)
"""Full scans at whose end a checkpoint is recorded (the table's rows)."""
_STOP_EVERY_S = 0.05

Ints = npt.NDArray[np.int64]
StopCheck = Callable[[], str | None]


@dataclass(frozen=True, slots=True)
class RunProgress:
    """Where a run is: virtual seconds reached, the end if known, full scans done."""

    now_s: float
    until_s: float | None
    full_scans: int


class RewriteSchedule:
    """The rewrites of the pages, in time order, drawn a block of virtual time at a time.

    Each page with a rate gets Poisson(rate x block) writes at uniform times
    in each block; the blocks' length depends only on the total rate, so the
    draws (and the run) are the same on every engine for one seed.
    """

    def __init__(self, rates: npt.NDArray[np.float64], seed: int) -> None:
        self.writers = np.flatnonzero(rates > 0).astype(np.int64)
        self.rates = rates[self.writers]
        total = float(self.rates.sum())
        self.total_rate = total
        # About 100k writes a block, between 1 ms and 10 s of virtual time.
        self.block_ns = int(min(10 * NS_PER_S, max(NS_PER_MS, 1e5 / total * NS_PER_S))) \
            if total > 0 else 0
        self._rng = np.random.default_rng(seed)
        self._block_end = 0
        self._times: npt.NDArray[np.int64] = np.zeros(0, np.int64)
        self._pages: Ints = np.zeros(0, np.int64)
        self._pos = 0

    def _next_block(self) -> None:
        start, self._block_end = self._block_end, self._block_end + self.block_ns
        counts = self._rng.poisson(self.rates * (self.block_ns / NS_PER_S))
        pages = np.repeat(self.writers, counts)
        times = start + (self._rng.random(pages.size) * self.block_ns).astype(np.int64)
        order = np.argsort(times, kind="stable")
        self._times, self._pages, self._pos = times[order], pages[order], 0

    def due(self, upto_ns: int) -> Ints:
        """The distinct pages written at times up to *upto_ns* (since the last call), ascending."""
        if not self.writers.size:
            return np.zeros(0, np.int64)
        parts: list[Ints] = []
        while True:
            end = int(np.searchsorted(self._times, upto_ns, "right"))
            parts.append(self._pages[self._pos:end])
            self._pos = end
            if upto_ns < self._block_end:
                break
            self._next_block()
        return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)


@dataclass
class Outcome:
    """What :func:`run_machine` produced."""

    timeline: list[tuple[float, ...]]
    checkpoints: list[CheckpointResult]
    knobs: dict[str, int | str]
    end_s: float
    sample_interval_s: float
    interrupted: str | None
    settled: bool | None
    """Without ``until``: whether the saving settled (False: stopped at the scan or time cap)."""
    rewrites: int


class _Run:
    def __init__(self, m: Machine, until_ns: int | None, sample_ns: int | None, seed: int,
                 progress: Callable[[RunProgress], None] | None, stop: StopCheck | None,
                 controller: Controller | None = None) -> None:
        self.m = m
        self.controller = controller
        self.ksmd_cpu_ns: int | None = None
        self.control_ns: int | None = None
        self.k = m.kernel
        self.ksmd = m.kernel.ksmd
        self.until_ns = until_ns
        self.progress = progress
        self.stop = stop
        self.schedule = RewriteSchedule(m.plan.rate, seed)
        self.timeline: list[tuple[float, ...]] = []
        self.checkpoints: list[CheckpointResult] = []
        self.t0 = 0
        self.cpu0 = 0
        self.base: dict[str, int] = {}
        self.sample_ns = sample_ns or self._auto_sample_ns()
        self.auto_sample = sample_ns is None and until_ns is None
        self.next_sample = 0
        self.interrupted: str | None = None
        self.scan_gross: list[int] = []
        self._last_check = time.monotonic()

    def _auto_sample_ns(self) -> int:
        """1/400 of the run, or 1/25 of a full scan as the knobs make it (a batch is taken as
        its sleep and a millisecond of work: only the sampling depends on this guess)."""
        if self.until_ns is not None:
            return max(NS_PER_MS, self.until_ns // 400)
        sysfs = self.k.sysfs
        per_batch = max(1, int(sysfs["pages_to_scan"]))
        batch_ns = (int(sysfs["sleep_millisecs"]) + 1) * NS_PER_MS
        scan_ns = math.ceil(max(1, len(self.m.plan)) / per_batch) * batch_ns
        return max(NS_PER_MS, scan_ns // 25)

    # --- observation -------------------------------------------------------------------
    def now(self) -> int:
        return self.ksmd.now_ns - self.t0

    def counters(self) -> dict[str, int]:
        sysfs = self.k.sysfs
        out = {}
        for name in GLOBAL_COUNTERS:
            v = int(sysfs[name])
            out[name] = v - self.base[name] if name in DELTA_COUNTERS else v
        return out

    def sample(self) -> dict[str, int]:
        c = self.counters()
        t = self.now() / NS_PER_S
        if self.timeline and self.timeline[-1][0] >= t:
            self.timeline.pop()  # a checkpoint at a sample's time: one row
        cpu = (self.ksmd.cpu_ns - self.cpu0) / NS_PER_S
        self.timeline.append((t, *(float(c[n]) for n in GLOBAL_COUNTERS), cpu))
        if self.auto_sample and len(self.timeline) > MAX_SAMPLES:
            keep = self.timeline[::2]
            if keep[-1] is not self.timeline[-1]:
                keep.append(self.timeline[-1])
            self.timeline = keep
            self.sample_ns *= 2
        return c

    def checkpoint(self, name: str) -> None:
        c = self.sample()
        procs: dict[str, dict[str, int]] = {}  # per command name, as a run's process groups
        for pp, p in zip(self.m.plan.processes, self.m.procs, strict=True):
            sums = procs.setdefault(pp.comm, dict.fromkeys(("alive", *PROCESS_COUNTERS), 0))
            stat = p.ksm_stat()
            sums["alive"] += 1
            for n in PROCESS_COUNTERS:
                sums[n] += int(stat.get(n, 0))
        self.checkpoints.append(CheckpointResult(name, self.now() / NS_PER_S, True, c,
                                                 (self.ksmd.cpu_ns - self.cpu0) / NS_PER_S,
                                                 procs))

    # --- the loop ----------------------------------------------------------------------
    def _stopping(self) -> bool:
        """Report progress and ask the stop callable, about every 50 ms of wall time."""
        if self.stop is None and self.progress is None:
            return False
        now = time.monotonic()
        if now - self._last_check < _STOP_EVERY_S:
            return False
        self._last_check = now
        if self.progress is not None:
            self.progress(RunProgress(self.now() / NS_PER_S,
                                      None if self.until_ns is None else self.until_ns / NS_PER_S,
                                      int(self.k.sysfs["full_scans"]) - self.base["full_scans"]))
        if self.stop is not None:
            self.interrupted = self.stop()
        return self.interrupted is not None

    def _settled(self) -> bool:
        g = self.scan_gross
        if len(g) < max(CHECKPOINT_SCANS) + 1:
            return False
        tol = max(1.0, SETTLED_SHARE * g[-1], SETTLED_SHARE * 0.1 * len(self.m.plan))
        return abs(g[-1] - g[-2]) <= tol

    def run(self) -> Outcome:
        ksmd, sysfs = self.ksmd, self.k.sysfs
        if self.ksmd_cpu_ns is not None:
            # ksmd's CPU since boot, which the scan-time advisor's first step counts; it
            # replaces the re-merge's, work the host's own ksmd had already done.
            ksmd.cpu_ns = self.ksmd_cpu_ns
        sysfs["run"] = "1"
        self.t0, self.cpu0 = ksmd.now_ns, ksmd.cpu_ns
        self.base = {n: int(sysfs[n]) for n in DELTA_COUNTERS}
        knobs = {n: read_knob(sysfs[n]) for n in WRITE_ORDER if n in sysfs}
        self.sample()
        self.next_sample = self.sample_ns
        end = self.until_ns if self.until_ns is not None else MAX_AUTO_NS
        scans = 0
        settled: bool | None = None if self.until_ns is not None else False
        if self.controller is not None:
            self.control_ns = self.controller.first_ns()
        while not self._stopping():
            wake = ksmd.next_wake()
            wake_rel = None if wake is None else wake - self.t0
            target = min(self.next_sample, end)
            if self.control_ns is not None and self.control_ns <= target and (
                    wake_rel is None or self.control_ns <= wake_rel):
                self._control(self.control_ns)  # before a batch due at the same time
                continue
            if wake_rel is not None and wake_rel <= target:
                self._write(wake_rel)
                ksmd.scan_thread_once()
                done = int(sysfs["full_scans"]) - self.base["full_scans"]
                if done > scans:
                    # A full scan ends with the batch that completed it (as wait_full_scans).
                    ksmd.now_ns = max(ksmd.now_ns, ksmd.busy_until)
                    scans = done
                    c = self.counters()
                    self.scan_gross.append(c["pages_sharing"] + c["ksm_zero_pages"])
                    if scans in CHECKPOINT_SCANS:
                        self.checkpoint(f"full scan {scans}")
                    if self.until_ns is None and (self._settled() or scans >= MAX_AUTO_SCANS):
                        settled = self._settled()
                        break
                continue
            if wake_rel is None and self.until_ns is None:
                break  # ksmd has nothing to scan: nothing will change
            self._write(target)
            if target + self.t0 > ksmd.now_ns:  # a batch's CPU time may have run past it
                ksmd.advance((target + self.t0 - ksmd.now_ns) / NS_PER_MS)
            if target >= end:
                break
            self.sample()
            self.next_sample += self.sample_ns
        if not self.checkpoints or self.checkpoints[-1].time_s < self.now() / NS_PER_S:
            self.checkpoint("end" if self.interrupted is None else f"stopped ({self.interrupted})")
        return Outcome(self.timeline, self.checkpoints, knobs, self.now() / NS_PER_S,
                       self.sample_ns / NS_PER_S, self.interrupted, settled, self.m.rewrites)

    def _control(self, at_ns: int) -> None:
        """The controller's turn at *at_ns* (as in the scenario runner): it sees the
        counters, the knobs and the loaded pages, and its writes are made now."""
        ctl = self.controller
        assert ctl is not None
        self._write(at_ns)
        if at_ns + self.t0 > self.ksmd.now_ns:
            self.ksmd.advance((at_ns + self.t0 - self.ksmd.now_ns) / NS_PER_MS)
        sysfs = self.k.sysfs
        view = ControlView(self.now(), {n: int(sysfs[n]) for n in GLOBAL_COUNTERS},
                           {n: read_knob(sysfs[n]) for n in WRITE_ORDER if n in sysfs},
                           len(self.m.plan))
        action = ctl.act(view)
        writes = dict(action.writes)
        if "run" in writes:
            run = writes.pop("run")
            write_knobs(self.k, writes)
            if sysfs["run"] != run:
                sysfs["run"] = run
        else:
            write_knobs(self.k, writes)
        self.control_ns = None if action.next_ns is None else max(action.next_ns, at_ns + 1)

    def _write(self, upto_rel_ns: int) -> None:
        idx = self.schedule.due(upto_rel_ns)
        if idx.size:
            self.m.rewrite(idx)


def run_machine(m: Machine, *, until_ns: int | None, sample_ns: int | None = None, seed: int = 0,
                progress: Callable[[RunProgress], None] | None = None,
                stop: StopCheck | None = None, controller: Controller | None = None,
                ksmd_cpu_ns: int | None = None) -> Outcome:
    """Start ksmd (``run=1``) on *m* and run it in virtual time (see the module doc).

    Args:
        until_ns: where to stop (virtual ns after the start); None: once the saving settled.
        sample_ns: the timeline's period; None: 1/400 of *until_ns*, or without it 1/25 of
            an estimated full scan (halved in resolution past :data:`MAX_SAMPLES` samples).
        seed: the rewrites' random draws.
        progress: called about every 50 ms of wall time.
        stop: asked as often; a reason ends the run there (``interrupted``).
        controller: rewrites knobs during the run (:mod:`ksmlab.scenario.control`;
            ``ksmlab tune``'s model of ksmtuned), seeing the loaded pages as resident.
        ksmd_cpu_ns: ksmd's CPU time since boot at the start (the scan-time advisor's
            first step counts it); None: what the machine's ksmd has used so far.
    """
    run = _Run(m, until_ns, sample_ns, seed, progress, stop, controller)
    run.ksmd_cpu_ns = ksmd_cpu_ns
    return run.run()
