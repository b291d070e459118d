"""A scenario, validated: typed, immutable records the runner executes.

The loader (:mod:`ksmlab.scenario.loader`) turns a TOML file into a
:class:`Scenario`; nothing else builds one from text.  Every record is a
frozen, slotted dataclass; times are integer nanoseconds of virtual time since
the scenario started (ksmd is started at time 0, after the processes present
at time 0 have been set up), sizes are pages.

The format itself is documented in ``docs/scenarios.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

ContentKind = Literal["zero", "random", "fill", "image", "file"]
Advice = Literal["mergeable", "unmergeable", "dontneed"]
WriteData = Literal["random", "zero"]

GLOBAL_COUNTERS = (
    "pages_shared", "pages_sharing", "pages_unshared", "pages_volatile", "ksm_zero_pages",
    "general_profit", "full_scans", "pages_scanned", "pages_skipped", "stable_node_chains",
    "stable_node_dups",
)
"""The global counters recorded at checkpoints and in the timeline.

``full_scans``, ``pages_scanned`` and ``pages_skipped`` are counted from the
start of the scenario (the real kernel's run from boot); the others are the
values of the ``/sys/kernel/mm/ksm`` files.
"""

DELTA_COUNTERS = frozenset({"full_scans", "pages_scanned", "pages_skipped"})
"""Counters reported as the growth since the scenario started."""

BYTE_COUNTERS = frozenset({"general_profit", "ksm_process_profit"})
"""Counters in bytes (expectations on them may be written as sizes, ``"40MiB"``)."""

PROCESS_COUNTERS = ("ksm_rmap_items", "ksm_zero_pages", "ksm_merging_pages", "ksm_process_profit")
"""The ``/proc/PID/ksm_stat`` numbers summed per process group at checkpoints."""


@dataclass(frozen=True, slots=True)
class Content:
    """A content model: what a mapping holds when its process starts.

    Attributes:
        name: the name mappings refer to (the key under ``[content]``).
        kind: ``zero`` (zero-filled), ``random`` (every page unique),
            ``fill`` (every page the byte *byte*), ``image`` (a seeded
            random image of *pages* pages shared by every mapping that uses
            it: page *i* of a mapping is image page ``(offset + i) mod pages``),
            ``file`` (the bytes of *path*, page by page from *offset*).
        seed: the seed of the image, of the file's extra page offsets and of
            this content's share of every mapping's private/zero choice.
        pages: image size in pages (image only; None = the largest mapping
            using it).
        byte: the fill byte (fill only).
        path: the file (file only), absolute.
        offset: first page of the image or file used (pages).
        zero_fraction: fraction of each mapping's pages replaced by zeros,
            chosen per mapping instance (seeded).
        private_fraction: fraction of each mapping's pages replaced by
            unique random pages, chosen per mapping instance (seeded).
    """

    name: str
    kind: ContentKind
    seed: int
    pages: int | None = None
    byte: int = 0
    path: Path | None = None
    offset: int = 0
    zero_fraction: float = 0.0
    private_fraction: float = 0.0


@dataclass(frozen=True, slots=True)
class Mapping:
    """One private anonymous mapping of every process of a group.

    Attributes:
        name: the name events refer to, unique within the group.
        pages: length in pages.
        content: name of the :class:`Content` it is filled with.
        mergeable: ``madvise(MADV_MERGEABLE)`` right after it is filled.
    """

    name: str
    pages: int
    content: str
    mergeable: bool = True


@dataclass(frozen=True, slots=True)
class ProcessGroup:
    """*count* identical processes (``name[0]`` ... ``name[count-1]``).

    Attributes:
        name: group name; an instance is ``name[i]`` (or just ``name`` if
            count is 1).
        count: number of processes.
        start_ns: when they are spawned, mapped and filled (0: before ksmd starts).
        merge_any: ``prctl(PR_SET_MEMORY_MERGE, 1)`` before mapping anything.
        mappings: their mappings, created in this order.
    """

    name: str
    count: int
    start_ns: int
    merge_any: bool
    mappings: tuple[Mapping, ...]

    def instance_name(self, i: int) -> str:
        """The name of instance *i* as reports print it."""
        return self.name if self.count == 1 else f"{self.name}[{i}]"


@dataclass(frozen=True, slots=True)
class Selector:
    """Some instances of one process group: ``name``, ``name[i]`` or ``name[i:j]``.

    Attributes:
        group: the group name.
        first: first instance index.
        stop: one past the last index, or None for "to the end of the group".
        text: as written in the file.
    """

    group: str
    first: int = 0
    stop: int | None = None
    text: str = ""

    def indices(self, count: int) -> range:
        """The selected instance indices of a group of *count* instances."""
        return range(self.first, count if self.stop is None else min(self.stop, count))


@dataclass(frozen=True, slots=True)
class Region:
    """Pages ``first .. first + pages - 1`` of a mapping."""

    first: int
    pages: int


@dataclass(frozen=True, slots=True)
class WriteActivity:
    """Writes at a steady rate to a region of a mapping of some processes.

    Each selected process writes *rate* pages per second between *start_ns*
    and *stop_ns* (or until it exits, or the scenario ends).  A write puts
    *nbytes* random bytes at a random offset of one page (``data="random"``:
    the page becomes unique, and a KSM page is COW-broken) or zeroes the whole
    page (``data="zero"``).  The page is chosen at random in the region
    (``pick="random"``) or in turn (``pick="sequential"``).  Writes come
    evenly spaced (``arrivals="even"``) or as a Poisson process
    (``arrivals="poisson"``).  Everything random is drawn from the scenario
    seed, so runs repeat.

    Attributes:
        index: position in the file's ``[[activity]]`` list.
        process: the writers.
        mapping: the mapping written.
        region: the pages written.
        rate: page writes per second, per process.
        start_ns: first write no earlier than this.
        stop_ns: no write at or after this (None: to the end).
        arrivals: ``even`` or ``poisson``.
        pick: ``random`` or ``sequential``.
        data: ``random`` or ``zero``.
        nbytes: bytes written per write (``data="random"``).
        share: the rate as the file gave it, as a share of the region per
            second (``"10%/s"``: 0.1); None if given in writes per second.
    """

    index: int
    process: Selector
    mapping: str
    region: Region | None
    rate: float
    start_ns: int
    stop_ns: int | None
    arrivals: Literal["even", "poisson"] = "even"
    pick: Literal["random", "sequential"] = "random"
    data: WriteData = "random"
    nbytes: int = 8
    share: float | None = None


@dataclass(frozen=True, slots=True)
class Event:
    """Something done once at a virtual time (the base of the event kinds).

    Attributes:
        index: position in the file's ``[[event]]`` list (ties at one time
            run in file order).
        at_ns: when.
    """

    index: int
    at_ns: int

    @property
    def action(self) -> str:
        """The event's ``action`` as written in the file."""
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class WriteEvent(Event):
    """Write every page of a region once (``action = "write"``)."""

    process: Selector
    mapping: str
    region: Region | None
    data: WriteData = "random"
    nbytes: int = 8

    @property
    def action(self) -> str:
        """``write``."""
        return "write"


@dataclass(frozen=True, slots=True)
class ForkEvent(Event):
    """Every selected process forks *count* children, named group *child*."""

    process: Selector
    child: str
    count: int = 1

    @property
    def action(self) -> str:
        """``fork``."""
        return "fork"


@dataclass(frozen=True, slots=True)
class ExitEvent(Event):
    """The selected processes exit."""

    process: Selector

    @property
    def action(self) -> str:
        """``exit``."""
        return "exit"


@dataclass(frozen=True, slots=True)
class MadviseEvent(Event):
    """``madvise(region, advice)`` in every selected process."""

    process: Selector
    mapping: str
    region: Region | None
    advice: Advice

    @property
    def action(self) -> str:
        """``madvise``."""
        return "madvise"


@dataclass(frozen=True, slots=True)
class PrctlEvent(Event):
    """``prctl(PR_SET_MEMORY_MERGE, merge_any)`` in every selected process."""

    process: Selector
    merge_any: bool

    @property
    def action(self) -> str:
        """``prctl``."""
        return "prctl"


@dataclass(frozen=True, slots=True)
class KnobsEvent(Event):
    """Write KSM knobs (``/sys/kernel/mm/ksm``), in the given order."""

    knobs: tuple[tuple[str, str], ...]

    @property
    def action(self) -> str:
        """``knobs``."""
        return "knobs"


@dataclass(frozen=True, slots=True)
class Expectation:
    """A check on a counter at a checkpoint: ``min <= value <= max``.

    Attributes:
        counter: a global counter (:data:`GLOBAL_COUNTERS`) or, with
            *process*, a ksm_stat number (:data:`PROCESS_COUNTERS`) summed
            over the selected live processes.
        process: None for a global counter.
        min: lower bound (None: none); equal to *max* for an exact value.
        max: upper bound (None: none).
    """

    counter: str
    process: Selector | None
    min: int | None
    max: int | None

    def describe(self) -> str:
        """``pages_shared == 16``, ``guest: ksm_merging_pages >= 10``, ``1 <= x <= 5``."""
        who = f"{self.process.text}: " if self.process else ""
        if self.min is not None and self.min == self.max:
            return f"{who}{self.counter} == {self.min}"
        if self.max is None:
            return f"{who}{self.counter} >= {self.min}"
        if self.min is None:
            return f"{who}{self.counter} <= {self.max}"
        return f"{who}{self.min} <= {self.counter} <= {self.max}"

    def holds(self, value: int) -> bool:
        """Whether *value* satisfies the bounds."""
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """Where the counters are recorded (and checked).

    Exactly one of *at_ns* and *full_scans* is set.

    Attributes:
        index: position in the file's ``[[checkpoint]]`` list.
        name: the label of its row.
        at_ns: at this virtual time (after the events of that time).
        full_scans: as soon as this many full scans have completed since the start.
        timeout_ns: a *full_scans* checkpoint not reached by this time fails
            the run.
        expect: the checks made there.
    """

    index: int
    name: str
    at_ns: int | None
    full_scans: int | None
    timeout_ns: int
    expect: tuple[Expectation, ...] = ()


@dataclass(frozen=True, slots=True)
class Scenario:
    """A whole validated scenario.

    Attributes:
        source: the file it was read from ("<built-in>" for the default).
        name: title of reports.
        description: a sentence or two for reports.
        seed: the seed every random choice derives from.
        duration_ns: when the run ends; None: at the last timed item, or
            when the last full-scan checkpoint is reached.
        sample_interval_ns: timeline sampling period.
        knobs: KSM knobs written before the start, in write order; ``run``
            last (default 1: ksmd starts at time 0).
        contents: content models by name.
        processes: process groups in file order.
        activities: steady write activities.
        events: one-off events, in time order (file order for ties).
        checkpoints: checkpoints in file order.
        ksmd_cpu_at_start_ns: ksmd's CPU time since boot when the scenario starts
            (``ksmd_cpu_at_start``; 0: a freshly booted host).  The models start
            their ksmd with it: the scan-time advisor's first step counts all of
            it (docs/scenarios.md); the real kernel's ksmd has its own.
    """

    source: str
    name: str
    description: str
    seed: int
    duration_ns: int | None
    sample_interval_ns: int
    knobs: tuple[tuple[str, str], ...]
    contents: dict[str, Content] = field(default_factory=dict)
    processes: tuple[ProcessGroup, ...] = ()
    activities: tuple[WriteActivity, ...] = ()
    events: tuple[Event, ...] = ()
    checkpoints: tuple[Checkpoint, ...] = ()
    ksmd_cpu_at_start_ns: int = 0

    @property
    def planned_end_ns(self) -> int:
        """The end of the run as far as the file fixes it (full-scan checkpoints may extend it)."""
        if self.duration_ns is not None:
            return self.duration_ns
        times = [c.at_ns for c in self.checkpoints if c.at_ns is not None]
        times += [e.at_ns for e in self.events]
        times += [a.stop_ns for a in self.activities if a.stop_ns is not None]
        times += [g.start_ns for g in self.processes]
        return max(times, default=0)

    def knob(self, name: str) -> str | None:
        """The value the scenario gives knob *name* at the start, if any."""
        return dict(self.knobs).get(name)

    def total_pages(self) -> int:
        """Pages mapped by the processes declared in the file (forks not counted)."""
        return sum(g.count * m.pages for g in self.processes for m in g.mappings)


__all__ = [
    "BYTE_COUNTERS",
    "DELTA_COUNTERS",
    "GLOBAL_COUNTERS",
    "PROCESS_COUNTERS",
    "Advice",
    "Checkpoint",
    "Content",
    "ContentKind",
    "Event",
    "ExitEvent",
    "Expectation",
    "ForkEvent",
    "KnobsEvent",
    "MadviseEvent",
    "Mapping",
    "PrctlEvent",
    "ProcessGroup",
    "Region",
    "Scenario",
    "Selector",
    "WriteActivity",
    "WriteData",
    "WriteEvent",
]
