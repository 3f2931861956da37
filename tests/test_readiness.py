"""Readiness, health and dependencies (issue 14): real probes against real listeners,
and the dependency graph, end to end; the decisions themselves as data at the end."""

from __future__ import annotations

import http.server
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from supd import fleet as f
from supd import process as proc
from supd.config import ConfigError, ProgramConfig, load, runtime
from supd.facts import State
from supd.settings import Program
from tests.helpers import PY, SLEEP, Supd, cmd, source_pythonpath, toml_list, wait_until

Factory = Callable[..., Supd]


@pytest.fixture
def bound_port() -> Iterator[socket.socket]:
    """A port picked at runtime, bound but not listening: connect() is refused until the
    test calls listen() (no race with another user of the port)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    yield sock
    sock.close()


def test_tcp_ready_waits_for_a_listener_started_late(
    supd: Factory, bound_port: socket.socket
) -> None:
    port = bound_port.getsockname()[1]
    d = supd(f"""
        [programs.db]
        command = {SLEEP}
        startsecs = 0
        ready = {{ tcp = "127.0.0.1:{port}", interval = 0.05 }}
    """)
    wait_until(lambda: d.events("spawned"), describe=d.describe)
    assert d.state("db") == "STARTING"  # refused: not ready
    bound_port.listen()
    d.wait_state("db", "RUNNING")
    reasons = [e["reason"] for e in d.events("state_changed") if e["to_state"] == "RUNNING"]
    assert reasons == [f"ready: connect 127.0.0.1:{port}: connected"]


def test_not_ready_by_ready_timeout_is_a_failed_start_with_the_reason(
    supd: Factory, bound_port: socket.socket
) -> None:
    port = bound_port.getsockname()[1]
    d = supd(f"""
        [programs.db]
        command = {SLEEP}
        startsecs = 0
        startretries = 0
        stopwaitsecs = 1
        ready = {{ tcp = "127.0.0.1:{port}", interval = 0.05, ready_timeout = 0.3 }}
    """)
    d.wait_state("db", "FATAL")
    fatal = d.events("fatal")[0]["reason"]
    assert fatal.startswith(
        f"not ready after 0.3 s: connect 127.0.0.1:{port}: connection refused"
    ), fatal


class _FlipHandler(http.server.BaseHTTPRequestHandler):
    healthy = False
    requests = 0

    def do_GET(self) -> None:
        type(self).requests += 1
        self.send_response(200 if type(self).healthy else 503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_http_ready_waits_for_a_2xx_after_503s(supd: Factory) -> None:
    handler = type("Handler", (_FlipHandler,), {})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        d = supd(f"""
            [programs.web]
            command = {SLEEP}
            startsecs = 0
            ready = {{ http = "http://127.0.0.1:{port}/healthz", interval = 0.05 }}
        """)
        wait_until(lambda: handler.requests >= 2, describe=d.describe)
        assert d.state("web") == "STARTING"  # 503 twice at least
        handler.healthy = True
        d.wait_state("web", "RUNNING")
        reasons = [e["reason"] for e in d.events("state_changed") if e["to_state"] == "RUNNING"]
        assert reasons == [f"ready: GET http://127.0.0.1:{port}/healthz: 200"]
    finally:
        server.shutdown()
        server.server_close()


def test_log_ready_line_printed_after_a_delay(supd: Factory, tmp_path: Path) -> None:
    go = tmp_path / "go"
    program = cmd(f"""
        import os, time
        print("warming up")
        while not os.path.exists({str(go)!r}):
            time.sleep(0.01)
        print("listening on port 8000")
        time.sleep(1000)
    """)
    d = supd(f"""
        [programs.app]
        command = {program}
        startsecs = 0
        ready = {{ log = "listening on port \\\\d+" }}
    """)
    wait_until(lambda: d.events("spawned"), describe=d.describe)
    assert d.state("app") == "STARTING"
    go.touch()
    d.wait_state("app", "RUNNING")
    reasons = [e["reason"] for e in d.events("state_changed") if e["to_state"] == "RUNNING"]
    assert reasons == ["ready: listening on port 8000"]


def test_file_and_exec_ready(supd: Factory, tmp_path: Path) -> None:
    flag = tmp_path / "ready-flag"
    check = [PY, "-c", f"import os, sys; sys.exit(0 if os.path.exists({str(flag)!r}) else 1)"]
    d = supd(f"""
        [programs.filed]
        command = {SLEEP}
        startsecs = 0
        ready = {{ file = "{flag}", interval = 0.05 }}

        [programs.execd]
        command = {SLEEP}
        startsecs = 0
        ready = {{ exec = {toml_list(check)}, interval = 0.05 }}
    """)
    wait_until(lambda: len(d.events("spawned")) == 2, describe=d.describe)
    assert d.state("filed") == "STARTING"
    assert d.state("execd") == "STARTING"
    flag.touch()
    d.wait_state("filed", "RUNNING")
    d.wait_state("execd", "RUNNING")


def test_health_check_restarts_after_failures(supd: Factory, bound_port: socket.socket) -> None:
    port = bound_port.getsockname()[1]
    bound_port.listen()
    d = supd(f"""
        [programs.web]
        command = {SLEEP}
        startsecs = 0
        backoff_initial = 0
        health = {{ tcp = "127.0.0.1:{port}", interval = 0.05, failures = 2, start_grace = 0 }}
    """)
    wait_until(lambda: d.status()["web"]["healthy"] is True, describe=d.describe)
    assert "HEALTHY" in d.status()["web"]["description"]
    bound_port.close()  # now connect is refused
    wait_until(lambda: d.events("health_changed")[1:], describe=d.describe)
    changed = d.events("health_changed")
    assert [e["healthy"] for e in changed[:2]] == [True, False]
    assert "connection refused" in changed[1]["message"]
    # on_unhealthy = restart (the default): stopped and started again
    wait_until(lambda: len(d.events("spawned")) >= 2, describe=d.describe)


def test_dependencies_start_in_order_and_a_completed_migration(
    supd: Factory, tmp_path: Path
) -> None:
    go = tmp_path / "db-go"
    db = cmd(f"""
        import os, time
        while not os.path.exists({str(go)!r}):
            time.sleep(0.01)
        print("database ready")
        time.sleep(1000)
    """)
    d = supd(f"""
        [programs.web]
        command = {SLEEP}
        startsecs = 0
        priority = 1
        depends_on = ["db", {{ program = "migrate", condition = "completed" }}]

        [programs.migrate]
        command = {cmd("print('migrated')")}
        startsecs = 0
        autorestart = "never"
        depends_on = ["db"]

        [programs.db]
        command = {db}
        startsecs = 0
        ready = {{ log = "database ready" }}
    """)
    wait_until(lambda: d.events("spawned"), describe=d.describe)
    status = d.status()
    assert status["db"]["state"] == "STARTING"
    assert status["web"]["state"] == "STOPPED"
    assert status["web"]["description"] == "waiting for db (ready)"
    assert status["migrate"]["waiting_for"] == "waiting for db (ready)"
    go.touch()
    d.wait_state("web", "RUNNING")
    spawned = [e["process"] for e in d.events("spawned")]
    assert spawned == ["db", "migrate", "web"]
    assert d.state("migrate") == "EXITED"
    # Shutdown stops dependants first, whatever their priority (web's is the lowest).
    d.signal(15)
    assert d.wait_exit() == 0
    stopped = [e["process"] for e in d.events("stopped")]
    assert stopped == ["web", "db"]


def test_a_fatal_dependency_blocks_its_dependants_with_the_reason(supd: Factory) -> None:
    d = supd(f"""
        [programs.db]
        command = {cmd("raise SystemExit(1)")}
        startretries = 0

        [programs.web]
        command = {SLEEP}
        depends_on = ["db"]
    """)
    d.wait_state("db", "FATAL")
    wait_until(lambda: "FATAL" in (d.status()["web"]["waiting_for"] or ""), describe=d.describe)
    web = d.status()["web"]
    assert web["state"] == "STOPPED"
    assert web["description"] == "waiting for db (ready): db is FATAL"
    # `start web` tries db again first; it fails again, and so does the start of web.
    result = d.rpc("start", {"names": ["web"], "wait": True})
    assert [(r["name"], r["ok"], r["error"]) for r in result] == [
        ("web", False, "waiting for db (ready): db is FATAL")
    ]
    assert len(d.events("spawned")) == 2  # db twice, web never


def test_supctl_start_starts_dependencies_first(supd: Factory) -> None:
    d = supd(f"""
        [programs.db]
        command = {SLEEP}
        startsecs = 0
        autostart = false

        [programs.web]
        command = {SLEEP}
        startsecs = 0
        autostart = false
        depends_on = ["db"]
    """)
    env = {"PYTHONPATH": source_pythonpath(), "PATH": "/usr/bin:/bin"}
    subprocess.run([PY, "-m", "supd.ctl", "-s", str(d.socket), "start", "web"], check=True, env=env)
    d.wait_state("web", "RUNNING")
    assert [e["process"] for e in d.events("spawned")] == ["db", "web"]


def test_cycles_and_unknown_names_are_rejected_with_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "supd.toml"
    path.write_text(
        "[programs.a]\n"
        'command = ["/bin/true"]\n'
        'depends_on = ["b"]\n'
        "\n"
        "[programs.b]\n"
        'command = ["/bin/true"]\n'
        'depends_on = ["c", "nosuch"]\n'
        "\n"
        "[programs.c]\n"
        'command = ["/bin/true"]\n'
        'depends_on = [{ program = "a", condition = "healthy" }]\n'
    )
    with pytest.raises(ConfigError) as caught:
        load(path, environ={})
    lines = [str(p) for p in caught.value.problems]
    assert f"{path}:3: programs.a.depends_on: dependency cycle: a -> b -> c -> a" in lines
    assert f"{path}:7: programs.b.depends_on: names unknown program nosuch" in lines


# -- the decisions as data (fake clock) ---------------------------------------------------


def program(name: str, **options: object) -> Program:
    return runtime(
        ProgramConfig.model_validate({"name": name, "command": ["/bin/true"], **options})
    )


def spawned(fleet: f.Fleet, effects: list[f.FleetEffect], now: float) -> list[str]:
    """Report every Spawn as spawned; the names, in order."""
    names = [e.name for e in effects if isinstance(e, f.Spawn)]
    for name in names:
        fleet.handle(f.ChildEvent(name, proc.Spawned(1000 + len(name))), now)
    return names


def test_fleet_holds_dependants_until_the_condition_is_met() -> None:
    fleet = f.Fleet()
    configs = (
        program("web", startsecs=0, depends_on=["db"]),
        program("db", startsecs=0, ready={"tcp": "127.0.0.1:5432", "ready_timeout": 5}),
        program("cron", startsecs=0, priority=5),
    )
    effects = fleet.handle(f.Boot(configs), 0.0)
    assert spawned(fleet, effects, 0.0) == ["cron", "db"]  # independent: by priority
    assert fleet.processes["web"].waiting_for == "waiting for db (ready)"
    probe = fleet.handle(f.Tick(), 0.0)
    assert [type(e) for e in probe] == [f.RunProbe]
    effects = fleet.handle(f.ChildEvent("db", proc.ProbeResult(proc.Probe.READY, False, "x")), 0.1)
    assert not any(isinstance(e, f.Spawn) for e in effects)
    effects = fleet.handle(f.ChildEvent("db", proc.ProbeResult(proc.Probe.READY, True, "")), 0.2)
    assert [e.name for e in effects if isinstance(e, f.Spawn)] == ["web"]
    assert fleet.processes["db"].state is State.RUNNING


def test_fleet_ready_timeout_stops_and_counts_a_failed_start() -> None:
    fleet = f.Fleet()
    config = program("db", startsecs=0, startretries=0, stopwaitsecs=1, ready={"notify": True})
    spawned(fleet, fleet.handle(f.Boot((config,)), 0.0), 0.0)
    assert fleet.next_deadline() == 60.0
    effects = fleet.handle(f.Tick(), 60.0)
    assert any(isinstance(e, f.Kill) for e in effects)
    assert fleet.processes["db"].state is State.STOPPING
    fleet.handle(f.ChildEvent("db", proc.Exited(None, 15)), 60.5)
    assert fleet.processes["db"].state is State.FATAL


# -- sd_notify from programs --------------------------------------------------------------

SEND = """
import os, socket
def send(message):
    address = os.environ["NOTIFY_SOCKET"]
    if address.startswith("@"):
        address = "\\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(message.encode(), address)
"""


def test_notify_ready_and_status_from_a_python_sender(supd: Factory, tmp_path: Path) -> None:
    go = tmp_path / "go"
    program = cmd(
        SEND
        + f"""
import time
send("STATUS=warming up")
while not os.path.exists({str(go)!r}):
    time.sleep(0.01)
send("READY=1\\nSTATUS=serving 3 clients\\nFOO=ignored")
time.sleep(1000)
"""
    )
    d = supd(f"""
        [programs.app]
        command = {program}
        startsecs = 0
        ready = {{ notify = true }}
    """)
    wait_until(lambda: d.status()["app"]["notify_status"] == "warming up", describe=d.describe)
    assert d.state("app") == "STARTING"
    go.touch()
    d.wait_state("app", "RUNNING")
    wait_until(lambda: d.status()["app"]["notify_status"] == "serving 3 clients")
    assert d.status()["app"]["description"].endswith(", serving 3 clients")
    reasons = [e["reason"] for e in d.events("state_changed") if e["to_state"] == "RUNNING"]
    assert reasons == ["ready: READY=1"]


@pytest.mark.skipif(shutil.which("systemd-notify") is None, reason="no systemd-notify")
def test_notify_ready_from_systemd_notify_in_a_shell(supd: Factory) -> None:
    script = "sleep 0.2; systemd-notify --ready --status=up; exec sleep 1000"
    d = supd(f"""
        [programs.app]
        command = ["/bin/sh", "-c", "{script}"]
        startsecs = 0
        ready = {{ notify = true }}
    """)
    d.wait_state("app", "RUNNING")
    assert d.status()["app"]["notify_status"] == "up"


def test_a_watchdog_that_stops_being_fed_restarts_the_program(
    supd: Factory, tmp_path: Path
) -> None:
    stop = tmp_path / "stop-feeding"
    program = cmd(
        SEND
        + f"""
import time
assert os.environ["WATCHDOG_USEC"] == "500000"
send("READY=1")
while not os.path.exists({str(stop)!r}):
    send("WATCHDOG=1")
    time.sleep(0.05)
time.sleep(1000)
"""
    )
    d = supd(f"""
        [programs.app]
        command = {program}
        startsecs = 0
        backoff_initial = 0
        watchdog_sec = 0.5
        ready = {{ notify = true }}
    """)
    d.wait_state("app", "RUNNING")
    first = d.status()["app"]["pid"]
    stop.touch()
    wait_until(lambda: d.events("health_changed"), describe=d.describe)
    changed = d.events("health_changed")[0]
    assert changed["healthy"] is False
    assert changed["message"] == "watchdog: no WATCHDOG=1 in 0.5 s"
    wait_until(lambda: d.status()["app"]["pid"] not in (None, first), describe=d.describe)


def test_notifications_from_strangers_are_ignored_and_logged_once(supd: Factory) -> None:
    d = supd(f"""
        [programs.app]
        command = {SLEEP}
        startsecs = 0
        notify = true
    """)
    d.wait_state("app", "RUNNING")
    address = next(e["address"] for e in d.events("notify_socket_open"))
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        for _ in range(3):
            sock.sendto(b"READY=1\nSTATUS=impostor", "\0" + address[1:])
    # All three were queued before supd's first read, which takes up to 64 at once.
    wait_until(lambda: d.events("notify_ignored"), describe=d.describe)
    assert len(d.events("notify_ignored")) == 1
    assert d.status()["app"]["notify_status"] is None


# -- supctl wait --------------------------------------------------------------------------


def supctl(d: Supd, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PYTHONPATH": source_pythonpath(), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [PY, "-m", "supd.ctl", "-s", str(d.socket), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_supctl_wait_for_ready_and_completed_and_its_timeout(
    supd: Factory, tmp_path: Path, bound_port: socket.socket
) -> None:
    port = bound_port.getsockname()[1]
    d = supd(f"""
        [programs.db]
        command = {SLEEP}
        startsecs = 0
        ready = {{ tcp = "127.0.0.1:{port}", interval = 0.05 }}

        [programs.migrate]
        command = {cmd("print('done')")}
        startsecs = 0
        autorestart = "never"
    """)
    done = supctl(d, "wait", "migrate", "--for", "completed", "--timeout", "10")
    assert (done.returncode, done.stdout) == (0, "migrate: completed\n"), done.stderr
    late = supctl(d, "wait", "db", "--timeout", "0.3")
    assert late.returncode == 1, late
    assert "not ready within 0.3 s" in late.stderr
    bound_port.listen()
    ready = supctl(d, "wait", "db", "--for", "ready", "--timeout", "10")
    assert (ready.returncode, ready.stdout) == (0, "db: ready\n"), ready.stderr
    assert d.rpc("wait", {"names": ["db"], "condition": "started"})[0]["ok"] is True


# -- more decisions as data ---------------------------------------------------------------


class Run:
    """A fleet driven by hand: every Spawn gets a pid, every Kill an exit."""

    def __init__(self, *configs: Program) -> None:
        self.fleet = f.Fleet()
        self.now = 0.0
        self.log: list[f.FleetEffect] = []
        self.pids = iter(range(1000, 100000))
        self.feed(f.Boot(configs))

    def feed(self, event: f.FleetEvent) -> list[f.FleetEffect]:
        effects = self.fleet.handle(event, self.now)
        self.log += effects
        follow: list[f.FleetEvent] = []
        for effect in effects:
            if isinstance(effect, f.Spawn):
                follow.append(f.ChildEvent(effect.name, proc.Spawned(next(self.pids))))
            elif isinstance(effect, f.Kill):
                follow.append(f.ChildEvent(effect.name, proc.Exited(None, effect.signum)))
        for event in follow:
            effects += self.feed(event)
        return effects

    def child(self, name: str, event: proc.ProcessEvent) -> list[f.FleetEffect]:
        assert isinstance(
            event, proc.Spawned | proc.SpawnFailed | proc.Exited | proc.ProbeResult | proc.Notified
        )
        return self.feed(f.ChildEvent(name, event))

    def state(self, name: str) -> State:
        return self.fleet.processes[name].state

    def spawned(self) -> list[str]:
        return [e.name for e in self.log if isinstance(e, f.Spawn)]

    def stopped(self) -> list[str]:
        return [
            e.name
            for e in self.log
            if isinstance(e, f.Transitioned) and e.old is State.STOPPING and e.new is State.STOPPED
        ]


def ready_ok(name: str = "db") -> proc.ProbeResult:
    return proc.ProbeResult(proc.Probe.READY, True, "up")


def test_stop_all_stops_dependants_before_their_dependencies() -> None:
    run = Run(
        program("db", startsecs=0, priority=900),
        program("web", startsecs=0, priority=1, depends_on=["db"]),
        program("worker", startsecs=0, priority=1, depends_on=["db"]),
    )
    assert run.spawned() == ["db", "web", "worker"]
    # Stop answers arrive one by one: hold the exits back to see the order.
    fleet = run.fleet
    effects = fleet.handle(f.Submit(1, f.Action.STOP, ("db", "web", "worker")), 1.0)
    assert [e.name for e in effects if isinstance(e, f.Kill)] == ["web", "worker"]
    effects = fleet.handle(f.ChildEvent("web", proc.Exited(None, 15)), 1.1)
    assert not [e for e in effects if isinstance(e, f.Kill)]  # worker still up
    effects = fleet.handle(f.ChildEvent("worker", proc.Exited(None, 15)), 1.2)
    assert [e.name for e in effects if isinstance(e, f.Kill)] == ["db"]
    effects = fleet.handle(f.ChildEvent("db", proc.Exited(None, 15)), 1.3)
    [answer] = [e for e in effects if isinstance(e, f.Answer)]
    assert all(o.ok for o in answer.outcomes)


def test_supd_is_ready_once_every_autostart_process_is_ready_or_failed() -> None:
    run = Run(
        program("db", startsecs=0, ready={"notify": True}),
        program("web", startsecs=0, depends_on=["db"]),
    )
    assert not any(isinstance(e, f.Ready) for e in run.log)
    effects = run.child("db", proc.Notified(ready=True))
    assert run.state("db") is State.RUNNING
    assert [e.name for e in effects if isinstance(e, f.Spawn)] == ["web"]
    assert [type(e) for e in effects if isinstance(e, f.Ready)] == [f.Ready]


def test_a_fatal_dependency_does_not_hold_back_supd_ready() -> None:
    run = Run(
        program("db", startsecs=1, startretries=0),
        program("api", startsecs=0, depends_on=["web"]),
        program("web", startsecs=0, depends_on=["db"]),
    )
    run.child("db", proc.Exited(1, None))
    assert run.state("db") is State.FATAL
    assert run.fleet.processes["web"].waiting_for == "waiting for db (ready): db is FATAL"
    assert run.fleet.processes["api"].waiting_for == "waiting for web (ready)"
    assert any(isinstance(e, f.Ready) for e in run.log)
    # The dependency recovers: its dependants start, in order.
    run.feed(f.Submit(2, f.Action.START, ("db",)))
    run.now = 2.0
    run.feed(f.Tick())
    assert (run.state("db"), run.state("web"), run.state("api")) == (State.RUNNING,) * 3
    assert run.spawned() == ["db", "db", "web", "api"]


def test_on_dependency_restart_restarts_dependants_after_the_dependency() -> None:
    run = Run(
        program("db", startsecs=0, backoff_initial=0),
        program("web", startsecs=0, depends_on=["db"], on_dependency_restart="restart"),
        program("cron", startsecs=0, depends_on=["db"]),  # ignore, the default
    )
    assert run.spawned() == ["db", "web", "cron"]
    run.child("db", proc.Exited(1, None))  # crash: BACKOFF, web stopped and held
    assert run.state("web") is State.STOPPED
    assert run.state("cron") is State.RUNNING
    assert run.fleet.processes["web"].waiting_for == "waiting for db (ready)"
    run.feed(f.Tick())  # the 0 s backoff: db again, then web
    assert run.spawned() == ["db", "web", "cron", "db", "web"]
    assert run.state("web") is State.RUNNING


def test_a_reload_that_replaces_a_dependency_holds_its_new_dependants() -> None:
    db = program("db", startsecs=0)
    run = Run(db, program("web", startsecs=0, depends_on=["db"]))
    new_db = program("db", startsecs=0, command=["/bin/echo"])
    web2 = program(
        "web",
        startsecs=0,
        command=["/bin/web", "v2"],  # restarts (a new depends_on alone is applied in place)
        depends_on=[{"program": "db", "condition": "started"}],
    )
    run.feed(f.Reload((new_db, web2)))
    assert run.spawned() == ["db", "web", "db", "web"]
    spawns = [e for e in run.log if isinstance(e, f.Spawn)]
    assert spawns[2].program.command == ("/bin/echo",)


def test_completed_needs_a_successful_exit() -> None:
    run = Run(
        program("migrate", startsecs=0, autorestart="never"),
        program("web", startsecs=0, depends_on=[{"program": "migrate", "condition": "completed"}]),
    )
    run.child("migrate", proc.Exited(3, None))
    assert run.state("migrate") is State.EXITED
    assert run.fleet.processes["web"].waiting_for == "waiting for migrate (completed)"
    effects = run.feed(f.Await(9, ("migrate",), "completed"))
    [answer] = [e for e in effects if isinstance(e, f.Answer)]
    assert answer.outcomes[0].error == "cannot become completed: EXITED"
    run.feed(f.Submit(3, f.Action.START, ("migrate",)))
    run.child("migrate", proc.Exited(0, None))
    assert run.state("web") is State.RUNNING


# -- the process state machine: readiness and health --------------------------------------


def started(config: Program) -> tuple[proc.Process, list[proc.Effect]]:
    p = proc.Process("web", config)
    p.handle(proc.Start(), 0.0)
    return p, p.handle(proc.Spawned(10), 0.0)


def test_running_needs_both_ready_and_startsecs() -> None:
    config = program("web", startsecs=2, ready={"tcp": "127.0.0.1:1", "interval": 0.5})
    p, effects = started(config)
    assert effects == [
        proc.ArmTimer(proc.Timer.STARTSECS, 2.0),
        proc.ArmTimer(proc.Timer.READY_TIMEOUT, 60.0),
        proc.ArmTimer(proc.Timer.PROBE, 0.0),
    ]
    assert p.handle(proc.TimerFired(proc.Timer.PROBE), 0.0) == [
        proc.RunProbe(proc.Probe.READY),
        proc.ArmTimer(proc.Timer.PROBE_TIMEOUT, 1.0),
    ]
    assert p.handle(ready_ok(), 0.1) == [proc.CancelTimer(proc.Timer.PROBE_TIMEOUT)]
    assert p.state is State.STARTING  # ready, but startsecs not passed
    effects = p.handle(proc.TimerFired(proc.Timer.STARTSECS), 2.0)
    assert p.state is State.RUNNING
    assert proc.CancelTimer(proc.Timer.READY_TIMEOUT) in effects


def test_a_probe_that_does_not_answer_in_time_is_a_failure_and_is_retried() -> None:
    config = program("web", startsecs=0, ready={"http": "http://127.0.0.1:1/", "timeout": 0.5})
    p, _ = started(config)
    p.handle(proc.TimerFired(proc.Timer.PROBE), 0.0)
    effects = p.handle(proc.TimerFired(proc.Timer.PROBE_TIMEOUT), 0.5)
    assert effects == [
        proc.CancelProbe(),
        proc.CancelTimer(proc.Timer.PROBE_TIMEOUT),
        proc.ArmTimer(proc.Timer.PROBE, 1.0),
    ]
    assert p.ready_error == "no answer in 0.5 s"


@pytest.mark.parametrize("action", ["restart", "stop", "ignore"])
def test_unhealthy_after_failures_then_on_unhealthy(action: str) -> None:
    health = {"tcp": "127.0.0.1:1", "failures": 2, "start_grace": 5, "on_unhealthy": action}
    config = program("web", startsecs=0, health=health, stopwaitsecs=3)
    p, effects = started(config)
    assert p.state is State.RUNNING
    assert proc.ArmTimer(proc.Timer.PROBE, 1.0) in effects
    bad = proc.ProbeResult(proc.Probe.HEALTH, False, "connect 127.0.0.1:1: connection refused")
    p.handle(bad, 1.0)
    p.handle(bad, 2.0)
    assert p.health_failures == 0  # within start_grace: not counted
    assert p.handle(proc.ProbeResult(proc.Probe.HEALTH, True, "ok"), 6.0)[-1] == (
        proc.HealthChanged(True, "ok")
    )
    p.handle(bad, 7.0)
    assert p.healthy is True  # one failure of two
    effects = p.handle(bad, 8.0)
    assert proc.HealthChanged(False, bad.message) in effects
    assert p.healthy is False
    if action == "ignore":
        assert p.state is State.RUNNING
        return
    assert p.state is State.STOPPING
    p.handle(proc.Exited(None, 15), 8.5)
    if action == "restart":
        assert p.state is State.BACKOFF
        assert p.healthy is False  # until the next run starts
    else:
        assert (p.state, p.healthy) == (State.STOPPED, None)


def test_the_example_runs_db_then_migrate_then_web(supd: Factory, tmp_path: Path) -> None:
    ports = []
    for _ in range(2):  # free ports, picked now (released just before supd binds them)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
    example = Path(__file__).resolve().parent.parent / "config" / "conf.d" / "app.toml"
    env = {**os.environ, "DB_PORT": str(ports[0]), "WEB_PORT": str(ports[1]), "DB_DELAY": "0.3"}
    d = Supd(
        tmp_path,
        f"""
        [supervisor]
        socket = "{tmp_path}/supd.sock"
        log_dir = "{tmp_path}/logs"
        log_format = "json"
        include = ["{example}"]
    """,
        env=env,
    )
    try:
        d.start()
        assert d.status()["web"]["waiting_for"] == "waiting for db (ready)"
        assert d.rpc("wait", {"names": ["web"]}, timeout=60)[0]["ok"] is True
        spawned = [e["process"] for e in d.events("spawned")]
        assert spawned == ["db", "migrate", "web"]
        assert d.state("migrate") == "EXITED"
    finally:
        d.kill()


def test_extend_timeout_usec_only_ever_extends_the_ready_timeout() -> None:
    config = program("web", startsecs=0, ready={"notify": True, "ready_timeout": 10})
    p, _ = started(config)
    assert p.handle(proc.Notified(extend_timeout_s=5.0), 1.0) == []  # 6 < 10: no change
    assert p.handle(proc.Notified(extend_timeout_s=30.0), 2.0) == [
        proc.ArmTimer(proc.Timer.READY_TIMEOUT, 30.0)
    ]
    p.handle(proc.Notified(reloading=True, status="reloading config"), 3.0)
    assert (p.notify_state, p.notify_status) == ("reloading", "reloading config")
    p.handle(proc.Notified(ready=True), 4.0)
    assert (p.state, p.notify_state) == (State.RUNNING, None)


def test_on_unhealthy_stop_says_why() -> None:
    health = {"tcp": "127.0.0.1:1", "failures": 1, "start_grace": 0, "on_unhealthy": "stop"}
    p, _ = started(program("web", startsecs=0, health=health))
    effects = p.handle(proc.ProbeResult(proc.Probe.HEALTH, False, "refused"), 1.0)
    assert proc.Transitioned(State.RUNNING, State.STOPPING, "unhealthy: refused") in effects
    p.handle(proc.Exited(None, 15), 1.5)
    assert (p.state, p.want) == (State.STOPPED, proc.Want.DOWN)


# -- supd's own READY=1 and STATUS= to systemd ---------------------------------------------


def test_supd_tells_systemd_ready_only_once_programs_are_ready_and_counts_unhealthy(
    supd: Factory, tmp_path: Path, bound_port: socket.socket
) -> None:
    port = bound_port.getsockname()[1]  # bound, never listening: the check fails
    flag = tmp_path / "flag"
    systemd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    systemd.bind(str(tmp_path / "notify.sock"))
    systemd.settimeout(10)
    env = {k: v for k, v in os.environ.items() if k != "RUNTIME_DIRECTORY"}
    env["NOTIFY_SOCKET"] = str(tmp_path / "notify.sock")
    try:
        d = supd(
            f"""
            [programs.app]
            command = {SLEEP}
            startsecs = 0
            ready = {{ file = "{flag}", interval = 0.05 }}

            [programs.app.health]
            tcp = "127.0.0.1:{port}"
            interval = 0.05
            failures = 1
            start_grace = 0
            on_unhealthy = "ignore"
        """,
            env=env,
        )
        assert d.state("app") == "STARTING"  # so supd cannot have said READY=1 yet
        flag.touch()
        messages: list[str] = []
        while not any("READY=1" in m for m in messages):
            messages.append(systemd.recv(4096).decode())
        assert d.state("app") == "RUNNING"
        while "1 unhealthy" not in messages[-1]:
            messages.append(systemd.recv(4096).decode())
        assert "STATUS=1 running, 1 unhealthy" in messages[-1]
    finally:
        systemd.close()


def test_log_silence_and_exec_health_checks(supd: Factory, tmp_path: Path) -> None:
    quiet = tmp_path / "quiet"
    chatty = cmd(f"""
        import os, time
        while not os.path.exists({str(quiet)!r}):
            print("still here")
            time.sleep(0.02)
        time.sleep(1000)
    """)
    sick = tmp_path / "sick"
    check = [PY, "-c", f"import os, sys; sys.exit(1 if os.path.exists({str(sick)!r}) else 0)"]
    d = supd(f"""
        [programs.talker]
        command = {chatty}
        startsecs = 0

        [programs.talker.health]
        log-silence = 0.3
        interval = 0.1
        failures = 1
        start_grace = 0
        on_unhealthy = "ignore"

        [programs.checked]
        command = {SLEEP}
        startsecs = 0

        [programs.checked.health]
        exec = {toml_list(check)}
        interval = 0.05
        timeout = 10  # a loaded machine may take long to start Python: not a failure here
        failures = 2
        start_grace = 0
        on_unhealthy = "stop"
    """)
    wait_until(lambda: d.status()["talker"]["healthy"] is True, describe=d.describe)
    wait_until(lambda: d.status()["checked"]["healthy"] is True, describe=d.describe)
    quiet.touch()
    sick.touch()
    wait_until(lambda: d.status()["talker"]["healthy"] is False, describe=d.describe)
    assert d.status()["talker"]["health_error"].startswith("printed nothing for ")
    assert d.state("talker") == "RUNNING"  # on_unhealthy = ignore
    d.wait_state("checked", "STOPPED")
    stopping = [e for e in d.events("state_changed") if e["process"] == "checked"][-2]
    assert stopping["reason"] == "unhealthy: exec " + " ".join(check) + ": exit status 1"


def test_wait_fails_at_once_for_a_process_held_by_a_fatal_dependency() -> None:
    run = Run(
        program("db", startsecs=1, startretries=0),
        program("web", startsecs=0, depends_on=["db"]),
    )
    run.child("db", proc.Exited(1, None))
    effects = run.feed(f.Await(5, ("web",), "ready"))
    [answer] = [e for e in effects if isinstance(e, f.Answer)]
    assert answer.outcomes[0].error == "cannot become ready: waiting for db (ready): db is FATAL"


def test_a_failed_readiness_or_health_check_is_the_death_s_cause() -> None:
    config = program("web", startsecs=0, stopwaitsecs=1, ready={"notify": True, "ready_timeout": 5})
    p, _ = started(config)
    p.handle(proc.TimerFired(proc.Timer.READY_TIMEOUT), 5.0)
    p.handle(proc.Exited(None, 15), 5.1)
    death = p.history[-1]
    assert (death.cause.value, death.summary) == (
        "not-ready",
        "not-ready: not ready after 5 s: no READY=1",
    )
    health = {"tcp": "127.0.0.1:1", "failures": 1, "start_grace": 0}
    p, _ = started(program("web", startsecs=0, health=health))
    p.handle(proc.ProbeResult(proc.Probe.HEALTH, False, "refused"), 1.0)
    p.handle(proc.Exited(None, 15), 1.1)
    assert (p.history[-1].cause.value, p.history[-1].summary) == ("unhealthy", "unhealthy: refused")


def test_why_names_an_unmet_dependency() -> None:
    from supd.status import deaths_info

    run = Run(program("db", startsecs=0, ready={"notify": True}), program("web", depends_on=["db"]))
    info = deaths_info(run.fleet.processes["web"], 0.0, 0.0, 5)
    assert info["blocking"] == ["waiting for db (ready)"]
    assert info["next"] == "start it once its dependencies are met (waiting for db (ready))"
    db = deaths_info(run.fleet.processes["db"], 0.0, 0.0, 5)
    assert db["next"] == "wait for it to be ready (READY=1) and up (startsecs)"
