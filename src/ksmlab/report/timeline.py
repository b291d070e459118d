"""The timeline as CSV (``ksmlab run --timeline FILE``).

One header line, :data:`~ksmlab.scenario.result.TIMELINE_COLUMNS`, then one
row per sample: ``time_s`` and ``ksmd_cpu_s`` in seconds (``ksmd_cpu_s`` is
empty when it cannot be read), every counter as an integer.
"""

from __future__ import annotations

import csv
import io
import math

from ksmlab.scenario.result import TIMELINE_COLUMNS, RunResult


def _cell(i: int, v: float) -> str:
    if math.isnan(v):
        return ""
    if i in (0, len(TIMELINE_COLUMNS) - 1):
        return f"{v:.6f}".rstrip("0").rstrip(".") if v else "0"
    return str(int(v))


def timeline_csv(r: RunResult) -> str:
    """The CSV text of *r*'s timeline."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(TIMELINE_COLUMNS)
    for row in r.timeline:
        w.writerow([_cell(i, v) for i, v in enumerate(row)])
    return out.getvalue()


__all__ = ["timeline_csv"]
