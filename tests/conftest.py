# SPDX-License-Identifier: GPL-2.0-only
"""Shared fixtures for the model's behaviour tests.

A test module may define its own ``kernel`` fixture; the local one wins.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

from ksmlab import SimKernel


@pytest.fixture
def kernel() -> SimKernel:
    """A fresh SimKernel whose ksmd does one full scan per batch and never sleeps.

    ``sleep_millisecs=0`` and a ``pages_to_scan`` far above any test's page
    count, so ``wait_full_scans(1)`` is exactly one batch, as in the verified
    traces of ``docs/kernel-behaviour.md`` section 7 (one batch = one full scan).
    """
    k = SimKernel()
    k.sysfs["sleep_millisecs"] = "0"
    k.sysfs["pages_to_scan"] = "100000"
    return k


# --- tests that touch the host say so ---------------------------------------------------------
# Every test that reads or writes the host's KSM, /proc or /sys must be marked
# ``linux`` (so ``pytest -m "not linux"`` runs anywhere).  An audit hook sees
# every file a test opens in this process and fails an unmarked test that
# opened one of these; child processes are not seen, so a test that drives the
# host through a subprocess must be marked by hand.
_HOST_PREFIXES = ("/sys/", "/proc/")
_HOST_ALLOWED = ("/proc/self/fd", "/proc/self/stat", "/proc/meminfo")  # interpreter and library use


class _HostAudit:
    """The files an unmarked test opened under :data:`_HOST_PREFIXES` (None: not watching)."""

    opened: list[str] | None = None


def _audit(event: str, args: tuple[object, ...]) -> None:
    if event != "open" or _HostAudit.opened is None or not args:
        return
    path = args[0]
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if (isinstance(path, str) and path.startswith(_HOST_PREFIXES)
            and not path.startswith(_HOST_ALLOWED)):
        _HostAudit.opened.append(path)


sys.addaudithook(_audit)


@pytest.fixture(autouse=True)
def _host_untouched_unless_marked_linux(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test not marked ``linux`` that opened a file of the host's /proc or /sys."""
    if request.node.get_closest_marker("linux") is not None:
        yield
        return
    _HostAudit.opened = opened = []
    try:
        yield
    finally:
        _HostAudit.opened = None
    if opened:
        pytest.fail(f"this test opened {opened[0]} (and {len(opened) - 1} more host files) but "
                    f"is not marked linux; mark it @pytest.mark.linux", pytrace=False)
