# SPDX-License-Identifier: GPL-2.0-only
"""Hypothesis strategies for driving a SimKernel: page contents, writes, knob values.

Contents come from a small alphabet so that identical pages are common and
KSM actually merges: the zero page, a few repeated patterns, near copies of
them (one byte changed, so memcmp has to look far), and now and then random
bytes that match nothing.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from hypothesis import strategies as st

from ksmlab import (
    MADV_DONTNEED,
    MADV_MERGEABLE,
    MADV_UNMERGEABLE,
    PAGE_SIZE,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
)

ZERO_PAGE = bytes(PAGE_SIZE)

PATTERNS: tuple[bytes, ...] = (
    ZERO_PAGE,
    b"\xaa" * PAGE_SIZE,
    bytes(range(256)) * (PAGE_SIZE // 256),
    (b"ksmlab" * PAGE_SIZE)[:PAGE_SIZE],
)
"""Whole-page contents that many pages will share."""

NEAR_PATTERNS: tuple[bytes, ...] = (
    ZERO_PAGE[:-1] + b"\x01",
    b"\xaa" * (PAGE_SIZE - 1) + b"\xab",
    b"\xaa" * 100 + b"\x00" + b"\xaa" * (PAGE_SIZE - 101),
)
"""Pages that differ from a pattern in one byte (they sort next to it in the trees)."""


def random_page(seed: int) -> bytes:
    """4 KiB of seeded random bytes: a page no other page equals."""
    return random.Random(seed).randbytes(PAGE_SIZE)


def page_contents() -> st.SearchStrategy[bytes]:
    """One page of content, mostly from the shared alphabet."""
    return st.one_of(
        st.integers(0, len(PATTERNS) - 1).map(PATTERNS.__getitem__),
        st.integers(0, len(NEAR_PATTERNS) - 1).map(NEAR_PATTERNS.__getitem__),
        st.integers(0, 2**32 - 1).map(random_page),
    )


@dataclass(frozen=True)
class WritePlan:
    """A store relative to a chosen mapped page: *offset* bytes in, *data* long."""

    offset: int
    data: bytes

    def __repr__(self) -> str:
        return f"WritePlan(offset={self.offset}, len={len(self.data)}, head={self.data[:8]!r})"


def write_plans() -> st.SearchStrategy[WritePlan]:
    """Whole pages (1–3, page aligned) or a short partial write, possibly crossing a page end."""
    whole = st.lists(page_contents(), min_size=1, max_size=3).map(
        lambda pages: WritePlan(0, b"".join(pages)))
    partial = st.builds(
        WritePlan,
        st.one_of(st.integers(0, PAGE_SIZE - 1), st.integers(PAGE_SIZE - 8, PAGE_SIZE - 1)),
        st.one_of(st.binary(min_size=1, max_size=16),
                  st.sampled_from([b"\x00" * 8, b"\xaa" * 8, b"\x01"])))
    return st.one_of(whole, partial)


PROTS: tuple[int, ...] = (PROT_READ | PROT_WRITE, PROT_READ, PROT_NONE, PROT_WRITE)
"""Protections the machine uses (read-write first, so it is what shrinking tends to)."""

ADVICES: tuple[int, ...] = (MADV_MERGEABLE, MADV_UNMERGEABLE, MADV_DONTNEED)


@dataclass(frozen=True)
class SysfsWrite:
    """A write to /sys/kernel/mm/ksm/*name*; *valid* says whether the store accepts the text."""

    name: str
    value: str
    valid: bool


VALID_SYSFS: dict[str, tuple[str, ...]] = {
    "run": ("1", "0", "2", "1\n"),
    "pages_to_scan": ("100", "1", "5", "1000", "0", "+7"),
    "use_zero_pages": ("1", "0", "y", "n"),
    "smart_scan": ("0", "1"),
    "max_page_sharing": ("2", "3", "4", "5"),
}
"""Values each knob accepts (max_page_sharing may still answer EBUSY)."""

INVALID_SYSFS: dict[str, tuple[str, ...]] = {
    "run": ("3", "-1", "x", "1 ", "0x1"),
    "pages_to_scan": ("-1", "1e3", " 5", "4294967296", "abc"),
    "use_zero_pages": ("2", "x", "-"),
    "smart_scan": ("maybe", "5"),
    "max_page_sharing": ("1", "0", "-3", "x", "99999999999"),
}
"""Texts each knob rejects with an errno, changing nothing."""


def sysfs_writes() -> st.SearchStrategy[SysfsWrite]:
    """A knob write, valid three times out of four."""
    valid = st.sampled_from([SysfsWrite(n, v, True) for n, vs in VALID_SYSFS.items() for v in vs])
    invalid = st.sampled_from([SysfsWrite(n, v, False)
                               for n, vs in INVALID_SYSFS.items() for v in vs])
    return st.one_of(valid, valid, valid, invalid)


U64 = (1 << 64) - 1



@dataclass(frozen=True)
class RefusedCall:
    """A syscall the kernel must refuse with EINVAL before touching anything.

    ``offset`` is added to the address of a mapped page (None: the last page
    of the 64-bit address space, so that any longer range wraps around).
    """

    what: str
    syscall: str
    offset: int | None = 0
    length: int = PAGE_SIZE
    arg: int = 0
    arg3: int = 0


WRAP_START = U64 + 1 - PAGE_SIZE
"""The last page of the 64-bit address space: any longer range wraps."""

REFUSED_CALLS: tuple[RefusedCall, ...] = (
    RefusedCall("munmap: unaligned start", "munmap", offset=8),
    RefusedCall("munmap: length 0", "munmap", length=0),
    RefusedCall("mprotect: unaligned start", "mprotect", offset=1, arg=PROT_READ),
    RefusedCall("mprotect: unknown PROT bit", "mprotect", arg=0x80),
    RefusedCall("madvise: unaligned start", "madvise", offset=1, arg=MADV_MERGEABLE),
    RefusedCall("madvise: unaligned start", "madvise", offset=PAGE_SIZE - 1, arg=MADV_UNMERGEABLE),
    RefusedCall("madvise: unaligned start", "madvise", offset=8, arg=MADV_DONTNEED),
    RefusedCall("madvise: unknown advice", "madvise", arg=12345),
    RefusedCall("madvise: negative advice", "madvise", arg=-1),
    RefusedCall("madvise: length overflows", "madvise", length=U64, arg=MADV_MERGEABLE),
    RefusedCall("madvise: length overflows", "madvise", length=U64 - 5, arg=MADV_DONTNEED),
    RefusedCall("madvise: range wraps around", "madvise", offset=None, length=2 * PAGE_SIZE,
                arg=MADV_UNMERGEABLE),
    RefusedCall("prctl: PR_SET_MEMORY_MERGE with arg3", "prctl", arg=1, arg3=1),
    RefusedCall("prctl: PR_SET_MEMORY_MERGE 0 with arg3", "prctl", arg=0, arg3=5),
    RefusedCall("prctl: PR_GET_MEMORY_MERGE with arg2", "prctl_get", arg=1),
    RefusedCall("prctl: unknown option", "prctl_unknown"),
)
"""Calls with invalid arguments, all EINVAL, none of which may change anything."""
