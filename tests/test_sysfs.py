# SPDX-License-Identifier: GPL-2.0-only
"""The model's ``/sys/kernel/mm/ksm`` against the table recorded on the real kernel.

Every case starts from a fresh :class:`ksmlab.SimKernel`.  The table lives in
``tests/sysfs_cases.py`` and is re-checked against the kernel itself by
``tests/test_sysfs_kernel.py``.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator

import pytest

from helpers import staged_id, write_id
from ksmlab import SimKernel
from sysfs_cases import (
    DEFAULTS,
    READ_ONLY,
    READ_ONLY_WRITE_ERRNO,
    STAGED_WRITES,
    WRITES,
    Setup,
    StagedWrite,
    Write,
)


@pytest.fixture
def kernel() -> Iterator[SimKernel]:
    """A fresh simulated machine, closed afterwards."""
    k = SimKernel()
    try:
        yield k
    finally:
        k.close()


def read_file(k: SimKernel, name: str) -> str:
    """What read(2) of the file returns: the API gives the text without its newline."""
    return k.sysfs[name] + "\n"


def read_all(k: SimKernel) -> dict[str, str]:
    """Every file of the table, as the model reads it."""
    return {name: read_file(k, name) for name in DEFAULTS}


def check_write(
    k: SimKernel,
    setup: Setup,
    name: str,
    text: str,
    err: str | None,
    expected: dict[str, str],
) -> None:
    """Apply *setup*, write *text* to *name*, and compare with the recorded outcome."""
    for setup_name, setup_text in setup:
        k.sysfs[setup_name] = setup_text
    before = read_all(k)
    if err is None:
        k.sysfs[name] = text
    else:
        with pytest.raises(OSError) as info:
            k.sysfs[name] = text
        assert getattr(errno, err) == info.value.errno
        assert before == read_all(k)
    assert DEFAULTS | expected == read_all(k)


def test_files_are_the_kernels(kernel: SimKernel) -> None:
    """The model has exactly the files of the kernel's /sys/kernel/mm/ksm."""
    assert set(DEFAULTS) == set(kernel.sysfs)


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_default(kernel: SimKernel, name: str) -> None:
    """Each file of a fresh machine reads as on a freshly booted kernel."""
    assert name in kernel.sysfs
    assert DEFAULTS[name] == read_file(kernel, name)


@pytest.mark.parametrize("name", sorted(READ_ONLY))
def test_read_only_refuses_writes(kernel: SimKernel, name: str) -> None:
    """A counter refuses every write with the recorded errno and stays as it was."""
    for text in ("0", "1", ""):
        with pytest.raises(OSError) as info:
            kernel.sysfs[name] = text
        assert getattr(errno, READ_ONLY_WRITE_ERRNO) == info.value.errno
    assert read_all(kernel) == DEFAULTS


@pytest.mark.parametrize("case", WRITES, ids=write_id)
def test_write(kernel: SimKernel, case: Write) -> None:
    """One write from the defaults fails or succeeds, with side effects, as on the kernel."""
    name, text, err, expected = case
    check_write(kernel, (), name, text, err, expected)


@pytest.mark.parametrize("case", STAGED_WRITES, ids=staged_id)
def test_staged_write(kernel: SimKernel, case: StagedWrite) -> None:
    """A write after a few others behaves as it did on the kernel."""
    setup, name, text, err, expected = case
    check_write(kernel, setup, name, text, err, expected)


def test_unknown_file_read(kernel: SimKernel) -> None:
    """Reading a file the kernel does not have raises KeyError."""
    assert "no_such_knob" not in kernel.sysfs
    with pytest.raises(KeyError):
        kernel.sysfs["no_such_knob"]


def test_unknown_file_write(kernel: SimKernel) -> None:
    """Writing a file the kernel does not have raises KeyError and changes nothing."""
    with pytest.raises(KeyError):
        kernel.sysfs["no_such_knob"] = "1"
    assert read_all(kernel) == DEFAULTS
