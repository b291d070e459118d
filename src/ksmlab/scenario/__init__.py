"""Scenarios: a declarative description of a KSM experiment, and the runner that executes it.

* :mod:`~ksmlab.scenario.loader` reads a TOML file into a validated
  :class:`~ksmlab.scenario.model.Scenario` (or raises
  :class:`~ksmlab.scenario.loader.ScenarioError` naming the file, the field
  and what was expected);
* :mod:`~ksmlab.scenario.runner` runs it on a backend
  (:mod:`~ksmlab.scenario.backends`: the model or the real kernel) and
  returns a :class:`~ksmlab.scenario.result.RunResult`;
* reports are rendered from that result by :mod:`ksmlab.report`.

The file format is documented in ``docs/scenarios.md``.
"""

from ksmlab.scenario.backends import BackendUnavailableError, open_backend
from ksmlab.scenario.loader import ScenarioError, load_builtin, load_scenario, parse_scenario
from ksmlab.scenario.model import Scenario
from ksmlab.scenario.result import RunResult
from ksmlab.scenario.runner import ProgressInfo, RunError, run_scenario

__all__ = [
    "BackendUnavailableError",
    "ProgressInfo",
    "RunError",
    "RunResult",
    "Scenario",
    "ScenarioError",
    "load_builtin",
    "load_scenario",
    "open_backend",
    "parse_scenario",
    "run_scenario",
]
