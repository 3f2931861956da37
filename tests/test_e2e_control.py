"""The real daemon driven through its real socket: raw JSON-RPC and the supctl command."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from supd.facts import ErrorCode
from supd.protocol_models import RESULT_ADAPTERS
from tests.helpers import (
    PY,
    REPO,
    SLEEP,
    RpcError,
    Supd,
    pid_alive,
    python_command,
    toml_list,
    wait_until,
)

Factory = Callable[..., Supd]

TICKER = toml_list(
    python_command("""
        import itertools, time
        for n in itertools.count():
            print(f"tick {n}", flush=True)
            time.sleep(0.05)
    """)
)

CONFIG = f"""
    [programs.web]
    command = {SLEEP}
    numprocs = 2
    startsecs = 0.2
    [programs.ticker]
    command = {TICKER}
    startsecs = 0
    [programs.idle]
    command = {SLEEP}
    autostart = false
"""


def supctl(d: Supd, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), NO_COLOR="1")
    return subprocess.run(
        [PY, "-m", "supd.ctl", "-s", str(d.socket), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


@pytest.fixture
def daemon(supd: Factory) -> Supd:
    d = supd(CONFIG)
    d.wait_state("web:0", "RUNNING")
    d.wait_state("web:1", "RUNNING")
    d.wait_state("ticker", "RUNNING")
    return d


def test_status_table_and_exit_3_for_a_stopped_process(daemon: Supd) -> None:
    result = supctl(daemon, "status")
    assert result.returncode == 3  # idle is STOPPED
    rows = {line.split()[0]: line.split()[1] for line in result.stdout.splitlines()}
    assert rows == {"web:0": "RUNNING", "web:1": "RUNNING", "ticker": "RUNNING", "idle": "STOPPED"}
    assert supctl(daemon, "status", "web").returncode == 0


@pytest.mark.parametrize("method", ["status", "start", "stop", "restart", "pid", "version"])
def test_results_match_the_documented_models(daemon: Supd, method: str) -> None:
    params = {"names": ["web"]} if method in ("start", "stop", "restart") else {}
    RESULT_ADAPTERS[method].validate_python(daemon.rpc(method, params))


def test_status_json_matches_the_raw_method(daemon: Supd) -> None:
    result = supctl(daemon, "--json", "status", "web:1")
    [entry] = json.loads(result.stdout)
    assert entry["name"] == "web:1" and entry["program"] == "web"
    assert entry["pid"] == daemon.status()["web:1"]["pid"]
    assert entry["uptime"] > 0 and entry["exit_code"] is None


def test_start_stop_restart_with_supctl(daemon: Supd) -> None:
    result = supctl(daemon, "start", "idle")
    assert result.returncode == 0, result.stderr
    assert daemon.state("idle") == "RUNNING"
    old = daemon.status()["web:0"]["pid"]
    assert supctl(daemon, "restart", "web:0").returncode == 0
    new = daemon.status()["web:0"]["pid"]
    assert new != old and not pid_alive(old)
    assert supctl(daemon, "stop", "web").returncode == 0
    status = daemon.status()
    assert status["web:0"]["state"] == status["web:1"]["state"] == "STOPPED"


def test_start_that_ends_fatal_exits_1(supd: Factory) -> None:
    d = supd(f"""
        [programs.crash]
        command = {toml_list(python_command("raise SystemExit(2)"))}
        autostart = false
        startsecs = 1
        startretries = 1
        backoff_initial = 0.05
    """)
    result = supctl(d, "start", "crash")
    assert result.returncode == 1
    assert "crash" in result.stdout + result.stderr
    assert d.state("crash") == "FATAL"


def test_unknown_name_is_an_application_error(daemon: Supd) -> None:
    with pytest.raises(RpcError) as info:
        daemon.rpc("stop", {"names": ["nope"]})
    assert info.value.code == 1  # NO_SUCH_PROCESS
    assert supctl(daemon, "stop", "nope").returncode == 1


def test_start_without_wait_answers_at_once(daemon: Supd) -> None:
    [result] = daemon.rpc("start", {"names": ["idle"], "wait": False})
    assert result["state"] == "STARTING" and result["ok"]
    assert supctl(daemon, "restart", "--no-wait", "web").returncode == 0


def test_signal_reaches_the_process(daemon: Supd) -> None:
    pid = daemon.status()["web:0"]["pid"]
    [result] = daemon.rpc("signal", {"signal": "KILL", "names": ["web:0"]})
    assert result["ok"]
    wait_until(lambda: not pid_alive(pid))
    wait_until(lambda: daemon.status()["web:0"]["restarts"] >= 1, describe="restarted")


def test_pid_and_version(daemon: Supd) -> None:
    assert daemon.rpc("pid") == {"pid": daemon.pid, "processes": []}
    assert daemon.rpc("pid", {"name": "ticker"})["pid"] == daemon.status()["ticker"]["pid"]
    version = daemon.rpc("version")
    assert version["pid"] == daemon.pid and version["config"] == str(daemon.config_path)
    assert supctl(daemon, "pid").stdout.strip() == str(daemon.pid)


def test_tail_returns_the_last_bytes(daemon: Supd) -> None:
    wait_until(lambda: "tick 3" in daemon.rpc("tail", {"name": "ticker"})["data"])
    data = daemon.rpc("tail", {"name": "ticker", "bytes": 7})["data"]
    assert len(data) == 7 and data.endswith("\n")


@pytest.mark.parametrize("typed", ["ticker", "ticker:*", "tick?r"])
def test_tail_follow_streams_notifications(daemon: Supd, typed: str) -> None:
    """Notifications name the process, whatever form of its name the client typed."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(daemon.socket))
        request = {"jsonrpc": "2.0", "id": 7, "method": "tail"}
        request["params"] = {"name": typed, "bytes": 0, "follow": True}
        sock.sendall(json.dumps(request).encode() + b"\n")
        reader = sock.makefile()
        answer = json.loads(reader.readline())
        assert answer["id"] == 7 and answer["result"]["data"] == ""
        text = ""
        while text.count("\n") < 6:  # recv times out (and fails the test) after 10 s
            message = json.loads(reader.readline())
            assert message["method"] == "output"
            assert message["params"]["name"] == "ticker"
            text += message["params"]["data"]
    # Whole lines, consecutive: nothing the ticker wrote went missing in between.
    numbers = [int(line.split()[1]) for line in text.splitlines()[1:]]  # first may be cut
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))


def test_tail_of_a_name_meaning_several_processes_says_which(daemon: Supd) -> None:
    with pytest.raises(RpcError) as raised:
        daemon.rpc("tail", {"name": "web"})
    assert raised.value.code == ErrorCode.INVALID_PARAMS
    assert raised.value.error["message"] == "web means 2 processes (web:0, web:1): name one"
    assert raised.value.error["data"] == ["web:0", "web:1"]
    with pytest.raises(RpcError) as unknown:
        daemon.rpc("tail", {"name": "nope"})
    assert unknown.value.code == ErrorCode.NO_SUCH_PROCESS


def test_supctl_tail_follow_stops_on_ctrl_c(daemon: Supd) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [PY, "-m", "supd.ctl", "-s", str(daemon.socket), "tail", "-f", "ticker"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith(b"tick")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
        assert proc.returncode == 0 and b"Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_reload_over_the_socket_reports_added_changed_removed(daemon: Supd) -> None:
    daemon.write_config(
        CONFIG.replace("numprocs = 2", "numprocs = 3")
        + f"""
    [programs.extra]
    command = {SLEEP}
    startsecs = 0
    """
    )
    result = json.loads(supctl(daemon, "--json", "reload").stdout)
    programs = {k: result[k] for k in ("added", "changed", "removed")}
    assert programs == {"added": ["extra"], "changed": ["web"], "removed": []}
    steps = {e["name"]: e["step"] for e in result["plan"]}
    assert steps["web:0"] == steps["web:1"] == "unchanged"
    assert steps["web:2"] == steps["extra"] == "start"
    daemon.wait_state("web:2", "RUNNING")
    daemon.wait_state("extra", "RUNNING")


def test_reload_with_a_broken_config_changes_nothing(daemon: Supd) -> None:
    before = daemon.status()
    daemon.write_config("[programs.web]\ncommand = \n")
    result = supctl(daemon, "reload")
    assert result.returncode == 1
    assert "supd.toml:2" in result.stdout + result.stderr
    after = daemon.status()
    assert {n: e["pid"] for n, e in after.items()} == {n: e["pid"] for n, e in before.items()}


def test_shutdown_over_the_socket_leaves_no_process_behind(daemon: Supd) -> None:
    pids = [e["pid"] for e in daemon.status().values() if e["pid"]]
    result = supctl(daemon, "shutdown")
    assert result.returncode == 0, result.stderr
    assert daemon.wait_exit() == 0
    assert not any(pid_alive(p) for p in pids)
    assert not daemon.socket.exists()


def test_a_second_daemon_on_the_same_socket_is_refused(daemon: Supd, tmp_path: Path) -> None:
    second = Supd(tmp_path, CONFIG)
    second.config_path = tmp_path / "second.toml"
    second.log_path = tmp_path / "second.log"
    second.config_path.write_text(daemon.config_path.read_text())
    try:
        second.start(wait_ready=False)
        assert second.wait_exit() == 2
        message = second.log_path.read_text()
        assert str(daemon.socket) in message and str(daemon.pid) in message
    finally:
        second.kill()
    assert daemon.state("ticker") == "RUNNING"  # the first one is untouched


def test_stale_socket_is_replaced(supd: Factory, tmp_path: Path) -> None:
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "supd.sock"))
    stale.close()  # the file stays, nobody listens: a dead daemon's leftover
    d = supd(CONFIG)
    d.wait_state("ticker", "RUNNING")


def test_unauthorized_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0 or not Path("/usr/bin/python3").exists():
        pytest.skip("needs root and a system python to run a client as nobody")
    # A socket nobody can reach (pytest's tmp folders are private to root) and connect
    # to (mode 0666), so that the daemon's own SO_PEERCRED check is what refuses.
    folder = Path(tempfile.mkdtemp(prefix="supd-auth-"))
    folder.chmod(0o755)
    d = Supd(
        tmp_path,
        f"""
        [supervisor]
        socket = "{folder}/supd.sock"
        socket_mode = "0666"
        {CONFIG}
    """,
    )
    d.socket = folder / "supd.sock"
    code = f"""
        import socket
        s = socket.socket(socket.AF_UNIX)
        s.connect({str(d.socket)!r})
        print(s.makefile().readline())  # the refusal comes unasked, then EOF
    """
    try:
        d.start()
        # The system python: nobody can't run the venv's interpreter under /root.
        argv = ["/usr/bin/python3", *python_command(code)[1:]]
        out = subprocess.run(
            argv, capture_output=True, text=True, user="nobody", timeout=30, cwd="/"
        )
        reply = json.loads(out.stdout or out.stderr)
        assert reply["error"]["message"] == "permission denied"
        assert any(e.get("uid") for e in d.events("client_refused"))
        assert d.state("ticker") in ("STARTING", "RUNNING")
    finally:
        d.kill()
        shutil.rmtree(folder, ignore_errors=True)


def test_garbage_and_slow_clients_do_not_disturb_the_daemon(daemon: Supd) -> None:
    clients = []
    try:
        for _ in range(200):
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(daemon.socket))
            clients.append(s)
        clients[0].sendall(b"{not json\n")
        clients[1].sendall(b'{"jsonrpc": "2.0", "id": 1, "method": "nope"}\n')
        clients[2].sendall(b'{"jsonrpc": "2.0", "id": 2, "method": "st')  # half a request
        for sock, code in ((clients[0], -32700), (clients[1], -32601)):
            sock.settimeout(10)
            assert json.loads(sock.makefile().readline())["error"]["code"] == code
        began = time.monotonic()
        assert daemon.status()["ticker"]["state"] == "RUNNING"
        assert time.monotonic() - began < 2
    finally:
        for s in clients:
            s.close()


# Malformed lines, each with the error code and id the daemon must answer with.
MALFORMED: list[tuple[bytes, int, int | None]] = [
    (b"\xff\xfe{}", ErrorCode.PARSE_ERROR, None),
    (b'{"jsonrpc":"2.0","id":1,"method":"pid"', ErrorCode.PARSE_ERROR, None),
    (b'{"jsonrpc":"2.0","id":' + b"9" * 5000 + b',"method":"pid"}', ErrorCode.PARSE_ERROR, None),
    (b"[" * 100_000 + b"]" * 100_000, ErrorCode.PARSE_ERROR, None),
    (b'{"jsonrpc":"2.0","id":2,"method":"pid","params":{"name":' + b"[" * 500 + b"]" * 500
     + b"}}", ErrorCode.PARSE_ERROR, None),
    (b'{"jsonrpc":"2.0","id":3,"method":"pid","params":{"name":"\\udc80"}}',
     ErrorCode.PARSE_ERROR, None),
    (b'{"jsonrpc":"2.0","id":4,"method":"tail","params":{"name":"ticker","since":1' + b"0" * 400
     + b"}}", ErrorCode.INVALID_PARAMS, 4),
    (b'{"jsonrpc":"2.0","id":5,"method":"tail","params":{"name":"ticker","since":NaN}}',
     ErrorCode.INVALID_PARAMS, 5),
    (b'{"jsonrpc":"2.0","id":6,"method":"tail","params":{"name":"ticker","bytes":1e999}}',
     ErrorCode.INVALID_PARAMS, 6),
    (b'{"jsonrpc":"2.0","id":7,"method":"deaths","params":{"name":"ticker","limit":true}}',
     ErrorCode.INVALID_PARAMS, 7),
    (b'{"jsonrpc":"2.0","id":8,"method":"start","params":{"names":["idle"],"names":[1]}}',
     ErrorCode.INVALID_PARAMS, 8),
    (b'{"jsonrpc":"2.0","id":9,"method":"signal","params":{"names":["idle"],"signal":1'
     + b"0" * 400 + b"}}", ErrorCode.INVALID_PARAMS, 9),
    (b'{"jsonrpc":"2.0","id":10,"method":"pid","params":{"name":1},"x":[]}',
     ErrorCode.INVALID_REQUEST, 10),
    (b'{"jsonrpc":"2.0","id":NaN,"method":"pid"}', ErrorCode.INVALID_REQUEST, None),
    (b'{"jsonrpc":"2.0","id":11,"method":"\\u0000"}', ErrorCode.METHOD_NOT_FOUND, 11),
    (b'{"jsonrpc":"2.0","id":12,"method":"status","params":{"names":["' + b"x" * 900_000
     + b'"]}}', ErrorCode.NO_SUCH_PROCESS, 12),
]  # fmt: skip


def test_malformed_requests_get_protocol_errors_and_the_daemon_carries_on(daemon: Supd) -> None:
    """Over the real socket, on one connection: every malformed line is answered with
    its protocol error (none an internal error), and the next request still works."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(str(daemon.socket))
        reader = sock.makefile("rb")
        for raw, code, request_id in MALFORMED:
            sock.sendall(raw + b"\n")
            answer = json.loads(reader.readline())
            assert (answer["error"]["code"], answer["id"]) == (code, request_id), (raw[:80], answer)
        sock.sendall(b'{"jsonrpc":"2.0","id":"last","method":"pid"}\n')
        last = json.loads(reader.readline())
        assert (last["id"], last["result"]["pid"]) == ("last", daemon.pid)
    assert daemon.status()["ticker"]["state"] == "RUNNING"


def test_tail_follow_keeps_a_split_utf8_character_whole(supd: Factory, tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    code = f"""
        import os, time
        def wait_for(path):
            while not os.path.exists(path):
                time.sleep(0.01)
        wait_for({str(first)!r})
        os.write(1, b"caf\\xc3")  # the first byte of "\u00e9" alone
        wait_for({str(second)!r})
        os.write(1, b"\\xa9!\\n")
        time.sleep(1000)
    """
    d = supd(f"""
        [programs.cafe]
        command = {toml_list(python_command(code))}
        startsecs = 0
    """)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(d.socket))
        request = {"jsonrpc": "2.0", "id": 1, "method": "tail"}
        request["params"] = {"name": "cafe", "bytes": 0, "follow": True}
        sock.sendall(json.dumps(request).encode() + b"\n")
        reader = sock.makefile()
        assert json.loads(reader.readline())["id"] == 1  # following from here on
        first.touch()
        assert json.loads(reader.readline())["params"]["data"] == "caf"
        second.touch()  # the rest of the character arrives in a second read
        assert json.loads(reader.readline())["params"]["data"] == "\u00e9!\n"


def test_commands_that_start_things_are_refused_during_shutdown(
    supd: Factory, tmp_path: Path
) -> None:
    ready = tmp_path / "ready"
    stubborn = toml_list(
        python_command(f"""
            import signal, time
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            open({str(ready)!r}, "w").close()
            time.sleep(1000)
        """)
    )
    d = supd(f"""
        [programs.stubborn]
        command = {stubborn}
        startsecs = 0
        stopwaitsecs = 30
    """)
    d.wait_state("stubborn", "RUNNING")
    wait_until(ready.exists)
    d.signal(signal.SIGTERM)
    d.wait_state("stubborn", "STOPPING")
    for method in ("reload", "start"):
        with pytest.raises(RpcError) as info:
            d.rpc(method, {"names": ["stubborn"]} if method == "start" else {})
        assert info.value.code == 5  # SHUTTING_DOWN
    assert d.status()["stubborn"]["state"] == "STOPPING"  # status still answers
