"""The two supervisors under test, behind one interface: write a config for a list of
programs, launch, ask for status over the raw control socket, start a program.

The raw clients are deliberately minimal (a fresh connection per call, the bytes of
one request, the complete answer) so that their own cost stays out of the figures:

- supd: one JSON-RPC 2.0 line over its unix socket (docs/protocol.md).
- supervisord: an XML-RPC POST to /RPC2 over its unix socket, as supervisorctl does.
"""

from __future__ import annotations

import http.client
import json
import shlex
import socket
import subprocess
import sys
import xmlrpc.client
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from benchmarks.procs import Processes

SUPERVISOR_VERSION = "4.3.0"


@dataclass(frozen=True)
class Program:
    """One supervised program: the options both daemons share, in supd's terms."""

    name: str
    argv: list[str]
    autostart: bool = True
    restart: bool = True  # supd autorestart = "always", supervisord autorestart = true
    stdout_logfile: Path | None = None  # None: the daemon's default place
    stdout_maxbytes: int | None = None  # 0 never rotates; None: the daemon's default
    supd_only: tuple[str, ...] = ()  # extra TOML lines for supd (health checks, ...)


class Daemon(Protocol):
    kind: str
    config_path: Path

    def write_config(self, programs: list[Program]) -> None: ...
    def launch(self, processes: Processes, env: dict[str, str]) -> subprocess.Popen[bytes]: ...
    def states(self) -> dict[str, str]:
        """Process name -> state name; OSError while the daemon does not answer."""
        ...

    def status_round_trip(self) -> bytes:
        """One raw status call; returns the undecoded answer."""
        ...

    def start(self, name: str) -> None: ...
    def ctl_status_argv(self) -> list[str]: ...


def _connect_unix(path: Path, timeout_s: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        raise
    return sock


def _toml(value: object) -> str:
    # JSON strings, numbers, booleans and arrays of them are valid TOML.
    return json.dumps(value)


class Supd:
    kind = "supd"

    def __init__(self, workdir: Path, timeout_s: float = 30.0, cgroups: str = "auto") -> None:
        self.workdir = workdir
        self.cgroups = cgroups
        self.config_path = workdir / "supd.toml"
        self.socket_path = workdir / "supd.sock"
        self.metrics_path = workdir / "metrics.sock"
        self.timeout_s = timeout_s
        self._next_id = 0

    def write_config(self, programs: list[Program]) -> None:
        lines = [
            "[supervisor]",
            f"socket = {_toml(str(self.socket_path))}",
            f"log_dir = {_toml(str(self.workdir / 'logs'))}",
            'log_level = "warning"',
            'log_format = "json"',
            f"cgroups = {_toml(self.cgroups)}",
            f"metrics = {_toml(str(self.metrics_path))}",
        ]
        for program in programs:
            lines += [
                "",
                f"[programs.{program.name}]",
                f"command = {_toml(program.argv)}",
                f"autostart = {_toml(program.autostart)}",
                f'autorestart = "{"always" if program.restart else "never"}"',
                "startsecs = 0",
                "backoff_initial = 0",
                "restart_window = 0",  # restart forever: no crash-loop FATAL (issue 15)
            ]
            if program.stdout_logfile is not None:
                lines.append(f"stdout_logfile = {_toml(str(program.stdout_logfile))}")
            if program.stdout_maxbytes is not None:
                lines.append(f"stdout_logfile_maxbytes = {program.stdout_maxbytes}")
            lines += program.supd_only
        (self.workdir / "logs").mkdir(exist_ok=True)
        self.config_path.write_text("\n".join(lines) + "\n")

    def launch(self, processes: Processes, env: dict[str, str]) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "supd", "-c", str(self.config_path)]
        return processes.start(argv, env=env, output=self.workdir / "daemon.log", cwd=self.workdir)

    def _call(self, method: str, params: dict[str, Any]) -> bytes:
        self._next_id += 1
        request = {"jsonrpc": "2.0", "id": self._next_id, "method": method, "params": params}
        with _connect_unix(self.socket_path, self.timeout_s) as sock:
            sock.sendall(json.dumps(request).encode() + b"\n")
            chunks: list[bytes] = []
            while not chunks or not chunks[-1].endswith(b"\n"):
                chunk = sock.recv(1 << 20)
                if not chunk:
                    raise ConnectionError("supd closed the connection mid-answer")
                chunks.append(chunk)
        return b"".join(chunks)

    def _result(self, answer: bytes) -> Any:
        message = json.loads(answer)
        if "error" in message:
            raise RuntimeError(f"supd answered an error: {message['error']}")
        return message["result"]

    def status_round_trip(self) -> bytes:
        return self._call("status", {})

    def scrape(self) -> bytes:
        """GET /metrics, as Prometheus would (over the unix socket of `metrics`)."""
        connection = _UnixHTTPConnection(self.metrics_path, self.timeout_s)
        try:
            connection.request("GET", "/metrics")
            answer = connection.getresponse()
            body = answer.read()
        finally:
            connection.close()
        if answer.status != 200 or not body.endswith(b"# EOF\n"):
            raise RuntimeError(f"GET /metrics answered {answer.status}")
        return body

    def call(self, method: str, params: dict[str, Any]) -> Any:
        """One call's result (RuntimeError for an error answer)."""
        return self._result(self._call(method, params))

    def states(self) -> dict[str, str]:
        return {row["name"]: row["state"] for row in self._result(self.status_round_trip())}

    def start(self, name: str) -> None:
        self._result(self._call("start", {"names": [name], "wait": False}))

    def pids(self) -> dict[str, int | None]:
        return {row["name"]: row["pid"] for row in self._result(self.status_round_trip())}

    def reexec(self) -> None:
        """Ask for a re-exec; the answer comes just before the execve."""
        self._result(self._call("reexec", {}))

    def generation(self) -> int:
        return int(self._result(self._call("version", {}))["generation"])

    def ctl_status_argv(self) -> list[str]:
        supctl = Path(sys.executable).with_name("supctl")
        command = [str(supctl)] if supctl.exists() else [sys.executable, "-m", "supd.ctl"]
        return [*command, "-s", str(self.socket_path), "status"]


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout_s: float) -> None:
        super().__init__("localhost", timeout=timeout_s)
        self.path = path

    def connect(self) -> None:
        self.sock = _connect_unix(self.path, self.timeout or 30.0)


class Supervisord:
    kind = "supervisord"

    def __init__(self, workdir: Path, venv: Path, timeout_s: float = 30.0) -> None:
        self.workdir = workdir
        self.venv = venv
        self.config_path = workdir / "supervisord.conf"
        self.socket_path = workdir / "supervisord.sock"
        self.timeout_s = timeout_s

    def write_config(self, programs: list[Program]) -> None:
        # supervisord closes every fd below minfds in each child before exec, so minfds is
        # kept to what the programs need (about five fds each: three pipes, two logs),
        # as an operator would set it.
        minfds = max(1024, 8 * len(programs) + 256)
        logs = self.workdir / "logs"
        logs.mkdir(exist_ok=True)
        lines = [
            "[unix_http_server]",
            f"file={self.socket_path}",
            "chmod=0700",
            "",
            "[supervisord]",
            "nodaemon=true",
            f"logfile={self.workdir / 'supervisord.log'}",
            "logfile_maxbytes=0",
            f"pidfile={self.workdir / 'supervisord.pid'}",
            f"childlogdir={logs}",
            "loglevel=warn",
            f"minfds={minfds}",
            f"minprocs={max(200, 2 * len(programs))}",
            "",
            "[rpcinterface:supervisor]",
            "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
            "",
            "[supervisorctl]",
            f"serverurl=unix://{self.socket_path}",
        ]
        for program in programs:
            lines += [
                "",
                f"[program:{program.name}]",
                f"command={shlex.join(program.argv)}",
                f"autostart={str(program.autostart).lower()}",
                f"autorestart={str(program.restart).lower()}",
                "startsecs=0",
            ]
            if program.stdout_logfile is not None:
                lines.append(f"stdout_logfile={program.stdout_logfile}")
            if program.stdout_maxbytes is not None:
                lines.append(f"stdout_logfile_maxbytes={program.stdout_maxbytes}")
        self.config_path.write_text("\n".join(lines) + "\n")

    def launch(self, processes: Processes, env: dict[str, str]) -> subprocess.Popen[bytes]:
        argv = [str(self.venv / "bin" / "supervisord"), "-n", "-c", str(self.config_path)]
        return processes.start(argv, env=env, output=self.workdir / "daemon.log", cwd=self.workdir)

    def _post(self, method: str, params: tuple[Any, ...]) -> bytes:
        body = xmlrpc.client.dumps(params, method).encode()
        connection = _UnixHTTPConnection(self.socket_path, self.timeout_s)
        try:
            connection.request("POST", "/RPC2", body, {"Content-Type": "text/xml"})
            response = connection.getresponse()
            answer = response.read()
            if response.status != 200:
                raise RuntimeError(f"supervisord answered HTTP {response.status}")
            return answer
        finally:
            connection.close()

    def _result(self, answer: bytes) -> Any:
        (result,), _method = xmlrpc.client.loads(answer)
        return result

    def status_round_trip(self) -> bytes:
        return self._post("supervisor.getAllProcessInfo", ())

    def states(self) -> dict[str, str]:
        rows = self._result(self.status_round_trip())
        return {row["name"]: row["statename"] for row in rows}

    def start(self, name: str) -> None:
        self._result(self._post("supervisor.startProcess", (name, False)))

    def ctl_status_argv(self) -> list[str]:
        return [str(self.venv / "bin" / "supervisorctl"), "-c", str(self.config_path), "status"]
