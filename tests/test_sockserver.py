"""sockserver.StreamServer on its own, with real unix sockets and a real Selector.

The server under test (`EchoServer`) has the smallest protocol that exercises the base:
it echoes what it reads, `ok` clears the connection's deadline, `again` sets it anew,
`big N` answers N bytes, `bye` closes after the output. The test drives the loop in
its own thread (`pump`), so every step is visible: what the selector reported, what
the server accepted, closed or logged.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import select
import socket
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import LogCapture

from supd.selector import Event, ReadyKey, Selector
from supd.sockserver import (
    ACCEPT_RETRY_MS,
    ACCEPTS_PER_WAKEUP,
    AcceptRetryTag,
    Conn,
    ConnectionTag,
    DeadlineTag,
    ListenerTag,
    StreamServer,
    Tags,
)
from tests.helpers import wait_until


class EchoTag:
    __slots__ = ()


@dataclass(frozen=True, slots=True)
class EchoListener(EchoTag, ListenerTag):
    pass


@dataclass(frozen=True, slots=True)
class EchoRetry(EchoTag, AcceptRetryTag):
    pass


@dataclass(frozen=True, slots=True)
class EchoTimeout(EchoTag, DeadlineTag):
    pass


@dataclass(frozen=True, slots=True)
class EchoConnection(EchoTag, ConnectionTag):
    pass


@dataclass(frozen=True, slots=True)
class EchoOther(EchoTag):
    pass


class EchoServer(StreamServer[Conn]):
    def __init__(self, selector: Selector[Any], path: Path, **options: Any) -> None:
        self.logs = LogCapture()
        log = structlog.wrap_logger(structlog.ReturnLogger(), processors=[self.logs])
        tags = Tags(EchoListener(), EchoRetry(), EchoTimeout(), EchoConnection)
        super().__init__(selector, tags, log=log, **options)
        self.admitted = 0
        self.missed: list[tuple[int, float]] = []  # (conn_id, when)
        self.closed: dict[int, str | None] = {}  # conn_id: problem
        self.seen: Counter[str] = Counter()  # ready keys by tag
        self.others: list[object] = []  # keys of its own that are not the base's
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        listener.bind(os.fspath(path))
        listener.listen(256)
        self._listen(listener)

    def on_ready(self, key: ReadyKey[Any]) -> None:
        self.seen[type(key.data).__name__] += 1
        super().on_ready(key)

    def _other_ready(self, key: ReadyKey[Any]) -> None:
        self.others.append(key.data)

    def _admit(self, sock: socket.socket) -> None:
        self.admitted += 1
        sock.setblocking(False)
        self._add(Conn(sock))

    def _connection_ready(self, conn: Conn, events: Event) -> None:
        if events & Event.WRITE:
            self._flush(conn)
        if conn.closed or not conn.reading or not events & (Event.READ | Event.ERROR):
            return
        data = conn.sock.recv(65536)
        if not data:
            self._close(conn)
            return
        word, _, arg = data.strip().partition(b" ")
        if word == b"ok":
            self._clear_deadline(conn)
        elif word == b"again":
            self._set_deadline(conn)
        elif word == b"big":
            self._send(conn, b"x" * int(arg))
            return
        elif word == b"bye":
            self._close_after_output(conn)
            return
        self._send(conn, data)

    def _deadline_missed(self, conn: Conn) -> None:
        self.missed.append((conn.conn_id, time.monotonic()))
        super()._deadline_missed(conn)

    def _closed(self, conn: Conn, problem: str | None) -> None:
        self.closed[conn.conn_id] = problem

    def pump(self, selector: Selector[Any], timeout_ms: int = 0) -> int:
        """One loop iteration; returns how many keys it handled."""
        keys = selector.select(timeout_ms)
        for key in keys:
            self.on_ready(key)
        return len(keys)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [dict(entry) for entry in self.logs.entries if entry["event"] == name]


@pytest.fixture
def selector() -> Iterator[Selector[Any]]:
    with Selector() as made:
        yield made


@pytest.fixture
def make_server(selector: Selector[Any], tmp_path: Path) -> Iterator[Any]:
    made: list[EchoServer] = []

    def make(**options: Any) -> EchoServer:
        options.setdefault("request_timeout", 10.0)
        made.append(EchoServer(selector, tmp_path / f"echo{len(made)}.sock", **options))
        return made[-1]

    yield make
    for server in made:
        server.close()


@pytest.fixture
def clients() -> Iterator[list[socket.socket]]:
    made: list[socket.socket] = []
    yield made
    for sock in made:
        sock.close()


def connect(server: EchoServer, clients: list[socket.socket]) -> socket.socket:
    assert server._listener is not None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(server._listener.getsockname())
    clients.append(sock)
    return sock


def readable(sock: socket.socket) -> bool:
    """Something (or the end) waits to be read on `sock`: a poll that does not wait."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def until(server: EchoServer, selector: Selector[Any], condition: Any) -> Any:
    """Run the loop until `condition()` holds (bounded by wait_until's deadline)."""

    def step() -> Any:
        server.pump(selector, 20)
        return condition()

    return wait_until(step)


# --------------------------------------------------------------------------- accepting


def test_a_connect_storm_is_accepted_one_batch_per_wake_up(
    make_server: Any, selector: Selector[Any], clients: list[socket.socket]
) -> None:
    server = make_server()
    for _ in range(ACCEPTS_PER_WAKEUP + 36):
        connect(server, clients)
    assert server.pump(selector, 1000) == 1  # the listener, once
    assert server.admitted == ACCEPTS_PER_WAKEUP  # the rest waits in the backlog
    assert server.pump(selector, 1000) == 1  # epoll is level-triggered: reported again
    assert server.admitted == ACCEPTS_PER_WAKEUP + 36
    assert server.connection_count == ACCEPTS_PER_WAKEUP + 36


def test_out_of_fds_pauses_the_listener_until_the_retry_timer(
    make_server: Any, selector: Selector[Any], clients: list[socket.socket]
) -> None:
    server = make_server()
    waiting = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(3)]
    clients.extend(waiting)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowest_free = os.open(os.devnull, os.O_RDONLY)
    os.close(lowest_free)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
    try:
        assert server._listener is not None
        for sock in waiting:
            sock.connect(server._listener.getsockname())
        until(server, selector, lambda: not server.accepting)
        assert server.admitted == 0
        paused = server.events("accept_paused")
        assert paused[0]["errno"] == errno.EMFILE
        assert paused[0]["retry_ms"] == ACCEPT_RETRY_MS
        # Paused, the listener is out of the selector: the loop wakes up only for the
        # retry timer (each retry fails again and pauses again), never spins.
        start = server.seen.copy()
        until(server, selector, lambda: server.seen["EchoRetry"] >= start["EchoRetry"] + 3)
        keys = server.seen.total() - start.total()
        assert keys <= 2 * 3 + 2, f"{keys} ready keys for 3 retries: the loop spins"
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    until(server, selector, lambda: server.admitted == 3)
    assert server.accepting
    for sock in waiting:  # served like any client
        sock.sendall(b"hello")
        until(server, selector, lambda sock=sock: readable(sock))
        assert sock.recv(5, socket.MSG_DONTWAIT) == b"hello"


# --------------------------------------------------------------------------- deadlines


def test_a_connection_that_misses_its_deadline_is_closed_and_others_stay(
    make_server: Any, selector: Selector[Any], clients: list[socket.socket]
) -> None:
    server = make_server(request_timeout=0.2)
    started = time.monotonic()
    silent = connect(server, clients)
    polite = connect(server, clients)
    until(server, selector, lambda: server.admitted == 2)
    polite.sendall(b"ok")
    until(server, selector, lambda: readable(polite))
    assert polite.recv(10) == b"ok"  # its deadline is cleared
    until(server, selector, lambda: server.closed)
    assert server.closed == {1: "no complete request within 0.2 s"}
    assert server.missed[0][0] == 1 and server.missed[0][1] >= started + 0.2
    silent.settimeout(5)
    assert silent.recv(10) == b""  # closed by the server
    assert server.connection_count == 1


def test_a_deadline_set_again_counts_from_then_not_from_the_first(
    make_server: Any, selector: Selector[Any], clients: list[socket.socket]
) -> None:
    server = make_server(request_timeout=0.3)
    client = connect(server, clients)
    until(server, selector, lambda: server.admitted == 1)
    client.sendall(b"ok")
    until(server, selector, lambda: readable(client))
    assert client.recv(2) == b"ok"
    reset_at = time.monotonic()
    client.sendall(b"again")
    until(server, selector, lambda: server.missed)
    # The first deadline's entry came due first, and was skipped: it had been met.
    assert server.missed[0][1] >= reset_at + 0.3
    assert server.closed == {1: "no complete request within 0.3 s"}


def test_no_wake_up_once_no_connection_has_a_deadline(
    make_server: Any, selector: Selector[Any], clients: list[socket.socket]
) -> None:
    server = make_server(request_timeout=0.1)
    stays = connect(server, clients)
    leaves = connect(server, clients)
    until(server, selector, lambda: server.admitted == 2)
    stays.sendall(b"ok")
    until(server, selector, lambda: readable(stays))
    leaves.close()
    until(server, selector, lambda: server.connection_count == 1)
    # Three timeouts long, the subject of the test is that nothing happens.
    assert selector.select(300) == []
    assert server.missed == [] and server.connection_count == 1


# --------------------------------------------------------------------------- writing


def test_output_the_socket_cannot_take_at_once_is_delivered_in_full_then_closed(
    make_server: Any, selector: Selector[Any], clients: list[socket.socket]
) -> None:
    server = make_server()
    client = connect(server, clients)
    client.setblocking(False)
    size = 2 << 20  # several times what a unix socket buffers
    client.sendall(b"big %d" % size)
    received = bytearray()

    def read_some() -> bool:
        with contextlib.suppress(BlockingIOError):
            received.extend(client.recv(1 << 20))
        return len(received) == size

    until(server, selector, read_some)
    assert received == b"x" * size
    assert server.closed == {}  # delivered, and the connection stays
    client.sendall(b"bye")
    until(server, selector, lambda: server.closed)
    assert server.closed == {1: None}
    client.setblocking(True)
    client.settimeout(5)
    assert client.recv(10) == b""


def test_a_client_that_stops_reading_is_dropped_when_more_output_comes(
    make_server: Any, selector: Selector[Any], clients: list[socket.socket]
) -> None:
    server = make_server(max_output=1 << 16)
    client = connect(server, clients)
    until(server, selector, lambda: server.admitted == 1)
    client.sendall(b"big %d" % (4 << 20))  # buffered: the client reads nothing
    until(server, selector, lambda: server._connections[1].outbuf)
    assert server.closed == {}
    client.sendall(b"more")  # its echo is more output for a client that reads none
    until(server, selector, lambda: server.closed)
    assert server.closed == {1: f"client not reading: over {1 << 16} bytes pending"}


# --------------------------------------------------------------------------- dispatch


def test_keys_come_back_with_the_servers_own_tags_and_its_other_keys_go_to_it(
    make_server: Any, selector: Selector[Any], clients: list[socket.socket]
) -> None:
    server = make_server()
    other_fd = selector.register_timer(1, True, EchoOther())
    try:
        client = connect(server, clients)
        client.sendall(b"hi")
        until(server, selector, lambda: readable(client) and server.others)
        assert server.others == [EchoOther()]
        assert server.seen["EchoListener"] == 1 and server.seen["EchoConnection"] >= 1
        assert client.recv(2) == b"hi"
    finally:
        selector.unregister(other_fd)
