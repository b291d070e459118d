"""Soak: the model's stateful test, the differential programs and the fuzzers, at a large budget.

Three parts, each counted and classified, never asserted on time:

1. **Stateful model test** (tests/test_stateful.py): random programs of
   mmap/write/protect/unmap/advise/fork/exec/exit/prctl/sysfs/ksmd steps on
   SimKernel, with a byte-exact shadow of every process's memory and
   :func:`ksmlab.invariants.check_invariants` after every step, until at
   least ``--ops`` steps have run, spread over ``--jobs`` processes.  A
   failure is classified as an *invariant failure* (ModelInvariantError or a
   failed check_invariants), a *content mismatch* (a process read back other
   bytes than its shadow) or another failure.
2. **Differential programs** (ksmlab.differential): ``--programs`` seeded
   random programs (a third of them under prctl merge-any) run on the model
   and on the real kernel (root, KSM; takes the ksmlab lock per program);
   every counter, ksm_stat, smaps, errno and byte read back is compared.
3. **Fuzzers** (tests/test_fuzz_*.py): the input-surface fuzz tests with
   ``KSMLAB_FUZZ_EXAMPLES=--fuzz-examples``; any failure is a crash on fuzzed
   input.

Usage::

    python bench/soak.py                          # 1,000,000 steps, 1,000 programs, fuzz at 2000
    python bench/soak.py --ops 20000 --programs 20 --fuzz-examples 200   # a quick run
    python bench/soak.py --json soak.json         # also write the figures

docs/reliability.md records the figures of a full run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
sys.path.insert(0, str(TESTS))  # the stateful machine and its strategies live with the tests


@dataclass
class StatefulResult:
    """What one worker of part 1 ran and found."""

    operations: int = 0
    programs: int = 0
    invariant_failures: int = 0
    content_mismatches: int = 0
    other_failures: int = 0
    failures: list[str] = field(default_factory=list)


def _classify(exc: BaseException) -> str:
    from ksmlab.errors import ModelInvariantError

    text = "".join(traceback.format_exception(exc))
    if isinstance(exc, ModelInvariantError) or "check_invariants" in text:
        return "invariant_failures"
    if "memory_reads_back" in text or "reads wrong bytes" in text:
        return "content_mismatches"
    return "other_failures"


def _stateful_worker(ops: int, chunk_examples: int, steps: int) -> StatefulResult:
    """Run the state machine in chunks until *ops* steps have run."""
    from hypothesis import HealthCheck, settings
    from hypothesis.stateful import invariant, run_state_machine_as_test

    from test_stateful import KsmMachine

    result = StatefulResult()

    class Counted(KsmMachine):
        @invariant()
        def count(self) -> None:
            result.operations += 1

        def teardown(self) -> None:
            result.programs += 1
            super().teardown()

    chunk = settings(max_examples=chunk_examples, stateful_step_count=steps, deadline=None,
                     database=None, print_blob=True,
                     suppress_health_check=list(HealthCheck))
    while result.operations < ops:
        try:
            run_state_machine_as_test(Counted, settings=chunk)
        except Exception as e:  # a failure of the model: classify, keep it, go on
            kind = _classify(e)
            setattr(result, kind, getattr(result, kind) + 1)
            result.failures.append(f"{kind}: {type(e).__name__}: {str(e)[:2000]}")
    return result


def run_stateful(ops: int, jobs: int, steps: int) -> dict[str, Any]:
    t0 = time.monotonic()
    per_job = -(-ops // jobs)
    with ProcessPoolExecutor(jobs) as pool:
        parts = list(pool.map(_stateful_worker, [per_job] * jobs, [200] * jobs, [steps] * jobs))
    total = StatefulResult()
    for p in parts:
        for name in ("operations", "programs", "invariant_failures", "content_mismatches",
                     "other_failures"):
            setattr(total, name, getattr(total, name) + getattr(p, name))
        total.failures += p.failures
    out = asdict(total)
    out["seconds"] = round(time.monotonic() - t0, 1)
    return out


def run_differential(programs: int) -> dict[str, Any]:
    from ksmlab.backends.linux import helper_unavailable_reason, linux_ksm_unavailable_reason
    from ksmlab.differential import differential
    from ksmlab.differential.random_programs import random_program

    reason = linux_ksm_unavailable_reason() or helper_unavailable_reason()
    if reason:
        return {"skipped": reason}
    t0 = time.monotonic()
    out: dict[str, Any] = {"programs": 0, "disagreed": 0, "errors": 0, "failures": []}
    for seed in range(programs):
        merge_any = seed % 3 == 2
        program = random_program(10_000 + seed, merge_any=merge_any)
        try:
            report = differential(program)
        except Exception as e:  # a crash of the harness or the model, counted apart
            out["errors"] += 1
            out["failures"].append(f"seed {10_000 + seed} merge_any={merge_any}: "
                                   f"{type(e).__name__}: {e}")
        else:
            if not report.ok:
                out["disagreed"] += 1
                out["failures"].append(f"seed {10_000 + seed} merge_any={merge_any}:\n{report}")
        out["programs"] += 1
        if out["programs"] % 50 == 0:
            print(f"  differential: {out['programs']}/{programs}, {out['disagreed']} disagreed",
                  file=sys.stderr, flush=True)
    out["seconds"] = round(time.monotonic() - t0, 1)
    return out


def run_fuzz(examples: int) -> dict[str, Any]:
    files = sorted(str(p.relative_to(ROOT)) for p in TESTS.glob("test_fuzz_*.py"))
    if not files:
        return {"skipped": "no tests/test_fuzz_*.py"}
    t0 = time.monotonic()
    env = dict(os.environ, KSMLAB_FUZZ_EXAMPLES=str(examples))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           *files],
                          cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    return {"files": files, "examples_per_test": examples, "returncode": proc.returncode,
            "summary": tail, "crashes": _count_failed(proc.stdout),
            "seconds": round(time.monotonic() - t0, 1),
            "output_tail": proc.stdout[-4000:] if proc.returncode else ""}


def _count_failed(text: str) -> int:
    return sum(1 for line in text.splitlines() if line.startswith("FAILED "))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", type=int, default=1_000_000, help="stateful steps (default 1e6)")
    ap.add_argument("--steps", type=int, default=100, help="steps per stateful program")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="stateful processes")
    ap.add_argument("--programs", type=int, default=1000, help="differential programs")
    ap.add_argument("--fuzz-examples", type=int, default=2000, help="examples per fuzz test")
    ap.add_argument("--skip", action="append", default=[],
                    choices=["stateful", "differential", "fuzz"], help="leave a part out")
    ap.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    args = ap.parse_args()
    for name in ("ops", "steps", "jobs", "programs", "fuzz_examples"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    figures: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                               "command": " ".join(["python", "bench/soak.py", *sys.argv[1:]]),
                               "kernel": os.uname().release}
    if "stateful" not in args.skip:
        print(f"stateful: {args.ops} steps on {args.jobs} processes ...", file=sys.stderr)
        figures["stateful"] = run_stateful(args.ops, args.jobs, args.steps)
        print(json.dumps({k: v for k, v in figures["stateful"].items() if k != "failures"}),
              file=sys.stderr)
    if "differential" not in args.skip:
        print(f"differential: {args.programs} programs ...", file=sys.stderr)
        figures["differential"] = run_differential(args.programs)
    if "fuzz" not in args.skip:
        print(f"fuzz: {args.fuzz_examples} examples per test ...", file=sys.stderr)
        figures["fuzz"] = run_fuzz(args.fuzz_examples)
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    bad = (figures.get("stateful", {}).get("invariant_failures", 0)
           + figures.get("stateful", {}).get("content_mismatches", 0)
           + figures.get("stateful", {}).get("other_failures", 0)
           + figures.get("differential", {}).get("disagreed", 0)
           + figures.get("differential", {}).get("errors", 0)
           + figures.get("fuzz", {}).get("crashes", 0))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
