"""Reload with a real daemon: the plan supctl prints is the plan applied, unchanged
processes keep their pid and their pipes, log settings change in place, numprocs moves
only the extra processes, and [supervisor] changes apply live."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.helpers import PY, REPO, SLEEP, Supd, cmd, wait_until

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
    assert dry_json["plan"] == applied["plan"] and dry_json["dry_run"] and not applied["dry_run"]
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
