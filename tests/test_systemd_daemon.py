"""supd under systemd, end to end: a real daemon talking sd_notify to a datagram socket
this test listens on, and serving its control socket from a passed (activated) fd.

The contract (issue 5), as daemon.py implements it with supervisor/notify.py and
supervisor/activation.py:

* NOTIFY_SOCKET is read at start (and removed from supd's environment);
* READY=1 once every autostart program is RUNNING, BACKOFF or FATAL;
* SIGHUP: RELOADING=1 with MONOTONIC_USEC, then READY=1;
* SIGTERM: STOPPING=1;
* STATUS= lines (notify.status_line) as the counts change;
* WATCHDOG=1 every WATCHDOG_USEC / 2;
* with LISTEN_FDS/LISTEN_PID, the control server serves on the passed socket.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import PY, REPO, SLEEP, Supd, python_command, toml_list, wait_until

Factory = Callable[..., Supd]


CRASH = toml_list(python_command("raise SystemExit(1)"))


# -- systemd's end of NOTIFY_SOCKET ------------------------------------------------------


class NotifyListener:
    """A datagram socket standing in for systemd's notify socket; keeps every message
    as a dict of its assignments, with the monotonic time it was read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[dict[str, str]] = []
        self.times: list[float] = []
        self._seen = 0  # messages before this index were already matched or skipped

    def close(self) -> None:
        self.sock.close()

    def _receive(self, timeout: float) -> bool:
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return False
        self.times.append(time.monotonic())
        lines = data.decode().split("\n")
        self.messages.append(dict(line.partition("=")[::2] for line in lines if line))
        return True

    def wait_for(self, key: str, value: str | None = None, timeout: float = 15.0) -> int:
        """Index of the first message not yet returned by wait_for that sets `key`
        (to `value`, if given); reads more as needed, fails after `timeout`."""
        deadline = time.monotonic() + timeout
        index = self._seen
        while True:
            while index < len(self.messages):
                message = self.messages[index]
                index += 1
                if key in message and (value is None or message[key] == value):
                    self._seen = index
                    return index - 1
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {key}={value or '*'} after {timeout}s: {self.messages}")
            self._receive(remaining)

    def wait_status(self, wanted: Callable[[str], bool], timeout: float = 15.0) -> str:
        """The latest STATUS= text, once it is one `wanted` accepts."""
        deadline = time.monotonic() + timeout
        while True:
            statuses = [message["STATUS"] for message in self.messages if "STATUS" in message]
            if statuses and wanted(statuses[-1]):
                return statuses[-1]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no such STATUS after {timeout}s: {self.messages}")
            self._receive(remaining)

    def drain(self) -> None:
        """Read whatever has arrived by now."""
        while self._receive(0.001):
            pass

    def keys(self) -> list[str]:
        """A compact history: the first key of every message."""
        return [next(iter(message)) for message in self.messages]


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[NotifyListener]:
    sock = NotifyListener(tmp_path / "notify.sock")
    yield sock
    sock.close()


def systemd_env(listener: NotifyListener, **extra: str) -> dict[str, str]:
    """supd's environment as systemd would make it (no RUNTIME_DIRECTORY: the control
    socket stays beside the test's config)."""
    env = {k: v for k, v in os.environ.items() if k != "RUNTIME_DIRECTORY"}
    return {**env, "NOTIFY_SOCKET": str(listener.path), **extra}


# -- readiness ---------------------------------------------------------------------------


def test_ready_once_autostart_programs_settle(supd: Factory, listener: NotifyListener) -> None:
    started = time.monotonic()
    d = supd(
        f"""
        [supervisor]
        log_format = "json"

        [programs.up]
        command = {SLEEP}
        startsecs = 1

        [programs.broken]
        command = {CRASH}
        startsecs = 1
        startretries = 5
        backoff_initial = 30.0

        [programs.manual]
        command = {SLEEP}
        autostart = false
        """,
        env=systemd_env(listener),
    )
    ready = listener.wait_for("READY", "1")
    # `up` needs startsecs = 1 to count as RUNNING; nothing earlier may say READY.
    assert listener.times[ready] - started >= 1.0
    states = {name: entry["state"] for name, entry in d.status().items()}
    assert states == {"up": "RUNNING", "broken": "BACKOFF", "manual": "STOPPED"}
    listener.drain()
    assert listener.keys().count("READY") == 1, listener.messages


def test_ready_at_once_without_autostart_programs(supd: Factory, listener: NotifyListener) -> None:
    supd(
        f"""
        [programs.manual]
        command = {SLEEP}
        autostart = false
        """,
        env=systemd_env(listener),
    )
    listener.wait_for("READY", "1", timeout=10)


def test_status_follows_the_state_counts(supd: Factory, listener: NotifyListener) -> None:
    d = supd(
        f"""
        [programs.up]
        command = {SLEEP}
        startsecs = 0
        """,
        env=systemd_env(listener),
    )
    listener.wait_for("READY", "1")
    assert listener.wait_status(lambda text: "1 running" in text) == "1 running"
    d.rpc("stop", {"names": ["up"], "wait": True})
    assert listener.wait_status(lambda text: "stopped" in text) == "0 running, 1 stopped"


# -- reload and stop ---------------------------------------------------------------------


def test_sighup_sends_reloading_then_ready(supd: Factory, listener: NotifyListener) -> None:
    d = supd(
        f"""
        [programs.up]
        command = {SLEEP}
        startsecs = 0
        """,
        env=systemd_env(listener),
    )
    listener.wait_for("READY", "1")
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    d.signal(signal.SIGHUP)
    reloading = listener.wait_for("RELOADING", "1")
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert before <= int(listener.messages[reloading]["MONOTONIC_USEC"]) <= after
    ready = listener.wait_for("READY", "1")
    assert ready > reloading


def test_sigterm_sends_stopping_before_exit(supd: Factory, listener: NotifyListener) -> None:
    d = supd(
        f"""
        [programs.up]
        command = {SLEEP}
        startsecs = 0
        """,
        env=systemd_env(listener),
    )
    listener.wait_for("READY", "1")
    d.signal(signal.SIGTERM)
    listener.wait_for("STOPPING", "1")
    assert d.wait_exit() == 0


# -- watchdog ----------------------------------------------------------------------------


def test_watchdog_pings_every_half_interval(supd: Factory, listener: NotifyListener) -> None:
    supd(
        f"""
        [programs.up]
        command = {SLEEP}
        startsecs = 0
        """,
        env=systemd_env(listener, WATCHDOG_USEC="400000"),  # ping every 200 ms
    )
    pings = [listener.wait_for("WATCHDOG", "1", timeout=10) for _ in range(4)]
    # Not faster than every 200 ms (some slack for timer rounding); a slow machine may
    # be later, never earlier.
    assert listener.times[pings[-1]] - listener.times[pings[0]] >= 3 * 0.2 * 0.8


# -- socket activation -------------------------------------------------------------------

# What systemd does for an activated service, in a few lines: the listening socket on
# fd 3, LISTEN_FDS=1, and LISTEN_PID naming the process about to exec supd.
_ACTIVATE = """
import os, sys
os.dup2(int(sys.argv[1]), 3)
os.environ.update(LISTEN_FDS="1", LISTEN_FDNAMES="supd.socket", LISTEN_PID=str(os.getpid()))
os.execv(sys.executable, [sys.executable, "-m", "supd", *sys.argv[2:]])
"""


@contextlib.contextmanager
def activated_supd(tmp_path: Path, config: str, listening: socket.socket) -> Iterator[Supd]:
    instance = Supd(tmp_path, config)
    env = {k: v for k, v in os.environ.items() if k != "RUNTIME_DIRECTORY"}
    env["PYTHONPATH"] = str(REPO)
    try:
        with open(instance.log_path, "ab") as log:
            instance.proc = subprocess.Popen(
                [PY, "-c", _ACTIVATE, str(listening.fileno()), "-c", str(instance.config_path)],
                pass_fds=[listening.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                cwd=tmp_path,
            )
        yield instance
    finally:
        instance.kill()


def test_control_server_serves_on_the_activated_socket(tmp_path: Path) -> None:
    activated_path = tmp_path / "activated.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listening:
        listening.bind(str(activated_path))
        listening.listen()
        config = f"""
            [supervisor]
            log_format = "json"

            [programs.up]
            command = {SLEEP}
            startsecs = 0
        """
        with activated_supd(tmp_path, config, listening) as d:
            d.socket = activated_path  # rpc() talks to the socket systemd made
            statuses = wait_until(lambda: _try_status(d), describe=d.describe, timeout=15)
            assert list(statuses) == ["up"]
            # supd adopted the socket instead of binding its configured path.
            assert not (tmp_path / "supd.sock").exists()
            d.signal(signal.SIGTERM)
            assert d.wait_exit() == 0
        # The socket is systemd's: supd must not unlink it on the way out.
        assert activated_path.exists()


def _try_status(d: Supd) -> dict[str, dict[str, object]]:
    try:
        return d.status()
    except OSError:
        return {}


# -- hygiene (holds with or without the wiring) ------------------------------------------


# What systemd sets for a service (besides NOTIFY_SOCKET): meant for supd, not for the
# programs it runs. RUNTIME_DIRECTORY is the test's folder, where the socket is anyway.
SYSTEMD_FOR_SUPD = {
    "WATCHDOG_USEC": "30000000",
    "WATCHDOG_PID": "1",
    "LISTEN_FDS": "1",
    "LISTEN_PID": "1",
    "LISTEN_FDNAMES": "x",
    "INVOCATION_ID": "0123456789abcdef0123456789abcdef",
    "JOURNAL_STREAM": "8:12345",
    "STATE_DIRECTORY": "/var/lib/supd",
    "LOGS_DIRECTORY": "/var/log/supd",
    "CACHE_DIRECTORY": "/var/cache/supd",
    "CONFIGURATION_DIRECTORY": "/etc/supd",
    "CREDENTIALS_DIRECTORY": "/run/credentials/supd.service",
    "MAINPID": "1",
}


def test_programs_never_see_systemd_variables(
    supd: Factory, listener: NotifyListener, tmp_path: Path
) -> None:
    variables = {**SYSTEMD_FOR_SUPD, "RUNTIME_DIRECTORY": str(tmp_path)}
    env_file = tmp_path / "env.json"
    partial = tmp_path / "env.json.partial"
    dump = toml_list(
        python_command(f"""
            import json, os
            with open({str(partial)!r}, "w") as f:
                json.dump(dict(os.environ), f)
            os.rename({str(partial)!r}, {str(env_file)!r})  # appears complete or not at all
        """)
    )
    supd(
        f"""
        [programs.dump]
        command = {dump}
        startsecs = 0
        autorestart = "never"
        """,
        env=systemd_env(listener, **variables),
    )
    wait_until(env_file.exists, describe=f"{env_file} written by the program")
    seen = json.loads(env_file.read_text())
    assert set(seen) & set(variables) == set()
    assert "NOTIFY_SOCKET" not in seen
    assert seen["SUPD_PROCESS_NAME"] == "dump"  # the dump did run under supd


def test_a_notify_socket_nobody_listens_on_does_not_hurt(supd: Factory, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RUNTIME_DIRECTORY"}
    env.update(NOTIFY_SOCKET=str(tmp_path / "nobody.sock"), WATCHDOG_USEC="200000")
    d = supd(
        f"""
        [programs.up]
        command = {SLEEP}
        startsecs = 0
        """,
        env=env,
    )
    d.wait_state("up", "RUNNING")
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0
