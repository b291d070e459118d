"""The scenario format as data: its tables, their fields, each field's type, limits and default.

Every plain value of a scenario file is read through one :class:`Field` of
this module (``table.read(ProcessTable.COUNT)``, :mod:`~ksmlab.scenario.parse`),
which makes the error message from it, so a limit or a default is written
once, here.  What is not plain data stays with the readers
(:mod:`~ksmlab.scenario.sections`): references between sections, the order
of life events, defaults computed from other fields.  The knobs of ``[ksm]``
are :data:`ksmlab.scenario.knobs.KNOBS`, derived from the kernel's own table.
``docs/scenarios.md`` describes the same format for people.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from ksmlab.constants import PAGE_SIZE
from ksmlab.scenario.units import NS_PER_S

T = TypeVar("T")

MISSING: Any = object()
"""A field that is absent, or a :class:`Field` without default (required)."""

DEFAULT_SCAN_TIMEOUT_NS = 600 * NS_PER_S
"""How long a ``full_scans`` checkpoint may take when the scenario has no duration."""

MAX_INT = (1 << 64) - 1
"""The largest integer a field accepts unless it says less: the kernel's counters and sizes
are 64-bit, and so is every count a scenario can mean."""

MAX_PROCESSES = 1 << 22
"""The most processes of one group (and children of one fork): the kernel's PID_MAX_LIMIT,
the largest value /proc/sys/kernel/pid_max accepts on 64-bit (proc(5))."""

MAX_RATE = float(NS_PER_S)
"""The fastest activity: one write per nanosecond, the clock's resolution."""

MIN_RATE = 1e-9
"""The slowest activity: one write in about 32 years (slower writes never come)."""

NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
"""A name of a content model, process group or mapping."""

SELECTOR = re.compile(r"^([A-Za-z_][A-Za-z0-9_.-]*)(?:\[(\d+)\]|\[(\d*):(\d*)\])?$")
"""Processes of a group: ``guest``, ``guest[3]``, ``guest[0:4]``, ``guest[2:]``."""

TOP_TABLES = ("scenario", "ksm", "content", "process", "activity", "event", "checkpoint",
              "timeline")
"""The top-level tables, in the order the format lists them."""

CONTENT_FIELDS: dict[str, frozenset[str]] = {
    "zero": frozenset({"kind", "private_fraction", "seed"}),
    "random": frozenset({"kind", "seed"}),
    "fill": frozenset({"kind", "byte", "zero_fraction", "private_fraction", "seed"}),
    "image": frozenset({"kind", "pages", "offset", "zero_fraction", "private_fraction", "seed"}),
    "file": frozenset({"kind", "path", "offset", "zero_fraction", "private_fraction", "seed"}),
}
"""The kinds of ``[content.NAME]``, each with the fields it takes."""

ACTIONS = ("write", "fork", "exit", "madvise", "prctl", "knobs")
"""The actions of an ``[[event]]``."""

FieldKind = Literal["string", "word", "boolean", "integer", "number", "size", "pages", "duration",
                    "rate"]


@dataclass(frozen=True)  # not slots: Field[int](...) sets __orig_class__, a TypeError then
class Field(Generic[T]):
    """One field of a table: its key, what it accepts, its default.

    Attributes:
        key: the TOML key.
        kind: ``string``; ``word`` (one of *choices*); ``boolean``; ``integer``
            (from *low* to *high*, or up to *limit*, named only when exceeded);
            ``number`` (finite, from *low*, excluded if *open_low*, to *high*);
            ``size`` (bytes, or a text such as ``"8MiB"``); ``pages`` (a size
            that is a whole number of pages, read as pages; zero only if
            *allow_zero*); ``duration`` (seconds or a text such as ``"10s"``,
            read as nanoseconds; > 0 if *positive*); ``rate`` (writes per second, a
            number > 0, or a share of a region per second, a text such as ``"10%/s"``:
            read as ``(value, is_share)``, 10%/s as ``(0.1, True)``).
        default: the value when absent; :data:`MISSING`: the field is required
            (or its default is computed by the reader).
    """

    key: str
    kind: FieldKind
    default: Any = MISSING
    low: int | float = 0
    high: int | float | None = None
    limit: int = MAX_INT
    choices: tuple[str, ...] = ()
    open_low: bool = False
    allow_zero: bool = False
    positive: bool = False


_DATA = ("random", "zero")
_BYTES = Field[int]("bytes", "integer", low=1, high=PAGE_SIZE, default=8)


class ScenarioTable:
    """``[scenario]``: what the run is."""

    NAME = Field[str]("name", "string")  # default: the file name without .toml
    DESCRIPTION = Field[str]("description", "string", default="")
    SEED = Field[int]("seed", "integer", default=0)
    DURATION = Field[int | None]("duration", "duration", default=None, positive=True)
    KSMD_CPU_AT_START = Field[int]("ksmd_cpu_at_start", "duration", default=0)


class ContentTable:
    """``[content.NAME]``: what a mapping holds (which fields a kind takes: :data:`CONTENT_FIELDS`)."""

    KIND = Field[str]("kind", "word", choices=tuple(CONTENT_FIELDS))
    SEED = Field[int]("seed", "integer")  # default: derived from the scenario's seed and the name
    ZERO_FRACTION = Field[float]("zero_fraction", "number", low=0.0, high=1.0, default=0.0)
    PRIVATE_FRACTION = Field[float]("private_fraction", "number", low=0.0, high=1.0, default=0.0)
    PAGES = Field[int | None]("pages", "integer", low=1, default=None)
    BYTE = Field[int]("byte", "integer", low=0, high=255, default=0)
    OFFSET = Field[int]("offset", "pages", allow_zero=True, default=0)
    PATH = Field[str]("path", "string")


class ProcessTable:
    """``[[process]]``: a group of identical processes."""

    NAME = Field[str]("name", "string")
    COUNT = Field[int]("count", "integer", low=1, default=1, limit=MAX_PROCESSES)
    START = Field[int]("start", "duration", default=0)
    MERGE_ANY = Field[bool]("merge_any", "boolean", default=False)


class MappingTable:
    """``[[process.mapping]]``: one anonymous mapping of each process (size or pages)."""

    NAME = Field[str]("name", "string", default="mem")
    SIZE = Field[int]("size", "pages")
    PAGES = Field[int]("pages", "integer", low=1)
    CONTENT = Field[str]("content", "string")
    MERGEABLE = Field[bool]("mergeable", "boolean", default=True)


class RegionTable:
    """``region = {...}`` of an event or activity: start and size, or first_page and pages."""

    START = Field[int]("start", "pages", allow_zero=True, default=0)
    SIZE = Field[int]("size", "pages")  # default: the rest of the mapping
    FIRST_PAGE = Field[int]("first_page", "integer", default=0)
    PAGES = Field[int]("pages", "integer", low=1)  # default: the rest of the mapping


class EventTable:
    """``[[event]]``: one action at one time."""

    AT = Field[int]("at", "duration")
    ACTION = Field[str]("action", "word", choices=ACTIONS)
    MAPPING = Field[str]("mapping", "string")
    DATA = Field[str]("data", "word", choices=_DATA, default="random")
    BYTES = _BYTES
    ADVICE = Field[str]("advice", "word", choices=("mergeable", "unmergeable", "dontneed"))
    CHILD = Field[str]("child", "string")
    COUNT = Field[int]("count", "integer", low=1, default=1, limit=MAX_PROCESSES)
    MERGE_ANY = Field[bool]("merge_any", "boolean")


class ActivityTable:
    """``[[activity]]``: writes at a rate (the rate's range is :data:`MIN_RATE`..:data:`MAX_RATE`)."""

    MAPPING = EventTable.MAPPING
    RATE = Field[tuple[float, bool]]("rate", "rate")
    START = Field[int | None]("start", "duration", default=None)
    STOP = Field[int | None]("stop", "duration", default=None)
    ARRIVALS = Field[str]("arrivals", "word", choices=("even", "poisson"), default="even")
    PICK = Field[str]("pick", "word", choices=("random", "sequential"), default="random")
    DATA = EventTable.DATA
    BYTES = _BYTES


class CheckpointTable:
    """``[[checkpoint]]``: at a time, or after full scans (with a timeout)."""

    AT = Field[int | None]("at", "duration", default=None)
    FULL_SCANS = Field[int | None]("full_scans", "integer", low=1, default=None)
    TIMEOUT = Field[int]("timeout", "duration", positive=True)  # default: DEFAULT_SCAN_TIMEOUT_NS
    NAME = Field[str]("name", "string")  # default: the time, or "N full scans"


class TimelineTable:
    """``[timeline]``: the sampling period."""

    INTERVAL = Field[int | None]("interval", "duration", default=None, positive=True)


__all__ = [
    "ACTIONS",
    "CONTENT_FIELDS",
    "DEFAULT_SCAN_TIMEOUT_NS",
    "MAX_INT",
    "MAX_PROCESSES",
    "MAX_RATE",
    "MIN_RATE",
    "MISSING",
    "NAME",
    "SELECTOR",
    "TOP_TABLES",
    "ActivityTable",
    "CheckpointTable",
    "ContentTable",
    "EventTable",
    "Field",
    "MappingTable",
    "ProcessTable",
    "RegionTable",
    "ScenarioTable",
    "TimelineTable",
]
