"""cgroups.py against the real cgroup v2 hierarchy (skipped, with the reason, without one).

Each test works in a cgroup of its own under a scratch folder, removed at teardown; the
test process itself never moves (only children spawned into the test's cgroups do).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from supd import cgroups, clonespawn, spawn
from supd.selector import Event, Selector
from tests.helpers import pid_alive, wait_until

HYBRID_MOUNTS = """\
sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
"""
UNIFIED_MOUNTS = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime 0 0\n"
HYBRID_CGROUP = "4:memory:/user.slice\n1:name=systemd:/system.slice/supd.service\n0::/\n"
SERVICE_CGROUP = "0::/system.slice/supd.service\n"


def test_the_hierarchy_is_found_from_mounts_and_proc_cgroup() -> None:
    hybrid = cgroups.find_hierarchy(HYBRID_MOUNTS, HYBRID_CGROUP)
    assert hybrid == cgroups.Hierarchy(
        Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup/unified")
    )
    assert hybrid.at_root
    service = cgroups.find_hierarchy(UNIFIED_MOUNTS, SERVICE_CGROUP)
    assert service is not None and not service.at_root
    assert service.own == Path("/sys/fs/cgroup/system.slice/supd.service")
    assert cgroups.find_hierarchy("proc /proc proc rw 0 0\n", SERVICE_CGROUP) is None
    assert cgroups.find_hierarchy(UNIFIED_MOUNTS, "1:name=systemd:/\n") is None


def test_keyed_files_are_parsed(tmp_path: Path) -> None:
    stat = tmp_path / "cpu.stat"
    stat.write_text("usage_usec 1500000\nuser_usec 1000000\nsystem_usec 500000\n")
    events = tmp_path / "memory.events"
    events.write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\noom_group_kill 0\n")
    (tmp_path / "memory.current").write_text("4096\n")
    stats = cgroups.ProcessCgroup(tmp_path).stats()
    assert stats == cgroups.CgroupStats(cpu_seconds=1.5, memory_bytes=4096, oom_kills=1)
    assert cgroups.ProcessCgroup(tmp_path / "none").stats() == cgroups.CgroupStats(None, None, None)


# -- the real hierarchy ---------------------------------------------------------------


def _writable_hierarchy() -> cgroups.Hierarchy | None:
    found = cgroups.detect()
    if found is None or not os.access(found.own, os.W_OK):
        return None
    return found


HIERARCHY = _writable_hierarchy()
needs_cgroups = pytest.mark.skipif(
    HIERARCHY is None, reason="no writable cgroup v2 hierarchy (needs root and cgroup2)"
)


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A cgroup of this test's own; everything in it is killed and removed at the end."""
    assert HIERARCHY is not None
    root = HIERARCHY.own / f"supd-test-{os.getpid()}-{time.monotonic_ns()}"
    root.mkdir()
    yield root
    for folder in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if folder.is_dir():
            cgroup = cgroups.ProcessCgroup(folder)
            cgroup.kill()
            cgroups.wait_empty(cgroup, 5)
            folder.rmdir()
    root.rmdir()


def spawn_into(cgroup: cgroups.ProcessCgroup, argv: list[str]) -> int:
    """A child (its stdout to /dev/null) that joins `cgroup` before it execs."""
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    folder = cgroup.open_dir()
    try:
        if clonespawn.available():
            return clonespawn.spawn(
                argv[0], argv, dict(os.environ), (devnull, devnull, devnull),
                cgroup_fd=folder, pdeathsig=signal.SIGTERM,
            )  # fmt: skip
        pid = os.posix_spawn(argv[0], argv, os.environ, setsid=True, setsigmask=())
        cgroup.add(pid)
        return pid
    finally:
        os.close(folder)
        os.close(devnull)


def reap_quietly(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


# Leaves a background sleep, a setsid'd grandchild and a double-forked daemon behind.
ESCAPER = "sleep 100001 & setsid sleep 100002 & ( ( sleep 100003 & ) & ) ; exec sleep 100004"


def escapees() -> list[int]:
    """The pids of ESCAPER's sleeps, wherever they went."""
    out = subprocess.run(["pgrep", "-f", "^sleep 10000[1-4]$"], capture_output=True, text=True)
    return [int(pid) for pid in out.stdout.split()]


@needs_cgroups
def test_kill_leaves_nothing_of_a_process_tree(scratch: Path) -> None:
    cgroup = cgroups.ProcessCgroup(scratch / "web:0")
    cgroup.path.mkdir()
    main = spawn_into(cgroup, ["/bin/sh", "-c", ESCAPER])
    try:
        wait_until(lambda: len(cgroup.pids()) == 4, describe=lambda: f"{cgroup.pids()}")
        assert set(escapees()) <= set(cgroup.pids())
        assert cgroup.populated()
        cgroup.kill()
        assert cgroups.wait_empty(cgroup, 5)
        assert not cgroup.populated()
        assert escapees() == []
        assert cgroup.remove()
    finally:
        cgroup.kill()
        reap_quietly(main)


@needs_cgroups
@pytest.mark.skipif(not clonespawn.available(), reason="the C spawner was not built")
def test_the_c_spawner_puts_the_child_in_its_cgroup_before_exec(scratch: Path) -> None:
    cgroup = cgroups.ProcessCgroup(scratch / "one")
    cgroup.path.mkdir()
    pid = spawn_into(cgroup, ["/bin/sleep", "1000"])
    try:
        # Already there when spawn returned: the child joined before its exec.
        assert cgroup.pids() == [pid]
        # On x86-64 with Linux 5.7+, born there (clone3 CLONE_INTO_CGROUP): no migration,
        # which costs an RCU grace period (~10 ms) when none happened just before.
        release = tuple(int(x) for x in os.uname().release.split(".")[:2] if x.isdigit())
        if os.uname().machine == "x86_64" and release >= (5, 7):
            assert clonespawn.last_into_cgroup
        line = Path(f"/proc/{pid}/cgroup").read_text().splitlines()[-1]
        assert line.endswith(f"{scratch.name}/one")
    finally:
        os.kill(pid, signal.SIGKILL)
        reap_quietly(pid)


@needs_cgroups
def test_cgroup_events_wake_the_selector_when_the_cgroup_empties(scratch: Path) -> None:
    """No timer, no polling: EPOLLPRI on cgroup.events is the whole mechanism."""
    cgroup = cgroups.ProcessCgroup(scratch / "watched")
    cgroup.path.mkdir()
    main = spawn_into(cgroup, ["/bin/sh", "-c", "sleep 1000 & exec sleep 1000"])
    selector: Selector[Any] = Selector()
    try:
        wait_until(lambda: len(cgroup.pids()) == 2)
        fd = cgroup.open_events()
        assert cgroup.populated()  # reading clears any change seen so far
        selector.register_handle(fd, Event.PRIORITY, "events")
        assert selector.select(0) == []  # nothing changed: no wake-up
        for pid in cgroup.pids():
            os.kill(pid, signal.SIGKILL)
        keys = selector.select(5000)
        assert [(key.data, key.events) for key in keys] == [("events", Event.PRIORITY)]
        wait_until(lambda: not cgroup.populated())
        assert selector.select(0) == []  # read: the event is cleared
    finally:
        selector.close()
        cgroup.kill()
        cgroup.close()
        reap_quietly(main)


@needs_cgroups
def test_leftovers_of_a_dead_supd_are_found_and_killed(scratch: Path) -> None:
    tree = cgroups.CgroupTree(scratch)
    tree.programs.mkdir()
    web = tree.process("web:0")
    worker = tree.process("worker")
    pids = [spawn_into(web, ["/bin/sleep", "1000"]), spawn_into(worker, ["/bin/sleep", "1000"])]
    try:
        for pid in pids:  # exec'd, and its command line is in place
            wait_until(lambda pid=pid: Path(f"/proc/{pid}/cmdline").read_bytes())
        found = tree.leftovers()
        assert sorted((f.cgroup, f.pid, f.command) for f in found) == sorted(
            [("web:0", pids[0], "/bin/sleep 1000"), ("worker", pids[1], "/bin/sleep 1000")]
        )
        killed = tree.kill_leftovers()
        assert {k.pid for k in killed} == set(pids)
        for pid in pids:
            reap_quietly(pid)
            assert not pid_alive(pid)
        assert tree.leftovers() == []
        assert list(tree.programs.iterdir()) == [] or all(
            not p.is_dir() for p in tree.programs.iterdir()
        )
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            reap_quietly(pid)


@needs_cgroups
def test_limits_report_controllers_that_are_not_enabled(scratch: Path) -> None:
    cgroup = cgroups.ProcessCgroup(scratch / "limited")
    cgroup.path.mkdir()
    controllers = set((scratch / "cgroup.controllers").read_text().split())
    problems = cgroup.set_limits({"memory_max": "64M", "pids_max": "10"})
    for option, controller in (("memory_max", "memory"), ("pids_max", "pids")):
        mentioned = any(p.startswith(option) for p in problems)
        assert mentioned == (controller not in controllers), problems


@needs_cgroups
def test_setup_moves_supd_into_a_leaf_of_its_own_tree(tmp_path: Path) -> None:
    """In a child process (the test must not move itself): ROOT/daemon holds supd."""
    code = (
        "import sys; from supd import cgroups;"
        "tree = cgroups.CgroupTree.setup(cgroups.detect(), sys.argv[1]);"
        "print(tree.root); print(open('/proc/self/cgroup').read().splitlines()[-1])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "supd.toml")],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    root_text, line = done.stdout.split("\n")[:2]
    root = Path(root_text)
    try:
        assert root.name.startswith("supd-")
        assert line.endswith(f"/{root.name}/daemon")
        assert (root / "programs").is_dir()
    finally:
        for folder in (root / "programs", root / "daemon", root):
            with contextlib.suppress(OSError):
                folder.rmdir()


def test_spawn_methods_are_listed() -> None:
    assert spawn.method() in spawn.METHODS
