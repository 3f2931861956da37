"""The daemon never dies or stalls for a reason outside it: no fds left, a tight retry
loop, a bug in one handler. Each test reproduces what once froze or killed it."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import PY, SLEEP, Supd, cmd, pid_alive, wait_until

Factory = Callable[..., Supd]


def read_answers(sock: socket.socket, count: int) -> dict[Any, dict[str, Any]]:
    buffer = b""
    answers: dict[Any, dict[str, Any]] = {}
    while len(answers) < count:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed; answers so far: {answers}"
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            message = json.loads(line)
            answers[message.get("id")] = message
    return answers


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except FileNotFoundError:
        return 0


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs util-linux prlimit")
def test_out_of_fds_a_stop_still_kills_a_start_still_settles_and_sigterm_exits(
    supd: Factory, tmp_path: Path
) -> None:
    """The reproduction: at EMFILE, timerfd_create failed after the state had changed:
    the stop was never escalated to SIGKILL, the start sat in BACKOFF forever, and
    SIGTERM no longer shut supd down."""
    ready = tmp_path / "ready"
    d = supd(
        f"""
        [programs.stopper]
        command = {
            cmd(f'''
            import signal, time
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            open({str(ready)!r}, "w").close()
            time.sleep(1000)
        ''')
        }
        startsecs = 0
        stopwaitsecs = 0.3
        [programs.sleeper]
        command = {SLEEP}
        autostart = false
        startsecs = 0
        startretries = 1
        backoff_initial = 0.1
        """,
        launcher=["prlimit", "--nofile=64:64", PY, "-m", "supd"],
    )
    d.wait_state("stopper", "RUNNING")
    wait_until(ready.exists)
    first, held = fill_fds(d)
    try:
        requests = [
            {"id": 1, "method": "stop", "params": {"names": ["stopper"]}},
            {"id": 2, "method": "start", "params": {"names": ["sleeper"]}},
        ]
        for request in requests:
            first.sendall(json.dumps({"jsonrpc": "2.0", **request}).encode() + b"\n")
        answers = read_answers(first, 2)
        [stopped] = answers[1]["result"]
        assert stopped["ok"] and stopped["state"] == "STOPPED", answers
        [started] = answers[2]["result"]
        # With no fd for its pipes, sleeper cannot start: it ends FATAL, it does not hang.
        assert started["state"] in ("RUNNING", "FATAL"), answers
        d.signal(signal.SIGTERM)  # still without a free fd
        assert d.wait_exit() == 0
    finally:
        for sock in [first, *held]:
            sock.close()
    # The escalation: SIGKILL to the process group, or cgroup.kill where supd uses cgroups.
    kills = [e for e in d.events("signal_sent") if e["signal"] == "SIGKILL"]
    kills += [e for e in d.events("cgroup_killed") if e["reason"] == "SIGKILL"]
    assert [e["process"] for e in kills] == ["stopper"]


def fill_fds(d: Supd) -> tuple[socket.socket, list[socket.socket]]:
    """One accepted connection to talk on, then connections until supd has no fd left."""
    first = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    first.settimeout(20)
    first.connect(str(d.socket))
    first.sendall(b'{"jsonrpc":"2.0","id":0,"method":"version"}\n')
    assert read_answers(first, 1)[0]["result"]["pid"] == d.pid  # accepted: it holds an fd
    held: list[socket.socket] = []
    for _ in range(200):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        held.append(sock)
        with contextlib.suppress(BlockingIOError, ConnectionRefusedError):
            sock.connect(str(d.socket))
    wait_until(lambda: fd_count(d.pid) >= 62, describe=lambda: f"{fd_count(d.pid)} fds")
    return first, held


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs util-linux prlimit")
def test_out_of_fds_without_cgroups_an_exit_is_reported_and_its_leftovers_killed_later(
    supd: Factory, tmp_path: Path
) -> None:
    """Without cgroups an exit's leftovers are found in /proc, which takes an fd: at
    EMFILE the scan failed, and with it the exit (never reaped nor reported: RUNNING
    for ever, a zombie). The exit must come first; the leftovers follow when fds do."""
    left = tmp_path / "leftover"
    d = supd(
        f"""
        [supervisor]
        cgroups = "off"
        [programs.quitter]
        command = {
            cmd(f'''
            import os, time
            child = os.fork()
            if child == 0:
                os.setpgid(0, 0)  # its own process group: only the session scan finds it
                time.sleep(1000)
                os._exit(0)
            with open({str(left)!r} + ".new", "w") as f:
                f.write(str(child))
            os.rename({str(left)!r} + ".new", {str(left)!r})
            time.sleep(1000)
        ''')
        }
        startsecs = 0
        autorestart = false
        """,
        launcher=["prlimit", "--nofile=64:64", PY, "-m", "supd"],
    )
    main = d.wait_state("quitter", "RUNNING")["pid"]
    wait_until(left.exists)
    leftover = int(left.read_text())
    d.track(leftover)
    first, held = fill_fds(d)
    try:
        os.kill(main, signal.SIGKILL)
        serial = iter(range(1, 1_000_000))

        def state() -> str:
            request = {"jsonrpc": "2.0", "id": next(serial), "method": "status"}
            first.sendall(json.dumps(request).encode() + b"\n")
            [answer] = read_answers(first, 1).values()
            return str(next(r["state"] for r in answer["result"] if r["name"] == "quitter"))

        wait_until(lambda: state() == "EXITED", describe=d.describe)
        assert not os.path.exists(f"/proc/{main}")  # reaped
    finally:
        for sock in [first, *held]:
            sock.close()
    wait_until(lambda: not pid_alive(leftover), describe=d.describe)
    # (killed first, logged next: the line may come a moment after the kill)
    [killed] = wait_until(lambda: d.events("leftovers_killed"), describe=d.describe)
    assert killed["pid"] == main and killed["pids"] == [leftover]


def test_a_zero_backoff_retry_loop_leaves_the_daemon_responsive(supd: Factory) -> None:
    """backoff_initial = 0, factor 1 and 100,000 retries of a missing binary once blocked
    the loop for seconds: the whole retry storm ran inside one `start`."""
    d = supd("""
        [programs.missing]
        command = "/nonexistent/supd-test-binary"
        autostart = false
        startsecs = 0
        startretries = 100000
        backoff_initial = 0
        backoff_factor = 1
        [programs.other]
        command = "/bin/sleep 1000"
        autostart = false
        startsecs = 0
    """)
    [accepted] = d.rpc("start", {"names": ["missing"], "wait": False})
    assert accepted["ok"]
    first = d.status()["missing"]
    assert first["state"] in ("STARTING", "BACKOFF")  # answered amid the retries
    wait_until(lambda: d.status()["missing"]["restarts"] >= first["restarts"] + 20)
    [other] = d.rpc("start", {"names": ["other"]})  # other work is served meanwhile
    assert other["ok"] and other["state"] == "RUNNING"
    during = d.status()["missing"]
    assert during["state"] in ("STARTING", "BACKOFF") and during["restarts"] < 100000
    [stopped] = d.rpc("stop", {"names": ["missing"]})
    assert stopped["ok"] and stopped["state"] == "STOPPED"


def test_a_failing_handler_is_logged_and_the_loop_goes_on(supd: Factory, tmp_path: Path) -> None:
    """The last line of defence, with a bug injected into the fleet for one program."""
    launcher = tmp_path / "buggy_supd.py"
    launcher.write_text(
        textwrap.dedent("""
        import sys
        from supd import daemon, fleet

        handle = fleet.Fleet.handle

        def buggy(self, event, now):
            if isinstance(event, fleet.Submit) and "boom" in event.names:
                raise RuntimeError("injected failure")
            return handle(self, event, now)

        fleet.Fleet.handle = buggy
        sys.exit(daemon.main(sys.argv[1:]))
        """)
    )
    d = supd(
        f"""
        [programs.boom]
        command = {SLEEP}
        autostart = false
        [programs.web]
        command = {SLEEP}
        startsecs = 0
        backoff_initial = 0
        """,
        launcher=[PY, str(launcher)],
    )
    pid = d.wait_state("web", "RUNNING")["pid"]
    [failed] = d.rpc("start", {"names": ["boom"]})
    assert not failed["ok"] and failed["code"] == -32603
    assert "injected failure" in failed["error"]
    [logged] = d.events("event_failed")
    assert "injected failure" in logged["exception"]
    os.kill(pid, signal.SIGKILL)  # the fleet still supervises
    wait_until(lambda: d.status()["web"]["pid"] not in (None, pid), describe=d.describe)
    assert d.state("web") == "RUNNING" and d.state("boom") == "STOPPED"


def test_a_self_stopped_child_says_so_in_its_description(supd: Factory) -> None:
    """Whether status asks every pid (a few names) or the kernel first (many)."""
    d = supd(f"""
        [programs.web]
        command = {SLEEP}
        startsecs = 0
        [programs.other]
        command = {SLEEP}
        startsecs = 0
        numprocs = 9
    """)
    pid = d.wait_state("web", "RUNNING")["pid"]

    def described(names: list[str]) -> str:
        rows = d.rpc("status", {"names": names})
        return str(next(row["description"] for row in rows if row["name"] == "web"))

    os.kill(pid, signal.SIGSTOP)
    wait_until(
        lambda: described(["web"]).endswith(", stopped (SIGSTOP)"),
        describe=lambda: str(d.status()["web"]),
    )
    assert described(["all"]).endswith(", stopped (SIGSTOP)")
    os.kill(pid, signal.SIGCONT)
    wait_until(lambda: "stopped" not in described(["web"]))
    assert "stopped" not in described(["all"])
    assert d.state("web") == "RUNNING"
