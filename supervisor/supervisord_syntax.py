"""supervisord's file format and value syntaxes, for `supd import` and the config's hints.

Reading follows Supervisor 4.3.0's own code (supervisor/options.py and datatypes.py), so
that a file means what supervisord made of it: configparser with `;` and `#` inline
comments after whitespace, duplicate sections merged, `[include] files` globbed
relative to the main file and read once (an [include] in an included file is ignored,
as supervisord ignores it), `%(here)s` the folder of the file a value was written in.

Two things a supervisord user carries over by habit: `%(NAME)s` expansions, and the
`KEY="value",KEY2="value"` environment string. The importer translates them; the config
loader recognises them where they were pasted into a supd file and names the supd
spelling.

Imports the standard library only.
"""

from __future__ import annotations

import configparser
import glob
import os
import platform
import re
import shlex
from collections.abc import Mapping
from pathlib import Path

__all__ = [
    "EXPANSION",
    "Parser",
    "environment_pairs",
    "expansion_hint",
    "is_supervisord_expansion",
    "line_numbers",
    "read",
]

# What Python's %-formatting accepts between "%(name)" and the conversion character,
# restricted to what supervisord configs use: flags, width, precision; s, d or r.
EXPANSION = re.compile(r"%\((?P<name>[^)]*)\)(?P<spec>[#0\- +]*\d*(?:\.\d+)?)(?P<conv>[sdir])")

# The names supervisord expands (options.py). Anything else in %(...)s in a supd
# file is someone's own text (gunicorn's access log format, Python logging formats).
_KNOWN = frozenset(
    {"program_name", "process_num", "group_name", "here", "host_node_name", "numprocs"}
)


def is_supervisord_expansion(name: str) -> bool:
    return name in _KNOWN or name.startswith("ENV_")


def expansion_hint(name: str, spec: str, conv: str, template: bool) -> str:
    """How supd spells supervisord's %(name)<spec><conv>.

    template: whether the value is a supd name template (process_name, log paths),
    where {program}, {process_num} and {group} exist.
    """
    if name.startswith("ENV_"):
        return f"${{{name.removeprefix('ENV_')}}}"
    format_spec = f":{spec}{conv}" if spec and conv == "d" else ""
    if template:
        placeholders = {
            "program_name": "{program}",
            "process_num": "{process_num" + format_spec + "}",
            "group_name": "{group}",
        }
        if name in placeholders:
            return placeholders[name]
    spellings = {
        "program_name": "the program's name written out",
        "process_num": (
            "no per-process value in this option; a process finds its name in "
            "$SUPD_PROCESS_NAME (supd import makes one program per process)"
        ),
        "group_name": "the group's name written out",
        "here": "a relative path (supd resolves it against this file's folder)",
        "host_node_name": "${HOSTNAME}, where supd's environment has it",
        "numprocs": "the number written out",
    }
    return spellings[name]


def environment_pairs(text: str) -> dict[str, str]:
    """supervisord's `KEY=val,KEY2="a,b"` -> {"KEY": "val", "KEY2": "a,b"}.

    Exactly supervisord's dict_of_key_value_pairs: a non-POSIX shlex lexer whose words
    also take / . + - ( ) :, triples KEY = VALUE separated by one token (the comma),
    and quotes stripped from both ends of the value. Raises ValueError as it does.
    """
    lexer = shlex.shlex(text)
    lexer.wordchars += "/.+-():"
    tokens = list(lexer)
    pairs: dict[str, str] = {}
    index = 0
    while index < len(tokens):
        key_eq_value = tokens[index : index + 3]
        if len(key_eq_value) != 3 or key_eq_value[1] != "=":
            raise ValueError(f"unexpected end of key/value pairs in {text!r}")
        pairs[key_eq_value[0]] = key_eq_value[2].strip("'\"")
        index += 4
    return pairs


class Parser(configparser.RawConfigParser):
    """supervisord's UnhosedConfigParser: the options it gives configparser, and which
    file each section came from."""

    def __init__(self) -> None:
        super().__init__(inline_comment_prefixes=(";", "#"), strict=False)
        self.section_to_file: dict[str, Path] = {}

    def read_one(self, path: Path) -> None:
        """Add one file's sections; ValueError if it cannot be read as supervisord would."""
        before = set(self.sections())
        try:
            with path.open(encoding="utf-8") as stream:
                self.read_file(stream, str(path))
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"{path}: cannot read: {error}") from None
        except configparser.Error as error:
            raise ValueError(f"{path}: not a supervisord config: {error}") from None
        for section in set(self.sections()) - before:
            self.section_to_file[section] = path

    def expand_here(self, here: Path) -> None:
        for section in self.sections():
            for key, value in self.items(section):
                if "%(here)s" in value:
                    self.set(section, key, value.replace("%(here)s", str(here)))


def read(path: Path, environ: Mapping[str, str]) -> tuple[Parser, list[Path]]:
    """The main file and the files its [include] names, as supervisord reads them.

    Returns the parser and the included files in reading order. Raises ValueError
    where supervisord would refuse the files.
    """
    parser = Parser()
    parser.read_one(path)
    includes: list[Path] = []
    if not parser.has_section("include"):
        return parser, includes
    parser.expand_here(path.parent)
    if not parser.has_option("include", "files"):
        raise ValueError(f"{path}: [include] has no files setting; supervisord refuses it")
    expansions = {f"ENV_{key}": value for key, value in environ.items()}
    expansions.update(here=str(path.parent), host_node_name=platform.node())
    try:
        files = parser.get("include", "files") % expansions
    except (KeyError, ValueError, TypeError) as error:
        message = f"{path}: [include] files: supervisord cannot expand it ({error})"
        raise ValueError(message) from None
    for pattern in files.split():
        for match in sorted(glob.glob(os.path.join(path.parent, pattern))):
            included = Path(match)
            includes.append(included)
            parser.read_one(included)
            parser.expand_here(included.parent.absolute())
    return parser, includes


def line_numbers(path: Path) -> dict[tuple[str, str], int]:
    """(section, key) -> the line it is written on, and (section, "") -> its header's."""
    lines: dict[tuple[str, str], int] = {}
    section = ""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return lines
    for number, line in enumerate(text.splitlines(), 1):
        header = re.match(r"\[([^]]+)\]", line)
        if header:
            section = header[1].strip()
            lines.setdefault((section, ""), number)
            continue
        key = re.match(r"([^\s;#=:][^=:]*?)\s*[=:]", line)
        if key and section:
            lines.setdefault((section, key[1].strip().lower()), number)
    return lines
