"""The daemon's configuration: plain, frozen data built from what `supd --check
--emit-json` printed.

pydantic validates a config (config.py) but costs the long-running daemon about 16 MiB
of RSS it would keep for nothing: validation happens once per load. So the daemon runs
the checker as a short-lived child (docs/design.md, "Configuration") and builds these
stdlib dataclasses from its JSON output. Field names, order and defaults are exactly the
pydantic models' (tests/test_settings.py holds the two together), so every layer reads
`program.startsecs` whichever kind of object it was given; the behaviour both need
(process names, log paths, probe kinds) is written once, in the mixins below, which
config.py's models inherit too.

This module imports only the standard library (and facts): never config.py, never
pydantic. It also holds what the daemon needs of config.py's vocabulary: the problems
of an invalid config (`Problem`, `ConfigError`) and the probe target parsers.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import shlex
import signal
import string
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

__all__ = [
    "ConfigError",
    "Dependency",
    "Group",
    "Health",
    "Problem",
    "Program",
    "Ready",
    "Settings",
    "Supervisor",
    "build",
    "dump",
    "settings_from_data",
    "toml_data",
]

Stream = Literal["stdout", "stderr"]
Timestamps = Literal["none", "iso", "iso-utc", "epoch"]
DependencyCondition = Literal["started", "ready", "healthy", "completed"]

DEFAULT_LOG_MAXBYTES = 50 * 1024 * 1024
DEFAULT_LOG_BACKUPS = 10
DEFAULT_LOG_PREFIX = "{process_name} | "
JOURNAL = "journal"  # the stdout_logfile / stderr_logfile value for journald
SUPD_STREAMS = {"/dev/stdout": 1, "/dev/stderr": 2, "/proc/self/fd/1": 1, "/proc/self/fd/2": 2}
SUPD_STREAMS |= {"/dev/fd/1": 1, "/dev/fd/2": 2}
# Where log output goes to a stream rather than a file: any number of writers may
# share it, and it is never renamed. /dev/stdout and /dev/stderr go to supd's own fds.
_STREAM_PATHS = re.compile(r"/dev/.*|/proc/self/fd/\d+|journal")


def is_stream_path(path: str | Path | None) -> bool:
    return path is not None and _STREAM_PATHS.fullmatch(str(path)) is not None


# ---------------------------------------------------------------------------
# Problems
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the configuration, located as precisely as possible."""

    file: Path
    line: int | None
    column: int | None
    key: str  # dotted TOML path such as "programs.web.startsecs"; "" when none applies
    message: str

    def __str__(self) -> str:
        where = str(self.file)
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class ConfigError(Exception):
    """The configuration is unusable; ``problems`` lists everything found wrong."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(problem) for problem in problems))
        self.problems = problems


# ---------------------------------------------------------------------------
# Probe targets (checked by config.py at load, parsed again by probes.py)
# ---------------------------------------------------------------------------

_HOST_PORT = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:\s/\[\]]+)):(?P<port>\d{1,5})")
_HTTP_URL = re.compile(r"http://(?P<hostport>[^/\s]+)(?P<path>/\S*)?")


def parse_host_port(value: str) -> tuple[str, int]:
    """'127.0.0.1:5432', 'localhost:80' or '[::1]:80' -> (host, port); ValueError else."""
    match = _HOST_PORT.fullmatch(value)
    if match is None:
        raise ValueError(f"should be HOST:PORT, such as 127.0.0.1:5432 (got {value!r})")
    port = int(match["port"])
    if not 0 < port < 65536:
        raise ValueError(f"port should be 1 to 65535 (got {port})")
    return match["v6"] or match["host"], port


def parse_http_url(value: str) -> tuple[str, int, str]:
    """'http://127.0.0.1:8000/healthz' -> (host, port, path); port 80 when omitted."""
    match = _HTTP_URL.fullmatch(value)
    if match is None:
        raise ValueError(
            f"should be an http:// URL, such as http://127.0.0.1:8000/healthz (got {value!r})"
        )
    hostport = match["hostport"]
    if not _HOST_PORT.fullmatch(hostport):
        hostport += ":80"
    host, port = parse_host_port(hostport)
    return host, port, match["path"] or "/"


# ---------------------------------------------------------------------------
# Behaviour shared with config.py's models
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _compiled_bytes_pattern(pattern: str) -> re.Pattern[bytes]:
    return re.compile(pattern.encode())


class ReadyMethods:
    """What a `ready` table means, for the model and the runtime object alike."""

    __slots__ = ()
    if TYPE_CHECKING:
        tcp: str | None
        http: str | None
        exec: tuple[str, ...] | None
        log: str | None
        notify: Literal[True] | None
        file: str | None

    def kinds(self) -> list[str]:
        fields = ("tcp", "http", "exec", "log", "notify", "file")
        return [name for name in fields if getattr(self, name) is not None]

    @property
    def kind(self) -> str:
        return self.kinds()[0]

    @property
    def log_pattern(self) -> re.Pattern[bytes]:
        return _compiled_bytes_pattern(self.log or "")

    def describe(self) -> str:
        match self.kind:
            case "tcp":
                return f"connect {self.tcp}"
            case "http":
                return f"GET {self.http}"
            case "exec":
                return f"exec {shlex.join(self.exec or ())}"
            case "log":
                return f"a line matching {self.log!r}"
            case "notify":
                return "READY=1"
        return f"file {self.file}"


class HealthMethods:
    __slots__ = ()

    def kinds(self) -> list[str]:
        fields = ("tcp", "http", "exec", "log_silence")
        return [name for name in fields if getattr(self, name) is not None]

    @property
    def kind(self) -> str:
        return self.kinds()[0]


@functools.lru_cache(maxsize=4096)
def process_table(
    program: str, group: str, template: str, start: int, count: int
) -> Mapping[str, int]:
    """Process name -> process_num; cached, as the daemon asks once per process."""
    table: dict[str, int] = {}
    for number in range(start, start + count):
        base = template.format(program=program, process_num=number, group=group)
        table[base if base == group else f"{group}:{base}"] = number
    return types.MappingProxyType(table)


class ProgramMethods:
    """What a program's options mean: its processes' names, log files and prefixes."""

    __slots__ = ()
    if TYPE_CHECKING:
        name: str
        numprocs: int
        numprocs_start: int
        process_name: str | None
        process_group: str | None
        group_priority: int
        priority: int
        redirect_stderr: bool
        stdout_logfile: str | None
        stdout_logfile_maxbytes: int
        stdout_logfile_backups: int
        stderr_logfile: str | None
        stderr_logfile_maxbytes: int
        stderr_logfile_backups: int
        log_prefix: str
        memory_max: str | None
        cpu_max: str | None
        pids_max: str | None
        notify: bool
        watchdog_sec: float | None
        ready: ReadyMethods | None

    @property
    def wants_notify_socket(self) -> bool:
        """NOTIFY_SOCKET for its children: asked for, or needed by readiness/watchdog."""
        waits_ready = self.ready is not None and self.ready.kind == "notify"
        return self.notify or waits_ready or self.watchdog_sec is not None

    @property
    def group_name(self) -> str:
        """The [groups.NAME] this program is in, else its own name (supervisord's rule)."""
        return self.process_group or self.name

    @property
    def start_order(self) -> tuple[int, int]:
        """supervisord's order: groups by group priority (an ungrouped program is a group
        of its own with its own priority), then by the program's priority within."""
        group = self.priority if self.process_group is None else self.group_priority
        return (group, self.priority)

    def default_process_name(self) -> str:
        if self.numprocs == 1:
            return "{program}"
        return "{process_num}" if self.process_group is None else "{program}_{process_num}"

    def _table(self) -> Mapping[str, int]:
        template = self.process_name or self.default_process_name()
        return process_table(
            self.name, self.group_name, template, self.numprocs_start, self.numprocs
        )

    def processes(self) -> list[tuple[str, int]]:
        """(name, process_num) of each process, in process_num order.

        A name is GROUP:BASE, or BASE alone when it equals the group's name: "web",
        "web:0", "site:web", "celery:worker_00". BASE is the process_name template.
        """
        return list(self._table().items())

    def process_names(self) -> list[str]:
        """["web"] for numprocs = 1, else ["web:0", "web:1", ...] (see processes())."""
        return list(self._table())

    def log_path(self, process_name: str, stream: Stream) -> Path | None:
        """Absolute log file of one process's stream; None means discard it (or, for
        stderr with redirect_stderr, that stderr shares the stdout pipe)."""
        if stream == "stderr" and self.redirect_stderr:
            return None
        template = self.stdout_logfile if stream == "stdout" else self.stderr_logfile
        if template is None or template == JOURNAL:
            return None
        process_num = self._process_num(process_name)
        return Path(
            template.format(
                process_name=process_name,
                program=self.name,
                process_num=process_num,
                group=self.group_name,
            )
        )

    def log_destination(self, process_name: str, stream: Stream) -> Path | int | str | None:
        """Where a process's stream goes: a file Path, 1 or 2 for supd's own stdout or
        stderr, JOURNAL, or None (discarded, or stderr redirected into stdout)."""
        if stream == "stderr" and self.redirect_stderr:
            return None
        template = self.stdout_logfile if stream == "stdout" else self.stderr_logfile
        if template is None:
            return None
        if template == JOURNAL:
            return JOURNAL
        if template in SUPD_STREAMS:
            return SUPD_STREAMS[template]
        return self.log_path(process_name, stream)

    def prefix(self, process_name: str, stream: Stream) -> str:
        """The log_prefix of one process's stream: "web:0 | " by default."""
        return self.log_prefix.format(
            process_name=process_name,
            program=self.name,
            process_num=self._process_num(process_name),
            group=self.group_name,
            stream=stream,
        )

    def log_maxbytes(self, stream: Stream) -> int:
        """Rotate when the file would exceed this size; 0 disables rotation."""
        if stream == "stdout":
            return self.stdout_logfile_maxbytes
        return self.stderr_logfile_maxbytes

    def log_backups(self, stream: Stream) -> int:
        """How many rotated files (NAME.1 ... NAME.N) to keep."""
        return self.stdout_logfile_backups if stream == "stdout" else self.stderr_logfile_backups

    def cgroup_limits(self) -> dict[str, str]:
        """The limits set, as written to the cgroup (memory.max, cpu.max, pids.max)."""
        limits = {"memory_max": self.memory_max, "cpu_max": self.cpu_max}
        limits["pids_max"] = self.pids_max
        return {option: value for option, value in limits.items() if value is not None}

    def _process_num(self, process_name: str) -> int:
        number = self._table().get(process_name)
        if number is None:
            raise ValueError(f"{process_name!r} is not a process of {self.name!r}")
        return number


def template_fields(template: str) -> set[str]:
    """Names of the {placeholders} in a template; ValueError if malformed."""
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


# ---------------------------------------------------------------------------
# The runtime objects. Same names, order and defaults as config.py's models.
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Supervisor:
    """The [supervisor] table, resolved (paths absolute, defaults filled in)."""

    socket: Path = Path("supd.sock")
    socket_mode: int = 0o600
    socket_group: str | None = None
    log_dir: Path = Path("logs")
    log_format: Literal["auto", "console", "json"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_timestamps: Timestamps = "none"
    journal_socket: Path = Path("/run/systemd/journal/socket")
    include: tuple[str, ...] = ()
    subreaper: bool = False
    cgroups: Literal["auto", "off"] = "auto"
    environment: dict[str, str] = field(default_factory=dict)
    metrics: str | None = None

    def __hash__(self) -> int:
        return hash(self.socket)


@dataclass(frozen=True, slots=True)
class Ready(ReadyMethods):
    tcp: str | None = None
    http: str | None = None
    exec: tuple[str, ...] | None = None
    interval: float = 1.0
    timeout: float = 1.0
    log: str | None = None
    notify: Literal[True] | None = None
    file: str | None = None
    ready_timeout: float = 60.0


@dataclass(frozen=True, slots=True)
class Health(HealthMethods):
    tcp: str | None = None
    http: str | None = None
    exec: tuple[str, ...] | None = None
    interval: float = 1.0
    timeout: float = 1.0
    log_silence: float | None = None
    failures: int = 3
    start_grace: float = 30.0
    on_unhealthy: Literal["restart", "stop", "ignore"] = "restart"


@dataclass(frozen=True, slots=True)
class Dependency:
    program: str
    condition: DependencyCondition = "ready"


@dataclass(frozen=True, slots=True)
class Program(ProgramMethods):
    """One program, as validated: config.ProgramConfig documents every option."""

    name: str
    command: tuple[str, ...]
    numprocs: int = 1
    numprocs_start: int = 0
    process_name: str | None = None
    process_group: str | None = None
    group_priority: int = 999
    directory: Path | None = None
    environment: dict[str, str] = field(default_factory=dict)
    user: str | None = None
    group: str | None = None
    umask: int | None = None
    priority: int = 999
    autostart: bool = True
    autorestart: Literal["always", "on-failure", "never"] = "on-failure"
    exitcodes: frozenset[int] = frozenset({0})
    startsecs: float = 1.0
    startretries: int = 3
    backoff_initial: float = 1.0
    backoff_factor: float = 2.0
    backoff_max: float = 60.0
    backoff_reset: float = 60.0
    backoff_jitter: float = 0.1
    max_restarts: int | None = None
    restart_window: float = 60.0
    revive_after: float | None = None
    env_files: tuple[str, ...] = ()
    stopsignal: int = int(signal.SIGTERM)
    stopwaitsecs: float = 10.0
    killasgroup: bool = True
    leftovers: Literal["kill", "keep"] = "kill"
    memory_max: str | None = None
    cpu_max: str | None = None
    pids_max: str | None = None
    redirect_stderr: bool = False
    stdout_logfile: str | None = None
    stdout_logfile_maxbytes: int = DEFAULT_LOG_MAXBYTES
    stdout_logfile_backups: int = DEFAULT_LOG_BACKUPS
    stderr_logfile: str | None = None
    stderr_logfile_maxbytes: int = DEFAULT_LOG_MAXBYTES
    stderr_logfile_backups: int = DEFAULT_LOG_BACKUPS
    log_prefix: str = DEFAULT_LOG_PREFIX
    log_timestamps: Timestamps = "none"
    rotate_every: float | None = None
    max_total_size: int = 0
    compress: bool = False
    ready: Ready | None = None
    health: Health | None = None
    depends_on: tuple[Dependency, ...] = ()
    on_dependency_restart: Literal["restart", "ignore"] = "ignore"
    notify: bool = False
    watchdog_sec: float | None = None

    # The environment dict is not hashable; equal programs share name and command.
    def __hash__(self) -> int:
        return hash((self.name, self.command))


@dataclass(frozen=True, slots=True)
class Group:
    name: str
    programs: tuple[str, ...]
    priority: int = 999


@dataclass(frozen=True)
class Settings:
    """A whole configuration, as the daemon holds it."""

    path: Path  # absolute path of the main file
    supervisor: Supervisor
    programs: dict[str, Program]  # in definition order: main file, then includes
    sources: dict[str, Path] = field(default_factory=dict)  # program name -> its file
    groups: dict[str, Group] = field(default_factory=dict)


PROGRAM_KEYS = tuple(f.name for f in dataclasses.fields(Program))
SUPERVISOR_KEYS = tuple(f.name for f in dataclasses.fields(Supervisor))


# ---------------------------------------------------------------------------
# Plain data in and out
# ---------------------------------------------------------------------------

_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


def _value(hint: Any, value: Any) -> Any:
    """One JSON value as the type hint wants it (the checker's output is trusted: it
    was validated; this only restores the types JSON lacks)."""
    if value is None:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        origin = typing.get_origin(hint)
    if hint is Path:
        return Path(value)
    if hint is float:
        return float(value)
    if origin is tuple:
        (element, *_) = typing.get_args(hint)
        return tuple(_value(element, v) for v in value)
    if origin is frozenset:
        return frozenset(value)
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return build(hint, value)
    return value


T = typing.TypeVar("T")


def build(cls: type[T], data: Mapping[str, Any]) -> T:
    """A dataclass from dump()'s output (or the checker's): missing keys take their
    defaults; keys this version does not know are ignored (a re-exec may bring a state
    written by another version)."""
    hints = _hints(cls)
    return cls(**{k: _value(hints[k], v) for k, v in data.items() if k in hints})


def dump(obj: Any) -> dict[str, Any]:
    """A dataclass as JSON data, only what differs from the defaults (as pydantic's
    model_dump(mode="json", exclude_defaults=True) gives it)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.default is not dataclasses.MISSING and value == f.default:
            continue
        if f.default_factory is not dataclasses.MISSING and value == f.default_factory():
            continue
        out[f.name] = _plain(value)
    return out


# Keys spelt otherwise in TOML than in Python (config.py's pydantic aliases).
_TOML_NAMES = {"log_silence": "log-silence"}


def toml_data(obj: Any) -> dict[str, Any]:
    """dump(), with keys as the TOML file spells them (what a reload plan shows)."""
    return {_TOML_NAMES.get(key, key): value for key, value in dump(obj).items()}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dump(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, frozenset | set):
        return sorted(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def settings_from_data(data: Mapping[str, Any]) -> Settings:
    """The checker's `config` object -> Settings."""
    programs = [build(Program, p) for p in data["programs"]]
    return Settings(
        path=Path(data["path"]),
        supervisor=build(Supervisor, data["supervisor"]),
        programs={p.name: p for p in programs},
        sources={k: Path(v) for k, v in data.get("sources", {}).items()},
        groups={g["name"]: build(Group, g) for g in data.get("groups", [])},
    )


def unknown_keys(data: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(program or "", dotted key) of each option in the checker's `config` object that
    these classes lack: the checker is the code on disk, which after an upgrade may be
    newer than the daemon, and build() would drop what it does not know."""

    def extra(cls: type, table: object, prefix: str) -> list[str]:
        if not isinstance(table, Mapping):
            return []
        return [f"{prefix}{key}" for key in table if key not in _hints(cls)]

    found = [("", key) for key in data if key not in _CONFIG_KEYS]
    found += [("", key) for key in extra(Supervisor, data.get("supervisor"), "supervisor.")]
    for program in data.get("programs", []):
        if not isinstance(program, Mapping):
            continue  # (build() fails on it, and says so)
        name = str(program.get("name"))
        prefix = f"programs.{name}."
        keys = extra(Program, program, prefix)
        keys += extra(Ready, program.get("ready"), prefix + "ready.")
        keys += extra(Health, program.get("health"), prefix + "health.")
        for i, dependency in enumerate(program.get("depends_on") or []):
            keys += extra(Dependency, dependency, f"{prefix}depends_on[{i}].")
        found += [(name, key) for key in keys]
    for group in data.get("groups", []):
        if isinstance(group, Mapping):
            found += [("", k) for k in extra(Group, group, f"groups.{group.get('name')}.")]
    return found


_CONFIG_KEYS = ("path", "supervisor", "programs", "sources", "groups")


def settings_data(settings: Settings) -> dict[str, Any]:
    """The inverse of settings_from_data (what the checker prints)."""
    return {
        "path": str(settings.path),
        "supervisor": dump(settings.supervisor),
        "programs": [dump(p) for p in settings.programs.values()],
        "sources": {k: str(v) for k, v in settings.sources.items()},
        "groups": [dump(g) for g in settings.groups.values()],
    }


def problems_from_data(data: list[Mapping[str, Any]]) -> list[Problem]:
    return [
        Problem(Path(p["file"]), p.get("line"), p.get("column"), p["key"], p["message"])
        for p in data
    ]


def problems_data(problems: list[Problem]) -> list[dict[str, Any]]:
    keys = ("line", "column", "key", "message")
    return [{"file": str(p.file), **{k: getattr(p, k) for k in keys}} for p in problems]
