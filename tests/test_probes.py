"""The probe state machines against real sockets, the log line matcher, and the sd_notify
parser and crediting, as data."""

from __future__ import annotations

import re
import select
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from supd import childnotify, probes
from supd.process import Notified


def drive(probe: probes.SocketProbe, timeout_s: float = 5.0) -> probes.Verdict:
    """What the daemon does: wait for `wants`, call on_ready, until a verdict."""
    try:
        if probe.verdict is not None:
            return probe.verdict
        while True:
            events = select.POLLOUT if probe.wants_write else select.POLLIN
            poller = select.poll()
            poller.register(probe.fd, events)
            assert poller.poll(timeout_s * 1000), "the probe's socket never became ready"
            verdict = probe.on_ready()
            if verdict is not None:
                return verdict
    finally:
        probe.close()


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    yield sock
    sock.close()


def test_tcp_probe_refused_then_connected(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    refused = drive(probes.TcpProbe(f"127.0.0.1:{port}"))
    assert refused == probes.Verdict(False, f"connect 127.0.0.1:{port}: connection refused")
    listener.listen()
    assert drive(probes.TcpProbe(f"localhost:{port}")).ok


@pytest.mark.parametrize(
    ("answer", "ok", "message"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", True, "200"),
        (b"HTTP/1.1 302 Found\r\n\r\n", True, "302"),
        (b"HTTP/1.0 503 Service Unavailable\r\n\r\n", False, "503"),
        (b"SSH-2.0-OpenSSH\r\n", False, "no HTTP status line in the answer"),
    ],
)
def test_http_probe_judges_the_status_line(
    listener: socket.socket, answer: bytes, ok: bool, message: str
) -> None:
    listener.listen()
    port = listener.getsockname()[1]
    probe = probes.HttpProbe(f"http://127.0.0.1:{port}/healthz?full=1")
    # The server side: accept, read the request, answer (the probe's connect is done).
    conn, _ = listener.accept()
    with conn:
        verdict = None
        while verdict is None and probe.wants_write:
            verdict = probe.on_ready()
        request = conn.recv(4096)
        conn.sendall(answer)
        conn.shutdown(socket.SHUT_WR)
        final = drive(probe)
    assert request.startswith(b"GET /healthz?full=1 HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"Connection: close\r\n\r\n" in request
    assert final == probes.Verdict(ok, f"GET http://127.0.0.1:{port}/healthz?full=1: {message}")


def test_line_matcher_matches_whole_lines_across_chunks() -> None:
    matcher = probes.LineMatcher(re.compile(rb"listening on port \d+"))
    assert matcher.feed(b"starting\nlistening on po") is None
    assert matcher.feed(b"rt 80") is None  # "80" may yet be "8000": wait for the end
    assert matcher.feed(b"00\nmore\n") == "listening on port 8000"


def test_file_verdict(tmp_path: Path) -> None:
    path = tmp_path / "ready"
    assert not probes.file_verdict(str(path)).ok
    path.touch()
    assert probes.file_verdict(str(path)) == probes.Verdict(True, f"file {path} exists")


def test_notify_parser_keeps_the_assignments_that_count() -> None:
    parsed = childnotify.parse(
        b"READY=1\nSTATUS=serving\nWATCHDOG=1\nEXTEND_TIMEOUT_USEC=5000000\nMAINPID=42\nX=1"
    )
    assert parsed == Notified(
        ready=True, status="serving", watchdog=True, extend_timeout_s=5.0, main_pid=42
    )
    assert childnotify.parse(b"FDSTORE=1\nERRNO=2") is None
    assert childnotify.parse(b"READY=0") is None
    assert childnotify.parse(b"STOPPING=1") == Notified(stopping=True)
    assert childnotify.parse(b"\xff\xfe\nSTATUS=caf\xc3\xa9") == Notified(status="café")


def test_notify_credit_follows_pids_up_to_a_known_process() -> None:
    tree = {300: 200, 200: 100, 100: 1, 500: 1}
    owners = {100: "web", 900: "db"}
    assert childnotify.credit(100, owners, tree.get) == "web"
    assert childnotify.credit(300, owners, tree.get) == "web"  # a grandchild
    assert childnotify.credit(500, owners, tree.get) is None  # a stranger
    assert childnotify.credit(900, owners, tree.get) == "db"  # a MAINPID
