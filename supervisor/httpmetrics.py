"""`GET /metrics` over HTTP/1.1, from the daemon's loop: a minimal, read-only responder.

Serves one thing, the OpenMetrics text of `metrics.py`, at one path, on the address of
`[supervisor] metrics` (TCP "HOST:PORT", or a UNIX socket path). No framework and no
thread: the listener and each connection are selector handles under this module's tags
(`HttpTag`), routed by the daemon to `on_ready()`, like the control server's.

Every response closes its connection (`Connection: close`), which keeps the state of a
connection to "reading the request" then "writing the answer". The limits follow the
control socket's: a request (line and headers) larger than `max_request` gets 431 and
is closed; a connection that has not sent a complete request within `timeout` seconds
is closed (slowloris); beyond `max_connections` a new connection gets 503 at once.
Only GET and HEAD are answered (405 otherwise, with `Allow`); any path other than
/metrics (a query string is ignored) gets 404. A request body is never read.

A TCP address that is not loopback is served only because the operator wrote it: the
log says so once, at start, with a warning. Must not import `daemon`.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
import stat
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from . import daemonlog
from .control import SocketUnusable
from .metrics import CONTENT_TYPE
from .selector import Event, ReadyKey, Selector

MAX_REQUEST: Final = 8192  # request line and headers
TIMEOUT_S: Final = 10.0
MAX_CONNECTIONS: Final = 64
ACCEPTS_PER_WAKEUP: Final = 64
ACCEPT_RETRY_S: Final = 0.1
PATH: Final = "/metrics"

_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}


class HttpTag:
    """Base of this server's selector tags."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class HttpListener(HttpTag):
    pass


@dataclass(frozen=True, slots=True)
class HttpConnection(HttpTag):
    conn_id: int


@dataclass(frozen=True, slots=True)
class HttpTimer(HttpTag):
    """The earliest request deadline (or the end of an accept pause) has come."""


class _Conn:
    __slots__ = ("deadline", "inbuf", "outbuf", "sock", "writing")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.inbuf = bytearray()
        self.outbuf = b""
        self.deadline = deadline
        self.writing = False


def response(status: int, body: bytes = b"", *, head: bool = False, **headers: str) -> bytes:
    """One HTTP/1.1 response that closes the connection."""
    lines = [f"HTTP/1.1 {status} {_REASONS[status]}"]
    fields = {
        "Content-Type": "text/plain; charset=utf-8",
        **{name.replace("_", "-"): value for name, value in headers.items()},
        "Content-Length": str(len(body)),
        "Connection": "close",
    }
    lines += [f"{name}: {value}" for name, value in fields.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (b"" if head else body)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class MetricsServer:
    """The HTTP listener and its connections. Use it from the loop's thread only."""

    def __init__(
        self,
        selector: Selector[Any],
        address: str,
        render: Callable[[], bytes],
        *,
        mode: int = 0o600,
        group: str | None = None,
        max_request: int = MAX_REQUEST,
        timeout: float = TIMEOUT_S,
        max_connections: int = MAX_CONNECTIONS,
        log: Any = None,
    ) -> None:
        self.configured = address
        self._selector = selector
        self._render = render
        self._mode = mode
        self._group = group
        self._max_request = max_request
        self._timeout = timeout
        self._max_connections = max_connections
        self._log: Any = (log if log is not None else daemonlog.get_logger()).bind(
            component="metrics"
        )
        self._listener: socket.socket | None = None
        self._timer: int | None = None
        self._timer_due: float | None = None
        self._paused_until: float | None = None
        self._conns: dict[int, _Conn] = {}
        self._deadlines: deque[tuple[float, int]] = deque()
        self._next_id = 1
        self._unix_path: Path | None = None
        self.bound: str = address  # the address as bound (the port the OS chose for :0)

    # -- lifecycle ----------------------------------------------------------------

    def open(self) -> None:
        """Listen; raises SocketUnusable with a message for the user."""
        try:
            listener = self._bind()
        except SocketUnusable:
            raise
        except OSError as exc:
            raise SocketUnusable(
                f"cannot serve metrics on {self.configured}: {exc.strerror or exc}"
            ) from exc
        listener.setblocking(False)
        self._listener = listener
        self._selector.register_handle(listener.fileno(), Event.READ, HttpListener())
        self._timer = self._selector.register_timer(1, True, HttpTimer())
        self._timer_due = time.monotonic()
        self._log.info("metrics_listening", address=self.bound, path=PATH)

    def _bind(self) -> socket.socket:
        if "/" in self.configured:
            return self._bind_unix(Path(self.configured))
        host, _, port = self.configured.rpartition(":")
        host = host[1:-1] if host.startswith("[") else host
        if host == "localhost":
            host = "127.0.0.1"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, int(port)))
            sock.listen(socket.SOMAXCONN)
        except BaseException:
            sock.close()
            raise
        bound_port = sock.getsockname()[1]
        self.bound = (
            f"[{host}]:{bound_port}" if family == socket.AF_INET6 else f"{host}:{bound_port}"
        )
        if not is_loopback(host):
            self._log.warning(
                "metrics_not_loopback",
                address=self.bound,
                reason="served on a non-loopback address because the config says so",
            )
        return sock

    def _bind_unix(self, path: Path) -> socket.socket:
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(path)
            if not stat.S_ISSOCK(st.st_mode):
                raise SocketUnusable(f"cannot serve metrics on {path}: it exists, not a socket")
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(os.fspath(path))
                except OSError:
                    os.unlink(path)  # stale: nobody listens
                else:
                    raise SocketUnusable(f"cannot serve metrics on {path}: it is in use")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o777 & ~self._mode)
        try:
            sock.bind(os.fspath(path))
            if self._group is not None:
                import grp

                try:
                    gid = grp.getgrnam(self._group).gr_gid
                except KeyError:
                    gid = int(self._group)
                os.chown(path, -1, gid, follow_symlinks=False)
            sock.listen(socket.SOMAXCONN)
        except BaseException:
            sock.close()
            raise
        finally:
            os.umask(old_umask)
        self._unix_path = path
        return sock

    def close(self) -> None:
        for conn_id in list(self._conns):
            self._close(conn_id)
        if self._timer is not None:
            with contextlib.suppress(KeyError):
                self._selector.unregister(self._timer)
            self._timer = None
        if self._listener is not None:
            with contextlib.suppress(KeyError):
                self._selector.unregister(self._listener.fileno())
            self._listener.close()
            self._listener = None
        if self._unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._unix_path)
            self._unix_path = None

    @property
    def connection_count(self) -> int:
        return len(self._conns)

    # -- dispatch -----------------------------------------------------------------

    @staticmethod
    def owns(data: object) -> bool:
        return isinstance(data, HttpTag)

    def on_ready(self, key: ReadyKey[Any]) -> None:
        match key.data:
            case HttpConnection(conn_id=conn_id):
                if conn_id in self._conns:
                    self._ready(conn_id, key.events)
            case HttpListener():
                self._accept()
            case HttpTimer():
                self._timer_due = None
                self._timer_fired()

    # -- accepting ----------------------------------------------------------------

    def _accept(self) -> None:
        assert self._listener is not None
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue
                # Out of fds: pause rather than spin on a listener that stays readable.
                self._log.warning("metrics_accept_paused", error=exc.strerror)
                self._selector.update_handle(self._listener.fileno(), Event(0))
                self._paused_until = time.monotonic() + ACCEPT_RETRY_S
                self._arm()
                return
            sock.setblocking(False)
            if len(self._conns) >= self._max_connections:
                with contextlib.suppress(OSError):  # a fresh socket takes a short answer
                    sock.send(response(503, b"too many connections\n"), socket.MSG_NOSIGNAL)
                sock.close()
                self._log.warning("metrics_client_refused", reason="too many connections")
                continue
            conn_id = self._next_id
            self._next_id += 1
            conn = _Conn(sock, time.monotonic() + self._timeout)
            self._selector.register_handle(sock.fileno(), Event.READ, HttpConnection(conn_id))
            self._conns[conn_id] = conn
            self._deadlines.append((conn.deadline, conn_id))
            if self._timer_due is None:
                self._arm()

    # -- deadlines ----------------------------------------------------------------

    def _arm(self) -> None:
        first = self._deadlines[0][0] if self._deadlines else None
        dues = [due for due in (self._paused_until, first) if due is not None]
        if not dues or self._timer is None:
            self._timer_due = None
            return
        due = min(dues)
        delay_ms = max(1, int((due - time.monotonic()) * 1000) + 1)
        self._selector.rearm_timer(self._timer, delay_ms, True)
        self._timer_due = due

    def _timer_fired(self) -> None:
        now = time.monotonic()
        if self._paused_until is not None and self._paused_until <= now:
            self._paused_until = None
            if self._listener is not None:
                self._selector.update_handle(self._listener.fileno(), Event.READ)
        while self._deadlines and self._deadlines[0][0] <= now:
            due, conn_id = self._deadlines.popleft()
            conn = self._conns.get(conn_id)
            if conn is not None and conn.deadline == due:
                # No complete request in time, or its answer not read in time.
                self._log.info("metrics_client_dropped", reason="timeout", writing=conn.writing)
                self._close(conn_id)
        self._arm()

    # -- one connection -----------------------------------------------------------

    def _ready(self, conn_id: int, events: Event) -> None:
        conn = self._conns[conn_id]
        if conn.writing:
            if events & (Event.WRITE | Event.ERROR):
                self._flush(conn_id, conn)
            return
        try:
            chunk = conn.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn_id)
            return
        if not chunk:
            self._close(conn_id)  # gone before its request was complete
            return
        conn.inbuf += chunk
        end = conn.inbuf.find(b"\r\n\r\n")
        if end < 0:
            end = conn.inbuf.find(b"\n\n")
        if (end < 0 and len(conn.inbuf) > self._max_request) or end > self._max_request:
            self._respond(conn_id, conn, response(431, b"request too large\n"))
        elif end >= 0:
            self._respond(conn_id, conn, self._answer(bytes(conn.inbuf[:end])))

    def _answer(self, head: bytes) -> bytes:
        request_line = head.split(b"\n", 1)[0].rstrip(b"\r")
        parts = request_line.split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            return response(400, b"bad request\n")
        method, target, version = parts
        if version not in (b"HTTP/1.0", b"HTTP/1.1"):
            return response(505, b"HTTP/1.0 or HTTP/1.1 only\n")
        if method not in (b"GET", b"HEAD"):
            return response(405, b"only GET\n", Allow="GET, HEAD")
        if target.split(b"?", 1)[0] != PATH.encode():
            return response(404, b"only /metrics is served here\n")
        try:
            body = self._render()
        except Exception:
            self._log.exception("metrics_render_failed")
            return response(500, b"internal error\n")
        return response(200, body, head=method == b"HEAD", Content_Type=CONTENT_TYPE)

    def _respond(self, conn_id: int, conn: _Conn, data: bytes) -> None:
        conn.writing = True
        conn.inbuf.clear()
        conn.outbuf = data
        self._selector.update_handle(conn.sock.fileno(), Event.WRITE)
        self._flush(conn_id, conn)

    def _flush(self, conn_id: int, conn: _Conn) -> None:
        try:
            sent = conn.sock.send(conn.outbuf, socket.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn_id)
            return
        conn.outbuf = conn.outbuf[sent:]
        if not conn.outbuf:
            self._close(conn_id)

    def _close(self, conn_id: int) -> None:
        conn = self._conns.pop(conn_id)
        with contextlib.suppress(KeyError, OSError):
            self._selector.unregister(conn.sock.fileno())
        with contextlib.suppress(OSError):
            conn.sock.shutdown(socket.SHUT_WR)
            # Unread input (a body, a pipelined request) would turn close() into a
            # reset that can destroy the answer still in flight: read it away.
            conn.sock.recv(1 << 16)
        conn.sock.close()
