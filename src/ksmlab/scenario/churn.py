"""Write activities and write events as batches of page writes, drawn with numpy.

An activity of a process is a *stream* of writes: when (evenly spaced at its
own seeded phase, or a Poisson process), which page of the region (at random
or in turn), and for ``data = "random"`` at which offset and which bytes.
Streams draw these in blocks of arrays from seeded generators, so a write
costs no Python of its own; the runner takes every write due before the next
thing that could observe the machine (ksmd's next batch, the next event,
sample or checkpoint) as one :class:`WriteBatch`, in time order (ties in the
order the streams started), and the backend applies it: the bulk engine as
one array step, the others write by write.

Every draw is seeded by the scenario seed and the stream's identity, and a
stream's blocks do not depend on how the writes are taken or applied, so a run
repeats exactly and every backend sees the same writes.  The bytes of random
writes come from a generator of their own: a backend that does not need them
(the bulk engine names a write's content without them) does not draw them,
and the other draws stay the same.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ksmlab.api import Process
from ksmlab.constants import PAGE_SIZE
from ksmlab.scenario.model import WriteActivity, WriteData, WriteEvent
from ksmlab.scenario.units import NS_PER_S

Ints = npt.NDArray[np.int64]
Bytes2D = npt.NDArray[np.uint8]

NEVER = np.iinfo(np.int64).max
"""A write time past every run (the clock's end)."""

_TIME_LIMIT = float(1 << 62)
"""Times at or past this (146 years) are NEVER: no run gets there, and int64 sums stay exact."""

EVENT_PIECE = 1 << 16
"""A write event's pages are drawn (and applied) this many at a time."""


def generators(*key: object) -> tuple[np.random.Generator, np.random.Generator,
                                       np.random.Generator]:
    """Three independent generators (times, pages and offsets, bytes) seeded by *key*."""
    digest = hashlib.blake2b(":".join(map(str, key)).encode(), digest_size=16).digest()
    seq = np.random.SeedSequence(int.from_bytes(digest, "little"))
    a, b, c = (np.random.Generator(np.random.PCG64(s)) for s in seq.spawn(3))
    return a, b, c


def block_size(a: WriteActivity) -> int:
    """Writes a stream draws at a time: about a second's worth (64 to 4096), and at most
    4 MiB of random bytes.  A function of the activity alone, so the same on every backend."""
    n = min(4096, max(64, 1 << max(0, math.ceil(math.log2(a.rate)))))
    return max(16, min(n, (1 << 22) // max(a.nbytes, 1)))


@dataclass(slots=True)
class WriteTarget:
    """Where writes go: a mapping of a process, and what a write puts there.

    Attributes:
        proc: the process; None once it has exited (its writes stop).
        addr: the mapping's address; page *i* of a write is at ``addr + i * PAGE_SIZE``.
        data: ``random`` (*nbytes* random bytes at an offset) or ``zero`` (the page zeroed).
        nbytes: bytes per random write.
        what: the activity or event, for error messages.
    """

    proc: Process | None
    addr: int
    data: WriteData
    nbytes: int
    what: str


@dataclass(frozen=True, slots=True)
class WriteBatch:
    """Page writes to apply in order, as arrays.

    Attributes:
        targets: where they go.
        which: the target of each write.
        page: the page of the target's mapping each write hits.
        off: where its random bytes go in the page (0 for a zeroing write).
        nth: the write's row in its target's *chunks*.
        chunks: per target, the random bytes of its writes (one row per write, in
            order), or None (zeroing writes, or bytes not drawn: see :class:`Churn`).
    """

    targets: list[WriteTarget]
    which: Ints
    page: Ints
    off: Ints
    nth: Ints
    chunks: list[Bytes2D | None]

    def __len__(self) -> int:
        return len(self.which)

    def chunk(self, j: int) -> bytes | None:
        """The random bytes of write *j*, if drawn."""
        rows = self.chunks[int(self.which[j])]
        return None if rows is None else rows[int(self.nth[j])].tobytes()


class _Stream:
    """The writes of one activity in one process (see the module doc)."""

    def __init__(self, a: WriteActivity, target: WriteTarget, key: tuple[object, ...],
                 first: int, pages: int, start_ns: int, end_ns: int | None,
                 want_bytes: bool) -> None:
        self.a, self.target = a, target
        self.first, self.pages = first, pages
        self.start_ns = start_ns
        self.end_ns = NEVER if end_ns is None else end_ns
        self.times, self.picks, self.bytes = generators(*key)
        self.want_bytes = want_bytes and a.data == "random"
        self.block = block_size(a)
        self.step = NS_PER_S / a.rate
        # Even arrivals: each process at its own phase within the first period.
        self.phase = round(self.times.random() * self.step) if a.arrivals == "even" else 0
        self.drawn = 0  # writes drawn so far
        self.last = start_ns  # time of the last write drawn (Poisson arrivals)
        self.t: Ints = np.zeros(0, np.int64)
        self.page: Ints = self.t
        self.off: Ints = self.t
        self.chunks: Bytes2D | None = None
        self.pos = 0

    def _draw(self) -> None:
        """The next block of writes."""
        n, k0 = self.block, self.drawn
        if self.a.arrivals == "even":
            k = np.arange(k0, k0 + n, dtype=np.float64)
            tf = self.start_ns + self.phase + k * self.step
            t = np.where(tf < _TIME_LIMIT, self.start_ns + self.phase
                         + np.rint(np.minimum(k * self.step, _TIME_LIMIT)).astype(np.int64), NEVER)
        else:
            gaps = np.rint(self.times.exponential(self.step, n))
            gaps[1 if k0 == 0 else 0:] = np.maximum(gaps[1 if k0 == 0 else 0:], 1)
            ok = self.last + np.cumsum(gaps) < _TIME_LIMIT
            t = np.full(n, NEVER, np.int64)
            t[ok] = self.last + np.cumsum(gaps[ok].astype(np.int64))
        # Strictly increasing (one write per nanosecond at most), as a clock of ns allows.
        idx = np.arange(n, dtype=np.int64)
        prev = self.t[-1] if len(self.t) else -1
        t = np.maximum(np.maximum.accumulate(t - idx) + idx, prev + 1 + idx)
        t[t < 0] = NEVER  # wrapped past the clock's end
        if self.a.pick == "random":
            page = self.picks.integers(0, self.pages, n)
        else:
            page = (k0 + np.arange(n, dtype=np.int64)) % self.pages
        off = (self.picks.integers(0, PAGE_SIZE - self.a.nbytes + 1, n)
               if self.a.data == "random" else np.zeros(n, np.int64))
        if self.want_bytes:
            self.chunks = np.frombuffer(self.bytes.bytes(n * self.a.nbytes),
                                        np.uint8).reshape(n, self.a.nbytes)
        self.t, self.page, self.off = t, page + self.first, off.astype(np.int64)
        self.pos = 0
        self.drawn += n
        self.last = int(t[-1]) if t[-1] != NEVER else NEVER

    def _more(self) -> bool:
        """Whether writes are left in the block, drawing the next block if need be."""
        if self.pos < len(self.t):
            return True
        if self.last >= self.end_ns or self.last == NEVER:
            return False
        self._draw()
        return True

    def next_ns(self) -> int | None:
        """When the next write is due; None when the stream has ended."""
        if self.target.proc is None or not self._more():
            return None
        t = int(self.t[self.pos])
        return None if t >= self.end_ns else t

    def take(self, limit_ns: int) -> list[tuple[Ints, Ints, Ints, Bytes2D | None]]:
        """The writes due before *limit_ns*, as (times, pages, offsets, bytes) pieces."""
        stop = min(limit_ns, self.end_ns)
        out = []
        while self._more():
            end = max(self.pos, int(np.searchsorted(self.t, stop, side="left")))
            if end > self.pos:
                sl = slice(self.pos, end)
                out.append((self.t[sl], self.page[sl], self.off[sl],
                            None if self.chunks is None else self.chunks[sl]))
                self.pos = end
            if end < len(self.t):
                break  # the next write is due at or after stop
        return out


class Churn:
    """Every running write stream of a run; hands out the writes due, as batches.

    Args:
        seed: the scenario's seed.
        want_bytes: whether the backend needs the random bytes of writes of so many
            bytes (the bulk engine does only for short writes, see its backend).
    """

    def __init__(self, seed: int, want_bytes: Callable[[int], bool]) -> None:
        self.seed = seed
        self.want_bytes = want_bytes
        self._heap: list[tuple[int, int, _Stream]] = []
        self._order = itertools.count()
        self.writes = 0
        """Writes handed out so far."""

    def start(self, a: WriteActivity, group: str, index: int, target: WriteTarget,
              first: int, pages: int, end_ns: int | None) -> None:
        """Start the writes of activity *a* in process *index* of *group* (now: ``a.start_ns``)."""
        s = _Stream(a, target, (self.seed, "activity", a.index, group, index), first, pages,
                    a.start_ns, end_ns, self.want_bytes(a.nbytes))
        self._push(s)

    def _push(self, s: _Stream) -> None:
        t = s.next_ns()
        if t is not None:
            heapq.heappush(self._heap, (t, next(self._order), s))

    def next_ns(self) -> int | None:
        """When the next write of any stream is due; None if none will come."""
        while self._heap:
            t, _, s = self._heap[0]
            if s.target.proc is not None:
                return t
            heapq.heappop(self._heap)  # its process exited
        return None

    def take(self, limit_ns: int) -> WriteBatch:
        """Every write due before *limit_ns*, in time order (ties: the order streams started)."""
        taken: list[tuple[int, _Stream]] = []
        while self._heap and self._heap[0][0] < limit_ns:
            _, order, s = heapq.heappop(self._heap)
            if s.target.proc is not None:
                taken.append((order, s))
        taken.sort(key=lambda x: x[0])
        targets: list[WriteTarget] = []
        chunks: list[Bytes2D | None] = []
        pieces: list[tuple[Ints, Ints, Ints, Bytes2D | None]] = []
        counts: list[int] = []
        for order, s in taken:
            mine = s.take(limit_ns)
            pieces += mine
            counts.append(sum(len(p[0]) for p in mine))
            chunks.append(None if mine[0][3] is None else
                          mine[0][3] if len(mine) == 1 else
                          np.concatenate([p[3] for p in mine if p[3] is not None]))
            targets.append(s.target)
            nt = s.next_ns()
            if nt is not None:
                heapq.heappush(self._heap, (nt, order, s))
        if not pieces:
            empty = np.zeros(0, np.int64)
            return WriteBatch([], empty, empty, empty, empty, [])
        t, page, off = (np.concatenate([p[j] for p in pieces]) for j in range(3))
        n = np.array(counts, np.int64)
        which = np.repeat(np.arange(len(n), dtype=np.int64), n)
        nth = np.arange(len(t), dtype=np.int64) - np.repeat(np.cumsum(n) - n, n)
        order_ = np.lexsort((which, t))  # by time, then by stream
        self.writes += len(t)
        return WriteBatch(targets, which[order_], page[order_], off[order_], nth[order_], chunks)


def event_batches(seed: int, e: WriteEvent, targets: list[WriteTarget], first: int, pages: int,
                  want_bytes: bool) -> Iterator[WriteBatch]:
    """The writes of write event *e*: every page of the region of each target, in order,
    in batches of at most :data:`EVENT_PIECE` pages."""
    _, picks, data = generators(seed, "event", e.index)
    want = want_bytes and e.data == "random"
    for target in targets:
        for lo in range(first, first + pages, EVENT_PIECE):
            n = min(EVENT_PIECE, first + pages - lo)
            off = (picks.integers(0, PAGE_SIZE - e.nbytes + 1, n) if e.data == "random"
                   else np.zeros(n, np.int64))
            chunk = (np.frombuffer(data.bytes(n * e.nbytes), np.uint8).reshape(n, e.nbytes)
                     if want else None)
            yield WriteBatch([target], np.zeros(n, np.int64),
                             np.arange(lo, lo + n, dtype=np.int64), off.astype(np.int64),
                             np.arange(n, dtype=np.int64), [chunk])


__all__ = ["NEVER", "Churn", "WriteBatch", "WriteTarget", "block_size", "event_batches",
           "generators"]
