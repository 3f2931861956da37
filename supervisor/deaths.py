"""Why a process died, and the crash-loop arithmetic: pure, no I/O, no clock.

A `Death` is one record of a process's ring (the last `DEATHS_KEPT`), built by the
state machine (process.py) from what the process was doing when it ended and what the
daemon saw (exit status, core dump, the output tail, the cgroup's OOM counter).

Who sent a killing signal is not something the kernel tells a parent: waitid()'s
siginfo describes the child (its pid, uid and status), not the killer. So a signal is
classified from supd's own record of what it sent: the stop signal and the SIGKILL of a
stop it ran itself, and `supctl signal` (which goes through supd). Any other signal was
"not sent by supd": the kernel (a fault: SIGSEGV, SIGBUS...), the OOM killer, another
process, or the program itself (abort()). A SIGKILL is called an OOM kill only when the
process's cgroup counted one (memory.events oom_kill rose during the run).

This module imports the runtime config (settings) and the signal names only.
"""

from __future__ import annotations

import enum
import signal
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from .settings import Program
from .signals import name as signal_name

DEATHS_KEPT = 20  # per process
TAIL_BYTES = 2048  # of stderr (stdout with redirect_stderr) kept with each death
# ... with the newest TAILS_KEPT deaths only: 10,000 crash-looping programs would
# otherwise hold 400 MB of old output. Older records keep everything else.
TAILS_KEPT = 5
DEFAULT_MAX_RESTARTS = 5  # within restart_window, unless startretries is higher


class Cause(enum.StrEnum):
    EXITED = "exited"  # it exited on its own, with a code
    STOPPED = "stopped"  # the operator, a reload or shutdown stopped it, and it obeyed
    STOP_TIMEOUT = "stop-timeout"  # it outlived stopwaitsecs: SIGKILL
    KILLED = "killed"  # a signal supd did not send
    SIGNALLED = "signalled"  # a signal the operator sent through supd (supctl signal)
    OOM = "oom"  # SIGKILL, and the cgroup counted an OOM kill
    SPAWN_ERROR = "spawn-error"  # it never ran: exec (or an env file...) failed
    NOT_READY = "not-ready"  # stopped because its readiness check timed out
    UNHEALTHY = "unhealthy"  # stopped because its health checks failed


# Causes that a check outside the state machine (readiness, health) pins on the next
# death with `Process.blame`, before it stops the process.
BLAMEABLE = frozenset({Cause.NOT_READY, Cause.UNHEALTHY})

StopBy = str  # "operator", "reload" or "shutdown"


@dataclass(slots=True)
class Death:
    """One death of a process. `then` is filled in by what the machine decided next."""

    at: float  # monotonic
    wall: float | None  # time.time() of the exit, for people
    pid: int | None
    uptime: float | None  # seconds the run lasted (None: it never ran)
    cause: Cause
    summary: str  # "exited 1", "killed by SIGSEGV (core dumped), not sent by supd"
    exit_code: int | None = None
    exit_signal: int | None = None
    core_dumped: bool = False
    expected: bool | None = None  # exited: the code is in `exitcodes`
    sender: str | None = None  # who sent the signal, as far as supd knows
    stopped_by: StopBy | None = None
    tail: str = ""
    then: str = ""  # "restart 3 of 5 in 4.0 s", "FATAL: crash loop...", "stays down"

    def line(self) -> str:
        """`exited 1 after 0.8 s`: the summary with the run's length."""
        if self.uptime is None:
            return self.summary
        return f"{self.summary} after {format_seconds(self.uptime)}"


def format_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    return format_clock(seconds)


def format_clock(seconds: float) -> str:
    """9:41, 1:02:03: minutes and seconds (and hours when there are any)."""
    whole = max(0, round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


@dataclass(frozen=True, slots=True)
class Ending:
    """What the daemon saw of an ending, besides the exit status (all optional)."""

    wall: float | None = None
    core_dumped: bool = False
    operator_signals: frozenset[int] = frozenset()  # sent to this child by supctl signal
    oom_killed: bool | None = None  # None: no cgroup counter to ask
    tail: str = ""


NO_ENDING = Ending()


def classify(
    *,
    stopping: bool,
    stop_by: StopBy | None,
    timed_out: bool,
    blame: tuple[Cause, str] | None,
    exit_code: int | None,
    exit_signal: int | None,
    ending: Ending,
    config: Program,
) -> tuple[Cause, str, str | None, bool | None]:
    """(cause, summary, sender, expected) of a run that ended."""
    core = " (core dumped)" if ending.core_dumped else ""
    killed_by = f"killed by {signal_name(exit_signal)}{core}" if exit_signal else ""
    if blame is not None:
        cause, message = blame
        return cause, f"{cause.value}: {message}", "supd" if exit_signal else None, None
    if stopping and timed_out and exit_signal == signal.SIGKILL:
        waited = f"{config.stopwaitsecs:g}"
        return Cause.STOP_TIMEOUT, f"still running {waited} s after the stop: SIGKILL", "supd", None
    if stopping:
        how = killed_by or f"exited {exit_code}"
        sender = "supd" if exit_signal in (config.stopsignal, signal.SIGKILL) else None
        return Cause.STOPPED, f"stopped by {stop_by or 'operator'} ({how})", sender, None
    if exit_signal is None:
        expected = exit_code in config.exitcodes
        note = "" if expected else ", unexpected"
        return Cause.EXITED, f"exited {exit_code}{note}", None, expected
    if exit_signal in ending.operator_signals:
        return Cause.SIGNALLED, f"{killed_by} (sent with supctl signal)", "operator", None
    if exit_signal == signal.SIGKILL:
        if ending.oom_killed:
            return Cause.OOM, "killed by the OOM killer (cgroup oom_kill rose)", "kernel", None
        return Cause.KILLED, "SIGKILL not sent by supd (possibly OOM)", "not supd", None
    return Cause.KILLED, f"{killed_by}, not sent by supd", "not supd", None


# -- the crash-loop arithmetic --------------------------------------------------------


def jittered(delay: float, jitter: float, draw: Callable[[], float]) -> float:
    """`delay` spread uniformly over [delay * (1 - jitter), delay]; `draw` is in [0, 1]."""
    if delay <= 0 or jitter <= 0:
        return delay
    return delay * (1.0 - jitter * min(1.0, max(0.0, draw())))


def no_jitter() -> float:
    """The pure core's default draw: every delay is its upper bound (the daemon injects
    random.random), so tests of exact delays stay exact."""
    return 0.0


class DeathRing:
    """A process's last DEATHS_KEPT deaths, oldest first, with the deque ways the rest
    of supd uses. Its list is made at the first death: an empty deque(maxlen=20) costs
    770 bytes, 7.5 MiB for 10,000 processes that never died."""

    __slots__ = ("_items",)
    maxlen = DEATHS_KEPT

    def __init__(self, deaths: Iterable[Death] = ()) -> None:
        self._items: list[Death] | None = None
        self.extend(deaths)

    def append(self, death: Death) -> None:
        items = self._items
        if items is None:
            items = self._items = []
        items.append(death)
        if len(items) > DEATHS_KEPT:
            del items[0]

    def extend(self, deaths: Iterable[Death]) -> None:
        for death in deaths:
            self.append(death)

    def clear(self) -> None:
        self._items = None

    def __len__(self) -> int:
        return 0 if self._items is None else len(self._items)

    def __iter__(self) -> Iterator[Death]:
        return iter(self._items or ())

    def __getitem__(self, index: int) -> Death:
        if self._items is None:
            raise IndexError("no death recorded")
        return self._items[index]

    def __repr__(self) -> str:
        return f"DeathRing({self._items or []!r})"


class RestartWindow:
    """The times of automatic restarts within the last `restart_window` seconds."""

    __slots__ = ("times",)

    def __init__(self) -> None:
        # A list, not a deque: an empty deque holds a 64-slot block (0.7 KiB for every
        # process, most of which never restart), and the window holds a handful.
        self.times: list[float] = []

    def prune(self, now: float, config: Program) -> int:
        """Forget restarts older than the window; returns how many remain."""
        horizon = now - config.restart_window
        times = self.times
        old = 0
        while old < len(times) and times[old] <= horizon:
            old += 1
        if old:
            del times[:old]
        return len(times)

    def full(self, now: float, config: Program) -> bool:
        """`max_restarts` restarts already happened within the window (a window of 0 s:
        no limit)."""
        if config.restart_window <= 0:
            return False
        return self.prune(now, config) >= window_limit(config)

    def add(self, now: float, config: Program) -> None:
        # Without a window nothing is counted: a restart-forever program must not pile up
        # a float per restart (found by the churn benchmark: +7 KiB a second).
        if config.restart_window > 0:
            self.times.append(now)

    def clear(self) -> None:
        self.times.clear()

    def __len__(self) -> int:
        return len(self.times)


def window_limit(config: Program) -> int:
    """Automatic restarts allowed within `restart_window`: `max_restarts`, by default
    max(5, startretries), so that consecutive failed starts meet `startretries` first
    (supervisord's behaviour) and the window catches what startretries never sees: a
    program that dies after reaching RUNNING, again and again."""
    if config.max_restarts is not None:
        return config.max_restarts
    return max(DEFAULT_MAX_RESTARTS, config.startretries)


def crash_loop_reason(config: Program) -> str:
    return f"crash loop: {window_limit(config)} restarts in {config.restart_window:g} s"
