"""Reading a snapshot file: ``read_snapshot(path)`` gives the metadata and the page columns as numpy arrays.

For the estimate and anyone else building on a snapshot::

    snap = read_snapshot("host.parquet")
    snap.page_size, snap.kernel, snap.policy, snap.ksm_knobs
    for p in snap.processes:            # ProcessInfo: pid, comm, uid, cgroup, state, vmas, ...
        rows = snap.pages.rows_of(p.pid)
    snap.pages.fingerprint              # (n, 16) uint8; zero where not hashed
    snap.pages.hashed, snap.pages.present, snap.pages.pfn, snap.pages.changes

Every problem with the file is a :class:`SnapshotFormatError` (a ValueError)
naming the file and what is wrong: not Parquet, truncated, not a ksmlab
snapshot, another schema version, a column missing or of another type, or a
page size other than the one asked for.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq

from ksmlab.constants import PAGE_SIZE
from ksmlab.errors import KsmSimError
from ksmlab.snapshot.schema import (
    FINGERPRINT_ALGORITHM,
    FINGERPRINT_BYTES,
    METADATA_KEY,
    SCHEMA,
    SCHEMA_ID,
)

__all__ = ["PageColumns", "ProcessInfo", "Snapshot", "SnapshotFormatError", "VmaInfo",
           "read_metadata", "read_snapshot"]

Bools = npt.NDArray[np.bool_]


class SnapshotFormatError(KsmSimError, ValueError):
    """The file is not a readable ksmlab snapshot (the message names the file and why)."""


@dataclass(frozen=True)
class VmaInfo:
    """One area of a process whose pages the snapshot covers (sizes in bytes, from smaps)."""

    start: int
    end: int
    perms: str
    path: str
    flags: tuple[str, ...]
    mergeable: bool
    """VM_MERGEABLE at capture time (``mg``)."""
    rss: int
    anonymous: int
    swap: int
    ksm: int


@dataclass(frozen=True)
class ProcessInfo:
    """One target process as captured."""

    pid: int
    ppid: int
    comm: str
    uid: int | None
    cgroup: str
    state: str
    """``captured``, or ``gone`` (exited during the capture: no rows)."""
    start_time: int
    """Clock ticks after boot (``/proc/PID/stat`` field 22): tells a reused pid apart."""
    vmas: tuple[VmaInfo, ...]
    ksm_stat: dict[str, int | bool] | None
    raw: dict[str, Any]
    """The process's whole metadata entry (docs/snapshot.md)."""


@dataclass(frozen=True)
class PageColumns:
    """The page rows as numpy arrays of equal length (docs/snapshot.md, "Columns").

    Nullable columns are filled: ``pfn`` 0 where unknown, the bool flags False
    where unknown, ``fingerprint`` zero where ``hashed`` is False.
    """

    pid: npt.NDArray[np.int32]
    vma: npt.NDArray[np.uint32]
    addr: npt.NDArray[np.uint64]
    present: Bools
    swapped: Bools
    file: Bools
    exclusive: Bools
    thp: Bools
    ksm: Bools
    zero_page: Bools
    pfn: npt.NDArray[np.uint64]
    fingerprint: npt.NDArray[np.uint8]
    """Shape (n, 16)."""
    hashed: Bools
    changes: npt.NDArray[np.uint16]
    compared: npt.NDArray[np.uint16]

    def __len__(self) -> int:
        return int(self.addr.size)

    @property
    def candidates(self) -> Bools:
        """The pages ksmd would scan: present anonymous pages with a fingerprint, not the
        shared zero page (KSM pages already merged included)."""
        return self.present & self.hashed & ~self.file & ~self.zero_page

    def content_ids(self) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
        """The distinct fingerprints, shape (k, 16) in byte order, and each row's index into
        them (-1 where the row has no fingerprint): equal ids, equal contents."""
        ids = np.full(len(self), -1, np.int64)
        rows = np.flatnonzero(self.hashed)
        keys = np.ascontiguousarray(self.fingerprint[rows]).view(
            np.dtype((np.void, FINGERPRINT_BYTES))).ravel()
        uniq, inverse = np.unique(keys, return_inverse=True)
        ids[rows] = inverse.ravel()
        table = np.frombuffer(uniq.tobytes(), np.uint8).reshape(-1, FINGERPRINT_BYTES)
        return table, ids

    @cached_property
    def groups(self) -> dict[int, slice]:
        """Each pid's rows (rows are grouped by process; a pid split in two keeps its last group)."""
        n = len(self)
        if n == 0:
            return {}
        breaks = np.flatnonzero(np.diff(self.pid) != 0) + 1
        starts = np.r_[0, breaks].tolist()
        ends = np.r_[breaks, n].tolist()
        return {int(self.pid[s]): slice(s, e) for s, e in zip(starts, ends, strict=True)}

    def rows_of(self, pid: int) -> slice:
        """The rows of process *pid* (empty for a process without rows)."""
        return self.groups.get(pid, slice(0, 0))


@dataclass(frozen=True)
class Snapshot:
    """A snapshot file, read."""

    path: str
    meta: dict[str, Any]
    """The whole metadata document."""
    page_size: int
    kernel: str
    host: str
    policy: str
    samples: int
    interval_s: float
    ksm_knobs: dict[str, str] | None
    """The host's KSM knobs at capture (None: the kernel had no KSM)."""
    processes: tuple[ProcessInfo, ...]
    pages: PageColumns
    ksmd_cpu_ns: int | None = None
    """ksmd's CPU time since boot at capture (None: unknown: no ksmd, or an older snapshot)."""


def _bad(path: str, why: str) -> SnapshotFormatError:
    return SnapshotFormatError(f"{path}: not a readable ksmlab snapshot: {why}")


def _bools(col: pa.ChunkedArray) -> Bools:
    return np.asarray(col.fill_null(False).to_numpy(zero_copy_only=False), np.bool_)


def _fingerprints(col: pa.ChunkedArray) -> npt.NDArray[np.uint8]:
    arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    n = len(arr)
    data = arr.buffers()[1]
    if n == 0 or data is None:
        return np.zeros((n, FINGERPRINT_BYTES), np.uint8)
    flat = np.frombuffer(data, np.uint8)[arr.offset * FINGERPRINT_BYTES:
                                         (arr.offset + n) * FINGERPRINT_BYTES]
    out = flat.reshape(n, FINGERPRINT_BYTES).copy()
    out[~np.asarray(arr.is_valid().to_numpy(zero_copy_only=False), np.bool_)] = 0
    return out


def _process(d: dict[str, Any]) -> ProcessInfo:
    vmas = tuple(VmaInfo(int(v["start"]), int(v["end"]), str(v["perms"]), str(v.get("path", "")),
                         tuple(v.get("flags", ())), bool(v["mergeable"]), int(v.get("rss", 0)),
                         int(v.get("anonymous", 0)), int(v.get("swap", 0)), int(v.get("ksm", 0)))
                 for v in d.get("vmas", ()))
    uid = d.get("uid")
    return ProcessInfo(pid=int(d["pid"]), ppid=int(d.get("ppid", 0)), comm=str(d.get("comm", "")),
                       uid=None if uid is None else int(uid), cgroup=str(d.get("cgroup", "")),
                       state=str(d["state"]), start_time=int(d.get("start_time", 0)), vmas=vmas,
                       ksm_stat=d.get("ksm_stat"), raw=d)


def read_metadata(path: str) -> dict[str, Any]:
    """Only the metadata document of the snapshot at *path* (the footer; no page is read)."""
    try:
        kv = pq.read_metadata(path).metadata or {}
    except FileNotFoundError:
        raise
    except (pa.ArrowException, OSError) as e:
        if isinstance(e, OSError) and not isinstance(e, pa.ArrowException) and e.errno:
            raise
        raise _bad(path, f"not a Parquet file, or truncated ({e})") from None
    raw = kv.get(METADATA_KEY.encode())
    if raw is None:
        raise _bad(path, f"a Parquet file without the {METADATA_KEY!r} metadata")
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise _bad(path, f"its {METADATA_KEY!r} metadata is not JSON ({e})") from None
    if not isinstance(meta, dict):
        raise _bad(path, f"its {METADATA_KEY!r} metadata is not a JSON object")
    if meta.get("schema") != SCHEMA_ID:
        raise _bad(path, f"schema {meta.get('schema')!r}, this ksmlab reads {SCHEMA_ID!r}")
    if meta.get("fingerprint") != FINGERPRINT_ALGORITHM:  # other ids would merge wrongly
        raise _bad(path, f"fingerprint {meta.get('fingerprint')!r}, this ksmlab's pages are "
                         f"{FINGERPRINT_ALGORITHM!r}")
    return meta


def read_snapshot(path: str | os.PathLike[str], *, page_size: int | None = PAGE_SIZE) -> Snapshot:
    """Read the snapshot at *path*.

    Args:
        page_size: the page size the caller works with (default: the model's,
            4096); a snapshot taken with another raises.  None accepts any.

    Raises:
        FileNotFoundError: no such file (and other OSErrors of opening it).
        SnapshotFormatError: the file is not a readable ksmlab snapshot, or
            was taken with another page size.
    """
    path = os.fspath(path)
    meta = read_metadata(path)
    try:
        size = int(meta["page_size"])
        processes = tuple(_process(d) for d in meta["processes"])
        policy, samples = str(meta["policy"]), int(meta["samples"])
        interval_s = float(meta.get("interval_s", 0.0))
        ksm = meta.get("ksm")
        knobs = None if ksm is None else {str(k): str(v) for k, v in ksm["knobs"].items()}
        ksmd_cpu = meta.get("ksmd_cpu_ns")  # absent from older snapshots: unknown
        if ksmd_cpu is not None and (isinstance(ksmd_cpu, bool) or not isinstance(ksmd_cpu, int)
                                     or ksmd_cpu < 0):
            raise ValueError(f"ksmd_cpu_ns {ksmd_cpu!r} (expected nanoseconds >= 0 or null)")
    except (KeyError, TypeError, ValueError) as e:
        raise _bad(path, f"its metadata lacks or garbles {e}") from None
    if page_size is not None and size != page_size:
        raise SnapshotFormatError(
            f"{path}: taken with {size}-byte pages on kernel {meta.get('kernel')} "
            f"({meta.get('machine')}); expected {page_size}-byte pages")
    try:
        table = pq.read_table(path, page_checksum_verification=True)
    except (pa.ArrowException, OSError) as e:
        if isinstance(e, OSError) and not isinstance(e, pa.ArrowException) and e.errno:
            raise
        raise _bad(path, f"its pages cannot be read, the file is damaged ({e})") from None
    for f in SCHEMA:
        if f.name not in table.column_names:
            raise _bad(path, f"no column {f.name!r}")
        if not table.schema.field(f.name).type.equals(f.type):
            raise _bad(path, f"column {f.name!r} is {table.schema.field(f.name).type}, "
                             f"expected {f.type}")

    def ints(name: str, dtype: type[np.generic]) -> Any:
        col = table.column(name)
        return np.asarray(col.fill_null(0).to_numpy(zero_copy_only=False), dtype)

    pages = PageColumns(
        pid=ints("pid", np.int32), vma=ints("vma", np.uint32), addr=ints("addr", np.uint64),
        present=_bools(table.column("present")), swapped=_bools(table.column("swapped")),
        file=_bools(table.column("file")), exclusive=_bools(table.column("exclusive")),
        thp=_bools(table.column("thp")), ksm=_bools(table.column("ksm")),
        zero_page=_bools(table.column("zero_page")), pfn=ints("pfn", np.uint64),
        fingerprint=_fingerprints(table.column("fingerprint")),
        hashed=np.asarray(table.column("fingerprint").is_valid().to_numpy(zero_copy_only=False),
                          np.bool_),
        changes=ints("changes", np.uint16), compared=ints("compared", np.uint16))
    _check_rows(path, pages, processes)
    return Snapshot(path=path, meta=meta, page_size=size, kernel=str(meta.get("kernel", "")),
                    host=str(meta.get("host", "")), policy=policy, samples=samples,
                    interval_s=interval_s, ksm_knobs=knobs, processes=processes, pages=pages,
                    ksmd_cpu_ns=ksmd_cpu)


def _check_rows(path: str, pages: PageColumns, processes: tuple[ProcessInfo, ...]) -> None:
    """Every row belongs to a captured process and one of its areas."""
    vma_counts = {p.pid: len(p.vmas) for p in processes if p.state == "captured"}
    groups = pages.groups
    if len(groups) != int(np.count_nonzero(np.diff(pages.pid))) + min(len(pages), 1):
        raise _bad(path, "the rows of a process are not contiguous")
    for pid, rows in groups.items():
        if pid not in vma_counts:
            raise _bad(path, f"rows of pid {pid}, which its metadata does not list as captured")
        if int(pages.vma[rows].max()) >= vma_counts[pid]:
            raise _bad(path, f"a row of pid {pid} names an area it does not have")
