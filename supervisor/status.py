"""What `status` shows for one process: the protocol's `ProcessInfo`, as a plain dict.

The state machine keeps monotonic times only; turning them into the wall-clock time of
an exit (with the local time zone) happens here, at the edge, and nowhere else.
"""

from __future__ import annotations

import json
import time
from json.encoder import encode_basestring_ascii as _json_str
from typing import Any

from .cgroups import CgroupStats
from .deaths import Death, format_clock
from .facts import State
from .process import Process, Want
from .sessions import ProcStat, command_line, wchan
from .signals import name as signal_name

_STATE_NAMES = {state: state.value for state in State}


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
        last = f" ({short_death(process.history[-1])})" if process.history else ""
        return f"{process.restart_count()} in {wait:.1f} s{last}"
    if state is State.FATAL and process.revive_at is not None:
        return f"{process.reason}; revive in {format_clock(process.revive_at - now)}"
    if state is State.FATAL and (process.reason or "").startswith("crash loop"):
        return process.reason or ""
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
    process: Process,
    now: float,
    wall_now: float,
    stopped_by: int | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One `ProcessInfo` (protocol_models.py) as a plain dict.

    `status` of 1,000 processes must answer in milliseconds; validating a thousand
    models we built ourselves would be most of that time. tests/ check the shape
    against `protocol_models.ProcessInfo`.
    """
    # Called 10,000 times for one `status` at M8 size: schedule() is inlined and the
    # enum's value looked up in a dict (Enum.value is a descriptor call).
    state = process.state
    pid = process.pid
    started = process.started_at if pid is not None else None
    exit_signal = process.exit_signal
    backoff = process.backoff_until if state is State.BACKOFF else None
    revive = process.revive_at if state is State.FATAL else None
    row: dict[str, Any] = {
        "name": process.name,
        "program": process.config.name,
        "state": _STATE_NAMES[state],
        "pid": pid,
        "uptime": None if started is None else round(now - started, 3),
        "exit_code": process.exit_code,
        "exit_signal": signal_name(exit_signal) if exit_signal else None,
        "restarts": process.restarts,
        "spawn_error": process.spawn_error,
        "description": (
            # describe()'s most common line, without its calls (10,000 rows at M8 size)
            f"pid {pid}, uptime {format_uptime(now - started)}"
            if started is not None and _plainly_running(process, stopped_by)
            else describe(process, now, wall_now, stopped_by)
        ),
        "healthy": process.healthy,
        "health_error": process.health_error,
        "waiting_for": process.waiting_for,
        "notify_status": process.notify_status,
        "next_start_in": None if backoff is None else round(max(0.0, backoff - now), 3),
        "consecutive_failures": process.failures,
        "revive_in": None if revive is None else round(max(0.0, revive - now), 3),
        "reason": process.reason,
    }
    if extra:
        row.update(extra)
        survivors = extra.get("survivors")
        if survivors:
            listed = ", ".join(f"pid {s['pid']} {s['state']} in {s['wchan']}" for s in survivors)
            row["description"] = f"{row['description']}; survived SIGKILL: {listed}"
    return row


def _plainly_running(process: Process, stopped_by: int | None) -> bool:
    """RUNNING with nothing to add to `pid N, uptime T`: most rows of a big status."""
    return (
        process.state is State.RUNNING
        and process.pid is not None
        and stopped_by is None
        and process.waiting_for is None
        and process.healthy is None
        and not process.notify_state
        and not process.notify_status
    )


# Rows that are not plainly running go through json; ASCII escapes keep every row
# encodable as UTF-8, whatever a reason or an error message holds.
_ROW_ENCODER = json.JSONEncoder(check_circular=False, separators=(",", ":"))


def rows_json(
    entries: list[tuple[Process, int | None]],
    now: float,
    wall_now: float,
    extra: dict[str, dict[str, Any]],
) -> str:
    """The `status` result for `entries` as JSON text: the list of `info()` rows.

    At 10,000 processes, building 10,000 dicts and encoding them is most of a `status`
    (26 + 20 ms here). A plainly running process's row is written straight from its
    fields instead, which halves that; tests hold every row equal to `info()`'s.
    """
    out: list[str] = []
    for process, stopped_by in entries:
        more = extra.get(process.name)
        started = process.started_at
        if more or started is None or not _plainly_running(process, stopped_by):
            out.append(_ROW_ENCODER.encode(info(process, now, wall_now, stopped_by, more)))
            continue
        up = now - started
        out.append(
            f'{{"name":{_json_str(process.name)},"program":{_json_str(process.config.name)},'
            f'"state":"RUNNING","pid":{process.pid},"uptime":{round(up, 3)!r},'
            f'"exit_code":{_json_int(process.exit_code)},"exit_signal":'
            f"{_json_opt_str(signal_name(process.exit_signal) if process.exit_signal else None)},"
            f'"restarts":{process.restarts},"spawn_error":{_json_opt_str(process.spawn_error)},'
            f'"description":"pid {process.pid}, uptime {format_uptime(up)}",'
            f'"healthy":null,"health_error":{_json_opt_str(process.health_error)},'
            f'"waiting_for":null,"notify_status":null,"next_start_in":null,'
            f'"consecutive_failures":{process.failures},"revive_in":null,'
            f'"reason":{_json_opt_str(process.reason)}}}'
        )
    return "[" + ",".join(out) + "]"


def _json_int(value: int | None) -> str:
    return "null" if value is None else str(int(value))


def _json_opt_str(value: str | None) -> str:
    return "null" if value is None else _json_str(value)


# -- crash loops and deaths: the schedule, what supd does next, the death records -------


def schedule(process: Process, now: float) -> dict[str, Any]:
    """`next_start_in`, `consecutive_failures`, `revive_in` and `reason`."""
    backoff = process.backoff_until if process.state is State.BACKOFF else None
    revive = process.revive_at if process.state is State.FATAL else None
    return {
        "next_start_in": None if backoff is None else round(max(0.0, backoff - now), 3),
        "consecutive_failures": process.failures,
        "revive_in": None if revive is None else round(max(0.0, revive - now), 3),
        "reason": process.reason,
    }


def short_death(death: Death) -> str:
    """`exited 1`, `killed by SIGSEGV`, `spawn error`: for the BACKOFF line."""
    if death.exit_signal is not None:
        return f"killed by {signal_name(death.exit_signal)}"
    if death.exit_code is not None:
        return f"exited {death.exit_code}"
    return death.cause.value


def _clock(wall_now: float, now: float, then: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(wall_now - (now - then)))


def next_action(process: Process, now: float, wall_now: float) -> str:
    """What supd will do next with the process, for `supctl why`."""
    state = process.state
    if state is State.BACKOFF and process.backoff_until is not None:
        wait = max(0.0, process.backoff_until - now)
        return f"{process.restart_count()} in {wait:.1f} s"
    if state is State.FATAL and process.revive_at is not None:
        at = _clock(wall_now, now, process.revive_at)
        return f"revive at {at} (in {format_clock(process.revive_at - now)})"
    if state is State.STARTING and process.config.ready is not None:
        return f"wait for it to be ready ({process.config.ready.describe()}) and up (startsecs)"
    if state is State.STARTING:
        return "wait for it to be up (startsecs)"
    if process.waiting_for is not None and process.pid is None:
        return f"start it once its dependencies are met ({process.waiting_for})"
    if state is State.RUNNING:
        return "keep it running"
    if state is State.STOPPING:
        return "start it again once it is down" if process.want is Want.UP else "stop it"
    if process.stop_by is not None and process.stop_asked_at is not None:
        at = _clock(wall_now, now, process.stop_asked_at)
        return f"nothing: stopped by {process.stop_by} at {at}"
    if state is State.FATAL:
        return "nothing: gave up (supctl start starts it with a fresh count)"
    if state is State.EXITED:
        return "nothing: it exited and autorestart says not to restart it"
    return "nothing: not started"


def death_info(death: Death) -> dict[str, Any]:
    """One `DeathInfo` (protocol_models.py) as a plain dict."""
    return {
        "time": death.wall,
        "uptime": None if death.uptime is None else round(death.uptime, 3),
        "pid": death.pid,
        "cause": death.cause.value,
        "summary": death.summary,
        "exit_code": death.exit_code,
        "exit_signal": None if death.exit_signal is None else signal_name(death.exit_signal),
        "core_dumped": death.core_dumped,
        "expected": death.expected,
        "sender": death.sender,
        "stopped_by": death.stopped_by,
        "then": death.then,
        "tail": death.tail,
    }


def deaths_info(process: Process, now: float, wall_now: float, limit: int) -> dict[str, Any]:
    """One `DeathsResult` (protocol_models.py) as a plain dict: what `supctl why` shows."""
    recent = list(process.history)[-limit:][::-1]
    return {
        "name": process.name,
        "state": process.state.value,
        "description": describe(process, now, wall_now),
        "next": next_action(process, now, wall_now),
        **schedule(process, now),
        "blocking": [process.waiting_for] if process.waiting_for else [],  # dependencies
        "deaths": [death_info(d) for d in recent],
    }


def cgroup_extra(stats: CgroupStats | None, survivors: list[ProcStat] | None) -> dict[str, Any]:
    """What a process's cgroup adds to its `status` row (`ProcessInfo`'s last fields):
    accounting when asked for (`stats`), and what SIGKILL did not end."""
    extra: dict[str, Any] = {}
    if stats is not None:
        extra |= {
            "cpu_seconds": stats.cpu_seconds,
            "memory_bytes": stats.memory_bytes,
            "oom_kills": stats.oom_kills,
        }
    if survivors:
        extra["survivors"] = [
            {
                "pid": s.pid,
                "state": s.state,
                "wchan": wchan(s.pid),
                "command": command_line(s.pid, s.command),
            }
            for s in survivors
        ]
    return extra
