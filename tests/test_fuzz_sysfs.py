# SPDX-License-Identifier: GPL-2.0-only
"""Every file of ``/sys/kernel/mm/ksm`` written with arbitrary strings, on every engine.

* Model: Hypothesis draws a file (knob or counter) and a string, biased towards
  what a parser might take for a number (signs, leading zeros, radix prefixes,
  numbers past 2**64, Unicode digits, NULs, newlines, 4096-byte cuts), plus
  kstrtobool words, advisor modes and arbitrary text.  SimKernel must accept
  the write or raise an OSError with an errno, and a refused write changes no
  file.  The outcome must also be what the kernel's documented parsing gives
  (``spec_write``: lib/kstrtox.c and mm/ksm.c semantics, on the UTF-8 bytes
  the VFS passes).  BulkKernel, which models every file (the advisor's and
  ``merge_across_nodes`` included), must answer the same: the same errno and
  every file the same afterwards.
* Kernel (``linux``): for each drawn string, the real kernel's knobs are reset
  to the recorded defaults, the string is written to the real file and to a
  fresh SimKernel, and both must give the same errno (or both accept) and
  leave every knob reading the same.  A string that would set ``run=1``
  while any process is mergeable is not written (ksmd would merge other
  processes' pages); ``run=2`` is.

``KSMLAB_FUZZ_EXAMPLES`` sets the Hypothesis budget of each fuzz test (default
300 for the model, 100 for the kernel).  The hunt for disagreements::

    KSMLAB_FUZZ_EXAMPLES=3000 python3 -m pytest -q tests/test_fuzz_sysfs.py \\
        --hypothesis-show-statistics

Strings are written as UTF-8, on every engine (LinuxSysfs encodes with
``str.encode()``); a string that has no UTF-8 form (a lone surrogate) is
refused with ValueError before anything is written.  ``REGRESSIONS`` holds the
strings on which the model once disagreed with the kernel, with the kernel's
answer.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Iterator, Mapping

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from ksmlab import SimKernel
from ksmlab.backends.linux import LinuxKernel, linux_ksm_unavailable_reason
from ksmlab.bulk import BulkKernel
from sysfs_cases import DEFAULTS, MAX_WRITE_BYTES, READ_ONLY, READ_ONLY_WRITE_ERRNO
from tools.probe_sysfs import ksm_locked, mergeable_pids

_BUDGET = int(os.environ.get("KSMLAB_FUZZ_EXAMPLES", "0"))
MODEL_EXAMPLES = _BUDGET or 300
KERNEL_EXAMPLES = _BUDGET or 100

FILES = sorted(DEFAULTS)
KNOBS = [n for n in FILES if n not in READ_ONLY]
START = {n: text.removesuffix("\n") for n, text in DEFAULTS.items()}
"""Every file at the recorded defaults, as the API reads it (no trailing newline)."""

# --- strings ------------------------------------------------------------------------

U64 = 2**64 - 1
BOUNDARIES = (0, 1, 2, 3, 5, 70, 100, 200, 256, 500, 30000, 2**31 - 1, 2**31, 2**32 - 1,
              2**32, 2**32 + 1, 2**63 - 1, 2**63, 2**63 + 1, U64 - 1, U64, U64 + 1,
              10**20, 2**70, 10**40)
PREFIXES = ("", "+", "-", "+-", "-+", "++", "--", "+\n", " ", "\t", "\n", "\x00",
            "0x", "0X", "0o", "0b", "-0x", "+0", "\ufeff", "\u2212", "\uff0b")
SUFFIXES = ("", "\n", "\n\n", " ", "\t", "\r\n", "\r", " \n", "\n ",
            "\x00", "\x00x", "\n\x00junk", "x", "e3", ".0", "a", "f", "L", "\u0663", "\u00e9",
            "\ufffd", "\U0001f600")
UNICODE_DIGITS = "\u0660\u0663\u06f5\u0967\u09ea\uff15\u00b2\u2075\u2460\U0001d7d9"
BOOL_WORDS = ("y", "Y", "yes", "n", "N", "no", "t", "T", "true", "f", "F", "false", "e",
              "E", "enable", "d", "D", "disable", "on", "ON", "On", "oN", "of", "off", "OFF",
              "o", "O", "ox", "o\n", "1", "0", "2", "maybe", "x", "\u00ff")
MODE_WORDS = ("none", "scan-time", "[none]", "[scan-time]", "[none] scan-time",
              "none [scan-time]", "scan-time-x", "scantime", "scan_time", "Scan-time", "NONE",
              "non", "scan-tim", "nonenone", "none\nnone")


@st.composite
def numbers(draw: st.DrawFn) -> str:
    """A number as text, sometimes mangled: sign or radix prefix, zeros, a suffix."""
    # Hypothesis favours small integers: long digit strings reach past 2**64 more often.
    value = draw(st.one_of(st.sampled_from(BOUNDARIES).map(str), st.integers(0, 300).map(str),
                           st.integers(0, 2**72).map(str),
                           st.text("0123456789", min_size=18, max_size=45)))
    # Zero runs near 4096 put the VFS's cut inside the number or its suffix.
    zeros = draw(st.one_of(st.just(0), st.integers(0, 3), st.integers(4075, 4100)))
    digits = "0" * zeros + value
    if draw(st.integers(0, 9)) == 0:  # a Unicode digit (Python's isdigit() says yes)
        i = draw(st.integers(0, len(digits) - 1))
        digits = digits[:i] + draw(st.sampled_from(UNICODE_DIGITS)) + digits[i + 1:]
    # Half the prefixes and suffixes are what the parsers accept, to reach the stores.
    prefix = draw(st.one_of(st.sampled_from(("", "+")), st.sampled_from(PREFIXES)))
    return prefix + digits + draw(st.one_of(st.sampled_from(("", "\n")),
                                            st.sampled_from(SUFFIXES)))


@st.composite
def words(draw: st.DrawFn, vocabulary: tuple[str, ...]) -> str:
    """A kstrtobool word or an advisor mode, with a prefix and a suffix now and then."""
    word = draw(st.sampled_from(vocabulary))
    pre = draw(st.sampled_from(("", "", "", " ", "\n", "+", "\x00", "[")))
    return pre + word + draw(st.sampled_from(SUFFIXES))


@st.composite
def cut_characters(draw: st.DrawFn) -> str:
    """A valid value followed by multi-byte characters that the 4096-byte cut splits."""
    head = draw(st.sampled_from(("1", "5", "y", "on", "none", "scan-time", "0" * 4093 + "7")))
    tail = draw(st.sampled_from(("\u00e9", "\u20ac", "\U0001f600", "\n\u00e9")))
    return head + tail * draw(st.integers(1, 2100))


TEXT_ALPHABET = st.sampled_from(" \t\n\r\x00+-0123456789xXobBeEyYnNtTfFdD[]\u00e9\u0663\uff15")


def sysfs_texts() -> st.SearchStrategy[str]:
    """Strings to write, number-like half of the time."""
    return st.one_of(
        numbers(), numbers(), numbers(), numbers(),
        words(BOOL_WORDS), words(MODE_WORDS),
        st.text(TEXT_ALPHABET, max_size=24),
        st.text(max_size=16),
        cut_characters(),
        st.just(""),
    )


def sysfs_files() -> st.SearchStrategy[str]:
    """A file of /sys/kernel/mm/ksm, a knob three times out of four."""
    return st.one_of(st.sampled_from(KNOBS), st.sampled_from(KNOBS), st.sampled_from(FILES))


# --- the kernel's documented parsing (the spec), on the bytes the store receives ---------

UINT_KNOBS = ("sleep_millisecs", "pages_to_scan", "run", "stable_node_chains_prune_millisecs")
"""The knobs parsed by kstrtouint (the advisor's by kstrtoul)."""

Spec = tuple[str | None, dict[str, str]]
"""An errno name or None, and the files that read differently from START afterwards."""


def spec_ull(b: bytes, *, plus: bool = True) -> int | str:
    """kstrtoull(s, 10): ['+'] digits ['\\n'], the number or an errno name.

    The digits are taken as far as they go and an overflow is ERANGE whatever
    follows; otherwise nothing but one newline may follow.
    """
    m = re.match(rb"(\+?)([0-9]*)", b)
    assert m is not None
    if m[1] and not plus:
        return "EINVAL"
    digits, rest = m[2], b[m.end():]
    if digits and int(digits) > U64:
        return "ERANGE"
    if not digits or rest not in (b"", b"\n"):
        return "EINVAL"
    return int(digits)


def spec_int(b: bytes) -> int | str:
    """kstrtoint(s, 10): '-' then kstrtoull's digits without a '+', or kstrtoull; int range."""
    v = spec_ull(b[1:], plus=False) if b.startswith(b"-") else spec_ull(b)
    if isinstance(v, str):
        return v
    v = -v if b.startswith(b"-") else v
    return v if -2**31 <= v < 2**31 else "ERANGE"


def spec_bool(b: bytes) -> int | str:
    """kstrtobool: the first byte decides, or the first two for "on"/"of"."""
    first, second = b[:1], b[1:2]
    if first and first in b"eEyYtT1":
        return 1
    if first and first in b"dDnNfF0":
        return 0
    if first and first in b"oO" and second:
        if second in b"nN":
            return 1
        if second in b"fF":
            return 0
    return "EINVAL"


def spec_write(name: str, text: str) -> Spec:
    """What writing *text* to *name* does on a kernel at START with nothing merged."""
    if name in READ_ONLY:
        return READ_ONLY_WRITE_ERRNO, {}  # open(2) refuses
    raw = text.encode()
    if not raw:
        return None, {}  # the store is not called
    b = raw[:MAX_WRITE_BYTES].split(b"\0", 1)[0]
    if name == "advisor_mode":
        if b in (b"scan-time", b"scan-time\n"):  # sysfs_streq
            return None, {name: "none [scan-time]", "pages_to_scan": START[
                "advisor_min_pages_to_scan"]}
        return (None, {}) if b in (b"none", b"none\n") else ("EINVAL", {})
    if name in ("smart_scan", "use_zero_pages"):
        v = spec_bool(b)
    elif name == "max_page_sharing":
        v = spec_int(b)
        v = "EINVAL" if isinstance(v, int) and v < 2 else v
    elif name == "merge_across_nodes":
        v = spec_ull(b)
        v = "EINVAL" if isinstance(v, int) and v > 1 else v
    else:  # the stores that answer EINVAL for any parse error
        v = spec_ull(b)
        if isinstance(v, int) and name in UINT_KNOBS and v > 2**32 - 1:
            v = "ERANGE"  # kstrtouint
        if isinstance(v, str) or (name == "run" and v > 2) or (
                name == "advisor_target_scan_time" and v < 1):
            return "EINVAL", {}
        if name == "advisor_max_cpu":
            v &= 2**32 - 1  # an unsigned long kept in an unsigned int
    if isinstance(v, str):
        return v, {}
    return None, {} if str(v) == START[name] else {name: str(v)}


# --- helpers ------------------------------------------------------------------------


def outcome(sysfs: object, name: str, text: str) -> str | None:
    """Write *text* to *name*; the errno name of the refusal, or None."""
    try:
        sysfs[name] = text  # type: ignore[index]
    except OSError as e:
        assert e.errno is not None, f"{name}={text!r}: OSError without an errno: {e!r}"
        return errno.errorcode[e.errno]
    return None


def record(what: str) -> None:
    """Count *what* in Hypothesis's statistics (when a Hypothesis test is running)."""
    with contextlib.suppress(InvalidArgument):  # outside Hypothesis: nothing to count in
        event(what)


def changed(files: Mapping[str, str]) -> dict[str, str]:
    """The files of *files* that read differently from START."""
    return {n: t for n, t in files.items() if START[n] != t}


def short(text: str) -> str:
    """*text* for a failure message (a write can be 4 KiB)."""
    return repr(text) if len(text) < 60 else f"{text[:50]!r}...({len(text)} chars)"


# --- the model: SimKernel and BulkKernel ------------------------------------------------


def check_model(name: str, text: str) -> tuple[str | None, dict[str, str]]:
    """Write *text* to *name* on fresh SimKernel and BulkKernel; check both; return Sim's result."""
    sim = SimKernel(trace=False)
    before = sim.sysfs.snapshot()
    assert before == START
    err = outcome(sim.sysfs, name, text)
    after = sim.sysfs.snapshot()
    if err is not None:
        assert after == before, f"refused {name}={short(text)} ({err}) changed files"
    assert spec_write(name, text) == (err, changed(after)), f"{name}={short(text)}"
    record(f"model: {'accepted' if err is None else err}")

    bulk = BulkKernel()
    assert bulk.sysfs.snapshot() == START
    bulk_err = outcome(bulk.sysfs, name, text)
    assert bulk_err == err, f"{name}={short(text)}: bulk {bulk_err}, SimKernel {err}"
    assert bulk.sysfs.snapshot() == after, f"{name}={short(text)}"
    return err, after


@settings(max_examples=MODEL_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(name=sysfs_files(), text=sysfs_texts())
def test_model_write(name: str, text: str) -> None:
    """Any string: accepted or an errno, nothing changed when refused, as the spec, both engines."""
    check_model(name, text)


def test_bulk_files() -> None:
    """BulkKernel models every file of the kernel's (recorded) /sys/kernel/mm/ksm."""
    bulk = BulkKernel()
    assert set(bulk.sysfs) == set(FILES)
    assert bulk.sysfs.snapshot() == START


NON_TEXT = st.one_of(st.integers(), st.none(), st.binary(max_size=8), st.floats(),
                     st.booleans(), st.lists(st.integers(), max_size=2),
                     st.builds(bytearray, st.binary(max_size=4)))


@settings(max_examples=MODEL_EXAMPLES // 3, deadline=None)
@given(name=st.sampled_from(FILES), value=NON_TEXT)
def test_non_text_values(name: str, value: object) -> None:
    """A value that is no str: TypeError naming it, on every file of both engines; no change."""
    for sysfs in (SimKernel(trace=False).sysfs, BulkKernel().sysfs):
        before = sysfs.snapshot()
        with pytest.raises(TypeError) as info:
            sysfs[name] = value  # type: ignore[assignment]
        assert type(value).__name__ in str(info.value) and name in str(info.value)
        assert repr(value)[:40] in str(info.value)
        assert sysfs.snapshot() == before


@pytest.mark.parametrize("value", ["\ud800", "1\udfff", "scan-time\udc80"])
def test_no_utf8_form(value: str) -> None:
    """A str with no UTF-8 form: ValueError naming it for a knob, EACCES for a counter."""
    for sysfs in (SimKernel(trace=False).sysfs, BulkKernel().sysfs):
        before = sysfs.snapshot()
        for name in sysfs:
            if name in READ_ONLY:
                assert outcome(sysfs, name, value) == READ_ONLY_WRITE_ERRNO
            else:
                with pytest.raises(ValueError, match=re.escape(repr(value))):
                    sysfs[name] = value
        assert sysfs.snapshot() == before


UNKNOWN_NAMES = st.one_of(st.text(max_size=40).filter(lambda n: n not in DEFAULTS),
                          st.sampled_from(["no_such_knob", "RUN", "run\n", " run", "ksm/run",
                                           "advisor", "pages_to_scan\x00"]),
                          st.integers(), st.none(), st.binary(max_size=4),
                          st.lists(st.text(max_size=2), max_size=1))


@settings(max_examples=MODEL_EXAMPLES // 3, deadline=None)
@given(name=UNKNOWN_NAMES, value=st.one_of(st.text(max_size=4), NON_TEXT))
def test_unknown_names(name: object, value: object) -> None:
    """A name that is no file: the same KeyError on both engines, read or written; no change."""
    messages = []
    for sysfs in (SimKernel(trace=False).sysfs, BulkKernel().sysfs):
        before = sysfs.snapshot()
        assert name not in sysfs
        with pytest.raises(KeyError) as read:
            sysfs[name]  # type: ignore[index]
        with pytest.raises(KeyError) as written:
            sysfs[name] = value  # type: ignore[index, assignment]
        assert sysfs.snapshot() == before
        messages.append((str(read.value), str(written.value)))
    assert messages[0] == messages[1]


# Strings on which the model once disagreed with the real kernel, with the kernel's
# answer (Linux 6.18, checked again on the kernel by test_kernel_regression).
REGRESSIONS: list[tuple[str, str, str | None, dict[str, str]]] = [
    # An overflow wins over what follows the digits (it was EINVAL).
    ("max_page_sharing", "99999999999999999999x", "ERANGE", {}),
    ("max_page_sharing", "-99999999999999999999x", "ERANGE", {}),
    ("merge_across_nodes", "99999999999999999999x", "ERANGE", {}),
    ("merge_across_nodes", "99999999999999999999\n\n", "ERANGE", {}),
    ("merge_across_nodes", "+18446744073709551616 ", "ERANGE", {}),
    ("max_page_sharing", "20000000000000000000\n\n", "ERANGE", {}),  # found by the fuzzer
    # kstrtoint takes no '+' after its '-' (it was ERANGE, as for -9999999999).
    ("max_page_sharing", "-+9999999999", "EINVAL", {}),
    ("max_page_sharing", "-+18446744073709551616", "EINVAL", {}),
    ("max_page_sharing", "-+4294967295", "EINVAL", {}),  # found by the fuzzer
    ("max_page_sharing", "-+5", "EINVAL", {}),  # agreed before only because -5 < 2
    ("max_page_sharing", "+-5", "EINVAL", {}),
]


@pytest.mark.parametrize(("name", "text", "err", "expected"), REGRESSIONS,
                         ids=[f"{n}={t!r}" for n, t, _e, _x in REGRESSIONS])
def test_model_regression(name: str, text: str, err: str | None,
                          expected: dict[str, str]) -> None:
    """The model gives the kernel's recorded answer (both engines agree, see check_model)."""
    got, after = check_model(name, text)
    assert (got, changed(after)) == (err, expected)


# --- the real kernel ------------------------------------------------------------------

_REASON = linux_ksm_unavailable_reason()
on_linux = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


@pytest.fixture(scope="module")
def real() -> Iterator[LinuxKernel]:
    """One LinuxKernel session (lock, knobs saved and restored) for the module's kernel tests."""
    with ksm_locked(KNOBS) as (knobs, _found):
        kernel = knobs.kernel
        if kernel.sysfs["pages_shared"] != "0":
            # KSM pages left by others would make max_page_sharing and
            # merge_across_nodes EBUSY; run=2 unmerges them (restored on close).
            kernel.reset_knobs({"run": "2"})
        yield kernel


def kernel_write(kernel: LinuxKernel, name: str, text: str) -> tuple[str | None, dict[str, str]]:
    """Reset the knobs to the defaults, write *text* to *name*; the errno and the knobs after."""
    kernel.reset_knobs({n: "none" if n == "advisor_mode" else START[n] for n in KNOBS})
    assert {n: kernel.sysfs[n] for n in KNOBS} == {n: START[n] for n in KNOBS}
    err = outcome(kernel.sysfs, name, text)
    return err, {n: kernel.sysfs[n] for n in KNOBS}


def check_kernel(kernel: LinuxKernel, name: str, text: str) -> bool:
    """The kernel and a fresh SimKernel answer *text* alike; False if it was not written.

    A write the model says sets run=1 is not made while a process is mergeable.
    """
    sim = SimKernel(trace=False)
    sim_err = outcome(sim.sysfs, name, text)
    if name == "run" and sim.sysfs["run"] == "1" and mergeable_pids():
        record("kernel: not written (run=1 with mergeable processes)")
        return False
    err, knobs = kernel_write(kernel, name, text)
    assert (err, knobs) == (sim_err, {n: sim.sysfs[n] for n in KNOBS}), (
        f"{name}={short(text)}: kernel {err}, SimKernel {sim_err}")
    record(f"kernel: {'accepted' if err is None else err}")
    return True


@pytest.mark.linux
@on_linux
@settings(max_examples=KERNEL_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(name=sysfs_files(), text=sysfs_texts())
def test_kernel_agrees(real: LinuxKernel, name: str, text: str) -> None:
    """Any string: the real kernel and the model give the same errno and the same knobs."""
    check_kernel(real, name, text)


@pytest.mark.linux
@on_linux
@pytest.mark.parametrize(("name", "text", "err", "expected"), REGRESSIONS,
                         ids=[f"{n}={t!r}" for n, t, _e, _x in REGRESSIONS])
def test_kernel_regression(real: LinuxKernel, name: str, text: str, err: str | None,
                           expected: dict[str, str]) -> None:
    """The kernel still gives the answer recorded in REGRESSIONS (and so the model, above)."""
    if not check_kernel(real, name, text):
        pytest.skip("run=1 would let ksmd merge pages of mergeable processes")
    got, knobs = kernel_write(real, name, text)
    assert (got, changed(knobs)) == (err, expected)


@pytest.mark.linux
@on_linux
def test_kernel_no_utf8_form(real: LinuxKernel) -> None:
    """LinuxSysfs refuses a lone surrogate as the model does: ValueError, EACCES on a counter."""
    kernel_write(real, "run", "0")
    with pytest.raises(ValueError):
        real.sysfs["sleep_millisecs"] = "1\udfff"
    assert outcome(real.sysfs, "full_scans", "\ud800") == READ_ONLY_WRITE_ERRNO
    assert {n: real.sysfs[n] for n in KNOBS} == {n: START[n] for n in KNOBS}
