# SPDX-License-Identifier: GPL-2.0-only
"""Fingerprint content mode: every result equals byte mode's on the same program.

Each program runs in lockstep on ``SimKernel(content="bytes")`` and
``SimKernel(content="fingerprint")``.  After every step the two machines must
agree on everything observable: every /sys/kernel/mm/ksm file, each live
process's ksm_stat, smaps and pagemap (pfns), the fingerprints of every
mapped page, the errno of a refused call, the virtual clock, ksmd's CPU time,
cow_ksm, frames in use and every tracepoint record; and both must pass
:func:`ksmlab.invariants.check_invariants`.

The one place the two modes may legitimately part is the order of the trees
(memcmp of the bytes against ``<`` of the fingerprints).  Which nodes a tree
descent passes is then different, and a descent acts on some nodes it passes
(docs/design.md, "Content mode").  :func:`tree_order_independent` says when
that cannot matter; while it does not hold, the comparison leaves out what a
descent can change (see :data:`PATH_DEPENDENT`).
"""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from tests.strategies import NEAR_PATTERNS, PATTERNS, random_page

from ksmlab import (
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
    SimKernel,
    SimProcess,
)
from ksmlab.errors import NotModelledError, ScanStalledError
from ksmlab.invariants import check_invariants
from ksmlab.ksm.types import NodeKind, RmapItem, StableNode
from ksmlab.mm.page import (
    ZERO_DATA,
    ZERO_FINGERPRINT,
    calc_checksum,
    fingerprint,
    fingerprint_checksum,
)

P = PAGE_SIZE

POOL: tuple[bytes, ...] = (*PATTERNS, *NEAR_PATTERNS, random_page(1), random_page(2))
"""Page contents the random programs write: few, so that pages merge; the near
patterns sort next to a pattern by memcmp but anywhere by fingerprint."""


# --- observing a machine ---------------------------------------------------------------------
def observe(k: SimKernel) -> dict[str, Any]:
    """Everything a user can see of *k*, page content as fingerprints."""
    procs = {}
    for pid, p in sorted(k.processes.items()):
        vmas = p.smaps()
        procs[pid] = {
            "ksm_stat": p.ksm_stat(),
            "smaps": vmas,
            "pfns": [p.pfns(v.start, v.end - v.start) for v in vmas],
            "content": [p.fingerprints(v.start, v.end - v.start) for v in vmas],
        }
    return {
        "sysfs": {name: k.sysfs[name] for name in k.sysfs},
        "now_ns": k.now_ns,
        "ksmd_cpu_ns": k.ksmd_cpu_ns,
        "cow_ksm": k.cow_ksm,
        "nr_frames": k.phys.nr_frames,
        "processes": procs,
        "events": len(k.events),
    }


PATH_DEPENDENT = ("pages_shared", "pages_sharing", "pages_volatile", "general_profit",
                  "stable_node_chains", "stable_node_dups")
"""The sysfs files a tree descent can change by removing a stale node or chain."""


def _stale(node: StableNode) -> bool:
    """``ksm_get_folio`` would find *node* stale (its KSM page is gone)."""
    page = node.kpage
    return page is None or page.freed or page.stable_node is not node


def observe_settled(k: SimKernel) -> dict[str, Any]:
    """:func:`observe`, with the :data:`PATH_DEPENDENT` counters and ksm_stat as they
    will be once every stale node and chain is removed.

    A stale node's items still count in pages_shared/pages_sharing and their
    mm's ksm_merging_pages until the node is removed; a stale dup still
    counts in stable_node_dups; a chain left with one live dup becomes a
    plain node (one chain and one dup fewer), with none it goes.
    """
    shared = sharing = dups = chains = 0
    per_mm: dict[int, int] = {}

    def drop(node: StableNode) -> None:
        nonlocal shared, sharing
        if node.items:
            shared += 1
            sharing += len(node.items) - 1
        for item in node.items:
            per_mm[item.mm.id] = per_mm.get(item.mm.id, 0) + 1

    for root in k.ksm.root_stable_tree:
        for node in root:
            assert isinstance(node, StableNode)
            if node.kind is NodeKind.CHAIN:
                live = [d for d in node.dups if not _stale(d)]
                for d in node.dups:
                    if _stale(d):
                        drop(d)
                        dups += 1
                if len(live) < 2:
                    chains += 1
                    dups += len(live)
            elif _stale(node):
                drop(node)
    obs = observe(k)
    del obs["events"]  # compared apart, without the records a stale node's removal emits
    fs = obs["sysfs"]
    fs["pages_shared"] = int(fs["pages_shared"]) - shared
    fs["pages_sharing"] = int(fs["pages_sharing"]) - sharing
    fs["stable_node_dups"] = int(fs["stable_node_dups"]) - dups
    fs["stable_node_chains"] = int(fs["stable_node_chains"]) - chains
    fs["pages_volatile"] = (k.ksm.rmap_items - fs["pages_shared"] - fs["pages_sharing"]
                            - int(fs["pages_unshared"]))
    fs["general_profit"] = int(fs["general_profit"]) + sharing * P
    for pid, view in obs["processes"].items():
        stale_items = per_mm.get(k.processes[pid].mm.id, 0)
        view["ksm_stat"]["ksm_merging_pages"] -= stale_items
        view["ksm_stat"]["ksm_process_profit"] -= stale_items * P
    return obs


def diff(a: Any, b: Any, path: str = "") -> Iterator[str]:
    """Paths where two observations differ, with both values."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            yield from diff(a.get(key), b.get(key), f"{path}.{key}")
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            yield from diff(x, y, f"{path}[{i}]")
    elif a != b:
        yield f"{path}: bytes mode {a!r}, fingerprint mode {b!r}"


# --- what a tree descent may change ----------------------------------------------------------
def unsettled(k: SimKernel) -> list[str]:
    """Tree nodes a descent passing by would act on (empty when the trees are settled).

    * a stale stable node or dup (its KSM page was freed or is no longer its
      page): a descent passing it removes it with all its items;
    * a chain with fewer than two dups: a descent passing it frees or collapses it;
    * an unstable-tree item whose page is gone or no longer mergeable (a descent
      passing it gives up, neither merging nor inserting), or whose page changed
      since it was inserted (the tree is out of order: a descent may go the
      wrong way past an identical page).
    """
    ksm = k.ksm.core
    out: list[str] = []
    stale = _stale
    for root in ksm.root_stable_tree:
        for node in root:
            assert isinstance(node, StableNode)
            if node.kind is NodeKind.CHAIN:
                out += [f"stale dup {d!r}" for d in node.dups if stale(d)]
                if len(node.dups) < 2:
                    out.append(f"chain with {len(node.dups)} dup(s)")
            elif stale(node):
                out.append(f"stale node {node!r}")
    for root in ksm.root_unstable_tree:
        prev: bytes | None = None
        for item in root:
            assert isinstance(item, RmapItem)
            page = ksm.get_mergeable_page(item)
            if page is None:
                out.append(f"unstable item without a mergeable page {item!r}")
                continue
            if prev is not None and not prev < page.data:
                out.append(f"unstable tree out of order at {item!r}")
            prev = page.data
    return out


# --- running a program on both machines -----------------------------------------------------
Outcome = tuple[str, object]


class Twin:
    """One program on a byte-mode and a fingerprint-mode SimKernel, step by step.

    Each step is a function of (kernel, process table, side); the twin runs it
    on both sides, requires the same outcome (value, or errno of the OSError),
    then compares :func:`observe` of both machines.
    """

    def __init__(self, **kwargs: Any) -> None:
        self.sides = (SimKernel(content="bytes", **kwargs),
                      SimKernel(content="fingerprint", **kwargs))
        self.procs: tuple[dict[str, SimProcess], dict[str, SimProcess]] = ({}, {})
        self.log: list[str] = []
        self._seen = [0, 0]  # tracepoint records already compared, per machine
        self.before: list[list[str]] = [[], []]
        self.settled_steps = 0  # steps compared in full

    @property
    def kb(self) -> SimKernel:
        """The byte-mode machine."""
        return self.sides[0]

    @property
    def kf(self) -> SimKernel:
        """The fingerprint-mode machine."""
        return self.sides[1]

    def step(self, what: str, fn: Callable[[SimKernel, dict[str, SimProcess], bool], object],
             *, unordered_events: bool = False) -> Outcome:
        """Run *fn* on both machines (the bool says fingerprint side), then compare them.

        Returns the common outcome: ("ok", value) or ("errno", its name).
        """
        self.log.append(what)
        self.before = [unsettled(k) for k in self.sides]
        outcomes: list[Outcome] = []
        for fp_side, (k, procs) in enumerate(zip(self.sides, self.procs, strict=True)):
            try:
                outcomes.append(("ok", fn(k, procs, bool(fp_side))))
            except OSError as e:
                outcomes.append(("errno", errno.errorcode.get(e.errno or 0, e.errno)))
            except ScanStalledError:
                outcomes.append(("stalled", None))
        assert outcomes[0] == outcomes[1], self.report(f"outcome {outcomes}")
        self.compare(unordered_events=unordered_events)
        return outcomes[0]

    def compare(self, *, unordered_events: bool = False) -> None:
        """Both machines show the same thing, and both are internally consistent.

        While either machine is :func:`unsettled` (before or after the step),
        what a descent may change is compared as :func:`observe_settled` sees
        it, and the step's tracepoint records without the ``ksm_remove_*``
        ones a stale node's removal emits; otherwise everything, with the
        records in order (as a multiset when *unordered_events*: run=2
        frees stable nodes in tree order).
        """
        for k in self.sides:
            check_invariants(k)
        now = [unsettled(k) for k in self.sides]
        settled = not any(now) and not any(self.before)
        self.settled_steps += settled
        if settled:
            b, f = observe(self.kb), observe(self.kf)
        else:
            b, f = observe_settled(self.kb), observe_settled(self.kf)
        problems = list(diff(b, f))
        new_b, new_f = (k.events[seen:] for k, seen in zip(self.sides, self._seen, strict=True))
        if not settled:
            new_b = [e for e in new_b if not e.name.startswith("ksm_remove_")]
            new_f = [e for e in new_f if not e.name.startswith("ksm_remove_")]
        if unordered_events or not settled:
            new_b, new_f = sorted(new_b, key=repr), sorted(new_f, key=repr)
        if len(new_b) != len(new_f):
            problems.append(f"{len(new_b)} != {len(new_f)} new tracepoint records")
        problems += [f"event {self._seen[0] + i}: {x} != {y}" for i, (x, y)
                     in enumerate(zip(new_b, new_f, strict=False)) if x != y][:3]
        self._seen = [len(k.events) for k in self.sides]
        assert not problems, self.report("\n".join(problems[:12]))

    def report(self, what: str) -> str:
        """A failure message: what differs, after which steps."""
        return (f"{what}\nbefore the last step, unsettled: {self.before}\n"
                f"after {len(self.log)} steps:\n  " + "\n  ".join(self.log[-40:]))

    # --- the usual calls, on both sides ---------------------------------------------------
    def sysfs(self, name: str, value: str) -> None:
        """Write a sysfs file on both machines."""
        self.step(f"{name}={value}", lambda k, _p, _f: k.sysfs.__setitem__(name, value),
                  unordered_events=(name, value) == ("run", "2"))

    def spawn(self, label: str) -> None:
        """A new process *label* on both machines."""
        def go(k: SimKernel, procs: dict[str, SimProcess], _f: bool) -> int:
            procs[label] = k.spawn()
            return procs[label].pid
        self.step(f"spawn {label}", go)

    def fork(self, parent: str, child: str) -> None:
        """*parent* forks *child* on both machines."""
        def go(_k: SimKernel, procs: dict[str, SimProcess], _f: bool) -> int:
            procs[child] = procs[parent].fork()
            return procs[child].pid
        self.step(f"fork {parent} -> {child}", go)

    def call(self, label: str, method: str, *args: Any, **kwargs: Any) -> Outcome:
        """``process.method(*args, **kwargs)`` on both machines."""
        return self.step(f"{label}.{method}{args}{kwargs or ''}",
                         lambda _k, procs, _f: getattr(procs[label], method)(*args, **kwargs))

    def mmap(self, label: str, pages: int, *args: Any, **kwargs: Any) -> int:
        """mmap on both machines (same address on both); the address."""
        out = self.call(label, "mmap", pages * P, *args, **kwargs)
        assert out[0] == "ok" and isinstance(out[1], int), out
        return out[1]

    def write(self, label: str, addr: int, pages: list[bytes], *, force: bool = False,
              as_fingerprints: bool = False) -> Outcome:
        """Write whole *pages* at *addr*; the fingerprint side may store their fingerprints."""
        def go(_k: SimKernel, procs: dict[str, SimProcess], fp_side: bool) -> None:
            p = procs[label]
            if fp_side and as_fingerprints:
                p.write_fingerprints(addr, [fingerprint(d) for d in pages], force=force)
            else:
                p.write(addr, b"".join(pages), force=force)
        heads = ",".join(str(POOL.index(d)) if d in POOL else "?" for d in pages)
        return self.step(f"{label}.write({addr:#x}, [{heads}], force={force}, "
                         f"fps={as_fingerprints})", go)

    def wait(self, n: int) -> None:
        """wait_full_scans(n) on both machines."""
        self.step(f"wait_full_scans({n})", lambda k, _p, _f: k.wait_full_scans(n))

    def advance(self, ms: float) -> None:
        """advance(ms) on both machines."""
        self.step(f"advance({ms})", lambda k, _p, _f: k.advance(ms))


def twin() -> Twin:
    """A twin pair set up as tests/conftest.py's ``kernel`` fixture: one batch, one scan."""
    t = Twin()
    t.sysfs("sleep_millisecs", "0")
    t.sysfs("pages_to_scan", "100000")
    return t


# --- the contract ------------------------------------------------------------------------------
def test_default_is_byte_mode() -> None:
    """SimKernel() keeps page bytes, reads them back, and uses the kernel's checksum."""
    k = SimKernel()
    assert k.content == "bytes"
    assert k.ksm.core.calc_checksum is calc_checksum
    p = k.spawn()
    a = p.mmap(2 * P)
    p.write(a + 10, b"abc")
    assert p.read(a + 9, 5) == b"\0abc\0"
    assert p.fingerprints(a, 2 * P) == [fingerprint(ZERO_DATA[:10] + b"abc" + ZERO_DATA[13:]),
                                        None]


def test_contract_functions() -> None:
    """fingerprint is XXH3-128 of the page (canonical digest); its checksum is its first 4
    bytes, little endian."""
    import xxhash

    page = POOL[2]
    assert fingerprint(page) == xxhash.xxh3_128(page).digest()
    assert len(fingerprint(page)) == 16
    assert fingerprint_checksum(b"\x01\x02\x03\x04" + bytes(12)) == 0x04030201
    assert fingerprint(bytes(P)) == ZERO_FINGERPRINT
    k = SimKernel(content="fingerprint")
    assert k.content == "fingerprint"
    assert k.ksm.core.calc_checksum is fingerprint_checksum
    assert k.ksm.core.zero_checksum == fingerprint_checksum(ZERO_FINGERPRINT)
    assert k.phys.zero_page.data == ZERO_FINGERPRINT


def test_unknown_content_mode() -> None:
    """Any other content mode is refused, naming the value and the choices."""
    with pytest.raises(ValueError, match="'bytes', 'fingerprint', got 'sha'"):
        SimKernel(content="sha")  # type: ignore[arg-type]


def test_partial_write_refused() -> None:
    """Fingerprint mode refuses a write of part of a page, and changes nothing."""
    k = SimKernel(content="fingerprint")
    p = k.spawn()
    a = p.mmap(4 * P)
    p.write(a, POOL[1] * 2)
    before = (p.pfns(a, 4 * P), p.fingerprints(a, 4 * P), k.phys.nr_frames)
    for addr, data in ((a + 1, POOL[1]), (a, POOL[1] + b"x"), (a, b"x"), (a + P, POOL[1][:-1])):
        with pytest.raises(NotModelledError, match=r"content='fingerprint'.*whole pages"):
            p.write(addr, data)
    assert (p.pfns(a, 4 * P), p.fingerprints(a, 4 * P), k.phys.nr_frames) == before
    assert p.fingerprints(a, 4 * P) == [fingerprint(POOL[1])] * 2 + [None, None]


def test_read_refused() -> None:
    """Fingerprint mode has no bytes to read: read() raises, fingerprints() answers."""
    k = SimKernel(content="fingerprint")
    p = k.spawn()
    a = p.mmap(P)
    with pytest.raises(NotModelledError, match=r"content='fingerprint'.*fingerprints"):
        p.read(a, 1)
    assert p.fingerprints(a, P) == [None]
    p.write(a, bytes(P))
    assert p.fingerprints(a, 1) == [ZERO_FINGERPRINT]


def test_write_fingerprints_checks() -> None:
    """write_fingerprints wants fingerprint mode, an aligned address and 16-byte fingerprints."""
    p = SimKernel().spawn()
    a = p.mmap(P)
    with pytest.raises(NotModelledError, match="needs SimKernel\\(content='fingerprint'\\)"):
        p.write_fingerprints(a, [ZERO_FINGERPRINT])
    k = SimKernel(content="fingerprint")
    p = k.spawn()
    a = p.mmap(2 * P)
    with pytest.raises(ValueError, match="multiple of 4096"):
        p.write_fingerprints(a + 8, [ZERO_FINGERPRINT])
    with pytest.raises(ValueError, match="fingerprint 1 is 15 bytes long, not 16"):
        p.write_fingerprints(a, [ZERO_FINGERPRINT, bytes(15)])
    with pytest.raises(TypeError, match="fingerprint 0 must be bytes, not str"):
        p.write_fingerprints(a, ["x" * 16])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="sequence of fingerprints, not one bytes"):
        p.write_fingerprints(a, ZERO_FINGERPRINT)
    assert p.fingerprints(a, 2 * P) == [None, None]
    assert k.phys.nr_frames == 0
    p.write_fingerprints(a, [b"\1" * 16, bytearray(b"\2" * 16)])
    assert p.fingerprints(a, 2 * P) == [b"\1" * 16, b"\2" * 16]


def test_write_errors_same_as_bytes() -> None:
    """Whole-page writes fail with the same errno in both modes and write nothing."""
    t = twin()
    t.spawn("p")
    a = t.mmap("p", 3)
    t.call("p", "mprotect", a + 2 * P, P, PROT_READ)
    for fps in (False, True):
        assert t.write("p", a, [POOL[1]] * 3, as_fingerprints=fps) == ("errno", "EFAULT")
        assert t.write("p", a + 3 * P, [POOL[1]], as_fingerprints=fps) == ("errno", "EFAULT")
    assert t.write("p", a, [POOL[1]] * 3, force=True, as_fingerprints=True) == ("ok", None)
    assert t.write("p", a + 2 * P, [POOL[2]] * 2, force=True) == ("errno", "EIO")


def test_out_of_memory_same_as_bytes() -> None:
    """A write needing more frames than max_frames fails with ENOMEM in both modes."""
    t = Twin(max_frames=2)
    t.spawn("p")
    a = t.mmap("p", 3)
    for fps in (False, True):
        assert t.write("p", a, [POOL[1]] * 3, as_fingerprints=fps) == ("errno", "ENOMEM")
    assert t.write("p", a, [POOL[1]] * 2, as_fingerprints=True) == ("ok", None)


def test_file_pages_are_hashed(tmp_path: Any) -> None:
    """A host file's page-cache pages hold the fingerprint of their bytes (tail zero-filled)."""
    path = tmp_path / "f"
    path.write_bytes(POOL[2] + b"tail")
    t = twin()
    t.spawn("p")
    a = t.mmap("p", 2, PROT_READ, MAP_PRIVATE, path=str(path))
    t.write("p", a, [POOL[3]], force=True)  # COW of a file page, as /proc/PID/mem does
    t.write("p", a + P, [POOL[2]], force=True)
    t.call("p", "madvise", a, 2 * P, MADV_MERGEABLE)
    t.sysfs("run", "1")
    t.wait(2)
    f = t.kf.host_file(str(path))
    tail = b"tail" + bytes(P - 4)
    assert [pg.data for _o, pg in sorted(f.pagecache.items())] == [fingerprint(POOL[2]),
                                                                   fingerprint(tail)]
    assert t.procs[1]["p"].fingerprints(a, 2 * P) == [fingerprint(POOL[3]),
                                                      fingerprint(POOL[2])]


# --- hand-written programs ----------------------------------------------------------------
def image_page(tag: int) -> bytes:
    """A page determined by *tag* (bench/run.py's ``page_of``)."""
    return tag.to_bytes(8, "little") * (P // 8)


def filled(t: Twin, label: str, pages: list[bytes], *, advise: bool = True) -> int:
    """Map *pages* in process *label* (new if needed), write them, advise MERGEABLE."""
    if label not in t.procs[0]:
        t.spawn(label)
    a = t.mmap(label, len(pages))
    t.write(label, a, pages, as_fingerprints=True)
    if advise:
        t.call(label, "madvise", a, len(pages) * P, MADV_MERGEABLE)
    return a


def counter(t: Twin, name: str) -> int:
    """A sysfs counter (equal on both machines by then)."""
    return int(t.kb.sysfs[name])


def test_64_images() -> None:
    """1024 pages holding 64 distinct images merge alike: 64 shared, 960 sharing."""
    t = twin()
    filled(t, "p", [image_page(i % 64) for i in range(1024)])
    t.sysfs("run", "1")
    t.wait(1)
    t.wait(1)
    assert (counter(t, "pages_shared"), counter(t, "pages_sharing")) == (64, 960)
    assert t.settled_steps == len(t.log)


def test_distinct_and_pairs() -> None:
    """Distinct pages stay unshared; pairs make one KSM page each."""
    t = twin()
    filled(t, "p", [image_page(i) for i in range(100)])
    filled(t, "q", [image_page(1000 + i // 2) for i in range(100)])
    t.sysfs("run", "1")
    t.wait(2)
    assert (counter(t, "pages_shared"), counter(t, "pages_sharing"),
            counter(t, "pages_unshared")) == (50, 50, 100)
    assert t.settled_steps == len(t.log)


def test_chains() -> None:
    """max_page_sharing=2 builds chains and dups; COW and a third scan change them alike."""
    t = twin()
    t.sysfs("max_page_sharing", "2")
    a = filled(t, "p", [POOL[1]] * 9 + [POOL[2]] * 5 + [POOL[4]] * 3)
    t.sysfs("run", "1")
    t.wait(2)
    assert counter(t, "stable_node_chains") == 2
    t.write("p", a, [POOL[5]] * 4)
    t.wait(1)
    t.wait(2)
    assert counter(t, "stable_node_dups") > 0


def test_zero_pages() -> None:
    """use_zero_pages=1 maps zero-filled pages to the zero page in both modes."""
    t = twin()
    t.sysfs("use_zero_pages", "1")
    a = filled(t, "p", [ZERO_DATA] * 6 + [POOL[1]] * 2)
    t.sysfs("run", "1")
    t.wait(2)
    assert counter(t, "ksm_zero_pages") == 6
    t.write("p", a, [POOL[2]], as_fingerprints=True)
    t.call("p", "madvise", a + P, P, MADV_UNMERGEABLE)
    assert counter(t, "ksm_zero_pages") == 4


def test_fork_and_cow() -> None:
    """A forked child shares KSM pages; COW writes in both and a rescan agree."""
    t = twin()
    a = filled(t, "p", [POOL[1]] * 4 + [POOL[2]] * 4)
    t.sysfs("run", "1")
    t.wait(2)
    t.fork("p", "c")
    t.write("c", a, [POOL[3]] * 2)
    t.write("p", a + 4 * P, [POOL[1]], as_fingerprints=True)
    t.wait(2)
    t.call("c", "exit")
    t.wait(2)


def test_unmergeable_and_run_2() -> None:
    """MADV_UNMERGEABLE and run=2 unmerge alike, and merging again gives the same frames."""
    t = twin()
    a = filled(t, "p", [POOL[i % 3] for i in range(30)])
    t.sysfs("run", "1")
    t.wait(2)
    t.call("p", "madvise", a, 10 * P, MADV_UNMERGEABLE)
    t.wait(2)
    t.sysfs("run", "2")
    assert counter(t, "pages_shared") == 0
    t.sysfs("run", "1")
    t.wait(2)


def test_stale_node_removed_by_another_search() -> None:
    """A stale stable node is reaped by whichever descent passes it first: the modes may
    differ in when, never in what it leaves (see docs/design.md)."""
    t = twin()
    a = filled(t, "p", [image_page(i % 16) for i in range(64)])
    t.sysfs("run", "1")
    t.wait(2)
    t.write("p", a, [image_page(100 + i) for i in range(32)], as_fingerprints=True)
    assert unsettled(t.kb) == [] == unsettled(t.kf)
    t.call("p", "munmap", a + 32 * P, 32 * P)  # frees every KSM page: all nodes stale
    assert len(unsettled(t.kb)) == 16
    t.wait(1)
    t.wait(1)
    assert counter(t, "pages_shared") == 0
    assert unsettled(t.kb) == [] == unsettled(t.kf)


# --- seeded random programs ----------------------------------------------------------------
def run_random_program(seed: int, steps: int = 60) -> Twin:
    """A seeded random program of whole-page operations, run on a :class:`Twin`.

    A few processes with small private (sometimes shared) areas; whole-page
    writes from :data:`POOL` (on the fingerprint side half of them through
    write_fingerprints); madvise MERGEABLE/UNMERGEABLE/DONTNEED, mprotect,
    munmap, fork, exec, exit, prctl; knob changes (max_page_sharing 2 and 3
    make chains, pages_to_scan 1 and 7 spread a scan over many batches,
    stable_node_chains_prune_millisecs 0 prunes chains on every pass, run=2
    unmerges); and ksmd running by wait_full_scans or by advance, which may
    stop it mid-scan so that user calls land in the middle of a scan.
    """
    rng = random.Random(seed)
    t = Twin()
    procs: dict[str, dict[str, tuple[int, int]]] = {}  # live process -> {region: (addr, pages)}
    names = iter(range(1 << 30))

    def spawn() -> None:
        label = f"P{next(names)}"
        t.spawn(label)
        procs[label] = {}

    t.sysfs("pages_to_scan", rng.choice(("10000", "10000", "7", "1")))
    t.sysfs("sleep_millisecs", rng.choice(("0", "0", "20")))
    t.sysfs("smart_scan", rng.choice(("0", "1")))
    t.sysfs("use_zero_pages", rng.choice(("0", "0", "1")))
    t.sysfs("max_page_sharing", rng.choice(("256", "2", "2", "3")))
    t.sysfs("stable_node_chains_prune_millisecs", rng.choice(("2000", "0", "10")))
    t.sysfs("run", "1")
    spawn()
    for _ in range(steps):
        roll = rng.random()
        regions = [(pl, r, a, n) for pl, regs in procs.items() for r, (a, n) in regs.items()]
        if not regions or roll < 0.08:
            pl = rng.choice(sorted(procs))
            if len(procs) < 4 and roll < 0.02:
                spawn()
                continue
            n = rng.randint(1, 8)
            shared = rng.random() < 0.08
            flags = (MAP_SHARED if shared else MAP_PRIVATE) | MAP_ANONYMOUS
            a = t.mmap(pl, n, PROT_READ | PROT_WRITE, flags)
            procs[pl][f"r{next(names)}"] = (a, n)
            if rng.random() < 0.7:
                t.call(pl, "madvise", a, n * P, MADV_MERGEABLE)
            continue
        pl, r, a, n = rng.choice(regions)
        lo = rng.randrange(n)
        cnt = rng.randint(1, n - lo)
        at = a + lo * P
        if roll < 0.40:
            same = rng.random() < 0.5
            pages = [rng.choice(POOL)] * cnt if same else [rng.choice(POOL) for _ in range(cnt)]
            t.write(pl, at, pages, force=rng.random() < 0.1,
                    as_fingerprints=rng.random() < 0.5)
        elif roll < 0.52:
            advice = rng.choice((MADV_MERGEABLE, MADV_MERGEABLE, MADV_UNMERGEABLE,
                                 MADV_DONTNEED))
            t.call(pl, "madvise", at, cnt * P, advice)
        elif roll < 0.64:
            t.wait(rng.choice((1, 1, 2)))
        elif roll < 0.74:
            t.advance(rng.choice((0.001, 0.01, 0.1, 1, 30)))
        elif roll < 0.79 and len(procs) < 4:
            child = f"P{next(names)}"
            t.fork(pl, child)
            procs[child] = dict(procs[pl])
        elif roll < 0.83 and len(procs) > 1:
            t.call(pl, "exit")
            del procs[pl]
        elif roll < 0.84:
            t.call(pl, "exec")
            procs[pl].clear()
        elif roll < 0.87:
            t.call(pl, "munmap", at, cnt * P)
            if cnt == n:
                del procs[pl][r]
        elif roll < 0.90:
            prot = rng.choice((PROT_NONE, PROT_READ, PROT_READ | PROT_WRITE))
            t.call(pl, "mprotect", at, cnt * P, prot)
        elif roll < 0.92:
            t.call(pl, "prctl", PR_SET_MEMORY_MERGE, rng.choice((0, 1)))
        elif roll < 0.98:
            t.sysfs(*rng.choice((
                ("use_zero_pages", "0"), ("use_zero_pages", "1"), ("smart_scan", "0"),
                ("smart_scan", "1"), ("max_page_sharing", "2"), ("max_page_sharing", "256"),
                ("pages_to_scan", "7"), ("pages_to_scan", "10000"),
                ("stable_node_chains_prune_millisecs", "0"),
                ("stable_node_chains_prune_millisecs", "2000"), ("run", "0"), ("run", "1"))))
        else:
            t.sysfs("run", "2")
            t.sysfs("run", "1")
    t.sysfs("run", "1")
    t.wait(2)
    return t


RANDOM_PROGRAMS = int(os.environ.get("KSMLAB_FINGERPRINT_PROGRAMS", "60"))
"""How many seeded random programs to run (450 were run when the mode was added)."""


@pytest.mark.parametrize("seed", range(RANDOM_PROGRAMS))
def test_random_program(seed: int) -> None:
    """A seeded random program shows the same everything, after every step, in both modes."""
    run_random_program(seed)
