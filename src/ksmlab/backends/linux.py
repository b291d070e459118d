"""The real kernel behind the :mod:`ksmlab.api` interface.

:class:`LinuxKernel` satisfies :class:`ksmlab.api.Kernel` by driving
``/sys/kernel/mm/ksm`` and real processes.  :class:`LinuxProcess` satisfies
:class:`ksmlab.api.Process`: each one is a small C helper (``linux_helper.c``,
compiled on first use) that runs ``mmap``/``munmap``/``mprotect``/``madvise``/
``prctl``/``fork``/``execve`` on request and answers with the result or
``-errno``.  Memory is read and written from this process with
``process_vm_readv``/``process_vm_writev`` (which respect protections) or
through ``/proc/PID/mem`` (forced, like ptrace).

KSM state is global to the machine, so a :class:`LinuxKernel` holds an
exclusive ``flock`` for its whole life, saves every writable knob on entry and
puts them back on exit (see :meth:`LinuxKernel.close` for the order).  Use it
as a context manager::

    with LinuxKernel() as k:
        p = k.spawn()
        a = p.mmap(10 * PAGE_SIZE)
        p.write(a, b"*" * 10 * PAGE_SIZE)
        p.madvise(a, 10 * PAGE_SIZE, MADV_MERGEABLE)
        k.sysfs["run"] = "1"
        k.wait_full_scans(2)

Errors follow :mod:`os`: a refused system call or sysfs write raises
:class:`OSError` with the kernel's own errno.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import errno
import fcntl
import hashlib
import importlib.resources
import os
import re
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Final, Self

from ksmlab.api import KsmStat, SmapsEntry

if TYPE_CHECKING:
    from ksmlab.api import Kernel, Process, Sysfs
from ksmlab.constants import (
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    PAGE_SHIFT,
    PROT_READ,
    PROT_WRITE,
)
from ksmlab.errors import KsmSimError, ProcessExitedError, ScanStalledError

__all__ = [
    "DEFAULT_LOCK_TIMEOUT",
    "DEFAULT_SCAN_TIMEOUT",
    "KSM_SYSFS_DIR",
    "HelperBuildError",
    "KsmLockTimeoutError",
    "KsmRestoreError",
    "KsmUnavailableError",
    "LinuxKernel",
    "LinuxProcess",
    "LinuxSysfs",
    "MapsEntry",
    "build_helper",
    "default_lock_path",
    "helper_unavailable_reason",
    "linux_ksm_unavailable_reason",
    "online_nodes",
    "parse_ksm_stat",
    "parse_maps",
    "parse_smaps",
]

KSM_SYSFS_DIR: Final = "/sys/kernel/mm/ksm"
"""Where the kernel exposes KSM's knobs and counters."""

DEFAULT_LOCK_TIMEOUT: Final = 60.0
"""Seconds :class:`LinuxKernel` waits for another ksmlab session to release the lock."""

DEFAULT_SCAN_TIMEOUT: Final = 60.0
"""Seconds :meth:`LinuxKernel.wait_full_scans` waits when no timeout is given."""

_HELPER_SOURCE: Final = "linux_helper.c"
_HELPER_START_TIMEOUT: Final = 30.0
_EXIT_TIMEOUT: Final = 10.0
_POLL_INTERVAL: Final = 0.001

# Knob groups for the restore order.  The advisor's parameters go before
# advisor_mode because switching to scan-time starts from
# advisor_min_pages_to_scan; pages_to_scan goes after advisor_mode because a
# real mode change resets it and because it is refused (EINVAL) under
# scan-time; merge_across_nodes and max_page_sharing go after run=2 because
# they are refused (EBUSY) while KSM pages exist.
_ADVISOR_PARAMS: Final = (
    "advisor_min_pages_to_scan",
    "advisor_max_pages_to_scan",
    "advisor_max_cpu",
    "advisor_target_scan_time",
)
_NEED_NO_KSM_PAGES: Final = ("merge_across_nodes", "max_page_sharing")

_U64_MASK: Final = (1 << 64) - 1
_PFN_MASK: Final = (1 << 55) - 1
_PM_PRESENT: Final = 1 << 63


# --------------------------------------------------------------------------------------
# Exceptions


class KsmUnavailableError(KsmSimError, RuntimeError):
    """This machine's KSM cannot be driven (absent, not root, read-only sysfs, ...)."""


class KsmLockTimeoutError(KsmSimError, TimeoutError):
    """Another ksmlab session held the global KSM lock for longer than the timeout."""


class KsmRestoreError(KsmSimError, RuntimeError):
    """Some KSM knobs could not be put back when a :class:`LinuxKernel` closed.

    Attributes:
        failures: ``(knob, value, error)`` for every write that failed.
    """

    def __init__(self, failures: list[tuple[str, str, OSError]]) -> None:
        self.failures = failures
        what = "; ".join(f"{name}={value!r}: {err}" for name, value, err in failures)
        super().__init__(f"could not restore KSM knobs: {what}")


class HelperBuildError(KsmSimError, RuntimeError):
    """The C helper process could not be compiled."""


# --------------------------------------------------------------------------------------
# Availability


def linux_ksm_unavailable_reason() -> str | None:
    """Say in one sentence why this machine's KSM cannot be driven, or ``None`` if it can.

    Checks the platform, ``/sys/kernel/mm/ksm``, root, a writable sysfs and
    ``/proc/PID/ksm_stat``.  Tests call this to ``pytest.skip(reason)``.
    """
    if not sys.platform.startswith("linux"):
        return f"KSM needs Linux, and this is {sys.platform}."
    if not os.path.isdir(KSM_SYSFS_DIR):
        return f"{KSM_SYSFS_DIR} does not exist, so this kernel was built without CONFIG_KSM."
    if os.geteuid() != 0:
        return f"Driving KSM needs root (writable {KSM_SYSFS_DIR}), and euid is {os.geteuid()}."
    if os.statvfs(KSM_SYSFS_DIR).f_flag & os.ST_RDONLY:
        return (f"sysfs is mounted read-only here (a container?), "
                f"so {KSM_SYSFS_DIR} cannot be written.")
    if not os.access(os.path.join(KSM_SYSFS_DIR, "run"), os.W_OK):
        return f"{KSM_SYSFS_DIR}/run is not writable by this process."
    if not os.path.exists("/proc/self/ksm_stat"):
        return "/proc/PID/ksm_stat is missing, so this kernel is older than Linux 6.1."
    return None


def helper_unavailable_reason() -> str | None:
    """Say why the helper process cannot be built or run here, or ``None`` if it can."""
    try:
        build_helper()
    except HelperBuildError as err:
        return str(err)
    return None


# --------------------------------------------------------------------------------------
# The C helper


def _helper_source() -> bytes:
    return importlib.resources.files(__package__ or "ksmlab.backends").joinpath(
        _HELPER_SOURCE).read_bytes()


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ksmlab"


_helper_path: Path | None = None


def build_helper() -> Path:
    """Return the compiled helper, compiling ``linux_helper.c`` first if needed.

    The binary is cached in ``$XDG_CACHE_HOME/ksmlab`` (or ``~/.cache/ksmlab``)
    under a name that includes the source's hash, so an edited source is
    rebuilt.  ``$CC`` or ``gcc`` or ``cc`` is used; a static link is tried first
    because it keeps the helper's own mappings (and so its contribution to a
    MERGE_ANY process's KSM figures) minimal.

    Raises:
        HelperBuildError: no compiler, or the compilation failed.
    """
    global _helper_path
    if _helper_path is not None and os.access(_helper_path, os.X_OK):
        return _helper_path
    src = _helper_source()
    digest = hashlib.sha256(src).hexdigest()[:16]
    cache = _cache_dir()
    exe = cache / f"ksmlab-helper-{digest}"
    if os.access(exe, os.X_OK):
        _helper_path = exe
        return exe
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise HelperBuildError(
            "ksmlab's Linux backend compiles a small C helper process on first use, "
            "and no C compiler was found (install gcc or set CC).")
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise HelperBuildError(f"cannot create the helper cache directory {cache}: {err}") from err
    with tempfile.TemporaryDirectory(dir=cache, prefix=".build-") as tmp:
        csrc = Path(tmp) / _HELPER_SOURCE
        csrc.write_bytes(src)
        out = Path(tmp) / "helper"
        errors = []
        for extra in (["-static"], []):
            cmd = [cc, "-O2", "-Wall", *extra, "-o", str(out), str(csrc)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if res.returncode == 0:
                break
            errors.append(f"$ {' '.join(cmd)}\n{res.stderr.strip()}")
        else:
            raise HelperBuildError("compiling the ksmlab helper failed:\n" + "\n".join(errors))
        os.chmod(out, 0o755)
        os.replace(out, exe)  # atomic: a concurrent build never sees half a binary
    _helper_path = exe
    return exe


_OP_MMAP: Final = 1
_OP_MUNMAP: Final = 2
_OP_MPROTECT: Final = 3
_OP_MADVISE: Final = 4
_OP_PRCTL: Final = 5
_OP_FORK: Final = 6
_OP_EXEC: Final = 7
_OP_EXIT: Final = 8
_REQ: Final = struct.Struct("<II6Q")
_REPLY: Final = struct.Struct("<q")


# --------------------------------------------------------------------------------------
# /proc parsers

_VMA_HEADER: Final = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) ")


class MapsEntry:
    """One line of ``/proc/PID/maps``: ``start``, ``end`` and the ``perms`` string."""

    __slots__ = ("end", "perms", "start")

    def __init__(self, start: int, end: int, perms: str) -> None:
        self.start = start
        self.end = end
        self.perms = perms

    def __repr__(self) -> str:
        return f"MapsEntry({self.start:#x}-{self.end:#x} {self.perms})"


def parse_maps(text: str) -> list[MapsEntry]:
    """Parse ``/proc/PID/maps`` text into :class:`MapsEntry` records, in address order."""
    out = []
    for line in text.splitlines():
        m = _VMA_HEADER.match(line)
        if m:
            out.append(MapsEntry(int(m[1], 16), int(m[2], 16), m[3]))
    return out


def parse_smaps(text: str) -> list[SmapsEntry]:
    """Parse ``/proc/PID/smaps`` text into :class:`~ksmlab.api.SmapsEntry` records.

    Sizes are converted from the file's kB to bytes.  A field missing from the
    file (older kernels have no ``KSM:`` line) reads as 0.
    """
    out: list[SmapsEntry] = []
    cur: dict[str, object] | None = None

    def flush() -> None:
        if cur is not None:
            out.append(SmapsEntry(
                start=int(str(cur["start"])), end=int(str(cur["end"])), perms=str(cur["perms"]),
                vm_flags=tuple(str(cur.get("flags", "")).split()),
                rss=int(str(cur.get("Rss", 0))), anonymous=int(str(cur.get("Anonymous", 0))),
                ksm=int(str(cur.get("KSM", 0)))))

    for line in text.splitlines():
        m = _VMA_HEADER.match(line)
        if m:
            flush()
            cur = {"start": int(m[1], 16), "end": int(m[2], 16), "perms": m[3]}
            continue
        if cur is None:
            continue
        key, _, rest = line.partition(":")
        if key == "VmFlags":
            cur["flags"] = rest
        elif key in ("Rss", "Anonymous", "KSM"):
            parts = rest.split()
            # The unit is always kB in smaps; convert to bytes.
            cur[key] = int(parts[0]) * 1024
    flush()
    return out


def parse_ksm_stat(text: str) -> KsmStat:
    """Parse ``/proc/PID/ksm_stat``: numbers become ints, ``yes``/``no`` become bools."""
    out: KsmStat = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 2:
            continue
        key = parts[0].rstrip(":")
        value = parts[-1]
        if value in ("yes", "no"):
            out[key] = value == "yes"
        else:
            out[key] = int(value)
    return out


# --------------------------------------------------------------------------------------
# process_vm_readv / process_vm_writev through ctypes


class _Iovec(ctypes.Structure):
    _fields_ = (("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t))


_libc: ctypes.CDLL | None = None


def _libc_fn(name: str) -> Callable[..., int]:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(_libc, name)
    fn.argtypes = (ctypes.c_int, ctypes.POINTER(_Iovec), ctypes.c_ulong,
                   ctypes.POINTER(_Iovec), ctypes.c_ulong, ctypes.c_ulong)
    fn.restype = ctypes.c_ssize_t
    f: Callable[..., int] = fn
    return f


def _vm_rw(name: str, pid: int, buf: ctypes.Array[ctypes.c_char], addr: int, n: int) -> int:
    local = _Iovec(ctypes.cast(buf, ctypes.c_void_p), n)
    remote = _Iovec(addr, n)
    done = int(_libc_fn(name)(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0))
    if done < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return done


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

    def __init__(self, kernel: LinuxKernel, sock: socket.socket, pid: int,
                 stub: subprocess.Popen[bytes] | None = None) -> None:
        self._kernel = kernel
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
            ValueError: *node* is not an online NUMA node, or both *path* and
                ``MAP_ANONYMOUS`` were given (API misuse, as in the model).
        """
        if node is not None and node not in online_nodes():
            raise ValueError(f"node {node} does not exist (online nodes: "
                             f"{sorted(online_nodes())})")
        if path is not None and flags & MAP_ANONYMOUS:
            raise ValueError("pass either path= or MAP_ANONYMOUS, not both")
        pathb = b""
        if path is not None:
            # The helper's cwd is ours at spawn time, not necessarily now.
            pathb = os.fsencode(os.path.abspath(path))
            if b"\0" in pathb:
                raise ValueError(f"path {path!r} contains a NUL byte")
            if len(pathb) > 4096:
                raise ValueError(f"path of {len(pathb)} bytes is too long")
        node1 = 0 if node is None else node + 1
        return _raise_errno(self._call(_OP_MMAP, addr, length, prot, flags, node1, offset,
                                       path=pathb))

    def munmap(self, addr: int, length: int) -> None:
        """``munmap(2)`` in the process."""
        _raise_errno(self._call(_OP_MUNMAP, addr, length))

    def mprotect(self, addr: int, length: int, prot: int) -> None:
        """``mprotect(2)`` in the process."""
        _raise_errno(self._call(_OP_MPROTECT, addr, length, prot))

    def madvise(self, addr: int, length: int, advice: int) -> None:
        """``madvise(2)`` in the process."""
        _raise_errno(self._call(_OP_MADVISE, addr, length, advice))

    def prctl(self, option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0,
              arg5: int = 0) -> int:
        """``prctl(2)`` in the process; returns its non-negative result."""
        return _raise_errno(self._call(_OP_PRCTL, option, arg2, arg3, arg4, arg5))

    # --- memory access ---------------------------------------------------------------

    def _maps(self) -> list[MapsEntry]:
        with open(f"/proc/{self._pid}/maps") as f:
            return parse_maps(f.read())

    def _check_range(self, addr: int, length: int, perm: str, err: int) -> None:
        """Raise ``OSError(err)`` unless every page of the range is mapped with *perm*.

        *perm* ``"force-write"`` accepts what a forced write can change
        (``check_vma_flags``): a writable mapping, or a private (COW) one.
        Checking first is what makes a refused access leave memory untouched:
        the kernel itself copies page by page and stops at the first bad page.
        """
        if addr < 0 or addr + length > _U64_MASK:
            raise OSError(err, os.strerror(err))
        pos, end = addr, addr + length
        for vma in self._maps():
            if vma.end <= pos:
                continue
            if vma.start > pos:
                break  # a hole
            if perm == "force-write":
                if "w" not in vma.perms and "p" not in vma.perms:
                    break  # a read-only shared mapping (found by the differential suite)
            elif perm and perm not in vma.perms:
                break
            pos = vma.end
            if pos >= end:
                return
        raise OSError(err, os.strerror(err))

    def write(self, addr: int, data: bytes, *, force: bool = False) -> None:
        """Write *data* at *addr* in the process, faulting pages in as the process would.

        With ``force=False`` this is ``process_vm_writev``: every page must be
        mapped writable, otherwise ``OSError(EFAULT)`` is raised and nothing is
        written.  With ``force=True`` it goes through ``/proc/PID/mem`` (ptrace
        access, as the selftest test_prot_none does), which also writes
        read-only and PROT_NONE private memory by COW; a range with unmapped
        pages raises ``OSError(EIO)`` (the kernel's errno there) and writes nothing.
        """
        self._check_alive()
        buf = bytes(data)
        if not buf:
            return
        if force:
            self._check_range(addr, len(buf), "force-write", errno.EIO)
            fd = os.open(f"/proc/{self._pid}/mem", os.O_RDWR | os.O_CLOEXEC)
            try:
                done = 0
                while done < len(buf):
                    done += os.pwrite(fd, buf[done:], addr + done)
            finally:
                os.close(fd)
            return
        self._check_range(addr, len(buf), "w", errno.EFAULT)
        cbuf = ctypes.create_string_buffer(buf, len(buf))
        done = _vm_rw("process_vm_writev", self._pid, cbuf, addr, len(buf))
        if done != len(buf):
            raise OSError(errno.EFAULT, f"{os.strerror(errno.EFAULT)} (short write: "
                          f"{done} of {len(buf)} bytes)")

    def read(self, addr: int, length: int, *, force: bool = False) -> bytes:
        """Read *length* bytes at *addr* in the process.

        ``force=False`` needs every page mapped readable (else
        ``OSError(EFAULT)``); ``force=True`` also reads PROT_NONE memory
        (unmapped pages give ``OSError(EIO)``).  Both read through
        ``/proc/PID/mem``, which, like a CPU load, leaves KSM pages alone.
        Reading faults pages in: a never-touched anonymous page then maps the
        zero page.
        """
        self._check_alive()
        if length < 0:
            raise ValueError(f"length={length} must be >= 0")
        if length == 0:
            return b""
        # Not process_vm_readv: it pins the pages (FOLL_PIN), and a read-only
        # pin of an anonymous page that is not exclusive (every KSM page, and a
        # page still shared with a fork relative) first *unshares* it: the
        # reader gets a private copy and cow_ksm grows (found by the
        # differential suite, docs/differential.md).  /proc/PID/mem takes plain
        # references (FOLL_GET), which unshare nothing.
        if force:
            self._check_range(addr, length, "", errno.EIO)
        else:
            self._check_range(addr, length, "r", errno.EFAULT)
        fd = os.open(f"/proc/{self._pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        try:
            chunks = []
            done = 0
            while done < length:
                try:
                    chunk = os.pread(fd, length - done, addr + done)
                except OSError:
                    chunk = b""  # e.g. a readable VM_IO|VM_PFNMAP page (vvar)
                if not chunk:
                    # /proc/PID/mem says EIO; process_vm_readv would say EFAULT.
                    err = errno.EIO if force else errno.EFAULT
                    raise OSError(err, os.strerror(err))
                chunks.append(chunk)
                done += len(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

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
            mine.settimeout(_HELPER_START_TIMEOUT)
            hello = mine.recv(_REPLY.size)
            mine.settimeout(None)
        except BaseException:
            mine.close()
            raise
        if len(hello) != _REPLY.size or _REPLY.unpack(hello)[0] != pid:
            mine.close()
            raise ProcessExitedError(f"forked child {pid} of {self._pid} did not start")
        child = LinuxProcess(self._kernel, mine, pid)
        self._kernel._register(child)
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
            # orphans to reap; the kernel waits for it on close in that case.
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._stub.wait(timeout=0.05)
        self._sock.close()
        os.close(self._pidfd)

    def _kill(self) -> None:
        """SIGKILL the process and wait until it is gone (used on close)."""
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
        touched, swapped out) gives ``None``.  Only root sees real PFNs.
        """
        self._check_alive()
        if length < 0 or addr < 0:
            raise ValueError(f"bad range addr={addr:#x} length={length}")
        if length == 0:
            return []
        first = addr >> PAGE_SHIFT
        last = (addr + length - 1) >> PAGE_SHIFT
        n = last - first + 1
        fd = os.open(f"/proc/{self._pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        try:
            raw = os.pread(fd, 8 * n, 8 * first)
        finally:
            os.close(fd)
        out: list[int | None] = []
        for (entry,) in struct.iter_unpack("<Q", raw):
            out.append(entry & _PFN_MASK if entry & _PM_PRESENT else None)
        out += [None] * (n - len(out))  # beyond TASK_SIZE pagemap reads short
        return out


# --------------------------------------------------------------------------------------
# sysfs


class LinuxSysfs:
    """``/sys/kernel/mm/ksm`` as a mapping of file name to text (satisfies ``api.Sysfs``).

    Reads return the file's text without the trailing newline.  Writes are one
    ``write(2)`` of exactly the given text, so a refused write raises the
    kernel's own errno (``EINVAL``, ``EBUSY``, ``ERANGE``; ``EACCES`` for the
    read-only counters).
    """

    def __init__(self, kernel: LinuxKernel, directory: str = KSM_SYSFS_DIR) -> None:
        self._kernel = kernel
        self._dir = directory
        # The set of files is fixed for a kernel, so list it once.
        self._names = tuple(sorted(
            n for n in os.listdir(directory) if os.path.isfile(os.path.join(directory, n))))

    def _path(self, name: object) -> str:
        if not isinstance(name, str) or name not in self._names:
            raise KeyError(f"no KSM sysfs file named {name!r} in {self._dir}")
        return os.path.join(self._dir, name)

    def __getitem__(self, name: str) -> str:
        """Read one file, without its trailing newline."""
        with open(self._path(name)) as f:
            return f.read().rstrip("\n")

    def __setitem__(self, name: str, value: str) -> None:
        """Write *value* to one file in a single ``write(2)``."""
        path = self._path(name)
        if not isinstance(value, str):
            raise TypeError(f"sysfs value for {name} must be a str, not {type(value).__name__}")
        self._kernel._check_open()
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
        if name == "run":
            self._kernel._note_run()

    def __iter__(self) -> Iterator[str]:
        """The file names, sorted."""
        return iter(self._names)

    def __contains__(self, name: object) -> bool:
        """Whether *name* is one of the files."""
        return isinstance(name, str) and name in self._names

    def __len__(self) -> int:
        """The number of files."""
        return len(self._names)

    def writable(self) -> list[str]:
        """The names of the knobs (files with an owner-write bit), sorted."""
        return [n for n in self._names
                if os.stat(os.path.join(self._dir, n)).st_mode & stat.S_IWUSR]


def _normalise(name: str, text: str) -> str:
    """The value to write back for a knob read as *text* (``advisor_mode`` shows a menu)."""
    if name == "advisor_mode":
        m = re.search(r"\[([^\]]+)\]", text)
        if m:
            return m[1]
    return text.strip()


# --------------------------------------------------------------------------------------
# Lock


def default_lock_path() -> str:
    """``/run/lock/ksmlab.lock``, or ``/tmp/ksmlab.lock`` where ``/run/lock`` is absent."""
    return "/run/lock/ksmlab.lock" if os.path.isdir("/run/lock") else "/tmp/ksmlab.lock"


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return "?"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip() or "?"


def _lock_holders(fd: int) -> list[int]:
    """Pids that hold a flock on the file open at *fd*, from ``/proc/locks``."""
    st = os.fstat(fd)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = []
    try:
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                # "1: FLOCK  ADVISORY  WRITE 1234 00:1a:5678 0 EOF" (blocked
                # waiters are shown with "->" and are not holders).
                if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == dev:
                    pids.append(int(parts[4]))
    except (OSError, ValueError):
        pass
    return pids


def _acquire_lock(path: str, timeout: float) -> tuple[int, str]:
    """Take the lock; return its fd and the note a previous holder left behind (if any)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                holders = _lock_holders(fd)
                try:
                    note = os.pread(fd, 4096, 0).decode(errors="replace").strip()
                finally:
                    os.close(fd)
                if holders:
                    who = ", ".join(f"pid {p} ({_cmdline(p)})" for p in holders)
                else:
                    who = "an unknown process"
                extra = f"; its note in the lock file: {note!r}" if note else ""
                raise KsmLockTimeoutError(
                    f"timed out after {timeout:g} s waiting for the global KSM lock {path}, "
                    f"held by {who}{extra}") from None
            time.sleep(0.02)
    # A clean close empties the file, so a note still there is from a session
    # that died without restoring (SIGKILL, power loss).
    stale = os.pread(fd, 65536, 0).decode(errors="replace").strip()
    _write_note(fd, "")
    return fd, stale


def _write_note(fd: int, extra: str) -> None:
    # For whoever waits next, and for the next session if this one dies
    # without restoring.  Not every ksmlab tool writes one.
    note = (f"pid {os.getpid()} ({_cmdline(os.getpid())}) since "
            f"{dt.datetime.now().isoformat(timespec='seconds')}{extra}\n")
    os.ftruncate(fd, 0)
    os.pwrite(fd, note.encode(), 0)


def _release_lock(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
    os.close(fd)  # closing the only descriptor drops the flock


# --------------------------------------------------------------------------------------
# The kernel

_open_here = 0  # LinuxKernel instances open in this process


class LinuxKernel:
    """The real kernel's KSM behind the :class:`ksmlab.api.Kernel` interface.

    Construction checks that KSM is usable, takes the global lock, saves every
    writable knob and (in the main thread) turns SIGINT/SIGTERM into
    exceptions; :meth:`close` (or leaving the ``with`` block, also by an
    exception or a signal) undoes all of it.

    Args:
        lock_path: the lock file (default :func:`default_lock_path`).
        lock_timeout: seconds to wait for another session to release the lock.
        handle_signals: install the SIGINT/SIGTERM handlers (main thread only).

    Raises:
        KsmUnavailableError: KSM is absent or cannot be written here.
        KsmLockTimeoutError: another session kept the lock past *lock_timeout*.
        RuntimeError: a LinuxKernel is already open in this process.
    """

    def __init__(self, *, lock_path: str | None = None,
                 lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
                 handle_signals: bool = True) -> None:
        global _open_here
        reason = linux_ksm_unavailable_reason()
        if reason:
            raise KsmUnavailableError(reason)
        if _open_here:
            # flock conflicts between two descriptors of one process too, so
            # this would only wait for the timeout: say so at once.
            raise RuntimeError(f"a LinuxKernel is already open in this process "
                               f"(pid {os.getpid()}); close it first, KSM state is global")
        self._closed = True  # until fully set up
        self._closing = False
        self._signalled = False
        self._deferred: list[int] = []
        self._old_handlers: dict[int, signal.Handlers | Callable[[int, FrameType | None], object]
                                 | int | None] = {}
        self._procs: list[LinuxProcess] = []
        self._stubs: list[subprocess.Popen[bytes]] = []
        self.lock_path = lock_path or default_lock_path()
        self._lock_fd, stale = _acquire_lock(self.lock_path, lock_timeout)
        try:
            self._sysfs = LinuxSysfs(self)
            self._saved = {n: _normalise(n, self._sysfs[n]) for n in self._sysfs.writable()}
            knobs = " ".join(f"{n}={v}" for n, v in sorted(self._saved.items()))
            _write_note(self._lock_fd, f"; saved knobs: {knobs}")
            if stale:
                warnings.warn(
                    f"a previous ksmlab session did not close cleanly ({stale}); the KSM "
                    f"knobs saved now are what it left, which may not be this machine's "
                    f"usual values", RuntimeWarning, stacklevel=2)
            self._probe_writable()
            self._ran = self._saved.get("run") == "1"
            if handle_signals and threading.current_thread() is threading.main_thread():
                for sig in (signal.SIGINT, signal.SIGTERM):
                    self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        except BaseException:
            self._restore_handlers()
            _release_lock(self._lock_fd)
            raise
        self._closed = False
        _open_here += 1

    def _probe_writable(self) -> None:
        # Writing run's current value back is a no-op in the kernel, and it is
        # the one sure test that this sysfs accepts writes (e.g. not a
        # read-only bind mount that statvfs did not reveal).
        run = self._saved.get("run")
        if run is None:
            raise KsmUnavailableError(f"{KSM_SYSFS_DIR}/run is not a writable knob here.")
        try:
            fd = os.open(os.path.join(KSM_SYSFS_DIR, "run"), os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, run.encode())
            finally:
                os.close(fd)
        except OSError as err:
            raise KsmUnavailableError(
                f"{KSM_SYSFS_DIR}/run cannot be written ({err.strerror}), "
                f"so KSM cannot be driven here.") from err

    # --- state -----------------------------------------------------------------------

    @property
    def saved_knobs(self) -> dict[str, str]:
        """The knob values saved on entry (``advisor_mode`` as its bare value)."""
        return dict(self._saved)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run."""
        return self._closed

    @property
    def sysfs(self) -> LinuxSysfs:
        """The real ``/sys/kernel/mm/ksm`` (writes refused once closed)."""
        return self._sysfs

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this LinuxKernel is closed; its KSM knobs have been restored")

    def _note_run(self) -> None:
        if self._sysfs["run"] == "1":
            self._ran = True

    def _register(self, proc: LinuxProcess) -> None:
        self._procs.append(proc)

    # --- api.Kernel ------------------------------------------------------------------

    def spawn(self) -> LinuxProcess:
        """Start a new helper process and return its handle."""
        self._check_open()
        exe = build_helper()
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            fd = theirs.fileno()
            # Our child is the helper's "stub" parent, a reaper (see linux_helper.c).
            stub = subprocess.Popen([str(exe), str(fd), "stub"], pass_fds=(fd,),
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        except BaseException:
            mine.close()
            theirs.close()
            raise
        theirs.close()
        self._stubs.append(stub)
        try:
            mine.settimeout(_HELPER_START_TIMEOUT)
            hello = mine.recv(_REPLY.size)
            mine.settimeout(None)
            pid = _REPLY.unpack(hello)[0] if len(hello) == _REPLY.size else -1
            if pid <= 0:
                raise ProcessExitedError(f"helper {exe} did not start ({pid=}, stub exit "
                                         f"status {stub.poll()})")
            proc = LinuxProcess(self, mine, pid, stub)
        except BaseException:
            mine.close()  # the helper, if any, exits on EOF
            raise
        self._register(proc)
        # Reap stubs of helpers that have exited meanwhile.
        self._stubs = [s for s in self._stubs if s.poll() is None]
        return proc

    def wait_full_scans(self, n: int = 1, *, timeout: float | None = None) -> None:
        """Wait until ``full_scans`` has grown by *n* from its value now.

        Polls every millisecond.  Raises
        :class:`~ksmlab.errors.ScanStalledError` at once if ksmd is not
        running (``run`` != 1) or cannot progress (``pages_to_scan`` = 0 with
        the advisor off), or when *timeout* seconds (default
        :data:`DEFAULT_SCAN_TIMEOUT`) pass.  Note that ``full_scans`` also stops
        when no process has a mergeable area (empty mm list).
        """
        self._check_open()
        if n < 0:
            raise ValueError(f"n={n} must be >= 0")
        limit = DEFAULT_SCAN_TIMEOUT if timeout is None else timeout
        sysfs = self._sysfs
        start = prev = int(sysfs["full_scans"])
        target = start + n
        deadline = time.monotonic() + limit
        while True:
            cur = int(sysfs["full_scans"])
            if cur < prev:
                # run=2 reset the count under us; keep the number still owed.
                target = cur + (target - prev)
            prev = cur
            if cur >= target:
                return
            run = sysfs["run"]
            why = None
            if run != "1":
                why = "ksmd is not running"
            elif sysfs["pages_to_scan"] == "0" and "[none]" in sysfs["advisor_mode"]:
                why = "pages_to_scan is 0, so ksmd scans nothing"
            elif time.monotonic() >= deadline:
                why = f"timed out after {limit:g} s"
            if why:
                raise ScanStalledError(
                    f"waiting for {n} full scan(s): {why} (full_scans={cur}, wanted {target}; "
                    f"run={run}, pages_to_scan={sysfs['pages_to_scan']}, "
                    f"sleep_millisecs={sysfs['sleep_millisecs']})")
            time.sleep(_POLL_INTERVAL)

    def advance(self, ms: float) -> None:
        """Let *ms* milliseconds of real time pass (ksmd keeps running meanwhile)."""
        if ms < 0:
            raise ValueError(f"ms={ms} must be >= 0")
        time.sleep(ms / 1000)

    # --- teardown --------------------------------------------------------------------

    def __enter__(self) -> Self:
        """Return self; everything was set up by the constructor."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close; a restore failure becomes a note on a body exception, not raised over it."""
        body = exc[1] if len(exc) > 1 and isinstance(exc[1], BaseException) else None
        try:
            self.close()
        except KsmRestoreError as err:
            if body is None:
                raise
            body.add_note(str(err))

    def close(self) -> None:
        """Kill the helpers, unmerge, restore every knob, restore signal handlers, unlock.

        Order:

        1. SIGKILL every helper process this kernel started (and wait for each).
        2. If ksmd ran during the session (saved ``run`` was 1, or ``run`` was set
           to 1), write ``run=2``: this un-merges **every** KSM page on the
           machine and resets the counters.
        3. The advisor's parameters, then ``advisor_mode``, then
           ``pages_to_scan`` (skipped if the saved mode is scan-time, where the
           kernel refuses it), then the other knobs, then ``merge_across_nodes``
           and ``max_page_sharing`` (these need no KSM pages: on EBUSY, run=2 is
           written and the write retried).  A knob that already has its saved
           value is not written.
        4. ``run``: a saved 0 stays 2 if step 2 (or a retry) wrote run=2 (the
           project rule: end with run=2 when it merged), otherwise the saved value.
        5. The old signal handlers, then the lock.  A signal that arrived during
           all this is delivered afterwards.

        Raises:
            KsmRestoreError: some knob could not be restored (all others were).
        """
        global _open_here
        if self._closed or self._closing:
            return
        self._closing = True
        failures: list[tuple[str, str, OSError]] = []
        try:
            for proc in self._procs:
                proc._kill()
            self._procs.clear()
            for stub in self._stubs:
                # With every helper gone a stub has nothing left to reap and exits.
                try:
                    stub.wait(timeout=_EXIT_TIMEOUT)
                except subprocess.TimeoutExpired:
                    stub.kill()
                    stub.wait()
            self._stubs.clear()
            failures = self._restore_knobs()
        finally:
            self._closed = True
            _open_here -= 1
            self._restore_handlers()
            _release_lock(self._lock_fd)
            deferred, self._deferred = self._deferred, []
        for sig in deferred:
            signal.raise_signal(sig)
        if failures:
            raise KsmRestoreError(failures)

    def _write_knob(self, name: str, value: str) -> None:
        fd = os.open(os.path.join(KSM_SYSFS_DIR, name), os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)

    def _current(self, name: str) -> str:
        return _normalise(name, self._sysfs[name])

    def _restore_knobs(self) -> list[tuple[str, str, OSError]]:
        saved = self._saved
        failures: list[tuple[str, str, OSError]] = []
        unmerged = False

        def unmerge() -> None:
            nonlocal unmerged
            try:
                self._write_knob("run", "2")
                unmerged = True
            except OSError as err:
                # run=2 failing (ENOMEM/EINTR) leaves run=0 in the kernel.
                failures.append(("run", "2", err))

        def restore(name: str) -> None:
            if name not in saved or self._current(name) == saved[name]:
                return
            try:
                self._write_knob(name, saved[name])
            except OSError as err:
                if err.errno == errno.EBUSY and name in _NEED_NO_KSM_PAGES and not unmerged:
                    unmerge()
                    try:
                        self._write_knob(name, saved[name])
                    except OSError as err2:
                        failures.append((name, saved[name], err2))
                else:
                    failures.append((name, saved[name], err))

        if self._ran or self._current("run") == "1":
            unmerge()
        for name in _ADVISOR_PARAMS:
            restore(name)
        restore("advisor_mode")
        if saved.get("advisor_mode") != "scan-time":
            restore("pages_to_scan")
        special = {"run", "advisor_mode", "pages_to_scan", *_ADVISOR_PARAMS, *_NEED_NO_KSM_PAGES}
        for name in sorted(saved):
            if name not in special:
                restore(name)
        for name in _NEED_NO_KSM_PAGES:
            restore(name)
        final_run = saved.get("run", "0")
        if final_run == "0" and unmerged:
            final_run = "2"
        if self._current("run") != final_run:
            try:
                self._write_knob("run", final_run)
            except OSError as err:
                failures.append(("run", final_run, err))
        return failures

    # --- signals ---------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._closing or self._signalled:
            # Finish restoring first.  After the first signal became an
            # exception, later ones are deferred too: raising again while the
            # first unwinds could skip close() altogether.
            self._deferred.append(signum)
            return
        self._signalled = True
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    def _restore_handlers(self) -> None:
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        self._old_handlers.clear()


if TYPE_CHECKING:
    def _conforms(k: LinuxKernel, p: LinuxProcess, s: LinuxSysfs) -> tuple[Kernel, Process, Sysfs]:
        """Never called: makes mypy check that the classes satisfy the api Protocols."""
        return k, p, s
