"""The static bound: what merging every duplicate would save, counted from the snapshot alone.

This is what tools that count duplicate pages in a dump give, with KSM's own
accounting added so that it can be drawn beside the predicted curve:

* ``duplicate_pages``: loaded pages minus distinct contents (each content
  kept once), the usual "duplicate pages" figure;
* ``zero_pages``: loaded pages that are zero-filled;
* ``freeable_frames``: the physical pages merging could free.  Pages a fork
  parent and child still share are one physical page already, so they free
  nothing by themselves;
* the **KSM bound**: ``pages_sharing`` and ``ksm_zero_pages`` if every
  mapping of every content that exists in at least two physical pages were
  merged, which is where ksmd's curve tends when nothing is rewritten.  A
  content's ``m`` mappings fill ``ceil(m / max_page_sharing)`` KSM pages,
  each counting one in ``pages_shared`` and its other mappings in
  ``pages_sharing``; with ``use_zero_pages`` every zero-filled mapping
  counts in ``ksm_zero_pages`` instead.  A content held by one physical page
  (however many fork relatives map it) is never merged: KSM does not merge
  a page with itself.  ``general_profit`` then subtracts an rmap_item per
  loaded page (ksmd gives every page it scans one).

:func:`bound` computes it for any subset of the pages: the whole snapshot,
one process, one group (``--by``): merging within that subset only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ksmlab.constants import PAGE_SIZE, RMAP_ITEM_SIZE
from ksmlab.estimate.plan import LoadPlan

__all__ = ["GROUPINGS", "Bound", "GroupBound", "bound", "group_keys", "groups_bound",
           "page_groups", "plan_bound", "processes_bound"]

Ints = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]

GROUPINGS = ("uid", "cgroup", "comm")


@dataclass(frozen=True, slots=True)
class Bound:
    """The static figures of a set of loaded pages (see the module doc)."""

    pages: int
    frames: int
    contents: int
    zero_pages: int
    duplicate_pages: int
    freeable_frames: int
    pages_shared: int
    pages_sharing: int
    ksm_zero_pages: int

    @property
    def saved_pages(self) -> int:
        """``pages_sharing + ksm_zero_pages`` at the bound."""
        return self.pages_sharing + self.ksm_zero_pages

    @property
    def saved_bytes(self) -> int:
        """The bound in bytes: ``(pages_sharing + ksm_zero_pages) x 4096``."""
        return self.saved_pages * PAGE_SIZE

    @property
    def general_profit(self) -> int:
        """``general_profit`` at the bound: the saving less an rmap_item per loaded page."""
        return self.saved_bytes - self.pages * RMAP_ITEM_SIZE

    def to_json(self) -> dict[str, Any]:
        """The figures, and the derived ones, as a JSON object."""
        return {**asdict(self), "saved_pages": self.saved_pages, "saved_bytes": self.saved_bytes,
                "general_profit": self.general_profit}


def bound(content: Ints, frame: Ints, zero: Bools, *, use_zero_pages: bool,
          max_page_sharing: int) -> Bound:
    """The static bound of the pages given by their *content* ids, *frame* ids and *zero*
    flags (one entry per mapping; see the module doc)."""
    n = int(content.size)
    if n == 0:
        return Bound(0, 0, 0, 0, 0, 0, 0, 0, 0)
    uc, cinv = np.unique(content, return_inverse=True)
    cinv = cinv.ravel()
    mappings = np.bincount(cinv)
    uf, first = np.unique(frame, return_index=True)
    frames_of = np.bincount(cinv[first], minlength=uc.size)
    is_zero = np.zeros(uc.size, bool)
    is_zero[cinv[zero]] = True
    ksm_zero = int(mappings[is_zero].sum()) if use_zero_pages else 0
    merged = frames_of >= 2
    if use_zero_pages:
        merged &= ~is_zero
    mps = max(2, int(max_page_sharing))
    dups = -(-mappings[merged] // mps)  # ceil: KSM pages (stable node dups) per content
    shared = int(dups.sum())
    sharing = int(mappings[merged].sum()) - shared
    freed = int(np.maximum(frames_of[merged] - dups, 0).sum())
    if use_zero_pages:
        freed += int(frames_of[is_zero].sum())
    return Bound(pages=n, frames=int(uf.size), contents=int(uc.size),
                 zero_pages=int(np.count_nonzero(zero)), duplicate_pages=n - int(uc.size),
                 freeable_frames=freed, pages_shared=shared, pages_sharing=sharing,
                 ksm_zero_pages=ksm_zero)


def plan_bound(plan: LoadPlan, knobs: dict[str, str], sel: slice | Ints | None = None) -> Bound:
    """:func:`bound` of *plan*'s pages (all, or those *sel* selects) under *knobs*."""
    s = slice(None) if sel is None else sel
    return bound(plan.content[s], plan.frame[s], plan.zero[s],
                 use_zero_pages=knobs.get("use_zero_pages", "0").strip() == "1",
                 max_page_sharing=int(knobs.get("max_page_sharing", "256")))


@dataclass(frozen=True, slots=True)
class GroupBound:
    """One process or group: its pages' bound when merged among themselves, and how many of
    its pages hold a content found outside it too."""

    name: str
    processes: int
    bound: Bound
    shared_outside: int
    """Pages whose content another process (for a group: another group) holds too."""

    def to_json(self) -> dict[str, Any]:
        """As a JSON object."""
        return {"name": self.name, "processes": self.processes, **self.bound.to_json(),
                "shared_outside": self.shared_outside}


def group_keys(plan: LoadPlan, by: str) -> tuple[list[str], npt.NDArray[np.int64]]:
    """The group names of *by* (``uid``, ``cgroup``, ``comm`` or ``pid``) and each process's
    index into them (processes in plan order)."""
    key: Callable[[Any], str]
    if by == "uid":
        key = lambda p: "unknown" if p.uid is None else str(p.uid)  # noqa: E731
    elif by == "cgroup":
        key = lambda p: p.cgroup or "/"  # noqa: E731
    elif by == "comm":
        key = lambda p: p.comm  # noqa: E731
    elif by == "pid":
        key = lambda p: p.label  # noqa: E731
    else:
        msg = f"by: expected one of {', '.join((*GROUPINGS, 'pid'))}, got {by!r}"
        raise ValueError(msg)
    names: list[str] = []
    index: dict[str, int] = {}
    of = np.zeros(len(plan.processes), np.int64)
    for i, p in enumerate(plan.processes):
        k = key(p)
        if k not in index:
            index[k] = len(names)
            names.append(k)
        of[i] = index[k]
    return names, of


def page_groups(plan: LoadPlan, proc_group: npt.NDArray[np.int64]) -> Ints:
    """Each loaded page's group, from its process's."""
    out = np.zeros(len(plan), np.int64)
    for i, p in enumerate(plan.processes):
        out[p.start:p.start + p.pages] = proc_group[i]
    return out


def _outside(content: Ints, group: Ints) -> Bools:
    """Pages whose content some page of another group holds too."""
    if not content.size:
        return np.zeros(0, bool)
    pairs = np.unique(np.stack([content, group], axis=1), axis=0)
    uc, groups = np.unique(pairs[:, 0], return_counts=True)
    return np.isin(content, uc[groups >= 2])


def groups_bound(plan: LoadPlan, knobs: dict[str, str], by: str) -> list[GroupBound]:
    """Per group of *by*: the bound of merging within the group, and its pages shared outside."""
    names, proc_group = group_keys(plan, by)
    g = page_groups(plan, proc_group)
    outside = _outside(plan.content, g)
    counts = np.bincount(proc_group, minlength=len(names))
    order = np.argsort(g, kind="stable")
    ends = np.cumsum(np.bincount(g, minlength=len(names)))
    out = []
    for i, name in enumerate(names):
        sel = order[ends[i - 1] if i else 0:ends[i]]
        out.append(GroupBound(name, int(counts[i]), plan_bound(plan, knobs, sel),
                              int(np.count_nonzero(outside[sel]))))
    return out


def processes_bound(plan: LoadPlan, knobs: dict[str, str]) -> list[GroupBound]:
    """Per process (``comm[pid]``): its own bound and its pages shared with other processes."""
    return groups_bound(plan, knobs, "pid")
