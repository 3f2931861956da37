"""The control socket under abuse and the trust in its path, end to end (issue 10)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import SLEEP, Supd, python_command

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
        done = run_as_nobody(FLOOD, str(attempts), str(d.socket))
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
    # Every refusal is accounted for, and only a few of them took a line each.
    assert len(written) + suppressed + leftovers == attempts
    assert len(written) < 200
