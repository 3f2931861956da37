"""Per-process cgroups (cgroup v2): a stop that leaves nothing behind.

A process group is only as good as its members' manners: a daemon that calls setsid()
leaves it, and once the main process is gone nothing names the group any more. A cgroup
holds every descendant whatever they do, the kernel can kill all of it at once
(`cgroup.kill`), and `cgroup.events` says when it is empty, through the selector
(EPOLLPRI), with no polling. systemd's KillMode=control-group is built on the same.

The layout, under supd's *root*:

    ROOT/daemon             supd itself (a process never sits in an inner node)
    ROOT/programs/web:0     one cgroup per process, created before its first spawn

ROOT is supd's own cgroup when that is delegated to it (systemd's Delegate=yes, or a
container's cgroup namespace where supd is not at the root); when supd finds itself at
the root of the hierarchy (root on a host, or PID 1 of a container with its own cgroup
namespace), ROOT is a child named after the config file, `supd-<hash>`, so that a new
supd on the same config finds what a crashed one left behind (`leftovers()`).

The hierarchy is found from /proc/self/mounts and /proc/self/cgroup: never assumed at
/sys/fs/cgroup (hybrid layouts mount it at /sys/fs/cgroup/unified). Everything here is
a small read or write on cgroupfs, which never blocks; the one wait (`wait_empty`) is
for start-up only, bounded, before the loop runs.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import select
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

CGROUP2 = "cgroup2"
LIMIT_FILES = {"memory_max": "memory.max", "cpu_max": "cpu.max", "pids_max": "pids.max"}
LIMIT_CONTROLLERS = {"memory_max": "memory", "cpu_max": "cpu", "pids_max": "pids"}


class CgroupUnavailable(Exception):
    """supd cannot manage cgroups here; the message says why (for the log)."""


# -- finding the hierarchy -----------------------------------------------------------


def cgroup2_mount(mounts: str) -> Path | None:
    """The first cgroup2 mount point in /proc/self/mounts' text."""
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == CGROUP2:
            return Path(fields[1].replace("\\040", " "))
    return None


def own_cgroup(proc_cgroup: str) -> str | None:
    """supd's cgroup v2 path ("0::/PATH" in /proc/self/cgroup), or None."""
    for line in proc_cgroup.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            return path
    return None


@dataclass(frozen=True)
class Hierarchy:
    mount: Path  # where cgroup2 is mounted
    own: Path  # supd's own cgroup, as a folder under `mount`

    @property
    def at_root(self) -> bool:
        return self.own == self.mount


def find_hierarchy(mounts: str, proc_cgroup: str) -> Hierarchy | None:
    mount = cgroup2_mount(mounts)
    path = own_cgroup(proc_cgroup)
    if mount is None or path is None or path.endswith(" (deleted)"):
        return None
    return Hierarchy(mount, mount / path.lstrip("/"))


def detect() -> Hierarchy | None:
    try:
        mounts = Path("/proc/self/mounts").read_text()
        proc_cgroup = Path("/proc/self/cgroup").read_text()
    except OSError:
        return None
    return find_hierarchy(mounts, proc_cgroup)


def controllers_for_programs(hierarchy: Hierarchy) -> set[str]:
    """The controllers supd could give its programs' cgroups (what `--check` warns by).

    Under supd's own delegated cgroup, those listed in its cgroup.controllers; at the
    hierarchy's root, those the root already enables for its children (supd never
    changes the root's own subtree_control: that is the host's).
    """
    name = "cgroup.subtree_control" if hierarchy.at_root else "cgroup.controllers"
    try:
        return set((hierarchy.own / name).read_text().split())
    except OSError:
        return set()


def limit_problems(
    hierarchy: Hierarchy | None, limits: dict[str, str], enabled: bool = True
) -> list[str]:
    """Why some of `limits` (memory_max...) cannot be applied here: one line each."""
    if not limits:
        return []
    if not enabled:
        return [f'{option} is not applied: cgroups = "off"' for option in limits]
    if hierarchy is None:
        return [f"{option} is not applied: no cgroup v2 hierarchy" for option in limits]
    if not os.access(hierarchy.own, os.W_OK):
        why = f"supd may not manage cgroups under {hierarchy.own}"
        return [f"{option} is not applied: {why}" for option in limits]
    available = controllers_for_programs(hierarchy)
    return [
        f"{option} is not applied: the {LIMIT_CONTROLLERS[option]} controller is not "
        f"enabled for cgroup v2 here (on cgroup v1, or not delegated)"
        for option in limits
        if LIMIT_CONTROLLERS[option] not in available
    ]


# -- files ------------------------------------------------------------------------------


def read_keyed(path: Path | str) -> dict[str, int]:
    """A flat-keyed cgroup file ("populated 1\\nfrozen 0", cpu.stat, memory.events).

    Plain fds rather than a text file object: memory.events is read at every spawn
    and exit of a process where the memory controller is on (its OOM count).
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = chunk = os.read(fd, _KEYED_READ)
        while chunk:  # these files are small: one read, and the one that says EOF
            chunk = os.read(fd, _KEYED_READ)
            data += chunk
    finally:
        os.close(fd)
    values: dict[str, int] = {}
    for line in data.split(b"\n"):
        key, _, value = line.partition(b" ")
        with contextlib.suppress(ValueError):
            values[key.decode()] = int(value)
    return values


_KEYED_READ: Final = 4096


def _populated(events: bytes) -> bool:
    """The `populated` key of cgroup.events ("populated 1\nfrozen 0\n"); 0 if absent."""
    for line in events.splitlines():
        key, _, value = line.partition(b" ")
        if key == b"populated":
            return value.strip() == b"1"
    return False


def read_pids(folder: Path) -> list[int]:
    try:
        return [int(line) for line in (folder / "cgroup.procs").read_text().split()]
    except FileNotFoundError:
        return []


def _write(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def cgroup_name(process_name: str) -> str:
    # Process names are [A-Za-z0-9_.-] plus ':'; "." and ".." alone are not folders.
    return process_name if process_name not in (".", "..") else f"_{process_name}"


# -- one process's cgroup ----------------------------------------------------------------


class ProcessCgroup:
    """The cgroup of one supervised process (all its runs, one after the other)."""

    __slots__ = ("_folder", "events_fd")

    def __init__(self, path: Path | str, events_fd: int | None = None) -> None:
        # The folder as a str: a Path costs 0.4 KiB (its parts, its cached string)
        # against 0.1, for each of 10,000 processes; `path` makes one when needed.
        self._folder = os.fspath(path)
        # cgroup.events, open only while the daemon waits for the cgroup to empty
        # (EPOLLPRI): a process that merely runs costs no fd (10,000 of them fit under
        # 20,000 fds).
        self.events_fd = events_fd

    @property
    def path(self) -> Path:
        return Path(self._folder)

    def __repr__(self) -> str:
        return f"ProcessCgroup({self._folder!r}, events_fd={self.events_fd})"

    def open_events(self) -> int:
        """cgroup.events, open for the selector (PRIORITY); reading it clears the event."""
        if self.events_fd is None:
            self.events_fd = os.open(self.path / "cgroup.events", os.O_RDONLY | os.O_CLOEXEC)
        return self.events_fd

    def open_dir(self) -> int:
        """The cgroup's directory, for the spawner (clone3's CLONE_INTO_CGROUP)."""
        return os.open(self._folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def add(self, pid: int) -> None:
        _write(self.path / "cgroup.procs", str(pid))

    def populated(self) -> bool:
        """Whether any process is left; re-reads (and so re-arms) cgroup.events.

        Asked at every exit, on the way to the restart: the watched fd when there is
        one (pread at 0), else a plain open, read and close (a Path and a text file
        cost the respawn more than the kernel's side of it).
        """
        if self.events_fd is not None:
            return _populated(os.pread(self.events_fd, 4096, 0))
        fd = os.open(f"{self._folder}/cgroup.events", os.O_RDONLY | os.O_CLOEXEC)
        try:
            return _populated(os.read(fd, 4096))
        finally:
            os.close(fd)

    def pids(self) -> list[int]:
        return read_pids(self.path)

    def kill(self) -> None:
        """SIGKILL everything in it (cgroup.kill; on kernels before 5.14, pid by pid)."""
        try:
            _write(self.path / "cgroup.kill", "1")
        except FileNotFoundError:
            if not self.path.exists():
                return
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def signal(self, signum: int) -> int:
        """Send `signum` to every process in it; how many got it."""
        sent = 0
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signum)
                sent += 1
        return sent

    def set_limits(self, limits: dict[str, str]) -> list[str]:
        """Write memory_max / cpu_max / pids_max; the problems, for a warning each."""
        problems = []
        for option, value in limits.items():
            target = self.path / LIMIT_FILES[option]
            try:
                _write(target, value)
            except FileNotFoundError:
                controller = LIMIT_CONTROLLERS[option]
                why = f"the {controller} controller is not enabled for supd's cgroups here"
                problems.append(f"{option} is not applied: {why}")
            except OSError as exc:
                problems.append(f"{option} = {value!r} is not applied: {exc.strerror or exc}")
        return problems

    def oom_kills(self) -> int | None:
        """memory.events' oom_kill: None without the memory controller."""
        return _read_or_empty(f"{self._folder}/memory.events").get("oom_kill")

    def stats(self, memory_controller: bool = True) -> CgroupStats:
        """CPU and memory of everything in it (what the metrics and `why` show).

        `memory_controller=False` skips the memory files (absent without it): a status
        of many processes reads one file per process instead of three.
        """
        cpu = _read_or_empty(self.path / "cpu.stat")
        memory = _read_or_empty(self.path / "memory.events") if memory_controller else {}
        current: int | None = None
        if memory_controller:
            with contextlib.suppress(OSError, ValueError):
                current = int((self.path / "memory.current").read_text())
        usage = cpu.get("usage_usec")
        return CgroupStats(
            cpu_seconds=usage / 1e6 if usage is not None else None,
            memory_bytes=current,
            oom_kills=memory.get("oom_kill"),
        )

    def close(self) -> None:
        if self.events_fd is not None:
            os.close(self.events_fd)
            self.events_fd = None

    def remove(self) -> bool:
        """Close and rmdir it; False while processes are still in it."""
        self.close()
        try:
            self.path.rmdir()
        except FileNotFoundError:
            return True
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                return False
            raise
        return True


@dataclass(frozen=True)
class CgroupStats:
    cpu_seconds: float | None
    memory_bytes: int | None
    oom_kills: int | None  # None: no memory controller (the OOM kill is then a guess)


def _read_or_empty(path: Path | str) -> dict[str, int]:
    try:
        return read_keyed(path)
    except OSError:
        return {}


# -- supd's tree -------------------------------------------------------------------------


@dataclass(frozen=True)
class Leftover:
    """A process found in a cgroup that a dead supd left behind."""

    cgroup: str
    pid: int
    command: str


def tree_root(hierarchy: Hierarchy, instance: str) -> Path:
    """ROOT: supd's own cgroup, or `supd-<hash of instance>` when supd is at the root."""
    if not hierarchy.at_root:
        return hierarchy.own
    digest = hashlib.sha256(instance.encode()).hexdigest()[:12]
    return hierarchy.own / f"supd-{digest}"


@dataclass
class CgroupTree:
    root: Path
    controllers: frozenset[str] = field(default_factory=frozenset)  # enabled for programs
    # Where supd was before setup, when it made ROOT itself (supd at the hierarchy's
    # root): it goes back there and removes the tree on a clean exit.
    origin: Path | None = None

    @property
    def programs(self) -> Path:
        return self.root / "programs"

    @classmethod
    def setup(cls, hierarchy: Hierarchy, instance: str) -> CgroupTree:
        """Create the tree and move supd into ROOT/daemon; CgroupUnavailable if not allowed.

        `instance` names the tree when supd sits at the hierarchy's root (the config
        file's path: the same config finds the same tree after a crash).
        """
        root = tree_root(hierarchy, instance)
        origin = hierarchy.own if hierarchy.at_root else None
        if hierarchy.own.name == "daemon" and (hierarchy.own.parent / "programs").is_dir():
            # Already in ROOT/daemon: the same supd after a re-exec takes its tree over.
            root = hierarchy.own.parent
            above = Hierarchy(hierarchy.mount, root.parent)
            origin = root.parent if tree_root(above, instance) == root else None
        try:
            root.mkdir(exist_ok=True)
            (root / "daemon").mkdir(exist_ok=True)
            (root / "programs").mkdir(exist_ok=True)
            _write(root / "daemon" / "cgroup.procs", str(os.getpid()))
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise CgroupUnavailable(f"cannot manage cgroups under {root}: {reason}") from None
        tree = cls(root, origin=origin)
        tree.controllers = frozenset(tree._enable_controllers())
        return tree

    def _enable_controllers(self) -> set[str]:
        """Give programs the controllers their limits need, where the parent has them."""
        enabled: set[str] = set()
        available = (self.root / "cgroup.controllers").read_text().split()
        wanted = [c for c in ("cpu", "memory", "pids") if c in available]
        for folder in (self.root, self.programs):
            for controller in wanted:
                with contextlib.suppress(OSError):
                    _write(folder / "cgroup.subtree_control", f"+{controller}")
        with contextlib.suppress(OSError):
            enabled = set((self.programs / "cgroup.subtree_control").read_text().split())
        return enabled

    def process(self, process_name: str) -> ProcessCgroup:
        path = self.programs / cgroup_name(process_name)
        path.mkdir(exist_ok=True)
        return ProcessCgroup(path)

    def leftovers(self) -> list[Leftover]:
        """Processes in the programs' cgroups: a dead supd's, before this one starts any."""
        found = []
        for folder in self._program_folders():
            for pid in read_pids(folder):
                found.append(Leftover(folder.name, pid, _command_line(pid)))
        return found

    def kill_leftovers(
        self, timeout: float = 5.0, keep: frozenset[str] | set[str] = frozenset()
    ) -> list[Leftover]:
        """Kill what `leftovers()` finds and wait (bounded) until they are gone.

        Start-up only, before the loop runs: the ports they hold must be free before the
        programs start again. Returns what was killed. `keep`: cgroup names left alone
        (processes whose program says leftovers = "keep").
        """
        killed = [found for found in self.leftovers() if found.cgroup not in keep]
        folders = [f for f in self._program_folders() if f.name not in keep]
        for folder in folders:
            ProcessCgroup(folder).kill()
        for folder in folders:
            wait_empty(ProcessCgroup(folder), timeout)
            with contextlib.suppress(OSError):
                folder.rmdir()
        return killed

    def teardown(self) -> None:
        """On a clean exit: remove the empty program cgroups; if supd made ROOT, move
        back to where it was and remove ROOT (kept while a kept leftover lives in it)."""
        for folder in self._program_folders():
            with contextlib.suppress(OSError):
                folder.rmdir()
        if self.origin is None:
            return
        _write(self.origin / "cgroup.procs", str(os.getpid()))
        for folder in (self.root / "daemon", self.programs, self.root):
            with contextlib.suppress(OSError):
                folder.rmdir()

    def _program_folders(self) -> Iterator[Path]:
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.programs):
                if entry.is_dir(follow_symlinks=False):
                    yield Path(entry.path)


def remove_tree(config_path: str) -> None:
    """Kill and remove the tree a SIGKILLed supd on `config_path` left (test and
    benchmark teardown; a new supd on that config would do the same at its start).

    Only a tree supd made itself (`supd-<hash>`, supd at the hierarchy's root): a
    delegated cgroup is its owner's (systemd's) to remove.
    """
    hierarchy = detect()
    if hierarchy is None or not hierarchy.at_root:
        return
    root = tree_root(hierarchy, os.path.realpath(config_path))
    if not root.is_dir():
        return
    for folder in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if folder.is_dir():
            cgroup = ProcessCgroup(folder)
            cgroup.kill()
            wait_empty(cgroup, 5)
            with contextlib.suppress(OSError):
                folder.rmdir()
    with contextlib.suppress(OSError):
        root.rmdir()


def wait_empty(cgroup: ProcessCgroup, timeout: float) -> bool:
    """Block (start-up only) until the cgroup is empty or `timeout` passes."""
    try:
        fd = os.open(cgroup.path / "cgroup.events", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    try:
        poller = select.poll()
        poller.register(fd, select.POLLPRI)
        deadline = time.monotonic() + timeout
        while True:
            data = os.pread(fd, 4096, 0).decode()
            if "populated 0" in data.splitlines():
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            poller.poll(left * 1000)
    finally:
        os.close(fd)


def _command_line(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace") or "?"
