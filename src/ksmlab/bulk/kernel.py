"""BulkKernel: the bulk engine behind the same calls as SimKernel, for big hosts.

:class:`BulkKernel` models what ksmd does to many processes' anonymous
memory, with its state in numpy columns (about 30 bytes per simulated page
instead of SimKernel's kilobytes) and a vectorised scan.  It offers the part
of the :class:`ksmlab.api.Kernel` interface that such workloads use: spawn,
mmap of anonymous private memory, whole-page writes (as bytes, or as content
ids for speed), MADV_MERGEABLE / MADV_UNMERGEABLE, fork, exit, ksm_stat, the
sysfs files of the knobs and counters it models, and ksmd on the same virtual
clock and cost model as SimKernel.  Anything else raises a clear error
naming the call; SimKernel remains the reference for the whole interface.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator, Sequence
from typing import Self

import numpy as np
import numpy.typing as npt

from ksmlab.bulk.columns import ABSENT, KSM_ZERO, NO_FRAME, STABLE
from ksmlab.bulk.content import ZERO_CONTENT, ContentTable
from ksmlab.bulk.engine import BulkKsm
from ksmlab.bulk.mm import BulkMm, Segment
from ksmlab.bulk.vector import VectorKsm
from ksmlab.constants import (
    MADV_MERGEABLE,
    MADV_UNMERGEABLE,
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    PAGE_SHIFT,
    PAGE_SIZE,
    PROT_READ,
    PROT_WRITE,
    RMAP_ITEM_SIZE,
)
from ksmlab.errors import ProcessExitedError, ScanStalledError, kernel_error
from ksmlab.ksm.sysfs import ParseError, kstrtobool, kstrtoint, kstrtouint
from ksmlab.mm.page import fingerprint

NS_PER_MS = 1_000_000

_WRITABLE = ("run", "pages_to_scan", "sleep_millisecs", "max_page_sharing", "smart_scan",
             "use_zero_pages", "stable_node_chains_prune_millisecs", "merge_across_nodes")
_COUNTERS = ("pages_scanned", "pages_shared", "pages_sharing", "pages_unshared",
             "pages_volatile", "pages_skipped", "ksm_zero_pages", "full_scans",
             "stable_node_chains", "stable_node_dups", "general_profit")


class BulkSysfs:
    """The /sys/kernel/mm/ksm files the bulk engine models: text in, text out."""

    def __init__(self, kernel: BulkKernel) -> None:
        self._k = kernel

    def __iter__(self) -> Iterator[str]:
        return iter(_WRITABLE + _COUNTERS)

    def __contains__(self, name: object) -> bool:
        return name in _WRITABLE or name in _COUNTERS

    def __getitem__(self, name: str) -> str:
        ksm = self._k.ksm
        if name in _COUNTERS:
            return str(self._k.counters()[name])
        if name == "merge_across_nodes":
            return "1"
        if name in _WRITABLE:
            return str(int(getattr(ksm, name)))
        raise KeyError(f"{name!r} is not a KSM sysfs file the bulk engine models")

    def __setitem__(self, name: str, value: str) -> None:
        ksm = self._k.ksm
        self._k.changes += 1
        if name in _COUNTERS:
            raise kernel_error(errno.EACCES, f"{name} is read-only")
        if name not in _WRITABLE:
            raise KeyError(f"{name!r} is not a KSM sysfs file the bulk engine models")
        try:
            if name in ("smart_scan", "use_zero_pages"):
                parsed = int(kstrtobool(value))
            elif name == "max_page_sharing":
                parsed = kstrtoint(value)
            else:
                parsed = kstrtouint(value)
        except ParseError:
            raise kernel_error(errno.EINVAL, f"{name}={value!r}") from None
        if name == "run":
            if parsed > 2:
                raise kernel_error(errno.EINVAL, f"run={parsed}")
            if parsed == 2:
                raise NotImplementedError("run=2 (unmerge everything) is not modelled by "
                                          "the bulk engine; use SimKernel")
            ksm.run = parsed
            if parsed:
                self._k.wake_ksmd()
        elif name == "merge_across_nodes":
            if parsed > 1:
                raise kernel_error(errno.EINVAL, f"merge_across_nodes={parsed}")
            if parsed != 1:
                raise NotImplementedError("the bulk engine models one NUMA node "
                                          "(merge_across_nodes=1 only)")
        elif name == "max_page_sharing":
            if parsed < 2:
                raise kernel_error(errno.EINVAL, f"max_page_sharing={parsed}")
            if parsed != ksm.max_page_sharing:
                if bool(ksm.nodes.alive[:ksm.nodes.n].any()):
                    # Model choice: any stable node counts as busy (the kernel
                    # first removes nodes whose pages are no longer mapped).
                    raise kernel_error(errno.EBUSY, "KSM pages exist")
                ksm.max_page_sharing = parsed
        elif name == "sleep_millisecs":
            ksm.sleep_millisecs = parsed
            self._k.wake_ksmd()
        elif name in ("smart_scan", "use_zero_pages"):
            setattr(ksm, name, bool(parsed))
        else:
            setattr(ksm, name, parsed)


class BulkKernel:
    """A machine simulated by the bulk engine (see the module doc).

    Attributes:
        ksm: the engine's state and algorithm.
        contents: content ids of this machine's pages.
        now_ns: virtual time.
        ksmd_cpu_ns: ksmd's CPU time by the cost model (the same as SimKernel's).
        processes: live processes by pid.
    """

    def __init__(self, *, vectorize: bool = True, seed: int = 0, ksmd_batch_ns: int = 2000,
                 ksmd_page_ns: int = 3000) -> None:
        self.contents = ContentTable(seed)
        self.ksm: BulkKsm = VectorKsm(self.contents) if vectorize else BulkKsm(self.contents)
        self.ksm.sync_contents()
        self.now_ns = 0
        self.ksmd_cpu_ns = 0
        self.ksmd_batch_ns = ksmd_batch_ns
        self.ksmd_page_ns = ksmd_page_ns
        self._wake_ns: int | None = None
        self._next_pid = 1000  # SimKernel's first pid
        self.processes: dict[int, BulkProcess] = {}
        self.sysfs = BulkSysfs(self)
        self.changes = 0
        """Bumped by every call that can change the counters outside ksmd's batches."""
        self.batches = 0
        """ksmd batches run so far (a batch that scans nothing can still free items)."""
        self._counters: tuple[tuple[int, int], dict[str, int]] | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Nothing to release: the machine is plain memory."""

    def counters(self) -> dict[str, int]:
        """The sysfs counters, counted once per state (a report reads many at a time)."""
        key = (self.changes, self.batches)
        if self._counters is None or self._counters[0] != key:
            self._counters = (key, self.ksm.counters())
        return self._counters[1]

    def reserve(self, *, pages: int = 0, frames: int = 0, contents: int = 0) -> None:
        """Allocate room for this many pages, frames and contents up front.

        Optional: tables grow by themselves; reserving avoids the copies (and
        the moment when old and new arrays both exist) on very big machines.
        """
        for table, rows in ((self.ksm.pages, pages), (self.ksm.frames, frames),
                            (self.ksm.ctab, contents)):
            table.reserve(rows)
        self.contents.reserve(contents)

    def memory_bytes(self) -> int:
        """Bytes held by the engine's arrays (their capacity)."""
        ksm = self.ksm
        return (ksm.pages.nbytes() + ksm.frames.nbytes() + ksm.ctab.nbytes()
                + ksm.nodes.nbytes() + int(self.contents.checksum.nbytes))

    def spawn(self) -> BulkProcess:
        """A new process with an empty address space."""
        pid = self._next_pid
        self._next_pid += 1
        proc = BulkProcess(self, BulkMm(pid))
        self.processes[pid] = proc
        return proc

    # --- ksmd on the virtual clock (as SimKernel) ---------------------------------------------
    def wake_ksmd(self) -> None:
        """Make ksmd run its next batch now."""
        self._wake_ns = self.now_ns

    def _ksmd_next(self) -> int | None:
        if not (self.ksm.run == 1 and not self.ksm.list_empty()):
            self._wake_ns = None
            return None
        if self._wake_ns is None:
            self._wake_ns = self.now_ns
        return self._wake_ns

    def _ksmd_batch(self) -> None:
        assert self._wake_ns is not None
        self.now_ns = max(self.now_ns, self._wake_ns)
        self.batches += 1
        self.ksm.now_ms = self.now_ns / NS_PER_MS
        scanned = self.ksm.ksm_do_scan(self.ksm.pages_to_scan)
        cost = self.ksmd_batch_ns + scanned * self.ksmd_page_ns
        self.ksmd_cpu_ns += cost
        self.now_ns += cost
        self._wake_ns = self.now_ns + self.ksm.sleep_millisecs * NS_PER_MS

    def advance(self, ms: float) -> None:
        """Let *ms* milliseconds of virtual time pass, running ksmd as it would."""
        if ms < 0:
            raise ValueError(f"cannot advance by a negative time: {ms} ms")
        target = self.now_ns + round(ms * NS_PER_MS)
        while (wake := self._ksmd_next()) is not None and wake <= target:
            self._ksmd_batch()
        self.now_ns = max(self.now_ns, target)

    def batch(self) -> bool:
        """Run ksmd's next batch at once (after its sleep); False if ksmd is blocked."""
        if self._ksmd_next() is None:
            return False
        self._ksmd_batch()
        return True

    def wait_full_scans(self, n: int = 1, *, timeout: float | None = None) -> None:
        """Advance virtual time until ``full_scans`` has grown by *n* (see SimKernel)."""
        if n < 0:
            raise ValueError(f"n must not be negative, got {n}")
        target = self.ksm.full_scans + n
        deadline = None if timeout is None else self.now_ns + round(timeout * 1e9)
        while self.ksm.full_scans < target:
            wake = self._ksmd_next()
            if wake is None or self.ksm.pages_to_scan == 0:
                why = (f"run={self.ksm.run}" if self.ksm.run != 1 else
                       "no process has registered mergeable memory" if self.ksm.list_empty()
                       else "pages_to_scan=0")
                raise ScanStalledError(f"full_scans is stuck at {self.ksm.full_scans} "
                                       f"(waiting for {target}): {why}")
            if deadline is not None and wake > deadline:
                self.now_ns = deadline
                raise ScanStalledError(f"timeout: full_scans reached {self.ksm.full_scans}, "
                                       f"not {target}")
            self._ksmd_batch()

    # --- KSM entry points --------------------------------------------------------------------
    def ksm_enter(self, mm: BulkMm) -> None:
        """Register *mm* just behind ksmd's cursor (``__ksm_enter``)."""
        needs_wakeup = self.ksm.list_empty()
        mm.list_add_before(self.ksm.cursor)
        mm.registered = True
        if needs_wakeup:
            self.wake_ksmd()

    def ksm_exit(self, mm: BulkMm) -> None:
        """``__ksm_exit``: unregister at once if ksmd holds nothing of *mm*, else leave it to ksmd."""
        if not mm.registered or self.ksm.cursor is mm:
            return
        pages = self.ksm.pages
        if not any(bool((pages.state[s.row:s.row + s.pages] != ABSENT).any())
                   for s in mm.segments):
            self.ksm.unregister(mm)
        else:
            mm.list_del()
            mm.list_add_after(self.ksm.cursor)


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

    def _changing(self) -> None:
        """_check_alive for a call that may change what the counters count."""
        self._check_alive()
        self.kernel.changes += 1

    def mmap(self, length: int, prot: int = PROT_READ | PROT_WRITE,
             flags: int = MAP_PRIVATE | MAP_ANONYMOUS, **kwargs: object) -> int:
        """Map *length* bytes of anonymous private memory, top-down like SimKernel."""
        self._changing()
        if prot != PROT_READ | PROT_WRITE or flags != MAP_PRIVATE | MAP_ANONYMOUS or kwargs:
            raise NotImplementedError("the bulk engine models only read-write anonymous "
                                      "private mappings (mmap(length))")
        if length <= 0 or length % PAGE_SIZE:
            raise ValueError(f"length must be a positive multiple of {PAGE_SIZE}, got {length}")
        mm = self.mm
        top = mm.segments[0].addr if mm.segments else mm.mmap_base
        addr = top - length
        row = self.kernel.ksm.pages.append(length >> PAGE_SHIFT)
        mm.segments.insert(0, Segment(addr, row, length >> PAGE_SHIFT))
        return addr

    def _rows(self, addr: int, length: int) -> npt.NDArray[np.int64]:
        pieces = self.mm.rows(addr, length)
        if len(pieces) == 1:
            r, _i, n = pieces[0]
            return np.arange(r, r + n, dtype=np.int64)
        return np.concatenate([np.arange(r, r + n, dtype=np.int64) for r, _i, n in pieces])

    def write(self, addr: int, data: bytes) -> None:
        """Store whole pages of *data* at *addr* (their content is fingerprinted)."""
        self._changing()
        if not data:
            return
        if len(data) == PAGE_SIZE:  # the common case of a COW storm, without arrays
            row = int(self._rows(addr, PAGE_SIZE)[0])
            cid = self.kernel.contents.intern(fingerprint(bytes(data)))
            self.kernel.ksm.sync_contents()
            self._write_one(row, cid)
            return
        ids = self.kernel.contents.of_pages(bytes(data))
        self.write_contents(addr, np.asarray(ids, dtype=np.int64))

    def write_contents(self, addr: int, ids: Sequence[int] | npt.NDArray[np.int64]) -> None:
        """Store pages of the given content ids at *addr*, with the faults and COW of a write."""
        self._changing()
        k = self.kernel
        cids = np.asarray(ids, dtype=np.int64)
        if cids.ndim != 1 or not k.contents.valid(cids):
            raise ValueError("content ids must be a flat sequence of ids of this kernel's "
                             "ContentTable")
        ksm = k.ksm
        ksm.sync_contents()
        if len(cids) == 1:
            self._write_one(self._rows(addr, PAGE_SIZE)[0], int(cids[0]))
            return
        rows = self._rows(addr, len(cids) * PAGE_SIZE)
        frames = ksm.pages.frame[rows]
        ok = frames >= 0
        in_place = np.zeros(len(rows), bool)
        in_place[ok] = (ksm.frames.knode[frames[ok]] < 0) & (ksm.frames.mapcount[frames[ok]] == 1)
        ksm.frames.content[frames[in_place]] = cids[in_place]
        copy = ~in_place
        ksm.unmap(frames[copy])
        ksm.pages.frame[rows[copy]] = ksm.new_frames(cids[copy])

    def _write_one(self, row: int, cid: int) -> None:
        """write_contents for one page, without array overheads (a COW storm is many of these)."""
        ksm = self.kernel.ksm
        frames = ksm.frames
        f = int(ksm.pages.frame[row])
        if f >= 0:
            knode = int(frames.knode[f])
            if knode < 0 and frames.mapcount[f] == 1:
                frames.content[f] = cid  # an exclusive ordinary page is written in place
                return
            frames.mapcount[f] -= 1
            if knode >= 0 and frames.mapcount[f] == 0:
                ksm.reopen([knode])
        new = frames.append(1)
        frames.content[new] = cid
        frames.mapcount[new] = 1
        ksm.pages.frame[row] = new

    def madvise(self, addr: int, length: int, advice: int) -> None:
        """MADV_MERGEABLE or MADV_UNMERGEABLE on mapped memory."""
        self._changing()
        if advice not in (MADV_MERGEABLE, MADV_UNMERGEABLE):
            raise NotImplementedError("the bulk engine models only MADV_MERGEABLE and "
                                      "MADV_UNMERGEABLE")
        rows = self._rows(addr, length)
        k, ksm = self.kernel, self.kernel.ksm
        if advice == MADV_MERGEABLE:
            if not bool(ksm.pages.mergeable[rows].all()):
                if not self.mm.registered:
                    k.ksm_enter(self.mm)
                ksm.pages.mergeable[rows] = True
            return
        rows = rows[ksm.pages.mergeable[rows]]
        frames = ksm.pages.frame[rows]
        ksm_page = frames == KSM_ZERO
        ok = frames >= 0
        ksm_page[ok] = ksm.frames.knode[frames[ok]] >= 0
        # break_ksm: each KSM page (or KSM zero page) becomes a private copy.
        old = frames[ksm_page]
        contents = np.where(old >= 0, ksm.frames.content[np.maximum(old, 0)], 0)
        ksm.unmap(old)
        ksm.pages.frame[rows[ksm_page]] = ksm.new_frames(contents)
        ksm.pages.mergeable[rows] = False

    def fork(self) -> BulkProcess:
        """fork(2): the child shares every page copy-on-write and is registered if the parent is."""
        self._changing()
        k, ksm = self.kernel, self.kernel.ksm
        child = k.spawn()
        child.mm.mmap_base = self.mm.mmap_base
        for seg in self.mm.segments:
            row = ksm.pages.append(seg.pages)
            src = ksm.pages.frame[seg.row:seg.row + seg.pages]
            ksm.pages.frame[row:row + seg.pages] = src
            ksm.pages.mergeable[row:row + seg.pages] = ksm.pages.mergeable[seg.row:seg.row
                                                                           + seg.pages]
            np.add.at(ksm.frames.mapcount, src[src >= 0], 1)
            child.mm.segments.append(Segment(seg.addr, row, seg.pages))
        if self.mm.registered:
            k.ksm_enter(child.mm)
        return child

    def exit(self) -> None:
        """exit(2): KSM's exit hook, then the address space goes."""
        self._changing()
        self.alive = False
        k, mm = self.kernel, self.mm
        mm.exiting = True
        k.ksm_exit(mm)
        for seg in mm.segments:
            sl = slice(seg.row, seg.row + seg.pages)
            k.ksm.unmap(k.ksm.pages.frame[sl])
            k.ksm.pages.frame[sl] = NO_FRAME
        del k.processes[self.pid]

    def content_ids(self, addr: int, length: int) -> list[int | None]:
        """The content id of each page in [addr, addr+length); None where nothing is mapped
        (``KSM_ZERO`` pages hold the zero content)."""
        self._check_alive()
        frames = self.kernel.ksm.frames
        return [None if f == NO_FRAME else ZERO_CONTENT if f == KSM_ZERO
                else int(frames.content[f])
                for f in self.kernel.ksm.pages.frame[self._rows(addr, length)].tolist()]

    def _unmodelled(self, call: str) -> NotImplementedError:
        return NotImplementedError(f"{call} is not modelled by the bulk engine "
                                   f"(see docs/bulk.md); use SimKernel")

    def munmap(self, addr: int, length: int) -> None:
        """Not modelled: raises NotImplementedError."""
        raise self._unmodelled("munmap")

    def mprotect(self, addr: int, length: int, prot: int) -> None:
        """Not modelled: raises NotImplementedError."""
        raise self._unmodelled("mprotect")

    def prctl(self, option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0,
              arg5: int = 0) -> int:
        """Not modelled (PR_SET_MEMORY_MERGE and the rest): raises NotImplementedError."""
        raise self._unmodelled("prctl")

    def read(self, addr: int, length: int, *, force: bool = False) -> bytes:
        """Not modelled (no page bytes are kept): raises NotImplementedError."""
        raise self._unmodelled("read (the engine keeps no page bytes)")

    def ksm_stat(self) -> dict[str, int | bool]:
        """``/proc/PID/ksm_stat``."""
        self._check_alive()
        ksm = self.kernel.ksm
        items = merging = zero = 0
        for seg in self.mm.segments:
            sl = slice(seg.row, seg.row + seg.pages)
            state = ksm.pages.state[sl]
            items += int(np.count_nonzero(state))
            st = state == STABLE
            merging += int(np.count_nonzero(ksm.nodes.alive[ksm.pages.head[sl][st]]))
            zero += int(np.count_nonzero(ksm.pages.frame[sl] == KSM_ZERO))
        return {"ksm_rmap_items": items, "ksm_zero_pages": zero, "ksm_merging_pages": merging,
                "ksm_process_profit": (merging + zero) * PAGE_SIZE - items * RMAP_ITEM_SIZE,
                "ksm_merge_any": False, "ksm_mergeable": ksm.has_mergeable(self.mm)}

    def ksm_merging_pages(self) -> int:
        """``/proc/PID/ksm_merging_pages``."""
        return int(self.ksm_stat()["ksm_merging_pages"])
