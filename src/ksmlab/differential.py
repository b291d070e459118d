# SPDX-License-Identifier: GPL-2.0-only
"""Differential runs: one program on the model and on the real kernel, compared field by field.

A *program* is a function ``program(k, cp)`` written only against the
:mod:`ksmlab.api` protocols: it spawns processes, maps, writes, advises,
forks, writes sysfs knobs, waits for full scans, and calls ``cp("name")``
wherever it wants the state compared.  :func:`differential` runs it on a fresh
:class:`~ksmlab.SimKernel` and then on a
:class:`~ksmlab.backends.linux.LinuxKernel`, records the same observations on
both, and returns a :class:`DiffReport` listing every difference::

    def merge_ten(k: Kernel, cp: Checkpoint) -> None:
        p = k.spawn()
        a = p.mmap(10 * PAGE_SIZE)
        p.write(a, b"*" * 10 * PAGE_SIZE)
        p.madvise(a, 10 * PAGE_SIZE, MADV_MERGEABLE)
        k.sysfs["run"] = "1"
        k.wait_full_scans(2)
        cp("merged")

    report = differential(merge_ten)
    assert report.ok, str(report)

What is recorded (see ``docs/differential.md``):

* every call, with its outcome: the errno of a refused call (an
  :class:`OSError` is recorded, not raised: the call returns 0 / ``b""``),
  the value of ``prctl``, the bytes read back (as a digest), and for
  ``wait_full_scans`` whether ksmd stalled;
* at each checkpoint: the global counters (``pages_scanned``,
  ``pages_skipped`` and ``full_scans`` as deltas since the start of the run,
  plus vmstat ``cow_ksm``), and for every live process its ``ksm_stat``, the
  layout of its regions, its vmas over those regions (mergeable flag, perms,
  Rss, Anonymous, KSM) and which pages of the regions share a physical page.

Addresses are never compared as numbers: every ``mmap`` the program makes is
a *region* (``r0``, ``r1``, ...) and addresses are written relative to it
(``r1+3p``).  Only vmas that overlap a region are compared, so the helper
process's own mappings (text, data, heap, stack, vdso) never are.

Quiescence on the real kernel: ksmd runs only inside ``wait_full_scans``, and
for exactly the number of full scans asked (see :class:`_LinuxDriver`), so
every point of the program is a quiescent point, as in the model.
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import hashlib
import random
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Self

from ksmlab.api import KsmStat, SmapsEntry
from ksmlab.constants import (
    MADV_DONTNEED,
    MADV_MERGEABLE,
    MADV_UNMERGEABLE,
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    MAP_SHARED,
    PAGE_SIZE,
    PR_SET_MEMORY_MERGE,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
)
from ksmlab.errors import KsmSimError, ScanStalledError
from ksmlab.kernel import SimKernel
from ksmlab.ksm.sysfs import MAX_WRITE, ParseError, kstrtouint

if TYPE_CHECKING:
    from ksmlab.api import Kernel, Process, Sysfs
    from ksmlab.backends.linux import LinuxKernel

__all__ = [
    "COUNTERS",
    "CallRecord",
    "Checkpoint",
    "CheckpointRecord",
    "DiffReport",
    "Difference",
    "ProcessRecord",
    "Program",
    "QuiescenceError",
    "RunRecord",
    "VmaRecord",
    "compare",
    "differential",
    "random_program",
    "run_on_kernel",
    "run_on_model",
]

P = PAGE_SIZE

COUNTERS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
            "pages_scanned", "pages_skipped", "full_scans", "stable_node_chains",
            "stable_node_dups", "ksm_zero_pages", "general_profit", "cow_ksm")
"""The global counters recorded at each checkpoint (``cow_ksm`` is from vmstat)."""

DELTA_COUNTERS = frozenset({"pages_scanned", "pages_skipped", "full_scans", "cow_ksm"})
"""Counters cumulative since boot on the real kernel: recorded as deltas since the run began."""

DEFAULT_GAP_MS = 20
"""ksmd's sleep between batches while the real kernel scans (see :class:`_LinuxDriver`)."""


class Checkpoint(Protocol):
    """What a program calls at a point where the state should be compared."""

    def __call__(self, name: str) -> None: ...


Program = Callable[["Kernel", Checkpoint], None]
"""A scenario: ``program(k, cp)``, written only against :mod:`ksmlab.api`."""


class QuiescenceError(KsmSimError, RuntimeError):
    """The real kernel's ksmd did more full scans than asked (the run is not comparable)."""


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
        backend: ``model`` or ``kernel``.
        calls: every call, in order.
        checkpoints: every checkpoint, in order (the last one, ``(end)``, is
            taken after the program returns).
        merge_any: some process enabled prctl(PR_SET_MEMORY_MERGE): only
            per-region figures are comparable then.
        error: the exception the program raised (other than OSError), if any.
        stalls: for each ``wait_full_scans``, whether it stalled.
    """

    backend: str
    calls: tuple[CallRecord, ...]
    checkpoints: tuple[CheckpointRecord, ...]
    merge_any: bool
    error: str | None
    stalls: tuple[bool, ...]

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
        per_region_only: prctl merge-any was used, so global counters and the
            numeric ksm_stat lines were not compared (the helper's own memory
            is mergeable then; see docs/differential.md).
    """

    scenario: str
    differences: tuple[Difference, ...]
    model: RunRecord
    kernel: RunRecord
    per_region_only: bool = False

    @property
    def ok(self) -> bool:
        """Whether the two runs agree on everything compared."""
        return not self.differences

    def __str__(self) -> str:
        scope = " (per-region figures only: prctl merge-any)" if self.per_region_only else ""
        if self.ok:
            return (f"{self.scenario}: model and kernel agree on {len(self.model.calls)} calls "
                    f"and {len(self.model.checkpoints)} checkpoints{scope}")
        lines = [f"{self.scenario}: {len(self.differences)} difference(s){scope}"]
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
# Describing calls


def _errname(err: int | None) -> str:
    return errno_mod.errorcode.get(err or 0, f"errno {err}")


def _digest(data: bytes) -> str:
    if data and data.count(data[:1]) == len(data):
        return f"{len(data)}B {data[:1]!r}*{len(data)}"
    return f"{len(data)}B sha1:{hashlib.sha1(data).hexdigest()[:12]}"


_ADVICE = {MADV_MERGEABLE: "MERGEABLE", MADV_UNMERGEABLE: "UNMERGEABLE", MADV_DONTNEED: "DONTNEED"}


@dataclass(slots=True)
class _Region:
    label: str
    start: int
    end: int


def _length(n: int) -> str:
    if n >= 0 and n % P == 0:
        return f"{n // P}p"
    return str(n)


class _Run:
    """The bookkeeping of one run: calls, regions, process labels, checkpoints."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.calls: list[CallRecord] = []
        self.checkpoints: list[CheckpointRecord] = []
        self.procs: list[_Proc] = []
        self.nregions = 0
        self.merge_any = False
        self.stalls: list[bool] = []

    def record(self, proc: str, call: str, result: str) -> None:
        self.calls.append(CallRecord(len(self.calls), proc, call, result))

    def new_label(self) -> str:
        return f"P{len(self.procs)}"


def _where(regions: Sequence[_Region], addr: int, *, end: bool = False) -> str:
    """*addr* relative to the newest region holding it (for an end address: ending at it)."""
    for r in reversed(regions):
        if (r.start < addr <= r.end) if end else (r.start <= addr < r.end):
            off = addr - r.start
            return f"{r.label}+{off // P}p" + (f"+{off % P}" if off % P else "")
    if regions:
        r = min(regions, key=lambda r: abs(addr - r.start))
        d = addr - r.start
        if abs(d) < 1 << 30 and d % P == 0:
            return f"{r.label}{d // P:+d}p"
    return f"{addr:#x}"


# --------------------------------------------------------------------------------------
# The proxies the program sees


class _Proc:
    """A process as the program sees it: every call recorded, OSError turned into a record."""

    def __init__(self, run: _Run, inner: Process, label: str, regions: list[_Region]) -> None:
        self._run = run
        self._inner = inner
        self.inner = inner  # for the runner's own (unrecorded) observations
        self.label = label
        self.regions = regions
        self.alive = True

    def __repr__(self) -> str:
        return f"<{self._run.backend} process {self.label}>"

    @property
    def pid(self) -> int:
        return self._inner.pid

    def _a(self, addr: int) -> str:
        return _where(self.regions, addr)

    def _do(self, call: str, fn: Callable[[], object], render: Callable[[object], str]
            ) -> tuple[bool, object]:
        try:
            value = fn()
        except OSError as err:
            self._run.record(self.label, call, _errname(err.errno))
            return False, None
        self._run.record(self.label, call, render(value))
        return True, value

    def mmap(self, length: int, prot: int = PROT_READ | PROT_WRITE,
             flags: int = MAP_PRIVATE | MAP_ANONYMOUS, *, addr: int = 0,
             node: int | None = None, path: str | None = None, offset: int = 0) -> int:
        label = f"r{self._run.nregions}"
        extra = (f", addr={self._a(addr)}" if addr else "") + (f", node={node}" if node else "") \
            + (f", path={path!r}, offset={offset}" if path else "")
        call = f"mmap({_length(length)}, prot={prot:#x}, flags={flags:#x}{extra})"
        ok, value = self._do(call, lambda: self._inner.mmap(
            length, prot, flags, addr=addr, node=node, path=path, offset=offset),
            lambda v: f"-> {label}")
        if not ok:
            return 0
        assert isinstance(value, int)
        self._run.nregions += 1
        size = (length + P - 1) // P * P
        self.regions.append(_Region(label, value, value + size))
        return value

    def munmap(self, addr: int, length: int) -> None:
        ok, _ = self._do(f"munmap({self._a(addr)}, {_length(length)})",
                         lambda: self._inner.munmap(addr, length), lambda v: "ok")
        if ok:  # a region unmapped as a whole is forgotten (its pages are not compared)
            end = addr + (length + P - 1) // P * P
            self.regions[:] = [r for r in self.regions if not addr <= r.start < r.end <= end]

    def mprotect(self, addr: int, length: int, prot: int) -> None:
        self._do(f"mprotect({self._a(addr)}, {_length(length)}, {prot:#x})",
                 lambda: self._inner.mprotect(addr, length, prot), lambda v: "ok")

    def madvise(self, addr: int, length: int, advice: int) -> None:
        self._do(f"madvise({self._a(addr)}, {_length(length)}, {_ADVICE.get(advice, advice)})",
                 lambda: self._inner.madvise(addr, length, advice), lambda v: "ok")

    def prctl(self, option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0,
              arg5: int = 0) -> int:
        ok, value = self._do(f"prctl({option}, {arg2}, {arg3}, {arg4}, {arg5})",
                             lambda: self._inner.prctl(option, arg2, arg3, arg4, arg5),
                             lambda v: f"-> {v}")
        if ok and option == PR_SET_MEMORY_MERGE and arg2:
            self._run.merge_any = True
        return value if isinstance(value, int) else 0

    def write(self, addr: int, data: bytes, *, force: bool = False) -> None:
        f = ", force" if force else ""
        self._do(f"write({self._a(addr)}, {_digest(bytes(data))}{f})",
                 lambda: self._inner.write(addr, data, force=force), lambda v: "ok")

    def read(self, addr: int, length: int, *, force: bool = False) -> bytes:
        f = ", force" if force else ""
        _, value = self._do(f"read({self._a(addr)}, {_length(length)}{f})",
                             lambda: self._inner.read(addr, length, force=force),
                             lambda v: f"-> {_digest(v) if isinstance(v, bytes) else v}")
        return value if isinstance(value, bytes) else b""

    def fork(self) -> _Proc:
        label = self._run.new_label()
        try:
            inner = self._inner.fork()
        except OSError as err:
            self._run.record(self.label, "fork()", _errname(err.errno))
            raise
        child = _Proc(self._run, inner, label,
                      [_Region(r.label, r.start, r.end) for r in self.regions])
        self._run.procs.append(child)
        self._run.record(self.label, "fork()", f"-> {label}")
        return child

    def exec(self) -> None:
        ok, _ = self._do("exec()", self._inner.exec, lambda v: "ok")
        if ok:
            self.regions.clear()

    def exit(self) -> None:
        self._inner.exit()
        self.alive = False
        self._run.record(self.label, "exit()", "ok")

    def ksm_stat(self) -> KsmStat:
        return self._inner.ksm_stat()

    def ksm_merging_pages(self) -> int:
        return self._inner.ksm_merging_pages()

    def smaps(self) -> list[SmapsEntry]:
        return self._inner.smaps()

    def pfns(self, addr: int, length: int) -> list[int | None]:
        out = self._inner.pfns(addr, length)
        present = sum(pfn is not None for pfn in out)
        self._run.record(self.label, f"pfns({self._a(addr)}, {_length(length)})",
                         f"-> {len(out)} entries, {present} present")
        return out


class _Driver(Protocol):
    """What differs between the backends: knob access, waiting for scans, cow_ksm."""

    @property
    def kernel(self) -> Kernel: ...
    def read(self, name: str) -> str: ...
    def write(self, name: str, value: str) -> None: ...
    def wait(self, n: int, index: int) -> int: ...
    def cow_ksm(self) -> int: ...
    def check_quiet(self) -> None: ...


class _SysfsProxy:
    """The program's ``k.sysfs``: writes are recorded, refused writes do not raise."""

    def __init__(self, run: _Run, driver: _Driver) -> None:
        self._run = run
        self._driver = driver

    def __getitem__(self, name: str) -> str:
        return self._driver.read(name)

    def __setitem__(self, name: str, value: str) -> None:
        call = f"sysfs[{name!r}] = {value!r}"
        try:
            self._driver.write(name, value)
        except OSError as err:
            self._run.record("k", call, _errname(err.errno))
            return
        self._run.record("k", call, "ok")

    def __iter__(self) -> Iterator[str]:
        return iter(self._driver.kernel.sysfs)

    def __contains__(self, name: object) -> bool:
        return name in self._driver.kernel.sysfs


class _KernelProxy:
    """The program's ``k``: spawn, sysfs and exact ``wait_full_scans``."""

    def __init__(self, run: _Run, driver: _Driver) -> None:
        self._run = run
        self._driver = driver
        self._sysfs = _SysfsProxy(run, driver)

    @property
    def sysfs(self) -> _SysfsProxy:
        return self._sysfs

    def spawn(self) -> _Proc:
        label = self._run.new_label()
        proc = _Proc(self._run, self._driver.kernel.spawn(), label, [])
        self._run.procs.append(proc)
        self._run.record("k", "spawn()", f"-> {label}")
        return proc

    def wait_full_scans(self, n: int = 1, *, timeout: float | None = None) -> None:
        """Let ksmd do exactly *n* full scans; a stall is recorded, not raised."""
        index = len(self._run.stalls)
        done = self._driver.wait(n, index)
        self._run.stalls.append(done < n)
        self._run.record("k", f"wait_full_scans({n})",
                         "ok" if done >= n else f"stalled after {done} of {n}")

    def advance(self, ms: float) -> None:
        msg = ("advance() is not deterministic on the real kernel (ksmd runs on the wall "
               "clock); differential programs use wait_full_scans()")
        raise TypeError(msg)

    def close(self) -> None:
        """The runner owns the kernel: nothing to do."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


# --------------------------------------------------------------------------------------
# Backends


class _SimDriver:
    """The model: knobs are the model's, and ksmd runs only when waited for anyway."""

    def __init__(self, k: SimKernel) -> None:
        self._k = k

    @property
    def kernel(self) -> SimKernel:
        return self._k

    def read(self, name: str) -> str:
        return self._k.sysfs[name]

    def write(self, name: str, value: str) -> None:
        self._k.sysfs[name] = value

    def wait(self, n: int, index: int) -> int:
        before = self._k.ksm.full_scans
        with contextlib.suppress(ScanStalledError):
            self._k.wait_full_scans(n)
        return self._k.ksm.full_scans - before

    def cow_ksm(self) -> int:
        return self._k.cow_ksm

    def check_quiet(self) -> None:
        pass


def _vfs_text(value: str) -> str:
    """What a sysfs store sees of a write (cut at 4096 bytes and at the first NUL)."""
    return value.encode()[:MAX_WRITE].split(b"\0", 1)[0].decode(errors="replace")


def _model_defaults() -> list[tuple[str, str]]:
    """The model's knob values at boot, in an order the real kernel accepts them."""
    s = SimKernel().sysfs
    values = {n: s[n] for n in s if s.writable(n) and n != "run"}
    if "advisor_mode" in values:
        mode = values["advisor_mode"]
        values["advisor_mode"] = mode[mode.index("[") + 1:mode.index("]")]
    first = [n for n in sorted(values) if n.startswith("advisor_") and n != "advisor_mode"]
    first += ["advisor_mode", "pages_to_scan"]
    last = ["merge_across_nodes", "max_page_sharing"]
    order = first + [n for n in sorted(values) if n not in first and n not in last] + last
    return [(n, values[n]) for n in order if n in values]


class _LinuxDriver:
    """The real kernel, made as deterministic as the model.

    The protocol:

    * At the start: ``run=0``, ``run=2`` (un-merge everything, empty the
      trees, ``full_scans`` = 0), ``run=0``, then every knob set to the
      model's boot value, so both runs start from the same state.
    * ``run`` is virtual.  A program's ``run=1`` is recorded but not written:
      the kernel stays at ``run=0`` (stopped; for ``__ksm_enter`` the same as
      1).  Other values are written for real (``run=2`` un-merges, bad values
      get the kernel's errno).  Reads of ``run`` show the program's value.
    * ``sleep_millisecs`` is virtual too: a program's write is made (for its
      errno) and then the kernel's value is set back to *gap_ms*.
    * ``wait_full_scans(n)``: read ``full_scans``, write ``run=1``, poll until
      ``full_scans`` has grown by *n*, write ``run=0``.  ksmd's batch ends when
      a full scan ends, so it then sleeps *gap_ms* before the next batch; the
      ``run=0`` lands in that sleep and ksmd stops with its cursor between two
      full scans, after exactly *n* of them, as the model does.  The count is
      checked afterwards; more than *n* raises :class:`QuiescenceError`.
    * So ksmd never runs between two calls of the program: every point is
      quiescent and checkpoints may be taken anywhere.
    """

    def __init__(self, k: LinuxKernel, *, gap_ms: int, stall_hints: Sequence[bool] = ()) -> None:
        self._k = k
        self._gap = gap_ms
        self._hints = stall_hints
        s = k.sysfs
        if s["run"] != "0":
            s["run"] = "0"
        s["run"] = "2"
        s["run"] = "0"
        defaults = _model_defaults()
        for name, value in defaults:
            if name in s and _current(s[name]) != value:
                s[name] = value
        self._virtual = {"run": "0", "sleep_millisecs": dict(defaults)["sleep_millisecs"]}
        s["sleep_millisecs"] = str(gap_ms)

    @property
    def kernel(self) -> LinuxKernel:
        return self._k

    def read(self, name: str) -> str:
        if name in self._virtual:
            return self._virtual[name]
        return self._k.sysfs[name]

    def write(self, name: str, value: str) -> None:
        s = self._k.sysfs
        if name == "run":
            text = _vfs_text(value)
            try:
                wanted: int | None = kstrtouint(text)
            except ParseError:
                wanted = None
            if wanted == 1:
                self._virtual["run"] = "1"
                return
            s["run"] = value
            if text:
                self._virtual["run"] = s["run"]
        elif name == "sleep_millisecs":
            s[name] = value
            self._virtual[name] = s[name]
            s[name] = str(self._gap)
        else:
            s[name] = value

    def wait(self, n: int, index: int) -> int:
        s = self._k.sysfs
        start = int(s["full_scans"])
        if n <= 0:
            return max(n, 0)
        if self._virtual["run"] != "1":
            return 0
        stalls = index < len(self._hints) and self._hints[index]
        # Where the model stalled, a short wait shows whether the kernel does too.
        limit = 0.05 + 0.005 * n if stalls else 30.0 + n * self._gap / 1000
        target = start + n
        deadline = time.monotonic() + limit
        last, kick = start, 0
        s["run"] = "1"  # the first batch starts at once
        try:
            while (cur := int(s["full_scans"])) < target and time.monotonic() < deadline:
                if cur != last:
                    # A full scan just ended and ksmd sleeps: a new sleep_millisecs
                    # value wakes it for the next one now instead of gap_ms later.
                    last, kick = cur, 1 - kick
                    s["sleep_millisecs"] = str(self._gap + kick)
                time.sleep(0.0002)
        finally:
            s["run"] = "0"
        done = int(s["full_scans"]) - start
        if done > n:
            msg = (f"ksmd did {done} full scans where {n} were asked: the run=0 write came "
                   f"after its {self._gap} ms sleep (machine busy?)")
            raise QuiescenceError(msg)
        return done

    def cow_ksm(self) -> int:
        with open("/proc/vmstat") as f:
            for line in f:
                if line.startswith("cow_ksm "):
                    return int(line.split()[1])
        return 0

    def check_quiet(self) -> None:
        if self._k.sysfs["run"] == "1":
            raise QuiescenceError("ksmd is running at a checkpoint")


def _current(text: str) -> str:
    if "[" in text:
        return text[text.index("[") + 1:text.index("]")]
    return text.strip()


# --------------------------------------------------------------------------------------
# Running a program


def _snapshot(run: _Run, driver: _Driver, name: str, base: dict[str, int]) -> CheckpointRecord:
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
            for e in inner.smaps()
            if any(e.start < r.end and r.start < e.end for r in regions))
        pages = []
        for r in sorted(regions, key=lambda r: int(r.label[1:])):
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


def _run(program: Program, driver: _Driver, backend: str) -> RunRecord:
    run = _Run(backend)
    base = {c: (driver.cow_ksm() if c == "cow_ksm" else int(driver.read(c)))
            for c in DELTA_COUNTERS}
    kproxy = _KernelProxy(run, driver)

    def cp(name: str) -> None:
        run.checkpoints.append(_snapshot(run, driver, name, base))

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
    return RunRecord(backend, tuple(run.calls), tuple(run.checkpoints), run.merge_any, error,
                     tuple(run.stalls))


def run_on_model(program: Program) -> RunRecord:
    """Run *program* on a fresh :class:`~ksmlab.SimKernel` and record it."""
    with SimKernel() as k:
        return _run(program, _SimDriver(k), "model")


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


# --------------------------------------------------------------------------------------
# Comparing


_MERGE_ANY_SAFE_STAT = ("ksm_merge_any",)


def compare(model: RunRecord, kernel: RunRecord, scenario: str = "program") -> DiffReport:
    """Compare two records of the same program, field by field.

    Under prctl merge-any (in either run) only per-region figures are
    compared: calls, vmas, shared pages and ``ksm_merge_any``.
    """
    per_region = model.merge_any or kernel.merge_any
    diffs: list[Difference] = []
    add = diffs.append
    for i in range(max(len(model.calls), len(kernel.calls))):
        mc = model.calls[i] if i < len(model.calls) else None
        kc = kernel.calls[i] if i < len(kernel.calls) else None
        if mc is None or kc is None:
            add(Difference(f"call #{i}", "call", str(mc), str(kc)))
            continue
        if per_region and mc.call.startswith("wait_full_scans("):
            continue  # the helper's own mergeable memory keeps the kernel's ksmd busy
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
        if not per_region:
            for c in COUNTERS:
                if mcp.counters.get(c) != kcp.counters.get(c):
                    add(Difference(where, c, mcp.counters.get(c), kcp.counters.get(c)))
        _compare_procs(where, mcp.processes, kcp.processes, per_region, add)
    return DiffReport(scenario, tuple(diffs), model, kernel, per_region)


def _compare_procs(where: str, mps: tuple[ProcessRecord, ...], kps: tuple[ProcessRecord, ...],
                   per_region: bool, add: Callable[[Difference], None]) -> None:
    if [p.label for p in mps] != [p.label for p in kps]:
        add(Difference(where, "live processes", [p.label for p in mps], [p.label for p in kps]))
        return
    for mp, kp in zip(mps, kps, strict=True):
        keys = _MERGE_ANY_SAFE_STAT if per_region else sorted({*mp.ksm_stat, *kp.ksm_stat})
        for key in keys:
            if mp.ksm_stat.get(key) != kp.ksm_stat.get(key):
                add(Difference(where, f"{mp.label}.ksm_stat.{key}", mp.ksm_stat.get(key),
                               kp.ksm_stat.get(key)))
        if mp.layout != kp.layout:
            add(Difference(where, f"{mp.label}.layout", mp.layout, kp.layout))
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


def differential(program: Program, *, name: str | None = None, retries: int = 2,
                 gap_ms: int = DEFAULT_GAP_MS,
                 kernel_factory: Callable[[], LinuxKernel] | None = None) -> DiffReport:
    """Run *program* on the model, then on the real kernel, and compare.

    A kernel run whose ksmd overshot the scans asked (:class:`QuiescenceError`)
    is repeated up to *retries* times, each time with twice the gap.
    """
    scenario = name or str(getattr(program, "__name__", "program"))
    model = run_on_model(program)
    for attempt in range(retries + 1):
        try:
            kernel = run_on_kernel(program, stall_hints=model.stalls, gap_ms=gap_ms << attempt,
                                   kernel_factory=kernel_factory)
            break
        except QuiescenceError:
            if attempt == retries:
                raise
    return compare(model, kernel, scenario)


# --------------------------------------------------------------------------------------
# Random programs


PATTERNS: tuple[bytes, ...] = (b"A" * P, b"B" * P, b"C" * P, bytes(P))
"""The page contents random programs write (the last one is a zero-filled page)."""


@dataclass(frozen=True, slots=True)
class _Step:
    """One step of a random program: an operation name and its arguments."""

    op: str
    args: tuple[object, ...] = ()

    def __str__(self) -> str:
        args = [_ADVICE.get(a, a) if self.op == "madvise" and isinstance(a, int) and i == 4
                else a for i, a in enumerate(self.args)]
        return f"{self.op}({', '.join(str(a) for a in args)})"


class _RandomProgram:
    """A program made of pre-generated steps (so both runs make the same calls)."""

    def __init__(self, name: str, steps: list[_Step]) -> None:
        self.steps = steps
        self.__name__ = name

    def __str__(self) -> str:
        return "\n".join([self.__name__, *(f"  {s}" for s in self.steps)])

    def __call__(self, k: Kernel, cp: Checkpoint) -> None:
        procs: dict[str, Process] = {}
        base: dict[str, int] = {}

        def at(r: object, first: object) -> int:
            return base[str(r)] + int(str(first)) * P

        for st in self.steps:
            op, a = st.op, st.args
            if op == "knob":
                k.sysfs[str(a[0])] = str(a[1])
            elif op == "spawn":
                procs[str(a[0])] = k.spawn()
            elif op == "wait":
                k.wait_full_scans(int(str(a[0])))
                cp(f"after {a[0]} scan(s)")
            elif op == "cp":
                cp(str(a[0]))
            else:
                p = procs[str(a[0])]
                if op == "mmap":
                    flags = (MAP_SHARED if a[3] else MAP_PRIVATE) | MAP_ANONYMOUS
                    base[str(a[1])] = p.mmap(int(str(a[2])) * P, PROT_READ | PROT_WRITE, flags)
                elif op == "madvise":
                    p.madvise(at(a[1], a[2]), int(str(a[3])) * P, int(str(a[4])))
                elif op == "write":
                    p.write(at(a[1], a[2]), PATTERNS[int(str(a[4]))] * int(str(a[3])),
                            force=bool(a[5]))
                elif op == "poke":
                    p.write(at(a[1], a[2]) + int(str(a[3])), b"!", force=bool(a[4]))
                elif op == "read":
                    p.read(at(a[1], a[2]), int(str(a[3])) * P, force=bool(a[4]))
                elif op == "mprotect":
                    p.mprotect(at(a[1], a[2]), int(str(a[3])) * P, int(str(a[4])))
                elif op == "munmap":
                    p.munmap(at(a[1], a[2]), int(str(a[3])) * P)
                elif op == "prctl":
                    p.prctl(PR_SET_MEMORY_MERGE, int(str(a[1])))
                elif op == "fork":
                    procs[str(a[1])] = p.fork()
                elif op == "exec":
                    p.exec()
                elif op == "exit":
                    p.exit()
                else:
                    raise ValueError(f"unknown step {st}")


def random_program(seed: int, *, steps: int = 50, max_procs: int = 4, max_pages: int = 8,
                   merge_any: bool = False) -> Program:
    """A seeded random program: a few processes, small areas, pages from :data:`PATTERNS`.

    The steps are drawn in advance from ``random.Random(seed)`` against an
    abstract picture of the program's state (live processes, their regions
    and sizes), never from what a backend returns, so the model and the
    kernel make the same calls.  ``str(program)`` lists them.

    Args:
        steps: how many operations to draw (besides the set-up and the end).
        max_procs: at most this many live processes.
        max_pages: the largest region, in pages.
        merge_any: the first process sets prctl(PR_SET_MEMORY_MERGE, 1) (its
            children inherit it); only per-region figures are compared then,
            and no zero-filled page is written (the helper's own zero pages
            would be partners the model does not have).
    """
    rng = random.Random(seed)
    out: list[_Step] = []
    procs: dict[str, dict[str, int]] = {}  # live process -> {region: pages}
    shared: set[str] = set()
    counter = {"P": 0, "r": 0}
    patterns = len(PATTERNS) - 1 if merge_any else len(PATTERNS)

    def new(kind: str) -> str:
        label = f"{kind}{counter[kind]}"
        counter[kind] += 1
        return label

    def add(op: str, *args: object) -> None:
        out.append(_Step(op, args))

    def spawn() -> str:
        label = new("P")
        procs[label] = {}
        add("spawn", label)
        return label

    def mmap(pl: str) -> None:
        r, n = new("r"), rng.randint(1, max_pages)
        is_shared = rng.random() < 0.08
        procs[pl][r] = n
        if is_shared:
            shared.add(r)
        add("mmap", pl, r, n, is_shared)
        if rng.random() < 0.5:
            add("madvise", pl, r, 0, n, MADV_MERGEABLE)

    add("knob", "pages_to_scan", rng.choice(("10000", "10000", "7")))
    add("knob", "sleep_millisecs", "0")
    add("knob", "smart_scan", rng.choice(("0", "1")))
    add("knob", "use_zero_pages", rng.choice(("0", "0", "1")))
    # Under merge-any the helper's own pages are searched in the stable tree
    # too, and every descent may reorder the dups of a chain it passes: only
    # compare chains without them.
    add("knob", "max_page_sharing", "256" if merge_any else rng.choice(("256", "256", "2", "3")))
    add("knob", "run", "1")
    first = spawn()
    if merge_any:
        add("prctl", first, 1)

    for _ in range(steps):
        roll = rng.random()
        regions = [(pl, r, n) for pl, regs in procs.items() for r, n in regs.items()]
        if not regions or roll < 0.05:
            if len(procs) < max_procs and (roll < 0.02 or not procs):
                spawn()
            elif procs:
                mmap(rng.choice(sorted(procs)))
            continue
        pl, r, n = rng.choice(regions)
        lo = rng.randrange(n)
        cnt = rng.randint(1, n - lo)
        force = rng.random() < 0.1
        if roll < 0.12:
            mmap(pl)
        elif roll < 0.36:
            add("write", pl, r, lo, cnt, rng.randrange(patterns), force)
        elif roll < 0.42:
            add("poke", pl, r, lo, rng.randrange(P), force)
        elif roll < 0.56:
            advice = rng.choice((MADV_MERGEABLE, MADV_MERGEABLE, MADV_UNMERGEABLE,
                                 MADV_DONTNEED))
            add("madvise", pl, r, lo, cnt, advice)
        elif roll < 0.72:
            add("wait", rng.choice((1, 1, 2, 3)))
        elif roll < 0.77 and len(procs) < max_procs:
            child = new("P")
            procs[child] = dict(procs[pl])
            add("fork", pl, child)
        elif roll < 0.81 and len(procs) > 1:
            del procs[pl]
            add("exit", pl)
        elif roll < 0.82:
            procs[pl].clear()
            add("exec", pl)
        elif roll < 0.85:
            if lo == 0 and cnt == n:
                del procs[pl][r]
            add("munmap", pl, r, lo, cnt)
        elif roll < 0.90:
            if r not in shared:  # a read fault on shmem maps its neighbours: see the doc
                add("read", pl, r, lo, cnt, force)
        elif roll < 0.94:
            prot = rng.choice((PROT_NONE, PROT_READ, PROT_READ | PROT_WRITE,
                               PROT_READ | PROT_WRITE))
            add("mprotect", pl, r, lo, cnt, prot)
        elif roll < 0.96:
            add("cp", "anywhere")
        elif roll < 0.965 and merge_any:
            add("prctl", pl, rng.choice((0, 1)))
        elif roll < 0.985:
            knobs = [("use_zero_pages", "0"), ("use_zero_pages", "1"), ("smart_scan", "0"),
                     ("smart_scan", "1")]
            if not merge_any:  # refused (EBUSY) while the helper's own pages are merged
                knobs += [("max_page_sharing", "2"), ("max_page_sharing", "256")]
            add("knob", *rng.choice(knobs))
        else:
            add("knob", "run", "2")
            add("knob", "run", "1")
    add("wait", 2)
    name = f"random_program({seed}{', merge_any=True' if merge_any else ''})"
    return _RandomProgram(name, out)


if TYPE_CHECKING:
    def _conforms(k: _KernelProxy, p: _Proc, s: _SysfsProxy, d1: _SimDriver,
                  d2: _LinuxDriver) -> tuple[Kernel, Process, Sysfs, _Driver, _Driver]:
        """Never called: makes mypy check that the proxies satisfy the api Protocols."""
        return k, p, s, d1, d2
