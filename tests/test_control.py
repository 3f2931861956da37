"""The control server against real unix sockets, driven by a real Selector loop.

The loop runs in a background thread (`ServerLoop`) with a fake daemon (`FakeDaemon`)
behind the server; tests talk to it with `RpcClient` over a socket in tmp_path. These
helpers are reused by tests/test_ctl.py, and are meant for any test that needs a
control server without the real daemon.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import LogCapture

from supd import protocol
from supd.control import (
    AlreadyRunning,
    ControlServer,
    ControlTag,
    Responder,
    SocketUnusable,
)
from supd.protocol import (
    ErrorCode,
    PidParams,
    ReloadParams,
    Request,
    RestartParams,
    ShutdownParams,
    SignalParams,
    StartParams,
    StatusParams,
    StopParams,
    TailParams,
    VersionParams,
)
from supd.protocol_models import (
    RESULT_ADAPTERS,
    ActionResult,
    OutputParams,
    PidResult,
    ProcessInfo,
    ProcessPid,
    ReloadResult,
    ShutdownResult,
    TailResult,
    VersionResult,
)
from supd.selector import SelectEvent, Selector
from tests.helpers import wait_until

T = TypeVar("T")

SYSTEM_PYTHON = Path("/usr/bin/python3")  # runnable by `nobody` (the venv's is under /root)


# =========================================================================== helpers


class FakeDaemon:
    """A CommandHandler with trivial semantics, enough to exercise the server and supctl.

    Processes live in `processes`; `hold` keeps answers back (in `held`) until the test
    releases them, like a `start` that waits for RUNNING. Runs on the loop thread: touch
    it from tests through `ServerLoop.call`.
    """

    def __init__(self) -> None:
        self.processes: dict[str, ProcessInfo] = {
            "web:0": ProcessInfo(
                name="web:0",
                program="web",
                state="RUNNING",
                pid=4242,
                uptime=190.0,
                description="pid 4242, uptime 0:03:10",
            ),
            "web:1": ProcessInfo(
                name="web:1",
                program="web",
                state="RUNNING",
                pid=4243,
                uptime=190.0,
                description="pid 4243, uptime 0:03:10",
            ),
        }
        self.output: dict[tuple[str, str], str] = {}
        self.hold = False
        self.held: list[tuple[Request, Responder]] = []
        self.requests: list[Request] = []
        self.followers: list[Responder] = []
        self.failing_starts: set[str] = set()
        self.reload_problems: list[str] = []
        self.shutdown_requested = False
        self.raise_on: set[str] = set()

    # -- CommandHandler

    def handle_command(self, request: Request, responder: Responder) -> None:
        self.requests.append(request)
        if request.method in self.raise_on:
            raise RuntimeError(f"fake failure in {request.method}")
        if self.hold:
            self.held.append((request, responder))
            return
        self.answer(request, responder)

    # -- test controls

    def release(self) -> int:
        """Answer every held request; returns how many there were."""
        held, self.held = self.held, []
        for request, responder in held:
            self.answer(request, responder)
        return len(held)

    def push_output(self, name: str, stream: str, data: str) -> int:
        """Send `data` to every follower of (name, stream); returns how many got it.
        Followers whose client is gone are dropped, as the daemon does."""
        alive, delivered = [], 0
        for responder in self.followers:
            params = responder.request.params
            assert isinstance(params, TailParams)
            if (params.name, params.stream) != (name, stream):
                alive.append(responder)
            elif responder.notify("output", OutputParams(name=name, stream=stream, data=data)):
                alive.append(responder)
                delivered += 1
        self.followers = alive
        return delivered

    # -- semantics

    def expand(self, names: list[str]) -> list[str] | None:
        found: list[str] = []
        for name in names:
            if name == "all":
                found.extend(self.processes)
            elif name in self.processes:
                found.append(name)
            else:
                members = [p.name for p in self.processes.values() if p.program == name]
                if not members:
                    return None
                found.extend(members)
        return found

    def answer(self, request: Request, responder: Responder) -> None:
        match request.params:
            case StatusParams(names=names):
                selected = self.expand(names) if names else list(self.processes)
                if selected is None:
                    responder.error(ErrorCode.NO_SUCH_PROCESS, f"no such process: {names}")
                else:
                    responder.result([self.processes[n] for n in selected])
            case StartParams() | StopParams() | RestartParams() | SignalParams():
                responder.result(self._act(request.method, request.params.names))
            case ReloadParams():
                if self.reload_problems:
                    responder.error(
                        ErrorCode.CONFIG_INVALID, "config invalid", self.reload_problems
                    )
                else:
                    responder.result(ReloadResult(added=["new"], changed=[], removed=["old"]))
            case TailParams(name=name, stream=stream, bytes=size, lines=lines, follow=follow):
                data = self.output.get((name, stream), "")
                if lines is not None:
                    data = "".join(data.splitlines(keepends=True)[-lines:] if lines else [])
                elif size is not None:
                    data = data[-size:] if size else ""
                responder.result(TailResult(name=name, stream=stream, data=data))
                if follow:
                    self.followers.append(responder)
            case PidParams(name=None):
                responder.result(PidResult(pid=os.getpid()))
            case PidParams(name=name):
                selected = self.expand([name or ""]) or []
                found = [ProcessPid(name=n, pid=self.processes[n].pid) for n in selected]
                one = found[0].pid if len(found) == 1 else None
                responder.result(PidResult(pid=one, processes=found))
            case VersionParams():
                responder.result(VersionResult(version="0.1.0", pid=os.getpid(), config=None))
            case ShutdownParams():
                self.shutdown_requested = True
                responder.result(ShutdownResult())

    def _act(self, method: str, names: list[str]) -> list[ActionResult]:
        results = []
        for name in names:
            selected = self.expand([name])
            if selected is None:
                results.append(ActionResult(name=name, ok=False, error="no such process"))
                continue
            for process in selected:
                if method == "start" and process in self.failing_starts:
                    results.append(
                        ActionResult(name=process, ok=False, state="FATAL", error="spawn error")
                    )
                else:
                    state = "STOPPED" if method == "stop" else "RUNNING"
                    results.append(ActionResult(name=process, ok=True, state=state))
        return results


class _Wake:
    """Tag of the loop thread's own wake-up event."""


class ServerLoop:
    """A Selector loop in a background thread serving a ControlServer.

    Dispatch is what the daemon does: keys with a ControlTag go to `on_ready`. Use
    `call(fn)` to run code on the loop thread (the server and handler are not
    thread-safe). `error` holds any exception that escaped the loop: it must stay None.
    """

    def __init__(self, path: Path, handler: Any = None, **server_options: Any) -> None:
        self.path = path
        self.handler = handler if handler is not None else FakeDaemon()
        self.server_options = server_options
        self.logs = LogCapture()
        self.log = structlog.wrap_logger(structlog.ReturnLogger(), processors=[self.logs])
        self.error: BaseException | None = None
        self.iterations = 0
        self.seen: Counter[str] = Counter()
        self._calls: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._ready = threading.Event()
        self._stopping = False
        self._wake: SelectEvent | None = None
        self._thread = threading.Thread(target=self._main, name="control-loop", daemon=True)
        self.server: ControlServer | None = None

    def __enter__(self) -> ServerLoop:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> ServerLoop:
        self._thread.start()
        self._ready.wait(10)
        if self.error is not None:
            raise self.error
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._stopping = True
            if self._wake is not None:
                self._wake.trigger()
            self._thread.join(10)
        assert not self._thread.is_alive(), "the loop thread did not stop"
        if self._wake is not None:
            self._wake.close()

    def call(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        """Run `fn` on the loop thread and return its result."""
        if not self._thread.is_alive():
            raise RuntimeError(f"the loop thread is dead: {self.error!r}")
        future: Future[T] = Future()
        self._calls.append((fn, future))
        assert self._wake is not None
        self._wake.trigger()
        return future.result(timeout)

    def events(self, name: str) -> list[dict[str, Any]]:
        """The server's log entries of one event (structlog's LogCapture)."""
        return [dict(entry) for entry in self.logs.entries if entry["event"] == name]

    def _main(self) -> None:
        try:
            selector: Selector[Any] = Selector()
        except BaseException as exc:
            self.error = exc
            self._ready.set()
            return
        with selector:
            self._wake = SelectEvent()
            selector.register_event(self._wake, _Wake())
            server = ControlServer(
                selector, self.handler, path=self.path, log=self.log, **self.server_options
            )
            try:
                server.open()
            except BaseException as exc:
                self.error = exc
                self._wake.close()
                self._ready.set()
                return
            self.server = server
            self._ready.set()
            try:
                self._loop(selector, server)
            except BaseException as exc:
                self.error = exc
            finally:
                server.close()
                selector.unregister(self._wake)
                # The wake fd stays open: stop() may be triggering it right now (it set
                # _stopping, and another event ended the loop first); stop() closes it.

    def _loop(self, selector: Selector[Any], server: ControlServer) -> None:
        while not self._stopping:
            keys = selector.select(-1)
            self.iterations += 1
            for key in keys:
                self.seen[type(key.data).__name__] += 1
                if server.owns(key.data):
                    server.on_ready(key)
                elif isinstance(key.data, _Wake):
                    self._run_calls()

    def _run_calls(self) -> None:
        while self._calls:
            fn, future = self._calls.popleft()
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)


class RpcClient:
    """A blocking test client: raw bytes in, JSON messages out, every wait bounded."""

    def __init__(self, path: Path, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(os.fspath(path))
        self.buffer = b""
        self._ids = 0

    def __enter__(self) -> RpcClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, method: str, params: Any = None, request_id: Any = None, **extra: Any) -> Any:
        """Send a request; returns its id."""
        if request_id is None:
            self._ids += 1
            request_id = self._ids
        message = {"jsonrpc": "2.0", "id": request_id, "method": method, **extra}
        if params is not None:
            message["params"] = params
        self.send(json.dumps(message).encode() + b"\n")
        return request_id

    def read(self) -> dict[str, Any]:
        """The next message; AssertionError on EOF."""
        message = self.read_or_eof()
        assert message is not None, "the server closed the connection"
        return message

    def read_or_eof(self) -> dict[str, Any] | None:
        while b"\n" not in self.buffer:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""  # closed with our unread bytes in its queue: still an end
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        message = json.loads(line)
        assert isinstance(message, dict)
        return message

    def response(self, request_id: Any) -> dict[str, Any]:
        """Read until the response with `request_id` (skipping notifications)."""
        while True:
            message = self.read()
            if message.get("id") == request_id and "method" not in message:
                return message

    def call(self, method: str, params: Any = None) -> dict[str, Any]:
        return self.response(self.request(method, params))

    def read_until_eof(self) -> list[dict[str, Any]]:
        messages = []
        while (message := self.read_or_eof()) is not None:
            messages.append(message)
        return messages


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "supd.sock"


@pytest.fixture
def served(sock_path: Path) -> Iterator[ServerLoop]:
    """A running server with a FakeDaemon; fails the test if the loop crashed."""
    with ServerLoop(sock_path) as loop:
        yield loop
    assert loop.error is None, loop.error


def held_count(loop: ServerLoop) -> int:
    return loop.call(lambda: len(loop.handler.held))


# =========================================================================== basics


def test_status_round_trip(served: ServerLoop) -> None:
    with RpcClient(served.path) as client:
        answer = client.call("status")
    assert answer["jsonrpc"] == "2.0"
    assert answer["id"] == 1
    infos = RESULT_ADAPTERS["status"].validate_python(answer["result"])
    assert [info.name for info in infos] == ["web:0", "web:1"]


def test_requests_are_answered_in_order_on_one_connection(served: ServerLoop) -> None:
    with RpcClient(served.path) as client:
        client.send(
            b"".join(
                json.dumps({"jsonrpc": "2.0", "id": i, "method": "pid"}).encode() + b"\n"
                for i in range(50)
            )
        )
        assert [client.read()["id"] for _ in range(50)] == list(range(50))


def test_string_ids_and_crlf_line_endings_are_accepted(served: ServerLoop) -> None:
    with RpcClient(served.path) as client:
        client.send(b'{"jsonrpc":"2.0","id":"abc","method":"version"}\r\n')
        answer = client.read()
    assert answer["id"] == "abc"
    assert answer["result"]["version"] == "0.1.0"


def test_blank_lines_are_ignored(served: ServerLoop) -> None:
    with RpcClient(served.path) as client:
        client.send(b"\n\n  \n")
        assert client.call("pid")["result"] == {"pid": os.getpid(), "processes": []}


# =========================================================================== protocol errors


def test_malformed_json_gets_parse_error_and_the_connection_stays_open(
    served: ServerLoop,
) -> None:
    with RpcClient(served.path) as client:
        client.send(b'{"jsonrpc": "2.0", "method": "status", "id": 1\n')
        answer = client.read()
        assert answer["id"] is None
        assert answer["error"]["code"] == ErrorCode.PARSE_ERROR
        assert client.call("pid")["result"]["pid"] == os.getpid()


def test_invalid_utf8_is_a_parse_error(served: ServerLoop) -> None:
    with RpcClient(served.path) as client:
        client.send(b'{"jsonrpc":"2.0","id":1,"method":"st\xffatus"}\n')
        assert client.read()["error"]["code"] == ErrorCode.PARSE_ERROR


def _msg(method: Any = "status", params: Any = None, **extra: Any) -> dict[str, Any]:
    message = {"jsonrpc": "2.0", "id": 7, "method": method, **extra}
    if params is not None:
        message["params"] = params
    return message


@pytest.mark.parametrize(
    ("message", "code"),
    [
        (_msg("status", {"names": "web"}), ErrorCode.INVALID_PARAMS),
        (_msg("start", {"names": [1]}), ErrorCode.INVALID_PARAMS),
        (_msg("start", {"names": ["a"], "x": 1}), ErrorCode.INVALID_PARAMS),
        (_msg("start", {"names": ["a"], "wait": "yes"}), ErrorCode.INVALID_PARAMS),
        (_msg("tail", {"name": "a", "bytes": "9"}), ErrorCode.INVALID_PARAMS),
        (_msg("status", [1, 2]), ErrorCode.INVALID_PARAMS),
        (_msg("status", jsonrpc="1.0"), ErrorCode.INVALID_REQUEST),
        (_msg(5), ErrorCode.INVALID_REQUEST),
        (_msg("status", extra=True), ErrorCode.INVALID_REQUEST),
        ({"jsonrpc": "2.0", "id": 7}, ErrorCode.INVALID_REQUEST),
    ],
)
def test_wrong_types_get_the_matching_error(
    served: ServerLoop, message: dict[str, Any], code: int
) -> None:
    with RpcClient(served.path) as client:
        client.send(json.dumps(message).encode() + b"\n")
        answer = client.read()
        assert answer["error"]["code"] == code, answer
        assert answer["id"] == 7
        assert client.call("pid")["result"]  # still served


def test_unknown_method_is_method_not_found(served: ServerLoop) -> None:
    with RpcClient(served.path) as client:
        answer = client.call("frobnicate")
    assert answer["error"]["code"] == ErrorCode.METHOD_NOT_FOUND
    assert "frobnicate" in answer["error"]["message"]


def test_invalid_params_carry_the_validation_message(served: ServerLoop) -> None:
    with RpcClient(served.path) as client:
        answer = client.call("signal", {"signal": "NOPE", "names": ["web"]})
    error = answer["error"]
    assert error["code"] == ErrorCode.INVALID_PARAMS
    assert "unknown signal 'NOPE'" in error["message"]
    assert error["data"] == ["signal: unknown signal 'NOPE'"]


def test_batch_requests_are_refused(served: ServerLoop) -> None:
    with RpcClient(served.path) as client:
        client.send(b'[{"jsonrpc":"2.0","id":1,"method":"pid"}]\n')
        answer = client.read()
    assert answer["error"]["code"] == ErrorCode.INVALID_REQUEST
    assert "batch" in answer["error"]["message"]


def test_oversized_line_gets_request_too_large_and_the_connection_closes(
    sock_path: Path,
) -> None:
    with ServerLoop(sock_path, max_line=4096) as loop, RpcClient(sock_path) as client:
        client.send(b'{"jsonrpc":"2.0","id":1,"method":"status","params":{"names":["')
        client.send(b"x" * 8192)  # no newline yet: must not be buffered without bound
        messages = client.read_until_eof()
        assert [m["error"]["code"] for m in messages] == [ErrorCode.REQUEST_TOO_LARGE]
        assert loop.call(lambda: loop.server.connection_count if loop.server else -1) == 0
        with RpcClient(sock_path) as other:
            assert other.call("pid")["result"]  # the server is fine
    assert loop.error is None


def test_oversized_complete_line_is_refused_too(sock_path: Path) -> None:
    with ServerLoop(sock_path, max_line=1024) as loop, RpcClient(sock_path) as client:
        client.request("status", {"names": ["x" * 2000]})
        messages = client.read_until_eof()
        assert [m["error"]["code"] for m in messages] == [ErrorCode.REQUEST_TOO_LARGE]
    assert loop.error is None


def test_half_written_request_completes_later(served: ServerLoop) -> None:
    with RpcClient(served.path) as client:
        client.send(b'{"jsonrpc":"2.0","id":3,')
        # The server has read the fragment and queued nothing for it.
        wait_until(lambda: served.call(lambda: served.seen["Connection"]) >= 1)
        assert served.call(lambda: len(served.handler.requests)) == 0
        client.send(b'"method":"pid"}\n')
        assert client.read() == {
            "jsonrpc": "2.0",
            "id": 3,
            "result": {"pid": os.getpid(), "processes": []},
        }


def test_handler_exception_becomes_internal_error(served: ServerLoop) -> None:
    served.call(lambda: served.handler.raise_on.add("version"))
    with RpcClient(served.path) as client:
        answer = client.call("version")
        assert answer["error"]["code"] == ErrorCode.INTERNAL_ERROR
        assert "fake failure" in answer["error"]["message"]
        assert client.call("pid")["result"]
    assert served.events("command_failed")


# =========================================================================== notifications


def test_notification_request_runs_without_an_answer(served: ServerLoop) -> None:
    with RpcClient(served.path) as client:
        client.send(b'{"jsonrpc":"2.0","method":"shutdown"}\n')
        client.send(b'{"jsonrpc":"2.0","method":"nope"}\n')  # bad notification: silent
        assert client.call("pid")["id"] == 1  # the very next message is this answer
        assert served.call(lambda: served.handler.shutdown_requested)


def test_fire_and_forget_shutdown_runs_after_the_client_left(served: ServerLoop) -> None:
    with RpcClient(served.path) as client:
        client.send(b'{"jsonrpc":"2.0","method":"shutdown"}\n')
    wait_until(lambda: served.call(lambda: served.handler.shutdown_requested))


def test_tail_follow_streams_output_notifications(served: ServerLoop) -> None:
    served.call(lambda: served.handler.output.update({("web:0", "stdout"): "hello\n"}))
    with RpcClient(served.path) as client:
        answer = client.call("tail", {"name": "web:0", "follow": True})
        assert answer["result"] == {"name": "web:0", "stream": "stdout", "data": "hello\n"}
        served.call(lambda: served.handler.push_output("web:0", "stdout", "more\n"))
        assert client.read() == {
            "jsonrpc": "2.0",
            "method": "output",
            "params": {"name": "web:0", "stream": "stdout", "data": "more\n"},
        }
    # Once the client is gone the follower reports it and is dropped.
    wait_until(lambda: served.call(lambda: served.handler.followers[0].closed))
    served.call(lambda: served.handler.push_output("web:0", "stdout", "x"))
    assert served.call(lambda: served.handler.followers) == []


# =========================================================================== delayed answers


def test_delayed_answer_while_other_clients_are_served(served: ServerLoop) -> None:
    served.call(lambda: setattr(served.handler, "hold", True))
    with RpcClient(served.path) as waiting:
        waiting.request("start", {"names": ["web"]})
        wait_until(lambda: held_count(served) == 1)
        served.call(lambda: setattr(served.handler, "hold", False))
        for _ in range(5):
            with RpcClient(served.path) as other:
                assert other.call("status")["result"]
        served.call(served.handler.release)
        answer = waiting.read()
    assert answer["id"] == 1
    assert [r["name"] for r in answer["result"]] == ["web:0", "web:1"]


def test_client_that_disconnects_before_its_answer(served: ServerLoop) -> None:
    served.call(lambda: setattr(served.handler, "hold", True))
    with RpcClient(served.path) as client:
        client.request("start", {"names": ["web:0"]})
        wait_until(lambda: held_count(served) == 1)
    responder = served.call(lambda: served.handler.held[0][1])
    wait_until(lambda: served.call(lambda: responder.closed), describe="responder closed")
    served.call(lambda: setattr(served.handler, "hold", False))
    assert served.call(served.handler.release) == 1  # answering a gone client: no-op
    assert served.call(lambda: served.server.connection_count if served.server else -1) == 0
    with RpcClient(served.path) as other:
        assert other.call("pid")["result"]


def test_half_closed_client_still_gets_its_answers(served: ServerLoop) -> None:
    """Like `socat`: send, shut down the sending side, then read the answers."""
    served.call(lambda: setattr(served.handler, "hold", True))
    with RpcClient(served.path) as client:
        client.request("start", {"names": ["web:0"]})
        client.request("pid")
        client.sock.shutdown(socket.SHUT_WR)
        wait_until(lambda: held_count(served) == 2)
        assert served.call(lambda: served.handler.held[0][1].closed) is False
        served.call(served.handler.release)
        messages = client.read_until_eof()  # closed once everything is answered
    assert [m["id"] for m in messages] == [1, 2]


def test_answering_twice_is_a_logged_no_op(served: ServerLoop) -> None:
    served.call(lambda: setattr(served.handler, "hold", True))
    with RpcClient(served.path) as client:
        client.request("pid")
        wait_until(lambda: held_count(served) == 1)

        def answer_twice() -> None:
            _, responder = served.handler.held.pop()
            responder.result(PidResult(pid=1))
            responder.error(ErrorCode.BAD_STATE, "second answer")

        served.call(answer_twice)
        assert client.read()["result"] == {"pid": 1, "processes": []}
        served.call(lambda: setattr(served.handler, "hold", False))
        assert client.call("pid")["id"] == 2  # nothing else came in between
    assert served.events("answered_twice")


def test_unserializable_result_becomes_internal_error(served: ServerLoop) -> None:
    served.call(lambda: setattr(served.handler, "hold", True))
    with RpcClient(served.path) as client:
        client.request("pid")
        wait_until(lambda: held_count(served) == 1)
        served.call(lambda: served.handler.held.pop()[1].result(object()))
        assert client.read()["error"]["code"] == ErrorCode.INTERNAL_ERROR


# =========================================================================== slow and many clients


def test_client_that_never_reads_is_dropped_while_notifications_stream(
    sock_path: Path,
) -> None:
    with (
        ServerLoop(sock_path, max_output=256 * 1024) as loop,
        RpcClient(sock_path) as reader,
        RpcClient(sock_path) as sleeper,
    ):
        for client in (reader, sleeper):
            assert "result" in client.call("tail", {"name": "web:0", "follow": True})
        chunk = "x" * 16384
        # `reader` reads everything; `sleeper` never does, so its output piles up.
        for _ in range(200):
            loop.call(lambda: loop.handler.push_output("web:0", "stdout", chunk))
            assert reader.read()["params"]["data"] == chunk
            if loop.call(lambda: len(loop.handler.followers)) == 1:
                break
        assert loop.call(lambda: len(loop.handler.followers)) == 1, "sleeper not dropped"
        assert loop.events("client_dropped")
        assert reader.call("pid")["result"]  # the loop is fine, the reader too
    assert loop.error is None


def test_200_concurrent_connections(served: ServerLoop) -> None:
    clients = [RpcClient(served.path) for _ in range(200)]
    try:
        for index, client in enumerate(clients):
            client.request("pid", request_id=index)
        for index, client in enumerate(clients):
            assert client.read() == {
                "jsonrpc": "2.0",
                "id": index,
                "result": {"pid": os.getpid(), "processes": []},
            }
        assert served.call(lambda: served.server.connection_count if served.server else 0) == 200
    finally:
        for client in clients:
            client.close()
    wait_until(
        lambda: served.call(lambda: served.server.connection_count if served.server else 0) == 0
    )


def test_idle_connections_cost_no_loop_iterations(served: ServerLoop) -> None:
    clients = [RpcClient(served.path) for _ in range(100)]
    try:
        for client in clients:
            assert client.call("pid")["result"]
        before = served.call(lambda: served.iterations)
        with RpcClient(served.path) as one:
            assert one.call("pid")["result"]
        # connect + request + doorbell + a few calls; nothing per idle connection
        assert served.call(lambda: served.iterations) - before < 15
    finally:
        for client in clients:
            client.close()


def test_max_connections_cap(sock_path: Path) -> None:
    with ServerLoop(sock_path, max_connections=3) as loop:
        clients = [RpcClient(sock_path) for _ in range(3)]
        try:
            for client in clients:
                assert client.call("pid")["result"]  # all three are accepted
            with RpcClient(sock_path) as extra:
                messages = extra.read_until_eof()
            assert messages == [
                {
                    "jsonrpc": "2.0",
                    "id": None,
                    "error": {
                        "code": ErrorCode.TOO_MANY_CONNECTIONS,
                        "message": "too many connections",
                    },
                }
            ]
            clients.pop().close()
            wait_until(
                lambda: loop.call(lambda: loop.server.connection_count if loop.server else 0) == 2
            )
            with RpcClient(sock_path) as again:
                assert again.call("pid")["result"]
        finally:
            for client in clients:
                client.close()
    assert loop.error is None


def test_out_of_fds_pauses_accepting_instead_of_spinning(sock_path: Path) -> None:
    """EMFILE on accept: the listener is paused, a 100 ms timer resumes it, and the
    clients waiting in the backlog are served once fds are available again."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with ServerLoop(sock_path) as loop:
        clients = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(3)]

        def exhaust_fds() -> None:
            lowest_free = os.open(os.devnull, os.O_RDONLY)
            os.close(lowest_free)
            resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))

        try:
            loop.call(exhaust_fds)
            for client in clients:
                client.settimeout(5)
                client.connect(os.fspath(sock_path))
            start_retries = loop.call(lambda: loop.seen["AcceptRetry"])
            wait_until(
                lambda: loop.call(lambda: loop.server is not None and not loop.server.accepting)
            )
            start_iterations = loop.call(lambda: loop.iterations)
            wait_until(lambda: loop.call(lambda: loop.seen["AcceptRetry"]) >= start_retries + 3)
            spent = loop.call(lambda: loop.iterations) - start_iterations
            assert spent < 40, f"{spent} loop iterations for 3 retries: the loop spins"
        finally:
            loop.call(lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)))
        assert loop.events("accept_paused")[0]["errno"] == errno.EMFILE
        for index, client in enumerate(clients):
            client.sendall(
                json.dumps({"jsonrpc": "2.0", "id": index, "method": "pid"}).encode() + b"\n"
            )
            assert json.loads(client.recv(4096))["id"] == index
            client.close()
    assert loop.error is None


# =========================================================================== robustness


def _json_values() -> st.SearchStrategy[Any]:
    scalars = (
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False)
        | st.text(max_size=20)
    )
    return st.recursive(
        scalars,
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.text(max_size=8), children, max_size=4)
        ),
        max_leaves=12,
    )


_requestish = st.fixed_dictionaries(
    {},
    optional={
        "jsonrpc": st.sampled_from(["2.0", "1.0"]) | _json_values(),
        "id": st.integers() | st.text(max_size=5) | _json_values(),
        "method": st.sampled_from(protocol.METHODS) | _json_values(),
        "params": _json_values()
        | st.fixed_dictionaries(
            {},
            optional={
                "names": st.lists(st.text(max_size=6), max_size=3) | _json_values(),
                "name": st.text(max_size=6) | _json_values(),
                "wait": st.booleans() | _json_values(),
                "signal": st.sampled_from(["TERM", "HUP", 9, "NOPE", -1]) | _json_values(),
                "bytes": st.integers() | _json_values(),
                "follow": st.booleans(),
                "stream": st.sampled_from(["stdout", "stderr", "both"]),
            },
        ),
    },
)
_garbage = (
    st.binary(max_size=3000)
    | _requestish.map(lambda m: json.dumps(m).encode())
    | _json_values().map(lambda v: json.dumps(v).encode())
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(garbage=st.lists(_garbage, min_size=1, max_size=4))
def test_random_input_never_crashes_the_server(served: ServerLoop, garbage: list[bytes]) -> None:
    with RpcClient(served.path) as client:
        client.send(b"\n".join(garbage) + b"\n")
        answer = client.response(client.request("pid", request_id="probe-after-garbage"))
    assert answer["result"] == {"pid": os.getpid(), "processes": []}
    assert served.error is None


# =========================================================================== the socket file


def test_socket_mode_and_parent_folders(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "supd.sock"
    with ServerLoop(path) as loop:
        assert stat.S_ISSOCK(path.stat().st_mode)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o700
        assert stat.S_IMODE((tmp_path / "a" / "b").stat().st_mode) == 0o700
    assert loop.error is None
    assert not path.exists(), "close() must remove the socket it created"


def test_socket_mode_and_group_are_applied(sock_path: Path) -> None:
    with ServerLoop(sock_path, mode=0o660, group="nogroup"):
        st_ = sock_path.stat()
        assert stat.S_IMODE(st_.st_mode) == 0o660
        assert st_.st_gid == 65534


def test_unknown_group_fails_open(sock_path: Path) -> None:
    with pytest.raises(SocketUnusable, match="unknown group 'no-such-group-here'"):
        ServerLoop(sock_path, group="no-such-group-here").start()


def test_stale_socket_is_replaced(sock_path: Path) -> None:
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(os.fspath(sock_path))
    dead.close()  # the file stays, nobody listens: what a killed daemon leaves
    with ServerLoop(sock_path) as loop, RpcClient(sock_path) as client:
        assert client.call("pid")["result"]
    assert loop.events("stale_socket_removed")


def test_live_socket_is_refused_with_already_running(served: ServerLoop) -> None:
    selector: Selector[Any] = Selector()
    with selector:
        second = ControlServer(selector, FakeDaemon(), path=served.path)
        with pytest.raises(AlreadyRunning) as caught:
            second.open()
        second.close()
    assert caught.value.pid == os.getpid()
    assert caught.value.path == served.path
    assert str(os.getpid()) in str(caught.value)
    assert str(served.path) in str(caught.value)
    with RpcClient(served.path) as client:  # the first one is untouched
        assert client.call("pid")["result"]


def test_a_file_that_is_not_a_socket_is_left_alone(sock_path: Path) -> None:
    sock_path.write_text("precious")
    with pytest.raises(SocketUnusable, match="it exists and is not a socket"):
        ServerLoop(sock_path).start()
    assert sock_path.read_text() == "precious"


def test_socket_activation_serves_the_given_fd(sock_path: Path) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(os.fspath(sock_path))
    listener.listen()
    with ServerLoop(sock_path, listen_fd=listener.detach()) as loop, RpcClient(sock_path) as client:
        assert client.call("pid")["result"]
    assert loop.error is None
    assert sock_path.exists(), "a socket we did not create is not ours to remove"


def test_control_tags_are_recognised() -> None:
    from supd.control import AcceptRetry, Connection, Doorbell, Listener

    for tag in (Listener(), Connection(1), Doorbell(), AcceptRetry()):
        assert isinstance(tag, ControlTag)
        assert ControlServer.owns(tag)
    assert not ControlServer.owns(object())


# =========================================================================== authorization


@contextlib.contextmanager
def traversable_socket_dir() -> Iterator[Path]:
    """A folder `nobody` can reach (pytest's tmp_path is under a 0700 folder)."""
    folder = Path(tempfile.mkdtemp(prefix="supd-test-", dir="/tmp"))
    try:
        folder.chmod(0o755)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


NOBODY_CLIENT = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(5)
s.connect(sys.argv[1])
try:
    s.sendall(b'{"jsonrpc":"2.0","id":1,"method":"pid"}\\n')
except BrokenPipeError:
    pass  # refused before we could send: its answer is still there to read
data = b""
while not data.endswith(b"\\n"):  # one answer, or the refusal and EOF
    try:
        chunk = s.recv(4096)
    except ConnectionResetError:
        break
    if not chunk:
        break
    data += chunk
print(json.dumps([json.loads(line) for line in data.splitlines()]))
"""


def run_as_nobody(path: Path) -> list[dict[str, Any]]:
    done = subprocess.run(
        [os.fspath(SYSTEM_PYTHON), "-I", "-c", NOBODY_CLIENT, os.fspath(path)],
        user="nobody",
        group="nogroup",
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert done.returncode == 0, done.stderr
    result: list[dict[str, Any]] = json.loads(done.stdout)
    return result


needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not SYSTEM_PYTHON.exists(), reason="needs root and /usr/bin/python3"
)


@needs_root
def test_unauthorized_uid_is_refused() -> None:
    with traversable_socket_dir() as folder:
        path = folder / "supd.sock"
        with ServerLoop(path, mode=0o666) as loop:
            messages = run_as_nobody(path)
            assert messages == [
                {"jsonrpc": "2.0", "id": None, "error": {"code": 3, "message": "permission denied"}}
            ]
            refused = loop.events("client_refused")
            assert refused and refused[0]["uid"] == 65534 and refused[0]["pid"] > 0
            assert loop.call(lambda: loop.handler.requests) == []
        assert loop.error is None


@needs_root
def test_group_members_are_served() -> None:
    with traversable_socket_dir() as folder:
        path = folder / "supd.sock"
        with ServerLoop(path, mode=0o660, group="nogroup") as loop:
            messages = run_as_nobody(path)
        assert messages == [
            {"jsonrpc": "2.0", "id": 1, "result": {"pid": os.getpid(), "processes": []}}
        ]
        assert loop.error is None


# =========================================================================== abuse


def test_a_connection_without_a_request_is_closed_after_the_timeout(sock_path: Path) -> None:
    with ServerLoop(sock_path, request_timeout=0.3) as loop:
        silent = RpcClient(sock_path)
        slow = RpcClient(sock_path)
        garbage = RpcClient(sock_path)
        try:
            slow.send(b'{"jsonrpc":"2.0","id":1,')  # slowloris: never finishes the line
            garbage.send(b"nonsense\n")  # answered, but it is not a request
            assert garbage.read()["error"]["code"] == ErrorCode.PARSE_ERROR
            for client in (silent, slow, garbage):
                assert client.read_until_eof() == []  # closed by the server
            dropped = wait_until(lambda: (d := loop.events("client_dropped")) and len(d) == 3 and d)
            assert {e["reason"] for e in dropped} == {"no complete request within 0.3 s"}
        finally:
            for client in (silent, slow, garbage):
                client.close()
    assert loop.error is None


def test_a_served_connection_may_stay_idle_and_a_new_line_gets_the_timeout(
    sock_path: Path,
) -> None:
    with ServerLoop(sock_path, request_timeout=0.3) as loop:
        with RpcClient(sock_path) as follower, RpcClient(sock_path) as stalled:
            tail = follower.request("tail", {"name": "web:0", "stream": "stdout", "follow": True})
            assert "result" in follower.response(tail)
            assert stalled.call("pid")["result"]
            stalled.send(b'{"jsonrpc"')  # a second request, never finished
            assert stalled.read_until_eof() == []
            # The follower outlived several timeouts and still streams.
            wait_until(lambda: loop.call(lambda: loop.handler.push_output("web:0", "stdout", "hi")))
            assert follower.read()["params"]["data"] == "hi"
            assert follower.call("pid")["result"]
        wait_until(lambda: loop.events("client_dropped"))
        assert [e["conn"] for e in loop.events("client_dropped")] == [2]
    assert loop.error is None


def test_no_wake_up_for_a_deadline_nobody_has_any_more(sock_path: Path) -> None:
    """Served connections (idle, or gone) leave no deadline behind: the loop stays
    asleep past the timeout instead of waking once for nothing."""
    with ServerLoop(sock_path, request_timeout=0.2) as loop, RpcClient(sock_path) as idle:
        assert idle.call("pid")["result"]
        with RpcClient(sock_path) as gone:
            assert gone.call("pid")["result"]
        wait_until(lambda: loop.call(lambda: loop.server.connection_count) == 1)
        woken = loop.call(lambda: (loop.iterations, dict(loop.seen)))
        time.sleep(0.6)  # three timeouts: the test's subject is that nothing happens
        after = loop.call(lambda: (loop.iterations, dict(loop.seen)))
        assert after[0] == woken[0] + 1, str((woken, after))  # (only our own call)
        assert idle.call("pid")["result"]  # and the idle one was not dropped
    assert loop.error is None


NOBODY_HOLDER = """
import json, socket, sys
held, answers = [], []
for _ in range(int(sys.argv[2])):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(sys.argv[1])
    try:
        s.sendall(b'{"jsonrpc":"2.0","id":1,"method":"pid"}\\n')
    except BrokenPipeError:
        pass
    answers.append(json.loads(s.makefile("rb").readline()))
    held.append(s)
print(json.dumps(answers), flush=True)
sys.stdin.read()  # hold the connections until the test closes our stdin
"""


@needs_root
def test_one_uid_gets_a_share_of_the_cap_and_root_always_a_slot() -> None:
    with traversable_socket_dir() as folder:
        path = folder / "supd.sock"
        with ServerLoop(path, mode=0o660, group="nogroup", max_connections=16) as loop:
            holder = subprocess.Popen(
                [os.fspath(SYSTEM_PYTHON), "-I", "-c", NOBODY_HOLDER, os.fspath(path), "5"],
                user="nobody",
                group="nogroup",
                extra_groups=[],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                assert holder.stdout is not None
                answers = json.loads(holder.stdout.readline())
                assert [a.get("result") for a in answers[:4]] == [
                    {"pid": os.getpid(), "processes": []}
                ] * 4
                assert answers[4]["error"] == {
                    "code": ErrorCode.TOO_MANY_CONNECTIONS,
                    "message": "too many connections from uid 65534 (at most 4)",
                }
                # Root fills every slot left, down to the last one.
                clients = [RpcClient(path) for _ in range(12)]
                try:
                    for client in clients:
                        assert client.call("pid")["result"]
                    with RpcClient(path) as extra:
                        refused = extra.read_until_eof()
                    assert refused[0]["error"]["message"] == "too many connections"
                finally:
                    for client in clients:
                        client.close()
            finally:
                holder.kill()
                holder.wait()
        assert loop.error is None


@needs_root
def test_the_last_slots_are_kept_for_root() -> None:
    with traversable_socket_dir() as folder:
        path = folder / "supd.sock"
        # A cap of 16 keeps 2 slots for root (the default); nobody may take all the rest.
        options = {"max_connections": 16, "max_per_uid": 16}
        with ServerLoop(path, mode=0o660, group="nogroup", **options) as loop:
            holder = subprocess.Popen(
                [os.fspath(SYSTEM_PYTHON), "-I", "-c", NOBODY_HOLDER, os.fspath(path), "15"],
                user="nobody",
                group="nogroup",
                extra_groups=[],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                assert holder.stdout is not None
                answers = json.loads(holder.stdout.readline())
                served = [a for a in answers if "result" in a]
                assert len(served) == 14  # 16 minus the 2 kept for root
                with RpcClient(path) as root1, RpcClient(path) as root2:
                    assert root1.call("pid")["result"] and root2.call("pid")["result"]
            finally:
                holder.kill()
                holder.wait()
        assert loop.error is None


def test_a_half_closed_client_waiting_for_an_answer_outlives_the_timeout(
    sock_path: Path,
) -> None:
    with ServerLoop(sock_path, request_timeout=0.2) as loop:
        loop.call(lambda: setattr(loop.handler, "hold", True))
        with RpcClient(sock_path) as client:
            client.request("pid", request_id=7)
            client.send(b'{"jsonrpc": "2.0", "id": 8')  # never finished...
            client.sock.shutdown(socket.SHUT_WR)  # ...because the client is done sending
            wait_until(lambda: held_count(loop) == 1)
            with RpcClient(sock_path) as silent:  # connected later, so its deadline is too
                assert silent.read_until_eof() == []  # the timeout closed it
            assert loop.call(loop.handler.release) == 1
            assert client.read_until_eof() == [
                {"jsonrpc": "2.0", "id": 7, "result": {"pid": os.getpid(), "processes": []}}
            ]
        dropped = wait_until(lambda: loop.events("client_dropped"))
        assert [e["conn"] for e in dropped] == [2]  # the silent one only
    assert loop.error is None
