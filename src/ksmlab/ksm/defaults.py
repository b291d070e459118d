"""KSM's boot values and fixed limits: one place for every engine.

The knobs' values are those of a freshly booted Linux 6.18 (recorded from the
real kernel in ``tests/sysfs_cases.py``, which ``tests/test_sysfs.py`` holds
the model to).  SimKernel (:mod:`ksmlab.ksm.ksm`, :mod:`ksmlab.ksm.advisor`),
the bulk engine (:mod:`ksmlab.bulk.engine`) and ksmd
(:mod:`ksmlab.ksm.ksmd`) all start from these.  What a store accepts is
:data:`ksmlab.ksm.sysfs.KNOB_SYNTAX`'s business, not this module's.
"""

from __future__ import annotations

from typing import Final

from ksmlab.constants import KSM_RUN_STOP

# --- /sys/kernel/mm/ksm at boot ------------------------------------------------------------
DEFAULT_RUN: Final = KSM_RUN_STOP
DEFAULT_PAGES_TO_SCAN: Final = 100
DEFAULT_SLEEP_MILLISECS: Final = 20
DEFAULT_MAX_PAGE_SHARING: Final = 256
DEFAULT_MERGE_ACROSS_NODES: Final = 1
DEFAULT_USE_ZERO_PAGES: Final = False
DEFAULT_SMART_SCAN: Final = True
DEFAULT_STABLE_NODE_CHAINS_PRUNE_MILLISECS: Final = 2000

# --- the scan-time advisor's knobs at boot (advisor_mode is "none") -------------------------
DEFAULT_ADVISOR_MAX_CPU: Final = 70
"""Percent of one CPU."""
DEFAULT_ADVISOR_MIN_PAGES_TO_SCAN: Final = 500
DEFAULT_ADVISOR_MAX_PAGES_TO_SCAN: Final = 30000
DEFAULT_ADVISOR_TARGET_SCAN_TIME: Final = 200
"""Seconds."""

# ksmd's cost model and its shipped parameters: ksmlab.ksm.cost and ksmlab/data/ksmd-cost.json.

# --- limits ------------------------------------------------------------------------------------
U32: Final = 0xFFFFFFFF
"""Largest unsigned int: ``pages_to_scan`` and ``advisor_max_cpu`` are unsigned ints."""
SEQNR_MASK: Final = 0xFF
"""An rmap_item keeps the low 8 bits of ``full_scans`` (``ksm_scan.seqnr``) it was inserted at."""
AGE_MAX: Final = 255
"""Smart scan's ``rmap_item->age`` is 8 bits wide and stops growing here."""
NS_PER_MS: Final = 1_000_000
"""Nanoseconds per millisecond, for the virtual clock."""
