# SPDX-License-Identifier: GPL-2.0-only
"""Snapshot files without a live process: the format as documented, its size, and bad files.

The files are written with the snapshot writer from synthetic pages, and
checked with pyarrow alone (as a user without ksmlab reads them) and with
``read_snapshot``.  The column list and types below are copied from
docs/snapshot.md, not from the code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ksmlab.snapshot import SCHEMA_ID, SnapshotFormatError, read_metadata, read_snapshot
from ksmlab.snapshot.capture import Selection, select_pids
from ksmlab.snapshot.writer import SnapshotWriter

PAGE = 4096

DOCUMENTED_COLUMNS = [
    ("pid", pa.int32()), ("vma", pa.uint32()), ("addr", pa.uint64()), ("present", pa.bool_()),
    ("swapped", pa.bool_()), ("file", pa.bool_()), ("exclusive", pa.bool_()),
    ("thp", pa.bool_()), ("ksm", pa.bool_()), ("zero_page", pa.bool_()), ("pfn", pa.uint64()),
    ("fingerprint", pa.binary(16)), ("changes", pa.uint16()), ("compared", pa.uint16()),
]


def _meta(processes: list[dict[str, Any]], page_size: int = PAGE) -> dict[str, Any]:
    return {"schema": SCHEMA_ID, "fingerprint": "xxh3-128", "created": "2026-01-01T00:00:00+00:00",
            "host": "test", "kernel": "6.18.0", "kernel_version": "#1", "machine": "x86_64",
            "page_size": page_size, "policy": "as-is", "samples": 1, "interval_s": 0.0,
            "selection": {"pids": [], "uids": [], "cgroups": [], "all": False},
            "privileges": {"pfn": True, "kpageflags": True}, "ksm": None,
            "processes": processes, "unreadable": [], "capture": {}}


def _process(pid: int, start: int, pages: int) -> dict[str, Any]:
    return {"pid": pid, "ppid": 1, "comm": f"p{pid}", "uid": 1000, "cgroup": "/", "cgroups": {},
            "start_time": 5, "state": "captured", "ksm_stat": None,
            "vmas": [{"start": start, "end": start + pages * PAGE, "perms": "rw-p", "offset": 0,
                      "inode": 0, "path": "", "flags": ["rd", "wr", "mg"], "mergeable": True,
                      "rss": pages * PAGE, "anonymous": pages * PAGE, "swap": 0, "ksm": 0,
                      "anon_huge": 0}]}


def write_synthetic(path: Path, n: int, *, seed: int = 1, page_size: int = PAGE,
                    pids: tuple[int, ...] = (100, 200)) -> dict[str, Any]:
    """A snapshot of len(pids) processes with n pages each: unique random contents and PFNs."""
    rng = np.random.default_rng(seed)
    w = SnapshotWriter(str(path))
    cols: dict[str, Any] = {}
    procs = []
    for pid in pids:
        start = 0x7F0000000000 + pid * 0x100000000
        present = rng.random(n) < 0.95
        hashed = present & (rng.random(n) < 0.99)
        fps = rng.integers(0, 256, (n, 16), dtype=np.uint8)
        fps[~hashed] = 0
        c = {"vma": np.zeros(n, np.uint32),
             "addr": start + np.arange(n, dtype=np.uint64) * np.uint64(PAGE),
             "present": present, "swapped": ~present, "file": np.zeros(n, bool),
             "exclusive": rng.random(n) < 0.9, "thp": np.zeros(n, bool),
             "ksm": rng.random(n) < 0.01, "zero_page": np.zeros(n, bool),
             "pfn": np.where(present, rng.integers(1, 6 << 20, n), 0).astype(np.uint64),
             "fingerprint": fps, "hashed": hashed,
             "changes": np.zeros(n, np.uint16), "compared": np.zeros(n, np.uint16)}
        w.add(pid=pid, **c)
        cols[str(pid)] = c
        procs.append(_process(pid, start, n))
    meta = _meta(procs, page_size)
    w.close(meta)
    return cols


def test_a_user_reads_it_with_pyarrow_alone(tmp_path: Path) -> None:
    """The documented columns and types, one row per page, and the metadata as JSON."""
    f = tmp_path / "s.parquet"
    cols = write_synthetic(f, 1000)
    t = pq.read_table(f)
    assert [(c.name, c.type) for c in t.schema] == DOCUMENTED_COLUMNS
    assert t.num_rows == 2000
    assert t.column("pid").to_pylist() == [100] * 1000 + [200] * 1000
    c = cols["100"]
    fps = t.column("fingerprint").to_pylist()[:1000]
    assert fps == [bytes(x) if h else None for x, h in zip(c["fingerprint"], c["hashed"], strict=True)]
    assert t.column("pfn").to_pylist()[:1000] == [int(p) if pr else None
                                                  for p, pr in zip(c["pfn"], c["present"], strict=True)]
    meta = json.loads(pq.read_metadata(f).metadata[b"ksmlab.snapshot"])
    assert meta["schema"] == "ksmlab.snapshot/1" and meta["page_size"] == PAGE
    assert [p["pid"] for p in meta["processes"]] == [100, 200]


def test_read_snapshot_gives_the_columns_back(tmp_path: Path) -> None:
    f = tmp_path / "s.parquet"
    cols = write_synthetic(f, 3000)
    snap = read_snapshot(f)
    assert len(snap.pages) == 6000 and snap.page_size == PAGE and snap.kernel == "6.18.0"
    for pid in (100, 200):
        rows = snap.pages.rows_of(pid)
        c = cols[str(pid)]
        assert (snap.pages.addr[rows] == c["addr"]).all()
        assert (snap.pages.fingerprint[rows] == c["fingerprint"]).all()
        assert (snap.pages.hashed[rows] == c["hashed"]).all()
        assert (snap.pages.pfn[rows] == c["pfn"]).all()
        assert (snap.pages.ksm[rows] == (c["ksm"] & c["present"])).all()
        assert (snap.pages.swapped[rows] == c["swapped"]).all()
    assert [p.comm for p in snap.processes] == ["p100", "p200"]
    assert snap.processes[0].vmas[0].mergeable
    assert snap.pages.rows_of(999) == slice(0, 0)


def test_content_ids_number_equal_fingerprints_alike(tmp_path: Path) -> None:
    f = tmp_path / "s.parquet"
    cols = write_synthetic(f, 500)
    snap = read_snapshot(f)
    table, ids = snap.pages.content_ids()
    hashed = snap.pages.hashed
    assert (ids[~hashed] == -1).all() and (ids[hashed] >= 0).all()
    assert (table[ids[hashed]] == snap.pages.fingerprint[hashed]).all()
    expect = {bytes(x) for c in cols.values()
              for x, h in zip(c["fingerprint"], c["hashed"], strict=True) if h}
    assert {bytes(x) for x in table} == expect and len(table) == len(expect)
    assert (snap.pages.candidates == (snap.pages.present & hashed)).all()  # no file/zero pages


def test_a_page_costs_at_most_24_bytes(tmp_path: Path) -> None:
    """Worst case for the encodings: every content unique, PFNs random over 24 GiB."""
    f = tmp_path / "s.parquet"
    n = 200_000
    write_synthetic(f, n)
    per_page = f.stat().st_size / (2 * n)
    assert per_page <= 24, per_page


def test_metadata_alone(tmp_path: Path) -> None:
    f = tmp_path / "s.parquet"
    write_synthetic(f, 10)
    assert read_metadata(str(f))["processes"][1]["pid"] == 200


# --- bad files -------------------------------------------------------------------------------

def _error(path: Path, **kwargs: Any) -> str:
    with pytest.raises(SnapshotFormatError) as e:
        read_snapshot(path, **kwargs)
    assert str(path) in str(e.value)
    return str(e.value)


def test_truncated_files_are_refused(tmp_path: Path) -> None:
    f = tmp_path / "s.parquet"
    write_synthetic(f, 5000)
    data = f.read_bytes()
    for keep in (len(data) // 2, len(data) - 5, 3, 0):
        f.write_bytes(data[:keep])
        assert "not a Parquet file, or truncated" in _error(f)


def test_a_damaged_page_is_refused(tmp_path: Path) -> None:
    """A flipped byte inside the page data (footer intact) fails the page checksum."""
    f = tmp_path / "s.parquet"
    write_synthetic(f, 20000)
    data = bytearray(f.read_bytes())
    md = pq.read_metadata(f)
    rg = md.row_group(0)
    col = next(rg.column(i) for i in range(rg.num_columns)
               if rg.column(i).path_in_schema == "fingerprint")
    start = col.dictionary_page_offset or col.data_page_offset
    data[start + col.total_compressed_size // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    assert "the file is damaged" in _error(f)


def test_other_parquet_and_other_files_are_refused(tmp_path: Path) -> None:
    f = tmp_path / "other.parquet"
    pq.write_table(pa.table({"x": [1, 2, 3]}), f)
    assert "a Parquet file without the 'ksmlab.snapshot' metadata" in _error(f)
    g = tmp_path / "random.bin"
    g.write_bytes(os.urandom(5000))
    assert "not a Parquet file" in _error(g)
    with pytest.raises(FileNotFoundError):
        read_snapshot(tmp_path / "missing.parquet")


def _rewrite_meta(src: Path, dst: Path, change: dict[str, Any]) -> None:
    t = pq.read_table(src)
    meta = json.loads(pq.read_metadata(src).metadata[b"ksmlab.snapshot"])
    meta.update(change)
    pq.write_table(t.replace_schema_metadata({"ksmlab.snapshot": json.dumps(meta)}), dst)


def test_another_schema_version_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "s.parquet"
    write_synthetic(f, 10)
    g = tmp_path / "v2.parquet"
    _rewrite_meta(f, g, {"schema": "ksmlab.snapshot/2"})
    assert "schema 'ksmlab.snapshot/2', this ksmlab reads 'ksmlab.snapshot/1'" in _error(g)
    h = tmp_path / "noproc.parquet"
    _rewrite_meta(f, h, {"processes": [_process(100, 0, 1)]})
    assert "rows of pid 200, which its metadata does not list as captured" in _error(h)


def test_another_fingerprint_is_refused(tmp_path: Path) -> None:
    """Pages hashed another way would get content ids that merge the wrong pages."""
    f = tmp_path / "s.parquet"
    write_synthetic(f, 10)
    g = tmp_path / "blake.parquet"
    _rewrite_meta(f, g, {"fingerprint": "blake2b-128"})
    assert "fingerprint 'blake2b-128', this ksmlab's pages are 'xxh3-128'" in _error(g)


def test_a_snapshot_from_another_page_size_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "arm64.parquet"
    write_synthetic(f, 10, page_size=16384)
    msg = _error(f)
    assert msg == (f"{f}: taken with 16384-byte pages on kernel 6.18.0 (x86_64); "
                   f"expected 4096-byte pages")
    assert read_snapshot(f, page_size=None).page_size == 16384


def test_a_missing_column_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "s.parquet"
    write_synthetic(f, 10)
    t = pq.read_table(f)
    g = tmp_path / "nofp.parquet"
    kv = {b"ksmlab.snapshot": pq.read_metadata(f).metadata[b"ksmlab.snapshot"]}
    pq.write_table(t.drop_columns(["fingerprint"]).replace_schema_metadata(kv), g)
    assert "no column 'fingerprint'" in _error(g)


# --- which processes a selection names (a fake /proc) -----------------------------------------

def _fake_proc(root: Path, pid: int, *, uid: int, cgroup: str, state: str = "S",
               flags: int = 0) -> None:
    d = root / str(pid)
    d.mkdir(parents=True)
    fields = [state, "1"] + ["0"] * 4 + [str(flags)] + ["0"] * 12 + ["77"]
    (d / "stat").write_text(f"{pid} (proc {pid}) {' '.join(fields)}\n")
    (d / "status").write_text(f"Name:\tp\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n")
    (d / "cgroup").write_text(f"0::{cgroup}\n")


def test_selection_by_uid_cgroup_and_all(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    _fake_proc(proc, 10, uid=0, cgroup="/system.slice/a.service")
    _fake_proc(proc, 11, uid=1000, cgroup="/user.slice/user-1000.slice/s1")
    _fake_proc(proc, 12, uid=1000, cgroup="/user.slice/user-1000.slice")
    _fake_proc(proc, 13, uid=1000, cgroup="/user.slice/user-1000.slicex")
    _fake_proc(proc, 14, uid=1000, cgroup="/user.slice", state="Z")  # a zombie
    _fake_proc(proc, 2, uid=0, cgroup="/", flags=0x00200000)  # a kernel thread
    p = str(proc)
    assert select_pids(Selection(uids=(1000,)), p) == [11, 12, 13]
    assert select_pids(Selection(cgroups=("/user.slice/user-1000.slice",)), p) == [11, 12]
    assert select_pids(Selection(all=True), p) == [10, 11, 12, 13]
    assert select_pids(Selection(pids=(2, 99), uids=(0,)), p) == [2, 10, 99]  # explicit: kept
    with pytest.raises(ValueError, match="cgroup: expected a cgroup directory or a cgroup path "
                                         "with processes, got '/nowhere'"):
        select_pids(Selection(cgroups=("/nowhere",)), p)
    with pytest.raises(ValueError, match="uid: expected a user id >= 0, got -1"):
        select_pids(Selection(uids=(-1,)), p)


def test_selection_by_cgroup_directory(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    for pid in (20, 21, 22):
        _fake_proc(proc, pid, uid=0, cgroup="/x")
    cg = tmp_path / "cgroup" / "web"
    (cg / "worker").mkdir(parents=True)
    (cg / "cgroup.procs").write_text("20\n")
    (cg / "worker" / "cgroup.procs").write_text("21\n")
    assert select_pids(Selection(cgroups=(str(cg),)), str(proc)) == [20, 21]


def test_the_file_is_private_to_its_owner(tmp_path: Path) -> None:
    """Fingerprints of low-entropy pages can be guessed: the file is mode 0600."""
    f = tmp_path / "s.parquet"
    write_synthetic(f, 10)
    assert f.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["s.parquet"]  # no temporary file left


# --- the race checks of one pass, on a scripted pagemap --------------------------------------

class _FakeProcess:
    """What read_pass uses of a ProcessHandle, over a regular file standing in for its memory."""

    def __init__(self, mem_fd: int) -> None:
        self.pid = 4242
        self.pagemap = -1  # never read: the pagemap reads are scripted
        self.mem = mem_fd
        self.exited = False


def test_pages_that_change_around_the_read_get_no_fingerprint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """8 present pages. Before the chunk is read, page 3 is gone: pages 0..2 are read, then
    page 1 shows another PFN (copied on write meanwhile); page 3 is skipped, 4..7 read.
    Pages 1 and 3 keep no fingerprint and count as raced."""
    import xxhash

    from ksmlab.snapshot import pages
    from ksmlab.snapshot.procfs import Area

    base = 0x10000
    data = b"".join(bytes([i + 1]) * PAGE for i in range(8))
    mem = tmp_path / "mem"
    mem.write_bytes(bytes(base) + data)
    present = np.uint64(1 << 63)
    entries = np.array([int(present) | (1000 + i) for i in range(8)], np.uint64)

    def scripted(fd: int, first_page: int, n: int) -> np.ndarray[Any, Any]:
        i = first_page - base // PAGE
        now = entries.copy()
        calls.append((i, n))
        if len(calls) >= 2:
            now[3] = 0  # unmapped after the pass's first read
        if len(calls) >= 3:
            now[1] = int(present) | 5000  # copied on write while being read
        return now[i:i + n]

    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(pages, "_pread_pagemap", scripted)
    fd = os.open(mem, os.O_RDONLY)
    try:
        area = Area(base, base + 8 * PAGE, "rw-p", 0, 0, "", ("rd", "wr", "mg"))
        rows = pages.read_pass(_FakeProcess(fd), [area], page_size=PAGE,  # type: ignore[arg-type]
                               show_pfn=True, kpageflags=None)
    finally:
        os.close(fd)
    assert calls[:3] == [(0, 8), (0, 8), (0, 3)]  # first read, before, after
    assert rows.hashed.tolist() == [True, False, True, False, True, True, True, True]
    assert rows.raced == 2
    for i in (0, 2, 4, 5, 6, 7):
        assert bytes(rows.fingerprint[i]) == xxhash.xxh3_128_digest(
            data[i * PAGE:(i + 1) * PAGE])
    assert not rows.fingerprint[[1, 3]].any()
