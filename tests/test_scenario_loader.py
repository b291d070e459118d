# SPDX-License-Identifier: GPL-2.0-only
"""The scenario loader: what valid files become, and the one-line error of every kind of invalid file.

Every invalid case names the field and what was expected, in the form
``FILE: FIELD: expected X, got Y``; the expected texts below are the
loader's documented messages (docs/scenarios.md, "Errors").
"""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path

import pytest

from ksmlab.constants import PAGE_SIZE
from ksmlab.scenario.loader import (
    ScenarioError,
    apply_knob_overrides,
    load_builtin,
    load_scenario,
    parse_scenario,
    truncate,
)
from ksmlab.scenario.model import (
    ExitEvent,
    ForkEvent,
    KnobsEvent,
    MadviseEvent,
    Region,
    Scenario,
    WriteEvent,
)
from ksmlab.scenario.transform import MAX_SAMPLES, latest_end_ns, with_sample_interval
from ksmlab.scenario.units import (
    SIZE_UNITS_ACCEPTED,
    format_bytes,
    format_duration,
    parse_duration_ns,
    parse_size,
)

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.toml"))

CONTENT = """
[content.img]
kind = "image"
pages = 16
"""
PROC = """
[[process]]
name = "vm"
count = 3
[[process.mapping]]
name = "ram"
pages = 16
content = "img"
"""
CHECK = """
[[checkpoint]]
at = "1s"
"""
BASE = CONTENT + PROC + CHECK


def parse(text: str, tmp_path: Path | None = None) -> Scenario:
    """Parse *text* as the file ``s.toml``."""
    return parse_scenario(text, source="s.toml", base_dir=tmp_path or Path("."))


# --- units ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("4096", 4096), ("4KiB", 4096), ("8 MiB", 8 << 20), ("1GiB", 1 << 30), ("2M", 2 << 20),
    ("1.5KiB", 1536), ("0", 0), ("4096B", 4096),
    # memparse()'s letters, either case, each 1024 times the one before
    ("3k", 3 << 10), ("3K", 3 << 10), ("2m", 2 << 20), ("2g", 2 << 30), ("2G", 2 << 30),
    ("1t", 1 << 40), ("1T", 1 << 40), ("1P", 1 << 50), ("1PiB", 1 << 50), ("15E", 15 << 60),
    ("15EiB", 15 << 60),
])
def test_parse_size(text: str, expected: int) -> None:
    """Sizes take binary units, with or without a space."""
    assert expected == parse_size(text)


@pytest.mark.parametrize("text", ["2 GB", "2GB", "2Gb", "2gb", "2gB", "1 KB", "1kb", "8MB", "1TB",
                                  "1PB", "4096b", "1gib", "1GIB", "1Gib", "2 mib", "1KIB"])
def test_parse_size_refuses_ambiguous_units(text: str) -> None:
    """GB & co. (10**9 or 2**30? bits or bytes?) are refused, naming the units accepted."""
    with pytest.raises(ValueError) as info:
        parse_size(text)
    unit = text.lstrip("0123456789 ")
    message = str(info.value)
    assert SIZE_UNITS_ACCEPTED in message
    assert f'"{unit}" is refused as ambiguous: decimal or binary, bits or bytes?' in message


def test_ambiguous_size_in_a_file_names_the_units() -> None:
    """A mapping of "2 GB" and an expectation of "40 MB" are one-line errors naming the units."""
    text = BASE.replace("pages = 16\ncontent", 'size = "2 GB"\ncontent')
    with pytest.raises(ScenarioError) as info:
        parse(text)
    assert str(info.value) == (
        's.toml: process[0].mapping[0].size: expected a size such as 4096, "64KiB", "8MiB" or '
        f'"1GiB" (units {SIZE_UNITS_ACCEPTED}, each 1024 times the one before, as the kernel\'s '
        'memparse() reads them; "GB" is refused as ambiguous: decimal or binary, bits or bytes?), '
        'got "2 GB"')
    text = BASE.replace('at = "1s"', 'at = "1s"\nexpect = { general_profit = { min = "40 MB" } }')
    with pytest.raises(ScenarioError, match=r'^s\.toml: checkpoint\[0\]\.expect\.general_profit\.min: '
                                            r'expected an integer or a size such as .*"MB" is refused '
                                            r'as ambiguous.*, got "40 MB"$'):
        parse(text)


@pytest.mark.parametrize(("text", "expected_ns"), [
    ("500ms", 500_000_000), ("10s", 10 * 10**9), ("5min", 300 * 10**9), ("1h", 3600 * 10**9),
    ("1.5s", 1_500_000_000), ("2", 2 * 10**9), ("250us", 250_000),
])
def test_parse_duration(text: str, expected_ns: int) -> None:
    """Durations take ms, s, min, h; a bare number is seconds."""
    assert expected_ns == parse_duration_ns(text)


@pytest.mark.parametrize("text", ["10 parsecs", "", "-5s", "1e3s", "s"])
def test_parse_duration_rejects(text: str) -> None:
    """Anything else is refused with what is accepted."""
    with pytest.raises(ValueError, match="a duration such as"):
        parse_duration_ns(text)


def test_format_units() -> None:
    """Human units: binary sizes (signed), and durations by magnitude."""
    assert format_bytes(0) == "0 B"
    assert format_bytes(1024) == "1.0 KiB"
    assert format_bytes(-320000) == "-312.5 KiB"
    assert format_bytes(int(51.2 * 2**20)) == "51.2 MiB"
    assert format_duration(0.25) == "250 ms"
    assert format_duration(12.5) == "12.5 s"
    assert format_duration(300) == "5 min"
    assert format_duration(3600) == "1 h"
    assert format_duration(5400) == "1 h 30 min"


# --- valid files ---------------------------------------------------------------------------

def test_minimal_scenario_defaults() -> None:
    """A minimal file gets documented defaults: run=1 last, seed 0, name from the file."""
    sc = parse(BASE)
    assert sc.name == "s"
    assert sc.seed == 0
    assert sc.knobs == (("run", "1"),)
    g = sc.processes[0]
    assert (g.count, g.start_ns, g.merge_any) == (3, 0, False)
    assert (g.mappings[0].pages, g.mappings[0].content, g.mappings[0].mergeable) == (16, "img", True)
    assert sc.checkpoints[0].at_ns == 10**9


def test_knobs_are_written_in_kernel_order() -> None:
    """Knobs come out in the order the kernel needs (advisor, pages_to_scan, ..., run last)."""
    sc = parse("[ksm]\nrun = 1\nmax_page_sharing = 8\nuse_zero_pages = true\n"
               "pages_to_scan = 50\n" + BASE)
    assert list(sc.knobs) == [("pages_to_scan", "50"), ("use_zero_pages", "1"), ("max_page_sharing", "8"),
            ("run", "1")]


def test_sizes_pages_and_regions() -> None:
    """size is converted to pages; regions take start/size or first_page/pages."""
    sc = parse(CONTENT + """
[[process]]
name = "vm"
[[process.mapping]]
name = "ram"
size = "64KiB"
content = "img"
[[event]]
at = "1s"
action = "write"
process = "vm"
mapping = "ram"
region = { start = "8KiB", size = "16KiB" }
[[event]]
at = "1s"
action = "madvise"
process = "vm"
mapping = "ram"
advice = "unmergeable"
region = { first_page = 3, pages = 2 }
""" + CHECK)
    assert sc.processes[0].mappings[0].pages == 16
    w, m = sc.events
    assert isinstance(w, WriteEvent) and isinstance(m, MadviseEvent)
    assert w.region == Region(2, 4)
    assert m.region == Region(3, 2)


def test_events_sorted_by_time_then_file_order() -> None:
    """Events run in time order; at one time, in file order; forks create groups."""
    sc = parse(BASE + """
[[event]]
at = "3s"
action = "exit"
process = "kid[0]"
[[event]]
at = "2s"
action = "fork"
process = "vm[1]"
child = "kid"
count = 2
[[event]]
at = "2s"
action = "knobs"
set = { pages_to_scan = 7 }
""")
    kinds = [type(e) for e in sc.events]
    assert kinds == [ForkEvent, KnobsEvent, ExitEvent]
    knobs = sc.events[1]
    assert isinstance(knobs, KnobsEvent)
    assert knobs.knobs == (("pages_to_scan", "7"),)


def test_file_content_relative_to_scenario(tmp_path: Path) -> None:
    """A relative content path is relative to the scenario file's directory."""
    (tmp_path / "disk.img").write_bytes(b"x" * 10000)
    f = tmp_path / "s.toml"
    f.write_text('[content.d]\nkind = "file"\npath = "disk.img"\n' + PROC.replace("img", "d")
                 + CHECK)
    sc = load_scenario(f)
    assert (tmp_path / "disk.img").resolve() == sc.contents["d"].path


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_valid(path: Path) -> None:
    """Every shipped example validates."""
    sc = load_scenario(path)
    assert sc.checkpoints


def test_builtin_is_valid_and_realistic() -> None:
    """The built-in scenario: 12 guests of 8 MiB, checkpoints at 1 s, 10 s, 1 min."""
    sc = load_builtin()
    assert sum(g.count for g in sc.processes) == 12
    assert sc.total_pages() == 12 * 8 * 2**20 // PAGE_SIZE
    assert [c.at_ns for c in sc.checkpoints] == [10**9, 10 * 10**9, 60 * 10**9]
    assert sc.activities


def test_seed_override_and_knob_override() -> None:
    """--seed replaces [scenario] seed; --knob is validated like [ksm]."""
    text = "[scenario]\nseed = 4\n" + BASE
    sc = parse_scenario(text, source="s.toml", base_dir=Path("."), seed=99)
    assert sc.seed == 99
    sc = apply_knob_overrides(sc, {"pages_to_scan": 1000, "use_zero_pages": True})
    assert ("pages_to_scan", "1000") in sc.knobs and ("use_zero_pages", "1") in sc.knobs
    with pytest.raises(ScenarioError, match=r"^--knob: max_page_sharing: expected an integer "
                                            r"from 2 to 2147483647, got 1$"):
        apply_knob_overrides(sc, {"max_page_sharing": 1})
    with pytest.raises(ScenarioError, match=r"^--knob: nope: expected a KSM knob"):
        apply_knob_overrides(sc, {"nope": 1})


def test_truncate_past_the_end_extends_the_scenario() -> None:
    """--until past the end with --extend: the run goes on, open activities keep writing."""
    sc = parse('[scenario]\nduration = "2s"\n' + BASE + '[[activity]]\nprocess = "vm"\n'
               'mapping = "ram"\nrate = 5\n[[activity]]\nprocess = "vm[0]"\nmapping = "ram"\n'
               'rate = 5\nstop = "1s"\n')
    assert latest_end_ns(sc) == 2 * 10**9
    longer = truncate(sc, 7 * 10**9)
    assert longer.duration_ns == longer.planned_end_ns == 7 * 10**9
    # The activity without a stop writes until the new end; the one with a stop keeps it.
    assert [a.stop_ns for a in longer.activities] == [7 * 10**9, 10**9]
    assert [c.at_ns for c in longer.checkpoints] == [10**9, 7 * 10**9]


def test_latest_end_counts_full_scan_timeouts() -> None:
    """Without a duration, a full-scan checkpoint may keep a run going until its timeout."""
    sc = parse(BASE + '[[checkpoint]]\nfull_scans = 3\ntimeout = "45s"\n')
    assert (sc.planned_end_ns, latest_end_ns(sc)) == (10**9, 45 * 10**9)


def test_sample_interval_override() -> None:
    """--sample sets the timeline period, but at most MAX_SAMPLES samples over the run."""
    sc = parse('[scenario]\nduration = "100s"\n' + BASE)
    assert with_sample_interval(sc, 10**6).sample_interval_ns == 10**6
    least = 100 * 10**9 // MAX_SAMPLES  # 100 s over a million samples: 100 µs
    assert with_sample_interval(sc, least).sample_interval_ns == least
    with pytest.raises(ScenarioError, match=r"^--sample: interval: expected an interval of at "
                                            r"least 100 µs \(at most 1,000,000 samples over the "
                                            r"1 min 40 s run\), got 99 µs$"):
        with_sample_interval(sc, least - 1000)


def test_truncate_drops_later_items_and_adds_a_checkpoint() -> None:
    """--until keeps what happens up to the cut and ends the run there."""
    sc = parse(BASE + '[[checkpoint]]\nat = "1h"\n[[event]]\nat = "2h"\naction = "exit"\n'
               'process = "vm"\n')
    cut = truncate(sc, 5 * 10**9)
    assert cut.duration_ns == 5 * 10**9
    assert cut.events == ()
    assert [c.at_ns for c in cut.checkpoints] == [10**9, 5 * 10**9]


# --- invalid files: one line, the field, what was expected -----------------------------------

INVALID = [
    ("syntax", "[ksm\n", "(syntax)", "expected valid TOML, got error: "),
    ("top-level typo", BASE + "[[procesess]]\nname = 'x'\n", "procesess",
     "expected a known field (scenario, ksm, content"),
    ("unknown knob", "[ksm]\npages_to_scann = 5\n" + BASE, "ksm.pages_to_scann",
     'expected a KSM knob (run, pages_to_scan'),
    ("knob range", "[ksm]\nmax_page_sharing = 1\n" + BASE, "ksm.max_page_sharing",
     "expected an integer from 2 to 2147483647, got 1"),
    ("knob type", '[ksm]\nuse_zero_pages = "yes"\n' + BASE, "ksm.use_zero_pages",
     'expected true or false, got "yes"'),
    ("run range", "[ksm]\nrun = 3\n" + BASE, "ksm.run", "expected an integer from 0 to 2, got 3"),
    ("advisor and pages_to_scan", '[ksm]\nadvisor_mode = "scan-time"\npages_to_scan = 5\n' + BASE,
     "ksm.pages_to_scan", 'expected no pages_to_scan with advisor_mode = "scan-time"'),
    ("advisor mode word", '[ksm]\nadvisor_mode = "fast"\n' + BASE, "ksm.advisor_mode",
     'expected "none" or "scan-time", got "fast"'),
    ("no content", PROC + CHECK, "content", "expected at least one content model"),
    ("content kind missing", "[content.img]\npages = 3\n" + PROC + CHECK, "content.img.kind",
     'expected "zero" or "random" or "fill" or "image" or "file", got nothing'),
    ("content kind unknown", '[content.img]\nkind = "lava"\n' + PROC + CHECK, "content.img.kind",
     'got "lava"'),
    ("field of another kind", '[content.img]\nkind = "image"\nbyte = 42\n' + PROC + CHECK,
     "content.img.byte", 'expected no byte for kind "image" (only for kind fill), got 42'),
    ("fraction range", '[content.img]\nkind = "image"\nzero_fraction = 1.5\n' + PROC + CHECK,
     "content.img.zero_fraction", "expected a number from 0 to 1, got 1.5"),
    ("fractions sum", '[content.img]\nkind = "image"\nzero_fraction = 0.6\n'
                      'private_fraction = 0.6\n' + PROC + CHECK,
     "content.img.private_fraction", "expected zero_fraction + private_fraction <= 1"),
    ("fill byte", '[content.img]\nkind = "fill"\nbyte = 256\n' + PROC + CHECK, "content.img.byte",
     "expected an integer from 0 to 255, got 256"),
    ("missing file", '[content.img]\nkind = "file"\npath = "/nonexistent/disk.img"\n' + PROC + CHECK,
     "content.img.path", 'expected a readable file, got "/nonexistent/disk.img" (No such file'),
    ("no process", CONTENT + CHECK, "process", "expected at least one [[process]], got nothing"),
    ("no mapping", CONTENT + '[[process]]\nname = "vm"\n' + CHECK, "process[0].mapping",
     "expected at least one [[process.mapping]], got nothing"),
    ("count zero", BASE.replace("count = 3", "count = 0"), "process[0].count",
     "expected an integer >= 1, got 0"),
    ("duplicate group", BASE + PROC, "process[1].name",
     'expected a name no other process group has, got "vm"'),
    ("bad group name", BASE.replace('name = "vm"', 'name = "3vm"'), "process[0].name",
     'got "3vm"'),
    ("size not pages", BASE.replace("pages = 16\ncontent", 'size = "6000"\ncontent'),
     "process[0].mapping[0].size", "expected a non-zero multiple of the page size (4096 bytes)"),
    ("size and pages", BASE.replace("pages = 16\ncontent", 'size = "64KiB"\npages = 16\ncontent'),
     "process[0].mapping[0].size", "expected exactly one of size and pages, got both"),
    ("unknown content", BASE.replace('content = "img"', 'content = "imgg"'),
     "process[0].mapping[0].content", 'expected a content model (img), got "imgg"'),
    ("mapping typo", BASE.replace("pages = 16\ncontent", "pages = 16\nmergable = true\ncontent"),
     "process[0].mapping[0].mergable", "expected a known field (content, mergeable, name, pages"),
    ("bad size text", BASE.replace("pages = 16\ncontent", 'size = "8 MiBs"\ncontent'),
     "process[0].mapping[0].size", 'expected a size such as 4096, "64KiB"'),
    ("event action", BASE + '[[event]]\nat = 1\naction = "reboot"\nprocess = "vm"\n',
     "event[0].action", '"knobs", got "reboot"'),
    ("event unknown process", BASE + '[[event]]\nat = 1\naction = "exit"\nprocess = "db"\n',
     "event[0].process", 'expected a process group that exists at 1 s (vm), got "db"'),
    ("selector syntax", BASE + '[[event]]\nat = 1\naction = "exit"\nprocess = "vm[1"\n',
     "event[0].process", 'expected a process such as "guest", "guest[3]" or "guest[0:4]"'),
    ("selector range", BASE + '[[event]]\nat = 1\naction = "exit"\nprocess = "vm[3]"\n',
     "event[0].process", 'expected instances of vm within 0..2, got "vm[3]"'),
    ("after exit", BASE + '[[event]]\nat = 1\naction = "exit"\nprocess = "vm[0]"\n'
                          '[[event]]\nat = 2\naction = "write"\nprocess = "vm"\nmapping = "ram"\n',
     "event[1].process", "expected processes alive at 2 s (vm[0] exited at 1 s)"),
    ("before fork", BASE + '[[event]]\nat = 1\naction = "exit"\nprocess = "kid"\n'
                           '[[event]]\nat = 2\naction = "fork"\nprocess = "vm"\nchild = "kid"\n',
     "event[0].process", 'expected a process group that exists at 1 s (vm), got "kid"'),
    ("fork name clash", BASE + '[[event]]\nat = 1\naction = "fork"\nprocess = "vm"\nchild = "vm"\n',
     "event[0].child", 'expected a new process group name'),
    ("region outside", BASE + '[[event]]\nat = 1\naction = "write"\nprocess = "vm"\n'
                              'mapping = "ram"\nregion = { first_page = 10, pages = 7 }\n',
     "event[0].region", "expected a region inside ram (pages 0..15), got pages 10..16"),
    ("unknown mapping", BASE + '[[event]]\nat = 1\naction = "madvise"\nprocess = "vm"\n'
                               'mapping = "rom"\nadvice = "mergeable"\n',
     "event[0].mapping", 'expected a mapping of vm (ram), got "rom"'),
    ("advice", BASE + '[[event]]\nat = 1\naction = "madvise"\nprocess = "vm"\n'
                      'mapping = "ram"\nadvice = "hugepage"\n',
     "event[0].advice", 'expected "mergeable" or "unmergeable" or "dontneed", got "hugepage"'),
    ("field of another action", BASE + '[[event]]\nat = 1\naction = "exit"\nprocess = "vm"\n'
                                       'child = "x"\n',
     "event[0].child", "expected a known field (action, at, process), got unknown field"),
    ("write bytes", BASE + '[[event]]\nat = 1\naction = "write"\nprocess = "vm"\n'
                           'mapping = "ram"\nbytes = 5000\n',
     "event[0].bytes", "expected an integer from 1 to 4096, got 5000"),
    ("event after duration", '[scenario]\nduration = "10s"\n' + BASE
     + '[[event]]\nat = "1min"\naction = "exit"\nprocess = "vm"\n',
     "event[0].at", "expected a time within the scenario's duration (10 s), got 1 min"),
    ("bad duration", BASE + '[[event]]\nat = "10 parsecs"\naction = "exit"\nprocess = "vm"\n',
     "event[0].at", 'expected a duration (seconds, or a string such as "500ms"'),
    ("negative duration", BASE + '[[event]]\nat = -1\naction = "exit"\nprocess = "vm"\n',
     "event[0].at", "got -1"),
    ("rate", BASE + '[[activity]]\nprocess = "vm"\nmapping = "ram"\nrate = 0\n',
     "activity[0].rate", "expected a number > 0, got 0"),
    ("activity before birth", BASE + '[[event]]\nat = 5\naction = "fork"\nprocess = "vm"\n'
                                     'child = "kid"\n[[activity]]\nprocess = "kid"\n'
                                     'mapping = "ram"\nrate = 1\nstart = 1\n',
     "activity[0].start", "expected a time when kid exists (>= 5 s), got 1"),
    ("stop before start", BASE + '[[activity]]\nprocess = "vm"\nmapping = "ram"\nrate = 1\n'
                                 'start = 5\nstop = 2\n',
     "activity[0].stop", "expected a time after start (5 s), got 2"),
    ("no checkpoint", CONTENT + PROC, "checkpoint", "expected at least one [[checkpoint]], got nothing"),
    ("at and full_scans", CONTENT + PROC + "[[checkpoint]]\nat = 1\nfull_scans = 2\n",
     "checkpoint[0].at", "expected exactly one of at and full_scans, got both"),
    ("unknown counter", BASE + "[[checkpoint]]\nat = 2\nexpect = { pages_shard = 3 }\n",
     "checkpoint[1].expect.pages_shard", "expected a counter (pages_shared, pages_sharing"),
    ("bad bound", BASE + "[[checkpoint]]\nat = 2\nexpect = { pages_shared = { min = 5, max = 2 } }\n",
     "checkpoint[1].expect.pages_shared.max", "expected max >= min (5), got 2"),
    ("bound type", BASE + '[[checkpoint]]\nat = 2\nexpect = { pages_shared = "many" }\n',
     "checkpoint[1].expect.pages_shared", 'expected an integer, got "many"'),
    ("process expectation group", BASE + "[[checkpoint]]\nat = 2\n"
                                         "expect_process = { db = { ksm_merging_pages = 1 } }\n",
     "checkpoint[1].expect_process.db", "expected a process group that exists (vm), got \"db\""),
    ("process counter", BASE + "[[checkpoint]]\nat = 2\n"
                               "expect_process = { vm = { pages_shared = 1 } }\n",
     "checkpoint[1].expect_process.vm.pages_shared",
     "expected a ksm_stat counter (ksm_rmap_items, ksm_zero_pages, ksm_merging_pages"),
    ("timeline interval", BASE + '[timeline]\ninterval = "0s"\n', "timeline.interval",
     'expected a duration > 0, got "0s"'),
]


@pytest.mark.parametrize(("text", "field", "fragment"), [c[1:] for c in INVALID],
                         ids=[c[0] for c in INVALID])
def test_invalid_scenario(text: str, field: str, fragment: str) -> None:
    """Each invalid file fails with ``s.toml: FIELD: expected ..., got ...`` on one line."""
    with pytest.raises(ScenarioError) as info:
        parse(text)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"s.toml: {field}: expected "), msg
    assert fragment in msg, msg
    assert re.search(r", got .+$", msg), msg
    assert field == info.value.field


def test_missing_file(tmp_path: Path) -> None:
    """A scenario file that does not exist is named as such."""
    path = tmp_path / "nope.toml"
    with pytest.raises(ScenarioError, match=r"nope.toml: \(file\): expected an existing scenario "
                                            r"file, got no such file$"):
        load_scenario(path)


def test_empty_content_file(tmp_path: Path) -> None:
    """A content file must have bytes."""
    (tmp_path / "empty.img").write_bytes(b"")
    with pytest.raises(ScenarioError, match=r"content.img.path: expected a non-empty file"):
        parse('[content.img]\nkind = "file"\npath = "empty.img"\n' + PROC + CHECK, tmp_path)


# --- found by fuzzing (tests/test_fuzz_scenario.py) and by reading the loader -----------------
# Each once crashed the loader (a traceback instead of the one-line error), hung it, made it
# allocate without bound, or printed an error over several lines.

EXIT_AT_1 = '[[event]]\nat = 1\naction = "exit"\nprocess = "vm[0]"\n'
FORK_AT_1 = '[[event]]\nat = 1\naction = "fork"\nprocess = "vm"\nchild = "kid"\n'
ACTIVITY = '[[activity]]\nprocess = "vm"\nmapping = "ram"\n'

REGRESSIONS = [
    # tomllib recurses once per level: RecursionError.
    ("deep arrays", BASE + "[timeline]\nx = " + "[" * 3000 + "]" * 3000 + "\n", "(syntax)",
     "expected valid TOML nested less deeply, got arrays or inline tables nested too deeply"),
    ("deep inline tables", BASE + "[timeline]\nx = " + "{a = " * 3000 + "1" + "}" * 3000 + "\n",
     "(syntax)", "nested too deeply"),
    # tomllib's memory grows with the square of a dotted key's parts (6 GB for 40,000).
    ("long dotted key", "a." * 1000 + "b = 1\n" + BASE, "(syntax)",
     "expected keys and table names of at most 16 dotted parts, got a longer one at line 1"),
    ("long table header", BASE + "[" + "a." * 16 + "b]\n", "(syntax)",
     "of at most 16 dotted parts, got a longer one at line 16"),
    # tomllib lets int()'s ValueError for more than 4300 digits through.
    ("decimal integer of 5000 digits", "[scenario]\nseed = " + "9" * 5000 + "\n" + BASE, "(syntax)",
     "expected valid TOML, got an integer of more than 4300 digits"),
    # show() of such an integer raised the same ValueError.
    ("hex integer of 20000 bits", "[scenario]\nseed = 0x" + "f" * 5000 + "\n" + BASE, "scenario.seed",
     "expected an integer from 0 to 18446744073709551615, got an integer of 20000 bits"),
    # Keys were put in the key path as written: a newline split the error line.
    ("key with a newline", '[ksm]\n"a\\nb" = 1\n' + BASE, 'ksm."a\\nb"',
     'expected a KSM knob (run, pages_to_scan'),
    ("key with a line separator", BASE + '[timeline]\n"\u2028\u0085" = 1\n',
     'timeline."\\u2028\\u0085"', 'got unknown field "\\u2028\\u0085"'),
    ("content name with a dot", '[content."a.b"]\nkind = "zero"\nbyte = 1\n' + PROC + CHECK,
     'content."a.b".byte', 'expected no byte for kind "zero" (only for kind fill), got 1'),
    # round(inf): OverflowError.
    ("duration string past float", BASE + f'[[event]]\nat = "{"9" * 310}h"\naction = "exit"\n'
                                          'process = "vm"\n',
     "event[0].at", "expected a duration of at most 292 years (2**63 - 1 ns), got \"999"),
    ("duration float past 292 years", '[scenario]\nduration = 1e300\n' + BASE, "scenario.duration",
     "expected a duration of at most 292 years (2**63 - 1 ns), got 1e+300"),
    ("duration integer past 292 years", BASE + f"[timeline]\ninterval = {10**20}\n",
     "timeline.interval", "expected a duration of at most 292 years"),
    # float("9" * 400) * unit = inf; int(inf): OverflowError.
    ("size string past float", BASE.replace("pages = 16\ncontent", f'size = "{"9" * 400}MiB"\ncontent'),
     "process[0].mapping[0].size", "expected a size below 16 EiB (2**64 bytes), got \"999"),
    ("size integer past 64 bits", BASE.replace("pages = 16\ncontent", f"size = {2**70}\ncontent"),
     "process[0].mapping[0].size", f"expected a size below 16 EiB (2**64 bytes), got {2**70}"),
    # [None] * count: a count of 2**40 allocated 8 TiB; len(range) > sys.maxsize: OverflowError.
    ("count past PID_MAX_LIMIT", BASE.replace("count = 3", f"count = {2**40}"), "process[0].count",
     f"expected an integer from 1 to 4194304, got {2**40}"),
    ("fork count past PID_MAX_LIMIT", BASE + FORK_AT_1 + f"count = {2**63}\n", "event[0].count",
     f"expected an integer from 1 to 4194304, got {2**63}"),
    ("fork of too many children", BASE + FORK_AT_1 + "count = 2000000\n", "event[0].count",
     "expected at most 4194304 children in all (3 processes fork), got 2000000"),
    # math.isnan(10**400): OverflowError.
    ("fraction past float", '[content.img]\nkind = "image"\nzero_fraction = ' + "9" * 400 + "\n"
                            + PROC + CHECK,
     "content.img.zero_fraction", "expected a number from 0 to 1, got an integer of 1329 bits"),
    # rate = inf or a subnormal was accepted; rng.random() / 5e-324 = inf crashed the run.
    ("rate inf", BASE + ACTIVITY + "rate = inf\n", "activity[0].rate",
     "expected a finite number > 0, got inf"),
    ("rate nan", BASE + ACTIVITY + "rate = nan\n", "activity[0].rate",
     "expected a finite number > 0, got nan"),
    ("rate subnormal", BASE + ACTIVITY + "rate = 5e-324\n", "activity[0].rate",
     "expected a rate from 1e-09 to 1e+09 writes per second (the clock counts nanoseconds), "
     "got 5e-324"),
    ("rate past the clock", BASE + ACTIVITY + "rate = 1e10\n", "activity[0].rate",
     "expected a rate from 1e-09 to 1e+09 writes per second"),
    ("rate integer past float", BASE + ACTIVITY + "rate = " + "9" * 400 + "\n", "activity[0].rate",
     "expected a finite number > 0, got an integer of 1329 bits"),
    # int() of a selector's index of more than 4300 digits: ValueError.
    ("selector index of 5000 digits", BASE + '[[event]]\nat = 1\naction = "exit"\n'
                                             f'process = "vm[{"9" * 5000}]"\n',
     "event[0].process", 'expected instances of vm within 0..2, got "vm[999'),
    ("selector range of 5000 digits", BASE + '[[event]]\nat = 1\naction = "exit"\n'
                                             f'process = "vm[{"9" * 5000}:{"9" * 4999}]"\n',
     "event[0].process", "expected a non-empty range [first:stop] with first < stop"),
    # An expectation the reports could not print (str() of more than 4300 digits).
    ("expectation past 64 bits", BASE + f"[[checkpoint]]\nat = 2\nexpect = {{ pages_shared = {2**64} }}\n",
     "checkpoint[1].expect.pages_shared",
     f"expected an integer from -9223372036854775808 to 18446744073709551615, got {2**64}"),
    # open() of a path with a NUL: ValueError.
    ("NUL in a content path", '[content.img]\nkind = "file"\npath = "a\\u0000b"\n' + PROC + CHECK,
     "content.img.path", 'expected a file name without NUL characters, got "a\\u0000b"'),
    # "expected an array of tables ([[process[0].mapping]]), got an array": which item, what it was.
    ("array item not a table", CONTENT + '[[process]]\nname = "vm"\nmapping = [{ pages = 1, '
                                         'content = "img" }, "ram"]\n' + CHECK,
     "process[0].mapping[1]", 'expected a table, as [[process.mapping]] makes, got "ram"'),
    # A long value filled the line.
    ("long string is cut", '[content.img]\nkind = "' + "x" * 5000 + '"\n' + PROC + CHECK,
     "content.img.kind", 'got "' + "x" * 100 + '" (5000 characters)'),
]


@pytest.mark.parametrize(("text", "field", "fragment"), [c[1:] for c in REGRESSIONS],
                         ids=[c[0] for c in REGRESSIONS])
def test_invalid_scenario_regressions(text: str, field: str, fragment: str) -> None:
    """Inputs that once crashed or misled the loader: now ``s.toml: FIELD: expected ..., got ...``."""
    test_invalid_scenario(text, field, fragment)


def test_exits_of_a_large_group(tmp_path: Path) -> None:
    """Exits are kept as runs of instances: a group of PID_MAX_LIMIT processes costs nothing.

    vm[100:200] exits at 1 s: at 2 s vm[99] and vm[200] are alive, vm[50:101]
    includes the exited vm[100], and vm[150] has exited.
    """
    big = BASE.replace("count = 3", "count = 4194304")
    exit_ = '[[event]]\nat = 1\naction = "exit"\nprocess = "vm[100:200]"\n'

    def write(sel: str) -> str:
        return f'[[event]]\nat = 2\naction = "write"\nprocess = "{sel}"\nmapping = "ram"\n'

    sc = parse(big + exit_ + write("vm[99]") + write("vm[200]") + write("vm[200:]"))
    assert [e.action for e in sc.events] == ["exit", "write", "write", "write"]
    for sel, gone in (("vm[50:101]", 100), ("vm[150]", 150), ("vm", 100), ("vm[199:]", 199)):
        with pytest.raises(ScenarioError, match=re.escape(
                f'event[1].process: expected processes alive at 2 s (vm[{gone}] exited at 1 s), '
                f'got "{sel}"')):
            parse(big + exit_ + write(sel))


def test_file_too_large(tmp_path: Path) -> None:
    """A file over 1 MiB is refused before it is parsed (and /dev/zero is not read forever)."""
    f = tmp_path / "big.toml"
    f.write_bytes(b"# " + b"x" * (1 << 20) + b"\n" + BASE.encode())
    for path in (f, Path("/dev/zero")):
        with pytest.raises(ScenarioError, match=re.escape(
                f"{path}: (file): expected a scenario file of at most 1 MiB, got a larger file")):
            load_scenario(path)


def test_non_utf8_byte_is_located(tmp_path: Path) -> None:
    """A byte that is not UTF-8 is named with its line and column."""
    f = tmp_path / "latin1.toml"
    f.write_bytes(b"[scenario]\nname = \"caf\xe9\"\n" + BASE.encode())
    with pytest.raises(ScenarioError, match=re.escape(
            f"{f}: (file): expected a readable UTF-8 text file, got byte 0xe9 at line 2, "
            "column 12 (invalid continuation byte)")):
        load_scenario(f)


def test_crlf_and_cr_line_ends_are_read_as_before(tmp_path: Path) -> None:
    """The file is read as bytes now; line ends are still translated as text mode did."""
    f = tmp_path / "dos.toml"
    f.write_bytes(('[scenario]\ndescription = """two\nlines"""\n' + BASE).replace("\n", "\r\n")
                  .encode())
    assert load_scenario(f).description == "two\nlines"


@pytest.mark.parametrize(("make", "kind"), [("fifo", "a FIFO"), ("dir", "a directory")])
def test_content_path_that_is_not_a_file(tmp_path: Path, make: str, kind: str) -> None:
    """A FIFO as a content file was opened blocking: the check waited for a writer forever."""
    target = tmp_path / "img"
    if make == "fifo":
        os.mkfifo(target)
    else:
        target.mkdir()
    text = '[content.img]\nkind = "file"\npath = "img"\n' + PROC + CHECK
    result: list[BaseException] = []
    worker = threading.Thread(target=lambda: result.append(_raised(text, tmp_path)), daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert result, "the loader blocked on the content file"
    assert str(result[0]) == (f's.toml: content.img.path: expected a regular file or a block '
                              f'device, got "img" ({kind})')


def _raised(text: str, base: Path) -> BaseException:
    try:
        parse(text, base)
    except ScenarioError as e:
        return e
    raise AssertionError("no error")


def test_many_mappings_are_checked_in_linear_time() -> None:
    """Mapping names were checked for duplicates pairwise: 30,000 mappings took 30 s, now 1 s."""
    maps = "".join(f'[[process.mapping]]\nname = "m{i}"\npages = 1\ncontent = "img"\n'
                   for i in range(30_000))
    start = time.monotonic()
    sc = parse(CONTENT + '[[process]]\nname = "vm"\n' + maps + CHECK)
    assert len(sc.processes[0].mappings) == 30_000
    assert time.monotonic() - start < 8
