"""Every document the code and the docs cite is in the repository, and the package names no
path of a particular machine: a reader of either can follow every reference."""

from __future__ import annotations

import re
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


def _resolves(cited: str, source: Path) -> bool:
    bases = (ROOT, ROOT / "docs", ROOT / "benchmarks" / "results", source.parent)
    return cited in WRITTEN or any((base / cited).is_file() for base in bases)


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_cited_document_is_in_the_repository(source: Path) -> None:
    text = source.read_text(encoding="utf-8")
    missing = sorted({c for c in CITED.findall(text) if not _resolves(c, source)})
    assert not missing, f"{source.relative_to(ROOT)} cites {missing}, not in the repository"


def test_the_package_names_no_path_of_a_machine() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in sorted((ROOT / "lightning_sens").rglob("*.py"))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if MACHINE_PATH.search(line)
    ]
    assert not found, "\n".join(found)
