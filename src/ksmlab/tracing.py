"""Tracepoints as structured records (the kernel's ``trace_ksm_*`` events)."""

from __future__ import annotations

from typing import Any, NamedTuple


class TraceEvent(NamedTuple):
    """One tracepoint hit.

    Attributes:
        time_ns: virtual time of the event.
        name: tracepoint name, e.g. ``ksm_start_scan`` or ``ksm_merge_one_page``.
        fields: the tracepoint's arguments (pfn, rmap_item address, mm id, err, ...).
    """

    time_ns: int
    name: str
    fields: dict[str, Any]
