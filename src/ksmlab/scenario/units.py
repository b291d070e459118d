"""Sizes and durations as people write them in scenario files, and back.

Sizes are bytes: an integer, or a string with a binary unit: ``"4KiB"``,
``"8 MiB"``, ``"1GiB"``, or a single letter ``K``/``M``/``G``/``T``/``P``
/``E`` (either case), binary as the kernel's ``memparse()`` reads ``mem=2G``.  Units
that could mean two things are refused: ``KB``/``MB``/``GB``/``TB`` in any
case (10**9 or 2**30 bytes?), ``b``/``Gb`` (bits?) and IEC units in another
case (``gib``, ``GIB``).  Durations are
seconds: a number, or a string with a unit (``"500ms"``, ``"10s"``,
``"5min"``, ``"1h"``).  Times are kept as integer nanoseconds, so the
scheduler's arithmetic is exact.
"""

from __future__ import annotations

import re
from fractions import Fraction

NS_PER_S = 1_000_000_000

MAX_SIZE = 1 << 64
"""Sizes must be below this (16 EiB): the kernel's lengths and counters are 64-bit."""

MAX_DURATION_NS = (1 << 63) - 1
"""The longest duration, in ns (about 292 years): the kernel's and Python's 64-bit ns clocks."""

TOO_LARGE_SIZE = "a size below 16 EiB (2**64 bytes)"
TOO_LONG_DURATION = "a duration of at most 292 years (2**63 - 1 ns)"

_SIZE_UNITS = {"": 1, "B": 1}
for _i, _letter in enumerate("KMGTPE", start=1):
    # memparse() takes the letter in either case; the IEC name only as IEC spells it.
    _SIZE_UNITS |= {_letter: 1 << 10 * _i, _letter.lower(): 1 << 10 * _i,
                    f"{_letter}iB": 1 << 10 * _i}
SIZE_UNITS_ACCEPTED = "B, K or KiB, M or MiB, G or GiB, T or TiB, P or PiB, E or EiB"
"""The size units, as error messages name them (each 1024 times the one before)."""
_AMBIGUOUS = frozenset({"b", *(f"{c}b" for c in "kmgtpe"), *(f"{c}ib" for c in "kmgtpe")})
"""Units refused because they could mean two things (in any case not accepted above)."""
_TIME_UNITS = {
    "": NS_PER_S, "ns": 1, "us": 1_000, "µs": 1_000, "ms": 1_000_000,
    "s": NS_PER_S, "sec": NS_PER_S, "min": 60 * NS_PER_S, "m": 60 * NS_PER_S,
    "h": 3600 * NS_PER_S,
}
_NUMBER_UNIT = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Zµ]*)\s*$")


def _exact(number: str, too_large: str) -> Fraction:
    """The decimal *number* (digits, at most one point) exactly.

    Exact, so ``"4096.0000000000000001"`` is not taken for 4096 and a long
    number is refused instead of becoming ``inf`` as a float would.
    """
    whole, _, frac = number.partition(".")
    whole, frac = whole.lstrip("0"), frac.rstrip("0")
    if len(whole) > 30:  # 10**30 is past every size and duration limit
        raise ValueError(too_large)
    if len(frac) > 64:
        msg = "a number with at most 64 digits after the point"
        raise ValueError(msg)
    return Fraction(f"{whole or 0}.{frac or 0}")


def parse_size(text: str) -> int:
    """Bytes in *text* (``"8MiB"``, ``"4096"``, ``"2G"``); ValueError naming what is accepted."""
    m = _NUMBER_UNIT.match(text)
    unit = m.group(2) if m else None
    if m is None or unit not in _SIZE_UNITS:
        why = ""
        if unit is not None and unit.lower() in _AMBIGUOUS:
            why = f"; \"{unit}\" is refused as ambiguous: decimal or binary, bits or bytes?"
        msg = (f"a size such as 4096, \"64KiB\", \"8MiB\" or \"1GiB\" (units {SIZE_UNITS_ACCEPTED}, "
               f"each 1024 times the one before, as the kernel's memparse() reads them{why})")
        raise ValueError(msg)
    value = _exact(m.group(1), TOO_LARGE_SIZE) * _SIZE_UNITS[unit]
    if value.denominator != 1:
        msg = "a whole number of bytes"
        raise ValueError(msg)
    if value >= MAX_SIZE:
        raise ValueError(TOO_LARGE_SIZE)
    return int(value)


def parse_duration_ns(text: str) -> int:
    """Nanoseconds in *text* (``"500ms"``, ``"10s"``, ``"5min"``, ``"1h"``), at most :data:`MAX_DURATION_NS`."""
    m = _NUMBER_UNIT.match(text)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _TIME_UNITS:
        msg = "a duration such as 10, \"500ms\", \"10s\", \"5min\" or \"1h\""
        raise ValueError(msg)
    ns = round(_exact(m.group(1), TOO_LONG_DURATION) * _TIME_UNITS[unit])
    if ns > MAX_DURATION_NS:
        raise ValueError(TOO_LONG_DURATION)
    return ns


def format_bytes(n: int | float) -> str:
    """Bytes in binary units, signed (``general_profit`` can be negative): ``"48.3 MiB"``."""
    sign = "-" if n < 0 else ""
    value = float(abs(n))
    if value < 1024:
        return f"{sign}{int(value)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{sign}{value:.1f} {unit}"


def format_duration(seconds: float) -> str:
    """A virtual or CPU time for people: ``"250 ms"``, ``"12.5 s"``, ``"5 min"``, ``"1 h 2 min"``."""
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if seconds < 1:
        ms = seconds * 1000
        return f"{ms:.3g} ms" if ms < 10 else f"{ms:.0f} ms"
    if seconds < 60:
        return f"{seconds:.3g} s" if seconds < 10 else f"{seconds:.1f} s".replace(".0 s", " s")
    if seconds < 3600:
        m, s = divmod(seconds, 60)
        return f"{int(m)} min" if round(s) == 0 else f"{int(m)} min {round(s)} s"
    h, rest = divmod(seconds, 3600)
    m = round(rest / 60)
    return f"{int(h)} h" if m == 0 else f"{int(h)} h {m} min"


__all__ = ["MAX_DURATION_NS", "MAX_SIZE", "NS_PER_S", "SIZE_UNITS_ACCEPTED", "TOO_LARGE_SIZE",
           "TOO_LONG_DURATION",
           "format_bytes", "format_duration", "parse_duration_ns", "parse_size"]
