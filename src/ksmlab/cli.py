"""The ``ksmlab`` command: run scenarios, draw their timelines, watch the machine's KSM.

Subcommands (``ksmlab COMMAND --help`` for each; the reference is docs/cli.md):

* ``run [SCENARIO]``: run a scenario (default: the built-in one) and print
  the checkpoint table, or ``--json``; write ``--timeline`` CSV, ``--plot``
  PNG, ``--html`` report;
* ``plot [SOURCE]``: the PNG and the HTML report of a scenario (run now) or
  of a saved ``--json`` result;
* ``stat``: the KSM counters of this machine, refreshed, with rates;
* ``doctor``: this machine's KSM state, and repair of what a killed session left;
* ``check SCENARIO...``: validate scenario files without running them;
* ``init [FILE]``: write the built-in scenario, as a starting point.

Exit codes: 0 success; 1 the run failed (a check failed, a full-scan
checkpoint was not reached, a kernel call failed, an output could not be
written); 2 invalid input (command line, scenario file, result file);
3 the machine cannot do it (``--backend linux`` without root, KSM or a C
compiler, or the KSM lock busy; ``stat`` without KSM); 130 interrupted.
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

from ksmlab import __version__
from ksmlab.constants import PAGE_SIZE
from ksmlab.errors import KsmSimError
from ksmlab.mm.page import CONTENT_MODES
from ksmlab.scenario.backends import BACKENDS, BackendUnavailableError, open_backend
from ksmlab.scenario.knobs import KNOBS, KnobValue, parse_cli_value
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
from ksmlab.scenario.units import NS_PER_S, format_bytes, format_duration, parse_duration_ns

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INVALID = 2
EXIT_UNAVAILABLE = 3
EXIT_INTERRUPTED = 130

TABLE_WIDTH = 132
"""Width of the table when stdout is a file or a pipe."""

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
  130  interrupted (Ctrl-C)
Errors are one line on stderr."""


class CliError(KsmSimError):
    """An error to report in one line with an exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit code 2."""

    def error(self, message: str) -> NoReturn:
        raise CliError(f"{self.prog}: {message} (see {self.prog} --help)", EXIT_INVALID)


# --- shared helpers -------------------------------------------------------------------------

def _duration_arg(text: str) -> int:
    try:
        return parse_duration_ns(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected {e}, got {text!r}") from None


def _seed_arg(text: str) -> int:
    # Checked here: the loader would name the scenario file for a bad --seed.
    try:
        seed = int(text)
    except ValueError:
        seed = -1
    if not 0 <= seed <= MAX_INT:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to {MAX_INT}, got {text!r}")
    return seed


def _knob_arg(text: str) -> tuple[str, KnobValue]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name.strip(), parse_cli_value(value)


def _output_arg(option: str, path: str | None) -> Path | None:
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


def _console() -> Console:
    """The stdout console; when stdout is not a terminal, wide enough for the table."""
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=max(console.width, TABLE_WIDTH))
    return console


def _write(path: Path, data: str | bytes) -> None:
    try:
        if isinstance(data, bytes):
            path.write_bytes(data)
        else:
            path.write_text(data, encoding="utf-8")
    except OSError as e:
        raise CliError(f"ksmlab: cannot write {path}: {e.strerror}", EXIT_FAILED) from None


def _load(args: argparse.Namespace) -> Scenario:
    """The scenario the arguments name, with --seed, --knob and --until applied."""
    try:
        sc = (load_scenario(args.scenario, seed=args.seed) if args.scenario
              else load_builtin(seed=args.seed))
        if args.knob:
            sc = apply_knob_overrides(sc, dict(args.knob))
        if args.until is not None:
            if args.until <= 0:
                raise ScenarioError("--until", "until", "a duration > 0",
                                    format_duration(args.until / NS_PER_S))
            sc = truncate(sc, args.until)
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


def _execute(sc: Scenario, args: argparse.Namespace) -> RunResult:
    backend_name = args.backend
    progress = _want_progress(args)
    if args.content != "bytes" and backend_name != "sim":
        why = ("the real kernel keeps real bytes" if backend_name == "linux"
               else "the bulk engine always keeps fingerprints")
        raise CliError(f"ksmlab: --content {args.content} applies to --backend sim only: "
                       f"{why}", EXIT_INVALID)
    try:
        backend = open_backend(backend_name, args.content)
    except BackendUnavailableError as e:
        raise CliError(f"ksmlab: the {backend_name} backend is unavailable: {e}",
                       EXIT_UNAVAILABLE) from None
    try:
        with _progress(progress, sc, backend_name) as update:
            return run_scenario(sc, backend, update)
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


# --- run ------------------------------------------------------------------------------------

def cmd_run(args: argparse.Namespace) -> int:
    """``ksmlab run``."""
    timeline = _output_arg("--timeline", args.timeline)
    plot = _output_arg("--plot", args.plot)
    html = _output_arg("--html", args.html)
    sc = _load(args)
    result = _execute(sc, args)
    if args.json:
        from ksmlab.report.document import to_document

        print(json.dumps(to_document(result), indent=2, allow_nan=False))
    else:
        from ksmlab.report.table import summary

        console = _console()
        console.print(summary(result, console.width))
    _write_outputs(result, timeline, plot, html)
    if not result.ok:
        print(_failure_line(result), file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _write_outputs(r: RunResult, timeline: Path | None, plot: Path | None,
                   html: Path | None) -> None:
    if timeline is not None:
        from ksmlab.report.timeline import timeline_csv

        _write(timeline, timeline_csv(r))
    png = None
    if plot is not None or html is not None:
        from ksmlab.report.plot import plot_png

        png = plot_png(r)
    if plot is not None and png is not None:
        _write(plot, png)
    if html is not None:
        from ksmlab.report.html import render_html

        _write(html, render_html(r, png))


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
    png_path = _output_arg("--output", args.output or f"ksmlab-{_slug(name)}.png")
    assert png_path is not None
    html_path = _output_arg("--html", args.html or str(png_path.with_suffix(".html")))
    if result is None:
        result = _execute(sc, args)
    _write_outputs(result, None, png_path, html_path)
    print(f"wrote {png_path} and {html_path}")
    if not result.ok:
        print(_failure_line(result), file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


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
        nproc = sum(g.count for g in sc.processes)
        print(f"{path}: ok: {sc.name!r}: {_n(nproc, 'process', 'es')} in "
              f"{_n(len(sc.processes), 'group')}, {format_bytes(sc.total_pages() * PAGE_SIZE)} "
              f"mapped, {_n(len(sc.activities), 'activit', 'ies', 'y')}, "
              f"{_n(len(sc.events), 'event')}, {_n(len(sc.checkpoints), 'checkpoint')}, "
              f"planned end {format_duration(sc.planned_end_ns / NS_PER_S)}")
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
    out = _output_arg("FILE", args.file)
    assert out is not None
    _write(out, text)
    print(f"wrote {out}")
    return EXIT_OK


# --- stat -----------------------------------------------------------------------------------

def cmd_stat(args: argparse.Namespace) -> int:
    """``ksmlab stat``."""
    from ksmlab.report import stat

    if args.interval <= 0:
        raise CliError("ksmlab stat: --interval: expected a number of seconds > 0, "
                       f"got {args.interval}", EXIT_INVALID)
    if args.count is not None and args.count < 1:
        raise CliError(f"ksmlab stat: --count: expected an integer >= 1, got {args.count}",
                       EXIT_INVALID)

    def snap() -> stat.KsmSnapshot:
        try:
            return stat.take_snapshot(args.sysfs_dir)
        except stat.KsmUnreadableError as e:
            raise CliError(f"ksmlab stat: {e}", EXIT_UNAVAILABLE) from None

    cur = snap()
    title = f"KSM on this machine ({args.sysfs_dir})"
    if args.once:
        if args.json:
            print(json.dumps(stat.snapshot_document(cur, None, args.sysfs_dir), indent=2))
        else:
            _console().print(stat.snapshot_table(cur, None, title))
        return EXIT_OK
    live = sys.stdout.isatty() and not args.json
    n = 0
    try:
        if live:
            from rich.live import Live

            with Live(stat.snapshot_table(cur, None, title), auto_refresh=False) as view:
                while args.count is None or n < args.count - 1:
                    time.sleep(args.interval)
                    prev, cur = cur, snap()
                    n += 1
                    view.update(stat.snapshot_table(cur, stat.rates(prev, cur),
                                                    f"{title}, every {args.interval:g} s"),
                                refresh=True)
            return EXIT_OK
        if not args.json:
            print(stat.line_header(), flush=True)
        last: stat.KsmSnapshot | None = None
        while True:
            r = stat.rates(last, cur) if last is not None else None
            if args.json:
                print(json.dumps(stat.snapshot_document(cur, r, args.sysfs_dir)), flush=True)
            else:
                print(stat.line(cur, r), flush=True)
            n += 1
            if args.count is not None and n >= args.count:
                return EXIT_OK
            time.sleep(args.interval)
            last, cur = cur, snap()
    except KeyboardInterrupt:
        return EXIT_OK  # the usual way to stop a top-like view


def cmd_doctor(args: argparse.Namespace) -> int:
    """``ksmlab doctor``."""
    from ksmlab.backends import linux_doctor
    from ksmlab.report.doctor import doctor_document, doctor_report

    if not os.path.isdir(args.sysfs_dir):
        raise CliError(f"ksmlab doctor: {args.sysfs_dir} does not exist, so this kernel was "
                       f"built without CONFIG_KSM", EXIT_UNAVAILABLE)
    repaired = None
    busy = None
    if args.repair:
        try:
            repaired = linux_doctor.repair(lock_path=args.lock_file, sysfs_dir=args.sysfs_dir)
        except linux_doctor.LockBusyError as e:
            busy = f"ksmlab doctor: nothing to repair: {e}"
        except PermissionError as e:
            raise CliError(f"ksmlab doctor --repair: {e.filename or 'the KSM files'}: permission "
                           f"denied; repairing writes the KSM knobs and the lock file, which "
                           f"needs root", EXIT_UNAVAILABLE) from None
    d = linux_doctor.diagnose(sysfs_dir=args.sysfs_dir, lock_path=args.lock_file)
    failed = repaired is not None and bool(repaired.failures)
    if args.json:
        print(json.dumps(doctor_document(d, repaired), indent=2))
    else:
        console = _console()
        if busy:
            console.print(busy)
        elif args.repair:
            console.print(f"Repair: {repaired.message()}" if repaired is not None
                          else "Repair: no dead ksmlab session left knobs to restore.")
            console.print()
        console.print(doctor_report(d))
    return EXIT_FAILED if failed or d.needs_repair else EXIT_OK


# --- parser ---------------------------------------------------------------------------------

def _add_scenario_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=BACKENDS, default="sim",
                   help="sim: the model, in virtual time (default); linux: this machine's "
                        "kernel, in real time (root and CONFIG_KSM needed; see "
                        "docs/linux-backend.md for what it changes); bulk: the model's bulk "
                        "engine, for hosts of many GiB (no advisor; see docs/bulk.md)")
    p.add_argument("--content", choices=CONTENT_MODES, default="bytes",
                   help="how the model stores page contents: bytes (default) or fingerprint "
                        "(a 128-bit hash per page: about 7x less memory; the same results "
                        "until pages are rewritten while ksmd scans, see docs/cli.md)")
    p.add_argument("--until", type=_duration_arg, metavar="TIME",
                   help="stop the run at TIME (e.g. 30s, 5min): later checkpoints and events "
                        "are dropped, and a checkpoint is added at TIME")
    p.add_argument("--seed", type=_seed_arg, metavar="N",
                   help="replace the scenario's [scenario] seed (every random choice follows)")
    p.add_argument("--knob", type=_knob_arg, action="append", metavar="NAME=VALUE",
                   help=f"override a KSM knob of the scenario's [ksm] table (repeatable); "
                        f"NAME is one of {', '.join(KNOBS)}")
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
                    "init`)\nand print, per checkpoint: pages_shared, pages_sharing, "
                    "pages_unshared,\npages_volatile, ksm_zero_pages, general_profit (memory "
                    "saved, in binary units),\nfull scans, time and ksmd's CPU time. On the "
                    "model (--backend sim or bulk) time\nis virtual and ksmd's CPU time is the "
                    "model's estimate; with --backend linux\nboth are real.",
        epilog=EXIT_CODES)
    run.add_argument("scenario", nargs="?", metavar="SCENARIO",
                     help="scenario file (TOML); omitted: the built-in scenario")
    run.add_argument("--json", action="store_true",
                     help="print the result as JSON (schema ksmlab.run/1, docs/cli.md) instead "
                          "of the table")
    run.add_argument("--timeline", metavar="FILE",
                     help="write the counters sampled over time as CSV")
    run.add_argument("--plot", metavar="FILE", help="draw the timeline as a PNG")
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
    plot.add_argument("-o", "--output", metavar="PNG",
                      help="the PNG (default: ksmlab-<scenario name>.png)")
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
                    "of each valid\none, and one error line (file: field: expected ..., got "
                    "...) for each invalid one.",
        epilog=EXIT_CODES)
    check.add_argument("scenarios", nargs="+", metavar="SCENARIO", help="scenario files")
    check.set_defaults(func=cmd_check)

    init = sub.add_parser(
        "init", formatter_class=fmt, help="write the built-in scenario, to start your own",
        description="Write the built-in scenario (what `ksmlab run` runs without a file) to "
                    "FILE, or to\nstdout, as a commented starting point for your own.",
        epilog=EXIT_CODES)
    init.add_argument("file", nargs="?", metavar="FILE", help="where to write (default: stdout)")
    init.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    init.set_defaults(func=cmd_init)
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
