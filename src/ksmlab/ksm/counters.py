"""KSM's derived counters: the formulas the kernel evaluates when a file is read.

``pages_volatile`` and ``general_profit`` in ``/sys/kernel/mm/ksm`` and
``ksm_process_profit`` in ``/proc/PID/ksm_stat`` are not kept anywhere: the
kernel computes them from other counters each time they are read.  Every
engine (SimKernel's :class:`ksmlab.ksm.ksm.KsmCore`, the bulk engine's
columns) computes them with these functions, so the formulas are written once.
"""

from __future__ import annotations

from ksmlab.constants import PAGE_SIZE, RMAP_ITEM_SIZE


def pages_volatile(rmap_items: int, pages_shared: int, pages_sharing: int,
                   pages_unshared: int) -> int:
    """Items in no tree (``pages_volatile_show``); a transiently negative count reads 0."""
    return max(0, rmap_items - pages_shared - pages_sharing - pages_unshared)


def general_profit(pages_sharing: int, ksm_zero_pages: int, rmap_items: int) -> int:
    """Bytes saved by KSM net of its rmap_items, signed (``general_profit_show``)."""
    return (pages_sharing + ksm_zero_pages) * PAGE_SIZE - rmap_items * RMAP_ITEM_SIZE


def ksm_process_profit(ksm_merging_pages: int, ksm_zero_pages: int, ksm_rmap_items: int) -> int:
    """One process's profit in bytes, signed (``ksm_process_profit``)."""
    return (ksm_merging_pages + ksm_zero_pages) * PAGE_SIZE - ksm_rmap_items * RMAP_ITEM_SIZE
