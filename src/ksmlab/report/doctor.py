"""``ksmlab doctor``'s output: the diagnosis as terminal tables and as a JSON document."""

from __future__ import annotations

from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from ksmlab.backends.linux_doctor import Diagnosis
from ksmlab.backends.linux_repair import Repair
from ksmlab.scenario.units import format_bytes

DOCTOR_SCHEMA = "ksmlab.doctor/1"

_SUMMARY_COUNTERS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
                     "ksm_zero_pages", "general_profit", "full_scans")


def _knob_table(d: Diagnosis) -> Table:
    t = Table(title=f"KSM knobs ({d.sysfs_dir})", title_justify="left")
    t.add_column("knob")
    t.add_column("value", justify="right")
    t.add_column("boot value", justify="right")
    t.add_column("note")
    repair = d.to_repair
    for name in d.knobs:
        value, boot = d.files[name], d.defaults.get(name, "?")
        notes = []
        differs = value != boot and not (name == "run" and (value, boot) == ("2", "0"))
        if name in repair:
            notes.append(f"a dead ksmlab session changed it; its saved value is {repair[name][1]}")
        elif name == "run" and value == "2":
            notes.append("stopped after un-merging everything (run=2)")
        elif differs:
            notes.append("differs from the boot value")
        style = "bold red" if name in repair else ("yellow" if differs else "")
        t.add_row(name, value, boot, "; ".join(notes), style=style)
    return t


def _lock_text(d: Diagnosis) -> Text:
    if d.holders:
        who = ", ".join(f"pid {pid} ({cmd})" for pid, cmd in d.holders)
        return Text(f"ksmlab lock {d.lock_path}: held by {who}, a session running now.")
    if d.stale is not None and d.stale.saved_knobs is not None:
        changed = ", ".join(f"{n} {now} (saved {saved})"
                            for n, (now, saved) in sorted(d.to_repair.items())) or "none"
        return Text(
            f"ksmlab lock {d.lock_path}: a session ended without restoring the knobs it saved "
            f"({d.stale.describe()}).\nKnobs that differ from what it saved: {changed}.\n"
            f"Run 'ksmlab doctor --repair' (as root) to restore them; the next ksmlab session "
            f"on the real kernel would do it too.", style="bold red")
    if d.note:
        return Text(f"ksmlab lock {d.lock_path}: not held; it holds a note naming no saved knobs "
                    f"({d.note[:120]!r}), which the next session clears.")
    return Text(f"ksmlab lock {d.lock_path}: not held, no note: every ksmlab session ended cleanly.")


def _process_table(d: Diagnosis) -> RenderableType:
    if not d.processes:
        return Text("No process has a mergeable area or merged pages.")
    t = Table(title="Processes KSM works on", title_justify="left")
    t.add_column("pid", justify="right")
    t.add_column("merging pages", justify="right")
    t.add_column("how")
    t.add_column("command")
    for p in d.processes:
        how = "prctl merge-any" if p.merge_any else ("madvise" if p.mergeable else "-")
        t.add_row(str(p.pid), str(p.merging_pages), how, p.cmdline)
    return t


def doctor_report(d: Diagnosis) -> RenderableType:
    """Everything :class:`Diagnosis` holds, for the terminal."""
    counters = ", ".join(
        f"{n}={format_bytes(int(d.files[n])) if n == 'general_profit' else d.files[n]}"
        for n in _SUMMARY_COUNTERS if n in d.files)
    run = {"0": "stopped", "1": "running", "2": "stopped, and every page un-merged"}.get(
        d.files.get("run", ""), d.files.get("run", "?"))
    return Group(Text(f"ksmd: run={d.files.get('run', '?')} ({run}); {counters}"),
                 Text(""), _knob_table(d), Text(""), _lock_text(d), Text(""), _process_table(d))


def doctor_document(d: Diagnosis, repaired: Repair | None = None) -> dict[str, Any]:
    """The diagnosis as the ``ksmlab.doctor/1`` JSON document (see docs/cli.md)."""
    stale = None
    if d.stale is not None:
        stale = {"pid": d.stale.pid, "cmdline": d.stale.cmdline, "since": d.stale.since,
                 "saved_knobs": d.stale.saved_knobs, "ran": d.stale.ran,
                 "differs": {n: {"now": now, "saved": saved}
                             for n, (now, saved) in sorted(d.to_repair.items())}}
    doc: dict[str, Any] = {
        "schema": DOCTOR_SCHEMA,
        "sysfs_dir": d.sysfs_dir,
        "files": d.files,
        "knobs": {n: {"value": d.files[n], "boot": d.defaults.get(n)} for n in d.knobs},
        "non_default": sorted(d.non_default),
        "lock": {"path": d.lock_path, "holders": [{"pid": p, "cmdline": c} for p, c in d.holders],
                 "note": d.note, "stale_session": stale},
        "needs_repair": d.needs_repair,
        "processes": [{"pid": p.pid, "cmdline": p.cmdline, "merging_pages": p.merging_pages,
                       "merge_any": p.merge_any, "mergeable": p.mergeable} for p in d.processes],
    }
    if repaired is not None:
        doc["repaired"] = {"changed": {n: {"was": a, "now": b}
                                       for n, (a, b) in sorted(repaired.changed.items())},
                           "failures": [{"knob": f.name, "value": f.value, "error": str(f.error)}
                                        for f in repaired.failures]}
    return doc
