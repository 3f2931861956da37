"""sessions.py: the fallback without cgroups, against real processes and /proc."""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from supd import sessions
from tests.helpers import pid_alive, wait_until


def test_stat_lines_with_awkward_command_names_parse() -> None:
    line = "4242 (a) (b c) S 1 4242 4240 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 777 0 0\n"
    assert sessions.parse_stat(line) == sessions.ProcStat(4242, 4240, 777, "S", "a) (b c")
    assert sessions.parse_stat("garbage") is None


@pytest.fixture
def leader() -> Iterator[int]:
    """A session leader that leaves a background sleep in its session and exits."""
    pid = os.posix_spawn(
        "/bin/sh", ["sh", "-c", "sleep 100011 & exec sleep 100012"], os.environ,
        setsid=True, setsigmask=(),
    )  # fmt: skip
    yield pid
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def test_session_members_are_found_and_killed(leader: int) -> None:
    wait_until(lambda: len(sessions.session_members(leader)) == 2)
    start = sessions.read_stat(leader)
    assert start is not None
    members = {p.pid for p in sessions.session_members(leader)}
    assert leader in members
    killed = sessions.kill_session(leader, start.start_time)
    assert {p.pid for p in killed} == members
    os.waitpid(leader, 0)
    wait_until(lambda: not any(pid_alive(pid) for pid in members))


def test_many_sessions_are_emptied_with_one_scan_of_proc(
    leader: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A shutdown of thousands without cgroups must not scan /proc once per exit.
    second = os.posix_spawn(
        "/bin/sh", ["sh", "-c", "sleep 100013 & exec sleep 100014"], os.environ,
        setsid=True, setsigmask=(),
    )  # fmt: skip
    try:
        for pid in (leader, second):
            wait_until(lambda pid=pid: len(sessions.session_members(pid)) == 2)
        members = {pid: {p.pid for p in sessions.session_members(pid)} for pid in (leader, second)}
        starts = {}
        for pid in (leader, second):
            stat = sessions.read_stat(pid)
            assert stat is not None
            starts[pid] = stat.start_time
        scans = 0
        real = sessions.all_processes

        def counted() -> Iterator[sessions.ProcStat]:
            nonlocal scans
            scans += 1
            return real()

        monkeypatch.setattr(sessions, "all_processes", counted)
        killed = sessions.kill_sessions({leader: starts[leader], second: starts[second]})
        assert scans == 1
        assert {pid: {p.pid for p in found} for pid, found in killed.items()} == members
        for pid in (leader, second):
            os.waitpid(pid, 0)
        everyone = members[leader] | members[second]
        wait_until(lambda: not any(pid_alive(pid) for pid in everyone))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(second, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(second, 0)


def test_a_reused_leader_pid_is_not_killed(leader: int) -> None:
    wait_until(lambda: len(sessions.session_members(leader)) == 2)
    stat = sessions.read_stat(leader)
    assert stat is not None
    assert sessions.kill_session(leader, stat.start_time + 1) == []  # another process
    assert pid_alive(leader)


def test_the_journal_keeps_what_was_started_and_not_ended(tmp_path: Path, leader: int) -> None:
    journal = sessions.SessionJournal(tmp_path / "supd.sessions")
    journal.open()
    journal.started(leader)
    journal.started(os.getpid())
    journal.ended(os.getpid())
    stat = sessions.read_stat(leader)
    assert stat is not None
    # A new supd reads what this one (now "dead": never closed) left.
    assert sessions.SessionJournal(journal.path).load() == {leader: stat.start_time}
    journal.close(remove=True)
    assert not journal.path.exists()


def test_the_journal_compacts_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sessions, "COMPACT_AFTER_LINES", 10)
    journal = sessions.SessionJournal(tmp_path / "supd.sessions")
    journal.open()
    for _ in range(30):
        journal.started(os.getpid())
        journal.ended(os.getpid())
    journal.started(os.getpid())
    lines = journal.path.read_text().splitlines()
    assert len(lines) <= 10
    assert sessions.SessionJournal(journal.path).load() == {os.getpid(): journal.live[os.getpid()]}
    journal.close(remove=True)


def test_a_scan_that_cannot_open_a_process_says_so_instead_of_missing_it(leader: int) -> None:
    """With one fd left, /proc itself opens but no process's stat does: the scan must
    fail (the daemon tries again later), not report an empty session (members escape)."""
    wait_until(lambda: len(sessions.session_members(leader)) == 2)
    spare = os.dup(0)
    os.close(spare)  # the lowest free fd: with the limit just above it, the only one
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (spare + 1, hard))
    try:
        with pytest.raises(OSError) as failed:
            sessions.session_members(leader)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert failed.value.errno == errno.EMFILE
    assert len(sessions.session_members(leader)) == 2
