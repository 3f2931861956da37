"""`env_files`: environment files in systemd's EnvironmentFile= syntax (systemd.exec(5)).

Read at each start of a program, so a file written between two runs is seen by the
next. The rules, as systemd.exec(5) documents them (and as its parser reads them):

- one KEY=value assignment per line; empty lines, lines without "=", and lines whose
  first non-blank character is "#" or ";" are ignored (a comment ending in a backslash
  continues on the next line, as in systemd);
- an unquoted value is read like unquoted POSIX shell text: a backslash keeps the next
  character ("\\\\" is one backslash), a backslash at the end of a line continues the
  value on the next one; leading and trailing blanks are dropped, inner ones kept, and
  quotes after the first character are kept as they are;
- a '…'-quoted value may span lines and keeps every character but "'" verbatim;
- a "…"-quoted value may span lines; a backslash keeps one of " \\ ` $, a backslash-
  newline is a continuation, and before any other character both are kept;
- text right after a closing quote continues the value (FOO='a'"b" is "ab");
- names that are not valid environment variable names are skipped, like systemd does;
- the file must be UTF-8, without NUL.

A path starting with "-" is optional: a missing file is skipped. A path may be a glob
(its matches are read in sorted order). Later files win over earlier ones.

Standard library only; no supd import.
"""

from __future__ import annotations

import enum
import glob
import os
import re

# systemd's env_name_is_valid: a letter or "_", then letters, digits or "_".
_VALID_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_BLANK = " \t\r"  # systemd's WHITESPACE within a line
_NEWLINE = "\n"
_DOUBLE_QUOTE_ESCAPES = '"\\`$'
# A file bigger than this is refused rather than read into memory at every start.
MAX_FILE_BYTES = 4 << 20


class EnvFileError(Exception):
    """A required file is missing or unreadable, or a file is not valid: the message
    names the file (a spawn error for the process that needs it)."""


class _S(enum.Enum):
    PRE_KEY = 0
    KEY = 1
    PRE_VALUE = 2
    VALUE = 3
    VALUE_ESCAPE = 4
    SINGLE = 5
    DOUBLE = 6
    DOUBLE_ESCAPE = 7
    COMMENT = 8
    COMMENT_ESCAPE = 9


def parse(text: str) -> list[tuple[str, str]]:
    """The assignments of an environment file, in order (invalid names left out)."""
    assignments: list[tuple[str, str]] = []
    state = _S.PRE_KEY
    key: list[str] = []
    value: list[str] = []
    keep = 0  # value length up to the last character that is not trailing blank

    def push() -> None:
        name = "".join(key).strip(_BLANK)
        if _VALID_NAME.match(name):
            assignments.append((name, "".join(value[:keep])))

    for c in text:
        match state:
            case _S.PRE_KEY:
                if c in "#;":
                    state = _S.COMMENT
                elif c not in _BLANK + _NEWLINE:
                    state, key, value, keep = _S.KEY, [c], [], 0
            case _S.KEY:
                if c == _NEWLINE:
                    state = _S.PRE_KEY  # a line without "=": ignored
                elif c == "=":
                    state = _S.PRE_VALUE
                else:
                    key.append(c)
            case _S.PRE_VALUE:
                if c == _NEWLINE:
                    push()
                    state = _S.PRE_KEY
                elif c == "'":
                    state = _S.SINGLE
                elif c == '"':
                    state = _S.DOUBLE
                elif c == "\\":
                    state = _S.VALUE_ESCAPE
                elif c not in _BLANK:
                    value.append(c)
                    keep = len(value)
                    state = _S.VALUE
            case _S.VALUE:
                if c == _NEWLINE:
                    push()
                    state = _S.PRE_KEY
                elif c == "\\":
                    state = _S.VALUE_ESCAPE
                else:
                    value.append(c)
                    if c not in _BLANK:
                        keep = len(value)
            case _S.VALUE_ESCAPE:
                state = _S.VALUE
                if c != _NEWLINE:  # backslash-newline: a continuation
                    value.append(c)
                    keep = len(value)
            case _S.SINGLE:
                if c == "'":
                    state = _S.PRE_VALUE
                else:
                    value.append(c)
                    keep = len(value)
            case _S.DOUBLE:
                if c == '"':
                    state = _S.PRE_VALUE
                elif c == "\\":
                    state = _S.DOUBLE_ESCAPE
                else:
                    value.append(c)
                    keep = len(value)
            case _S.DOUBLE_ESCAPE:
                state = _S.DOUBLE
                if c in _DOUBLE_QUOTE_ESCAPES:
                    value.append(c)
                elif c != _NEWLINE:
                    value += ("\\", c)
                keep = len(value)
            case _S.COMMENT:
                if c == "\\":
                    state = _S.COMMENT_ESCAPE
                elif c == _NEWLINE:
                    state = _S.PRE_KEY
            case _S.COMMENT_ESCAPE:
                state = _S.COMMENT
    if state in (_S.PRE_VALUE, _S.VALUE, _S.VALUE_ESCAPE, _S.SINGLE, _S.DOUBLE, _S.DOUBLE_ESCAPE):
        push()  # the last line without its newline (an open quote ends with the file)
    return assignments


def read(path: str) -> dict[str, str]:
    """One file's variables; raises EnvFileError naming the file."""
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise EnvFileError(f"env file {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise EnvFileError(f"env file {path}: larger than {MAX_FILE_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EnvFileError(f"env file {path}: not UTF-8 (byte {exc.start})") from None
    if "\0" in text:
        raise EnvFileError(f"env file {path}: contains a NUL character")
    return dict(parse(text.removeprefix("\ufeff")))


def load(entries: tuple[str, ...] | list[str]) -> dict[str, str]:
    """Every entry's variables, later ones winning. An entry is a path or a glob, with
    a leading "-" when it is optional. A required one that is missing (or a glob that
    matches nothing) raises EnvFileError naming it."""
    merged: dict[str, str] = {}
    for entry in entries:
        optional = entry.startswith("-")
        pattern = entry[1:] if optional else entry
        if glob.has_magic(pattern):
            paths = sorted(glob.glob(pattern))
            if not paths and not optional:
                raise EnvFileError(f"env file {pattern}: no file matches")
        else:
            paths = [pattern]
        for path in paths:
            try:
                merged.update(read(path))
            except EnvFileError:
                if optional and not os.path.exists(path):
                    continue
                raise
    return merged
