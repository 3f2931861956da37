"""The process state machine as data: (state, event) -> (new state, effects). No OS."""

from __future__ import annotations

import signal
from typing import Any, get_args

import pytest

from supd.config import ProgramConfig, runtime
from supd.process import (
    ArmTimer,
    CancelProbe,
    CancelTimer,
    Effect,
    Exited,
    ForceKill,
    HealthChanged,
    Ignored,
    Kill,
    Notified,
    Probe,
    ProbeResult,
    Process,
    ProcessEvent,
    RunProbe,
    Spawn,
    Spawned,
    SpawnFailed,
    Start,
    State,
    Stop,
    Timer,
    TimerFired,
    Transitioned,
    Want,
    backoff_delay,
    gives_up,
)
from supd.settings import Program
from supd.status import describe


def program(**options: Any) -> Program:
    return runtime(
        ProgramConfig.model_validate({"name": "web", "command": ["/bin/true"], **options})
    )


def states(effects: list[Effect]) -> list[State]:
    return [e.new for e in effects if isinstance(e, Transitioned)]


def running(config: Program, now: float = 0.0) -> Process:
    p = Process("web", config)
    p.handle(Start(), now)
    p.handle(Spawned(100), now)
    p.handle(TimerFired(Timer.STARTSECS), now + config.startsecs)
    assert p.state is State.RUNNING
    return p


@pytest.mark.parametrize(
    ("failures", "initial", "factor", "maximum", "expected"),
    [
        (1, 1.0, 2.0, 60.0, 1.0),
        (2, 1.0, 2.0, 60.0, 2.0),
        (3, 1.0, 2.0, 60.0, 4.0),
        (7, 1.0, 2.0, 60.0, 60.0),  # 64 capped
        (1, 0.0, 2.0, 60.0, 0.0),
        (5, 0.5, 1.0, 60.0, 0.5),  # factor 1: a flat delay
        (0, 1.0, 2.0, 60.0, 0.0),
        (5000, 1.0, 2.0, 60.0, 60.0),  # float overflow must not escape
        (5000, 0.0, 2.0, 60.0, 0.0),  # 0 stays 0, however many failures
    ],
)
def test_backoff_delay_ladder(
    failures: int, initial: float, factor: float, maximum: float, expected: float
) -> None:
    config = program(backoff_initial=initial, backoff_factor=factor, backoff_max=maximum)
    assert backoff_delay(failures, config) == pytest.approx(expected)


def test_gives_up_after_first_attempt_plus_startretries() -> None:
    config = program(startretries=3)
    assert [gives_up(n, config) for n in range(1, 6)] == [False, False, False, True, True]


def test_start_spawns_then_runs_after_startsecs() -> None:
    p = Process("web", program(startsecs=2))
    effects = p.handle(Start(), 0.0)
    assert states(effects) == [State.STARTING] and Spawn() in effects
    assert p.handle(Spawned(42), 0.0) == [ArmTimer(Timer.STARTSECS, 2.0)]
    assert states(p.handle(TimerFired(Timer.STARTSECS), 2.0)) == [State.RUNNING]
    assert p.pid == 42 and p.want is Want.UP


def test_startsecs_zero_is_running_at_spawn() -> None:
    p = Process("web", program(startsecs=0))
    p.handle(Start(), 0.0)
    assert states(p.handle(Spawned(42), 0.0)) == [State.RUNNING]


def test_exit_while_starting_backs_off_then_goes_fatal() -> None:
    p = Process("web", program(startsecs=1, startretries=2, backoff_initial=1, backoff_factor=2))
    p.handle(Start(), 0.0)
    delays = []
    for attempt in range(3):
        p.handle(Spawned(100 + attempt), 0.0)
        effects = p.handle(Exited(1, None), 0.1)
        assert CancelTimer(Timer.STARTSECS) in effects
        if attempt < 2:
            assert p.state is State.BACKOFF
            delays += [e.delay_s for e in effects if isinstance(e, ArmTimer)]
            assert Spawn() in p.handle(TimerFired(Timer.BACKOFF), 5.0)
    assert delays == [1.0, 2.0]
    assert p.state is State.FATAL and p.want is Want.DOWN


def test_spawn_failure_counts_as_failed_start() -> None:
    p = Process("web", program(startretries=0))
    p.handle(Start(), 0.0)
    effects = p.handle(SpawnFailed("No such file or directory: /nope"), 0.0)
    assert states(effects) == [State.FATAL]
    assert p.spawn_error == "No such file or directory: /nope"
    assert "No such file" in describe(p, 1.0, 1000.0)


def test_zero_backoff_is_a_zero_timer_not_a_synchronous_restart() -> None:
    """Every retry goes back through the loop, so a crash loop never blocks it."""
    p = running(program(backoff_initial=0, autorestart="always"))
    effects = p.handle(Exited(0, None), 5.0)
    assert states(effects) == [State.BACKOFF]
    assert ArmTimer(Timer.BACKOFF, 0.0) in effects and Spawn() not in effects
    assert states(p.handle(TimerFired(Timer.BACKOFF), 5.0)) == [State.STARTING]
    assert p.restarts == 1


def test_backoff_never_overflows_and_zero_stays_zero() -> None:
    """backoff_initial = 0 with factor 2 once jumped to backoff_max after 1,024 failures."""
    zero = program(backoff_initial=0, backoff_factor=2, backoff_max=60)
    assert [backoff_delay(n, zero) for n in (1, 1024, 1025, 10**9)] == [0.0] * 4
    steep = program(backoff_initial=0.001, backoff_factor=1000, backoff_max=3600)
    assert [backoff_delay(n, steep) for n in (1, 2, 3, 4, 10**9)] == [0.001, 1, 1000, 3600, 3600]


def test_stopwaitsecs_zero_means_sigkill_at_once() -> None:
    p = running(program(stopwaitsecs=0, killasgroup=False))
    effects = p.handle(Stop(), 1.0)
    assert effects == [
        Transitioned(State.RUNNING, State.STOPPING, "stop requested"),
        Kill(signal.SIGKILL, group=False),
    ]


@pytest.mark.parametrize(
    ("policy", "exit_code", "exit_signal", "restarts"),
    [
        ("always", 0, None, True),
        ("always", 1, None, True),
        ("on-failure", 0, None, False),
        ("on-failure", 1, None, True),
        ("on-failure", None, signal.SIGSEGV, True),
        ("on-failure", 3, None, False),  # 3 is in exitcodes below
        ("never", 1, None, False),
        ("never", None, signal.SIGKILL, False),
    ],
)
def test_autorestart_policy_after_exit_from_running(
    policy: str, exit_code: int | None, exit_signal: int | None, restarts: bool
) -> None:
    p = running(program(autorestart=policy, exitcodes=[0, 3]))
    effects = p.handle(Exited(exit_code, exit_signal), 100.0)
    expected = State.BACKOFF if restarts else State.EXITED
    assert states(effects)[0] is expected
    assert p.exit_code == exit_code and p.exit_signal == exit_signal


def test_consecutive_failures_climb_the_ladder_and_a_long_run_resets_it() -> None:
    config = program(autorestart="always", backoff_initial=1, backoff_factor=3, backoff_reset=60)
    p = running(config)
    delays = []
    now = 0.0
    for _ in range(3):
        now += 10  # short runs: each exit is another consecutive failure
        effects = p.handle(Exited(1, None), now)
        delays += [e.delay_s for e in effects if isinstance(e, ArmTimer)]
        p.handle(TimerFired(Timer.BACKOFF), now)
        p.handle(Spawned(7), now)
        p.handle(TimerFired(Timer.STARTSECS), now + 1)
    assert delays == [1.0, 3.0, 9.0]
    now += 100  # a run longer than backoff_reset
    effects = p.handle(Exited(1, None), now)
    assert [e.delay_s for e in effects if isinstance(e, ArmTimer)] == [1.0]
    assert p.restarts == 3


def test_stop_sends_stopsignal_and_escalates_to_sigkill_once() -> None:
    p = running(program(stopsignal="INT", stopwaitsecs=5, killasgroup=True))
    effects = p.handle(Stop(), 10.0)
    assert states(effects) == [State.STOPPING]
    assert Kill(signal.SIGINT, group=True) in effects
    assert ArmTimer(Timer.STOP_TIMEOUT, 5.0) in effects
    assert p.handle(TimerFired(Timer.STOP_TIMEOUT), 15.0) == [Kill(signal.SIGKILL, group=True)]
    assert p.handle(ForceKill(), 15.5) == []
    effects = p.handle(Exited(None, signal.SIGKILL), 16.0)
    assert states(effects) == [State.STOPPED] and CancelTimer(Timer.STOP_TIMEOUT) in effects


def test_stop_interrupts_a_pending_restart() -> None:
    p = running(program(autorestart="always", backoff_initial=10))
    p.handle(Exited(1, None), 100.0)
    assert p.state is State.BACKOFF
    effects = p.handle(Stop(), 101.0)
    assert states(effects) == [State.STOPPED] and CancelTimer(Timer.BACKOFF) in effects
    assert p.handle(TimerFired(Timer.BACKOFF), 110.0) == [
        Ignored(State.STOPPED, TimerFired(Timer.BACKOFF))
    ]


def test_start_while_stopping_comes_back_up_after_the_exit() -> None:
    p = running(program())
    p.handle(Stop(), 1.0)
    assert p.handle(Start(), 1.1) == []
    effects = p.handle(Exited(None, signal.SIGTERM), 1.2)
    assert states(effects) == [State.STOPPED, State.STARTING] and Spawn() in effects


def test_signal_death_during_stop_is_not_a_failure() -> None:
    p = running(program(autorestart="on-failure"))
    p.handle(Stop(), 1.0)
    p.handle(Exited(None, signal.SIGTERM), 1.1)
    assert p.state is State.STOPPED and p.restarts == 0


def test_start_from_fatal_resets_the_retry_count() -> None:
    p = Process("web", program(startretries=0))
    p.handle(Start(), 0.0)
    p.handle(Spawned(1), 0.0)
    p.handle(Exited(1, None), 0.1)
    assert p.state is State.FATAL
    p.handle(Start(), 1.0)
    assert p.state is State.STARTING and p.start_failures == 0


def test_odd_events_are_ignored_not_raised() -> None:
    p = Process("web", program())
    for event in (Exited(0, None), Spawned(3), TimerFired(Timer.STOP_TIMEOUT), ForceKill()):
        assert p.handle(event, 0.0) == [Ignored(State.STOPPED, event)]


def test_describe_lines() -> None:
    p = running(program(startsecs=1), now=0.0)
    assert describe(p, 3 * 3600 + 190.0, 0.0) == "pid 100, uptime 3:03:10"
    p.handle(Exited(1, None), 5000.0)
    assert describe(p, 5000.0, 0.0) == "restart 1 of 5 in 1.0 s (exited 1)"


@pytest.mark.parametrize(
    "change",
    [
        {},
        {"healthy": True},
        {"healthy": False, "health_error": "refused"},
        {"notify_state": "reloading"},
        {"notify_status": "42 requests"},
        {"waiting_for": "db"},
    ],
)
def test_status_rows_describe_a_running_process_as_describe_does(change: dict[str, Any]) -> None:
    """info() has its own copy of the common RUNNING line (10,000 rows per status)."""
    from supd.status import info

    p = running(program(startsecs=1), now=0.0)
    for key, value in change.items():
        setattr(p, key, value)
    for stopped_by in (None, signal.SIGSTOP):
        row = info(p, 90061.5, 0.0, stopped_by)
        assert row["description"] == describe(p, 90061.5, 0.0, stopped_by)


def test_status_rows_written_as_json_are_info_rows() -> None:
    """status.rows_json writes plainly running rows itself (10,000 rows per status):
    every row must read back as info()'s, whatever the process holds."""
    import json

    from supd import protocol
    from supd.status import info, rows_json

    def variant(**change: Any) -> Process:
        p = running(program(startsecs=1), now=0.0)
        for key, value in change.items():
            setattr(p, key, value)
        return p

    stopped = Process("web", program())
    entries: list[tuple[Process, int | None]] = [
        (variant(), None),
        (variant(), signal.SIGSTOP),
        (variant(exit_code=3, exit_signal=signal.SIGKILL, restarts=7, failures=2), None),
        (variant(name="wéb:0", reason="exited \udcff 1", health_error='"q"\n'), None),
        (variant(spawn_error="no such file: /x\u2028"), None),
        (variant(healthy=True), None),
        (variant(healthy=False, health_error="refused"), None),
        (variant(notify_status="42 requests"), None),
        (variant(waiting_for="db"), None),
        (variant(started_at=-90061.25), None),
        (stopped, None),
    ]
    extra = {"web:acct": {"memory_bytes": 4096, "survivors": []}}
    entries.append((variant(name="web:acct"), None))
    now, wall = 90061.5, 1_700_000_000.0
    text = rows_json(entries, now, wall, extra)
    expected = [info(p, now, wall, by, extra.get(p.name)) for p, by in entries]
    assert json.loads(text) == expected
    # And as an answer: the same as the rows encoded as data, for any id.
    for request_id in (1, "x", "\udcff", None):
        raw = protocol.encode_result(request_id, protocol.RawJSON(text))
        assert raw.endswith(b"}\n") and raw.count(b"\n") == 1
        assert json.loads(raw) == json.loads(protocol.encode_result(request_id, expected))


def test_failed_exec_reported_while_stopping_ends_the_stop() -> None:
    """Review finding: SpawnFailed in STOPPING used to leave the process STOPPING."""
    p = running(program())
    p.handle(Stop(), 1.0)
    effects = p.handle(SpawnFailed("Exec format error: /x"), 1.1)
    assert states(effects) == [State.STOPPED] and p.pid is None
    assert p.spawn_error == "Exec format error: /x"


@pytest.mark.parametrize("group", [True, False])
def test_sigkill_escalation_follows_killasgroup(group: bool) -> None:
    p = running(program(killasgroup=group))
    p.handle(Stop(), 1.0)
    assert p.handle(TimerFired(Timer.STOP_TIMEOUT), 20.0) == [Kill(signal.SIGKILL, group=group)]


# --------------------------------------------------------------------------- the table
#
# Every state against every event: the exact next state and effects, or Ignored. The
# process is brought into each state by real events, with this one config.

TABLE_CONFIG = {
    "startsecs": 1,
    "startretries": 1,
    "backoff_initial": 1,
    "backoff_factor": 2,
    "stopwaitsecs": 5,
    "autorestart": "on-failure",
    "killasgroup": True,
    "revive_after": 30,
}
TERM, KILL = Kill(signal.SIGTERM, group=True), Kill(signal.SIGKILL, group=True)


def in_state(state: State) -> Process:
    config = program(**TABLE_CONFIG)
    p = Process("web", config)
    if state is State.STOPPED:
        return p
    p.handle(Start(), 0.0)
    p.handle(Spawned(100), 0.0)
    if state is State.STARTING:
        return p
    if state is State.FATAL:
        p.handle(Exited(1, None), 0.1)
        p.handle(TimerFired(Timer.BACKOFF), 1.1)
        p.handle(Spawned(101), 1.1)
        p.handle(Exited(1, None), 1.2)
        return p
    p.handle(TimerFired(Timer.STARTSECS), 1.0)
    if state is State.BACKOFF:
        p.handle(Exited(1, None), 10.0)
    elif state is State.STOPPING:
        p.handle(Stop(), 10.0)
    elif state is State.EXITED:
        p.handle(Exited(0, None), 10.0)
    return p


EVENTS: dict[str, ProcessEvent] = {
    "start": Start(),
    "stop": Stop(),
    "force_kill": ForceKill(),
    "spawned": Spawned(200),
    "spawn_failed": SpawnFailed("boom"),
    "exited": Exited(1, None),
    "startsecs": TimerFired(Timer.STARTSECS),
    "backoff": TimerFired(Timer.BACKOFF),
    "stop_timeout": TimerFired(Timer.STOP_TIMEOUT),
    # Readiness, health, sd_notify (issue 14): without `ready`, `health` or
    # `watchdog_sec` (TABLE_CONFIG) they mean nothing; tests/test_readiness.py has the rest.
    "ready_probe": ProbeResult(Probe.READY, True, "ok"),
    "health_probe": ProbeResult(Probe.HEALTH, False, "refused"),
    "notified": Notified(status="warming up"),
    "ready_timeout": TimerFired(Timer.READY_TIMEOUT),
    "probe": TimerFired(Timer.PROBE),
    "probe_timeout": TimerFired(Timer.PROBE_TIMEOUT),
    "watchdog": TimerFired(Timer.WATCHDOG),
    "revive": TimerFired(Timer.REVIVE),
}

IGNORED = "ignored"


def t(old: State, new: State, reason: str) -> Transitioned:
    return Transitioned(old, new, reason)


S = State
DOWN_START = {
    old: (S.STARTING, [t(old, S.STARTING, "start requested"), Spawn()])
    for old in (S.STOPPED, S.EXITED, S.FATAL)
}
STOP_FROM = {
    old: [t(old, S.STOPPING, "stop requested"), TERM, ArmTimer(Timer.STOP_TIMEOUT, 5.0)]
    for old in (S.STARTING, S.RUNNING)
}
STOP_FROM[S.STARTING].insert(0, CancelTimer(Timer.STARTSECS))

TABLE: dict[tuple[State, str], tuple[State, list[Effect]] | str] = {
    **{(down, "start"): DOWN_START[down] for down in DOWN_START},
    **{(down, "stop"): (down, []) for down in DOWN_START},
    # revive_after = 30: FATAL waits for a revival that a start or a stop cancels
    (S.FATAL, "start"): (S.STARTING, [CancelTimer(Timer.REVIVE), *DOWN_START[S.FATAL][1]]),
    (S.FATAL, "stop"): (S.FATAL, [CancelTimer(Timer.REVIVE)]),
    (S.FATAL, "revive"): (S.STARTING, [t(S.FATAL, S.STARTING, "revived after 30s"), Spawn()]),
    (S.STARTING, "start"): (S.STARTING, []),
    (S.STARTING, "stop"): (S.STOPPING, STOP_FROM[S.STARTING]),
    (S.STARTING, "force_kill"): (S.STOPPING, [*STOP_FROM[S.STARTING], KILL]),
    (S.STARTING, "spawned"): (S.STARTING, [ArmTimer(Timer.STARTSECS, 1.0)]),
    (S.STARTING, "spawn_failed"): (
        S.BACKOFF,
        [
            CancelTimer(Timer.STARTSECS),
            t(S.STARTING, S.BACKOFF, "spawn failed: boom"),
            ArmTimer(Timer.BACKOFF, 1.0),
        ],
    ),
    (S.STARTING, "exited"): (
        S.BACKOFF,
        [
            CancelTimer(Timer.STARTSECS),
            t(S.STARTING, S.BACKOFF, "exited too quickly"),
            ArmTimer(Timer.BACKOFF, 1.0),
        ],
    ),
    (S.STARTING, "startsecs"): (S.RUNNING, [t(S.STARTING, S.RUNNING, "stayed up 1s")]),
    (S.RUNNING, "start"): (S.RUNNING, []),
    (S.RUNNING, "stop"): (S.STOPPING, STOP_FROM[S.RUNNING]),
    (S.RUNNING, "force_kill"): (S.STOPPING, [*STOP_FROM[S.RUNNING], KILL]),
    (S.RUNNING, "spawn_failed"): (
        S.BACKOFF,
        [
            CancelTimer(Timer.STARTSECS),
            t(S.RUNNING, S.BACKOFF, "spawn failed: boom"),
            ArmTimer(Timer.BACKOFF, 1.0),
        ],
    ),
    (S.RUNNING, "exited"): (
        S.BACKOFF,
        [t(S.RUNNING, S.BACKOFF, "exited with status 1"), ArmTimer(Timer.BACKOFF, 1.0)],
    ),
    (S.BACKOFF, "start"): (
        S.STARTING,
        [CancelTimer(Timer.BACKOFF), t(S.BACKOFF, S.STARTING, "start requested"), Spawn()],
    ),
    (S.BACKOFF, "stop"): (
        S.STOPPED,
        [CancelTimer(Timer.BACKOFF), t(S.BACKOFF, S.STOPPED, "stop requested")],
    ),
    (S.BACKOFF, "backoff"): (S.STARTING, [t(S.BACKOFF, S.STARTING, "backoff elapsed"), Spawn()]),
    (S.STOPPING, "start"): (S.STOPPING, []),
    (S.STOPPING, "stop"): (S.STOPPING, []),
    (S.STOPPING, "force_kill"): (S.STOPPING, [KILL]),
    (S.STOPPING, "spawned"): (S.STOPPING, []),
    (S.STOPPING, "spawn_failed"): (
        S.STOPPED,
        [CancelTimer(Timer.STOP_TIMEOUT), t(S.STOPPING, S.STOPPED, "spawn failed: boom")],
    ),
    (S.STOPPING, "exited"): (
        S.STOPPED,
        [CancelTimer(Timer.STOP_TIMEOUT), t(S.STOPPING, S.STOPPED, "exited with status 1")],
    ),
    (S.STOPPING, "stop_timeout"): (S.STOPPING, [KILL]),
    # sd_notify messages are recorded (STATUS=) while a process runs, whatever its config
    **{(live, "notified"): (live, []) for live in (S.STARTING, S.RUNNING, S.STOPPING)},
}


def test_the_table_covers_every_state_and_every_event_type() -> None:
    assert {type(e) for e in EVENTS.values()} == set(get_args(ProcessEvent))
    assert {e.timer for e in EVENTS.values() if isinstance(e, TimerFired)} == set(Timer)
    for state in State:
        assert in_state(state).state is state
    assert {state for state, _ in TABLE} <= set(State)
    assert {event for _, event in TABLE} <= set(EVENTS)


@pytest.mark.parametrize("state", list(State), ids=lambda s: s.value)
@pytest.mark.parametrize("event", list(EVENTS))
def test_transition_table(state: State, event: str) -> None:
    p = in_state(state)
    effects = p.handle(EVENTS[event], 20.0)
    expected = TABLE.get((state, event), IGNORED)
    if expected == IGNORED:
        assert effects == [Ignored(state, EVENTS[event])]
        assert p.state is state
    else:
        assert not isinstance(expected, str)
        assert (p.state, effects) == expected


# --------------------------------------------------------------- the table, with probes
#
# The same states against issue 14's events, for a process with a ready probe, a health
# check and a watchdog: the exact effects, or Ignored.

PROBED_CONFIG = {
    **TABLE_CONFIG,
    "ready": {"tcp": "127.0.0.1:5432", "interval": 0.5, "timeout": 0.25, "ready_timeout": 10},
    "health": {"tcp": "127.0.0.1:5432", "interval": 2, "timeout": 0.5, "failures": 1,
               "start_grace": 0},
    "watchdog_sec": 3,
}  # fmt: skip
READY_OK = ProbeResult(Probe.READY, True, "connected")


def probed_in_state(state: State) -> Process:
    p = Process("web", program(**PROBED_CONFIG))
    if state is State.STOPPED:
        return p
    p.handle(Start(), 0.0)
    p.handle(Spawned(100), 0.0)
    if state is State.STARTING:
        return p
    if state is State.FATAL:
        p.handle(Exited(1, None), 0.1)
        p.handle(TimerFired(Timer.BACKOFF), 1.1)
        p.handle(Spawned(101), 1.1)
        p.handle(Exited(1, None), 1.2)
        return p
    p.handle(TimerFired(Timer.STARTSECS), 1.0)
    p.handle(READY_OK, 1.0)
    if state is State.BACKOFF:
        p.handle(Exited(1, None), 10.0)
    elif state is State.STOPPING:
        p.handle(Stop(), 10.0)
    elif state is State.EXITED:
        p.handle(Exited(0, None), 10.0)
    return p


PROBE_EVENTS: dict[str, ProcessEvent] = {
    "ready_ok": READY_OK,
    "ready_failed": ProbeResult(Probe.READY, False, "refused"),
    "health_ok": ProbeResult(Probe.HEALTH, True, "ok"),
    "health_failed": ProbeResult(Probe.HEALTH, False, "refused"),
    "notified_ready": Notified(ready=True),
    "probe": TimerFired(Timer.PROBE),
    "probe_timeout": TimerFired(Timer.PROBE_TIMEOUT),
    "ready_timeout": TimerFired(Timer.READY_TIMEOUT),
    "watchdog": TimerFired(Timer.WATCHDOG),
}
LEAVE_STARTING: list[Effect] = [
    CancelTimer(Timer.READY_TIMEOUT),
    CancelTimer(Timer.PROBE),
    CancelTimer(Timer.PROBE_TIMEOUT),
    CancelProbe(),
]
LEAVE_RUNNING: list[Effect] = [
    CancelTimer(Timer.PROBE),
    CancelTimer(Timer.PROBE_TIMEOUT),
    CancelProbe(),
    CancelTimer(Timer.WATCHDOG),
]


def unhealthy(message: str) -> list[Effect]:
    return [
        HealthChanged(False, message),
        t(S.RUNNING, S.STOPPING, f"unhealthy: {message}"),
        TERM,
        ArmTimer(Timer.STOP_TIMEOUT, 5.0),
        *LEAVE_RUNNING,
    ]


RESCHEDULE_HEALTH: list[Effect] = [CancelTimer(Timer.PROBE_TIMEOUT), ArmTimer(Timer.PROBE, 2.0)]
PROBE_TABLE: dict[tuple[State, str], tuple[State, list[Effect]]] = {
    (S.STARTING, "ready_ok"): (S.STARTING, [CancelTimer(Timer.PROBE_TIMEOUT)]),  # startsecs
    (S.STARTING, "ready_failed"): (
        S.STARTING,
        [CancelTimer(Timer.PROBE_TIMEOUT), ArmTimer(Timer.PROBE, 0.5)],
    ),
    (S.STARTING, "notified_ready"): (S.STARTING, []),  # its readiness is tcp, not notify
    (S.STARTING, "probe"): (
        S.STARTING,
        [RunProbe(Probe.READY), ArmTimer(Timer.PROBE_TIMEOUT, 0.25)],
    ),
    (S.STARTING, "probe_timeout"): (
        S.STARTING,
        [CancelProbe(), CancelTimer(Timer.PROBE_TIMEOUT), ArmTimer(Timer.PROBE, 0.5)],
    ),
    (S.STARTING, "ready_timeout"): (
        S.STOPPING,
        [
            CancelTimer(Timer.STARTSECS),
            t(S.STARTING, S.STOPPING, "not ready after 10 s: no connect 127.0.0.1:5432"),
            TERM,
            ArmTimer(Timer.STOP_TIMEOUT, 5.0),
            *LEAVE_STARTING,
        ],
    ),
    (S.RUNNING, "health_ok"): (S.RUNNING, [*RESCHEDULE_HEALTH, HealthChanged(True, "ok")]),
    (S.RUNNING, "health_failed"): (S.STOPPING, [*RESCHEDULE_HEALTH, *unhealthy("refused")]),
    (S.RUNNING, "notified_ready"): (S.RUNNING, []),
    (S.RUNNING, "probe"): (
        S.RUNNING,
        [RunProbe(Probe.HEALTH), ArmTimer(Timer.PROBE_TIMEOUT, 0.5)],
    ),
    (S.RUNNING, "probe_timeout"): (
        S.STOPPING,
        [CancelProbe(), *RESCHEDULE_HEALTH, *unhealthy("no answer in 0.5 s")],
    ),
    (S.RUNNING, "watchdog"): (
        S.STOPPING,
        [ArmTimer(Timer.WATCHDOG, 3.0), *unhealthy("watchdog: no WATCHDOG=1 in 3 s")],
    ),
    (S.STOPPING, "notified_ready"): (S.STOPPING, []),
}


@pytest.mark.parametrize("state", list(State), ids=lambda s: s.value)
@pytest.mark.parametrize("event", list(PROBE_EVENTS))
def test_transition_table_with_probes(state: State, event: str) -> None:
    p = probed_in_state(state)
    assert p.state is state
    effects = p.handle(PROBE_EVENTS[event], 20.0)
    expected = PROBE_TABLE.get((state, event))
    if expected is None:
        assert effects == [Ignored(state, PROBE_EVENTS[event])]
        assert p.state is state
    else:
        assert (p.state, effects) == expected
