# SPDX-License-Identifier: GPL-2.0-only
"""The model is deterministic: the same program gives the same machine, bit for bit.

A seeded :class:`random.Random` writes a program of a few hundred calls
(mmap, writes of shared patterns, madvise, fork, exec, exit, munmap, prctl,
knob writes, virtual time and full scans).  Run twice on two fresh
SimKernels, it must give identical counters, ``ksm_stat``, page frame
numbers, call results and trace events.  The last test also reruns it in
fresh interpreters with different hash seeds, so no result can depend on
``id()`` or ``hash()`` ordering.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ksmlab import (
    MADV_DONTNEED,
    MADV_MERGEABLE,
    MADV_UNMERGEABLE,
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    MAP_SHARED,
    PAGE_SIZE,
    PR_SET_MEMORY_MERGE,
    ScanStalledError,
    SimKernel,
    SimProcess,
)

P = PAGE_SIZE
CONTENTS = (bytes(P), b"\x11" * P, b"\x22" * P, bytes(range(256)) * (P // 256))


def run_scenario(seed: int, steps: int = 200) -> dict[str, Any]:
    """Play the program of *seed* on a fresh SimKernel; return everything observable."""
    rnd = random.Random(seed)
    k = SimKernel()
    k.sysfs["max_page_sharing"] = rnd.choice(["2", "3", "256"])
    k.sysfs["use_zero_pages"] = rnd.choice(["0", "1"])
    k.sysfs["run"] = "1"
    procs: list[SimProcess] = [k.spawn()]
    areas: dict[int, list[tuple[int, int]]] = {procs[0].pid: []}
    log: list[str] = []

    def area(p: SimProcess) -> tuple[int, int] | None:
        return rnd.choice(areas[p.pid]) if areas[p.pid] else None

    for _ in range(steps):
        p = rnd.choice(procs)
        op = rnd.choice(["mmap", "write", "write", "madvise", "madvise", "fork", "exit", "exec",
                         "munmap", "prctl", "knob", "advance", "scan", "scan"])
        try:
            if op == "mmap":
                n = rnd.randint(1, 8)
                flags = (MAP_SHARED if rnd.random() < 0.2 else MAP_PRIVATE) | MAP_ANONYMOUS
                addr = p.mmap(n * P, flags=flags)
                areas[p.pid].append((addr, n))
                log.append(f"mmap {addr:#x} {n}")
                p.write(addr, rnd.choice(CONTENTS) * n)
                if rnd.random() < 0.7:
                    p.madvise(addr, n * P, MADV_MERGEABLE)
            elif op == "write" and (a := area(p)):
                page = a[0] + rnd.randrange(a[1]) * P
                data = rnd.choice(CONTENTS) if rnd.random() < 0.8 else rnd.randbytes(P)
                p.write(page, data[:rnd.choice([P, 1, 100])])
            elif op == "madvise" and (a := area(p)):
                advice = rnd.choice([MADV_MERGEABLE, MADV_MERGEABLE, MADV_UNMERGEABLE, MADV_DONTNEED])
                p.madvise(a[0], a[1] * P, advice)
            elif op == "fork" and len(procs) < 5:
                child = p.fork()
                procs.append(child)
                areas[child.pid] = list(areas[p.pid])
                log.append(f"fork {p.pid} -> {child.pid}")
            elif op == "exit" and len(procs) > 1:
                p.exit()
                procs.remove(p)
            elif op == "exec":
                p.exec()
                areas[p.pid] = []
            elif op == "munmap" and (a := area(p)):
                p.munmap(a[0], a[1] * P)
                areas[p.pid].remove(a)
            elif op == "prctl":
                p.prctl(PR_SET_MEMORY_MERGE, rnd.randint(0, 1))
            elif op == "knob":
                name, value = rnd.choice([("run", "1"), ("run", "1"), ("run", "1"), ("run", "2"),
                                          ("run", "0"),
                                          ("smart_scan", "0"), ("smart_scan", "1"),
                                          ("pages_to_scan", "7"), ("pages_to_scan", "100")])
                k.sysfs[name] = value
            elif op == "advance":
                k.advance(rnd.randint(0, 100))
            elif op == "scan":
                k.wait_full_scans(1)
        except OSError as e:
            log.append(f"{op}: errno {e.errno}")
        except ScanStalledError:
            log.append("scan: stalled")
    return {
        "sysfs": k.sysfs.snapshot(),
        "ksm_stat": {p.pid: p.ksm_stat() for p in procs},
        "smaps": {p.pid: [repr(e) for e in p.smaps()] for p in procs},
        "pfns": {p.pid: [p.pfns(a, n * P) for a, n in areas[p.pid]] for p in procs},
        "time": (k.now_ns, k.ksmd_cpu_ns, k.cow_ksm, k.phys.nr_frames),
        "log": log,
        "events": [(e.time_ns, e.name, sorted(e.fields.items())) for e in k.events],
    }


def digest(outcome: dict[str, Any]) -> str:
    """A short fingerprint of an outcome (for comparing across interpreters)."""
    return hashlib.sha256(json.dumps(outcome, sort_keys=True, default=repr).encode()).hexdigest()


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 42])
def test_same_seed_same_machine(seed: int) -> None:
    """Two fresh kernels running the same seeded program end identical, events included."""
    first, second = run_scenario(seed), run_scenario(seed)
    assert first["events"], "the program should make ksmd do something"
    for key in first:
        assert first[key] == second[key], f"seed {seed}: {key} differs between two runs"


def test_scenarios_really_merge() -> None:
    """The programs exercise KSM (otherwise determinism would be trivially true)."""
    outcomes = [run_scenario(seed) for seed in range(5)]
    assert any(int(o["sysfs"]["pages_sharing"]) > 0 or
               any(e[1] == "ksm_merge_with_ksm_page" for e in o["events"]) for o in outcomes)


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_any_seed_is_deterministic(seed: int) -> None:
    """For any seed, two runs of its (shorter) program agree on everything."""
    assert run_scenario(seed, steps=80) == run_scenario(seed, steps=80)


@pytest.mark.slow
def test_same_result_in_other_interpreters() -> None:
    """Fresh interpreters with different PYTHONHASHSEEDs reproduce this process's result."""
    here = digest(run_scenario(7))
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import test_determinism as t; "
            "print(t.digest(t.run_scenario(7)))")
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)],
                             env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == here, f"PYTHONHASHSEED={hash_seed} gives another result"
