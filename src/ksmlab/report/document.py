"""The JSON document of a run (``ksmlab run --json``), schema ``ksmlab.run/1``.

The schema is documented in ``docs/cli.md``; :data:`SCHEMA` names its
version, and a change that is not purely additive gets a new version.  The
document is deterministic for a run on the model: it holds no wall-clock time
and no host name, so two runs of one scenario with one seed give equal
documents.  :func:`from_document` reads one back (``ksmlab plot RESULT.json``);
fields added since the first version (``partial``, ``interrupted``,
``summary``, ``scenario.sample_interval_s``, ``notes``, ``ksmd_cpu_at_start_s``) may be
absent from older ones.
"""

from __future__ import annotations

import math
from typing import Any

from ksmlab import __version__
from ksmlab.errors import KsmSimError
from ksmlab.report.headline import headline, headline_document
from ksmlab.scenario.model import GLOBAL_COUNTERS
from ksmlab.scenario.result import (
    TIMELINE_COLUMNS,
    CheckpointResult,
    CheckResult,
    MappingInfo,
    ProcessInfo,
    RunResult,
    ScenarioInfo,
)

SCHEMA = "ksmlab.run/1"


class DocumentError(KsmSimError, ValueError):
    """A JSON document that is not a ``ksmlab.run/1`` result; the message names the field."""


def _num(x: float) -> float | None:
    return None if math.isnan(x) else x


def to_document(r: RunResult) -> dict[str, Any]:
    """The JSON-serialisable document of *r*."""
    s = r.scenario
    return {
        "schema": SCHEMA,
        "ksmlab_version": __version__,
        "backend": r.backend,
        "machine": r.machine,
        "ok": r.ok,
        "partial": r.partial,
        "interrupted": r.interrupted,
        "failures": list(r.failures),
        "notes": list(r.notes),
        "ksmd_cpu_at_start_s": r.ksmd_cpu_at_start_s,
        "summary": headline_document(headline(r)),
        "scenario": {
            "name": s.name,
            "description": s.description,
            "source": s.source,
            "seed": s.seed,
            "planned_end_s": s.planned_end_s,
            "sample_interval_s": s.sample_interval_s,
            "total_pages": s.total_pages,
            "processes": [
                {"name": p.name, "count": p.count, "start_s": p.start_s, "merge_any": p.merge_any,
                 "mappings": [{"name": m.name, "pages": m.pages, "content": m.content,
                               "kind": m.kind, "mergeable": m.mergeable} for m in p.mappings]}
                for p in s.processes],
            "activities": list(s.activities),
            "events": list(s.events),
        },
        "knobs": dict(r.knobs),
        "end_s": r.end_s,
        "checkpoints": [
            {"name": c.name, "time_s": c.time_s, "reached": c.reached,
             "ksmd_cpu_s": c.ksmd_cpu_s,
             "counters": {n: c.counters[n] for n in GLOBAL_COUNTERS},
             "processes": {g: dict(v) for g, v in c.processes.items()},
             "checks": [{"check": x.check, "counter": x.counter, "process": x.process,
                         "min": x.min, "max": x.max, "actual": x.actual, "ok": x.ok}
                        for x in c.checks]}
            for c in r.checkpoints],
        "timeline": {
            "columns": list(TIMELINE_COLUMNS),
            "rows": [[_num(v) if i in (0, len(TIMELINE_COLUMNS) - 1) else int(v)
                      for i, v in enumerate(row)] for row in r.timeline],
        },
    }


def _get(d: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(d, dict) or key not in d:
        msg = f"{where}.{key}: missing" if where else f"{key}: missing"
        raise DocumentError(msg)
    value = d[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in (
            kind if isinstance(kind, tuple) else (kind,))):
        msg = f"{where + '.' if where else ''}{key}: expected {kind}, got {type(value).__name__}"
        raise DocumentError(msg)
    return value


def from_document(doc: Any) -> RunResult:
    """The :class:`RunResult` a ``ksmlab.run/1`` document describes.

    Raises:
        DocumentError: *doc* is not such a document (wrong schema, missing field).
    """
    schema = _get(doc, "schema", str, "")
    if schema != SCHEMA:
        msg = f"schema: expected {SCHEMA!r}, got {schema!r}"
        raise DocumentError(msg)
    s = _get(doc, "scenario", dict, "")
    procs = tuple(
        ProcessInfo(_get(p, "name", str, "scenario.processes"), _get(p, "count", int, "process"),
                    float(_get(p, "start_s", (int, float), "process")),
                    _get(p, "merge_any", bool, "process"),
                    tuple(MappingInfo(_get(m, "name", str, "mapping"), _get(m, "pages", int, "mapping"),
                                      _get(m, "content", str, "mapping"), _get(m, "kind", str, "mapping"),
                                      _get(m, "mergeable", bool, "mapping"))
                          for m in _get(p, "mappings", list, "process")))
        for p in _get(s, "processes", list, "scenario"))
    interval = s.get("sample_interval_s")
    info = ScenarioInfo(_get(s, "name", str, "scenario"), _get(s, "description", str, "scenario"),
                        _get(s, "source", str, "scenario"), _get(s, "seed", int, "scenario"),
                        float(_get(s, "planned_end_s", (int, float), "scenario")),
                        _get(s, "total_pages", int, "scenario"), procs,
                        tuple(_get(s, "activities", list, "scenario")),
                        tuple(_get(s, "events", list, "scenario")),
                        float(interval) if isinstance(interval, int | float) else None)
    cps = []
    for c in _get(doc, "checkpoints", list, ""):
        counters = _get(c, "counters", dict, "checkpoints[]")
        cpu = c.get("ksmd_cpu_s") if isinstance(c, dict) else None
        checks = tuple(CheckResult(x["check"], x["counter"], x["process"], x["min"], x["max"],
                                   x["actual"], x["ok"])
                       for x in _get(c, "checks", list, "checkpoints[]"))
        cps.append(CheckpointResult(
            _get(c, "name", str, "checkpoints[]"), float(_get(c, "time_s", (int, float), "checkpoints[]")),
            _get(c, "reached", bool, "checkpoints[]"),
            {n: int(counters.get(n, 0)) for n in GLOBAL_COUNTERS},
            None if cpu is None else float(cpu),
            {g: {k: int(v) for k, v in d.items()}
             for g, d in _get(c, "processes", dict, "checkpoints[]").items()},
            checks))
    tl = _get(doc, "timeline", dict, "")
    columns = _get(tl, "columns", list, "timeline")
    if columns != list(TIMELINE_COLUMNS):
        msg = f"timeline.columns: expected {list(TIMELINE_COLUMNS)}, got {columns}"
        raise DocumentError(msg)
    rows = tuple(tuple(float("nan") if v is None else float(v) for v in row)
                 for row in _get(tl, "rows", list, "timeline"))
    knobs = {k: v for k, v in _get(doc, "knobs", dict, "").items() if isinstance(v, int | str)}
    interrupted = _get(doc, "interrupted", str, "") if doc.get("interrupted") is not None else None
    cpu0 = (float(_get(doc, "ksmd_cpu_at_start_s", (int, float), ""))
            if doc.get("ksmd_cpu_at_start_s") is not None else None)
    notes = tuple(str(n) for n in _get(doc, "notes", list, "")) if "notes" in doc else ()
    return RunResult(info, _get(doc, "backend", str, ""), _get(doc, "machine", str, ""), knobs,
                     tuple(cps), rows, float(_get(doc, "end_s", (int, float), "")),
                     tuple(_get(doc, "failures", list, "")), interrupted, cpu0, notes)


__all__ = ["SCHEMA", "DocumentError", "from_document", "to_document"]
