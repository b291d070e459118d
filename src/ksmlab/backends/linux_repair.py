"""Repairing what a ksmlab session killed by SIGKILL left on the machine.

A session writes the knobs it found into the lock file's note
(:class:`~ksmlab.backends.linux_lock.SessionNote`) and empties the file when it
has restored them.  A session that could not restore (SIGKILL, the OOM
killer, power loss) leaves the note behind, and the knobs as it had changed
them.  The next :class:`~ksmlab.backends.linux.LinuxKernel` and ``ksmlab
doctor --repair`` call :func:`repair_dead_session` under the lock, *before*
saving anything, so the dead session's changes are never mistaken for the
host's own values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ksmlab.backends.linux_knobs import KSM_SYSFS_DIR, KnobFailure, read_knobs, restore_knobs
from ksmlab.backends.linux_lock import SessionNote

__all__ = ["Repair", "repair_dead_session"]


@dataclass(slots=True)
class Repair:
    """What :func:`repair_dead_session` did."""

    note: SessionNote
    """The dead session's note."""
    changed: dict[str, tuple[str, str]] = field(default_factory=dict)
    """Knob name to (value found, value written) for every knob that changed."""
    failures: list[KnobFailure] = field(default_factory=list)
    """Knobs that could not be restored (the note is then kept for another try)."""

    def message(self) -> str:
        """One paragraph for people: who died, and what was put back."""
        head = (f"a previous ksmlab session ({self.note.describe()}) ended without restoring "
                f"the KSM knobs it had saved")
        if self.failures:
            bad = "; ".join(f"{f.name}={f.value!r}: {f.error.strerror}" for f in self.failures)
            return (f"{head}; could not restore {bad}. The lock file keeps its note; "
                    f"run 'ksmlab doctor' to see the state and 'ksmlab doctor --repair' to retry")
        if not self.changed:
            return f"{head}; every knob already had its saved value, nothing to restore"
        what = ", ".join(f"{n} {old} -> {new}" for n, (old, new) in sorted(self.changed.items()))
        return f"{head}; restored them now: {what}"


def repair_dead_session(note: SessionNote, directory: str = KSM_SYSFS_DIR) -> Repair:
    """Put back the knobs a dead session saved (the caller holds the lock).

    The dead session may have let ksmd merge, so where it ran ksmd (or ksmd
    still runs) this un-merges first and, where it found ``run=0``, leaves
    ``run=2`` as the lock protocol asks; see
    :func:`~ksmlab.backends.linux_knobs.restore_knobs`.
    """
    repair = Repair(note)
    if note.saved_knobs is None:
        return repair
    before = read_knobs(directory)
    repair.failures = restore_knobs(note.saved_knobs, unmerge=note.ran,
                                    end_stopped_as_unmerged=True, directory=directory)
    after = read_knobs(directory)
    repair.changed = {n: (before[n], after[n]) for n in after
                      if n in before and before[n] != after[n]}
    return repair
