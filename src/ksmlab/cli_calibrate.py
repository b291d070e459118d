"""``ksmlab calibrate``: fit the model's ksmd cost and clock to this machine's ksmd (docs/cost-model.md)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ksmlab.cli_common import EXIT_FAILED, EXIT_INVALID, EXIT_OK, EXIT_UNAVAILABLE, CliError
from ksmlab.cli_common import console as _console
from ksmlab.ksm.cost import FEATURES, KsmdCost

if TYPE_CHECKING:
    from ksmlab.calibrate import Calibration
    from ksmlab.scenario.backends import LinuxBackend

QUICK_SCALE = 512
"""Pages of the big workloads with ``--quick`` (a check that everything runs, not a fit)."""


def add_parser(sub: Any, fmt: type[argparse.HelpFormatter], epilog: str) -> None:
    """The ``calibrate`` subcommand."""
    cal = sub.add_parser(
        "calibrate", formatter_class=fmt,
        help="fit the model's ksmd CPU and clock to this machine's ksmd (root)",
        description="Run micro-workloads on this machine's ksmd and on the model (all-identical, "
                    "all-unique and\nzero pages, pairs, many contents, pages rewritten between "
                    "scans, long chains, many\nprocesses, steady KSM pages, transparent huge pages, "
                    "several pages_to_scan and\nsleep_millisecs), read ksmd's CPU time from "
                    "/proc/<ksmd>/schedstat for\n"
                    "each full scan, fit the cost model's parameters\n(non-negative least "
                    "squares) and the clock's scheduling delay, and write them to\nFILE for "
                    "`ksmlab run --cost FILE` and SimKernel/BulkKernel(cost=KsmdCost.load(FILE)).\n"
                    "Needs root and KSM; it takes the ksmlab lock and puts every knob back, "
                    "like\n--backend linux. It takes a few minutes per repetition; the result "
                    "depends on\nthe machine's load, which it records. With --speed it keeps "
                    "a model's terms and\nre-measures, in about a minute, only how fast this "
                    "machine's ksmd runs now\n(cpu_scale) and how often its timer wakes late. "
                    "See docs/cost-model.md.",
        epilog=epilog)
    cal.add_argument("-o", "--output", default="ksmd-cost.json", metavar="FILE",
                     help="where to write the fitted model (default ksmd-cost.json)")
    cal.add_argument("--repeat", type=int, default=1, metavar="N",
                     help="measure every workload N times (default 1); the fit uses all, and "
                          "each repetition's own fit shows the spread")
    cal.add_argument("--scale", type=int, default=16384, metavar="PAGES",
                     help="pages of the big workloads (default 16384, 64 MiB)")
    cal.add_argument("--quick", action="store_true",
                     help=f"small workloads ({QUICK_SCALE} pages): checks that calibration "
                          "runs here, too noisy to fit")
    cal.add_argument("--speed", action="store_true",
                     help="keep the terms of --cost FILE (default: the shipped model) and "
                          "measure only this machine's speed now against them, on six of the "
                          "workloads (about a minute): writes that model with cpu_scale and "
                          "the late share of timer wake-ups measured now")
    cal.add_argument("--cost", metavar="FILE",
                     help="with --speed: the model whose terms are kept (a file of `ksmlab "
                          "calibrate`; default: the shipped model)")
    cal.add_argument("--lock-timeout", type=float, default=600.0, metavar="SECONDS",
                     help="how long to wait for another ksmlab session on this machine to "
                          "release the KSM lock (default 600)")
    cal.add_argument("--samples", metavar="FILE",
                     help="also write every full scan measured (CPU and wall time, the model's "
                          "features, the fit's prediction) as JSON, for a closer look")
    cal.add_argument("--json", action="store_true", help="print the fitted model as JSON")
    cal.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args: argparse.Namespace) -> int:
    """``ksmlab calibrate``."""
    if args.repeat < 1:
        raise CliError(f"ksmlab calibrate: --repeat: expected an integer >= 1, got {args.repeat}",
                       EXIT_INVALID)
    if args.scale < 64:
        raise CliError(f"ksmlab calibrate: --scale: expected at least 64 pages, got {args.scale}",
                       EXIT_INVALID)
    out = Path(args.output)
    if out.is_dir():
        raise CliError(f"ksmlab calibrate: --output: {out} is a directory", EXIT_INVALID)
    if args.cost is not None and not args.speed:
        raise CliError("ksmlab calibrate: --cost: only with --speed (a full calibration fits "
                       "every term itself)", EXIT_INVALID)
    if args.speed and args.samples:
        raise CliError("ksmlab calibrate: --samples: not with --speed", EXIT_INVALID)
    base = None
    if args.speed:
        from ksmlab.calibrate.speed import reference_of
        from ksmlab.cli_common import load_cost_arg
        from ksmlab.ksm.cost import default_cost

        base = load_cost_arg(args.cost, "ksmlab calibrate") or default_cost()
        try:
            reference_of(base)
        except ValueError as e:
            raise CliError(f"ksmlab calibrate: --speed: {e}", EXIT_INVALID) from None
    from ksmlab.calibrate import calibrate, spread
    from ksmlab.scenario.backends import BackendUnavailableError, LinuxBackend

    scale = QUICK_SCALE if args.quick else args.scale
    try:
        backend = LinuxBackend(args.lock_timeout)  # the checks, the lock, knobs at boot values
    except BackendUnavailableError as e:
        raise CliError(f"ksmlab calibrate: this machine's KSM is unavailable: {e}",
                       EXIT_UNAVAILABLE) from None
    def log(m: str) -> None:
        print(f"ksmlab calibrate: {m}", file=sys.stderr, flush=True)

    try:
        if base is not None:
            return _speed(backend, base, args, scale, out, log)
        cal = calibrate(backend.kernel, repeats=args.repeat, scale=scale, log=log)
    except (OSError, RuntimeError, ValueError) as e:
        raise CliError(f"ksmlab calibrate: failed: {e}", EXIT_FAILED) from None
    finally:
        backend.close()
    try:
        cal.cost.save(out)
    except OSError as e:
        raise CliError(f"ksmlab calibrate: cannot write {out}: {e.strerror}", EXIT_FAILED) from None
    if args.samples:
        _write_samples(Path(args.samples), cal)
    if args.json:
        print(json.dumps(cal.cost.to_dict(), indent=1))
    else:
        _print(cal.cost, spread(cal.per_repeat), out)
    return EXIT_OK


def _speed(backend: LinuxBackend, base: KsmdCost, args: argparse.Namespace, scale: int,
           out: Path, log: Callable[[str], None]) -> int:
    from ksmlab.calibrate.speed import measure_speed

    sp = measure_speed(backend.kernel, base, repeats=args.repeat, scale=scale, log=log)
    backend.close()  # the host's knobs back before the file is written
    try:
        sp.cost.save(out)
    except OSError as e:
        raise CliError(f"ksmlab calibrate: cannot write {out}: {e.strerror}", EXIT_FAILED) from None
    if args.json:
        print(json.dumps(sp.cost.to_dict(), indent=1))
        return EXIT_OK
    console = _console()
    speed = sp.cost.fit["speed"]
    console.print(f"speed of this machine's ksmd against {base.source}'s terms: "
                  f"{sp.ratio:.3f} x their prediction now, {sp.reference:.3f} when they were "
                  f"fitted ({speed['clean_samples']} of {speed['samples']} scans clean): "
                  f"{sp.factor:.3f} x as slow")
    console.print(f"cpu_scale {base.cpu_scale:.3f} -> {sp.cost.cpu_scale:.3f} "
                  f"(the fit's own {speed['cpu_scale_at_fit']:.3f} x {sp.factor:.3f}); "
                  f"timer wake-ups a jiffy late {base.clock.late_fraction:.0%} -> "
                  f"{sp.late_fraction:.0%}")
    console.print(f"wrote {out}")
    return EXIT_OK


def _write_samples(path: Path, cal: Calibration) -> None:
    predicted = {id(r.sample): r.predicted_ns for r in cal.residuals}
    walls = {id(s): p for s, p in cal.walls}
    rows = [{"workload": s.workload, "repeat": s.repeat, "scan": s.scan, "cpu_ns": s.cpu_ns,
             "predicted_cpu_ns": predicted.get(id(s)), "wall_ns": s.wall_ns,
             "predicted_wall_ns": walls.get(id(s)), "batches": len(s.batches),
             "sleep_ms": s.sleep_ms, "pages": s.real_pages, "ok": s.ok, "why": s.why,
             "features": s.features} for s in cal.samples]
    try:
        path.write_text(json.dumps({"fit": cal.cost.to_dict(), "samples": rows}, indent=1))
    except OSError as e:
        raise CliError(f"ksmlab calibrate: cannot write {path}: {e.strerror}",
                       EXIT_FAILED) from None


def _print(cost: KsmdCost, ranges: dict[str, tuple[float, float]], out: Path) -> None:
    from rich.table import Table

    console = _console()
    fit = cost.fit
    table = Table(title=f"ksmd cost model fitted on {fit['kernel']}, {fit['cpus']} CPUs, "
                        f"load {fit['loadavg_before']} -> {fit['loadavg_after']}")
    table.add_column("term")
    table.add_column("ns per unit", justify="right")
    if ranges:
        table.add_column("range over repetitions", justify="right")
    for f in FEATURES:
        row = [f, f"{cost.ns[f]:.0f}"]
        if ranges:
            lo, hi = ranges[f]
            row.append(f"{lo:.0f} .. {hi:.0f}")
        table.add_row(*row)
    console.print(table)
    c = cost.clock
    console.print(f"clock: HZ={c.hz}, {c.late_fraction:.0%} of timer wake-ups a jiffy late, "
                  f"mean scheduling delay {c.wake_delay_ns / 1e6:.2f} ms, "
                  f"run stretch {c.run_stretch:g}")
    d = fit.get("disturbance", {})
    console.print(f"busy machine: CPU time x {cost.cpu_scale:.3f} (measured over the terms' "
                  f"prediction, all scans; median scan x {d.get('median_ratio', 1.0):.3f}, "
                  f"{d.get('slow_share', 0.0):.0%} of scans at 2x or more)")
    res = Table(title=f"CPU per full scan, {fit['clean_samples']} of {fit['samples']} scans "
                      f"clean: RMS error {fit['cpu_rms_error']:.1%}, wall time RMS error "
                      f"{fit['wall_rms_error']:.1%}")
    res.add_column("workload")
    res.add_column("scans", justify="right")
    res.add_column("mean error", justify="right")
    res.add_column("worst", justify="right")
    for name, r in fit["workloads"].items():
        res.add_row(name, str(r["samples"]), f"{r['mean_error']:+.1%}", f"{r['worst_error']:+.1%}")
    console.print(res)
    console.print(f"wrote {out}")


__all__ = ["add_parser", "cmd_calibrate"]
