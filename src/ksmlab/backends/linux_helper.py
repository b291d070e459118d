"""The C helper process of the Linux backend: building it, starting it, its command protocol.

``linux_helper.c`` is compiled on first use (:func:`build_helper`) and cached
by source hash; :func:`start_helper` starts one under its reaper stub.  A
:class:`~ksmlab.backends.linux_process.LinuxProcess` talks to its helper over a
``SOCK_SEQPACKET`` socket: a new helper first sends its pid
(:func:`receive_hello`), then answers each request (:data:`_REQ`: an
operation code, a path length and six 64-bit arguments, then the path) with
one reply (:data:`_REPLY`: the result or ``-errno``).  The public names
(:func:`build_helper`, :func:`helper_unavailable_reason`,
:class:`HelperBuildError`) are re-exported by :mod:`ksmlab.backends.linux`.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import os
import shutil
import socket
import struct
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Final

from ksmlab.errors import KsmSimError, ProcessExitedError

__all__ = [
    "HelperBuildError",
    "build_helper",
    "helper_unavailable_reason",
    "receive_hello",
    "start_helper",
]

_HELPER_SOURCE: Final = "linux_helper.c"
_HELPER_START_TIMEOUT: Final = 30.0

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
# Building


class HelperBuildError(KsmSimError, RuntimeError):
    """The C helper process could not be compiled."""


def helper_unavailable_reason() -> str | None:
    """Say why the helper process cannot be built or run here, or ``None`` if it can."""
    try:
        build_helper()
    except HelperBuildError as err:
        return str(err)
    return None


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
    because it keeps the helper's own mappings few (the helper takes them out
    of merging under MERGE_ANY, ``withdraw_own`` in the source).

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


# --------------------------------------------------------------------------------------
# Starting


def receive_hello(sock: socket.socket) -> int:
    """Wait for a new helper's first message, its pid; -1 if the channel closed first."""
    sock.settimeout(_HELPER_START_TIMEOUT)
    hello = sock.recv(_REPLY.size)
    sock.settimeout(None)
    return int(_REPLY.unpack(hello)[0]) if len(hello) == _REPLY.size else -1


def start_helper(keep_stub: Callable[[subprocess.Popen[bytes]], None],
                 ) -> tuple[socket.socket, int, subprocess.Popen[bytes]]:
    """Start a helper under its stub; return our end of its channel, its pid and the stub.

    The stub (our child) forks the helper and then only reaps (see
    ``linux_helper.c``).  *keep_stub* receives the stub as soon as it runs,
    before the helper has answered, so that its owner waits for it on close
    even if the helper never starts.

    Raises:
        HelperBuildError: the helper cannot be compiled.
        ProcessExitedError: the helper did not start.
    """
    exe = build_helper()
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        fd = theirs.fileno()
        stub = subprocess.Popen([str(exe), str(fd), "stub"], pass_fds=(fd,),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    except BaseException:
        mine.close()
        theirs.close()
        raise
    theirs.close()
    try:
        keep_stub(stub)
        pid = receive_hello(mine)
        if pid <= 0:
            raise ProcessExitedError(f"helper {exe} did not start ({pid=}, stub exit "
                                     f"status {stub.poll()})")
    except BaseException:
        mine.close()  # the helper, if any, exits on EOF
        raise
    return mine, pid, stub
