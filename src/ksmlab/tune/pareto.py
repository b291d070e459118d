"""The Pareto front of savings against ksmd's CPU, and the recommendation rule.

A configuration is on the front when no other one saves at least as much
for at most as much CPU, and strictly more of one or less of the other.
Equal points do not dominate each other, so both stay.

The recommendation is the configuration that saves the most memory
(``general_profit`` at the end) among those whose ksmd CPU share is within
the budget (all of them without a budget); a tie goes to the lower CPU
share, then to the earlier configuration.  It is always on the front.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Point", "Recommendation", "pareto_front", "recommend"]


@dataclass(frozen=True, slots=True)
class Point:
    """A finished configuration: its index, ksmd's CPU share (percent of one CPU), the saving."""

    index: int
    cpu_percent: float
    saved_bytes: int


@dataclass(frozen=True, slots=True)
class Recommendation:
    """The rule's answer: the configuration chosen (None: none fits) and why, in words."""

    index: int | None
    reason: str


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
    best = min(fits, key=lambda p: (-p.saved_bytes, p.cpu_percent, p.index))
    within = ("" if cpu_budget_percent is None
              else f" within the budget of {cpu_budget_percent:g}% of one CPU")
    return Recommendation(best.index, f"saves the most{within} ({len(fits)} of {len(points)} "
                                      f"configurations fit)")
