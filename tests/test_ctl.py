"""supctl: arguments, socket resolution, output, exit codes, against a fake daemon.

The fake daemon is the real ControlServer with tests.test_control's FakeDaemon behind
it, so these tests also cover supctl and the server speaking to each other.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from supd import ctl, facts, protocol, protocol_models
from supd.protocol_models import ProcessInfo
from tests.helpers import source_pythonpath, wait_until
from tests.test_control import SYSTEM_PYTHON, ServerLoop, needs_root, traversable_socket_dir


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SUPD_SOCKET", "RUNTIME_DIRECTORY", "NO_COLOR", "FORCE_COLOR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("COLUMNS", "80")


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[ServerLoop]:
    with ServerLoop(tmp_path / "supd.sock") as loop:
        yield loop
    assert loop.error is None, loop.error


class Ran:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code = code
        self.out = out
        self.err = err

    def json(self) -> Any:
        return json.loads(self.out)


@pytest.fixture
def supctl(capsys: pytest.CaptureFixture[str]) -> Any:
    """`supctl(*argv)` runs main() in-process and returns its exit code and output."""

    def run(*argv: str) -> Ran:
        code = ctl.main(list(argv))
        captured = capsys.readouterr()
        return Ran(code, captured.out, captured.err)

    return run


def supctl_process(*argv: str, home: Path | None = None, **kwargs: Any) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": source_pythonpath()}
    env.pop("SUPD_SOCKET", None)
    if home is not None:
        env["HOME"] = str(home)  # the shell's history file goes there
    return subprocess.Popen(
        [sys.executable, "-m", "supd.ctl", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **kwargs,
    )


def last_params(loop: ServerLoop) -> Any:
    """The params of the last request the fake daemon received."""
    return loop.call(lambda: loop.handler.requests[-1].params)


def set_state(loop: ServerLoop, name: str, state: str, description: str = "") -> None:
    def change() -> None:
        old = loop.handler.processes[name]
        loop.handler.processes[name] = old.model_copy(
            update={"state": protocol.ProcessState(state), "description": description}
        )

    loop.call(change)


# --------------------------------------------------------------------------- constants


def test_supctl_knows_every_method() -> None:
    """One table (facts.COMMAND_METHODS) gives both lists: every method the daemon
    parses has a supctl command, and the commands of supctl's own are the few known."""
    assert set(protocol.METHODS) == set(protocol.SHAPES)
    assert tuple(command for command, _ in facts.COMMAND_METHODS) == ctl.COMMANDS
    assert len(set(ctl.COMMANDS)) == len(ctl.COMMANDS)
    methods = {command: method for command, method in facts.COMMAND_METHODS}
    # `why` is supctl's face of the `deaths` method; supervisorctl's names built on other
    # methods (reread and update on reload, fg on tail), completion, which needs no
    # daemon for its scripts, and help.
    assert methods["why"] == "deaths"
    own = {command for command, method in methods.items() if method is None}
    assert own == {"reread", "update", "fg", "completion", "help"}
    assert all(methods[m] == m for m in protocol.METHODS if m != "deaths")


def test_supctl_imports_neither_pydantic_nor_the_daemon() -> None:
    code = (
        "import sys, supd.ctl; print(sorted(m for m in sys.modules if m.split('.')[0] in"
        " ('pydantic', 'pydantic_core', 'ctypes', 'structlog') or m in"
        " ('supd.protocol', 'supd.selector', 'supd.daemon')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_runs_as_a_module() -> None:
    proc = supctl_process("--help")
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert "interactive shell" in out


# --------------------------------------------------------------------------- arguments


def parse(*argv: str) -> Any:
    return ctl.build_parser().parse_args(list(argv))


def test_parse_control_commands() -> None:
    args = parse("start", "web", "db:1")
    assert (args.command, args.names, args.wait, args.json) == (
        "start",
        ["web", "db:1"],
        True,
        False,
    )
    assert parse("stop", "all", "--no-wait").wait is False
    args = parse("tail", "-f", "-n", "100", "web:0", "stderr")
    assert (args.follow, args.lines, args.name, args.stream) == (True, 100, "web:0", "stderr")
    assert parse("tail", "-c", "100", "web").bytes == 100
    assert parse("tail", "web").stream == "stdout"
    assert (parse("tail", "web").bytes, parse("tail", "web").lines) == (None, None)
    args = parse("signal", "HUP", "web")
    assert (args.signal, args.names) == ("HUP", ["web"])


def test_json_is_accepted_globally_and_per_command() -> None:
    assert parse("--json", "status").json is True
    assert parse("status", "--json").json is True
    assert parse("status").json is False


def test_timeout_option() -> None:
    assert parse("--timeout", "2.5", "status").timeout == 2.5
    assert parse("status").timeout is None


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["tail", "-100", "web"], ["tail", "-n", "100", "web"]),
        (["tail", "-f", "-5", "web", "stderr"], ["tail", "-f", "-n", "5", "web", "stderr"]),
        (
            ["-s", "x.sock", "--json", "tail", "-3", "web"],
            ["-s", "x.sock", "--json", "tail", "-n", "3", "web"],
        ),
        (["--timeout", "5", "tail", "-1", "w"], ["--timeout", "5", "tail", "-n", "1", "w"]),
        (["status", "-100"], ["status", "-100"]),  # only tail has the short form
        (["-s", "tail", "status"], ["-s", "tail", "status"]),
    ],
)
def test_supervisorctl_tail_syntax(argv: list[str], expected: list[str]) -> None:
    assert ctl.supervisorctl_syntax(argv) == expected


def test_tail_counts_lines_or_bytes() -> None:
    assert parse(*ctl.supervisorctl_syntax(["tail", "-100", "web"])).lines == 100
    with pytest.raises(ctl.UsageError, match="not allowed with"):
        parse("tail", "-n", "1", "-c", "2", "web")


def test_help_lists_the_exit_codes(supctl: Any) -> None:
    ran = supctl("--help")
    assert ran.code == 0
    for line in ("4    no daemon", "5    --timeout expired", "3    status"):
        assert line in ran.out


@pytest.mark.parametrize(
    "argv",
    [
        ["start"],
        ["signal", "HUP"],
        ["tail"],
        ["tail", "-n", "-5", "web"],
        ["tail", "web", "both"],
        ["frobnicate"],
        ["tail", "-n", "1", "-c", "1", "web"],
        ["--timeout", "-1", "status"],
        ["status", "--bogus"],
    ],
)
def test_usage_errors_exit_2(supctl: Any, argv: list[str]) -> None:
    ran = supctl(*argv)
    assert ran.code == ctl.EXIT_USAGE == 2
    assert "usage:" in ran.err


def test_help_command(supctl: Any) -> None:
    ran = supctl("help", "tail")
    assert ran.code == 0
    assert "--follow" in ran.out
    assert supctl("help", "nope").code == 2
    assert "status" in supctl("help").out


# --------------------------------------------------------------------------- socket resolution


def write_config(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "supd.toml"
    path.write_text(text)
    return path


def test_socket_resolution_order(tmp_path: Path) -> None:
    config = write_config(tmp_path, '[supervisor]\nsocket = "from-config.sock"\n')
    env = {"SUPD_SOCKET": "/env.sock"}
    assert ctl.resolve_socket("/flag.sock", str(config), env) == "/flag.sock"
    assert ctl.resolve_socket(None, str(config), env) == "/env.sock"
    assert ctl.resolve_socket(None, str(config), {}) == str(tmp_path / "from-config.sock")
    assert ctl.resolve_socket(None, None, {}) == "/run/supd/supd.sock"
    assert ctl.resolve_socket(None, None, {"SUPD_SOCKET": ""}) == "/run/supd/supd.sock"


def test_config_socket_relative_absolute_and_home(tmp_path: Path) -> None:
    nested = write_config(tmp_path / "etc", '[supervisor]\nsocket = "../run/s.sock"\n')
    assert ctl.socket_from_config(str(nested), {}) == str(tmp_path / "run" / "s.sock")
    absolute = write_config(tmp_path / "abs", '[supervisor]\nsocket = "/x/y.sock"\n')
    assert ctl.socket_from_config(str(absolute), {}) == "/x/y.sock"
    home = write_config(tmp_path / "home", '[supervisor]\nsocket = "~/supd.sock"\n')
    assert ctl.socket_from_config(str(home), {}) == str(tmp_path / "home" / "~" / "supd.sock")


def test_config_without_socket_uses_runtime_directory_or_the_config_folder(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path, "[programs.web]\ncommand = ['true']\n")
    assert ctl.socket_from_config(str(config), {}) == str(tmp_path / "supd.sock")
    runtime = {"RUNTIME_DIRECTORY": "/run/supd:/run/other"}
    assert ctl.socket_from_config(str(config), runtime) == "/run/supd/supd.sock"


def test_socket_default_agrees_with_the_daemon_config(tmp_path: Path) -> None:
    """supctl reads the socket key without the pydantic config module; both must agree."""
    config_module = pytest.importorskip("supd.config")
    texts = ('[supervisor]\nsocket = "../run/x.sock"\n', '[supervisor]\nsocket = "~/x"\n', "")
    for text in texts:
        path = write_config(tmp_path / "c", text)
        for environ in (
            {},
            {"RUNTIME_DIRECTORY": str(tmp_path / "rt")},
            {"RUNTIME_DIRECTORY": "rt"},
        ):
            loaded = config_module.load(path, environ=environ)
            # the same rule (facts.socket_path), normalised on both sides
            assert ctl.socket_from_config(str(path), environ) == str(loaded.supervisor.socket)


@pytest.mark.parametrize(
    ("text", "message"),
    [("[supervisor\n", "not valid TOML"), ("[supervisor]\nsocket = 5\n", "must be a path")],
)
def test_bad_config_is_a_usage_error(supctl: Any, tmp_path: Path, text: str, message: str) -> None:
    config = write_config(tmp_path, text)
    ran = supctl("-c", str(config), "status")
    assert ran.code == 2
    assert message in ran.err


def test_missing_config_is_a_usage_error(supctl: Any, tmp_path: Path) -> None:
    ran = supctl("-c", str(tmp_path / "nope.toml"), "status")
    assert ran.code == 2
    assert "nope.toml" in ran.err


def test_env_socket_is_used(supctl: Any, fake: ServerLoop, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUPD_SOCKET", str(fake.path))
    assert supctl("pid").out.strip() == str(os.getpid())


def test_config_socket_is_used(supctl: Any, fake: ServerLoop) -> None:
    config = write_config(fake.path.parent / "conf", '[supervisor]\nsocket = "../supd.sock"\n')
    assert supctl("-c", str(config), "pid").out.strip() == str(os.getpid())


# --------------------------------------------------------------------------- output


ROWS = [
    {"name": "web:0", "state": "RUNNING", "description": "pid 4242, uptime 0:03:10"},
    {"name": "worker-long-name", "state": "FATAL", "description": "", "spawn_error": "ENOENT"},
    {"name": "db", "state": "STOPPED", "description": ""},
]


def test_status_table_is_aligned() -> None:
    lines = ctl.format_status_table(ROWS)
    assert lines == [
        "web:0              RUNNING   pid 4242, uptime 0:03:10",
        "worker-long-name   FATAL     ENOENT",
        "db                 STOPPED",
    ]


def test_status_table_colours_the_state_only() -> None:
    lines = ctl.format_status_table(ROWS, colour=True)
    assert lines[0] == "web:0              \x1b[32mRUNNING\x1b[0m   pid 4242, uptime 0:03:10"
    assert "\x1b[1;31mFATAL\x1b[0m     ENOENT" in lines[1]
    assert lines[2] == "db                 STOPPED"


def test_colour_only_on_a_terminal_without_no_color() -> None:
    class Tty:
        def isatty(self) -> bool:
            return True

    assert ctl.wants_colour(Tty(), {})  # type: ignore[arg-type]
    assert not ctl.wants_colour(Tty(), {"NO_COLOR": "1"})  # type: ignore[arg-type]
    assert not ctl.wants_colour(sys.stdout, {})  # captured: not a terminal


def test_empty_status_table() -> None:
    assert ctl.format_status_table([]) == []


# --------------------------------------------------------------------------- commands


def test_status_all_running_exits_0(supctl: Any, fake: ServerLoop) -> None:
    ran = supctl("-s", str(fake.path), "status")
    assert ran.code == 0
    assert ran.out.splitlines() == [
        "web:0   RUNNING   pid 4242, uptime 0:03:10",
        "web:1   RUNNING   pid 4243, uptime 0:03:10",
    ]
    assert "\x1b[" not in ran.out


def test_status_exits_3_when_a_process_is_not_running(supctl: Any, fake: ServerLoop) -> None:
    set_state(fake, "web:1", "EXITED", "exited 1 at 12:03:44")
    ran = supctl("-s", str(fake.path), "status")
    assert ran.code == ctl.EXIT_NOT_RUNNING == 3
    assert "web:1   EXITED    exited 1 at 12:03:44" in ran.out
    assert supctl("-s", str(fake.path), "status", "web:0").code == 0
    assert supctl("-s", str(fake.path), "status", "web:1").code == 3


def test_status_json(supctl: Any, fake: ServerLoop) -> None:
    ran = supctl("-s", str(fake.path), "status", "--json")
    assert ran.code == 0
    infos = protocol_models.RESULT_ADAPTERS["status"].validate_python(ran.json())
    assert [info.name for info in infos] == ["web:0", "web:1"]
    assert supctl("-s", str(fake.path), "--json", "status").json() == ran.json()


def test_status_of_an_unknown_name_exits_1(supctl: Any, fake: ServerLoop) -> None:
    ran = supctl("-s", str(fake.path), "status", "nope")
    assert ran.code == 1
    assert "no such process" in ran.err


def test_start_reports_each_process(supctl: Any, fake: ServerLoop) -> None:
    ran = supctl("-s", str(fake.path), "start", "web")
    assert ran.code == 0
    assert ran.out.splitlines() == ["web:0: started", "web:1: started"]
    assert last_params(fake).wait is True


def test_start_that_ends_fatal_exits_1(supctl: Any, fake: ServerLoop) -> None:
    fake.call(lambda: fake.handler.failing_starts.add("web:1"))
    ran = supctl("-s", str(fake.path), "start", "all")
    assert ran.code == 1
    assert ran.out.splitlines() == ["web:0: started", "web:1: ERROR (spawn error)"]


def test_unknown_name_in_start_exits_1(supctl: Any, fake: ServerLoop) -> None:
    ran = supctl("-s", str(fake.path), "stop", "nope")
    assert ran.code == 1
    assert "nope: ERROR (no such process)" in ran.out


def test_no_wait_is_passed_on(supctl: Any, fake: ServerLoop) -> None:
    ran = supctl("-s", str(fake.path), "restart", "web:0", "--no-wait")
    assert ran.out.splitlines() == ["web:0: restart requested"]
    assert last_params(fake).wait is False


def test_start_json(supctl: Any, fake: ServerLoop) -> None:
    ran = supctl("-s", str(fake.path), "--json", "stop", "web:0")
    assert ran.json() == [
        {"name": "web:0", "ok": True, "state": "STOPPED", "error": None, "code": None}
    ]


def test_signal_names_and_numbers(supctl: Any, fake: ServerLoop) -> None:
    assert supctl("-s", str(fake.path), "signal", "HUP", "web").code == 0
    assert last_params(fake).signal == "SIGHUP"
    ran = supctl("-s", str(fake.path), "signal", "15", "web:0")
    assert ran.out.splitlines() == ["web:0: signalled"]
    assert last_params(fake).signal == "SIGTERM"


def test_bad_signal_is_a_usage_error(supctl: Any, fake: ServerLoop) -> None:
    ran = supctl("-s", str(fake.path), "signal", "NOPE", "web")
    assert ran.code == 2
    assert "unknown signal 'NOPE'" in ran.err


def test_reload(supctl: Any, fake: ServerLoop) -> None:
    ran = supctl("-s", str(fake.path), "reload")
    assert (ran.code, ran.out) == (0, "added: new\nremoved: old\n")


def test_reload_refused_lists_the_problems(supctl: Any, fake: ServerLoop) -> None:
    fake.call(lambda: fake.handler.reload_problems.extend(["programs.web.command: required"]))
    ran = supctl("-s", str(fake.path), "reload")
    assert ran.code == 1
    assert "reload refused" in ran.err
    assert "  programs.web.command: required" in ran.err


def test_tail(supctl: Any, fake: ServerLoop) -> None:
    fake.call(lambda: fake.handler.output.update({("web:0", "stderr"): "one\ntwo\n"}))
    ran = supctl("-s", str(fake.path), "tail", "-c", "4", "web:0", "stderr")
    assert (ran.code, ran.out) == (0, "two\n")
    assert (last_params(fake).bytes, last_params(fake).lines) == (4, None)
    ran = supctl("-s", str(fake.path), "tail", "-1", "web:0", "stderr")
    assert (ran.code, ran.out) == (0, "two\n")
    assert (last_params(fake).bytes, last_params(fake).lines) == (None, 1)
    supctl("-s", str(fake.path), "tail", "web:0")
    assert last_params(fake).lines == ctl.DEFAULT_TAIL_LINES == 10


def test_pid(supctl: Any, fake: ServerLoop) -> None:
    assert supctl("-s", str(fake.path), "pid").out == f"{os.getpid()}\n"
    assert supctl("-s", str(fake.path), "pid", "web:1").out == "4243\n"
    fake.call(
        lambda: fake.handler.processes.update(
            {"db": ProcessInfo(name="db", program="db", state="STOPPED")}
        )
    )
    ran = supctl("-s", str(fake.path), "pid", "db")
    assert (ran.code, ran.out) == (1, "")
    assert "db is not running" in ran.err


def test_pid_of_several_processes_prints_names(supctl: Any, fake: ServerLoop) -> None:
    ran = supctl("-s", str(fake.path), "pid", "web")
    assert (ran.code, ran.out) == (0, "web:0  4242\nweb:1  4243\n")
    assert supctl("-s", str(fake.path), "--json", "pid", "web").json() == {
        "pid": None,
        "processes": [{"name": "web:0", "pid": 4242}, {"name": "web:1", "pid": 4243}],
    }


def test_version_and_shutdown(supctl: Any, fake: ServerLoop) -> None:
    ran = supctl("-s", str(fake.path), "version")
    assert ran.out == f"supd 0.1.0 (pid {os.getpid()}, config no config file)\n"
    assert supctl("-s", str(fake.path), "--json", "version").json()["pid"] == os.getpid()
    assert supctl("-s", str(fake.path), "shutdown").code == 0
    assert fake.call(lambda: fake.handler.shutdown_requested)


# --------------------------------------------------------------------------- unreachable


def test_missing_socket_exits_4_naming_path_and_reason(supctl: Any, tmp_path: Path) -> None:
    path = tmp_path / "nope.sock"
    ran = supctl("-s", str(path), "status")
    assert ran.code == ctl.EXIT_UNREACHABLE == 4
    assert ran.err == f"supctl: cannot reach supd at {path}: no such file (is supd running?)\n"


def test_refused_connection_exits_4(supctl: Any, tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    ran = supctl("-s", str(path), "status")
    assert ran.code == 4
    assert f"cannot reach supd at {path}: connection refused" in ran.err


def test_timeout_option_expiry_exits_5(supctl: Any, fake: ServerLoop) -> None:
    fake.call(lambda: setattr(fake.handler, "hold", True))
    ran = supctl("-s", str(fake.path), "--timeout", "0.3", "pid")
    assert ran.code == ctl.EXIT_TIMED_OUT == 5
    assert ran.err == (
        "supctl: no answer to pid within --timeout 0.3 s; supd may still carry it out"
        " (see supctl status)\n"
    )


def test_a_daemon_that_stops_answering_probes_exits_4(
    supctl: Any, fake: ServerLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    # hold keeps every answer back, the probes' too: no daemon worth the name.
    monkeypatch.setattr(ctl, "PROBE_INTERVAL_S", 0.05)
    monkeypatch.setattr(ctl, "PROBE_TIMEOUT_S", 0.2)
    fake.call(lambda: setattr(fake.handler, "hold", True))
    ran = supctl("-s", str(fake.path), "stop", "web")
    assert ran.code == ctl.EXIT_UNREACHABLE == 4
    assert ran.err == (
        f"supctl: cannot reach supd at {fake.path}: supd stopped answering"
        " (no answer within 0.2 s)\n"
    )
    methods = fake.call(lambda: [request.method for request in fake.handler.requests])
    assert methods == ["stop", "version"]


def test_an_answering_daemon_is_waited_for_with_progress_on_a_terminal(
    fake: ServerLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long stop is not "unreachable" while supd answers the probes."""
    monkeypatch.setattr(ctl, "PROBE_INTERVAL_S", 0.1)
    monkeypatch.setattr(ctl, "PROBE_TIMEOUT_S", 1.0)
    waited: list[float] = []

    class ReleasingProgress(ctl.Progress):
        def update(self, elapsed_s: float) -> None:
            super().update(elapsed_s)
            waited.append(elapsed_s)
            # Past PROBE_TIMEOUT_S (where a fixed deadline would have given up): answer.
            if elapsed_s > 1.2:
                fake.call(lambda: fake.handler.release())  # a second release finds none

    fake.call(lambda: setattr(fake.handler, "hold", True))
    answer_only_probes(fake)
    err = io.StringIO()
    progress = ReleasingProgress(err, "stop web")
    with ctl.Client(str(fake.path), 1.0, progress=progress) as client:
        result = client.call("stop", {"names": ["web"]})
    assert [item["name"] for item in result] == ["web:0", "web:1"]
    assert waited == sorted(waited) and waited[-1] > 1.2 and len(waited) > 5
    assert err.getvalue().startswith("\rsupctl: stop web: supd is working on it (0 s)")
    assert err.getvalue().endswith("\r\x1b[K")  # cleared before the result is printed


def answer_only_probes(loop: ServerLoop) -> None:
    """Make the fake daemon hold every request except `version` (the probe)."""
    handler = loop.handler
    original = handler.handle_command

    def handle(request: Any, responder: Any) -> None:
        if request.method == "version":
            handler.requests.append(request)
            handler.answer(request, responder)
        else:
            original(request, responder)

    loop.call(lambda: setattr(handler, "handle_command", handle))


def test_daemon_closing_the_connection_twice_exits_4(supctl: Any, fake: ServerLoop) -> None:
    fake.call(lambda: setattr(fake.handler, "hold", True))

    def close_everything() -> None:
        for _, responder in fake.handler.held:
            with contextlib.suppress(OSError):  # the first one, closed already
                responder._conn.sock.shutdown(socket.SHUT_RDWR)

    proc = supctl_process("-s", str(fake.path), "pid")
    try:
        wait_until(lambda: fake.call(lambda: len(fake.handler.held)) == 1)
        fake.call(close_everything)
        # `pid` changes nothing, so supctl asks once more on a fresh connection (as after
        # a re-exec); a second drop is the end.
        wait_until(lambda: fake.call(lambda: len(fake.handler.held)) == 2)
        fake.call(close_everything)
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 4
    assert "supd closed the connection" in err


def run_supctl_as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    # The system python: nobody can't run the venv's (under /root). supctl needs only
    # the stdlib, which is the point.
    return subprocess.run(
        [str(SYSTEM_PYTHON), "-m", "supd.ctl", *argv],
        user="nobody",
        group="nogroup",
        extra_groups=[],
        env={"PYTHONPATH": source_pythonpath(), "PATH": "/usr/bin:/bin"},
        cwd="/",
        capture_output=True,
        text=True,
        timeout=30,
    )


@needs_root
def test_permission_denied_by_the_file_mode_exits_4() -> None:
    with traversable_socket_dir() as folder, ServerLoop(folder / "supd.sock", mode=0o600):
        done = run_supctl_as_nobody("-s", str(folder / "supd.sock"), "status")
    assert done.returncode == 4, done.stderr
    assert done.stderr == f"supctl: cannot reach supd at {folder}/supd.sock: permission denied\n"


@needs_root
def test_permission_denied_by_the_daemon_exits_4() -> None:
    with traversable_socket_dir() as folder, ServerLoop(folder / "supd.sock", mode=0o666):
        done = run_supctl_as_nobody("-s", str(folder / "supd.sock"), "status")
    assert done.returncode == 4, done.stderr
    assert done.stderr == f"supctl: cannot reach supd at {folder}/supd.sock: permission denied\n"


@needs_root
def test_group_member_can_use_supctl() -> None:
    with (
        traversable_socket_dir() as folder,
        ServerLoop(folder / "supd.sock", mode=0o660, group="nogroup"),
    ):
        done = run_supctl_as_nobody("-s", str(folder / "supd.sock"), "pid")
    assert (done.returncode, done.stdout) == (0, f"{os.getpid()}\n"), done.stderr


# --------------------------------------------------------------------------- tail -f


def test_tail_follow_stops_cleanly_on_ctrl_c(fake: ServerLoop) -> None:
    fake.call(lambda: fake.handler.output.update({("web:0", "stdout"): "first\n"}))
    proc = supctl_process("-s", str(fake.path), "tail", "-f", "web:0")
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "first\n"
        wait_until(lambda: fake.call(lambda: len(fake.handler.followers)) == 1)
        fake.call(lambda: fake.handler.push_output("web:0", "stdout", "second\n"))
        assert proc.stdout.readline() == "second\n"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0
    assert "Traceback" not in err
    # The daemon notices the follower left.
    wait_until(lambda: fake.call(lambda: fake.handler.push_output("web:0", "stdout", ".")) == 0)


def test_tail_follow_json_prints_one_object_per_chunk(fake: ServerLoop) -> None:
    proc = supctl_process("-s", str(fake.path), "--json", "tail", "-f", "web:0")
    try:
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline()) == {
            "name": "web:0",
            "stream": "stdout",
            "data": "",
        }
        wait_until(lambda: fake.call(lambda: len(fake.handler.followers)) == 1)
        fake.call(lambda: fake.handler.push_output("web:0", "stdout", "x\n"))
        assert json.loads(proc.stdout.readline())["data"] == "x\n"
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=20)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0


# --------------------------------------------------------------------------- the shell


def test_shell_runs_commands_until_quit(fake: ServerLoop, tmp_path: Path) -> None:
    env_home = tmp_path / "home"
    env_home.mkdir()
    proc = supctl_process("-s", str(fake.path), stdin=subprocess.PIPE, cwd=tmp_path, home=env_home)
    lines = "status\nstart nope\nbogus\nadd web\nhelp stop\nquit\n"
    out, err = proc.communicate(lines, timeout=20)
    assert proc.returncode == 0, err
    assert "web:0   RUNNING   pid 4242" in out
    assert "nope: ERROR (no such process)" in out
    assert "invalid choice: 'bogus'" in err  # a usage error does not leave the shell
    assert "supctl: supd has no add command: programs come from the config" in err
    assert "--no-wait" in out
    # Lines read without a terminal bypass readline, so the history is written but empty.
    assert (env_home / ".supctl_history").exists()


def test_shell_ends_on_eof(fake: ServerLoop, tmp_path: Path) -> None:
    proc = supctl_process("-s", str(fake.path), stdin=subprocess.PIPE, home=tmp_path)
    _, err = proc.communicate("pid\n", timeout=20)
    assert proc.returncode == 0, err


def test_completion_of_commands_and_names(fake: ServerLoop) -> None:
    args = parse("-s", str(fake.path))
    session = ctl.Session(ctl.build_parser(), str(fake.path), args, sys.stdout, sys.stderr)
    completer = ctl.Completer(session)
    assert "status" in completer.candidates([])
    assert "quit" in completer.candidates([])
    assert completer.candidates(["start"]) == ["web:0", "web:1", "web", "all"]
    assert completer.candidates(["tail"]) == ["web:0", "web:1", "web"]
    assert completer.candidates(["tail", "web:0"]) == ["stdout", "stderr"]
    assert "HUP" in completer.candidates(["signal"])
    assert completer.candidates(["reload"]) == []


def test_completion_without_a_daemon_offers_no_names(tmp_path: Path) -> None:
    path = str(tmp_path / "none.sock")
    session = ctl.Session(ctl.build_parser(), path, parse(), sys.stdout, sys.stderr)
    assert ctl.Completer(session).candidates(["start"]) == ["all"]


# --------------------------------------------------------------------------- --json errors


def test_json_errors_are_json_on_stdout_with_the_same_exit_code(
    supctl: Any, fake: ServerLoop, tmp_path: Path
) -> None:
    ran = supctl("-s", str(fake.path), "--json", "status", "nope")
    assert (ran.code, ran.err) == (1, "")
    assert ran.json() == {"error": {"code": 1, "message": "no such process: ['nope']"}}
    ran = supctl("-s", str(fake.path), "signal", "NOPE", "web", "--json")
    assert ran.code == 2
    assert ran.json()["error"]["code"] == ctl.INVALID_PARAMS
    missing = tmp_path / "nope.sock"
    ran = supctl("-s", str(missing), "--json", "pid")
    assert (ran.code, ran.err) == (4, "")
    assert ran.json() == {
        "error": {
            "code": "unreachable",
            "message": f"cannot reach supd at {missing}: no such file (is supd running?)",
        }
    }
    ran = supctl("--json", "frobnicate")
    assert (ran.code, ran.err) == (2, "")
    assert ran.json()["error"]["code"] == "usage"
    assert "invalid choice: 'frobnicate'" in ran.json()["error"]["message"]
    ran = supctl("--json", "-c", str(tmp_path / "nope.toml"), "status")
    assert (ran.code, ran.json()["error"]["code"]) == (2, "usage")


def test_json_error_of_a_timeout_and_of_a_refused_reload(supctl: Any, fake: ServerLoop) -> None:
    fake.call(lambda: fake.handler.reload_problems.extend(["programs.web.command: required"]))
    ran = supctl("-s", str(fake.path), "--json", "reload")
    assert ran.code == 1
    assert ran.json()["error"]["code"] == ctl.CONFIG_INVALID
    assert ran.json()["error"]["data"] == ["programs.web.command: required"]
    fake.call(lambda: setattr(fake.handler, "hold", True))
    ran = supctl("-s", str(fake.path), "--json", "--timeout", "0.2", "version")
    assert (ran.code, ran.json()["error"]["code"]) == (5, "timed_out")


# --------------------------------------------------------------------------- supervisorctl


@pytest.mark.parametrize(
    ("command", "advice"),
    [
        ("add", "add the [programs.NAME] table, then `supctl reload`"),
        ("remove", "delete the [programs.NAME] table, then `supctl reload`"),
    ],
)
def test_supervisorctl_commands_say_what_to_do(
    supctl: Any, tmp_path: Path, command: str, advice: str
) -> None:
    # No daemon needed: the advice comes without connecting.
    ran = supctl("-s", str(tmp_path / "none.sock"), command, "web", "extra")
    assert (ran.code, ran.out) == (2, "")
    assert ran.err.startswith(f"supctl: supd has no {command} command: ")
    assert advice in ran.err
    assert "invalid choice" not in ran.err
    ran = supctl("-s", str(tmp_path / "none.sock"), "--json", command)
    assert ran.code == 2
    assert advice in ran.json()["error"]["message"]
    assert command not in listed_commands(supctl("--help").out)


def listed_commands(help_text: str) -> set[str]:
    """The command names `supctl --help` lists (indented under "positional arguments")."""
    section = help_text.split("positional arguments:")[1].split("options:")[0]
    listed = {line.split()[0] for line in section.splitlines() if line.startswith("    ")}
    assert {"status", "tail", "reload"} <= listed
    return listed
