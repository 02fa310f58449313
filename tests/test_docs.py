"""The README and docs/ hold together: every relative link reaches a file and, with a ``#anchor``,
a heading of that file; every ``benchmarks/*.py`` they name exists; the README fits on a screen
(<= 300 lines) and names no machine path."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    in_code = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            found.add(slug(line.lstrip("#")))
    return found


def test_slug_follows_github():
    assert slug(" Choosing `--shape` and `--bench-shape`") == "choosing---shape-and---bench-shape"
    assert slug("Exit codes in detail") == "exit-codes-in-detail"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_reach_a_file_and_heading(page: Path):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading '{anchor}' in {dest.relative_to(REPO)}")
    assert not broken, broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_named_benchmarks_exist(page: Path):
    named = set(re.findall(r"benchmarks/[\w.]+\.(?:py|sh)", page.read_text()))
    assert [n for n in sorted(named) if not (REPO / n).exists()] == []


def test_readme_fits_on_a_screen_and_names_no_machine_path():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 300
    for page in PAGES + [REPO / "tests" / "fixtures" / "README.md"]:
        assert not re.search(r"(?<![\w.])/(work|root|home)/", page.read_text()), page
