"""The typed interface shared by every backend.

:class:`Kernel` and :class:`Process` are what user code, the scenario runner
and the differential tests are written against.  :class:`ksmlab.SimKernel`
(the model) and :class:`ksmlab.LinuxKernel` (the real kernel) both satisfy
them, so the same program runs unchanged on either.

Errors follow :mod:`os`: a call the kernel refuses raises :class:`OSError`
with the kernel's errno; misuse of the Python API raises a built-in
exception naming the bad value.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, Self, runtime_checkable

from ksmlab.constants import MAP_ANONYMOUS, MAP_PRIVATE, PROT_READ, PROT_WRITE

KsmStat = dict[str, int | bool]
"""``/proc/PID/ksm_stat`` as a dict: ``ksm_rmap_items``, ``ksm_zero_pages``,
``ksm_merging_pages``, ``ksm_process_profit`` (ints) and ``ksm_merge_any``,
``ksm_mergeable`` (bools, printed yes/no by the kernel)."""


@dataclass(frozen=True, slots=True)
class SmapsEntry:
    """One vma of ``/proc/PID/smaps``, reduced to what KSM studies need.

    Attributes:
        start: first address of the vma.
        end: first address after the vma.
        perms: the ``rwxp``/``rwxs`` permission string of the header line.
        vm_flags: the two-letter ``VmFlags:`` mnemonics, e.g. ``("rd", "wr", "mg")``.
        rss: bytes of the vma resident in memory (``Rss:``; KSM zero pages excluded).
        anonymous: bytes of anonymous pages (``Anonymous:``).
        ksm: bytes of KSM pages mapped (``KSM:``; KSM zero pages excluded).
        anon_huge: bytes of anonymous transparent huge pages mapped by PMD
            (``AnonHugePages:``; a THP mapped by PTE after a split is not counted).
    """

    start: int
    end: int
    perms: str
    vm_flags: tuple[str, ...]
    rss: int
    anonymous: int
    ksm: int
    anon_huge: int = 0

    @property
    def mergeable(self) -> bool:
        """Whether the vma carries VM_MERGEABLE (``mg`` in VmFlags)."""
        return "mg" in self.vm_flags


class Sysfs(Protocol):
    """``/sys/kernel/mm/ksm``: text in, text out, like the files themselves."""

    def __getitem__(self, name: str) -> str: ...
    def __setitem__(self, name: str, value: str) -> None: ...
    def __iter__(self) -> Iterator[str]: ...
    def __contains__(self, name: object) -> bool: ...


@runtime_checkable
class Process(Protocol):
    """A process whose address space the caller drives."""

    @property
    def pid(self) -> int: ...

    def mmap(
        self,
        length: int,
        prot: int = PROT_READ | PROT_WRITE,
        flags: int = MAP_PRIVATE | MAP_ANONYMOUS,
        *,
        addr: int = 0,
        node: int | None = None,
        path: str | None = None,
        offset: int = 0,
    ) -> int: ...
    def munmap(self, addr: int, length: int) -> None: ...
    def mprotect(self, addr: int, length: int, prot: int) -> None: ...
    def madvise(self, addr: int, length: int, advice: int) -> None: ...
    def prctl(self, option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0,
              arg5: int = 0) -> int: ...
    def write(self, addr: int, data: bytes, *, force: bool = False) -> None: ...
    def read(self, addr: int, length: int, *, force: bool = False) -> bytes: ...
    def fork(self) -> Process: ...
    def exec(self) -> None: ...
    def exit(self) -> None: ...
    def ksm_stat(self) -> KsmStat: ...
    def ksm_merging_pages(self) -> int: ...
    def smaps(self) -> list[SmapsEntry]: ...
    def pfns(self, addr: int, length: int) -> list[int | None]: ...


@runtime_checkable
class Kernel(Protocol):
    """A machine with KSM: the model or the real one."""

    @property
    def sysfs(self) -> Sysfs: ...

    def spawn(self) -> Process: ...
    def wait_full_scans(self, n: int = 1, *, timeout: float | None = None) -> None: ...
    def advance(self, ms: float) -> None: ...
    def close(self) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(self, *exc: object) -> None: ...
