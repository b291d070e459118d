"""The real kernel behind the :mod:`ksmlab.api` interface.

:class:`LinuxKernel` satisfies :class:`ksmlab.api.Kernel` by driving
``/sys/kernel/mm/ksm`` and real processes.  :class:`LinuxProcess` satisfies
:class:`ksmlab.api.Process`: each one is a small C helper (``linux_helper.c``,
compiled on first use) that runs ``mmap``/``munmap``/``mprotect``/``madvise``/
``prctl``/``fork``/``execve`` on request and answers with the result or
``-errno``.  Memory is read and written from this process with
``process_vm_readv``/``process_vm_writev`` (which respect protections) or
through ``/proc/PID/mem`` (forced, like ptrace).

KSM state is global to the machine, so a :class:`LinuxKernel` holds an
exclusive ``flock`` for its whole life, saves every writable knob on entry and
puts them back on exit (see :meth:`LinuxKernel.close` for the order).  Use it
as a context manager::

    with LinuxKernel() as k:
        p = k.spawn()
        a = p.mmap(10 * PAGE_SIZE)
        p.write(a, b"*" * 10 * PAGE_SIZE)
        p.madvise(a, 10 * PAGE_SIZE, MADV_MERGEABLE)
        k.sysfs["run"] = "1"
        k.wait_full_scans(2)

Errors follow :mod:`os`: a refused system call or sysfs write raises
:class:`OSError` with the kernel's own errno.

This module holds :class:`LinuxKernel` itself; its parts live next to it and
every public name is re-exported from here:

* :mod:`ksmlab.backends.linux_helper`: building the C helper, its command protocol;
* :mod:`ksmlab.backends.linux_process`: :class:`LinuxProcess` (a helper process);
* :mod:`ksmlab.backends.linux_procfs`: the ``/proc/PID/{maps,smaps,ksm_stat}`` parsers;
* :mod:`ksmlab.backends.linux_sysfs`: :class:`LinuxSysfs` (``/sys/kernel/mm/ksm``);
* :mod:`ksmlab.backends.linux_lock`: the machine-wide lock between sessions.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from types import FrameType
from typing import TYPE_CHECKING, Final, Self

from ksmlab import argcheck
from ksmlab.backends.linux_helper import (
    _HELPER_START_TIMEOUT,
    _REPLY,
    HelperBuildError,
    build_helper,
    helper_unavailable_reason,
)
from ksmlab.backends.linux_knobs import (
    KSM_SYSFS_DIR,
    KnobFailure,
    normalise_knob,
    restore_knobs,
)
from ksmlab.backends.linux_lock import (
    KsmLockTimeoutError,
    SessionNote,
    _acquire_lock,
    _release_lock,
    _write_note,
    default_lock_path,
)
from ksmlab.backends.linux_process import _EXIT_TIMEOUT, LinuxProcess, online_nodes
from ksmlab.backends.linux_procfs import MapsEntry, parse_ksm_stat, parse_maps, parse_smaps
from ksmlab.backends.linux_repair import repair_dead_session
from ksmlab.backends.linux_sysfs import LinuxSysfs
from ksmlab.errors import KsmSimError, ProcessExitedError, ScanStalledError

if TYPE_CHECKING:
    from ksmlab.api import Kernel, Process, Sysfs

__all__ = [
    "DEFAULT_LOCK_TIMEOUT",
    "DEFAULT_SCAN_TIMEOUT",
    "KSM_SYSFS_DIR",
    "HelperBuildError",
    "KsmLockTimeoutError",
    "KsmRestoreError",
    "KsmUnavailableError",
    "LinuxKernel",
    "LinuxProcess",
    "LinuxSysfs",
    "MapsEntry",
    "build_helper",
    "default_lock_path",
    "helper_unavailable_reason",
    "linux_ksm_unavailable_reason",
    "online_nodes",
    "parse_ksm_stat",
    "parse_maps",
    "parse_smaps",
]

DEFAULT_LOCK_TIMEOUT: Final = 60.0
"""Seconds :class:`LinuxKernel` waits for another ksmlab session to release the lock."""

DEFAULT_SCAN_TIMEOUT: Final = 60.0
"""Seconds :meth:`LinuxKernel.wait_full_scans` waits when no timeout is given."""

_POLL_INTERVAL: Final = 0.001


# --------------------------------------------------------------------------------------
# Exceptions


class KsmUnavailableError(KsmSimError, RuntimeError):
    """This machine's KSM cannot be driven (absent, not root, read-only sysfs, ...)."""


class KsmRestoreError(KsmSimError, RuntimeError):
    """Some KSM knobs could not be put back when a :class:`LinuxKernel` closed.

    Attributes:
        failures: ``(knob, value, error)`` for every write that failed.
    """

    def __init__(self, failures: list[KnobFailure], message: str | None = None) -> None:
        self.failures = failures
        what = "; ".join(f"{name}={value!r}: {err}" for name, value, err in failures)
        super().__init__(message or f"could not restore KSM knobs: {what}")


# --------------------------------------------------------------------------------------
# Availability


def linux_ksm_unavailable_reason() -> str | None:
    """Say in one sentence why this machine's KSM cannot be driven, or ``None`` if it can.

    Checks the platform, ``/sys/kernel/mm/ksm``, root, a writable sysfs and
    ``/proc/PID/ksm_stat``.  Tests call this to ``pytest.skip(reason)``.
    """
    if not sys.platform.startswith("linux"):
        return f"KSM needs Linux, and this is {sys.platform}."
    if not os.path.isdir(KSM_SYSFS_DIR):
        return f"{KSM_SYSFS_DIR} does not exist, so this kernel was built without CONFIG_KSM."
    if os.geteuid() != 0:
        return f"Driving KSM needs root (writable {KSM_SYSFS_DIR}), and euid is {os.geteuid()}."
    if os.statvfs(KSM_SYSFS_DIR).f_flag & os.ST_RDONLY:
        return (f"sysfs is mounted read-only here (a container?), "
                f"so {KSM_SYSFS_DIR} cannot be written.")
    if not os.access(os.path.join(KSM_SYSFS_DIR, "run"), os.W_OK):
        return f"{KSM_SYSFS_DIR}/run is not writable by this process."
    if not os.path.exists("/proc/self/ksm_stat"):
        return "/proc/PID/ksm_stat is missing, so this kernel is older than Linux 6.1."
    return None


# --------------------------------------------------------------------------------------
# The kernel

_open_here = 0  # LinuxKernel instances open in this process


class LinuxKernel:
    """The real kernel's KSM behind the :class:`ksmlab.api.Kernel` interface.

    Construction checks that KSM is usable, takes the global lock, saves every
    writable knob and (in the main thread) turns SIGINT/SIGTERM into
    exceptions; :meth:`close` (or leaving the ``with`` block, also by an
    exception or a signal) undoes all of it.

    Args:
        lock_path: the lock file (default :func:`default_lock_path`).
        lock_timeout: seconds to wait for another session to release the lock.
        handle_signals: install the SIGINT/SIGTERM handlers (main thread only).

    Raises:
        KsmUnavailableError: KSM is absent or cannot be written here.
        KsmLockTimeoutError: another session kept the lock past *lock_timeout*.
        RuntimeError: a LinuxKernel is already open in this process.
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
        self._signalled = False
        self._deferred: list[int] = []
        self._old_handlers: dict[int, signal.Handlers | Callable[[int, FrameType | None], object]
                                 | int | None] = {}
        self._procs: list[LinuxProcess] = []
        self._stubs: list[subprocess.Popen[bytes]] = []
        self.lock_path = lock_path or default_lock_path()
        self._lock_fd, stale = _acquire_lock(self.lock_path, lock_timeout)
        own_note = False  # until then a dead session's note stays in the file
        try:
            self._sysfs = LinuxSysfs(self)
            self._repair_dead_session(stale)
            self._saved = {n: normalise_knob(n, self._sysfs[n]) for n in self._sysfs.writable()}
            self._ran = self._saved.get("run") == "1"
            _write_note(self._lock_fd, SessionNote.for_this_process(self._saved, self._ran))
            own_note = True
            self._probe_writable()
            if handle_signals and threading.current_thread() is threading.main_thread():
                for sig in (signal.SIGINT, signal.SIGTERM):
                    self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        except BaseException:
            self._restore_handlers()
            _release_lock(self._lock_fd, keep_note=not own_note)
            raise
        self._closed = False
        _open_here += 1

    def _repair_dead_session(self, stale: str) -> None:
        # Before anything is saved: a dead session's changes must never be
        # taken for the host's own values.
        if not stale:
            return
        note = SessionNote.parse(stale)
        if note is None:
            warnings.warn(f"ksmlab: the lock file {self.lock_path} held a note ksmlab cannot "
                          f"read ({stale[:200]!r}); replacing it", RuntimeWarning, stacklevel=3)
            return
        if note.saved_knobs is None:
            return  # a holder that changed no knobs
        repair = repair_dead_session(note)
        if repair.failures:
            raise KsmRestoreError(repair.failures, f"ksmlab: {repair.message()}")
        warnings.warn(f"ksmlab: {repair.message()}", RuntimeWarning, stacklevel=3)

    def _probe_writable(self) -> None:
        # Writing run's current value back is a no-op in the kernel, and it is
        # the one sure test that this sysfs accepts writes (e.g. not a
        # read-only bind mount that statvfs did not reveal).
        run = self._saved.get("run")
        if run is None:
            raise KsmUnavailableError(f"{KSM_SYSFS_DIR}/run is not a writable knob here.")
        try:
            fd = os.open(os.path.join(KSM_SYSFS_DIR, "run"), os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, run.encode())
            finally:
                os.close(fd)
        except OSError as err:
            raise KsmUnavailableError(
                f"{KSM_SYSFS_DIR}/run cannot be written ({err.strerror}), "
                f"so KSM cannot be driven here.") from err

    # --- state -----------------------------------------------------------------------

    @property
    def saved_knobs(self) -> dict[str, str]:
        """The knob values saved on entry (``advisor_mode`` as its bare value)."""
        return dict(self._saved)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run."""
        return self._closed

    @property
    def sysfs(self) -> LinuxSysfs:
        """The real ``/sys/kernel/mm/ksm`` (writes refused once closed)."""
        return self._sysfs

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this LinuxKernel is closed; its KSM knobs have been restored")

    def _note_run(self) -> None:
        if not self._ran and self._sysfs["run"] == "1":
            self._ran = True
            # Should this session die now, the next one must unmerge.
            _write_note(self._lock_fd, SessionNote.for_this_process(self._saved, ran=True))

    def _register(self, proc: LinuxProcess) -> None:
        self._procs.append(proc)

    # --- api.Kernel ------------------------------------------------------------------

    def spawn(self) -> LinuxProcess:
        """Start a new helper process and return its handle."""
        self._check_open()
        exe = build_helper()
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            fd = theirs.fileno()
            # Our child is the helper's "stub" parent, a reaper (see linux_helper.c).
            stub = subprocess.Popen([str(exe), str(fd), "stub"], pass_fds=(fd,),
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        except BaseException:
            mine.close()
            theirs.close()
            raise
        theirs.close()
        self._stubs.append(stub)
        try:
            mine.settimeout(_HELPER_START_TIMEOUT)
            hello = mine.recv(_REPLY.size)
            mine.settimeout(None)
            pid = _REPLY.unpack(hello)[0] if len(hello) == _REPLY.size else -1
            if pid <= 0:
                raise ProcessExitedError(f"helper {exe} did not start ({pid=}, stub exit "
                                         f"status {stub.poll()})")
            proc = LinuxProcess(self, mine, pid, stub)
        except BaseException:
            mine.close()  # the helper, if any, exits on EOF
            raise
        self._register(proc)
        # Reap stubs of helpers that have exited meanwhile.
        self._stubs = [s for s in self._stubs if s.poll() is None]
        return proc

    def wait_full_scans(self, n: int = 1, *, timeout: float | None = None) -> None:
        """Wait until ``full_scans`` has grown by *n* from its value now.

        Polls every millisecond.  Raises
        :class:`~ksmlab.errors.ScanStalledError` at once if ksmd is not
        running (``run`` != 1) or cannot progress (``pages_to_scan`` = 0 with
        the advisor off), or when *timeout* seconds (default
        :data:`DEFAULT_SCAN_TIMEOUT`) pass.  Note that ``full_scans`` also stops
        when no process has a mergeable area (empty mm list).
        """
        n = argcheck.count("n", n, maximum=argcheck.U64_LIMIT - 1)
        timeout = argcheck.optional_duration("timeout", timeout)
        self._check_open()
        limit = DEFAULT_SCAN_TIMEOUT if timeout is None else timeout
        sysfs = self._sysfs
        start = prev = int(sysfs["full_scans"])
        target = start + n
        deadline = time.monotonic() + limit
        while True:
            cur = int(sysfs["full_scans"])
            if cur < prev:
                # run=2 reset the count under us; keep the number still owed.
                target = cur + (target - prev)
            prev = cur
            if cur >= target:
                return
            run = sysfs["run"]
            why = None
            if run != "1":
                why = "ksmd is not running"
            elif sysfs["pages_to_scan"] == "0" and "[none]" in sysfs["advisor_mode"]:
                why = "pages_to_scan is 0, so ksmd scans nothing"
            elif time.monotonic() >= deadline:
                why = f"timed out after {limit:g} s"
            if why:
                raise ScanStalledError(
                    f"waiting for {n} full scan(s): {why} (full_scans={cur}, wanted {target}; "
                    f"run={run}, pages_to_scan={sysfs['pages_to_scan']}, "
                    f"sleep_millisecs={sysfs['sleep_millisecs']})")
            time.sleep(_POLL_INTERVAL)

    def advance(self, ms: float) -> None:
        """Let *ms* milliseconds of real time pass (ksmd keeps running meanwhile)."""
        left = argcheck.advance_ms(ms) / 1000
        while left > 0:  # in steps: time.sleep refuses a count of ns beyond 64 bits
            step = min(left, 86400.0)
            time.sleep(step)
            left -= step

    # --- teardown --------------------------------------------------------------------

    def __enter__(self) -> Self:
        """Return self; everything was set up by the constructor."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close; a restore failure becomes a note on a body exception, not raised over it."""
        body = exc[1] if len(exc) > 1 and isinstance(exc[1], BaseException) else None
        try:
            self.close()
        except KsmRestoreError as err:
            if body is None:
                raise
            body.add_note(str(err))

    def close(self) -> None:
        """Kill the helpers, unmerge, restore every knob, restore signal handlers, unlock.

        Order:

        1. SIGKILL every helper process this kernel started (and wait for each).
        2. If ksmd ran during the session (saved ``run`` was 1, or ``run`` was set
           to 1), write ``run=2``: this un-merges **every** KSM page on the
           machine and resets the counters.
        3. The advisor's parameters, then ``advisor_mode``, then
           ``pages_to_scan`` (skipped if the saved mode is scan-time, where the
           kernel refuses it), then the other knobs, then ``merge_across_nodes``
           and ``max_page_sharing`` (these need no KSM pages: on EBUSY, run=2 is
           written and the write retried).  A knob that already has its saved
           value is not written.
        4. ``run``: a saved 0 stays 2 if step 2 (or a retry) wrote run=2 (the
           project rule: end with run=2 when it merged), otherwise the saved value.
        5. The old signal handlers, then the lock.  A signal that arrived during
           all this is delivered afterwards.

        Raises:
            KsmRestoreError: some knob could not be restored (all others were).
        """
        global _open_here
        if self._closed or self._closing:
            return
        self._closing = True
        failures: list[KnobFailure] = []
        try:
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
            failures = restore_knobs(self._saved, unmerge=self._ran, end_stopped_as_unmerged=True)
        finally:
            self._closed = True
            _open_here -= 1
            self._restore_handlers()
            # A failed restore keeps the note, so the next session (or
            # ksmlab doctor --repair) tries again.
            _release_lock(self._lock_fd, keep_note=bool(failures))
            deferred, self._deferred = self._deferred, []
        for sig in deferred:
            signal.raise_signal(sig)
        if failures:
            raise KsmRestoreError(failures)

    def reset_knobs(self, target: Mapping[str, str]) -> None:
        """Write the knobs in *target* (values as written, e.g. ``advisor_mode="none"``).

        Uses the same safe order as the restore on close: run=2 first if ksmd
        is running (or ran in this session), advisor knobs before
        pages_to_scan, knobs that need no KSM pages last, then run.  Unlike
        the restore on close, ``run`` ends exactly at ``target["run"]``.
        Raises KsmRestoreError naming every knob that could not be written.
        """
        self._check_open()
        failures = restore_knobs(target, unmerge=self._ran, end_stopped_as_unmerged=False)
        if failures:
            raise KsmRestoreError(failures)

    # --- signals ---------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._closing or self._signalled:
            # Finish restoring first.  After the first signal became an
            # exception, later ones are deferred too: raising again while the
            # first unwinds could skip close() altogether.
            self._deferred.append(signum)
            return
        self._signalled = True
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    def _restore_handlers(self) -> None:
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        self._old_handlers.clear()


if TYPE_CHECKING:
    def _conforms(k: LinuxKernel, p: LinuxProcess, s: LinuxSysfs) -> tuple[Kernel, Process, Sysfs]:
        """Never called: makes mypy check that the classes satisfy the api Protocols."""
        return k, p, s
