"""Page contents of the bulk engine, as small integer ids.

The bulk engine never stores a page's bytes.  A content is a 128-bit
fingerprint (:func:`ksmlab.mm.page.fingerprint`, the same as SimKernel's
fingerprint mode), and every distinct fingerprint gets an id.  Two pages have
equal content exactly when their ids are equal, so merging compares ids.

Two kinds of content:

* **interned**: given as bytes or as a fingerprint; the table keeps a
  fingerprint -> id dict so the same fingerprint always gets the same id.
* **fresh**: :meth:`ContentTable.fresh` hands out ids that are distinct from
  every other content by construction (a page of new random data).  Their
  fingerprints would be random and are not kept, which is what lets a
  terabyte of mostly unique pages fit in memory.  A fresh content made by
  writing :data:`NEW_CONTENT` (new random data) is *unique*: one frame holds it,
  which lets a later such write to a page that alone maps that frame change
  the content in place (a new checksum) instead of using up an id per write.
  Writing a unique content's id elsewhere makes it an ordinary one.

The only property of a content ksmd looks at besides equality is its 32-bit
checksum (``fingerprint_checksum``), kept per id in :attr:`ContentTable.checksum`.
For a fresh content it is drawn from a seeded generator, as the first four
bytes of a random fingerprint would be.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from ksmlab.constants import PAGE_SIZE
from ksmlab.mm.page import ZERO_FINGERPRINT, fingerprint, fingerprint_checksum

ZERO_CONTENT = 0
"""Id of the all-zero page, interned when a table is made."""

NEW_CONTENT = -1
"""Written in place of a content id: new random data, a content like no other.  The page
gets a fresh unique content, or, when its frame is its own (mapped once, not a KSM page)
and already holds a unique content, that content changes in place: a new checksum, as a
fresh content would have, and no id used up (a churning page keeps one)."""

MAX_CONTENTS = (1 << 31) - 1
"""Content ids are 32-bit ints in the frame table."""


class ContentTable:
    """Ids for page contents, and their checksums.

    Attributes:
        checksum: uint32 checksum per content id (``len(self)`` valid entries).
        unique: per content id, whether it is a unique fresh content (see the module doc).
    """

    def __init__(self, seed: int = 0) -> None:
        self.checksum: npt.NDArray[np.uint32] = np.zeros(1024, np.uint32)
        self.unique: npt.NDArray[np.bool_] = np.zeros(1024, np.bool_)
        self._n = 0
        self._by_fp: dict[bytes, int] = {}
        self._rng = np.random.default_rng(seed)
        self.intern(ZERO_FINGERPRINT)

    def __len__(self) -> int:
        return self._n

    def reserve(self, n: int) -> None:
        """Make room for *n* contents in all, at once."""
        if n > len(self.checksum):
            grown = np.zeros(n, np.uint32)
            grown[:self._n] = self.checksum[:self._n]
            unique = np.zeros(n, np.bool_)
            unique[:self._n] = self.unique[:self._n]
            self.checksum, self.unique = grown, unique

    def _reserve(self, n: int) -> int:
        first = self._n
        if first + n > MAX_CONTENTS:
            msg = (f"{first + n} contents: the bulk engine numbers contents with 32-bit ints, "
                   f"at most {MAX_CONTENTS}")
            raise OverflowError(msg)
        if first + n > len(self.checksum):
            self.reserve(max(first + n, len(self.checksum) + len(self.checksum) // 4))
        self._n = first + n
        return first

    def intern(self, fp: bytes) -> int:
        """The id of the content whose fingerprint is *fp* (16 bytes)."""
        if len(fp) != 16:
            msg = f"a fingerprint is 16 bytes, got {len(fp)}"
            raise ValueError(msg)
        cid = self._by_fp.get(fp)
        if cid is None:
            cid = self._reserve(1)
            self.checksum[cid] = fingerprint_checksum(fp)
            self._by_fp[bytes(fp)] = cid
        return cid

    def of_pages(self, data: bytes) -> list[int]:
        """Ids of the whole pages in *data* (its length a multiple of the page size)."""
        if len(data) % PAGE_SIZE:
            msg = (f"the bulk engine keeps no page bytes, so writes must be whole pages: "
                   f"got {len(data)} bytes, not a multiple of {PAGE_SIZE}")
            raise ValueError(msg)
        return [self.intern(fingerprint(data[i:i + PAGE_SIZE]))
                for i in range(0, len(data), PAGE_SIZE)]

    def fresh(self, n: int) -> npt.NDArray[np.int64]:
        """*n* new contents, distinct from every other (pages of new random data)."""
        if n < 0:
            msg = f"n must not be negative, got {n}"
            raise ValueError(msg)
        return self.add(self.draw(n), unique=False)

    def add(self, checksums: npt.NDArray[np.uint32], *, unique: bool) -> npt.NDArray[np.int64]:
        """New fresh contents with these checksums (drawn by :meth:`draw`)."""
        n = len(checksums)
        first = self._reserve(n)
        self.checksum[first:first + n] = checksums
        self.unique[first:first + n] = unique
        return np.arange(first, first + n, dtype=np.int64)

    def draw(self, n: int) -> npt.NDArray[np.uint32]:
        """*n* checksums of new random pages, from the table's seeded generator (the same
        values whether drawn at once or one at a time)."""
        return self._rng.integers(0, 1 << 32, n, dtype=np.uint32)

    def valid(self, ids: npt.NDArray[np.int64]) -> bool:
        """Whether every id in *ids* names a content of this table."""
        return bool(ids.size == 0 or (ids.min() >= 0 and ids.max() < self._n))
