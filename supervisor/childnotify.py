"""sd_notify for supervised programs: the socket supd listens on, and what a datagram
means. (notify.py is the other direction: supd telling systemd.)

Programs written for systemd's `Type=notify` run unchanged: a program with
`notify = true` (or `ready = { notify = true }`, or `watchdog_sec`) gets
`NOTIFY_SOCKET` pointing at one datagram socket of supd's, an abstract one
(``@supd/<pid>/notify``) so that a program running as another user can reach it and
nothing is left in the file system. SO_PASSCRED makes the kernel attach the sender's
pid to every datagram; the daemon credits a message to the process whose pid, MAINPID
or ancestor's pid that is (`credit`), and ignores anybody else's (logged once per pid).

The assignments that count are READY=1, STATUS=, WATCHDOG=1, STOPPING=1, RELOADING=1,
EXTEND_TIMEOUT_USEC= and MAINPID=; anything else is ignored, like systemd does with
keys it does not know. Reading is non-blocking and bounded per wake-up.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import Callable, Mapping

from .process import Notified

# A notification is a few short lines; systemd reads at most this much of one.
MAX_DATAGRAM = 4096
# Datagrams read per wake-up: a chatty program cannot starve the loop.
MAX_DATAGRAMS_PER_WAKEUP = 64
# How far up the process tree a sender is looked for (a shell, a wrapper, a worker).
MAX_ANCESTRY = 32

_UCRED = struct.Struct("iII")  # pid_t pid; uid_t uid; gid_t gid


def parse(data: bytes) -> Notified | None:
    """The assignments that count in one datagram, or None when there are none."""
    fields: dict[str, str] = {}
    for line in data.decode(errors="replace").split("\n"):
        key, found, value = line.partition("=")
        if found:
            fields[key] = value
    ready = fields.get("READY") == "1"
    watchdog = fields.get("WATCHDOG") == "1"
    stopping = fields.get("STOPPING") == "1"
    reloading = fields.get("RELOADING") == "1"
    status = fields.get("STATUS")
    extend = _number(fields.get("EXTEND_TIMEOUT_USEC"))
    main_pid = _number(fields.get("MAINPID"))
    counted = (ready, watchdog, stopping, reloading)
    if not any(counted) and status is None and extend is None and main_pid is None:
        return None
    return Notified(
        ready=ready,
        status=status,
        watchdog=watchdog,
        stopping=stopping,
        reloading=reloading,
        extend_timeout_s=None if extend is None else extend / 1_000_000,
        main_pid=main_pid if main_pid is not None and main_pid > 0 else None,
    )


def _number(text: str | None) -> int | None:
    if text is None or not text.isdigit():
        return None
    return int(text)


def parent_pid(pid: int) -> int | None:
    """The parent of `pid` from /proc (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rpartition(b")")[2].split()
    except OSError:
        return None
    return int(fields[1]) if len(fields) > 1 else None


def credit(
    pid: int, owners: Mapping[int, str], parent: Callable[[int], int | None] = parent_pid
) -> str | None:
    """The process a message from `pid` belongs to: `owners` maps the pids supd knows
    (each child, and a MAINPID it declared) to process names; a descendant of one of
    them counts as it."""
    for _ in range(MAX_ANCESTRY):
        name = owners.get(pid)
        if name is not None:
            return name
        up = parent(pid)
        if up is None or up <= 1:
            return None
        pid = up
    return None


class NotifySocket:
    """The datagram socket programs send their notifications to.

    `inherited`: the fd of the one a re-exec'd supd's old image made (docs/reexec.md).
    It is taken over as it is, with what waits in it: the children keep its address,
    and a datagram sent while the daemon was being replaced is still there to read."""

    def __init__(self, inherited: int | None = None) -> None:
        self.address = f"@supd/{os.getpid()}/notify"
        if inherited is not None:
            self.sock = _adopted(inherited)
            self.address = _address(self.sock)
            self.fd = self.sock.fileno()
            return
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.setblocking(False)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            self.sock.bind("\0" + self.address[1:])
        except OSError:
            self.sock.close()
            raise
        self.fd = self.sock.fileno()

    def receive(self) -> list[tuple[int | None, bytes]]:
        """The datagrams waiting now (at most MAX_DATAGRAMS_PER_WAKEUP), each with the
        sender's pid as the kernel vouches for it (None if no credentials came)."""
        received: list[tuple[int | None, bytes]] = []
        space = socket.CMSG_SPACE(_UCRED.size)
        for _ in range(MAX_DATAGRAMS_PER_WAKEUP):
            try:
                data, ancillary, _flags, _address = self.sock.recvmsg(MAX_DATAGRAM, space)
            except (BlockingIOError, InterruptedError):
                break
            pid = None
            for level, kind, payload in ancillary:
                credentials = level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
                if credentials and len(payload) >= _UCRED.size:
                    pid = _UCRED.unpack_from(payload)[0]
            received.append((pid, data))
        return received

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def _adopted(fd: int) -> socket.socket:
    """The inherited fd as our notify socket again, or OSError if it is not one (the
    fd is then closed): close-on-exec, non-blocking, credentials on."""
    try:
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)
    except OSError:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise
    try:
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_DGRAM:
            raise OSError(f"fd {fd} is not a datagram socket")
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        _address(sock)
    except OSError:
        sock.close()
        raise
    return sock


def _address(sock: socket.socket) -> str:
    """NOTIFY_SOCKET's value for a bound socket: "@name" for an abstract one."""
    name = sock.getsockname()
    if isinstance(name, bytes):  # abstract: a leading NUL
        if not name.startswith(b"\0") or len(name) < 2:
            raise OSError("the notify socket is not bound")
        return "@" + name[1:].decode()
    if not name:
        raise OSError("the notify socket is not bound")
    return str(name)
