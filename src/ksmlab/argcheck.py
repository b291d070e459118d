"""Argument checks shared by every engine: the error contract of the public API.

:class:`~ksmlab.SimKernel`, :class:`~ksmlab.bulk.BulkKernel` and
:class:`~ksmlab.backends.linux.LinuxKernel` check the arguments of their
public calls with these functions, in the same order, so that one misuse
raises the same exception (and errno) on every engine.

Error contract
--------------
A call checks, in this order, and raises at the first failure, before
anything has changed:

1. **Type** of each argument, in parameter order: :class:`TypeError` naming
   the parameter and the value (``repr``, truncated if long).  An int
   parameter takes an ``int`` or anything with ``__index__`` (numpy
   integers), never a ``bool``, ``float``, ``str``, ``bytes``, ``None``...;
   a flag (``force=``, ``trace=``) takes a ``bool`` only; a time takes a
   real number (``int``, ``float``, numpy, ``Fraction``), never a ``bool``.
2. **Range** of each argument: :class:`ValueError` naming the parameter and
   the value, for an int the C call could not even receive: an ``unsigned
   long``/``size_t`` argument (addresses, lengths, prctl's ``arg2..5``) must
   be in ``[0, 2**64)``, an ``int`` argument (``prot``, ``flags``,
   ``advice``, prctl's ``option``) in ``[-2**31, 2**31)``, ``offset``
   (``off_t``) in ``[-2**63, 2**63)``.  Negative values are refused rather
   than wrapped the way C would (``-4096`` is not ``2**64 - 4096``): write
   the unsigned value to mean it.  The same step refuses bad values of the
   model's own parameters (a count below its minimum, a time that is not a
   finite real >= 0, a NUMA node that does not exist, a view wider than
   :data:`MAX_VIEW_PAGES` pages).
3. **Process state**: :class:`~ksmlab.errors.ProcessExitedError` for a call
   on a process that has exited.
4. **Not modelled**: :class:`~ksmlab.errors.NotModelledError` (a
   :class:`NotImplementedError`) for a call, or an argument value, that
   this engine does not model although Linux accepts it; SimKernel models
   the whole interface except what its docs list.
5. **The kernel's answer**: :class:`OSError` with the errno Linux 6.18
   gives, checked on the real kernel (``tests/test_fuzz_api.py``), e.g.
   EINVAL for an unaligned ``madvise`` start, ENOMEM for an unmapped one,
   EFAULT for a write to unmapped memory.  Only here can a call have
   partial effects, and only where Linux has them (``madvise`` and
   ``mprotect`` over a hole apply to the mapped part before ENOMEM).

``wait_full_scans(n, timeout=)`` takes an int ``0 <= n < 2**64`` (``full_scans``
is an unsigned long) and a timeout that is None or a finite real >= 0
(seconds); ``advance(ms)`` a finite real ``ms >= 0`` of at most
:data:`MAX_ADVANCE_NS` nanoseconds (the clock is a ``ktime_t``).  One call
may raise something else: ``BulkKernel.reserve`` raises :class:`MemoryError`
(naming the table) when this machine cannot allocate what it asks for.
"""

from __future__ import annotations

import math
import numbers
import operator
import os
from collections.abc import Callable, Collection
from typing import NamedTuple

from ksmlab.constants import MAP_ANONYMOUS, PAGE_SHIFT, VM_SPECIAL

U64_LIMIT = 1 << 64
"""First value an ``unsigned long``/``size_t`` cannot hold."""
INT_MIN, INT_MAX = -(1 << 31), (1 << 31) - 1
"""Range of a C ``int``."""
OFF_MIN, OFF_MAX = -(1 << 63), (1 << 63) - 1
"""Range of ``off_t`` (and ``ktime_t``)."""
MAX_VIEW_PAGES = 0x7FFFF000 // 8
"""Pages one ``pfns``/``fingerprints``/``content_ids`` call covers at most: the
entries one read of /proc/PID/pagemap returns (``MAX_RW_COUNT`` bytes)."""
MAX_ADVANCE_NS = OFF_MAX
"""Longest ``advance``: the virtual clock is a ``ktime_t`` (signed 64-bit ns)."""

_SHOW_MAX = 60


def describe(value: object) -> str:
    """*value*'s repr for an error message, cut short if long (never raises)."""
    if isinstance(value, int) and value.bit_length() > 128:
        # repr of a huge int is slow, and refused past 4300 digits.
        return f"{hex(value)[:18]}... ({value.bit_length()} bits)"
    try:
        text = repr(value)
    except Exception:  # a broken __repr__ must not hide the real error
        text = f"<{type(value).__name__} object>"
    return text if len(text) <= _SHOW_MAX else text[:_SHOW_MAX - 3] + "..."


def _type_error(name: str, what: str, value: object) -> TypeError:
    return TypeError(f"{name} must be {what}, not {type(value).__name__}: {describe(value)}")


def integer(name: str, value: object) -> int:
    """*value* as an int: an ``int`` or any ``__index__`` type, but not a bool."""
    if isinstance(value, bool):
        raise _type_error(name, "an int", value)
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise _type_error(name, "an int", value) from None


def _in_range(name: str, value: object, lo: int, hi: int, what: str) -> int:
    v = integer(name, value)
    if not lo <= v <= hi:
        raise ValueError(f"{name} must be {what}, got {describe(v)}")
    return v


def ulong(name: str, value: object) -> int:
    """An ``unsigned long``/``size_t`` argument: an int in ``[0, 2**64)``."""
    return _in_range(name, value, 0, U64_LIMIT - 1,
                     f"an unsigned 64-bit int (0 <= {name} < 2**64)")


def cint(name: str, value: object) -> int:
    """A C ``int`` argument: an int in ``[-2**31, 2**31)``."""
    return _in_range(name, value, INT_MIN, INT_MAX, f"a C int (-2**31 <= {name} < 2**31)")


def offset(name: str, value: object) -> int:
    """An ``off_t`` argument: an int in ``[-2**63, 2**63)``."""
    return _in_range(name, value, OFF_MIN, OFF_MAX, f"an off_t (-2**63 <= {name} < 2**63)")


def count(name: str, value: object, *, minimum: int = 0, maximum: int | None = None) -> int:
    """A count of the model (pages, batches, ns): an int in ``[minimum, maximum]``."""
    v = integer(name, value)
    if v < minimum or (maximum is not None and v > maximum):
        bound = f"at least {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be an int {bound}, got {describe(v)}")
    return v


def optional_count(name: str, value: object, *, minimum: int = 0) -> int | None:
    """None, or :func:`count`."""
    return None if value is None else count(name, value, minimum=minimum)


def duration(name: str, value: object) -> float:
    """A time: a finite real number >= 0 (not a bool), as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _type_error(name, "a real number", value)
    try:
        v = float(value)
    except OverflowError:
        v = math.inf
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {describe(value)}")
    return v


def optional_duration(name: str, value: object) -> float | None:
    """None, or :func:`duration`."""
    return None if value is None else duration(name, value)


def advance_ms(value: object) -> float:
    """``advance``'s *ms*: a :func:`duration` of at most :data:`MAX_ADVANCE_NS`."""
    ms = duration("ms", value)
    if ms * 1_000_000 > MAX_ADVANCE_NS:
        raise ValueError(f"ms must be at most {MAX_ADVANCE_NS / 1e6:.0f} (the clock is a "
                         f"64-bit count of ns), got {describe(value)}")
    return ms


def flag(name: str, value: object) -> bool:
    """A flag: a ``bool`` (not 0 or 1, to catch a value passed in the wrong place)."""
    if not isinstance(value, bool):
        raise _type_error(name, "a bool", value)
    return value


def buffer(name: str, value: object) -> bytes:
    """Bytes to write: ``bytes``, ``bytearray`` or ``memoryview``."""
    if not isinstance(value, bytes | bytearray | memoryview):
        raise _type_error(name, "bytes", value)
    return bytes(value)


def path(name: str, value: object) -> str:
    """A host path: ``str`` or ``os.PathLike[str]``, without NUL bytes."""
    if not isinstance(value, str | os.PathLike):
        raise _type_error(name, "a str path", value)
    text = os.fspath(value)
    if not isinstance(text, str):
        raise _type_error(name, "a str path", value)
    if "\0" in text:
        raise ValueError(f"{name} must not contain a NUL byte, got {describe(value)}")
    return text


def choice(name: str, value: object, choices: Collection[str]) -> str:
    """One of the strings *choices*."""
    if not isinstance(value, str):
        raise _type_error(name, "a str", value)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, "
                         f"got {describe(value)}")
    return value


def view_range(addr: object, length: object) -> tuple[int, int]:
    """``(addr, length)`` of a page view (pfns, fingerprints, content_ids), checked.

    Both are ``unsigned long``; the range must end by ``2**64`` and cover at
    most :data:`MAX_VIEW_PAGES` pages (every page it touches counts).
    """
    a, n = ulong("addr", addr), ulong("length", length)
    if a + n > U64_LIMIT:
        raise ValueError(f"length {describe(n)} runs past the end of the 64-bit address space "
                         f"from addr {a:#x}")
    pages = 0 if n == 0 else ((a + n - 1) >> PAGE_SHIFT) - (a >> PAGE_SHIFT) + 1
    if pages > MAX_VIEW_PAGES:
        raise ValueError(f"length {describe(n)} covers {pages} pages; one call covers at most "
                         f"{MAX_VIEW_PAGES} (what one read of /proc/PID/pagemap returns)")
    return a, n


class MmapArgs(NamedTuple):
    """``mmap``'s arguments, checked (see :func:`mmap_args`)."""

    length: int
    prot: int
    flags: int
    addr: int
    node: int | None
    path: str | None
    offset: int
    vm_flags: int


def mmap_args(length: object, prot: object, flags: object, addr: object, node: object,
              path_: object, offset_: object, vm_flags: object,
              nodes: Callable[[], Collection[int]]) -> MmapArgs:
    """Check ``mmap``'s arguments the same way on every engine.

    *nodes* gives the NUMA nodes that exist (asked only when *node* is given).
    ``vm_flags`` (model-only) may hold only VM_SPECIAL bits, the flags a
    driver's mmap hook sets (VM_IO, VM_PFNMAP, VM_MIXEDMAP, VM_DONTEXPAND).
    """
    n = ulong("length", length)
    pr = cint("prot", prot)
    fl = cint("flags", flags)
    a = ulong("addr", addr)
    nd = None if node is None else integer("node", node)
    pa = None if path_ is None else path("path", path_)
    off = offset("offset", offset_)
    vf = ulong("vm_flags", vm_flags)
    if vf & ~VM_SPECIAL:
        raise ValueError(f"vm_flags may only hold VM_IO, VM_PFNMAP, VM_MIXEDMAP and "
                         f"VM_DONTEXPAND, got {vf:#x}")
    if nd is not None and nd not in (known := nodes()):
        raise ValueError(f"node {describe(nd)} does not exist (nodes: {sorted(known)})")
    if pa is not None and fl & MAP_ANONYMOUS:
        raise ValueError(f"pass either path= or MAP_ANONYMOUS, not both (path={pa!r}, "
                         f"flags={fl:#x})")
    return MmapArgs(n, pr, fl, a, nd, pa, off, vf)


__all__ = [
    "INT_MAX",
    "INT_MIN",
    "MAX_ADVANCE_NS",
    "MAX_VIEW_PAGES",
    "OFF_MAX",
    "OFF_MIN",
    "U64_LIMIT",
    "MmapArgs",
    "advance_ms",
    "buffer",
    "choice",
    "cint",
    "count",
    "describe",
    "duration",
    "flag",
    "integer",
    "mmap_args",
    "offset",
    "optional_count",
    "optional_duration",
    "path",
    "ulong",
    "view_range",
]
