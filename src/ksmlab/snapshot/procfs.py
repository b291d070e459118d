"""What a snapshot reads about a process from ``/proc``: who it is, and which areas KSM could merge.

Every file is opened relative to a descriptor of the ``/proc/PID`` directory,
taken once: if the process exits and its pid is reused, reads fail (ESRCH or
ENOENT) instead of reading the newcomer.  Nothing here writes.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass, field
from typing import Final

from ksmlab.backends.linux_procfs import parse_ksm_stat
from ksmlab.errors import KsmSimError

__all__ = [
    "POLICIES",
    "Area",
    "ProcessGoneError",
    "ProcessHandle",
    "SnapshotPermissionError",
    "area_selected",
    "parse_smaps_areas",
]

POLICIES: Final = ("as-is", "merge-any")
"""``as-is``: the areas that are VM_MERGEABLE now; ``merge-any``: those
``prctl(PR_SET_MEMORY_MERGE)`` would make mergeable (docs/snapshot.md)."""

# VmFlags mnemonics of the flags that make an area incompatible with KSM
# (vma_ksm_compatible; spec 1.3): shared, may-share, PFN map, I/O, do-not-
# expand, mixed map, hugetlb, droppable.  A DAX file has no mnemonic: it is
# not recognised (docs/snapshot.md).
INCOMPATIBLE_FLAGS: Final = frozenset({"sh", "ms", "pf", "io", "de", "mm", "ht", "dp"})
MERGEABLE_FLAG: Final = "mg"

_HEADER: Final = re.compile(
    r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) ([0-9a-f]+) ([0-9a-f]+:[0-9a-f]+) (\d+)\s*(.*)$")
_SIZE_FIELDS: Final = {"Rss": "rss", "Anonymous": "anonymous", "Swap": "swap", "KSM": "ksm",
                       "AnonHugePages": "anon_huge"}

_PF_KTHREAD: Final = 0x00200000
"""``PF_KTHREAD`` in the flags field of ``/proc/PID/stat``: a kernel thread has no user memory."""

_CAP_SYS_ADMIN: Final = 21

_KERNEL_HALF: Final = 1 << 63


class SnapshotPermissionError(KsmSimError, PermissionError):
    """The caller may not read a target process; the message names the pid and the privilege."""


class ProcessGoneError(KsmSimError, ProcessLookupError):
    """The process exited (or was never there); ESRCH."""


@dataclass
class Area:
    """One area (vma) of ``/proc/PID/smaps``, as a snapshot records it.

    Sizes are bytes (smaps shows kB).  ``path`` is the mapping's name: a file,
    ``[heap]``, ``[stack]``, or empty for anonymous memory.
    """

    start: int
    end: int
    perms: str
    offset: int
    inode: int
    path: str
    flags: tuple[str, ...]
    sizes: dict[str, int] = field(default_factory=dict)

    @property
    def mergeable(self) -> bool:
        """VM_MERGEABLE now (``mg``)."""
        return MERGEABLE_FLAG in self.flags

    @property
    def compatible(self) -> bool:
        """Whether KSM may ever merge here (no flag of vma_ksm_compatible's exclusions)."""
        return not INCOMPATIBLE_FLAGS.intersection(self.flags)

    def to_json(self) -> dict[str, object]:
        """The area's entry in a process's ``vmas`` list (docs/snapshot.md)."""
        return {"start": self.start, "end": self.end, "perms": self.perms, "offset": self.offset,
                "inode": self.inode, "path": self.path, "flags": list(self.flags),
                "mergeable": self.mergeable,
                **{k: self.sizes.get(k, 0) for k in _SIZE_FIELDS.values()}}


def parse_smaps_areas(text: str) -> list[Area]:
    """Every area of ``/proc/PID/smaps`` text, in address order."""
    out: list[Area] = []
    cur: Area | None = None
    for line in text.splitlines():
        m = _HEADER.match(line)
        if m:
            cur = Area(int(m[1], 16), int(m[2], 16), m[3], int(m[4], 16), int(m[6]), m[7],
                       ())
            out.append(cur)
            continue
        if cur is None:
            continue
        key, _, rest = line.partition(":")
        if key == "VmFlags":
            cur.flags = tuple(rest.split())
        elif key in _SIZE_FIELDS:
            cur.sizes[_SIZE_FIELDS[key]] = int(rest.split()[0]) * 1024
    return out


def area_selected(area: Area, policy: str) -> bool:
    """Whether a snapshot under *policy* records the pages of *area*.

    ``as-is``: the area is VM_MERGEABLE now.  ``merge-any``: it is, or
    ``prctl(PR_SET_MEMORY_MERGE)`` would make it so (it is compatible:
    ``ksm_add_vmas`` marks every compatible area; spec 2.6).
    """
    if area.start >= _KERNEL_HALF:
        return False  # [vsyscall]: the gate area, listed in smaps but no vma of the mm
    if area.mergeable:
        return True
    return policy == "merge-any" and area.compatible


def has_cap_sys_admin() -> bool:
    """Whether this process has CAP_SYS_ADMIN, which ``pagemap`` needs to show PFNs."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_SYS_ADMIN & 1)
    except OSError:
        pass
    return False


def _privilege_hint(pid: int, target_uid: int | None) -> str:
    me = os.geteuid()
    if target_uid is not None and target_uid != me:
        return (f"pid {pid} belongs to uid {target_uid} and you are uid {me}: reading another "
                f"user's process needs CAP_SYS_PTRACE (run ksmlab snapshot as root)")
    yama = ""
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            yama = f" (kernel.yama.ptrace_scope is {f.read().strip()})"
    except OSError:
        pass
    return (f"pid {pid} may not be traced by you: it is not dumpable (a setuid or "
            f"privileged program) or ptrace is restricted{yama}; CAP_SYS_PTRACE (root) is needed")


class ProcessHandle:
    """One target process: its ``/proc/PID`` directory and the descriptors a pass reads.

    Construction opens the directory, reads who the process is, and opens
    ``pagemap`` and ``mem`` (where the kernel checks ptrace access), so a
    process the caller may not read is refused before anything is captured.

    Raises:
        ProcessGoneError: no such process, or it exited (ESRCH).
        SnapshotPermissionError: the caller may not read it (EACCES/EPERM).
    """

    def __init__(self, pid: int, proc: str = "/proc") -> None:
        self.pid = pid
        self.uid: int | None = None
        try:
            self.dirfd = os.open(f"{proc}/{pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            raise ProcessGoneError(errno.ESRCH, f"pid {pid}: no such process") from None
        self.pagemap = self.mem = -1
        try:
            self._read_identity()
            self.pagemap = self._open("pagemap")
            self.mem = self._open("mem")
        except BaseException:
            self.close()
            raise

    def _open(self, name: str) -> int:
        try:
            return os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self.dirfd)
        except PermissionError:
            raise SnapshotPermissionError(
                errno.EACCES, f"pid {self.pid} ({self.comm}): permission denied reading "
                f"/proc/{self.pid}/{name}: {_privilege_hint(self.pid, self.uid)}") from None
        except (FileNotFoundError, ProcessLookupError):
            raise ProcessGoneError(errno.ESRCH, f"pid {self.pid}: the process exited") from None

    def read_text(self, name: str) -> str:
        """A file of the process directory (ProcessGoneError once it exited)."""
        try:
            fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self.dirfd)
        except PermissionError:
            raise SnapshotPermissionError(
                errno.EACCES, f"pid {self.pid} ({self.comm}): permission denied reading "
                f"/proc/{self.pid}/{name}: {_privilege_hint(self.pid, self.uid)}") from None
        except (FileNotFoundError, ProcessLookupError):
            raise ProcessGoneError(errno.ESRCH, f"pid {self.pid}: the process exited") from None
        try:
            chunks = []
            while True:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
            return b"".join(chunks).decode("utf-8", "surrogateescape")
        except ProcessLookupError:
            raise ProcessGoneError(errno.ESRCH, f"pid {self.pid}: the process exited") from None
        finally:
            os.close(fd)

    def _read_identity(self) -> None:
        self.comm = ""
        stat = self.read_text("stat")
        lp, rp = stat.find("("), stat.rfind(")")
        self.comm = stat[lp + 1:rp]
        fields = stat[rp + 2:].split()
        # After comm: state(0) ppid(1) ... flags(6) ... starttime(19).
        self.state = fields[0]
        self.ppid = int(fields[1])
        self.kernel_thread = bool(int(fields[6]) & _PF_KTHREAD)
        self.start_time = int(fields[19])
        status = self.read_text("status")
        uids = re.search(r"^Uid:\s+(\d+)\s+(\d+)", status, re.M)
        self.uid = int(uids[2]) if uids else None  # effective, as ps -u and pgrep -u
        self.cgroup, self.cgroups = _parse_cgroup(self.read_text("cgroup"))

    @property
    def exited(self) -> bool:
        """Whether the process has exited (a zombie has no memory left either)."""
        try:
            stat = self.read_text("stat")
        except ProcessGoneError:
            return True
        return stat[stat.rfind(")") + 2:][:1] in ("Z", "X")

    def areas(self) -> list[Area]:
        """The process's areas now (ProcessGoneError once it exited)."""
        return parse_smaps_areas(self.read_text("smaps"))

    def ksm_stat(self) -> dict[str, int | bool] | None:
        """``/proc/PID/ksm_stat``, or None where the kernel has no such file."""
        try:
            return dict(parse_ksm_stat(self.read_text("ksm_stat")))
        except ProcessGoneError:
            if self.exited:
                raise
            return None

    def close(self) -> None:
        """Close every descriptor (idempotent)."""
        for fd in (self.mem, self.pagemap, self.dirfd):
            if fd >= 0:
                os.close(fd)
        self.mem = self.pagemap = self.dirfd = -1


def _parse_cgroup(text: str) -> tuple[str, dict[str, str]]:
    """The cgroup v2 path (or v1 memory controller's) and every hierarchy's path."""
    paths: dict[str, str] = {}
    for line in text.splitlines():
        _, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        paths[controllers or "unified"] = path
    main = paths.get("unified")
    if main is None or (main == "/" and "memory" in paths):
        main = paths.get("memory", main or "/")
    return main, paths


def cgroup_members(path: str, proc: str = "/proc") -> set[int]:
    """The pids in cgroup *path* and its descendants.

    *path* is a cgroup directory (``/sys/fs/cgroup/...``, its ``cgroup.procs``
    files are read, recursively) or a cgroup path as ``/proc/PID/cgroup``
    shows it (``/system.slice/x.service``), matched against every hierarchy.

    Raises:
        ValueError: *path* names no cgroup (no directory, and no process in it).
    """
    pids: set[int] = set()
    if os.path.isfile(os.path.join(path, "cgroup.procs")):
        for root, _, files in os.walk(path):
            if "cgroup.procs" in files:
                try:
                    with open(os.path.join(root, "cgroup.procs")) as f:
                        pids.update(int(x) for x in f.read().split())
                except OSError:
                    continue  # removed meanwhile
        return pids
    want = "/" + path.strip("/")
    for pid in all_pids(proc):
        try:
            with open(f"{proc}/{pid}/cgroup") as f:
                _, paths = _parse_cgroup(f.read())
        except OSError:
            continue
        if any(p == want or p.startswith(want.rstrip("/") + "/") for p in paths.values()):
            pids.add(pid)
    return pids


def all_pids(proc: str = "/proc") -> list[int]:
    """Every pid in ``/proc``, ascending."""
    return sorted(int(e) for e in os.listdir(proc) if e.isdigit())


def uid_members(uid: int, proc: str = "/proc") -> set[int]:
    """The pids whose effective uid is *uid*."""
    out = set()
    for pid in all_pids(proc):
        try:
            with open(f"{proc}/{pid}/status") as f:
                m = re.search(r"^Uid:\s+\d+\s+(\d+)", f.read(), re.M)
        except OSError:
            continue
        if m and int(m[1]) == uid:
            out.add(pid)
    return out


def is_user_process(pid: int, proc: str = "/proc") -> bool:
    """Whether *pid* has user memory: not a kernel thread, not a zombie, still there."""
    try:
        with open(f"{proc}/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    fields = stat[stat.rfind(")") + 2:].split()
    return fields[0] not in ("Z", "X") and not int(fields[6]) & _PF_KTHREAD
