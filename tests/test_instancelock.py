"""One supd per config file (supervisor/instancelock.py): a second supd on the same
config exits at once with a clear message and status 2, whatever socket it would use;
the lock goes with the daemon, however it exits."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from supd.instancelock import AlreadyLocked, InstanceLock, lock_path_for
from tests.helpers import PY, SLEEP, Supd, remove_cgroup_tree, source_pythonpath, wait_until

Factory = Callable[..., Supd]

CONFIG = f"""
[supervisor]
log_format = "json"

[programs.only]
command = {SLEEP}
startsecs = 0
"""


def run_supd(config: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "supd", "-c", str(config)],
        capture_output=True,
        text=True,
        env={**env, "PYTHONPATH": source_pythonpath()},
        timeout=30,
        stdin=subprocess.DEVNULL,
    )


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RUNTIME_DIRECTORY"}
    return {**env, **extra}


def test_second_supd_on_the_same_config_refuses_even_with_another_socket(
    supd: Factory, tmp_path: Path
) -> None:
    first = supd(CONFIG, env=environment())
    only = first.wait_state("only", "RUNNING")["pid"]
    # As started by systemd: the default socket would be $RUNTIME_DIRECTORY/supd.sock,
    # not the first one's supd.sock beside the config.
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    second = run_supd(first.config_path, environment(RUNTIME_DIRECTORY=str(runtime)))
    assert second.returncode == 2, second
    assert "another supd is already running on" in second.stderr
    assert f"pid {first.pid}" in second.stderr
    assert str(first.config_path) in second.stderr
    assert list(runtime.iterdir()) == []  # it bound nothing
    assert first.status()["only"]["pid"] == only  # and started nothing
    assert first.proc is not None and first.proc.poll() is None


def test_the_same_config_through_a_symlink_is_the_same_config(
    supd: Factory, tmp_path: Path
) -> None:
    first = supd(CONFIG, env=environment())
    first.wait_state("only", "RUNNING")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "supd.toml").symlink_to(first.config_path)
    second = run_supd(elsewhere / "supd.toml", environment())
    assert second.returncode == 2 and "already running" in second.stderr, second


def test_another_config_in_the_same_folder_runs(supd: Factory, tmp_path: Path) -> None:
    first = supd(CONFIG, env=environment())
    other = tmp_path / "other.toml"
    other.write_text('[supervisor]\nsocket = "other.sock"\n')
    proc = subprocess.Popen(
        [PY, "-m", "supd", "-c", str(other)],
        env={**environment(), "PYTHONPATH": source_pythonpath()},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until((tmp_path / "other.sock").exists, describe="the other supd listening")
        assert proc.poll() is None
        assert first.proc is not None and first.proc.poll() is None
    finally:
        proc.kill()
        proc.wait()
        remove_cgroup_tree(other)  # what the SIGKILLed supd leaves where it uses cgroups


def test_the_lock_goes_with_the_daemon_even_on_sigkill(supd: Factory) -> None:
    first = supd(CONFIG, env=environment())
    only = first.wait_state("only", "RUNNING")["pid"]
    first.track(only)
    first.signal(signal.SIGKILL)
    first.wait_exit()
    # The orphaned program does not hold it (close-on-exec): a new supd gets in.
    second = supd(CONFIG, env=environment())
    second.wait_state("only", "RUNNING")
    assert lock_path_for(second.config_path).read_text() == f"{second.pid}\n"


def test_lock_file_beside_the_config_holds_the_pid(tmp_path: Path) -> None:
    config = tmp_path / "supd.toml"
    config.write_text("")
    lock = InstanceLock.acquire(config)
    try:
        assert lock.path == tmp_path / ".supd.toml.lock"
        assert lock.path.read_text() == f"{os.getpid()}\n"
        # flock locks are per open file: a second open in this very process conflicts.
        try:
            InstanceLock.acquire(config)
        except AlreadyLocked as exc:
            assert exc.pid == os.getpid()
        else:
            raise AssertionError("the second acquire got the lock")
    finally:
        lock.release()
    assert not lock.held
    InstanceLock.acquire(config).release()  # free again


def test_a_read_only_folder_locks_the_config_itself() -> None:
    """As a user who may not write the config's folder: the config file is the lock."""
    # pytest's tmp_path is under a 0700 folder `nobody` cannot reach: a folder of our own.
    top = Path(tempfile.mkdtemp(prefix="supd-test-", dir="/tmp"))
    try:
        top.chmod(0o755)
        folder = top / "etc"
        folder.mkdir()
        config = folder / "supd.toml"
        config.write_text("")
        config.chmod(0o644)
        folder.chmod(0o555)
        code = (
            "from supd.instancelock import InstanceLock\n"
            f"lock = InstanceLock.acquire({str(config)!r}); print(lock.path)"
        )
        become: list[str] = []
        if os.geteuid() == 0:  # root may write anywhere: run this as nobody
            become = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
        proc = subprocess.run(
            [*become, PY, "-c", code],
            capture_output=True,
            text=True,
            env={**environment(), "PYTHONPATH": source_pythonpath()},
            timeout=30,
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == str(config)
        assert not (folder / ".supd.toml.lock").exists()
        if os.geteuid() == 0:
            # A lock file root made and holds: nobody cannot write it, but sees the lock.
            folder.chmod(0o755)
            held = InstanceLock.acquire(config)
            try:
                assert held.path == folder / ".supd.toml.lock"
                proc = subprocess.run(
                    [*become, PY, "-c", code],
                    capture_output=True,
                    text=True,
                    env={**environment(), "PYTHONPATH": source_pythonpath()},
                    timeout=30,
                )
                assert proc.returncode != 0
                assert f"already running on {config} (pid {os.getpid()};" in proc.stderr
            finally:
                held.release()
    finally:
        shutil.rmtree(top, ignore_errors=True)
