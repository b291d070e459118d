"""Controllers: a daemon on the host that reads KSM's state now and then and rewrites knobs.

A scenario's ``[[event]] knobs`` change knobs at fixed times; a *controller*
changes them from what it observes, as a tuning daemon does (ksmtuned:
:mod:`ksmlab.tune.ksmtuned`).  The scenario runner
(:mod:`ksmlab.scenario.runner`) calls :meth:`Controller.act` at the times it
asks for, as an item of its event heap (after the scenario's own events due
at the same time), with a :class:`ControlView` of the machine, and writes
the knobs it returns through the same path as a knob event (in the kernel's
safe order, skipping values already set, a refused write failing the run).
The same controller therefore runs unchanged on the model and on the real
kernel.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

__all__ = ["ControlAction", "ControlView", "Controller"]


@dataclass(frozen=True, slots=True)
class ControlView:
    """What a controller sees when it acts.

    Attributes:
        now_ns: time since the start of the run (virtual on the model).
        counters: every global KSM counter (``pages_sharing``, ``ksm_zero_pages``, ...),
            as read from sysfs now.
        knobs: every knob's current value (ints, or the word of ``advisor_mode``).
        resident_pages: pages mapped by the scenario's live processes (each
            mapping of a page counted, as a process's RSS counts it).
    """

    now_ns: int
    counters: Mapping[str, int]
    knobs: Mapping[str, int | str]
    resident_pages: int


@dataclass(frozen=True, slots=True)
class ControlAction:
    """What a controller does at one of its times.

    Attributes:
        writes: knob writes ``(name, text)``, made in the kernel's safe write order.
        next_ns: when to act next (time since the start), or None for never again.
        note: one line saying what was decided and why (kept in the run's record).
    """

    writes: tuple[tuple[str, str], ...]
    next_ns: int | None
    note: str = ""


class Controller(Protocol):
    """A periodic controller of the knobs (see the module doc)."""

    name: str

    def first_ns(self) -> int | None:
        """When to act first (time since the start of the run), or None for never."""

    def act(self, view: ControlView) -> ControlAction:
        """Decide from *view*; the runner makes the writes and calls again at ``next_ns``."""
