"""Ctrl-C and SIGTERM during ``ksmlab run``: stop at the next safe point and keep what was reached.

:func:`graceful_stop` installs SIGINT and SIGTERM handlers for the duration
of a run.  The first signal only records itself (and says so on stderr); the
runner asks :meth:`StopRequest.__call__` at its safe points, ends there, and
the command prints and writes the checkpoints reached, marked partial, and
exits 130.  A second signal aborts at once (``KeyboardInterrupt``), as
Ctrl-C always did.

On ``--backend linux`` the session installs its own handlers on top of these
(:mod:`ksmlab.backends.linux_signals`); it sees that the handler beneath is
graceful (``ksmlab_graceful``) and lets it decide, so the first signal stops
the run at a safe point, and the session still restores the host when it
closes (holding any signal that comes meanwhile).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

__all__ = ["StopRequest", "graceful_stop"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_Handler = signal.Handlers | Callable[[int, FrameType | None], object] | int | None


class StopRequest:
    """Whether a stop was asked for, and by which signal; callable as the runner's stop check."""

    def __init__(self) -> None:
        self.signal: str | None = None

    def __call__(self) -> str | None:
        """The signal's name once one came (``"SIGINT"``), else None."""
        return self.signal


class _GracefulHandler:
    """The signal handler: the first signal becomes a stop request, a second one aborts."""

    ksmlab_graceful = True  # see ksmlab.backends.linux_signals.is_graceful

    def __init__(self, request: StopRequest) -> None:
        self.request = request

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.request.signal is not None:
            raise KeyboardInterrupt
        self.request.signal = signal.Signals(signum).name
        # os.write, not print: a handler may run in the middle of a write to sys.stderr.
        lead = "\n" if os.isatty(2) else ""  # off the line of the progress bar and the ^C
        os.write(2, f"{lead}ksmlab: {self.request.signal}: stopping at the next safe point to save "
                    f"what was reached (Ctrl-C again to abort)\n".encode())


@contextmanager
def graceful_stop() -> Iterator[StopRequest]:
    """A :class:`StopRequest` fed by SIGINT/SIGTERM while the block runs (main thread only)."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request  # Python lets the main thread alone set handlers
        return
    handler = _GracefulHandler(request)
    old: dict[int, _Handler] = {}
    try:
        for sig in _SIGNALS:
            old[sig] = signal.signal(sig, handler)
        yield request
    finally:
        for signum, previous in old.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
