# SPDX-License-Identifier: GPL-2.0-only
"""Helpers for the tests that drive the real kernel's KSM.

They read the knobs straight from sysfs (independently of the code under
test), start Python children that can import ksmlab from this tree, and give
tests the kernel's boot values of the knobs as recorded in
``tests/sysfs_cases.py`` (so no test depends on what another program left).
"""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from ksmlab.backends import linux
from ksmlab.backends.linux import LinuxKernel, helper_unavailable_reason, linux_ksm_unavailable_reason
from sysfs_cases import DEFAULTS, READ_ONLY

KSM = Path("/sys/kernel/mm/ksm")
SRC_DIR = str(Path(linux.__file__).resolve().parents[2])  # the directory holding ksmlab/


def skip_unless_ksm_usable() -> None:
    """Skip (with the reason) where KSM cannot be driven or the helper cannot be built."""
    reason = linux_ksm_unavailable_reason() or helper_unavailable_reason()
    if reason:
        pytest.skip(reason)


def knob_value(name: str, text: str) -> str:
    """What a knob file shows, reduced to the value (advisor_mode shows a menu)."""
    if name == "advisor_mode":
        m = re.search(r"\[([^\]]+)\]", text)
        assert m, text
        return m[1]
    return text.strip()


BOOT_KNOBS: dict[str, str] = {n: knob_value(n, t) for n, t in DEFAULTS.items() if n not in READ_ONLY}
"""Every knob's value on a freshly booted kernel, as recorded from the real kernel."""


def read_knobs() -> dict[str, str]:
    """Every writable knob, read straight from sysfs (independent of the code under test)."""
    out = {}
    for f in sorted(KSM.iterdir()):
        if f.stat().st_mode & 0o200:
            out[f.name] = knob_value(f.name, f.read_text())
    return out


@contextmanager
def ksmlab_lock() -> Iterator[None]:
    """Hold the machine-wide ksmlab lock (no session: nothing saved, no note written)."""
    fd = os.open(linux.default_lock_path(), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def read_knobs_locked() -> dict[str, str]:
    """The knobs while no ksmlab session runs, so none of its changes are in them."""
    with ksmlab_lock():
        return read_knobs()


def after_session(before: dict[str, str], *, merged: bool) -> dict[str, str]:
    """The knobs a session must leave, given those it found (the lock protocol's rule).

    Every knob as found; ``run`` too, except that a session whose ksmd ran and
    which found ``run=0`` leaves ``run=2`` (stopped and un-merged).
    """
    if merged and before["run"] == "0":
        return {**before, "run": "2"}
    return dict(before)


@contextmanager
def session_at_boot_knobs(**changes: str) -> Iterator[LinuxKernel]:
    """A LinuxKernel whose knobs are the boot values (plus *changes*) until it closes."""
    with LinuxKernel() as k:
        k.reset_knobs({**BOOT_KNOBS, **changes})
        yield k


def run_python(code: str) -> subprocess.Popen[str]:
    """Start a Python child that can import ksmlab and these helpers (stdin/stdout piped)."""
    tests = str(Path(__file__).resolve().parent)
    path = os.pathsep.join([SRC_DIR, tests, os.environ.get("PYTHONPATH", "")])
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)],
                            env=dict(os.environ, PYTHONPATH=path), text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_gone(pid: int, timeout: float = 2.0) -> bool:
    """Whether /proc/PID disappears (process exited and was reaped) within *timeout*."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not os.path.exists(f"/proc/{pid}"):
            return True
        time.sleep(0.01)
    return False
