"""``ksmlab estimate``: the subcommand's options, progress and outputs (docs/cli.md, docs/estimate.md).

Kept apart from :mod:`ksmlab.cli`, which only registers it; numpy, pyarrow
and the engines are imported when the command runs, not when ``ksmlab``
starts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from ksmlab.cli_common import (
    knob_arg,
    ksmd_cpu_arg,
    positive_duration_arg,
    seed_arg,
)
from ksmlab.scenario.knobs import KNOBS, KnobValue
from ksmlab.scenario.units import format_duration

if TYPE_CHECKING:
    from ksmlab.estimate.simulate import RunProgress

__all__ = ["add_estimate_parser", "cmd_estimate"]

PROGRESS_AFTER_S = 1.0
"""The progress bar appears once loading or running has taken this long."""

DESCRIPTION = """\
Estimate what KSM would do for the processes of a snapshot (ksmlab snapshot):

* the static bound: duplicate pages and zero-filled pages, and the saving if
  every duplicate merged, for the whole snapshot, per process and per group;
* the prediction: the snapshot's pages (with their frames shared between
  fork relatives, the pages already merged, and their rewrite rates) loaded
  into the model, and ksmd run in virtual time with the host's knobs at
  capture (or --knob ones): the same answer, table, timeline, JSON, plot and
  HTML report as `ksmlab run`, with the static bound beside the curve;
* with --by uid or --by cgroup, the exposure: pages KSM would share across
  those security domains, and what merging only within each would save.

Without --until the run goes on until the saving settles (a full scan that
changes it by at most 0.5%), at most 200 full scans. docs/estimate.md says
how the model is built and how close it came to the real kernel."""


def add_estimate_parser(sub: argparse._SubParsersAction[Any],
                        formatter: type[argparse.HelpFormatter], epilog: str) -> None:
    """Register ``estimate`` on the subcommand parsers *sub*."""
    p = sub.add_parser("estimate", formatter_class=formatter, description=DESCRIPTION,
                       help="predict what KSM would save, how fast and at what CPU cost, "
                            "from a snapshot",
                       epilog="examples:\n"
                              "  sudo ksmlab snapshot --pid 1234 --pid 1235 -o app.parquet\n"
                              "  ksmlab estimate app.parquet\n"
                              "  ksmlab estimate app.parquet --knob pages_to_scan=1000 "
                              "--until 10min --html app.html\n"
                              "  ksmlab estimate host.parquet --by uid --json > host.json\n\n"
                              + epilog)
    p.add_argument("file", metavar="FILE", help="a snapshot written by ksmlab snapshot")
    p.add_argument("--knob", type=knob_arg, action="append", default=[], metavar="NAME=VALUE",
                   help=f"run with this KSM knob instead of the host's at capture (repeatable); "
                        f"NAME is one of {', '.join(n for n in KNOBS if n != 'run')}")
    p.add_argument("--until", type=positive_duration_arg, metavar="DUR",
                   help="virtual time to run ksmd for (e.g. 10min); default: until the saving "
                        "settles")
    p.add_argument("--sample", type=positive_duration_arg, metavar="DUR",
                   help="the timeline's period (default 1/400 of --until, or 1/25 of a full "
                        "scan): the time to 50%% and 90%% is resolved to it")
    p.add_argument("--by", choices=("uid", "cgroup", "comm"),
                   help="the static bound per group; uid and cgroup also give the exposure "
                        "across them")
    p.add_argument("--engine", choices=("auto", "sim", "bulk"), default="auto",
                   help="sim: SimKernel in fingerprint mode; bulk: the bulk engine; auto "
                        "(default): sim up to 50,000 pages, bulk above (the same answer)")
    p.add_argument("--seed", type=seed_arg(2**63 - 1), default=0, metavar="N",
                   help="seed of the pages' rewrites (default 0)")
    p.add_argument("--cost", metavar="FILE",
                   help="ksmd's CPU cost and clock on the model: a file written by `ksmlab "
                        "calibrate` on the host to predict (default: the model shipped, fitted "
                        "on the project's machine; see docs/cost-model.md)")
    p.add_argument("--ksmd-cpu-at-start", type=ksmd_cpu_arg, metavar="DUR|host",
                   help="ksmd's CPU time since boot when the run starts, e.g. 4min, or `host`: "
                        "this machine's ksmd's now (default: the host's at capture, recorded "
                        "in the snapshot; 0 if it is not). The scan-time advisor's first step "
                        "counts all of it (docs/estimate.md)")
    p.add_argument("--json", action="store_true",
                   help="print the estimate as JSON (schema ksmlab.estimate/1) instead of the "
                        "tables")
    p.add_argument("--timeline", metavar="FILE", help="write the timeline as CSV")
    p.add_argument("--plot", metavar="FILE",
                   help="draw the timeline, with the static bound, as .png, .svg or .pdf")
    p.add_argument("--html", metavar="FILE", help="write a self-contained HTML report")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help=f"show progress on stderr once loading or running takes more than "
                        f"{PROGRESS_AFTER_S:g} s (default: when stderr is a terminal)")
    p.set_defaults(func=cmd_estimate)


class _Bar:
    """A progress bar on stderr, shown once a phase has taken :data:`PROGRESS_AFTER_S`."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.started = time.monotonic()
        self.bar: Any = None
        self.task: Any = None

    def _show(self) -> bool:
        if not self.enabled:
            return False
        if self.bar is None:
            if time.monotonic() - self.started < PROGRESS_AFTER_S:
                return False
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                TextColumn("{task.fields[what]}"), TimeElapsedColumn(),
                                console=Console(stderr=True, force_terminal=True), transient=True)
            self.task = self.bar.add_task("", total=None, what="")
            self.bar.start()
        return True

    def loading(self, done: int, total: int) -> None:
        if self._show():
            self.bar.update(self.task, description="loading pages", completed=done, total=total,
                            what=f"{done:,} / {total:,} pages")

    def running(self, p: RunProgress) -> None:
        if self._show():
            end = "" if p.until_s is None else f" / {format_duration(p.until_s)}"
            self.bar.update(self.task, description="running ksmd",
                            completed=p.now_s, total=p.until_s,
                            what=f"virtual time {format_duration(p.now_s)}{end}, "
                                 f"full scans: {p.full_scans}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


@contextmanager
def _bar(enabled: bool) -> Iterator[_Bar]:
    bar = _Bar(enabled)
    try:
        yield bar
    finally:
        bar.close()


def cmd_estimate(args: argparse.Namespace) -> int:
    """``ksmlab estimate``."""
    from ksmlab.cli_common import (
        EXIT_INTERRUPTED,
        EXIT_INVALID,
        EXIT_OK,
        CliError,
        console,
        load_cost_arg,
        resolve_ksmd_cpu,
        write_file,
    )
    from ksmlab.cli_output import output_arg, plot_arg
    from ksmlab.cli_stop import graceful_stop
    from ksmlab.estimate.core import run_estimate
    from ksmlab.snapshot.reader import SnapshotFormatError, read_snapshot

    cost = load_cost_arg(args.cost, "ksmlab estimate")
    cpu0 = (None if args.ksmd_cpu_at_start is None
            else resolve_ksmd_cpu(args.ksmd_cpu_at_start, "ksmlab estimate"))
    plot = plot_arg("--plot", args.plot)
    html = output_arg("--html", args.html)
    csv = output_arg("--timeline", args.timeline)
    if os.path.isdir(args.file):
        raise CliError(f"ksmlab estimate: {args.file}: expected a snapshot file, got a "
                       f"directory", EXIT_INVALID)
    try:
        snap = read_snapshot(args.file)
    except FileNotFoundError:
        raise CliError(f"ksmlab estimate: {args.file}: expected a snapshot file, got no such "
                       f"file", EXIT_INVALID) from None
    except PermissionError:
        raise CliError(f"ksmlab estimate: {args.file}: permission denied: a snapshot is "
                       f"readable by its owner only (mode 0600, it describes another "
                       f"process's memory); run ksmlab estimate as the user who took it (e.g. "
                       f"with sudo), or give the file to this user", EXIT_INVALID) from None
    except (SnapshotFormatError, OSError) as e:
        raise CliError(f"ksmlab estimate: {e}", EXIT_INVALID) from None
    progress = args.progress if args.progress is not None else sys.stderr.isatty()
    overrides: dict[str, KnobValue] = dict(args.knob)
    with graceful_stop() as stop, _bar(bool(progress)) as bar:
        try:
            est = run_estimate(snap, knobs=overrides, until_ns=args.until, sample_ns=args.sample,
                               engine=args.engine, by=args.by, seed=args.seed,
                               load_progress=bar.loading, run_progress=bar.running, stop=stop,
                               cost=cost, ksmd_cpu_at_start_ns=cpu0)
        except ValueError as err:
            raise CliError(f"ksmlab estimate: {err}", EXIT_INVALID) from None
        bar.close()
        bar.enabled = False
        _print(est, args.json, console)
        _write(est, plot, html, csv, write_file)
    if est.result.interrupted is not None:
        print(f"ksmlab estimate: interrupted by {est.result.interrupted} at "
              f"{format_duration(est.result.end_s)} (virtual time): partial result",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK


def _print(e: Any, as_json: bool, console: Callable[[], Any]) -> None:
    if as_json:
        from ksmlab.estimate.report import estimate_document

        print(json.dumps(estimate_document(e), indent=2, allow_nan=False), flush=True)
        return
    from ksmlab.estimate.report import render_terminal

    out = console()
    out.print(render_terminal(e, out.width))


def _write(e: Any, plot: Any, html: Any, csv: Any, write_file: Callable[[Any, Any], None]) -> None:
    r = e.result
    if csv is not None:
        from ksmlab.report.timeline import timeline_csv

        write_file(csv, timeline_csv(r))
    if plot is None and html is None:
        return
    from ksmlab.estimate.report import plot_references, static_html
    from ksmlab.report.html import render_html
    from ksmlab.report.plot import plot_format, plot_image

    refs = plot_references(e)
    fmt = "png" if plot is None else plot_format(plot)
    image = plot_image(r, fmt, refs)
    if plot is not None:
        write_file(plot, image)
    if html is not None:
        png = image if fmt == "png" else plot_image(r, "png", refs)
        write_file(html, render_html(r, png, static_html(e)))
