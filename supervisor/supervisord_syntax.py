"""supervisord's value syntaxes, for `supd import` and for the config's hints.

Two things a supervisord user carries over by habit: `%(NAME)s` expansions, and the
`KEY="value",KEY2="value"` environment string. The importer translates them; the config
loader recognises them where they were pasted into a supd file and names the supd
spelling. Both follow Supervisor 4.3.0's own code (supervisor/options.py and
datatypes.py) so that a value means what supervisord made of it.

Imports the standard library only.
"""

from __future__ import annotations

import re
import shlex

__all__ = ["EXPANSION", "environment_pairs", "expansion_hint", "is_supervisord_expansion"]

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
