"""ksmd on the virtual clock, for every engine (``ksm_scan_thread``).

Nothing in ksmlab reads the wall clock.  User calls happen at the current
virtual time and take none.  ksmd is a kernel thread on the virtual clock: it
runs a batch of ``pages_to_scan`` pages (``ksm_do_scan``), which costs ksmd CPU
time according to the cost model and moves the clock by as much (times the
clock's run stretch), then sleeps as the kernel sleeps: a timeout of
``msecs_to_jiffies(sleep_millisecs)`` jiffies whose timer fires on a tick
(:mod:`ksmlab.ksm.jiffies`), plus a scheduling delay before ksmd runs.  It
waits, without a clock of its own, while ``ksmd_should_run`` is false
(run != 1, or no mm registered).  Like the kernel, it has two wait queues:
a write of ``run=1`` and the first mm registering wake it from that wait at
once (``ksm_thread_wait``), and a write of a *new* ``sleep_millisecs`` cuts
its timed sleep short (``ksm_iter_wait``); neither wakes the other wait.
:meth:`Ksmd.advance` and :meth:`Ksmd.wait_full_scans` move the clock and let
ksmd run.

An engine plugs in through :class:`KsmdEngine`: its tunables, ``full_scans``,
whether an mm is registered, the :class:`~ksmlab.ksm.cost.KsmdWork` it counts
its steps in, and one batch.  SimKernel's :class:`~ksmlab.ksm.scan.KsmScanner`
(the core of its :class:`~ksmlab.ksm.interface.Ksm`) and the bulk engine's
:class:`~ksmlab.bulk.engine.BulkKsm` both satisfy it, so both run on this one
ksmd, with the same clock and the same virtual time stamps.

The cost model (:mod:`ksmlab.ksm.cost`, fitted to the real ksmd by
``ksmlab calibrate``) matters only for timing (virtual time, ksmd's CPU
time, the advisor's CPU estimate), never for which pages merge.
"""

from __future__ import annotations

from typing import Protocol

from ksmlab import argcheck
from ksmlab.constants import KSM_RUN_MERGE
from ksmlab.errors import ScanStalledError
from ksmlab.ksm.cost import KsmdCost, KsmdMeter, KsmdWork, default_cost
from ksmlab.ksm.defaults import NS_PER_MS


class KsmdEngine(Protocol):
    """What ksmd needs of an engine's KSM state: the knobs it reads, and one batch."""

    @property
    def run(self) -> int:
        """The ``run`` knob (KSM_RUN_* bits)."""
        ...

    @property
    def pages_to_scan(self) -> int:
        """Pages per batch."""
        ...

    @property
    def sleep_millisecs(self) -> int:
        """Sleep between batches."""
        ...

    @property
    def full_scans(self) -> int:
        """Completed full scans."""
        ...

    @property
    def work(self) -> KsmdWork:
        """Where a batch counts its steps (cleared by ksmd before each batch)."""
        ...

    def list_empty(self) -> bool:
        """No mm is registered (ksmd's mm list holds only its head)."""
        ...

    def ksm_do_scan(self, scan_npages: int, /) -> int:
        """One batch of up to *scan_npages* pages (``ksm_do_scan``); returns the pages scanned."""
        ...


def ksmd_should_run(engine: KsmdEngine) -> bool:
    """``ksmd_should_run``: run has the MERGE bit and some mm is registered."""
    return bool(engine.run & KSM_RUN_MERGE) and not engine.list_empty()


def stall_reason(engine: KsmdEngine) -> str:
    """Why ksmd cannot make ``full_scans`` grow, as a phrase; "" if it can."""
    if engine.run != 1:
        return f"run={engine.run} (write run=1 to start ksmd)"
    if engine.list_empty():
        return "no process has registered mergeable memory, so ksmd sleeps"
    if engine.pages_to_scan == 0:
        return "pages_to_scan=0, so ksmd scans nothing"
    return ""


class Ksmd:
    """The ksmd kthread of one machine (``ksm_scan_thread``), and the machine's virtual clock.

    Attributes:
        engine: the KSM state ksmd scans.
        cost: the cost model (:func:`~ksmlab.ksm.cost.default_cost` unless given).
        meter: turns each batch's work into CPU time; its ``total`` is all of ksmd's work.
        now_ns: virtual time, in nanoseconds since boot.
        busy_until: when ksmd's last batch ends.  Model choice: a batch's effects
            appear at its start (it is atomic), but it takes its time: its sleep
            starts at its end, and the clock can stop while it runs (``advance``
            ends at its target even inside a batch).
        cpu_ns: CPU time ksmd has used, by the cost model.
        batches: batches run so far (a batch that scans nothing can still free items).
        timer_wakes: timed sleeps that ended by their timer (numbers the scheduling delays).
        wake_ns: when ksmd runs its next batch if ``ksmd_should_run`` holds then: the
            end of its timed sleep, or now once woken; None while it waits on
            ``ksm_thread_wait`` (it then runs when woken, or as soon as the
            condition holds).
        sleep_ms: the ``sleep_millisecs`` ksmd read for its current sleep.
        absent: why this machine has no ksmd at all (CONFIG_KSM=n), or "".
    """

    def __init__(self, engine: KsmdEngine, cost: KsmdCost | None = None, *,
                 absent: str = "") -> None:
        self.engine = engine
        self.cost = default_cost() if cost is None else cost
        self.meter = KsmdMeter(self.cost)
        self.now_ns = 0
        self.busy_until = 0
        self.cpu_ns = 0
        self.batches = 0
        self.timer_wakes = 0
        self.wake_ns: int | None = None
        self.sleep_ms = 0
        self.absent = absent

    def now_ms(self) -> float:
        """Virtual time in milliseconds (what the KSM code reads as its jiffies clock)."""
        return self.now_ns / NS_PER_MS

    def wake_up(self) -> None:
        """A wake-up from a knob store or ``__ksm_enter``.

        In a timed sleep only a changed ``sleep_millisecs`` ends it
        (``ksm_iter_wait``'s condition); otherwise ksmd waits on
        ``ksm_thread_wait`` (or its sleep is over) and runs its next batch now.
        """
        if self.wake_ns is not None and self.wake_ns > self.now_ns:
            if self.engine.sleep_millisecs != self.sleep_ms:
                self.wake_ns = self.now_ns
            return
        self.wake_ns = self.now_ns

    def next_wake(self) -> int | None:
        """When ksmd runs its next batch, or None while it has nothing to do.

        After its timed sleep ksmd runs a batch if ``ksmd_should_run`` holds,
        else it blocks on ``ksm_thread_wait`` with no deadline and runs as soon
        as the condition holds (every change that makes it hold wakes ksmd).
        """
        if not ksmd_should_run(self.engine):
            if self.wake_ns is not None and self.wake_ns <= self.now_ns:
                self.wake_ns = None  # the sleep is over: ksmd blocks
            return None
        if self.wake_ns is None:
            self.wake_ns = self.now_ns
        return max(self.wake_ns, self.busy_until)

    def scan_thread_once(self) -> None:
        """One iteration of ``ksm_scan_thread``: a batch at the wake-up time, then the sleep.

        The caller made sure ksmd is due (:meth:`next_wake` is not None).
        """
        assert self.wake_ns is not None
        engine = self.engine
        self.now_ns = start = max(self.now_ns, self.wake_ns, self.busy_until)
        self.batches += 1
        work = engine.work
        work.clear()
        engine.ksm_do_scan(engine.pages_to_scan)
        cost = self.meter.charge(work)
        self.cpu_ns += cost
        clock = self.cost.clock
        self.busy_until = done = start + round(cost * clock.run_stretch)
        if not ksmd_should_run(engine):
            self.wake_ns = None  # the list emptied or run changed: block on ksm_thread_wait
            return
        # The sleep is read after the batch, as the kernel reads it.
        self.sleep_ms = engine.sleep_millisecs
        self.wake_ns = clock.wake_after(done, self.sleep_ms, self.timer_wakes)
        if self.wake_ns > done:
            self.timer_wakes += 1

    def batch(self) -> bool:
        """Run ksmd's next batch at once (after its sleep); False if ksmd waits."""
        if self.next_wake() is None:
            return False
        self.scan_thread_once()
        self.now_ns = self.busy_until
        return True

    def advance(self, ms: float) -> None:
        """Let *ms* milliseconds of virtual time pass, running ksmd as it would.

        *ms* is a finite real >= 0 (see :mod:`ksmlab.argcheck`).
        """
        ms = argcheck.advance_ms(ms)
        target = self.now_ns + round(ms * NS_PER_MS)
        while (wake := self.next_wake()) is not None and wake <= target:
            self.scan_thread_once()
        self.now_ns = max(self.now_ns, target)

    def wait_full_scans(self, n: int = 1, *, timeout: float | None = None) -> None:
        """Advance virtual time until ``full_scans`` has grown by *n*.

        Raises ScanStalledError instead of waiting forever when ksmd is not
        running (run != 1), has no mm to scan, or pages_to_scan is 0 (see
        :func:`stall_reason`); when the machine has no ksmd; and when
        *timeout* (virtual seconds) passes first, the clock then standing at
        the deadline.  On return the clock stands at the end of the batch
        that completed the last full scan.  *n* is an int >= 0, *timeout* None or a finite real
        >= 0 (see :mod:`ksmlab.argcheck`).
        """
        n = argcheck.count("n", n, maximum=argcheck.U64_LIMIT - 1)
        timeout = argcheck.optional_duration("timeout", timeout)
        if self.absent:
            raise ScanStalledError(self.absent)
        engine = self.engine
        target = engine.full_scans + n
        # A deadline past 2**64 ns (585 years) is never reached; min() keeps round() finite.
        deadline = (None if timeout is None
                    else self.now_ns + round(min(timeout * 1e9, 2.0 ** 64)))
        while engine.full_scans < target:
            wake = self.next_wake()
            reason = stall_reason(engine)
            if wake is None or reason:
                msg = (f"full_scans is stuck at {engine.full_scans} (waiting for {target}): "
                       f"{reason or 'ksmd is not running'}")
                raise ScanStalledError(msg)
            if deadline is not None and wake > deadline:
                self.now_ns = deadline
                msg = f"timeout: full_scans reached {engine.full_scans}, not {target}"
                raise ScanStalledError(msg)
            self.scan_thread_once()
        # The last full scan ended with its batch.
        self.now_ns = max(self.now_ns, self.busy_until)


__all__ = ["Ksmd", "KsmdCost", "KsmdEngine", "KsmdWork", "ksmd_should_run", "stall_reason"]
