# SPDX-License-Identifier: GPL-2.0-only
"""Snapshot -> estimate round trip on live processes, checked against arithmetic and the real ksmd.

The processes are LinuxKernel helpers (real processes, made with real
mmap/write/madvise/fork calls), captured with ``ksmlab snapshot``, estimated
with ``ksmlab estimate``, and then merged by the real ksmd with the same
knobs: the estimate's final counters must be the kernel's.

The memory, one mergeable area of 40 pages in a parent P:

* pages 0..29: ten contents (``pattern(i % 10)``), three times each;
* pages 30..33: zero-filled (written);
* pages 34..39: never touched.

P forks C (C shares every page, same frames), then P rewrites pages 0..4 with
contents of its own (copy-on-write: P gets new frames, C keeps the old ones).

Worked figures, for the 68 loaded pages (34 in each; the untouched ones are
absent): contents 0..4 have P's two copies (pages 10..14, 20..24, shared with
C) and C's own page i: 5 mappings on 3 frames; contents 5..9: P's three copies,
shared with C: 6 mappings on 3 frames; zero: 4 frames mapped by both: 8
mappings on 4 frames; P's 5 new contents: 1 mapping each.  So 39 physical
pages, 16 contents, 52 duplicate pages; merging every mapping gives
``pages_sharing`` 5 x 4 + 5 x 5 + 7 = 52 in 11 KSM pages (``use_zero_pages``
off), freeing 10 + 10 + 3 = 23 frames.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from ksmlab import MADV_MERGEABLE, PAGE_SIZE
from ksmlab.cli import main
from ksmlab.estimate import load_plan, run_estimate
from ksmlab.estimate.static import plan_bound
from ksmlab.scenario.result import TIMELINE_COLUMNS
from ksmlab.snapshot import Selection, capture_snapshot, read_snapshot

pytestmark = pytest.mark.linux

KNOBS = {"pages_to_scan": "100", "sleep_millisecs": "10"}


def pattern(k: int) -> bytes:
    return hashlib.sha256(f"estimate class {k}".encode()).digest() * (PAGE_SIZE // 32)


def build(k: object) -> tuple[int, int]:
    """The processes of the module doc; returns (P's pid, C's pid)."""
    from ksmlab.backends.linux import LinuxKernel

    assert isinstance(k, LinuxKernel)
    p = k.spawn()
    a = p.mmap(40 * PAGE_SIZE)
    p.write(a, b"".join(pattern(i % 10) for i in range(30)) + bytes(4 * PAGE_SIZE))
    p.madvise(a, 40 * PAGE_SIZE, MADV_MERGEABLE)
    c = p.fork()
    p.write(a, b"".join(pattern(100 + i) for i in range(5)))
    return p.pid, c.pid


def last(timeline: tuple[tuple[float, ...], ...]) -> dict[str, float]:
    return dict(zip(TIMELINE_COLUMNS, timeline[-1], strict=True))


@pytest.mark.slow
def test_snapshot_estimate_and_the_real_ksmd_agree(tmp_path: Path) -> None:
    """The static bound is the worked figures; the estimate (both engines) ends at them,
    and so does the real ksmd run on the same processes with the same knobs."""
    from linux_support import session_at_boot_knobs, skip_unless_ksm_usable

    skip_unless_ksm_usable()
    with session_at_boot_knobs(**KNOBS) as k:
        pids = build(k)
        out = tmp_path / "fork.parquet"
        capture_snapshot(str(out), Selection(pids=pids))
        snap = read_snapshot(out)
        plan = load_plan(snap)
        b = plan_bound(plan, snap.ksm_knobs or {})
        assert (b.pages, b.frames, b.contents, b.duplicate_pages, b.zero_pages) == (68, 39, 16, 52, 8)
        assert (b.pages_sharing, b.pages_shared, b.freeable_frames) == (52, 11, 23)
        assert int(plan.shared.sum()) == 29  # C's pages 5..33 map P's frames
        for engine in ("sim", "bulk"):
            e = run_estimate(snap, engine=engine)
            end = last(e.result.timeline)
            assert (end["pages_sharing"], end["pages_shared"], end["ksm_zero_pages"]) == (52, 11, 0)
            assert e.result.knobs["pages_to_scan"] == 100  # the host's knobs at capture
        k.sysfs["run"] = "1"
        k.wait_full_scans(6, timeout=60)
        real = {n: int(k.sysfs[n]) for n in ("pages_sharing", "pages_shared", "ksm_zero_pages")}
        assert real == {"pages_sharing": 52, "pages_shared": 11, "ksm_zero_pages": 0}


def test_cli_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``ksmlab snapshot --pid P --pid C`` then ``ksmlab estimate --json``: the two commands
    of the README, with the worked static figures."""
    from linux_support import session_at_boot_knobs, skip_unless_ksm_usable

    skip_unless_ksm_usable()
    with session_at_boot_knobs(**KNOBS) as k:
        pids = build(k)
        out = tmp_path / "app.parquet"
        argv = ["snapshot", *(x for pid in pids for x in ("--pid", str(pid))), "-o", str(out)]
        assert main(argv) == 0
        capsys.readouterr()
        assert main(["estimate", str(out), "--json", "--until", "5s"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema"] == "ksmlab.estimate/1"
    assert doc["static"]["pages_sharing"] == 52 and doc["static"]["duplicate_pages"] == 52
    assert doc["snapshot"]["fork_shared_pages"] == 29 and doc["snapshot"]["pfn_known"] is True
    assert doc["timeline"]["rows"][-1][TIMELINE_COLUMNS.index("pages_sharing")] == 52
