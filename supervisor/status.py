"""What `status` shows for one process: the protocol's `ProcessInfo`, as a plain dict.

The state machine keeps monotonic times only; turning them into the wall-clock time of
an exit (with the local time zone) happens here, at the edge, and nowhere else.
"""

from __future__ import annotations

import time
from typing import Any

from .facts import State
from .process import Process
from .signals import name as signal_name


def format_uptime(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{days} day{'s' if days != 1 else ''}, {clock}" if days else clock


def describe(process: Process, now: float, wall_now: float, stopped_by: int | None = None) -> str:
    """The one-line summary `status` shows, supervisorctl style.

    `now` is monotonic; `wall_now` is only used to print the wall-clock time of an exit.
    `stopped_by` is the signal that stopped a running child (SIGSTOP, SIGTSTP), if any.
    """
    state = process.state
    if process.waiting_for is not None and process.pid is None:
        return process.waiting_for  # a dependency not met yet (issue 14)
    if state in (State.RUNNING, State.STARTING, State.STOPPING) and process.pid is not None:
        running = f"pid {process.pid}, uptime {format_uptime(process.uptime(now))}"
        if stopped_by is not None:
            return f"{running}, stopped ({signal_name(stopped_by)})"
        return running + _health_mark(process)
    if state is State.BACKOFF and process.backoff_until is not None:
        wait = max(0.0, process.backoff_until - now)
        return f"restarting in {wait:.1f} s"
    if state is State.FATAL and process.spawn_error:
        return process.spawn_error
    if process.stopped_at is None:
        return "not started"
    at = time.strftime("%H:%M:%S", time.localtime(wall_now - (now - process.stopped_at)))
    if process.spawn_error:
        return f"{process.spawn_error} at {at}"
    if process.exit_signal is not None:
        what = f"killed by {signal_name(process.exit_signal)}"
    else:
        what = f"exited {process.exit_code}"
    if state is State.FATAL:
        return f"{what} at {at}, exited too quickly"
    return f"{what} at {at}"


def _health_mark(process: Process) -> str:
    """ ", HEALTHY" / ", UNHEALTHY: why" for a process with a health check, and the
    program's own STATUS= line if it sent one."""
    mark = ""
    if process.state is State.STARTING and process.ready_error:
        mark = f", not ready: {process.ready_error}"
    if process.healthy is True:
        mark = ", HEALTHY"
    elif process.healthy is False:
        mark = f", UNHEALTHY: {process.health_error}"
    if process.notify_state:
        mark += f", {process.notify_state}"
    if process.notify_status:
        mark += f", {process.notify_status}"
    return mark


def info(
    process: Process, now: float, wall_now: float, stopped_by: int | None = None
) -> dict[str, Any]:
    """One `ProcessInfo` (protocol.py) as a plain dict.

    `status` of 1,000 processes must answer in milliseconds; validating a thousand
    models we built ourselves would be most of that time. tests/ check the shape
    against `protocol.ProcessInfo`.
    """
    started = process.started_at if process.pid is not None else None
    return {
        "name": process.name,
        "program": process.config.name,
        "state": process.state.value,
        "pid": process.pid,
        "uptime": None if started is None else round(now - started, 3),
        "exit_code": process.exit_code,
        "exit_signal": signal_name(process.exit_signal) if process.exit_signal else None,
        "restarts": process.restarts,
        "spawn_error": process.spawn_error,
        "description": describe(process, now, wall_now, stopped_by),
        "healthy": process.healthy,
        "health_error": process.health_error,
        "waiting_for": process.waiting_for,
        "notify_status": process.notify_status,
    }
