"""The control protocol: JSON-RPC 2.0, one JSON object per line.

This module is the wire format only, as the daemon uses it: every method's params as a
plain slotted dataclass, a hand-written validator that turns bytes into a `Request` (or
the JSON-RPC error the line earns), and the helpers that turn answers into bytes. It
does no I/O and imports the standard library only: not pydantic (about 16 MiB of a
long-running daemon's memory, issue 19), not `selector`, `linux`, `daemon` or ctypes.
`ctl.py` speaks the same protocol without importing this module; the error codes and
state names it shares with this one live in `facts.py`.

The schema for people and tests is `protocol_models.py`: pydantic models of every
method's params and result. Its reference parser and this module's must agree on every
line (same params accepted, same error code, same messages); tests/test_protocol.py
checks that with a table and with hypothesis. docs/protocol.md is the reference for
people; keep all three in step.

Framing: every message is one UTF-8 JSON object followed by b"\\n". JSON never needs a
raw newline inside a value, so a line is a message.

Decisions beyond the JSON-RPC 2.0 spec:

- Params are always an object (by-name); an array is "invalid params". Unknown fields
  are rejected, and types are strict (no "5" for 5, no 1 for true, no 1.0 for 1).
- Batch requests (a JSON array) are not supported: answered with "invalid request".
- A request without an "id" member is a notification: it is executed, and nothing is
  ever written back for it, not even an error (the spec's rule). `shutdown` sent as a
  notification is a fire-and-forget stop. Lines whose kind can't be told (unparsable
  JSON, not an object) are answered with id null, as the spec says.
- The server sends notifications of its own: `output` while a `tail` follows.

Error messages name the field the way pydantic's would ("names.1: Input should be a
valid string"), so that the schema models and this validator read alike.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal, cast

from . import signals
from .facts import COMMAND_METHODS, State
from .facts import ErrorCode as ErrorCode  # re-exported: the codes on the wire

JSONRPC_VERSION: Final = "2.0"

#: Largest tail a client may ask for, so that one answer stays well below the control
#: server's per-client output limit.
MAX_TAIL_BYTES: Final = 1 << 20
#: A tail without `bytes` or `lines` (supervisorctl's default).
DEFAULT_TAIL_BYTES: Final = 1600
#: The longest `since` a tail may ask for: ten years.
MAX_TAIL_SINCE: Final = 10 * 365 * 86400
#: The most lines `maintail` may ask for.
MAX_MAINTAIL_LINES: Final = 100_000
#: The deaths kept per process, and so the largest `limit` of `deaths`.
MAX_DEATHS: Final = 20
#: How deep a value may sit in a line (the line's own value is at depth 1, what an
#: array or object holds one deeper): what the schema's parser (pydantic's, used by
#: protocol_models) reads; json.loads would go on to about 1,000.
MAX_NESTING: Final = 201

RequestId = int | str

# The codes and state names are shared with supctl (facts.py); re-exported here.
ProcessState = State

Stream = Literal["stdout", "stderr"]
STREAMS: Final[tuple[str, ...]] = ("stdout", "stderr")
Condition = Literal["started", "ready", "healthy", "completed"]
CONDITIONS: Final[tuple[str, ...]] = ("started", "ready", "healthy", "completed")


# --------------------------------------------------------------------------- params
#
# What a valid request carries, by method; `match request.params:` tells the method.
# Frozen and slotted: one is made per request.


@dataclass(frozen=True, slots=True)
class StatusParams:
    names: list[str] | None = None
    # With cgroups: each process's CPU, memory and OOM kills (a file read per process,
    # so asked for, not sent by default: status of 1,000 must stay a few ms).
    accounting: bool = False


@dataclass(frozen=True, slots=True)
class StartParams:
    names: list[str]
    wait: bool = True


@dataclass(frozen=True, slots=True)
class StopParams:
    names: list[str]
    wait: bool = True


@dataclass(frozen=True, slots=True)
class RestartParams:
    names: list[str]
    wait: bool = True


@dataclass(frozen=True, slots=True)
class SignalParams:
    # Normalised to the canonical name ("SIGHUP") whatever form the client sent.
    signal: str
    names: list[str]

    @property
    def signum(self) -> int:
        return signals.parse(self.signal)


@dataclass(frozen=True, slots=True)
class ReloadParams:
    dry_run: bool = False  # only say what the reload would do


@dataclass(frozen=True, slots=True)
class TailParams:
    """`bytes`, `lines` or `since` (one of them; none means DEFAULT_TAIL_BYTES bytes),
    and `name` or `names` (protocol_models.TailParams says what each means)."""

    name: str | None = None
    names: list[str] | None = None
    stream: Stream = "stdout"
    bytes: int | None = None
    lines: int | None = None
    since: float | None = None
    follow: bool = False


@dataclass(frozen=True, slots=True)
class WaitParams:
    """Answer once every named process meets `condition` (issue 14)."""

    names: list[str]
    condition: Condition = "ready"


@dataclass(frozen=True, slots=True)
class LogsParams:
    names: list[str] | None = None
    rotate: bool = False


@dataclass(frozen=True, slots=True)
class MaintailParams:
    lines: int | None = None
    follow: bool = False


@dataclass(frozen=True, slots=True)
class PidParams:
    name: str | None = None


@dataclass(frozen=True, slots=True)
class VersionParams:
    pass


@dataclass(frozen=True, slots=True)
class ReexecParams:
    pass


@dataclass(frozen=True, slots=True)
class ShutdownParams:
    pass


@dataclass(frozen=True, slots=True)
class DeathsParams:
    name: str
    limit: int = MAX_DEATHS


@dataclass(frozen=True, slots=True)
class ClearParams:
    names: list[str]


@dataclass(frozen=True, slots=True)
class MetricsParams:
    pass


@dataclass(frozen=True, slots=True)
class UsageParams:
    names: list[str] | None = None


@dataclass(frozen=True, slots=True)
class AvailParams:
    pass


Params = (
    StatusParams
    | StartParams
    | StopParams
    | RestartParams
    | SignalParams
    | ReloadParams
    | TailParams
    | LogsParams
    | MaintailParams
    | PidParams
    | VersionParams
    | ShutdownParams
    | WaitParams
    | DeathsParams
    | ClearParams
    | MetricsParams
    | UsageParams
    | AvailParams
    | ReexecParams
)

Method = Literal[
    "status",
    "start",
    "stop",
    "restart",
    "signal",
    "reload",
    "tail",
    "logs",
    "maintail",
    "pid",
    "version",
    "shutdown",
    "wait",
    "deaths",
    "clear",
    "metrics",
    "usage",
    "avail",
    "reexec",
]


@dataclass(frozen=True, slots=True)
class Request:
    """A valid request. `match request.params:` tells the method by its params type."""

    id: RequestId | None
    method: Method
    params: Params
    notification: bool = False  # no "id" member: run it, never answer it


@dataclass(frozen=True, slots=True)
class ErrorResponse:
    """A line that could not become a `Request`, and the error it earns."""

    id: RequestId | None
    code: int
    message: str
    data: Any = None
    # The line was a notification: per JSON-RPC nothing is written back.
    notification: bool = False

    def encode(self) -> bytes:
        return encode_error(self.id, self.code, self.message, self.data)


# --------------------------------------------------------------------------- validation
#
# One checker per kind of field. A checker returns the value as the params keep it, or
# appends its problems ("where: what", `where` relative to params) and returns _BAD.
# The messages are pydantic's words for the same failure (see the module docstring).


class _Bad(enum.Enum):
    BAD = enum.auto()


_BAD: Final = _Bad.BAD
_REQUIRED: Final = object()  # a field's default: the field must be given

Problems = list[str]
Checker = Callable[[Any, str, Problems], Any]


def _is_int(value: object) -> bool:
    # bool is an int subclass, but `true` is not a number.
    return isinstance(value, int) and not isinstance(value, bool)


def _strict_str(value: Any, where: str, problems: Problems) -> Any:
    if isinstance(value, str):
        return value
    problems.append(f"{where}: Input should be a valid string")
    return _BAD


def _strict_bool(value: Any, where: str, problems: Problems) -> Any:
    if isinstance(value, bool):
        return value
    problems.append(f"{where}: Input should be a valid boolean")
    return _BAD


def _names(value: Any, where: str, problems: Problems) -> Any:
    if not isinstance(value, list):
        problems.append(f"{where}: Input should be a valid array")
        return _BAD
    before = len(problems)
    for index, item in enumerate(value):
        _strict_str(item, f"{where}.{index}", problems)
    if len(problems) > before:
        return _BAD
    if not value:
        problems.append(f"{where}: at least one name is required")
        return _BAD
    if any(not name for name in value):
        problems.append(f"{where}: names must not be empty strings")
        return _BAD
    return value


def _bounded(value: Any, where: str, problems: Problems, low: int, high: int) -> Any:
    if value < low:
        problems.append(f"{where}: Input should be greater than or equal to {low}")
        return _BAD
    if value > high:
        problems.append(f"{where}: Input should be less than or equal to {high}")
        return _BAD
    return value


def _int(low: int, high: int) -> Checker:
    def check(value: Any, where: str, problems: Problems) -> Any:
        if not _is_int(value):
            problems.append(f"{where}: Input should be a valid integer")
            return _BAD
        return _bounded(value, where, problems, low, high)

    return check


def _finite_float(low: int, high: int) -> Checker:
    def check(value: Any, where: str, problems: Problems) -> Any:
        if not (_is_int(value) or isinstance(value, float)):
            problems.append(f"{where}: Input should be a valid number")
            return _BAD
        try:
            number = float(value)
        except OverflowError:  # an int beyond 1.8e308
            number = math.inf
        if not math.isfinite(number):
            problems.append(f"{where}: Input should be a finite number")
            return _BAD
        return _bounded(number, where, problems, low, high)

    return check


def _literal(choices: tuple[str, ...]) -> Checker:
    quoted = [repr(choice) for choice in choices]
    expected = ", ".join(quoted[:-1]) + " or " + quoted[-1]

    def check(value: Any, where: str, problems: Problems) -> Any:
        if isinstance(value, str) and value in choices:
            return value
        problems.append(f"{where}: Input should be {expected}")
        return _BAD

    return check


def _signal(value: Any, where: str, problems: Problems) -> Any:
    if not (isinstance(value, str) or _is_int(value)):
        problems.append(f"{where}.str: Input should be a valid string")
        problems.append(f"{where}.int: Input should be a valid integer")
        return _BAD
    try:
        return signals.name(signals.parse(value))
    except ValueError as exc:
        problems.append(f"{where}: {exc}")
        return _BAD


def _optional(check: Checker) -> Checker:
    def optional(value: Any, where: str, problems: Problems) -> Any:
        return None if value is None else check(value, where, problems)

    return optional


def _tail_rules(values: dict[str, Any]) -> str | None:
    """TailParams' rules across fields (checked once every field is valid)."""
    if values["bytes"] is not None and values["lines"] is not None:
        return "give bytes or lines, not both"
    if values["since"] is not None and (values["bytes"] is not None or values["lines"] is not None):
        return "give since without bytes or lines"
    if (values["name"] is None) == (values["names"] is None):
        return "give name or names, one of them"
    return None


@dataclass(frozen=True, slots=True)
class _Shape:
    """A method's params: its dataclass, each field's checker and default, whether
    `params` may be left out, and the rule across fields, if any."""

    params: type[Any]
    fields: tuple[tuple[str, Checker, Any], ...]
    optional: bool = True
    rule: Callable[[dict[str, Any]], str | None] | None = None


_NAMES: Final = ("names", _names, _REQUIRED)
_SOME_NAMES: Final = ("names", _optional(_names), None)
_WAIT: Final = ("wait", _strict_bool, True)

SHAPES: Final[dict[str, _Shape]] = {
    "status": _Shape(StatusParams, (_SOME_NAMES, ("accounting", _strict_bool, False))),
    "start": _Shape(StartParams, (_NAMES, _WAIT), optional=False),
    "stop": _Shape(StopParams, (_NAMES, _WAIT), optional=False),
    "restart": _Shape(RestartParams, (_NAMES, _WAIT), optional=False),
    "signal": _Shape(SignalParams, (("signal", _signal, _REQUIRED), _NAMES), optional=False),
    "reload": _Shape(ReloadParams, (("dry_run", _strict_bool, False),)),
    "tail": _Shape(
        TailParams,
        (
            ("name", _optional(_strict_str), None),
            _SOME_NAMES,
            ("stream", _literal(STREAMS), "stdout"),
            ("bytes", _optional(_int(0, MAX_TAIL_BYTES)), None),
            ("lines", _optional(_int(0, MAX_TAIL_BYTES)), None),
            ("since", _optional(_finite_float(0, MAX_TAIL_SINCE)), None),
            ("follow", _strict_bool, False),
        ),
        optional=False,
        rule=_tail_rules,
    ),
    "logs": _Shape(LogsParams, (_SOME_NAMES, ("rotate", _strict_bool, False))),
    "maintail": _Shape(
        MaintailParams,
        (("lines", _optional(_int(0, MAX_MAINTAIL_LINES)), None), ("follow", _strict_bool, False)),
    ),
    "pid": _Shape(PidParams, (("name", _optional(_strict_str), None),)),
    "version": _Shape(VersionParams, ()),
    "shutdown": _Shape(ShutdownParams, ()),
    "wait": _Shape(
        WaitParams, (_NAMES, ("condition", _literal(CONDITIONS), "ready")), optional=False
    ),
    "deaths": _Shape(
        DeathsParams,
        (("name", _strict_str, _REQUIRED), ("limit", _int(1, MAX_DEATHS), MAX_DEATHS)),
        optional=False,
    ),
    "clear": _Shape(ClearParams, (_NAMES,), optional=False),
    "metrics": _Shape(MetricsParams, ()),
    "usage": _Shape(UsageParams, (_SOME_NAMES,)),
    "avail": _Shape(AvailParams, ()),
    "reexec": _Shape(ReexecParams, ()),
}

#: Every method, in the order the "method not found" error lists them (supctl's order,
#: facts.COMMAND_METHODS, the one list of both).
METHODS: Final[tuple[str, ...]] = tuple(method for _, method in COMMAND_METHODS if method)

_ENVELOPE: Final = frozenset({"jsonrpc", "id", "method", "params"})


def _check_params(shape: _Shape, raw: Any, problems: Problems) -> Any:
    """The params object for `raw`, or _BAD with the problems (under "params")."""
    if not isinstance(raw, dict):
        problems.append("params: Input should be an object")
        return _BAD
    before = len(problems)
    values: dict[str, Any] = {}
    for name, check, default in shape.fields:
        if name in raw:
            values[name] = check(raw[name], f"params.{name}", problems)
        elif default is _REQUIRED:
            problems.append(f"params.{name}: Field required")
        else:
            values[name] = default
    known = {name for name, _, _ in shape.fields}
    problems.extend(
        f"params.{key}: Extra inputs are not permitted" for key in raw if key not in known
    )
    if len(problems) > before:
        return _BAD
    if shape.rule is not None and (broken := shape.rule(values)) is not None:
        problems.append(f"params: {broken}")
        return _BAD
    return shape.params(**values)


def parse_request(line: bytes) -> Request | ErrorResponse:
    """Validate one line (with or without its b"\\n"). Never raises."""
    try:
        return _parse(line)
    except Exception as exc:  # a bug here must not reach the daemon's loop
        return ErrorResponse(None, ErrorCode.INTERNAL_ERROR, f"internal error: {exc}")


def _parse(line: bytes) -> Request | ErrorResponse:
    raw = _load(line)
    if isinstance(raw, ErrorResponse):
        return raw
    if not isinstance(raw, dict):
        what = "batch requests are not supported" if isinstance(raw, list) else "not an object"
        return ErrorResponse(None, ErrorCode.INVALID_REQUEST, f"invalid request: {what}")
    request_id = _usable_id(raw.get("id"))
    # Only a well-formed request without an id is a notification; an invalid request
    # is answered (id null) even when it has no id, as the spec's examples show.
    notification = "id" not in raw
    if raw.get("jsonrpc") != JSONRPC_VERSION:
        return ErrorResponse(
            request_id, ErrorCode.INVALID_REQUEST, 'invalid request: "jsonrpc" must be "2.0"'
        )
    method = raw.get("method")
    if not isinstance(method, str):
        problem = "must be a string" if "method" in raw else "is required"
        return ErrorResponse(
            request_id, ErrorCode.INVALID_REQUEST, f"invalid request: 'method' {problem}"
        )
    shape = SHAPES.get(method)
    if shape is None:
        return ErrorResponse(
            request_id,
            ErrorCode.METHOD_NOT_FOUND,
            f"method not found: {method!r}",
            data=list(METHODS),
            notification=notification,
        )
    id_problems: Problems = []
    if "id" in raw and raw["id"] is not None and request_id is None:
        id_problems.append("id.int: Input should be a valid integer")
        id_problems.append("id.str: Input should be a valid string")
    params_problems: Problems = []
    params: Any = None
    if "params" in raw:
        params = _check_params(shape, raw["params"], params_problems)
    elif shape.optional:
        params = shape.params()
    else:
        params_problems.append("params: Field required")
    extra = [f"{key}: Extra inputs are not permitted" for key in raw if key not in _ENVELOPE]
    if not (id_problems or params_problems or extra):
        return Request(request_id, cast(Method, method), params, notification)
    if not (id_problems or extra):
        detail = [problem.removeprefix("params.") for problem in params_problems]
        return ErrorResponse(
            request_id,
            ErrorCode.INVALID_PARAMS,
            "invalid params: " + "; ".join(detail),
            data=detail,
            notification=notification,
        )
    problems = id_problems + params_problems + extra
    return ErrorResponse(
        request_id, ErrorCode.INVALID_REQUEST, "invalid request: " + "; ".join(problems), problems
    )


def _load(line: bytes) -> Any:
    """The JSON value of a line, or the parse error it earns."""
    try:
        text = line.decode()
    except UnicodeDecodeError as exc:
        return ErrorResponse(None, ErrorCode.PARSE_ERROR, f"parse error: not UTF-8: {exc.reason}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno}"
        return ErrorResponse(None, ErrorCode.PARSE_ERROR, f"parse error: {exc.msg} at {where}")
    except ValueError:  # json's only other complaint: an int of over 4,300 digits
        return ErrorResponse(None, ErrorCode.PARSE_ERROR, "parse error: number out of range")
    except RecursionError:
        return ErrorResponse(None, ErrorCode.PARSE_ERROR, "parse error: nested too deeply")
    # Counting brackets is cheap, and a line nesting too deeply has many of them.
    if text.count("[") + text.count("{") >= MAX_NESTING and _nesting(value) > MAX_NESTING:
        return ErrorResponse(None, ErrorCode.PARSE_ERROR, "parse error: nested too deeply")
    # json reads "\ud800" as a lone surrogate, which no UTF-8 text can hold: refused,
    # as the schema's parser does, so that no name or id carries one into the daemon.
    if "\\u" in text and _has_lone_surrogate(value):
        return ErrorResponse(None, ErrorCode.PARSE_ERROR, "parse error: lone surrogate in a string")
    return value


def _nesting(value: Any) -> int:
    """The depth of the deepest value in `value` (see MAX_NESTING), found without
    recursion: a deep value must not cost a RecursionError."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)
    return deepest


def _has_lone_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, list):
        return any(_has_lone_surrogate(item) for item in value)
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    return False


def _usable_id(value: object) -> RequestId | None:
    if isinstance(value, str) or _is_int(value):
        return value  # type: ignore[return-value]
    return None


# --------------------------------------------------------------------------- encoding


class RawJSON(str):
    """A result already written as ASCII JSON text (a big `status`: status.rows_json),
    put into the answer as it is."""

    __slots__ = ()


def encode_result(request_id: RequestId | None, result: Any) -> bytes:
    """A success response line. `result` is plain data: dicts, lists, str, numbers,
    None, enums, dataclasses (and anything with pydantic's `model_dump`: the schema
    models, which tests use), or `RawJSON`."""
    if isinstance(result, RawJSON):
        envelope = _encode({"jsonrpc": JSONRPC_VERSION, "id": request_id, "result": 0})
        return envelope[: -len(b"0}\n")] + result.encode("ascii") + b"}\n"
    return _encode({"jsonrpc": JSONRPC_VERSION, "id": request_id, "result": result})


def encode_error(request_id: RequestId | None, code: int, message: str, data: Any = None) -> bytes:
    """An error response line; "data" is left out when None."""
    error: dict[str, Any] = {"code": int(code), "message": message}
    if data is not None:
        error["data"] = data
    return _encode({"jsonrpc": JSONRPC_VERSION, "id": request_id, "error": error})


def encode_notification(method: str, params: Any) -> bytes:
    """A server-to-client notification line (no id), e.g. `output`."""
    return _encode({"jsonrpc": JSONRPC_VERSION, "method": method, "params": params})


def _encode(message: dict[str, Any]) -> bytes:
    # Compact JSON escapes control characters, so the only b"\n" is the terminator.
    # Text goes out as UTF-8, not as \u escapes (a tail of non-ASCII output stays its
    # size), except where a string holds a lone surrogate (a client's odd id, say),
    # which UTF-8 cannot carry: then json's escapes. Values that are not JSON at all
    # raise TypeError, from here.
    text = _UTF8.encode(message)
    try:
        return text.encode() + b"\n"
    except UnicodeEncodeError:
        return _ASCII.encode(message).encode() + b"\n"


def _plain(value: Any) -> Any:
    """What json cannot write by itself, as plain data (json's `default` hook)."""
    dump = getattr(value, "model_dump", None)
    if dump is not None:
        return dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: getattr(value, field.name) for field in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, set | frozenset):
        return list(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


# Made once: json.dumps would build an encoder per answer. No circularity check (our
# answers are trees; a cycle would still raise, as RecursionError).
_UTF8: Final = json.JSONEncoder(
    ensure_ascii=False, check_circular=False, separators=(",", ":"), default=_plain
)
_ASCII: Final = json.JSONEncoder(check_circular=False, separators=(",", ":"), default=_plain)
