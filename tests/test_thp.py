"""Transparent huge pages in SimKernel's mm and as KSM meets them (docs/kernel-behaviour.md
3.13, "Transparent huge pages").

Expected values come from the rules measured on Linux 6.18 (host THP mode ``madvise``)
and from arithmetic stated next to each check; the ``linux`` tests run the same
program on the real kernel and on SimKernel and compare.
"""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ksmlab import MADV_MERGEABLE, PAGE_SIZE, SimKernel
from ksmlab.api import Kernel, Process
from ksmlab.calibrate.workloads import Workload, build, teardown, thp_shortfall, workloads
from ksmlab.constants import (
    MADV_DONTNEED,
    MADV_HUGEPAGE,
    MADV_NOHUGEPAGE,
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_PRIVATE,
    PROT_READ,
    PROT_WRITE,
)
from ksmlab.invariants import check_invariants

HPAGE = 512 * PAGE_SIZE
"""2 MiB: one PMD."""
ZERO_KNOBS = {"pages_to_scan": "2000", "sleep_millisecs": "200", "smart_scan": "0",
              "use_zero_pages": "0", "max_page_sharing": "256"}
"""One batch per full scan of the programs here, and 200 ms between them: time for the
real kernel's figures to be read after a scan before the next one starts."""


def anon_huge(p: Process, a: int, length: int) -> int:
    """smaps AnonHugePages (bytes) of the vmas meeting [a, a + length)."""
    return sum(e.anon_huge for e in p.smaps() if e.start < a + length and e.end > a)


def rss(p: Process, a: int, length: int) -> int:
    """smaps Rss (bytes) of the vmas meeting [a, a + length)."""
    return sum(e.rss for e in p.smaps() if e.start < a + length and e.end > a)


def huge_map(p: Process, length: int) -> int:
    """An anonymous mapping of *length* (a multiple of 2 MiB), madvised MADV_HUGEPAGE."""
    a = p.mmap(length)
    assert a % HPAGE == 0  # 6.18 places such a mapping on a 2 MiB boundary (measured)
    p.madvise(a, length, MADV_HUGEPAGE)
    return a


def work(k: Any) -> dict[str, int]:
    return dict(k.ksmd.meter.total.as_dict())


# --- placement -----------------------------------------------------------------------------

def test_anonymous_mappings_of_whole_2mib_are_2mib_aligned() -> None:
    """Measured on 6.18 (top-down from an aligned base): 1 MiB right below the base; then
    2 MiB needs a gap of 4 MiB and goes to align_down(top - 2 MiB); 3 MiB is not a
    multiple, so it sits right below; 4 MiB goes to align_down(that - 4 MiB)."""
    k = SimKernel()
    p = k.spawn()
    mib = 1 << 20
    a1 = p.mmap(mib)
    assert a1 == p.mm.mmap_base - mib  # type: ignore[attr-defined]
    a2 = p.mmap(2 * mib)
    assert a2 == (a1 - 2 * mib) & ~(HPAGE - 1) == a1 - 3 * mib
    a3 = p.mmap(3 * mib)
    assert a3 == a2 - 3 * mib and a3 % HPAGE
    a4 = p.mmap(4 * mib)
    assert a4 == (a3 - 4 * mib) & ~(HPAGE - 1)
    # A hint, or MAP_FIXED, is taken as it is.
    fixed = a4 - 16 * mib + 4096
    assert p.mmap(2 * mib, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED,
                  addr=fixed) == fixed


# --- rule 2: the fault ------------------------------------------------------------------------

def test_first_write_in_a_hugepage_extent_makes_512_pages_resident() -> None:
    k = SimKernel()
    p = k.spawn()
    a = huge_map(p, 2 * HPAGE)
    before = k.phys.nr_frames
    p.write(a + 5 * PAGE_SIZE, b"x")
    assert k.phys.nr_frames - before == 512
    assert rss(p, a, 2 * HPAGE) == HPAGE and anon_huge(p, a, 2 * HPAGE) == HPAGE
    assert p.read(a + 5 * PAGE_SIZE, 1) == b"x" and p.read(a, 4) == bytes(4)
    # The other pages of the extent are present (no fault); the next extent is not.
    pf = p.pfns(a, 2 * HPAGE)
    assert all(x is not None for x in pf[:512]) and all(x is None for x in pf[512:])
    # A second write in the extent allocates nothing.
    p.write(a + 7 * PAGE_SIZE, b"y")
    assert k.phys.nr_frames - before == 512


def test_no_thp_without_madvise_or_with_nohugepage() -> None:
    k = SimKernel()
    p = k.spawn()
    a = p.mmap(HPAGE)
    p.write(a, b"x")
    assert rss(p, a, HPAGE) == PAGE_SIZE and anon_huge(p, a, HPAGE) == 0
    b = huge_map(p, HPAGE)
    p.madvise(b, HPAGE, MADV_NOHUGEPAGE)  # clears VM_HUGEPAGE
    p.write(b, b"x")
    assert rss(p, b, HPAGE) == PAGE_SIZE and anon_huge(p, b, HPAGE) == 0


def test_extent_crossing_the_vma_gets_small_pages() -> None:
    """3 MiB, unaligned (1 MiB past a boundary): the extent holding its first page crosses
    the vma start (4 KiB page); the last 2 MiB are a whole extent inside (a THP). Measured
    the same on 6.18 (Rss +4 kB, then AnonHugePages +2048 kB)."""
    k = SimKernel()
    p = k.spawn()
    length = 3 << 20
    a = p.mmap(length)
    assert a % HPAGE == 1 << 20
    p.madvise(a, length, MADV_HUGEPAGE)
    p.write(a, b"x")
    assert rss(p, a, length) == PAGE_SIZE and anon_huge(p, a, length) == 0
    p.write(a + length - 1, b"y")
    assert rss(p, a, length) == PAGE_SIZE + HPAGE and anon_huge(p, a, length) == HPAGE


def test_a_page_already_present_blocks_the_thp_but_a_read_does_not() -> None:
    k = SimKernel()
    p = k.spawn()
    a = p.mmap(2 * HPAGE)
    p.write(a, b"x")  # a 4 KiB page before MADV_HUGEPAGE
    p.read(a + HPAGE, 1)  # the zero page (the kernel's huge zero page) in the second extent
    p.madvise(a, 2 * HPAGE, MADV_HUGEPAGE)
    p.write(a + PAGE_SIZE, b"x")
    assert anon_huge(p, a, HPAGE) == 0
    p.write(a + HPAGE + PAGE_SIZE, b"x")  # measured: a write after a read still gets a THP
    assert anon_huge(p, a, 2 * HPAGE) == HPAGE
    assert rss(p, a, 2 * HPAGE) == 2 * PAGE_SIZE + HPAGE


def test_thp_falls_back_to_a_small_page_when_memory_is_short() -> None:
    k = SimKernel(max_frames=100)
    p = k.spawn()
    a = huge_map(p, HPAGE)
    p.write(a, b"x")
    assert rss(p, a, HPAGE) == PAGE_SIZE and anon_huge(p, a, HPAGE) == 0


# --- rule 4: COW of a fork-shared THP ------------------------------------------------------

def test_cow_splits_the_writers_pmd_only() -> None:
    """Measured on 6.18: the child's write drops its AnonHugePages by 2 MiB (its page is a
    new 4 KiB page, its other 511 stay the parent's frames); the parent keeps its PMD."""
    k = SimKernel()
    parent = k.spawn()
    a = huge_map(parent, HPAGE)
    parent.write(a, b"p" * HPAGE)
    child = parent.fork()
    assert anon_huge(child, a, HPAGE) == HPAGE and anon_huge(parent, a, HPAGE) == HPAGE
    frames = k.phys.nr_frames
    child.write(a + PAGE_SIZE, b"c")
    assert anon_huge(child, a, HPAGE) == 0 and anon_huge(parent, a, HPAGE) == HPAGE
    assert k.phys.nr_frames == frames + 1
    pc, pp = child.pfns(a, HPAGE), parent.pfns(a, HPAGE)
    assert pc[1] != pp[1] and pc[0] == pp[0] and pc[2:] == pp[2:]
    # The parent writes while the child still maps 511 of its pages: its PMD is split too.
    parent.write(a + 3 * PAGE_SIZE, b"q")
    assert anon_huge(parent, a, HPAGE) == 0
    check_invariants(k)


def test_write_by_the_only_mapper_keeps_the_pmd() -> None:
    k = SimKernel()
    parent = k.spawn()
    a = huge_map(parent, HPAGE)
    parent.write(a, b"p")
    child = parent.fork()
    child.exit()
    parent.write(a + 8 * PAGE_SIZE, b"q")
    assert anon_huge(parent, a, HPAGE) == HPAGE


# --- rules 5 and 6: vma changes -----------------------------------------------------------------

def test_munmap_of_one_page_inside_splits_and_keeps_the_rest() -> None:
    k = SimKernel()
    p = k.spawn()
    a = huge_map(p, 2 * HPAGE)
    p.write(a, b"x" * 2 * HPAGE)
    p.munmap(a + HPAGE + 4 * PAGE_SIZE, PAGE_SIZE)
    assert anon_huge(p, a, 2 * HPAGE) == HPAGE  # the first extent stays PMD-mapped
    assert rss(p, a, 2 * HPAGE) == 2 * HPAGE - PAGE_SIZE
    check_invariants(k)


def test_dontneed_inside_an_extent_splits() -> None:
    k = SimKernel()
    p = k.spawn()
    a = huge_map(p, HPAGE)
    p.write(a, b"x")
    p.madvise(a + 3 * PAGE_SIZE, PAGE_SIZE, MADV_DONTNEED)
    assert anon_huge(p, a, HPAGE) == 0 and rss(p, a, HPAGE) == HPAGE - PAGE_SIZE


def test_vma_split_inside_an_extent_splits_at_a_boundary_does_not() -> None:
    k = SimKernel()
    p = k.spawn()
    a = huge_map(p, 2 * HPAGE)
    p.write(a, b"x" * 2 * HPAGE)
    p.madvise(a + HPAGE, PAGE_SIZE * 16, MADV_MERGEABLE)  # cuts the 2nd extent at +16 pages
    assert anon_huge(p, a, 2 * HPAGE) == HPAGE
    p.mprotect(a, HPAGE, PROT_READ)  # boundary at the extent's edge: nothing split
    assert anon_huge(p, a, 2 * HPAGE) == HPAGE
    check_invariants(k)


def test_whole_unmap_frees_the_thp() -> None:
    k = SimKernel()
    p = k.spawn()
    before = k.phys.nr_frames
    a = huge_map(p, HPAGE)
    p.write(a, b"x")
    p.munmap(a, HPAGE)
    assert k.phys.nr_frames == before and not p.mm.pmds  # type: ignore[attr-defined]


# --- rule 3 and the cost counts --------------------------------------------------------------

def merge_program(k: Kernel) -> Iterator[tuple[Process, int, dict[str, str]]]:
    """8 MiB madvised MADV_HUGEPAGE: 4 MiB of identical pages (2 THPs), 2 MiB of unique
    pages (a THP), 2 MiB never touched; then MERGEABLE and full scans.  Yields after the
    fill and after each of 3 full scans."""
    for name, value in ZERO_KNOBS.items():
        k.sysfs[name] = value
    p = k.spawn()
    a = huge_map(p, 4 * HPAGE)
    p.write(a, b"\x07" * 2 * HPAGE)
    p.write(a + 2 * HPAGE, b"".join((i + 100).to_bytes(8, "little") * 512 for i in range(512)))
    counters = ("pages_shared", "pages_sharing", "pages_unshared")
    yield p, a, {n: k.sysfs[n] for n in counters}
    p.madvise(a, 4 * HPAGE, MADV_MERGEABLE)
    base = int(k.sysfs["full_scans"])
    k.sysfs["run"] = "1"  # the real ksmd may finish scan 1 before we look: count from base
    for i in range(1, 4):
        owed = base + i - int(k.sysfs["full_scans"])
        if owed > 0:
            k.wait_full_scans(owed)
        yield p, a, {n: k.sysfs[n] for n in counters}
    k.sysfs["run"] = "2"
    p.exit()


MEASURED = [  # (AnonHugePages kB, pages_shared, pages_sharing, pages_unshared), Linux 6.18
    (6144, 0, 0, 0), (6144, 0, 0, 0), (2048, 4, 1019, 512), (2048, 4, 1020, 512)]
"""The real kernel on :func:`merge_program` (docs/kernel-behaviour.md 3.13): scan 1 only checksums;
scan 2 splits both identical THPs and merges all but one page (page 1 of the first THP
matched page 0 of the same THP: no merge until scan 3); the unique THP is never split."""


def test_merge_splits_thps_as_measured() -> None:
    k = SimKernel()
    got = []
    for p, a, c in merge_program(k):
        got.append((anon_huge(p, a, 4 * HPAGE) // 1024, int(c["pages_shared"]),
                    int(c["pages_sharing"]), int(c["pages_unshared"])))
        check_invariants(k)
    assert got == MEASURED


def test_pte_pages_and_thp_splits_count_as_the_spec_says() -> None:
    """1536 pages scanned per full scan.  Scan 1: every page under a PMD (pte_pages 0).
    Scan 2: the first THP splits at its page 1 (pages 0 and 1 were reached under the PMD,
    510 after), the second at its page 0 (511 after): pte_pages 1021, thp_splits 2; the
    unique THP stays under its PMD.  Scan 3: the 1024 split pages, pte_pages 1024."""
    k = SimKernel()
    seen = []
    prev = work(k)
    for _ in merge_program(k):
        now = work(k)
        seen.append((now["pages"] - prev["pages"], now["pte_pages"] - prev["pte_pages"],
                     now["thp_splits"] - prev["thp_splits"]))
        prev = now
    assert seen == [(0, 0, 0), (1536, 0, 0), (1536, 1021, 2), (1536, 1024, 0)]


def test_merge_across_processes_splits_both_thps() -> None:
    """Two processes, one THP each, identical content: the first page of process 2 meets
    page 0 of process 1 in the unstable tree (different THPs): both split, they merge."""
    k = SimKernel()
    for name, value in ZERO_KNOBS.items():
        k.sysfs[name] = value
    procs = []
    for _ in range(2):
        p = k.spawn()
        a = huge_map(p, HPAGE)
        p.write(a, b"s" * PAGE_SIZE + b"".join(i.to_bytes(8, "little") * 512
                                               for i in range(1000, 1511)))
        p.madvise(a, HPAGE, MADV_MERGEABLE)
        procs.append((p, a))
    k.sysfs["run"] = "1"
    k.wait_full_scans(2)
    assert work(k)["thp_splits"] == 2
    assert [anon_huge(p, a, HPAGE) for p, a in procs] == [0, 0]
    # 512 pairs of identical pages, each one KSM page shared by the two.
    assert (k.sysfs["pages_shared"], k.sysfs["pages_sharing"]) == ("512", "512")
    check_invariants(k)


def test_zero_page_merge_splits_the_thp() -> None:
    k = SimKernel()
    for name, value in {**ZERO_KNOBS, "use_zero_pages": "1"}.items():
        k.sysfs[name] = value
    p = k.spawn()
    a = huge_map(p, HPAGE)
    p.write(a, b"\0")
    p.madvise(a, HPAGE, MADV_MERGEABLE)
    k.sysfs["run"] = "1"
    k.wait_full_scans(2)
    assert work(k)["thp_splits"] == 1 and anon_huge(p, a, HPAGE) == 0
    assert k.sysfs["ksm_zero_pages"] == "512"
    check_invariants(k)


# --- calibration workloads ---------------------------------------------------------------------

def test_thp_workloads_on_simkernel() -> None:
    """The two THP calibration workloads at 1024 pages (2 THPs), smart_scan 0 for the
    unique one, run on SimKernel scan by scan: unique pages are walked under their PMDs
    and never split; identical ones split at their first merge (scan 2)."""
    ws = {w.name: w for w in workloads(1024) if w.thp}
    assert set(ws) == {"THP: unique, smart_scan 0", "THP: identical"}
    for name, want in (("THP: unique, smart_scan 0", [(1024, 0, 0)] * 3),
                       ("THP: identical", [(1024, 0, 0), (1024, 1021, 2), (1024, 1024, 0)])):
        w = ws[name]
        assert w.pages == 1024
        k = SimKernel()
        maps = build(k, w)
        assert thp_shortfall(w, maps) == ""
        seen = []
        k.sysfs["run"] = "1"
        for _ in range(3):
            before = work(k)
            k.wait_full_scans(1)
            now = work(k)
            seen.append(tuple(now[f] - before[f] for f in ("pages", "pte_pages", "thp_splits")))
        assert seen == want, name
        teardown(maps)


def test_thp_shortfall_names_the_missing_huge_pages() -> None:
    w = Workload("x", 1, 512, lambda p, i, s: 1, 1, thp=True)
    k = SimKernel()
    p = k.spawn()
    a = p.mmap(HPAGE)
    p.write(a, b"x")  # no MADV_HUGEPAGE: small pages
    assert thp_shortfall(w, [(p, a)]) == ("process 0 got 0 kB of transparent huge pages of "
                                          "2048 kB (memory too fragmented?)")
    with pytest.raises(ValueError, match="multiple of 512, got 100"):
        Workload("y", 1, 100, lambda p, i, s: 1, 1, thp=True)


# --- the real kernel, side by side --------------------------------------------------------------

def _skip_unless_thp_linux() -> None:
    from linux_support import skip_unless_ksm_usable

    skip_unless_ksm_usable()
    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not mode.exists() or "[never]" in mode.read_text():
        pytest.skip("transparent huge pages are not enabled on this host")


@pytest.mark.linux
def test_linux_merge_of_thps_matches_simkernel() -> None:
    _skip_unless_thp_linux()
    from linux_support import session_at_boot_knobs

    sim = [(anon_huge(p, a, 4 * HPAGE), rss(p, a, 4 * HPAGE), c)
           for p, a, c in merge_program(SimKernel())]
    with session_at_boot_knobs() as k:
        real = []
        for p, a, c in merge_program(k):
            if not real and anon_huge(p, a, 4 * HPAGE) < 3 * HPAGE:
                pytest.skip("the host gave no transparent huge pages (fragmented memory?)")
            real.append((anon_huge(p, a, 4 * HPAGE), rss(p, a, 4 * HPAGE), c))
    assert real == sim


@pytest.mark.linux
def test_linux_cow_of_a_thp_matches_simkernel() -> None:
    _skip_unless_thp_linux()
    from linux_support import session_at_boot_knobs

    def program(k: Kernel) -> list[int]:
        parent = k.spawn()
        a = huge_map(parent, HPAGE)
        parent.write(a, b"p" * PAGE_SIZE)
        child = parent.fork()
        out = [anon_huge(parent, a, HPAGE), anon_huge(child, a, HPAGE)]
        child.write(a + PAGE_SIZE, b"c")
        out += [anon_huge(parent, a, HPAGE), anon_huge(child, a, HPAGE), rss(child, a, HPAGE)]
        child.exit()
        parent.write(a + 2 * PAGE_SIZE, b"q")
        out.append(anon_huge(parent, a, HPAGE))
        parent.munmap(a + 5 * PAGE_SIZE, PAGE_SIZE)
        out += [anon_huge(parent, a, HPAGE), rss(parent, a, HPAGE)]
        parent.exit()
        return out

    sim = program(SimKernel())
    assert sim == [HPAGE, HPAGE, HPAGE, 0, HPAGE, HPAGE, 0, HPAGE - PAGE_SIZE]
    with session_at_boot_knobs() as k:
        real = program(k)
    if real[0] == 0:
        pytest.skip("the host gave no transparent huge page (fragmented memory?)")
    assert real == sim


def test_a_write_that_cannot_fit_changes_nothing() -> None:
    """A fault takes a THP only if its 512 frames fit, else a small page, and a write whose
    faults would run out is refused whole.  max_frames 600: a write reaching into two
    extents takes a THP, then a small page (513 frames).  max_frames 513: into three
    extents, 512 + 1 + 1 = 514 frames: ENOMEM, and nothing is written."""
    k = SimKernel(max_frames=600)
    p = k.spawn()
    a = huge_map(p, 3 * HPAGE)
    p.write(a, b"x" * PAGE_SIZE + bytes(HPAGE - PAGE_SIZE) + b"x" * PAGE_SIZE)
    assert k.phys.nr_frames == 513 and anon_huge(p, a, 3 * HPAGE) == HPAGE
    k2 = SimKernel(max_frames=513)
    p2 = k2.spawn()
    b = huge_map(p2, 3 * HPAGE)
    with pytest.raises(OSError) as err:
        p2.write(b, (b"y" * PAGE_SIZE + bytes(HPAGE - PAGE_SIZE)) * 2 + b"y" * PAGE_SIZE)
    assert err.value.errno == errno.ENOMEM and k2.phys.nr_frames == 0  # nothing written


@pytest.mark.linux
def test_linux_thp_workload_gets_huge_pages() -> None:
    """build() of a THP calibration workload on the real kernel: the helper's mapping is
    2 MiB-aligned and made of THPs (what run_real checks before keeping its samples)."""
    _skip_unless_thp_linux()
    from linux_support import session_at_boot_knobs

    w = next(w for w in workloads(1024) if w.name == "THP: unique, smart_scan 0")
    with session_at_boot_knobs() as k:
        maps = build(k, w)
        try:
            # The helper allows THP where advised: PR_GET_THP_DISABLE (42) reads 3 on 6.18
            # (disabled except advised, measured), 0 on an older kernel after MADV_HUGEPAGE.
            assert maps[0][0].prctl(42) in (0, 3)
            why = thp_shortfall(w, maps)
            if "fragmented" in why:
                pytest.skip(f"the host gave no transparent huge pages: {why}")
            assert why == ""
            (p, a), = maps
            assert anon_huge(p, a, 1024 * PAGE_SIZE) == 2 * HPAGE
        finally:
            teardown(maps)


FUZZ_PROGRAMS = int(os.environ.get("KSMLAB_FUZZ_EXAMPLES", "50")) // 5 or 1
"""Random THP programs run by :func:`test_random_thp_programs_keep_the_invariants` (a
fifth of the fuzz budget: each program is 60 steps over 4 MiB areas)."""


@pytest.mark.parametrize("seed", range(FUZZ_PROGRAMS))
def test_random_thp_programs_keep_the_invariants(seed: int) -> None:
    """Writes, reads, forks, exits, munmap, mprotect, MADV_DONTNEED/MERGEABLE/(NO)HUGEPAGE
    on parts of 2 MiB-aligned MADV_HUGEPAGE areas, and ksmd scans: the model's
    consistency checks (THP ones included) hold after every step."""
    rng = random.Random(seed)
    k = SimKernel()
    for name, value in {**ZERO_KNOBS, "use_zero_pages": str(seed % 2)}.items():
        k.sysfs[name] = value
    k.sysfs["run"] = "1"
    first = k.spawn()
    procs = [(first, huge_map(first, 2 * HPAGE))]
    for _ in range(60):
        i = rng.randrange(len(procs))
        p, a = procs[i]
        off = rng.randrange(1024) * PAGE_SIZE
        n = rng.randint(1, 1024 - off // PAGE_SIZE) * PAGE_SIZE
        roll = rng.random()
        try:
            if roll < 0.35:
                p.write(a + off, bytes([rng.randrange(3)]) * PAGE_SIZE)
            elif roll < 0.4:
                p.read(a + off, 1)
            elif roll < 0.5 and len(procs) < 4:
                procs.append((p.fork(), a))
            elif roll < 0.55 and len(procs) > 1:
                p.exit()
                procs.pop(i)
            elif roll < 0.6:
                p.munmap(a + off, PAGE_SIZE)
            elif roll < 0.65:
                p.mprotect(a + off, n, rng.choice((PROT_READ, PROT_READ | PROT_WRITE)))
            elif roll < 0.8:
                p.madvise(a + off, n, rng.choice((MADV_DONTNEED, MADV_MERGEABLE, MADV_HUGEPAGE,
                                                  MADV_NOHUGEPAGE, MADV_MERGEABLE)))
            else:
                k.advance(250)  # about one batch (sleep_millisecs 200)
        except OSError as err:  # a page unmapped or made read-only: EFAULT, ENOMEM
            assert err.errno in (errno.EFAULT, errno.ENOMEM), err
        check_invariants(k)
