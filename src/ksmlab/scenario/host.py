"""Read-only views of the machine's own KSM: its sysfs files and ksmd's CPU time.

Used by ``ksmlab stat`` and by the Linux backend of the scenario runner.
Nothing here writes anything or needs privileges beyond reading the files
(``/sys/kernel/mm/ksm/*``, ``/proc/PID/stat`` and ``schedstat`` are world-readable).
"""

from __future__ import annotations

import os
from pathlib import Path

KSM_SYSFS_DIR = "/sys/kernel/mm/ksm"


def find_ksmd_pid(proc: str = "/proc") -> int | None:
    """The pid of the ``ksmd`` kernel thread, or None (no KSM, or /proc unreadable).

    A kernel thread is recognised by its name (``comm``) and its parent,
    ``kthreadd`` (pid 2), so a user process that calls itself ksmd is not
    taken for it.
    """
    try:
        entries = os.listdir(proc)
    except OSError:
        return None
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            stat = Path(proc, entry, "stat").read_text()
        except OSError:
            continue
        comm, fields = _split_stat(stat)
        if comm == "ksmd" and len(fields) > 1 and fields[1] in ("0", "2"):
            return int(entry)
    return None


def _split_stat(text: str) -> tuple[str, list[str]]:
    """``/proc/PID/stat`` as (comm, the fields after it, from ``state`` on)."""
    lp, rp = text.find("("), text.rfind(")")
    if lp < 0 or rp < lp:
        return "", []
    return text[lp + 1:rp], text[rp + 1:].split()


def process_cpu_ns(pid: int, proc: str = "/proc") -> int | None:
    """CPU time *pid* has used, in nanoseconds, or None if unreadable.

    The first field of ``/proc/PID/schedstat`` (nanosecond resolution) where
    the kernel has it, else utime + stime of ``/proc/PID/stat`` (clock ticks).
    """
    try:
        return int(Path(proc, str(pid), "schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    try:
        text = Path(proc, str(pid), "stat").read_text()
    except OSError:
        return None
    _, fields = _split_stat(text)
    # After comm: state(0) ppid(1) ... utime is field 14 of stat, so index 11 here.
    if len(fields) < 13:
        return None
    ticks = int(fields[11]) + int(fields[12])
    return ticks * 1_000_000_000 // os.sysconf("SC_CLK_TCK")


def ksmd_cpu_ns(proc: str = "/proc") -> int | None:
    """CPU time ksmd has used since boot, in nanoseconds, or None when unknown."""
    pid = find_ksmd_pid(proc)
    return None if pid is None else process_cpu_ns(pid, proc)


def read_ksm_files(directory: str = KSM_SYSFS_DIR) -> dict[str, str]:
    """Every readable file of the KSM sysfs directory, stripped.

    Raises:
        OSError: the directory does not exist or cannot be listed.
    """
    out: dict[str, str] = {}
    for name in sorted(os.listdir(directory)):
        try:
            out[name] = Path(directory, name).read_text().strip()
        except OSError:
            continue
    return out


__all__ = ["KSM_SYSFS_DIR", "find_ksmd_pid", "ksmd_cpu_ns", "process_cpu_ns", "read_ksm_files"]
