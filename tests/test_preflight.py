"""Pre-flight (``ksmlab.scenario.preflight``, ``ksmlab.scenario.costs``): refuse what won't fit,
say what an engine cannot run, and choose the engine of ``--backend auto``, before anything is built.

The memory available is always given (an argument, or ``KSMLAB_MEM_AVAILABLE``), so these
tests read nothing of the host but the one marked ``linux``; and none allocates what it
estimates: a 40 GiB host and a 1 TiB guest (in 12 GiB) are refused from their files alone.  Expected
figures are the documented formula (docs/performance.md, "Pre-flight") worked by hand.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import pytest

from ksmlab import SimKernel, cli
from ksmlab.bulk import BulkKernel
from ksmlab.capabilities import ALL_CAPABILITIES, Capability, declared
from ksmlab.constants import (
    MADV_DONTNEED,
    MADV_MERGEABLE,
    MADV_UNMERGEABLE,
    PAGE_SIZE,
    PR_SET_MEMORY_MERGE,
    PROT_READ,
)
from ksmlab.errors import NotModelledError
from ksmlab.ksm.cost import default_cost
from ksmlab.scenario import costs, preflight
from ksmlab.scenario.costs import COSTS, estimate, measure
from ksmlab.scenario.loader import load_scenario, parse_scenario
from ksmlab.scenario.model import Scenario
from ksmlab.scenario.preflight import WontFitError, cannot_run, mem_available, plan
from ksmlab.scenario.schema import DEFAULT_SCAN_TIMEOUT_NS
from ksmlab.scenario.units import format_bytes

ROOT = Path(__file__).resolve().parents[1]
GIB = 1 << 30


def scenario(text: str, source: str = "s.toml") -> Scenario:
    return parse_scenario(text, source=source, base_dir=ROOT)


# 20 guests of 2 GiB booted from one 256 MiB image, half of each guest its own pages.
TWENTY_VMS = """
[content.os]
kind = "image"
pages = 65536
private_fraction = 0.5
[[process]]
name = "vm"
count = 20
[[process.mapping]]
name = "ram"
size = "2GiB"
content = "os"
[[checkpoint]]
at = "10min"
"""
TWENTY_VMS_PAGES = 20 * (2 * GIB // PAGE_SIZE)  # 10,485,760
ONE_VM_PAGES = 2 * GIB // PAGE_SIZE  # 524,288

TERABYTE_VM = """
[content.r]
kind = "random"
[[process]]
name = "vm"
[[process.mapping]]
name = "ram"
size = "1TiB"
content = "r"
[[checkpoint]]
full_scans = 2
"""
TERABYTE_PAGES = (1 << 40) // PAGE_SIZE  # 268,435,456
_NS = default_cost().ns
BOOT_PERIOD_NS = 24_000_000 + _NS["batch"] + 100 * (_NS["page"] + _NS["checksum"])
"""ksmd's period at the boot knobs as the pre-flight reckons it: a sleep of 20 ms = 5
jiffies at HZ=250, which the timer wheel's level 0 fires one jiffy later, on the 6th
tick: 24 ms (the gap measured on Linux 6.18, docs/cost-model.md); then a batch of 100
pages priced by the shipped cost model as a batch plus a page and a checksum per page."""


def peak(engine: costs.Engine, *, processes: int, pages: int, largest: int, image: int = 0,
         forked: int = 0, writes: int = 0) -> int:
    """The formula of docs/performance.md ("Pre-flight"), term by term."""
    c = COSTS[engine]
    return (c.baseline + processes * c.process + pages * c.page + largest * c.fill
            + image * c.image_page + forked * c.forked_page
            + min(writes, forked) * max(0, c.page - c.forked_page) + writes * c.write)


# --- the scenario's size, and the estimate ---------------------------------------------------

def test_size_of_twenty_guests() -> None:
    """Pages, the largest mapping and the image are read off the file."""
    s = measure(scenario(TWENTY_VMS))
    assert (s.processes, s.pages, s.forked_pages, s.largest_fill, s.image_pages, s.writes) == (
        20, TWENTY_VMS_PAGES, 0, ONE_VM_PAGES, 65536, 0)
    # ksmd at the boot knobs for the 10 minutes of the file:
    period_ns = BOOT_PERIOD_NS
    assert s.visits == int(100 * 600 * 10**9 / period_ns)
    assert s.run_s == 600


def test_size_counts_forks_and_writes() -> None:
    """Forks of forks, write events and write activities, counted by hand."""
    s = measure(scenario("""
[ksm]
pages_to_scan = 100
sleep_millisecs = 20
[content.z]
kind = "zero"
[[process]]
name = "p"
count = 2
[[process.mapping]]
name = "m"
pages = 100
content = "z"
[[event]]
at = "1s"
action = "fork"
process = "p[0:1]"
child = "kid"
count = 3
[[event]]
at = "2s"
action = "fork"
process = "kid"
child = "grandkid"
[[event]]
at = "3s"
action = "write"
process = "p"
mapping = "m"
region = { first_page = 0, pages = 50 }
[[activity]]
process = "kid"
mapping = "m"
rate = 10
stop = "30s"
[[checkpoint]]
at = "30s"
"""))
    assert s.processes == 2 + 3 + 3
    assert s.forked_pages == 3 * 100 + 3 * 100
    assert s.writes == 2 * 50 + 3 * 10 * 29  # the children write from their birth at 1 s
    assert s.pages == 200 and s.largest_fill == 100 and s.image_pages == 0
    assert s.visits == int(100 * 30 * 10**9 / BOOT_PERIOD_NS)


def test_full_scan_checkpoint_runs_until_reached() -> None:
    """A scenario that ends at a full-scan checkpoint runs as long as those scans take,
    or until the checkpoint's timeout."""
    period_ns = BOOT_PERIOD_NS  # 100 pages per batch at the boot knobs
    s = measure(scenario(TERABYTE_VM))  # 2 full scans of 1 TiB: 2 x 2,684,355 batches
    assert s.run_s == DEFAULT_SCAN_TIMEOUT_NS / 1e9 < 2 * TERABYTE_PAGES / 100 * period_ns / 1e9
    small = measure(scenario(TERABYTE_VM.replace('"1TiB"', '"4MiB"')))  # 2 x 11 batches
    assert small.run_s == pytest.approx(2 * 1024 / 100 * period_ns / 1e9)
    assert small.visits == (2 * 1024)


@pytest.mark.parametrize("engine", ["sim", "fingerprint", "bulk", "linux"])
def test_estimate_is_the_documented_formula(engine: costs.Engine) -> None:
    """Peak memory = baseline + pages x page + largest mapping x fill + image pages x image."""
    e = estimate(scenario(TWENTY_VMS), engine)
    assert e.peak_bytes == peak(engine, processes=20, pages=TWENTY_VMS_PAGES,
                                largest=ONE_VM_PAGES, image=65536)
    c, s = COSTS[engine], e.size
    # ksmd's visits are fewer than two full scans here: all at the first scans' cost.
    assert s.visits < 2 * TWENTY_VMS_PAGES
    seconds = TWENTY_VMS_PAGES * c.fill_s + s.visits * c.visit_s + (600 if engine == "linux" else 0)
    assert e.seconds == pytest.approx(seconds)


def test_later_full_scans_cost_the_rescan_rate() -> None:
    """A minute of ksmd over 1024 pages: two full scans at the first scans' cost, the rest
    (far more) at the rescan cost."""
    sc = scenario("""
[content.z]
kind = "zero"
[[process]]
name = "p"
count = 4
[[process.mapping]]
name = "m"
pages = 256
content = "z"
[[checkpoint]]
at = "1min"
""")
    visits = int(100 * 60 * 10**9 / BOOT_PERIOD_NS)
    c = COSTS["sim"]
    e = estimate(sc, "sim")
    assert e.size.visits == visits
    assert e.seconds == pytest.approx(1024 * c.fill_s + 2048 * c.visit_s + (visits - 2048) * c.rescan_s)


def test_twenty_guests_need_tens_of_gib_on_simkernel() -> None:
    """The issue's case: 10.5 million pages at 4.5 KB and more each is over 40 GiB (it
    measured 7.9 GB after 47 s and still filling); the bulk engine needs under a GiB."""
    sim = estimate(scenario(TWENTY_VMS), "sim").peak_bytes
    bulk = estimate(scenario(TWENTY_VMS), "bulk").peak_bytes
    assert sim > TWENTY_VMS_PAGES * 4500 > 40 * GIB
    assert bulk < GIB


# --- refusals -------------------------------------------------------------------------------

def test_simkernel_refuses_twenty_guests_and_names_the_bulk_engine() -> None:
    """On SimKernel with 22 GiB available: WontFitError naming both figures and the bulk engine."""
    sc = scenario(TWENTY_VMS)
    need = peak("sim", processes=20, pages=TWENTY_VMS_PAGES, largest=ONE_VM_PAGES, image=65536)
    bulk = peak("bulk", processes=20, pages=TWENTY_VMS_PAGES, largest=ONE_VM_PAGES, image=65536)
    with pytest.raises(WontFitError) as info:
        plan(sc, "sim", available=(22 * GIB, "MemAvailable"))
    msg = str(info.value)
    assert msg.startswith("s.toml: this run would not fit in memory: SimKernel needs about "
                          f"{format_bytes(need)} at its peak")
    assert f"for {TWENTY_VMS_PAGES:,} pages, and 22.0 GiB is available (MemAvailable)" in msg
    assert f"the bulk engine would need about {format_bytes(bulk)} at its peak" in msg
    assert msg.endswith("(--backend bulk)")
    assert isinstance(info.value, MemoryError)


def test_terabyte_guest_fits_only_the_bulk_engine() -> None:
    """1 TiB of unique pages: with set-up streaming the mapping, only the bulk engine's
    figure (about 70 B per page) fits in 22 GiB; with 12 GiB every engine is named with
    its figure and none fits."""
    sc = scenario(TERABYTE_VM)
    bulk = peak("bulk", processes=1, pages=TERABYTE_PAGES, largest=TERABYTE_PAGES)
    assert 12 * GIB < bulk < 22 * GIB  # the fill adds a chunk's share, not the mapping's ids
    p = plan(sc, "auto", available=(22 * GIB, "MemAvailable"))
    assert p.backend == "bulk" and p.estimate.peak_bytes == bulk
    with pytest.raises(WontFitError) as info:
        plan(sc, "auto", available=(12 * GIB, "MemAvailable"))
    msg = str(info.value)
    assert f"for {TERABYTE_PAGES:,} pages" in msg
    assert f"the bulk engine: {format_bytes(bulk)}" in msg
    assert msg.endswith("make the scenario smaller")


def test_linux_refusal_names_a_model_engine() -> None:
    """The real kernel cannot hold 40 GiB of guests in 22 GiB either: the bulk engine can."""
    with pytest.raises(WontFitError, match=r"this machine's kernel needs about 4\d\.\d GiB .*"
                                           r"the bulk engine would need .*\(--backend bulk\)$"):
        plan(scenario(TWENTY_VMS), "linux", available=(22 * GIB, "MemAvailable"))


def test_unknown_memory_refuses_nothing() -> None:
    """Where the memory available cannot be known, the run is not refused."""
    p = plan(scenario(TERABYTE_VM), "sim", available=None)
    assert p.backend == "sim" and p.estimate.peak_bytes > (1 << 40)


# --- --backend auto -------------------------------------------------------------------------

def test_auto_picks_simkernel_when_it_fits_comfortably() -> None:
    sc = load_scenario(ROOT / "examples" / "identical-pages.toml")
    p = plan(sc, "auto", available=(16 * GIB, "KSMLAB_MEM_AVAILABLE"))
    assert (p.backend, p.content) == ("sim", "bytes")
    assert p.describe().startswith("--backend auto chose sim (SimKernel): it needs ")
    assert "under half of the 16.0 GiB available (KSMLAB_MEM_AVAILABLE)" in p.describe()


def test_auto_picks_the_bulk_engine_for_twenty_guests() -> None:
    sc = scenario(TWENTY_VMS)
    need = peak("sim", processes=20, pages=TWENTY_VMS_PAGES, largest=ONE_VM_PAGES, image=65536)
    p = plan(sc, "auto", available=(22 * GIB, "MemAvailable"))
    assert p.backend == "bulk"
    assert p.describe().startswith(
        f"--backend auto chose bulk (the bulk engine): SimKernel would need {format_bytes(need)}, "
        f"more than half of the 22.0 GiB available (MemAvailable); the bulk engine needs about ")
    # With twice the memory SimKernel needs, SimKernel it is.
    assert plan(sc, "auto", available=(2 * need, "MemAvailable")).backend == "sim"
    # Just under twice: no longer comfortable.
    assert plan(sc, "auto", available=(2 * need - 1, "MemAvailable")).backend == "bulk"


@pytest.fixture
def bulk_models(monkeypatch: pytest.MonkeyPatch) -> Callable[[set[Capability]], None]:
    """Make BulkKernel declare exactly the given capabilities (as it will, or did)."""
    def set_models(caps: set[Capability]) -> None:
        monkeypatch.setattr(BulkKernel, "MODELS", frozenset(caps))
    return set_models


def _without(*caps: Capability) -> set[Capability]:
    return set(ALL_CAPABILITIES) - set(caps)


def test_auto_keeps_simkernel_when_the_bulk_engine_cannot_run_it(
        bulk_models: Callable[[set[Capability]], None]) -> None:
    """merge_any on a bulk engine without prctl: SimKernel if it fits at all, saying why."""
    bulk_models(_without(Capability.PR_SET_MEMORY_MERGE))
    sc = scenario(TWENTY_VMS.replace('count = 20', 'count = 20\nmerge_any = true'))
    need = estimate(sc, "sim").peak_bytes
    p = plan(sc, "auto", available=(need + 1, "MemAvailable"))
    assert p.backend == "sim"
    assert ("but the bulk engine does not model prctl(PR_SET_MEMORY_MERGE) (process[0] 'vm': "
            "merge_any = true)") in p.describe()
    with pytest.raises(WontFitError) as info:
        plan(sc, "auto", available=(need - 1, "MemAvailable"))
    assert "SimKernel in fingerprint mode would need" in str(info.value)
    assert str(info.value).endswith("(--backend sim --content fingerprint)")
    # Once the engine models prctl, the same scenario goes to it.
    bulk_models(set(ALL_CAPABILITIES))
    assert plan(sc, "auto", available=(need - 1, "MemAvailable")).backend == "bulk"


# --- what an engine cannot run ----------------------------------------------------------------

EVERYTHING = """
[ksm]
advisor_mode = "scan-time"
merge_across_nodes = false
[content.z]
kind = "zero"
[[process]]
name = "db"
merge_any = true
[[process.mapping]]
name = "m"
pages = 4
content = "z"
[[event]]
at = "1s"
action = "madvise"
process = "db"
mapping = "m"
advice = "dontneed"
[[event]]
at = "2s"
action = "prctl"
process = "db"
merge_any = false
[[event]]
at = "3s"
action = "knobs"
set = { run = 2 }
[[event]]
at = "4s"
action = "fork"
process = "db"
child = "kid"
[[event]]
at = "5s"
action = "exit"
process = "kid"
[[checkpoint]]
at = "6s"
"""


def test_needs_name_each_call_and_where() -> None:
    got = {(cap, where) for cap, where in preflight.needs(scenario(EVERYTHING))}
    assert {
        (Capability.ADVISOR, "[ksm] advisor_mode = scan-time"),
        (Capability.NUMA, "[ksm] merge_across_nodes = 0"),
        (Capability.PR_SET_MEMORY_MERGE, "process[0] 'db': merge_any = true"),
        (Capability.MADV_DONTNEED, "event[0] madvise db m dontneed"),
        (Capability.PR_SET_MEMORY_MERGE, "event[1] prctl db PR_SET_MEMORY_MERGE=0"),
        (Capability.RUN_UNMERGE, "event[2] run = 2"),
        (Capability.FORK, "event[3] fork db -> kid"),
        (Capability.EXIT, "event[4] exit kid"),
    } <= got


def test_cannot_run_follows_the_engines_declaration(
        bulk_models: Callable[[set[Capability]], None]) -> None:
    """What is missing is what the engine does not declare, first place named; a capability
    the engine declares disappears from the list."""
    sc = scenario(EVERYTHING)
    bulk_models(_without(Capability.ADVISOR, Capability.NUMA, Capability.PR_SET_MEMORY_MERGE,
                         Capability.MADV_DONTNEED))
    assert cannot_run(sc, "bulk") == [
        "the scan-time advisor (advisor_mode, advisor_*) ([ksm] advisor_mode = scan-time)",
        "merge_across_nodes=0 (NUMA trees) ([ksm] merge_across_nodes = 0)",
        "prctl(PR_SET_MEMORY_MERGE) (process[0] 'db': merge_any = true)",
        "madvise(MADV_DONTNEED) (event[0] madvise db m dontneed)",
    ]
    bulk_models(_without(Capability.MADV_DONTNEED))
    assert cannot_run(sc, "bulk") == ["madvise(MADV_DONTNEED) (event[0] madvise db m dontneed)"]
    assert cannot_run(sc, "sim") == []
    with pytest.raises(NotModelledError, match=r"^s.toml: the bulk engine cannot run this scenario: "
                                               r"it does not model madvise\(MADV_DONTNEED\)"):
        plan(sc, "bulk", available=(16 * GIB, "MemAvailable"))


def test_cannot_run_on_the_bulk_engine_as_it_is() -> None:
    """Whatever the bulk engine models today: exactly the undeclared needs are reported."""
    sc = scenario(EVERYTHING)
    missing = {cap for cap, _ in preflight.needs(sc)} - BulkKernel.MODELS
    assert len(cannot_run(sc, "bulk")) == len(missing)
    assert all(any(line.startswith(cap.value) for line in cannot_run(sc, "bulk"))
               for cap in missing)


# --- the declaration holds to what the engine does -------------------------------------------

Probe = Callable[[Any], object]


def _probes() -> dict[Capability, Probe]:
    """One call per capability, on a fresh machine (SimKernel or BulkKernel) with a process
    of one written page."""
    def on_page(call: Callable[[Any, int], object]) -> Probe:
        def probe(k: Any) -> object:
            p = k.spawn()
            a = p.mmap(PAGE_SIZE)
            p.write(a, b"x" * PAGE_SIZE)
            return call(p, a)
        return probe

    def sysfs(name: str, value: str) -> Probe:
        def probe(k: Any) -> object:
            k.sysfs[name] = value
            return None
        return probe

    return {
        Capability.MMAP: lambda k: k.spawn().mmap(PAGE_SIZE),
        Capability.WRITE: on_page(lambda p, a: None),
        Capability.MADV_MERGEABLE: on_page(lambda p, a: p.madvise(a, PAGE_SIZE, MADV_MERGEABLE)),
        Capability.MADV_UNMERGEABLE: on_page(lambda p, a: p.madvise(a, PAGE_SIZE, MADV_UNMERGEABLE)),
        Capability.MADV_DONTNEED: on_page(lambda p, a: p.madvise(a, PAGE_SIZE, MADV_DONTNEED)),
        Capability.PR_SET_MEMORY_MERGE: lambda k: k.spawn().prctl(PR_SET_MEMORY_MERGE, 1),
        Capability.FORK: on_page(lambda p, a: p.fork()),
        Capability.EXIT: on_page(lambda p, a: p.exit()),
        Capability.EXEC: on_page(lambda p, a: p.exec()),
        Capability.MUNMAP: on_page(lambda p, a: p.munmap(a, PAGE_SIZE)),
        Capability.MPROTECT: on_page(lambda p, a: p.mprotect(a, PAGE_SIZE, PROT_READ)),
        Capability.KSM_STAT: on_page(lambda p, a: p.ksm_stat()),
        Capability.RUN_UNMERGE: sysfs("run", "2"),
        Capability.NUMA: sysfs("merge_across_nodes", "0"),
        Capability.ADVISOR: sysfs("advisor_mode", "scan-time"),
    }


def test_every_capability_has_a_probe() -> None:
    assert set(_probes()) == set(Capability)


@pytest.mark.parametrize("cap", list(Capability), ids=lambda c: c.name)
def test_simkernel_models_every_capability(cap: Capability) -> None:
    """The probes are sound: the reference model takes each of them."""
    assert declared(SimKernel) == ALL_CAPABILITIES
    _probes()[cap](SimKernel())


@pytest.mark.parametrize("cap", list(Capability), ids=lambda c: c.name)
def test_bulk_engine_declares_what_it_models(cap: Capability) -> None:
    """BulkKernel.MODELS holds a capability exactly when the call does not raise
    NotModelledError: add it to MODELS when the engine implements it."""
    probe = _probes()[cap]
    if cap in declared(BulkKernel):
        probe(BulkKernel())
    else:
        with pytest.raises(NotModelledError):
            probe(BulkKernel())


def test_declaration_must_be_capabilities() -> None:
    class Odd:
        MODELS = frozenset({"prctl"})
    with pytest.raises(TypeError, match=r"Odd\.MODELS must be a frozenset of Capability"):
        declared(Odd)


# --- the memory available ---------------------------------------------------------------------

def test_mem_available_from_meminfo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(preflight.MEM_ENV, raising=False)
    f = tmp_path / "meminfo"
    f.write_text("MemTotal:       24576000 kB\nMemFree:  100 kB\nMemAvailable:   22000000 kB\n")
    assert mem_available(str(f)) == (22000000 * 1024, "MemAvailable")


def test_mem_available_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(preflight.MEM_ENV, "3GiB")
    assert mem_available("/nonexistent") == (3 * GIB, preflight.MEM_ENV)
    monkeypatch.setenv(preflight.MEM_ENV, "lots")
    with pytest.raises(ValueError, match=r"^KSMLAB_MEM_AVAILABLE: expected a size .*got 'lots'$"):
        mem_available()


@pytest.mark.linux
def test_mem_available_of_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """/proc/meminfo's MemAvailable, in bytes, no more than the machine has."""
    monkeypatch.delenv(preflight.MEM_ENV, raising=False)
    got = mem_available()
    assert got is not None
    avail, source = got
    assert source == "MemAvailable"
    assert 0 < avail <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


# --- the command line -------------------------------------------------------------------------

class StartedError(BaseException):
    """Raised in place of opening a backend: a run was about to start."""


@pytest.fixture
def no_run(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[object, ...]]]:
    """Opening a backend records what was asked and raises StartedError."""
    opened: list[tuple[object, ...]] = []

    def trap(*args: object) -> None:
        opened.append(args)
        raise StartedError
    monkeypatch.setattr(cli, "open_backend", trap)
    yield opened


@pytest.fixture(autouse=True)
def _memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """22 GiB available, as on the machine of the issue (a test may say otherwise)."""
    monkeypatch.setenv(preflight.MEM_ENV, "22GiB")


def invoke(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "vms.toml").write_text(TWENTY_VMS)
    (tmp_path / "tb.toml").write_text(TERABYTE_VM)
    (tmp_path / "db.toml").write_text(TWENTY_VMS.replace("count = 20", "count = 2\nmerge_any = true"))
    return tmp_path


def test_run_refuses_before_anything_is_built(files: Path, no_run: list[tuple[object, ...]]) -> None:
    """`run --backend sim` of 40 GiB of guests: exit 2, one line, no backend opened."""
    code, out, err = invoke(["run", str(files / "vms.toml"), "--backend", "sim",
                             "--html", str(files / "r.html")])
    assert (code, out) == (2, "")
    assert err.count("\n") == 1
    assert err.startswith(f"{files / 'vms.toml'}: this run would not fit in memory: SimKernel needs")
    assert err.rstrip().endswith("(--backend bulk)")
    assert not (files / "r.html").exists()
    assert no_run == []


def test_run_of_a_terabyte_guest_is_refused(files: Path, no_run: list[tuple[object, ...]],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """1 TiB of unique pages with 12 GiB available: even the bulk engine's ~18 GiB won't fit."""
    monkeypatch.setenv(preflight.MEM_ENV, "12GiB")
    code, _, err = invoke(["run", str(files / "tb.toml")])
    assert code == 2 and "make the scenario smaller" in err
    assert no_run == []


def test_run_auto_picks_the_bulk_engine(files: Path, no_run: list[tuple[object, ...]]) -> None:
    """The default backend opens the bulk engine for 40 GiB of guests."""
    with pytest.raises(StartedError):
        invoke(["run", str(files / "vms.toml")])
    assert no_run == [("bulk", "bytes", None)]  # (backend, content, cost: the shipped one)


def test_run_prints_the_plan_then_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(preflight.MEM_ENV, "16GiB")
    f = tmp_path / "s.toml"
    f.write_text((ROOT / "examples" / "identical-pages.toml").read_text())
    code, out, err = invoke(["run", str(f), "--json"])
    assert code == 0
    assert json.loads(out)["backend"] == "sim"
    assert re.fullmatch(r"ksmlab: --backend auto chose sim \(SimKernel\): it needs \S+ \S+ at its "
                        r"peak, under half of the 16\.0 GiB available \(KSMLAB_MEM_AVAILABLE\), "
                        r"and under a second\n", err), err


def test_run_refuses_what_the_backend_cannot_run(files: Path, no_run: list[tuple[object, ...]],
                                                 bulk_models: Callable[[set[Capability]], None]) -> None:
    """merge_any on a bulk engine without prctl: exit 2 before the run (it was exit 1 mid-run)."""
    bulk_models(_without(Capability.PR_SET_MEMORY_MERGE))
    code, out, err = invoke(["run", str(files / "db.toml"), "--backend", "bulk"])
    assert (code, out) == (2, "")
    assert err == (f"{files / 'db.toml'}: the bulk engine cannot run this scenario: it does not "
                   f"model prctl(PR_SET_MEMORY_MERGE) (process[0] 'vm': merge_any = true); "
                   f"SimKernel models everything (--backend sim)\n")
    assert no_run == []


def test_check_reports_per_backend(files: Path, bulk_models: Callable[[set[Capability]], None],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """`check --backend NAME`: the plan of each file that can run there, one error line for each
    that cannot or would not fit; exit 2 if any."""
    monkeypatch.setenv(preflight.MEM_ENV, "16GiB")  # the 1 TiB guest needs ~18 GiB on bulk
    bulk_models(_without(Capability.PR_SET_MEMORY_MERGE))
    code, out, err = invoke(["check", "--backend", "bulk", str(files / "vms.toml"),
                             str(files / "db.toml"), str(files / "tb.toml")])
    assert code == 2
    lines = out.splitlines()
    assert lines[0].startswith(f"{files / 'vms.toml'}: ok: ")
    assert re.fullmatch(rf"{re.escape(str(files / 'vms.toml'))}: the bulk engine: about \S+ MiB at "
                        r"its peak and roughly .+; 16\.0 GiB available \(KSMLAB_MEM_AVAILABLE\)",
                        lines[1]), lines[1]
    assert len(lines) == 2
    errs = err.splitlines()
    assert errs[0].startswith(f"{files / 'db.toml'}: the bulk engine cannot run this scenario: "
                              "it does not model prctl(PR_SET_MEMORY_MERGE)")
    assert errs[1].startswith(f"{files / 'tb.toml'}: this run would not fit in memory: "
                              "the bulk engine needs")
    assert len(errs) == 2
    # The same files on the default backend: auto picks sim for the small one.
    code, out, err = invoke(["check", str(files / "db.toml")])
    assert code == 0 and err == ""
    assert out.splitlines()[1].startswith(f"{files / 'db.toml'}: --backend auto chose sim (SimKernel)")


def test_check_bad_memory_figure(files: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(preflight.MEM_ENV, "much")
    code, out, err = invoke(["check", str(files / "db.toml")])
    assert (code, out) == (2, "")
    assert err.startswith("ksmlab: KSMLAB_MEM_AVAILABLE: expected a size")


def test_content_fingerprint_with_auto(files: Path) -> None:
    """--content fingerprint goes with auto (it applies if SimKernel is chosen)."""
    code, out, _ = invoke(["check", "--content", "fingerprint", str(files / "db.toml")])
    assert code == 0 and "chose sim (SimKernel in fingerprint mode)" in out
    code, _, err = invoke(["check", "--backend", "bulk", "--content", "fingerprint",
                           str(files / "db.toml")])
    assert code == 2 and "--content fingerprint applies to --backend sim only (and to auto" in err


# --- the costs are stated in docs/performance.md, and hold -----------------------------------

def _doc_costs() -> dict[str, list[str]]:
    text = (ROOT / "docs" / "performance.md").read_text(encoding="utf-8")
    section = text.split("## Pre-flight", 1)[1]
    rows = [ln for ln in section.splitlines() if ln.startswith("| `")]
    return {ln.split("|")[1].strip().strip("`"): [c.strip() for c in ln.split("|")[2:-1]]
            for ln in rows}


def test_performance_md_states_the_costs() -> None:
    """The table of docs/performance.md is COSTS (bytes; microseconds)."""
    doc = _doc_costs()
    assert set(doc) == set(COSTS)
    for engine, c in COSTS.items():
        want = [f"{c.baseline / (1 << 20):g} MiB", f"{c.process:,}", f"{c.page:,}", f"{c.fill:,}",
                f"{c.image_page:,}", f"{c.forked_page:,}", f"{c.write:,}", f"{c.fill_s * 1e6:g}",
                f"{c.visit_s * 1e6:g}", f"{c.rescan_s * 1e6:g}", f"{c.write_s * 1e6:g}"]
        assert doc[engine] == want, engine


_PEAK = """
import json, sys
from ksmlab.notebook import run
from ksmlab.scenario.costs import estimate
r = run(sys.argv[1], backend=sys.argv[2], mem_available_bytes=1 << 40)
# VmHWM, the peak of this process's own address space: ru_maxrss would also count the
# RSS of the pytest process it was forked from (Linux keeps it across exec).
hwm = next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))
print(json.dumps({"rss": hwm * 1024,
                  "estimate": r.plan.estimate.peak_bytes}))
"""


@pytest.mark.slow
@pytest.mark.linux  # the child reads its peak from /proc/self/status
@pytest.mark.parametrize(("backend", "text"), [
    ("sim", TWENTY_VMS.replace("count = 20", "count = 4").replace('"2GiB"', '"32MiB"')),
    ("bulk", TWENTY_VMS.replace("count = 20", "count = 8").replace('"2GiB"', '"256MiB"')
     .replace("pages = 65536", "pages = 4096")),
])
def test_estimate_bounds_the_real_peak(tmp_path: Path, backend: str, text: str) -> None:
    """Run for real in a fresh interpreter: its peak RSS is under the estimate, and the
    estimate is not more than twice too big."""
    f = tmp_path / "s.toml"
    f.write_text(text)
    out = subprocess.run([sys.executable, "-c", _PEAK, str(f), backend], check=True,
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    got = json.loads(out.stdout)
    assert got["rss"] <= got["estimate"] <= 2 * got["rss"], got
