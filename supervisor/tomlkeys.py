"""Finding the line where a key is written in a TOML file (for config error messages).

tomllib returns plain dicts with no positions. KeyLocator re-reads text that tomllib
has already accepted, with a tokenizer that knows TOML's four string forms and
comments, and a tiny parser for headers, dotted keys and inline tables. Arrays and
scalar values are skipped. It is best effort: any surprise ends the scan, keeping the
positions found so far, and lookups fall back to the enclosing table.

Imports the standard library only; config.py is its one user.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python < 3.11
    import tomli as tomllib  # type: ignore[no-redef, import-not-found, unused-ignore]

__all__ = ["KeyLocator", "KeyPath"]

KeyPath = tuple[str | int, ...]


@dataclass(frozen=True)
class _Token:
    kind: Literal["punct", "newline", "word", "string", "eof"]
    text: str  # punctuation, bare word, or the decoded single-line string
    line: int
    offset: int


_PUNCTUATION = frozenset("[]{}=,.")
_WORD_END = _PUNCTUATION | frozenset(" \t\r\n#\"'")


def _string_end(text: str, start: int) -> int:
    """Index just past the string literal that starts at text[start]."""
    quote = text[start]
    escapes = quote == '"'
    delimiter = quote * 3 if text.startswith(quote * 3, start) else quote
    index = start + len(delimiter)
    while not text.startswith(delimiter, index):
        if index >= len(text):
            raise ValueError("unterminated string")
        index += 2 if escapes and text[index] == "\\" else 1
    end = index + len(delimiter)
    if len(delimiter) == 3:
        # Up to two quotes may sit right before the closing delimiter.
        while end < len(text) and text[end] == quote and end - index < 5:
            end += 1
    return end


def _decode_string(literal: str) -> str:
    if literal.startswith("'"):
        return literal[1:-1]
    value = tomllib.loads(f"k = {literal}")["k"]
    return value if isinstance(value, str) else ""


def _tokenize(text: str) -> Iterator[_Token]:
    line, index = 1, 0
    while index < len(text):
        char = text[index]
        if char in " \t\r":
            index += 1
        elif char == "\n":
            yield _Token("newline", char, line, index)
            line, index = line + 1, index + 1
        elif char == "#":
            newline = text.find("\n", index)
            index = len(text) if newline < 0 else newline
        elif char in "\"'":
            end = _string_end(text, index)
            literal = text[index:end]
            multiline = literal.startswith(char * 3)
            yield _Token("string", "" if multiline else _decode_string(literal), line, index)
            line, index = line + literal.count("\n"), end
        elif char in _PUNCTUATION:
            yield _Token("punct", char, line, index)
            index += 1
        else:
            end = index
            while end < len(text) and text[end] not in _WORD_END:
                end += 1
            yield _Token("word", text[index:end], line, index)
            index = end
    yield _Token("eof", "", line, index)


class KeyLocator:
    """Maps TOML key paths to the 1-based line where each was first written."""

    def __init__(self, text: str) -> None:
        self._lines: dict[tuple[str, ...], int] = {}  # keys and table headers
        self._mentions: dict[tuple[str, ...], int] = {}  # tables implied by dotted keys
        self._tokens: list[_Token] = []
        self._index = 0
        try:
            self._tokens = list(_tokenize(text))
            self._parse_document()
        except Exception:  # positions are a nicety, never a reason to fail
            pass

    def line_of(self, path: KeyPath) -> int | None:
        """Line of the key, else of the nearest enclosing table found, else None."""
        keys = tuple(part for part in path if isinstance(part, str))
        for length in range(len(keys), 0, -1):
            prefix = keys[:length]
            line = self._lines.get(prefix) or self._mentions.get(prefix)
            if line is not None:
                return line
        return None

    def _peek(self) -> _Token:
        return self._tokens[self._index]

    def _next(self) -> _Token:
        token = self._tokens[self._index]
        self._index = min(self._index + 1, len(self._tokens) - 1)
        return token

    def _at(self, punctuation: str) -> bool:
        token = self._peek()
        return token.kind == "punct" and token.text == punctuation

    def _record(self, path: tuple[str, ...], line: int) -> None:
        self._lines.setdefault(path, line)
        for length in range(1, len(path)):
            self._mentions.setdefault(path[:length], line)

    def _parse_document(self) -> None:
        table: tuple[str, ...] = ()
        while self._peek().kind != "eof":
            start = self._index
            if self._peek().kind == "newline":
                self._next()
            elif self._at("["):
                table = self._parse_header()
            else:
                self._parse_key_value(table)
            if self._index == start:  # never loop forever on something unexpected
                return

    def _parse_header(self) -> tuple[str, ...]:
        opening = self._next()
        if self._at("[") and self._peek().offset == opening.offset + 1:
            self._next()  # [[array.of.tables]]: positions of the first one will do
        path = self._parse_key()
        self._record(path, opening.line)
        while self._peek().kind not in ("newline", "eof"):
            self._next()
        return path

    def _parse_key(self) -> tuple[str, ...]:
        parts = [self._next().text]
        while self._at("."):
            self._next()
            parts.append(self._next().text)
        return tuple(parts)

    def _parse_key_value(self, table: tuple[str, ...]) -> None:
        line = self._peek().line
        path = table + self._parse_key()
        if not self._at("="):
            raise ValueError("expected '='")
        self._next()
        self._record(path, line)
        if self._at("{"):
            self._parse_inline_table(path)
        elif self._at("["):
            self._skip_brackets()
        else:
            self._skip_scalar()

    def _parse_inline_table(self, table: tuple[str, ...]) -> None:
        self._next()
        while not self._at("}") and self._peek().kind != "eof":
            if self._at(",") or self._peek().kind == "newline":
                self._next()
            else:
                self._parse_key_value(table)
        self._next()

    def _skip_brackets(self) -> None:
        depth = 0
        while True:
            token = self._next()
            if token.kind == "eof":
                return
            if token.kind == "punct" and token.text in "[{":
                depth += 1
            elif token.kind == "punct" and token.text in "]}":
                depth -= 1
                if depth == 0:
                    return

    def _skip_scalar(self) -> None:
        # Dates with a space, floats with '.', signs: everything up to the value's end.
        while not (
            self._peek().kind in ("newline", "eof")
            or (self._peek().kind == "punct" and self._peek().text in ",}]")
        ):
            self._next()
