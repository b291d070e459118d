"""The machine-wide lock that serialises ksmlab sessions driving the real KSM.

A :class:`~ksmlab.backends.linux.LinuxKernel` holds an exclusive ``flock`` on
the lock file (:func:`default_lock_path`) for its whole life and leaves a
note in it (who holds it, the knobs it saved); a note still there when the
lock is next taken is from a session that died without restoring.
:func:`default_lock_path` and :class:`KsmLockTimeoutError` are re-exported by
:mod:`ksmlab.backends.linux`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
import time

from ksmlab.errors import KsmSimError

__all__ = ["KsmLockTimeoutError", "default_lock_path"]


class KsmLockTimeoutError(KsmSimError, TimeoutError):
    """Another ksmlab session held the global KSM lock for longer than the timeout."""


def default_lock_path() -> str:
    """``/run/lock/ksmlab.lock``, or ``/tmp/ksmlab.lock`` where ``/run/lock`` is absent."""
    return "/run/lock/ksmlab.lock" if os.path.isdir("/run/lock") else "/tmp/ksmlab.lock"


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return "?"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip() or "?"


def _lock_holders(fd: int) -> list[int]:
    """Pids that hold a flock on the file open at *fd*, from ``/proc/locks``."""
    st = os.fstat(fd)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = []
    try:
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                # "1: FLOCK  ADVISORY  WRITE 1234 00:1a:5678 0 EOF" (blocked
                # waiters are shown with "->" and are not holders).
                if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == dev:
                    pids.append(int(parts[4]))
    except (OSError, ValueError):
        pass
    return pids


def _acquire_lock(path: str, timeout: float) -> tuple[int, str]:
    """Take the lock; return its fd and the note a previous holder left behind (if any)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                holders = _lock_holders(fd)
                try:
                    note = os.pread(fd, 4096, 0).decode(errors="replace").strip()
                finally:
                    os.close(fd)
                if holders:
                    who = ", ".join(f"pid {p} ({_cmdline(p)})" for p in holders)
                else:
                    who = "an unknown process"
                extra = f"; its note in the lock file: {note!r}" if note else ""
                raise KsmLockTimeoutError(
                    f"timed out after {timeout:g} s waiting for the global KSM lock {path}, "
                    f"held by {who}{extra}") from None
            time.sleep(0.02)
    # A clean close empties the file, so a note still there is from a session
    # that died without restoring (SIGKILL, power loss).
    stale = os.pread(fd, 65536, 0).decode(errors="replace").strip()
    _write_note(fd, "")
    return fd, stale


def _write_note(fd: int, extra: str) -> None:
    # For whoever waits next, and for the next session if this one dies
    # without restoring.  Not every ksmlab tool writes one.
    note = (f"pid {os.getpid()} ({_cmdline(os.getpid())}) since "
            f"{dt.datetime.now().isoformat(timespec='seconds')}{extra}\n")
    os.ftruncate(fd, 0)
    os.pwrite(fd, note.encode(), 0)


def _release_lock(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
    os.close(fd)  # closing the only descriptor drops the flock
