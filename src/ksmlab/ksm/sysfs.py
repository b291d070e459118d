"""``/sys/kernel/mm/ksm``: the attribute table, with the kernel's parsers and errors.

Each file is an :class:`Attr` with a ``show`` that formats like ``sysfs_emit``
and, for writable files, a ``store`` that parses like ``kstrtouint`` /
``kstrtoul`` / ``kstrtoint`` / ``kstrtobool`` and raises the errno the kernel
returns.  :func:`build_attrs` builds the table over any engine's KSM state
(:class:`KsmFiles`: SimKernel's :class:`~ksmlab.ksm.interface.Ksm`, the bulk
engine's :class:`~ksmlab.bulk.engine.BulkKsm`).  :class:`KsmSysfs` is the
dict-like view users see: text in, text out, exactly as reading and writing
the real files (reads come back without the trailing newline, as
``open(...).read().strip()`` would give).  An engine that does not model some
files says which, and why; the view then answers NotModelledError for them.

What the VFS does before a store is called is modelled too (recorded on the
real kernel, see tests/sysfs_cases.py): a write of more than 4096 bytes is cut
to 4096, the text ends at the first NUL, an empty write succeeds without
calling the store, and writing a read-only file fails with EACCES at open.

:data:`KNOB_SYNTAX`, :func:`parse_knob` and :func:`store_text` are what the
stores judge on the text alone, the same for every engine, so the engines
answer every string alike.  ``tests/test_fuzz_sysfs.py`` holds them to the
real kernel's answers for arbitrary strings.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

from ksmlab.errors import KsmSimError, NotModelledError, kernel_error
from ksmlab.ksm.advisor import AdvisorKnobs
from ksmlab.ksm.defaults import U32

U64 = 0xFFFFFFFFFFFFFFFF
INT_MAX = 0x7FFFFFFF
LLONG_MAX = 0x7FFFFFFFFFFFFFFF
MAX_WRITE = 4096  # PAGE_SIZE: sysfs never passes more to a store
_DIGITS = re.compile(r"[0-9]*")  # ASCII only: "\u0663" (Arabic-Indic three) is no digit here

KNOB_WRITE_ORDER = (
    "advisor_max_cpu", "advisor_min_pages_to_scan", "advisor_max_pages_to_scan",
    "advisor_target_scan_time", "advisor_mode", "pages_to_scan", "sleep_millisecs",
    "smart_scan", "use_zero_pages", "stable_node_chains_prune_millisecs",
    "merge_across_nodes", "max_page_sharing", "run",
)
"""The order in which to write several knobs so that no write is refused or undone.

The advisor's parameters come before ``advisor_mode`` (a mode change resets
``pages_to_scan`` from ``advisor_min_pages_to_scan``), ``advisor_mode``
before ``pages_to_scan`` (refused with EINVAL under scan-time),
``merge_across_nodes`` and ``max_page_sharing`` late (EBUSY while KSM pages
exist), and ``run`` last.  Used by the scenario runner and by LinuxKernel's
restore.
"""


class ParseError(KsmSimError):
    """A kstrto* parse failure, carrying the errno the parser returns."""

    def __init__(self, err: int) -> None:
        super().__init__(err)
        self.errno = err


def _kstrtoull(s: str) -> int:
    """``_kstrtoull(s, 10)``: decimal digits, one optional newline, nothing else (no sign).

    The digits are parsed as far as they go and an overflow wins over what
    follows: "99999999999999999999x" is ERANGE, not EINVAL, on the kernel.
    """
    digits = _DIGITS.match(s)
    assert digits is not None  # [0-9]* matches every string
    end = digits.end()
    significant = s[:end].lstrip("0")
    if len(significant) > len(str(U64)) or int(significant or "0") > U64:
        raise ParseError(errno.ERANGE)
    rest = s[end:]
    if not end or rest not in ("", "\n"):
        raise ParseError(errno.EINVAL)
    return int(significant or "0")


def kstrtoull(s: str) -> int:
    """``kstrtoull(s, 10)``: one optional '+', then as :func:`_kstrtoull`."""
    return _kstrtoull(s[1:] if s.startswith("+") else s)


def kstrtouint(s: str) -> int:
    """``kstrtouint(s, 10)``: as kstrtoull, ERANGE above 2^32-1."""
    value = kstrtoull(s)
    if value > U32:
        raise ParseError(errno.ERANGE)
    return value


def kstrtoint(s: str) -> int:
    """``kstrtoint(s, 10)``: signed, ERANGE outside the range of int.

    After a '-' no '+' is allowed ("-+5" is EINVAL); without one, as kstrtoull.
    """
    if s.startswith("-"):
        magnitude = _kstrtoull(s[1:])
        if magnitude > LLONG_MAX + 1:
            raise ParseError(errno.ERANGE)
        value = -magnitude
    else:
        value = kstrtoull(s)
        if value > LLONG_MAX:
            raise ParseError(errno.ERANGE)
    if not -INT_MAX - 1 <= value <= INT_MAX:
        raise ParseError(errno.ERANGE)
    return value


def kstrtobool(s: str) -> bool:
    """``kstrtobool``: decided by the first character (two for "on"/"of")."""
    first = s[:1]
    if first and first in "eEyYtT1":
        return True
    if first and first in "dDnNfF0":
        return False
    if first in ("o", "O") and len(s) > 1:
        if s[1] in "nN":
            return True
        if s[1] in "fF":
            return False
    raise ParseError(errno.EINVAL)


def sysfs_streq(a: str, b: str) -> bool:
    """``sysfs_streq``: equal, ignoring one trailing newline on either side."""
    return a.removesuffix("\n") == b.removesuffix("\n")


@dataclass(frozen=True, slots=True)
class Attr:
    """One file of /sys/kernel/mm/ksm (the kernel's ``KSM_ATTR``/``KSM_ATTR_RO``).

    Attributes:
        name: file name.
        show: returns the file's text without the trailing newline.
        store: parses and applies a write (already cut and NUL-terminated);
            None for a read-only file (mode 0444).
    """

    name: str
    show: Callable[[], str]
    store: Callable[[str], None] | None = None


@dataclass(frozen=True, slots=True)
class KnobSyntax:
    """What a knob's store accepts, judged on the text alone (before any state is looked at).

    Attributes:
        parse: the kstrto* function the store calls.
        parse_errno: the store returns the parser's own errno (ERANGE for a
            number too big); False: it turns every parse error into EINVAL.
        lo, hi: parsed values outside [lo, hi] are refused with EINVAL.
        kept: the store keeps ``value & kept`` (a narrower C variable than the
            parser's); None: the whole value.
    """

    parse: Callable[[str], int]
    parse_errno: bool = False
    lo: int | None = None
    hi: int | None = None
    kept: int | None = None


KNOB_SYNTAX: dict[str, KnobSyntax] = {
    "sleep_millisecs": KnobSyntax(kstrtouint),
    "pages_to_scan": KnobSyntax(kstrtouint),
    "run": KnobSyntax(kstrtouint, hi=2),
    "merge_across_nodes": KnobSyntax(kstrtoull, parse_errno=True, hi=1),
    "max_page_sharing": KnobSyntax(kstrtoint, parse_errno=True, lo=2),
    "stable_node_chains_prune_millisecs": KnobSyntax(kstrtouint),
    "use_zero_pages": KnobSyntax(kstrtobool, parse_errno=True),
    "smart_scan": KnobSyntax(kstrtobool, parse_errno=True),
    "advisor_max_cpu": KnobSyntax(kstrtoull, kept=U32),  # kstrtoul into an unsigned int
    "advisor_min_pages_to_scan": KnobSyntax(kstrtoull),
    "advisor_max_pages_to_scan": KnobSyntax(kstrtoull),
    "advisor_target_scan_time": KnobSyntax(kstrtoull, lo=1),
}
"""Every numeric or boolean knob (all but ``advisor_mode``); shared by the engines."""

ADVISOR_MODES = ("none", "scan-time")
"""The words ``advisor_mode`` accepts, the one knob that is not a number."""

_PARSER_RANGE: dict[Callable[[str], int], tuple[int, int]] = {
    kstrtouint: (0, U32), kstrtoull: (0, U64), kstrtoint: (-INT_MAX - 1, INT_MAX),
    kstrtobool: (0, 1),
}


def knob_range(name: str) -> tuple[int, int]:
    """``(low, high)``: the values a store of knob *name* accepts and keeps as written.

    The parser's range, cut by the store's own bounds and by what the variable
    keeps; the scenario layer checks knob values against it before anything
    runs.  KeyError for ``advisor_mode`` (see :data:`ADVISOR_MODES`) and for a
    name that is no knob.
    """
    syntax = KNOB_SYNTAX[name]
    low, high = _PARSER_RANGE[syntax.parse]
    if syntax.lo is not None:
        low = max(low, syntax.lo)
    if syntax.hi is not None:
        high = min(high, syntax.hi)
    if syntax.kept is not None:
        high = min(high, syntax.kept)
    return low, high


def kept_value(name: str, value: int) -> int:
    """What knob *name* holds after its store accepted *value* (see :attr:`KnobSyntax.kept`)."""
    kept = KNOB_SYNTAX[name].kept
    return value if kept is None else value & kept


def brief(text: str, limit: int = 40) -> str:
    """``repr(text)``, shortened for an error message (a write can be 4096 bytes)."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} chars)"


def parse_knob(name: str, text: str) -> int:
    """The value a store of *text* gives knob *name*, or its errno as a KernelError.

    *text* is what the store receives (see :func:`store_text`).  Only the
    text is judged here; what depends on state (EBUSY, the advisor holding
    pages_to_scan) is the store's.  Booleans come back as 0 or 1.
    """
    syntax = KNOB_SYNTAX[name]
    try:
        value = int(syntax.parse(text))
    except ParseError as e:
        err = e.errno if syntax.parse_errno else errno.EINVAL
        raise kernel_error(err, f"{name}={brief(text)}") from None
    if (syntax.lo is not None and value < syntax.lo) or (syntax.hi is not None
                                                         and value > syntax.hi):
        raise kernel_error(errno.EINVAL, f"{name}={value}")
    return value


def no_such_file(name: object) -> KeyError:
    """The KeyError for a name that is not a file of /sys/kernel/mm/ksm."""
    return KeyError(f"no such file in /sys/kernel/mm/ksm: {name!r}")


def require_text(name: str, value: object) -> None:
    """TypeError naming *value* unless it is a str (sysfs files are written as text)."""
    if not isinstance(value, str):
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        msg = f"sysfs values are text: got {type(value).__name__} {shown} for {name!r}"
        raise TypeError(msg)


def store_text(name: str, value: str) -> str | None:
    """The text a store function receives for ``write(2)`` of *value*; None if it is not called.

    The value is written as UTF-8 (a lone surrogate cannot be: ValueError).
    The VFS passes at most :data:`MAX_WRITE` bytes, the store sees them up to
    the first NUL, and an empty write never reaches it.  Bytes cut in the
    middle of a character become U+FFFD, which no parser accepts, as the
    kernel accepts no non-ASCII byte.
    """
    try:
        raw = value.encode()
    except UnicodeEncodeError as e:
        msg = f"sysfs value for {name!r} is not encodable as UTF-8: {brief(value)} ({e.reason})"
        raise ValueError(msg) from None
    if not raw:
        return None
    raw = raw[:MAX_WRITE]
    raw = raw.split(b"\0", 1)[0]
    return raw.decode(errors="replace")


ADVISOR_FILES = ("advisor_mode", "advisor_max_cpu", "advisor_min_pages_to_scan",
                 "advisor_max_pages_to_scan", "advisor_target_scan_time")
"""The scan-time advisor's files (Linux 6.10+)."""


class KsmFiles(Protocol):
    """An engine's KSM state as the attribute table reads and writes it.

    Knobs and counters carry their files' names.  Plain knobs are set
    directly; the stores with side effects or engine-specific refusals are
    methods (the kernel's ``*_store`` after parsing).  An engine may raise
    NotModelledError from a store for a value it does not model.
    """

    run: int
    pages_to_scan: int
    sleep_millisecs: int
    max_page_sharing: int
    merge_across_nodes: int
    use_zero_pages: bool
    smart_scan: bool
    stable_node_chains_prune_millisecs: int
    advisor_scan_time: bool
    advisor: AdvisorKnobs

    def counter(self, name: str) -> int:
        """The value of counter file *name* (one of :data:`COUNTER_FILES`)."""
        ...

    def wake_ksmd(self) -> None:
        """Wake ksmd now (a new ``sleep_millisecs`` applies at once)."""
        ...

    def set_run(self, flags: int) -> None:
        """``run_store``."""
        ...

    def set_max_page_sharing(self, knob: int) -> None:
        """``max_page_sharing_store``."""
        ...

    def set_merge_across_nodes(self, knob: int) -> None:
        """``merge_across_nodes_store``."""
        ...

    def set_advisor_mode(self, scan_time: bool) -> None:
        """``advisor_mode_store``."""
        ...


COUNTER_FILES = ("pages_scanned", "pages_shared", "pages_sharing", "pages_unshared",
                 "pages_volatile", "pages_skipped", "ksm_zero_pages", "full_scans",
                 "stable_node_chains", "stable_node_dups", "general_profit")
"""The read-only files: every one a counter (:meth:`KsmFiles.counter`)."""


def build_attrs(ksm: KsmFiles) -> dict[str, Attr]:
    """The attribute table of *ksm*, in the kernel's ``ksm_attrs[]`` order."""

    def counter(name: str) -> Attr:
        return Attr(name, lambda: str(ksm.counter(name)))

    def knob_store(name: str, apply: Callable[[int], None]) -> Callable[[str], None]:
        return lambda text: apply(parse_knob(name, text))

    def setter(name: str) -> Callable[[int], None]:
        return lambda v: setattr(ksm, name, v)

    def bool_setter(name: str) -> Callable[[int], None]:
        return lambda v: setattr(ksm, name, bool(v))

    def store_pages_to_scan(text: str) -> None:
        if ksm.advisor_scan_time:
            raise kernel_error(errno.EINVAL, "pages_to_scan is set by the advisor")
        ksm.pages_to_scan = parse_knob("pages_to_scan", text)

    def store_sleep(value: int) -> None:
        ksm.sleep_millisecs = value
        ksm.wake_ksmd()  # a new sleep time applies at once

    def store_advisor_mode(text: str) -> None:
        none, scan_time = ADVISOR_MODES
        if sysfs_streq(scan_time, text):
            ksm.set_advisor_mode(True)
        elif sysfs_streq(none, text):
            ksm.set_advisor_mode(False)
        else:
            raise kernel_error(errno.EINVAL, f"advisor_mode={brief(text)}")

    def store_target(value: int) -> None:
        ksm.advisor.target_scan_time = value

    adv = ksm.advisor
    table = [
        Attr("sleep_millisecs", lambda: str(ksm.sleep_millisecs),
             knob_store("sleep_millisecs", store_sleep)),
        Attr("pages_to_scan", lambda: str(ksm.pages_to_scan), store_pages_to_scan),
        Attr("run", lambda: str(ksm.run), knob_store("run", ksm.set_run)),
        counter("pages_scanned"),
        counter("pages_shared"),
        counter("pages_sharing"),
        counter("pages_unshared"),
        counter("pages_volatile"),
        counter("pages_skipped"),
        counter("ksm_zero_pages"),
        counter("full_scans"),
        Attr("merge_across_nodes", lambda: str(ksm.merge_across_nodes),
             knob_store("merge_across_nodes", ksm.set_merge_across_nodes)),
        Attr("max_page_sharing", lambda: str(ksm.max_page_sharing),
             knob_store("max_page_sharing", ksm.set_max_page_sharing)),
        counter("stable_node_chains"),
        counter("stable_node_dups"),
        Attr("stable_node_chains_prune_millisecs",
             lambda: str(ksm.stable_node_chains_prune_millisecs),
             knob_store("stable_node_chains_prune_millisecs",
                        setter("stable_node_chains_prune_millisecs"))),
        Attr("use_zero_pages", lambda: str(int(ksm.use_zero_pages)),
             knob_store("use_zero_pages", bool_setter("use_zero_pages"))),
        counter("general_profit"),
        Attr("smart_scan", lambda: str(int(ksm.smart_scan)),
             knob_store("smart_scan", bool_setter("smart_scan"))),
        Attr("advisor_mode",
             lambda: "none [scan-time]" if ksm.advisor_scan_time else "[none] scan-time",
             store_advisor_mode),
        # The store keeps an unsigned long in an unsigned int: 2^32 reads 0.
        Attr("advisor_max_cpu", lambda: str(adv.max_cpu),
             knob_store("advisor_max_cpu",
                        lambda v: setattr(adv, "max_cpu", kept_value("advisor_max_cpu", v)))),
        Attr("advisor_min_pages_to_scan", lambda: str(adv.min_pages_to_scan),
             knob_store("advisor_min_pages_to_scan",
                        lambda v: setattr(adv, "min_pages_to_scan", v))),
        Attr("advisor_max_pages_to_scan", lambda: str(adv.max_pages_to_scan),
             knob_store("advisor_max_pages_to_scan",
                        lambda v: setattr(adv, "max_pages_to_scan", v))),
        Attr("advisor_target_scan_time", lambda: str(adv.target_scan_time),
             knob_store("advisor_target_scan_time", store_target)),
    ]
    return {a.name: a for a in table}


class KsmSysfs:
    """The dict-like view of /sys/kernel/mm/ksm for one simulated machine, of any engine.

    Built from :func:`build_attrs`'s table over *ksm*.  *unmodelled* maps the
    files the engine does not model to why (e.g. ``"the scan-time advisor is
    not modelled by ..."``): they exist on the kernel, so, unlike a name that
    is no file (KeyError), reading or writing one raises NotModelledError
    (a write's value is checked as text first); they are not in the view
    (iteration, ``in``, ``len``, :meth:`snapshot`).  ``numa=False`` models a
    kernel without CONFIG_NUMA, which has no ``merge_across_nodes``.
    """

    def __init__(self, ksm: KsmFiles, *, numa: bool = True,
                 unmodelled: Mapping[str, str] | None = None) -> None:
        attrs = build_attrs(ksm)
        if not numa:  # merge_across_nodes exists only with CONFIG_NUMA
            del attrs["merge_across_nodes"]
        self._unmodelled = dict(unmodelled or {})
        if not self._unmodelled.keys() <= attrs.keys():
            msg = f"unmodelled names no file: {sorted(self._unmodelled.keys() - attrs.keys())}"
            raise ValueError(msg)
        self._attrs = {n: a for n, a in attrs.items() if n not in self._unmodelled}

    def _known(self, name: object) -> Attr | None:
        """The file's Attr; None for a file the engine does not model; KeyError for no file."""
        if isinstance(name, str):
            attr = self._attrs.get(name)
            if attr is not None or name in self._unmodelled:
                return attr
        raise no_such_file(name)

    def _modelled(self, name: str, attr: Attr | None) -> Attr:
        if attr is None:
            raise NotModelledError(f"{name}: {self._unmodelled[name]}")
        return attr

    def _attr(self, name: str) -> Attr:
        return self._modelled(name, self._known(name))

    def __getitem__(self, name: str) -> str:
        return self._attr(name).show()

    def __setitem__(self, name: str, value: str) -> None:
        """Write *value* as one ``write(2)``; a refused write raises OSError and changes nothing.

        Raises KeyError for a name that is no file here, TypeError unless
        *value* is a str, NotModelledError for a file the engine does not
        model, ValueError if it cannot be encoded as UTF-8.
        """
        known = self._known(name)
        require_text(name, value)
        attr = self._modelled(name, known)
        if attr.store is None:
            raise kernel_error(errno.EACCES, f"{name} is read-only")  # at open(2)
        text = store_text(name, value)
        if text is not None:
            attr.store(text)

    def __iter__(self) -> Iterator[str]:
        return iter(self._attrs)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._attrs

    def __len__(self) -> int:
        return len(self._attrs)

    def writable(self, name: str) -> bool:
        """Whether *name* is a knob (mode 0644) rather than a counter (0444)."""
        return self._attr(name).store is not None

    def snapshot(self) -> dict[str, str]:
        """Every file's text at once."""
        return {name: attr.show() for name, attr in self._attrs.items()}
