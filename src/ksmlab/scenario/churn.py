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

SPAN_NS = NS_PER_S
"""How far ahead of what is asked the streams' writes are merged at a time."""

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
        at: where the write's random bytes start in *blob* (``targets[w].nbytes`` of
            them), or -1 (a zeroing write, or bytes not drawn: see :class:`Churn`).
        blob: the random bytes.
    """

    targets: list[WriteTarget]
    which: Ints
    page: Ints
    off: Ints
    at: Ints
    blob: npt.NDArray[np.uint8]

    def __len__(self) -> int:
        return len(self.which)

    def chunk(self, j: int) -> bytes | None:
        """The random bytes of write *j*, if drawn."""
        at = int(self.at[j])
        if at < 0:
            return None
        return self.blob[at:at + self.targets[int(self.which[j])].nbytes].tobytes()


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

    def give(self, before_ns: int) -> tuple[Ints, Ints, Ints, npt.NDArray[np.uint8] | None]:
        """Its writes due before *before_ns* (and before its end) not given yet:
        (times, pages, offsets, their random bytes one row each or None)."""
        stop = min(before_ns, self.end_ns)
        parts = []
        while self._more():
            end = max(self.pos, int(np.searchsorted(self.t, stop, side="left")))
            if end > self.pos:
                sl = slice(self.pos, end)
                parts.append((self.t[sl], self.page[sl], self.off[sl],
                              None if self.chunks is None else self.chunks[sl]))
                self.pos = end
            if end < len(self.t):
                break  # the next write is due at or after stop
        if len(parts) == 1:
            return parts[0]
        if not parts:
            empty = np.zeros(0, np.int64)
            return empty, empty, empty, None if self.chunks is None else self.chunks[:0]
        chunks = [p[3] for p in parts if p[3] is not None]
        return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                np.concatenate([p[2] for p in parts]), np.concatenate(chunks) if chunks else None)


class Churn:
    """Every write stream of a run; hands out the writes due, as batches.

    The writes of all streams up to some time ahead (:data:`SPAN_NS` past what
    was asked) are merged once into arrays in time order (ties: the order the
    streams started), so taking a batch is a search and a slice.

    Args:
        seed: the scenario's seed.
        want_bytes: whether the backend needs the random bytes of writes of so many
            bytes (the bulk engine does only for short writes, see its backend).
    """

    def __init__(self, seed: int, want_bytes: Callable[[int], bool]) -> None:
        self.seed = seed
        self.want_bytes = want_bytes
        self.streams: list[_Stream] = []
        self.targets: list[WriteTarget] = []
        self.writes = 0
        """Writes handed out so far."""
        self._until = 0  # every stream's writes before this are in the buffer
        empty = np.zeros(0, np.int64)
        self._t, self._s, self._page, self._off, self._at = empty, empty, empty, empty, empty
        self._blob = np.zeros(0, np.uint8)
        self._pos = 0
        self._alive = np.zeros(0, np.bool_)

    def start(self, a: WriteActivity, group: str, index: int, target: WriteTarget,
              first: int, pages: int, end_ns: int | None) -> None:
        """Start the writes of activity *a* in process *index* of *group* (now: ``a.start_ns``)."""
        s = _Stream(a, target, (self.seed, "activity", a.index, group, index), first, pages,
                    a.start_ns, end_ns, self.want_bytes(a.nbytes))
        self.streams.append(s)
        self.targets.append(target)
        self._alive = np.r_[self._alive, True]
        # The buffer holds every write due before _until: this stream's too, in their place.
        self._merge(self._until, [len(self.streams) - 1])
        order = np.lexsort((self._s[self._pos:], self._t[self._pos:])) + self._pos
        for name in ("_t", "_s", "_page", "_off", "_at"):
            setattr(self, name, getattr(self, name)[order])
        self._pos = 0

    def forget(self, proc: Process) -> None:
        """*proc* has exited: its writes stop."""
        for i, s in enumerate(self.streams):
            if s.target.proc is proc:
                s.target.proc = None
                self._alive[i] = False

    def _live(self) -> list[_Stream]:
        return [s for s in self.streams if s.target.proc is not None]

    def _merge(self, until_ns: int, which: list[int] | None = None) -> None:
        """Merge the writes due before *until_ns* of every live stream (or of streams
        *which*) into the buffer."""
        parts = [(i, self.streams[i].give(until_ns))
                 for i in (range(len(self.streams)) if which is None else which)
                 if self.streams[i].target.proc is not None]
        self._until = until_ns
        parts = [(i, p) for i, p in parts if len(p[0])]
        if not parts:
            return
        t = np.concatenate([p[0] for _i, p in parts])
        sid = np.repeat(np.array([i for i, _p in parts], np.int64), [len(p[0]) for _i, p in parts])
        page = np.concatenate([p[1] for _i, p in parts])
        off = np.concatenate([p[2] for _i, p in parts])
        # Random bytes: what the buffer still needs of the old blob, then the new ones.
        old_at = self._at[self._pos:]
        held = old_at >= 0
        start = int(old_at[held].min()) if bool(held.any()) else len(self._blob)
        blobs = [self._blob[start:]]
        at = np.full(len(t), -1, np.int64)
        size, row = len(blobs[0]), 0
        for _i, p in parts:
            n = len(p[0])
            if p[3] is not None:
                width = p[3].shape[1]
                at[row:row + n] = size + np.arange(n, dtype=np.int64) * width
                blobs.append(p[3].reshape(-1))
                size += n * width
            row += n
        order = np.argsort(t, kind="stable")  # sorted runs, ties in stream order
        self._t = np.concatenate([self._t[self._pos:], t[order]])
        self._s = np.concatenate([self._s[self._pos:], sid[order]])
        self._page = np.concatenate([self._page[self._pos:], page[order]])
        self._off = np.concatenate([self._off[self._pos:], off[order]])
        self._at = np.concatenate([np.where(held, old_at - start, -1), at[order]])
        self._blob = np.concatenate(blobs) if len(blobs) > 1 else blobs[0]
        self._pos = 0

    def _skip_dead(self) -> None:
        while self._pos < len(self._t) and not self._alive[int(self._s[self._pos])]:
            self._pos += 1

    def next_ns(self) -> int | None:
        """When the next write of any stream is due; None if none will come."""
        self._skip_dead()
        while self._pos == len(self._t):
            nexts = [t for s in self._live() if (t := s.next_ns()) is not None]
            if not nexts:
                return None
            self._merge(max(self._until, min(nexts)) + SPAN_NS)
            self._skip_dead()
        return int(self._t[self._pos])

    def take(self, limit_ns: int) -> WriteBatch:
        """Every write due before *limit_ns*, in time order (ties: the order streams started)."""
        if limit_ns > self._until and self._live():
            self._merge(limit_ns + SPAN_NS)
        end = self._pos + int(np.searchsorted(self._t[self._pos:], limit_ns, side="left"))
        sl = slice(self._pos, end)
        self._pos = end
        which = self._s[sl]
        keep = self._alive[which]
        if not bool(keep.all()):
            sl = np.flatnonzero(keep) + sl.start  # type: ignore[assignment]
            which = self._s[sl]
        self.writes += len(which)
        return WriteBatch(self.targets, which, self._page[sl], self._off[sl], self._at[sl],
                          self._blob)


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
            blob = (np.frombuffer(data.bytes(n * e.nbytes), np.uint8) if want
                    else np.zeros(0, np.uint8))
            at = np.arange(n, dtype=np.int64) * e.nbytes if want else np.full(n, -1, np.int64)
            yield WriteBatch([target], np.zeros(n, np.int64),
                             np.arange(lo, lo + n, dtype=np.int64), off.astype(np.int64), at, blob)


__all__ = ["NEVER", "SPAN_NS", "Churn", "WriteBatch", "WriteTarget", "block_size",
           "event_batches", "generators"]
