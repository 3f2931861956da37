"""What supd's two socket servers share: a listener and its connections in the loop.

`StreamServer` is the base of the control server (control.py: JSON lines, SO_PEERCRED,
per-uid slots) and of the metrics responder (httpmetrics.py: GET /metrics). It holds
what neither protocol decides:

- The listening socket in the selector, accepted from at most `ACCEPTS_PER_WAKEUP`
  times a wake-up: epoll is level-triggered, so a connect storm is served a batch at a
  time, between the loop's other work.
- Out of fds (EMFILE/ENFILE on accept), the listener is paused and a oneshot timer
  resumes it `ACCEPT_RETRY_MS` later, instead of spinning on a listener that stays
  readable. A client that gave up while queued (ECONNABORTED...) is just skipped.
- The connections by id. Ids are never reused, so a ready key left over from a closed
  connection cannot reach a new one on the same fd.
- Request deadlines (slowloris): a connection is closed unless its protocol clears its
  deadline in time. Every deadline is now + one timeout, so they queue up in order and
  one timerfd, set for the earliest, serves them all; with none pending it is
  disarmed, so an idle daemon never wakes up for a deadline nobody has.
- Writing: as far as the socket takes it at once, the rest buffered with WRITE
  interest only while something is pending; a connection whose pending output is over
  `max_output` when more comes (it stopped reading) is dropped; a connection that will
  receive nothing more is closed once its output is written.

Both timers are made when the server starts listening and stay disarmed until needed:
at EMFILE there is no fd left for a timerfd. A server registers everything under its
own tags (`Tags`: its own subclasses of the tag classes here), so the daemon routes
each ready key to the server that owns it, and `on_ready` to what it means. A server
supplies what its protocol decides: who is admitted (`_admit`), what a ready
connection reads (`_connection_ready`), and optionally `_deadline_missed`, `_closed`
and `_other_ready` (a key of its own). Everything runs on the loop's thread. Imports
only the selector: must not import `daemon`, `control` or `httpmetrics`.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

from .selector import Event, ReadyKey, Selector

ACCEPTS_PER_WAKEUP: Final = 64
ACCEPT_RETRY_MS: Final = 100

# accept() errors that mean "no resources now": pause (logged as a warning; anything
# else unexpected pauses too, logged as an error).
RESOURCE_ERRORS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# accept() errors about one client that gave up while queued: just go on.
CLIENT_GONE_ERRORS: Final = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})


# What a server's own tag classes derive from (each also from the server's tag base).


@dataclass(frozen=True, slots=True)
class ListenerTag:
    """The listening socket is readable: clients wait in the accept queue."""


@dataclass(frozen=True, slots=True)
class ConnectionTag:
    """A client connection; ids are never reused, so a stale key can't hit a new client."""

    conn_id: int


@dataclass(frozen=True, slots=True)
class AcceptRetryTag:
    """The pause after EMFILE/ENFILE is over: accept again."""


@dataclass(frozen=True, slots=True)
class DeadlineTag:
    """The earliest request deadline has passed: close the connections that missed it."""


@dataclass(frozen=True, slots=True)
class Tags:
    """The selector data a server registers its sources under: instances of its own
    tag classes, so that ready keys find their way back to it."""

    listener: ListenerTag
    accept_retry: AcceptRetryTag
    deadline: DeadlineTag
    connection: Callable[[int], ConnectionTag]


class Conn:
    """A server's record of one connection (a protocol adds its own fields)."""

    __slots__ = (
        "closed",
        "closing",
        "conn_id",
        "deadline",
        "fd",
        "inbuf",
        "interest",
        "outbuf",
        "outstanding",
        "reading",
        "sock",
    )

    def __init__(self, sock: socket.socket) -> None:
        self.conn_id = 0  # given by the server as it takes the connection (`_add`)
        self.sock = sock
        self.fd = sock.fileno()
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.interest = Event.READ
        self.outstanding = 0  # requests received and not yet answered: stay open for them
        self.reading = True  # False after the peer's EOF, or when closing
        self.closing = False  # close as soon as the output is written
        self.closed = False
        self.deadline: float | None = None  # closed at this time unless cleared


def refuse(sock: socket.socket, answer: bytes) -> None:
    """Send a just-accepted client one short answer, and close it."""
    # A fresh socket's send buffer is empty: one short answer always fits.
    with contextlib.suppress(OSError):
        sock.send(answer, socket.MSG_NOSIGNAL)
    sock.close()


C = TypeVar("C", bound=Conn)


class StreamServer(Generic[C]):
    """A listener and its connections in `selector`. Not thread-safe."""

    def __init__(
        self,
        selector: Selector[Any],
        tags: Tags,
        *,
        request_timeout: float,
        log: Any,
        max_output: int = sys.maxsize,
    ) -> None:
        self._selector = selector
        self._tags = tags
        self._request_timeout = request_timeout
        self._log: Any = log
        self._max_output = max_output
        self._listener: socket.socket | None = None
        self._retry_timer: int | None = None
        self._accept_paused = False
        self._connections: dict[int, C] = {}
        self._next_conn_id = 1
        # (deadline, conn_id) in deadline order: every deadline is now + one constant.
        self._deadlines: deque[tuple[float, int]] = deque()
        self._deadline_timer: int | None = None
        self._deadline_armed: float | None = None  # what the timer is set for
        self._deadline_count = 0  # connections with a deadline (0: the timer is off)

    # -- what a protocol supplies ---------------------------------------------------

    def _admit(self, sock: socket.socket) -> None:
        """A client was accepted: refuse it, or make its record and `_add` it."""
        raise NotImplementedError

    def _connection_ready(self, conn: C, events: Event) -> None:
        """The selector reported `events` for `conn`."""
        raise NotImplementedError

    def _deadline_missed(self, conn: C) -> None:
        """`conn` did not clear its deadline in time."""
        self._close(conn, f"no complete request within {self._request_timeout:g} s")

    def _closed(self, conn: C, problem: str | None) -> None:
        """`conn` was just closed (`problem`: why, if it was dropped)."""

    def _other_ready(self, key: ReadyKey[Any]) -> None:
        """A key of the server's that is none of the base's tags."""
        self._log.warning("unknown_key", data=repr(key.data))

    def _log_context(self, conn: C) -> dict[str, object]:
        """Who is at the other end of `conn`, for a log entry about it."""
        return {"conn": conn.conn_id}

    # -- dispatch -----------------------------------------------------------------

    def on_ready(self, key: ReadyKey[Any]) -> None:
        """Handle a ready key whose data is one of this server's tags."""
        match key.data:
            case ConnectionTag(conn_id=conn_id):
                conn = self._connections.get(conn_id)
                if conn is not None:  # else: closed earlier in this same batch
                    self._connection_ready(conn, key.events)
            case ListenerTag():
                self._accept_batch()
            case AcceptRetryTag():
                self._resume_accepting()
            case DeadlineTag():
                self._deadline_passed()
            case _:
                self._other_ready(key)

    # -- listening ----------------------------------------------------------------

    def _listen(self, listener: socket.socket) -> None:
        """Serve `listener`: register it, and make the two timers (disarmed)."""
        listener.setblocking(False)
        self._listener = listener
        self._selector.register_handle(listener.fileno(), Event.READ, self._tags.listener)
        self._retry_timer = self._selector.register_timer(
            ACCEPT_RETRY_MS, True, self._tags.accept_retry
        )
        self._selector.disarm_timer(self._retry_timer)
        self._deadline_timer = self._selector.register_timer(
            ACCEPT_RETRY_MS, True, self._tags.deadline
        )
        self._selector.disarm_timer(self._deadline_timer)

    def _replace_listener(self, listener: socket.socket) -> None:
        """Serve `listener` instead of the current one (closed); connections stay."""
        listener.setblocking(False)
        old = self._listener
        if old is not None:
            self._unregister(old.fileno())
            old.close()
        self._listener = listener
        self._selector.register_handle(listener.fileno(), Event.READ, self._tags.listener)

    def close(self) -> None:
        """Close every connection, the timers and the listener."""
        for conn in list(self._connections.values()):
            self._close(conn)
        if self._retry_timer is not None:
            self._unregister(self._retry_timer)  # closes the timerfd
            self._retry_timer = None
        if self._deadline_timer is not None:
            self._unregister(self._deadline_timer)
            self._deadline_timer = None
        self._deadlines.clear()
        self._deadline_armed = None
        if self._listener is not None:
            self._unregister(self._listener.fileno())
            self._listener.close()
            self._listener = None

    def _unregister(self, target: Any) -> None:
        with contextlib.suppress(KeyError):  # never registered (opening failed half-way)
            self._selector.unregister(target)

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    @property
    def accepting(self) -> bool:
        """False while accept is paused after EMFILE/ENFILE."""
        return self._listener is not None and not self._accept_paused

    # -- accepting ----------------------------------------------------------------

    def _accept_batch(self) -> None:
        """The listener is readable: accept at most a batch of clients."""
        listener = self._listener
        assert listener is not None
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in CLIENT_GONE_ERRORS:
                    continue
                # Out of fds (or something unexpected): the listener stays readable,
                # so retrying now would spin. Pause it; the timer resumes it.
                self._pause_accepting(exc)
                return
            self._admit(sock)

    def _pause_accepting(self, exc: OSError) -> None:
        assert self._listener is not None and self._retry_timer is not None
        level = "warning" if exc.errno in RESOURCE_ERRORS else "error"
        getattr(self._log, level)(
            "accept_paused", error=exc.strerror, errno=exc.errno, retry_ms=ACCEPT_RETRY_MS
        )
        self._accept_paused = True
        self._selector.update_handle(self._listener.fileno(), Event(0))
        self._selector.rearm_timer(self._retry_timer, ACCEPT_RETRY_MS, True)

    def _resume_accepting(self) -> None:
        """The accept-retry timer fired."""
        if self._accept_paused and self._listener is not None:
            self._accept_paused = False
            self._selector.update_handle(self._listener.fileno(), Event.READ)

    def _add(self, conn: C) -> bool:
        """Serve an admitted connection: give it an id, register it under its tag and
        start its deadline. False if the selector refused it (logged; closed)."""
        conn.conn_id = self._next_conn_id
        self._next_conn_id += 1
        try:
            self._selector.register_handle(conn.fd, Event.READ, self._tags.connection(conn.conn_id))
        except (OSError, ValueError):
            self._log.exception("client_not_registered", **self._log_context(conn))
            conn.sock.close()
            return False
        self._connections[conn.conn_id] = conn
        self._set_deadline(conn)
        return True

    # -- request deadlines --------------------------------------------------------

    def _set_deadline(self, conn: C) -> None:
        """Close `conn` unless its deadline is cleared within the timeout."""
        conn.deadline = time.monotonic() + self._request_timeout
        self._deadline_count += 1
        self._deadlines.append((conn.deadline, conn.conn_id))
        if self._deadline_armed is None:
            self._arm_deadline_timer()

    def _clear_deadline(self, conn: C) -> None:
        """The connection met (or no longer has) its deadline. With none left, the timer
        is turned off: an idle daemon must not wake up for a deadline nobody has."""
        if conn.deadline is None:
            return
        conn.deadline = None
        self._deadline_count -= 1
        if self._deadline_count == 0 and self._deadline_timer is not None:
            self._selector.disarm_timer(self._deadline_timer)
            self._deadlines.clear()
            self._deadline_armed = None

    def _arm_deadline_timer(self) -> None:
        if not self._deadlines or self._deadline_timer is None:
            self._deadline_armed = None
            return
        due = self._deadlines[0][0]
        delay_ms = max(1, int((due - time.monotonic()) * 1000) + 1)
        self._selector.rearm_timer(self._deadline_timer, delay_ms, True)
        self._deadline_armed = due

    def _deadline_passed(self) -> None:
        """The deadline timer fired: the connections whose deadline passed miss it."""
        now = time.monotonic()
        while self._deadlines and self._deadlines[0][0] <= now:
            due, conn_id = self._deadlines.popleft()
            conn = self._connections.get(conn_id)
            if conn is not None and conn.deadline == due:  # else: met, or re-set later
                self._deadline_missed(conn)
        self._arm_deadline_timer()

    # -- writing ------------------------------------------------------------------

    def _send(self, conn: C, data: bytes) -> bool:
        """Write now as far as the socket takes it, buffer the rest. False: client gone."""
        if conn.closed:
            return False
        if len(conn.outbuf) > self._max_output:
            self._close(conn, f"client not reading: over {self._max_output} bytes pending")
            return False
        if not conn.outbuf:
            try:
                sent = conn.sock.send(data, socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._close(conn, f"write failed: {exc.strerror}")
                return False
            if sent == len(data):
                return True
            data = data[sent:]
        conn.outbuf += data
        self._update_interest(conn)
        return True

    def _flush(self, conn: C) -> None:
        """The socket takes more: write what is pending."""
        try:
            sent = conn.sock.send(conn.outbuf, socket.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._close(conn, f"write failed: {exc.strerror}")
            return
        del conn.outbuf[:sent]
        if not conn.outbuf:
            self._update_interest(conn)
            self._close_if_done(conn)

    def _update_interest(self, conn: C) -> None:
        if conn.closed:
            return
        wanted = Event(0)
        if conn.reading:
            wanted |= Event.READ
        if conn.outbuf:
            wanted |= Event.WRITE
        if wanted != conn.interest:
            self._selector.update_handle(conn.fd, wanted)
            conn.interest = wanted

    # -- closing ------------------------------------------------------------------

    def _close_after_output(self, conn: C) -> None:
        """Read nothing more; close once the pending output is written."""
        conn.reading = False
        conn.closing = True
        self._update_interest(conn)
        self._close_if_done(conn)

    def _close_if_done(self, conn: C) -> None:
        """Close a connection that will receive nothing more: it stopped sending, all
        its output is written, and it waits for no answer (or is being closed)."""
        if conn.closed or conn.reading or conn.outbuf:
            return
        if conn.closing or conn.outstanding <= 0:
            self._close(conn)

    def _close(self, conn: C, problem: str | None = None) -> None:
        """Close `conn` now (`problem`: why it is dropped, for the log)."""
        if conn.closed:
            return
        conn.closed = True
        conn.reading = False
        self._clear_deadline(conn)
        del self._connections[conn.conn_id]
        with contextlib.suppress(KeyError):
            self._selector.unregister(conn.fd)
        conn.sock.close()
        conn.inbuf.clear()
        conn.outbuf.clear()
        self._closed(conn, problem)
