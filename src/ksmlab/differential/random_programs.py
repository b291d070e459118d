# SPDX-License-Identifier: GPL-2.0-only
"""Seeded random differential programs: :func:`random_program`.

The steps are drawn in advance, so the model and the kernel make the same
calls; ``str(program)`` lists them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ksmlab.constants import (
    MADV_DONTNEED,
    MADV_MERGEABLE,
    MADV_UNMERGEABLE,
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    MAP_SHARED,
    PAGE_SIZE,
    PR_SET_MEMORY_MERGE,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
)
from ksmlab.differential.proxies import _ADVICE
from ksmlab.differential.records import Checkpoint, Program

if TYPE_CHECKING:
    from ksmlab.api import Kernel, Process

__all__ = ["BULK_OPS", "PATTERNS", "random_program"]

P = PAGE_SIZE


PATTERNS: tuple[bytes, ...] = (b"A" * P, b"B" * P, b"C" * P, bytes(P))
"""The page contents random programs write (the last one is a zero-filled page)."""

ALL_OPS = frozenset({"knob", "spawn", "wait", "cp", "mmap", "madvise", "write", "poke", "read",
                     "mprotect", "munmap", "prctl", "fork", "exec", "exit"})
"""Every step a random program can take."""

BULK_OPS = frozenset({"knob", "spawn", "wait", "cp", "mmap", "madvise", "write", "mprotect",
                      "munmap", "prctl", "fork", "exec", "exit"})
"""The steps the bulk engine models (docs/bulk.md): with ``engine="bulk"`` a
program also maps only private memory and advises only MADV_(UN)MERGEABLE.
Its records have no vmas and no page frames (the engine keeps neither), so
munmap and mprotect are compared through the calls' results, the counters,
``ksm_stat`` and the layouts."""


@dataclass(frozen=True, slots=True)
class _Step:
    """One step of a random program: an operation name and its arguments."""

    op: str
    args: tuple[object, ...] = ()

    def __str__(self) -> str:
        args = [_ADVICE.get(a, a) if self.op == "madvise" and isinstance(a, int) and i == 4
                else a for i, a in enumerate(self.args)]
        return f"{self.op}({', '.join(str(a) for a in args)})"


class _RandomProgram:
    """A program made of pre-generated steps (so both runs make the same calls)."""

    def __init__(self, name: str, steps: list[_Step]) -> None:
        self.steps = steps
        self.__name__ = name

    def __str__(self) -> str:
        return "\n".join([self.__name__, *(f"  {s}" for s in self.steps)])

    def __call__(self, k: Kernel, cp: Checkpoint) -> None:
        procs: dict[str, Process] = {}
        base: dict[str, int] = {}

        def at(r: object, first: object) -> int:
            return base[str(r)] + int(str(first)) * P

        for st in self.steps:
            op, a = st.op, st.args
            if op == "knob":
                k.sysfs[str(a[0])] = str(a[1])
            elif op == "spawn":
                procs[str(a[0])] = k.spawn()
            elif op == "wait":
                k.wait_full_scans(int(str(a[0])))
                cp(f"after {a[0]} scan(s)")
            elif op == "cp":
                cp(str(a[0]))
            else:
                p = procs[str(a[0])]
                if op == "mmap":
                    flags = (MAP_SHARED if a[3] else MAP_PRIVATE) | MAP_ANONYMOUS
                    base[str(a[1])] = p.mmap(int(str(a[2])) * P, PROT_READ | PROT_WRITE, flags)
                elif op == "madvise":
                    p.madvise(at(a[1], a[2]), int(str(a[3])) * P, int(str(a[4])))
                elif op == "write":
                    p.write(at(a[1], a[2]), PATTERNS[int(str(a[4]))] * int(str(a[3])),
                            force=bool(a[5]))
                elif op == "poke":
                    p.write(at(a[1], a[2]) + int(str(a[3])), b"!", force=bool(a[4]))
                elif op == "read":
                    p.read(at(a[1], a[2]), int(str(a[3])) * P, force=bool(a[4]))
                elif op == "mprotect":
                    p.mprotect(at(a[1], a[2]), int(str(a[3])) * P, int(str(a[4])))
                elif op == "munmap":
                    p.munmap(at(a[1], a[2]), int(str(a[3])) * P)
                elif op == "prctl":
                    p.prctl(PR_SET_MEMORY_MERGE, int(str(a[1])))
                elif op == "fork":
                    procs[str(a[1])] = p.fork()
                elif op == "exec":
                    p.exec()
                elif op == "exit":
                    p.exit()
                else:
                    raise ValueError(f"unknown step {st}")


def random_program(seed: int, *, steps: int = 50, max_procs: int = 4, max_pages: int = 8,
                   merge_any: bool = False, engine: str = "sim") -> Program:
    """A seeded random program: a few processes, small areas, pages from :data:`PATTERNS`.

    The steps are drawn in advance from ``random.Random(seed)`` against an
    abstract picture of the program's state (live processes, their regions
    and sizes), never from what a backend returns, so the model and the
    kernel make the same calls.  ``str(program)`` lists them.

    Args:
        steps: how many operations to draw (besides the set-up and the end).
        max_procs: at most this many live processes.
        max_pages: the largest region, in pages.
        merge_any: the first process sets prctl(PR_SET_MEMORY_MERGE, 1) (its
            children inherit it), and processes may set or clear it later.
        engine: ``"sim"`` (every step) or ``"bulk"``: only what the bulk
            engine models (:data:`BULK_OPS`); a step it does not model is
            drawn and dropped, so the rest of the program is what it would be.
    """
    if engine not in ("sim", "bulk"):
        raise ValueError(f"engine must be 'sim' or 'bulk', got {engine!r}")
    ops = ALL_OPS if engine == "sim" else BULK_OPS
    if merge_any and "prctl" not in ops:
        raise ValueError(f"merge_any needs prctl, which engine {engine!r} does not model")
    rng = random.Random(seed)
    out: list[_Step] = []
    procs: dict[str, dict[str, int]] = {}  # live process -> {region: pages}
    shared: set[str] = set()
    counter = {"P": 0, "r": 0}

    def new(kind: str) -> str:
        label = f"{kind}{counter[kind]}"
        counter[kind] += 1
        return label

    def add(op: str, *args: object) -> None:
        if op in ops:
            out.append(_Step(op, args))

    def spawn() -> str:
        label = new("P")
        procs[label] = {}
        add("spawn", label)
        return label

    def mmap(pl: str) -> None:
        r, n = new("r"), rng.randint(1, max_pages)
        is_shared = rng.random() < 0.08 and engine == "sim"
        procs[pl][r] = n
        if is_shared:
            shared.add(r)
        add("mmap", pl, r, n, is_shared)
        if rng.random() < 0.5:
            add("madvise", pl, r, 0, n, MADV_MERGEABLE)

    add("knob", "pages_to_scan", rng.choice(("10000", "10000", "7")))
    add("knob", "sleep_millisecs", "0")
    add("knob", "smart_scan", rng.choice(("0", "1")))
    add("knob", "use_zero_pages", rng.choice(("0", "0", "1")))
    # The bulk engine finds a chain's stale dups at other moments than the
    # kernel's tree walk (docs/bulk.md): its programs keep to one dup per content.
    mps = rng.choice(("256", "256", "2", "3"))
    add("knob", "max_page_sharing", "256" if engine == "bulk" else mps)
    add("knob", "run", "1")
    first = spawn()
    if merge_any:
        add("prctl", first, 1)

    for _ in range(steps):
        roll = rng.random()
        regions = [(pl, r, n) for pl, regs in procs.items() for r, n in regs.items()]
        if not regions or roll < 0.05:
            if len(procs) < max_procs and (roll < 0.02 or not procs):
                spawn()
            elif procs:
                mmap(rng.choice(sorted(procs)))
            continue
        pl, r, n = rng.choice(regions)
        lo = rng.randrange(n)
        cnt = rng.randint(1, n - lo)
        force = rng.random() < 0.1
        if roll < 0.12:
            mmap(pl)
        elif roll < 0.36:
            add("write", pl, r, lo, cnt, rng.randrange(len(PATTERNS)), force)
        elif roll < 0.42:
            add("poke", pl, r, lo, rng.randrange(P), force)
        elif roll < 0.56:
            advice = rng.choice((MADV_MERGEABLE, MADV_MERGEABLE, MADV_UNMERGEABLE,
                                 MADV_DONTNEED))
            if advice == MADV_DONTNEED and engine != "sim":
                continue
            add("madvise", pl, r, lo, cnt, advice)
        elif roll < 0.72:
            add("wait", rng.choice((1, 1, 2, 3)))
        elif roll < 0.77 and len(procs) < max_procs:
            child = new("P")
            procs[child] = dict(procs[pl])
            add("fork", pl, child)
        elif roll < 0.81 and len(procs) > 1:
            del procs[pl]
            add("exit", pl)
        elif roll < 0.82:
            if "exec" in ops:
                procs[pl].clear()
            add("exec", pl)
        elif roll < 0.85:
            if lo == 0 and cnt == n and "munmap" in ops:
                del procs[pl][r]
            add("munmap", pl, r, lo, cnt)
        elif roll < 0.90:
            if r not in shared:  # a read fault on shmem maps its neighbours: see the doc
                add("read", pl, r, lo, cnt, force)
        elif roll < 0.94:
            prot = rng.choice((PROT_NONE, PROT_READ, PROT_READ | PROT_WRITE,
                               PROT_READ | PROT_WRITE))
            add("mprotect", pl, r, lo, cnt, prot)
        elif roll < 0.96:
            add("cp", "anywhere")
        elif roll < 0.965 and merge_any:
            add("prctl", pl, rng.choice((0, 1)))
        elif roll < 0.985:
            knobs = [("use_zero_pages", "0"), ("use_zero_pages", "1"), ("smart_scan", "0"),
                     ("smart_scan", "1")]
            if engine == "sim":
                knobs += [("max_page_sharing", "2"), ("max_page_sharing", "256")]
            add("knob", *rng.choice(knobs))
        else:
            add("knob", "run", "2")
            add("knob", "run", "1")
    add("wait", 2)
    extra = (", merge_any=True" if merge_any else "") + (f", engine={engine!r}"
                                                         if engine != "sim" else "")
    name = f"random_program({seed}{extra})"
    return _RandomProgram(name, out)

