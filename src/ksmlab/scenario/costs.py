"""What a run costs on each engine: the measured per-page costs, and the estimate built on them.

A scenario states its size (processes, mappings, forks, writes, knobs), so
its peak memory on each engine follows from a few costs per page, per write
and per process, measured by ``bench/preflight_costs.py`` and stated in
``docs/performance.md`` ("Pre-flight").  :data:`COSTS` is the one place they
are kept; :func:`measure` counts what a scenario asks, :func:`estimate`
multiplies.  The pre-flight (:mod:`ksmlab.scenario.preflight`) decides with it.

The memory estimate is an upper bound (every page counted as if unique and
not yet merged, every forked child as if it lived to the end); the time is
a rough figure (every page visit of ksmd counted, as if smart scan skipped
nothing; on the real kernel, the scenario's own duration).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ksmlab.ksm import defaults
from ksmlab.ksm.cost import default_cost
from ksmlab.ksm.jiffies import sleep_end_ns
from ksmlab.mm.page import ContentMode
from ksmlab.scenario.model import ForkEvent, KnobsEvent, Scenario, WriteEvent
from ksmlab.scenario.units import NS_PER_S, format_bytes, format_duration

Engine = Literal["sim", "fingerprint", "bulk", "linux"]
"""What the costs are kept per: the backends, SimKernel's two content modes apart."""

_KIB, _MIB = 1 << 10, 1 << 20


@dataclass(frozen=True, slots=True)
class EngineCost:
    """What one engine costs, per thing a scenario has (docs/performance.md, "Pre-flight").

    Attributes:
        label: the engine, as messages name it.
        baseline: bytes of a run of one page (the interpreter, ksmlab, numpy).
        process: bytes per process beyond its pages.
        page: bytes per page mapped, every page of its own content, with its
            rmap_item (after a full scan).
        fill: bytes per page of the largest mapping while it is filled (set-up
            streams a mapping a chunk at a time, so this is small: the chunk's
            share).
        image_page: bytes per distinct page of an image content (kept while
            the mappings are filled).
        forked_page: bytes per page a fork maps (shared until written).
        write: bytes a write leaves behind (a new content on the bulk engine).
        fill_s: seconds per page filled at set-up.
        visit_s: seconds per page ksmd visits in its first two full scans
            (checksums, tree searches; 0 for the real kernel, whose ksmd is
            not ours to run: its runs take their real time).
        rescan_s: seconds per page ksmd visits after those (mostly pages smart
            scan skips or finds unchanged).
        write_s: seconds per write of the scenario.
    """

    label: str
    baseline: int
    process: int
    page: int
    fill: int
    image_page: int
    forked_page: int
    write: int
    fill_s: float
    visit_s: float
    rescan_s: float
    write_s: float


COSTS: dict[Engine, EngineCost] = {
    # Measured by bench/preflight_costs.py (docs/performance.md, "Pre-flight") with set-up
    # streaming mappings in chunks: a mapping's fill costs one chunk, whatever its size.
    # Filling with page bytes holds one 4 MiB chunk as an array and as bytes (8 MiB), which
    # the one-page run of the baseline never reaches: it is added to the baseline; so are
    # a 65536-page chunk's arrays on the bulk engine (draws, indices, ids, rows: ~4 MiB).
    "sim": EngineCost("SimKernel", baseline=49 * _MIB, process=0, page=4605, fill=18,
                      image_page=26, forked_page=296, write=123,
                      fill_s=15e-6, visit_s=19e-6, rescan_s=1e-6, write_s=7e-6),
    "fingerprint": EngineCost("SimKernel in fingerprint mode", baseline=49 * _MIB, process=0,
                              page=520, fill=5, image_page=101, forked_page=312, write=143,
                              fill_s=12e-6, visit_s=18e-6, rescan_s=1.8e-6, write_s=8e-6),
    "bulk": EngineCost("the bulk engine", baseline=45 * _MIB, process=0, page=68, fill=6,
                       image_page=1, forked_page=24, write=108,
                       fill_s=0.29e-6, visit_s=0.19e-6, rescan_s=0.25e-6, write_s=0.43e-6),
    # The real kernel: arithmetic, not measured: a page is its 4096 bytes, its 8-byte PTE
    # and its 64-byte rmap_item (as general_profit counts it); a forked page its PTE and
    # rmap_item; a process its helper (190 KiB resident, measured) and the kernel's own
    # structures (rounded up to 256 KiB).  Our side fills mappings as SimKernel does.
    "linux": EngineCost("this machine's kernel", baseline=49 * _MIB, process=256 * _KIB,
                        page=4096 + 8 + 64, fill=18, image_page=26,
                        forked_page=8 + 64, write=0, fill_s=15e-6, visit_s=0.0, rescan_s=0.0,
                        write_s=0.0),
}
"""Every engine's costs: the only copy (tests/test_preflight.py holds docs/performance.md to it)."""


def engine_of(backend: str, content: ContentMode = "bytes") -> Engine:
    """The cost entry of *backend* (``sim``, ``bulk``, ``linux``) in *content* mode."""
    if backend == "sim":
        return "fingerprint" if content == "fingerprint" else "sim"
    if backend in ("bulk", "linux"):
        return "bulk" if backend == "bulk" else "linux"
    msg = f"backend must be one of sim, bulk, linux, got {backend!r}"
    raise ValueError(msg)


# --- the scenario's size -----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ScenarioSize:
    """What a scenario asks of a machine, counted from the file alone.

    Attributes:
        processes: processes declared and forked (exits not subtracted).
        pages: pages mapped by the declared processes.
        forked_pages: pages mapped by forks.
        largest_fill: pages of the largest mapping (its fill is the largest).
        image_pages: distinct image pages the content source keeps.
        writes: page writes of the events and activities.
        visits: pages ksmd visits (as if smart scan skipped nothing).
        run_s: how long the run lasts in its own time (virtual on the model).
    """

    processes: int
    pages: int
    forked_pages: int
    largest_fill: int
    image_pages: int
    writes: int
    visits: int
    run_s: float


def _groups(sc: Scenario) -> tuple[dict[str, int], dict[str, dict[str, int]], int, int]:
    """Processes per group and pages per mapping of each, after every fork; forked processes
    and forked pages."""
    size = {g.name: g.count for g in sc.processes}
    maps = {g.name: {m.name: m.pages for m in g.mappings} for g in sc.processes}
    forked = forked_pages = 0
    for e in sc.events:  # in time order, so a fork of a forked group finds it
        if isinstance(e, ForkEvent) and e.process.group in size:
            n = len(e.process.indices(size[e.process.group])) * e.count
            size[e.child] = n
            maps[e.child] = dict(maps[e.process.group])
            forked += n
            forked_pages += n * sum(maps[e.child].values())
    return size, maps, forked, forked_pages


def _writes(sc: Scenario, size: dict[str, int], maps: dict[str, dict[str, int]]) -> int:
    end = sc.duration_ns if sc.duration_ns is not None else sc.planned_end_ns
    total = 0.0
    for e in sc.events:
        if isinstance(e, WriteEvent):
            pages = e.region.pages if e.region else maps.get(e.process.group, {}).get(e.mapping, 0)
            total += pages * len(e.process.indices(size.get(e.process.group, 0)))
    for a in sc.activities:
        stop = a.stop_ns if a.stop_ns is not None else end
        procs = len(a.process.indices(size.get(a.process.group, 0)))
        total += a.rate * max(0, stop - a.start_ns) / NS_PER_S * procs
    return int(min(total, 2.0 ** 80))


def _image_pages(sc: Scenario) -> int:
    total = 0
    for c in sc.contents.values():
        if c.kind != "image":
            continue
        used = max((m.pages for g in sc.processes for m in g.mappings if m.content == c.name),
                   default=0)
        if used:
            total += min(c.pages, c.offset + used) if c.pages else c.offset + used
    return total


def _scan(sc: Scenario, scanned_pages: int) -> tuple[int, float]:
    """(pages ksmd visits, run time in ns) with the fastest knobs the scenario sets."""
    settings = [dict(sc.knobs), *(dict(e.knobs) for e in sc.events if isinstance(e, KnobsEvent))]
    runs = any(s.get("run") == "1" for s in settings)
    per_batch = max(int(s.get("pages_to_scan", defaults.DEFAULT_PAGES_TO_SCAN)) for s in settings)
    if any(s.get("advisor_mode") == "scan-time" for s in settings):
        per_batch = max(per_batch, *(int(s.get("advisor_max_pages_to_scan",
                                               defaults.DEFAULT_ADVISOR_MAX_PAGES_TO_SCAN))
                                     for s in settings))
    sleep_ms = min(int(s.get("sleep_millisecs", defaults.DEFAULT_SLEEP_MILLISECS))
                   for s in settings)
    per_batch = min(per_batch, scanned_pages)
    run_ns = float(sc.planned_end_ns)
    if not runs or per_batch == 0:
        return 0, run_ns
    # ksmd's period: its sleep as the timer ends it, plus a batch at the shipped cost
    # model's price of a batch and of a page checksummed (a rough figure: the pre-flight
    # only needs the order of magnitude of the pages visited).
    cost = default_cost()
    period_ns = (sleep_end_ns(0, sleep_ms, cost.clock.hz) + cost.ns["batch"]
                 + per_batch * (cost.ns["page"] + cost.ns["checksum"]))
    for c in sc.checkpoints:  # a full-scan checkpoint runs until reached, or its timeout
        if c.full_scans is not None:
            needed = c.full_scans * scanned_pages / per_batch * period_ns
            run_ns = max(run_ns, min(float(c.timeout_ns), needed))
    return int(min(per_batch * run_ns / period_ns, 2.0 ** 80)), run_ns


def measure(sc: Scenario) -> ScenarioSize:
    """The size of *sc* (see :class:`ScenarioSize`)."""
    size, maps, forked, forked_pages = _groups(sc)
    pages = sc.total_pages()
    visits, run_ns = _scan(sc, pages + forked_pages)
    return ScenarioSize(
        processes=sum(g.count for g in sc.processes) + forked, pages=pages,
        forked_pages=forked_pages,
        largest_fill=max((m.pages for g in sc.processes for m in g.mappings), default=0),
        image_pages=_image_pages(sc), writes=_writes(sc, size, maps), visits=visits,
        run_s=run_ns / NS_PER_S)


# --- the estimate ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Estimate:
    """A run's peak memory and rough time on one engine.

    Attributes:
        engine: the cost entry used.
        peak_bytes: memory at the peak, in bytes (on the real kernel: this
            process and the memory of the scenario's processes).
        seconds: wall-clock seconds, roughly (set-up, ksmd, writes; on the
            real kernel, the scenario's own duration too).
        size: what the scenario asks.
    """

    engine: Engine
    peak_bytes: int
    seconds: float
    size: ScenarioSize

    @property
    def label(self) -> str:
        """The engine as messages name it."""
        return COSTS[self.engine].label

    def describe(self) -> str:
        """``about 1.2 GiB at its peak and roughly 30 s``."""
        return f"about {format_bytes(self.peak_bytes)} at its peak and {rough_time(self.seconds)}"


def rough_time(seconds: float) -> str:
    """``roughly 30 s``, ``under a second``, ``roughly 3 days``: a time only good to its order."""
    if seconds < 1:
        return "under a second"
    if seconds < 2 * 86400:
        return "roughly " + format_duration(float(f"{seconds:.2g}"))
    days = seconds / 86400
    return f"roughly {days:,.0f} days" if days < 365_000 else "more than a thousand years"


def estimate(sc: Scenario, engine: Engine) -> Estimate:
    """The peak memory and rough time of *sc* on *engine* (see the module doc)."""
    c, s = COSTS[engine], measure(sc)
    cow = min(s.writes, s.forked_pages)  # a write in a child makes the page its own
    peak = (c.baseline + s.processes * c.process + s.pages * c.page + s.largest_fill * c.fill
            + s.image_pages * c.image_page + s.forked_pages * c.forked_page
            + cow * max(0, c.page - c.forked_page) + s.writes * c.write)
    first = min(s.visits, 2 * (s.pages + s.forked_pages))  # the first two full scans
    seconds = (s.pages * c.fill_s + first * c.visit_s + (s.visits - first) * c.rescan_s
               + s.writes * c.write_s)
    if engine == "linux":
        seconds += s.run_s
    return Estimate(engine, peak, seconds, s)


__all__ = ["COSTS", "Engine", "EngineCost", "Estimate", "ScenarioSize", "engine_of", "estimate",
           "measure", "rough_time"]
