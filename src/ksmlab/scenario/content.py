"""What a mapping holds when its process starts, from its content model, a chunk at a time.

Everything is seeded, so a scenario fills its memory identically on every
run and on every backend:

* an **image** is a sequence of random pages generated from the content's
  seed (image page *i* is always the same bytes, however many pages are
  asked for, and two images with one seed are one image), shared by every
  mapping that uses the content;
* a **file** is read page by page (``os.pread``, never all at once, so a disk
  image of any size will do); pages past its end repeat pages of the file
  chosen at seeded random page offsets, so mappings larger than the file
  still hold the file's kind of content, identically in every process;
* ``zero_fraction`` / ``private_fraction`` then replace, in each mapping
  instance, a seeded random choice of pages by zero pages / by unique random
  pages (the instance's private data).

A mapping is filled in bounded chunks (:class:`Fill`), so filling it takes
no more memory than the chunk on top of what the machine keeps for it: each
chunk is given as page bytes (SimKernel, the real kernel), as fingerprints
(SimKernel's fingerprint mode) or as content ids (the bulk engine, computed
with numpy from the layout, never from bytes).  The choices are drawn with
numpy generators in a way that does not depend on the chunk size: every
representation of a page is that of the same bytes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from ksmlab.constants import PAGE_SIZE
from ksmlab.mm.page import ZERO_FINGERPRINT, fingerprint
from ksmlab.scenario.model import Content

ZERO_PAGE = bytes(PAGE_SIZE)

NEW_CONTENT = -1
"""A content id meaning "new random data" (the bulk engine's ``NEW_CONTENT``)."""

BASE, ZERO, OWN = 0, 1, 2
"""What a page of a mapping instance holds: its content's page, a zero page, or a page of
the instance's own (unique random bytes)."""

ID_CHUNK = 1 << 16
"""Pages per chunk when a mapping is filled with content ids (512 KiB of ids)."""

BYTES_CHUNK = 1 << 10
"""Pages per chunk when a mapping is filled with page bytes or fingerprints (4 MiB)."""

IMAGE_BLOCK = 64
"""Image pages generated at a time (image page *i* is page ``i % 64`` of block ``i // 64``)."""

EXTRA_BLOCK = 4096
"""File page offsets drawn at a time for the pages past a file's end."""

Ints = npt.NDArray[np.int64]


def generator(*key: object) -> np.random.Generator:
    """A numpy generator seeded by *key* (anything with a stable ``str``)."""
    digest = hashlib.blake2b(":".join(map(str, key)).encode(), digest_size=16).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest, "little")))


class ContentTableLike(Protocol):
    """What filling with content ids needs of the bulk engine's ContentTable."""

    def intern(self, fp: bytes) -> int:
        """The id of the content whose fingerprint is *fp*."""
        ...

    def fresh(self, n: int) -> Ints:
        """*n* new contents, distinct from every other."""
        ...


@dataclass(frozen=True, slots=True)
class Chunk:
    """Consecutive pages of a mapping instance.

    Attributes:
        start: the first page's index in the mapping.
        kind: per page, BASE, ZERO or OWN.
        index: per BASE page, the page of its content: the image page, or the
            file page (one past the file's end or more: see :meth:`ContentSource.file_page`).
    """

    start: int
    kind: npt.NDArray[np.uint8]
    index: Ints

    def __len__(self) -> int:
        return len(self.kind)


class ContentSource:
    """Builds mapping contents; keeps what instances share (image pages, file pages and
    their names) and the content files open until :meth:`close`.

    Content ids (:meth:`Fill.content_ids`) are remembered for one table: use one
    source per machine.
    """

    def __init__(self) -> None:
        self._files: dict[str, tuple[int, int]] = {}
        self._extra: dict[tuple[str, int], Ints] = {}
        self._image_block: dict[int, tuple[int, npt.NDArray[np.uint8]]] = {}
        self._image_fps: dict[int, dict[int, bytes]] = {}
        self._image_ids: dict[int, Ints] = {}
        self._file_fps: dict[str, dict[int, bytes]] = {}

    def close(self) -> None:
        """Close the content files."""
        for fd, _ in self._files.values():
            os.close(fd)
        self._files.clear()

    def __enter__(self) -> ContentSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the pages a content is made of ---------------------------------------------------
    def image_pages(self, seed: int, index: Ints) -> npt.NDArray[np.uint8]:
        """The bytes of image pages *index* of the image of *seed*, one row each."""
        out = np.empty((len(index), PAGE_SIZE), np.uint8)
        blocks = index // IMAGE_BLOCK
        for b in np.unique(blocks).tolist():
            cached = self._image_block.get(seed)
            if cached is None or cached[0] != b:
                data = generator(seed, "image", b).bytes(IMAGE_BLOCK * PAGE_SIZE)
                cached = (b, np.frombuffer(data, np.uint8).reshape(IMAGE_BLOCK, PAGE_SIZE))
                self._image_block[seed] = cached
            rows = blocks == b
            out[rows] = cached[1][index[rows] % IMAGE_BLOCK]
        return out

    def _file(self, c: Content) -> tuple[int, int]:
        assert c.path is not None
        key = str(c.path)
        if key not in self._files:
            fd = os.open(c.path, os.O_RDONLY)
            size = os.fstat(fd).st_size or os.lseek(fd, 0, os.SEEK_END)
            self._files[key] = (fd, (size + PAGE_SIZE - 1) // PAGE_SIZE)
        return self._files[key]

    def file_page(self, c: Content, index: int) -> int:
        """The file page that page *index* of content *c* is: itself within the file, else
        one of the file's pages chosen at a seeded random offset."""
        _fd, npages = self._file(c)
        if index < npages:
            return index
        key = (str(c.path), c.seed)
        k = index - npages
        chosen = self._extra.get(key, np.zeros(0, np.int64))
        while len(chosen) <= k:
            gen = generator(c.seed, "file extra", len(chosen) // EXTRA_BLOCK)
            chosen = np.concatenate([chosen, gen.integers(0, npages, EXTRA_BLOCK)])
            self._extra[key] = chosen
        return int(chosen[k])

    def file_bytes(self, c: Content, page: int) -> bytes:
        """The bytes of file page *page* (the last one padded with zeros)."""
        fd, _npages = self._file(c)
        data = os.pread(fd, PAGE_SIZE, page * PAGE_SIZE)
        return data if len(data) == PAGE_SIZE else data.ljust(PAGE_SIZE, b"\0")

    def base_page(self, c: Content, i: int) -> bytes | None:
        """Page *i* of content *c* before the per-instance choices; None for "unique random"."""
        if c.kind == "zero":
            return ZERO_PAGE
        if c.kind == "fill":
            return bytes([c.byte]) * PAGE_SIZE
        if c.kind == "image":
            index = np.array([image_index(c, i)], np.int64)
            return bytes(self.image_pages(c.seed, index)[0])
        if c.kind == "file":
            return self.file_bytes(c, self.file_page(c, c.offset + i))
        return None

    # --- whole mappings (small ones: tests, reports) ---------------------------------------
    def build(self, c: Content, pages: int, instance: str) -> bytes:
        """The *pages* pages of content *c* for the mapping instance named *instance*."""
        fill = Fill(self, c, pages, instance)
        return b"".join(fill.page_bytes(ch) for ch in fill.chunks(BYTES_CHUNK))

    def fingerprints(self, c: Content, pages: int, instance: str) -> list[bytes | None]:
        """What :meth:`build` makes, as page fingerprints; None for a page of the
        instance's own (random bytes: a page like no other)."""
        fill = Fill(self, c, pages, instance)
        out: list[bytes | None] = []
        for ch in fill.chunks(BYTES_CHUNK):
            out += fill.page_fingerprints(ch, own=False)
        return out


def image_index(c: Content, i: int) -> int:
    """The image page at page *i* of a mapping of image content *c*."""
    index = c.offset + i
    return index % c.pages if c.pages else index


class Fill:
    """The content of one mapping instance, a chunk at a time, in order.

    *instance* (e.g. ``"guest[3].ram"``) seeds the instance's choice of zero
    and private pages and its private pages' bytes, so every instance
    differs from the others, and from run to run stays the same.
    """

    def __init__(self, source: ContentSource, c: Content, pages: int, instance: str) -> None:
        self.source, self.c, self.pages = source, c, pages
        self._layout = generator(c.seed, instance, "layout")
        self._own = generator(c.seed, instance, "own")

    def chunks(self, size: int) -> Iterator[Chunk]:
        """The mapping's pages, *size* at a time (the pages do not depend on *size*)."""
        c = self.c
        zf, pf = c.zero_fraction, c.private_fraction
        for start in range(0, self.pages, size):
            n = min(size, self.pages - start)
            kind = np.full(n, OWN if c.kind == "random" else BASE, np.uint8)
            if zf or pf:
                u = self._layout.random(n)
                kind[u < zf + pf] = OWN
                kind[u < zf] = ZERO
            i = np.arange(start, start + n, dtype=np.int64) + c.offset
            if c.kind == "image" and c.pages:
                i %= c.pages
            yield Chunk(start, kind, i)

    def _own_bytes(self, n: int) -> npt.NDArray[np.uint8]:
        if not n:  # Generator.bytes(0) would still draw
            return np.zeros((0, PAGE_SIZE), np.uint8)
        return np.frombuffer(self._own.bytes(n * PAGE_SIZE), np.uint8).reshape(n, PAGE_SIZE)

    def page_bytes(self, ch: Chunk) -> bytes:
        """The chunk's page bytes."""
        c, src = self.c, self.source
        out = np.zeros((len(ch), PAGE_SIZE), np.uint8)
        own = ch.kind == OWN
        out[own] = self._own_bytes(int(np.count_nonzero(own)))
        base = ch.kind == BASE
        if c.kind == "fill":
            out[base] = c.byte
        elif c.kind == "image":
            out[base] = src.image_pages(c.seed, ch.index[base])
        elif c.kind == "file":
            for j in np.flatnonzero(base).tolist():
                page = src.file_page(c, int(ch.index[j]))
                out[j] = np.frombuffer(src.file_bytes(c, page), np.uint8)
        return out.tobytes()

    def _base_fingerprint(self, index: int) -> bytes:
        """The fingerprint of page *index* of the content (BASE pages; cached)."""
        c, src = self.c, self.source
        if c.kind == "fill":
            return fingerprint(bytes([c.byte]) * PAGE_SIZE)
        if c.kind == "image":
            fps = src._image_fps.setdefault(c.seed, {})
            fp = fps.get(index)
            if fp is None:
                fp = fps[index] = fingerprint(src.image_pages(c.seed, np.array([index]))[0]
                                              .tobytes())
            return fp
        if c.kind == "file":
            page = src.file_page(c, index)
            fps = src._file_fps.setdefault(str(c.path), {})
            fp = fps.get(page)
            if fp is None:
                fp = fps[page] = fingerprint(src.file_bytes(c, page))
            return fp
        return ZERO_FINGERPRINT  # a zero content's pages

    def page_fingerprints(self, ch: Chunk, *, own: bool = True) -> list[bytes | None]:
        """The chunk's page fingerprints; a page of the instance's own is the fingerprint
        of its bytes if *own*, else None (and its bytes are not drawn)."""
        kinds = ch.kind.tolist()
        own_fps: Iterator[bytes] = iter(())
        if own:
            rows = self._own_bytes(kinds.count(OWN))
            own_fps = (fingerprint(r.tobytes()) for r in rows)
        same = self._base_fingerprint(0) if self.c.kind in ("fill", "zero") else None
        out: list[bytes | None] = []
        for k, i in zip(kinds, ch.index.tolist(), strict=True):
            if k == ZERO:
                out.append(ZERO_FINGERPRINT)
            elif k == OWN:
                out.append(next(own_fps) if own else None)
            else:
                out.append(same or self._base_fingerprint(i))
        return out

    def content_ids(self, ch: Chunk, table: ContentTableLike) -> Ints:
        """The chunk's pages as content ids of *table*: ZERO_CONTENT (0) for a zero page,
        NEW_CONTENT (-1, new random data) for a page of the instance's own, a fresh
        content for each image page (once, the first time it is met: images are random
        pages, equal to no other page), the interned fingerprint for a fill or file page."""
        c, src = self.c, self.source
        ids = np.zeros(len(ch), np.int64)
        base = ch.kind == BASE
        if c.kind == "image" and bool(base.any()):
            idx = ch.index[base]
            known = src._image_ids.get(c.seed, np.zeros(0, np.int64))
            top = int(idx.max()) + 1
            if top > len(known):
                known = np.concatenate([known, np.full(top - len(known), -1, np.int64)])
            new = np.unique(idx[known[idx] < 0])
            known[new] = table.fresh(len(new))
            src._image_ids[c.seed] = known
            ids[base] = known[idx]
        elif c.kind == "fill":
            ids[base] = table.intern(self._base_fingerprint(0))
        elif c.kind == "file" and bool(base.any()):
            ids[base] = [table.intern(self._base_fingerprint(i)) for i in ch.index[base].tolist()]
        ids[ch.kind == OWN] = NEW_CONTENT
        return ids


__all__ = ["BASE", "BYTES_CHUNK", "ID_CHUNK", "OWN", "ZERO", "ZERO_PAGE", "Chunk",
           "ContentSource", "ContentTableLike", "Fill", "generator", "image_index"]
