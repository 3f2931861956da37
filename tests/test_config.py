"""supervisor.config: TOML in, frozen models or located problems out."""

from __future__ import annotations

import os
import signal
import textwrap
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supd.config import (
    Config,
    ConfigError,
    Problem,
    ProgramConfig,
    SupervisorConfig,
    load,
    summary,
)
from supd.tomlkeys import KeyLocator

REPO = Path(__file__).resolve().parent.parent
NO_ENV: dict[str, str] = {}


def write(folder: Path, text: str, name: str = "supd.toml") -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def load_text(folder: Path, text: str, environ: dict[str, str] | None = None) -> Config:
    return load(write(folder, text), environ=NO_ENV if environ is None else environ)


def problems(folder: Path, text: str) -> list[str]:
    """The lines `supd --check` would print for this main file."""
    with pytest.raises(ConfigError) as caught:
        load_text(folder, text)
    assert str(caught.value) == "\n".join(str(p) for p in caught.value.problems)
    return [str(problem) for problem in caught.value.problems]


def program(folder: Path, options: str, name: str = "web") -> ProgramConfig:
    body = textwrap.dedent(options)
    return load_text(folder, f"[programs.{name}]\n{body}").programs[name]


# -- good configurations ---------------------------------------------------------------


def test_minimal_program_needs_only_a_command(tmp_path: Path) -> None:
    config = load_text(tmp_path, '[programs.web]\ncommand = "sleep 10"\n')

    web = config.programs["web"]
    assert config.path == tmp_path / "supd.toml"
    assert config.sources == {"web": tmp_path / "supd.toml"}
    assert web.command == ("sleep", "10")
    assert web.numprocs == 1
    assert web.directory is None
    assert web.environment == {}
    assert (web.user, web.group, web.umask) == (None, None, None)
    assert web.priority == 999
    assert web.autostart is True
    assert web.autorestart == "on-failure"
    assert web.exitcodes == frozenset({0})
    assert (web.startsecs, web.startretries) == (1.0, 3)
    assert (web.backoff_initial, web.backoff_factor) == (1.0, 2.0)
    assert (web.backoff_max, web.backoff_reset) == (60.0, 60.0)
    assert web.stopsignal == signal.SIGTERM
    assert web.stopwaitsecs == 10.0
    assert web.killasgroup is True
    assert web.redirect_stderr is False
    for stream in ("stdout", "stderr"):
        assert web.log_maxbytes(stream) == 50 * 1024 * 1024
        assert web.log_backups(stream) == 10


def test_empty_file_is_a_valid_config_with_defaults(tmp_path: Path) -> None:
    config = load_text(tmp_path, "")

    assert config.programs == {}
    assert config.supervisor == SupervisorConfig(
        socket=tmp_path / "supd.sock",
        socket_mode=0o600,
        socket_group=None,
        log_dir=tmp_path / "logs",
        log_format="auto",
        log_level="info",
        include=(),
        subreaper=False,
    )


def test_every_option_is_read(tmp_path: Path) -> None:
    config = load_text(
        tmp_path,
        """
        [supervisor]
        socket = "run/ctl.sock"
        socket_mode = "0640"
        socket_group = "root"
        log_dir = "/var/log/supd"
        log_format = "JSON"
        log_level = "warn"
        include = ["more/*.toml"]
        subreaper = true
        cgroups = "off"

        [programs.web]
        command = ["python3", "-m", "http.server", "8000"]
        numprocs = 2
        directory = "/srv/web"
        environment = { PORT = "8000" }
        user = "www-data"
        group = "www-data"
        umask = "027"
        priority = 5
        autostart = false
        autorestart = "always"
        exitcodes = [0, 2]
        startsecs = 0.5
        startretries = 7
        backoff_initial = 0.25
        backoff_factor = 1.5
        backoff_max = 30
        backoff_reset = 120
        stopsignal = "INT"
        stopwaitsecs = 3
        killasgroup = false
        leftovers = "keep"
        memory_max = "512MB"
        cpu_max = "150%"
        pids_max = 64
        redirect_stderr = true
        stdout_logfile = "/var/log/web-{process_num}.log"
        stdout_logfile_maxbytes = "10MB"
        stdout_logfile_backups = 2
        stderr_logfile_maxbytes = 0
        stderr_logfile_backups = 0
        """,
    )

    assert config.supervisor == SupervisorConfig(
        socket=tmp_path / "run" / "ctl.sock",
        socket_mode=0o640,
        socket_group="root",
        log_dir=Path("/var/log/supd"),
        log_format="json",
        log_level="warning",
        include=("more/*.toml",),
        subreaper=True,
        cgroups="off",
    )
    web = config.programs["web"]
    assert web.leftovers == "keep"
    assert web.cgroup_limits() == {
        "memory_max": str(512 * 1024**2),
        "cpu_max": "150000 100000",
        "pids_max": "64",
    }
    assert web.command == ("python3", "-m", "http.server", "8000")
    assert web.process_names() == ["web:0", "web:1"]
    assert web.directory == Path("/srv/web")
    assert web.environment == {"PORT": "8000"}
    assert (web.user, web.group, web.umask, web.priority) == ("www-data", "www-data", 0o27, 5)
    assert (web.autostart, web.autorestart) == (False, "always")
    assert web.exitcodes == {0, 2}
    assert (web.startsecs, web.startretries) == (0.5, 7)
    assert (web.backoff_initial, web.backoff_factor) == (0.25, 1.5)
    assert (web.backoff_max, web.backoff_reset) == (30.0, 120.0)
    assert (web.stopsignal, web.stopwaitsecs, web.killasgroup) == (signal.SIGINT, 3.0, False)
    assert web.log_path("web:1", "stdout") == Path("/var/log/web-1.log")
    assert web.log_path("web:1", "stderr") is None  # redirected into stdout
    assert (web.log_maxbytes("stdout"), web.log_backups("stdout")) == (10 * 1024**2, 2)
    assert (web.log_maxbytes("stderr"), web.log_backups("stderr")) == (0, 0)


def test_the_example_config_loads() -> None:
    config = load(REPO / "config" / "supd.toml")

    assert config.supervisor.socket == REPO / "run" / "supd.sock"
    assert config.supervisor.log_dir == REPO / "logs"
    assert config.sources["hello"] == REPO / "config" / "conf.d" / "echo.toml"
    for prog in config.programs.values():
        for name in prog.process_names():
            for stream in ("stdout", "stderr"):
                path = prog.log_path(name, stream)
                assert path is None or path.parent == REPO / "logs"
    assert any(prog.numprocs > 1 for prog in config.programs.values())
    assert summary(config).startswith("config OK: ")


def test_summary_counts_programs_processes_and_files(tmp_path: Path) -> None:
    write(tmp_path, '[programs.b]\ncommand = "b"\nnumprocs = 3\n', "conf.d/b.toml")
    config = load_text(
        tmp_path,
        """
        [supervisor]
        include = ["conf.d/*.toml"]
        [programs.a]
        command = "a"
        """,
    )

    assert summary(config) == (
        f"config OK: 2 programs, 4 processes ({tmp_path / 'supd.toml'}, 1 included file)"
    )
    single = load_text(tmp_path, '[programs.a]\ncommand = "a"\n')
    assert summary(single) == f"config OK: 1 program, 1 process ({tmp_path / 'supd.toml'})"


# -- normalisation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ("true", "always"),
        ("false", "never"),
        ('"unexpected"', "on-failure"),
        ('"always"', "always"),
        ('"Never"', "never"),
        ('"on-failure"', "on-failure"),
    ],
)
def test_autorestart_accepts_supervisord_spellings(
    tmp_path: Path, written: str, expected: str
) -> None:
    web = program(tmp_path, f'command = "x"\nautorestart = {written}\n')

    assert web.autorestart == expected


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ('"TERM"', signal.SIGTERM),
        ('"SIGTERM"', signal.SIGTERM),
        ('"term"', signal.SIGTERM),
        ("15", signal.SIGTERM),
        ('"15"', signal.SIGTERM),
        ('"HUP"', signal.SIGHUP),
        ('"sigkill"', signal.SIGKILL),
        ('"USR2"', signal.SIGUSR2),
    ],
)
def test_stopsignal_becomes_a_signal_number(tmp_path: Path, written: str, expected: int) -> None:
    web = program(tmp_path, f'command = "x"\nstopsignal = {written}\n')

    assert web.stopsignal == expected
    assert type(web.stopsignal) is int


def test_stopsignal_numbers_are_ascii_digits_only(tmp_path: Path) -> None:
    found = problems(tmp_path, '[programs.web]\ncommand = "x"\nstopsignal = "\u0661\u0665"\n')
    assert len(found) == 1 and "stopsignal" in found[0] and "unknown signal" in found[0]


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ('"50MB"', 50 * 1024 * 1024),
        ('"1GB"', 1024**3),
        ('"10 kb"', 10 * 1024),
        ('"100"', 100),
        ('"7B"', 7),
        ("0", 0),
        ("12345", 12345),
    ],
)
def test_logfile_maxbytes_accepts_sizes(tmp_path: Path, written: str, expected: int) -> None:
    web = program(tmp_path, f'command = "x"\nstdout_logfile_maxbytes = {written}\n')

    assert web.log_maxbytes("stdout") == expected


@pytest.mark.parametrize(
    ("written", "expected"), [('"022"', 0o22), ('"0o077"', 0o77), ("0o027", 0o27), ("0", 0)]
)
def test_umask_is_octal(tmp_path: Path, written: str, expected: int) -> None:
    web = program(tmp_path, f'command = "x"\numask = {written}\n')

    assert web.umask == expected


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ("\"python3 -c 'print(1 + 1)' --flag\"", ("python3", "-c", "print(1 + 1)", "--flag")),
        ('"a \\"b c\\" d"', ("a", "b c", "d")),
        ('"echo $HOME | cat"', ("echo", "$HOME", "|", "cat")),
        ('["echo", "two words", ""]', ("echo", "two words", "")),
    ],
)
def test_command_is_split_like_a_shell_without_one(
    tmp_path: Path, written: str, expected: tuple[str, ...]
) -> None:
    web = program(tmp_path, f"command = {written}\n")

    assert web.command == expected


def test_environment_values_become_strings(tmp_path: Path) -> None:
    web = program(tmp_path, 'command = "x"\nenvironment = { A = 1, B = true, C = 1.5, D = "d" }')

    assert web.environment == {"A": "1", "B": "true", "C": "1.5", "D": "d"}


def test_a_single_exit_code_may_be_written_without_a_list(tmp_path: Path) -> None:
    web = program(tmp_path, 'command = "x"\nexitcodes = 2\n')

    assert web.exitcodes == frozenset({2})


def test_models_can_be_built_in_code_without_a_file() -> None:
    web = ProgramConfig(name="web", command="sleep 1", stopsignal="KILL")

    assert web.command == ("sleep", "1")
    assert web.stopsignal == signal.SIGKILL
    assert web.log_path("web", "stdout") == Path.cwd() / "logs" / "web.out.log"


# -- defaults that depend on where things are ----------------------------------------


def test_log_files_default_to_log_dir_and_process_name(tmp_path: Path) -> None:
    config = load_text(
        tmp_path,
        """
        [supervisor]
        log_dir = "../shared-logs"
        [programs.web]
        command = "x"
        numprocs = 2
        [programs.db]
        command = "x"
        """,
    )

    logs = tmp_path.parent / "shared-logs"
    web, db = config.programs["web"], config.programs["db"]
    assert web.log_path("web:0", "stdout") == logs / "web:0.out.log"
    assert web.log_path("web:1", "stderr") == logs / "web:1.err.log"
    assert db.log_path("db", "stdout") == logs / "db.out.log"
    assert db.log_path("db", "stderr") == logs / "db.err.log"


def test_default_log_dir_is_logs_beside_the_config(tmp_path: Path) -> None:
    web = program(tmp_path, 'command = "x"')

    assert web.log_path("web", "stdout") == tmp_path / "logs" / "web.out.log"


def test_braces_in_log_dir_are_not_placeholders(tmp_path: Path) -> None:
    config = load_text(tmp_path, '[supervisor]\nlog_dir = "{odd}"\n[programs.web]\ncommand = "x"')

    web_log = config.programs["web"].log_path("web", "stdout")
    assert web_log == tmp_path / "{odd}" / "web.out.log"


def test_log_path_placeholders_are_expanded(tmp_path: Path) -> None:
    web = program(
        tmp_path,
        """
        command = "x"
        numprocs = 3
        stdout_logfile = "out/{program}-{process_num:02d}.log"
        stderr_logfile = "err/{process_name}.log"
        """,
    )

    assert web.log_path("web:2", "stdout") == tmp_path / "out" / "web-02.log"
    assert web.log_path("web:2", "stderr") == tmp_path / "err" / "web:2.log"
    with pytest.raises(ValueError, match="not a process of"):
        web.log_path("web:3", "stdout")


@pytest.mark.parametrize("written", ['"none"', '"NONE"', '"None"'])
def test_none_discards_a_stream(tmp_path: Path, written: str) -> None:
    web = program(tmp_path, f'command = "x"\nstdout_logfile = {written}\n')

    assert web.log_path("web", "stdout") is None
    assert web.log_path("web", "stderr") == tmp_path / "logs" / "web.err.log"


def test_socket_defaults_beside_the_config(tmp_path: Path) -> None:
    config = load_text(tmp_path, "")

    assert config.supervisor.socket == tmp_path / "supd.sock"
    assert config.supervisor.socket_mode == 0o600


def test_socket_defaults_into_runtime_directory(tmp_path: Path) -> None:
    environ = {"RUNTIME_DIRECTORY": "/run/supd:/run/other"}

    config = load_text(tmp_path, "", environ=environ)

    assert config.supervisor.socket == Path("/run/supd/supd.sock")


def test_explicit_socket_beats_runtime_directory(tmp_path: Path) -> None:
    config = load_text(tmp_path, '[supervisor]\nsocket = "x.sock"', {"RUNTIME_DIRECTORY": "/run"})

    assert config.supervisor.socket == tmp_path / "x.sock"


def test_socket_group_makes_the_socket_group_writable(tmp_path: Path) -> None:
    config = load_text(tmp_path, '[supervisor]\nsocket_group = "root"\n')

    assert config.supervisor.socket_mode == 0o660


def test_relative_paths_follow_the_config_file_not_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_dir = tmp_path / "etc"
    monkeypatch.chdir(tmp_path)
    write(config_dir, '[programs.web]\ncommand = "x"\ndirectory = "../srv"\n')

    config = load("etc/supd.toml", environ=NO_ENV)

    assert config.path == config_dir / "supd.toml"
    assert config.programs["web"].directory == tmp_path / "srv"


def test_process_names(tmp_path: Path) -> None:
    one = program(tmp_path, 'command = "x"')
    three = program(tmp_path, 'command = "x"\nnumprocs = 3')

    assert one.process_names() == ["web"]
    assert three.process_names() == ["web:0", "web:1", "web:2"]


def test_equal_configs_compare_equal_and_changes_do_not(tmp_path: Path) -> None:
    text = '[programs.web]\ncommand = "x"\nenvironment = { A = "1", B = "2" }\n'
    first = load_text(tmp_path, text).programs["web"]
    again = load_text(tmp_path, text.replace('A = "1", B = "2"', 'B = "2", A = "1"'))
    changed = load_text(tmp_path, text + "stopwaitsecs = 11\n").programs["web"]

    assert first == again.programs["web"]
    assert hash(first) == hash(again.programs["web"])
    assert first != changed
    with pytest.raises(Exception, match="frozen"):
        first.numprocs = 2


# -- includes --------------------------------------------------------------------------


def test_includes_add_programs_in_glob_order(tmp_path: Path) -> None:
    write(tmp_path, '[programs.b]\ncommand = "b"\ndirectory = "work"\n', "conf.d/20-b.toml")
    write(tmp_path, '[programs.a]\ncommand = "a"\nstdout_logfile = "a.log"\n', "conf.d/10-a.toml")
    write(tmp_path, '[programs.z]\ncommand = "z"\n', "conf.d/ignored.txt")

    config = load_text(
        tmp_path,
        """
        [supervisor]
        include = ["conf.d/*.toml", "missing/*.toml"]
        [programs.main]
        command = "m"
        """,
    )

    assert list(config.programs) == ["main", "a", "b"]
    conf_d = tmp_path / "conf.d"
    assert config.sources == {
        "main": tmp_path / "supd.toml",
        "a": conf_d / "10-a.toml",
        "b": conf_d / "20-b.toml",
    }
    # Relative paths in an included file follow that file; defaults follow log_dir.
    assert config.programs["b"].directory == conf_d / "work"
    assert config.programs["a"].log_path("a", "stdout") == conf_d / "a.log"
    assert config.programs["a"].log_path("a", "stderr") == tmp_path / "logs" / "a.err.log"


def test_an_include_glob_never_reads_the_main_file_twice(tmp_path: Path) -> None:
    write(tmp_path, '[programs.b]\ncommand = "b"\n', "b.toml")

    config = load_text(tmp_path, '[supervisor]\ninclude = ["*.toml"]\n[programs.a]\ncommand = "a"')

    assert list(config.programs) == ["a", "b"]


def test_a_program_defined_twice_names_both_files(tmp_path: Path) -> None:
    write(tmp_path, '# one\n[programs.web]\ncommand = "again"\n', "conf.d/a.toml")
    write(tmp_path, '[programs.web]\ncommand = "and again"\n', "conf.d/b.toml")
    main = tmp_path / "supd.toml"

    found = problems(
        tmp_path,
        """
        [supervisor]
        include = ["conf.d/*.toml"]

        [programs.web]
        command = "x"
        """,
    )

    assert found == [
        f"{tmp_path}/conf.d/a.toml:2: programs.web: program defined more than once "
        f"(first in {main}:4)",
        f"{tmp_path}/conf.d/b.toml:1: programs.web: program defined more than once "
        f"(first in {main}:4)",
    ]


def test_an_included_file_may_hold_only_programs_and_groups(tmp_path: Path) -> None:
    write(tmp_path, '[supervisor]\nsubreaper = true\n[programs.a]\ncommand = "a"\n', "inc.toml")

    found = problems(tmp_path, '[supervisor]\ninclude = ["inc.toml"]\n')

    assert found == [
        f"{tmp_path}/inc.toml:1: supervisor: an included file may contain only "
        "[programs.NAME] and [groups.NAME] tables"
    ]


def test_syntax_error_in_an_include_names_that_file(tmp_path: Path) -> None:
    write(tmp_path, '[programs.a]\ncommand = "a\n', "inc.toml")

    found = problems(tmp_path, '[supervisor]\ninclude = ["inc.toml"]\n[programs.b]\ncommand = 1')

    assert found == [
        f"{tmp_path}/supd.toml:4: programs.b.command: should be a string or a list of strings "
        "(got 1)",
        f"{tmp_path}/inc.toml:2:13: invalid TOML: Illegal character '\\n'",
    ]


# -- bad configurations: every problem, located ----------------------------------------


def test_wrong_type_is_reported_at_its_line(tmp_path: Path) -> None:
    found = problems(tmp_path, '[programs.web]\ncommand = "x"\nstartsecs = "1"\n')

    assert found == [
        f'{tmp_path}/supd.toml:3: programs.web.startsecs: Input should be a valid number (got "1")'
    ]


def test_negative_startsecs(tmp_path: Path) -> None:
    found = problems(tmp_path, '[programs.web]\ncommand = "x"\n\nstartsecs = -1\n')

    assert found == [
        f"{tmp_path}/supd.toml:4: programs.web.startsecs: "
        "Input should be greater than or equal to 0 (got -1)"
    ]


def test_unknown_option_suggests_the_closest_name(tmp_path: Path) -> None:
    found = problems(tmp_path, '[programs.web]\ncommand = "x"\nstartsec = 1\nfrobnicate = 2\n')

    assert found == [
        f"{tmp_path}/supd.toml:3: programs.web.startsec: unknown option "
        "(did you mean 'startsecs'?)",
        f"{tmp_path}/supd.toml:4: programs.web.frobnicate: unknown option",
    ]


def test_missing_command_points_at_the_table_header(tmp_path: Path) -> None:
    found = problems(tmp_path, "[supervisor]\n\n[programs.web]\nnumprocs = 2\n")

    assert found == [f"{tmp_path}/supd.toml:3: programs.web.command: required option is missing"]


def test_bad_stopsignal(tmp_path: Path) -> None:
    found = problems(tmp_path, '[programs.web]\ncommand = "x"\nstopsignal = "TERMINATE"\n')

    assert found == [
        f"{tmp_path}/supd.toml:3: programs.web.stopsignal: unknown signal; "
        'use a name like TERM or a number (got "TERMINATE")'
    ]


def test_syntax_error_gives_line_and_column(tmp_path: Path) -> None:
    found = problems(tmp_path, '[programs.web]\ncommand = "x"\nstartsecs = = 1\n')

    assert found == [f"{tmp_path}/supd.toml:3:13: invalid TOML: Invalid value"]


def test_supervisord_section_syntax_gets_a_hint(tmp_path: Path) -> None:
    found = problems(tmp_path, '[program:web]\ncommand = "x"\n')

    assert len(found) == 1
    assert found[0].startswith(f"{tmp_path}/supd.toml:1:")
    assert found[0].endswith(
        "supd's tables are [programs.NAME], not supervisord's [program:NAME]; this looks like "
        "a supervisord config (INI); convert it with `supd import FILE -o supd.toml`"
    )


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        """
        [supervisor]
        log_level = "loud"
        socket_mode = "999"

        [programs.web]
        command = ""
        startretries = -2
        backoff_factor = 0.5

        [programs.db]
        command = "x"
        environment = { PORT = [1] }
        exitcodes = [0, 256]

        [programs."bad:name"]
        command = "x"
        """,
    )

    assert found == [
        f"{tmp_path}/supd.toml:2: supervisor.log_level: "
        "Input should be 'debug', 'info', 'warning' or 'error' (got \"loud\")",
        f"{tmp_path}/supd.toml:3: supervisor.socket_mode: "
        "should be an octal mode like '022' (got \"999\")",
        f"{tmp_path}/supd.toml:6: programs.web.command: "
        'should name a program to run, not be empty (got "")',
        f"{tmp_path}/supd.toml:7: programs.web.startretries: "
        "Input should be greater than or equal to 0 (got -2)",
        f"{tmp_path}/supd.toml:8: programs.web.backoff_factor: "
        "Input should be greater than or equal to 1 (got 0.5)",
        f"{tmp_path}/supd.toml:12: programs.db.environment.PORT: Input should be a valid string",
        f"{tmp_path}/supd.toml:13: programs.db.exitcodes[1]: "
        "Input should be less than or equal to 255 (got 256)",
        f'{tmp_path}/supd.toml:15: programs."bad:name": a program name may use only letters, '
        "digits, '_', '-' and '.' (':' separates the process number)",
    ]


@pytest.mark.parametrize(
    ("options", "key", "message"),
    [
        ('command = "a \'b"', "command", "cannot split command: No closing quotation"),
        ("command = []", "command", "should name a program to run, not be empty"),
        ('command = ["a", 1]', "command[1]", "Input should be a valid string (got 1)"),
        ('command = "x"\nnumprocs = 0', "numprocs", "greater than or equal to 1 (got 0)"),
        (
            'command = "x"\nnumprocs = true',
            "numprocs",
            "Input should be a valid integer (got true)",
        ),
        ('command = "x"\nstartsecs = nan', "startsecs", "Input should be a finite number"),
        ('command = "x"\nstopwaitsecs = 1e12', "stopwaitsecs", "less than or equal to"),
        ('command = "x"\numask = "8"', "umask", "should be an octal umask like '022'"),
        ('command = "x"\numask = 512', "umask", "between 000 and 777"),
        ('command = "x"\nstopsignal = 0', "stopsignal", "no such signal number"),
        ('command = "x"\nstopsignal = 1.5', "stopsignal", "Input should be a valid integer"),
        ('command = "x"\nautorestart = "sometimes"', "autorestart", "Input should be 'always'"),
        ('command = "x"\nstdout_logfile_maxbytes = "5TB"', "stdout_logfile_maxbytes", "50MB"),
        ('command = "x"\nstdout_logfile_maxbytes = -1', "stdout_logfile_maxbytes", "than or"),
        ('command = "x"\ndirectory = ""', "directory", "should be a path, not an empty string"),
        ('command = "x"\ndirectory = 5', "directory", "Input should be an instance of Path"),
        ('command = "x"\nuser = ""', "user", "at least 1 character"),
        ('command = "x"\nenvironment = { "A=B" = "1" }', "environment", "must not contain '='"),
        ('command = "x"\nenvironment = "A=1"', "environment", "should be a table"),
        ('command = "x"\nstdout_logfile = "{pid}.log"', "stdout_logfile", "unknown placeholder"),
        ('command = "x"\nstdout_logfile = "{x"', "stdout_logfile", "bad placeholder"),
        ('command = "x"\nname = "other"', "name", "a program is named by its table"),
    ],
)
def test_invalid_program_options(tmp_path: Path, options: str, key: str, message: str) -> None:
    found = problems(tmp_path, f"[programs.web]\n{options}\n")

    assert len(found) == 1, found
    assert f": programs.web.{key}: " in found[0]
    assert message in found[0]


def test_processes_cannot_share_an_explicit_log_file(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        '[programs.web]\ncommand = "x"\nnumprocs = 2\nstdout_logfile = "web.log"\n',
    )

    assert found == [
        f"{tmp_path}/supd.toml:4: programs.web.stdout_logfile: numprocs = 2 but the path has "
        "no {process_num} or {process_name}: two processes cannot share one log file"
    ]


def test_stderr_logfile_with_redirect_stderr_is_an_error(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        '[programs.web]\ncommand = "x"\nredirect_stderr = true\nstderr_logfile = "e.log"\n',
    )

    assert found == [
        f"{tmp_path}/supd.toml:4: programs.web.stderr_logfile: has no effect with "
        "redirect_stderr = true (stderr goes to the stdout log); remove one of them"
    ]


def test_stdout_and_stderr_cannot_share_a_file(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        '[programs.web]\ncommand = "x"\nstdout_logfile = "a.log"\nstderr_logfile = "./a.log"\n',
    )

    assert found == [
        f"{tmp_path}/supd.toml:4: programs.web.stderr_logfile: is the same file as "
        "stdout_logfile; set redirect_stderr = true to merge the streams"
    ]


def test_two_programs_cannot_share_a_log_file(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        """
        [programs.a]
        command = "x"
        stdout_logfile = "shared.log"
        [programs.b]
        command = "x"
        stdout_logfile = "shared.log"
        """,
    )

    assert found == [
        f"{tmp_path}/supd.toml:6: programs.b.stdout_logfile: log file {tmp_path}/shared.log "
        "is also written by programs.a.stdout_logfile"
    ]


def test_unknown_tables_and_top_level_keys(tmp_path: Path) -> None:
    found = problems(tmp_path, 'command = "x"\n[program.web]\ncommand = "x"\n')

    assert found == [
        f"{tmp_path}/supd.toml:1: command: unknown table; "
        "supd reads [supervisor], [programs.NAME] and [groups.NAME]",
        f"{tmp_path}/supd.toml:2: program: unknown table; "
        "supd reads [supervisor], [programs.NAME] and [groups.NAME] (did you mean [programs]?)",
    ]


def test_tables_must_be_tables(tmp_path: Path) -> None:
    found = problems(tmp_path, 'supervisor = 1\nprograms = { web = "x" }\n')

    assert found == [
        f"{tmp_path}/supd.toml:1: supervisor: should be a table: [supervisor]",
        f"{tmp_path}/supd.toml:2: programs.web: should be a table: [programs.NAME]",
    ]


def test_socket_path_must_fit_a_unix_socket(tmp_path: Path) -> None:
    found = problems(tmp_path, f'[supervisor]\nsocket = "/{"x" * 120}"\n')

    assert found == [
        f"{tmp_path}/supd.toml:2: supervisor.socket: "
        "path is 121 bytes long; a UNIX socket path can have at most 107"
    ]


def test_unreadable_and_undecodable_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b'[programs.web]\ncommand = "\xff"\n')

    with pytest.raises(ConfigError) as not_found:
        load(missing)
    with pytest.raises(ConfigError) as not_utf8:
        load(binary)

    assert str(not_found.value) == f"{missing}: cannot read config file: No such file or directory"
    assert str(not_utf8.value) == f"{binary}:2: not valid UTF-8 text"


def test_problem_formats() -> None:
    file = Path("/etc/supd.toml")

    assert str(Problem(file, 3, 7, "", "invalid TOML: x")) == "/etc/supd.toml:3:7: invalid TOML: x"
    assert str(Problem(file, 3, None, "programs.a", "m")) == "/etc/supd.toml:3: programs.a: m"
    assert str(Problem(file, None, None, "", "m")) == "/etc/supd.toml: m"
    error = ConfigError([Problem(file, 1, None, "a", "x"), Problem(file, 2, None, "b", "y")])
    assert str(error) == "/etc/supd.toml:1: a: x\n/etc/supd.toml:2: b: y"


# -- locating keys in the text ---------------------------------------------------------


def test_lines_are_found_for_every_way_of_writing_a_key(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        '''
        programs.a.command = "x"
        programs.a.startsecs = -1

        [programs."b"]
        command = """
        startsecs = 'this is not a key'
        """
        environment.X = [1]
        startsecs = -2  # the real one

        [programs.c.environment]
        Y = { z = 1 }

        [programs.c]
        command = ["x", # comment with a ] bracket
          "y"]
        stopsignal = "NOPE"
        ''',
    )

    assert [line.split(": ", 2)[0:2] for line in found] == [
        [f"{tmp_path}/supd.toml:2", "programs.a.startsecs"],
        [f"{tmp_path}/supd.toml:8", "programs.b.environment.X"],
        [f"{tmp_path}/supd.toml:9", "programs.b.startsecs"],
        [f"{tmp_path}/supd.toml:12", "programs.c.environment.Y"],
        [f"{tmp_path}/supd.toml:17", "programs.c.stopsignal"],
    ]


def test_locator_falls_back_to_the_enclosing_table() -> None:
    locator = KeyLocator('\n[programs.web]\ncommand = "x"\n')

    assert locator.line_of(("programs", "web", "command")) == 3
    assert locator.line_of(("programs", "web", "missing")) == 2
    assert locator.line_of(("programs", "web", "command", 0)) == 3
    assert locator.line_of(("elsewhere",)) is None


# -- robustness ------------------------------------------------------------------------

TOML_FRAGMENTS = st.sampled_from(
    [
        "[programs.web]",
        "[programs.",
        "[[programs]]",
        "[supervisor]",
        "command",
        "numprocs",
        "stopsignal",
        "stdout_logfile",
        "environment",
        "include",
        "log_dir",
        " = ",
        "=",
        '"',
        "'",
        '"""',
        "'''",
        "{",
        "}",
        "[",
        "]",
        ",",
        ".",
        "#",
        "\n",
        "\\",
        "1",
        "-3",
        "0o17",
        "1e400",
        "nan",
        "true",
        "1979-05-27T07:32:00Z",
        '"TERM"',
        '"50MB"',
        '"{process_num}"',
        '"none"',
        '"x y"',
        "\x00",
        "\ufeff",
        "é",
    ]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(TOML_FRAGMENTS, st.text(max_size=5)), max_size=40))
def test_any_text_gives_a_config_or_a_config_error(
    tmp_path_factory: pytest.TempPathFactory, fragments: list[str]
) -> None:
    folder = tmp_path_factory.mktemp("fuzz", numbered=True)
    path = folder / "supd.toml"
    path.write_bytes("".join(fragments).encode("utf-8", "surrogatepass"))

    try:
        load(path, environ=NO_ENV)
    except ConfigError as error:
        assert error.problems
        assert all(problem.file == path for problem in error.problems)


TOML_VALUES: st.SearchStrategy[Any] = st.recursive(
    st.one_of(
        st.booleans(),
        st.integers(min_value=-(2**63), max_value=2**63 - 1),
        st.floats(),
        st.text(max_size=8),
        st.sampled_from(["TERM", "50MB", "022", "none", "{process_num}", "always", "x y"]),
    ),
    lambda inner: st.lists(inner, max_size=3),
    max_leaves=5,
)
PROGRAM_OPTIONS = [*ProgramConfig.model_fields, "bogus"]


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return {"inf": "inf", "-inf": "-inf", "nan": "nan"}.get(repr(value), repr(value))
    if isinstance(value, str):
        escaped = "".join(f"\\u{ord(c):04x}" if c < " " or c in '"\\\x7f' else c for c in value)
        return f'"{escaped}"'.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    return str(value)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(PROGRAM_OPTIONS), TOML_VALUES, max_size=8))
def test_any_option_values_give_a_config_or_located_problems(
    tmp_path_factory: pytest.TempPathFactory, options: dict[str, Any]
) -> None:
    folder = tmp_path_factory.mktemp("values", numbered=True)
    lines = [f"{key} = {toml_value(value)}" for key, value in options.items()]
    path = folder / "supd.toml"
    path.write_text("[programs.p]\n" + "\n".join(lines) + "\n")

    try:
        config = load(path, environ=NO_ENV)
    except ConfigError as error:
        assert all(problem.line is not None for problem in error.problems), error
    else:
        prog = config.programs["p"]
        for name in prog.process_names():
            prog.log_path(name, "stdout")
            prog.log_path(name, "stderr")
        assert os.fspath(config.path) == os.fspath(path)


# -- limits and the socket path (issue 10, 11) -------------------------------------------


def test_numprocs_has_an_upper_bound_per_program(tmp_path: Path) -> None:
    found = problems(tmp_path, '[programs.web]\ncommand = "x"\nnumprocs = 1001\n')
    assert len(found) == 1
    assert found[0].startswith(f"{tmp_path / 'supd.toml'}:3: programs.web.numprocs: ")
    assert "1000" in found[0]


def test_numprocs_has_an_upper_bound_in_total(tmp_path: Path) -> None:
    tables = "".join(
        f'[programs.p{n:02}]\ncommand = "x"\nnumprocs = 1000\nstdout_logfile = "none"\n'
        f'stderr_logfile = "none"\n\n'
        for n in range(11)
    )
    found = problems(tmp_path, tables)
    assert len(found) == 1
    # The eleventh program (lines 61-65) takes the total over 10,000.
    assert found[0].startswith(f"{tmp_path / 'supd.toml'}:63: programs.p10.numprocs: ")
    assert "11000 processes in all, more than the limit of 10000" in found[0]


def test_socket_group_must_exist(tmp_path: Path) -> None:
    found = problems(tmp_path, '[supervisor]\nsocket_group = "nosuchgroup"\n')
    assert found == [
        f"{tmp_path / 'supd.toml'}:2: supervisor.socket_group: unknown group 'nosuchgroup'"
        ' (got "nosuchgroup")'
    ]
    assert load_text(tmp_path, '[supervisor]\nsocket_group = "4242"\n')  # a gid will do


def test_socket_path_must_not_be_a_file_or_folder_or_under_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    (tmp_path / "dir").mkdir()
    for socket, message in (
        ("file", "exists and is not a socket"),
        ("dir", "is a folder, not a socket"),
        ("file/a/b.sock", f"{tmp_path / 'file'} is not a folder"),
    ):
        found = problems(tmp_path, f'[supervisor]\nsocket = "{socket}"\n')
        assert len(found) == 1 and message in found[0], found


# -- leftovers and cgroup limits -------------------------------------------------------


def test_leftovers_are_killed_and_cgroups_used_by_default(tmp_path: Path) -> None:
    config = load_text(tmp_path, '[programs.web]\ncommand = "sleep 1"\n')
    assert config.supervisor.cgroups == "auto"
    assert config.programs["web"].leftovers == "kill"
    assert config.programs["web"].cgroup_limits() == {}


@pytest.mark.parametrize(
    ("option", "written", "expected"),
    [
        ("memory_max", '"max"', "max"),
        ("memory_max", "1048576", "1048576"),
        ("memory_max", '"1GB"', str(1024**3)),
        ("cpu_max", '"max"', "max"),
        ("cpu_max", '"50%"', "50000 100000"),
        ("cpu_max", '"20000 50000"', "20000 50000"),
        ("cpu_max", '"max 100000"', "max 100000"),
        ("pids_max", '"max"', "max"),
        ("pids_max", "1", "1"),
    ],
)
def test_limits_are_written_as_the_cgroup_files_take_them(
    tmp_path: Path, option: str, written: str, expected: str
) -> None:
    web = program(tmp_path, f'command = "sleep 1"\n{option} = {written}\n')
    assert web.cgroup_limits() == {option: expected}


@pytest.mark.parametrize(
    ("option", "written"),
    [
        ("memory_max", "0"),
        ("memory_max", '"lots"'),
        ("cpu_max", '"0%"'),
        ("cpu_max", '"half"'),
        ("cpu_max", '"100000 0"'),
        ("pids_max", "0"),
        ("leftovers", '"maybe"'),
    ],
)
def test_bad_limits_and_leftovers_are_config_problems(
    tmp_path: Path, option: str, written: str
) -> None:
    found = problems(tmp_path, f'[programs.web]\ncommand = "sleep 1"\n{option} = {written}\n')
    assert len(found) == 1 and f"programs.web.{option}" in found[0] and ":3:" in found[0], found


def test_cgroups_is_auto_or_off(tmp_path: Path) -> None:
    [found] = problems(tmp_path, '[supervisor]\ncgroups = "on"\n')
    assert "supervisor.cgroups" in found and ":2:" in found
