"""Child output capture: rotation, tail, error recovery and pipe pumping, on real files/pipes."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import random
import select
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from supd import logs
from supd.logs import LogSink, PipeReader, TailBuffer, set_pipe_size
from tests.helpers import python_command

F_GETPIPE_SZ = 1032
O_CLOEXEC_OCTAL = 0o2000000


# --- helpers -----------------------------------------------------------------------------


def backup(path: Path, number: int) -> Path:
    return path.with_name(f"{path.name}.{number}")


def all_output(path: Path, backups: int) -> bytes:
    """Backups oldest first, then the current file: everything the sink kept, in order."""
    parts = [backup(path, n) for n in range(backups, 0, -1)] + [path]
    return b"".join(p.read_bytes() for p in parts if p.exists())


def numbered_lines(count: int, seed: int, max_extra: int = 40) -> bytes:
    rng = random.Random(seed)
    return b"".join(b"%06d %s\n" % (i, b"x" * rng.randrange(max_extra + 1)) for i in range(count))


def write_in_random_chunks(sink: LogSink, data: bytes, seed: int, max_chunk: int) -> None:
    rng = random.Random(seed)
    offset = 0
    while offset < len(data):
        size = rng.randint(1, max_chunk)
        sink.write(data[offset : offset + size])
        offset += size


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def healthy(sink: LogSink) -> bool:
    """No error pending (a function, so mypy doesn't keep an earlier isinstance narrowing)."""
    return sink.last_error is None


def pipe_size(fd: int) -> int:
    return fcntl.fcntl(fd, F_GETPIPE_SZ)


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    """A pipe whose read end is non-blocking; both ends closed at teardown if still open."""
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    os.set_blocking(read_fd, False)
    yield read_fd, write_fd
    for fd in (read_fd, write_fd):
        with contextlib.suppress(OSError):
            os.close(fd)


@pytest.fixture
def small_read_buffer(monkeypatch: pytest.MonkeyPatch) -> int:
    """Shrink the shared read buffer to 4 KiB so a 64 KiB pipe takes many reads."""
    size = 4096
    buffer = bytearray(size)
    monkeypatch.setattr(logs, "_read_buffer", buffer)
    monkeypatch.setattr(logs, "_read_view", memoryview(buffer))
    return size


def pump_until_eof(reader: PipeReader, timeout: float = 20.0) -> None:
    """A level-triggered epoll loop like the daemon's, until the reader reports EOF."""
    deadline = time.monotonic() + timeout
    with select.epoll() as ep:
        ep.register(reader.fd, select.EPOLLIN)
        while time.monotonic() < deadline:
            if ep.poll(0.5) and reader.pump(max_reads=4):
                return
    raise AssertionError(f"no EOF after {timeout}s; {reader.sink.bytes_written} bytes read")


# --- rotation ----------------------------------------------------------------------------


def test_rotation_produces_numbered_backups_newest_first(tmp_path: Path) -> None:
    path = tmp_path / "web.out.log"
    sink = LogSink(path, maxbytes=100, backups=3)
    lines = [b"line %04d\n" % i for i in range(45)]  # 10 bytes each, 10 per file
    for line in lines:
        sink.write(line)
    sink.close()

    assert path.read_bytes() == b"".join(lines[40:45])
    assert backup(path, 1).read_bytes() == b"".join(lines[30:40])
    assert backup(path, 2).read_bytes() == b"".join(lines[20:30])
    assert backup(path, 3).read_bytes() == b"".join(lines[10:20])
    assert not backup(path, 4).exists()  # the oldest file (lines 0-9) was dropped


def test_rotation_waits_for_the_file_to_reach_maxbytes(tmp_path: Path) -> None:
    path = tmp_path / "web.out.log"
    sink = LogSink(path, maxbytes=100, backups=2)
    sink.write(b"a" * 99 + b"\n")
    assert path.stat().st_size == 100
    assert not backup(path, 1).exists()
    sink.write(b"b\n")
    assert backup(path, 1).read_bytes() == b"a" * 99 + b"\n"
    assert path.read_bytes() == b"b\n"


def test_rotation_cuts_at_the_last_newline_that_fits(tmp_path: Path) -> None:
    path = tmp_path / "web.out.log"
    sink = LogSink(path, maxbytes=100, backups=2)
    sink.write(b"x" * 59 + b"\n")
    sink.write(b"a" * 30 + b"\n" + b"b" * 30 + b"\n")  # only "aaa\n" fits under 100

    assert backup(path, 1).read_bytes() == b"x" * 59 + b"\n" + b"a" * 30 + b"\n"
    assert path.read_bytes() == b"b" * 30 + b"\n"


def test_rotation_moves_a_whole_line_that_does_not_fit_to_the_next_file(tmp_path: Path) -> None:
    path = tmp_path / "web.out.log"
    sink = LogSink(path, maxbytes=100, backups=2)
    sink.write(b"x" * 94 + b"\n")
    sink.write(b"y" * 19 + b"\n")

    assert backup(path, 1).read_bytes() == b"x" * 94 + b"\n"
    assert path.read_bytes() == b"y" * 19 + b"\n"


def test_output_without_newlines_is_cut_at_maxbytes(tmp_path: Path) -> None:
    path = tmp_path / "web.out.log"
    sink = LogSink(path, maxbytes=100, backups=5)
    for _ in range(7):
        sink.write(b"z" * 50)

    assert [backup(path, n).stat().st_size for n in (3, 2, 1)] == [100, 100, 100]
    assert path.read_bytes() == b"z" * 50


def test_a_chunk_larger_than_several_files_is_spread_over_them(tmp_path: Path) -> None:
    path = tmp_path / "web.out.log"
    sink = LogSink(path, maxbytes=100, backups=10)
    data = numbered_lines(60, seed=1, max_extra=5)
    sink.write(data)

    assert all_output(path, 10) == data
    assert max(p.stat().st_size for p in tmp_path.iterdir()) <= 100


def test_maxbytes_zero_never_rotates(tmp_path: Path) -> None:
    path = tmp_path / "web.out.log"
    sink = LogSink(path, maxbytes=0, backups=3)
    for _ in range(64):
        sink.write(b"q" * 16384)

    assert path.stat().st_size == 64 * 16384
    assert sorted(p.name for p in tmp_path.iterdir()) == ["web.out.log"]


def test_backups_zero_truncates_the_file_in_place(tmp_path: Path) -> None:
    path = tmp_path / "web.out.log"
    sink = LogSink(path, maxbytes=100, backups=0)
    for i in range(10):
        sink.write(b"line %04d\n" % i)
    sink.write(b"line 0010\n")

    assert path.read_bytes() == b"line 0010\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["web.out.log"]


def test_rotation_keeps_no_extra_file_descriptors(tmp_path: Path) -> None:
    before = open_fds()
    sink = LogSink(tmp_path / "web.out.log", maxbytes=64, backups=2)
    write_in_random_chunks(sink, numbered_lines(500, seed=2), seed=3, max_chunk=50)
    sink.close()
    assert open_fds() == before


def test_an_existing_file_is_appended_to_and_counts_toward_maxbytes(tmp_path: Path) -> None:
    path = tmp_path / "web.out.log"
    path.write_bytes(b"old run\n" * 10)  # 80 bytes
    sink = LogSink(path, maxbytes=100, backups=1)
    sink.write(b"new run line 1\n")  # 95 bytes now
    sink.write(b"new run line 2\n")  # would be 110: rotates first

    assert backup(path, 1).read_bytes() == b"old run\n" * 10 + b"new run line 1\n"
    assert path.read_bytes() == b"new run line 2\n"


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(
        st.sampled_from([b"a", b"bb", b"\n", b"cccccccc", b"dd\n", b"e" * 37]), max_size=60
    ).map(b"".join),
    maxbytes=st.integers(min_value=1, max_value=80),
    chunk_seed=st.integers(min_value=0, max_value=1000),
)
def test_rotation_loses_nothing_and_splits_lines_only_when_forced(
    data: bytes, maxbytes: int, chunk_seed: int
) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "p.out.log"
        backups = len(data) // max(1, maxbytes // 2) + 1  # enough to keep everything
        sink = LogSink(path, maxbytes=maxbytes, backups=backups)
        write_in_random_chunks(sink, data, seed=chunk_seed, max_chunk=50)
        sink.close()

        assert all_output(path, backups) == data
        for n in range(1, backups + 1):
            if not backup(path, n).exists():
                break
            content = backup(path, n).read_bytes()
            # A rotated file is at least half full, never over maxbytes, and ends a line
            # unless a line too long to fit forced a cut at exactly maxbytes.
            assert max(1, maxbytes // 2) <= len(content) <= maxbytes
            assert content.endswith(b"\n") or len(content) == maxbytes
        assert not path.exists() or path.stat().st_size <= maxbytes


# --- a real child through a real pipe ----------------------------------------------------


def test_child_output_through_a_pipe_survives_many_rotations_intact(tmp_path: Path) -> None:
    """Numbered lines written in random-sized chunks by a real child, then pumped through
    a level-triggered epoll loop: backups oldest first + current == exactly what it wrote.
    """
    payload = numbered_lines(4000, seed=4)  # about 100 KiB
    source = tmp_path / "payload"
    source.write_bytes(payload)
    path = tmp_path / "logs" / "child.out.log"
    sink = LogSink(path, maxbytes=4096, backups=200)
    child = subprocess.Popen(
        python_command(
            f"""
            import os, random
            data = open({str(source)!r}, "rb").read()
            rng, offset = random.Random(5), 0
            while offset < len(data):
                size = rng.randint(1, 3000)
                os.write(1, data[offset:offset + size])
                offset += size
            """
        ),
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        pump_until_eof(PipeReader(child.stdout.fileno(), sink))
        assert child.wait(timeout=20) == 0
    finally:
        child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
    sink.close()

    assert all_output(path, 200) == payload
    assert backup(path, 20).exists()
    for n in range(1, 200):
        if backup(path, n).exists():
            content = backup(path, n).read_bytes()
            assert content.endswith(b"\n") and len(content) <= 4096


# --- reopen, folders, modes --------------------------------------------------------------


def test_reopen_after_logrotate_moved_the_file_writes_a_fresh_file(tmp_path: Path) -> None:
    path = tmp_path / "web.out.log"
    moved = tmp_path / "web.out.log-20240101"
    sink = LogSink(path, maxbytes=0, backups=0)
    sink.write(b"before\n")
    path.rename(moved)
    sink.write(b"between\n")  # still the moved file: logrotate has not signalled yet
    sink.reopen()
    assert path.read_bytes() == b""  # reopen created it
    sink.write(b"after\n")

    assert moved.read_bytes() == b"before\nbetween\n"
    assert path.read_bytes() == b"after\n"


def test_reopen_continues_appending_to_the_same_file(tmp_path: Path) -> None:
    path = tmp_path / "web.out.log"
    sink = LogSink(path, maxbytes=0, backups=0)
    sink.write(b"one\n")
    sink.reopen()
    sink.write(b"two\n")
    assert path.read_bytes() == b"one\ntwo\n"


def test_a_sink_opens_its_file_only_when_output_arrives(tmp_path: Path) -> None:
    path = tmp_path / "quiet.out.log"
    sink = LogSink(path, maxbytes=100, backups=1)
    sink.reopen()
    assert not path.exists()
    sink.write(b"hello\n")
    assert path.read_bytes() == b"hello\n"


def test_missing_folders_are_created_and_the_file_is_append_cloexec_0644(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "web.out.log"
    old_umask = os.umask(0o022)
    try:
        sink = LogSink(path, maxbytes=0, backups=0)
        sink.write(b"x\n")
    finally:
        os.umask(old_umask)

    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    fd = next(
        int(name)
        for name in os.listdir("/proc/self/fd")
        if os.readlink(f"/proc/self/fd/{name}") == str(path)
    )
    flags = int(Path(f"/proc/self/fdinfo/{fd}").read_text().split("flags:")[1].split()[0], 8)
    assert flags & os.O_APPEND
    assert flags & O_CLOEXEC_OCTAL
    sink.close()


def test_the_folder_removed_under_a_sink_is_recreated_at_rotation(tmp_path: Path) -> None:
    folder = tmp_path / "logs"
    path = folder / "web.out.log"
    sink = LogSink(path, maxbytes=20, backups=2)
    sink.write(b"first line 1234567\n")
    path.unlink()
    folder.rmdir()
    sink.write(b"second line 123456\n")  # rotation finds nothing to rename

    assert path.read_bytes() == b"second line 123456\n"
    assert healthy(sink)


# --- tail and discard --------------------------------------------------------------------


def test_tail_returns_the_last_bytes_and_is_bounded(tmp_path: Path) -> None:
    sink = LogSink(tmp_path / "web.out.log", maxbytes=0, backups=0, tail_size=16)
    assert sink.tail(10) == b""
    sink.write(b"0123456789")
    assert sink.tail(4) == b"6789"
    assert sink.tail(100) == b"0123456789"
    sink.write(b"abcdefghij")
    assert sink.tail(100) == b"456789abcdefghij"
    sink.write(b"x" * 1000 + b"END")
    assert sink.tail(100) == b"x" * 13 + b"END"
    assert sink.tail(0) == b""
    assert sink.tail_size == 16
    assert sink.bytes_written == 1023


@settings(max_examples=200, deadline=None)
@given(
    size=st.integers(min_value=1, max_value=40),
    chunks=st.lists(st.binary(max_size=90), max_size=30),
    ask=st.integers(min_value=0, max_value=50),
)
def test_tail_buffer_matches_the_end_of_the_stream(
    size: int, chunks: list[bytes], ask: int
) -> None:
    tail = TailBuffer(size)
    for chunk in chunks:
        tail.append(memoryview(chunk))
        assert len(tail) <= size
    kept = b"".join(chunks)[-size:]
    assert tail.last(ask) == (kept[-ask:] if ask else b"")


def test_tail_memory_starts_empty_and_grows_only_with_output() -> None:
    sink = LogSink(None, maxbytes=0, backups=0)
    assert sink._tail is None and sink.tail(10) == b""  # no buffer at all until then
    sink.write(b"hello")
    assert sink._tail is not None and len(sink._tail) == 5 and sink.tail(10) == b"hello"
    assert TailBuffer(8)._data == b"" and not isinstance(TailBuffer(8)._data, bytearray)


def test_discard_mode_keeps_only_the_tail(tmp_path: Path) -> None:
    sink = LogSink(None, maxbytes=10, backups=2)
    for i in range(100):
        sink.write(b"line %d\n" % i)
    sink.reopen()
    sink.close()

    assert sink.tail(8) == b"line 99\n"
    assert sink.bytes_written == len(b"".join(b"line %d\n" % i for i in range(100)))
    assert healthy(sink)
    assert list(tmp_path.iterdir()) == []


# --- errors never escape -----------------------------------------------------------------


def test_unwritable_path_does_not_raise_and_recovers_once_writable(tmp_path: Path) -> None:
    blocker = tmp_path / "logs"
    blocker.write_bytes(b"a file where the log folder should be")
    path = blocker / "web.out.log"
    sink = LogSink(path, maxbytes=100, backups=1)

    with capture_logs() as events:
        sink.write(b"lost 1\n")
        sink.write(b"lost 2\n")
        assert isinstance(sink.last_error, NotADirectoryError)
        assert sink.dropped_bytes == 14
        assert sink.tail(100) == b"lost 1\nlost 2\n"

        blocker.unlink()
        sink.write(b"kept\n")

    assert path.read_bytes() == b"kept\n"
    assert healthy(sink)
    assert [e["event"] for e in events] == ["log_write_failed", "log_write_recovered"]
    assert events[1]["dropped_bytes"] == 14


def test_disk_full_drops_output_without_raising_and_recovers(tmp_path: Path) -> None:
    path = tmp_path / "web.out.log"
    path.symlink_to("/dev/full")  # every write fails with ENOSPC
    sink = LogSink(path, maxbytes=100, backups=2)

    with capture_logs() as events:
        for _ in range(3):
            sink.write(b"no space\n")
        assert isinstance(sink.last_error, OSError)
        assert sink.last_error.errno == 28  # ENOSPC
        assert sink.dropped_bytes == 27

        path.unlink()
        sink.write(b"space again\n")

    assert path.read_bytes() == b"space again\n"
    assert healthy(sink)
    assert [e["event"] for e in events] == ["log_write_failed", "log_write_recovered"]


def test_failing_rotation_keeps_writing_to_the_current_file(tmp_path: Path) -> None:
    path = tmp_path / "web.out.log"
    sink = LogSink(path, maxbytes=20, backups=1)
    backup(path, 1).mkdir()  # os.replace cannot put a file over a folder
    (backup(path, 1) / "keep").write_bytes(b"")

    with capture_logs() as events:
        sink.write(b"0123456789012345678\n")
        sink.write(b"over the limit\n")
        sink.write(b"and more\n")
        assert path.read_bytes() == b"0123456789012345678\nover the limit\nand more\n"
        assert isinstance(sink.last_error, OSError)

        (backup(path, 1) / "keep").unlink()
        backup(path, 1).rmdir()
        sink.write(b"rotated\n")

    assert backup(path, 1).read_bytes() == b"0123456789012345678\nover the limit\nand more\n"
    assert path.read_bytes() == b"rotated\n"
    assert healthy(sink)
    assert [e["event"] for e in events] == ["log_rotate_failed", "log_rotate_recovered"]


def test_device_paths_are_never_rotated(tmp_path: Path) -> None:
    path = tmp_path / "null.log"
    path.symlink_to("/dev/null")
    sink = LogSink(path, maxbytes=10, backups=2)
    for _ in range(10):
        sink.write(b"0123456789\n")
    assert path.is_symlink()
    assert not backup(path, 1).exists()
    assert healthy(sink)


# --- PipeReader --------------------------------------------------------------------------


def test_pump_is_bounded_by_max_reads(pipe: tuple[int, int], small_read_buffer: int) -> None:
    read_fd, write_fd = pipe
    os.write(write_fd, b"p" * 65536)
    sink = LogSink(None, maxbytes=0, backups=0)
    reader = PipeReader(read_fd, sink, grow_pipe_to=0)

    assert reader.pump(max_reads=3) is False
    assert sink.bytes_written == 3 * small_read_buffer
    assert reader.pump(max_reads=100) is False
    assert sink.bytes_written == 65536


def test_a_flooding_child_cannot_keep_pump_reading(tmp_path: Path) -> None:
    child = subprocess.Popen(
        python_command("import os\nwhile True: os.write(1, b'y' * 65536)"),
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        sink = LogSink(tmp_path / "flood.log", maxbytes=0, backups=0)
        reader = PipeReader(child.stdout.fileno(), sink)
        for _ in range(20):
            assert reader.pump(max_reads=2) is False
        assert sink.bytes_written <= 20 * 2 * logs.READ_BUFFER_SIZE
    finally:
        child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()


def test_pump_reports_eof_once_the_writer_is_closed(pipe: tuple[int, int]) -> None:
    read_fd, write_fd = pipe
    sink = LogSink(None, maxbytes=0, backups=0)
    reader = PipeReader(read_fd, sink)
    assert reader.pump() is False  # empty, writer open: EAGAIN

    os.write(write_fd, b"last words\n")
    os.close(write_fd)
    eof = reader.pump() or reader.pump()  # data first, EOF at the latest on the next call

    assert eof is True
    assert sink.tail(100) == b"last words\n"


def test_drain_reads_everything_and_sees_eof(
    pipe: tuple[int, int], small_read_buffer: int, tmp_path: Path
) -> None:
    read_fd, write_fd = pipe
    set_pipe_size(write_fd, 1 << 20)
    data = numbered_lines(5000, seed=6)[: 200 * 1024]
    os.write(write_fd, data)
    os.close(write_fd)
    sink = LogSink(tmp_path / "x.log", maxbytes=0, backups=0)

    assert PipeReader(read_fd, sink).drain() is True
    assert (tmp_path / "x.log").read_bytes() == data


def test_drain_returns_at_eagain_while_a_writer_remains(pipe: tuple[int, int]) -> None:
    read_fd, write_fd = pipe
    os.write(write_fd, b"from a grandchild\n")
    sink = LogSink(None, maxbytes=0, backups=0)
    reader = PipeReader(read_fd, sink)

    assert reader.drain() is False
    assert sink.tail(100) == b"from a grandchild\n"
    assert reader.drain() is False


def test_drain_is_bounded_when_a_grandchild_keeps_writing(tmp_path: Path) -> None:
    child = subprocess.Popen(
        python_command("import os\nwhile True: os.write(1, b'g' * 65536)"),
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        sink = LogSink(None, maxbytes=0, backups=0)
        reader = PipeReader(child.stdout.fileno(), sink)
        assert reader.drain() is False
        assert sink.bytes_written <= pipe_size(child.stdout.fileno()) + 2 * logs.READ_BUFFER_SIZE
    finally:
        child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()


def test_on_data_receives_each_chunk_in_order(pipe: tuple[int, int]) -> None:
    read_fd, write_fd = pipe
    received: list[bytes] = []
    reader = PipeReader(read_fd, LogSink(None, 0, 0), on_data=received.append)
    os.write(write_fd, b"one\n")
    reader.pump()
    os.write(write_fd, b"two\n")
    reader.pump()
    assert received == [b"one\n", b"two\n"]
    assert all(type(chunk) is bytes for chunk in received)


def test_a_full_pipe_is_enlarged_once_and_a_quiet_one_is_not(pipe: tuple[int, int]) -> None:
    busy_read, busy_write = pipe
    quiet_read, quiet_write = os.pipe2(os.O_CLOEXEC)
    try:
        default = pipe_size(busy_read)
        os.write(busy_write, b"b" * default)  # fills it: the child would now block
        os.write(quiet_write, b"hello\n")
        PipeReader(busy_read, LogSink(None, 0, 0)).pump()
        PipeReader(quiet_read, LogSink(None, 0, 0)).pump()

        assert pipe_size(busy_read) == logs.BULK_PIPE_SIZE
        assert pipe_size(quiet_read) == default
    finally:
        os.close(quiet_read)
        os.close(quiet_write)


def test_set_pipe_size_enlarges_and_ignores_a_busy_pipe(pipe: tuple[int, int]) -> None:
    read_fd, write_fd = pipe
    set_pipe_size(write_fd, 256 * 1024)
    assert pipe_size(read_fd) == 256 * 1024

    os.write(write_fd, b"f" * 100_000)
    set_pipe_size(write_fd, 4096)  # EBUSY: it holds more than that
    assert pipe_size(read_fd) == 256 * 1024


def test_set_pipe_size_on_a_regular_file_raises(tmp_path: Path) -> None:
    with open(tmp_path / "f", "wb") as f, pytest.raises(OSError):
        set_pipe_size(f.fileno(), 1 << 20)


# --- reading a log back ------------------------------------------------------------------


def last_lines(data: bytes, count: int) -> bytes:
    """The reference: the last `count` lines, as tail(1) prints them."""
    if count == 0:
        return b""
    return b"".join(data.splitlines(keepends=True)[-count:])


def test_read_back_reaches_past_the_memory_tail(tmp_path: Path) -> None:
    sink = LogSink(tmp_path / "web.out.log", maxbytes=0, backups=0, tail_size=1024)
    lines = [f"line {n}\n".encode() for n in range(10_000)]
    for line in lines:
        sink.write(line)
    sink.close()
    assert sink.read_back(nlines=3, limit=1 << 20) == b"".join(lines[-3:])
    assert sink.read_back(nlines=5000, limit=1 << 20) == b"".join(lines[-5000:])
    assert len(sink.read_back(nlines=5000, limit=1 << 20)) > sink.tail_size
    assert sink.read_back(nbytes=7, limit=1 << 20) == b"".join(lines)[-7:]
    assert sink.read_back(nlines=10_000, limit=100) == b"".join(lines)[-100:]  # bounded
    assert sink.read_back(nlines=0, limit=100) == b""


def test_read_back_continues_into_the_backups(tmp_path: Path) -> None:
    path = tmp_path / "web.out.log"
    sink = LogSink(path, maxbytes=100, backups=3)
    written = b"".join(f"{n:04d} abcdefgh\n".encode() for n in range(30))  # 15 B lines
    sink.write(written)
    sink.close()
    assert os.path.exists(f"{path}.3")  # 450 B over files of at most 100 B
    kept = b"".join(Path(f"{path}{s}").read_bytes() for s in (".3", ".2", ".1", ""))
    assert written.endswith(kept)
    assert logs.read_log_tail(path, 3, nlines=12, limit=1 << 20) == last_lines(written, 12)
    assert logs.read_log_tail(path, 3, nbytes=250, limit=1 << 20) == written[-250:]
    # Asked for more than the files hold: all they hold, oldest first.
    assert logs.read_log_tail(path, 3, nlines=1000, limit=1 << 20) == kept
    assert logs.read_log_tail(path, 1, nlines=1000, limit=1 << 20) == (
        Path(f"{path}.1").read_bytes() + path.read_bytes()
    )


def test_read_back_counts_a_last_line_without_newline(tmp_path: Path) -> None:
    path = tmp_path / "x.log"
    path.write_bytes(b"a\nb\nc")
    assert logs.read_log_tail(path, 0, nlines=2, limit=100) == b"b\nc"
    assert logs.read_log_tail(path, 0, nlines=9, limit=100) == b"a\nb\nc"
    path.write_bytes(b"")
    assert logs.read_log_tail(path, 0, nlines=2, limit=100) == b""


def test_read_back_without_a_readable_file_uses_the_memory_tail(tmp_path: Path) -> None:
    sink = LogSink(None, maxbytes=0, backups=0)
    sink.write(b"one\ntwo\nthree\n")
    assert sink.read_back(nlines=2, limit=100) == b"two\nthree\n"
    assert sink.read_back(nbytes=6, limit=100) == b"three\n"
    assert logs.read_log_tail(tmp_path / "missing.log", 2, nlines=2, limit=100) is None
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert logs.read_log_tail(fifo, 0, nlines=2, limit=100) is None  # never blocks
    gone = LogSink(tmp_path / "gone" / "x.log", maxbytes=0, backups=0)
    gone.write(b"kept in memory\n")
    (tmp_path / "gone" / "x.log").unlink()
    assert gone.read_back(nlines=1, limit=100) == b"kept in memory\n"


@settings(max_examples=60, deadline=None)
@given(
    chunks=st.lists(
        st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"\n")), min_size=1, max_size=40
    ),
    count=st.integers(min_value=0, max_value=80),
    maxbytes=st.sampled_from([0, 64, 200]),
)
def test_read_back_agrees_with_tail_1(chunks: list[bytes], count: int, maxbytes: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        sink = LogSink(Path(folder) / "p.log", maxbytes=maxbytes, backups=100)
        for chunk in chunks:
            sink.write(chunk)
        sink.close()
        written = b"".join(chunks)
        assert sink.read_back(nlines=count, limit=1 << 20) == last_lines(written, count)
        assert sink.read_back(nbytes=count, limit=1 << 20) == (written[-count:] if count else b"")


# --- things outside supd that must not stall or fool it (issue 10) -------------------------


def test_a_fifo_without_reader_never_blocks_and_is_written_once_read(tmp_path: Path) -> None:
    path = tmp_path / "out.fifo"
    os.mkfifo(path)
    sink = LogSink(path, maxbytes=1024, backups=2)
    with capture_logs() as events:
        started = time.monotonic()
        sink.write(b"nobody reads this\n")  # open() would block forever without O_NONBLOCK
        assert time.monotonic() - started < 1.0
    assert sink.dropped_bytes == len(b"nobody reads this\n")
    assert sink.last_error is not None and sink.last_error.errno == errno.ENXIO
    assert [e["event"] for e in events] == ["log_write_failed"]
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        sink.write(b"now someone does\n")
        assert os.read(reader, 100) == b"now someone does\n"
        assert healthy(sink)
        sink.close()
    finally:
        os.close(reader)


@pytest.mark.parametrize("remove", ["file", "folder"])
def test_a_deleted_log_file_is_noticed_reopened_and_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, remove: str
) -> None:
    monkeypatch.setattr(logs, "LINK_CHECK_S", 0.0)  # check at every write
    folder = tmp_path / "logs"
    path = folder / "web.out.log"
    sink = LogSink(path, maxbytes=1 << 20, backups=2)
    sink.write(b"before\n")
    sink.write(b"written since the last check\n")
    if remove == "file":
        path.unlink()
    else:
        shutil.rmtree(folder)
    with capture_logs() as events:
        sink.write(b"after\n")
        sink.write(b"and more\n")
    # The deleted file's bytes since the last check come first: nothing is lost.
    assert path.read_bytes() == b"written since the last check\nafter\nand more\n"
    deleted = [e for e in events if e["event"] == "log_file_deleted"]
    assert len(deleted) == 1 and deleted[0]["recovered"] == len(b"written since the last check\n")
    assert healthy(sink)
    sink.close()


def test_the_deleted_file_check_runs_at_most_once_a_second(tmp_path: Path) -> None:
    path = tmp_path / "web.out.log"
    sink = LogSink(path, maxbytes=0, backups=0)
    sink.write(b"one\n")
    path.unlink()
    sink.write(b"two\n")  # within a second of the open: not checked yet
    assert not path.exists()
    sink.close()


def test_a_sink_and_a_cgroup_keep_their_paths_as_strings(tmp_path: Path) -> None:
    """There are two sinks and a cgroup per process: a Path costs 0.4 KiB, a str 0.1."""
    import gc

    from supd.cgroups import ProcessCgroup

    sink = LogSink(tmp_path / "web.out.log", 0, 0)
    cgroup = ProcessCgroup(tmp_path / "web")
    for holder in (sink, cgroup):
        assert not any(isinstance(ref, Path) for ref in gc.get_referents(holder))
    assert sink.path == tmp_path / "web.out.log" and cgroup.path == tmp_path / "web"
    assert LogSink(None, 0, 0).path is None
