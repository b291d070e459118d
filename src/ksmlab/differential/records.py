# SPDX-License-Identifier: GPL-2.0-only
"""What a differential run records, and how a model record and a kernel record are compared.

The records (:class:`RunRecord` and the :class:`CheckpointRecord`,
:class:`ProcessRecord`, :class:`VmaRecord` and :class:`CallRecord` it holds)
are plain frozen data, the same for both backends; :func:`compare` turns two
of them into a :class:`DiffReport` of :class:`Difference` entries.  Also here:
the :class:`Checkpoint` and :data:`Program` types a program is written against.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ksmlab.api import KsmStat

if TYPE_CHECKING:
    from ksmlab.api import Kernel

__all__ = [
    "COUNTERS",
    "DELTA_COUNTERS",
    "VM_FLAGS",
    "CallRecord",
    "Checkpoint",
    "CheckpointRecord",
    "DiffReport",
    "Difference",
    "ProcessRecord",
    "Program",
    "RunRecord",
    "VmaRecord",
    "compare",
]

COUNTERS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
            "pages_scanned", "pages_skipped", "full_scans", "stable_node_chains",
            "stable_node_dups", "ksm_zero_pages", "general_profit", "cow_ksm")
"""The global counters recorded at each checkpoint (``cow_ksm`` is from vmstat)."""

DELTA_COUNTERS = frozenset({"pages_scanned", "pages_skipped", "full_scans", "cow_ksm"})
"""Counters cumulative since boot on the real kernel: recorded as deltas since the run began."""


class Checkpoint(Protocol):
    """What a program calls at a point where the state should be compared."""

    def __call__(self, name: str) -> None: ...


Program = Callable[["Kernel", Checkpoint], None]
"""A scenario: ``program(k, cp)``, written only against :mod:`ksmlab.api`."""


# --------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True, slots=True)
class CallRecord:
    """One call the program made, and its outcome.

    Attributes:
        index: position in the run (0-based).
        proc: the process label (``P0``, ``P1``, ...) or ``k`` for the kernel.
        call: the call, with addresses relative to regions (``madvise(r0+0p, 4p, MERGEABLE)``).
        result: ``ok``, an errno name, ``-> value``, read data as a digest, or
            ``stalled after i of n`` for a wait that could not complete.
    """

    index: int
    proc: str
    call: str
    result: str

    def __str__(self) -> str:
        return f"#{self.index} {self.proc}.{self.call} = {self.result}"


VM_FLAGS = ("rd", "wr", "ex", "sh", "mr", "mw", "me", "ms", "gd", "pf", "lo", "io", "dc", "de",
            "ac", "nr", "ht", "wf", "dd", "mm", "hg", "nh", "mg", "dp")
"""The ``VmFlags:`` mnemonics compared (those the model knows; the kernel prints more)."""


@dataclass(frozen=True, slots=True)
class VmaRecord:
    """One vma overlapping the program's regions, with region-relative bounds.

    Attributes:
        start, end: the bounds, relative to regions (``r1+2p``).
        perms: the ``rwxp`` string.
        mergeable: VM_MERGEABLE (``mg``).
        flags: the ``VmFlags:`` mnemonics of :data:`VM_FLAGS` the vma has.
        rss, anonymous, ksm: bytes, from ``Rss:``, ``Anonymous:`` and ``KSM:``.
    """

    start: str
    end: str
    perms: str
    mergeable: bool
    flags: str
    rss: int
    anonymous: int
    ksm: int

    def __str__(self) -> str:
        return (f"[{self.start}, {self.end}) {self.perms} {{{self.flags}}} rss={self.rss // 1024}k "
                f"anon={self.anonymous // 1024}k ksm={self.ksm // 1024}k")


@dataclass(frozen=True, slots=True)
class ProcessRecord:
    """A live process at a checkpoint.

    Attributes:
        label: ``P0``, ``P1``, ... in creation order (spawn and fork).
        ksm_stat: ``/proc/PID/ksm_stat``.
        layout: the regions in address order; ``|`` joins regions that touch.
        vmas: the vmas that overlap a region.
        pages: for each region, one entry per page: None if nothing is mapped,
            else a small integer naming the physical page; two pages (in any
            process) with the same number share one physical page.
    """

    label: str
    ksm_stat: KsmStat
    layout: str
    vmas: tuple[VmaRecord, ...]
    pages: tuple[tuple[str, tuple[int | None, ...]], ...]


@dataclass(frozen=True, slots=True)
class CheckpointRecord:
    """The state at one ``cp(name)``.

    Attributes:
        name: the name the program gave.
        calls: how many calls had been made before it.
        counters: :data:`COUNTERS` (deltas for :data:`DELTA_COUNTERS`).
        processes: every live process, in label order.
    """

    name: str
    calls: int
    counters: dict[str, int]
    processes: tuple[ProcessRecord, ...]


@dataclass(frozen=True, slots=True)
class RunRecord:
    """Everything observed while one program ran on one backend.

    Attributes:
        backend: ``model``, ``bulk`` or ``kernel``.
        calls: every call, in order.
        checkpoints: every checkpoint, in order (the last one, ``(end)``, is
            taken after the program returns).
        error: the exception the program raised (other than OSError), if any.
        stalls: for each ``wait_full_scans``, whether it stalled.
        detail: vmas and physical pages were recorded (False on the bulk
            engine, which keeps neither vmas nor frame numbers: only calls,
            counters, ``ksm_stat`` and layouts are compared then).
    """

    backend: str
    calls: tuple[CallRecord, ...]
    checkpoints: tuple[CheckpointRecord, ...]
    error: str | None
    stalls: tuple[bool, ...]
    detail: bool = True

    def __str__(self) -> str:
        lines = [f"run on the {self.backend}: {len(self.calls)} calls, "
                 f"{len(self.checkpoints)} checkpoints"]
        cps = iter(self.checkpoints)
        nxt = next(cps, None)
        for call in [*self.calls, None]:
            while nxt is not None and (call is None or nxt.calls <= call.index):
                lines.append(f"  == cp {nxt.name!r}: "
                             + " ".join(f"{k}={v}" for k, v in nxt.counters.items()))
                for pr in nxt.processes:
                    stat = " ".join(f"{k.removeprefix('ksm_')}={int(v)}"
                                    for k, v in pr.ksm_stat.items())
                    lines.append(f"     {pr.label} {pr.layout}: {stat}")
                    lines.extend(f"       {v}" for v in pr.vmas)
                    lines.extend(f"       {r}: {_render_pages(ids)}" for r, ids in pr.pages)
                nxt = next(cps, None)
            if call is not None:
                lines.append(f"  {call}")
        if self.error:
            lines.append(f"  program raised {self.error}")
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class Difference:
    """One field on which the model and the kernel disagree.

    Attributes:
        where: the checkpoint (``cp #2 'merged'``) or call (``call #5``).
        what: the field (``pages_sharing``, ``P1.ksm_stat.ksm_merging_pages``,
            ``P0.vma[1].ksm``, ``P0.pages[r0]``, ...).
        model: the model's value.
        kernel: the kernel's value.
    """

    where: str
    what: str
    model: object
    kernel: object

    def __str__(self) -> str:
        return f"{self.where}: {self.what}: model {_fmt(self.model)}, kernel {_fmt(self.kernel)}"


@dataclass(frozen=True, slots=True)
class DiffReport:
    """The comparison of a model run and a kernel run of one program.

    Attributes:
        scenario: the program's name.
        differences: every disagreement, in program order.
        model: the model's record.
        kernel: the kernel's record.
    """

    scenario: str
    differences: tuple[Difference, ...]
    model: RunRecord
    kernel: RunRecord

    @property
    def ok(self) -> bool:
        """Whether the two runs agree on everything compared."""
        return not self.differences

    def __str__(self) -> str:
        if self.ok:
            return (f"{self.scenario}: model and kernel agree on {len(self.model.calls)} calls "
                    f"and {len(self.model.checkpoints)} checkpoints")
        lines = [f"{self.scenario}: {len(self.differences)} difference(s)"]
        lines += [f"  {d}" for d in self.differences]
        lines += ["", str(self.model), "", str(self.kernel)]
        return "\n".join(lines)


def _fmt(value: object) -> str:
    if isinstance(value, tuple) and value and isinstance(value[0], VmaRecord):
        return "[" + "; ".join(str(v) for v in value) + "]"
    return repr(value) if not isinstance(value, str) else value


def _render_pages(ids: Sequence[int | None]) -> str:
    """Run-length text of a region's page numbers: ``0*3 1 2 -*5``."""
    out: list[str] = []
    i = 0
    while i < len(ids):
        j = i
        while j < len(ids) and ids[j] == ids[i]:
            j += 1
        tok = "-" if ids[i] is None else str(ids[i])
        out.append(tok if j - i == 1 else f"{tok}*{j - i}")
        i = j
    return " ".join(out) or "(empty)"


# --------------------------------------------------------------------------------------
# Comparing


def compare(model: RunRecord, kernel: RunRecord, scenario: str = "program") -> DiffReport:
    """Compare two records of the same program, field by field.

    When either run has no detail (:attr:`RunRecord.detail`), vmas and
    pages are not compared.
    """
    detail = model.detail and kernel.detail
    diffs: list[Difference] = []
    add = diffs.append
    for i in range(max(len(model.calls), len(kernel.calls))):
        mc = model.calls[i] if i < len(model.calls) else None
        kc = kernel.calls[i] if i < len(kernel.calls) else None
        if mc is None or kc is None:
            add(Difference(f"call #{i}", "call", str(mc), str(kc)))
            continue
        if (mc.proc, mc.result) != (kc.proc, kc.result) or mc.call.split("(")[0] != \
                kc.call.split("(")[0]:
            add(Difference(f"call #{i} {mc.proc}.{mc.call}", "result", mc.result, kc.result))
    if model.error != kernel.error:
        add(Difference("program", "exception", model.error, kernel.error))
    for i in range(max(len(model.checkpoints), len(kernel.checkpoints))):
        mcp = model.checkpoints[i] if i < len(model.checkpoints) else None
        kcp = kernel.checkpoints[i] if i < len(kernel.checkpoints) else None
        if mcp is None or kcp is None:
            add(Difference(f"cp #{i}", "checkpoint", mcp and mcp.name, kcp and kcp.name))
            continue
        where = f"cp #{i} {mcp.name!r}"
        for c in COUNTERS:
            if mcp.counters.get(c) != kcp.counters.get(c):
                add(Difference(where, c, mcp.counters.get(c), kcp.counters.get(c)))
        _compare_procs(where, mcp.processes, kcp.processes, detail, add)
    return DiffReport(scenario, tuple(diffs), model, kernel)


def _compare_procs(where: str, mps: tuple[ProcessRecord, ...], kps: tuple[ProcessRecord, ...],
                   detail: bool, add: Callable[[Difference], None]) -> None:
    if [p.label for p in mps] != [p.label for p in kps]:
        add(Difference(where, "live processes", [p.label for p in mps], [p.label for p in kps]))
        return
    for mp, kp in zip(mps, kps, strict=True):
        for key in sorted({*mp.ksm_stat, *kp.ksm_stat}):
            if mp.ksm_stat.get(key) != kp.ksm_stat.get(key):
                add(Difference(where, f"{mp.label}.ksm_stat.{key}", mp.ksm_stat.get(key),
                               kp.ksm_stat.get(key)))
        if mp.layout != kp.layout:
            add(Difference(where, f"{mp.label}.layout", mp.layout, kp.layout))
        if not detail:
            continue
        if len(mp.vmas) != len(kp.vmas) or any(
                (a.start, a.end) != (b.start, b.end)
                for a, b in zip(mp.vmas, kp.vmas, strict=False)):
            add(Difference(where, f"{mp.label}.vmas", mp.vmas, kp.vmas))
        else:
            for j, (a, b) in enumerate(zip(mp.vmas, kp.vmas, strict=True)):
                for attr in ("perms", "mergeable", "flags", "rss", "anonymous", "ksm"):
                    va, vb = getattr(a, attr), getattr(b, attr)
                    if va != vb:
                        add(Difference(where, f"{mp.label}.vma[{j}] {a.start}.{attr}", va, vb))
        for (rl, ma), (_, ka) in zip(mp.pages, kp.pages, strict=False):
            if ma != ka:
                add(Difference(where, f"{mp.label}.pages[{rl}]", _render_pages(ma),
                               _render_pages(ka)))

