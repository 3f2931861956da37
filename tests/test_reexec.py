"""Re-exec with a real daemon: `supctl reexec` and SIGUSR1 replace supd with a freshly
exec'd one that keeps every child, pipe and timer; a failing new binary changes nothing.
Plus the saved state as data (reexec.py)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from supd import reexec
from supd.childnotify import parent_pid
from supd.config import ProgramConfig, runtime
from supd.facts import State
from supd.process import Process, Want
from tests.helpers import PY, REPO, SLEEP, Supd, cmd, kill_quietly, pid_alive, wait_until

Factory = Callable[..., Supd]

TICKER = cmd("import time\nfor i in range(10**7):\n    print(i, flush=True)\n    time.sleep(0.005)")

# Exits 7 while supd checks its new code (the probe is supd's child then), that is,
# during the re-exec: its exit is seen by the new daemon, not the old.
EXITS_DURING_REEXEC = cmd(
    "import os, sys, time\n"
    "parent = os.getppid()\n"
    "while True:\n"
    "    try:\n"
    "        kids = open(f'/proc/{parent}/task/{parent}/children').read().split()\n"
    "    except OSError:\n"
    "        kids = []\n"
    "    for kid in kids:\n"
    "        try:\n"
    "            # (spelt in two halves: this very command line must not match)\n"
    "            if b'--reexec-' + b'probe' in open(f'/proc/{kid}/cmdline', 'rb').read():\n"
    "                sys.exit(7)\n"
    "        except OSError:\n"
    "            pass\n"
    "    time.sleep(0.002)\n"
)


def supctl(
    d: Supd, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "supd.ctl", "-s", str(d.socket), *args],
        capture_output=True,
        text=True,
        env=env or dict(os.environ, PYTHONPATH=str(REPO), NO_COLOR="1"),
        timeout=60,
    )


def reexec_by_supctl(d: Supd) -> None:
    ran = supctl(d, "reexec")
    assert ran.returncode == 0, ran.stderr + d.describe()
    assert f"pid {d.pid}" in ran.stdout


def reexec_by_signal(d: Supd) -> None:
    before = d.rpc("version")["generation"]
    d.signal(signal.SIGUSR1)
    wait_until(lambda: generation(d) > before, timeout=30, describe=d.describe)


def generation(d: Supd) -> int:
    try:
        return int(d.rpc("version", timeout=5)["generation"])
    except (OSError, ConnectionError, ValueError):
        return 0


def numbers(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().splitlines()[:-1]]


def stamp(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def test_ten_reexecs_in_a_row_keep_every_pid_and_every_line(supd: Factory, tmp_path: Path) -> None:
    d = supd(f"""
        [programs.ticker]
        command = {TICKER}
        startsecs = 0
        [programs.idle]
        command = {SLEEP}
        startsecs = 0
        numprocs = 2
    """)
    before = {name: d.wait_state(name, "RUNNING")["pid"] for name in ("ticker", "idle:0", "idle:1")}
    log = tmp_path / "logs" / "ticker.out.log"
    for i in range(10):
        (reexec_by_supctl if i % 2 == 0 else reexec_by_signal)(d)
    assert d.proc is not None and d.proc.poll() is None
    version = d.rpc("version")
    assert (version["pid"], version["generation"]) == (d.pid, 11)
    status = d.status()
    assert {name: status[name]["pid"] for name in before} == before
    assert all(status[name]["state"] == "RUNNING" for name in before)
    reached = numbers(log)[-1]
    wait_until(lambda: numbers(log)[-1] > reached + 20, describe=d.describe)
    seen = numbers(log)
    assert seen == list(range(len(seen)))  # every line exactly once, in order
    assert len(d.events("adopted")) == 10 and not d.events("reexec_failed")


def test_a_backoff_restart_keeps_its_schedule_across_a_reexec(supd: Factory) -> None:
    d = supd(f"""
        [programs.crashy]
        command = {cmd("raise SystemExit(1)")}
        startsecs = 0
        backoff_initial = 3
        backoff_max = 3
        startretries = 100
    """)
    wait_until(lambda: d.events("backoff"), describe=d.describe)
    [backoff] = d.events("backoff")[:1]
    reexec_by_supctl(d)

    def respawn() -> dict[str, Any] | None:
        later = [e for e in d.events("spawned") if stamp(e) > stamp(backoff)]
        return later[0] if later else None

    spawned = wait_until(respawn, describe=d.describe)
    [adopted] = d.events("adopted")
    assert stamp(backoff) < stamp(adopted) < stamp(spawned)  # the re-exec was in between
    # (backoff_jitter takes up to 10% off the 3 s: the event says the delay drawn)
    assert abs(stamp(spawned) - stamp(backoff) - backoff["delay_s"]) <= 0.1


def test_a_child_that_exits_during_the_exec_is_reported_with_its_code(supd: Factory) -> None:
    d = supd(f"""
        [programs.leaver]
        command = {EXITS_DURING_REEXEC}
        startsecs = 0
        autorestart = "never"
        [programs.stayer]
        command = {SLEEP}
        startsecs = 0
    """)
    pid = d.wait_state("leaver", "RUNNING")["pid"]
    stayer = d.wait_state("stayer", "RUNNING")["pid"]
    reexec_by_supctl(d)
    entry = d.wait_state("leaver", "EXITED")
    assert (entry["exit_code"], entry["pid"]) == (7, None)
    [exited] = [e for e in d.events("exited") if e["process"] == "leaver"]
    assert (exited["pid"], exited["exit_code"]) == (pid, 7)
    [adopted] = d.events("adopted")
    assert stamp(exited) >= stamp(adopted)  # the new daemon reaped it
    assert d.status()["stayer"]["pid"] == stayer
    assert not Path(f"/proc/{pid}").exists()  # reaped: no zombie left


def test_tail_follow_continues_across_a_reexec(supd: Factory, tmp_path: Path) -> None:
    d = supd(f"""
        [programs.ticker]
        command = {TICKER}
        startsecs = 0
    """)
    d.wait_state("ticker", "RUNNING")
    log = tmp_path / "logs" / "ticker.out.log"
    wait_until(lambda: log.exists() and len(numbers(log)) > 20)
    shown = tmp_path / "shown.txt"
    env = dict(os.environ, PYTHONPATH=str(REPO), NO_COLOR="1")
    with open(shown, "wb") as out:
        follower = subprocess.Popen(
            [PY, "-m", "supd.ctl", "-s", str(d.socket), "tail", "-f", "ticker"],
            stdout=out,
            stderr=subprocess.PIPE,
            env=env,
        )
    try:
        wait_until(lambda: len(numbers(shown)) > 10)
        reexec_by_supctl(d)
        reached = numbers(log)[-1]
        wait_until(
            lambda: numbers(shown) and numbers(shown)[-1] > reached + 50, describe=d.describe
        )
        assert follower.poll() is None
    finally:
        follower.send_signal(signal.SIGINT)
        follower.wait(timeout=10)
        kill_quietly(follower.pid)
    seen = numbers(shown)
    assert seen == list(range(seen[0], seen[0] + len(seen)))  # nothing twice, none lost


def test_a_failing_new_binary_leaves_the_old_daemon_running(supd: Factory, tmp_path: Path) -> None:
    # supd runs from a copy of its code, which is then "upgraded" with a broken module.
    code = tmp_path / "pythonpath" / "supd"
    shutil.copytree(REPO / "supervisor", code, ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ, PYTHONPATH=str(code.parent), PYTHONDONTWRITEBYTECODE="1")
    d = supd(
        f"""
        [programs.web]
        command = {SLEEP}
        startsecs = 0
    """,
        env=env,
    )
    pid = d.wait_state("web", "RUNNING")["pid"]
    fleet = code / "fleet.py"
    good = fleet.read_text()
    fleet.write_text(good + "\nthis is not python (\n")
    ran = supctl(d, "reexec", env={**env, "NO_COLOR": "1"})
    assert ran.returncode == 1
    assert "failed its check" in ran.stderr and "SyntaxError" in ran.stderr, ran.stderr
    assert d.proc is not None and d.proc.poll() is None
    assert d.rpc("version")["generation"] == 1
    assert d.status()["web"]["pid"] == pid and d.state("web") == "RUNNING"
    [failed] = d.events("reexec_failed")
    assert "SyntaxError" in failed["problem"]
    fleet.write_text(good)  # the fixed upgrade goes through
    ran = supctl(d, "reexec", env={**env, "NO_COLOR": "1"})
    assert ran.returncode == 0, ran.stderr
    assert d.rpc("version")["generation"] == 2 and d.status()["web"]["pid"] == pid


def test_a_program_changed_in_the_file_is_reloaded_by_the_new_daemon(supd: Factory) -> None:
    d = supd(f"""
        [programs.web]
        command = {SLEEP}
        startsecs = 0
        [programs.db]
        command = {SLEEP}
        startsecs = 0
    """)
    web = d.wait_state("web", "RUNNING")["pid"]
    db = d.wait_state("db", "RUNNING")["pid"]
    d.write_config(f"""
        [programs.web]
        command = {SLEEP}
        startsecs = 0
        stopsignal = "INT"
        [programs.db]
        command = {SLEEP}
        startsecs = 0
        environment = {{ V = "2" }}
    """)
    reexec_by_supctl(d)
    wait_until(lambda: d.status()["db"]["pid"] not in (None, db), describe=d.describe)
    assert d.status()["web"]["pid"] == web
    [event] = d.events("config_reloaded")
    assert {e["name"]: e["step"] for e in event["plan"]} == {
        "web": "update in place",
        "db": "restart",
    }


# -- the saved state as data -------------------------------------------------------------


def test_a_process_crosses_with_its_fields_and_its_times_relative() -> None:
    config = runtime(ProgramConfig.model_validate({"name": "web", "command": ["x"]}))
    process = Process("web", config, state=State.BACKOFF, want=Want.UP, failures=3)
    process.backoff_until, process.started_at, process.last_pid = 105.0, 90.0, 1234
    saved = reexec.process_fields(process, now=100.0)
    assert saved["backoff_until"] == 5.0 and saved["started_at"] == -10.0
    data = json.loads(json.dumps(saved))
    back = reexec.restore_process("web", config, {**data, "from_a_newer_supd": 1}, base=500.0)
    assert (back.state, back.want, back.failures, back.last_pid) == (
        State.BACKOFF,
        Want.UP,
        3,
        1234,
    )
    assert (back.backoff_until, back.started_at) == (505.0, 490.0)


def test_the_ready_deadline_crosses_relative_like_the_other_times() -> None:
    # (EXTEND_TIMEOUT_USEC's deadline: compared with started_at by a reload's new `ready`)
    config = runtime(ProgramConfig.model_validate({"name": "web", "command": ["x"]}))
    process = Process("web", config, state=State.STARTING, want=Want.UP, pid=1234)
    process.started_at, process.ready_deadline = 90.0, 130.0
    data = json.loads(json.dumps(reexec.process_fields(process, now=100.0)))
    assert data["ready_deadline"] == 30.0
    back = reexec.restore_process("web", config, data, base=500.0)
    assert (back.started_at, back.ready_deadline) == (490.0, 530.0)


def test_the_death_ring_and_the_restart_window_cross_with_their_times() -> None:
    from supd.deaths import Cause, Death

    config = runtime(ProgramConfig.model_validate({"name": "web", "command": ["x"]}))
    process = Process("web", config)
    died = Death(at=95.0, wall=1.7e9, pid=7, uptime=2.0, cause=next(iter(Cause)), summary="x")
    process.history.append(died)
    process.window.times.extend([90.0, 99.0])
    process.blamed = (next(iter(Cause)), "health check failed")
    data = json.loads(json.dumps(reexec.process_fields(process, now=100.0)))
    assert "draw" not in data  # a function: the new supd brings its own
    back = reexec.restore_process("web", config, data, base=1000.0)
    [death] = back.history
    assert death.at == 995.0 and death.wall == 1.7e9 and death.cause is died.cause
    assert back.history.maxlen == process.history.maxlen
    assert list(back.window.times) == [990.0, 999.0]
    assert back.blamed == process.blamed


def test_the_state_is_versioned_and_tolerant() -> None:
    state = reexec.DaemonState(
        version=reexec.STATE_VERSION, config_path="/x.toml", supervisor={}, programs=[]
    )
    raw = json.loads(reexec.encode(state))
    raw["added_by_a_later_supd"] = {"x": 1}
    assert reexec.decode(json.dumps(raw).encode()).config_path == "/x.toml"
    raw["version"] = reexec.STATE_VERSION + 1
    with pytest.raises(reexec.StateError, match="newer"):
        reexec.decode(json.dumps(raw).encode())
    with pytest.raises(reexec.StateError):
        reexec.decode(b"not json")


def test_a_program_saved_with_a_key_this_version_lacks_is_still_read() -> None:
    program = runtime(ProgramConfig.model_validate({"name": "web", "command": ["x"]}))
    data = reexec.program_data(program)
    data["readiness_of_a_later_version"] = {"tcp": 80}
    assert reexec.program_from(data).name == "web"


def test_the_state_crosses_in_an_inheritable_memfd() -> None:
    fd = reexec.write_memfd(b'{"version": 1}')
    try:
        assert os.get_inheritable(fd)
        assert reexec.read_fd(fd) == b'{"version": 1}'
    finally:
        os.close(fd)
    environ = {reexec.ENV_STATE_FD: "7", "OTHER": "1"}
    assert reexec.take_state_fd(environ) == 7 and environ == {"OTHER": "1"}


# -- under systemd, as a subreaper, as PID 1 ----------------------------------------------


def test_under_systemd_reloading_then_ready_and_no_child_sees_the_state(
    supd: Factory, tmp_path: Path
) -> None:
    from tests.test_systemd_daemon import NotifyListener, systemd_env

    listener = NotifyListener(tmp_path / "notify.sock")
    try:
        env_file = tmp_path / "env.json"
        dump = cmd(
            "import json, os\n"
            f"json.dump(dict(os.environ), open({str(env_file) + '.part'!r}, 'w'))\n"
            f"os.rename({str(env_file) + '.part'!r}, {str(env_file)!r})\n"
            "import time; time.sleep(1000)\n"
        )
        d = supd(
            f"""
            [programs.up]
            command = {SLEEP}
            startsecs = 0
            [programs.dump]
            command = {dump}
            startsecs = 0
            autostart = false
            """,
            env=systemd_env(listener, WATCHDOG_USEC="2000000"),
        )
        listener.wait_for("READY", "1")
        pid = d.wait_state("up", "RUNNING")["pid"]
        reexec_by_supctl(d)
        reloading = listener.wait_for("RELOADING", "1")
        ready = listener.wait_for("READY", "1")
        assert ready > reloading
        listener.wait_for("WATCHDOG", "1")  # the new supd pings too
        assert d.status()["up"]["pid"] == pid
        # A program started by the new supd sees none of supd's own variables.
        d.rpc("start", {"names": ["dump"]})
        wait_until(env_file.exists)
        seen = json.loads(env_file.read_text())
        private = {"NOTIFY_SOCKET", "WATCHDOG_USEC", reexec.ENV_STATE_FD}
        assert private & set(seen) == set() and "SUPD_ORIGINAL_NOFILE" not in seen
    finally:
        listener.close()


DAEMONIZER = """
import os, time
if os.fork() == 0:
    if os.fork() == 0:
        open({marker!r}, "w").write(str(os.getpid()))
        while not os.path.exists({go!r}):
            time.sleep(0.01)
        os._exit(0)
    os._exit(0)
time.sleep(1000)
"""


def test_as_a_subreaper_orphans_are_still_reaped_after_a_reexec(
    supd: Factory, tmp_path: Path
) -> None:
    marker, go = tmp_path / "orphan", tmp_path / "go"
    d = supd(f"""
        [supervisor]
        subreaper = true
        [programs.app]
        command = {cmd(DAEMONIZER.format(marker=str(marker), go=str(go)))}
        startsecs = 0
    """)
    app = d.wait_state("app", "RUNNING")["pid"]
    wait_until(lambda: marker.exists() and marker.read_text())
    orphan = int(marker.read_text())
    reexec_by_supctl(d)
    go.write_text("")  # the orphan exits now: the new supd must reap it
    wait_until(lambda: not Path(f"/proc/{orphan}").exists(), describe=d.describe)
    assert d.status()["app"]["pid"] == app


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare(1)"
)
def test_as_pid_1_a_reexec_keeps_the_children_and_reaps_orphans(tmp_path: Path) -> None:
    from tests.helpers import source_pythonpath

    marker, go = tmp_path / "orphan", tmp_path / "go"
    config = tmp_path / "supd.toml"
    config.write_text(
        f"[programs.app]\ncommand = {cmd(DAEMONIZER.format(marker=str(marker), go=str(go)))}\n"
        "startsecs = 0\n"
    )
    env = dict(os.environ, PYTHONPATH=source_pythonpath())
    argv = ["unshare", "--pid", "--fork", "--kill-child", PY, "-m", "supd", "-c", str(config)]
    log_path = tmp_path / "supd.log"
    with open(log_path, "wb") as log:
        outer = subprocess.Popen(argv, stdout=log, stderr=log, env=env)
    try:
        sock = tmp_path / "supd.sock"
        wait_until(sock.exists, describe=log_path.read_text)
        children = Path(f"/proc/{outer.pid}/task/{outer.pid}/children")
        [supd_pid] = [int(pid) for pid in wait_until(lambda: children.read_text().split())]
        wait_until(lambda: marker.exists() and marker.read_text())
        ctl = dict(os.environ, PYTHONPATH=str(REPO), NO_COLOR="1")

        def app_pid() -> int:
            ran = subprocess.run(
                [PY, "-m", "supd.ctl", "-s", str(sock), "pid", "app"],
                capture_output=True,
                text=True,
                env=ctl,
                timeout=30,
            )
            return int(ran.stdout)

        app = app_pid()
        ran = subprocess.run(
            [PY, "-m", "supd.ctl", "-s", str(sock), "reexec"],
            capture_output=True,
            text=True,
            env=ctl,
            timeout=60,
        )
        assert ran.returncode == 0, ran.stderr + log_path.read_text()
        assert app_pid() == app
        assert [int(p) for p in children.read_text().split()] == [supd_pid]  # same supd
        supd_children = Path(f"/proc/{supd_pid}/task/{supd_pid}/children")
        wait_until(lambda: len(supd_children.read_text().split()) == 2)  # app + adopted orphan
        go.write_text("")  # the orphan exits now: the new PID 1 must reap it
        wait_until(
            lambda: len(supd_children.read_text().split()) == 1,
            describe="the orphan reaped by the new PID 1",
        )
        os.kill(supd_pid, signal.SIGTERM)
        assert outer.wait(timeout=20) == 0
    finally:
        if outer.poll() is None:
            outer.kill()
            outer.wait()


def test_parent_death_signal_survives_the_exec_with_either_spawn_method(
    supd: Factory, spawn_env: dict[str, str]
) -> None:
    """PDEATHSIG belongs to the thread that started the child: execve keeps it (same pid,
    same thread), so the children live through a re-exec, and still die with supd."""
    d = supd(
        f"""
        [programs.web]
        command = {SLEEP}
        startsecs = 0
        """,
        env=spawn_env,
    )
    pid = d.wait_state("web", "RUNNING")["pid"]
    reexec_by_supctl(d)
    assert d.status()["web"]["pid"] == pid and pid_alive(pid)
    os.kill(d.pid, signal.SIGKILL)
    wait_until(lambda: not pid_alive(pid), describe=f"{pid} to get its parent-death signal")


def test_a_socket_systemd_passed_is_kept_across_the_exec(tmp_path: Path) -> None:
    import socket as socketlib

    from tests.test_systemd_daemon import activated_supd

    activated_path = tmp_path / "activated.sock"
    with socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM) as listening:
        listening.bind(str(activated_path))
        listening.listen()
        config = f"""
            [supervisor]
            log_format = "json"
            [programs.up]
            command = {SLEEP}
            startsecs = 0
        """
        with activated_supd(tmp_path, config, listening) as d:
            d.socket = activated_path
            pid = wait_until(lambda: _try_pid(d, "up"), describe=d.describe, timeout=15)
            reexec_by_supctl(d)
            assert _try_pid(d, "up") == pid and d.rpc("version")["generation"] == 2
            assert not (tmp_path / "supd.sock").exists()
            d.signal(signal.SIGTERM)
            assert d.wait_exit() == 0
        assert activated_path.exists()  # systemd's socket: never unlinked by supd


def _try_pid(d: Supd, name: str) -> int | None:
    try:
        pid = d.status()[name]["pid"]
    except (OSError, KeyError):
        return None
    return int(pid) if pid else None


def test_reload_reports_socket_settings_of_systemds_socket_as_not_applied(tmp_path: Path) -> None:
    import socket as socketlib

    from tests.test_systemd_daemon import activated_supd

    activated_path = tmp_path / "activated.sock"
    with socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM) as listening:
        listening.bind(str(activated_path))
        listening.listen()
        config = f"""
            [supervisor]
            log_format = "json"
            [programs.up]
            command = {SLEEP}
            startsecs = 0
        """
        with activated_supd(tmp_path, config, listening) as d:
            d.socket = activated_path
            wait_until(lambda: _try_pid(d, "up"), describe=d.describe, timeout=15)
            d.write_config(config.replace('"json"', f'"json"\nsocket = "{tmp_path / "x.sock"}"'))
            result = d.rpc("reload")
            assert result["supervisor"] == []
            [problem] = result["not_applied"]
            assert problem.startswith("socket:") and "systemd" in problem
            assert not (tmp_path / "x.sock").exists() and _try_pid(d, "up")


def test_a_partial_line_for_supds_stdout_is_not_lost_to_the_exec(
    supd: Factory, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    writer = cmd(
        "import os, sys, time\n"
        "sys.stdout.write('head-of-line-'); sys.stdout.flush()\n"
        f"while not os.path.exists({str(go)!r}):\n"
        "    time.sleep(0.01)\n"
        "print('end-of-line', flush=True)\n"
        "time.sleep(1000)\n"
    )
    d = supd(f"""
        [programs.writer]
        command = {writer}
        startsecs = 0
        stdout_logfile = "-"
    """)
    pid = d.wait_state("writer", "RUNNING")["pid"]
    reexec_by_supctl(d)
    go.write_text("")
    wait_until(lambda: "end-of-line" in d.log_path.read_text(), describe=d.describe)
    text = d.log_path.read_text()
    assert text.count("head-of-line-") == 1 and text.count("end-of-line") == 1
    assert d.status()["writer"]["pid"] == pid


@pytest.mark.parametrize("cgroups_option", ["auto", "off"])
def test_containment_is_taken_over_by_the_new_daemon(
    supd: Factory, tmp_path: Path, cgroups_option: str
) -> None:
    """After a re-exec, a stop still leaves nothing behind: the adopted process's cgroup
    (or, without cgroups, its session in the journal) is the new daemon's, and nothing
    it holds is killed as a dead supd's leftovers."""
    from supd import cgroups

    hierarchy = cgroups.detect()
    if cgroups_option == "auto" and (hierarchy is None or not os.access(hierarchy.own, os.W_OK)):
        pytest.skip("no writable cgroup v2 hierarchy here")
    pids = tmp_path / "pids"
    # A leftover out of the process group, so only containment catches it: with cgroups
    # even in a session of its own; without, in the program's session (job control).
    escape = "setsid sleep 100041 &" if cgroups_option == "auto" else "set -m; sleep 100041 &"
    script = f"{escape} echo $! > {pids}; exec sleep 100042"
    d = supd(f"""
        [supervisor]
        log_format = "json"
        cgroups = "{cgroups_option}"
        [programs.web]
        command = {json.dumps(["/bin/sh", "-c", script])}
        startsecs = 0
    """)
    main = d.wait_state("web", "RUNNING")["pid"]
    wait_until(lambda: pids.exists() and pids.read_text().strip())
    leftover = int(pids.read_text())
    d.track(leftover)
    reexec_by_supctl(d)
    assert d.status()["web"]["pid"] == main and pid_alive(leftover)  # adopted, not killed
    assert not d.events("leftover_killed") and not d.events("containment_not_adopted")
    d.rpc("stop", {"names": ["web"]})
    assert d.status()["web"]["state"] == "STOPPED"
    wait_until(lambda: not pid_alive(leftover), describe="the adopted run's leftover killed")
    if cgroups_option == "off":  # the new daemon keeps the journal a crash would need
        d.rpc("start", {"names": ["web"]})
        again = d.status()["web"]["pid"]
        journal = Path(f"{d.socket}.sessions").read_text()
        assert f"+ {again} " in journal, journal


# -- the programs' sd_notify socket crosses the exec ----------------------------------------

# sd_notify as libsystemd does it: one datagram, errors ignored (a program must not die
# of its supervisor's notify socket).
NOTIFY = """
import os, socket, sys, time
def send(message):
    address = os.environ["NOTIFY_SOCKET"]
    if address.startswith("@"):
        address = "\\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), address)
    except OSError as exc:
        print("send failed:", exc, file=sys.stderr, flush=True)
"""

# True while supd checks its new code (the probe is its child): during the re-exec.
PROBING = """
def probing():
    parent = os.getppid()
    try:
        kids = open(f"/proc/{parent}/task/{parent}/children").read().split()
    except OSError:
        return False
    for kid in kids:
        try:
            # (spelt in two halves: this very command line must not match)
            if b"--reexec-" + b"probe" in open(f"/proc/{kid}/cmdline", "rb").read():
                return True
        except OSError:
            pass
    return False
"""


def stderr_of(tmp_path: Path, name: str) -> str:
    log = tmp_path / "logs" / f"{name}.err.log"  # (made at the first byte written)
    return log.read_text() if log.exists() else ""


def test_a_program_that_notifies_after_a_reexec_is_heard_by_the_new_daemon(
    supd: Factory, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    program = cmd(
        NOTIFY
        + f"""
send("STATUS=warming up")
while not os.path.exists({str(go)!r}):
    time.sleep(0.01)
send("READY=1\\nSTATUS=serving")
time.sleep(1000)
"""
    )
    d = supd(f"""
        [programs.app]
        command = {program}
        startsecs = 0
        ready = {{ notify = true, ready_timeout = 120 }}
    """)
    wait_until(lambda: d.status()["app"]["notify_status"] == "warming up", describe=d.describe)
    pid = d.status()["app"]["pid"]
    address = d.events("notify_socket_open")[0]["address"]
    reexec_by_supctl(d)
    assert d.events("notify_socket_adopted")[0]["address"] == address
    assert d.state("app") == "STARTING"
    go.touch()
    entry = d.wait_state("app", "RUNNING")
    assert (entry["pid"], entry["notify_status"]) == (pid, "serving")
    reasons = [e["reason"] for e in d.events("state_changed") if e["to_state"] == "RUNNING"]
    assert reasons == ["ready: READY=1"]
    assert not d.events("notify_ignored")


def test_a_notification_sent_during_the_reexec_waits_for_the_new_daemon(
    supd: Factory, tmp_path: Path
) -> None:
    # Sent while the old daemon checks the new code, so it is never read by the old one:
    # only the very socket, passed across the exec, still holds it for the new one.
    program = cmd(
        NOTIFY
        + PROBING
        + """
send("STATUS=before")
while not probing():
    time.sleep(0.002)
send("STATUS=sent during the re-exec")
time.sleep(1000)
"""
    )
    d = supd(f"""
        [programs.app]
        command = {program}
        startsecs = 0
        notify = true
    """)
    wait_until(lambda: d.status()["app"]["notify_status"] == "before", describe=d.describe)
    reexec_by_supctl(d)
    wait_until(
        lambda: d.status()["app"]["notify_status"] == "sent during the re-exec",
        describe=d.describe,
    )
    assert "send failed" not in stderr_of(tmp_path, "app")


def test_a_watchdog_fed_across_reexecs_is_never_missed(supd: Factory, tmp_path: Path) -> None:
    # A re-exec takes longer than watchdog_sec here: the feeds sent meanwhile wait in
    # the socket, and the new daemon reads them before its first timer fires.
    program = cmd(
        NOTIFY
        + """
assert os.environ["WATCHDOG_USEC"] == "1000000"
send("READY=1")
n = 0
while True:
    n += 1
    send(f"WATCHDOG=1\\nSTATUS=fed {n}")
    time.sleep(0.05)
"""
    )
    d = supd(f"""
        [programs.app]
        command = {program}
        startsecs = 0
        watchdog_sec = 1
        ready = {{ notify = true }}
    """)

    def fed() -> int:
        status = d.status()["app"]["notify_status"] or "fed 0"
        return int(status.split()[1])

    def fed_beyond(count: int) -> Callable[[], bool]:
        return lambda: fed() > count

    pid = d.wait_state("app", "RUNNING")["pid"]
    for i in range(3):
        (reexec_by_supctl if i % 2 == 0 else reexec_by_signal)(d)
        wait_until(fed_beyond(fed()), describe=d.describe)  # heard again
    # a second and a half more: a missed watchdog would have fired by then
    wait_until(fed_beyond(fed() + 30), describe=d.describe)
    entry = d.status()["app"]
    assert (entry["state"], entry["pid"], entry["healthy"]) == ("RUNNING", pid, None)
    assert not d.events("health_changed") and not d.events("exited")
    assert len(d.events("adopted")) == 3
    assert "send failed" not in stderr_of(tmp_path, "app")


def test_a_log_ready_probe_still_waiting_is_watched_by_the_new_daemon(
    supd: Factory, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    program = cmd(
        f"""
import os, time
print("warming up", flush=True)
while not os.path.exists({str(go)!r}):
    time.sleep(0.01)
print("listening on port 8000", flush=True)
time.sleep(1000)
"""
    )
    d = supd(f"""
        [programs.app]
        command = {program}
        startsecs = 0
        ready = {{ log = "listening on port \\\\d+", ready_timeout = 120 }}
    """)
    pid = d.wait_state("app", "STARTING")["pid"]
    wait_until(lambda: (tmp_path / "logs" / "app.out.log").exists(), describe=d.describe)
    reexec_by_supctl(d)
    go.touch()
    assert d.wait_state("app", "RUNNING")["pid"] == pid
    reasons = [e["reason"] for e in d.events("state_changed") if e["to_state"] == "RUNNING"]
    assert reasons == ["ready: listening on port 8000"]


def test_the_notify_socket_is_taken_over_with_the_datagrams_waiting_in_it() -> None:
    from supd.childnotify import NotifySocket

    old = NotifySocket()
    inherited = os.dup(old.fd)  # what the exec keeps: the same socket, another number
    os.set_inheritable(inherited, True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
        sender.sendto(b"STATUS=queued", "\0" + old.address[1:])
    old.close()  # the old image's own handle goes with the exec
    new = NotifySocket(inherited)
    try:
        assert new.address == old.address and not os.get_inheritable(new.fd)
        assert new.receive() == [(os.getpid(), b"STATUS=queued")]
    finally:
        new.close()
    reader, writer = os.pipe()
    os.close(writer)
    with pytest.raises(OSError):
        NotifySocket(reader)  # not a socket: refused, and closed
    with pytest.raises(OSError):
        os.fstat(reader)


def test_a_health_check_in_flight_during_a_reexec_is_run_again_not_failed(
    supd: Factory, tmp_path: Path
) -> None:
    # Every check takes a while, so one is in flight when the daemon is replaced. Its
    # answer would go to the old image; the new one must not count it as "no answer"
    # (with failures = 1 that would restart the program), nor leave it a zombie.
    started = tmp_path / "started"
    # (the shell's $$, its pid, is written $$$$: supd reads $$ as a $)
    check = json.dumps(["/bin/sh", "-c", f"echo $$$$ >> {started}; sleep 0.3"])
    d = supd(f"""
        [programs.web]
        command = {SLEEP}
        startsecs = 0
        health = {{ exec = {check}, interval = 0.01, timeout = 2, failures = 1, start_grace = 0 }}
    """)
    pid = d.wait_state("web", "RUNNING")["pid"]
    wait_until(lambda: d.status()["web"]["healthy"] is True, describe=d.describe)

    def checks() -> list[int]:
        return [int(p) for p in started.read_text().split()]

    reexec_by_supctl(d)
    before = checks()
    # 8 checks of 0.3 s since: past the 2 s timeout of the one in flight at the exec
    wait_until(lambda: len(checks()) >= len(before) + 8, timeout=20, describe=d.describe)
    entry = d.status()["web"]
    assert (entry["pid"], entry["healthy"]) == (pid, True)
    assert [e["healthy"] for e in d.events("health_changed")] == [True]
    assert len(d.events("spawned")) == 1
    assert not [p for p in before if Path(f"/proc/{p}").exists()]  # reaped, every one


def test_a_log_compression_in_flight_leaves_no_child_behind_the_exec(
    supd: Factory, tmp_path: Path
) -> None:
    """The gzip helper of a rotated backup was a child the new image knew nothing of: it
    ran on, and its exit was never reaped (a zombie for ever, its .gz-partial left).
    The old image ends it before the exec, as at shutdown; the plain backup stays."""
    logs = tmp_path / "logs"
    logs.mkdir()
    # The helper writes its result here: a FIFO holds it in flight (no reader opens it).
    partial = logs / ".writer.out.log.1.gz-partial"
    os.mkfifo(partial)
    d = supd(f"""
        [programs.writer]
        command = {cmd("import sys, time; print('x' * 1500, flush=True); time.sleep(1000)")}
        # (1,501 bytes: one rotation at 1KB, so one helper)
        stdout_logfile = "{logs}/writer.out.log"
        stdout_logfile_maxbytes = "1KB"
        compress = true
        startsecs = 0
    """)

    def helper() -> int | None:
        for pid in (
            int(p) for p in Path(f"/proc/{d.pid}/task/{d.pid}/children").read_text().split()
        ):
            with contextlib.suppress(OSError):
                if b"gz-partial" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return pid
        return None

    compressing = wait_until(helper, describe=d.describe)
    d.track(compressing)
    reexec_by_supctl(d)
    wait_until(lambda: not Path(f"/proc/{compressing}").exists(), describe=d.describe)
    assert not partial.exists()
    assert (logs / "writer.out.log.1").exists()  # not compressed, not lost
    assert sorted(p.name for p in logs.iterdir()) == ["writer.out.log", "writer.out.log.1"]
    assert d.state("writer") == "RUNNING"


def test_a_declared_mainpid_is_still_credited_after_a_reexec(supd: Factory, tmp_path: Path) -> None:
    # The daemon it forks is not its descendant any more (double fork: init adopts it),
    # so only MAINPID= credits that daemon's messages to the program.
    go = tmp_path / "go"
    program = cmd(
        NOTIFY
        + f"""
reader, writer = os.pipe()
if os.fork() == 0:
    if os.fork() == 0:
        os.write(writer, str(os.getpid()).encode())
        while not os.path.exists({str(go)!r}):
            time.sleep(0.01)
        send("STATUS=from the daemon it forked")
        time.sleep(1000)
    os._exit(0)
os.wait()
main = int(os.read(reader, 32))
send(f"MAINPID={{main}}\\nSTATUS=forked {{main}}")
time.sleep(1000)
"""
    )
    d = supd(f"""
        [programs.app]
        command = {program}
        startsecs = 0
        notify = true
    """)
    wait_until(lambda: "forked" in (d.status()["app"]["notify_status"] or ""), describe=d.describe)
    main = int(d.status()["app"]["notify_status"].split()[1])
    d.track(main)
    assert parent_pid(main) != d.status()["app"]["pid"]  # not its child: init's
    reexec_by_supctl(d)
    go.touch()
    wait_until(
        lambda: d.status()["app"]["notify_status"] == "from the daemon it forked",
        describe=d.describe,
    )
    assert not d.events("notify_ignored")


def test_a_process_held_for_its_dependency_starts_once_it_is_ready_after_a_reexec(
    supd: Factory, tmp_path: Path
) -> None:
    ready = tmp_path / "db.ready"
    d = supd(f"""
        [programs.db]
        command = {SLEEP}
        startsecs = 0
        ready = {{ file = "{ready}", interval = 0.1, ready_timeout = 600 }}

        [programs.web]
        command = {SLEEP}
        startsecs = 0
        depends_on = ["db"]
    """)
    wait_until(
        lambda: d.status()["web"]["waiting_for"] == "waiting for db (ready)", describe=d.describe
    )
    assert d.state("db") == "STARTING"
    reexec_by_supctl(d)
    ready.touch()
    d.wait_state("db", "RUNNING")
    d.wait_state("web", "RUNNING")
    assert d.status()["web"]["waiting_for"] is None


def test_an_unhealthy_program_is_still_counted_in_the_status_after_a_reexec(
    supd: Factory, tmp_path: Path
) -> None:
    from tests.test_systemd_daemon import NotifyListener, systemd_env

    listener = NotifyListener(tmp_path / "notify.sock")
    refused = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # bound, never listening
    try:
        refused.bind(("127.0.0.1", 0))
        port = refused.getsockname()[1]
        d = supd(
            f"""
            [programs.app]
            command = {SLEEP}
            startsecs = 0

            [programs.app.health]
            tcp = "127.0.0.1:{port}"
            interval = 0.05
            failures = 1
            start_grace = 0
            on_unhealthy = "ignore"
            """,
            env=systemd_env(listener),
        )
        listener.wait_status(lambda status: "1 unhealthy" in status)
        assert d.status()["app"]["healthy"] is False
        reexec_by_supctl(d)
        listener.wait_for("RELOADING", "1")
        ready = listener.wait_for("READY", "1")  # the new supd's, with its STATUS=
        assert listener.messages[ready]["STATUS"] == "1 running, 1 unhealthy"
        assert d.status()["app"]["healthy"] is False
    finally:
        refused.close()
        listener.close()


CHATTY = cmd("import time\nwhile True:\n    print('still here', flush=True)\n    time.sleep(0.02)")


def test_a_log_silence_check_counts_the_output_before_the_reexec(
    supd: Factory, tmp_path: Path
) -> None:
    # talker prints all the time, but was started longer ago than log-silence: the new
    # image must know when it last printed, not count its silence from its start.
    ticks = tmp_path / "ticks"
    tick = json.dumps(["/bin/sh", "-c", f"echo >> {ticks}"])
    d = supd(f"""
        [programs.talker]
        command = {CHATTY}
        startsecs = 0

        [programs.talker.health]
        log-silence = 3  # (a margin for a loaded machine: it prints every 20 ms)
        interval = 0.05
        failures = 1
        start_grace = 0
        on_unhealthy = "restart"

        [programs.clock]
        command = {SLEEP}
        startsecs = 0
        health = {{ exec = {tick}, interval = 0.05 }}
    """)
    wait_until(lambda: d.status()["talker"]["healthy"] is True, describe=d.describe)
    wait_until(lambda: (d.status()["talker"]["uptime"] or 0) > 3.5, timeout=30, describe=d.describe)
    pid = d.status()["talker"]["pid"]
    reexec_by_supctl(d)
    ticked = lines(ticks)
    wait_until(lambda: lines(ticks) >= ticked + 5, describe=d.describe)  # checks ran
    talker = d.status()["talker"]
    assert (talker["pid"], talker["state"], talker["healthy"]) == (pid, "RUNNING", True)


def lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0
