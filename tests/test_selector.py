"""Contract tests for supervisor.selector, against the real kernel.

Real fds, real signals, real children. Every test leaves the pytest process as it
found it: the signal mask is checked after each test, every fd is closed and every
child is reaped by a fixture finalizer.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import resource
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from supd import linux
from supd.selector import (
    AlreadyRegisteredError,
    Event,
    NotRegisteredError,
    ReadyKey,
    RegistrationError,
    SelectEvent,
    Selector,
    SelectorError,
    SelectorOSError,
)
from tests.helpers import wait_until

PROCESS_EXITED = Event.PROCESS | Event.ONESHOT | Event.FINISHED
SH = "/bin/sh"


# --------------------------------------------------------------------------- helpers


def blocked_signals() -> set[int]:
    return set(signal.pthread_sigmask(signal.SIG_BLOCK, []))


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def process_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()[0]


def lowest_free_fd() -> int:
    fd = os.dup(0)
    os.close(fd)
    return fd


def select_until(
    selector: Selector[Any],
    done: Callable[[list[ReadyKey[Any]]], bool],
    timeout: float = 5.0,
) -> list[ReadyKey[Any]]:
    """Collect ready keys until ``done(collected)``; fail with what was collected."""
    deadline = time.monotonic() + timeout
    collected: list[ReadyKey[Any]] = []
    while not done(collected):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            pytest.fail(f"timed out after {timeout}s; collected {collected}")
        collected += selector.select(math.ceil(remaining * 1000))
    return collected


def collect_for(selector: Selector[Any], seconds: float) -> list[ReadyKey[Any]]:
    """Everything the selector reports during ``seconds``."""
    deadline = time.monotonic() + seconds
    collected: list[ReadyKey[Any]] = []
    while (remaining := deadline - time.monotonic()) > 0:
        collected += selector.select(math.ceil(remaining * 1000))
    return collected


# Syscall numbers of epoll_wait/epoll_pwait/epoll_pwait2, for when wchan is hidden.
_EPOLL_WAIT_SYSCALLS = {"x86_64": {"232", "281", "441"}, "aarch64": {"22", "441"}}


def blocked_in_epoll_wait(native_thread_id: int) -> bool:
    task = f"/proc/self/task/{native_thread_id}"
    with open(f"{task}/wchan") as f:
        if "epoll" in f.read():
            return True
    with open(f"{task}/syscall") as f:
        number = f.read().split()[0]
    return number in _EPOLL_WAIT_SYSCALLS.get(os.uname().machine, set())


@contextlib.contextmanager
def once_main_thread_blocks(action: Callable[[], object]) -> Iterator[None]:
    """Run ``action`` in another thread as soon as this thread sleeps in epoll_wait."""
    main = threading.get_native_id()
    failures: list[BaseException] = []

    def run() -> None:
        try:
            wait_until(lambda: blocked_in_epoll_wait(main), timeout=10, describe="epoll_wait")
            action()
        except BaseException as exc:  # reported in the main thread below
            failures.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        yield
    finally:
        thread.join(timeout=15)
    if failures:
        raise failures[0]


class Children:
    """Children spawned with an empty signal mask; all killed and reaped at teardown."""

    def __init__(self) -> None:
        self.pids: set[int] = set()

    def spawn(self, argv: list[str], stdin: int | None = None) -> int:
        actions = [] if stdin is None else [(os.POSIX_SPAWN_DUP2, stdin, 0)]
        pid = os.posix_spawn(argv[0], argv, os.environ, file_actions=actions, setsigmask=())
        self.pids.add(pid)
        return pid

    def waiting_on(self, stdin: int, exit_code: int = 0) -> int:
        """A child that exits with ``exit_code`` when ``stdin`` reaches EOF."""
        script = 'read -r line; exit "$1"'
        return self.spawn([SH, "-c", script, "sh", str(exit_code)], stdin=stdin)

    def exited(self, exit_code: int = 0) -> int:
        """A child that has already exited (a zombie) by the time this returns."""
        pid = self.spawn([SH, "-c", f"exit {exit_code}"])
        wait_until(lambda: process_state(pid) == "Z", describe=f"pid {pid} to exit")
        return pid

    def reap(self, pid: int) -> int:
        _, status = os.waitpid(pid, 0)
        self.pids.discard(pid)
        return os.waitstatus_to_exitcode(status)

    def cleanup(self) -> None:
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


# -------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def signal_mask_unchanged() -> Iterator[None]:
    """Fail a test that leaves the pytest process with a different signal mask."""
    before = blocked_signals()
    yield
    after = blocked_signals()
    if after != before:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
        pytest.fail(f"signal mask changed: {before} -> {after}")


@pytest.fixture
def selector() -> Iterator[Selector[Any]]:
    with Selector[Any]() as sel:
        yield sel


@pytest.fixture
def fds() -> Iterator[list[int]]:
    """Append fds to this list to have them closed at teardown."""
    owned: list[int] = []
    yield owned
    for fd in owned:
        with contextlib.suppress(OSError):
            os.close(fd)


@pytest.fixture
def make_pipe(fds: list[int]) -> Callable[[], tuple[int, int]]:
    def make() -> tuple[int, int]:
        r, w = os.pipe()
        fds.extend((r, w))
        return r, w

    return make


@pytest.fixture
def children() -> Iterator[Children]:
    kids = Children()
    yield kids
    kids.cleanup()


@pytest.fixture
def select_event() -> Iterator[SelectEvent]:
    with SelectEvent() as event:
        yield event


@contextlib.contextmanager
def fd_table_full() -> Iterator[None]:
    """Make every fd allocation inside the block fail with EMFILE."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free_fd(), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# --------------------------------------------------------------------------- handles


def test_readable_pipe_reports_read_with_its_data(selector, make_pipe):
    r, w = make_pipe()
    selector.register_handle(r, Event.READ, "stdout of web")
    assert selector.select(0) == []
    os.write(w, b"x")
    assert selector.select(1000) == [ReadyKey(r, Event.READ, 0, "stdout of web")]


def test_writable_pipe_reports_write(selector, make_pipe):
    _, w = make_pipe()
    selector.register_handle(w, Event.WRITE, "w")
    assert selector.select(0) == [ReadyKey(w, Event.WRITE, 0, "w")]


def test_update_handle_moves_between_read_write_and_paused(selector):
    a, b = socket.socketpair()
    with a, b:
        fd = a.fileno()
        selector.register_handle(fd, Event.READ, "conn")
        assert selector.select(0) == []

        selector.update_handle(fd, Event.READ | Event.WRITE)
        assert [k.events for k in selector.select(0)] == [Event.WRITE]
        b.send(b"ping")
        assert [k.events for k in selector.select(0)] == [Event.READ | Event.WRITE]

        selector.update_handle(fd, Event(0))  # paused: still registered, never reported
        assert fd in selector
        assert selector.select(0) == []
        assert selector.get_events(fd) == Event(0)

        selector.update_handle(fd, Event.READ)  # resumed
        assert selector.select(0) == [ReadyKey(fd, Event.READ, 0, "conn")]


def test_handle_registered_paused_reports_nothing_until_updated(selector, make_pipe):
    r, w = make_pipe()
    os.write(w, b"x")
    selector.register_handle(r, Event(0), "paused")
    assert r in selector
    assert selector.select(0) == []
    selector.update_handle(r, Event.READ)
    assert selector.select(0) == [ReadyKey(r, Event.READ, 0, "paused")]


def test_pipe_hangup_is_reported_as_error_with_errno(selector, make_pipe):
    r, w = make_pipe()
    selector.register_handle(r, Event.READ, "r")
    os.close(w)
    [key] = selector.select(1000)
    assert key.fd == r
    assert Event.ERROR in key.events
    assert key.error_code == errno.ECONNRESET


def test_socket_peer_shutdown_is_reported_as_error_via_rdhup(selector):
    a, b = socket.socketpair()
    with a, b:
        selector.register_handle(a.fileno(), Event.READ, "a")
        b.shutdown(socket.SHUT_WR)
        [key] = selector.select(1000)
        assert key.events == Event.READ | Event.ERROR  # readable (EOF) and RDHUP
        assert key.error_code == errno.ECONNRESET


def test_registering_an_fd_twice_names_the_fd(selector, make_pipe):
    r, _ = make_pipe()
    selector.register_handle(r, Event.READ, "first")
    with pytest.raises(AlreadyRegisteredError, match=rf"fd {r} is already registered"):
        selector.register_handle(r, Event.WRITE, "second")
    assert selector.get_data(r) == "first"


def test_registering_a_closed_fd_fails_and_leaves_nothing(selector, make_pipe):
    r, _ = make_pipe()
    os.close(r)
    with pytest.raises(SelectorOSError, match=rf"fd {r}") as info:
        selector.register_handle(r, Event.READ, "gone")
    assert info.value.errno == errno.EBADF
    assert r not in selector
    assert selector.is_empty


def test_registering_a_regular_file_fails_and_leaves_nothing(selector, tmp_path: Path, fds):
    fd = os.open(tmp_path / "plain", os.O_CREAT | os.O_RDONLY)
    fds.append(fd)
    with pytest.raises(SelectorOSError, match=rf"fd {fd}") as info:
        selector.register_handle(fd, Event.READ, "file")
    assert info.value.errno == errno.EPERM
    assert fd not in selector


def test_handles_wait_for_read_and_write_only(selector, make_pipe):
    r, _ = make_pipe()
    with pytest.raises(RegistrationError, match=rf"fd {r}.*TIMER"):
        selector.register_handle(r, Event.READ | Event.TIMER, "bad")
    assert r not in selector
    with pytest.raises(RegistrationError, match="fd -1"):
        selector.register_handle(-1, Event.READ, "bad")


def test_update_handle_of_a_timer_is_refused(selector):
    fd = selector.register_timer(1000, True, "t")
    with pytest.raises(RegistrationError, match=rf"timer fd {fd} is not a handle"):
        selector.update_handle(fd, Event.READ)


def test_unregister_of_unknown_keys_names_them(selector):
    with pytest.raises(NotRegisteredError, match="fd 12345 is not registered"):
        selector.unregister(12345)
    with pytest.raises(NotRegisteredError, match="virtual id -7 is not registered"):
        selector.unregister(-7)
    with pytest.raises(KeyError):  # NotRegisteredError is a KeyError too
        selector.get_data(12345)
    with pytest.raises(NotRegisteredError, match="fd 3"):
        selector.update_handle(3, Event.READ)


def test_unregister_after_close_still_removes_the_key(selector):
    r, w = os.pipe()
    selector.register_handle(r, Event.READ, "r")
    os.close(r)
    os.close(w)
    selector.unregister(r)  # EBADF from epoll is expected and ignored
    assert r not in selector


def test_unregister_after_fd_close_and_reuse(selector, make_pipe):
    """The CPython selectors case: the numbers are reused by a new pipe before
    unregister; unregister must not fail, and the new pipe can then be registered."""
    r, w = os.pipe()
    selector.register_handle(r, Event.READ, "old")
    selector.register_handle(w, Event.WRITE, "old")
    os.close(r)
    os.close(w)
    r2, w2 = make_pipe()
    os.dup2(r2, r)
    os.dup2(w2, w)
    try:
        selector.unregister(r)
        selector.unregister(w)
        selector.register_handle(r, Event.READ, "new")
        assert selector.select(0) == []
        os.write(w, b"x")
        assert selector.select(1000) == [ReadyKey(r, Event.READ, 0, "new")]
    finally:
        selector.unregister(r)
        os.close(r)
        os.close(w)


def test_fd_closed_without_unregister_and_reused_is_detected(selector, make_pipe):
    fd, _ = make_pipe()  # fd was the lowest free number, so it is the next one reused
    selector.register_handle(fd, Event.READ, "stale")
    os.close(fd)  # the bug: closed while registered
    before = open_fds()
    with pytest.raises(SelectorError, match=rf"fd {fd}.*closed without unregister"):
        selector.register_timer(100, True, "timer")
    assert selector.get_data(fd) == "stale"  # the old key was not silently replaced
    assert open_fds() == before  # and the new timerfd was closed again
    selector.unregister(fd)


def test_ten_ready_handles_with_a_four_slot_buffer_all_come_round(selector, make_pipe):
    readers = []
    for _ in range(10):
        r, w = make_pipe()
        os.write(w, b"x")
        selector.register_handle(r, Event.READ, r)
        readers.append(r)
    buffer: list[ReadyKey[Any] | None] = [None] * 4
    seen: list[int] = []
    for expected in (4, 4, 4):
        count = selector.select_into(0, buffer)
        assert count == expected
        seen += [key.fd for key in buffer[:count] if key is not None]
    # Level-triggered epoll rotates its ready list, so three calls cover all ten.
    assert set(seen) == set(readers)


# ---------------------------------------------------------------------------- timers


def test_oneshot_timer_fires_once_then_is_finished(selector):
    fd = selector.register_timer(50, True, "startsecs")
    assert selector.get_events(fd) == Event.TIMER | Event.ONESHOT
    started = time.monotonic()
    [key] = select_until(selector, lambda keys: bool(keys))
    assert time.monotonic() - started >= 0.045
    assert key == ReadyKey(fd, Event.TIMER | Event.ONESHOT | Event.FINISHED, 0, "startsecs")
    assert collect_for(selector, 0.2) == []
    # Still registered, with its data, until unregistered.
    assert fd in selector
    assert selector.get_events(fd) == Event.TIMER | Event.ONESHOT | Event.FINISHED
    assert selector.get_data(fd) == "startsecs"


def test_periodic_200ms_timer_fires_5_times_a_second(selector):
    fd = selector.register_timer(200, False, "tick")
    fired = [k for k in collect_for(selector, 1.0) if k.fd == fd]
    assert 4 <= len(fired) <= 6, fired
    assert all(k.events == Event.TIMER for k in fired)
    assert fd in selector


def test_periodic_150ms_timer_keeps_sub_second_precision(selector):
    """The reference arms periodic timers with whole seconds; 150 ms must stay 150 ms."""
    fd = selector.register_timer(150, False, "tick")
    assert linux.timerfd_gettime_ns(fd)[1] == 150_000_000
    fired = [k for k in collect_for(selector, 1.0) if k.fd == fd]
    assert 5 <= len(fired) <= 7, fired


def test_oneshot_timer_of_zero_fires_at_once(selector):
    fd = selector.register_timer(0, True, "now")
    assert select_until(selector, bool, timeout=1)[0].fd == fd


def test_timers_refuse_timeouts_that_never_fire(selector):
    before = open_fds()
    with pytest.raises(RegistrationError, match="-5 ms"):
        selector.register_timer(-5, True, "t")
    with pytest.raises(RegistrationError, match=r"periodic timer.* 0 ms"):
        selector.register_timer(0, False, "t")
    assert open_fds() == before
    assert selector.is_empty


def test_rearm_timer_restarts_a_finished_oneshot_on_the_same_fd(selector):
    fd = selector.register_timer(10, True, "backoff")
    select_until(selector, bool)
    assert Event.FINISHED in selector.get_events(fd)
    selector.rearm_timer(fd, 30, oneshot=True)
    assert selector.get_events(fd) == Event.TIMER | Event.ONESHOT
    [key] = select_until(selector, bool)
    assert key == ReadyKey(fd, Event.TIMER | Event.ONESHOT | Event.FINISHED, 0, "backoff")


def test_disarm_timer_silences_it_until_rearmed(selector):
    fd = selector.register_timer(30, False, "tick")
    selector.disarm_timer(fd)
    assert selector.select(120) == []  # four periods: nothing
    assert fd in selector
    selector.rearm_timer(fd, 10, True)
    [key] = selector.select(1000)
    assert (key.fd, key.data) == (fd, "tick")


def test_rearm_timer_can_make_it_periodic(selector):
    fd = selector.register_timer(10_000, True, "t")
    selector.rearm_timer(fd, 20, oneshot=False)
    keys = select_until(selector, lambda keys: len(keys) >= 3)
    assert {k.events for k in keys} == {Event.TIMER}


def test_rearm_timer_drops_an_expiry_not_yet_reported(selector):
    fd = selector.register_timer(1, True, "t")
    wait_until(lambda: linux.timerfd_gettime_ns(fd) == (0, 0), describe="timer to expire")
    selector.rearm_timer(fd, 10_000, oneshot=True)
    assert selector.select(50) == []


def test_rearm_timer_of_a_handle_is_refused(selector, make_pipe):
    r, _ = make_pipe()
    selector.register_handle(r, Event.READ, "r")
    with pytest.raises(RegistrationError, match=rf"handle fd {r} is not a timer"):
        selector.rearm_timer(r, 10, oneshot=True)


def test_unregister_closes_the_timerfd(selector):
    before = open_fds()
    fd = selector.register_timer(10, False, "t")
    assert str(fd) in open_fds()
    selector.unregister(fd)
    assert open_fds() == before
    assert fd not in selector


def test_failed_timer_registration_leaves_no_fd(selector):
    before = open_fds()
    with fd_table_full(), pytest.raises(SelectorOSError, match="timer of 50 ms") as info:
        selector.register_timer(50, True, "t")
    assert info.value.errno == errno.EMFILE
    assert selector.is_empty
    assert open_fds() == before


# --------------------------------------------------------------------------- signals


def test_signal_sent_to_the_process_arrives_as_a_signal_event(selector):
    ident = selector.register_signal(signal.SIGUSR1, "usr1")
    assert ident < 0
    assert signal.SIGUSR1 in blocked_signals()
    os.kill(os.getpid(), signal.SIGUSR1)
    assert selector.select(1000) == [ReadyKey(ident, Event.SIGNAL, 0, "usr1")]
    assert selector.select(0) == []


def test_unregister_signal_restores_the_previous_mask(selector):
    before = blocked_signals()
    ident = selector.register_signal(signal.SIGUSR1, "usr1")
    assert blocked_signals() == before | {signal.SIGUSR1}
    selector.unregister(ident)
    assert blocked_signals() == before
    assert selector.statistics().signalfd == -1


def test_signal_blocked_before_registration_stays_blocked(selector):
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
    try:
        ident = selector.register_signal(signal.SIGUSR2, "usr2")
        selector.unregister(ident)
        assert signal.SIGUSR2 in blocked_signals()
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR2})


def test_unregister_discards_a_signal_that_arrived_but_was_not_read(selector):
    caught: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: caught.append(signum))
    try:
        ident = selector.register_signal(signal.SIGUSR1, "usr1")
        os.kill(os.getpid(), signal.SIGUSR1)
        selector.unregister(ident)
        # Unblocking must not hand the pending signal to the old disposition (which,
        # without the handler installed here, would kill the process).
        assert caught == []
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_signals_share_one_signalfd_and_each_keeps_its_data(selector):
    usr1 = selector.register_signal(signal.SIGUSR1, "usr1")
    first_fd = selector.statistics().signalfd
    usr2 = selector.register_signal(signal.SIGUSR2, "usr2")
    assert selector.statistics().signalfd == first_fd
    os.kill(os.getpid(), signal.SIGUSR1)
    os.kill(os.getpid(), signal.SIGUSR2)
    keys = select_until(selector, lambda keys: len(keys) >= 2)
    assert sorted(keys) == sorted(
        [ReadyKey(usr1, Event.SIGNAL, 0, "usr1"), ReadyKey(usr2, Event.SIGNAL, 0, "usr2")]
    )
    selector.unregister(usr1)
    os.kill(os.getpid(), signal.SIGUSR2)
    assert selector.select(1000) == [ReadyKey(usr2, Event.SIGNAL, 0, "usr2")]


def test_registering_a_signal_twice_names_the_signal(selector):
    selector.register_signal(signal.SIGUSR1, "first")
    with pytest.raises(AlreadyRegisteredError, match="SIGUSR1 is already registered"):
        selector.register_signal(signal.SIGUSR1, "second")
    assert selector.count == 1


@pytest.mark.parametrize("signum", [0, signal.SIGKILL, signal.SIGSTOP, signal.NSIG])
def test_signals_that_cannot_be_caught_are_refused(selector, signum):
    before = blocked_signals()
    with pytest.raises(RegistrationError, match="cannot be watched"):
        selector.register_signal(signum, "x")
    assert blocked_signals() == before
    assert selector.is_empty


def test_failed_signal_registration_restores_the_mask(selector):
    before = (blocked_signals(), open_fds())
    with fd_table_full(), pytest.raises(SelectorOSError, match="cannot watch SIGUSR1") as info:
        selector.register_signal(signal.SIGUSR1, "usr1")
    assert info.value.errno == errno.EMFILE
    assert (blocked_signals(), open_fds()) == before
    assert selector.is_empty


def test_sigchld_as_a_signal_coexists_with_process_watching(selector, children):
    """A subreaper registers SIGCHLD too: it hears every SIGCHLD, the sweep still works."""
    r, w = os.pipe()
    try:
        watched = children.waiting_on(r)
        selector.register_process(watched, "child")
        selector.register_signal(signal.SIGCHLD, "chld")
        os.close(w)
        w = -1
        keys = collect_until(selector, lambda got: {k.data for k in got} >= {"child", "chld"})
        events = {k.data: k.events for k in keys}
        assert events["chld"] == Event.SIGNAL and Event.PROCESS in events["child"]
        assert [k.data for k in keys].count("chld") == 1  # SIGCHLDs queue at most once
        assert children.reap(watched) == 0
        selector.unregister(next(k.fd for k in keys if k.data == "child"))
        assert signal.SIGCHLD in blocked_signals()  # still the signal's
        orphan_like = children.exited()  # not watched: only the SIGNAL key hears it
        assert [k.data for k in collect_until(selector, lambda got: got)] == ["chld"]
        children.reap(orphan_like)
        selector.unregister(next(k.fd for k in keys if k.data == "chld"))
        assert signal.SIGCHLD not in blocked_signals()
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def collect_until(
    selector: Selector[Any], done: Callable[[list[ReadyKey[Any]]], object], seconds: float = 5
) -> list[ReadyKey[Any]]:
    """Select until `done(collected)` is true (or fail after `seconds`)."""
    deadline = time.monotonic() + seconds
    collected: list[ReadyKey[Any]] = []
    while not done(collected):
        assert time.monotonic() < deadline, collected
        collected += selector.select(100)
    return collected


# ------------------------------------------------------------------------- processes


def test_child_exit_gives_one_event_and_leaves_the_status_to_reap(selector, children, fds):
    r, w = os.pipe()
    fds.extend((r, w))
    pid = children.waiting_on(r, exit_code=3)
    ident = selector.register_process(pid, "web")
    assert ident < 0
    assert selector.select(0) == []
    os.close(w)
    [key] = select_until(selector, bool)
    assert key == ReadyKey(ident, PROCESS_EXITED, 0, "web")
    assert process_state(pid) == "Z"  # WNOWAIT: still a zombie, pid still reserved
    assert selector.get_events(ident) == PROCESS_EXITED
    assert collect_for(selector, 0.1) == []
    assert children.reap(pid) == 3


def test_fifty_children_exiting_at_once_give_fifty_events(selector, children, fds):
    """SIGCHLDs coalesce; the waitid sweep must still find every exit, exactly once."""
    r, w = os.pipe()
    fds.extend((r, w))
    pids = [children.waiting_on(r, exit_code=i) for i in range(50)]
    idents = {selector.register_process(pid, pid): pid for pid in pids}
    os.close(w)  # EOF for all fifty at the same moment
    keys = select_until(selector, lambda keys: len(keys) >= 50, timeout=20)
    assert len(keys) == 50
    assert {key.fd: key.data for key in keys} == idents
    assert {key.events for key in keys} == {PROCESS_EXITED}
    assert collect_for(selector, 0.1) == []
    assert [children.reap(pid) for pid in pids] == list(range(50))


def test_child_that_exited_before_registration_is_reported(selector, children):
    pid = children.exited(exit_code=4)
    ident = selector.register_process(pid, "fast")
    # Its SIGCHLD came before anyone watched; the check at registration finds the exit,
    # and the queued event means select(-1) returns at once.
    assert selector.select(-1) == [ReadyKey(ident, PROCESS_EXITED, 0, "fast")]
    assert children.reap(pid) == 4


def test_stopped_child_is_not_reported_as_exited(selector, children):
    pid = children.spawn([SH, "-c", "kill -STOP $$; exit 5"])
    ident = selector.register_process(pid, "stopper")
    wait_until(lambda: process_state(pid) == "T", describe=f"pid {pid} to stop")
    assert collect_for(selector, 0.2) == []  # its SIGCHLD (CLD_STOPPED) is swept in vain
    os.kill(pid, signal.SIGCONT)
    assert select_until(selector, bool) == [ReadyKey(ident, PROCESS_EXITED, 0, "stopper")]
    assert children.reap(pid) == 5


def test_child_reaped_behind_the_selectors_back_is_reported_with_echild(selector, children, fds):
    r, w = os.pipe()
    fds.extend((r, w))
    pid = children.waiting_on(r)
    ident = selector.register_process(pid, "stolen")
    os.close(w)
    assert children.reap(pid) == 0  # someone reaps it before the selector looks
    [key] = select_until(selector, bool)
    assert key == ReadyKey(ident, PROCESS_EXITED | Event.ERROR, errno.ECHILD, "stolen")


def test_watching_a_pid_that_is_not_a_child_names_it_and_leaves_nothing(selector):
    before = blocked_signals()
    with pytest.raises(SelectorOSError, match="pid 1: not a child") as info:
        selector.register_process(1, "init")
    assert info.value.errno == errno.ECHILD
    assert selector.is_empty
    assert blocked_signals() == before
    assert selector.statistics().signalfd == -1


def test_watching_a_pid_twice_names_it(selector, children):
    pid = children.exited()
    selector.register_process(pid, "first")
    with pytest.raises(AlreadyRegisteredError, match=rf"pid {pid} is already watched"):
        selector.register_process(pid, "second")
    with pytest.raises(RegistrationError, match="pid 0"):
        selector.register_process(0, "nobody")


def test_watches_pid_names_exactly_the_registered_processes(selector, children, fds):
    r, w = os.pipe()
    fds.extend((r, w))
    pid = children.waiting_on(r)
    assert not selector.watches_pid(pid)
    ident = selector.register_process(pid, "child")
    assert selector.watches_pid(pid) and not selector.watches_pid(os.getpid())
    selector.unregister(ident)
    assert not selector.watches_pid(pid)


def test_unregister_process_drops_its_queued_event(selector, children):
    first = selector.register_process(children.exited(), "first")
    second = selector.register_process(children.exited(), "second")
    assert selector.statistics().pending_events == 2
    selector.unregister(second)
    assert selector.statistics().pending_events == 1
    assert selector.select(0) == [ReadyKey(first, PROCESS_EXITED, 0, "first")]
    assert selector.select(0) == []


def test_sigchld_is_blocked_only_while_processes_are_watched(selector, children):
    assert signal.SIGCHLD not in blocked_signals()
    ident = selector.register_process(children.exited(), "child")
    assert signal.SIGCHLD in blocked_signals()
    selector.unregister(ident)
    assert signal.SIGCHLD not in blocked_signals()


def test_keep_sigchld_holds_it_from_the_first_process_until_close(children):
    """A supervisor restarting its one program: the last exit does not give SIGCHLD
    back, the next child is watched on the same signalfd, and close() restores all."""
    assert signal.SIGCHLD not in blocked_signals()
    with Selector[Any](keep_sigchld=True) as sel:
        r, w = os.pipe()
        try:
            first = children.waiting_on(r)
            ident = sel.register_process(first, "first")
            signalfd = sel.statistics().signalfd
            os.close(w)
            w = -1
            assert collect_until(sel, lambda got: got) == [
                ReadyKey(ident, PROCESS_EXITED, 0, "first")
            ]
            children.reap(first)
            sel.unregister(ident)
            assert signal.SIGCHLD in blocked_signals()  # kept, though nothing is watched
            assert sel.statistics().signalfd == signalfd
            stranger = children.exited()  # an exit nobody watches: no event, no harm
            assert sel.select(0) == []
            children.reap(stranger)
            r2, w2 = os.pipe()
            try:
                second = children.waiting_on(r2, exit_code=3)
                ident = sel.register_process(second, "second")
                assert sel.statistics().signalfd == signalfd
                os.close(w2)
                w2 = -1
                assert collect_until(sel, lambda got: got) == [
                    ReadyKey(ident, PROCESS_EXITED, 0, "second")
                ]
                assert children.reap(second) == 3
            finally:
                os.close(r2)
                if w2 >= 0:
                    os.close(w2)
            sel.unregister(ident)
            chld = sel.register_signal(signal.SIGCHLD, "chld")  # shares the kept one
            sel.unregister(chld)
            assert signal.SIGCHLD in blocked_signals()  # still kept for processes
        finally:
            os.close(r)
            if w >= 0:
                os.close(w)
    assert signal.SIGCHLD not in blocked_signals()


def test_select_into_delivers_what_did_not_fit_on_the_next_calls(selector, children, fds):
    r, w = os.pipe()
    fds.extend((r, w))
    pids = [children.waiting_on(r) for _ in range(10)]
    idents = {selector.register_process(pid, pid) for pid in pids}
    os.close(w)
    wait_until(lambda: all(process_state(pid) == "Z" for pid in pids), describe="all ten to exit")
    buffer: list[ReadyKey[Any] | None] = [None] * 4
    delivered: list[int] = []
    # Nobody reaps here, so exits found by hints and peeks come first and the sweep
    # finds the rest; how they split into calls depends on the kernel's order. What
    # holds: no call returns more than fits, none sleeps while exits are known (-1
    # would hang the test), and all ten come, each once.
    for _ in range(10):
        count = selector.select_into(-1, buffer)
        assert 1 <= count <= 4
        delivered += [key.fd for key in buffer[:count] if key is not None]
        if len(delivered) == 10:
            break
    assert sorted(delivered) == sorted(idents)
    assert selector.select_into(0, buffer) == 0


def collect_exits(selector: Selector[Any], children: Children, count: int) -> list[int]:
    """Select until `count` exits came, reaping each at once as a daemon does."""
    exited: list[int] = []
    deadline = time.monotonic() + 10
    while len(exited) < count and time.monotonic() < deadline:
        for key in selector.select(1000):
            assert key.events == Event.PROCESS | Event.ONESHOT | Event.FINISHED
            selector.unregister(key.fd)
            children.reap(key.data)
            exited.append(key.data)
    return exited


def test_collapsed_sigchlds_lose_no_exit_when_the_owner_reaps_as_told(
    selector: Selector[Any], children: Children, fds: list[int]
) -> None:
    """100 children exit at once: most SIGCHLDs collapse, and the peeks find the rest."""
    pids = exiting_together(selector, children, fds, 100)
    exited = collect_exits(selector, children, len(pids))
    assert sorted(exited) == sorted(pids)
    assert selector.select(0) == []


def test_an_unwatched_zombie_does_not_hide_the_exits_behind_it(
    selector: Selector[Any], children: Children, fds: list[int]
) -> None:
    """A child nobody watches exits first and stays a zombie: the peek cannot see past
    it, so the selector falls back to asking every watched pid."""
    stray = children.exited()
    pids = exiting_together(selector, children, fds, 20)
    exited = collect_exits(selector, children, len(pids))
    assert sorted(exited) == sorted(pids)
    assert process_state(stray) == "Z"  # still there: not the selector's to reap


def exiting_together(
    selector: Selector[Any], children: Children, fds: list[int], count: int
) -> list[int]:
    """`count` watched children, made to exit at once (their SIGCHLDs may collapse)."""
    r, w = os.pipe()
    fds.extend((r, w))
    pids = [children.waiting_on(r) for _ in range(count)]
    for pid in pids:
        selector.register_process(pid, pid)
    os.close(w)
    return pids


def count_full_peeks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts waitid(P_ALL) calls, the kernel's walk of every child."""
    calls: list[int] = []
    real = os.waitid

    def waitid(idtype: int, ident: int, options: int) -> Any:
        if idtype == os.P_ALL:
            calls.append(ident)
        return real(idtype, ident, options)

    monkeypatch.setattr(os, "waitid", waitid)
    return calls


def test_exits_told_by_their_sigchld_cost_no_walk_of_every_child_while_peeks_are_dear(
    selector: Selector[Any], children: Children, fds: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With thousands of children a peek costs milliseconds: exits one at a time are
    each reported from their own SIGCHLD, and the peek that follows waits its turn."""
    selector._peek_cost = 1.0  # as if the last empty peek took 1 s: the next waits 50 s
    peeks = count_full_peeks(monkeypatch)
    for exit_code in range(10):
        r, w = os.pipe()
        fds.extend((r, w))
        pid = children.waiting_on(r, exit_code)
        ident = selector.register_process(pid, pid)
        os.close(w)
        assert select_until(selector, bool) == [ReadyKey(ident, PROCESS_EXITED, 0, pid)]
        selector.unregister(ident)
        assert children.reap(pid) == exit_code
    assert peeks == []


def test_an_exit_whose_sigchld_collapsed_is_found_by_hint_exit_before_the_peek(
    selector: Selector[Any], children: Children, fds: list[int]
) -> None:
    selector._peek_cost = 1.0  # the peek is 50 s away
    r, w = os.pipe()
    fds.extend((r, w))
    pids = [children.waiting_on(r, exit_code=i) for i in (1, 2)]
    idents = {pid: selector.register_process(pid, pid) for pid in pids}
    os.close(w)
    wait_until(lambda: all(process_state(pid) == "Z" for pid in pids), describe="both to exit")
    # SIGCHLD was blocked all along: the two collapsed into one record naming one pid.
    [first] = select_until(selector, bool)
    selector.unregister(first.fd)
    children.reap(first.data)
    [other] = [pid for pid in pids if pid != first.data]
    assert selector.select(0) == []  # only the peek would find it, and it is not due
    selector.hint_exit(other)
    selector.hint_exit(os.getpid())  # not a watched child: ignored
    assert selector.select(0) == [ReadyKey(idents[other], PROCESS_EXITED, 0, other)]
    assert children.reap(other) == (2 if other == pids[1] else 1)


def test_a_select_waiting_forever_wakes_for_a_peek_that_comes_due(
    selector: Selector[Any], children: Children, fds: list[int]
) -> None:
    """A collapsed exit is found by select(-1) itself, not by a caller that polls."""
    selector._peek_cost = 0.004  # the peek waits 0.2 s
    pids = exiting_together(selector, children, fds, 2)
    wait_until(lambda: all(process_state(pid) == "Z" for pid in pids), describe="both to exit")
    [first] = select_until(selector, bool)
    selector.unregister(first.fd)
    children.reap(first.data)
    [second] = selector.select(-1)
    assert {first.data, second.data} == set(pids)
    children.reap(second.data)


def test_a_peek_descheduled_midway_does_not_put_the_next_one_far_off(
    selector: Selector[Any], children: Children, fds: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The next peek waits 50x what the last empty one cost: its CPU time, the kernel's
    walk. Counted in wall time, a peek descheduled for 0.2 s (a busy machine; here a
    sleep in the call) would put the next 10 s off, and an exit whose SIGCHLD collapsed
    would go unreported that long."""
    real = os.waitid

    def descheduled(idtype: int, ident: int, options: int) -> Any:
        if idtype == os.P_ALL:
            time.sleep(0.2)
        return real(idtype, ident, options)

    monkeypatch.setattr(os, "waitid", descheduled)
    r, w = os.pipe()
    fds.extend((r, w))
    alone = children.waiting_on(r)
    selector.register_process(alone, alone)
    os.close(w)
    [key] = select_until(selector, bool)  # its own SIGCHLD names it
    selector.unregister(key.fd)
    children.reap(alone)
    peeks = selector.peeks
    assert selector.select(0) == []  # the peek that follows: due at once, finds nothing
    assert selector.peeks == peeks + 1
    pids = exiting_together(selector, children, fds, 2)
    wait_until(lambda: all(process_state(pid) == "Z" for pid in pids), describe="both to exit")
    [first] = select_until(selector, bool)  # one SIGCHLD for the two: one is hinted
    selector.unregister(first.fd)
    children.reap(first.data)
    [second] = select_until(selector, bool, timeout=5)  # the other waits for the peek
    assert {first.data, second.data} == set(pids)
    children.reap(second.data)


# ----------------------------------------------------------------------- user events


@pytest.mark.timeout(20)
def test_trigger_from_another_thread_wakes_a_blocked_select(selector, select_event):
    ident = selector.register_event(select_event, "wake")
    assert ident == select_event.fileno()
    with once_main_thread_blocks(select_event.trigger):
        keys = selector.select(-1)
    assert keys == [ReadyKey(ident, Event.USER, 0, "wake")]


def test_many_triggers_give_one_user_event(selector, select_event):
    selector.register_event(select_event, "wake")
    for _ in range(5):
        select_event.trigger()
    assert len(selector.select(0)) == 1
    assert selector.select(0) == []


def test_unregister_select_event_leaves_it_open(selector, select_event):
    selector.register_event(select_event, "wake")
    selector.unregister(select_event)
    assert select_event.fileno() not in selector
    select_event.trigger()  # still usable
    assert not select_event.closed
    selector.register_event(select_event, "again")
    with pytest.raises(AlreadyRegisteredError, match=rf"fd {select_event.fileno()}"):
        selector.register_event(select_event, "twice")


def test_select_event_fd_is_cloexec_and_nonblocking(select_event):
    fd = select_event.fileno()
    assert not os.get_inheritable(fd)
    assert not os.get_blocking(fd)
    select_event.close()
    assert select_event.closed
    with pytest.raises(ValueError, match="closed"):
        select_event.fileno()


# ------------------------------------------------------------------ select semantics


def test_select_times_out_with_an_empty_result(selector, make_pipe):
    r, _ = make_pipe()
    selector.register_handle(r, Event.READ, "r")
    started = time.monotonic()
    assert selector.select(50) == []
    assert time.monotonic() - started >= 0.045


def test_signal_handled_during_select_gives_an_empty_result(selector):
    """EINTR: the handler runs, the wait goes on (PEP 475), no exception escapes."""
    caught: list[int] = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: caught.append(signum))
    main = threading.main_thread().ident
    assert main is not None
    try:
        with once_main_thread_blocks(lambda: signal.pthread_kill(main, signal.SIGUSR2)):
            keys = selector.select(300)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert keys == []
    assert caught == [signal.SIGUSR2]


def test_signal_handler_raising_interrupted_error_ends_select_empty(selector):
    def interrupt(signum: int, frame: object) -> None:
        raise InterruptedError

    previous = signal.signal(signal.SIGUSR2, interrupt)
    main = threading.main_thread().ident
    assert main is not None
    try:
        started = time.monotonic()
        with once_main_thread_blocks(lambda: signal.pthread_kill(main, signal.SIGUSR2)):
            keys = selector.select(10_000)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert keys == []
    assert time.monotonic() - started < 9


def test_select_into_refuses_an_empty_buffer(selector):
    with pytest.raises(ValueError, match="at least one slot"):
        selector.select_into(0, [])


def test_select_into_leaves_slots_after_the_count_alone(selector, make_pipe):
    r, w = make_pipe()
    selector.register_handle(r, Event.READ, "r")
    os.write(w, b"x")
    sentinel = ReadyKey(-99, Event(0), 0, "old")
    buffer: list[ReadyKey[Any] | None] = [None, sentinel, sentinel]
    assert selector.select_into(0, buffer) == 1
    assert buffer == [ReadyKey(r, Event.READ, 0, "r"), sentinel, sentinel]


def test_queued_events_use_the_current_data(selector, children):
    ident = selector.register_process(children.exited(), "old")
    assert selector.set_data(ident, "new")
    assert selector.select(0)[0].data == "new"


# ----------------------------------------------------------------------- data access


def test_data_access(selector, make_pipe):
    r, _ = make_pipe()
    selector.register_handle(r, Event.READ, "old")
    assert selector.get_data(r) == "old"
    assert selector.set_data(r, "new") is True
    assert selector.get_data(r) == "new"
    assert selector.set_data(r + 1000, "x") is False

    seen: list[str] = []
    assert selector.with_data(r, seen.append) is True
    assert selector.with_data(r + 1000, seen.append) is False
    assert seen == ["new"]


def test_membership_count_and_emptiness(selector, make_pipe, select_event):
    assert selector.is_empty
    assert selector.count == 0
    r, _ = make_pipe()
    selector.register_handle(r, Event.READ, "r")
    timer = selector.register_timer(1000, False, "t")
    signal_id = selector.register_signal(signal.SIGUSR1, "s")
    selector.register_event(select_event, "e")
    assert all(i in selector for i in (r, timer, signal_id, select_event.fileno()))
    assert selector.count == 4
    assert not selector.is_empty
    assert selector.statistics().signalfd not in selector  # internal, not a key
    stats = selector.statistics()
    assert (stats.handles, stats.timers, stats.signals, stats.user_events) == (1, 1, 1, 1)
    selector.unregister(timer)
    assert timer not in selector
    assert selector.count == 3


def test_fileno_is_the_epoll_fd(selector):
    fd = selector.fileno()
    assert os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventpoll]"


# ------------------------------------------------------------------------- lifecycle


def test_every_fd_the_selector_creates_is_cloexec_and_nonblocking(children):
    with Selector[str]() as sel:
        timer = sel.register_timer(1000, False, "t")
        sel.register_signal(signal.SIGUSR1, "s")
        signalfd = sel.statistics().signalfd
        assert not os.get_inheritable(sel.fileno())
        for fd in (timer, signalfd):
            assert not os.get_inheritable(fd), fd
            assert not os.get_blocking(fd), fd


def test_close_leaves_exactly_the_fds_and_mask_there_were(children, make_pipe, select_event):
    r, w = make_pipe()
    mask_before = blocked_signals()
    fds_before = open_fds()
    sel = Selector[str]()
    sel.register_handle(r, Event.READ, "r")
    sel.register_handle(w, Event.WRITE, "w")
    sel.register_timer(10, True, "oneshot")
    sel.register_timer(10, False, "periodic")
    sel.register_signal(signal.SIGUSR1, "usr1")
    sel.register_process(children.exited(), "child")
    sel.register_event(select_event, "wake")
    assert select_until(sel, lambda keys: len(keys) >= 3)
    sel.close()
    assert sel.closed
    assert open_fds() == fds_before
    assert blocked_signals() == mask_before
    sel.close()  # idempotent


def test_context_manager_closes(make_pipe):
    r, _ = make_pipe()
    before = open_fds()
    with Selector[str]() as sel:
        sel.register_handle(r, Event.READ, "r")
        sel.register_timer(100, False, "t")
    assert sel.closed
    assert open_fds() == before


def test_errors_are_typed_and_catchable_as_builtins():
    assert issubclass(NotRegisteredError, KeyError)
    assert issubclass(RegistrationError, ValueError)
    assert issubclass(AlreadyRegisteredError, RegistrationError)
    assert issubclass(SelectorOSError, OSError)
    for cls in (NotRegisteredError, RegistrationError, SelectorOSError):
        assert issubclass(cls, SelectorError)
    assert str(NotRegisteredError("fd 3 is not registered")) == "fd 3 is not registered"


def test_max_events_caps_one_select(make_pipe):
    with Selector[int](max_events=2) as sel:
        for _ in range(3):
            r, w = make_pipe()
            os.write(w, b"x")
            sel.register_handle(r, Event.READ, r)
        assert len(sel.select(0)) == 2
    with pytest.raises(ValueError, match="max_events"):
        Selector[int](max_events=0)


def test_repeated_readiness_follows_data_and_mask_changes(selector, make_pipe):
    """select() reuses a handle's ReadyKey while nothing changed; it must not go stale."""
    r, w = make_pipe()
    selector.register_handle(r, Event.READ, "old")
    os.write(w, b"x")
    assert selector.select(0) == [ReadyKey(r, Event.READ, 0, "old")]
    assert selector.select(0) == [ReadyKey(r, Event.READ, 0, "old")]
    selector.set_data(r, "new")
    assert selector.select(0) == [ReadyKey(r, Event.READ, 0, "new")]
    os.close(w)  # the mask changes: EPOLLIN|EPOLLHUP
    assert selector.select(0) == [ReadyKey(r, Event.READ | Event.ERROR, errno.ECONNRESET, "new")]
