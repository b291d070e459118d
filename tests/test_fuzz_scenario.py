# SPDX-License-Identifier: GPL-2.0-only
"""Scenario files fuzzed through the ``ksmlab`` command: bad input gives one clear line, exit 2.

Hypothesis draws scenario files (``scenario_strategies``): the examples and
the built-in scenario with values dropped, replaced, retyped, scaled to
absurd sizes, nested deeply or joined by unknown keys, and byte-level damage
(random bytes, non-UTF-8 bytes, cut files, deep nesting, long dotted keys).
Each is written to a file and given to ``ksmlab.cli.main`` in-process:

* ``check FILE`` exits 0 (and the loader accepts the file) or 2 with exactly
  one non-empty line on stderr that names the file, and no traceback (the
  loader's error, or the pre-flight's refusal of a valid file that would not
  fit in the memory available, given here as 16 GiB);
* ``run FILE`` of a file ``check`` refuses exits 2 with the same line, and
  never opens a backend or starts a run (both are replaced by a trap);
* ``run FILE`` with random ``--seed``, ``--until``, ``--knob``, ``--backend``
  and ``--content`` reaches the trap (the input was valid) or exits 2 with
  one line.

Accepted files are never run: a valid file may map terabytes.  Any exception
out of ``main()`` other than SystemExit fails the test.

``KSMLAB_FUZZ_EXAMPLES`` sets the Hypothesis budget of each test (default
60, 50 and 40: well under 30 s together).  The long hunt::

    KSMLAB_FUZZ_EXAMPLES=5000 python3 -m pytest -q tests/test_fuzz_scenario.py \\
        --hypothesis-show-statistics
"""

from __future__ import annotations

import io
import os
import re
import traceback
from collections.abc import Iterator, Sequence
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from ksmlab import cli
from ksmlab.scenario.backends import BACKENDS
from ksmlab.scenario.knobs import KNOBS
from ksmlab.scenario.loader import ScenarioError, load_scenario
from scenario_strategies import SEED_TEXTS, SIZE_AND_TIME_TEXTS, documents, pick

_BUDGET = int(os.environ.get("KSMLAB_FUZZ_EXAMPLES", "0"))
CHECK_EXAMPLES = _BUDGET or 60
RUN_EXAMPLES = _BUDGET or 50
OPTION_EXAMPLES = _BUDGET or 40


class RunStartedError(BaseException):
    """Raised by the trap in place of opening a backend or running: a run was about to start.

    A BaseException, so no ``except Exception`` on the way can swallow it.
    """


@dataclass(frozen=True)
class Outcome:
    code: int
    out: str
    err: str


def invoke(argv: Sequence[str]) -> Outcome:
    """``main(argv)`` with stdout and stderr captured; any exception but SystemExit fails."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = cli.main(list(argv))
        except SystemExit as e:  # argparse's own exits
            code = e.code if isinstance(e.code, int) else 1
        except RunStartedError:
            raise
        except Exception as e:
            pytest.fail(f"main({list(argv)!r}) raised {type(e).__name__}: {e}\n"
                        + "".join(traceback.format_exception(e)), pytrace=False)
    return Outcome(code, out.getvalue(), err.getvalue())


def one_line(o: Outcome) -> str:
    """The error of a failed command, checked: one non-empty line on stderr, no traceback."""
    assert o.err.endswith("\n"), repr(o.err)
    lines = o.err.splitlines()
    assert len(lines) == 1, repr(o.err)
    assert lines[0].strip(), repr(o.err)
    assert "Traceback" not in o.err, o.err
    return lines[0]


@pytest.fixture(scope="module", autouse=True)
def _memory() -> Iterator[None]:
    """The pre-flight's memory figure, instead of the host's /proc/meminfo."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KSMLAB_MEM_AVAILABLE", "16GiB")
        yield


PREFLIGHT_REFUSALS = (": this run would not fit in memory: ", " cannot run this scenario: ")


def refused_by_preflight(line: str) -> bool:
    """Whether *line* is the pre-flight's refusal of a valid file."""
    return any(phrase in line for phrase in PREFLIGHT_REFUSALS)


@pytest.fixture(scope="module")
def scenario_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The file each example is written to (one per module: Hypothesis reruns the test body)."""
    return tmp_path_factory.mktemp("fuzz") / "doc.toml"


@pytest.fixture(scope="module")
def no_run() -> Iterator[None]:
    """Opening a backend or starting a run raises RunStartedError instead."""
    def trap(*args: object, **kwargs: object) -> None:
        raise RunStartedError

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "open_backend", trap)
        mp.setattr(cli, "run_scenario", trap)
        yield


def check_outcome(path: Path) -> Outcome:
    """``ksmlab check PATH``, with its documented outcome checked."""
    o = invoke(["check", str(path)])
    assert o.code in (0, 2), o
    # For --hypothesis-show-statistics: which check refused it.
    event("accepted" if o.code == 0 else "refused: " + re.split(r"[.\[]", o.err.split(": ")[1])[0])
    if o.code == 0:
        assert o.err == ""
        assert o.out.startswith(f"{path}: ok: "), o.out
        load_scenario(path)  # the loader itself accepts it
    else:
        assert o.out == ""
        line = one_line(o)
        assert line.startswith(f"{path}: "), line
        if refused_by_preflight(line):
            event("refused: pre-flight")
            load_scenario(path)  # valid, but too big to run here
            return o
        with pytest.raises(ScenarioError) as info:
            load_scenario(path)
        assert str(info.value) == line
    return o


@settings(max_examples=CHECK_EXAMPLES, deadline=None)
@given(doc=documents())
def test_check_accepts_or_names_the_problem(scenario_file: Path, doc: bytes) -> None:
    """`ksmlab check` of any file: exit 0, or exit 2 with one line naming the file."""
    scenario_file.write_bytes(doc)
    check_outcome(scenario_file)


@settings(max_examples=RUN_EXAMPLES, deadline=None)
@given(doc=documents(), backend=st.sampled_from(BACKENDS))
def test_run_of_a_rejected_file_starts_nothing(scenario_file: Path, no_run: None, doc: bytes,
                                               backend: str) -> None:
    """`ksmlab run` of a file `check` refuses: the same line, exit 2, no backend, no output."""
    scenario_file.write_bytes(doc)
    checked = check_outcome(scenario_file)
    if checked.code == 0 or refused_by_preflight(checked.err):
        return  # valid: running it may take forever (terabyte mappings are valid)
    html = scenario_file.with_name("report.html")
    o = invoke(["run", str(scenario_file), "--backend", backend, "--html", str(html)])
    assert o.code == 2, o
    assert o.out == ""
    assert one_line(o) == one_line(checked)
    assert not html.exists()


def _options() -> st.SearchStrategy[list[str]]:
    until = pick(SIZE_AND_TIME_TEXTS) | st.text(max_size=6)
    knob = st.tuples(st.sampled_from([*KNOBS, "nope", ""]),
                     pick(["0", "1", "-1", "2", "true", "yes", "scan-time", "18446744073709551616",
                           "9" * 5000, " 5 ", ""]))
    option = st.one_of(
        st.tuples(st.just("--seed"), st.sampled_from(["0", "-1", "7", "18446744073709551616",
                                                      "x"])),
        st.tuples(st.just("--until"), until),
        knob.map(lambda kv: ("--knob", f"{kv[0]}={kv[1]}")),
        st.tuples(st.just("--backend"), st.sampled_from([*BACKENDS, "vm"])),
        st.tuples(st.just("--content"), st.sampled_from(["bytes", "fingerprint", "hash"])),
    )
    return st.lists(option, max_size=3).map(lambda xs: [a for pair in xs for a in pair])


@settings(max_examples=OPTION_EXAMPLES, deadline=None)
@given(doc=documents(), options=_options())
def test_run_with_options_starts_or_refuses(scenario_file: Path, no_run: None, doc: bytes,
                                            options: list[str]) -> None:
    """`ksmlab run FILE OPTIONS...`: a valid input reaches the backend, an invalid one exits 2."""
    scenario_file.write_bytes(doc)
    # "--until=VALUE": a value that starts with "-" stays a value, not an option.
    argv = ["run", str(scenario_file),
            *(f"{a}={b}" for a, b in zip(options[::2], options[1::2], strict=True))]
    try:
        o = invoke(argv)
    except RunStartedError:
        event("run started")
        return
    assert o.code == 2, o
    one_line(o)


@pytest.mark.parametrize("seed", ["-1", "18446744073709551616", "0x10"])
def test_bad_seed_names_the_option(scenario_file: Path, seed: str) -> None:
    """A bad --seed is the command line's error, not the file's (it was "FILE: scenario.seed: ...")."""
    scenario_file.write_text(SEED_TEXTS["identical-pages.toml"])
    o = invoke(["run", str(scenario_file), f"--seed={seed}"])
    assert o.code == 2
    assert one_line(o) == ("ksmlab run: argument --seed: expected an integer from 0 to "
                           f"18446744073709551615, got {seed!r} (see ksmlab run --help)")
