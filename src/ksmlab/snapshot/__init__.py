"""Snapshots of live processes as KSM would see them: page states and fingerprints, never data.

``capture_snapshot`` writes one (``ksmlab snapshot`` on the command line);
``read_snapshot`` reads one back as numpy columns.  The file format is
Apache Parquet, one row per page, documented in docs/snapshot.md.

Modules: :mod:`~ksmlab.snapshot.schema` (the format), :mod:`~ksmlab.snapshot.procfs`
(processes and their areas), :mod:`~ksmlab.snapshot.pages` (one pass over a
process's pages), :mod:`~ksmlab.snapshot.capture` (the passes),
:mod:`~ksmlab.snapshot.writer` and :mod:`~ksmlab.snapshot.reader`,
:mod:`~ksmlab.snapshot.command` (the subcommand).
"""

from ksmlab.snapshot.capture import CaptureProgress, CaptureSummary, Selection, capture_snapshot
from ksmlab.snapshot.procfs import ProcessGoneError, SnapshotPermissionError
from ksmlab.snapshot.reader import (
    PageColumns,
    ProcessInfo,
    Snapshot,
    SnapshotFormatError,
    VmaInfo,
    read_metadata,
    read_snapshot,
)
from ksmlab.snapshot.schema import POLICIES, SCHEMA, SCHEMA_ID

__all__ = [
    "POLICIES",
    "SCHEMA",
    "SCHEMA_ID",
    "CaptureProgress",
    "CaptureSummary",
    "PageColumns",
    "ProcessGoneError",
    "ProcessInfo",
    "Selection",
    "Snapshot",
    "SnapshotFormatError",
    "SnapshotPermissionError",
    "VmaInfo",
    "capture_snapshot",
    "read_metadata",
    "read_snapshot",
]
