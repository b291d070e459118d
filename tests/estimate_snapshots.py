# SPDX-License-Identifier: GPL-2.0-only
"""Synthetic snapshot files for the estimate's model-only tests, written by the snapshot writer,
and ksmd's work on a machine loaded from one, full scan by full scan (:func:`work`).

A page is described by what it holds (a tag: pages with equal tags hold equal
bytes; ``ZERO`` is a zero-filled page), its PFN (equal PFNs: one physical
page, as a fork parent and child share it), whether it was a KSM page, and
its samples (``changes`` of ``compared``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ksmlab.bulk.invariants import check_bulk
from ksmlab.estimate.load import Machine
from ksmlab.invariants import check_invariants
from ksmlab.kernel import SimKernel
from ksmlab.mm.page import fingerprint
from ksmlab.snapshot.schema import SCHEMA_ID
from ksmlab.snapshot.writer import SnapshotWriter

PAGE = 4096
ZERO = -1
"""The tag of a zero-filled page."""


def page_bytes(tag: int) -> bytes:
    """The bytes of a page of *tag* (distinct tags, distinct bytes; ZERO: zeros)."""
    if tag == ZERO:
        return bytes(PAGE)
    return (b"ksmlab test page" + tag.to_bytes(8, "little")) * (PAGE // 24) + bytes(PAGE % 24)


@dataclass(frozen=True)
class Page:
    """One page of a synthetic process."""

    tag: int
    pfn: int
    ksm: bool = False
    changes: int = 0
    compared: int = 0
    thp: bool = False
    """Part of a transparent huge page (/proc/kpageflags bit 22)."""


@dataclass
class Proc:
    """One synthetic process: one anonymous area holding *pages*."""

    pid: int
    pages: list[Page]
    uid: int = 1000
    cgroup: str = "/"
    comm: str = "worker"
    mergeable: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


class Pfns:
    """Fresh page frame numbers."""

    def __init__(self) -> None:
        self.n = 1000

    def __call__(self) -> int:
        self.n += 1
        return self.n


def write_snapshot(path: Path, procs: list[Proc], *, knobs: dict[str, str] | None = None,
                   policy: str = "as-is", samples: int = 1, interval_s: float = 0.0,
                   pfn_known: bool = True, extra_meta: dict[str, Any] | None = None) -> Path:
    """Write *procs* as a snapshot at *path* (metadata as ``ksmlab snapshot`` writes it,
    with *extra_meta*'s fields added)."""
    w = SnapshotWriter(str(path))
    meta_procs = []
    for p in sorted(procs, key=lambda p: p.pid):
        n = len(p.pages)
        start = 0x7F0000000000 + p.pid * 0x100000000
        fps = np.stack([np.frombuffer(fingerprint(page_bytes(x.tag)), np.uint8)
                        for x in p.pages]) if n else np.zeros((0, 16), np.uint8)
        present = np.ones(n, bool)
        w.add(pid=p.pid, vma=np.zeros(n, np.uint32),
              addr=start + np.arange(n, dtype=np.uint64) * np.uint64(PAGE),
              present=present, swapped=np.zeros(n, bool), file=np.zeros(n, bool),
              exclusive=np.ones(n, bool), thp=np.array([x.thp for x in p.pages], bool),
              ksm=np.array([x.ksm for x in p.pages], bool), zero_page=np.zeros(n, bool),
              pfn=np.array([x.pfn for x in p.pages], np.uint64) if pfn_known else None,
              fingerprint=fps, hashed=present,
              changes=np.array([x.changes for x in p.pages], np.uint16),
              compared=np.array([x.compared for x in p.pages], np.uint16))
        meta_procs.append({
            "pid": p.pid, "ppid": 1, "comm": p.comm, "uid": p.uid, "cgroup": p.cgroup,
            "cgroups": {}, "start_time": 5, "state": "captured", "ksm_stat": None,
            "vmas": [{"start": start, "end": start + max(n, 1) * PAGE, "perms": "rw-p",
                      "offset": 0, "inode": 0, "path": "",
                      "flags": ["rd", "wr", *(["mg"] if p.mergeable else [])],
                      "mergeable": p.mergeable, "rss": n * PAGE, "anonymous": n * PAGE,
                      "swap": 0, "ksm": 0, "anon_huge": 0}], **p.extra})
    meta = {"schema": SCHEMA_ID, "fingerprint": "xxh3-128",
            "created": "2026-01-01T00:00:00+00:00", "host": "testhost", "kernel": "6.18.0",
            "kernel_version": "#1", "machine": "x86_64", "page_size": PAGE, "policy": policy,
            "samples": samples, "interval_s": interval_s,
            "selection": {"pids": [], "uids": [], "cgroups": [], "all": False},
            "privileges": {"pfn": pfn_known, "kpageflags": pfn_known},
            "ksm": None if knobs is None else {"knobs": knobs, "counters": {}},
            "processes": meta_procs, "unreadable": [],
            "capture": {"pass_starts_s": [i * interval_s for i in range(samples)]},
            **(extra_meta or {})}
    w.close(meta)
    return path


HOST_KNOBS = {"advisor_max_cpu": "70", "advisor_min_pages_to_scan": "500",
              "advisor_max_pages_to_scan": "30000", "advisor_target_scan_time": "200",
              "advisor_mode": "none", "pages_to_scan": "100", "sleep_millisecs": "20",
              "smart_scan": "1", "use_zero_pages": "0",
              "stable_node_chains_prune_millisecs": "2000", "merge_across_nodes": "1",
              "max_page_sharing": "256", "run": "0"}
"""A host's knobs at capture, as the snapshot records them (boot values, ksmd stopped)."""


# --- a loaded estimate's ksmd, scan by scan ---------------------------------------------------

def check(m: Machine) -> None:
    """The engine's own invariant checks (SimKernel's THP checks, the bulk engine's)."""
    k = m.kernel
    if isinstance(k, SimKernel):
        check_invariants(k)
    else:
        check_bulk(k.ksm)


def work(m: Machine, scans: int) -> list[dict[str, int]]:
    """ksmd's counts (every KsmdWork field) in each of the next *scans* full scans, ksmd
    stopped after each and the engine's invariants checked (:func:`check`)."""
    k = m.kernel
    out = []
    for _ in range(scans):
        before = k.ksmd.meter.total.as_dict()
        k.sysfs["run"] = "1"
        k.wait_full_scans(1)
        k.sysfs["run"] = "0"
        after = k.ksmd.meter.total.as_dict()
        out.append({n: after[n] - before[n] for n in after if n != "stable_base"})
        check(m)
    return out
