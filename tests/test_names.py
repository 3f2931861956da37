"""names.select: what `web`, `web:1`, `web:*`, `web:`, `w*` and `all` mean."""

from __future__ import annotations

import pytest

from supd.names import is_pattern, select

PROGRAMS = {
    "web": ["web:0", "web:1"],
    "crashy": ["crashy"],
    "worker": ["worker:0", "worker:1", "worker:2"],
    "db": [],  # removed by a reload, its processes already gone
}


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (["all"], ["web:0", "web:1", "crashy", "worker:0", "worker:1", "worker:2"]),
        (["web"], ["web:0", "web:1"]),
        (["web:1"], ["web:1"]),
        (["crashy"], ["crashy"]),
        (["web:*"], ["web:0", "web:1"]),
        (["web:"], ["web:0", "web:1"]),
        (["crashy:*"], ["crashy"]),  # the group form works for one-process programs
        (["crashy:"], ["crashy"]),
        (["w*"], ["web:0", "web:1", "worker:0", "worker:1", "worker:2"]),
        (["*:1"], ["web:1", "worker:1"]),
        (["worker:[02]"], ["worker:0", "worker:2"]),
        (["?eb"], ["web:0", "web:1"]),  # matches the program's name
        (["cr?shy"], ["crashy"]),
        (["web:1", "web", "w*"], ["web:1", "web:0", "worker:0", "worker:1", "worker:2"]),
    ],
)
def test_select(names: list[str], expected: list[str]) -> None:
    assert select(names, PROGRAMS) == (expected, [])


@pytest.mark.parametrize(
    ("names", "unknown"),
    [
        (["nope"], ["nope"]),
        (["web:2"], ["web:2"]),
        (["nope:*"], ["nope:*"]),
        (["x*"], ["x*"]),
        (["db"], ["db"]),  # a program without processes matches none
        (["web", "nope", "x?"], ["nope", "x?"]),
        (["Web"], ["Web"]),  # names are case-sensitive
    ],
)
def test_unknown_names(names: list[str], unknown: list[str]) -> None:
    assert select(names, PROGRAMS)[1] == unknown


def test_is_pattern() -> None:
    assert is_pattern("web:*") and is_pattern("w?b") and is_pattern("w[ae]b")
    assert not is_pattern("web:1") and not is_pattern("web:")
