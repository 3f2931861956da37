"""The control server: supd's end of the control socket, inside the daemon's loop.

The server owns a UNIX stream socket, its client connections and a doorbell
(`SelectEvent`), and registers all of them with the daemon's selector under its own
tags (`Listener`, `Connection`, `Doorbell`, `AcceptRetry`, all `ControlTag`s). The
daemon routes every ready key whose data is a `ControlTag` to `on_ready()`; nothing
else is needed. Must not import `daemon`.

How a request travels:

    client bytes -> on_ready(Connection) -> split lines -> protocol.parse_request
        bad line  -> error answer at once (the connection stays open)
        good line -> (request, Responder) queued, doorbell rung
    doorbell -> on_ready(Doorbell) -> run_queued() -> handler.handle_command(...)
        -> responder.result()/error() now or later -> write buffer -> client

Commands run in `run_queued()` only, never while reading: the daemon sees each command
as one more event of its loop, after the read that produced it has finished.

Rules that keep one client from hurting the loop or the others (accepting, the
deadlines and buffered writing are `sockserver.StreamServer`'s, shared with the
metrics responder; what is said here of lines, uids and answers is this module's):

- Everything is non-blocking; each wake-up reads at most one chunk per connection and
  accepts at most a batch of clients, so a busy client or a connect storm cannot starve
  anything else (epoll is level-triggered: what is left is reported again).
- A line longer than `max_line` earns REQUEST_TOO_LARGE and the connection is closed;
  partial lines are never buffered beyond that.
- Output is buffered per connection; WRITE interest is registered only while there is
  pending output. A client whose pending output already exceeds `max_output` when more
  comes (it stopped reading, typically during `tail -f`) is dropped.
- Out of fds (EMFILE/ENFILE on accept), the listener is paused and a short oneshot
  timer resumes it, instead of spinning on a listener that stays readable.
- Idle connections cost nothing per loop iteration: nothing iterates over them.
- A connection must send a complete valid request within `request_timeout` (10 s) of
  connecting, and finish any later line within as long; one that doesn't is closed, so
  slowloris clients cannot hold the slots. A connection with nothing unfinished (a
  `tail -f` after its request) may stay as long as it likes. All deadlines share one
  timerfd, set for the earliest.
- Of `max_connections` (512), one unprivileged uid may hold a quarter; the last 16
  slots are for root and supd's own user only, so they always get in.

Disconnects and half-closes. A peer that closes its socket is dropped at once: its
responders become `closed`, pending operations go on (a `start` still starts), and
answers to them are silently discarded. A peer that only shuts down its sending side
(`socat` after its stdin ends) still gets the answers to what it sent: the connection
stays until they are written. The selector always watches EPOLLRDHUP, which is level-
triggered, so a half-closed connection is paused while it waits for answers, and is
dropped if it stops reading them (ERROR reported without WRITE).
"""

from __future__ import annotations

import contextlib
import errno
import grp
import json
import os
import pwd
import select
import socket
import stat
import struct
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

from . import daemonlog, protocol
from .protocol import ErrorCode, ErrorResponse, Request
from .selector import Event, ReadyKey, SelectEvent, Selector
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

READ_CHUNK: Final = 1 << 16  # bytes read per connection per wake-up
COMMANDS_PER_RING: Final = 64  # the rest ring the doorbell again
PROBE_TIMEOUT_S: Final = 1.0  # asking a live daemon on our path for its pid
REQUEST_TIMEOUT_S: Final = 10.0  # to send a first complete request, or finish a line
# Of the connection cap: what one unprivileged uid may hold, and what only root and
# supd's own user may use (so they always get in, whoever floods the socket).
UID_SHARE: Final = 4  # one uid: at most 1/4 of the cap
PRIVILEGED_RESERVE: Final = 16  # at most this many, and at most 1/8 of the cap

_PEERCRED: Final = struct.Struct("3i")  # struct ucred: pid, uid, gid


# --------------------------------------------------------------------------- tags


class ControlTag:
    """Base of the server's selector tags: route keys with such data to `on_ready()`."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Listener(ControlTag, ListenerTag):
    """The listening socket is readable: clients wait in the accept queue."""


@dataclass(frozen=True, slots=True)
class Connection(ControlTag, ConnectionTag):
    """A client connection; ids are never reused, so a stale key can't hit a new client."""


@dataclass(frozen=True, slots=True)
class Doorbell(ControlTag):
    """Requests are queued: run them."""


@dataclass(frozen=True, slots=True)
class AcceptRetry(ControlTag, AcceptRetryTag):
    """The pause after EMFILE/ENFILE is over: accept again."""


@dataclass(frozen=True, slots=True)
class RequestTimeout(ControlTag, DeadlineTag):
    """The earliest request deadline has passed: close the connections that missed it."""


# --------------------------------------------------------------------------- API


class SocketUnusable(Exception):
    """The control socket cannot be set up at its path; the message says why, for a user."""


NOT_ASKED: Final = -1  # a probe that could not ask the listener for its pid


class AlreadyRunning(SocketUnusable):
    """A live process listens on the socket path: `pid` and `uid` as the kernel reports
    them (SO_PEERCRED), `claimed` the pid it gave when asked like a supd (None: it did
    not answer as one; NOT_ASKED: we could not ask). Only the kernel's word is trusted;
    a claim is quoted.
    """

    def __init__(
        self,
        path: Path,
        pid: int | None,
        uid: int | None = None,
        claimed: int | None = NOT_ASKED,
    ) -> None:
        who = f"pid {pid}" if pid is not None else "pid unknown"
        if uid is not None:
            who += f", uid {uid}"
        if claimed == NOT_ASKED or (claimed is not None and claimed == pid):
            message = f"supd is already running on {path} ({who})"
        elif claimed is None:
            message = f"{path} is held by another program ({who}), which does not answer as supd"
        else:
            message = f"{path} is held by {who}, which claims to be supd with pid {claimed}"
        super().__init__(message)
        self.path = path
        self.pid = pid
        self.uid = uid
        self.claimed = claimed


class CommandHandler(Protocol):
    """Implemented by the daemon."""

    def handle_command(self, request: Request, responder: Responder) -> None:
        """Run one request; answer through `responder`, now or later."""


class Responder:
    """One pending request. The daemon may answer now or later (e.g. `start` answers
    when the process reaches RUNNING).

    Answering twice is a no-op (logged); answering after the client left is a silent
    no-op: the operation itself is not cancelled. For a notification request (no id)
    answers are never written.
    """

    __slots__ = ("_answered", "_conn", "_server", "request")

    def __init__(self, server: ControlServer, conn: _Client, request: Request) -> None:
        self._server = server
        self._conn = conn
        self._answered = False
        self.request = request

    @property
    def closed(self) -> bool:
        """The client is gone: nothing more will reach it (drop followers then)."""
        return self._conn.closed

    @property
    def answered(self) -> bool:
        return self._answered

    def on_close(self, callback: Callable[[], None]) -> None:
        """Call `callback` when the connection closes (at once if it is closed)."""
        if self._conn.closed:
            callback()
        else:
            self._conn.on_close.append(callback)

    def result(self, value: Any) -> None:
        """Answer with a result: plain data (dicts, lists, dataclasses, None...)."""
        if self._begin_answer():
            self._server._answer(self._conn, self._encode_result(value))

    def error(self, code: int, message: str, data: Any = None) -> None:
        """Answer with a JSON-RPC error (`protocol.ErrorCode`)."""
        if self._begin_answer():
            answer = protocol.encode_error(self.request.id, code, message, self._jsonable(data))
            self._server._answer(self._conn, answer)

    def notify(self, method: str, params: Any) -> bool:
        """Send a notification (`output` while following); False once the client is gone."""
        if self._conn.closed:
            return False
        try:
            line = protocol.encode_notification(method, params)
        except Exception:
            self._server._log.exception("notification_not_serializable", method=method)
            return not self._conn.closed
        return self._server._send(self._conn, line)

    def _begin_answer(self) -> bool:
        if self._answered:
            self._server._log.warning(
                "answered_twice", method=self.request.method, id=self.request.id
            )
            return False
        self._answered = True
        self._conn.outstanding -= 1
        if self.request.notification or self._conn.closed:
            self._server._answer(self._conn, None)
            return False
        return True

    def _encode_result(self, value: Any) -> bytes:
        try:
            return protocol.encode_result(self.request.id, value)
        except Exception as exc:
            # A daemon bug; the client still gets an answer and the loop goes on.
            self._server._log.exception("result_not_serializable", method=self.request.method)
            return protocol.encode_error(
                self.request.id, ErrorCode.INTERNAL_ERROR, f"internal error: {exc}"
            )

    def _jsonable(self, data: Any) -> Any:
        try:
            protocol.encode_result(None, data)
        except Exception:
            return repr(data)
        return data


# --------------------------------------------------------------------------- internals


class _Client(Conn):
    """The server's record of one connection: who is at the other end, and its lines."""

    __slots__ = ("on_close", "peer_pid", "peer_uid", "scan_from", "served")

    def __init__(self, sock: socket.socket, peer_pid: int, peer_uid: int) -> None:
        Conn.__init__(self, sock)  # not super(): 1% of a status request (callgrind)
        self.peer_pid = peer_pid
        self.peer_uid = peer_uid
        self.scan_from = 0  # inbuf[:scan_from] holds no b"\n"
        self.on_close: list[Callable[[], None]] = []  # e.g. stop following output
        self.served = False  # a valid request came in: the connection earned its slot


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process that connected `sock` (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, gid = _PEERCRED.unpack(raw)
    return pid, uid, gid


def peer_has_closed(sock: socket.socket) -> bool:
    """After EOF: did the peer close (POLLHUP), or only shut down its sending side?

    A zero-timeout poll of one fd: epoll reports both cases as ERROR (EPOLLRDHUP).
    """
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return any(mask & select.POLLHUP for _, mask in poller.poll(0))


def _make_parents(folder: Path) -> None:
    """Create the missing folders of `folder`, each with mode 0700.

    The umask, not a chmod after mkdir, gives the mode: a chmod by path could follow a
    symlink put there in between.
    """
    missing = []
    while not folder.exists():
        missing.append(folder)
        if folder.parent == folder:
            break
        folder = folder.parent
    old_umask = os.umask(0o077)
    try:
        for path in reversed(missing):
            with contextlib.suppress(FileExistsError):
                os.mkdir(path, 0o700)
    finally:
        os.umask(old_umask)


def untrusted_folder_problem(folder: Path) -> str | None:
    """Why `folder` can't hold our socket, or None: someone else could replace it there.

    Fine: owned by root or by us, and writable by nobody else (others, or a group other
    than root's and ours); or sticky (like /tmp), where others can't rename our file.
    """
    st = os.stat(folder)  # a symlinked folder (/var/run -> /run) is judged by its target
    if not stat.S_ISDIR(st.st_mode):
        return f"{folder} is not a folder"
    if st.st_mode & stat.S_ISVTX:
        return None
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid not in (0, os.geteuid()):
        return f"the folder {folder} belongs to uid {st.st_uid} (mode {mode:04o})"
    if mode & stat.S_IWOTH or (mode & stat.S_IWGRP and st.st_gid not in (0, os.getegid())):
        return f"the folder {folder} is writable by others (mode {mode:04o}) and not sticky"
    return None


@dataclass(frozen=True, slots=True)
class _ProbeResult:
    alive: bool
    pid: int | None = None  # SO_PEERCRED: who holds the socket
    uid: int | None = None
    claimed: int | None = NOT_ASKED  # the pid it gave when asked like a supd


def _probe(path: Path) -> _ProbeResult:
    """Does a process listen on `path`: who (SO_PEERCRED), and is it a supd? Bounded."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(PROBE_TIMEOUT_S)
        try:
            sock.connect(os.fspath(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return _ProbeResult(alive=False)  # stale: nobody listens
        except OSError:
            return _ProbeResult(alive=True)  # e.g. a full accept backlog: someone is there
        try:
            pid, uid, _gid = peer_credentials(sock)
        except OSError:
            return _ProbeResult(alive=True)
        try:
            sock.sendall(b'{"jsonrpc":"2.0","id":1,"method":"pid","params":{}}\n')
            answer = b""
            while b"\n" not in answer and len(answer) < 4096:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                answer += chunk
            claimed = json.loads(answer.split(b"\n", 1)[0])["result"]["pid"]
        except (OSError, ValueError, KeyError, TypeError):
            claimed = None
        return _ProbeResult(True, pid, uid, claimed if isinstance(claimed, int) else None)


# --------------------------------------------------------------------------- server


_TAGS: Final = Tags(
    listener=Listener(),
    accept_retry=AcceptRetry(),
    deadline=RequestTimeout(),
    connection=Connection,
)


class ControlServer(StreamServer[_Client]):
    """The control socket server. Not thread-safe: use it from the loop's thread."""

    def __init__(
        self,
        selector: Selector[Any],
        handler: CommandHandler,
        *,
        path: Path,
        mode: int = 0o600,
        group: str | None = None,
        listen_fd: int | None = None,
        max_connections: int = 512,
        max_line: int = 1 << 20,
        max_output: int = 4 << 20,
        request_timeout: float = REQUEST_TIMEOUT_S,
        max_per_uid: int | None = None,
        reserved: int | None = None,
        log: Any = None,
    ) -> None:
        base_log = log if log is not None else daemonlog.get_logger()
        super().__init__(
            selector,
            _TAGS,
            request_timeout=request_timeout,
            max_output=max_output,
            log=base_log.bind(component="control"),
        )
        self.path = Path(path)
        self._handler = handler
        self._mode = mode
        self._group = group
        self._listen_fd = listen_fd
        self._max_connections = max_connections
        self._max_line = max_line
        # Defaults: a quarter of the cap per uid; 16 (at most an eighth) kept for root.
        self._uid_limit = max_per_uid or max(1, max_connections // UID_SHARE)
        default_reserve = min(PRIVILEGED_RESERVE, max_connections // 8)
        self._reserve = default_reserve if reserved is None else reserved
        self._per_uid: Counter[int] = Counter()
        self._bound_inode: tuple[int, int] | None = None  # (st_dev, st_ino) if we made it
        self._group_gid: int | None = None
        self._doorbell: SelectEvent | None = None
        self._bell_rung = False
        self._queue: deque[tuple[Request, Responder]] = deque()

    # -- lifecycle ----------------------------------------------------------------

    def open(self) -> None:
        """Create (or adopt) the listening socket and register everything.

        Raises AlreadyRunning if a live process listens on `path`, SocketUnusable with a
        message for the user if the socket can't be made there (unknown group, a file
        in the way, an untrusted folder, an OS error).
        """
        if self._listener is not None:
            raise RuntimeError("the control server is already open")
        if self._group is not None:
            self._group_gid = self._resolve_group(self._group)
        if self._listen_fd is not None:
            listener = socket.socket(fileno=self._listen_fd)
            os.set_inheritable(listener.fileno(), False)
        else:
            try:
                listener = self._bind()
            except SocketUnusable:
                raise
            except OSError as exc:
                reason = exc.strerror or str(exc)
                raise SocketUnusable(
                    f"cannot create the control socket at {self.path}: {reason}"
                ) from exc
        try:
            self._listen(listener)
            self._doorbell = SelectEvent()
            self._selector.register_event(self._doorbell, Doorbell())
        except BaseException:
            self.close()
            raise
        self._log.info("control_listening", path=str(self.path), activated=not self._bound_inode)

    def close(self) -> None:
        """Close the listener and every connection; unlink the socket if we made it.

        Queued requests that have not run are dropped.
        """
        listening = self._listener is not None
        super().close()
        self._queue.clear()
        if self._doorbell is not None:
            self._unregister(self._doorbell)
            self._doorbell.close()
            self._doorbell = None
        if listening:
            self._unlink_our_socket()

    # -- re-exec: the listener crosses an execve ------------------------------------

    def listening(self) -> tuple[int | None, tuple[int, int] | None]:
        """(the listening fd, the inode of the socket file we bound, if we did)."""
        fd = self._listener.fileno() if self._listener is not None else None
        return fd, self._bound_inode

    def adopt(self, inode: tuple[int, int] | None) -> None:
        """Before open() with `listen_fd` from a re-exec: the socket file at `path` is
        ours (we bound that inode), so we may still unlink or move it."""
        self._bound_inode = tuple(inode) if inode is not None else None  # type: ignore[assignment]

    # -- reload: a new path, mode or group ------------------------------------------

    def reconfigure(self, path: Path, mode: int, group: str | None) -> list[str]:
        """Apply a reloaded `socket`, `socket_mode` and `socket_group`; returns the keys
        applied. A new path is bound first and the old listener closed only then
        (connections stay); a socket systemd passed us is left alone. Raises
        SocketUnusable when the new socket cannot be made: then nothing changed."""
        changed: list[str] = []
        gid = self._resolve_group(group) if group is not None else None
        path = Path(path)
        if self._bound_inode is None:
            return []  # systemd passed the socket: its path, mode and group are systemd's
        if path != self.path:
            changed = ["socket"]
            changed += ["socket_mode"] if mode != self._mode else []
            changed += ["socket_group"] if gid != self._group_gid else []
            self._move(path, mode, gid)
            self._group = group
            return changed
        if gid != self._group_gid:
            # No socket_group any more: supd's own group, as a socket bound without one
            # has; the old group's members must not keep their access.
            owner = gid if gid is not None else os.getegid()
            os.chown(self.path, -1, owner, follow_symlinks=False)  # lchown: no symlink
            changed.append("socket_group")
        self._group, self._group_gid = group, gid
        if mode != self._mode:
            self._chmod_our_socket(mode)
            changed.append("socket_mode")
        self._mode = mode
        return changed

    def _chmod_our_socket(self, mode: int) -> None:
        """chmod without following a symlink: through an O_PATH fd of the very inode we
        bound (Linux has no lchmod)."""
        fd = os.open(self.path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if not stat.S_ISSOCK(st.st_mode) or (st.st_dev, st.st_ino) != self._bound_inode:
                raise SocketUnusable(f"{self.path} is no longer supd's socket")
            os.chmod(f"/proc/self/fd/{fd}", mode)
        finally:
            os.close(fd)

    def _move(self, path: Path, mode: int, gid: int | None) -> None:
        old_path, old_mode, old_gid, old_inode = self.path, self._mode, self._group_gid, None
        old_inode = self._bound_inode
        self.path, self._mode, self._group_gid = path, mode, gid
        try:
            listener = self._bind()
        except BaseException as exc:
            self.path, self._mode, self._group_gid = old_path, old_mode, old_gid
            self._bound_inode = old_inode
            if isinstance(exc, SocketUnusable) or not isinstance(exc, OSError):
                raise
            reason = exc.strerror or str(exc)
            raise SocketUnusable(f"cannot create the control socket at {path}: {reason}") from exc
        new_inode = self._bound_inode
        self._replace_listener(listener)
        # Unlink the old path only if it is still the socket we made there.
        self.path, self._bound_inode = old_path, old_inode
        self._unlink_our_socket()
        self.path, self._bound_inode = path, new_inode
        self._log.info("control_moved", old=str(old_path), path=str(path))

    def _unlink_our_socket(self) -> None:
        # Only if the file is still the one we bound: a newer daemon may own the path.
        if self._bound_inode is None:
            return
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._bound_inode:
                os.unlink(self.path)
        self._bound_inode = None

    # -- creating the socket ------------------------------------------------------

    def _resolve_group(self, group: str) -> int:
        try:
            return grp.getgrnam(group).gr_gid
        except KeyError:
            if group.isascii() and group.isdigit():
                return int(group)
            raise SocketUnusable(
                f"cannot create the control socket at {self.path}: unknown group {group!r}"
            ) from None

    def _bind(self) -> socket.socket:
        _make_parents(self.path.parent)
        problem = untrusted_folder_problem(self.path.parent)
        if problem is not None:
            raise SocketUnusable(
                f"cannot create the control socket at {self.path}: {problem}; "
                "use a folder only root or supd's user can write to"
            )
        for attempt in (1, 2):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                self._bind_restricted(sock)
            except OSError as exc:
                sock.close()
                if exc.errno != errno.EADDRINUSE or attempt == 2:
                    raise
                self._remove_stale_socket()  # raises AlreadyRunning if it is live
                continue
            try:
                self._set_owner_and_mode()
                sock.listen(socket.SOMAXCONN)
            except BaseException:
                sock.close()
                self._unlink_our_socket()
                raise
            return sock
        raise AssertionError("unreachable")  # pragma: no cover

    def _bind_restricted(self, sock: socket.socket) -> None:
        # The umask gives the socket file its final mode as bind creates it: no chmod
        # by path afterwards, which could follow a symlink swapped in meanwhile. (The
        # umask is process-wide; the daemon is single-threaded.)
        old_umask = os.umask(0o777 & ~self._mode)
        try:
            sock.bind(os.fspath(self.path))
        finally:
            os.umask(old_umask)
        st = os.lstat(self.path)
        self._bound_inode = (st.st_dev, st.st_ino)

    def _set_owner_and_mode(self) -> None:
        if self._group_gid is not None:
            os.chown(self.path, -1, self._group_gid, follow_symlinks=False)

    def _remove_stale_socket(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a socket"
            raise SocketUnusable(
                f"cannot create the control socket at {self.path}: it exists and is {kind}"
            )
        found = _probe(self.path)
        if found.alive:
            raise AlreadyRunning(self.path, found.pid, found.uid, found.claimed)
        self._log.info("stale_socket_removed", path=str(self.path))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    # -- dispatch -----------------------------------------------------------------

    @staticmethod
    def owns(data: object) -> bool:
        """Whether a ready key's data is one of the server's tags."""
        return isinstance(data, ControlTag)

    def _other_ready(self, key: ReadyKey[Any]) -> None:
        """The doorbell (the base's `on_ready` serves the other `ControlTag`s)."""
        if isinstance(key.data, Doorbell):
            self.run_queued()
        else:
            self._log.warning("unknown_control_key", data=repr(key.data))

    def run_queued(self) -> None:
        """Run queued requests: the ONE place where commands are executed."""
        self._bell_rung = False
        for _ in range(min(len(self._queue), COMMANDS_PER_RING)):
            request, responder = self._queue.popleft()
            self._run(request, responder)
        if self._queue:
            self._ring()  # the rest next iteration, after other events had their turn

    def _run(self, request: Request, responder: Responder) -> None:
        try:
            self._handler.handle_command(request, responder)
        except Exception as exc:
            # A daemon bug: the client gets an error, the loop keeps running.
            self._log.exception("command_failed", method=request.method, id=request.id)
            if not responder.answered:
                responder.error(ErrorCode.INTERNAL_ERROR, f"internal error: {exc}")

    def _ring(self) -> None:
        if not self._bell_rung and self._doorbell is not None:
            self._bell_rung = True
            self._doorbell.trigger()

    # -- accepting ----------------------------------------------------------------

    def _admit(self, sock: socket.socket) -> None:
        try:
            sock.setblocking(False)
            pid, uid, gid = peer_credentials(sock)
        except OSError:
            sock.close()
            return
        if not self._authorized(uid, gid):
            self._log.warning("client_refused", reason="permission denied", uid=uid, pid=pid)
            self._refuse(sock, ErrorCode.PERMISSION_DENIED, "permission denied")
            return
        crowded = self._crowded(uid)
        if crowded is not None:
            self._log.warning("client_refused", reason=crowded, uid=uid, pid=pid)
            self._refuse(sock, ErrorCode.TOO_MANY_CONNECTIONS, crowded)
            return
        conn = _Client(sock, pid, uid)
        if not self._add(conn):
            return
        self._per_uid[uid] += 1
        self._log.debug("client_connected", conn=conn.conn_id, uid=uid, pid=pid)

    def _crowded(self, uid: int) -> str | None:
        """Why a client of `uid` can't have a connection now, or None if it can.

        An unprivileged uid gets at most 1/UID_SHARE of the cap, and the last few slots
        are kept for root and supd's own user: a flood from one user locks out neither
        the other users nor the administrator.
        """
        total = len(self._connections)
        if uid == 0 or uid == os.geteuid():
            return "too many connections" if total >= self._max_connections else None
        if total >= self._max_connections - self._reserve:
            return "too many connections"
        if self._per_uid[uid] >= self._uid_limit:
            return f"too many connections from uid {uid} (at most {self._uid_limit})"
        return None

    def _authorized(self, uid: int, gid: int) -> bool:
        """root, our own euid, and members of the socket's group (if one is set)."""
        if uid == 0 or uid == os.geteuid():
            return True
        group_gid = self._group_gid
        if group_gid is None:
            return False
        if gid == group_gid:
            return True
        # Looked up each time (rarely reached): membership changes apply at once.
        try:
            user = pwd.getpwuid(uid)
            members = grp.getgrgid(group_gid).gr_mem
        except KeyError:
            return False
        return user.pw_gid == group_gid or user.pw_name in members

    @staticmethod
    def _refuse(sock: socket.socket, code: int, message: str) -> None:
        refuse(sock, protocol.encode_error(None, code, message))

    # -- reading ------------------------------------------------------------------

    def _connection_ready(self, conn: _Client, events: Event) -> None:
        if conn.reading and events & (Event.READ | Event.ERROR):
            self._read(conn)
        elif events & Event.ERROR and not events & Event.WRITE:
            # Not reading any more, and the peer's EOF (EPOLLRDHUP) is level-triggered:
            # waiting here for the socket to drain would spin. It isn't draining.
            self._close(conn, "client stopped reading after its EOF")
            return
        if not conn.closed and events & Event.WRITE:
            self._flush(conn)

    def _read(self, conn: _Client) -> None:
        try:
            chunk = conn.sock.recv(READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._close(conn, f"read failed: {exc.strerror}")
            return
        if chunk:
            self._take_lines(conn, chunk)
        else:
            self._end_of_input(conn)

    def _take_lines(self, conn: _Client, chunk: bytes) -> None:
        buf = conn.inbuf
        buf += chunk
        while not conn.closed:
            newline = buf.find(b"\n", conn.scan_from)
            if newline < 0:
                break
            if newline > self._max_line:
                self._too_large(conn)
                return
            line = bytes(buf[:newline])
            del buf[: newline + 1]
            conn.scan_from = 0
            self._take_line(conn, line)
        if conn.closed or not conn.reading:
            return
        if len(buf) > self._max_line:
            self._too_large(conn)  # no newline in sight: don't buffer more
            return
        conn.scan_from = len(buf)
        if conn.served and not buf:
            self._clear_deadline(conn)  # nothing unfinished: it may stay, e.g. for tail -f
        elif conn.deadline is None:
            self._set_deadline(conn)  # a new line started: it has a while to finish it

    def _take_line(self, conn: _Client, line: bytes) -> None:
        if not line.strip():
            return  # blank lines (a person at socat pressing Enter) are ignored
        parsed = protocol.parse_request(line)
        if isinstance(parsed, ErrorResponse):
            self._log.info(
                "rpc_error", conn=conn.conn_id, code=int(parsed.code), message=parsed.message
            )
            if not parsed.notification:
                self._send(conn, parsed.encode())
            return
        conn.outstanding += 1
        conn.served = True
        self._queue.append((parsed, Responder(self, conn, parsed)))
        self._ring()

    def _too_large(self, conn: _Client) -> None:
        self._log.warning("request_too_large", conn=conn.conn_id, limit=self._max_line)
        conn.inbuf.clear()
        self._send(
            conn,
            protocol.encode_error(
                None,
                ErrorCode.REQUEST_TOO_LARGE,
                f"request too large: a line may have at most {self._max_line} bytes",
            ),
        )
        self._close_after_output(conn)

    def _end_of_input(self, conn: _Client) -> None:
        conn.reading = False
        conn.inbuf.clear()  # an unfinished last line can't be a request any more
        if conn.served:
            self._clear_deadline(conn)  # nothing more can come: it only waits for answers
        if peer_has_closed(conn.sock):
            self._close(conn)
            return
        self._update_interest(conn)
        self._close_if_done(conn)

    # -- writing ------------------------------------------------------------------

    def _answer(self, conn: _Client, line: bytes | None) -> None:
        """A responder answered (`line` None: nothing to write, e.g. a notification)."""
        if line is not None:
            self._send(conn, line)
        self._close_if_done(conn)

    # -- closing ------------------------------------------------------------------

    def _log_context(self, conn: _Client) -> dict[str, object]:
        return {"conn": conn.conn_id, "uid": conn.peer_uid, "pid": conn.peer_pid}

    def _closed(self, conn: _Client, problem: str | None) -> None:
        self._per_uid[conn.peer_uid] -= 1
        if not self._per_uid[conn.peer_uid]:
            del self._per_uid[conn.peer_uid]
        callbacks, conn.on_close = conn.on_close, []
        for callback in callbacks:
            try:
                callback()
            except Exception:
                self._log.exception("close_callback_failed", conn=conn.conn_id)
        if problem is None:
            self._log.debug("client_disconnected", conn=conn.conn_id)
        else:
            self._log.warning(
                "client_dropped",
                conn=conn.conn_id,
                uid=conn.peer_uid,
                pid=conn.peer_pid,
                reason=problem,
                pending_answers=conn.outstanding,
            )
