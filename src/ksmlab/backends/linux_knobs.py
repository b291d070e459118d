"""The real kernel's KSM knobs: read them, write them, and put a saved set back safely.

These functions work on ``/sys/kernel/mm/ksm`` directly, without a
:class:`~ksmlab.backends.linux.LinuxKernel`, because two callers need them
outside a session's life: a session's own restore on close, and the repair of
what a session killed by SIGKILL left behind (done by the next session and by
``ksmlab doctor --repair``).  Every caller must hold the ksmlab lock
(:mod:`ksmlab.backends.linux_lock`): KSM state is global to the machine.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Mapping
from typing import Final, NamedTuple

from ksmlab.ksm.sysfs import KNOB_WRITE_ORDER

__all__ = [
    "KSM_SYSFS_DIR",
    "KnobFailure",
    "boot_knobs",
    "normalise_knob",
    "read_knob",
    "read_knobs",
    "restore_knobs",
    "writable_knobs",
    "write_knob",
]

KSM_SYSFS_DIR: Final = "/sys/kernel/mm/ksm"
"""Where the kernel exposes KSM's knobs and counters."""

# Knobs refused with EBUSY while KSM pages exist: on EBUSY the restore unmerges
# (run=2) and retries.
_NEED_NO_KSM_PAGES: Final = ("merge_across_nodes", "max_page_sharing")


class KnobFailure(NamedTuple):
    """A knob write that failed during a restore."""

    name: str
    """The knob."""
    value: str
    """The value that could not be written."""
    error: OSError
    """What the kernel answered."""


def normalise_knob(name: str, text: str) -> str:
    """The value to write back for a knob read as *text* (``advisor_mode`` shows a menu)."""
    if name == "advisor_mode":
        m = re.search(r"\[([^\]]+)\]", text)
        if m:
            return m[1]
    return text.strip()


def boot_knobs() -> dict[str, str]:
    """Every knob's value on a freshly booted kernel, in :data:`KNOB_WRITE_ORDER`.

    Taken from the model, whose boot values ``tests/test_sysfs.py`` checks
    against the table recorded from the real kernel (``tests/sysfs_cases.py``).
    """
    from ksmlab.kernel import SimKernel  # the model is only needed here

    sysfs = SimKernel().sysfs
    return {n: normalise_knob(n, sysfs[n]) for n in KNOB_WRITE_ORDER if n in sysfs}


def writable_knobs(directory: str = KSM_SYSFS_DIR) -> list[str]:
    """The names of the knobs (files with an owner-write bit), sorted."""
    return sorted(n for n in os.listdir(directory)
                  if os.stat(os.path.join(directory, n)).st_mode & stat.S_IWUSR)


def read_knob(name: str, directory: str = KSM_SYSFS_DIR) -> str:
    """One knob's value as it would be written back (see :func:`normalise_knob`)."""
    with open(os.path.join(directory, name)) as f:
        return normalise_knob(name, f.read())


def read_knobs(directory: str = KSM_SYSFS_DIR) -> dict[str, str]:
    """Every writable knob's value as it would be written back."""
    return {n: read_knob(n, directory) for n in writable_knobs(directory)}


def write_knob(name: str, value: str, directory: str = KSM_SYSFS_DIR) -> None:
    """Write *value* to one knob in a single ``write(2)`` (OSError with the kernel's errno).

    Opened with O_TRUNC, as a shell's ``echo v > file`` does: sysfs ignores it,
    and a plain file standing in for a knob (tests, ``--sysfs-dir``) then
    holds exactly *value*.
    """
    fd = os.open(os.path.join(directory, name), os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def restore_knobs(saved: Mapping[str, str], *, unmerge: bool, end_stopped_as_unmerged: bool,
                  directory: str = KSM_SYSFS_DIR) -> list[KnobFailure]:
    """Put the knobs in *saved* back, in an order the kernel accepts; return what failed.

    Args:
        saved: knob name to value as written (``advisor_mode`` as its bare mode).
        unmerge: write ``run=2`` first, un-merging every KSM page on the
            machine (also done when ``run`` reads 1 now: the trees must be
            empty for some knobs, and a stopped ksmd cannot change pages
            under the restore).
        end_stopped_as_unmerged: where *saved* says ``run=0`` and this
            restore un-merged, leave ``run=2``: the project's lock protocol
            ends a session that may have merged with ``run=2`` (stopped *and*
            un-merged), so the next user of the machine can tell.

    Order: ``run=2`` if asked; the advisor's parameters, ``advisor_mode``,
    ``pages_to_scan`` (not written when the saved mode is scan-time: the
    kernel refuses it and the advisor sets it), the other knobs, then
    ``merge_across_nodes`` and ``max_page_sharing`` (EBUSY while KSM pages
    exist: then ``run=2`` and one retry), and ``run`` last.  A knob that
    already reads its saved value is not written; one failure does not stop
    the others.
    """
    failures: list[KnobFailure] = []
    unmerged = False

    def current(name: str) -> str:
        return read_knob(name, directory)

    def do_unmerge() -> None:
        nonlocal unmerged
        try:
            write_knob("run", "2", directory)
            unmerged = True
        except OSError as err:
            # run=2 failing (ENOMEM, EINTR) leaves run=0 in the kernel.
            failures.append(KnobFailure("run", "2", err))

    def restore(name: str) -> None:
        if name not in saved or current(name) == saved[name]:
            return
        try:
            write_knob(name, saved[name], directory)
        except OSError as err:
            if err.errno == errno.EBUSY and name in _NEED_NO_KSM_PAGES and not unmerged:
                do_unmerge()
                try:
                    write_knob(name, saved[name], directory)
                except OSError as err2:
                    failures.append(KnobFailure(name, saved[name], err2))
            else:
                failures.append(KnobFailure(name, saved[name], err))

    if unmerge or current("run") == "1":
        do_unmerge()
    order = [n for n in KNOB_WRITE_ORDER if n != "run"]
    order += sorted(set(saved) - set(KNOB_WRITE_ORDER) - {"run"})
    for name in order:
        if name == "pages_to_scan" and saved.get("advisor_mode") == "scan-time":
            continue
        restore(name)
    final_run = saved.get("run", "0")
    if end_stopped_as_unmerged and final_run == "0" and unmerged:
        final_run = "2"
    if current("run") != final_run:
        try:
            write_knob("run", final_run, directory)
        except OSError as err:
            failures.append(KnobFailure("run", final_run, err))
    return failures
