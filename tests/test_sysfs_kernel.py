# SPDX-License-Identifier: GPL-2.0-only
"""The recorded sysfs table (``tests/sysfs_cases.py``) re-checked on the real kernel.

Needs root and a writable ``/sys/kernel/mm/ksm``.  The module holds the ksmlab
lock (``/run/lock/ksmlab.lock``) while it runs, saves every knob first and puts
them back afterwards.  Every case starts from the recorded defaults.  Nothing is
merged: ``run=1`` cases are skipped while any process has a mergeable area.

Counters are compared only in cases that leave ``run`` alone, because ``run=2``
resets ``full_scans`` on a kernel that has scanned before.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

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

KSM_DIR = Path("/sys/kernel/mm/ksm")
LOCK_PATH = Path("/run/lock/ksmlab.lock")
KNOBS = [name for name in DEFAULTS if name not in READ_ONLY]


def _unusable_reason() -> str | None:
    """Why this machine cannot run these tests, or None."""
    if not KSM_DIR.is_dir():
        return f"{KSM_DIR} does not exist (kernel without CONFIG_KSM or sysfs)"
    if os.geteuid() != 0:
        return "writing /sys/kernel/mm/ksm needs root"
    if not os.access(KSM_DIR / "run", os.W_OK):
        return f"{KSM_DIR} is not writable here (read-only sysfs?)"
    return None


_REASON = _unusable_reason()
pytestmark = [
    pytest.mark.linux,
    pytest.mark.skipif(_REASON is not None, reason=_REASON or ""),
]


def read(name: str) -> str:
    """The text of one file exactly as read."""
    fd = os.open(KSM_DIR / name, os.O_RDONLY)
    try:
        return os.read(fd, 65536).decode()
    finally:
        os.close(fd)


def write(name: str, text: str) -> None:
    """One write(2) of *text*, as ``echo -n`` does; raises OSError."""
    fd = os.open(KSM_DIR / name, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def read_all(names: Sequence[str]) -> dict[str, str]:
    """The text of each of *names*."""
    return {name: read(name) for name in names}


def writable_value(name: str, text: str) -> str:
    """The value to write to read *text* back (``[none] scan-time`` -> ``none``)."""
    if name == "advisor_mode":
        m = re.search(r"\[([^]]*)\]", text)
        assert m is not None, text
        return m.group(1)
    return text.strip()


def mergeable_pids() -> list[int]:
    """Processes ksmd could merge pages of (a VM_MERGEABLE area or MMF_VM_MERGE_ANY)."""
    pids = []
    for stat_file in Path("/proc").glob("[0-9]*/ksm_stat"):
        with contextlib.suppress(OSError):
            text = stat_file.read_text()
            if "ksm_mergeable: yes" in text or "ksm_merge_any: yes" in text:
                pids.append(int(stat_file.parent.name))
    return pids


def restore_knobs(target: dict[str, str], *, final: bool) -> None:
    """Write *target* back in the lock protocol's order.

    run=2 first if ksmd may be running or anything is merged, then advisor_mode,
    then pages_to_scan, then the rest, then run.  On the *final* restore a saved
    run=0 is left at 2 once run=2 had to be written.
    """
    unmerged = False
    if read("run") == "1\n" or read("pages_shared") != "0\n":
        write("run", "2")
        unmerged = True
    order = ["advisor_mode", "pages_to_scan"]
    order += [n for n in target if n not in order and n != "run"]
    for name in order:
        if read(name) != target[name]:
            write(name, writable_value(name, target[name]))
    if final and unmerged and target["run"] == "0\n":
        return
    if read("run") != target["run"]:
        write("run", writable_value("run", target["run"]))


@contextlib.contextmanager
def ksm_knobs_locked() -> Iterator[dict[str, str]]:
    """Hold the ksmlab lock; yield the knobs as found; restore them all on exit."""
    LOCK_PATH.parent.mkdir(parents=True, exist_ok=True)
    lock_fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        saved = read_all(KNOBS)
        try:
            yield dict(saved)
        finally:
            restore_knobs(saved, final=True)
    finally:
        os.close(lock_fd)


@pytest.fixture(scope="module")
def found() -> Iterator[dict[str, str]]:
    """The lock for the whole module, and the knobs as they were found."""
    with ksm_knobs_locked() as saved:
        yield saved


@pytest.fixture
def ksm(found: dict[str, str]) -> Iterator[None]:
    """The kernel's knobs at the recorded defaults, under the lock."""
    restore_knobs({n: DEFAULTS[n] for n in KNOBS}, final=False)
    yield
    restore_knobs({n: DEFAULTS[n] for n in KNOBS}, final=False)


def show(text: str) -> str:
    """A short readable form of a written text, for test ids."""
    if len(text) <= 24:
        return repr(text)
    return f"{text[:3]!r}..{text[-3:]!r}[{len(text)}]"


def write_id(case: Write) -> str:
    """``file=text`` for a single-write case."""
    name, text, _err, _expected = case
    return f"{name}={show(text)}"


def staged_id(case: StagedWrite) -> str:
    """``setup;...->file=text`` for a staged case."""
    setup, name, text, _err, _expected = case
    steps = ";".join(f"{n}={show(v)}" for n, v in setup)
    return f"{steps}->{name}={show(text)}"


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
    """Each knob was found at its recorded default (run=2 counts as the stopped run=0)."""
    value = found[name]
    if name == "run" and value == "2\n":
        value = "0\n"  # left by the lock protocol after an unmerge
    assert DEFAULTS[name] == value


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
