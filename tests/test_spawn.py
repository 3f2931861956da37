"""spawn.py directly: both spawn paths, the parent's state restored, errors reported."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from supd import spawn
from tests.helpers import wait_until


@pytest.fixture
def children() -> Iterator[list[spawn.Child]]:
    started: list[spawn.Child] = []
    yield started
    for child in started:
        for fd in (child.stdout_fd, child.stderr_fd, child.exec_error_fd):
            if fd is not None:
                os.close(fd)
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(child.pid, 0)


def read_all(fd: int) -> bytes:
    os.set_blocking(fd, True)
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def spec(argv: list[str], **options: object) -> spawn.SpawnSpec:
    env = spawn.child_environment(os.environ)
    return spawn.SpawnSpec(argv=argv, environment=env, **options)  # type: ignore[arg-type]


def test_directory_and_umask_apply_to_the_child_and_the_parent_is_restored(
    children: list[spawn.Child], tmp_path: Path
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    before = (os.getcwd(), os.umask(0o022))
    os.umask(before[1])
    child = spawn.spawn(spec(["sh", "-c", "pwd; umask"], directory=work, umask=0o077))
    children.append(child)
    assert child.stdout_fd is not None
    assert read_all(child.stdout_fd).split() == [str(work).encode(), b"0077"]
    after_umask = os.umask(0o022)
    os.umask(after_umask)
    assert (os.getcwd(), after_umask) == before


def test_spawning_works_when_the_daemons_own_folder_was_deleted(
    children: list[spawn.Child], tmp_path: Path
) -> None:
    home = os.getcwd()
    doomed = tmp_path / "doomed"
    doomed.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    os.chdir(doomed)
    try:
        doomed.rmdir()
        child = spawn.spawn(spec(["pwd"], directory=work))
        children.append(child)
        assert child.stdout_fd is not None
        assert read_all(child.stdout_fd).strip() == str(work).encode()
    finally:
        os.chdir(home)


def test_missing_program_and_directory_are_spawn_errors(tmp_path: Path) -> None:
    with pytest.raises(spawn.SpawnError, match="No such file or directory: no-such-prog"):
        spawn.spawn(spec(["no-such-prog"]))
    with pytest.raises(spawn.SpawnError, match="No such directory"):
        spawn.spawn(spec(["true"], directory=tmp_path / "missing"))
    with pytest.raises(spawn.SpawnError, match="unknown user"):
        spawn.spawn(spec(["true"], user="no-such-user-supd"))


def test_reap_returns_code_or_signal(children: list[spawn.Child]) -> None:
    exits = spawn.spawn(spec(["sh", "-c", "exit 3"]))
    killed = spawn.spawn(spec(["sleep", "100"]))
    children += [exits, killed]
    os.kill(killed.pid, signal.SIGKILL)
    wait_until(lambda: os.waitid(os.P_PID, exits.pid, os.WEXITED | os.WNOWAIT))
    assert spawn.reap(exits.pid) == (3, None)
    assert spawn.reap(killed.pid) == (None, signal.SIGKILL)


@pytest.mark.skipif(os.geteuid() != 0, reason="user = root forces the fork path")
def test_fork_path_reports_a_failed_exec(children: list[spawn.Child], tmp_path: Path) -> None:
    script = tmp_path / "script"
    script.write_text("#!/no/such/interpreter\n")
    script.chmod(0o755)
    child = spawn.spawn(spec([str(script)], user="root"))
    children.append(child)
    assert child.exec_error_fd is not None
    os.set_blocking(child.exec_error_fd, True)
    error = child.read_exec_error()
    assert error is not None and "No such file or directory" in error
    assert child.exec_error_fd is None
