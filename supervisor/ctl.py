"""supctl: the command-line client of supd's control socket.

    supctl [-s SOCKET | -c CONFIG] [--json] [--timeout S] COMMAND [ARGS]
    supctl                      # interactive shell

supctl must start fast (a whole `supctl status` well under 200 ms, interpreter
included), so this module imports only light stdlib modules at import time: no
pydantic, no `supervisor.protocol`, no selector or ctypes. It speaks the protocol with
plain `json` and takes the few constants it needs from `facts`, which is stdlib-only.
tomllib is imported only with -c, readline only in the shell.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NoReturn, TextIO

from . import __version__, facts
from .facts import (
    EXIT_FAILED,
    EXIT_NOT_RUNNING,
    EXIT_OK,
    EXIT_TIMED_OUT,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    ErrorCode,
)

EXIT_INTERRUPTED = 130  # Ctrl-C outside of `tail -f`, as shells report it

# The error codes supctl treats specially.
INVALID_PARAMS = ErrorCode.INVALID_PARAMS
PERMISSION_DENIED = ErrorCode.PERMISSION_DENIED
CONFIG_INVALID = ErrorCode.CONFIG_INVALID
TOO_MANY_CONNECTIONS = ErrorCode.TOO_MANY_CONNECTIONS
SUPERSEDED = ErrorCode.SUPERSEDED
REEXEC_FAILED = ErrorCode.REEXEC_FAILED

# Calls that may be sent again when the connection drops before the answer (a re-exec
# disconnects every client): they change nothing.
IDEMPOTENT = frozenset({"status", "tail", "deaths", "pid", "version"})  # deaths: `why`
REEXEC_WAIT_S = 30.0  # how long `supctl reexec` waits for the new supd to answer
LOST = "connection lost"

DEFAULT_SOCKET = "/run/supd/supd.sock"
SOCKET_ENV = "SUPD_SOCKET"
HISTORY_FILE = "~/.supctl_history"

# No answer has a fixed deadline: a `stop` may rightly take stopwaitsecs (and a `start`
# startsecs and its retries). While an answer is awaited, supd is probed with a
# `version` call on a second connection every PROBE_INTERVAL_S; it is "unreachable"
# only when a connect or a probe gets no answer within PROBE_TIMEOUT_S.
PROBE_INTERVAL_S = 2.0
PROBE_TIMEOUT_S = 10.0

EXIT_STATUS_HELP = f"""\
exit status:
  {EXIT_OK}    success
  {EXIT_FAILED}    an operation failed (a start ended FATAL, an unknown name, ...)
  {EXIT_USAGE}    usage error (command line or config file)
  {EXIT_NOT_RUNNING}    status: a process is not RUNNING
  {EXIT_UNREACHABLE}    no daemon: cannot connect, or it stopped answering
  {EXIT_TIMED_OUT}    --timeout expired before the answer came (supd may still finish)
  {EXIT_INTERRUPTED}  interrupted with Ctrl-C (outside tail -f)"""

# supervisorctl commands supd has no method for: what to do instead.
NOT_IN_SUPD = {
    "add": "programs come from the config: add the [programs.NAME] table, then `supctl reload`",
    "remove": "programs come from the config: delete the [programs.NAME] table, then"
    " `supctl reload`",
}

COMMANDS = tuple(command for command, _ in facts.COMMAND_METHODS)  # (and the methods)
SHELL_ONLY = ("quit", "exit")
NAMES_HELP = "process, program, PROGRAM:*, glob, or 'all'"
DEFAULT_TAIL_LINES = 10


class UsageError(Exception):
    """Bad command line or config file: exit 2."""


class ArgumentsError(UsageError):
    """argparse found the command line wrong (its usage line goes with the message)."""

    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message)
        self.parser = parser
        self.message = message


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises ArgumentsError instead of printing and exiting, so
    that `--json` can report usage errors as JSON and the shell can carry on."""

    def error(self, message: str) -> NoReturn:
        raise ArgumentsError(self, message)

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extra = super().parse_known_args(args, namespace)
        if getattr(parsed, "command", None) == "tail" and hasattr(parsed, "words"):
            _tail_names(self, parsed)
        return parsed, extra


def _tail_names(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """`tail NAME [stdout|stderr]`, or with -f several: `tail -f web db [stderr]`."""
    words = list(args.words)
    args.stream = "stdout"
    if len(words) > 1 and words[-1] in ("stdout", "stderr"):
        args.stream = words.pop()
    if len(words) > 1 and not args.follow:
        parser.error(
            f"tail shows one process: NAME [stdout|stderr] (got {' '.join(args.words)}); "
            "follow several with -f"
        )
    if args.since is not None and args.bytes is not None:
        parser.error("give -c or --since, not both")
    args.name, args.names = words[0], words


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _duration(text: str) -> float:
    """ "10m", "2h", "1d", "90s" or plain seconds."""
    unit = text[-1:].lower()
    number = text[:-1] if unit in _DURATION_UNITS else text
    value = float(number) * _DURATION_UNITS.get(unit, 1)
    if not value >= 0 or value == float("inf"):
        raise ValueError(text)
    return value


class Unreachable(Exception):
    """No daemon answered: exit 4, naming the socket and why."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"cannot reach supd at {path}: {reason}")
        self.path = path
        self.reason = reason


class TimedOut(Exception):
    """--timeout expired before the answer came: exit 5."""

    def __init__(self, method: str, timeout_s: float) -> None:
        super().__init__(
            f"no answer to {method} within --timeout {timeout_s:g} s; supd may still"
            " carry it out (see supctl status)"
        )


class _Silence(Exception):
    """No answer yet by the deadline of one read (internal to Client)."""


class RpcError(Exception):
    """The daemon answered with a JSON-RPC error."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data


# --------------------------------------------------------------------------- socket path


def resolve_socket(
    socket_arg: str | None, config_arg: str | None, environ: Mapping[str, str]
) -> str:
    """-s, else $SUPD_SOCKET, else the config file's socket (-c), else the default."""
    if socket_arg:
        return socket_arg
    if environ.get(SOCKET_ENV):
        return environ[SOCKET_ENV]
    if config_arg:
        return socket_from_config(config_arg, environ)
    return DEFAULT_SOCKET


def socket_from_config(config_path: str, environ: Mapping[str, str]) -> str:
    """The [supervisor] socket key of a supd config, read with tomllib alone.

    A relative path is relative to the config file's folder. Without the key the daemon
    listens on $RUNTIME_DIRECTORY/supd.sock (systemd) or else on supd.sock beside the
    config. The pydantic config module is deliberately not imported: it is slow.
    """
    import tomllib

    try:
        with open(config_path, "rb") as file:
            document = tomllib.load(file)
    except OSError as exc:
        raise UsageError(f"cannot read config {config_path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        hint = ""
        if _looks_like_supervisord(config_path):
            hint = "; this looks like a supervisord config (INI): convert it with `supd import`"
        raise UsageError(f"config {config_path} is not valid TOML: {exc}{hint}") from None
    section = document.get("supervisor", {})
    value = section.get("socket") if isinstance(section, dict) else None
    if value is not None and (not isinstance(value, str) or not value):
        raise UsageError(f"config {config_path}: supervisor.socket must be a path")
    if value is not None:
        try:
            value = facts.expand_variables(value, environ)  # ${VAR}, as the daemon reads it
        except ValueError as exc:
            raise UsageError(f"config {config_path}: supervisor.socket: {exc}") from None
    return facts.socket_path(os.path.dirname(os.path.abspath(config_path)), value, environ)


def _looks_like_supervisord(config_path: str) -> bool:
    """An INI file with supervisord's sections (what `supd -c` recognises too)."""
    try:
        with open(config_path, errors="replace") as file:
            text = file.read(1 << 16)
    except OSError:
        return False
    return any(
        line.strip().startswith(("[supervisord]", "[program:", "[group:", "[include]"))
        for line in text.splitlines()
    )


# --------------------------------------------------------------------------- the client


# What each method's result must look like before supctl uses it: a list of objects
# with these keys, or an object with these keys (protocol_models.RESULT_ADAPTERS, in short).
_RESULT_SHAPES: dict[str, tuple[type, tuple[str, ...]]] = {
    "status": (list, ("name", "state")),
    "start": (list, ("name", "ok")),
    "stop": (list, ("name", "ok")),
    "restart": (list, ("name", "ok")),
    "signal": (list, ("name", "ok")),
    "reload": (dict, ()),
    "tail": (dict, ("name", "stream", "data")),
    "logs": (list, ("name", "stream", "destination")),
    "maintail": (dict, ("data",)),
    "pid": (dict, ("pid",)),
    "version": (dict, ("version", "pid")),
    "shutdown": (dict, ()),
    "wait": (list, ("name", "ok")),
    "deaths": (dict, ("name", "state", "next", "deaths")),
    "clear": (list, ("name", "ok")),
    "metrics": (dict, ("text",)),
    "usage": (list, ("name",)),
    "avail": (list, ("program", "processes")),
    "reexec": (dict, ("pid", "generation")),
}


def result_shape_problem(method: str, result: Any) -> str | None:
    """Why `result` is not a valid answer to `method`, or None."""
    kind, keys = _RESULT_SHAPES.get(method, (object, ()))
    if not isinstance(result, kind):
        return f"the result of {method} should be a JSON {kind.__name__}"
    items = result if isinstance(result, list) else [result]
    for item in items:
        if not isinstance(item, dict) or any(key not in item for key in keys):
            return f"the result of {method} lacks {', '.join(keys)}"
    return None


def _connect_reason(exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no such file (is supd running?)"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (stale socket: supd is not running)"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, TimeoutError):
        return "timed out connecting"
    return (exc.strerror or str(exc)).lower()


def peer_uid_problem(sock: socket.socket, trusted: Sequence[int] = ()) -> str | None:
    """Why not to talk to the process behind `sock`, or None (SO_PEERCRED).

    root and our own user are trusted; anyone else could have put a socket at the path
    (an impostor) unless `--trust-uid` names them.
    """
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", raw)
    if uid in (0, os.geteuid()) or uid in trusted:
        return None
    return (
        f"it is served by uid {uid} (pid {pid}), neither root nor you: "
        f"if that is supd, pass --trust-uid {uid}"
    )


class Client:
    """A blocking JSON-RPC client on one connection.

    `timeout_s` bounds each wait on an unresponsive daemon (connecting, or a probe's
    answer). A call waits for its answer as long as supd keeps answering probes, or
    until `limit_s` (--timeout); `progress` is updated after each good probe and
    cleared when the call ends. `trusted_uids`: besides root and the caller, the
    uids a daemon may run as (--trust-uid).
    """

    def __init__(
        self,
        path: str,
        timeout_s: float | None,
        *,
        limit_s: float | None = None,
        progress: Progress | None = None,
        trusted_uids: Sequence[int] = (),
    ) -> None:
        self.path = path
        self.timeout_s = timeout_s
        self.limit_s = limit_s
        self.progress = progress
        self.trusted_uids = tuple(trusted_uids)
        self._sock: socket.socket | None = None
        self._buffer = bytearray()
        self._next_id = 1

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # A daemon with a full accept backlog makes connect() block: bound it too.
        sock.settimeout(self.timeout_s)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            raise Unreachable(self.path, _connect_reason(exc)) from None
        try:
            distrust = peer_uid_problem(sock, self.trusted_uids)
        except OSError as exc:
            distrust = f"cannot tell who serves it ({exc.strerror})"
        if distrust is not None:
            sock.close()
            raise Unreachable(self.path, distrust)
        self._sock = sock

    def call(self, method: str, params: dict[str, Any] | None = None, probe: bool = True) -> Any:
        """Send one request and return its result; RpcError for an error answer.

        Once supd has the request there is no fixed deadline: every PROBE_INTERVAL_S
        without an answer, a `version` call on a second connection checks that supd
        still answers (Unreachable if not), until `limit_s` (TimedOut). With `probe`
        False, the answer must come within `timeout_s` (Unreachable if not).
        """
        if self._sock is None:
            self.connect()
        request_id = self._next_id
        self._next_id += 1
        request = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params or {}}
        started = time.monotonic()
        limit = None if self.limit_s is None else started + self.limit_s
        if not probe:
            limit = None if self.timeout_s is None else started + self.timeout_s
        line = json.dumps(request).encode() + b"\n"
        self._send(line)
        try:
            return self._await_answer(method, request_id, started, limit, probe)
        except Unreachable as exc:
            if method not in IDEMPOTENT or not exc.reason.startswith(LOST):
                raise
            # The connection dropped before the answer (supd re-exec'd, say): once more,
            # on a fresh connection; a re-exec'd supd answers from the same socket.
            self.close()
            self._buffer.clear()
            self.connect()
            self._send(line)
            return self._await_answer(method, request_id, time.monotonic(), limit, probe)
        finally:
            if self.progress is not None:
                self.progress.clear()

    def _await_answer(
        self, method: str, request_id: int, started: float, limit: float | None, probe: bool
    ) -> Any:
        while True:
            deadline = time.monotonic() + PROBE_INTERVAL_S if probe else None
            if limit is not None:
                deadline = limit if deadline is None else min(deadline, limit)
            try:
                message = self._read_message(deadline)
            except _Silence:
                now = time.monotonic()
                if not probe:
                    raise Unreachable(self.path, self._timeout_reason()) from None
                if limit is not None and now >= limit:
                    raise TimedOut(method, self.limit_s or 0.0) from None
                self._probe()
                if self.progress is not None:
                    self.progress.update(time.monotonic() - started)
                continue
            if "method" in message:
                continue  # a notification from an earlier follow: not our answer
            if message.get("id") in (request_id, None):
                result = self._unwrap(message)
                problem = result_shape_problem(method, result)
                if problem is not None:
                    raise Unreachable(self.path, f"invalid answer ({problem})")
                return result

    def _probe(self) -> None:
        """Unreachable unless supd answers a `version` call within PROBE_TIMEOUT_S."""
        try:
            with Client(self.path, PROBE_TIMEOUT_S, trusted_uids=self.trusted_uids) as prober:
                prober.call("version", probe=False)
        except Unreachable as exc:
            raise Unreachable(self.path, f"supd stopped answering ({exc.reason})") from None
        except RpcError:
            pass  # an error answer is an answer

    def follow_streams(
        self, name: str, streams: Sequence[str], lines: int
    ) -> Iterator[dict[str, Any]]:
        """Follow several streams of one process on this connection: every request goes
        out before any answer is read. Yields the tails, then `output` params."""
        waiting: set[int] = set()
        for stream in streams:
            request_id = self._next_id
            self._next_id += 1
            waiting.add(request_id)
            params = {"name": name, "stream": stream, "follow": True, "lines": lines}
            request = {"jsonrpc": "2.0", "id": request_id, "method": "tail", "params": params}
            if self._sock is None:
                self.connect()
            self._send(json.dumps(request).encode() + b"\n")
        while True:
            message = self._read_message(None)
            if "method" in message:
                if message.get("method") == "output" and isinstance(message.get("params"), dict):
                    yield message["params"]
            elif message.get("id") in waiting:
                waiting.discard(message["id"])
                result = self._unwrap(message)
                if isinstance(result, dict):
                    yield result

    def notifications(self) -> Iterator[dict[str, Any]]:
        """Server notifications, forever (no deadline): `tail -f`."""
        while True:
            message = self._read_message(None)
            if "method" in message:
                yield message

    def _unwrap(self, message: dict[str, Any]) -> Any:
        if "error" in message:
            error = message["error"] if isinstance(message["error"], dict) else {}
            code = error.get("code", 0)
            text = str(error.get("message", "unknown error"))
            if code in (PERMISSION_DENIED, TOO_MANY_CONNECTIONS) and message.get("id") is None:
                # Refused at accept: the daemon is there, but not for us.
                raise Unreachable(self.path, text)
            raise RpcError(code, text, error.get("data"))
        return message.get("result")

    def _send(self, data: bytes) -> None:
        assert self._sock is not None
        try:
            self._sock.sendall(data)
        except TimeoutError:
            raise Unreachable(self.path, self._timeout_reason()) from None
        except OSError as exc:
            # The daemon may have refused us (permission denied, too many connections)
            # and closed before we sent: its error line is still there to read.
            self._raise_refusal()
            raise Unreachable(self.path, f"connection lost ({exc.strerror})") from None

    def _raise_refusal(self) -> None:
        try:
            message = self._read_message(time.monotonic() + 1.0)
        except (Unreachable, _Silence):
            return
        self._unwrap(message)

    def _read_message(self, deadline: float | None) -> dict[str, Any]:
        while True:
            newline = self._buffer.find(b"\n")
            if newline >= 0:
                line = bytes(self._buffer[:newline])
                del self._buffer[: newline + 1]
                return self._decode(line)
            self._buffer += self._recv(deadline)

    def _recv(self, deadline: float | None) -> bytes:
        assert self._sock is not None
        if deadline is None:
            self._sock.settimeout(None)
        else:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Silence()
            self._sock.settimeout(remaining)
        try:
            chunk = self._sock.recv(1 << 16)
        except TimeoutError:
            raise _Silence() from None
        except OSError as exc:
            raise Unreachable(self.path, f"{LOST} ({exc.strerror})") from None
        if not chunk:
            raise Unreachable(self.path, f"{LOST}: supd closed the connection")
        return chunk

    def _timeout_reason(self) -> str:
        return f"no answer within {self.timeout_s:g} s"

    def _decode(self, line: bytes) -> dict[str, Any]:
        try:
            message = json.loads(line)
        except ValueError:
            raise Unreachable(self.path, "invalid answer (not JSON)") from None
        if not isinstance(message, dict):
            raise Unreachable(self.path, "invalid answer (not a JSON object)")
        return message


# --------------------------------------------------------------------------- output


_COLOURS = {
    "RUNNING": "32",  # green
    "STARTING": "33",  # yellow
    "STOPPING": "33",
    "BACKOFF": "33",
    "EXITED": "31",  # red
    "FATAL": "1;31",  # bold red
}
STATE_WIDTH = 10  # "STARTING" and "STOPPING" plus a gap


def wants_colour(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """Colour only on a terminal, and never when NO_COLOR is set (no-color.org)."""
    if environ.get("NO_COLOR"):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def format_status_table(
    rows: Sequence[dict[str, Any]], colour: bool = False, *, long: bool = False
) -> list[str]:
    """Aligned `name  STATE  description` lines, like supervisorctl's; with `long`,
    CPU% and RSS columns (from each row's "usage") after the state."""
    if not rows:
        return []
    name_width = max(len(str(row.get("name", ""))) for row in rows) + 3
    lines = []
    if long:
        lines.append(f"{'NAME'.ljust(name_width)}{'STATE'.ljust(STATE_WIDTH)}  CPU%      RSS  INFO")
    for row in rows:
        name = str(row.get("name", ""))
        state = str(row.get("state", ""))
        description = str(row.get("description") or row.get("spawn_error") or "")
        padded = state.ljust(STATE_WIDTH)
        if colour and state in _COLOURS:
            # Pad first, colour the word only: escapes must not count as width.
            padded = f"\x1b[{_COLOURS[state]}m{state}\x1b[0m" + " " * (STATE_WIDTH - len(state))
        if long:
            padded += _usage_columns(row.get("usage"))
        lines.append(f"{name.ljust(name_width)}{padded}{description}".rstrip())
    return lines


def _usage_columns(usage: Any) -> str:
    """` CPU%   RSS  ` for one row: "-" where nothing runs."""
    if not isinstance(usage, dict) or usage.get("rss_bytes") is None:
        return f"{'-':>6} {'-':>8}  "
    percent = usage.get("cpu_percent")
    cpu = "-" if percent is None else f"{float(percent):.1f}"
    return f"{cpu:>6} {format_bytes(int(usage['rss_bytes'])):>8}  "


def format_bytes(count: int) -> str:
    """1536 -> "1.5K", 25165824 -> "24.0M" (powers of 1024, like ps and top)."""
    value = float(count)
    for unit in ("B", "K", "M", "G"):
        if value < 1024 or unit == "G":
            return f"{int(value)}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}G"  # pragma: no cover


class Output:
    """Where results go: text for people, or JSON for scripts."""

    def __init__(self, out: TextIO, err: TextIO, *, as_json: bool, colour: bool) -> None:
        self.out = out
        self.err = err
        self.as_json = as_json
        self.colour = colour

    def line(self, text: str = "") -> None:
        self.out.write(text + "\n")

    def json(self, value: Any) -> None:
        self.out.write(json.dumps(value, indent=2) + "\n")

    def error(self, text: str) -> None:
        self.err.write(f"supctl: {text}\n")
        self.err.flush()

    def failure(self, code: int | str, message: str, data: Any = None) -> None:
        """An error that ends the command: text on stderr, or with --json the object
        {"error": {"code", "message"[, "data"]}} on stdout. `code` is the daemon's
        JSON-RPC code, or supctl's own: "usage", "unreachable", "timed_out"."""
        if not self.as_json:
            self.error(message)
            for item in data if isinstance(data, list) and code == CONFIG_INVALID else []:
                self.err.write(f"  {item}\n")
            return
        error: dict[str, Any] = {"code": code, "message": message}
        if data is not None:
            error["data"] = data
        self.json({"error": error})


class Progress:
    """A one-line "still waiting" note on a terminal's stderr, while supd works."""

    def __init__(self, err: TextIO, what: str) -> None:
        self.err = err
        self.what = what
        self.shown = False

    def update(self, elapsed_s: float) -> None:
        self.err.write(f"\rsupctl: {self.what}: supd is working on it ({elapsed_s:.0f} s)")
        self.err.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.err.write("\r\x1b[K")
            self.err.flush()
            self.shown = False


# --------------------------------------------------------------------------- commands


Handler = Callable[[Client, argparse.Namespace, Output], int]


def cmd_status(client: Client, args: argparse.Namespace, out: Output) -> int:
    params = {"names": args.names} if args.names else {}
    long = getattr(args, "long", False)
    rows = client.call("status", {**params, "accounting": True} if long else params)
    if long:
        usage = {str(u.get("name")): u for u in client.call("usage", params)}
        rows = [{**row, "usage": usage.get(str(row.get("name")))} for row in rows]
    if out.as_json:
        out.json(rows)
    else:
        long = getattr(args, "long", False)
        for line in format_status_table(rows, out.colour, long=long):
            out.line(line)
    all_running = all(row.get("state") == "RUNNING" for row in rows)
    return EXIT_OK if all_running else EXIT_NOT_RUNNING


_DONE = {"start": "started", "stop": "stopped", "restart": "restarted", "signal": "signalled"}


def _report_actions(method: str, results: list[dict[str, Any]], out: Output, waited: bool) -> int:
    if out.as_json:
        out.json(results)
    else:
        for item in results:
            name = item.get("name")
            if item.get("ok"):
                done = _DONE[method] if waited else f"{method} requested"
                out.line(f"{name}: {done}")
            elif item.get("code") == SUPERSEDED:
                out.line(f"{name}: SUPERSEDED ({item.get('error') or item.get('state')})")
            else:
                out.line(f"{name}: ERROR ({item.get('error') or item.get('state')})")
    return EXIT_OK if all(item.get("ok") for item in results) else EXIT_FAILED


def cmd_control(client: Client, args: argparse.Namespace, out: Output) -> int:
    results = client.call(args.command, {"names": args.names, "wait": args.wait})
    return _report_actions(args.command, results, out, args.wait)


def cmd_wait(client: Client, args: argparse.Namespace, out: Output) -> int:
    """Exit 0 once every process meets the condition; 1 at --timeout, or when one can
    no longer meet it (FATAL; an exit counted as failure, for completed)."""
    if args.wait_timeout is not None:
        client.limit_s = args.wait_timeout or None  # 0: no bound
    params = {"names": args.names, "condition": args.condition}
    try:
        results = client.call("wait", params)
    except TimedOut:
        out.failure("timed_out", f"not {args.condition} within {args.wait_timeout:g} s")
        return EXIT_FAILED
    if out.as_json:
        out.json(results)
        return EXIT_OK if all(item.get("ok") for item in results) else EXIT_FAILED
    for item in results:
        if item.get("ok"):
            out.line(f"{item.get('name')}: {args.condition}")
        else:
            out.line(f"{item.get('name')}: ERROR ({item.get('error') or item.get('state')})")
    return EXIT_OK if all(item.get("ok") for item in results) else EXIT_FAILED


def cmd_signal(client: Client, args: argparse.Namespace, out: Output) -> int:
    signal = int(args.signal) if args.signal.isdigit() else args.signal
    results = client.call("signal", {"signal": signal, "names": args.names})
    return _report_actions("signal", results, out, True)


def cmd_reload(client: Client, args: argparse.Namespace, out: Output) -> int:
    dry_run = bool(getattr(args, "dry_run", False))
    try:
        result = client.call("reload", {"dry_run": True} if dry_run else {})
    except RpcError as exc:
        if exc.code != CONFIG_INVALID:
            raise
        out.failure(exc.code, f"reload refused, nothing changed: {exc.message}", exc.data)
        return EXIT_FAILED
    if out.as_json:
        out.json(result)
        return EXIT_OK
    for line in reload_lines(result):
        out.line(line)
    return EXIT_OK


def reload_lines(result: dict[str, Any]) -> list[str]:
    """The reload report as the operator reads it: one line per process that changes
    (`web:0  restart  command: "a" → "b"`), a count of the unchanged, then the
    [supervisor] keys applied and those that need a re-exec. "no changes" only when
    nothing at all changed."""
    plan = [e for e in result.get("plan") or [] if isinstance(e, dict)]
    changing = [e for e in plan if e.get("step") != "unchanged"]
    lines = []
    if plan:
        width = max((len(str(e.get("name"))) for e in changing), default=0)
        for entry in changing:
            changes = [
                f"{c.get('key')}: {c.get('old')} → {c.get('new')}"
                for c in entry.get("changes") or []
                if isinstance(c, dict)
            ]
            text = f"{entry.get('name')!s:<{width}}  {entry.get('step')}"
            lines.append(f"{text}  {'; '.join(changes)}" if changes else text)
        unchanged = len(plan) - len(changing)
        if unchanged:
            lines.append(f"unchanged: {unchanged} process{'es' if unchanged != 1 else ''}")
    else:  # an older supd (programs only), or no process before or after
        lines += [
            f"{what}: {', '.join(map(str, result[what]))}"
            for what in ("added", "changed", "removed")
            if result.get(what)
        ]
    for change in result.get("supervisor") or []:
        if isinstance(change, dict):
            key, old, new = change.get("key"), change.get("old"), change.get("new")
            lines.append(f"[supervisor] {key}: {old} → {new}")
    for problem in result.get("not_applied") or []:
        lines.append(f"[supervisor] not applied: {problem}")
    if not [line for line in lines if not line.startswith("unchanged:")]:
        lines.append("no changes")
    if result.get("dry_run"):
        lines.append("(dry run: nothing changed)")
    return lines


def cmd_tail(client: Client, args: argparse.Namespace, out: Output) -> int:
    params: dict[str, Any] = {"name": args.name, "stream": args.stream, "follow": args.follow}
    if args.bytes is not None:
        params["bytes"] = args.bytes
    elif args.since is not None:
        params["since"] = args.since
        if args.lines is not None:
            raise UsageError("give -n or --since, not both")
    else:
        params["lines"] = DEFAULT_TAIL_LINES if args.lines is None else args.lines
    names = getattr(args, "names", None) or [args.name]
    if len(names) > 1 or _several(args.name):
        return _tail_several(client, {**params, "name": None, "names": names}, out)
    try:
        result = client.call("tail", params)
    except RpcError as exc:
        if exc.code != facts.ErrorCode.NO_SUCH_PROCESS or not args.follow:
            raise
        # A program or group of several processes: follow them all, merged.
        return _tail_several(client, {**params, "name": None, "names": names}, out)
    if not args.follow:
        _write_output(result, out)
        return EXIT_OK
    seen = _Seen()
    try:
        _write_output(result, out)
        seen.add(str(result.get("data", "")))
        while True:
            try:
                for message in client.notifications():
                    chunk = message.get("params")
                    if message.get("method") == "output" and isinstance(chunk, dict):
                        _write_output(chunk, out)
                        seen.add(str(chunk.get("data", "")))
            except Unreachable as exc:
                if not exc.reason.startswith(LOST):
                    raise
                # supd re-exec'd (or restarts): follow again, and print only what
                # comes after the last text already printed.
                client.close()
                again = _follow_again(client, params_for_resume(params), exc)
                _write_output({**again, "data": seen.after(str(again.get("data", "")))}, out)
                seen.add(str(again.get("data", "")))
    except KeyboardInterrupt:
        return EXIT_OK  # the normal way to stop following


TAIL_RESUME_BYTES = 64 * 1024  # what a reconnecting `tail -f` reads back to find its place
TAIL_RESUME_WAIT_S = 30.0


def params_for_resume(params: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": params["name"],
        "stream": params["stream"],
        "follow": True,
        "bytes": TAIL_RESUME_BYTES,
    }


def _follow_again(client: Client, params: dict[str, Any], lost: Unreachable) -> dict[str, Any]:
    deadline = time.monotonic() + TAIL_RESUME_WAIT_S
    while True:
        try:
            client.connect()
            result: dict[str, Any] = client.call("tail", params)
            return result
        except Unreachable:
            client.close()
            if time.monotonic() >= deadline:
                raise lost from None
            time.sleep(0.05)


class _Seen:
    """The end of what `tail -f` printed, to resume after a reconnection without
    printing a line twice."""

    KEEP = 4096

    def __init__(self) -> None:
        self.tail = ""

    def add(self, text: str) -> None:
        self.tail = (self.tail + text)[-self.KEEP :]

    def after(self, text: str) -> str:
        """The part of `text` (the stream's end, read back) that follows what was seen."""
        if not self.tail:
            return text
        for size in (len(self.tail), 256, 64):
            marker = self.tail[-size:]
            at = text.rfind(marker)
            if at >= 0:
                return text[at + len(marker) :]
        return text  # no overlap found: print it all rather than lose any


def _several(name: str) -> bool:
    return name == "all" or any(char in name for char in "*?[")


def _tail_several(client: Client, params: dict[str, Any], out: Output) -> int:
    """Several processes merged, each line prefixed with its name (docker compose logs)."""
    params = {key: value for key, value in params.items() if value is not None}
    result = client.call("tail", params)
    parts = result.get("processes") or []
    width = max([len(str(part.get("name"))) for part in parts] or [0])
    merger = _Merger(out, width)
    for part in parts:
        merger.add(part)
    merger.flush_all()
    if not params.get("follow"):
        return EXIT_OK
    try:
        for message in client.notifications():
            if message.get("method") == "output" and isinstance(message.get("params"), dict):
                merger.add(message["params"])
    except KeyboardInterrupt:
        merger.flush_all()
    return EXIT_OK


class _Merger:
    """Whole lines of several processes' output, each after its process's name."""

    def __init__(self, out: Output, width: int) -> None:
        self.out = out
        self.width = width
        self.partial: dict[str, str] = {}

    def add(self, chunk: dict[str, Any]) -> None:
        if self.out.as_json:
            _write_output(chunk, self.out)
            return
        name = str(chunk.get("name"))
        self.width = max(self.width, len(name))
        text = self.partial.pop(name, "") + str(chunk.get("data", ""))
        *lines, rest = text.split("\n")
        if rest:
            self.partial[name] = rest
        if lines:
            label = name.ljust(self.width)
            self.out.out.write("".join(f"{label} | {line}\n" for line in lines))
            self.out.out.flush()

    def flush_all(self) -> None:
        for name in list(self.partial):
            self.add({"name": name, "data": "\n"})


def cmd_logs(client: Client, args: argparse.Namespace, out: Output) -> int:
    """`logs [NAME...]`: each process's log files and sizes; `logs rotate [NAME...]`."""
    words = list(args.names)
    rotate = bool(words) and words[0] == "rotate"
    if rotate:
        words = words[1:]
    params: dict[str, Any] = {"rotate": rotate}
    if words:
        params["names"] = words
    result = client.call("logs", params)
    if out.as_json:
        out.json(result)
        return EXIT_OK
    for entry in result:
        where = entry.get("destination")
        head = f"{entry.get('name')} {entry.get('stream')}: {where}"
        if rotate:
            head += " (rotated)" if entry.get("rotated") else " (not rotated)"
        if entry.get("dropped_bytes"):
            head += f", {entry['dropped_bytes']} bytes dropped"
        out.line(head)
        for file in entry.get("files") or []:
            out.line(f"  {_size(int(file.get('size', 0))):>8}  {file.get('path')}")
    return EXIT_OK


def _size(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(count)  # pragma: no cover


def cmd_maintail(client: Client, args: argparse.Namespace, out: Output) -> int:
    """supd's own recent log, from its memory; -f keeps printing it."""
    params: dict[str, Any] = {"follow": args.follow}
    if args.lines is not None:
        params["lines"] = args.lines
    result = client.call("maintail", params)
    _write_output(result, out)
    if not args.follow:
        return EXIT_OK
    try:
        for message in client.notifications():
            if message.get("method") == "daemon_log" and isinstance(message.get("params"), dict):
                _write_output(message["params"], out)
    except KeyboardInterrupt:
        return EXIT_OK
    return EXIT_OK  # pragma: no cover


def _write_output(chunk: dict[str, Any], out: Output) -> None:
    if out.as_json:
        out.out.write(json.dumps(chunk) + "\n")
    else:
        out.out.write(str(chunk.get("data", "")))
    out.out.flush()


def cmd_pid(client: Client, args: argparse.Namespace, out: Output) -> int:
    """One pid alone (scripts: `kill $(supctl pid web)`); several as `NAME PID` lines."""
    result = client.call("pid", {"name": args.name} if args.name else {})
    if out.as_json:
        out.json(result)
    # A daemon older than `processes` sends only `pid`.
    processes = result.get("processes") or [{"name": args.name, "pid": result.get("pid")}]
    if args.name is None:
        processes = [{"name": "supd", "pid": result.get("pid")}]
    down = [str(p.get("name")) for p in processes if p.get("pid") is None]
    if not out.as_json:
        if len(processes) == 1 and not down:
            out.line(str(processes[0]["pid"]))
        else:
            width = max(len(str(p.get("name"))) for p in processes)
            for process in processes:
                if process.get("pid") is not None:
                    out.line(f"{str(process.get('name')).ljust(width)}  {process['pid']}")
        for name in down:
            out.error(f"{name} is not running")
    return EXIT_FAILED if down else EXIT_OK


def cmd_reread(client: Client, args: argparse.Namespace, out: Output) -> int:
    """supervisorctl's reread: what a reload would change, applying nothing."""
    args.dry_run = True
    try:
        return cmd_reload(client, args, out)
    except RpcError as exc:
        if exc.code != INVALID_PARAMS:
            raise
        # A supd without `reload --dry-run` refuses the parameter: nothing was applied.
        raise UsageError(
            "this supd cannot show what a reload would change without applying it"
            " (it has no reload dry run); `supd -c CONFIG --check` checks the file, and"
            " `supctl update` (= reload) applies it"
        ) from None


def cmd_avail(client: Client, args: argparse.Namespace, out: Output) -> int:
    rows = client.call("avail")
    if out.as_json:
        out.json(rows)
        return EXIT_OK
    width = max((len(str(row.get("program"))) for row in rows), default=0) + 3
    for row in rows:
        processes = row.get("processes") or []
        count = len(processes)
        activity = "active" if row.get("active") else "inactive"
        start = "auto" if row.get("autostart") else "manual"
        running = f"{row.get('running', 0)}/{count} running"
        group = row.get("group")
        member = f"  group {group}" if group and group != row.get("program") else ""
        out.line(
            f"{str(row.get('program')).ljust(width)}in use  {activity:<8}  "
            f"{start:<6}  {running}{member}"
        )
    return EXIT_OK


def cmd_metrics(client: Client, args: argparse.Namespace, out: Output) -> int:
    result = client.call("metrics")
    if out.as_json:
        out.json(result)
    else:
        out.out.write(str(result.get("text", "")))
    return EXIT_OK


def cmd_usage(client: Client, args: argparse.Namespace, out: Output) -> int:
    rows = client.call("usage", {"names": args.names} if args.names else {})
    if out.as_json:
        out.json(rows)
        return EXIT_OK
    width = max((len(str(row.get("name"))) for row in rows), default=4) + 3
    out.line(f"{'NAME'.ljust(width)}{'PID':>8}  CPU%      RSS  CPU TIME  PROCS")
    for row in rows:
        pid = row.get("pid")
        cpu_time = f"{float(row.get('cpu_seconds') or 0):.2f}s"
        columns = _usage_columns(row)
        procs = row.get("processes") or 0
        out.line(
            f"{str(row.get('name')).ljust(width)}{pid if pid else '-':>8}{columns}"
            f"{cpu_time:>8}  {procs:>5}"
        )
    return EXIT_OK


FG_NOTE = (
    "supctl: following {name} (stdout and stderr; Ctrl-C to stop). Input is not"
    " forwarded: supd gives its programs /dev/null as stdin.\n"
)


def cmd_fg(client: Client, args: argparse.Namespace, out: Output) -> int:
    """supervisorctl's fg, as far as supd can: follow both streams of one process.

    Both follows go out on one connection before any answer is read, so no output
    that arrives between them is lost; each chunk says which stream it is from.
    """
    if not out.as_json:
        out.err.write(FG_NOTE.format(name=args.name))
        out.err.flush()
    first = client.call("tail", {"name": args.name, "stream": "stdout", "lines": 0})
    del first  # the name is valid: follow both streams now
    try:
        for chunk in client.follow_streams(args.name, ("stdout", "stderr"), DEFAULT_TAIL_LINES):
            _write_output(chunk, out)
    except KeyboardInterrupt:
        return EXIT_OK
    return EXIT_OK  # pragma: no cover (follow_streams ends only by exception)


def cmd_completion(client: Client, args: argparse.Namespace, out: Output) -> int:
    if args.shell == "names":  # what the scripts call: names to complete, one a line
        for name in completion_names(client.call("status")):
            out.line(name)
        return EXIT_OK
    from . import completion

    out.out.write(completion.script(args.shell, COMMANDS))
    return EXIT_OK


def completion_names(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Processes, then their programs and groups (`web`, `web:*`), for completion."""
    names = sorted(str(row.get("name")) for row in rows)
    extra: set[str] = set()
    for name in names:
        if ":" in name:
            group = name.split(":", 1)[0]
            extra.update((group, f"{group}:*"))
    extra.update(str(row.get("program")) for row in rows)
    return names + sorted(extra - set(names))


def cmd_not_in_supd(client: Client, args: argparse.Namespace, out: Output) -> int:
    raise UsageError(f"supd has no {args.command} command: {NOT_IN_SUPD[args.command]}")


def cmd_version(client: Client, args: argparse.Namespace, out: Output) -> int:
    result = client.call("version")
    if out.as_json:
        out.json(result)
    else:
        config = result.get("config") or "no config file"
        out.line(f"supd {result.get('version')} (pid {result.get('pid')}, config {config})")
    return EXIT_OK


def cmd_shutdown(client: Client, args: argparse.Namespace, out: Output) -> int:
    result = client.call("shutdown")
    if out.as_json:
        out.json(result)
    else:
        out.line("supd is shutting down")
    return EXIT_OK


def cmd_why(client: Client, args: argparse.Namespace, out: Output) -> int:
    result = client.call("deaths", {"name": args.name, "limit": args.limit})
    if out.as_json:
        out.json(result)
    else:
        for line in format_why(result):
            out.line(line)
    return EXIT_OK


def format_why(result: dict[str, Any]) -> list[str]:
    """`supctl why NAME` for people: now, next, the deaths newest first, the last tail."""
    lines = [
        f"{result['name']}  {result['state']}  {result.get('description') or ''}".rstrip(),
        f"next: {result['next']}",
    ]
    lines += [f"blocked: {reason}" for reason in result.get("blocking") or []]
    deaths = result.get("deaths") or []
    if not deaths:
        lines.append("no deaths recorded")
        return lines
    lines.append("recent deaths, newest first:")
    for death in deaths:
        at = death.get("time")
        clock = time.strftime("%H:%M:%S", time.localtime(at)) if at is not None else "--:--:--"
        what = str(death.get("summary") or death.get("cause"))
        uptime = death.get("uptime")
        if uptime is not None:
            what += f" after {uptime:.1f} s" if uptime < 60 else f" after {int(uptime)} s"
        then = f"   ({death['then']})" if death.get("then") else ""
        lines.append(f"  {clock}  {what}{then}")
    tail = str(deaths[0].get("tail") or "")
    if tail:
        lines.append("output before the latest death (stderr, or stdout if redirected):")
        lines += [f"  | {line}" for line in tail.rstrip("\n").split("\n")]
    return lines


def cmd_clear(client: Client, args: argparse.Namespace, out: Output) -> int:
    results = client.call("clear", {"names": args.names})
    if out.as_json:
        out.json(results)
    else:
        for item in results:
            out.line(f"{item.get('name')}: cleared")
    return EXIT_OK


def cmd_reexec(client: Client, args: argparse.Namespace, out: Output) -> int:
    """Ask supd to re-exec itself, then wait until the new one answers (same pid)."""
    started = time.monotonic()
    try:
        result = client.call("reexec")
    except RpcError as exc:
        if exc.code != REEXEC_FAILED:
            raise
        out.failure(exc.code, f"reexec refused, supd carries on: {exc.message}", exc.data)
        return EXIT_FAILED
    client.close()
    generation = int(result.get("generation", 0))
    deadline = started + REEXEC_WAIT_S
    version: dict[str, Any] = {}
    while True:
        try:
            with Client(client.path, PROBE_TIMEOUT_S, trusted_uids=client.trusted_uids) as fresh:
                version = fresh.call("version", probe=False)
            if int(version.get("generation", 0)) >= generation:
                break
        except (Unreachable, RpcError):
            pass
        if time.monotonic() >= deadline:
            raise Unreachable(
                client.path, f"the re-exec'd supd did not answer in {REEXEC_WAIT_S:g} s"
            )
        time.sleep(0.05)
    took = time.monotonic() - started
    if out.as_json:
        out.json({**version, "seconds": round(took, 3)})
    else:
        out.line(
            f"supd re-executed: pid {version.get('pid')}, generation {generation}, "
            f"version {version.get('version')} ({took:.2f} s)"
        )
    return EXIT_OK


# --------------------------------------------------------------------------- arguments


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def _timeout(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also rejects NaN
        raise ValueError(text)
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="supctl",
        description="Control a running supd. Without a command: an interactive shell.",
        epilog=EXIT_STATUS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-s", "--socket", help=f"control socket (default: ${SOCKET_ENV}, ...)")
    parser.add_argument("-c", "--config", help="supd config file: use its socket")
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    parser.add_argument(
        "--timeout",
        type=_timeout,
        metavar="S",
        help="give up (exit 5) after S seconds without an answer (0: never); by default "
        "supctl waits as long as supd is working on the request and answering probes",
    )
    parser.add_argument(
        "--trust-uid",
        type=int,
        action="append",
        default=[],
        metavar="UID",
        help="also talk to a daemon running as this uid (default: only root or you)",
    )
    parser.add_argument("--version", action="version", version=f"supctl {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, handler: Handler | None, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        # SUPPRESS: a command without --json keeps the global option's value.
        sub.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
        sub.set_defaults(handler=handler)
        return sub

    sub = command("status", cmd_status, "show processes (exit 3 if any is not RUNNING)")
    sub.add_argument(
        "-l",
        "--long",
        action="store_true",
        help="add CPU%% and RSS columns (the process and its descendants)",
    )
    sub.add_argument("names", nargs="*", metavar="NAME")
    for name in ("start", "stop", "restart"):
        sub = command(name, cmd_control, f"{name} processes ({NAMES_HELP})")
        sub.add_argument("names", nargs="+", metavar="NAME")
        sub.add_argument(
            "--no-wait", dest="wait", action="store_false", help="answer without waiting"
        )
    sub = command("signal", cmd_signal, "send a signal (TERM, SIGHUP, 15...) to processes")
    sub.add_argument("signal", metavar="SIG")
    sub.add_argument("names", nargs="+", metavar="NAME")
    sub = command("reload", cmd_reload, "re-read the config file and apply the changes")
    sub.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the config and print what a reload would do; change nothing",
    )
    command("update", cmd_reload, "apply the config file's changes (supervisorctl's; = reload)")
    command("reread", cmd_reread, "show what a reload would change, changing nothing")
    command("avail", cmd_avail, "list the programs of the running config and their activity")
    command("metrics", cmd_metrics, "print the OpenMetrics text (as GET /metrics serves it)")
    sub = command("usage", cmd_usage, "show CPU and memory of processes and their descendants")
    sub.add_argument("names", nargs="*", metavar="NAME")
    sub = command(
        "fg",
        cmd_fg,
        "follow a process's stdout and stderr (input is not forwarded: programs get /dev/null)",
    )
    sub.add_argument("name", metavar="NAME")
    sub = command("completion", cmd_completion, "print a shell completion script (bash or zsh)")
    sub.add_argument("shell", choices=("bash", "zsh", "names"))
    sub = command(
        "tail",
        cmd_tail,
        f"show the end of a process's output (default: {DEFAULT_TAIL_LINES} lines), "
        "from its log file and backups",
    )
    sub.add_argument("-f", "--follow", action="store_true", help="keep printing new output")
    size = sub.add_mutually_exclusive_group()
    size.add_argument(
        "-n", "--lines", type=_non_negative_int, metavar="N", help="the last N lines (also -N)"
    )
    size.add_argument("-c", "--bytes", type=_non_negative_int, metavar="N", help="the last N bytes")
    sub.add_argument(
        "--since",
        type=_duration,
        metavar="AGE",
        help="what was written in the last AGE (10m, 2h, 1d), through the backups, "
        "gzipped ones too",
    )
    sub.add_argument(
        "words",
        nargs="+",
        metavar="NAME",
        help="a process, or with -f several (or 'all'), merged with name prefixes; "
        "then stdout (default) or stderr",
    )
    sub = command(
        "logs",
        cmd_logs,
        "list each process's log destination, files and sizes; "
        "`logs rotate [NAME...]` rotates them now",
    )
    sub.add_argument("names", nargs="*", metavar="NAME", help="[rotate] NAME...")
    sub = command("maintail", cmd_maintail, "show supd's own recent log (kept in memory)")
    sub.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    sub.add_argument("-n", "--lines", type=_non_negative_int, metavar="N", help="the last N lines")
    sub = command("pid", cmd_pid, "print supd's pid, or the processes' (NAME PID if several)")
    sub.add_argument("name", nargs="?", metavar="NAME")
    command("version", cmd_version, "show the daemon's version, pid and config")
    sub = command(
        "why",
        cmd_why,
        "why a process is down: its state, what supd will do next, its recent deaths",
    )
    sub.add_argument("name", metavar="NAME")
    sub.add_argument(
        "-n",
        "--limit",
        type=int,
        default=20,
        choices=range(1, 21),
        metavar="N",
        help="the last N deaths (1-20, default 20)",
    )
    sub = command(
        "clear",
        cmd_clear,
        "forget processes' recorded deaths and failure counts (not their logs: for"
        " supervisorctl's clear, `truncate -s 0 FILE`; supd keeps appending at the new end)",
    )
    sub.add_argument("names", nargs="+", metavar="NAME")
    command("shutdown", cmd_shutdown, "stop all processes and the daemon")
    sub = command(
        "wait",
        cmd_wait,
        "wait until processes are ready, healthy or completed (exit 1 at --timeout)",
    )
    sub.add_argument("names", nargs="+", metavar="NAME")
    sub.add_argument(
        "--for",
        dest="condition",
        choices=("started", "ready", "healthy", "completed"),
        default="ready",
        help="the condition (default: ready)",
    )
    sub.add_argument(
        "--timeout",
        dest="wait_timeout",
        type=_timeout,
        metavar="S",
        help="give up after S seconds, with exit status 1",
    )
    command(
        "reexec",
        cmd_reexec,
        "replace the daemon with a freshly exec'd supd (an upgrade), keeping every process",
    )
    sub = command("help", None, "show help for a command")
    sub.add_argument("topic", nargs="?", metavar="COMMAND")
    for name, hint in NOT_IN_SUPD.items():
        # Not listed in the help: supervisorctl's commands, answered with what to do.
        sub = commands.add_parser(name, description=f"supd has no {name} command: {hint}")
        sub.add_argument("rest", nargs=argparse.REMAINDER)
        sub.set_defaults(handler=cmd_not_in_supd)
    return parser


def supervisorctl_syntax(argv: Sequence[str]) -> list[str]:
    """`tail -100 web` (supervisorctl, tail(1)) is `tail -n 100 web`."""
    words = list(argv)
    command = _command_index(words)
    if command is None or words[command] != "tail":
        return words
    return words[: command + 1] + [
        part
        for word in words[command + 1 :]
        for part in (("-n", word[1:]) if word[:1] == "-" and word[1:].isdigit() else (word,))
    ]


def _command_index(words: list[str]) -> int | None:
    """Where the command is in `words`, skipping the global options and their values."""
    index = 0
    while index < len(words):
        word = words[index]
        if word in ("-s", "--socket", "-c", "--config", "--timeout"):
            index += 2
        elif word.startswith("-"):
            index += 1
        else:
            return index
    return None


# --------------------------------------------------------------------------- running


class Session:
    """What stays the same between commands: the socket, the streams, the options."""

    def __init__(
        self,
        parser: argparse.ArgumentParser,
        socket_path: str,
        args: argparse.Namespace,
        out: TextIO,
        err: TextIO,
    ) -> None:
        self.parser = parser
        self.socket_path = socket_path
        self.timeout_s: float | None = args.timeout or None  # 0: no bound either
        self.trusted_uids: list[int] = list(getattr(args, "trust_uid", []) or [])
        self.out = out
        self.err = err
        self.colour = wants_colour(out, os.environ)

    def run(self, args: argparse.Namespace) -> int:
        """One command: connect, call, print. Returns the exit status."""
        output = Output(self.out, self.err, as_json=args.json, colour=self.colour)
        if args.handler is None:
            return self.help(getattr(args, "topic", None))
        connect_s = min(PROBE_TIMEOUT_S, self.timeout_s or PROBE_TIMEOUT_S)
        progress = Progress(self.err, _describe_command(args)) if _isatty(self.err) else None
        try:
            with Client(
                self.socket_path,
                connect_s,
                limit_s=self.timeout_s,
                progress=progress,
                trusted_uids=self.trusted_uids,
            ) as client:
                status: int = args.handler(client, args, output)
                return status
        except UsageError as exc:
            output.failure("usage", str(exc))
            return EXIT_USAGE
        except Unreachable as exc:
            output.failure("unreachable", str(exc))
            return EXIT_UNREACHABLE
        except TimedOut as exc:
            output.failure("timed_out", str(exc))
            return EXIT_TIMED_OUT
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            # An answer of the wrong shape (an impostor, a different program on the
            # socket): a message, never a traceback.
            output.failure(
                "unreachable",
                f"invalid answer from {self.socket_path}: {type(exc).__name__}: {exc}",
            )
            return EXIT_UNREACHABLE
        except RpcError as exc:
            output.failure(exc.code, exc.message, exc.data)
            return EXIT_USAGE if exc.code == INVALID_PARAMS else EXIT_FAILED
        finally:
            self.out.flush()

    def help(self, topic: str | None) -> int:
        if topic is None:
            self.out.write(self.parser.format_help())
            return EXIT_OK
        sub = _subparser(self.parser, topic)
        if sub is None:
            self.err.write(f"supctl: no such command: {topic}\n")
            return EXIT_USAGE
        self.out.write(sub.format_help())
        return EXIT_OK


def _describe_command(args: argparse.Namespace) -> str:
    """`stop web:*`: the command as typed, for the progress line."""
    names = getattr(args, "names", None) or [getattr(args, "name", None) or ""]
    return " ".join([args.command, *names]).strip()


def _isatty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found: argparse.ArgumentParser | None = action.choices.get(name)
            return found
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    words = supervisorctl_syntax(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(words)
        socket_path = resolve_socket(args.socket, args.config, os.environ)
    except SystemExit as exc:  # argparse: --help or --version
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    except UsageError as exc:
        report_usage_error(exc, sys.stdout, sys.stderr, "--json" in words)
        return EXIT_USAGE
    session = Session(parser, socket_path, args, sys.stdout, sys.stderr)
    try:
        if args.command is None:
            return run_shell(session, args)
        return session.run(args)
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `supctl tail -f web | head`: the reader left; stop quietly, no traceback.
        _silence_stdout()
        return EXIT_OK


def report_usage_error(exc: UsageError, out: TextIO, err: TextIO, as_json: bool) -> None:
    """Like argparse (usage line, then the message) on stderr, or JSON on stdout."""
    if as_json:
        Output(out, err, as_json=True, colour=False).failure("usage", str(exc))
        return
    if isinstance(exc, ArgumentsError):
        exc.parser.print_usage(err)
        err.write(f"{exc.parser.prog}: error: {exc.message}\n")
    else:
        err.write(f"supctl: {exc}\n")


def _silence_stdout() -> None:
    # Python would flush stdout again at exit and print a second BrokenPipeError.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


# --------------------------------------------------------------------------- the shell


def run_shell(session: Session, defaults: argparse.Namespace) -> int:
    """`supctl>` prompt with readline history and completion; help, quit/exit, EOF."""
    import readline
    import shlex

    history = os.path.expanduser(HISTORY_FILE)
    with contextlib.suppress(OSError):  # first run, or no home
        readline.read_history_file(history)
    readline.set_history_length(1000)
    completer = Completer(session)
    readline.set_completer(completer.complete)
    readline.set_completer_delims(" \t")  # "web:1" is one word
    if "libedit" in (readline.__doc__ or ""):
        readline.parse_and_bind("bind ^I rl_complete")
    else:
        readline.parse_and_bind("tab: complete")
    session.out.write(f"supctl {__version__} on {session.socket_path}; 'help' lists commands\n")
    try:
        while True:
            try:
                line = input("supctl> ")
            except EOFError:
                session.out.write("\n")
                return EXIT_OK
            except KeyboardInterrupt:
                session.out.write("\n")
                continue
            try:
                words = shlex.split(line)
            except ValueError as exc:
                session.err.write(f"supctl: {exc}\n")
                continue
            if not words:
                continue
            if words[0] in SHELL_ONLY:
                return EXIT_OK
            run_shell_command(session, defaults, words)
    finally:
        with contextlib.suppress(OSError):
            readline.write_history_file(history)


def run_shell_command(session: Session, defaults: argparse.Namespace, words: list[str]) -> int:
    """One shell line. Usage errors print argparse's message but never leave the shell."""
    namespace = argparse.Namespace(**vars(defaults))
    words = supervisorctl_syntax(words)
    try:
        args = session.parser.parse_args(words, namespace)
    except SystemExit as exc:  # help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    except UsageError as exc:
        report_usage_error(exc, session.out, session.err, defaults.json or "--json" in words)
        return EXIT_USAGE
    if args.command is None:
        return EXIT_OK
    try:
        status = session.run(args)
    except KeyboardInterrupt:
        session.out.write("\n")
        return EXIT_INTERRUPTED
    if getattr(args, "follow", False):
        session.out.write("\n")  # the prompt after ^C goes on a line of its own
    return status


class Completer:
    """readline completion: command names first, then process/program names."""

    NAME_COMMANDS = (
        "status",
        "start",
        "stop",
        "restart",
        "tail",
        "pid",
        "wait",
        "why",
        "clear",
        "fg",
        "usage",
    )

    def __init__(self, session: Session) -> None:
        self.session = session
        self.matches: list[str] = []

    def complete(self, text: str, state: int) -> str | None:
        if state == 0:
            import readline

            words = readline.get_line_buffer()[: readline.get_begidx()].split()
            self.matches = [c for c in self.candidates(words) if c.startswith(text)]
        return self.matches[state] if state < len(self.matches) else None

    def candidates(self, words: list[str]) -> list[str]:
        if not words:
            return [*COMMANDS, *SHELL_ONLY]
        command = words[0]
        if command == "help":
            return list(COMMANDS) if len(words) == 1 else []
        if command == "tail" and len([w for w in words[1:] if not w.startswith("-")]) == 1:
            return ["stdout", "stderr"]
        if command == "signal" and len(words) == 1:
            return ["TERM", "HUP", "INT", "KILL", "USR1", "USR2", "QUIT"]
        if command in (*self.NAME_COMMANDS, "signal"):
            names = self.process_names()
            single = ("tail", "pid", "status", "why", "fg", "usage")
            return [*names, "all"] if command not in single else names
        return []

    def process_names(self) -> list[str]:
        """Processes and their programs, asked from the daemon (nothing if it is away)."""
        try:
            with Client(
                self.session.socket_path, 2.0, trusted_uids=self.session.trusted_uids
            ) as client:
                rows = client.call("status", probe=False)
        except (Unreachable, RpcError):
            return []
        names = [str(row.get("name")) for row in rows]
        programs = sorted({str(row.get("program")) for row in rows} - set(names))
        return sorted(names) + programs


if __name__ == "__main__":
    raise SystemExit(main())
