"""The facts every side of supd must agree on, said once.

The daemon, the wire protocol and supctl all import these; so do config (the socket
path), spawn and notify (systemd's variables). This module imports the standard library
only, and only light parts of it, because supctl imports it on its fast start-up path.
"""

from __future__ import annotations

import enum
import os
import re
from collections.abc import Callable, Mapping
from typing import Final


class State(enum.StrEnum):
    """A process's state: supervisord's names and meanings (operators know them)."""

    STOPPED = "STOPPED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    BACKOFF = "BACKOFF"
    STOPPING = "STOPPING"
    EXITED = "EXITED"
    FATAL = "FATAL"


class ErrorCode(enum.IntEnum):
    """`error.code` values on the wire. Negative ones are JSON-RPC's own; positive ones
    are supd's. The per-process outcomes of start/stop/restart carry BAD_STATE or
    SUPERSEDED in their `code`. Scripts depend on these: never renumber."""

    PARSE_ERROR = -32700  # not JSON / not UTF-8
    INVALID_REQUEST = -32600  # JSON, but not a JSON-RPC 2.0 request object
    METHOD_NOT_FOUND = -32601
    INVALID_PARAMS = -32602  # error.data: list of "field: problem" strings
    INTERNAL_ERROR = -32603  # a bug in supd; the daemon keeps running
    NO_SUCH_PROCESS = 1  # a name matched no process or program
    BAD_STATE = 2  # the process did not reach its target: FATAL, a spawn error, exited
    PERMISSION_DENIED = 3  # the peer's uid/gid may not use the socket
    CONFIG_INVALID = 4  # reload refused; error.data: list of config problems
    SHUTTING_DOWN = 5  # the daemon is stopping and accepts no new work
    TOO_MANY_CONNECTIONS = 6  # the server is at max_connections
    REQUEST_TOO_LARGE = 7  # a line over the server's max_line; connection closed
    SUPERSEDED = 8  # a later conflicting command (or a reload, or shutdown) took over
    REEXEC_FAILED = 9  # the new supd could not take over; the running one carries on


# supctl's exit status. Scripts depend on these: never renumber.
EXIT_OK: Final = 0
EXIT_FAILED: Final = 1  # an operation failed (start ended FATAL, unknown name, ...)
EXIT_USAGE: Final = 2  # bad command line or config file
EXIT_NOT_RUNNING: Final = 3  # `status` found a named process (or any process) not RUNNING
EXIT_UNREACHABLE: Final = 4  # no daemon answered on the socket (or it stopped answering)
EXIT_TIMED_OUT: Final = 5  # --timeout expired while supd was still working on the request

# The daemon's own exit status besides 0: a bad config, or another supd serves the socket.
EXIT_CONFIG: Final = 2


# supctl's commands, in the order its help lists them, each with the control method it
# calls, said once: protocol.METHODS (what the daemon serves) and ctl.COMMANDS (what
# supctl offers, completion included) are both read from it. None: a command of supctl's
# own (supervisorctl's names built on other methods, and what needs no daemon). Here, not
# in protocol.py, because supctl must not import the protocol module (about 20 ms of
# start-up: its dataclasses).
COMMAND_METHODS: Final[tuple[tuple[str, str | None], ...]] = (
    ("status", "status"),
    ("start", "start"),
    ("stop", "stop"),
    ("restart", "restart"),
    ("signal", "signal"),
    ("reload", "reload"),
    ("tail", "tail"),
    ("logs", "logs"),
    ("maintail", "maintail"),
    ("pid", "pid"),
    ("version", "version"),
    ("shutdown", "shutdown"),
    ("wait", "wait"),
    ("why", "deaths"),
    ("clear", "clear"),
    ("metrics", "metrics"),
    ("usage", "usage"),
    ("avail", "avail"),
    ("reread", None),  # reload --dry-run
    ("update", None),  # reload
    ("fg", None),  # tail --follow, with signals passed on
    ("completion", None),  # prints a script: no daemon
    ("reexec", "reexec"),
    ("help", None),
)


SOCKET_NAME: Final = "supd.sock"


def socket_path(config_dir: str, value: str | None, environ: Mapping[str, str]) -> str:
    """Where the daemon of a config file in `config_dir` listens.

    `value` is the config's `[supervisor] socket` (None when absent): relative to the
    config's folder. Without it: $RUNTIME_DIRECTORY/supd.sock under systemd (several
    RuntimeDirectory= entries are joined with ":"; ours is the first), else supd.sock
    beside the config. Always absolute and lexically normalised, as every path in a
    config is (supervisord's normpath(abspath())). No "~" expansion.
    """
    if value is None:
        runtime = environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
        value = os.path.join(runtime, SOCKET_NAME) if runtime else SOCKET_NAME
    return os.path.normpath(os.path.join(os.path.abspath(config_dir), value))


# Variables systemd sets for the service's main process only (notify, watchdog, socket
# activation): supd takes them for itself, and a child that inherited them could talk
# to systemd in supd's name or grab its sockets.
SYSTEMD_ENVIRONMENT: Final = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
)

# Variables systemd sets to describe supd's service (its invocation, journal stream,
# MAINPID for ExecReload, its RuntimeDirectory= and friends, its credentials): true of
# supd, not of its programs. A program that is itself a supd would otherwise find its
# parent's socket through $RUNTIME_DIRECTORY. supd keeps them (its own socket default
# reads RUNTIME_DIRECTORY at every reload); children never get them.
SERVICE_ENVIRONMENT: Final = (
    "INVOCATION_ID",
    "JOURNAL_STREAM",
    "RUNTIME_DIRECTORY",
    "STATE_DIRECTORY",
    "LOGS_DIRECTORY",
    "CACHE_DIRECTORY",
    "CONFIGURATION_DIRECTORY",
    "CREDENTIALS_DIRECTORY",
    "MAINPID",
)

# What a child never inherits from supd's environment.
CHILD_PRIVATE_ENVIRONMENT: Final = SYSTEMD_ENVIRONMENT + SERVICE_ENVIRONMENT


_VARIABLE_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def expand_variables(
    text: str, environ: Mapping[str, str], quote: Callable[[str], str] = str
) -> str:
    """Replace ${VAR} and ${VAR:-default} from environ; $$ is a literal $.

    As in a shell, the default applies when VAR is unset or empty. quote() is applied to
    each substituted value (log paths escape their braces). A '$' followed by anything
    else stays as written. Raises ValueError naming the variable when it is unset and
    has no default, or when a ${ is malformed.
    """
    parts: list[str] = []
    index = 0
    while (dollar := text.find("$", index)) >= 0:
        parts.append(text[index:dollar])
        following = text[dollar + 1 : dollar + 2]
        if following != "{":
            parts.append("$")
            index = dollar + (2 if following == "$" else 1)
            continue
        end = text.find("}", dollar + 2)
        if end < 0:
            raise ValueError(f"unclosed ${{ in {text!r}; write $$ for a literal $")
        name, has_default, default = text[dollar + 2 : end].partition(":-")
        if not _VARIABLE_NAME.fullmatch(name):
            raise ValueError(
                f"{text[dollar : end + 1]!r} is not ${{VAR}} or ${{VAR:-default}}; "
                "write $$ for a literal $"
            )
        value = environ.get(name, "")
        if not value and name not in environ and not has_default:
            raise ValueError(
                f"${{{name}}} is not set in supd's environment; set it, or give a "
                f"default: ${{{name}:-default}}"
            )
        parts.append(quote(value if value or not has_default else default))
        index = end + 1
    parts.append(text[index:])
    return "".join(parts)
