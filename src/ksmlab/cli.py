"""The ``ksmlab`` command: run scenarios, draw their timelines, watch the machine's KSM.

Subcommands (``ksmlab COMMAND --help`` for each; the reference is docs/cli.md):

* ``run [SCENARIO]``: run a scenario (default: the built-in one) and print
  the answer (memory saved, time to merge, ksmd's cost) and the checkpoint
  table, or ``--json``; write ``--timeline`` CSV, ``--plot`` PNG/SVG/PDF,
  ``--html`` report;
* ``plot [SOURCE]``: the picture and the HTML report of a scenario (run now)
  or of a saved ``--json`` result;
* ``stat``: the KSM counters of this machine, refreshed, with rates, and
  ``doctor``: this machine's KSM state, and repair of what a killed session
  left (both in :mod:`ksmlab.cli_host`);
* ``check SCENARIO...``: validate scenario files without running them;
* ``init [FILE]``: write the built-in scenario, as a starting point;
* ``snapshot``: capture running processes' pages as KSM would see them
  (:mod:`ksmlab.snapshot.command`), and ``estimate``: predict from one what KSM
  would save, how fast and at what CPU cost (:mod:`ksmlab.estimate.command`);
* ``calibrate``: fit the model's ksmd cost and clock to this machine's ksmd
  (:mod:`ksmlab.cli_calibrate`; ``run --cost FILE`` uses the result);
* ``tune [SOURCE]``: run a grid of knob settings on a workload, in parallel on
  Dask, and recommend one beside three references (:mod:`ksmlab.cli_tune`).

Exit codes: 0 success; 1 the run failed (a check failed, a full-scan
checkpoint was not reached, a kernel call failed, an output could not be
written); 2 invalid input (command line, scenario file, result file);
3 the machine cannot do it (``--backend linux`` without root, KSM or a C
compiler, or the KSM lock busy; ``stat`` without KSM); 130 interrupted
(Ctrl-C or SIGTERM: a run stops at the next safe point and its partial result
is printed and written, :mod:`ksmlab.cli_stop`; a second signal aborts).
Every error is one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

from rich.console import Console

from ksmlab import __version__, cli_calibrate
from ksmlab.cli_common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_INVALID,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    KSMD_CPU_HELP,
    TABLE_WIDTH,
    CliError,
    duration_arg,
    knob_arg,
    ksmd_cpu_arg,
    load_cost_arg,
    model_only,
    resolve_ksmd_cpu,
    seed_arg,
    write_file,
)
from ksmlab.cli_common import console as _console
from ksmlab.cli_host import cmd_doctor, cmd_stat
from ksmlab.cli_output import Outputs, output_arg, plot_arg, write_outputs
from ksmlab.cli_stop import StopRequest, graceful_stop
from ksmlab.constants import PAGE_SIZE
from ksmlab.errors import NotModelledError
from ksmlab.mm.page import CONTENT_MODES
from ksmlab.report.counters import counters_epilog
from ksmlab.scenario import preflight
from ksmlab.scenario.backends import BACKENDS, BackendUnavailableError, open_backend
from ksmlab.scenario.knobs import KNOBS
from ksmlab.scenario.loader import (
    MAX_INT,
    ScenarioError,
    apply_knob_overrides,
    builtin_scenario_text,
    load_builtin,
    load_scenario,
    truncate,
)
from ksmlab.scenario.model import Scenario
from ksmlab.scenario.result import RunResult
from ksmlab.scenario.runner import ProgressInfo, RunError, run_scenario
from ksmlab.scenario.transform import (
    latest_end_ns,
    with_ksmd_cpu_at_start,
    with_sample_interval,
)
from ksmlab.scenario.units import NS_PER_S, format_bytes, format_duration

__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_INVALID", "EXIT_OK", "EXIT_UNAVAILABLE",
           "TABLE_WIDTH", "CliError", "build_parser", "main"]

PROGRESS_AFTER_S = 1.0
"""A progress bar appears once a run has taken this long (wall clock)."""

EXIT_CODES = """exit codes:
  0    success
  1    the run failed: a check failed, a full-scan checkpoint was not reached,
       a kernel call failed, or an output file could not be written
  2    invalid input: command line, scenario file or result file
  3    this machine cannot do it (--backend linux without root, KSM or a C
       compiler, or the KSM lock held too long by another session; stat
       without /sys/kernel/mm/ksm)
  130  interrupted (Ctrl-C or SIGTERM): run and plot stop at the next safe
       point, then print and write what was reached, marked partial; a
       second Ctrl-C aborts without saving
Errors are one line on stderr."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit code 2."""

    def error(self, message: str) -> NoReturn:
        raise CliError(f"{self.prog}: {message} (see {self.prog} --help)", EXIT_INVALID)


# --- shared helpers -------------------------------------------------------------------------

def _load(args: argparse.Namespace) -> Scenario:
    """The scenario the arguments name, with --seed, --knob, --until (--extend) and --sample applied."""
    try:
        sc = (load_scenario(args.scenario, seed=args.seed) if args.scenario
              else load_builtin(seed=args.seed))
        if args.knob:
            sc = apply_knob_overrides(sc, dict(args.knob))
        if args.until is not None:
            if args.until <= 0:
                raise ScenarioError("--until", "until", "a duration > 0",
                                    format_duration(args.until / NS_PER_S))
            end = latest_end_ns(sc)
            if args.until > end and not args.extend:
                # A typo (1h for 1min) would silently run for an hour otherwise.
                raise CliError(
                    f"ksmlab: --until: expected a time within the scenario, which ends at "
                    f"{format_duration(end / NS_PER_S)} (add --extend to run it on past its end), "
                    f"got {format_duration(args.until / NS_PER_S)}", EXIT_INVALID)
            sc = truncate(sc, args.until)
        elif args.extend:
            raise CliError("ksmlab: --extend: expected --until TIME too (how far to run the "
                           "scenario on past its end), got no --until", EXIT_INVALID)
        if args.sample is not None:
            sc = with_sample_interval(sc, args.sample)
        cpu = getattr(args, "ksmd_cpu_at_start", None)
        if cpu is not None:
            model_only("ksmlab", "--ksmd-cpu-at-start", args.backend,
                       "the real kernel's ksmd has its own CPU time")
            sc = with_ksmd_cpu_at_start(sc, resolve_ksmd_cpu(cpu, "ksmlab"))
    except ScenarioError as e:
        raise CliError(str(e), EXIT_INVALID) from None
    return sc


@contextmanager
def _progress(enabled: bool, sc: Scenario,
              backend: str) -> Iterator[Callable[[ProgressInfo], None] | None]:
    """A progress callback that shows a bar on stderr once the run has taken a second:
    the memory filled while the processes are set up, then the time reached, each with
    the time it should take to finish (from the pace so far).

    The bar is redrawn twice a second from one text column (rich spends milliseconds
    per column and redraw), so that it costs well under 1% of a run.
    """
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, Progress, TextColumn

    console = Console(stderr=True, force_terminal=True)
    unit = "real" if backend == "linux" else "virtual"
    bar = Progress(TextColumn("{task.description}", markup=False), BarColumn(),
                   TextColumn("{task.fields[info]}", markup=False),
                   console=console, transient=True, refresh_per_second=2)
    started = time.monotonic()
    shown = False
    phase = ""
    task = bar.add_task(f"running {sc.name}", total=None, info="")

    def clock(seconds: float | None) -> str:
        if seconds is None:
            return "-:--:--"
        s = int(seconds)
        return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"

    def update(p: ProgressInfo) -> None:
        nonlocal shown, phase
        if not shown and time.monotonic() - started >= PROGRESS_AFTER_S:
            bar.start()
            shown = True
        if p.setting_up:
            if phase != "setup":  # each phase's estimate from its own pace
                phase = "setup"
                bar.reset(task, total=max(p.pages_to_fill, 1), description=f"setting up {sc.name}")
            done: float = p.pages_filled
            info = (f"{format_bytes(p.pages_filled * PAGE_SIZE)} / "
                    f"{format_bytes(p.pages_to_fill * PAGE_SIZE)} filled")
        else:
            if phase != "run":
                phase = "run"
                bar.reset(task, total=max(p.planned_end_s, 1e-9), description=f"running {sc.name}")
            done = min(p.now_s, p.planned_end_s) if p.planned_end_s else 0
            info = (f"{unit} time {format_duration(p.now_s)} / {format_duration(p.planned_end_s)}"
                    f"  full scans: {p.full_scans}  checkpoints: "
                    f"{p.checkpoints_done}/{p.checkpoints_total}")
        t = bar.tasks[0]
        bar.update(task, completed=done,
                   info=f"{info}  {clock(t.elapsed)} elapsed, {clock(t.time_remaining)} left")

    try:
        yield update
    finally:
        if shown:
            bar.stop()


def _plan(sc: Scenario, backend: str, content: str) -> preflight.Plan:
    """The pre-flight of *sc* on *backend*: CliError (exit 2) if it cannot or must not run."""
    if content != "bytes" and backend not in ("sim", "auto"):
        why = ("the real kernel keeps real bytes" if backend == "linux"
               else "the bulk engine always keeps fingerprints")
        raise CliError(f"ksmlab: --content {content} applies to --backend sim only (and to auto, "
                       f"when it picks sim): {why}", EXIT_INVALID)
    try:
        available = preflight.mem_available()
        return preflight.plan(sc, backend, "fingerprint" if content == "fingerprint" else "bytes",
                              available=available)
    except (preflight.WontFitError, NotModelledError) as e:
        raise CliError(str(e), EXIT_INVALID) from None
    except ValueError as e:  # KSMLAB_MEM_AVAILABLE is not a size
        raise CliError(f"ksmlab: {e}", EXIT_INVALID) from None


def _execute(sc: Scenario, args: argparse.Namespace, stop: StopRequest | None = None) -> RunResult:
    progress = _want_progress(args)
    if args.cost is not None:
        model_only("ksmlab", "--cost", args.backend, "the real kernel has its own ksmd")
    cost = load_cost_arg(args.cost, "ksmlab")
    plan = _plan(sc, args.backend, args.content)
    backend_name = plan.backend
    try:
        backend = open_backend(backend_name, plan.content, cost)
    except BackendUnavailableError as e:
        raise CliError(f"ksmlab: the {backend_name} backend is unavailable: {e}",
                       EXIT_UNAVAILABLE) from None
    # On stderr, as the run starts: stdout opens with the answer (or is the document alone).
    print(f"ksmlab: {plan.describe()}", file=sys.stderr, flush=True)
    try:
        with _progress(progress, sc, backend_name) as update:
            return run_scenario(sc, backend, update, stop)
    except RunError as e:
        raise CliError(f"ksmlab: run failed: {e}", EXIT_FAILED) from None
    finally:
        backend.close()


def _want_progress(args: argparse.Namespace) -> bool:
    if args.progress is not None:
        return bool(args.progress)
    return sys.stderr.isatty()


def _failure_line(r: RunResult) -> str:
    n = len(r.failures)
    return f"ksmlab: {n} check{'s' if n != 1 else ''} failed; first: {r.failures[0]}"


def _exit_code(r: RunResult, sc: Scenario, stop: StopRequest) -> int:
    """The exit code of a run whose result is out, with its one line on stderr."""
    if stop() is not None:
        clock = "real" if r.backend == "linux" else "virtual"
        failed = f"; {len(r.failures)} check(s) failed" if r.failures else ""
        what = (f"partial result, {len(r.checkpoints)} of {len(sc.checkpoints)} checkpoints "
                f"reached" if r.partial else "the run had ended: the result is complete")
        print(f"ksmlab: interrupted by {stop()} at {format_duration(r.end_s)} ({clock} time): "
              f"{what}{failed}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if r.failures:
        print(_failure_line(r), file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


# --- run ------------------------------------------------------------------------------------

def cmd_run(args: argparse.Namespace) -> int:
    """``ksmlab run``."""
    outputs = Outputs(output_arg("--timeline", args.timeline), plot_arg("--plot", args.plot),
                      output_arg("--html", args.html))
    sc = _load(args)
    with graceful_stop() as stop:  # Ctrl-C: stop at a safe point, then save what was reached
        result = _execute(sc, args, stop)
        if args.json:
            from ksmlab.report.document import to_document

            print(json.dumps(to_document(result), indent=2, allow_nan=False), flush=True)
        else:
            from ksmlab.report.table import summary

            console = _console()
            console.print(summary(result, console.width))
        write_outputs(result, outputs)
    return _exit_code(result, sc, stop)


# --- plot -----------------------------------------------------------------------------------

def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() or "scenario"


def cmd_plot(args: argparse.Namespace) -> int:
    """``ksmlab plot``."""
    source = args.source
    result: RunResult | None = None
    if source is not None and source.endswith(".json"):
        from ksmlab.report.document import DocumentError, from_document

        try:
            doc = json.loads(Path(source).read_text(encoding="utf-8"))
            result = from_document(doc)
        except FileNotFoundError:
            raise CliError(f"{source}: (file): expected an existing result file, got no such file",
                           EXIT_INVALID) from None
        except (OSError, ValueError) as e:
            what = str(e) if isinstance(e, DocumentError) else f"expected JSON, got error: {e}"
            raise CliError(f"{source}: {what}", EXIT_INVALID) from None
        name = result.scenario.name
    else:
        args.scenario = source
        sc = _load(args)
        name = sc.name
    image = plot_arg("--output", args.output or f"ksmlab-{_slug(name)}.png")
    assert image is not None
    html_path = output_arg("--html", args.html or str(image.with_suffix(".html")))
    if result is not None:  # a saved result: drawn as it is
        write_outputs(result, Outputs(plot=image, html=html_path))
        print(f"wrote {image} and {html_path}")
        if result.failures:
            print(_failure_line(result), file=sys.stderr)
            return EXIT_FAILED
        return EXIT_OK
    with graceful_stop() as stop:
        result = _execute(sc, args, stop)
        write_outputs(result, Outputs(plot=image, html=html_path))
        print(f"wrote {image} and {html_path}", flush=True)
    return _exit_code(result, sc, stop)


# --- check, init ----------------------------------------------------------------------------

def _n(n: int, stem: str, plural: str = "s", singular: str = "") -> str:
    """``1 group``, ``2 groups``, ``3 processes``, ``1 activity``."""
    return f"{n} {stem}{singular if n == 1 else plural}"


def cmd_check(args: argparse.Namespace) -> int:
    """``ksmlab check``."""
    bad = 0
    for path in args.scenarios:
        try:
            sc = load_scenario(path)
        except ScenarioError as e:
            print(str(e), file=sys.stderr)
            bad += 1
            continue
        try:
            plan = _plan(sc, args.backend, args.content)
        except CliError as e:
            print(str(e), file=sys.stderr)
            bad += 1
            continue
        nproc = sum(g.count for g in sc.processes)
        print(f"{path}: ok: {sc.name!r}: {_n(nproc, 'process', 'es')} in "
              f"{_n(len(sc.processes), 'group')}, {format_bytes(sc.total_pages() * PAGE_SIZE)} "
              f"mapped, {_n(len(sc.activities), 'activit', 'ies', 'y')}, "
              f"{_n(len(sc.events), 'event')}, {_n(len(sc.checkpoints), 'checkpoint')}, "
              f"planned end {format_duration(sc.planned_end_ns / NS_PER_S)}")
        print(f"{path}: {plan.describe()}")
    return EXIT_INVALID if bad else EXIT_OK


def cmd_init(args: argparse.Namespace) -> int:
    """``ksmlab init``."""
    text = builtin_scenario_text()
    if args.file in (None, "-"):
        sys.stdout.write(text)
        return EXIT_OK
    path = Path(args.file)
    if path.exists() and not args.force:
        raise CliError(f"ksmlab init: {path} exists (use --force to overwrite)", EXIT_INVALID)
    out = output_arg("FILE", args.file)
    assert out is not None
    write_file(out, text)
    print(f"wrote {out}")
    return EXIT_OK


# --- parser ---------------------------------------------------------------------------------

def _add_backend_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=("auto", *BACKENDS), default="auto",
                   help="auto (default): sim where the run fits in half the memory available, "
                        "else bulk (if it models every call of the scenario), saying which and "
                        "why; sim: the model, in virtual time; linux: this machine's "
                        "kernel, in real time (root and CONFIG_KSM needed; see "
                        "docs/linux-backend.md for what it changes); bulk: the model's bulk "
                        "engine, for hosts of many GiB (see docs/bulk.md for what it models)")
    p.add_argument("--content", choices=CONTENT_MODES, default="bytes",
                   help="how the model stores page contents: bytes (default) or fingerprint "
                        "(a 128-bit hash per page: about 7x less memory; the same results "
                        "until pages are rewritten while ksmd scans, see docs/cli.md)")


def _add_scenario_options(p: argparse.ArgumentParser) -> None:
    _add_backend_options(p)
    p.add_argument("--until", type=duration_arg, metavar="TIME",
                   help="stop the run at TIME (e.g. 30s, 5min): later checkpoints and events "
                        "are dropped, and a checkpoint is added at TIME; a TIME past the "
                        "scenario's end is refused unless --extend")
    p.add_argument("--extend", action="store_true",
                   help="with --until past the scenario's end: run the scenario on until then "
                        "(ksmd scans, activities without a stop keep writing)")
    p.add_argument("--sample", type=duration_arg, metavar="DUR",
                   help="sample the timeline every DUR (e.g. 100ms) instead of the scenario's "
                        "[timeline] interval (default 1/200 of the run): the time to 50%% and "
                        "90%% of the saving is resolved to DUR")
    p.add_argument("--seed", type=seed_arg(MAX_INT), metavar="N",
                   help="replace the scenario's [scenario] seed (every random choice follows)")
    p.add_argument("--knob", type=knob_arg, action="append", metavar="NAME=VALUE",
                   help=f"override a KSM knob of the scenario's [ksm] table (repeatable); "
                        f"NAME is one of {', '.join(KNOBS)}")
    p.add_argument("--cost", metavar="FILE",
                   help="the model's ksmd CPU cost and clock: a file written by `ksmlab "
                        "calibrate` (default: the model shipped, fitted on the project's "
                        "machine; see docs/cost-model.md)")
    p.add_argument("--ksmd-cpu-at-start", type=ksmd_cpu_arg, metavar="DUR|host",
                   help=f"replace the scenario's [scenario] ksmd_cpu_at_start: {KSMD_CPU_HELP}")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show a progress bar on stderr once the run takes more than "
                        f"{PROGRESS_AFTER_S:g} s (default: when stderr is a terminal)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, with every subcommand's help."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog="ksmlab", formatter_class=fmt,
        description="ksmlab: a faithful model of Linux KSM (Kernel Samepage Merging).\n\n"
                    "Describe an experiment in a scenario file (TOML: KSM knobs, processes "
                    "and what their\nmemory holds, activity over time, checkpoints), run it "
                    "on the model or on this\nmachine's kernel, and read how much memory KSM "
                    "saves and what ksmd costs.",
        epilog="examples:\n"
               "  ksmlab run                         the built-in scenario (12 guests, 1 min)\n"
               "  ksmlab run examples/twelve-vms.toml --until 5min --html report.html\n"
               "  ksmlab run my.toml --json > result.json && ksmlab plot result.json\n"
               "  ksmlab run my.toml --backend linux   the same on this machine's kernel\n"
               "  ksmlab stat                        watch this machine's KSM\n\n"
               "The scenario format: docs/scenarios.md; the command line: docs/cli.md.\n\n"
               + EXIT_CODES)
    parser.add_argument("--version", action="version", version=f"ksmlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_Parser)

    run = sub.add_parser(
        "run", formatter_class=fmt, help="run a scenario and print the counters at its checkpoints",
        description="Run SCENARIO (a TOML file; default: the built-in scenario, see `ksmlab "
                    "init`)\nand print the answer first: the memory saved (general_profit) as a "
                    "size and as\na share of the memory made mergeable, the time to 50% and 90% "
                    "of that saving,\nksmd's CPU share and CPU-seconds per GiB saved; then, per "
                    "checkpoint, the\ncounters below, the time and ksmd's CPU time. On the model "
                    "(--backend sim or\nbulk) time is virtual and ksmd's CPU time is the model's "
                    "estimate; with\n--backend linux both are real. Ctrl-C stops the run at the "
                    "next safe point,\nthen prints and writes what was reached, marked partial "
                    "(exit code 130).",
        epilog=counters_epilog(78) + "\n\n" + EXIT_CODES)
    run.add_argument("scenario", nargs="?", metavar="SCENARIO",
                     help="scenario file (TOML); omitted: the built-in scenario")
    run.add_argument("--json", action="store_true",
                     help="print the result as JSON (schema ksmlab.run/1, docs/cli.md) instead "
                          "of the table")
    run.add_argument("--timeline", metavar="FILE",
                     help="write the counters sampled over time as CSV")
    run.add_argument("--plot", metavar="FILE",
                     help="draw the timeline in the format FILE's extension names: .png, .svg "
                          "or .pdf")
    run.add_argument("--html", metavar="FILE",
                     help="write a self-contained HTML report (plot, tables, knobs)")
    _add_scenario_options(run)
    run.set_defaults(func=cmd_run)

    plot = sub.add_parser(
        "plot", formatter_class=fmt, help="draw a run's timeline as a PNG and an HTML report",
        description="Draw the timeline of a run: memory saved, pages by KSM state and ksmd's "
                    "cost over\ntime, with the knobs in the title, as a PNG; and a "
                    "self-contained HTML report\nwith the same plot and the tables.\n\n"
                    "SOURCE is a scenario file (run now), or a result saved with\n"
                    "`ksmlab run --json > FILE.json` (drawn without running); omitted: the "
                    "built-in\nscenario.",
        epilog=EXIT_CODES)
    plot.add_argument("source", nargs="?", metavar="SOURCE",
                      help="scenario (.toml) or saved result (.json)")
    plot.add_argument("-o", "--output", metavar="FILE",
                      help="the picture, in the format its extension names: .png, .svg or .pdf "
                           "(default: ksmlab-<scenario name>.png)")
    plot.add_argument("--html", metavar="FILE",
                      help="the HTML report (default: the PNG's name with .html)")
    _add_scenario_options(plot)
    plot.set_defaults(func=cmd_plot)

    stat = sub.add_parser(
        "stat", formatter_class=fmt, help="watch this machine's KSM counters, with rates",
        description="Show the KSM counters of the machine it runs on (/sys/kernel/mm/ksm), "
                    "refreshed\nlike top (on a terminal) or vmstat (one line per sample "
                    "otherwise), with rates:\n  merged/s        growth of pages_sharing + "
                    "ksm_zero_pages per second\n  scanned/s       growth of pages_scanned per "
                    "second\n  full scans/min  growth of full_scans per minute\n  ksmd CPU"
                    "        ksmd's CPU time, percent of one CPU (from /proc/PID/stat)\nand "
                    "general_profit in binary units. It only reads, so it works unprivileged "
                    "where\nthe files are readable. Stop it with Ctrl-C.",
        epilog=EXIT_CODES)
    stat.add_argument("--once", action="store_true",
                      help="print one snapshot (counters and knobs, no rates) and exit")
    stat.add_argument("-i", "--interval", type=float, default=1.0, metavar="SECONDS",
                      help="seconds between samples (default 1)")
    stat.add_argument("-n", "--count", type=int, metavar="N",
                      help="stop after N samples (default: until Ctrl-C)")
    stat.add_argument("--json", action="store_true",
                      help="JSON (schema ksmlab.stat/1): one object, or one line per sample")
    stat.add_argument("--sysfs-dir", default="/sys/kernel/mm/ksm", metavar="DIR",
                      help="read the counters from DIR (default /sys/kernel/mm/ksm)")
    stat.set_defaults(func=cmd_stat)

    doctor = sub.add_parser(
        "doctor", formatter_class=fmt,
        help="show this machine's KSM state and repair what a killed ksmlab session left",
        description="Show this machine's KSM: ksmd's state and counters, every knob beside "
                    "its value on a\nfreshly booted kernel, the ksmlab lock (the session "
                    "holding it, or the note of a\nsession that was killed before it could "
                    "restore the knobs it had saved), and the\nprocesses KSM works on. It only "
                    "reads unless --repair is given.\n\n"
                    "--repair (root) takes the lock and puts back the knobs a killed session "
                    "saved,\nun-merging first if its ksmd ran; the next ksmlab session on the "
                    "real kernel does\nthe same on its own. Exit code 1 while such a session's "
                    "knobs are still to repair.",
        epilog=EXIT_CODES)
    doctor.add_argument("--repair", action="store_true",
                        help="restore the knobs a killed ksmlab session saved, and clear its note")
    doctor.add_argument("--json", action="store_true",
                        help="print the diagnosis as JSON (schema ksmlab.doctor/1)")
    doctor.add_argument("--lock-file", metavar="PATH",
                        help="the ksmlab lock file (default /run/lock/ksmlab.lock, or "
                             "/tmp/ksmlab.lock where /run/lock is absent)")
    doctor.add_argument("--sysfs-dir", default="/sys/kernel/mm/ksm", metavar="DIR",
                        help="the KSM sysfs directory (default /sys/kernel/mm/ksm)")
    doctor.set_defaults(func=cmd_doctor)

    check = sub.add_parser(
        "check", formatter_class=fmt, help="validate scenario files without running them",
        description="Validate each SCENARIO as `ksmlab run` would, print a one-line summary "
                    "of each valid\none and the pre-flight of its run on --backend (the "
                    "engine, its peak memory and\nrough time), and one error line for each "
                    "invalid one (file: field: expected ...,\ngot ...), each one the backend "
                    "cannot run, and each one that would not fit in\nthe memory available.",
        epilog=EXIT_CODES)
    check.add_argument("scenarios", nargs="+", metavar="SCENARIO", help="scenario files")
    _add_backend_options(check)
    check.set_defaults(func=cmd_check)

    init = sub.add_parser(
        "init", formatter_class=fmt, help="write the built-in scenario, to start your own",
        description="Write the built-in scenario (what `ksmlab run` runs without a file) to "
                    "FILE, or to\nstdout, as a commented starting point for your own.",
        epilog=EXIT_CODES)
    init.add_argument("file", nargs="?", metavar="FILE", help="where to write (default: stdout)")
    init.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    init.set_defaults(func=cmd_init)

    from ksmlab.estimate.command import add_estimate_parser
    from ksmlab.snapshot.command import add_snapshot_parser  # its own module: issue 10

    add_snapshot_parser(sub, fmt, EXIT_CODES)
    add_estimate_parser(sub, fmt, EXIT_CODES)
    cli_calibrate.add_parser(sub, fmt, EXIT_CODES)
    from ksmlab.cli_tune import add_tune_parser

    add_tune_parser(sub, fmt, EXIT_CODES)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ksmlab`` command; returns the exit code."""
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args))
    except CliError as e:
        print(str(e), file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("ksmlab: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`ksmlab stat | head`): not an error; silence the final flush.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
