"""Config features for supervisord users: ${VAR} expansion, the global environment,
process_name templates, numprocs_start, groups, and hints for supervisord syntax."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from supd.config import Config, ConfigError, expand_variables, load
from tests.helpers import Supd, cmd, wait_until

ENV = {"HOME": "/home/app", "EMPTY": "", "PORT": "8000", "ARGS": "-a -b"}


def write(folder: Path, text: str, name: str = "supd.toml") -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def load_text(folder: Path, text: str, environ: dict[str, str] | None = None) -> Config:
    return load(write(folder, text), environ=ENV if environ is None else environ)


def problems(folder: Path, text: str, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_text(folder, text, environ)
    return [str(problem) for problem in caught.value.problems]


# -- ${VAR} expansion --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("${HOME}/app", "/home/app/app"),
        ("${MISSING:-/srv}", "/srv"),
        ("${EMPTY:-fallback}", "fallback"),  # as in a shell: empty takes the default
        ("${EMPTY}", ""),
        ("${PORT:-80}", "8000"),
        ("$$HOME and $$${HOME}", "$HOME and $/home/app"),
        ("$HOME stays", "$HOME stays"),
        ("cost: 5$", "cost: 5$"),
        ("${MISSING:-a:-b}", "a:-b"),
    ],
)
def test_expand_variables(text: str, expected: str) -> None:
    assert expand_variables(text, ENV) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("${MISSING}", "${MISSING} is not set in supd's environment"),
        ("${HOME", "unclosed ${"),
        ("${1X}", "is not ${VAR} or ${VAR:-default}"),
        ("${}", "is not ${VAR} or ${VAR:-default}"),
    ],
)
def test_expand_variables_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("$", r"\$").replace("{", r"\{")):
        expand_variables(text, ENV)


def test_variables_expand_in_command_environment_directory_and_log_paths(
    tmp_path: Path,
) -> None:
    config = load_text(
        tmp_path,
        """
        [programs.web]
        command = "serve --port ${PORT} ${ARGS} '${ARGS}' $$5"
        directory = "${HOME}/site"
        environment = { DATA = "${HOME}/data", PLAIN = "x$y" }
        stdout_logfile = "${LOGS:-/var/log}/{program}.log"
        """,
    )

    web = config.programs["web"]
    # Expanded before the string is split, as a shell would (no shell runs).
    assert web.command == ("serve", "--port", "8000", "-a", "-b", "-a -b", "$5")
    assert web.directory == Path("/home/app/site")
    assert web.environment == {"DATA": "/home/app/data", "PLAIN": "x$y"}
    assert web.log_path("web", "stdout") == Path("/var/log/web.log")


def test_a_list_command_expands_each_argument_alone(tmp_path: Path) -> None:
    config = load_text(tmp_path, '[programs.web]\ncommand = ["run", "${ARGS}"]\n')

    assert config.programs["web"].command == ("run", "-a -b")


def test_braces_in_a_variable_are_not_log_placeholders(tmp_path: Path) -> None:
    config = load_text(
        tmp_path,
        '[programs.web]\ncommand = "x"\nstdout_logfile = "${D}/{program}.log"\n',
        {"D": "/tmp/{odd}"},
    )

    assert config.programs["web"].log_path("web", "stdout") == Path("/tmp/{odd}/web.log")


def test_an_unset_variable_is_an_error_at_its_line(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        """
        [programs.web]
        command = "serve"
        directory = "${APP_DIR}"
        environment = { A = "${NOPE}" }
        """,
    )

    assert found == [
        f"{tmp_path}/supd.toml:3: programs.web.directory: ${{APP_DIR}} is not set in supd's "
        'environment; set it, or give a default: ${APP_DIR:-default} (got "${APP_DIR}")',
        f"{tmp_path}/supd.toml:4: programs.web.environment: A: ${{NOPE}} is not set in supd's "
        "environment; set it, or give a default: ${NOPE:-default}",
    ]


def test_variables_expand_in_log_dir_and_socket(tmp_path: Path) -> None:
    config = load_text(
        tmp_path,
        """
        [supervisor]
        log_dir = "${HOME}/logs"
        socket = "${HOME}/run/supd.sock"

        [programs.web]
        command = "serve"
        """,
    )
    assert config.supervisor.log_dir == Path("/home/app/logs")
    assert config.supervisor.socket == Path("/home/app/run/supd.sock")
    web = config.programs["web"]
    assert web.log_path("web", "stdout") == Path("/home/app/logs/web.out.log")
    # A '$' in the expanded folder is literal in the derived log paths.
    dollar = load_text(tmp_path, '[supervisor]\nlog_dir = "a$$b"\n[programs.web]\ncommand = "x"\n')
    assert dollar.programs["web"].log_path("web", "stdout") == tmp_path / "a$b" / "web.out.log"
    found = problems(tmp_path, '[supervisor]\nlog_dir = "${NOPE}/logs"\n')
    assert found == [
        f"{tmp_path}/supd.toml:2: supervisor.log_dir: ${{NOPE}} is not set in supd's "
        'environment; set it, or give a default: ${NOPE:-default} (got "${NOPE}/logs")'
    ]


def test_supctl_finds_a_socket_written_with_a_variable(tmp_path: Path) -> None:
    from supd.ctl import UsageError, socket_from_config

    path = write(tmp_path, '[supervisor]\nsocket = "${RUN:-/run/app}/supd.sock"\n')
    assert socket_from_config(str(path), {"RUN": "/srv/run"}) == "/srv/run/supd.sock"
    assert socket_from_config(str(path), {}) == "/run/app/supd.sock"
    write(tmp_path, '[supervisor]\nsocket = "${RUN}/supd.sock"\n')
    with pytest.raises(UsageError, match=r"supervisor.socket: \$\{RUN\} is not set"):
        socket_from_config(str(path), {})


def test_variables_come_from_supds_environment_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SUPD_TEST_VALUE", "from-env")
    config = load(write(tmp_path, '[programs.web]\ncommand = "echo ${SUPD_TEST_VALUE}"\n'))

    assert config.programs["web"].command == ("echo", "from-env")


# -- the global environment ---------------------------------------------------------------


def test_programs_inherit_the_global_environment_and_override_it(tmp_path: Path) -> None:
    config = load_text(
        tmp_path,
        """
        [supervisor]
        environment = { TZ = "UTC", LEVEL = "info", HOME_COPY = "${HOME}" }

        [programs.web]
        command = "x"
        environment = { LEVEL = "debug" }

        [programs.worker]
        command = "y"
        """,
    )

    assert config.supervisor.environment == {"TZ": "UTC", "LEVEL": "info", "HOME_COPY": "/home/app"}
    assert config.programs["web"].environment == {
        "TZ": "UTC",
        "LEVEL": "debug",
        "HOME_COPY": "/home/app",
    }
    assert config.programs["worker"].environment["LEVEL"] == "info"


def test_a_change_to_the_global_environment_changes_the_programs(tmp_path: Path) -> None:
    """A reload compares ProgramConfigs: the inherited environment is part of them."""
    before = load_text(
        tmp_path, '[supervisor]\nenvironment = { A = "1" }\n[programs.w]\ncommand = "x"\n'
    )
    after = load_text(
        tmp_path, '[supervisor]\nenvironment = { A = "2" }\n[programs.w]\ncommand = "x"\n'
    )
    same = load_text(
        tmp_path, '[supervisor]\nenvironment = { A = "1" }\n[programs.w]\ncommand = "x"\n'
    )

    assert before.programs["w"] != after.programs["w"]
    assert before.programs["w"] == same.programs["w"]


def test_supervisord_environment_string_gets_the_table_spelling(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        """
        [programs.web]
        command = "x"
        environment = 'A="1",B="x,y",C=plain'
        """,
    )

    assert found == [
        f"{tmp_path}/supd.toml:3: programs.web.environment: should be a table; supervisord's "
        'KEY=value list is written in supd as { A = "1", B = "x,y", C = "plain" }'
        ' (got "A=\\"1\\",B=\\"x,y\\",C=plain")'
    ]


# -- process names --------------------------------------------------------------------------


def test_process_name_templates_with_padding_and_numprocs_start(tmp_path: Path) -> None:
    config = load_text(
        tmp_path,
        """
        [programs.worker]
        command = "x"
        numprocs = 3
        numprocs_start = 8
        process_name = "{program}_{process_num:02d}"
        stdout_logfile = "/logs/{process_num:03d}-{process_name}.log"
        """,
    )

    worker = config.programs["worker"]
    assert worker.process_names() == ["worker:worker_08", "worker:worker_09", "worker:worker_10"]
    assert worker.log_path("worker:worker_10", "stdout") == Path("/logs/010-worker:worker_10.log")


def test_numprocs_start_shifts_the_default_names(tmp_path: Path) -> None:
    config = load_text(tmp_path, '[programs.w]\ncommand = "x"\nnumprocs = 2\nnumprocs_start = 1\n')

    assert config.programs["w"].process_names() == ["w:1", "w:2"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ('numprocs = 2\nprocess_name = "{program}"', "numprocs = 2 but the template has no"),
        ('process_name = "{nope}"', "unknown placeholder {nope}"),
        ('process_name = "{process_num:q}"', "bad placeholder"),
        ('process_name = "a b"', "gives 'a b'; a process name may use only letters"),
        ('process_name = "a:b"', "gives 'a:b'"),  # only the group adds a ':'
    ],
)
def test_bad_process_name_templates(tmp_path: Path, options: str, message: str) -> None:
    found = problems(tmp_path, f'[programs.w]\ncommand = "x"\n{options}\n')

    assert len(found) == 1
    assert found[0].startswith(f"{tmp_path}/supd.toml:")
    assert "programs.w.process_name: " in found[0]
    assert message in found[0]


def test_process_names_are_unique_across_the_config(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        """
        [groups.g]
        programs = ["a", "b"]

        [programs.a]
        command = "x"
        process_name = "same"

        [programs.b]
        command = "x"
        process_name = "same"
        """,
    )

    assert found == [
        f"{tmp_path}/supd.toml:10: programs.b.process_name: process name g:same is also "
        "used by a; names must be unique"
    ]


# -- groups ---------------------------------------------------------------------------------


def test_groups_name_their_processes_group_colon_process(tmp_path: Path) -> None:
    config = load_text(
        tmp_path,
        """
        [groups.site]
        programs = ["web", "worker", "site"]
        priority = 10

        [programs.web]
        command = "x"
        priority = 5

        [programs.worker]
        command = "x"
        numprocs = 2

        [programs.site]
        command = "x"

        [programs.alone]
        command = "x"
        priority = 1
        """,
    )

    assert config.groups["site"].programs == ("web", "worker", "site")
    assert config.programs["web"].process_names() == ["site:web"]
    assert config.programs["worker"].process_names() == ["site:worker_0", "site:worker_1"]
    assert config.programs["site"].process_names() == ["site"]  # GROUP:BASE with BASE == GROUP
    assert config.programs["alone"].process_names() == ["alone"]
    assert config.programs["web"].group_name == "site"
    assert config.programs["alone"].group_name == "alone"
    # supervisord's order: groups by their priority, then programs within.
    assert config.programs["web"].start_order == (10, 5)
    assert config.programs["worker"].start_order == (10, 999)
    assert config.programs["alone"].start_order == (1, 1)


def test_group_placeholder_in_templates(tmp_path: Path) -> None:
    config = load_text(
        tmp_path,
        """
        [groups.q]
        programs = ["mail"]

        [programs.mail]
        command = "x"
        numprocs = 2
        process_name = "{group}-{program}-{process_num}"
        stdout_logfile = "/l/{group}/{program}.{process_num}.log"
        """,
    )

    mail = config.programs["mail"]
    assert mail.process_names() == ["q:q-mail-0", "q:q-mail-1"]
    assert mail.log_path("q:q-mail-1", "stdout") == Path("/l/q/mail.1.log")


def test_groups_may_be_defined_in_included_files(tmp_path: Path) -> None:
    write(tmp_path, '[groups.g]\nprograms = ["a"]\n[programs.a]\ncommand = "x"\n', "conf.d/a.toml")

    config = load_text(tmp_path, '[supervisor]\ninclude = ["conf.d/*.toml"]\n')

    assert config.programs["a"].process_names() == ["g:a"]


def test_group_problems(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        """
        [groups.g]
        programs = ["a", "ghost"]

        [groups.h]
        programs = ["a"]

        [groups.b]
        programs = ["c"]

        [groups.empty]
        programs = []

        [programs.a]
        command = "x"
        process_group = "h"

        [programs.b]
        command = "x"

        [programs.c]
        command = "x"
        """,
    )

    assert found == [
        f"{tmp_path}/supd.toml:2: groups.g.programs: names unknown program ghost",
        f"{tmp_path}/supd.toml:5: groups.h.programs: a is already in group g; "
        "a program has one group",
        f"{tmp_path}/supd.toml:7: groups.b: is also the name of program b, which is not in "
        "this group; supctl could not tell the two apart",
        f"{tmp_path}/supd.toml:11: groups.empty.programs: should list at least one program",
        f"{tmp_path}/supd.toml:15: programs.a.process_group: unknown option (a program joins "
        "a group in [groups.NAME] programs = [...])",
    ]


# -- supervisord syntax -----------------------------------------------------------------------


def test_supervisord_expansions_get_the_supd_spelling(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        """
        [programs.web]
        command = "gunicorn --access-logformat '%(h)s %(r)s' --chdir %(ENV_HOME)s"
        stdout_logfile = "/var/log/%(program_name)s_%(process_num)02d.log"
        directory = "%(here)s/app"
        """,
    )

    assert found == [
        f"{tmp_path}/supd.toml:2: programs.web.command: %(ENV_HOME)s is supervisord's syntax; "
        "supd writes ${HOME}",
        f"{tmp_path}/supd.toml:3: programs.web.stdout_logfile: %(program_name)s is "
        "supervisord's syntax; supd writes {program}",
        f"{tmp_path}/supd.toml:3: programs.web.stdout_logfile: %(process_num)02d is "
        "supervisord's syntax; supd writes {process_num:02d}",
        f"{tmp_path}/supd.toml:4: programs.web.directory: %(here)s is supervisord's syntax; "
        "supd writes a relative path (supd resolves it against this file's folder)",
    ]


def test_gunicorn_style_percent_formats_are_left_alone(tmp_path: Path) -> None:
    config = load_text(tmp_path, """[programs.web]\ncommand = "g --fmt '%(h)s %(message)s'"\n""")

    assert config.programs["web"].command == ("g", "--fmt", "%(h)s %(message)s")


SUPERVISORD_CONF = """\
[supervisord]
nodaemon=true

[program:web]
command=gunicorn app:app
"""


def test_a_supervisord_config_given_to_supd_points_to_supd_import(tmp_path: Path) -> None:
    path = tmp_path / "supervisord.conf"
    path.write_text(SUPERVISORD_CONF)

    with pytest.raises(ConfigError) as caught:
        load(path, environ={})

    [problem] = caught.value.problems
    assert problem.line == 4  # [program:web]; the lines before are valid TOML
    assert "supd import FILE -o supd.toml" in str(problem)


def test_a_toml_valid_supervisord_header_points_to_supd_import(tmp_path: Path) -> None:
    found = problems(tmp_path, "[supervisord]\nnodaemon = true\n")

    assert found == [
        f"{tmp_path}/supd.toml:1: supervisord: unknown table; this looks like a supervisord "
        "config (INI); convert it with `supd import FILE -o supd.toml`"
    ]


# -- log output to a stream ------------------------------------------------------------------


def test_dev_stdout_may_be_shared_by_processes_and_programs(tmp_path: Path) -> None:
    config = load_text(
        tmp_path,
        """
        [programs.a]
        command = "x"
        numprocs = 2
        stdout_logfile = "/dev/stdout"
        stdout_logfile_maxbytes = 0
        stderr_logfile = "/dev/stdout"

        [programs.b]
        command = "x"
        stdout_logfile = "/dev/stdout"
        stderr_logfile = "/dev/stderr"
        """,
    )

    assert config.programs["a"].log_path("a:1", "stdout") == Path("/dev/stdout")
    assert config.programs["b"].log_path("b", "stderr") == Path("/dev/stderr")


# -- in a running daemon ------------------------------------------------------------------------


def test_a_daemon_runs_templated_grouped_processes_and_reloads_the_global_environment(
    supd: Callable[..., Supd], tmp_path: Path
) -> None:
    """Names from templates and groups reach the daemon; a reload that changes the
    global environment restarts the programs with the new value."""
    seen = tmp_path / "seen"
    record = cmd(
        f"""
        import os, time
        with open({str(seen)!r}, "a") as out:
            out.write(os.environ["SUPD_PROCESS_NAME"] + " " + os.environ["GREETING"] + "\\n")
        time.sleep(1000)
        """
    )

    def config(greeting: str) -> str:
        return (
            f'[supervisor]\nenvironment = {{ GREETING = "{greeting}" }}\n'
            f'[groups.site]\nprograms = ["worker"]\n'
            f"[programs.worker]\ncommand = {record}\nnumprocs = 2\nnumprocs_start = 1\n"
            f'process_name = "{{program}}_{{process_num:02d}}"\nstartsecs = 0\n'
        )

    daemon = supd(config("hello"))
    for name in ("site:worker_01", "site:worker_02"):
        daemon.wait_state(name, "RUNNING")
    wait_until(lambda: seen.exists() and seen.read_text().count(" hello\n") == 2)
    daemon.write_config(config("bye"))

    result = daemon.rpc("reload")

    assert result["changed"] == ["worker"]
    wait_until(lambda: seen.read_text().count(" bye\n") == 2, describe=seen.read_text)
    assert sorted(seen.read_text().splitlines()) == [
        "site:worker_01 bye",
        "site:worker_01 hello",
        "site:worker_02 bye",
        "site:worker_02 hello",
    ]
