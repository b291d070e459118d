"""The real kernel behind the :mod:`ksmlab.api` interface.

:class:`LinuxKernel` satisfies :class:`ksmlab.api.Kernel` by driving
``/sys/kernel/mm/ksm`` and real processes.  :class:`LinuxProcess` satisfies
:class:`ksmlab.api.Process`: each one is a small C helper (``linux_helper.c``,
compiled on first use) that runs ``mmap``/``munmap``/``mprotect``/``madvise``/
``prctl``/``fork``/``execve`` on request and answers with the result or
``-errno``.  Memory is written from this process with ``process_vm_writev``
(which respects protections) and read through ``/proc/PID/mem``, after a
check of the range against ``/proc/PID/maps``; ``force=True`` writes through
``/proc/PID/mem`` too (like ptrace).

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

This module holds :class:`LinuxKernel`, a thin facade: the session behind it
owns everything that lasts as long as it (lock, saved knobs, signals, the
processes).  The parts live next to it, one concept each, and every public
name is re-exported from here:

* :mod:`ksmlab.backends.linux_session`: :class:`~ksmlab.backends.linux_session.LinuxSession`,
  the lock, the saved knobs and their restore on close, the "ksmd ran" note,
  the signal handling and the process registry; :class:`KsmRestoreError`;
* :mod:`ksmlab.backends.linux_availability`: :func:`linux_ksm_unavailable_reason`,
  :class:`KsmUnavailableError`;
* :mod:`ksmlab.backends.linux_signals`: SIGINT/SIGTERM during a session;
* :mod:`ksmlab.backends.linux_lock`: the machine-wide lock between sessions, its note;
* :mod:`ksmlab.backends.linux_knobs`: reading knobs, and putting a saved set back safely;
* :mod:`ksmlab.backends.linux_repair`: repairing what a session killed by SIGKILL left;
* :mod:`ksmlab.backends.linux_sysfs`: :class:`LinuxSysfs` (``/sys/kernel/mm/ksm``);
* :mod:`ksmlab.backends.linux_process`: :class:`LinuxProcess` (a helper process);
* :mod:`ksmlab.backends.linux_memory`: reading and writing a helper's memory;
* :mod:`ksmlab.backends.linux_helper`: building and starting the C helper, its protocol;
* :mod:`ksmlab.backends.linux_procfs`: the ``/proc/PID/{maps,smaps,ksm_stat}`` parsers;
* :mod:`ksmlab.backends.linux_doctor`: ``ksmlab doctor`` (no session).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final, Self

from ksmlab import argcheck
from ksmlab.backends.linux_availability import KsmUnavailableError, linux_ksm_unavailable_reason
from ksmlab.backends.linux_helper import (
    HelperBuildError,
    build_helper,
    helper_unavailable_reason,
    start_helper,
)
from ksmlab.backends.linux_knobs import KSM_SYSFS_DIR
from ksmlab.backends.linux_lock import KsmLockTimeoutError, default_lock_path
from ksmlab.backends.linux_process import LinuxProcess, online_nodes
from ksmlab.backends.linux_procfs import MapsEntry, parse_ksm_stat, parse_maps, parse_smaps
from ksmlab.backends.linux_session import DEFAULT_LOCK_TIMEOUT, KsmRestoreError, LinuxSession
from ksmlab.backends.linux_sysfs import LinuxSysfs
from ksmlab.errors import ScanStalledError

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

DEFAULT_SCAN_TIMEOUT: Final = 60.0
"""Seconds :meth:`LinuxKernel.wait_full_scans` waits when no timeout is given."""

_POLL_INTERVAL: Final = 0.001


# --------------------------------------------------------------------------------------
# The kernel


class LinuxKernel:
    """The real kernel's KSM behind the :class:`ksmlab.api.Kernel` interface.

    Construction checks that KSM is usable, takes the global lock, saves every
    writable knob and (in the main thread) turns SIGINT/SIGTERM into
    exceptions; :meth:`close` (or leaving the ``with`` block, also by an
    exception or a signal) undoes all of it.  All of that is the
    :class:`~ksmlab.backends.linux_session.LinuxSession` behind this object;
    the kernel adds the :class:`ksmlab.api.Kernel` operations on top.

    Args:
        lock_path: the lock file (default :func:`default_lock_path`).
        lock_timeout: seconds to wait for another session to release the lock.
        handle_signals: install the SIGINT/SIGTERM handlers (main thread only).

    Raises:
        KsmUnavailableError: KSM is absent or cannot be written here.
        KsmLockTimeoutError: another session kept the lock past *lock_timeout*.
        KsmRestoreError: a dead session's knobs could not be put back (see
            docs/linux-backend.md); nothing was started.
        RuntimeError: a LinuxKernel is already open in this process.
    """

    def __init__(self, *, lock_path: str | None = None,
                 lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
                 handle_signals: bool = True) -> None:
        self._session = LinuxSession(lock_path=lock_path, lock_timeout=lock_timeout,
                                     handle_signals=handle_signals)

    # --- state -----------------------------------------------------------------------

    @property
    def lock_path(self) -> str:
        """The lock file this kernel holds while open."""
        return self._session.lock_path

    @property
    def saved_knobs(self) -> dict[str, str]:
        """The knob values saved on entry (``advisor_mode`` as its bare value)."""
        return self._session.saved_knobs

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run."""
        return self._session.closed

    @property
    def sysfs(self) -> LinuxSysfs:
        """The real ``/sys/kernel/mm/ksm`` (writes refused once closed)."""
        return self._session.sysfs

    # --- api.Kernel ------------------------------------------------------------------

    def spawn(self) -> LinuxProcess:
        """Start a new helper process and return its handle."""
        session = self._session
        session.check_open()
        sock, pid, stub = start_helper(session.register_stub)
        try:
            proc = LinuxProcess(session, sock, pid, stub)
        except BaseException:
            sock.close()  # the helper exits on EOF
            raise
        session.register(proc)
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
        self._session.check_open()
        limit = DEFAULT_SCAN_TIMEOUT if timeout is None else timeout
        sysfs = self.sysfs
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

    def reset_knobs(self, target: Mapping[str, str]) -> None:
        """Write the knobs in *target* (values as written, e.g. ``advisor_mode="none"``).

        Uses the same safe order as the restore on close: run=2 first if ksmd
        is running (or ran in this session), advisor knobs before
        pages_to_scan, knobs that need no KSM pages last, then run.  Unlike
        the restore on close, ``run`` ends exactly at ``target["run"]``.
        Raises KsmRestoreError naming every knob that could not be written.
        """
        self._session.reset_knobs(target)

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
        self._session.close()


if TYPE_CHECKING:
    def _conforms(k: LinuxKernel, p: LinuxProcess, s: LinuxSysfs) -> tuple[Kernel, Process, Sysfs]:
        """Never called: makes mypy check that the classes satisfy the api Protocols."""
        return k, p, s
