"""sd_notify(3), written out: tell systemd that supd is ready, reloading or stopping.

The whole protocol is one datagram per notification, sent to the AF_UNIX socket named
by $NOTIFY_SOCKET: newline-separated KEY=VALUE assignments such as ``READY=1`` or
``STATUS=3 running``. A name starting with ``@`` is an abstract socket (the ``@``
becomes a NUL byte). Without $NOTIFY_SOCKET every method is a no-op, so the daemon calls
them unconditionally.

Three rules shape this module:

* Never block the loop and never crash it. The socket is non-blocking and every send
  error (the receiver's queue is full, the socket is gone, systemd restarted) is logged
  once per outage and otherwise ignored: a lost notification costs at worst a watchdog
  restart, a stuck daemon costs every program.
* The datagram is addressed on every send (sendto, no connect), like libsystemd does:
  if systemd re-creates its socket, the next notification still arrives.
* What systemd hands supd is supd's alone. ``take_systemd_environment`` removes the
  variables from the daemon's environment (spawn.py also strips them from every child's
  environment): a program that saw NOTIFY_SOCKET could report READY on supd's behalf
  (NotifyAccess=main drops that, but noisily), and one that saw LISTEN_FDS could grab
  fd 3.

Imports the standard library, facts and daemonlog only; daemon.py is its only user.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping, MutableMapping
from typing import Any

from . import daemonlog
from .facts import SYSTEMD_ENVIRONMENT

__all__ = [
    "SYSTEMD_ENVIRONMENT",
    "Notifier",
    "status_line",
    "take_systemd_environment",
]


# systemd ignores a notification longer than PIPE_BUF (4096) bytes altogether:
# 1000 characters of UTF-8 (at most 4000 bytes) plus "READY=1\nSTATUS=" always fit.
# A longer status is cut here, visibly, rather than by systemd.
MAX_STATUS_CHARS = 1000

# The order states appear in status_line(): the healthy state first, then the ones an
# operator should look at.
_STATUS_ORDER = ("running", "starting", "backoff", "stopping", "fatal", "exited", "stopped")


def take_systemd_environment(environ: MutableMapping[str, str]) -> dict[str, str]:
    """Remove systemd's per-service variables from `environ` and return them.

    Pass os.environ (popping from it also unsets the variable in the C environment) and
    give the result to Notifier.from_environ() and activation.listen_fds().
    """
    return {name: environ.pop(name) for name in SYSTEMD_ENVIRONMENT if name in environ}


def status_line(counts: Mapping[str, int]) -> str:
    """A short STATUS= text from per-state process counts, e.g. '3 running, 1 fatal'.

    Keys are state names in any case (State.value works as is). "running" is always
    shown; other states only when some process is in them, so the line stays short and
    anything unusual stands out.
    """
    totals: dict[str, int] = {}
    for state, count in counts.items():
        totals[state.lower()] = totals.get(state.lower(), 0) + count
    order = [*_STATUS_ORDER, *sorted(totals.keys() - set(_STATUS_ORDER))]
    parts = [
        f"{totals.get(state, 0)} {state}"
        for state in order
        if state == "running" or totals.get(state, 0)
    ]
    return ", ".join(parts)


def socket_address(name: str) -> str | bytes | None:
    """The sendto() address for a $NOTIFY_SOCKET value; None if unsupported.

    sd_notify accepts an absolute path or "@abstract". (systemd >= 254 also has
    "vsock:CID:PORT" for virtual machines, which supd has no use for.)
    """
    if name.startswith("@") and len(name) > 1:
        return b"\0" + os.fsencode(name[1:])
    if name.startswith("/"):
        return name
    return None


class Notifier:
    """Sends sd_notify messages; every method is a no-op when `enabled` is False."""

    def __init__(
        self,
        address: str | bytes | None,
        *,
        watchdog_usec: int | None = None,
        watchdog_pid: int | None = None,
        log: Any = None,
    ) -> None:
        self.address = address
        self._watchdog_usec = watchdog_usec
        self._watchdog_pid = watchdog_pid
        self._log: Any = (log if log is not None else daemonlog.get_logger()).bind(
            component="notify"
        )
        self._sock: socket.socket | None = None
        self._last_status: str | None = None
        self._failing = False  # a send failed and nothing got through since: stay quiet
        if address is not None:
            self._sock = socket.socket(
                socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
            )

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None, *, log: Any = None) -> Notifier:
        """A notifier for $NOTIFY_SOCKET (default environ: os.environ); disabled if unset.

        Reads WATCHDOG_USEC and WATCHDOG_PID too. Nothing is removed from `environ`:
        see take_systemd_environment().
        """
        environ = os.environ if environ is None else environ
        name = environ.get("NOTIFY_SOCKET", "")
        address = socket_address(name) if name else None
        notifier = cls(
            address,
            watchdog_usec=_positive_int(environ.get("WATCHDOG_USEC")),
            watchdog_pid=_positive_int(environ.get("WATCHDOG_PID")),
            log=log,
        )
        if name and address is None:
            notifier._log.warning("notify_socket_unsupported", notify_socket=name)
        return notifier

    @classmethod
    def disabled(cls) -> Notifier:
        """A notifier that sends nothing: for a daemon not started by systemd, and tests."""
        return cls(None)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    # -- the messages -----------------------------------------------------------------

    def ready(self, status: str | None = None) -> None:
        """Startup (or a reload) is complete: READY=1, with an optional STATUS=."""
        self._send_with_status("READY=1", status)

    def reloading(self, status: str | None = None) -> None:
        """A reload starts; systemd waits for the next ready() to call it done.

        MONOTONIC_USEC lets systemd tell this reload from an older one
        (Type=notify-reload requires it).
        """
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send_with_status(f"RELOADING=1\nMONOTONIC_USEC={now_usec}", status)

    def stopping(self, status: str | None = None) -> None:
        """Shutdown has begun: STOPPING=1."""
        self._send_with_status("STOPPING=1", status)

    def status(self, text: str) -> None:
        """STATUS=text, shown by `systemctl status`; sent only when the text changed."""
        text = _clean_status(text)
        if text != self._last_status:
            self._send_with_status(None, text)

    def watchdog(self) -> None:
        """Keep-alive for WatchdogSec=: WATCHDOG=1."""
        self._send("WATCHDOG=1")

    def watchdog_interval_ms(self) -> int | None:
        """How often to call watchdog(): half of $WATCHDOG_USEC, as sd_watchdog_enabled
        advises; None when there is no watchdog for this process.

        A WATCHDOG_PID naming another process means the watchdog is not ours (we were
        started by something that was itself started by systemd).
        """
        if not self.enabled or self._watchdog_usec is None:
            return None
        if self._watchdog_pid is not None and self._watchdog_pid != os.getpid():
            return None
        return max(1, self._watchdog_usec // 2000)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # -- sending ----------------------------------------------------------------------

    def _send_with_status(self, message: str | None, status: str | None) -> None:
        lines = [] if message is None else [message]
        if status is not None:
            status = _clean_status(status)
            lines.append(f"STATUS={status}")
        if self._send("\n".join(lines)) and status is not None:
            self._last_status = status

    def _send(self, message: str) -> bool:
        """One datagram; True if the kernel took it. Never raises, never blocks."""
        if self._sock is None or self.address is None:
            return False
        try:
            self._sock.sendto(message.encode(), self.address)
        except OSError as exc:
            # EAGAIN (systemd's queue is full), ENOENT/ECONNREFUSED (no socket there),
            # EPERM (an LSM said no)... all mean "not delivered", none is supd's problem.
            if not self._failing:
                self._failing = True
                self._log.warning(
                    "notify_failed", address=repr(self.address), error=str(exc), message=message
                )
            return False
        if self._failing:
            self._failing = False
            self._log.info("notify_recovered", address=repr(self.address))
        return True


def _clean_status(text: str) -> str:
    """One line (a newline would start a new assignment), short enough for systemd."""
    text = " ".join(text.splitlines())
    if len(text) > MAX_STATUS_CHARS:
        text = text[: MAX_STATUS_CHARS - 3] + "..."
    return text


def _positive_int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        return None
    return number if number > 0 else None
