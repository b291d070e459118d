# SPDX-License-Identifier: GPL-2.0-only
"""Differential runs: one program on the model and on the real kernel, compared field by field.

A *program* is a function ``program(k, cp)`` written only against the
:mod:`ksmlab.api` protocols: it spawns processes, maps, writes, advises,
forks, writes sysfs knobs, waits for full scans, and calls ``cp("name")``
wherever it wants the state compared.  :func:`differential` runs it on a fresh
:class:`~ksmlab.SimKernel` and then on a
:class:`~ksmlab.backends.linux.LinuxKernel`, records the same observations on
both, and returns a :class:`DiffReport` listing every difference::

    def merge_ten(k: Kernel, cp: Checkpoint) -> None:
        p = k.spawn()
        a = p.mmap(10 * PAGE_SIZE)
        p.write(a, b"*" * 10 * PAGE_SIZE)
        p.madvise(a, 10 * PAGE_SIZE, MADV_MERGEABLE)
        k.sysfs["run"] = "1"
        k.wait_full_scans(2)
        cp("merged")

    report = differential(merge_ten)
    assert report.ok, str(report)

What is recorded (see ``docs/differential.md``):

* every call, with its outcome: the errno of a refused call (an
  :class:`OSError` is recorded, not raised: the call returns 0 / ``b""``),
  the value of ``prctl``, the bytes read back (as a digest), and for
  ``wait_full_scans`` whether ksmd stalled;
* at each checkpoint: the global counters (``pages_scanned``,
  ``pages_skipped`` and ``full_scans`` as deltas since the start of the run,
  plus vmstat ``cow_ksm``), and for every live process its ``ksm_stat``, the
  layout of its regions, its vmas over those regions (mergeable flag, perms,
  Rss, Anonymous, KSM) and which pages of the regions share a physical page.

Addresses are never compared as numbers: every ``mmap`` the program makes is
a *region* (``r0``, ``r1``, ...) and addresses are written relative to it
(``r1+3p``).  Only vmas that overlap a region are compared, so the helper
process's own mappings (text, data, heap, stack, vdso) never are.

Quiescence on the real kernel: ksmd runs only inside ``wait_full_scans``, and
for exactly the number of full scans asked (see
:class:`~ksmlab.differential.drivers._LinuxDriver`), so every point of the
program is a quiescent point, as in the model.

The package's modules:

* :mod:`~ksmlab.differential.records`: the records, :func:`compare` and :class:`DiffReport`;
* :mod:`~ksmlab.differential.proxies`: the kernel, processes and sysfs the program sees;
* :mod:`~ksmlab.differential.drivers`: each backend's side, and the real kernel's quiescence;
* :mod:`~ksmlab.differential.runner`: :func:`run_on_model`, :func:`run_on_bulk`,
  :func:`run_on_kernel`, :func:`differential`;
* :mod:`~ksmlab.differential.random_programs`: :func:`random_program`.
"""

from ksmlab.differential.drivers import DEFAULT_GAP_MS as DEFAULT_GAP_MS
from ksmlab.differential.drivers import QuiescenceError
from ksmlab.differential.random_programs import PATTERNS as PATTERNS
from ksmlab.differential.random_programs import random_program
from ksmlab.differential.records import (
    COUNTERS,
    CallRecord,
    Checkpoint,
    CheckpointRecord,
    Difference,
    DiffReport,
    ProcessRecord,
    Program,
    RunRecord,
    VmaRecord,
    compare,
)
from ksmlab.differential.records import DELTA_COUNTERS as DELTA_COUNTERS
from ksmlab.differential.records import VM_FLAGS as VM_FLAGS
from ksmlab.differential.runner import differential, run_on_bulk, run_on_kernel, run_on_model

__all__ = [
    "COUNTERS",
    "CallRecord",
    "Checkpoint",
    "CheckpointRecord",
    "DiffReport",
    "Difference",
    "ProcessRecord",
    "Program",
    "QuiescenceError",
    "RunRecord",
    "VmaRecord",
    "compare",
    "differential",
    "random_program",
    "run_on_bulk",
    "run_on_kernel",
    "run_on_model",
]
