"""The writable KSM knobs a scenario may set, their accepted values and their write order.

Values are checked here, before anything runs, against the ranges the
kernel accepts (``docs/kernel-behaviour.md`` section 5), so a bad knob
is a file error and not a half-finished run.  What is written is the text
the kernel's parser takes (booleans as ``0``/``1``).

The set of knobs and their limits are not written here: they come from the
kernel's attribute table, :mod:`ksmlab.ksm.sysfs` (:data:`KNOB_WRITE_ORDER`,
:func:`~ksmlab.ksm.sysfs.knob_range`, :data:`~ksmlab.ksm.sysfs.ADVISOR_MODES`).
What is the scenario's own is how TOML spells a value (a knob of range 0..1
takes ``true``/``false``) and the messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ksmlab.ksm.sysfs import ADVISOR_MODES, KNOB_WRITE_ORDER, knob_range


@dataclass(frozen=True, slots=True)
class KnobSpec:
    """What one knob accepts.

    Attributes:
        kind: ``int`` (a range), ``bool`` (true/false or 0/1), or ``choice``.
        low: smallest int accepted.
        high: largest int accepted.
        choices: the words accepted (choice).
    """

    kind: Literal["int", "bool", "choice"]
    low: int = 0
    high: int = 0
    choices: tuple[str, ...] = ()

    def expected(self) -> str:
        """The "expected ..." text of an error about this knob."""
        if self.kind == "bool":
            return "true or false"
        if self.kind == "choice":
            return " or ".join(f'"{c}"' for c in self.choices)
        return f"an integer from {self.low} to {self.high}"


def _spec(name: str) -> KnobSpec:
    """The scenario's view of knob *name*, from the kernel's table."""
    if name == "advisor_mode":
        return KnobSpec("choice", choices=ADVISOR_MODES)
    low, high = knob_range(name)
    # A 0/1 knob is a switch: TOML's true/false (or 1/0), "expected true or false".
    return KnobSpec("bool", low, high) if (low, high) == (0, 1) else KnobSpec("int", low, high)


_LISTED = ("run", "pages_to_scan", "sleep_millisecs", "max_page_sharing", "merge_across_nodes",
           "use_zero_pages", "smart_scan", "stable_node_chains_prune_millisecs", "advisor_mode")
"""The order knobs are listed in (messages, ``--help``, docs/scenarios.md).  It only
orders: any other knob of the kernel's table follows these, in write order."""

KNOBS: dict[str, KnobSpec] = {
    name: _spec(name) for name in sorted(
        KNOB_WRITE_ORDER, key=lambda n: _LISTED.index(n) if n in _LISTED else len(_LISTED))}
"""Every knob a scenario may write (every writable file of ``/sys/kernel/mm/ksm``); they
are written in :data:`WRITE_ORDER`, the kernel's safe order."""

WRITE_ORDER = KNOB_WRITE_ORDER

KnobValue = int | bool | str


def knob_text(name: str, value: object) -> str:
    """The text written to knob *name* for the TOML *value*.

    Raises:
        KeyError: *name* is not a knob a scenario may write.
        ValueError: *value* is out of range; the message is what is expected.
    """
    spec = KNOBS[name]
    if spec.kind == "bool":
        if isinstance(value, bool):
            return "1" if value else "0"
        if isinstance(value, int) and spec.low <= value <= spec.high:  # 0 or 1
            return str(value)
        raise ValueError(spec.expected())
    if spec.kind == "choice":
        if isinstance(value, str) and value in spec.choices:
            return value
        raise ValueError(spec.expected())
    if isinstance(value, int) and not isinstance(value, bool) and spec.low <= value <= spec.high:
        return str(value)
    raise ValueError(spec.expected())


def pages_to_scan_refused(values: dict[str, str]) -> bool:
    """Whether *values* (knob texts) set ``pages_to_scan`` under ``advisor_mode = "scan-time"``.

    The kernel refuses that write with EINVAL (the advisor sets
    pages_to_scan), so a scenario may not ask for both.
    """
    return values.get("advisor_mode") == "scan-time" and "pages_to_scan" in values


def parse_cli_value(text: str) -> KnobValue:
    """A ``--knob NAME=VALUE`` value as TOML would give it: int, bool or word."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(text)
    except ValueError:
        return text.strip()


def ordered(knobs: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """*knobs* in :data:`WRITE_ORDER`."""
    return tuple((n, knobs[n]) for n in WRITE_ORDER if n in knobs)


def read_knob(text: str) -> int | str:
    """A knob file's text as a value: an int, or the bracketed word of ``advisor_mode``."""
    text = text.strip()
    if "[" in text:
        return text[text.index("[") + 1:text.index("]")]
    try:
        return int(text)
    except ValueError:
        return text


__all__ = ["KNOBS", "WRITE_ORDER", "KnobSpec", "knob_text", "ordered", "pages_to_scan_refused",
           "parse_cli_value", "read_knob"]
