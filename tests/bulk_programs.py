"""Random programs for the bulk engine's equivalence tests.

A program is a list of operations within what :class:`ksmlab.bulk.BulkKernel`
models (mmap on a NUMA node, munmap, mprotect, whole-page writes (forced or
not), MADV_(UN)MERGEABLE, prctl PR_SET/GET_MEMORY_MERGE (and refused prctls),
fork, exec, exit, knobs including max_page_sharing and merge_across_nodes
changes, run=2, the scan-time advisor and its knobs, ksmd batches), on a
machine of 1 to 3 NUMA nodes (its first operation, ``("machine", nodes)``;
:func:`sim` and :func:`bulk` make the kernels).  munmap and mprotect ranges
may run past a mapping, over holes and into the next mappings, and some calls
are refused (their errnos are compared).  :func:`execute` runs one on any
kernel and records a snapshot after every operation and every ksmd batch, so
two kernels can be compared step by step.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from helpers import COUNTERS
from ksmlab import MADV_HUGEPAGE, MADV_MERGEABLE, MADV_UNMERGEABLE, PAGE_SIZE, SimKernel
from ksmlab.bulk import BulkKernel
from ksmlab.bulk.columns import STABLE, UNSTABLE
from ksmlab.constants import (
    MADV_NOHUGEPAGE,
    PR_GET_MEMORY_MERGE,
    PR_SET_MEMORY_MERGE,
    PROT_EXEC,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
)
from ksmlab.ksm.types import NodeKind
from ksmlab.mm.page import fingerprint

Op = tuple[Any, ...]
Kernel = SimKernel | BulkKernel


TREE_WALK = ("pages_shared", "pages_sharing", "pages_volatile", "stable_node_chains",
             "stable_node_dups", "general_profit")
"""Counters that can move at a different moment when the kernel's tree walk passes
another content's stale node or chain (bulk engine model choice, see bulk/engine.py)."""


PRCTLS: tuple[tuple[int, ...], ...] = (
    (PR_SET_MEMORY_MERGE, 1), (PR_SET_MEMORY_MERGE, 1), (PR_SET_MEMORY_MERGE, 7),
    (PR_SET_MEMORY_MERGE, 0), (PR_SET_MEMORY_MERGE, 0), (PR_GET_MEMORY_MERGE,),
    (PR_GET_MEMORY_MERGE,), (PR_SET_MEMORY_MERGE, 1, 1), (PR_SET_MEMORY_MERGE, 0, 0, 0, 1),
    (PR_GET_MEMORY_MERGE, 1), (12345,),
)
"""prctl calls of the random programs: merge-any on (any non-zero arg2) and off, the query,
and three EINVAL cases (an extra argument to each option, an unknown option)."""


def page(tag: int) -> bytes:
    """Page content number *tag*; tag 0 is the zero page."""
    return bytes(PAGE_SIZE) if tag == 0 else tag.to_bytes(8, "little") * (PAGE_SIZE // 8)


TAGS = 6
"""Contents the programs write: page(0) .. page(TAGS - 1)."""
THP_TAGS = range(8, 8 + 1536)
"""Tags thp_program writes besides 0 to 3: one per page of three extents."""
TAG_OF = {key: t for t in (*range(8), *THP_TAGS) for key in (page(t), fingerprint(page(t)))}
"""A page's tag from its bytes or its fingerprint (numa_program writes tags up to 6)."""
PROTS = (PROT_READ, PROT_NONE, PROT_READ | PROT_WRITE, PROT_READ | PROT_EXEC,
         PROT_READ | PROT_WRITE | PROT_EXEC, PROT_WRITE, 0x8 | PROT_READ)
"""mprotect's protections (0x8 is PROT_SEM, allowed and ignored)."""
BAD_PROTS = (0x10, 0x01000000 | PROT_READ, 0x02000000, 0x03000000)
"""mprotect's refused protections: an unknown bit, PROT_GROWSDOWN/UP on an area that does
not grow, both (EINVAL)."""


def _span(r: random.Random, sizes: dict[int, int],
          dead: set[tuple[int, int]]) -> tuple[int, int, int]:
    """(mapping, first page, end page) of a range, mostly of pages not unmapped."""
    m = r.choice(list(sizes))
    live = [i for i in range(sizes[m]) if (m, i) not in dead]
    if live and r.random() < 0.85:
        i = r.choice(live)
        j = i + 1
        while j < sizes[m] and (m, j) not in dead and r.random() < 0.85:
            j += 1
        return m, i, j
    i = r.randrange(sizes[m])
    return m, i, r.randint(i + 1, sizes[m])


def _unmap_op(r: random.Random, p: int, sizes: dict[int, int],
              dead: set[tuple[int, int]]) -> Op:
    """A munmap or mprotect of a range that may run past its mapping (over holes, into the
    next mappings up), now and then refused (unaligned, empty, bad protection)."""
    m, i, j = _span(r, sizes, dead)
    if r.random() < 0.3:
        j += r.randint(1, 16)  # beyond the mapping: holes, other mappings, or nothing
    length = (j - i) * PAGE_SIZE - r.choice([0, 0, 0, 100, PAGE_SIZE - 1])
    shift = r.choice([0] * 30 + [1, PAGE_SIZE // 2])
    if r.random() < 0.03:
        length = 0
    if r.random() < 0.5:
        if not shift and length:
            dead |= {(m, k) for k in range(i, min(j, sizes[m]))}
        return ("munmap", p, m, i, shift, length)
    prot = r.choice(PROTS) if r.random() < 0.93 else r.choice(BAD_PROTS)
    return ("mprotect", p, m, i, shift, length, prot)


ADVISOR_KNOBS = {
    "advisor_max_cpu": ["0", "10", "70", "500"],
    "advisor_min_pages_to_scan": ["1", "2", "7", "50"],
    "advisor_max_pages_to_scan": ["3", "10", "60", "30000"],
    "advisor_target_scan_time": ["1", "2", "200"],
}
"""Values for the advisor's knobs that keep batches small enough to interleave."""


def advisor_op(r: random.Random) -> Op:
    """A write of one of the advisor's knobs, of ``advisor_mode``, or of a knob it reads."""
    x = r.random()
    if x < 0.3:
        return ("knob", "advisor_mode", r.choice(["none", "scan-time"]))
    if x < 0.8:
        name = r.choice(sorted(ADVISOR_KNOBS))
        return ("knob", name, r.choice(ADVISOR_KNOBS[name]))
    if x < 0.9:
        return ("knob", "pages_to_scan", str(r.choice([1, 3, 7, 50])))  # EINVAL under scan-time
    return ("knob", "sleep_millisecs", r.choice(["0", "20", "700"]))


def program(r: random.Random, steps: int = 60) -> list[Op]:
    """A random program: few contents so that pages merge, split and go stale, spread over
    1 to 3 NUMA nodes, with merge_across_nodes and the advisor changing on the way."""
    nodes = r.choice([1, 2, 3])
    ops: list[Op] = [
        ("machine", nodes),
        ("knob", "max_page_sharing", r.choice(["2", "3", "256"])),
        ("knob", "use_zero_pages", r.choice("01")),
        ("knob", "smart_scan", r.choice("01")),
        ("knob", "pages_to_scan", str(r.choice([1, 3, 7, 50]))),
        ("knob", "sleep_millisecs", r.choice(["0", "0", "20", "700"])),
        ("knob", "stable_node_chains_prune_millisecs", r.choice(["0", "5", "2000"])),
        ("knob", "merge_across_nodes", r.choice("01")),
    ]
    if r.random() < 0.5:  # the advisor from the start, with its knobs set first
        ops += [("knob", name, r.choice(values)) for name, values in ADVISOR_KNOBS.items()]
        ops.append(("knob", "advisor_mode", "scan-time"))
    ops.append(("spawn",))
    # Mappings are named by the number of the mmap in the program, so an operation still
    # names the same one when keep_tree_stable drops an exec (which empties the map).
    live, sizes, nprocs, nmaps = [0], {0: dict[int, int]()}, 1, 0
    dead: dict[int, set[tuple[int, int]]] = {0: set()}  # (mapping, page) unmapped, roughly
    for _ in range(steps):
        x = r.random()
        mapped = [p for p in live if sizes[p]]
        if x < 0.12:
            p = r.choice(live)
            n = r.randint(1, 12)
            ops.append(("mmap", p, n, r.choice([None, *range(nodes)])))
            sizes[p][nmaps] = n
            nmaps += 1
        elif x < 0.50 and mapped:
            p = r.choice(mapped)
            m, i, j = _span(r, sizes[p], dead[p])
            if x < 0.40:
                ops.append(("write", p, m, i, [r.randrange(TAGS) for _ in range(j - i)],
                            r.random() < 0.1))
            else:
                ops.append(("madvise", p, m, i, j, r.random() < 0.75))
        elif x < 0.55 and len(live) < 6:
            p = r.choice(live)
            ops.append(("fork", p))
            live.append(nprocs)
            sizes[nprocs] = dict(sizes[p])
            dead[nprocs] = set(dead[p])
            nprocs += 1
        elif x < 0.58 and len(live) > 1:
            p = r.choice(live)
            ops.append(("exit", p))
            live.remove(p)
        elif x < 0.62:
            ops.append(("run", r.choice("0112")))
        elif x < 0.64:
            ops.append(("knob", "max_page_sharing", r.choice(["2", "3", "256"])))
        elif x < 0.66:
            ops.append(("knob", "merge_across_nodes", r.choice("01")))
        elif x < 0.70:
            ops.append(advisor_op(r))
        elif x < 0.74:
            ops.append(("prctl", r.choice(live), *r.choice(PRCTLS)))
        elif x < 0.76:
            p = r.choice(live)
            ops.append(("exec", p))
            sizes[p], dead[p] = {}, set()
        elif x < 0.84 and mapped:
            p = r.choice(mapped)
            op = _unmap_op(r, p, sizes[p], dead[p])
            ops.append(op)
            if op[0] == "munmap" and r.random() < 0.5:
                # Map again at once, on any node: the gap is reused, and its pages find
                # the items the old ones left (if ksmd has not passed them yet).
                n = r.randint(1, max(1, op[5] // PAGE_SIZE))
                ops += [("mmap", p, n, r.choice([None, *range(nodes)])),
                        ("write", p, nmaps, 0, [r.randrange(TAGS) for _ in range(n)], False),
                        ("madvise", p, nmaps, 0, n, True)]
                sizes[p][nmaps] = n
                nmaps += 1
        else:
            ops.append(("batches", r.randint(1, 4)))
    ops += [("run", "1"), ("batches", 40)]
    return ops


def unmerge_program(r: random.Random, steps: int = 40) -> list[Op]:
    """A random program that merges, then unmerges everything (run=2) and changes
    max_page_sharing around it: while KSM pages exist (EBUSY), after some
    sharers went (unmapped nodes removed first), and after run=2; merge_across_nodes
    after run=2 too."""
    ops = program(r, steps)
    for _ in range(r.randint(1, 3)):
        mps = r.choice(["2", "3", "256"])
        ops.append(("knob", "max_page_sharing", mps))
        if r.random() < 0.5:  # some pages leave their KSM pages first
            gone = {op[1] for op in ops if op[0] in ("exit", "exec")}  # old mappings gone
            procs = sorted({op[1] for op in ops if op[0] == "madvise"} - gone)
            if procs:
                p = r.choice(procs)
                m, i, j = next(op[2:5] for op in ops if op[0] == "madvise" and op[1] == p)
                ops.append(("madvise", p, m, i, j, False))
                ops.append(("batches", r.randint(1, 30)))
                ops.append(("knob", "max_page_sharing", r.choice(["2", "3", "256"])))
        ops += [("run", "2"), ("knob", "max_page_sharing", r.choice(["2", "3", "256"])),
                ("knob", "merge_across_nodes", r.choice("01")),
                ("batches", 1), ("run", r.choice("12")), ("batches", r.randint(1, 40))]
    ops += [("run", "1"), ("batches", 40)]
    return ops


def numa_program(r: random.Random, steps: int = 40) -> list[Op]:
    """A random program that flips merge_across_nodes while ksmd is mid-scan.

    One process maps areas on 2 or 3 nodes holding a few contents, so equal
    pages sit on different nodes (not on one), node 0's scanned last; small batches leave
    pages of the current scan in the unstable trees when the knob changes
    (allowed while no KSM page exists): a page filed in node 0's tree under 1
    is then a partner on another node, refused under 0, and a node's tree
    goes unsearched under 1.
    """
    nodes = r.choice([2, 3])
    ops: list[Op] = [
        ("machine", nodes),
        ("knob", "pages_to_scan", r.choice("123")),
        ("knob", "sleep_millisecs", "0"),
        ("knob", "max_page_sharing", r.choice(["2", "256"])),
        ("knob", "smart_scan", r.choice("01")),
        ("knob", "merge_across_nodes", r.choice("01")),
        ("spawn",),
    ]
    sizes = []
    unused = {node: r.sample(range(1, 7), 6) for node in range(nodes)}
    # Node 0's areas first: mapped top-down, they are scanned last, after their partners.
    for node in sorted(r.randrange(nodes) for _ in range(r.randint(2, 5))):
        n = min(r.randint(1, 4), len(unused[node]))
        if n:
            m = len(sizes)
            sizes.append(n)
            ops += [("mmap", 0, n, node),  # equal pages on one node only by later writes
                    ("write", 0, m, 0, [unused[node].pop() for _ in range(n)]),
                    ("madvise", 0, m, 0, n, True)]
    ops.append(("run", "1"))
    for _ in range(steps):
        x = r.random()
        if x < 0.3:
            ops.append(("knob", "merge_across_nodes", r.choice("01")))
        elif x < 0.4:
            ops += [("run", "2"), ("run", "1")]
        elif x < 0.5:
            m = r.randrange(len(sizes))
            ops.append(("write", 0, m, r.randrange(sizes[m]), [r.randint(1, 6)]))
        else:
            ops.append(("batches", r.randint(1, 3)))
    ops.append(("batches", 30))
    return ops


HPAGE = 512
"""Pages of a PMD-sized THP."""


def thp_program(r: random.Random, steps: int = 30) -> list[Op]:
    """Transparent huge pages (docs/bulk.md, "THP"): mappings of whole 2 MiB extents
    (placed top-down from an aligned base, so every extent is aligned), MADV_HUGEPAGE or
    MADV_NOHUGEPAGE on some, writes of whole extents (faults that allocate THPs) with
    repeated contents, so that ksmd's merges split them, fork and COW writes to shared
    THPs, munmap, mprotect and MADV_MERGEABLE on parts of an extent (vma splits), with
    small batches that stop inside extents."""
    ops: list[Op] = [("machine", 1), ("knob", "pages_to_scan", str(r.choice([37, 300, 5000]))),
                     ("knob", "sleep_millisecs", "0"),
                     ("knob", "use_zero_pages", r.choice(["0", "1"])),
                     ("knob", "max_page_sharing", r.choice(["2", "256"])), ("spawn",)]
    live, sizes, nmaps, nprocs = [0], {}, 0, 1
    for p in (0,):
        for _ in range(r.randint(1, 3)):
            extents = r.randint(1, 3)
            ops.append(("mmap", p, extents * HPAGE))
            sizes[nmaps] = extents * HPAGE
            if r.random() < 0.8:
                ops.append(("thp", p, nmaps, 0, extents * HPAGE, r.random() < 0.85))
            ops.append(("madvise", p, nmaps, 0, extents * HPAGE, True))
            nmaps += 1
    ops.append(("run", "1"))
    maps = {0: dict(sizes)}
    for _ in range(steps):
        p = r.choice(live)
        m = r.choice(sorted(maps[p]))
        n = maps[p][m]
        roll = r.random()
        if roll < 0.3:
            e = r.randrange(n // HPAGE) * HPAGE
            i = e + r.choice([0, 0, r.randrange(HPAGE)])
            count = r.randint(1, HPAGE - (i - e)) if r.random() < 0.5 else HPAGE - (i - e)
            tags = [r.choice([0, 1, 2, 3, THP_TAGS[(i + k) % len(THP_TAGS)]])
                    for k in range(count)]
            ops.append(("write", p, m, i, tags))
        elif roll < 0.5:
            ops.append(("batches", r.randint(1, 6)))
        elif roll < 0.58 and len(live) < 3:
            ops.append(("fork", p))
            child = nprocs
            nprocs += 1
            live.append(child)
            maps[child] = dict(maps[p])
        elif roll < 0.64:
            i = r.randrange(n)
            ops.append(("munmap", p, m, i, 0, r.randint(1, 8) * PAGE_SIZE))
        elif roll < 0.7:
            i = r.randrange(n)
            ops.append(("mprotect", p, m, i, 0, r.randint(1, 8) * PAGE_SIZE, PROT_READ))
        elif roll < 0.76:
            i = r.randrange(n)
            ops.append(("madvise", p, m, i, min(n, i + r.randint(1, 300)), r.random() < 0.5))
        elif roll < 0.8:
            i = r.randrange(n)
            ops.append(("thp", p, m, i, min(n, i + r.randint(1, 600)), r.random() < 0.5))
        elif roll < 0.84 and len(live) > 1 and p != 0:
            ops.append(("exit", p))
            live.remove(p)
            del maps[p]
        else:
            ops.append(("run", "1"))
            ops.append(("batches", r.randint(1, 4)))
    return ops


def machine_nodes(ops: list[Op]) -> int:
    """The program's NUMA nodes (its ``machine`` operation; 1 without one)."""
    return next((op[1] for op in ops if op[0] == "machine"), 1)


def sim(ops: list[Op], content: str = "bytes") -> SimKernel:
    """A SimKernel for *ops*."""
    return SimKernel(trace=False, content=content, numa_nodes=machine_nodes(ops))


def bulk(ops: list[Op], *, vectorize: bool = True) -> BulkKernel:
    """A BulkKernel for *ops*."""
    return BulkKernel(vectorize=vectorize, numa_nodes=machine_nodes(ops))


def unmap_program(r: random.Random, steps: int = 30) -> list[Op]:
    """A random program that merges, then unmaps and protects merged memory: munmap
    (whole mappings, parts, several at once, over holes) while ksmd is mid-scan or
    stopped, mappings made again in the gaps, on any node (whose pages find the items
    the old ones left) and written with the old contents or new ones, mprotect with
    writes refused or forced, forks of the split address spaces, and more scans in
    between; merge-any, exec and NUMA nodes come from :func:`program`."""
    ops = program(r, steps)
    ops += [("run", "1"), ("batches", r.randint(2, 12))]
    maps: dict[int, list[int]] = {}  # each process's mappings, named as step() names them
    live: list[int] = []
    nmaps = 0
    for op in ops:
        if op[0] in ("spawn", "fork"):
            maps[len(maps)] = list(maps[op[1]]) if op[0] == "fork" else []
            live.append(len(maps) - 1)
        elif op[0] == "mmap":
            maps[op[1]].append(nmaps)
            nmaps += 1
        elif op[0] == "exec":
            maps[op[1]] = []
        elif op[0] == "exit":
            live.remove(op[1])
    return ops + _unmap_rounds(r, live, maps, nmaps, machine_nodes(ops))


def _unmap_rounds(r: random.Random, live: list[int], maps: dict[int, list[int]], nmaps: int,
                  nodes: int) -> list[Op]:
    """The rounds of :func:`unmap_program` over the live processes' mappings (*nmaps*
    made so far, on a machine of *nodes* NUMA nodes)."""
    ops: list[Op] = []
    for _ in range(r.randint(3, 8)):
        procs = [p for p in live if maps[p]]
        if not procs:
            break
        p = r.choice(procs)
        m = r.choice(maps[p])
        i, n = r.randrange(4), r.randint(1, 16)
        x = r.random()
        if x < 0.5:
            ops.append(("munmap", p, m, i, 0, n * PAGE_SIZE))
            if r.random() < 0.7:
                k = r.randint(1, n)
                ops += [("mmap", p, k, r.choice([None, *range(nodes)])),
                        ("write", p, nmaps, 0, [r.randrange(TAGS) for _ in range(k)], False),
                        ("madvise", p, nmaps, 0, k, r.random() < 0.8)]
                maps[p].append(nmaps)
                nmaps += 1
        elif x < 0.8:
            ops.append(("mprotect", p, m, i, 0, n * PAGE_SIZE, r.choice(PROTS)))
            ops.append(("write", p, m, i, [r.randrange(TAGS)], r.random() < 0.5))
        else:
            ops.append(("fork", p))
            maps[len(maps)] = list(maps[p])
            live.append(len(maps) - 1)
        if r.random() < 0.3:
            ops.append(("run", r.choice("01")))
        ops.append(("batches", r.randint(0, 6)))
    return [*ops, ("run", "1"), ("batches", 40)]


@dataclass
class Run:
    """State of a program being executed on one kernel."""

    kernel: Kernel
    procs: dict[int, Any]
    maps: dict[int, dict[int, int]]
    """Each process's mappings' addresses, by the number of their mmap in the program."""
    nmaps: int = 0


def _mapped_rows(proc: Any, addr: int, length: int) -> np.ndarray:
    """Bulk page rows mapped in [addr, addr + length) (page aligned)."""
    pieces, _hole = proc.mm.pieces(addr, addr + length)
    return np.concatenate([np.arange(r, r + n) for _a, r, n in pieces]
                          or [np.zeros(0, np.int64)])


def _rows(run: Run, op: Op) -> np.ndarray | None:
    """Bulk page rows a mutating operation touches (None for other operations)."""
    kind = op[0]
    proc = run.procs.get(op[1]) if len(op) > 1 and isinstance(op[1], int) else None
    if proc is None or not proc.alive:
        return None
    if kind == "write":
        return _mapped_rows(proc, run.maps[op[1]][op[2]] + op[3] * PAGE_SIZE,
                            len(op[4]) * PAGE_SIZE)
    if kind == "madvise":
        return _mapped_rows(proc, run.maps[op[1]][op[2]] + op[3] * PAGE_SIZE,
                            (op[4] - op[3]) * PAGE_SIZE)
    if kind == "munmap" and not op[4] and op[5]:
        start = run.maps[op[1]][op[2]] + op[3] * PAGE_SIZE
        return _mapped_rows(proc, start, -(-op[5] // PAGE_SIZE) * PAGE_SIZE)
    if kind in ("exit", "exec") or (op[2:] == (PR_SET_MEMORY_MERGE, 0)
                                    and proc.mm.merge_any):  # every page goes or unmerges
        return np.concatenate([np.arange(s.row, s.row + s.pages) for s in proc.mm.segments]
                              or [np.zeros(0, np.int64)])
    return None


def touches_unstable_tree(k: BulkKernel, rows: np.ndarray) -> bool:
    """Whether *rows* include a page inserted in the unstable tree during the current scan."""
    ksm = k.ksm
    if ksm.cursor is ksm.head:
        return False
    in_tree = (ksm.pages.state[rows] == UNSTABLE) & (ksm.pages.seqnr[rows] == ksm.cur_seqnr())
    return bool(in_tree.any())


def has_stale_sharers(k: BulkKernel) -> bool:
    """Whether a stable node whose KSM page was freed still has items.

    The kernel's tree walk may already have removed it (and so allow a
    max_page_sharing change the bulk engine refuses): see TREE_WALK.
    """
    ksm = k.ksm
    n = ksm.nodes.n
    alive = ksm.nodes.alive[:n] & (ksm.nodes.count[:n] > 0)
    return bool((ksm.frames.mapcount[ksm.nodes.kframe[:n][alive]] == 0).any())


def keep_tree_stable(ops: list[Op]) -> list[Op]:
    """*ops* without the mutations of pages in the current unstable tree.

    The kernel's unstable tree is ordered by the pages' current bytes, so a
    write, unmerge, munmap or exit that changes a page it holds makes later searches
    depend on the tree's shape; the bulk engine's exact index does not (a
    documented model choice).  Such operations are dropped (decided on a
    bulk run, which both kernels then execute alike), and so are
    max_page_sharing and merge_across_nodes changes while a freed KSM page's
    node still has items (whether the kernel's walk has removed it yet depends
    on the tree).
    """
    kept: list[Op] = []
    run = Run(bulk(ops), {}, {})
    for op in ops:
        rows = _rows(run, op)
        assert isinstance(run.kernel, BulkKernel)
        if rows is not None and touches_unstable_tree(run.kernel, rows):
            continue
        if op[:2] in (("knob", "max_page_sharing"), ("knob", "merge_across_nodes")) \
                and has_stale_sharers(run.kernel):
            continue
        kept.append(op)
        step(run, op, lambda _k: None, [])
    return kept


def step(run: Run, op: Op, snap: Callable[[Kernel], Any], log: list[Any]) -> None:
    """Execute *op*, appending snapshots to *log*."""
    k, procs, maps = run.kernel, run.procs, run.maps
    kind = op[0]
    try:
        if kind == "machine":
            assert k.numa_nodes == op[1], f"{k} is no machine of {op[1]} nodes"
        elif kind == "knob":
            k.sysfs[op[1]] = op[2]
        elif kind == "spawn":
            procs[0], maps[0] = k.spawn(), {}
        elif kind == "mmap":
            run.nmaps += 1
            node = op[3] if len(op) > 3 else None
            addr = procs[op[1]].mmap(op[2] * PAGE_SIZE, node=node)
            maps[op[1]][run.nmaps - 1] = addr
            log.append((op, snap(k), addr))  # where it went (gaps are reused)
            return
        elif kind == "write":
            _, p, m, i, tags, *force = op
            procs[p].write(maps[p][m] + i * PAGE_SIZE, b"".join(page(t) for t in tags),
                           force=bool(force and force[0]))
        elif kind == "munmap":
            _, p, m, i, shift, length = op
            procs[p].munmap(maps[p][m] + i * PAGE_SIZE + shift, length)
        elif kind == "mprotect":
            _, p, m, i, shift, length, prot = op
            procs[p].mprotect(maps[p][m] + i * PAGE_SIZE + shift, length, prot)
        elif kind == "madvise":
            _, p, m, i, j, mergeable = op
            procs[p].madvise(maps[p][m] + i * PAGE_SIZE, (j - i) * PAGE_SIZE,
                             MADV_MERGEABLE if mergeable else MADV_UNMERGEABLE)
        elif kind == "thp":
            _, p, m, i, j, on = op
            procs[p].madvise(maps[p][m] + i * PAGE_SIZE, (j - i) * PAGE_SIZE,
                             MADV_HUGEPAGE if on else MADV_NOHUGEPAGE)
        elif kind == "fork":
            child = procs[op[1]].fork()
            maps[len(procs)] = dict(maps[op[1]])
            procs[len(procs)] = child
        elif kind == "prctl":
            result = procs[op[1]].prctl(*op[2:])
            log.append((op, result, snap(k)))
            return
        elif kind == "exec":
            procs[op[1]].exec()
            maps[op[1]] = {}
        elif kind == "exit":
            procs[op[1]].exit()
        elif kind == "run":
            k.sysfs["run"] = op[1]
        elif kind == "batches":
            for _ in range(op[1]):
                batch(k)
                log.append((op, snap(k)))
            return
    except OSError as e:
        log.append((op, "errno", e.errno))
        return
    log.append((op, snap(k)))


def batch(k: Kernel) -> None:
    """Run ksmd's next batch, if it would run (both engines run the one ksmlab.ksm.ksmd)."""
    k.ksmd.batch()


def execute(k: Kernel, ops: list[Op], snap: Callable[[Kernel], Any]) -> list[Any]:
    """Run *ops* on *k*; the log of snapshots."""
    run, log = Run(k, {}, {}), []
    for op in ops:
        step(run, op, snap, log)
    return log


def counters(k: Kernel, names: tuple[str, ...] = COUNTERS) -> dict[str, str]:
    """Global counters, as sysfs shows them."""
    return {c: k.sysfs[c] for c in names}


def live_nodes(k: Kernel) -> list[int]:
    """Sorted sharer counts of the stable nodes whose KSM page is still in use.

    Stale nodes (KSM page freed, not yet found by ksmd) are left out, so this
    does not depend on when a tree walk finds them.
    """
    if isinstance(k, BulkKernel):
        ksm = k.ksm
        n = ksm.nodes.n
        alive = ksm.nodes.alive[:n] & (ksm.frames.mapcount[ksm.nodes.kframe[:n]] > 0)
        return sorted(int(x) for x in ksm.nodes.count[:n][alive])
    out: list[int] = []
    stack = [root.node for root in k.ksm.root_stable_tree]
    while stack:
        node = stack.pop()
        if node is None:
            continue
        stack += [node.rb_left, node.rb_right]
        for d in node.dups if node.kind is NodeKind.CHAIN else [node]:
            kpage = d.kpage
            if kpage is not None and not kpage.freed and kpage.stable_node is d:
                out.append(len(d.items))
    return sorted(out)


def contents(k: Kernel) -> dict[int, tuple[int, list[int | None]]]:
    """Each live process's pages, from its lowest mapping to the top of the mmap area: the
    tag of what each holds (content ids or fingerprints, see TAG_OF), None where no page is."""
    out: dict[int, tuple[int, list[int | None]]] = {}
    for pid, proc in sorted(k.processes.items()):
        if isinstance(k, BulkKernel):
            by_id = {cid: fp for fp, cid in k.contents._by_fp.items()}
            lo = min((s.addr for s in proc.mm.segments), default=proc.mm.mmap_base)
            ids = proc.content_ids(lo, proc.mm.mmap_base - lo)
            out[pid] = (lo, [None if c is None else TAG_OF[by_id[c]] for c in ids])
        else:
            lo = min((v.start for v in proc.mm.vmas), default=proc.mm.mmap_base)
            frames = proc._frames_in(lo, proc.mm.mmap_base - lo)  # no hashing of bytes
            out[pid] = (lo, [None if f is None else TAG_OF[f.data] for f in frames])
    return out


KNOBS = ("pages_to_scan", "sleep_millisecs", "max_page_sharing", "merge_across_nodes",
         "advisor_mode", "advisor_max_cpu", "advisor_min_pages_to_scan",
         "advisor_max_pages_to_scan", "advisor_target_scan_time")
"""Knobs a program writes, or the advisor sets (pages_to_scan)."""


def page_nodes(k: Kernel) -> list[tuple[int, list[tuple[int, int]]]]:
    """Per process, each mapped page's (address, NUMA node of its frame); -1 for the zero page."""
    out = []
    for pid, p in sorted(k.processes.items()):
        if isinstance(k, BulkKernel):
            ksm = k.ksm
            pages = []
            for seg in p.mm.segments:
                for i, f in enumerate(ksm.pages.frame[seg.row:seg.row + seg.pages].tolist()):
                    if f != -1:
                        node = -1 if f < 0 else int(ksm.frames.nid[f]) if k.numa_nodes > 1 else 0
                        pages.append((seg.addr + i * PAGE_SIZE, node))
            out.append((pid, sorted(pages)))
        else:
            out.append((pid, sorted((vpn * PAGE_SIZE, -1 if f.zero else f.nid)
                                    for vpn, f in p.mm.ptes.items())))
    return out


def walk_insensitive(k: Kernel) -> Any:
    """Everything observable that does not depend on tree-walk timing (see TREE_WALK): the
    counters, the knobs (pages_to_scan as the advisor sets it), ksmd's clock and CPU time,
    the live stable nodes, ksm_stat, the node of every mapped page and what every page
    holds."""
    procs = k.processes.values()
    stats = sorted((p.pid, p.ksm_stat()["ksm_rmap_items"], p.ksm_stat()["ksm_zero_pages"],
                    p.ksm_stat()["ksm_mergeable"], p.ksm_stat()["ksm_merge_any"])
                   for p in procs)
    return (counters(k, tuple(c for c in COUNTERS if c not in TREE_WALK)), live_nodes(k), stats,
            counters(k, KNOBS), page_nodes(k), contents(k), clock(k))


def clock(k: Kernel) -> tuple[int, int, dict[str, int]]:
    """Virtual time, ksmd's CPU time and every step ksmd counted for its cost model:
    both engines run one ksmd and must agree on these too."""
    total = k.ksmd.meter.total.as_dict()
    return k.ksmd.now_ns, k.ksmd.cpu_ns, total


def canonical(k: BulkKernel) -> Any:
    """The bulk engine's whole state, with node numbers replaced by their KSM frames.

    The vectorised path numbers new stable nodes in content order, the
    per-page path in scan order; everything else must be identical.  The
    engine's own invariant check runs first.
    """
    ksm = k.ksm
    ksm.check()
    pg, n = ksm.pages, ksm.pages.n
    state = pg.state[:n].copy()
    head = pg.head[:n]
    stable = state == STABLE
    alive = np.zeros(n, bool)
    alive[stable] = ksm.nodes.alive[head[stable]]
    state[stable & ~alive] = 1  # a dead node's items are in no tree
    has = state != 0
    kframe = np.where(stable & alive, ksm.nodes.kframe[np.maximum(head, 0)], -1)
    in_tree = (state == UNSTABLE) & (pg.seqnr[:n] == ksm.cur_seqnr())
    nf = ksm.frames.n
    knode = ksm.frames.knode[:nf]
    node_alive = np.zeros(nf, bool)
    node_alive[knode >= 0] = ksm.nodes.alive[knode[knode >= 0]]
    trees = {}
    for ix in ksm.trees:  # each node's pair of trees (an empty one is as good as none)
        uindex = {int(c): int(g) for c, g in enumerate(ix.ctab.uindex[:ix.ctab.n])
                  if g >= 0 and in_tree[g] and (k.numa_nodes == 1 or pg.unid[g] == ix.nid)}
        stable_of = {c: int(ksm.nodes.kframe[s])
                     for c, s in enumerate(ix.ctab.stable[:ix.ctab.n]) if s >= 0}
        chains = {c: ([int(ksm.nodes.kframe[d]) for d in ch.dups],
                      int(ksm.chain_cols.prune_time[ch.id]))
                  for c, ch in ix.chains.items()}
        if uindex or stable_of or chains:
            trees[ix.nid] = (uindex, stable_of, chains)
    counts = {int(ksm.nodes.kframe[d]): int(ksm.nodes.count[d])
              for d in range(ksm.nodes.n) if ksm.nodes.alive[d]}
    slots, mm = [], ksm.head.next  # ksmd's list in order (an exec'd mm's old one included)
    while mm is not ksm.head:  # with the ghosts of each (an exited mm's too)
        slots.append((mm.id, mm.exiting, mm.merge_any,
                      [(g.addr, g.row, g.pages) for g in mm.ghosts]))
        mm = mm.next
    procs = sorted((p.pid, p.mm.merge_any, p.mm.registered,
                    [(s.addr, s.row, s.pages, s.prot) for s in p.mm.segments],
                    [(g.addr, g.row, g.pages) for g in p.mm.ghosts])
                   for p in k.processes.values())
    nids = ((pg.nid[:n].tolist(), np.where(in_tree, pg.unid[:n], -1).tolist(),
             ksm.frames.nid[:nf].tolist()) if k.numa_nodes > 1 else None)
    thp = (pg.thp[:n].tolist(), ksm.frames.thp[:nf].tolist())  # VM_(NO)HUGEPAGE, PMDs, THPs
    return (counters(k), counters(k, KNOBS), k.now_ns, pg.frame[:n].tolist(), thp,
            pg.mergeable[:n].tolist(), state.tolist(),
            in_tree.tolist(), np.where(has, pg.oldsum[:n], 0).tolist(),
            np.where(has, pg.age[:n], 0).tolist(), np.where(has, pg.skips[:n], 0).tolist(),
            kframe.tolist(), ksm.frames.mapcount[:nf].tolist(),
            (node_alive & (knode >= 0)).tolist(), trees, counts, nids,
            ksm.cursor.id, ksm.address, slots, procs, clock(k))
