"""Reload with a real daemon: the plan supctl prints is the plan applied, unchanged
processes keep their pid and their pipes, log settings change in place, numprocs moves
only the extra processes, and [supervisor] changes apply live."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import PY, REPO, SLEEP, Supd, children_of, cmd, wait_until

Factory = Callable[..., Supd]

TICKER = cmd("import time\nfor i in range(10**6):\n    print(i, flush=True)\n    time.sleep(0.01)")


def supctl(d: Supd, *args: str, socket: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), NO_COLOR="1")
    return subprocess.run(
        [PY, "-m", "supd.ctl", "-s", str(socket or d.socket), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )


def numbers(path: Path) -> list[int]:
    text = path.read_text() if path.exists() else ""
    return [int(line) for line in text.splitlines()[:-1]]  # the last may be partial


def pids(d: Supd) -> dict[str, Any]:
    return {name: entry["pid"] for name, entry in d.status().items()}


def test_dry_run_prints_the_plan_changes_nothing_and_matches_the_reload(supd: Factory) -> None:
    d = supd(f"""
        [programs.web]
        command = {SLEEP}
        startsecs = 0
        numprocs = 2
        [programs.calm]
        command = {SLEEP}
        startsecs = 0
        [programs.gone]
        command = {SLEEP}
        startsecs = 0
    """)
    for name in ("web:0", "web:1", "calm", "gone"):
        d.wait_state(name, "RUNNING")
    before = pids(d)
    d.write_config(f"""
        [supervisor]
        log_level = "debug"
        journal_socket = "/run/elsewhere.sock"
        [programs.web]
        command = {SLEEP}
        startsecs = 0
        numprocs = 3
        stopsignal = "INT"
        [programs.calm]
        command = {SLEEP}
        startsecs = 0
        environment = {{ MODE = "new" }}
        [programs.fresh]
        command = {SLEEP}
        autostart = false
    """)
    dry = supctl(d, "reload", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    assert lines[-1] == "(dry run: nothing changed)"
    assert [line.split()[:2] for line in lines if line.startswith("web:0")] == [["web:0", "update"]]
    assert any(line.startswith("web:0") and "stopsignal: 15 → 2" in line for line in lines)
    assert any(line.split()[:2] == ["calm", "restart"] and "MODE" in line for line in lines)
    assert any(line.split()[:2] == ["gone", "stop"] for line in lines)
    assert any(line.split()[:2] == ["web:2", "start"] for line in lines)
    assert any(line.split()[:2] == ["fresh", "add"] for line in lines)
    assert pids(d) == before  # nothing changed
    dry_json = json.loads(supctl(d, "--json", "reload", "--dry-run").stdout)
    real = supctl(d, "--json", "reload")
    assert real.returncode == 0, real.stderr
    applied = json.loads(real.stdout)
    assert dry_json["dry_run"] and not applied["dry_run"]
    assert {**dry_json, "dry_run": False} == applied  # the plan and all the rest
    assert [c["key"] for c in applied["supervisor"]] == ["log_level"]
    assert [n.split(":")[0] for n in applied["not_applied"]] == ["journal_socket"]
    [event] = d.events("config_reloaded")
    assert event["plan"] == [e for e in applied["plan"] if e["step"] != "unchanged"]
    d.wait_state("web:2", "RUNNING")
    wait_until(lambda: "gone" not in d.status(), describe=d.describe)
    new_calm = d.wait_state("calm", "RUNNING")["pid"]
    after = pids(d)
    assert after["web:0"] == before["web:0"] and after["web:1"] == before["web:1"]
    assert new_calm != before["calm"] and d.state("fresh") == "STOPPED"
    assert "no changes" in supctl(d, "reload").stdout  # the plan, applied, leaves none


def test_numprocs_4_to_2_to_6_keeps_the_others_pids(supd: Factory) -> None:
    config = """
        [programs.w]
        command = {sleep}
        startsecs = 0
        stopwaitsecs = 2
        numprocs = {n}
    """
    d = supd(config.format(sleep=SLEEP, n=4))
    for i in range(4):
        d.wait_state(f"w:{i}", "RUNNING")
    first = pids(d)
    d.write_config(config.format(sleep=SLEEP, n=2))
    plan = d.rpc("reload")["plan"]
    assert [(e["name"], e["step"]) for e in plan if e["step"] == "stop"] == [
        ("w:3", "stop"),
        ("w:2", "stop"),
    ]
    wait_until(lambda: set(d.status()) == {"w:0", "w:1"}, describe=d.describe)
    assert pids(d) == {"w:0": first["w:0"], "w:1": first["w:1"]}
    d.write_config(config.format(sleep=SLEEP, n=6))
    d.rpc("reload")
    for i in range(6):
        d.wait_state(f"w:{i}", "RUNNING")
    after = pids(d)
    assert (after["w:0"], after["w:1"]) == (first["w:0"], first["w:1"])
    assert list(after) == [f"w:{i}" for i in range(6)]


def test_a_restart_elsewhere_and_a_log_move_keep_a_process_and_its_pipe(
    supd: Factory, tmp_path: Path
) -> None:
    d = supd(f"""
        [programs.ticker]
        command = {TICKER}
        startsecs = 0
        [programs.other]
        command = {SLEEP}
        startsecs = 0
    """)
    pid = d.wait_state("ticker", "RUNNING")["pid"]
    old_log = tmp_path / "logs" / "ticker.out.log"
    wait_until(lambda: len(numbers(old_log)) > 5)
    new_log = tmp_path / "moved" / "ticker.log"
    d.write_config(f"""
        [programs.ticker]
        command = {TICKER}
        startsecs = 0
        stdout_logfile = "{new_log}"
        [programs.other]
        command = {SLEEP}
        startsecs = 0
        environment = {{ X = "1" }}
    """)
    steps = {e["name"]: e["step"] for e in d.rpc("reload")["plan"]}
    assert steps == {"ticker": "update in place", "other": "restart"}
    wait_until(lambda: len(numbers(new_log)) > 5, describe=d.describe)
    assert d.status()["ticker"]["pid"] == pid
    # Every number once, in order, across the two files: the pipe was never replaced.
    both = old_log.read_text() + new_log.read_text()
    seen = [int(line) for line in both.splitlines()[:-1]]
    assert seen == list(range(len(seen)))


def test_supervisor_socket_and_log_level_change_live(supd: Factory, tmp_path: Path) -> None:
    d = supd(f"""
        [programs.web]
        command = {SLEEP}
        startsecs = 0
    """)
    pid = d.wait_state("web", "RUNNING")["pid"]
    new_socket = tmp_path / "run" / "new.sock"
    d.write_config(f"""
        [supervisor]
        socket = "{new_socket}"
        socket_mode = 0o640
        log_level = "debug"
        [programs.web]
        command = {SLEEP}
        startsecs = 0
    """)
    ran = supctl(d, "reload")
    assert ran.returncode == 0, ran.stderr
    assert "[supervisor] socket:" in ran.stdout and "[supervisor] log_level:" in ran.stdout
    assert "no changes" not in ran.stdout
    assert not d.socket.exists()
    assert (new_socket.stat().st_mode & 0o777) == 0o640
    status = supctl(d, "status", socket=new_socket)
    assert status.returncode == 0 and str(pid) in status.stdout
    # Back again, with a group-less mode change only: chmod in place.
    d.write_config(f"""
        [supervisor]
        socket = "{new_socket}"
        socket_mode = 0o600
        [programs.web]
        command = {SLEEP}
        startsecs = 0
    """)
    ran = supctl(d, "reload", socket=new_socket)
    assert "[supervisor] socket_mode:" in ran.stdout, ran.stdout
    assert (new_socket.stat().st_mode & 0o777) == 0o600


def test_a_socket_that_cannot_be_made_changes_nothing(supd: Factory, tmp_path: Path) -> None:
    d = supd(f"""
        [programs.web]
        command = {SLEEP}
        startsecs = 0
    """)
    pid = d.wait_state("web", "RUNNING")["pid"]
    (tmp_path / "afile").write_text("")
    d.write_config(f"""
        [supervisor]
        socket = "{tmp_path / "afile" / "s.sock"}"
        [programs.web]
        command = {SLEEP}
        startsecs = 0
        environment = {{ X = "1" }}
    """)
    ran = supctl(d, "reload")
    assert ran.returncode == 1 and "nothing changed" in ran.stderr
    assert d.status()["web"]["pid"] == pid and d.answers()


def test_a_new_log_dir_moves_the_logs_that_derive_from_it_in_place(
    supd: Factory, tmp_path: Path
) -> None:
    d = supd(f"""
        [programs.ticker]
        command = {TICKER}
        startsecs = 0
        [programs.fixed]
        command = {SLEEP}
        startsecs = 0
        stdout_logfile = "{tmp_path / "fixed.log"}"
    """)
    pid = d.wait_state("ticker", "RUNNING")["pid"]
    fixed = d.wait_state("fixed", "RUNNING")["pid"]
    d.write_config(f"""
        [supervisor]
        log_dir = "{tmp_path / "newlogs"}"
        [programs.ticker]
        command = {TICKER}
        startsecs = 0
        [programs.fixed]
        command = {SLEEP}
        startsecs = 0
        stdout_logfile = "{tmp_path / "fixed.log"}"
    """)
    result = d.rpc("reload")
    steps = {e["name"]: e for e in result["plan"]}
    assert steps["ticker"]["step"] == "update in place"
    assert {c["key"] for c in steps["ticker"]["changes"]} == {"stdout_logfile", "stderr_logfile"}
    # Its own stdout file is its own; only its stderr file derives from log_dir.
    assert steps["fixed"]["step"] == "update in place"
    assert {c["key"] for c in steps["fixed"]["changes"]} == {"stderr_logfile"}
    assert [c["key"] for c in result["supervisor"]] == ["log_dir"]
    new_log = tmp_path / "newlogs" / "ticker.out.log"
    wait_until(lambda: new_log.exists() and len(numbers(new_log)) > 3, describe=d.describe)
    status = d.status()
    assert (status["ticker"]["pid"], status["fixed"]["pid"]) == (pid, fixed)


# -- readiness, health and dependencies change in place -------------------------------------


def reload_both(d: Supd) -> dict[str, dict[str, Any]]:
    """`reload --dry-run --json`, then the real reload: the same plan; by process."""
    dry = supctl(d, "--json", "reload", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    real = supctl(d, "--json", "reload")
    assert real.returncode == 0, real.stderr
    planned, applied = json.loads(dry.stdout)["plan"], json.loads(real.stdout)["plan"]
    assert planned == applied
    return {entry["name"]: entry for entry in applied}


def lines_in(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_a_health_check_added_changed_and_removed_by_reload_keeps_the_process(
    supd: Factory, tmp_path: Path
) -> None:
    # Each check of web's appends a line to `checks`; clock's, to `ticks` (a clock that
    # says time has passed without a fixed sleep).
    checks, ticks = tmp_path / "checks", tmp_path / "ticks"

    def check(log: Path, status: int) -> str:
        return json.dumps(["/bin/sh", "-c", f"echo >> {log}; exit {status}"])

    config = f"""
        [programs.web]
        command = {SLEEP}
        startsecs = 0
        {{health}}
        [programs.clock]
        command = {SLEEP}
        startsecs = 0
        health = {{{{ exec = {check(ticks, 0)}, interval = 0.1 }}}}
    """
    health = "health = {{ exec = {}, interval = 0.1, start_grace = 0, failures = 1{} }}"
    d = supd(config.format(health=""))
    pid = d.wait_state("web", "RUNNING")["pid"]

    d.write_config(config.format(health=health.format(check(checks, 0), "")))
    web = reload_both(d)["web"]
    assert web["step"] == "update in place"
    assert [c["key"] for c in web["changes"]] == ["health"]
    wait_until(lambda: d.status()["web"]["healthy"] is True, describe=d.describe)
    entry = d.status()["web"]
    assert entry["pid"] == pid and "HEALTHY" in entry["description"]

    failing = health.format(check(checks, 1), ', on_unhealthy = "ignore"')
    d.write_config(config.format(health=failing))
    assert reload_both(d)["web"]["step"] == "update in place"
    wait_until(lambda: d.status()["web"]["healthy"] is False, describe=d.describe)
    entry = d.status()["web"]
    assert entry["pid"] == pid and "UNHEALTHY" in entry["description"]
    assert entry["health_error"].endswith("exit 1: exit status 1")

    d.write_config(config.format(health=""))
    assert reload_both(d)["web"]["step"] == "update in place"
    entry = d.status()["web"]
    assert (entry["pid"], entry["healthy"], entry["health_error"]) == (pid, None, None)
    checked, ticked = lines_in(checks), lines_in(ticks)
    wait_until(lambda: lines_in(ticks) >= ticked + 10, describe=d.describe)  # a second on
    assert lines_in(checks) == checked  # web is checked no more
    entry = d.status()["web"]
    assert (entry["pid"], entry["healthy"], entry["state"]) == (pid, None, "RUNNING")


def test_a_process_waiting_to_be_ready_waits_on_the_probe_a_reload_gives_it(
    supd: Factory, tmp_path: Path
) -> None:
    exists = tmp_path / "exists"
    exists.touch()
    config = f"""
        [programs.filed]
        command = {SLEEP}
        startsecs = 0
        ready = {{{{ file = "{{filed}}", interval = 0.05, ready_timeout = 120 }}}}
        [programs.logged]
        command = {TICKER}
        startsecs = 0
        ready = {{{{ {{logged}}, ready_timeout = 120 }}}}
    """
    missing = tmp_path / "missing"
    d = supd(config.format(filed=missing, logged=f'file = "{missing}"'))
    filed = d.wait_state("filed", "STARTING")["pid"]
    logged = d.wait_state("logged", "STARTING")["pid"]
    wait_until(lambda: "not ready" in d.status()["filed"]["description"], describe=d.describe)
    d.write_config(config.format(filed=exists, logged='log = "^[0-9]*5$"'))
    plan = reload_both(d)
    assert plan["filed"]["step"] == plan["logged"]["step"] == "update in place"
    assert d.wait_state("filed", "RUNNING")["pid"] == filed
    assert d.wait_state("logged", "RUNNING")["pid"] == logged  # a line printed since
    reasons = {
        e["process"]: e["reason"] for e in d.events("state_changed") if e["to_state"] == "RUNNING"
    }
    assert reasons["filed"] == f"ready: file {exists} exists"
    assert reasons["logged"].startswith("ready: ") and reasons["logged"].endswith("5")


def test_a_probe_in_flight_that_a_reload_removes_is_killed_and_reaped(
    supd: Factory, tmp_path: Path
) -> None:
    # Each probe writes its pid, then hangs: it is in flight until something kills it.
    def hanging(name: str) -> str:
        path = str(tmp_path / name)
        script = (
            "import os, time\n"
            f"open({path + '.part'!r}, 'w').write(str(os.getpid()))\n"
            f"os.rename({path + '.part'!r}, {path!r})\n"
            "time.sleep(1000)\n"
        )
        return json.dumps([PY, "-c", script])

    config = f"""
        [programs.starting]
        command = {SLEEP}
        startsecs = 0
        {{ready}}
        [programs.running]
        command = {SLEEP}
        startsecs = 0
        {{health}}
    """
    ready = f"ready = {{ exec = {hanging('ready')}, timeout = 600, ready_timeout = 600 }}"
    health = f"health = {{ exec = {hanging('health')}, interval = 0.05, timeout = 600 }}"
    d = supd(config.format(ready=ready, health=health))
    wait_until(lambda: (tmp_path / "ready").exists(), describe=d.describe)
    wait_until(lambda: (tmp_path / "health").exists(), describe=d.describe)
    probes = [int((tmp_path / name).read_text()) for name in ("ready", "health")]
    d.track(*probes)
    assert d.state("starting") == "STARTING"
    assert all(probe in children_of(d.pid) for probe in probes)
    d.write_config(config.format(ready="", health=""))
    plan = reload_both(d)
    assert plan["starting"]["step"] == plan["running"]["step"] == "update in place"
    d.wait_state("starting", "RUNNING")
    # killed and reaped: no longer supd's child, not even a zombie
    wait_until(lambda: not set(probes) & set(children_of(d.pid)), describe=d.describe)
    status = d.status()
    assert status["running"]["healthy"] is None and status["running"]["state"] == "RUNNING"


def test_dependencies_added_by_reload_apply_from_then_on_without_a_restart(
    supd: Factory,
) -> None:
    config = f"""
        [programs.db]
        command = {SLEEP}
        startsecs = 0
        [programs.web]
        command = {SLEEP}
        startsecs = 0
        priority = 1
        {{depends}}
    """
    d = supd(config.format(depends=""))
    before = {name: d.wait_state(name, "RUNNING")["pid"] for name in ("db", "web")}
    d.write_config(config.format(depends='depends_on = ["db"]\non_dependency_restart = "restart"'))
    plan = reload_both(d)
    assert (plan["db"]["step"], plan["web"]["step"]) == ("unchanged", "update in place")
    assert [c["key"] for c in plan["web"]["changes"]] == ["depends_on", "on_dependency_restart"]
    assert pids(d) == before
    ran = supctl(d, "restart", "db")  # web goes down and comes back with it (PartOf)
    assert ran.returncode == 0, ran.stderr
    wait_until(lambda: d.status()["web"]["pid"] not in (None, before["web"]), describe=d.describe)
    d.wait_state("web", "RUNNING")
    stops = [e["process"] for e in d.events("state_changed") if e["to_state"] == "STOPPING"]
    assert sorted(stops) == ["db", "web"]
    ran = supctl(d, "stop", "all")  # dependants first, whatever the priorities say
    assert ran.returncode == 0, ran.stderr
    stopped = [e["process"] for e in d.events("state_changed") if e["to_state"] == "STOPPED"]
    assert stopped[-2:] == ["web", "db"]


def test_notify_added_by_reload_restarts_with_notify_socket(supd: Factory) -> None:
    config = f"""
        [programs.web]
        command = {SLEEP}
        startsecs = 0
        {{notify}}
    """
    d = supd(config.format(notify=""))
    pid = d.wait_state("web", "RUNNING")["pid"]
    d.write_config(config.format(notify="notify = true"))
    dry = supctl(d, "reload", "--dry-run")
    [line] = [line for line in dry.stdout.splitlines() if line.startswith("web")]
    assert line.split()[:2] == ["web", "restart"]
    assert "notify: false → true" in line and "NOTIFY_SOCKET: false → true" in line
    assert reload_both(d)["web"]["step"] == "restart"
    wait_until(lambda: d.status()["web"]["pid"] not in (None, pid), describe=d.describe)
    new = d.wait_state("web", "RUNNING")["pid"]
    environ = Path(f"/proc/{new}/environ").read_bytes().split(b"\0")
    assert any(v.startswith(b"NOTIFY_SOCKET=@supd/") for v in environ)


def test_supervisor_log_timestamps_is_applied_through_the_programs(
    supd: Factory, tmp_path: Path
) -> None:
    """[supervisor] log_timestamps is every program's default: a reload gives it to the
    programs in place, so it is applied, not "needs `supctl reexec`"."""
    program = f"[programs.tick]\ncommand = {TICKER}\nstartsecs = 0\n"
    d = supd(program)
    pid = d.wait_state("tick", "RUNNING")["pid"]
    log = tmp_path / "logs" / "tick.out.log"
    wait_until(lambda: numbers(log), describe=d.describe)
    d.write_config('[supervisor]\nlog_timestamps = "epoch"\n' + program)
    ran = supctl(d, "--json", "reload")
    assert ran.returncode == 0, ran.stderr
    report = json.loads(ran.stdout)
    assert [c["key"] for c in report["supervisor"]] == ["log_timestamps"], report
    assert report["not_applied"] == [], report
    assert [(e["name"], e["step"]) for e in report["plan"]] == [("tick", "update in place")]
    stamped = re.compile(r"\d{9,11}\.\d{3} \d+")
    wait_until(
        lambda: any(stamped.fullmatch(line) for line in log.read_text().splitlines()),
        describe=lambda: log.read_text()[-500:],
    )
    assert d.status()["tick"]["pid"] == pid


@pytest.mark.skipif(os.geteuid() != 0, reason="giving the socket another group needs root")
def test_a_socket_group_removed_by_reload_is_taken_back(supd: Factory, tmp_path: Path) -> None:
    """Without socket_group the socket has supd's group, as at a start: the old group's
    members lose the access the reload took from them (here socket_mode keeps 0660)."""
    program = f"[programs.web]\ncommand = {SLEEP}\nstartsecs = 0\n"
    d = supd(f'[supervisor]\nsocket_group = "1"\nsocket_mode = "0660"\n{program}')
    d.wait_state("web", "RUNNING")
    assert d.socket.stat().st_gid == 1
    d.write_config(f'[supervisor]\nsocket_mode = "0660"\n{program}')
    ran = supctl(d, "--json", "reload")
    assert ran.returncode == 0, ran.stderr
    report = json.loads(ran.stdout)
    assert [c["key"] for c in report["supervisor"]] == ["socket_group"], report
    assert report["not_applied"] == [], report
    assert d.socket.stat().st_gid == os.getegid()
    assert (d.socket.stat().st_mode & 0o777) == 0o660
