"""Each section of a scenario file read into :mod:`~ksmlab.scenario.model` objects.

``[ksm]``, ``[content.NAME]``, ``[[process]]`` (with their mappings),
``[[event]]`` (read in time order, so forks and exits are followed by
:class:`~ksmlab.scenario.groups.Groups`), ``[[activity]]`` and
``[[checkpoint]]``.  Plain values come through the fields of
:mod:`~ksmlab.scenario.schema`; what is checked here is what no single
field knows: references between sections, times within the run, pairs of
fields that exclude each other, a content file that must be readable.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, cast

from ksmlab.constants import PAGE_SIZE
from ksmlab.scenario.groups import Exits, Groups, GroupState
from ksmlab.scenario.knobs import KNOBS, knob_text, ordered, pages_to_scan_refused
from ksmlab.scenario.model import (
    BYTE_COUNTERS,
    GLOBAL_COUNTERS,
    PROCESS_COUNTERS,
    Checkpoint,
    Content,
    Event,
    ExitEvent,
    Expectation,
    ForkEvent,
    KnobsEvent,
    MadviseEvent,
    Mapping,
    PrctlEvent,
    ProcessGroup,
    Selector,
    WriteActivity,
    WriteEvent,
)
from ksmlab.scenario.parse import ScenarioError, Shown, Table, key_text, names, show
from ksmlab.scenario.schema import (
    CONTENT_FIELDS,
    DEFAULT_SCAN_TIMEOUT_NS,
    MAX_INT,
    MAX_PROCESSES,
    MAX_RATE,
    MIN_RATE,
    MISSING,
    NAME,
    ActivityTable,
    CheckpointTable,
    ContentTable,
    EventTable,
    MappingTable,
    ProcessTable,
)
from ksmlab.scenario.units import NS_PER_S, format_duration, parse_size

_FILE_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device",
               stat.S_IFSOCK: "a socket"}


def check_time(t: Table, duration: int | None, at_ns: int, name: str) -> None:
    """Refuse a time after the scenario's *duration*; *name* is the field's key path."""
    if duration is not None and at_ns > duration:
        raise ScenarioError(t.source, name,
                            f"a time within the scenario's duration "
                            f"({format_duration(duration / NS_PER_S)})",
                            format_duration(at_ns / NS_PER_S))


def checked_knobs(items: Iterable[tuple[str, object]], values: dict[str, str],
                  fail: Callable[[str, str, str], ScenarioError]) -> dict[str, str]:
    """*values* plus the knobs of *items* (name, TOML value) as the text to write.

    The first unknown knob or bad value raises ``fail(name, expected, got)``.
    """
    for name, value in items:
        if name not in KNOBS:
            raise fail(name, f"a KSM knob ({', '.join(KNOBS)})", f"unknown knob {show(name)}")
        try:
            values[name] = knob_text(name, value)
        except ValueError as e:
            raise fail(name, str(e), show(value)) from None
    return values


def ksm_knobs(t: Table) -> tuple[tuple[str, str], ...]:
    """``[ksm]``: the knobs to write at the start, ``run`` 1 unless given."""
    t.used.update(t.data)
    values = checked_knobs(t.data.items(), {},
                           lambda name, expected, got: t.fail(name, expected, Shown(got)))
    if pages_to_scan_refused(values):
        raise t.fail("pages_to_scan", "no pages_to_scan with advisor_mode = \"scan-time\" "
                     "(the kernel refuses it: the advisor sets it)", int(values["pages_to_scan"]))
    values.setdefault("run", "1")
    return ordered(values)


def contents(source: str, t: Table | None, seed: int, base_dir: Path) -> dict[str, Content]:
    """``[content.NAME]``; relative file paths are relative to *base_dir*."""
    if t is None:
        raise ScenarioError(source, "content", "at least one content model ([content.NAME])",
                            "nothing")
    out: dict[str, Content] = {}
    for cname in t.data:
        c = t.table(cname, required=True)
        assert c is not None
        if not NAME.match(cname):
            raise ScenarioError(source, c.path, "a name of letters, digits, _ . -", show(cname))
        kind = c.read(ContentTable.KIND)
        for key in c.data:
            if key not in CONTENT_FIELDS[kind]:
                kinds = [k for k, f in CONTENT_FIELDS.items() if key in f]
                where = f"only for kind {' or '.join(kinds)}" if kinds else "unknown field"
                raise c.fail(key, f"no {key_text(key)} for kind \"{kind}\" ({where})", c.data[key])
        cseed = c.read(ContentTable.SEED, _stable_seed(seed, "content", cname))
        zf = c.read(ContentTable.ZERO_FRACTION)
        pf = c.read(ContentTable.PRIVATE_FRACTION)
        if zf + pf > 1.0:
            raise c.fail("private_fraction", f"zero_fraction + private_fraction <= 1 "
                         f"(zero_fraction is {zf:g})", pf)
        pages = c.read(ContentTable.PAGES) if kind == "image" else None
        byte = c.read(ContentTable.BYTE) if kind == "fill" else 0
        offset = c.read(ContentTable.OFFSET) if kind in ("image", "file") else 0
        path = _content_file(c, offset, base_dir) if kind == "file" else None
        if pages is not None and offset >= pages:
            raise c.fail("offset", f"an offset inside the image (< {pages} pages)",
                         c.data["offset"])
        out[cname] = Content(cname, cast(Any, kind), cseed, pages, byte, path, offset, zf, pf)
        c.done()
    if not out:
        raise ScenarioError(source, "content", "at least one content model ([content.NAME])",
                            "an empty table")
    return out


def _stable_seed(*parts: object) -> int:
    """A seed derived from *parts*, the same in every run and Python (no ``hash()``)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "big")


def _content_file(c: Table, offset_pages: int, base_dir: Path) -> Path:
    raw = c.read(ContentTable.PATH)
    path = Path(os.path.expanduser(raw))
    if not path.is_absolute():
        path = base_dir / path
    try:
        # O_NONBLOCK: opening a FIFO would otherwise wait for a writer, forever.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except ValueError:
        raise c.fail("path", "a file name without NUL characters", raw) from None
    except OSError as e:
        raise c.fail("path", "a readable file", Shown(f"{show(raw)} ({e.strerror})")) from None
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise c.fail("path", "a regular file or a block device",
                         Shown(f"{show(raw)} ({_FILE_KINDS.get(stat.S_IFMT(mode), 'special file')})"))
        size = os.lseek(fd, 0, os.SEEK_END)
    except OSError as e:
        raise c.fail("path", "a readable file", Shown(f"{show(raw)} ({e.strerror})")) from None
    finally:
        os.close(fd)
    if size == 0:
        raise c.fail("path", "a non-empty file", Shown(f"{show(raw)} (0 bytes)"))
    if offset_pages * PAGE_SIZE >= size:
        raise c.fail("offset", f"an offset inside the file ({size} bytes)",
                     c.data.get("offset"))
    return path.resolve()


def processes(groups: Groups, top: Table, known: dict[str, Content]) -> tuple[ProcessGroup, ...]:
    """``[[process]]`` and their ``[[process.mapping]]``; each group is added to *groups*."""
    out: list[ProcessGroup] = []
    for p in top.tables("process"):
        name = p.read(ProcessTable.NAME)
        if not NAME.match(name):
            raise p.fail("name", "a name of letters, digits, _ . - (not starting with a digit)",
                         name)
        if name in groups.known:
            raise p.fail("name", "a name no other process group has", name)
        count = p.read(ProcessTable.COUNT)
        start = p.read(ProcessTable.START)
        merge_any = p.read(ProcessTable.MERGE_ANY)
        maps: list[Mapping] = []
        mapped: set[str] = set()
        for m in p.tables("mapping"):
            mname = m.read(MappingTable.NAME)
            if not NAME.match(mname) or mname in mapped:
                raise m.fail("name", "a name unique within the process (letters, digits, _ . -)",
                             mname)
            if m.has("size") == m.has("pages"):
                raise ScenarioError(m.source, m.name("size"),
                                    "exactly one of size and pages",
                                    "both" if m.has("size") else "neither")
            pages = m.read(MappingTable.SIZE) if m.has("size") else m.read(MappingTable.PAGES)
            content = m.read(MappingTable.CONTENT)
            if content not in known:
                raise m.fail("content", f"a content model ({names(known)})", content)
            mergeable = m.read(MappingTable.MERGEABLE)
            m.done()
            maps.append(Mapping(mname, pages, content, mergeable))
            mapped.add(mname)
        if not maps:
            raise p.fail("mapping", "at least one [[process.mapping]]", MISSING)
        p.done()
        groups.known[name] = GroupState(start, count, {m.name: m.pages for m in maps}, Exits(),
                                        p.path)
        out.append(ProcessGroup(name, count, start, merge_any, tuple(maps)))
    if not out:
        raise ScenarioError(top.source, "process", "at least one [[process]]", "nothing")
    return tuple(out)


def events(groups: Groups, top: Table, duration: int | None) -> tuple[Event, ...]:
    """``[[event]]``, read in time order (ties in file order) so that lives are followed."""
    timed: list[tuple[int, int, Table]] = []
    for i, e in enumerate(list(top.tables("event"))):
        at = e.read(EventTable.AT)
        check_time(e, duration, at, e.name("at"))
        timed.append((at, i, e))
    timed.sort(key=lambda x: (x[0], x[1]))
    out: list[Event] = []
    for at, i, e in timed:
        action = e.read(EventTable.ACTION)
        ev: Event
        if action == "knobs":
            kt = e.table("set", required=True)
            assert kt is not None
            # ksm_knobs adds run=1 for the start; an event writes only what it names.
            ev = KnobsEvent(i, at, tuple((n, v) for n, v in ksm_knobs(kt) if n in kt.data))
        else:
            sel = groups.selector(e, "process")
            g = groups.group_for(e, "process", sel, at)
            first, stop = sel.first, g.count if sel.stop is None else sel.stop
            gone = g.exits.first_gone(first, stop)
            if gone is not None:
                j, when = gone
                raise e.fail("process", f"processes alive at {format_duration(at / NS_PER_S)} "
                             f"({sel.group}[{j}] exited at {format_duration(when / NS_PER_S)})",
                             sel.text)
            ev = _life_event(groups, e, i, at, action, sel, g, first, stop)
        e.done()
        out.append(ev)
    return tuple(out)


def _life_event(groups: Groups, e: Table, i: int, at: int, action: str, sel: Selector,
                g: GroupState, first: int, stop: int) -> Event:
    """An event acting on the live processes ``[first, stop)`` of *sel*'s group *g*."""
    if action in ("write", "madvise"):
        mapping, region = groups.mapping_region(e, g, sel.group)
        if action == "write":
            data = e.read(EventTable.DATA)
            nbytes = e.read(EventTable.BYTES)
            return WriteEvent(i, at, sel, mapping, region, cast(Any, data), nbytes)
        advice = e.read(EventTable.ADVICE)
        return MadviseEvent(i, at, sel, mapping, region, cast(Any, advice))
    if action == "fork":
        child = e.read(EventTable.CHILD)
        if not NAME.match(child) or child in groups.known:
            raise e.fail("child", "a new process group name (letters, digits, _ . -)", child)
        n = e.read(EventTable.COUNT)
        size = (stop - first) * n
        if size > MAX_PROCESSES:
            raise e.fail("count", f"at most {MAX_PROCESSES} children in all "
                         f"({stop - first} processes fork)", n)
        groups.known[child] = GroupState(at, size, dict(g.mappings), Exits(), e.path)
        return ForkEvent(i, at, sel, child, n)
    if action == "exit":
        g.exits.add(first, stop, at)
        return ExitEvent(i, at, sel)
    return PrctlEvent(i, at, sel, e.read(EventTable.MERGE_ANY))


def activities(groups: Groups, top: Table, duration: int | None) -> tuple[WriteActivity, ...]:
    """``[[activity]]``: writes at a rate, from when the group exists."""
    out: list[WriteActivity] = []
    for i, a in enumerate(top.tables("activity")):
        sel = groups.selector(a, "process")
        g = groups.group_for(a, "process", sel, None)
        mapping, region = groups.mapping_region(a, g, sel.group)
        value, is_share = a.read(ActivityTable.RATE)
        pages = region.pages if region is not None else g.mappings[mapping]
        rate = value * pages if is_share else value
        if not MIN_RATE <= rate <= MAX_RATE:
            got = (Shown(f"{show(a.data['rate'])} of {pages} pages, {rate:g} writes per second")
                   if is_share else a.data["rate"])
            raise a.fail("rate", f"a rate from {MIN_RATE:g} to {MAX_RATE:g} writes per second "
                         f"(the clock counts nanoseconds)", got)
        start = a.read(ActivityTable.START)
        if start is None:
            start = g.birth_ns
        elif start < g.birth_ns:
            raise a.fail("start", f"a time when {sel.group} exists "
                         f"(>= {format_duration(g.birth_ns / NS_PER_S)})", a.data["start"])
        stop = a.read(ActivityTable.STOP)
        if stop is not None and stop <= start:
            raise a.fail("stop", f"a time after start ({format_duration(start / NS_PER_S)})",
                         a.data["stop"])
        check_time(a, duration, start, a.name("start"))
        arrivals = a.read(ActivityTable.ARRIVALS)
        pick = a.read(ActivityTable.PICK)
        data = a.read(ActivityTable.DATA)
        nbytes = a.read(ActivityTable.BYTES)
        a.done()
        out.append(WriteActivity(i, sel, mapping, region, rate, start, stop, cast(Any, arrivals),
                                 cast(Any, pick), cast(Any, data), nbytes,
                                 value if is_share else None))
    return tuple(out)


def checkpoints(groups: Groups, top: Table, duration: int | None) -> tuple[Checkpoint, ...]:
    """``[[checkpoint]]``: at a time or after full scans, with what is expected then."""
    out: list[Checkpoint] = []
    for i, c in enumerate(top.tables("checkpoint")):
        if c.has("at") == c.has("full_scans"):
            raise ScenarioError(c.source, c.name("at"), "exactly one of at and full_scans",
                                "both" if c.has("at") else "neither")
        at = c.read(CheckpointTable.AT)
        scans = c.read(CheckpointTable.FULL_SCANS)
        if at is not None:
            check_time(c, duration, at, c.name("at"))
            if c.has("timeout"):
                raise c.fail("timeout", "no timeout for a checkpoint at a time (only with "
                             "full_scans)", c.data["timeout"])
            name = c.read(CheckpointTable.NAME, format_duration(at / NS_PER_S))
            timeout = at
        else:
            timeout = c.read(CheckpointTable.TIMEOUT,
                             duration if duration is not None else DEFAULT_SCAN_TIMEOUT_NS)
            check_time(c, duration, timeout, c.name("timeout"))
            name = c.read(CheckpointTable.NAME, f"{scans} full scan{'s' if scans != 1 else ''}")
        expect: list[Expectation] = []
        et = c.table("expect")
        if et is not None:
            for counter in et.data:
                if counter not in GLOBAL_COUNTERS:
                    raise et.fail(counter, f"a counter ({', '.join(GLOBAL_COUNTERS)})",
                                  Shown(f"unknown counter {show(counter)}"))
                expect.append(_expectation(et, counter, None))
            et.done()
        pt = c.table("expect_process")
        if pt is not None:
            for key in pt.data:
                sel = groups.selector_key(pt, key)
                groups.group_for(pt, key, sel, None)
                per = pt.table(key, required=True)
                assert per is not None
                for counter in per.data:
                    if counter not in PROCESS_COUNTERS:
                        raise per.fail(counter, f"a ksm_stat counter ({', '.join(PROCESS_COUNTERS)})",
                                       Shown(f"unknown counter {show(counter)}"))
                    expect.append(_expectation(per, counter, sel))
                per.done()
        c.done()
        out.append(Checkpoint(i, name, at, scans, timeout, tuple(expect)))
    if not out:
        raise ScenarioError(top.source, "checkpoint", "at least one [[checkpoint]]", "nothing")
    return tuple(out)


def _expectation(t: Table, counter: str, sel: Selector | None) -> Expectation:
    """The expected value (exact, or ``{min, max}``) of *counter* in *t*."""
    sized = counter in BYTE_COUNTERS
    unit = "an integer" + (' or a size such as "40MiB"' if sized else "")

    def value(v: Any, where: str) -> int:
        if isinstance(v, int) and not isinstance(v, bool):
            if not -(1 << 63) <= v <= MAX_INT:  # counters are 64-bit: signed or unsigned
                raise ScenarioError(t.source, where,
                                    f"an integer from {-(1 << 63)} to {MAX_INT}", show(v))
            return v
        if sized and isinstance(v, str):
            try:
                neg = v.strip().startswith("-")
                n = parse_size(v.strip().removeprefix("-"))
                return -n if neg else n
            except ValueError as e:  # say which units are accepted ("2 GB" is refused)
                raise ScenarioError(t.source, where, f"an integer or {e}", show(v)) from None
        raise ScenarioError(t.source, where, unit, show(v))

    raw = t.raw(counter)
    if isinstance(raw, dict):
        bounds = Table(t.source, raw, t.name(counter))
        lo = bounds.raw("min", None)
        hi = bounds.raw("max", None)
        bounds.done("min, max")
        if lo is None and hi is None:
            raise ScenarioError(t.source, bounds.path, "min and/or max", "an empty table")
        low = None if lo is None else value(lo, bounds.name("min"))
        high = None if hi is None else value(hi, bounds.name("max"))
        if low is not None and high is not None and low > high:
            raise ScenarioError(t.source, bounds.name("max"), f"max >= min ({low})",
                                show(high))
        return Expectation(counter, sel, low, high)
    exact = value(raw, t.name(counter))
    return Expectation(counter, sel, exact, exact)


__all__ = ["activities", "check_time", "checked_knobs", "checkpoints", "contents", "events",
           "ksm_knobs", "processes"]
