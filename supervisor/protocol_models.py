"""The control protocol's schema: pydantic models of every method's params and result.

The daemon does not import this module (pydantic would cost it about 16 MiB, issue 19):
it validates requests with `protocol.py`'s hand-written checks and answers with plain
data. These models are the schema for people and tests: `RESULT_ADAPTERS[m]` checks an
answer, and `parse_request` here is the reference parser that `protocol.parse_request`
must agree with, line for line (same params accepted, same error code and messages;
tests/test_protocol.py). docs/protocol.md is the reference for people.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from . import signals
from .protocol import (
    JSONRPC_VERSION,
    MAX_TAIL_BYTES,
    METHODS,
    ErrorCode,
    ErrorResponse,
    Method,
    ProcessState,
    RequestId,
    Stream,
)

# --------------------------------------------------------------------------- params
#
# Params arrive from clients: strict types, no unknown fields, frozen.


class _Params(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


def _non_empty_names(names: list[str]) -> list[str]:
    if not names:
        raise ValueError("at least one name is required")
    if any(not name for name in names):
        raise ValueError("names must not be empty strings")
    return names


Names = Annotated[list[StrictStr], AfterValidator(_non_empty_names)]


def _canonical_signal(value: str | int) -> str:
    return signals.name(signals.parse(value))


class StatusParams(_Params):
    names: Names | None = None
    # With cgroups: each process's CPU, memory and OOM kills (a file read per process,
    # so asked for, not sent by default: status of 1,000 must stay a few ms).
    accounting: bool = False


class StartParams(_Params):
    names: Names
    wait: bool = True


class StopParams(_Params):
    names: Names
    wait: bool = True


class RestartParams(_Params):
    names: Names
    wait: bool = True


class SignalParams(_Params):
    # Normalised to the canonical name ("SIGHUP") whatever form the client sent.
    signal: Annotated[StrictStr | StrictInt, AfterValidator(_canonical_signal)]
    names: Names

    @property
    def signum(self) -> int:
        return signals.parse(self.signal)


class ReloadParams(_Params):
    dry_run: bool = False  # only say what the reload would do


class TailParams(_Params):
    """`bytes`, `lines` or `since` (one of them; none means DEFAULT_TAIL_BYTES bytes).
    Either way the answer holds at most MAX_TAIL_BYTES bytes per process.

    `name` is one process; `names` (instead) any number of processes, programs, globs
    or "all": the answer then has one part per process in `processes`, and `follow`
    sends the `output` notifications of all of them, each naming its process.
    `since`: the output of the last `since` seconds (timestamps where present, the log
    files' modification times otherwise)."""

    name: StrictStr | None = None
    names: Names | None = None
    stream: Stream = "stdout"
    bytes: int | None = Field(default=None, ge=0, le=MAX_TAIL_BYTES)
    lines: int | None = Field(default=None, ge=0, le=MAX_TAIL_BYTES)
    since: float | None = Field(default=None, ge=0, le=10 * 365 * 86400, allow_inf_nan=False)
    follow: bool = False

    @model_validator(mode="after")
    def _bytes_or_lines(self) -> TailParams:
        if self.bytes is not None and self.lines is not None:
            raise ValueError("give bytes or lines, not both")
        if self.since is not None and (self.bytes is not None or self.lines is not None):
            raise ValueError("give since without bytes or lines")
        if (self.name is None) == (self.names is None):
            raise ValueError("give name or names, one of them")
        return self


class WaitParams(_Params):
    """Answer once every named process meets `condition` (issue 14)."""

    names: Names
    condition: Literal["started", "ready", "healthy", "completed"] = "ready"


class LogsParams(_Params):
    """`logs`: each process's log destination and files; `rotate` first cuts them."""

    names: Names | None = None
    rotate: bool = False


class MaintailParams(_Params):
    """`maintail`: supd's own recent log lines (from memory); `follow` sends each new
    one as a `daemon_log` notification."""

    lines: int | None = Field(default=None, ge=0, le=100_000)
    follow: bool = False


class PidParams(_Params):
    name: StrictStr | None = None


class VersionParams(_Params):
    pass


class ReexecParams(_Params):
    pass


class ShutdownParams(_Params):
    pass


class DeathsParams(_Params):
    """A process's recent deaths, newest first (at most `limit`; 20 are kept)."""

    name: StrictStr
    limit: int = Field(default=20, ge=1, le=20)


class ClearParams(_Params):
    """Forget the processes' deaths and failure counters."""

    names: Names


class MetricsParams(_Params):
    pass


class UsageParams(_Params):
    names: Names | None = None


class AvailParams(_Params):
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


# --------------------------------------------------------------------------- results
#
# Results are built by the daemon, so they validate in the ordinary (lax) mode:
# `ProcessInfo(state="RUNNING", ...)` is fine. Unknown fields are still typos.


class _Result(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Survivor(_Result):
    """A process left in a cgroup after cgroup.kill: uninterruptible (D), usually."""

    pid: int
    state: str  # /proc/PID/stat's state letter: "D"
    wchan: str  # where in the kernel it waits ("0" when unknown)
    command: str


class ProcessInfo(_Result):
    """One row of `status`."""

    name: str  # "web:1"
    program: str  # "web"
    state: ProcessState
    pid: int | None = None
    uptime: float | None = None  # seconds in the current run
    exit_code: int | None = None
    exit_signal: str | None = None  # "SIGKILL"
    restarts: int = 0  # automatic restarts only
    spawn_error: str | None = None
    description: str = ""  # "pid 4242, uptime 0:03:10"
    # Readiness, health and dependencies (issue 14).
    healthy: bool | None = None  # None: no health check, or none answered yet
    health_error: str | None = None  # the last failed health check
    waiting_for: str | None = None  # "waiting for db (ready)"
    notify_status: str | None = None  # the last STATUS= the program sent
    # The crash-loop schedule: seconds to the pending restart (BACKOFF) or revival
    # (FATAL with revive_after), the failure count, why it is in its state.
    next_start_in: float | None = None
    consecutive_failures: int = 0
    revive_in: float | None = None
    reason: str | None = None
    # With cgroups (else absent): the whole cgroup's CPU time, memory and OOM kills
    # (None where the memory controller is not enabled), and what survived SIGKILL.
    cpu_seconds: float | None = None
    memory_bytes: int | None = None
    oom_kills: int | None = None
    survivors: list[Survivor] | None = None


class ActionResult(_Result):
    """One process's outcome of `start`, `stop`, `restart` or `signal`."""

    name: str
    ok: bool
    state: ProcessState | None = None  # None when the name matched nothing
    error: str | None = None
    # Why not ok: BAD_STATE (it did not reach its target: FATAL, a spawn error, it
    # exited) or SUPERSEDED (a later conflicting command, a reload or shutdown took over).
    code: int | None = None


class KeyChangeResult(_Result):
    key: str
    old: str  # JSON text of the value
    new: str


class PlanStepResult(_Result):
    """One process's step: start, add, stop, restart, update in place, unchanged."""

    name: str
    program: str
    step: str
    changes: list[KeyChangeResult] = []


class ReloadResult(_Result):
    added: list[str] = []  # programs
    changed: list[str] = []
    removed: list[str] = []
    plan: list[PlanStepResult] = []  # one per process
    supervisor: list[KeyChangeResult] = []  # [supervisor] keys applied
    not_applied: list[str] = []  # "KEY: why", what needs `supctl reexec`
    dry_run: bool = False


class TailPart(_Result):
    name: str
    stream: Stream
    data: str


class TailResult(_Result):
    name: str
    stream: Stream
    data: str  # UTF-8 decoded with errors="replace"


class TailManyResult(TailResult):
    """The answer to a tail with `names`: `name` is the first name asked, `data` is ""."""

    processes: list[TailPart]  # one part per process


class LogFile(_Result):
    path: str
    size: int


class LogEntry(_Result):
    name: str
    stream: Stream
    destination: str  # a file path, /dev/stdout, /dev/stderr, journal, or none
    files: list[LogFile] = []  # the current file and its backups, newest first
    dropped_bytes: int = 0
    rotated: bool | None = None  # with `rotate`: whether this log was cut


class MaintailResult(_Result):
    data: str  # lines, each ending in a newline


class OutputParams(_Result):
    """Params of the server's `output` notification while a tail follows."""

    name: str
    stream: Stream
    data: str


class ProcessPid(_Result):
    name: str
    pid: int | None  # None when the process is not running


class PidResult(_Result):
    """`pid`: supd's own, or the one process's the name matched (None when it is not
    running, or when the name matched several processes); `processes`: every process
    the name matched (empty for supd's own pid)."""

    pid: int | None
    processes: list[ProcessPid] = []


class VersionResult(_Result):
    version: str
    pid: int
    config: str | None = None  # path of the config file in use
    generation: int = 1  # 1 + the re-execs this daemon has been through


class ReexecResult(_Result):
    """Sent just before the execve; the connection then closes."""

    pid: int
    generation: int  # the new daemon's: `version` answers it once it has adopted


class ShutdownResult(_Result):
    ok: bool = True


class DeathInfo(_Result):
    """One death of a process (`deaths`)."""

    time: float | None  # Unix time of the death
    uptime: float | None  # seconds the run lasted; None: it never ran (a spawn error)
    pid: int | None
    cause: Literal[
        "exited",
        "stopped",
        "stop-timeout",
        "killed",
        "signalled",
        "oom",
        "spawn-error",
        "not-ready",
        "unhealthy",
    ]
    summary: str  # "exited 1, unexpected", "SIGKILL not sent by supd (possibly OOM)"
    exit_code: int | None = None
    exit_signal: str | None = None
    core_dumped: bool = False
    expected: bool | None = None  # exited: the code is in exitcodes
    sender: str | None = None  # "supd", "operator", "kernel", "not supd"
    stopped_by: str | None = None  # stopped: "operator", "reload" or "shutdown"
    then: str = ""  # what supd did next: "restart 3 of 5 in 4.0 s", "FATAL: ..."
    tail: str = ""  # the last 2 KiB of stderr (stdout with redirect_stderr)


class DeathsResult(_Result):
    """`deaths`: the process now, what supd will do next, and its recent deaths."""

    name: str
    state: ProcessState
    description: str
    next: str  # "restart in 4.0 s", "revive in 9:41", "nothing: stopped by operator at ..."
    reason: str | None = None
    consecutive_failures: int = 0
    next_start_in: float | None = None
    revive_in: float | None = None
    blocking: list[str] = []  # what keeps a start from happening: "waiting for db (ready)"
    deaths: list[DeathInfo] = []  # newest first


class MetricsResult(_Result):
    """`metrics`: the OpenMetrics exposition, as `GET /metrics` serves it."""

    text: str
    content_type: str


class ProcessUsage(_Result):
    """One row of `usage`: a process and its descendants, sampled from /proc."""

    name: str
    pid: int | None
    cpu_seconds: float  # the current run's tree
    cpu_percent: float | None  # since the previous sample, or the run's average
    rss_bytes: int | None
    processes: int  # in the tree


class ProgramAvail(_Result):
    """One row of `avail`: a program of the running config."""

    program: str
    group: str
    autostart: bool
    processes: list[str]
    running: int  # processes RUNNING
    active: bool  # any process not down (STOPPED, EXITED, FATAL)


#: The Python type of each method's result; `RESULT_ADAPTERS[m].validate_json(...)`
#: checks an answer (tests, and clients that want models).
RESULT_TYPES: Final[dict[str, Any]] = {
    "status": list[ProcessInfo],
    "start": list[ActionResult],
    "stop": list[ActionResult],
    "restart": list[ActionResult],
    "signal": list[ActionResult],
    "reload": ReloadResult,
    "tail": TailManyResult | TailResult,
    "logs": list[LogEntry],
    "maintail": MaintailResult,
    "pid": PidResult,
    "version": VersionResult,
    "shutdown": ShutdownResult,
    "wait": list[ActionResult],
    "deaths": DeathsResult,
    "clear": list[ActionResult],
    "metrics": MetricsResult,
    "usage": list[ProcessUsage],
    "avail": list[ProgramAvail],
    "reexec": ReexecResult,
}
RESULT_ADAPTERS: Final[dict[str, TypeAdapter[Any]]] = {
    method: TypeAdapter(result_type) for method, result_type in RESULT_TYPES.items()
}


# --------------------------------------------------------------------------- requests
#
# One envelope model per method, joined in a union discriminated by "method", so a
# whole line is checked by a single `validate_json` call, and pydantic's error
# locations tell which JSON-RPC error it was: a location under "params" is invalid
# params, anything else an invalid request.


class _Envelope(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    jsonrpc: Literal["2.0"]
    # Absent means notification; present-but-null is a (discouraged) request.
    id: StrictInt | StrictStr | None = None


class _Status(_Envelope):
    method: Literal["status"]
    params: StatusParams = StatusParams()


class _Start(_Envelope):
    method: Literal["start"]
    params: StartParams


class _Stop(_Envelope):
    method: Literal["stop"]
    params: StopParams


class _Restart(_Envelope):
    method: Literal["restart"]
    params: RestartParams


class _Signal(_Envelope):
    method: Literal["signal"]
    params: SignalParams


class _Reload(_Envelope):
    method: Literal["reload"]
    params: ReloadParams = ReloadParams()


class _Tail(_Envelope):
    method: Literal["tail"]
    params: TailParams


class _Logs(_Envelope):
    method: Literal["logs"]
    params: LogsParams = LogsParams()


class _Maintail(_Envelope):
    method: Literal["maintail"]
    params: MaintailParams = MaintailParams()


class _Pid(_Envelope):
    method: Literal["pid"]
    params: PidParams = PidParams()


class _Version(_Envelope):
    method: Literal["version"]
    params: VersionParams = VersionParams()


class _Shutdown(_Envelope):
    method: Literal["shutdown"]
    params: ShutdownParams = ShutdownParams()


class _Wait(_Envelope):
    method: Literal["wait"]
    params: WaitParams


class _Deaths(_Envelope):
    method: Literal["deaths"]
    params: DeathsParams


class _Clear(_Envelope):
    method: Literal["clear"]
    params: ClearParams


class _Metrics(_Envelope):
    method: Literal["metrics"]
    params: MetricsParams = MetricsParams()


class _Usage(_Envelope):
    method: Literal["usage"]
    params: UsageParams = UsageParams()


class _Avail(_Envelope):
    method: Literal["avail"]
    params: AvailParams = AvailParams()


class _Reexec(_Envelope):
    method: Literal["reexec"]
    params: ReexecParams = ReexecParams()


_AnyEnvelope = Annotated[
    _Status
    | _Start
    | _Stop
    | _Restart
    | _Signal
    | _Reload
    | _Tail
    | _Logs
    | _Maintail
    | _Pid
    | _Version
    | _Shutdown
    | _Reexec
    | _Wait
    | _Deaths
    | _Clear
    | _Metrics
    | _Usage
    | _Avail,
    Field(discriminator="method"),
]
_ENVELOPE: Final[TypeAdapter[_AnyEnvelope]] = TypeAdapter(_AnyEnvelope)


@dataclass(frozen=True, slots=True)
class ModelRequest:
    """A valid request as the reference parser reads it: `params` is a model."""

    id: RequestId | None
    method: Method
    params: Params
    notification: bool = False  # no "id" member: run it, never answer it


def parse_request(line: bytes) -> ModelRequest | ErrorResponse:
    """The reference parser: validate one line with the models. Never raises."""
    try:
        envelope = _ENVELOPE.validate_json(line)
    except ValidationError as exc:
        return _classify_safely(line, exc)
    except Exception as exc:  # a pydantic bug must not reach the daemon's loop
        return ErrorResponse(None, ErrorCode.INTERNAL_ERROR, f"internal error: {exc}")
    return ModelRequest(
        id=envelope.id,
        method=envelope.method,
        params=envelope.params,
        notification="id" not in envelope.model_fields_set,
    )


def _classify_safely(line: bytes, exc: ValidationError) -> ErrorResponse:
    try:
        return _classify(line, exc)
    except (ValueError, RecursionError):
        # Our second look with json.loads can disagree with pydantic's parser on
        # exotic input (nesting depth, say); such a line is no request either way.
        return ErrorResponse(None, ErrorCode.INVALID_REQUEST, "invalid request")


def _classify(line: bytes, exc: ValidationError) -> ErrorResponse:
    errors = exc.errors(include_url=False, include_context=False, include_input=False)
    if errors[0]["type"] == "json_invalid":
        return ErrorResponse(None, ErrorCode.PARSE_ERROR, f"parse error: {errors[0]['msg']}")
    # The line is JSON: now the id (and whether it is a notification) can be recovered.
    raw = json.loads(line)
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
    if errors[0]["type"] in ("union_tag_invalid", "union_tag_not_found"):
        method = raw.get("method")
        if isinstance(method, str):
            return ErrorResponse(
                request_id,
                ErrorCode.METHOD_NOT_FOUND,
                f"method not found: {method!r}",
                data=list(METHODS),
                notification=notification,
            )
        problem = "must be a string" if "method" in raw else "is required"
        return ErrorResponse(
            request_id, ErrorCode.INVALID_REQUEST, f"invalid request: 'method' {problem}"
        )
    problems = [_describe(error["loc"][1:], error["msg"]) for error in errors]
    if all(error["loc"][1:2] == ("params",) for error in errors):
        return ErrorResponse(
            request_id,
            ErrorCode.INVALID_PARAMS,
            "invalid params: " + "; ".join(p.removeprefix("params.") for p in problems),
            data=[p.removeprefix("params.") for p in problems],
            notification=notification,
        )
    return ErrorResponse(
        request_id, ErrorCode.INVALID_REQUEST, "invalid request: " + "; ".join(problems), problems
    )


def _usable_id(value: object) -> RequestId | None:
    # bool is an int subclass, but `true` is not a valid id.
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    return None


def _describe(loc: tuple[int | str, ...], msg: str) -> str:
    """("params", "names", 0), "Input should be..." → "params.names.0: Input should be..."."""
    where = ".".join(str(part) for part in loc)
    # A value error from our own validators reads "Value error, unknown signal 'X'".
    msg = msg.removeprefix("Value error, ")
    return f"{where}: {msg}" if where else msg
