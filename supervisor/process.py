"""The process state machine: pure, no I/O.

One `Process` per supervised process (``web`` or ``web:0``). The fleet feeds it events
(`Start`, `Stop`, `Spawned`, `Exited`, `TimerFired`, ...) with the current monotonic time,
and it answers with a list of effects (`Spawn`, `Kill`, `ArmTimer`, ...) that the fleet
and the daemon carry out. Nothing here touches the OS, the selector or the logger, so
every transition is tested as plain data (tests/test_process.py).

Desired state (`want`) is kept apart from actual state (`state`), as s6 and runit do: a
`Stop` while STOPPING is a no-op, a `Start` while STOPPING means "come back up once the old
one is gone", and autorestart is simply "want is UP and the policy says restart".

Rules said once, here: `stopwaitsecs = 0` means no grace period: a stop is SIGKILL at
once (the stop signal is not sent). A restart delay of 0 is still a timer: every retry
goes back through the daemon's loop, so a crash loop cannot starve anything else.

This module imports nothing from supd but the config model, the state names (facts)
and the signal names; it reads no clock (`now` comes with every event).
"""

from __future__ import annotations

import enum
import math
import signal
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from . import deaths
from .config import ProgramConfig
from .deaths import NO_ENDING, Cause, Death, Ending, RestartWindow
from .facts import State as State  # re-exported: the state machine's states
from .signals import name as signal_name

# A process is "down" in these: none runs, and none will without a command.
DOWN_STATES = frozenset({State.STOPPED, State.EXITED, State.FATAL})


class Want(enum.Enum):
    UP = "up"
    DOWN = "down"


class Timer(enum.Enum):
    """Why a timer was armed; each process has at most one timer of each kind."""

    STARTSECS = "startsecs"
    BACKOFF = "backoff"
    STOP_TIMEOUT = "stop_timeout"
    REVIVE = "revive"  # revive_after: a FATAL process tries again


# Events: what happened to the process.


@dataclass(frozen=True, slots=True)
class Start:
    """An operator (or autostart) wants the process up; resets the failure counters."""


@dataclass(frozen=True, slots=True)
class Stop:
    """An operator (or shutdown, or reload) wants the process down."""

    by: deaths.StopBy = "operator"  # "operator", "reload" or "shutdown"


@dataclass(frozen=True, slots=True)
class ForceKill:
    """Stop now: SIGKILL whatever is left (a second SIGTERM during shutdown)."""


@dataclass(frozen=True, slots=True)
class Spawned:
    pid: int


@dataclass(frozen=True, slots=True)
class SpawnFailed:
    error: str
    wall: float | None = None  # time.time(), for the death record


@dataclass(frozen=True, slots=True)
class Exited:
    """The process ended: `exit_code` for a normal exit, `exit_signal` when killed."""

    exit_code: int | None
    exit_signal: int | None
    ending: Ending = NO_ENDING  # what else the daemon saw (core dump, tail, OOM...)


@dataclass(frozen=True, slots=True)
class TimerFired:
    timer: Timer


ProcessEvent = Start | Stop | ForceKill | Spawned | SpawnFailed | Exited | TimerFired


# Effects: what the daemon must do.


@dataclass(frozen=True, slots=True)
class Spawn:
    pass


@dataclass(frozen=True, slots=True)
class Kill:
    signum: int
    group: bool


@dataclass(frozen=True, slots=True)
class ArmTimer:
    timer: Timer
    delay_s: float


@dataclass(frozen=True, slots=True)
class CancelTimer:
    timer: Timer


@dataclass(frozen=True, slots=True)
class Transitioned:
    old: State
    new: State
    reason: str


@dataclass(frozen=True, slots=True)
class Ignored:
    state: State
    event: ProcessEvent


Effect = Spawn | Kill | ArmTimer | CancelTimer | Transitioned | Ignored


def backoff_delay(failures: int, config: ProgramConfig) -> float:
    """Delay before the restart that follows the n-th consecutive failure (n >= 1):
    min(backoff_max, backoff_initial * backoff_factor ** (n - 1)), computed without
    ever forming a power that could overflow (a program crash-looping for days)."""
    if failures < 1:
        return 0.0
    initial, factor, ceiling = config.backoff_initial, config.backoff_factor, config.backoff_max
    if initial <= 0 or initial >= ceiling or factor <= 1:
        return float(min(initial, ceiling))
    steps = failures - 1
    # initial * factor**steps >= ceiling  <=>  steps >= log(ceiling / initial, factor)
    if steps >= math.log(ceiling / initial) / math.log(factor):
        return float(ceiling)
    return float(min(ceiling, initial * factor**steps))


def gives_up(start_failures: int, config: ProgramConfig) -> bool:
    """The first attempt plus `startretries` retries have all failed."""
    return start_failures > config.startretries


def is_expected_exit(event: Exited, config: ProgramConfig) -> bool:
    """An exit that `autorestart = "on-failure"` leaves alone.

    A signal death while RUNNING is never expected: the daemon only signals to stop, and
    stops are handled in STOPPING.
    """
    return event.exit_signal is None and event.exit_code in config.exitcodes


@dataclass(slots=True)
class Process:
    """The supervised life of one process slot (`name`), across its restarts."""

    name: str
    config: ProgramConfig
    state: State = State.STOPPED
    want: Want = Want.DOWN
    pid: int | None = None
    last_pid: int | None = None  # the pid of the latest run, kept after it ends (logs)
    started_at: float | None = None  # monotonic time of the last spawn
    stopped_at: float | None = None  # monotonic time of the last exit
    exit_code: int | None = None
    exit_signal: int | None = None
    spawn_error: str | None = None
    restarts: int = 0  # automatic restarts, for `status`
    failures: int = 0  # consecutive failures: the backoff ladder's rung
    start_failures: int = 0  # failed starts since the last successful one
    backoff_until: float | None = None  # monotonic deadline of a pending restart
    killed: bool = field(default=False)  # SIGKILL already sent during this stop
    # -- crash loops and deaths (deaths.py) --
    draw: Callable[[], float] = field(default=deaths.no_jitter, repr=False)  # jitter
    window: RestartWindow = field(default_factory=RestartWindow)
    revive_at: float | None = None  # monotonic deadline of a pending revival
    reason: str | None = None  # why it is in its state (the last transition's reason)
    history: deque[Death] = field(default_factory=lambda: deque(maxlen=deaths.DEATHS_KEPT))
    stop_by: deaths.StopBy | None = None  # who asked for the current (or last) stop
    stop_asked_at: float | None = None  # monotonic time of that stop
    timed_out: bool = False  # this stop outlived stopwaitsecs
    blamed: tuple[Cause, str] | None = None  # readiness/health: the next death's cause

    # -- the transition table ---------------------------------------------------------

    def handle(self, event: ProcessEvent, now: float) -> list[Effect]:
        """Feed one event; returns what the daemon must do. Never raises on odd input."""
        self._note(event, now)
        match self.state, event:
            case ((State.STOPPED | State.EXITED | State.FATAL), Start()):
                return self._start(now, "start requested", reset=True)
            case State.BACKOFF, Start():
                return [CancelTimer(Timer.BACKOFF), *self._start(now, "start requested", True)]
            case ((State.STARTING | State.RUNNING), Start()):
                self.want = Want.UP
                return []
            case State.STOPPING, Start():
                self.want = Want.UP  # come back up once the old process is gone
                return []
            case State.STARTING, Spawned(pid=pid):
                return self._spawned(pid, now)
            case State.STOPPING, Spawned(pid=pid):
                # Stopped before the spawn was reported: the kill already went out.
                self.pid = self.last_pid = pid
                self.started_at = now
                return []
            case ((State.STARTING | State.RUNNING), SpawnFailed(error=error)):
                # RUNNING too: with startsecs = 0 a failed exec is reported after the fact
                self._record_spawn_error(event, now)
                self.pid = None
                self.spawn_error = error
                self.stopped_at = now
                failed = self._failed_start(now, f"spawn failed: {error}")
                return [CancelTimer(Timer.STARTSECS), *failed]
            case State.STARTING, TimerFired(timer=Timer.STARTSECS):
                return self._running(now, f"stayed up {self.config.startsecs:g}s")
            case State.STARTING, Exited():
                assert isinstance(event, Exited)
                self._record_exit(event, now)
                return [
                    CancelTimer(Timer.STARTSECS),
                    *self._failed_start(now, "exited too quickly"),
                ]
            case State.RUNNING, Exited():
                assert isinstance(event, Exited)
                return self._exited_while_running(event, now)
            case State.BACKOFF, TimerFired(timer=Timer.BACKOFF):
                self.restarts += 1
                return self._spawn(now, "backoff elapsed")
            case State.FATAL, TimerFired(timer=Timer.REVIVE) if self.revive_at is not None:
                return self._revive(now)
            case State.FATAL, Stop() if self.revive_at is not None:
                self.want = Want.DOWN  # the operator's stop wins over revive_after
                self.revive_at = None
                return [CancelTimer(Timer.REVIVE)]
            case ((State.STARTING | State.RUNNING), Stop()):
                return self._stop(now)
            case State.BACKOFF, Stop():
                self.want = Want.DOWN
                self.backoff_until = None
                return [CancelTimer(Timer.BACKOFF), self._enter(State.STOPPED, "stop requested")]
            case ((State.EXITED | State.FATAL | State.STOPPED), Stop()):
                self.want = Want.DOWN
                return []
            case State.STOPPING, Stop():
                self.want = Want.DOWN
                return []
            case State.STOPPING, (TimerFired(timer=Timer.STOP_TIMEOUT) | ForceKill()):
                return self._kill()
            case ((State.STARTING | State.RUNNING), ForceKill()):
                return [*self._stop(now), *self._kill()]
            case State.STOPPING, Exited():
                assert isinstance(event, Exited)
                return self._stopped(event, now)
            case State.STOPPING, SpawnFailed(error=error):
                # A failed exec reported while stopping: the process is gone all the same.
                self._record_spawn_error(event, now)
                self.spawn_error = error
                return self._stopped(Exited(None, None), now, f"spawn failed: {error}")
            case _:
                return [Ignored(self.state, event)]

    # -- actions ----------------------------------------------------------------------

    def _enter(self, new: State, reason: str) -> Transitioned:
        old, self.state = self.state, new
        self.reason = reason
        return Transitioned(old, new, reason)

    def _start(self, now: float, reason: str, reset: bool) -> list[Effect]:
        revive: list[Effect] = []
        if reset:
            self.failures = 0
            self.start_failures = 0
            self.window.clear()  # an operator's start: a fresh count
            if self.revive_at is not None:
                self.revive_at = None
                revive.append(CancelTimer(Timer.REVIVE))
        self.want = Want.UP
        return [*revive, *self._spawn(now, reason)]

    def _spawn(self, now: float, reason: str) -> list[Effect]:
        self.pid = None
        self.spawn_error = None
        self.backoff_until = None
        self.killed = False
        self.timed_out = False
        self.blamed = None
        self.stop_by = self.stop_asked_at = None  # a new run: no stop asked of it yet
        return [self._enter(State.STARTING, reason), Spawn()]

    def _spawned(self, pid: int, now: float) -> list[Effect]:
        self.pid = self.last_pid = pid
        self.started_at = now
        self.exit_code = self.exit_signal = None
        if self.config.startsecs <= 0:
            return self._running(now, "started")
        return [ArmTimer(Timer.STARTSECS, self.config.startsecs)]

    def _running(self, now: float, reason: str) -> list[Effect]:
        self.start_failures = 0
        return [self._enter(State.RUNNING, reason)]

    def _record_exit(self, event: Exited, now: float) -> None:
        self._record_death(event, now)
        self.pid = None
        self.stopped_at = now
        self.exit_code = event.exit_code
        self.exit_signal = event.exit_signal

    def is_down(self) -> bool:
        return self.state in DOWN_STATES

    def uptime(self, now: float) -> float:
        return now - self.started_at if self.started_at is not None else 0.0

    def _failed_start(self, now: float, reason: str) -> list[Effect]:
        self.failures += 1
        self.start_failures += 1
        if gives_up(self.start_failures, self.config):
            return self._fatal(now, f"{reason}; gave up after {self.start_failures}")
        return self._backoff(now, reason)

    def _backoff(self, now: float, reason: str) -> list[Effect]:
        if self.window.full(now, self.config):  # every automatic restart passes here
            return self._fatal(now, deaths.crash_loop_reason(self.config))
        self.window.add(now)
        base = backoff_delay(self.failures, self.config)
        delay = deaths.jittered(base, self.config.backoff_jitter, self.draw)
        self.backoff_until = now + delay
        self._then(f"{self.restart_count()} in {delay:.1f} s")
        return [self._enter(State.BACKOFF, reason), ArmTimer(Timer.BACKOFF, delay)]

    def _exited_while_running(self, event: Exited, now: float) -> list[Effect]:
        if self.uptime(now) >= self.config.backoff_reset:
            self.failures = 0
        self._record_exit(event, now)
        policy = self.config.autorestart
        restart = policy == "always" or (
            policy == "on-failure" and not is_expected_exit(event, self.config)
        )
        reason = describe_exit(event)
        if not restart:
            self.want = Want.DOWN
            self._then(f"stays down (autorestart = {policy})")
            return [self._enter(State.EXITED, reason)]
        self.failures += 1
        return self._backoff(now, reason)

    def _stop(self, now: float) -> list[Effect]:
        self.want = Want.DOWN
        effects: list[Effect] = []
        if self.state is State.STARTING:
            effects.append(CancelTimer(Timer.STARTSECS))
        effects.append(self._enter(State.STOPPING, "stop requested"))
        if self.config.stopwaitsecs <= 0:  # no grace period: SIGKILL at once
            return [*effects, *self._kill()]
        effects.append(Kill(self.config.stopsignal, group=self.config.killasgroup))
        effects.append(ArmTimer(Timer.STOP_TIMEOUT, self.config.stopwaitsecs))
        return effects

    def _kill(self) -> list[Effect]:
        if self.killed:
            return []
        self.killed = True
        return [Kill(signal.SIGKILL, group=self.config.killasgroup)]

    def _stopped(self, event: Exited, now: float, reason: str | None = None) -> list[Effect]:
        if self.spawn_error is None or event.exit_code is not None or event.exit_signal:
            self._record_exit(event, now)
        else:  # the failed exec reported while stopping: its death is recorded already
            self.pid = None
            self.stopped_at = now
            self.exit_code = self.exit_signal = None
        effects: list[Effect] = [
            CancelTimer(Timer.STOP_TIMEOUT),
            self._enter(State.STOPPED, reason or describe_exit(event)),
        ]
        if self.want is Want.UP:  # a restart, or a start that arrived while stopping
            effects += self._start(now, "restart requested", reset=True)
        return effects

    # -- crash loops and deaths (deaths.py): kept apart from the table above ----------

    def _note(self, event: ProcessEvent, now: float) -> None:
        """Remember who asked for a stop, and whether a stop outlived stopwaitsecs."""
        if isinstance(event, Stop) and self.state is not State.STOPPING:  # the first counts
            self.stop_by, self.stop_asked_at = event.by, now
        elif isinstance(event, TimerFired) and event.timer is Timer.STOP_TIMEOUT:
            self.timed_out = self.state is State.STOPPING

    def _record_death(self, event: Exited, now: float) -> None:
        cause, summary, sender, expected = deaths.classify(
            stopping=self.state is State.STOPPING,
            stop_by=self.stop_by,
            timed_out=self.timed_out,
            blame=self.blamed,
            exit_code=event.exit_code,
            exit_signal=event.exit_signal,
            ending=event.ending,
            config=self.config,
        )
        self.history.append(
            Death(
                at=now,
                wall=event.ending.wall,
                pid=self.pid,
                uptime=self.uptime(now) if self.pid is not None else None,
                cause=cause,
                summary=summary,
                exit_code=event.exit_code,
                exit_signal=event.exit_signal,
                core_dumped=event.ending.core_dumped,
                expected=expected,
                sender=sender,
                stopped_by=self.stop_by if cause is Cause.STOPPED else None,
                tail=event.ending.tail,
                then="stays down" if self.want is Want.DOWN else "",
            )
        )
        if len(self.history) > deaths.TAILS_KEPT:
            self.history[-deaths.TAILS_KEPT - 1].tail = ""
        self.blamed = None

    def _record_spawn_error(self, event: SpawnFailed, now: float) -> None:
        self.history.append(
            Death(
                at=now,
                wall=event.wall,
                pid=self.pid,
                uptime=None,
                cause=Cause.SPAWN_ERROR,
                summary=f"spawn error: {event.error}",
                then="stays down" if self.want is Want.DOWN else "",
            )
        )

    def _then(self, what: str) -> None:
        """What followed the latest death (shown by `supctl why`)."""
        if self.history:
            self.history[-1].then = what

    def _fatal(self, now: float, reason: str) -> list[Effect]:
        self.want = Want.DOWN
        self.backoff_until = None
        effects: list[Effect] = [self._enter(State.FATAL, reason)]
        revive = self.config.revive_after
        if revive is not None:
            self.revive_at = now + revive
            effects.append(ArmTimer(Timer.REVIVE, revive))
            self._then(f"FATAL: {reason}; revive in {deaths.format_clock(revive)}")
        else:
            self._then(f"FATAL: {reason}")
        return effects

    def _revive(self, now: float) -> list[Effect]:
        """revive_after elapsed: try again with a fresh window and failure count."""
        self.revive_at = None
        self.failures = self.start_failures = 0
        self.window.clear()
        self.want = Want.UP
        self.restarts += 1
        return self._spawn(now, f"revived after {self.config.revive_after or 0:g}s")

    def restart_count(self) -> str:
        """`restart 3 of 5`: this restart's number in the limit nearest to FATAL."""
        config = self.config
        limit = deaths.window_limit(config) if config.restart_window > 0 else None
        if self.start_failures and (
            limit is None or config.startretries - self.start_failures < limit - len(self.window)
        ):
            return f"restart {self.start_failures} of {config.startretries}"
        if limit is not None:
            return f"restart {len(self.window)} of {limit}"
        return f"restart {self.failures}"

    def blame(self, cause: Cause, message: str) -> None:
        """The hook for readiness and health checks: call it just before stopping the
        process for that reason, and its next death is recorded with `cause`."""
        if cause not in deaths.BLAMEABLE:
            raise ValueError(f"{cause.value} is not a cause a check can blame")
        self.blamed = (cause, message)

    def clear_history(self) -> None:
        """`supctl clear`: forget the deaths and the failure counters (not the state)."""
        self.history.clear()
        self.failures = self.start_failures = 0
        self.window.clear()


def describe_exit(event: Exited) -> str:
    if event.exit_signal is not None:
        return f"killed by {signal_name(event.exit_signal)}"
    return f"exited with status {event.exit_code}"
