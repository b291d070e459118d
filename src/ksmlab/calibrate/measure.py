"""Run the calibration workloads on the real ksmd and on the model, one full scan at a time.

One full scan is one sample.  On the real kernel (through
:class:`~ksmlab.backends.linux.LinuxKernel`, which holds the machine-wide
lock and puts every knob back) ksmd is stopped between scans (``run=0``),
so a scan's window is exact: ksmd's CPU time (``/proc/<ksmd>/schedstat``)
and the wall clock are read, ``run=1`` is written (ksmd wakes at once,
blocked as it is on ``ksm_thread_wait``), ``full_scans`` is polled until it
grows, and both are read again, within ksmd's sleep after its last batch;
then ``run=0``, and a wait until that sleep's timer has fired.  A sample is
kept only if no batch ran after the end of the scan and the kernel scanned as
many pages as the model did (``pages_scanned``), and, for a THP workload, only
if the kernel really gave it transparent huge pages (a fragmented host falls
back to 4 KiB pages, whose costs are not the model's).

On the model the same program runs on the bulk engine (whose work counts
equal SimKernel's, see tests/test_bulk.py), batch by batch, recording each
batch's features (:mod:`ksmlab.ksm.cost`): the fit needs the features of
the scan, the clock fit those of each batch.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ksmlab.api import Kernel
from ksmlab.calibrate.workloads import Workload, build, rewrite, teardown, thp_shortfall
from ksmlab.constants import MADV_MERGEABLE, PAGE_SIZE
from ksmlab.ksm.cost import FEATURES
from ksmlab.scenario import host

POLL_S = 0.0003
"""How often ``full_scans`` is polled during a scan."""


@dataclass
class ScanSample:
    """One full scan of one workload: the real ksmd's cost, and the model's work.

    Attributes:
        workload: the workload's name.
        repeat: which repetition of the calibration it came from.
        scan: the scan's index in the workload (0 is the first).
        cpu_ns: the real ksmd's CPU time during the scan.
        wall_ns: real time from ``run=1`` until ``full_scans`` was seen to grow.
        features: the model's features summed over the scan's batches.
        batches: the model's features of each batch.
        sleep_ms: ``sleep_millisecs`` during the scan.
        real_pages: pages the real ksmd scanned (``pages_scanned`` growth).
        model_pages: pages the model scanned.
        ok: whether the sample is clean (see the module doc); *why* says why not.
    """

    workload: str
    repeat: int
    scan: int
    cpu_ns: int
    wall_ns: int
    features: dict[str, float]
    batches: list[dict[str, float]]
    sleep_ms: int
    real_pages: int
    model_pages: int
    ok: bool = True
    why: str = ""
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class ModelScan:
    """The model's side of one scan: its batches' features and pages scanned."""

    batches: list[dict[str, float]]
    pages: int


def run_model(w: Workload) -> list[ModelScan]:
    """*w* on the bulk engine, scan by scan, as :func:`run_real` runs it on the kernel."""
    from ksmlab.bulk import BulkKernel

    k = BulkKernel()
    maps = build(k, w)
    out = []
    for scan in range(w.scans):
        rewrite(w, maps, scan)
        f0, p0 = k.ksm.full_scans, k.ksm.pages_scanned
        k.sysfs["run"] = "1"
        batches = []
        while k.ksm.full_scans == f0:
            if not k.ksmd.batch():
                raise RuntimeError(f"calibration workload {w.name!r}: ksmd stalled on the model")
            batches.append(dict(k.ksmd.meter.last))
        k.sysfs["run"] = "0"
        out.append(ModelScan(batches, k.ksm.pages_scanned - p0))
    teardown(maps)
    return out


class _Counter:
    """A sysfs counter read with one pread per call (cheap enough to poll)."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDONLY)

    def __call__(self) -> int:
        return int(os.pread(self.fd, 64, 0))

    def close(self) -> None:
        os.close(self.fd)


def _ksmd_cpu() -> Callable[[], int]:
    pid = host.find_ksmd_pid()
    if pid is None:
        raise RuntimeError("cannot find the ksmd thread in /proc")

    def read() -> int:
        cpu = host.process_cpu_ns(pid)
        if cpu is None:
            raise RuntimeError(f"cannot read ksmd's CPU time from /proc/{pid}/schedstat")
        return cpu

    return read


def run_real(k: Kernel, w: Workload, model: list[ModelScan], repeat: int,
             sysfs_dir: str = host.KSM_SYSFS_DIR) -> list[ScanSample]:
    """*w* on the real kernel *k* (a LinuxKernel session), one sample per full scan."""
    k.sysfs["run"] = "2"  # nothing merged, every item gone, full_scans back to 0
    k.sysfs["run"] = "0"
    cpu = _ksmd_cpu()
    full_scans = _Counter(f"{sysfs_dir}/full_scans")
    scanned = _Counter(f"{sysfs_dir}/pages_scanned")
    settle = w.sleep_ms / 1000 + 0.05  # the timer of ksmd's last sleep fires in this time
    maps = build(k, w)
    out = []
    try:
        no_thp = thp_shortfall(w, maps)
        for scan, m in enumerate(model):
            rewrite(w, maps, scan)
            time.sleep(settle)
            f0, p0 = full_scans(), scanned()
            c0, t0 = cpu(), time.monotonic_ns()
            k.sysfs["run"] = "1"
            while full_scans() == f0:
                time.sleep(POLL_S)
            t1 = time.monotonic_ns()
            c1, p1 = cpu(), scanned()
            k.sysfs["run"] = "0"
            p2, f2 = scanned(), full_scans()
            feats = {name: sum(b[name] for b in m.batches) for name in FEATURES}
            sample = ScanSample(w.name, repeat, scan, c1 - c0, t1 - t0, feats, m.batches,
                                w.sleep_ms, p1 - p0, m.pages)
            if no_thp:
                sample.ok, sample.why = False, no_thp
            elif p2 != p1 or f2 != f0 + 1:
                sample.ok, sample.why = False, "ksmd ran on past the end of the scan"
            elif p1 - p0 != m.pages:
                sample.ok, sample.why = False, (f"the kernel scanned {p1 - p0} pages, "
                                                f"the model {m.pages}")
            out.append(sample)
    finally:
        teardown(maps)
        full_scans.close()
        scanned.close()
    return out


PROBE_SLEEP_MS = 20
"""``sleep_millisecs`` of the period probe (the kernel's default)."""


def probe_periods(k: Kernel, seconds: float = 6.0,
                  sysfs_dir: str = host.KSM_SYSFS_DIR) -> list[int]:
    """The gaps (ns) between ksmd's batches over *seconds*, one page mergeable: each batch is
    a whole full scan, started by a timer wake-up, far shorter than a jiffy."""
    k.sysfs["run"] = "2"
    k.sysfs["run"] = "0"
    k.sysfs["pages_to_scan"] = "100"
    k.sysfs["sleep_millisecs"] = str(PROBE_SLEEP_MS)
    p = k.spawn()
    full_scans = _Counter(f"{sysfs_dir}/full_scans")
    times = []
    try:
        a = p.mmap(PAGE_SIZE)
        p.write(a, b"p" * PAGE_SIZE)
        p.madvise(a, PAGE_SIZE, MADV_MERGEABLE)
        k.sysfs["run"] = "1"
        last = full_scans()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            cur = full_scans()
            if cur != last:
                times.append((time.monotonic_ns(), cur - last))
                last = cur
            time.sleep(POLL_S)
        k.sysfs["run"] = "0"
    finally:
        p.exit()
        full_scans.close()
    return [b - a for (a, _), (b, n) in itertools.pairwise(times) if n == 1]


PROBE_S = 1.5
"""Seconds of the timer probe before each workload (see :func:`probe_periods`)."""


def measure(k: Kernel, chosen: Sequence[Workload], repeats: int,
            log: Callable[[str], None] = lambda _: None) -> tuple[list[ScanSample], list[int]]:
    """Every workload of *chosen* on the model once, then *repeats* times on *k* (a
    LinuxKernel session), each run after a probe of ksmd's timer: the real scans'
    samples, and the probes' gaps between batches (:func:`probe_periods`)."""
    model: dict[str, list[ModelScan]] = {}
    for w in chosen:
        log(f"model: {w.name}")
        model[w.name] = run_model(w)
    samples: list[ScanSample] = []
    gaps: list[int] = []
    for r in range(repeats):
        for w in chosen:
            # Late wake-ups come and go with the machine's state: probe all along.
            log(f"kernel, run {r + 1}/{repeats}: ksmd's timer, then {w.name}")
            gaps += probe_periods(k, PROBE_S)
            samples += run_real(k, w, model[w.name], r)
    return samples, gaps


__all__ = ["PROBE_S", "ModelScan", "ScanSample", "measure", "probe_periods", "run_model",
           "run_real"]
