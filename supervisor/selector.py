"""The epoll selector that supd's event loop waits on.

One ``Selector`` owns one epoll fd and turns everything the daemon waits for into a
ready key: fds (child pipes, the control socket), millisecond timers, signals, child
exits and cross-thread wake-ups. Its shape follows the Linux backend of Nim's
``ioselectors`` (chronos), minus that backend's known flaws (see the notes below).

It knows fds, signals and pids, never programs: callers attach a data tag to each
registration and get it back with every event.

Must not import anything from ``supervisor`` except ``linux``.
"""

# Some facts about signals, children and epoll, and what this module does about them
# ==================================================================================
#
# Signals arrive through a signalfd, and a signalfd only sees blocked signals
# ---------------------------------------------------------------------------
# A signalfd is a queue the kernel fills with the *pending* signals of the process that
# are in its mask. A signal that is not blocked is never pending for long: the kernel
# delivers it at once to its disposition (a Python handler, SIG_IGN, or the default,
# which for SIGTERM or SIGUSR1 kills us). So register_signal() first blocks the signal
# with pthread_sigmask and only then puts it in the signalfd's mask. Two consequences:
#
#   * The mask is per thread. It must be set from the thread that runs the loop (supd
#     has only that one), and threads started afterwards inherit it. A thread started
#     earlier with the signal unblocked can still take a process-directed signal.
#   * A blocked signal mask survives fork() *and* execve(). A child spawned while we
#     watch SIGTERM starts with SIGTERM blocked and will ignore the SIGTERM meant to
#     stop it. Whoever spawns children (spawn.py) must give them an empty mask:
#     ``posix_spawn(..., setsigmask=())`` or a ``preexec_fn`` that calls
#     ``pthread_sigmask(SIG_SETMASK, ())``.
#
# When the last key of a signal goes, the signal is unblocked again, unless it was
# already blocked before we came along: the process mask ends exactly as it was. Just
# before unblocking, any instance of it that is still pending (arrived, never read) is
# discarded with sigtimedwait(timeout=0): unblocking would otherwise hand it to the old
# disposition, and for most signals that disposition is "terminate the process".
# SIGCHLD is held for processes while any is watched; with ``keep_sigchld`` from the
# first one until close(), so that an owner whose only child exits and is respawned
# does not give it back and take it again each time (five system calls).
#
# There is one signalfd for all signals; its mask is rewritten with each registration.
# Reading it inside select() means callers only ever see SIGNAL ready keys.
#
# Child exits: SIGCHLD says "some child changed state", never "this pid exited"
# -----------------------------------------------------------------------------
# Standard signals do not queue. If 50 children exit at once, 50 SIGCHLDs collapse into
# one pending SIGCHLD, and the signalfd hands us one record whose ssi_pid names one of
# the 50, if that. Matching ssi_pid against watched pids alone (the old Nim design)
# therefore loses exits. Asking every watched pid after each SIGCHLD does not, but it
# costs O(watched) per exit: 12.6 ms of loop time per exit with 8,000 children, and a
# shutdown of all of them O(n^2). So the selector finds exits in three steps, each
# with the same question, which only *looks*:
#
#     waitid(P_PID, pid, WEXITED | WNOHANG | WNOWAIT)      (or P_ALL, any child)
#
# 1. Hints. Each SIGCHLD record's ssi_pid, if watched, is asked about at once: the
#    common case, one exit per SIGCHLD, costs one waitid.
# 2. Peeks. After any SIGCHLD, a later select() begins with one P_ALL peek, which names
#    some zombie child, if any. The owner has reaped what the previous select() reported
#    by then, so a watched zombie the peek names is an exit the hints missed (a
#    collapsed SIGCHLD): it is reported, and the next select() peeks again; the first
#    peek that finds no zombie ends the search. One syscall, but the kernel walks every
#    child for a peek that finds nothing: 0.25 ms with 10,000 children in a tight loop,
#    1.8 ms in a busy daemon whose task structs are cold, which alone would be most of
#    an exit's loop time. So the first peek after a SIGCHLD waits PEEK_SPACING times
#    what the last empty peek cost, and every SIGCHLD in between shares it: peeks that
#    find nothing take at most 1/PEEK_SPACING of the loop's time however fast children
#    exit (one that finds an exit is paid for by it), and a hinted exit is reported at
#    once. The cost is the peek's CPU time (thread_time), not its wall time: a peek
#    descheduled for 20 ms on a busy machine would otherwise put the next one a second
#    off. Measured cold (caches flushed between peeks, as in a busy daemon): 1.75 ms
#    with 10,000 children, so about 90 ms between peeks, and 0.07 ms with 300, about 3.5
#    ms; warm (a tight loop) 0.23 and 0.004 ms, so 11 and 0.2 ms. The price is that an
#    exit whose SIGCHLD collapsed into another's is reported up to that long after it
#    happened, plus whatever the loop is busy with (callers that have their own reason
#    to think a child is gone, such as its pipes closing, can say so with hint_exit(),
#    which asks that pid at once). select() never sleeps past a peek that is due.
# 3. Sweep. A peek that names a zombie it cannot see past (an exit already reported
#    but not yet reaped, or a child nobody watches, like a subreaper's adopted orphan)
#    falls back to asking every watched pid once, as before: always correct, only
#    rarely paid.
#
# WEXITED without WSTOPPED: a stopped child has not exited. WNOHANG: never block the
# loop. WNOWAIT: only *look*. The child stays a zombie, so its exit status is still
# there for the owner to collect with waitpid(pid) once it has handled the PROCESS
# event, and, since a zombie still holds its pid, the kernel cannot give that pid to a
# new process in between: the owner reaps exactly the child it was told about.
#
# Each exit yields exactly one PROCESS|ONESHOT|FINISHED event. It goes through a queue
# of pending events, because one SIGCHLD can stand for more exits than the caller's
# buffer has slots: what does not fit is delivered by the next select() (which then
# does not sleep). Unregistering a process drops its queued event.
#
# register_process() also asks waitid about the new pid once, right away, *after*
# SIGCHLD has been blocked. A child can exit between fork and registration; its
# SIGCHLD may have gone to the old disposition (if SIGCHLD was not yet blocked) or may
# have been read and swept already by an earlier select() that did not know this pid.
# Either way no SIGCHLD will ever come for it again. Checking after blocking closes the
# gap: an exit before the check is seen by the check, an exit after it raises a SIGCHLD
# that lands in the signalfd. The same check rejects a pid that is not our child.
#
# SIGCHLD may also be registered as a signal, alongside process watching: then every
# SIGCHLD record read also gives that key a SIGNAL event (a subreaper uses it to reap
# adopted orphans, which no PROCESS key will ever name). Whoever does so must reap only
# pids that are not watched: anyone who reaps with waitpid(-1), or sets SIGCHLD to
# SIG_IGN (which makes the kernel auto-reap), steals exits from the sweep.
#
# Timers are timerfds with millisecond precision, oneshot timers stay until unregistered
# -----------------------------------------------------------------------------------
# Each timer is a CLOCK_MONOTONIC timerfd (wall-clock steps cannot stall it), armed
# with the full millisecond value for both the first expiry and the period. (The
# reference arms periodic timers with whole seconds, so a 500 ms period never fires.)
# select() reads the expiry count itself; a periodic timer that expired several times
# since the last select() gives one TIMER event.
#
# A oneshot timer fires once, and its key is then marked FINISHED but stays registered,
# with its data, until unregister(): the caller decides when it is done with it, and
# rearm_timer() can reuse the fd. unregister() closes the timerfd.
#
# Registered fds that get closed or reused: unregister first, then close
# --------------------------------------------------------------------
# epoll watches open file descriptions, not fd numbers. Closing a registered fd removes
# it from epoll only when no other fd (a dup, a forked child's copy) refers to the same
# description; otherwise epoll keeps reporting it under the old number. If the number is
# then reused, the selector cannot tell the ghost from the new file. So:
#
#   * always unregister() an fd before closing it;
#   * unregister() of an fd that was closed anyway still removes the key: the EBADF or
#     ENOENT that epoll_ctl(DEL) then reports is expected and ignored (as in CPython's
#     selectors);
#   * events for fd numbers with no key are dropped;
#   * a registration that finds the number of a fd it just created already in use by a
#     key (a registered fd was closed without unregister and the number was reused)
#     fails loudly instead of silently replacing that key.

from __future__ import annotations

import contextlib
import enum
import errno
import itertools
import os
import select
import signal
import time
from collections import deque
from collections.abc import Callable, Container
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Generic, NamedTuple, TypeVar

from . import linux

__all__ = [
    "AlreadyRegisteredError",
    "Event",
    "NotRegisteredError",
    "ReadyKey",
    "RegistrationError",
    "SelectEvent",
    "Selector",
    "SelectorError",
    "SelectorOSError",
    "SelectorStatistics",
]

T = TypeVar("T")


class Event(enum.Flag):
    """What a registration waits for, and what a ready key reports."""

    READ = enum.auto()
    WRITE = enum.auto()
    PRIORITY = enum.auto()  # EPOLLPRI: sysfs/cgroupfs files that changed (cgroup.events)
    TIMER = enum.auto()
    SIGNAL = enum.auto()
    PROCESS = enum.auto()
    USER = enum.auto()
    ERROR = enum.auto()
    ONESHOT = enum.auto()
    FINISHED = enum.auto()


class ReadyKey(NamedTuple, Generic[T]):
    """One event from ``select()``.

    ``fd`` is the identifier the registration returned (an fd, or a negative virtual
    id for signals and processes); ``data`` is the registration's data, for dispatch.
    ``error_code`` is an errno when ``events`` contains ERROR, else 0.
    """

    fd: int
    events: Event
    error_code: int
    data: T


# ------------------------------------------------------------------------------ errors


class SelectorError(Exception):
    """Base class of the selector's errors; each message names the fd, signal or pid."""


class NotRegisteredError(SelectorError, KeyError):
    """The fd or virtual id has no key in the selector."""

    def __str__(self) -> str:
        # KeyError would show the message quoted, as if it were the missing key.
        return str(self.args[0]) if self.args else ""


class RegistrationError(SelectorError, ValueError):
    """A registration that is invalid or conflicts with another one."""


class AlreadyRegisteredError(RegistrationError):
    """The fd, signal or pid is already registered."""


class SelectorOSError(SelectorError, OSError):
    """A system call failed; ``errno`` is the kernel's, the message says what for."""


def _os_error(exc: OSError, doing: str) -> SelectorOSError:
    code = exc.errno if exc.errno is not None else errno.EIO
    return SelectorOSError(code, f"{doing}: {exc.strerror or os.strerror(code)}")


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


# ------------------------------------------------------------------------ SelectEvent


class SelectEvent:
    """A wake-up for a selector: an eventfd that any thread may ``trigger()``.

    Register it with ``Selector.register_event``; the selector reads it when it fires,
    so several triggers before the next ``select()`` give one USER event. The event
    owns its fd: unregister it from every selector, then ``close()`` it.
    """

    __slots__ = ("_fd",)

    def __init__(self) -> None:
        self._fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("the SelectEvent is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def trigger(self) -> None:
        """Wake the selector; safe from any thread (one write(2) of 8 bytes)."""
        # BlockingIOError: the counter is at its maximum, as triggered as it gets.
        with contextlib.suppress(BlockingIOError):
            os.eventfd_write(self.fileno(), 1)

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> SelectEvent:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<SelectEvent fd={self._fd}>" if self._fd >= 0 else "<SelectEvent closed>"


# ------------------------------------------------------------------------- internals


class _Kind(enum.Enum):
    HANDLE = "handle"
    TIMER = "timer"
    SIGNAL = "signal"
    PROCESS = "process"
    USER = "user event"


# A peek that may find nothing waits this many times what the last such peek cost.
PEEK_SPACING: Final = 50

_HANDLE: Final = _Kind.HANDLE
_TIMER: Final = _Kind.TIMER


@dataclass(slots=True, eq=False)
class _Key(Generic[T]):
    ident: int  # the fd, or the virtual id of a signal or process
    kind: _Kind
    events: Event
    data: T
    param: int = 0  # the signal number or the pid of a virtual key
    # A handle's last ReadyKey and the epoll mask it was made for: a busy handle keeps
    # reporting the same mask, and select() then reuses it. -1 matches no mask.
    ready_mask: int = -1
    ready: ReadyKey[T] | None = None

    def cache_ready(self, fd: int, mask: int) -> ReadyKey[T]:
        events, error_code = _HANDLE_EVENTS.get(mask) or _translate_epoll_mask(mask)
        ready = ReadyKey(fd, events, error_code, self.data)
        self.ready, self.ready_mask = ready, mask
        return ready

    def set_data(self, data: T) -> None:
        self.data = data
        self.ready_mask = -1  # the cached ReadyKey holds the old data

    def describe(self) -> str:
        if self.kind is _Kind.SIGNAL:
            return f"{_signal_name(self.param)} (id {self.ident})"
        if self.kind is _Kind.PROCESS:
            return f"pid {self.param} (id {self.ident})"
        return f"{self.kind.value} fd {self.ident}"


@dataclass(frozen=True, slots=True)
class SelectorStatistics:
    """A snapshot of what a selector holds, for debugging and tests."""

    handles: int
    timers: int
    signals: int
    processes: int
    user_events: int
    pending_events: int
    signalfd: int  # -1 when no signal or process is watched (nor SIGCHLD kept)
    peeks: int = 0  # waitid(P_ALL) peeks for exits whose SIGCHLD collapsed, so far
    peek_seconds: float = 0.0  # and the time they took


_HANDLE_EVENTS_MASK: Final = Event.READ | Event.WRITE | Event.PRIORITY
_TIMER_PERIODIC: Final = Event.TIMER
_TIMER_ONESHOT: Final = Event.TIMER | Event.ONESHOT
_TIMER_FINISHED: Final = Event.TIMER | Event.ONESHOT | Event.FINISHED
_PROCESS_WATCHED: Final = Event.PROCESS | Event.ONESHOT
_PROCESS_FINISHED: Final = Event.PROCESS | Event.ONESHOT | Event.FINISHED

# WEXITED only: a stopped child has not exited. WNOWAIT: look, leave the zombie.
_WAITID_OPTIONS: Final = os.WEXITED | os.WNOHANG | os.WNOWAIT
_SIGNALFD_READ_SIZE: Final = linux.SIGNALFD_SIGINFO.size * 32
_NS_PER_MS: Final = 1_000_000
_UNCATCHABLE: Final = frozenset({signal.SIGKILL, signal.SIGSTOP})

# epoll reports no errno with EPOLLERR/EPOLLHUP/EPOLLRDHUP; a read or write on the fd
# gives the precise one. ECONNRESET says "the other end is gone", which is what these
# mean for the pipes and sockets supd watches.
_HANGUP_ERRNO: Final = errno.ECONNRESET
_EPOLL_BITS: Final = (
    (select.EPOLLIN, Event.READ),
    (select.EPOLLOUT, Event.WRITE),
    (select.EPOLLPRI, Event.PRIORITY),
    (select.EPOLLERR, Event.ERROR),
    (select.EPOLLHUP, Event.ERROR),
    (select.EPOLLRDHUP, Event.ERROR),
)


def _translate_epoll_mask(mask: int) -> tuple[Event, int]:
    events = Event(0)
    for bit, event in _EPOLL_BITS:
        if mask & bit:
            events |= event
    if mask & select.EPOLLPRI and not mask & (select.EPOLLHUP | select.EPOLLRDHUP):
        # sysfs and cgroupfs say "this file changed" with EPOLLPRI | EPOLLERR
        # (sysfs_notify, kernfs_fop_poll): that EPOLLERR is no error.
        events &= ~Event.ERROR
    return events, (_HANGUP_ERRNO if events & Event.ERROR else 0)


def _all_epoll_masks() -> dict[int, tuple[Event, int]]:
    """Every combination of the bits a handle can report, translated once at import:
    select() then turns a mask into events with a dict lookup instead of Flag algebra.
    """
    bits = [bit for bit, _ in _EPOLL_BITS]
    masks = {0}
    for bit in bits:
        masks |= {mask | bit for mask in masks}
    return {mask: _translate_epoll_mask(mask) for mask in masks}


_HANDLE_EVENTS: Final = _all_epoll_masks()


def _epoll_mask(events: Event) -> int:
    # EPOLLRDHUP always: a peer that shuts down its side shows up as ERROR at once.
    mask = select.EPOLLRDHUP
    if events & Event.READ:
        mask |= select.EPOLLIN
    if events & Event.WRITE:
        mask |= select.EPOLLOUT
    if events & Event.PRIORITY:
        mask |= select.EPOLLPRI
    return mask


def _timer_setting(timeout_ms: int, oneshot: bool) -> tuple[int, int]:
    """(initial, interval) in nanoseconds for a timer of ``timeout_ms``."""
    if timeout_ms < 0 or (timeout_ms == 0 and not oneshot):
        kind = "oneshot" if oneshot else "periodic"
        raise RegistrationError(f"a {kind} timer needs a positive timeout, not {timeout_ms} ms")
    ns = int(timeout_ms * _NS_PER_MS)
    if oneshot:
        # An initial value of 0 would disarm the timer; 1 ns means "as soon as possible".
        return max(ns, 1), 0
    return ns, ns


def _has_exited(pid: int) -> bool:
    """Whether child ``pid`` has exited, leaving it a zombie; ChildProcessError if the
    pid is not (or no longer) a child of ours."""
    return os.waitid(os.P_PID, pid, _WAITID_OPTIONS) is not None


class _SignalFd:
    """The one signalfd shared by all watched signals, and the blocks to undo.

    For each signal it remembers whether the signal was blocked before it came along,
    so that removing the signal leaves the process mask as it found it.
    """

    def __init__(self, epoll: select.epoll, taken: Container[int]) -> None:
        self._epoll = epoll
        self._taken = taken  # fd numbers that already have a key
        self._blocked_before: dict[int, bool] = {}
        self.fd = -1

    def add(self, signum: int) -> None:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signum})
        try:
            self._follow({*self._blocked_before, signum})
        except BaseException:
            if signum not in previous:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signum})
            raise
        self._blocked_before[signum] = signum in previous

    def remove(self, signum: int) -> None:
        blocked_before = self._blocked_before.pop(signum)
        try:
            self._follow(set(self._blocked_before))
        finally:
            if not blocked_before:
                self._unblock(signum)

    def remove_all(self) -> None:
        for signum in list(self._blocked_before):
            self.remove(signum)

    @staticmethod
    def _unblock(signum: int) -> None:
        # Discard what arrived while the signal was ours but was never read: unblocking
        # would deliver it to the old disposition, which for most signals is to die.
        while signal.sigtimedwait({signum}, 0) is not None:
            pass
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signum})

    def _follow(self, signals: set[int]) -> None:
        """Make the signalfd accept exactly ``signals``; close it when there are none."""
        if not signals:
            self._close()
        elif self.fd >= 0:
            linux.signalfd(self.fd, signals, 0)
        else:
            self._open(signals)

    def _open(self, signals: set[int]) -> None:
        fd = linux.signalfd(-1, signals, linux.SFD_CLOEXEC | linux.SFD_NONBLOCK)
        try:
            if fd in self._taken:
                raise SelectorError(
                    f"the new signalfd got fd {fd}, which is still registered: it was"
                    " closed without unregister()"
                )
            self._epoll.register(fd, select.EPOLLIN)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    def _close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            self._epoll.unregister(fd)
            os.close(fd)


# -------------------------------------------------------------------------- Selector


class Selector(Generic[T]):
    """One epoll instance waiting for fds, timers, signals, child exits and user events.

    Every registration returns an identifier (an fd, or a negative virtual id for
    signals and processes) and carries ``data`` of type ``T``, which comes back in each
    ``ReadyKey``. Not thread-safe, except for ``SelectEvent.trigger()``; use it from the
    thread that owns the signal mask (see the module notes).
    """

    def __init__(self, max_events: int = 256, *, keep_sigchld: bool = False) -> None:
        """``max_events`` caps the ready keys one ``select()`` returns.

        ``keep_sigchld``: once a process is watched, SIGCHLD stays blocked and in the
        signalfd until ``close()``, instead of being given back each time the last
        watched process goes. For an owner that spawns children all its life (a
        supervisor restarting its one program): giving SIGCHLD back and taking it
        again costs five system calls per respawn. The mask is restored by ``close()``.
        """
        if max_events < 1:
            raise ValueError(f"max_events must be at least 1, not {max_events}")
        self._max_events = max_events
        self._keep_sigchld = keep_sigchld
        self._sigchld_kept = False  # with keep_sigchld, SIGCHLD was taken for processes
        self._epoll = select.epoll(flags=select.EPOLL_CLOEXEC)
        self._keys: dict[int, _Key[T]] = {}
        self._signals: dict[int, _Key[T]] = {}  # signal number -> key
        self._processes: dict[int, _Key[T]] = {}  # pid -> key
        # Events already known but not yet returned: (ident, events, error_code).
        self._pending: deque[tuple[int, Event, int]] = deque()
        self._queued: dict[int, int] = {}  # ident -> its events in _pending (cheap unregister)
        self._signalfd = _SignalFd(self._epoll, self._keys)
        self._children_exited = False
        self._exit_hints: list[int] = []  # ssi_pid of each SIGCHLD record read
        # Look for exits the hints missed at this monotonic time (None: no need), and
        # what the last peek that found nothing cost, in CPU seconds (see the notes above).
        self._peek_due: float | None = None
        self._peek_cost = 0.0
        self.peeks = 0  # how many peeks so far, and the time they took (for metrics)
        self.peek_seconds = 0.0
        # Virtual ids are never reused, so a stale id can never name a newer key.
        self._virtual_ids = itertools.count(-1, -1)

    # ---------------------------------------------------------------- registration

    def register_handle(self, fd: int, events: Event, data: T) -> None:
        """Watch ``fd`` for READ, WRITE and/or PRIORITY; empty ``events`` registers it paused.

        PRIORITY is EPOLLPRI: out-of-band data, and the "changed" notification of sysfs
        and cgroupfs files such as cgroup.events (re-read the file to clear it).
        """
        self._check_handle_events(fd, events)
        if fd < 0:
            raise RegistrationError(f"fd {fd} is not a file descriptor")
        self._check_free(fd)
        if events:
            try:
                self._epoll.register(fd, _epoll_mask(events))
            except OSError as exc:
                raise _os_error(exc, f"cannot watch fd {fd} for {events.name}") from exc
        self._keys[fd] = _Key(fd, _Kind.HANDLE, events, data)

    def update_handle(self, fd: int, events: Event) -> None:
        """Change what a handle waits for; an empty ``events`` pauses it."""
        key = self._handle_key(fd)
        self._check_handle_events(fd, events)
        if events == key.events:
            return
        try:
            if not key.events:
                self._epoll.register(fd, _epoll_mask(events))
            elif not events:
                self._epoll.unregister(fd)
            else:
                self._epoll.modify(fd, _epoll_mask(events))
        except OSError as exc:
            raise _os_error(exc, f"cannot change fd {fd} to {events.name or 'paused'}") from exc
        key.events = events

    def register_timer(self, timeout_ms: int, oneshot: bool, data: T) -> int:
        """Start a timer that fires after ``timeout_ms`` (and every ``timeout_ms`` if not
        ``oneshot``); returns its timerfd. A oneshot timer is FINISHED after it fires.
        """
        initial, interval = _timer_setting(timeout_ms, oneshot)
        try:
            fd = linux.timerfd_create(
                linux.CLOCK_MONOTONIC, flags=linux.TFD_CLOEXEC | linux.TFD_NONBLOCK
            )
        except OSError as exc:
            raise _os_error(exc, f"cannot create a timer of {timeout_ms} ms") from exc
        try:
            self._check_fresh_fd(fd, "timerfd")
            linux.timerfd_settime_ns(fd, initial=initial, interval=interval)
            self._epoll.register(fd, select.EPOLLIN)
        except OSError as exc:
            os.close(fd)
            raise _os_error(exc, f"cannot start a timer of {timeout_ms} ms on fd {fd}") from exc
        except BaseException:
            os.close(fd)
            raise
        self._keys[fd] = _Key(fd, _Kind.TIMER, _TIMER_ONESHOT if oneshot else _TIMER_PERIODIC, data)
        return fd

    def disarm_timer(self, fd: int) -> None:
        """Stop timer ``fd`` without unregistering it (it reports nothing until rearmed);
        an expiry not yet reported is dropped. A disarmed timer is FINISHED."""
        key = self._key(fd)
        if key.kind is not _Kind.TIMER:
            raise RegistrationError(f"{key.describe()} is not a timer")
        try:
            linux.timerfd_settime_ns(fd, initial=0, interval=0)
        except OSError as exc:
            raise _os_error(exc, f"cannot disarm timer fd {fd}") from exc
        key.events = _TIMER_FINISHED

    def rearm_timer(self, fd: int, timeout_ms: int, oneshot: bool) -> None:
        """Restart timer ``fd`` with a new setting (also a FINISHED oneshot timer),
        keeping its fd and data. An expiry not yet reported is dropped."""
        key = self._key(fd)
        if key.kind is not _Kind.TIMER:
            raise RegistrationError(f"{key.describe()} is not a timer")
        initial, interval = _timer_setting(timeout_ms, oneshot)
        try:
            linux.timerfd_settime_ns(fd, initial=initial, interval=interval)
        except OSError as exc:
            raise _os_error(exc, f"cannot rearm timer fd {fd}") from exc
        key.events = _TIMER_ONESHOT if oneshot else _TIMER_PERIODIC

    def register_signal(self, signum: int, data: T) -> int:
        """Report ``signum`` as SIGNAL events instead of delivering it; returns a virtual id.

        The signal stays blocked in this thread's mask until its key is unregistered.
        """
        signum = int(signum)
        name = _signal_name(signum)
        if not 0 < signum < signal.NSIG or signum in _UNCATCHABLE:
            raise RegistrationError(f"{name} cannot be watched")
        if signum in self._signals:
            raise AlreadyRegisteredError(
                f"{name} is already registered as {self._signals[signum].describe()}"
            )
        shared = signum == signal.SIGCHLD and self._sigchld_for_processes()  # already in
        try:
            if not shared:
                self._signalfd.add(signum)
        except OSError as exc:
            raise _os_error(exc, f"cannot watch {name}") from exc
        key = _Key(next(self._virtual_ids), _Kind.SIGNAL, Event.SIGNAL, data, signum)
        self._keys[key.ident] = self._signals[signum] = key
        return key.ident

    def register_process(self, pid: int, data: T) -> int:
        """Report the exit of child ``pid`` as one PROCESS|ONESHOT|FINISHED event;
        returns a virtual id. The child is left a zombie: reap it with waitpid(pid).
        """
        if pid <= 0:
            raise RegistrationError(f"pid {pid} is not a process id")
        if pid in self._processes:
            raise AlreadyRegisteredError(
                f"pid {pid} is already watched as {self._processes[pid].describe()}"
            )
        first = not self._sigchld_for_processes() and signal.SIGCHLD not in self._signals
        if first:
            try:
                self._signalfd.add(signal.SIGCHLD)
            except OSError as exc:
                raise _os_error(exc, f"cannot watch SIGCHLD for pid {pid}") from exc
        try:
            # After SIGCHLD is blocked, so that no exit falls between the two (see the
            # module notes).
            exited = _has_exited(pid)
        except ChildProcessError as exc:
            if first:
                self._signalfd.remove(signal.SIGCHLD)
            raise SelectorOSError(
                errno.ECHILD, f"cannot watch pid {pid}: not a child of this process, or reaped"
            ) from exc
        key = _Key(next(self._virtual_ids), _Kind.PROCESS, _PROCESS_WATCHED, data, pid)
        self._keys[key.ident] = self._processes[pid] = key
        self._sigchld_kept = self._keep_sigchld
        if exited:
            self._finish_process(key, 0)
        return key.ident

    def register_event(self, event: SelectEvent, data: T) -> int:
        """Report ``event.trigger()`` as USER events; returns the event's fd."""
        fd = event.fileno()
        self._check_free(fd)
        try:
            self._epoll.register(fd, select.EPOLLIN)
        except OSError as exc:
            raise _os_error(exc, f"cannot watch user event fd {fd}") from exc
        self._keys[fd] = _Key(fd, _Kind.USER, Event.USER, data)
        return fd

    def unregister(self, target: int | SelectEvent) -> None:
        """Remove a key: an fd, a virtual id or a SelectEvent.

        Closes a timer's fd; unblocks a signal (unless it was blocked before it was
        registered); drops events of the key that are still queued.
        """
        ident = target.fileno() if isinstance(target, SelectEvent) else target
        key = self._keys.pop(ident, None)
        if key is None:
            raise NotRegisteredError(f"{self._describe_missing(ident)} is not registered")
        try:
            self._release(key)
        finally:
            # Only signals and processes queue events; handles and timers never do, and
            # unregistering those (thousands of pipes) must not scan the queue each time.
            if self._queued.pop(ident, 0):
                self._pending = deque(item for item in self._pending if item[0] != ident)

    def _release(self, key: _Key[T]) -> None:
        kind = key.kind
        if kind is _Kind.HANDLE:
            if key.events:
                self._forget_fd(key.ident)
        elif kind is _Kind.TIMER:
            self._forget_fd(key.ident)
            os.close(key.ident)
        elif kind is _Kind.USER:
            self._forget_fd(key.ident)
        elif kind is _Kind.SIGNAL:
            del self._signals[key.param]
            if not (key.param == signal.SIGCHLD and self._sigchld_for_processes()):
                self._signalfd.remove(key.param)
        else:
            del self._processes[key.param]
            if not self._sigchld_for_processes() and signal.SIGCHLD not in self._signals:
                self._signalfd.remove(signal.SIGCHLD)

    def _sigchld_for_processes(self) -> bool:
        """Whether process watching holds SIGCHLD in the signalfd: while any process is
        watched, and with keep_sigchld from the first one on."""
        return bool(self._processes) or self._sigchld_kept

    def _forget_fd(self, fd: int) -> None:
        try:
            self._epoll.unregister(fd)
        except OSError as exc:
            # EBADF: closed before unregister. ENOENT: closed, and the number reused.
            # Either way epoll has nothing (left) to remove under this number.
            if exc.errno not in (errno.EBADF, errno.ENOENT):
                raise _os_error(exc, f"cannot stop watching fd {fd}") from exc

    # ------------------------------------------------------------------- selecting

    def select(self, timeout_ms: int = -1, max_events: int = 0) -> list[ReadyKey[T]]:
        """Wait up to ``timeout_ms`` (-1: forever, 0: not at all) and return what is ready.

        Returns at most ``max_events`` keys (default: the selector's ``max_events``);
        the rest come with the next call. A signal handled by a Python handler while
        waiting does not end the wait (PEP 475); one whose handler raises
        InterruptedError gives an empty result.
        """
        # The daemon's hot path: per ready handle, one dict lookup and, when the handle
        # reports the same epoll mask as last time, its cached ReadyKey.
        capacity = max_events or self._max_events
        result: list[ReadyKey[T]] = []
        if self._peek_due is not None and self._peek_due <= time.monotonic():
            self._peek_for_exits()
        if self._pending:
            self._deliver_pending(result, capacity)
            if len(result) >= capacity:
                return result
            timeout_ms = 0  # never sleep on events we already have
        try:
            ready = self._poll(timeout_ms, capacity - len(result))
        except InterruptedError:
            return result
        if not ready and self._pending:  # a peek that came due while waiting found exits
            self._deliver_pending(result, capacity)
            return result
        keys = self._keys
        append = result.append
        for fd, mask in ready:
            try:
                key = keys[fd]
            except KeyError:
                self._read_unkeyed(fd)
                continue
            if key.ready_mask == mask:
                append(key.ready)  # type: ignore[arg-type]  # set with ready_mask
            elif key.kind is _HANDLE:
                append(key.cache_ready(fd, mask))
            elif key.kind is _TIMER:
                self._read_timer(key, result)
            else:
                self._read_user_event(key, result)
        if self._children_exited:
            self._check_hints()
        if self._pending:
            self._deliver_pending(result, capacity)
        return result

    def _poll(self, timeout_ms: int, max_events: int) -> list[tuple[int, int]]:
        """epoll_wait for up to `timeout_ms`, but peek when a peek comes due meanwhile;
        returns at once what epoll has, or after a peek that queued exits."""
        poll = self._epoll.poll
        if self._peek_due is None or timeout_ms == 0:
            return poll(None if timeout_ms < 0 else timeout_ms / 1000, max_events)
        deadline = None if timeout_ms < 0 else time.monotonic() + timeout_ms / 1000
        while True:
            now = time.monotonic()
            due = self._peek_due
            wait = None if deadline is None else max(0.0, deadline - now)
            if due is not None and (wait is None or due - now < wait):
                wait = max(0.0, due - now)
                ready = poll(wait, max_events)
                if ready:
                    return ready
                if self._peek_due is not None and self._peek_due <= time.monotonic():
                    self._peek_for_exits()  # nothing was reported since the last select()
                if self._pending or (deadline is not None and time.monotonic() >= deadline):
                    return []
                continue
            return poll(wait, max_events)

    def select_into(self, timeout_ms: int, buffer: list[ReadyKey[T] | None]) -> int:
        """Like ``select()``, but fill ``buffer`` from the start and return the count.

        Never returns more keys than ``buffer`` has slots: the rest wait for the next
        call. Slots after the count are left as they were.
        """
        if not buffer:
            raise ValueError("select_into needs a buffer with at least one slot")
        ready = self.select(timeout_ms, len(buffer))
        count = len(ready)
        buffer[:count] = ready
        return count

    def _read_unkeyed(self, fd: int) -> None:
        if fd == self._signalfd.fd:
            self._read_signalfd()
        # Otherwise a ghost of a closed fd (see the module notes): nothing to report.

    def _deliver_pending(self, result: list[ReadyKey[T]], capacity: int) -> None:
        pending = self._pending
        queued = self._queued
        keys = self._keys
        while pending and len(result) < capacity:
            ident, events, error_code = pending.popleft()
            if queued[ident] == 1:
                del queued[ident]
            else:
                queued[ident] -= 1
            # The data is looked up now, so set_data() after queueing still counts.
            result.append(ReadyKey(ident, events, error_code, keys[ident].data))

    def _read_timer(self, key: _Key[T], result: list[ReadyKey[T]]) -> None:
        try:
            os.read(key.ident, 8)  # the expiry count; we report one event regardless
        except BlockingIOError:
            return  # rearmed since epoll saw it expire: nothing to report
        except OSError as exc:
            result.append(ReadyKey(key.ident, key.events | Event.ERROR, exc.errno or 0, key.data))
            return
        if key.events == _TIMER_ONESHOT:
            key.events = _TIMER_FINISHED
        result.append(ReadyKey(key.ident, key.events, 0, key.data))

    def _read_user_event(self, key: _Key[T], result: list[ReadyKey[T]]) -> None:
        try:
            os.eventfd_read(key.ident)  # resets the counter: many triggers, one event
        except BlockingIOError:
            return  # already drained (e.g. by another selector watching the same event)
        except OSError as exc:
            result.append(ReadyKey(key.ident, Event.USER | Event.ERROR, exc.errno or 0, key.data))
            return
        result.append(ReadyKey(key.ident, Event.USER, 0, key.data))

    def _read_signalfd(self) -> None:
        try:
            records = os.read(self._signalfd.fd, _SIGNALFD_READ_SIZE)
        except BlockingIOError:
            return
        # More records than fit stay readable, so the next select() gets them.
        for info in linux.iter_siginfo(records):
            if info.signo == signal.SIGCHLD and self._processes:
                self._children_exited = True  # which child(ren): hints, then peeks
                self._exit_hints.append(info.pid)
            key = self._signals.get(info.signo)
            if key is not None and not (info.signo == signal.SIGCHLD and key.ident in self._queued):
                self._queue(key.ident, Event.SIGNAL, 0)  # (SIGCHLD: one pending is enough)

    def _check_hints(self) -> None:
        self._children_exited = False
        hints, self._exit_hints = self._exit_hints, []
        for pid in hints:
            key = self._processes.get(pid)
            if key is not None and key.events == _PROCESS_WATCHED:
                self._check_process(pid, key)
        if self._peek_due is None:  # one peek for every SIGCHLD until then
            self._peek_due = time.monotonic() + PEEK_SPACING * self._peek_cost

    def hint_exit(self, pid: int) -> None:
        """The caller has reason to think watched child `pid` is gone (its output pipes
        closed): ask about it now, O(1), rather than wait for the next peek. An exit
        found is reported by the next select(); any other pid is ignored."""
        key = self._processes.get(pid)
        if key is not None and key.events == _PROCESS_WATCHED:
            self._check_process(pid, key)

    def _peek_for_exits(self) -> None:
        started, cpu_started = time.monotonic(), time.thread_time()
        no_child = False
        try:
            info = os.waitid(os.P_ALL, 0, _WAITID_OPTIONS)
        except ChildProcessError:
            info, no_child = None, True
        # The kernel's walk costs CPU time; wall time would also count whatever ran
        # while we were descheduled, and the next peek would wait 50 times that too.
        cost = time.thread_time() - cpu_started
        self.peeks += 1
        self.peek_seconds += time.monotonic() - started
        if no_child and any(key.events == _PROCESS_WATCHED for key in self._processes.values()):
            self._sweep_processes()  # no child at all: watched pids were reaped behind our back
        if info is None:
            self._peek_due = None
            self._peek_cost = cost
            return
        key = self._processes.get(info.si_pid)
        if key is not None and key.events == _PROCESS_WATCHED:
            self._finish_process(key, 0)  # more may hide behind it: peek again next time
            self._peek_due = started
            return
        self._peek_due = None
        self._sweep_processes()

    def _sweep_processes(self) -> None:
        for pid, key in self._processes.items():
            if key.events == _PROCESS_WATCHED:
                self._check_process(pid, key)

    def _check_process(self, pid: int, key: _Key[T]) -> None:
        try:
            exited = _has_exited(pid)
        except ChildProcessError:
            # Reaped behind our back (by a waitpid that did not wait for the event):
            # the process is gone all the same, so report it, flagged.
            self._finish_process(key, errno.ECHILD)
            return
        if exited:
            self._finish_process(key, 0)

    def _finish_process(self, key: _Key[T], error_code: int) -> None:
        key.events = _PROCESS_FINISHED
        events = _PROCESS_FINISHED | Event.ERROR if error_code else _PROCESS_FINISHED
        self._queue(key.ident, events, error_code)

    def _queue(self, ident: int, events: Event, error_code: int) -> None:
        self._pending.append((ident, events, error_code))
        self._queued[ident] = self._queued.get(ident, 0) + 1

    # ----------------------------------------------------------------- data access

    def get_data(self, ident: int) -> T:
        """The data of a key; NotRegisteredError if there is none."""
        return self._key(ident).data

    def set_data(self, ident: int, data: T) -> bool:
        """Replace the data of a key; returns whether the key existed."""
        key = self._keys.get(ident)
        if key is None:
            return False
        key.set_data(data)
        return True

    def with_data(self, ident: int, action: Callable[[T], object]) -> bool:
        """Run ``action(data)`` only if the key exists; returns whether it ran."""
        key = self._keys.get(ident)
        if key is None:
            return False
        action(key.data)
        return True

    def get_events(self, ident: int) -> Event:
        """What a key was registered for, plus FINISHED once a oneshot key has fired."""
        return self._key(ident).events

    def __contains__(self, ident: object) -> bool:
        return ident in self._keys

    def watches_pid(self, pid: int) -> bool:
        """Whether `pid` is registered with register_process (its exit is, or will be,
        reported here): a subreaper must leave such a zombie to its owner."""
        return pid in self._processes

    @property
    def is_empty(self) -> bool:
        return not self._keys

    @property
    def count(self) -> int:
        """The number of registrations."""
        return len(self._keys)

    def fileno(self) -> int:
        """The epoll fd (to nest this selector in another event loop)."""
        return self._epoll.fileno()

    @property
    def closed(self) -> bool:
        return self._epoll.closed

    def statistics(self) -> SelectorStatistics:
        kinds = [key.kind for key in self._keys.values()]
        return SelectorStatistics(
            handles=kinds.count(_Kind.HANDLE),
            timers=kinds.count(_Kind.TIMER),
            signals=kinds.count(_Kind.SIGNAL),
            processes=kinds.count(_Kind.PROCESS),
            user_events=kinds.count(_Kind.USER),
            pending_events=len(self._pending),
            signalfd=self._signalfd.fd,
            peeks=self.peeks,
            peek_seconds=self.peek_seconds,
        )

    # ------------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Unregister everything, close every fd the selector created and restore the
        signal mask. SelectEvents stay open: they belong to the caller. Idempotent."""
        if self._epoll.closed:
            return
        failures: list[Exception] = []
        for ident in list(self._keys):
            try:
                self.unregister(ident)
            except Exception as exc:  # keep releasing the rest; report the first
                failures.append(exc)
        try:
            self._sigchld_kept = False
            self._signalfd.remove_all()
        finally:
            self._pending.clear()
            self._queued.clear()
            self._epoll.close()
        if failures:
            raise failures[0]

    def __enter__(self) -> Selector[T]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"epoll fd {self.fileno()}, {self.count} keys"
        return f"<Selector {state}>"

    # --------------------------------------------------------------------- helpers

    def _key(self, ident: int) -> _Key[T]:
        key = self._keys.get(ident)
        if key is None:
            raise NotRegisteredError(f"{self._describe_missing(ident)} is not registered")
        return key

    def _handle_key(self, fd: int) -> _Key[T]:
        key = self._key(fd)
        if key.kind is not _Kind.HANDLE:
            raise RegistrationError(
                f"{key.describe()} is not a handle; only handles can be updated"
            )
        return key

    @staticmethod
    def _check_handle_events(fd: int, events: Event) -> None:
        extra = events & ~_HANDLE_EVENTS_MASK
        if extra:
            raise RegistrationError(
                f"fd {fd}: a handle waits for READ, WRITE and PRIORITY only, not {extra.name}"
            )

    def _check_free(self, fd: int) -> None:
        key = self._keys.get(fd)
        if key is not None:
            raise AlreadyRegisteredError(f"fd {fd} is already registered (as {key.describe()})")
        if fd == self._signalfd.fd:
            raise AlreadyRegisteredError(f"fd {fd} is the selector's own signalfd")

    def _check_fresh_fd(self, fd: int, what: str) -> None:
        key = self._keys.get(fd)
        if key is not None:
            raise SelectorError(
                f"the new {what} got fd {fd}, still registered as {key.describe()}:"
                " it was closed without unregister()"
            )

    @staticmethod
    def _describe_missing(ident: int) -> str:
        return f"fd {ident}" if ident >= 0 else f"virtual id {ident}"
