"""`GET /metrics` over HTTP/1.1, from the daemon's loop: a minimal, read-only responder.

Serves one thing, the OpenMetrics text of `metrics.py`, at one path, on the address of
`[supervisor] metrics` (TCP "HOST:PORT", or a UNIX socket path). No framework and no
thread: the listener and each connection are selector handles under this module's tags
(`HttpTag`), routed by the daemon to `on_ready()`, like the control server's.

Every response closes its connection (`Connection: close`), which keeps the state of a
connection to "reading the request" then "writing the answer". Accepting (in batches,
paused at EMFILE), the deadline and writing are `sockserver.StreamServer`'s, as for
the control server, so the limits follow the control socket's: a request (line and
headers) larger than `max_request` gets 431 and is closed; a connection that has not
sent a complete request, and read its answer, within `timeout` seconds is closed
(slowloris); beyond `max_connections` a new connection gets 503 at once.
Only GET and HEAD are answered (405 otherwise, with `Allow`); any path other than
/metrics (a query string is ignored) gets 404. A request body is never read.

A TCP address that is not loopback is served only because the operator wrote it: the
log says so once, at start, with a warning. Must not import `daemon`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from . import daemonlog
from .control import SocketUnusable
from .metrics import CONTENT_TYPE
from .selector import Event, Selector
from .sockserver import (
    AcceptRetryTag,
    Conn,
    ConnectionTag,
    DeadlineTag,
    ListenerTag,
    StreamServer,
    Tags,
    refuse,
)

MAX_REQUEST: Final = 8192  # request line and headers
TIMEOUT_S: Final = 10.0
MAX_CONNECTIONS: Final = 64
READ_CHUNK: Final = 4096
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
class HttpListener(HttpTag, ListenerTag):
    pass


@dataclass(frozen=True, slots=True)
class HttpConnection(HttpTag, ConnectionTag):
    pass


@dataclass(frozen=True, slots=True)
class HttpAcceptRetry(HttpTag, AcceptRetryTag):
    pass


@dataclass(frozen=True, slots=True)
class HttpTimeout(HttpTag, DeadlineTag):
    pass


_TAGS: Final = Tags(
    listener=HttpListener(),
    accept_retry=HttpAcceptRetry(),
    deadline=HttpTimeout(),
    connection=HttpConnection,
)


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


class MetricsServer(StreamServer[Conn]):
    """The HTTP listener and its connections. Use it from the loop's thread only.

    A connection's deadline covers reading the request and writing the answer: it is
    never cleared, only met by closing.
    """

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
        super().__init__(
            selector,
            _TAGS,
            request_timeout=timeout,
            log=(log if log is not None else daemonlog.get_logger()).bind(component="metrics"),
        )
        self.configured = address
        self._render = render
        self._mode = mode
        self._group = group
        self._max_request = max_request
        self._max_connections = max_connections
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
        try:
            self._listen(listener)
        except BaseException:
            self.close()
            raise
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
        super().close()
        if self._unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._unix_path)
            self._unix_path = None

    # -- dispatch -----------------------------------------------------------------

    @staticmethod
    def owns(data: object) -> bool:
        return isinstance(data, HttpTag)

    # -- accepting ----------------------------------------------------------------

    def _admit(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        if len(self._connections) >= self._max_connections:
            refuse(sock, response(503, b"too many connections\n"))
            self._log.warning("metrics_client_refused", reason="too many connections")
            return
        self._add(Conn(sock))

    def _deadline_missed(self, conn: Conn) -> None:
        # No complete request in time, or its answer not read in time.
        self._log.info("metrics_client_dropped", reason="timeout", writing=conn.closing)
        self._close(conn)

    # -- one connection -----------------------------------------------------------

    def _connection_ready(self, conn: Conn, events: Event) -> None:
        if conn.closing:  # the answer is being written
            if events & (Event.WRITE | Event.ERROR):
                self._flush(conn)
            return
        try:
            chunk = conn.sock.recv(READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if not chunk:
            self._close(conn)  # gone before its request was complete
            return
        conn.inbuf += chunk
        end = conn.inbuf.find(b"\r\n\r\n")
        if end < 0:
            end = conn.inbuf.find(b"\n\n")
        if (end < 0 and len(conn.inbuf) > self._max_request) or end > self._max_request:
            self._respond(conn, response(431, b"request too large\n"))
        elif end >= 0:
            self._respond(conn, self._answer(bytes(conn.inbuf[:end])))

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

    def _respond(self, conn: Conn, data: bytes) -> None:
        conn.inbuf.clear()  # a body or a pipelined request is never read
        conn.reading = False  # so a partial write waits for WRITE alone
        self._send(conn, data)
        self._close_after_output(conn)

    def _close(self, conn: Conn, problem: str | None = None) -> None:
        if not conn.closed:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_WR)
                # Unread input (a body, a pipelined request) would turn close() into a
                # reset that can destroy the answer still in flight: read it away.
                conn.sock.recv(1 << 16)
        super()._close(conn, problem)
