"""The daemon's config without pydantic: settings.py's plain objects against config.py's
models, `supd --check --emit-json`, and a daemon that loads and reloads through it."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from supd import config, configcheck, settings
from supd.facts import EXIT_CONFIG, ErrorCode
from supd.settings import ConfigError
from tests.helpers import (
    PY,
    SLEEP,
    Supd,
    checkers_of,
    source_pythonpath,
    wait_until,
)

Factory = Callable[..., Supd]

PAIRS: list[tuple[type[Any], type[BaseModel]]] = [
    (settings.Supervisor, config.SupervisorConfig),
    (settings.Program, config.ProgramConfig),
    (settings.Ready, config.ReadyConfig),
    (settings.Health, config.HealthConfig),
    (settings.Dependency, config.Dependency),
    (settings.Group, config.GroupConfig),
]


@pytest.mark.parametrize(("plain", "model"), PAIRS, ids=[p.__name__ for p, _ in PAIRS])
def test_each_runtime_class_has_the_models_fields_in_order_with_the_same_defaults(
    plain: type[Any], model: type[BaseModel]
) -> None:
    fields = dataclasses.fields(plain)
    assert [f.name for f in fields] == list(model.model_fields)
    for f in fields:
        info = model.model_fields[f.name]
        if info.default_factory is not None:
            assert f.default_factory is not dataclasses.MISSING, f.name
            assert f.default_factory() == info.default_factory(), f.name  # type: ignore[call-arg]
        elif info.default is PydanticUndefined:
            assert f.default is dataclasses.MISSING, f"{f.name} is required in the model"
        else:
            assert f.default == info.default, f.name


RICH = """
[supervisor]
log_level = "debug"
environment = { TZ = "UTC" }
include = ["conf.d/*.toml"]

[groups.site]
programs = ["web", "worker"]
priority = 5

[programs.web]
command = "python3 -m http.server"
numprocs = 2
directory = "."
environment = { A = 1 }
exitcodes = [0, 3]
stopsignal = "INT"
stdout_logfile_maxbytes = "1MB"
umask = "022"
ready = { tcp = "127.0.0.1:8000", interval = 2 }
health = { log-silence = "5", failures = 2 }
depends_on = ["db", { program = "worker", condition = "started" }]
log_prefix = "[{process_name}] "
rotate_every = "1d"
memory_max = "512MB"
cpu_max = "50%"

[programs.worker]
command = ["/bin/sh", "-c", "sleep 1"]
redirect_stderr = true
stdout_logfile = "-"
"""


def write_rich(tmp_path: Path) -> Path:
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "db.toml").write_text('[programs.db]\ncommand = "db"\nnotify = true\n')
    path = tmp_path / "supd.toml"
    path.write_text(RICH.replace('health = { log-silence = "5"', "health = { log-silence = 5"))
    return path


def test_the_runtime_config_holds_every_value_the_models_validated(tmp_path: Path) -> None:
    loaded = config.load(write_rich(tmp_path), environ={})
    plain = config.to_settings(loaded)
    assert plain.path == loaded.path and plain.sources == loaded.sources
    assert list(plain.programs) == ["web", "worker", "db"]
    assert settings.dump(plain.supervisor) == loaded.supervisor.model_dump(
        mode="json", exclude_defaults=True
    )
    for name, model in loaded.programs.items():
        program = plain.programs[name]
        for key in settings.PROGRAM_KEYS:
            value, expected = getattr(program, key), getattr(model, key)
            if isinstance(expected, BaseModel):
                assert settings.dump(value) == expected.model_dump(
                    mode="json", exclude_defaults=True
                ), key
            elif isinstance(expected, tuple) and expected and isinstance(expected[0], BaseModel):
                assert [dataclasses.asdict(v) for v in value] == [e.model_dump() for e in expected]
            else:
                assert value == expected and type(value) is type(expected), key
        assert program.process_names() == model.process_names()
        for process in model.process_names():
            for stream in ("stdout", "stderr"):
                assert program.log_destination(process, stream) == model.log_destination(
                    process, stream
                )
                assert program.prefix(process, stream) == model.prefix(process, stream)
        assert program.start_order == model.start_order
        assert program.wants_notify_socket == model.wants_notify_socket
        assert program.cgroup_limits() == model.cgroup_limits()
    web = plain.programs["web"]
    assert web.ready is not None and web.ready.kind == "tcp" and web.ready.interval == 2.0
    assert web.health is not None and web.health.kind == "log_silence"
    assert web.exitcodes == frozenset({0, 3}) and web.directory == tmp_path
    assert [d.program for d in web.depends_on] == ["db", "worker"]
    assert plain.groups["site"] == settings.Group("site", ("web", "worker"), 5)
    assert hash(web) == hash(plain.programs["web"])


def test_the_plain_data_survives_a_round_trip_unchanged(tmp_path: Path) -> None:
    data = config.config_data(config.load(write_rich(tmp_path), environ={}))
    again = settings.settings_data(settings.settings_from_data(json.loads(json.dumps(data))))
    assert again == data
    assert settings.settings_from_data(data) == settings.settings_from_data(again)


# Every field of every model away from its default somewhere (the probe kinds exclude
# each other: one program each), so a field the checker's answer lost, or one read back
# with another type, cannot hide behind its default.
EVERY = """
[supervisor]
socket = "s/supd.sock"
socket_mode = "0660"
socket_group = "root"
log_dir = "mylogs"
log_format = "json"
log_level = "debug"
log_timestamps = "iso"
journal_socket = "/run/j.sock"
include = ["conf.d/*.toml"]
subreaper = true
cgroups = "off"
environment = { TZ = "UTC" }
metrics = "127.0.0.1:9101"

[groups.site]
programs = ["web", "worker"]
priority = 5

[programs.web]
command = ["/bin/sleep", "1000"]
numprocs = 2
numprocs_start = 1
process_name = "web-{process_num}"
directory = "/tmp"
environment = { A = "1" }
user = "root"
group = "root"
umask = "022"
priority = 3
autostart = false
autorestart = "always"
exitcodes = [0, 3]
startsecs = 2
startretries = 5
backoff_initial = 2
backoff_factor = 3
backoff_max = 30
backoff_reset = 30
backoff_jitter = 0.2
max_restarts = 9
restart_window = 30
revive_after = 600
env_files = ["/dev/null"]
stopsignal = "INT"
stopwaitsecs = 5
killasgroup = false
leftovers = "keep"
memory_max = "512MB"
cpu_max = "50%"
pids_max = 100
stdout_logfile = "{process_name}.out"
stdout_logfile_maxbytes = "1MB"
stdout_logfile_backups = 2
stderr_logfile = "{process_name}.err"
stderr_logfile_maxbytes = "2MB"
stderr_logfile_backups = 3
log_prefix = "[{process_name}] "
log_timestamps = "epoch"
rotate_every = "1d"
max_total_size = "10MB"
compress = true
ready = { tcp = "127.0.0.1:8000", interval = 2, timeout = 3, ready_timeout = 30 }
depends_on = [{ program = "worker", condition = "started" }]
on_dependency_restart = "restart"
notify = true
watchdog_sec = 30

[programs.web.health]
tcp = "127.0.0.1:8000"
interval = 2
timeout = 3
failures = 2
start_grace = 5
on_unhealthy = "stop"

[programs.worker]
command = "sleep 1"
redirect_stderr = true
ready = { http = "http://127.0.0.1:8000/up" }
health = { http = "http://127.0.0.1:8000/up" }

[programs.r1]
command = "sleep 1"
ready = { exec = ["true"] }
health = { exec = ["true"] }

[programs.r2]
command = "sleep 1"
ready = { log = "ready" }
health = { log-silence = 5 }

[programs.r3]
command = "sleep 1"
ready = { notify = true }

[programs.r4]
command = "sleep 1"
ready = { file = "up.flag" }
"""


def _runtime_classes(plain: settings.Settings) -> dict[type[Any], list[Any]]:
    programs = list(plain.programs.values())
    return {
        settings.Supervisor: [plain.supervisor],
        settings.Program: programs,
        settings.Ready: [p.ready for p in programs if p.ready is not None],
        settings.Health: [p.health for p in programs if p.health is not None],
        settings.Dependency: [d for p in programs for d in p.depends_on],
        settings.Group: list(plain.groups.values()),
    }


def _same(model: BaseModel, plain: Any, where: str) -> list[str]:
    """Where `plain` differs from `model` in a value or a type, recursively."""
    differences = []
    for f in dataclasses.fields(plain):
        expected, value = getattr(model, f.name), getattr(plain, f.name)
        if isinstance(expected, BaseModel):
            differences += _same(expected, value, f"{where}.{f.name}")
        elif isinstance(expected, tuple) and expected and isinstance(expected[0], BaseModel):
            assert len(value) == len(expected), f"{where}.{f.name}"
            for i, (one, other) in enumerate(zip(expected, value, strict=True)):
                differences += _same(one, other, f"{where}.{f.name}[{i}]")
        elif value != expected or type(value) is not type(expected):
            differences.append(f"{where}.{f.name}: {expected!r} read back as {value!r}")
    return differences


def test_every_field_crosses_from_the_checker_with_its_value_and_type(tmp_path: Path) -> None:
    (tmp_path / "conf.d").mkdir()
    path = tmp_path / "supd.toml"
    path.write_text(EVERY)
    ran = run_check(path)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    plain = configcheck.result(path, ran.stdout.encode(), None)
    for cls, objects in _runtime_classes(plain).items():
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                continue  # required: always given
            assert any(getattr(o, f.name) != default for o in objects), (
                f"{cls.__name__}.{f.name} is at its default: EVERY must set it, or the "
                "checker's answer lost it"
            )
    loaded = config.load(path)
    differences = _same(loaded.supervisor, plain.supervisor, "supervisor")
    for name, program in loaded.programs.items():
        differences += _same(program, plain.programs[name], f"programs.{name}")
    for name, group in loaded.groups.items():
        differences += _same(group, plain.groups[name], f"groups.{name}")
    assert differences == []


def test_the_options_a_newer_checker_knows_are_found_at_every_level(tmp_path: Path) -> None:
    (tmp_path / "conf.d").mkdir()
    path = tmp_path / "supd.toml"
    path.write_text(EVERY)
    data = config.config_data(config.load(path))
    assert settings.unknown_keys(data) == []  # the same code never trips it
    web = next(p for p in data["programs"] if p["name"] == "web")
    web["depends_on"][0]["when"] = 1
    web["ready"]["retries"] = 1
    data["supervisor"]["pidfile"] = "x"
    data["groups"][0]["weight"] = 1
    data["events"] = []
    assert sorted(settings.unknown_keys(data)) == [
        ("", "events"),
        ("", "groups.site.weight"),
        ("", "supervisor.pidfile"),
        ("web", "programs.web.depends_on[0].when"),
        ("web", "programs.web.ready.retries"),
    ]


def test_the_daemons_config_modules_import_no_pydantic() -> None:
    """Everything the daemon uses to hold, load and reload a config, re-exec included."""
    modules = ["settings", "configcheck", "process", "fleet", "deaths", "reloadplan"]
    modules += ["probes", "reexec", "spawn", "logs", "metrics", "daemonlog", "cgroups"]
    code = textwrap.dedent(f"""
        import importlib, sys
        for name in {modules!r}:
            importlib.import_module("supd." + name)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("pydantic", "pydantic_core"))
        print(loaded, "supd.config" in sys.modules)
    """)
    env = dict(os.environ, PYTHONPATH=source_pythonpath())
    ran = subprocess.run([PY, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.split() == ["[]", "False"]


def test_a_running_daemon_has_no_pydantic_mapped(supd: Factory) -> None:
    """Neither validator (config, protocol) nor asyncio (structlog's) is in the daemon:
    their compiled modules would be mapped."""
    d = supd(f"[programs.web]\ncommand = {SLEEP}\nstartsecs = 0\n")
    d.wait_state("web", "RUNNING")
    d.rpc("reload")  # the reload's check ran in a child, not here
    maps = Path(f"/proc/{d.pid}/maps").read_text()
    assert "pydantic_core" not in maps
    assert "_asyncio" not in maps


def run_check(path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=source_pythonpath())
    return subprocess.run(
        [PY, "-m", "supd", "--check", configcheck.EMIT_JSON_ARG, "-c", str(path), *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_check_emit_json_prints_the_config_as_one_line_of_data(tmp_path: Path) -> None:
    path = write_rich(tmp_path)
    ran = run_check(path)
    assert ran.returncode == 0, ran.stderr
    [line] = ran.stdout.splitlines()
    assert json.loads(line) == {"config": config.config_data(config.load(path))}
    loaded = configcheck.result(path, ran.stdout.encode(), None)
    assert loaded == config.to_settings(config.load(path))


def test_check_emit_json_gives_every_problem_with_its_place(tmp_path: Path) -> None:
    path = tmp_path / "supd.toml"
    broken = '[programs.web]\ncommand = "x"\nstartsecs = -1\n\n[programs.db]\nnumprocs = 0\n'
    path.write_text(broken)
    ran = run_check(path)
    assert ran.returncode == EXIT_CONFIG, ran.stderr
    with pytest.raises(ConfigError) as raised:
        configcheck.result(path, ran.stdout.encode(), None)
    with pytest.raises(ConfigError) as direct:
        config.load(path)
    assert [str(p) for p in raised.value.problems] == [str(p) for p in direct.value.problems]
    assert len(raised.value.problems) >= 3  # startsecs, db's command, db's numprocs


def test_a_checker_that_fails_is_one_clear_problem(tmp_path: Path) -> None:
    path = tmp_path / "supd.toml"
    for output, status in [
        (b"Traceback (most recent call last):\nImportError: no module\n", None),
        (b"", "killed by SIGKILL"),
        (b'{"config": {"path": 1}}\n', None),
        (b'{"config": {"path": "/x", "supervisor": {}, "programs": ["web"]}}\n', None),
        (b'{"problems": [{"file": {}, "key": "k", "message": "m"}]}\n', None),
        (b"[" * 100000 + b"]" * 100000 + b"\n", None),  # deeper than json recurses
    ]:
        with pytest.raises(ConfigError) as raised:
            configcheck.result(path, output, status)
        [problem] = raised.value.problems
        assert problem.file == path and "the config check failed" in problem.message
    assert "ImportError" in str(_failure(path, b"x\nImportError: no module\n"))


def _failure(path: Path, output: bytes) -> ConfigError:
    try:
        configcheck.result(path, output, None)
    except ConfigError as exc:
        return exc
    raise AssertionError("no error")


def test_the_daemon_starts_through_the_checker_and_reports_problems_as_before(
    tmp_path: Path,
) -> None:
    path = tmp_path / "supd.toml"
    path.write_text('[programs.web]\ncommand = "x"\nstartsecs = "soon"\n')
    env = dict(os.environ, PYTHONPATH=source_pythonpath())
    ran = subprocess.run(
        [PY, "-m", "supd", "-c", str(path)], capture_output=True, text=True, env=env, timeout=60
    )
    assert ran.returncode == EXIT_CONFIG
    assert ran.stderr.startswith(f"{path}:3: programs.web.startsecs: ")


def test_a_hung_checker_is_a_clear_reload_error_and_the_daemon_carries_on(
    supd: Factory, tmp_path: Path
) -> None:
    """An include glob that matches a FIFO blocks the checker in open(): the deadline
    kills it, the reload fails with that reason, the old config stays, nothing leaks."""
    # (The good check at the end has this long too: enough on a loaded machine.)
    env = dict(os.environ, **{configcheck.TIMEOUT_ENV: "3"})
    d = supd(f"[programs.web]\ncommand = {SLEEP}\nstartsecs = 0\n", env=env)
    d.wait_state("web", "RUNNING")
    pid = d.status()["web"]["pid"]
    os.mkfifo(tmp_path / "stuck.toml")
    d.write_config(f"""
        [supervisor]
        include = ["stuck.toml"]
        [programs.web]
        command = {SLEEP}
        startsecs = 0
        [programs.new]
        command = {SLEEP}
    """)
    d.signal(signal.SIGHUP)  # a second reload joins the queue behind the first check
    with pytest.raises(Exception) as raised:
        d.rpc("reload")
    error = getattr(raised.value, "error", {})
    assert "no answer within 3 s" in json.dumps(error), raised.value
    assert set(d.status()) == {"web"} and d.status()["web"]["pid"] == pid
    wait_until(lambda: not checkers_of(d.pid), describe=lambda: f"{checkers_of(d.pid)}")
    failures = [e for e in d.events("reload_failed") if "no answer" in json.dumps(e)]
    assert len(failures) == 2  # the SIGHUP's and the request's
    (tmp_path / "stuck.toml").unlink()
    result = d.rpc("reload")
    assert result["added"] == ["new"]


def test_a_reload_waits_for_its_check_without_blocking_the_loop(
    supd: Factory, tmp_path: Path
) -> None:
    """While the checker is stuck, the daemon answers status at once."""
    env = dict(os.environ, **{configcheck.TIMEOUT_ENV: "30"})
    d = supd(f"[programs.web]\ncommand = {SLEEP}\nstartsecs = 0\n", env=env)
    d.wait_state("web", "RUNNING")  # the loop runs: SIGHUP is read through the signalfd
    os.mkfifo(tmp_path / "stuck.toml")
    d.write_config(f"""
        [supervisor]
        include = ["stuck.toml"]
        [programs.web]
        command = {SLEEP}
        startsecs = 0
    """)
    d.signal(signal.SIGHUP)
    wait_until(lambda: checkers_of(d.pid), describe=lambda: d.describe())
    assert "web" in d.status()  # answered while the check is in flight
    # Unblock the checker: it reads an empty include and the reload completes.
    fd = os.open(tmp_path / "stuck.toml", os.O_WRONLY)
    os.close(fd)
    wait_until(lambda: d.events("config_reloaded"), describe=d.describe)
    assert not checkers_of(d.pid)


def test_the_daemon_reads_the_checker_output_of_many_programs(
    supd: Factory, tmp_path: Path
) -> None:
    """More JSON than a pipe holds (64 KiB): read as it comes, not at the exit."""
    lines = [f"[programs.p{i}]\ncommand = {SLEEP}\nautostart = false\n" for i in range(300)]
    d = supd("".join(lines))
    d.write_config("".join(lines) + f"[programs.extra]\ncommand = {SLEEP}\nautostart = false\n")
    result = d.rpc("reload")
    assert result["added"] == ["extra"] and len(d.status()) == 301


def test_python_running_the_checker_is_this_interpreter() -> None:
    argv = configcheck.argv("/x.toml")
    assert argv[0] == sys.executable and argv[1:3] == ["-m", "supd"]


def test_shutdown_cancels_a_reload_in_flight_and_leaves_no_checker(
    supd: Factory, tmp_path: Path
) -> None:
    env = dict(os.environ, **{configcheck.TIMEOUT_ENV: "30"})
    d = supd(f"[programs.web]\ncommand = {SLEEP}\nstartsecs = 0\n", env=env)
    d.wait_state("web", "RUNNING")
    os.mkfifo(tmp_path / "stuck.toml")
    d.write_config(f'[supervisor]\ninclude = ["stuck.toml"]\n[programs.web]\ncommand = {SLEEP}\n')
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(30)
        client.connect(str(d.socket))
        client.sendall(b'{"jsonrpc":"2.0","id":1,"method":"reload","params":{}}\n')
        [checker] = wait_until(lambda: checkers_of(d.pid), describe=d.describe)
        d.signal(signal.SIGTERM)
        reply = json.loads(client.makefile("rb").readline())
    assert reply["error"]["code"] == ErrorCode.SHUTTING_DOWN, reply
    assert "cancelled" in reply["error"]["message"]
    assert d.wait_exit() == 0
    assert not Path(f"/proc/{checker}").exists()  # killed and reaped, not left behind


def test_emit_json_goes_with_check(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=source_pythonpath())
    argv = [PY, "-m", "supd", configcheck.EMIT_JSON_ARG, "-c", str(tmp_path / "x.toml")]
    ran = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    assert ran.returncode == 2 and "goes with --check" in ran.stderr


def metrics_answer(path: Path) -> bytes | None:
    """The answer to GET /metrics on the socket at `path`; None while nobody listens."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            return None
        sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_after_a_reexec_metrics_move_to_the_address_the_file_names_now(
    supd: Factory, tmp_path: Path
) -> None:
    """The file is read by the reload that ends the adoption, in a child; the metrics
    endpoint opens once it has been read, at its address."""
    program = f"[programs.web]\ncommand = {SLEEP}\nstartsecs = 0\n"
    d = supd(f'[supervisor]\nmetrics = "./old.sock"\n{program}')
    d.wait_state("web", "RUNNING")
    pid = d.status()["web"]["pid"]
    d.write_config(f'[supervisor]\nmetrics = "./new.sock"\n{program}')
    assert d.rpc("reexec")["generation"] == 2
    answer = wait_until(lambda: metrics_answer(tmp_path / "new.sock"), describe=d.describe)
    assert answer.startswith(b"HTTP/1.1 200 OK")
    assert d.status()["web"]["pid"] == pid
    assert not d.events("metrics_address_unchanged")
    [reloaded] = d.events("config_reloaded")  # the adoption's: metrics was applied
    assert not any(entry.startswith("metrics") for entry in reloaded["not_applied"])


@pytest.mark.parametrize(
    ("argv", "path"),
    [
        ([], configcheck.DEFAULT_CONFIG),
        (["-c", "a.toml"], "a.toml"),
        (["--config", "a.toml"], "a.toml"),
        (["--config=a.toml"], "a.toml"),
        (["-ca.toml"], "a.toml"),
        (["-c", "a.toml", "--check"], None),
        (["--version"], None),
        (["-c"], None),
        (["--conf", "a.toml"], None),  # argparse's abbreviation: no early start, no harm
    ],
)
def test_entry_starts_the_checker_early_only_for_a_plain_start(
    argv: list[str], path: str | None
) -> None:
    from supd import entry, reexec

    assert entry._REEXEC_STATE == reexec.ENV_STATE_FD
    assert entry._daemon_config(argv, configcheck.DEFAULT_CONFIG) == path
