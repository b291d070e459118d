"""Read a scenario file (TOML) into a validated :class:`~ksmlab.scenario.model.Scenario`.

Everything is checked before anything runs: types and ranges of every field,
unknown fields, references between sections (contents, process groups,
mappings, regions), the order of life events (a process written to after it
exited, a forked group used before the fork), the knobs, and that every file
a content model reads exists and is readable.  The first problem found is
raised as :class:`ScenarioError`, whose text is one line::

    examples/vms.toml: process[0].mapping[0].pages: expected an integer >= 1, got 0

This module is the public entry; the work is done by

* :mod:`~ksmlab.scenario.schema`: the format as data (tables, fields, limits, defaults);
* :mod:`~ksmlab.scenario.parse`: the file, the TOML document, typed fields, the messages;
* :mod:`~ksmlab.scenario.sections` and :mod:`~ksmlab.scenario.groups`: each section
  into model objects, following process groups through forks and exits;
* :mod:`~ksmlab.scenario.transform`: the whole document into a scenario, and the
  ``--knob``, ``--seed`` and ``--until`` overrides;
* :mod:`~ksmlab.scenario.knobs`: the knobs, derived from :mod:`ksmlab.ksm.sysfs`.

The format is documented in ``docs/scenarios.md``.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from ksmlab.scenario.model import Scenario
from ksmlab.scenario.parse import MAX_FILE_BYTES as MAX_FILE_BYTES  # re-exported, as before
from ksmlab.scenario.parse import MAX_KEY_PARTS as MAX_KEY_PARTS
from ksmlab.scenario.parse import ScenarioError, parse_toml, read_file, show
from ksmlab.scenario.schema import DEFAULT_SCAN_TIMEOUT_NS
from ksmlab.scenario.schema import MAX_INT as MAX_INT
from ksmlab.scenario.schema import MAX_PROCESSES as MAX_PROCESSES
from ksmlab.scenario.schema import MAX_RATE as MAX_RATE
from ksmlab.scenario.schema import MIN_RATE as MIN_RATE
from ksmlab.scenario.transform import (
    BUILTIN_SOURCE,
    apply_knob_overrides,
    build_scenario,
    default_interval,
    truncate,
)


def load_scenario(path: str | os.PathLike[str], *, seed: int | None = None) -> Scenario:
    """Read and validate the scenario file at *path*; *seed* replaces ``[scenario] seed``.

    Raises:
        ScenarioError: the file is missing, not TOML, or invalid.
    """
    text = read_file(path)
    return parse_scenario(text, source=str(path), base_dir=Path(path).resolve().parent, seed=seed)


def builtin_scenario_text() -> str:
    """The TOML text of the built-in default scenario."""
    return resources.files("ksmlab").joinpath("data/default.toml").read_text(encoding="utf-8")


def load_builtin(*, seed: int | None = None) -> Scenario:
    """The built-in default scenario (``ksmlab run`` without a file)."""
    return parse_scenario(builtin_scenario_text(), source=BUILTIN_SOURCE, base_dir=Path.cwd(),
                          seed=seed)


def parse_scenario(text: str, *, source: str, base_dir: Path, seed: int | None = None) -> Scenario:
    """Validate the TOML *text*.

    Args:
        text: the file's text.
        source: names the file in errors.
        base_dir: relative content file paths are relative to this directory.
        seed: replaces ``[scenario] seed`` (so every seed derived from it follows).
    """
    return build_scenario(parse_toml(text, source), source=source, base_dir=base_dir, seed=seed)


__all__ = [
    "BUILTIN_SOURCE",
    "DEFAULT_SCAN_TIMEOUT_NS",
    "ScenarioError",
    "apply_knob_overrides",
    "builtin_scenario_text",
    "default_interval",
    "load_builtin",
    "load_scenario",
    "parse_scenario",
    "show",
    "truncate",
]
