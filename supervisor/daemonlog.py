"""The daemon's own log: structlog, one event per line on stderr.

On a terminal: key=value lines with colours. Otherwise JSON (log_format = "auto"), so a
collector can parse it. Timestamps are UTC, ISO 8601 with a `Z`. Under systemd (stderr
is the journal stream named by $JOURNAL_STREAM) each line starts with an sd-daemon
priority prefix (`<3>`, `<4>`, `<6>`) and carries no timestamp of its own: the journal
adds one.

The log never blocks the loop and never raises into it (a daemon that dies takes every
program with it, so its log must not be able to kill it):

- `LogWriter` writes non-blocking. What a slow reader does not take yet waits in a
  buffer of at most `MAX_PENDING` bytes; the daemon's selector flushes it when the fd
  becomes writable (`pollable_fd()`, `watch()`, `flush()`: the daemon's whole part).
  When the buffer is full, events are dropped and counted; once writing works again,
  one `log_events_dropped` line says how many were lost. A full disk (ENOSPC) drops
  and counts the same way, and every later event tries again.
- EPIPE, EIO or any other error of the stream stops logging there for good: one
  `broken` attribute records why, and the daemon goes on without a log.
- `RateLimiter` lets at most `BURST` identical events (same level, event and fields,
  apart from a pid, a connection number, a delay, a failure count or an uptime) through per
  `WINDOW_S`; the next one that passes carries `suppressed=N`,
  and counts left over when the flood stops come out as `log_events_suppressed`.
- A processor or renderer that raises loses its one event (counted as dropped).

structlog is imported without asyncio (`_import_structlog`): its stdlib module imports
asyncio for async logging methods supd never calls, and asyncio with ssl is about 5 MiB
of the daemon's RSS (benchmarks/RESULTS.md, "Memory").
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import logging
import os
import select
import stat
import sys
import time
import types
from collections import deque
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, TextIO


def _import_structlog() -> types.ModuleType:
    """structlog, imported while a stand-in holds asyncio's place in sys.modules.

    structlog.stdlib and structlog._native say `import asyncio` at the top but use it
    only inside their async methods. The stand-in they bind imports the real asyncio the
    first time anything reads from it, so nothing breaks; it just never happens in supd.
    """
    if "asyncio" in sys.modules:  # already paid for (tests, an embedding program)
        import structlog as already

        return already
    stand_in = types.ModuleType("asyncio", "stand-in: the real asyncio on first use")

    def real_asyncio(name: str) -> Any:
        import importlib

        return getattr(importlib.import_module("asyncio"), name)

    setattr(stand_in, "__getattr__", real_asyncio)  # noqa: B010 (a module's __getattr__)
    sys.modules["asyncio"] = stand_in
    try:
        import structlog as imported
    finally:
        if sys.modules.get("asyncio") is stand_in:
            del sys.modules["asyncio"]
    return imported


if TYPE_CHECKING:
    import structlog
else:
    structlog = _import_structlog()

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
LEVELS["error"] = logging.ERROR

# sd-daemon(3) priorities.
_SYSLOG_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}

MAX_PENDING: Final = 1 << 20  # bytes waiting for a slow reader of supd's stderr
RECENT_BYTES: Final = 256 * 1024  # supd's own recent log kept for `supctl maintail`
EXIT_FLUSH_S: Final = 1.0  # at exit, how long the pending lines may wait for the reader
BURST: Final = 20  # identical events written per window...
WINDOW_S: Final = 1.0  # ...the rest of the window's are counted, not written

# Errors that mean "no room right now": drop the event, count it, try again next time.
_NO_ROOM: Final = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_FULL: Final = -1  # a non-blocking write found no room: EAGAIN


def stderr_is_journal(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """True when $JOURNAL_STREAM names the device and inode of our stderr."""
    value = environ.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (ValueError, OSError):
        return False


# --------------------------------------------------------------------------- the writer


def _nonblocking_fd(fd: int) -> tuple[int, bool, int | None]:
    """(fd to write to, whether epoll can watch it, flags to restore on `fd` at exit).

    A pipe or terminal is opened again through /proc, so O_NONBLOCK lands on a file
    description of our own and not on the one we share with the shell that started us.
    Where that is impossible (a socket, a pipe without reader) the shared one gets
    O_NONBLOCK and its old flags back at exit. A regular file never blocks for long:
    it is written as it is (and epoll cannot watch it).
    """
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode):
        return fd, False, None
    if stat.S_ISFIFO(st.st_mode) or stat.S_ISCHR(st.st_mode):
        flags = os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY | os.O_APPEND
        try:
            return os.open(f"/proc/self/fd/{fd}", flags), True, None
        except OSError:
            pass
    old_flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, old_flags | os.O_NONBLOCK)
    return fd, True, old_flags


class LogWriter:
    """supd's own log stream: non-blocking, bounded, never raising. See the module doc."""

    def __init__(self, fd: int, max_pending: int = MAX_PENDING) -> None:
        self._source_fd = fd
        self._fd, self.pollable, self._restore_flags = _nonblocking_fd(fd)
        self.max_pending = max_pending
        self._pending = bytearray()
        self.written = 0  # bytes written so far: tells a slow reader from a stalled one
        self.dropped = 0  # events lost since the last `log_events_dropped` line
        self.broken: OSError | None = None  # set for good on EPIPE, EIO...
        self.announce: Callable[[int], None] | None = None  # logs `log_events_dropped`
        self._announcing = False
        self._mid_line = False
        self._on_pending: Callable[[bool], None] | None = None

    @property
    def fd(self) -> int:
        return self._fd

    @property
    def pending(self) -> int:
        """Bytes waiting for the reader."""
        return len(self._pending)

    def watch(self, on_pending: Callable[[bool], None] | None) -> None:
        """Call `on_pending(True)` when bytes start waiting, `(False)` once all are out."""
        self._on_pending = on_pending
        if on_pending is not None and self._pending:
            on_pending(True)

    def write_line(self, line: str) -> None:
        if self.broken is not None:
            return
        if self.dropped and not self._pending and not self._announcing:
            self._announce_dropped()
        data = line.encode("utf-8", "backslashreplace") + b"\n"
        if self._pending:
            self._buffer(data)
        else:
            self._write_now(data)

    def drop(self) -> None:
        """Count one event that could not even be rendered."""
        self.dropped += 1

    def write_data(self, parts: tuple[bytes | memoryview, ...]) -> bool:
        """Whole lines of a child's output (logs.LineSink; `parts` joined), through the
        same buffer as supd's own lines, so that neither splits the other. False if they
        were dropped (the buffer is full, the disk too, or the stream is broken); the
        caller counts them. One writev when nothing waits: no join, no copy."""
        if self.broken is not None:
            return False
        total = sum(len(part) for part in parts)
        if self._pending:
            if len(self._pending) + total > self.max_pending:
                return False
            for part in parts:
                self._pending += part
            return True
        if self._mid_line:
            parts = (b"\n", *parts)
            total += 1
        try:
            written = os.writev(self._fd, parts)
        except (BlockingIOError, InterruptedError):
            written = 0 if self.pollable else -1
        except OSError as exc:
            if exc.errno not in _NO_ROOM:
                self._break(exc)
            return False
        if written < 0:
            return False
        self.written += written
        self._mid_line = False
        if written == total:
            return True
        rest = b"".join(parts)[written:]
        if self.pollable:
            self._pending += rest
            self._pending_changed(True)
            return True
        # A regular file took part of it (a full disk, say): the rest, the plain way.
        while rest:
            try:
                count = os.write(self._fd, rest)
            except OSError as exc:
                if exc.errno not in _NO_ROOM:
                    self._break(exc)
                self._mid_line = True
                return False
            if count <= 0:
                self._mid_line = True
                return False
            self.written += count
            rest = rest[count:]
        return True

    def flush(self) -> None:
        """The fd is writable: write what waits (the selector calls this)."""
        if self.broken is not None or not self._pending:
            return
        written = self._write(self._pending)
        if written is None or written == _FULL:
            return
        del self._pending[:written]
        if not self._pending:
            self._pending_changed(False)
            if self.dropped:
                self._announce_dropped()

    def close(self, wait_s: float = EXIT_FLUSH_S) -> None:
        """At exit: give the reader up to `wait_s` for what waits, then let it go."""
        deadline = time.monotonic() + wait_s
        while self._pending and self.broken is None and self.pollable:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            poller = select.poll()
            poller.register(self._fd, select.POLLOUT)
            if poller.poll(remaining * 1000):
                self.flush()
            else:
                break
        self._pending.clear()
        if self._restore_flags is not None:
            with contextlib.suppress(OSError):
                fcntl.fcntl(self._fd, fcntl.F_SETFL, self._restore_flags)
            self._restore_flags = None
        if self._fd != self._source_fd:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = self._source_fd
            self.broken = self.broken or OSError(errno.EBADF, "closed")

    # -- internals --

    def _write_now(self, data: bytes) -> None:
        if self._mid_line:  # an earlier line was cut by a full disk: end it first
            data = b"\n" + data
        started = False
        while data:
            written = self._write(data)
            if written == _FULL and self.pollable:
                self._buffer(data)  # the reader is slow: the selector flushes later
                return
            if written is None or written <= 0:
                if written is not None:
                    self.dropped += 1
                self._mid_line = self._mid_line or started
                return
            started = True
            data = data[written:]
            if data and self.pollable:
                self._buffer(data)
                return
        self._mid_line = False

    def _write(self, data: bytes | bytearray | memoryview) -> int | None:
        """Bytes written; _FULL if the reader takes nothing now; None if lost."""
        try:
            written = os.write(self._fd, data)
        except (BlockingIOError, InterruptedError):
            return _FULL
        except OSError as exc:
            if exc.errno in _NO_ROOM:
                self.dropped += 1
            else:
                self._break(exc)
            return None
        self.written += written
        return written

    def _buffer(self, data: bytes) -> None:
        if len(self._pending) + len(data) > self.max_pending:
            self.dropped += 1
            return
        was_empty = not self._pending
        self._pending += data
        if was_empty:
            self._pending_changed(True)

    def _break(self, exc: OSError) -> None:
        self.broken = exc
        if self._pending:
            self._pending.clear()
            self._pending_changed(False)

    def _pending_changed(self, waiting: bool) -> None:
        if self._on_pending is not None:
            try:
                self._on_pending(waiting)
            except Exception:  # the selector refused: keep logging without it
                self._on_pending = None

    def _announce_dropped(self) -> None:
        if self.announce is None:
            return
        count, self.dropped = self.dropped, 0
        self._announcing = True
        try:
            self.announce(count)
        except Exception:
            pass
        finally:
            self._announcing = False
        if self.dropped:  # the announcement itself found no room: keep the count
            self.dropped += count


class _StreamWriter:
    """For a stream without a file descriptor (tests): plain writes, errors swallowed."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.dropped = 0
        self.broken: OSError | None = None
        self.pollable = False

    def write_line(self, line: str) -> None:
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            self.dropped += 1

    def drop(self) -> None:
        self.dropped += 1

    def close(self, wait_s: float = EXIT_FLUSH_S) -> None:
        pass


class RecentLines:
    """The daemon's own recent log lines, in memory, for `supctl maintail` (at most
    `size` bytes), and the listeners of `maintail -f`."""

    def __init__(self, size: int = RECENT_BYTES) -> None:
        self.size = size
        self._lines: deque[str] = deque()
        self._bytes = 0
        self._listeners: list[Callable[[str], bool]] = []

    def add(self, line: str) -> None:
        self._lines.append(line)
        self._bytes += len(line) + 1
        while self._bytes > self.size and len(self._lines) > 1:
            self._bytes -= len(self._lines.popleft()) + 1
        if self._listeners:
            listeners, self._listeners = self._listeners, []
            kept = []
            for listener in listeners:
                try:
                    if listener(line):
                        kept.append(listener)
                except Exception:
                    pass
            self._listeners = kept + self._listeners

    def last(self, nlines: int | None = None) -> list[str]:
        lines = list(self._lines)
        return lines if nlines is None else lines[len(lines) - nlines :] if nlines else []

    def follow(self, listener: Callable[[str], bool]) -> Callable[[], None]:
        self._listeners.append(listener)

        def remove() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return remove


RECENT = RecentLines()


class _LineLogger:
    """structlog's final logger: hands every rendered line to the writer (and the ring)."""

    def __init__(self, writer: LogWriter | _StreamWriter) -> None:
        self.writer = writer

    def msg(self, message: str) -> None:
        RECENT.add(message)
        self.writer.write_line(message)

    log = debug = info = warn = warning = error = err = critical = exception = fatal = msg


# --------------------------------------------------------------------------- rate limit


# Fields that differ between otherwise identical events (a refused client's pid).
_VOLATILE: Final = frozenset(
    {"event", "pid", "conn", "delay_s", "failures", "uptime_s", "timestamp"}
)
_PLAIN: Final = (str, int, float, bool, type(None))


@dataclass(slots=True)
class _Window:
    end: float
    count: int = 0
    suppressed: int = 0


class RateLimiter:
    """A structlog processor: at most `burst` identical events per `window_s`."""

    def __init__(
        self,
        burst: int = BURST,
        window_s: float = WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.burst = burst
        self.window_s = window_s
        self.clock = clock
        self._windows: dict[tuple[Any, ...], _Window] = {}
        self._next_report = float("inf")  # earliest end of a window with suppressed events
        self._reporting = False
        # Logs the leftovers: (event, process, count, the fields that made them identical).
        self.report: Callable[[str, Any, int, dict[str, Any]], None] | None = None

    def __call__(
        self, _logger: Any, method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        now = self.clock()
        key = self._key(method, event_dict)
        window = self._windows.get(key)
        if window is not None and now < window.end:
            window.count += 1
            if window.count > self.burst:
                window.suppressed += 1
                self._next_report = min(self._next_report, window.end)
                raise structlog.DropEvent
        else:
            if window is not None and window.suppressed:
                event_dict["suppressed"] = window.suppressed
            elif len(self._windows) >= 4096:
                self._forget_quiet(now)
            self._windows[key] = _Window(now + self.window_s, 1)
        if now >= self._next_report and not self._reporting:
            self.report_leftovers(now)
        return event_dict

    @staticmethod
    def _key(method: str, event_dict: MutableMapping[str, Any]) -> tuple[Any, ...]:
        """What makes events identical: everything but the fields that always differ."""
        fields = tuple(
            (k, v if isinstance(v, _PLAIN) else repr(v))
            for k, v in event_dict.items()
            if k not in _VOLATILE
        )
        return (method, event_dict.get("event"), event_dict.get("process"), *fields)

    def report_leftovers(self, now: float | None = None) -> None:
        """Log what was suppressed in windows that are over (all of them if `now` None)."""
        leftovers = []
        upcoming = float("inf")
        for key, window in self._windows.items():
            if not window.suppressed:
                continue
            if now is None or now >= window.end:
                leftovers.append((key, window.suppressed))
                window.suppressed = 0
            else:
                upcoming = min(upcoming, window.end)
        self._next_report = upcoming
        if self.report is None:
            return
        self._reporting = True
        try:
            for (_method, event, process, *fields), count in leftovers:
                like = {k: v for k, v in fields if k not in ("process", "level")}
                self.report(str(event), process, count, like)
        finally:
            self._reporting = False

    def _forget_quiet(self, now: float) -> None:
        self._windows = {k: w for k, w in self._windows.items() if w.suppressed or now < w.end}


# --------------------------------------------------------------------------- setup


def _add_journal_priority(
    _logger: Any, method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    event_dict["_priority"] = _SYSLOG_PRIORITY.get(method, 6)
    return event_dict


class _JournalRenderer:
    """Wrap a renderer so its line starts with the `<N>` priority prefix."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> str:
        priority = event_dict.pop("_priority", 6)
        return f"<{priority}>{self.inner(logger, method, event_dict)}"


_writer: LogWriter | _StreamWriter | None = None
_limiter: RateLimiter | None = None


def _safe_wrapper(level: int) -> type[Any]:
    """The filtering bound logger, made unable to raise: a failing processor drops."""
    base: Any = structlog.make_filtering_bound_logger(level)

    class SafeBoundLogger(base):  # type: ignore[misc]
        def _proxy_to_logger(self, method_name: str, event: Any = None, **kw: Any) -> Any:
            try:
                return super()._proxy_to_logger(method_name, event, **kw)
            except Exception:
                if _writer is not None:
                    _writer.drop()
                return None

    return SafeBoundLogger


def configure(
    log_format: str = "auto",
    log_level: str = "info",
    stream: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
) -> None:
    global _writer, _limiter
    stream = stream or sys.stderr
    environ = os.environ if environ is None else environ
    journal = stderr_is_journal(stream, environ)
    if log_format == "auto":
        log_format = "console" if stream.isatty() else "json"
    limiter = RateLimiter()
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        limiter,
    ]
    if not journal:
        processors.append(structlog.processors.TimeStamper(fmt="iso", utc=True))
    if log_format == "console":
        renderer: Any = structlog.dev.ConsoleRenderer(colors=stream.isatty() and not journal)
    else:
        processors.append(structlog.processors.format_exc_info)
        renderer = structlog.processors.JSONRenderer()
    if journal:
        processors.append(_add_journal_priority)
        renderer = _JournalRenderer(renderer)
    processors.append(renderer)
    writer = _writer_for(stream)
    structlog.configure(
        processors=processors,
        wrapper_class=_safe_wrapper(LEVELS.get(log_level, logging.INFO)),
        logger_factory=lambda *_args: _LineLogger(writer),
        cache_logger_on_first_use=False,
    )
    if isinstance(writer, LogWriter):
        writer.announce = lambda count: get_logger().warning("log_events_dropped", count=count)
    limiter.report = lambda event, process, count, like: get_logger().warning(
        "log_events_suppressed", suppressed_event=event, process=process, count=count, like=like
    )
    _limiter = limiter
    _writer = writer


def _writer_for(stream: TextIO) -> LogWriter | _StreamWriter:
    """The writer for `stream`: the one already made for its fd, or a new one."""
    try:
        fd = stream.fileno()
    except (OSError, ValueError, AttributeError):
        return _StreamWriter(stream)
    if isinstance(_writer, LogWriter) and _writer._source_fd == fd and _writer.broken is None:
        return _writer  # a reload's reconfigure keeps the buffer and the selector's watch
    try:
        stream.flush()
        writer = LogWriter(fd)
    except OSError:
        return _StreamWriter(stream)
    if _writer is None:
        atexit.register(shutdown)
    return writer


def writer() -> LogWriter | None:
    """The fd writer in use, if supd's log goes to a file descriptor."""
    return _writer if isinstance(_writer, LogWriter) else None


_streams: dict[int, LogWriter] = {}  # supd's fd 1 or 2 -> the writer of children's lines


def stream_writer(fd: int) -> LogWriter | None:
    """The writer for children's lines into supd's own fd 1 or 2 (through a dup, never
    an open() of /dev/stdout: that fails for a socket). When `fd` is the same stream as
    supd's own log (`2>&1`, a terminal, the journal stream), it is the log's writer, so
    that lines of both go out one whole line at a time through one buffer."""
    if fd in _streams:
        return _streams[fd]
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    current = writer()
    if current is not None and current.broken is None:
        with contextlib.suppress(OSError):
            own = os.fstat(current._source_fd)
            if (own.st_dev, own.st_ino) == (st.st_dev, st.st_ino):
                _streams[fd] = current
                return current
    for other_fd, other in _streams.items():
        with contextlib.suppress(OSError):
            seen = os.fstat(other_fd)
            if (seen.st_dev, seen.st_ino) == (st.st_dev, st.st_ino):
                _streams[fd] = other
                return other
    try:
        duplicate = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
        made = LogWriter(duplicate)
    except OSError:
        return None
    _streams[fd] = made
    return made


def stream_writers() -> list[LogWriter]:
    """The writers of children's lines other than the log's own (each watched once)."""
    own = writer()
    unique: dict[int, LogWriter] = {}
    for made in _streams.values():
        if made is not own:
            unique[id(made)] = made
    return list(unique.values())


def pollable_fd() -> int | None:
    """The fd the daemon's selector should watch for WRITE while lines wait, if any."""
    current = writer()
    return current.fd if current is not None and current.pollable else None


def watch(on_pending: Callable[[bool], None] | None) -> None:
    """Have `on_pending(True/False)` called when lines start/stop waiting for the reader."""
    current = writer()
    if current is not None:
        current.watch(on_pending)


def flush() -> None:
    """The log fd is writable: write what waits."""
    current = writer()
    if current is not None:
        current.flush()


def shutdown() -> None:
    """At exit: report suppressed counts, give a slow reader a moment, restore the fd."""
    if _limiter is not None:
        _limiter.report_leftovers()
    for made in stream_writers():
        made.close()
    if _writer is not None:
        _writer.close()


def get_logger(**context: Any) -> Any:
    """Without context: structlog's lazy proxy, which follows `configure` (and a test's
    `capture_logs`) at each call; `bind` would fix the configuration of the moment."""
    proxy = structlog.get_logger("supd")
    return proxy.bind(**context) if context else proxy
