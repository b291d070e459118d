"""The machines a scenario runs on, behind one small clock interface.

:class:`SimBackend` wraps the model (:class:`~ksmlab.SimKernel`): time is
virtual, ksmd's CPU time is the model's cost estimate.  :class:`BulkBackend`
wraps the bulk engine (:class:`~ksmlab.bulk.BulkKernel`), the same on
numpy columns, for big hosts.  :class:`LinuxBackend`
wraps :class:`~ksmlab.backends.linux.LinuxKernel`: time is the wall clock
(advancing means sleeping while the real ksmd works), ksmd's CPU time is read
from ``/proc/<pid of ksmd>/stat``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal, Protocol

from ksmlab.api import Kernel, Process
from ksmlab.constants import PAGE_SIZE
from ksmlab.errors import KsmSimError
from ksmlab.kernel import SimKernel, SimProcess
from ksmlab.ksm.cost import KsmdCost
from ksmlab.ksm.ksmd import ksmd_should_run
from ksmlab.mm.page import ZERO_FINGERPRINT, ContentMode, fingerprint
from ksmlab.scenario import host
from ksmlab.scenario.churn import WriteBatch
from ksmlab.scenario.content import (
    BYTES_CHUNK,
    ID_CHUNK,
    NEW_CONTENT,
    ZERO_PAGE,
    ContentSource,
    Fill,
)
from ksmlab.scenario.model import Content

if TYPE_CHECKING:
    from ksmlab.bulk import BulkKernel

BackendName = Literal["sim", "linux", "bulk"]
BACKENDS: tuple[BackendName, ...] = ("sim", "linux", "bulk")


class BackendUnavailableError(KsmSimError, RuntimeError):
    """The backend cannot run on this machine (e.g. no KSM, not root); the message says why."""


class Backend(Protocol):
    """A kernel plus its clock, as the scenario runner needs them."""

    name: BackendName
    kernel: Kernel

    def start_clock(self) -> None:
        """Make "now" time 0 of the scenario and remember ksmd's CPU time."""

    def now_ns(self) -> int:
        """Nanoseconds since :meth:`start_clock`."""

    def advance_to(self, t_ns: int) -> None:
        """Let time pass until *t_ns* (no-op if it has already passed)."""

    def ksmd_cpu_ns(self) -> int | None:
        """ksmd's CPU time since :meth:`start_clock`, or None if it cannot be read."""

    def seed_ksmd_cpu(self, cpu_ns: int) -> bool:
        """Start ksmd with *cpu_ns* of CPU time since boot (``ksmd_cpu_at_start``), before
        the setup; False where ksmd has its own (the real kernel), which is then kept."""

    def ksmd_cpu_at_start_ns(self) -> int | None:
        """ksmd's CPU time since boot at :meth:`start_clock` (what the scan-time advisor's
        first step counts), or None if it cannot be read."""

    def fill(self, proc: Process, addr: int, source: ContentSource, content: Content,
             pages: int, instance: str) -> Iterator[int]:
        """Store a new mapping's content (*pages* pages of *content* for *instance*) a
        chunk at a time, yielding the pages stored by each chunk."""

    def write_into(self, proc: Process, addr: int, off: int, chunk: bytes | None) -> None:
        """Write *chunk* at offset *off* of the page at *addr* (a write activity's write);
        *chunk* is None where :meth:`wants_bytes` said the bytes are not needed."""

    def wants_bytes(self, nbytes: int) -> bool:
        """Whether a write of *nbytes* random bytes needs them (else they are not drawn)."""

    def write_batch(self, batch: WriteBatch) -> None:
        """Apply the page writes of *batch*, in order."""

    def batch_horizon_ns(self) -> int | None:
        """Until when writes may be applied together: ksmd's next batch (time since
        :meth:`start_clock`), None while ksmd waits; the real kernel's ksmd may run
        any time, so there it is now (each write goes at its time)."""

    def describe(self) -> str:
        """One line naming the machine (for reports)."""

    def close(self) -> None:
        """Release the kernel (the Linux backend restores the knobs)."""


def _fill_bytes(proc: Process, addr: int, source: ContentSource, content: Content,
                pages: int, instance: str) -> Iterator[int]:
    fill = Fill(source, content, pages, instance)
    for ch in fill.chunks(BYTES_CHUNK):
        proc.write(addr + ch.start * PAGE_SIZE, fill.page_bytes(ch))
        yield len(ch)


def _write_bytes(proc: Process, addr: int, off: int, chunk: bytes | None) -> None:
    assert chunk is not None
    proc.write(addr + off, chunk)


def _wants_bytes(nbytes: int) -> bool:
    return True


def write_each(backend: Backend, batch: WriteBatch) -> None:
    """Apply *batch* write by write (``proc.write``, or the backend's ``write_into``)."""
    targets, page, off = batch.targets, batch.page.tolist(), batch.off.tolist()
    for j, w in enumerate(batch.which.tolist()):
        target = targets[w]
        proc = target.proc
        assert proc is not None
        addr = target.addr + page[j] * PAGE_SIZE
        if target.data == "zero":
            proc.write(addr, ZERO_PAGE)
        else:
            backend.write_into(proc, addr, off[j], batch.chunk(j))


def derived_name(old: bytes, off: int, chunk: bytes) -> bytes:
    """The fingerprint naming a page after a write of *chunk* at *off* into content *old*.

    Model choice, for machines that keep no page bytes: the new content is
    named by what made it, so pages become equal exactly when they got the
    same write on the same content (as their bytes would, short of two
    different writes giving the same bytes).
    """
    return fingerprint(b"ksmlab write" + old + off.to_bytes(2, "little") + chunk)


FRESH_BYTES = 8
"""A write of at least this many random bytes makes, on the bulk engine, a content like no
other (a fresh id).  Two such writes to pages of one content would give equal pages only
if their offsets and their 64 or more random bits were equal: odds of 2**-64 per pair at
most, about 10**-4 for all the pairs of a billion writes to one content, so such writes
are not named by their bytes, which are then not even drawn.  Shorter writes are named by
the content, offset and bytes that made them (:func:`derived_name`), so equal writes to
equal pages still give equal pages."""


class _VirtualBackend:
    """What both models share: virtual time and the cost model's ksmd CPU time."""

    def __init__(self, machine: SimKernel | BulkKernel) -> None:
        self._machine = machine
        self._t0 = 0
        self._cpu0 = 0

    def start_clock(self) -> None:
        """Time 0 is now."""
        self._t0 = self._machine.now_ns
        self._cpu0 = self._machine.ksmd_cpu_ns

    def now_ns(self) -> int:
        """Virtual nanoseconds since the start."""
        return self._machine.now_ns - self._t0

    def advance_to(self, t_ns: int) -> None:
        """Run the model's ksmd until virtual time *t_ns*."""
        delta = t_ns - self.now_ns()
        if delta > 0:
            self._machine.advance(delta / 1_000_000)

    def ksmd_cpu_ns(self) -> int:
        """The model's estimate of ksmd's CPU time since the start."""
        return self._machine.ksmd_cpu_ns - self._cpu0

    def seed_ksmd_cpu(self, cpu_ns: int) -> bool:
        """The model's ksmd has used *cpu_ns* since its virtual boot (a host up for a
        while): the scan-time advisor's first step counts it (docs/scenarios.md)."""
        self._machine.ksmd.cpu_ns = cpu_ns
        return True

    def ksmd_cpu_at_start_ns(self) -> int:
        """The model's ksmd CPU time at the start (the seed, plus nothing: ksmd is
        stopped while the scenario is set up)."""
        return self._cpu0

    def batch_horizon_ns(self) -> int | None:
        """When the model's ksmd runs its next batch (None while it waits)."""
        ksmd = self._machine.ksmd
        if not ksmd_should_run(ksmd.engine):
            return None
        wake = ksmd.now_ns if ksmd.wake_ns is None else ksmd.wake_ns
        return max(wake, ksmd.busy_until) - self._t0  # a batch starts after the last one ends

    def close(self) -> None:
        """Nothing to release."""
        self._machine.close()


class SimBackend(_VirtualBackend):
    """The model: deterministic, virtual time."""

    name: BackendName = "sim"

    def __init__(self, content: ContentMode = "bytes", cost: KsmdCost | None = None) -> None:
        self.sim = SimKernel(trace=False, content=content, cost=cost)
        self.kernel: Kernel = self.sim
        super().__init__(self.sim)

    wants_bytes = staticmethod(_wants_bytes)

    def fill(self, proc: Process, addr: int, source: ContentSource, content: Content,
             pages: int, instance: str) -> Iterator[int]:
        """Page bytes; in fingerprint mode their fingerprints (no image page is built
        twice)."""
        if self.sim.content != "fingerprint":
            yield from _fill_bytes(proc, addr, source, content, pages, instance)
            return
        assert isinstance(proc, SimProcess)
        fill = Fill(source, content, pages, instance)
        for ch in fill.chunks(BYTES_CHUNK):
            fps = [fp for fp in fill.page_fingerprints(ch) if fp is not None]  # all are
            proc.write_fingerprints(addr + ch.start * PAGE_SIZE, fps)
            yield len(ch)

    def write_batch(self, batch: WriteBatch) -> None:
        """Write by write (SimKernel has no faster path)."""
        write_each(self, batch)

    def write_into(self, proc: Process, addr: int, off: int, chunk: bytes | None) -> None:
        """A partial write; in fingerprint mode the page gets a derived name instead."""
        assert chunk is not None
        if self.sim.content != "fingerprint":
            _write_bytes(proc, addr, off, chunk)
            return
        assert isinstance(proc, SimProcess)
        old = proc.fingerprints(addr, PAGE_SIZE)[0] or ZERO_FINGERPRINT
        proc.write_fingerprints(addr, [derived_name(old, off, chunk)])

    def describe(self) -> str:
        """The model's name (and its content mode, when not the default)."""
        if self.sim.content == "fingerprint":
            return "SimKernel (model, fingerprint content)"
        return "SimKernel (model)"


class BulkBackend(_VirtualBackend):
    """The bulk engine: the model on numpy columns, deterministic, virtual time.

    Args:
        vectorize_writes: apply a batch of writes as one array step
            (``BulkKernel.write_pages``); False writes them one by one, which
            gives the same machine (the tests compare the two).
    """

    name: BackendName = "bulk"

    def __init__(self, cost: KsmdCost | None = None, *, vectorize_writes: bool = True) -> None:
        from ksmlab.bulk import BulkKernel  # numpy: only when this backend is used

        self.vectorize_writes = vectorize_writes
        self.bulk = BulkKernel(cost=cost)
        self.kernel: Kernel = self.bulk
        super().__init__(self.bulk)

    def fill(self, proc: Process, addr: int, source: ContentSource, content: Content,
             pages: int, instance: str) -> Iterator[int]:
        """Fill with content ids computed as arrays (never page bytes): a page of the
        instance's own, and each image page, is a fresh content."""
        from ksmlab.bulk import BulkProcess

        assert isinstance(proc, BulkProcess)
        fill = Fill(source, content, pages, instance)
        for ch in fill.chunks(ID_CHUNK):
            proc.write_contents(addr + ch.start * PAGE_SIZE,
                                fill.content_ids(ch, self.bulk.contents))
            yield len(ch)

    @staticmethod
    def wants_bytes(nbytes: int) -> bool:
        """Only writes of fewer than :data:`FRESH_BYTES` bytes are named by their bytes."""
        return nbytes < FRESH_BYTES

    def write_into(self, proc: Process, addr: int, off: int, chunk: bytes | None) -> None:
        """The page gets a new content: a fresh one for a write of at least
        :data:`FRESH_BYTES` bytes, else one named by what made it (:func:`derived_name`)."""
        from ksmlab.bulk import BulkProcess
        from ksmlab.bulk.content import ZERO_CONTENT

        assert isinstance(proc, BulkProcess)
        if chunk is None or len(chunk) >= FRESH_BYTES:
            proc.write_contents(addr, [NEW_CONTENT])
            return
        old = proc.content_ids(addr, PAGE_SIZE)[0] or ZERO_CONTENT
        name = derived_name(old.to_bytes(8, "little"), off, chunk)
        proc.write_contents(addr, [self.bulk.contents.intern(name)])

    def write_batch(self, batch: WriteBatch) -> None:
        """One array step (``BulkKernel.write_pages``), unless a write is named by its
        bytes (then write by write: its name depends on the page's content before it)."""
        import numpy as np

        targets = batch.targets
        if not self.vectorize_writes or any(t.data == "random" and t.nbytes < FRESH_BYTES
                                            for t in targets):
            write_each(self, batch)
            return
        pids = np.array([t.proc.pid if t.proc is not None else -1 for t in targets])[batch.which]
        base = np.array([t.addr for t in targets], dtype=np.int64)[batch.which]
        new = np.array([t.data == "random" for t in targets])[batch.which]
        cids = np.where(new, NEW_CONTENT, 0)  # 0: ZERO_CONTENT, for a zeroing write
        self.bulk.write_pages(pids, base + batch.page * PAGE_SIZE, cids)

    def describe(self) -> str:
        """The engine's name."""
        return "BulkKernel (model, bulk engine)"


class LinuxBackend:
    """The running kernel's KSM (root, CONFIG_KSM); time is real time."""

    name: BackendName = "linux"

    def __init__(self, lock_timeout: float | None = None) -> None:
        """*lock_timeout*: seconds to wait for another session's lock (None: the default)."""
        from ksmlab.backends.linux import (
            KsmLockTimeoutError,
            KsmUnavailableError,
            LinuxKernel,
            helper_unavailable_reason,
            linux_ksm_unavailable_reason,
        )

        reason = linux_ksm_unavailable_reason() or helper_unavailable_reason()
        if reason:
            raise BackendUnavailableError(reason)
        from ksmlab.backends.linux_knobs import boot_knobs

        try:
            kernel = (LinuxKernel() if lock_timeout is None
                      else LinuxKernel(lock_timeout=lock_timeout))
        except (KsmUnavailableError, KsmLockTimeoutError) as e:
            raise BackendUnavailableError(str(e)) from None
        try:
            # A scenario's knobs not given are the kernel's boot values on every
            # backend, so a run does not depend on what the host's owner (or
            # anyone) set; the session puts the host's values back at the end.
            kernel.reset_knobs(boot_knobs())  # run=0 among them: the runner starts ksmd
        except BaseException:
            kernel.close()
            raise
        self.kernel: Kernel = kernel
        self._t0 = time.monotonic_ns()
        self._cpu0: int | None = None

    fill = staticmethod(_fill_bytes)
    write_into = staticmethod(_write_bytes)
    wants_bytes = staticmethod(_wants_bytes)

    def write_batch(self, batch: WriteBatch) -> None:
        """Write by write: the runner hands over only the writes due now."""
        write_each(self, batch)

    def batch_horizon_ns(self) -> int:
        """Now: the real ksmd may run at any moment."""
        return self.now_ns()

    def start_clock(self) -> None:
        """Time 0 is now."""
        self._t0 = time.monotonic_ns()
        self._cpu0 = host.ksmd_cpu_ns()

    def now_ns(self) -> int:
        """Wall-clock nanoseconds since the start."""
        return time.monotonic_ns() - self._t0

    def advance_to(self, t_ns: int) -> None:
        """Sleep until *t_ns*."""
        delta = t_ns - self.now_ns()
        if delta > 0:
            self.kernel.advance(delta / 1_000_000)

    def ksmd_cpu_ns(self) -> int | None:
        """ksmd's utime + stime since the start (clock-tick resolution)."""
        now = host.ksmd_cpu_ns()
        return None if now is None or self._cpu0 is None else now - self._cpu0

    def seed_ksmd_cpu(self, cpu_ns: int) -> bool:
        """Nothing: the real ksmd has used what it has since the machine booted."""
        return False

    def ksmd_cpu_at_start_ns(self) -> int | None:
        """The real ksmd's CPU time since boot, read at the start."""
        return self._cpu0

    def describe(self) -> str:
        """The running kernel's release."""
        import platform

        return f"Linux {platform.release()} ({platform.machine()})"

    def close(self) -> None:
        """Kill the helpers and restore the knobs (see docs/linux-backend.md)."""
        self.kernel.close()


def open_backend(name: str, content: ContentMode = "bytes",
                 cost: KsmdCost | None = None) -> Backend:
    """A new backend by name (``sim``, ``linux`` or ``bulk``); *content* is SimKernel's content
    mode, *cost* the models' ksmd cost model (None: the shipped one).

    Raises:
        BackendUnavailableError: the Linux backend cannot run here.
        ValueError: unknown name, or a content mode or cost model for the real kernel.
    """
    if name != "sim" and content != "bytes":
        msg = f"content={content!r} applies to the model (the sim backend) only"
        raise ValueError(msg)
    if name == "linux" and cost is not None:
        msg = "a ksmd cost model applies to the model's engines only, not to the real kernel"
        raise ValueError(msg)
    if name == "sim":
        return SimBackend(content, cost)
    if name == "bulk":
        return BulkBackend(cost)
    if name == "linux":
        return LinuxBackend()
    msg = f"unknown backend {name!r} (expected one of {', '.join(BACKENDS)})"
    raise ValueError(msg)


__all__ = ["BACKENDS", "Backend", "BackendName", "BackendUnavailableError", "BulkBackend",
           "LinuxBackend", "SimBackend", "open_backend"]
