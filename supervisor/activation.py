"""Socket activation, sd_listen_fds(3) written out: adopt the sockets systemd passes.

With supd.socket enabled, systemd binds /run/supd/supd.sock itself and hands the
listening socket to supd as fd 3, announced by three variables:

* LISTEN_PID: the pid the fds are meant for. Anything else means the variables were
  inherited by accident (supd started by a shell that was started by systemd), and
  the fds are not ours.
* LISTEN_FDS=N: fds 3 .. 3+N-1 are passed.
* LISTEN_FDNAMES (optional): their names, colon-separated (FileDescriptorName=,
  default the socket unit's name).

The passed fds are made close-on-exec at once, so no program supd spawns inherits them,
and by default the variables are removed from the environment they were read from, as
sd_listen_fds(unset_environment=1) does.

The daemon's control server takes the first AF_UNIX stream socket that is listening
(control_socket_fd); other passed fds are left open, close-on-exec, and unused.

Imports the standard library only.
"""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping

__all__ = [
    "LISTEN_FDS_START",
    "control_socket_fd",
    "is_unix_stream_listener",
    "listen_fds",
    "listen_fds_with_names",
]

LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START
_ACTIVATION_ENVIRONMENT = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def listen_fds_with_names(
    environ: MutableMapping[str, str] | None = None, unset: bool = True
) -> list[tuple[int, str]]:
    """(fd, name) for each socket passed to this process; [] when none were.

    A name is "unknown" when LISTEN_FDNAMES is missing or does not match LISTEN_FDS,
    like sd_listen_fds_with_names. Raises ValueError for a malformed LISTEN_FDS meant
    for us, and OSError if a passed fd is not open: both mean a broken launcher, which
    is better reported than silently ignored.
    """
    environ = os.environ if environ is None else environ
    pid = environ.get("LISTEN_PID")
    count_text = environ.get("LISTEN_FDS")
    names_text = environ.get("LISTEN_FDNAMES")
    if unset:
        for name in _ACTIVATION_ENVIRONMENT:
            environ.pop(name, None)
    if pid is None or count_text is None or not _is_our_pid(pid):
        return []
    count = _fd_count(count_text)
    fds = list(range(LISTEN_FDS_START, LISTEN_FDS_START + count))
    for fd in fds:
        os.set_inheritable(fd, False)  # OSError(EBADF) if systemd's fd is not there
    names = names_text.split(":") if names_text is not None else []
    if len(names) != count:
        names = ["unknown"] * count
    return list(zip(fds, names, strict=True))


def listen_fds(environ: MutableMapping[str, str] | None = None, unset: bool = True) -> list[int]:
    """The fds passed to this process (3, 4, ...), now close-on-exec; [] when none."""
    return [fd for fd, _ in listen_fds_with_names(environ, unset)]


def control_socket_fd(
    environ: MutableMapping[str, str] | None = None, unset: bool = True
) -> int | None:
    """The first passed fd that is a listening AF_UNIX stream socket; None if none is.

    Give it to ControlServer(listen_fd=...). Call this once, before opening anything
    else: the fds are only meaningful while LISTEN_* describe them.
    """
    for fd in listen_fds(environ, unset):
        if is_unix_stream_listener(fd):
            return fd
    return None


def is_unix_stream_listener(fd: int) -> bool:
    """True for an AF_UNIX SOCK_STREAM socket that listen() was called on."""
    try:
        # socket(fileno=) takes the fd over; detach() below gives it back unclosed.
        sock = socket.socket(fileno=fd)
    except OSError:  # not a socket at all (ENOTSOCK), or not open
        return False
    try:
        return (
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN) == socket.AF_UNIX
            and sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) == socket.SOCK_STREAM
            and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) != 0
        )
    finally:
        sock.detach()


def _is_our_pid(text: str) -> bool:
    try:
        return int(text) == os.getpid()
    except ValueError:
        return False


def _fd_count(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        count = -1
    if count < 0:
        raise ValueError(f"LISTEN_FDS={text!r} is not a count of file descriptors")
    return count
