"""Every document the code cites lives in the repository: each ``docs/<name>.md §x.y`` in the sources, tests,
benchmarks, scripts and the README names an existing file with a heading numbered x.y."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CITATION = re.compile(r"docs/(\w+)\.md(?: §([0-9]+(?:\.[0-9]+)*))?")


def cited_sections(text: str) -> set[tuple[str, str | None]]:
    """(doc name, section or None) of every citation in ``text``; ``§a, §b`` after a doc cite it too."""
    found = set()
    for match in CITATION.finditer(text):
        found.add((match.group(1), match.group(2)))
        rest = text[match.end():match.end() + 40]
        for more in re.finditer(r"^(?:,| and| /| or)\s*§([0-9]+(?:\.[0-9]+)*)", rest):
            found.add((match.group(1), more.group(1)))
    return found


def headings(doc: Path) -> set[str]:
    """Section numbers of a markdown file's headings (``## 1.``, ``### 1.6 Title``)."""
    return {m.group(1).rstrip(".") for m in re.finditer(r"^#+\s+([0-9]+(?:\.[0-9]+)*\.?)\s", doc.read_text(), re.M)}


def tracked_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    return [ROOT / n for n in names if n.endswith((".py", ".sh", ".md", ".toml")) and not n.startswith("benchmarks/archive/")]


def test_cited_docs_and_sections_exist():
    missing, count = [], 0
    for path in tracked_files():
        if not path.is_file():
            continue
        for doc, section in cited_sections(path.read_text()):
            count += 1
            target = ROOT / "docs" / f"{doc}.md"
            if not target.is_file():
                missing.append(f"{path.relative_to(ROOT)}: docs/{doc}.md does not exist")
            elif section is not None and section not in headings(target):
                missing.append(f"{path.relative_to(ROOT)}: docs/{doc}.md has no section {section}")
    assert count > 50  # the code does cite the docs
    assert missing == []


def test_no_citations_of_documents_outside_the_repository():
    """The team notes the code used to cite (SPEC, MODELS.md, DESIGN.md) are not in the repository."""
    pattern = re.compile(r"\bSPEC\s*§|\bMODELS(?:\.md)?\s*§|\bDESIGN(?:\.md)?\s*§")
    offenders = [str(p.relative_to(ROOT)) for p in tracked_files()
                 if p.is_file() and not p.is_relative_to(ROOT / "docs") and pattern.search(p.read_text())]
    assert offenders == []


def test_the_checker_sees_a_missing_section():
    assert ("algorithm", "1.6") in cited_sections("see docs/algorithm.md §1.6, §4.3")
    assert ("algorithm", "4.3") in cited_sections("see docs/algorithm.md §1.6, §4.3")
    assert "99.9" not in headings(ROOT / "docs" / "algorithm.md") and "1.6" in headings(ROOT / "docs" / "algorithm.md")
