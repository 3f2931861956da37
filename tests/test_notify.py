"""sd_notify and socket activation against real sockets: supervisor/notify.py and
supervisor/activation.py.

The notify tests bind a datagram socket where systemd's would be and read exactly what
arrives. The activation tests run a small child with a real listening socket placed on
fd 3 (and 4), as systemd does, because LISTEN_PID must name the process that reads it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from supd import activation, facts, notify
from supd.notify import Notifier, status_line, take_systemd_environment
from tests.helpers import PY, REPO

# -- notify: fixtures and helpers --------------------------------------------------------


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[socket.socket]:
    """systemd's end: a datagram socket bound in tmp_path, nothing sent yet."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.setblocking(False)
    yield sock
    sock.close()


def notifier_for(sock: socket.socket, **extra: str) -> Notifier:
    address = sock.getsockname()
    name = "@" + address[1:].decode() if isinstance(address, bytes) else address
    return Notifier.from_environ({"NOTIFY_SOCKET": name, **extra})


def received(sock: socket.socket) -> list[bytes]:
    """Every datagram waiting on `sock`. A send is a synchronous enqueue on the
    receiver, so whatever was sent is already here: no waiting needed."""
    messages = []
    while True:
        try:
            messages.append(sock.recv(65536))
        except BlockingIOError:
            return messages


# -- notify: the messages ----------------------------------------------------------------


def test_ready_sends_ready_with_status(receiver: socket.socket) -> None:
    notifier = notifier_for(receiver)
    notifier.ready("3 running")
    assert received(receiver) == [b"READY=1\nSTATUS=3 running"]
    notifier.close()


def test_ready_without_status_sends_ready_only(receiver: socket.socket) -> None:
    notifier = notifier_for(receiver)
    notifier.ready()
    assert received(receiver) == [b"READY=1"]
    notifier.close()


def test_reloading_sends_the_monotonic_clock_in_microseconds(receiver: socket.socket) -> None:
    notifier = notifier_for(receiver)
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    [message] = received(receiver)
    first, second = message.split(b"\n")
    assert first == b"RELOADING=1"
    key, _, value = second.partition(b"=")
    assert key == b"MONOTONIC_USEC"
    assert before <= int(value) <= after
    notifier.close()


def test_stopping_and_watchdog_messages(receiver: socket.socket) -> None:
    notifier = notifier_for(receiver)
    notifier.watchdog()
    notifier.stopping()
    notifier.stopping("stopping 2 programs")
    assert received(receiver) == [
        b"WATCHDOG=1",
        b"STOPPING=1",
        b"STOPPING=1\nSTATUS=stopping 2 programs",
    ]
    notifier.close()


def test_status_is_sent_only_when_it_changes(receiver: socket.socket) -> None:
    notifier = notifier_for(receiver)
    notifier.status("1 running")
    notifier.status("1 running")
    notifier.status("2 running")
    notifier.ready("2 running")  # READY always goes out, with its status
    notifier.status("2 running")  # ... which counts as the last status sent
    notifier.status("1 running")
    assert received(receiver) == [
        b"STATUS=1 running",
        b"STATUS=2 running",
        b"READY=1\nSTATUS=2 running",
        b"STATUS=1 running",
    ]
    notifier.close()


def test_status_is_one_line_and_short_enough_for_systemd(receiver: socket.socket) -> None:
    notifier = notifier_for(receiver)
    notifier.status("line one\nline two")
    notifier.status("é" * 5000)
    first, second = received(receiver)
    assert first == b"STATUS=line one line two"
    assert second.startswith(b"STATUS=\xc3\xa9") and second.endswith(b"...")
    assert len(second) <= 4096 - len(b"READY=1\n")
    notifier.close()


def test_abstract_socket_address(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        # Abstract names are machine-wide: make this one unique to the test run.
        sock.bind(b"\0supd-test-notify-" + os.fsencode(str(tmp_path)))
        sock.setblocking(False)
        notifier = notifier_for(sock)
        assert notifier.address == sock.getsockname()
        notifier.ready()
        assert received(sock) == [b"READY=1"]
        notifier.close()


# -- notify: when there is nobody (or no room) to tell -----------------------------------


@pytest.mark.parametrize("environ", [{}, {"NOTIFY_SOCKET": ""}])
def test_without_notify_socket_nothing_is_sent(environ: dict[str, str]) -> None:
    with capture_logs() as logs:
        notifier = Notifier.from_environ({**environ, "WATCHDOG_USEC": "1000000"})
        assert not notifier.enabled
        notifier.ready("x")
        notifier.reloading()
        notifier.status("y")
        notifier.watchdog()
        notifier.stopping()
        assert notifier.watchdog_interval_ms() is None
        notifier.close()
    assert logs == []


def test_disabled_notifier_sends_nothing() -> None:
    notifier = Notifier.disabled()
    assert not notifier.enabled
    notifier.ready()
    notifier.watchdog()
    assert notifier.watchdog_interval_ms() is None


def test_from_environ_defaults_to_os_environ(
    receiver: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", receiver.getsockname())
    notifier = Notifier.from_environ()
    notifier.ready()
    assert received(receiver) == [b"READY=1"]
    notifier.close()


def test_unsupported_address_disables_with_a_warning() -> None:
    with capture_logs() as logs:
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": "relative/notify.sock"})
        notifier.ready()
    assert not notifier.enabled
    assert [log["event"] for log in logs] == ["notify_socket_unsupported"]


def test_missing_socket_never_raises_and_logs_once(tmp_path: Path) -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "nobody-here.sock")})
    assert notifier.enabled
    with capture_logs() as logs:
        for _ in range(3):
            notifier.ready("x")
            notifier.watchdog()
            notifier.status("y")
    assert [log["event"] for log in logs] == ["notify_failed"]
    notifier.close()


def test_full_socket_never_blocks_and_recovers(receiver: socket.socket) -> None:
    """A receiver that stops reading fills up; sends then fail at once (EAGAIN), the
    failure is logged once, and the first send after the queue drains says so."""
    notifier = notifier_for(receiver)
    with capture_logs() as logs:
        deadline = time.monotonic() + 10
        while not logs:  # until a send fails: the queue is full
            assert time.monotonic() < deadline, "the receiver's queue never filled"
            notifier.watchdog()
        for _ in range(100):
            notifier.watchdog()
        queued = received(receiver)
        notifier.ready()
    assert queued and set(queued) == {b"WATCHDOG=1"}
    assert [log["event"] for log in logs] == ["notify_failed", "notify_recovered"]
    assert "Resource temporarily unavailable" in logs[0]["error"]
    assert received(receiver) == [b"READY=1"]
    notifier.close()


def test_a_status_that_could_not_be_sent_is_sent_again(receiver: socket.socket) -> None:
    notifier = notifier_for(receiver)
    path = receiver.getsockname()
    receiver.close()
    os.unlink(path)
    with capture_logs():
        notifier.status("1 running")  # lost: nobody listens
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as again:
        again.bind(path)  # systemd came back (a daemon-reexec re-creates the socket)
        again.setblocking(False)
        with capture_logs():
            notifier.status("1 running")
        assert received(again) == [b"STATUS=1 running"]
    notifier.close()


def test_close_disables(receiver: socket.socket) -> None:
    notifier = notifier_for(receiver)
    notifier.close()
    notifier.close()
    notifier.ready()
    assert not notifier.enabled
    assert received(receiver) == []


# -- notify: watchdog interval -----------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15000),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "<self>"}, 15000),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "<parent>"}, None),
        ({"WATCHDOG_USEC": "1"}, 1),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_PID": "<self>"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec_for_this_process(
    receiver: socket.socket, extra: dict[str, str], expected: int | None
) -> None:
    pids = {"<self>": str(os.getpid()), "<parent>": str(os.getppid())}
    extra = {key: pids.get(value, value) for key, value in extra.items()}
    notifier = notifier_for(receiver, **extra)
    assert notifier.watchdog_interval_ms() == expected
    notifier.close()


# -- notify: environment and status line -------------------------------------------------


def test_take_systemd_environment_removes_and_returns_systemd_variables() -> None:
    environ = {
        "NOTIFY_SOCKET": "/run/systemd/notify",
        "WATCHDOG_USEC": "30000000",
        "LISTEN_FDS": "1",
        "LISTEN_PID": "42",
        "LISTEN_FDNAMES": "supd.socket",
        "PATH": "/usr/bin",
        "RUNTIME_DIRECTORY": "/run/supd",
    }
    taken = take_systemd_environment(environ)
    assert taken == {
        "NOTIFY_SOCKET": "/run/systemd/notify",
        "WATCHDOG_USEC": "30000000",
        "LISTEN_FDS": "1",
        "LISTEN_PID": "42",
        "LISTEN_FDNAMES": "supd.socket",
    }
    assert environ == {"PATH": "/usr/bin", "RUNTIME_DIRECTORY": "/run/supd"}


def test_take_systemd_environment_unsets_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("WATCHDOG_PID", "1")
    taken = take_systemd_environment(os.environ)
    assert taken == {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_PID": "1"}
    shown = subprocess.run(["env"], capture_output=True, text=True, check=True).stdout
    assert "NOTIFY_SOCKET" not in shown and "WATCHDOG_PID" not in shown


def test_children_never_see_systemd_variables() -> None:
    """The children's list (facts) covers every variable systemd gives supd itself."""
    assert set(notify.SYSTEMD_ENVIRONMENT) <= set(facts.CHILD_PRIVATE_ENVIRONMENT)


@pytest.mark.parametrize(
    ("counts", "line"),
    [
        ({}, "0 running"),
        ({"RUNNING": 12}, "12 running"),
        ({"RUNNING": 12, "BACKOFF": 1, "FATAL": 0}, "12 running, 1 backoff"),
        (
            {"FATAL": 1, "STOPPED": 2, "STARTING": 3, "RUNNING": 0, "STOPPING": 1},
            "0 running, 3 starting, 1 stopping, 1 fatal, 2 stopped",
        ),
        ({"running": 1, "RUNNING": 1, "EXITED": 1}, "2 running, 1 exited"),
        ({"RUNNING": 1, "UNKNOWN": 2}, "1 running, 2 unknown"),
    ],
)
def test_status_line(counts: dict[str, int], line: str) -> None:
    assert status_line(counts) == line


# -- activation: in this process ---------------------------------------------------------


def test_listen_fds_ignores_variables_meant_for_another_process() -> None:
    environ = {"LISTEN_PID": str(os.getppid()), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x"}
    assert activation.listen_fds(environ) == []
    assert environ == {}  # unset=True removes them all the same, like sd_listen_fds


def test_listen_fds_without_variables_is_empty() -> None:
    assert activation.listen_fds({}) == []
    assert activation.control_socket_fd({}) is None


def test_listen_fds_unset_false_keeps_the_variables() -> None:
    environ = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"}
    assert activation.listen_fds(environ, unset=False) == []
    assert environ == {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"}


@pytest.mark.parametrize("count", ["many", "-1", ""])
def test_malformed_listen_fds_meant_for_us_is_an_error(count: str) -> None:
    with pytest.raises(ValueError, match="LISTEN_FDS"):
        activation.listen_fds({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": count})


def test_is_unix_stream_listener_tells_sockets_apart(tmp_path: Path) -> None:
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(str(tmp_path / "s.sock"))
    listening.listen()
    bound_only = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound_only.bind(str(tmp_path / "b.sock"))
    connected, peer = socket.socketpair()
    datagram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    read_end, write_end = os.pipe()
    everything = [listening, bound_only, connected, peer, datagram, tcp]
    try:
        assert activation.is_unix_stream_listener(listening.fileno())
        for sock in everything[1:]:
            assert not activation.is_unix_stream_listener(sock.fileno()), sock
        assert not activation.is_unix_stream_listener(read_end)
        # The check hands every fd back open.
        for sock in everything:
            os.fstat(sock.fileno())
        os.fstat(read_end)
    finally:
        for sock in everything:
            sock.close()
        os.close(read_end)
        os.close(write_end)
    assert not activation.is_unix_stream_listener(read_end)  # closed now


# -- activation: a child that received fds the way systemd passes them -------------------

# The child puts the fds it was given on 3, 4, ... as systemd does, sets LISTEN_PID to
# its own pid, runs the test's code and prints the JSON of `result`.
_CHILD_PRELUDE = """
import fcntl, json, os, socket, sys
from supd import activation
# Out of the way first (a source may itself be 3 or 4), then onto 3, 4, ...; dup2
# leaves the copy inheritable, as systemd does.
moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in json.loads(sys.argv[1])]
for fd in json.loads(sys.argv[1]):
    os.close(fd)
for target, fd in enumerate(moved, start=3):
    os.dup2(fd, target)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
"""


def run_activated_child(code: str, fds: list[int], environ: dict[str, str]) -> Any:
    """Run `code` in a child with `fds` on 3, 4, ...; returns the child's `result`."""
    script = _CHILD_PRELUDE + textwrap.dedent(code) + "\nprint(json.dumps(result))\n"
    env = {**os.environ, "PYTHONPATH": str(REPO), **environ}
    proc = subprocess.run(
        [PY, "-c", script, json.dumps(fds)],
        pass_fds=fds,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[socket.socket]:
    """What supd.socket gives supd: a listening unix stream socket."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(tmp_path / "supd.sock"))
    sock.listen()
    yield sock
    sock.close()


def test_activated_child_adopts_fd_3_and_serves_on_it(
    listener: socket.socket, tmp_path: Path
) -> None:
    # The connection is queued on the listening socket before the child starts, as a
    # supctl call that triggered the activation would be.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(str(tmp_path / "supd.sock"))
        result = run_activated_child(
            """
            with_names = activation.listen_fds_with_names(unset=False)
            fd = activation.control_socket_fd()
            server = socket.socket(fileno=fd)
            server.settimeout(10)
            conn, _ = server.accept()
            conn.sendall(b"hello from the activated child")
            conn.close()
            result = {
                "with_names": with_names,
                "control_fd": fd,
                "inheritable": os.get_inheritable(3),
                "left_in_environ": sorted(k for k in os.environ if k.startswith("LISTEN_")),
            }
            """,
            [listener.fileno()],
            {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "supd.socket"},
        )
        assert client.recv(100) == b"hello from the activated child"
    assert result == {
        "with_names": [[3, "supd.socket"]],
        "control_fd": 3,
        "inheritable": False,  # close-on-exec: programs supd spawns never get it
        "left_in_environ": [],
    }


def test_control_socket_is_the_first_unix_stream_listener(listener: socket.socket) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as datagram:
        result = run_activated_child(
            """
            result = {
                "fds": activation.listen_fds_with_names(unset=False),
                "control_fd": activation.control_socket_fd(),
                "inheritable": [os.get_inheritable(3), os.get_inheritable(4)],
            }
            """,
            [datagram.fileno(), listener.fileno()],
            {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "logs"},  # one name for two fds
        )
    assert result == {
        "fds": [[3, "unknown"], [4, "unknown"]],
        "control_fd": 4,
        "inheritable": [False, False],
    }


def test_no_listening_unix_socket_means_no_control_fd() -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as datagram:
        result = run_activated_child(
            "result = activation.control_socket_fd()",
            [datagram.fileno()],
            {"LISTEN_FDS": "1"},
        )
    assert result is None


def test_fds_meant_for_another_process_are_left_alone(listener: socket.socket) -> None:
    result = run_activated_child(
        """
        os.environ["LISTEN_PID"] = str(os.getppid())
        result = [activation.control_socket_fd(), os.get_inheritable(3)]
        """,
        [listener.fileno()],
        {"LISTEN_FDS": "1"},
    )
    assert result == [None, True]
