"""The bytes a mapping holds when its process starts, from its content model.

Everything is seeded, so a scenario fills its memory identically on every
run and on every backend:

* an **image** is a sequence of random pages generated from the content's
  seed (page *i* is always the same bytes, however many pages are asked
  for), shared by every mapping that uses the content;
* a **file** is read page by page (``os.pread``, never all at once, so a disk
  image of any size will do); pages past its end repeat pages of the file
  chosen at seeded random page offsets, so mappings larger than the file
  still hold the file's kind of content, identically in every process;
* ``zero_fraction`` / ``private_fraction`` then replace, in each mapping
  instance, a seeded random choice of pages by zero pages / by unique random
  pages (the instance's private data).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

from ksmlab.constants import PAGE_SIZE
from ksmlab.mm.page import ZERO_FINGERPRINT, fingerprint
from ksmlab.scenario.model import Content

ZERO_PAGE = bytes(PAGE_SIZE)


class ContentSource:
    """Builds mapping contents; caches images and keeps content files open until :meth:`close`."""

    def __init__(self) -> None:
        self._images: dict[str, tuple[random.Random, list[bytes]]] = {}
        self._files: dict[str, tuple[int, int]] = {}
        self._extra: dict[str, tuple[random.Random, list[int]]] = {}
        self._image_fps: dict[str, tuple[random.Random, list[bytes]]] = {}

    def close(self) -> None:
        """Close the content files."""
        for fd, _ in self._files.values():
            os.close(fd)
        self._files.clear()

    def __enter__(self) -> ContentSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _image_page(self, c: Content, index: int) -> bytes:
        rng, pages = self._images.setdefault(c.name, (random.Random(c.seed), []))
        while len(pages) <= index:
            pages.append(rng.randbytes(PAGE_SIZE))
        return pages[index]

    def _file_page(self, c: Content, index: int) -> bytes:
        assert c.path is not None
        key = str(c.path)
        if key not in self._files:
            fd = os.open(c.path, os.O_RDONLY)
            size = os.fstat(fd).st_size or os.lseek(fd, 0, os.SEEK_END)
            self._files[key] = (fd, (size + PAGE_SIZE - 1) // PAGE_SIZE)
        fd, npages = self._files[key]
        if index >= npages:
            rng, chosen = self._extra.setdefault(c.name, (random.Random(c.seed), []))
            while len(chosen) <= index - npages:
                chosen.append(rng.randrange(npages))
            index = chosen[index - npages]
        data = os.pread(fd, PAGE_SIZE, index * PAGE_SIZE)
        return data if len(data) == PAGE_SIZE else data.ljust(PAGE_SIZE, b"\0")

    def base_page(self, c: Content, i: int) -> bytes | None:
        """Page *i* of content *c* before the per-instance choices; None for "unique random"."""
        if c.kind == "zero":
            return ZERO_PAGE
        if c.kind == "fill":
            return bytes([c.byte]) * PAGE_SIZE
        if c.kind == "image":
            index = c.offset + i
            return self._image_page(c, index % c.pages if c.pages else index)
        if c.kind == "file":
            return self._file_page(c, c.offset + i)
        return None

    def _layout(self, c: Content, pages: int, instance: str) -> Iterator[bytes | int | None]:
        """Page by page: None for a zero page, the bytes of a page of the instance's
        own, or the index of the content's page to use.

        *instance* (e.g. ``"guest[3].ram"``) seeds the instance's private and
        zero page choice, so every instance differs from the others and from
        run to run stays the same.
        """
        rng = random.Random(f"{c.seed}:{instance}")
        zf, pf = c.zero_fraction, c.private_fraction
        unique = c.kind not in ("zero", "fill", "image", "file")  # random pages
        for i in range(pages):
            if zf or pf:
                u = rng.random()
                if u < zf:
                    yield None
                    continue
                if u < zf + pf:
                    yield rng.randbytes(PAGE_SIZE)
                    continue
            yield rng.randbytes(PAGE_SIZE) if unique else i

    def build(self, c: Content, pages: int, instance: str) -> bytes:
        """The *pages* pages of content *c* for the mapping instance named *instance*."""
        fill = bytes([c.byte]) * PAGE_SIZE if c.kind == "fill" else None
        out: list[bytes] = []
        for x in self._layout(c, pages, instance):
            if x is None:
                out.append(ZERO_PAGE)
            elif isinstance(x, bytes):
                out.append(x)
            else:
                page = fill if fill is not None else self.base_page(c, x)
                assert page is not None
                out.append(page)
        return b"".join(out)

    def fingerprints(self, c: Content, pages: int, instance: str) -> list[bytes | None]:
        """What :meth:`build` makes, as page fingerprints; None for a page of the
        instance's own (random bytes: a page like no other).

        Image pages are fingerprinted once per content and not kept as bytes,
        so a machine that stores fingerprints (the bulk engine) is filled
        without holding gigabytes of page bytes.
        """
        same: bytes | None = None  # a zero or fill content's one page
        out: list[bytes | None] = []
        for x in self._layout(c, pages, instance):
            if x is None:
                out.append(ZERO_FINGERPRINT)
            elif isinstance(x, bytes):
                out.append(None)
            elif c.kind == "image":
                out.append(self._image_fingerprint(c, x))
            elif c.kind == "file":
                out.append(fingerprint(self._file_page(c, c.offset + x)))
            else:
                if same is None:
                    page = self.base_page(c, x)
                    assert page is not None
                    same = fingerprint(page)
                out.append(same)
        return out

    def _image_fingerprint(self, c: Content, i: int) -> bytes:
        index = c.offset + i
        index = index % c.pages if c.pages else index
        rng, fps = self._image_fps.setdefault(c.name, (random.Random(c.seed), []))
        while len(fps) <= index:
            fps.append(fingerprint(rng.randbytes(PAGE_SIZE)))
        return fps[index]


__all__ = ["ZERO_PAGE", "ContentSource"]
