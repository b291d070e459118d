"""The process groups a scenario names, followed through the file in time order.

While events are read in time order, :class:`Groups` knows which groups
exist at each moment (a forked group is born at its fork), how many
instances each has, their mappings, and which instances have exited, so a
reference to a group, an instance, a mapping or a region is checked where
it is written: a write to a process that exited earlier, or to a child
before its fork, is an error of the file.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from ksmlab.scenario.model import Region, Selector
from ksmlab.scenario.parse import ScenarioError, Shown, Table, names, show
from ksmlab.scenario.schema import MAX_INT, SELECTOR, EventTable, RegionTable
from ksmlab.scenario.units import NS_PER_S, format_duration


@dataclass(slots=True)
class Exits:
    """Which instances of a group have exited, as disjoint runs ``[first, stop)`` sorted by first.

    Runs, not one entry per instance: a group may have millions of instances,
    and each event is checked in time proportional to the log of the runs.
    """

    firsts: list[int] = field(default_factory=list)
    stops: list[int] = field(default_factory=list)
    times: list[int] = field(default_factory=list)

    def first_gone(self, first: int, stop: int) -> tuple[int, int] | None:
        """(instance, exit time) of the lowest exited instance in ``[first, stop)``, if any."""
        i = bisect.bisect_right(self.firsts, first) - 1
        if i >= 0 and self.stops[i] > first:
            return first, self.times[i]
        if i + 1 < len(self.firsts) and self.firsts[i + 1] < stop:
            return self.firsts[i + 1], self.times[i + 1]
        return None

    def add(self, first: int, stop: int, at_ns: int) -> None:
        """Instances ``[first, stop)``, none of them exited yet, exit at *at_ns*."""
        i = bisect.bisect_right(self.firsts, first)
        self.firsts.insert(i, first)
        self.stops.insert(i, stop)
        self.times.insert(i, at_ns)


@dataclass(slots=True)
class GroupState:
    """What the reader knows about a process group while checking event order.

    Attributes:
        birth_ns: when the group starts (or is forked).
        count: how many instances it has.
        mappings: its mappings' names and sizes in pages.
        exits: which instances have exited, and when.
        where: the key path of the table that made it.
    """

    birth_ns: int
    count: int
    mappings: dict[str, int]
    exits: Exits
    where: str


@dataclass(slots=True)
class Groups:
    """Every process group seen so far, by name, in the order they were made."""

    known: dict[str, GroupState] = field(default_factory=dict)

    def selector(self, t: Table, key: str) -> Selector:
        """The processes the string at *key* names (``guest``, ``guest[3]``, ``guest[0:4]``)."""
        text = t.string(key)
        m = SELECTOR.match(text.strip())
        if not m:
            raise t.fail(key, 'a process such as "guest", "guest[3]" or "guest[0:4]"', text)
        name, one, lo, hi = m.groups()
        if one is not None:
            return Selector(name, _index(one), _index(one) + 1, text)
        if lo is not None or hi is not None:
            if lo and hi and _digits_order(hi) <= _digits_order(lo):
                raise t.fail(key, "a non-empty range [first:stop] with first < stop", text)
            return Selector(name, _index(lo) if lo else 0, _index(hi) if hi else None, text)
        return Selector(name, 0, None, text)

    def selector_key(self, t: Table, key: str) -> Selector:
        """The processes the key *key* itself names (``[checkpoint.expect_process."guest[0]"]``)."""
        m = SELECTOR.match(key.strip())
        if not m:
            raise t.fail(key, 'a process such as "guest", "guest[3]" or "guest[0:4]" as the key',
                         Shown(f"key {show(key)}"))
        probe = Table(t.source, {key: key}, t.path)
        return self.selector(probe, key)

    def group_for(self, t: Table, key: str, sel: Selector, at_ns: int | None) -> GroupState:
        """The group *sel* names, checked to exist (at *at_ns*) and to have those instances."""
        g = self.known.get(sel.group)
        if g is None or (at_ns is not None and g.birth_ns > at_ns):
            known = [n for n, s in self.known.items() if at_ns is None or s.birth_ns <= at_ns] \
                or ["none"]
            when = "" if at_ns is None else f" at {format_duration(at_ns / NS_PER_S)}"
            raise t.fail(key, f"a process group that exists{when} ({names(known)})", sel.text)
        if sel.first >= g.count or (sel.stop is not None and sel.stop > g.count):
            raise t.fail(key, f"instances of {sel.group} within 0..{g.count - 1}", sel.text)
        return g

    def mapping_region(self, t: Table, g: GroupState, group: str) -> tuple[str, Region | None]:
        """The mapping of *g* that *t* names and the part of it (``region``) *t* acts on."""
        mapping = t.read(EventTable.MAPPING)
        if mapping not in g.mappings:
            raise t.fail("mapping", f"a mapping of {group} ({names(g.mappings)})", mapping)
        pages = g.mappings[mapping]
        r = t.table("region")
        if r is None:
            return mapping, None
        if r.has("start") or r.has("size"):
            first = r.read(RegionTable.START)
            n = r.read(RegionTable.SIZE, pages - first)
        else:
            first = r.read(RegionTable.FIRST_PAGE)
            n = r.read(RegionTable.PAGES, pages - first)
        r.done("start and size, or first_page and pages")
        if first >= pages or n < 1 or first + n > pages:
            raise ScenarioError(r.source, r.path,
                                f"a region inside {mapping} (pages 0..{pages - 1})",
                                f"pages {first}..{first + n - 1}")
        return mapping, Region(first, n)


def _digits_order(digits: str) -> tuple[int, str]:
    """Orders decimal digit strings as their numbers, without converting them."""
    d = digits.lstrip("0")
    return len(d), d


def _index(digits: str) -> int:
    """An instance number; one past :data:`MAX_INT` for longer ones (no group has that many)."""
    return int(digits) if len(digits.lstrip("0")) <= 20 else MAX_INT + 1


__all__ = ["Exits", "GroupState", "Groups"]
