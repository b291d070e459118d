"""``/sys/kernel/mm/ksm`` as the Linux backend sees it: :class:`LinuxSysfs`.

A :class:`LinuxSysfs` belongs to a
:class:`~ksmlab.backends.linux_session.LinuxSession`: it refuses writes once
the session is closed (:meth:`~ksmlab.backends.linux_session.LinuxSession.check_open`)
and tells it of every write of ``run``
(:meth:`~ksmlab.backends.linux_session.LinuxSession.note_run`).
Re-exported by :mod:`ksmlab.backends.linux`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ksmlab.backends.linux_knobs import KSM_SYSFS_DIR, writable_knobs
from ksmlab.ksm.sysfs import require_text

if TYPE_CHECKING:
    from ksmlab.backends.linux_session import LinuxSession

__all__ = ["KSM_SYSFS_DIR", "LinuxSysfs"]

class LinuxSysfs:
    """``/sys/kernel/mm/ksm`` as a mapping of file name to text (satisfies ``api.Sysfs``).

    Reads return the file's text without the trailing newline.  Writes are one
    ``write(2)`` of exactly the given text, so a refused write raises the
    kernel's own errno (``EINVAL``, ``EBUSY``, ``ERANGE``; ``EACCES`` for the
    read-only counters).
    """

    def __init__(self, session: LinuxSession, directory: str = KSM_SYSFS_DIR) -> None:
        self._session = session
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
        require_text(name, value)
        self._session.check_open()
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
        if name == "run":
            self._session.note_run()

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
        return writable_knobs(self._dir)
