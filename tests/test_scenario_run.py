# SPDX-License-Identifier: GPL-2.0-only
"""The scenario runner on the model: scheduling, content, activity, and counters by arithmetic.

Expected counter values come from ``docs/kernel-behaviour.md`` and
arithmetic shown next to each check, never from an earlier run:

* two identical new pages merge during the second full scan (spec 3.5,
  "Key consequences"), so after 2 full scans N distinct contents present in P
  processes give pages_shared = N and pages_sharing = N (P - 1);
* a KSM page has at most max_page_sharing mappings (chains of dups, spec 3.6;
  verified trace 2: 300 identical pages -> shared 2, sharing 298);
* with use_zero_pages, zero pages merge with the kernel zero page
  (ksm_zero_pages) after two visits (spec 3.9, verified trace 3);
* general_profit = (pages_sharing + ksm_zero_pages) x 4096 - rmap_items x 64 (spec 4).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from ksmlab.constants import PAGE_SIZE
from ksmlab.ksm.cost import default_cost
from ksmlab.report.document import to_document
from ksmlab.scenario.backends import SimBackend
from ksmlab.scenario.content import ZERO_PAGE, ContentSource
from ksmlab.scenario.loader import parse_scenario
from ksmlab.scenario.model import Content, Scenario
from ksmlab.scenario.result import RunResult
from ksmlab.scenario.runner import ProgressInfo, RunError, Runner, run_scenario

RMAP_ITEM_SIZE = 64  # spec 0: sizeof(struct ksm_rmap_item) on 64-bit
EXACT_CLOCK = default_cost().with_clock(hz=250, wake_delay_ns=0.0, late_fraction=0.0,
                                         run_stretch=1.0)
"""The shipped cost model at HZ=250 without scheduling delay, for exact times: ksmd then
wakes on the tick of its timer (ksmlab.ksm.jiffies).  sleep_millisecs = 10 is
msecs_to_jiffies(10) = ceil(10 / 4) = 3 jiffies, and the timer wheel's level 0 fires one
jiffy after: a batch that starts on a tick and runs under a jiffy is followed by the
next one 4 jiffies = 16 ms later."""


def scenario(text: str, tmp_path: Path | None = None) -> Scenario:
    """The scenario in *text*."""
    return parse_scenario(text, source="t.toml", base_dir=tmp_path or Path("."))


def run(text: str, tmp_path: Path | None = None, *, exact: bool = False) -> RunResult:
    """Run *text* on a fresh model (with :data:`EXACT_CLOCK` if *exact*)."""
    backend = SimBackend(cost=EXACT_CLOCK if exact else None)
    try:
        return run_scenario(scenario(text, tmp_path), backend)
    finally:
        backend.close()


def at(r: RunResult, name: str) -> dict[str, int]:
    """The counters of checkpoint *name*."""
    return next(c.counters for c in r.checkpoints if c.name == name)


FAST = """
[ksm]
pages_to_scan = 100000   # one batch is one full scan
sleep_millisecs = 10
"""


@pytest.mark.parametrize(("n", "p"), [(16, 2), (64, 4), (100, 7)])
def test_identical_pages_formula(n: int, p: int) -> None:
    """N distinct pages identical in P processes: shared N, sharing N(P-1) after 2 full scans."""
    r = run(FAST + f"""
[content.img]
kind = "image"
pages = {n}
[[process]]
name = "p"
count = {p}
[[process.mapping]]
pages = {n}
content = "img"
[[checkpoint]]
name = "merged"
full_scans = 2
""")
    c = at(r, "merged")
    assert (n, n * (p - 1), 0, 0) == (c["pages_shared"], c["pages_sharing"], c["pages_unshared"],
                                      c["pages_volatile"])
    assert n * (p - 1) * PAGE_SIZE - n * p * RMAP_ITEM_SIZE == c["general_profit"]
    assert {"alive": p, "ksm_merging_pages": n * p, "ksm_rmap_items": n * p,
            "ksm_zero_pages": 0,
            "ksm_process_profit": n * p * PAGE_SIZE - n * p * RMAP_ITEM_SIZE} == \
        r.checkpoints[0].processes["p"]
    assert r.ok


def test_one_scan_is_not_enough() -> None:
    """After one full scan new pages are only checksummed: all volatile, nothing shared (spec 3.5)."""
    r = run(FAST + """
[content.img]
kind = "image"
[[process]]
name = "p"
count = 2
[[process.mapping]]
pages = 10
content = "img"
[[checkpoint]]
name = "one"
full_scans = 1
""")
    c = at(r, "one")
    assert (c["pages_shared"], c["pages_sharing"], c["pages_volatile"]) == (0, 0, 20)


def test_fill_pages_form_chains_of_max_page_sharing() -> None:
    """300 identical pages: 2 KSM pages (a chain of 2 dups), 298 sharing (spec 7, trace 2)."""
    r = run("""
[ksm]
pages_to_scan = 100000
sleep_millisecs = 10
smart_scan = false
[content.a]
kind = "fill"
byte = 0x41
[[process]]
name = "p"
[[process.mapping]]
pages = 300
content = "a"
[[checkpoint]]
name = "merged"
full_scans = 2
""")
    c = at(r, "merged")
    got = (c["pages_shared"], c["pages_sharing"], c["stable_node_chains"], c["stable_node_dups"])
    assert got == (2, 298, 1, 2)


def test_zero_pages_with_use_zero_pages() -> None:
    """P x Z zero pages become KSM zero pages; nothing is shared (spec 3.9)."""
    r = run(FAST + """
use_zero_pages = true
[content.z]
kind = "zero"
[[process]]
name = "p"
count = 3
[[process.mapping]]
pages = 40
content = "z"
[[checkpoint]]
name = "merged"
full_scans = 2
""")
    c = at(r, "merged")
    assert (c["pages_shared"], c["pages_sharing"], c["ksm_zero_pages"]) == (0, 0, 120)


def test_random_pages_never_merge() -> None:
    """Unique pages stay unshared (in the unstable tree) and save nothing."""
    r = run(FAST + """
[content.r]
kind = "random"
[[process]]
name = "p"
count = 2
[[process.mapping]]
pages = 30
content = "r"
[[checkpoint]]
name = "two"
full_scans = 2
""")
    c = at(r, "two")
    assert (c["pages_shared"], c["pages_sharing"], c["pages_unshared"]) == (0, 0, 60)
    assert c["general_profit"] == -60 * RMAP_ITEM_SIZE


def test_write_activity_breaks_sharing_page_by_page() -> None:
    """10 writes/s to distinct pages for 2 s unshare exactly 20 of 50 merged pages.

    Process p[0] writes sequentially (pages 0, 1, ...) from 1 s to 3 s at 10
    pages per second with even arrivals: 20 writes, 20 distinct pages, each
    COW-broken and now unique.  The 30 untouched pages stay merged with p[1]'s
    (sharing 30); the 20 KSM pages p[0] left keep p[1] as their one mapping,
    so they still count in pages_shared (spec 4: a KSM page with >= 1 item):
    shared 50.
    """
    r = run(FAST + """
[content.img]
kind = "image"
[[process]]
name = "p"
count = 2
[[process.mapping]]
name = "m"
pages = 50
content = "img"
[[activity]]
process = "p[0]"
mapping = "m"
rate = 10
start = "1s"
stop = "3s"
pick = "sequential"
[[checkpoint]]
name = "end"
at = "5s"
""")
    c = at(r, "end")
    assert (c["pages_shared"], c["pages_sharing"]) == (50, 30)


def test_zero_writes_make_pages_mergeable_zero_pages() -> None:
    """data = "zero" writes whole zero pages: a written region becomes KSM zero pages."""
    r = run(FAST + """
use_zero_pages = true
[content.r]
kind = "random"
[[process]]
name = "p"
[[process.mapping]]
name = "m"
pages = 20
content = "r"
[[event]]
at = "1s"
action = "write"
process = "p"
mapping = "m"
region = { first_page = 5, pages = 8 }
data = "zero"
[[checkpoint]]
name = "end"
at = "2s"
""")
    assert at(r, "end")["ksm_zero_pages"] == 8


def test_fork_exit_madvise_prctl_and_knobs() -> None:
    """Life events change the counters as the spec says.

    Two processes a, b hold the same 32 pages: shared 32, sharing 32.
    * fork a -> c: c's mappings of the KSM pages are appended when ksmd
      visits them (spec 3.5 case K step 3): sharing 32 + 32 = 64;
    * c exits: its items go at the next pass: sharing back to 32;
    * b madvises UNMERGEABLE: b's pages are unmerged, and a is the one
      mapping left of each KSM page, which still counts as shared (spec 4):
      32, 0;
    * b madvises MERGEABLE again: merged again, 32, 32;
    * a turns prctl merge_any on then off: off unmerges a's whole address
      space (ksm_disable_merge_any), b is alone: 32, 0;
    * pages_to_scan = 0: full_scans stops.
    """
    r = run(FAST + """
[content.img]
kind = "image"
[[process]]
name = "a"
[[process.mapping]]
name = "m"
pages = 32
content = "img"
[[process]]
name = "b"
[[process.mapping]]
name = "m"
pages = 32
content = "img"
[[checkpoint]]
name = "merged"
at = "1s"
[[event]]
at = "1.2s"
action = "fork"
process = "a"
child = "c"
[[checkpoint]]
name = "forked"
at = "2s"
expect_process = { c = { ksm_merging_pages = 32 } }
[[event]]
at = "2.2s"
action = "exit"
process = "c"
[[checkpoint]]
name = "exited"
at = "3s"
[[event]]
at = "3.2s"
action = "madvise"
process = "b"
mapping = "m"
advice = "unmergeable"
[[checkpoint]]
name = "unmergeable"
at = "4s"
[[event]]
at = "4.2s"
action = "madvise"
process = "b"
mapping = "m"
advice = "mergeable"
[[checkpoint]]
name = "mergeable"
at = "5s"
[[event]]
at = "5.2s"
action = "prctl"
process = "a"
merge_any = true
[[event]]
at = "5.5s"
action = "prctl"
process = "a"
merge_any = false
[[checkpoint]]
name = "prctl off"
at = "6.5s"
[[event]]
at = "7s"
action = "knobs"
set = { pages_to_scan = 0 }
[[checkpoint]]
name = "stopped"
at = "7.5s"
[[checkpoint]]
name = "still stopped"
at = "9s"
""")
    pairs = {c.name: (c.counters["pages_shared"], c.counters["pages_sharing"])
             for c in r.checkpoints}
    assert {k: v for k, v in pairs.items() if "stopped" not in k} == \
        {"merged": (32, 32), "forked": (32, 64), "exited": (32, 32), "unmergeable": (32, 0),
            "mergeable": (32, 32), "prctl off": (32, 0)}
    assert r.checkpoints[1].processes["c"]["alive"] == 1
    assert r.checkpoints[2].processes["c"]["alive"] == 0
    assert at(r, "stopped")["full_scans"] == at(r, "still stopped")["full_scans"]
    assert r.ok, r.failures


def test_merge_any_process_needs_no_madvise() -> None:
    """A merge_any process's mappings are mergeable without madvise (prctl, spec 2.6)."""
    r = run(FAST + """
[content.img]
kind = "image"
[[process]]
name = "p"
count = 2
merge_any = true
[[process.mapping]]
pages = 8
content = "img"
mergeable = false
[[checkpoint]]
name = "merged"
full_scans = 2
""")
    assert (at(r, "merged")["pages_shared"], at(r, "merged")["pages_sharing"]) == (8, 8)


def test_process_starting_later() -> None:
    """A group with start = 2 s exists only from then on."""
    r = run(FAST + """
[content.img]
kind = "image"
[[process]]
name = "early"
[[process.mapping]]
pages = 8
content = "img"
[[process]]
name = "late"
start = "2s"
[[process.mapping]]
pages = 8
content = "img"
[[checkpoint]]
name = "alone"
at = "1s"
[[checkpoint]]
name = "both"
at = "3s"
""")
    assert at(r, "alone")["pages_shared"] == 0
    assert "late" not in r.checkpoints[0].processes
    assert (at(r, "both")["pages_shared"], at(r, "both")["pages_sharing"]) == (8, 8)


def test_failed_expectations_and_unreached_checkpoint() -> None:
    """A wrong expectation and a full-scan checkpoint that cannot be reached are failures."""
    r = run("""
[ksm]
run = 0                 # ksmd never runs
[content.img]
kind = "image"
[[process]]
name = "p"
[[process.mapping]]
pages = 4
content = "img"
[[checkpoint]]
name = "now"
at = "1s"
expect = { pages_shared = 4, general_profit = { min = "1KiB" } }
[[checkpoint]]
name = "never"
full_scans = 1
timeout = "5s"
""")
    assert not r.ok
    assert list(r.failures) == [
        "checkpoint 'now' at 1 s: expected pages_shared == 4, got 0",
        "checkpoint 'now' at 1 s: expected general_profit >= 1024, got 0",
        "checkpoint 'never': full_scans reached 0, not 1, by its timeout at 5 s",
    ]
    assert [c.reached for c in r.checkpoints] == [True, False]
    assert r.end_s == 5.0


def test_checkpoint_time_and_order() -> None:
    """Time checkpoints are recorded at their time, full-scan ones when reached, in time order."""
    r = run(FAST + """
[content.img]
kind = "image"
[[process]]
name = "p"
[[process.mapping]]
pages = 4
content = "img"
[[checkpoint]]
name = "late"
at = "1s"
[[checkpoint]]
name = "three scans"
full_scans = 3
""", exact=True)
    assert [c.name for c in r.checkpoints] == ["three scans", "late"]
    first = r.checkpoints[0]
    assert first.counters["full_scans"] == 3
    # One batch is one full scan; the first runs at 0, then one every 16 ms (EXACT_CLOCK):
    # the third starts at 32 ms and ends after its CPU time (4 pages: well under 1 ms).
    assert 0.032 < first.time_s < 0.033
    assert r.checkpoints[1].time_s == 1.0


def test_timeline_samples_every_interval() -> None:
    """The timeline has a row at 0, every interval, and the end."""
    r = run(FAST + """
[scenario]
duration = "2s"
[timeline]
interval = "250ms"
[content.img]
kind = "image"
[[process]]
name = "p"
[[process.mapping]]
pages = 4
content = "img"
[[checkpoint]]
at = "2s"
""")
    assert [i * 0.25 for i in range(9)] == [row[0] for row in r.timeline]


def test_runs_repeat_exactly() -> None:
    """Two runs of one scenario give the same document; another seed gives other content."""
    text = FAST + """
[scenario]
seed = 11
[content.img]
kind = "image"
zero_fraction = 0.3
private_fraction = 0.3
[[process]]
name = "p"
count = 3
[[process.mapping]]
name = "m"
pages = 64
content = "img"
[[activity]]
process = "p"
mapping = "m"
rate = 20
arrivals = "poisson"
[[checkpoint]]
at = "2s"
"""
    assert to_document(run(text)) == to_document(run(text))
    other = to_document(run(text.replace("seed = 11", "seed = 12")))
    assert other["checkpoints"] != to_document(run(text))["checkpoints"]


def test_progress_reports() -> None:
    """The progress callback sees time advance to the planned end and the full scans."""
    seen: list[ProgressInfo] = []
    backend = SimBackend(cost=EXACT_CLOCK)
    run_scenario(scenario(FAST + """
[content.img]
kind = "image"
[[process]]
name = "p"
[[process.mapping]]
pages = 4
content = "img"
[[checkpoint]]
at = "1s"
"""), backend, seen.append)
    assert seen
    assert seen[-1].planned_end_s == 1.0
    assert seen[-1].now_s >= 1.0
    # A full scan per batch, at 0, 16, ..., 992 ms (EXACT_CLOCK): 63 by 1 s.
    assert seen[-1].full_scans == 63
    assert (seen[-1].checkpoints_done, seen[-1].checkpoints_total) == (1, 1)


# --- stopping early (Ctrl-C) -------------------------------------------------------------------

STOPPABLE = FAST + """
[scenario]
duration = "1h"
[content.img]
kind = "image"
[[process]]
name = "p"
count = 3
[[process.mapping]]
pages = 16
content = "img"
[[activity]]
process = "p[0]"
mapping = "mem"
rate = 50
[[checkpoint]]
at = "1s"
[[checkpoint]]
at = "2s"
[[checkpoint]]
full_scans = 1000000
[[checkpoint]]
at = "1h"
"""


@pytest.mark.parametrize("engine", ["sim", "bulk"])
def test_a_stop_check_that_never_fires_changes_nothing(engine: str) -> None:
    """Asked at safe points, the clock advancing in steps: the same document as in one go."""
    from ksmlab.scenario.backends import open_backend

    sc = scenario(BUILTIN_LIKE)
    docs = []
    for stop in (None, lambda: None):
        backend = open_backend(engine)
        try:
            docs.append(to_document(run_scenario(sc, backend, None, stop)))
        finally:
            backend.close()
    assert docs[0] == docs[1]
    assert docs[0]["partial"] is False


BUILTIN_LIKE = """
[scenario]
seed = 5
duration = "20s"
[content.img]
kind = "image"
zero_fraction = 0.25
private_fraction = 0.2
[[process]]
name = "guest"
count = 4
[[process.mapping]]
name = "ram"
pages = 512
content = "img"
[[activity]]
process = "guest"
mapping = "ram"
region = { first_page = 0, pages = 64 }
rate = 20
[[checkpoint]]
full_scans = 2
[[checkpoint]]
at = "20s"
"""


def test_stop_after_checkpoints_keeps_them_and_ends_there() -> None:
    """A stop after the second checkpoint: the run ends at once, with those two, marked partial."""
    sc = scenario(STOPPABLE)
    backend = SimBackend()
    runner = Runner(sc, backend, stop=lambda: "test" if len(runner.checkpoints) >= 2 else None)
    try:
        r = runner.run()
    finally:
        backend.close()
    assert (r.interrupted, r.partial, r.ok) == ("test", True, False)
    assert [c.name for c in r.checkpoints] == ["1 s", "2 s"]
    # The stop is asked before the clock moves on from the checkpoint at 2 s.
    assert r.end_s == 2.0
    assert r.timeline[-1][0] == 2.0
    assert all(row[0] <= 2.0 for row in r.timeline)
    assert r.failures == ()  # the unreached full-scan checkpoint is not a failure


def test_stop_while_setting_up_measures_nothing() -> None:
    """A stop between the processes of a group: no clock, no checkpoint, no sample."""
    sc = scenario(STOPPABLE)
    backend = SimBackend()
    try:
        spawned = []
        orig = backend.kernel.spawn

        def spawn() -> object:
            spawned.append(1)
            return orig()
        backend.kernel.spawn = spawn  # type: ignore[method-assign]
        r = run_scenario(sc, backend, stop=lambda: "SIGTERM" if spawned else None)
    finally:
        backend.close()
    assert len(spawned) == 1  # asked before the second process was spawned
    assert (r.interrupted, r.checkpoints, r.timeline) == ("SIGTERM", (), ())


def test_stop_before_the_start_builds_nothing() -> None:
    """A stop already asked for when the run begins: no knob written, no process."""
    backend = SimBackend()
    try:
        r = run_scenario(scenario(STOPPABLE), backend, stop=lambda: "SIGINT")
        assert backend.sim.sysfs["pages_to_scan"] == "100"  # the boot value: [ksm] not written
        assert r.knobs == {} and r.end_s == 0.0
    finally:
        backend.close()


def test_kernel_error_stops_the_run() -> None:
    """A kernel call that fails ends the run with when and what."""
    sc = scenario(FAST + """
[content.img]
kind = "image"
[[process]]
name = "p"
[[process.mapping]]
pages = 4
content = "img"
[[event]]
at = "1s"
action = "madvise"
process = "p"
mapping = "m"
advice = "mergeable"
[[checkpoint]]
at = "2s"
""".replace('mapping = "m"', 'mapping = "mem"'))
    backend = SimBackend()
    runner = Runner(sc, backend)
    runner._setup()
    inst = runner.groups["p"][0]
    assert inst.proc is not None
    inst.proc.munmap(inst.addrs["mem"], 4 * PAGE_SIZE)  # pull the mapping away under the runner
    with pytest.raises(RunError, match=r"^at 1 s, event\[0\] madvise p mem mergeable: \[Errno 12\]"):
        runner._loop()


# --- content ---------------------------------------------------------------------------------

def test_image_content_is_shared_and_seeded() -> None:
    """An image's page i is the same in every instance and every run; seeds change it."""
    c = Content("img", "image", seed=5, pages=4)
    src = ContentSource()
    a = src.build(c, 8, "p[0].m")
    b = ContentSource().build(c, 8, "p[1].m")
    assert a == b
    assert a[:4 * PAGE_SIZE] == a[4 * PAGE_SIZE:]  # 8 pages of a 4-page image wrap around
    assert len({a[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] for i in range(4)}) == 4
    assert a != ContentSource().build(Content("img", "image", seed=6, pages=4), 8, "p[0].m")


def test_fractions_are_per_instance() -> None:
    """zero/private fractions pick different pages in each instance, in about those shares."""
    c = Content("img", "image", seed=1, zero_fraction=0.25, private_fraction=0.25)
    src = ContentSource()
    pages = 2000
    data = [src.build(c, pages, f"p[{i}].m") for i in range(2)]
    base = [src.base_page(c, i) for i in range(pages)]
    for d in data:
        split = [d[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] for i in range(pages)]
        zero = sum(p == ZERO_PAGE for p in split)
        own = sum(p != ZERO_PAGE and p != base[i] for i, p in enumerate(split))
        # Binomial(2000, 0.25): standard deviation 19.4; 6 sigma is 116.
        assert abs(zero - 500) < 116
        assert abs(own - 500) < 116
    assert data[0] != data[1]


def test_file_content_page_by_page(tmp_path: Path) -> None:
    """A file's pages in order (last one zero-padded), then pages of the file at seeded offsets."""
    rng = random.Random(0)
    blob = rng.randbytes(3 * PAGE_SIZE + 100)
    f = tmp_path / "disk.img"
    f.write_bytes(blob)
    c = Content("f", "file", seed=9, path=f)
    with ContentSource() as src:
        data = src.build(c, 12, "p[0].m")
    pages = [data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] for i in range(12)]
    file_pages = [blob[i * PAGE_SIZE:(i + 1) * PAGE_SIZE].ljust(PAGE_SIZE, b"\0") for i in range(4)]
    assert file_pages == pages[:4]
    assert all(p in file_pages for p in pages[4:])
    with ContentSource() as src:
        assert data == src.build(c, 12, "p[1].m")  # no fractions: identical in every instance
    c_off = Content("f", "file", seed=9, path=f, offset=2)
    with ContentSource() as src:
        assert file_pages[2] == src.build(c_off, 1, "x")


def test_file_content_runs(tmp_path: Path) -> None:
    """Two processes holding the same 5-page file share 5 KSM pages."""
    (tmp_path / "lib.so").write_bytes(random.Random(3).randbytes(5 * PAGE_SIZE))
    r = run(FAST + """
[content.lib]
kind = "file"
path = "lib.so"
[[process]]
name = "p"
count = 2
[[process.mapping]]
pages = 5
content = "lib"
[[checkpoint]]
name = "merged"
full_scans = 2
""", tmp_path)
    assert (at(r, "merged")["pages_shared"], at(r, "merged")["pages_sharing"]) == (5, 5)
