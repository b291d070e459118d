"""The ``ksmlab`` command.

Exit codes: 0 success; 1 a run failed (the model raised an error); 2 bad
command line.  Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from ksmlab import __version__
from ksmlab.constants import PAGE_SIZE
from ksmlab.demo import DemoConfig, run_demo


def human_bytes(n: int) -> str:
    """Bytes in binary units, signed (general_profit can be negative)."""
    sign = "-" if n < 0 else ""
    value = float(abs(n))
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{sign}{value:.1f} {unit}" if unit != "B" else f"{sign}{int(value)} B"
        value /= 1024
    raise AssertionError("unreachable")


def cmd_run(args: argparse.Namespace) -> int:
    """``ksmlab run``: the built-in demo (scenario files: not yet)."""
    cfg = DemoConfig(vms=args.vms, pages=args.pages, pages_to_scan=args.pages_to_scan,
                     sleep_millisecs=args.sleep_millisecs)
    console = Console()
    mib = cfg.vms * cfg.pages * PAGE_SIZE / 2**20
    table = Table(title=(f"KSM on {cfg.vms} guests x {cfg.pages} pages ({mib:.0f} MiB), "
                         f"pages_to_scan={cfg.pages_to_scan}, "
                         f"sleep_millisecs={cfg.sleep_millisecs}"))
    for col in ("time", "full_scans", "shared", "sharing", "unshared", "volatile", "zero",
                "profit", "ksmd CPU"):
        table.add_column(col, justify="right")
    with console.status("simulating ksmd..."):
        for t, c, cpu in run_demo(cfg):
            table.add_row(f"{t / 1000:.1f} s", str(c["full_scans"]), str(c["pages_shared"]),
                          str(c["pages_sharing"]), str(c["pages_unshared"]),
                          str(c["pages_volatile"]), str(c["ksm_zero_pages"]),
                          human_bytes(c["general_profit"]), f"{cpu:.3f} s")
    console.print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, with every subcommand's help."""
    parser = argparse.ArgumentParser(
        prog="ksmlab",
        description="A faithful model of Linux KSM (Kernel Samepage Merging).",
        epilog="Exit codes: 0 ok, 1 the run failed, 2 bad usage.")
    parser.add_argument("--version", action="version", version=f"ksmlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the built-in demo workload on the model",
                         description="Run the built-in demo: guests booted from one image, "
                                     "merged by a simulated ksmd; prints the KSM counters "
                                     "at checkpoints of virtual time.")
    run.add_argument("--vms", type=int, default=4, help="number of guests (default 4)")
    run.add_argument("--pages", type=int, default=2048, help="pages per guest (default 2048)")
    run.add_argument("--pages-to-scan", type=int, default=1000,
                     help="ksmd's pages_to_scan (default 1000)")
    run.add_argument("--sleep-millisecs", type=int, default=20,
                     help="ksmd's sleep_millisecs (default 20)")
    run.set_defaults(func=cmd_run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ksmlab`` command."""
    args = build_parser().parse_args(argv)
    for name in ("vms", "pages", "pages_to_scan", "sleep_millisecs"):
        if getattr(args, name, 1) < (0 if name == "sleep_millisecs" else 1):
            print(f"ksmlab: error: --{name.replace('_', '-')} is too small", file=sys.stderr)
            return 2
    try:
        return int(args.func(args))
    except (OSError, RuntimeError, ValueError) as e:
        print(f"ksmlab: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
