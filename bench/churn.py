"""Big hosts as a scenario sets them up and churns them (issue 13's targets), model only.

Three measurements, each in a fresh process (so peak RSS is its own):

* **set-up**: a host of 32 guests of 2 GiB (64 GiB) built by the scenario
  runner on the bulk engine, until the clock starts (time and peak RSS); and
  the memory per page of filling one 1 GiB guest on each engine (SimKernel
  with page bytes, in fingerprint mode, the bulk engine), against
  docs/performance.md's figures.
* **churn**: 20 guests of 2 GiB, each rewriting 1% of its memory per second
  (``rate = "1%/s"``, Poisson arrivals, random pages) for ten virtual minutes,
  ksmd at ``pages_to_scan=1000``, ``sleep_millisecs=20``, on the bulk engine,
  with the command line's progress bar drawn (to a terminal nobody sees): wall
  and CPU time, and the time the progress reports and the bar's redraws took.
* **equal**: the same churn at a small size (4 guests of 32 MiB, 1%/s, one
  virtual minute), its writes applied as one array step per batch and one by
  one: the two results must be identical (the tests check this too).

Guests hold what bench/bulk_scaling.py's do: 10% zero pages, 25% pages of a
common image, 65% of their own (as ``[content]`` fractions)::

    python bench/churn.py                     # everything, at the sizes above
    python bench/churn.py --only setup churn  # some of it
    python bench/churn.py --minutes 2 --guests 4 --json r.json

Timings are printed, never asserted; docs/performance.md records results.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ksmlab.scenario.backends import BulkBackend, open_backend
from ksmlab.scenario.loader import parse_scenario
from ksmlab.scenario.runner import Runner, run_scenario

GUEST = "2GiB"


def host_toml(guests: int, size: str, minutes: float, share: str | None = "1%/s") -> str:
    """A scenario of *guests* guests of *size*, churning *share* of their memory per second."""
    activity = "" if share is None else f"""
[[activity]]
process = "guest"
mapping = "ram"
rate = "{share}"
arrivals = "poisson"
"""
    return f"""
[scenario]
name = "{guests} guests x {size}"
seed = 1
duration = "{minutes * 60:g}s"
[ksm]
pages_to_scan = 1000
sleep_millisecs = 20
[content.ram]
kind = "image"
zero_fraction = 0.10
private_fraction = 0.65
[[process]]
name = "guest"
count = {guests}
[[process.mapping]]
name = "ram"
size = "{size}"
content = "ram"
{activity}
[[checkpoint]]
at = "{minutes * 60:g}s"
"""


def rss_kib() -> int:
    """Peak RSS of this process so far, KiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child_setup(engine: str, guests: int, size: str) -> dict[str, Any]:
    """Build the host (no churn) and stop when the clock would start."""
    sc = parse_scenario(host_toml(guests, size, 1, None), source="<bench>", base_dir=Path("."))
    name, content = ("sim", engine.split("-")[1]) if engine.startswith("sim-") else (engine, "bytes")
    backend = open_backend(name, content)  # type: ignore[arg-type]
    runner = Runner(sc, backend)
    base = rss_kib()
    started, cpu0 = time.perf_counter(), time.process_time()
    runner._setup()
    setup_s, cpu_s = time.perf_counter() - started, time.process_time() - cpu0
    pages = sc.total_pages()
    return {"engine": engine, "guests": guests, "size": size, "pages": pages,
            "setup_s": round(setup_s, 2), "cpu_s": round(cpu_s, 2),
            "peak_rss_mib": round(rss_kib() / 1024),
            "bytes_per_page": round((rss_kib() - base) * 1024 / pages)}


def child_churn(guests: int, size: str, minutes: float, share: str, progress: bool) -> dict[str, Any]:
    """The churn run on the bulk engine, with the command line's progress bar if asked."""
    import rich.live

    from ksmlab import cli
    from ksmlab.scenario import runner as runner_module

    sc = parse_scenario(host_toml(guests, size, minutes, share), source="<bench>",
                        base_dir=Path("."))
    spent = {"reports": 0.0, "redraws": 0.0}

    def timed(key: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[key] += time.perf_counter() - t
        return wrapper

    runner_module.Runner._report_progress = timed(  # type: ignore[method-assign]
        "reports", runner_module.Runner._report_progress)
    rich.live.Live.refresh = timed("redraws", rich.live.Live.refresh)  # type: ignore[method-assign]
    backend = BulkBackend()
    cpu0, started = time.process_time(), time.perf_counter()
    with cli._progress(progress, sc, "bulk") as update:
        result = run_scenario(sc, backend, update)
    wall = time.perf_counter() - started
    end = result.checkpoints[-1]
    return {"guests": guests, "size": size, "minutes": minutes, "share": share,
            "progress": progress, "wall_s": round(wall, 1),
            "cpu_s": round(time.process_time() - cpu0, 1),
            "progress_s": round(spent["reports"] + spent["redraws"], 3),
            "progress_share": round((spent["reports"] + spent["redraws"]) / wall, 4),
            "peak_rss_mib": round(rss_kib() / 1024), "end_s": result.end_s,
            "counters": dict(end.counters), "contents": len(backend.bulk.contents)}


def child_equal(guests: int, size: str, minutes: float, share: str) -> dict[str, Any]:
    """Writes as one step per batch and one by one: identical results?"""
    from ksmlab.report.document import to_document

    sc = parse_scenario(host_toml(guests, size, minutes, share), source="<bench>",
                        base_dir=Path("."))
    docs, times = [], []
    for vectorize in (True, False):
        backend = BulkBackend(vectorize_writes=vectorize)
        started = time.perf_counter()
        doc = to_document(run_scenario(sc, backend))
        times.append(round(time.perf_counter() - started, 1))
        assert isinstance(doc, dict)
        docs.append(doc)
    return {"guests": guests, "size": size, "minutes": minutes, "identical": docs[0] == docs[1],
            "vector_s": times[0], "one_by_one_s": times[1]}


def run_child(*args: str) -> dict[str, Any]:
    p = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True,
                       text=True, check=False)
    if p.returncode:
        sys.exit(f"bench/churn.py --child {' '.join(args)} failed:\n{p.stderr}")
    out: dict[str, Any] = json.loads(p.stdout.splitlines()[-1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", choices=("setup", "churn", "progress-off", "equal"),
                    default=("setup", "churn", "equal"),
                    help="what to measure (progress-off: the churn run without the bar too)")
    ap.add_argument("--guests", type=int, default=20, help="guests of the churn run (20)")
    ap.add_argument("--minutes", type=float, default=10, help="virtual minutes of churn (10)")
    ap.add_argument("--share", default="1%/s", help='memory rewritten per second ("1%%/s")')
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "setup":
            out = child_setup(rest[0], int(rest[1]), rest[2])
        elif kind == "churn":
            out = child_churn(int(rest[0]), rest[1], float(rest[2]), rest[3], rest[4] == "1")
        else:
            out = child_equal(int(rest[0]), rest[1], float(rest[2]), rest[3])
        print(json.dumps(out))
        return
    results: dict[str, Any] = {}
    if "setup" in args.only:
        results["setup"] = [run_child("setup", "bulk", "32", GUEST)]
        for engine in ("sim-bytes", "sim-fingerprint", "bulk"):
            results["setup"].append(run_child("setup", engine, "1", "1GiB"))
        for r in results["setup"]:
            print(f"set-up {r['engine']:16} {r['guests']:3} x {r['size']}: {r['setup_s']:6.1f} s "
                  f"({r['cpu_s']:.1f} s CPU), peak RSS {r['peak_rss_mib']} MiB, "
                  f"{r['bytes_per_page']} B/page")
    runs = [("churn", "1")] if "churn" in args.only else []
    if "progress-off" in args.only:
        runs.append(("progress-off", "0"))
    for key, flag in runs:
        r = run_child("churn", str(args.guests), GUEST, str(args.minutes), args.share, flag)
        results[key] = r
        print(f"churn {r['guests']} x {r['size']}, {r['share']}, {r['minutes']:g} virtual min, "
              f"progress {'on' if r['progress'] else 'off'}: {r['wall_s']} s wall, "
              f"{r['cpu_s']} s CPU, progress {r['progress_s']} s ({100 * r['progress_share']:.2f}%), "
              f"peak RSS {r['peak_rss_mib']} MiB, {r['contents']} content ids")
        print("  at the end:", r["counters"])
    if "equal" in args.only:
        r = run_child("equal", "4", "32MiB", "1", args.share)
        results["equal"] = r
        print(f"one array step per batch vs one by one ({r['guests']} x {r['size']}, "
              f"{r['minutes']:g} min): {'identical' if r['identical'] else 'DIFFERENT'} "
              f"({r['vector_s']} s vs {r['one_by_one_s']} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
