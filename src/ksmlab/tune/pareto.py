"""The Pareto front of savings against ksmd's CPU, and the recommendation rule.

A configuration is on the front when no other one saves at least as much
for at most as much CPU, and strictly more of one or less of the other.
Equal points do not dominate each other, so both stay.

The recommendation, among the configurations whose ksmd CPU share is within
the budget (all of them without a budget):

1. those whose saving (``general_profit`` at the end) is within
   :data:`SAVING_TIE` of the most: savings that close are one saving, since
   two runs of the same knobs on the real kernel differ by as much;
2. of those, the ones whose CPU share is within :data:`CPU_TIE` of the
   least: likewise one cost;
3. of those, the gentlest: the lowest scan rate the knobs allow
   (``pages_to_scan`` per ``sleep_millisecs``), then the lower CPU share,
   the larger saving, the earlier configuration.

So an operator is not sent to twice the scan rate for a saving or a CPU
share that the next run could reverse.  The others that step 2 kept are
reported beside the choice as equivalent: which of them the rule names is
a close call.  The answer can lie off the front,
but by less than these tolerances.  (A strict "most saving" rule flipped
between the model and the kernel on savings 1 to 3 % apart: docs/tune.md.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["CPU_TIE", "SAVING_TIE", "Point", "Recommendation", "pareto_front", "recommend"]

SAVING_TIE = 0.05
"""Savings within 5 % of each other are one: the real kernel's own general_profit differed by
up to 4.8 % between two runs of the same scenario (docs/cost-model.md)."""
CPU_TIE = 0.10
"""CPU shares within 10 % of each other are one: the real ksmd's CPU for the same knobs and
workload differed by 1.4 to 32 % between two runs (docs/tune.md, docs/cost-model.md)."""


@dataclass(frozen=True, slots=True)
class Point:
    """A finished configuration: its index, ksmd's CPU share (percent of one CPU), the saving."""

    index: int
    cpu_percent: float
    saved_bytes: int
    scan_rate: float = 0.0
    """Pages per second the knobs let ksmd scan (``pages_to_scan`` x 1000 / ``sleep_millisecs``;
    infinite with no sleep or when the advisor sets ``pages_to_scan``): the last tie-break."""


@dataclass(frozen=True, slots=True)
class Recommendation:
    """The rule's answer: the configuration chosen (None: none fits) and why, in words.

    Attributes:
        index: the configuration chosen, or None.
        reason: why, in words.
        equivalent: the other configurations the rule counted as equal to it (saving and
            CPU share within the tolerances), in the rule's order: a close call that
            another run, or the real kernel, may decide the other way.
    """

    index: int | None
    reason: str
    equivalent: tuple[int, ...] = ()


def _dominates(q: Point, p: Point) -> bool:
    return (q.cpu_percent <= p.cpu_percent and q.saved_bytes >= p.saved_bytes
            and (q.cpu_percent < p.cpu_percent or q.saved_bytes > p.saved_bytes))


def pareto_front(points: Sequence[Point]) -> list[int]:
    """The indices of the points on the front, by CPU share (then saving, then index).

    Sorting by CPU ascending and saving descending, a point is on the front
    exactly when it saves more than every point before it, or equals the
    last point kept (O(n log n)).
    """
    order = sorted(points, key=lambda p: (p.cpu_percent, -p.saved_bytes, p.index))
    front: list[Point] = []
    for p in order:
        if not front or p.saved_bytes > front[-1].saved_bytes:
            front.append(p)
        elif (p.saved_bytes == front[-1].saved_bytes
              and p.cpu_percent == front[-1].cpu_percent):
            front.append(p)  # the same point twice: neither dominates
    return [p.index for p in front]


def recommend(points: Sequence[Point], cpu_budget_percent: float | None) -> Recommendation:
    """The rule of the module doc over *points* (the grid's finished configurations)."""
    if not points:
        return Recommendation(None, "no configuration finished")
    fits = [p for p in points if cpu_budget_percent is None or p.cpu_percent <= cpu_budget_percent]
    if not fits:
        cheapest = min(points, key=lambda p: (p.cpu_percent, -p.saved_bytes, p.index))
        return Recommendation(None, f"no configuration kept ksmd within {cpu_budget_percent:g}% "
                                    f"of one CPU; the cheapest, configuration {cheapest.index}, "
                                    f"used {cheapest.cpu_percent:.3g}%")
    top = max(p.saved_bytes for p in fits)
    ties = [p for p in fits if p.saved_bytes >= top - SAVING_TIE * abs(top)]
    least = min(p.cpu_percent for p in ties)
    calm = [p for p in ties if p.cpu_percent <= least * (1 + CPU_TIE)]
    ranked = sorted(calm, key=lambda p: (p.scan_rate, p.cpu_percent, -p.saved_bytes, p.index))
    best = ranked[0]
    within = ("" if cpu_budget_percent is None
              else f" within the budget of {cpu_budget_percent:g}% of one CPU")
    return Recommendation(best.index, f"saves the most{within} ({len(fits)} of {len(points)} "
                                      f"configurations fit), counting savings within "
                                      f"{SAVING_TIE:.0%} and CPU shares within {CPU_TIE:.0%} as "
                                      f"equal and then taking the lowest scan rate",
                          tuple(p.index for p in ranked[1:]))
