"""What each control method does: the control server's `CommandHandler`.

The control server parses and validates requests and calls `handle_command` from the
loop when its doorbell rings. This module talks to the daemon through `Core`, a narrow
interface (a status snapshot, submit a request, reload, shut down, signal, tail), and
answers through the `Responder`: at once, or, for start/stop/restart, when the fleet
answers the request with one outcome per process. A client that disconnects cancels
nothing: its answer is simply dropped.
"""

from __future__ import annotations

import codecs
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import __version__, daemonlog
from .configcheck import Cancelled
from .control import Responder, SocketUnusable
from .facts import ErrorCode, State
from .fleet import Action, Outcome, UnknownNames
from .metrics import CONTENT_TYPE
from .process import Process
from .protocol import (
    DEFAULT_TAIL_BYTES,
    AvailParams,
    ClearParams,
    DeathsParams,
    LogsParams,
    MaintailParams,
    MetricsParams,
    PidParams,
    RawJSON,
    ReexecParams,
    ReloadParams,
    Request,
    RestartParams,
    ShutdownParams,
    SignalParams,
    StartParams,
    StatusParams,
    StopParams,
    TailParams,
    UsageParams,
    VersionParams,
    WaitParams,
)
from .reloadplan import ReloadReport, report_data
from .settings import ConfigError
from .status import deaths_info, rows_json


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The processes asked for, as they are now, with the clocks to show them by."""

    now: float  # monotonic
    wall: float  # time.time(), for the wall-clock time of an exit
    entries: list[tuple[Process, int | None]]  # (process, the signal that stopped it)
    # Per process, what only the daemon knows: cgroup accounting and survivors.
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)


class Core(Protocol):
    """The daemon as commands see it."""

    @property
    def shutting_down(self) -> bool: ...

    @property
    def config_path(self) -> str: ...

    def resolve(self, names: list[str] | None) -> list[str]:
        """Process names for processes, programs or "all"; raises UnknownNames."""
        ...

    def snapshot(self, names: list[str], accounting: bool = False) -> Snapshot:
        """The processes now; `accounting` adds their cgroups' CPU and memory."""
        ...

    def submit(
        self,
        action: Action,
        names: list[str],
        wait: bool,
        reply: Callable[[tuple[Outcome, ...]], None],
    ) -> None:
        """Start, stop or restart; `reply` gets one outcome per process, exactly once."""
        ...

    def reload(
        self, dry_run: bool = False, done: Callable[[ReloadReport | Exception], None] | None = None
    ) -> None:
        """The plan, applied (or only made, dry), once the file is checked: `done` gets
        the report, or the ConfigError or SocketUnusable after which nothing changed."""
        ...

    def shutdown(self) -> None: ...

    def request_reexec(self, done: Callable[[str | None], None] | None = None) -> None:
        """Re-exec supd after this command; `done(None)` just before the execve,
        `done(problem)` if it cannot happen (then nothing changed)."""
        ...

    @property
    def generation(self) -> int: ...

    def signal(self, name: str, signum: int) -> bool:
        """False when the process is not running."""
        ...

    def tail(
        self,
        name: str,
        stream: str,
        nbytes: int | None,
        nlines: int | None,
        since: float | None = None,
    ) -> bytes:
        """The end of a process's output: the last `nlines` lines or `nbytes` bytes, or
        what it wrote in the last `since` seconds, read back from its log file (and
        backups) where there is one."""
        ...

    def log_files(self, names: list[str]) -> list[dict[str, Any]]:
        """Each process's log destinations, files and sizes (`logs`)."""
        ...

    def rotate_logs(self, names: list[str]) -> list[tuple[str, str, bool]]:
        """Cut these processes' log files now: (process, stream, rotated)."""
        ...

    def follow(
        self, name: str, stream: str, listener: Callable[[bytes], bool]
    ) -> Callable[[], None]:
        """Call `listener` with new output until it returns False; returns unfollow."""
        ...

    def await_condition(
        self, names: list[str], condition: str, reply: Callable[[tuple[Outcome, ...]], None]
    ) -> Callable[[], None]:
        """`reply` once every process meets `condition` (one outcome each); returns a
        cancel for a client that leaves first."""

    def clear(self, names: list[str]) -> None:
        """Forget the processes' deaths and failure counters."""
        ...

    def metrics_text(self) -> str:
        """The OpenMetrics exposition (metrics.py)."""
        ...

    def usage(self, names: list[str]) -> list[dict[str, Any]]:
        """Each process tree's CPU and memory (protocol_models.ProcessUsage rows)."""
        ...

    def avail(self) -> list[dict[str, Any]]:
        """The running config's programs (protocol_models.ProgramAvail rows)."""
        ...


ACTIONS = {StartParams: Action.START, StopParams: Action.STOP, RestartParams: Action.RESTART}


class Commands:
    """The daemon's side of every control method."""

    def __init__(self, core: Core) -> None:
        self.core = core

    def handle_command(self, request: Request, responder: Responder) -> None:
        try:
            self._handle(request, responder)
        except UnknownNames as exc:
            responder.error(ErrorCode.NO_SUCH_PROCESS, str(exc), exc.names)
        except SeveralProcesses as exc:
            responder.error(ErrorCode.INVALID_PARAMS, str(exc), exc.processes)

    def _handle(self, request: Request, responder: Responder) -> None:
        core = self.core
        match request.params:
            case StatusParams(names=names, accounting=accounting):
                snapshot = core.snapshot(core.resolve(names), accounting)
                rows = rows_json(snapshot.entries, snapshot.now, snapshot.wall, snapshot.extra)
                responder.result(RawJSON(rows))
            case (
                StartParams(names=names, wait=wait)
                | StopParams(names=names, wait=wait)
                | (RestartParams(names=names, wait=wait))
            ):
                self._change(ACTIONS[type(request.params)], names, wait, responder)
            case SignalParams(names=names) as params:
                responder.result(self._signal(int(params.signum), names))
            case ReloadParams(dry_run=dry_run):
                self._reload(responder, dry_run)
            case TailParams() as params:
                self._tail(params, responder)
            case LogsParams(names=names, rotate=rotate):
                self._logs(core.resolve(names), rotate, responder)
            case MaintailParams() as params:
                self._maintail(params, responder)
            case PidParams(name=name):
                responder.result(self._pid(name))
            case VersionParams():
                responder.result(
                    {
                        "version": __version__,
                        "pid": os.getpid(),
                        "config": core.config_path,
                        "generation": core.generation,
                    }
                )
            case ReexecParams():
                self._reexec(responder)
            case ShutdownParams():
                responder.result({"ok": True})
                core.shutdown()
            case WaitParams(names=names, condition=condition):
                targets = core.resolve(names)

                def reply(outcomes: tuple[Outcome, ...]) -> None:
                    responder.result([_action_result(outcome) for outcome in outcomes])

                responder.on_close(core.await_condition(targets, condition, reply))
            case DeathsParams(name=name, limit=limit):
                [name] = self._one(name)
                snapshot = core.snapshot([name])
                [(process, _)] = snapshot.entries
                responder.result(deaths_info(process, snapshot.now, snapshot.wall, limit))
            case ClearParams(names=names):
                targets = core.resolve(names)
                core.clear(targets)
                entries = core.snapshot(targets).entries
                responder.result([_action(p.name, True, p.state) for p, _ in entries])
            case MetricsParams():
                responder.result({"text": core.metrics_text(), "content_type": CONTENT_TYPE})
            case UsageParams(names=names):
                responder.result(core.usage(core.resolve(names)))
            case AvailParams():
                responder.result(core.avail())

    # -- start / stop / restart -------------------------------------------------------

    def _change(self, action: Action, names: list[str], wait: bool, responder: Responder) -> None:
        if self.core.shutting_down and action is not Action.STOP:
            responder.error(ErrorCode.SHUTTING_DOWN, "supd is shutting down")
            return
        targets = self.core.resolve(names)

        def reply(outcomes: tuple[Outcome, ...]) -> None:
            responder.result([_action_result(outcome) for outcome in outcomes])

        self.core.submit(action, targets, wait, reply)

    # -- signal -----------------------------------------------------------------------

    def _signal(self, signum: int, names: list[str]) -> list[dict[str, Any]]:
        results = []
        for name in self.core.resolve(names):
            sent = self.core.signal(name, signum)
            [(process, _)] = self.core.snapshot([name]).entries
            state = process.state
            error = None if sent else f"not running ({state.value})"
            code = None if sent else ErrorCode.BAD_STATE
            results.append(_action(name, sent, state, error, code))
        return results

    # -- reload -----------------------------------------------------------------------

    def _reload(self, responder: Responder, dry_run: bool = False) -> None:
        if self.core.shutting_down:
            responder.error(ErrorCode.SHUTTING_DOWN, "supd is shutting down")
            return

        def done(outcome: ReloadReport | Exception) -> None:
            if isinstance(outcome, ConfigError):
                problems = [str(p) for p in outcome.problems]
                message = "invalid config; nothing changed"
                responder.error(ErrorCode.CONFIG_INVALID, message, problems)
            elif isinstance(outcome, SocketUnusable):
                message = f"{outcome}; nothing changed"
                responder.error(ErrorCode.CONFIG_INVALID, message, [str(outcome)])
            elif isinstance(outcome, Cancelled):  # shutdown, or a re-exec took over
                code = ErrorCode.SHUTTING_DOWN if outcome.shutdown else ErrorCode.SUPERSEDED
                responder.error(code, f"reload cancelled: {outcome}; nothing changed")
            elif isinstance(outcome, Exception):
                responder.error(ErrorCode.INTERNAL_ERROR, f"reload failed: {outcome}")
            else:
                responder.result(report_data(outcome))

        self.core.reload(dry_run, done)

    # -- reexec -----------------------------------------------------------------------

    def _reexec(self, responder: Responder) -> None:
        if self.core.shutting_down:
            responder.error(ErrorCode.SHUTTING_DOWN, "supd is shutting down")
            return
        generation = self.core.generation + 1

        def done(problem: str | None) -> None:
            if problem is None:
                responder.result({"pid": os.getpid(), "generation": generation})
            else:
                responder.error(ErrorCode.REEXEC_FAILED, problem)

        self.core.request_reexec(done)

    # -- tail and pid -----------------------------------------------------------------

    def _tail(self, params: TailParams, responder: Responder) -> None:
        names = self._one(params.name) if params.name is not None else None
        processes = names or self.core.resolve(params.names)
        default = params.bytes is None and params.lines is None and params.since is None
        nbytes = DEFAULT_TAIL_BYTES if default else params.bytes
        parts = []
        for name in processes:
            if params.since is None:
                data = self.core.tail(name, params.stream, nbytes, params.lines)
            else:
                data = self.core.tail(name, params.stream, None, None, since=params.since)
            text = data.decode(errors="replace")
            parts.append({"name": name, "stream": params.stream, "data": text})
        if names is not None:
            responder.result(parts[0])
        else:
            asked = params.names[0] if params.names else ""
            responder.result(
                {"name": asked, "stream": params.stream, "data": "", "processes": parts}
            )
        if params.follow and not responder.closed:
            for name in processes:
                listener = _follower(name, params.stream, responder)
                responder.on_close(self.core.follow(name, params.stream, listener))

    def _logs(self, names: list[str], rotate: bool, responder: Responder) -> None:
        rotated: dict[tuple[str, str], bool] = {}
        if rotate:
            rotated = {(n, s): done for n, s, done in self.core.rotate_logs(names)}
        entries = self.core.log_files(names)
        for entry in entries:
            if rotate:
                entry["rotated"] = rotated.get((entry["name"], entry["stream"]), False)
        responder.result(entries)

    def _maintail(self, params: MaintailParams, responder: Responder) -> None:
        lines = daemonlog.RECENT.last(params.lines)
        responder.result({"data": "".join(line + "\n" for line in lines)})
        if params.follow and not responder.closed:

            def forward(line: str) -> bool:
                if responder.closed:
                    return False
                return responder.notify("daemon_log", {"data": line + "\n"})

            responder.on_close(daemonlog.RECENT.follow(forward))

    def _pid(self, name: str | None) -> dict[str, Any]:
        if name is None:
            return {"pid": os.getpid(), "processes": []}
        entries = self.core.snapshot(self.core.resolve([name])).entries
        found = [{"name": process.name, "pid": process.pid} for process, _ in entries]
        return {"pid": found[0]["pid"] if len(found) == 1 else None, "processes": found}

    def _one(self, name: str) -> list[str]:
        """A process by its own name (a program of one process by the program's);
        a name that means several processes is a usage error that lists them."""
        resolved = self.core.resolve([name])
        if len(resolved) > 1:
            raise SeveralProcesses(name, resolved)
        if name == "all":
            raise UnknownNames([name])
        return resolved


class SeveralProcesses(Exception):
    """A method that takes one process was given a name that means several."""

    def __init__(self, name: str, processes: list[str]) -> None:
        shown = ", ".join(processes[:5]) + (", ..." if len(processes) > 5 else "")
        super().__init__(f"{name} means {len(processes)} processes ({shown}): name one")
        self.processes = processes


def _action_result(outcome: Outcome) -> dict[str, Any]:
    return _action(outcome.name, outcome.ok, outcome.state, outcome.error, outcome.code)


def _action(
    name: str,
    ok: bool,
    state: State | None,
    error: str | None = None,
    code: ErrorCode | None = None,
) -> dict[str, Any]:
    """One `ActionResult` (protocol_models.py) as a plain dict."""
    return {
        "name": name,
        "ok": ok,
        "state": state.value if state is not None else None,
        "error": error,
        "code": int(code) if code is not None else None,
    }


def _follower(name: str, stream: str, responder: Responder) -> Callable[[bytes], bool]:
    """An output listener for `tail -f` of process `name` (resolved: the notifications
    name the process, whatever the client typed); False once the client has gone."""

    # One decoder per follower: a UTF-8 character split across two reads stays whole.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def forward(data: bytes) -> bool:
        if responder.closed:
            return False
        text = decoder.decode(data)
        if not text:
            return True
        return responder.notify("output", {"name": name, "stream": stream, "data": text})

    return forward
