# SPDX-License-Identifier: GPL-2.0-only
"""What differs between the backends of a differential run, and the real kernel's quiescence protocol.

A driver gives the runner knob access, exact ``wait_full_scans`` and
``cow_ksm`` on one backend: :class:`_ModelDriver` on SimKernel and the bulk engine,
:class:`_LinuxDriver` on the real kernel, where ksmd is run only inside
``wait_full_scans`` and for exactly the number of full scans asked, so that
every point of a program is quiescent (:class:`QuiescenceError` if ksmd
overshoots).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from ksmlab.backends.linux_knobs import boot_knobs
from ksmlab.errors import KsmSimError, ScanStalledError
from ksmlab.kernel import SimKernel
from ksmlab.ksm.sysfs import ParseError, kstrtouint, store_text

if TYPE_CHECKING:
    from ksmlab.api import Kernel
    from ksmlab.backends.linux import LinuxKernel
    from ksmlab.bulk import BulkKernel

__all__ = ["DEFAULT_GAP_MS", "QuiescenceError"]

DEFAULT_GAP_MS = 20
"""ksmd's sleep between batches while the real kernel scans (see :class:`_LinuxDriver`)."""


class QuiescenceError(KsmSimError, RuntimeError):
    """The real kernel's ksmd did more full scans than asked (the run is not comparable)."""


class _Driver(Protocol):
    """What differs between the backends: knob access, waiting for scans, cow_ksm."""

    @property
    def kernel(self) -> Kernel: ...
    def read(self, name: str) -> str: ...
    def write(self, name: str, value: str) -> None: ...
    def wait(self, n: int, index: int) -> int: ...
    def cow_ksm(self) -> int: ...
    def check_quiet(self) -> None: ...


# --------------------------------------------------------------------------------------
# Backends


class _ModelDriver:
    """A virtual machine (SimKernel or the bulk engine): knobs are its own, and ksmd runs
    only when waited for anyway."""

    def __init__(self, k: SimKernel | BulkKernel) -> None:
        self._k = k

    @property
    def kernel(self) -> SimKernel | BulkKernel:
        return self._k

    def read(self, name: str) -> str:
        return self._k.sysfs[name]

    def write(self, name: str, value: str) -> None:
        self._k.sysfs[name] = value

    def wait(self, n: int, index: int) -> int:
        before = self._k.ksm.full_scans
        with contextlib.suppress(ScanStalledError):
            self._k.wait_full_scans(n)
        return self._k.ksm.full_scans - before

    def cow_ksm(self) -> int:
        return self._k.cow_ksm

    def check_quiet(self) -> None:
        pass


def _model_defaults() -> list[tuple[str, str]]:
    """The model's knob values at boot but ``run``, in an order the real kernel accepts them."""
    return [(n, v) for n, v in boot_knobs().items() if n != "run"]


class _LinuxDriver:
    """The real kernel, made as deterministic as the model.

    The protocol:

    * At the start: ``run=0``, ``run=2`` (un-merge everything, empty the
      trees, ``full_scans`` = 0), ``run=0``, then every knob set to the
      model's boot value, so both runs start from the same state.
    * ``run`` is virtual.  A program's ``run=1`` is recorded but not written:
      the kernel stays at ``run=0`` (stopped; for ``__ksm_enter`` the same as
      1).  Other values are written for real (``run=2`` un-merges, bad values
      get the kernel's errno).  Reads of ``run`` show the program's value.
    * ``sleep_millisecs`` is virtual too: a program's write is made (for its
      errno) and then the kernel's value is set back to *gap_ms*.
    * ``wait_full_scans(n)``: read ``full_scans``, write ``run=1``, poll until
      ``full_scans`` has grown by *n*, write ``run=0``.  ksmd's batch ends when
      a full scan ends, so it then sleeps *gap_ms* before the next batch; the
      ``run=0`` lands in that sleep and ksmd stops with its cursor between two
      full scans, after exactly *n* of them, as the model does.  The count is
      checked afterwards; more than *n* raises :class:`QuiescenceError`.
    * So ksmd never runs between two calls of the program: every point is
      quiescent and checkpoints may be taken anywhere.
    """

    def __init__(self, k: LinuxKernel, *, gap_ms: int, stall_hints: Sequence[bool] = ()) -> None:
        self._k = k
        self._gap = gap_ms
        self._hints = stall_hints
        s = k.sysfs
        if s["run"] != "0":
            s["run"] = "0"
        s["run"] = "2"
        s["run"] = "0"
        defaults = _model_defaults()
        for name, value in defaults:
            if name in s and _current(s[name]) != value:
                s[name] = value
        self._virtual = {"run": "0", "sleep_millisecs": dict(defaults)["sleep_millisecs"]}
        s["sleep_millisecs"] = str(gap_ms)

    @property
    def kernel(self) -> LinuxKernel:
        return self._k

    def read(self, name: str) -> str:
        if name in self._virtual:
            return self._virtual[name]
        return self._k.sysfs[name]

    def write(self, name: str, value: str) -> None:
        s = self._k.sysfs
        if name == "run":
            text = store_text("run", value) or ""
            try:
                wanted: int | None = kstrtouint(text)
            except ParseError:
                wanted = None
            if wanted == 1:
                self._virtual["run"] = "1"
                return
            s["run"] = value
            if text:
                self._virtual["run"] = s["run"]
        elif name == "sleep_millisecs":
            s[name] = value
            self._virtual[name] = s[name]
            s[name] = str(self._gap)
        else:
            s[name] = value

    def wait(self, n: int, index: int) -> int:
        s = self._k.sysfs
        start = int(s["full_scans"])
        if n <= 0:
            return max(n, 0)
        if self._virtual["run"] != "1":
            return 0
        stalls = index < len(self._hints) and self._hints[index]
        # Where the model stalled, a short wait shows whether the kernel does too.
        limit = 0.05 + 0.005 * n if stalls else 30.0 + n * self._gap / 1000
        target = start + n
        deadline = time.monotonic() + limit
        last, kick = start, 0
        s["run"] = "1"  # the first batch starts at once
        try:
            while (cur := int(s["full_scans"])) < target and time.monotonic() < deadline:
                if cur != last:
                    # A full scan just ended and ksmd sleeps: a new sleep_millisecs
                    # value wakes it for the next one now instead of gap_ms later.
                    last, kick = cur, 1 - kick
                    s["sleep_millisecs"] = str(self._gap + kick)
                time.sleep(0.0002)
        finally:
            s["run"] = "0"
        done = int(s["full_scans"]) - start
        if done > n:
            msg = (f"ksmd did {done} full scans where {n} were asked: the run=0 write came "
                   f"after its {self._gap} ms sleep (machine busy?)")
            raise QuiescenceError(msg)
        return done

    def cow_ksm(self) -> int:
        with open("/proc/vmstat") as f:
            for line in f:
                if line.startswith("cow_ksm "):
                    return int(line.split()[1])
        return 0

    def check_quiet(self) -> None:
        if self._k.sysfs["run"] == "1":
            raise QuiescenceError("ksmd is running at a checkpoint")


def _current(text: str) -> str:
    if "[" in text:
        return text[text.index("[") + 1:text.index("]")]
    return text.strip()


if TYPE_CHECKING:
    def _conforms(d1: _ModelDriver, d2: _LinuxDriver) -> tuple[_Driver, _Driver]:
        """Never called: makes mypy check that the drivers satisfy the _Driver Protocol."""
        return d1, d2
