"""``ksmlab snapshot``: the subcommand's options and what it prints (docs/cli.md).

Kept apart from :mod:`ksmlab.cli`, which only registers it; pyarrow is
imported when the command runs, not when ``ksmlab`` starts.
"""

from __future__ import annotations

import argparse
import pwd
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from ksmlab.cli_common import positive_duration_arg
from ksmlab.scenario.units import NS_PER_S, format_bytes, format_duration
from ksmlab.snapshot.procfs import POLICIES

if TYPE_CHECKING:
    from ksmlab.snapshot.capture import CaptureProgress, CaptureSummary

__all__ = ["add_snapshot_parser", "cmd_snapshot"]

PROGRESS_AFTER_S = 1.0
"""The progress bar appears once a capture has taken this long."""

DESCRIPTION = """\
Capture what KSM would see in running processes, without their data: for every
page of every area KSM could merge, its state (present, swapped, exclusive,
PFN, THP, already merged) and, for present pages, a 128-bit fingerprint of its
bytes (the model's fingerprint mode). The result is an Apache Parquet file,
one row per page (docs/snapshot.md), readable with pandas or DuckDB as well
as with ksmlab.snapshot.read_snapshot.

It only reads /proc and /sys: no page is faulted in, no swapped page is read,
no knob is changed. Reading another user's process needs root
(CAP_SYS_PTRACE); PFNs, THP and KSM flags need CAP_SYS_ADMIN (root)."""


def _pid_arg(text: str) -> int:
    try:
        pid = int(text)
    except ValueError:
        pid = 0
    if pid <= 0:
        raise argparse.ArgumentTypeError(f"expected a process id > 0, got {text!r}")
    return pid


def _uid_arg(text: str) -> int:
    if text.isdigit():
        return int(text)
    try:
        return pwd.getpwnam(text).pw_uid
    except KeyError:
        raise argparse.ArgumentTypeError(
            f"expected a user id >= 0 or a user name, got {text!r}") from None


def _samples_arg(text: str) -> int:
    from ksmlab.snapshot.capture import MAX_SAMPLES

    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_SAMPLES:
        raise argparse.ArgumentTypeError(f"expected an integer from 1 to {MAX_SAMPLES}, got {text!r}")
    return n


def add_snapshot_parser(sub: argparse._SubParsersAction[Any],
                        formatter: type[argparse.HelpFormatter], epilog: str) -> None:
    """Register ``snapshot`` on the subcommand parsers *sub*."""
    p = sub.add_parser("snapshot", formatter_class=formatter, description=DESCRIPTION,
                       help="capture the pages of running processes as KSM would see them",
                       epilog="examples:\n"
                              "  ksmlab snapshot --pid 1234 -o app.parquet\n"
                              "  ksmlab snapshot --all --policy merge-any -o host.parquet\n"
                              "  ksmlab snapshot --uid www-data --samples 3 --interval 10s "
                              "-o web.parquet\n\n" + epilog)
    p.add_argument("--pid", type=_pid_arg, action="append", default=[], metavar="PID",
                   help="a process to capture (repeatable)")
    p.add_argument("--cgroup", action="append", default=[], metavar="PATH",
                   help="the processes of a cgroup and its descendants: a directory under "
                        "/sys/fs/cgroup, or a path as /proc/PID/cgroup shows it (repeatable)")
    p.add_argument("--uid", type=_uid_arg, action="append", default=[], metavar="UID",
                   help="the processes of a user (effective uid, or a user name; repeatable)")
    p.add_argument("--all", action="store_true",
                   help="every process with user memory (kernel threads and ksmlab itself "
                        "excluded)")
    p.add_argument("--samples", type=_samples_arg, default=1, metavar="N",
                   help="take N passes, --interval apart, and record for each page how many "
                        "times its content changed between them (default 1)")
    p.add_argument("--interval", type=positive_duration_arg, metavar="DUR",
                   help="time from one pass's start to the next (e.g. 10s; needed with "
                        "--samples above 1)")
    p.add_argument("--policy", choices=POLICIES, default="as-is",
                   help="as-is: the areas that are mergeable now (VmFlags mg; default); "
                        "merge-any: every area prctl(PR_SET_MEMORY_MERGE) would make mergeable")
    p.add_argument("-o", "--output", required=True, metavar="FILE",
                   help="the snapshot file to write (Parquet)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help=f"show a progress bar with MB/s on stderr once the capture takes more "
                        f"than {PROGRESS_AFTER_S:g} s (default: when stderr is a terminal)")
    p.set_defaults(func=cmd_snapshot)


@contextmanager
def _progress_bar(enabled: bool) -> Iterator[Callable[[CaptureProgress], None] | None]:
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
                   TransferSpeedColumn(), TimeRemainingColumn(),
                   console=Console(stderr=True, force_terminal=True), transient=True)
    task = bar.add_task("capturing", total=None)
    started = time.monotonic()
    shown = False

    def update(p: CaptureProgress) -> None:
        nonlocal shown
        if not shown:
            if time.monotonic() - started < PROGRESS_AFTER_S:
                return
            bar.start()
            shown = True
        what = f"pass {p.pass_no}/{p.passes}, pid {p.pid}" if p.passes > 1 else f"pid {p.pid}"
        bar.update(task, completed=p.bytes_done, total=p.bytes_total,
                   description=f"capturing ({what})")

    try:
        yield update
    finally:
        if shown:
            bar.stop()


def _report(s: CaptureSummary) -> str:
    rate = s.bytes_read / s.seconds if s.seconds > 0 else 0.0
    per_page = s.file_bytes / s.pages if s.pages else 0.0
    line = (f"wrote {s.path}: {s.processes - s.gone} process{'es' if s.processes - s.gone != 1 else ''}, "
            f"{s.pages} pages ({s.present} present, {s.hashed} fingerprinted, "
            f"{format_bytes(s.bytes_read)} read) in {format_duration(s.seconds)} "
            f"({format_bytes(rate)}/s); {format_bytes(s.file_bytes)}, {per_page:.1f} bytes per page")
    if s.gone:
        gone = ", ".join(f"pid {pid} ({comm})" for pid, comm in s.gone_pids.items())
        line += f"\n{s.gone} exited during the capture and are recorded as gone: {gone}"
    if s.unreadable:
        first = next(iter(s.unreadable.values()))
        line += (f"\n{len(s.unreadable)} selected process(es) could not be read and were left "
                 f"out (listed in the file's metadata); first: {first}")
    return line


def cmd_snapshot(args: argparse.Namespace) -> int:
    """``ksmlab snapshot``."""
    from ksmlab.cli_common import EXIT_FAILED, EXIT_INVALID, EXIT_OK, CliError
    from ksmlab.cli_output import output_arg
    from ksmlab.snapshot.capture import Selection, capture_snapshot
    from ksmlab.snapshot.procfs import ProcessGoneError, SnapshotPermissionError

    if args.samples > 1 and args.interval is None:
        raise CliError(f"ksmlab snapshot: --samples {args.samples} needs --interval DUR",
                       EXIT_INVALID)
    if args.samples == 1 and args.interval is not None:
        raise CliError("ksmlab snapshot: --interval applies with --samples N above 1 only",
                       EXIT_INVALID)
    sel = Selection(pids=tuple(args.pid), uids=tuple(args.uid), cgroups=tuple(args.cgroup),
                    all=args.all)
    if not (sel.pids or sel.uids or sel.cgroups or sel.all):
        raise CliError("ksmlab snapshot: expected at least one of --pid, --cgroup, --uid or "
                       "--all (see ksmlab snapshot --help)", EXIT_INVALID)
    out = output_arg("--output", args.output)
    assert out is not None
    interval_s = (args.interval or 0) / NS_PER_S
    progress = args.progress if args.progress is not None else sys.stderr.isatty()
    try:
        with _progress_bar(bool(progress)) as update:
            summary = capture_snapshot(str(out), sel, policy=args.policy, samples=args.samples,
                                       interval_s=interval_s, progress=update)
    except (ValueError, ProcessGoneError, SnapshotPermissionError) as e:
        raise CliError(f"ksmlab snapshot: {e.args[-1] if isinstance(e, OSError) else e}",
                       EXIT_INVALID) from None
    except OSError as e:
        raise CliError(f"ksmlab snapshot: capture failed, nothing written: {e}",
                       EXIT_FAILED) from None
    if not summary.show_pfn or not summary.kpageflags:
        print("ksmlab snapshot: note: without root (CAP_SYS_ADMIN) pagemap shows no PFNs and "
              "/proc/kpageflags is unreadable, so the snapshot has no pfn, thp, ksm or zero_page "
              "values and pages shared with a fork relative are not recognisable",
              file=sys.stderr)
    print(_report(summary))
    return EXIT_OK
