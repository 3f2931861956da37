"""The fleet core as data: scenarios in milliseconds of test time, with a fake clock and
fake children. No process, no fd: `Sim` carries out the fleet's effects the way the
daemon does (spawns report back through a queue, kills end children later)."""

from __future__ import annotations

import itertools
import random
import signal
from collections import deque
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from supd.config import ProgramConfig, runtime
from supd.facts import ErrorCode, State
from supd.fleet import (
    Action,
    Answer,
    Boot,
    ChildEvent,
    CreateSlot,
    DropSlot,
    Exit,
    Fleet,
    FleetEffect,
    FleetEvent,
    Ignored,
    Kill,
    Outcome,
    Ready,
    Reload,
    Shutdown,
    Spawn,
    Submit,
    Tick,
    Transitioned,
    UnknownNames,
)
from supd.names import select as select_names
from supd.process import Exited, Spawned, SpawnFailed
from supd.settings import Program


def program(name: str, **options: Any) -> Program:
    options.setdefault("command", ["/bin/prog", name])
    return runtime(ProgramConfig.model_validate({"name": name, **options}))


class Sim:
    """A daemon without an OS: the fleet, a fake clock and fake children."""

    def __init__(self, *programs: Program, fail_spawn: tuple[str, ...] = ()) -> None:
        self.fleet = Fleet()
        self.now = 0.0
        self.queue: deque[FleetEvent] = deque()
        self.effects: list[FleetEffect] = []
        self.answers: dict[int, list[tuple[Outcome, ...]]] = {}
        self.children: dict[str, int] = {}  # name -> pid of its live child
        self.spawned: list[tuple[float, str, str]] = []  # (time, process, command[-1])
        self.kills: list[tuple[float, str, int]] = []
        self.ignore_term: set[str] = set()  # these only die of SIGKILL
        self.fail_spawn: set[str] = set(fail_spawn)  # these fail to spawn
        self.dying: list[tuple[str, int, int | None, int | None]] = []  # exits to deliver
        self.slots: set[str] = set()
        self.exited = False
        self._pids = itertools.count(1000)
        self._ids = itertools.count(1)
        self.post(Boot(programs))

    # -- like the daemon ----------------------------------------------------------------

    def post(self, event: FleetEvent) -> None:
        self.queue.append(event)
        while self.queue:
            effects = self.fleet.handle(self.queue.popleft(), self.now)
            self.effects += effects
            for effect in effects:
                self.perform(effect)

    def perform(self, effect: FleetEffect) -> None:
        match effect:
            case Spawn(name=name, program=prog):
                assert name in self.slots, f"spawn of {name} without a slot"
                assert name not in self.children, f"two instances of {name}"
                if name in self.fail_spawn:
                    self.queue.append(ChildEvent(name, SpawnFailed("No such file")))
                    return
                pid = next(self._pids)
                self.children[name] = pid
                self.spawned.append((self.now, name, prog.command[-1]))
                self.queue.append(ChildEvent(name, Spawned(pid)))
            case Kill(name=name, signum=signum):
                self.kills.append((self.now, name, signum))
                pid = self.children.get(name)
                if pid is not None and (signum == signal.SIGKILL or name not in self.ignore_term):
                    self.dying.append((name, pid, None, signum))
            case CreateSlot(name=name):
                assert name not in self.slots
                self.slots.add(name)
            case DropSlot(name=name):
                assert name not in self.children, f"dropped {name} with a live child"
                self.slots.remove(name)
            case Answer(request=request, outcomes=outcomes):
                self.answers.setdefault(request, []).append(outcomes)
            case Exit():
                self.exited = True
            case Transitioned() | Ignored() | Ready():
                pass

    # -- the world ------------------------------------------------------------------------

    def deliver_exits(self) -> None:
        while self.dying:
            name, pid, code, sig = self.dying.pop(0)
            if self.children.get(name) == pid:
                del self.children[name]
                self.post(ChildEvent(name, Exited(code, sig)))

    def exit(self, name: str, code: int | None = 0, sig: int | None = None) -> None:
        """The child of `name` ends on its own."""
        self.dying.append((name, self.children[name], code, sig))
        self.deliver_exits()

    def advance(self, seconds: float) -> None:
        """Let `seconds` of test time pass: deliver exits, fire timers as they fall due."""
        end = self.now + seconds
        while True:
            self.deliver_exits()
            deadline = self.fleet.next_deadline()
            if deadline is None or deadline > end:
                break
            self.now = max(self.now, deadline)
            self.post(Tick())
        self.now = end
        self.deliver_exits()

    def submit(self, action: Action, *names: str, wait: bool = True) -> int:
        request = next(self._ids)
        self.post(Submit(request, action, tuple(self.fleet.resolve(list(names))), wait))
        return request

    def state(self, name: str) -> State:
        return self.fleet.processes[name].state

    def answer(self, request: int) -> tuple[Outcome, ...]:
        [outcomes] = self.answers[request]  # exactly one answer
        return outcomes

    def transitions(self, name: str) -> list[State]:
        return [e.new for e in self.effects if isinstance(e, Transitioned) and e.name == name]


FAST = {"startsecs": 0.5, "stopwaitsecs": 2}


# --------------------------------------------------------------------------- boot


def test_boot_starts_autostart_programs_by_priority_and_is_ready_once_settled() -> None:
    sim = Sim(
        program("late", priority=20, **FAST),
        program("early", priority=5, **FAST),
        program("manual", autostart=False, **FAST),
    )
    assert [name for _, name, _ in sim.spawned] == ["early", "late"]
    assert not any(isinstance(e, Ready) for e in sim.effects)
    sim.advance(0.5)
    assert sim.state("early") is State.RUNNING and sim.state("manual") is State.STOPPED
    assert sum(isinstance(e, Ready) for e in sim.effects) == 1
    sim.advance(10)
    assert sum(isinstance(e, Ready) for e in sim.effects) == 1


def test_ready_comes_even_when_a_program_cannot_start() -> None:
    sim = Sim(program("broken", startretries=0, **FAST), fail_spawn=("broken",))
    assert sim.state("broken") is State.FATAL
    assert sum(isinstance(e, Ready) for e in sim.effects) == 1


def test_unknown_names_are_refused() -> None:
    sim = Sim(program("web", numprocs=2))
    assert sim.fleet.resolve(["web"]) == ["web:0", "web:1"]
    assert sim.fleet.resolve(["all"]) == ["web:0", "web:1"]
    with pytest.raises(UnknownNames) as caught:
        sim.fleet.resolve(["web", "nope"])
    assert caught.value.names == ["nope"]


def _named_fleet() -> Fleet:
    sim = Sim(
        program("web", numprocs=2, autostart=False),
        program("db", autostart=False),
        program("api", process_name="front", autostart=False),
        program("w1", process_group="workers", autostart=False),
        program("w2", process_group="workers", numprocs=2, autostart=False),
    )
    return sim.fleet


NAME_POOL = [
    *("all", "web", "db", "api", "front", "w1", "w2", "workers", "nope", "web:1", "web:9"),
    *("web:", "web:*", "db:", "db:*", "workers:", "workers:*", "workers:w1", "workers:w2_1"),
    *("w*", "*:1", "web:[01]", "?b", "nope:", "nope:*", "api:front", "db:db"),
]


@given(st.lists(st.sampled_from(NAME_POOL), min_size=1, max_size=5))
def test_resolve_says_what_names_py_says_for_any_names(names: list[str]) -> None:
    """The direct path for common names must agree with the rules in names.py."""
    fleet = _named_fleet()
    expected, unknown = select_names(names, fleet._named_sets())
    if unknown:
        with pytest.raises(UnknownNames) as caught:
            fleet.resolve(names)
        assert caught.value.names == unknown
    else:
        assert fleet.resolve(names) == expected


def test_resolving_a_program_or_process_name_does_not_look_at_every_program(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`status NAME` with 10,000 programs: O(names), not O(programs)."""
    fleet = _named_fleet()

    def every_program() -> dict[str, list[str]]:
        raise AssertionError("resolved by looking at every program")

    monkeypatch.setattr(fleet, "_named_sets", every_program)
    assert fleet.resolve(["db", "web:1", "web:*", "workers:w1"]) == [
        "db",
        "web:1",
        "web:0",
        "workers:w1",
    ]


# --------------------------------------------------------------------------- answers


def test_start_is_answered_when_running_and_stop_when_stopped() -> None:
    sim = Sim(program("web", autostart=False, **FAST))
    start = sim.submit(Action.START, "web")
    assert start not in sim.answers  # STARTING: startsecs not yet over
    sim.advance(0.5)
    assert sim.answer(start) == (Outcome("web", True, State.RUNNING),)
    stop = sim.submit(Action.STOP, "web")
    assert stop not in sim.answers
    sim.advance(0.001)
    assert sim.answer(stop) == (Outcome("web", True, State.STOPPED),)


def test_a_start_that_ends_fatal_says_why() -> None:
    sim = Sim(program("web", autostart=False, startretries=1, backoff_initial=0.1, **FAST))
    sim.fail_spawn.add("web")
    start = sim.submit(Action.START, "web")
    sim.advance(1)
    [outcome] = sim.answer(start)
    assert (outcome.ok, outcome.state, outcome.code) == (False, State.FATAL, ErrorCode.BAD_STATE)
    assert outcome.error == "spawn error: No such file"


def test_stop_then_start_in_one_pass_answers_the_stop_as_superseded() -> None:
    """The reported hang: STOPPING -> STOPPED -> STARTING -> RUNNING in one pass left the
    stop's waiter looking at RUNNING forever."""
    sim = Sim(program("web", startsecs=0, stopwaitsecs=2))
    stop = sim.submit(Action.STOP, "web")
    start = sim.submit(Action.START, "web")
    [superseded] = sim.answer(stop)
    assert superseded.code == ErrorCode.SUPERSEDED and superseded.state is State.STOPPING
    assert superseded.error == "superseded by a later start"
    sim.advance(0.001)  # the old one exits, the new one runs (startsecs = 0)
    assert sim.answer(start) == (Outcome("web", True, State.RUNNING),)
    assert sim.transitions("web")[-3:] == [State.STOPPED, State.STARTING, State.RUNNING]


def test_start_then_stop_answers_the_start_as_superseded() -> None:
    sim = Sim(program("web", autostart=False, **FAST))
    start = sim.submit(Action.START, "web")
    stop = sim.submit(Action.STOP, "web")
    [outcome] = sim.answer(start)
    assert outcome.code == ErrorCode.SUPERSEDED and outcome.error == "superseded by a later stop"
    sim.advance(0.001)
    assert sim.answer(stop)[0].ok


def test_same_target_requests_share_the_outcome() -> None:
    sim = Sim(program("web", autostart=False, **FAST))
    first, second = sim.submit(Action.START, "web"), sim.submit(Action.START, "web")
    sim.advance(0.5)
    assert sim.answer(first) == sim.answer(second) == (Outcome("web", True, State.RUNNING),)


def test_wait_false_answers_at_once() -> None:
    sim = Sim(program("web", autostart=False, **FAST))
    request = sim.submit(Action.START, "web", wait=False)
    assert sim.answer(request) == (Outcome("web", True, State.STARTING),)
    sim.advance(1)
    assert sim.answer(request)  # still exactly one answer
    assert sim.state("web") is State.RUNNING


@pytest.mark.parametrize("seed", range(40))
def test_random_conflicting_requests_from_many_clients_are_each_answered_once(
    seed: int,
) -> None:
    rng = random.Random(seed)
    failing = ("db",) if seed % 3 == 0 else ()  # db cannot even be spawned
    db = program("db", backoff_initial=0.2, **FAST)
    sim = Sim(program("web", startsecs=0.2, stopwaitsecs=1), db, fail_spawn=failing)
    if seed % 2:
        sim.ignore_term.add("web")  # every stop of web ends in SIGKILL
    requests = []
    for _ in range(60):
        action = rng.choice(list(Action))
        names = rng.choice([("web",), ("db",), ("all",)])
        requests.append(sim.submit(action, *names))
        sim.advance(rng.choice([0, 0, 0.001, 0.1, 0.3, 1.5]))
        assert len(sim.children) <= 2
    sim.advance(30)
    for request in requests:
        assert len(sim.answers.get(request, [])) == 1, f"request {request}: {sim.answers}"
    sim.post(Shutdown())
    sim.advance(30)
    assert sim.exited and not sim.children


# --------------------------------------------------------------------------- stop


def test_a_stop_that_times_out_ends_in_sigkill() -> None:
    sim = Sim(program("stubborn", startsecs=0, stopwaitsecs=2, stopsignal="INT"))
    sim.ignore_term.add("stubborn")
    stop = sim.submit(Action.STOP, "stubborn")
    sim.advance(1.999)
    assert sim.state("stubborn") is State.STOPPING and stop not in sim.answers
    sim.advance(0.001)
    assert [(t, s) for t, _, s in sim.kills] == [(0.0, signal.SIGINT), (2.0, signal.SIGKILL)]
    assert sim.answer(stop) == (Outcome("stubborn", True, State.STOPPED),)


def test_backoff_arithmetic_on_the_fake_clock() -> None:
    sim = Sim(
        program(
            "crashy",
            startsecs=1,
            startretries=4,
            backoff_initial=0.5,
            backoff_factor=3,
            backoff_max=4,
        )
    )
    for _ in range(5):
        sim.exit("crashy", 1)  # at once: a failed start
        deadline = sim.fleet.next_deadline()
        if deadline is not None:
            sim.advance(deadline - sim.now)  # the restart, and not a moment later
    times = [t for t, _, _ in sim.spawned]
    gaps = [round(b - a, 6) for a, b in itertools.pairwise(times)]
    assert gaps == [0.5, 1.5, 4.0, 4.0]  # then FATAL: 1 attempt + 4 retries
    assert sim.state("crashy") is State.FATAL


def test_zero_backoff_retries_each_go_through_the_loop() -> None:
    config = program("missing", backoff_initial=0, backoff_factor=1, startretries=100_000)
    sim = Sim(config, fail_spawn=("missing",))
    # One Tick per retry: between two retries the daemon serves everything else.
    for _ in range(5):
        assert sim.fleet.next_deadline() == sim.now
        sim.post(Tick())
    assert sum(1 for e in sim.effects if isinstance(e, Spawn)) == 6
    assert sim.state("missing") is State.BACKOFF


# --------------------------------------------------------------------------- restart


def test_restart_all_stops_by_priority_and_waits_then_starts_lowest_first() -> None:
    sim = Sim(
        program("redis", priority=10, **FAST),
        program("nginx", priority=30, **FAST),
        program("app", priority=20, **FAST),
    )
    sim.advance(1)
    sim.ignore_term.add("nginx")  # nginx takes its whole stopwaitsecs
    sim.spawned.clear()
    sim.kills.clear()
    restart = sim.submit(Action.RESTART, "all")
    assert [name for _, name, _ in sim.kills] == ["nginx"]
    sim.advance(2)  # nginx SIGKILLed at 2 s; then app, then redis
    assert [name for _, name, sig in sim.kills if sig != signal.SIGKILL] == [
        "nginx",
        "app",
        "redis",
    ]
    assert [name for _, name, _ in sim.spawned] == ["redis", "app", "nginx"]
    assert all(t == 3.0 for t, _, _ in sim.spawned)  # after nginx's SIGKILL
    sim.advance(1)
    assert [o.ok for o in sim.answer(restart)] == [True, True, True]


def test_restart_of_an_exited_one_shot_starts_it() -> None:
    sim = Sim(program("once", startsecs=0, autorestart="never"))
    sim.exit("once", 0)
    assert sim.state("once") is State.EXITED
    restart = sim.submit(Action.RESTART, "once")
    assert sim.answer(restart) == (Outcome("once", True, State.RUNNING),)


def test_a_stop_during_a_restart_supersedes_it() -> None:
    sim = Sim(program("web", **FAST))
    sim.advance(1)
    sim.ignore_term.add("web")
    restart = sim.submit(Action.RESTART, "web")
    stop = sim.submit(Action.STOP, "web")
    assert sim.answer(restart)[0].code == ErrorCode.SUPERSEDED
    sim.advance(3)
    assert sim.answer(stop)[0].ok and sim.state("web") is State.STOPPED
    assert len(sim.spawned) == 1  # the restart never started it again


# --------------------------------------------------------------------------- reload


def test_reload_adds_removes_changes_and_keeps_the_unchanged() -> None:
    sim = Sim(program("keep", **FAST), program("gone", **FAST), program("edit", **FAST))
    sim.advance(1)
    keep_pid = sim.children["keep"]
    sim.post(Reload((program("keep", **FAST), program("edit", priority=5, **FAST), program("new"))))
    sim.advance(1)
    assert sim.children["keep"] == keep_pid
    assert "gone" not in sim.fleet.processes and "gone" not in sim.slots
    assert sim.fleet.processes["edit"].config.priority == 5
    assert sim.state("edit") is State.RUNNING and sim.state("new") is State.RUNNING


def test_a_program_changed_twice_before_it_settles_gets_the_latest_version() -> None:
    sim = Sim(program("web", command=["v1"], **FAST))
    sim.advance(1)
    sim.ignore_term.add("web")  # the old version takes stopwaitsecs to go
    sim.post(Reload((program("web", command=["v2"], **FAST),)))
    sim.advance(1)
    sim.post(Reload((program("web", command=["v3"], **FAST),)))
    assert [cmd for _, _, cmd in sim.spawned] == ["v1"]
    sim.ignore_term.clear()
    sim.advance(2)  # SIGKILL at 2 s after the first reload
    assert [cmd for _, _, cmd in sim.spawned] == ["v1", "v3"]


def test_removed_and_added_back_while_still_stopping() -> None:
    sim = Sim(program("web", **FAST))
    sim.advance(1)
    sim.ignore_term.add("web")
    sim.post(Reload(()))
    sim.post(Reload((program("web", **FAST),)))
    assert len(sim.spawned) == 1
    sim.advance(2.5)
    assert len(sim.spawned) == 2 and sim.state("web") is State.RUNNING


def test_a_pending_request_on_a_replaced_program_is_answered() -> None:
    sim = Sim(program("web", autostart=False, **FAST))
    start = sim.submit(Action.START, "web")
    sim.post(Reload((program("web", autostart=False, command=["v2"], **FAST),)))
    [outcome] = sim.answer(start)
    assert outcome.code == ErrorCode.SUPERSEDED and "reload" in (outcome.error or "")


def test_a_reload_during_shutdown_changes_nothing() -> None:
    sim = Sim(program("web", **FAST))
    sim.advance(1)
    sim.ignore_term.add("web")
    sim.post(Shutdown())
    effects_before = len(sim.effects)
    sim.post(Reload((program("web", command=["v2"], **FAST), program("new"))))
    assert len(sim.effects) == effects_before
    sim.advance(3)
    assert sim.exited and [name for _, name, _ in sim.spawned] == ["web"]


# --------------------------------------------------------------------------- shutdown


def test_shutdown_stops_priority_groups_highest_first_then_exits() -> None:
    sim = Sim(
        program("db", priority=1, **FAST),
        program("app1", priority=5, **FAST),
        program("app2", priority=5, **FAST),
        program("proxy", priority=10, **FAST),
    )
    sim.advance(1)
    sim.ignore_term.add("app2")
    sim.post(Shutdown())
    assert [name for _, name, _ in sim.kills] == ["proxy"]
    sim.advance(0.001)
    assert {name for _, name, _ in sim.kills[1:]} == {"app1", "app2"}
    sim.advance(1)
    assert "db" not in {name for _, name, _ in sim.kills}  # app2 is not down yet
    sim.advance(1)  # app2 SIGKILLed at stopwaitsecs, then db stopped
    assert [name for _, name, _ in sim.kills[-2:]] == ["app2", "db"]
    assert sim.exited and not sim.children


def test_shutdown_answers_every_pending_request() -> None:
    sim = Sim(program("web", autostart=False, startsecs=5), program("slow", **FAST))
    sim.advance(1)
    sim.ignore_term.add("slow")
    start = sim.submit(Action.START, "web")
    stop = sim.submit(Action.STOP, "slow")
    sim.post(Shutdown())
    assert sim.answer(start)[0].code == ErrorCode.SUPERSEDED
    sim.advance(5)
    assert sim.answer(stop) == (Outcome("slow", True, State.STOPPED),)
    assert sim.exited


def test_a_second_shutdown_kills_what_is_left() -> None:
    sim = Sim(program("stubborn", stopwaitsecs=100, **{"startsecs": 0}))
    sim.ignore_term.add("stubborn")
    sim.post(Shutdown())
    sim.post(Shutdown())
    assert sim.kills[-1][2] == signal.SIGKILL
    sim.advance(0.001)
    assert sim.exited


def test_timers_of_dropped_and_stopped_processes_do_not_pile_up() -> None:
    sim = Sim(program("web", startsecs=30, startretries=10_000, backoff_initial=0))
    for _ in range(500):
        sim.exit("web", 1)
        sim.advance(0)
    assert len(sim.fleet._heap) < 200


def test_a_start_waiting_while_a_restart_stops_it_is_answered_by_the_restart() -> None:
    sim = Sim(program("web", startsecs=0, stopwaitsecs=2))
    sim.ignore_term.add("web")
    stop = sim.submit(Action.STOP, "web")
    start = sim.submit(Action.START, "web")  # supersedes the stop; back up after it
    restart = sim.submit(Action.RESTART, "web")  # same target as the start
    assert sim.answer(stop)[0].code == ErrorCode.SUPERSEDED
    sim.advance(2)  # SIGKILL; then the restart starts it
    assert sim.answer(start) == (Outcome("web", True, State.RUNNING),)
    assert sim.answer(restart) == (Outcome("web", True, State.RUNNING),)
