"""Shared test helpers: waiting with deadlines, child programs, and a real supd instance."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


def source_pythonpath() -> str:
    """A PYTHONPATH under which `import supd` finds this checkout's supervisor/ folder.

    The venv's editable install maps the import name `supd` to supervisor/; an
    interpreter outside the venv (the system python running as `nobody`) needs this
    instead: a folder holding a `supd` symlink (in build/, which git ignores).
    """
    folder = REPO / "build" / "pythonpath"
    link = folder / "supd"
    if not link.is_symlink():
        folder.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            link.symlink_to(REPO / "supervisor")
    return str(folder)


def wait_until(
    predicate: Callable[[], T], timeout: float = 10.0, describe: str | Callable[[], str] = ""
) -> T:
    """Poll `predicate` until it returns something truthy; fail with what was seen."""
    deadline = time.monotonic() + timeout
    delay = 0.002
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            what = describe() if callable(describe) else describe
            raise AssertionError(f"timed out after {timeout}s waiting for: {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def python_command(code: str) -> list[str]:
    """argv for a child running `code` (dedented) with this interpreter, unbuffered."""
    return [PY, "-u", "-c", textwrap.dedent(code)]


def toml_list(argv: list[str]) -> str:
    return json.dumps(argv)


def cmd(code: str) -> str:
    """A TOML `command` value: argv running `code` in Python."""
    return toml_list(python_command(code))


SLEEP = cmd("import time; time.sleep(1000)")  # a program that runs until stopped


def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # gone, or going while we read
        return False


def kill_quietly(pid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def children_of(pid: int) -> list[int]:
    """The pids of `pid`'s children (from /proc; [] once it is gone)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return []
    children: list[int] = []
    for task in tasks:
        with contextlib.suppress(FileNotFoundError):
            children += map(int, Path(f"/proc/{pid}/task/{task}/children").read_text().split())
    return children


def checkers_of(pid: int) -> list[int]:
    """The config checkers (`supd --check --emit-json`) `pid` is running now."""
    from supd import configcheck

    found = []
    for child in children_of(pid):
        try:
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        if configcheck.EMIT_JSON_ARG.encode() in argv:
            found.append(child)
    return found


class RpcError(Exception):
    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(f"{error.get('code')}: {error.get('message')}")
        self.code = error.get("code")
        self.error = error


def rpc(
    sock_path: Path, method: str, params: dict[str, Any] | None = None, timeout: float = 30.0
) -> Any:
    """One JSON-RPC call over the control socket; returns the result or raises RpcError."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(sock_path))
        request = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params or {}}
        sock.sendall(json.dumps(request).encode() + b"\n")
        buf = b""
        while b"\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("daemon closed the connection")
            buf += chunk
    reply = json.loads(buf.split(b"\n", 1)[0])
    if "error" in reply:
        raise RpcError(reply["error"])
    return reply["result"]


class Supd:
    """A real supd daemon on a config in tmp_path, killed (with its children) at teardown."""

    def __init__(
        self,
        tmp_path: Path,
        config: str,
        env: dict[str, str] | None = None,
        launcher: list[str] | None = None,
    ) -> None:
        self.dir = tmp_path
        # What runs supd; a test may wrap it (prlimit) or run its own module instead.
        self.launcher = launcher or [PY, "-m", "supd"]
        self.config_path = tmp_path / "supd.toml"
        self.log_path = tmp_path / "supd.log"
        self.socket = tmp_path / "supd.sock"
        self.env = env
        self.write_config(config)
        self.proc: subprocess.Popen[bytes] | None = None
        self._children: set[int] = set()

    def write_config(self, config: str) -> None:
        self.config_path.write_text(textwrap.dedent(config))

    def start(self, *extra: str, wait_ready: bool = True) -> Supd:
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONPATH", source_pythonpath())
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.launcher, "-c", str(self.config_path), *extra],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                cwd=self.dir,
            )
        if wait_ready:
            wait_until(
                lambda: self.answers() or self.proc is None or self.proc.poll() is not None,
                describe=self.describe,
            )
            assert self.proc.poll() is None, self.describe()
        return self

    def answers(self) -> bool:
        """Whether a daemon accepts connections on the socket."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            try:
                sock.connect(str(self.socket))
            except OSError:
                return False
        return True

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def describe(self) -> str:
        return "supd log:\n" + (self.log_path.read_text() if self.log_path.exists() else "")

    def events(self, event: str | None = None) -> list[dict[str, Any]]:
        """The daemon's JSON log lines (optionally only those of one event)."""
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and (event is None or record.get("event") == event):
                out.append(record)
        return out

    def rpc(self, method: str, params: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
        return rpc(self.socket, method, params, timeout)

    def status(self) -> dict[str, dict[str, Any]]:
        result = self.rpc("status")
        for entry in result:
            if entry.get("pid"):
                self._children.add(entry["pid"])
        return {entry["name"]: entry for entry in result}

    def state(self, name: str) -> str:
        return str(self.status()[name]["state"])

    def wait_state(self, name: str, *states: str, timeout: float = 10.0) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            entry = self.status().get(name)
            return entry if entry is not None and entry["state"] in states else None

        return wait_until(
            reached, timeout, lambda: f"{name} in {states}: {self.status().get(name)}"
        )

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait_exit(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"supd did not exit\n{self.describe()}") from None

    def track(self, *pids: int) -> None:
        self._children.update(pids)

    def kill(self) -> None:
        """Teardown: SIGKILL supd and every child it has (or reported), then reap supd."""
        if self.proc is not None and self.proc.poll() is None:
            self._children.update(children_of(self.proc.pid))  # even if supd is hung
            kill_quietly(self.proc.pid)
            self.proc.wait()
        for pid in self._children:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            kill_quietly(pid)
        remove_cgroup_tree(self.config_path)


def remove_cgroup_tree(config_path: Path) -> None:
    """What a SIGKILLed supd on `config_path` left in the cgroup hierarchy: killed, removed."""
    from supd import cgroups

    cgroups.remove_tree(str(config_path))
