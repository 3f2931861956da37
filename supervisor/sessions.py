"""Leftovers without cgroups: every program is a session leader, and sessions are traced.

Each child supd spawns starts its own session (setsid), so the session id of everything
it leaves behind is its pid, unless a descendant called setsid() again (only cgroups
catch those). This module finds the members of a session in /proc and keeps a small
journal of the sessions supd started, so that a supd that was SIGKILLed (no chance to
stop anything) is followed by one that kills what the dead one left.

The journal is append-only, one line per event, each line written whole with O_APPEND:

    + SID STARTTIME     a session started (STARTTIME: the leader's, in clock ticks)
    - SID               it ended (its leader exited and its members were dealt with)

and rewritten (atomically, by rename) when it grows past a bound. Appending costs one
write per spawn; rewriting a whole state file per spawn would cost O(programs).

A session is only killed when its leader's start time still matches, or, with the leader
gone, for members that started after it: a reused pid never makes supd kill a stranger.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import select
import signal
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

COMPACT_AFTER_LINES = 4096


@dataclass(frozen=True)
class ProcStat:
    pid: int
    session: int
    start_time: int  # clock ticks since boot
    state: str
    command: str  # the short name (comm); kill_session gives the whole command line


def parse_stat(text: str) -> ProcStat | None:
    """/proc/PID/stat: the command may hold spaces and parentheses; the last ')' ends it."""
    head, _, rest = text.rpartition(")")
    pid_text, _, command = head.partition(" (")
    fields = rest.split()
    try:
        # fields[0] is the state (field 3); session is field 6, starttime field 22.
        return ProcStat(int(pid_text), int(fields[3]), int(fields[19]), fields[0], command)
    except (ValueError, IndexError):
        return None


def read_stat(pid: int) -> ProcStat | None:
    try:
        return _read_stat(pid)
    except OSError:
        return None


def _read_stat(pid: int) -> ProcStat | None:
    """None when the process is gone; OSError when no fd is left to look with."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return parse_stat(f.read())
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            raise
        return None


def all_processes() -> Iterator[ProcStat]:
    """Every process in /proc. Raises OSError when out of fds (EMFILE, ENFILE): a scan
    that could not look at a process must not pass for one that found nothing."""
    with os.scandir("/proc") as entries:
        for entry in entries:
            if entry.name.isdigit():
                stat = _read_stat(int(entry.name))
                if stat is not None:
                    yield stat


def session_members(session: int, leader_start: int | None = None) -> list[ProcStat]:
    """Live processes of `session`, started no earlier than its leader (if known)."""
    return [p for p in all_processes() if _member(p, {session: leader_start})]


def _member(stat: ProcStat, leaders: Mapping[int, int | None]) -> bool:
    """A live process of one of `leaders`' sessions, started no earlier than its leader
    (when that is known): a reused session id never claims an older stranger."""
    if stat.session not in leaders or stat.state == "Z":
        return False
    leader_start = leaders[stat.session]
    return leader_start is None or stat.start_time >= leader_start


def wchan(pid: int) -> str:
    """Where in the kernel `pid` waits (/proc/PID/wchan; "0" when running or hidden)."""
    try:
        with open(f"/proc/{pid}/wchan") as f:
            return f.read().strip() or "0"
    except OSError:
        return "?"


def alive(pid: int) -> bool:
    stat = read_stat(pid)
    return stat is not None and stat.state != "Z"


def wait_gone(pids: list[int], timeout: float) -> bool:
    """Block (start-up only) until every pid has ended, or `timeout` passes.

    pidfds (Linux 5.3+) become readable when the process ends, even one that is not
    our child; a pid that is already gone needs no wait.
    """
    poller = select.poll()
    fds: list[int] = []
    try:
        for pid in pids:
            try:
                fd = os.pidfd_open(pid)
            except OSError:  # gone already (ESRCH), or no pidfds: checked below
                continue
            fds.append(fd)
            poller.register(fd, select.POLLIN)
        waiting = len(fds)
        deadline = time.monotonic() + timeout
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for fd, _ in poller.poll(left * 1000):
                poller.unregister(fd)
                waiting -= 1
    finally:
        for fd in fds:
            os.close(fd)
    return not any(alive(pid) for pid in pids)


def journal_path(socket: Path) -> Path:
    """The journal of the supd serving `socket`: beside it, in the runtime directory."""
    return socket.with_name(socket.name + ".sessions")


def kill_session(session: int, leader_start: int | None = None) -> list[ProcStat]:
    """SIGKILL every live member of `session` (one /proc scan); returns them."""
    return kill_sessions({session: leader_start})[session]


def kill_sessions(leaders: Mapping[int, int | None]) -> dict[int, list[ProcStat]]:
    """SIGKILL every live member of each session in `leaders` (session id -> its
    leader's start time, when known), all with one /proc scan; the members by session.

    One scan for many: with thousands of processes a scan costs ~0.1 s, so a burst of
    exits (a shutdown) must not pay one each.
    """
    ours: dict[int, int | None] = {}
    for session, leader_start in leaders.items():
        if leader_start is not None:
            leader = read_stat(session)
            if leader is not None and leader.start_time != leader_start:
                continue  # the pid now leads another session: not ours
        ours[session] = leader_start
    found: dict[int, list[ProcStat]] = {session: [] for session in leaders}
    if not ours:
        return found
    for member in all_processes():
        if not _member(member, ours):
            continue
        # Its whole command line, for the log, read while it is still there.
        full = dataclasses.replace(member, command=command_line(member.pid, member.command))
        found[member.session].append(full)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(member.pid, signal.SIGKILL)
    return found


def command_line(pid: int, default: str = "?") -> str:
    """/proc/PID/cmdline with spaces; `default` (the short name) for a kernel thread."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return default
    return raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace") or default


class SessionJournal:
    """The sessions this supd started and has not seen end, on disk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.live: dict[int, int] = {}  # session id -> leader's start time
        self._fd: int | None = None
        self._lines = 0

    def load(self) -> dict[int, int]:
        """What a previous supd left: sessions it started and never saw end."""
        found: dict[int, int] = {}
        try:
            text = self.path.read_text()
        except (FileNotFoundError, UnicodeDecodeError):
            return found
        for line in text.splitlines():
            kind, _, rest = line.partition(" ")
            words = rest.split()
            with contextlib.suppress(ValueError, IndexError):
                if kind == "+":
                    found[int(words[0])] = int(words[1])
                elif kind == "-":
                    found.pop(int(words[0]), None)
        return found

    def open(self) -> None:
        """Start a fresh journal (after the previous one's leftovers were dealt with)."""
        self._rewrite()

    def started(self, pid: int) -> None:
        stat = read_stat(pid)
        if stat is None:
            return  # already gone: nothing it leaves can outlive its exit handling
        self.live[pid] = stat.start_time
        self._append(f"+ {pid} {stat.start_time}\n")

    def ended(self, pid: int) -> None:
        if self.live.pop(pid, None) is not None:
            self._append(f"- {pid}\n")

    def close(self, remove: bool = False) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if remove:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def _append(self, line: str) -> None:
        if self._fd is None:
            return
        if self._lines >= COMPACT_AFTER_LINES:
            self._rewrite()  # from `live`, which already holds this change
            return
        with contextlib.suppress(OSError):  # a full disk costs the journal, not a spawn
            os.write(self._fd, line.encode())
            self._lines += 1

    def _rewrite(self) -> None:
        temporary = self.path.with_name(self.path.name + ".new")
        try:
            with open(temporary, "w") as f:
                f.writelines(f"+ {sid} {start}\n" for sid, start in self.live.items())
            os.replace(temporary, self.path)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        except OSError:
            return
        self.close()
        self._fd = fd
        self._lines = len(self.live)
