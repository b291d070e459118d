"""The estimate against the real kernel: snapshot real workloads, estimate them, then run the real ksmd.

For each workload (real Python programs, bench/estimate_workloads.py):

1. take the KSM lock (LinuxKernel: it saves every knob and puts it back at
   the end), stop ksmd (``run=0``) and write the workload's knobs;
2. start the programs; each makes itself mergeable with
   ``prctl(PR_SET_MEMORY_MERGE, 1)`` and builds its memory; nothing merges
   while ``run=0``;
3. ``ksmlab snapshot`` them (the Python API, ``capture_snapshot``), with a
   few samples for the rewriting workload;
4. ``ksmlab estimate`` the snapshot (``run_estimate``), with the knobs the
   snapshot recorded (the host's at capture), for the same time as step 5;
5. write ``run=1`` and record the real counters and ksmd's CPU time every
   100 ms for that time;
6. stop the programs; LinuxKernel un-merges and restores the knobs.

It prints, per workload, the static bound, the prediction and the real
result (memory saved as ``pages_sharing + ksm_zero_pages`` at the end, time
to 50 % and 90 % of it, ksmd's CPU time), with the prediction's error, and
writes them to ``--out`` (JSON) and a figure (``--plot``) for docs/estimate.md.

With ``--speed``, step 1 also measures this machine's ksmd speed as
``ksmlab calibrate --speed`` does (about 30 s, in the same session, just
before the workload starts), and step 4 estimates with that cost, as an
operator would with ``ksmlab estimate --cost``.  The shipped model's
prediction is recorded beside it (``predicted_shipped``, computed after the
real run from the same snapshot), so both can be shown.

Usage (root, KSM; takes the ksmlab lock like every LinuxKernel user)::

    python bench/estimate.py                          # every workload
    python bench/estimate.py --only dataset zeros     # some
    python bench/estimate.py --speed --out docs/estimate-bench.json --plot docs/estimate-bench.png
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ksmlab.backends.linux import LinuxKernel, linux_ksm_unavailable_reason
from ksmlab.backends.linux_knobs import boot_knobs
from ksmlab.calibrate.speed import measure_speed
from ksmlab.estimate import run_estimate
from ksmlab.estimate.report import gross_figures
from ksmlab.ksm.cost import KsmdCost, default_cost
from ksmlab.scenario import host
from ksmlab.scenario.knobs import WRITE_ORDER
from ksmlab.scenario.model import GLOBAL_COUNTERS
from ksmlab.scenario.result import TIMELINE_COLUMNS
from ksmlab.snapshot import Selection, capture_snapshot, read_snapshot

HERE = os.path.dirname(os.path.abspath(__file__))
PROGRAM = os.path.join(HERE, "estimate_workloads.py")
SAMPLE_S = 0.1
TARGETS = {"saved": 10.0, "t50": 20.0, "t90": 20.0, "cpu": 25.0}
"""Issue 10's targets: the prediction's error against the real kernel, percent."""


@dataclass(frozen=True)
class Workload:
    """Programs to start, the knobs to run ksmd with, and for how long."""

    name: str
    description: str
    commands: list[list[str]]
    knobs: dict[str, str]
    seconds: float
    samples: int = 1
    interval_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def workloads(data: str, scale: float) -> list[Workload]:
    """The workloads, their sizes scaled by *scale*."""
    py = [sys.executable, PROGRAM]
    knobs = {"pages_to_scan": "500", "sleep_millisecs": "20", "use_zero_pages": "0",
             "max_page_sharing": "256", "smart_scan": "1", "advisor_mode": "none"}
    zmib = max(4, int(48 * scale))
    return [
        Workload("dataset", "4 Python processes load the same data set (a NumPy array, "
                            "JSON records) and compute the same derived array",
                 [[*py, "dataset", "--data", data] for _ in range(4)], knobs, 40.0),
        Workload("forkserver", "a Python server loads the data set and forks 4 workers, which "
                               "update part of it the same way, write a part of their own and "
                               "allocate equal buffers",
                 [[*py, "forkserver", "--data", data, "--workers", "4",
                   "--buffer-mib", str(max(1, int(8 * scale)))]], knobs, 40.0),
        Workload("rewriter", "3 Python processes load the data set, then rewrite 5% of its "
                             "pages 5 times a second and 10% once every 10 s",
                 [[*py, "rewriter", "--data", data] for _ in range(3)], knobs, 40.0,
                 samples=4, interval_s=1.0),
        Workload("zeros", "3 Python processes allocate a zeroed buffer (bytearray) and data "
                          "of their own; use_zero_pages=1",
                 [[*py, "zeros", "--zero-mib", str(zmib), "--own-mib", "8"] for _ in range(3)],
                 knobs | {"use_zero_pages": "1"}, 30.0),
        Workload("zeros-chains", "the same with use_zero_pages=0: the zero pages merge into "
                                 "KSM pages, chained by max_page_sharing=256",
                 [[*py, "zeros", "--zero-mib", str(zmib), "--own-mib", "8"] for _ in range(3)],
                 knobs, 30.0),
    ]


def make_data(directory: str, mib: int) -> None:
    """The data set: a seeded float64 array of *mib* MiB and a JSON file of records."""
    rng = np.random.default_rng(2024)
    np.save(os.path.join(directory, "data.npy"), rng.random((mib << 20) // 8))
    records = [{"id": i, "name": f"item-{i}", "tags": ["a", "b", str(i % 7)],
                "value": float(rng.random())} for i in range(20000 * max(1, mib // 16))]
    with open(os.path.join(directory, "records.json"), "w", encoding="utf-8") as f:
        json.dump(records, f)


def _counters(sysfs: Any) -> list[float]:
    return [float(sysfs[n]) for n in GLOBAL_COUNTERS]


DELTA = [GLOBAL_COUNTERS.index(n) for n in ("full_scans", "pages_scanned", "pages_skipped")]


def real_run(k: LinuxKernel, seconds: float) -> list[tuple[float, ...]]:
    """Start ksmd and record the counters every SAMPLE_S for *seconds* (rows of TIMELINE_COLUMNS)."""
    sysfs = k.sysfs
    base = _counters(sysfs)
    cpu0 = host.ksmd_cpu_ns() or 0
    rows: list[tuple[float, ...]] = []
    sysfs["run"] = "1"
    t0 = time.monotonic()
    nxt = 0.0
    while True:
        now = time.monotonic() - t0
        if now >= nxt:
            c = _counters(sysfs)
            for i in DELTA:
                c[i] -= base[i]
            cpu = ((host.ksmd_cpu_ns() or cpu0) - cpu0) / 1e9
            rows.append((now, *c, cpu))
            nxt += SAMPLE_S
            if now >= seconds:
                break
        time.sleep(max(0.0, min(SAMPLE_S / 4, nxt - (time.monotonic() - t0))))
    sysfs["run"] = "0"
    return rows


def _figures(timeline: list[tuple[float, ...]] | tuple[tuple[float, ...], ...]) -> dict[str, Any]:
    g = gross_figures(timeline)
    cpu = timeline[-1][TIMELINE_COLUMNS.index("ksmd_cpu_s")]
    return {"saved_pages": g.saved_pages, "t50_s": g.time_to_50_s, "t90_s": g.time_to_90_s,
            "ksmd_cpu_s": cpu, "end_s": timeline[-1][0],
            "full_scans": int(timeline[-1][TIMELINE_COLUMNS.index("full_scans")]),
            "pages_shared": int(timeline[-1][TIMELINE_COLUMNS.index("pages_shared")]),
            "pages_volatile": int(timeline[-1][TIMELINE_COLUMNS.index("pages_volatile")])}


def _error(pred: float | None, real: float | None) -> float | None:
    if pred is None or real is None or real == 0:
        return None
    return 100.0 * (pred - real) / real


def other_ksm_users(pids: set[int]) -> list[int]:
    """Processes other than the workload's that KSM would scan (they would skew the counters)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) in pids:
            continue
        try:
            with open(f"/proc/{d}/ksm_stat") as f:
                text = f.read()
        except OSError:
            continue
        if "ksm_mergeable yes" in text:
            out.append(int(d))
    return out


def run_workload(w: Workload, tmp: str, keep: str | None = None,
                 speed: bool = False) -> dict[str, Any]:
    """Steps 1-6 of the module doc for *w* (with ``--speed``, the machine's speed first)."""
    load = os.getloadavg()
    cost: KsmdCost | None = None
    speed_info: dict[str, Any] | None = None
    with LinuxKernel(lock_timeout=3600) as k:
        if speed:
            sp = measure_speed(k, default_cost())
            cost = sp.cost
            speed_info = {"ratio": sp.ratio, "reference": sp.reference, "factor": sp.factor,
                          "cpu_scale": sp.cost.cpu_scale, "late_fraction": sp.late_fraction}
            print(f"   speed: {sp.factor:.3f} x as slow as at the fit; cpu_scale "
                  f"{sp.cost.cpu_scale:.3f}", flush=True)
        k.reset_knobs(boot_knobs())  # run=0 (un-merging what ran before), boot values
        for name in WRITE_ORDER:
            if name in w.knobs:
                k.sysfs[name] = w.knobs[name]
        procs = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                 for cmd in w.commands]
        try:
            pids: list[int] = []
            for p in procs:
                assert p.stdout is not None
                line = p.stdout.readline()
                if not line:
                    raise RuntimeError(f"{w.name}: a workload process exited early")
                pids += json.loads(line)["pids"]
            time.sleep(2.0)  # let the programs settle (the rewriters reach their rates)
            others = other_ksm_users(set(pids))
            path = os.path.join(keep or tmp, f"{w.name}.parquet")
            t = time.monotonic()
            summary = capture_snapshot(path, Selection(pids=tuple(pids)), policy="as-is",
                                       samples=w.samples, interval_s=w.interval_s)
            capture_s = time.monotonic() - t
            t = time.monotonic()
            snap = read_snapshot(path)
            e = run_estimate(snap, until_ns=int(w.seconds * 1e9),
                             sample_ns=int(SAMPLE_S * 1e9), cost=cost)
            estimate_s = time.monotonic() - t
            real = real_run(k, w.seconds)
        finally:
            for p in procs:
                assert p.stdin is not None
                p.stdin.close()
            for p in procs:
                p.wait(timeout=60)
    pred, actual = _figures(e.result.timeline), _figures(real)
    errors = _errors(pred, actual)
    shipped: dict[str, Any] = {}
    if cost is not None:  # the same snapshot under the shipped model, for comparison
        es = run_estimate(snap, until_ns=int(w.seconds * 1e9), sample_ns=int(SAMPLE_S * 1e9))
        ps = _figures(es.result.timeline)
        shipped = {"speed": speed_info, "predicted_shipped": ps,
                   "errors_shipped": _errors(ps, actual)}
    plan = e.plan
    return shipped | {
        "name": w.name, "description": w.description, "knobs": w.knobs, "seconds": w.seconds,
        "load_before": load, "load_after": os.getloadavg(), "other_ksm_processes": others,
        "processes": len(pids), "snapshot": {
            "pages": summary.pages, "present": summary.present, "seconds": capture_s,
            "samples": w.samples, "interval_s": w.interval_s, "loaded_pages": len(plan),
            "thp_pages": plan.thp, "fork_shared_pages": int(plan.shared.sum()),
            "rewritten_pages": int((plan.rate > 0).sum()),
            "rewrites_per_s": float(plan.rate.sum())},
        "engine": e.result.backend, "estimate_seconds": estimate_s,
        "static": e.static.to_json(), "predicted": pred, "real": actual, "errors": errors,
        "met": {k: v is not None and abs(v) <= TARGETS[k] for k, v in errors.items()},
        "timeline_predicted": [list(r) for r in e.result.timeline],
        "timeline_real": [list(r) for r in real],
    }


def _errors(pred: dict[str, Any], actual: dict[str, Any]) -> dict[str, float | None]:
    """The prediction's error against the real run, percent, per target."""
    return {"saved": _error(pred["saved_pages"], actual["saved_pages"]),
            "t50": _error(pred["t50_s"], actual["t50_s"]),
            "t90": _error(pred["t90_s"], actual["t90_s"]),
            "cpu": _error(pred["ksmd_cpu_s"], actual["ksmd_cpu_s"])}


def replay(recorded: str, snapshots: str | None, only: list[str] | None,
           cost_file: str | None = None) -> int:
    """Estimate the kept snapshots again (with *cost_file*'s model, else the shipped one)
    and compare with the recorded real runs."""
    cost = KsmdCost.load(cost_file) if cost_file else None
    if not snapshots:
        print("bench/estimate.py: --replay needs --keep DIR (where the snapshots were kept)",
              file=sys.stderr)
        return 2
    with open(recorded, encoding="utf-8") as f:
        runs = json.load(f)
    results = []
    for r in runs:
        if only and r["name"] not in only:
            continue
        e = run_estimate(read_snapshot(os.path.join(snapshots, f"{r['name']}.parquet")),
                         until_ns=int(r["seconds"] * 1e9), sample_ns=int(SAMPLE_S * 1e9),
                         cost=cost)
        pred = _figures(e.result.timeline)
        errors = _errors(pred, r["real"])
        results.append(r | {"predicted": pred, "errors": errors,
                            "timeline_predicted": [list(x) for x in e.result.timeline]})
    print_table(results)
    return 0


def _thin(r: dict[str, Any]) -> dict[str, Any]:
    """*r* with its timelines at half a second, rounded (the file stays small)."""
    def rows(tl: list[list[float]]) -> list[list[float]]:
        return [[round(v, 4) for v in row] for row in tl[::5]] + ([tl[-1]] if len(tl) % 5 != 1 else [])
    return r | {"columns": list(TIMELINE_COLUMNS), "timeline_predicted": rows(r["timeline_predicted"]),
                "timeline_real": rows(r["timeline_real"])}


def _fmt(x: float | None, unit: str = "") -> str:
    return "-" if x is None else f"{x:.3g}{unit}"


def print_table(results: list[dict[str, Any]]) -> None:
    """One markdown table: per workload, bound, prediction, real, errors (and, after a
    ``--speed`` run, the shipped model's CPU)."""
    shipped = any("predicted_shipped" in r for r in results)
    print("| workload | static bound | saved: predicted / real (error) | 50 %: predicted / real "
          "(error) | 90 %: predicted / real (error) | ksmd CPU: predicted / real (error) |"
          + (" ksmd CPU, shipped model (error) | speed |" if shipped else ""))
    print("|---|---|---|---|---|---|" + ("---|---|" if shipped else ""))
    for r in results:
        p, a, e = r["predicted"], r["real"], r["errors"]
        mib = 4096 / 2**20
        print(f"| {r['name']} | {r['static']['saved_pages'] * mib:.1f} MiB "
              f"| {p['saved_pages'] * mib:.1f} / {a['saved_pages'] * mib:.1f} MiB "
              f"({_fmt(e['saved'], ' %')}) | {_fmt(p['t50_s'], ' s')} / {_fmt(a['t50_s'], ' s')} "
              f"({_fmt(e['t50'], ' %')}) | {_fmt(p['t90_s'], ' s')} / {_fmt(a['t90_s'], ' s')} "
              f"({_fmt(e['t90'], ' %')}) | {_fmt(p['ksmd_cpu_s'], ' s')} / "
              f"{_fmt(a['ksmd_cpu_s'], ' s')} ({_fmt(e['cpu'], ' %')}) |", end="")
        if "predicted_shipped" in r:
            print(f" {_fmt(r['predicted_shipped']['ksmd_cpu_s'], ' s')} "
                  f"({_fmt(r['errors_shipped']['cpu'], ' %')}) | {r['speed']['factor']:.3f} |",
                  end="")
        print()


def plot(results: list[dict[str, Any]], path: str) -> None:
    """Predicted and real saving over time, with the static bound, one panel per workload."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(results)
    fig = Figure(figsize=(12, 2.6 * n), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n, 2, squeeze=False)
    si, zi = TIMELINE_COLUMNS.index("pages_sharing"), TIMELINE_COLUMNS.index("ksm_zero_pages")
    ci = TIMELINE_COLUMNS.index("ksmd_cpu_s")
    mib = 4096 / 2**20
    for row, r in zip(axes, results, strict=True):
        ax, cx = row
        for key, label, style in (("timeline_predicted", "predicted (model)", "-"),
                                  ("timeline_real", "real kernel", "--")):
            tl = r[key]
            ax.plot([x[0] for x in tl], [(x[si] + x[zi]) * mib for x in tl], style, label=label)
            cx.plot([x[0] for x in tl], [x[ci] for x in tl], style, label=label)
        ax.axhline(r["static"]["saved_pages"] * mib, color="tab:red", linestyle="-.",
                   label="static bound")
        ax.set_title(f"{r['name']}: memory saved, (pages_sharing + ksm_zero_pages) x 4 KiB",
                     loc="left", fontsize=10)
        ax.set_ylabel("MiB")
        cx.set_title(f"{r['name']}: ksmd CPU time", loc="left", fontsize=10)
        cx.set_ylabel("CPU s")
        for a in (ax, cx):
            a.grid(True, alpha=0.3)
            a.set_xlabel("time (s)")
            a.legend(fontsize=8, loc="lower right")
    fig.savefig(path, dpi=100)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run these workloads only")
    ap.add_argument("--data-mib", type=int, default=64, help="size of the data set (MiB)")
    ap.add_argument("--out", help="write the results as JSON")
    ap.add_argument("--plot", help="draw predicted and real curves (PNG)")
    ap.add_argument("--keep", metavar="DIR", help="keep the snapshots in DIR (for --replay)")
    ap.add_argument("--replay", metavar="JSON",
                    help="no kernel: estimate the snapshots kept in --keep DIR again and compare "
                         "with the real runs recorded in JSON (a model change, same workloads)")
    ap.add_argument("--speed", action="store_true",
                    help="measure this machine's ksmd speed before each workload (about 30 s, "
                         "as `ksmlab calibrate --speed`) and estimate with it; the shipped "
                         "model's prediction is recorded beside it")
    ap.add_argument("--cost", metavar="FILE",
                    help="with --replay: the model's cost file (default: the shipped model)")
    args = ap.parse_args()
    if args.cost and not args.replay:
        ap.error("--cost applies to --replay (a live run uses the shipped model)")
    if args.replay:
        return replay(args.replay, args.keep, args.only, args.cost)
    reason = linux_ksm_unavailable_reason()
    if reason:
        print(f"bench/estimate.py: {reason}", file=sys.stderr)
        return 3
    if args.keep:
        # Before anything runs, so a bad DIR fails in a second, not after the first workload.
        os.makedirs(args.keep, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="ksmlab-estimate-") as tmp:
        os.chmod(tmp, 0o755)
        make_data(tmp, args.data_mib)
        for w in workloads(tmp, args.data_mib / 64):
            if args.only and w.name not in args.only:
                continue
            print(f"== {w.name}: {w.description}", flush=True)
            r = run_workload(w, tmp, args.keep, args.speed)
            results.append(r)
            p, a = r["predicted"], r["real"]
            print(f"   load {r['load_before'][0]:.1f}; {r['processes']} processes, "
                  f"{r['snapshot']['loaded_pages']} pages loaded ({r['snapshot']['thp_pages']} THP, "
                  f"{r['snapshot']['fork_shared_pages']} fork-shared, "
                  f"{r['snapshot']['rewritten_pages']} rewritten); engine {r['engine']}, "
                  f"estimate {r['estimate_seconds']:.1f} s", flush=True)
            print(f"   predicted {p}\n   real      {a}\n   errors %  {r['errors']}", flush=True)
            if "errors_shipped" in r:
                print(f"   shipped model's errors % {r['errors_shipped']}", flush=True)
    print_table(results)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump([_thin(r) for r in results], f, indent=1)
    if args.plot and results:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
