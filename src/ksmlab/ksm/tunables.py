"""The knobs of ``/sys/kernel/mm/ksm`` that KSM's scan reads, at their boot values.

The kernel keeps them as file-scope variables of ``mm/ksm.c``; here both
engines' KSM state (:class:`ksmlab.ksm.ksm.KsmCore` and
:class:`ksmlab.bulk.engine.BulkKsm`) starts from this one class, so the set of
tunables and their boot values (:mod:`ksmlab.ksm.defaults`) are written once.
"""

from __future__ import annotations

from ksmlab.ksm.advisor import AdvisorCtx, AdvisorKnobs
from ksmlab.ksm.defaults import (
    DEFAULT_MAX_PAGE_SHARING,
    DEFAULT_MERGE_ACROSS_NODES,
    DEFAULT_PAGES_TO_SCAN,
    DEFAULT_RUN,
    DEFAULT_SLEEP_MILLISECS,
    DEFAULT_SMART_SCAN,
    DEFAULT_STABLE_NODE_CHAINS_PRUNE_MILLISECS,
    DEFAULT_USE_ZERO_PAGES,
)

__all__ = ["KsmTunables"]


class KsmTunables:
    """KSM's tunables under their sysfs names, at their boot values."""

    def __init__(self) -> None:
        self.run: int = DEFAULT_RUN
        """``ksm_run``: KSM_RUN_STOP, KSM_RUN_MERGE or KSM_RUN_UNMERGE."""
        self.pages_to_scan: int = DEFAULT_PAGES_TO_SCAN
        """``ksm_thread_pages_to_scan``: pages per ksmd batch (the advisor's, under scan-time)."""
        self.sleep_millisecs: int = DEFAULT_SLEEP_MILLISECS
        """``ksm_thread_sleep_millisecs``: ksmd's sleep between batches."""
        self.max_page_sharing: int = DEFAULT_MAX_PAGE_SHARING
        """``ksm_max_page_sharing``: sharers per KSM page before a chain gets another dup."""
        self.merge_across_nodes: int = DEFAULT_MERGE_ACROSS_NODES
        """``ksm_merge_across_nodes``: one tree for every NUMA node (1) or one per node (0)."""
        self.use_zero_pages: bool = DEFAULT_USE_ZERO_PAGES
        """``ksm_use_zero_pages``: merge zero-filled pages with the zero page."""
        self.smart_scan: bool = DEFAULT_SMART_SCAN
        """``ksm_smart_scan``: skip pages that stayed unique, for longer each time."""
        self.stable_node_chains_prune_millisecs: int = DEFAULT_STABLE_NODE_CHAINS_PRUNE_MILLISECS
        """``ksm_stable_node_chains_prune_millisecs``: how often a chain's stale dups are pruned."""
        self.advisor_scan_time = False
        """``ksm_advisor == KSM_ADVISOR_SCAN_TIME``: the advisor sets ``pages_to_scan``."""
        self.advisor = AdvisorKnobs()
        """The advisor's own knobs (``advisor_max_cpu``, ...)."""
        self.advisor_ctx = AdvisorCtx()
        """The advisor's state between full scans (not a knob: kept with them, as the
        kernel keeps ``advisor_ctx`` next to them, so every engine has it)."""
