"""Which processes a list of names means: `web`, `web:1`, `web:*`, `web:`, `w*`, `all`.

The control methods take names the way supervisorctl users type them. Each name is,
tried in this order:

- `all`: every process;
- a program (`web`): all its processes;
- a process (`web:1`; a program with `numprocs = 1` has one process named like it);
- `PROGRAM:*` or `PROGRAM:`: all the processes of PROGRAM (supervisorctl's group form;
  it works for single-process programs too, whose process name has no colon);
- a shell-style pattern (`*`, `?`, `[...]`, matched with `fnmatchcase`): every process
  whose name, or whose program's name, it matches.

A name that matches nothing is unknown. This module is pure: no daemon, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from fnmatch import fnmatchcase

ALL = "all"
_GLOB_CHARACTERS = frozenset("*?[")


def is_pattern(name: str) -> bool:
    """Whether `name` has shell-style wildcards."""
    return not _GLOB_CHARACTERS.isdisjoint(name)


def select(
    names: Iterable[str], programs: Mapping[str, Sequence[str]]
) -> tuple[list[str], list[str]]:
    """(process names, unknown names) for `names`, given program -> its process names.

    Process names come in the order of `names`, each pattern's matches in the order of
    `programs`, without duplicates. The unknown names come in the order given.
    """
    found: list[str] = []
    unknown: list[str] = []
    processes: dict[str, None] | None = None  # built on first need: process -> None
    for name in names:
        matches = _select_one(name, programs)
        if matches is None:
            if processes is None:
                processes = {p: None for members in programs.values() for p in members}
            matches = [name] if name in processes else []
        if matches:
            found += matches
        else:
            unknown.append(name)
    return list(dict.fromkeys(found)), unknown


def _select_one(name: str, programs: Mapping[str, Sequence[str]]) -> list[str] | None:
    """The processes `name` means, or None for "look it up as a process name"."""
    if name == ALL:
        return [p for members in programs.values() for p in members]
    if name in programs:
        return list(programs[name])
    group, colon, rest = name.rpartition(":")
    if colon and rest in ("", "*") and group in programs:
        return list(programs[group])
    if is_pattern(name):
        return [
            process
            for program, members in programs.items()
            for process in members
            if fnmatchcase(process, name) or fnmatchcase(program, name)
        ]
    return None
