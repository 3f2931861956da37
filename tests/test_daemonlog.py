"""supd's own log never blocks the loop and never raises into it (issue 10).

Unit tests drive `LogWriter` on real pipes and /dev/full; end-to-end tests start supd
with its stderr on a pipe nobody reads, a pipe whose reader left, and a full tmpfs.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
import structlog

from supd import daemonlog
from tests.helpers import PY, SLEEP, Supd, cmd, source_pythonpath, wait_until

_FIONREAD = 0x541B


def _pipe() -> tuple[int, int]:
    r, w = os.pipe2(os.O_CLOEXEC)
    return r, w


def _fill(fd: int) -> int:
    """Fill a pipe through a non-blocking description of our own; bytes written."""
    w = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    total = 0
    try:
        while True:
            total += os.write(w, b"x" * 65536)
    except BlockingIOError:
        return total
    finally:
        os.close(w)


def _drain(fd: int) -> bytes:
    data = b""
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 1 << 20):
            data += chunk
    return data


# -- LogWriter on real fds ------------------------------------------------------------


def test_writer_never_blocks_on_a_full_pipe_and_flushes_later() -> None:
    r, w = _pipe()
    os.set_blocking(r, False)
    try:
        filled = _fill(w)
        writer = daemonlog.LogWriter(w, max_pending=4096)
        assert os.get_blocking(w)  # the shared description is left as it was
        waiting: list[bool] = []
        writer.watch(waiting.append)
        started = time.monotonic()
        writer.write_line("one")
        writer.write_line("two")
        assert time.monotonic() - started < 1.0
        assert writer.pending == 8 and waiting == [True]
        assert len(_drain(r)) == filled
        writer.flush()
        assert writer.pending == 0 and waiting == [True, False]
        assert _drain(r) == b"one\ntwo\n"
        writer.close()
    finally:
        os.close(r)
        os.close(w)


def test_writer_drops_over_its_bound_counts_and_says_so_once() -> None:
    r, w = _pipe()
    os.set_blocking(r, False)
    try:
        _fill(w)
        writer = daemonlog.LogWriter(w, max_pending=100)
        announced: list[int] = []
        writer.announce = lambda count: (announced.append(count), writer.write_line("dropped"))
        for n in range(50):
            writer.write_line(f"line {n:02}")  # 8 bytes: 12 fit in 100
        assert writer.pending == 96 and writer.dropped == 38
        _drain(r)
        writer.flush()
        assert announced == [38] and writer.dropped == 0
        lines = _drain(r).decode().splitlines()
        assert lines == [f"line {n:02}" for n in range(12)] + ["dropped"]
        writer.close()
    finally:
        os.close(r)
        os.close(w)


def test_writer_stops_on_epipe_without_raising() -> None:
    r, w = _pipe()
    os.close(r)
    try:
        writer = daemonlog.LogWriter(w)
        writer.write_line("nobody reads this")
        writer.write_line("nor this")
        assert writer.broken is not None and writer.broken.errno == errno.EPIPE
        writer.close()
    finally:
        os.close(w)


def test_writer_counts_enospc_and_keeps_trying() -> None:
    fd = os.open("/dev/full", os.O_WRONLY | os.O_CLOEXEC)
    try:
        writer = daemonlog.LogWriter(fd)
        for _ in range(3):
            writer.write_line("lost")
        assert writer.broken is None and writer.dropped == 3
        writer.close()
    finally:
        os.close(fd)


def test_rate_limiter_lets_a_burst_through_then_counts() -> None:
    now = [100.0]
    limiter = daemonlog.RateLimiter(burst=3, window_s=1.0, clock=lambda: now[0])
    reported: list[tuple[str, Any, int, dict[str, Any]]] = []
    limiter.report = lambda *args: reported.append(args)

    def passes(event: str, **kw: Any) -> dict[str, Any] | None:
        try:
            return dict(limiter(None, "warning", {"event": event, **kw}))
        except structlog.DropEvent:
            return None

    written = [passes("client_refused", pid=n, uid=65534) for n in range(10)]
    assert sum(w is not None for w in written) == 3
    assert passes("other") is not None  # another event is not limited by this one
    now[0] += 1.5
    again = passes("client_refused", pid=99, uid=65534)
    assert again is not None and again["suppressed"] == 7
    for n in range(5):
        passes("client_refused", pid=n, uid=65534)
    assert passes("client_refused", pid=1, uid=1000) is not None  # another uid: not identical
    now[0] += 1.5
    passes("unrelated")  # any event reports what a finished window suppressed
    assert reported == [("client_refused", None, 3, {"uid": 65534})]


class ListStream:
    """A text stream without a file descriptor, keeping what is written."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, text: str) -> None:
        self.lines.append(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        raise OSError("no fd")


def test_a_log_call_never_raises_into_the_caller() -> None:
    class Unprintable:
        def __repr__(self) -> str:
            raise RuntimeError("a bug in a __repr__")

    stream = ListStream()
    try:
        daemonlog.configure("json", "info", stream=stream, environ={})  # type: ignore[arg-type]
        daemonlog.get_logger().info("weird", value=Unprintable())  # must not raise
        daemonlog.get_logger().info("fine")
        assert [json.loads(line)["event"] for line in stream.lines] == ["fine"]
    finally:
        structlog.reset_defaults()


def test_json_timestamps_are_utc_with_z() -> None:
    stream = ListStream()
    try:
        daemonlog.configure("json", "info", stream=stream, environ={})  # type: ignore[arg-type]
        daemonlog.get_logger().info("hello")
        record = json.loads(stream.lines[-1])
        assert record["timestamp"].endswith("Z")
        assert record["event"] == "hello"
    finally:
        structlog.reset_defaults()


# -- supd end to end ------------------------------------------------------------------


CRASH_LOOP = f"""
    [programs.crash]
    command = {cmd("raise SystemExit(3)")}
    startsecs = 0
    autorestart = "always"
    backoff_initial = 0.01
    backoff_factor = 1.0
    backoff_max = 0.01
    restart_window = 0  # restarts forever (no crash-loop window): a flood of log lines

    [programs.steady]
    command = {SLEEP}
    startsecs = 0
"""


class StderrSupd(Supd):
    """A real supd whose stderr goes where the test says (a pipe, a file on a tmpfs)."""

    def start_with(self, stderr: int | IO[bytes]) -> StderrSupd:
        env = dict(os.environ)
        env["PYTHONPATH"] = source_pythonpath()
        self.proc = subprocess.Popen(
            [PY, "-m", "supd", "-c", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=env,
            cwd=self.dir,
        )
        wait_until(
            lambda: self.answers() or self.proc is None or self.proc.poll() is not None,
            describe="supd answers",
        )
        assert self.proc.poll() is None, "supd exited at start"
        return self

    def spawned(self) -> int:
        """How many times `crash` was started so far (from its restart count)."""
        return int(self.status()["crash"].get("restarts", 0) or 0) + int(
            self.status()["crash"]["state"] != "STOPPED"
        )


@pytest.fixture
def make_supd(tmp_path: Path) -> Iterator[Any]:
    started: list[StderrSupd] = []

    def make(config: str) -> StderrSupd:
        instance = StderrSupd(tmp_path, config)
        started.append(instance)
        return instance

    yield make
    for instance in started:
        instance.kill()


def _pids_seen(d: Supd, name: str, count: int, timeout: float = 10.0) -> set[int]:
    """Wait until `name` has run under `count` different pids."""
    seen: set[int] = set()

    def enough() -> bool:
        pid = d.status()[name].get("pid")
        if pid:
            seen.add(pid)
        return len(seen) >= count

    wait_until(enough, timeout, lambda: f"{name} restarted: pids {seen}")
    return seen


def test_stderr_pipe_without_reader_does_not_kill_supd_on_reload(make_supd: Any) -> None:
    d = make_supd(f"""
        [programs.steady]
        command = {SLEEP}
        startsecs = 0
    """)
    d.start_with(subprocess.PIPE)
    assert d.proc is not None and d.proc.stderr is not None
    pid = d.wait_state("steady", "RUNNING")["pid"]
    d.proc.stderr.close()  # the reader leaves: every write now fails with EPIPE
    result = d.rpc("reload")
    assert result is not None
    assert d.proc.poll() is None
    assert d.status()["steady"]["pid"] == pid  # nothing was taken down with the log
    d.rpc("stop", {"names": ["steady"]})
    assert d.state("steady") == "STOPPED"


def test_slow_stderr_reader_never_stalls_the_loop(make_supd: Any) -> None:
    d = make_supd(CRASH_LOOP)
    r, w = _pipe()
    fcntl.fcntl(w, 1031, 4096)  # F_SETPIPE_SZ: one page, full within a few lines
    try:
        d.start_with(w)
    finally:
        os.close(w)
    assert d.proc is not None
    reader = r

    def pipe_full() -> bool:
        pending = int.from_bytes(fcntl.ioctl(reader, _FIONREAD, b"\0\0\0\0"), "little")
        return pending >= 4096 - 512  # no room for one more line

    wait_until(pipe_full, 20, "supd's stderr pipe to fill up")
    # Nobody reads: the socket still answers and crash is still restarted.
    _pids_seen(d, "crash", 5)
    d.rpc("stop", {"names": ["crash"]})
    assert d.state("crash") == "STOPPED"
    # The reader comes back: what waited is written without any new event to push it.
    os.set_blocking(reader, False)
    seen = b""

    def stopped_logged() -> bool:
        nonlocal seen
        seen += _drain(reader)
        return b'"to_state": "STOPPED"' in seen and b'"process": "crash"' in seen

    try:
        wait_until(stopped_logged, 10, "the buffered `stopped` line to reach the reader")
        assert d.proc.poll() is None
    finally:
        os.close(r)


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_under_supd_log_does_not_kill_it(make_supd: Any, tiny_tmpfs: Path) -> None:
    log_path = tiny_tmpfs / "supd.log"
    filler = tiny_tmpfs / "filler"
    # Leave a little room: supd's first lines fit, the crash loop fills the rest.
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC)
    with contextlib.suppress(OSError):
        while True:
            os.write(fd, b"\0" * 4096)
    os.ftruncate(fd, os.fstat(fd).st_size - 6 * 4096)
    os.close(fd)
    d = make_supd(CRASH_LOOP)
    with open(log_path, "ab") as log:
        d.start_with(log)
    assert d.proc is not None

    def disk_full() -> bool:
        # No free page, and the log's last page is full too (a write then fails).
        full = os.statvfs(tiny_tmpfs).f_bavail == 0
        return full and log_path.stat().st_size % 4096 == 0

    wait_until(disk_full, 20, "the tmpfs to fill up")
    _pids_seen(d, "crash", 10)  # still restarting, long after the disk filled
    assert d.proc.poll() is None
    filler.unlink()  # room again: the next line says how many were lost

    def dropped_reported() -> list[dict[str, Any]]:
        records = []
        for line in log_path.read_bytes().splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict) and record.get("event") == "log_events_dropped":
                    records.append(record)
        return records

    records = wait_until(
        dropped_reported,
        10,
        lambda: f"a log_events_dropped line in:\n{log_path.read_bytes()[-1500:].decode()}",
    )
    assert records[0]["count"] > 0
    assert d.rpc("stop", {"names": ["crash"]}) is not None


def test_structlog_comes_without_asyncio_and_asyncio_still_works_if_touched() -> None:
    # asyncio (with ssl) is ~5 MiB of the daemon's RSS; structlog only needs it in
    # async methods supd never calls. The stand-in must hand over the real module.
    probe = (
        "import sys\n"
        "from supd import daemonlog\n"
        "assert 'asyncio' not in sys.modules and 'ssl' not in sys.modules, 'loaded'\n"
        "daemonlog.configure('json', 'info')\n"
        "daemonlog.get_logger(process='p').info('hello', n=1)\n"
        "daemonlog.shutdown()\n"
        "assert 'asyncio' not in sys.modules, 'logging pulled asyncio in'\n"
        "import structlog.stdlib\n"
        "loop = structlog.stdlib.asyncio.get_running_loop\n"
        "import asyncio\n"
        "assert loop is asyncio.get_running_loop, 'not the real asyncio'\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [PY, "-c", probe],
        env={**os.environ, "PYTHONPATH": source_pythonpath()},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "ok"
    logged = json.loads(result.stderr.splitlines()[0])
    assert (logged["event"], logged["n"], logged["process"]) == ("hello", 1, "p")
