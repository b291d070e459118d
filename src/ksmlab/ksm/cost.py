"""ksmd's CPU cost and clock model, for every engine, fitted to the real ksmd.

What one batch of ksmd costs depends on what it does, so each engine counts
the steps of ``mm/ksm.c`` its batch takes in a :class:`KsmdWork` (SimKernel as
its walk takes them; the bulk engine as its columns say the kernel's walk
would, see below), and :class:`KsmdMeter` turns the counts into *features*,
one per term of the cost, and the features into nanoseconds with the
parameters of a :class:`KsmdCost`:

==============  ===============================================================
feature         one unit is
==============  ===============================================================
batch           a batch (``ksm_do_scan``, its wake-up, mutex, sleep)
scan_start      a full scan started (``lru_add_drain_all``, unstable roots reset)
mm_end          an mm whose end the walk reached (trailing items, next slot)
page            a page handed to ``cmp_and_merge_page`` (``pages_scanned``)
pte_walk        a present PTE the walk passes with no page to scan (the zero page
                that ``use_zero_pages`` put there)
skip            a page smart scan skipped
item            an rmap_item allocated or freed by the walk
checksum        ``calc_checksum`` of a page (xxhash of 4 KiB)
stable_step     a stable-tree node compared on the way down (``memcmp`` stops early)
stable_cold     a stable-tree node the batch's searches visit for the first time
                (a cache miss: the nodes near the root are shared by every search)
unstable_step   an unstable-tree node compared on the way down (with its
                ``get_mergeable_page``: vma lookup and page-table walk)
unstable_cold   an unstable-tree node visited for the first time in the batch
full_cmp        a compare of two equal pages, which runs the whole 4096 bytes
                (the equal node of a search, and ``pages_identical`` of a merge)
chain_dup       a dup of a chain examined (``stable_node_dup``)
merge           a page merged into a KSM page (write-protect + ``replace_page``)
new_ksm         a page made a KSM page (write-protect, stable node)
zero_merge      a page replaced by the zero page (``use_zero_pages``)
pte_page        a page of ``page`` the walk reached through a page-table entry,
                not a PMD-mapped transparent huge page (whose walk stops a level
                higher and whose folio stays in cache for 512 pages in a row)
thp_split       a transparent huge page split so that a page of it can merge
                (``split_huge_page`` in ``try_to_merge_one_page``)
ksm_frame       a KSM page the batch's walk met for the first time in the batch
                (its folio and stable node read: a cache miss per distinct page)
walk_start      one of the first :data:`WALK_START_PAGES` pages of a batch (the
                walk starting from cold caches and TLB: the mm's lock and vma,
                the first page tables, the rmap list)
==============  ===============================================================

Model choices (documented in docs/cost-model.md):

* **Tree walks are modelled, not counted.**  The bulk engine has no
  content-ordered tree, so for both engines a search of a tree of *s*
  entries visits ``log2(s + 1)`` nodes, averaged over how the tree grew
  during the batch.  The stable tree's size is its live entries (those with
  a KSM page still mapped) at the start of the full scan plus the entries
  added since; the unstable tree's is the pages inserted in this full scan
  minus those merged out of it.  Both engines see exactly these numbers.
* The nodes a batch's *n* searches visit for the first time (cache misses)
  are those of a balanced tree of the same depth *D*: every node of the
  top ``log2 n`` levels, then one per search and level below, so
  ``n - 1 + n (D - log2 n)`` (the whole tree if it is shallower).  Small
  batches therefore pay more per search than large ones, as measured.
* Only the searched content's own chain is walked (a chain *passed* on the
  way to another content costs one node compare, like any node).
* A compare of unequal pages costs the same wherever they differ.

**The busy machine** (``cpu_scale``).  On a shared machine the real ksmd's
CPU time per full scan is heavy-tailed: most scans cost what the terms above
say, but a few (about 7 % of the calibration scans, in stretches of seconds,
at no particular workload or scan) cost 2 to 10 times as much, the same work
done on a disturbed CPU.  The terms are fitted to the typical scan (relative
errors, robust to those); a checkpoint's CPU time is a *sum* over many scans,
whose expectation includes the disturbed ones.  So the cost of a batch is
the terms' sum times ``cpu_scale``: the measured CPU time of every
calibration scan over what the terms predict for it (1.0 = no disturbance).

Parameters are fitted to the real ksmd by ``ksmlab calibrate`` (numpy least
squares over micro-workloads, :mod:`ksmlab.calibrate`) and stored in a JSON
file (:meth:`KsmdCost.load`); the defaults are such a file fitted on this
project's machine (``ksmlab/data/ksmd-cost.json``).  The cost only moves the
clock and ksmd's CPU time (and so the scan-time advisor), never which pages
merge.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields
from importlib import resources
from typing import Any, Final

from ksmlab import argcheck
from ksmlab.ksm.jiffies import late_wake, sleep_end_ns, tick_nsec, wake_delay_ns

FEATURES: Final = ("batch", "scan_start", "mm_end", "page", "pte_walk", "skip", "item", "checksum",
                   "stable_step", "stable_cold", "unstable_step", "unstable_cold", "full_cmp",
                   "chain_dup", "merge", "new_ksm", "zero_merge", "pte_page", "thp_split",
                   "ksm_frame", "walk_start")
"""The cost's terms, in file order; parameter ``<name>_ns`` is the cost of one unit."""

DEFAULT_FILE: Final = "data/ksmd-cost.json"
FORMAT: Final = "ksmlab-ksmd-cost"
VERSION: Final = 1
_LN2: Final = math.log(2)
LATER_FEATURES: Final = ("pte_page", "thp_split", "ksm_frame", "walk_start")
"""Terms added after version-1 files were first written: a file without them costs them 0
(its fit never saw them)."""
WALK_START_PAGES: Final = 16
"""Pages at the start of a batch that pay ``walk_start`` (an offline refit of the 15:56
calibration explained the same share of the 100-page workloads' cost with any bound from 8
to 200: docs/cost-model.md, "The start of a batch's walk")."""
_CLOCK_FIELDS: Final = ("hz", "wake_delay_ns", "late_fraction", "run_stretch")


@dataclass(slots=True)
class KsmdWork:
    """What one batch of ksmd did, step by step (see the module doc).

    The engine increments these while it scans; :class:`~ksmlab.ksm.ksmd.Ksmd`
    clears them before each batch, so counts made outside a batch (a
    ``run=2`` freeing items) are not ksmd's.
    """

    scan_starts: int = 0
    mm_ends: int = 0
    pages: int = 0
    pte_walk: int = 0
    """Present PTEs passed without a page to scan (KSM zero pages)."""
    skipped: int = 0
    items: int = 0
    checksums: int = 0
    zero_merges: int = 0
    stable_searches: int = 0
    """``stable_tree_search`` walks (not the immediate return of a forked KSM page)."""
    stable_equal: int = 0
    """Of those, walks that met a node of equal content."""
    stable_inserts: int = 0
    """``stable_tree_insert`` walks (a new KSM page filed)."""
    stable_new: int = 0
    """Of those, walks that found no equal content: a new tree entry."""
    unstable_searches: int = 0
    unstable_equal: int = 0
    unstable_inserts: int = 0
    chain_dups: int = 0
    merges: int = 0
    new_ksm: int = 0
    pte_pages: int = 0
    """Of ``pages``, those reached through a page-table entry (not a PMD-mapped THP)."""
    thp_splits: int = 0
    """Transparent huge pages split by a merge attempt."""
    ksm_frames: int = 0
    """Distinct KSM pages met by the batch's walk (each counted once per batch)."""
    stable_base: int = 0
    """Set at a full scan's start: the stable tree's live entries then (not a count)."""

    def clear(self) -> None:
        """Zero every count."""
        for f in fields(self):
            setattr(self, f.name, 0)

    def add(self, other: KsmdWork) -> None:
        """Add *other*'s counts to these (``stable_base`` is kept from *other* if it started a scan)."""
        for f in fields(self):
            if f.name != "stable_base":
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        if other.scan_starts:
            self.stable_base = other.stable_base

    def as_dict(self) -> dict[str, int]:
        """The counts by name."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def mean_depth(s0: int, s1: int) -> float:
    """Mean ``log2(s + 1)`` (nodes a search visits in a tree of *s* entries) over s in [s0, s1]."""
    if s0 == s1:
        return math.log2(s0 + 1)

    def integral(x: int) -> float:  # of log2(x + 1) dx
        return ((x + 1) * math.log(x + 1) - x) / _LN2

    return (integral(s1) - integral(s0)) / (s1 - s0)


def cold_nodes(n: int, depth: float) -> float:
    """Distinct nodes *n* searches visit in a balanced tree of *depth* levels (see the module doc)."""
    if n <= 0 or depth <= 0:
        return 0.0
    top = math.log2(n)
    if depth <= top:
        return float(2.0 ** depth - 1)
    return n - 1 + n * (depth - top)


def features(w: KsmdWork, stable: tuple[int, int], unstable: tuple[int, int]) -> dict[str, float]:
    """One batch's features from its work and the trees' sizes at its start and end."""
    s_eq = w.stable_equal + w.stable_inserts - w.stable_new
    s_walks = w.stable_searches + w.stable_inserts
    s_depth = mean_depth(*stable)
    u_depth = mean_depth(*unstable)
    s_steps = s_walks * s_depth
    u_steps = w.unstable_searches * u_depth
    return {
        "batch": 1.0, "scan_start": w.scan_starts, "mm_end": w.mm_ends, "page": w.pages,
        "pte_walk": w.pte_walk, "skip": w.skipped, "item": w.items, "checksum": w.checksums,
        "stable_step": max(0.0, s_steps - s_eq),
        "stable_cold": cold_nodes(s_walks, s_depth),
        "unstable_step": max(0.0, u_steps - w.unstable_equal),
        "unstable_cold": cold_nodes(w.unstable_searches, u_depth),
        "full_cmp": s_eq + w.unstable_equal + w.merges + w.zero_merges,
        "chain_dup": w.chain_dups, "merge": w.merges, "new_ksm": w.new_ksm,
        "zero_merge": w.zero_merges, "pte_page": w.pte_pages, "thp_split": w.thp_splits,
        "ksm_frame": w.ksm_frames, "walk_start": min(w.pages, WALK_START_PAGES),
    }


@dataclass(frozen=True, slots=True)
class KsmdClock:
    """How ksmd's time passes besides its CPU (see :mod:`ksmlab.ksm.jiffies`).

    Attributes:
        hz: the kernel's ``CONFIG_HZ`` (jiffies per second).
        wake_delay_ns: mean scheduling delay between the timer's tick and
            ksmd running (exponential, at deterministic quantiles).
        late_fraction: share of timer wake-ups that come one jiffy late as a
            whole (:func:`~ksmlab.ksm.jiffies.late_wake`).
        run_stretch: wall time per unit of CPU time while a batch runs
            (1.0 on an idle machine; more when ksmd shares its CPU).
    """

    hz: int = 250
    wake_delay_ns: float = 0.0
    late_fraction: float = 0.0
    run_stretch: float = 1.0

    def wake_after(self, done_ns: int, sleep_ms: int, k: int) -> int:
        """When ksmd runs again after a batch that ended at *done_ns*, sleeping *sleep_ms*;
        *k* numbers the timed sleeps (for the delay and lateness sequences)."""
        end = sleep_end_ns(done_ns, sleep_ms, self.hz)
        if end == done_ns:
            return end  # no sleep (sleep_millisecs=0)
        if late_wake(k, self.late_fraction):
            end += tick_nsec(self.hz)
        return end + wake_delay_ns(k, self.wake_delay_ns)


@dataclass(frozen=True, slots=True)
class KsmdCost:
    """ksmd's cost model: nanoseconds per unit of each feature, and the clock.

    Attributes:
        ns: the cost of one unit of each feature of :data:`FEATURES`.
        clock: the sleep and scheduling model.
        source: where the parameters came from (a file, or "defaults").
        fit: what the calibration recorded (machine, load, residuals), for reports.
        cpu_scale: expected CPU time per unit of the terms' sum: the busy
            machine's share of disturbed batches (see the module doc); > 0.
    """

    ns: dict[str, float]
    clock: KsmdClock = KsmdClock()
    source: str = "<code>"
    fit: dict[str, Any] = field(default_factory=dict, compare=False)
    cpu_scale: float = 1.0

    def __post_init__(self) -> None:
        _check_ns(self.ns)
        if not isinstance(self.clock, KsmdClock):
            raise TypeError(f"clock must be a KsmdClock, got {self.clock!r}")
        object.__setattr__(self, "cpu_scale", _scale("cpu_scale", self.cpu_scale))
        object.__setattr__(self, "ns", {name: float(self.ns[name]) for name in FEATURES})

    def cost_ns(self, feats: dict[str, float]) -> int:
        """CPU time of a batch with these features (the terms' sum times ``cpu_scale``)."""
        ns = self.ns
        return max(0, round(self.cpu_scale * sum(ns[name] * feats[name] for name in FEATURES)))

    # --- the file format -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON document :meth:`from_dict` reads."""
        c = self.clock
        return {"format": FORMAT, "version": VERSION,
                "ns": {name: self.ns[name] for name in FEATURES},
                "cpu_scale": self.cpu_scale,
                "clock": {"hz": c.hz, "wake_delay_ns": c.wake_delay_ns,
                          "late_fraction": c.late_fraction, "run_stretch": c.run_stretch},
                "fit": self.fit}

    @classmethod
    def from_dict(cls, doc: object, source: str = "<dict>") -> KsmdCost:
        """Parse a cost document; ValueError naming the bad field and *source*."""
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError(f"{source}: not a ksmd cost file (no \"format\": \"{FORMAT}\")")
        if doc.get("version") != VERSION:
            raise ValueError(f"{source}: version {doc.get('version')!r} is not {VERSION}")
        unknown = set(doc) - {"format", "version", "ns", "cpu_scale", "clock", "fit"}
        if unknown:
            raise ValueError(f"{source}: unknown field(s) {', '.join(sorted(unknown))}")
        ns = doc.get("ns")
        if isinstance(ns, dict):
            ns = {**dict.fromkeys(LATER_FEATURES, 0.0), **ns}
        if not isinstance(ns, dict) or set(ns) != set(FEATURES):
            raise ValueError(f"{source}: \"ns\" must give exactly {', '.join(FEATURES)}")
        clock = doc.get("clock")
        if not isinstance(clock, dict) or set(clock) != set(_CLOCK_FIELDS):
            raise ValueError(f"{source}: \"clock\" must give exactly {', '.join(_CLOCK_FIELDS)}")
        try:
            parsed = {name: _number(f"ns.{name}", ns[name]) for name in FEATURES}
            hz = argcheck.count("clock.hz", clock["hz"], minimum=1, maximum=10_000)
            delay = _number("clock.wake_delay_ns", clock["wake_delay_ns"])
            late = _number("clock.late_fraction", clock["late_fraction"])
            stretch = _number("clock.run_stretch", clock["run_stretch"])
            # Files written before the busy-machine factor have none: no disturbance.
            scale = _scale("cpu_scale", doc.get("cpu_scale", 1.0))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from None
        if stretch < 1.0:
            raise ValueError(f"{source}: clock.run_stretch must be >= 1, got {stretch}")
        if late > 1.0:
            raise ValueError(f"{source}: clock.late_fraction must be <= 1, got {late}")
        fit = doc.get("fit", {})
        if not isinstance(fit, dict):
            raise ValueError(f"{source}: \"fit\" must be an object")
        return cls(parsed, KsmdClock(hz, delay, late, stretch), source, fit, scale)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> KsmdCost:
        """Read a cost file written by :meth:`save` (``ksmlab calibrate``).

        Raises OSError if it cannot be read, ValueError (naming the file) if
        it is not a valid cost file.
        """
        name = argcheck.path("path", path)
        with open(name, encoding="utf-8") as f:
            text = f.read()
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{name}: not JSON ({e})") from None
        return cls.from_dict(doc, name)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write this model as JSON (what :meth:`load` reads)."""
        with open(argcheck.path("path", path), "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=1)
            f.write("\n")

    def with_clock(self, **changes: Any) -> KsmdCost:
        """A copy with some clock fields changed (e.g. ``wake_delay_ns=0`` for exact arithmetic)."""
        c = self.clock
        clock = KsmdClock(**{"hz": c.hz, "wake_delay_ns": c.wake_delay_ns,
                             "late_fraction": c.late_fraction, "run_stretch": c.run_stretch,
                             **changes})
        return KsmdCost(dict(self.ns), clock, self.source, self.fit, self.cpu_scale)


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return v


def _scale(name: str, value: object) -> float:
    v = _number(name, value)
    if v == 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return v


def _check_ns(ns: object) -> None:
    if not isinstance(ns, dict) or set(ns) != set(FEATURES):
        raise ValueError(f"ns must map exactly {', '.join(FEATURES)} to numbers")
    for name in FEATURES:
        _number(f"ns[{name!r}]", ns[name])


_DEFAULTS: KsmdCost | None = None


def default_cost() -> KsmdCost:
    """The shipped cost model (``ksmlab/data/ksmd-cost.json``, fitted on this project's
    machine, see docs/cost-model.md), read once."""
    global _DEFAULTS
    if _DEFAULTS is None:
        text = resources.files("ksmlab").joinpath(DEFAULT_FILE).read_text("utf-8")
        cost = KsmdCost.from_dict(json.loads(text), f"ksmlab/{DEFAULT_FILE}")
        _DEFAULTS = KsmdCost(cost.ns, cost.clock, "defaults", cost.fit, cost.cpu_scale)
    return _DEFAULTS


def checked_cost(cost: object) -> KsmdCost | None:
    """A kernel's ``cost`` argument: a :class:`KsmdCost` or None (TypeError naming it otherwise)."""
    if cost is not None and not isinstance(cost, KsmdCost):
        raise TypeError(f"cost must be a KsmdCost or None (KsmdCost.load(path) reads a file), "
                        f"got {argcheck.describe(cost)}")
    return cost


class KsmdMeter:
    """Turns each batch's :class:`KsmdWork` into features and CPU time; keeps the trees' sizes.

    Attributes:
        cost: the parameters.
        stable: modelled stable-tree entries now (see the module doc).
        unstable: modelled unstable-tree entries now.
        total: every batch's work added up.
        feature_totals: every batch's features added up.
        last: the last batch's features (what calibration records, batch by batch).
    """

    def __init__(self, cost: KsmdCost) -> None:
        self.cost = cost
        self.stable = 0
        self.unstable = 0
        self.total = KsmdWork()
        self.feature_totals = dict.fromkeys(FEATURES, 0.0)
        self.last: dict[str, float] = dict.fromkeys(FEATURES, 0.0)

    def charge(self, w: KsmdWork) -> int:
        """The CPU time of a batch that did *w*; the trees' sizes move on."""
        if w.scan_starts:
            self.stable, self.unstable = w.stable_base, 0
        s0, u0 = self.stable, self.unstable
        s1 = s0 + w.stable_new
        u1 = max(0, u0 + w.unstable_inserts - w.new_ksm)
        feats = features(w, (s0, s1), (u0, u1))
        self.stable, self.unstable = s1, u1
        self.last = feats
        self.total.add(w)
        totals = self.feature_totals
        for name in FEATURES:
            totals[name] += feats[name]
        return self.cost.cost_ns(feats)


__all__ = ["FEATURES", "LATER_FEATURES", "WALK_START_PAGES", "KsmdClock", "KsmdCost",
           "KsmdMeter", "KsmdWork", "checked_cost", "cold_nodes", "default_cost", "features",
           "mean_depth"]
