"""``ksmlab tune``'s proof: the model's fronts beside the real kernel's, and the sweep's scale.

Two parts (docs/tune.md and docs/performance.md record the results):

* **fidelity** (``--only fidelity``; root, KSM): for each of two workloads
  (the built-in scenario and examples/disk-image.toml, each cut to
  ``--seconds``), a grid of 12 configurations (``pages_to_scan`` x
  ``sleep_millisecs``) and the three references run on the model (a Dask
  LocalCluster) and then on this machine's kernel (one after the other, each
  a LinuxKernel session: it takes the machine-wide lock).  Per configuration:
  the memory saved and ksmd's CPU on both, their differences, and whether the
  same configuration is recommended under the same budget.  With ``--runs N``
  every real configuration runs N times (the whole grid, then again) and the
  model is compared with their mean, the kernel's own spread beside it (its
  ksmd's CPU for the same run moves by 15 % or more over an hour on a shared
  machine: docs/tune.md).  The model's runs
  start with ``ksmd_cpu_at_start`` set to the real ksmd's CPU time since boot,
  so the scan-time advisor reference is compared like for like;
* **scale** (``--only scale``): a 100-configuration sweep (10 ``pages_to_scan``
  x 10 ``sleep_millisecs``) of a 64 GiB host (32 guests of 2 GiB; 10% zero
  pages, 25% a common image, 65% their own) on the bulk engine, two virtual
  minutes each, with 1 and with 2 Dask workers: the wall time of each and
  the speed-up.

::

    sudo python bench/tune.py                       # both
    sudo python bench/tune.py --only fidelity --seconds 20 --runs 2 --json docs/tune-bench.json
    python bench/tune.py --only scale

Timings and differences are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ksmlab.backends.linux_knobs import boot_knobs
from ksmlab.calibrate.speed import measure_speed_now
from ksmlab.ksm.cost import KsmdCost
from ksmlab.scenario import host
from ksmlab.scenario.loader import load_builtin, load_scenario, parse_scenario, truncate
from ksmlab.scenario.model import Scenario
from ksmlab.scenario.transform import with_ksmd_cpu_at_start
from ksmlab.tune.grid import REFERENCES, Config, Grid, parse_grid, references
from ksmlab.tune.pareto import Point, Recommendation, pareto_front, recommend
from ksmlab.tune.result import TuneResult, assemble, scan_rate
from ksmlab.tune.sweep import run_sweep
from ksmlab.tune.work import Workload, mergeable_bytes

ROOT = Path(__file__).resolve().parent.parent
NS = 1_000_000_000
FIDELITY_GRID = ["pages_to_scan=100,500,2000", "sleep_millisecs=10,20,50,200"]
SCALE_GRID = ["pages_to_scan=500,1000,2000,3000,5000,8000,10000,15000,20000,30000",
              "sleep_millisecs=5,10,15,20,30,50,75,100,150,200"]
BUDGET = 5.0
"""The CPU budget (percent of one CPU) under which the two recommendations are compared."""

HOST_64G = """
[scenario]
name = "32 guests x 2 GiB (64 GiB host)"
seed = 1
duration = "120s"
[content.ram]
kind = "image"
zero_fraction = 0.10
private_fraction = 0.65
[[process]]
name = "guest"
count = 32
[[process.mapping]]
name = "ram"
size = "2GiB"
content = "ram"
[[checkpoint]]
at = "120s"
"""


def _configs(grid: Grid) -> tuple[list[Config], int]:
    configs = grid.configs()
    return configs + references(grid, boot_knobs()), len(configs)


def _sweep(sc: Scenario, backend: str, grid: Grid, workers: int | None = None,
           cost: KsmdCost | None = None) -> TuneResult:
    configs, n = _configs(grid)
    w = Workload(sc.name, sc.source, backend, mergeable_bytes(sc), scenario=sc, cost=cost,
                 lock_timeout_s=3600.0)  # others' benches may hold the kernel a while

    def progress(i: int, cfg: Config, o: Any) -> None:
        print(f"  {backend} #{i} {cfg.label}: saved {o.saved_bytes}, cpu {o.ksmd_cpu_percent}",
              file=sys.stderr, flush=True)

    sweep = run_sweep(w, configs, workers=workers, progress=progress)
    return assemble(w, grid, configs, n, sweep, BUDGET)


def _rel(model: float | None, real: float | None) -> float | None:
    if model is None or real is None or real == 0:
        return None
    return 100 * (model - real) / abs(real)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _spread(xs: list[float]) -> float | None:
    """The kernel's own spread over its runs: (max - min) / mean, percent."""
    m = _mean(xs)
    return None if len(xs) < 2 or m == 0 else 100 * (max(xs) - min(xs)) / abs(m)


def _choice(rows: list[dict[str, Any]], side: str,
            budget: float = BUDGET) -> tuple[list[int], Recommendation]:
    """The front and the recommendation over one side's figures (``model`` or ``real``: the
    real runs' mean) of the grid's rows (the references are never candidates)."""
    pts = [Point(r["index"], r[f"{side}_cpu_percent"], round(r[f"{side}_saved_bytes"]),
                 scan_rate(dict(kv.split("=", 1) for kv in r["config"].split())))
           for r in rows[:len(rows) - len(REFERENCES)]]
    return pareto_front(pts), recommend(pts, budget)


def fidelity(seconds: float, runs: int = 1, cost: KsmdCost | None = None,
             speed: bool = False) -> dict[str, Any]:
    """Both workloads on the model and on the kernel (see the module doc); *runs* real runs of
    each configuration, compared by their mean (the kernel's own spread recorded).  With
    *speed*, the machine's ksmd speed is measured before each workload and the model runs
    with it (``--remodel`` with the unscaled cost gives the other side for comparison)."""
    grid = parse_grid(FIDELITY_GRID)
    workloads = [truncate(load_builtin(), int(seconds * NS)),
                 truncate(load_scenario(ROOT / "examples" / "disk-image.toml"), int(seconds * NS))]
    out: dict[str, Any] = {"seconds": seconds, "budget_percent": BUDGET, "real_runs": runs,
                           "cost": "shipped" if cost is None else Path(cost.source).name,
                           "speed": speed, "workloads": []}
    for sc in workloads:
        sp = measure_speed_now(cost) if speed else None
        if sp:
            print(f"{sc.name}: speed {sp.factor:.3f} x as slow as at the fit, cpu_scale "
                  f"{sp.cost.cpu_scale:.3f}", file=sys.stderr)
        # The model's ksmd starts with the real one's CPU since boot, which the scan-time
        # advisor's first step counts (the real runs follow: their ksmd has a few seconds
        # more by then, which changes nothing the advisor computes from minutes).
        boot_cpu = host.ksmd_cpu_ns()
        print(f"{sc.name}: model (ksmd CPU at start {boot_cpu} ns)", file=sys.stderr)
        model = _sweep(sc if boot_cpu is None else with_ksmd_cpu_at_start(sc, boot_cpu), "sim",
                       grid, cost=sp.cost if sp else cost)
        reals = []
        for k in range(runs):
            print(f"{sc.name}: real kernel, run {k + 1} of {runs}", file=sys.stderr)
            reals.append(_sweep(sc, "linux", grid))
        rows = []
        for i, cfg in enumerate(model.configs):
            m = model.outcome(i)
            rs = [real.outcome(i) for real in reals]
            assert m is not None and m.saved_bytes is not None and m.ksmd_cpu_percent is not None
            assert all(r is not None and r.saved_bytes is not None
                       and r.ksmd_cpu_percent is not None for r in rs)
            cpus = [r.ksmd_cpu_percent for r in rs if r is not None and r.ksmd_cpu_percent is not None]
            saved = [float(r.saved_bytes) for r in rs if r is not None and r.saved_bytes is not None]
            t90 = [r.time_to_90_s for r in rs if r is not None]
            real_saved, real_cpu = _mean(saved), _mean(cpus)
            row = {"index": i, "config": cfg.label,
                   "real_saved_bytes": real_saved, "real_saved_bytes_runs": saved,
                   "real_cpu_percent": real_cpu, "real_cpu_percent_runs": cpus,
                   "real_cpu_spread_percent": _spread(cpus),
                   "real_t90_s": t90[0] if len(t90) == 1 else t90}
            _model_fields(row, m, model.front)
            rows.append(row)
        real_front, real_choice = _choice(rows, "real")
        real_rec = real_choice.index
        for r in rows:
            r["real_on_front"] = r["index"] in real_front
        out["workloads"].append({
            "name": sc.name, "source": _repo_relative(sc.source),
            "mergeable_bytes": mergeable_bytes(sc),
            "model_ksmd_cpu_at_start_s": None if boot_cpu is None else boot_cpu / NS,
            "speed": None if sp is None else {"factor": sp.factor, "cpu_scale": sp.cost.cpu_scale,
                                              "late_fraction": sp.late_fraction},
            "rows": rows, "model_front": list(model.front), "real_front": real_front,
            "model_recommendation": model.recommendation.index,
            "model_equivalent": list(model.recommendation.equivalent),
            "real_recommendation": real_rec,
            "real_recommendation_per_run": [real.recommendation.index for real in reals],
            "same_recommendation": model.recommendation.index == real_rec,
            "model_wall_s": model.sweep.wall_s,
            "real_wall_s": sum(real.sweep.wall_s for real in reals)})
        _print_fidelity(out["workloads"][-1])
    return out


def _model_fields(row: dict[str, Any], m: Any, front: tuple[int, ...]) -> None:
    """Set *row*'s model columns (and the differences) from the model's outcome *m*."""
    real_saved, real_cpu = row["real_saved_bytes"], row["real_cpu_percent"]
    row.update({
        "model_saved_bytes": m.saved_bytes,
        "saved_diff_percent": _rel(m.saved_bytes, real_saved),
        "saved_diff_percent_of_mergeable": 100 * (m.saved_bytes - real_saved) / m.mergeable_bytes,
        "model_cpu_percent": m.ksmd_cpu_percent,
        "cpu_diff_percent": _rel(m.ksmd_cpu_percent, real_cpu),
        "model_t90_s": m.time_to_90_s, "model_on_front": row["index"] in front})


def remodel(fid: dict[str, Any], cost: KsmdCost | None) -> None:
    """No kernel: run the model side of stored fidelity runs again (another cost file, or the
    shipped one after a refit) against the same real runs, and recompute what depends on it."""
    grid = parse_grid(FIDELITY_GRID)
    seconds = fid["seconds"]
    fid["cost"] = "shipped" if cost is None else Path(cost.source).name
    fid["speed"] = False  # the model side no longer uses the speeds measured (kept per workload)
    fid["remodelled"] = True  # the model side ran after the real runs, not beside them
    for w in fid["workloads"]:
        src = w["source"]
        sc = load_builtin() if src == "<built-in>" else load_scenario(ROOT / src)
        sc = truncate(sc, int(seconds * NS))
        boot = w["model_ksmd_cpu_at_start_s"]
        model = _sweep(sc if boot is None else with_ksmd_cpu_at_start(sc, round(boot * NS)), "sim",
                       grid, cost=cost)
        for row in w["rows"]:
            m = model.outcome(row["index"])
            assert m is not None and m.saved_bytes is not None
            _model_fields(row, m, model.front)
        w["model_front"] = list(model.front)
        w["model_recommendation"] = model.recommendation.index
        w["model_equivalent"] = list(model.recommendation.equivalent)
        w["same_recommendation"] = w["model_recommendation"] == w["real_recommendation"]
        w["model_wall_s"] = model.sweep.wall_s
        _print_fidelity(w)


def _repo_relative(source: str) -> str:
    """A scenario's source as the results record it: relative to the repository (the
    results are published in docs/, which must not name a path of this machine)."""
    try:
        return str(Path(source).relative_to(ROOT))
    except ValueError:
        return source  # <built-in>, or a file outside the repository


def _fmt(x: float | None, unit: str = "") -> str:
    return "n/a" if x is None else f"{x:+.1f}{unit}"


def _print_fidelity(w: dict[str, Any]) -> None:
    print(f"\n{w['name']} ({w['mergeable_bytes'] >> 20} MiB mergeable)")
    print(f"{'config':45} {'saved model':>12} {'real':>12} {'diff':>8} {'cpu% model':>11} "
          f"{'real':>7} {'diff':>8}")
    for r in w["rows"]:
        ms, rs = r["model_saved_bytes"], r["real_saved_bytes"]
        print(f"{r['config'][:45]:45} {ms / 2**20:12.2f} {rs / 2**20:12.2f} "
              f"{_fmt(r['saved_diff_percent'], '%'):>8} {r['model_cpu_percent']:11.3f} "
              f"{r['real_cpu_percent']:7.3f} {_fmt(r['cpu_diff_percent'], '%'):>8}")
    print(f"front: model {w['model_front']}, real {w['real_front']}; recommended (<= {BUDGET}%): "
          f"model {w['model_recommendation']} (equivalent: {w.get('model_equivalent', [])}), "
          f"real {w['real_recommendation']}")


def scale() -> dict[str, Any]:
    """The 100-configuration 64 GiB sweep with 1 and 2 workers."""
    sc = parse_scenario(HOST_64G, source="<bench 64 GiB>", base_dir=ROOT)
    grid = parse_grid(SCALE_GRID)
    out: dict[str, Any] = {"configs": grid.size, "host_bytes": mergeable_bytes(sc), "runs": []}
    for workers in (1, 2):
        started = time.perf_counter()
        r = _sweep(sc, "bulk", grid, workers)
        total = time.perf_counter() - started
        ok = sum(1 for o in r.sweep.outcomes.values() if o.ok)
        run_wall = [o.wall_s for o in r.sweep.outcomes.values()]
        out["runs"].append({"workers": workers, "sweep_wall_s": round(r.sweep.wall_s, 1),
                            "total_wall_s": round(total, 1), "finished": ok,
                            "mean_run_wall_s": round(sum(run_wall) / len(run_wall), 2),
                            "recommendation": r.recommendation.index})
        print(f"{workers} worker(s): {len(r.configs)} runs ({ok} ok) in {r.sweep.wall_s:.1f} s "
              f"(with the cluster's start and stop {total:.1f} s); mean run "
              f"{sum(run_wall) / len(run_wall):.2f} s", flush=True)
    one, two = out["runs"][0]["sweep_wall_s"], out["runs"][1]["sweep_wall_s"]
    out["speedup"] = round(one / two, 2)
    print(f"speed-up from 1 to 2 workers: {out['speedup']}x")
    return out


def plot_fronts(fid: dict[str, Any], path: str) -> None:
    """The two workloads' points and fronts, the model's beside the kernel's."""
    from matplotlib.figure import Figure

    ws = fid["workloads"]
    fig = Figure(figsize=(6 * len(ws), 4.6), layout="constrained")
    for ax, w in zip(fig.subplots(1, len(ws), squeeze=False)[0], ws, strict=True):
        for side, color, marker in (("model", "#1565c0", "o"), ("real", "#d32f2f", "s")):
            rows = w["rows"]
            ax.scatter([r[f"{side}_cpu_percent"] for r in rows],
                       [r[f"{side}_saved_bytes"] / 2**20 for r in rows], color=color,
                       marker=marker, s=18, alpha=0.5)
            front = [rows[i] for i in w[f"{side}_front"]]
            ax.plot([r[f"{side}_cpu_percent"] for r in front],
                    [r[f"{side}_saved_bytes"] / 2**20 for r in front], color=color,
                    marker=marker, label=f"{'model' if side == 'model' else 'real kernel'} front")
            rec = w[f"{side}_recommendation"]
            if rec is not None:
                ax.scatter([rows[rec][f"{side}_cpu_percent"]], [rows[rec][f"{side}_saved_bytes"] / 2**20],
                           marker="*", s=220, color=color, edgecolor="black", zorder=5)
        ax.axvline(fid["budget_percent"], color="gray", linestyle="--", linewidth=1)
        ax.set_xscale("symlog", linthresh=1)
        ax.set_title(w["name"], fontsize=10)
        ax.set_xlabel("ksmd CPU, % of one CPU")
        ax.set_ylabel("memory saved at the end, MiB")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(path)


def rerank(fid: dict[str, Any]) -> None:
    """Apply the current recommendation rule (ksmlab.tune.pareto) again to stored fidelity runs:
    the measured savings and CPU shares are kept, the fronts and recommendations recomputed."""
    for w in fid["workloads"]:
        for side in ("model", "real"):
            front, rec = _choice(w["rows"], side, fid["budget_percent"])
            w[f"{side}_front"] = front
            w[f"{side}_recommendation"] = rec.index
            if side == "model":
                w["model_equivalent"] = list(rec.equivalent)
        w["same_recommendation"] = w["model_recommendation"] == w["real_recommendation"]
        _print_fidelity(w)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", choices=("fidelity", "scale"),
                    default=["fidelity", "scale"])
    ap.add_argument("--seconds", type=float, default=20.0,
                    help="each fidelity run's length (real seconds on the kernel)")
    ap.add_argument("--runs", type=int, default=1,
                    help="real runs of each fidelity configuration (compared by their mean; "
                         "the kernel's own spread is recorded)")
    ap.add_argument("--cost", metavar="FILE",
                    help="the model's cost file for the fidelity runs (default: the shipped one)")
    ap.add_argument("--speed", action="store_true",
                    help="measure the machine's ksmd speed before each fidelity workload (about "
                         "30 s, as `ksmlab calibrate --speed`) and run the model with it")
    ap.add_argument("--json", metavar="FILE", help="write the results as JSON")
    ap.add_argument("--plot", metavar="FILE", help="draw the fidelity fronts side by side")
    ap.add_argument("--remodel", metavar="JSON",
                    help="no kernel: run the model side of the fidelity runs stored in JSON "
                         "again (with --cost, or the shipped model), then write --json/--plot")
    ap.add_argument("--rerank", metavar="JSON",
                    help="no kernel: re-apply the recommendation rule to the fidelity runs stored "
                         "in JSON (written by --json), then write --json/--plot from them")
    args = ap.parse_args()
    results: dict[str, Any] = {}
    cost = KsmdCost.load(args.cost) if args.cost else None
    if args.remodel:
        results = json.loads(Path(args.remodel).read_text())
        remodel(results["fidelity"], cost)
        if args.plot:
            plot_fronts(results["fidelity"], args.plot)
    elif args.rerank:
        results = json.loads(Path(args.rerank).read_text())
        rerank(results["fidelity"])
        if args.plot:
            plot_fronts(results["fidelity"], args.plot)
    elif "fidelity" in args.only:
        results["fidelity"] = fidelity(args.seconds, args.runs, cost, args.speed)
        if args.plot:
            plot_fronts(results["fidelity"], args.plot)
    if "scale" in args.only and not (args.rerank or args.remodel):
        results["scale"] = scale()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
