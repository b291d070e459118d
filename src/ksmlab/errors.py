"""The three kinds of error ksmlab raises, kept apart.

1. :class:`KernelError`: what the simulated kernel returns at the syscall and
   sysfs boundary.  It *is* an :class:`OSError` with the kernel's errno, the
   way Python's :mod:`os` module raises, so ``except OSError as e: e.errno``
   works the same on :class:`~ksmlab.SimKernel` and on the real kernel.
2. Misuse of the Python API (a wrong type, an exited process, a bad length):
   precise built-in exceptions (:class:`ValueError`, :class:`TypeError`,
   :class:`ProcessExitedError`) whose message names the bad value.
3. :class:`ModelInvariantError`: the model is broken.  It is an
   :class:`AssertionError` and is never caught inside ksmlab.
"""

from __future__ import annotations

import os


class KsmSimError(Exception):
    """Base class of every exception defined by ksmlab."""


class KernelError(KsmSimError, OSError):
    """An errno returned by the simulated kernel (syscall or sysfs write)."""

    def __init__(self, err: int, what: str = "") -> None:
        msg = os.strerror(err) if not what else f"{os.strerror(err)}: {what}"
        super().__init__(err, msg)


class ProcessExitedError(KsmSimError, RuntimeError):
    """An operation was attempted on a process that has already exited."""


class ScanStalledError(KsmSimError, RuntimeError):
    """``wait_full_scans`` cannot make progress (ksmd stopped or has nothing to scan)."""


class NotModelledError(KsmSimError, NotImplementedError):
    """A call or value an engine does not model (e.g. ``munmap`` on the bulk engine).

    Raised before anything changes, so the caller may fall back to another
    engine (SimKernel models the whole interface).
    """


class ModelInvariantError(KsmSimError, AssertionError):
    """An internal invariant of the model failed: a bug in ksmlab, never swallowed."""


def vm_bug_on(cond: bool, what: str) -> None:
    """Model of the kernel's ``VM_BUG_ON``: raise :class:`ModelInvariantError` if *cond*."""
    if cond:
        raise ModelInvariantError(what)


def kernel_error(err: int, what: str = "") -> KernelError:
    """Build the :class:`KernelError` for *err* (a positive errno such as ``errno.EINVAL``)."""
    return KernelError(err, what)


__all__ = [
    "KernelError",
    "KsmSimError",
    "ModelInvariantError",
    "NotModelledError",
    "ProcessExitedError",
    "ScanStalledError",
    "kernel_error",
    "vm_bug_on",
]
