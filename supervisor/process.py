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

This module imports nothing from supd but the runtime config (settings), the state names (facts)
and the signal names; it reads no clock (`now` comes with every event).
"""

from __future__ import annotations

import enum
import math
import signal
from collections.abc import Callable
from dataclasses import dataclass, field

from . import deaths
from .deaths import NO_ENDING, Cause, Death, DeathRing, Ending, RestartWindow
from .facts import State as State  # re-exported: the state machine's states
from .settings import Health, Program
from .signals import name as signal_name

# A process is "down" in these: none runs, and none will without a command.
DOWN_STATES = frozenset({State.STOPPED, State.EXITED, State.FATAL})


# Ready kinds the daemon runs on a timer; `log` and `notify` come as events.
ACTIVE_READY_PROBES = frozenset({"tcp", "http", "exec", "file"})


class Want(enum.Enum):
    UP = "up"
    DOWN = "down"


class Timer(enum.Enum):
    """Why a timer was armed; each process has at most one timer of each kind."""

    STARTSECS = "startsecs"
    BACKOFF = "backoff"
    STOP_TIMEOUT = "stop_timeout"
    REVIVE = "revive"  # revive_after: a FATAL process tries again
    # Readiness and health (issue 14): one probe at a time per process, a ready probe
    # while STARTING and a health probe while RUNNING, so one kind of each suffices.
    READY_TIMEOUT = "ready_timeout"
    PROBE = "probe"  # the next probe is due
    PROBE_TIMEOUT = "probe_timeout"  # the probe in flight has taken too long
    WATCHDOG = "watchdog"  # WATCHDOG=1 not received in watchdog_sec


# The timers of readiness and health: their events go to Process._probe_event.
PROBE_TIMERS = frozenset({Timer.READY_TIMEOUT, Timer.PROBE, Timer.PROBE_TIMEOUT, Timer.WATCHDOG})


class Probe(enum.Enum):
    READY = "ready"
    HEALTH = "health"


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


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """A probe's verdict (the daemon ran it), or a log line / READY=1 that means ready."""

    probe: Probe
    ok: bool
    message: str = ""


@dataclass(frozen=True, slots=True)
class Notified:
    """The sd_notify assignments that count, from one datagram the process sent."""

    ready: bool = False
    status: str | None = None
    watchdog: bool = False
    stopping: bool = False
    reloading: bool = False
    extend_timeout_s: float | None = None
    main_pid: int | None = None


ProcessEvent = (
    Start | Stop | ForceKill | Spawned | SpawnFailed | Exited | TimerFired | ProbeResult | Notified
)


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


@dataclass(frozen=True, slots=True)
class RunProbe:
    """Run the program's ready (STARTING) or health (RUNNING) probe; answer with a
    `ProbeResult`. Its timeout is the fleet's PROBE_TIMEOUT timer."""

    probe: Probe


@dataclass(frozen=True, slots=True)
class CancelProbe:
    """Abandon the probe in flight (it timed out, or the process moved on)."""


@dataclass(frozen=True, slots=True)
class HealthChanged:
    healthy: bool
    message: str


Effect = (
    Spawn
    | Kill
    | ArmTimer
    | CancelTimer
    | Transitioned
    | Ignored
    | RunProbe
    | CancelProbe
    | HealthChanged
)


def backoff_delay(failures: int, config: Program) -> float:
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


def gives_up(start_failures: int, config: Program) -> bool:
    """The first attempt plus `startretries` retries have all failed."""
    return start_failures > config.startretries


def is_expected_exit(event: Exited, config: Program) -> bool:
    """An exit that `autorestart = "on-failure"` leaves alone.

    A signal death while RUNNING is never expected: the daemon only signals to stop, and
    stops are handled in STOPPING.
    """
    return event.exit_signal is None and event.exit_code in config.exitcodes


@dataclass(slots=True)
class Process:
    """The supervised life of one process slot (`name`), across its restarts."""

    name: str
    config: Program
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
    history: DeathRing = field(default_factory=DeathRing)
    stop_by: deaths.StopBy | None = None  # who asked for the current (or last) stop
    stop_asked_at: float | None = None  # monotonic time of that stop
    timed_out: bool = False  # this stop outlived stopwaitsecs
    blamed: tuple[Cause, str] | None = None  # readiness/health: the next death's cause
    # Readiness, health, sd_notify, dependencies (issue 14).
    ready: bool = False  # the ready probe passed during this run
    startsecs_passed: bool = False  # startsecs elapsed during this run
    ready_error: str | None = None  # the last failed ready probe's message
    abandoned: str | None = None  # being stopped as a failed start / unhealthy: why
    abandoned_start: bool = False  # ... and that counts as a failed start
    healthy: bool | None = None  # None: unknown (no health check, or none yet)
    health_failures: int = 0  # consecutive failed health checks (after start_grace)
    health_error: str | None = None  # the last failed health check's message
    notify_status: str | None = None  # the last STATUS= the process sent
    main_pid: int | None = None  # MAINPID= the process sent
    notify_state: str | None = None  # "reloading" / "stopping" (RELOADING=1, STOPPING=1)
    ready_deadline: float | None = None  # when READY_TIMEOUT fires (EXTEND_TIMEOUT_USEC)
    notified_ready: bool = False  # READY=1 came during this run (whatever `ready` says)
    waiting_for: str | None = None  # set by the fleet: "waiting for db (ready)"

    # -- the transition table ---------------------------------------------------------

    def handle(self, event: ProcessEvent, now: float) -> list[Effect]:
        """Feed one event; returns what the daemon must do. Never raises on odd input."""
        self._note(event, now)
        before = self.state
        if isinstance(event, ProbeResult | Notified) or (
            isinstance(event, TimerFired) and event.timer in PROBE_TIMERS
        ):
            effects = self._probe_event(event, now)  # issue 14's own table, below
        else:
            effects = self._transition(event, now)
        if self.state is not before:
            effects += self._probes_follow(before)
        return effects

    def _transition(self, event: ProcessEvent, now: float) -> list[Effect]:
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
                self.startsecs_passed = True
                if not self._is_ready():
                    return []  # still waiting for the ready probe
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
        ready = self.config.ready
        waits: list[Effect] = []
        if ready is not None:
            self.ready_deadline = now + ready.ready_timeout
            waits.append(ArmTimer(Timer.READY_TIMEOUT, ready.ready_timeout))
            if ready.kind in ACTIVE_READY_PROBES:
                waits.append(ArmTimer(Timer.PROBE, 0.0))  # probe at once, via the loop
        if self.config.startsecs <= 0:
            self.startsecs_passed = True
            if ready is None:
                return self._running(now, "started")
            return waits
        return [ArmTimer(Timer.STARTSECS, self.config.startsecs), *waits]

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
        self.window.add(now, self.config)
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
        if self.abandoned is not None and self.want is Want.UP:
            return self._abandoned_exit(event, now)
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

    # -- readiness, health and sd_notify (issue 14) -----------------------------------
    #
    # A process with `ready` stays STARTING until its probe passes and startsecs have
    # passed; not ready by `ready_timeout`, it is stopped (stopsignal, then SIGKILL after
    # stopwaitsecs) and that counts as a failed start. A process with `health` is probed
    # every interval while RUNNING; failures count after start_grace, and `failures` in a
    # row make it UNHEALTHY, after which `on_unhealthy` restarts it (through the backoff),
    # stops it, or only reports it. Timers: PROBE (next probe due), PROBE_TIMEOUT (the probe
    # in flight), READY_TIMEOUT, WATCHDOG. These methods sit together at the end of the class,
    # apart from the core transitions.

    def _probe_event(self, event: ProcessEvent, now: float) -> list[Effect]:
        """The transitions of readiness, health and sd_notify events (kept apart from
        the core table: a probe a second per process should not walk all of it)."""
        match self.state, event:
            case State.STARTING, TimerFired(timer=Timer.PROBE) if self.config.ready:
                return self._run_probe(Probe.READY, self.config.ready.timeout)
            case State.RUNNING, TimerFired(timer=Timer.PROBE) if self.config.health:
                return self._run_probe(Probe.HEALTH, self.config.health.timeout)
            case State.STARTING, ProbeResult(probe=Probe.READY) if self.config.ready:
                assert isinstance(event, ProbeResult)
                return self._ready_result(event.ok, event.message, now)
            case State.RUNNING, ProbeResult(probe=Probe.HEALTH) if self.config.health:
                assert isinstance(event, ProbeResult)
                return self._health_result(event.ok, event.message, now)
            case State.STARTING, TimerFired(timer=Timer.PROBE_TIMEOUT) if self.config.ready:
                message = f"no answer in {self.config.ready.timeout:g} s"
                return [CancelProbe(), *self._ready_result(False, message, now)]
            case State.RUNNING, TimerFired(timer=Timer.PROBE_TIMEOUT) if self.config.health:
                message = f"no answer in {self.config.health.timeout:g} s"
                return [CancelProbe(), *self._health_result(False, message, now)]
            case State.STARTING, TimerFired(timer=Timer.READY_TIMEOUT) if self.config.ready:
                why = self.ready_error or f"no {self.config.ready.describe()}"
                reason = f"not ready after {self.config.ready.ready_timeout:g} s: {why}"
                return self._abandon(reason, failed_start=True)
            case State.RUNNING, TimerFired(timer=Timer.WATCHDOG) if self.config.watchdog_sec:
                rearm = ArmTimer(Timer.WATCHDOG, self.config.watchdog_sec)
                message = f"watchdog: no WATCHDOG=1 in {self.config.watchdog_sec:g} s"
                return [rearm, *self._health_result(False, message, now, from_probe=False)]
            case ((State.STARTING | State.RUNNING | State.STOPPING), Notified()):
                assert isinstance(event, Notified)
                return self._notified(event, now)
            case _:
                return [Ignored(self.state, event)]

    def _is_ready(self) -> bool:
        return self.config.ready is None or self.ready

    def _probes_follow(self, before: State) -> list[Effect]:
        """After a transition: cancel the timers of the state left, arm those of the new."""
        effects: list[Effect] = []
        if before is State.STARTING and self.config.ready is not None:
            effects += [CancelTimer(Timer.READY_TIMEOUT), CancelTimer(Timer.PROBE)]
            effects += [CancelTimer(Timer.PROBE_TIMEOUT), CancelProbe()]
        if before is State.RUNNING:
            if self.config.health is not None:
                effects += [
                    CancelTimer(Timer.PROBE),
                    CancelTimer(Timer.PROBE_TIMEOUT),
                    CancelProbe(),
                ]
            if self.config.watchdog_sec is not None:
                effects.append(CancelTimer(Timer.WATCHDOG))
            self.health_failures = 0
        if self.state is State.STARTING or self.state in DOWN_STATES:
            self.healthy = None  # kept through STOPPING and BACKOFF: why it restarts
        if self.state is State.STARTING:
            self.ready = self.startsecs_passed = False
            self.ready_error = self.abandoned = None
            self.abandoned_start = self.notified_ready = False
            self.notify_status = self.notify_state = None
            self.main_pid = None
        if self.state is State.RUNNING:
            self.ready = True
            self.health_error = None
            if self.config.health is not None:
                effects.append(ArmTimer(Timer.PROBE, self.config.health.interval))
            if self.config.watchdog_sec is not None:
                effects.append(ArmTimer(Timer.WATCHDOG, self.config.watchdog_sec))
        return effects

    def _run_probe(self, probe: Probe, timeout: float) -> list[Effect]:
        return [RunProbe(probe), ArmTimer(Timer.PROBE_TIMEOUT, timeout)]

    def _ready_result(self, ok: bool, message: str, now: float) -> list[Effect]:
        ready = self.config.ready
        if ready is None or self.ready:
            return []
        effects: list[Effect] = [CancelTimer(Timer.PROBE_TIMEOUT)]
        if not ok:
            self.ready_error = message
            if ready.kind in ACTIVE_READY_PROBES:
                effects.append(ArmTimer(Timer.PROBE, ready.interval))
            return effects
        self.ready = True
        if not self.startsecs_passed:
            return effects  # RUNNING once startsecs have passed too
        return [*effects, *self._running(now, f"ready: {message or ready.describe()}")]

    def _health_result(
        self, ok: bool, message: str, now: float, from_probe: bool = True
    ) -> list[Effect]:
        health = self.config.health
        effects: list[Effect] = []
        if health is not None and from_probe:  # (a missed watchdog is no probe)
            effects += [CancelTimer(Timer.PROBE_TIMEOUT), ArmTimer(Timer.PROBE, health.interval)]
        if ok:
            self.health_failures = 0
            if self.healthy is not True:
                self.healthy = True
                effects.append(HealthChanged(True, message))
            return effects
        self.health_error = message
        grace = health.start_grace if health is not None else 0.0
        if self.uptime(now) < grace:
            return effects  # like a startupProbe: failures do not count yet
        self.health_failures += 1
        threshold = health.failures if health is not None else 1
        if self.health_failures < threshold or self.healthy is False:
            return effects
        self.healthy = False
        effects.append(HealthChanged(False, message))
        action = health.on_unhealthy if health is not None else "restart"
        if action == "restart":
            return [*effects, *self._abandon(f"unhealthy: {message}", failed_start=False)]
        if action == "stop":
            self.want = Want.DOWN  # a plain stop, with the reason
            return [*effects, *self._abandon(f"unhealthy: {message}", failed_start=False)]
        return effects

    def _abandon(self, reason: str, *, failed_start: bool) -> list[Effect]:
        """Stop a process that is up but must not stay (not ready in time, unhealthy);
        `want` stays UP, so its exit leads to BACKOFF (or FATAL) instead of STOPPED.
        Its death is recorded with the cause (`supctl why`)."""
        cause = Cause.NOT_READY if failed_start else Cause.UNHEALTHY
        self.blame(cause, reason.removeprefix("unhealthy: "))
        self.abandoned = reason
        self.abandoned_start = failed_start
        effects: list[Effect] = []
        if self.state is State.STARTING:
            effects.append(CancelTimer(Timer.STARTSECS))
        effects.append(self._enter(State.STOPPING, reason))
        if self.config.stopwaitsecs <= 0:
            return [*effects, *self._kill()]
        effects.append(Kill(self.config.stopsignal, group=self.config.killasgroup))
        effects.append(ArmTimer(Timer.STOP_TIMEOUT, self.config.stopwaitsecs))
        return effects

    def _abandoned_exit(self, event: Exited, now: float) -> list[Effect]:
        reason = self.abandoned or "abandoned"
        self.abandoned = None
        self._record_exit(event, now)
        effects: list[Effect] = [CancelTimer(Timer.STOP_TIMEOUT)]
        if self.abandoned_start:
            return [*effects, *self._failed_start(now, reason)]
        self.failures += 1
        return [*effects, *self._backoff(now, reason)]

    def _notified(self, event: Notified, now: float) -> list[Effect]:
        effects: list[Effect] = []
        if event.status is not None:
            self.notify_status = event.status
        if event.main_pid is not None:
            self.main_pid = event.main_pid
        if event.watchdog and self.state is State.RUNNING and self.config.watchdog_sec:
            effects.append(ArmTimer(Timer.WATCHDOG, self.config.watchdog_sec))
        if event.reloading or event.stopping:
            self.notify_state = "reloading" if event.reloading else "stopping"
        elif event.ready:
            self.notify_state = None
        if event.ready:
            self.notified_ready = True  # kept: a reload may make READY=1 its readiness
        # EXTEND_TIMEOUT_USEC, systemd's rule: the timeout becomes at least that from now.
        extend = event.extend_timeout_s
        starting = self.state is State.STARTING and self.config.ready is not None
        later = extend is not None and (
            self.ready_deadline is None or now + extend > self.ready_deadline
        )
        if starting and later and extend is not None:
            self.ready_deadline = now + extend
            effects.append(ArmTimer(Timer.READY_TIMEOUT, extend))
        ready = self.config.ready
        if event.ready and self.state is State.STARTING and ready and ready.kind == "notify":
            effects += self._ready_result(True, "READY=1", now)
        return effects

    # -- a reload's new config, applied in place (reloadplan.py, docs/reload.md) -------
    #
    # Most keys are read when next needed and need nothing here. Readiness and health
    # belong to the run under way, so they follow the new config at once:
    # - `ready` while STARTING (the spawn reported): the wait starts over on the new
    #   probe, from the reload: the old probe's timers and a probe in flight are
    #   cancelled, an active probe runs at once, the ready timeout still counts from the
    #   spawn (or a later EXTEND_TIMEOUT_USEC), a READY=1 that came already counts for a
    #   notify probe. With `ready` removed, the process is RUNNING as soon as startsecs
    #   have passed. In any other state, the new `ready` is for the next start.
    # - `health` while RUNNING: added, the first check is one interval after the reload;
    #   removed, the checks stop and the health state is cleared; changed, a check in
    #   flight is abandoned and the next is one (new) interval after the reload. The
    #   failures counted so far stay when the same thing is checked (kind and target),
    #   and are cleared, with the verdict, when another thing is. `start_grace` counts
    #   from the start of the run, as always. In any other state, the new `health` is
    #   for the next RUNNING.

    def reconfigure(self, config: Program, now: float) -> list[Effect]:
        """A reload changed this process's program without restarting it."""
        old, self.config = self.config, config
        before = self.state
        effects: list[Effect] = []
        if before is State.STARTING and self.pid is not None and old.ready != config.ready:
            effects += self._ready_reconfigured(old, now)
        if before is State.RUNNING and old.health != config.health:
            effects += self._health_reconfigured(old)
        if self.state is not before:
            effects += self._probes_follow(before)
        return effects

    def _ready_reconfigured(self, old: Program, now: float) -> list[Effect]:
        effects: list[Effect] = []
        extended = None  # an EXTEND_TIMEOUT_USEC beyond the old ready timeout holds
        if old.ready is not None:
            effects += [CancelTimer(Timer.READY_TIMEOUT), CancelTimer(Timer.PROBE)]
            effects += [CancelTimer(Timer.PROBE_TIMEOUT), CancelProbe()]
            spawned = self.started_at if self.started_at is not None else now
            deadline = self.ready_deadline
            if deadline is not None and deadline > spawned + old.ready.ready_timeout:
                extended = deadline
        self.ready = False
        self.ready_error = None
        ready = self.config.ready
        if ready is None:
            self.ready_deadline = None
            if self.startsecs_passed:
                effects += self._running(now, "ready check removed by a reload")
            return effects
        spawned = self.started_at if self.started_at is not None else now
        self.ready_deadline = max(spawned + ready.ready_timeout, extended or 0.0)
        effects.append(ArmTimer(Timer.READY_TIMEOUT, max(0.0, self.ready_deadline - now)))
        if ready.kind in ACTIVE_READY_PROBES:
            effects.append(ArmTimer(Timer.PROBE, 0.0))  # at once, via the loop
        elif ready.kind == "notify" and self.notified_ready:
            effects += self._ready_result(True, "READY=1", now)
        return effects

    def _health_reconfigured(self, old: Program) -> list[Effect]:
        effects: list[Effect] = []
        if old.health is not None:
            effects += [CancelTimer(Timer.PROBE), CancelTimer(Timer.PROBE_TIMEOUT), CancelProbe()]
        health = self.config.health
        if health is None or old.health is None or _checked(old.health) != _checked(health):
            self.healthy = None  # nothing known yet about what is checked now
            self.health_failures = 0
            self.health_error = None
        if health is not None:
            effects.append(ArmTimer(Timer.PROBE, health.interval))
        return effects


def _checked(health: Health) -> tuple[object, ...]:
    """What a health check looks at (its kind and target), apart from its timing."""
    return (health.tcp, health.http, health.exec, health.log_silence)


def describe_exit(event: Exited) -> str:
    if event.exit_signal is not None:
        return f"killed by {signal_name(event.exit_signal)}"
    return f"exited with status {event.exit_code}"
