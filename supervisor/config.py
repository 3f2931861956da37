"""Load and validate supd's TOML configuration.

This module imports only the standard library, pydantic and settings.py (the runtime
objects, whose behaviour the models share). `supd --check`, `supd import` and the tests
import it; the daemon never does: it runs `supd --check --emit-json` in a child and
builds settings.py's plain objects from the answer (configcheck.py).

The file format (option names follow supervisord)::

    [supervisor]
    socket = "supd.sock"          # default: $RUNTIME_DIRECTORY/supd.sock, else beside this file
    socket_mode = "0600"          # octal; default "0600", or "0660" when socket_group is set
    socket_group = "admin"        # optional group owning the socket
    log_dir = "logs"              # default folder for program logs
    log_format = "auto"           # auto | console | json (the daemon's own log)
    log_level = "info"            # debug | info | warning | error
    log_timestamps = "none"       # none | iso | iso-utc | epoch: default for every program
    journal_socket = "/run/systemd/journal/socket"  # where "journal" log destinations go
    include = ["conf.d/*.toml"]   # globs; included files hold [programs.*] and [groups.*]
    subreaper = false             # become a child subreaper (automatic when PID 1)
    cgroups = "auto"              # auto: a cgroup per process where supd may; off: sessions
    environment = { TZ = "UTC" }  # every program inherits it; a program's own wins

    [programs.web]
    command = "python3 -m http.server"  # split like a shell would (no shell runs), or a list
    numprocs = 1                  # > 1 gives processes web:0 ... web:N-1
    ...                           # see ProgramConfig for every option and its default

    [groups.site]
    programs = ["web", "worker"]  # processes become site:web, site:worker

Rules worth knowing:

* Every relative path (``directory``, log files, ``log_dir``, ``socket``, include
  globs) resolves against the folder of the file that holds it; ``[supervisor]`` keys
  live in the main file. Paths are normalised lexically (``a/../b`` becomes ``b``), as
  supervisord does, and come out absolute.
* Log file paths are templates. ``{process_name}`` (``web`` or ``web:3``),
  ``{program}`` (``web``) and ``{process_num}`` (``0`` ... ``N-1``, ``0`` when
  numprocs = 1) are replaced, format specs included (``{process_num:02d}``). Write
  ``{{`` and ``}}`` for literal braces. With numprocs > 1 an explicit path must contain
  ``{process_num}`` or ``{process_name}``: two processes cannot share one log file.
  The defaults are ``{log_dir}/{process_name}.out.log`` and ``.err.log``. The value
  ``"none"`` (any case) discards the stream. ``"-"``, ``"/dev/stdout"`` and
  ``"/dev/stderr"`` write into supd's own stdout or stderr (whole lines, each with the
  ``log_prefix``), ``"journal"`` to journald; such destinations may be shared.
* ``${VAR}`` and ``${VAR:-default}`` in ``command``, ``environment`` values (global
  and per program), ``directory`` and log paths are replaced at load from supd's own
  environment; an unset variable without a default is an error. ``$$`` is a literal
  ``$``; a ``$`` followed by anything else is kept as written.
* Process names: every process belongs to a group, the ``[groups.NAME]`` that lists its
  program or else a group named after the program, and is called ``GROUP:BASE``, or
  just ``BASE`` when the two are equal (supervisord's rule). BASE comes from the
  ``process_name`` template; by default ``{program}`` for one process, ``{process_num}``
  for several (``web:0``), ``{program}_{process_num}`` for several in a named group.
  Every name is unique across the whole configuration.
* Sizes are bytes, or strings with a KB/MB/GB suffix (1024-based, like supervisord).
* ``load`` reports every problem it finds, in every file, as a ``ConfigError`` whose
  lines read ``FILE:LINE: programs.web.startsecs: what is wrong``. tomllib gives no
  positions, so ``KeyLocator`` re-reads the text to find where each key was written.
"""

from __future__ import annotations

import difflib
import glob
import grp
import ipaddress
import itertools
import json
import os
import re
import resource
import shlex
import signal
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeGuard

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from . import facts, settings, signals, supervisord_syntax
from .facts import expand_variables
from .settings import (
    DEFAULT_LOG_BACKUPS,
    DEFAULT_LOG_MAXBYTES,
    DEFAULT_LOG_PREFIX,
    JOURNAL,
    SUPD_STREAMS,
    ConfigError,
    DependencyCondition,
    HealthMethods,
    Problem,
    ProgramMethods,
    ReadyMethods,
    Stream,
    Timestamps,
    is_stream_path,
    parse_host_port,
    parse_http_url,
    template_fields,
)
from .tomlkeys import KeyLocator, KeyPath

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python < 3.11
    import tomli as tomllib  # type: ignore[no-redef, import-not-found, unused-ignore]

__all__ = [
    "JOURNAL",
    "SUPD_STREAMS",
    "Config",
    "ConfigError",
    "GroupConfig",
    "Problem",
    "ProgramConfig",
    "Stream",
    "SupervisorConfig",
    "check_result",
    "config_data",
    "expand_variables",
    "load",
    "parse_host_port",
    "parse_http_url",
    "runtime",
    "summary",
    "to_settings",
]

# Durations end up in timerfds; a year is far beyond any sane setting and far from
# any overflow.
MAX_SECONDS = 365 * 24 * 3600.0
# sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107
# numprocs bounds: 200,000 processes froze the loop for 2.5 s and made a 40 MB status.
MAX_NUMPROCS = 1000  # per program
MAX_PROCESSES = 10000  # in all programs together
# File descriptors supd needs for itself besides the programs' pipes: stdio, its log,
# the selector's epoll, signalfd, timerfd and eventfd, the control socket and a few of
# its clients, the instance lock, /dev/null, the C spawner's four slots and their
# /dev/null. Clients beyond those take what is left (accept() at EMFILE pauses the
# listener; it never stalls the loop).
FD_RESERVE = 37
# With `metrics` set: its listener, its timer and its 64 clients (httpmetrics.py), and
# the one /proc file a sample has open at a time.
METRICS_FD_RESERVE = 67


def hard_fd_limit() -> int | None:
    """The hard RLIMIT_NOFILE supd will raise itself to; None when unlimited."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if hard == resource.RLIM_INFINITY else hard


_PROGRAM_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_LOG_PLACEHOLDERS = frozenset({"process_name", "program", "process_num", "group"})
_NAME_PLACEHOLDERS = frozenset({"program", "process_num", "group"})
_PREFIX_PLACEHOLDERS = frozenset({"process_name", "program", "process_num", "group", "stream"})
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw]?)", re.IGNORECASE)
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_PER_PROCESS_PLACEHOLDERS = frozenset({"process_name", "process_num"})
_SIZE = re.compile(r"(\d+)\s*(KB|MB|GB|B)?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}
_AUTORESTART_ALIASES = {"true": "always", "false": "never", "unexpected": "on-failure"}

# ---------------------------------------------------------------------------
# Problems
# ---------------------------------------------------------------------------


class _OptionProblems(ValueError):
    """Raised by cross-field validators to blame specific options, not the whole table.

    pydantic puts errors from model validators at the table's location; the translation
    to Problems finds this exception in the error's ctx and uses the option names.
    """

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{option}: {message}" for option, message in problems))
        self.problems = problems


# ---------------------------------------------------------------------------
# Value parsers shared by the models. Each takes raw TOML input and returns the
# normalised value or raises ValueError with a message meant for the user.
# ---------------------------------------------------------------------------


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_octal(value: object, what: str) -> object:
    """'022', '0o22' or an int (TOML 0o022) -> int in 0..0o777; other types pass through."""
    number: int
    if isinstance(value, str):
        try:
            number = int(value.strip().removeprefix("0o"), 8)
        except ValueError:
            raise ValueError(f"should be an octal {what} like '022'") from None
    elif _is_int(value):
        number = value
    else:
        return value
    if not 0 <= number <= 0o777:
        raise ValueError(f"should be an octal {what} between 000 and 777")
    return number


def _parse_byte_size(value: object) -> object:
    """'50MB', '1GB', '100', or an int -> int bytes; other types pass through."""
    if not isinstance(value, str):
        return value
    match = _SIZE.fullmatch(value.strip())
    if match is None:
        raise ValueError("should be a number of bytes or a size like '50MB' (KB, MB, GB)")
    return int(match[1]) * _SIZE_UNITS[(match[2] or "").upper()]


def _parse_signal(value: object) -> object:
    """'TERM', 'SIGTERM', 'term', '15' or 15 -> 15; other types pass through."""
    if isinstance(value, str) and not (value.strip().isascii() and value.strip().isdigit()):
        try:
            return signals.parse(value)
        except ValueError:
            raise ValueError("unknown signal; use a name like TERM or a number") from None
    if isinstance(value, str) or _is_int(value):
        try:
            return signals.parse(int(value))
        except ValueError:
            raise ValueError("no such signal number") from None
    return value


def _parse_autorestart(value: object) -> object:
    """Accept supervisord's true / false / 'unexpected' alongside supd's own names."""
    if isinstance(value, bool):
        return "always" if value else "never"
    if isinstance(value, str):
        text = value.strip().lower()
        return _AUTORESTART_ALIASES.get(text, text)
    return value


def _parse_command(value: object) -> object:
    """A shell-like string is split with shlex (no shell runs); a list becomes a tuple."""
    if isinstance(value, str):
        try:
            return tuple(shlex.split(value))
        except ValueError as error:
            raise ValueError(f"cannot split command: {error}") from None
    if isinstance(value, list | tuple):
        return tuple(value)
    raise ValueError("should be a string or a list of strings")


def _stringify_env_value(value: object) -> object:
    """Environment values may be written as TOML ints, floats or booleans."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return value


def _environment_input(value: object, info: ValidationInfo) -> object:
    """A table of variables: values stringified and ${VAR}-expanded. supervisord's
    KEY="value",... string gets a hint with the same variables written as a table."""
    if isinstance(value, str):
        raise ValueError(_environment_string_hint(value))
    if not isinstance(value, dict):
        return value
    environ = _context(info).environ
    result: dict[object, object] = {}
    for key, item in value.items():
        item = _stringify_env_value(item)
        if isinstance(item, str):
            try:
                item = expand_variables(item, environ)
            except ValueError as error:
                raise ValueError(f"{key}: {error}") from None
        result[key] = item
    return result


def _environment_string_hint(text: str) -> str:
    try:
        pairs = supervisord_syntax.environment_pairs(text)
    except ValueError:
        pairs = {}
    table = ", ".join(f"{_toml_key(key)} = {json.dumps(value)}" for key, value in pairs.items())
    example = f"{{ {table} }}" if pairs else '{ KEY = "value" }'
    return f"should be a table; supervisord's KEY=value list is written in supd as {example}"


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _check_environment(value: dict[str, str]) -> dict[str, str]:
    for key, item in value.items():
        if "=" in key or "\0" in key:
            raise ValueError(f"variable name {key!r} must not contain '=' or NUL")
        if "\0" in item:
            raise ValueError(f"value of {key} must not contain a NUL character")
    return value


def _reject_nul(text: str) -> str:
    if "\0" in text:
        raise ValueError("must not contain a NUL character")
    return text


def _normalised(base_dir: Path, path: str | Path) -> Path:
    """Absolute and lexically normalised, like supervisord's normpath(abspath())."""
    return Path(os.path.normpath(base_dir / path))


def _escape_braces(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


_template_fields = template_fields


def _check_log_template(template: str) -> None:
    try:
        names = _template_fields(template)
        unknown = names - _LOG_PLACEHOLDERS
        if not unknown:
            template.format(process_name="x:0", program="x", process_num=0, group="x")
    except (ValueError, TypeError, KeyError, IndexError) as error:
        raise ValueError(f"bad placeholder in log file path ({error}); {_BRACES_HINT}") from None
    if unknown:
        names_text = ", ".join("{" + name + "}" for name in sorted(unknown))
        raise ValueError(f"unknown placeholder {names_text} in log file path; {_BRACES_HINT}")


_BRACES_HINT = (
    "use {process_name}, {program}, {group} or {process_num}, and {{ }} for literal braces"
)


# ---------------------------------------------------------------------------
# Validation context: where relative paths start, and the environment
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Context:
    base_dir: Path  # folder of the file being validated
    log_dir: Path  # [supervisor] log_dir, for default program log paths
    environ: Mapping[str, str]
    program_defaults: Mapping[str, object] = field(default_factory=dict)  # from [supervisor]


def _context(info: ValidationInfo) -> _Context:
    """The loader passes a _Context; direct construction (tests, code) uses the cwd."""
    if isinstance(info.context, _Context):
        return info.context
    cwd = Path.cwd()
    return _Context(base_dir=cwd, log_dir=cwd / "logs", environ=os.environ)


def _path_input(value: object, info: ValidationInfo) -> object:
    """str or Path -> absolute normalised Path; other types pass through to fail."""
    if isinstance(value, str | Path):
        text = _reject_nul(str(value))
        if not text:
            raise ValueError("should be a path, not an empty string")
        return _normalised(_context(info).base_dir, text)
    return value


def _metrics_address(value: str, info: ValidationInfo) -> str:
    """ "HOST:PORT" checked, or a socket path made absolute (relative to the file)."""
    if "/" in value:
        path = _path_input(value, info)
        assert isinstance(path, Path)
        length = len(os.fsencode(path))
        if length > MAX_SOCKET_PATH_BYTES:
            raise ValueError(
                f"path is {length} bytes long; a UNIX socket path can have at most "
                f"{MAX_SOCKET_PATH_BYTES}"
            )
        return str(path)
    host, colon, port = value.rpartition(":")
    if not colon or not port.isascii() or not port.isdigit() or int(port) > 65535:
        raise ValueError(
            f'{value!r}: should be "HOST:PORT" (e.g. "127.0.0.1:9129") or a UNIX socket path'
            ' (with a "/", e.g. "./metrics.sock")'
        )
    address = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if address != "localhost":
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise ValueError(
                f"{value!r}: the host should be an IP address or localhost, not {host!r}"
            ) from None
    return value


_MODEL_CONFIG = ConfigDict(extra="forbid", frozen=True, strict=True)

Seconds = Annotated[float, Field(ge=0, le=MAX_SECONDS, allow_inf_nan=False)]
ByteCount = Annotated[int, Field(ge=0)]
NonEmptyStr = Annotated[str, Field(min_length=1)]
ExitCode = Annotated[int, Field(ge=0, le=255)]
# Limits, stored as the cgroup files take them: "max", bytes, "QUOTA PERIOD" in µs.
_CPU_MAX = re.compile(r"(max|[1-9][0-9]*)( [1-9][0-9]*)?")

# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


class SupervisorConfig(BaseModel):
    """The [supervisor] table. Defaults for socket, socket_mode and log_dir depend on
    the config file's folder and the environment; they are filled in when validating."""

    model_config = _MODEL_CONFIG

    socket: Path = Path("supd.sock")
    socket_mode: int = 0o600
    socket_group: NonEmptyStr | None = None
    log_dir: Path = Path("logs")
    log_format: Literal["auto", "console", "json"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_timestamps: Timestamps = "none"  # every program's default
    journal_socket: Path = Path("/run/systemd/journal/socket")
    include: tuple[NonEmptyStr, ...] = ()  # glob patterns as written, relative to the file
    subreaper: bool = False
    # "auto": a cgroup v2 per process where supd can manage one (root, Delegate=yes, a
    # container's own cgroup namespace); "off": the session fallback (sessions.py).
    cgroups: Literal["auto", "off"] = "auto"
    # Every program inherits it; the loader merges it into each ProgramConfig.environment.
    environment: dict[NonEmptyStr, str] = Field(default_factory=dict)
    # Serve GET /metrics: "HOST:PORT" (an IP address, or localhost) or a UNIX socket path.
    metrics: str | None = None

    @field_validator("environment", mode="before")
    @classmethod
    def _read_environment(cls, value: Any, info: ValidationInfo) -> Any:
        return _environment_input(value, info)

    @field_validator("metrics", mode="before")
    @classmethod
    def _metrics_address(cls, value: Any, info: ValidationInfo) -> Any:
        if not isinstance(value, str):
            return value  # fails as "should be a string"
        return _metrics_address(value, info)

    @field_validator("environment")
    @classmethod
    def _valid_environment(cls, value: dict[str, str]) -> dict[str, str]:
        return _check_environment(value)

    @model_validator(mode="before")
    @classmethod
    def _fill_defaults(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, dict):
            return data
        context = _context(info)
        defaults = {
            "socket": _default_socket(context),
            "socket_mode": 0o660 if data.get("socket_group") is not None else 0o600,
            "log_dir": "logs",
        }
        return {**defaults, **data}

    @field_validator("socket", "log_dir", "journal_socket", mode="before")
    @classmethod
    def _resolve_path(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, str):
            value = expand_variables(value, _context(info).environ)
        return _path_input(value, info)

    @field_validator("socket")
    @classmethod
    def _socket_path_fits(cls, value: Path) -> Path:
        length = len(os.fsencode(value))
        if length > MAX_SOCKET_PATH_BYTES:
            raise ValueError(
                f"path is {length} bytes long; a UNIX socket path can have at most "
                f"{MAX_SOCKET_PATH_BYTES}"
            )
        return value

    @field_validator("socket")
    @classmethod
    def _socket_path_usable(cls, value: Path) -> Path:
        problem = _socket_path_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("socket_group")
    @classmethod
    def _socket_group_exists(cls, value: str | None) -> str | None:
        if value is not None and not (value.isascii() and value.isdigit()):
            try:
                grp.getgrnam(value)
            except KeyError:
                raise ValueError(f"unknown group {value!r}") from None
        return value

    @field_validator("socket_mode", mode="before")
    @classmethod
    def _parse_mode(cls, value: Any) -> Any:
        return _parse_octal(value, "mode")

    @field_validator("log_format", "log_level", mode="before")
    @classmethod
    def _lowercase(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip().lower()
            return "warning" if text == "warn" else text
        return value

    @field_validator("include", mode="before")
    @classmethod
    def _include_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return (value,)
        return tuple(value) if isinstance(value, list) else value


def _socket_path_problem(path: Path) -> str | None:
    """What the file system already says against binding a socket at `path` (the rest,
    such as permissions or a folder that can't be created, shows only at start-up)."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        pass
    except OSError as exc:
        return f"cannot use {path}: {exc.strerror}"
    else:
        if stat.S_ISDIR(st.st_mode):
            return f"{path} is a folder, not a socket"
        if not stat.S_ISSOCK(st.st_mode):
            return f"{path} exists and is not a socket"
        return None
    folder = path.parent
    while True:  # the nearest existing ancestor must be a folder
        try:
            st = os.stat(folder)
        except (FileNotFoundError, NotADirectoryError):
            folder = folder.parent
            continue
        except OSError as exc:
            return f"cannot use {folder}: {exc.strerror}"
        if not stat.S_ISDIR(st.st_mode):
            return f"{folder} is not a folder"
        return None


# -- readiness, health and dependencies (issue 14) ------------------------------------


class _ProbeTarget(BaseModel):
    """What the probe kinds share: exactly one kind, its target checked at load."""

    model_config = _MODEL_CONFIG

    tcp: NonEmptyStr | None = None
    http: NonEmptyStr | None = None
    exec: tuple[NonEmptyStr, ...] | None = None
    interval: Annotated[float, Field(gt=0, le=MAX_SECONDS, allow_inf_nan=False)] = 1.0
    timeout: Annotated[float, Field(gt=0, le=MAX_SECONDS, allow_inf_nan=False)] = 1.0

    @field_validator("tcp", "http", mode="before")
    @classmethod
    def _expand_target(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, str):
            return expand_variables(value, _context(info).environ)
        return value

    @field_validator("tcp")
    @classmethod
    def _tcp_target(cls, value: str | None) -> str | None:
        if value is not None:
            parse_host_port(value)
        return value

    @field_validator("http")
    @classmethod
    def _http_target(cls, value: str | None) -> str | None:
        if value is not None:
            parse_http_url(value)
        return value

    @field_validator("exec", mode="before")
    @classmethod
    def _exec_command(cls, value: Any, info: ValidationInfo) -> Any:
        environ = _context(info).environ
        if isinstance(value, str):
            return tuple(shlex.split(expand_variables(value, environ)))
        if isinstance(value, list):
            return tuple(expand_variables(a, environ) if isinstance(a, str) else a for a in value)
        return value

    @field_validator("exec")
    @classmethod
    def _exec_not_empty(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None and not value:
            raise ValueError("should name a command")
        return value

    def kinds(self) -> list[str]:
        raise NotImplementedError  # ReadyMethods, HealthMethods

    @model_validator(mode="after")
    def _exactly_one_kind(self) -> Any:
        kinds = self.kinds()
        if len(kinds) != 1:
            shown = ", ".join(kinds) if kinds else "none"
            raise ValueError(f"should set exactly one probe kind (got {shown})")
        return self


class ReadyConfig(ReadyMethods, _ProbeTarget):
    """`ready = { tcp|http|exec|log|notify|file = ..., interval, timeout, ready_timeout }`."""

    log: NonEmptyStr | None = None
    notify: Literal[True] | None = None
    file: NonEmptyStr | None = None
    ready_timeout: Annotated[float, Field(gt=0, le=MAX_SECONDS, allow_inf_nan=False)] = 60.0

    @field_validator("file", mode="before")
    @classmethod
    def _file_path(cls, value: Any, info: ValidationInfo) -> Any:
        """${VAR} expanded; relative to the folder of the file it is written in."""
        if not isinstance(value, str) or not value:
            return value
        context = _context(info)
        return str(_normalised(context.base_dir, expand_variables(value, context.environ)))

    @field_validator("log")
    @classmethod
    def _regex_compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return value


class HealthConfig(HealthMethods, _ProbeTarget):
    """`health = { tcp|http|exec|log-silence = ..., interval, timeout, failures,
    start_grace, on_unhealthy }`."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, populate_by_name=True)

    log_silence: Annotated[float, Field(gt=0, le=MAX_SECONDS, allow_inf_nan=False)] | None = Field(
        default=None, alias="log-silence"
    )
    failures: int = Field(default=3, ge=1)
    start_grace: Seconds = 30.0
    on_unhealthy: Literal["restart", "stop", "ignore"] = "restart"


class Dependency(BaseModel):
    """One `depends_on` entry: a program and the condition it must meet."""

    model_config = _MODEL_CONFIG

    program: NonEmptyStr
    condition: DependencyCondition = "ready"


def _dependency_list(value: Any) -> Any:
    """ "db" is short for { program = "db" } (condition ready)."""
    if not isinstance(value, list):
        return value
    return tuple({"program": item} if isinstance(item, str) else item for item in value)


def _default_socket(context: _Context) -> Path:
    return Path(facts.socket_path(str(context.base_dir), None, context.environ))


class ProgramConfig(ProgramMethods, BaseModel):
    """One [programs.NAME] table. Frozen; == compares every option, which is how a
    reload tells changed programs from unchanged ones.

    Log files are stored as absolute path templates (see the module docstring) or None
    to discard; use log_path() to get a process's file.
    """

    model_config = _MODEL_CONFIG

    name: str
    command: tuple[str, ...]
    numprocs: int = Field(default=1, ge=1, le=MAX_NUMPROCS)
    numprocs_start: int = Field(default=0, ge=0)
    process_name: NonEmptyStr | None = None  # template; None: see default_process_name()
    # Set by the loader from [groups.NAME], never written in a [programs.NAME] table.
    process_group: NonEmptyStr | None = None
    group_priority: int = 999
    directory: Path | None = None
    environment: dict[NonEmptyStr, str] = Field(default_factory=dict)
    user: NonEmptyStr | None = None
    group: NonEmptyStr | None = None
    umask: int | None = None
    priority: int = 999  # lower starts first and stops last
    autostart: bool = True
    autorestart: Literal["always", "on-failure", "never"] = "on-failure"
    exitcodes: Annotated[frozenset[ExitCode], Strict(False)] = frozenset({0})
    startsecs: Seconds = 1.0
    startretries: int = Field(default=3, ge=0)
    backoff_initial: Seconds = 1.0
    backoff_factor: float = Field(default=2.0, ge=1, le=1000, allow_inf_nan=False)
    backoff_max: Seconds = 60.0
    backoff_reset: Seconds = 60.0
    # Crash loops (docs in README): jitter, the sliding window of restarts, revival.
    backoff_jitter: float = Field(default=0.1, ge=0, le=1, allow_inf_nan=False)
    # None: max(5, startretries), so failed starts meet startretries first, as before
    max_restarts: int | None = Field(default=None, ge=1)
    restart_window: Seconds = 60.0  # 0: no window
    revive_after: Seconds | None = None  # None: a FATAL process stays FATAL
    # systemd EnvironmentFile= files, read at each start; "-/path" is optional.
    env_files: tuple[str, ...] = ()
    stopsignal: int = int(signal.SIGTERM)
    stopwaitsecs: Seconds = 10.0
    killasgroup: bool = True
    # What the main process leaves behind when it exits or is stopped: "kill" (systemd's
    # KillMode=control-group) or "keep" (KillMode=process).
    leftovers: Literal["kill", "keep"] = "kill"
    # cgroup v2 limits, written where the controller is enabled (else a warning).
    memory_max: str | None = None
    cpu_max: str | None = None
    pids_max: str | None = None
    redirect_stderr: bool = False
    # The loader always fills these two in ({log_dir}/{process_name}.out.log, .err.log).
    stdout_logfile: str | None = None
    stdout_logfile_maxbytes: ByteCount = DEFAULT_LOG_MAXBYTES
    stdout_logfile_backups: int = Field(default=DEFAULT_LOG_BACKUPS, ge=0)
    stderr_logfile: str | None = None
    stderr_logfile_maxbytes: ByteCount = DEFAULT_LOG_MAXBYTES
    stderr_logfile_backups: int = Field(default=DEFAULT_LOG_BACKUPS, ge=0)
    # Before each line written to supd's stdout/stderr (a template, see log_prefix()).
    log_prefix: str = DEFAULT_LOG_PREFIX
    log_timestamps: Timestamps = "none"  # default from [supervisor] log_timestamps
    rotate_every: Seconds | None = None  # "1h", "1d", "7d": rotate by age as well as size
    max_total_size: ByteCount = 0  # cap on a log's current file and backups together; 0: none
    compress: bool = False  # gzip rotated backups (NAME.1.gz ...) in a helper process
    # Readiness, health and dependencies (issue 14).
    ready: ReadyConfig | None = None
    health: HealthConfig | None = None
    depends_on: tuple[Dependency, ...] = ()
    on_dependency_restart: Literal["restart", "ignore"] = "ignore"
    notify: bool = False  # NOTIFY_SOCKET for the program (sd_notify)
    watchdog_sec: Annotated[float, Field(gt=0, le=MAX_SECONDS, allow_inf_nan=False)] | None = None

    # The environment dict makes pydantic's generated hash fail; equal configs share
    # name and command, so hashing those keeps hash consistent with ==.
    def __hash__(self) -> int:
        return hash((self.name, self.command))

    # -- normalisation of raw TOML values ------------------------------------

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        if not _PROGRAM_NAME.fullmatch(value):
            raise ValueError(
                "a program name may use only letters, digits, '_', '-' and '.' "
                "(':' separates the process number)"
            )
        return value

    @field_validator("depends_on", mode="before")
    @classmethod
    def _short_dependencies(cls, value: Any) -> Any:
        return _dependency_list(value)

    @field_validator("command", mode="before")
    @classmethod
    def _split_command(cls, value: Any, info: ValidationInfo) -> Any:
        environ = _context(info).environ
        if isinstance(value, str):
            value = expand_variables(value, environ)
        elif isinstance(value, list):
            value = [expand_variables(a, environ) if isinstance(a, str) else a for a in value]
        return _parse_command(value)

    @field_validator("command")
    @classmethod
    def _command_not_empty(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value or not value[0]:
            raise ValueError("should name a program to run, not be empty")
        for argument in value:
            _reject_nul(argument)
        return value

    @field_validator("directory", mode="before")
    @classmethod
    def _resolve_directory(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, str):
            value = expand_variables(value, _context(info).environ)
        return _path_input(value, info)

    @field_validator("environment", mode="before")
    @classmethod
    def _read_environment(cls, value: Any, info: ValidationInfo) -> Any:
        return _environment_input(value, info)

    @field_validator("environment")
    @classmethod
    def _valid_environment(cls, value: dict[str, str]) -> dict[str, str]:
        return _check_environment(value)

    @field_validator("env_files", mode="before")
    @classmethod
    def _resolve_env_files(cls, value: Any, info: ValidationInfo) -> Any:
        """Each path absolute (relative ones from the config's folder), its "-" kept."""
        if not isinstance(value, list | tuple):
            return value
        resolved: list[Any] = []
        for entry in value:
            if not isinstance(entry, str):
                resolved.append(entry)
                continue
            optional = entry.startswith("-")
            path = _path_input(entry[1:] if optional else entry, info)
            resolved.append(("-" if optional else "") + str(path))
        return tuple(resolved)

    @field_validator("umask", mode="before")
    @classmethod
    def _parse_umask(cls, value: Any) -> Any:
        return _parse_octal(value, "umask")

    @field_validator("autorestart", mode="before")
    @classmethod
    def _normalise_autorestart(cls, value: Any) -> Any:
        return _parse_autorestart(value)

    @field_validator("exitcodes", mode="before")
    @classmethod
    def _single_exitcode(cls, value: Any) -> Any:
        return [value] if _is_int(value) else value

    @field_validator("stopsignal", mode="before")
    @classmethod
    def _normalise_signal(cls, value: Any) -> Any:
        return _parse_signal(value)

    @field_validator("stdout_logfile_maxbytes", "stderr_logfile_maxbytes", mode="before")
    @classmethod
    def _parse_size(cls, value: Any) -> Any:
        return _parse_byte_size(value)

    @field_validator("memory_max", mode="before")
    @classmethod
    def _parse_memory(cls, value: Any) -> Any:
        """A size ('512MB'), a number of bytes or 'max' -> memory.max's text."""
        hint = "should be a size like '512MB', a number of bytes, or 'max'"
        if isinstance(value, str) and value.strip().lower() == "max":
            return "max"
        if not isinstance(value, str) and not _is_int(value):
            raise ValueError(hint)
        try:
            size = _parse_byte_size(value)
        except ValueError:
            raise ValueError(hint) from None
        if not _is_int(size) or size < 1:
            raise ValueError(hint)
        return str(size)

    @field_validator("cpu_max", mode="before")
    @classmethod
    def _parse_cpu(cls, value: Any) -> Any:
        """'50%' (of one CPU) -> '50000 100000'; 'max', 'QUOTA' or 'QUOTA PERIOD' as is."""
        hint = "should be a share of one CPU like '50%' or '200%', 'QUOTA PERIOD' in µs, or 'max'"
        if not isinstance(value, str):
            raise ValueError(hint)
        text = value.strip()
        if text.endswith("%"):
            try:
                percent = float(text[:-1])
            except ValueError:
                raise ValueError(hint) from None
            if not 0 < percent <= 100_000:
                raise ValueError(hint)
            return f"{max(1000, round(percent * 1000))} 100000"
        if _CPU_MAX.fullmatch(text) is None:
            raise ValueError(hint)
        return text

    @field_validator("pids_max", mode="before")
    @classmethod
    def _parse_pids(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() == "max":
            return "max"
        if not _is_int(value) or value < 1:
            raise ValueError("should be a number of processes (at least 1), or 'max'")
        return str(value)

    @field_validator("stdout_logfile", "stderr_logfile", mode="before")
    @classmethod
    def _resolve_logfile(cls, value: Any, info: ValidationInfo) -> Any:
        if not isinstance(value, str):
            return value
        value = expand_variables(value, _context(info).environ, _escape_braces)
        if value.strip().lower() == "none":
            return None
        if value.strip() == "-":
            return "/dev/stdout"
        if value.strip().lower() == JOURNAL:
            return JOURNAL
        path = _path_input(value, info)
        _check_log_template(str(path))
        return str(path)

    @field_validator("max_total_size", mode="before")
    @classmethod
    def _parse_total_size(cls, value: Any) -> Any:
        return _parse_byte_size(value)

    @field_validator("rotate_every", mode="before")
    @classmethod
    def _parse_rotate_every(cls, value: Any) -> Any:
        seconds = _parse_duration(value)
        if isinstance(seconds, float | int) and not isinstance(seconds, bool) and seconds <= 0:
            raise ValueError('should be a positive duration such as "1h", "1d" or "7d"')
        return seconds

    @field_validator("log_prefix")
    @classmethod
    def _valid_prefix(cls, value: str) -> str:
        try:
            fields = _template_fields(value)
        except ValueError as error:
            raise ValueError(f"bad placeholder ({error}); {_PREFIX_HINT}") from None
        unknown = fields - _PREFIX_PLACEHOLDERS
        if unknown:
            names_text = ", ".join("{" + name + "}" for name in sorted(unknown))
            raise ValueError(f"unknown placeholder {names_text}; {_PREFIX_HINT}")
        if "\n" in value:
            raise ValueError("should fit on one line (no newline)")
        return value

    # -- defaults and cross-field rules --------------------------------------

    @model_validator(mode="wrap")
    @classmethod
    def _defaults_and_cross_checks(
        cls, data: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo
    ) -> Any:
        if not isinstance(data, dict):
            return handler(data)
        context = _context(info)
        program = handler(
            {**_default_logfiles(context.log_dir), **context.program_defaults, **data}
        )
        problems = program._process_name_problems()
        problems += program._shared_log_problems(explicit_stderr="stderr_logfile" in data)
        if problems:
            raise _OptionProblems(problems)
        return program

    def _process_name_problems(self) -> list[tuple[str, str]]:
        template = self.process_name
        if template is None:
            return []
        try:
            fields = _template_fields(template)
            unknown = fields - _NAME_PLACEHOLDERS
            if unknown:
                names_text = ", ".join("{" + name + "}" for name in sorted(unknown))
                return [("process_name", f"unknown placeholder {names_text}; {_NAME_HINT}")]
            bases = [
                template.format(program=self.name, process_num=number, group=self.group_name)
                for number in range(self.numprocs_start, self.numprocs_start + self.numprocs)
            ]
        except (ValueError, TypeError, KeyError, IndexError) as error:
            return [("process_name", f"bad placeholder ({error}); {_NAME_HINT}")]
        if self.numprocs > 1 and "process_num" not in fields:
            message = f"numprocs = {self.numprocs} but the template has no {{process_num}}"
            return [("process_name", message)]
        for base in bases:
            if not _PROGRAM_NAME.fullmatch(base):
                message = (
                    f"gives {base!r}; a process name may use only letters, digits, "
                    "'_', '-' and '.' (':' separates the group)"
                )
                return [("process_name", message)]
        return []

    def _shared_log_problems(self, explicit_stderr: bool) -> list[tuple[str, str]]:
        """Each log file must have exactly one writer, and no option may be dead."""
        problems: list[tuple[str, str]] = []
        if self.redirect_stderr and explicit_stderr and self.stderr_logfile is not None:
            problems.append(("stderr_logfile", _REDIRECTED_STDERR_LOGFILE))
        streams = ["stdout"] if self.redirect_stderr else ["stdout", "stderr"]
        for stream in streams:
            template = getattr(self, f"{stream}_logfile")
            shared = template is not None and not _per_process(template)
            if self.numprocs > 1 and shared and not _is_stream_path(template):
                message = f"numprocs = {self.numprocs} but {_SHARED_BY_PROCESSES}"
                problems.append((f"{stream}_logfile", message))
        same_file = self.stdout_logfile is not None and self.stdout_logfile == self.stderr_logfile
        if same_file and not self.redirect_stderr and not _is_stream_path(self.stdout_logfile):
            problems.append(("stderr_logfile", _SHARED_BY_STREAMS))
        return problems


_REDIRECTED_STDERR_LOGFILE = (
    "has no effect with redirect_stderr = true (stderr goes to the stdout log); remove one of them"
)
_SHARED_BY_PROCESSES = (
    "the path has no {process_num} or {process_name}: two processes cannot share one log file"
)
_SHARED_BY_STREAMS = (
    "is the same file as stdout_logfile; set redirect_stderr = true to merge the streams"
)


_NAME_HINT = "use {program}, {group} or {process_num}, and {{ }} for literal braces"
_PREFIX_HINT = (
    "use {process_name}, {program}, {group}, {process_num} or {stream}, "
    "and {{ }} for literal braces"
)


def _parse_duration(value: object) -> object:
    """ "90s", "30m", "1h", "1d", "7d", "2w" or a number of seconds -> seconds."""
    if isinstance(value, str):
        match = _DURATION.fullmatch(value.strip())
        if match is None:
            raise ValueError(f'should be a duration such as "1h", "1d" or "7d", got {value!r}')
        return float(match.group(1)) * _DURATION_UNITS[match.group(2).lower()]
    if _is_int(value):
        return float(value)
    return value


_is_stream_path = is_stream_path


def _per_process(template: str) -> bool:
    return bool(_template_fields(template) & _PER_PROCESS_PLACEHOLDERS)


def _default_logfiles(log_dir: Path) -> dict[str, str]:
    # The folder is already expanded: its braces and dollars are literal.
    folder = str(log_dir).replace("{", "{{").replace("}", "}}").replace("$", "$$")
    return {
        "stdout_logfile": f"{folder}/{{process_name}}.out.log",
        "stderr_logfile": f"{folder}/{{process_name}}.err.log",
    }


class GroupConfig(BaseModel):
    """One [groups.NAME] table: supervisord's heterogeneous [group:NAME]."""

    model_config = _MODEL_CONFIG

    name: str
    programs: tuple[NonEmptyStr, ...]
    priority: int = 999  # orders groups against each other, like supervisord's

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        if not _PROGRAM_NAME.fullmatch(value):
            raise ValueError("a group name may use only letters, digits, '_', '-' and '.'")
        return value

    @field_validator("programs", mode="before")
    @classmethod
    def _program_list(cls, value: Any) -> Any:
        return tuple(value) if isinstance(value, list) else value

    @field_validator("programs")
    @classmethod
    def _each_once(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("should list at least one program")
        repeated = sorted({name for name in value if value.count(name) > 1})
        if repeated:
            raise ValueError(f"lists {', '.join(repeated)} more than once")
        return value


@dataclass(frozen=True)
class Config:
    """A whole validated configuration."""

    path: Path  # absolute path of the main file
    supervisor: SupervisorConfig
    programs: dict[str, ProgramConfig]  # in definition order: main file, then includes
    sources: dict[str, Path] = field(default_factory=dict)  # program name -> its file
    groups: dict[str, GroupConfig] = field(default_factory=dict)  # [groups.NAME] tables


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_SYNTAX_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)\s*$")
_END_OF_DOCUMENT = re.compile(r"\s*\(at end of document\)\s*$")
_SUPERVISORD_SECTION = re.compile(r"^\s*\[(program|group|eventlistener|fcgi-program):", re.M)


def _format_key(path: KeyPath) -> str:
    """("programs", "my app", "command", 0) -> 'programs."my app".command[0]'."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            name = part if _BARE_KEY.fullmatch(part) else json.dumps(part)
            text += f".{name}" if text else name
    return text


@dataclass(frozen=True)
class _Document:
    """One parsed TOML file and the means to point into it."""

    path: Path
    data: dict[str, Any]
    locator: KeyLocator

    def problem(self, key: KeyPath, message: str) -> Problem:
        return Problem(self.path, self.locator.line_of(key), None, _format_key(key), message)


def _read_document(path: Path, problems: list[Problem]) -> _Document | None:
    try:
        raw = path.read_bytes()
    except (OSError, ValueError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        problems.append(Problem(path, None, None, "", f"cannot read config file: {reason}"))
        return None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        problems.append(Problem(path, line, None, "", "not valid UTF-8 text"))
        return None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        problems.append(_syntax_problem(path, text, error))
        return None
    except RecursionError:
        problems.append(Problem(path, None, None, "", "invalid TOML: nesting is too deep"))
        return None
    return _Document(path, data, KeyLocator(text))


def _syntax_problem(path: Path, text: str, error: tomllib.TOMLDecodeError) -> Problem:
    message = str(error)
    line: int | None = None
    column: int | None = None
    if match := _SYNTAX_POSITION.search(message):
        line, column = int(match[1]), int(match[2])
        message = message[: match.start()]
    elif match := _END_OF_DOCUMENT.search(message):
        lines = text.split("\n")
        line, column = len(lines), len(lines[-1]) + 1
        message = message[: match.start()] + " (at end of file)"
    if line is not None and _SUPERVISORD_SECTION.match(text.split("\n")[line - 1]):
        message += "; supd's tables are [programs.NAME], not supervisord's [program:NAME]"
    if _SUPERVISORD_TABLES.search(text):
        message += f"; {_IMPORT_HINT}"
    return Problem(path, line, column, "", f"invalid TOML: {message}")


def _readable(error: Mapping[str, Any], known_options: Iterable[str]) -> str:
    """pydantic's message, reworded where its words are not TOML's."""
    kind, message = error["type"], str(error["msg"])
    if kind == "extra_forbidden":
        option = str(error["loc"][-1])
        close = difflib.get_close_matches(option, list(known_options), n=1)
        return "unknown option" + (f" (did you mean {close[0]!r}?)" if close else "")
    if kind == "missing":
        return "required option is missing"
    if kind in ("dict_type", "model_type"):
        return "should be a table"
    return message.removeprefix("Value error, ") + _got(error.get("input"))


def _got(value: object) -> str:
    """' (got -1)' for short scalar inputs, so the reader sees what was written."""
    if isinstance(value, bool):
        shown = "true" if value else "false"
    elif isinstance(value, str):
        shown = json.dumps(value)
    elif isinstance(value, int | float):
        shown = repr(value)
    else:
        return ""
    return f" (got {shown})" if len(shown) <= 40 else ""


def _problems_from(
    error: ValidationError, document: _Document, table: KeyPath, model: type[BaseModel]
) -> list[Problem]:
    options = [name for name in model.model_fields if name != "name"]
    problems: list[Problem] = []
    for item in error.errors(include_url=False):
        # Dict-key errors carry a "[key]" marker after the key.
        loc = tuple(part for part in item["loc"] if part != "[key]")
        if loc[:1] == ("name",) and model is ProgramConfig:
            # A program's name is its table's key, already shown as the problem's key.
            message = str(item["msg"]).removeprefix("Value error, ")
            problems.append(document.problem(table, message))
            continue
        cause = item.get("ctx", {}).get("error")
        if isinstance(cause, _OptionProblems):
            for option, message in cause.problems:
                problems.append(document.problem((*table, *loc, option), message))
        else:
            problems.append(document.problem((*table, *loc), _readable(item, options)))
    return problems


def _validate_supervisor(
    document: _Document, environ: Mapping[str, str], problems: list[Problem]
) -> SupervisorConfig | None:
    table = document.data.get("supervisor", {})
    if not isinstance(table, dict):
        return None  # _check_top_level has said so
    base_dir = document.path.parent
    context = _Context(base_dir=base_dir, log_dir=base_dir / "logs", environ=environ)
    try:
        return SupervisorConfig.model_validate(table, context=context)
    except ValidationError as error:
        problems.extend(_problems_from(error, document, ("supervisor",), SupervisorConfig))
        return None


_LOADER_SET = {
    "name": "unknown option (a program is named by its table, [programs.NAME])",
    "process_group": "unknown option (a program joins a group in [groups.NAME] programs = [...])",
    "group_priority": "unknown option (a group's priority is set in [groups.NAME])",
}


def _validate_program(
    document: _Document,
    name: str,
    table: object,
    context: _Context,
    group: GroupConfig | None,
    problems: list[Problem],
) -> ProgramConfig | None:
    path = ("programs", name)
    if not isinstance(table, dict):
        problems.append(document.problem(path, "should be a table: [programs.NAME]"))
        return None
    for key, message in _LOADER_SET.items():
        if key in table:
            problems.append(document.problem((*path, key), message))
    data = {key: value for key, value in table.items() if key not in _LOADER_SET}
    data["name"] = name
    if group is not None:
        data.update(process_group=group.name, group_priority=group.priority)
    try:
        return ProgramConfig.model_validate(data, context=context)
    except ValidationError as error:
        problems.extend(_problems_from(error, document, path, ProgramConfig))
        return None


def _validate_group(
    document: _Document, name: str, table: object, problems: list[Problem]
) -> GroupConfig | None:
    path = ("groups", name)
    if not isinstance(table, dict):
        problems.append(document.problem(path, "should be a table: [groups.NAME]"))
        return None
    if "name" in table:
        message = "unknown option (a group is named by its table, [groups.NAME])"
        problems.append(document.problem((*path, "name"), message))
        table = {key: value for key, value in table.items() if key != "name"}
    try:
        return GroupConfig.model_validate({**table, "name": name})
    except ValidationError as error:
        problems.extend(_problems_from(error, document, path, GroupConfig))
        return None


# Sections of a supervisord config: seeing one means someone gave supd an INI file.
_SUPERVISORD_TABLES = re.compile(
    r"^\s*\[(supervisord|supervisorctl|unix_http_server|inet_http_server|include"
    r"|rpcinterface:[^]]*|program:[^]]*|group:[^]]*|eventlistener:[^]]*|fcgi-program:[^]]*)\]",
    re.M,
)
_IMPORT_HINT = (
    "this looks like a supervisord config (INI); convert it with `supd import FILE -o supd.toml`"
)
_INI_TABLE_NAMES = frozenset(
    {"supervisord", "supervisorctl", "unix_http_server", "inet_http_server", "include"}
)


def _check_top_level(
    document: _Document, allowed: tuple[str, ...], problems: list[Problem]
) -> None:
    for key, value in document.data.items():
        if key in allowed:
            if not isinstance(value, dict):
                problems.append(document.problem((key,), f"should be a table: [{key}]"))
            continue
        if key in _INI_TABLE_NAMES or key.startswith("rpcinterface:"):
            message = f"unknown table; {_IMPORT_HINT}"
        elif "supervisor" not in allowed:
            message = "an included file may contain only [programs.NAME] and [groups.NAME] tables"
        else:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean [{close[0]}]?)" if close else ""
            message = (
                f"unknown table; supd reads [supervisor], [programs.NAME] and [groups.NAME]{hint}"
            )
        problems.append(document.problem((key,), message))


def _tables(document: _Document, kind: str) -> dict[str, object]:
    tables = document.data.get(kind, {})
    return tables if isinstance(tables, dict) else {}


# Options whose values are supd name templates ({program}, {process_num}, {group}).
_TEMPLATE_OPTIONS = frozenset({"process_name", "stdout_logfile", "stderr_logfile"})


def _supervisord_syntax_problems(document: _Document) -> list[Problem]:
    """%(program_name)s, %(ENV_X)s, ... pasted from a supervisord config, with the supd
    spelling. Only supervisord's own names count: %(h)s in a gunicorn log format is text."""
    found: list[Problem] = []

    def visit(key: KeyPath, value: object) -> None:
        if isinstance(value, dict):
            for child, item in value.items():
                visit((*key, child), item)
        elif isinstance(value, list):
            for index, item in enumerate(value):
                visit((*key, index), item)
        elif isinstance(value, str):
            option = next((part for part in reversed(key) if isinstance(part, str)), "")
            template = option in _TEMPLATE_OPTIONS
            for match in supervisord_syntax.EXPANSION.finditer(value):
                name = match["name"]
                if supervisord_syntax.is_supervisord_expansion(name):
                    spelling = supervisord_syntax.expansion_hint(
                        name, match["spec"], match["conv"], template
                    )
                    message = f"{match[0]} is supervisord's syntax; supd writes {spelling}"
                    found.append(document.problem(key, message))

    for kind in ("supervisor", "programs", "groups"):
        visit((kind,), document.data.get(kind))
    return found


def _include_patterns(document: _Document) -> list[str]:
    """The include globs as written, if well-formed (SupervisorConfig reports them if not)."""
    supervisor = document.data.get("supervisor")
    patterns = supervisor.get("include", []) if isinstance(supervisor, dict) else []
    if isinstance(patterns, str):
        patterns = [patterns]
    if not isinstance(patterns, list):
        return []
    return [pattern for pattern in patterns if isinstance(pattern, str) and pattern]


def _included_files(main: Path, patterns: list[str]) -> list[Path]:
    """Files matched by the globs, sorted per pattern, each once, never the main file."""
    files: list[Path] = []
    for pattern in patterns:
        # root_dir keeps glob characters in the config folder's own name literal.
        for match in sorted(glob.glob(pattern, root_dir=main.parent, recursive=True)):
            path = _normalised(main.parent, match)
            if path != main and path not in files:
                files.append(path)
    return files


@dataclass
class _Loader:
    """Collects groups, programs and problems across the main file and its includes."""

    log_dir: Path
    environ: Mapping[str, str]
    program_defaults: Mapping[str, object] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    programs: dict[str, ProgramConfig] = field(default_factory=dict)
    sources: dict[str, Path] = field(default_factory=dict)
    documents: dict[str, _Document] = field(default_factory=dict)  # where each name was defined
    groups: dict[str, GroupConfig] = field(default_factory=dict)
    group_documents: dict[str, _Document] = field(default_factory=dict)
    group_of: dict[str, GroupConfig] = field(default_factory=dict)  # program -> its group
    clashing: set[str] = field(default_factory=set)  # programs whose names clash

    def add_groups_from(self, document: _Document) -> None:
        for name, table in _tables(document, "groups").items():
            first = self.group_documents.get(name)
            if first is not None:
                where = f"{first.path}:{first.locator.line_of(('groups', name)) or '?'}"
                message = f"group defined more than once (first in {where})"
                self.problems.append(document.problem(("groups", name), message))
                continue
            self.group_documents[name] = document
            group = _validate_group(document, name, table, self.problems)
            if group is None:
                continue
            self.groups[name] = group
            for program in group.programs:
                other = self.group_of.get(program)
                if other is not None:
                    message = f"{program} is already in group {other.name}; a program has one group"
                    self.problems.append(document.problem(("groups", name, "programs"), message))
                else:
                    self.group_of[program] = group

    def add_programs_from(self, document: _Document) -> None:
        for name, table in _tables(document, "programs").items():
            first = self.documents.get(name)
            if first is not None:
                where = f"{first.path}:{first.locator.line_of(('programs', name)) or '?'}"
                message = f"program defined more than once (first in {where})"
                self.problems.append(document.problem(("programs", name), message))
                continue
            self.documents[name] = document
            context = _Context(
                document.path.parent, self.log_dir, self.environ, self.program_defaults
            )
            group = self.group_of.get(name)
            program = _validate_program(document, name, table, context, group, self.problems)
            if program is not None:
                self.programs[name] = program
                self.sources[name] = document.path

    def check_groups(self) -> None:
        """Every member exists; a group's name is free, or one of its own programs'."""
        for group in self.groups.values():
            document = self.group_documents[group.name]
            unknown = [name for name in group.programs if name not in self.documents]
            if unknown:
                message = f"names unknown program {', '.join(unknown)}"
                self.problems.append(document.problem(("groups", group.name, "programs"), message))
            if group.name in self.documents and group.name not in group.programs:
                message = (
                    f"is also the name of program {group.name}, which is not in this group; "
                    "supctl could not tell the two apart"
                )
                self.problems.append(document.problem(("groups", group.name), message))

    def check_names_unique(self) -> None:
        """A process name means one process, and never another program or group."""
        owners: dict[str, str] = {}  # process name -> program
        for program in self.programs.values():
            document = self.documents[program.name]
            key = ("programs", program.name, "process_name")
            for name in program.process_names():
                clash = owners.get(name)
                if clash is None and name != program.name and name in self.documents:
                    clash = name
                if clash is None and name != program.group_name and name in self.groups:
                    clash = f"group {name}"
                if clash is not None:
                    message = f"process name {name} is also used by {clash}; names must be unique"
                    self.problems.append(document.problem(key, message))
                    self.clashing.add(program.name)
                    break
                owners[name] = program.name

    def check_dependencies(self) -> None:
        """depends_on names known programs, never itself, and makes no cycle.

        A dependency on an `autostart = false` program is not an error: starting a
        program starts what it depends on (at boot too), so nothing is left waiting on a
        program that nobody would start (README, "Dependencies").
        """
        edges: dict[str, list[str]] = {}
        for program in self.programs.values():
            document = self.documents[program.name]
            key = ("programs", program.name, "depends_on")
            targets = []
            for dependency in program.depends_on:
                if dependency.program == program.name:
                    self.problems.append(document.problem(key, "a program cannot depend on itself"))
                elif dependency.program not in self.documents:
                    message = f"names unknown program {dependency.program}"
                    self.problems.append(document.problem(key, message))
                elif dependency.program in self.programs:
                    targets.append(dependency.program)
            edges[program.name] = targets
        for cycle in find_cycles(edges):
            document = self.documents[cycle[0]]
            message = "dependency cycle: " + " -> ".join([*cycle, cycle[0]])
            self.problems.append(document.problem(("programs", cycle[0], "depends_on"), message))

    def check_process_total(self) -> bool:
        """At most MAX_PROCESSES in all; named at the program that goes over."""
        total = 0
        for program in self.programs.values():
            total += program.numprocs
            if total > MAX_PROCESSES:
                key = ("programs", program.name, "numprocs")
                message = (
                    f"the programs make {sum(p.numprocs for p in self.programs.values())} "
                    f"processes in all, more than the limit of {MAX_PROCESSES} (this one "
                    f"takes it over)"
                )
                self.problems.append(self.documents[program.name].problem(key, message))
                return False
        return True

    def check_fd_budget(self, reserve: int = FD_RESERVE) -> None:
        """The output pipes of every process must fit under the hard fd limit.

        supd raises its soft RLIMIT_NOFILE to the hard one at start; each process holds
        its pipes for as long as it runs (two, one with redirect_stderr), besides the
        daemon's own fds (FD_RESERVE: the control socket and its clients, the selector,
        its log). Log files are opened on a program's first write; one that cannot be
        opened for want of fds is a log write failure (counted, reported), not a stall.
        """
        limit = hard_fd_limit()
        if limit is None:
            return
        needed = reserve
        for program in self.programs.values():
            needed += program.numprocs * _fds_per_process(program)
            if needed > limit:
                key = ("programs", program.name, "numprocs")
                total = reserve + sum(
                    p.numprocs * _fds_per_process(p) for p in self.programs.values()
                )
                message = (
                    f"the programs' output pipes need {total} file descriptors with supd's "
                    f"own {reserve}, more than the hard limit of {limit} (RLIMIT_NOFILE; "
                    f"this one takes it over): raise the limit (LimitNOFILE=, ulimit -Hn) "
                    f"or run fewer processes"
                )
                self.problems.append(self.documents[program.name].problem(key, message))
                return

    def check_log_files_unshared(self) -> None:
        writers: dict[Path, str] = {}
        for program in self.programs.values():
            if program.name in self.clashing:
                continue  # its log files clash too; one problem is enough
            for process_name in program.process_names():
                for stream in ("stdout", "stderr"):
                    path = program.log_path(process_name, stream)
                    if path is None or _is_stream_path(path):
                        continue
                    key = ("programs", program.name, f"{stream}_logfile")
                    if path in writers and writers[path] != _format_key(key):
                        message = f"log file {path} is also written by {writers[path]}"
                        self.problems.append(self.documents[program.name].problem(key, message))
                    writers.setdefault(path, _format_key(key))

    def inherit_environment(self, environment: Mapping[str, str]) -> None:
        """[supervisor] environment under each program's own (a reload that changes it
        changes every program that sees the difference)."""
        if not environment:
            return
        for name, program in self.programs.items():
            merged = {**environment, **program.environment}
            self.programs[name] = program.model_copy(update={"environment": merged})


def _fds_per_process(program: ProgramConfig) -> int:
    """A running process's fds in the daemon: its output pipes, and the socket of a
    ready or health probe in flight (one at a time: ready while STARTING, health after)."""
    pipes = 1 if program.redirect_stderr else 2
    probes = [c for c in (program.ready, program.health) if c is not None]
    return pipes + (1 if any(c.kind in ("tcp", "http", "exec") for c in probes) else 0)


def _without_duplicates_of(hints: list[Problem], problems: list[Problem]) -> list[Problem]:
    """A hint for supervisord syntax says more than pydantic's view of the same value."""
    hinted = {(hint.file, hint.key) for hint in hints}

    def covered(problem: Problem) -> bool:
        return any(
            problem.file == file
            and (problem.key == key or problem.key.startswith((key + ".", key + "[")))
            for file, key in hinted
        )

    return hints + [problem for problem in problems if not covered(problem)]


def load(path: str | Path, environ: Mapping[str, str] | None = None) -> Config:
    """Read, validate and resolve the config file at path and every file it includes.

    environ (default: os.environ) is supd's environment: it gives ${VAR} expansions and
    $RUNTIME_DIRECTORY for the default socket. Raises ConfigError listing every problem
    found, in every file.
    """
    environ = os.environ if environ is None else environ
    main_path = _normalised(Path.cwd(), path)
    problems: list[Problem] = []
    main = _read_document(main_path, problems)
    if main is None:
        raise ConfigError(problems)
    _check_top_level(main, ("supervisor", "programs", "groups"), problems)
    supervisor = _validate_supervisor(main, environ, problems)
    log_dir = supervisor.log_dir if supervisor else main_path.parent / "logs"
    defaults = {"log_timestamps": supervisor.log_timestamps} if supervisor else {}
    loader = _Loader(log_dir=log_dir, environ=environ, program_defaults=defaults)
    documents = [main]
    for include_path in _included_files(main_path, _include_patterns(main)):
        included = _read_document(include_path, loader.problems)
        if included is not None:
            _check_top_level(included, ("programs", "groups"), loader.problems)
            documents.append(included)
    hints = [hint for document in documents for hint in _supervisord_syntax_problems(document)]
    for document in documents:
        loader.add_groups_from(document)
    for document in documents:
        loader.add_programs_from(document)
    loader.check_groups()
    loader.check_names_unique()
    loader.check_log_files_unshared()
    if loader.check_process_total():  # (over the total, the fd count says nothing new)
        metrics = supervisor is not None and supervisor.metrics is not None
        loader.check_fd_budget(FD_RESERVE + (METRICS_FD_RESERVE if metrics else 0))
    loader.check_dependencies()
    problems.extend(loader.problems)
    problems = _without_duplicates_of(hints, problems)
    if problems or supervisor is None:
        raise ConfigError(_in_reading_order(problems, main_path))
    loader.inherit_environment(supervisor.environment)
    return Config(main_path, supervisor, loader.programs, loader.sources, loader.groups)


def find_cycles(edges: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Each cycle of the graph once, as its members in edge order, starting from the
    first one in `edges`' order (so the message points at a stable place).

    Tarjan's strongly connected components; a component of several nodes is a cycle
    (every member named), and so is one node with an edge to itself.
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = itertools.count()

    def visit(root: str) -> None:
        # Iterative, so a long chain of dependencies cannot hit the recursion limit.
        work = [(root, iter(edges.get(root, ())))]
        index[root] = low[root] = next(counter)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = next(counter)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(edges.get(successor, ()))))
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    components.append(component)

    for node in edges:
        if node not in index:
            visit(node)
    order = {name: i for i, name in enumerate(edges)}
    cycles = []
    for component in components:
        if len(component) > 1 or component[0] in edges.get(component[0], ()):
            members = set(component)
            start = min(component, key=order.__getitem__)
            cycle, node = [start], start
            while True:  # walk edges inside the component, in config order
                following = [n for n in edges.get(node, ()) if n in members and n not in cycle]
                if not following:
                    break
                node = following[0]
                cycle.append(node)
            cycle += sorted(members - set(cycle), key=order.__getitem__)
            cycles.append(cycle)
    return sorted(cycles, key=lambda c: order[c[0]])


def _in_reading_order(problems: list[Problem], main_path: Path) -> list[Problem]:
    """Main file first, then includes in the order read; by line within a file."""
    file_order = {main_path: -1}
    for problem in problems:
        file_order.setdefault(problem.file, len(file_order))
    return sorted(problems, key=lambda p: (file_order[p.file], p.line or 0))


def summary(config: Config) -> str:
    """One line for `supd --check`."""
    programs = len(config.programs)
    processes = sum(program.numprocs for program in config.programs.values())
    included = len(set(config.sources.values()) - {config.path})
    files = f", {included} included file{'s' if included != 1 else ''}" if included else ""
    return (
        f"config OK: {programs} program{'s' if programs != 1 else ''}, "
        f"{processes} process{'es' if processes != 1 else ''} ({config.path}{files})"
    )


# ---------------------------------------------------------------------------
# The daemon's view: plain data (settings.py), never these models
# ---------------------------------------------------------------------------


def config_data(config: Config) -> dict[str, Any]:
    """The validated config as JSON data, each model without its defaults: what `supd
    --check --emit-json` prints and settings.settings_from_data reads."""

    def data(model: BaseModel) -> dict[str, Any]:
        dumped: dict[str, Any] = model.model_dump(mode="json", exclude_defaults=True)
        return dumped

    return {
        "path": str(config.path),
        "supervisor": data(config.supervisor),
        "programs": [data(program) for program in config.programs.values()],
        "sources": {name: str(path) for name, path in config.sources.items()},
        "groups": [data(group) for group in config.groups.values()],
    }


def check_result(path: str | Path, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """`supd --check --emit-json`: {"config": ...} or {"problems": [...]}."""
    try:
        config = load(path, environ)
    except ConfigError as exc:
        return {"problems": settings.problems_data(exc.problems)}
    return {"config": config_data(config)}


def to_settings(config: Config) -> settings.Settings:
    """The daemon's runtime objects for `config`, through the same plain data the
    checker prints."""
    return settings.settings_from_data(config_data(config))


def runtime(program: ProgramConfig) -> settings.Program:
    """One program as the daemon holds it."""
    return settings.build(settings.Program, program.model_dump(mode="json", exclude_defaults=True))
