# SPDX-License-Identifier: GPL-2.0-only
"""``ksmlab snapshot`` on processes these tests build, and reading snapshot files.

Expected fingerprints are XXH3-128 of the bytes the workload wrote
(``tests/snapshot_workload.py``), computed here with xxhash directly, not with
ksmlab; page states (present, zero page, shared PFNs, THP) follow from what
the workload did and are cross-checked against the kernel's own smaps and
pagemap, read here independently of the code under test.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xxhash

from ksmlab.snapshot import (
    CaptureProgress,
    ProcessGoneError,
    Selection,
    capture_snapshot,
    read_snapshot,
)
from snapshot_workload import PAGE, REGION_PAGES, THP_PAGES, parent_pattern, pattern

WORKLOAD = str(Path(__file__).with_name("snapshot_workload.py"))
HAVE_PAGEMAP = os.path.exists("/proc/self/pagemap")
ROOT = os.geteuid() == 0

def fp(data: bytes) -> bytes:
    """The fingerprint the format documents: XXH3-128, canonical digest."""
    return xxhash.xxh3_128_digest(data)


ZERO_FP = fp(bytes(PAGE))


class Workload:
    """A running snapshot_workload.py: the parent, its forked child, their addresses."""

    def __init__(self, *args: str, user: int | None = None) -> None:
        kwargs: dict[str, Any] = {"user": user, "group": user} if user is not None else {}
        self.proc = subprocess.Popen([sys.executable, WORKLOAD, *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, **kwargs)
        assert self.proc.stdout is not None
        info = json.loads(self.proc.stdout.readline())
        self.pid: int = info["pid"]
        self.child: int = info["child"]
        self.region: int = info["region"]
        self.thp: int | None = info.get("thp")

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture
def workload() -> Iterator[Workload]:
    w = Workload()
    yield w
    w.close()


def region_rows(snap: Any, pid: int, start: int, pages: int) -> np.ndarray[Any, Any]:
    """Indices of *pid*'s rows inside [start, start + pages pages)."""
    p = snap.pages
    sel = (p.pid == pid) & (p.addr >= start) & (p.addr < start + pages * PAGE)
    return np.flatnonzero(sel)


def pagemap(pid: int, start: int, pages: int) -> list[int]:
    """The raw pagemap entries, read here without ksmlab."""
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        f.seek(start // PAGE * 8)
        return [e for (e,) in struct.iter_unpack("<Q", f.read(8 * pages))]


def rss_kb(pid: int) -> int:
    text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    return sum(int(line.split()[1]) for line in text.splitlines() if line.startswith("Rss:"))


# --- capture ---------------------------------------------------------------------------------

@pytest.mark.linux
@pytest.mark.skipif(not HAVE_PAGEMAP, reason="no /proc/PID/pagemap: not Linux")
def test_fingerprints_and_duplicates_are_what_was_written(tmp_path: Path,
                                                          workload: Workload) -> None:
    """Each page's fingerprint is BLAKE2b-128 of what the workload wrote; absent pages have no row."""
    out = tmp_path / "s.parquet"
    s = capture_snapshot(str(out), Selection(pids=(workload.pid, workload.child)),
                         policy="merge-any")
    assert s.processes == 2 and s.gone == 0 and s.raced == 0
    snap = read_snapshot(out)
    assert [p.pid for p in snap.processes] == sorted([workload.pid, workload.child])
    expect_parent = ([parent_pattern(i) for i in range(5)] + [pattern(i % 10) for i in range(5, 30)]
                     + [bytes(PAGE)] * 8)
    expect_child = [pattern(i % 10) for i in range(30)] + [bytes(PAGE)] * 8
    for pid, expect in ((workload.pid, expect_parent), (workload.child, expect_child)):
        rows = region_rows(snap, pid, workload.region, REGION_PAGES)
        # pages 38.. were never touched: no row
        assert snap.pages.addr[rows].tolist() == [workload.region + i * PAGE for i in range(38)]
        assert snap.pages.present[rows].all() and snap.pages.hashed[rows].all()
        got = [bytes(r) for r in snap.pages.fingerprint[rows]]
        assert got == [fp(b) for b in expect]
        # duplicate counts: ten classes (three pages each in the child; the parent
        # rewrote pages 0..4), and 8 zero pages
        counts = Counter(got)
        assert counts[ZERO_FP] == 8
        assert sorted(counts.values()) == sorted(Counter(fp(b) for b in expect).values())
    parent = {p.pid: p for p in snap.processes}[workload.pid]
    assert parent.state == "captured" and parent.comm.startswith("python")
    assert parent.uid == os.geteuid()
    assert snap.policy == "merge-any" and snap.page_size == PAGE
    assert any(v.start <= workload.region < v.end for v in parent.vmas)


@pytest.mark.linux
@pytest.mark.skipif(not HAVE_PAGEMAP, reason="no /proc/PID/pagemap: not Linux")
@pytest.mark.skipif(not ROOT, reason="PFNs and kpageflags need root")
def test_fork_shared_pages_have_one_pfn_and_the_zero_page_is_recognised(
        tmp_path: Path, workload: Workload) -> None:
    """Pages the fork left shared show one PFN in both processes; COW-broken ones do not."""
    out = tmp_path / "s.parquet"
    capture_snapshot(str(out), Selection(pids=(workload.pid, workload.child)), policy="merge-any")
    snap = read_snapshot(out)
    p = snap.pages
    par = region_rows(snap, workload.pid, workload.region, REGION_PAGES)
    chi = region_rows(snap, workload.child, workload.region, REGION_PAGES)
    assert (p.pfn[par] != 0).all() and (p.pfn[chi] != 0).all()
    # 0..4: rewritten by the parent after the fork: own pages on both sides
    assert (p.pfn[par[:5]] != p.pfn[chi[:5]]).all()
    assert p.exclusive[par[:5]].all() and p.exclusive[chi[:5]].all()
    # 5..33: still shared with the child: one physical page each
    assert (p.pfn[par[5:34]] == p.pfn[chi[5:34]]).all()
    assert not p.exclusive[par[5:34]].any()
    # 34..37: read only, so the shared zero page, known without reading it
    assert p.zero_page[par[34:38]].all() and not p.zero_page[par[:34]].any()
    assert len(set(p.pfn[par[34:38]].tolist())) == 1
    assert not p.ksm[par].any() and not p.file[par].any()
    # the pfns agree with the kernel's pagemap, read here
    raw = pagemap(workload.pid, workload.region, 38)
    assert p.pfn[par].tolist() == [e & ((1 << 55) - 1) for e in raw]


@pytest.mark.linux
@pytest.mark.skipif(not HAVE_PAGEMAP, reason="no /proc/PID/pagemap: not Linux")
@pytest.mark.skipif(not ROOT, reason="kpageflags needs root")
def test_thp_pages_are_flagged(tmp_path: Path) -> None:
    """A MADV_HUGEPAGE region backed by a huge page has thp set on its 512 pages (consecutive PFNs)."""
    w = Workload("--thp")
    try:
        assert w.thp is not None
        smaps = Path(f"/proc/{w.pid}/smaps").read_text()
        huge_kb = sum(int(ln.split()[1]) for ln in smaps.splitlines()
                      if ln.startswith("AnonHugePages:"))
        if huge_kb < THP_PAGES * PAGE // 1024:
            pytest.skip("the kernel gave no transparent huge page here (THP off or no free 2 MiB)")
        out = tmp_path / "s.parquet"
        capture_snapshot(str(out), Selection(pids=(w.pid,)), policy="merge-any")
        snap = read_snapshot(out)
        rows = region_rows(snap, w.pid, w.thp, THP_PAGES)
        assert rows.size == THP_PAGES
        assert snap.pages.thp[rows].all()
        pfns = snap.pages.pfn[rows].astype(np.int64)
        assert (np.diff(pfns) == 1).all()
        assert [bytes(x) for x in snap.pages.fingerprint[rows[:4]]] == [
            fp(pattern(100 + i)) for i in range(4)]
        assert not snap.pages.thp[region_rows(snap, w.pid, w.region, REGION_PAGES)].any()
    finally:
        w.close()


@pytest.mark.linux
@pytest.mark.skipif(not HAVE_PAGEMAP, reason="no /proc/PID/pagemap: not Linux")
def test_capture_leaves_the_target_unchanged(tmp_path: Path, workload: Workload) -> None:
    """Resident size and every pagemap present bit are the same before and after a capture."""
    pids = (workload.pid, workload.child)
    present = 1 << 63

    def state() -> tuple[list[int], list[list[int]]]:
        return ([rss_kb(p) for p in pids],
                [[e & present for e in pagemap(p, workload.region, REGION_PAGES)] for p in pids])

    # The workload printed its addresses just before blocking on stdin: wait
    # until it is idle (two equal readings) before comparing.
    before, deadline = state(), time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = state()
        if now == before:
            break
        before = now
    capture_snapshot(str(tmp_path / "s.parquet"), Selection(pids=pids), policy="merge-any",
                     samples=2, interval_s=0.05)
    assert state() == before
    assert before[1][0][38:] == [0] * (REGION_PAGES - 38)  # never touched, still absent


@pytest.mark.linux
@pytest.mark.skipif(not HAVE_PAGEMAP, reason="no /proc/PID/pagemap: not Linux")
def test_as_is_covers_only_mergeable_areas(tmp_path: Path, workload: Workload) -> None:
    """The workload never asked for KSM, so under as-is none of its areas is covered."""
    out = tmp_path / "s.parquet"
    s = capture_snapshot(str(out), Selection(pids=(workload.pid,)))
    snap = read_snapshot(out)
    assert s.pages == 0 and snap.processes[0].vmas == ()
    assert snap.policy == "as-is"


@pytest.mark.linux
@pytest.mark.skipif(not HAVE_PAGEMAP, reason="no /proc/PID/pagemap: not Linux")
def test_samples_count_rewrites(tmp_path: Path) -> None:
    """With 3 samples, a page rewritten before every pass has changes=2, the others 0."""
    script = tmp_path / "rewriter.py"
    script.write_text(
        "import mmap, os, sys, ctypes\n"
        "m = mmap.mmap(-1, 8 * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)\n"
        "for i in range(8): m[i*4096:(i+1)*4096] = bytes([i + 1]) * 4096\n"
        "print(ctypes.addressof(ctypes.c_char.from_buffer(m)), flush=True)\n"
        "n = 0\n"
        "for line in sys.stdin:\n"
        "    n += 1\n"
        "    m[0:4096] = bytes([100 + n % 50]) * 4096\n"
        "    print('ok', flush=True)\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        addr = int(proc.stdout.readline())
        rewritten: list[int] = []

        def before_each_pass(p: CaptureProgress) -> None:
            # The capture reports each pass's start before reading it: rewrite
            # page 0 then, before passes 2 and 3.
            if p.pass_no > 1 and p.pass_no not in rewritten:
                rewritten.append(p.pass_no)
                stdin.write("w\n")
                stdin.flush()
                assert stdout.readline() == "ok\n"

        stdin, stdout = proc.stdin, proc.stdout
        out = tmp_path / "s.parquet"
        capture_snapshot(str(out), Selection(pids=(proc.pid,)), policy="merge-any", samples=3,
                         interval_s=0.2, progress=before_each_pass)
        assert rewritten == [2, 3]
        snap = read_snapshot(out)
        rows = region_rows(snap, proc.pid, addr, 8)
        assert snap.samples == 3 and snap.interval_s == 0.2
        assert snap.pages.compared[rows].tolist() == [2] * 8
        assert snap.pages.changes[rows].tolist() == [2] + [0] * 7
        assert bytes(snap.pages.fingerprint[rows[1]]) == fp(bytes([2]) * PAGE)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.linux
@pytest.mark.skipif(not HAVE_PAGEMAP, reason="no /proc/PID/pagemap: not Linux")
def test_a_process_that_exits_during_the_capture_is_recorded_as_gone(
        tmp_path: Path, workload: Workload) -> None:
    """Killing the second target while the first is read: it is 'gone', with no rows; no error."""
    first, second = sorted([workload.pid, workload.child])
    killed = []

    def kill_second(p: CaptureProgress) -> None:
        if p.pid == first and not killed:
            os.kill(second, signal.SIGKILL)
            killed.append(second)

    out = tmp_path / "s.parquet"
    s = capture_snapshot(str(out), Selection(pids=(first, second)), policy="merge-any",
                         progress=kill_second)
    assert killed and s.gone == 1 and second in s.gone_pids
    snap = read_snapshot(out)
    states = {p.pid: p.state for p in snap.processes}
    assert states == {first: "captured", second: "gone"}
    assert (snap.pages.pid == first).any() and not (snap.pages.pid == second).any()


@pytest.mark.linux
@pytest.mark.skipif(not HAVE_PAGEMAP, reason="no /proc/PID/pagemap: not Linux")
def test_an_interrupted_capture_leaves_no_file(tmp_path: Path, workload: Workload) -> None:
    """Ctrl-C in the middle (here: from the progress callback): no output, no temporary file."""
    def interrupt(p: CaptureProgress) -> None:
        if p.bytes_done:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        capture_snapshot(str(tmp_path / "s.parquet"), Selection(pids=(workload.pid,)),
                         policy="merge-any", progress=interrupt)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.linux
@pytest.mark.skipif(not HAVE_PAGEMAP, reason="no /proc/PID/pagemap: not Linux")
def test_unknown_pid_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # a pid that existed and is gone now
    out = tmp_path / "s.parquet"
    with pytest.raises(ProcessGoneError) as e:
        capture_snapshot(str(out), Selection(pids=(proc.pid,)))
    assert e.value.errno == errno.ESRCH
    assert str(proc.pid) in str(e.value) and "no such process" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments_name_the_argument(tmp_path: Path) -> None:
    out = str(tmp_path / "s.parquet")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"policy": "all"}, "policy: expected one of as-is, merge-any, got 'all'"),
        ({"samples": 0}, "samples: expected an integer from 1 to 65535, got 0"),
        ({"samples": 2, "interval_s": 0.0}, "interval_s: expected > 0 with 2 samples, got 0.0"),
        ({"interval_s": -1.0}, "interval_s: expected a finite number of seconds >= 0, got -1.0"),
    ]
    for kwargs, msg in cases:
        with pytest.raises(ValueError) as e:
            capture_snapshot(out, Selection(pids=(1,)), **kwargs)
        assert str(e.value) == msg
    with pytest.raises(ValueError, match="expected at least one of pids, uids, cgroups or all"):
        capture_snapshot(out, Selection())
    with pytest.raises(ValueError, match="pid: expected a process id > 0, got -3"):
        capture_snapshot(out, Selection(pids=(-3,)))
    assert list(tmp_path.iterdir()) == []


# --- the command line -----------------------------------------------------------------------

def run_cli(*args: str, cwd: Path, user: int | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m ksmlab snapshot ...`` in a subprocess (this tree's ksmlab)."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(os.environ, PYTHONPATH=src)
    kwargs: dict[str, Any] = {}
    if user is not None:
        kwargs = {"user": user, "group": user}
        env["HOME"] = str(cwd)
    return subprocess.run([sys.executable, "-m", "ksmlab", "snapshot", *args], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=300, check=False,
                          **kwargs)


NOBODY = 65534


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    """A directory uid 65534 can reach and write (pytest's tmp_path is under a 0700 directory)."""
    d = Path(tempfile.mkdtemp(prefix="ksmlab-snapshot-test-"))
    d.chmod(0o777)
    yield d
    shutil.rmtree(d)


def run_cli_as_nobody(args: list[str], cwd: Path,
                      before: Any = None) -> tuple[int, str, Any]:
    """``ksmlab snapshot ARGS`` in a forked child that dropped to uid/gid 65534.

    In-process (``cli.main``), because this interpreter may live where an
    unprivileged user cannot run it (e.g. under /root); everything the
    command imports is imported before the fork.  *before*, if given, runs in
    the child after dropping privileges; what it returns comes back as the
    third value.  Returns (exit code, stderr, before's value).
    """
    import pickle

    import pyarrow.parquet  # noqa: F401  (imported before the fork)
    import rich.progress  # noqa: F401

    from ksmlab import cli
    from ksmlab.backends import linux_knobs  # noqa: F401
    from ksmlab.scenario import host  # noqa: F401
    from ksmlab.snapshot import command  # noqa: F401

    err_path = cwd / "stderr.txt"
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 99
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            # A process that changed its uid is not dumpable, so even its own
            # user could not read it; a normal user's processes are.
            import ctypes

            ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE
            os.chdir(cwd)
            extra = before() if before is not None else None
            fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            os.dup2(fd, 2)
            sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
            code = cli.main(["snapshot", *args])
            sys.stderr.flush()
            reply = pickle.dumps((code, extra))
        except BaseException:
            import traceback

            reply = pickle.dumps((None, traceback.format_exc()))
        try:
            os.write(w, struct.pack("<I", len(reply)) + reply)
        finally:
            os._exit(code)
    os.close(w)
    # Length-prefixed: a process the child forked may hold the pipe open.
    data = b""
    while len(data) < 4 or len(data) < 4 + struct.unpack("<I", data[:4])[0]:
        chunk = os.read(r, 65536)
        if not chunk:
            break
        data += chunk
    os.close(r)
    data = data[4:]
    os.waitpid(pid, 0)
    code, extra = pickle.loads(data) if data else (None, None)
    err = err_path.read_text() if err_path.exists() else ""
    err_path.unlink(missing_ok=True)
    return code, err, extra


@pytest.mark.linux
@pytest.mark.skipif(not HAVE_PAGEMAP, reason="no /proc/PID/pagemap: not Linux")
def test_cli_writes_a_snapshot_and_reports(tmp_path: Path, workload: Workload) -> None:
    p = run_cli("--pid", str(workload.pid), "--pid", str(workload.child), "--policy", "merge-any",
                "-o", "s.parquet", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("wrote s.parquet: 2 processes, ")
    assert "bytes per page" in p.stdout
    snap = read_snapshot(tmp_path / "s.parquet")
    assert len(region_rows(snap, workload.pid, workload.region, REGION_PAGES)) == 38


@pytest.mark.linux
@pytest.mark.skipif(not HAVE_PAGEMAP, reason="no /proc/PID/pagemap: not Linux")
def test_cli_bad_input_exits_2(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    cases = [
        (["--pid", str(gone.pid), "-o", "s.parquet"], f"ksmlab snapshot: pid {gone.pid}: no such process"),
        (["-o", "s.parquet"], "ksmlab snapshot: expected at least one of --pid, --cgroup, --uid or "
                              "--all (see ksmlab snapshot --help)"),
        (["--pid", "1", "--samples", "3", "-o", "s.parquet"],
         "ksmlab snapshot: --samples 3 needs --interval DUR"),
        (["--pid", "1", "--interval", "1s", "-o", "s.parquet"],
         "ksmlab snapshot: --interval applies with --samples N above 1 only"),
        (["--pid", "1", "--samples", "2", "--interval", "0", "-o", "s.parquet"],
         "ksmlab snapshot: argument --interval: expected a duration > 0, got '0' "
         "(see ksmlab snapshot --help)"),
        (["--pid", "0", "-o", "s.parquet"],
         "ksmlab snapshot: argument --pid: expected a process id > 0, got '0' "
         "(see ksmlab snapshot --help)"),
        (["--pid", "1", "-o", "nodir/s.parquet"],
         "ksmlab: --output: expected a file in an existing writable directory, got 'nodir/s.parquet'"),
    ]
    for args, msg in cases:
        p = run_cli(*args, cwd=tmp_path)
        assert p.returncode == 2, (args, p.stderr)
        assert p.stderr.strip() == msg
    assert list(tmp_path.iterdir()) == []


@pytest.mark.linux
@pytest.mark.skipif(not HAVE_PAGEMAP, reason="no /proc/PID/pagemap: not Linux")
@pytest.mark.skipif(not ROOT, reason="needs root to become another user")
def test_cli_refuses_another_users_process_naming_pid_and_privilege(
        nobody_dir: Path, workload: Workload) -> None:
    """As uid 65534, a root process cannot be read: exit 2, the pid and CAP_SYS_PTRACE named."""
    tmp_path = nobody_dir
    code, err, extra = run_cli_as_nobody(["--pid", str(workload.pid), "-o", "s.parquet"], tmp_path)
    assert code == 2, extra
    err = err.strip()
    assert "\n" not in err
    assert err.startswith(f"ksmlab snapshot: pid {workload.pid} (python")
    assert f"permission denied reading /proc/{workload.pid}/" in err
    assert f"belongs to uid 0 and you are uid {NOBODY}" in err and "CAP_SYS_PTRACE" in err
    assert list(tmp_path.iterdir()) == []


def _own_workload() -> tuple[int, int]:
    """In the unprivileged child: fork a process with 8 known pages; return (pid, address)."""
    import ctypes
    import mmap

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the grandchild
        m = mmap.mmap(-1, 8 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        for i in range(8):
            m[i * PAGE:(i + 1) * PAGE] = pattern(i)
        os.write(w, struct.pack("<Q", ctypes.addressof(ctypes.c_char.from_buffer(m))))
        signal.pause()
        os._exit(0)
    (addr,) = struct.unpack("<Q", os.read(r, 8))
    return pid, addr


@pytest.mark.linux
@pytest.mark.skipif(not HAVE_PAGEMAP, reason="no /proc/PID/pagemap: not Linux")
@pytest.mark.skipif(not ROOT, reason="needs root to become another user")
def test_cli_unprivileged_own_process_has_fingerprints_without_pfns(nobody_dir: Path) -> None:
    """An unprivileged user captures their own process: fingerprints yes, PFNs and flags null."""
    tmp_path = nobody_dir
    target: list[tuple[int, int]] = []

    def start() -> tuple[int, int]:
        pid, addr = _own_workload()
        return pid, addr

    # The target's pid is only known in the child: capture "the child's own
    # grandchild" by letting the child pick it through --uid (its only process).
    code, err, extra = run_cli_as_nobody(["--uid", str(NOBODY), "--policy", "merge-any",
                                          "-o", "s.parquet"], tmp_path, before=start)
    target.append(extra)
    pid, addr = target[0]
    try:
        assert code == 0, err
        assert "note: without root (CAP_SYS_ADMIN) pagemap shows no PFNs" in err
        import pyarrow.parquet as pq

        t = pq.read_table(tmp_path / "s.parquet")
        assert t.column("pfn").null_count == t.num_rows
        assert t.column("thp").null_count == t.num_rows
        snap = read_snapshot(tmp_path / "s.parquet")
        assert snap.meta["privileges"] == {"pfn": False, "kpageflags": False}
        assert [p.pid for p in snap.processes] == [pid], (snap.processes, snap.meta["unreadable"])
        rows = region_rows(snap, pid, addr, 8)
        assert [bytes(x) for x in snap.pages.fingerprint[rows]] == [fp(pattern(i)) for i in range(8)]
    finally:
        os.kill(pid, signal.SIGKILL)


def test_snapshot_help_lists_every_option() -> None:
    from ksmlab.cli import build_parser

    text = build_parser().parse_known_args(["snapshot", "-o", "x"])[0]
    assert text.command == "snapshot"
    p = subprocess.run([sys.executable, "-m", "ksmlab", "snapshot", "--help"], capture_output=True,
                       text=True, check=True,
                       env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src")))
    for opt in ("--pid", "--cgroup", "--uid", "--all", "--samples", "--interval", "--policy",
                "--output", "--progress", "exit codes:"):
        assert opt in p.stdout


# --- against the real KSM (through LinuxKernel, which holds the lock and restores the knobs) ---

@pytest.mark.linux
def test_as_is_covers_madvised_areas_and_merged_pages_show_as_ksm(tmp_path: Path) -> None:
    """A helper's madvised area is captured under as-is, its other area not; once ksmd merged
    the 8 identical pages they show ksm=True and one PFN, with the same fingerprints, and stay
    merged; the knobs in the metadata are the host's at capture, and the capture changed none."""
    from ksmlab import MADV_MERGEABLE
    from linux_support import BOOT_KNOBS, read_knobs, session_at_boot_knobs, skip_unless_ksm_usable

    skip_unless_ksm_usable()
    with session_at_boot_knobs(pages_to_scan="100", sleep_millisecs="0") as k:
        p = k.spawn()
        a = p.mmap(16 * PAGE)
        contents = [pattern(1)] * 8 + [pattern(10 + i) for i in range(8)]
        p.write(a, b"".join(contents))
        b = p.mmap(4 * PAGE)
        p.write(b, pattern(1) * 4)
        p.madvise(a, 16 * PAGE, MADV_MERGEABLE)
        before = read_knobs()
        out = tmp_path / "before.parquet"
        capture_snapshot(str(out), Selection(pids=(p.pid,)))
        assert read_knobs() == before
        snap = read_snapshot(out)
        assert snap.ksm_knobs is not None
        assert snap.ksm_knobs["pages_to_scan"] == "100" and snap.ksm_knobs["run"] == BOOT_KNOBS["run"]
        rows = np.arange(len(snap.pages))
        assert snap.pages.addr.tolist() == [a + i * PAGE for i in range(16)]  # b is not covered
        assert (snap.processes[0].vmas[0].start, snap.processes[0].vmas[0].end) == (a, a + 16 * PAGE)
        assert [bytes(x) for x in snap.pages.fingerprint[rows]] == [fp(c) for c in contents]
        assert not snap.pages.ksm.any()
        k.sysfs["run"] = "1"
        k.wait_full_scans(2)
        k.sysfs["run"] = "0"
        merged = p.pfns(a, 8 * PAGE)
        out2 = tmp_path / "after.parquet"
        capture_snapshot(str(out2), Selection(pids=(p.pid,)))
        # reading the KSM pages un-shared none of them (no pin, no COW)
        assert p.pfns(a, 8 * PAGE) == merged and len(set(merged)) == 1
        assert p.ksm_stat()["ksm_merging_pages"] == 8
        after = read_snapshot(out2)
        assert after.pages.ksm.tolist() == [True] * 8 + [False] * 8
        assert len(set(after.pages.pfn[:8].tolist())) == 1
        assert [bytes(x) for x in after.pages.fingerprint] == [fp(c) for c in contents]
        assert after.processes[0].ksm_stat is not None
        assert after.processes[0].ksm_stat["ksm_merging_pages"] == 8
