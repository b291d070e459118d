"""Writing a snapshot file: page rows in row groups, then the metadata, then an atomic rename."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq

from ksmlab.snapshot.schema import FINGERPRINT_BYTES, METADATA_KEY, ROW_GROUP_ROWS, SCHEMA, WRITE_OPTIONS

__all__ = ["SnapshotWriter"]

Bools = npt.NDArray[np.bool_]


def _bools(values: Bools | None, valid: Bools) -> pa.Array:
    """A nullable bool column: null where *values* is unknown (None) or *valid* is False."""
    if values is None:
        return pa.nulls(len(valid), pa.bool_())
    return pa.array(values, pa.bool_(), mask=~valid)


class SnapshotWriter:
    """Streams page rows into a Parquet file under a temporary name; :meth:`close` publishes it."""

    def __init__(self, path: str) -> None:
        self.path = path
        directory = os.path.dirname(os.path.abspath(path))
        fd, self._tmp = tempfile.mkstemp(prefix=".ksmlab-snapshot-", suffix=".tmp", dir=directory)
        os.close(fd)
        self._writer = pq.ParquetWriter(self._tmp, SCHEMA, **WRITE_OPTIONS)
        self._pending: list[pa.Table] = []
        self._pending_rows = 0

    def add(self, *, pid: int, vma: npt.NDArray[np.uint32], addr: npt.NDArray[np.uint64],
            present: Bools, swapped: Bools, file: Bools, exclusive: Bools,
            thp: Bools | None, ksm: Bools | None, zero_page: Bools | None,
            pfn: npt.NDArray[np.uint64] | None, fingerprint: npt.NDArray[np.uint8],
            hashed: Bools, changes: npt.NDArray[np.uint16],
            compared: npt.NDArray[np.uint16]) -> None:
        """Add one process's rows (columns of equal length, in address order)."""
        n = len(addr)
        if n == 0:
            return
        fp_data = pa.py_buffer(np.ascontiguousarray(fingerprint).tobytes())
        fp = pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(FINGERPRINT_BYTES), n, [_validity(hashed), fp_data])
        pfn_col = (pa.nulls(n, pa.uint64()) if pfn is None
                   else pa.array(pfn, pa.uint64(), mask=~present))
        table = pa.Table.from_arrays([
            pa.array(np.full(n, pid, np.int32)), pa.array(vma), pa.array(addr),
            pa.array(present), pa.array(swapped), pa.array(file), pa.array(exclusive),
            _bools(thp, present), _bools(ksm, present), _bools(zero_page, present),
            pfn_col, fp, pa.array(changes), pa.array(compared),
        ], schema=SCHEMA)
        self._pending.append(table)
        self._pending_rows += n
        if self._pending_rows >= ROW_GROUP_ROWS:
            self._write_pending()

    def _write_pending(self) -> None:
        if self._pending:
            self._writer.write_table(pa.concat_tables(self._pending),
                                     row_group_size=ROW_GROUP_ROWS)
        self._pending = []
        self._pending_rows = 0

    def close(self, meta: dict[str, Any]) -> int:
        """Write the rest and the metadata *meta*, rename into place; return the file's size."""
        self._write_pending()
        self._writer.add_key_value_metadata({METADATA_KEY: json.dumps(meta, separators=(",", ":"))})
        self._writer.close()
        # Left at mkstemp's mode 0600: the fingerprint of a page with little
        # entropy (a short secret in a known page) can be found by trying
        # contents, so a snapshot is as private as the memory it was taken from.
        os.replace(self._tmp, self.path)
        return os.path.getsize(self.path)

    def abort(self) -> None:
        """Drop the temporary file (after an error or an interrupt)."""
        with contextlib.suppress(Exception):  # already failing: the file goes anyway
            self._writer.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._tmp)


def _validity(mask: Bools) -> pa.Buffer | None:
    """An Arrow validity bitmap of *mask* (None when every row is valid)."""
    if mask.all():
        return None
    return pa.py_buffer(np.packbits(mask, bitorder="little").tobytes())
