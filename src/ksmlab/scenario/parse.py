"""Reading a scenario's text: the file, the TOML document, typed fields, and the one-line errors.

:class:`Table` reads one TOML table: each value is checked against its
:class:`~ksmlab.scenario.schema.Field` (type, range, default), every key it
reads is remembered so that keys nobody read are refused, and every problem
becomes a :class:`ScenarioError` naming the key path (``process[0].count``).
:func:`read_file` and :func:`parse_toml` turn a file into the document,
refusing what would make tomllib slow or huge.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import sys
import tomllib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, TypeVar, cast

from ksmlab.constants import PAGE_SIZE
from ksmlab.errors import KsmSimError
from ksmlab.scenario.schema import MAX_INT, MISSING, Field
from ksmlab.scenario.units import (
    MAX_DURATION_NS,
    MAX_SIZE,
    NS_PER_S,
    TOO_LARGE_SIZE,
    TOO_LONG_DURATION,
    parse_duration_ns,
    parse_size,
)

MAX_FILE_BYTES = 1 << 20
"""The largest scenario file read (1 MiB; real ones are a few KiB).  tomllib may take
several hundred bytes of memory per byte of text (a MiB of deep table headers: 400 MB, 7 s),
and the path may be /dev/zero."""

MAX_KEY_PARTS = 16
"""The most parts a dotted key or table header may have (``a.b.c`` has 3; the format needs
at most 5).  tomllib's memory grows with the square of a dotted key's length (a key of
40,000 parts, 80 KB of text, takes 6 GB), so longer keys are refused before parsing."""

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_PART = r"""(?:[A-Za-z0-9_-]+|"(?:[^"\\\n]|\\.)*"|'[^'\n]*')"""
_LONG_KEY = re.compile(rf"^[ \t]*\[?\[?[ \t]*(?:{_PART}[ \t]*\.[ \t]*){{{MAX_KEY_PARTS}}}",
                       re.MULTILINE)
_RATE = re.compile(r"^\s*((?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*%\s*/\s*(s|min|h)\s*$")
"""A share of a region per second, minute or hour: ``"10%/s"``, ``"0.5 %/min"``."""
_RATE_UNITS = {"s": 1, "min": 60, "h": 3600}
_SHOWN_CHARS = 100
"""Strings longer than this are cut in error messages (the line stays readable)."""

T = TypeVar("T")


class ScenarioError(KsmSimError, ValueError):
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


def show(value: object) -> str:
    """*value* as a short TOML-like text for error messages: one line, printable."""
    if value is MISSING:
        return "nothing"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return quoted(value)
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


class Shown(str):
    """An already formatted "got" text."""

    __slots__ = ()


def quoted(text: str) -> str:
    """*text* as a TOML basic string: escaped so it stays on one line, cut if long."""
    cut = len(text) > _SHOWN_CHARS
    body = json.dumps(text[:_SHOWN_CHARS], ensure_ascii=False)[1:-1]
    # json.dumps leaves DEL, C1 controls and Unicode line separators as they are.
    body = "".join(c if c.isprintable() or c == " " else
                   (f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}") for c in body)
    return f'"{body}"' + (f" ({len(text)} characters)" if cut else "")


def key_text(key: str) -> str:
    """*key* as it is written in a key path: bare if TOML allows it, else quoted."""
    return key if _BARE_KEY.match(key) else quoted(key)


def names(items: Iterable[str]) -> str:
    """Names (already checked to be printable) for an error message, cut after the first ten."""
    shown = list(itertools.islice(items, 11))
    return ", ".join(shown[:10]) + (", ..." if len(shown) > 10 else "")


def _want_str(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError("a string")
    return v


@dataclass(slots=True)
class Table:
    """A TOML table being read: remembers its path and which keys were used.

    Attributes:
        source: the file, named by every error.
        data: the table.
        path: its key path (``""`` for the document).
        used: the keys read so far.
    """

    source: str
    data: dict[str, Any]
    path: str
    used: set[str] = field(default_factory=set)

    def name(self, key: str) -> str:
        return f"{self.path}.{key_text(key)}" if self.path else key_text(key)

    def fail(self, key: str, expected: str, got: object = MISSING) -> ScenarioError:
        return ScenarioError(self.source, self.name(key), expected,
                             got if isinstance(got, Shown) else show(got))

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str, default: Any = MISSING) -> Any:
        self.used.add(key)
        return self.data.get(key, default)

    def read(self, f: Field[T], default: Any = MISSING) -> T:
        """Field *f*; *default* (computed by the caller) replaces the schema's default."""
        d = f.default if default is MISSING else default
        value: Any
        if f.kind == "string":
            value = self.string(f.key, d)
        elif f.kind == "word":
            value = self.word(f.key, f.choices, d)
        elif f.kind == "boolean":
            value = self.boolean(f.key, d)
        elif f.kind == "integer":
            value = self.integer(f.key, int(f.low), None if f.high is None else int(f.high), d,
                                 limit=f.limit)
        elif f.kind == "number":
            value = self.number(f.key, float(f.low), None if f.high is None else float(f.high),
                                open_low=f.open_low, default=d)
        elif f.kind == "size":
            value = self.size_bytes(f.key, d)
        elif f.kind == "pages":
            value = self.pages_of_size(f.key, allow_zero=f.allow_zero, default=d)
        elif f.kind == "rate":
            value = self.rate(f.key, d)
        else:
            value = self.duration(f.key, d)
        if f.positive and self.has(f.key) and value <= 0:
            raise self.fail(f.key, "a duration > 0", self.data[f.key])
        return cast(T, value)

    def get(self, key: str, check: Callable[[Any], T], expected: str,
            default: Any = MISSING) -> T:
        """``check(value)``, or a ScenarioError saying *expected* if it raises or the key is absent."""
        value = self.raw(key)
        if value is MISSING:
            if default is MISSING:
                raise self.fail(key, expected)
            return cast(T, default)
        try:
            return check(value)
        except (TypeError, ValueError) as e:
            raise self.fail(key, str(e) or expected, value) from None

    def string(self, key: str, default: Any = MISSING) -> str:
        return self.get(key, _want_str, "a string", default)

    def word(self, key: str, choices: tuple[str, ...], default: Any = MISSING) -> str:
        expected = " or ".join(f'"{c}"' for c in choices)

        def check(v: Any) -> str:
            if not isinstance(v, str) or v not in choices:
                raise ValueError(expected)
            return v
        return self.get(key, check, expected, default)

    def boolean(self, key: str, default: Any = MISSING) -> bool:
        def check(v: Any) -> bool:
            if not isinstance(v, bool):
                raise ValueError("true or false")
            return v
        return self.get(key, check, "true or false", default)

    def integer(self, key: str, low: int = 0, high: int | None = None,
                default: Any = MISSING, *, limit: int = MAX_INT) -> int:
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
               default: Any = MISSING) -> float:
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

    def size_bytes(self, key: str, default: Any = MISSING) -> int:
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
                      default: Any = MISSING) -> int:
        """A size that must be a whole number of pages; returns pages."""
        if not self.has(key):
            self.used.add(key)
            if default is MISSING:
                raise self.fail(key, "a size (bytes, or a string such as \"8MiB\")")
            return cast(int, default)
        n = self.size_bytes(key)
        if n % PAGE_SIZE or (n == 0 and not allow_zero):
            raise self.fail(key, f"a {'' if allow_zero else 'non-zero '}multiple of the page "
                                 f"size ({PAGE_SIZE} bytes)", self.data[key])
        return n // PAGE_SIZE

    def rate(self, key: str, default: Any = MISSING) -> tuple[float, bool]:
        """Writes per second (a number > 0), or a share of a region per second (a text
        ``"N%/s"``, ``"N%/min"`` or ``"N%/h"`` with N > 0): ``(value, is_share)``."""
        if not isinstance(self.data.get(key), str):
            return self.number(key, 0.0, None, open_low=True, default=default), False
        expected = ('a share of the region per second such as "10%/s" (or "%/min", "%/h"), '
                    'or a number of writes per second')

        def check(v: Any) -> tuple[float, bool]:
            m = _RATE.match(v)
            if m is None:
                raise ValueError(expected)
            share = float(m.group(1)) / 100 / _RATE_UNITS[m.group(2)]
            if not 0 < share < math.inf:
                raise ValueError(f"a finite share > 0 {expected[8:]}")
            return share, True
        return self.get(key, check, expected, default)

    def duration(self, key: str, default: Any = MISSING) -> int:
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

    def table(self, key: str, *, required: bool = False) -> Table | None:
        value = self.raw(key)
        if value is MISSING and not required:
            return None
        if not isinstance(value, dict):
            raise self.fail(key, "a table", value)
        return Table(self.source, value, self.name(key))

    def tables(self, key: str) -> Iterator[Table]:
        """The tables of an array of tables ``[[key]]`` (none if absent)."""
        value = self.raw(key, [])
        header = re.sub(r"\[\d+\]", "", self.name(key))  # process[0].mapping: [[process.mapping]]
        if not isinstance(value, list):
            raise self.fail(key, f"an array of tables ([[{header}]])", value)
        for i, v in enumerate(value):
            if not isinstance(v, dict):
                raise ScenarioError(self.source, f"{self.name(key)}[{i}]",
                                    f"a table, as [[{header}]] makes", show(v))
        for i, v in enumerate(value):
            yield Table(self.source, v, f"{self.name(key)}[{i}]")

    def done(self, allowed: str = "") -> None:
        """Refuse keys nobody read (typos, fields of another kind)."""
        for key in self.data:
            if key not in self.used:
                fields = allowed or ", ".join(sorted(self.used))
                raise ScenarioError(self.source, self.name(key),
                                    f"a known field ({fields})", f"unknown field {show(key)}")


def read_file(path: str | os.PathLike[str]) -> str:
    """The text of the scenario file at *path* (at most :data:`MAX_FILE_BYTES`, UTF-8)."""
    source = str(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)  # bounded: the path may be /dev/zero
    except FileNotFoundError:
        raise ScenarioError(source, "(file)", "an existing scenario file", "no such file") from None
    except OSError as e:
        raise ScenarioError(source, "(file)", "a readable UTF-8 text file",
                            Shown(e.strerror or str(e))) from None
    if len(data) > MAX_FILE_BYTES:
        raise ScenarioError(source, "(file)", f"a scenario file of at most {MAX_FILE_BYTES >> 20} MiB",
                            Shown("a larger file"))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ScenarioError(source, "(file)", "a readable UTF-8 text file",
                            Shown(f"byte 0x{data[e.start]:02x} at line {line}, column {column} "
                                  f"({e.reason})")) from None
    # Universal newlines, as text mode reads files.
    return text.replace("\r\n", "\n").replace("\r", "\n")


def parse_toml(text: str, source: str) -> dict[str, Any]:
    """The TOML document *text*; *source* names the file in errors."""
    long_key = _LONG_KEY.search(text)
    if long_key:
        raise ScenarioError(source, "(syntax)", f"keys and table names of at most {MAX_KEY_PARTS} "
                            f"dotted parts", Shown(f"a longer one at line "
                                                 f"{text.count(chr(10), 0, long_key.start()) + 1}"))
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ScenarioError(source, "(syntax)", "valid TOML", Shown(f"error: {e}")) from None
    except RecursionError:
        raise ScenarioError(source, "(syntax)", "valid TOML nested less deeply",
                            Shown("arrays or inline tables nested too deeply for the parser")) from None
    except ValueError:
        # tomllib lets int()'s refusal of more than sys.get_int_max_str_digits() digits through.
        raise ScenarioError(source, "(syntax)", "valid TOML", Shown(
            f"an integer of more than {sys.get_int_max_str_digits()} digits")) from None


__all__ = [
    "MAX_FILE_BYTES",
    "MAX_KEY_PARTS",
    "ScenarioError",
    "Shown",
    "Table",
    "key_text",
    "names",
    "parse_toml",
    "quoted",
    "read_file",
    "show",
]
