"""Child output capture: non-blocking pipe reads, size-rotated log files, in-memory tail.

The daemon registers each child's stdout/stderr pipe with its selector and, when a pipe is
readable, calls `PipeReader.pump()`. The reader moves bytes from the pipe into a
`LogSink`, which appends them to a rotating log file and keeps the last `tail_size` bytes
in memory for `supctl tail`. This module knows fds and files, not programs: it must not
import the selector or the daemon.

Hot path, per readable pipe (one child writing 1 GiB must log at close to `cat` speed):

    os.readv(pipe, [shared buffer]) -> os.write(file, view[:n]) -> copy into the tail ring

No bytes object is built unless an `on_data` hook asks for one. The read buffer is one
module-level bytearray shared by every reader (the daemon is single-threaded), and a
sink allocates neither a file descriptor nor tail memory until its program first writes,
so 1,000 sleeping programs cost almost nothing.

Rotation follows supervisord: `NAME.out.log` is current, `NAME.out.log.1` the newest
backup, `.N` the oldest. See `LogSink` for when exactly a file is cut.

Error policy (why `write` never raises): the daemon loop must keep running when the disk
is full, the log folder was removed or a path is not writable. A failing sink logs one
`log_write_failed` event when the trouble starts and one `log_write_recovered` event
(with the number of bytes it had to drop) when a write succeeds again; meanwhile it keeps
the error in `last_error` and counts lost bytes in `dropped_bytes`. It does not queue
unwritten output in memory: a full disk can last for hours and the daemon's memory must
stay bounded. The tail buffer keeps receiving everything, so `supctl tail` still works.
After a failure the file is closed and opened again on the next write (or `reopen()`),
which also recreates missing folders.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gzip
import os
import re
import socket
import stat
import struct
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from . import daemonlog

# Follows the daemon's log configuration at each (rare) call.
log = daemonlog.get_logger()

DEFAULT_TAIL_SIZE = 64 * 1024
# Busy pipes grow to this (the unprivileged /proc/sys/fs/pipe-max-size default)...
BULK_PIPE_SIZE = 1024 * 1024
# ...and are read a quarter at a time. Measured with 1 GiB through one pipe into ext4:
# 256 KiB reads cost the reader about half the CPU of 1 MiB reads (same number of
# wakeups and context switches, so probably cache misses on the bigger buffer).
READ_BUFFER_SIZE = 256 * 1024
# A pipe starts with 16 pages; a read this large means it was full and the child blocked.
DEFAULT_PIPE_CAPACITY = 64 * 1024
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_FIONREAD = 0x541B  # termios.FIONREAD on Linux; not worth importing termios for

# O_NONBLOCK: opening a FIFO without a reader would block the loop forever (it fails
# with ENXIO instead), and writing to a full one would too (EAGAIN: dropped, counted).
# Regular files ignore the flag.
_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NONBLOCK
# How often a sink asks whether its file was deleted under it (one fstat).
LINK_CHECK_S = 1.0
# A deleted file's bytes written since the last check are copied into the new file;
# at most this many (a flood writes fast), the rest counts as dropped.
MAX_RECOVERED = 4 << 20
_FILE_MODE = 0o644
_FOLDER_MODE = 0o755


# --- OS calls ----------------------------------------------------------------------------


def _open_log_file(path: Path, truncate: bool) -> tuple[int, os.stat_result]:
    """Open `path` for appending, creating it and missing parent folders."""
    flags = _OPEN_FLAGS | (os.O_TRUNC if truncate else 0)
    try:
        fd = os.open(path, flags, _FILE_MODE)
    except FileNotFoundError:
        os.makedirs(path.parent, mode=_FOLDER_MODE, exist_ok=True)
        fd = os.open(path, flags, _FILE_MODE)
    try:
        return fd, os.fstat(fd)
    except OSError:
        os.close(fd)
        raise


def _copy_range(source_fd: int, target_fd: int, start: int, end: int) -> int:
    """Copy bytes [start, end) of the (possibly deleted) file open as `source_fd` to
    `target_fd`; returns how many. Reads through /proc: ours is write-only."""
    reader = os.open(f"/proc/self/fd/{source_fd}", os.O_RDONLY | os.O_CLOEXEC)
    copied = 0
    try:
        while start + copied < end:
            chunk = os.pread(reader, min(READ_BUFFER_SIZE, end - start - copied), start + copied)
            if not chunk:
                break
            _write_all(target_fd, memoryview(chunk))
            copied += len(chunk)
    finally:
        os.close(reader)
    return copied


def _write_all(fd: int, data: memoryview) -> None:
    """Write every byte of `data`, looping over short writes. Raises OSError."""
    while data:
        written = os.write(fd, data)
        if written == 0:  # regular files never do this; don't spin if something does
            raise OSError(errno.EIO, "write() wrote nothing")
        data = data[written:]


def _rename_if_exists(source: Path, target: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.rename(source, target)


def _unlink_if_exists(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _read_into(fd: int, buffer: bytearray) -> int | None:
    """Bytes read into `buffer`; 0 at end of file; None when the pipe is empty."""
    try:
        return os.readv(fd, [buffer])
    except BlockingIOError:
        return None


def _pending_bytes(fd: int) -> int:
    """How many bytes the pipe holds right now (FIONREAD)."""
    return int.from_bytes(fcntl.ioctl(fd, _FIONREAD, b"\0\0\0\0"), "little", signed=True)


def set_pipe_size(fd: int, size: int) -> None:
    """Ask the kernel to resize a pipe's buffer (F_SETPIPE_SZ), best-effort.

    EPERM (over /proc/sys/fs/pipe-max-size or the per-user pipe quota) and EBUSY (the
    pipe holds more than `size`) leave the pipe as it was. Other errors, such as EBADF or
    EINVAL for an fd that is not a pipe, are caller bugs and raise.
    """
    try:
        fcntl.fcntl(fd, _F_SETPIPE_SZ, size)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EBUSY):
            raise


# --- Timestamps --------------------------------------------------------------------------


def format_stamp(style: str, wall: float) -> bytes:
    """The stamp put before a line read at `wall` (time.time()), with its space.

    iso: local time with its UTC offset; iso-utc: UTC with `Z`; epoch: seconds. All to
    the millisecond, the time supd read the line."""
    if style == "epoch":
        return b"%.3f " % wall
    if style == "iso-utc":
        moment = datetime.fromtimestamp(wall, UTC)
        return moment.strftime("%Y-%m-%dT%H:%M:%S.").encode() + b"%03dZ " % (
            moment.microsecond // 1000
        )
    moment = datetime.fromtimestamp(wall).astimezone()
    text = moment.isoformat(timespec="milliseconds")
    return text.encode() + b" "


class _Stamper:
    """Caches the stamp of the current millisecond: a flood reads many chunks in one."""

    __slots__ = ("_bytes", "_ms", "style")

    def __init__(self, style: str) -> None:
        self.style = style
        self._ms = -1
        self._bytes = b""

    def __call__(self, wall: float) -> bytes:
        ms = int(wall * 1000)
        if ms != self._ms:
            self._ms = ms
            self._bytes = format_stamp(self.style, ms / 1000)
        return self._bytes


_STAMP_PATTERN = re.compile(
    rb"(?P<iso>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:\d\d)) "
    rb"|(?P<epoch>\d{9,11}\.\d{3}) "
)


def parse_stamp(line: bytes) -> float | None:
    """The wall time of a line that starts with a supd stamp (any style), else None."""
    match = _STAMP_PATTERN.match(line)
    if match is None:
        return None
    if match.group("epoch") is not None:
        return float(match.group("epoch"))
    text = match.group("iso").decode()
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


# --- Tail ring ---------------------------------------------------------------------------


class TailBuffer:
    """The last `size` bytes of a stream.

    It grows like a plain bytearray until it holds `size` bytes, so a quiet program costs
    only what it wrote, then turns into a fixed ring: each append is one or two memcpy
    of at most `size` bytes, whatever the stream's total throughput.
    """

    __slots__ = ("_data", "_end", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        # The shared empty bytes until the first append: two streams per process, most
        # of them quiet, would each hold an empty bytearray (56 bytes) otherwise.
        self._data: bytearray | bytes = b""
        # Once full: where the next byte goes, which is also where the oldest byte is.
        self._end = 0

    def __len__(self) -> int:
        return len(self._data)

    def append(self, chunk: memoryview) -> None:
        data = self._data
        if not isinstance(data, bytearray):
            data = self._data = bytearray()
        size = self.size
        if len(chunk) >= size:
            data[:] = chunk[len(chunk) - size :]
            self._end = 0
            return
        missing = size - len(data)
        if missing > 0:
            data += chunk[:missing]
            chunk = chunk[missing:]
            if not chunk:
                return
        self._overwrite_oldest(data, chunk)

    def _overwrite_oldest(self, data: bytearray, chunk: memoryview) -> None:
        end = self._end
        first = min(len(chunk), self.size - end)
        data[end : end + first] = chunk[:first]
        wrapped = len(chunk) - first
        if wrapped:
            data[:wrapped] = chunk[first:]
        self._end = (end + len(chunk)) % self.size

    def last(self, nbytes: int) -> bytes:
        """The last `nbytes` bytes held (fewer if fewer were written)."""
        nbytes = min(nbytes, len(self._data))
        if nbytes <= 0:
            return b""
        if len(self._data) < self.size or self._end == 0:
            return bytes(self._data[-nbytes:])
        start = self._end - nbytes
        if start >= 0:
            return bytes(self._data[start : self._end])
        return bytes(self._data[start:]) + bytes(self._data[: self._end])


# --- Log file ----------------------------------------------------------------------------


class LogSink:
    """One output stream of one process: rotating log file plus in-memory tail.

    `path` None discards the output (the tail is still kept). The file is opened lazily
    on the first write (or by `reopen()`), so idle programs hold no file descriptor.

    Rotation (`maxbytes` > 0, regular files only): a file never grows past `maxbytes`.
    When a write would overflow it, the file is cut at the last newline that leaves it
    at least half full; failing that, before the write if the file already ends a line and
    is at least half full; failing that (a line longer than that), exactly at `maxbytes`.
    So lines stay whole unless they are too long to, and output without any newline
    still rotates. With `backups` > 0, NAME -> NAME.1 -> ... -> NAME.N and the old NAME.N
    is dropped; with `backups` == 0 the file is truncated and written again from the
    start, as supervisord does. Size is tracked from our own writes, starting from the
    size of the file when it was opened.
    """

    __slots__ = (
        "_at_line_start",
        "_checked_size",
        "_ends_line",
        "_fd",
        "_next_link_check",
        "_regular",
        "_rotate_at",
        "_rotate_failing",
        "_rotates",
        "_size",
        "_stamper",
        "_tail",
        "_tail_size",
        "_truncate_on_open",
        "_where",
        "_write_failing",
        "backups",
        "bytes_written",
        "compress",
        "dropped_bytes",
        "last_error",
        "max_total_size",
        "maxbytes",
        "on_rotated",
        "rotate_every",
        "rotations",
    )

    def __init__(
        self,
        path: Path | None,
        maxbytes: int,
        backups: int,
        tail_size: int = DEFAULT_TAIL_SIZE,
        *,
        timestamps: str = "none",
        rotate_every: float | None = None,
        max_total_size: int = 0,
        compress: bool = False,
    ) -> None:
        # The file's name as a str: a Path costs 0.4 KiB (its parts, its cached string)
        # against 0.1, and there are two per process; `path` makes one when needed (to
        # open, rotate, read back: never per write).
        self._where = None if path is None else os.fspath(path)
        if max_total_size and (maxbytes == 0 or maxbytes > max_total_size // 2):
            maxbytes = max(1, max_total_size // 2)  # room for the current file and a backup
        self.maxbytes = maxbytes
        self.backups = backups
        self.rotate_every = rotate_every
        self.max_total_size = max_total_size
        self.compress = compress and backups > 0
        # The daemon's hook to gzip a new NAME.1 (compress = true); see Compression.
        self.on_rotated: Callable[[LogSink], None] | None = None
        self.rotations = 0  # how many times the file was cut: a backup's number moves on
        self._rotate_at = float("inf")  # wall time of the next rotation by age
        self._stamper = _Stamper(timestamps) if timestamps != "none" else None
        self._at_line_start = True
        self.bytes_written = 0  # every byte ever given to write(), kept or dropped
        self.dropped_bytes = 0  # bytes that could not be written to the file
        self.last_error: OSError | None = None  # set while the file is failing
        # Made at the first write (most programs are quiet; 56 bytes a stream saved).
        self._tail: TailBuffer | None = None
        self._tail_size = tail_size
        self._fd: int | None = None
        self._size = 0
        self._rotates = False  # whether the open file is regular and maxbytes > 0
        self._regular = False  # whether the open file is a regular file
        self._next_link_check = 0.0  # monotonic time of the next "was it deleted?" check
        self._checked_size = 0  # the file's size at the last check
        self._ends_line = True  # whether the open file's last byte is a newline
        self._truncate_on_open = False
        self._write_failing = False
        self._rotate_failing = False

    # -- public --

    @property
    def path(self) -> Path | None:
        """The log file (None: the output is discarded)."""
        return None if self._where is None else Path(self._where)

    def _file(self) -> Path:
        assert self._where is not None
        return Path(self._where)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append `data`, rotating as needed. Never raises OSError (see module doc)."""
        chunk = memoryview(data) if not isinstance(data, memoryview) else data
        if chunk.format != "B":
            chunk = chunk.cast("B")
        if not chunk:
            return
        self.bytes_written += len(chunk)
        if self._stamper is not None:
            chunk = self._stamped(chunk)
        tail = self._tail
        if tail is None:
            tail = self._tail = TailBuffer(self._tail_size)
        tail.append(chunk)
        if self._where is not None:
            self._write_file(chunk)

    def _stamped(self, chunk: memoryview) -> memoryview:
        """`chunk` with a stamp before each line that starts in it (a line continued
        from the previous chunk keeps the stamp of its start)."""
        assert self._stamper is not None
        stamp = self._stamper(time.time())
        data = bytes(chunk)
        body = data[:-1].replace(b"\n", b"\n" + stamp) + data[-1:]
        if self._at_line_start:
            body = stamp + body
        self._at_line_start = data[-1] == 0x0A
        return memoryview(body)

    def rotate_now(self) -> bool:
        """Cut the file now (`supctl logs rotate`). False if there is nothing to cut or
        the rename failed (logged)."""
        if self._where is None or self._is_stream():
            return False
        if self._fd is None and not self._open():
            return False
        if self._size == 0 or not self._rotates_at_all():
            return False
        return self._rotate()

    def files(self) -> list[tuple[Path, int]]:
        """The current file and its backups that exist, with their sizes."""
        if self._where is None:
            return []
        found = []
        for number in range(self.backups + 1):
            for candidate in _numbered(self._file(), number):
                with contextlib.suppress(OSError):
                    found.append((candidate, os.stat(candidate).st_size))
        return found

    def _is_stream(self) -> bool:
        return self._where is not None and is_stream_destination(self._file())

    def _rotates_at_all(self) -> bool:
        return self._regular and not self._is_stream()

    def tail(self, nbytes: int) -> bytes:
        """The last `nbytes` bytes of output (at most `tail_size`)."""
        return self._last(nbytes)

    def read_back(
        self, *, nbytes: int | None = None, nlines: int | None = None, limit: int
    ) -> bytes:
        """The last `nbytes` bytes or `nlines` lines of output, at most `limit` bytes.

        From the log file and its backups (`read_log_tail`), so a tail can reach further
        back than the memory tail; from memory when there is no file, it cannot be read,
        or writing to it is failing (the memory tail then holds what the file lacks).
        """
        if self._where is not None and self.last_error is None:
            data = read_log_tail(
                self._file(), self.backups, nbytes=nbytes, nlines=nlines, limit=limit
            )
            if data is not None:
                return data
        if nlines is None:
            return self._last(limit if nbytes is None else min(nbytes, limit))
        return _last_lines(self._last(limit), nlines)

    def read_since(self, since: float, *, limit: int) -> bytes:
        """What was written at or after wall time `since` (see read_log_since); from
        memory when there is no readable file."""
        if self._where is not None and self.last_error is None:
            data = read_log_since(self._file(), self.backups, since, limit=limit)
            if data is not None:
                return data
        return lines_since(self._last(limit), since)

    @property
    def tail_size(self) -> int:
        return self._tail_size

    def _last(self, nbytes: int) -> bytes:
        return b"" if self._tail is None else self._tail.last(nbytes)

    def reopen(self) -> None:
        """Close and reopen the path, creating it: for SIGUSR2 after logrotate moved it.

        A sink that never wrote stays closed (its file appears with its first write), so
        that a SIGUSR2 doesn't make 1,000 quiet programs each hold an fd.
        """
        was_in_use = self._fd is not None or self._write_failing
        self.close()
        if self._where is not None and was_in_use:
            self._open()

    def close(self) -> None:
        """Close the file. A later write opens it again."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.close(fd)
            except OSError as exc:  # NFS can report a failed flush here
                self._write_failed(exc, 0)

    # -- writing --

    def _write_file(self, chunk: memoryview) -> None:
        if self._regular and self._fd is not None:
            now = time.monotonic()
            if now >= self._next_link_check:
                self._next_link_check = now + LINK_CHECK_S
                self._check_still_linked()
        if (
            self._fd is not None
            and self._rotate_at != float("inf")
            and time.time() >= self._rotate_at
        ):
            chunk = self._rotate_by_age(chunk)
        while chunk:
            if self._fd is None and not self._open():
                self._write_failed(None, len(chunk))
                return
            cut = self._rotation_cut(chunk) if self._rotates else None
            if cut is None:
                self._append(chunk)
                return
            if cut and not self._append(chunk[:cut]):
                self._write_failed(None, len(chunk) - cut)
                return
            chunk = chunk[cut:]
            if not self._rotate():
                # Better a file past maxbytes than lost output; the next write retries.
                self._append(chunk)
                return

    def _rotation_cut(self, chunk: memoryview) -> int | None:
        """How many bytes of `chunk` still go into this file; None if all of it fits."""
        room = self.maxbytes - self._size
        if len(chunk) <= room:
            return None
        if room <= 0:
            return 0
        half = self.maxbytes // 2
        search_from = max(0, half - self._size)
        if search_from < room:
            # Copies at most maxbytes/2, once per rotation: memoryview has no rfind.
            newline = bytes(chunk[search_from:room]).rfind(b"\n")
            if newline >= 0:
                return search_from + newline + 1
        if self._ends_line and self._size >= half and self._size > 0:
            return 0
        return room

    def _append(self, chunk: memoryview) -> bool:
        assert self._fd is not None
        try:
            _write_all(self._fd, chunk)
        except OSError as exc:
            # Reopen on the next write: the fd may be stale (EIO, ESTALE) and a fresh
            # open recreates a removed folder.
            self.close()
            self._write_failed(exc, len(chunk))
            return False
        self._size += len(chunk)
        self._ends_line = chunk[-1] == 0x0A
        if self._write_failing:
            self._write_recovered()
        return True

    def _open(self) -> bool:
        assert self._where is not None
        try:
            fd, st = _open_log_file(self._file(), self._truncate_on_open)
        except OSError as exc:
            self._write_failed(exc, 0)
            return False
        self._fd = fd
        self._size = st.st_size
        self._checked_size = st.st_size
        self._regular = stat.S_ISREG(st.st_mode)
        self._next_link_check = time.monotonic() + LINK_CHECK_S
        # /dev/..., a FIFO or /dev/null: never rename those, even when one of them
        # resolves to a regular file (/dev/stdout of a supd started with `> file`).
        self._rotates = self.maxbytes > 0 and self._rotates_at_all()
        self._rotate_at = float("inf")
        if self.rotate_every is not None and self._rotates_at_all():
            self._rotate_at = self._last_rotation() + self.rotate_every
        # We cannot read an O_WRONLY file's last byte; a new run starts on a new line.
        self._ends_line = True
        self._truncate_on_open = False
        return True

    def _last_rotation(self) -> float:
        """When the current file was started, as far as the disk tells: NAME.1 stopped
        changing when it was cut (a restart of supd keeps the age), else now."""
        assert self._where is not None
        for candidate in _numbered(self._file(), 1):
            with contextlib.suppress(OSError):
                return min(time.time(), os.stat(candidate).st_mtime)
        return time.time()

    def _rotate_by_age(self, chunk: memoryview) -> memoryview:
        """The file is `rotate_every` old: cut it where the current line ends (at once if
        it ends one) and return what goes into the new file."""
        cut = 0
        if not self._ends_line:
            newline = bytes(chunk).find(b"\n")
            if newline >= 0:
                cut = newline + 1
            elif time.time() < self._rotate_at + self.rotate_every:  # type: ignore[operator]
                return chunk  # a line still going on: wait for its end, within reason
        if cut and not self._append(chunk[:cut]):
            return chunk[cut:]
        if self._size > 0:
            self._rotate()
        else:
            self._rotate_at = time.time() + (self.rotate_every or 0)
        return chunk[cut:]

    # -- a file deleted under us --

    def _open_fd(self) -> int:
        assert self._fd is not None
        return self._fd

    def _check_still_linked(self) -> None:
        """If our file was deleted (or its folder removed), write to a new one from now
        on, with what went into the deleted one since the last check copied over."""
        assert self._fd is not None and self._where is not None
        try:
            if os.fstat(self._fd).st_nlink > 0:
                self._checked_size = self._size
                return
        except OSError:
            return  # the write that follows finds out what is wrong
        old_fd, self._fd = self._fd, None
        start, end = self._checked_size, self._size
        if not self._open():
            os.close(old_fd)
            return
        new_fd = self._open_fd()
        recovered = 0
        try:
            first = max(start, end - MAX_RECOVERED)
            self.dropped_bytes += first - start
            recovered = _copy_range(old_fd, new_fd, first, end)
            self._size += recovered
        except OSError as exc:
            log.warning("log_recovery_failed", path=str(self._file()), error=str(exc))
        finally:
            os.close(old_fd)
        self._checked_size = self._size
        log.warning("log_file_deleted", path=str(self._file()), reopened=True, recovered=recovered)

    # -- rotation --

    def _rotate(self) -> bool:
        """Start a new current file. False (and the file unchanged) if that failed."""
        assert self._where is not None
        if self.backups > 0:
            try:
                self._shift_backups(self._file())
            except OSError as exc:
                self._rotate_failed(exc)
                return False
        else:
            self._truncate_on_open = True
        self.close()
        self.rotations += 1
        if self._rotate_failing:
            self._rotate_recovered()
        if self.backups > 0:
            if self.compress and self.on_rotated is not None:
                self.on_rotated(self)
            self.enforce_total_size()
        # The next file's age starts now (the next write opens it).
        return True

    def enforce_total_size(self) -> None:
        """Delete the oldest backups while the log and its backups could pass
        max_total_size (counting the current file at its full maxbytes)."""
        if not self.max_total_size or self._where is None:
            return
        files = self.files()
        # The current file will grow to maxbytes: keep room for it.
        current = sum(size for path, size in files if path == self._file())
        total = sum(size for _, size in files) - current + max(current, self.maxbytes)
        for path, size in reversed(files):
            if total <= self.max_total_size or path == self._file():
                break
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            total -= size

    def _shift_backups(self, path: Path) -> None:
        """Drop NAME.N, then NAME.N-1 -> NAME.N, ..., NAME -> NAME.1.

        Deleting the oldest first makes every rename land on a free name. Renaming a file
        *over* another one makes ext4 (auto_da_alloc) flush the renamed file's dirty data
        right away: measured here, about 15 ms per 50 MB rotation, a third of the time
        spent logging 1 GiB.
        A missing file is fine: fewer backups exist yet, or logrotate moved NAME away.
        Any other error stops the shift before NAME.1 is taken, so no backup is lost.
        """
        for oldest in _numbered(path, self.backups):
            _unlink_if_exists(oldest)
        for number in range(self.backups - 1, 0, -1):
            source, source_gz = _numbered(path, number)
            target, target_gz = _numbered(path, number + 1)
            _rename_if_exists(source, target)
            _rename_if_exists(source_gz, target_gz)
        _rename_if_exists(path, _backup_path(path, 1))

    # -- error reporting: one event when trouble starts, one when it ends --

    def _write_failed(self, exc: OSError | None, dropped: int) -> None:
        self.dropped_bytes += dropped
        if exc is None:
            return
        self.last_error = exc
        if not self._write_failing:
            self._write_failing = True
            log.warning("log_write_failed", path=str(self._file()), error=str(exc))

    def _write_recovered(self) -> None:
        self._write_failing = False
        if not self._rotate_failing:
            self.last_error = None
        log.info("log_write_recovered", path=str(self._file()), dropped_bytes=self.dropped_bytes)

    def _rotate_failed(self, exc: OSError) -> None:
        self.last_error = exc
        if not self._rotate_failing:
            self._rotate_failing = True
            log.warning("log_rotate_failed", path=str(self._file()), error=str(exc))

    def _rotate_recovered(self) -> None:
        self._rotate_failing = False
        if not self._write_failing:
            self.last_error = None
        log.info("log_rotate_recovered", path=str(self._file()))


def _backup_path(path: Path, number: int) -> Path:
    return path.with_name(f"{path.name}.{number}")


def _numbered(path: Path, number: int) -> tuple[Path, ...]:
    """The names file number `number` of a log may have: NAME, or NAME.N and NAME.N.gz."""
    if number == 0:
        return (path,)
    backup = _backup_path(path, number)
    return (backup, backup.with_name(backup.name + ".gz"))


def is_stream_destination(path: Path | str) -> bool:
    """Anything under /dev, /proc/self/fd, or "-": a stream, never renamed or cut."""
    text = str(path)
    return text == "-" or text.startswith(("/dev/", "/proc/self/fd/"))


# --- Whole lines into a shared stream or the journal -------------------------------------

# A partial line waits for its end up to this size, or FLUSH_AFTER_S seconds.
MAX_HELD_LINE = 64 * 1024
FLUSH_AFTER_S = 1.0


class LineTarget(Protocol):
    """Where a `LineSink` sends whole lines."""

    def send(self, parts: tuple[bytes | memoryview, ...]) -> bool:
        """`parts`, joined, are whole lines, each ending in a newline. False if they
        were dropped."""
        ...


class LineSink:
    """One output stream sent line by line: to supd's own stdout/stderr or the journal.

    Such a destination is shared (by other programs, and by supd's own log), so only
    whole lines go out: a partial line waits in `_held` for its end, at most
    MAX_HELD_LINE bytes or until the daemon calls `flush_partial()` (FLUSH_AFTER_S after
    `on_partial` told it a partial line is waiting). A flushed partial line goes out as
    a line of its own; its continuation is another line, with the prefix but without a
    timestamp. Nothing is ever renamed or rotated. A target that cannot take lines (supd's
    stdout blocked past its buffer) drops them; they are counted in `dropped_lines` and
    `dropped_bytes`, with one `log_output_dropped` event when dropping starts and one
    `log_output_recovered` (with the counts) when lines get through again.
    """

    __slots__ = (
        "_continued",
        "_held",
        "_held_at",
        "_separator",
        "_stamper",
        "_tail",
        "bytes_written",
        "description",
        "dropped_bytes",
        "dropped_lines",
        "holds",
        "last_error",
        "on_partial",
        "path",
        "prefix",
        "target",
    )

    def __init__(
        self,
        target: LineTarget,
        prefix: bytes,
        description: str,
        *,
        timestamps: str = "none",
        tail_size: int = DEFAULT_TAIL_SIZE,
    ) -> None:
        self.target = target
        self.prefix = prefix
        self._separator = b"\n" + prefix
        self.description = description  # "/dev/stdout", "journal": for logs and `logs`
        self.path: Path | None = None  # no file: tails come from memory
        self.bytes_written = 0
        self.dropped_bytes = 0
        self.dropped_lines = 0
        self.last_error: OSError | None = None
        self.on_partial: Callable[[LineSink], None] | None = None
        self._stamper = _Stamper(timestamps) if timestamps != "none" else None
        self._tail = TailBuffer(tail_size)
        self._held = bytearray()
        self._held_at = 0.0  # wall time the held line's first byte was read
        self._continued = False  # the held line continues one flushed already (no stamp)
        self.holds = 0  # partial lines held so far: tells the flush timer which it was for

    @property
    def tail_size(self) -> int:
        return self._tail.size

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        chunk = bytes(data)
        self.bytes_written += len(chunk)
        last_newline = chunk.rfind(b"\n")
        if last_newline < 0:
            self._tail.append(memoryview(chunk))
            self._hold(chunk)
            return
        complete = chunk[: last_newline + 1] if last_newline + 1 < len(chunk) else chunk
        if self._stamper is not None:
            stamp = self._stamper(time.time())
            stamped = complete.replace(b"\n", b"\n" + stamp)
            stamped = stamped[: len(stamped) - len(stamp)]
            start = self._line_start(self._held_at if self._held else 0.0, stamp)
            self._tail.append(memoryview(start[len(self.prefix) :] + stamped))
            complete = stamped
        else:
            start = self.prefix
            self._tail.append(memoryview(complete))
        # One pass of C code per chunk: the prefix after every newline, the last one's
        # cut off again without a copy; the pieces go out in one writev.
        lines = complete.replace(b"\n", self._separator)
        body = memoryview(lines)[: len(lines) - len(self.prefix)]
        if self._held:
            held = bytes(self._held)
            self._held.clear()
            self._send((start, held, body))
        else:
            self._send((start, body))
        self._continued = False
        if last_newline + 1 < len(chunk):
            rest = chunk[last_newline + 1 :]
            self._tail.append(memoryview(rest))
            self._hold(rest)

    def flush_partial(self) -> None:
        """Send the partial line now, as a line of its own (the timer, or the end)."""
        if not self._held:
            return
        stamp = self._stamper(self._held_at) if self._stamper is not None else b""
        line = self._line_start(self._held_at, stamp) + bytes(self._held) + b"\n"
        self._held.clear()
        self._continued = True
        self._tail.append(memoryview(b"\n"))
        self._send((line,))

    def _line_start(self, held_at: float, stamp: bytes) -> bytes:
        """The prefix (and stamp) of the chunk's first line: a held line's own stamp,
        none for the continuation of a line flushed already."""
        if self._stamper is None or self._continued:
            return self.prefix
        if self._held:
            return self.prefix + self._stamper(held_at)
        return self.prefix + stamp

    def _hold(self, data: bytes) -> None:
        if not self._held:
            self.holds += 1
            self._held_at = time.time()
            if self.on_partial is not None:
                self.on_partial(self)
        self._held += data
        if len(self._held) >= MAX_HELD_LINE:
            self.flush_partial()

    def _send(self, parts: tuple[bytes | memoryview, ...]) -> None:
        if self.target.send(parts):
            if self.dropped_lines and self.last_error is not None:
                self.last_error = None
                log.info(
                    "log_output_recovered",
                    destination=self.description,
                    dropped_lines=self.dropped_lines,
                    dropped_bytes=self.dropped_bytes,
                )
            return
        self.dropped_lines += sum(bytes(part).count(b"\n") for part in parts)
        self.dropped_bytes += sum(len(part) for part in parts)
        if self.last_error is None:
            self.last_error = OSError(errno.EAGAIN, f"{self.description} is not keeping up")
            log.warning("log_output_dropped", destination=self.description)

    # -- the LogSink interface the daemon uses --

    def tail(self, nbytes: int) -> bytes:
        return self._tail.last(nbytes)

    def read_back(
        self, *, nbytes: int | None = None, nlines: int | None = None, limit: int
    ) -> bytes:
        if nlines is None:
            return self._tail.last(limit if nbytes is None else min(nbytes, limit))
        return _last_lines(self._tail.last(limit), nlines)

    def read_since(self, since: float, *, limit: int) -> bytes:
        return lines_since(self._tail.last(limit), since)

    def rotate_now(self) -> bool:
        return False  # a stream is never rotated

    def files(self) -> list[tuple[Path, int]]:
        return []

    def enforce_total_size(self) -> None:
        pass

    def reopen(self) -> None:
        pass

    def close(self) -> None:
        self.flush_partial()


class WriterLike(Protocol):
    def write_data(self, parts: tuple[bytes | memoryview, ...]) -> bool: ...


class StreamTarget:
    """supd's own stdout or stderr, through the daemon's non-blocking line writer
    (daemonlog.LogWriter), shared with supd's own log when it is the same stream."""

    __slots__ = ("writer",)

    def __init__(self, writer: WriterLike) -> None:
        self.writer = writer

    def send(self, parts: tuple[bytes | memoryview, ...]) -> bool:
        return self.writer.write_data(parts)


# -- journald ------------------------------------------------------------------------------

_PRIORITY_PREFIX = re.compile(rb"<([0-7])>")


def journal_field(name: str, value: bytes) -> bytes:
    """One field of the native journal protocol: NAME=value, or for a value holding a
    newline the binary-safe form: NAME, newline, 64-bit little-endian length, value."""
    key = name.encode()
    if b"\n" in value:
        return key + b"\n" + struct.pack("<Q", len(value)) + value + b"\n"
    return key + b"=" + value + b"\n"


def parse_journal_entry(datagram: bytes) -> dict[str, bytes]:
    """Fields of one native-protocol datagram (the journal's own parsing; for tests and
    tools). Raises ValueError on a malformed entry."""
    fields: dict[str, bytes] = {}
    position = 0
    while position < len(datagram):
        end = datagram.find(b"\n", position)
        if end < 0:
            raise ValueError("field without a newline")
        line = datagram[position:end]
        if b"=" in line:
            name, _, value = line.partition(b"=")
            fields[name.decode()] = value
            position = end + 1
            continue
        (size,) = struct.unpack("<Q", datagram[end + 1 : end + 9])
        start = end + 9
        value = datagram[start : start + size]
        if len(value) != size or datagram[start + size : start + size + 1] != b"\n":
            raise ValueError("binary field of the wrong length")
        fields[line.decode()] = value
        position = start + size + 1
    return fields


class JournalTarget:
    """journald's native protocol: one datagram per line, sent non-blocking.

    SYSLOG_IDENTIFIER is the program (`journalctl -t web`), SUPD_PROCESS the process,
    SUPD_PID the child's pid (journald's own _PID is supd's), PRIORITY 6 for stdout and
    3 for stderr unless the line starts with an sd-daemon `<N>` prefix."""

    __slots__ = ("identifier", "path", "pid", "priority", "process", "sock")

    def __init__(
        self, sock: socket.socket, path: Path, identifier: str, process: str, priority: int
    ):
        self.sock = sock
        self.path = path
        self.identifier = identifier.encode()
        self.process = process.encode()
        self.priority = priority
        self.pid = 0  # the running child's, set by the daemon at spawn

    def send(self, parts: tuple[bytes | memoryview, ...]) -> bool:
        ok = True
        for line in b"".join(parts).split(b"\n")[:-1]:
            ok = self._send_line(line) and ok
        return ok

    def _send_line(self, message: bytes) -> bool:
        priority = self.priority
        match = _PRIORITY_PREFIX.match(message)
        if match is not None:
            priority = int(match.group(1))
            message = message[match.end() :]
        entry = b"".join(
            (
                journal_field("MESSAGE", message),
                journal_field("PRIORITY", str(priority).encode()),
                journal_field("SYSLOG_IDENTIFIER", self.identifier),
                journal_field("SUPD_PROCESS", self.process),
                journal_field("SUPD_PID", str(self.pid).encode()),
            )
        )
        try:
            self.sock.sendto(entry, str(self.path))
        except OSError:
            return False
        return True


def journal_socket(path: Path) -> socket.socket | None:
    """A non-blocking datagram socket for journald at `path`; None if it is missing."""
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return None
    except OSError:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    sock.setblocking(False)
    return sock


# --- Reading a log back ------------------------------------------------------------------

_READ_BLOCK = 64 * 1024


def read_log_tail(
    path: Path,
    backups: int,
    *,
    nbytes: int | None = None,
    nlines: int | None = None,
    limit: int,
) -> bytes | None:
    """The end of the log at `path`: its last `nbytes` bytes or `nlines` lines.

    When the current file is shorter than asked, reading goes on back into the rotated
    backups `path.1` ... `path.N` (N = `backups`), newest first. A bounded backwards
    read: blocks from the end of each file, at most `limit` bytes in all, whatever the
    files' sizes. None when `path` cannot be read or is not a regular file (a FIFO,
    /dev/stdout): the caller then has only the in-memory tail.
    """
    want = limit if nbytes is None else min(nbytes, limit)
    if nlines == 0 or want == 0:
        return b""
    chunks: list[bytes] = []  # newest first
    total = 0
    newlines = 0
    for number in range(backups + 1):
        file_path = path if number == 0 else _backup_path(path, number)
        try:
            fd = os.open(file_path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            if number == 0:
                return None
            break  # fewer backups exist (yet)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return None if number == 0 else b"".join(reversed(chunks))
            end = st.st_size
            while end > 0 and total < want:
                size = min(_READ_BLOCK, end, want - total)
                block = os.pread(fd, size, end - size)
                if not block:  # the file shrank under us (truncated): stop here
                    break
                end -= len(block)
                chunks.append(block)
                total += len(block)
                if nlines is not None:
                    newlines += block.count(b"\n")
                    # One newline more than asked: the start of the first wanted line.
                    if newlines > nlines:
                        return _last_lines(b"".join(reversed(chunks)), nlines)
        except OSError:
            if number == 0 and not chunks:
                return None
            break
        finally:
            os.close(fd)
        if total >= want:
            break
    data = b"".join(reversed(chunks))
    return data if nlines is None else _last_lines(data, nlines)


def read_log_since(path: Path, backups: int, since: float, *, limit: int) -> bytes | None:
    """The lines of the log at `path` (and its backups, gzipped ones included) written
    at or after `since` (wall time), at most the last `limit` bytes, whole lines.

    A line's time is its timestamp (log_timestamps); a line without one has the time of
    the stamped line before it. A file last modified before `since` holds nothing newer,
    so reading stops there. Without any timestamp, every line of the files modified since
    then is returned. None when `path` cannot be read or is not a regular file.
    """
    pieces: list[bytes] = []  # newest file first
    total = 0
    for number in range(backups + 1):
        data = None
        for candidate in _numbered(path, number):
            data = _read_whole_if_newer(candidate, since, limit)
            if data is not None:
                break
        if data is None:
            if number == 0:
                return None
            continue  # missing, older than `since`, or being compressed right now
        pieces.append(data)
        total += len(data)
        if total >= limit or not data:
            break
    return lines_since(b"".join(reversed(pieces)), since, limit)


def lines_since(text: bytes, since: float, limit: int | None = None) -> bytes:
    """The lines of `text` from the first one stamped at or after `since` (all of them
    when none carries a stamp), at most the last `limit` bytes, whole lines."""
    limit = len(text) if limit is None else limit
    lines = text.splitlines(keepends=True)
    start = 0
    for index, line in enumerate(lines):
        stamp = parse_stamp(line)
        if stamp is not None:
            if stamp >= since:
                start = index
                break
            start = index + 1
    kept = b"".join(lines[start:])
    if len(kept) > limit:
        kept = kept[len(kept) - limit :]
        newline = kept.find(b"\n")
        kept = kept[newline + 1 :] if 0 <= newline < len(kept) - 1 else kept
    return kept


def _read_whole_if_newer(path: Path, since: float, limit: int) -> bytes | None:
    """A log file's last `limit` bytes (decompressed if .gz); b"" if it was last changed
    before `since`; None if it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        if st.st_mtime < since:
            return b""
        if path.name.endswith(".gz"):
            with os.fdopen(os.dup(fd), "rb") as raw, gzip.GzipFile(fileobj=raw) as unzipped:
                kept = bytearray()
                while block := unzipped.read(_READ_BLOCK * 4):
                    kept += block
                    if len(kept) > 2 * limit:
                        del kept[: len(kept) - limit]
                return bytes(kept[-limit:])
        size = min(st.st_size, limit)
        return os.pread(fd, size, st.st_size - size)
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    finally:
        os.close(fd)


def _last_lines(data: bytes, count: int) -> bytes:
    """The last `count` lines of `data`; a final line without its newline counts."""
    position = len(data) - 1 if data.endswith(b"\n") else len(data)
    for _ in range(count):
        position = data.rfind(b"\n", 0, position)
        if position < 0:
            return data
    return data[position + 1 :]


# --- Pipe reader -------------------------------------------------------------------------

_read_buffer: bytearray | None = None
_read_view: memoryview | None = None


def _shared_buffer() -> tuple[bytearray, memoryview]:
    """The one read buffer, allocated on first use so importing this module stays cheap."""
    global _read_buffer, _read_view
    if _read_buffer is None or _read_view is None:
        _read_buffer = bytearray(READ_BUFFER_SIZE)
        _read_view = memoryview(_read_buffer)
    return _read_buffer, _read_view


class OutputSink(Protocol):
    """What a PipeReader writes into: a LogSink or a LineSink."""

    @property
    def path(self) -> Path | None: ...

    def write(self, data: bytes | bytearray | memoryview) -> None: ...


class PipeReader:
    """Moves a non-blocking pipe's bytes into a `LogSink`, a bounded amount per call.

    The pipe must be registered level-triggered (the selector's default): `pump` returns
    with data still in the pipe after `max_reads` reads, or as soon as one read comes back
    short (the pipe was empty at that moment), and relies on the next readiness report.

    `on_data`, if given, gets a bytes copy of every chunk (for `tail -f` followers).
    `grow_pipe_to`: once a read shows the pipe was full, enlarge it to this many bytes
    (best-effort; 0 never does). Only busy pipes grow, so 1,000 quiet programs don't
    spend the per-user pipe quota.
    """

    __slots__ = ("_grow_pipe_to", "fd", "on_data", "sink")

    def __init__(
        self,
        fd: int,
        sink: OutputSink,
        on_data: Callable[[bytes], None] | None = None,
        grow_pipe_to: int = BULK_PIPE_SIZE,
    ) -> None:
        os.set_blocking(fd, False)
        self.fd = fd
        self.sink = sink
        self.on_data = on_data
        self._grow_pipe_to = grow_pipe_to

    def pump(self, max_reads: int = 16) -> bool:
        """Read at most `max_reads` times. True at end of file: unregister and close."""
        buffer, view = _shared_buffer()
        for _ in range(max_reads):
            count = self._read(buffer)
            if count is None:
                return False
            if count == 0:
                return True
            self._deliver(view[:count])
            if count < len(buffer):
                if count >= DEFAULT_PIPE_CAPACITY:
                    self._grow_pipe()
                return False
        return False

    def drain(self) -> bool:
        """Read what the pipe holds now, for a child that exited. True at end of file.

        Bounded: a grandchild that inherited the pipe and keeps writing must not hold the
        loop here forever. Reads what FIONREAD reports plus one more buffer, which is
        enough to see end of file once the writer is gone.
        """
        buffer, view = _shared_buffer()
        try:
            budget = _pending_bytes(self.fd) + len(buffer)
        except OSError:
            budget = len(buffer)
        while budget > 0:
            count = self._read(buffer)
            if count is None:
                return False
            if count == 0:
                return True
            self._deliver(view[:count])
            budget -= count
        return False

    def _read(self, buffer: bytearray) -> int | None:
        """Like _read_into, but an unexpected error ends the stream instead of the loop."""
        try:
            return _read_into(self.fd, buffer)
        except OSError as exc:
            log.warning("pipe_read_failed", fd=self.fd, path=str(self.sink.path), error=str(exc))
            return 0

    def _deliver(self, chunk: memoryview) -> None:
        self.sink.write(chunk)
        if self.on_data is not None:
            self.on_data(bytes(chunk))

    def _grow_pipe(self) -> None:
        if self._grow_pipe_to > 0:
            set_pipe_size(self.fd, self._grow_pipe_to)
            self._grow_pipe_to = 0  # once is enough, whether or not the kernel agreed
