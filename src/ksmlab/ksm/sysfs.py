"""``/sys/kernel/mm/ksm``: the attribute table, with the kernel's parsers and errors.

Each file is an :class:`Attr` with a ``show`` that formats like ``sysfs_emit``
and, for writable files, a ``store`` that parses like ``kstrtouint`` /
``kstrtoul`` / ``kstrtoint`` / ``kstrtobool`` and raises the errno the kernel
returns.  :class:`KsmSysfs` is the dict-like view users see: text in, text
out, exactly as reading and writing the real files (reads come back without
the trailing newline, as ``open(...).read().strip()`` would give).

What the VFS does before a store is called is modelled too (recorded on the
real kernel, see tests/sysfs_cases.py): a write of more than 4096 bytes is cut
to 4096, the text ends at the first NUL, an empty write succeeds without
calling the store, and writing a read-only file fails with EACCES at open.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ksmlab.errors import kernel_error
from ksmlab.ksm.interface import Ksm

U32 = 0xFFFFFFFF
U64 = 0xFFFFFFFFFFFFFFFF
INT_MAX = 0x7FFFFFFF
LLONG_MAX = 0x7FFFFFFFFFFFFFFF
MAX_WRITE = 4096  # PAGE_SIZE: sysfs never passes more to a store

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


class ParseError(Exception):
    """A kstrto* parse failure, carrying the errno the parser returns."""

    def __init__(self, err: int) -> None:
        super().__init__(err)
        self.errno = err


def kstrtoull(s: str) -> int:
    """``kstrtoull(s, 10)``: optional '+', decimal digits, one optional trailing newline."""
    if s.startswith("+"):
        s = s[1:]
    if s.endswith("\n"):
        s = s[:-1]
    if not s or not s.isascii() or not s.isdigit():
        raise ParseError(errno.EINVAL)
    value = int(s)
    if value > U64:
        raise ParseError(errno.ERANGE)
    return value


def kstrtouint(s: str) -> int:
    """``kstrtouint(s, 10)``: as kstrtoull, ERANGE above 2^32-1."""
    value = kstrtoull(s)
    if value > U32:
        raise ParseError(errno.ERANGE)
    return value


def kstrtoint(s: str) -> int:
    """``kstrtoint(s, 10)``: signed, ERANGE outside the range of int."""
    if s.startswith("-"):
        magnitude = kstrtoull(s[1:])
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


def _uint_store(apply: Callable[[int], None], *, errors_as_einval: bool = True,
                parse: Callable[[str], int] = kstrtouint) -> Callable[[str], None]:
    def store(text: str) -> None:
        try:
            value = parse(text)
        except ParseError as e:
            raise kernel_error(errno.EINVAL if errors_as_einval else e.errno, text) from None
        apply(value)
    return store


def _bool_store(apply: Callable[[bool], None]) -> Callable[[str], None]:
    def store(text: str) -> None:
        try:
            value = kstrtobool(text)
        except ParseError:
            raise kernel_error(errno.EINVAL, text) from None
        apply(value)
    return store


def build_attrs(ksm: Ksm) -> dict[str, Attr]:
    """The attribute table of *ksm*, in the kernel's ``ksm_attrs[]`` order."""

    def setter(name: str) -> Callable[[int], None]:
        return lambda v: setattr(ksm, name, v)

    def store_pages_to_scan(text: str) -> None:
        if ksm.advisor_scan_time:
            raise kernel_error(errno.EINVAL, "pages_to_scan is set by the advisor")
        _uint_store(setter("pages_to_scan"))(text)

    def store_sleep(value: int) -> None:
        ksm.sleep_millisecs = value
        ksm.wake_ksmd()  # a new sleep time applies at once

    def store_run(value: int) -> None:
        if value > 2:
            raise kernel_error(errno.EINVAL, f"run={value}")
        ksm.set_run(value)

    def store_merge_across_nodes(value: int) -> None:
        if value > 1:
            raise kernel_error(errno.EINVAL, f"merge_across_nodes={value}")
        ksm.set_merge_across_nodes(value)

    def store_max_page_sharing(value: int) -> None:
        if value < 2:
            raise kernel_error(errno.EINVAL, f"max_page_sharing={value}")
        ksm.set_max_page_sharing(value)

    def store_advisor_mode(text: str) -> None:
        if sysfs_streq("scan-time", text):
            ksm.set_advisor_mode(True)
        elif sysfs_streq("none", text):
            ksm.set_advisor_mode(False)
        else:
            raise kernel_error(errno.EINVAL, f"advisor_mode={text!r}")

    def store_target(value: int) -> None:
        if value < 1:
            raise kernel_error(errno.EINVAL, "advisor_target_scan_time must be >= 1")
        ksm.advisor.target_scan_time = value

    adv = ksm.advisor
    table = [
        Attr("sleep_millisecs", lambda: str(ksm.sleep_millisecs), _uint_store(store_sleep)),
        Attr("pages_to_scan", lambda: str(ksm.pages_to_scan), store_pages_to_scan),
        Attr("run", lambda: str(ksm.run), _uint_store(store_run)),
        Attr("pages_scanned", lambda: str(ksm.pages_scanned)),
        Attr("pages_shared", lambda: str(ksm.pages_shared)),
        Attr("pages_sharing", lambda: str(ksm.pages_sharing)),
        Attr("pages_unshared", lambda: str(ksm.pages_unshared)),
        Attr("pages_volatile", lambda: str(ksm.pages_volatile)),
        Attr("pages_skipped", lambda: str(ksm.pages_skipped)),
        Attr("ksm_zero_pages", lambda: str(ksm.ksm_zero_pages)),
        Attr("full_scans", lambda: str(ksm.full_scans)),
        Attr("merge_across_nodes", lambda: str(ksm.merge_across_nodes),
             _uint_store(store_merge_across_nodes, errors_as_einval=False, parse=kstrtoull)),
        Attr("max_page_sharing", lambda: str(ksm.max_page_sharing),
             _uint_store(store_max_page_sharing, errors_as_einval=False, parse=kstrtoint)),
        Attr("stable_node_chains", lambda: str(ksm.stable_node_chains)),
        Attr("stable_node_dups", lambda: str(ksm.stable_node_dups)),
        Attr("stable_node_chains_prune_millisecs",
             lambda: str(ksm.stable_node_chains_prune_millisecs),
             _uint_store(setter("stable_node_chains_prune_millisecs"))),
        Attr("use_zero_pages", lambda: str(int(ksm.use_zero_pages)),
             _bool_store(setter("use_zero_pages"))),
        Attr("general_profit", lambda: str(ksm.general_profit)),
        Attr("smart_scan", lambda: str(int(ksm.smart_scan)), _bool_store(setter("smart_scan"))),
        Attr("advisor_mode",
             lambda: "none [scan-time]" if ksm.advisor_scan_time else "[none] scan-time",
             store_advisor_mode),
        Attr("advisor_max_cpu", lambda: str(adv.max_cpu),
             _uint_store(lambda v: setattr(adv, "max_cpu", v & U32), parse=kstrtoull)),
        Attr("advisor_min_pages_to_scan", lambda: str(adv.min_pages_to_scan),
             _uint_store(lambda v: setattr(adv, "min_pages_to_scan", v), parse=kstrtoull)),
        Attr("advisor_max_pages_to_scan", lambda: str(adv.max_pages_to_scan),
             _uint_store(lambda v: setattr(adv, "max_pages_to_scan", v), parse=kstrtoull)),
        Attr("advisor_target_scan_time", lambda: str(adv.target_scan_time),
             _uint_store(store_target, parse=kstrtoull)),
    ]
    return {a.name: a for a in table}


class KsmSysfs:
    """The dict-like view of /sys/kernel/mm/ksm for one simulated machine."""

    def __init__(self, ksm: Ksm, *, numa: bool = True) -> None:
        self._attrs = build_attrs(ksm)
        if not numa:  # merge_across_nodes exists only with CONFIG_NUMA
            del self._attrs["merge_across_nodes"]

    def _attr(self, name: str) -> Attr:
        try:
            return self._attrs[name]
        except KeyError:
            msg = f"no such file in /sys/kernel/mm/ksm: {name!r}"
            raise KeyError(msg) from None

    def __getitem__(self, name: str) -> str:
        return self._attr(name).show()

    def __setitem__(self, name: str, value: str) -> None:
        attr = self._attr(name)
        if not isinstance(value, str):
            msg = f"sysfs values are text: got {type(value).__name__} for {name!r}"
            raise TypeError(msg)
        if attr.store is None:
            raise kernel_error(errno.EACCES, f"{name} is read-only")
        raw = value.encode()[:MAX_WRITE]
        raw = raw.split(b"\0", 1)[0] if b"\0" in raw else raw
        if not value:
            return  # an empty write(2) never reaches the store function
        attr.store(raw.decode(errors="replace"))

    def __iter__(self) -> Iterator[str]:
        return iter(self._attrs)

    def __contains__(self, name: object) -> bool:
        return name in self._attrs

    def __len__(self) -> int:
        return len(self._attrs)

    def writable(self, name: str) -> bool:
        """Whether *name* is a knob (mode 0644) rather than a counter (0444)."""
        return self._attr(name).store is not None

    def snapshot(self) -> dict[str, str]:
        """Every file's text at once."""
        return {name: attr.show() for name, attr in self._attrs.items()}
