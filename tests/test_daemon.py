"""supd end to end: real daemon, real children, real signals, observed like a user would."""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest

from tests.helpers import (
    PY,
    SLEEP,
    RpcError,
    Supd,
    cmd,
    pid_alive,
    source_pythonpath,
    toml_list,
    wait_until,
)

Factory = Callable[..., Supd]


def read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def ignores_sigterm(ready: Path, per_process: bool = False) -> str:
    """A program that ignores SIGTERM and creates `ready` (or `ready.NAME` for each
    process, with `per_process`) once it does."""
    suffix = ' + "." + os.environ["SUPD_PROCESS_NAME"]' if per_process else ""
    return cmd(f"""
        import os, signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        open({str(ready)!r}{suffix}, "w").close()
        time.sleep(1000)
    """)


# -- lifecycle ----------------------------------------------------------------------------


def test_program_goes_starting_then_running_after_startsecs(supd: Factory) -> None:
    d = supd(f"""
        [programs.web]
        command = {SLEEP}
        startsecs = 2
    """)
    assert d.state("web") == "STARTING"
    entry = d.wait_state("web", "RUNNING")
    assert pid_alive(entry["pid"])
    assert entry["description"].startswith(f"pid {entry['pid']}, uptime ")
    changes = [(e["from_state"], e["to_state"]) for e in d.events("state_changed")]
    assert changes == [("STOPPED", "STARTING"), ("STARTING", "RUNNING")]


def test_backoff_gives_up_after_startretries(supd: Factory) -> None:
    d = supd(f"""
        [programs.crash]
        command = {cmd("raise SystemExit(1)")}
        startsecs = 1
        startretries = 2
        backoff_initial = 0.05
    """)
    entry = d.wait_state("crash", "FATAL")
    assert entry["exit_code"] == 1
    assert len(d.events("spawned")) == 3  # the first attempt plus two retries
    assert d.events("fatal")


def test_backoff_delays_follow_the_ladder(supd: Factory, tmp_path: Path) -> None:
    starts = tmp_path / "starts"
    record = cmd(f"import time; open({str(starts)!r}, 'a').write(str(time.monotonic()) + chr(10))")
    d = supd(f"""
        [programs.crash]
        command = {record}
        startsecs = 5
        startretries = 3
        backoff_initial = 0.2
        backoff_factor = 2.0
        backoff_max = 0.5
        backoff_jitter = 0  # the ladder itself (tests/test_crashloop.py tests the jitter)
    """)
    d.wait_state("crash", "FATAL", timeout=15)
    times = [float(t) for t in read_lines(starts)]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # 0.2, 0.4, then capped at 0.5, plus the child's own start and exit: never less (the
    # timer's floor), and the ceiling is loose because a loaded machine delays children.
    for gap, expected in zip(gaps, [0.2, 0.4, 0.5], strict=True):
        assert expected <= gap < expected + 1.0, gaps
    delays = [e["delay_s"] for e in d.events("backoff")]
    assert delays == pytest.approx([0.2, 0.4, 0.5], abs=0.02)


def test_zero_backoff_restarts_within_milliseconds(supd: Factory, tmp_path: Path) -> None:
    d = supd(f"""
        [programs.blip]
        command = {cmd("import time; time.sleep(0.05)")}
        autorestart = "always"
        startsecs = 0
        backoff_initial = 0
    """)
    wait_until(lambda: len(d.events("spawned")) >= 6, describe=d.describe)
    assert d.status()["blip"]["restarts"] >= 5
    assert not d.events("backoff")  # no delay to announce between an exit and a spawn
    exits = [datetime.fromisoformat(e["timestamp"]) for e in d.events("exited")]
    spawns = [datetime.fromisoformat(e["timestamp"]) for e in d.events("spawned")]
    gaps = [(spawn - exit).total_seconds() for exit, spawn in zip(exits, spawns[1:], strict=False)]
    assert gaps and max(gaps) < 0.2, gaps  # the default backoff would be 1 s


def test_a_start_failing_at_once_is_retried_at_once_but_through_the_loop(
    supd: Factory, tmp_path: Path
) -> None:
    # No delay between failed starts, and a due restart is ticked in the turn that made
    # it due; yet each retry goes back through the loop (one select between two ticks),
    # so requests are answered while the retries go on.
    d = supd(f"""
        [programs.ghost]
        command = ["{tmp_path / "missing"}"]
        startretries = 1000000
        backoff_initial = 0
    """)
    first = d.status()["ghost"]["restarts"]
    wait_until(lambda: d.status()["ghost"]["restarts"] >= first + 20, describe=d.describe)
    assert d.status()["ghost"]["state"] in ("STARTING", "BACKOFF")  # still retrying
    d.rpc("stop", {"names": ["ghost"]})
    d.wait_state("ghost", "STOPPED")


@pytest.mark.parametrize(
    ("exit_code", "restarted"),
    [(0, False), (3, False), (4, True)],
)
def test_exit_codes_decide_on_failure_restarts(
    supd: Factory, exit_code: int, restarted: bool
) -> None:
    d = supd(f"""
        [programs.job]
        command = {cmd(f"import time; time.sleep(0.3); raise SystemExit({exit_code})")}
        autorestart = "on-failure"
        exitcodes = [0, 3]
        startsecs = 0.1
        backoff_initial = 0.05
    """)
    if restarted:
        wait_until(lambda: d.status()["job"]["restarts"] >= 1, describe=d.describe)
    else:
        entry = d.wait_state("job", "EXITED")
        assert entry["exit_code"] == exit_code and entry["restarts"] == 0
        assert entry["description"].startswith(f"exited {exit_code} at ")


def test_autorestart_never_leaves_it_exited(supd: Factory) -> None:
    d = supd(f"""
        [programs.job]
        command = {cmd("import time; time.sleep(0.2); raise SystemExit(9)")}
        autorestart = "never"
        startsecs = 0.05
    """)
    assert d.wait_state("job", "EXITED")["exit_code"] == 9


def test_spawn_error_is_a_state_not_a_crash(supd: Factory, tmp_path: Path) -> None:
    d = supd(f"""
        [programs.missing]
        command = "/no/such/program --flag"
        startretries = 1
        backoff_initial = 0.01
        [programs.baduser]
        command = {SLEEP}
        user = "no-such-user-supd"
        startretries = 0
        [programs.nodir]
        command = {SLEEP}
        directory = "{tmp_path}/missing-dir"
        startretries = 0
        [programs.fine]
        command = {SLEEP}
        startsecs = 0
    """)
    missing = d.wait_state("missing", "FATAL")
    assert "No such file or directory" in missing["spawn_error"]
    assert "unknown user" in d.wait_state("baduser", "FATAL")["spawn_error"]
    assert "No such directory" in d.wait_state("nodir", "FATAL")["spawn_error"]
    assert d.state("fine") == "RUNNING"


@pytest.mark.skipif(os.geteuid() != 0, reason="user = root forces the fork path")
def test_exec_failure_when_switching_users_is_reported_as_spawn_error(
    supd: Factory, tmp_path: Path, spawn_env: dict[str, str]
) -> None:
    """Switching users (the fork path on the python method) reports a failed execve."""
    script = tmp_path / "script"
    script.write_text("not a script\n")  # executable but no #! line: execve fails ENOEXEC
    script.chmod(0o755)
    d = supd(
        f"""
        [programs.bad]
        command = "{script}"
        user = "root"
        startretries = 0
    """,
        env=spawn_env,
    )
    entry = d.wait_state("bad", "FATAL")
    assert entry["spawn_error"] and "Exec format error" in entry["spawn_error"]


def test_a_script_whose_interpreter_is_missing_is_a_spawn_error(
    supd: Factory, tmp_path: Path, spawn_env: dict[str, str]
) -> None:
    """Whatever the spawn method, a failed exec is reported as spawn_error: at once by
    the C spawner, from setpriv's exit and message on the python method."""
    script = tmp_path / "script"
    script.write_text("#!/nonexistent/interp\n")
    script.chmod(0o755)
    d = supd(
        f"""
        [programs.bad]
        command = "{script}"
        startretries = 0
        """,
        env=spawn_env,
    )
    entry = d.wait_state("bad", "FATAL")
    assert entry["spawn_error"] == f"No such file or directory: {script}"
    assert d.state("bad") == "FATAL"


def test_a_program_that_cannot_run_ends_fatal_with_the_reason_logged(
    supd: Factory, tmp_path: Path, spawn_env: dict[str, str]
) -> None:
    """A script without a #! line: execve refuses it (ENOEXEC), as supervisord's does.

    The C spawner reports that as the spawn error, and so does the python method's fork
    path (which it takes to join a cgroup before exec); setpriv (the python method
    without cgroups) runs such a script with /bin/sh, like execvp, and the shell's
    failure is the program's own."""
    script = tmp_path / "script"
    script.write_text("no-such-command-supd\n")  # no #! line
    script.chmod(0o755)
    d = supd(
        f"""
        [programs.bad]
        command = "{script}"
        startretries = 0
        """,
        env=spawn_env,
    )
    entry = d.wait_state("bad", "FATAL")
    if spawn_env["SUPD_SPAWN"] == "clone" or d.events("cgroups_used"):
        assert entry["spawn_error"] == f"Exec format error: {script}"
    else:
        assert entry["exit_code"] == 127
        assert "no-such-command-supd" in (tmp_path / "logs" / "bad.err.log").read_text()


# -- stopping -----------------------------------------------------------------------------


def test_stop_escalates_to_sigkill_after_stopwaitsecs(supd: Factory, tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    d = supd(f"""
        [programs.stubborn]
        command = {ignores_sigterm(ready)}
        startsecs = 0
        stopwaitsecs = 0.5
    """)
    pid = d.wait_state("stubborn", "RUNNING")["pid"]
    wait_until(ready.exists)
    began = time.monotonic()
    [result] = d.rpc("stop", {"names": ["stubborn"]})
    took = time.monotonic() - began
    assert result["ok"] and result["state"] == "STOPPED"
    assert 0.45 <= took < 3
    entry = d.status()["stubborn"]
    assert entry["exit_signal"] == "SIGKILL"
    assert not pid_alive(pid)


def test_stopwaitsecs_zero_kills_at_once_without_the_stop_signal(
    supd: Factory, tmp_path: Path
) -> None:
    got_term, ready = tmp_path / "got_term", tmp_path / "ready"
    program = cmd(f"""
        import signal, time
        signal.signal(signal.SIGTERM, lambda *_: open({str(got_term)!r}, "w").close())
        open({str(ready)!r}, "w").close()
        time.sleep(1000)
    """)
    d = supd(f"""
        [programs.web]
        command = {program}
        startsecs = 0
        stopwaitsecs = 0
    """)
    d.wait_state("web", "RUNNING")
    wait_until(ready.exists)
    [result] = d.rpc("stop", {"names": ["web"]})
    assert result["ok"] and result["state"] == "STOPPED"
    assert d.status()["web"]["exit_signal"] == "SIGKILL"
    assert not got_term.exists()


def test_killasgroup_reaches_a_grandchild(supd: Factory, tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild"
    d = supd(f"""
        [programs.parent]
        command = {
        cmd(f'''
            import subprocess, time
            child = subprocess.Popen(["sleep", "1000"])
            open({str(pidfile)!r}, "w").write(str(child.pid))
            time.sleep(1000)
        ''')
    }
        startsecs = 0
        killasgroup = true
    """)
    d.wait_state("parent", "RUNNING")
    grandchild = int(wait_until(lambda: pidfile.exists() and pidfile.read_text()))
    d.track(grandchild)
    d.rpc("stop", {"names": ["parent"]})
    wait_until(lambda: not pid_alive(grandchild), describe="grandchild killed")


def test_stop_interrupts_a_pending_restart(supd: Factory) -> None:
    d = supd(f"""
        [programs.crash]
        command = {cmd("raise SystemExit(1)")}
        startsecs = 1
        backoff_initial = 30
    """)
    d.wait_state("crash", "BACKOFF")
    [result] = d.rpc("stop", {"names": ["crash"]})
    assert result["state"] == "STOPPED"
    assert d.status()["crash"]["state"] == "STOPPED"


# -- the clean slate ----------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def test_child_starts_with_empty_mask_default_signals_and_only_three_fds(
    supd: Factory, spawn_env: dict[str, str]
) -> None:
    d = supd(
        """
        [programs.plain]
        command = "sleep 1000"
        startsecs = 0
        umask = "027"
        environment = { FOO = "bar" }
    """,
        env=spawn_env,
    )
    pid = d.wait_state("plain", "RUNNING")["pid"]
    wait_until(lambda: os.readlink(f"/proc/{pid}/exe").endswith("sleep"))  # exec done
    status = proc_status(pid)
    assert int(status["SigBlk"], 16) == 0
    ignored = int(status["SigIgn"], 16)
    assert ignored & ((1 << 31) - 1) == 0, f"SigIgn={status['SigIgn']}"
    assert sorted(os.listdir(f"/proc/{pid}/fd")) == ["0", "1", "2"]
    assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
    assert os.getsid(pid) == pid
    assert status["Umask"] == "0027"
    env = dict(
        item.split("=", 1)
        for item in Path(f"/proc/{pid}/environ").read_text().split("\0")
        if "=" in item
    )
    assert env["FOO"] == "bar"
    assert env["SUPD_PROCESS_NAME"] == "plain" and env["SUPD_PROGRAM"] == "plain"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch users")
def test_user_option_drops_privileges(supd: Factory, spawn_env: dict[str, str]) -> None:
    d = supd(
        """
        [programs.unprivileged]
        command = "sleep 1000"
        startsecs = 0
        user = "nobody"
    """,
        env=spawn_env,
    )
    pid = d.wait_state("unprivileged", "RUNNING")["pid"]
    wait_until(lambda: proc_status(pid)["Name"] == "sleep")  # exec done
    status = proc_status(pid)
    import pwd

    nobody = pwd.getpwnam("nobody")
    assert status["Uid"].split()[0] == str(nobody.pw_uid)
    assert status["Gid"].split()[0] == str(nobody.pw_gid)


def test_children_get_sigterm_when_supd_is_killed(supd: Factory, spawn_env: dict[str, str]) -> None:
    d = supd(
        """
        [programs.orphan]
        command = "sleep 1000"
        startsecs = 0
    """,
        env=spawn_env,
    )
    pid = d.wait_state("orphan", "RUNNING")["pid"]
    # RUNNING comes at spawn time (startsecs = 0); the death signal is set just before
    # the exec of sleep, so wait for that exec.
    wait_until(lambda: os.readlink(f"/proc/{pid}/exe").endswith("sleep"))
    d.signal(signal.SIGKILL)
    d.wait_exit()
    wait_until(lambda: not pid_alive(pid), describe="child stopped by PDEATHSIG")


# -- signals to supd ----------------------------------------------------------------------


def test_sigterm_stops_everything_by_priority_and_exits_zero(supd: Factory, tmp_path: Path) -> None:
    order = tmp_path / "order"
    programs = ""
    for name, priority in [("db", 1), ("app", 50), ("web", 100), ("web2", 100)]:
        code = f'''
            import signal, sys, time
            def bye(*_):
                open({str(order)!r}, "a").write("{name} term\\n")
                time.sleep(0.2)
                open({str(order)!r}, "a").write("{name} exit\\n")
                sys.exit(0)
            signal.signal(signal.SIGTERM, bye)
            open({str(tmp_path / name)!r} + ".ready", "w").close()
            time.sleep(1000)
        '''
        programs += f"""
        [programs.{name}]
        command = {cmd(code)}
        priority = {priority}
        startsecs = 0
        """
    d = supd(programs)
    pids = [d.wait_state(n, "RUNNING")["pid"] for n in ("db", "app", "web", "web2")]
    for name in ("db", "app", "web", "web2"):
        wait_until((tmp_path / f"{name}.ready").exists)
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    log = read_lines(order)
    # web and web2 (priority 100) are stopped together: both get TERM before either
    # exits; app (50) only after both are gone, and db (1) last.
    assert sorted(log[:2]) == ["web term", "web2 term"], log
    assert sorted(log[2:4]) == ["web exit", "web2 exit"], log
    assert log[4:] == ["app term", "app exit", "db term", "db exit"], log
    assert not any(pid_alive(p) for p in pids)
    assert not d.socket.exists()


def test_second_sigterm_kills_what_is_left(supd: Factory, tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    d = supd(f"""
        [programs.stubborn]
        command = {ignores_sigterm(ready)}
        startsecs = 0
        stopwaitsecs = 60
    """)
    pid = d.wait_state("stubborn", "RUNNING")["pid"]
    wait_until(ready.exists)
    d.signal(signal.SIGTERM)
    d.wait_state("stubborn", "STOPPING")
    d.signal(signal.SIGTERM)
    assert d.wait_exit(timeout=10) == 0
    assert not pid_alive(pid)


def test_sigint_shuts_down_with_no_zombie_left(supd: Factory) -> None:
    d = supd(f"""
        [programs.a]
        command = {SLEEP}
        numprocs = 3
        startsecs = 0
    """)
    pids = [d.wait_state(f"a:{i}", "RUNNING")["pid"] for i in range(3)]
    d.signal(signal.SIGINT)
    assert d.wait_exit() == 0
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists()


def test_sigusr2_reopens_log_files(supd: Factory, tmp_path: Path) -> None:
    ticker = cmd(
        "import time\nfor i in range(100000):\n    print(i, flush=True)\n    time.sleep(0.02)"
    )
    d = supd(f"""
        [programs.ticker]
        command = {ticker}
        startsecs = 0
    """)
    log = tmp_path / "logs" / "ticker.out.log"
    wait_until(lambda: log.exists() and log.stat().st_size > 0)
    moved = tmp_path / "ticker.out.log.moved"
    log.rename(moved)
    d.signal(signal.SIGUSR2)
    wait_until(lambda: log.exists() and log.stat().st_size > 0, describe=d.describe)
    old = [int(x) for x in read_lines(moved)]
    new = [int(x) for x in read_lines(log)]
    assert old + new == list(range(len(old) + len(new)))  # nothing lost between the two


# -- reload -------------------------------------------------------------------------------


def test_reload_adds_removes_and_changes_while_unchanged_keep_their_pid(
    supd: Factory,
) -> None:
    d = supd(f"""
        [programs.keep]
        command = {SLEEP}
        startsecs = 0
        [programs.change]
        command = {SLEEP}
        startsecs = 0
        [programs.remove]
        command = {SLEEP}
        startsecs = 0
    """)
    keep = d.wait_state("keep", "RUNNING")["pid"]
    change = d.wait_state("change", "RUNNING")["pid"]
    remove = d.wait_state("remove", "RUNNING")["pid"]
    d.write_config(f"""
        [programs.keep]
        command = {SLEEP}
        startsecs = 0
        [programs.change]
        command = {SLEEP}
        startsecs = 0
        environment = {{ NEW = "1" }}
        [programs.add]
        command = {SLEEP}
        startsecs = 0
    """)
    result = d.rpc("reload")
    programs = {k: result[k] for k in ("added", "changed", "removed")}
    assert programs == {"added": ["add"], "changed": ["change"], "removed": ["remove"]}
    steps = {e["name"]: e["step"] for e in result["plan"]}
    assert steps == {"keep": "unchanged", "change": "restart", "remove": "stop", "add": "start"}
    d.wait_state("add", "RUNNING")
    new_change = d.wait_state("change", "RUNNING")["pid"]
    assert new_change != change
    # RUNNING (startsecs = 0) is reached at fork time: wait for the exec to show.
    wait_until(lambda: b"NEW=1" in Path(f"/proc/{new_change}/environ").read_bytes())
    wait_until(lambda: "remove" not in d.status(), describe=lambda: str(d.status()))
    assert not pid_alive(remove) and not pid_alive(change)
    assert d.status()["keep"]["pid"] == keep


def test_sighup_reloads_and_invalid_config_keeps_the_old_one(supd: Factory) -> None:
    d = supd(f"""
        [programs.keep]
        command = {SLEEP}
        startsecs = 0
    """)
    pid = d.wait_state("keep", "RUNNING")["pid"]
    d.write_config("""
        [programs.keep]
        command = "sleep 1000"
        startsecs = -1
    """)
    with pytest.raises(RpcError) as info:
        d.rpc("reload")
    assert "programs.keep.startsecs" in str(info.value.error.get("data"))
    d.signal(signal.SIGHUP)
    wait_until(lambda: d.events("reload_failed"), describe=d.describe)
    problems = d.events("reload_failed")[-1]["problems"]
    assert any(re.search(r"supd\.toml:4: programs\.keep\.startsecs: ", p) for p in problems)
    assert d.status()["keep"]["pid"] == pid
    d.write_config(f"""
        [programs.keep]
        command = {SLEEP}
        startsecs = 0
        [programs.extra]
        command = {SLEEP}
        startsecs = 0
    """)
    d.signal(signal.SIGHUP)
    d.wait_state("extra", "RUNNING")
    assert d.status()["keep"]["pid"] == pid


# -- output -------------------------------------------------------------------------------


def test_no_output_line_lost_across_rotations(supd: Factory, tmp_path: Path) -> None:
    count = 20000
    writer = cmd(
        f"import sys\nfor i in range({count}): sys.stdout.write(f'line {{i:06d}}' + chr(10))"
    )
    d = supd(f"""
        [programs.writer]
        command = {writer}
        autorestart = "never"
        startsecs = 0
        stdout_logfile_maxbytes = 16384
        stdout_logfile_backups = 100
    """)
    d.wait_state("writer", "EXITED")
    log = tmp_path / "logs" / "writer.out.log"
    backups = sorted(log.parent.glob("writer.out.log.*"), key=lambda p: -int(p.suffix[1:]))
    assert len(backups) > 5
    text = "".join(p.read_text() for p in [*backups, log])
    assert text.splitlines() == [f"line {i:06d}" for i in range(count)]
    assert all(p.stat().st_size <= 16384 for p in [*backups, log])


def test_stderr_goes_to_its_own_log_or_follows_stdout(supd: Factory, tmp_path: Path) -> None:
    code = "import sys; print('out'); print('err', file=sys.stderr)"
    d = supd(f"""
        [programs.split]
        command = {cmd(code)}
        autorestart = "never"
        startsecs = 0
        [programs.merged]
        command = {cmd(code)}
        autorestart = "never"
        startsecs = 0
        redirect_stderr = true
    """)
    d.wait_state("split", "EXITED")
    d.wait_state("merged", "EXITED")
    logs = tmp_path / "logs"
    assert (logs / "split.out.log").read_text() == "out\n"
    assert (logs / "split.err.log").read_text() == "err\n"
    assert sorted((logs / "merged.out.log").read_text().split()) == ["err", "out"]
    assert not (logs / "merged.err.log").exists()


def test_a_flooding_child_does_not_starve_the_control_socket(supd: Factory) -> None:
    flood = cmd("import os\nb = b'x' * 65536\nwhile True: os.write(1, b)")
    d = supd(f"""
        [programs.flood]
        command = {flood}
        startsecs = 0
        stdout_logfile = "none"
        [programs.quiet]
        command = {SLEEP}
        startsecs = 0
    """)
    d.wait_state("flood", "RUNNING")
    worst = 0.0
    for _ in range(20):
        began = time.monotonic()
        d.status()
        worst = max(worst, time.monotonic() - began)
    assert worst < 1.0, worst


# -- the command line ---------------------------------------------------------------------


def run_supd(
    *args: str, cwd: Path, prefix: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=source_pythonpath())
    return subprocess.run(
        [*prefix, PY, "-m", "supd", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=30,
    )


def test_check_prints_a_summary_for_a_good_config(tmp_path: Path) -> None:
    (tmp_path / "supd.toml").write_text('[programs.a]\ncommand = "true"\nnumprocs = 2\n')
    result = run_supd("-c", str(tmp_path / "supd.toml"), "--check", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "1 program" in result.stdout and "2 processes" in result.stdout


@pytest.mark.parametrize("check", [True, False])
def test_bad_config_lists_every_problem_with_file_and_line(tmp_path: Path, check: bool) -> None:
    config = tmp_path / "supd.toml"
    config.write_text(
        "[programs.web]\n"
        'command = "true"\n'
        "startsecs = -1\n"
        "bogus = 1\n"
        "\n"
        "[programs.api]\n"
        'stopsignal = "NOPE"\n'
    )
    result = run_supd("-c", str(config), *(["--check"] if check else []), cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert any(line.startswith(f"{config}:3: programs.web.startsecs: ") for line in lines), lines
    assert any(line.startswith(f"{config}:4: programs.web.bogus: ") for line in lines), lines
    assert any(line.startswith(f"{config}:7: programs.api.stopsignal: ") for line in lines), lines
    assert any(line.startswith(f"{config}:6: programs.api.command: ") for line in lines), lines
    assert not (tmp_path / "supd.sock").exists()


@pytest.mark.parametrize("check", [True, False])
def test_a_config_whose_pipes_cannot_fit_the_fd_limit_is_refused(
    tmp_path: Path, check: bool
) -> None:
    """Each process holds two pipe fds (one with redirect_stderr), plus supd's own 37: under
    a hard limit of 100, 20 processes fit and 40 do not (an error, not EMFILE at run time)."""
    config = tmp_path / "supd.toml"
    config.write_text(
        '[programs.few]\ncommand = "true"\nnumprocs = 20\nautostart = false\n\n'
        '[programs.many]\ncommand = "true"\nnumprocs = 20\nautostart = false\n'
    )
    limited = ("prlimit", "--nofile=100:100", "--")
    args = ("-c", str(config), *(["--check"] if check else []))
    result = run_supd(*args, cwd=tmp_path, prefix=limited)
    assert result.returncode == 2, result.stdout
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"{config}:8: programs.many.numprocs: the programs' output pipes ")
    assert "more than the hard limit of 100" in line
    config.write_text(
        '[programs.few]\ncommand = "true"\nnumprocs = 20\nredirect_stderr = true\n'
        '[programs.many]\ncommand = "true"\nnumprocs = 20\nredirect_stderr = true\n'
    )
    fits = run_supd("-c", str(config), "--check", cwd=tmp_path, prefix=limited)
    assert fits.returncode == 0, fits.stderr  # one pipe each: 40 + 37 <= 100


def test_toml_syntax_error_gives_line_and_column(tmp_path: Path) -> None:
    config = tmp_path / "supd.toml"
    config.write_text('[programs.web]\ncommand = "true\n')
    result = run_supd("-c", str(config), cwd=tmp_path)
    assert result.returncode == 2
    assert re.match(rf"{re.escape(str(config))}:2:\d+: ", result.stderr), result.stderr


def test_python_dash_m_and_console_script_agree(tmp_path: Path) -> None:
    result = run_supd("--version", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.startswith("supd ")
    script = Path(sys.executable).parent / "supd"
    if script.exists():
        out = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=30)
        assert out.stdout == result.stdout


# -- subreaper ----------------------------------------------------------------------------


def orphan_maker(pidfile: Path, release: Path, then: str) -> str:
    """A program whose grandchild is orphaned: it records its pid, waits for `release`,
    then exits. The program itself runs `then` (Python) once the orphan exists."""
    return cmd(f"""
        import os, sys, time
        if os.fork() == 0:
            if os.fork() == 0:
                open({str(pidfile)!r} + ".tmp", "w").write(str(os.getpid()))
                os.rename({str(pidfile)!r} + ".tmp", {str(pidfile)!r})
                while not os.path.exists({str(release)!r}):
                    time.sleep(0.01)
                os._exit(0)
            os._exit(0)
        while not os.path.exists({str(pidfile)!r}):
            time.sleep(0.01)
        {then}
    """)


def adopted_then_reaped(d: Supd, pidfile: Path, release: Path) -> None:
    """The orphan's parent is supd (adopted), and once released it leaves no zombie."""
    orphan = int(wait_until(lambda: pidfile.exists() and pidfile.read_text()))
    d.track(orphan)
    ppid = wait_until(lambda: proc_status(orphan)["PPid"] == str(d.pid), describe="adopted")
    assert ppid
    release.touch()
    wait_until(lambda: not Path(f"/proc/{orphan}").exists(), describe="orphan reaped by supd")


def test_subreaper_reaps_double_forked_orphans_and_keeps_exit_status(
    supd: Factory, tmp_path: Path
) -> None:
    pidfile, release, done = tmp_path / "orphan", tmp_path / "release", tmp_path / "done"
    wait_done = f"[time.sleep(0.01) for _ in iter(lambda: os.path.exists({str(done)!r}), True)]"
    d = supd(f"""
        [supervisor]
        subreaper = true
        [programs.forker]
        command = {orphan_maker(pidfile, release, wait_done + "; sys.exit(7)")}
        startsecs = 0
        autorestart = "never"
    """)
    d.wait_state("forker", "RUNNING")
    adopted_then_reaped(d, pidfile, release)
    done.touch()
    assert d.wait_state("forker", "EXITED")["exit_code"] == 7  # the program's own status


def test_subreaper_reaps_orphans_when_no_program_is_running(supd: Factory, tmp_path: Path) -> None:
    pidfile, release = tmp_path / "orphan", tmp_path / "release"
    d = supd(f"""
        [supervisor]
        subreaper = true
        [programs.daemonizer]
        command = {orphan_maker(pidfile, release, "sys.exit(0)")}
        startsecs = 0
        autorestart = "never"
        leftovers = "keep"  # the orphan outlives its program
    """)
    d.wait_state("daemonizer", "EXITED")  # nothing is watched any more
    adopted_then_reaped(d, pidfile, release)


def test_subreaper_reaps_orphans_killed_with_their_program(supd: Factory, tmp_path: Path) -> None:
    """An orphan in the program's process group dies with it on stop: no zombie stays."""
    pidfile, release = tmp_path / "orphan", tmp_path / "release"
    d = supd(f"""
        [supervisor]
        subreaper = true
        [programs.forker]
        command = {orphan_maker(pidfile, release, "time.sleep(1000)")}
        startsecs = 0
        killasgroup = true
    """)
    d.wait_state("forker", "RUNNING")
    orphan = int(wait_until(lambda: pidfile.exists() and pidfile.read_text()))
    d.track(orphan)
    wait_until(lambda: proc_status(orphan)["PPid"] == str(d.pid), describe="adopted")
    d.rpc("stop", {"names": ["forker"]})
    wait_until(lambda: not Path(f"/proc/{orphan}").exists(), describe="orphan killed and reaped")


def process_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]


def test_subreaper_reaps_an_orphan_that_died_behind_a_probes_zombie(
    supd: Factory, tmp_path: Path
) -> None:
    """supd's peek for orphans stops at the first zombie that is its own, to be reaped by
    its owner; only a main process's reap looked again, so an orphan that exited together
    with an exec probe, behind it in supd's list of children, stayed a zombie until some
    later SIGCHLD (with nothing else exiting: for ever)."""
    probe_pid, orphan_pid, release = tmp_path / "probe", tmp_path / "orphan", tmp_path / "go"
    probe = [PY, "-c", textwrap.dedent(f"""
        import os, time
        def record(path):
            open(path + ".tmp", "w").write(str(os.getpid()))
            os.rename(path + ".tmp", path)
        record({str(probe_pid)!r})
        middle = os.fork()
        if middle == 0:
            if os.fork() == 0:  # orphaned at once, so adopted by supd after the probe
                record({str(orphan_pid)!r})
                while not os.path.exists({str(release)!r}):
                    time.sleep(0.01)
            os._exit(0)
        os.waitpid(middle, 0)
        while not os.path.exists({str(release)!r}):
            time.sleep(0.01)
    """)]  # fmt: skip
    d = supd(f"""
        [supervisor]
        subreaper = true
        cgroups = "off"  # (with cgroups the probe's group is killed at its exit: a SIGCHLD)
        [programs.web]
        command = {SLEEP}
        startsecs = 0
        ready = {{ exec = {toml_list(probe)}, timeout = 60, ready_timeout = 60 }}
    """)
    probe_child = int(wait_until(lambda: probe_pid.exists() and probe_pid.read_text()))
    orphan = int(wait_until(lambda: orphan_pid.exists() and orphan_pid.read_text()))
    d.track(probe_child, orphan)
    wait_until(lambda: proc_status(orphan)["PPid"] == str(d.pid), describe="adopted")
    # Both exit while supd is stopped, so that it meets both zombies at once.
    d.signal(signal.SIGSTOP)
    try:
        wait_until(lambda: process_state(d.pid) == "T", describe="supd stopped")
        release.touch()
        wait_until(lambda: {process_state(probe_child), process_state(orphan)} == {"Z"})
    finally:
        d.signal(signal.SIGCONT)
    d.wait_state("web", "RUNNING")  # the probe's exit was handled
    wait_until(lambda: not Path(f"/proc/{orphan}").exists(), describe="orphan reaped by supd")


# -- reload and shutdown edge cases (regressions from review) ---------------------------


def test_second_sigterm_kills_even_when_other_programs_are_already_down(
    supd: Factory, tmp_path: Path
) -> None:
    ready = tmp_path / "ready"
    d = supd(f"""
        [programs.done]
        command = "true"
        autorestart = "never"
        startsecs = 0
        [programs.stubborn]
        command = {ignores_sigterm(ready)}
        startsecs = 0
        stopwaitsecs = 100
    """)
    d.wait_state("done", "EXITED")
    pid = d.wait_state("stubborn", "RUNNING")["pid"]
    wait_until(ready.exists)
    d.signal(signal.SIGTERM)
    d.wait_state("stubborn", "STOPPING")
    d.signal(signal.SIGTERM)
    assert d.wait_exit(timeout=10) == 0
    assert not pid_alive(pid)


def test_shutdown_right_after_a_reload_does_not_start_the_new_version(
    supd: Factory, tmp_path: Path
) -> None:
    ready = tmp_path / "ready"
    stubborn = ignores_sigterm(ready)
    d = supd(f"""
        [programs.x]
        command = {stubborn}
        startsecs = 0
        stopwaitsecs = 1
    """)
    d.wait_state("x", "RUNNING")
    wait_until(ready.exists)
    d.write_config(f"""
        [programs.x]
        command = {stubborn}
        startsecs = 0
        environment = {{ VERSION = "2" }}
    """)
    d.signal(signal.SIGHUP)
    d.wait_state("x", "STOPPING")  # the old version is on its way out (it ignores TERM)
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    assert len(d.events("spawned")) == 1  # the new version never started


def test_program_removed_and_added_back_while_still_stopping(supd: Factory, tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    old_config = f"""
        [programs.x]
        command = {ignores_sigterm(ready)}
        startsecs = 0
        stopwaitsecs = 5
    """
    d = supd(old_config)
    old = d.wait_state("x", "RUNNING")["pid"]
    wait_until(ready.exists)
    d.write_config("")
    assert d.rpc("reload")["removed"] == ["x"]
    assert d.status()["x"]["state"] == "STOPPING"  # ignores SIGTERM for stopwaitsecs
    d.write_config(f"""
        [programs.x]
        command = {SLEEP}
        startsecs = 0
    """)
    assert d.rpc("reload")["added"] == ["x"]
    new = d.wait_state("x", "RUNNING", timeout=10)["pid"]
    assert new != old
    wait_until(lambda: not Path(f"/proc/{old}").exists(), describe="old one killed and reaped")
    assert len(d.status()) == 1


def test_reloads_while_a_changed_program_is_still_stopping(supd: Factory, tmp_path: Path) -> None:
    ready = tmp_path / "ready"  # one file per process: ready.x:0, ready.x:1
    stubborn = ignores_sigterm(ready, per_process=True)
    d = supd(f"""
        [programs.x]
        command = {stubborn}
        numprocs = 2
        startsecs = 0
        stopwaitsecs = 5
    """)
    d.wait_state("x:0", "RUNNING")
    d.wait_state("x:1", "RUNNING")
    wait_until(lambda: all(Path(f"{ready}.x:{i}").exists() for i in (0, 1)))
    d.write_config(f"""
        [programs.x]
        command = {stubborn}
        numprocs = 2
        startsecs = 0
        stopwaitsecs = 5
        environment = {{ V = "2" }}
    """)
    assert d.rpc("reload")["changed"] == ["x"]
    [restart] = d.rpc("restart", {"names": ["x:0"]})
    assert not restart["ok"] and "reload" in restart["error"]
    d.write_config(f"""
        [programs.other]
        command = {SLEEP}
        startsecs = 0
    """)  # x removed before its new version ever ran
    result = d.rpc("reload")
    programs = {k: result[k] for k in ("added", "changed", "removed")}
    assert programs == {"added": ["other"], "changed": [], "removed": ["x"]}
    d.wait_state("other", "RUNNING")
    wait_until(lambda: set(d.status()) == {"other"}, describe=lambda: str(d.status()))


# -- as a container's init ----------------------------------------------------------------


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare(1)"
)
def test_as_pid_1_it_reaps_orphans_and_exits_zero_on_sigterm(tmp_path: Path) -> None:
    """supd as PID 1 of a new PID namespace, as in a container."""
    marker = tmp_path / "orphan"
    config = tmp_path / "supd.toml"
    daemonizer = cmd(f"""
        import os, time
        if os.fork() == 0:
            if os.fork() == 0:
                open({str(marker)!r}, "w").write("x")
                time.sleep(0.2)
                os._exit(0)
            os._exit(0)
        time.sleep(1000)
    """)
    config.write_text(f"[programs.app]\ncommand = {daemonizer}\nstartsecs = 0\n")
    env = dict(os.environ, PYTHONPATH=source_pythonpath())
    argv = ["unshare", "--pid", "--fork", "--kill-child", PY, "-m", "supd", "-c", str(config)]
    log = open(tmp_path / "supd.log", "wb")  # noqa: SIM115  (closed below)
    outer = subprocess.Popen(argv, stdout=log, stderr=log, env=env)
    try:
        sock = tmp_path / "supd.sock"
        wait_until(sock.exists, describe=lambda: (tmp_path / "supd.log").read_text())
        children = Path(f"/proc/{outer.pid}/task/{outer.pid}/children")
        [supd_pid] = [int(pid) for pid in wait_until(lambda: children.read_text().split())]
        assert "\t1\n" in Path(f"/proc/{supd_pid}/status").read_text().split("NSpid:")[1]
        wait_until(marker.exists)

        def no_zombie_children() -> bool:
            children = Path(f"/proc/{supd_pid}/task/{supd_pid}/children").read_text().split()
            return all(pid_alive(int(c)) for c in children)

        wait_until(no_zombie_children, describe="the orphan reaped by PID 1")
        os.kill(supd_pid, signal.SIGTERM)
        assert outer.wait(timeout=20) == 0
    finally:
        if outer.poll() is None:
            outer.kill()
            outer.wait()
        log.close()


# -- promises of the README ---------------------------------------------------------------


def context_switches(pid: int) -> int:
    status = proc_status(pid)
    return int(status["voluntary_ctxt_switches"]) + int(status["nonvoluntary_ctxt_switches"])


def test_an_idle_daemon_does_not_wake_up(supd: Factory) -> None:
    d = supd(f"""
        [programs.idle]
        command = {SLEEP}
        numprocs = 5
        startsecs = 0.1
    """)
    for i in range(5):
        d.wait_state(f"idle:{i}", "RUNNING")

    # Start-up traffic (the last startsecs timers, the status calls above) must end first.
    def quiet_for(seconds: float) -> bool:
        before = context_switches(d.pid)
        time.sleep(seconds)  # a measurement window, not a wait for an event
        return context_switches(d.pid) == before

    wait_until(lambda: quiet_for(0.3), describe="the daemon to go quiet")
    assert quiet_for(1.0)  # the measurement itself: nothing happens in a whole second


def test_a_daemon_goes_idle_after_exits_whose_sigchlds_collapsed(
    supd: Factory, tmp_path: Path
) -> None:
    """Twenty programs exit together (their SIGCHLDs collapse, so the selector peeks for
    the exits no SIGCHLD named): every exit is reported, and then nothing is left armed
    that wakes the daemon (no peek, no timer)."""
    go = tmp_path / "go"
    quitter = cmd(f"import os, time\nwhile not os.path.exists({str(go)!r}): time.sleep(0.01)")
    d = supd(f"""
        [programs.quitter]
        command = {quitter}
        numprocs = 20
        startsecs = 0
        autorestart = false
        [programs.stays]
        command = {SLEEP}
        startsecs = 0
    """)
    for i in range(20):
        d.wait_state(f"quitter:{i}", "RUNNING")
    go.touch()
    for i in range(20):
        d.wait_state(f"quitter:{i}", "EXITED")
    peeks = re.search(r"^supd_exit_peeks_total (\d+)", d.rpc("metrics")["text"], re.M)
    assert peeks is not None and int(peeks[1]) >= 1  # the peeks ran (and must have ended)

    def quiet_for(seconds: float) -> bool:
        before = context_switches(d.pid)
        time.sleep(seconds)  # a measurement window, not a wait for an event
        return context_switches(d.pid) == before

    wait_until(lambda: quiet_for(0.3), describe="the daemon to go quiet")
    assert quiet_for(1.0)


def test_exits_whose_sigchlds_collapsed_are_reported_with_their_pipes_still_open(
    supd: Factory, tmp_path: Path
) -> None:
    """Two programs exit while supd is stopped, so one SIGCHLD stands for both, and a
    child of each keeps its output pipes open (no EOF, no hint_exit): the exit no
    SIGCHLD names is found by the selector's peek, which wakes an idle daemon by itself."""
    go = tmp_path / "go"
    holders = tmp_path / "holders"
    holders.mkdir()
    program = cmd(f"""
        import os, time
        holder = os.fork()
        if holder == 0:  # keeps stdout and stderr open after the program's exit
            time.sleep(1000)
            os._exit(0)
        open(os.path.join({str(holders)!r}, str(holder)), "w").close()
        while not os.path.exists({str(go)!r}):
            time.sleep(0.01)
        os._exit(3)
    """)
    d = supd(f"""
        [programs.quitter]
        command = {program}
        numprocs = 2
        startsecs = 0
        autorestart = false
        leftovers = "keep"  # (killing them would close the pipes: an EOF, a hint)
    """)
    mains = [d.wait_state(f"quitter:{i}", "RUNNING")["pid"] for i in range(2)]
    wait_until(lambda: len(list(holders.iterdir())) == 2)
    d.track(*(int(p.name) for p in holders.iterdir()))
    d.signal(signal.SIGSTOP)
    try:
        wait_until(lambda: process_state(d.pid) == "T", describe="supd stopped")
        go.touch()
        wait_until(lambda: {process_state(pid) for pid in mains} == {"Z"})
    finally:
        d.signal(signal.SIGCONT)
    for i in range(2):
        assert d.wait_state(f"quitter:{i}", "EXITED")["exit_code"] == 3


def test_programs_start_in_priority_order(supd: Factory, tmp_path: Path) -> None:
    order = tmp_path / "order"
    programs = "".join(
        f"""
        [programs.{name}]
        command = {cmd(f"open({str(order)!r}, 'a').write('{name}'); import time; time.sleep(99)")}
        priority = {priority}
        startsecs = 0
        """
        for name, priority in [("web", 300), ("db", 10), ("app", 200)]
    )  # fmt: skip
    d = supd(programs)
    spawned = wait_until(lambda: len(d.events("spawned")) == 3 and d.events("spawned"))
    assert [e["process"] for e in spawned] == ["db", "app", "web"]
    wait_until(lambda: order.exists() and len(order.read_text()) == len("webdbapp"))


def test_stopsignal_is_what_the_program_gets(supd: Factory, tmp_path: Path) -> None:
    got, ready = tmp_path / "got", tmp_path / "ready"
    d = supd(f"""
        [programs.graceful]
        command = {
        cmd(f'''
            import signal, sys, time
            def bye(signum, _):
                open({str(got)!r}, "w").write(signal.Signals(signum).name)
                sys.exit(0)
            signal.signal(signal.SIGINT, bye)
            signal.signal(signal.SIGTERM, bye)
            open({str(ready)!r}, "w").close()
            time.sleep(1000)
        ''')
    }
        startsecs = 0
        stopsignal = "INT"
    """)
    d.wait_state("graceful", "RUNNING")
    wait_until(ready.exists)
    [result] = d.rpc("stop", {"names": ["graceful"]})
    assert result["ok"]
    assert got.read_text() == "SIGINT"


def test_reload_honours_autostart_and_includes(supd: Factory, tmp_path: Path) -> None:
    (tmp_path / "conf.d").mkdir()
    d = supd(f"""
        [supervisor]
        include = ["conf.d/*.toml"]
        [programs.main]
        command = {SLEEP}
        startsecs = 0
    """)
    d.wait_state("main", "RUNNING")
    (tmp_path / "conf.d" / "extra.toml").write_text(f"""
[programs.manual]
command = {SLEEP}
autostart = false
[programs.auto]
command = {SLEEP}
startsecs = 0
""")
    assert sorted(d.rpc("reload")["added"]) == ["auto", "manual"]
    d.wait_state("auto", "RUNNING")
    assert d.status()["manual"]["state"] == "STOPPED"
    (tmp_path / "conf.d" / "extra.toml").write_text(f"[programs.main]\ncommand = {SLEEP}\n")
    with pytest.raises(RpcError) as info:  # main defined twice: the reload is refused
        d.rpc("reload")
    assert "extra.toml" in str(info.value.error["data"])
    assert set(d.status()) == {"main", "manual", "auto"}


def test_log_format_and_level_shape_the_daemons_own_log(supd: Factory) -> None:
    console = supd("""
        [supervisor]
        log_format = "console"
        [programs.p]
        command = "sleep 1000"
        startsecs = 0
    """)
    console.wait_state("p", "RUNNING")
    lines = wait_until(lambda: [ln for ln in console.describe().splitlines() if "spawned" in ln])
    assert "process=p" in lines[0] and not lines[0].lstrip().startswith("{")
    console.kill()
    console.log_path.unlink()
    quiet = supd("""
        [supervisor]
        log_level = "warning"
        [programs.missing]
        command = "/no/such/program"
        startretries = 0
    """)
    quiet.wait_state("missing", "FATAL")
    levels = {e["level"] for e in wait_until(quiet.events)}
    assert levels <= {"warning", "error"} and "error" in levels
