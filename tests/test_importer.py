"""`supd import`: real-world supervisord configs, converted, checked, and run.

Each config under tests/supervisord/ is converted; the TOML must pass `supd --check`,
and a supd started from it must run the same processes, with the same argv,
environment, working directory, umask and uid, as supervisord 4.3.0 runs from the
original. supervisord is installed into a scratch venv once per session (the way
tests/test_packaging.py does it); where it cannot be installed, the comparison is
skipped with the reason and supd's side still runs.

The configs keep their real paths (/usr/sbin/nginx, /var/www/app, ...). The test
copies them with those paths moved under a temporary root, and every program is a
stand-in: a shell script that records what it was started with, then waits for a
signal. Nothing listens on a port: the one [inet_http_server] (docs-sample) is left
out of the copy supervisord reads; supd ignores it anyway.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from supd.config import load
from supd.importer import ImportFailed, convert
from tests.helpers import PY, children_of, kill_quietly, pid_alive, source_pythonpath, wait_until

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "supervisord"
SUPERVISOR = "supervisor==4.3.0"

# Each config's main file, and what the import cannot carry over: (section, key).
CASES: dict[str, set[tuple[str, str]]] = {
    "celery.conf": {("supervisord", "logfile")},
    "celery-multi.conf": {("supervisord", "pidfile")},
    "daphne-channels.conf": {("fcgi-program:asgi", "")},
    "docker-multiservice.conf": {("supervisord", "logfile"), ("supervisord", "pidfile")},
    "docs-sample/supervisord.conf": {
        ("supervisord", "logfile"),
        ("supervisord", "logfile_maxbytes"),
        ("supervisord", "logfile_backups"),
        ("supervisord", "pidfile"),
        ("supervisord", "minprocs"),
        ("inet_http_server", ""),
    },
    "eventlistener.conf": {("eventlistener:memmon", ""), ("eventlistener:crashmail", "")},
    "groups.conf": set(),
    "gunicorn-django.conf": {("supervisord", "logfile"), ("supervisord", "pidfile")},
    "laravel.conf": {("program:laravel-worker", "stdout_logfile")},
    "nginx-php-fpm.conf": {("supervisord", "pidfile")},
    "sidekiq-rails.conf": set(),
    "uvicorn.conf": set(),
}
# Processes supervisord runs that have no supd counterpart (they were not carried over).
SUPERVISORD_ONLY = {
    "daphne-channels.conf": {"asgi:asgi0", "asgi:asgi1"},
    "eventlistener.conf": {"memmon", "crashmail"},
}
# The environment both daemons start with, beyond PATH and the record folder.
DAEMON_ENV = {"PORT": "8000", "APP_ENV": "staging", "LOG_LEVEL": "INFO", "LANG": "C.UTF-8"}

# Real paths in the configs, and where the copies put them.
_BIN_PREFIXES = (
    "/usr/local/sbin/",
    "/usr/local/bin/",
    "/usr/sbin/",
    "/usr/bin/",
    "/home/app/venv/bin/",
)
_ROOT_PREFIXES = ("/var/", "/srv/", "/home/", "/run/", "/app")
_STAND_INS = (
    "apache2ctl", "bundle", "cat", "celery", "cron", "crashmail", "daphne", "gunicorn",
    "memmon", "nginx", "node", "php", "php-fpm8.2", "python", "python3", "redis-server",
    "rq", "sshd", "uvicorn",
)  # fmt: skip

# Records argv, environment, cwd, umask and uid under the process's name, then waits
# for any stop signal. Absolute tool paths: PATH leads to the stand-ins.
RECORDER = """\
#!/bin/sh
name="$SUPD_PROCESS_NAME"
if [ -z "$name" ]; then
  if [ "$SUPERVISOR_GROUP_NAME" = "$SUPERVISOR_PROCESS_NAME" ]; then
    name="$SUPERVISOR_PROCESS_NAME"
  else
    name="$SUPERVISOR_GROUP_NAME:$SUPERVISOR_PROCESS_NAME"
  fi
fi
out="$RECORD_DIR/$name"
echo $$ > "$out.pids"
printf '%s\\0' "$0" "$@" > "$out.argv"
/usr/bin/env -0 > "$out.env"
pwd -P > "$out.cwd"
umask > "$out.umask"
/usr/bin/id -u > "$out.uid"
/bin/sleep 1000 &
child=$!
echo $child >> "$out.pids"
trap 'kill $child 2>/dev/null; exit 0' TERM INT QUIT HUP USR1 USR2 TSTP
: > "$out.done"
wait $child
"""


# -- the supervisord venv ------------------------------------------------------------------


@pytest.fixture(scope="session")
def supervisord(tmp_path_factory: pytest.TempPathFactory) -> Path | str:
    """supervisord 4.3.0's executable, or why there is none."""
    folder = tmp_path_factory.mktemp("supervisord-venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", folder], check=True)
    python = folder / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import site; print(site.getsitepackages()[0])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            python,
            "install",
            "--quiet",
            "--no-deps",
            SUPERVISOR,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if installed.returncode != 0:
        return f"{SUPERVISOR} cannot be installed here: {installed.stderr.strip()[-300:]}"
    return folder / "bin" / "supervisord"


# -- a copy of a config under a temporary root ----------------------------------------------


@dataclass
class Copy:
    root: Path
    main: Path  # the copied main file
    bin: Path
    records: Path
    work: Path  # both daemons' working directory

    def env(self) -> dict[str, str]:
        return {
            **DAEMON_ENV,
            "PATH": f"{self.bin}:/usr/bin:/bin",
            "HOME": str(self.work),
            "RECORD_DIR": str(self.records),
            "PYTHONPATH": source_pythonpath(),
        }


def _relocate(text: str, root: Path, bin_dir: Path) -> str:
    for prefix in _BIN_PREFIXES:
        text = text.replace(prefix, f"{bin_dir}/")
    for prefix in _ROOT_PREFIXES:
        # Not inside a longer path: /var/www/app is not /app.
        text = re.sub(rf"(?<![\w.]){re.escape(prefix)}", f"{root}{prefix}", text)
    return text


@pytest.fixture
def root() -> Iterator[Path]:
    """A short folder (socket paths must fit in 107 bytes), open to other users."""
    folder = Path(tempfile.mkdtemp(prefix="supd-import-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def copy_config(case: str, root: Path) -> Copy:
    source = CONFIGS / case
    bin_dir, records, work = root / "bin", root / "records", root / "work"
    for folder in (bin_dir, records, work):
        folder.mkdir(mode=0o755)
    records.chmod(0o777)  # programs that run as another user record too
    recorder = bin_dir / "recorder"
    recorder.write_text(RECORDER)
    recorder.chmod(0o755)
    for name in _STAND_INS:
        (bin_dir / name).symlink_to(recorder)
    conf_root = root / "etc" / "supervisor"
    for path in source.parent.rglob("*.conf") if source.name == "supervisord.conf" else [source]:
        target = conf_root / path.relative_to(source.parent)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(_relocate(path.read_text(), root, bin_dir))
    main = conf_root / source.name
    _make_folders(conf_root, root)
    return Copy(root, main, bin_dir, records, work)


def _make_folders(conf_root: Path, root: Path) -> None:
    """The folders the configs name: working directories, and where files go."""
    for conf in conf_root.rglob("*.conf"):
        text = conf.read_text()
        for match in re.finditer(rf"{re.escape(str(root))}[^\s;\"',:]*", text):
            path = Path(match[0].rstrip("/"))
            if path.is_relative_to(root / "bin"):
                continue  # the stand-ins
            line = text[text.rfind("\n", 0, match.start()) + 1 : match.start()]
            is_dir = re.match(r"\s*(directory|childlogdir)\s*=", line) or '="' in line
            folder = path if is_dir or "." not in path.name else path.parent
            folder.mkdir(parents=True, exist_ok=True)
    for folder in [root, *root.rglob("*")]:
        if folder.is_dir():
            folder.chmod(0o777 if folder.name == "records" else 0o755)


# -- running a daemon until every process has recorded itself ----------------------------------


@dataclass
class Process:
    argv: list[str]
    env: dict[str, str]
    cwd: str
    umask: str
    uid: int


def read_records(records: Path) -> dict[str, Process]:
    found = {}
    for done in records.glob("*.done"):
        name = done.name.removesuffix(".done")
        base = records / name
        argv = base.with_name(f"{name}.argv").read_bytes().split(b"\0")[:-1]
        env_items = base.with_name(f"{name}.env").read_bytes().split(b"\0")[:-1]
        found[name] = Process(
            argv=[arg.decode() for arg in argv],
            env=dict(item.decode().split("=", 1) for item in env_items),
            cwd=base.with_name(f"{name}.cwd").read_text().strip(),
            umask=base.with_name(f"{name}.umask").read_text().strip(),
            uid=int(base.with_name(f"{name}.uid").read_text()),
        )
    return found


def recorded_pids(records: Path) -> list[int]:
    return [int(pid) for path in records.glob("*.pids") for pid in path.read_text().split()]


def run_until_recorded(
    argv: list[str],
    copy: Copy,
    expected: set[str],
    pidfile: Path | None = None,
    graceful: bool = True,
) -> dict[str, Process]:
    """Start a daemon; once `expected` have all recorded themselves, SIGTERM it and wait
    (graceful), or just kill it and every process it started (the reference run: its
    shutdown is not under test, and supervisord's takes two seconds).

    pidfile: the daemon forks into the background and writes its pid there.
    """
    for stale in copy.records.iterdir():
        stale.unlink()
    log = copy.work / "daemon.log"
    with log.open("wb") as output:
        proc = subprocess.Popen(
            argv, cwd=copy.work, env=copy.env(), stdin=subprocess.DEVNULL, stdout=output,
            stderr=output,
        )  # fmt: skip
    daemon_pid = proc.pid
    try:

        def describe() -> str:
            return f"recorded {sorted(read_records(copy.records))}\n{log.read_text()[-3000:]}"

        if pidfile is not None:
            assert proc.wait(30) == 0, describe()
            daemon_pid = int(wait_until(lambda: pidfile.exists() and pidfile.read_text(), 20))
        wait_until(lambda: set(read_records(copy.records)) >= expected, 20, describe)
        found = read_records(copy.records)
        if graceful:
            os.kill(daemon_pid, signal.SIGTERM)
            wait_until(lambda: not pid_alive(daemon_pid), 30, describe)
        return found
    finally:
        leftovers = children_of(daemon_pid) + recorded_pids(copy.records)
        kill_quietly(daemon_pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        for pid in leftovers:
            kill_quietly(pid)


def run_supd(copy: Copy, toml: Path) -> dict[str, Process]:
    config = load(toml, environ=copy.env())
    expected = {
        name
        for program in config.programs.values()
        if program.autostart
        for name in program.process_names()
    }
    found = run_until_recorded([PY, "-m", "supd", "-c", str(toml)], copy, expected)
    assert set(found) == expected
    return found


def import_copy(copy: Copy) -> tuple[subprocess.CompletedProcess[str], Path]:
    toml = copy.work / "supd.toml"
    result = subprocess.run(
        [PY, "-m", "supd", "import", str(copy.main), "-o", str(toml)],
        capture_output=True,
        text=True,
        env=copy.env(),
        cwd=copy.work,
        timeout=60,
    )
    return result, toml


def _needs_root(case: str) -> bool:
    return "user=" in (CONFIGS / case).read_text()


def _lost(stderr: str) -> set[tuple[str, str]]:
    found = set()
    for line in stderr.splitlines():
        match = re.match(r"[^:]+:\d+: \[([^]]+)\](?: (\S+))?: not carried over: ", line)
        if match:
            found.add((match[1], match[2] or ""))
    return found


# -- the tests -------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_import_passes_check_and_runs_what_supervisord_runs(
    case: str, root: Path, supervisord: Path | str
) -> None:
    if _needs_root(case) and os.geteuid() != 0:
        pytest.skip("the config switches users, which needs root")
    copy = copy_config(case, root)

    result, toml = import_copy(copy)

    assert _lost(result.stderr) == CASES[case], result.stderr
    assert result.returncode == (1 if CASES[case] else 0), result.stderr
    assert "does not pass --check" not in result.stderr
    check = subprocess.run(
        [PY, "-m", "supd", "-c", str(toml), "--check"],
        capture_output=True,
        text=True,
        env=copy.env(),
        timeout=60,
    )
    assert check.returncode == 0, check.stderr + toml.read_text()
    ours = run_supd(copy, toml)
    assert all(process.argv[0].startswith(str(copy.bin)) for process in ours.values())
    if isinstance(supervisord, str):
        pytest.skip(f"supd ran the import; no comparison with supervisord: {supervisord}")

    theirs = run_supervisord(copy, supervisord, case)

    assert set(theirs) == set(ours) | SUPERVISORD_ONLY.get(case, set())
    config = load(toml, environ=copy.env())
    users = {
        name: program
        for program in config.programs.values()
        for name in program.process_names()
        if program.user
    }
    for name, process in ours.items():
        expected = theirs[name]
        assert process.argv == expected.argv, name
        assert process.cwd == expected.cwd, name
        assert process.umask == expected.umask, name
        assert process.uid == expected.uid, name
        switched = name in users
        assert _comparable(process.env, switched) == _comparable(expected.env, switched), name
        if switched:  # supd's documented difference: the user's own names
            entry = pwd.getpwnam(str(users[name].user))
            assert process.env["USER"] == process.env["LOGNAME"] == entry.pw_name
            assert process.env["SHELL"] == entry.pw_shell
            assert process.env["HOME"] == entry.pw_dir


def _comparable(env: dict[str, str], switched: bool) -> dict[str, str]:
    """Without each daemon's own markers; for a program run as a user, without the
    names supd sets for that user (checked on their own)."""
    markers = ("SUPERVISOR_", "SUPD_")
    dropped = {"HOME", "USER", "LOGNAME", "SHELL"} if switched else set()
    return {
        key: value
        for key, value in env.items()
        if not key.startswith(markers) and key not in dropped
    }


def run_supervisord(copy: Copy, supervisord: Path, case: str) -> dict[str, Process]:
    config = copy.main
    text = config.read_text()
    if "[inet_http_server]" in text:  # never a fixed port in a test
        config = copy.main.with_name("supervisord-no-inet.conf")
        config.write_text(re.sub(r"\[inet_http_server\][^[]*", "", text))
    nodaemon = re.search(r"^nodaemon\s*=\s*true", text, re.M) is not None
    pidfile = copy.work / "supervisord-test.pid"
    expected = set(run_supd_names(copy)) | SUPERVISORD_ONLY.get(case, set())
    argv = [str(supervisord), "-c", str(config), "-j", str(pidfile)]
    return run_until_recorded(argv, copy, expected, None if nodaemon else pidfile, graceful=False)


def run_supd_names(copy: Copy) -> list[str]:
    config = load(copy.work / "supd.toml", environ=copy.env())
    return [
        name
        for program in config.programs.values()
        if program.autostart
        for name in program.process_names()
    ]


# -- conversions, value by value ----------------------------------------------------------------


def convert_text(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> str:
    path = tmp_path / "supervisord.conf"
    path.write_text(textwrap.dedent(text))
    return convert(path, environ={} if environ is None else environ).toml


def test_environment_quoting_follows_supervisord(tmp_path: Path) -> None:
    toml = convert_text(
        tmp_path,
        """
        [supervisord]
        [program:a]
        command=run
        environment=A="1",B='x,y',C=plain,D="with space",E="%(ENV_HOME)s/x",F="$HOME",G="${X}$"
        """,
    )

    assert 'environment = { A = "1", B = "x,y", C = "plain", D = "with space", ' in toml
    # supd reads ${...} and $$; a lone $ stays as written.
    assert 'E = "${HOME}/x", F = "$HOME", G = "$${X}$$" }' in toml
    written = tmp_path / "supd.toml"
    written.write_text(toml)
    loaded = load(written, environ={"HOME": "/h"}).programs["a"].environment
    assert loaded == {
        "A": "1",
        "B": "x,y",
        "C": "plain",
        "D": "with space",
        "E": "/h/x",
        "F": "$HOME",
        "G": "${X}$",
    }


def test_values_are_written_in_supd_spelling(tmp_path: Path) -> None:
    toml = convert_text(
        tmp_path,
        """
        [supervisord]
        childlogdir=%(here)s/logs

        [program:a]
        command=run --name %(program_name)s --pct 50%% --literal-brace {x}
        autostart=no
        autorestart=unexpected
        stopsignal=sigquit
        stdout_logfile_maxbytes=50MB
        stdout_logfile=%(here)s/{odd}/%(program_name)s.log
        exitcodes=0,2
        umask=22
        startsecs=0
        """,
    )

    assert f'log_dir = "{tmp_path}/logs"' in toml
    assert 'command = "run --name a --pct 50% --literal-brace {x}"' in toml
    assert "autostart = false" in toml
    assert 'autorestart = "on-failure"' in toml
    assert 'stopsignal = "QUIT"' in toml
    assert 'stdout_logfile_maxbytes = "50MB"' in toml
    assert f'stdout_logfile = "{tmp_path}/{{{{odd}}}}/{{program}}.log"' in toml
    assert "exitcodes = [0, 2]" in toml
    assert 'umask = "022"' in toml
    assert "startsecs = 0" in toml


def test_process_num_in_the_command_makes_one_program_per_process(tmp_path: Path) -> None:
    path = tmp_path / "supervisord.conf"
    path.write_text(
        "[supervisord]\n[program:w]\ncommand=work --id %(process_num)d\n"
        "process_name=%(program_name)s-%(process_num)d\nnumprocs=2\nnumprocs_start=3\n"
    )
    result = convert(path, environ={})
    out = tmp_path / "supd.toml"
    out.write_text(result.toml)

    config = load(out, environ={})

    assert config.groups["w"].programs == ("w-3", "w-4")
    assert [p.command for p in config.programs.values()] == [
        ("work", "--id", "3"),
        ("work", "--id", "4"),
    ]
    assert [n for p in config.programs.values() for n in p.process_names()] == ["w:w-3", "w:w-4"]


def test_what_supervisord_rejects_is_an_error(tmp_path: Path) -> None:
    for body, message in [
        ("[program:a]\ncommand=x %(nope)s\n", "supervisord cannot expand %(nope)s"),
        ("[program:a]\ncommand=50% off\n", "a lone %"),
        ("[program:a]\ncommand=x\nautostart=maybe\n", "not a boolean"),
        ("[program:a]\nprocess_name=x\n", "has no command"),
        ("[group:g]\nprograms=ghost\n", "names unknown program ghost"),
        ("[program:a]\ncommand=x\nnumprocs=2\n", "needs %(process_num) in process_name"),
    ]:
        path = tmp_path / "supervisord.conf"
        path.write_text("[supervisord]\n" + body)
        with pytest.raises(ImportFailed, match=re.escape(message)) as caught:
            convert(path, environ={})
        assert str(caught.value).startswith(f"{path}:"), caught.value


def test_the_command_line(tmp_path: Path) -> None:
    path = tmp_path / "supervisord.conf"
    path.write_text("[supervisord]\nnodaemon=true\n[program:a]\ncommand=sleep 1\n")

    to_stdout = subprocess.run(
        [PY, "-m", "supd", "import", str(path)], capture_output=True, text=True, timeout=60
    )
    broken = tmp_path / "broken.conf"
    broken.write_text("this is not ini\n")
    unreadable = subprocess.run(
        [PY, "-m", "supd", "import", str(broken)], capture_output=True, text=True, timeout=60
    )

    assert to_stdout.returncode == 0, to_stdout.stderr
    assert to_stdout.stderr == ""
    assert '[programs.a]\ncommand = "sleep 1"' in to_stdout.stdout
    assert unreadable.returncode == 2
    assert "not a supervisord config" in unreadable.stderr


def test_supd_c_with_a_supervisord_config_points_to_supd_import() -> None:
    check = subprocess.run(
        [PY, "-m", "supd", "-c", str(CONFIGS / "laravel.conf"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert check.returncode == 2
    assert "supd import FILE -o supd.toml" in check.stderr


def test_an_include_in_an_included_file_is_ignored_as_supervisord_does(tmp_path: Path) -> None:
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "a.conf").write_text(
        "[include]\nfiles=../more/*.conf\n[program:a]\ncommand=a\n"
    )
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "b.conf").write_text("[program:b]\ncommand=b\n")
    path = tmp_path / "supervisord.conf"
    path.write_text("[supervisord]\n[include]\nfiles=conf.d/*.conf\n")

    result = convert(path, environ={})

    assert "[programs.a]" in result.toml
    assert "[programs.b]" not in result.toml
    [lost] = [finding for finding in result.findings if finding.lost]
    assert lost.file == tmp_path / "conf.d" / "a.conf"
    assert lost.line == 1
    assert "supervisord ignores it" in lost.message


def test_include_files_expand_here_and_environment(tmp_path: Path) -> None:
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "a.conf").write_text("[program:a]\ncommand=run %(here)s\n")
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "b.conf").write_text("[program:b]\ncommand=run\n")
    path = tmp_path / "supervisord.conf"
    path.write_text("[supervisord]\n[include]\nfiles=%(here)s/conf.d/*.conf %(ENV_EXTRA)s/*.conf\n")

    result = convert(path, environ={"EXTRA": str(tmp_path / "extra")})

    assert f'[programs.a]\ncommand = "run {tmp_path}/conf.d"' in result.toml
    assert "[programs.b]" in result.toml
    assert f"#   {tmp_path}/conf.d/a.conf\n#   {tmp_path}/extra/b.conf" in result.toml
