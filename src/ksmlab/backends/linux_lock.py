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
import json
import os
import re
import time
from dataclasses import dataclass
from typing import Final, Self

from ksmlab.errors import KsmSimError

__all__ = [
    "KsmLockTimeoutError",
    "SessionNote",
    "default_lock_path",
    "lock_holders",
    "process_cmdline",
    "read_note",
    "try_lock",
]

_NOTE_MAX: Final = 65536


@dataclass(frozen=True, slots=True)
class SessionNote:
    """What a lock holder leaves in the lock file while it runs.

    The file is emptied by a clean close, so a note found when the lock is
    taken is from a session that died without restoring the knobs (SIGKILL,
    the OOM killer, power loss); its ``saved_knobs`` are the host's values to
    put back.  Written as one JSON object on one line.
    """

    pid: int
    """The holder's pid."""
    cmdline: str
    """The holder's command line, for people reading the file."""
    since: str
    """When it took the lock (ISO 8601, local time)."""
    saved_knobs: dict[str, str] | None
    """The knobs it found and will restore (None: a holder that changes no knobs)."""
    ran: bool = False
    """Whether ksmd ran during the session (so pages may be merged: unmerge on repair)."""

    @classmethod
    def for_this_process(cls, saved_knobs: dict[str, str] | None, ran: bool = False) -> Self:
        """A note for the calling process, stamped now."""
        return cls(os.getpid(), process_cmdline(os.getpid()),
                   dt.datetime.now().isoformat(timespec="seconds"), saved_knobs, ran)

    def to_text(self) -> str:
        """The note as written to the lock file (one line of JSON)."""
        return json.dumps({"pid": self.pid, "cmdline": self.cmdline, "since": self.since,
                           "saved_knobs": self.saved_knobs, "ran": self.ran}, sort_keys=True)

    @classmethod
    def parse(cls, text: str) -> Self | None:
        """Read a note (also the plain-text form of ksmlab before 0.2); None if unreadable."""
        text = text.strip()
        if not text:
            return None
        try:
            d = json.loads(text)
        except ValueError:
            return cls._parse_legacy(text)
        if not isinstance(d, dict):
            return None
        knobs = d.get("saved_knobs")
        if knobs is not None and not (isinstance(knobs, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in knobs.items())):
            return None
        pid = d.get("pid")
        return cls(pid if isinstance(pid, int) else 0, str(d.get("cmdline", "?")),
                   str(d.get("since", "?")), knobs, d.get("ran") is True)

    @classmethod
    def _parse_legacy(cls, text: str) -> Self | None:
        # "pid 12 (python3 x.py) since 2026-11-25T10:00:00; saved knobs: a=1 b=none"
        m = re.fullmatch(r"pid (\d+) \((.*)\) since (\S+?)(?:; saved knobs: (.*))?", text)
        if m is None:
            return None
        knobs = None
        if m[4] is not None:
            knobs = dict(kv.partition("=")[::2] for kv in m[4].split())
        # The old note did not say whether ksmd ran: assume it did, so a
        # repair unmerges rather than leaving pages merged.
        return cls(int(m[1]), m[2], m[3], knobs, ran=knobs is not None)

    def describe(self) -> str:
        """One phrase naming the holder, e.g. ``pid 12 (python3 x.py), since 2026-...``."""
        return f"pid {self.pid} ({self.cmdline}), since {self.since}"


class KsmLockTimeoutError(KsmSimError, TimeoutError):
    """Another ksmlab session held the global KSM lock for longer than the timeout."""


def default_lock_path() -> str:
    """``/run/lock/ksmlab.lock``, or ``/tmp/ksmlab.lock`` where ``/run/lock`` is absent."""
    return "/run/lock/ksmlab.lock" if os.path.isdir("/run/lock") else "/tmp/ksmlab.lock"


def process_cmdline(pid: int, proc: str = "/proc") -> str:
    """The command line of *pid* on one short line ("?" if it cannot be read)."""
    try:
        with open(os.path.join(proc, str(pid), "cmdline"), "rb") as f:
            raw = f.read()
    except OSError:
        return "?"
    # One line, and short: a note is read by people and shown in messages.
    text = " ".join(raw.replace(b"\0", b" ").decode(errors="replace").split()) or "?"
    return text if len(text) <= 160 else text[:157] + "..."


def _lock_holders(fd: int, proc: str = "/proc") -> list[int]:
    """Pids that hold a flock on the file open at *fd*, from ``/proc/locks``."""
    st = os.fstat(fd)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = []
    try:
        with open(os.path.join(proc, "locks")) as f:
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
    """Take the lock; return its fd and the note a previous holder left behind (if any).

    The note is left in the file: a caller that finds one from a dead session
    repairs what it names first, and only then replaces it with its own
    (:func:`_write_note`), so a crash during the repair loses nothing.
    """
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
                    who = ", ".join(f"pid {p} ({process_cmdline(p)})" for p in holders)
                else:
                    who = "an unknown process"
                extra = f"; its note in the lock file: {note!r}" if note else ""
                raise KsmLockTimeoutError(
                    f"timed out after {timeout:g} s waiting for the global KSM lock {path}, "
                    f"held by {who}{extra}") from None
            time.sleep(0.02)
    # A clean close empties the file, so a note still there is from a session
    # that died without restoring (SIGKILL, power loss).
    stale = os.pread(fd, _NOTE_MAX, 0).decode(errors="replace").strip()
    return fd, stale


def try_lock(path: str) -> tuple[int, str] | None:
    """Take the lock without waiting: its fd and any stale note, or None if it is held."""
    try:
        return _acquire_lock(path, 0.0)
    except KsmLockTimeoutError:
        return None


def lock_holders(path: str, proc: str = "/proc") -> list[int]:
    """Pids holding the lock at *path* now (empty if none or the file does not exist)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return []
    try:
        return _lock_holders(fd, proc)
    finally:
        os.close(fd)


def read_note(path: str) -> str:
    """The note in the lock file at *path* ("" if there is none or no file)."""
    try:
        with open(path, "rb") as f:
            return f.read(_NOTE_MAX).decode(errors="replace").strip()
    except OSError:
        return ""


def _write_note(fd: int, note: SessionNote | None) -> None:
    # For whoever waits next, and for the next session if this one dies
    # without restoring.  None writes the bare "who and since" of a holder
    # that changes no knobs.
    if note is None:
        note = SessionNote.for_this_process(saved_knobs=None)
    data = (note.to_text() + "\n").encode()
    os.pwrite(fd, data, 0)
    os.ftruncate(fd, len(data))


def _release_lock(fd: int, *, keep_note: bool = False) -> None:
    """Drop the lock; the note is emptied unless *keep_note* (the restore failed)."""
    if not keep_note:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
    os.close(fd)  # closing the only descriptor drops the flock
