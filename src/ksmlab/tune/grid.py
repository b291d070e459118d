"""``--grid NAME=V1,V2,...``: the knob grid of ``ksmlab tune``, checked before anything runs.

Each ``--grid`` names one knob and its values; the sweep runs every
combination (the Cartesian product, in the order given).  The knobs and what
each accepts are the scenario's (:data:`ksmlab.scenario.knobs.KNOBS`, derived
from the kernel's attribute table in :mod:`ksmlab.ksm.sysfs`), so a value the
kernel would refuse is refused here, with the same "expected ..." text.

Under ``advisor_mode = scan-time`` the advisor owns ``pages_to_scan`` (the
kernel refuses a write, EINVAL), so for those points the grid's
``pages_to_scan`` is not written, and the points that then coincide are run
once.  The references (:func:`references`) are the kernel's defaults, the
scan-time advisor at its default knobs, and ksmtuned's policy.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from ksmlab.errors import KsmSimError
from ksmlab.scenario.knobs import KNOBS, KnobValue, knob_text, parse_cli_value

__all__ = ["MAX_POINTS", "REFERENCES", "Config", "Grid", "GridError", "parse_grid", "references"]

MAX_POINTS = 10_000
"""A grid of more configurations than this runs only with ``--yes``."""

REFERENCES = ("kernel-defaults", "scan-time-advisor", "ksmtuned")
"""The reference policies every sweep runs beside the grid, in this order."""


class GridError(KsmSimError, ValueError):
    """A bad ``--grid`` (or grid-related option); the message is one line naming the bad part."""


@dataclass(frozen=True, slots=True)
class Config:
    """One configuration to run.

    Attributes:
        knobs: ``(name, text)`` written over the workload's knobs, in the grid's order.
        reference: None for a grid point, else the reference's name (:data:`REFERENCES`).
    """

    knobs: tuple[tuple[str, str], ...]
    reference: str | None = None

    @property
    def label(self) -> str:
        """``pages_to_scan=100 sleep_millisecs=20``, or the reference's name."""
        if self.reference is not None:
            return self.reference
        return " ".join(f"{n}={v}" for n, v in self.knobs) or "(the workload's knobs)"

    def overrides(self) -> dict[str, KnobValue]:
        """The knobs as ``--knob`` values (what :func:`~ksmlab.scenario.loader.apply_knob_overrides`
        and :func:`~ksmlab.estimate.core.run_estimate` take)."""
        return {n: parse_cli_value(v) for n, v in self.knobs}


@dataclass(frozen=True, slots=True)
class Grid:
    """The axes of a sweep: each knob with its values (texts as written to sysfs), in order."""

    axes: tuple[tuple[str, tuple[str, ...]], ...]

    @property
    def size(self) -> int:
        """Points before those that coincide under the advisor are merged."""
        return math.prod(len(v) for _, v in self.axes)

    @property
    def names(self) -> tuple[str, ...]:
        """The knobs swept."""
        return tuple(n for n, _ in self.axes)

    def configs(self) -> list[Config]:
        """Every point, in order; under ``advisor_mode=scan-time`` without ``pages_to_scan``
        (see the module doc), each distinct point once."""
        seen: set[tuple[tuple[str, str], ...]] = set()
        out: list[Config] = []
        for point in self._points():
            if point.get("advisor_mode") == "scan-time":
                point.pop("pages_to_scan", None)
            knobs = tuple(point.items())
            if knobs not in seen:
                seen.add(knobs)
                out.append(Config(knobs))
        return out

    def _points(self) -> Iterator[dict[str, str]]:
        names = self.names
        for values in itertools.product(*(v for _, v in self.axes)):
            yield dict(zip(names, values, strict=True))


def _axis(spec: str, seen: set[str]) -> tuple[str, tuple[str, ...]]:
    name, sep, rest = spec.partition("=")
    name = name.strip()
    if not sep or not name:
        raise GridError(f"--grid {spec!r}: expected NAME=V1,V2,... (a knob and its values)")
    if name not in KNOBS:
        raise GridError(f"--grid {name}: unknown knob; expected one of "
                        f"{', '.join(n for n in KNOBS if n != 'run')}")
    if name == "run":
        raise GridError("--grid run: the sweep is of ksmd running (run=1); sweep the other knobs")
    if name in seen:
        raise GridError(f"--grid {name}: given twice (one --grid per knob, its values "
                        f"separated by commas)")
    if not rest.strip():
        raise GridError(f"--grid {name}=: no values; expected {name}=V1,V2,...")
    texts: list[str] = []
    for raw in rest.split(","):
        if not raw.strip():
            raise GridError(f"--grid {name}={rest}: an empty value; expected values separated "
                            f"by single commas")
        try:
            text = knob_text(name, parse_cli_value(raw))
        except ValueError as e:
            raise GridError(f"--grid {name}: value {raw.strip()!r}: expected {e}") from None
        if text in texts:
            raise GridError(f"--grid {name}: value {raw.strip()!r} given twice")
        texts.append(text)
    return name, tuple(texts)


def parse_grid(specs: Sequence[str] | None, *, allow_large: bool = False,
               limit: int = MAX_POINTS) -> Grid:
    """The grid of the ``--grid`` options *specs*, checked (nothing is expanded yet).

    Raises:
        GridError: no ``--grid``, a spec that is not ``NAME=V1,...``, an unknown knob or
            ``run``, a knob given twice, no values or an empty one, a value the knob does
            not accept or given twice, or more than *limit* points without *allow_large*.
    """
    if not specs:
        raise GridError("--grid: expected at least one --grid NAME=V1,V2,... "
                        "(e.g. --grid pages_to_scan=100,1000)")
    seen: set[str] = set()
    axes: list[tuple[str, tuple[str, ...]]] = []
    for spec in specs:
        axis = _axis(spec, seen)
        seen.add(axis[0])
        axes.append(axis)
    grid = Grid(tuple(axes))
    if grid.size > limit and not allow_large:
        sizes = " x ".join(str(len(v)) for _, v in axes)
        raise GridError(f"--grid: {grid.size:,} configurations ({sizes}) is more than "
                        f"{limit:,}; add --yes to run them all")
    return grid


def references(grid: Grid, boot: Mapping[str, str]) -> list[Config]:
    """The three references, each over the same knobs: every knob the grid sweeps and
    ``advisor_mode``, ``pages_to_scan`` and ``sleep_millisecs``, at the kernel's boot values *boot*
    (the workload's other knobs stay as it sets them).

    * ``kernel-defaults``: those knobs at boot values (``advisor_mode`` among them, so a
      workload that runs the advisor gets ``none`` here);
    * ``scan-time-advisor``: the same with ``advisor_mode=scan-time`` and the advisor's
      knobs at boot values (``pages_to_scan`` is the advisor's);
    * ``ksmtuned``: the same; the ksmtuned model then drives ``pages_to_scan``,
      ``sleep_millisecs`` and ``run`` (:mod:`ksmlab.tune.ksmtuned`).
    """
    always = ("advisor_mode", "pages_to_scan", "sleep_millisecs")
    names = [n for n in KNOBS if n != "run" and (n in grid.names or n in always)]
    base = {n: boot[n] for n in names}
    advisor = {n: boot[n] for n in KNOBS if n.startswith("advisor_") and n != "advisor_mode"}
    advisor = base | advisor | {"advisor_mode": "scan-time"}
    advisor.pop("pages_to_scan")
    return [Config(tuple(base.items()), "kernel-defaults"),
            Config(tuple(advisor.items()), "scan-time-advisor"),
            Config(tuple(base.items()), "ksmtuned")]
