"""Streaming set-up: mappings filled a chunk at a time, as bytes, fingerprints or content ids.

Expected values: the bytes the content model defines (ContentSource.build, itself
checked in tests/test_scenario_run.py) and arithmetic on page counts.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from ksmlab.bulk.content import NEW_CONTENT, ContentTable
from ksmlab.constants import PAGE_SIZE
from ksmlab.mm.page import fingerprint
from ksmlab.scenario.backends import BulkBackend, SimBackend
from ksmlab.scenario.content import OWN, ContentSource, Fill
from ksmlab.scenario.loader import parse_scenario
from ksmlab.scenario.model import Content
from ksmlab.scenario.runner import ProgressInfo, run_scenario

CONTENTS = [
    Content("z", "zero", seed=1, private_fraction=0.2),
    Content("r", "random", seed=9, zero_fraction=0.5),
    Content("f", "fill", seed=1, byte=0x2A, zero_fraction=0.3, private_fraction=0.1),
    Content("img", "image", seed=5, pages=70, offset=2, zero_fraction=0.25, private_fraction=0.25),
    Content("big", "image", seed=6, zero_fraction=0.1, private_fraction=0.6),
]


def pages_of(data: bytes) -> list[bytes]:
    return [data[i:i + PAGE_SIZE] for i in range(0, len(data), PAGE_SIZE)]


@pytest.mark.parametrize("content", CONTENTS, ids=lambda c: c.name)
def test_chunks_do_not_change_the_pages(content: Content) -> None:
    """A mapping filled 1, 7 or 300 pages at a time holds the same bytes, fingerprints
    and kinds of page: the draws do not depend on the chunk size."""
    whole = ContentSource().build(content, 300, "p[0].m")
    for size in (1, 7, 300):
        fill = Fill(ContentSource(), content, 300, "p[0].m")
        assert b"".join(fill.page_bytes(ch) for ch in fill.chunks(size)) == whole
        fill = Fill(ContentSource(), content, 300, "p[0].m")
        fps = [fp for ch in fill.chunks(size) for fp in fill.page_fingerprints(ch)]
        assert fps == [fingerprint(p) for p in pages_of(whole)]


@pytest.mark.parametrize("content", CONTENTS, ids=lambda c: c.name)
def test_content_ids_name_the_built_pages(content: Content) -> None:
    """The bulk engine's ids (computed as arrays, no page bytes) partition the pages of
    two instances exactly as their bytes do: equal ids for equal pages; a page of an
    instance's own is new random data (NEW_CONTENT)."""
    src = ContentSource()
    table = ContentTable()
    pages, ids = [], []
    for inst in ("p[0].m", "p[1].m"):
        pages += pages_of(src.build(content, 200, inst))
        fill = Fill(src, content, 200, inst)
        ids += [x for ch in fill.chunks(64) for x in fill.content_ids(ch, table).tolist()]
    own = [i for i, x in enumerate(ids) if x == NEW_CONTENT]
    for i in own:
        assert pages.count(pages[i]) == 1  # like no other page
    named = [i for i in range(len(ids)) if ids[i] != NEW_CONTENT]
    by_id: dict[int, set[bytes]] = {}
    by_page: dict[bytes, set[int]] = {}
    for i in named:
        by_id.setdefault(ids[i], set()).add(pages[i])
        by_page.setdefault(pages[i], set()).add(ids[i])
    assert all(len(v) == 1 for v in by_id.values())
    assert all(len(v) == 1 for v in by_page.values())
    assert ids.count(0) == sum(p == bytes(PAGE_SIZE) for p in pages)


def test_images_of_one_seed_are_one_image() -> None:
    """Image page i depends on the seed alone: two contents with one seed hold the same
    pages, and get the same content ids."""
    a = Content("a", "image", seed=3, pages=10)
    b = Content("b", "image", seed=3, offset=4)
    src = ContentSource()
    assert src.build(a, 10, "x")[4 * PAGE_SIZE:7 * PAGE_SIZE] == src.build(b, 3, "y")
    table = ContentTable()
    fa, fb = Fill(src, a, 3, "x"), Fill(src, b, 3, "y")
    ida = next(iter(fa.chunks(3)))
    idb = next(iter(fb.chunks(3)))
    assert fa.content_ids(ida, table)[:3].tolist() == [1, 2, 3]
    # b's pages 0..2 are image pages 4..6: new ones after a's 0..2 (and before a's 3..9).
    assert fb.content_ids(idb, table).tolist() == [4, 5, 6]


def test_file_pages_past_the_end_are_pages_of_the_file(tmp_path: Path) -> None:
    """Past a file's end, pages are copies of the file's pages at seeded offsets, the
    same in every instance, as bytes and as ids."""
    f = tmp_path / "disk.img"
    f.write_bytes(random.Random(1).randbytes(5 * PAGE_SIZE))
    c = Content("d", "file", seed=4, path=f)
    with ContentSource() as src:
        pages = pages_of(src.build(c, 40, "p[0].m"))
        assert pages_of(src.build(c, 40, "p[1].m")) == pages
        assert all(p in pages[:5] for p in pages[5:])
        table = ContentTable()
        fill = Fill(src, c, 40, "p[0].m")
        ids = [x for ch in fill.chunks(9) for x in fill.content_ids(ch, table).tolist()]
    assert [pages[:5].index(p) for p in pages] == [ids[:5].index(x) for x in ids]


SETUP = """
[scenario]
name = "two groups"
duration = "1s"
[content.img]
kind = "image"
private_fraction = 0.5
[[process]]
name = "a"
count = 3
[[process.mapping]]
name = "m"
pages = 300
content = "img"
[[process]]
name = "b"
start = "0.5s"
[[process.mapping]]
name = "m"
pages = 100
content = "img"
[[checkpoint]]
at = "1s"
"""


@pytest.mark.parametrize("backend", ["sim", "bulk"])
def test_setup_reports_the_pages_filled(backend: str) -> None:
    """While the processes present at time 0 are set up, progress reports say how many of
    their 3 x 300 = 900 pages are filled (group b starts later and is not counted), at the
    start and the end of the set-up at least; then the run's reports follow."""
    sc = parse_scenario(SETUP, source="<test>", base_dir=Path("."))
    seen: list[ProgressInfo] = []
    run_scenario(sc, SimBackend() if backend == "sim" else BulkBackend(), seen.append)
    setup = [p for p in seen if p.setting_up]
    assert setup[0].pages_filled == 0 and setup[0].pages_to_fill == 900
    assert [p.pages_filled for p in setup] == sorted(p.pages_filled for p in setup)
    first_run = seen.index(next(p for p in seen if not p.setting_up))
    assert not any(p.setting_up for p in seen[first_run:])
    assert seen[first_run].pages_filled == 900


def test_bulk_fill_gives_own_pages_unique_contents() -> None:
    """Each process's own pages are new random data: one unique content each; the other
    contents (the zero page, and each image page some process holds) are not unique."""
    sc = parse_scenario(SETUP, source="<test>", base_dir=Path("."))
    backend = BulkBackend()
    run_scenario(sc, backend)
    table = backend.bulk.contents
    own, image = 0, set()
    for inst, pages in (("a[0].m", 300), ("a[1].m", 300), ("a[2].m", 300), ("b[0].m", 100)):
        fill = Fill(ContentSource(), sc.contents["img"], pages, inst)
        for ch in fill.chunks(pages):
            own += int(np.count_nonzero(ch.kind == OWN))
            image |= set(ch.index[ch.kind != OWN].tolist())
    assert 400 < own < 600  # Binomial(1000, 0.5): 6 standard deviations either side
    assert len(table) == 1 + len(image) + own
    assert int(np.count_nonzero(table.unique[:len(table)])) == own


BIG = """
[scenario]
name = "one 64 MiB guest"
duration = "1ms"
[content.img]
kind = "image"
zero_fraction = 0.1
private_fraction = 0.5
[[process]]
name = "g"
[[process.mapping]]
name = "ram"
size = "64MiB"
content = "img"
[[checkpoint]]
at = "1ms"
"""


@pytest.mark.parametrize("backend", ["fingerprint", "bulk"])
def test_setup_memory_is_bounded_by_the_chunk(backend: str) -> None:
    """Filling a 64 MiB mapping allocates at most a chunk (4 MiB of bytes) at a time on
    top of what the machine keeps: the peak of traced allocations stays under 24 MiB,
    where building the mapping's bytes whole needed 64 MiB at once (16384 pages of 4 KiB;
    SimKernel keeps about 350 bytes per fingerprinted page: 5.5 MiB)."""
    import tracemalloc

    sc = parse_scenario(BIG, source="<test>", base_dir=Path("."))
    machine = BulkBackend() if backend == "bulk" else SimBackend("fingerprint")
    tracemalloc.start()
    try:
        run_scenario(sc, machine)
        _now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 24 << 20, peak
