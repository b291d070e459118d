# SPDX-License-Identifier: GPL-2.0-only
"""ksmlab estimate on synthetic snapshots (no host needed).

The snapshots are written by the snapshot writer (tests/estimate_snapshots.py).
Expected figures are worked out by hand from how the pages were built,
following docs/estimate.md's definitions and the kernel's counting (spec
section 4 in docs/kernel-behaviour.md: ``pages_sharing`` counts every
mapping of a KSM page but the first, ``max_page_sharing`` mappings at most
per KSM page, and a page mapped by fork relatives is one page, never merged
with itself).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from estimate_snapshots import HOST_KNOBS, ZERO, Page, Pfns, Proc, work, write_snapshot
from ksmlab.bulk import BulkKernel
from ksmlab.cli import main
from ksmlab.estimate import bound, load_plan, resolve_knobs, rewrite_rates, run_estimate
from ksmlab.estimate.exposure import exposure
from ksmlab.estimate.load import Machine, _layout, load_machine
from ksmlab.estimate.plan import AreaPlan
from ksmlab.estimate.report import _notes
from ksmlab.estimate.simulate import RewriteSchedule
from ksmlab.estimate.static import groups_bound, plan_bound
from ksmlab.ksm.cost import FEATURES, KsmdClock, KsmdCost
from ksmlab.report.document import SCHEMA as RUN_SCHEMA
from ksmlab.scenario.result import TIMELINE_COLUMNS
from ksmlab.snapshot import read_snapshot

S = 1_000_000_000


def forked(tmp: Path, knobs: dict[str, str] | None = None, **kw: object) -> Path:
    """Three processes (see the module's worked figures in each test).

    A (pid 100, uid 1000, /a): 10 pages of tag 1, 5 zero-filled, 3 unique (100-102),
    tags 200-203 on frames shared with B, tag 300 on a frame shared with B.
    B (pid 101, uid 1000, /a): those five shared frames, tag 300 on a frame of its own,
    2 pages of tag 1.  C (pid 102, uid 2000, /b): 3 pages of tag 1, 2 zero-filled,
    2 of tag 500, 1 of tag 201 on a frame of its own.
    """
    pfn = Pfns()
    shared = {t: pfn() for t in (200, 201, 202, 203, 300)}
    a = ([Page(1, pfn()) for _ in range(10)] + [Page(ZERO, pfn()) for _ in range(5)]
         + [Page(t, pfn()) for t in (100, 101, 102)]
         + [Page(t, shared[t]) for t in (200, 201, 202, 203, 300)])
    b = ([Page(t, shared[t]) for t in (200, 201, 202, 203, 300)] + [Page(300, pfn())]
         + [Page(1, pfn()) for _ in range(2)])
    c = ([Page(1, pfn()) for _ in range(3)] + [Page(ZERO, pfn()) for _ in range(2)]
         + [Page(500, pfn()) for _ in range(2)] + [Page(201, pfn())])
    procs = [Proc(100, a, uid=1000, cgroup="/a", comm="web"),
             Proc(101, b, uid=1000, cgroup="/a", comm="web"),
             Proc(102, c, uid=2000, cgroup="/b", comm="db")]
    return write_snapshot(tmp / "forked.parquet", procs, knobs=knobs or HOST_KNOBS, **kw)  # type: ignore[arg-type]


def knobs(**kw: str) -> dict[str, str]:
    return HOST_KNOBS | kw


# --- the static bound -----------------------------------------------------------------------

def test_static_bound_of_forked_processes(tmp_path: Path) -> None:
    """pages 23 + 8 + 8 = 39; five of B's are A's frames: 34 physical; contents: tag 1,
    zero, 100-102, 200-203, 300, 500 = 11, so 28 duplicates.  Merged: tag 1 (15 mappings)
    14, zero (7) 6, 201 (A/B's frame + C's) 2, 300 (A/B's + B's own) 2, 500 1: 25 sharing
    in 5 KSM pages; 200, 202, 203 are one frame each and never merge.  Frames freed:
    14 + 6 + 1 + 1 + 1 = 23."""
    plan = load_plan(read_snapshot(forked(tmp_path)))
    b = plan_bound(plan, HOST_KNOBS)
    assert (b.pages, b.frames, b.contents, b.duplicate_pages, b.zero_pages) == (39, 34, 11, 28, 7)
    assert (b.pages_shared, b.pages_sharing, b.ksm_zero_pages, b.freeable_frames) == (5, 25, 0, 23)
    assert b.saved_bytes == 25 * 4096 and b.general_profit == 25 * 4096 - 39 * 64


def test_static_bound_with_use_zero_pages_and_max_page_sharing(tmp_path: Path) -> None:
    """use_zero_pages=1: the 7 zero-filled mappings go to the zero page (7 ksm_zero_pages,
    their 7 frames freed); the rest as before: 19 sharing in 4 KSM pages, 17 + 7 freed.
    max_page_sharing=4: tag 1's 15 mappings need 4 KSM pages (11 sharing), zero's 7 need
    2 (5): 11 + 5 + 2 + 2 + 1 = 21 sharing in 9 KSM pages; frames freed 11 + 5 + 3 = 19."""
    plan = load_plan(read_snapshot(forked(tmp_path)))
    z = plan_bound(plan, knobs(use_zero_pages="1"))
    assert (z.pages_shared, z.pages_sharing, z.ksm_zero_pages, z.freeable_frames) == (4, 19, 7, 24)
    m = plan_bound(plan, knobs(max_page_sharing="4"))
    assert (m.pages_shared, m.pages_sharing, m.ksm_zero_pages, m.freeable_frames) == (9, 21, 0, 19)


def test_bound_of_arrays() -> None:
    """Four mappings of one content on two frames (a fork pair and another copy): 3 sharing,
    1 frame freed; a content on one frame mapped twice: nothing."""
    content = np.array([7, 7, 7, 7, 8, 8])
    frame = np.array([1, 1, 2, 2, 3, 3])
    b = bound(content, frame, np.zeros(6, bool), use_zero_pages=False, max_page_sharing=256)
    assert (b.pages_sharing, b.pages_shared, b.freeable_frames, b.frames) == (3, 1, 1, 3)


def test_static_bound_per_process_and_group(tmp_path: Path) -> None:
    """Merging within each: A: tag 1 9 + zero 4 = 13; B: 300 (its own + the frame it
    shares) 1 + tag 1 1 = 2; C: tag 1 2 + zero 1 + 500 1 = 4.  Per uid: 1000 (A and B):
    tag 1 11 + zero 4 + 300 2 = 17; 2000: 4.  Pages shared outside: A's all but 100-102,
    202, 203 and 200 (only A and B hold them, and B is another process): 23 - 3 = 20."""
    plan = load_plan(read_snapshot(forked(tmp_path)))
    procs = {g.name: g for g in groups_bound(plan, HOST_KNOBS, "pid")}
    assert {n: g.bound.pages_sharing for n, g in procs.items()} == {
        "web[100]": 13, "web[101]": 2, "db[102]": 4}
    assert procs["web[100]"].shared_outside == 20
    uids = {g.name: g for g in groups_bound(plan, HOST_KNOBS, "uid")}
    assert {n: (g.processes, g.bound.pages_sharing) for n, g in uids.items()} == {
        "1000": (2, 17), "2000": (1, 4)}
    # uid 1000's pages whose content uid 2000 holds: tag 1 (12), zero (5), 201 (2).
    assert uids["1000"].shared_outside == 19 and uids["2000"].shared_outside == 6
    comm = groups_bound(plan, HOST_KNOBS, "comm")
    assert [(g.name, g.processes, g.bound.pages) for g in comm] == [("web", 2, 31), ("db", 1, 8)]


def test_exposure_by_uid_and_cgroup(tmp_path: Path) -> None:
    """Across uids 1000 and 2000: tag 1 and 201 (zero-filled pages apart): 2 contents on
    15 + 3 = 18 pages; uid 1000 holds them on 12 + 2 pages, uid 2000 on 3 + 1.  Salting
    saves 17 + 4 = 21 pages instead of 25."""
    plan = load_plan(read_snapshot(forked(tmp_path)))
    for by in ("uid", "cgroup"):
        x = exposure(plan, HOST_KNOBS, by)
        assert (x.cross_contents, x.cross_pages, x.zero_cross_pages) == (2, 18, 7)
        assert len(x.pairs) == 1
        p = x.pairs[0]
        assert (p.contents, p.pages_a, p.pages_b) == (2, 14, 4)
        assert x.salted_saved_pages == 21 and x.together.saved_pages == 25
    with pytest.raises(ValueError, match="by: expected one of uid, cgroup"):
        exposure(plan, HOST_KNOBS, "comm")


def test_exposure_pairs_of_three_domains(tmp_path: Path) -> None:
    """Three uids: tag 1 held by all three (3 pairs), tag 2 by uids 1 and 3 only."""
    pfn = Pfns()
    procs = [Proc(10, [Page(1, pfn()), Page(2, pfn())], uid=1),
             Proc(11, [Page(1, pfn()), Page(1, pfn())], uid=2),
             Proc(12, [Page(1, pfn()), Page(2, pfn()), Page(2, pfn())], uid=3)]
    plan = load_plan(read_snapshot(write_snapshot(tmp_path / "s.parquet", procs,
                                                  knobs=HOST_KNOBS)))
    x = exposure(plan, HOST_KNOBS, "uid")
    got = {(p.a, p.b): (p.contents, p.pages_a, p.pages_b) for p in x.pairs}
    assert got == {("1", "2"): (1, 1, 2), ("1", "3"): (2, 2, 3), ("2", "3"): (1, 2, 1)}
    assert (x.cross_contents, x.cross_pages) == (2, 7)
    # Within each uid only uid 2 (tag 1 twice) and uid 3 (tag 2 twice) merge one page each.
    assert x.salted_saved_pages == 2 and x.together.saved_pages == 5


# --- the prediction -------------------------------------------------------------------------

@pytest.mark.parametrize(("engine", "extra", "sharing", "shared", "zero"), [
    ("sim", {}, 25, 5, 0), ("bulk", {}, 25, 5, 0),
    ("sim", {"use_zero_pages": "1"}, 19, 4, 7), ("bulk", {"use_zero_pages": "1"}, 19, 4, 7),
    ("sim", {"max_page_sharing": "4"}, 21, 9, 0), ("bulk", {"max_page_sharing": "4"}, 21, 9, 0),
])
def test_prediction_reaches_the_bound_without_rewrites(tmp_path: Path, engine: str,
                                                       extra: dict[str, str], sharing: int,
                                                       shared: int, zero: int) -> None:
    """With nothing rewritten, ksmd merges every mapping the static bound counts: the
    fork-shared frame of 201 and 300 joins the other copy's KSM page with both mappings
    (the kernel's "ksm page forked" case), 200/202/203 never merge."""
    e = run_estimate(read_snapshot(forked(tmp_path, knobs(**extra))), engine=engine)
    last = dict(zip(TIMELINE_COLUMNS, e.result.timeline[-1], strict=True))
    assert (last["pages_sharing"], last["pages_shared"], last["ksm_zero_pages"]) == (
        sharing, shared, zero)
    assert e.settled is True and e.result.backend == engine


def test_sim_and_bulk_give_the_same_timeline(tmp_path: Path) -> None:
    """Every counter at every sample, with fork-shared frames, zero pages, chains
    (max_page_sharing=4) and KSM pages of the capture (merged again before the start)."""
    pfn = Pfns()
    k = pfn()
    rng = np.random.default_rng(5)
    procs = []
    for pid in (1, 2, 3):
        pages = [Page(int(t), pfn()) for t in rng.integers(0, 40, 300)]
        pages += [Page(ZERO, pfn()) for _ in range(20)] + [Page(999, k, ksm=True)] * 3
        procs.append(Proc(pid, pages))
    procs.append(Proc(4, [Page(p.tag, p.pfn) for p in procs[0].pages[:100]]
                      + [Page(int(t), pfn()) for t in rng.integers(0, 40, 50)]))
    path = write_snapshot(tmp_path / "s.parquet", procs, knobs=knobs(max_page_sharing="4"))
    snap = read_snapshot(path)
    sim = run_estimate(snap, engine="sim", until_ns=3 * S)
    bulk = run_estimate(snap, engine="bulk", until_ns=3 * S)
    assert sim.result.timeline == bulk.result.timeline
    assert [c.counters for c in sim.result.checkpoints] == [c.counters for c in bulk.result.checkpoints]


def test_ksm_pages_of_the_capture_are_merged_at_the_start(tmp_path: Path) -> None:
    """Six mappings of one KSM page (three in each of two processes): at time 0 one KSM
    page with 5 sharing, as on the host; ksmd's CPU and full scans start from 0."""
    pfn = Pfns()
    k = pfn()
    procs = [Proc(1, [Page(7, k, ksm=True)] * 3 + [Page(8, pfn())]),
             Proc(2, [Page(7, k, ksm=True)] * 3 + [Page(9, pfn())])]
    for engine in ("sim", "bulk"):
        e = run_estimate(read_snapshot(write_snapshot(tmp_path / "k.parquet", procs,
                                                      knobs=HOST_KNOBS)), engine=engine,
                         until_ns=S)
        first = dict(zip(TIMELINE_COLUMNS, e.result.timeline[0], strict=True))
        assert (first["time_s"], first["pages_shared"], first["pages_sharing"]) == (0.0, 1, 5)
        assert (first["full_scans"], first["ksmd_cpu_s"]) == (0, 0.0)
        assert e.result.scenario.events[0].startswith("before the start: 6 pages")


def test_rewrite_rates_from_samples() -> None:
    """p = changes / compared (at most 1 - 1/(2 compared)); rate = -ln(1 - p) / interval."""
    rates = rewrite_rates(np.array([0, 1, 2, 4, 3], np.uint16), np.array([4, 4, 4, 4, 0], np.uint16),
                          2.0)
    assert rates[0] == 0 and rates[4] == 0  # no change seen; no comparison
    assert rates[1] == pytest.approx(-math.log(0.75) / 2)
    assert rates[2] == pytest.approx(math.log(2) / 2)
    assert rates[3] == pytest.approx(math.log(8) / 2)
    assert not rewrite_rates(np.array([1], np.uint16), np.array([1], np.uint16), 0.0).any()


def test_rewrite_schedule_follows_the_rates() -> None:
    """100 pages at ln 2 writes/s for 200 s: 13863 writes expected (Poisson, sd 118);
    the same seed gives the same writes, in time order, each page at most once per call."""
    rates = np.zeros(150)
    rates[:100] = math.log(2)
    counts = []
    for _ in range(2):
        sched = RewriteSchedule(rates, seed=3)
        got = [sched.due(t * 10_000_000) for t in range(1, 20_001)]
        assert all(len(np.unique(g)) == len(g) for g in got)
        assert all(g.max(initial=0) < 100 for g in got)
        counts.append(sum(len(g) for g in got))
    assert counts[0] == counts[1]
    # Several writes to one page inside one 10 ms step count once: a tiny loss (0.35 %).
    assert abs(counts[0] - 100 * 200 * math.log(2)) < 5 * math.sqrt(13863) + 0.01 * 13863


def test_rewritten_pages_run_the_same_on_both_engines(tmp_path: Path) -> None:
    """Rewrites hit the same pages at the same times on both engines; the unstable tree's
    model choice (docs/bulk.md) may differ once a page in it is rewritten, so the saving is
    compared within a page or two."""
    pfn = Pfns()
    procs = [Proc(pid, [Page(t, pfn(), changes=1 if t < 20 else 0, compared=3)
                        for t in range(200)]) for pid in (1, 2, 3)]
    snap = read_snapshot(write_snapshot(tmp_path / "r.parquet", procs, knobs=HOST_KNOBS,
                                        samples=4, interval_s=1.0))
    sim = run_estimate(snap, engine="sim", until_ns=20 * S)
    bulk = run_estimate(snap, engine="bulk", until_ns=20 * S)
    assert sim.rewrites == bulk.rewrites > 0
    i = TIMELINE_COLUMNS.index("pages_sharing")
    assert abs(sim.result.timeline[-1][i] - bulk.result.timeline[-1][i]) <= 2
    assert sim.result.scenario.activities[0].startswith("60 pages rewritten")


def test_snapshot_without_pfns_counts_every_page_as_its_own(tmp_path: Path) -> None:
    """Without PFNs (a capture without root) the fork-shared pages look like copies: 200, 202
    and 203 (two mappings each) now merge, one more sharing each; 201 and 300 merge all
    three mappings as before."""
    plan = load_plan(read_snapshot(forked(tmp_path, pfn_known=False)))
    b = plan_bound(plan, HOST_KNOBS)
    assert (b.frames, b.pages_sharing) == (39, 25 + 3)


def test_stop_gives_a_partial_result(tmp_path: Path) -> None:
    snap = read_snapshot(forked(tmp_path))
    e = run_estimate(snap, until_ns=3600 * S, stop=lambda: "SIGINT")
    assert e.result.interrupted == "SIGINT" and e.result.end_s < 3600


def test_knobs_come_from_the_snapshot_and_override(tmp_path: Path) -> None:
    snap = read_snapshot(forked(tmp_path, knobs(pages_to_scan="300", sleep_millisecs="50")))
    written, sources = resolve_knobs(snap, {"sleep_millisecs": 10, "use_zero_pages": True})
    assert (written["pages_to_scan"], written["sleep_millisecs"], written["use_zero_pages"]) == (
        "300", "10", "1")
    assert sources["pages_to_scan"] == "snapshot" and sources["sleep_millisecs"] == "--knob"
    assert "run" not in written
    e = run_estimate(snap, knobs={"pages_to_scan": 7}, until_ns=S)
    assert e.result.knobs["pages_to_scan"] == 7 and e.result.knobs["sleep_millisecs"] == 50
    assert e.result.knobs["run"] == 1


def test_no_ksm_at_capture_means_boot_knobs(tmp_path: Path) -> None:
    snap = read_snapshot(write_snapshot(tmp_path / "n.parquet", [Proc(1, [Page(1, 5)])],
                                        knobs=None))
    written, sources = resolve_knobs(snap, {})
    assert written["pages_to_scan"] == "100" and set(sources.values()) == {"boot"}


@pytest.mark.parametrize(("over", "message"), [
    ({"run": 1}, "--knob run: the estimate is of ksmd running"),
    ({"pages_to_scans": 5}, "--knob pages_to_scans: expected one of"),
    ({"pages_to_scan": -1}, "--knob pages_to_scan: expected an integer from"),
    ({"advisor_mode": "scan-time", "pages_to_scan": 5}, "the scan-time advisor sets"),
])
def test_bad_knobs_are_refused(tmp_path: Path, over: dict[str, object], message: str) -> None:
    snap = read_snapshot(forked(tmp_path))
    with pytest.raises(ValueError, match=message):
        resolve_knobs(snap, over)  # type: ignore[arg-type]


# --- the command ----------------------------------------------------------------------------

def test_json_document(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Schema ksmlab.estimate/1; its timeline has ksmlab.run/1's columns and rows form."""
    path = forked(tmp_path)
    assert main(["estimate", str(path), "--json", "--by", "uid", "--until", "2s"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema"] == "ksmlab.estimate/1" and RUN_SCHEMA == "ksmlab.run/1"
    assert doc["timeline"]["columns"] == list(TIMELINE_COLUMNS)
    rows = doc["timeline"]["rows"]
    assert rows[0][0] == 0 and rows[-1][0] == 2.0
    assert all(len(r) == len(TIMELINE_COLUMNS) for r in rows)
    assert all(isinstance(v, int) for r in rows for v in r[1:-1])
    assert doc["static"]["pages_sharing"] == 25 and doc["static"]["duplicate_pages"] == 28
    assert doc["exposure"]["cross_domain_contents"] == 2
    assert doc["exposure"]["merged_within_domains"]["saved_pages"] == 21
    assert doc["groups"]["by"] == "uid" and len(doc["processes"]) == 3
    assert doc["summary"]["gross"]["saved_pages"] == 25
    assert doc["knob_sources"]["pages_to_scan"] == "snapshot"
    assert doc["snapshot"]["fork_shared_pages"] == 5


def test_terminal_report_and_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = forked(tmp_path)
    png, html, csv = tmp_path / "e.png", tmp_path / "e.html", tmp_path / "e.csv"
    assert main(["estimate", str(path), "--by", "cgroup", "--plot", str(png), "--html", str(html),
                 "--timeline", str(csv)]) == 0
    out = capsys.readouterr().out
    assert "Static bound" in out and "100.0 KiB if every duplicate merged" in out
    assert "Per cgroup" in out and "Memory saved" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Static bound and prediction" in html.read_text()
    assert csv.read_text().splitlines()[0] == ",".join(TIMELINE_COLUMNS)


def test_cost_file_prices_ksmd(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--cost FILE` is the model's ksmd cost: with every term 0 but 1 ms per batch and a clock
    without delays, ksmd's CPU over 2 s is its batches: one at 0, then one every 24 ms (each
    ends 1 ms in; 20 ms = 5 jiffies at HZ=250 from there fires on the 6th tick), the last at
    83 x 24 = 1992 ms: 84 batches, 84 ms."""
    ns = dict.fromkeys(FEATURES, 0.0) | {"batch": 1e6}
    cost = tmp_path / "c.json"
    KsmdCost(ns, KsmdClock(hz=250)).save(cost)
    argv = ["estimate", str(forked(tmp_path)), "--json", "--until", "2s", "--cost", str(cost),
            "--knob", "sleep_millisecs=20"]
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["checkpoints"][-1]["ksmd_cpu_s"] == pytest.approx(0.084)
    assert main([*argv[:-4], "--cost", str(tmp_path / "none.json")]) == 2
    assert "ksmlab estimate: --cost: cannot read" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["--until", "soon"], "argument --until: expected"),
    (["--until", "0"], "argument --until: expected a duration > 0"),
    (["--knob", "nosuch=1"], "--knob nosuch: expected one of"),
    (["--knob", "max_page_sharing=1"], "--knob max_page_sharing: expected an integer from 2"),
    (["--plot", "x.gif"], "--plot: expected a file name ending in .png"),
    (["--by", "gid"], "argument --by: invalid choice"),
])
def test_bad_arguments_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                              argv: list[str], message: str) -> None:
    path = forked(tmp_path)
    assert main(["estimate", str(path), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_bad_files_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = forked(tmp_path).read_bytes()
    (tmp_path / "trunc.parquet").write_bytes(good[: len(good) // 2])
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all" * 10)
    for name, message in (("missing.parquet", "got no such file"),
                          ("trunc.parquet", "not a readable ksmlab snapshot"),
                          ("junk.parquet", "not a readable ksmlab snapshot")):
        assert main(["estimate", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.startswith("ksmlab estimate: ")
    assert main(["estimate", str(tmp_path)]) == 2
    assert "got a directory" in capsys.readouterr().err


def test_unreadable_file_says_why(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A snapshot is mode 0600: another user reading it gets the reason, not a traceback
    (simulated: the tests run as root, who reads any file)."""
    import ksmlab.snapshot.reader as reader

    def denied(path: object, **kw: object) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(reader, "read_snapshot", denied)
    assert main(["estimate", str(forked(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert "permission denied: a snapshot is readable by its owner only" in err


def test_help_lists_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["estimate", "--help"])
    out = capsys.readouterr().out
    for opt in ("--knob", "--until", "--sample", "--by", "--engine", "--seed", "--json",
                "--timeline", "--plot", "--html", "--progress"):
        assert opt in out


# --- transparent huge pages -----------------------------------------------------------------

HP = 512  # pages of a THP


def thp_snapshot(tmp: Path) -> Path:
    """Three processes, addresses from a 2 MiB boundary (the synthetic writer's):
    A (pid 1): extent 0 a THP of tags 0-511; extent 1 THP-flagged but page 1023 not (a
    partial extent: a THP mapped by PTEs); 7 small pages.  B (pid 2): extent 0 a THP of
    tags 0-511 too (merges with A's).  C (pid 3, A's fork child): extent 0 on A's frames
    of extent 0, THP-flagged (fork kept its PMD); extent 1 of its own, tags 5000+."""
    pfn = Pfns()
    a0 = [Page(t, pfn(), thp=True) for t in range(HP)]
    a1 = [Page(1000 + t, pfn(), thp=t < HP - 1) for t in range(HP)]
    a = a0 + a1 + [Page(2000 + t, pfn()) for t in range(7)]
    b = [Page(t, pfn(), thp=True) for t in range(HP)]
    c = [Page(x.tag, x.pfn, thp=True) for x in a0] + [Page(5000 + t, pfn(), thp=True)
                                                      for t in range(HP)]
    return write_snapshot(tmp / "thp.parquet", [Proc(1, a), Proc(2, b), Proc(3, c)],
                          knobs=knobs(pages_to_scan="5000", sleep_millisecs="0"))


def test_plan_takes_whole_flagged_extents_as_pmd_mapped(tmp_path: Path) -> None:
    plan = load_plan(read_snapshot(thp_snapshot(tmp_path)))
    assert plan.thp == 4 * HP + HP - 1  # A: 512 + 511, B: 512, C: 1024
    assert int(plan.pmd.sum()) == 4 * HP  # not A's partial extent
    assert not bool(plan.pmd[HP:2 * HP].any())


def test_layout_puts_each_thp_extent_on_a_2mib_boundary() -> None:
    """5 small pages, an extent, 2 small pages, an extent: the first extent moves to offset
    512 (a gap of 507), the 2 pages follow at 1024, the second extent moves to 1536 (510
    more); 2048 pages in all, a multiple of 512 so that mmap aligns the mapping."""
    pmd = np.zeros(5 + HP + 2 + HP, bool)
    pmd[5:5 + HP] = pmd[5 + HP + 2:] = True
    offsets, length, runs = _layout(AreaPlan(0, 0, pmd.size, True), pmd)
    assert offsets[:5].tolist() == list(range(5))
    assert (offsets[5], offsets[5 + HP], offsets[5 + HP + 2], offsets[-1]) == (512, 1024, 1536,
                                                                               2047)
    assert (length, runs) == (2048, [(512, HP), (1536, HP)])


def thp_work(m: Machine, scans: int) -> list[dict[str, int]]:
    """ksmd's pages, pte_pages and thp_splits in each of the next *scans* full scans."""
    return [{n: w[n] for n in ("pages", "pte_pages", "thp_splits")} for w in work(m, scans)]


def test_thp_extents_load_as_thps_on_the_bulk_engine(tmp_path: Path) -> None:
    """A's and B's extent 0 and C's extent 1 fault in as THPs (3), on 2 MiB boundaries;
    C's extent 0 maps A's THP by PMD, as fork left it (also on a 2 MiB boundary);
    A's partial extent loads as 512 small pages.  The first full scan reaches the 4 * 512
    pages of the three THPs (A's twice) by PMD: pte_pages are the other 512 + 7.  The
    second merges B's extent 0 into A's (the same 512 contents): A's and B's THPs split
    (2); A's extent 0 comes first (PMD: its pages find nothing yet), B's first page splits
    both, its other 511 are reached by PTE, and so are C's 512 pages of A's THP (its split
    took C's PMD too); C's own THP stays PMD-mapped (unique contents)."""
    m = load_machine(load_plan(read_snapshot(thp_snapshot(tmp_path))), "bulk",
                     {"pages_to_scan": "100000", "sleep_millisecs": "0"})
    k = m.kernel
    assert isinstance(k, BulkKernel)
    assert k.ksm.thps == 3
    assert int(m.plan.pmd.sum()) == 4 * HP
    assert bool((m.addr[m.plan.pmd][::HP] % (HP * 4096) == 0).all())
    first, second = thp_work(m, 2)
    assert first == {"pages": 5 * HP + 7, "pte_pages": HP + 7, "thp_splits": 0}
    assert second == {"pages": 5 * HP + 7, "pte_pages": (HP + 7) + (HP - 1) + HP,
                      "thp_splits": 2}


def test_thp_snapshot_loads_alike_on_both_engines(tmp_path: Path) -> None:
    """SimKernel, given the same calls (mmap, MADV_HUGEPAGE, writes), faults the same
    THPs and its ksmd counts the same work."""
    plan = load_plan(read_snapshot(thp_snapshot(tmp_path)))
    knobs = {"pages_to_scan": "100000", "sleep_millisecs": "0"}
    sim, bulk = (load_machine(plan, engine, knobs) for engine in ("sim", "bulk"))
    assert thp_work(sim, 3) == thp_work(bulk, 3)


def test_thp_snapshot_gives_the_same_timeline_on_both_engines(tmp_path: Path) -> None:
    snap = read_snapshot(thp_snapshot(tmp_path))
    sim = run_estimate(snap, engine="sim", until_ns=2 * S)
    bulk = run_estimate(snap, engine="bulk", until_ns=2 * S)
    assert sim.result.timeline == bulk.result.timeline
    notes = "; ".join(_notes(bulk))
    assert f"{4 * HP + HP - 1} pages were in transparent huge pages: {4 * HP} in whole" in notes
    assert f"{HP - 1} in partial extents" in notes
