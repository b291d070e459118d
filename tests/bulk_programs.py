"""Random programs for the bulk engine's equivalence tests.

A program is a list of operations within what :class:`ksmlab.bulk.BulkKernel`
models (mmap, munmap, mprotect, whole-page writes (forced or not),
MADV_(UN)MERGEABLE, fork, exit, knobs including max_page_sharing changes and
run=2, ksmd batches); munmap and mprotect ranges may run past a mapping, over
holes and into the next mappings, and some calls are refused (their errnos
are compared).  :func:`execute` runs one on
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
from ksmlab.constants import PROT_EXEC, PROT_NONE, PROT_READ, PROT_WRITE
from ksmlab.ksm.types import NodeKind
from ksmlab.mm.page import fingerprint

Op = tuple[Any, ...]
Kernel = SimKernel | BulkKernel

TREE_WALK = ("pages_shared", "pages_sharing", "pages_volatile", "stable_node_chains",
             "stable_node_dups", "general_profit")
"""Counters that can move at a different moment when the kernel's tree walk passes
another content's stale node or chain (bulk engine model choice, see bulk/engine.py)."""


def page(tag: int) -> bytes:
    """Page content number *tag*; tag 0 is the zero page."""
    return bytes(PAGE_SIZE) if tag == 0 else tag.to_bytes(8, "little") * (PAGE_SIZE // 8)


TAGS = 6
"""Contents the programs write: page(0) .. page(TAGS - 1)."""
TAG_OF = {key: t for t in range(TAGS) for key in (page(t), fingerprint(page(t)))}
"""A page's tag from its bytes or its fingerprint."""
PROTS = (PROT_READ, PROT_NONE, PROT_READ | PROT_WRITE, PROT_READ | PROT_EXEC,
         PROT_READ | PROT_WRITE | PROT_EXEC, PROT_WRITE, 0x8 | PROT_READ)
"""mprotect's protections (0x8 is PROT_SEM, allowed and ignored)."""
BAD_PROTS = (0x10, 0x01000000 | PROT_READ, 0x02000000, 0x03000000)
"""mprotect's refused protections: an unknown bit, PROT_GROWSDOWN/UP on an area that does
not grow, both (EINVAL)."""


def _span(r: random.Random, sizes: list[int], dead: set[tuple[int, int]]) -> tuple[int, int, int]:
    """(mapping, first page, end page) of a range, mostly of pages not unmapped."""
    m = r.randrange(len(sizes))
    live = [i for i in range(sizes[m]) if (m, i) not in dead]
    if live and r.random() < 0.85:
        i = r.choice(live)
        j = i + 1
        while j < sizes[m] and (m, j) not in dead and r.random() < 0.85:
            j += 1
        return m, i, j
    i = r.randrange(sizes[m])
    return m, i, r.randint(i + 1, sizes[m])


def _unmap_op(r: random.Random, p: int, sizes: list[int],
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
    live, sizes, nprocs = [0], {0: []}, 1
    dead: dict[int, set[tuple[int, int]]] = {0: set()}  # (mapping, page) unmapped, roughly
    for _ in range(steps):
        x = r.random()
        mapped = [p for p in live if sizes[p]]
        if x < 0.12:
            p = r.choice(live)
            n = r.randint(1, 12)
            ops.append(("mmap", p, n))
            sizes[p].append(n)
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
            sizes[nprocs] = list(sizes[p])
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
        elif x < 0.72 and mapped:
            p = r.choice(mapped)
            op = _unmap_op(r, p, sizes[p], dead[p])
            ops.append(op)
            if op[0] == "munmap" and r.random() < 0.5:
                # Map again at once: the gap is reused, and its pages find the items
                # the old ones left (if ksmd has not passed them yet).
                n = r.randint(1, max(1, op[5] // PAGE_SIZE))
                ops += [("mmap", p, n), ("write", p, len(sizes[p]), 0,
                                         [r.randrange(TAGS) for _ in range(n)], False),
                        ("madvise", p, len(sizes[p]), 0, n, True)]
                sizes[p].append(n)
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
            gone = {op[1] for op in ops if op[0] == "exit"}
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


def unmap_program(r: random.Random, steps: int = 30) -> list[Op]:
    """A random program that merges, then unmaps and protects merged memory: munmap
    (whole mappings, parts, several at once, over holes) while ksmd is mid-scan or
    stopped, mappings made again in the gaps (whose pages find the items the old ones
    left) and written with the old contents or new ones, mprotect with writes refused
    or forced, forks of the split address spaces, and more scans in between."""
    ops = program(r, steps)
    ops += [("run", "1"), ("batches", r.randint(2, 12))]
    nmaps: dict[int, int] = {}  # mappings per process, numbered as step() numbers them
    live: list[int] = []
    for op in ops:
        if op[0] in ("spawn", "fork"):
            nmaps[len(nmaps)] = nmaps[op[1]] if op[0] == "fork" else 0
            live.append(len(nmaps) - 1)
        elif op[0] == "mmap":
            nmaps[op[1]] += 1
        elif op[0] == "exit":
            live.remove(op[1])
    return ops + _unmap_rounds(r, live, nmaps)


def _unmap_rounds(r: random.Random, live: list[int], nmaps: dict[int, int]) -> list[Op]:
    """The rounds of :func:`unmap_program` over the live processes' mappings."""
    ops: list[Op] = []
    for _ in range(r.randint(3, 8)):
        procs = [p for p in live if nmaps.get(p)]
        if not procs:
            break
        p = r.choice(procs)
        m = r.randrange(nmaps[p])
        i, n = r.randrange(4), r.randint(1, 16)
        x = r.random()
        if x < 0.5:
            ops.append(("munmap", p, m, i, 0, n * PAGE_SIZE))
            if r.random() < 0.7:
                k = r.randint(1, n)
                ops += [("mmap", p, k), ("write", p, nmaps[p], 0,
                                         [r.randrange(TAGS) for _ in range(k)], False),
                        ("madvise", p, nmaps[p], 0, k, r.random() < 0.8)]
                nmaps[p] += 1
        elif x < 0.8:
            ops.append(("mprotect", p, m, i, 0, n * PAGE_SIZE, r.choice(PROTS)))
            ops.append(("write", p, m, i, [r.randrange(TAGS)], r.random() < 0.5))
        else:
            ops.append(("fork", p))
            nmaps[len(nmaps)] = nmaps[p]
            live.append(len(nmaps) - 1)
        if r.random() < 0.3:
            ops.append(("run", r.choice("01")))
        ops.append(("batches", r.randint(0, 6)))
    return [*ops, ("run", "1"), ("batches", 40)]


@dataclass
class Run:
    """State of a program being executed on one kernel."""

    kernel: Kernel
    procs: dict[int, Any]
    maps: dict[int, list[int]]


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
    if kind == "exit":
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
            procs[0], maps[0] = k.spawn(), []
        elif kind == "mmap":
            maps[op[1]].append(procs[op[1]].mmap(op[2] * PAGE_SIZE))
            log.append((op, snap(k), maps[op[1]][-1]))  # where it went (gaps are reused)
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
        elif kind == "fork":
            child = procs[op[1]].fork()
            maps[len(procs)] = list(maps[op[1]])
            procs[len(procs)] = child
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


def walk_insensitive(k: Kernel) -> Any:
    """Everything observable that does not depend on tree-walk timing (see TREE_WALK):
    the other counters, the live stable nodes' sharers, ksm_stat's items, zero pages and
    mergeable flag, and what every page holds."""
    procs = k.processes.values()
    stats = sorted((p.pid, p.ksm_stat()["ksm_rmap_items"], p.ksm_stat()["ksm_zero_pages"],
                    p.ksm_stat()["ksm_mergeable"]) for p in procs)
    return (counters(k, tuple(c for c in COUNTERS if c not in TREE_WALK)), live_nodes(k), stats,
            contents(k))


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
    mms = [([(s.addr, s.row, s.pages, s.prot) for s in p.mm.segments],
            [(g.addr, g.row, g.pages) for g in p.mm.ghosts]) for _pid, p in sorted(k.processes.items())]
    return (counters(k), mms, pg.frame[:n].tolist(), pg.mergeable[:n].tolist(), state.tolist(),
            in_tree.tolist(), np.where(has, pg.oldsum[:n], 0).tolist(),
            np.where(has, pg.age[:n], 0).tolist(), np.where(has, pg.skips[:n], 0).tolist(),
            kframe.tolist(), uindex, ksm.frames.mapcount[:nf].tolist(),
            (node_alive & (knode >= 0)).tolist(), stable_of, chains, counts,
            ksm.cursor.id, ksm.address)
