"""Issue 12: log destinations and formats: supd's own stdout/stderr, the journal,
timestamps, partial lines, rotation by age and total size, compression."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from supd.logs import journal_field, parse_journal_entry, parse_stamp
from tests.helpers import PY, Supd, cmd, source_pythonpath, wait_until

STAMP_ISO = rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d "
STAMP_UTC = rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z "
STAMP_EPOCH = rb"\d{10}\.\d{3} "


class PipedSupd(Supd):
    """A supd whose stdout is a pipe the test reads (as `docker logs` would); its
    stderr, supd's own log, goes to the usual file."""

    def start(self, *extra: str, wait_ready: bool = True) -> PipedSupd:
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONPATH", source_pythonpath())
        self.out = bytearray()
        self.reading = threading.Event()
        self.reading.set()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.launcher, "-c", str(self.config_path), *extra],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
                cwd=self.dir,
            )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        if wait_ready:
            wait_until(
                lambda: self.answers() or self.proc.poll() is not None, describe=self.describe
            )
            assert self.proc.poll() is None, self.describe()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while True:
            self.reading.wait()
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return
            self.out += chunk

    def lines(self) -> list[bytes]:
        return bytes(self.out).split(b"\n")[:-1]


@pytest.fixture
def piped(tmp_path: Path) -> Iterator[list[PipedSupd]]:
    started: list[PipedSupd] = []
    yield started
    for daemon in started:
        daemon.kill()


def start_piped(started: list[PipedSupd], tmp_path: Path, config: str) -> PipedSupd:
    daemon = PipedSupd(tmp_path, config)
    started.append(daemon)
    return daemon.start()


def test_flood_from_three_programs_into_supds_stdout_arrives_whole_and_complete(
    piped: list[PipedSupd], tmp_path: Path
) -> None:
    count = 20000
    flood = cmd(f"""
        import os, sys, time
        name = os.environ["SUPD_PROGRAM"]
        out = sys.stdout.buffer
        for n in range({count}):
            out.write(f"{{name}} line {{n:06d}} {{'x' * (n % 300)}}\\n".encode())
        out.flush()
        time.sleep(1000)
    """)
    programs = "".join(
        f"""
        [programs.{name}]
        command = {flood}
        stdout_logfile = "{"-" if name == "a" else "/dev/stdout"}"
        startsecs = 0
        """
        for name in ("a", "b", "c")
    )
    daemon = start_piped(piped, tmp_path, programs)

    def complete() -> bool:
        return sum(1 for line in daemon.lines() if b" line " in line) >= 3 * count

    wait_until(complete, 60, lambda: f"{len(daemon.lines())} lines")
    seen: dict[str, list[int]] = {"a": [], "b": [], "c": []}
    pattern = re.compile(rb"([abc]) \| ([abc]) line (\d{6}) (x*)")
    for line in daemon.lines():
        match = pattern.fullmatch(line)
        assert match is not None, line[:200]
        assert match.group(1) == match.group(2)
        number = int(match.group(3))
        assert len(match.group(4)) == number % 300, line[:200]  # the line is intact
        seen[match.group(1).decode()].append(number)
    for numbers in seen.values():
        assert numbers == list(range(count))


def test_stdout_destination_shared_with_numprocs_passes_check_and_is_never_renamed(
    tmp_path: Path,
) -> None:
    config = tmp_path / "supd.toml"
    config.write_text(
        f"""
        [programs.a]
        command = {cmd("print(1)")}
        stdout_logfile = "/dev/stdout"
        numprocs = 2
        [programs.b]
        command = {cmd("print(1)")}
        stdout_logfile = "/dev/stdout"
        stderr_logfile = "/dev/stderr"
    """.replace("\n        ", "\n")
    )
    done = subprocess.run(
        [PY, "-m", "supd", "--check", "-c", str(config)], capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": source_pythonpath()},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "2 programs, 3 processes" in done.stdout


def test_stdout_destination_when_supds_stdout_is_a_regular_file_is_never_rotated(
    tmp_path: Path,
) -> None:
    """The rotation-of-/dev/stdout bug: maxbytes applies to files, never to a stream."""
    writer = cmd("""
        import sys, time
        for n in range(5000):
            print(f"line {n:05d}")
        time.sleep(1000)
    """)
    out = tmp_path / "out.txt"
    daemon = Supd(
        tmp_path,
        f"""
        [programs.w]
        command = {writer}
        stdout_logfile = "/dev/stdout"
        stdout_logfile_maxbytes = 1024
        startsecs = 0
        """,
    )
    env = {**os.environ, "PYTHONPATH": source_pythonpath()}
    with open(out, "wb") as stdout, open(daemon.log_path, "wb") as stderr:
        daemon.proc = subprocess.Popen(
            [*daemon.launcher, "-c", str(daemon.config_path)],
            stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, env=env, cwd=tmp_path,
        )  # fmt: skip
    try:
        wait_until(lambda: out.read_bytes().count(b"\n") >= 5000, 30, daemon.describe)
        lines = out.read_bytes().split(b"\n")[:-1]
        assert lines == [b"w | line %05d" % n for n in range(5000)]
        assert not list(tmp_path.glob("out.txt.*"))
    finally:
        daemon.kill()


def test_partial_line_is_flushed_after_a_second_and_its_end_has_no_second_stamp(
    piped: list[PipedSupd], tmp_path: Path
) -> None:
    answered = tmp_path / "answered"
    prompt = cmd(f"""
        import os, sys, time
        sys.stdout.write("Password: ")
        sys.stdout.flush()
        while not os.path.exists({str(answered)!r}):
            time.sleep(0.01)
        sys.stdout.write("ok\\n")
        sys.stdout.flush()
        time.sleep(1000)
    """)
    daemon = start_piped(
        piped,
        tmp_path,
        f"""
        [programs.p]
        command = {prompt}
        stdout_logfile = "-"
        log_prefix = "[{{process_name}}] "
        log_timestamps = "iso-utc"
        startsecs = 0
        """,
    )
    wait_until(lambda: b"Password: " in daemon.out, 10, lambda: repr(daemon.out))
    assert re.fullmatch(rb"\[p\] " + STAMP_UTC + rb"Password: \n", bytes(daemon.out))
    answered.touch()
    wait_until(lambda: b"ok" in daemon.out, 10, lambda: repr(daemon.out))
    assert daemon.lines()[1] == b"[p] ok"


def test_timestamps_in_files_mark_each_line_once_in_every_style(
    supd: object, tmp_path: Path
) -> None:
    writer = cmd("""
        import sys, time
        sys.stdout.write("first\\nsecond ")
        sys.stdout.flush()
        time.sleep(0.05)
        sys.stdout.write("continued\\n")
        sys.stdout.flush()
        time.sleep(1000)
    """)
    programs = "".join(
        f"""
        [programs.{style.replace("-", "_")}]
        command = {writer}
        log_timestamps = "{style}"
        startsecs = 0
        """
        for style in ("iso", "epoch")
    )
    daemon = Supd(tmp_path, '[supervisor]\nlog_timestamps = "iso-utc"\n' + programs + f"""
        [programs.default]
        command = {writer}
        startsecs = 0
        """)  # fmt: skip
    try:
        daemon.start()
        for name, stamp in (("iso", STAMP_ISO), ("epoch", STAMP_EPOCH), ("default", STAMP_UTC)):
            log = tmp_path / "logs" / f"{name}.out.log"
            wait_until(lambda log=log: log.exists() and b"continued" in log.read_bytes(), 10)
            data = log.read_bytes()
            assert re.fullmatch(stamp + b"first\n" + stamp + b"second continued\n", data), data
            first = parse_stamp(data)
            assert first is not None and abs(first - time.time()) < 30
    finally:
        daemon.kill()


# -- journal ------------------------------------------------------------------------------


def test_journal_field_encoding_round_trips_including_binary_safe_values() -> None:
    entry = journal_field("MESSAGE", b"two\nlines") + journal_field("PRIORITY", b"6")
    assert entry == b"MESSAGE\n" + (9).to_bytes(8, "little") + b"two\nlines\nPRIORITY=6\n"
    assert parse_journal_entry(entry) == {"MESSAGE": b"two\nlines", "PRIORITY": b"6"}


def test_journal_destination_sends_native_protocol_fields(tmp_path: Path) -> None:
    journal = tmp_path / "journal.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(journal))
    receiver.settimeout(10)
    talker = cmd("""
        import sys, time
        print("hello journal")
        print("<4>careful now")
        sys.stderr.write("broken\\n")
        sys.stderr.flush()
        time.sleep(1000)
    """)
    daemon = Supd(
        tmp_path,
        f"""
        [supervisor]
        journal_socket = "{journal}"
        [programs.web]
        command = {talker}
        stdout_logfile = "journal"
        stderr_logfile = "journal"
        startsecs = 0
        """,
    )
    try:
        daemon.start()
        entries = [parse_journal_entry(receiver.recv(65536)) for _ in range(3)]
        pid = daemon.wait_state("web", "RUNNING")["pid"]
    finally:
        daemon.kill()
        receiver.close()
    by_message = {e["MESSAGE"]: e for e in entries}
    assert set(by_message) == {b"hello journal", b"careful now", b"broken"}
    for entry in entries:
        assert entry["SYSLOG_IDENTIFIER"] == b"web"
        assert entry["SUPD_PROCESS"] == b"web"
        assert entry["SUPD_PID"] == str(pid).encode()
    assert by_message[b"hello journal"]["PRIORITY"] == b"6"
    assert by_message[b"careful now"]["PRIORITY"] == b"4"
    assert by_message[b"broken"]["PRIORITY"] == b"3"


def test_journal_without_its_socket_falls_back_to_log_files_with_one_warning(
    tmp_path: Path,
) -> None:
    talker = cmd("import time; print('to a file', flush=True); time.sleep(1000)")
    daemon = Supd(
        tmp_path,
        f"""
        [supervisor]
        journal_socket = "{tmp_path / "missing.sock"}"
        [programs.a]
        command = {talker}
        stdout_logfile = "journal"
        startsecs = 0
        [programs.b]
        command = {talker}
        stdout_logfile = "journal"
        startsecs = 0
        """,
    )
    try:
        daemon.start()
        for name in ("a", "b"):
            log = tmp_path / "logs" / f"{name}.out.log"
            wait_until(lambda log=log: log.exists() and log.read_text() == "to a file\n", 10)
        assert len(daemon.events("journal_unavailable")) == 1
    finally:
        daemon.kill()


# -- rotation by age and total size, compression --------------------------------------------


def numbered_lines(paths: list[Path]) -> list[int]:
    numbers: list[int] = []
    for path in paths:
        try:
            data = path.read_bytes()
        except FileNotFoundError:  # renamed since it was listed (the test looks again)
            continue
        data = gzip.decompress(data) if path.suffix == ".gz" else data
        numbers += [int(line) for line in data.split()]
    return numbers


def backups_oldest_first(log: Path) -> list[Path]:
    found = []
    for number in range(50, 0, -1):
        for candidate in (
            log.with_name(f"{log.name}.{number}"),
            log.with_name(f"{log.name}.{number}.gz"),
        ):
            if candidate.exists():
                found.append(candidate)
    return [*found, log]


def test_rotate_every_cuts_the_file_by_age_and_loses_nothing(tmp_path: Path) -> None:
    ticker = cmd("""
        import time
        for n in range(40):
            print(n, flush=True)
            time.sleep(0.05)
        time.sleep(1000)
    """)
    daemon = Supd(
        tmp_path,
        f"""
        [programs.t]
        command = {ticker}
        rotate_every = "0.4s"
        startsecs = 0
        """,
    )
    log = tmp_path / "logs" / "t.out.log"
    try:
        daemon.start()
        wait_until(lambda: numbered_lines(backups_oldest_first(log))[-1:] == [39], 20)
    finally:
        daemon.kill()
    files = backups_oldest_first(log)
    assert len(files) >= 3
    assert numbered_lines(files) == list(range(40))


def test_max_total_size_deletes_the_oldest_backups(tmp_path: Path) -> None:
    writer = cmd("""
        import time
        for n in range(20000):
            print(f"{n:07d}")
        time.sleep(1000)
    """)
    daemon = Supd(
        tmp_path,
        f"""
        [programs.w]
        command = {writer}
        stdout_logfile_maxbytes = 10000
        stdout_logfile_backups = 100
        max_total_size = 40000
        startsecs = 0
        """,
    )
    log = tmp_path / "logs" / "w.out.log"
    try:
        daemon.start()
        wait_until(lambda: log.exists() and log.read_bytes().endswith(b"0019999\n"), 20)
    finally:
        daemon.kill()
    files = backups_oldest_first(log)
    assert sum(path.stat().st_size for path in files) <= 40000
    numbers = numbered_lines(files)
    assert numbers == list(range(numbers[0], 20000))  # the newest, contiguous


def test_compress_gzips_backups_in_a_helper_while_the_loop_answers(tmp_path: Path) -> None:
    size = 30 * 1024 * 1024
    writer = cmd(f"""
        import os, sys, time
        block = b"".join(b"%09d\\n" % n for n in range(100000))  # 1 MB of numbered lines
        out = sys.stdout.buffer
        for _ in range({size} // len(block)):
            out.write(block)
        out.flush()
        open("wrote", "w").close()
        time.sleep(1000)
    """)
    daemon = Supd(
        tmp_path,
        f"""
        [programs.big]
        command = {writer}
        directory = "{tmp_path}"
        stdout_logfile_maxbytes = "20MB"
        stdout_logfile_backups = 3
        compress = true
        startsecs = 0
        """,
    )
    log = tmp_path / "logs" / "big.out.log"
    gz = log.with_name("big.out.log.1.gz")
    try:
        daemon.start()
        wait_until(lambda: (tmp_path / "wrote").exists(), 60)
        worst = 0.0
        answered = 0
        while not gz.exists():
            started = time.monotonic()
            daemon.status()
            worst = max(worst, time.monotonic() - started)
            answered += 1
            assert time.monotonic() - started < 5
        wait_until(lambda: not log.with_name("big.out.log.1").exists(), 30)
        # supd unlinks the plain backup, then logs the event: the line may land later.
        helpers = wait_until(lambda: daemon.events("log_compressed"), 30)
    finally:
        daemon.kill()
    assert answered > 0 and helpers
    assert gz.stat().st_size < log.with_name("big.out.log").stat().st_size
    with gzip.open(gz) as unzipped:
        first = unzipped.read(20)
    assert first == b"000000000\n000000001\n"
    print(f"status answered {answered} times while gzipping; slowest {worst * 1000:.1f} ms")


# -- supctl ---------------------------------------------------------------------------------


def supctl(daemon: Supd, *args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": source_pythonpath()}
    return subprocess.run(
        [PY, "-m", "supd.ctl", "-s", str(daemon.socket), *args],
        capture_output=True, text=True, env=env, timeout=timeout,
    )  # fmt: skip


@contextlib.contextmanager
def following(daemon: Supd, *args: str) -> Iterator[subprocess.Popen[str]]:
    env = {**os.environ, "PYTHONPATH": source_pythonpath()}
    proc = subprocess.Popen(
        [PY, "-m", "supd.ctl", "-s", str(daemon.socket), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _json(text: str) -> object:
    return json.loads(text)


def test_supctl_logs_lists_files_and_logs_rotate_cuts_them_now(tmp_path: Path) -> None:
    talker = cmd("import time; print('before', flush=True); time.sleep(1000)")
    daemon = Supd(
        tmp_path,
        f"""
        [programs.web]
        command = {talker}
        startsecs = 0
        [programs.side]
        command = {talker}
        stdout_logfile = "-"
        startsecs = 0
        """,
    )
    log = tmp_path / "logs" / "web.out.log"
    try:
        daemon.start()
        wait_until(lambda: log.exists() and log.read_text() == "before\n", 10)
        listed = supctl(daemon, "logs", "web")
        assert listed.returncode == 0, listed.stderr
        assert f"web stdout: {log}" in listed.stdout
        assert f"7 B  {log}" in listed.stdout
        rotated = supctl(daemon, "--json", "logs", "rotate", "web", "side")
        assert rotated.returncode == 0, rotated.stderr
        entries = {(e["name"], e["stream"]): e for e in json.loads(rotated.stdout)}
        assert entries[("web", "stdout")]["rotated"] is True
        assert entries[("side", "stdout")] | {"files": []} == {
            "name": "side", "stream": "stdout", "destination": "/dev/stdout",
            "files": [], "dropped_bytes": 0, "rotated": False,
        }  # fmt: skip
        assert log.with_name("web.out.log.1").read_text() == "before\n"
    finally:
        daemon.kill()


def test_supctl_tail_follows_several_processes_merged_with_name_prefixes(tmp_path: Path) -> None:
    ticker = cmd("""
        import os, sys, time
        me = os.environ["SUPD_PROCESS_NAME"]
        for n in range(10000):
            if os.path.exists("go"):
                print(f"{me} says {n}", flush=True)
            time.sleep(0.02)
    """)
    daemon = Supd(
        tmp_path,
        f"""
        [programs.web]
        command = {ticker}
        directory = "{tmp_path}"
        numprocs = 2
        startsecs = 0
        [programs.db]
        command = {ticker}
        directory = "{tmp_path}"
        stdout_logfile = "/dev/stdout"
        startsecs = 0
        """,
    )
    try:
        daemon.start()
        with following(daemon, "tail", "-f", "all") as follower:
            assert follower.stdout is not None
            wait_until(lambda: supctl(daemon, "pid").returncode == 0, 10)
            (tmp_path / "go").touch()
            seen: set[str] = set()
            while len(seen) < 3:
                line = follower.stdout.readline()
                match = re.fullmatch(r"(\S+)\s* \| (\S+) says \d+\n", line)
                assert match is not None, line
                assert match.group(1) == match.group(2)
                seen.add(match.group(1))
            assert seen == {"web:0", "web:1", "db"}
    finally:
        daemon.kill()


def test_supctl_tail_since_reads_back_through_gzipped_backups(tmp_path: Path) -> None:
    writer = cmd("""
        import sys, time
        for n in range(3000):
            print(f"{n:05d}")
        sys.stdout.flush()
        time.sleep(1000)
    """)
    daemon = Supd(
        tmp_path,
        f"""
        [programs.w]
        command = {writer}
        log_timestamps = "iso-utc"
        stdout_logfile_maxbytes = 20000
        stdout_logfile_backups = 20
        compress = true
        startsecs = 0
        """,
    )
    log = tmp_path / "logs" / "w.out.log"
    try:
        daemon.start()
        wait_until(lambda: log.exists() and log.read_bytes().endswith(b"02999\n"), 20)
        wait_until(lambda: not list(log.parent.glob("w.out.log.[0-9]")), 20)  # all gzipped
        assert list(log.parent.glob("w.out.log.*.gz"))
        recent = supctl(daemon, "tail", "--since", "10m", "w")
        assert recent.returncode == 0, recent.stderr
        lines = recent.stdout.splitlines()
        assert [line.split()[-1] for line in lines] == [f"{n:05d}" for n in range(3000)]
        assert all(parse_stamp(line.encode()) for line in lines)
        assert supctl(daemon, "tail", "--since", "0s", "w").stdout == ""
    finally:
        daemon.kill()


def test_supctl_maintail_shows_and_follows_the_daemons_own_log(tmp_path: Path) -> None:
    daemon = Supd(
        tmp_path,
        f"""
        [programs.s]
        command = {cmd("import time; time.sleep(1000)")}
        startsecs = 0
        autostart = false
        """,
    )
    try:
        daemon.start()
        shown = supctl(daemon, "maintail", "-n", "50")
        assert shown.returncode == 0, shown.stderr
        assert '"event": "ready"' in shown.stdout
        with following(daemon, "maintail", "-f", "-n", "1") as follower:
            assert follower.stdout is not None
            assert follower.stdout.readline()  # answered: it follows from now on
            wait_until(lambda: supctl(daemon, "start", "s").returncode == 0, 10)
            while '"event": "spawned"' not in (line := follower.stdout.readline()):
                assert line
    finally:
        daemon.kill()


def test_a_stalled_stdout_never_stalls_supd_and_what_it_drops_is_counted(
    piped: list[PipedSupd], tmp_path: Path
) -> None:
    flood = cmd("""
        import itertools, sys
        for n in itertools.count():
            sys.stdout.write(f"line {n:09d}\\n")
    """)
    daemon = PipedSupd(
        tmp_path,
        f"""
        [programs.flood]
        command = {flood}
        stdout_logfile = "-"
        startsecs = 0
        """,
    )
    piped.append(daemon)
    daemon.start()
    daemon.reading.clear()  # nobody reads supd's stdout any more
    wait_until(lambda: daemon.events("log_stream_stalled"), 20, daemon.describe)
    wait_until(lambda: daemon.events("log_output_dropped"), 20, daemon.describe)
    started = time.monotonic()
    assert daemon.state("flood") == "RUNNING"  # the loop answers meanwhile
    assert time.monotonic() - started < 5
    listed = json.loads(supctl(daemon, "--json", "logs", "flood").stdout)
    assert listed[0]["dropped_bytes"] > 0
    daemon.reading.set()
    wait_until(lambda: daemon.events("log_stream_recovered"), 20, daemon.describe)
    wait_until(lambda: len(daemon.out) > 0 and daemon.out.endswith(b"\n"), 20)
    size = len(daemon.out)
    wait_until(lambda: len(daemon.out) > size + 100_000, 20)  # flowing again
    for line in daemon.lines():
        assert re.fullmatch(rb"flood \| line \d{9}", line), line  # whole lines only


def test_children_on_supds_stderr_and_its_own_log_never_split_each_other(
    tmp_path: Path,
) -> None:
    """supd's stdout and stderr are the same file (as in the Supd helper): children's
    lines and supd's own JSON events go through one writer, one whole line at a time."""
    flood = cmd("""
        import sys, time
        for n in range(30000):
            sys.stderr.write(f"err {n:06d}\\n")
        sys.stderr.flush()
        time.sleep(1000)
    """)
    daemon = Supd(
        tmp_path,
        f"""
        [programs.noisy]
        command = {flood}
        stderr_logfile = "/dev/stderr"
        stdout_logfile = "/dev/stdout"
        startsecs = 0
        [programs.churn]
        command = {cmd("pass")}
        startsecs = 0
        autorestart = true
        backoff_initial = 0
        startretries = 1000
        """,
    )
    try:
        daemon.start()

        def flood_and_events_in() -> bool:
            # Both writers must have had their turn: the whole flood, and supd's own
            # events (the churn's; the flood may end before many are written).
            text = daemon.log_path.read_bytes()
            return b"err 029999\n" in text and text.count(b"\n{") > 10

        wait_until(flood_and_events_in, 30, daemon.describe)
    finally:
        daemon.kill()
    numbers = []
    events = 0
    for line in daemon.log_path.read_bytes().split(b"\n")[:-1]:
        if line.startswith(b"{"):
            json.loads(line)
            events += 1
            continue
        match = re.fullmatch(rb"noisy \| err (\d{6})", line)
        assert match is not None, line
        numbers.append(int(match.group(1)))
    assert numbers == list(range(30000))
    assert events > 10


# -- LineSink as data -----------------------------------------------------------------------


class Collected:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, parts: tuple[bytes | memoryview, ...]) -> bool:
        self.sent.append(b"".join(bytes(part) for part in parts))
        return True


def test_line_sink_sends_whole_prefixed_lines_and_flushes_a_partial_as_its_own_line() -> None:
    from supd.logs import MAX_HELD_LINE, LineSink

    target = Collected()
    sink = LineSink(target, b"w | ", "test")
    sink.write(b"one\ntw")
    sink.write(b"o\nthree")
    assert target.sent == [b"w | one\n", b"w | two\n"]
    sink.flush_partial()  # the timer: "three" goes out alone
    sink.write(b" and more\n")
    assert target.sent[2:] == [b"w | three\n", b"w |  and more\n"]
    assert sink.tail(100) == b"one\ntwo\nthree\n and more\n"  # without the prefix
    sink.write(b"x" * MAX_HELD_LINE)  # a line too long to wait for goes out at the bound
    assert target.sent[4] == b"w | " + b"x" * MAX_HELD_LINE + b"\n"


def test_line_sink_stamps_a_line_once_with_the_time_its_first_byte_was_read() -> None:
    from supd.logs import LineSink

    target = Collected()
    sink = LineSink(target, b"", "test", timestamps="epoch")
    sink.write(b"a\nb")
    sink.write(b"c\n")
    [first, second] = target.sent
    assert re.fullmatch(STAMP_EPOCH + rb"a\n", first), first
    assert re.fullmatch(STAMP_EPOCH + rb"bc\n", second), second
    sink.write(b"partial")
    sink.flush_partial()
    sink.write(b" end\n")
    assert re.fullmatch(STAMP_EPOCH + rb"partial\n", target.sent[2])
    assert target.sent[3] == b" end\n"  # a continuation: no second stamp


# -- configuration --------------------------------------------------------------------------


def test_log_options_are_read_and_defaulted_from_the_supervisor_table(tmp_path: Path) -> None:
    from tests.test_config import load_text

    config = load_text(
        tmp_path,
        """
        [supervisor]
        log_timestamps = "iso"
        [programs.a]
        command = "x"
        numprocs = 2
        stdout_logfile = "-"
        stderr_logfile = "journal"
        rotate_every = "1d"
        max_total_size = "1GB"
        compress = true
        log_prefix = "[{program}/{process_num}] "
        [programs.b]
        command = "x"
        log_timestamps = "none"
        rotate_every = 3600
        """.replace("\n        ", "\n"),
    )
    a, b = config.programs["a"], config.programs["b"]
    assert (a.log_destination("a:0", "stdout"), a.log_destination("a:1", "stderr")) == (
        1,
        "journal",
    )
    assert a.prefix("a:1", "stdout") == "[a/1] "
    assert (a.rotate_every, a.max_total_size, a.compress) == (86400.0, 1 << 30, True)
    assert (a.log_timestamps, b.log_timestamps, b.rotate_every) == ("iso", "none", 3600.0)
    assert b.prefix("b", "stderr") == "b | "


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ('rotate_every = "soon"', 'should be a duration such as "1h", "1d" or "7d"'),
        ('rotate_every = "0h"', "should be a positive duration"),
        ('log_prefix = "{pid} | "', "unknown placeholder {pid}"),
        ('log_timestamps = "rfc"', "'none', 'iso', 'iso-utc' or 'epoch'"),
        ('max_total_size = "lots"', ""),
    ],
)
def test_bad_log_options_name_file_line_and_key(tmp_path: Path, option: str, message: str) -> None:
    from tests.test_config import problems

    found = problems(tmp_path, f'[programs.web]\ncommand = "x"\n{option}\n')
    key = option.split(" =")[0]
    assert len(found) == 1
    assert found[0].startswith(f"{tmp_path / 'supd.toml'}:3: programs.web.{key}: "), found
    assert message in found[0]
