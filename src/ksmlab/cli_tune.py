"""``ksmlab tune``: run a grid of knob configurations on one workload and recommend one.

Everything that can be checked is checked before anything runs (exit 2,
one line): the grid (:mod:`ksmlab.tune.grid`), every configuration against
the workload's own knobs, the output files, the pre-flight of one run.  The
sweep then runs on Dask (:mod:`ksmlab.tune.sweep`), or one run after the
other on ``--backend linux``; Ctrl-C or SIGTERM stops it and what finished is
reported, marked partial (exit 130).  The reference is docs/tune.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ksmlab.cli_common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_INVALID,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    KSMD_CPU_HELP,
    CliError,
    console,
    duration_arg,
    ksmd_cpu_arg,
    load_cost_arg,
    model_only,
    resolve_ksmd_cpu,
    seed_arg,
    write_file,
)
from ksmlab.cli_output import output_arg, plot_arg
from ksmlab.cli_stop import graceful_stop
from ksmlab.constants import PAGE_SIZE
from ksmlab.scenario.backends import BACKENDS, BackendUnavailableError
from ksmlab.scenario.units import NS_PER_S, format_bytes, parse_size

if TYPE_CHECKING:
    from ksmlab.tune.grid import Config, Grid
    from ksmlab.tune.sweep import Progress
    from ksmlab.tune.work import Outcome, Workload

__all__ = ["add_tune_parser", "cmd_tune"]

SNAPSHOT_UNTIL_NS = 600 * NS_PER_S
"""A snapshot's configurations run this long (virtual time) unless ``--until`` says."""


def _budget_arg(text: str) -> float:
    raw = text.strip().removesuffix("%")
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a share of one CPU > 0 such as 5%, got {text!r}")
    return value


def _size_arg(text: str) -> int:
    try:
        size = parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected {e}, got {text!r}") from None
    if size < PAGE_SIZE:
        raise argparse.ArgumentTypeError(f"expected a size of at least 4KiB, got {text!r}")
    return size


def _workers_arg(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= 1024:
        raise argparse.ArgumentTypeError(f"expected a number of workers from 1 to 1024, got {text!r}")
    return n


def add_tune_parser(sub: Any, fmt: type[argparse.HelpFormatter], exit_codes: str) -> None:
    """The ``tune`` subcommand of *sub*."""
    from ksmlab.tune.grid import MAX_POINTS

    p = sub.add_parser(
        "tune", formatter_class=fmt,
        help="run a grid of KSM knob settings on a workload (on Dask) and recommend one",
        description="Run every configuration of the knob grid on SOURCE (a scenario file, the "
                    "built-in\nscenario when omitted, or a snapshot .parquet file), each an "
                    "independent run, in\nparallel on Dask (a LocalCluster of this machine, or "
                    "--scheduler), and print a\ntable of every configuration (memory saved at "
                    "the end, time to 90% of it, ksmd's\nCPU share, pages_volatile), the Pareto "
                    "front of saving against CPU, and the\nconfiguration that saves the most "
                    "within --cpu-budget, beside three references run\non the same workload: "
                    "the kernel's defaults, the scan-time advisor and ksmtuned's\npolicy. "
                    "Ctrl-C stops the sweep and reports what finished, marked partial.\n"
                    "See docs/tune.md.",
        epilog="examples:\n"
               "  ksmlab tune --grid pages_to_scan=100,1000,5000 --grid sleep_millisecs=10,20,200\n"
               "  ksmlab tune vms.toml --grid pages_to_scan=100,1000 --grid smart_scan=0,1 "
               "--cpu-budget 5%\n"
               "  ksmlab tune app.parquet --grid pages_to_scan=100,1000 --until 5min --json\n\n"
               + exit_codes)
    p.add_argument("source", nargs="?", metavar="SOURCE",
                   help="scenario (.toml) or snapshot (.parquet); omitted: the built-in scenario")
    p.add_argument("--grid", action="append", metavar="NAME=V1,V2,...",
                   help="a knob and the values to try (repeatable, one per knob); every "
                        "combination runs")
    p.add_argument("--cpu-budget", type=_budget_arg, metavar="PCT",
                   help="the recommendation's limit on ksmd's CPU, in percent of one CPU over "
                        "the run (e.g. 5%%; default: none, the most saving wins)")
    p.add_argument("--until", type=duration_arg, metavar="TIME",
                   help="run each configuration until TIME (a scenario: within its end unless "
                        "--extend; a snapshot: default 10min of virtual time)")
    p.add_argument("--extend", action="store_true",
                   help="with --until past the scenario's end: run it on until then")
    # The snapshot path's rewrite draws take a signed 64-bit seed (as `estimate --seed`);
    # one bound for both inputs, so a seed is refused at parse time whatever it seeds.
    p.add_argument("--seed", type=seed_arg(2**63 - 1), metavar="N",
                   help="replace the workload's seed (0 to 2^63-1)")
    p.add_argument("--backend", choices=("auto", *BACKENDS), default="auto",
                   help="the engine every configuration runs on (auto: as `ksmlab run` picks "
                        "it); linux runs them one after the other on this machine's kernel")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="run on the Dask cluster whose scheduler is at ADDRESS "
                        "(tcp://HOST:8786) instead of a LocalCluster of this machine")
    p.add_argument("--workers", type=_workers_arg, metavar="N",
                   help="the LocalCluster's worker processes (default: one per core)")
    p.add_argument("--host-memory", type=_size_arg, metavar="SIZE",
                   help="the host's memory in ksmtuned's model (default: the memory the "
                        "workload maps, all of it committed to it; see docs/tune.md)")
    p.add_argument("--cost", metavar="FILE",
                   help="ksmd's CPU cost and clock on the model: a file written by `ksmlab "
                        "calibrate` (default: the model shipped; see docs/cost-model.md)")
    p.add_argument("--ksmd-cpu-at-start", type=ksmd_cpu_arg, metavar="DUR|host",
                   help=f"every configuration's: {KSMD_CPU_HELP} (default: the scenario's "
                        f"ksmd_cpu_at_start, or a snapshot's host at capture)")
    p.add_argument("--yes", action="store_true",
                   help=f"run a grid of more than {MAX_POINTS:,} configurations")
    p.add_argument("--json", action="store_true",
                   help="print the result as JSON (schema ksmlab.tune/1, docs/cli.md)")
    p.add_argument("--plot", metavar="FILE",
                   help="draw the saving against CPU (and over time) as .png, .svg or .pdf")
    p.add_argument("--html", metavar="FILE", help="write a self-contained HTML report")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show a progress bar on stderr (default: when stderr is a terminal)")
    p.set_defaults(func=cmd_tune)


def _is_snapshot(source: str | None) -> bool:
    if source is None:
        return False
    if source.endswith(".parquet"):
        return True
    try:
        with open(source, "rb") as f:
            return f.read(4) == b"PAR1"
    except OSError:
        return False


def _scenario_workload(args: argparse.Namespace, configs: list[Config]) -> Workload:
    from ksmlab.cli import _load, _plan
    from ksmlab.scenario.loader import ScenarioError
    from ksmlab.tune.work import Workload, configured, mergeable_bytes

    args.scenario, args.knob, args.sample = args.source, None, None
    sc = _load(args)
    for cfg in configs:  # each configuration's knobs against the scenario's: before any run
        try:
            configured(sc, cfg)
        except ScenarioError as e:
            raise CliError(f"ksmlab tune: configuration {cfg.label}: {e}", EXIT_INVALID) from None
    plan = _plan(configured(sc, configs[0]), args.backend, "bytes")
    print(f"ksmlab: {plan.describe()}", file=sys.stderr, flush=True)
    host = args.host_memory or mergeable_bytes(sc)
    return Workload(sc.name, sc.source, plan.backend, host, scenario=sc,
                    cost=load_cost_arg(args.cost, "ksmlab tune"))


def _snapshot_workload(args: argparse.Namespace, configs: list[Config]) -> Workload:
    from ksmlab.estimate.core import resolve_knobs
    from ksmlab.estimate.load import choose_engine
    from ksmlab.estimate.plan import load_plan
    from ksmlab.snapshot.reader import SnapshotFormatError, read_snapshot
    from ksmlab.tune.work import Workload

    if args.backend == "linux":
        raise CliError("ksmlab tune: --backend linux: a snapshot runs on the model only (sim or "
                       "bulk); the real kernel needs the processes themselves", EXIT_INVALID)
    if args.extend:
        raise CliError("ksmlab tune: --extend applies to a scenario; a snapshot runs until "
                       "--until", EXIT_INVALID)
    try:
        snap = read_snapshot(args.source)
    except FileNotFoundError:
        raise CliError(f"ksmlab tune: {args.source}: expected a snapshot file, got no such file",
                       EXIT_INVALID) from None
    except (SnapshotFormatError, OSError) as e:
        raise CliError(f"ksmlab tune: {e}", EXIT_INVALID) from None
    for cfg in configs:
        try:
            resolve_knobs(snap, cfg.overrides())
        except ValueError as e:
            raise CliError(f"ksmlab tune: configuration {cfg.label}: {e}", EXIT_INVALID) from None
    pages = len(load_plan(snap))
    engine = choose_engine(args.backend, pages)
    until = args.until if args.until is not None else SNAPSHOT_UNTIL_NS
    host = args.host_memory or max(pages, 1) * PAGE_SIZE
    print(f"ksmlab: {pages} pages of {args.source} on the {engine} engine, each configuration "
          f"for {until / NS_PER_S:g} s of virtual time", file=sys.stderr, flush=True)
    cpu0 = (None if args.ksmd_cpu_at_start is None
            else resolve_ksmd_cpu(args.ksmd_cpu_at_start, "ksmlab tune"))
    return Workload(f"snapshot {os.path.basename(args.source)}", args.source, engine, host,
                    snapshot=args.source, until_ns=until, seed=args.seed or 0,
                    cost=load_cost_arg(args.cost, "ksmlab tune"), ksmd_cpu_at_start_ns=cpu0)


@contextmanager
def _bar(enabled: bool, total: int) -> Iterator[Progress | None]:
    """A progress bar over the configurations on stderr, or a no-op."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(TextColumn("tune"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn(), TextColumn("{task.fields[last]}", markup=False),
                   console=Console(stderr=True), transient=True, refresh_per_second=4)
    task = bar.add_task("tune", total=total, last="")
    with bar:
        def update(i: int, cfg: Config, o: Outcome) -> None:
            what = "failed" if o.status != "ok" else format_bytes(o.saved_bytes or 0)
            bar.update(task, advance=1, last=f"#{i} {cfg.label}: {what}")
        yield update


def cmd_tune(args: argparse.Namespace) -> int:
    """``ksmlab tune``."""
    from ksmlab.backends.linux_knobs import boot_knobs
    from ksmlab.tune.grid import GridError, parse_grid, references

    try:
        grid = parse_grid(args.grid, allow_large=args.yes)
    except GridError as e:
        raise CliError(f"ksmlab tune: {e}", EXIT_INVALID) from None
    if args.scheduler is not None and args.backend == "linux":
        raise CliError("ksmlab tune: --scheduler: the real kernel's runs go one after the other "
                       "on this machine (--backend linux), not on a Dask cluster", EXIT_INVALID)
    if args.cost is not None:
        model_only("ksmlab tune", "--cost", args.backend, "the real kernel has its own ksmd")
    if args.scheduler is not None and args.workers is not None:
        raise CliError("ksmlab tune: --workers applies to the LocalCluster; the cluster at "
                       "--scheduler has its own workers", EXIT_INVALID)
    plot = plot_arg("--plot", args.plot)
    html = output_arg("--html", args.html)
    configs = grid.configs()
    n_grid = len(configs)
    configs += references(grid, boot_knobs())
    snapshot = _is_snapshot(args.source)
    w = _snapshot_workload(args, configs) if snapshot else _scenario_workload(args, configs)
    progress = args.progress if args.progress is not None else sys.stderr.isatty()
    return _sweep_and_report(args, w, grid, configs, n_grid, bool(progress), plot, html)


def _sweep_and_report(args: argparse.Namespace, w: Workload, grid: Grid, configs: list[Config],
                      n_grid: int, progress: bool, plot: Path | None, html: Path | None) -> int:
    from ksmlab.tune.report import render_table, tune_document, tune_html, tune_plot
    from ksmlab.tune.result import assemble
    from ksmlab.tune.sweep import run_sweep

    started = time.monotonic()
    with graceful_stop() as stop:
        with _bar(progress, len(configs)) as update:
            try:
                sweep = run_sweep(w, configs, scheduler=args.scheduler, workers=args.workers,
                                  progress=update, stop=stop)
            except BackendUnavailableError as e:
                raise CliError(f"ksmlab tune: the {w.backend} backend is unavailable: {e}",
                               EXIT_UNAVAILABLE) from None
            except (OSError, TimeoutError) as e:
                where = args.scheduler or "a LocalCluster"
                raise CliError(f"ksmlab tune: cannot run on {where}: {e}",
                               EXIT_UNAVAILABLE) from None
        result = assemble(w, grid, configs, n_grid, sweep, args.cpu_budget)
        if args.json:
            print(json.dumps(tune_document(result), indent=2, allow_nan=False), flush=True)
        else:
            console().print(render_table(result))
        if plot is not None:
            write_file(plot, tune_plot(result, plot.suffix.lstrip(".").lower()))
        if html is not None:
            write_file(html, tune_html(result))
    if result.sweep.interrupted is not None:
        print(f"ksmlab tune: interrupted by {result.sweep.interrupted} after "
              f"{time.monotonic() - started:.1f} s: partial result, {len(sweep.outcomes)} of "
              f"{len(configs)} runs finished", file=sys.stderr)
        return EXIT_INTERRUPTED
    if result.failed:
        first = result.outcome(result.failed[0])
        assert first is not None
        print(f"ksmlab tune: {len(result.failed)} run(s) failed; first, configuration "
              f"{configs[result.failed[0]].label}: {first.error}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK
