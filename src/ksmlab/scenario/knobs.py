"""The writable KSM knobs a scenario may set, their accepted values and their write order.

Values are checked here, before anything runs, against the ranges the
kernel accepts (``docs/kernel-behaviour.md`` section 5), so a bad knob
is a file error and not a half-finished run.  What is written is the text
the kernel's parser takes (booleans as ``0``/``1``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ksmlab.ksm.sysfs import KNOB_WRITE_ORDER

U32 = 0xFFFFFFFF
U64 = 0xFFFFFFFFFFFFFFFF
INT_MAX = 0x7FFFFFFF


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
    high: int = U32
    choices: tuple[str, ...] = ()

    def expected(self) -> str:
        """The "expected ..." text of an error about this knob."""
        if self.kind == "bool":
            return "true or false"
        if self.kind == "choice":
            return " or ".join(f'"{c}"' for c in self.choices)
        return f"an integer from {self.low} to {self.high}"


KNOBS: dict[str, KnobSpec] = {
    "run": KnobSpec("int", 0, 2),
    "pages_to_scan": KnobSpec("int", 0, U32),
    "sleep_millisecs": KnobSpec("int", 0, U32),
    "max_page_sharing": KnobSpec("int", 2, INT_MAX),
    "merge_across_nodes": KnobSpec("bool"),
    "use_zero_pages": KnobSpec("bool"),
    "smart_scan": KnobSpec("bool"),
    "stable_node_chains_prune_millisecs": KnobSpec("int", 0, U32),
    "advisor_mode": KnobSpec("choice", choices=("none", "scan-time")),
    "advisor_max_cpu": KnobSpec("int", 0, U32),
    "advisor_min_pages_to_scan": KnobSpec("int", 0, U64),
    "advisor_max_pages_to_scan": KnobSpec("int", 0, U64),
    "advisor_target_scan_time": KnobSpec("int", 1, U64),
}
"""Every knob a scenario may write; they are written in :data:`WRITE_ORDER`,
the kernel's safe order (``ksmlab.ksm.sysfs.KNOB_WRITE_ORDER``)."""

WRITE_ORDER = KNOB_WRITE_ORDER
assert sorted(WRITE_ORDER) == sorted(KNOBS)

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
        if isinstance(value, int) and value in (0, 1):
            return str(value)
        raise ValueError(spec.expected())
    if spec.kind == "choice":
        if isinstance(value, str) and value in spec.choices:
            return value
        raise ValueError(spec.expected())
    if isinstance(value, int) and not isinstance(value, bool) and spec.low <= value <= spec.high:
        return str(value)
    raise ValueError(spec.expected())


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


__all__ = ["KNOBS", "WRITE_ORDER", "KnobSpec", "knob_text", "ordered", "parse_cli_value",
           "read_knob"]
