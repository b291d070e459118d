"""Pre-flight: whether a run can start, and on which engine, before anything is built.

``ksmlab run``, ``ksmlab check`` and :func:`ksmlab.run` ask :func:`plan`:

* the scenario's cost on each engine (:mod:`ksmlab.scenario.costs`) against
  the memory available (:func:`mem_available`): a run that would not fit is
  refused with :class:`WontFitError`, naming the figures and the engine that
  would fit;
* the calls of the scenario the engine does not model (:func:`cannot_run`),
  from the engine's own declaration (:mod:`ksmlab.capabilities`): refused with
  :class:`~ksmlab.errors.NotModelledError`, naming them;
* ``auto``: SimKernel where the run fits comfortably (:data:`COMFORT`), the bulk
  engine otherwise (if it models every call the scenario makes), with the reason.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from ksmlab.capabilities import Capability, declared
from ksmlab.errors import KsmSimError, NotModelledError
from ksmlab.mm.page import ContentMode
from ksmlab.scenario.costs import COSTS, Engine, Estimate, engine_of, estimate, rough_time
from ksmlab.scenario.model import (
    ExitEvent,
    ForkEvent,
    KnobsEvent,
    MadviseEvent,
    PrctlEvent,
    Scenario,
)
from ksmlab.scenario.result import describe_action
from ksmlab.scenario.units import format_bytes, parse_size

BackendChoice = Literal["auto", "sim", "bulk", "linux"]

COMFORT = 0.5
"""``auto`` runs SimKernel when its estimate is at most this share of the memory available."""

MEM_ENV = "KSMLAB_MEM_AVAILABLE"
"""Environment variable that replaces MemAvailable (a size: ``"8GiB"``, bytes)."""


# --- what an engine cannot run -----------------------------------------------------------------

def needs(sc: Scenario) -> Iterator[tuple[Capability, str]]:
    """Each capability *sc* needs, with where in the file it comes from (some repeat)."""
    for name, value in sc.knobs:  # in the order of set-up: knobs, processes, then events
        yield from _knob_needs(name, value, "[ksm]")
    if sc.processes:
        yield Capability.MMAP, "[[process]]"
        yield Capability.WRITE, "[[process.mapping]] content"
        yield Capability.KSM_STAT, "[[checkpoint]] (ksm_stat of every process)"
    for i, g in enumerate(sc.processes):
        if g.merge_any:
            yield Capability.PR_SET_MEMORY_MERGE, f"process[{i}] '{g.name}': merge_any = true"
        if any(m.mergeable for m in g.mappings):
            yield Capability.MADV_MERGEABLE, f"process[{i}] '{g.name}': a mergeable mapping"
    madvise = {"mergeable": Capability.MADV_MERGEABLE,
               "unmergeable": Capability.MADV_UNMERGEABLE, "dontneed": Capability.MADV_DONTNEED}
    for e in sc.events:
        where = f"event[{e.index}] {describe_action(e)}"
        if isinstance(e, PrctlEvent):
            yield Capability.PR_SET_MEMORY_MERGE, where
        elif isinstance(e, MadviseEvent):
            yield madvise[e.advice], where
        elif isinstance(e, ForkEvent):
            yield Capability.FORK, where
        elif isinstance(e, ExitEvent):
            yield Capability.EXIT, where
        elif isinstance(e, KnobsEvent):
            for name, value in e.knobs:
                yield from _knob_needs(name, value, f"event[{e.index}]")


def _knob_needs(name: str, value: str, where: str) -> Iterator[tuple[Capability, str]]:
    if name.startswith("advisor_"):
        yield Capability.ADVISOR, f"{where} {name} = {value}"
    elif name == "merge_across_nodes" and value == "0":
        yield Capability.NUMA, f"{where} merge_across_nodes = 0"
    elif name == "run" and value == "2":
        yield Capability.RUN_UNMERGE, f"{where} run = 2"


def _engine_class(backend: str) -> type:
    if backend == "bulk":
        from ksmlab.bulk import BulkKernel

        return BulkKernel
    if backend == "sim":
        from ksmlab.kernel import SimKernel

        return SimKernel
    from ksmlab.backends.linux import LinuxKernel

    return LinuxKernel


def cannot_run(sc: Scenario, backend: str) -> list[str]:
    """What of *sc* the *backend*'s engine does not model, one line per capability and the
    first place that needs it (``prctl(PR_SET_MEMORY_MERGE) (process[0] 'server': merge_any =
    true)``); [] if nothing.  The engine's class says what it models (``MODELS``)."""
    models = declared(_engine_class(backend))
    first: dict[Capability, str] = {}
    for cap, where in needs(sc):
        if cap not in models:
            first.setdefault(cap, where)
    return [f"{cap.value} ({where})" for cap, where in first.items()]


# --- memory available, and the plan ------------------------------------------------------------

def mem_available(meminfo: str = "/proc/meminfo") -> tuple[int, str] | None:
    """The memory a run may use and where the figure comes from, or None if unknown.

    :data:`MEM_ENV` if set (ValueError naming it if it is not a size), else
    ``MemAvailable`` of *meminfo*, else the machine's physical memory.
    """
    env = os.environ.get(MEM_ENV)
    if env is not None:
        try:
            return parse_size(env), MEM_ENV
        except ValueError as e:
            msg = f"{MEM_ENV}: expected {e}, got {env!r}"
            raise ValueError(msg) from None
    try:
        with open(meminfo, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "MemAvailable"
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "physical memory"
    except (OSError, ValueError, AttributeError):
        return None


class WontFitError(KsmSimError, MemoryError):
    """The run would not fit in the memory available; nothing was built.  The message names
    the figures and the engine that would fit, if one would."""


@dataclass(frozen=True, slots=True)
class Plan:
    """How a run will go: on which backend, what it should cost, and why.

    Attributes:
        backend: ``sim``, ``bulk`` or ``linux``.
        content: SimKernel's content mode (``bytes`` unless asked).
        estimate: the estimate on that backend.
        available: the memory available and where the figure comes from (None: unknown).
        reason: why ``auto`` chose it ("" when the backend was given).
    """

    backend: Literal["sim", "bulk", "linux"]
    content: ContentMode
    estimate: Estimate
    available: tuple[int, str] | None
    reason: str = ""

    def describe(self) -> str:
        """One line: the engine and its estimate, or auto's choice and why."""
        if self.reason:
            return f"--backend auto chose {self.backend} ({self.estimate.label}): {self.reason}"
        return f"{self.estimate.label}: {self.estimate.describe()}; {_available(self.available)}"


def _available(available: tuple[int, str] | None) -> str:
    """``22.4 GiB available (MemAvailable)``."""
    if available is None:
        return "the memory available is unknown"
    return f"{format_bytes(available[0])} available ({available[1]})"


def _fits(e: Estimate, available: tuple[int, str] | None, share: float = 1.0) -> bool:
    return available is None or e.peak_bytes <= share * available[0]


def _option(e: Estimate) -> str:
    """The command-line option that runs on the engine of *e*."""
    return "--backend sim --content fingerprint" if e.engine == "fingerprint" else f"--backend {e.engine}"


def _wont_fit(sc: Scenario, tried: Estimate, available: tuple[int, str],
              others: list[Estimate]) -> WontFitError:
    """The refusal of *tried*, naming the smallest of *others* that would fit, if any."""
    fits = [e for e in others if _fits(e, available)]
    if fits:
        best = min(fits, key=lambda e: e.peak_bytes)
        hint = f"{best.label} would need {best.describe()} ({_option(best)})"
    elif others:
        hint = ("no engine would fit (" + ", ".join(f"{e.label}: {format_bytes(e.peak_bytes)}"
                                                    for e in others) + "): make the scenario smaller")
    else:
        hint = "make the scenario smaller"
    pages = tried.size.pages + tried.size.forked_pages
    return WontFitError(f"{sc.source}: this run would not fit in memory: {tried.label} needs "
                        f"{tried.describe()} for {pages:,} pages, and "
                        f"{_available(available).replace(' available', ' is available', 1)}; "
                        f"{hint}")


def _unsupported(sc: Scenario, backend: str, missing: list[str]) -> NotModelledError:
    return NotModelledError(f"{sc.source}: {COSTS[engine_of(backend)].label} cannot run this "
                            f"scenario: it does not model {'; '.join(missing)}; SimKernel models "
                            f"everything (--backend sim)")


def plan(sc: Scenario, backend: str = "auto", content: ContentMode = "bytes", *,
         available: tuple[int, str] | None = None) -> Plan:
    """The backend *sc* will run on and its estimate, checked before anything is built.

    Args:
        sc: the scenario (after ``--until``, ``--knob``, ``--seed``).
        backend: ``auto``, ``sim``, ``bulk`` or ``linux``.
        content: SimKernel's content mode (``auto`` considers SimKernel in it).
        available: the memory available and its source (:func:`mem_available`);
            None: unknown, and nothing is refused.

    Raises:
        NotModelledError: the chosen engine does not model a call the scenario makes.
        WontFitError: the run would not fit in *available* on the chosen engine (with
            ``auto``: on any engine that can run it).
        ValueError: an unknown *backend*.
    """
    if backend not in ("auto", "sim", "bulk", "linux"):
        msg = f"backend must be one of auto, sim, bulk, linux, got {backend!r}"
        raise ValueError(msg)
    sim = estimate(sc, engine_of("sim", content))
    bulk_missing = cannot_run(sc, "bulk")
    models: list[Engine] = [e for e in ("sim", "fingerprint", "bulk")
                            if not (e == "bulk" and bulk_missing)]
    if backend != "auto":
        missing = bulk_missing if backend == "bulk" else cannot_run(sc, backend)
        if missing:
            raise _unsupported(sc, backend, missing)
        mine = sim if backend == "sim" else estimate(sc, engine_of(backend))
        if available is not None and not _fits(mine, available):
            raise _wont_fit(sc, mine, available,
                            [estimate(sc, e) for e in models if e != mine.engine])
        chosen: Literal["sim", "bulk", "linux"] = ("sim" if backend == "sim" else
                                                   "bulk" if backend == "bulk" else "linux")
        return Plan(chosen, content if backend == "sim" else "bytes", mine, available)
    if available is None:
        return Plan("sim", content, sim, None, f"it needs {sim.describe()}, and "
                                               f"{_available(None)}")
    if _fits(sim, available, COMFORT):
        return Plan("sim", content, sim, available,
                    f"it needs {format_bytes(sim.peak_bytes)} at its peak, under half of the "
                    f"{_available(available)}, and {rough_time(sim.seconds)}")
    big = (f"{sim.label} would need {format_bytes(sim.peak_bytes)}, more than half of the "
           f"{_available(available)}")
    bulk = estimate(sc, "bulk")
    if not bulk_missing and _fits(bulk, available):
        return Plan("bulk", "bytes", bulk, available,
                    f"{big}; the bulk engine needs {bulk.describe()}")
    if _fits(sim, available):
        why = (f"the bulk engine does not model {'; '.join(bulk_missing)}" if bulk_missing
               else "the bulk engine would not fit either")
        return Plan("sim", content, sim, available, f"{big}, but {why}; {sim.describe()}")
    raise _wont_fit(sc, sim, available, [estimate(sc, e) for e in models if e != sim.engine])


__all__ = ["COMFORT", "MEM_ENV", "BackendChoice", "Plan", "WontFitError", "cannot_run",
           "mem_available", "needs", "plan"]
