"""The differential random programs on the bulk engine, against SimKernel (no kernel needed).

The same programs run against the real kernel in tests/test_differential.py
(``test_random_program_bulk_engine``); here they are compared with SimKernel
field by field (calls, counters including ``cow_ksm``, ``ksm_stat``, layouts).
"""

from __future__ import annotations

import pytest

from ksmlab import MADV_MERGEABLE, MADV_UNMERGEABLE, PAGE_SIZE, SimKernel
from ksmlab.bulk import BulkKernel
from ksmlab.differential import compare, random_program, run_on_bulk, run_on_model
from ksmlab.differential.random_programs import BULK_OPS

P = PAGE_SIZE


@pytest.mark.parametrize("merge_any", [False, True], ids=["advised", "merge_any"])
@pytest.mark.parametrize("seed", range(150))
def test_bulk_programs_agree_with_simkernel(seed: int, merge_any: bool) -> None:
    program = random_program(seed, engine="bulk", merge_any=merge_any)
    report = compare(run_on_model(program), run_on_bulk(program), f"seed {seed}")
    if not report.ok:
        pytest.fail(f"{program}\n\n{report}", pytrace=False)


def test_bulk_programs_keep_to_the_bulk_operations() -> None:
    """Every step of a bulk program is one the bulk engine models; no shared maps, no
    MADV_DONTNEED, one dup per chain (max_page_sharing stays 256)."""
    for seed in range(50):
        text = str(random_program(seed, engine="bulk"))
        steps = [line.strip() for line in text.splitlines()[1:]]
        assert {s.split("(")[0] for s in steps} <= BULK_OPS
        assert "True)" not in "".join(s for s in steps if s.startswith("mmap("))
        assert "DONTNEED" not in text
        assert "max_page_sharing, 2)" not in text and "max_page_sharing, 3)" not in text


def test_random_program_rejects_unknown_engine() -> None:
    with pytest.raises(ValueError, match="engine must be 'sim' or 'bulk', got 'x'"):
        random_program(1, engine="x")


@pytest.mark.parametrize("make", [lambda: SimKernel(trace=False), BulkKernel],
                         ids=["sim", "bulk"])
def test_cow_ksm_counts_cow_and_unshare_of_ksm_pages(make: type) -> None:
    """vmstat cow_ksm (kernel-behaviour: do_wp_page counts a COW or unshare fault on a KSM
    page): 4 identical pages merge into one KSM page; writing one of them is 1 COW, and
    MADV_UNMERGEABLE over the other 3 is 3 unshares: 4.  A write to an ordinary page is 0."""
    k = make()
    k.sysfs["sleep_millisecs"] = "0"
    p = k.spawn()
    a = p.mmap(5 * P)
    p.write(a, b"x" * 4 * P + b"y" * P)
    p.madvise(a, 5 * P, MADV_MERGEABLE)
    k.sysfs["run"] = "1"
    k.wait_full_scans(2)
    assert k.sysfs["pages_sharing"] == "3"
    p.write(a + 4 * P, b"z" * P)
    assert k.cow_ksm == 0
    p.write(a, b"w" * P)
    assert k.cow_ksm == 1
    p.madvise(a, 5 * P, MADV_UNMERGEABLE)
    assert k.cow_ksm == 4
