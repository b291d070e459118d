# SPDX-License-Identifier: GPL-2.0-only
"""The real kernel as oracle: every scenario runs on the model and on Linux, and must agree.

Each scenario is a program written only against :mod:`ksmlab.api`;
:func:`ksmlab.differential.differential` runs it on a fresh SimKernel and on a
LinuxKernel and compares every counter, ksm_stat, vma and errno at each
checkpoint (see docs/differential.md).  A failure prints the full report:
which field differs where, and both runs' records.

The scenarios re-create the kernel selftests runnable on a one-node machine
(tools/testing/selftests/mm/ksm_tests.c and ksm_functional_tests.c, summarised
in ``docs/kernel-selftests.md``), the seed's madvise errno rules, the
traces of ``docs/kernel-behaviour.md`` section 7, and seeded random programs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from ksmlab.api import Kernel, Process
from ksmlab.backends.linux import helper_unavailable_reason, linux_ksm_unavailable_reason
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
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
)
from ksmlab.differential import (
    Checkpoint,
    DiffReport,
    QuiescenceError,
    compare,
    differential,
    random_program,
    run_on_kernel,
    run_on_model,
)

pytestmark = pytest.mark.linux

P = PAGE_SIZE
RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS

Program = Callable[[Kernel, Checkpoint], None]


@pytest.fixture(autouse=True, scope="module")
def _ksm_usable() -> Iterator[None]:
    """Skip (with the reason) where KSM cannot be driven or the helper cannot be built."""
    reason = linux_ksm_unavailable_reason() or helper_unavailable_reason()
    if reason:
        pytest.skip(reason)
    yield


def agree(program: Program, name: str | None = None) -> DiffReport:
    """Run *program* on both backends and fail with the report if they disagree."""
    report = differential(program, name=name)
    if not report.ok:
        pytest.fail(str(report), pytrace=False)
    return report


# --- helpers for programs (api only) ---------------------------------------------------


def setup(k: Kernel, **knobs: str) -> None:
    """ksm_tests.c's set-up: large batches and no sleep (one batch = one full scan)."""
    k.sysfs["pages_to_scan"] = "10000"
    k.sysfs["sleep_millisecs"] = "0"
    for name, value in knobs.items():
        k.sysfs[name] = value


def ksm_start(k: Kernel, scans: int = 2) -> None:
    """``ksm_start``: run=1 and the two-scan wait."""
    k.sysfs["run"] = "1"
    k.wait_full_scans(scans)


def page(fill: bytes) -> bytes:
    """A page of one repeated byte."""
    return fill * P


def allocate(p: Process, npages: int, fill: bytes, prot: int = RW) -> int:
    """ksm_tests.c's allocate_memory: mmap write-only, memset, mprotect to *prot*."""
    a = p.mmap(npages * P, PROT_WRITE)
    p.write(a, fill * (npages * P))
    p.mprotect(a, npages * P, prot)
    return a


# --- ksm_tests.c -------------------------------------------------------------------------


class TestKsmTests:
    """The functional cases of ksm_tests.c (run_vmtests.sh lines 3 to 6)."""

    def test_merge_10_identical_pages(self) -> None:
        """-M -p 10: ten '*' pages merge into one KSM page with nine sharers."""
        def program(k: Kernel, cp: Checkpoint) -> None:
            setup(k, max_page_sharing="256")
            p = k.spawn()
            a = allocate(p, 10, b"*")
            p.madvise(a, 10 * P, MADV_MERGEABLE)
            cp("advised")
            k.sysfs["run"] = "1"
            k.wait_full_scans(1)
            cp("one scan")
            k.wait_full_scans(1)
            cp("merged")
        agree(program, "ksm_tests -M -p 10")

    def test_unmerge_by_cow(self) -> None:
        """-U: writing both pages of a merged pair breaks COW; one scan later the counters are 0."""
        def program(k: Kernel, cp: Checkpoint) -> None:
            setup(k)
            p = k.spawn()
            a = allocate(p, 2, b"*")
            p.madvise(a, 2 * P, MADV_MERGEABLE)
            ksm_start(k)
            cp("merged")
            p.write(a, b"-")
            p.write(a + P, b"+")
            cp("written, not yet scanned")
            k.wait_full_scans(1)
            cp("one scan later")
            p.read(a, 2 * P)
        agree(program, "ksm_tests -U")

    @pytest.mark.parametrize("use_zero_pages", ["0", "1"])
    def test_zero_pages(self, use_zero_pages: str) -> None:
        """-Z -p 10 -z 0|1: zero-filled pages merge with each other, or with the zero page."""
        def program(k: Kernel, cp: Checkpoint) -> None:
            setup(k, use_zero_pages=use_zero_pages)
            p = k.spawn()
            a = allocate(p, 10, b"\0")
            p.madvise(a, 10 * P, MADV_MERGEABLE)
            ksm_start(k)
            cp("merged")
            k.wait_full_scans(1)
            cp("one more scan")
            p.read(a, 10 * P)
            cp("read back")
        agree(program, f"ksm_tests -Z -p 10 -z {use_zero_pages}")


# --- ksm_functional_tests.c -------------------------------------------------------------

SIZE = 32  # pages; the selftests use 2 MiB, which the model and kernel handle alike


def map_and_merge(k: Kernel, p: Process, fill: bytes, prot: int = RW, *, npages: int = SIZE,
                  mode: str = "madvise") -> int:
    """ksm_functional_tests.c's mmap_and_merge_range: run=2, map, fill, prot, merge, 2 scans."""
    k.sysfs["run"] = "2"
    a = p.mmap(npages * P)
    p.write(a, fill * (npages * P))
    p.mprotect(a, npages * P, prot)
    if mode == "prctl":
        p.prctl(PR_SET_MEMORY_MERGE, 1)
    elif mode == "madvise":
        p.madvise(a, npages * P, MADV_MERGEABLE)
    ksm_start(k)
    return a


class TestFunctional:
    """The sub-tests of ksm_functional_tests.c that run here (no userfaultfd-wp)."""

    def test_unmerge(self) -> None:
        """test_unmerge: MADV_UNMERGEABLE gives every page its own frame again."""
        def program(k: Kernel, cp: Checkpoint) -> None:
            setup(k)
            p = k.spawn()
            a = map_and_merge(k, p, b"\xcf")
            cp("merged")
            p.madvise(a, SIZE * P, MADV_UNMERGEABLE)
            cp("unmerged")
            k.wait_full_scans(1)
            cp("scanned")
        agree(program, "test_unmerge")

    def test_unmerge_zero_pages(self) -> None:
        """test_unmerge_zero_pages: KSM zero pages are counted, unmerged and COW-broken eagerly."""
        def program(k: Kernel, cp: Checkpoint) -> None:
            setup(k, use_zero_pages="1")
            p = k.spawn()
            a = map_and_merge(k, p, b"\0")
            cp("merged with the zero page")
            p.madvise(a, SIZE // 2 * P, MADV_UNMERGEABLE)
            cp("first half unmerged")
            for i in range(SIZE // 2, SIZE):
                p.write(a + i * P, (i * P).to_bytes(4, "little"))
            cp("second half written")
            k.wait_full_scans(1)
            cp("scanned")
        agree(program, "test_unmerge_zero_pages")

    def test_unmerge_discarded(self) -> None:
        """test_unmerge_discarded: unmerging copes with MADV_DONTNEED holes."""
        def program(k: Kernel, cp: Checkpoint) -> None:
            setup(k)
            p = k.spawn()
            a = map_and_merge(k, p, b"\xcf")
            p.madvise(a, SIZE // 2 * P, MADV_DONTNEED)
            cp("first half discarded")
            p.madvise(a, SIZE * P, MADV_UNMERGEABLE)
            cp("unmerged")
            k.wait_full_scans(1)
            cp("scanned")
        agree(program, "test_unmerge_discarded")

    def test_prot_none(self) -> None:
        """test_prot_none: PROT_NONE pages merge; forced writes COW-break them; unmerge works."""
        def program(k: Kernel, cp: Checkpoint) -> None:
            setup(k)
            p = k.spawn()
            a = map_and_merge(k, p, b"\x11", PROT_NONE)
            cp("merged")
            for i in range(SIZE // 2):
                p.write(a + i * P, (i * P).to_bytes(4, "little"), force=True)
            cp("first half written through /proc/PID/mem")
            p.madvise(a + SIZE // 2 * P, SIZE // 2 * P, MADV_UNMERGEABLE)
            cp("second half unmerged")
            p.read(a, P)  # EFAULT: PROT_NONE
            p.read(a, 2 * P, force=True)
            k.wait_full_scans(1)
            cp("scanned")
        agree(program, "test_prot_none")

    def test_prctl(self) -> None:
        """test_prctl: PR_SET/GET_MEMORY_MERGE, and their EINVAL cases."""
        def program(k: Kernel, cp: Checkpoint) -> None:
            p = k.spawn()
            p.prctl(PR_GET_MEMORY_MERGE)
            p.prctl(PR_SET_MEMORY_MERGE, 1)
            p.prctl(PR_GET_MEMORY_MERGE)
            p.prctl(PR_SET_MEMORY_MERGE, 7)
            cp("set")
            p.prctl(PR_SET_MEMORY_MERGE, 0)
            p.prctl(PR_GET_MEMORY_MERGE)
            p.prctl(PR_SET_MEMORY_MERGE, 1, 1)
            p.prctl(PR_SET_MEMORY_MERGE, 0, 0, 0, 1)
            p.prctl(PR_GET_MEMORY_MERGE, 1)
            cp("cleared")
        agree(program, "test_prctl")

    def test_prctl_merge_any(self) -> None:
        """-M -t 1: prctl marks existing areas, and areas mapped later, mergeable."""
        def program(k: Kernel, cp: Checkpoint) -> None:
            setup(k)
            p = k.spawn()
            a = allocate(p, 10, b"*")
            p.prctl(PR_SET_MEMORY_MERGE, 1)
            b = p.mmap(6 * P)
            p.write(b, b"+" * 6 * P)
            shared = p.mmap(2 * P, RW, MAP_SHARED | MAP_ANONYMOUS)
            p.write(shared, b"+" * 2 * P)
            cp("prctl set")
            ksm_start(k)
            cp("merged")
            p.madvise(a, 5 * P, MADV_UNMERGEABLE)
            cp("half unmarked")
            k.wait_full_scans(1)
            cp("scanned")
            p.prctl(PR_SET_MEMORY_MERGE, 0)
            cp("prctl cleared")
        agree(program, "ksm_tests -M -t 1")

    def test_prctl_fork(self) -> None:
        """test_prctl_fork: merge-any is inherited, and the child's new area merges."""
        def program(k: Kernel, cp: Checkpoint) -> None:
            setup(k)
            parent = k.spawn()
            parent.prctl(PR_SET_MEMORY_MERGE, 1)
            child = parent.fork()
            child.prctl(PR_GET_MEMORY_MERGE)
            map_and_merge(k, child, b"\xcf", mode="none")
            cp("child merged")
            k.sysfs["run"] = "2"
            child.exit()
            parent.prctl(PR_SET_MEMORY_MERGE, 0)
            cp("done")
        agree(program, "test_prctl_fork")

    def test_prctl_fork_exec(self) -> None:
        """test_prctl_fork_exec: merge-any survives fork and exec."""
        def program(k: Kernel, cp: Checkpoint) -> None:
            setup(k)
            k.sysfs["pages_to_scan"] = "2000"
            parent = k.spawn()
            parent.prctl(PR_SET_MEMORY_MERGE, 1)
            child = parent.fork()
            child.exec()
            child.prctl(PR_GET_MEMORY_MERGE)
            map_and_merge(k, child, b"\xcf", mode="none")
            cp("exec'd child merged")
            parent.prctl(PR_SET_MEMORY_MERGE, 0)
            k.sysfs["run"] = "2"
            cp("stopped")
        agree(program, "test_prctl_fork_exec")

    def test_prctl_unmerge(self) -> None:
        """test_prctl_unmerge: clearing merge-any unmerges the whole process."""
        def program(k: Kernel, cp: Checkpoint) -> None:
            setup(k)
            p = k.spawn()
            map_and_merge(k, p, b"\xcf", mode="prctl")
            cp("merged")
            p.prctl(PR_SET_MEMORY_MERGE, 0)
            cp("prctl cleared")
        agree(program, "test_prctl_unmerge")

    def test_fork_ksm_merging_page_count(self) -> None:
        """test_fork_ksm_merging_page_count: a child starts with ksm_merging_pages 0."""
        def program(k: Kernel, cp: Checkpoint) -> None:
            setup(k)
            p = k.spawn()
            map_and_merge(k, p, b"\xcf")
            child = p.fork()
            cp("forked")
            k.wait_full_scans(1)
            cp("child scanned")
            child.exit()
            k.wait_full_scans(1)
            cp("child gone")
        agree(program, "test_fork_ksm_merging_page_count")

    def test_run_2(self) -> None:
        """ksm_stop: run=2 unmerges everything and zeroes the counters; areas stay mergeable."""
        def program(k: Kernel, cp: Checkpoint) -> None:
            setup(k, use_zero_pages="1")
            p = k.spawn()
            a = p.mmap(12 * P)
            p.write(a, b"*" * 8 * P + bytes(4 * P))
            p.madvise(a, 12 * P, MADV_MERGEABLE)
            ksm_start(k)
            cp("merged")
            k.sysfs["run"] = "2"
            cp("run=2")
            k.sysfs["run"] = "2"
            k.sysfs["run"] = "1"
            k.wait_full_scans(2)
            cp("merged again")
        agree(program, "run=2")

    def test_dontneed_merged(self) -> None:
        """MADV_DONTNEED on merged pages: PTEs go at once, items one scan later."""
        def program(k: Kernel, cp: Checkpoint) -> None:
            setup(k)
            p = k.spawn()
            a = map_and_merge(k, p, b"*", npages=8)
            p.madvise(a + 2 * P, 3 * P, MADV_DONTNEED)
            cp("discarded")
            k.wait_full_scans(1)
            cp("scanned")
            p.read(a, 8 * P)
            cp("read back (zero pages)")
            k.wait_full_scans(2)
            cp("scanned twice")
        agree(program, "MADV_DONTNEED on merged pages")


# --- errno rules ---------------------------------------------------------------------------


def test_madvise_errno_rules() -> None:
    """The seed's rules: EINVAL for bad arguments, ENOMEM for holes (mapped parts still
    advised), shared mappings silently ignored; prctl and sysfs errors too."""
    def program(k: Kernel, cp: Checkpoint) -> None:
        setup(k)
        p = k.spawn()
        a = p.mmap(4 * P)
        p.madvise(a + 1, P, MADV_MERGEABLE)  # unaligned start
        p.madvise(a + 1, 0, MADV_MERGEABLE)  # unaligned, even with len 0
        p.madvise(a, P, 12345)  # unknown advice
        p.madvise(a, 2 ** 64 - 1, MADV_MERGEABLE)  # len rounds to 0
        p.madvise(a, 2 ** 64 - 4096, MADV_MERGEABLE)  # start + len wraps
        p.madvise(a, 0, MADV_MERGEABLE)  # len 0: success
        p.madvise(a, 4 * P - 100, MADV_MERGEABLE)  # rounded up
        cp("bad arguments")
        b = p.mmap(4 * P)
        p.munmap(b + P, 2 * P)
        p.madvise(b, 4 * P, MADV_MERGEABLE)  # hole: ENOMEM, both pieces mg
        cp("hole advised")
        p.madvise(b, 4 * P, MADV_UNMERGEABLE)  # ENOMEM again, both pieces cleared
        p.madvise(b + P, P, MADV_MERGEABLE)  # entirely unmapped
        cp("hole unadvised")
        s = p.mmap(3 * P, RW, MAP_SHARED | MAP_ANONYMOUS)
        p.write(s, b"s" * 3 * P)
        p.madvise(s, 3 * P, MADV_MERGEABLE)  # ignored: 0, no mg
        p.madvise(s, 3 * P, MADV_UNMERGEABLE)
        cp("shared ignored")
        p.write(b + P, b"x")  # unmapped: EFAULT
        p.write(b + P, b"x", force=True)  # unmapped through /proc/PID/mem: EIO
        p.read(b + P, 1)
        p.read(b + P, 1, force=True)
        p.pfns(a, 0)
        p.pfns(a + 10, 1)
        p.pfns(b, 4 * P)
        cp("access errors")
        for name, value in (("run", "3"), ("run", "-1"), ("max_page_sharing", "1"),
                            ("max_page_sharing", "2147483648"), ("use_zero_pages", "maybe"),
                            ("smart_scan", "2"), ("pages_to_scan", " 5"), ("sleep_millisecs", "x"),
                            ("pages_to_scan", "+5"), ("merge_across_nodes", "2")):
            k.sysfs[name] = value
        cp("sysfs errors")
        p.write(a, b"m" * 4 * P)
        ksm_start(k)
        k.sysfs["max_page_sharing"] = "3"  # EBUSY: KSM pages exist
        k.sysfs["max_page_sharing"] = "256"  # the current value: no check
        cp("busy")
    agree(program, "errno rules")


# --- chains, fork, munmap ------------------------------------------------------------------


@pytest.mark.parametrize("max_page_sharing", ["256", "2"])
def test_max_page_sharing_chains(max_page_sharing: str) -> None:
    """1000 identical pages overflow max_page_sharing into a chain of dups."""
    def program(k: Kernel, cp: Checkpoint) -> None:
        setup(k, max_page_sharing=max_page_sharing, smart_scan="0")
        p = k.spawn()
        a = allocate(p, 1000, b"A")
        p.madvise(a, 1000 * P, MADV_MERGEABLE)
        ksm_start(k)
        cp("merged")
        for i in range(0, 1000, 97):
            p.write(a + i * P, b"!")
        p.madvise(a + 500 * P, 10 * P, MADV_DONTNEED)
        cp("written")
        k.wait_full_scans(1)
        cp("scanned")
        p.munmap(a + 100 * P, 300 * P)
        k.wait_full_scans(2)
        cp("unmapped and scanned")
    agree(program, f"1000 pages, max_page_sharing={max_page_sharing}")


def test_max_page_sharing_fork_bypass() -> None:
    """A fork child's KSM mappings join the parent's nodes even past max_page_sharing."""
    def program(k: Kernel, cp: Checkpoint) -> None:
        setup(k, max_page_sharing="4", smart_scan="0")
        p = k.spawn()
        a = allocate(p, 12, b"A")
        p.madvise(a, 12 * P, MADV_MERGEABLE)
        ksm_start(k)
        cp("merged")
        c = p.fork()
        k.wait_full_scans(1)
        cp("child scanned")
        c.write(a, b"c")
        p.write(a + 11 * P, b"p")
        k.wait_full_scans(2)
        cp("written and scanned")
    agree(program, "fork past max_page_sharing")


def test_chain_dups_reordered_by_unrelated_search() -> None:
    """Every stable-tree descent picks a dup of each chain it passes, and may move it first.

    A search for unrelated content ('B') walks through the 'C' chain while its
    first dup is full and moves the other dup to the head, so a later 'C' page
    joins that one.
    """
    def program(k: Kernel, cp: Checkpoint) -> None:
        setup(k, max_page_sharing="3", use_zero_pages="1")
        p0 = k.spawn()
        a = p0.mmap(5 * P)
        p0.madvise(a, 5 * P, MADV_MERGEABLE)
        p0.write(a, page(b"C") * 5)
        ksm_start(k)
        cp("chain of two dups")
        p0.write(a + 2 * P, page(b"C") * 2)
        k.wait_full_scans(1)
        p2 = p0.fork()
        p2.munmap(a + 2 * P, 3 * P)
        p3 = p2.fork()
        b = p3.mmap(5 * P)
        p3.madvise(b, 5 * P, MADV_MERGEABLE)
        c = p0.mmap(P)
        p0.madvise(c, P, MADV_MERGEABLE)
        p0.write(c, page(b"B"))
        p0.write(a + P, page(b"C") * 2)
        p0.munmap(a + 2 * P, 2 * P)
        k.wait_full_scans(1)
        cp("children appended past the limit")
        p3.write(b + 2 * P, page(b"C") * 3)
        p2.exit()
        p3.munmap(a, 3 * P)
        k.wait_full_scans(1)
        cp("'B' searched through the full chain")
        k.wait_full_scans(1)
        cp("new 'C' pages joined the dups")
    agree(program, "chain dups reordered by an unrelated search")


def test_fork_with_writes() -> None:
    """Fork of a merged process, with writes in parent and child (spec 6, fork of a merged mm)."""
    def program(k: Kernel, cp: Checkpoint) -> None:
        setup(k, smart_scan="0")
        p = k.spawn()
        a = p.mmap(10 * P)
        p.write(a, page(b"A") * 6 + page(b"B") * 2 + page(b"C") + page(b"D"))
        p.madvise(a, 9 * P, MADV_MERGEABLE)
        ksm_start(k)
        cp("merged")
        c = p.fork()
        cp("forked")
        p.write(a, b"p")
        c.write(a + P, b"c")
        c.write(a + 9 * P, b"d")
        cp("written")
        k.wait_full_scans(1)
        cp("scanned")
        c.write(a + 6 * P, page(b"A"))
        k.wait_full_scans(2)
        cp("child page rewritten")
        c.exit()
        k.wait_full_scans(1)
        cp("child gone")
        p.exit()
        k.wait_full_scans(1)
        cp("all gone")
    agree(program, "fork with writes")


def test_munmap_merged() -> None:
    """munmap of merged ranges: PTEs go at once, items and slots when ksmd passes."""
    def program(k: Kernel, cp: Checkpoint) -> None:
        setup(k)
        p = k.spawn()
        a = p.mmap(12 * P)
        p.write(a, page(b"A") * 8 + page(b"B") * 4)
        p.madvise(a, 12 * P, MADV_MERGEABLE)
        ksm_start(k)
        cp("merged")
        p.munmap(a + 2 * P, 3 * P)
        cp("middle unmapped")
        k.wait_full_scans(1)
        cp("scanned")
        p.munmap(a, 12 * P)
        cp("all unmapped")
        k.wait_full_scans(1)
        cp("slot dropped")
        k.wait_full_scans(1)  # nothing registered: stalls on both
        cp("stalled")
        b = p.mmap(2 * P)
        p.write(b, page(b"A") * 2)
        p.madvise(b, 2 * P, MADV_MERGEABLE)
        k.wait_full_scans(2)
        cp("registered again")
    agree(program, "munmap of merged ranges")


def test_exit_and_exec() -> None:
    """Exit with run=0 leaves counters stale; exec drops madvised areas; one scan corrects."""
    def program(k: Kernel, cp: Checkpoint) -> None:
        setup(k)
        p = k.spawn()
        q = k.spawn()
        for proc in (p, q):
            a = proc.mmap(4 * P)
            proc.write(a, page(b"E") * 4)
            proc.madvise(a, 4 * P, MADV_MERGEABLE)
        ksm_start(k)
        cp("merged")
        k.sysfs["run"] = "0"
        q.exit()
        cp("exited with run=0")
        k.sysfs["run"] = "1"
        k.wait_full_scans(1)
        cp("scanned")
        p.exec()
        cp("exec'd")
        k.wait_full_scans(1)
        cp("scanned after exec")
    agree(program, "exit and exec")


def test_vma_merging_and_placement() -> None:
    """mmap placement and vma split/merge around VM_MERGEABLE (spec 1.5)."""
    def program(k: Kernel, cp: Checkpoint) -> None:
        p = k.spawn()
        a = p.mmap(8 * P)
        p.madvise(a + 3 * P, 2 * P, MADV_MERGEABLE)
        cp("middle marked")
        p.madvise(a + 5 * P, 2 * P, MADV_MERGEABLE)
        cp("extended")
        p.madvise(a, 8 * P, MADV_MERGEABLE)
        cp("all marked")
        p.madvise(a + 4 * P, P, MADV_UNMERGEABLE)
        cp("one unmarked")
        p.madvise(a, 8 * P, MADV_UNMERGEABLE)
        cp("all unmarked")
        b = p.mmap(2 * P)  # directly below a: merges with it
        c = p.mmap(2 * P, PROT_READ)  # below b, other flags
        d = p.mmap(2 * P, RW, MAP_SHARED | MAP_ANONYMOUS)
        e = p.mmap(2 * P)
        cp("more mappings")
        p.write(e, b"e")
        p.write(b, b"b")
        p.madvise(e, 2 * P, MADV_MERGEABLE)
        p.mprotect(c, 2 * P, RW)
        p.madvise(b, 2 * P, MADV_MERGEABLE)
        cp("written and marked")
        p.munmap(a + 2 * P, 2 * P)
        f = p.mmap(2 * P)  # the hole just made is the highest fitting gap
        p.mprotect(d, P, PROT_READ)
        g = p.mmap(P, RW, ANON | MAP_FIXED, addr=a + 7 * P)
        cp("hole refilled")
        p.write(f, b"f")
        p.write(g, b"g")
        p.mprotect(a, 8 * P, PROT_READ)
        cp("mprotected")
    agree(program, "vma merging and placement")


def test_fault_around_on_shmem() -> None:
    """A read fault on shared memory also maps the cached pages of its 64 KiB window."""
    def program(k: Kernel, cp: Checkpoint) -> None:
        p = k.spawn()
        room = p.mmap(64 * P)
        # Fault-around windows are aligned on absolute addresses, which differ
        # between the backends (ASLR): place the area on a 64 KiB boundary.
        base = (room + 16 * P - 1) & ~(16 * P - 1)
        p.munmap(room, 64 * P)
        s = p.mmap(40 * P, RW, MAP_SHARED | MAP_ANONYMOUS | MAP_FIXED, addr=base)
        p.write(s, b"x" * 36 * P)
        c = p.fork()
        cp("forked: the child maps nothing of the shared area")
        c.read(s + 20 * P, 1)
        cp("child read one page")
        c.read(s + 3 * P, 1, force=True)
        c.write(s + 39 * P, b"w")
        cp("child read another, wrote the last")
        p.madvise(s, 16 * P, MADV_DONTNEED)
        p.read(s + 5 * P, 1)
        cp("parent discarded and read")
    agree(program, "fault-around on shmem")


# --- smart scan and the spec's traces ---------------------------------------------------------


@pytest.mark.parametrize("smart_scan", ["1", "0"])
def test_smart_scan_pattern(smart_scan: str) -> None:
    """Spec 7 trace 1: pages A,A,B,C over 12 full scans (the skip pattern), then exit."""
    def program(k: Kernel, cp: Checkpoint) -> None:
        setup(k, smart_scan=smart_scan)
        p = k.spawn()
        a = p.mmap(4 * P)
        p.write(a, page(b"A") * 2 + page(b"B") + page(b"C"))
        p.madvise(a, 4 * P, MADV_MERGEABLE)
        k.sysfs["run"] = "1"
        for i in range(1, 13):
            k.wait_full_scans(1)
            cp(f"scan {i}")
        p.write(a + 3 * P, page(b"B"))  # a late partner for B
        for i in range(13, 25):
            k.wait_full_scans(1)
            cp(f"scan {i}")
        p.exit()
        k.wait_full_scans(1)
        cp("after exit")
        k.wait_full_scans(1)
        cp("empty list")
    agree(program, f"smart_scan={smart_scan}")


def test_trace_2_chain_and_cow() -> None:
    """Spec 7 trace 2: 300 identical pages, a write, a DONTNEED and a munmap."""
    def program(k: Kernel, cp: Checkpoint) -> None:
        setup(k, smart_scan="0")
        p = k.spawn()
        a = p.mmap(300 * P)
        p.write(a, page(b"A") * 300)
        p.madvise(a, 300 * P, MADV_MERGEABLE)
        ksm_start(k, 1)
        cp("scan 1")
        k.wait_full_scans(1)
        cp("scan 2")
        p.write(a + 7 * P, b"w")
        cp("written")
        k.wait_full_scans(1)
        cp("scan 3")
        p.madvise(a + 20 * P, P, MADV_DONTNEED)
        p.munmap(a + 299 * P, P)
        k.wait_full_scans(1)
        cp("scan 4")
    agree(program, "spec trace 2")


def test_trace_3_zero_pages() -> None:
    """Spec 7 trace 3: use_zero_pages=1 with pages 0,0,0,A,A and an untouched one."""
    def program(k: Kernel, cp: Checkpoint) -> None:
        setup(k, use_zero_pages="1")
        p = k.spawn()
        a = p.mmap(6 * P)
        p.write(a, bytes(3 * P) + page(b"A") * 2)
        p.madvise(a, 6 * P, MADV_MERGEABLE)
        k.sysfs["run"] = "1"
        for i in (1, 2, 3):
            k.wait_full_scans(1)
            cp(f"scan {i}")
        p.write(a, b"z")
        cp("zero page written")
        p.madvise(a + P, P, MADV_DONTNEED)
        cp("zero page discarded")
        c = p.fork()
        cp("forked")
        c.exit()
        cp("child killed")
        k.wait_full_scans(1)
        cp("scanned")
        k.sysfs["run"] = "2"
        cp("run=2")
    agree(program, "spec trace 3")


def test_trace_4_two_processes() -> None:
    """Spec 7 trace 4: processes with A,B,C and A,B,D share two KSM pages."""
    def program(k: Kernel, cp: Checkpoint) -> None:
        setup(k)
        for last in (b"C", b"D"):
            p = k.spawn()
            a = p.mmap(3 * P)
            p.write(a, page(b"A") + page(b"B") + page(last))
            p.madvise(a, 3 * P, MADV_MERGEABLE)
        k.sysfs["run"] = "1"
        k.wait_full_scans(1)
        cp("scan 1")
        k.wait_full_scans(1)
        cp("scan 2")
    agree(program, "spec trace 4")


# --- random programs --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(100))
def test_random_program(seed: int) -> None:
    """A seeded random program of mmaps, writes, advice, forks, exits and scans agrees."""
    program = random_program(seed)
    report = differential(program)
    if not report.ok:
        pytest.fail(f"{program}\n\n{report}", pytrace=False)


@pytest.mark.parametrize("seed", range(30))
def test_random_program_merge_any(seed: int) -> None:
    """The same under prctl merge-any (inherited by forks): global counters and ksm_stat too."""
    program = random_program(seed, merge_any=True)
    report = differential(program)
    if not report.ok:
        pytest.fail(f"{program}\n\n{report}", pytrace=False)


@pytest.mark.parametrize("seed", range(60))
def test_random_program_bulk_engine(seed: int) -> None:
    """The same random programs, limited to what the bulk engine models, on the bulk engine
    against the real kernel: calls, counters (cow_ksm included), ksm_stat and layouts."""
    program = random_program(seed, engine="bulk")
    report = differential(program, engine="bulk")
    if not report.ok:
        pytest.fail(f"{program}\n\n{report}", pytrace=False)
    assert report.kernel.detail and not report.model.detail


@pytest.mark.parametrize("seed", range(20))
def test_random_program_bulk_engine_merge_any(seed: int) -> None:
    """The same under prctl merge-any on the bulk engine: global counters and ksm_stat too."""
    program = random_program(seed, engine="bulk", merge_any=True)
    report = differential(program, engine="bulk")
    if not report.ok:
        pytest.fail(f"{program}\n\n{report}", pytrace=False)


# --- the runner itself ---------------------------------------------------------------------------


def test_overshoot_is_detected() -> None:
    """Without a sleep between batches ksmd outruns the driver: QuiescenceError, not a bad record."""
    def program(k: Kernel, cp: Checkpoint) -> None:
        setup(k)
        p = k.spawn()
        a = p.mmap(4 * P)
        p.write(a, page(b"A") * 4)
        p.madvise(a, 4 * P, MADV_MERGEABLE)
        k.sysfs["run"] = "1"
        for _ in range(5):
            k.wait_full_scans(1)

    with pytest.raises(QuiescenceError):
        run_on_kernel(program, gap_ms=0)


def test_report_lists_each_difference() -> None:
    """compare() reports field by field, and the report says so in words."""
    def one(k: Kernel, cp: Checkpoint) -> None:
        setup(k)
        p = k.spawn()
        a = p.mmap(2 * P)
        p.write(a, page(b"A") * 2)
        p.madvise(a, 2 * P, MADV_MERGEABLE)
        ksm_start(k)
        cp("merged")

    def two(k: Kernel, cp: Checkpoint) -> None:
        setup(k)
        p = k.spawn()
        a = p.mmap(2 * P)
        p.write(a, page(b"A") + page(b"B"))
        p.madvise(a, 2 * P, MADV_MERGEABLE)
        ksm_start(k)
        cp("merged")

    report = compare(run_on_model(one), run_on_model(two), "one vs two")
    assert not report.ok
    fields = {d.what for d in report.differences}
    assert {"pages_shared", "pages_sharing", "P0.ksm_stat.ksm_merging_pages"} <= fields
    assert "one vs two:" in str(report)
    assert "pages_sharing: model 1, kernel 0" in str(report)
