"""What every ``ksmlab`` subcommand shares: exit codes, the one-line error, the console, writing a file."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from ksmlab.errors import KsmSimError

if TYPE_CHECKING:
    from collections.abc import Callable

    from ksmlab.ksm.cost import KsmdCost
    from ksmlab.scenario.knobs import KnobValue

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INVALID = 2
EXIT_UNAVAILABLE = 3
EXIT_INTERRUPTED = 130

TABLE_WIDTH = 132
"""Width of the table when stdout is a file or a pipe."""


class CliError(KsmSimError):
    """An error to report in one line with an exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def model_only(command: str, option: str, backend: str, why: str) -> None:
    """Refuse *option* on ``--backend linux`` (CliError, exit 2): it sets something of the
    model's ksmd, and *why* says what the real kernel has instead."""
    if backend == "linux":
        raise CliError(f"{command}: {option} applies to the model (--backend sim or bulk): "
                       f"{why}", EXIT_INVALID)


def console() -> Console:
    """The stdout console; when stdout is not a terminal, wide enough for the table."""
    out = Console(highlight=False)
    if not out.is_terminal:
        out = Console(highlight=False, width=max(out.width, TABLE_WIDTH))
    return out


def write_file(path: Path, data: str | bytes) -> None:
    """Write *data* to *path*; a failure is a :class:`CliError` (exit 1) naming the file."""
    try:
        if isinstance(data, bytes):
            path.write_bytes(data)
        else:
            path.write_text(data, encoding="utf-8")
    except OSError as e:
        raise CliError(f"ksmlab: cannot write {path}: {e.strerror}", EXIT_FAILED) from None


__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_INVALID", "EXIT_OK", "EXIT_UNAVAILABLE",
           "KSMD_CPU_HELP", "TABLE_WIDTH", "CliError", "console", "duration_arg", "knob_arg",
           "ksmd_cpu_arg", "load_cost_arg", "model_only", "positive_duration_arg", "resolve_ksmd_cpu",
           "seed_arg", "write_file"]


def load_cost_arg(path: str | None, command: str) -> KsmdCost | None:
    """The model of a ``--cost FILE`` option (None when not given: the shipped one);
    CliError (exit 2) naming the file when it cannot be read or is not a cost file."""
    from ksmlab.ksm.cost import KsmdCost

    if path is None:
        return None
    try:
        return KsmdCost.load(path)
    except OSError as e:
        raise CliError(f"{command}: --cost: cannot read {path}: {e.strerror}",
                       EXIT_INVALID) from None
    except ValueError as e:
        raise CliError(f"{command}: --cost: {e}", EXIT_INVALID) from None


# --- argparse value types the subcommands share ----------------------------------------------

def duration_arg(text: str) -> int:
    """A duration option (``10s``, ``5min``...), in nanoseconds."""
    import argparse

    from ksmlab.scenario.units import parse_duration_ns

    try:
        return parse_duration_ns(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected {e}, got {text!r}") from None


def positive_duration_arg(text: str) -> int:
    """A duration option that must be > 0, in nanoseconds."""
    import argparse

    ns = duration_arg(text)
    if ns <= 0:
        raise argparse.ArgumentTypeError(f"expected a duration > 0, got {text!r}")
    return ns


def knob_arg(text: str) -> tuple[str, KnobValue]:
    """A ``--knob NAME=VALUE`` option, the value as TOML would give it."""
    import argparse

    from ksmlab.scenario.knobs import parse_cli_value

    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name.strip(), parse_cli_value(value)


def seed_arg(maximum: int) -> Callable[[str], int]:
    """The type of a ``--seed`` option: an integer from 0 to *maximum*."""
    import argparse

    def seed(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = -1
        if not 0 <= value <= maximum:
            raise argparse.ArgumentTypeError(
                f"expected an integer from 0 to {maximum}, got {text!r}")
        return value

    return seed


KSMD_CPU_HELP = ("ksmd's CPU time since boot when the run starts, e.g. 4min, or `host`: this "
                 "machine's ksmd's now. The scan-time advisor's first step counts all of it "
                 "(docs/scenarios.md); models only")


def ksmd_cpu_arg(text: str) -> int | str:
    """A ``--ksmd-cpu-at-start`` value: nanoseconds, or ``"host"`` (read when used,
    :func:`resolve_ksmd_cpu`)."""
    import argparse

    from ksmlab.scenario.units import parse_duration_ns

    if text.strip() == "host":
        return "host"
    try:
        return parse_duration_ns(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected {e}, or host, got {text!r}") from None


def resolve_ksmd_cpu(value: int | str, command: str) -> int:
    """The nanoseconds of a ``--ksmd-cpu-at-start`` value; ``host`` is this machine's ksmd's
    CPU time since boot now, a CliError (exit 3) when it cannot be read."""
    if value != "host":
        assert isinstance(value, int)
        return value
    from ksmlab.scenario.host import ksmd_cpu_ns

    ns = ksmd_cpu_ns()
    if ns is None:
        raise CliError(f"{command}: --ksmd-cpu-at-start host: cannot read this machine's ksmd's "
                       f"CPU time (no ksmd kernel thread in /proc, or its stat unreadable); "
                       f"give a duration instead", EXIT_UNAVAILABLE)
    return ns
