"""Re-exec: the daemon's state across an `execve` of a new supd in the same process.

`supctl reexec` (or SIGUSR1) replaces the running daemon with a freshly exec'd one that
keeps every child. The pid does not change, so the children stay its children
(`waitid` works, PDEATHSIG is tied to the thread, which exec keeps) and systemd sees the
same MAINPID. What must cross the exec is written here as JSON to a memfd that the new
supd inherits (its number in $SUPD_REEXEC_STATE):

- the config in force (the [supervisor] table and every program, as data: the new supd
  adopts with exactly what the children were started with, then reloads the file);
- every process: its name and program, and every field of its `Process` (the state,
  why, pid, failure counters, what the operator asked for...). Monotonic times
  (`*_at`, `*_until`, `*_deadline`) and armed timers are stored as seconds relative to the moment
  of the exec and re-based on the other side. Fields are taken generically from the
  dataclass, so a field added to `Process` later crosses too, and one the new version
  does not know is ignored (a missing one keeps its default);
- each child's pipe fds (stdout, stderr, the fork path's exec report);
- the control socket's listening fd (and the inode supd bound, so it can still unlink
  or move it), the instance lock's fd, the programs' sd_notify socket's fd, systemd's
  variables for supd (NOTIFY_SOCKET, WATCHDOG_*: they were taken out of the environment
  at start), and a generation count.

Exactly those fds are made inheritable; everything else supd holds is close-on-exec and
goes away with the old image (the epoll fd, signalfd, timerfds, log files, client
connections: clients are disconnected; supctl retries idempotent calls once).

A failing new binary must not take the children with it, and after `execve` there is no
old process to fall back to. So the new code is tried first, in a child: `supd
--reexec-probe` with the same interpreter and argv reads this very state on stdin and
must import everything, parse the state and rebuild the config, then print "adoptable"
within PROBE_TIMEOUT_S. Only then does the daemon exec; if the probe fails (a syntax
error in an upgraded module, a state it cannot read, a hang), the reexec is refused and
the old daemon carries on untouched. docs/reexec.md has the whole argument.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import types
import typing
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from dataclasses import field as default
from pathlib import Path
from typing import Any

from .deaths import Death, DeathRing, RestartWindow
from .process import Process, Timer
from .settings import Program, Settings, Supervisor, build, dump

STATE_VERSION = 1
ENV_STATE_FD = "SUPD_REEXEC_STATE"
PROBE_ARG = "--reexec-probe"
PROBE_ANSWER = "adoptable"
PROBE_TIMEOUT_S = 10.0

# Process fields that hold monotonic times: stored relative to the exec.
_TIME_SUFFIXES = ("_at", "_until", "_deadline")


@dataclass
class ProcessState:
    name: str
    program: str
    # Its program's config: an index into DaemonState.programs + process_programs.
    config: int = -1
    child_pid: int | None = None  # the live (or exited, not yet reaped) child
    fields: dict[str, Any] = default(default_factory=dict)  # the Process's own (times relative)
    timers: dict[str, float] = default(default_factory=dict)  # timer kind -> seconds left
    stdout_fd: int | None = None
    stderr_fd: int | None = None
    exec_error_fd: int | None = None
    via_setpriv: bool = False
    # An exec probe in flight: its answer would go to the old image, so the new one
    # kills and reaps it (and probes again at once: fleet.Adopt).
    probe_pid: int | None = None
    # When the child last printed, relative to the exec: a log-silence health check
    # counts the silence from then, not from the child's start.
    last_output: float | None = None


@dataclass
class DaemonState:
    """Unknown fields (from a newer or older supd) are ignored; missing ones default."""

    version: int
    config_path: str
    supervisor: dict[str, Any]
    programs: list[dict[str, Any]]  # the config in force
    generation: int = 1  # how many re-execs this daemon has been through
    # Programs processes run with that are not in the config any more (a removed
    # program still stopping); indexed after `programs`.
    process_programs: list[dict[str, Any]] = default(default_factory=list)
    sources: dict[str, str] = default(default_factory=dict)
    processes: list[ProcessState] = default(default_factory=list)
    retiring: list[str] = default(default_factory=list)
    swaps: dict[str, dict[str, Any]] = default(default_factory=dict)  # process -> its next program
    listen_fd: int | None = None
    socket_inode: tuple[int, int] | None = None
    lock_fd: int | None = None
    lock_path: str | None = None
    # The programs' sd_notify socket (childnotify.py): the children hold its address,
    # and what they sent during the exec waits in it.
    child_notify_fd: int | None = None
    systemd: dict[str, str] = default(default_factory=dict)
    subreaper: bool = False
    fd_limit: tuple[int, int] | None = None  # what supd started with (children get it)
    # The daemon's monotonic clock when the times above were taken. CLOCK_MONOTONIC is
    # the same across execve (same boot), so the new supd re-bases on it and the exec's
    # own duration does not delay a single timer.
    clock_at: float | None = None


class StateError(Exception):
    pass


# -- processes ------------------------------------------------------------------------


def _is_time(key: str) -> bool:
    return key == "at" or key.endswith(_TIME_SUFFIXES)


def _save(value: Any, now: float, key: str = "") -> Any:
    """JSON data for a field's value: dataclasses field by field, enums by value,
    containers as lists, monotonic times (by name) relative to `now`."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _save(getattr(value, f.name), now, f.name)
            for f in dataclasses.fields(value)
            if not callable(getattr(value, f.name))
        }
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple, set, frozenset, deque)):
        return [_save(v, now) for v in value]
    if isinstance(value, dict):
        return {str(k): _save(v, now) for k, v in value.items()}
    if isinstance(value, float) and _is_time(key):
        return value - now
    return value


def _revive(hint: Any, value: Any, base: float, key: str = "") -> Any:
    """The inverse of _save, guided by the type hint; raises on what does not fit."""
    if value is None:
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _revive(arg, value, base, key)
            except (TypeError, ValueError, KeyError):
                continue
        raise ValueError(f"{value!r} fits none of {hint}")
    if origin is typing.Literal or hint is Any:
        return value
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return hint(value)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        hints = _hints(hint)
        kwargs = {
            f.name: _revive(hints[f.name], value[f.name], base, f.name)
            for f in dataclasses.fields(hint)
            if f.name in value
        }
        return hint(**kwargs)
    if origin is tuple and args and args[-1] is not Ellipsis:  # tuple[Cause, str]
        return tuple(_revive(a, v, base) for a, v in zip(args, value, strict=True))
    if origin in (list, tuple, set, frozenset, deque):
        element = args[0] if args else Any
        return origin(_revive(element, v, base) for v in value)
    if hint is float and _is_time(key) and isinstance(value, int | float):
        return base + value
    if hint is float and isinstance(value, int):
        return float(value)
    return value


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _save_window(window: RestartWindow, now: float) -> Any:
    return [t - now for t in window.times]


def _load_window(data: Any, base: float) -> RestartWindow:
    window = RestartWindow()
    window.times.extend(base + float(t) for t in data)
    return window


def _save_history(ring: DeathRing, now: float) -> Any:
    return [_save(death, now) for death in ring]


def _load_history(data: Any, base: float) -> DeathRing:
    return DeathRing(_revive(Death, death, base) for death in data)


# Fields the generic rules cannot handle: (save, load).
_CODECS: dict[str, tuple[Callable[[Any, float], Any], Callable[[Any, float], Any]]] = {
    "window": (_save_window, _load_window),
    "history": (_save_history, _load_history),
}


def process_fields(process: Process, now: float) -> dict[str, Any]:
    """Every field of the dataclass but the config (and functions, such as the jitter's
    randomness); monotonic times relative to `now`."""
    out: dict[str, Any] = {}
    for field in dataclasses.fields(process):
        if field.name in ("name", "config"):
            continue
        value = getattr(process, field.name)
        if callable(value) and not dataclasses.is_dataclass(value):
            continue
        codec = _CODECS.get(field.name)
        out[field.name] = codec[0](value, now) if codec else _save(value, now, field.name)
    return out


def restore_process(
    name: str, config: Program, saved: dict[str, Any], base: float, **init: Any
) -> Process:
    """A Process with the saved fields this version knows (others keep their defaults;
    a value that no longer fits its field is dropped, not guessed). `init`: what the
    constructor needs besides (the jitter's `draw`)."""
    process = Process(name, config, **init)
    hints = _hints(Process)
    known = {f.name for f in dataclasses.fields(process)}
    for key, value in saved.items():
        if key not in known or key in ("name", "config", *init):
            continue
        try:
            codec = _CODECS.get(key)
            revived = codec[1](value, base) if codec else _revive(hints[key], value, base, key)
        except (TypeError, ValueError, KeyError):
            continue
        current = getattr(process, key)
        if isinstance(current, deque) and isinstance(revived, deque):
            current.extend(revived)  # keeps the default's maxlen
        else:
            setattr(process, key, revived)
    return process


# -- the whole state ---------------------------------------------------------------------


def program_data(program: Program) -> dict[str, Any]:
    """A program as data: only what differs from the defaults."""
    return dump(program)


def program_from(data: dict[str, Any]) -> Program:
    """A program as saved; keys this version does not know are dropped."""
    return build(Program, data)


def rebuild(state: DaemonState) -> tuple[Settings, list[Program]]:
    """The config in force before the exec, and every process's program by index. The
    saved data was the old daemon's runtime config, validated when it was loaded; the
    file itself is checked again by the reload that ends the adoption."""
    programs = [program_from(d) for d in state.programs]
    extras = [program_from(d) for d in state.process_programs]
    supervisor = build(Supervisor, state.supervisor)
    sources = {k: Path(v) for k, v in state.sources.items()}
    config = Settings(Path(state.config_path), supervisor, {p.name: p for p in programs}, sources)
    return config, programs + extras


def encode(state: DaemonState) -> bytes:
    return json.dumps(dataclasses.asdict(state), separators=(",", ":")).encode()


def decode(data: bytes) -> DaemonState:
    try:
        raw = json.loads(data)
    except ValueError as exc:
        raise StateError(f"the saved state is not JSON: {exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("version"), int):
        raise StateError("the saved state has no version")
    if raw["version"] > STATE_VERSION:
        raise StateError(f"state version {raw['version']} is newer than {STATE_VERSION}")
    try:
        state = _revive(DaemonState, raw, 0.0)
    except (TypeError, ValueError, KeyError) as exc:
        raise StateError(f"the saved state is invalid: {type(exc).__name__}: {exc}") from None
    if not isinstance(state, DaemonState) or not isinstance(state.config_path, str):
        raise StateError("the saved state is invalid")
    return state


def write_memfd(data: bytes) -> int:
    """An inheritable memfd holding `data`, read from offset 0."""
    fd = os.memfd_create("supd-reexec-state", 0)  # no MFD_CLOEXEC: the new supd reads it
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_fd(fd: int) -> bytes:
    chunks = []
    os.lseek(fd, 0, os.SEEK_SET)
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def take_state_fd(environ: dict[str, str] | Any) -> int | None:
    """The inherited state's fd, removed from the environment (no child sees it)."""
    value = environ.pop(ENV_STATE_FD, None)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None


def time_base(state: DaemonState, now: float) -> float:
    """What the saved relative times are relative to, on the adopting side."""
    if state.clock_at is not None and state.clock_at <= now:
        return state.clock_at
    return now  # another clock (it cannot go back): count from now


def timers_data(timers: Iterable[tuple[Timer, float]], now: float) -> dict[str, float]:
    return {timer.value: deadline - now for timer, deadline in timers}
