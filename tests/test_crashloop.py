"""Crash loops and deaths as data (issue 15): jitter, the restart window, revive_after,
operator intent against every automatic restart path, and the classification of each
death, on the pure core with a fake clock. The end-to-end side is tests/test_why.py."""

from __future__ import annotations

import random
import signal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from supd.config import ProgramConfig, runtime
from supd.deaths import Cause, Ending, jittered, window_limit
from supd.facts import State
from supd.fleet import Action, Died, Reload
from supd.process import (
    ArmTimer,
    CancelTimer,
    Exited,
    Process,
    Spawned,
    SpawnFailed,
    Start,
    Stop,
    Timer,
    TimerFired,
    Want,
)
from supd.protocol_models import DeathsResult, ProcessInfo
from supd.settings import Program
from supd.status import deaths_info, describe, info
from tests.test_fleet import Sim
from tests.test_fleet import program as fleet_program


def program(**options: Any) -> Program:
    return runtime(
        ProgramConfig.model_validate({"name": "web", "command": ["/bin/true"], **options})
    )


def running(config: Program, now: float = 0.0, pid: int = 100) -> Process:
    p = Process("web", config)
    p.handle(Start(), now)
    p.handle(Spawned(pid), now)
    if p.state is State.STARTING:
        p.handle(TimerFired(Timer.STARTSECS), now + config.startsecs)
    assert p.state is State.RUNNING
    return p


def delays(effects: list[Any], timer: Timer = Timer.BACKOFF) -> list[float]:
    return [e.delay_s for e in effects if isinstance(e, ArmTimer) and e.timer is timer]


def crash_and_respawn(p: Process, now: float, pid: int, code: int = 1) -> list[Any]:
    """The child dies at `now`; if a restart is scheduled, it happens and runs."""
    effects = p.handle(Exited(code, None), now)
    if p.state is State.BACKOFF:
        assert p.backoff_until is not None
        at = p.backoff_until
        p.handle(TimerFired(Timer.BACKOFF), at)
        p.handle(Spawned(pid), at)
        if p.state is State.STARTING:
            p.handle(TimerFired(Timer.STARTSECS), at + p.config.startsecs)
    return effects


# --------------------------------------------------------------------------- jitter


@given(
    delay=st.floats(min_value=0, max_value=3600),
    jitter=st.floats(min_value=0, max_value=1),
    draw=st.floats(min_value=0, max_value=1),
)
def test_a_jittered_delay_stays_within_its_bounds(delay: float, jitter: float, draw: float) -> None:
    value = jittered(delay, jitter, lambda: draw)
    assert delay * (1 - jitter) - 1e-9 <= value <= delay


def test_jitter_draws_from_the_injected_source_between_the_bounds() -> None:
    config = program(autorestart="always", backoff_initial=10, backoff_jitter=0.1)
    for draw, expected in ((0.0, 10.0), (1.0, 9.0), (0.5, 9.5)):
        p = running(config)
        p.draw = lambda value=draw: value
        assert delays(p.handle(Exited(1, None), 100.0)) == [pytest.approx(expected)]


def test_a_hundred_copies_do_not_restart_in_lockstep() -> None:
    rng = random.Random(15)
    sim = Sim(
        fleet_program("web", numprocs=100, autorestart="always", startsecs=0, backoff_initial=4)
    )
    sim.fleet.draw = rng.random
    for process in sim.fleet.processes.values():
        process.draw = rng.random
    for name in list(sim.children):
        sim.exit(name, 1)
    deadlines = [p.backoff_until for p in sim.fleet.processes.values()]
    assert all(d is not None and 3.6 <= d <= 4.0 for d in deadlines)
    assert len(set(deadlines)) > 90  # spread out, not one thundering herd


def test_the_pure_core_without_a_draw_uses_the_upper_bound() -> None:
    p = running(program(autorestart="always", backoff_initial=3))
    assert delays(p.handle(Exited(1, None), 10.0)) == [3.0]


# --------------------------------------------------------------------------- the window


def test_n_plus_one_deaths_after_running_within_the_window_are_fatal() -> None:
    """supervisord's hole: startsecs = 0, dies 1 s after starting, restarted forever."""
    config = program(startsecs=0, max_restarts=5, restart_window=60, backoff_initial=0.5)
    p = running(config)
    now = 0.0
    for n in range(1, 6):
        now += 1.0
        crash_and_respawn(p, now, 100 + n)
        assert p.state is State.RUNNING, n
        now = p.started_at or now
    effects = p.handle(Exited(1, None), now + 1.0)
    assert p.state is State.FATAL and p.want is Want.DOWN
    assert p.reason == "crash loop: 5 restarts in 60 s"
    assert not delays(effects)
    assert p.history[-1].then == "FATAL: crash loop: 5 restarts in 60 s"


def test_deaths_spread_out_never_trip_the_window() -> None:
    config = program(startsecs=0, max_restarts=5, restart_window=60, backoff_initial=0.1)
    p = running(config)
    now = 0.0
    for n in range(1000):  # one death every 13 s: at most 5 in any 60 s
        now += 13.0
        crash_and_respawn(p, now, 100 + n)
        assert p.state is State.RUNNING
        now = p.started_at or now


def test_a_window_of_zero_seconds_is_no_window() -> None:
    config = program(startsecs=0, max_restarts=1, restart_window=0, backoff_initial=0)
    p = running(config)
    for n in range(50):
        crash_and_respawn(p, float(n), 100 + n)
    assert p.state is State.RUNNING


def test_restarts_without_a_window_are_not_kept_and_with_one_stay_bounded() -> None:
    # The churn benchmark found a float kept per restart, for ever, with no window.
    forever = running(program(startsecs=0, restart_window=0, backoff_initial=0))
    for n in range(500):
        crash_and_respawn(forever, float(n), 100 + n)
    assert forever.state is State.RUNNING and len(forever.window) == 0
    windowed = running(program(startsecs=0, max_restarts=5, restart_window=10, backoff_initial=0))
    for n in range(500):
        crash_and_respawn(windowed, float(n) * 3, 100 + n)  # 3 s apart: never five in 10 s
    assert windowed.state is State.RUNNING and len(windowed.window) <= 5


def test_the_default_keeps_startretries_in_charge_of_failed_starts() -> None:
    for retries in (0, 3, 12):
        config = program(startsecs=1, startretries=retries, backoff_initial=0)
        assert window_limit(config) == max(5, retries)
        p = Process("web", config)
        p.handle(Start(), 0.0)
        attempts = 0
        while p.state is not State.FATAL:
            attempts += 1
            p.handle(Spawned(attempts), float(attempts))
            p.handle(Exited(1, None), attempts + 0.1)
            if p.state is State.BACKOFF:
                p.handle(TimerFired(Timer.BACKOFF), attempts + 0.1)
        assert attempts == retries + 1
        assert p.reason == f"exited too quickly; gave up after {retries + 1}"


def test_a_tighter_window_stops_failed_starts_before_startretries() -> None:
    config = program(startsecs=1, startretries=100, max_restarts=2, backoff_initial=0)
    p = Process("web", config)
    p.handle(Start(), 0.0)
    for n in range(3):
        p.handle(Spawned(n), 0.0)
        p.handle(Exited(1, None), 0.1)
        if p.state is State.BACKOFF:
            p.handle(TimerFired(Timer.BACKOFF), 0.1)
    assert p.state is State.FATAL and p.reason == "crash loop: 2 restarts in 60 s"


# --------------------------------------------------------------------------- revive


def fatal(config: Program) -> Process:
    p = Process("web", config)
    p.handle(Start(), 0.0)
    p.handle(SpawnFailed("No such file or directory: /nope"), 0.0)
    assert p.state is State.FATAL
    return p


def test_revive_after_tries_again_with_a_fresh_window() -> None:
    config = program(startretries=0, revive_after=600, max_restarts=1, startsecs=0)
    p = Process("web", config)
    p.handle(Start(), 0.0)
    effects = p.handle(SpawnFailed("boom"), 0.0)
    assert p.state is State.FATAL and delays(effects, Timer.REVIVE) == [600.0]
    assert p.revive_at == 600.0
    assert describe(p, 19.0, 0.0) == "spawn failed: boom; gave up after 1; revive in 9:41"
    effects = p.handle(TimerFired(Timer.REVIVE), 600.0)
    assert p.state is State.STARTING and p.want is Want.UP and p.revive_at is None
    assert p.failures == p.start_failures == 0 and len(p.window) == 0
    p.handle(Spawned(7), 600.0)
    assert p.state is State.RUNNING
    crash_and_respawn(p, 601.0, 8)  # one restart in the fresh window: allowed
    assert p.state is State.RUNNING


def test_without_revive_after_fatal_stays_fatal() -> None:
    p = fatal(program(startretries=0))
    assert p.revive_at is None
    assert p.handle(TimerFired(Timer.REVIVE), 10_000.0)[0].__class__.__name__ == "Ignored"


# --------------------------------------------------------------------------- operator intent


def test_a_stop_in_backoff_cancels_the_restart_for_good() -> None:
    p = running(program(autorestart="always", backoff_initial=5))
    p.handle(Exited(1, None), 10.0)
    effects = p.handle(Stop(), 11.0)
    assert CancelTimer(Timer.BACKOFF) in effects and p.state is State.STOPPED
    assert p.handle(TimerFired(Timer.BACKOFF), 15.0)[0].__class__.__name__ == "Ignored"
    assert p.state is State.STOPPED


def test_a_stop_of_a_fatal_process_cancels_its_revival() -> None:
    p = fatal(program(startretries=0, revive_after=60))
    assert p.handle(Stop(), 1.0) == [CancelTimer(Timer.REVIVE)]
    assert p.revive_at is None and p.want is Want.DOWN
    assert p.handle(TimerFired(Timer.REVIVE), 61.0)[0].__class__.__name__ == "Ignored"
    assert p.state is State.FATAL


def test_a_stopped_process_is_not_restarted_when_its_child_dies() -> None:
    p = running(program(autorestart="always"))
    p.handle(Stop(), 1.0)
    p.handle(Exited(None, signal.SIGTERM), 1.1)
    assert p.state is State.STOPPED and p.backoff_until is None


def test_start_of_a_process_in_backoff_starts_it_now() -> None:
    p = running(program(autorestart="always", backoff_initial=30))
    p.handle(Exited(1, None), 10.0)
    effects = p.handle(Start(), 11.0)
    assert effects[0] == CancelTimer(Timer.BACKOFF) and p.state is State.STARTING
    assert p.failures == 0 and len(p.window) == 0


def test_start_of_a_fatal_process_starts_with_a_fresh_count() -> None:
    config = program(startsecs=0, max_restarts=1, revive_after=100)
    p = running(config)
    crash_and_respawn(p, 1.0, 2)
    p.handle(Exited(1, None), 3.0)
    assert p.state is State.FATAL
    effects = p.handle(Start(), 4.0)
    assert effects[0] == CancelTimer(Timer.REVIVE) and p.state is State.STARTING
    assert (p.failures, p.start_failures, len(p.window), p.revive_at) == (0, 0, 0, None)


def test_operator_intent_in_the_fleet_every_automatic_path() -> None:
    """Backoff and revival never bring back what the operator stopped, across Ticks."""
    sim = Sim(
        fleet_program("crashy", startsecs=0, autorestart="always", backoff_initial=5),
        fleet_program("reviving", startsecs=0, startretries=0, revive_after=5),
        fail_spawn=("reviving",),
    )
    assert sim.state("reviving") is State.FATAL
    sim.exit("crashy", 1)
    assert sim.state("crashy") is State.BACKOFF
    sim.submit(Action.STOP, "crashy", "reviving")
    sim.advance(60)
    assert (sim.state("crashy"), sim.state("reviving")) == (State.STOPPED, State.FATAL)
    assert not [s for s in sim.spawned if s[0] > 0]
    sim.submit(Action.START, "crashy")  # until started again
    assert sim.state("crashy") is State.RUNNING


# --------------------------------------------------------------------------- deaths


def test_every_cause_the_machine_can_tell() -> None:
    config = program(autorestart="always", exitcodes=[0, 3], stopwaitsecs=5)

    p = running(config)
    p.handle(Exited(3, None), 2.0)
    d = p.history[-1]
    assert (d.cause, d.expected, d.summary) == (Cause.EXITED, True, "exited 3")
    assert d.uptime == 2.0 and d.pid == 100

    p = running(config)
    p.handle(Exited(1, None), 2.0)
    assert (p.history[-1].cause, p.history[-1].expected) == (Cause.EXITED, False)

    for by in ("operator", "reload", "shutdown"):
        p = running(config)
        p.handle(Stop(by=by), 2.0)
        p.handle(Exited(None, signal.SIGTERM), 2.1)
        d = p.history[-1]
        assert (d.cause, d.stopped_by, d.sender) == (Cause.STOPPED, by, "supd")
        assert d.summary == f"stopped by {by} (killed by SIGTERM)"

    p = running(config)
    p.handle(Stop(), 2.0)
    p.handle(TimerFired(Timer.STOP_TIMEOUT), 7.0)
    p.handle(Exited(None, signal.SIGKILL), 7.1)
    assert p.history[-1].cause is Cause.STOP_TIMEOUT

    p = running(config)
    p.handle(Exited(None, signal.SIGSEGV, Ending(core_dumped=True)), 2.0)
    d = p.history[-1]
    assert d.cause is Cause.KILLED and d.core_dumped and d.sender == "not supd"
    assert d.summary == "killed by SIGSEGV (core dumped), not sent by supd"

    p = running(config)
    p.handle(Exited(None, signal.SIGKILL), 2.0)
    assert p.history[-1].summary == "SIGKILL not sent by supd (possibly OOM)"

    p = running(config)
    p.handle(Exited(None, signal.SIGKILL, Ending(oom_killed=True)), 2.0)
    assert (p.history[-1].cause, p.history[-1].sender) == (Cause.OOM, "kernel")

    p = running(config)
    p.handle(Exited(None, signal.SIGUSR1, Ending(operator_signals=frozenset({10}))), 2.0)
    assert (p.history[-1].cause, p.history[-1].sender) == (Cause.SIGNALLED, "operator")

    p = Process("web", config)
    p.handle(Start(), 0.0)
    p.handle(SpawnFailed("No such file or directory: /x", wall=1234.0), 0.0)
    d = p.history[-1]
    assert (d.cause, d.wall, d.uptime) == (Cause.SPAWN_ERROR, 1234.0, None)

    for cause in (Cause.NOT_READY, Cause.UNHEALTHY):
        p = running(config)
        p.blame(cause, "probe failed: connection refused")
        p.handle(Stop(), 2.0)
        p.handle(Exited(None, signal.SIGTERM), 2.1)
        assert p.history[-1].cause is cause
        assert p.history[-1].summary == f"{cause.value}: probe failed: connection refused"
    with pytest.raises(ValueError, match="not a cause"):
        p.blame(Cause.EXITED, "no")


def test_the_ring_keeps_the_last_twenty_and_clear_empties_it() -> None:
    p = running(program(startsecs=0, autorestart="always", restart_window=0))
    for n in range(25):
        crash_and_respawn(p, float(n + 1), 200 + n, code=n)
    assert len(p.history) == 20 and p.history[0].exit_code == 5
    p.handle(Exited(9, None, Ending(tail="the latest\n")), 30.0)
    kept = [d.tail for d in p.history]
    assert kept[-1] == "the latest\n" and kept[:-5] == [""] * 15  # tails of the newest 5
    assert p.history[-1].then.startswith("restart ")
    p.clear_history()
    assert (len(p.history), p.failures, len(p.window)) == (0, 0, 0)


def test_the_fleet_reports_each_death_and_keeps_it_across_a_reload() -> None:
    web = fleet_program("web", startsecs=0, autorestart="always")
    gone = fleet_program("gone", startsecs=0)
    sim = Sim(web, gone)
    sim.exit("web", 2)
    died = [e for e in sim.effects if isinstance(e, Died)]
    assert [(e.name, e.death.exit_code) for e in died] == [("web", 2)]
    sim.advance(5)
    # A key that shapes the process (issue 16: only those restart it on reload).
    changed = fleet_program("web", startsecs=0, autorestart="always", environment={"V": "2"})
    sim.post(Reload((changed,)))
    sim.deliver_exits()
    history = list(sim.fleet.processes["web"].history)
    assert [d.cause for d in history] == [Cause.EXITED, Cause.STOPPED]
    assert history[-1].stopped_by == "reload"
    assert "gone" not in sim.fleet.processes


def test_status_shows_the_schedule() -> None:
    config = program(startsecs=0, autorestart="always", backoff_initial=12.4, restart_window=60)
    p = running(config)
    crash_and_respawn(p, 1.0, 2)
    p.handle(Exited(1, None), 30.0)
    assert p.state is State.BACKOFF
    text = describe(p, 30.0, 0.0)
    assert text.startswith("restart ") and text.endswith(" s (exited 1)")
    row = info(p, 30.0, 1000.0)
    ProcessInfo.model_validate(row)
    assert row["next_start_in"] > 0 and row["consecutive_failures"] == p.failures
    assert row["reason"] == "exited with status 1" and row["revive_in"] is None


def test_status_of_a_crash_loop_says_when_it_revives() -> None:
    config = program(startsecs=0, max_restarts=5, backoff_initial=0, revive_after=600)
    p = running(config)
    for n in range(5):
        crash_and_respawn(p, float(n + 1), 10 + n)
    p.handle(Exited(1, None), 19.0)
    assert describe(p, 38.0, 0.0) == "crash loop: 5 restarts in 60 s; revive in 9:41"
    row = info(p, 38.0, 1000.0)
    assert row["revive_in"] == 581.0 and row["next_start_in"] is None
    assert row["reason"] == "crash loop: 5 restarts in 60 s"


def test_the_exact_backoff_line() -> None:
    config = program(startsecs=0, max_restarts=5, backoff_initial=12.4, backoff_factor=1)
    p = running(config)
    for n in range(2):
        crash_and_respawn(p, 1.0 + n, 10 + n)
    p.handle(Exited(1, None), 3.0)
    assert describe(p, 3.0, 0.0) == "restart 3 of 5 in 12.4 s (exited 1)"


def test_deaths_info_is_newest_first_and_says_what_comes_next() -> None:
    p = running(program(startsecs=0, autorestart="always", backoff_initial=4))
    p.handle(Exited(1, None, Ending(wall=100.0, tail="panic: boom\n")), 2.0)
    result = deaths_info(p, 3.0, 1000.0, 20)
    DeathsResult.model_validate(result)
    assert result["next"] == "restart 1 of 5 in 3.0 s"
    assert result["deaths"][0]["tail"] == "panic: boom\n"
    assert result["deaths"][0]["then"] == "restart 1 of 5 in 4.0 s"
    p.handle(Stop(), 4.0)
    result = deaths_info(p, 4.0, 1000.0, 20)
    assert result["next"].startswith("nothing: stopped by operator at ")


def test_a_stop_is_forgotten_once_the_process_is_started_again() -> None:
    p = running(program(startsecs=0, autorestart="never"))
    p.handle(Stop(), 1.0)
    p.handle(Exited(None, signal.SIGTERM), 1.1)
    assert deaths_info(p, 2.0, 100.0, 20)["next"].startswith("nothing: stopped by operator")
    p.handle(Start(), 3.0)
    p.handle(Spawned(5), 3.0)
    p.handle(Exited(0, None), 4.0)
    assert p.state is State.EXITED
    result = deaths_info(p, 5.0, 100.0, 20)
    assert result["next"] == "nothing: it exited and autorestart says not to restart it"
    assert result["deaths"][0]["then"] == "stays down (autorestart = never)"


def test_the_death_ring_keeps_the_last_twenty_and_holds_nothing_before_a_death() -> None:
    from supd.deaths import DEATHS_KEPT, Death, DeathRing

    ring = DeathRing()
    assert ring._items is None and len(ring) == 0 and not ring and list(ring) == []
    with pytest.raises(IndexError):
        ring[-1]
    deaths = [
        Death(at=float(i), wall=0.0, pid=i, uptime=1.0, cause=Cause.EXITED, summary="x")
        for i in range(DEATHS_KEPT + 5)
    ]
    ring.extend(deaths)
    assert list(ring) == deaths[-DEATHS_KEPT:] and ring[-1] is deaths[-1] and ring[0] is deaths[5]
    ring.clear()
    assert ring._items is None
