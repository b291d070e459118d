# SPDX-License-Identifier: GPL-2.0-only
"""The recorded sysfs table (``tests/sysfs_cases.py``) re-checked on the real kernel.

Needs root and a writable ``/sys/kernel/mm/ksm``.  The module is one
``LinuxKernel`` session (through the probe's ``ksm_locked``): it holds the ksmlab
lock while it runs, saves every knob first and puts them back afterwards.
Every case starts from the recorded defaults.  Nothing is merged: ``run=1``
cases are skipped while any process has a mergeable area.

Counters are compared only in cases that leave ``run`` alone, because ``run=2``
resets ``full_scans`` on a kernel that has scanned before.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Iterator

import pytest

from helpers import staged_id, write_id
from ksmlab.backends.linux import linux_ksm_unavailable_reason
from sysfs_cases import (
    DEFAULTS,
    MODES,
    READ_ONLY,
    READ_ONLY_WRITE_ERRNO,
    STAGED_WRITES,
    WRITES,
    Setup,
    StagedWrite,
    Write,
)
from tools.probe_sysfs import KSM_DIR, Knobs, ksm_locked, mergeable_pids, read, read_all, write

KNOBS = [name for name in DEFAULTS if name not in READ_ONLY]

_REASON = linux_ksm_unavailable_reason()
pytestmark = [
    pytest.mark.linux,
    pytest.mark.skipif(_REASON is not None, reason=_REASON or ""),
]


@pytest.fixture(scope="module")
def session() -> Iterator[tuple[Knobs, dict[str, str]]]:
    """One LinuxKernel session (the lock, every knob saved and restored) for the module."""
    with ksm_locked(KNOBS) as pair:
        yield pair


@pytest.fixture(scope="module")
def found(session: tuple[Knobs, dict[str, str]]) -> dict[str, str]:
    """The knobs as they were found."""
    return dict(session[1])


@pytest.fixture
def ksm(session: tuple[Knobs, dict[str, str]]) -> Iterator[None]:
    """The kernel's knobs at the recorded defaults, under the lock."""
    knobs, _found = session
    defaults = {n: DEFAULTS[n] for n in KNOBS}
    knobs.reset(defaults)
    yield
    knobs.reset(defaults)


def check_write(
    setup: Setup, name: str, text: str, err: str | None, expected: dict[str, str]
) -> None:
    """Apply *setup*, write *text* to *name*, and compare with the recorded outcome."""
    touches_run = name == "run" or any(n == "run" for n, _ in setup)
    starts_ksmd = expected.get("run") == "1\n" or ("run", "1") in setup
    if starts_ksmd and (busy := mergeable_pids()):
        pytest.skip(f"run=1 would let ksmd merge pages of processes {busy}")
    files = KNOBS if touches_run else list(DEFAULTS)
    for setup_name, setup_text in setup:
        write(setup_name, setup_text)
    before = read_all(files)
    if err is None:
        write(name, text)
    else:
        with pytest.raises(OSError) as info:
            write(name, text)
        assert getattr(errno, err) == info.value.errno
        assert before == read_all(files)
    # The counters keep whatever history this kernel has: the table does not move them.
    want = {n: before[n] if n in READ_ONLY else (DEFAULTS | expected)[n] for n in files}
    assert want == read_all(files)


def test_files_are_the_tables() -> None:
    """The kernel has exactly the files of the table."""
    assert set(DEFAULTS) == {p.name for p in KSM_DIR.iterdir()}


@pytest.mark.parametrize("name", sorted(MODES))
def test_mode(name: str) -> None:
    """Each file has the recorded permission bits; the read-only ones are the counters."""
    mode = stat.S_IMODE((KSM_DIR / name).stat().st_mode)
    assert MODES[name] == mode
    assert (name in READ_ONLY) == (not mode & 0o222)


@pytest.mark.parametrize("name", KNOBS)
def test_knob_default(found: dict[str, str], name: str) -> None:
    """Each knob was found at its recorded boot value (run=2 counts as the stopped run=0).

    A killed ksmlab session cannot cause a failure here: the session that
    opened this module repaired what it left first (tests/test_linux_restore.py).
    A host whose owner set knobs on purpose can say so with
    ``KSMLAB_HOST_KNOBS_CHANGED=1``; the boot values cannot be read there.
    """
    value = found[name]
    if name == "run" and value == "2\n":
        value = "0\n"  # left by the lock protocol after an unmerge
    if value != DEFAULTS[name] and os.environ.get("KSMLAB_HOST_KNOBS_CHANGED") == "1":
        pytest.skip(f"{name} is {value.strip()!r} on this host, whose owner changed knobs "
                    f"(KSMLAB_HOST_KNOBS_CHANGED=1), so its boot value cannot be read here")
    assert DEFAULTS[name] == value, (
        f"{name} is {value.strip()!r}, the recorded boot value is {DEFAULTS[name].strip()!r}: "
        f"either this host's owner changed it (set KSMLAB_HOST_KNOBS_CHANGED=1 to skip; "
        f"'ksmlab doctor' lists such knobs) or the table is wrong for this kernel")


@pytest.mark.parametrize("name", sorted(READ_ONLY))
def test_counter_format(name: str) -> None:
    """Each counter reads as a decimal number and a newline, as its default does."""
    assert re.fullmatch(r"-?[0-9]+\n", DEFAULTS[name])
    assert re.fullmatch(r"-?[0-9]+\n", read(name))


@pytest.mark.parametrize("name", sorted(READ_ONLY))
def test_read_only_refuses_writes(ksm: None, name: str) -> None:
    """A counter refuses every write, even root's, with the recorded errno."""
    for text in ("0", "1", ""):
        with pytest.raises(OSError) as info:
            write(name, text)
        assert getattr(errno, READ_ONLY_WRITE_ERRNO) == info.value.errno


@pytest.mark.parametrize("case", WRITES, ids=write_id)
def test_write(ksm: None, case: Write) -> None:
    """One write from the defaults behaves as recorded."""
    name, text, err, expected = case
    check_write((), name, text, err, expected)


@pytest.mark.parametrize("case", STAGED_WRITES, ids=staged_id)
def test_staged_write(ksm: None, case: StagedWrite) -> None:
    """A write after a few others behaves as recorded."""
    setup, name, text, err, expected = case
    check_write(setup, name, text, err, expected)
