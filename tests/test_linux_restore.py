# SPDX-License-Identifier: GPL-2.0-only
"""The host comes first: every ending of a session leaves the knobs as it found them.

The real-kernel tests start a session in a child process that sets many knobs
away from their boot values and lets ksmd merge, then end it each way a
session can end (normal exit, exception, SIGINT, SIGTERM, SIGKILL) and read
the knobs straight from sysfs under the ksmlab lock.  The expected values are
the knobs found before the child started, with the one rule of the lock
protocol (docs/linux-backend.md): a session whose ksmd ran and which found
``run=0`` leaves ``run=2``, stopped and un-merged.

The tests without the ``linux`` mark run the same logic on fake sysfs
directories and lock files.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from ksmlab.backends import linux, linux_doctor, linux_knobs, linux_session
from ksmlab.backends.linux import KsmRestoreError, LinuxKernel
from ksmlab.backends.linux_knobs import KnobFailure, restore_knobs
from ksmlab.backends.linux_lock import SessionNote
from ksmlab.backends.linux_repair import repair_dead_session
from ksmlab.cli import main
from linux_support import (
    BOOT_KNOBS,
    KSM,
    after_session,
    ksmlab_lock,
    read_knobs,
    read_knobs_locked,
    run_python,
    skip_unless_ksm_usable,
    wait_gone,
)

# Knobs the child sets away from their boot values (all accepted by 6.18;
# max_page_sharing and merge_across_nodes only while no KSM page exists).
CHANGED = {"pages_to_scan": "1234", "sleep_millisecs": "0", "max_page_sharing": "2",
           "use_zero_pages": "1", "stable_node_chains_prune_millisecs": "999",
           "advisor_max_cpu": "33"}

CHILD = """
    import sys
    from ksmlab.constants import MADV_MERGEABLE, PAGE_SIZE as P
    from linux_support import session_at_boot_knobs

    ending = {ending!r}
    with session_at_boot_knobs(**{changed!r}) as k:
        p = k.spawn()
        a = p.mmap(8 * P)
        p.write(a, b"*" * (8 * P))
        p.madvise(a, 8 * P, MADV_MERGEABLE)
        k.sysfs["run"] = "1"
        k.wait_full_scans(2)
        print("merged", p.pid, k.sysfs["pages_sharing"], flush=True)
        if ending == "exception":
            raise RuntimeError("the body failed")
        if ending != "normal":
            sys.stdin.read()  # until a signal ends us
"""


def start_child(ending: str) -> tuple[subprocess.Popen[str], int]:
    """A session in a child, after ksmd merged its 8 pages; returns it and its helper's pid."""
    proc = run_python(CHILD.format(ending=ending, changed=CHANGED))
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    if not line or line[0] != "merged":
        proc.kill()
        raise AssertionError(f"the session did not start: {line} {proc.communicate()}")
    # max_page_sharing=2: 8 identical pages are 4 KSM pages with one sharer each.
    assert int(line[2]) > 0, "ksmd merged nothing, so the test would not test the unmerge"
    return proc, int(line[1])


def lock_note() -> str:
    return Path(linux.default_lock_path()).read_text().strip()


def expect_host_as_found(before: dict[str, str]) -> None:
    """Under the lock: every knob as found (lock rule for run), nothing merged, no note."""
    with ksmlab_lock():
        assert read_knobs() == after_session(before, merged=True)
        if before["run"] != "1":  # else the host's own ksmd runs again
            assert (KSM / "pages_shared").read_text().strip() == "0"
        assert lock_note() == ""


# --- every ending, on the real kernel ---------------------------------------------------------

EXIT_STATUS = {"normal": 0, "exception": 1, "SIGTERM": 128 + signal.SIGTERM,
               "SIGINT": -signal.SIGINT}  # KeyboardInterrupt ends Python by SIGINT


@pytest.mark.linux
@pytest.mark.parametrize("ending", list(EXIT_STATUS))
def test_every_ending_restores_every_knob(ending: str) -> None:
    skip_unless_ksm_usable()
    before = read_knobs_locked()
    proc, helper = start_child(ending)
    if ending.startswith("SIG"):
        proc.send_signal(getattr(signal, ending))
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_STATUS[ending], err
    assert wait_gone(helper)
    expect_host_as_found(before)


@pytest.mark.linux
def test_sigkill_is_repaired_by_the_next_session_first() -> None:
    skip_unless_ksm_usable()
    before = read_knobs_locked()
    proc, helper = start_child("SIGKILL")
    proc.kill()
    proc.wait()
    assert wait_gone(helper)  # its channel closed, so the helper exited
    with ksmlab_lock():
        # What the killed session left: its knobs, and a note naming the host's.
        assert read_knobs()["pages_to_scan"] == CHANGED["pages_to_scan"]
        note = SessionNote.parse(lock_note())
        assert note is not None and note.pid == proc.pid and note.ran
        assert note.saved_knobs == before
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        k = LinuxKernel()
    try:
        # Repaired before anything was saved: the session saved the host's values.
        assert k.saved_knobs == after_session(before, merged=True)
    finally:
        k.close()
    said = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(said) == 1, said
    assert f"pid {proc.pid}" in said[0]
    assert f"pages_to_scan {CHANGED['pages_to_scan']} -> {before['pages_to_scan']}" in said[0]
    expect_host_as_found(before)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the repair is said once, not again
        LinuxKernel().close()


@pytest.mark.linux
def test_note_of_an_older_ksmlab_is_repaired() -> None:
    """The plain-text note earlier versions wrote is read too (machines upgrade with a note left)."""
    skip_unless_ksm_usable()
    before = read_knobs_locked()
    changed = str(int(before["pages_to_scan"]) + 1)
    knobs = " ".join(f"{n}={v}" for n, v in sorted(before.items()))
    with ksmlab_lock():
        if before["advisor_mode"] != "none":
            pytest.skip("pages_to_scan is the advisor's while advisor_mode=scan-time")
        Path(linux.default_lock_path()).write_text(
            f"pid 1 (python3 old.py) since 2026-11-01T10:00:00; saved knobs: {knobs}\n")
        (KSM / "pages_to_scan").write_text(changed)
    with pytest.warns(RuntimeWarning, match=rf"pages_to_scan {changed} -> {before['pages_to_scan']}"):
        LinuxKernel().close()
    # The old note did not say whether ksmd ran, so the repair un-merged to be safe.
    expect_host_as_found(before)


@pytest.mark.linux
def test_a_failed_restore_keeps_the_note_for_the_next_session(
        monkeypatch: pytest.MonkeyPatch) -> None:
    skip_unless_ksm_usable()
    before = read_knobs_locked()
    sleep = "3" if before["sleep_millisecs"] != "3" else "4"
    k = LinuxKernel()
    k.sysfs["sleep_millisecs"] = sleep
    refused = OSError(errno.EBUSY, os.strerror(errno.EBUSY))
    # The kernel refusing the restore is injected: no knob of 6.18 refuses it for real.
    monkeypatch.setattr(linux_session, "restore_knobs",
                        lambda *a, **kw: [KnobFailure("sleep_millisecs", before["sleep_millisecs"],
                                                      refused)])
    with pytest.raises(KsmRestoreError, match="sleep_millisecs"):
        k.close()
    monkeypatch.undo()
    with ksmlab_lock():
        note = SessionNote.parse(lock_note())
        assert note is not None and note.saved_knobs == before
    with pytest.warns(RuntimeWarning, match=rf"sleep_millisecs {sleep} -> "):
        LinuxKernel().close()
    with ksmlab_lock():
        assert read_knobs() == before  # ksmd never ran: run as found too
        assert lock_note() == ""


@pytest.mark.linux
def test_doctor_shows_and_repairs_a_killed_session(capsys: pytest.CaptureFixture[str]) -> None:
    skip_unless_ksm_usable()
    before = read_knobs_locked()
    proc, _helper = start_child("SIGKILL")
    proc.kill()
    proc.wait()
    assert main(["doctor", "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    stale = doc["lock"]["stale_session"]
    assert doc["needs_repair"] is True and stale["pid"] == proc.pid and stale["ran"] is True
    assert stale["differs"]["pages_to_scan"] == {"now": CHANGED["pages_to_scan"],
                                                 "saved": before["pages_to_scan"]}
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "doctor --repair" in out and f"pid {proc.pid}" in out
    assert main(["doctor", "--repair"]) == 0
    out = capsys.readouterr().out
    assert f"pages_to_scan {CHANGED['pages_to_scan']} -> {before['pages_to_scan']}" in out
    expect_host_as_found(before)
    assert main(["doctor", "--repair", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["needs_repair"] is False and "repaired" not in doc


# --- the same logic on fake directories (no kernel) -------------------------------------------

def fake_sysfs(tmp_path: Path, **values: str) -> Path:
    """A directory of knob files at the boot values (plus *values*), and two counters."""
    d = tmp_path / "ksm"
    d.mkdir(parents=True)
    for name, value in {**BOOT_KNOBS, **values}.items():
        (d / name).write_text(("[none] scan-time" if value == "none" else "none [scan-time]")
                              if name == "advisor_mode" else value + "\n")
        (d / name).chmod(0o644)
    for name in ("pages_shared", "full_scans"):
        (d / name).write_text("0\n")
        (d / name).chmod(0o444)
    return d


def test_session_note_round_trip_and_garbage() -> None:
    note = SessionNote(12, "python3 x.py", "2026-11-30T10:00:00", {"run": "0", "a": "b"}, ran=True)
    assert SessionNote.parse(note.to_text()) == note
    assert "\n" not in note.to_text()
    legacy = SessionNote.parse("pid 7 (python3 -c x) since 2026-11-01T10:00:00; "
                               "saved knobs: advisor_mode=none run=0")
    assert legacy == SessionNote(7, "python3 -c x", "2026-11-01T10:00:00",
                                 {"advisor_mode": "none", "run": "0"}, ran=True)
    assert SessionNote.parse("pid 7 (x) since 2026-11-01T10:00:00") == SessionNote(
        7, "x", "2026-11-01T10:00:00", None, ran=False)
    for garbage in ("", "   ", "hello", "[1, 2]", '{"saved_knobs": {"a": 1}}', "\x00\xff"):
        assert SessionNote.parse(garbage) is None, garbage


def test_restore_order_and_the_run_rule(tmp_path: Path) -> None:
    d = fake_sysfs(tmp_path, run="1", pages_to_scan="5", advisor_mode="scan-time",
                   max_page_sharing="2")
    saved = {**BOOT_KNOBS, "run": "0"}
    assert restore_knobs(saved, unmerge=False, end_stopped_as_unmerged=True, directory=str(d)) == []
    # run read 1, so the restore un-merged first; found run=0 -> left at 2.
    assert linux_knobs.read_knobs(str(d)) == {**saved, "run": "2"}
    d2 = fake_sysfs(tmp_path / "b", pages_to_scan="5")
    assert restore_knobs({**BOOT_KNOBS, "advisor_mode": "scan-time", "pages_to_scan": "77"},
                         unmerge=False, end_stopped_as_unmerged=True, directory=str(d2)) == []
    got = linux_knobs.read_knobs(str(d2))
    # Under scan-time the kernel refuses pages_to_scan writes: the restore leaves it.
    assert got["advisor_mode"] == "scan-time" and got["pages_to_scan"] == "5"
    assert got["run"] == "0"  # never ran, never un-merged: run exactly as saved


def test_repair_reports_failures_and_changes(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    d = fake_sysfs(tmp_path, pages_to_scan="1234", sleep_millisecs="3")
    note = SessionNote(99, "python3 dead.py", "2026-11-30T10:00:00", dict(BOOT_KNOBS), ran=False)
    real_write = linux_knobs.write_knob

    def refuse_sleep(name: str, value: str, directory: str = str(d)) -> None:
        if name == "sleep_millisecs":
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))
        real_write(name, value, directory)

    monkeypatch.setattr(linux_knobs, "write_knob", refuse_sleep)
    r = repair_dead_session(note, str(d))
    assert r.changed == {"pages_to_scan": ("1234", BOOT_KNOBS["pages_to_scan"])}
    assert [(f.name, f.value) for f in r.failures] == [("sleep_millisecs", "20")]
    assert "could not restore sleep_millisecs='20'" in r.message()
    assert "ksmlab doctor --repair" in r.message()


def test_diagnose_and_repair_on_fake_host(tmp_path: Path) -> None:
    d = fake_sysfs(tmp_path, pages_to_scan="1234", use_zero_pages="1")
    lock = tmp_path / "ksmlab.lock"
    proc = tmp_path / "proc"
    (proc / "42").mkdir(parents=True)
    (proc / "42" / "ksm_stat").write_text(
        "ksm_rmap_items 8\nksm_zero_pages 0\nksm_merging_pages 6\nksm_process_profit 1\n"
        "ksm_merge_any: yes\nksm_mergeable: yes\n")
    saved = {**BOOT_KNOBS, "use_zero_pages": "1"}  # the host's own choice, kept
    lock.write_text(SessionNote(5, "dead", "then", saved, ran=True).to_text() + "\n")
    diag = linux_doctor.diagnose(sysfs_dir=str(d), lock_path=str(lock), proc=str(proc))
    assert diag.needs_repair and diag.stale is not None and diag.stale.pid == 5
    assert diag.to_repair == {"pages_to_scan": ("1234", BOOT_KNOBS["pages_to_scan"])}
    assert set(diag.non_default) == {"pages_to_scan", "use_zero_pages"}
    assert [(p.pid, p.merging_pages, p.merge_any) for p in diag.processes] == [(42, 6, True)]
    r = linux_doctor.repair(lock_path=str(lock), sysfs_dir=str(d))
    assert r is not None and not r.failures
    assert lock.read_text() == ""
    assert linux_knobs.read_knobs(str(d)) == {**saved, "run": "2"}  # it ran: un-merged
    assert linux_doctor.repair(lock_path=str(lock), sysfs_dir=str(d)) is None
    again = linux_doctor.diagnose(sysfs_dir=str(d), lock_path=str(lock), proc=str(proc))
    assert not again.needs_repair and again.stale is None


def test_doctor_without_ksm_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--sysfs-dir", str(tmp_path / "nothing")]) == 3
    err = capsys.readouterr().err.strip()
    assert "without CONFIG_KSM" in err and "\n" not in err


@pytest.mark.linux
def test_a_scenario_on_the_kernel_starts_from_boot_knobs_not_the_hosts(tmp_path: Path) -> None:
    """A knob the host's owner set does not leak into a scenario run, and comes back after it."""
    skip_unless_ksm_usable()
    scenario = tmp_path / "s.toml"
    scenario.write_text(
        '[scenario]\nname = "boot knobs"\n[ksm]\nsleep_millisecs = 0\n'
        '[content.same]\nkind = "image"\npages = 16\n'
        '[[process]]\nname = "p"\ncount = 2\n'
        '[[process.mapping]]\nname = "buf"\npages = 16\ncontent = "same"\n'
        '[[checkpoint]]\nname = "merged"\nfull_scans = 2\ntimeout = "30s"\n')
    before = read_knobs_locked()
    owners = "3" if before["max_page_sharing"] != "3" else "4"
    with ksmlab_lock():  # the host's owner sets a knob (no ksmd runs, so no EBUSY)
        (KSM / "max_page_sharing").write_text(owners)
    try:
        p = subprocess.run([sys.executable, "-m", "ksmlab", "run", str(scenario), "--backend",
                            "linux", "--json"], capture_output=True, text=True, timeout=120,
                           check=False)
        assert p.returncode == 0, p.stderr
        knobs = json.loads(p.stdout)["knobs"]
        assert str(knobs["max_page_sharing"]) == BOOT_KNOBS["max_page_sharing"]
        assert str(knobs["sleep_millisecs"]) == "0"  # what the scenario gave
        with ksmlab_lock():
            assert read_knobs() == after_session({**before, "max_page_sharing": owners},
                                                 merged=True)
    finally:
        with ksmlab_lock():
            if (KSM / "max_page_sharing").read_text().strip() != before["max_page_sharing"]:
                (KSM / "max_page_sharing").write_text(before["max_page_sharing"])
