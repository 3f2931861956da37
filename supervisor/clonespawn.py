"""The binding of supd's C spawner (`_spawn.c`): clone(CLONE_VM | CLONE_VFORK) + execve.

`_spawn.c` is built at install time where a C compiler exists (an optional extension
in pyproject.toml) and is a plain shared library, loaded here with ctypes. `available()`
says whether it was built; spawn.py falls back to its pure-Python paths when not.

Why C: the child must run between clone and exec without touching the daemon's memory
(it borrows it), which Python cannot promise. The request below is filled in by Python,
read by the child, and the child writes back which step failed with which errno: the
parent is suspended until the child has exec'd or exited, so the answer is there when
`spawn()` returns, and an exec failure is an exception, not an exit status to decode.

Must not import anything from supd but `linux`-free standard modules.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import os
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

# enum supd_step in _spawn.c, in order.
STEPS: Final = (
    "",
    "clone",
    "setsid",
    "set up fds 0-2",
    "chdir",
    "set the fd limit",
    "join the cgroup",
    "setgroups",
    "setgid",
    "setuid",
    "set the parent-death signal",
    "check the parent",
    "exec",
)


class _Request(ctypes.Structure):
    _fields_ = [
        ("path", ctypes.c_char_p),
        ("argv", ctypes.POINTER(ctypes.c_char_p)),
        ("envp", ctypes.POINTER(ctypes.c_char_p)),
        ("fds", ctypes.c_int * 3),
        ("cwd", ctypes.c_char_p),
        ("umask", ctypes.c_int),
        ("set_nofile", ctypes.c_int),
        ("nofile_cur", ctypes.c_uint64),
        ("nofile_max", ctypes.c_uint64),
        ("cgroup_fd", ctypes.c_int),
        ("switch_user", ctypes.c_int),
        ("uid", ctypes.c_uint32),
        ("gid", ctypes.c_uint32),
        ("ngroups", ctypes.c_int),
        ("groups", ctypes.POINTER(ctypes.c_uint32)),
        ("pdeathsig", ctypes.c_int),
        ("parent_pid", ctypes.c_int),
        ("error", ctypes.c_int),
        ("step", ctypes.c_int),
        ("into_cgroup", ctypes.c_int),
        ("slots", ctypes.c_int * 4),
        ("park_fd", ctypes.c_int),
        ("child_fds", ctypes.c_int * 3),
        ("child_cgroup_fd", ctypes.c_int),
        ("share_files", ctypes.c_int),
    ]


class CloneSpawnError(OSError):
    """A step of the child's set-up (or its exec) failed; `step` names it."""

    def __init__(self, errno: int, step: str, filename: str | None) -> None:
        super().__init__(errno, os.strerror(errno), filename)
        self.step = step


def _library_path() -> Path | None:
    folder = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = folder / f"_spawn{suffix}"
        if path.exists():
            return path
    return None


def _load() -> ctypes.CDLL | None:
    path = _library_path()
    if path is None:
        return None
    try:
        library = ctypes.CDLL(str(path))
    except OSError:
        return None
    library.supd_spawn.argtypes = [ctypes.POINTER(_Request)]
    library.supd_spawn.restype = ctypes.c_int
    return library


_library: Final = _load()
_FS_ENCODING: Final = (sys.getfilesystemencoding(), sys.getfilesystemencodeerrors())

# Whether the last spawn with a cgroup was born in it (clone3) rather than moved there.
last_into_cgroup = False
# Whether the last spawn's child shared the fd table until it kept only the slots'
# (see `reserve_slots`), rather than starting from a copy of the whole table.
last_shared_files = False

# Four fds low in the table, parked on /dev/null, through which a child gets its fds
# 0-2 and its cgroup: the child then keeps only the fds up to the slots instead of a
# copy of the daemon's whole table (thousands of pipes), see _spawn.c. None: not yet
# reserved; () if they could not be.
_slots: tuple[int, ...] | None = None
_park_fd = -1
_one_at_a_time = threading.Lock()


def reserve_slots() -> None:
    """Take the spawn slots now, while the fd table is nearly empty: a child copies the
    fds below the highest slot, so the lower they are, the cheaper a spawn. Idempotent;
    `spawn()` reserves them itself on first use otherwise (wherever they then land)."""
    global _slots, _park_fd
    if _slots is not None:
        return
    taken: list[int] = []
    try:
        _park_fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        taken.append(_park_fd)
        for _ in range(4):
            taken.append(os.dup(_park_fd))  # the lowest free numbers, close-on-exec
    except OSError:
        for fd in taken:
            os.close(fd)
        _park_fd, _slots = -1, ()
        return
    _slots = tuple(taken[1:])


def slots() -> tuple[int, ...]:
    """The reserved slots (empty before `reserve_slots` or when it failed)."""
    return _slots or ()


def available() -> bool:
    return _library is not None


def _strings(items: Sequence[bytes]) -> ctypes.Array[ctypes.c_char_p]:
    array = (ctypes.c_char_p * (len(items) + 1))()
    array[: len(items)] = list(items)
    return array


def spawn(
    path: str,
    argv: Sequence[str],
    environment: Mapping[str, str],
    fds: tuple[int, int, int],
    *,
    directory: str | None = None,
    umask: int | None = None,
    nofile: tuple[int, int] | None = None,
    cgroup_fd: int | None = None,
    credentials: tuple[int, int, Sequence[int]] | None = None,
    pdeathsig: int = 0,
) -> int:
    """Start `path` with a clean slate; its pid, or CloneSpawnError naming the step."""
    assert _library is not None, "check available() first"
    request = _Request()
    request.path = os.fsencode(path)
    # os.fsencode's own encoding, without a Python call per string (40 or so per spawn).
    encoding, errors = _FS_ENCODING
    argv_array = _strings([arg.encode(encoding, errors) for arg in argv])
    env_array = _strings([f"{k}={v}".encode(encoding, errors) for k, v in environment.items()])
    request.argv = argv_array
    request.envp = env_array
    request.fds = (ctypes.c_int * 3)(*fds)
    request.cwd = os.fsencode(directory) if directory is not None else None
    request.umask = -1 if umask is None else umask
    if nofile is not None:
        request.set_nofile = 1
        request.nofile_cur, request.nofile_max = nofile
    # A cgroup directory: the child is born in it (clone3 CLONE_INTO_CGROUP), or, where
    # clone3 cannot, joins it (cgroup.procs) before exec.
    request.cgroup_fd = -1 if cgroup_fd is None else cgroup_fd
    groups_array = None
    if credentials is not None:
        uid, gid, groups = credentials
        groups_array = (ctypes.c_uint32 * max(1, len(groups)))(*groups)
        request.switch_user = 1
        request.uid, request.gid = uid, gid
        request.ngroups = len(groups)
        request.groups = groups_array
    request.pdeathsig = pdeathsig
    request.parent_pid = os.getpid()
    if _slots is None:
        reserve_slots()
    if _slots:
        request.slots = (ctypes.c_int * 4)(*_slots)
        request.park_fd = _park_fd
    else:
        request.slots = (ctypes.c_int * 4)(-1, -1, -1, -1)
    with _one_at_a_time:  # one child stack, one set of slots (ctypes drops the GIL)
        pid: int = _library.supd_spawn(ctypes.byref(request))
    global last_into_cgroup, last_shared_files
    last_into_cgroup = bool(request.into_cgroup)
    last_shared_files = bool(request.share_files)
    if pid < 0:
        step = STEPS[request.step] if 0 <= request.step < len(STEPS) else str(request.step)
        filename = path if step == "exec" else directory if step == "chdir" else None
        raise CloneSpawnError(request.error, step, filename)
    return pid
