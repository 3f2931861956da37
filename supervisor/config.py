"""Load and validate supd's TOML configuration.

This module imports only the standard library and pydantic: the daemon, the process
state machine and the control server all import it, never the other way round.

The file format (option names follow supervisord)::

    [supervisor]
    socket = "supd.sock"          # default: $RUNTIME_DIRECTORY/supd.sock, else beside this file
    socket_mode = "0600"          # octal; default "0600", or "0660" when socket_group is set
    socket_group = "admin"        # optional group owning the socket
    log_dir = "logs"              # default folder for program logs
    log_format = "auto"           # auto | console | json (the daemon's own log)
    log_level = "info"            # debug | info | warning | error
    include = ["conf.d/*.toml"]   # globs; included files may hold only [programs.*] tables
    subreaper = false             # become a child subreaper (automatic when PID 1)

    [programs.web]
    command = "python3 -m http.server"  # split like a shell would (no shell runs), or a list
    numprocs = 1                  # > 1 gives processes web:0 ... web:N-1
    ...                           # see ProgramConfig for every option and its default

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
  ``"none"`` (any case) discards the stream.
* Sizes are bytes, or strings with a KB/MB/GB suffix (1024-based, like supervisord).
* ``load`` reports every problem it finds, in every file, as a ``ConfigError`` whose
  lines read ``FILE:LINE: programs.web.startsecs: what is wrong``. tomllib gives no
  positions, so ``KeyLocator`` re-reads the text to find where each key was written.
"""

from __future__ import annotations

import difflib
import glob
import grp
import json
import os
import re
import shlex
import signal
import stat
import string
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

from . import signals
from .tomlkeys import KeyLocator, KeyPath

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python < 3.11
    import tomli as tomllib  # type: ignore[no-redef, import-not-found, unused-ignore]

__all__ = [
    "Config",
    "ConfigError",
    "Problem",
    "ProgramConfig",
    "Stream",
    "SupervisorConfig",
    "load",
    "summary",
]

Stream = Literal["stdout", "stderr"]

# Durations end up in timerfds; a year is far beyond any sane setting and far from
# any overflow.
MAX_SECONDS = 365 * 24 * 3600.0
DEFAULT_LOG_MAXBYTES = 50 * 1024 * 1024
DEFAULT_LOG_BACKUPS = 10
# sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107
# numprocs bounds: 200,000 processes froze the loop for 2.5 s and made a 40 MB status.
MAX_NUMPROCS = 1000  # per program
MAX_PROCESSES = 10000  # in all programs together

_PROGRAM_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_LOG_PLACEHOLDERS = frozenset({"process_name", "program", "process_num"})
_PER_PROCESS_PLACEHOLDERS = frozenset({"process_name", "process_num"})
_SIZE = re.compile(r"(\d+)\s*(KB|MB|GB|B)?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}
_AUTORESTART_ALIASES = {"true": "always", "false": "never", "unexpected": "on-failure"}

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


def _reject_nul(text: str) -> str:
    if "\0" in text:
        raise ValueError("must not contain a NUL character")
    return text


def _normalised(base_dir: Path, path: str | Path) -> Path:
    """Absolute and lexically normalised, like supervisord's normpath(abspath())."""
    return Path(os.path.normpath(base_dir / path))


def _template_fields(template: str) -> set[str]:
    """Names of the {placeholders} in a log file template; ValueError if malformed."""
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


def _check_log_template(template: str) -> None:
    try:
        names = _template_fields(template)
        unknown = names - _LOG_PLACEHOLDERS
        if not unknown:
            template.format(process_name="x:0", program="x", process_num=0)
    except (ValueError, TypeError, KeyError, IndexError) as error:
        raise ValueError(f"bad placeholder in log file path ({error}); {_BRACES_HINT}") from None
    if unknown:
        names_text = ", ".join("{" + name + "}" for name in sorted(unknown))
        raise ValueError(f"unknown placeholder {names_text} in log file path; {_BRACES_HINT}")


_BRACES_HINT = "use {process_name}, {program} or {process_num}, and {{ }} for literal braces"


# ---------------------------------------------------------------------------
# Validation context: where relative paths start, and the environment
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Context:
    base_dir: Path  # folder of the file being validated
    log_dir: Path  # [supervisor] log_dir, for default program log paths
    environ: Mapping[str, str]


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


_MODEL_CONFIG = ConfigDict(extra="forbid", frozen=True, strict=True)

Seconds = Annotated[float, Field(ge=0, le=MAX_SECONDS, allow_inf_nan=False)]
ByteCount = Annotated[int, Field(ge=0)]
NonEmptyStr = Annotated[str, Field(min_length=1)]
ExitCode = Annotated[int, Field(ge=0, le=255)]

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
    include: tuple[NonEmptyStr, ...] = ()  # glob patterns as written, relative to the file
    subreaper: bool = False

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

    @field_validator("socket", "log_dir", mode="before")
    @classmethod
    def _resolve_path(cls, value: Any, info: ValidationInfo) -> Any:
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


def _default_socket(context: _Context) -> Path:
    # systemd joins several RuntimeDirectory= entries with ':'; the first is ours.
    runtime_dir = context.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if runtime_dir:
        return _normalised(context.base_dir, runtime_dir) / "supd.sock"
    return context.base_dir / "supd.sock"


class ProgramConfig(BaseModel):
    """One [programs.NAME] table. Frozen; == compares every option, which is how a
    reload tells changed programs from unchanged ones.

    Log files are stored as absolute path templates (see the module docstring) or None
    to discard; use log_path() to get a process's file.
    """

    model_config = _MODEL_CONFIG

    name: str
    command: tuple[str, ...]
    numprocs: int = Field(default=1, ge=1, le=MAX_NUMPROCS)
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
    stopsignal: int = int(signal.SIGTERM)
    stopwaitsecs: Seconds = 10.0
    killasgroup: bool = True
    redirect_stderr: bool = False
    # The loader always fills these two in ({log_dir}/{process_name}.out.log, .err.log).
    stdout_logfile: str | None = None
    stdout_logfile_maxbytes: ByteCount = DEFAULT_LOG_MAXBYTES
    stdout_logfile_backups: int = Field(default=DEFAULT_LOG_BACKUPS, ge=0)
    stderr_logfile: str | None = None
    stderr_logfile_maxbytes: ByteCount = DEFAULT_LOG_MAXBYTES
    stderr_logfile_backups: int = Field(default=DEFAULT_LOG_BACKUPS, ge=0)

    # The environment dict makes pydantic's generated hash fail; equal configs share
    # name and command, so hashing those keeps hash consistent with ==.
    def __hash__(self) -> int:
        return hash((self.name, self.command))

    def process_names(self) -> list[str]:
        """["web"] for numprocs = 1, else ["web:0", "web:1", ...]."""
        if self.numprocs == 1:
            return [self.name]
        return [f"{self.name}:{index}" for index in range(self.numprocs)]

    def log_path(self, process_name: str, stream: Stream) -> Path | None:
        """Absolute log file of one process's stream; None means discard it (or, for
        stderr with redirect_stderr, that stderr shares the stdout pipe)."""
        if stream == "stderr" and self.redirect_stderr:
            return None
        template = self.stdout_logfile if stream == "stdout" else self.stderr_logfile
        if template is None:
            return None
        process_num = self._process_num(process_name)
        return Path(
            template.format(process_name=process_name, program=self.name, process_num=process_num)
        )

    def log_maxbytes(self, stream: Stream) -> int:
        """Rotate when the file would exceed this size; 0 disables rotation."""
        if stream == "stdout":
            return self.stdout_logfile_maxbytes
        return self.stderr_logfile_maxbytes

    def log_backups(self, stream: Stream) -> int:
        """How many rotated files (NAME.1 ... NAME.N) to keep."""
        return self.stdout_logfile_backups if stream == "stdout" else self.stderr_logfile_backups

    def _process_num(self, process_name: str) -> int:
        if self.numprocs == 1 and process_name == self.name:
            return 0
        program, _, number = process_name.rpartition(":")
        valid = program == self.name and number.isdigit() and str(int(number)) == number
        if valid and int(number) < self.numprocs:
            return int(number)
        raise ValueError(f"{process_name!r} is not a process of {self.name!r}")

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

    @field_validator("command", mode="before")
    @classmethod
    def _split_command(cls, value: Any) -> Any:
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
        return _path_input(value, info)

    @field_validator("environment", mode="before")
    @classmethod
    def _stringify_environment(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {key: _stringify_env_value(item) for key, item in value.items()}
        return value

    @field_validator("environment")
    @classmethod
    def _valid_environment(cls, value: dict[str, str]) -> dict[str, str]:
        for key, item in value.items():
            if "=" in key or "\0" in key:
                raise ValueError(f"variable name {key!r} must not contain '=' or NUL")
            if "\0" in item:
                raise ValueError(f"value of {key} must not contain a NUL character")
        return value

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

    @field_validator("stdout_logfile", "stderr_logfile", mode="before")
    @classmethod
    def _resolve_logfile(cls, value: Any, info: ValidationInfo) -> Any:
        if not isinstance(value, str):
            return value
        if value.strip().lower() == "none":
            return None
        path = _path_input(value, info)
        _check_log_template(str(path))
        return str(path)

    # -- defaults and cross-field rules --------------------------------------

    @model_validator(mode="wrap")
    @classmethod
    def _defaults_and_cross_checks(
        cls, data: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo
    ) -> Any:
        if not isinstance(data, dict):
            return handler(data)
        program = handler({**_default_logfiles(_context(info).log_dir), **data})
        problems = program._shared_log_problems(explicit_stderr="stderr_logfile" in data)
        if problems:
            raise _OptionProblems(problems)
        return program

    def _shared_log_problems(self, explicit_stderr: bool) -> list[tuple[str, str]]:
        """Each log file must have exactly one writer, and no option may be dead."""
        problems: list[tuple[str, str]] = []
        if self.redirect_stderr and explicit_stderr and self.stderr_logfile is not None:
            problems.append(("stderr_logfile", _REDIRECTED_STDERR_LOGFILE))
        streams = ["stdout"] if self.redirect_stderr else ["stdout", "stderr"]
        for stream in streams:
            template = getattr(self, f"{stream}_logfile")
            if self.numprocs > 1 and template is not None and not _per_process(template):
                message = f"numprocs = {self.numprocs} but {_SHARED_BY_PROCESSES}"
                problems.append((f"{stream}_logfile", message))
        same_file = self.stdout_logfile is not None and self.stdout_logfile == self.stderr_logfile
        if same_file and not self.redirect_stderr:
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


def _per_process(template: str) -> bool:
    return bool(_template_fields(template) & _PER_PROCESS_PLACEHOLDERS)


def _default_logfiles(log_dir: Path) -> dict[str, str]:
    folder = str(log_dir).replace("{", "{{").replace("}", "}}")
    return {
        "stdout_logfile": f"{folder}/{{process_name}}.out.log",
        "stderr_logfile": f"{folder}/{{process_name}}.err.log",
    }


@dataclass(frozen=True)
class Config:
    """A whole validated configuration."""

    path: Path  # absolute path of the main file
    supervisor: SupervisorConfig
    programs: dict[str, ProgramConfig]  # in definition order: main file, then includes
    sources: dict[str, Path] = field(default_factory=dict)  # program name -> its file


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


def _validate_program(
    document: _Document, name: str, table: object, log_dir: Path, problems: list[Problem]
) -> ProgramConfig | None:
    path = ("programs", name)
    if not isinstance(table, dict):
        problems.append(document.problem(path, "should be a table: [programs.NAME]"))
        return None
    if "name" in table:
        message = "unknown option (a program is named by its table, [programs.NAME])"
        problems.append(document.problem((*path, "name"), message))
        table = {key: value for key, value in table.items() if key != "name"}
    context = _Context(base_dir=document.path.parent, log_dir=log_dir, environ={})
    try:
        return ProgramConfig.model_validate({**table, "name": name}, context=context)
    except ValidationError as error:
        problems.extend(_problems_from(error, document, path, ProgramConfig))
        return None


def _check_top_level(
    document: _Document, allowed: tuple[str, ...], problems: list[Problem]
) -> None:
    for key, value in document.data.items():
        if key in allowed:
            if not isinstance(value, dict):
                problems.append(document.problem((key,), f"should be a table: [{key}]"))
            continue
        if len(allowed) == 1:
            message = "an included file may contain only [programs.NAME] tables"
        else:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean [{close[0]}]?)" if close else ""
            message = f"unknown table; supd reads [supervisor] and [programs.NAME]{hint}"
        problems.append(document.problem((key,), message))


def _program_tables(document: _Document) -> dict[str, object]:
    programs = document.data.get("programs", {})
    return programs if isinstance(programs, dict) else {}


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
    """Collects programs and problems across the main file and its includes."""

    log_dir: Path
    problems: list[Problem] = field(default_factory=list)
    programs: dict[str, ProgramConfig] = field(default_factory=dict)
    sources: dict[str, Path] = field(default_factory=dict)
    documents: dict[str, _Document] = field(default_factory=dict)  # where each name was defined

    def add_programs_from(self, document: _Document) -> None:
        for name, table in _program_tables(document).items():
            first = self.documents.get(name)
            if first is not None:
                where = f"{first.path}:{first.locator.line_of(('programs', name)) or '?'}"
                message = f"program defined more than once (first in {where})"
                self.problems.append(document.problem(("programs", name), message))
                continue
            self.documents[name] = document
            program = _validate_program(document, name, table, self.log_dir, self.problems)
            if program is not None:
                self.programs[name] = program
                self.sources[name] = document.path

    def check_process_total(self) -> None:
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
                return

    def check_log_files_unshared(self) -> None:
        writers: dict[Path, str] = {}
        for program in self.programs.values():
            for process_name in program.process_names():
                for stream in ("stdout", "stderr"):
                    path = program.log_path(process_name, stream)
                    if path is None:
                        continue
                    key = ("programs", program.name, f"{stream}_logfile")
                    if path in writers and writers[path] != _format_key(key):
                        message = f"log file {path} is also written by {writers[path]}"
                        self.problems.append(self.documents[program.name].problem(key, message))
                    writers.setdefault(path, _format_key(key))


def load(path: str | Path, environ: Mapping[str, str] | None = None) -> Config:
    """Read, validate and resolve the config file at path and every file it includes.

    environ supplies $RUNTIME_DIRECTORY for the default socket (default: os.environ).
    Raises ConfigError listing every problem found, in every file.
    """
    main_path = _normalised(Path.cwd(), path)
    problems: list[Problem] = []
    main = _read_document(main_path, problems)
    if main is None:
        raise ConfigError(problems)
    _check_top_level(main, ("supervisor", "programs"), problems)
    supervisor = _validate_supervisor(main, os.environ if environ is None else environ, problems)
    loader = _Loader(log_dir=supervisor.log_dir if supervisor else main_path.parent / "logs")
    loader.add_programs_from(main)
    for include_path in _included_files(main_path, _include_patterns(main)):
        included = _read_document(include_path, loader.problems)
        if included is not None:
            _check_top_level(included, ("programs",), loader.problems)
            loader.add_programs_from(included)
    loader.check_log_files_unshared()
    loader.check_process_total()
    problems.extend(loader.problems)
    if problems or supervisor is None:
        raise ConfigError(_in_reading_order(problems, main_path))
    return Config(main_path, supervisor, loader.programs, loader.sources)


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
