"""A real process of the Linux backend: :class:`LinuxProcess`.

Each :class:`LinuxProcess` is a C helper (see :mod:`ksmlab.backends.linux_helper`)
that runs system calls on request; its memory is read and written from this
process (:mod:`ksmlab.backends.linux_memory`).  A process belongs to a
:class:`~ksmlab.backends.linux_session.LinuxSession`: it registers every child
it forks there, so that the session kills them all when it closes.
Re-exported by :mod:`ksmlab.backends.linux`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import socket
import subprocess
from typing import TYPE_CHECKING, Final

from ksmlab import argcheck
from ksmlab.api import KsmStat, SmapsEntry
from ksmlab.backends.linux_helper import (
    _OP_EXEC,
    _OP_EXIT,
    _OP_FORK,
    _OP_MADVISE,
    _OP_MMAP,
    _OP_MPROTECT,
    _OP_MUNMAP,
    _OP_PRCTL,
    _REPLY,
    _REQ,
    receive_hello,
)
from ksmlab.backends.linux_memory import read_memory, read_pfns, write_memory
from ksmlab.backends.linux_procfs import parse_ksm_stat, parse_smaps
from ksmlab.constants import MAP_ANONYMOUS, MAP_PRIVATE, PROT_READ, PROT_WRITE
from ksmlab.errors import ProcessExitedError

if TYPE_CHECKING:
    from ksmlab.backends.linux_session import LinuxSession

__all__ = ["LinuxProcess", "online_nodes"]

_EXIT_TIMEOUT: Final = 10.0

_U64_MASK: Final = (1 << 64) - 1


# --------------------------------------------------------------------------------------
# Processes


def online_nodes() -> frozenset[int]:
    """The online NUMA nodes (``/sys/devices/system/node/online``; ``{0}`` without NUMA)."""
    try:
        with open("/sys/devices/system/node/online") as f:
            text = f.read().strip()
    except OSError:
        return frozenset({0})
    nodes: set[int] = set()
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        nodes.update(range(int(lo), int(hi or lo) + 1))
    return frozenset(nodes)


def _to_u64(value: int, what: str) -> int:
    """Convert a Python int the way C converts it to an unsigned 64-bit argument."""
    if not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    if not -(1 << 63) <= value <= _U64_MASK:
        raise ValueError(f"{what}={value} does not fit in 64 bits")
    return value & _U64_MASK


def _raise_errno(ret: int) -> int:
    if ret < 0:
        raise OSError(-ret, os.strerror(-ret))
    return ret


class LinuxProcess:
    """A real helper process, driven over its command channel (satisfies ``api.Process``).

    Created by :meth:`LinuxKernel.spawn` and :meth:`fork`; never construct it
    directly.  Every call after :meth:`exit` (or after the owning kernel
    closed) raises :class:`~ksmlab.errors.ProcessExitedError`.
    """

    def __init__(self, session: LinuxSession, sock: socket.socket, pid: int,
                 stub: subprocess.Popen[bytes] | None = None) -> None:
        self._session = session
        self._sock = sock
        self._pid = pid
        # For a spawned helper: the reaper process that is its parent (and our child).
        self._stub = stub
        self._exited = False
        # A pidfd tells us when the process is really gone, even when it is not
        # our child (forked helpers are children of helpers).
        self._pidfd = os.pidfd_open(pid)

    def __repr__(self) -> str:
        state = "exited" if self._exited else "running"
        return f"<LinuxProcess pid={self._pid} {state}>"

    @property
    def pid(self) -> int:
        """The process id on this machine."""
        return self._pid

    @property
    def exited(self) -> bool:
        """Whether the process has exited (the handle is then unusable)."""
        return self._exited

    # --- channel ---------------------------------------------------------------------

    def _check_alive(self) -> None:
        if self._exited:
            raise ProcessExitedError(f"process {self._pid} has exited")

    def _recv(self) -> int:
        data = self._sock.recv(_REPLY.size)
        if len(data) != _REPLY.size:
            # EOF: the helper died under us (killed from outside, OOM, ...).
            self._reap()
            raise ProcessExitedError(f"process {self._pid} died unexpectedly")
        (ret,) = _REPLY.unpack(data)
        return int(ret)

    def _call(self, op: int, *args: int, path: bytes = b"", fds: tuple[int, ...] = (),
              reply: bool = True) -> int:
        self._check_alive()
        vals = [_to_u64(a, "argument") for a in args]
        vals += [0] * (6 - len(vals))
        msg = _REQ.pack(op, len(path), *vals) + path
        try:
            try:
                if fds:
                    socket.send_fds(self._sock, [msg], list(fds))
                else:
                    self._sock.send(msg)
            except (BrokenPipeError, ConnectionResetError):
                self._reap()
                raise ProcessExitedError(f"process {self._pid} died unexpectedly") from None
            return self._recv() if reply else 0
        except ProcessExitedError:
            raise
        except BaseException:
            # Interrupted half way (e.g. KeyboardInterrupt while waiting for the
            # reply): the channel is out of step, so the process is unusable.
            self._kill()
            raise

    # --- system calls ----------------------------------------------------------------

    def mmap(self, length: int, prot: int = PROT_READ | PROT_WRITE,
             flags: int = MAP_PRIVATE | MAP_ANONYMOUS, *, addr: int = 0,
             node: int | None = None, path: str | None = None, offset: int = 0) -> int:
        """``mmap(2)`` in the process; returns the address.

        Args:
            node: bind the area to this NUMA node (``mbind(MPOL_BIND)``) before
                anything is faulted in (``MAP_POPULATE`` is applied after the bind).
            path: map this file, opened ``O_RDONLY`` for ``MAP_PRIVATE`` and
                ``O_RDWR`` for ``MAP_SHARED``.  A file mapping without a path
                gets ``EBADF`` from the kernel.

        Raises:
            TypeError, ValueError: as :func:`ksmlab.argcheck.mmap_args` says,
                e.g. *node* is not an online NUMA node, or both *path* and
                ``MAP_ANONYMOUS`` were given (API misuse, as in the model).
        """
        args = argcheck.mmap_args(length, prot, flags, addr, node, path, offset, 0,
                                  online_nodes)
        self._check_alive()
        pathb = b""
        if args.path is not None:
            # The helper's cwd is ours at spawn time, not necessarily now.
            pathb = os.fsencode(os.path.abspath(args.path))
            if len(pathb) >= 4096:  # PATH_MAX, with the NUL: what open(2) would say
                raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), args.path)
        node1 = 0 if args.node is None else args.node + 1
        return _raise_errno(self._call(_OP_MMAP, args.addr, args.length, args.prot, args.flags,
                                       node1, args.offset, path=pathb))

    def munmap(self, addr: int, length: int) -> None:
        """``munmap(2)`` in the process."""
        addr, length = argcheck.ulong("addr", addr), argcheck.ulong("length", length)
        _raise_errno(self._call(_OP_MUNMAP, addr, length))

    def mprotect(self, addr: int, length: int, prot: int) -> None:
        """``mprotect(2)`` in the process."""
        addr, length = argcheck.ulong("addr", addr), argcheck.ulong("length", length)
        prot = argcheck.cint("prot", prot)
        _raise_errno(self._call(_OP_MPROTECT, addr, length, prot))

    def madvise(self, addr: int, length: int, advice: int) -> None:
        """``madvise(2)`` in the process."""
        addr, length = argcheck.ulong("addr", addr), argcheck.ulong("length", length)
        advice = argcheck.cint("advice", advice)
        _raise_errno(self._call(_OP_MADVISE, addr, length, advice))

    def prctl(self, option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0,
              arg5: int = 0) -> int:
        """``prctl(2)`` in the process; returns its non-negative result."""
        option = argcheck.cint("option", option)
        arg2, arg3, arg4, arg5 = (argcheck.ulong(name, v) for name, v in
                                  (("arg2", arg2), ("arg3", arg3), ("arg4", arg4),
                                   ("arg5", arg5)))
        return _raise_errno(self._call(_OP_PRCTL, option, arg2, arg3, arg4, arg5))

    # --- memory access ---------------------------------------------------------------

    def write(self, addr: int, data: bytes, *, force: bool = False) -> None:
        """Write *data* at *addr* in the process, faulting pages in as the process would.

        With ``force=False`` this is ``process_vm_writev``: every page must be
        mapped writable, otherwise ``OSError(EFAULT)`` is raised and nothing is
        written.  With ``force=True`` it goes through ``/proc/PID/mem`` (ptrace
        access, as the selftest test_prot_none does), which also writes
        read-only and PROT_NONE private memory by COW; a range with unmapped
        pages raises ``OSError(EIO)`` (the kernel's errno there) and writes nothing.
        """
        addr = argcheck.ulong("addr", addr)
        buf = argcheck.buffer("data", data)
        force = argcheck.flag("force", force)
        self._check_alive()
        write_memory(self._pid, addr, buf, force=force)

    def read(self, addr: int, length: int, *, force: bool = False) -> bytes:
        """Read *length* bytes at *addr* in the process.

        ``force=False`` needs every page mapped readable (else
        ``OSError(EFAULT)``); ``force=True`` also reads PROT_NONE memory
        (unmapped pages give ``OSError(EIO)``).  Both read through
        ``/proc/PID/mem``, which, like a CPU load, leaves KSM pages alone.
        Reading faults pages in: a never-touched anonymous page then maps the
        zero page.
        """
        addr, length = argcheck.ulong("addr", addr), argcheck.ulong("length", length)
        force = argcheck.flag("force", force)
        self._check_alive()
        return read_memory(self._pid, addr, length, force=force)

    # --- process lifecycle -----------------------------------------------------------

    def fork(self) -> LinuxProcess:
        """``fork(2)`` the process; returns a handle to the child, with its own channel."""
        self._check_alive()
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            try:
                ret = self._call(_OP_FORK, fds=(theirs.fileno(),))
            finally:
                theirs.close()  # the helper has its own copy now
            pid = _raise_errno(ret)
            hello = receive_hello(mine)
        except BaseException:
            mine.close()
            raise
        if hello != pid:
            mine.close()
            raise ProcessExitedError(f"forked child {pid} of {self._pid} did not start")
        child = LinuxProcess(self._session, mine, pid)
        self._session.register(child)
        return child

    def exec(self) -> None:
        """``execve(2)`` the helper binary in place: a fresh address space, same pid.

        What the kernel carries over is kept (prctl MERGE_ANY, the pid); what
        it drops is gone (every mapping, madvised areas, MMF_VM_MERGEABLE).
        """
        ret = _raise_errno(self._call(_OP_EXEC))
        if ret != self._pid:
            raise ProcessExitedError(f"process {self._pid} came back from exec as {ret}")

    def exit(self) -> None:
        """End the process (``_exit(0)``) and wait until it is gone.

        On return the process's mm has been released; KSM's counters for it
        change only when ksmd next reaches its slot (spec 2.3).
        """
        self._call(_OP_EXIT, reply=False)
        self._wait_gone(_EXIT_TIMEOUT)

    def _wait_gone(self, timeout: float) -> None:
        poller = select.poll()
        poller.register(self._pidfd, select.POLLIN)
        if not poller.poll(int(timeout * 1000)):
            signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            poller.poll()
        self._reap()

    def _reap(self) -> None:
        """Forget the process: reap it if it is our child, close its fds."""
        if self._exited:
            return
        self._exited = True
        if self._stub is not None:
            # The stub exits right after the helper unless it still has
            # orphans to reap; the session waits for it on close in that case.
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._stub.wait(timeout=0.05)
        self._sock.close()
        os.close(self._pidfd)

    def _kill(self) -> None:
        """SIGKILL the process and wait until it is gone (the session's close does this)."""
        if self._exited:
            return
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
        poller = select.poll()
        poller.register(self._pidfd, select.POLLIN)
        poller.poll()
        self._reap()

    # --- /proc -----------------------------------------------------------------------

    def _proc_text(self, name: str) -> str:
        self._check_alive()
        with open(f"/proc/{self._pid}/{name}") as f:
            return f.read()

    def ksm_stat(self) -> KsmStat:
        """``/proc/PID/ksm_stat`` as a dict (ints, and bools for the yes/no lines)."""
        return parse_ksm_stat(self._proc_text("ksm_stat"))

    def ksm_merging_pages(self) -> int:
        """``/proc/PID/ksm_merging_pages``."""
        return int(self._proc_text("ksm_merging_pages"))

    def smaps(self) -> list[SmapsEntry]:
        """``/proc/PID/smaps``, one :class:`~ksmlab.api.SmapsEntry` per vma (bytes)."""
        return parse_smaps(self._proc_text("smaps"))

    def pfns(self, addr: int, length: int) -> list[int | None]:
        """Page frame numbers from ``/proc/PID/pagemap``, one per page of the range.

        The range is widened to whole pages.  A page that is not present (never
        touched, swapped out) gives ``None``.  Only root sees real PFNs.  The
        range must end by 2**64 and cover at most
        :data:`ksmlab.argcheck.MAX_VIEW_PAGES` pages (one read of pagemap).
        """
        addr, length = argcheck.view_range(addr, length)
        self._check_alive()
        return read_pfns(self._pid, addr, length)
