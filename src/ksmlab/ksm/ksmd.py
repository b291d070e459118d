"""ksmd on the virtual clock, for every engine (``ksm_scan_thread``).

Nothing in ksmlab reads the wall clock.  User calls happen at the current
virtual time and take none.  ksmd is a kernel thread on the virtual clock: it
runs a batch of ``pages_to_scan`` pages (``ksm_do_scan``), which costs ksmd CPU
time according to a simple cost model and moves the clock by as much, then
sleeps ``sleep_millisecs``, as ``ksm_scan_thread`` loops.  It waits, without a
clock of its own, while ``ksmd_should_run`` is false (run != 1, or no mm
registered), and is woken at once by a write of ``run=1`` or of
``sleep_millisecs`` and by the first mm registering.  :meth:`Ksmd.advance` and
:meth:`Ksmd.wait_full_scans` move the clock and let ksmd run.

An engine plugs in through :class:`KsmdEngine`: its tunables, ``full_scans``,
whether an mm is registered, and one batch.  SimKernel's
:class:`~ksmlab.ksm.scan.KsmScanner` (the core of its
:class:`~ksmlab.ksm.interface.Ksm`) and the bulk engine's
:class:`~ksmlab.bulk.engine.BulkKsm` both satisfy it, so both run on this one
ksmd, with the same clock and the same virtual time stamps.

Model choice (cost model): a batch costs ``batch_ns`` plus ``page_ns`` per page
handed to cmp_and_merge_page (:class:`KsmdCost`).  The defaults (2 µs and 3 µs,
:mod:`ksmlab.ksm.defaults`) are rough figures for this machine's real ksmd
(about 600k empty batches per second; about 3 µs of CPU per page visit in
1 GiB runs); they matter only for timing (virtual time, the advisor's CPU
estimate), never for which pages merge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ksmlab import argcheck
from ksmlab.constants import KSM_RUN_MERGE
from ksmlab.errors import ScanStalledError
from ksmlab.ksm.defaults import DEFAULT_KSMD_BATCH_NS, DEFAULT_KSMD_PAGE_NS, NS_PER_MS


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

    def list_empty(self) -> bool:
        """No mm is registered (ksmd's mm list holds only its head)."""
        ...

    def ksm_do_scan(self, scan_npages: int, /) -> int:
        """One batch of up to *scan_npages* pages (``ksm_do_scan``); returns the pages scanned."""
        ...


@dataclass(frozen=True, slots=True)
class KsmdCost:
    """ksmd's CPU cost model: what one batch costs (see the module doc).

    Attributes:
        batch_ns: virtual CPU time of a batch, whatever it scans.
        page_ns: virtual CPU time per page the batch scanned.
    """

    batch_ns: int = DEFAULT_KSMD_BATCH_NS
    page_ns: int = DEFAULT_KSMD_PAGE_NS

    @classmethod
    def checked(cls, batch_ns: int, page_ns: int) -> KsmdCost:
        """The cost model of a kernel's ``ksmd_batch_ns`` and ``ksmd_page_ns`` arguments,
        checked as :mod:`ksmlab.argcheck` says (an int, ``batch_ns >= 1``, ``page_ns >= 0``)."""
        return cls(argcheck.count("ksmd_batch_ns", batch_ns, minimum=1),
                   argcheck.count("ksmd_page_ns", page_ns))

    def batch_cost_ns(self, scanned: int) -> int:
        """CPU time of a batch that scanned *scanned* pages."""
        return self.batch_ns + scanned * self.page_ns


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
        cost: the cost model.
        now_ns: virtual time, in nanoseconds since boot.
        cpu_ns: CPU time ksmd has used, by the cost model.
        batches: batches run so far (a batch that scans nothing can still free items).
        wake_ns: when ksmd runs its next batch; None while it waits for
            ``ksmd_should_run`` (it then runs as soon as that holds).
        absent: why this machine has no ksmd at all (CONFIG_KSM=n), or "".
    """

    def __init__(self, engine: KsmdEngine, cost: KsmdCost | None = None, *,
                 absent: str = "") -> None:
        self.engine = engine
        self.cost = KsmdCost() if cost is None else cost
        self.now_ns = 0
        self.cpu_ns = 0
        self.batches = 0
        self.wake_ns: int | None = None
        self.absent = absent

    def now_ms(self) -> float:
        """Virtual time in milliseconds (what the KSM code reads as its jiffies clock)."""
        return self.now_ns / NS_PER_MS

    def wake_up(self) -> None:
        """Make ksmd run its next batch now (``wake_up_interruptible(&ksm_thread_wait)``,
        and the sleep cut short by a new ``sleep_millisecs``)."""
        self.wake_ns = self.now_ns

    def next_wake(self) -> int | None:
        """When ksmd runs next, or None while it waits for ``ksmd_should_run``.

        That wait is ``ksm_scan_thread``'s wait on ``ksm_thread_wait``: it has
        no deadline, and ksmd runs as soon as the condition holds.
        """
        if not ksmd_should_run(self.engine):
            self.wake_ns = None
            return None
        if self.wake_ns is None:
            self.wake_ns = self.now_ns
        return self.wake_ns

    def scan_thread_once(self) -> None:
        """One iteration of ``ksm_scan_thread``: a batch at the wake-up time, then the sleep.

        The caller made sure ksmd is due (:meth:`next_wake` is not None).
        """
        assert self.wake_ns is not None
        engine = self.engine
        self.now_ns = max(self.now_ns, self.wake_ns)
        self.batches += 1
        scanned = engine.ksm_do_scan(engine.pages_to_scan)
        cost = self.cost.batch_cost_ns(scanned)
        self.cpu_ns += cost
        self.now_ns += cost
        # The sleep is read after the batch, as the kernel reads it.
        self.wake_ns = self.now_ns + engine.sleep_millisecs * NS_PER_MS

    def batch(self) -> bool:
        """Run ksmd's next batch at once (after its sleep); False if ksmd waits."""
        if self.next_wake() is None:
            return False
        self.scan_thread_once()
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
        the deadline.  *n* is an int >= 0, *timeout* None or a finite real
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


__all__ = ["Ksmd", "KsmdCost", "KsmdEngine", "ksmd_should_run", "stall_reason"]
