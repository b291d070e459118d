"""Random programs for the bulk engine's equivalence tests.

A program is a list of operations within what :class:`ksmlab.bulk.BulkKernel`
models (mmap, whole-page writes, MADV_(UN)MERGEABLE, prctl PR_SET/GET_MEMORY_MERGE
(and refused prctls), fork, exec, exit, knobs including max_page_sharing changes
and run=2, ksmd batches).  :func:`execute` runs one on
any kernel and records a snapshot after every operation and every ksmd batch,
so two kernels can be compared step by step.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from helpers import COUNTERS
from ksmlab import MADV_MERGEABLE, MADV_UNMERGEABLE, PAGE_SIZE, SimKernel
from ksmlab.bulk import BulkKernel
from ksmlab.bulk.columns import STABLE, UNSTABLE
from ksmlab.constants import PR_GET_MEMORY_MERGE, PR_SET_MEMORY_MERGE
from ksmlab.ksm.types import NodeKind

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


def program(r: random.Random, steps: int = 60) -> list[Op]:
    """A random program: few contents so that pages merge, split and go stale."""
    ops: list[Op] = [
        ("knob", "max_page_sharing", r.choice(["2", "3", "256"])),
        ("knob", "use_zero_pages", r.choice("01")),
        ("knob", "smart_scan", r.choice("01")),
        ("knob", "pages_to_scan", str(r.choice([1, 3, 7, 50]))),
        ("knob", "sleep_millisecs", "0"),
        ("knob", "stable_node_chains_prune_millisecs", r.choice(["0", "5", "2000"])),
        ("spawn",),
    ]
    # Mappings are named by the number of the mmap in the program, so an operation still
    # names the same one when keep_tree_stable drops an exec (which empties the map).
    live, sizes, nprocs, nmaps = [0], {0: dict[int, int]()}, 1, 0
    for _ in range(steps):
        x = r.random()
        mapped = [p for p in live if sizes[p]]
        if x < 0.12:
            p = r.choice(live)
            n = r.randint(1, 12)
            ops.append(("mmap", p, n))
            sizes[p][nmaps] = n
            nmaps += 1
        elif x < 0.50 and mapped:
            p = r.choice(mapped)
            m = r.choice(list(sizes[p]))
            i = r.randrange(sizes[p][m])
            j = r.randint(i + 1, sizes[p][m])
            if x < 0.40:
                ops.append(("write", p, m, i, [r.randrange(6) for _ in range(j - i)]))
            else:
                ops.append(("madvise", p, m, i, j, r.random() < 0.75))
        elif x < 0.55 and len(live) < 6:
            p = r.choice(live)
            ops.append(("fork", p))
            live.append(nprocs)
            sizes[nprocs] = dict(sizes[p])
            nprocs += 1
        elif x < 0.58 and len(live) > 1:
            p = r.choice(live)
            ops.append(("exit", p))
            live.remove(p)
        elif x < 0.62:
            ops.append(("run", r.choice("0112")))
        elif x < 0.64:
            ops.append(("knob", "max_page_sharing", r.choice(["2", "3", "256"])))
        elif x < 0.69:
            ops.append(("prctl", r.choice(live), *r.choice(PRCTLS)))
        elif x < 0.71:
            p = r.choice(live)
            ops.append(("exec", p))
            sizes[p] = {}
        else:
            ops.append(("batches", r.randint(1, 4)))
    ops += [("run", "1"), ("batches", 40)]
    return ops


def unmerge_program(r: random.Random, steps: int = 40) -> list[Op]:
    """A random program that merges, then unmerges everything (run=2) and changes
    max_page_sharing around it: while KSM pages exist (EBUSY), after some
    sharers went (unmapped nodes removed first), and after run=2."""
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
                ("batches", 1), ("run", r.choice("12")), ("batches", r.randint(1, 40))]
    ops += [("run", "1"), ("batches", 40)]
    return ops


@dataclass
class Run:
    """State of a program being executed on one kernel."""

    kernel: Kernel
    procs: dict[int, Any]
    maps: dict[int, dict[int, int]]
    """Each process's mappings' addresses, by the number of their mmap in the program."""
    nmaps: int = 0


def _rows(run: Run, op: Op) -> np.ndarray | None:
    """Bulk page rows a mutating operation touches (None for other operations)."""
    kind = op[0]
    proc = run.procs.get(op[1]) if len(op) > 1 and isinstance(op[1], int) else None
    if proc is None or not proc.alive:
        return None
    if kind == "write":
        return proc._rows(run.maps[op[1]][op[2]] + op[3] * PAGE_SIZE, len(op[4]) * PAGE_SIZE)
    if kind == "madvise":
        return proc._rows(run.maps[op[1]][op[2]] + op[3] * PAGE_SIZE,
                          (op[4] - op[3]) * PAGE_SIZE)
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
    write, unmerge or exit that changes a page it holds makes later searches
    depend on the tree's shape; the bulk engine's exact index does not (a
    documented model choice).  Such operations are dropped (decided on a
    bulk run, which both kernels then execute alike), and so are
    max_page_sharing changes while a freed KSM page's node still has items
    (whether the kernel's walk has removed it yet depends on the tree).
    """
    kept: list[Op] = []
    run = Run(BulkKernel(), {}, {})
    for op in ops:
        rows = _rows(run, op)
        assert isinstance(run.kernel, BulkKernel)
        if rows is not None and touches_unstable_tree(run.kernel, rows):
            continue
        if op[:2] == ("knob", "max_page_sharing") and has_stale_sharers(run.kernel):
            continue
        kept.append(op)
        step(run, op, lambda _k: None, [])
    return kept


def step(run: Run, op: Op, snap: Callable[[Kernel], Any], log: list[Any]) -> None:
    """Execute *op*, appending snapshots to *log*."""
    k, procs, maps = run.kernel, run.procs, run.maps
    kind = op[0]
    try:
        if kind == "knob":
            k.sysfs[op[1]] = op[2]
        elif kind == "spawn":
            procs[0], maps[0] = k.spawn(), {}
        elif kind == "mmap":
            run.nmaps += 1
            maps[op[1]][run.nmaps - 1] = procs[op[1]].mmap(op[2] * PAGE_SIZE)
        elif kind == "write":
            _, p, m, i, tags = op
            procs[p].write(maps[p][m] + i * PAGE_SIZE, b"".join(page(t) for t in tags))
        elif kind == "madvise":
            _, p, m, i, j, mergeable = op
            procs[p].madvise(maps[p][m] + i * PAGE_SIZE, (j - i) * PAGE_SIZE,
                             MADV_MERGEABLE if mergeable else MADV_UNMERGEABLE)
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


def walk_insensitive(k: Kernel) -> Any:
    """Everything observable that does not depend on tree-walk timing (see TREE_WALK)."""
    procs = k.processes.values()
    stats = sorted((p.pid, p.ksm_stat()["ksm_rmap_items"], p.ksm_stat()["ksm_zero_pages"],
                    p.ksm_stat()["ksm_mergeable"], p.ksm_stat()["ksm_merge_any"])
                   for p in procs)
    return (counters(k, tuple(c for c in COUNTERS if c not in TREE_WALK)), live_nodes(k), stats,
            clock(k))


def clock(k: Kernel) -> tuple[int, int, dict[str, int]]:
    """Virtual time, ksmd's CPU time and every step ksmd counted for its cost model:
    both engines run one ksmd and must agree on these too."""
    return k.ksmd.now_ns, k.ksmd.cpu_ns, k.ksmd.meter.total.as_dict()


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
    uindex = {int(c): int(g) for c, g in enumerate(ksm.ctab.uindex[:ksm.ctab.n])
              if g >= 0 and in_tree[g]}
    nf = ksm.frames.n
    knode = ksm.frames.knode[:nf]
    node_alive = np.zeros(nf, bool)
    node_alive[knode >= 0] = ksm.nodes.alive[knode[knode >= 0]]
    stable_of = {}
    for c, s in enumerate(ksm.ctab.stable[:ksm.ctab.n]):
        if s >= 0:
            stable_of[c] = int(ksm.nodes.kframe[s])
    chains = {c: ([int(ksm.nodes.kframe[d]) for d in ch.dups],
                  int(ksm.chain_cols.prune_time[ch.id]))
              for c, ch in ksm.chains.items()}
    counts = {int(ksm.nodes.kframe[d]): int(ksm.nodes.count[d])
              for d in range(ksm.nodes.n) if ksm.nodes.alive[d]}
    slots, mm = [], ksm.head.next  # ksmd's list in order (an exec'd mm's old one included)
    while mm is not ksm.head:
        slots.append((mm.id, mm.exiting, mm.merge_any))
        mm = mm.next
    procs = sorted((p.pid, p.mm.merge_any, p.mm.registered) for p in k.processes.values())
    return (counters(k), pg.frame[:n].tolist(), pg.mergeable[:n].tolist(), state.tolist(),
            in_tree.tolist(), np.where(has, pg.oldsum[:n], 0).tolist(),
            np.where(has, pg.age[:n], 0).tolist(), np.where(has, pg.skips[:n], 0).tolist(),
            kframe.tolist(), uindex, ksm.frames.mapcount[:nf].tolist(),
            (node_alive & (knode >= 0)).tolist(), stable_of, chains, counts,
            ksm.cursor.id, ksm.address, slots, procs, clock(k))
