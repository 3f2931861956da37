"""Everything that touches a child process: spawn it from a clean slate, signal it, reap it.

A child must not inherit anything of the daemon it does not need (s6's `cspawn`, Rust's
std; procServ#48 is the bug this prevents):

- The daemon blocks the signals it reads through the signalfd, and a blocked mask
  survives fork and exec: a child that inherits it ignores the SIGTERM meant to stop it.
  So the child gets an empty mask and every standard signal at its default disposition
  (SIG_IGN, unlike a handler, also survives exec).
- Its own session (setsid), so that a signal to the process group reaches its
  descendants and a terminal's job control cannot touch it.
- Only fds 0, 1 and 2: stdin from /dev/null, stdout/stderr to the capture pipes. Every
  fd the daemon opens is close-on-exec (Python's default, PEP 446, and the selector's
  rule), and `mark_inherited_fds_cloexec()` covers whatever supd's launcher leaked.
- The file-descriptor limit supd started with (supd raises its own soft limit to hold
  thousands of pipes; a child expecting the usual 1024 for select() gets it back).
- PR_SET_PDEATHSIG = SIGTERM, set after the uid/gid change (which clears it), so that
  a supd killed with SIGKILL leaves no orphan holding a port the next supd needs.
  (Not when supd is PID 1: the kernel kills its whole PID namespace with it.)

Two implementations, because speed matters here (a respawn's latency is mostly the
spawn), chosen once per daemon (`method()`; `supd --version` prints it):

- ``clone``: supd's small C spawner (`_spawn.c`, bound in `clonespawn`), built at
  install time where a C compiler exists. clone(CLONE_VM | CLONE_VFORK) borrows the
  daemon's memory instead of copying it, sets up everything above in C, and execs;
  with a cgroup, clone3 starts the child inside it (CLONE_INTO_CGROUP).
  A failed step (exec included) comes back as SpawnError at once, with its errno.
- ``python``, where the C spawner was not built (or ``SUPD_SPAWN=python`` asks for it):
  `posix_spawn` through setpriv(1), which sets the parent-death signal (see
  `_posix_spawn`); `posix_spawn` of the program itself when supd is PID 1; else a
  plain `os.fork()` that sets everything up in Python and execs (`_fork`), for programs
  that switch users, for systems without setpriv, and for a child that must join its
  cgroup before exec (posix_spawn cannot). On the fork path the child reports
  a failed exec through a close-on-exec pipe (end of file means the exec succeeded),
  which the daemon reads when convenient: the parent never waits for the child. Running
  Python in a forked child is safe because the daemon is single-threaded. Through
  setpriv, a failed exec is setpriv's own exit (`SETPRIV_EXEC_FAILED`) with its message
  on the program's stderr.

The common failures (no such file, not executable, no such directory, unknown user)
are checked in the parent first, so they are reported the same way on every path.

Reaping: the selector reports an exit with waitid(WNOWAIT), which leaves the zombie in
place, so the pid cannot be reused before `reap()` collects exactly that pid.
"""

from __future__ import annotations

import contextlib
import functools
import grp
import os
import pwd
import re
import resource
import shutil
import signal
import stat
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import clonespawn, linux
from .facts import CHILD_PRIVATE_ENVIRONMENT

# Standard signals a child gets back at their default disposition.
_RESETTABLE_SIGNALS = tuple(s for s in range(1, 32) if s not in (signal.SIGKILL, signal.SIGSTOP))

_EXIT_EXEC_FAILED = 127
# A re-exec'd supd (reexec.py) has the raised limit already: the first one's is passed.
ENV_ORIGINAL_NOFILE = "SUPD_ORIGINAL_NOFILE"


def _original_nofile() -> tuple[int, int]:
    passed = os.environ.pop(ENV_ORIGINAL_NOFILE, "")
    with contextlib.suppress(ValueError):
        soft, hard = (int(x) for x in passed.split(","))
        return soft, hard
    return resource.getrlimit(resource.RLIMIT_NOFILE)


_ORIGINAL_NOFILE = _original_nofile()

METHODS = ("clone", "python")


def _default_method() -> str:
    wanted = os.environ.get("SUPD_SPAWN", "")
    if wanted == "python" or not clonespawn.available():
        return "python"
    return "clone"


_method = _default_method()


def method() -> str:
    """`clone` (the C spawner) or `python` (posix_spawn through setpriv, or fork)."""
    return _method


def use_method(name: str) -> str:
    """Switch the spawn method (tests run every spawn test on both); returns the old one.

    ValueError for "clone" where the C spawner was not built.
    """
    global _method
    if name not in METHODS or (name == "clone" and not clonespawn.available()):
        raise ValueError(f"spawn method {name!r} is not available here")
    old, _method = _method, name
    return old


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
    # Variables the program's config sets: a user switch does not override them.
    configured_environment: frozenset[str] = frozenset()
    # An open directory fd of the process's cgroup (cgroups.py), or None: the child is
    # born in it (clone3) or joins it before exec (fork); posix_spawn cannot, see `spawn`.
    cgroup_fd: int | None = None


@dataclass(slots=True)
class Child:
    """A started child and the daemon's ends of its pipes (None when closed or unused:
    only the fork path has an exec report)."""

    pid: int
    stdout_fd: int | None
    stderr_fd: int | None
    exec_error_fd: int | None  # the child's exec report: EOF on success, else a message
    via_setpriv: bool = False  # setpriv's own exec failure ends the child (see below)

    def read_exec_error(self) -> str | None:
        """Read and close the exec report: the error message, or None if exec worked.

        Call it once the pipe is readable (the child wrote or exec closed its end) or the
        child has exited; the caller unregisters the fd from its selector first.
        """
        if self.exec_error_fd is None:
            return None
        try:
            data = os.read(self.exec_error_fd, 4096)
        except BlockingIOError:
            data = b""
        os.close(self.exec_error_fd)
        self.exec_error_fd = None
        return data.decode(errors="replace") or None


@dataclass(frozen=True)
class Credentials:
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str
    name: str
    shell: str


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
    # An empty login shell means /bin/sh (passwd(5)).
    shell = entry.pw_shell or "/bin/sh"
    creds = Credentials(entry.pw_uid, gid, groups, entry.pw_dir, entry.pw_name, shell)
    if os.geteuid() != 0 and (creds.uid != os.geteuid() or creds.gid != os.getegid()):
        raise SpawnError(f"cannot switch to user {user!r} / group {group!r}: supd is not root")
    return creds


def child_environment(base: Mapping[str, str], *extra: Mapping[str, str]) -> dict[str, str]:
    """`base` (supd's environment) minus supd's own systemd variables, plus `extra`."""
    env = {k: v for k, v in base.items() if k not in CHILD_PRIVATE_ENVIRONMENT}
    for more in extra:
        env.update(more)
    return env


def _with_credentials(spec: SpawnSpec, creds: Credentials | None) -> Mapping[str, str]:
    """A program switching users gets its HOME, USER, LOGNAME and SHELL from the passwd
    entry, as login(1) and supervisord do (not supd's HOME=/root), unless its config
    sets them. A group alone switches no user, and changes none of them."""
    if creds is None or spec.user is None:
        return spec.environment
    account = {"HOME": creds.home, "USER": creds.name, "LOGNAME": creds.name, "SHELL": creds.shell}
    keep = spec.configured_environment
    return {**spec.environment, **{k: v for k, v in account.items() if k not in keep}}


# argv[0] -> path found in PATH; re-checked with one access() per use, so a program
# that was removed is reported, and one installed later is found on the next miss.
_executables: dict[tuple[str, str], str] = {}


def resolve_executable(argv0: str, env: Mapping[str, str], directory: Path | None) -> str:
    """The path execve will run, looked up like execvp does; SpawnError if there is none."""
    if "/" in argv0:
        path = argv0 if directory is None else os.path.join(directory, argv0)
        try:
            mode = os.stat(path).st_mode  # one stat for "exists" and "is a folder"
        except (OSError, ValueError):  # what os.path.exists() calls missing
            raise SpawnError(f"No such file or directory: {argv0}") from None
        if stat.S_ISDIR(mode) or not os.access(path, os.X_OK):
            raise SpawnError(f"Permission denied: {argv0}")
        return path
    search = env.get("PATH", os.defpath)
    cached = _executables.get((argv0, search))
    if cached is not None and os.access(cached, os.X_OK):
        return cached
    found = shutil.which(argv0, path=search)
    if found is None:
        raise SpawnError(f"No such file or directory: {argv0} (not found in PATH)")
    _executables[(argv0, search)] = found
    return found


def _pipe() -> tuple[int, int]:
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    os.set_blocking(write_fd, True)  # the child's end: programs expect blocking stdout
    return read_fd, write_fd


_devnull: int | None = None


def _stdin() -> int:
    global _devnull
    if _devnull is None:
        _devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    return _devnull


def spawn(spec: SpawnSpec) -> Child:
    """Start a child with its output on fresh pipes; SpawnError if it cannot be started."""
    if not spec.argv:
        raise SpawnError("empty command")
    creds = resolve_credentials(spec.user, spec.group)
    env = _with_credentials(spec, creds)
    if spec.directory is not None and not os.path.isdir(spec.directory):
        raise SpawnError(f"No such directory: {spec.directory}")
    executable = resolve_executable(spec.argv[0], env, spec.directory)
    # Not root, supd may only name itself (resolve_credentials): there is nothing to
    # switch, and setgroups, even to the same groups, would be refused (supervisord's
    # rule too). The passwd entry still gives the environment above.
    if os.geteuid() != 0:
        creds = None
    if _method == "clone":
        return _clone(spec, creds, executable, env)
    # As PID 1 (a container's init) the parent-death signal is moot: when PID 1 dies
    # the kernel kills everything in its namespace. Then exec the program directly.
    # posix_spawn runs no code of ours in the child, so it cannot join a cgroup before
    # exec; the parent moving it right after the call loses a race under load (the
    # program forks first, and its children stay in supd's cgroup: seen in the tests).
    # A child that must join one goes the fork path, which joins before exec.
    joins = spec.cgroup_fd is not None
    direct = creds is None and os.getpid() == 1 and not joins
    setpriv = _setpriv() if creds is None and not direct and not joins else None
    parent_fds: list[int] = []
    child_fds: list[int] = []
    try:
        out_r, out_w = _pipe()
        parent_fds.append(out_r)
        child_fds.append(out_w)
        err_r: int | None = None
        err_w = out_w
        if not spec.redirect_stderr:
            err_r, err_w = _pipe()
            parent_fds.append(err_r)
            child_fds.append(err_w)
        if direct or setpriv is not None:
            path, argv = (executable, list(spec.argv)) if direct else _through_setpriv(spec)
            pid = _posix_spawn(spec, path, argv, env, (_stdin(), out_w, err_w))
            return Child(pid, out_r, err_r, None, via_setpriv=not direct)
        report_r, report_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        parent_fds.append(report_r)
        child_fds.append(report_w)
        pid = _fork(spec, creds, executable, env, (_stdin(), out_w, err_w, report_w))
    # ValueError: resource.setrlimit's word for EPERM and EINVAL (the fd limit supd
    # started with is above its hard limit, lowered since), and posix_spawn's for argv
    # or environment strings it cannot pass.
    except (OSError, ValueError) as exc:
        for fd in parent_fds:
            os.close(fd)
        reason = exc.strerror if isinstance(exc, OSError) else None
        raise SpawnError(f"cannot spawn: {reason or exc}") from None
    finally:
        for fd in child_fds:
            os.close(fd)
    return Child(pid, out_r, err_r, report_r)


# -- the C spawner -----------------------------------------------------------------------


def _clone(
    spec: SpawnSpec, creds: Credentials | None, executable: str, env: Mapping[str, str]
) -> Child:
    out_r, out_w = _pipe_or_spawn_error()
    err_r: int | None = None
    err_w = out_w
    try:
        if not spec.redirect_stderr:
            err_r, err_w = _pipe()
        pid = clonespawn.spawn(
            executable,
            spec.argv,
            env,
            (_stdin(), out_w, err_w),
            directory=os.fspath(spec.directory) if spec.directory is not None else None,
            umask=spec.umask,
            nofile=_ORIGINAL_NOFILE,
            cgroup_fd=spec.cgroup_fd,
            credentials=(creds.uid, creds.gid, creds.groups) if creds is not None else None,
            # As PID 1 the parent-death signal is moot: the kernel kills the namespace.
            pdeathsig=0 if os.getpid() == 1 else signal.SIGTERM,
        )
    # ValueError: a string the spawner cannot pass (an embedded NUL), as on the
    # posix_spawn path; the pipes are closed whatever the failure.
    except (OSError, ValueError) as exc:
        for fd in (out_r, err_r):
            if fd is not None:
                os.close(fd)
        if isinstance(exc, ValueError):
            raise SpawnError(f"cannot spawn: {exc}") from None
        raise SpawnError(_clone_failure(exc, spec)) from None
    finally:
        os.close(out_w)
        if err_w != out_w:
            os.close(err_w)
    return Child(pid, out_r, err_r, None)


def _pipe_or_spawn_error() -> tuple[int, int]:
    try:
        return _pipe()
    except OSError as exc:
        raise SpawnError(f"cannot spawn: {exc.strerror or exc}") from None


def _clone_failure(exc: OSError, spec: SpawnSpec) -> str:
    reason = exc.strerror or str(exc)
    step = exc.step if isinstance(exc, clonespawn.CloneSpawnError) else "spawn"
    if step == "exec":
        return f"{reason}: {spec.argv[0]}"
    if step == "chdir":
        return f"{reason}: {spec.directory}"
    return f"cannot {step}: {reason}"


# -- the fast path: posix_spawn through setpriv ------------------------------------------
#
# posix_spawn (vfork + exec) costs the daemon about 0.2 ms whatever its size; a fork of
# a 40 MB Python process costs 2 ms and more, mostly in copy-on-write faults after it,
# and that is most of a respawn's latency. posix_spawn does the session, the signal
# mask, the default dispositions and the fds itself. The directory, umask and fd limit
# are the daemon's own for the instant of the call (it is single-threaded; vfork's child
# inherits them, and they are restored at once). What posix_spawn cannot do is the
# PR_SET_PDEATHSIG prctl in the child: util-linux's setpriv(1) does exactly that and
# then execs the program, for about 1 ms of the child's time. Where setpriv is missing,
# or the program switches users, the fork path below does everything in Python.


@functools.cache
def _setpriv() -> str | None:
    """setpriv's path, if it supports --pdeathsig (util-linux 2.33+); looked up once."""
    found = shutil.which("setpriv", path="/usr/bin:/bin:/usr/sbin:/sbin")
    if found is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            usage = subprocess.run([found, "--help"], capture_output=True, text=True, timeout=10)
            if "--pdeathsig" in usage.stdout:
                return found
    return None


# setpriv exits with these when its exec fails (util-linux's EX_EXEC_FAILED and
# EX_EXEC_ENOENT), after printing "setpriv: failed to execute PATH: REASON" on stderr.
SETPRIV_EXEC_FAILED = frozenset({126, 127})
_SETPRIV_FAILURE = re.compile(rb"^setpriv: failed to execute (.*): ([^:\n]*)$", re.MULTILINE)


def setpriv_exec_failure(child: Child, exit_code: int | None, stderr_tail: bytes) -> str | None:
    """Why exec failed, if this exit is setpriv's and not the program's own.

    `stderr_tail` is the end of what the child wrote on stderr (on stdout with
    redirect_stderr); only setpriv's own line, last before the exit, counts.
    """
    if not child.via_setpriv or exit_code not in SETPRIV_EXEC_FAILED:
        return None
    lines = stderr_tail.rstrip(b"\n").rsplit(b"\n", 1)
    match = _SETPRIV_FAILURE.match(lines[-1])
    if match is None:
        return None
    return f"{match[2].decode(errors='replace')}: {match[1].decode(errors='replace')}"


def _through_setpriv(spec: SpawnSpec) -> tuple[str, list[str]]:
    setpriv = _setpriv()
    assert setpriv is not None
    return setpriv, [setpriv, "--pdeathsig", "TERM", "--", *spec.argv]


def _posix_spawn(
    spec: SpawnSpec,
    path: str,
    argv: list[str],
    env: Mapping[str, str],
    fds: tuple[int, int, int],
) -> int:
    actions = [(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(fds)]
    directory = spec.directory
    # The way back is an fd, not a path: supd's own folder may have been deleted.
    cwd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC) if directory else None
    old_umask = os.umask(spec.umask) if spec.umask is not None else None
    raised = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        if directory is not None:
            os.chdir(directory)
        if raised != _ORIGINAL_NOFILE:
            resource.setrlimit(resource.RLIMIT_NOFILE, _ORIGINAL_NOFILE)
        return os.posix_spawn(
            path,
            argv,
            env,
            file_actions=actions,
            setsid=True,
            setsigmask=(),
            setsigdef=_RESETTABLE_SIGNALS,
        )
    finally:
        # Restoring cannot fail in practice; if it did, the child (already running) must
        # still be returned and watched, so no error may escape from here.
        with contextlib.suppress(OSError, ValueError):
            if raised != _ORIGINAL_NOFILE:
                resource.setrlimit(resource.RLIMIT_NOFILE, raised)
        if old_umask is not None:
            os.umask(old_umask)
        if cwd is not None:
            with contextlib.suppress(OSError):
                os.fchdir(cwd)
            os.close(cwd)


# -- the general path: fork, set up in Python, exec ---------------------------------------


def _fork(
    spec: SpawnSpec,
    creds: Credentials | None,
    executable: str,
    env: Mapping[str, str],
    fds: tuple[int, int, int, int],
) -> int:
    parent_pid = os.getpid()
    # Only dispositions that are not the default need resetting in the child: the less
    # Python the child runs, the fewer pages it copies before exec.
    changed = tuple(s for s in _RESETTABLE_SIGNALS if signal.getsignal(s) != signal.SIG_DFL)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child, which execs or _exits
        _become_program(spec, creds, executable, env, fds, changed, parent_pid)
    return pid


def _become_program(
    spec: SpawnSpec,
    creds: Credentials | None,
    executable: str,
    env: Mapping[str, str],
    fds: tuple[int, int, int, int],
    changed_signals: tuple[int, ...],
    parent_pid: int,
) -> None:  # pragma: no cover - runs in the child
    """In the forked child: set up the clean slate and exec. Never returns."""
    stdin, stdout, stderr, report_fd = fds
    try:
        os.setsid()
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        for signum in changed_signals:
            signal.signal(signum, signal.SIG_DFL)
        os.dup2(stdin, 0)
        os.dup2(stdout, 1)
        os.dup2(stderr, 2)
        if spec.directory is not None:
            os.chdir(spec.directory)
        if spec.umask is not None:
            os.umask(spec.umask)
        resource.setrlimit(resource.RLIMIT_NOFILE, _ORIGINAL_NOFILE)
        if spec.cgroup_fd is not None:  # while still privileged
            procs = os.open("cgroup.procs", os.O_WRONLY | os.O_CLOEXEC, dir_fd=spec.cgroup_fd)
            os.write(procs, b"0")
        if creds is not None:
            os.setgroups(list(creds.groups))
            os.setgid(creds.gid)
            os.setuid(creds.uid)
        linux.set_pdeathsig(signal.SIGTERM)  # after setuid, which clears it
        if os.getppid() != parent_pid:  # supd died before the prctl: nobody would stop us
            os._exit(1)
        os.execve(executable, list(spec.argv), env)
    except OSError as exc:
        message = f"{exc.strerror or exc}: {exc.filename or spec.argv[0]}"
        with contextlib.suppress(OSError):
            os.write(report_fd, message.encode(errors="replace"))
    except BaseException as exc:
        with contextlib.suppress(OSError, BaseException):
            os.write(report_fd, f"spawn failed: {exc!r}".encode(errors="replace"))
    finally:
        os._exit(_EXIT_EXEC_FAILED)


def send_signal(pid: int, signum: int, group: bool) -> bool:
    """Signal a child, or its whole process group; False if it is already gone."""
    try:
        if group:
            os.killpg(pid, signum)
        else:
            os.kill(pid, signum)
    except ProcessLookupError:
        return False
    except PermissionError:
        # The group may hold processes we may not signal; the child itself we may.
        os.kill(pid, signum)
    return True


def reap(pid: int) -> tuple[int | None, int | None]:
    """Collect the exit status of an exited child: (exit_code, exit_signal).

    Only after the selector reported the exit: the zombie is there, so this cannot block.
    """
    exit_code, exit_signal, _, _ = reap_status(pid)
    return exit_code, exit_signal


def reap_status(pid: int) -> tuple[int | None, int | None, bool, float | None]:
    """`reap`, whether the kernel wrote a core dump (WCOREDUMP), and the CPU seconds the
    child used, its own reaped children included (None if the status is lost).

    The CPU figure is wait4's rusage of the zombie: the same sum as utime + stime +
    cutime + cstime in /proc/PID/stat, in microseconds rather than ticks, and without
    opening a file on the way from an exit to its restart.
    """
    try:
        _, status, usage = os.wait4(pid, 0)
    except ChildProcessError:  # reaped behind our back: the status is lost
        return None, None, False, None
    cpu_seconds = usage.ru_utime + usage.ru_stime
    if os.WIFSIGNALED(status):
        return None, os.WTERMSIG(status), os.WCOREDUMP(status), cpu_seconds
    return os.waitstatus_to_exitcode(status), None, False, cpu_seconds


def stopped_by(pid: int) -> int | None:
    """The signal that stopped child `pid` (SIGSTOP, SIGTSTP...) while it stays stopped.

    waitid(WSTOPPED | WNOWAIT) reports a stopped child without consuming the report,
    and reports nothing once it is continued (or has exited: WEXITED is not asked).
    """
    try:
        info = os.waitid(os.P_PID, pid, os.WSTOPPED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return None
    if info is None or info.si_code != os.CLD_STOPPED:
        return None
    return info.si_status


def any_stopped() -> bool:
    """Whether any child is stopped now: one syscall, so `stopped_by` is asked only then."""
    try:
        info = os.waitid(os.P_ALL, 0, os.WSTOPPED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return info is not None and info.si_code == os.CLD_STOPPED


def reserve_spawn_slots() -> None:
    """Call first thing in a daemon: the C spawner's fd slots, as low in the table as
    they can be (a child copies the fds below them; see clonespawn.reserve_slots)."""
    if _method == "clone":
        clonespawn.reserve_slots()


def original_fd_limit() -> tuple[int, int]:
    """The fd limit supd was started with, which every child gets."""
    return _ORIGINAL_NOFILE


def raise_fd_limit() -> None:
    """Lift supd's soft fd limit to the hard one: each program holds two pipes."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def mark_inherited_fds_cloexec() -> None:
    """Make every fd above 2 that supd was started with close-on-exec.

    Whatever supd's launcher leaked (a shell's fd, an activation socket) must not reach
    the programs. Call it before the daemon opens anything that must be inherited.
    """
    with contextlib.suppress(OSError):
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd > 2:
                with contextlib.suppress(OSError):
                    os.set_inheritable(fd, False)
