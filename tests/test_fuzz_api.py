# SPDX-License-Identifier: GPL-2.0-only
"""Every public call, given arbitrary Python values, fails cleanly, alike on every engine.

The error contract is :mod:`ksmlab.argcheck`'s docstring (and docs/design.md,
"Error contract").  Three kinds of test:

* **Fuzz** (Hypothesis): for each call and each of its parameters, an
  arbitrary Python value for that parameter (the others valid) is passed to
  SimKernel in both content modes and to BulkKernel, each on the same
  set-up.  Every engine must answer with a contract exception (TypeError or
  ValueError whose message names the parameter, OSError, NotModelledError,
  ProcessExitedError, ScanStalledError) or succeed; two engines that both
  model the call must agree on the exception type and errno (and on the
  result, where results compare); a refused call must change nothing
  observable (:func:`snapshot`).  The number of examples per (call,
  parameter) is ``KSMLAB_FUZZ_EXAMPLES`` (default 50).
* **Misuse table**: fixed misuses whose expected answer is what Linux 6.18
  gives, run on SimKernel, BulkKernel and (marked ``linux``) LinuxKernel.
* **Regressions** for bugs a user found, with their messages.

Valid integers are drawn small or beyond what the engines can map: a valid
mapping of terabytes is not an error, and would only exhaust this machine
(the engines keep per-page state), so lengths in between are left out.
"""

from __future__ import annotations

import errno
import itertools
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ksmlab import SimKernel
from ksmlab.argcheck import MAX_VIEW_PAGES, describe
from ksmlab.bulk import BulkKernel
from ksmlab.constants import (
    MADV_DONTNEED,
    MADV_MERGEABLE,
    MADV_UNMERGEABLE,
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_PRIVATE,
    MAP_SHARED,
    PAGE_SIZE,
    PR_GET_MEMORY_MERGE,
    PR_SET_MEMORY_MERGE,
    PROT_READ,
    PROT_WRITE,
    TASK_SIZE,
    VM_IO,
    VM_PFNMAP,
)
from ksmlab.errors import NotModelledError, ProcessExitedError, ScanStalledError
from ksmlab.ksm.cost import default_cost
from ksmlab.mm.page import ZERO_FINGERPRINT

P = PAGE_SIZE
RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS
EXAMPLES = int(os.environ.get("KSMLAB_FUZZ_EXAMPLES", "50"))
ENGINES = ("sim-bytes", "sim-fingerprint", "bulk")
PAGE_A, PAGE_B, PAGE_C = (bytes([i]) * P for i in (1, 2, 3))
UNMAPPED = 0x10000
"""An address no engine maps (nothing is there in the helper process on Linux either)."""
MMAP_BASE = 0x7F0000000000
"""Where SimKernel and BulkKernel place mappings, top-down."""
FILE = str(Path(__file__).resolve())
"""A readable host file of more than one page, for file mappings."""
DIRECTORY = str(Path(__file__).resolve().parent)

CALLS: Counter[str] = Counter()
"""Calls made, by engine (reported at the end of the module)."""


@pytest.fixture(scope="module", autouse=True)
def _report_calls(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and CALLS:
        reporter.write_line(f"test_fuzz_api: {sum(CALLS.values())} calls "
                            f"({', '.join(f'{e} {n}' for e, n in sorted(CALLS.items()))}), "
                            f"KSMLAB_FUZZ_EXAMPLES={EXAMPLES}")


# --- the set-up every engine gets ---------------------------------------------------------------

@dataclass
class World:
    """A machine after the same program on every engine.

    ``a``: 8 pages, 5 written (3 equal, 2 equal), madvised MERGEABLE and merged
    by two full scans; ``b``: 2 pages just below ``a``, one written, not
    mergeable; ``child`` is ``p``'s fork, which broke COW of one merged page;
    ``gone`` another fork, exited.  ksmd is stopped again unless *running*.
    """

    engine: str
    k: Any
    p: Any
    child: Any
    gone: Any
    a: int
    b: int


def new_kernel(engine: str) -> Any:
    if engine == "bulk":
        return BulkKernel()
    return SimKernel(content="bytes" if engine == "sim-bytes" else "fingerprint")


def build(engine: str, k: Any = None, *, scan: bool = True, running: bool = False) -> World:
    k = new_kernel(engine) if k is None else k
    k.sysfs["pages_to_scan"] = "1000"
    k.sysfs["sleep_millisecs"] = "0"
    p = k.spawn()
    a = p.mmap(8 * P)
    p.write(a, PAGE_A * 3 + PAGE_B * 2)
    p.madvise(a, 8 * P, MADV_MERGEABLE)
    b = p.mmap(2 * P)
    p.write(b, PAGE_A)
    child = p.fork()
    gone = p.fork()
    gone.exit()
    if scan:
        k.sysfs["run"] = "1"
        k.wait_full_scans(2)
        child.write(a + 3 * P, PAGE_C)
        if not running:
            k.sysfs["run"] = "0"
    return World(engine, k, p, child, gone, a, b)


def snapshot(w: World) -> dict[str, object]:
    """Everything observable: every sysfs file; each live process's smaps, ksm_stat and
    the pfns and fingerprints (or content ids) of its mappings; the clock; what the
    next spawn or write would get (pid, content id)."""
    k = w.k
    out: dict[str, object] = {"sysfs": {name: k.sysfs[name] for name in k.sysfs}}
    if isinstance(k, SimKernel):
        out |= {"clock": (k.now_ns, k.ksmd_cpu_ns), "events": len(k.events),
                "frames": k.phys.nr_frames, "cow_ksm": k.cow_ksm, "next_pid": repr(k._pids),
                "files": sorted(k._files), "pids": sorted(k.processes)}
        for pid, proc in sorted(k.processes.items()):
            smaps = proc.smaps()
            views = [(e.start, proc.pfns(e.start, e.end - e.start),
                      proc.fingerprints(e.start, e.end - e.start))
                     for e in smaps if e.end - e.start <= 4096 * P]
            out[f"pid {pid}"] = (smaps, proc.ksm_stat(), proc.ksm_merging_pages(), views)
    elif isinstance(k, BulkKernel):
        out |= {"clock": (k.now_ns, k.ksmd_cpu_ns), "next_pid": k._next_pid,
                "contents": len(k.contents), "pids": sorted(k.processes)}
        for pid, proc in sorted(k.processes.items()):
            segments = [(s.addr, s.pages, s.prot) for s in proc.mm.segments]
            out[f"pid {pid}"] = (segments, proc.ksm_stat(), proc.ksm_merging_pages(),
                                 [proc.content_ids(a, n * P) for a, n, _ in segments
                                  if n <= 4096])
    else:  # LinuxKernel: the set-up's own areas (the helper's own pages are not ours)
        for name in ("p", "child"):
            proc = getattr(w, name)
            ours = [e for e in proc.smaps() if e.start < w.a + 8 * P and e.end > w.b]
            out[name] = (ours, proc.ksm_stat(), proc.pfns(w.b, 2 * P), proc.pfns(w.a, 8 * P))
    return out


# --- calling, and what came back ------------------------------------------------------------------

@dataclass(frozen=True)
class Outcome:
    """What a call did: ``kind`` is "ok" or the exception's contract type."""

    kind: str
    errno: int | None = None
    message: str = ""
    result: object = None


def attempt(call: Callable[[], object]) -> Outcome:
    """Run *call*; an exception outside the contract propagates (a crash fails the test)."""
    try:
        result = call()
    except (NotModelledError, ProcessExitedError, ScanStalledError) as e:
        return Outcome(type(e).__name__, message=str(e))
    except OSError as e:
        return Outcome("OSError", e.errno, str(e))
    except MemoryError as e:  # BulkKernel.reserve only (checked by the caller)
        return Outcome("MemoryError", message=str(e))
    except (TypeError, ValueError) as e:
        if type(e) not in (TypeError, ValueError):
            raise  # a subclass (UnicodeError, numpy's errors...) leaked from inside
        return Outcome(type(e).__name__, message=str(e))
    return Outcome("ok", result=result)


def comparable(result: object) -> object:
    """What of a result two engines must agree on: a list of pages by which are mapped
    (pfns and fingerprints/content ids differ in kind), anything else as is."""
    if isinstance(result, list):
        return [x is None for x in result]
    if result is None or isinstance(result, int | bytes):
        return result
    return type(result).__name__


PARTIAL = {("madvise", errno.ENOMEM), ("mprotect", errno.ENOMEM)}
"""Refusals that change state on Linux too: the mapped parts of a range with holes are
advised or protected before ENOMEM (checked on Linux 6.18, tests/test_madvise.py)."""


def check(outcomes: dict[str, Outcome], what: str) -> None:
    """Engines that both model a call give the same exception type and errno, or results."""
    for (e1, o1), (e2, o2) in itertools.combinations(outcomes.items(), 2):
        if "NotModelledError" in (o1.kind, o2.kind):
            continue
        assert (o1.kind, o1.errno) == (o2.kind, o2.errno), (
            f"{what}: {e1} gave {o1.kind} {errname(o1.errno)} {o1.message!r}, "
            f"{e2} gave {o2.kind} {errname(o2.errno)} {o2.message!r}")
        if o1.kind == "ok":
            assert comparable(o1.result) == comparable(o2.result), f"{what}: {e1} vs {e2}"


def names(message: str, param: str) -> bool:
    """Whether *message* names *param* (as a word: "n" is not any n in the text)."""
    return re.search(rf"\b{param}\b", message) is not None


def errname(err: int | None) -> str:
    return "" if err is None else errno.errorcode.get(err, str(err))


def call_and_check(w: World, target: Any, method: str, kwargs: dict[str, object],
                   param: str, what: str) -> Outcome:
    """Call; check the message of a misuse names *param*, and that a refusal changed nothing."""
    before = snapshot(w)
    out = attempt(lambda: getattr(target, method)(**kwargs))
    CALLS[w.engine] += 1
    assert out.kind != "MemoryError" or method == "reserve", f"{what}: {out.message}"
    if out.kind in ("TypeError", "ValueError", "MemoryError"):
        assert names(out.message, param), f"{what} on {w.engine}: {out.kind} {out.message!r}"
    refused = out.kind != "ok" and (method, out.errno) not in PARTIAL
    if out.kind == "ScanStalledError" and out.message.startswith("timeout"):
        refused = False  # a valid wait that ran out of time: the clock moved
    if refused:
        assert snapshot(w) == before, f"{what} on {w.engine}: {out.kind} {out.message!r} " \
                                      f"changed the state"
    return out


# --- values ------------------------------------------------------------------------------------

ANCHORS = (0, UNMAPPED, MMAP_BASE, MMAP_BASE - 8 * P, MMAP_BASE - 10 * P, TASK_SIZE,
           2 ** 64 - P, 2 ** 63)
BOUNDARIES = (0, 1, P - 1, P, P + 1, 2 ** 31 - 1, 2 ** 31, -2 ** 31, -2 ** 31 - 1, 2 ** 32,
              2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1, 2 ** 64, -1, -P, TASK_SIZE, TASK_SIZE + 1)

junk = st.one_of(
    st.none(), st.booleans(), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6), st.binary(max_size=6), st.lists(st.integers(0, 3), max_size=2),
    st.tuples(st.integers(0, P)), st.complex_numbers(max_magnitude=8),
    st.decimals(min_value=-8, max_value=8, places=1), st.fractions(max_denominator=3),
    st.sampled_from([object(), {}, set(), np.float64(P), np.bool_(True), np.int64(P),
                     np.uint64(2 ** 64 - 1), "4096", 4096.0, -0.0, [P], b"\0" * 8,
                     range(3), Fraction(P), 10 ** 5000]),
)
"""Values of every Python type, mostly wrong for any parameter."""

ints = st.one_of(
    st.integers(-2 ** 70, -1), st.integers(-4, 64 * P), st.sampled_from(BOUNDARIES),
    st.integers(MMAP_BASE, 2 ** 64 + 2 ** 20), st.integers(2 ** 64, 2 ** 300),
    st.builds(lambda a, d: max(a + d, 0), st.sampled_from(ANCHORS), st.integers(-16 * P, 16 * P)),
)
"""Integers, of every size but the terabytes a valid mapping could need (see the module doc)."""

VALUES: dict[str, st.SearchStrategy[object]] = {
    "int": st.one_of(junk, ints),
    "length": st.one_of(junk, ints.filter(lambda v: not 64 * P < v < MMAP_BASE)),
    "prot": st.one_of(junk, ints, st.sampled_from([0, PROT_READ, RW, 7, 0x8, 0x10, 0x80,
                                                   0x01000000, 0x03000000])),
    "flags": st.one_of(junk, ints, st.sampled_from([ANON, MAP_SHARED | MAP_ANONYMOUS,
                                                    MAP_ANONYMOUS, MAP_PRIVATE, ANON | MAP_FIXED,
                                                    ANON | 0x8000, 0x03 | MAP_ANONYMOUS])),
    "advice": st.one_of(junk, ints, st.integers(-2, 130)),
    "option": st.one_of(junk, ints, st.sampled_from([PR_SET_MEMORY_MERGE, PR_GET_MEMORY_MERGE,
                                                     12345])),
    "node": st.one_of(junk, ints, st.none()),
    "vm_flags": st.one_of(junk, ints, st.sampled_from([VM_IO | VM_PFNMAP, VM_IO, 0x80000000])),
    "flag": st.one_of(junk, st.sampled_from([0, 1])),
    "data": st.one_of(junk, st.binary(max_size=16), st.sampled_from(
        [b"", PAGE_C, PAGE_C * 2, b"x" * 100, bytearray(PAGE_C), memoryview(PAGE_C),
         PAGE_C + b"x", "x" * P])),
    "fps": st.one_of(junk, st.lists(st.one_of(st.binary(min_size=16, max_size=16),
                                              st.binary(max_size=20), st.text(max_size=2),
                                              st.integers(), st.none()), max_size=3),
                     st.sampled_from([[ZERO_FINGERPRINT], ZERO_FINGERPRINT,
                                      (bytearray(16),), {ZERO_FINGERPRINT: 1}])),
    "ids": st.one_of(junk, st.lists(st.one_of(st.integers(-3, 5), st.booleans(), st.floats(),
                                              st.integers(2 ** 62, 2 ** 70), st.none()),
                                    max_size=3),
                     st.sampled_from([np.array([0]), np.array([0.5]), np.array([[0]]),
                                      np.array([True]), np.array([], dtype=float),
                                      np.array([2 ** 63], dtype=np.uint64), np.array(["a"]),
                                      np.array(0), np.array([1], dtype=np.int8), (0, 1), [0] * 3])),
    "path": st.one_of(junk, st.text(max_size=12), st.sampled_from(
        [FILE, DIRECTORY, "", "/nonexistent/x", "a\0b", Path(FILE), FILE.encode()])),
    "duration": st.one_of(junk, ints, st.floats(allow_nan=True, allow_infinity=True),
                          st.sampled_from([0, 0.5, 1e-9, 9.2e12, 9.3e12, 10 ** 400, -0.0,
                                           Fraction(1, 3), np.float32(2.5)])),
    "count": st.one_of(junk, ints),
    "content": st.one_of(junk, st.sampled_from(["bytes", "fingerprint", "sha", "BYTES"])),
    "cost": st.one_of(junk, st.sampled_from([None, default_cost(), default_cost().to_dict(),
                                              "ksmd-cost.json", default_cost().clock])),
    "rows": st.one_of(junk, st.integers(-2 ** 70, 2 ** 16), st.integers(2 ** 40, 2 ** 100),
                      st.just(2 ** 64)),
}
"""Values per kind of parameter: junk, integers, and the kind's interesting values.
``rows`` leaves out sizes between 2**16 and 2**40 rows (valid, but gigabytes)."""


# --- the calls ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """A public call: its valid arguments on a World, and the kind of each parameter.

    A parameter is fuzzed on the engines whose arguments have it.
    """

    name: str
    method: Callable[[World], str]
    args: Callable[[World], dict[str, object]]
    kinds: dict[str, str]
    on: str = "p"
    running: bool = False
    engines: tuple[str, ...] = ENGINES


def same(name: str) -> Callable[[World], str]:
    return lambda w: name


def by_engine(sim: str, bulk: str) -> Callable[[World], str]:
    return lambda w: bulk if w.engine == "bulk" else sim


INTS2 = {"addr": "int", "length": "int"}
CASES = (
    Case("mmap", same("mmap"),
         lambda w: {"length": 2 * P, "prot": RW, "flags": ANON, "addr": 0, "node": None,
                    "offset": 0, "vm_flags": 0},
         {"length": "length", "prot": "prot", "flags": "flags", "addr": "int", "node": "node",
          "offset": "int", "vm_flags": "vm_flags"}),
    Case("mmap-file", same("mmap"),
         lambda w: {"length": P, "prot": PROT_READ, "flags": MAP_PRIVATE, "path": FILE,
                    "offset": 0},
         {"path": "path", "offset": "int", "length": "length"}),
    Case("munmap", same("munmap"), lambda w: {"addr": w.a + 6 * P, "length": P}, INTS2),
    Case("mprotect", same("mprotect"), lambda w: {"addr": w.a, "length": P, "prot": PROT_READ},
         {**INTS2, "prot": "prot"}),
    Case("madvise", same("madvise"),
         lambda w: {"addr": w.a, "length": 8 * P, "advice": MADV_UNMERGEABLE},
         {**INTS2, "advice": "advice"}),
    Case("prctl", same("prctl"),
         lambda w: {"option": PR_GET_MEMORY_MERGE, "arg2": 0, "arg3": 0, "arg4": 0, "arg5": 0},
         {"option": "option", "arg2": "int", "arg3": "int", "arg4": "int", "arg5": "int"}),
    Case("write", same("write"), lambda w: {"addr": w.a, "data": PAGE_C, "force": False},
         {"addr": "int", "data": "data", "force": "flag"}),
    Case("write-pages", by_engine("write_fingerprints", "write_contents"),
         lambda w: ({"addr": w.a, "ids": [0]} if w.engine == "bulk"
                    else {"addr": w.a, "fps": [ZERO_FINGERPRINT], "force": False}),
         {"addr": "int", "fps": "fps", "ids": "ids", "force": "flag"}),
    Case("read", same("read"), lambda w: {"addr": w.a, "length": 100, "force": False},
         {**INTS2, "force": "flag"}),
    Case("pfns", same("pfns"), lambda w: {"addr": w.b, "length": 10 * P}, INTS2),
    Case("views", by_engine("fingerprints", "content_ids"),
         lambda w: {"addr": w.b, "length": 10 * P}, INTS2),
    Case("advance", same("advance"), lambda w: {"ms": 1.5}, {"ms": "duration"}, on="k"),
    Case("wait_full_scans", same("wait_full_scans"), lambda w: {"n": 1, "timeout": None},
         {"n": "count", "timeout": "duration"}, on="k"),
    Case("wait_full_scans-running", same("wait_full_scans"),
         lambda w: {"n": 1, "timeout": 1.0}, {"timeout": "duration"}, on="k", running=True),
    Case("host_file", same("host_file"), lambda w: {"path": FILE}, {"path": "path"}, on="k",
         engines=("sim-bytes", "sim-fingerprint")),
    Case("reserve", same("reserve"), lambda w: {"pages": 0, "frames": 0, "contents": 0},
         {"pages": "rows", "frames": "rows", "contents": "rows"}, on="k", engines=("bulk",)),
)
FUZZED = [(c, p) for c in CASES for p in c.kinds]


def run_case(case: Case, param: str, value: object, *, on: str | None = None) -> None:
    """*case* with *value* for *param* on every engine that has the parameter; checked."""
    outcomes: dict[str, Outcome] = {}
    for engine in case.engines:
        w = build(engine, running=case.running)
        kwargs = case.args(w)
        if param not in kwargs:
            continue  # another engine's parameter (fps, ids)
        kwargs[param] = value
        target = {"p": w.p, "k": w.k, "gone": w.gone}[on or case.on]
        what = f"{case.name}({param}={describe(value)})"
        outcomes[engine] = call_and_check(w, target, case.method(w), kwargs, param, what)
    check(outcomes, f"{case.name}({param}={describe(value)})")


SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


@pytest.mark.parametrize(("case", "param"), FUZZED, ids=[f"{c.name}-{p}" for c, p in FUZZED])
@SETTINGS
@given(data=st.data())
def test_any_value_fails_alike(case: Case, param: str, data: st.DataObject) -> None:
    """Arbitrary values for one parameter: contract exceptions only, alike, changing nothing."""
    run_case(case, param, data.draw(VALUES[case.kinds[param]], label=param))


PROCESS_FUZZED = [(c, p) for c, p in FUZZED if c.on == "p"]


@settings(SETTINGS, max_examples=4 * EXAMPLES)
@given(pick=st.sampled_from(PROCESS_FUZZED), data=st.data())
def test_exited_process_fails_alike(pick: tuple[Case, str], data: st.DataObject) -> None:
    """The same on an exited process: argument errors first, then ProcessExitedError."""
    case, param = pick
    value = data.draw(VALUES[case.kinds[param]], label=param)
    run_case(case, param, value, on="gone")


CONSTRUCTOR_KINDS = {
    "cost": "cost", "config_ksm": "flag",
    "numa_nodes": "count", "max_frames": "count", "slab_limit": "count",
    "max_map_count": "count", "trace": "flag", "content": "content", "vectorize": "flag",
    "seed": "count",
}
SIM_ONLY = {"config_ksm", "max_frames", "slab_limit", "max_map_count", "trace",
            "content"}


@pytest.mark.parametrize("param", sorted(CONSTRUCTOR_KINDS))
@SETTINGS
@given(data=st.data())
def test_constructors_check_their_arguments(param: str, data: st.DataObject) -> None:
    """SimKernel(...) and BulkKernel(...) with one arbitrary keyword argument."""
    value = data.draw(VALUES[CONSTRUCTOR_KINDS[param]], label=param)
    makers: dict[str, Callable[[], object]] = {}
    if param not in {"vectorize", "seed"}:
        makers["sim"] = lambda: SimKernel(**{param: value})
    if param not in SIM_ONLY:
        makers["bulk"] = lambda: BulkKernel(**{param: value})
    outcomes = {}
    for name, make in makers.items():
        out = attempt(make)
        CALLS[name] += 1
        assert out.kind in ("ok", "TypeError", "ValueError"), out
        if out.kind != "ok":
            assert names(out.message, param), out.message
        outcomes[name] = Outcome(out.kind, out.errno, out.message)  # not the kernels
    check(outcomes, f"constructor({param}={describe(value)})")


# --- the misuse table: what Linux 6.18 answers, on every engine -------------------------------------

OK = ("ok", None)


def oserr(err: int) -> tuple[str, int]:
    return ("OSError", err)


TYPE, VALUE = ("TypeError", None), ("ValueError", None)
EXITED = ("ProcessExitedError", None)


@dataclass(frozen=True)
class Misuse:
    """A call and the answer Linux gives; *unmodelled*: engines that may say NotModelledError."""

    name: str
    call: Callable[[World], object]
    expect: tuple[str, int | None]
    unmodelled: frozenset[str] = frozenset()


NO_BULK = frozenset({"bulk"})
BYTES_ONLY = frozenset({"bulk", "sim-fingerprint"})

MISUSES = (
    # madvise: spec of mm/madvise.c's checks, each checked on Linux by this table
    Misuse("madvise unaligned start", lambda w: w.p.madvise(w.a + 1, P, MADV_MERGEABLE),
           oserr(errno.EINVAL)),
    Misuse("madvise unaligned, length 0", lambda w: w.p.madvise(w.a + 1, 0, MADV_MERGEABLE),
           oserr(errno.EINVAL)),
    Misuse("madvise unmapped", lambda w: w.p.madvise(UNMAPPED, P, MADV_MERGEABLE),
           oserr(errno.ENOMEM)),
    Misuse("madvise unmapped, length 0", lambda w: w.p.madvise(UNMAPPED, 0, MADV_MERGEABLE), OK),
    Misuse("madvise unknown advice", lambda w: w.p.madvise(w.a, P, 12345), oserr(errno.EINVAL)),
    Misuse("madvise advice -1", lambda w: w.p.madvise(w.a, P, -1), oserr(errno.EINVAL)),
    Misuse("madvise range wraps", lambda w: w.p.madvise(2 ** 64 - P, 2 * P, MADV_UNMERGEABLE),
           oserr(errno.EINVAL)),
    Misuse("madvise length overflows", lambda w: w.p.madvise(w.a, 2 ** 64 - 1, MADV_MERGEABLE),
           oserr(errno.EINVAL)),
    Misuse("madvise beyond TASK_SIZE", lambda w: w.p.madvise(TASK_SIZE, P, MADV_MERGEABLE),
           oserr(errno.ENOMEM)),
    Misuse("madvise MADV_DONTNEED", lambda w: w.p.madvise(w.a, P, MADV_DONTNEED), OK, NO_BULK),
    Misuse("madvise MADV_REMOVE (9)", lambda w: w.p.madvise(w.a, P, 9), oserr(errno.EINVAL),
           frozenset(ENGINES)),
    Misuse("madvise negative address", lambda w: w.p.madvise(-P, P, MADV_MERGEABLE), VALUE),
    Misuse("madvise negative length", lambda w: w.p.madvise(w.a, -P, MADV_MERGEABLE), VALUE),
    Misuse("madvise address 2**64", lambda w: w.p.madvise(2 ** 64, P, MADV_MERGEABLE), VALUE),
    Misuse("madvise advice 2**31", lambda w: w.p.madvise(w.a, P, 2 ** 31), VALUE),
    Misuse("madvise str address", lambda w: w.p.madvise(str(w.a), P, MADV_MERGEABLE), TYPE),
    Misuse("madvise float length", lambda w: w.p.madvise(w.a, 4096.0, MADV_MERGEABLE), TYPE),
    Misuse("madvise bool advice", lambda w: w.p.madvise(w.a, P, True), TYPE),
    Misuse("madvise None advice", lambda w: w.p.madvise(w.a, P, None), TYPE),
    # write / read
    Misuse("write unmapped", lambda w: w.p.write(UNMAPPED, PAGE_C), oserr(errno.EFAULT)),
    Misuse("write unmapped, forced", lambda w: w.p.write(UNMAPPED, PAGE_C, force=True),
           oserr(errno.EIO)),
    Misuse("write past 2**64", lambda w: w.p.write(2 ** 64 - P, PAGE_C * 2), oserr(errno.EFAULT)),
    Misuse("write over a hole", lambda w: w.p.write(w.b - P, PAGE_C * 2), oserr(errno.EFAULT)),
    Misuse("write part of a page", lambda w: w.p.write(w.a + 1, b"x" * 100), OK, BYTES_ONLY),
    Misuse("write nothing anywhere", lambda w: w.p.write(UNMAPPED, b""), OK),
    Misuse("write str address", lambda w: w.p.write("a", PAGE_C), TYPE),
    Misuse("write str data", lambda w: w.p.write(w.a, "text"), TYPE),
    Misuse("write force=1", lambda w: w.p.write(w.a, PAGE_C, force=1), TYPE),
    Misuse("write negative address", lambda w: w.p.write(-1, PAGE_C), VALUE),
    Misuse("read unmapped", lambda w: w.p.read(UNMAPPED, 1), oserr(errno.EFAULT), BYTES_ONLY),
    Misuse("read unmapped, forced", lambda w: w.p.read(UNMAPPED, 1, force=True),
           oserr(errno.EIO), BYTES_ONLY),
    Misuse("read negative length", lambda w: w.p.read(w.a, -1), VALUE),
    # mmap
    Misuse("mmap length 0", lambda w: w.p.mmap(0), oserr(errno.EINVAL)),
    Misuse("mmap beyond TASK_SIZE", lambda w: w.p.mmap(TASK_SIZE + 1), oserr(errno.ENOMEM)),
    Misuse("mmap length 2**64-1", lambda w: w.p.mmap(2 ** 64 - 1), oserr(errno.ENOMEM)),
    Misuse("mmap unaligned offset", lambda w: w.p.mmap(P, offset=1), oserr(errno.EINVAL)),
    Misuse("mmap negative aligned offset", lambda w: w.p.mmap(P, offset=-P), OK),
    Misuse("mmap unknown PROT bits", lambda w: w.p.mmap(P, 0x80), OK, NO_BULK),
    Misuse("mmap no map type", lambda w: w.p.mmap(P, flags=MAP_ANONYMOUS),
           oserr(errno.EINVAL), NO_BULK),
    Misuse("mmap MAP_FIXED unaligned", lambda w: w.p.mmap(P, flags=ANON | MAP_FIXED, addr=w.a + 1),
           oserr(errno.EINVAL), NO_BULK),
    Misuse("mmap file without path", lambda w: w.p.mmap(P, PROT_READ, MAP_PRIVATE),
           oserr(errno.EBADF), NO_BULK),
    Misuse("mmap directory", lambda w: w.p.mmap(P, PROT_READ, MAP_PRIVATE, path=DIRECTORY),
           oserr(errno.ENODEV), NO_BULK),
    Misuse("mmap missing file", lambda w: w.p.mmap(P, PROT_READ, MAP_PRIVATE,
                                                   path="/nonexistent/ksmlab"),
           oserr(errno.ENOENT), NO_BULK),
    Misuse("mmap file at a negative offset",
           lambda w: w.p.mmap(P, PROT_READ, MAP_PRIVATE, path=FILE, offset=-P),
           oserr(errno.EOVERFLOW), NO_BULK),
    Misuse("mmap path and MAP_ANONYMOUS", lambda w: w.p.mmap(P, path=FILE), VALUE),
    Misuse("mmap node that does not exist", lambda w: w.p.mmap(P, node=1023), VALUE),
    Misuse("mmap negative length", lambda w: w.p.mmap(-P), VALUE),
    Misuse("mmap prot 2**31", lambda w: w.p.mmap(P, 2 ** 31), VALUE),
    Misuse("mmap str length", lambda w: w.p.mmap("4096"), TYPE),
    Misuse("mmap bytes path", lambda w: w.p.mmap(P, PROT_READ, MAP_PRIVATE, path=FILE.encode()),
           TYPE),
    # munmap / mprotect
    Misuse("munmap unaligned", lambda w: w.p.munmap(w.a + 1, P), oserr(errno.EINVAL)),
    Misuse("munmap length 0", lambda w: w.p.munmap(w.a, 0), oserr(errno.EINVAL)),
    Misuse("munmap at TASK_SIZE", lambda w: w.p.munmap(TASK_SIZE, P), oserr(errno.EINVAL)),
    Misuse("munmap unmapped", lambda w: w.p.munmap(UNMAPPED, P), OK),
    Misuse("munmap negative", lambda w: w.p.munmap(-P, P), VALUE),
    Misuse("mprotect unmapped", lambda w: w.p.mprotect(UNMAPPED, P, PROT_READ),
           oserr(errno.ENOMEM)),
    Misuse("mprotect unknown PROT bit", lambda w: w.p.mprotect(w.a, P, 0x10),
           oserr(errno.EINVAL)),
    Misuse("mprotect unknown PROT bit, unmapped", lambda w: w.p.mprotect(UNMAPPED, P, 0x80),
           oserr(errno.EINVAL)),
    Misuse("mprotect unknown PROT bit, length 0", lambda w: w.p.mprotect(w.a, 0, 0x80), OK),
    Misuse("mprotect range wraps", lambda w: w.p.mprotect(w.a, 2 ** 64 - P, 0x80),
           oserr(errno.ENOMEM)),
    Misuse("mprotect PROT_SEM", lambda w: w.p.mprotect(w.a, P, 0x8 | RW), OK),
    Misuse("mprotect PROT_GROWSDOWN, not a stack", lambda w: w.p.mprotect(w.a, P, 0x01000000 | RW),
           oserr(errno.EINVAL)),
    Misuse("mprotect both GROWS bits, length 0", lambda w: w.p.mprotect(w.a, 0, 0x03000000),
           oserr(errno.EINVAL)),
    Misuse("mprotect float prot", lambda w: w.p.mprotect(w.a, P, 1.0), TYPE),
    # prctl
    Misuse("prctl unknown option", lambda w: w.p.prctl(12345), oserr(errno.EINVAL)),
    Misuse("prctl option -1", lambda w: w.p.prctl(-1), oserr(errno.EINVAL)),
    Misuse("prctl PR_SET_MEMORY_MERGE with arg3", lambda w: w.p.prctl(PR_SET_MEMORY_MERGE, 1, 1),
           oserr(errno.EINVAL)),
    Misuse("prctl PR_GET_MEMORY_MERGE with arg2 2**63",
           lambda w: w.p.prctl(PR_GET_MEMORY_MERGE, 2 ** 63), oserr(errno.EINVAL)),
    Misuse("prctl option 2**31", lambda w: w.p.prctl(2 ** 31), VALUE),
    Misuse("prctl negative arg2", lambda w: w.p.prctl(PR_SET_MEMORY_MERGE, -1), VALUE),
    Misuse("prctl str option", lambda w: w.p.prctl("67"), TYPE),
    # views
    Misuse("pfns negative address", lambda w: w.p.pfns(-1, P), VALUE),
    Misuse("pfns str address", lambda w: w.p.pfns("a", P), TYPE),
    Misuse("pfns past 2**64", lambda w: w.p.pfns(2 ** 64 - P, 2 * P), VALUE),
    Misuse("pfns too many pages", lambda w: w.p.pfns(0, (MAX_VIEW_PAGES + 1) * P), VALUE),
    Misuse("pfns beyond TASK_SIZE", lambda w: w.p.pfns(TASK_SIZE, 2 * P), OK, NO_BULK),
    # the kernel
    Misuse("wait_full_scans(1.5)", lambda w: w.k.wait_full_scans(1.5), TYPE),
    Misuse("wait_full_scans('2')", lambda w: w.k.wait_full_scans("2"), TYPE),
    Misuse("wait_full_scans(True)", lambda w: w.k.wait_full_scans(True), TYPE),
    Misuse("wait_full_scans(-1)", lambda w: w.k.wait_full_scans(-1), VALUE),
    Misuse("wait_full_scans(timeout=-1)", lambda w: w.k.wait_full_scans(1, timeout=-1), VALUE),
    Misuse("wait_full_scans(timeout=nan)",
           lambda w: w.k.wait_full_scans(1, timeout=float("nan")), VALUE),
    Misuse("wait_full_scans(timeout='1')", lambda w: w.k.wait_full_scans(1, timeout="1"), TYPE),
    Misuse("wait_full_scans(0)", lambda w: w.k.wait_full_scans(0), OK),
    Misuse("advance(-1)", lambda w: w.k.advance(-1), VALUE),
    Misuse("advance(inf)", lambda w: w.k.advance(float("inf")), VALUE),
    Misuse("advance(1e300)", lambda w: w.k.advance(1e300), VALUE),
    Misuse("advance(True)", lambda w: w.k.advance(True), TYPE),
    Misuse("advance('1')", lambda w: w.k.advance("1"), TYPE),
    # an exited process: arguments first, then the process
    Misuse("exited: mmap", lambda w: w.gone.mmap(P), EXITED),
    Misuse("exited: madvise", lambda w: w.gone.madvise(w.a, P, MADV_MERGEABLE), EXITED),
    Misuse("exited: madvise bad address", lambda w: w.gone.madvise("a", P, MADV_MERGEABLE), TYPE),
    Misuse("exited: write", lambda w: w.gone.write(w.a, PAGE_C), EXITED),
    Misuse("exited: munmap", lambda w: w.gone.munmap(w.a, P), EXITED),
    Misuse("exited: prctl", lambda w: w.gone.prctl(PR_GET_MEMORY_MERGE), EXITED),
    Misuse("exited: pfns", lambda w: w.gone.pfns(w.a, P), EXITED),
    Misuse("exited: ksm_stat", lambda w: w.gone.ksm_stat(), EXITED),
    Misuse("exited: fork", lambda w: w.gone.fork(), EXITED),
    Misuse("exited: exit", lambda w: w.gone.exit(), EXITED),
    # what the bulk engine does not model
    Misuse("read", lambda w: w.p.read(w.a, 10), OK, BYTES_ONLY),
    Misuse("exec", lambda w: w.child.exec(), OK),
    Misuse("smaps", lambda w: w.p.smaps(), OK, NO_BULK),
    Misuse("mmap MAP_SHARED", lambda w: w.p.mmap(P, flags=MAP_SHARED | MAP_ANONYMOUS), OK, NO_BULK),
)


def run_misuse(w: World, m: Misuse) -> None:
    before = snapshot(w)
    out = attempt(lambda: m.call(w))
    CALLS[w.engine] += 1
    if out.kind == "NotModelledError" and w.engine in m.unmodelled:
        assert snapshot(w) == before, f"{m.name}: NotModelledError changed the state"
        return
    assert (out.kind, out.errno) == m.expect, (
        f"{m.name} on {w.engine}: {out.kind} {errname(out.errno)} {out.message!r}, "
        f"expected {m.expect[0]} {errname(m.expect[1])}")
    if out.kind != "ok":
        assert snapshot(w) == before, f"{m.name} on {w.engine}: the refusal changed the state"


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("m", MISUSES, ids=[m.name for m in MISUSES])
def test_misuse_table(engine: str, m: Misuse) -> None:
    run_misuse(build(engine, scan=False), m)


@pytest.fixture(scope="module")
def linux_kernel() -> Iterator[Any]:
    """One LinuxKernel session (boot knobs: ksmd stopped) for the whole table."""
    from linux_support import session_at_boot_knobs, skip_unless_ksm_usable

    skip_unless_ksm_usable()
    with session_at_boot_knobs() as k:
        yield k


@pytest.mark.linux
@pytest.mark.parametrize("m", MISUSES, ids=[m.name for m in MISUSES])
def test_misuse_table_on_linux(linux_kernel: Any, m: Misuse) -> None:
    """The expected answers above are Linux 6.18's: the real kernel gives each of them."""
    w = build("linux", linux_kernel, scan=False)
    try:
        run_misuse(w, m)
    finally:
        for proc in (w.p, w.child):
            if not proc.exited:
                proc.exit()


# --- regressions -------------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
def test_regressions_found_by_a_user(engine: str) -> None:
    """pfns(-1, 4096) returned [None, None]; pfns("a", 4096) leaked a TypeError about >>;
    wait_full_scans(1.5) was accepted; wait_full_scans("2") leaked a comparison error."""
    w = build(engine, scan=False)
    with pytest.raises(ValueError) as v:
        w.p.pfns(-1, 4096)
    assert str(v.value) == "addr must be an unsigned 64-bit int (0 <= addr < 2**64), got -1"
    with pytest.raises(TypeError) as t:
        w.p.pfns("a", 4096)
    assert str(t.value) == "addr must be an int, not str: 'a'"
    with pytest.raises(TypeError) as t:
        w.k.wait_full_scans(1.5)
    assert str(t.value) == "n must be an int, not float: 1.5"
    with pytest.raises(TypeError) as t:
        w.k.wait_full_scans("2")
    assert str(t.value) == "n must be an int, not str: '2'"


@pytest.mark.parametrize("engine", ENGINES)
def test_bulk_drift_is_gone(engine: str) -> None:
    """madvise(a + 1, ...) and a write to unmapped memory give the kernel's errnos on
    every engine (BulkKernel used to raise ValueError for both)."""
    w = build(engine, scan=False)
    with pytest.raises(OSError) as e:
        w.p.madvise(w.a + 1, P, MADV_MERGEABLE)
    assert e.value.errno == errno.EINVAL
    with pytest.raises(OSError) as e:
        w.p.write(UNMAPPED, PAGE_C)
    assert e.value.errno == errno.EFAULT
