"""The snapshot file format: one Parquet row per page, and a JSON document of metadata.

Everything a reader (or a writer) must agree on lives here: the columns and
their Arrow types, the key of the metadata, the schema's name, and the
encodings that keep a page under 24 bytes.  The format is documented for
users in docs/snapshot.md; a user reads it with pyarrow, pandas or DuckDB
without ksmlab.
"""

from __future__ import annotations

from typing import Any, Final

import pyarrow as pa

from ksmlab.snapshot.procfs import POLICIES

__all__ = ["COLUMNS", "FINGERPRINT_ALGORITHM", "METADATA_KEY", "POLICIES", "SCHEMA", "SCHEMA_ID",
           "WRITE_OPTIONS"]

SCHEMA_ID: Final = "ksmlab.snapshot/1"
"""The ``schema`` field of the metadata; a reader refuses any other."""

METADATA_KEY: Final = "ksmlab.snapshot"
"""Parquet key-value metadata key holding the metadata document (JSON)."""

FINGERPRINT_ALGORITHM: Final = "xxh3-128"
"""What the ``fingerprint`` column holds: ``ksmlab.mm.page.fingerprint`` of the page's bytes."""

FINGERPRINT_BYTES: Final = 16


SCHEMA: Final = pa.schema([
    pa.field("pid", pa.int32(), nullable=False),
    pa.field("vma", pa.uint32(), nullable=False),
    pa.field("addr", pa.uint64(), nullable=False),
    pa.field("present", pa.bool_(), nullable=False),
    pa.field("swapped", pa.bool_(), nullable=False),
    pa.field("file", pa.bool_(), nullable=False),
    pa.field("exclusive", pa.bool_(), nullable=False),
    pa.field("thp", pa.bool_()),
    pa.field("ksm", pa.bool_()),
    pa.field("zero_page", pa.bool_()),
    pa.field("pfn", pa.uint64()),
    pa.field("fingerprint", pa.binary(FINGERPRINT_BYTES)),
    pa.field("changes", pa.uint16(), nullable=False),
    pa.field("compared", pa.uint16(), nullable=False),
])
"""The page table's columns, in file order (docs/snapshot.md describes each)."""

COLUMNS: Final = tuple(SCHEMA.names)

# Addresses grow by one page inside an area and pfns often by one inside a
# folio, so delta encoding stores both in a few bits; pid and vma repeat over
# long runs (dictionary + RLE).  Fingerprints are left to the writer's
# default: dictionary while pages repeat (what KSM is about), plain once the
# dictionary page is full.
_DELTA: Final = ("addr", "pfn")

WRITE_OPTIONS: Final[dict[str, Any]] = {
    "compression": "zstd",
    "compression_level": 3,
    "use_dictionary": [c for c in COLUMNS if c not in _DELTA],
    "column_encoding": dict.fromkeys(_DELTA, "DELTA_BINARY_PACKED"),
    "write_statistics": ["pid", "addr"],
    "write_page_checksum": True,  # a damaged page is an error, not wrong values
}
"""Keyword arguments of ``pyarrow.parquet.ParquetWriter`` for a snapshot."""

ROW_GROUP_ROWS: Final = 1 << 20
"""Rows buffered before a row group is written."""
