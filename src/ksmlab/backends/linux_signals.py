"""SIGINT and SIGTERM during a Linux session: exceptions while it runs, held while it restores.

A :class:`~ksmlab.backends.linux_session.LinuxSession` installs
:class:`SessionSignals` for its life, so that Ctrl-C or a ``kill`` unwinds
through ``with``/``finally`` blocks and the knobs are restored.  From the
moment the session starts closing (and after the first signal already became
an exception) further signals are held, and delivered with the old handlers
back in place once everything is restored.

A handler installed before the session that only asks the program to stop
(``ksmlab run``'s, marked by :func:`is_graceful`) is let decide instead: the
first signal then becomes that request, the run ends at a safe point and the
session closes as usual; if the handler raises (a second Ctrl-C), the
exception unwinds as above.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType

__all__ = ["SessionSignals", "is_graceful"]

_Handler = signal.Handlers | Callable[[int, FrameType | None], object] | int | None
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def is_graceful(handler: object) -> bool:
    """Whether *handler* turns a signal into a stop request (attribute ``ksmlab_graceful``)."""
    return callable(handler) and bool(getattr(handler, "ksmlab_graceful", False))


class SessionSignals:
    """The SIGINT/SIGTERM handlers of one session, and the signals it holds back."""

    def __init__(self) -> None:
        self._holding = False
        self._signalled = False
        self._deferred: list[int] = []
        self._old: dict[int, _Handler] = {}

    def install(self) -> None:
        """Turn SIGINT/SIGTERM into exceptions (Python allows it in the main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in _SIGNALS:
            self._old[sig] = signal.signal(sig, self._on_signal)

    def hold(self) -> None:
        """Hold every signal from now on (the session is restoring the machine)."""
        self._holding = True

    def uninstall(self) -> None:
        """Put the previous handlers back (a no-op if none were installed)."""
        for sig, old in self._old.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        self._old.clear()

    def take_held(self) -> list[int]:
        """The signals held so far, in arrival order (forgotten here)."""
        held, self._deferred = self._deferred, []
        return held

    @staticmethod
    def deliver(held: list[int]) -> None:
        """Raise each held signal again, now under the handlers in place."""
        for sig in held:
            signal.raise_signal(sig)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._holding or self._signalled:
            # Finish restoring first.  After the first signal became an
            # exception, later ones are deferred too: raising again while the
            # first unwinds could skip close() altogether.
            self._deferred.append(signum)
            return
        old = self._old.get(signum)
        if callable(old) and is_graceful(old):
            try:
                old(signum, frame)  # a stop request: the program ends the run itself
            except BaseException:
                self._signalled = True  # it chose to abort: hold the next ones, as below
                raise
            return
        self._signalled = True
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)
