"""Every document the code and the docs cite is in the repository, every section they cite is a
heading of that document, and the package names no path of a particular machine: a reader of
either can follow every reference.

A citation of a section has one form everywhere: ``docs/<page>.md, "<section title>"``, possibly
followed by ``and "<another title>"``, with the title as the heading reads after its number. The
pages whose sections are numbered (docs/method.md, docs/derivations.md) number every level-2 and
level-3 heading, consecutively: ``## 1. Title``, ``### 1.1 Title``.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [
    ROOT / "README.md",
    *sorted(
        path
        for folder in ("lightning_sens", "tests", "examples", "benchmarks", "docs")
        for path in (ROOT / folder).rglob("*")
        if path.suffix in (".py", ".md")
    ),
]
CITED = re.compile(r"(?<![\w/.-])((?:[\w-]+/)*[\w-]+\.md)\b")
# Prefixes of one machine's files (a build machine, a home folder, a temporary folder).
MACHINE_PATH = re.compile(r"(?<![\w.])(/work/|/home/|/root/|/Users/|/tmp/|[A-Z]:\\)")

# Files that programs write (their output names, not citations).
WRITTEN = {"FILE.md", "results.md", "label_noise.md"}

# A section citation: the page, a comma, the quoted title, and any further ` and "title"`.
SECTION = re.compile(r'(?<![\w/.-])docs/([\w-]+\.md),\s+"([^"\n]+)"((?:\s+and\s+"[^"\n]+")*)')
QUOTED = re.compile(r'"([^"\n]+)"')
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
NUMBER = re.compile(r"^\d+(?:\.\d+)*\.?\s+")
NUMBERED_PAGES = ("method.md", "derivations.md")

# Section citations in files that other work is rewriting right now, which name a heading that
# does not exist (yet). Each entry is (page, title); remove it once the citation is fixed.


def _resolves(cited: str, source: Path) -> bool:
    bases = (ROOT, ROOT / "docs", ROOT / "benchmarks" / "results", source.parent)
    return cited in WRITTEN or any((base / cited).is_file() for base in bases)


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_cited_document_is_in_the_repository(source: Path) -> None:
    text = source.read_text(encoding="utf-8")
    missing = sorted({c for c in CITED.findall(text) if not _resolves(c, source)})
    assert not missing, f"{source.relative_to(ROOT)} cites {missing}, not in the repository"


def _headings(text: str) -> list[tuple[int, str]]:
    """(level, text) of every Markdown heading outside fenced code blocks."""
    found, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            continue
        match = None if fenced else HEADING.match(line)
        if match:
            found.append((len(match.group(1)), match.group(2)))
    return found


@cache
def _titles(page: str) -> frozenset[str]:
    """The section titles of a page under docs/, each without its number."""
    path = ROOT / "docs" / page
    if not path.is_file():
        return frozenset()
    headings = _headings(path.read_text(encoding="utf-8"))
    return frozenset(NUMBER.sub("", text) for _, text in headings)


def _citations(text: str, python: bool) -> list[tuple[str, str]]:
    """Every (page, section title) cited in ``text``, line breaks and comment marks joined."""
    joined = re.sub(r"\s*\n\s*(?:#+\s*)?" if python else r"\s*\n\s*", " ", text)
    return [
        (page, title)
        for page, first, more in SECTION.findall(joined)
        for title in (first, *QUOTED.findall(more))
    ]


def _unresolved(text: str, python: bool) -> list[str]:
    return [
        f'docs/{page}, "{title}"'
        for page, title in _citations(text, python)
        if title not in _titles(page)
    ]


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_cited_section_is_a_heading_of_its_page(source: Path) -> None:
    text = source.read_text(encoding="utf-8")
    missing = _unresolved(text, python=source.suffix == ".py")
    assert not missing, f"{source.relative_to(ROOT)} cites sections that do not exist: {missing}"


def test_a_citation_of_a_missing_section_is_caught() -> None:
    page, title = "docs/method.md", "A section nobody wrote"
    docstring = f'"""Some function ({page}, "The measure" and\n    "{title}")."""\n'
    assert _citations(docstring, python=True) == [
        ("method.md", "The measure"),
        ("method.md", title),
    ]
    assert _unresolved(docstring, python=True) == [f'{page}, "{title}"']
    comment = f'# the closed form ({page}, "Two facts you\n    # must know")\n'
    assert _unresolved(comment, python=True) == []


@pytest.mark.parametrize("page", NUMBERED_PAGES)
def test_numbered_pages_number_every_section_consecutively(page: str) -> None:
    """``## N. Title`` from 1 on; under it ``### N.M Title`` from N.1 on."""
    headings = _headings((ROOT / "docs" / page).read_text(encoding="utf-8"))
    problems, section, subsection = [], 0, 0
    for level, text in headings:
        if level == 2:
            section, subsection = section + 1, 0
            if not text.startswith(f"{section}. "):
                problems.append(f"'## {text}' should start with '{section}. '")
        elif level == 3:
            subsection += 1
            if not re.match(rf"{section}\.{subsection} \S", text):
                problems.append(f"'### {text}' should start with '{section}.{subsection} '")
    assert section > 0, f"docs/{page} has no level-2 sections"
    assert not problems, f"docs/{page}: " + "; ".join(problems)


def test_the_package_names_no_path_of_a_machine() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in sorted((ROOT / "lightning_sens").rglob("*.py"))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if MACHINE_PATH.search(line)
    ]
    assert not found, "\n".join(found)
