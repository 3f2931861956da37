"""A reload's config checker child misbehaving, with a real daemon and a real checker:
it crashes, prints garbage or half an answer, is killed, hangs, floods its pipe. Each
reload is refused with one clear problem, the running config stays, and the daemon is
left with no zombie and no extra fd. Plus reloads that meet each other, a shutdown or a
re-exec, and the loop answering meanwhile.

The checker is the real `supd --check --emit-json`; a sitecustomize on its PYTHONPATH
makes it misbehave as the file named by $SUPD_TEST_CHECKER (a test's tmp_path) says, so
the daemon meets each failure from a real process."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from supd import configcheck
from supd.facts import ErrorCode
from tests.helpers import (
    PY,
    SLEEP,
    RpcError,
    Supd,
    checkers_of,
    children_of,
    kill_quietly,
    remove_cgroup_tree,
    rpc,
    source_pythonpath,
    wait_until,
)
from tests.test_reload_e2e import supctl

Factory = Callable[..., Supd]

# Acts only in a checker (or a re-exec probe); the daemon and the programs ignore it.
SITECUSTOMIZE = """
import os, sys

def _misbehave(mode):
    if mode == "crash":  # the validator cannot be imported: a real traceback, exit 1
        sys.modules["supd.config"] = None
    elif mode == "silent":
        os._exit(5)
    elif mode == "garbage":
        sys.stdout.write("hello\\nthis is not JSON\\n")
        sys.stdout.flush()
        os._exit(0)
    elif mode == "truncated":  # the real answer, cut in the middle
        from supd import config
        import json
        line = json.dumps(config.check_result(sys.orig_argv[-1]))
        sys.stdout.write(line[: len(line) // 2])
        sys.stdout.flush()
        os._exit(0)
    elif mode == "bad-shape":  # JSON, but not the answer's shape (another version's?)
        print('{"config": {"path": "/x", "supervisor": {}, "programs": ["web"]}}')
        os._exit(0)
    elif mode == "deep":  # JSON nested deeper than json.loads recurses
        print("[" * 100000 + "]" * 100000)
        os._exit(0)
    elif mode == "newer":  # a later supd on disk: it knows an option this one lacks
        from supd import config
        import json
        answer = config.check_result(sys.orig_argv[-1])
        answer["config"]["programs"][-1]["frobnicate"] = 3
        answer["config"]["programs"][-1]["health"] = {"tcp": "127.0.0.1:1", "jitter": 1}
        print(json.dumps(answer))
        os._exit(0)
    elif mode == "killed":
        import signal
        os.kill(os.getpid(), signal.SIGKILL)
    elif mode == "hang":
        import time
        time.sleep(3600)
    elif mode == "flood":  # 1 MiB on each stream, then the real answer
        sys.stderr.write(("warning: " + "x" * 90 + "\\n") * 10500)
        sys.stderr.flush()
        sys.stdout.write(("noise " + "y" * 94 + "\\n") * 10500)
        sys.stdout.flush()
    elif mode == "flood-garbage":  # 1 MiB on each stream and no answer
        sys.stderr.write(("warning: " + "x" * 90 + "\\n") * 10500)
        sys.stdout.write(("noise " + "y" * 94 + "\\n") * 10500)
        sys.stdout.flush()
        os._exit(1)

_mode_file = os.environ.get("SUPD_TEST_CHECKER")
if _mode_file and "--emit-json" in sys.orig_argv:
    try:
        with open(_mode_file) as _f:
            _mode = _f.read().strip()
    except OSError:
        _mode = ""
    _misbehave(_mode)
if _mode_file and "--reexec-probe" in sys.orig_argv and os.path.exists(_mode_file + ".probe"):
    sys.stderr.write("the probe was told to fail\\n")
    os._exit(3)
"""

PROGRAM = f"[programs.web]\ncommand = {SLEEP}\nstartsecs = 0\n"
NEW = f"[programs.new]\ncommand = {SLEEP}\nautostart = false\n"


class Checked:
    """A daemon whose checkers read their mode from `mode_file`."""

    def __init__(self, d: Supd, mode_file: Path) -> None:
        self.d = d
        self.mode_file = mode_file

    def misbehave(self, mode: str) -> None:
        self.mode_file.write_text(mode)

    def behave(self) -> None:
        self.mode_file.unlink(missing_ok=True)


def start(supd: Factory, tmp_path: Path, timeout_s: float = 30, config: str = PROGRAM) -> Checked:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(SITECUSTOMIZE))
    mode_file = tmp_path / "checker-mode"
    env = dict(
        os.environ,
        PYTHONPATH=f"{site}:{source_pythonpath()}",
        SUPD_TEST_CHECKER=str(mode_file),
        **{configcheck.TIMEOUT_ENV: str(timeout_s)},
    )
    d = supd(config, env=env)
    return Checked(d, mode_file)


def zombies_of(pid: int) -> list[int]:
    found = []
    for child in children_of(pid):
        try:
            stat = Path(f"/proc/{child}/stat").read_text()
        except FileNotFoundError:
            continue
        if stat.rpartition(")")[2].split()[0] == "Z":
            found.append(child)
    return found


def client_connections() -> set[str]:
    """socket:[INODE] of every connected unix stream socket (the control connections,
    which a client's close ends a moment later, not a reload's business)."""
    found = set()
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[4] == "0001" and fields[5] == "03":
            found.add(f"socket:[{fields[6]}]")
    return found


def fds_of(pid: int) -> list[str]:
    """`FD TARGET` of each fd of `pid` but its control connections."""
    connections = client_connections()
    found = []
    for fd in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if target not in connections:
            found.append(f"{fd} {target}")
    return found


def settled(d: Supd) -> list[str]:
    """The daemon's fds once no checker is left (none running, none a zombie)."""
    wait_until(
        lambda: not checkers_of(d.pid) and not zombies_of(d.pid),
        describe=lambda: f"checkers {checkers_of(d.pid)}, zombies {zombies_of(d.pid)}",
    )
    return fds_of(d.pid)


def refused(d: Supd, dry_run: bool = False) -> dict[str, Any]:
    with pytest.raises(RpcError) as raised:
        d.rpc("reload", {"dry_run": True} if dry_run else {})
    return raised.value.error


@pytest.mark.parametrize(
    ("mode", "says"),
    [
        ("crash", "exit status 1: ModuleNotFoundError"),
        ("silent", "exit status 5: no output"),
        ("garbage", "this is not JSON"),
        ("truncated", "no answer"),
        ("bad-shape", "unreadable answer"),
        ("deep", "no answer: [[[["),
        ("killed", "killed by SIGKILL"),
        ("hang", "no answer within 3 s"),
        ("flood-garbage", "exit status 1: noise yyy"),
    ],
)
def test_a_checker_that_fails_refuses_the_reload_and_leaves_nothing(
    supd: Factory, tmp_path: Path, mode: str, says: str
) -> None:
    # Only the hung checker meets its deadline; 3 s is for the good checks around it
    # too, on a loaded machine.
    c = start(supd, tmp_path, timeout_s=3 if mode == "hang" else 30)
    d = c.d
    pid = d.wait_state("web", "RUNNING")["pid"]
    d.rpc("reload")  # a first reload: whatever a reload opens once is open now
    before = settled(d)
    d.write_config(PROGRAM + NEW)
    c.misbehave(mode)
    for dry_run in (False,) if mode == "hang" else (True, False):
        error = refused(d, dry_run)
        assert error["code"] == ErrorCode.CONFIG_INVALID, error
        [problem] = error["data"]
        assert problem.startswith(f"{d.config_path}: the config check failed: "), problem
        assert says in problem, problem
        assert len(problem) < 1000, problem
    assert set(d.status()) == {"web"} and d.status()["web"]["pid"] == pid
    after = settled(d)
    assert after == before, "\n".join(before) + "\n----\n" + "\n".join(after)
    c.behave()
    assert d.rpc("reload")["added"] == ["new"]
    assert settled(d) == before


def test_a_checker_that_floods_both_streams_before_its_answer_is_read_in_full(
    supd: Factory, tmp_path: Path
) -> None:
    """More than a pipe holds on stdout and stderr (one pipe for both): read as it
    comes, and the answer after it is the one taken."""
    c = start(supd, tmp_path)
    d = c.d
    d.wait_state("web", "RUNNING")
    d.rpc("reload")
    before = settled(d)
    d.write_config(PROGRAM + NEW)
    c.misbehave("flood")
    assert d.rpc("reload")["added"] == ["new"]
    assert settled(d) == before


def test_a_config_with_problems_names_each_file_line_and_key(supd: Factory, tmp_path: Path) -> None:
    c = start(supd, tmp_path)
    d = c.d
    pid = d.wait_state("web", "RUNNING")["pid"]
    d.rpc("reload")
    before = settled(d)
    (tmp_path / "more.toml").write_text('[programs.more]\ncommand = "x"\nstopsignal = "NOPE"\n')
    d.write_config(
        '[supervisor]\ninclude = ["more.toml"]\n' + PROGRAM + "startretries = -1\n" + NEW
    )
    error = refused(d)
    assert error["code"] == ErrorCode.CONFIG_INVALID
    problems = error["data"]
    ran = supctl(d, "reload")  # as the operator sees them
    assert ran.returncode == 1 and all(p in ran.stderr for p in problems), ran.stderr
    assert any(p.startswith(f"{d.config_path}:6: programs.web.startretries: ") for p in problems)
    assert any(
        p.startswith(f"{tmp_path / 'more.toml'}:3: programs.more.stopsignal: ") for p in problems
    ), problems
    assert set(d.status()) == {"web"} and d.status()["web"]["pid"] == pid
    assert settled(d) == before


# -- reloads meeting each other, a shutdown, a re-exec -------------------------------------


def send(client: socket.socket, method: str, params: dict[str, Any] | None = None) -> None:
    request = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params or {}}
    client.sendall(json.dumps(request).encode() + b"\n")


def connect(d: Supd) -> socket.socket:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(30)
    client.connect(str(d.socket))
    return client


def answers(client: socket.socket) -> list[dict[str, Any]]:
    """Every answer on the connection until the daemon closes it or 0.5 s of quiet
    after the first: exactly one is expected."""
    lines = []
    stream = client.makefile("rb")
    first = stream.readline()
    if first:
        lines.append(json.loads(first))
    client.settimeout(0.5)
    try:
        while more := stream.readline():
            lines.append(json.loads(more))
    except TimeoutError:
        pass
    return lines


def stuck(c: Checked, tmp_path: Path, extra: str = NEW) -> Path:
    """A config whose check blocks on a FIFO until `release` opens it."""
    fifo = tmp_path / "stuck.toml"
    os.mkfifo(fifo)
    c.d.write_config('[supervisor]\ninclude = ["stuck.toml"]\n' + PROGRAM + extra)
    return fifo


def release(fifo: Path) -> None:
    """Let the checker go on once it is blocked reading `fifo` (it may still be starting:
    unlinked before its open, the file would be a problem of its own)."""

    def opened() -> bool:
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError as exc:  # ENXIO: no reader yet
            assert exc.errno == errno.ENXIO, exc
            return False
        return True

    wait_until(opened, timeout=30, describe=f"a checker reading {fifo}")
    fifo.unlink()


def test_two_clients_a_sighup_and_a_dry_run_during_a_check_each_get_one_answer(
    supd: Factory, tmp_path: Path
) -> None:
    c = start(supd, tmp_path)
    d = c.d
    pid = d.wait_state("web", "RUNNING")["pid"]
    before = settled(d)
    fifo = stuck(c, tmp_path)
    first, second, dry = connect(d), connect(d), connect(d)
    with first, second, dry:
        send(first, "reload")
        [checker] = wait_until(lambda: checkers_of(d.pid), describe=d.describe)
        send(second, "reload")
        send(dry, "reload", {"dry_run": True})
        d.signal(signal.SIGHUP)
        # The loop is not blocked: a stop and a start are answered meanwhile.
        assert d.rpc("stop", {"names": ["web"], "wait": True})[0]["state"] == "STOPPED"
        assert d.rpc("start", {"names": ["web"], "wait": True})[0]["state"] == "RUNNING"
        assert checkers_of(d.pid) == [checker]
        release(fifo)
        replies = [answers(client) for client in (first, second, dry)]
    for [reply] in replies:
        assert "result" in reply, reply
    assert replies[0][0]["result"]["added"] == ["new"]
    # The others shared the next check, after the first reload applied the file.
    assert replies[1][0]["result"]["added"] == [] and replies[2][0]["result"]["dry_run"]
    assert d.status()["web"]["pid"] != pid  # (restarted by the stop and start above)
    assert set(d.status()) == {"web", "new"}
    assert len(settled(d)) == len(before)  # (web's new pipes may have other numbers)


def test_a_reload_asked_during_shutdown_is_answered_and_the_checker_goes(
    supd: Factory, tmp_path: Path
) -> None:
    # web does not stop on SIGCONT: the shutdown waits for it (stopwaitsecs).
    slow_stop = PROGRAM + "stopsignal = 'CONT'\nstopwaitsecs = 30\n"
    c = start(supd, tmp_path, config=slow_stop)
    d = c.d
    d.wait_state("web", "RUNNING")
    fifo = stuck(c, tmp_path, extra="")
    c.d.write_config('[supervisor]\ninclude = ["stuck.toml"]\n' + slow_stop)
    with connect(d) as during, connect(d) as after:
        send(during, "reload")
        [checker] = wait_until(lambda: checkers_of(d.pid), describe=d.describe)
        d.signal(signal.SIGTERM)
        [reply] = answers(during)
        assert reply["error"]["code"] == ErrorCode.SHUTTING_DOWN, reply
        wait_until(lambda: d.state("web") == "STOPPING", describe=d.describe)
        send(after, "reload")
        [reply] = answers(after)
        assert reply["error"]["code"] == ErrorCode.SHUTTING_DOWN, reply
        d.signal(signal.SIGHUP)  # logged and ignored, no checker started
        wait_until(lambda: d.events("reload_ignored"), describe=d.describe)
        assert not checkers_of(d.pid)
        assert not Path(f"/proc/{checker}").exists()
        d.signal(signal.SIGTERM)  # a second one kills
    assert d.wait_exit() == 0
    fifo.unlink()


def test_a_reexec_that_fails_its_probe_does_not_cancel_a_reload_in_flight(
    supd: Factory, tmp_path: Path
) -> None:
    """Nothing replaced supd, so nothing may replace the reload it was checking."""
    c = start(supd, tmp_path)
    d = c.d
    d.wait_state("web", "RUNNING")
    before = settled(d)
    fifo = stuck(c, tmp_path)
    Path(str(c.mode_file) + ".probe").write_text("fail")
    with connect(d) as reloading:
        send(reloading, "reload")
        wait_until(lambda: checkers_of(d.pid), describe=d.describe)
        with pytest.raises(RpcError) as raised:
            d.rpc("reexec")
        assert "told to fail" in str(raised.value.error), raised.value.error
        assert d.rpc("version")["generation"] == 1
        release(fifo)
        [reply] = answers(reloading)
    assert reply.get("result", {}).get("added") == ["new"], reply
    assert settled(d) == before


def test_a_reload_in_flight_at_a_reexec_is_superseded_and_the_new_daemon_reloads(
    supd: Factory, tmp_path: Path
) -> None:
    c = start(supd, tmp_path)
    d = c.d
    pid = d.wait_state("web", "RUNNING")["pid"]
    fifo = stuck(c, tmp_path)
    with connect(d) as reloading:
        send(reloading, "reload")
        [checker] = wait_until(lambda: checkers_of(d.pid), describe=d.describe)
        d.signal(signal.SIGUSR1)
        [reply] = answers(reloading)
    assert reply["error"]["code"] == ErrorCode.SUPERSEDED, reply
    assert not Path(f"/proc/{checker}").exists()
    # The new daemon's own reload reads the file: it blocks on the FIFO in turn.
    wait_until(lambda: d.answers() and d.rpc("version")["generation"] == 2, describe=d.describe)
    release(fifo)
    wait_until(lambda: "new" in d.status(), describe=d.describe)
    assert d.status()["web"]["pid"] == pid
    wait_until(lambda: not checkers_of(d.pid) and not zombies_of(d.pid), describe=d.describe)


# -- the checker reads the file as the daemon's start did ----------------------------------


def test_a_reload_resolves_the_file_as_the_start_did(tmp_path: Path) -> None:
    """supd started from its folder with a relative `-c`, an include glob, ${VAR}s and
    the socket under $RUNTIME_DIRECTORY: a reload of the unchanged file changes nothing
    (same paths, same environment, same defaults), and an edit of an included file is
    seen."""
    folder, runtime = tmp_path / "etc", tmp_path / "run"
    (folder / "conf.d").mkdir(parents=True)
    runtime.mkdir()
    included = folder / "conf.d" / "a.toml"
    included.write_text(
        f'[programs.a]\ncommand = {SLEEP}\nenvironment = {{ V = "${{MYVAR}}" }}\n'
        'stdout_logfile = "a.log"\n'
    )
    (folder / "supd.toml").write_text(
        '[supervisor]\ninclude = ["conf.d/*.toml"]\nenvironment = { X = "${MYVAR:-none}" }\n'
        f'[programs.web]\ncommand = {SLEEP}\ndirectory = "."\nstartsecs = 0\n'
    )
    env = dict(
        os.environ,
        PYTHONPATH=source_pythonpath(),
        MYVAR="hello",
        RUNTIME_DIRECTORY=str(runtime),
    )
    log = tmp_path / "supd.log"
    with open(log, "wb") as out:
        daemon = subprocess.Popen(
            [PY, "-m", "supd", "-c", "supd.toml"],
            cwd=folder,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )
    sock = runtime / "supd.sock"
    try:
        wait_until(lambda: sock.exists() or daemon.poll() is not None, describe=log.read_text)
        web = wait_until(
            lambda: [e for e in rpc(sock, "status") if e["name"] == "web" and e["pid"]],
            describe=log.read_text,
        )[0]
        for dry_run in (True, False):
            report = rpc(sock, "reload", {"dry_run": dry_run})
            assert {e["step"] for e in report["plan"]} == {"unchanged"}, report
            assert report["supervisor"] == report["not_applied"] == [], report
        included.write_text(included.read_text().replace("a.log", "b.log"))
        report = rpc(sock, "reload")
        assert report["changed"] == ["a"], report
        [entry] = [e for e in report["plan"] if e["name"] == "a"]
        assert entry["changes"][0]["new"] == json.dumps(str(folder / "conf.d" / "b.log"))
        assert [e["pid"] for e in rpc(sock, "status") if e["name"] == "web"] == [web["pid"]]
    finally:
        pids = children_of(daemon.pid)
        kill_quietly(daemon.pid)
        daemon.wait()
        for pid in pids:
            kill_quietly(pid)
        remove_cgroup_tree(folder / "supd.toml")


# -- the dry run says what the reload does -------------------------------------------------


def test_a_dry_run_reports_a_systemd_sockets_settings_as_the_reload_does(
    tmp_path: Path,
) -> None:
    """The socket systemd passed keeps systemd's path, mode and group: the dry run says
    so (not applied) as the real reload does, instead of announcing them applied."""
    from tests.test_systemd_daemon import activated_supd

    activated_path = tmp_path / "activated.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listening:
        listening.bind(str(activated_path))
        listening.listen()
        config = f'[supervisor]\nlog_format = "json"\n{PROGRAM}'
        with activated_supd(tmp_path, config, listening) as d:
            d.socket = activated_path
            wait_until(lambda: d.answers() and d.status().get("web"), describe=d.describe)
            d.write_config(
                config.replace('"json"\n', f'"json"\nsocket = "{tmp_path / "x.sock"}"\n') + NEW
            )
            dry = d.rpc("reload", {"dry_run": True})
            real = d.rpc("reload")
            assert dry["dry_run"] and not real["dry_run"]
            assert {**dry, "dry_run": False} == real
            assert real["supervisor"] == [] and real["added"] == ["new"], real
            [problem] = real["not_applied"]
            assert problem.startswith("socket:") and "systemd" in problem


@pytest.mark.parametrize("setting", ["inf", "1e300"])
def test_a_check_timeout_too_long_for_a_timer_means_a_year(
    supd: Factory, tmp_path: Path, setting: str
) -> None:
    """$SUPD_CHECK_TIMEOUT_S = inf (no limit, meant) is capped, not a crash at start."""
    assert configcheck.timeout({configcheck.TIMEOUT_ENV: setting}) == configcheck.MAX_TIMEOUT_S
    c = start(supd, tmp_path, timeout_s=float(setting))
    d = c.d
    d.wait_state("web", "RUNNING")
    d.write_config(PROGRAM + NEW)
    assert d.rpc("reload")["added"] == ["new"]


def test_a_checker_failing_after_a_reexec_keeps_the_adopted_config(
    supd: Factory, tmp_path: Path
) -> None:
    """The reload that ends a re-exec reads the file through the checker too: garbage
    there is a failed reload, logged, and the new supd runs on the config it adopted."""
    c = start(supd, tmp_path)
    d = c.d
    pid = d.wait_state("web", "RUNNING")["pid"]
    d.write_config(PROGRAM + NEW)
    c.misbehave("garbage")
    assert d.rpc("reexec")["generation"] == 2
    wait_until(
        lambda: [e for e in d.events("reload_failed") if "this is not JSON" in json.dumps(e)],
        describe=d.describe,
    )
    assert set(d.status()) == {"web"} and d.status()["web"]["pid"] == pid
    before = settled(d)
    c.behave()
    assert d.rpc("reload")["added"] == ["new"]
    assert settled(d) == before


def test_an_option_this_supd_does_not_know_refuses_the_reload(
    supd: Factory, tmp_path: Path
) -> None:
    """After an upgrade on disk, the checker is the new code and the daemon the old one
    until `supctl reexec`: an option only the new code knows must not be dropped
    without a word (the reload would apply less than the file says)."""
    c = start(supd, tmp_path)
    d = c.d
    pid = d.wait_state("web", "RUNNING")["pid"]
    d.write_config(PROGRAM + NEW)
    c.misbehave("newer")
    error = refused(d)
    assert error["code"] == ErrorCode.CONFIG_INVALID, error
    problems = error["data"]
    assert len(problems) == 2, problems
    for key in ("programs.new.frobnicate", "programs.new.health.jitter"):
        assert any(p.startswith(f"{d.config_path}: {key}: ") for p in problems), problems
    assert all("supctl reexec" in p for p in problems), problems
    assert set(d.status()) == {"web"} and d.status()["web"]["pid"] == pid
    c.behave()
    assert d.rpc("reload")["added"] == ["new"]
