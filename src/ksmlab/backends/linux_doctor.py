"""``ksmlab doctor``: what state this machine's KSM is in, and what ksmlab left behind.

:func:`diagnose` only reads (any user may run it): the knobs and counters in
``/sys/kernel/mm/ksm``, the knobs that differ from a freshly booted kernel's,
the ksmlab lock file (who holds it, or the note of a session that died
without restoring), and the processes KSM is working on.  :func:`repair` takes
the lock and restores a dead session's saved knobs
(:func:`~ksmlab.backends.linux_repair.repair_dead_session`), as the next
:class:`~ksmlab.backends.linux.LinuxKernel` would.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ksmlab.backends.linux_knobs import KSM_SYSFS_DIR, boot_knobs, read_knob, writable_knobs
from ksmlab.backends.linux_lock import (
    SessionNote,
    _release_lock,
    default_lock_path,
    lock_holders,
    process_cmdline,
    read_note,
    try_lock,
)
from ksmlab.backends.linux_procfs import parse_ksm_stat
from ksmlab.backends.linux_repair import Repair, repair_dead_session
from ksmlab.errors import KsmSimError

__all__ = ["Diagnosis", "KsmProcess", "LockBusyError", "diagnose", "repair"]


class LockBusyError(KsmSimError, RuntimeError):
    """:func:`repair` found the lock held by a live session (nothing of it is stale)."""


@dataclass(frozen=True, slots=True)
class KsmProcess:
    """A process KSM is working on, from its ``/proc/PID/ksm_stat``."""

    pid: int
    """Its pid."""
    cmdline: str
    """Its command line (shortened)."""
    merging_pages: int
    """``ksm_merging_pages``: its pages now merged with others."""
    merge_any: bool
    """``ksm_merge_any``: it called ``prctl(PR_SET_MEMORY_MERGE, 1)``."""
    mergeable: bool
    """``ksm_mergeable``: it has a VM_MERGEABLE area."""


@dataclass(slots=True)
class Diagnosis:
    """What :func:`diagnose` found."""

    sysfs_dir: str
    """The KSM sysfs directory read."""
    files: dict[str, str] = field(default_factory=dict)
    """Every file's value (knobs normalised as they would be written back)."""
    knobs: list[str] = field(default_factory=list)
    """The writable files among them, sorted."""
    defaults: dict[str, str] = field(default_factory=dict)
    """A freshly booted kernel's value of each knob."""
    lock_path: str = ""
    """The ksmlab lock file."""
    holders: list[tuple[int, str]] = field(default_factory=list)
    """(pid, command line) of each live process holding the lock."""
    note: str = ""
    """The raw note in the lock file."""
    stale: SessionNote | None = None
    """The note of a session that died without restoring (None if there is none)."""
    processes: list[KsmProcess] = field(default_factory=list)
    """Processes with a mergeable area or merged pages."""

    @property
    def non_default(self) -> dict[str, tuple[str, str]]:
        """Knob name to (value now, boot value) where they differ."""
        return {n: (self.files[n], self.defaults[n]) for n in self.knobs
                if n in self.defaults and self.files[n] != self.defaults[n]}

    @property
    def to_repair(self) -> dict[str, tuple[str, str]]:
        """Knob name to (value now, value the dead session saved) where they differ."""
        if self.stale is None or self.stale.saved_knobs is None:
            return {}
        return {n: (self.files[n], v) for n, v in self.stale.saved_knobs.items()
                if n in self.files and self.files[n] != v}

    @property
    def needs_repair(self) -> bool:
        """A dead session's note names saved knobs (repair restores them and clears the note)."""
        return self.stale is not None and self.stale.saved_knobs is not None


def _ksm_processes(proc: str) -> list[KsmProcess]:
    out = []
    for name in os.listdir(proc):
        if not name.isdigit():
            continue
        try:
            with open(os.path.join(proc, name, "ksm_stat")) as f:
                st = parse_ksm_stat(f.read())
        except (OSError, ValueError):
            continue  # gone meanwhile, a kernel thread, or not ours to read
        merging = int(st.get("ksm_merging_pages", 0))
        if merging or st.get("ksm_mergeable") or st.get("ksm_merge_any"):
            out.append(KsmProcess(int(name), process_cmdline(int(name), proc), merging,
                                  bool(st.get("ksm_merge_any")), bool(st.get("ksm_mergeable"))))
    return sorted(out, key=lambda p: p.pid)


def diagnose(*, sysfs_dir: str = KSM_SYSFS_DIR, lock_path: str | None = None,
             proc: str = "/proc") -> Diagnosis:
    """Read the machine's KSM state and ksmlab's lock file; changes nothing.

    Raises:
        FileNotFoundError: *sysfs_dir* does not exist (a kernel without CONFIG_KSM).
    """
    d = Diagnosis(sysfs_dir, lock_path=lock_path or default_lock_path())
    for name in sorted(os.listdir(sysfs_dir)):
        try:
            d.files[name] = read_knob(name, sysfs_dir)
        except OSError:
            continue
    d.knobs = [n for n in writable_knobs(sysfs_dir) if n in d.files]
    d.defaults = boot_knobs()
    d.holders = [(pid, process_cmdline(pid, proc)) for pid in lock_holders(d.lock_path, proc)]
    d.note = read_note(d.lock_path)
    if d.note and not d.holders:
        d.stale = SessionNote.parse(d.note)
    d.processes = _ksm_processes(proc)
    return d


def repair(*, lock_path: str | None = None, sysfs_dir: str = KSM_SYSFS_DIR) -> Repair | None:
    """Restore a dead session's saved knobs under the lock and clear its note.

    Returns None when there is nothing to repair.  A failed restore keeps the
    note for another try.

    Raises:
        LockBusyError: a live session holds the lock.
        PermissionError: the lock file or the knobs cannot be written (not root).
    """
    path = lock_path or default_lock_path()
    taken = try_lock(path)
    if taken is None:
        who = ", ".join(f"pid {p} ({process_cmdline(p)})" for p in lock_holders(path)) or "a process"
        raise LockBusyError(f"the KSM lock {path} is held by {who}, a live session; "
                            f"it restores its own knobs when it ends")
    fd, stale = taken
    result: Repair | None = None
    try:
        note = SessionNote.parse(stale) if stale else None
        if note is not None and note.saved_knobs is not None:
            result = repair_dead_session(note, sysfs_dir)
        # An unreadable or knob-less note names nothing to restore: releasing clears it.
    finally:
        _release_lock(fd, keep_note=result is not None and bool(result.failures))
    return result
