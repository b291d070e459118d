"""Read a scenario file (TOML) into a validated :class:`~ksmlab.scenario.model.Scenario`.

Everything is checked before anything runs: types and ranges of every field,
unknown fields, references between sections (contents, process groups,
mappings, regions), the order of life events (a process written to after it
exited, a forked group used before the fork), the knobs, and that every file
a content model reads exists and is readable.  The first problem found is
raised as :class:`ScenarioError`, whose text is one line::

    examples/vms.toml: process[0].mapping[0].pages: expected an integer >= 1, got 0

The format is documented in ``docs/scenarios.md``.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import stat
import sys
import tomllib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar, cast

from ksmlab.constants import PAGE_SIZE
from ksmlab.scenario.knobs import KNOBS, KnobValue, knob_text, ordered
from ksmlab.scenario.model import (
    BYTE_COUNTERS,
    GLOBAL_COUNTERS,
    PROCESS_COUNTERS,
    Checkpoint,
    Content,
    Event,
    ExitEvent,
    Expectation,
    ForkEvent,
    KnobsEvent,
    MadviseEvent,
    Mapping,
    PrctlEvent,
    ProcessGroup,
    Region,
    Scenario,
    Selector,
    WriteActivity,
    WriteEvent,
)
from ksmlab.scenario.units import (
    MAX_DURATION_NS,
    MAX_SIZE,
    NS_PER_S,
    TOO_LARGE_SIZE,
    TOO_LONG_DURATION,
    format_duration,
    parse_duration_ns,
    parse_size,
)

BUILTIN_SOURCE = "<built-in>"
"""The ``source`` of the built-in default scenario."""

DEFAULT_SCAN_TIMEOUT_NS = 600 * NS_PER_S
"""How long a ``full_scans`` checkpoint may take when the scenario has no duration."""

MAX_FILE_BYTES = 1 << 20
"""The largest scenario file read (1 MiB; real ones are a few KiB).  tomllib may take
several hundred bytes of memory per byte of text (a MiB of deep table headers: 400 MB, 7 s),
and the path may be /dev/zero."""

MAX_KEY_PARTS = 16
"""The most parts a dotted key or table header may have (``a.b.c`` has 3; the format needs
at most 5).  tomllib's memory grows with the square of a dotted key's length (a key of
40,000 parts, 80 KB of text, takes 6 GB), so longer keys are refused before parsing."""

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

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_PART = r"""(?:[A-Za-z0-9_-]+|"(?:[^"\\\n]|\\.)*"|'[^'\n]*')"""
_LONG_KEY = re.compile(rf"^[ \t]*\[?\[?[ \t]*(?:{_PART}[ \t]*\.[ \t]*){{{MAX_KEY_PARTS}}}",
                       re.MULTILINE)
_SELECTOR = re.compile(r"^([A-Za-z_][A-Za-z0-9_.-]*)(?:\[(\d+)\]|\[(\d*):(\d*)\])?$")
_MISSING: Any = object()
T = TypeVar("T")


class ScenarioError(ValueError):
    """An invalid scenario: which file, which field, what was expected, what was found.

    Attributes:
        source: the file (or ``--knob``, ``--until`` for command-line overrides).
        field: the dotted path of the field, e.g. ``process[0].mapping[1].pages``.
        expected: what would have been accepted.
        got: what was found, as TOML would print it (``"nothing"`` if absent).
    """

    def __init__(self, source: str, field: str, expected: str, got: str) -> None:
        self.source = source
        self.field = field
        self.expected = expected
        self.got = got
        super().__init__(f"{source}: {field}: expected {expected}, got {got}")


_SHOWN_CHARS = 100
"""Strings longer than this are cut in error messages (the line stays readable)."""


def show(value: object) -> str:
    """*value* as a short TOML-like text for error messages: one line, printable."""
    if value is _MISSING:
        return "nothing"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _quoted(value)
    if isinstance(value, int) and value.bit_length() > 128:
        # Past any limit; its decimal digits would fill the line (or exceed Python's limit).
        return f"an integer of {value.bit_length()} bits"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return f"a {type(value).__name__}"


@dataclass(slots=True)
class _Table:
    """A TOML table being read: remembers its path and which keys were used."""

    loader: _Loader
    data: dict[str, Any]
    path: str
    used: set[str] = field(default_factory=set)

    def name(self, key: str) -> str:
        return f"{self.path}.{_key_text(key)}" if self.path else _key_text(key)

    def fail(self, key: str, expected: str, got: object = _MISSING) -> ScenarioError:
        return ScenarioError(self.loader.source, self.name(key), expected,
                             got if isinstance(got, _Shown) else show(got))

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        self.used.add(key)
        return self.data.get(key, default)

    def get(self, key: str, check: Callable[[Any], T], expected: str,
            default: Any = _MISSING) -> T:
        """``check(value)``, or a ScenarioError saying *expected* if it raises or the key is absent."""
        value = self.raw(key)
        if value is _MISSING:
            if default is _MISSING:
                raise self.fail(key, expected)
            return cast(T, default)
        try:
            return check(value)
        except (TypeError, ValueError) as e:
            raise self.fail(key, str(e) or expected, value) from None

    def string(self, key: str, default: Any = _MISSING) -> str:
        return self.get(key, _want_str, "a string", default)

    def word(self, key: str, choices: tuple[str, ...], default: Any = _MISSING) -> str:
        expected = " or ".join(f'"{c}"' for c in choices)

        def check(v: Any) -> str:
            if not isinstance(v, str) or v not in choices:
                raise ValueError(expected)
            return v
        return self.get(key, check, expected, default)

    def boolean(self, key: str, default: Any = _MISSING) -> bool:
        def check(v: Any) -> bool:
            if not isinstance(v, bool):
                raise ValueError("true or false")
            return v
        return self.get(key, check, "true or false", default)

    def integer(self, key: str, low: int = 0, high: int | None = None,
                default: Any = _MISSING, *, limit: int = MAX_INT) -> int:
        """An integer from *low* to *high*; without *high*, up to *limit*, named only when exceeded."""
        expected = (f"an integer >= {low}" if high is None
                    else f"an integer from {low} to {high}")
        top = limit if high is None else high

        def check(v: Any) -> int:
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ValueError(expected)
            if v > top:
                raise ValueError(f"an integer from {low} to {top}")
            return v
        return self.get(key, check, expected, default)

    def number(self, key: str, low: float, high: float | None, *, open_low: bool = False,
               default: Any = _MISSING) -> float:
        """A finite number from *low* (excluded if *open_low*) to *high* (None: no bound)."""
        lo = f"> {low:g}" if open_low else f">= {low:g}"
        expected = f"a number {lo}" if high is None else f"a number from {low:g} to {high:g}"

        def check(v: Any) -> float:
            if not isinstance(v, int | float) or isinstance(v, bool):
                raise ValueError(expected)
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"a finite number {lo}" if high is None else expected)
            # An int is compared exactly: float() of a huge one overflows.
            if (v <= low if open_low else v < low) or (high is not None and v > high):
                raise ValueError(expected)
            if v > sys.float_info.max:
                raise ValueError(f"a finite number {lo}")
            return float(v)
        return self.get(key, check, expected, default)

    def size_bytes(self, key: str, default: Any = _MISSING) -> int:
        expected = "a size (bytes, or a string such as \"8MiB\")"

        def check(v: Any) -> int:
            if isinstance(v, bool) or not isinstance(v, int | str):
                raise ValueError(expected)
            n = v if isinstance(v, int) else parse_size(v)
            if n < 0:
                raise ValueError(expected)
            if n >= MAX_SIZE:
                raise ValueError(TOO_LARGE_SIZE)
            return n
        return self.get(key, check, expected, default)

    def pages_of_size(self, key: str, *, allow_zero: bool = False,
                      default: Any = _MISSING) -> int:
        """A size that must be a whole number of pages; returns pages."""
        if not self.has(key):
            self.used.add(key)
            if default is _MISSING:
                raise self.fail(key, "a size (bytes, or a string such as \"8MiB\")")
            return cast(int, default)
        n = self.size_bytes(key)
        if n % PAGE_SIZE or (n == 0 and not allow_zero):
            raise self.fail(key, f"a {'' if allow_zero else 'non-zero '}multiple of the page "
                                 f"size ({PAGE_SIZE} bytes)", self.data[key])
        return n // PAGE_SIZE

    def duration(self, key: str, default: Any = _MISSING) -> int:
        expected = "a duration (seconds, or a string such as \"500ms\", \"10s\", \"5min\", \"1h\")"

        def check(v: Any) -> int:
            if isinstance(v, bool):
                raise ValueError(expected)
            if isinstance(v, int | float):
                if not 0 <= v < math.inf:  # also refuses NaN
                    raise ValueError(expected)
                # Exact: a float as large as 1e300 s has no float number of ns.
                ns = round(Fraction(v) * NS_PER_S)
                if ns > MAX_DURATION_NS:
                    raise ValueError(TOO_LONG_DURATION)
                return ns
            if isinstance(v, str):
                try:
                    return parse_duration_ns(v)
                except ValueError as e:
                    raise ValueError(TOO_LONG_DURATION if str(e) == TOO_LONG_DURATION
                                     else expected) from None
            raise ValueError(expected)
        return self.get(key, check, expected, default)

    def table(self, key: str, *, required: bool = False) -> _Table | None:
        value = self.raw(key)
        if value is _MISSING and not required:
            return None
        if not isinstance(value, dict):
            raise self.fail(key, "a table", value)
        return _Table(self.loader, value, self.name(key))

    def tables(self, key: str) -> Iterator[_Table]:
        """The tables of an array of tables ``[[key]]`` (none if absent)."""
        value = self.raw(key, [])
        header = re.sub(r"\[\d+\]", "", self.name(key))  # process[0].mapping: [[process.mapping]]
        if not isinstance(value, list):
            raise self.fail(key, f"an array of tables ([[{header}]])", value)
        for i, v in enumerate(value):
            if not isinstance(v, dict):
                raise ScenarioError(self.loader.source, f"{self.name(key)}[{i}]",
                                    f"a table, as [[{header}]] makes", show(v))
        for i, v in enumerate(value):
            yield _Table(self.loader, v, f"{self.name(key)}[{i}]")

    def done(self, allowed: str = "") -> None:
        """Refuse keys nobody read (typos, fields of another kind)."""
        for key in self.data:
            if key not in self.used:
                fields = allowed or ", ".join(sorted(self.used))
                raise ScenarioError(self.loader.source, self.name(key),
                                    f"a known field ({fields})", f"unknown field {show(key)}")


def _quoted(text: str) -> str:
    """*text* as a TOML basic string: escaped so it stays on one line, cut if long."""
    cut = len(text) > _SHOWN_CHARS
    body = json.dumps(text[:_SHOWN_CHARS], ensure_ascii=False)[1:-1]
    # json.dumps leaves DEL, C1 controls and Unicode line separators as they are.
    body = "".join(c if c.isprintable() or c == " " else
                   (f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}") for c in body)
    return f'"{body}"' + (f" ({len(text)} characters)" if cut else "")


def _key_text(key: str) -> str:
    """*key* as it is written in a key path: bare if TOML allows it, else quoted."""
    return key if _BARE_KEY.match(key) else _quoted(key)


def _names(names: Iterable[str]) -> str:
    """Names (already checked to be printable) for an error message, cut after the first ten."""
    shown = list(itertools.islice(names, 11))
    return ", ".join(shown[:10]) + (", ..." if len(shown) > 10 else "")


class _Shown(str):
    """An already formatted "got" text."""

    __slots__ = ()


def _want_str(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError("a string")
    return v


@dataclass(slots=True)
class _Exits:
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
class _GroupState:
    """What the loader knows about a process group while checking event order."""

    birth_ns: int
    count: int
    mappings: dict[str, int]
    exits: _Exits
    where: str


@dataclass(slots=True)
class _Loader:
    source: str
    base_dir: Path
    groups: dict[str, _GroupState] = field(default_factory=dict)

    def selector(self, t: _Table, key: str) -> Selector:
        text = t.string(key)
        m = _SELECTOR.match(text.strip())
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

    def group_for(self, t: _Table, key: str, sel: Selector, at_ns: int | None) -> _GroupState:
        """The group *sel* names, checked to exist (at *at_ns*) and to have those instances."""
        g = self.groups.get(sel.group)
        if g is None or (at_ns is not None and g.birth_ns > at_ns):
            known = [n for n, s in self.groups.items() if at_ns is None or s.birth_ns <= at_ns] \
                or ["none"]
            when = "" if at_ns is None else f" at {format_duration(at_ns / NS_PER_S)}"
            raise t.fail(key, f"a process group that exists{when} ({_names(known)})", sel.text)
        if sel.first >= g.count or (sel.stop is not None and sel.stop > g.count):
            raise t.fail(key, f"instances of {sel.group} within 0..{g.count - 1}", sel.text)
        return g

    def mapping_region(self, t: _Table, g: _GroupState, group: str) -> tuple[str, Region | None]:
        mapping = t.string("mapping")
        if mapping not in g.mappings:
            raise t.fail("mapping", f"a mapping of {group} ({_names(g.mappings)})", mapping)
        pages = g.mappings[mapping]
        r = t.table("region")
        if r is None:
            return mapping, None
        if r.has("start") or r.has("size"):
            first = r.pages_of_size("start", allow_zero=True, default=0)
            n = r.pages_of_size("size", default=pages - first)
        else:
            first = r.integer("first_page", 0, default=0)
            n = r.integer("pages", 1, default=pages - first)
        r.done("start and size, or first_page and pages")
        if first >= pages or n < 1 or first + n > pages:
            raise ScenarioError(self.source, r.path,
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


def load_scenario(path: str | os.PathLike[str], *, seed: int | None = None) -> Scenario:
    """Read and validate the scenario file at *path*; *seed* replaces ``[scenario] seed``.

    Raises:
        ScenarioError: the file is missing, not TOML, or invalid.
    """
    p = Path(path)
    source = str(path)
    try:
        with open(p, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)  # bounded: the path may be /dev/zero
    except FileNotFoundError:
        raise ScenarioError(source, "(file)", "an existing scenario file", "no such file") from None
    except OSError as e:
        raise ScenarioError(source, "(file)", "a readable UTF-8 text file",
                            _Shown(e.strerror or str(e))) from None
    if len(data) > MAX_FILE_BYTES:
        raise ScenarioError(source, "(file)", f"a scenario file of at most {MAX_FILE_BYTES >> 20} MiB",
                            _Shown("a larger file"))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ScenarioError(source, "(file)", "a readable UTF-8 text file",
                            _Shown(f"byte 0x{data[e.start]:02x} at line {line}, column {column} "
                                   f"({e.reason})")) from None
    # Universal newlines, as text mode reads files.
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return parse_scenario(text, source=source, base_dir=p.resolve().parent, seed=seed)


def builtin_scenario_text() -> str:
    """The TOML text of the built-in default scenario."""
    return resources.files("ksmlab").joinpath("data/default.toml").read_text(encoding="utf-8")


def load_builtin(*, seed: int | None = None) -> Scenario:
    """The built-in default scenario (``ksmlab run`` without a file)."""
    return parse_scenario(builtin_scenario_text(), source=BUILTIN_SOURCE, base_dir=Path.cwd(),
                          seed=seed)


def parse_scenario(text: str, *, source: str, base_dir: Path, seed: int | None = None) -> Scenario:
    """Validate the TOML *text*.

    Args:
        text: the file's text.
        source: names the file in errors.
        base_dir: relative content file paths are relative to this directory.
        seed: replaces ``[scenario] seed`` (so every seed derived from it follows).
    """
    long_key = _LONG_KEY.search(text)
    if long_key:
        raise ScenarioError(source, "(syntax)", f"keys and table names of at most {MAX_KEY_PARTS} "
                            f"dotted parts", _Shown(f"a longer one at line "
                                                  f"{text.count(chr(10), 0, long_key.start()) + 1}"))
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ScenarioError(source, "(syntax)", "valid TOML", _Shown(f"error: {e}")) from None
    except RecursionError:
        raise ScenarioError(source, "(syntax)", "valid TOML nested less deeply",
                            _Shown("arrays or inline tables nested too deeply for the parser")) from None
    except ValueError:
        # tomllib lets int()'s refusal of more than sys.get_int_max_str_digits() digits through.
        raise ScenarioError(source, "(syntax)", "valid TOML", _Shown(
            f"an integer of more than {sys.get_int_max_str_digits()} digits")) from None
    if seed is not None and isinstance(data.setdefault("scenario", {}), dict):
        data["scenario"]["seed"] = seed
    ld = _Loader(source, base_dir)
    top = _Table(ld, data, "")

    meta = top.table("scenario") or _Table(ld, {}, "scenario")
    name = meta.string("name", Path(source).stem if source != BUILTIN_SOURCE else "default")
    description = meta.string("description", "")
    seed = meta.integer("seed", 0, default=0)
    duration = meta.duration("duration", None)
    if duration is not None and duration <= 0:
        raise meta.fail("duration", "a duration > 0", meta.data["duration"])
    meta.done()

    knobs = _knobs(top.table("ksm") or _Table(ld, {}, "ksm"))
    contents = _contents(ld, top.table("content"), seed)
    processes = _processes(ld, top, contents)
    for g in processes:
        _check_time(meta, duration, g.start_ns, f"{ld.groups[g.name].where}.start")
    events = _events(ld, top, knobs, duration)
    activities = _activities(ld, top, duration)
    checkpoints = _checkpoints(ld, top, duration)

    tl = top.table("timeline")
    interval = None
    if tl is not None:
        interval = tl.duration("interval", None)
        if interval is not None and interval <= 0:
            raise tl.fail("interval", "a duration > 0", tl.data["interval"])
        tl.done()
    top.done("scenario, ksm, content, process, activity, event, checkpoint, timeline")

    sc = Scenario(source=source, name=name, description=description, seed=seed,
                  duration_ns=duration, sample_interval_ns=1, knobs=knobs, contents=contents,
                  processes=processes, activities=activities, events=events,
                  checkpoints=checkpoints)
    return dataclasses.replace(sc, sample_interval_ns=interval or default_interval(sc))


def default_interval(sc: Scenario) -> int:
    """The timeline period when the file gives none: 1/200 of the run, at least 1 ms."""
    end = sc.planned_end_ns
    return max(1_000_000, end // 200) if end else 10_000_000


def _check_time(t: _Table, duration: int | None, at_ns: int, name: str) -> None:
    if duration is not None and at_ns > duration:
        raise ScenarioError(t.loader.source, name,
                            f"a time within the scenario's duration "
                            f"({format_duration(duration / NS_PER_S)})",
                            format_duration(at_ns / NS_PER_S))


def _knobs(t: _Table) -> tuple[tuple[str, str], ...]:
    values: dict[str, str] = {}
    for key, value in t.data.items():
        t.used.add(key)
        if key not in KNOBS:
            raise t.fail(key, f"a KSM knob ({', '.join(KNOBS)})", _Shown(f"unknown knob {show(key)}"))
        try:
            values[key] = knob_text(key, value)
        except ValueError as e:
            raise t.fail(key, str(e), value) from None
    if values.get("advisor_mode") == "scan-time" and "pages_to_scan" in values:
        raise t.fail("pages_to_scan", "no pages_to_scan with advisor_mode = \"scan-time\" "
                     "(the kernel refuses it: the advisor sets it)", int(values["pages_to_scan"]))
    values.setdefault("run", "1")
    return ordered(values)


def apply_knob_overrides(sc: Scenario, overrides: dict[str, KnobValue]) -> Scenario:
    """*sc* with the ``--knob NAME=VALUE`` overrides applied (validated like ``[ksm]``)."""
    values = dict(sc.knobs)
    for name, value in overrides.items():
        if name not in KNOBS:
            raise ScenarioError("--knob", name, f"a KSM knob ({', '.join(KNOBS)})",
                                _Shown(f"unknown knob {show(name)}"))
        try:
            values[name] = knob_text(name, value)
        except ValueError as e:
            raise ScenarioError("--knob", name, str(e), show(value)) from None
    if values.get("advisor_mode") == "scan-time" and "pages_to_scan" in values:
        raise ScenarioError("--knob", "pages_to_scan",
                            "no pages_to_scan with advisor_mode = \"scan-time\"",
                            values["pages_to_scan"])
    return dataclasses.replace(sc, knobs=ordered(values))


def _contents(ld: _Loader, t: _Table | None, seed: int) -> dict[str, Content]:
    if t is None:
        raise ScenarioError(ld.source, "content", "at least one content model ([content.NAME])",
                            "nothing")
    out: dict[str, Content] = {}
    fields_by_kind = {
        "zero": {"kind", "private_fraction", "seed"},
        "random": {"kind", "seed"},
        "fill": {"kind", "byte", "zero_fraction", "private_fraction", "seed"},
        "image": {"kind", "pages", "offset", "zero_fraction", "private_fraction", "seed"},
        "file": {"kind", "path", "offset", "zero_fraction", "private_fraction", "seed"},
    }
    for cname in t.data:
        c = t.table(cname, required=True)
        assert c is not None
        if not _NAME.match(cname):
            raise ScenarioError(ld.source, c.path, "a name of letters, digits, _ . -", show(cname))
        kind = c.word("kind", tuple(fields_by_kind))
        for key in c.data:
            if key not in fields_by_kind[kind]:
                kinds = [k for k, f in fields_by_kind.items() if key in f]
                where = f"only for kind {' or '.join(kinds)}" if kinds else "unknown field"
                raise c.fail(key, f"no {_key_text(key)} for kind \"{kind}\" ({where})", c.data[key])
        cseed = c.integer("seed", 0, default=_stable_seed(seed, "content", cname))
        zf = c.number("zero_fraction", 0.0, 1.0, default=0.0)
        pf = c.number("private_fraction", 0.0, 1.0, default=0.0)
        if zf + pf > 1.0:
            raise c.fail("private_fraction", f"zero_fraction + private_fraction <= 1 "
                         f"(zero_fraction is {zf:g})", pf)
        pages = c.integer("pages", 1, default=None) if kind == "image" else None
        byte = c.integer("byte", 0, 255, default=0) if kind == "fill" else 0
        offset = c.pages_of_size("offset", allow_zero=True, default=0) \
            if kind in ("image", "file") else 0
        path = _content_file(c, offset) if kind == "file" else None
        if pages is not None and offset >= pages:
            raise c.fail("offset", f"an offset inside the image (< {pages} pages)",
                         c.data["offset"])
        out[cname] = Content(cname, cast(Any, kind), cseed, pages, byte, path, offset, zf, pf)
        c.done()
    if not out:
        raise ScenarioError(ld.source, "content", "at least one content model ([content.NAME])",
                            "an empty table")
    return out


_FILE_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device",
               stat.S_IFSOCK: "a socket"}


def _content_file(c: _Table, offset_pages: int) -> Path:
    raw = c.string("path")
    path = Path(os.path.expanduser(raw))
    if not path.is_absolute():
        path = c.loader.base_dir / path
    try:
        # O_NONBLOCK: opening a FIFO would otherwise wait for a writer, forever.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except ValueError:
        raise c.fail("path", "a file name without NUL characters", raw) from None
    except OSError as e:
        raise c.fail("path", "a readable file", _Shown(f"{show(raw)} ({e.strerror})")) from None
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise c.fail("path", "a regular file or a block device",
                         _Shown(f"{show(raw)} ({_FILE_KINDS.get(stat.S_IFMT(mode), 'special file')})"))
        size = os.lseek(fd, 0, os.SEEK_END)
    except OSError as e:
        raise c.fail("path", "a readable file", _Shown(f"{show(raw)} ({e.strerror})")) from None
    finally:
        os.close(fd)
    if size == 0:
        raise c.fail("path", "a non-empty file", _Shown(f"{show(raw)} (0 bytes)"))
    if offset_pages * PAGE_SIZE >= size:
        raise c.fail("offset", f"an offset inside the file ({size} bytes)",
                     c.data.get("offset"))
    return path.resolve()


def _processes(ld: _Loader, top: _Table, contents: dict[str, Content]) -> tuple[ProcessGroup, ...]:
    out: list[ProcessGroup] = []
    for p in top.tables("process"):
        name = p.string("name")
        if not _NAME.match(name):
            raise p.fail("name", "a name of letters, digits, _ . - (not starting with a digit)",
                         name)
        if name in ld.groups:
            raise p.fail("name", "a name no other process group has", name)
        count = p.integer("count", 1, default=1, limit=MAX_PROCESSES)
        start = p.duration("start", 0)
        merge_any = p.boolean("merge_any", False)
        maps: list[Mapping] = []
        mapped: set[str] = set()
        for m in p.tables("mapping"):
            mname = m.string("name", "mem")
            if not _NAME.match(mname) or mname in mapped:
                raise m.fail("name", "a name unique within the process (letters, digits, _ . -)",
                             mname)
            if m.has("size") == m.has("pages"):
                raise ScenarioError(ld.source, m.name("size"),
                                    "exactly one of size and pages",
                                    "both" if m.has("size") else "neither")
            pages = m.pages_of_size("size") if m.has("size") else m.integer("pages", 1)
            content = m.string("content")
            if content not in contents:
                raise m.fail("content", f"a content model ({_names(contents)})", content)
            mergeable = m.boolean("mergeable", True)
            m.done()
            maps.append(Mapping(mname, pages, content, mergeable))
            mapped.add(mname)
        if not maps:
            raise p.fail("mapping", "at least one [[process.mapping]]", _MISSING)
        p.done()
        ld.groups[name] = _GroupState(start, count, {m.name: m.pages for m in maps}, _Exits(),
                                      p.path)
        out.append(ProcessGroup(name, count, start, merge_any, tuple(maps)))
    if not out:
        raise ScenarioError(ld.source, "process", "at least one [[process]]", "nothing")
    return tuple(out)


_ACTIONS = ("write", "fork", "exit", "madvise", "prctl", "knobs")


def _events(ld: _Loader, top: _Table, knobs: tuple[tuple[str, str], ...],
            duration: int | None) -> tuple[Event, ...]:
    tables = list(top.tables("event"))
    timed: list[tuple[int, int, _Table]] = []
    for i, e in enumerate(tables):
        at = e.duration("at")
        _check_time(e, duration, at, e.name("at"))
        timed.append((at, i, e))
    timed.sort(key=lambda x: (x[0], x[1]))
    out: list[Event] = []
    for at, i, e in timed:
        action = e.word("action", _ACTIONS)
        ev: Event
        if action == "knobs":
            kt = e.table("set", required=True)
            assert kt is not None
            ev = KnobsEvent(i, at, _event_knobs(kt))
        else:
            sel = ld.selector(e, "process")
            g = ld.group_for(e, "process", sel, at)
            first, stop = sel.first, g.count if sel.stop is None else sel.stop
            gone = g.exits.first_gone(first, stop)
            if gone is not None:
                j, when = gone
                raise e.fail("process", f"processes alive at {format_duration(at / NS_PER_S)} "
                             f"({sel.group}[{j}] exited at {format_duration(when / NS_PER_S)})",
                             sel.text)
            if action in ("write", "madvise"):
                mapping, region = ld.mapping_region(e, g, sel.group)
                if action == "write":
                    data = e.word("data", ("random", "zero"), "random")
                    nbytes = e.integer("bytes", 1, PAGE_SIZE, default=8)
                    ev = WriteEvent(i, at, sel, mapping, region, cast(Any, data), nbytes)
                else:
                    advice = e.word("advice", ("mergeable", "unmergeable", "dontneed"))
                    ev = MadviseEvent(i, at, sel, mapping, region, cast(Any, advice))
            elif action == "fork":
                child = e.string("child")
                if not _NAME.match(child) or child in ld.groups:
                    raise e.fail("child", "a new process group name (letters, digits, _ . -)",
                                 child)
                n = e.integer("count", 1, default=1, limit=MAX_PROCESSES)
                size = (stop - first) * n
                if size > MAX_PROCESSES:
                    raise e.fail("count", f"at most {MAX_PROCESSES} children in all "
                                 f"({stop - first} processes fork)", n)
                ld.groups[child] = _GroupState(at, size, dict(g.mappings), _Exits(), e.path)
                ev = ForkEvent(i, at, sel, child, n)
            elif action == "exit":
                g.exits.add(first, stop, at)
                ev = ExitEvent(i, at, sel)
            else:
                ev = PrctlEvent(i, at, sel, e.boolean("merge_any"))
        e.done()
        out.append(ev)
    return tuple(out)


def _event_knobs(t: _Table) -> tuple[tuple[str, str], ...]:
    values = _knobs(t)
    # _knobs adds run=1 for the start; an event writes only what it names.
    return tuple((n, v) for n, v in values if n in t.data)


def _activities(ld: _Loader, top: _Table, duration: int | None) -> tuple[WriteActivity, ...]:
    out: list[WriteActivity] = []
    for i, a in enumerate(top.tables("activity")):
        sel = ld.selector(a, "process")
        g = ld.group_for(a, "process", sel, None)
        mapping, region = ld.mapping_region(a, g, sel.group)
        rate = a.number("rate", 0.0, None, open_low=True)
        if not MIN_RATE <= rate <= MAX_RATE:
            raise a.fail("rate", f"a rate from {MIN_RATE:g} to {MAX_RATE:g} writes per second "
                         f"(the clock counts nanoseconds)", a.data["rate"])
        start = a.duration("start", None)
        if start is None:
            start = g.birth_ns
        elif start < g.birth_ns:
            raise a.fail("start", f"a time when {sel.group} exists "
                         f"(>= {format_duration(g.birth_ns / NS_PER_S)})", a.data["start"])
        stop = a.duration("stop", None)
        if stop is not None and stop <= start:
            raise a.fail("stop", f"a time after start ({format_duration(start / NS_PER_S)})",
                         a.data["stop"])
        _check_time(a, duration, start, a.name("start"))
        arrivals = a.word("arrivals", ("even", "poisson"), "even")
        pick = a.word("pick", ("random", "sequential"), "random")
        data = a.word("data", ("random", "zero"), "random")
        nbytes = a.integer("bytes", 1, PAGE_SIZE, default=8)
        a.done()
        out.append(WriteActivity(i, sel, mapping, region, rate, start, stop, cast(Any, arrivals),
                                 cast(Any, pick), cast(Any, data), nbytes))
    return tuple(out)


def _checkpoints(ld: _Loader, top: _Table, duration: int | None) -> tuple[Checkpoint, ...]:
    out: list[Checkpoint] = []
    for i, c in enumerate(top.tables("checkpoint")):
        if c.has("at") == c.has("full_scans"):
            raise ScenarioError(ld.source, c.name("at"), "exactly one of at and full_scans",
                                "both" if c.has("at") else "neither")
        at = c.duration("at", None)
        scans = c.integer("full_scans", 1, default=None)
        if at is not None:
            _check_time(c, duration, at, c.name("at"))
            if c.has("timeout"):
                raise c.fail("timeout", "no timeout for a checkpoint at a time (only with "
                             "full_scans)", c.data["timeout"])
            name = c.string("name", format_duration(at / NS_PER_S))
            timeout = at
        else:
            default_timeout = duration if duration is not None else DEFAULT_SCAN_TIMEOUT_NS
            timeout = c.duration("timeout", default_timeout)
            if timeout <= 0:
                raise c.fail("timeout", "a duration > 0", c.data["timeout"])
            _check_time(c, duration, timeout, c.name("timeout"))
            name = c.string("name", f"{scans} full scan{'s' if scans != 1 else ''}")
        expect: list[Expectation] = []
        et = c.table("expect")
        if et is not None:
            for counter in et.data:
                if counter not in GLOBAL_COUNTERS:
                    raise et.fail(counter, f"a counter ({', '.join(GLOBAL_COUNTERS)})",
                                  _Shown(f"unknown counter {show(counter)}"))
                expect.append(_expectation(et, counter, None))
            et.done()
        pt = c.table("expect_process")
        if pt is not None:
            for key in pt.data:
                sel = _selector_key(ld, pt, key)
                ld.group_for(pt, key, sel, None)
                per = pt.table(key, required=True)
                assert per is not None
                for counter in per.data:
                    if counter not in PROCESS_COUNTERS:
                        raise per.fail(counter, f"a ksm_stat counter ({', '.join(PROCESS_COUNTERS)})",
                                       _Shown(f"unknown counter {show(counter)}"))
                    expect.append(_expectation(per, counter, sel))
                per.done()
        c.done()
        out.append(Checkpoint(i, name, at, scans, timeout, tuple(expect)))
    if not out:
        raise ScenarioError(ld.source, "checkpoint", "at least one [[checkpoint]]", "nothing")
    return tuple(out)


def _selector_key(ld: _Loader, t: _Table, key: str) -> Selector:
    m = _SELECTOR.match(key.strip())
    if not m:
        raise t.fail(key, 'a process such as "guest", "guest[3]" or "guest[0:4]" as the key',
                     _Shown(f"key {show(key)}"))
    probe = _Table(ld, {key: key}, t.path)
    return ld.selector(probe, key)


def _expectation(t: _Table, counter: str, sel: Selector | None) -> Expectation:
    sized = counter in BYTE_COUNTERS
    unit = "an integer" + (' or a size such as "40MiB"' if sized else "")

    def value(v: Any, where: str) -> int:
        if isinstance(v, int) and not isinstance(v, bool):
            if not -(1 << 63) <= v <= MAX_INT:  # counters are 64-bit: signed or unsigned
                raise ScenarioError(t.loader.source, where,
                                    f"an integer from {-(1 << 63)} to {MAX_INT}", show(v))
            return v
        if sized and isinstance(v, str):
            try:
                neg = v.strip().startswith("-")
                n = parse_size(v.strip().removeprefix("-"))
                return -n if neg else n
            except ValueError:
                pass
        raise ScenarioError(t.loader.source, where, unit, show(v))

    raw = t.raw(counter)
    if isinstance(raw, dict):
        bounds = _Table(t.loader, raw, t.name(counter))
        lo = bounds.raw("min", None)
        hi = bounds.raw("max", None)
        bounds.done("min, max")
        if lo is None and hi is None:
            raise ScenarioError(t.loader.source, bounds.path, "min and/or max", "an empty table")
        low = None if lo is None else value(lo, bounds.name("min"))
        high = None if hi is None else value(hi, bounds.name("max"))
        if low is not None and high is not None and low > high:
            raise ScenarioError(t.loader.source, bounds.name("max"), f"max >= min ({low})",
                                show(high))
        return Expectation(counter, sel, low, high)
    exact = value(raw, t.name(counter))
    return Expectation(counter, sel, exact, exact)


def truncate(sc: Scenario, until_ns: int) -> Scenario:
    """*sc* cut at *until_ns* (``--until``): later items are dropped and the run ends there.

    A checkpoint at *until_ns* is added if none is there already, so the
    summary shows where the run stopped.
    """
    groups_born = {g.name for g in sc.processes if g.start_ns <= until_ns}
    events = tuple(e for e in sc.events if e.at_ns <= until_ns)
    for e in events:
        if isinstance(e, ForkEvent):
            groups_born.add(e.child)
    acts = tuple(dataclasses.replace(a, stop_ns=min(a.stop_ns or until_ns, until_ns))
                 for a in sc.activities
                 if a.process.group in groups_born and a.start_ns < until_ns)
    cps = [dataclasses.replace(c, timeout_ns=min(c.timeout_ns, until_ns)) if c.full_scans
           else c for c in sc.checkpoints if c.at_ns is None or c.at_ns <= until_ns]
    cps = [c for c in cps if all(x.process is None or x.process.group in groups_born
                                 for x in c.expect)]
    if not any(c.at_ns == until_ns for c in cps):
        cps.append(Checkpoint(len(sc.checkpoints), f"--until {format_duration(until_ns / NS_PER_S)}",
                              until_ns, None, until_ns))
    out = dataclasses.replace(
        sc, duration_ns=until_ns, events=events, activities=acts, checkpoints=tuple(cps),
        processes=tuple(g for g in sc.processes if g.start_ns <= until_ns))
    return dataclasses.replace(out, sample_interval_ns=min(sc.sample_interval_ns,
                                                           default_interval(out)))


def _stable_seed(*parts: object) -> int:
    """A seed derived from *parts*, the same in every run and Python (no ``hash()``)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "big")


__all__ = [
    "BUILTIN_SOURCE",
    "DEFAULT_SCAN_TIMEOUT_NS",
    "ScenarioError",
    "apply_knob_overrides",
    "builtin_scenario_text",
    "default_interval",
    "load_builtin",
    "load_scenario",
    "parse_scenario",
    "show",
    "truncate",
]
