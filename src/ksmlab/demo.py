"""The built-in demo: a few VM-like processes booted from one image, merged by ksmd.

This is what ``ksmlab run`` does without a scenario file (scenario files come
with the scenario runner).  It is deterministic: the page contents come from a
seeded generator, and time is virtual.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from ksmlab.constants import MADV_MERGEABLE, PAGE_SIZE
from ksmlab.kernel import SimKernel

COUNTERS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
            "ksm_zero_pages", "general_profit", "full_scans")


@dataclass(frozen=True, slots=True)
class DemoConfig:
    """Shape of the demo workload.

    Attributes:
        vms: number of processes ("guests").
        pages: pages mapped by each guest.
        shared_fraction: pages identical across guests (the common image).
        zero_fraction: zero-filled pages (touched, so real anonymous pages).
        pages_to_scan, sleep_millisecs: ksmd's knobs.
        checkpoints_ms: virtual times at which counters are reported.
        seed: seed of the content generator.
    """

    vms: int = 4
    pages: int = 2048
    shared_fraction: float = 0.6
    zero_fraction: float = 0.2
    pages_to_scan: int = 1000
    sleep_millisecs: int = 20
    checkpoints_ms: tuple[int, ...] = (100, 500, 1000, 2000, 5000)
    seed: int = 1


def run_demo(cfg: DemoConfig) -> Iterator[tuple[int, dict[str, int], float]]:
    """Run the demo; yield (virtual ms, counters, ksmd CPU seconds) at each checkpoint."""
    rng = random.Random(cfg.seed)
    k = SimKernel()
    k.sysfs["pages_to_scan"] = str(cfg.pages_to_scan)
    k.sysfs["sleep_millisecs"] = str(cfg.sleep_millisecs)
    image = [rng.randbytes(PAGE_SIZE) for _ in range(cfg.pages)]
    n_shared = int(cfg.pages * cfg.shared_fraction)
    n_zero = int(cfg.pages * cfg.zero_fraction)
    for _ in range(cfg.vms):
        p = k.spawn()
        a = p.mmap(cfg.pages * PAGE_SIZE)
        for i in range(cfg.pages):
            if i < n_shared:
                data = image[i]
            elif i < n_shared + n_zero:
                data = bytes(PAGE_SIZE)
            else:
                data = rng.randbytes(PAGE_SIZE)
            p.write(a + i * PAGE_SIZE, data)
        p.madvise(a, cfg.pages * PAGE_SIZE, MADV_MERGEABLE)
    k.sysfs["run"] = "1"
    elapsed = 0
    for t in cfg.checkpoints_ms:
        k.advance(t - elapsed)
        elapsed = t
        yield t, {c: int(k.sysfs[c]) for c in COUNTERS}, k.ksmd_cpu_ns / 1e9
