# SPDX-License-Identifier: GPL-2.0-only
"""Random programs against SimKernel, checked against a shadow copy of memory after every step.

A Hypothesis :class:`RuleBasedStateMachine` spawns processes, maps private and
shared anonymous memory, writes patterned contents (so KSM really merges),
protects, unmaps, advises, forks, execs, exits, toggles prctl and sysfs knobs
and lets ksmd run.  It keeps, per live process, a shadow of every page it
mapped and of every byte written there.  After every step:

* each live process reads back exactly its shadow bytes in every mapped page
  (whatever KSM did, the memory contract never breaks);
* the vma layout and protections match the shadow;
* :func:`ksmlab.invariants.check_invariants` holds.

Rules also check their own post-conditions: a call the kernel refuses raises
OSError and changes nothing, MADV_UNMERGEABLE leaves no KSM page in what
was mergeable in its range, run=2 leaves no KSM page in any mergeable area
and no item in any tree (see ``KsmMachine._mergeable_vpns`` for why a KSM
page may survive outside mergeable areas).  The teardown exits everything,
lets ksmd reap, and requires every page counter and every frame to be gone.

Profiles (environment variable ``KSMLAB_HYPOTHESIS_PROFILE``): ``ci`` (the
default, about 150 programs of 40 steps), ``long`` for a longer local hunt,
``quick`` for a smoke run.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from ksmlab import (
    MADV_DONTNEED,
    MADV_MERGEABLE,
    MADV_UNMERGEABLE,
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    MAP_SHARED,
    PAGE_SHIFT,
    PAGE_SIZE,
    PR_GET_MEMORY_MERGE,
    PR_SET_MEMORY_MERGE,
    PROT_READ,
    PROT_WRITE,
    VM_MERGEABLE,
    VM_READ,
    VM_SHARED,
    VM_WRITE,
    ScanStalledError,
    SimKernel,
    SimProcess,
)
from ksmlab.invariants import check_invariants
from ksmlab.ksm.rbtree import RbRoot
from ksmlab.ksm.types import NodeKind, StableNode
from ksmlab.mm.mm_types import MappedFile
from strategies import (
    ADVICES,
    PROTS,
    REFUSED_CALLS,
    WRAP_START,
    ZERO_PAGE,
    RefusedCall,
    SysfsWrite,
    WritePlan,
    page_contents,
    sysfs_writes,
    write_plans,
)

settings.register_profile("ci", max_examples=150, stateful_step_count=40, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=3000, stateful_step_count=100, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("quick", max_examples=20, stateful_step_count=20, deadline=None)
PROFILE = os.environ.get("KSMLAB_HYPOTHESIS_PROFILE", "ci")

MAX_PROCS = 5
MAX_SPAWNED = 3
"""spawn is only tried below this many processes (fork goes up to MAX_PROCS)."""
MAX_PAGES = 48
"""Mapped pages per process beyond which mmap is not tried (keeps each step cheap)."""

picks = st.integers(0, 15)
"""An index into a sorted list, taken modulo its length (shrinks to the first element)."""
deltas = st.integers(-2, 2)
"""Pages to shift a range start by, so ranges straddle holes and area ends."""
lengths = st.integers(1, 8)


@dataclass
class Shmem:
    """Shadow of one shared anonymous object: the bytes written, by page offset."""

    pages: dict[int, bytes] = field(default_factory=dict)


@dataclass
class PageShadow:
    """Shadow of one mapped page of one process."""

    prot: int
    shmem: Shmem | None = None
    pgoff: int = 0
    data: bytes = ZERO_PAGE
    """Private content (zeros until written; a private page's bytes are its own)."""

    def content(self) -> bytes:
        """What a read of the page must return."""
        if self.shmem is not None:
            return self.shmem.pages.get(self.pgoff, ZERO_PAGE)
        return self.data

    def store(self, offset: int, chunk: bytes) -> None:
        """Record a write of *chunk* at *offset*."""
        old = self.content()
        new = old[:offset] + chunk + old[offset + len(chunk):]
        if self.shmem is not None:
            self.shmem.pages[self.pgoff] = new
        else:
            self.data = new

    def fork_copy(self) -> PageShadow:
        """The child's view after fork: same shared object, own copy of private bytes."""
        return PageShadow(self.prot, self.shmem, self.pgoff, self.data)


Pages = dict[int, PageShadow]
"""A process's shadow: mapped pages by virtual page number."""


def fingerprint(k: SimKernel) -> object:
    """Everything a failed call must leave untouched: knobs, counters, layouts, PTEs, time."""
    procs = []
    for pid, p in sorted(k.processes.items()):
        mm = p.mm
        procs.append((pid, [(v.start, v.end, v.flags) for v in mm.vmas],
                      sorted((vpn, f.pfn, f.data) for vpn, f in mm.ptes.items()),
                      sorted(p.ksm_stat().items())))
    return k.sysfs.snapshot(), procs, k.phys.nr_frames, k.now_ns


def page_span(addr: int, length: int) -> range:
    """Virtual page numbers a byte range touches."""
    return range(addr >> PAGE_SHIFT, ((addr + length - 1) >> PAGE_SHIFT) + 1)


class KsmMachine(RuleBasedStateMachine):
    """Processes doing random memory work on a SimKernel while ksmd merges behind their back."""

    def __init__(self) -> None:
        super().__init__()
        self.k = SimKernel()
        self.procs: dict[int, SimProcess] = {}
        self.shadow: dict[int, Pages] = {}

    # --- helpers ------------------------------------------------------------------------------
    def _proc(self, pick: int) -> tuple[SimProcess, Pages]:
        pids = sorted(self.procs)
        pid = pids[pick % len(pids)]
        return self.procs[pid], self.shadow[pid]

    @staticmethod
    def _vpn(pages: Pages, pick: int) -> int | None:
        if not pages:
            return None
        vpns = sorted(pages)
        return vpns[pick % len(vpns)]

    def _adopt(self, proc: SimProcess, pages: Pages) -> None:
        self.procs[proc.pid] = proc
        self.shadow[proc.pid] = pages

    def _assert_unchanged(self, before: object, what: str) -> None:
        assert fingerprint(self.k) == before, f"{what} failed but changed the machine"

    def _expect_einval(self, call: Callable[[], object], what: str) -> None:
        before = fingerprint(self.k)
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno == errno.EINVAL, f"{what}: {info.value}"
        self._assert_unchanged(before, what)

    @staticmethod
    def _mergeable_vpns(proc: SimProcess, span: range | None = None) -> set[int]:
        """Mapped pages (in *span*, if given) whose vma is VM_MERGEABLE right now.

        Only these are unmerged by MADV_UNMERGEABLE, prctl(0) and run=2.  A
        KSM page can also sit in a vma without VM_MERGEABLE: ksmd makes a
        page KSM in place, and a fork relative may map that same page from an
        area it has since made unmergeable.  The kernel leaves such mappings
        alone (ksm_madvise ignores the advice on a vma without VM_MERGEABLE),
        and so does the model.
        """
        out: set[int] = set()
        for vma in proc.mm.vmas:
            if vma.flags & VM_MERGEABLE:
                out.update(v for v in range(vma.start >> PAGE_SHIFT, vma.end >> PAGE_SHIFT)
                           if span is None or v in span)
        return out

    def _assert_no_ksm_pages(self, proc: SimProcess, vpns: set[int]) -> None:
        zero = self.k.phys.ksm_zero_page
        for vpn in vpns:
            frame = proc.mm.ptes.get(vpn)
            if frame is None:
                continue
            assert not frame.ksm, f"pid {proc.pid} {vpn << PAGE_SHIFT:#x} still maps a KSM page"
            assert frame is not zero, f"pid {proc.pid} {vpn << PAGE_SHIFT:#x} still maps the KSM zero page"

    def _assert_all_unmerged(self, mergeable: dict[int, set[int]]) -> None:
        """After run=2: no KSM page in a mergeable area, no item in a tree, no KSM zero page.

        If no KSM page is mapped anywhere any more, the stable tree is empty too.
        """
        for pid, proc in self.procs.items():
            self._assert_no_ksm_pages(proc, mergeable[pid])
        ksm = self.k.ksm
        counts = (ksm.pages_shared, ksm.pages_sharing, ksm.pages_unshared, ksm.ksm_zero_pages,
                  ksm.rmap_items, ksm.full_scans)
        assert counts == (0, 0, 0, 0, 0, 0), f"after run=2: shared/sharing/unshared/zero/items/scans {counts}"
        if not any(f.ksm for proc in self.procs.values() for f in proc.mm.ptes.values()):
            chains = (ksm.stable_node_chains, ksm.stable_node_dups)
            assert chains == (0, 0), f"after run=2 with no KSM page mapped: chains/dups {chains}"
            assert all(root.node is None for root in ksm.root_stable_tree)

    # --- processes ------------------------------------------------------------------------------
    def _map(self, proc: SimProcess, pages: Pages, npages: int, shared: bool, prot: int,
             fill: bytes | None, advise: bool) -> None:
        """mmap, then optionally fill every page with *fill* and advise MADV_MERGEABLE."""
        flags = (MAP_SHARED if shared else MAP_PRIVATE) | MAP_ANONYMOUS
        addr = proc.mmap(npages * PAGE_SIZE, prot, flags)
        assert addr % PAGE_SIZE == 0
        span = range(addr >> PAGE_SHIFT, (addr >> PAGE_SHIFT) + npages)
        assert not any(vpn in pages for vpn in span), f"mmap returned mapped memory at {addr:#x}"
        shm = Shmem() if shared else None
        for i, vpn in enumerate(span):
            pages[vpn] = PageShadow(prot, shm, i)
        if fill is not None and (prot & PROT_WRITE or not shared):
            proc.write(addr, fill * npages, force=True)
            for vpn in span:
                pages[vpn].store(0, fill)
        if advise:
            proc.madvise(addr, npages * PAGE_SIZE, MADV_MERGEABLE)

    @initialize(npages=st.integers(2, 8), fill=page_contents(), run=st.sampled_from("1110"),
                max_page_sharing=st.sampled_from(["256", "2", "3"]), use_zero_pages=st.booleans())
    def first_process(self, npages: int, fill: bytes, run: str, max_page_sharing: str,
                      use_zero_pages: bool) -> None:
        """Every program starts with one process and a mergeable area of identical pages.

        The knobs that only matter at merge time (max_page_sharing cannot
        change once KSM pages exist) are drawn here, before any merge.
        """
        k = self.k
        k.sysfs["max_page_sharing"] = max_page_sharing
        k.sysfs["use_zero_pages"] = str(int(use_zero_pages))
        proc = k.spawn()
        self._adopt(proc, {})
        self._map(proc, self.shadow[proc.pid], npages, False, PROT_READ | PROT_WRITE, fill, True)
        k.sysfs["run"] = run

    @precondition(lambda self: len(self.procs) < MAX_SPAWNED)
    @rule()
    def spawn(self) -> None:
        """A new process with an empty address space."""
        self._adopt(self.k.spawn(), {})

    @precondition(lambda self: 0 < len(self.procs) < MAX_PROCS)
    @rule(pick=picks)
    def fork(self, pick: int) -> None:
        """fork: the child sees the parent's bytes; shared areas stay shared."""
        proc, pages = self._proc(pick)
        child = proc.fork()
        self._adopt(child, {vpn: page.fork_copy() for vpn, page in pages.items()})
        assert child.prctl(PR_GET_MEMORY_MERGE) == proc.prctl(PR_GET_MEMORY_MERGE)

    @precondition(lambda self: bool(self.procs))
    @rule(pick=picks)
    def exec(self, pick: int) -> None:
        """exec: an empty address space; prctl(PR_SET_MEMORY_MERGE) survives."""
        proc, pages = self._proc(pick)
        merge_any = proc.prctl(PR_GET_MEMORY_MERGE)
        proc.exec()
        pages.clear()
        assert proc.mm.vmas == []
        assert proc.prctl(PR_GET_MEMORY_MERGE) == merge_any

    @precondition(lambda self: bool(self.procs))
    @rule(pick=picks)
    def exit(self, pick: int) -> None:
        """exit: the process and its memory go away (ksmd reaps its KSM state later)."""
        proc, _pages = self._proc(pick)
        proc.exit()
        del self.procs[proc.pid], self.shadow[proc.pid]

    # --- address space ---------------------------------------------------------------------------
    @precondition(lambda self: bool(self.procs))
    @rule(pick=picks, npages=lengths, shared=st.booleans(), prot=st.sampled_from(PROTS),
          fill=st.none() | page_contents(), advise=st.booleans())
    def mmap(self, pick: int, npages: int, shared: bool, prot: int, fill: bytes | None,
             advise: bool) -> None:
        """mmap a private or shared anonymous area of 1–8 pages at a fresh address.

        Optionally every page is then filled with one content (a forced
        write, so even a read-only private area gets it) and advised
        MADV_MERGEABLE, which makes merges likely within a few steps.
        """
        proc, pages = self._proc(pick)
        if len(pages) >= MAX_PAGES:
            return
        self._map(proc, pages, npages, shared, prot, fill, advise)

    @precondition(lambda self: bool(self.procs))
    @rule(pick=picks, page=picks, delta=deltas, npages=lengths)
    def munmap(self, pick: int, page: int, delta: int, npages: int) -> None:
        """munmap a range around a mapped page: a whole area, part of one, or across holes."""
        proc, pages = self._proc(pick)
        vpn = self._vpn(pages, page)
        if vpn is None:
            return
        start = vpn + delta
        proc.munmap(start << PAGE_SHIFT, npages * PAGE_SIZE)
        for v in range(start, start + npages):
            pages.pop(v, None)

    @precondition(lambda self: bool(self.procs))
    @rule(pick=picks, page=picks, delta=deltas, npages=lengths, prot=st.sampled_from(PROTS))
    def mprotect(self, pick: int, page: int, delta: int, npages: int, prot: int) -> None:
        """mprotect a range; a hole stops it with ENOMEM after the pages before the hole."""
        proc, pages = self._proc(pick)
        vpn = self._vpn(pages, page)
        if vpn is None:
            return
        start = vpn + delta
        span = range(start, start + npages)
        err = None
        try:
            proc.mprotect(start << PAGE_SHIFT, npages * PAGE_SIZE, prot)
        except OSError as e:
            err = e.errno
        hole = next((v for v in span if v not in pages), None)
        assert err == (errno.ENOMEM if hole is not None else None), f"mprotect gave {err}"
        for v in span:
            if v == hole:
                break
            pages[v].prot = prot

    # --- access ----------------------------------------------------------------------------------
    @precondition(lambda self: bool(self.procs))
    @rule(pick=picks, page=picks, plan=write_plans(), force=st.booleans())
    def write(self, pick: int, page: int, plan: WritePlan, force: bool) -> None:
        """Store whole pages or a few bytes; EFAULT (EIO if forced) and nothing written where not writable.

        ``force`` writes like /proc/PID/mem: it may COW into a read-only
        private page, never into a read-only shared one.
        """
        proc, pages = self._proc(pick)
        vpn = self._vpn(pages, page)
        if vpn is None:
            return
        addr = (vpn << PAGE_SHIFT) + plan.offset
        span = page_span(addr, len(plan.data))
        writable = all(v in pages and (pages[v].prot & PROT_WRITE
                                       or (force and pages[v].shmem is None)) for v in span)
        if not writable:
            before = fingerprint(self.k)
            with pytest.raises(OSError) as info:
                proc.write(addr, plan.data, force=force)
            assert info.value.errno == (errno.EIO if force else errno.EFAULT)
            self._assert_unchanged(before, "a write to a protected or unmapped page")
            return
        proc.write(addr, plan.data, force=force)
        pos = 0
        while pos < len(plan.data):
            a = addr + pos
            off = a % PAGE_SIZE
            n = min(PAGE_SIZE - off, len(plan.data) - pos)
            pages[a >> PAGE_SHIFT].store(off, plan.data[pos:pos + n])
            pos += n

    @precondition(lambda self: bool(self.procs))
    @rule(pick=picks, page=picks, offset=st.integers(0, PAGE_SIZE - 1),
          length=st.integers(1, 2 * PAGE_SIZE), force=st.booleans())
    def read(self, pick: int, page: int, offset: int, length: int, force: bool) -> None:
        """Load bytes (faulting pages in) and compare with the shadow; EFAULT (EIO if forced) if unreadable."""
        proc, pages = self._proc(pick)
        vpn = self._vpn(pages, page)
        if vpn is None:
            return
        addr = (vpn << PAGE_SHIFT) + offset
        span = page_span(addr, length)
        if not all(v in pages and (pages[v].prot & PROT_READ or force) for v in span):
            with pytest.raises(OSError) as info:
                proc.read(addr, length, force=force)
            assert info.value.errno == (errno.EIO if force else errno.EFAULT)
            return
        expected = b"".join(pages[v].content() for v in span)[offset:offset + length]
        assert proc.read(addr, length, force=force) == expected

    # --- madvise and prctl ------------------------------------------------------------------------
    @precondition(lambda self: bool(self.procs))
    @rule(pick=picks, page=picks, delta=deltas, npages=lengths, advice=st.sampled_from(ADVICES))
    def madvise(self, pick: int, page: int, delta: int, npages: int, advice: int) -> None:
        """MADV_(UN)MERGEABLE / MADV_DONTNEED on a range, possibly with holes (then ENOMEM).

        Every mapped part is processed even when the range has holes.
        DONTNEED'd private pages read back as zeros; shared ones keep their
        bytes in the shmem object.  After UNMERGEABLE no page of the range
        that was in a mergeable area maps a KSM page or the KSM zero page,
        and no area in the range is VM_MERGEABLE.
        """
        proc, pages = self._proc(pick)
        vpn = self._vpn(pages, page)
        if vpn is None:
            return
        start = vpn + delta
        span = range(start, start + npages)
        mergeable = self._mergeable_vpns(proc, span)
        err = None
        try:
            proc.madvise(start << PAGE_SHIFT, npages * PAGE_SIZE, advice)
        except OSError as e:
            err = e.errno
        holes = any(v not in pages for v in span)
        assert err == (errno.ENOMEM if holes else None), f"madvise({advice}) gave {err}"
        if advice == MADV_DONTNEED:
            for v in span:
                if v in pages and pages[v].shmem is None:
                    pages[v].data = ZERO_PAGE
        if advice == MADV_UNMERGEABLE:
            self._assert_no_ksm_pages(proc, mergeable)
            for vma in proc.mm.vmas:
                if vma.start < span.stop << PAGE_SHIFT and vma.end > span.start << PAGE_SHIFT:
                    assert not vma.flags & VM_MERGEABLE, "VM_MERGEABLE left after MADV_UNMERGEABLE"

    @precondition(lambda self: bool(self.procs))
    @rule(pick=picks, enable=st.booleans())
    def prctl(self, pick: int, enable: bool) -> None:
        """PR_SET_MEMORY_MERGE 1/0: a change makes every private area (un)mergeable; clearing unmerges.

        Setting the value the process already has does nothing (the kernel
        returns early), so areas advised UNMERGEABLE meanwhile stay so.
        """
        proc, _pages = self._proc(pick)
        was = bool(proc.prctl(PR_GET_MEMORY_MERGE))
        mergeable = self._mergeable_vpns(proc)
        assert proc.prctl(PR_SET_MEMORY_MERGE, int(enable)) == 0
        assert proc.prctl(PR_GET_MEMORY_MERGE) == int(enable)
        if was == enable:
            return
        for vma in proc.mm.vmas:
            if enable:
                assert vma.flags & VM_SHARED or vma.flags & VM_MERGEABLE
            else:
                assert not vma.flags & VM_MERGEABLE
        if not enable:
            self._assert_no_ksm_pages(proc, mergeable)

    @precondition(lambda self: bool(self.procs))
    @rule(pick=picks, page=picks, call=st.sampled_from(REFUSED_CALLS))
    def refused_call(self, pick: int, page: int, call: RefusedCall) -> None:
        """munmap/mprotect/madvise/prctl with invalid arguments: EINVAL, nothing changes."""
        proc, pages = self._proc(pick)
        base = (self._vpn(pages, page) or 0x100) << PAGE_SHIFT
        start = WRAP_START if call.offset is None else base + call.offset
        calls: dict[str, Callable[[], object]] = {
            "munmap": lambda: proc.munmap(start, call.length),
            "mprotect": lambda: proc.mprotect(start, call.length, call.arg),
            "madvise": lambda: proc.madvise(start, call.length, call.arg),
            "prctl": lambda: proc.prctl(PR_SET_MEMORY_MERGE, call.arg, call.arg3),
            "prctl_get": lambda: proc.prctl(PR_GET_MEMORY_MERGE, call.arg),
            "prctl_unknown": lambda: proc.prctl(12345),
        }
        self._expect_einval(calls[call.syscall], call.what)

    # --- ksmd --------------------------------------------------------------------------------------
    @rule(write=sysfs_writes())
    def sysfs(self, write: SysfsWrite) -> None:
        """Write a knob: invalid text gives an errno and changes nothing; valid text takes effect.

        max_page_sharing answers EBUSY exactly when KSM pages exist (some
        stable node has items, or its page is still mapped).
        """
        k, name = self.k, write.name
        if not write.valid:
            before = fingerprint(k)
            with pytest.raises(OSError):
                k.sysfs[name] = write.value
            self._assert_unchanged(before, f"sysfs {name}={write.value!r}")
            return
        value = {"y": 1, "n": 0}.get(write.value) if write.value in ("y", "n") else int(write.value)
        if name == "max_page_sharing":
            busy = k.ksm.pages_shared > 0 or any(
                node.kpage is not None and node.kpage.mapcount > 0
                for root in k.ksm.root_stable_tree for node in _stable_pages(root))
            if value != k.ksm.max_page_sharing and busy:
                with pytest.raises(OSError) as info:
                    k.sysfs[name] = write.value
                assert info.value.errno == errno.EBUSY
                return
        mergeable = {pid: self._mergeable_vpns(proc) for pid, proc in self.procs.items()}
        k.sysfs[name] = write.value
        assert int(k.sysfs[name]) == value
        if name == "run" and value == 2:
            self._assert_all_unmerged(mergeable)

    @rule(ms=st.integers(0, 300))
    def advance(self, ms: int) -> None:
        """Let virtual time pass; ksmd runs if it should."""
        self.k.advance(ms)

    @rule(n=st.integers(1, 3), start=st.booleans())
    def wait_full_scans(self, n: int, start: bool) -> None:
        """Wait for n full scans (after writing run=1 if *start*); stalls exactly when ksmd cannot run."""
        k = self.k
        if start:
            k.sysfs["run"] = "1"
        stalled = k.ksm.run != 1 or k.ksm.list_empty() or k.ksm.pages_to_scan == 0
        if stalled:
            with pytest.raises(ScanStalledError):
                k.wait_full_scans(n)
            return
        try:
            k.wait_full_scans(n)
        except ScanStalledError:
            # Only allowed if ksmd reaped the last registered (exited) mm on the way.
            assert k.ksm.list_empty()
        event(f"after a scan: pages_sharing {'> 0' if k.ksm.pages_sharing else '= 0'}")
        if k.ksm.stable_node_chains:
            event("after a scan: a stable node chain exists")
        if k.ksm.ksm_zero_pages:
            event("after a scan: KSM zero pages mapped")

    # --- checked after every step -----------------------------------------------------------------
    @invariant()
    def memory_reads_back(self) -> None:
        """Every live process reads its shadow bytes in every mapped page.

        Present pages are read through the API (no fault, so the check does
        not perturb the machine); an absent private page must read zeros and
        an absent shared page what its shmem object holds.
        """
        for pid, proc in self.procs.items():
            mm = proc.mm
            for vpn, page in self.shadow[pid].items():
                addr = vpn << PAGE_SHIFT
                if vpn in mm.ptes:
                    got = proc.read(addr, PAGE_SIZE, force=True)
                elif page.shmem is not None:
                    vma = mm.vma_lookup(addr)
                    assert vma is not None and vma.file is not None
                    cached = vma.file.pagecache.get(vma.linear_pgoff(addr))
                    got = cached.data if cached is not None else ZERO_PAGE
                else:
                    got = ZERO_PAGE
                assert got == page.content(), f"pid {pid} reads wrong bytes at {addr:#x}"

    @invariant()
    def layout_matches(self) -> None:
        """The vmas cover exactly the shadow's pages, with its protections and shared objects."""
        objects: dict[int, MappedFile] = {}
        for pid, proc in self.procs.items():
            pages = self.shadow[pid]
            mapped = 0
            for vma in proc.mm.vmas:
                for addr in range(vma.start, vma.end, PAGE_SIZE):
                    page = pages.get(addr >> PAGE_SHIFT)
                    assert page is not None, f"pid {pid}: {addr:#x} is mapped but should not be"
                    mapped += 1
                    prot = (PROT_READ if vma.flags & VM_READ else 0) | (
                        PROT_WRITE if vma.flags & VM_WRITE else 0)
                    assert prot == page.prot, f"pid {pid}: {addr:#x} has prot {prot}"
                    assert bool(vma.flags & VM_SHARED) == (page.shmem is not None)
                    if page.shmem is not None:
                        assert vma.file is not None
                        assert objects.setdefault(id(page.shmem), vma.file) is vma.file
                        assert vma.linear_pgoff(addr) == page.pgoff
            assert mapped == len(pages), f"pid {pid}: shadow pages are not all mapped"
        assert sorted(self.k.processes) == sorted(self.procs)

    @invariant()
    def model_invariants(self) -> None:
        """The model's own counters and structures are consistent (ksmlab.invariants)."""
        check_invariants(self.k)

    def teardown(self) -> None:
        """Exit everything, let ksmd reap: every page counter is 0 and no frame is left.

        Skipped when a step already failed (Hypothesis runs teardown in a
        ``finally``), so a failing program reports its own error.
        """
        if sys.exc_info()[0] is not None:
            return
        k = self.k
        for proc in list(self.procs.values()):
            proc.exit()
        self.procs.clear()
        self.shadow.clear()
        k.sysfs["run"] = "1"
        k.sysfs["pages_to_scan"] = "100"
        for _ in range(5):
            if k.ksm.list_empty():
                break
            try:
                k.wait_full_scans(1)
            except ScanStalledError:
                break
        assert k.ksm.list_empty(), "ksmd did not reap the exited mms"
        ksm = k.ksm
        counters = {"pages_shared": ksm.pages_shared, "pages_sharing": ksm.pages_sharing,
                    "pages_unshared": ksm.pages_unshared, "pages_volatile": ksm.pages_volatile,
                    "rmap_items": ksm.rmap_items, "ksm_zero_pages": ksm.ksm_zero_pages}
        assert all(v == 0 for v in counters.values()), f"counters left after teardown: {counters}"
        assert k.phys.nr_frames == 0, f"{k.phys.nr_frames} frames leaked"
        check_invariants(k)


def _stable_pages(root: RbRoot) -> list[StableNode]:
    """Regular nodes and dups of one stable tree (the nodes that own a KSM page)."""
    out: list[StableNode] = []
    for node in root:
        assert isinstance(node, StableNode)
        out.extend(node.dups if node.kind is NodeKind.CHAIN else [node])
    return out


class TestKsmMachine(KsmMachine.TestCase):  # type: ignore[misc, valid-type]
    """Run the state machine under the selected settings profile."""

    settings = settings.get_profile(PROFILE)
