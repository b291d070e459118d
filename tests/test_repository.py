# SPDX-License-Identifier: GPL-2.0-only
"""The repository stands alone: it cites no document outside itself.

Someone who clones ksmlab has only the repository, so code, tests and docs
must cite its own documents (``docs/kernel-behaviour.md``, ...) and never a
path on the machine they were written on.  The machine prefixes are built
from parts below so that this file does not match its own pattern.  System
paths the code really uses (/proc, /sys, /dev, /run/lock, /tmp, /usr/bin) are
not documents and are not checked.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Where the repository's own text lives, and which files count as text.
SCANNED_DIRS = ("src", "tests", "bench", "docs", "examples")
SCANNED_FILES = ("README.md", "pyproject.toml", ".ci/run")
TEXT_SUFFIXES = frozenset({".py", ".md", ".toml", ".c", ".txt", ".cfg"})
# Build output and caches, never part of a clone.
SKIPPED_PARTS = ("__pycache__", "build", "dist")

# Home directories and the workplace root of a machine.
MACHINE_PATH = re.compile("|".join(re.escape(f"/{name}/") for name in ("work", "root", "home")))

# A repository-relative document: docs/<name>.md, not part of a longer path.
DOC_REF = re.compile(r"(?<![\w./-])docs/[\w./-]+?\.md\b")
# A local Markdown link target: [text](target.md) or (target.md#anchor).
MD_LINK = re.compile(r"\]\(([^)#:\s]+\.md)(?:#[^)]*)?\)")
# "spec 3.5", "Spec 7", "spec §3.11": a section of docs/kernel-behaviour.md.
SPEC_REF = re.compile(r"\b[Ss]pec (?:§ ?)?(\d+(?:\.\d+)?)\b")
HEADING = re.compile(r"^#{2,3} (\d+(?:\.\d+)?)[. ]", re.MULTILINE)


def _skipped(path: Path) -> bool:
    parts = path.relative_to(ROOT).parts
    return any(p.startswith(".") or p in SKIPPED_PARTS or p.endswith(".egg-info") for p in parts[:-1])


def text_files() -> list[Path]:
    """Every text file of the repository's own content, in a stable order."""
    found = [ROOT / name for name in SCANNED_FILES if (ROOT / name).is_file()]
    for top in SCANNED_DIRS:
        found += [p for p in (ROOT / top).rglob("*")
                  if p.is_file() and p.suffix in TEXT_SUFFIXES and not _skipped(p)]
    return sorted(found)


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def hits(pattern: re.Pattern[str], paths: list[Path]) -> list[tuple[str, int, str]]:
    """(file, line number, matched text) for every match of *pattern*."""
    out = []
    for path in paths:
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            out += [(rel(path), lineno, m.group(0)) for m in pattern.finditer(line)]
    return out


FILES = text_files()


def test_the_scan_sees_the_repository() -> None:
    """The file list is not empty by accident (a moved directory would pass every check)."""
    names = {rel(p) for p in FILES}
    assert {"README.md", "docs/kernel-behaviour.md", "docs/kernel-selftests.md",
            "src/ksmlab/kernel.py", "tests/test_repository.py"} <= names


def test_no_absolute_path_of_a_machine() -> None:
    """No file cites a document by a path that exists only on the author's machine."""
    found = hits(MACHINE_PATH, FILES)
    assert not found, "cite the repository's own docs/ instead of:\n" + "\n".join(
        f"  {f}:{n}: {text}" for f, n, text in found)


def test_cited_docs_exist() -> None:
    """Every ``docs/<name>.md`` named anywhere is a file of the repository."""
    found = hits(DOC_REF, FILES)
    assert any(text == "docs/kernel-behaviour.md" for _f, _n, text in found)
    missing = [(f, n, text) for f, n, text in found if not (ROOT / text).is_file()]
    assert not missing, "no such document:\n" + "\n".join(f"  {f}:{n}: {t}" for f, n, t in missing)


@pytest.mark.parametrize("path", [p for p in FILES if p.suffix == ".md"], ids=rel)
def test_markdown_links_resolve(path: Path) -> None:
    """A Markdown link to a local .md file points at an existing file."""
    text = path.read_text(encoding="utf-8")
    broken = [t for t in MD_LINK.findall(text) if not (path.parent / t).is_file()]
    assert not broken, f"{rel(path)}: broken links {broken}"


def test_spec_citations_name_existing_sections() -> None:
    """Every "spec N.M" in code and tests is a numbered section of docs/kernel-behaviour.md."""
    doc = (ROOT / "docs" / "kernel-behaviour.md").read_text(encoding="utf-8")
    sections = set(HEADING.findall(doc))
    assert {"0", "1.1", "3.5", "3.11", "7", "10"} <= sections
    code = [p for p in FILES if p.suffix == ".py"]
    cited = hits(SPEC_REF, code)
    assert cited, "no spec citation found: has the citation style changed?"
    unknown = [(f, n, t) for f, n, t in cited if SPEC_REF.sub(r"\1", t) not in sections]
    assert not unknown, "no such section in docs/kernel-behaviour.md:\n" + "\n".join(
        f"  {f}:{n}: {t}" for f, n, t in unknown)
