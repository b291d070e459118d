# SPDX-License-Identifier: GPL-2.0-only
"""ksmlab estimate: a fork child's view of its parent's THP loads PMD-mapped on both engines.

On the host, fork copies the parent's PMD: the child maps the parent's THP
by one PMD too, until a write splits the writer's PMD (docs/kernel-behaviour.md
3.13, rule 4), and ksmd reaches such pages under the PMD (no ``pte_page``
cost).  The loader (ksmlab.estimate.load, module doc) maps a child's extent
by PMD when all 512 of its pages map, in order, the frames of one extent of
another process that loads as a THP; any other extent of shared pages stays
mapped by PTE.  Expected counts follow from those rules and from ksmd's
counting (``pages``: every page the walk scans, here every loaded page per
full scan with ``smart_scan`` off; ``pte_pages``: those not under a PMD of
the scanned mm mapping their THP; ``thp_splits``: THPs a merge attempt split).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from estimate_snapshots import HOST_KNOBS, Page, Pfns, Proc, check, work, write_snapshot
from ksmlab.bulk import BulkKernel
from ksmlab.bulk.thp import THP_PMD
from ksmlab.estimate import load_plan, run_estimate
from ksmlab.estimate.load import EngineName, Machine, load_machine
from ksmlab.kernel import SimKernel, SimProcess
from ksmlab.snapshot import read_snapshot

HP = 512  # pages of a THP
EXTENT = HP * 4096
S = 1_000_000_000
KNOBS = {"pages_to_scan": "100000", "sleep_millisecs": "0", "smart_scan": "0"}
ENGINES: tuple[EngineName, ...] = ("sim", "bulk")


def snapshot(tmp: Path, child: str) -> Path:
    """A parent P (pid 10) with two THPs, E0 (tags 0-511) and E1 (tags 1000-1511), and a
    fork child C (pid 11) of 1024 pages at the same addresses, whose second extent is:

    * ``"whole"``: E1's 512 frames (fork kept the PMD; all THP-flagged);
    * ``"cow"``: E1's frames but page 7, a page of C's own (tag 9000, a COW copy: a small
      page, not THP-flagged): the extent is not wholly flagged, so not PMD-mapped;
    * ``"shifted"``: E0's pages 1-511 then E1's page 0 (a 2 MiB extent over two THPs, as
      a 4 KiB-offset mremap of PTE-mapped THPs leaves it; all flagged): not one THP in order;
    * ``"parent-partial"``: E1's frames, all flagged in C, but P's page 1023 of E1 is not
      flagged, so P's E1 is not a THP in the model (a THP mapped by PTEs).

    C's first extent is always E0's 512 frames, all flagged.
    """
    pfn = Pfns()
    e0 = [Page(t, pfn(), thp=True) for t in range(HP)]
    e1 = [Page(1000 + t, pfn(), thp=True) for t in range(HP)]
    c0 = [Page(x.tag, x.pfn, thp=True) for x in e0]
    c1 = [Page(x.tag, x.pfn, thp=True) for x in e1]
    if child == "cow":
        c1[7] = Page(9000, pfn())
    elif child == "shifted":
        c1 = [Page(x.tag, x.pfn, thp=True) for x in e0[1:] + e1[:1]]
    elif child == "parent-partial":
        e1[-1] = Page(e1[-1].tag, e1[-1].pfn)
    return write_snapshot(tmp / f"{child}.parquet", [Proc(10, e0 + e1), Proc(11, c0 + c1)],
                          knobs=HOST_KNOBS | {"pages_to_scan": "5000", "sleep_millisecs": "0"})


def load(tmp: Path, child: str, engine: EngineName) -> Machine:
    m = load_machine(load_plan(read_snapshot(snapshot(tmp, child))), engine, KNOBS)
    check(m)
    return m


def pmd_extents(m: Machine, proc: int) -> list[int]:
    """The model addresses of the extents process *proc* (0: P, 1: C) maps by PMD."""
    k, p = m.kernel, m.procs[proc]
    if isinstance(k, SimKernel):
        assert isinstance(p, SimProcess)
        return sorted(e * 4096 for e in p.mm.pmds)
    assert isinstance(k, BulkKernel) and m.engine_row is not None
    sel = np.flatnonzero(m.proc_of == proc)
    rows = m.engine_row[sel]
    frames = k.ksm.pages.frame[rows].astype(np.int64)
    pmd = ((k.ksm.pages.thp[rows] & THP_PMD) != 0) & (k.ksm.frames.thp[frames] >= 0)
    return sorted({int(a) & ~(EXTENT - 1) for a in m.addr[sel][pmd]})


def brief(w: list[dict[str, int]]) -> list[tuple[int, int, int]]:
    return [(x["pages"], x["pte_pages"], x["thp_splits"]) for x in w]


@pytest.mark.parametrize("engine", ENGINES)
def test_child_maps_both_thps_by_pmd(tmp_path: Path, engine: EngineName) -> None:
    """C's two extents map P's two THPs by PMD, on 2 MiB boundaries of C's mapping.  Each
    full scan walks 2 * 1024 pages, none under a PTE.  Nothing merges: P's contents are
    unique, and C's pages are P's frames (ksmd never merges a page with itself), so no
    merge attempt splits a THP (scan 1 only checksums; scan 2 inserts P's pages in the
    unstable tree, which splits nothing, and finds each of C's pages is that same page)."""
    m = load(tmp_path, "whole", engine)
    c = np.flatnonzero(m.proc_of == 1)
    assert pmd_extents(m, 1) == [int(m.addr[c[0]]), int(m.addr[c[HP]])]
    assert int(m.addr[c[0]]) % EXTENT == 0 and int(m.addr[c[HP]]) % EXTENT == 0
    assert len(pmd_extents(m, 0)) == 2
    assert brief(work(m, 2)) == [(2 * 2 * HP, 0, 0)] * 2


@pytest.mark.parametrize("engine", ENGINES)
def test_child_write_splits_only_its_own_pmd(tmp_path: Path, engine: EngineName) -> None:
    """Rule 4 at the child's addresses: C rewrites page 7 of its second extent, a page of
    P's THP E1 that P maps too: C's PMD of E1 is split (its other 511 pages stay, by PTE),
    the page gets a copy of its own, P keeps both PMDs.  The next full scan walks the same
    2048 pages; the 512 of C's second extent under PTEs."""
    m = load(tmp_path, "whole", engine)
    c = np.flatnonzero(m.proc_of == 1)
    assert brief(work(m, 1)) == [(2 * 2 * HP, 0, 0)]
    m.rewrite(np.array([c[HP + 7]], np.int64))
    check(m)
    assert pmd_extents(m, 1) == [int(m.addr[c[0]])]
    assert len(pmd_extents(m, 0)) == 2
    assert brief(work(m, 1)) == [(2 * 2 * HP, HP, 0)]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("child", ["cow", "shifted", "parent-partial"])
def test_other_shared_extents_stay_mapped_by_pte(tmp_path: Path, engine: EngineName,
                                                 child: str) -> None:
    """C's first extent maps E0 by PMD in every case; its second extent is reached by PTE,
    512 pages per full scan:

    * cow: 511 of P's frames by PTE plus C's own small page (the extent is not wholly
      THP-flagged, so not taken as PMD-mapped);
    * shifted: 512 shared frames of two THPs (not one THP in order);
    * parent-partial: E1 is 512 small pages in P (P's 512 pages by PTE too: 1024 in all).

    Nothing merges (unique contents, C's shared pages are P's own), so nothing splits."""
    m = load(tmp_path, child, engine)
    c = np.flatnonzero(m.proc_of == 1)
    assert pmd_extents(m, 1) == [int(m.addr[c[0]])]
    pte = 2 * HP if child == "parent-partial" else HP
    assert len(pmd_extents(m, 0)) == (1 if child == "parent-partial" else 2)
    assert brief(work(m, 2)) == [(2 * 2 * HP, pte, 0)] * 2


def merging_snapshot(tmp: Path) -> Path:
    """P and C as in ``"whole"``, and an unrelated process B (pid 12) with one small page
    of tag 5 (P's E0 page 5)."""
    pfn = Pfns()
    e0 = [Page(t, pfn(), thp=True) for t in range(HP)]
    e1 = [Page(1000 + t, pfn(), thp=True) for t in range(HP)]
    c = [Page(x.tag, x.pfn, thp=True) for x in e0 + e1]
    return write_snapshot(tmp / "merging.parquet",
                          [Proc(10, e0 + e1), Proc(11, c), Proc(12, [Page(5, pfn())])],
                          knobs=HOST_KNOBS | {"pages_to_scan": "5000", "sleep_millisecs": "0"})


@pytest.mark.parametrize("engine", ENGINES)
def test_merge_splits_the_thp_for_parent_and_child(tmp_path: Path, engine: EngineName) -> None:
    """B's page 5 merges with P's E0 page 5 (the unstable tree's; P comes first in scan
    order): the merge attempt splits E0 (1 split), which takes P's PMD and C's (rule 3:
    every mm that PMD-mapped it).  Scan 1 checksums only: 2049 pages, B's under a PTE.
    Scan 2: P's 1024 pages are reached before the split (under PMDs, inserted unstable),
    C's 1024 pages (its own pages are P's: nothing), B's page merges and splits E0
    after all of them: pte_pages 1 (B).  Scan 3: E0 is small pages in P and C: 1024
    under PTEs, and B's: 1025; E1 stays a THP mapped by both."""
    m = load_machine(load_plan(read_snapshot(merging_snapshot(tmp_path))), engine, KNOBS)
    check(m)
    assert brief(work(m, 3)) == [(4 * HP + 1, 1, 0), (4 * HP + 1, 1, 1),
                                 (4 * HP + 1, 2 * HP + 1, 0)]
    c = np.flatnonzero(m.proc_of == 1)
    assert pmd_extents(m, 1) == [int(m.addr[c[HP]])]
    assert len(pmd_extents(m, 0)) == 1


@pytest.mark.parametrize("child", ["whole", "cow"])
def test_both_engines_count_the_same_work(tmp_path: Path, child: str) -> None:
    sim, bulk = (load(tmp_path, child, e) for e in ENGINES)
    assert work(sim, 3) == work(bulk, 3)


def test_both_engines_give_the_same_timeline(tmp_path: Path) -> None:
    snap = read_snapshot(merging_snapshot(tmp_path))
    sim = run_estimate(snap, engine="sim", until_ns=2 * S)
    bulk = run_estimate(snap, engine="bulk", until_ns=2 * S)
    assert sim.result.timeline == bulk.result.timeline
