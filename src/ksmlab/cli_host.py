"""``ksmlab stat`` and ``ksmlab doctor``: the KSM of the machine ksmlab runs on (docs/cli.md)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from ksmlab.cli_common import EXIT_FAILED, EXIT_INVALID, EXIT_OK, EXIT_UNAVAILABLE, CliError
from ksmlab.cli_common import console as _console


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


__all__ = ["cmd_doctor", "cmd_stat"]
