# SPDX-License-Identifier: GPL-2.0-only
"""Shared fixtures for the model's behaviour tests.

A test module may define its own ``kernel`` fixture; the local one wins.
"""

from __future__ import annotations

import pytest

from ksmlab import SimKernel


@pytest.fixture
def kernel() -> SimKernel:
    """A fresh SimKernel whose ksmd does one full scan per batch and never sleeps.

    ``sleep_millisecs=0`` and a ``pages_to_scan`` far above any test's page
    count, so ``wait_full_scans(1)`` is exactly one batch, as in the spec's
    verified traces ("pages_to_scan large, one batch = one full scan").
    """
    k = SimKernel()
    k.sysfs["sleep_millisecs"] = "0"
    k.sysfs["pages_to_scan"] = "100000"
    return k
