"""Everything that touches a child process: spawn it from a clean slate, signal it, reap it.

A child must not inherit anything of the daemon it does not need (s6's `cspawn`, Rust's
std; procServ#48 is the bug this prevents):

- The daemon blocks the signals it reads through the signalfd, and a blocked mask
  survives fork and exec: a child that inherits it ignores the SIGTERM meant to stop it.
  So the child empties its mask and resets every standard signal to its default
  disposition (SIG_IGN, unlike a handler, also survives exec).
- Its own session (setsid), so that a signal to the process group reaches its
  descendants and a terminal's job control cannot touch it.
- Only fds 0, 1 and 2: stdin from /dev/null, stdout/stderr to the capture pipes; every
  other fd is closed (close_fds) and the daemon's own are close-on-exec anyway.
- PR_SET_PDEATHSIG = SIGTERM, set after the uid/gid change (which clears it), so that
  a supd killed with SIGKILL leaves no orphan holding a port the next supd needs.

`subprocess.Popen` does the fork and exec: it reports exec failures (no such file,
permission denied) as exceptions in the parent, and handles cwd, umask, uid, gid and
supplementary groups. The rest happens in `preexec_fn`, which is safe here because the
daemon is single-threaded (the usual objection to preexec_fn is threads holding locks).

Reaping: the selector reports an exit with waitid(WNOWAIT), which leaves the zombie in
place, so the pid cannot be reused before `reap()` collects exactly that pid through
`Popen.poll()`. Going through Popen also sets its `returncode`, so Popen's own
`__del__`/`_cleanup()` never waits on that pid again.
"""

from __future__ import annotations

import grp
import os
import pwd
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from supervisor import linux

# Standard signals whose disposition a child gets reset to SIG_DFL.
_RESETTABLE_SIGNALS = tuple(
    s for s in range(1, signal.SIGRTMIN) if s not in (signal.SIGKILL, signal.SIGSTOP)
)

# Variables that belong to supd (systemd's notify, watchdog and socket activation):
# a child that inherited them could talk to systemd in supd's name.
PRIVATE_ENVIRONMENT = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
)


class SpawnError(Exception):
    """The process could not be started; the message says why, for `spawn_error`."""


@dataclass(frozen=True)
class SpawnSpec:
    argv: Sequence[str]
    environment: Mapping[str, str]
    directory: Path | None = None
    user: str | None = None
    group: str | None = None
    umask: int | None = None
    redirect_stderr: bool = False


@dataclass
class Child:
    """A running child and the read ends of its output pipes (None when not captured)."""

    pid: int
    popen: subprocess.Popen[bytes] = field(repr=False)
    stdout_fd: int | None
    stderr_fd: int | None


@dataclass(frozen=True)
class Credentials:
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str
    name: str


def resolve_credentials(user: str | None, group: str | None) -> Credentials | None:
    """Look up the uid, gid and supplementary groups a child should run with.

    None means "stay as we are". Raises SpawnError for an unknown user or group, or when
    supd lacks the privilege to switch.
    """
    if user is None and group is None:
        return None
    try:
        entry = pwd.getpwnam(user) if user is not None else pwd.getpwuid(os.geteuid())
    except KeyError:
        raise SpawnError(f"unknown user {user!r}") from None
    gid = entry.pw_gid
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise SpawnError(f"unknown group {group!r}") from None
    groups = tuple(sorted({gid} | {g.gr_gid for g in grp.getgrall() if entry.pw_name in g.gr_mem}))
    creds = Credentials(entry.pw_uid, gid, groups, entry.pw_dir, entry.pw_name)
    if os.geteuid() != 0 and (creds.uid != os.geteuid() or creds.gid != os.getegid()):
        raise SpawnError(f"cannot switch to user {user!r} / group {group!r}: supd is not root")
    return creds


def child_environment(
    base: Mapping[str, str], extra: Mapping[str, str], creds: Credentials | None
) -> dict[str, str]:
    env = {k: v for k, v in base.items() if k not in PRIVATE_ENVIRONMENT}
    if creds is not None:
        env.update(HOME=creds.home, USER=creds.name, LOGNAME=creds.name)
    env.update(extra)
    return env


def _reset_child_state(parent_pid: int) -> None:
    """Runs in the child between fork and exec (after the uid/gid change)."""
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
    for signum in _RESETTABLE_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    linux.set_pdeathsig(signal.SIGTERM)
    if os.getppid() != parent_pid:  # supd died before the prctl: nobody would stop us
        os._exit(1)


def _pipe() -> tuple[int, int]:
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    os.set_blocking(read_fd, False)
    return read_fd, write_fd


def spawn(spec: SpawnSpec, capture_stdout: bool, capture_stderr: bool) -> Child:
    """Start a child; raises SpawnError with a short reason when it cannot be started."""
    creds = resolve_credentials(spec.user, spec.group)
    if not spec.argv:
        raise SpawnError("empty command")
    fds: list[int] = []
    try:
        out_r, out_w = _pipe() if capture_stdout else (None, None)
        fds += [fd for fd in (out_r, out_w) if fd is not None]
        if spec.redirect_stderr:
            err_r, err_w = None, out_w
        else:
            err_r, err_w = _pipe() if capture_stderr else (None, None)
            fds += [fd for fd in (err_r, err_w) if fd is not None]
        popen = _popen(spec, creds, out_w, err_w)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    for fd in {fd for fd in (out_w, err_w) if fd is not None}:  # the child holds its copies
        os.close(fd)
    return Child(popen.pid, popen, out_r, err_r)


def _popen(
    spec: SpawnSpec, creds: Credentials | None, stdout: int | None, stderr: int | None
) -> subprocess.Popen[bytes]:
    parent_pid = os.getpid()
    env = child_environment(spec.environment, {}, creds)
    try:
        return subprocess.Popen(
            list(spec.argv),
            stdin=subprocess.DEVNULL,
            stdout=stdout if stdout is not None else subprocess.DEVNULL,
            stderr=stderr if stderr is not None else subprocess.DEVNULL,
            cwd=spec.directory,
            env=env,
            close_fds=True,
            start_new_session=True,
            restore_signals=True,
            umask=spec.umask if spec.umask is not None else -1,
            user=creds.uid if creds else None,
            group=creds.gid if creds else None,
            extra_groups=list(creds.groups) if creds else None,
            preexec_fn=lambda: _reset_child_state(parent_pid),
        )
    except OSError as exc:
        target = exc.filename or spec.argv[0]
        raise SpawnError(f"{exc.strerror or exc}: {target}") from None
    except subprocess.SubprocessError as exc:
        raise SpawnError(str(exc)) from None


def send_signal(child: Child, signum: int, group: bool) -> bool:
    """Signal the child, or its whole process group; False if it is already gone."""
    try:
        if group:
            os.killpg(child.pid, signum)
        else:
            os.kill(child.pid, signum)
    except ProcessLookupError:
        return False
    except PermissionError:
        # The group may have been left by the child (setpgid) and hold foreign pids.
        os.kill(child.pid, signum)
    return True


def reap(child: Child) -> tuple[int | None, int | None]:
    """Collect the exit status of an exited child: (exit_code, exit_signal)."""
    try:
        code = child.popen.poll()
    except ChildProcessError:  # reaped behind our back: the status is lost
        child.popen.returncode = 0
        return None, None
    if code is None:
        raise RuntimeError(f"reap: pid {child.pid} has not exited")
    return (None, -code) if code < 0 else (code, None)
