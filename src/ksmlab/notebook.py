"""ksmlab from Python (a notebook, a script): load a scenario, run it, look at the result.

:func:`load_scenario` reads a scenario file, TOML text, or the built-in
scenario; :func:`run` checks it before anything is built (the pre-flight of
``ksmlab run``: :mod:`ksmlab.scenario.preflight`), opens the backend, runs,
closes the backend (the Linux backend puts the host's knobs back), and returns
a :class:`Result`: integer counters at every checkpoint and sample,
:meth:`Result.to_pandas` (pandas is the optional extra ``ksmlab[pandas]``) and
:meth:`Result.plot` (the figure of ``ksmlab plot``).  The guide is
``docs/python.md``.
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Callable, Mapping
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from ksmlab.mm.page import CONTENT_MODES, ContentMode
from ksmlab.scenario import loader
from ksmlab.scenario.backends import open_backend
from ksmlab.scenario.knobs import KnobValue
from ksmlab.scenario.model import GLOBAL_COUNTERS, PROCESS_COUNTERS, Scenario
from ksmlab.scenario.preflight import Plan, mem_available, plan
from ksmlab.scenario.result import TIMELINE_COLUMNS, CheckpointResult, RunResult, ScenarioInfo
from ksmlab.scenario.runner import ProgressInfo, run_scenario
from ksmlab.scenario.units import MAX_DURATION_NS, NS_PER_S, parse_duration_ns

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TEXT_SOURCE = "<text>"
"""The ``source`` of a scenario given as TOML text (errors name it)."""


def load_scenario(source: str | os.PathLike[str] | None = None, *,
                  seed: int | None = None) -> Scenario:
    """A validated scenario.

    Args:
        source: a path to a TOML file; TOML text (a str holding a newline, or
            starting with ``[`` or ``#``), whose relative content paths are
            relative to the current directory; or None for the built-in
            scenario (what ``ksmlab run`` runs without a file).
        seed: replaces ``[scenario] seed`` (every random choice follows).

    Raises:
        ScenarioError: (a ValueError) the file is missing or invalid; the
            message names the file, the field, what was expected and what was found.
        TypeError: *source* is not a str, a path or None.
    """
    if source is None:
        return loader.load_builtin(seed=seed)
    if isinstance(source, str) and ("\n" in source or source.lstrip().startswith(("[", "#"))):
        return loader.parse_scenario(source, source=TEXT_SOURCE, base_dir=Path.cwd(), seed=seed)
    if isinstance(source, str | os.PathLike):
        return loader.load_scenario(source, seed=seed)
    msg = f"source must be a path, TOML text or None, not {type(source).__name__}: {source!r}"
    raise TypeError(msg)


class Sample(NamedTuple):
    """One row of the timeline: the time, every global counter (ints), ksmd's CPU time.

    The fields are :data:`~ksmlab.scenario.result.TIMELINE_COLUMNS`; ``ksmd_cpu_s``
    is None when it cannot be read (the real kernel without /proc access).
    """

    time_s: float
    pages_shared: int
    pages_sharing: int
    pages_unshared: int
    pages_volatile: int
    ksm_zero_pages: int
    general_profit: int
    full_scans: int
    pages_scanned: int
    pages_skipped: int
    stable_node_chains: int
    stable_node_dups: int
    ksmd_cpu_s: float | None

    @classmethod
    def of(cls, row: tuple[float, ...]) -> Sample:
        """The sample of a :class:`~ksmlab.scenario.result.RunResult` timeline row."""
        cpu = row[-1]
        return cls._make([row[0], *(int(v) for v in row[1:-1]), None if math.isnan(cpu) else cpu])


def _pandas() -> Any:
    try:
        return importlib.import_module("pandas")
    except ImportError as e:
        msg = ("Result.to_pandas() needs pandas, which is an optional extra of ksmlab: "
               "pip install 'ksmlab[pandas]' (or pip install pandas)")
        raise ImportError(msg, name="pandas") from e


@dataclass(frozen=True, slots=True)
class Result:
    """A finished run, for Python.

    Attributes:
        raw: the run as the reports see it (:class:`~ksmlab.scenario.result.RunResult`).
        plan: the pre-flight: the backend used, why, and what it was expected to cost.
        timeline: the counters sampled over time.
    """

    raw: RunResult
    plan: Plan
    timeline: tuple[Sample, ...]

    @classmethod
    def of(cls, raw: RunResult, plan: Plan) -> Result:
        """The result of the run *raw*, planned as *plan*."""
        return cls(raw, plan, tuple(Sample.of(row) for row in raw.timeline))

    @property
    def scenario(self) -> ScenarioInfo:
        """What ran (name, seed, processes, activities, events)."""
        return self.raw.scenario

    @property
    def backend(self) -> str:
        """``sim``, ``bulk`` or ``linux``."""
        return self.raw.backend

    @property
    def machine(self) -> str:
        """The engine or the kernel release, in one line."""
        return self.raw.machine

    @property
    def knobs(self) -> dict[str, int | str]:
        """Every KSM knob right after the start."""
        return self.raw.knobs

    @property
    def checkpoints(self) -> tuple[CheckpointResult, ...]:
        """The checkpoints in the order they were reached: ``counters`` (ints),
        ``processes`` (per group, ints), ``checks``, ``time_s``, ``ksmd_cpu_s``."""
        return self.raw.checkpoints

    @property
    def end_s(self) -> float:
        """When the run ended (virtual seconds on the model)."""
        return self.raw.end_s

    @property
    def failures(self) -> tuple[str, ...]:
        """One line per failed expectation or checkpoint not reached."""
        return self.raw.failures

    @property
    def ok(self) -> bool:
        """No expectation failed and every checkpoint was reached."""
        return self.raw.ok

    def checkpoint(self, name: str) -> CheckpointResult:
        """The checkpoint called *name* (KeyError naming the names there are)."""
        for c in self.checkpoints:
            if c.name == name:
                return c
        msg = f"no checkpoint {name!r}; the checkpoints are {[c.name for c in self.checkpoints]}"
        raise KeyError(msg)

    def to_pandas(self, table: Literal["timeline", "checkpoints"] = "timeline") -> Any:
        """A pandas DataFrame of the timeline (one row per sample, the columns of
        :class:`Sample`) or of the checkpoints (``name``, ``time_s``, ``reached``, every
        global counter, ``ksmd_cpu_s``, then ``GROUP.alive`` and ``GROUP.COUNTER`` for
        each process group).  Counters are int64, times float64 (NaN: unknown).

        Raises:
            ImportError: pandas is not installed (the message names the extra).
            ValueError: *table* is neither ``timeline`` nor ``checkpoints``.
        """
        if table not in ("timeline", "checkpoints"):
            msg = f"table must be 'timeline' or 'checkpoints', got {table!r}"
            raise ValueError(msg)
        pd = _pandas()
        nan = float("nan")
        if table == "timeline":
            rows = [s._replace(ksmd_cpu_s=nan if s.ksmd_cpu_s is None else s.ksmd_cpu_s)
                    for s in self.timeline]
            frame = pd.DataFrame(rows, columns=list(TIMELINE_COLUMNS))
            return frame.astype({n: "int64" for n in GLOBAL_COUNTERS}
                                | {"time_s": "float64", "ksmd_cpu_s": "float64"})
        groups = list(dict.fromkeys(g for c in self.checkpoints for g in c.processes))
        per_group = [f"{g}.{n}" for g in groups for n in ("alive", *PROCESS_COUNTERS)]
        records = []
        for c in self.checkpoints:
            rec: dict[str, object] = {"name": c.name, "time_s": c.time_s, "reached": c.reached}
            rec |= {n: c.counters[n] for n in GLOBAL_COUNTERS}
            rec["ksmd_cpu_s"] = nan if c.ksmd_cpu_s is None else c.ksmd_cpu_s
            rec |= {f"{g}.{n}": v for g, d in c.processes.items() for n, v in d.items()}
            records.append(rec)
        columns = ["name", "time_s", "reached", *GLOBAL_COUNTERS, "ksmd_cpu_s", *per_group]
        frame = pd.DataFrame.from_records(records, columns=columns)
        # A group not yet born at a checkpoint has no row there: 0 processes, 0 pages.
        return frame.fillna({n: 0 for n in per_group}).astype(
            {n: "int64" for n in (*GLOBAL_COUNTERS, *per_group)}
            | {"time_s": "float64", "ksmd_cpu_s": "float64", "reached": "bool"})

    def plot(self) -> Figure:
        """The figure of ``ksmlab plot`` (memory saved, pages by state, ksmd's cost over time),
        a matplotlib Figure: a notebook shows it; ``fig.savefig("run.svg")`` saves it."""
        from ksmlab.report.plot import render_figure

        return render_figure(self.raw)

    def to_json(self) -> dict[str, Any]:
        """The ``ksmlab run --json`` document (schema ``ksmlab.run/1``, docs/cli.md)."""
        from ksmlab.report.document import to_document

        return to_document(self.raw)

    def __repr__(self) -> str:
        last = self.checkpoints[-1] if self.checkpoints else None
        where = "" if last is None else (f", last checkpoint {last.name!r}: pages_sharing="
                                          f"{last.counters['pages_sharing']}, general_profit="
                                          f"{last.counters['general_profit']}")
        return (f"<ksmlab.Result {self.scenario.name!r} on {self.machine}: "
                f"{'ok' if self.ok else f'{len(self.failures)} failure(s)'}{where}>")


def _until_ns(until: str | float) -> int:
    if isinstance(until, bool) or not isinstance(until, str | int | float):
        msg = f"until must be a duration (\"30s\") or seconds, not {type(until).__name__}: {until!r}"
        raise TypeError(msg)
    if isinstance(until, str):
        try:
            ns = parse_duration_ns(until)
        except ValueError as e:
            msg = f"until must be {e}, got {until!r}"
            raise ValueError(msg) from None
    else:
        ns = round(until * NS_PER_S) if math.isfinite(until) else 0
    if not 0 < ns <= MAX_DURATION_NS:
        msg = f"until must be a duration > 0 and at most 292 years, got {until!r}"
        raise ValueError(msg)
    return ns


def run(scenario: Scenario | str | os.PathLike[str], *, backend: str = "auto",
        knobs: Mapping[str, KnobValue] | None = None, until: str | float | None = None,
        seed: int | None = None, content: ContentMode = "bytes",
        progress: Callable[[ProgressInfo], None] | None = None,
        mem_available_bytes: int | None = None) -> Result:
    """Run *scenario* and return its :class:`Result`, as ``ksmlab run`` does.

    Args:
        scenario: a :class:`~ksmlab.scenario.model.Scenario` from
            :func:`load_scenario`, or what :func:`load_scenario` takes (a path, TOML text).
        backend: ``auto`` (SimKernel where the run fits comfortably in memory,
            the bulk engine otherwise), ``sim``, ``bulk`` or ``linux`` (this
            machine's kernel: root; the host's knobs are restored at the end).
        knobs: KSM knobs replacing those of ``[ksm]`` (``{"pages_to_scan": 1000}``),
            checked as the file's are.
        until: stop the run there: a duration (``"30s"``) or seconds.
        seed: replaces the scenario's seed (only with a path or text: a loaded
            scenario's seeds are already derived).
        content: SimKernel's content mode, ``bytes`` or ``fingerprint``.
        progress: called with a :class:`~ksmlab.scenario.runner.ProgressInfo` after
            every step of the run.
        mem_available_bytes: the memory the run may use (default: as ``ksmlab run``:
            ``$KSMLAB_MEM_AVAILABLE``, else MemAvailable of /proc/meminfo).

    Raises:
        ScenarioError: the scenario, a knob or *until* is invalid (nothing ran).
        WontFitError: (a MemoryError) the run would not fit in memory; the message
            names the figures and the engine that would fit.
        NotModelledError: the backend does not model a call the scenario makes.
        BackendUnavailableError: the linux backend cannot run here.
        RunError: a kernel call failed during the run.
        TypeError, ValueError: a bad argument (the message names it).
    """
    if content not in CONTENT_MODES:
        msg = f"content must be one of {', '.join(CONTENT_MODES)}, got {content!r}"
        raise ValueError(msg)
    if content != "bytes" and backend not in ("auto", "sim"):
        msg = f"content={content!r} applies to backend 'sim' (or 'auto') only, got backend {backend!r}"
        raise ValueError(msg)
    if mem_available_bytes is not None and (isinstance(mem_available_bytes, bool)
                                            or not isinstance(mem_available_bytes, int)
                                            or mem_available_bytes <= 0):
        msg = f"mem_available_bytes must be a number of bytes > 0, got {mem_available_bytes!r}"
        raise ValueError(msg)
    if isinstance(scenario, Scenario):
        if seed is not None:
            msg = (f"seed={seed!r}: a loaded Scenario's seeds are already derived; pass the path "
                   f"or text to run(), or use load_scenario(..., seed={seed!r})")
            raise ValueError(msg)
        sc = scenario
    else:
        sc = load_scenario(scenario, seed=seed)
    if knobs:
        sc = loader.apply_knob_overrides(sc, dict(knobs))
    if until is not None:
        sc = loader.truncate(sc, _until_ns(until))
    available = ((mem_available_bytes, "mem_available_bytes") if mem_available_bytes is not None
                 else mem_available())
    p = plan(sc, backend, content, available=available)
    with closing(open_backend(p.backend, p.content)) as b:
        return Result.of(run_scenario(sc, b, progress), p)


__all__ = ["TEXT_SOURCE", "Result", "Sample", "load_scenario", "run"]
