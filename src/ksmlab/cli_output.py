"""The files ``ksmlab run`` and ``ksmlab plot`` write: checked before the run, written after it.

Each output path is checked before anything runs (an existing writable
directory; for a plot, an extension naming one of
:data:`~ksmlab.report.plot.PLOT_FORMATS`), so a bad path costs nothing.  After
the run (also a failed or interrupted one, so the report shows what happened)
the CSV, the plot in its format and the HTML report (which embeds a PNG) are
written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ksmlab.cli_common import EXIT_INVALID, CliError, write_file
from ksmlab.scenario.result import RunResult


def output_arg(option: str, path: str | None) -> Path | None:
    """Check before running that *path* can be written (an existing, writable directory)."""
    if path is None:
        return None
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise CliError(f"ksmlab: {option}: expected a file name, got the directory {path!r}",
                       EXIT_INVALID)
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise CliError(f"ksmlab: {option}: expected a file in an existing writable directory, "
                       f"got {path!r}", EXIT_INVALID)
    return p


def plot_arg(option: str, path: str | None) -> Path | None:
    """:func:`output_arg`, and the extension names a format the plot can be written in."""
    if path is not None:
        from ksmlab.report.plot import PLOT_FILE_NAMES, plot_format  # matplotlib: only now

        try:
            plot_format(path)
        except ValueError:
            raise CliError(f"ksmlab: {option}: expected {PLOT_FILE_NAMES}, got {path!r}",
                           EXIT_INVALID) from None
    return output_arg(option, path)


@dataclass(frozen=True, slots=True)
class Outputs:
    """The files asked for (None: not asked)."""

    timeline: Path | None = None
    plot: Path | None = None
    html: Path | None = None


def write_outputs(r: RunResult, out: Outputs) -> None:
    """Write every file of *out* from *r*."""
    if out.timeline is not None:
        from ksmlab.report.timeline import timeline_csv

        write_file(out.timeline, timeline_csv(r))
    png = None
    if out.plot is not None or out.html is not None:
        from ksmlab.report.plot import plot_format, plot_image

        fmt = "png" if out.plot is None else plot_format(out.plot)
        image = plot_image(r, fmt)
        if out.plot is not None:
            write_file(out.plot, image)
        png = image if fmt == "png" else None
    if out.html is not None:
        from ksmlab.report.html import render_html

        write_file(out.html, render_html(r, png))


__all__ = ["Outputs", "output_arg", "plot_arg", "write_outputs"]
