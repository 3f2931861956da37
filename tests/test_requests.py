"""start, stop and restart end to end: every call gets exactly one answer, in time, from
the transitions it causes; conflicting calls supersede each other visibly."""

from __future__ import annotations

import json
import random
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import PY, SLEEP, Supd, cmd, wait_until

Factory = Callable[..., Supd]

pytestmark = pytest.mark.skipif(shutil.which("flock") is None, reason="needs util-linux flock")


def exclusive(lock: Path, double: Path) -> str:
    """`sleep 1000` that holds a lock while it lives; a second instance that finds the
    lock taken records it in `double`."""
    script = f"exec 9>{lock}; flock -n 9 || echo $$ >> {double}; exec sleep 1000"
    return json.dumps(["/bin/sh", "-c", script])


def calls(path: Path, seed: int, count: int, errors: list[str]) -> None:
    """One client: `count` random start/stop/restart calls, each answered within 5 s
    with one result for the one process. Odd clients pipeline all their calls at once,
    even ones wait for each answer before the next call."""
    rng = random.Random(seed)
    pipelined = seed % 2 == 1
    methods = [rng.choice(["start", "stop", "restart"]) for _ in range(count)]
    lines = [
        json.dumps(
            {"jsonrpc": "2.0", "id": n, "method": method, "params": {"names": ["web"]}}
        ).encode()
        + b"\n"
        for n, method in enumerate(methods)
    ]
    answered: set[int] = set()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5.0)
        sock.connect(str(path))
        if pipelined:
            sock.sendall(b"".join(lines))
        buffer = b""
        for number in range(count):
            if not pipelined:
                sock.sendall(lines[number])
            try:
                while b"\n" not in buffer:
                    chunk = sock.recv(65536)
                    if not chunk:
                        errors.append(f"client {seed}: connection closed after {answered}")
                        return
                    buffer += chunk
            except TimeoutError:
                missing = sorted(set(range(count)) - answered)
                errors.append(f"client {seed}: calls {missing} not answered within 5 s")
                return
            line, buffer = buffer.split(b"\n", 1)
            answer = json.loads(line)
            if answer.get("id") in answered or len(answer.get("result", [])) != 1:
                errors.append(f"client {seed}: odd or repeated answer: {answer}")
                return
            answered.add(answer["id"])
    if answered != set(range(count)):
        errors.append(f"client {seed}: answers {sorted(answered)}")


def test_concurrent_conflicting_calls_are_each_answered_and_never_double_run(
    supd: Factory, tmp_path: Path
) -> None:
    """The reported hang: 10 clients sending random start/stop/restart for one program
    left stop calls unanswered about one run in two."""
    lock, double = tmp_path / "lock", tmp_path / "double"
    d = supd(f"""
        [programs.web]
        command = {exclusive(lock, double)}
        startsecs = 0
        stopwaitsecs = 2
    """)
    d.wait_state("web", "RUNNING")
    errors: list[str] = []
    clients = [
        threading.Thread(target=calls, args=(d.socket, seed, 50, errors)) for seed in range(10)
    ]
    for client in clients:
        client.start()
    for client in clients:
        client.join(timeout=60)
    assert not any(client.is_alive() for client in clients)
    assert not errors, "\n".join(errors)
    # Never two instances: each one takes the lock before it sleeps, and one that finds
    # it taken says so. (The daemon's own log is no witness here: 500 calls in a few
    # seconds make identical spawned/exited events, which its rate limit thins out.)
    assert not double.exists(), f"two instances at once: {double.read_text()}"
    assert "web" in d.status()  # and the daemon still answers


def test_a_superseded_stop_says_so_in_supctl(supd: Factory, tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    d = supd(f"""
        [programs.web]
        command = {
        cmd(f'''
            import signal, time
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            open({str(ready)!r}, "w").close()
            time.sleep(1000)
        ''')
    }
        startsecs = 0
        stopwaitsecs = 30
    """)
    d.wait_state("web", "RUNNING")
    wait_until(ready.exists)
    stopper = subprocess.Popen(
        [PY, "-m", "supd.ctl", "-s", str(d.socket), "stop", "web"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    d.wait_state("web", "STOPPING")
    [started] = d.rpc("start", {"names": ["web"], "wait": False})
    assert started["ok"]
    out, _ = stopper.communicate(timeout=10)
    assert stopper.returncode == 1
    assert out.strip() == "web: SUPERSEDED (superseded by a later start)"
    [killed] = d.rpc("signal", {"signal": "KILL", "names": ["web"]})
    assert killed["ok"]
    d.wait_state("web", "RUNNING")


def test_restart_of_an_exited_one_shot_starts_it(supd: Factory, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    one_shot = cmd(f"open({str(runs)!r}, 'a').write('ran ')")
    d = supd(f"""
        [programs.once]
        command = {one_shot}
        startsecs = 0
    """)
    d.wait_state("once", "EXITED")
    [result] = d.rpc("restart", {"names": ["once"]})
    assert result["ok"], result
    wait_until(lambda: runs.read_text().count("ran") == 2)


def test_restart_all_stops_highest_priority_first_and_starts_lowest_first(
    supd: Factory, tmp_path: Path
) -> None:
    order = tmp_path / "order"
    record = cmd(f"""
        import os, signal, sys, time
        name = os.environ["SUPD_PROCESS_NAME"]
        def stop(*_):
            open({str(order)!r}, "a").write("stop " + name + "\\n")
            sys.exit(0)
        signal.signal(signal.SIGTERM, stop)
        open({str(order)!r}, "a").write("start " + name + "\\n")
        time.sleep(1000)
    """)
    d = supd(f"""
        [programs.redis]
        command = {record}
        priority = 10
        startsecs = 0.2
        [programs.nginx]
        command = {record}
        priority = 30
        startsecs = 0.2
        [programs.app]
        command = {record}
        priority = 20
        startsecs = 0.2
    """)
    for name in ("redis", "nginx", "app"):
        d.wait_state(name, "RUNNING")
    wait_until(lambda: order.read_text().count("start") == 3)
    order.write_text("")
    results = d.rpc("restart", {"names": ["all"]})
    assert all(r["ok"] and r["state"] == "RUNNING" for r in results), results
    # Each group was down before the next got its signal, and all before any start.
    lines = order.read_text().splitlines()
    assert lines[:3] == ["stop nginx", "stop app", "stop redis"], lines
    spawned = [e["process"] for e in d.events("spawned")][-3:]
    assert spawned == ["redis", "app", "nginx"]


def test_the_ready_event_is_logged_without_systemd(supd: Factory) -> None:
    d = supd(f"""
        [programs.web]
        command = {SLEEP}
        startsecs = 0.2
    """)
    ready: list[dict[str, Any]] = wait_until(lambda: d.events("ready"), describe=d.describe)
    assert len(ready) == 1
    assert d.state("web") == "RUNNING"
