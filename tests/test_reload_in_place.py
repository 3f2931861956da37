"""Readiness, health and dependency keys changed by a reload, as data: the process keeps
its pid, and the run under way follows the new settings (Process.reconfigure; the rules
are in docs/reload.md). The fleet is driven by tests/test_fleet.py's `Sim`, with a fake
clock; probes are answered by hand."""

from __future__ import annotations

from typing import Any

from supd import process as proc
from supd.facts import State
from supd.fleet import (
    Action,
    Adopt,
    CancelProbe,
    ChildEvent,
    Fleet,
    HealthChanged,
    Kill,
    ReadyProbeChanged,
    Reload,
    ReloadPlanned,
    RunProbe,
    Spawn,
    Transitioned,
)
from supd.process import Probe, ProbeResult
from supd.reloadplan import Step

from .test_fleet import FAST, Sim, program

TCP = "127.0.0.1:9"
CHECK = {"tcp": TCP, "interval": 2, "start_grace": 0, "failures": 2}


def reload(sim: Sim, *programs: Any) -> dict[str, Step]:
    """The real reload, after checking that the dry run plans the same."""
    dry = sim.fleet.plan_reload(programs)
    before = len(sim.effects)
    sim.post(Reload(programs))
    [planned] = [e.plan for e in sim.effects[before:] if isinstance(e, ReloadPlanned)]
    assert planned == dry
    return {e.name: e.step for e in planned.entries}


def probes(sim: Sim, since: int, name: str = "web") -> list[RunProbe]:
    return [e for e in sim.effects[since:] if isinstance(e, RunProbe) and e.name == name]


def answer(sim: Sim, probe: Probe, ok: bool, message: str = "", name: str = "web") -> None:
    sim.post(ChildEvent(name, ProbeResult(probe, ok, message)))


def kills(sim: Sim, since: int = 0) -> list[str]:
    return [e.name for e in sim.effects[since:] if isinstance(e, Kill)]


# -- health ------------------------------------------------------------------------------


def test_a_health_check_added_to_a_running_process_starts_one_interval_later() -> None:
    sim = Sim(program("web", **FAST))
    sim.advance(1)
    pid = sim.children["web"]
    mark = len(sim.effects)
    health = {**CHECK, "on_unhealthy": "restart"}
    assert reload(sim, program("web", health=health, **FAST)) == {"web": Step.UPDATE}
    sim.advance(1.9)
    assert probes(sim, mark) == []
    sim.advance(0.1)  # one interval after the reload
    [run] = probes(sim, mark)
    assert run.probe is Probe.HEALTH and run.program.health is not None
    answer(sim, Probe.HEALTH, True, "connected")
    assert sim.fleet.processes["web"].healthy is True
    assert [e.healthy for e in sim.effects[mark:] if isinstance(e, HealthChanged)] == [True]
    # it is a real health check: two failures in a row restart the process
    for _ in range(2):
        sim.advance(2)
        answer(sim, Probe.HEALTH, False, "refused")
    assert kills(sim, mark) == ["web"]
    sim.advance(5)
    assert sim.children["web"] != pid and sim.state("web") is State.RUNNING


def test_a_health_check_removed_stops_and_forgets_its_verdict() -> None:
    ignore = {**CHECK, "on_unhealthy": "ignore", "failures": 1}
    sim = Sim(program("web", health=ignore, **FAST))
    sim.advance(2.5)  # RUNNING at 0.5, first check at 2.5
    answer(sim, Probe.HEALTH, False, "refused")
    web = sim.fleet.processes["web"]
    assert (web.healthy, web.health_error, sim.fleet.unhealthy_count()) == (False, "refused", 1)
    sim.advance(2)  # the next check is in flight
    assert probes(sim, 0)[-1].probe is Probe.HEALTH
    mark = len(sim.effects)
    assert reload(sim, program("web", **FAST)) == {"web": Step.UPDATE}
    assert any(isinstance(e, CancelProbe) for e in sim.effects[mark:])  # the one in flight
    assert (web.healthy, web.health_error, web.health_failures) == (None, None, 0)
    assert sim.fleet.unhealthy_count() == 0
    sim.advance(60)
    assert probes(sim, mark) == [] and kills(sim) == []
    assert sim.fleet.next_deadline() is None  # no timer left behind


def test_a_changed_interval_counts_from_the_reload_and_the_failures_stay() -> None:
    slow = {**CHECK, "interval": 100, "failures": 3}
    sim = Sim(program("web", health=slow, **FAST))
    sim.advance(100.5)
    answer(sim, Probe.HEALTH, False, "refused")
    assert sim.fleet.processes["web"].health_failures == 1
    sim.advance(10)
    mark = len(sim.effects)
    reload(sim, program("web", health={**slow, "interval": 1, "failures": 2}, **FAST))
    sim.advance(1)  # not 90 s more: the new interval, from the reload
    assert len(probes(sim, mark)) == 1
    answer(sim, Probe.HEALTH, False, "refused")  # 2 of the new 2: unhealthy, restart
    assert sim.fleet.processes["web"].healthy is False
    assert kills(sim, mark) == ["web"]


def test_a_health_check_of_another_target_starts_its_count_again() -> None:
    sim = Sim(program("web", health={**CHECK, "failures": 3}, **FAST))
    for _ in range(2):
        sim.advance(2)
        answer(sim, Probe.HEALTH, False, "refused")
    assert sim.fleet.processes["web"].health_failures == 2
    reload(sim, program("web", health={**CHECK, "failures": 3, "tcp": "127.0.0.1:10"}, **FAST))
    web = sim.fleet.processes["web"]
    assert (web.health_failures, web.health_error) == (0, None)
    sim.advance(2)
    answer(sim, Probe.HEALTH, False, "refused")
    assert web.health_failures == 1 and kills(sim) == []


def test_health_changed_while_not_running_is_for_the_next_run() -> None:
    sim = Sim(program("web", autostart=False, **FAST))
    assert reload(sim, program("web", autostart=False, health=CHECK, **FAST)) == {
        "web": Step.UPDATE
    }
    assert sim.fleet.next_deadline() is None
    sim.submit(Action.START, "web")
    mark = len(sim.effects)
    sim.advance(2.5)
    assert [p.probe for p in probes(sim, mark)] == [Probe.HEALTH]


# -- readiness ---------------------------------------------------------------------------


def test_a_starting_process_waits_on_the_new_ready_probe_from_the_reload() -> None:
    waits = {"tcp": TCP, "interval": 1, "ready_timeout": 10}
    sim = Sim(program("web", ready=waits, **FAST))
    sim.advance(3)  # probing tcp, refused every second
    answer(sim, Probe.READY, False, "refused")
    pid = sim.children["web"]
    mark = len(sim.effects)
    steps = reload(sim, program("web", ready={"file": "/run/web.ready"}, **FAST))
    assert steps == {"web": Step.UPDATE}
    assert any(isinstance(e, CancelProbe) for e in sim.effects[mark:])
    assert [e.name for e in sim.effects[mark:] if isinstance(e, ReadyProbeChanged)] == ["web"]
    sim.advance(0)  # probed at once, with the new probe
    [run] = probes(sim, mark)
    assert run.probe is Probe.READY and run.program.ready is not None
    assert run.program.ready.file == "/run/web.ready"
    answer(sim, Probe.READY, True, "exists")
    assert sim.state("web") is State.RUNNING and sim.children["web"] == pid
    reasons = [e.reason for e in sim.effects[mark:] if isinstance(e, Transitioned)]
    assert reasons == ["ready: exists"]


def test_the_new_ready_timeout_counts_from_the_spawn() -> None:
    sim = Sim(program("web", ready={"tcp": TCP, "ready_timeout": 60}, **FAST))
    sim.advance(4)
    reload(sim, program("web", ready={"tcp": TCP, "ready_timeout": 6}, **FAST))
    sim.advance(1.9)
    assert kills(sim) == []
    sim.advance(0.2)  # 6 s after the spawn, not after the reload
    assert kills(sim) == ["web"]
    # (the fake children never answer a probe: each times out)
    assert sim.fleet.processes["web"].reason == "not ready after 6 s: no answer in 1 s"


def test_ready_removed_while_starting_is_running_at_once_and_answers_the_start() -> None:
    sim = Sim(program("web", autostart=False, ready={"tcp": TCP}, **FAST))
    start = sim.submit(Action.START, "web")
    sim.advance(1)  # startsecs passed; not ready
    assert sim.state("web") is State.STARTING
    mark = len(sim.effects)
    reload(sim, program("web", autostart=False, **FAST))
    assert sim.state("web") is State.RUNNING
    # (so the daemon drops a `log` probe's line matcher)
    assert [e.name for e in sim.effects[mark:] if isinstance(e, ReadyProbeChanged)] == ["web"]
    assert sim.fleet.processes["web"].reason == "ready check removed by a reload"
    [outcome] = sim.answer(start)
    assert outcome.ok and outcome.state is State.RUNNING
    sim.advance(120)  # the old ready timeout is gone with its probe
    assert kills(sim) == []


def test_ready_added_while_starting_holds_it_until_ready() -> None:
    sim = Sim(program("web", startsecs=2, stopwaitsecs=2))
    sim.advance(1)
    reload(sim, program("web", startsecs=2, stopwaitsecs=2, ready={"tcp": TCP}))
    sim.advance(1.5)  # startsecs over, but not ready
    assert sim.state("web") is State.STARTING
    answer(sim, Probe.READY, True, "connected")
    assert sim.state("web") is State.RUNNING


def test_a_ready_1_already_sent_counts_when_a_reload_makes_it_the_probe() -> None:
    sim = Sim(program("web", notify=True, ready={"tcp": TCP}, **FAST))
    sim.post(ChildEvent("web", proc.Notified(ready=True)))
    assert sim.state("web") is State.STARTING  # its probe is tcp
    steps = reload(sim, program("web", notify=True, ready={"notify": True}, **FAST))
    assert steps == {"web": Step.UPDATE}  # it had NOTIFY_SOCKET already
    sim.advance(0.5)
    assert sim.state("web") is State.RUNNING


def test_ready_changed_while_running_is_for_the_next_start() -> None:
    sim = Sim(program("web", **FAST))
    sim.advance(1)
    mark = len(sim.effects)
    reload(sim, program("web", ready={"tcp": TCP}, **FAST))
    assert sim.state("web") is State.RUNNING
    sim.advance(10)
    assert probes(sim, mark) == []
    sim.submit(Action.RESTART, "web")
    sim.advance(1)
    assert sim.state("web") is State.STARTING  # the new start waits for the probe
    assert [p.probe for p in probes(sim, mark)] == [Probe.READY]


# -- dependencies ------------------------------------------------------------------------


def test_depends_on_added_by_reload_orders_the_stops_and_starts_from_then_on() -> None:
    # Without the dependency, db (priority 999) would stop first and start last.
    sim = Sim(program("db", **FAST), program("web", priority=1, **FAST))
    sim.advance(1)
    pids = dict(sim.children)
    steps = reload(
        sim, program("db", **FAST), program("web", priority=1, depends_on=["db"], **FAST)
    )
    assert steps == {"db": Step.UNCHANGED, "web": Step.UPDATE}
    assert sim.children == pids
    mark = len(sim.kills)
    sim.submit(Action.STOP, "all")
    sim.advance(1)
    assert [name for _, name, _ in sim.kills[mark:]] == ["web", "db"]
    before = len(sim.spawned)
    sim.submit(Action.START, "web")  # starts db first, then web once db is up
    assert [name for _, name, _ in sim.spawned[before:]] == ["db"]
    sim.advance(1)
    assert [name for _, name, _ in sim.spawned[before:]] == ["db", "web"]


def test_on_dependency_restart_set_by_reload_applies_from_then_on() -> None:
    sim = Sim(program("db", **FAST), program("web", depends_on=["db"], **FAST))
    sim.advance(1)
    reload(
        sim,
        program("db", **FAST),
        program("web", depends_on=["db"], on_dependency_restart="restart", **FAST),
    )
    web = sim.children["web"]
    sim.exit("db", 1)  # db dies and comes back: web goes with it (PartOf)
    sim.advance(10)
    assert kills(sim) == ["web"] and sim.children["web"] != web
    reload(sim, program("db", **FAST), program("web", depends_on=["db"], **FAST))
    web = sim.children["web"]
    sim.exit("db", 1)
    sim.advance(10)
    assert kills(sim) == ["web"] and sim.children["web"] == web  # ignore again


def test_a_held_process_waits_for_the_dependencies_a_reload_gives_it() -> None:
    sim = Sim(
        program("db", startretries=0, **FAST),
        program("cache", autostart=False, **FAST),
        program("web", depends_on=["db"], **FAST),
        fail_spawn=("db",),
    )
    assert sim.fleet.processes["web"].waiting_for == "waiting for db (ready): db is FATAL"
    steps = reload(
        sim,
        program("db", startretries=0, **FAST),
        program("cache", autostart=False, **FAST),
        program("web", depends_on=["cache"], **FAST),
    )
    assert steps["web"] is Step.UPDATE
    assert [name for _, name, _ in sim.spawned] == ["cache"]  # its new dependency first
    assert sim.fleet.processes["web"].waiting_for == "waiting for cache (ready)"
    sim.advance(1)
    assert [name for _, name, _ in sim.spawned] == ["cache", "web"]


def test_a_reload_leaves_a_fatal_dependency_of_a_held_process_alone() -> None:
    programs = (
        program("db", startretries=0, **FAST),
        program("web", depends_on=["db"], **FAST),
    )
    sim = Sim(*programs, fail_spawn=("db",))
    spawns = [e for e in sim.effects if isinstance(e, Spawn)]
    assert [e.name for e in spawns] == ["db"] and sim.state("db") is State.FATAL
    mark = len(sim.effects)
    reload(sim, *programs, program("other", autostart=False, **FAST))
    assert not [e for e in sim.effects[mark:] if isinstance(e, Spawn)]
    assert sim.fleet.processes["web"].waiting_for == "waiting for db (ready): db is FATAL"


def test_on_dependency_restart_crosses_a_reexec() -> None:
    programs = (
        program("db", **FAST),
        program("web", depends_on=["db"], on_dependency_restart="restart", **FAST),
    )
    sim = Sim(*programs)
    sim.advance(1)
    adopted(sim, *programs)
    sim.exit("db", 1)
    assert kills(sim) == ["web"]


def adopted(sim: Sim, *programs: Any) -> None:
    """The new image's fleet, given what the old one had (processes, armed timers)."""
    timers = tuple(
        (name, timer, deadline)
        for name, armed in sim.fleet.armed_timers().items()
        for timer, deadline in armed
    )
    processes = tuple(sim.fleet.processes.values())
    sim.fleet = Fleet()
    sim.slots.clear()
    sim.post(Adopt(programs, processes, timers))


def test_an_unhealthy_process_is_counted_across_a_reexec() -> None:
    ignore = {**CHECK, "on_unhealthy": "ignore", "failures": 1}
    programs = (program("web", health=ignore, **FAST),)
    sim = Sim(*programs)
    sim.advance(2.5)  # RUNNING at 0.5, first check at 2.5
    answer(sim, Probe.HEALTH, False, "refused")
    assert sim.fleet.unhealthy_count() == 1
    adopted(sim, *programs)
    assert sim.fleet.unhealthy_count() == 1  # STATUS= says so after the re-exec too
    sim.advance(2)
    answer(sim, Probe.HEALTH, True, "connected")
    assert sim.fleet.processes["web"].healthy is True
    assert sim.fleet.unhealthy_count() == 0


def test_a_process_held_for_its_dependency_starts_after_a_reexec() -> None:
    programs = (
        program("db", ready={"tcp": TCP, "ready_timeout": 60}, **FAST),
        program("web", depends_on=["db"], **FAST),
    )
    sim = Sim(*programs)
    sim.advance(1)  # db waits for its probe; web is held
    assert sim.state("db") is State.STARTING and "web" not in sim.children
    assert sim.fleet.processes["web"].waiting_for == "waiting for db (ready)"
    adopted(sim, *programs)
    answer(sim, Probe.READY, True, "connected", name="db")
    assert sim.state("db") is State.RUNNING
    sim.advance(1)
    assert sim.state("web") is State.RUNNING
    assert sim.fleet.processes["web"].waiting_for is None


def test_a_dependant_stopping_with_its_dependency_comes_back_after_a_reexec() -> None:
    programs = (
        program("db", **FAST),
        program("web", depends_on=["db"], on_dependency_restart="restart", **FAST),
    )
    sim = Sim(*programs)
    sim.advance(1)
    sim.ignore_term.add("web")  # still STOPPING at the re-exec
    sim.exit("db", 1)
    assert sim.state("web") is State.STOPPING
    adopted(sim, *programs)
    sim.advance(10)  # web killed after stopwaitsecs; db restarted after its backoff
    assert sim.state("db") is State.RUNNING
    assert sim.state("web") is State.RUNNING  # restarted with db, as without the re-exec


def test_a_probe_in_flight_at_a_reexec_is_run_again_by_the_new_image() -> None:
    health = {**CHECK, "timeout": 5, "failures": 1}
    sim = Sim(program("web", health=health, **FAST))
    sim.advance(2.6)  # RUNNING at 0.5, the check at 2.5 is in flight
    assert probes(sim, 0) and sim.fleet.armed_timers()["web"][0][0] is proc.Timer.PROBE_TIMEOUT
    mark = len(sim.effects)
    adopted(sim, program("web", health=health, **FAST))
    sim.advance(0)  # probed again at once, not failed 5 s later
    assert [run.probe for run in probes(sim, mark)] == [Probe.HEALTH]
    answer(sim, Probe.HEALTH, True, "connected")
    sim.advance(1.9)  # (the next check is due at 2 s: the fake children never answer)
    assert kills(sim) == [] and sim.fleet.processes["web"].healthy is True
