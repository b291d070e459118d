# SPDX-License-Identifier: GPL-2.0-only
"""Real programs for bench/estimate.py: what a workload process does (run as a script; no ksmlab).

Every process first asks the kernel to make all its memory mergeable,
``prctl(PR_SET_MEMORY_MERGE, 1)`` through ctypes, as a service started
under a KSM-enabling wrapper would (nothing merges while ksmd's ``run`` is
0), then builds its memory the way ordinary Python programs do, prints one
JSON line (``{"pids": [...]}``) when it is ready, and stays until stdin
closes, rewriting its memory meanwhile if its kind does.

Kinds:

* ``dataset``: load the same data set (a NumPy ``.npy`` array and a JSON file
  of records) and compute the same derived array, as several workers of one
  service would.  NumPy asks for transparent huge pages on big arrays;
* ``forkserver``: load the data set, then fork workers (a pre-fork server).
  Each worker updates a common part of the array the same way (equal
  copies in every worker), writes a part of its own, and allocates a
  buffer of its own filled the same way in every worker; the rest stays
  shared with the parent, page for page;
* ``rewriter``: load the data set, then keep rewriting pages of its array:
  a hot part at a high rate, a warm part slowly (a cache, counters);
* ``zeros``: a zero-heavy allocator: a large zeroed buffer (``bytearray``,
  which writes its zeros) and some data of its own.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import select
import sys
import time

PR_SET_MEMORY_MERGE = 67
PAGE = 4096


def merge_any() -> None:
    """prctl(PR_SET_MEMORY_MERGE, 1): every area of this process (and its children) mergeable."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                           ctypes.c_ulong]
    if libc.prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_MEMORY_MERGE): {os.strerror(err)}")


def load(data: str) -> tuple[object, object]:
    """The data set: the array and the records."""
    import numpy as np

    arr = np.load(os.path.join(data, "data.npy"))
    with open(os.path.join(data, "records.json"), encoding="utf-8") as f:
        records = json.load(f)
    return arr, records


def wait_stdin(step: float, work: object = None) -> None:
    """Until stdin closes: call *work* every *step* seconds (or just wait)."""
    while True:
        ready, _, _ = select.select([sys.stdin], [], [], step)
        if ready and not sys.stdin.buffer.read1(4096):
            return
        if callable(work):
            work()


def ready(pids: list[int]) -> None:
    print(json.dumps({"pids": pids}), flush=True)


def dataset(args: argparse.Namespace) -> None:
    import numpy as np

    arr, records = load(args.data)
    derived = np.sort(arr[: arr.size // 4])  # the same computation in every process
    ready([os.getpid()])
    wait_stdin(1.0)
    del arr, records, derived


def forkserver(args: argparse.Namespace) -> None:
    import numpy as np

    arr, records = load(args.data)
    assert isinstance(arr, np.ndarray)
    n = arr.size
    children = []
    pipes = []
    for i in range(args.workers):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(w)
            arr[: n // 8] += 1.0  # the same update in every worker: equal private copies
            own = slice(n // 4 + i * n // 16, n // 4 + (i + 1) * n // 16)
            arr[own] = np.random.default_rng(i).random(own.stop - own.start)  # its own
            buf = np.full(args.buffer_mib << 17, 7.0)  # the same fill in every worker
            os.read(r, 1)  # until the parent goes
            del buf
            os._exit(0)
        os.close(r)
        children.append(pid)
        pipes.append(w)
    ready([os.getpid(), *children])
    wait_stdin(1.0)
    for w in pipes:
        os.close(w)
    for pid in children:
        os.waitpid(pid, 0)
    del records


def rewriter(args: argparse.Namespace) -> None:
    import numpy as np

    arr, records = load(args.data)
    assert isinstance(arr, np.ndarray)
    per_page = PAGE // arr.itemsize
    pages = arr.size // per_page
    hot = range(0, int(pages * args.hot))
    warm = range(len(hot), len(hot) + int(pages * args.warm))
    rng = random.Random(os.getpid())
    step = 0.01
    debt = {"hot": 0.0, "warm": 0.0}

    def work() -> None:
        for name, part, rate in (("hot", hot, args.hot_rate), ("warm", warm, args.warm_rate)):
            if not len(part):
                continue
            debt[name] += rate * len(part) * step
            while debt[name] >= 1:
                debt[name] -= 1
                arr[rng.choice(part) * per_page] += 1.0

    ready([os.getpid()])
    wait_stdin(step, work)
    del records


def zeros(args: argparse.Namespace) -> None:
    buf = bytearray(args.zero_mib << 20)  # zeroed by writing: present zero-filled pages
    own = os.urandom(args.own_mib << 20)
    ready([os.getpid()])
    wait_stdin(1.0)
    del buf, own


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("kind", choices=("dataset", "forkserver", "rewriter", "zeros"))
    ap.add_argument("--data", default=".")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--buffer-mib", type=int, default=4)
    ap.add_argument("--hot", type=float, default=0.05, help="share of pages rewritten fast")
    ap.add_argument("--hot-rate", type=float, default=5.0, help="writes per hot page per second")
    ap.add_argument("--warm", type=float, default=0.10, help="share of pages rewritten slowly")
    ap.add_argument("--warm-rate", type=float, default=0.1, help="writes per warm page per second")
    ap.add_argument("--zero-mib", type=int, default=48)
    ap.add_argument("--own-mib", type=int, default=8)
    args = ap.parse_args()
    merge_any()
    {"dataset": dataset, "forkserver": forkserver, "rewriter": rewriter, "zeros": zeros}[
        args.kind](args)
    time.sleep(0)


if __name__ == "__main__":
    main()
