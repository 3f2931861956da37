"""One supd per config file: an exclusive flock, held for the daemon's whole life.

Two supervisors on one config would run every program twice. The control socket cannot
guard against that by itself: its default path depends on who starts supd
($RUNTIME_DIRECTORY/supd.sock under systemd, supd.sock beside the config in a shell),
so a second copy may well bind a different one. The config file is what both share.

The lock is `.NAME.lock` beside the config (symlinks resolved: one file, one lock), a
file that is never deleted (removing a lock file while another process waits on it is
how two processes end up holding "the" lock); it holds the owner's pid, for the
message a second supd prints. Where the user may not write it, an existing lock file
is locked through a read-only fd (flock does not care); where it cannot be created (a
read-only folder, or one the user may not write), the config file itself is locked
instead: as good, except that an editor which saves by renaming a new file into place
gives the next supd a fresh inode to lock.

The fd is close-on-exec, so no program inherits the lock and none keeps it after supd
is gone; the kernel drops it when supd exits, however it exits.

Must not import anything from supd: daemon.main takes the lock before the rest starts.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path

# Where creating the lock file fails for these, the config file itself is locked.
_CANNOT_CREATE = (errno.EACCES, errno.EPERM, errno.EROFS)


class AlreadyLocked(Exception):
    """Another live process holds the lock on this config."""

    def __init__(self, config: Path, lock_path: Path, pid: int | None) -> None:
        who = f"pid {pid}" if pid is not None else "pid unknown"
        super().__init__(
            f"another supd is already running on {config} ({who}; it holds {lock_path})"
        )
        self.config = config
        self.lock_path = lock_path
        self.pid = pid


def lock_path_for(config: Path) -> Path:
    real = Path(os.path.realpath(config))
    return real.with_name(f".{real.name}.lock")


class InstanceLock:
    """The held lock; `release()` (or process exit) lets the next supd in."""

    def __init__(self, fd: int, path: Path) -> None:
        self._fd: int | None = fd
        self.path = path

    def fd_and_path(self) -> tuple[int | None, str]:
        """For a re-exec: the fd (the flock lives on it, across execve) and the path;
        `InstanceLock(fd, Path(path))` takes it back on the other side."""
        return self._fd, str(self.path)

    @classmethod
    def acquire(cls, config: Path | str) -> InstanceLock:
        """Lock `config` for this process, or raise AlreadyLocked (OSError if neither the
        lock file nor the config can be opened)."""
        config = Path(config)
        path = lock_path_for(config)
        writable = True
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            if exc.errno not in _CANNOT_CREATE:
                raise
            writable = False
            try:  # another user's lock file: a read-only fd takes the same flock
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                path = Path(os.path.realpath(config))
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise AlreadyLocked(config, path, holder) from None
        except BaseException:
            os.close(fd)
            raise
        if writable:
            with contextlib.suppress(OSError):  # the pid is a courtesy; the flock is the lock
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(fd, path)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the only fd of the open file drops the flock

    @property
    def held(self) -> bool:
        return self._fd is not None


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
