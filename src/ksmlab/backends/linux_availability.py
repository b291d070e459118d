"""Whether this machine's KSM can be driven: :func:`linux_ksm_unavailable_reason`.

A :class:`~ksmlab.backends.linux_session.LinuxSession` checks this before
taking the lock, and once it holds the lock makes one harmless write
(:func:`probe_run_writable`) that catches what the checks cannot see.
:func:`linux_ksm_unavailable_reason` and :class:`KsmUnavailableError` are
re-exported by :mod:`ksmlab.backends.linux`.
"""

from __future__ import annotations

import os
import sys

from ksmlab.backends.linux_knobs import KSM_SYSFS_DIR
from ksmlab.errors import KsmSimError

__all__ = ["KsmUnavailableError", "linux_ksm_unavailable_reason", "probe_run_writable"]


class KsmUnavailableError(KsmSimError, RuntimeError):
    """This machine's KSM cannot be driven (absent, not root, read-only sysfs, ...)."""


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


def probe_run_writable(run: str | None) -> None:
    """Write *run* (``run``'s current value) back, or raise :class:`KsmUnavailableError`.

    Writing run's current value back is a no-op in the kernel, and it is the
    one sure test that this sysfs accepts writes (e.g. not a read-only bind
    mount that statvfs did not reveal).  The caller holds the ksmlab lock.
    """
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
