"""The floor: the fastest respawn loop plain Python allows, to read supd's figures against.

`respawn_loop` keeps `count` helpers alive: it starts each with os.posix_spawn (vfork and
exec, no Python in the child), watches it with a pidfd in an epoll set, reaps it with
waitid(P_PIDFD) the moment it exits and starts it again at once. It logs nothing, keeps no
state machine and has no control socket. Its children get /dev/null as stdin, stdout and
stderr, and a new session each, as a supervisor's children get their own session.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from collections.abc import Callable


def respawn_loop(
    argv_for: Callable[[int], list[str]],
    count: int,
    env: dict[str, str],
    *,
    max_starts: int | None = None,
    until: float | None = None,
) -> int:
    """Run `count` helpers (argv_for(0..count-1)), respawning each as it exits, until
    `max_starts` starts were made or time.monotonic() passes `until`. Returns the number
    of starts; every child is killed and reaped before it returns."""
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    epoll = select.epoll(count, flags=select.EPOLL_CLOEXEC)
    live: dict[int, tuple[int, int]] = {}  # pidfd -> (helper id, pid)
    file_actions = [(os.POSIX_SPAWN_DUP2, devnull, fd) for fd in (0, 1, 2)]
    starts = 0

    def spawn(ident: int) -> None:
        nonlocal starts
        argv = argv_for(ident)
        pid = os.posix_spawn(argv[0], argv, env, file_actions=file_actions, setsid=True)
        pidfd = os.pidfd_open(pid)
        epoll.register(pidfd, select.EPOLLIN)
        live[pidfd] = (ident, pid)
        starts += 1

    def done() -> bool:
        if max_starts is not None and starts >= max_starts:
            return True
        return until is not None and time.monotonic() >= until

    try:
        for ident in range(count):
            spawn(ident)
        while not done():
            timeout = -1.0 if until is None else max(0.0, until - time.monotonic())
            for pidfd, _events in epoll.poll(timeout):
                ident, _pid = live.pop(pidfd)
                os.waitid(os.P_PIDFD, pidfd, os.WEXITED)
                epoll.unregister(pidfd)
                os.close(pidfd)
                if not done():
                    spawn(ident)
    finally:
        for pidfd, (_ident, pid) in live.items():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitid(os.P_PIDFD, pidfd, os.WEXITED)
            os.close(pidfd)
        epoll.close()
        os.close(devnull)
    return starts
