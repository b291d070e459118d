"""What each KSM counter really counts, in one place for the help, the table, the plot and the report.

The meanings follow docs/kernel-behaviour.md section 4 (spec 4) and the
kernel's own Documentation/admin-guide/mm/ksm.rst, which says that
``pages_volatile`` "embraces several different kinds of activity": besides
pages that change between two visits it holds new pages (a page's first visit
only takes its checksum), merges that failed, and, with ``smart_scan`` on
(the default since Linux 6.7), unique pages that smart scan skips, which are
taken out of the unstable tree whether they change or not (spec 3.4).  So a
large ``pages_volatile`` does not by itself mean memory that changes too fast.
"""

from __future__ import annotations

from ksmlab.scenario.model import GLOBAL_COUNTERS

COUNTER_HELP: dict[str, str] = {
    "pages_shared": "KSM pages in use: the one write-protected copy kept of each merged content",
    "pages_sharing": "further mappings of those KSM pages, beyond the first of each: the pages "
                     "KSM frees",
    "pages_unshared": "unique pages ksmd keeps in its unstable tree, waiting for an identical "
                      "partner",
    "pages_volatile": "pages ksmd tracks in no tree: new (checksummed once), changed since its "
                      "last visit, a merge that failed, or unique pages smart scan skips "
                      "(unchanged or not)",
    "ksm_zero_pages": "empty pages KSM mapped to the kernel's zero page (use_zero_pages=1)",
    "general_profit": "bytes saved net of KSM's metadata: (pages_sharing + ksm_zero_pages) "
                      "x 4096 - rmap_items x 64; negative while ksmd has only built metadata",
    "full_scans": "complete passes of ksmd over all mergeable memory, since the run started",
    "pages_scanned": "pages ksmd compared, since the run started (skipped pages not counted)",
    "pages_skipped": "pages smart scan skipped, since the run started: pages that stayed unique "
                     "over several scans, changing or not",
    "stable_node_chains": "contents merged into more KSM pages than one, each of at most "
                          "max_page_sharing mappings",
    "stable_node_dups": "the KSM pages in those chains",
}
"""One phrase per counter of :data:`~ksmlab.scenario.model.GLOBAL_COUNTERS`."""

PLOT_LABELS: dict[str, str] = {
    "pages_sharing": "pages_sharing: further mappings of KSM pages (memory freed)",
    "pages_shared": "pages_shared: KSM pages (one copy per content)",
    "pages_unshared": "pages_unshared: unique, in the unstable tree",
    "pages_volatile": "pages_volatile: in no tree (new, changed, or unique and skipped "
                      "by smart scan)",
    "ksm_zero_pages": "ksm_zero_pages: empty pages mapped to the zero page",
}
"""Legend of the plot's page panel: short, but saying what each counts."""

assert set(COUNTER_HELP) == set(GLOBAL_COUNTERS)


def counters_epilog(width: int = 100) -> str:
    """The counters and their meanings, for ``ksmlab run --help``."""
    import textwrap

    lines = ["counters (per checkpoint; the JSON and CSV use these names):"]
    for name in GLOBAL_COUNTERS:
        lines += textwrap.wrap(COUNTER_HELP[name], width, initial_indent=f"  {name:<19} ",
                               subsequent_indent=" " * 22)
    return "\n".join(lines)


__all__ = ["COUNTER_HELP", "PLOT_LABELS", "counters_epilog"]
