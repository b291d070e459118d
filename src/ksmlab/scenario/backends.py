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
from typing import Literal, Protocol

from ksmlab.api import Kernel
from ksmlab.kernel import SimKernel
from ksmlab.mm.page import ContentMode
from ksmlab.scenario import host

BackendName = Literal["sim", "linux", "bulk"]
BACKENDS: tuple[BackendName, ...] = ("sim", "linux", "bulk")


class BackendUnavailableError(RuntimeError):
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

    def describe(self) -> str:
        """One line naming the machine (for reports)."""

    def close(self) -> None:
        """Release the kernel (the Linux backend restores the knobs)."""


class SimBackend:
    """The model: deterministic, virtual time."""

    name: BackendName = "sim"

    def __init__(self, content: ContentMode = "bytes") -> None:
        self.sim = SimKernel(trace=False, content=content)
        self.kernel: Kernel = self.sim
        self._t0 = 0
        self._cpu0 = 0

    def start_clock(self) -> None:
        """Time 0 is now."""
        self._t0 = self.sim.now_ns
        self._cpu0 = self.sim.ksmd_cpu_ns

    def now_ns(self) -> int:
        """Virtual nanoseconds since the start."""
        return self.sim.now_ns - self._t0

    def advance_to(self, t_ns: int) -> None:
        """Run the model's ksmd until virtual time *t_ns*."""
        delta = t_ns - self.now_ns()
        if delta > 0:
            self.sim.advance(delta / 1_000_000)

    def ksmd_cpu_ns(self) -> int:
        """The model's estimate of ksmd's CPU time since the start."""
        return self.sim.ksmd_cpu_ns - self._cpu0

    def describe(self) -> str:
        """The model's name (and its content mode, when not the default)."""
        if self.sim.content == "fingerprint":
            return "SimKernel (model, fingerprint content)"
        return "SimKernel (model)"

    def close(self) -> None:
        """Nothing to release."""
        self.sim.close()


class BulkBackend:
    """The bulk engine: the model on numpy columns, deterministic, virtual time."""

    name: BackendName = "bulk"

    def __init__(self) -> None:
        from ksmlab.bulk import BulkKernel

        self.bulk = BulkKernel()
        self.kernel: Kernel = self.bulk  # type: ignore[assignment]
        self._t0 = 0
        self._cpu0 = 0

    def start_clock(self) -> None:
        """Time 0 is now."""
        self._t0 = self.bulk.now_ns
        self._cpu0 = self.bulk.ksmd_cpu_ns

    def now_ns(self) -> int:
        """Virtual nanoseconds since the start."""
        return self.bulk.now_ns - self._t0

    def advance_to(self, t_ns: int) -> None:
        """Run the engine's ksmd until virtual time *t_ns*."""
        delta = t_ns - self.now_ns()
        if delta > 0:
            self.bulk.advance(delta / 1_000_000)

    def ksmd_cpu_ns(self) -> int:
        """The cost model's estimate of ksmd's CPU time since the start (SimKernel's)."""
        return self.bulk.ksmd_cpu_ns - self._cpu0

    def describe(self) -> str:
        """The engine's name."""
        return "BulkKernel (model, bulk engine)"

    def close(self) -> None:
        """Nothing to release."""
        self.bulk.close()


class LinuxBackend:
    """The running kernel's KSM (root, CONFIG_KSM); time is real time."""

    name: BackendName = "linux"

    def __init__(self) -> None:
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
        try:
            self.kernel: Kernel = LinuxKernel()
        except (KsmUnavailableError, KsmLockTimeoutError) as e:
            raise BackendUnavailableError(str(e)) from None
        self._t0 = time.monotonic_ns()
        self._cpu0: int | None = None

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

    def describe(self) -> str:
        """The running kernel's release."""
        import platform

        return f"Linux {platform.release()} ({platform.machine()})"

    def close(self) -> None:
        """Kill the helpers and restore the knobs (see docs/linux-backend.md)."""
        self.kernel.close()


def open_backend(name: str, content: ContentMode = "bytes") -> Backend:
    """A new backend by name (``sim``, ``linux`` or ``bulk``); *content* is SimKernel's content mode.

    Raises:
        BackendUnavailableError: the Linux backend cannot run here.
        ValueError: unknown name, or a content mode for the real kernel.
    """
    if name != "sim" and content != "bytes":
        msg = f"content={content!r} applies to the model (the sim backend) only"
        raise ValueError(msg)
    if name == "sim":
        return SimBackend(content)
    if name == "bulk":
        return BulkBackend()
    if name == "linux":
        return LinuxBackend()
    msg = f"unknown backend {name!r} (expected one of {', '.join(BACKENDS)})"
    raise ValueError(msg)


__all__ = ["BACKENDS", "Backend", "BackendName", "BackendUnavailableError", "BulkBackend",
           "LinuxBackend", "SimBackend", "open_backend"]
