"""What a supervisord user does in the first hour (issue 11), with a real daemon and the
real supctl command: long stops, names with globs, pid, tail, --json errors, commands
supd does not have, and programs run as another user."""

from __future__ import annotations

import json
import os
import pwd
import signal
import subprocess
import time
from collections.abc import Callable

import pytest

from tests.helpers import PY, REPO, SLEEP, Supd, cmd, wait_until

Factory = Callable[..., Supd]

# Quick probes, so that "longer than supctl's probe timeout" takes a second, not 30.
FAST_PROBES = "import supd.ctl as c; c.PROBE_INTERVAL_S = 0.1; c.PROBE_TIMEOUT_S = 1.0; "

# Takes its time to stop: SIGTERM starts a 2.5 s clean-up (stopwaitsecs is 40).
SLOW_TO_STOP = cmd("""
    import signal, sys, time
    def cleanup(*_):
        time.sleep(2.5)
        sys.exit(0)
    signal.signal(signal.SIGTERM, cleanup)
    print("ready", flush=True)
    while True:
        time.sleep(1000)
""")


def supctl(
    d: Supd, *args: str, probes: str = "", timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run the real supctl on `d`'s socket; `probes` may tune its probe timing first."""
    env = dict(os.environ, PYTHONPATH=str(REPO), NO_COLOR="1")
    code = f"import sys; {probes}import supd.ctl; sys.exit(supd.ctl.main())"
    return subprocess.run(
        [PY, "-c", code, "-s", str(d.socket), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


# --------------------------------------------------------------------------- long stops


@pytest.fixture
def slow(supd: Factory) -> Supd:
    d = supd(f"""
        [programs.slow]
        command = {SLOW_TO_STOP}
        startsecs = 0
        stopwaitsecs = 40
    """)
    d.wait_state("slow", "RUNNING")
    wait_until(lambda: "ready" in d.rpc("tail", {"name": "slow"})["data"])
    return d


def test_a_stop_longer_than_the_probe_timeout_is_waited_for(slow: Supd) -> None:
    started = time.monotonic()
    done = supctl(slow, "stop", "slow", probes=FAST_PROBES)
    assert (done.returncode, done.stdout, done.stderr) == (0, "slow: stopped\n", "")
    assert time.monotonic() - started > 2.5  # longer than a probe may take
    assert slow.state("slow") == "STOPPED"


def test_timeout_option_expiry_has_its_own_message_and_exit_5(slow: Supd) -> None:
    done = supctl(slow, "--timeout", "0.3", "stop", "slow", probes=FAST_PROBES)
    assert done.returncode == 5
    assert done.stderr == (
        "supctl: no answer to stop within --timeout 0.3 s; supd may still carry it out"
        " (see supctl status)\n"
    )
    assert slow.state("slow") == "STOPPING"  # supd carries on
    slow.wait_state("slow", "STOPPED")


def test_a_daemon_that_stops_answering_is_unreachable_exit_4(slow: Supd) -> None:
    code = f"import sys; {FAST_PROBES}import supd.ctl; sys.exit(supd.ctl.main())"
    proc = subprocess.Popen(
        [PY, "-c", code, "-s", str(slow.socket), "stop", "slow"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    try:
        slow.wait_state("slow", "STOPPING")
        slow.signal(signal.SIGSTOP)  # hung: it accepts connections but answers nothing
        _, err = proc.communicate(timeout=30)
    finally:
        slow.signal(signal.SIGCONT)
        proc.kill()
        proc.wait()
    assert proc.returncode == 4
    assert err == (
        f"supctl: cannot reach supd at {slow.socket}: supd stopped answering"
        " (no answer within 1 s)\n"
    )


# --------------------------------------------------------------------------- names


NAMES_CONFIG = f"""
    [programs.crashy]
    command = {SLEEP}
    startsecs = 0
    [programs.web]
    command = {SLEEP}
    numprocs = 2
    startsecs = 0
    [programs.worker]
    command = {SLEEP}
    numprocs = 2
    startsecs = 0
"""


@pytest.fixture
def fleet(supd: Factory) -> Supd:
    d = supd(NAMES_CONFIG)
    for name in ("crashy", "web:0", "web:1", "worker:0", "worker:1"):
        d.wait_state(name, "RUNNING")
    return d


def test_restart_program_star_of_a_one_process_program(fleet: Supd) -> None:
    before = fleet.status()["crashy"]["pid"]
    done = supctl(fleet, "restart", "crashy:*")
    assert (done.returncode, done.stdout) == (0, "crashy: restarted\n"), done.stderr
    assert fleet.status()["crashy"]["pid"] not in (None, before)


def test_stop_and_start_with_the_group_forms_and_globs(fleet: Supd) -> None:
    done = supctl(fleet, "stop", "web:*")
    assert (done.returncode, done.stdout) == (0, "web:0: stopped\nweb:1: stopped\n")
    assert supctl(fleet, "start", "web:").stdout == "web:0: started\nweb:1: started\n"
    done = supctl(fleet, "stop", "*:1")
    assert (done.returncode, done.stdout) == (0, "web:1: stopped\nworker:1: stopped\n")
    states = {name: info["state"] for name, info in fleet.status().items()}
    assert states == {
        "crashy": "RUNNING",
        "web:0": "RUNNING",
        "web:1": "STOPPED",
        "worker:0": "RUNNING",
        "worker:1": "STOPPED",
    }


def test_status_with_a_glob(fleet: Supd) -> None:
    done = supctl(fleet, "status", "w*")
    assert done.returncode == 0
    assert [line.split()[0] for line in done.stdout.splitlines()] == [
        "web:0",
        "web:1",
        "worker:0",
        "worker:1",
    ]
    assert supctl(fleet, "status", "worker:[1]").stdout.split()[0] == "worker:1"


def test_a_pattern_that_matches_nothing_changes_nothing(fleet: Supd) -> None:
    done = supctl(fleet, "stop", "web", "nope*")
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == "supctl: no such process: nope*\n"
    assert fleet.state("web:0") == "RUNNING"


def test_pid_of_a_program_with_several_processes(fleet: Supd) -> None:
    status = fleet.status()
    done = supctl(fleet, "pid", "web")
    assert done.returncode == 0
    assert done.stdout == f"web:0  {status['web:0']['pid']}\nweb:1  {status['web:1']['pid']}\n"
    assert supctl(fleet, "pid", "web:1").stdout == f"{status['web:1']['pid']}\n"
    assert supctl(fleet, "pid", "crashy").stdout == f"{status['crashy']['pid']}\n"
    assert supctl(fleet, "pid").stdout == f"{fleet.pid}\n"
    supctl(fleet, "stop", "web:1")
    done = supctl(fleet, "pid", "web")
    assert (done.returncode, done.stdout) == (1, f"web:0  {status['web:0']['pid']}\n")
    assert done.stderr == "supctl: web:1 is not running\n"


def test_json_errors_from_the_daemon(fleet: Supd) -> None:
    done = supctl(fleet, "--json", "stop", "nope")
    assert (done.returncode, done.stderr) == (1, "")
    assert json.loads(done.stdout) == {
        "error": {"code": 1, "message": "no such process: nope", "data": ["nope"]}
    }


def test_supervisorctl_commands_get_advice(fleet: Supd) -> None:
    done = supctl(fleet, "add", "web")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith("supctl: supd has no add command: programs come from the config")


# --------------------------------------------------------------------------- tail


def test_tail_counts_lines_and_reads_back_from_the_log_files(supd: Factory) -> None:
    # 3,000 lines of 80 bytes: 240 KB, far more than the 64 KiB kept in memory, over a
    # current file and several 50 KB backups.
    writer = cmd("""
        import time
        for n in range(3000):
            print(f"{n:05d} " + "x" * 73)
        print("done", flush=True)
        time.sleep(1000)
    """)
    d = supd(f"""
        [programs.chatty]
        command = {writer}
        startsecs = 0
        stdout_logfile_maxbytes = "50KB"
        stdout_logfile_backups = 10
    """)
    log = d.dir / "logs" / "chatty.out.log"
    wait_until(lambda: log.exists() and log.read_bytes().endswith(b"done\n"))
    assert log.with_name("chatty.out.log.3").exists()
    lines = [f"{n:05d} " + "x" * 73 + "\n" for n in range(3000)] + ["done\n"]

    done = supctl(d, "tail", "-100", "chatty")
    assert (done.returncode, done.stdout) == (0, "".join(lines[-100:])), done.stderr
    assert supctl(d, "tail", "-n", "2500", "chatty").stdout == "".join(lines[-2500:])
    assert supctl(d, "tail", "chatty").stdout == "".join(lines[-10:])
    assert supctl(d, "tail", "-c", "12", "chatty").stdout == "x" * 6 + "\ndone\n"
    assert supctl(d, "tail", "-c", "200000", "chatty").stdout == "".join(lines)[-200000:]


# --------------------------------------------------------------------------- users


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_a_program_run_as_nobody_gets_nobodys_home_user_logname_and_shell(
    supd: Factory,
) -> None:
    entry = pwd.getpwnam("nobody")
    d = supd("""
        [programs.plain]
        command = ["/usr/bin/env"]
        user = "nobody"
        startsecs = 0
        autorestart = "never"
        [programs.told]
        command = ["/usr/bin/env"]
        user = "nobody"
        startsecs = 0
        autorestart = "never"
        environment = { HOME = "/srv/told", SHELL = "/bin/sh" }
        [programs.grouped]
        command = ["/usr/bin/env"]
        group = "nogroup"
        startsecs = 0
        autorestart = "never"
    """)

    def environment(name: str) -> dict[str, str]:
        d.wait_state(name, "EXITED")
        lines = (d.dir / "logs" / f"{name}.out.log").read_text().splitlines()
        return dict(line.split("=", 1) for line in lines if "=" in line)

    plain = environment("plain")
    assert (plain["HOME"], plain["USER"], plain["LOGNAME"], plain["SHELL"]) == (
        entry.pw_dir,
        "nobody",
        "nobody",
        entry.pw_shell,
    )
    told = environment("told")
    assert (told["HOME"], told["USER"], told["LOGNAME"], told["SHELL"]) == (
        "/srv/told",
        "nobody",
        "nobody",
        "/bin/sh",
    )
    # A group alone switches no user: the account variables stay supd's.
    grouped = environment("grouped")
    assert grouped.get("HOME") == os.environ.get("HOME")
    assert grouped.get("USER") == os.environ.get("USER")
