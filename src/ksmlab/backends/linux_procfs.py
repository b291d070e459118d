"""Parsers of the ``/proc/PID`` files the Linux backend reads: ``maps``, ``smaps``, ``ksm_stat``.

Pure text-to-record functions (no file access), re-exported by
:mod:`ksmlab.backends.linux`.
"""

from __future__ import annotations

import re
from typing import Final

from ksmlab.api import KsmStat, SmapsEntry

__all__ = ["MapsEntry", "parse_ksm_stat", "parse_maps", "parse_smaps"]

_VMA_HEADER: Final = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) ")


class MapsEntry:
    """One line of ``/proc/PID/maps``: ``start``, ``end`` and the ``perms`` string."""

    __slots__ = ("end", "perms", "start")

    def __init__(self, start: int, end: int, perms: str) -> None:
        self.start = start
        self.end = end
        self.perms = perms

    def __repr__(self) -> str:
        return f"MapsEntry({self.start:#x}-{self.end:#x} {self.perms})"


def parse_maps(text: str) -> list[MapsEntry]:
    """Parse ``/proc/PID/maps`` text into :class:`MapsEntry` records, in address order."""
    out = []
    for line in text.splitlines():
        m = _VMA_HEADER.match(line)
        if m:
            out.append(MapsEntry(int(m[1], 16), int(m[2], 16), m[3]))
    return out


def parse_smaps(text: str) -> list[SmapsEntry]:
    """Parse ``/proc/PID/smaps`` text into :class:`~ksmlab.api.SmapsEntry` records.

    Sizes are converted from the file's kB to bytes.  A field missing from the
    file (older kernels have no ``KSM:`` line) reads as 0.
    """
    out: list[SmapsEntry] = []
    cur: dict[str, object] | None = None

    def flush() -> None:
        if cur is not None:
            out.append(SmapsEntry(
                start=int(str(cur["start"])), end=int(str(cur["end"])), perms=str(cur["perms"]),
                vm_flags=tuple(str(cur.get("flags", "")).split()),
                rss=int(str(cur.get("Rss", 0))), anonymous=int(str(cur.get("Anonymous", 0))),
                ksm=int(str(cur.get("KSM", 0))),
                anon_huge=int(str(cur.get("AnonHugePages", 0)))))

    for line in text.splitlines():
        m = _VMA_HEADER.match(line)
        if m:
            flush()
            cur = {"start": int(m[1], 16), "end": int(m[2], 16), "perms": m[3]}
            continue
        if cur is None:
            continue
        key, _, rest = line.partition(":")
        if key == "VmFlags":
            cur["flags"] = rest
        elif key in ("Rss", "Anonymous", "KSM", "AnonHugePages"):
            parts = rest.split()
            # The unit is always kB in smaps; convert to bytes.
            cur[key] = int(parts[0]) * 1024
    flush()
    return out


def parse_ksm_stat(text: str) -> KsmStat:
    """Parse ``/proc/PID/ksm_stat``: numbers become ints, ``yes``/``no`` become bools."""
    out: KsmStat = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 2:
            continue
        key = parts[0].rstrip(":")
        value = parts[-1]
        if value in ("yes", "no"):
            out[key] = value == "yes"
        else:
            out[key] = int(value)
    return out
