#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-only
"""Record the exact behaviour of every file in ``/sys/kernel/mm/ksm`` on this kernel.

Run as root on a machine whose KSM is idle (nothing merged, no process with a
mergeable area)::

    python tests/tools/probe_sysfs.py            # print the table
    python tests/tools/probe_sysfs.py --write    # regenerate tests/sysfs_cases.py

For every file it records the text read at the defaults and the file mode.
For every candidate write it records the errno name, or the text read back
afterwards together with the side effects on the other knobs.  The candidates
are single writes from the defaults (``WRITES``) and short sequences whose last
write is the one under test (``STAGED_WRITES``).

KSM state is global.  The whole run is one ``LinuxKernel`` session: it holds the
lock every ksmlab tool uses, saves every knob first and restores them on the way
out in its safe order.  Between two cases every knob is reset to its default
with ``LinuxKernel.reset_knobs``, in the same order.  ``run=1`` is only written
while no process has a mergeable area, so nothing is ever merged.

Each write is one ``write(2)`` of the UTF-8 text on a fresh descriptor, as ``echo -n``
would do.  Errors are recorded by name, whether they came from ``open(2)`` or from
``write(2)``.  Other ksmlab sessions may hold the same lock; this script waits for it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import errno
import os
import platform
import re
import stat
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple, TypeAlias

from ksmlab.backends.linux import LinuxKernel

KSM_DIR = Path("/sys/kernel/mm/ksm")
OUTPUT = Path(__file__).resolve().parents[1] / "sysfs_cases.py"

# The compiled-in defaults of ksm.c (docs/kernel-behaviour.md section 5), only used to warn when the
# kernel being probed is not at its defaults.
SPEC_DEFAULTS: dict[str, str] = {
    "advisor_max_cpu": "70\n",
    "advisor_max_pages_to_scan": "30000\n",
    "advisor_min_pages_to_scan": "500\n",
    "advisor_mode": "[none] scan-time\n",
    "advisor_target_scan_time": "200\n",
    "max_page_sharing": "256\n",
    "merge_across_nodes": "1\n",
    "pages_to_scan": "100\n",
    "run": "0\n",
    "sleep_millisecs": "20\n",
    "smart_scan": "1\n",
    "stable_node_chains_prune_millisecs": "2000\n",
    "use_zero_pages": "0\n",
}

# Knobs written back in this order (after run=2, before run).

U64_MAX = str(2**64 - 1)

# --- candidate writes -------------------------------------------------------------

NUMBER_CANDIDATES: tuple[str, ...] = (
    "0", "1", "5", "4294967295", "4294967296", "4294967297", U64_MAX, str(2**64),
    "+5", "05", "010", "-0", "-1", "+", "++5", "+-5",
    "5\n", "5\n\n", "\n5", " 5", "5 ", "\t5", "5\t", "5\r\n",
    "0x1", "0X1", "0b1", "0o7", "1e3", "1.0", "5x", "text",
    "", "\n", "5\x00", "5\x00x", "\x005",
    "0" * 4095 + "5", "0" * 4096 + "5",
)  # fmt: skip

BOOL_CANDIDATES: tuple[str, ...] = (
    "0", "1", "y", "Y", "yes", "n", "N", "no", "t", "T", "true", "f", "F", "false",
    "e", "E", "enable", "d", "D", "disable",
    "on", "ON", "On", "oN", "of", "off", "OFF", "Off", "oFF", "o", "O", "ox",
    "2", "-1", "+1", "01", "10", "00", "maybe", "x",
    "1 ", "1\n", " 1", "\n", "", "1\x00", "\x00",
    "1" + "0" * 4095, "1" + "0" * 4096,
)  # fmt: skip

ADVISOR_MODE_CANDIDATES: tuple[str, ...] = (
    "none", "scan-time", "none\n", "scan-time\n", "scan-time\n\n", "\nscan-time",
    "Scan-time", "SCAN-TIME", "None", " none", "none ", "scan-time ", "scan",
    "scan-time-x", "scantime", "scan_time", "[none]", "[none] scan-time",
    "none [scan-time]", "", "\n", "scan-time\x00", "scan-time\x00x", "0", "1",
)  # fmt: skip

CANDIDATES: dict[str, tuple[str, ...]] = {
    "advisor_max_cpu": (*NUMBER_CANDIDATES, "70", "100", "101", "500"),
    "advisor_max_pages_to_scan": NUMBER_CANDIDATES,
    "advisor_min_pages_to_scan": NUMBER_CANDIDATES,
    "advisor_mode": ADVISOR_MODE_CANDIDATES,
    "advisor_target_scan_time": NUMBER_CANDIDATES,
    "max_page_sharing": (
        *NUMBER_CANDIDATES, "2", "3", "256", "2147483647", "2147483648",
        "-2147483648", "-2147483649", "-5",
    ),
    "merge_across_nodes": (*NUMBER_CANDIDATES, "2", "+0", "00"),
    "pages_to_scan": NUMBER_CANDIDATES,
    "run": (*NUMBER_CANDIDATES, "2", "3", "4", "+2", "02", "2\n", "+1", "01", "1\n"),
    "sleep_millisecs": NUMBER_CANDIDATES,
    "smart_scan": BOOL_CANDIDATES,
    "stable_node_chains_prune_millisecs": NUMBER_CANDIDATES,
    "use_zero_pages": BOOL_CANDIDATES,
}

Setup: TypeAlias = tuple[tuple[str, str], ...]

STAGED_CANDIDATES: tuple[tuple[Setup, str, str], ...] = (
    # pages_to_scan is locked while the advisor runs.
    ((("advisor_mode", "scan-time"),), "pages_to_scan", "5"),
    ((("advisor_mode", "scan-time"),), "pages_to_scan", "500"),
    ((("advisor_mode", "scan-time"),), "pages_to_scan", "text"),
    ((("advisor_mode", "scan-time"),), "pages_to_scan", ""),
    # What a real mode switch does to pages_to_scan, and that a same-mode write does not.
    ((("advisor_mode", "scan-time"),), "advisor_mode", "none"),
    ((("advisor_mode", "scan-time"),), "advisor_mode", "none\n"),
    ((("advisor_mode", "scan-time"),), "advisor_mode", "scan-time"),
    ((("advisor_mode", "scan-time"),), "advisor_mode", "bogus"),
    ((("pages_to_scan", "5"),), "advisor_mode", "none"),
    ((("pages_to_scan", "5"),), "advisor_mode", "scan-time"),
    ((("pages_to_scan", "5"), ("advisor_mode", "scan-time")), "advisor_mode", "none"),
    ((("advisor_min_pages_to_scan", "1234"),), "advisor_mode", "scan-time"),
    ((("advisor_min_pages_to_scan", "0"),), "advisor_mode", "scan-time"),
    ((("advisor_min_pages_to_scan", "50000"),), "advisor_mode", "scan-time"),
    ((("advisor_min_pages_to_scan", "4294967295"),), "advisor_mode", "scan-time"),
    ((("advisor_min_pages_to_scan", "4294967296"),), "advisor_mode", "scan-time"),
    ((("advisor_min_pages_to_scan", "4294967301"),), "advisor_mode", "scan-time"),
    ((("advisor_min_pages_to_scan", U64_MAX),), "advisor_mode", "scan-time"),
    ((("advisor_mode", "scan-time"),), "advisor_min_pages_to_scan", "7"),
    (
        (("advisor_mode", "scan-time"), ("advisor_min_pages_to_scan", "7")),
        "advisor_mode", "scan-time",
    ),
    (
        (("advisor_mode", "scan-time"), ("advisor_min_pages_to_scan", "7")),
        "advisor_mode", "none",
    ),
    ((("advisor_mode", "scan-time"),), "advisor_max_pages_to_scan", "1"),
    ((("advisor_mode", "scan-time"),), "advisor_target_scan_time", "0"),
    ((("advisor_mode", "scan-time"),), "sleep_millisecs", "5"),
    # max_page_sharing and merge_across_nodes: rewriting the current value, and back.
    ((("max_page_sharing", "2"),), "max_page_sharing", "2"),
    ((("max_page_sharing", "2"),), "max_page_sharing", "256"),
    ((("max_page_sharing", "2"),), "max_page_sharing", "1"),
    ((("merge_across_nodes", "0"),), "merge_across_nodes", "0"),
    ((("merge_across_nodes", "0"),), "merge_across_nodes", "1"),
    ((("merge_across_nodes", "0"),), "merge_across_nodes", "2"),
    # run transitions (nothing is merged, no process is mergeable).
    ((("run", "1"),), "run", "0"),
    ((("run", "1"),), "run", "1"),
    ((("run", "1"),), "run", "2"),
    ((("run", "1"),), "run", "3"),
    ((("run", "2"),), "run", "0"),
    ((("run", "2"),), "run", "1"),
    ((("run", "2"),), "run", "2"),
    ((("run", "2"),), "run", "3"),
    ((("run", "2"),), "max_page_sharing", "2"),
    ((("run", "2"),), "merge_across_nodes", "0"),
    ((("run", "1"),), "max_page_sharing", "2"),
    ((("run", "1"),), "merge_across_nodes", "0"),
    ((("run", "1"),), "pages_to_scan", "0"),
    ((("run", "1"),), "advisor_mode", "scan-time"),
    # Bools keep the last accepted value.
    ((("use_zero_pages", "1"),), "use_zero_pages", "maybe"),
    ((("use_zero_pages", "1"),), "use_zero_pages", "off"),
    ((("smart_scan", "0"),), "smart_scan", "on"),
    ((("smart_scan", "0"),), "smart_scan", "2"),
)


# --- the files ----------------------------------------------------------------------


def list_files() -> list[str]:
    """Every file of the KSM sysfs directory, sorted."""
    return sorted(p.name for p in KSM_DIR.iterdir())


def file_mode(name: str) -> int:
    """The permission bits of one file."""
    return stat.S_IMODE((KSM_DIR / name).stat().st_mode)


def read(name: str) -> str:
    """The text of one file exactly as read, trailing newline included."""
    fd = os.open(KSM_DIR / name, os.O_RDONLY)
    try:
        return os.read(fd, 65536).decode()
    finally:
        os.close(fd)


def write(name: str, text: str) -> int:
    """One write(2) of *text*; return the byte count it returned, or raise OSError."""
    fd = os.open(KSM_DIR / name, os.O_WRONLY)
    try:
        return os.write(fd, text.encode())
    finally:
        os.close(fd)


def read_all(names: Sequence[str]) -> dict[str, str]:
    """The text of each of *names*."""
    return {name: read(name) for name in names}


def writable_value(name: str, text: str) -> str:
    """The value to write to get *text* back (``[none] scan-time`` -> ``none``)."""
    if name == "advisor_mode":
        m = re.search(r"\[([^]]*)\]", text)
        if m is None:
            raise ValueError(f"unexpected advisor_mode text {text!r}")
        return m.group(1)
    return text.strip()


def mergeable_pids() -> list[int]:
    """Processes with a VM_MERGEABLE area or MMF_VM_MERGE_ANY: ksmd could merge them."""
    pids = []
    for stat_file in Path("/proc").glob("[0-9]*/ksm_stat"):
        try:
            text = stat_file.read_text()
        except OSError:
            continue
        if "ksm_mergeable: yes" in text or "ksm_merge_any: yes" in text:
            pids.append(int(stat_file.parent.name))
    return sorted(pids)


class Knobs:
    """The writable knobs of a locked LinuxKernel session."""

    def __init__(self, kernel: LinuxKernel, names: Sequence[str]) -> None:
        self.kernel = kernel
        self.names = list(names)

    def set(self, name: str, value: str) -> int:
        """One raw write(2) of a knob; return its byte count or raise OSError."""
        return write(name, value)

    def reset(self, target: dict[str, str]) -> None:
        """Write back *target* (texts as read) in LinuxKernel's safe order."""
        self.kernel.reset_knobs({n: writable_value(n, target[n]) for n in self.names})


@contextlib.contextmanager
def ksm_locked(knob_names: Sequence[str]) -> Iterator[tuple[Knobs, dict[str, str]]]:
    """Hold the ksmlab lock through LinuxKernel, which saves every knob and restores it on exit."""
    with LinuxKernel() as kernel:
        yield Knobs(kernel, knob_names), read_all(knob_names)


# --- recording ------------------------------------------------------------------------


class Recorded(NamedTuple):
    """One case as it goes into the table."""

    setup: Setup
    name: str
    text: str
    err: str | None
    expected: dict[str, str]
    returned: int | None  # what a successful write(2) returned


def errno_name(exc: OSError) -> str:
    """``EINVAL`` for an OSError carrying errno 22."""
    assert exc.errno is not None
    return errno.errorcode[exc.errno]


def record_case(
    knobs: Knobs,
    defaults: dict[str, str],
    read_only: frozenset[str],
    setup: Setup,
    name: str,
    text: str,
) -> Recorded:
    """Reset to *defaults*, apply *setup*, write *text* to *name*, and record the outcome."""
    files = list(defaults)
    knob_defaults = {n: defaults[n] for n in knobs.names}
    knobs.reset(knob_defaults)
    for setup_name, setup_value in setup:
        knobs.set(setup_name, setup_value)
    before = read_all(files)
    err: str | None = None
    count: int | None = None
    try:
        count = knobs.set(name, text) if name in knob_defaults else write(name, text)
    except OSError as exc:
        err = errno_name(exc)
    after = read_all(files)
    for counter in sorted(read_only):
        if after[counter] != before[counter]:
            print(
                f"warning: {name}={text!r} moved {counter} "
                f"{before[counter]!r} -> {after[counter]!r}",
                file=sys.stderr,
            )
    if err is not None:
        changed = [n for n in knobs.names if after[n] != before[n]]
        if changed:
            print(f"warning: failed {name}={text!r} changed {changed}", file=sys.stderr)
    expected = {name: defaults[name] if name in read_only else after[name]}
    for knob in knobs.names:
        if after[knob] != defaults[knob]:
            expected[knob] = after[knob]
    knobs.reset(knob_defaults)
    return Recorded(setup, name, text, err, expected, count)


class Table(NamedTuple):
    """Everything tests/sysfs_cases.py holds."""

    release: str
    machine: str
    when: str
    defaults: dict[str, str]
    modes: dict[str, int]
    read_only: frozenset[str]
    read_only_errno: str
    max_write: int
    writes: list[Recorded]
    staged: list[Recorded]


def probe() -> Table:
    """Probe the running kernel; return everything the table needs."""
    if not KSM_DIR.is_dir():
        sys.exit(f"{KSM_DIR} does not exist: this kernel has no KSM sysfs")
    if os.geteuid() != 0:
        sys.exit("probe_sysfs.py must run as root")
    files = list_files()
    modes = {name: file_mode(name) for name in files}
    read_only = frozenset(n for n in files if not modes[n] & 0o222)
    knob_names = [n for n in files if n not in read_only]
    unknown = sorted(set(knob_names) - set(CANDIDATES))
    if unknown:
        sys.exit(f"writable files without candidates: {unknown}; add them to CANDIDATES")
    busy = mergeable_pids()
    if busy:
        sys.exit(f"processes {busy} have mergeable areas: ksmd could merge; stop them first")

    with ksm_locked(knob_names) as (knobs, saved):
        defaults = read_all(files)
        if defaults["run"] == "2\n":
            print("note: run reads 2 (left by the ksmlab lock protocol); recording 0",
                  file=sys.stderr)
            defaults["run"] = "0\n"
        for name in sorted(read_only):
            if defaults[name] != "0\n":
                print(f"note: {name} reads {defaults[name]!r}; a fresh kernel reads 0",
                      file=sys.stderr)
                defaults[name] = "0\n"
        for name, text in SPEC_DEFAULTS.items():
            if defaults.get(name) != text:
                print(f"warning: {name} reads {defaults.get(name)!r}, the spec's default is "
                      f"{text!r}: is this kernel at its defaults?", file=sys.stderr)
        if saved != {n: defaults[n] for n in knob_names}:
            print(f"note: knobs found {saved}", file=sys.stderr)

        writes = [
            record_case(knobs, defaults, read_only, (), name, text)
            for name in knob_names
            for text in CANDIDATES[name]
        ]
        writes += [
            record_case(knobs, defaults, read_only, (), name, "0")
            for name in sorted(read_only)
        ]
        staged = [
            record_case(knobs, defaults, read_only, setup, name, text)
            for setup, name, text in STAGED_CANDIDATES
        ]
        if mergeable_pids():
            sys.exit("a process became mergeable during the probe: results not trusted")
    ro_errnos = {r.err for r in writes if r.name in read_only}
    if len(ro_errnos) != 1:
        sys.exit(f"read-only files disagree on the errno: {ro_errnos}")
    sizes = [(len(r.text.encode()), r.returned) for r in writes + staged if r.returned is not None]
    short = {count for size, count in sizes if count < size}
    full = [size for size, count in sizes if count == size]
    if len(short) != 1 or max(full) > min(short):
        sys.exit(f"cannot tell the write limit: short writes returned {short}")
    ro_errno = ro_errnos.pop()
    assert ro_errno is not None
    return Table(
        release=platform.release(),
        machine=platform.machine(),
        when=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        defaults=defaults,
        modes=modes,
        read_only=read_only,
        read_only_errno=ro_errno,
        max_write=short.pop(),
        writes=writes,
        staged=staged,
    )


# --- emitting Python source -----------------------------------------------------------


def lit(text: str) -> str:
    """A short Python literal for *text*: double quotes, long runs as ``"0" * 4095``."""
    if len(text) > 40:
        runs: list[tuple[str, int]] = []
        for ch in text:
            if runs and runs[-1][0] == ch:
                runs[-1] = (ch, runs[-1][1] + 1)
            else:
                runs.append((ch, 1))
        return " + ".join(lit(ch) if n == 1 else f"{lit(ch)} * {n}" for ch, n in runs)
    r = repr(text)
    if r.startswith("'") and '"' not in text:
        r = '"' + r[1:-1].replace("\\'", "'") + '"'
    return r


def lit_dict(d: dict[str, str]) -> str:
    """A one-line dict literal."""
    return "{" + ", ".join(f"{lit(k)}: {lit(v)}" for k, v in d.items()) + "}"


def lit_setup(setup: Setup) -> str:
    """A one-line literal for a tuple of (file, text) pairs."""
    inner = ", ".join(f"({lit(n)}, {lit(v)})" for n, v in setup)
    return f"({inner},)" if len(setup) == 1 else f"({inner})"


def emit_tuple(fields: list[str], expected: dict[str, str], indent: str = "    ") -> str:
    """One tuple of a list: on one line if it fits in 99 columns, else one field a line."""
    fields = [*fields, lit_dict(expected)]
    one = f"{indent}({', '.join(fields)}),"
    if len(one) <= 99:
        return one
    inner = indent + "    "
    lines = [f"{indent}("]
    lines += [f"{inner}{f}," for f in fields[:-1]]
    if len(f"{inner}{fields[-1]},") <= 99:
        lines.append(f"{inner}{fields[-1]},")
    else:
        lines.append(inner + "{")
        lines += [f"{inner}    {lit(k)}: {lit(v)}," for k, v in expected.items()]
        lines.append(inner + "},")
    lines.append(f"{indent}),")
    return "\n".join(lines)


def render(table: Table) -> str:
    """The table as the source of tests/sysfs_cases.py."""
    out = [
        "# SPDX-License-Identifier: GPL-2.0-only",
        '"""Exact behaviour of ``/sys/kernel/mm/ksm``, recorded on the real kernel.',
        "",
        f"Recorded on Linux {table.release} ({table.machine}) on {table.when},",
        "as root, by ``tests/tools/probe_sysfs.py``.  Generated file: do not edit by hand.",
        "To re-record (as root, with KSM idle: nothing merged, no mergeable process)::",
        "",
        "    python tests/tools/probe_sysfs.py --write",
        "",
        "Texts are exactly what read(2) returns, trailing newline included.  Written",
        "texts are passed to one write(2) as UTF-8.  Errors are errno names.",
        "",
        "* ``DEFAULTS``: every file at its defaults on a fresh kernel (counters 0).",
        "* ``MODES``: permission bits; ``READ_ONLY``: the 0444 counters, which refuse",
        "  every write with ``READ_ONLY_WRITE_ERRNO`` (at open(2) on the real kernel).",
        "* ``WRITES``: ``(file, text, errno name or None, expected)`` for one write made",
        "  from the defaults.  ``expected`` maps the written file, and every knob that",
        "  no longer reads as its default, to the text read afterwards; every other",
        "  file still reads as in ``DEFAULTS``.  A failed write changes nothing.",
        "* ``STAGED_WRITES``: ``(setup, file, text, errno name or None, expected)``: the",
        "  ``setup`` writes (each succeeds) are made first, from the defaults; then the",
        "  write under test.  ``expected`` is relative to ``DEFAULTS`` as above.",
        '"""',
        "",
        "from __future__ import annotations",
        "",
        "from typing import TypeAlias",
        "",
        f"KERNEL_RELEASE = {lit(table.release)}",
        f"RECORDED_AT = {lit(table.when)}",
        "",
        "DEFAULTS: dict[str, str] = {",
        *(f"    {lit(k)}: {lit(v)}," for k, v in table.defaults.items()),
        "}",
        "",
        "MODES: dict[str, int] = {",
        *(f"    {lit(k)}: 0o{v:o}," for k, v in table.modes.items()),
        "}",
        "",
        "READ_ONLY: frozenset[str] = frozenset({",
        *(f"    {lit(k)}," for k in sorted(table.read_only)),
        "})",
        "",
        f"READ_ONLY_WRITE_ERRNO = {lit(table.read_only_errno)}",
        "",
        "# write(2) of more bytes returns this count: the file parses only that prefix.",
        f"MAX_WRITE_BYTES = {table.max_write}",
        "",
        "Write: TypeAlias = tuple[str, str, str | None, dict[str, str]]",
        "Setup: TypeAlias = tuple[tuple[str, str], ...]",
        "StagedWrite: TypeAlias = tuple[Setup, str, str, str | None, dict[str, str]]",
        "",
        "WRITES: list[Write] = [",
    ]
    out += [
        emit_tuple([lit(r.name), lit(r.text), lit_opt(r.err)], r.expected) for r in table.writes
    ]
    out += ["]", "", "STAGED_WRITES: list[StagedWrite] = ["]
    out += [
        emit_tuple([lit_setup(r.setup), lit(r.name), lit(r.text), lit_opt(r.err)], r.expected)
        for r in table.staged
    ]
    out += ["]", ""]
    return "\n".join(out)


def lit_opt(err: str | None) -> str:
    """``None`` or a string literal."""
    return "None" if err is None else lit(err)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--write", action="store_true", help=f"write the table to {OUTPUT} instead of stdout"
    )
    args = parser.parse_args(argv)
    source = render(probe())
    if args.write:
        OUTPUT.write_text(source)
        print(f"wrote {OUTPUT}", file=sys.stderr)
    else:
        sys.stdout.write(source)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
