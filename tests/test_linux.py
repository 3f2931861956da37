"""Kernel semantics behind supervisor.linux: timerfd, signalfd and prctl, for real.

Signal tests block signals only inside a ``blocked`` block that restores the mask and
discards whatever is still pending; prctl tests run in a child so the pytest process
keeps its own settings.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

from supd import linux

NS_PER_MS = 1_000_000


@pytest.fixture
def timerfd() -> Iterator[int]:
    fd = linux.timerfd_create(linux.CLOCK_MONOTONIC, flags=linux.TFD_CLOEXEC | linux.TFD_NONBLOCK)
    yield fd
    os.close(fd)


@contextlib.contextmanager
def blocked(*signals: int) -> Iterator[None]:
    """Block ``signals`` in this thread; afterwards discard any still pending, restore."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        for signum in signals:
            while signal.sigtimedwait({signum}, 0) is not None:
                pass
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def signal_fd(*signals: int) -> Iterator[int]:
    with blocked(*signals):
        fd = linux.signalfd(-1, signals, linux.SFD_CLOEXEC | linux.SFD_NONBLOCK)
        try:
            yield fd
        finally:
            os.close(fd)


def wait_readable(fd: int, timeout: float = 5.0) -> None:
    readable, _, _ = select.select([fd], [], [], timeout)
    assert readable, f"fd {fd} not readable within {timeout}s"


def expirations(fd: int) -> int:
    return int.from_bytes(os.read(fd, 8), sys.byteorder)


def run_python(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return result.stdout


# --------------------------------------------------------------------------- timerfd


def test_timerfd_create_honours_cloexec_and_nonblock(timerfd):
    assert not os.get_inheritable(timerfd)
    assert not os.get_blocking(timerfd)
    plain = linux.timerfd_create(linux.CLOCK_MONOTONIC)
    try:
        assert os.get_blocking(plain)
    finally:
        os.close(plain)


def test_timerfd_create_with_a_bad_clock_raises_oserror():
    with pytest.raises(OSError) as info:
        linux.timerfd_create(12345)
    assert info.value.errno == errno.EINVAL


def test_unarmed_timerfd_is_not_readable(timerfd):
    assert linux.timerfd_gettime_ns(timerfd) == (0, 0)
    with pytest.raises(BlockingIOError):
        os.read(timerfd, 8)


def test_oneshot_timerfd_expires_once_and_disarms(timerfd):
    previous = linux.timerfd_settime_ns(timerfd, initial=20 * NS_PER_MS)
    assert previous == (0, 0)
    wait_readable(timerfd)
    assert expirations(timerfd) == 1
    assert linux.timerfd_gettime_ns(timerfd) == (0, 0)


def test_periodic_timerfd_keeps_millisecond_intervals(timerfd):
    linux.timerfd_settime_ns(timerfd, initial=5 * NS_PER_MS, interval=5 * NS_PER_MS)
    assert linux.timerfd_gettime_ns(timerfd)[1] == 5 * NS_PER_MS
    total = 0
    while total < 4:
        wait_readable(timerfd)
        total += expirations(timerfd)


def test_timerfd_settime_takes_and_returns_seconds(timerfd):
    linux.timerfd_settime(timerfd, initial=10.0, interval=0.25)
    initial, interval = linux.timerfd_settime(timerfd, initial=0.5)
    assert 9.0 < initial <= 10.0
    assert interval == 0.25
    remaining, interval = linux.timerfd_gettime(timerfd)
    assert 0.0 < remaining <= 0.5
    assert interval == 0.0


def test_timerfd_settime_to_zero_disarms(timerfd):
    linux.timerfd_settime_ns(timerfd, initial=NS_PER_MS * 1000)
    linux.timerfd_settime_ns(timerfd, initial=0)
    assert linux.timerfd_gettime_ns(timerfd) == (0, 0)


def test_timerfd_settime_rejects_negative_times(timerfd):
    with pytest.raises((ValueError, OSError)):
        linux.timerfd_settime_ns(timerfd, initial=-1)


def test_timerfd_settime_on_a_non_timer_fd_raises_oserror():
    r, w = os.pipe()
    try:
        with pytest.raises(OSError) as info:
            linux.timerfd_settime_ns(r, initial=NS_PER_MS)
        assert info.value.errno == errno.EINVAL
    finally:
        os.close(r)
        os.close(w)


# -------------------------------------------------------------------------- signalfd


def test_siginfo_record_is_128_bytes():
    assert linux.SIGNALFD_SIGINFO.size == 128


def test_decode_siginfo_round_trips_every_field():
    fields = list(range(1, 21))
    buffer = linux.SIGNALFD_SIGINFO.pack(*fields)
    info = linux.decode_siginfo(buffer)
    assert list(info) == fields
    assert (info.signo, info.errno, info.code, info.pid, info.uid) == (1, 2, 3, 4, 5)
    assert info.status == 11
    assert info.arch == 20
    assert list(linux.iter_siginfo(buffer * 3)) == [info] * 3
    assert linux.decode_siginfo(b"\0" * 128 + buffer, offset=128) == info


def test_signalfd_reports_a_signal_sent_to_the_process():
    with signal_fd(signal.SIGUSR1) as fd:
        assert not os.get_inheritable(fd)
        assert not os.get_blocking(fd)
        with pytest.raises(BlockingIOError):
            os.read(fd, 128)
        os.kill(os.getpid(), signal.SIGUSR1)
        wait_readable(fd)
        [info] = linux.iter_siginfo(os.read(fd, 128 * 4))
    assert info.signo == signal.SIGUSR1
    assert info.pid == os.getpid()
    assert info.uid == os.getuid()
    assert info.code == 0  # SI_USER: sent with kill()


def test_signalfd_mask_can_be_replaced_on_the_same_fd():
    with signal_fd(signal.SIGUSR1) as fd, blocked(signal.SIGUSR2):
        assert linux.signalfd(fd, [signal.SIGUSR2], 0) == fd
        os.kill(os.getpid(), signal.SIGUSR2)
        wait_readable(fd)
        assert [i.signo for i in linux.iter_siginfo(os.read(fd, 128 * 4))] == [signal.SIGUSR2]


def test_sigchld_record_carries_the_child_pid_and_exit_status():
    with signal_fd(signal.SIGCHLD) as fd:
        pid = os.posix_spawn("/bin/sh", ["sh", "-c", "exit 7"], os.environ, setsigmask=())
        try:
            wait_readable(fd)
            [info] = linux.iter_siginfo(os.read(fd, 128 * 4))
        finally:
            _, status = os.waitpid(pid, 0)
    assert (info.signo, info.pid, info.status) == (signal.SIGCHLD, pid, 7)
    assert info.code == os.CLD_EXITED
    assert os.waitstatus_to_exitcode(status) == 7


def test_signalfd_with_an_invalid_signal_raises_oserror():
    with pytest.raises(OSError) as info:
        linux.signalfd(-1, [0], 0)
    assert info.value.errno == errno.EINVAL


# ----------------------------------------------------------------------------- prctl


def test_set_pdeathsig_round_trips_in_a_child():
    out = run_python(
        """
        import signal
        from supd.linux import get_pdeathsig, set_pdeathsig
        before = get_pdeathsig()
        set_pdeathsig(signal.SIGTERM)
        during = get_pdeathsig()
        set_pdeathsig(0)
        print(before, during, get_pdeathsig())
        """
    )
    assert out.split() == ["0", str(int(signal.SIGTERM)), "0"]


def test_child_subreaper_adopts_orphaned_grandchildren():
    """A subreaper child spawns a shell that backgrounds a grandchild and exits: the
    orphaned grandchild is reparented to the subreaper, not to init."""
    out = run_python(
        """
        import os, signal, subprocess
        from supd.linux import get_child_subreaper, set_child_subreaper
        before = get_child_subreaper()
        set_child_subreaper(True)
        shell = subprocess.run(
            ["/bin/sh", "-c", "sleep 30 >/dev/null 2>&1 & echo $!"],
            capture_output=True, text=True, check=True,
        )
        orphan = int(shell.stdout)
        with open(f"/proc/{orphan}/status") as f:
            ppid = next(int(l.split()[1]) for l in f if l.startswith("PPid:"))
        os.kill(orphan, signal.SIGKILL)
        os.waitpid(orphan, 0)  # ours to reap now
        print(before, get_child_subreaper(), ppid == os.getpid())
        """
    )
    assert out.split() == ["False", "True", "True"]


def test_prctl_errors_become_oserror():
    with pytest.raises(OSError) as info:
        linux.set_pdeathsig(1000)
    assert info.value.errno == errno.EINVAL
    assert linux.get_pdeathsig() == 0
