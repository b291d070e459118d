# SPDX-License-Identifier: GPL-2.0-only
"""Running a differential program on each backend, recording it, and comparing the two runs.

:func:`run_on_model` and :func:`run_on_kernel` run a program through the
proxies of :mod:`ksmlab.differential.proxies` and take a snapshot at each
checkpoint; :func:`differential` runs both and compares them.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ksmlab.differential.drivers import (
    DEFAULT_GAP_MS,
    QuiescenceError,
    _Driver,
    _LinuxDriver,
    _ModelDriver,
)
from ksmlab.differential.proxies import _KernelProxy, _Run, _where
from ksmlab.differential.records import (
    COUNTERS,
    DELTA_COUNTERS,
    VM_FLAGS,
    CheckpointRecord,
    DiffReport,
    ProcessRecord,
    Program,
    RunRecord,
    VmaRecord,
    compare,
)
from ksmlab.kernel import SimKernel

if TYPE_CHECKING:
    from ksmlab.backends.linux import LinuxKernel

__all__ = ["differential", "run_on_bulk", "run_on_kernel", "run_on_model"]

# --------------------------------------------------------------------------------------
# Running a program


def _snapshot(run: _Run, driver: _Driver, name: str, base: dict[str, int],
              detail: bool) -> CheckpointRecord:
    driver.check_quiet()
    counters: dict[str, int] = {}
    for c in COUNTERS:
        value = driver.cow_ksm() if c == "cow_ksm" else int(driver.read(c))
        counters[c] = value - base[c] if c in DELTA_COUNTERS else value
    ids: dict[int, int] = {}
    procs = []
    for proc in run.procs:
        if not proc.alive:
            continue
        regions = proc.regions
        inner = proc.inner
        vmas = tuple(
            VmaRecord(_where(regions, e.start), _where(regions, e.end, end=True), e.perms,
                      e.mergeable, " ".join(f for f in VM_FLAGS if f in e.vm_flags), e.rss,
                      e.anonymous, e.ksm)
            for e in (inner.smaps() if detail else ())
            if any(e.start < r.end and r.start < e.end for r in regions))
        pages = []
        for r in sorted(regions, key=lambda r: int(r.label[1:])) if detail else ():
            row = tuple(None if pfn is None else ids.setdefault(pfn, len(ids))
                        for pfn in inner.pfns(r.start, r.end - r.start))
            pages.append((r.label, row))
        ordered = sorted(regions, key=lambda r: r.start)
        layout = ""
        for i, r in enumerate(ordered):
            if i:
                prev = ordered[i - 1]
                layout += "|" if prev.end == r.start else "<" if r.start < prev.end else " "
            layout += r.label
        procs.append(ProcessRecord(proc.label, inner.ksm_stat(), layout, vmas, tuple(pages)))
    return CheckpointRecord(name, len(run.calls), counters, tuple(procs))


def _run(program: Program, driver: _Driver, backend: str, *, detail: bool = True) -> RunRecord:
    run = _Run(backend)
    base = {c: (driver.cow_ksm() if c == "cow_ksm" else int(driver.read(c)))
            for c in DELTA_COUNTERS}
    kproxy = _KernelProxy(run, driver)

    def cp(name: str) -> None:
        run.checkpoints.append(_snapshot(run, driver, name, base, detail))

    error = None
    try:
        program(kproxy, cp)
    except QuiescenceError:
        raise
    except Exception as exc:  # recorded and compared, not lost
        tb = traceback.extract_tb(exc.__traceback__)
        at = f" at {tb[-1].name}:{tb[-1].lineno}" if tb else ""
        error = f"{type(exc).__name__}: {exc}{at}"
    else:
        cp("(end)")
    return RunRecord(backend, tuple(run.calls), tuple(run.checkpoints), error,
                     tuple(run.stalls), detail)


def run_on_model(program: Program) -> RunRecord:
    """Run *program* on a fresh :class:`~ksmlab.SimKernel` and record it."""
    with SimKernel() as k:
        return _run(program, _ModelDriver(k), "model")


def run_on_bulk(program: Program) -> RunRecord:
    """Run *program* on a fresh :class:`~ksmlab.bulk.BulkKernel` and record it.

    The bulk engine keeps no vmas and no frame numbers, so the record has
    no detail (:attr:`RunRecord.detail`): calls, counters, ``ksm_stat`` and
    layouts.  Random programs for it come from
    ``random_program(seed, engine="bulk")``.
    """
    from ksmlab.bulk import BulkKernel
    with BulkKernel() as k:
        return _run(program, _ModelDriver(k), "bulk", detail=False)


def run_on_kernel(program: Program, *, stall_hints: Sequence[bool] = (),
                  gap_ms: int = DEFAULT_GAP_MS,
                  kernel_factory: Callable[[], LinuxKernel] | None = None) -> RunRecord:
    """Run *program* on the real kernel (a new :class:`LinuxKernel`) and record it.

    Args:
        stall_hints: for each ``wait_full_scans``, whether the model stalled
            there; a wait the model expects to stall is given only a short time.
        gap_ms: ksmd's sleep between batches while it scans.
        kernel_factory: makes the LinuxKernel (default: ``LinuxKernel()``).

    Raises:
        QuiescenceError: ksmd did more scans than asked; run again.
    """
    if kernel_factory is None:
        from ksmlab.backends.linux import LinuxKernel
        kernel_factory = LinuxKernel
    with kernel_factory() as k:
        return _run(program, _LinuxDriver(k, gap_ms=gap_ms, stall_hints=stall_hints), "kernel")


def differential(program: Program, *, name: str | None = None, retries: int = 2,
                 gap_ms: int = DEFAULT_GAP_MS,
                 kernel_factory: Callable[[], LinuxKernel] | None = None,
                 engine: str = "sim") -> DiffReport:
    """Run *program* on the model, then on the real kernel, and compare.

    *engine* is the model: ``"sim"`` (SimKernel, every field compared) or
    ``"bulk"`` (the bulk engine: :func:`run_on_bulk`).

    A kernel run whose ksmd overshot the scans asked (:class:`QuiescenceError`)
    is repeated up to *retries* times, each time with twice the gap.
    """
    if engine not in ("sim", "bulk"):
        raise ValueError(f"engine must be 'sim' or 'bulk', got {engine!r}")
    scenario = name or str(getattr(program, "__name__", "program"))
    model = run_on_model(program) if engine == "sim" else run_on_bulk(program)
    for attempt in range(retries + 1):
        try:
            kernel = run_on_kernel(program, stall_hints=model.stalls, gap_ms=gap_ms << attempt,
                                   kernel_factory=kernel_factory)
            break
        except QuiescenceError:
            if attempt == retries:
                raise
    return compare(model, kernel, scenario)

