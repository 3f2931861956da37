"""What each control method does to the daemon: the daemon's `CommandHandler`.

The control server parses and validates requests and calls `handle_command` from the
loop when its doorbell rings; this module turns them into state-machine events and
answers through the `Responder`, at once or when the processes have settled (a `start`
answers once the process is RUNNING or has failed). A client that disconnects cancels
nothing: its answer is simply dropped.
"""

from __future__ import annotations

import codecs
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import __version__
from .config import ConfigError
from .control import Responder
from .names import select as select_names
from .process import DOWN_STATES, Start, State, Stop, Want, describe
from .protocol import (
    DEFAULT_TAIL_BYTES,
    MAX_TAIL_BYTES,
    ActionResult,
    ErrorCode,
    OutputParams,
    PidParams,
    PidResult,
    ProcessPid,
    ReloadParams,
    ReloadResult,
    Request,
    RestartParams,
    ShutdownParams,
    ShutdownResult,
    SignalParams,
    StartParams,
    StatusParams,
    StopParams,
    TailParams,
    TailResult,
    VersionParams,
    VersionResult,
)
from .signals import name as signal_name

if TYPE_CHECKING:
    from .daemon import Daemon


class UnknownNames(Exception):
    def __init__(self, names: list[str]) -> None:
        super().__init__(f"no such process: {', '.join(names)}")
        self.names = names


class Commands:
    """The daemon's side of every control method."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def handle_command(self, request: Request, responder: Responder) -> None:
        try:
            self._handle(request, responder)
        except UnknownNames as exc:
            responder.error(ErrorCode.NO_SUCH_PROCESS, str(exc), exc.names)

    def _handle(self, request: Request, responder: Responder) -> None:
        match request.params:
            case StatusParams(names=names):
                responder.result(self.status(names))
            case StartParams(names=names, wait=wait):
                self._change(names, wait, responder, (Start(),))
            case StopParams(names=names, wait=wait):
                self._change(names, wait, responder, (Stop(),))
            case RestartParams(names=names, wait=wait):
                self._change(names, wait, responder, (Stop(), Start()))
            case SignalParams(names=names) as params:
                responder.result(self.signal(int(params.signum), names))
            case ReloadParams():
                self._reload(responder)
            case TailParams() as params:
                self._tail(params, responder)
            case PidParams(name=name):
                responder.result(self._pid(name))
            case VersionParams():
                config = str(self.daemon.config.path)
                responder.result(VersionResult(version=__version__, pid=os.getpid(), config=config))
            case ShutdownParams():
                responder.result(ShutdownResult(ok=True))
                self.daemon.shutdown()

    # -- names ------------------------------------------------------------------------

    def resolve(self, names: list[str] | None) -> list[str]:
        """Process names for `names`: processes, programs, `prog:*`, globs or "all" (names.py)."""
        daemon = self.daemon
        if not names:
            return list(daemon.slots)
        programs = {p: [n for n in ns if n in daemon.slots] for p, ns in daemon.programs.items()}
        found, unknown = select_names(names, programs)
        if unknown:
            raise UnknownNames(unknown)
        return found

    # -- status -----------------------------------------------------------------------

    def status(self, names: list[str] | None) -> list[dict[str, Any]]:
        now, wall = self.daemon.clock(), time.time()
        return [self.info(name, now, wall) for name in self.resolve(names)]

    def info(self, name: str, now: float, wall: float) -> dict[str, Any]:
        """One `ProcessInfo` (protocol.py), as a plain dict.

        `status` of 1,000 processes must answer in milliseconds; validating a thousand
        models we built ourselves would be most of that time. tests/ check the shape
        against `protocol.ProcessInfo`.
        """
        slot = self.daemon.slots[name]
        process = slot.process
        started = process.started_at if process.pid is not None else None
        return {
            "name": name,
            "program": slot.program,
            "state": process.state.value,
            "pid": process.pid,
            "uptime": None if started is None else round(now - started, 3),
            "exit_code": process.exit_code,
            "exit_signal": signal_name(process.exit_signal) if process.exit_signal else None,
            "restarts": process.restarts,
            "spawn_error": process.spawn_error,
            "description": describe(process, now, wall),
        }

    # -- start / stop / restart -------------------------------------------------------

    def _change(
        self, names: list[str], wait: bool, responder: Responder, events: tuple[Start | Stop, ...]
    ) -> None:
        """start (Start), stop (Stop) or restart (Stop then Start) the named processes."""
        daemon = self.daemon
        up = isinstance(events[-1], Start)  # where the processes are meant to end up
        if daemon.shutting_down and up:
            responder.error(ErrorCode.SHUTTING_DOWN, "supd is shutting down")
            return
        targets = self.resolve(names)
        for name in targets:
            if daemon.slots[name].retiring:
                continue  # a reload is replacing or removing it: leave it to that
            for event in events:
                daemon.send(name, event)
        settled = self._started if up else self._stopped
        if wait:
            daemon.wait_for(targets, settled, self._answer_change(targets, responder, up))
        else:
            self._answer_change(targets, responder, up, accepted=True)()

    def _started(self, name: str) -> bool:
        slot = self.daemon.slots.get(name)
        if slot is None or slot.retiring:
            return True
        process = slot.process
        return process.state in (State.RUNNING, State.FATAL) or (
            process.state in (State.STOPPED, State.EXITED) and process.want is Want.DOWN
        )

    def _stopped(self, name: str) -> bool:
        slot = self.daemon.slots.get(name)
        return slot is None or slot.retiring or slot.process.state in DOWN_STATES

    def _answer_change(
        self, targets: list[str], responder: Responder, up: bool, accepted: bool = False
    ) -> Callable[[], None]:
        """The answer once settled; with `accepted` (wait=false), ok means "under way"."""

        def finish() -> None:
            results = []
            for name in targets:
                slot = self.daemon.slots.get(name)
                if slot is None or slot.retiring:
                    gone = "being replaced or removed by a reload"
                    results.append(ActionResult(name=name, ok=False, error=gone))
                    continue
                state = slot.process.state
                if accepted:
                    ok = state is not State.FATAL if up else True
                else:
                    ok = state is State.RUNNING if up else state is not State.STOPPING
                error = None if ok else self._failure(name, state)
                results.append(ActionResult(name=name, ok=ok, state=state.value, error=error))
            responder.result(results)

        return finish

    def _failure(self, name: str, state: State) -> str:
        process = self.daemon.slots[name].process
        if process.spawn_error:
            return f"spawn error: {process.spawn_error}"
        if state is State.FATAL:
            return "exited too quickly (gave up)"
        return f"not running ({state.value})"

    # -- signal -----------------------------------------------------------------------

    def signal(self, signum: int, names: list[str]) -> list[ActionResult]:
        results = []
        for name in self.resolve(names):
            slot = self.daemon.slots[name]
            process = slot.process
            sent = self.daemon.signal_process(slot, signum, group=False)
            error = None if sent else f"not running ({process.state.value})"
            results.append(ActionResult(name=name, ok=sent, state=process.state.value, error=error))
        return results

    # -- reload -----------------------------------------------------------------------

    def _reload(self, responder: Responder) -> None:
        if self.daemon.shutting_down:
            responder.error(ErrorCode.SHUTTING_DOWN, "supd is shutting down")
            return
        try:
            added, changed, removed = self.daemon.reload()
        except ConfigError as exc:
            problems = [str(p) for p in exc.problems]
            responder.error(ErrorCode.CONFIG_INVALID, "invalid config; nothing changed", problems)
            return
        responder.result(ReloadResult(added=added, changed=changed, removed=removed))

    # -- tail -------------------------------------------------------------------------

    def _tail(self, params: TailParams, responder: Responder) -> None:
        slot = self.daemon.slots.get(params.name)
        if slot is None:
            raise UnknownNames([params.name])
        nbytes = (
            DEFAULT_TAIL_BYTES if params.bytes is None and params.lines is None else params.bytes
        )
        sink = slot.sink(params.stream)
        data = sink.read_back(nbytes=nbytes, nlines=params.lines, limit=MAX_TAIL_BYTES)
        text = data.decode(errors="replace")
        responder.result(TailResult(name=params.name, stream=params.stream, data=text))
        if params.follow:
            self.daemon.add_output_listener(_follower(params, responder))

    def _pid(self, name: str | None) -> PidResult:
        if name is None:
            return PidResult(pid=os.getpid())
        slots = self.daemon.slots
        found = [ProcessPid(name=n, pid=slots[n].process.pid) for n in self.resolve([name])]
        return PidResult(pid=found[0].pid if len(found) == 1 else None, processes=found)


def _follower(params: TailParams, responder: Responder) -> Callable[[str, str, bytes], bool]:
    """An output listener for `tail -f`; returns False once the client has gone."""

    # One decoder per follower: a UTF-8 character split across two reads stays whole.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def forward(name: str, stream: str, data: bytes) -> bool:
        if responder.closed:
            return False
        if name != params.name or stream != params.stream:
            return True
        text = decoder.decode(data)
        if not text:
            return True
        return responder.notify("output", OutputParams(name=name, stream=params.stream, data=text))

    return forward
