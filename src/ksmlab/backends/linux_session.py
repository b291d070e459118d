"""One ksmlab session on the real kernel's KSM: :class:`LinuxSession`.

KSM state is global to the machine, so everything that must last exactly as
long as a :class:`~ksmlab.backends.linux.LinuxKernel` is owned here, by the
session behind it:

* the machine-wide lock (:mod:`ksmlab.backends.linux_lock`) and the note in it,
  after repairing what a dead session's note names
  (:mod:`ksmlab.backends.linux_repair`);
* the knobs saved on entry and put back on close
  (:mod:`ksmlab.backends.linux_knobs`), and whether ksmd ran meanwhile;
* the open/closed state (writes are refused once closed);
* SIGINT/SIGTERM handling for its life (:mod:`ksmlab.backends.linux_signals`);
* every helper process and reaper stub it started, killed on close.

:class:`~ksmlab.backends.linux_sysfs.LinuxSysfs` and
:class:`~ksmlab.backends.linux_process.LinuxProcess` are given the session and
use only its small public interface: :meth:`LinuxSession.check_open`,
:meth:`LinuxSession.note_run` and :meth:`LinuxSession.register`.
:data:`DEFAULT_LOCK_TIMEOUT` and :class:`KsmRestoreError` are re-exported by
:mod:`ksmlab.backends.linux`.
"""

from __future__ import annotations

import os
import subprocess
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final

from ksmlab.backends.linux_availability import (
    KsmUnavailableError,
    linux_ksm_unavailable_reason,
    probe_run_writable,
)
from ksmlab.backends.linux_knobs import KnobFailure, read_knobs, restore_knobs
from ksmlab.backends.linux_lock import (
    SessionNote,
    _acquire_lock,
    _release_lock,
    _write_note,
    default_lock_path,
)
from ksmlab.backends.linux_process import _EXIT_TIMEOUT
from ksmlab.backends.linux_repair import repair_dead_session
from ksmlab.backends.linux_signals import SessionSignals
from ksmlab.backends.linux_sysfs import LinuxSysfs
from ksmlab.errors import KsmSimError

if TYPE_CHECKING:
    from ksmlab.backends.linux_process import LinuxProcess

__all__ = ["DEFAULT_LOCK_TIMEOUT", "KsmRestoreError", "LinuxSession"]

DEFAULT_LOCK_TIMEOUT: Final = 60.0
"""Seconds :class:`LinuxKernel` waits for another ksmlab session to release the lock."""


class KsmRestoreError(KsmSimError, RuntimeError):
    """Some KSM knobs could not be put back when a :class:`LinuxKernel` closed.

    Attributes:
        failures: ``(knob, value, error)`` for every write that failed.
    """

    def __init__(self, failures: list[KnobFailure], message: str | None = None) -> None:
        self.failures = failures
        what = "; ".join(f"{name}={value!r}: {err}" for name, value, err in failures)
        super().__init__(message or f"could not restore KSM knobs: {what}")


_open_here = 0  # sessions open in this process


class LinuxSession:
    """The lock, the saved knobs, the signal handlers and the processes of one session.

    Construction checks that KSM is usable, takes the global lock, repairs
    what a dead session left, saves every writable knob and (in the main
    thread, with *handle_signals*) turns SIGINT/SIGTERM into exceptions;
    :meth:`close` undoes all of it, in the order
    :meth:`ksmlab.backends.linux.LinuxKernel.close` documents.  The arguments
    and exceptions are those of :class:`~ksmlab.backends.linux.LinuxKernel`,
    which is the only intended creator.
    """

    def __init__(self, *, lock_path: str | None = None,
                 lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
                 handle_signals: bool = True) -> None:
        global _open_here
        reason = linux_ksm_unavailable_reason()
        if reason:
            raise KsmUnavailableError(reason)
        if _open_here:
            # flock conflicts between two descriptors of one process too, so
            # this would only wait for the timeout: say so at once.
            raise RuntimeError(f"a LinuxKernel is already open in this process "
                               f"(pid {os.getpid()}); close it first, KSM state is global")
        self._closed = True  # until fully set up
        self._closing = False
        self._signals = SessionSignals()
        self._procs: list[LinuxProcess] = []
        self._stubs: list[subprocess.Popen[bytes]] = []
        self.lock_path = lock_path or default_lock_path()
        """The lock file this session holds."""
        self._lock_fd, stale = _acquire_lock(self.lock_path, lock_timeout)
        own_note = False  # until then a dead session's note stays in the file
        try:
            self._sysfs = LinuxSysfs(self)
            self._repair_dead_session(stale)
            self._saved = read_knobs()
            self._ran = self._saved.get("run") == "1"
            _write_note(self._lock_fd, SessionNote.for_this_process(self._saved, self._ran))
            own_note = True
            probe_run_writable(self._saved.get("run"))
            if handle_signals:
                self._signals.install()
        except BaseException:
            self._signals.uninstall()
            _release_lock(self._lock_fd, keep_note=not own_note)
            raise
        self._closed = False
        _open_here += 1

    def _repair_dead_session(self, stale: str) -> None:
        # Before anything is saved: a dead session's changes must never be
        # taken for the host's own values.  Warnings point at the code that
        # constructed the LinuxKernel (stacklevel: here, __init__, LinuxKernel).
        if not stale:
            return
        note = SessionNote.parse(stale)
        if note is None:
            warnings.warn(f"ksmlab: the lock file {self.lock_path} held a note ksmlab cannot "
                          f"read ({stale[:200]!r}); replacing it", RuntimeWarning, stacklevel=4)
            return
        if note.saved_knobs is None:
            return  # a holder that changed no knobs
        repair = repair_dead_session(note)
        if repair.failures:
            raise KsmRestoreError(repair.failures, f"ksmlab: {repair.message()}")
        warnings.warn(f"ksmlab: {repair.message()}", RuntimeWarning, stacklevel=4)

    # --- state -----------------------------------------------------------------------

    @property
    def sysfs(self) -> LinuxSysfs:
        """The session's ``/sys/kernel/mm/ksm`` (writes refused once closed)."""
        return self._sysfs

    @property
    def saved_knobs(self) -> dict[str, str]:
        """The knob values saved on entry (``advisor_mode`` as its bare value), a copy."""
        return dict(self._saved)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run."""
        return self._closed

    # --- the interface LinuxSysfs and LinuxProcess use -------------------------------

    def check_open(self) -> None:
        """Raise :class:`RuntimeError` if the session is closed (its knobs are restored)."""
        if self._closed:
            raise RuntimeError("this LinuxKernel is closed; its KSM knobs have been restored")

    def note_run(self) -> None:
        """Note that ksmd ran, if ``run`` reads 1 now (called after every write of ``run``)."""
        if not self._ran and self._sysfs["run"] == "1":
            self._ran = True
            # Should this session die now, the next one must unmerge.
            _write_note(self._lock_fd, SessionNote.for_this_process(self._saved, ran=True))

    def register(self, proc: LinuxProcess) -> None:
        """Kill *proc* when the session closes (every spawned helper and forked child)."""
        self._procs.append(proc)

    def register_stub(self, stub: subprocess.Popen[bytes]) -> None:
        """Wait for *stub*, a helper's reaper and our child, when the session closes."""
        # Reap stubs of helpers that have exited meanwhile.
        self._stubs = [s for s in self._stubs if s.poll() is None]
        self._stubs.append(stub)

    # --- knobs and teardown ----------------------------------------------------------

    def reset_knobs(self, target: Mapping[str, str]) -> None:
        """Write *target* in the safe order (see :meth:`LinuxKernel.reset_knobs`)."""
        self.check_open()
        failures = restore_knobs(target, unmerge=self._ran, end_stopped_as_unmerged=False)
        if failures:
            raise KsmRestoreError(failures)

    def close(self) -> None:
        """Kill the processes, restore the knobs, the signal handlers, then unlock.

        The steps and their order are those of :meth:`LinuxKernel.close`.  A
        second call (also from a signal handler during the first) does nothing.

        Raises:
            KsmRestoreError: some knob could not be restored (all others were).
        """
        global _open_here
        if self._closed or self._closing:
            return
        self._closing = True
        self._signals.hold()
        failures: list[KnobFailure] = []
        try:
            self._kill_processes()
            failures = restore_knobs(self._saved, unmerge=self._ran, end_stopped_as_unmerged=True)
        finally:
            self._closed = True
            _open_here -= 1
            self._signals.uninstall()
            # A failed restore keeps the note, so the next session (or
            # ksmlab doctor --repair) tries again.
            _release_lock(self._lock_fd, keep_note=bool(failures))
            held = self._signals.take_held()
        SessionSignals.deliver(held)
        if failures:
            raise KsmRestoreError(failures)

    def _kill_processes(self) -> None:
        # The one place outside LinuxProcess that may end one: its owner, on close.
        for proc in self._procs:
            proc._kill()
        self._procs.clear()
        for stub in self._stubs:
            # With every helper gone a stub has nothing left to reap and exits.
            try:
                stub.wait(timeout=_EXIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                stub.kill()
                stub.wait()
        self._stubs.clear()
