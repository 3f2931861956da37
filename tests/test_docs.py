"""The README and docs/ point only at what is in the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers import REPO

DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_relative_links_resolve_inside_the_repository(document: Path) -> None:
    text = document.read_text()
    for target in LINK.findall(text):
        if re.match(r"[a-z]+://", target):
            continue
        resolved = (document.parent / target).resolve()
        assert resolved.is_relative_to(REPO), f"{document}: {target} leaves the repository"
        assert resolved.exists(), f"{document}: {target} does not exist"


def test_readme_points_at_the_design_note_and_nothing_outside() -> None:
    readme = (REPO / "README.md").read_text()
    assert "(docs/design.md)" in readme
    assert "shared/" not in readme and "workspace" not in readme


def test_no_merge_conflict_markers_are_left_in_the_repository() -> None:
    # A conflict marker once sat in the README for a whole session: catch it here.
    marker = re.compile(r"^(<{7}|>{7}|={7})( |$)", re.MULTILINE)
    tracked = [
        *DOCUMENTS,
        *(REPO / "supervisor").glob("*.py"),
        *(REPO / "tests").rglob("*.py"),
        *(REPO / "benchmarks").glob("*.py"),
        *(REPO / "benchmarks").glob("*.md"),
    ]
    for path in tracked:
        found = marker.search(path.read_text())
        assert found is None, f"{path}: conflict marker {found.group(0)!r}"
