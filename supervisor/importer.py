"""`supd import FILE [-o supd.toml]`: a supervisord configuration as a supd TOML.

The file is read as supervisord 4.3.0 reads it (supervisord_syntax.read).

Every value is translated to what supervisord would have run, in supd's spelling:

* `%(ENV_X)s` becomes supd's own `${X}` where X comes from the environment at start-up
  (supd expands it at load, as supervisord did); where X is set by the config's own
  `environment`, supervisord used that value, so it is written out.
* `%(program_name)s`, `%(group_name)s` and `%(process_num)02d` become `{program}`,
  `{group}` and `{process_num:02d}` in name templates (process_name, log paths) and
  are written out elsewhere. A program whose command, environment or directory differs
  per process (it uses process_num) becomes one supd program per process, in a group
  named after it, so the names stay supervisord's (`celery:celery_0`).
* `%(here)s` and `%(host_node_name)s` are resolved at import.

Everything it cannot carry over is reported as a Finding (FILE:LINE, the section and
key, and why) on stderr and as a comment in the output; the exit status is 1 if any
setting was lost, 0 otherwise (notes alone do not count).

Imports the standard library, supervisord_syntax.py, config.py (to check the result)
and signals.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from . import signals, supervisord_syntax
from .config import ConfigError, load

__all__ = ["Finding", "ImportFailed", "Result", "convert", "main"]

_TRUTHY = ("yes", "true", "on", "1")
_FALSY = ("no", "false", "off", "0")
_SIZE = re.compile(r"(\d+)\s*(KB|MB|GB)?", re.IGNORECASE)
_PLACEHOLDER = re.compile(r"SUPDPH(\d+)X")
_STREAM_LOGS = ("/dev/stdout", "/dev/stderr")
_LOG_LEVELS = {
    "critical": "error",
    "error": "error",
    "warn": "warning",
    "info": "info",
    "debug": "debug",
    "trace": "debug",
    "blather": "debug",
}


@dataclass(frozen=True)
class Finding:
    """One setting that was not carried over (lost) or carried over with a caveat."""

    file: Path
    line: int | None
    section: str
    key: str
    message: str
    lost: bool

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else str(self.file)
        what = f"[{self.section}] {self.key}" if self.key else f"[{self.section}]"
        kind = "not carried over" if self.lost else "note"
        return f"{where}: {what}: {kind}: {self.message}"


class ImportFailed(Exception):
    """The file cannot be read as supervisord would read it."""


@dataclass
class Result:
    toml: str
    findings: list[Finding]

    @property
    def complete(self) -> bool:
        return not any(finding.lost for finding in self.findings)


# ---------------------------------------------------------------------------
# Reading, as supervisord reads
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# Expansions
# ---------------------------------------------------------------------------


@dataclass
class _Text:
    """A translated value: literal text with placeholders for supd spellings."""

    text: str
    spellings: list[str] = field(default_factory=list)

    def placeholder(self, spelling: str) -> str:
        self.spellings.append(spelling)
        return f"SUPDPH{len(self.spellings) - 1}X"

    def final(self, text: str | None = None, *, dollars: bool, braces: bool) -> str:
        """Escape what supd would read as syntax, then put the spellings in."""
        value = self.text if text is None else text
        if dollars:
            value = re.sub(r"\$(?=[{$]|$|SUPDPH)", "$$", value)
        if braces:
            value = value.replace("{", "{{").replace("}", "}}")
        return _PLACEHOLDER.sub(lambda match: self.spellings[int(match[1])], value)


class _NeedsSplit(Exception):
    """process_num in a value that supd cannot template per process."""


@dataclass
class _Scope:
    """What a %(name)s means in one value."""

    here: Path
    program: str | None = None
    group: str | None = None
    process_num: int | None = None
    numprocs: int = 1
    config_env: Mapping[str, str] = field(default_factory=dict)  # from the config itself
    dollars: bool = False  # the supd option expands ${VAR}
    braces: bool = False  # the supd option is a name template
    split: bool = False  # one supd program per process: names are written out


@dataclass
class _Converter:
    parser: supervisord_syntax.Parser
    main: Path
    environ: Mapping[str, str]
    findings: list[Finding] = field(default_factory=list)
    lines: dict[Path, dict[tuple[str, str], int]] = field(default_factory=dict)

    # -- findings -----------------------------------------------------------------

    def _file(self, section: str) -> Path:
        return self.parser.section_to_file.get(section, self.main)

    def _line(self, section: str, key: str) -> int | None:
        path = self._file(section)
        if path not in self.lines:
            self.lines[path] = supervisord_syntax.line_numbers(path)
        table = self.lines[path]
        return table.get((section, key)) or table.get((section, ""))

    def lost(self, section: str, key: str, message: str) -> str:
        self.findings.append(
            Finding(self._file(section), self._line(section, key), section, key, message, True)
        )
        return f"NOT CARRIED OVER: {key or section}: {message}"

    def note(self, section: str, key: str, message: str) -> str:
        self.findings.append(
            Finding(self._file(section), self._line(section, key), section, key, message, False)
        )
        return f"note: {key or section}: {message}"

    # -- expansions -----------------------------------------------------------------

    def translate(self, value: str, scope: _Scope, section: str, key: str) -> _Text:
        """supervisord's %-expansions of value, as literal text and supd spellings."""
        result = _Text("")
        parts: list[str] = []
        index = 0
        while (percent := value.find("%", index)) >= 0:
            parts.append(value[index:percent])
            if value.startswith("%%", percent):
                parts.append("%")
                index = percent + 2
                continue
            match = supervisord_syntax.EXPANSION.match(value, percent)
            if match is None:
                raise ImportFailed(
                    f"{self._file(section)}:{self._line(section, key)}: [{section}] {key}: "
                    f"supervisord rejects {value!r} (a lone %; write %% for a percent sign)"
                )
            parts.append(self._expansion(match, scope, result, section, key))
            index = match.end()
        parts.append(value[index:])
        result.text = "".join(parts)
        return result

    def _expansion(
        self, match: re.Match[str], scope: _Scope, result: _Text, section: str, key: str
    ) -> str:
        name, spec, conv = match["name"], match["spec"], match["conv"]

        def literal(value: object) -> str:
            return str(f"%{spec}{conv}" % (value,))

        if name.startswith("ENV_"):
            variable = name.removeprefix("ENV_")
            if variable in scope.config_env:
                return literal(scope.config_env[variable])
            if scope.dollars and not spec:
                return result.placeholder(f"${{{variable}}}")
            if variable in self.environ:
                self.note(
                    section, key, f"{match[0]} resolved at import to {self.environ[variable]!r}"
                )
                return literal(self.environ[variable])
            raise ImportFailed(
                f"{self._file(section)}:{self._line(section, key)}: [{section}] {key}: "
                f"{match[0]} is not set here, and supd cannot expand it in this option"
            )
        if name == "here":
            return literal(scope.here)
        if name == "host_node_name":
            self.note(section, key, f"{match[0]} resolved at import to {platform.node()!r}")
            return literal(platform.node())
        if name == "numprocs":
            return literal(scope.numprocs)
        template = scope.braces and not scope.split
        if name == "program_name" and scope.program is not None:
            return result.placeholder("{program}") if template else literal(scope.program)
        if name == "group_name" and scope.group is not None:
            return result.placeholder("{group}") if template else literal(scope.group)
        if name == "process_num" and scope.program is not None:
            if template:
                format_spec = f":{spec}d" if spec else ""
                return result.placeholder("{process_num" + format_spec + "}")
            if scope.process_num is None:
                raise _NeedsSplit
            return literal(scope.process_num)
        raise ImportFailed(
            f"{self._file(section)}:{self._line(section, key)}: [{section}] {key}: "
            f"supervisord cannot expand {match[0]} here"
        )

    def plain(self, section: str, key: str, scope: _Scope) -> str | None:
        """An option's value with every expansion resolved (for numbers, booleans...)."""
        if not self.parser.has_option(section, key):
            return None
        raw = self.parser.get(section, key)
        plain_scope = _Scope(**{**scope.__dict__, "dollars": False, "braces": False})
        return self.translate(raw, plain_scope, section, key).final(dollars=False, braces=False)


# ---------------------------------------------------------------------------
# TOML output
# ---------------------------------------------------------------------------


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(f"{_key(k)} = {_toml(v)}" for k, v in value.items())
        return "{ " + items + " }" if items else "{}"
    raise TypeError(f"cannot write {value!r} as TOML")


def _key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


@dataclass
class _Table:
    header: str
    comments: list[str] = field(default_factory=list)
    options: list[tuple[str, object, list[str]]] = field(default_factory=list)

    def set(self, key: str, value: object, *comments: str) -> None:
        self.options.append((key, value, list(comments)))

    def comment(self, text: str) -> None:
        self.comments.append(text)

    def render(self) -> str:
        lines = [f"# {text}" for text in self.comments]
        lines.append(f"[{self.header}]")
        for key, value, comments in self.options:
            lines.extend(f"# {text}" for text in comments)
            lines.append(f"{_key(key)} = {_toml(value)}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------

_PROGRAM_OPTIONS = frozenset(
    {
        "command", "process_name", "numprocs", "numprocs_start", "priority", "autostart",
        "autorestart", "startsecs", "startretries", "exitcodes", "stopsignal",
        "stopwaitsecs", "stopasgroup", "killasgroup", "user", "redirect_stderr",
        "stdout_logfile", "stdout_logfile_maxbytes", "stdout_logfile_backups",
        "stdout_capture_maxbytes", "stdout_events_enabled", "stdout_syslog",
        "stderr_logfile", "stderr_logfile_maxbytes", "stderr_logfile_backups",
        "stderr_capture_maxbytes", "stderr_events_enabled", "stderr_syslog",
        "environment", "directory", "umask", "serverurl",
    }
)  # fmt: skip

_SERVER_OPTION_NOTES = {
    "pidfile": "supd writes no pid file: `supctl pid` prints its pid, and systemd tracks it",
    "identifier": "supd has no XML-RPC identifier; one socket is one supd",
    "strip_ansi": "supd writes program output unchanged",
    "silent": "supd's own log always goes to stderr; raise log_level to quiet it",
    "minprocs": "supd does not change RLIMIT_NPROC; set LimitNPROC= in the systemd unit",
}


def _is_true(value: str, section: str, key: str) -> bool:
    text = value.strip().lower()
    if text in _TRUTHY:
        return True
    if text in _FALSY:
        return False
    raise ImportFailed(f"[{section}] {key}: supervisord rejects {value!r} (not a boolean)")


def _integer(value: str, section: str, key: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise ImportFailed(
            f"[{section}] {key}: supervisord rejects {value!r} (not an integer)"
        ) from None


def _size(value: str, section: str, key: str) -> int | str:
    match = _SIZE.fullmatch(value.strip())
    if match is None:
        raise ImportFailed(f"[{section}] {key}: supervisord rejects {value!r} (not a size)")
    return int(match[1]) if match[2] is None else f"{match[1]}{match[2].upper()}"


@dataclass
class _Program:
    """One supervisord [program:x], as one or more supd programs."""

    name: str
    section: str
    group: str | None  # a heterogeneous [group:g] that lists it
    tables: list[_Table] = field(default_factory=list)
    split_names: list[str] = field(default_factory=list)  # when one program per process


_Get = Callable[[str], str | None]
_Expand = Callable[[str, bool], str | None]


class _Import:
    def __init__(self, converter: _Converter) -> None:
        self.c = converter
        self.parser = converter.parser
        self.supervisor = _Table("supervisor")
        self.groups: list[_Table] = []
        self.programs: list[_Program] = []
        self.global_env: dict[str, str] = {}
        self.nodaemon = False
        self.server_umask: str | None = None
        self.server_directory: str | None = None
        self.server_user: str | None = None
        self.group_of: dict[str, str] = {}

    def here(self, section: str) -> Path:
        return self.c._file(section).parent

    # -- [supervisord] and the servers ------------------------------------------------

    def supervisord(self) -> None:
        section = "supervisord"
        if not self.parser.has_section(section):
            self.c.note(section, "", "no [supervisord] section: supervisord itself would refuse")
            return
        scope = _Scope(here=self.here(section))
        table = self.supervisor

        def plain(key: str) -> str | None:
            return self.c.plain(section, key, scope)

        nodaemon = plain("nodaemon")
        self.nodaemon = nodaemon is not None and _is_true(nodaemon, section, "nodaemon")
        if nodaemon is not None and not self.nodaemon:
            table.comment(
                self.c.note(
                    section,
                    "nodaemon",
                    "supd always runs in the foreground; let systemd (systemd/supd.service) "
                    "or the container runtime keep it running",
                )
            )
        logfile = plain("logfile")
        if logfile is not None:
            if logfile.strip() in (*_STREAM_LOGS, "/dev/null"):
                table.comment(
                    self.c.note(section, "logfile", "supd's own log always goes to stderr")
                )
            else:
                table.comment(
                    self.c.lost(
                        section,
                        "logfile",
                        "supd writes its own log to stderr (the journal under systemd), "
                        "never to a file; redirect it (supd -c FILE 2>>LOG) if you need one",
                    )
                )
        for key in ("logfile_maxbytes", "logfile_backups"):
            quiet = logfile is None or logfile.strip() in (*_STREAM_LOGS, "/dev/null")
            if self.parser.has_option(section, key) and not quiet:
                table.comment(self.c.lost(section, key, "goes with logfile (see there)"))
        loglevel = plain("loglevel")
        if loglevel is not None:
            level = _LOG_LEVELS.get(loglevel.strip().lower())
            if level is None:
                raise ImportFailed(f"[{section}] loglevel: supervisord rejects {loglevel!r}")
            table.set("log_level", level)
        for key, why in _SERVER_OPTION_NOTES.items():
            if self.parser.has_option(section, key):
                table.comment(self.c.lost(section, key, why))
        minfds = plain("minfds")
        if minfds is not None:
            table.comment(
                self.c.note(
                    section,
                    "minfds",
                    "supd raises its fd limit to the hard limit at start; for more than that, "
                    "set LimitNOFILE= in the systemd unit (or ulimit -Hn)",
                )
            )
        if self.parser.has_option(section, "nocleanup"):
            table.comment(
                self.c.note(section, "nocleanup", "supd's log names are stable; nothing to clean")
            )
        childlogdir = plain("childlogdir")
        if childlogdir is not None:
            table.set(
                "log_dir",
                childlogdir,
                "childlogdir: programs without a log file of their own write "
                "{log_dir}/{process_name}.out.log and .err.log",
            )
        env_scope = _Scope(here=scope.here, dollars=True)
        self.global_env = self.environment(section, env_scope, literal=True)
        if self.global_env:
            env = self.environment(section, env_scope, literal=False)
            table.set("environment", env, "every program inherits it; its own environment wins")
        self.server_umask = plain("umask")
        self.server_directory = plain("directory")
        self.server_user = plain("user")
        daemonized = ("umask", "directory")
        for key in daemonized:
            if self.parser.has_option(section, key) and self.nodaemon:
                table.comment(
                    self.c.note(
                        section,
                        key,
                        "supervisord uses it only when it daemonizes; not with nodaemon=true",
                    )
                )
        if self.server_user is not None:
            table.comment(
                self.c.note(
                    section,
                    "user",
                    f"supd does not switch its own user: every program gets user = "
                    f"{self.server_user!r} instead (or run supd itself as that user)",
                )
            )

    def unix_http_server(self) -> None:
        section = "unix_http_server"
        if not self.parser.has_section(section):
            return
        scope = _Scope(here=self.here(section))
        table = self.supervisor
        path = self.c.plain(section, "file", scope)
        if path is not None:
            table.set("socket", path.strip(), "[unix_http_server] file")
        chmod = self.c.plain(section, "chmod", scope)
        if chmod is not None:
            table.set("socket_mode", f"{int(chmod, 8):04o}")
        else:
            table.set("socket_mode", "0700", "supervisord's default chmod")
        chown = self.c.plain(section, "chown", scope)
        if chown is not None:
            group = chown.partition(":")[2]
            if group:
                table.set("socket_group", group.strip())
            table.comment(
                self.c.note(
                    section,
                    "chown",
                    "supd's socket belongs to the user supd runs as"
                    + (f"; group {group.strip()} is socket_group" if group else ""),
                )
            )
        for key in ("username", "password"):
            if self.parser.has_option(section, key):
                table.comment(
                    self.c.lost(
                        section,
                        key,
                        "supd's socket has no password: file permissions guard it "
                        "(socket_mode, socket_group)",
                    )
                )

    def other_sections(self) -> None:
        for section in self.parser.sections():
            kind, _, name = section.partition(":")
            if section == "inet_http_server":
                self.supervisor.comment(
                    self.c.lost(
                        section,
                        "",
                        "supd listens only on a unix socket, guarded by file permissions: an "
                        "HTTP port would put control of every program behind a password on "
                        "the network. Use supctl over ssh, or socat to reach the socket",
                    )
                )
            elif section == "supervisorctl":
                self.supervisor.comment(
                    self.c.note(
                        section,
                        "",
                        "supctl reads the socket from this file (supctl -c FILE), "
                        "$SUPD_SOCKET or -s; it needs no section of its own",
                    )
                )
            elif kind == "rpcinterface":
                if name == "supervisor":
                    self.supervisor.comment(
                        self.c.note(section, "", "supd's control protocol is built in")
                    )
                else:
                    self.supervisor.comment(self.c.lost(section, "", "supd loads no RPC plugins"))
            elif kind == "eventlistener":
                self.supervisor.comment(
                    self.c.lost(
                        section,
                        "",
                        "supd has no event-listener protocol (supervisord's READY/RESULT "
                        "on a listener's stdin). The closest: supd's own event log, one JSON "
                        'line per state change on its stderr (log_format = "json"), or '
                        "polling `supctl --json status`",
                    )
                )
            elif kind == "fcgi-program":
                self.supervisor.comment(
                    self.c.lost(
                        section,
                        "",
                        "supd does not open a listening socket to share among a program's "
                        "processes. The closest: a [programs.NAME] whose server binds its "
                        "own socket (php-fpm, spawn-fcgi, gunicorn --bind unix:...)",
                    )
                )
            elif kind == "ctlplugin":
                self.supervisor.comment(self.c.lost(section, "", "supctl loads no plugins"))
            elif section not in ("supervisord", "unix_http_server", "include") and kind not in (
                "program",
                "group",
            ):
                self.supervisor.comment(
                    self.c.note(section, "", "supervisord ignores this section; so does supd")
                )

    # -- groups and programs ------------------------------------------------------------

    def read_groups(self) -> None:
        for section in self.parser.sections():
            if not section.startswith("group:"):
                continue
            name = section.partition(":")[2]
            scope = _Scope(here=self.here(section))
            programs = self.c.plain(section, "programs", scope) or ""
            members = [p.strip() for p in programs.split(",") if p.strip()]
            fcgi = [m for m in members if self.parser.has_section(f"fcgi-program:{m}")]
            members = [m for m in members if m not in fcgi]  # reported with their sections
            for member in members:
                if not self.parser.has_section(f"program:{member}"):
                    raise ImportFailed(f"[{section}] names unknown program {member}")
                self.group_of[member] = name
            if not members:
                self.c.lost(section, "", "lists only fcgi-programs, which supd does not run")
                continue
            table = _Table(f"groups.{name}")
            table.comment(f"from {self.c._file(section)}")
            table.set("programs", members)
            priority = self.c.plain(section, "priority", scope)
            if priority is not None:
                table.set("priority", _integer(priority, section, "priority"))
            self.groups.append(table)
            for key in self.parser.options(section):
                if key not in ("programs", "priority"):
                    table.comment(self.c.note(section, key, "not a supervisord group option"))

    def read_programs(self) -> None:
        for section in self.parser.sections():
            if section.startswith("program:"):
                name = section.partition(":")[2]
                program = _Program(name, section, self.group_of.get(name))
                self.program(program)
                self.programs.append(program)
        # A group whose program became one per process lists those instead.
        for table in self.groups:
            for index, (key, value, comments) in enumerate(table.options):
                if key == "programs" and isinstance(value, list):
                    expanded: list[str] = []
                    split = {p.name: p.split_names for p in self.programs if p.split_names}
                    for member in value:
                        expanded += split.get(member, [member])
                    table.options[index] = (key, expanded, comments)

    def program(self, program: _Program) -> None:
        section = program.section
        group = program.group or program.name
        base = _Scope(here=self.here(section), program=program.name, group=group)
        numprocs = _integer(self.c.plain(section, "numprocs", base) or "1", section, "numprocs")
        start = _integer(
            self.c.plain(section, "numprocs_start", base) or "0", section, "numprocs_start"
        )
        base.numprocs = numprocs
        process_name = self.parser.get(section, "process_name", fallback="")
        if numprocs > 1 and "%(process_num)" not in process_name:
            raise ImportFailed(
                f"{self.c._file(section)}:{self.c._line(section, 'numprocs')}: [{section}] "
                "numprocs > 1 needs %(process_num) in process_name; supervisord refuses it"
            )
        try:
            table = self.program_table(program.name, program, base, numprocs, start, None)
            program.tables.append(table)
        except _NeedsSplit:
            for number in range(start, start + numprocs):
                scope = _Scope(**{**base.__dict__, "process_num": number, "split": True})
                name_scope = _Scope(**{**scope.__dict__})
                raw = self.parser.get(section, "process_name", fallback="%(program_name)s")
                name = self.c.translate(raw, name_scope, section, "process_name").final(
                    dollars=False, braces=False
                )
                table = self.program_table(name, program, scope, 1, number, name)
                program.tables.append(table)
                program.split_names.append(name)
            if program.group is None:
                self.groups.append(_Table(f"groups.{program.name}"))
                self.groups[-1].set("programs", list(program.split_names))
                self.groups[-1].comment(
                    f"[{section}]: its command, environment or directory uses "
                    "%(process_num)s, so each process is a supd program of its own; the "
                    "group keeps supervisord's names"
                )
                self.groups[-1].set("priority", self.priority(section, base))

    def priority(self, section: str, scope: _Scope) -> int:
        value = self.c.plain(section, "priority", scope)
        return 999 if value is None else _integer(value, section, "priority")

    def environment(self, section: str, scope: _Scope, literal: bool) -> dict[str, str]:
        """The section's environment= as supervisord parses it; literal: every expansion
        resolved (for %(ENV_X)s lookups), else in supd's spelling."""
        if not self.parser.has_option(section, "environment"):
            return {}
        if literal:  # a lookup table for %(ENV_X)s: its findings belong to the real pass
            findings = len(self.c.findings)
            try:
                return self._environment(section, scope, literal)
            finally:
                del self.c.findings[findings:]
        return self._environment(section, scope, literal)

    def _environment(self, section: str, scope: _Scope, literal: bool) -> dict[str, str]:
        raw = self.parser.get(section, "environment")
        env_scope = _Scope(**{**scope.__dict__, "dollars": not literal, "braces": False})
        if literal:
            env_scope.dollars = False
        try:
            text = self.c.translate(raw, env_scope, section, "environment")
        except ImportFailed:
            if literal:
                return {}
            raise
        try:
            pairs = supervisord_syntax.environment_pairs(text.text)
        except ValueError as error:
            raise ImportFailed(
                f"{self.c._file(section)}:{self.c._line(section, 'environment')}: [{section}] "
                f"environment: supervisord rejects it: {error}"
            ) from None
        return {
            key: text.final(value, dollars=not literal, braces=False)
            for key, value in pairs.items()
        }

    def program_table(
        self,
        name: str,
        program: _Program,
        scope: _Scope,
        numprocs: int,
        numprocs_start: int,
        split_name: str | None,
    ) -> _Table:
        section = program.section
        c = self.c
        table = _Table(f"programs.{name}")
        source = c._file(section)
        table.comment(
            f"[{section}] from {source}"
            if split_name is None
            else f"[{section}] process {split_name}"
        )

        def plain(key: str) -> str | None:
            return c.plain(section, key, scope)

        own_env = self.environment(section, scope, literal=True)
        expand_scope = _Scope(
            **{**scope.__dict__, "config_env": {**self.global_env, **own_env}, "dollars": True}
        )

        def expanded(key: str, braces: bool = False) -> str | None:
            if not self.parser.has_option(section, key):
                return None
            raw = self.parser.get(section, key)
            key_scope = _Scope(**{**expand_scope.__dict__, "braces": braces})
            return c.translate(raw, key_scope, section, key).final(dollars=True, braces=braces)

        command = expanded("command")
        if command is None:
            raise ImportFailed(f"[{section}] has no command; supervisord would refuse it")
        table.set("command", command)
        if numprocs != 1:
            table.set("numprocs", numprocs)
        if numprocs_start and split_name is None:
            table.set("numprocs_start", numprocs_start)
        if split_name is None and self.parser.has_option(section, "process_name"):
            raw = self.parser.get(section, "process_name")
            template_scope = _Scope(**{**scope.__dict__, "braces": True})
            template = c.translate(raw, template_scope, section, "process_name").final(
                dollars=False, braces=True
            )
            if template != "{program}":
                table.set("process_name", template)
        env = self.environment(section, scope, literal=False)
        if env:
            table.set("environment", env)
        directory = expanded("directory")
        if directory is None and self.server_directory and not self.nodaemon:
            directory = self.server_directory
            table.set("directory", directory, "[supervisord] directory: supervisord's cwd")
        elif directory is not None:
            table.set("directory", directory)
        user = plain("user") or self.server_user
        if user is not None:
            table.set(
                "user",
                user,
                c.note(
                    section,
                    "user" if plain("user") else "",
                    "supd also sets HOME, USER, LOGNAME and SHELL to the user's (unless the "
                    "program's environment sets them); supervisord left them as they were",
                ),
            )
        umask = plain("umask")
        if umask is None and self.server_umask is not None and not self.nodaemon:
            umask = self.server_umask
        if umask is not None:
            table.set("umask", f"{int(umask, 8):03o}")
        priority = plain("priority")
        if priority is not None:
            table.set("priority", _integer(priority, section, "priority"))
        autostart = plain("autostart")
        if autostart is not None:
            table.set("autostart", _is_true(autostart, section, "autostart"))
        autorestart = plain("autorestart")
        if autorestart is not None:
            text = autorestart.strip().lower()
            mapped = (
                "always" if text in _TRUTHY else "never" if text in _FALSY
                else "on-failure" if text == "unexpected" else None
            )  # fmt: skip
            if mapped is None:
                raise ImportFailed(f"[{section}] autorestart: supervisord rejects {autorestart!r}")
            table.set("autorestart", mapped)
        for key in ("startsecs", "startretries", "stopwaitsecs"):
            value = plain(key)
            if value is not None:
                table.set(key, _integer(value, section, key))
        exitcodes = plain("exitcodes")
        if exitcodes is not None:
            table.set(
                "exitcodes", [_integer(code, section, "exitcodes") for code in exitcodes.split(",")]
            )
        stopsignal = plain("stopsignal")
        if stopsignal is not None:
            try:
                signals.parse(stopsignal)
            except ValueError:
                message = f"[{section}] stopsignal: supervisord rejects {stopsignal!r}"
                raise ImportFailed(message) from None
            text = stopsignal.strip().upper()
            table.set("stopsignal", int(text) if text.isdigit() else text.removeprefix("SIG"))
        self.process_groups(table, section, plain)
        per_process = None
        if split_name is not None:
            per_process = str(scope.process_num)
        elif numprocs > 1:
            per_process = "{process_num}"
        self.logs(table, section, plain, expanded, per_process)
        serverurl = plain("serverurl")
        if serverurl is not None:
            table.comment(
                c.note(
                    section,
                    "serverurl",
                    "ignored: supd sets no SUPERVISOR_SERVER_URL; a program that calls "
                    "back uses supctl with $SUPD_SOCKET",
                )
            )
        if split_name is None or not program.split_names:  # once per section
            for key in self.parser.options(section):
                if key not in _PROGRAM_OPTIONS:
                    message = "supervisord ignores this option; so does supd"
                    table.comment(c.note(section, key, message))
        return table

    def process_groups(self, table: _Table, section: str, plain: _Get) -> None:
        stop = plain("stopasgroup")
        kill = plain("killasgroup")
        stopasgroup = stop is not None and _is_true(stop, section, "stopasgroup")
        killasgroup = stopasgroup if kill is None else _is_true(kill, section, "killasgroup")
        if stopasgroup and not killasgroup:
            raise ImportFailed(
                f"[{section}] stopasgroup=true with killasgroup=false: supervisord refuses it"
            )
        if stopasgroup == killasgroup:
            if not killasgroup:
                table.set(
                    "killasgroup",
                    False,
                    "supervisord's default: signals reach the process only (supd's default, "
                    "true, also reaches its children)",
                )
            else:
                table.set("killasgroup", True)
        else:
            table.set("killasgroup", True)
            table.comment(
                self.c.lost(
                    section,
                    "stopasgroup",
                    "supd sends the stop signal and SIGKILL alike (killasgroup); with "
                    "killasgroup=true the stop signal reaches the group too",
                )
            )

    def logs(
        self,
        table: _Table,
        section: str,
        plain: _Get,
        expanded: _Expand,
        per_process: str | None,
    ) -> None:
        """The log options. per_process: what tells this program's processes apart in a
        file name, when supervisord ran several ({process_num}, or the number itself)."""
        redirect = plain("redirect_stderr")
        redirected = redirect is not None and _is_true(redirect, section, "redirect_stderr")
        stdout_path = expanded("stdout_logfile", True)
        stderr_path = expanded("stderr_logfile", True)
        same = stdout_path is not None and stdout_path.strip() == (stderr_path or "").strip()
        special = ("none", "off", "auto", *_STREAM_LOGS)
        if same and not redirected and (stdout_path or "").strip().lower() not in special:
            redirected = True
            stderr_path = None  # said here, not again below
            table.set(
                "redirect_stderr",
                True,
                self.c.note(
                    section,
                    "stderr_logfile",
                    "the same file as stdout_logfile: supd has one writer per file, so "
                    "stderr joins the stdout pipe (redirect_stderr = true)",
                ),
            )
        elif redirect is not None:
            table.set("redirect_stderr", redirected)
        for stream in ("stdout", "stderr"):
            key = f"{stream}_logfile"
            path = stdout_path if stream == "stdout" else stderr_path
            raw = self.parser.get(section, key, fallback="")
            if path is not None:
                lowered = path.strip().lower()
                if stream == "stderr" and redirected:
                    table.comment(
                        self.c.note(
                            section,
                            key,
                            "supervisord ignores it with redirect_stderr=true; left out",
                        )
                    )
                elif lowered in ("none", "off"):
                    table.set(key, "none")
                elif lowered == "auto":
                    pass  # supd's default file in log_dir
                elif lowered == "syslog":
                    table.comment(
                        self.c.lost(section, key, "supd does not write program output to syslog")
                    )
                else:
                    comments = []
                    if path.strip() in _STREAM_LOGS:
                        comments.append(
                            self.c.note(
                                section,
                                key,
                                f"supd has no container stdout destination yet: it writes to "
                                f"{path.strip()} as to a file it never rotates (supd's own "
                                "stdout, shared by every program that names it)",
                            )
                        )
                    path = path.strip()
                    shared = path not in _STREAM_LOGS and "%(process_num)" not in raw
                    if per_process is not None and shared:
                        stem, dot, suffix = path.rpartition(".")
                        if not dot or "/" in suffix:
                            stem, dot, suffix = path, "", ""
                        path = f"{stem}_{per_process}{dot}{suffix}"
                        comments.append(
                            self.c.lost(
                                section,
                                key,
                                "supervisord's processes all appended to this one file; supd "
                                f"gives each process its own (one writer per file): {path}",
                            )
                        )
                    table.set(key, path, *comments)
            for option in ("maxbytes", "backups"):
                name = f"{stream}_logfile_{option}"
                value = plain(name)
                if value is None or (stream == "stderr" and redirected):
                    continue
                if option == "maxbytes":
                    table.set(name, _size(value, section, name))
                else:
                    table.set(name, _integer(value, section, name))
            for option, why in (
                ("capture_maxbytes", "supd has no capture mode (it feeds event listeners)"),
                ("events_enabled", "supd has no event listeners"),
                ("syslog", "supd does not write program output to syslog"),
            ):
                name = f"{stream}_{option}"
                value = plain(name)
                if value is None:
                    continue
                off = value.strip().lower() in (*_FALSY, "0b", "0kb", "0mb", "0gb")
                if off:
                    continue
                table.comment(self.c.lost(section, name, why))

    # -- output -------------------------------------------------------------------------

    def render(self, includes: list[Path]) -> str:
        header = [
            f"# supd configuration, converted by `supd import` from {self.c.main}.",
            "# Check it with `supd -c FILE --check`. supd's rules: relative paths resolve",
            "# against this file's folder; ${VAR} comes from supd's environment at load ($$ is",
            "# a literal $); {program}, {group} and {process_num} fill name templates.",
            "# Programs see SUPD_PROCESS_NAME and SUPD_PROGRAM, not supervisord's SUPERVISOR_*.",
        ]
        if includes:
            header.append("# The files [include] read are merged into this one file:")
            header.extend(f"#   {path}" for path in includes)
        blocks = ["\n".join(header)]
        if self.supervisor.options or self.supervisor.comments:
            blocks.append(self.supervisor.render())
        blocks.extend(table.render() for table in self.groups)
        for program in self.programs:
            blocks.extend(table.render() for table in program.tables)
        return "\n\n".join(blocks) + "\n"


def convert(path: str | Path, environ: Mapping[str, str] | None = None) -> Result:
    """Read the supervisord config at path; the supd TOML and what did not carry over.

    Raises ImportFailed when supervisord itself would reject the file.
    """
    main = Path(os.path.abspath(path))
    environ = os.environ if environ is None else environ
    try:
        parser, includes = supervisord_syntax.read(main, environ)
    except ValueError as error:
        raise ImportFailed(str(error)) from None
    converter = _Converter(parser, main, environ)
    work = _Import(converter)
    _nested_includes(includes, converter)
    try:
        work.supervisord()
        work.unix_http_server()
        work.other_sections()
        work.read_groups()
        work.read_programs()
    except ImportFailed as error:
        raise _located(error, converter) from None
    return Result(work.render(includes), converter.findings)


def _located(error: ImportFailed, converter: _Converter) -> ImportFailed:
    """ "[section] key: ..." -> "FILE:LINE: [section] key: ..."."""
    message = str(error)
    match = re.match(r"\[([^]]+)\](?: ([\w-]+):)?", message)
    if match is None:
        return error
    section, key = match[1], match[2] or ""
    line = converter._line(section, key)
    where = f"{converter._file(section)}:{line}" if line else str(converter._file(section))
    return ImportFailed(f"{where}: {message}")


def _nested_includes(includes: list[Path], converter: _Converter) -> None:
    """supervisord reads [include] once, from the main file; one in an included file is
    ignored. The import does the same and says so."""
    for path in includes:
        lines = supervisord_syntax.line_numbers(path)
        if ("include", "") in lines:
            converter.findings.append(
                Finding(
                    path,
                    lines[("include", "")],
                    "include",
                    "",
                    "an [include] in an included file: supervisord ignores it (it reads "
                    "[include] once, from the main file); so does the import",
                    True,
                )
            )


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    """`supd import FILE [-o OUT]`: 0 all carried over, 1 something not, 2 unreadable."""
    parser = argparse.ArgumentParser(
        prog="supd import",
        description="convert a supervisord configuration into a supd TOML file",
    )
    parser.add_argument("file", help="supervisord.conf")
    parser.add_argument("-o", "--output", help="write the TOML here (default: stdout)")
    args = parser.parse_args(argv)
    try:
        result = convert(args.file)
    except ImportFailed as error:
        print(f"supd import: {error}", file=sys.stderr)
        return 2
    if args.output is None:
        sys.stdout.write(result.toml)
    else:
        _write(Path(args.output), result.toml)
    for finding in result.findings:
        print(finding, file=sys.stderr)
    problems = _check(result.toml, Path(args.output) if args.output else None)
    for problem in problems:
        print(f"supd import: the output does not pass --check here: {problem}", file=sys.stderr)
    lost = sum(finding.lost for finding in result.findings)
    if lost:
        print(f"supd import: {lost} setting(s) not carried over (see above)", file=sys.stderr)
    return 0 if result.complete and not problems else 1


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def _check(text: str, output: Path | None) -> list[str]:
    """The problems `supd --check` finds in the output (beside it, so paths resolve)."""
    if output is not None:
        try:
            load(output)
        except ConfigError as error:
            return [str(problem) for problem in error.problems]
        return []
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "supd.toml"
        path.write_text(text, encoding="utf-8")
        try:
            load(path)
        except ConfigError as error:
            return [str(problem).replace(str(path), "<stdout>") for problem in error.problems]
    return []
