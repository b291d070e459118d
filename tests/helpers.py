# SPDX-License-Identifier: GPL-2.0-only
"""Small helpers shared by the KSM behaviour tests (selftests, madvise, lifecycle, traces).

They mirror the helpers of the kernel's selftests (``ksm_start``, ``ksm_stop``,
``range_maps_duplicates``, ``expect()``) so the tests read like the C code
they re-create.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from ksmlab import PAGE_SIZE, SimKernel, SimProcess

MiB = 1 << 20

COUNTERS = ("pages_scanned", "pages_shared", "pages_sharing", "pages_unshared",
            "pages_volatile", "pages_skipped", "full_scans", "ksm_zero_pages",
            "stable_node_chains", "stable_node_dups", "general_profit")


def merge(k: SimKernel, n: int = 2) -> None:
    """``ksm_start``: write run=1 and wait until full_scans has grown by *n*."""
    k.sysfs["run"] = "1"
    k.wait_full_scans(n)


def ksm_stop(k: SimKernel) -> None:
    """``ksm_stop``: run=2 (unmerge everything, stop ksmd)."""
    k.sysfs["run"] = "2"


def counters(k: SimKernel, *names: str) -> dict[str, int]:
    """The named global counters (all of :data:`COUNTERS` by default) as ints."""
    return {n: int(k.sysfs[n]) for n in (names or COUNTERS)}


def shared_sharing(k: SimKernel) -> tuple[int, int]:
    """(pages_shared, pages_sharing)."""
    return int(k.sysfs["pages_shared"]), int(k.sysfs["pages_sharing"])


def expect(n: int, max_page_sharing: int = 256) -> tuple[int, int]:
    """ksm_tests.c's expected (pages_shared, pages_sharing) for *n* identical pages.

    A KSM page has at most M = max_page_sharing sharers.  If n mod M is 0 or
    1, every full KSM page takes M mappings (a single leftover page has no
    partner); otherwise one more, partly filled, KSM page exists.
    """
    m = max_page_sharing
    if n % m in (0, 1):
        shared = n // m
        return shared, shared * (m - 1)
    shared = n // m + 1
    return shared, n - shared


def range_maps_duplicates(p: SimProcess, addr: int, size: int) -> bool:
    """ksm_functional_tests.c's check: do two present pages of the range share a PFN?

    Like the C code, unmapped pages (and PFN 0, which non-root readers see)
    are ignored.  The shared zero page has a real PFN, so two pages mapping
    it count as duplicates.
    """
    seen: set[int] = set()
    for pfn in p.pfns(addr, size):
        if not pfn:
            continue
        if pfn in seen:
            return True
        seen.add(pfn)
    return False


def fill(p: SimProcess, addr: int, npages: int, byte: int) -> None:
    """memset *npages* pages at *addr* to *byte*."""
    p.write(addr, bytes([byte]) * (npages * PAGE_SIZE))


def page_of(byte: int | bytes) -> bytes:
    """A page of one repeated byte (or a short pattern padded with '*')."""
    if isinstance(byte, int):
        return bytes([byte]) * PAGE_SIZE
    return byte + b"*" * (PAGE_SIZE - len(byte))


def vma_layout(p: SimProcess) -> list[tuple[int, int, bool]]:
    """Each vma as (start, pages, mergeable)."""
    return [(e.start, (e.end - e.start) // PAGE_SIZE, e.mergeable) for e in p.smaps()]


@contextmanager
def raises_errno(err: int) -> Iterator[pytest.ExceptionInfo[OSError]]:
    """``pytest.raises(OSError)`` that also checks the errno."""
    with pytest.raises(OSError) as info:
        yield info
    got = info.value.errno
    assert got == err, f"expected {errno.errorcode[err]}, got {errno.errorcode.get(got, got)}"


def show(text: str) -> str:
    """A short readable form of a written text, for test ids."""
    if len(text) <= 24:
        return repr(text)
    return f"{text[:3]!r}..{text[-3:]!r}[{len(text)}]"


def write_id(case: tuple[str, str, str | None, dict[str, str]]) -> str:
    """``file=text``: the test id of a single-write sysfs case."""
    name, text, _err, _expected = case
    return f"{name}={show(text)}"


def staged_id(case: tuple[tuple[tuple[str, str], ...], str, str, str | None,
                          dict[str, str]]) -> str:
    """``setup;...->file=text``: the test id of a staged sysfs case."""
    setup, name, text, _err, _expected = case
    steps = ";".join(f"{n}={show(v)}" for n, v in setup)
    return f"{steps}->{name}={show(text)}"
