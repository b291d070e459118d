"""The mm side of execve: the new address space replacing the old one (``fs/exec.c``).

``bprm_mm_init`` prepares the new mm (inheritable flags, KSM's exec hook);
``exec_mmap`` installs it and drops the old one.  The process side stays in
:mod:`ksmlab.kernel`.
"""

from __future__ import annotations

from collections.abc import Callable

from ksmlab.mm.fork import KsmExitHook, mmf_init_flags, mmput
from ksmlab.mm.memory import Memory
from ksmlab.mm.mm_types import MmStruct

KsmExecveHook = Callable[[MmStruct], int]
"""``ksm_execve(mm)``: 0 or an errno."""


def bprm_mm_init(mm: MmStruct, oldmm: MmStruct, ksm_execve: KsmExecveHook) -> int:
    """Set up the fresh *mm* of an exec from *oldmm* (``mm_alloc`` + ``bprm_mm_init``).

    Returns 0, or the errno of KSM's exec hook (ENOMEM); on error *mm* is
    simply dropped and nothing else has changed.
    """
    mm.flags = mmf_init_flags(oldmm.flags)
    return ksm_execve(mm)


def exec_mmap(oldmm: MmStruct, memory: Memory, ksm_exit: KsmExitHook) -> None:
    """After the new mm is installed, release the old one (the ``mmput`` of ``exec_mmap``)."""
    mmput(oldmm, memory, ksm_exit)
