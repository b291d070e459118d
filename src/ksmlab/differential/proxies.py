# SPDX-License-Identifier: GPL-2.0-only
"""The kernel, processes and sysfs a differential program sees: every call is recorded.

The proxies wrap a backend's objects (through a driver, see
:mod:`ksmlab.differential.drivers`), turn a refused call (:class:`OSError`)
into a :class:`~ksmlab.differential.records.CallRecord` with its errno instead
of raising, and describe addresses relative to the program's regions
(``r1+3p``) so that the model's and the kernel's records can be compared.
"""

from __future__ import annotations

import errno as errno_mod
import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Self

from ksmlab.api import KsmStat, SmapsEntry
from ksmlab.constants import (
    MADV_DONTNEED,
    MADV_MERGEABLE,
    MADV_UNMERGEABLE,
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    PAGE_SIZE,
    PROT_READ,
    PROT_WRITE,
)
from ksmlab.differential.records import CallRecord, CheckpointRecord

if TYPE_CHECKING:
    from ksmlab.api import Kernel, Process, Sysfs
    from ksmlab.differential.drivers import _Driver

P = PAGE_SIZE


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
        _, value = self._do(f"prctl({option}, {arg2}, {arg3}, {arg4}, {arg5})",
                            lambda: self._inner.prctl(option, arg2, arg3, arg4, arg5),
                            lambda v: f"-> {v}")
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


if TYPE_CHECKING:
    def _conforms(k: _KernelProxy, p: _Proc, s: _SysfsProxy) -> tuple[Kernel, Process, Sysfs]:
        """Never called: makes mypy check that the proxies satisfy the api Protocols."""
        return k, p, s
