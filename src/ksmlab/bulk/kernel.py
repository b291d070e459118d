"""BulkKernel: the bulk engine behind the same calls as SimKernel, for big hosts.

:class:`BulkKernel` models what ksmd does to many processes' anonymous
memory, with its state in numpy columns (about 40 bytes per simulated page
instead of SimKernel's kilobytes) and a vectorised scan.  It offers the part
of the :class:`ksmlab.api.Kernel` interface that such workloads use: spawn,
mmap of anonymous private memory (on a chosen NUMA node), munmap, mprotect,
whole-page writes (as bytes, or as content ids for speed), MADV_MERGEABLE /
MADV_UNMERGEABLE, MADV_HUGEPAGE / MADV_NOHUGEPAGE (transparent huge pages,
:mod:`ksmlab.bulk.thp`), prctl(PR_SET_MEMORY_MERGE / PR_GET_MEMORY_MERGE), fork,
exec, exit, ksm_stat, every file of /sys/kernel/mm/ksm (the scan-time advisor
and ``merge_across_nodes`` included), and ksmd on the same virtual clock and
cost model as SimKernel.  Anything else raises NotModelledError naming the
call; SimKernel remains the reference for the whole interface.
Arguments are checked as :mod:`ksmlab.argcheck` says, like SimKernel's.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from typing import ClassVar, NoReturn, Self

import numpy as np
import numpy.typing as npt

from ksmlab import argcheck
from ksmlab.api import SmapsEntry
from ksmlab.bulk import thp
from ksmlab.bulk.columns import ABSENT, KSM_ZERO, NO_FRAME, STABLE
from ksmlab.bulk.content import NEW_CONTENT, ZERO_CONTENT, ContentTable
from ksmlab.bulk.engine import BulkKsm
from ksmlab.bulk.hooks import KsmHooks
from ksmlab.bulk.mm import BulkMm, Segment
from ksmlab.bulk.vector import VectorKsm
from ksmlab.bulk.writes import checked_writes, name_new_distinct, store_pages
from ksmlab.capabilities import Capability
from ksmlab.constants import (
    MADV_HUGEPAGE,
    MADV_MERGEABLE,
    MADV_NOHUGEPAGE,
    MADV_UNMERGEABLE,
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    PAGE_SHIFT,
    PAGE_SIZE,
    PR_GET_MEMORY_MERGE,
    PR_SET_MEMORY_MERGE,
    PROT_EXEC,
    PROT_READ,
    PROT_WRITE,
    TASK_SIZE,
)
from ksmlab.errors import NotModelledError, ProcessExitedError, kernel_error
from ksmlab.kernel import MAX_NUMNODES
from ksmlab.ksm.cost import KsmdCost, checked_cost
from ksmlab.ksm.counters import ksm_process_profit
from ksmlab.ksm.ksmd import Ksmd
from ksmlab.ksm.sysfs import KsmSysfs
from ksmlab.mm.madvise import UNMODELLED_ADVICE, madvise_behavior_valid, madvise_check
from ksmlab.mm.mmap import PROT_GROWSDOWN, mprotect_args, munmap_end, page_align
from ksmlab.mm.page import fingerprint

UNMODELLED_FILES: dict[str, str] = {}
"""The files of the kernel's /sys/kernel/mm/ksm the bulk engine does not model, and why:
none now.  Reading or writing one would raise NotModelledError; every file answers
as SimKernel's, from the same attribute table (:class:`ksmlab.ksm.sysfs.KsmSysfs`).
"""


class BulkKernel(KsmHooks):
    """A machine simulated by the bulk engine (see the module doc).

    Attributes:
        ksm: the engine's state and algorithm.
        ksmd: ksmd and the virtual clock (the same as SimKernel's).
        contents: content ids of this machine's pages.
        sysfs: /sys/kernel/mm/ksm: SimKernel's table, less :data:`UNMODELLED_FILES`.
        processes: live processes by pid.
        numa_nodes: NUMA nodes (pages are placed with ``mmap(node=)``, as SimKernel's).
    """

    MODELS: ClassVar[frozenset[Capability]] = frozenset({
        Capability.MMAP, Capability.WRITE, Capability.MADV_MERGEABLE,
        Capability.MADV_UNMERGEABLE, Capability.PR_SET_MEMORY_MERGE, Capability.FORK,
        Capability.EXIT, Capability.EXEC, Capability.MUNMAP, Capability.MPROTECT,
        Capability.KSM_STAT, Capability.RUN_UNMERGE, Capability.NUMA, Capability.ADVISOR,
    })
    """What this engine models (:mod:`ksmlab.capabilities`): add a capability here when
    the engine implements it; everything else raises NotModelledError.  The scenario
    pre-flight reads this, and tests/test_preflight.py holds it to what the engine does."""

    def __init__(self, *, vectorize: bool = True, seed: int = 0, numa_nodes: int = 1,
                 cost: KsmdCost | None = None) -> None:
        vectorize = argcheck.flag("vectorize", vectorize)
        seed = argcheck.count("seed", seed)
        numa_nodes = argcheck.count("numa_nodes", numa_nodes, minimum=1, maximum=MAX_NUMNODES)
        cost = checked_cost(cost)
        self.numa_nodes = numa_nodes
        self.contents = ContentTable(seed)
        engine = VectorKsm if vectorize else BulkKsm
        self.ksm: BulkKsm = engine(self.contents, now_ms=lambda: self.ksmd.now_ms(),
                                   cpu_ns=lambda: self.ksmd.cpu_ns, numa_nodes=numa_nodes)
        self.ksm.sync_contents()
        self.ksmd = Ksmd(self.ksm, cost)
        self.ksm.wake_ksmd = self.ksmd.wake_up
        self._next_pid = 1000  # SimKernel's first pid
        self.processes: dict[int, BulkProcess] = {}
        self.sysfs = KsmSysfs(self.ksm, unmodelled=UNMODELLED_FILES)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Nothing to release: the machine is plain memory."""

    @property
    def now_ns(self) -> int:
        """Virtual time, in nanoseconds since boot."""
        return self.ksmd.now_ns

    @property
    def ksmd_cpu_ns(self) -> int:
        """CPU time ksmd has used, by the cost model (the same as SimKernel's)."""
        return self.ksmd.cpu_ns

    @property
    def cow_ksm(self) -> int:
        """vmstat ``cow_ksm``: COW and unshare faults on KSM pages (as SimKernel's)."""
        return self.ksm.cow_ksm

    @property
    def batches(self) -> int:
        """ksmd batches run so far (a batch that scans nothing can still free items)."""
        return self.ksmd.batches

    def counters(self) -> dict[str, int]:
        """The sysfs counters (kept as the state changes: reading them is cheap)."""
        return self.ksm.counters()

    def reserve(self, *, pages: int = 0, frames: int = 0, contents: int = 0) -> None:
        """Allocate room for this many pages, frames and contents up front.

        Optional: tables grow by themselves; reserving avoids the copies (and
        the moment when old and new arrays both exist) on very big machines.
        Frames and contents are numbered by 32-bit ints, so at most 2**31 - 1
        of each (ValueError); MemoryError naming the table if the arrays
        cannot be allocated.
        """
        pages = argcheck.count("pages", pages)
        frames = argcheck.count("frames", frames, maximum=argcheck.INT_MAX)
        contents = argcheck.count("contents", contents, maximum=argcheck.INT_MAX)
        for name, rows, grow in (("pages", pages, self.ksm.pages.reserve),
                                 ("frames", frames, self.ksm.frames.reserve),
                                 ("contents", contents, self.ksm.ctab.reserve),
                                 ("contents", contents, self.contents.reserve)):
            try:
                grow(rows)
            except (MemoryError, ValueError) as e:  # numpy: too big to allocate or to describe
                raise MemoryError(f"cannot reserve {name}={argcheck.describe(rows)}: {e}") from None

    def write_pages(self, pids: Sequence[int] | npt.NDArray[np.int64],
                    addrs: Sequence[int] | npt.NDArray[np.int64],
                    cids: Sequence[int] | npt.NDArray[np.int64]) -> None:
        """Whole-page writes in many processes as one array step: the page at ``addrs[i]``
        of process ``pids[i]`` gets content ``cids[i]``, for each i in order.

        The state afterwards is the one ``processes[pid].write_contents(addr, [cid])``
        for each in turn leaves, faults and copy-on-write included
        (:mod:`ksmlab.bulk.writes`).  The three are flat sequences or arrays of ints
        of one length (TypeError, ValueError); every pid is a live process's, every
        address page aligned and every id one of :attr:`contents` (ValueError); a page
        not mapped, or without PROT_WRITE, is OSError(EFAULT).  Nothing is written unless
        all of it can be.
        """
        rows, ids = checked_writes(self, pids, addrs, cids)
        if len(rows):
            self.ksm.mutations += 1
            if self.ksm.thps or self.ksm.thp_advised:
                # The THP steps of the first writes, before the array step (rules 2, 4).
                thp.cow_split(self.ksm, rows)
                p = np.asarray(pids, dtype=np.int64)
                a = np.asarray(addrs, dtype=np.int64)
                for pid in np.unique(p).tolist():
                    sel = p == pid
                    thp.fault(self.ksm, self.processes[pid].mm, a[sel], rows[sel])
            store_pages(self.ksm, rows, ids)

    def memory_bytes(self) -> int:
        """Bytes held by the engine's arrays (their capacity)."""
        ksm = self.ksm
        return (ksm.pages.nbytes() + ksm.frames.nbytes() + sum(ix.ctab.nbytes() for ix in ksm.trees)
                + ksm.nodes.nbytes() + int(self.contents.checksum.nbytes))

    def spawn(self) -> BulkProcess:
        """A new process with an empty address space."""
        pid = self._next_pid
        self._next_pid += 1
        proc = BulkProcess(self, BulkMm(pid))
        self.processes[pid] = proc
        return proc

    # --- ksmd on the virtual clock (SimKernel's: ksmlab.ksm.ksmd) -----------------------------
    def advance(self, ms: float) -> None:
        """Let *ms* milliseconds of virtual time pass, running ksmd as it would (see SimKernel)."""
        self.ksmd.advance(ms)

    def batch(self) -> bool:
        """Run ksmd's next batch at once (after its sleep); False if ksmd is blocked."""
        return self.ksmd.batch()

    def wait_full_scans(self, n: int = 1, *, timeout: float | None = None) -> None:
        """Advance virtual time until ``full_scans`` has grown by *n* (see SimKernel)."""
        self.ksmd.wait_full_scans(n, timeout=timeout)


def _int_array(values: Sequence[object]) -> npt.NDArray[np.int64] | None:
    """*values* as an int64 array if they are all ints (numpy's or Python's, no bools)."""
    if not values:
        return np.zeros(0, np.int64)
    try:
        arr = np.asarray(values)
    except (ValueError, TypeError, OverflowError):
        return None
    if arr.ndim != 1 or arr.dtype.kind not in "iu" or any(isinstance(x, bool | np.bool_)
                                                          for x in values):
        return None
    return arr.astype(np.int64) if arr.dtype.kind == "i" else None


class BulkProcess:
    """A process of a :class:`BulkKernel`."""

    def __init__(self, kernel: BulkKernel, mm: BulkMm) -> None:
        self.kernel = kernel
        self.mm = mm
        self.alive = True

    def __repr__(self) -> str:
        return f"<BulkProcess {self.pid}{'' if self.alive else ' exited'}>"

    @property
    def pid(self) -> int:
        """The process id."""
        return self.mm.id

    def _check_alive(self) -> None:
        if not self.alive:
            raise ProcessExitedError(f"process {self.pid} has exited")

    def _unmodelled(self, call: str, why: str = "see docs/bulk.md") -> NoReturn:
        raise NotModelledError(f"{call} is not modelled by the bulk engine ({why}); "
                               f"use SimKernel")

    # --- mappings and writes --------------------------------------------------------------------
    def mmap(self, length: int, prot: int = PROT_READ | PROT_WRITE,
             flags: int = MAP_PRIVATE | MAP_ANONYMOUS, *, addr: int = 0,
             node: int | None = None, path: str | None = None, offset: int = 0,
             vm_flags: int = 0) -> int:
        """Map *length* bytes of anonymous private memory, top-down like SimKernel.

        Only read-write anonymous private mappings placed by the kernel
        (``addr=0``) are modelled; their pages are allocated on NUMA node
        *node* (None: node 0), which must exist (ValueError, as SimKernel);
        ``offset`` is checked and ignored, as Linux does for them.  Anything
        else is NotModelledError; errnos are SimKernel's.
        """
        k = self.kernel
        args = argcheck.mmap_args(length, prot, flags, addr, node, path, offset, vm_flags,
                                  lambda: range(k.numa_nodes))
        self._check_alive()
        if (args.prot != PROT_READ | PROT_WRITE or args.flags != MAP_PRIVATE | MAP_ANONYMOUS
                or args.addr or args.path is not None or args.vm_flags):
            self._unmodelled(f"mmap(prot={args.prot:#x}, flags={args.flags:#x}, "
                             f"addr={args.addr:#x}, path={args.path!r}, "
                             f"vm_flags={args.vm_flags:#x})",
                             "only read-write anonymous private mappings, mmap(length), are")
        # do_mmap's checks, in SimKernel's order.
        if args.length == 0:
            raise kernel_error(errno.EINVAL, "mmap length 0")
        if args.offset % PAGE_SIZE:
            raise kernel_error(errno.EINVAL, f"mmap offset {args.offset:#x} not page aligned")
        size = page_align(args.length)
        if size > TASK_SIZE:
            raise kernel_error(errno.ENOMEM, f"mmap length {args.length:#x}")
        start = self.mm.unmapped_area(size)  # SimKernel's placement: gaps are reused
        new = self.mm.map_area(start, size >> PAGE_SHIFT, self._new_rows)
        self.kernel.ksm.mutations += 1
        pages = self.kernel.ksm.pages
        mergeable = self.kernel.ksm_vma_flags(self.mm)
        for row, n in new:  # fresh rows and rows taken over from ghosts alike
            sl = slice(row, row + n)
            pages.mergeable[sl] = mergeable
            if self.kernel.numa_nodes > 1:
                pages.nid[sl] = args.node or 0
        return start

    def _new_rows(self, n: int) -> int:
        """*n* fresh page rows (the first); OSError(ENOMEM), changing nothing, if numpy
        cannot allocate them."""
        try:
            return self.kernel.ksm.pages.append(n)
        except (MemoryError, ValueError):
            raise kernel_error(errno.ENOMEM, f"no memory for {n} page rows "
                               f"in the bulk engine") from None

    def munmap(self, addr: int, length: int) -> None:
        """munmap(2), with SimKernel's checks and errnos (``do_vmi_munmap``).

        The pages go at once (frames' mapcounts drop, a KSM page mapped
        nowhere else is freed, KSM zero pages stop counting); their
        rmap_items stay, as on Linux, until ksmd's walk passes their
        addresses (see :mod:`ksmlab.bulk.mm`).  Model choice:
        ``vm.max_map_count`` is not modelled (the engine keeps no vmas), so
        no split fails with ENOMEM.
        """
        addr, length = argcheck.ulong("addr", addr), argcheck.ulong("length", length)
        self._check_alive()
        end = munmap_end(addr, length)
        ksm = self.kernel.ksm
        if self.mm.pieces(addr, end)[0]:
            for at in (addr, end):  # rule 5: a boundary inside an extent splits its PMD
                thp.split_pmd_at(ksm, self.mm, at)
        gone = self.mm.unmap(addr, end)
        if not gone:
            return
        ksm.mutations += 1
        pages = ksm.pages
        for seg in gone:
            sl = slice(seg.row, seg.row + seg.pages)
            ksm.unmap(pages.frame[sl])
            ksm.tally.zero_mapped(pages.frame[sl], -1)
            pages.frame[sl] = NO_FRAME
            pages.mergeable[sl] = False
            pages.thp[sl] = 0  # a new mapping here starts without THP bits
            if bool((pages.state[sl] != ABSENT).any()):
                self.mm.add_ghost(seg)

    def mprotect(self, addr: int, length: int, prot: int) -> None:
        """mprotect(2), with SimKernel's checks and errnos (``do_mprotect_pkey``).

        KSM sees no change (it never makes a KSM page writable, nor unmerges
        one); a write to a page without PROT_WRITE is EFAULT unless forced.
        As on Linux, over a hole the mapped part before it is changed, then
        OSError(ENOMEM) is raised.  No mapping here grows down, so
        PROT_GROWSDOWN and PROT_GROWSUP are EINVAL on a mapped start.
        """
        addr, length = argcheck.ulong("addr", addr), argcheck.ulong("length", length)
        prot = argcheck.cint("prot", prot)
        self._check_alive()
        checked = mprotect_args(addr, length, prot)
        if checked is None:
            return
        end, bits, grows = checked
        mm = self.mm
        pieces, _hole = mm.pieces(addr, end)
        if not pieces:
            raise kernel_error(errno.ENOMEM, f"{addr:#x} is not mapped")
        if grows == PROT_GROWSDOWN:
            raise kernel_error(errno.EINVAL, "PROT_GROWSDOWN on an area that does not grow")
        if pieces[0][0] > addr:
            raise kernel_error(errno.ENOMEM, f"{addr:#x} is not mapped")
        if grows:
            raise kernel_error(errno.EINVAL, "PROT_GROWSUP: x86-64 has no VM_GROWSUP area")
        stop = mm.mapped_from(addr, end)
        new_prot = bits & (PROT_READ | PROT_WRITE | PROT_EXEC)
        for at in (addr, stop):  # rule 5, where the vma there changes (and so is split)
            edge = at if at == addr else at - PAGE_SIZE
            seg = next((s for s in mm.segments if s.addr <= edge < s.end), None)
            if seg is not None and seg.prot != new_prot:
                thp.split_pmd_at(self.kernel.ksm, mm, at)
        mm.protect(addr, stop, new_prot)
        if stop < end:
            raise kernel_error(errno.ENOMEM, f"{stop:#x} is not mapped")

    def _rows(self, addr: int, length: int) -> npt.NDArray[np.int64]:
        pieces = self.mm.rows(addr, length)
        if len(pieces) == 1:
            r, _i, n = pieces[0]
            return np.arange(r, r + n, dtype=np.int64)
        return np.concatenate([np.arange(r, r + n, dtype=np.int64) for r, _i, n in pieces])

    def _check_access(self, addr: int, length: int, force: bool) -> None:
        """OSError(EFAULT), or EIO when forced, unless [addr, addr+length) is all mapped
        and writable, as SimKernel's write: a forced write (/proc/PID/mem) needs only
        a private mapping, which every mapping here is."""
        if not self.mm.all_have(addr & ~(PAGE_SIZE - 1), page_align(addr + length),
                                0 if force else PROT_WRITE):
            what = "mapped" if force else "mapped and writable"
            raise kernel_error(errno.EIO if force else errno.EFAULT,
                               f"[{addr:#x}, {addr + length:#x}) is not all {what}")

    def write(self, addr: int, data: bytes, *, force: bool = False) -> None:
        """Store whole pages of *data* at *addr* (their content is fingerprinted).

        As SimKernel's write in fingerprint mode: a write of part of a page is
        NotModelledError; an unmapped page in the range is OSError(EFAULT), or
        OSError(EIO) with ``force=True``, and so is a page without PROT_WRITE
        unless forced (/proc/PID/mem writes to any private mapping); nothing
        is written then.
        """
        addr = argcheck.ulong("addr", addr)
        data = argcheck.buffer("data", data)
        force = argcheck.flag("force", force)
        self._check_alive()
        if not data:
            return
        if addr % PAGE_SIZE or len(data) % PAGE_SIZE:
            self._unmodelled(f"a write of part of a page (addr {addr:#x}, {len(data)} bytes)",
                             "it keeps no page bytes, so it writes whole pages only")
        self._check_access(addr, len(data), force)
        self.kernel.ksm.mutations += 1
        if len(data) == PAGE_SIZE:  # the common case of a COW storm, without arrays
            rows = self._rows(addr, PAGE_SIZE)
            self._thp_first(addr, rows)
            cid = self.kernel.contents.intern(fingerprint(data))
            self.kernel.ksm.sync_contents()
            self._write_one(int(rows[0]), cid)
            return
        ids = self.kernel.contents.of_pages(data)
        self._store(addr, np.asarray(ids, dtype=np.int64))

    def write_contents(self, addr: int, ids: Sequence[int] | npt.NDArray[np.int64]) -> None:
        """Store pages of the given content ids at *addr*, with the faults and COW of a write.

        *addr* must be page aligned (ValueError) and *ids* a flat sequence or
        integer array (TypeError) of ids of this kernel's ContentTable, or
        :data:`~ksmlab.bulk.content.NEW_CONTENT` for new random data
        (ValueError otherwise).  An unmapped page or one without PROT_WRITE in the range is
        OSError(EFAULT), and nothing is written then.
        """
        addr = argcheck.ulong("addr", addr)
        cids = self._content_ids_arg(ids)
        if addr % PAGE_SIZE:
            raise ValueError(f"addr {addr:#x} must be a multiple of {PAGE_SIZE}")
        self._check_alive()
        if not len(cids):
            return
        self._check_access(addr, len(cids) * PAGE_SIZE, False)
        self.kernel.ksm.mutations += 1
        self._store(addr, cids)

    def _content_ids_arg(self, ids: object) -> npt.NDArray[np.int64]:
        """*ids* checked: TypeError unless a flat sequence of ints, ValueError for an unknown id."""
        def bad(what: str) -> TypeError:
            return TypeError(f"ids must be a flat sequence of content ids (ints), not {what}: "
                             f"{argcheck.describe(ids)}")
        if isinstance(ids, np.ndarray):
            if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
                raise bad(f"a {ids.ndim}-dimensional array of {ids.dtype}")
            arr: npt.NDArray[np.int64] | list[int] = ids
        else:
            if isinstance(ids, str | bytes | bytearray | memoryview) or not isinstance(ids, Sequence):
                raise bad(type(ids).__name__)
            fast = _int_array(ids)
            if fast is not None:
                arr = fast
            else:  # not plainly int64s: check each, to name the culprit
                arr = []
                for i, x in enumerate(ids):
                    try:
                        arr.append(argcheck.integer("ids", x))
                    except TypeError:
                        raise bad(f"one holding {type(x).__name__} {argcheck.describe(x)} "
                                  f"at index {i}") from None
        n = len(self.kernel.contents)
        lo, hi = ((int(arr.min()), int(arr.max())) if isinstance(arr, np.ndarray)
                  else (min(arr), max(arr))) if len(arr) else (0, 0)
        if lo < NEW_CONTENT or hi >= n:
            raise ValueError(f"ids must be content ids of this kernel's ContentTable (0 <= id < {n}), "
                             f"or NEW_CONTENT ({NEW_CONTENT}), got {argcheck.describe(ids)}")
        return np.asarray(arr, dtype=np.int64)

    def _thp_first(self, addr: int, rows: npt.NDArray[np.int64]) -> None:
        """The THP steps of writes at *rows* (from *addr*): COW of a fork-shared THP splits
        the writer's PMD (rule 4); a fault in a VM_HUGEPAGE extent allocates a THP (rule 2)."""
        ksm = self.kernel.ksm
        if ksm.thps or ksm.thp_advised:
            thp.cow_split(ksm, rows)
            thp.fault(ksm, self.mm, addr + (np.arange(len(rows), dtype=np.int64) << PAGE_SHIFT),
                      rows)

    def _store(self, addr: int, cids: npt.NDArray[np.int64]) -> None:
        """Write pages of content *cids* at *addr* (checked: aligned, mapped, known ids)."""
        ksm = self.kernel.ksm
        if ksm.thps or ksm.thp_advised:
            self._thp_first(addr, self._rows(addr, len(cids) * PAGE_SIZE))
        new = cids < 0  # NEW_CONTENT: named as it is written
        if bool(new.any()) and (len(cids) == 1 or bool(ksm.contents.unique[cids[~new]].any())):
            store_pages(ksm, self._rows(addr, len(cids) * PAGE_SIZE), cids)
            return
        ksm.contents.unique[cids[~new]] = False  # held by these pages now too
        ksm.sync_contents()
        if len(cids) == 1:
            self._write_one(int(self._rows(addr, PAGE_SIZE)[0]), int(cids[0]))
            return
        rows = self._rows(addr, len(cids) * PAGE_SIZE)
        frames = ksm.pages.frame[rows]
        ok = frames >= 0
        in_place = np.zeros(len(rows), bool)
        in_place[ok] = (ksm.frames.knode[frames[ok]] < 0) & (ksm.frames.mapcount[frames[ok]] == 1)
        cids = name_new_distinct(ksm, frames.astype(np.int64), in_place, cids)
        ksm.frames.content[frames[in_place]] = cids[in_place]
        copy = ~in_place
        ksm.cow_ksm += int(np.count_nonzero(ksm.frames.knode[frames[ok]] >= 0))
        ksm.tally.zero_mapped(frames, -1)
        ksm.unmap(frames[copy])
        ksm.pages.frame[rows[copy]] = ksm.new_frames(cids[copy], rows[copy])

    def _write_one(self, row: int, cid: int) -> None:
        """_store for one page, without array overheads (a COW storm is many of these)."""
        ksm = self.kernel.ksm
        frames = ksm.frames
        ksm.contents.unique[cid] = False  # held by this page now too
        f = int(ksm.pages.frame[row])
        if f >= 0:
            knode = int(frames.knode[f])
            if knode < 0 and frames.mapcount[f] == 1:
                frames.content[f] = cid  # an exclusive ordinary page is written in place
                return
            frames.mapcount[f] -= 1
            if knode >= 0:
                ksm.cow_ksm += 1
                if frames.mapcount[f] == 0:
                    ksm.reopen([knode])
        elif f == KSM_ZERO:
            ksm.tally.zero_pages -= 1
        new = frames.append(1)
        frames.content[new] = cid
        frames.mapcount[new] = 1
        if ksm.numa_nodes > 1:
            frames.nid[new] = ksm.pages.nid[row]  # the mapping's node, as a fault allocates
        ksm.pages.frame[row] = new

    def madvise(self, addr: int, length: int, advice: int) -> None:
        """MADV_MERGEABLE, MADV_UNMERGEABLE, MADV_HUGEPAGE or MADV_NOHUGEPAGE, with
        madvise(2)'s checks and errnos (the last two set the vma's THP bits only; a
        vma boundary this makes inside a PMD-mapped extent splits that PMD).

        Other advices Linux knows are NotModelledError; unknown ones EINVAL.
        As on Linux, the mapped parts of a range with holes are advised, then
        OSError(ENOMEM) is raised.
        """
        addr, length = argcheck.ulong("addr", addr), argcheck.ulong("length", length)
        advice = argcheck.cint("advice", advice)
        self._check_alive()
        known = madvise_behavior_valid(advice, True) or advice in UNMODELLED_ADVICE
        if known and advice not in (MADV_MERGEABLE, MADV_UNMERGEABLE, MADV_HUGEPAGE,
                                    MADV_NOHUGEPAGE):
            self._unmodelled(f"madvise advice {advice}",
                             "only MADV_MERGEABLE, MADV_UNMERGEABLE, MADV_HUGEPAGE and "
                             "MADV_NOHUGEPAGE are")
        end = madvise_check(addr, length, advice, config_ksm=True)
        if end == addr:
            return
        pieces, hole = self.mm.pieces(addr, end)
        if pieces:
            self.kernel.ksm.mutations += 1
            rows = np.concatenate([np.arange(r, r + n, dtype=np.int64) for _a, r, n in pieces])
            ksm = self.kernel.ksm
            if ksm.thps:  # rule 5: a vma whose flags change is split at the range's ends
                for at, row in ((pieces[0][0], pieces[0][1]),
                                (pieces[-1][0] + (pieces[-1][2] << PAGE_SHIFT),
                                 pieces[-1][1] + pieces[-1][2] - 1)):
                    if self._advice_changes(row, advice):
                        thp.split_pmd_at(ksm, self.mm, at)
            if advice in (MADV_HUGEPAGE, MADV_NOHUGEPAGE):
                on, off = ((thp.THP_HUGE, thp.THP_NOHUGE) if advice == MADV_HUGEPAGE
                           else (thp.THP_NOHUGE, thp.THP_HUGE))
                ksm.pages.thp[rows] = (ksm.pages.thp[rows] | on) & (0xFF ^ off)
                ksm.thp_advised = True
            else:
                self._advise(rows, advice)
        if hole:
            raise kernel_error(errno.ENOMEM, f"part of [{addr:#x}, {end:#x}) is not mapped")

    def _advice_changes(self, row: int, advice: int) -> bool:
        """Whether *advice* changes the flags of the vma holding page *row* (else the kernel
        leaves the vma whole: ``madvise_update_vma`` with equal flags)."""
        pages = self.kernel.ksm.pages
        bits = int(pages.thp[row])
        if advice == MADV_HUGEPAGE:
            return bits & (thp.THP_HUGE | thp.THP_NOHUGE) != thp.THP_HUGE
        if advice == MADV_NOHUGEPAGE:
            return bits & (thp.THP_HUGE | thp.THP_NOHUGE) != thp.THP_NOHUGE
        return bool(pages.mergeable[row]) != (advice == MADV_MERGEABLE)

    def _advise(self, rows: npt.NDArray[np.int64], advice: int) -> None:
        """Apply MADV_MERGEABLE or MADV_UNMERGEABLE to the pages at *rows*."""
        k, ksm = self.kernel, self.kernel.ksm
        if advice == MADV_MERGEABLE:
            if not bool(ksm.pages.mergeable[rows].all()):
                if not self.mm.registered:
                    k.ksm_enter(self.mm)
                ksm.pages.mergeable[rows] = True
            return
        rows = rows[ksm.pages.mergeable[rows]]
        ksm.break_ksm(rows)
        ksm.pages.mergeable[rows] = False

    def prctl(self, option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0,
              arg5: int = 0) -> int:
        """prctl(2) for PR_SET_MEMORY_MERGE / PR_GET_MEMORY_MERGE, with SimKernel's checks
        and errnos: a non-zero unused argument is EINVAL, other options too."""
        option = argcheck.cint("option", option)
        arg2, arg3, arg4, arg5 = (argcheck.ulong(name, v) for name, v in
                                  (("arg2", arg2), ("arg3", arg3), ("arg4", arg4),
                                   ("arg5", arg5)))
        self._check_alive()
        if option not in (PR_SET_MEMORY_MERGE, PR_GET_MEMORY_MERGE):
            raise kernel_error(errno.EINVAL, f"prctl option {option}")
        if option == PR_SET_MEMORY_MERGE:
            if arg3 or arg4 or arg5:
                raise kernel_error(errno.EINVAL, "PR_SET_MEMORY_MERGE takes one argument")
            k = self.kernel
            (k.ksm_enable_merge_any if arg2 else k.ksm_disable_merge_any)(self.mm)
            return 0
        if arg2 or arg3 or arg4 or arg5:
            raise kernel_error(errno.EINVAL, "PR_GET_MEMORY_MERGE takes no argument")
        return int(self.mm.merge_any)

    # --- process lifecycle ----------------------------------------------------------------------
    def fork(self) -> BulkProcess:
        """fork(2): the child shares every page copy-on-write, keeps merge-any and each
        mapping's mergeable mark, and is registered if the parent is."""
        self._check_alive()
        self.kernel.ksm.mutations += 1
        k, ksm = self.kernel, self.kernel.ksm
        child = k.spawn()
        child.mm.mmap_base = self.mm.mmap_base
        child.mm.merge_any = self.mm.merge_any  # MMF_INIT_MASK
        for seg in self.mm.segments:
            row = ksm.pages.append(seg.pages)
            src = ksm.pages.frame[seg.row:seg.row + seg.pages]
            ksm.pages.frame[row:row + seg.pages] = src
            ksm.pages.mergeable[row:row + seg.pages] = ksm.pages.mergeable[seg.row:seg.row
                                                                           + seg.pages]
            # The child's vmas keep VM_(NO)HUGEPAGE and copy_huge_pmd keeps each PMD mapping.
            ksm.pages.thp[row:row + seg.pages] = ksm.pages.thp[seg.row:seg.row + seg.pages]
            if ksm.numa_nodes > 1:  # the child's mapping keeps the parent's policy
                ksm.pages.nid[row:row + seg.pages] = ksm.pages.nid[seg.row:seg.row + seg.pages]
            np.add.at(ksm.frames.mapcount, src[src >= 0], 1)
            ksm.tally.zero_mapped(src)
            child.mm.segments.append(Segment(seg.addr, row, seg.pages, seg.prot))
        if self.mm.registered:
            k.ksm_enter(child.mm)
        return child

    def exec(self) -> None:
        """execve(2): a fresh, empty address space that keeps merge-any (and is registered
        with ksmd if it is on, ``ksm_execve``); the old one goes as at exit."""
        self._check_alive()
        k, old = self.kernel, self.mm
        new = BulkMm(self.pid)
        new.merge_any = old.merge_any  # MMF_INIT_MASK
        k.ksm_execve(new)
        self.mm = new
        k.mmput(old)

    def exit(self) -> None:
        """exit(2): KSM's exit hook, then the address space goes."""
        self._check_alive()
        self.alive = False
        self.kernel.mmput(self.mm)
        del self.kernel.processes[self.pid]

    # --- views ------------------------------------------------------------------------------------
    def content_ids(self, addr: int, length: int) -> list[int | None]:
        """The content id of each page the range touches; None where nothing is mapped
        (``KSM_ZERO`` pages hold the zero content).  Like SimKernel's
        ``fingerprints``: the range ends by 2**64 and covers at most
        :data:`ksmlab.argcheck.MAX_VIEW_PAGES` pages; an empty range gives []."""
        addr, length = argcheck.view_range(addr, length)
        self._check_alive()
        if length == 0:
            return []
        first = addr & ~(PAGE_SIZE - 1)
        out: list[int | None] = [None] * (((addr + length - 1) >> PAGE_SHIFT)
                                         - (first >> PAGE_SHIFT) + 1)
        pieces, _hole = self.mm.pieces(first, page_align(addr + length))
        frames = self.kernel.ksm.frames
        page_frames = self.kernel.ksm.pages.frame
        for at, row, n in pieces:
            i = (at - first) >> PAGE_SHIFT
            out[i:i + n] = [None if f == NO_FRAME else ZERO_CONTENT if f == KSM_ZERO
                            else int(frames.content[f]) for f in page_frames[row:row + n].tolist()]
        return out

    def ksm_stat(self) -> dict[str, int | bool]:
        """``/proc/PID/ksm_stat``."""
        self._check_alive()
        ksm = self.kernel.ksm
        items = merging = zero = 0
        for seg in self.mm.ranges():
            sl = slice(seg.row, seg.row + seg.pages)
            state = ksm.pages.state[sl]
            items += int(np.count_nonzero(state))
            st = state == STABLE
            merging += int(np.count_nonzero(ksm.nodes.alive[ksm.pages.head[sl][st]]))
            zero += int(np.count_nonzero(ksm.pages.frame[sl] == KSM_ZERO))
        return {"ksm_rmap_items": items, "ksm_zero_pages": zero, "ksm_merging_pages": merging,
                "ksm_process_profit": ksm_process_profit(merging, zero, items),
                "ksm_merge_any": self.mm.merge_any, "ksm_mergeable": ksm.has_mergeable(self.mm)}

    def ksm_merging_pages(self) -> int:
        """``/proc/PID/ksm_merging_pages``."""
        return int(self.ksm_stat()["ksm_merging_pages"])

    # --- the calls the engine does not model: checked like SimKernel's, then NotModelledError ---

    def read(self, addr: int, length: int, *, force: bool = False) -> bytes:
        """Not modelled (no page bytes are kept): NotModelledError; see :meth:`content_ids`."""
        argcheck.ulong("addr", addr), argcheck.ulong("length", length)
        argcheck.flag("force", force)
        self._check_alive()
        self._unmodelled("read", "it keeps no page bytes; see content_ids()")

    def smaps(self) -> list[SmapsEntry]:
        """Not modelled (the engine keeps no vmas): NotModelledError."""
        self._check_alive()
        self._unmodelled("smaps", "it keeps no vmas")

    def pfns(self, addr: int, length: int) -> list[int | None]:
        """Not modelled (frames have no numbers): NotModelledError; see :meth:`content_ids`."""
        argcheck.view_range(addr, length)
        self._check_alive()
        self._unmodelled("pfns", "its frames have no numbers; see content_ids()")
