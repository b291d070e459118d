"""Exposure: which pages KSM would share across security domains, and what salting would save instead.

A page merged between two domains (users, cgroups: containers, VMs' cgroups)
is one physical page both map, which is what cross-domain side channels on
KSM exploit (a write to a merged page takes a copy-on-write fault, so its
timing tells whether another domain holds the same bytes).  From the same
pages the estimate loads (:mod:`ksmlab.estimate.plan`):

* ``cross_contents`` / ``cross_pages``: the distinct contents, and the
  pages holding them, that at least two domains hold: what KSM could merge
  across domains;
* ``pairs``: for each pair of domains, the contents both hold and how many
  pages of each hold them;
* the **salting** figure: VMware's policy of merging only within a domain
  (a per-VM salt in the page hash) saves the sum over domains of each
  domain's own static bound (:func:`ksmlab.estimate.static.bound`), against
  the bound of merging everything together.

Zero-filled pages are left out of the exposure counts (they carry no secret;
KSM merges them everywhere, into the zero page under ``use_zero_pages``) and
counted apart in ``zero_cross_pages``; the salting figure counts them within
each domain.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ksmlab.constants import PAGE_SIZE, RMAP_ITEM_SIZE
from ksmlab.estimate.plan import LoadPlan
from ksmlab.estimate.static import (
    Bound,
    GroupBound,
    group_keys,
    groups_bound,
    page_groups,
    plan_bound,
)

__all__ = ["DOMAINS", "DomainPair", "Exposure", "exposure"]

DOMAINS = ("uid", "cgroup")

_CHUNK_CELLS = 4_000_000
"""Cells of a contents x domains block at a time (bounded memory for any host)."""


@dataclass(frozen=True, slots=True)
class DomainPair:
    """Two domains and what they hold in common (non-zero contents)."""

    a: str
    b: str
    contents: int
    pages_a: int
    """Pages of *a* holding a content *b* holds too."""
    pages_b: int

    def to_json(self) -> dict[str, Any]:
        """As a JSON object."""
        return {"a": self.a, "b": self.b, "contents": self.contents, "pages_a": self.pages_a,
                "pages_b": self.pages_b}


@dataclass(frozen=True, slots=True)
class Exposure:
    """Cross-domain sharing of a snapshot (see the module doc)."""

    by: str
    domains: tuple[GroupBound, ...]
    """Each domain's own bound (merging within it) and its pages shared outside."""
    cross_contents: int
    cross_pages: int
    zero_cross_pages: int
    pairs: tuple[DomainPair, ...]
    """Every pair holding a content in common, most contents first."""
    together: Bound
    """The bound of merging across domains (the whole snapshot's)."""

    @property
    def salted_saved_pages(self) -> int:
        """``pages_sharing + ksm_zero_pages`` bound when merging only within each domain."""
        return sum(d.bound.saved_pages for d in self.domains)

    @property
    def salted_general_profit(self) -> int:
        """``general_profit`` bound when merging only within each domain."""
        return self.salted_saved_pages * PAGE_SIZE - self.together.pages * RMAP_ITEM_SIZE

    def to_json(self, max_pairs: int = 1000) -> dict[str, Any]:
        """As a JSON object (at most *max_pairs* pairs, the most shared; ``pairs_total`` says
        how many there are)."""
        return {
            "by": self.by, "domains": [d.to_json() for d in self.domains],
            "cross_domain_contents": self.cross_contents, "cross_domain_pages": self.cross_pages,
            "zero_cross_domain_pages": self.zero_cross_pages,
            "pairs": [p.to_json() for p in self.pairs[:max_pairs]],
            "pairs_total": len(self.pairs),
            "merged_together": self.together.to_json(),
            "merged_within_domains": {
                "saved_pages": self.salted_saved_pages,
                "saved_bytes": self.salted_saved_pages * PAGE_SIZE,
                "general_profit": self.salted_general_profit},
        }


def _pairs(content: npt.NDArray[np.int64], dom: npt.NDArray[np.int64], names: list[str]
           ) -> tuple[int, int, tuple[DomainPair, ...]]:
    """(contents in >= 2 domains, pages holding them, the pairs) over the given pages."""
    if not content.size:
        return 0, 0, ()
    ndom = len(names)
    key = content * ndom + dom
    ukey, pages = np.unique(key, return_counts=True)
    kc, kd = ukey // ndom, ukey % ndom
    uc, ndoms = np.unique(kc, return_counts=True)
    multi = np.isin(kc, uc[ndoms >= 2])
    cross_contents = int(np.count_nonzero(ndoms >= 2))
    cross_pages = int(pages[multi].sum())
    kc, kd, pages = kc[multi], kd[multi], pages[multi]
    if not kc.size:
        return 0, 0, ()
    j = np.searchsorted(np.unique(kc), kc)
    ncont = int(j.max()) + 1
    both = np.zeros((ndom, ndom))
    held = np.zeros((ndom, ndom))
    step = max(1, _CHUNK_CELLS // ndom)
    for lo in range(0, ncont, step):
        sel = (j >= lo) & (j < lo + step)
        rows = j[sel] - lo
        ind = np.zeros((min(step, ncont - lo), ndom))
        cnt = np.zeros_like(ind)
        ind[rows, kd[sel]] = 1.0
        cnt[rows, kd[sel]] = pages[sel]
        both += ind.T @ ind
        held += cnt.T @ ind
    out = [DomainPair(names[a], names[b], int(both[a, b]), int(held[a, b]), int(held[b, a]))
           for a in range(ndom) for b in range(a + 1, ndom) if both[a, b] > 0]
    out.sort(key=lambda p: (-p.contents, p.a, p.b))
    return cross_contents, cross_pages, tuple(out)


def exposure(plan: LoadPlan, knobs: dict[str, str], by: str) -> Exposure:
    """The exposure of *plan*'s pages across the domains of *by* (``uid`` or ``cgroup``)."""
    if by not in DOMAINS:
        msg = f"by: expected one of {', '.join(DOMAINS)} (security domains), got {by!r}"
        raise ValueError(msg)
    names, proc_dom = group_keys(plan, by)
    dom = page_groups(plan, proc_dom)
    nz = ~plan.zero
    cross_contents, cross_pages, pairs = _pairs(plan.content[nz], dom[nz], names)
    zero_doms = np.unique(dom[plan.zero])
    zero_cross = int(np.count_nonzero(plan.zero)) if zero_doms.size >= 2 else 0
    return Exposure(by, tuple(groups_bound(plan, knobs, by)), cross_contents, cross_pages,
                    zero_cross, pairs, plan_bound(plan, knobs))
