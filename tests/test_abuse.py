"""The control socket under abuse and the trust in its path, end to end (issue 10)."""

from __future__ import annotations

import math
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import PY, SLEEP, Supd, python_command, source_pythonpath

SYSTEM_PYTHON = Path("/usr/bin/python3")  # runnable by `nobody` (the venv's is under /root)

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not SYSTEM_PYTHON.exists(), reason="needs root and /usr/bin/python3"
)


@pytest.fixture
def public_folder() -> Iterator[Path]:
    """A folder `nobody` can reach (pytest's tmp_path is under a 0700 folder)."""
    folder = Path(tempfile.mkdtemp(prefix="supd-abuse-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run_as_nobody(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [os.fspath(SYSTEM_PYTHON), *python_command(code)[1:], *args]
    return subprocess.run(argv, capture_output=True, text=True, user="nobody", timeout=60, cwd="/")


FLOOD = """
    import socket, sys
    for _ in range(int(sys.argv[1])):
        s = socket.socket(socket.AF_UNIX)
        s.connect(sys.argv[2])
        s.makefile().readline()  # the refusal, then EOF
        s.close()
"""


@needs_root
def test_refused_connections_do_not_flood_the_log(tmp_path: Path, public_folder: Path) -> None:
    d = Supd(
        tmp_path,
        f"""
        [supervisor]
        socket = "{public_folder}/supd.sock"
        socket_mode = "0666"

        [programs.steady]
        command = {SLEEP}
        startsecs = 0
        """,
    )
    d.socket = public_folder / "supd.sock"
    attempts = 3000
    try:
        d.start()
        started = time.monotonic()
        done = run_as_nobody(FLOOD, str(attempts), str(d.socket))
        seconds = time.monotonic() - started
        assert done.returncode == 0, done.stderr
        assert d.state("steady") == "RUNNING"
        d.signal(signal.SIGTERM)
        assert d.wait_exit() == 0
    finally:
        d.kill()
    written = d.events("client_refused")
    suppressed = sum(e.get("suppressed", 0) for e in written)
    leftovers = sum(
        e["count"]
        for e in d.events("log_events_suppressed")
        if e["suppressed_event"] == "client_refused"
    )
    # Every refusal is accounted for, and only a few of them took a line each: at most
    # 20 a second (one uid, one reason), the rest as counts.
    assert len(written) + suppressed + leftovers == attempts
    assert len(written) <= 20 * (math.ceil(seconds) + 1)


# -- socket path trust ------------------------------------------------------------------


def run(*argv: str, cwd: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=source_pythonpath(), NO_COLOR="1")
    return subprocess.run(
        [PY, *argv], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout
    )


def supd_run(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return run("-m", "supd", "-c", str(config), *extra, cwd=config.parent)


def write_config(tmp_path: Path, supervisor: str) -> Path:
    config = tmp_path / "supd.toml"
    config.write_text(f"[supervisor]\n{supervisor}\n\n[programs.steady]\ncommand = {SLEEP}\n")
    return config


@pytest.mark.parametrize("check", [True, False])
def test_a_plain_file_or_folder_at_the_socket_path(tmp_path: Path, check: bool) -> None:
    (tmp_path / "file.sock").write_text("precious")
    (tmp_path / "folder.sock").mkdir()
    for name, what in (("file.sock", "exists and is not a socket"), ("folder.sock", "a folder")):
        config = write_config(tmp_path, f'socket = "{name}"')
        done = supd_run(config, *(["--check"] if check else []))
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith(f"{config}:2: supervisor.socket: "), done.stderr
        assert what in done.stderr and "Traceback" not in done.stderr
    assert (tmp_path / "file.sock").read_text() == "precious"


def test_check_reports_an_unknown_socket_group_and_a_parent_that_is_a_file(
    tmp_path: Path,
) -> None:
    (tmp_path / "plain").write_text("")
    config = write_config(tmp_path, 'socket_group = "nosuchgroup"\nsocket = "plain/sub/s.sock"')
    done = supd_run(config, "--check")
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert f"{config}:2: supervisor.socket_group: unknown group 'nosuchgroup'" in lines[0]
    assert lines[1].startswith(f"{config}:3: supervisor.socket: ")
    assert f"{tmp_path / 'plain'} is not a folder" in lines[1]


def test_a_socket_folder_that_cannot_be_created_is_a_clear_error(tmp_path: Path) -> None:
    config = write_config(tmp_path, 'socket = "/proc/nope/s.sock"')
    assert supd_run(config, "--check").returncode == 0  # only start-up can tell
    done = supd_run(config)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "supd: cannot create the control socket at /proc/nope/s.sock: No such file or directory"
    )


def test_a_socket_folder_others_can_write_to_is_refused(tmp_path: Path) -> None:
    open_folder = tmp_path / "open"
    open_folder.mkdir()
    open_folder.chmod(0o777)  # anyone could swap our socket for theirs
    config = write_config(tmp_path, 'socket = "open/supd.sock"')
    done = supd_run(config)
    assert done.returncode == 2
    assert "writable by others (mode 0777) and not sticky" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (open_folder / "supd.sock").exists()
    open_folder.chmod(0o1777)  # sticky, like /tmp: others cannot rename our file
    d = Supd(tmp_path, config.read_text())
    d.socket = open_folder / "supd.sock"
    try:
        d.start()
        assert stat.S_IMODE(d.socket.lstat().st_mode) == 0o600
    finally:
        d.kill()


IMPOSTOR = """
    import json, os, socket, sys
    server = socket.socket(socket.AF_UNIX)
    server.bind(sys.argv[1])
    os.chmod(sys.argv[1], 0o666)
    server.listen()
    print("listening", flush=True)
    while True:
        conn, _ = server.accept()
        try:
            conn.makefile("rb").readline()
            # Claims to be pid 1, and answers every method with that.
            answer = {"jsonrpc": "2.0", "id": 1, "result": {"pid": 1}}
            conn.sendall(json.dumps(answer).encode() + b"\\n")
        except OSError:
            pass  # a client that did not wait for our answer
        conn.close()
"""


@needs_root
def test_an_impostor_on_the_socket_path(tmp_path: Path) -> None:
    folder = Path(tempfile.mkdtemp(prefix="supd-impostor-"))
    folder.chmod(0o1777)
    path = folder / "supd.sock"
    argv = [os.fspath(SYSTEM_PYTHON), *python_command(IMPOSTOR)[1:], str(path)]
    impostor = subprocess.Popen(argv, user="nobody", stdout=subprocess.PIPE, text=True, cwd="/")
    try:
        assert impostor.stdout is not None and impostor.stdout.readline() == "listening\n"
        config = write_config(tmp_path, f'socket = "{path}"')
        done = supd_run(config)
        assert done.returncode == 2
        assert done.stderr.strip() == (
            f"supd: {path} is held by pid {impostor.pid}, uid 65534, "
            "which claims to be supd with pid 1"
        )
        # supctl, as root, does not talk to it...
        ctl = run("-m", "supd.ctl", "-s", str(path), "status", cwd=tmp_path)
        assert ctl.returncode == 4
        assert f"served by uid 65534 (pid {impostor.pid})" in ctl.stderr
        assert "--trust-uid 65534" in ctl.stderr
        # ...unless told to; then its bogus answer is an error, not a traceback.
        for command in ("status", "version", "pid"):
            ctl = run(
                "-m", "supd.ctl", "-s", str(path), "--trust-uid", "65534", command, cwd=tmp_path
            )
            if command == "pid":
                assert ctl.returncode == 0 and ctl.stdout == "1\n"  # well-formed, if a lie
                continue
            assert ctl.returncode == 4, (command, ctl.stdout, ctl.stderr)
            assert "invalid answer" in ctl.stderr and "Traceback" not in ctl.stderr
    finally:
        impostor.kill()
        impostor.wait()
        shutil.rmtree(folder, ignore_errors=True)
