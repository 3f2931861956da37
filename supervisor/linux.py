"""Thin shims over the Linux syscalls that Python 3.11's standard library lacks.

One wrapper per syscall, named and typed like the standard library where it has (or
will have) the call, errno turned into ``OSError``. No policy lives here: the selector
decides which signals to block, which flags to pass and what to do with the results.

* ``timerfd_create`` / ``timerfd_settime`` / ``timerfd_settime_ns`` / ``timerfd_gettime``
  / ``timerfd_gettime_ns`` have the names and signatures of ``os`` in Python 3.13 and
  are taken from ``os`` when it has them, so this module shrinks when the minimum
  Python rises.
* ``signalfd`` and ``prctl`` go through ctypes: no Python version has them.

Every ctypes call here returns at once. Never add a blocking one: PEP 475's automatic
EINTR retry only covers the standard library's own wrappers, not ctypes calls.

Must not import anything from ``supervisor``.
"""

from __future__ import annotations

import ctypes
import os
import struct
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Final, NamedTuple

__all__ = [
    "CLOCK_MONOTONIC",
    "PR_SET_CHILD_SUBREAPER",
    "PR_SET_PDEATHSIG",
    "SFD_CLOEXEC",
    "SFD_NONBLOCK",
    "SIGNALFD_SIGINFO",
    "TFD_CLOEXEC",
    "TFD_NONBLOCK",
    "TFD_TIMER_ABSTIME",
    "SignalfdSiginfo",
    "decode_siginfo",
    "get_child_subreaper",
    "get_pdeathsig",
    "iter_siginfo",
    "set_child_subreaper",
    "set_pdeathsig",
    "signalfd",
    "timerfd_create",
    "timerfd_gettime",
    "timerfd_gettime_ns",
    "timerfd_settime",
    "timerfd_settime_ns",
]

_libc = ctypes.CDLL(None, use_errno=True)


def _raise_errno() -> None:
    err = ctypes.get_errno()
    raise OSError(err, os.strerror(err))


def _check(result: int) -> int:
    """Return a libc result, or raise the errno it left behind when it is -1."""
    if result == -1:
        _raise_errno()
    return result


# --------------------------------------------------------------------------- timerfd

CLOCK_MONOTONIC: Final = time.CLOCK_MONOTONIC

_NS_PER_SECOND: Final = 1_000_000_000

if sys.version_info >= (3, 13):
    # A version check rather than ``try: from os import ...``: type checkers narrow
    # on sys.version_info, and os has every one of these on Linux from 3.13 on.
    from os import (
        TFD_CLOEXEC,
        TFD_NONBLOCK,
        TFD_TIMER_ABSTIME,
        timerfd_create,
        timerfd_gettime,
        timerfd_gettime_ns,
        timerfd_settime,
        timerfd_settime_ns,
    )
else:
    # <sys/timerfd.h>: TFD_CLOEXEC and TFD_NONBLOCK are O_CLOEXEC and O_NONBLOCK.
    TFD_CLOEXEC: Final = os.O_CLOEXEC
    TFD_NONBLOCK: Final = os.O_NONBLOCK
    TFD_TIMER_ABSTIME: Final = 1

    class _Timespec(ctypes.Structure):
        _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]

    class _Itimerspec(ctypes.Structure):
        _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]

    _libc.timerfd_create.argtypes = [ctypes.c_int, ctypes.c_int]
    _libc.timerfd_create.restype = ctypes.c_int
    _libc.timerfd_settime.argtypes = [
        ctypes.c_int,
        ctypes.c_int,
        ctypes.POINTER(_Itimerspec),
        ctypes.POINTER(_Itimerspec),
    ]
    _libc.timerfd_settime.restype = ctypes.c_int
    _libc.timerfd_gettime.argtypes = [ctypes.c_int, ctypes.POINTER(_Itimerspec)]
    _libc.timerfd_gettime.restype = ctypes.c_int

    def _ns_from_timespec(spec: _Timespec) -> int:
        return int(spec.tv_sec) * _NS_PER_SECOND + int(spec.tv_nsec)

    def _seconds_to_ns(seconds: float) -> int:
        return round(seconds * _NS_PER_SECOND)

    def timerfd_create(clockid: int, /, *, flags: int = 0) -> int:
        """Create a timer fd on ``clockid`` (see timerfd_create(2))."""
        return _check(_libc.timerfd_create(clockid, flags))

    def timerfd_settime_ns(
        fd: int, /, *, flags: int = 0, initial: int = 0, interval: int = 0
    ) -> tuple[int, int]:
        """Arm (or, with ``initial=0``, disarm) a timer fd; times in nanoseconds.

        Returns the previous setting as ``(initial, interval)``.
        """
        # Armed at every start and exit of a process with a timer (startsecs, backoff):
        # the struct is built from plain (seconds, nanoseconds) pairs, not a Python call
        # and a _Timespec object per field.
        if initial < 0 or interval < 0:
            name, ns = ("interval", interval) if interval < 0 else ("initial", initial)
            raise ValueError(f"{name} must be non-negative, not {ns}")
        new = _Itimerspec(divmod(interval, _NS_PER_SECOND), divmod(initial, _NS_PER_SECOND))
        old = _Itimerspec()
        _check(_libc.timerfd_settime(fd, flags, ctypes.byref(new), ctypes.byref(old)))
        value, period = old.it_value, old.it_interval
        return (
            value.tv_sec * _NS_PER_SECOND + value.tv_nsec,
            period.tv_sec * _NS_PER_SECOND + period.tv_nsec,
        )

    def timerfd_settime(
        fd: int, /, *, flags: int = 0, initial: float = 0.0, interval: float = 0.0
    ) -> tuple[float, float]:
        """Arm (or, with ``initial=0``, disarm) a timer fd; times in seconds.

        Returns the previous setting as ``(initial, interval)``.
        """
        old_initial, old_interval = timerfd_settime_ns(
            fd, flags=flags, initial=_seconds_to_ns(initial), interval=_seconds_to_ns(interval)
        )
        return old_initial / _NS_PER_SECOND, old_interval / _NS_PER_SECOND

    def timerfd_gettime_ns(fd: int, /) -> tuple[int, int]:
        """Return ``(time to next expiry, interval)`` of a timer fd in nanoseconds."""
        current = _Itimerspec()
        _check(_libc.timerfd_gettime(fd, ctypes.byref(current)))
        return _ns_from_timespec(current.it_value), _ns_from_timespec(current.it_interval)

    def timerfd_gettime(fd: int, /) -> tuple[float, float]:
        """Return ``(time to next expiry, interval)`` of a timer fd in seconds."""
        initial, interval = timerfd_gettime_ns(fd)
        return initial / _NS_PER_SECOND, interval / _NS_PER_SECOND


# -------------------------------------------------------------------------- signalfd

# <sys/signalfd.h>: like the timerfd flags, these are O_CLOEXEC and O_NONBLOCK.
SFD_CLOEXEC: Final = os.O_CLOEXEC
SFD_NONBLOCK: Final = os.O_NONBLOCK


class _Sigset(ctypes.Structure):
    """glibc's ``sigset_t``: 1024 bits, filled only through sigemptyset/sigaddset."""

    _fields_ = [("val", ctypes.c_ulong * (1024 // (8 * ctypes.sizeof(ctypes.c_ulong))))]


_libc.sigemptyset.argtypes = [ctypes.POINTER(_Sigset)]
_libc.sigemptyset.restype = ctypes.c_int
_libc.sigaddset.argtypes = [ctypes.POINTER(_Sigset), ctypes.c_int]
_libc.sigaddset.restype = ctypes.c_int
_libc.signalfd.argtypes = [ctypes.c_int, ctypes.POINTER(_Sigset), ctypes.c_int]
_libc.signalfd.restype = ctypes.c_int


def _sigset(signals: Iterable[int]) -> _Sigset:
    mask = _Sigset()
    _check(_libc.sigemptyset(ctypes.byref(mask)))
    for signum in signals:
        _check(_libc.sigaddset(ctypes.byref(mask), int(signum)))
    return mask


def signalfd(fd: int, signals: Iterable[int], flags: int) -> int:
    """Create (``fd=-1``) or update a signalfd that accepts ``signals`` (signalfd(2)).

    The signals must already be blocked, or the kernel delivers them the usual way
    instead. Returns the signalfd; ``flags`` only matters when creating one.
    """
    return _check(_libc.signalfd(fd, ctypes.byref(_sigset(signals)), flags))


class SignalfdSiginfo(NamedTuple):
    """One ``struct signalfd_siginfo`` record read from a signalfd (padding dropped)."""

    signo: int
    errno: int
    code: int
    pid: int
    uid: int
    fd: int
    tid: int
    band: int
    overrun: int
    trapno: int
    status: int
    value_int: int
    value_ptr: int
    utime: int
    stime: int
    addr: int
    addr_lsb: int
    syscall: int
    call_addr: int
    arch: int


# struct signalfd_siginfo from <sys/signalfd.h>, in native byte order without
# alignment padding ('='), since the kernel lays it out explicitly: 128 bytes.
SIGNALFD_SIGINFO: Final = struct.Struct("=IiiIIiIIIIiiQQQQH2xiQI28x")
assert SIGNALFD_SIGINFO.size == 128


def decode_siginfo(buffer: bytes, offset: int = 0) -> SignalfdSiginfo:
    """Decode the ``signalfd_siginfo`` record at ``offset`` in ``buffer``."""
    return SignalfdSiginfo._make(SIGNALFD_SIGINFO.unpack_from(buffer, offset))


def iter_siginfo(buffer: bytes) -> Iterator[SignalfdSiginfo]:
    """Decode every record of a read from a signalfd (a multiple of 128 bytes)."""
    for fields in SIGNALFD_SIGINFO.iter_unpack(buffer):
        yield SignalfdSiginfo._make(fields)


# ----------------------------------------------------------------------------- prctl

PR_SET_PDEATHSIG: Final = 1
PR_GET_PDEATHSIG: Final = 2
PR_SET_CHILD_SUBREAPER: Final = 36
PR_GET_CHILD_SUBREAPER: Final = 37

# prctl is variadic; every option used here takes one unsigned long (a value or an
# address), and the kernel ignores the unused trailing arguments.
_libc.prctl.argtypes = [
    ctypes.c_int,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
]
_libc.prctl.restype = ctypes.c_int


def _prctl(option: int, arg: int) -> int:
    return _check(_libc.prctl(option, arg, 0, 0, 0))


def _prctl_get_int(option: int) -> int:
    value = ctypes.c_int(0)
    _prctl(option, ctypes.addressof(value))
    return value.value


def set_child_subreaper(on: bool) -> None:
    """Adopt (or stop adopting) orphaned descendants, as init does (PR_SET_CHILD_SUBREAPER)."""
    _prctl(PR_SET_CHILD_SUBREAPER, int(on))


def get_child_subreaper() -> bool:
    """Whether this process is a child subreaper (PR_GET_CHILD_SUBREAPER)."""
    return _prctl_get_int(PR_GET_CHILD_SUBREAPER) != 0


def set_pdeathsig(signum: int) -> None:
    """Ask for ``signum`` when the parent thread dies; 0 cancels (PR_SET_PDEATHSIG).

    Meant for a child between fork and exec: the setting survives exec, and the kernel
    clears it in children this process forks.
    """
    _prctl(PR_SET_PDEATHSIG, signum)


def get_pdeathsig() -> int:
    """The parent-death signal of this process, 0 for none (PR_GET_PDEATHSIG)."""
    return _prctl_get_int(PR_GET_PDEATHSIG)


# -- memory -------------------------------------------------------------------------------

_malloc_trim = getattr(_libc, "malloc_trim", None)  # glibc only
if _malloc_trim is not None:
    _malloc_trim.argtypes = [ctypes.c_size_t]
    _malloc_trim.restype = ctypes.c_int


def malloc_trim() -> None:
    """Give the C heap's free pages back to the kernel (glibc's malloc_trim(0)).

    Loading a config allocates far more than it keeps; without this the daemon's RSS
    stays at the peak of the load. A no-op where the C library lacks the call.
    """
    if _malloc_trim is not None:
        _malloc_trim(0)
