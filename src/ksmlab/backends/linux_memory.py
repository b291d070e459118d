"""Reading and writing a helper's memory from this process, as the Linux backend does it.

A :class:`~ksmlab.backends.linux_process.LinuxProcess` checks its arguments
and delegates here: plain writes go through ``process_vm_writev`` (through
ctypes; it respects protections), reads and forced writes through
``/proc/PID/mem`` (ptrace-style access), page frame numbers come from
``/proc/PID/pagemap``.  Every access first checks the whole range against
``/proc/PID/maps``, so a refused access changes nothing.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Callable
from typing import Final

from ksmlab.backends.linux_procfs import parse_maps
from ksmlab.constants import PAGE_SHIFT

__all__ = ["read_memory", "read_pfns", "write_memory"]

_U64_MASK: Final = (1 << 64) - 1
_PFN_MASK: Final = (1 << 55) - 1
_PM_PRESENT: Final = 1 << 63


# --------------------------------------------------------------------------------------
# process_vm_writev through ctypes


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
# The up-front range check


def _check_range(pid: int, addr: int, length: int, perm: str, err: int) -> None:
    """Raise ``OSError(err)`` unless every page of the range is mapped with *perm*.

    *perm* ``"force-write"`` accepts what a forced write can change
    (``check_vma_flags``): a writable mapping, or a private (COW) one.
    Checking first is what makes a refused access leave memory untouched:
    the kernel itself copies page by page and stops at the first bad page.
    """
    if addr < 0 or addr + length > _U64_MASK:
        raise OSError(err, os.strerror(err))
    with open(f"/proc/{pid}/maps") as f:
        maps = parse_maps(f.read())
    pos, end = addr, addr + length
    for vma in maps:
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


# --------------------------------------------------------------------------------------
# Access


def write_memory(pid: int, addr: int, buf: bytes, *, force: bool) -> None:
    """Write *buf* at *addr* in process *pid* (see :meth:`LinuxProcess.write`)."""
    if not buf:
        return
    if force:
        _check_range(pid, addr, len(buf), "force-write", errno.EIO)
        fd = os.open(f"/proc/{pid}/mem", os.O_RDWR | os.O_CLOEXEC)
        try:
            done = 0
            while done < len(buf):
                done += os.pwrite(fd, buf[done:], addr + done)
        finally:
            os.close(fd)
        return
    _check_range(pid, addr, len(buf), "w", errno.EFAULT)
    cbuf = ctypes.create_string_buffer(buf, len(buf))
    done = _vm_rw("process_vm_writev", pid, cbuf, addr, len(buf))
    if done != len(buf):
        raise OSError(errno.EFAULT, f"{os.strerror(errno.EFAULT)} (short write: "
                      f"{done} of {len(buf)} bytes)")


def read_memory(pid: int, addr: int, length: int, *, force: bool) -> bytes:
    """Read *length* bytes at *addr* in process *pid* (see :meth:`LinuxProcess.read`)."""
    if length == 0:
        return b""
    # Not process_vm_readv: it pins the pages (FOLL_PIN), and a read-only
    # pin of an anonymous page that is not exclusive (every KSM page, and a
    # page still shared with a fork relative) first *unshares* it: the
    # reader gets a private copy and cow_ksm grows (found by the
    # differential suite, docs/differential.md).  /proc/PID/mem takes plain
    # references (FOLL_GET), which unshare nothing.
    if force:
        _check_range(pid, addr, length, "", errno.EIO)
    else:
        _check_range(pid, addr, length, "r", errno.EFAULT)
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
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


def read_pfns(pid: int, addr: int, length: int) -> list[int | None]:
    """Page frame numbers of the range from ``/proc/PID/pagemap`` (see :meth:`LinuxProcess.pfns`)."""
    if length == 0:
        return []
    first = addr >> PAGE_SHIFT
    last = (addr + length - 1) >> PAGE_SHIFT
    n = last - first + 1
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        raw = os.pread(fd, 8 * n, 8 * first)
    finally:
        os.close(fd)
    out: list[int | None] = []
    for (entry,) in struct.iter_unpack("<Q", raw):
        out.append(entry & _PFN_MASK if entry & _PM_PRESENT else None)
    out += [None] * (n - len(out))  # beyond TASK_SIZE pagemap reads short
    return out
