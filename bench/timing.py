"""Timing fidelity: the model's clock and ksmd CPU against the real kernel, on scenarios not fitted.

For each scenario (the built-in one, the examples cut at ``--until``, the
built-in one under ``advisor_mode=scan-time``, and a few random scenarios),
in the same run:

* the model (SimKernel, the cost model given by ``--cost`` or the shipped
  one) runs it once, recording when each full scan ends and, under the
  advisor, ``pages_to_scan`` after each one;
* the real kernel (``LinuxKernel`` through the scenario runner: root, the
  ksmlab lock, every knob put back) runs it ``--runs`` times (default 2),
  while a thread polls ``full_scans`` and ``pages_to_scan`` every
  millisecond and records when they change.

It prints, per scenario, how far the model is from the first real run:

* **scans**: the times at which full scans end (each scan's relative error;
  target within 10 %);
* **CPU**: ksmd's CPU time at each checkpoint (target within 20 %);
* **profit**: ``general_profit`` at each checkpoint, as a share of the memory
  made mergeable (target within 5 %), beside the kernel's own spread
  between its two runs on the same measure;
* **advisor**: whether the sequence of ``pages_to_scan`` is the kernel's.

Usage (root, KSM available)::

    python bench/timing.py                      # everything, 2 real runs each
    python bench/timing.py --only builtin --runs 1
    python bench/timing.py --json timing.json   # the figures docs/cost-model.md records
    python bench/timing.py --cost my-cost.json  # another cost model
    python bench/timing.py --speed              # the machine's speed measured per scenario

With ``--speed``, before each scenario's real runs the machine's ksmd speed is
measured as ``ksmlab calibrate --speed`` does (about 30 s), and the model runs
with that cost; the shipped (or ``--cost``) model's CPU is recorded beside it
(``cpu_model_base_s``), so a drift of the machine over the day shows apart from
the model's own error.

The model's runs start with ``ksmd_cpu_at_start`` set to the real ksmd's CPU
time since boot (the scan-time advisor's first step counts all of it).  Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ksmlab.calibrate.speed import measure_speed_now
from ksmlab.ksm.cost import KsmdCost
from ksmlab.scenario import host
from ksmlab.scenario.backends import LinuxBackend, SimBackend
from ksmlab.scenario.loader import builtin_scenario_text, load_scenario, parse_scenario
from ksmlab.scenario.model import Scenario
from ksmlab.scenario.result import RunResult
from ksmlab.scenario.runner import run_scenario
from ksmlab.scenario.transform import truncate, with_ksmd_cpu_at_start
from ksmlab.scenario.units import NS_PER_S, parse_duration_ns

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SYSFS = host.KSM_SYSFS_DIR


@dataclass
class Trace:
    """One run of a scenario: its result, when full scans ended, pages_to_scan after each."""

    result: RunResult
    scan_ends_s: list[float] = field(default_factory=list)
    pages_to_scan: list[int] = field(default_factory=list)


class _Poller(threading.Thread):
    """Records (monotonic ns, full_scans, pages_to_scan) whenever full_scans changes."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.events: list[tuple[int, int, int]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        fs = os.open(f"{SYSFS}/full_scans", os.O_RDONLY)
        pts = os.open(f"{SYSFS}/pages_to_scan", os.O_RDONLY)
        last = -1
        try:
            while not self.stop.is_set():
                cur = int(os.pread(fs, 64, 0))
                if cur != last:
                    self.events.append((time.monotonic_ns(), cur, int(os.pread(pts, 64, 0))))
                    last = cur
                time.sleep(0.001)
        finally:
            os.close(fs)
            os.close(pts)


LOCK_WAIT_S = 3600.0
"""The machine is shared: wait this long for another ksmlab session's lock."""


def run_real(sc: Scenario) -> Trace:
    backend = LinuxBackend(lock_timeout=LOCK_WAIT_S)
    poller = _Poller()
    try:
        poller.start()
        result = run_scenario(sc, backend)
    finally:
        poller.stop.set()
        poller.join()
        t0 = backend._t0
        backend.close()
    trace = Trace(result)
    prev = None
    for t, scans, pts in poller.events:
        if t < t0:
            prev = scans
            continue
        if prev is not None and scans == prev + 1:
            trace.scan_ends_s.append((t - t0) / NS_PER_S)
            trace.pages_to_scan.append(pts)
        prev = scans
    return trace


def run_model(sc: Scenario, cost: KsmdCost | None) -> Trace:
    boot_cpu = host.ksmd_cpu_ns()
    if boot_cpu is not None:  # the real ksmd's CPU since boot: the advisor's first step sees it
        sc = with_ksmd_cpu_at_start(sc, boot_cpu)
    backend = SimBackend(cost=cost)
    ksmd = backend.sim.ksmd
    engine = backend.sim.ksm.core
    ends: list[tuple[int, int]] = []
    once = ksmd.scan_thread_once

    def scan_thread_once() -> None:
        before = engine.full_scans
        once()
        if engine.full_scans > before:
            ends.append((ksmd.busy_until, engine.pages_to_scan))

    ksmd.scan_thread_once = scan_thread_once  # type: ignore[method-assign]
    try:
        result = run_scenario(sc, backend)
        t0 = backend._t0
    finally:
        backend.close()
    return Trace(result, [(t - t0) / NS_PER_S for t, _ in ends if t >= t0],
                 [p for t, p in ends if t >= t0])


def random_scenario(seed: int) -> str:
    """A random scenario of 30 s: processes, contents, knobs and writes drawn from *seed*."""
    r = random.Random(seed)
    procs = r.randint(2, 8)
    pages = r.choice([512, 1024, 2048, 4096])
    return f"""
[scenario]
name = "random {seed}"
seed = {seed}
duration = "30s"
[ksm]
pages_to_scan = {r.choice([100, 200, 500, 1000])}
sleep_millisecs = {r.choice([10, 20, 50])}
smart_scan = {r.choice(["true", "false"])}
use_zero_pages = {r.choice(["true", "false"])}
max_page_sharing = {r.choice([16, 256])}
[content.img]
kind = "image"
pages = {r.choice([pages // 4, pages // 2, pages])}
zero_fraction = {r.choice([0.0, 0.1, 0.3])}
private_fraction = {r.choice([0.1, 0.3, 0.6])}
[[process]]
name = "p"
count = {procs}
[[process.mapping]]
name = "m"
pages = {pages}
content = "img"
[[activity]]
process = "p"
mapping = "m"
region = {{ first_page = 0, pages = {pages // 4} }}
rate = {r.choice([1, 5, 20, 50])}
arrivals = "poisson"
[[checkpoint]]
at = "5s"
[[checkpoint]]
at = "15s"
[[checkpoint]]
at = "30s"
"""


SMALL_ADVISOR = """
[scenario]
name = "4 processes of 4 MiB, scan-time advisor aiming at 2 s"
seed = 7
duration = "60s"
[ksm]
advisor_mode = "scan-time"
advisor_target_scan_time = 2
sleep_millisecs = 5
[content.img]
kind = "image"
pages = 1024
zero_fraction = 0.2
private_fraction = 0.3
[[process]]
name = "p"
count = 4
[[process.mapping]]
name = "m"
size = "4MiB"
content = "img"
[[activity]]
process = "p"
mapping = "m"
region = { first_page = 0, pages = 256 }
rate = 10
arrivals = "poisson"
[[checkpoint]]
at = "10s"
[[checkpoint]]
at = "30s"
[[checkpoint]]
at = "60s"
"""
"""Many full scans under the advisor: its pages_to_scan sequence is long enough to compare."""


def scenarios(until_ns: int, randoms: int) -> dict[str, Scenario]:
    base = Path(".")
    out: dict[str, Scenario] = {}
    out["builtin"] = parse_scenario(builtin_scenario_text(), source="<builtin>", base_dir=base)
    for path in sorted(EXAMPLES.glob("*.toml")):
        sc = load_scenario(path)
        out[path.stem] = truncate(sc, min(until_ns, sc.planned_end_ns)) \
            if sc.planned_end_ns > until_ns else sc
    adv = builtin_scenario_text().replace("pages_to_scan = 100\n", 'advisor_mode = "scan-time"\n')
    out["builtin, advisor"] = parse_scenario(adv, source="<builtin+advisor>", base_dir=base)
    out["small host, advisor"] = parse_scenario(SMALL_ADVISOR, source="<small+advisor>",
                                                base_dir=base)
    for seed in range(randoms):
        out[f"random {seed}"] = parse_scenario(random_scenario(seed), source=f"<random {seed}>",
                                               base_dir=base)
    return out


def rel(a: float, b: float) -> float:
    return (a - b) / b if b else (0.0 if a == b else float("inf"))


def compare(name: str, model: Trace, reals: list[Trace]) -> dict[str, Any]:
    real = reals[0]
    n = min(len(model.scan_ends_s), len(real.scan_ends_s))
    scan_err = [rel(model.scan_ends_s[i], real.scan_ends_s[i]) for i in range(n)]
    rows: list[dict[str, Any]] = []
    for mc, rc in zip(model.result.checkpoints, real.result.checkpoints, strict=False):
        other = [r.result.checkpoints[len(rows)] for r in reals[1:]
                 if len(r.result.checkpoints) > len(rows)]
        rows.append({
            "checkpoint": mc.name, "time_s": mc.time_s,
            "cpu_model_s": mc.ksmd_cpu_s, "cpu_real_s": rc.ksmd_cpu_s,
            "cpu_error": rel(mc.ksmd_cpu_s or 0.0, rc.ksmd_cpu_s or 0.0),
            "profit_model": mc.counters["general_profit"],
            "profit_real": rc.counters["general_profit"],
            "profit_real_2": [o.counters["general_profit"] for o in other],
            "cpu_real_2": [o.ksmd_cpu_s for o in other],
            "full_scans_model": mc.counters["full_scans"],
            "full_scans_real": rc.counters["full_scans"],
        })
    return {"scenario": name, "scan_ends_model_s": model.scan_ends_s,
            "scan_ends_real_s": [r.scan_ends_s for r in reals], "scan_errors": scan_err,
            "checkpoints": rows, "pages_to_scan_model": model.pages_to_scan,
            "pages_to_scan_real": [r.pages_to_scan for r in reals]}


def mergeable_bytes(r: RunResult) -> int:
    from ksmlab.report.document import to_document

    doc = to_document(r)
    assert isinstance(doc, dict)
    return int(doc["summary"]["mergeable_bytes"])


def report(c: dict[str, Any], mem: int) -> None:
    errs = c["scan_errors"]
    worst = max((abs(e) for e in errs), default=0.0)
    within = sum(abs(e) <= 0.10 for e in errs)
    print(f"\n== {c['scenario']}: {len(c['scan_ends_model_s'])} full scans on the model, "
          f"{[len(x) for x in c['scan_ends_real_s']]} on the kernel")
    if errs:
        firsts = ", ".join(f"{m:.2f}/{r:.2f}" for m, r in zip(c["scan_ends_model_s"][:4],
                                                              c["scan_ends_real_s"][0][:4],
                                                              strict=False))
        print(f"   scan ends (model/real s): {firsts} ...; {within}/{len(errs)} within 10 %, "
              f"worst {worst:.1%}")
    for row in c["checkpoints"]:
        p_err = (row["profit_model"] - row["profit_real"]) / mem if mem else 0.0
        spread = [abs(row["profit_real"] - o) / mem for o in row["profit_real_2"]] if mem else []
        cpu_spread = [rel(o, row["cpu_real_s"]) for o in row["cpu_real_2"] if o and row["cpu_real_s"]]
        row["kernel_cpu_spread"] = cpu_spread
        print(f"   {row['checkpoint']:>12}: scans {row['full_scans_model']}/{row['full_scans_real']}"
              f"  CPU {1e3 * (row['cpu_model_s'] or 0):7.1f}/{1e3 * (row['cpu_real_s'] or 0):7.1f} ms"
              f" ({row['cpu_error']:+.1%}; kernel's own {', '.join(f'{x:+.1%}' for x in cpu_spread) or '-'}"
              + (f"; unscaled {row['cpu_error_base']:+.1%}" if "cpu_error_base" in row else "") + ")"
              f"  profit {row['profit_model'] / 2**20:6.1f}/"
              f"{row['profit_real'] / 2**20:6.1f} MiB ({p_err:+.1%} of mergeable; kernel's own "
              f"spread {', '.join(f'{s:.1%}' for s in spread) or '-'})")
        row["profit_error_of_mergeable"] = p_err
        row["kernel_spread_of_mergeable"] = spread
    if c["pages_to_scan_real"][0] and "advisor" in c["scenario"]:
        model_seq = c["pages_to_scan_model"]
        same = [model_seq[:len(r)] == r[:len(model_seq)] for r in c["pages_to_scan_real"]]
        print(f"   advisor pages_to_scan: model  {runs(model_seq)}")
        for r, ok in zip(c["pages_to_scan_real"], same, strict=True):
            print(f"                          kernel {runs(r)} ({'the same' if ok else 'differs'})")
        c["advisor_same"] = same


def runs(seq: list[int]) -> str:
    """*seq* with repeats folded: "70, 350, 30000 x 4177"."""
    out: list[str] = []
    for value, group in itertools.groupby(seq):
        n = len(list(group))
        out.append(f"{value} x {n}" if n > 1 else str(value))
    return ", ".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=2, help="real-kernel runs per scenario")
    ap.add_argument("--until", default="60s", help="cut longer scenarios here (default 60s)")
    ap.add_argument("--randoms", type=int, default=3, help="random scenarios (default 3)")
    ap.add_argument("--only", action="append", help="only these scenarios (repeatable)")
    ap.add_argument("--cost", help="the model's cost file (default: the shipped model)")
    ap.add_argument("--speed", action="store_true",
                    help="measure the machine's ksmd speed before each scenario (about 30 s) "
                         "and run the model with it")
    ap.add_argument("--json", help="write the comparison here")
    args = ap.parse_args()
    cost = KsmdCost.load(args.cost) if args.cost else None
    out = []
    started = time.time()
    load0 = os.getloadavg()
    for name, sc in scenarios(parse_duration_ns(args.until), args.randoms).items():
        if args.only and name not in args.only:
            continue
        speed = measure_speed_now(cost) if args.speed else None
        model = run_model(sc, speed.cost if speed else cost)
        reals = [run_real(sc) for _ in range(args.runs)]
        c = compare(name, model, reals)
        if speed:
            base = run_model(sc, cost)
            c["speed"] = {"factor": speed.factor, "cpu_scale": speed.cost.cpu_scale,
                          "late_fraction": speed.late_fraction}
            for row, bc in zip(c["checkpoints"], base.result.checkpoints, strict=False):
                row["cpu_model_base_s"] = bc.ksmd_cpu_s
                row["cpu_error_base"] = rel(bc.ksmd_cpu_s or 0.0, row["cpu_real_s"] or 0.0)
            print(f"\n   speed: {speed.factor:.3f} x as slow as at the fit (cpu_scale "
                  f"{speed.cost.cpu_scale:.3f})", end="")
        report(c, mergeable_bytes(model.result))
        out.append(c)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M", time.gmtime(started)),
            "loadavg_before": load0, "loadavg_after": os.getloadavg(),
            "cost": (cost.source if cost else "defaults"), "runs": args.runs,
            "speed": args.speed}
    print(f"\nload average {load0} -> {os.getloadavg()}; {time.time() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "scenarios": out}, indent=1))
    summary = [abs(e) <= 0.10 for c in out for e in c["scan_errors"]]
    cpu = [abs(r["cpu_error"]) <= 0.20 for c in out for r in c["checkpoints"] if r["cpu_real_s"]]
    cpu_errors = [abs(r["cpu_error"]) for c in out for r in c["checkpoints"] if r["cpu_real_s"]]
    print(f"scan ends within 10 %: {sum(summary)}/{len(summary)}; "
          f"CPU within 20 %: {sum(cpu)}/{len(cpu)}; median |CPU error| "
          f"{statistics.median(cpu_errors) if cpu_errors else 0.0:.1%}")
    unscaled = [abs(r["cpu_error_base"]) for c in out for r in c["checkpoints"]
                if r["cpu_real_s"] and "cpu_error_base" in r]
    if unscaled:
        print(f"without the speed measured (the {meta['cost']} model): CPU within 20 %: "
              f"{sum(e <= 0.20 for e in unscaled)}/{len(unscaled)}; median |CPU error| "
              f"{statistics.median(unscaled):.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
