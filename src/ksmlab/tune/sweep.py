"""Running a sweep's configurations: in parallel on Dask, or one by one on the real kernel.

On the model every configuration is an independent simulation, so they run
as Dask tasks (:func:`~ksmlab.tune.work.run_config`): on a
``distributed.LocalCluster`` of this machine (one single-threaded worker
process per core by default: the model holds the GIL), or on an existing
cluster given by its scheduler's address.  Results are taken as they finish
(``as_completed``); a stop request (Ctrl-C, SIGTERM) is looked at between
them, at least every :data:`POLL_S`: the tasks not finished are cancelled
and the sweep returns what finished, marked interrupted.

On ``--backend linux`` the configurations run one after the other in this
process, each a session of :class:`~ksmlab.backends.linux.LinuxKernel`
(which holds the machine-wide lock and restores the knobs): the real KSM is
one resource of the whole machine, so two runs at once would measure each
other.  A stop request also stops the run in progress at its next safe
point; that configuration is then dropped, not reported half done.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ksmlab.errors import ModelInvariantError
from ksmlab.scenario.runner import StopCheck
from ksmlab.tune.grid import Config
from ksmlab.tune.work import Outcome, Workload, run_config

__all__ = ["POLL_S", "SweepResult", "default_workers", "run_sweep"]

POLL_S = 0.1
CONNECT_TIMEOUT_S = 20.0
"""How long ``--scheduler`` waits for the scheduler to answer."""
"""How often a sweep on Dask looks for finished tasks and for a stop request."""

Progress = Callable[[int, Config, Outcome], None]
"""Called after each configuration finishes: (its index, the configuration, its outcome)."""


@dataclass(frozen=True, slots=True)
class SweepResult:
    """What a sweep gave.

    Attributes:
        outcomes: by configuration index; a configuration not finished has none.
        interrupted: the signal that stopped the sweep, or None.
        wall_s: the sweep's wall time (without starting and stopping the cluster).
        workers: the Dask workers the tasks ran on (0: run in this process).
        scheduler: ``local`` (a LocalCluster), the scheduler's address, or ``sequential``.
    """

    outcomes: dict[int, Outcome]
    interrupted: str | None
    wall_s: float
    workers: int
    scheduler: str


def default_workers() -> int:
    """One worker per core this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _sequential(w: Workload, configs: Sequence[Config], progress: Progress | None,
                stop: StopCheck | None) -> SweepResult:
    started = time.perf_counter()
    out: dict[int, Outcome] = {}
    for i, cfg in enumerate(configs):
        if stop is not None and stop() is not None:
            break
        o = run_config(w, i, cfg, stop)
        if stop is not None and stop() is not None:
            break  # stopped mid-run: its figures are of a shorter run, so it is dropped
        out[i] = o
        if progress is not None:
            progress(i, cfg, o)
    return SweepResult(out, None if stop is None else stop(), time.perf_counter() - started, 0,
                       "sequential")


def _distributed() -> Any:
    """The ``distributed`` package, imported when a sweep starts (it ships no type hints)."""
    return importlib.import_module("distributed")


@contextmanager
def _workers_ignore_sigint() -> Iterator[None]:
    """Start the LocalCluster's worker processes with SIGINT ignored.

    A Ctrl-C on a terminal reaches every process of the foreground group: the
    workers would die with a KeyboardInterrupt each (and a traceback on the
    terminal) while the command, which alone decides, stops the sweep.  An
    ignored signal stays ignored across exec, and Python then installs no
    handler of its own, so the workers never see it.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers; the caller owns the signals then
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _client(scheduler: str | None, workers: int) -> tuple[Any, Any]:
    dd = _distributed()
    if scheduler is not None:
        return dd.Client(scheduler, timeout=f"{CONNECT_TIMEOUT_S}s"), None
    # Only CRITICAL records of distributed reach the terminal.  Whatever goes wrong
    # in a configuration reaches the user through its future (a failed outcome
    # naming the exception, KilledWorker for a dead worker); distributed's own
    # ERROR records are shutdown noise here, such as a worker's heartbeat racing
    # the scheduler's close, logged with a traceback (seen once in CI after a Ctrl-C).
    with _workers_ignore_sigint():
        cluster = dd.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                  dashboard_address=None, silence_logs=logging.CRITICAL)
    return dd.Client(cluster), cluster


def _failed(i: int, future: Any) -> Outcome:
    exc = future.exception()
    if isinstance(exc, ModelInvariantError):
        raise exc  # a broken model is never a mere failed configuration
    return Outcome(i, "failed", f"{type(exc).__name__}: {exc}")


def run_sweep(w: Workload, configs: Sequence[Config], *, scheduler: str | None = None,
              workers: int | None = None, progress: Progress | None = None,
              stop: StopCheck | None = None) -> SweepResult:
    """Run every configuration of *configs* on *w* (see the module doc).

    Args:
        scheduler: a Dask scheduler's address (``tcp://HOST:8786``); None: a LocalCluster.
        workers: the LocalCluster's workers (default: one per core).
        progress: called as each configuration finishes.
        stop: asked between results; a reason stops the sweep (the result says which).

    Raises:
        OSError, TimeoutError: the scheduler cannot be reached.
        ModelInvariantError: a worker found the model broken.
    """
    if w.backend == "linux":
        return _sequential(w, configs, progress, stop)
    n = workers if workers is not None else default_workers()
    client, cluster = _client(scheduler, n)
    try:
        used = len(client.scheduler_info().get("workers", {})) if scheduler else n
        token = uuid.uuid4().hex[:8]
        started = time.perf_counter()
        futures = [client.submit(run_config, w, i, cfg, key=f"ksmlab-tune-{token}-{i}",
                                 pure=False) for i, cfg in enumerate(configs)]
        index = {f.key: i for i, f in enumerate(futures)}
        out: dict[int, Outcome] = {}
        reason: str | None = None
        pending = _distributed().as_completed(futures)
        while not pending.is_empty():
            if stop is not None and (reason := stop()) is not None:
                break
            if not pending.has_ready():
                time.sleep(POLL_S)
                continue
            for f in pending.next_batch(block=False):
                i = index[f.key]
                o = f.result() if f.status == "finished" else _failed(i, f)
                out[i] = o
                if progress is not None:
                    progress(i, configs[i], o)
        wall = time.perf_counter() - started
        if reason is not None:
            client.cancel([f for f in futures if not f.done()])
        return SweepResult(out, reason, wall, used, scheduler or "local")
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
