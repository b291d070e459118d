"""SimKernel: one simulated machine, holding every piece of state; SimProcess: a process on it.

Virtual time: nothing here reads the wall clock.  User calls happen at the
current virtual time and take none; ksmd, a :class:`~ksmlab.ksm.ksmd.Ksmd`
shared with the bulk engine, holds the clock and runs its batches on it, with
the cost model its module describes.  ``advance(ms)`` and
``wait_full_scans(n)`` move the clock and let ksmd run.
"""

from __future__ import annotations

import errno
import itertools
import os
from collections.abc import Iterable
from typing import Any, Self, cast

from ksmlab import argcheck
from ksmlab.api import KsmStat, SmapsEntry
from ksmlab.constants import (
    HPAGE_PMD_NR,
    HPAGE_PMD_SIZE,
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    MAP_SHARED,
    MAP_SHARED_VALIDATE,
    MAP_TYPE,
    PAGE_SHIFT,
    PAGE_SIZE,
    PR_GET_MEMORY_MERGE,
    PR_SET_MEMORY_MERGE,
    PROT_READ,
    PROT_WRITE,
    VM_IO,
    VM_MAYWRITE,
    VM_PFNMAP,
    VM_READ,
    VM_SHARED,
    VM_WRITE,
)
from ksmlab.errors import NotModelledError, ProcessExitedError, kernel_error
from ksmlab.ksm.cost import KsmdCost, checked_cost
from ksmlab.ksm.counters import ksm_process_profit
from ksmlab.ksm.interface import Ksm
from ksmlab.ksm.ksmd import Ksmd
from ksmlab.ksm.sysfs import KsmSysfs
from ksmlab.mm.exec import bprm_mm_init, exec_mmap
from ksmlab.mm.fork import dup_mm, mmput
from ksmlab.mm.madvise import UNMODELLED_ADVICE, do_madvise
from ksmlab.mm.memory import Fault, Memory, present_vpns
from ksmlab.mm.mm_types import MappedFile, MmStruct, Vma
from ksmlab.mm.mmap import VmaOps
from ksmlab.mm.page import (
    FINGERPRINT_SIZE,
    ContentMode,
    Frame,
    PhysMem,
    fingerprint,
)
from ksmlab.mm.slab import Slab
from ksmlab.tracing import TraceEvent

MAX_NUMNODES = 1024
"""``MAX_NUMNODES`` of x86-64's largest configuration (``CONFIG_NODES_SHIFT=10``)."""


class SimKernel:
    """A deterministic model of a Linux 6.18 machine's KSM and the mm slice it needs.

    Args:
        config_ksm: False models CONFIG_KSM=n: no /sys/kernel/mm/ksm, and
            MADV_(UN)MERGEABLE and the prctl fail with EINVAL.
        numa_nodes: number of NUMA nodes (pages are placed with ``mmap(node=)``).
        max_frames: physical pages available; None for unlimited.
        slab_limit: kernel object allocations allowed before they fail (ENOMEM
            inside, EAGAIN at madvise); None for unlimited.  Also settable
            later as ``k.slab.limit``.
        max_map_count: ``vm.max_map_count``.
        cost: ksmd's CPU cost and clock model (:class:`~ksmlab.ksm.cost.KsmdCost`,
            e.g. ``KsmdCost.load(file)`` of a ``ksmlab calibrate`` file); None for the
            shipped defaults (see :mod:`ksmlab.ksm.cost`).
        trace: record tracepoints in :attr:`events`.
        content: ``"bytes"`` keeps each page's 4096 bytes; ``"fingerprint"``
            keeps a 16-byte fingerprint instead, so large machines fit in
            memory.  Every result is the same, apart from page content
            (docs/design.md says where tree order can show); in fingerprint
            mode only whole pages can be written (``write`` of whole pages,
            :meth:`SimProcess.write_fingerprints`) and ``read`` is not
            modelled: use :meth:`SimProcess.fingerprints`.

    Every argument is checked as :mod:`ksmlab.argcheck` says (TypeError,
    ValueError naming it) before anything is built.
    """

    def __init__(self, *, config_ksm: bool = True, numa_nodes: int = 1,
                 max_frames: int | None = None, slab_limit: int | None = None,
                 max_map_count: int = 65530, cost: KsmdCost | None = None,
                 trace: bool = True, content: ContentMode = "bytes") -> None:
        config_ksm = argcheck.flag("config_ksm", config_ksm)
        numa_nodes = argcheck.count("numa_nodes", numa_nodes, minimum=1, maximum=MAX_NUMNODES)
        max_frames = argcheck.optional_count("max_frames", max_frames)
        slab_limit = argcheck.optional_count("slab_limit", slab_limit)
        max_map_count = argcheck.count("max_map_count", max_map_count, maximum=argcheck.INT_MAX)
        cost = checked_cost(cost)
        trace = argcheck.flag("trace", trace)
        content = cast(ContentMode, argcheck.choice("content", content, ("bytes", "fingerprint")))
        self.config_ksm = config_ksm
        self.numa_nodes = numa_nodes
        self.trace_enabled = trace
        self.events: list[TraceEvent] = []
        """Tracepoint records, in order."""
        self.phys = PhysMem(numa_nodes, max_frames, content)
        self.slab = Slab(slab_limit)
        self.memory = Memory(self.phys, self._on_ksm_zero_unmap)
        self.vmaops = VmaOps(self.memory, max_map_count)
        self.ksm = Ksm(self.memory, self.slab, numa_nodes=numa_nodes,
                       now_ms=lambda: self.ksmd.now_ms(),
                       cpu_ns=lambda: self.ksmd.cpu_ns, trace=self._trace)
        self.ksmd = Ksmd(self.ksm.core, cost, absent="" if config_ksm else
                         "KSM is configured out (config_ksm=False): there is no ksmd")
        """ksmd and the virtual clock."""
        self.ksm.core.wake_ksmd = self.ksmd.wake_up
        self._sysfs = KsmSysfs(self.ksm)
        self._pids = itertools.count(1000)
        self._mm_ids = itertools.count(1)
        self.processes: dict[int, SimProcess] = {}
        """Live processes by pid."""
        self._files: dict[str, MappedFile] = {}

    @property
    def now_ns(self) -> int:
        """Virtual time, in nanoseconds since boot."""
        return self.ksmd.now_ns

    @property
    def ksmd_cpu_ns(self) -> int:
        """CPU time ksmd has used, by the cost model."""
        return self.ksmd.cpu_ns

    @property
    def content(self) -> ContentMode:
        """The content mode: ``"bytes"`` or ``"fingerprint"`` (see the class doc)."""
        return self.phys.content

    # --- context manager (for API parity with LinuxKernel) -----------------------------
    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Nothing to release: the model holds no host resources."""

    # --- tracing ----------------------------------------------------------------------
    def _trace(self, name: str, **fields: Any) -> None:
        if self.trace_enabled:
            self.events.append(TraceEvent(self.now_ns, name, fields))

    # --- sysfs ------------------------------------------------------------------------
    @property
    def sysfs(self) -> KsmSysfs:
        """/sys/kernel/mm/ksm; OSError(ENOENT) when KSM is configured out."""
        if not self.config_ksm:
            raise kernel_error(errno.ENOENT, "/sys/kernel/mm/ksm (CONFIG_KSM is not set)")
        return self._sysfs

    # --- processes --------------------------------------------------------------------
    def new_mm(self) -> MmStruct:
        """A fresh, empty address space."""
        return MmStruct(next(self._mm_ids))

    def spawn(self) -> SimProcess:
        """A new process with an empty address space."""
        proc = SimProcess(self, next(self._pids), self.new_mm())
        self.processes[proc.pid] = proc
        return proc

    def host_file(self, path: str) -> MappedFile:
        """The file object for a host path: one per path, so mappings share its page cache.

        Model choice: the file's bytes are read once, at the first mmap, and
        never written back; SimKernel never modifies host files.
        """
        key = os.path.abspath(argcheck.path("path", path))
        if key not in self._files:
            self._files[key] = self._read_file(key)
        return self._files[key]

    def _read_file(self, key: str) -> MappedFile:
        """A host file's bytes as a new MappedFile (not yet shared by later mmaps)."""
        try:
            with open(key, "rb") as f:
                return MappedFile(key, f.read())
        except OSError as e:
            raise kernel_error(e.errno or errno.ENOENT, key) from None

    # --- ksmd on the virtual clock ------------------------------------------------------
    def advance(self, ms: float) -> None:
        """Let *ms* milliseconds of virtual time pass, running ksmd as it would.

        *ms* is a finite real >= 0 (see :meth:`ksmlab.ksm.ksmd.Ksmd.advance`).
        """
        self.ksmd.advance(ms)

    def wait_full_scans(self, n: int = 1, *, timeout: float | None = None) -> None:
        """Advance virtual time until ``full_scans`` has grown by *n*.

        Raises ScanStalledError instead of waiting forever when ksmd is not
        running (run != 1), has no mm to scan, or pages_to_scan is 0; when KSM
        is configured out; and when *timeout* (virtual seconds) passes first.
        *n* is an int >= 0, *timeout* None or a finite real >= 0 (see
        :meth:`ksmlab.ksm.ksmd.Ksmd.wait_full_scans`).
        """
        self.ksmd.wait_full_scans(n, timeout=timeout)

    # --- hooks --------------------------------------------------------------------------
    def _on_ksm_zero_unmap(self, mm: MmStruct) -> None:
        self.ksm.on_ksm_zero_unmap(mm)

    @property
    def cow_ksm(self) -> int:
        """vmstat ``cow_ksm``: COW and unshare faults on KSM pages."""
        return self.memory.cow_ksm


class SimProcess:
    """A process of a SimKernel: its address space and the syscalls on it."""

    def __init__(self, kernel: SimKernel, pid: int, mm: MmStruct) -> None:
        self.kernel = kernel
        self._pid = pid
        self._mm: MmStruct | None = mm

    def __repr__(self) -> str:
        state = "exited" if self._mm is None else f"mm={self._mm.id}"
        return f"<SimProcess pid={self._pid} {state}>"

    @property
    def pid(self) -> int:
        """Process id."""
        return self._pid

    @property
    def alive(self) -> bool:
        """False once the process has exited."""
        return self._mm is not None

    @property
    def mm(self) -> MmStruct:
        """The address space; ProcessExitedError after exit."""
        if self._mm is None:
            msg = f"process {self._pid} has exited"
            raise ProcessExitedError(msg)
        return self._mm

    def _check_alive(self) -> None:
        """ProcessExitedError after exit, for a call that does not need the mm itself."""
        _ = self.mm

    # --- memory syscalls ---------------------------------------------------------------
    def mmap(self, length: int, prot: int = PROT_READ | PROT_WRITE,
             flags: int = MAP_PRIVATE | MAP_ANONYMOUS, *, addr: int = 0,
             node: int | None = None, path: str | None = None, offset: int = 0,
             vm_flags: int = 0) -> int:
        """mmap(2); returns the address.  ``vm_flags`` is model-only: extra VM_* flags
        a driver's mmap hook would set (VM_SPECIAL bits: e.g. VM_PFNMAP|VM_IO), for
        areas user space cannot otherwise create."""
        k = self.kernel
        args = argcheck.mmap_args(length, prot, flags, addr, node, path, offset, vm_flags,
                                  lambda: range(k.numa_nodes))
        mm = self.mm
        file = key = None
        if args.path is not None:
            key = os.path.abspath(args.path)
            file = k._files.get(key)
            if file is None:
                if os.path.isdir(key):
                    # Linux opens a directory for MAP_PRIVATE (O_RDONLY), then finds no
                    # mmap method: ENODEV; O_RDWR for MAP_SHARED fails first (checked).
                    shared = (args.flags & MAP_TYPE) in (MAP_SHARED, MAP_SHARED_VALIDATE)
                    raise kernel_error(errno.EISDIR if shared else errno.ENODEV, args.path)
                file = k._read_file(key)
        start = k.vmaops.do_mmap(
            mm, args.length, args.prot, args.flags, addr=args.addr, file=file,
            offset=args.offset, nid=args.node, extra_vm_flags=args.vm_flags,
            ksm_vma_flags=k.ksm.ksm_vma_flags)
        if key is not None and file is not None:
            k._files.setdefault(key, file)  # shared by later mappings only once one succeeded
        return start

    def munmap(self, addr: int, length: int) -> None:
        """munmap(2)."""
        addr, length = argcheck.ulong("addr", addr), argcheck.ulong("length", length)
        self.kernel.vmaops.do_munmap(self.mm, addr, length)

    def mprotect(self, addr: int, length: int, prot: int) -> None:
        """mprotect(2)."""
        addr, length = argcheck.ulong("addr", addr), argcheck.ulong("length", length)
        prot = argcheck.cint("prot", prot)
        self.kernel.vmaops.do_mprotect(self.mm, addr, length, prot)

    def madvise(self, addr: int, length: int, advice: int) -> None:
        """madvise(2): None, or OSError with the kernel's errno.

        NotModelledError for the advices Linux 6.18 knows that the model does
        not implement (:data:`ksmlab.mm.madvise.UNMODELLED_ADVICE`).
        """
        addr, length = argcheck.ulong("addr", addr), argcheck.ulong("length", length)
        advice = argcheck.cint("advice", advice)
        k, mm = self.kernel, self.mm
        if advice in UNMODELLED_ADVICE:
            msg = f"madvise advice {advice} is not modelled by SimKernel"
            raise NotModelledError(msg)
        do_madvise(k.vmaops, mm, addr, length, advice, config_ksm=k.config_ksm,
                   ksm_madvise=k.ksm.ksm_madvise)

    def prctl(self, option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0,
              arg5: int = 0) -> int:
        """prctl(2) for PR_SET_MEMORY_MERGE / PR_GET_MEMORY_MERGE (others: EINVAL)."""
        option = argcheck.cint("option", option)
        arg2, arg3, arg4, arg5 = (argcheck.ulong(name, v) for name, v in
                                  (("arg2", arg2), ("arg3", arg3), ("arg4", arg4),
                                   ("arg5", arg5)))
        mm = self.mm
        ksm = self.kernel.ksm
        if not self.kernel.config_ksm or option not in (PR_SET_MEMORY_MERGE,
                                                       PR_GET_MEMORY_MERGE):
            raise kernel_error(errno.EINVAL, f"prctl option {option}")
        if option == PR_SET_MEMORY_MERGE:
            if arg3 or arg4 or arg5:
                raise kernel_error(errno.EINVAL, "PR_SET_MEMORY_MERGE takes one argument")
            err = ksm.ksm_enable_merge_any(mm) if arg2 else ksm.ksm_disable_merge_any(mm)
            if err:
                raise kernel_error(err, "PR_SET_MEMORY_MERGE")
            return 0
        if arg2 or arg3 or arg4 or arg5:
            raise kernel_error(errno.EINVAL, "PR_GET_MEMORY_MERGE takes no argument")
        return int(mm.merge_any)

    # --- access --------------------------------------------------------------------------
    def _vmas_for(self, addr: int, length: int, *, write: bool, force: bool) -> list[Vma]:
        """The vma of every page in the range, or OSError if any page is inaccessible.

        The errno is EFAULT, or EIO for a forced access: /proc/PID/mem returns
        EIO when it could copy nothing (checked on Linux 6.18 by the
        differential suite).
        """
        mm = self.mm
        out: list[Vma] = []
        err = errno.EIO if force else errno.EFAULT
        first, last = addr >> PAGE_SHIFT, (addr + length - 1) >> PAGE_SHIFT
        for vpn in range(first, last + 1):
            vma = mm.vma_lookup(vpn << PAGE_SHIFT)
            if vma is None or vma.flags & (VM_IO | VM_PFNMAP):
                raise kernel_error(err, f"{vpn << PAGE_SHIFT:#x} is not accessible")
            need = VM_WRITE if write else VM_READ
            # check_vma_flags: a forced write needs a COW mapping (private, VM_MAYWRITE).
            forceable = (not write or vma.flags & (VM_SHARED | VM_MAYWRITE) == VM_MAYWRITE)
            if not vma.flags & need and not (force and forceable):
                raise kernel_error(err, f"{vpn << PAGE_SHIFT:#x}: protection")
            out.append(vma)
        return out

    def write(self, addr: int, data: bytes, *, force: bool = False) -> None:
        """Store *data* at *addr* as the process's CPU would, with its faults and COW.

        ``force=True`` writes like /proc/PID/mem (ptrace access, ignoring PROT_*
        on private areas).  An inaccessible page anywhere in the range raises
        OSError(EFAULT), or OSError(EIO) when forced, and nothing is written.

        In fingerprint mode only whole pages can be written: each page is
        stored as its fingerprint, and a write of part of a page (*addr* or
        ``len(data)`` not a multiple of PAGE_SIZE) raises NotModelledError (no
        bytes are kept to apply it to).
        """
        addr = argcheck.ulong("addr", addr)
        data = argcheck.buffer("data", data)
        force = argcheck.flag("force", force)
        mm = self.mm
        if not data:
            return
        if self.kernel.phys.fingerprint_mode:
            if addr % PAGE_SIZE or len(data) % PAGE_SIZE:
                msg = (f"content='fingerprint' keeps no page bytes, so it can only write whole "
                       f"pages: addr {addr:#x} and length {len(data)} must be multiples of "
                       f"{PAGE_SIZE}")
                raise NotModelledError(msg)
            self._store_pages(addr, [fingerprint(data[i:i + PAGE_SIZE])
                                     for i in range(0, len(data), PAGE_SIZE)], force=force)
            return
        vmas = self._vmas_for(addr, len(data), write=True, force=force)
        memory = self.kernel.memory
        self._check_memory_for_write(addr, len(data), vmas)
        pos = 0
        while pos < len(data):
            a = addr + pos
            page = a & ~(PAGE_SIZE - 1)
            off = a - page
            n = min(PAGE_SIZE - off, len(data) - pos)
            fault = memory.write_page(mm, vmas[(page >> PAGE_SHIFT) - (addr >> PAGE_SHIFT)],
                                      page, off, data[pos:pos + n])
            if fault is Fault.OOM:  # ruled out by the check above
                raise kernel_error(errno.ENOMEM, "out of memory")
            pos += n

    def write_fingerprints(self, addr: int, fps: Iterable[bytes], *,
                           force: bool = False) -> None:
        """Store whole pages given as 16-byte fingerprints at *addr* (fingerprint mode only).

        The same store as :meth:`write` of the pages these are the
        fingerprints of, with the same faults, COW, errors and ``force``;
        *addr* must be page aligned (ValueError).  NotModelledError in byte
        mode (a fingerprint cannot be turned back into bytes); TypeError or
        ValueError for a malformed fingerprint, before anything is written.
        """
        addr = argcheck.ulong("addr", addr)
        if isinstance(fps, bytes | bytearray | memoryview | str) or not isinstance(fps, Iterable):
            msg = (f"fps must be a sequence of fingerprints, not one {type(fps).__name__}: "
                   f"{argcheck.describe(fps)}")
            raise TypeError(msg)
        contents: list[bytes] = []
        for i, fp in enumerate(fps):
            if not isinstance(fp, bytes | bytearray | memoryview):
                msg = (f"fps: fingerprint {i} must be bytes, not {type(fp).__name__}: "
                       f"{argcheck.describe(fp)}")
                raise TypeError(msg)
            fp = bytes(fp)
            if len(fp) != FINGERPRINT_SIZE:
                msg = f"fps: fingerprint {i} is {len(fp)} bytes long, not {FINGERPRINT_SIZE}"
                raise ValueError(msg)
            contents.append(fp)
        force = argcheck.flag("force", force)
        if addr % PAGE_SIZE:
            msg = f"addr {addr:#x} must be a multiple of {PAGE_SIZE}"
            raise ValueError(msg)
        self._check_alive()
        if not self.kernel.phys.fingerprint_mode:
            msg = ("write_fingerprints needs SimKernel(content='fingerprint'); this machine "
                   "keeps page bytes (content='bytes'): use write()")
            raise NotModelledError(msg)
        if contents:
            self._store_pages(addr, contents, force=force)

    def _store_pages(self, addr: int, contents: list[bytes], *, force: bool) -> None:
        """Store whole pages, each given as the content a frame holds, from *addr* on."""
        vmas = self._vmas_for(addr, len(contents) * PAGE_SIZE, write=True, force=force)
        mm, memory = self.mm, self.kernel.memory
        self._check_memory_for_write(addr, len(contents) * PAGE_SIZE, vmas)
        for i, content in enumerate(contents):
            if memory.store_page(mm, vmas[i], addr + i * PAGE_SIZE, content) is Fault.OOM:
                raise kernel_error(errno.ENOMEM, "out of memory")  # ruled out by the check

    def _check_memory_for_write(self, addr: int, length: int, vmas: list[Vma]) -> None:
        """Refuse, before writing anything, a write that would run out of frames."""
        phys = self.kernel.phys
        if phys.max_frames is None:
            return
        mm, memory = self.mm, self.kernel.memory
        first = addr >> PAGE_SHIFT
        need = 0
        # A fault may take a THP (512 frames) if they fit, else a small page: replay
        # the faults' choices in order, with the extents this write fills.
        huge: set[int] = set()
        small: set[int] = set()
        for i, vma in enumerate(vmas):
            vpn = first + i
            extent = vpn & ~(HPAGE_PMD_NR - 1)
            if extent in huge:
                continue
            frame = mm.ptes.get(vpn)
            if frame is None or frame is phys.zero_page:
                if (extent not in small and memory.thp_eligible(mm, vma, vpn)
                        and phys.nr_frames + need + HPAGE_PMD_NR <= phys.max_frames):
                    need += HPAGE_PMD_NR
                    huge.add(extent)
                    continue
                small.add(extent)
                need += 1
            elif not memory.can_write_in_place(vma, frame):
                need += 1
        if phys.nr_frames + need > phys.max_frames:
            raise kernel_error(errno.ENOMEM, "out of memory (max_frames reached)")

    def read(self, addr: int, length: int, *, force: bool = False) -> bytes:
        """Load *length* bytes at *addr* (first touch maps the zero page or page cache).

        NotModelledError in fingerprint mode, which keeps no page bytes (see
        :meth:`fingerprints`).
        """
        addr, length = argcheck.ulong("addr", addr), argcheck.ulong("length", length)
        force = argcheck.flag("force", force)
        mm = self.mm
        if self.kernel.phys.fingerprint_mode:
            msg = ("read() needs page bytes, which SimKernel(content='fingerprint') does not "
                   "keep: use fingerprints()")
            raise NotModelledError(msg)
        if length == 0:
            return b""
        vmas = self._vmas_for(addr, length, write=False, force=force)
        memory = self.kernel.memory
        out = bytearray()
        end = addr + length
        a = addr
        while a < end:
            page = a & ~(PAGE_SIZE - 1)
            fault, data = memory.read_page(mm, vmas[(page >> PAGE_SHIFT) - (addr >> PAGE_SHIFT)],
                                           page)
            if fault is Fault.OOM:
                raise kernel_error(errno.ENOMEM, "out of memory")
            n = min(page + PAGE_SIZE, end) - a
            out += data[a - page:a - page + n]
            a += n
        return bytes(out)

    # --- process lifecycle ------------------------------------------------------------
    def fork(self) -> SimProcess:
        """fork(2): the child shares every anonymous page copy-on-write (:func:`ksmlab.mm.fork.dup_mm`)."""
        k = self.kernel
        child = dup_mm(self.mm, k.new_mm(), k.memory, k.ksm.ksm_fork)
        proc = SimProcess(k, next(k._pids), child)
        k.processes[proc.pid] = proc
        return proc

    def exec(self) -> None:
        """execve(2): a fresh, empty address space; MMF_VM_MERGE_ANY is kept (:mod:`ksmlab.mm.exec`)."""
        old = self.mm
        k = self.kernel
        new = k.new_mm()
        err = bprm_mm_init(new, old, k.ksm.ksm_execve)
        if err:
            raise kernel_error(err, "exec could not register with KSM")
        self._mm = new
        exec_mmap(old, k.memory, k.ksm.ksm_exit)

    def exit(self) -> None:
        """exit(2): the address space goes away (:func:`ksmlab.mm.fork.mmput`); ksmd reaps
        its KSM state later."""
        mm = self.mm
        self._mm = None
        self.kernel.processes.pop(self._pid, None)
        mmput(mm, self.kernel.memory, self.kernel.ksm.ksm_exit)

    # --- /proc ---------------------------------------------------------------------------
    def ksm_stat(self) -> KsmStat:
        """/proc/PID/ksm_stat as a dict."""
        mm = self.mm
        return {
            "ksm_rmap_items": mm.ksm_rmap_items,
            "ksm_zero_pages": mm.ksm_zero_pages,
            "ksm_merging_pages": mm.ksm_merging_pages,
            "ksm_process_profit": ksm_process_profit(mm.ksm_merging_pages, mm.ksm_zero_pages,
                                                     mm.ksm_rmap_items),
            "ksm_merge_any": mm.merge_any,
            "ksm_mergeable": self.kernel.ksm.ksm_process_mergeable(mm),
        }

    def ksm_merging_pages(self) -> int:
        """/proc/PID/ksm_merging_pages."""
        return self.mm.ksm_merging_pages

    def smaps(self) -> list[SmapsEntry]:
        """/proc/PID/smaps, one record per vma."""
        mm = self.mm
        out = []
        for vma in mm.vmas:
            rss = anon = ksm = 0
            # present_vpns: a huge, mostly empty vma costs its pages, not its size.
            for vpn in present_vpns(mm, vma.start, vma.end):
                frame = mm.ptes[vpn]
                if frame.zero:
                    continue  # the zero page is not counted (vm_normal_page is NULL)
                rss += PAGE_SIZE
                if frame.anon:
                    anon += PAGE_SIZE
                if frame.ksm:
                    ksm += PAGE_SIZE
            first, last = vma.start >> PAGE_SHIFT, vma.end >> PAGE_SHIFT
            huge = sum(HPAGE_PMD_SIZE for e in mm.pmds if first <= e < last)
            out.append(SmapsEntry(vma.start, vma.end, vma.perms(), vma.mnemonics(), rss, anon,
                                  ksm, huge))
        return out

    def pfns(self, addr: int, length: int) -> list[int | None]:
        """/proc/PID/pagemap: the frame number of each page, None where nothing is mapped.

        An empty range gives an empty list, as on Linux.  The range must end
        by 2**64 and cover at most :data:`ksmlab.argcheck.MAX_VIEW_PAGES` pages.
        """
        addr, length = argcheck.view_range(addr, length)
        return [f.pfn if f is not None else None for f in self._frames_in(addr, length)]

    def _frames_in(self, addr: int, length: int) -> list[Frame | None]:
        """The frame mapped at each page the range touches (no fault, no protection check)."""
        ptes = self.mm.ptes
        if length == 0:
            return []
        first, last = addr >> PAGE_SHIFT, (addr + length - 1) >> PAGE_SHIFT
        return [ptes.get(v) for v in range(first, last + 1)]

    def fingerprints(self, addr: int, length: int) -> list[bytes | None]:
        """The :func:`~ksmlab.mm.page.fingerprint` of each page of the range, None where
        nothing is mapped (model only; works in both content modes).

        Like :meth:`pfns` it looks at the page tables without faulting
        anything in or checking protections; a range covers every page it
        touches, and an empty range gives an empty list.
        """
        addr, length = argcheck.view_range(addr, length)
        frames = self._frames_in(addr, length)
        if self.kernel.phys.fingerprint_mode:
            return [f.data if f is not None else None for f in frames]
        return [fingerprint(f.data) if f is not None else None for f in frames]


__all__ = ["SimKernel", "SimProcess"]
