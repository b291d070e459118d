"""Reading ksmd's CPU time from /proc (ksmlab.scenario.host), on fake /proc trees."""

from __future__ import annotations

import os
from pathlib import Path

from ksmlab.scenario import host

STAT = "37 (ksmd) S 2 0 0 0 -1 2097216 0 0 0 0 {utime} {stime} 0 0 25 5 1 0 30 0 0\n"


def fake_proc(tmp_path: Path, *, schedstat: str | None) -> Path:
    """A /proc with a ksmd thread (pid 37, child of kthreadd) and a user process named ksmd."""
    (tmp_path / "37").mkdir()
    (tmp_path / "37" / "stat").write_text(STAT.format(utime=300, stime=200))
    if schedstat is not None:
        (tmp_path / "37" / "schedstat").write_text(schedstat)
    (tmp_path / "99").mkdir()
    (tmp_path / "99" / "stat").write_text("99 (ksmd) S 1 0 0 0 -1 0 0 0 0 0 7 7 0 0 20 0 1 0 9 0 0\n")
    return tmp_path


def test_schedstat_gives_nanoseconds(tmp_path: Path) -> None:
    """The first field of schedstat is used as is: it is already in nanoseconds."""
    proc = fake_proc(tmp_path, schedstat="34942396168 6232963753 133280\n")
    assert host.find_ksmd_pid(str(proc)) == 37
    assert host.ksmd_cpu_ns(str(proc)) == 34942396168


def test_stat_ticks_without_schedstat(tmp_path: Path) -> None:
    """Without schedstat, utime + stime ticks are converted: 500 ticks at CLK_TCK per second."""
    proc = fake_proc(tmp_path, schedstat=None)
    assert 500 * 1_000_000_000 // os.sysconf("SC_CLK_TCK") == host.ksmd_cpu_ns(str(proc))


def test_no_ksmd(tmp_path: Path) -> None:
    """A user process that calls itself ksmd is not the kernel thread: no CPU time."""
    (tmp_path / "99").mkdir()
    (tmp_path / "99" / "stat").write_text("99 (ksmd) S 1 0 0 0 -1 0 0 0 0 0 7 7 0 0 20 0 1 0 9 0 0\n")
    assert host.ksmd_cpu_ns(str(tmp_path)) is None
