"""Tests of :mod:`ksmlab.backends.linux` against the real kernel.

Every expected figure comes from ``docs/kernel-behaviour.md`` (its
[verified] facts; the section is named next to each check) or from
arithmetic, never from a previous run of this code.  KSM is global to the
machine: every test that touches it runs inside a :class:`LinuxKernel`, which
holds the ksmlab lock and restores the knobs.  Where KSM cannot be driven
(not root, no CONFIG_KSM, read-only sysfs) the tests are skipped with the
reason from :func:`linux_ksm_unavailable_reason`.
"""

from __future__ import annotations

import errno
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ksmlab.api import Kernel, Process
from ksmlab.backends.linux import (
    KsmLockTimeoutError,
    KsmUnavailableError,
    LinuxKernel,
    linux_ksm_unavailable_reason,
    parse_ksm_stat,
    parse_maps,
    parse_smaps,
)
from ksmlab.constants import (
    MADV_MERGEABLE,
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    MAP_SHARED,
    PAGE_SIZE,
    PR_GET_MEMORY_MERGE,
    PR_SET_MEMORY_MERGE,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
)
from ksmlab.errors import KsmSimError, ProcessExitedError, ScanStalledError
from linux_support import (
    KSM,
    after_session,
    ksmlab_lock,
    read_knobs,
    read_knobs_locked,
    run_python,
    session_at_boot_knobs,
    skip_unless_ksm_usable,
    wait_gone,
)

pytestmark = pytest.mark.linux

P = PAGE_SIZE


# --- fixtures and helpers ------------------------------------------------------------


@pytest.fixture
def ksm_usable() -> None:
    """Skip (with the reason) where KSM cannot be driven or the helper cannot be built."""
    skip_unless_ksm_usable()


@pytest.fixture
def kernel(ksm_usable: None) -> Iterator[LinuxKernel]:
    """A LinuxKernel at the kernel's boot knobs for one test, closed (knobs restored) afterwards."""
    with session_at_boot_knobs() as k:
        yield k


def errno_of(exc: pytest.ExceptionInfo[OSError]) -> str:
    """The errno name of a caught OSError, for readable assertion messages."""
    return errno.errorcode[exc.value.errno]


def merge_identical_pages(k: LinuxKernel, p: Process, n: int, fill: bytes = b"*") -> int:
    """The selftest's ``ksm_tests -M``: n identical pages, madvised, two full scans."""
    a = p.mmap(n * P)
    p.write(a, fill * (n * P))
    p.madvise(a, n * P, MADV_MERGEABLE)
    k.sysfs["pages_to_scan"] = "100"
    k.sysfs["sleep_millisecs"] = "0"
    k.sysfs["run"] = "1"
    k.wait_full_scans(2)
    return a


# --- pure parsers (no kernel needed) -------------------------------------------------

SMAPS_SAMPLE = (
    "7f0000000000-7f000000a000 rw-p 00000000 00:00 0 \n"  # the kernel pads with a space
) + """\
Size:                 40 kB
Rss:                  40 kB
Anonymous:            36 kB
KSM:                  32 kB
VmFlags: rd wr mr mw me ac mg
7f000000a000-7f000000b000 r--s 00001000 08:01 1234                       /tmp/x y
Size:                  4 kB
Rss:                   0 kB
Anonymous:             0 kB
VmFlags: rd mr me ms
"""


def test_parse_smaps_converts_kb_to_bytes() -> None:
    a, b = parse_smaps(SMAPS_SAMPLE)
    assert (a.start, a.end, a.perms) == (0x7F0000000000, 0x7F000000A000, "rw-p")
    assert (a.rss, a.anonymous, a.ksm) == (40 * 1024, 36 * 1024, 32 * 1024)
    assert a.vm_flags == ("rd", "wr", "mr", "mw", "me", "ac", "mg") and a.mergeable
    assert (b.perms, b.ksm, b.mergeable) == ("r--s", 0, False)  # no KSM: line -> 0


def test_parse_ksm_stat_and_maps() -> None:
    text = ("ksm_rmap_items 4\nksm_zero_pages 0\nksm_merging_pages 2\n"
            "ksm_process_profit 7936\nksm_merge_any: no\nksm_mergeable: yes\n")
    assert parse_ksm_stat(text) == {
        "ksm_rmap_items": 4, "ksm_zero_pages": 0, "ksm_merging_pages": 2,
        "ksm_process_profit": 2 * 4096 - 4 * 64,  # spec section 4: 7936
        "ksm_merge_any": False, "ksm_mergeable": True}
    (m,) = parse_maps("00400000-00401000 r-xp 00000000 08:01 7 /bin/x\n")
    assert (m.start, m.end, m.perms) == (0x400000, 0x401000, "r-xp")


def test_unavailable_error_is_a_ksmlab_runtime_error() -> None:
    assert issubclass(KsmUnavailableError, KsmSimError)
    assert issubclass(KsmUnavailableError, RuntimeError)


# --- construction and availability ---------------------------------------------------


def test_satisfies_the_api_protocols(kernel: LinuxKernel) -> None:
    assert linux_ksm_unavailable_reason() is None
    assert isinstance(kernel, Kernel)
    p = kernel.spawn()
    assert isinstance(p, Process)
    assert os.path.exists(f"/proc/{p.pid}")


def test_non_root_gets_one_clear_sentence(ksm_usable: None) -> None:
    """Not root: construction raises KsmUnavailableError, one sentence naming root."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            os.close(rfd)
            os.setgid(65534)
            os.setuid(65534)  # nobody
            try:
                LinuxKernel(lock_path="/tmp/ksmlab-test-nobody.lock")
                msg = "CONSTRUCTED"
            except KsmUnavailableError as e:
                msg = f"UNAVAILABLE {e} | {linux_ksm_unavailable_reason()}"
            except BaseException as e:
                msg = f"OTHER {e!r}"
            os.write(wfd, msg.encode())
        finally:
            os._exit(0)
    os.close(wfd)
    with os.fdopen(rfd) as f:
        out = f.read()
    os.waitpid(pid, 0)
    assert out.startswith("UNAVAILABLE"), out
    sentence, reason = out.removeprefix("UNAVAILABLE ").split(" | ")
    assert sentence == reason and "root" in sentence
    assert sentence.count(". ") == 0 and sentence.endswith(".")


# --- sysfs ---------------------------------------------------------------------------


def test_sysfs_reads_writes_iterates(kernel: LinuxKernel) -> None:
    names = list(kernel.sysfs)
    for name in ("run", "pages_to_scan", "pages_shared", "full_scans", "advisor_mode"):
        assert name in names and name in kernel.sysfs
    assert "no_such_knob" not in kernel.sysfs
    kernel.sysfs["pages_to_scan"] = "1000"
    assert kernel.sysfs["pages_to_scan"] == "1000"  # no trailing newline
    assert (KSM / "pages_to_scan").read_text() == "1000\n"
    kernel.sysfs["pages_to_scan"] = "+5"  # spec 5: kstrtouint accepts a leading +
    assert kernel.sysfs["pages_to_scan"] == "5"
    with pytest.raises(KeyError, match="no_such_knob"):
        kernel.sysfs["no_such_knob"]
    with pytest.raises(KeyError, match="no_such_knob"):
        kernel.sysfs["no_such_knob"] = "1"


@pytest.mark.parametrize(("name", "value", "err"), [
    ("run", "3", errno.EINVAL),                      # spec 5 [verified]
    ("run", "-1", errno.EINVAL),                     # spec 5 [verified]
    ("pages_shared", "1", errno.EACCES),             # spec 4: read-only, EACCES even for root
    ("full_scans", "0", errno.EACCES),
    ("sleep_millisecs", " 5", errno.EINVAL),         # spec 5: leading space
    ("pages_to_scan", "0x1", errno.EINVAL),          # spec 5
    ("max_page_sharing", "1", errno.EINVAL),         # spec 5: < 2
    ("max_page_sharing", "2147483648", errno.ERANGE),  # spec 5: > INT_MAX
    ("advisor_mode", "sometimes", errno.EINVAL),     # spec 5
    ("smart_scan", "2", errno.EINVAL),               # spec 5: kstrtobool
    ("advisor_target_scan_time", "0", errno.EINVAL),  # spec 5
])
def test_refused_sysfs_write_gives_kernel_errno_and_changes_nothing(
        kernel: LinuxKernel, name: str, value: str, err: int) -> None:
    before = read_knobs()
    old = kernel.sysfs[name]
    with pytest.raises(OSError) as exc:
        kernel.sysfs[name] = value
    assert exc.value.errno == err, errno_of(exc)
    assert read_knobs() == before
    if name not in ("pages_shared", "full_scans"):  # counters may move if ksmd runs
        assert kernel.sysfs[name] == old


def test_advisor_mode_resets_and_locks_pages_to_scan(kernel: LinuxKernel) -> None:
    kernel.sysfs["advisor_mode"] = "scan-time"
    # spec 3.11 [verified]: switching to scan-time sets pages_to_scan = advisor_min_pages_to_scan
    assert kernel.sysfs["pages_to_scan"] == kernel.sysfs["advisor_min_pages_to_scan"]
    with pytest.raises(OSError) as exc:
        kernel.sysfs["pages_to_scan"] = "100"  # spec 3.11/5 [verified]: EINVAL under scan-time
    assert exc.value.errno == errno.EINVAL, errno_of(exc)
    kernel.sysfs["advisor_mode"] = "none"
    assert kernel.sysfs["pages_to_scan"] == "100"  # spec 3.11: back to none -> 100


# --- knob restoration ----------------------------------------------------------------

CHANGES = {
    "sleep_millisecs": "7",
    "smart_scan": "0",
    "use_zero_pages": "1",
    "max_page_sharing": "10",
    "stable_node_chains_prune_millisecs": "999",
    "advisor_max_cpu": "33",
    "advisor_min_pages_to_scan": "600",
    "advisor_target_scan_time": "150",
}


def change_knobs(k: LinuxKernel) -> None:
    """Change many knobs, ending with the advisor on (which locks pages_to_scan)."""
    k.sysfs["pages_to_scan"] = "1234"
    for name, value in CHANGES.items():
        if name in k.sysfs:
            k.sysfs[name] = value
    k.sysfs["advisor_mode"] = "scan-time"


def test_knobs_restored_after_normal_exit(ksm_usable: None) -> None:
    before = read_knobs_locked()
    with LinuxKernel() as k:
        change_knobs(k)
        assert read_knobs() != before
    # ksmd never ran, so nothing merged and run goes back to its saved value too.
    assert read_knobs_locked() == before


def test_knobs_restored_after_exception_in_body(ksm_usable: None) -> None:
    before = read_knobs_locked()
    with pytest.raises(ZeroDivisionError), LinuxKernel() as k:
        change_knobs(k)
        p = k.spawn()
        pid = p.pid
        _ = 1 // 0
    assert read_knobs_locked() == before
    assert wait_gone(pid)  # helpers are killed on the way out
    with pytest.raises(RuntimeError, match="closed"):
        k.sysfs["sleep_millisecs"] = "5"  # no writes once the knobs are restored


def test_merge_ten_identical_pages_then_run_ends_at_2(ksm_usable: None) -> None:
    before = read_knobs_locked()
    with session_at_boot_knobs() as k:
        p = k.spawn()
        a = merge_identical_pages(k, p, 10)
        # ksm_tests -M expect(10) with max_page_sharing 256: 1 KSM page, 9 sharers
        # (spec 3.5: during scan 2 the first page goes unstable, the rest merge).
        assert k.sysfs["pages_shared"] == "1"
        assert k.sysfs["pages_sharing"] == "9"
        assert p.ksm_merging_pages() == 10  # spec 4: items in the stable tree
        stat = p.ksm_stat()
        assert stat["ksm_merging_pages"] == 10 and stat["ksm_mergeable"] is True
        assert stat["ksm_rmap_items"] == 10  # one item per scanned page
        assert stat["ksm_process_profit"] == 10 * 4096 - 10 * 64  # spec 4 formula
        pfns = p.pfns(a, 10 * P)
        assert None not in pfns and len(set(pfns)) == 1  # one physical page
        (vma,) = [e for e in p.smaps() if e.start <= a < e.end]
        assert vma.mergeable and vma.ksm == 10 * P  # spec 4: KSM: counts KSM pages mapped
        # spec 5 [verified]: these two are EBUSY while KSM pages exist.
        for name, value in (("max_page_sharing", "100"), ("merge_across_nodes", "0")):
            with pytest.raises(OSError) as exc:
                k.sysfs[name] = value
            assert exc.value.errno == errno.EBUSY, (name, errno_of(exc))
        # A write to a KSM page COWs (spec 3.10): the writer gets its own page.
        p.write(a + 3 * P + 100, b"hello")
        assert p.read(a + 3 * P + 98, 9) == b"**hello**"
        after = p.pfns(a, 10 * P)
        assert after[3] != pfns[0] and after[:3] + after[4:] == [pfns[0]] * 9
        assert p.read(a, 10 * P).count(b"*") == 10 * P - 5
        # The session set run=0 (boot value) and then ran ksmd: its close writes
        # run=2 first, which un-merges and resets every stable counter and
        # full_scans (spec 3.10 [verified]).
    with ksmlab_lock():
        if before["run"] != "1":  # else the host's ksmd is running again, for its owner
            for name in ("pages_shared", "pages_sharing", "pages_unshared", "full_scans"):
                assert (KSM / name).read_text().strip() == "0", name
        assert read_knobs() == after_session(before, merged=True)


def test_chain_with_small_max_page_sharing_and_its_restore(ksm_usable: None) -> None:
    """max_page_sharing=2, 4 identical pages: 2 KSM pages in one chain; knob restored after."""
    before = read_knobs_locked()
    with session_at_boot_knobs() as k:
        k.sysfs["max_page_sharing"] = "2"  # allowed while no KSM page exists
        p = k.spawn()
        merge_identical_pages(k, p, 4)
        # ksm_tests expect(4) with M=2: 4 mod 2 = 0 -> shared = 4 div 2 = 2, sharing = 2*(2-1).
        assert (k.sysfs["pages_shared"], k.sysfs["pages_sharing"]) == ("2", "2")
        # spec 3.6 [verified for 300 pages / M=256]: one chain holding two dups.
        assert (k.sysfs["stable_node_chains"], k.sysfs["stable_node_dups"]) == ("1", "2")
        assert p.ksm_merging_pages() == 4
    # max_page_sharing is EBUSY while KSM pages exist; the restore wrote run=2 first.
    after = read_knobs_locked()
    assert after["max_page_sharing"] == before["max_page_sharing"]
    assert after == after_session(before, merged=True)


def test_fork_child_has_no_merging_pages(kernel: LinuxKernel) -> None:
    p = kernel.spawn()
    a = merge_identical_pages(kernel, p, 10)
    assert p.ksm_merging_pages() == 10
    kernel.sysfs["run"] = "0"  # freeze: ksmd must not scan the child before we look
    c = p.fork()
    stat = c.ksm_stat()
    # spec 2.4 [verified on 6.18.44]: the child's counters are reset on fork.
    assert stat["ksm_merging_pages"] == 0 and stat["ksm_rmap_items"] == 0
    assert c.ksm_merging_pages() == 0
    assert c.pfns(a, 10 * P) == p.pfns(a, 10 * P)  # but it maps the same KSM page
    assert c.read(a, 3) == b"***"


def test_madvise_errno_rules(kernel: LinuxKernel) -> None:
    p = kernel.spawn()
    a = p.mmap(6 * P)
    with pytest.raises(OSError) as exc:
        p.madvise(a + 1, P, MADV_MERGEABLE)  # spec 1.1: unaligned start
    assert exc.value.errno == errno.EINVAL, errno_of(exc)
    with pytest.raises(OSError) as exc:
        p.madvise(a + 1, 0, MADV_MERGEABLE)  # spec 1.1: even with len 0
    assert exc.value.errno == errno.EINVAL, errno_of(exc)
    with pytest.raises(OSError) as exc:
        p.madvise(a, P, 12345)  # spec 1.1 [verified]: unknown advice
    assert exc.value.errno == errno.EINVAL, errno_of(exc)
    with pytest.raises(OSError) as exc:
        p.madvise(a, 2 ** 64 - 4096, MADV_MERGEABLE)  # spec 1.1 [verified]: start+len wraps
    assert exc.value.errno == errno.EINVAL, errno_of(exc)
    # spec 1.2 [verified]: a 2-page hole gives ENOMEM, and both pieces become mg.
    p.munmap(a + 2 * P, 2 * P)
    with pytest.raises(OSError) as exc:
        p.madvise(a, 6 * P, MADV_MERGEABLE)
    assert exc.value.errno == errno.ENOMEM, errno_of(exc)
    vmas = {(e.start, e.end): e for e in p.smaps()}
    assert vmas[(a, a + 2 * P)].mergeable
    assert vmas[(a + 4 * P, a + 6 * P)].mergeable
    assert not any(e.start < a + 4 * P and e.end > a + 2 * P for e in vmas.values())
    # spec 1.3 [verified]: MAP_SHARED is silently ignored: success, no mg.
    s = p.mmap(2 * P, flags=MAP_SHARED | MAP_ANONYMOUS)
    p.madvise(s, 2 * P, MADV_MERGEABLE)
    (vma,) = [e for e in p.smaps() if e.start <= s < e.end]
    assert not vma.mergeable and vma.perms.endswith("s")
    assert p.ksm_stat()["ksm_mergeable"] is True  # the anonymous pieces are mg


def test_prctl_merge_any_survives_fork_and_exec(kernel: LinuxKernel) -> None:
    p = kernel.spawn()
    assert p.prctl(PR_GET_MEMORY_MERGE) == 0
    with pytest.raises(OSError) as exc:
        p.prctl(PR_SET_MEMORY_MERGE, 1, 1)  # spec 2.6 [verified]: arg3 != 0
    assert exc.value.errno == errno.EINVAL, errno_of(exc)
    assert p.prctl(PR_SET_MEMORY_MERGE, 1) == 0
    assert p.prctl(PR_GET_MEMORY_MERGE) == 1
    c = p.fork()
    assert c.prctl(PR_GET_MEMORY_MERGE) == 1  # spec 2.4 [verified]: child PR_GET = 1
    c.exec()
    # spec 2.5: MERGE_ANY carried over exec; the old address space is gone.
    assert c.prctl(PR_GET_MEMORY_MERGE) == 1
    assert c.ksm_stat()["ksm_merge_any"] is True
    b = c.mmap(2 * P)
    (vma,) = [e for e in c.smaps() if e.start <= b < e.end]
    assert vma.mergeable  # spec 2.7 [verified]: new anonymous mmap is mg
    s = c.mmap(P, flags=MAP_SHARED | MAP_ANONYMOUS)
    (svma,) = [e for e in c.smaps() if e.start <= s < e.end]
    assert not svma.mergeable  # spec 2.7 [verified]: shared mappings are not
    assert p.prctl(PR_SET_MEMORY_MERGE, 0) == 0
    assert p.prctl(PR_GET_MEMORY_MERGE) == 0
    assert p.ksm_stat()["ksm_merge_any"] is False


def test_merge_any_leaves_the_helpers_own_memory_out(kernel: LinuxKernel) -> None:
    """prctl merge-any marks the caller's areas only: the helper withdraws its own (before
    any mmap: data, bss, heap, stack) with MADV_UNMERGEABLE, also in a fork child and after
    exec, so ksm_stat counts the caller's pages alone (docs/linux-backend.md)."""
    p = kernel.spawn()
    own = [(e.start, e.end) for e in p.smaps()]
    a = p.mmap(4 * P)
    p.write(a, b"x" * 2 * P + b"y" * 2 * P)  # two pairs: 2 KSM pages, 2 sharers
    assert p.prctl(PR_SET_MEMORY_MERGE, 1) == 0
    (area,) = [e for e in p.smaps() if e.start <= a < e.end]
    assert area.mergeable  # spec 2.6: existing anonymous areas are marked
    assert not [e for e in p.smaps() if e.mergeable and (e.start, e.end) != (area.start, area.end)]
    c = p.fork()
    assert [e.start for e in c.smaps() if e.mergeable] == [area.start]
    c.exec()
    assert c.prctl(PR_GET_MEMORY_MERGE) == 1
    assert not [e for e in c.smaps() if e.mergeable]  # nothing of the caller's yet
    assert own  # the helper has areas of its own to leave out
    kernel.sysfs["pages_to_scan"] = "100"
    kernel.sysfs["sleep_millisecs"] = "0"
    kernel.sysfs["run"] = "1"
    kernel.wait_full_scans(2)
    kernel.sysfs["run"] = "0"
    stat = p.ksm_stat()
    # One rmap_item per present page of the one mergeable area; pairs merge (spec 3.x).
    assert (stat["ksm_rmap_items"], stat["ksm_merging_pages"]) == (4, 4)
    assert c.ksm_stat()["ksm_rmap_items"] == 0
    assert (kernel.sysfs["pages_shared"], kernel.sysfs["pages_sharing"]) == ("2", "2")


def test_exec_gives_a_fresh_address_space(kernel: LinuxKernel) -> None:
    p = kernel.spawn()
    a = p.mmap(P)
    p.write(a, b"before exec")
    p.madvise(a, P, MADV_MERGEABLE)
    pid = p.pid
    p.exec()
    assert p.pid == pid
    with pytest.raises(OSError) as exc:
        p.read(a, 11)
    assert exc.value.errno == errno.EFAULT, errno_of(exc)
    # spec 2.5: madvised areas do not survive exec, and without MERGE_ANY nothing is mg
    assert not any(e.mergeable for e in p.smaps())
    assert p.ksm_stat()["ksm_mergeable"] is False


# --- memory access -------------------------------------------------------------------


def test_write_respects_protections_without_partial_writes(kernel: LinuxKernel) -> None:
    p = kernel.spawn()
    a = p.mmap(2 * P)
    p.mprotect(a + P, P, PROT_NONE)
    with pytest.raises(OSError) as exc:
        p.write(a + P - 4, b"12345678")  # 4 bytes writable, 4 in PROT_NONE
    assert exc.value.errno == errno.EFAULT, errno_of(exc)
    assert p.read(a + P - 4, 4) == b"\0" * 4  # nothing was written
    with pytest.raises(OSError) as exc:
        p.read(a + P, 1)
    assert exc.value.errno == errno.EFAULT, errno_of(exc)
    # force=True is ptrace-style access (/proc/PID/mem), like selftest test_prot_none
    p.write(a + P - 4, b"12345678", force=True)
    assert p.read(a + P - 4, 8, force=True) == b"12345678"
    r = p.mmap(P, PROT_READ)
    with pytest.raises(OSError) as exc:
        p.write(r, b"x")
    assert exc.value.errno == errno.EFAULT, errno_of(exc)
    p.write(r, b"x", force=True)  # COW into a read-only private page
    assert p.read(r, 2) == b"x\0"
    p.munmap(a, 2 * P)
    with pytest.raises(OSError) as exc:
        p.write(a, b"x")
    assert exc.value.errno == errno.EFAULT, errno_of(exc)
    with pytest.raises(OSError) as exc:
        p.write(a, b"x", force=True)  # /proc/PID/mem gives EIO for unmapped memory
    assert exc.value.errno == errno.EIO, errno_of(exc)


def test_forced_write_breaks_cow_on_merged_prot_none_pages(kernel: LinuxKernel) -> None:
    """The selftest test_prot_none in small: PROT_NONE pages merge; forced writes COW them."""
    p = kernel.spawn()
    n = 4
    a = p.mmap(n * P)
    p.write(a, b"\x11" * (n * P))
    p.mprotect(a, n * P, PROT_NONE)
    p.madvise(a, n * P, MADV_MERGEABLE)
    kernel.sysfs["pages_to_scan"] = "100"
    kernel.sysfs["sleep_millisecs"] = "0"
    kernel.sysfs["run"] = "1"
    kernel.wait_full_scans(2)
    kernel.sysfs["run"] = "0"
    assert p.ksm_merging_pages() == n  # spec 1.3: PROT_NONE private areas are mergeable
    p.write(a, (0).to_bytes(4, "little"), force=True)
    pfns = p.pfns(a, n * P)
    assert len(set(pfns[1:])) == 1 and pfns[0] != pfns[1]


def test_mmap_node_and_file(kernel: LinuxKernel, tmp_path: Path) -> None:
    p = kernel.spawn()
    a = p.mmap(2 * P, node=0)
    with open(f"/proc/{p.pid}/numa_maps") as f:
        line = next(ln for ln in f if ln.startswith(f"{a:x} "))
    assert "bind:0" in line
    with pytest.raises(ValueError, match="node 1023 does not exist"):
        p.mmap(P, node=1023)  # API misuse, as in the model (mbind would say EINVAL)
    with pytest.raises(ValueError, match="either path= or MAP_ANONYMOUS"):
        p.mmap(P, path="/dev/null")  # the default flags include MAP_ANONYMOUS
    path = tmp_path / "data"
    path.write_bytes(b"A" * P + b"B" * P)
    f = p.mmap(2 * P, PROT_READ | PROT_WRITE, MAP_PRIVATE, path=str(path), offset=P)
    assert p.read(f, 4) == b"BBBB"
    p.write(f, b"private")
    assert path.read_bytes()[P:P + 7] == b"BBBBBBB"  # MAP_PRIVATE: the file is untouched
    p.madvise(f, P, MADV_MERGEABLE)
    (vma,) = [e for e in p.smaps() if e.start <= f < e.end]
    assert vma.mergeable  # spec 1.3 [verified]: MAP_PRIVATE file mappings become mg
    s = p.mmap(P, PROT_READ | PROT_WRITE, MAP_SHARED, path=str(path))
    p.write(s, b"shared")
    assert path.read_bytes()[:6] == b"shared"  # opened O_RDWR for MAP_SHARED
    with pytest.raises(OSError) as exc:
        p.mmap(P, PROT_READ, MAP_PRIVATE, path=str(tmp_path / "missing"))
    assert exc.value.errno == errno.ENOENT, errno_of(exc)
    with pytest.raises(OSError) as exc:
        p.mmap(P, PROT_READ, MAP_PRIVATE)  # a file mapping without a file
    assert exc.value.errno == errno.EBADF, errno_of(exc)


# --- process lifecycle ---------------------------------------------------------------


def test_exit_and_reaping(kernel: LinuxKernel) -> None:
    p = kernel.spawn()
    c = p.fork()
    g = c.fork()
    o = p.fork()
    c.exit()  # g is orphaned while alive
    assert wait_gone(c.pid)
    assert g.prctl(PR_GET_MEMORY_MERGE) == 0  # the orphan still works
    g.exit()
    assert wait_gone(g.pid)  # reaped, not a zombie
    p.exit()  # the spawned process exits before its child o
    assert wait_gone(p.pid)
    pid_o = o.pid
    for call in (lambda: p.mmap(P), lambda: p.read(0, 1), p.ksm_stat, p.exit, p.fork,
                 p.exec, p.smaps, lambda: p.pfns(0, P)):
        with pytest.raises(ProcessExitedError):
            call()
    assert o.mmap(P) > 0
    kernel.close()  # kills o, the last helper
    assert wait_gone(pid_o)
    with pytest.raises(ProcessExitedError):
        o.mmap(P)


# --- full scans ----------------------------------------------------------------------


def test_wait_full_scans_stalls_clearly(kernel: LinuxKernel) -> None:
    kernel.sysfs["run"] = "0"
    with pytest.raises(ScanStalledError, match=r"run=0.*pages_to_scan=.*sleep_millisecs="):
        kernel.wait_full_scans(1)
    p = kernel.spawn()
    merge_identical_pages(kernel, p, 2)
    assert kernel.sysfs["pages_shared"] == "1" and kernel.sysfs["pages_sharing"] == "1"
    with pytest.raises(ScanStalledError, match="timed out"):
        kernel.wait_full_scans(10**12, timeout=0.2)
    kernel.wait_full_scans(0)
    t = time.monotonic()
    kernel.advance(50)
    assert time.monotonic() - t >= 0.05


# --- lock and signals ----------------------------------------------------------------

HOLDER = """
    import sys
    from ksmlab.backends.linux import LinuxKernel
    with LinuxKernel() as k:
        k.sysfs["sleep_millisecs"] = "7"
        p = k.spawn()
        print("held", p.pid, flush=True)
        sys.stdin.read()  # hold until the parent closes stdin (or signals us)
"""


def start_holder() -> tuple[subprocess.Popen[str], int]:
    proc = run_python(HOLDER)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("held"):
        proc.kill()
        raise AssertionError(f"holder did not start: {line!r} {proc.communicate()}")
    return proc, int(line.split()[1])


def test_lock_blocks_a_second_session(ksm_usable: None) -> None:
    before = read_knobs_locked()
    holder, helper_pid = start_holder()
    try:
        t = time.monotonic()
        with pytest.raises(KsmLockTimeoutError, match=rf"pid {holder.pid}\b"):
            LinuxKernel(lock_timeout=0.3)
        assert time.monotonic() - t >= 0.3
        # Released 0.5 s from now: a patient second session gets it then.
        assert holder.stdin is not None
        timer = threading.Timer(0.5, holder.stdin.close)
        timer.start()
        t = time.monotonic()
        with LinuxKernel(lock_timeout=30) as k:
            waited = time.monotonic() - t
            assert waited >= 0.4
            assert holder.wait(timeout=10) == 0
            # The first session restored its change before releasing the lock.
            assert k.sysfs["sleep_millisecs"] == before["sleep_millisecs"]
        timer.join()
    finally:
        holder.kill()
        holder.wait()
    assert wait_gone(helper_pid)


def test_second_kernel_in_same_process_is_refused(kernel: LinuxKernel) -> None:
    with pytest.raises(RuntimeError, match="already open"):
        LinuxKernel(lock_timeout=0.1)
