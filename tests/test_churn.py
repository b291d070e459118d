"""Churn at scale: many page writes applied as one array step (``BulkKernel.write_pages``)
leave the state that writing them one by one leaves.

The one-by-one path is ``BulkProcess.write_contents`` of one page, itself
checked against SimKernel by tests/test_bulk.py; the whole state is compared
with ``canonical`` (which also runs the engine's invariant check, counters
included), plus each page's content.
"""

from __future__ import annotations

import errno
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bulk_programs import canonical
from ksmlab import MADV_MERGEABLE, PAGE_SIZE
from ksmlab.bulk import BulkKernel
from ksmlab.bulk.content import NEW_CONTENT
from ksmlab.report.document import to_document
from ksmlab.scenario.backends import BulkBackend, SimBackend
from ksmlab.scenario.loader import ScenarioError, parse_scenario
from ksmlab.scenario.runner import Runner, run_scenario

Write = tuple[int, int, int]
"""(process number, page index, content tag) of one write."""


def machine(r: random.Random, seed: int) -> tuple[BulkKernel, list[int], list[int], int]:
    """A machine with merged pages, KSM zero pages and forked (shared) pages.

    Returns the kernel, the pids, each process's mapping address, and its pages.
    """
    k = BulkKernel(seed=seed)
    k.sysfs["pages_to_scan"] = "1000"
    k.sysfs["sleep_millisecs"] = "0"
    k.sysfs["max_page_sharing"] = r.choice(["2", "3", "256"])
    k.sysfs["use_zero_pages"] = r.choice("01")
    n = r.randint(4, 40)
    base = k.contents.fresh(4)
    tags = np.concatenate([base, [0]])  # a few contents and the zero page: many duplicates
    parent = k.spawn()
    a = parent.mmap(n * PAGE_SIZE)
    parent.write_contents(a, [int(r.choice(tags)) for _ in range(n)])
    parent.madvise(a, n * PAGE_SIZE, MADV_MERGEABLE)
    other = k.spawn()
    b = other.mmap(n * PAGE_SIZE)
    other.write_contents(b, [int(r.choice(tags)) for _ in range(n)])
    other.madvise(b, n * PAGE_SIZE, MADV_MERGEABLE)
    k.sysfs["run"] = "1"
    k.wait_full_scans(r.choice([0, 1, 2, 3]) if seed % 3 else 0)
    if seed % 3:  # else every ordinary frame is its own: the common case of churn
        child = parent.fork()  # ordinary frames mapped twice, KSM pages by one more
        if r.random() < 0.5:
            child.fork()  # and three times
    procs = list(k.processes.values())
    return k, [p.pid for p in procs], [a if p is not other else b for p in procs], n


def writes(r: random.Random, nprocs: int, pages: int, count: int,
           distinct: bool = False) -> list[Write]:
    """Random writes, often to the same few pages (repeats, both sides of a fork), or
    each to a page of its own (*distinct*)."""
    hot = [(r.randrange(nprocs), r.randrange(pages)) for _ in range(3)]
    spots = r.sample([(p, i) for p in range(nprocs) for i in range(pages)],
                     min(count, nprocs * pages))
    out = []
    for n in range(len(spots) if distinct else count):
        p, i = spots[n] if distinct else (
            r.choice(hot) if r.random() < 0.4 else (r.randrange(nprocs), r.randrange(pages)))
        # -1: new random data; 0: zero; 1, 2: shared contents; 3: a fresh id; 4: the content
        # another page holds (unique ones too)
        out.append((p, i, r.choice([-1, -1, -1, 0, 1, 2, 3, 4])))
    return out


def snapshot(k: BulkKernel) -> object:
    contents = sorted((p.pid, tuple(x if x is not None else -1
                                    for x in p.content_ids(p.mm.segments[0].addr,
                                                           p.mm.segments[0].pages * PAGE_SIZE)))
                      for p in k.processes.values())
    n = len(k.contents)
    table = (n, k.contents.checksum[:n].tolist(), k.contents.unique[:n].tolist())
    return canonical(k), contents, k.cow_ksm, table


@pytest.mark.parametrize("seed", range(80))
def test_write_pages_equals_writes_one_by_one(seed: int) -> None:
    """The same writes, one by one and as one step (write_pages, or write_contents of a
    run of pages), leave identical machines (contents, their checksums and which are
    unique included); and ksmd's next scans find identical machines too."""
    one, vec = (machine(random.Random(seed), seed) for _ in range(2))
    k1, pids, addrs, pages = one
    k2 = vec[0]
    assert snapshot(k1) == snapshot(k2)
    r = random.Random(1000 + seed)
    for _ in range(3):
        ws = writes(r, len(pids), pages, r.randint(1, 60), distinct=seed % 3 == 0)
        cids = []
        for _p, _i, t in ws:
            if t == 3:
                cid = int(k1.contents.fresh(1)[0])
                assert cid == int(k2.contents.fresh(1)[0])
            elif t == 4:  # before the writes: both machines hold the same ids there
                q = k1.processes[pids[r.randrange(len(pids))]]
                cid = q.content_ids(q.mm.segments[0].addr + r.randrange(pages) * PAGE_SIZE,
                                    PAGE_SIZE)[0] or 0
            else:
                cid = NEW_CONTENT if t < 0 else t
            cids.append(cid)
        for (p, i, _t), cid in zip(ws, cids, strict=True):
            k1.processes[pids[p]].write_contents(addrs[p] + i * PAGE_SIZE, [cid])
        k2.write_pages([pids[p] for p, _i, _t in ws],
                       np.array([addrs[p] + i * PAGE_SIZE for p, i, _t in ws]), cids)
        assert snapshot(k1) == snapshot(k2)
        # A run of pages of one process: one write_contents, and page by page.
        p = r.randrange(len(pids))
        i = r.randrange(pages)
        run = [r.choice([NEW_CONTENT, NEW_CONTENT, 0, 1]) for _ in range(r.randint(1, pages - i))]
        k1.processes[pids[p]].write_contents(addrs[p] + i * PAGE_SIZE, run)
        for j, cid in enumerate(run):
            k2.processes[pids[p]].write_contents(addrs[p] + (i + j) * PAGE_SIZE, [cid])
        assert snapshot(k1) == snapshot(k2)
        for k in (k1, k2):
            k.ksmd.batch()
        assert snapshot(k1) == snapshot(k2)


def test_fork_shared_frame_is_copied_then_written_in_place() -> None:
    """A page mapped by parent, child and grandchild (mapcount 3), written by all three in
    one step: the first two writers get copies, the third writes the frame in place, as
    three single writes would (2 new frames, the old one kept by the last writer)."""
    k = BulkKernel()
    p = k.spawn()
    a = p.mmap(PAGE_SIZE)
    p.write_contents(a, [0])
    c = p.fork()
    g = c.fork()
    frame = int(k.ksm.pages.frame[p.mm.segments[0].row])
    before = k.ksm.frames.n
    new = k.contents.fresh(3).tolist()
    k.write_pages([g.pid, p.pid, c.pid], [a, a, a], new)
    assert k.ksm.frames.n == before + 2
    assert int(k.ksm.pages.frame[c.mm.segments[0].row]) == frame  # the last writer's, in place
    assert [x.content_ids(a, PAGE_SIZE) for x in (g, p, c)] == [[new[0]], [new[1]], [new[2]]]
    assert int(k.ksm.frames.mapcount[frame]) == 1


def test_write_pages_checks_before_writing() -> None:
    k = BulkKernel()
    p = k.spawn()
    a = p.mmap(2 * PAGE_SIZE)
    p.write_contents(a, [0, 0])
    before = canonical(k)
    cases: list[tuple[object, object, object, type[Exception], str]] = [
        ([p.pid], [a], ["x"], TypeError, "cids"),
        ([p.pid], [a, a], [0], ValueError, "one length"),
        ([p.pid], [a + 1], [0], ValueError, "page-aligned"),
        ([p.pid + 7], [a], [0], ValueError, "live processes"),
        ([p.pid], [a], [len(k.contents)], ValueError, "content ids"),
        (np.zeros((1, 1), np.int64), [a], [0], TypeError, "pids"),
    ]
    for pids, addrs, cids, exc, text in cases:
        with pytest.raises(exc, match=text):
            k.write_pages(pids, addrs, cids)  # type: ignore[arg-type]
    with pytest.raises(OSError) as info:
        k.write_pages([p.pid, p.pid], [a, a + 2 * PAGE_SIZE], [0, 0])
    assert info.value.errno == errno.EFAULT
    assert canonical(k) == before


def test_new_random_data_keeps_a_pages_own_content_id() -> None:
    """A page rewritten with new random data again and again keeps one content id (its
    checksum changes each time, as a new content's would); a page that shares its frame
    (fork) gets a fresh one; an id written to a second page is no longer reused."""
    k = BulkKernel()
    p = k.spawn()
    a = p.mmap(2 * PAGE_SIZE)
    p.write_contents(a, [0, 0])
    n = len(k.contents)
    p.write_contents(a, [NEW_CONTENT])
    x = p.content_ids(a, PAGE_SIZE)[0]
    assert x == n and len(k.contents) == n + 1  # the first: a fresh content
    sums = {int(k.contents.checksum[x])}
    for _ in range(20):
        k.write_pages([p.pid] * 5, [a] * 5, [NEW_CONTENT] * 5)
        sums.add(int(k.contents.checksum[x]))
    assert p.content_ids(a, PAGE_SIZE) == [x] and len(k.contents) == n + 1
    assert len(sums) == 21  # 21 draws of 32 bits: equal ones have odds of about 2**-24
    c = p.fork()  # the frame is mapped twice: the parent's write copies it
    p.write_contents(a, [NEW_CONTENT])
    assert p.content_ids(a, PAGE_SIZE) == [n + 1] and c.content_ids(a, PAGE_SIZE) == [x]
    c.write_contents(a, [NEW_CONTENT])  # the child's frame is its own now: x changes in place
    assert c.content_ids(a, PAGE_SIZE) == [x] and len(k.contents) == n + 2
    p.write_contents(a + PAGE_SIZE, [x])  # x is held by two frames from now on
    c.write_contents(a, [NEW_CONTENT])
    assert c.content_ids(a, PAGE_SIZE) == [n + 2] and p.content_ids(a + PAGE_SIZE, PAGE_SIZE) == [x]


# --- write activities in a scenario ---------------------------------------------------------

CHURN = """
[scenario]
name = "churn"
seed = 7
duration = "6s"
[ksm]
pages_to_scan = 300
sleep_millisecs = 10
use_zero_pages = true
[content.img]
kind = "image"
pages = 96
zero_fraction = 0.2
private_fraction = 0.2
[[process]]
name = "p"
count = 3
[[process.mapping]]
name = "m"
pages = 128
content = "img"
[[event]]
at = "1s"
action = "fork"
process = "p[0:2]"
child = "c"
[[activity]]
process = "p"
mapping = "m"
rate = "40%/s"
arrivals = "poisson"
[[activity]]
process = "c"
mapping = "m"
region = { first_page = 0, pages = 32 }
rate = 50
pick = "sequential"
data = "zero"
start = "1s"
[[activity]]
process = "p[2]"
mapping = "m"
rate = "5%/s"
bytes = 200
start = "2s"
stop = "5s"
[[event]]
at = "3s"
action = "write"
process = "c"
mapping = "m"
region = { first_page = 64, pages = 16 }
[[event]]
at = "4s"
action = "exit"
process = "c[0]"
[[checkpoint]]
at = "2s"
[[checkpoint]]
at = "6s"
[timeline]
interval = "100ms"
"""
"""Writes of random data and zeroes, to pages of their own, to pages shared by fork and to
KSM pages (and the KSM zero page), even and Poisson arrivals, random and sequential pages,
rates per second and as a share of the region, a write event and an exit mid-churn."""


class OneAtATime(Runner):
    """The runner, but writes due at different times are applied one time at a time, each
    after everything ksmd does before it: what the runner did before batches."""

    def _churn(self, limit_ns: int) -> None:
        nt = self.churn.next_ns()
        assert nt is not None
        self._write_batch(self.churn.take(min(limit_ns, nt + 1)))


def churn_doc(runner: type[Runner], backend: SimBackend | BulkBackend,
              text: str = CHURN) -> tuple[dict[str, Any], Any]:
    sc = parse_scenario(text, source="<test>", base_dir=Path("."))
    doc = to_document(runner(sc, backend).run())
    assert isinstance(doc, dict)
    state = canonical(backend.bulk) if isinstance(backend, BulkBackend) else None
    return doc, state


@pytest.mark.parametrize("backend", ["sim", "fingerprint", "bulk"])
def test_batches_of_writes_equal_writes_at_their_times(backend: str) -> None:
    """Writes taken in batches (up to ksmd's next batch) give the same run as writes
    applied at their own times, one time after another."""
    def make() -> SimBackend | BulkBackend:
        return BulkBackend() if backend == "bulk" else SimBackend(
            "bytes" if backend == "sim" else "fingerprint")
    got, got_state = churn_doc(Runner, make())
    want, want_state = churn_doc(OneAtATime, make())
    assert got == want
    assert got_state == want_state
    assert len(got["timeline"]["rows"]) > 50


@pytest.mark.parametrize("text", [CHURN, CHURN.replace("bytes = 200", "bytes = 3")],
                         ids=["fresh", "named by their bytes"])
def test_bulk_writes_in_one_step_equal_one_by_one(text: str) -> None:
    """On the bulk engine, each batch as one array step and write by write give the same
    run and the same machine at the end (whole state); with writes of fewer than 8 bytes
    (named by their bytes) both go write by write."""
    got, got_state = churn_doc(Runner, BulkBackend(), text)
    want, want_state = churn_doc(Runner, BulkBackend(vectorize_writes=False), text)
    assert got == want
    assert got_state == want_state


EQUAL_TO_SIM = """
[scenario]
name = "churn that SimKernel's tree walk cannot tell apart"
seed = 5
duration = "10s"
[ksm]
pages_to_scan = 100
sleep_millisecs = 10
smart_scan = false
[content.img]
kind = "image"
pages = 64
[[process]]
name = "p"
count = 4
[[process.mapping]]
name = "m"
pages = 64
content = "img"
[[activity]]
process = "p[0]"
mapping = "m"
rate = "50%/s"
pick = "sequential"
start = "2s"
stop = "4s"
[[activity]]
process = "p[1]"
mapping = "m"
rate = "100%/s"
arrivals = "poisson"
start = "2s"
stop = "6s"
[[checkpoint]]
name = "merged"
at = "1.9s"
expect = { pages_shared = 64, pages_sharing = 192, pages_unshared = 0 }
[[checkpoint]]
name = "end"
at = "10s"
expect = { pages_shared = 64, pages_volatile = 0, pages_unshared = { min = 64 } }
expect_process = { "p[0]" = { ksm_merging_pages = 0 }, "p[2:4]" = { ksm_merging_pages = 128 } }
"""
"""4 x 64 pages of one image: 64 KSM pages of 4 mappings by 1.9 s (a full scan is 256
pages, 3 batches of 100 every 10 ms).  p[0] then rewrites its 64 pages in turn (50%/s:
32 writes/s for 2 s, 64 writes) and p[1] random ones of its pages (64/s for 4 s): all
become unique.  p[2] and p[3] never write, so each KSM page keeps 2 mappings (64 shared
at the end, none stale) and every unique page is alone in the trees: the kernel's
unstable tree, which p[1]'s rewrites disorder, can only answer "no match", as the bulk
engine's index does.  At the end (4 s after the last write; smart scan off, so no page
unchanged for long is skipped, and counted volatile) nothing is volatile, p[0]'s 64
pages are unshared, and 256 - 64 shared = sharing + unshared."""


def _model_doc(sc: Any, backend: SimBackend | BulkBackend) -> dict[str, Any]:
    """The run's document without what names the machine (and the advisor's knobs, which
    the bulk engine does not have)."""
    doc = to_document(run_scenario(sc, backend))
    assert isinstance(doc, dict)
    doc.pop("backend")
    doc.pop("machine")
    doc["knobs"] = {k: v for k, v in doc["knobs"].items() if not k.startswith("advisor")}
    return doc


@pytest.mark.parametrize("smart_scan", ["false", "true"])
def test_churn_equals_simkernel_in_both_content_modes(smart_scan: str) -> None:
    """Every checkpoint and sample equal SimKernel's; with smart scan off the counters are
    those the arithmetic above gives (on, pages unchanged for long are skipped and count
    as volatile: the runs still agree)."""
    text = EQUAL_TO_SIM.replace("smart_scan = false", f"smart_scan = {smart_scan}")
    sc = parse_scenario(text, source="<test>", base_dir=Path("."))
    bulk = _model_doc(sc, BulkBackend())
    assert bulk == _model_doc(sc, SimBackend("bytes"))
    assert bulk == _model_doc(sc, SimBackend("fingerprint"))
    if smart_scan == "false":
        assert bulk["ok"], bulk["failures"]
        end = bulk["checkpoints"][-1]["counters"]
        assert end["pages_sharing"] + end["pages_unshared"] == 256 - 64


# --- rates as a share of the region ---------------------------------------------------------

RATE = """
[content.c]
kind = "image"
[[process]]
name = "p"
[[process.mapping]]
name = "m"
pages = 512
content = "c"
[[activity]]
process = "p"
mapping = "m"
REGION
rate = RATE
[[checkpoint]]
at = "1s"
"""


def rate_scenario(rate: str, region: str = "") -> Any:
    text = RATE.replace("RATE", rate).replace("REGION", region)
    return parse_scenario(text, source="r.toml", base_dir=Path("."))


@pytest.mark.parametrize(("rate", "region", "per_s", "share"), [
    ('"10%/s"', "", 51.2, 0.1),  # 10% of 512 pages
    ('"10%/s"', "region = { first_page = 12, pages = 100 }", 10.0, 0.1),  # of the region
    ('"30 %/min"', "", 512 * 0.3 / 60, 0.3 / 60),
    ('"3.6%/h"', "", 512 * 0.036 / 3600, 0.036 / 3600),
    ("7.5", "", 7.5, None),
])
def test_rate_as_a_share_of_the_region(rate: str, region: str, per_s: float,
                                       share: float | None) -> None:
    a = rate_scenario(rate, region).activities[0]
    assert a.rate == pytest.approx(per_s)
    assert a.share == (None if share is None else pytest.approx(share))


@pytest.mark.parametrize(("rate", "message"), [
    ('"10%"', 'r.toml: activity[0].rate: expected a share of the region per second such as '
              '"10%/s" (or "%/min", "%/h"), or a number of writes per second, got "10%"'),
    ('"ten %/s"', 'expected a share of the region per second such as "10%/s"'),
    ('"0%/s"', 'expected a finite share > 0 of the region per second such as "10%/s"'),
    ('"1e400%/s"', 'expected a finite share > 0 of the region'),
    ('"1e9%/s"', "r.toml: activity[0].rate: expected a rate from 1e-09 to 1e+09 writes per "
                 "second (the clock counts nanoseconds), got \"1e9%/s\" of 512 pages, "
                 "5.12e+09 writes per second"),
    ('"1e-10%/h"', "expected a rate from 1e-09 to 1e+09 writes per second"),
    ("0", "r.toml: activity[0].rate: expected a number > 0, got 0"),
])
def test_bad_rates_are_refused_naming_the_field(rate: str, message: str) -> None:
    with pytest.raises(ScenarioError) as info:
        rate_scenario(rate)
    assert message in str(info.value)


ON_LINUX = """
[scenario]
name = "churn on the real kernel"
seed = 3
duration = "4s"
[ksm]
pages_to_scan = 1000
sleep_millisecs = 10
[content.img]
kind = "image"
pages = 32
[[process]]
name = "p"
count = 2
[[process.mapping]]
name = "m"
pages = 64
content = "img"
[[activity]]
process = "p[0]"
mapping = "m"
region = { first_page = 0, pages = 32 }
rate = "100%/s"
pick = "sequential"
start = "2s"
stop = "3s"
[[event]]
at = "2.5s"
action = "write"
process = "p[1]"
mapping = "m"
region = { first_page = 48, pages = 16 }
data = "zero"
[[checkpoint]]
name = "merged"
at = "1.9s"
expect_process = { p = { ksm_merging_pages = 128 } }
[[checkpoint]]
name = "written"
at = "4s"
expect_process = { "p[0]" = { ksm_merging_pages = 32 }, "p[1]" = { ksm_merging_pages = 64 } }
"""
"""Two processes of 64 pages, pages i and i + 32 both image page i: 32 KSM pages of 4
mappings, 128 merging pages, by 1.9 s.  p[0] then rewrites its pages 0..31 with random
bytes (32 writes a second for one second, in turn: every one of them), which unmerges
them; p[1]'s pages 48..63 are zeroed (once, at 2.5 s).  Every image page keeps at least
2 mappings (p[0]'s page i + 32 and p[1]'s page i), so by 4 s p[0] has its 32 pages
32..63 merged, and p[1] its 48 pages 0..47 plus its 16 zero pages, merged into one KSM
page (use_zero_pages is off): 64."""


@pytest.mark.linux
def test_churn_on_the_real_kernel() -> None:
    """The same writes reach the real kernel at their times: the per-process counts are
    the kernel's own (ksm_merging_pages; other KSM users do not change them)."""
    from ksmlab.backends.linux import helper_unavailable_reason, linux_ksm_unavailable_reason
    from ksmlab.scenario.backends import open_backend

    reason = linux_ksm_unavailable_reason() or helper_unavailable_reason()
    if reason:
        pytest.skip(reason)
    sc = parse_scenario(ON_LINUX, source="<test>", base_dir=Path("."))
    backend = open_backend("linux")
    try:
        result = run_scenario(sc, backend)
    finally:
        backend.close()
    merged, written = result.checkpoints
    assert merged.processes["p"]["ksm_merging_pages"] == 128
    assert written.processes["p"]["ksm_merging_pages"] == 32 + 48 + 16
    assert not result.failures, result.failures


@pytest.mark.parametrize("backend", ["sim", "bulk"])
def test_churn_on_the_real_kernel_holds_on_the_models(backend: str) -> None:
    """The expectations of the real kernel's scenario above hold on the model engines."""
    sc = parse_scenario(ON_LINUX, source="<test>", base_dir=Path("."))
    result = run_scenario(sc, SimBackend() if backend == "sim" else BulkBackend())
    assert not result.failures, result.failures
