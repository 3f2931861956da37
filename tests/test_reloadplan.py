"""The reload plan as data: what each kind of key change does to each process, checked
on the pure fleet with a fake clock and fake children (tests/test_fleet.py's `Sim`)."""

from __future__ import annotations

import copy

import pytest

from supd.config import ProgramConfig, SupervisorConfig
from supd.facts import State
from supd.fleet import Action, Kill, Reload, ReloadPlanned, UpdateSlot
from supd.reloadplan import (
    KEY_EFFECTS,
    NOTIFY_SOCKET,
    KeyEffect,
    ReloadPlan,
    Step,
    key_effect,
    supervisor_changes,
)
from supd.settings import Program

from .test_fleet import FAST, Sim, program


def steps(plan: ReloadPlan) -> dict[str, str]:
    return {e.name: e.step.value for e in plan.entries}


def reload(sim: Sim, *programs: Program) -> ReloadPlan:
    """Dry-run, then the real reload: the two plans must be the same."""
    dry = sim.fleet.plan_reload(programs)
    before = len(sim.effects)
    sim.post(Reload(programs))
    [planned] = [e for e in sim.effects[before:] if isinstance(e, ReloadPlanned)]
    assert planned.plan == dry
    return planned.plan


def test_every_restart_key_of_the_issue_restarts_and_the_in_place_ones_do_not() -> None:
    restart = {"command", "environment", "env_files", "directory", "user", "group", "umask"}
    restart.add("redirect_stderr")
    in_place = {"backoff_initial", "backoff_factor", "backoff_max", "backoff_reset"}
    in_place |= {"startretries", "startsecs", "stopsignal", "stopwaitsecs", "killasgroup"}
    in_place |= {"priority", "autorestart", "exitcodes", "autostart"}
    in_place |= {"backoff_jitter", "max_restarts", "restart_window", "revive_after"}
    # readiness, health and dependencies (issue 14); the child's environment restarts
    in_place |= {"ready", "health", "depends_on", "on_dependency_restart", "notify"}
    restart |= {"watchdog_sec", NOTIFY_SOCKET}
    assert {k for k in restart if key_effect(k) is not KeyEffect.RESTART} == set()
    assert {k for k in in_place if key_effect(k) is not KeyEffect.IN_PLACE} == set()
    logs = {k for k in ProgramConfig.model_fields if "logfile" in k}
    assert logs and all(key_effect(k) is KeyEffect.LOGS for k in logs)


def test_every_program_key_is_in_the_table() -> None:
    # The default (restart) is for a key added without thought; none is left to it now.
    assert set(ProgramConfig.model_fields) - set(KEY_EFFECTS) == set()


def test_a_key_the_table_does_not_know_restarts() -> None:
    assert "readiness_check_of_the_future" not in KEY_EFFECTS
    assert key_effect("readiness_check_of_the_future") is KeyEffect.RESTART


@pytest.mark.parametrize(
    ("change", "step", "shown"),
    [
        ({"stopsignal": 2}, Step.UPDATE, "stopsignal: 15 → 2"),
        ({"backoff_max": 5}, Step.UPDATE, "backoff_max: 60.0 → 5.0"),
        ({"exitcodes": [0, 2]}, Step.UPDATE, "exitcodes: [0] → [0, 2]"),
        ({"autorestart": "always"}, Step.UPDATE, 'autorestart: "on-failure" → "always"'),
        ({"command": ["/bin/prog", "v2"]}, Step.RESTART, 'command: ["/bin/prog", "web"] →'),
        ({"environment": {"A": "1"}}, Step.RESTART, 'environment: {} → {"A": "1"}'),
        ({"umask": 0o22}, Step.RESTART, "umask: null → 18"),
        ({"stdout_logfile": "/tmp/new.log"}, Step.UPDATE, "stdout_logfile: "),
        ({"log_timestamps": "iso"}, Step.UPDATE, 'log_timestamps: "none" → "iso"'),
        ({"memory_max": "64MB"}, Step.RESTART, "memory_max: null → "),
        ({"ready": {"file": "/tmp/up"}}, Step.UPDATE, 'ready: null → {"file": "/tmp/up"}'),
        ({"health": {"log-silence": 60}}, Step.UPDATE, 'health: null → {"log-silence": 60.0}'),
        ({"depends_on": ["other"]}, Step.UPDATE, 'depends_on: [] → [{"program": "other"}]'),
        ({"on_dependency_restart": "restart"}, Step.UPDATE, "on_dependency_restart: "),
        # the child's environment: NOTIFY_SOCKET, WATCHDOG_USEC
        ({"notify": True}, Step.RESTART, "NOTIFY_SOCKET: false → true"),
        ({"watchdog_sec": 5}, Step.RESTART, "watchdog_sec: null → 5.0"),
        ({"ready": {"notify": True}}, Step.RESTART, "NOTIFY_SOCKET: false → true"),
    ],
)
def test_the_plan_for_each_kind_of_key_change(
    change: dict[str, object], step: Step, shown: str
) -> None:
    sim = Sim(program("web", **FAST), program("other", **FAST))
    sim.advance(1)
    pids = dict(sim.children)
    plan = reload(sim, program("web", **{**FAST, **change}), program("other", **FAST))
    [web] = [e for e in plan.entries if e.name == "web"]
    assert web.step is step
    assert any(str(c).startswith(shown) for c in web.changes), web.changes
    assert steps(plan)["other"] == "unchanged"
    sim.advance(3)
    assert sim.children["other"] == pids["other"]  # never touched
    if step is Step.RESTART:
        assert sim.children["web"] != pids["web"]
        assert [k.name for k in sim.effects if isinstance(k, Kill)] == ["web"]
    else:
        assert sim.children["web"] == pids["web"]
        assert not any(isinstance(k, Kill) for k in sim.effects)
        assert sim.fleet.processes["web"].config == program("web", **{**FAST, **change})
    updated = [e.name for e in sim.effects if isinstance(e, UpdateSlot)]
    assert updated == (["web"] if shown.startswith(("stdout_logfile", "log_")) else [])


def test_an_in_place_stop_setting_is_used_by_the_next_stop() -> None:
    sim = Sim(program("web", **FAST))
    sim.advance(1)
    reload(sim, program("web", **{**FAST, "stopsignal": 2}))
    sim.submit(Action.STOP, "web")
    assert [k.signum for k in sim.effects if isinstance(k, Kill)] == [2]


def test_numprocs_4_to_2_to_6_touches_only_the_extra_processes() -> None:
    sim = Sim(program("web", numprocs=4, **FAST))
    sim.advance(1)
    pids = dict(sim.children)
    plan = reload(sim, program("web", numprocs=2, **FAST))
    assert [(e.name, e.step.value) for e in plan.entries] == [
        ("web:3", "stop"),
        ("web:2", "stop"),
        ("web:0", "unchanged"),
        ("web:1", "unchanged"),
    ]
    assert [k.name for k in sim.effects if isinstance(k, Kill)] == ["web:3", "web:2"]
    sim.advance(1)
    assert sim.children == {"web:0": pids["web:0"], "web:1": pids["web:1"]}
    assert list(sim.fleet.processes) == ["web:0", "web:1"]
    plan = reload(sim, program("web", numprocs=6, **FAST))
    assert steps(plan) == {
        "web:0": "unchanged",
        "web:1": "unchanged",
        **{f"web:{i}": "start" for i in range(2, 6)},
    }
    sim.advance(1)
    assert sim.children["web:0"] == pids["web:0"] and sim.children["web:1"] == pids["web:1"]
    assert all(sim.state(f"web:{i}") is State.RUNNING for i in range(6))
    assert sim.fleet.programs["web"] == [f"web:{i}" for i in range(6)]


def test_a_dry_run_changes_nothing() -> None:
    sim = Sim(program("web", numprocs=2, **FAST), program("gone", **FAST))
    sim.advance(1)

    def snapshot() -> object:
        processes = {n: (p.state, p.want, p.pid, p.config) for n, p in sim.fleet.processes.items()}
        return copy.deepcopy((processes, sim.fleet.configs, sim.fleet.programs))

    before = snapshot()
    effects = len(sim.effects)
    plan = sim.fleet.plan_reload((program("web", numprocs=3, command=["v2"], **FAST),))
    assert steps(plan) == {"gone": "stop", "web:0": "restart", "web:1": "restart", "web:2": "start"}
    assert snapshot() == before
    assert len(sim.effects) == effects


def test_a_process_that_is_down_gets_the_new_command_in_place() -> None:
    sim = Sim(program("web", autostart=False, **FAST))
    plan = reload(sim, program("web", autostart=False, command=["/bin/prog", "v2"], **FAST))
    assert steps(plan) == {"web": "update in place"}
    assert sim.spawned == []
    sim.submit(Action.START, "web")
    assert [cmd for _, _, cmd in sim.spawned] == ["v2"]


def test_a_new_program_waits_for_a_stopping_process_that_holds_its_name() -> None:
    # process_name templates and groups let a new program take an old one's name.
    old = program("a", process_group="g", process_name="w", **FAST)
    sim = Sim(old)
    sim.advance(1)
    sim.ignore_term.add("g:w")
    plan = reload(sim)  # a removed; it takes stopwaitsecs to go
    assert steps(plan) == {"g:w": "stop"}
    new = program("b", process_group="g", process_name="w", **FAST)
    plan = reload(sim, new)
    assert steps(plan) == {"g:w": "start"}
    assert [cmd for _, _, cmd in sim.spawned] == ["a"]  # parked: the name is still live
    assert sim.fleet.processes["g:w"].config.name == "a"
    sim.advance(2.5)  # SIGKILL at 2 s; then b's process is created and started
    assert [cmd for _, _, cmd in sim.spawned] == ["a", "b"]
    assert sim.fleet.processes["g:w"].config.name == "b"
    assert sim.fleet.programs == {"b": ["g:w"]}


def test_a_name_that_passes_to_another_program_in_one_reload_is_restarted() -> None:
    sim = Sim(program("a", process_group="g", process_name="w", **FAST))
    sim.advance(1)
    plan = reload(sim, program("b", process_group="g", process_name="w", **FAST))
    [entry] = plan.entries
    assert (entry.name, entry.step) == ("g:w", Step.RESTART)
    assert str(entry.changes[0]) == 'program: "a" → "b"'
    sim.advance(1)
    assert [cmd for _, _, cmd in sim.spawned] == ["a", "b"]
    assert sim.fleet.programs == {"b": ["g:w"]} and sim.state("g:w") is State.RUNNING


def test_supervisor_keys_that_cannot_change_live_are_named() -> None:
    old = SupervisorConfig.model_construct(log_level="info", socket="/a.sock")
    new = SupervisorConfig.model_construct(log_level="debug", socket="/b.sock")
    live, not_live = supervisor_changes(old, new)
    assert [c.key for c in live] == ["socket", "log_level"]
    assert not_live == []


def test_supctl_never_says_no_changes_when_something_changed() -> None:
    from supd.ctl import reload_lines

    socket_only = {"plan": [], "supervisor": [{"key": "socket", "old": '"/a"', "new": '"/b"'}]}
    assert reload_lines(socket_only) == ['[supervisor] socket: "/a" → "/b"']
    older_daemon = {"added": ["new"], "changed": [], "removed": ["old"]}
    assert reload_lines(older_daemon) == ["added: new", "removed: old"]
    unchanged = {"plan": [{"name": "web", "program": "web", "step": "unchanged"}]}
    assert reload_lines(unchanged) == ["unchanged: 1 process", "no changes"]
    not_live = {"plan": [], "not_applied": ["pidfile: needs `supctl reexec`"]}
    assert "no changes" not in reload_lines(not_live)


@pytest.mark.parametrize(
    ("before", "after", "step"),
    [
        # NOTIFY_SOCKET already given by another key: nothing changes in the child
        ({"ready": {"notify": True}}, {"ready": {"notify": True}, "notify": True}, Step.UPDATE),
        ({"notify": True}, {"notify": True, "ready": {"notify": True}}, Step.UPDATE),
        ({"watchdog_sec": 5}, {"watchdog_sec": 5, "notify": True}, Step.UPDATE),
        # ... or taken away
        ({"notify": True}, {}, Step.RESTART),
        ({"ready": {"notify": True}}, {"ready": {"tcp": "127.0.0.1:9"}}, Step.RESTART),
    ],
)
def test_notify_restarts_exactly_when_the_child_gains_or_loses_notify_socket(
    before: dict[str, object], after: dict[str, object], step: Step
) -> None:
    sim = Sim(program("web", **FAST, **before))
    sim.advance(1)
    plan = reload(sim, program("web", **FAST, **after))
    [web] = plan.entries
    assert web.step is step
    shown = [c.key for c in web.changes]
    assert (NOTIFY_SOCKET in shown) is (step is Step.RESTART)
