"""One pass over one process's pages: their state from ``pagemap`` and ``kpageflags``, and
the fingerprints of the present ones, read through ``/proc/PID/mem``.

Never faults a page in: memory is read only where ``pagemap`` said the page
is present, never for a swapped, absent or page-cache page, and nothing is
written.  A page can go away between the ``pagemap`` read and the memory
read (unmapped, swapped out, copied on write, merged by ksmd): right before
each chunk is read, ``pagemap`` is read again for its pages and only those
still as the pass found them are read; right after, a third read checks them
again, and a page whose presence or PFN changed meanwhile keeps no
fingerprint (it is counted as *raced*).  The window left is the one between
the second ``pagemap`` read and the memory read (microseconds): a page
swapped out exactly then is read back in by that read, as the process's own
access would (docs/snapshot.md).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, cast

import numpy as np
import numpy.typing as npt

from ksmlab.mm.page import FINGERPRINT_SIZE, ZERO_FINGERPRINT, fingerprint
from ksmlab.snapshot.procfs import Area, ProcessGoneError, ProcessHandle

__all__ = ["KpageFlags", "PassRows", "read_pass"]

# /proc/PID/pagemap (Documentation/admin-guide/mm/pagemap.rst): one u64 per page.
PM_PRESENT: Final = np.uint64(1 << 63)
PM_SWAP: Final = np.uint64(1 << 62)
PM_FILE: Final = np.uint64(1 << 61)
PM_EXCLUSIVE: Final = np.uint64(1 << 56)
PM_PFN_MASK: Final = np.uint64((1 << 55) - 1)

# /proc/kpageflags bits (include/uapi/linux/kernel-page-flags.h).
KPF_KSM: Final = np.uint64(1 << 21)
KPF_THP: Final = np.uint64(1 << 22)
KPF_ZERO_PAGE: Final = np.uint64(1 << 24)

PAGEMAP_CHUNK: Final = 1 << 16
"""Pagemap entries read at once (512 KiB)."""

READ_CHUNK: Final = 256
"""Pages of memory read at once (1 MiB with 4 KiB pages)."""

_KPF_GAP: Final = 8
"""PFNs at most this far apart are looked up in ``kpageflags`` with one read
(measured here: a read costs about as much as six more entries)."""

U64 = npt.NDArray[np.uint64]
Bools = npt.NDArray[np.bool_]


class KpageFlags:
    """``/proc/kpageflags``, read for many PFNs at once (root only)."""

    def __init__(self, path: str = "/proc/kpageflags") -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def lookup(self, pfns: U64) -> U64:
        """The flags of each PFN in *pfns* (0 for a PFN the file does not cover).

        The distinct PFNs are read in runs (PFNs at most ``_KPF_GAP`` apart
        share one read): one ``pread`` per run, and no per-PFN Python work.
        """
        if pfns.size == 0:
            return np.zeros(0, np.uint64)
        uniq, inverse = np.unique(pfns, return_inverse=True)
        breaks = np.flatnonzero(np.diff(uniq) > _KPF_GAP) + 1
        first = np.r_[0, breaks]
        last = np.r_[breaks, uniq.size] - 1
        lo = uniq[first]
        lengths = (uniq[last] - lo + np.uint64(1)).astype(np.int64)
        fd = self.fd
        raw = b"".join([os.pread(fd, 8 * n, 8 * p)
                        for p, n in zip(lo.tolist(), lengths.tolist(), strict=True)])
        if len(raw) != 8 * int(lengths.sum()):  # a PFN past the end of the file: pad each run
            raw = b"".join([os.pread(fd, 8 * n, 8 * p).ljust(8 * n, b"\0")
                            for p, n in zip(lo.tolist(), lengths.tolist(), strict=True)])
        table = np.frombuffer(raw, "<u8")
        run = np.repeat(np.arange(first.size), last - first + 1)
        offset = np.cumsum(lengths) - lengths
        flags = table[offset[run] + (uniq - lo[run]).astype(np.int64)]
        return np.asarray(flags[inverse], np.uint64)

    def close(self) -> None:
        """Close the file."""
        os.close(self.fd)


@dataclass
class PassRows:
    """One process's pages in one pass: one entry per present or swapped page.

    Columns are numpy arrays of equal length, in address order.  ``pfn`` is
    None where ``pagemap`` shows no PFNs (no CAP_SYS_ADMIN); ``kflags`` is
    None without ``/proc/kpageflags``.  ``fingerprint`` rows are zero where
    ``hashed`` is False (not present, a page-cache page, or raced).
    """

    vma: npt.NDArray[np.uint32]
    addr: U64
    entry: U64
    pfn: U64 | None
    kflags: U64 | None
    fingerprint: npt.NDArray[np.uint8]
    hashed: Bools
    raced: int
    bytes_read: int

    def __len__(self) -> int:
        return int(self.addr.size)

    @property
    def present(self) -> Bools:
        """Present in RAM."""
        return self.bit(PM_PRESENT)

    def bit(self, mask: np.uint64) -> Bools:
        """Whether each page's pagemap entry has *mask*."""
        return np.asarray(self.entry & mask, np.bool_)

    def kflag(self, mask: np.uint64) -> Bools | None:
        """Whether each present page's kpageflags have *mask* (None when unknown)."""
        if self.kflags is None:
            return None
        return np.asarray(self.kflags & mask, np.bool_) & self.present


def _pread_pagemap(fd: int, first_page: int, n: int) -> U64:
    raw = os.pread(fd, 8 * n, 8 * first_page)
    out = np.zeros(n, np.uint64)  # beyond the end of the address space pagemap reads short
    got = np.frombuffer(raw, "<u8")
    out[:got.size] = got
    return out


def _read_entries(handle: ProcessHandle, areas: Sequence[Area],
                  page_shift: int) -> tuple[npt.NDArray[np.uint32], U64, U64]:
    """The vma index, address and pagemap entry of every present or swapped page."""
    vmas, addrs, entries = [], [], []
    for i, area in enumerate(areas):
        first, last = area.start >> page_shift, area.end >> page_shift
        for lo in range(first, last, PAGEMAP_CHUNK):
            n = min(PAGEMAP_CHUNK, last - lo)
            e = _pread_pagemap(handle.pagemap, lo, n)
            keep = np.flatnonzero(e & (PM_PRESENT | PM_SWAP))
            if keep.size:
                entries.append(e[keep])
                addrs.append((keep.astype(np.uint64) + np.uint64(lo)) << np.uint64(page_shift))
                vmas.append(np.full(keep.size, i, np.uint32))
    if not entries:
        return np.zeros(0, np.uint32), np.zeros(0, np.uint64), np.zeros(0, np.uint64)
    return np.concatenate(vmas), np.concatenate(addrs), np.concatenate(entries)


def _runs(addr: U64, idx: npt.NDArray[np.intp], page_size: int) -> list[tuple[int, int]]:
    """Split the rows *idx* (ascending) into runs of consecutive pages, as [start, end) of idx."""
    if idx.size == 0:
        return []
    a = addr[idx]
    breaks = np.flatnonzero(np.diff(a) != np.uint64(page_size)) + 1
    starts = np.r_[0, breaks]
    ends = np.r_[breaks, idx.size]
    return list(zip(starts.tolist(), ends.tolist(), strict=True))


# The model's fingerprint, given a memoryview of the page: hashlib reads any
# buffer, and a copy of each page into bytes would cost time for nothing.
_page_digest = cast(Callable[[memoryview], bytes], fingerprint)


def read_pass(handle: ProcessHandle, areas: Sequence[Area], *, page_size: int,
              show_pfn: bool, kpageflags: KpageFlags | None,
              on_bytes: Callable[[int], None] | None = None) -> PassRows:
    """Read one pass of *handle*'s pages in *areas* (see the module doc).

    Raises:
        ProcessGoneError: the process exited during the pass.
    """
    shift = page_size.bit_length() - 1
    vma, addr, entry = _read_entries(handle, areas, shift)
    n = addr.size
    present = (entry & PM_PRESENT) != 0
    pfn = np.where(present, entry & PM_PFN_MASK, np.uint64(0)) if show_pfn else None
    kflags = None
    if kpageflags is not None and pfn is not None:
        kflags = np.zeros(n, np.uint64)
        kflags[present] = kpageflags.lookup(pfn[present])
    fps = np.zeros((n, FINGERPRINT_SIZE), np.uint8)
    hashed = np.zeros(n, np.bool_)
    zero = present & ((kflags & KPF_ZERO_PAGE) != 0) if kflags is not None else None
    if zero is not None and zero.any():
        fps[zero] = np.frombuffer(ZERO_FINGERPRINT, np.uint8)  # the shared zero page: known
        hashed |= zero
    want = present & ((entry & PM_FILE) == 0)
    if zero is not None:
        want &= ~zero
    idx = np.flatnonzero(want)
    buf = bytearray(READ_CHUNK * page_size)
    view = memoryview(buf)
    raced = bytes_read = 0
    keep = PM_PRESENT | PM_PFN_MASK
    for s, e in _runs(addr, idx, page_size):
        pos = s
        while pos < e:
            k = min(READ_CHUNK, e - pos)
            rows = idx[pos:pos + k]
            start = int(addr[rows[0]])
            # The pass's pagemap read may be seconds old: check the chunk's pages
            # are still present, right before reading, and read only those.
            now = _pread_pagemap(handle.pagemap, start >> shift, k)
            still = (now & keep) == (entry[rows] & keep)
            if not still.all():
                k = int(np.argmin(still))
                if k == 0:
                    raced += 1  # gone, swapped out or replaced since the pass began
                    pos += 1
                    continue
                rows = rows[:k]
            try:
                got = os.preadv(handle.mem, [view[:k * page_size]], start)
            except OSError as err:
                if err.errno not in (errno.EIO, errno.EFAULT, errno.ENOMEM):
                    raise
                got = 0  # the first page went away (unmapped) meanwhile
            if got <= 0 and handle.exited:
                raise ProcessGoneError(errno.ESRCH, f"pid {handle.pid}: the process exited")
            done = got // page_size
            if done:
                digest = _page_digest
                digests = b"".join([digest(view[o:o + page_size])
                                    for o in range(0, done * page_size, page_size)])
                ok = rows[:done]
                fps[ok] = np.frombuffer(digests, np.uint8).reshape(done, FINGERPRINT_SIZE)
                # The pages must still be the ones pagemap showed: same presence and PFN.
                again = _pread_pagemap(handle.pagemap, start >> shift, done)
                same = (again & keep) == (entry[ok] & keep)
                hashed[ok] = same
                raced += int(done - same.sum())
                bytes_read += done * page_size
                if on_bytes is not None:
                    on_bytes(done * page_size)
            if done < k:
                raced += 1  # this page could not be read: skip it
                done += 1
            pos += done
    fps[~hashed] = 0
    return PassRows(vma=vma, addr=addr, entry=entry, pfn=pfn, kflags=kflags, fingerprint=fps,
                    hashed=hashed, raced=raced, bytes_read=bytes_read)
