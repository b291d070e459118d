"""``capture_snapshot``: take a snapshot of live processes and write it (docs/snapshot.md).

A capture has three steps:

1. *Select and open* the targets (explicit pids, a uid, a cgroup, all):
   every one is opened before anything is read, so an unknown pid or one the
   caller may not read is refused at once, naming the pid and the missing
   privilege, and no file is written.
2. *Passes*: each pass reads every target's areas (``smaps``), chooses those
   the policy covers, and reads their pages (:func:`ksmlab.snapshot.pages.read_pass`).
   With several samples the passes start *interval* apart, and each page of
   the first pass counts the passes after which its fingerprint had changed.
3. *Write* one row per page of the first pass, and the metadata.  With one
   sample each process is written as soon as it is read, so memory use does
   not grow with the host.

A process that exits during the capture is recorded as ``gone`` and has no
rows.  Only ``/proc`` and ``/sys`` are read; nothing is written but the
output file, which appears only once complete.
"""

from __future__ import annotations

import errno
import os
import platform
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from ksmlab.snapshot.pages import (
    KPF_KSM,
    KPF_THP,
    KPF_ZERO_PAGE,
    PM_EXCLUSIVE,
    PM_FILE,
    PM_SWAP,
    KpageFlags,
    PassRows,
    read_pass,
)
from ksmlab.snapshot.procfs import (
    ProcessGoneError,
    ProcessHandle,
    SnapshotPermissionError,
    all_pids,
    area_selected,
    cgroup_members,
    has_cap_sys_admin,
    is_user_process,
    uid_members,
)
from ksmlab.snapshot.schema import FINGERPRINT_ALGORITHM, POLICIES, SCHEMA_ID
from ksmlab.snapshot.writer import SnapshotWriter

__all__ = ["CaptureProgress", "CaptureSummary", "Selection", "capture_snapshot", "select_pids"]

MAX_SAMPLES = 65535
"""The ``changes`` and ``compared`` columns are 16-bit."""


@dataclass(frozen=True)
class Selection:
    """Which processes to capture: the union of every criterion given."""

    pids: tuple[int, ...] = ()
    uids: tuple[int, ...] = ()
    cgroups: tuple[str, ...] = ()
    all: bool = False

    def to_json(self) -> dict[str, object]:
        """The selection as the metadata records it."""
        return {"pids": list(self.pids), "uids": list(self.uids), "cgroups": list(self.cgroups),
                "all": self.all}


@dataclass(frozen=True)
class CaptureProgress:
    """Where a capture is: passed to the progress callback at the start of each pass
    (``pid`` 0, before any page of the pass is read) and after every chunk read."""

    bytes_done: int
    bytes_total: int
    """Estimate: the anonymous resident size of the selected areas times the passes."""
    pass_no: int
    passes: int
    pid: int


@dataclass
class CaptureSummary:
    """What a capture did (also in the file's ``capture`` metadata)."""

    path: str
    processes: int = 0
    gone: int = 0
    pages: int = 0
    present: int = 0
    hashed: int = 0
    raced: int = 0
    bytes_read: int = 0
    seconds: float = 0.0
    file_bytes: int = 0
    show_pfn: bool = False
    kpageflags: bool = False
    gone_pids: dict[int, str] = field(default_factory=dict)
    """pid -> comm of the processes that exited during the capture."""
    unreadable: dict[int, str] = field(default_factory=dict)
    """pid -> why, for the members of a group (uid, cgroup, all) the caller may not read."""


def select_pids(sel: Selection, proc: str = "/proc") -> list[int]:
    """The pids *sel* names, ascending, without this process.

    Explicit pids are kept as given (checked when opened); the uid, cgroup and
    ``all`` criteria keep only processes with user memory (no kernel threads,
    no zombies).

    Raises:
        ValueError: nothing selected, a negative pid or uid, or a cgroup that
            names no cgroup.
    """
    if not (sel.pids or sel.uids or sel.cgroups or sel.all):
        msg = "selection: expected at least one of pids, uids, cgroups or all, got none"
        raise ValueError(msg)
    for pid in sel.pids:
        if pid <= 0:
            msg = f"pid: expected a process id > 0, got {pid}"
            raise ValueError(msg)
    for uid in sel.uids:
        if uid < 0:
            msg = f"uid: expected a user id >= 0, got {uid}"
            raise ValueError(msg)
    me = os.getpid()
    found: set[int] = set()
    if sel.all:
        found.update(all_pids(proc))
    for uid in sel.uids:
        found.update(uid_members(uid, proc))
    for path in sel.cgroups:
        members = cgroup_members(path, proc)
        if not members and not os.path.isdir(path):
            msg = f"cgroup: expected a cgroup directory or a cgroup path with processes, got {path!r}"
            raise ValueError(msg)
        found.update(members)
    found = {p for p in found if p != me and is_user_process(p, proc)}
    found.update(sel.pids)
    return sorted(found)


def _ksm_state() -> dict[str, Any] | None:
    """The KSM knobs and counters now, read without changing them (None: no KSM)."""
    from ksmlab.backends.linux_knobs import KSM_SYSFS_DIR, read_knobs
    from ksmlab.scenario.host import read_ksm_files

    try:
        knobs = read_knobs(KSM_SYSFS_DIR)
        files = read_ksm_files(KSM_SYSFS_DIR)
    except OSError:
        return None
    return {"knobs": knobs, "counters": {k: v for k, v in files.items() if k not in knobs}}


def _ksmd_cpu_ns() -> int | None:
    """ksmd's CPU time since boot now (None: no ksmd found): ``ksmlab estimate`` starts
    its model's ksmd with it, as the scan-time advisor's first step counts it."""
    from ksmlab.scenario.host import ksmd_cpu_ns

    return ksmd_cpu_ns()


def _process_json(h: ProcessHandle, state: str) -> dict[str, Any]:
    return {"pid": h.pid, "ppid": h.ppid, "comm": h.comm, "uid": h.uid, "cgroup": h.cgroup,
            "cgroups": h.cgroups, "start_time": h.start_time, "state": state}


class _Target:
    """One process being captured, and what the passes learnt about it."""

    def __init__(self, handle: ProcessHandle) -> None:
        self.handle = handle
        self.info = _process_json(handle, "captured")
        self.first: PassRows | None = None
        self.prev_fp: np.ndarray[Any, np.dtype[np.uint8]] | None = None
        self.prev_hashed: np.ndarray[Any, np.dtype[np.bool_]] | None = None
        self.changes: np.ndarray[Any, np.dtype[np.uint16]] | None = None
        self.compared: np.ndarray[Any, np.dtype[np.uint16]] | None = None
        self.gone = False
        self.estimate = 0

    def mark_gone(self, pass_no: int) -> None:
        self.gone = True
        self.first = None
        self.info["state"] = "gone"
        self.info["gone_in_pass"] = pass_no
        self.info.pop("vmas", None)


def capture_snapshot(path: str, selection: Selection, *, policy: str = "as-is",
                     samples: int = 1, interval_s: float = 0.0,
                     progress: Callable[[CaptureProgress], None] | None = None,
                     proc: str = "/proc") -> CaptureSummary:
    """Capture the processes *selection* names into the Parquet file *path*.

    Args:
        path: the output file (written to a temporary name beside it, then
            renamed, so it never exists half-written).
        selection: which processes.
        policy: ``"as-is"`` or ``"merge-any"`` (:data:`~ksmlab.snapshot.schema.POLICIES`).
        samples: passes to take (1 to 65535); with more than one, each page's
            ``changes`` counts the passes after which its content differed.
        interval_s: seconds from the start of one pass to the next (samples > 1).
        progress: called with a :class:`CaptureProgress` at the start of each
            pass and after every chunk read.

    Raises:
        ValueError: a bad argument (named), or nothing selected.
        ProcessGoneError: an explicit pid does not exist (ESRCH).
        SnapshotPermissionError: an explicit pid may not be read (EACCES); the
            members of a uid, cgroup or ``all`` the caller may not read are
            skipped instead (listed in the metadata's ``unreadable``).
        OSError: the output cannot be written.
    """
    if policy not in POLICIES:
        msg = f"policy: expected one of {', '.join(POLICIES)}, got {policy!r}"
        raise ValueError(msg)
    if isinstance(samples, bool) or not isinstance(samples, int) or not 1 <= samples <= MAX_SAMPLES:
        msg = f"samples: expected an integer from 1 to {MAX_SAMPLES}, got {samples!r}"
        raise ValueError(msg)
    if not interval_s >= 0 or interval_s == float("inf"):
        msg = f"interval_s: expected a finite number of seconds >= 0, got {interval_s!r}"
        raise ValueError(msg)
    if samples > 1 and interval_s <= 0:
        msg = f"interval_s: expected > 0 with {samples} samples, got {interval_s!r}"
        raise ValueError(msg)
    pids = select_pids(selection, proc)
    explicit = set(selection.pids)
    targets: list[_Target] = []
    skipped: dict[int, str] = {}
    try:
        for pid in pids:
            try:
                targets.append(_Target(ProcessHandle(pid, proc)))
            except ProcessGoneError:
                if pid in explicit:
                    raise
            except SnapshotPermissionError as e:
                # An explicit pid must be readable; a group (uid, cgroup, all)
                # is captured without the members the caller may not read.
                if pid in explicit:
                    raise
                skipped[pid] = str(e.strerror)
        return _capture(path, targets, skipped, selection, policy, samples, interval_s,
                        progress)
    finally:
        for t in targets:
            t.handle.close()


def _capture(path: str, targets: list[_Target], skipped: dict[int, str],
             selection: Selection, policy: str,
             samples: int, interval_s: float,
             progress: Callable[[CaptureProgress], None] | None) -> CaptureSummary:
    page_size = os.sysconf("SC_PAGE_SIZE")
    show_pfn = has_cap_sys_admin()
    try:
        kpf: KpageFlags | None = KpageFlags() if show_pfn else None
    except OSError:
        kpf = None
    summary = CaptureSummary(path=path, show_pfn=show_pfn, kpageflags=kpf is not None,
                             unreadable=skipped)
    started = time.time()
    t0 = time.monotonic()
    meta: dict[str, Any] = {
        "schema": SCHEMA_ID, "fingerprint": FINGERPRINT_ALGORITHM,
        "created": datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds"),
        "host": socket.gethostname(), "kernel": platform.release(),
        "kernel_version": platform.version(), "machine": platform.machine(),
        "page_size": page_size, "policy": policy, "samples": samples,
        "interval_s": interval_s if samples > 1 else 0.0,
        "selection": selection.to_json(),
        "privileges": {"pfn": show_pfn, "kpageflags": kpf is not None},
        "ksm": _ksm_state(),
        "ksmd_cpu_ns": _ksmd_cpu_ns(),
    }
    writer = SnapshotWriter(path)
    try:
        meter = _Meter(progress, samples)
        pass_starts: list[float] = []
        for pass_no in range(1, samples + 1):
            if pass_no > 1:
                time.sleep(max(0.0, t0 + (pass_no - 1) * interval_s - time.monotonic()))
            pass_starts.append(round(time.monotonic() - t0, 6))  # later if a pass overran
            meter.start_pass(pass_no)
            areas_of = {}
            for t in _alive(targets):
                try:
                    areas_of[t.handle.pid] = [a for a in t.handle.areas()
                                              if area_selected(a, policy)]
                except ProcessGoneError:
                    t.mark_gone(pass_no)
                    continue
                t.estimate = sum(a.sizes.get("anonymous", 0) for a in areas_of[t.handle.pid])
            if pass_no == 1:
                meter.total = sum(t.estimate for t in _alive(targets)) * samples
            for t in _alive(targets):
                meter.pid = t.handle.pid
                areas = areas_of[t.handle.pid]
                try:
                    rows = read_pass(t.handle, areas, page_size=page_size, show_pfn=show_pfn,
                                     kpageflags=kpf, on_bytes=meter.add)
                    if pass_no == 1:
                        t.info["ksm_stat"] = t.handle.ksm_stat()
                    if t.handle.exited:  # pagemap of an exited process reads as empty
                        raise ProcessGoneError(errno.ESRCH, f"pid {t.handle.pid}: the process exited")
                except ProcessGoneError:
                    t.mark_gone(pass_no)
                    continue
                summary.bytes_read += rows.bytes_read
                summary.raced += rows.raced
                if pass_no == 1:
                    _first_pass(t, rows, areas)
                    if samples == 1:
                        _flush(writer, t, summary)
                else:
                    _later_pass(t, rows)
        for t in targets:
            if t.first is not None:
                _flush(writer, t, summary)
        meta["processes"] = [t.info for t in targets]
        meta["unreadable"] = [{"pid": pid, "reason": why} for pid, why in skipped.items()]
        summary.processes = len(targets)
        summary.gone_pids = {t.handle.pid: t.handle.comm for t in targets if t.gone}
        summary.gone = len(summary.gone_pids)
        summary.seconds = time.monotonic() - t0
        meta["capture"] = {"seconds": round(summary.seconds, 6), "pages": summary.pages,
                           "present": summary.present, "hashed": summary.hashed,
                           "raced": summary.raced, "bytes_read": summary.bytes_read,
                           "pass_starts_s": pass_starts}
        summary.file_bytes = writer.close(meta)
    except BaseException:
        writer.abort()
        raise
    finally:
        if kpf is not None:
            kpf.close()
    return summary


class _Meter:
    """Counts the bytes read and tells the progress callback."""

    def __init__(self, progress: Callable[[CaptureProgress], None] | None, passes: int) -> None:
        self.progress = progress
        self.passes = passes
        self.done = self.total = self.pid = 0
        self.pass_no = 1

    def start_pass(self, pass_no: int) -> None:
        self.pass_no = pass_no
        self.pid = 0
        self.add(0)

    def add(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(CaptureProgress(self.done, max(self.total, self.done), self.pass_no,
                                          self.passes, self.pid))


def _alive(targets: Iterable[_Target]) -> list[_Target]:
    return [t for t in targets if not t.gone]


def _first_pass(t: _Target, rows: PassRows, areas: Sequence[Any]) -> None:
    t.first = rows
    t.info["vmas"] = [a.to_json() for a in areas]
    t.info["pages"] = len(rows)
    t.prev_fp = rows.fingerprint
    t.prev_hashed = rows.hashed
    t.changes = np.zeros(len(rows), np.uint16)
    t.compared = np.zeros(len(rows), np.uint16)


def _later_pass(t: _Target, rows: PassRows) -> None:
    """Count, for each page of the first pass, whether its content changed since the last pass."""
    assert t.first is not None and t.prev_fp is not None and t.prev_hashed is not None
    assert t.changes is not None and t.compared is not None
    base = t.first.addr
    at = np.searchsorted(rows.addr, base)
    found = at < len(rows)
    found[found] = rows.addr[at[found]] == base[found]
    cur_hashed = np.zeros(base.size, np.bool_)
    cur_fp = np.zeros_like(t.prev_fp)
    cur_hashed[found] = rows.hashed[at[found]]
    cur_fp[found] = rows.fingerprint[at[found]]
    both = cur_hashed & t.prev_hashed
    changed = both & (cur_fp != t.prev_fp).any(axis=1)
    t.compared += both
    t.changes += changed
    t.prev_fp, t.prev_hashed = cur_fp, cur_hashed


def _flush(writer: SnapshotWriter, t: _Target, summary: CaptureSummary) -> None:
    rows = t.first
    assert rows is not None and t.changes is not None and t.compared is not None
    present = rows.present
    writer.add(pid=t.handle.pid, vma=rows.vma, addr=rows.addr, present=present,
               swapped=rows.bit(PM_SWAP), file=rows.bit(PM_FILE) & present,
               exclusive=rows.bit(PM_EXCLUSIVE) & present,
               thp=rows.kflag(KPF_THP), ksm=rows.kflag(KPF_KSM), zero_page=rows.kflag(KPF_ZERO_PAGE),
               pfn=rows.pfn, fingerprint=rows.fingerprint, hashed=rows.hashed,
               changes=t.changes, compared=t.compared)
    summary.pages += len(rows)
    summary.present += int(present.sum())
    summary.hashed += int(rows.hashed.sum())
    t.info["present"] = int(present.sum())
    t.info["hashed"] = int(rows.hashed.sum())
    t.info["raced"] = rows.raced
    t.first = None
    t.prev_fp = t.prev_hashed = None
    t.changes = t.compared = None
