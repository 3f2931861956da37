"""Ready and health probes as non-blocking I/O the daemon drives from its loop.

A socket probe is a small state machine over one non-blocking socket: `TcpProbe`
connects (ready when the connect completes), `HttpProbe` connects, writes a minimal
HTTP/1.1 GET and reads until the status line (2xx and 3xx pass). The daemon registers
`fd` for `wants` (WRITE while connecting or sending, READ while waiting for the answer),
calls `on_ready()` when the selector says so, and gets a `Verdict` or None (not done
yet, maybe with new `wants`). Nothing here blocks: no DNS lookup happens (the target
must be an address, or "localhost"), and the probe's timeout is the fleet's timer, not
this module's. `close()` is always called, whatever happened.

The `log` kind is `LineMatcher`: scans a program's own output, split into lines across
chunks, only until the first match. The `file` kind is one `os.path.exists`.

Imports the standard library and config's parsers only.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import socket
import struct
from dataclasses import dataclass

from .settings import parse_host_port, parse_http_url

# How much of an HTTP answer is read to find the status line.
MAX_STATUS_LINE = 4096
# How much of an unterminated line the log matcher keeps (a line longer than this is
# matched in pieces).
MAX_LINE = 64 * 1024
# struct linger {l_onoff = 1, l_linger = 0}: close() resets the connection.
_LINGER_RESET = struct.pack("ii", 1, 0)


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    message: str


@functools.lru_cache(maxsize=4096)
def _address(target: str) -> tuple[socket.AddressFamily, str, int]:
    """No resolver in the loop: an IP literal, or localhost as 127.0.0.1. Cached: the
    same few targets are probed every second."""
    host, port = parse_host_port(target)
    if host == "localhost":
        return socket.AF_INET, "127.0.0.1", port
    if ":" in host:
        return socket.AF_INET6, host, port
    return socket.AF_INET, host, port


def _error_text(code: int) -> str:
    return os.strerror(code).lower() if code else "failed"


class TcpProbe:
    """Ready when a non-blocking connect() completes."""

    def __init__(self, target: str, what: str | None = None) -> None:
        self.target = target
        family, address, port = _address(target)
        self.what = what or f"connect {target}"
        self.sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.setblocking(False)
        self.fd = self.sock.fileno()
        self.wants_write = True
        self.verdict: Verdict | None = None
        try:
            code = self.sock.connect_ex((address, port))
        except OSError as exc:  # an address the kernel refuses outright
            code = exc.errno or errno.EINVAL
        if code not in (0, errno.EINPROGRESS):
            self.verdict = Verdict(False, f"{self.what}: {_error_text(code)}")
        elif self._connected_already():
            # On loopback the handshake usually completes inside connect(): no need to
            # wait for the selector (one getpeername instead of register/select/unregister).
            self.verdict = self.connected()

    def _connected_already(self) -> bool:
        try:
            self.sock.getpeername()
        except OSError:
            return False  # ENOTCONN: still connecting
        return True

    def on_ready(self) -> Verdict | None:
        code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            return Verdict(False, f"{self.what}: {_error_text(code)}")
        return self.connected()

    def connected(self) -> Verdict | None:
        return Verdict(True, f"{self.what}: connected")

    def close(self) -> None:
        # Reset rather than FIN: a closed probe leaves no TIME_WAIT behind, so 1,000
        # checks a second cannot use up the ephemeral ports (HAProxy does the same).
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        self.sock.close()


class HttpProbe(TcpProbe):
    """Ready when a GET answers 2xx or 3xx: HTTP/1.1, `Connection: close`."""

    def __init__(self, url: str) -> None:
        host, port, path = parse_http_url(url)
        shown_host = f"[{host}]" if ":" in host else host
        self.request = (
            f"GET {path} HTTP/1.1\r\nHost: {shown_host}:{port}\r\n"
            "User-Agent: supd-probe\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        ).encode()
        self.answer = b""
        self.sending = False
        super().__init__(f"{shown_host}:{port}", f"GET {url}")

    def on_ready(self) -> Verdict | None:
        if not self.sending:
            return super().on_ready()
        if self.wants_write:
            return self._send()
        return self._receive()

    def connected(self) -> Verdict | None:
        self.sending = True
        return self._send()

    def _send(self) -> Verdict | None:
        try:
            sent = self.sock.send(self.request)
        except BlockingIOError:
            return None
        except OSError as exc:
            return Verdict(False, f"{self.what}: {_error_text(exc.errno or 0)}")
        self.request = self.request[sent:]
        if not self.request:
            self.wants_write = False
        return None

    def _receive(self) -> Verdict | None:
        try:
            data = self.sock.recv(MAX_STATUS_LINE)
        except BlockingIOError:
            return None
        except OSError as exc:
            return Verdict(False, f"{self.what}: {_error_text(exc.errno or 0)}")
        self.answer += data
        line, found, _ = self.answer.partition(b"\r\n")
        if not found and data and len(self.answer) < MAX_STATUS_LINE:
            return None
        match = re.match(rb"HTTP/\d(?:\.\d)? (\d{3})", line)
        if match is None:
            return Verdict(False, f"{self.what}: no HTTP status line in the answer")
        status = int(match[1])
        if 200 <= status < 400:
            return Verdict(True, f"{self.what}: {status}")
        return Verdict(False, f"{self.what}: {status}")


SocketProbe = TcpProbe | HttpProbe


def file_verdict(path: str) -> Verdict:
    if os.path.exists(path):
        return Verdict(True, f"file {path} exists")
    return Verdict(False, f"file {path}: no such file")


class LineMatcher:
    """Matches a program's output lines against a pattern, across chunk boundaries."""

    __slots__ = ("_partial", "pattern")

    def __init__(self, pattern: re.Pattern[bytes]) -> None:
        self.pattern = pattern
        self._partial = b""

    def feed(self, data: bytes) -> str | None:
        """The first matching line in `data` (decoded), or None."""
        text = self._partial + data
        lines = text.split(b"\n")
        self._partial = lines.pop()[-MAX_LINE:]
        for line in lines:
            if self.pattern.search(line):
                return line.decode(errors="replace").strip()
        return None  # a partial line waits for its end: "port 8" may yet be "port 8000"
