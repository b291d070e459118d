# SPDX-License-Identifier: GPL-2.0-only
"""Hypothesis strategies for scenario files: the real scenarios, broken in every way a file can be.

Documents start from the examples and the built-in scenario:

* structurally (:func:`mutated_documents`): the file is parsed, then a value at
  a random key path is dropped, replaced by an odd value (wrong type, huge or
  negative number, NaN, a size or a time with an absurd unit, a bad selector,
  a date), retyped (wrapped in an array or a table, turned into a string),
  scaled to absurd sizes, nested deeply, or an unknown key is added; the
  result is written back as TOML (:func:`toml_text`);
* as bytes (:func:`raw_documents`): random bytes, empty files, the real file
  cut short, with a line dropped or repeated, with a non-UTF-8 byte or a
  control character inserted, behind a BOM, deeply nested arrays and very
  long dotted keys.

:func:`documents` draws from both.
"""

from __future__ import annotations

import copy
import datetime as dt
import math
import re
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from hypothesis import strategies as st

from ksmlab.scenario.loader import builtin_scenario_text

ROOT = Path(__file__).resolve().parents[1]

SEED_TEXTS: dict[str, str] = {
    **{p.name: p.read_text(encoding="utf-8") for p in sorted((ROOT / "examples").glob("*.toml"))},
    "default.toml": builtin_scenario_text(),
}
"""The real scenarios every document starts from, by name."""

SEED_DOCS: dict[str, dict[str, Any]] = {name: tomllib.loads(t) for name, t in SEED_TEXTS.items()}

Path_ = tuple[str | int, ...]
T = TypeVar("T")


@dataclass(frozen=True)
class Deep:
    """*depth* nested arrays (or inline tables) around *leaf*: written without recursion."""

    depth: int
    table: bool
    leaf: Any


# --- values ------------------------------------------------------------------------------

EDGE_INTS = [0, 1, -1, 2, 7, 255, 256, 4095, 4096, 4097, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
             4194304, 4194305, 2**53 + 1, 2**63 - 1, 2**63, -(2**63), 2**64 - 1, 2**64, 10**30,
             -(10**30), 10**400, 16**5000]
"""Integers at the edges of the ranges the loader and the kernel know, and far past them."""

EDGE_FLOATS = [0.0, -0.0, 0.5, 1.5, 1e-9, 1e-320, 5e-324, 1e9, 1e300, 1.7976931348623157e308,
               math.inf, -math.inf, math.nan]

SIZE_AND_TIME_TEXTS = [
    "0", "4096", "4KiB", "8MiB", "8 MiB", "-8MiB", "1.5KiB", "0.1KiB", "1e3", "16EiB", "1PiB",
    "4096TiB", "9" * 40 + "TiB", "9" * 400 + "MiB", "9" * 5000, "0." + "0" * 5000 + "1KiB",
    "1s", "10s", "500ms", "5min", "1h", "-1s", "0s", "0.5", "1e400s", "9" * 310 + "h",
    "9" * 30 + "h", "0.0000000001ns", "10 parsecs", "nan", "inf", "", " ", "µs", "1µs",
]
"""Sizes and durations as strings: valid, negative, absurd, malformed."""

SELECTOR_TEXTS = [
    "guest", "vm", "p", "server", "worker", "guest[0]", "guest[11]", "guest[12]", "vm[0:4]",
    "vm[4:2]", "vm[:]", "vm[1:]", "vm[:0]", "worker[3:6]", "p[0", "3vm", "vm[-1]",
    "vm[" + "9" * 30 + "]", "vm[" + "9" * 5000 + "]", "vm[0:" + "9" * 5000 + "]",
]

PATH_TEXTS = ["/bin/sh", "/dev/null", "/dev/zero", "/", ".", "~", "~nobody-here", "a\x00b",
              "nonexistent.img", "/proc/self/status", "x" * 5000]

KEY_NAMES = ["name", "description", "seed", "duration", "kind", "pages", "size", "count", "start",
             "merge_any", "mapping", "content", "mergeable", "process", "region", "rate",
             "arrivals", "pick", "data", "bytes", "at", "action", "child", "advice", "set",
             "full_scans", "timeout", "expect", "expect_process", "interval", "first_page",
             "offset", "byte", "path", "zero_fraction", "private_fraction", "min", "max",
             "pages_to_scan", "sleep_millisecs", "run", "max_page_sharing", "advisor_mode",
             "scenario", "ksm", "checkpoint", "event", "activity", "timeline", "pages_shared",
             "general_profit", "ksm_merging_pages", "vm[0:2]"]
"""Every field name the format has: an unknown key is often a known name in the wrong place."""

ODD_TEXTS = ["", " ", "a\nb", "a\rb", "tab\there", "\x00", "\x1b[31mred", "\x7f", "\x85",
             "\u2028", "\u200b", "é", "😀", "\ufeff", "a" * 3000, "zero", "random", "image",
             "file", "fill", "write", "fork", "exit", "madvise", "prctl", "knobs", "mergeable",
             "scan-time", "none", "even", "poisson", "sequential", "true", "1"]


def pick(options: Sequence[T]) -> st.SearchStrategy[T]:
    """One of *options*; unlike sampled_from, never repr()s them (16**5000 has no decimal repr)."""
    def option(i: int) -> T:
        return options[i]
    return st.integers(0, len(options) - 1).map(option)


def ints() -> st.SearchStrategy[int]:
    return st.one_of(pick(EDGE_INTS), st.integers(-(2**70), 2**70))


def floats() -> st.SearchStrategy[float]:
    return st.one_of(pick(EDGE_FLOATS), st.floats())


def texts() -> st.SearchStrategy[str]:
    return st.one_of(pick(SIZE_AND_TIME_TEXTS), pick(SELECTOR_TEXTS),
                     pick(PATH_TEXTS), pick(ODD_TEXTS),
                     pick(KEY_NAMES), st.text(max_size=12))


def keys() -> st.SearchStrategy[str]:
    return st.one_of(pick(KEY_NAMES), pick(ODD_TEXTS[:14]),
                     st.text(max_size=8))


def scalars() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.booleans(), ints(), floats(), texts(),
        st.datetimes(timezones=st.none() | st.just(dt.UTC)), st.dates(), st.times(),
    )


def values() -> st.SearchStrategy[Any]:
    """Any TOML value, mostly small, biased towards what the loader has to refuse."""
    return st.recursive(
        scalars(),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys(), inner, max_size=3),
        max_leaves=6,
    )


# --- writing TOML ------------------------------------------------------------------------

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _string(s: str) -> str:
    out = []
    for c in s:
        if c in '"\\':
            out.append("\\" + c)
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def _key(k: str) -> str:
    return k if _BARE_KEY.fullmatch(k) else _string(k)


def _value(v: Any) -> str:
    if isinstance(v, Deep):
        opener, closer = ("{a = ", "}") if v.table else ("[", "]")
        return opener * v.depth + _value(v.leaf) + closer * v.depth
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        if v.bit_length() > 10_000:  # too long for decimal (sys.get_int_max_str_digits)
            return hex(abs(v))
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return _string(v)
    if isinstance(v, dt.datetime | dt.date | dt.time):
        return v.isoformat()
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + "}"
    msg = f"cannot write {type(v).__name__} as TOML"
    raise TypeError(msg)


def toml_text(doc: dict[str, Any]) -> str:
    """*doc* as TOML: one ``key = value`` line per top-level key, tables written inline."""
    return "".join(f"{_key(k)} = {_value(v)}\n" for k, v in doc.items())


# --- structural mutations ----------------------------------------------------------------

def _paths(node: Any, here: Path_ = ()) -> list[Path_]:
    """Every key path below *node* (not *node* itself)."""
    out: list[Path_] = []
    items: list[tuple[str | int, Any]] = (
        list(node.items()) if isinstance(node, dict)
        else list(enumerate(node)) if isinstance(node, list) else [])
    for k, v in items:
        out.append((*here, k))
        out.extend(_paths(v, (*here, k)))
    return out


def _at(doc: dict[str, Any], path: Path_) -> Any:
    node: Any = doc
    for k in path:
        node = node[k]
    return node


def _parent(doc: dict[str, Any], path: Path_) -> Any:
    return _at(doc, path[:-1])


def _scaled(v: Any, factor: int) -> Any:
    """*v* made absurdly large (or negative): a number multiplied, the number of a unit string too."""
    if isinstance(v, bool):
        return v
    if isinstance(v, int):
        return v * factor if v else factor
    if isinstance(v, float):
        return -v if factor < 0 else v * 1e300
    if isinstance(v, str) and re.match(r"\s*[0-9.]", v):
        return "-" + v if factor < 0 else "9" * 30 + v.strip()
    return v


def _retyped(v: Any, how: int) -> Any:
    if how == 0:
        return [v]
    if how == 1:
        return {"value": v}
    if how == 2:
        if isinstance(v, str):
            return v + "x"
        try:
            return str(v)
        except ValueError:  # holds an integer of more than 4300 digits (a mutation made it)
            return "an integer too long to print"
    if how == 3:
        return float(v) if isinstance(v, int) and not isinstance(v, bool) and v < 2**1000 else 1.5
    if how == 4:
        return not v if isinstance(v, bool) else True
    return []


@st.composite
def _mutate(draw: st.DrawFn, doc: dict[str, Any]) -> None:
    """One mutation of *doc*, in place."""
    paths = _paths(doc)
    kind = draw(st.sampled_from(["drop", "replace", "retype", "scale", "unknown", "deep",
                                 "repeat", "swap"]))
    if not paths:
        doc[draw(keys())] = draw(values())
        return
    path = draw(st.sampled_from(paths))
    parent, last = _parent(doc, path), path[-1]
    old = parent[last]
    if kind == "drop":
        del parent[last]
    elif kind == "replace":
        parent[last] = draw(values())
    elif kind == "retype":
        parent[last] = _retyped(old, draw(st.integers(0, 5)))
    elif kind == "scale":
        parent[last] = _scaled(old, draw(pick([-1, 2**32, 2**64, 10**30, 16**5000])))
    elif kind == "unknown":
        tables = [p for p in [(), *paths] if isinstance(_at(doc, p), dict)]
        _at(doc, draw(st.sampled_from(tables)))[draw(keys())] = draw(values())
    elif kind == "deep":
        depth = draw(st.sampled_from([2, 30, 200, 2000]))
        parent[last] = Deep(depth, draw(st.booleans()), old if not isinstance(old, Deep) else 1)
    elif kind == "repeat" and isinstance(parent, list):
        parent.extend([copy.deepcopy(old)] * draw(st.integers(1, 3)))
    elif kind == "swap":
        other = draw(st.sampled_from(paths))
        if other[:len(path)] != path and path[:len(other)] != other:
            oparent = _parent(doc, other)
            parent[last], oparent[other[-1]] = oparent[other[-1]], old


@st.composite
def mutated_documents(draw: st.DrawFn) -> bytes:
    """A real scenario with one to three structural mutations, written back as TOML."""
    name = draw(st.sampled_from(sorted(SEED_DOCS)))
    doc = copy.deepcopy(SEED_DOCS[name])
    for _ in range(draw(st.integers(1, 3))):
        draw(_mutate(doc))
    return toml_text(doc).encode("utf-8")


# --- byte-level documents ----------------------------------------------------------------

BAD_BYTES = [b"\xff", b"\xfe", b"\x80", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf",
             b"\x00", b"\r", b"\x1b", b"\x7f", b"\t", b'"', b"[", b"]", b"=", b"\n", b"#", b"'"]
"""Bytes that break UTF-8 (lone continuation bytes, truncated and overlong sequences,
encoded surrogates, past U+10FFFF) or TOML (NUL, bare CR, quotes, brackets)."""


def _seed_bytes() -> st.SearchStrategy[bytes]:
    return st.sampled_from(sorted(SEED_TEXTS)).map(lambda n: SEED_TEXTS[n].encode("utf-8"))


def _edited(edit: Callable[[bytes, st.DrawFn], bytes]) -> st.SearchStrategy[bytes]:
    @st.composite
    def strategy(draw: st.DrawFn) -> bytes:
        return edit(draw(_seed_bytes()), draw)
    return strategy()


def _insert(data: bytes, draw: st.DrawFn) -> bytes:
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.sampled_from(BAD_BYTES) | st.binary(min_size=1, max_size=3)) \
            + data[at:]
    return data


def _cut(data: bytes, draw: st.DrawFn) -> bytes:
    return data[:draw(st.integers(0, len(data)))]


def _lines(data: bytes, draw: st.DrawFn) -> bytes:
    lines = data.split(b"\n")
    i = draw(st.integers(0, len(lines) - 1))
    if draw(st.booleans()):
        del lines[i]
    else:
        lines.insert(draw(st.integers(0, len(lines))), lines[i])
    return b"\n".join(lines)


@st.composite
def _deep_text(draw: st.DrawFn) -> bytes:
    """A real scenario followed by deeply nested arrays or tables, or a long dotted key."""
    data = draw(_seed_bytes())
    n = draw(st.sampled_from([1, 15, 16, 17, 300, 1200, 3000]))
    kind = draw(st.integers(0, 4))
    tails = [b"a = " + b"[" * n + b"1" + b"]" * n + b"\n",
             b"a = " + b"{b = " * n + b"1" + b"}" * n + b"\n",
             b"a." * n + b"b = 1\n",
             b"[" + b"a." * n + b"b]\nc = 1\n",
             b"a = " + b"[" * n]  # never closed
    return data + b"\n" + tails[kind]


def raw_documents() -> st.SearchStrategy[bytes]:
    """Byte strings, mostly a real scenario damaged at the byte level."""
    return st.one_of(
        st.binary(max_size=64),
        st.sampled_from([b"", b"\n", b" \t\r\n", b"\xef\xbb\xbf", b"# only a comment\n",
                         b"[scenario]\n", b"\x00" * 8, b"\xff" * 8]),
        _edited(_insert),
        _edited(_cut),
        _edited(_lines),
        _seed_bytes().map(lambda b: b"\xef\xbb\xbf" + b),
        _seed_bytes().map(lambda b: b.replace(b"\n", b"\r")),
        _deep_text(),
    )


def documents() -> st.SearchStrategy[bytes]:
    """A scenario file's bytes: structurally mutated (mostly) or damaged as bytes."""
    return st.one_of(mutated_documents(), mutated_documents(), raw_documents())


__all__ = ["SEED_DOCS", "SEED_TEXTS", "SIZE_AND_TIME_TEXTS", "documents", "mutated_documents",
           "pick", "raw_documents", "toml_text", "values"]
