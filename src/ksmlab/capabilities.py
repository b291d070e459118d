"""What an engine models, so a caller can ask before it calls.

SimKernel and the real kernel model the whole :class:`~ksmlab.api.Kernel`
interface.  An engine that models part of it (the bulk engine) says which part
in a class attribute, ``MODELS``: a frozenset of :class:`Capability`, next to
the code that implements them, so the declaration grows with the engine.
Anything not declared raises :class:`~ksmlab.errors.NotModelledError` when
called; ``tests/test_preflight.py`` calls each capability on the engine and
holds the declaration to what the engine does.

The scenario pre-flight (:mod:`ksmlab.scenario.preflight`) lists the
capabilities a scenario needs and reports, before anything runs, those the
chosen engine does not declare.
"""

from __future__ import annotations

from enum import StrEnum


class Capability(StrEnum):
    """A call, or a knob value, that an engine may or may not model; the value names it."""

    MMAP = "mmap of anonymous private memory"
    WRITE = "writes of whole pages"
    MADV_MERGEABLE = "madvise(MADV_MERGEABLE)"
    MADV_UNMERGEABLE = "madvise(MADV_UNMERGEABLE)"
    MADV_DONTNEED = "madvise(MADV_DONTNEED)"
    PR_SET_MEMORY_MERGE = "prctl(PR_SET_MEMORY_MERGE)"
    FORK = "fork"
    EXIT = "exit"
    EXEC = "exec"
    MUNMAP = "munmap"
    MPROTECT = "mprotect"
    KSM_STAT = "/proc/PID/ksm_stat"
    RUN_UNMERGE = "run=2 (unmerge everything)"
    NUMA = "merge_across_nodes=0 (NUMA trees)"
    ADVISOR = "the scan-time advisor (advisor_mode, advisor_*)"


ALL_CAPABILITIES: frozenset[Capability] = frozenset(Capability)
"""What an engine without a ``MODELS`` declaration models: everything."""


def declared(engine: type) -> frozenset[Capability]:
    """The capabilities *engine* (a kernel class) declares; all of them if it declares none."""
    models = getattr(engine, "MODELS", None)
    if models is None:
        return ALL_CAPABILITIES
    if not isinstance(models, frozenset) or not all(isinstance(c, Capability) for c in models):
        msg = f"{engine.__name__}.MODELS must be a frozenset of Capability, got {models!r}"
        raise TypeError(msg)
    return models


__all__ = ["ALL_CAPABILITIES", "Capability", "declared"]
