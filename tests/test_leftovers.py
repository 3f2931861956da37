"""Leave no process behind: what a program leaves, after stop, shutdown, its own exit and
a SIGKILLed supd, with cgroups and with the session fallback (cgroups = "off").

Each scenario runs in both modes where it can; the cgroup mode is skipped, with the
reason, where this machine gives supd no writable cgroup v2 hierarchy. A process that
called setsid() escapes the fallback: those tests say so by checking it survives there.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from supd import cgroups, sessions
from tests.helpers import PY, Supd, children_of, kill_quietly, pid_alive, toml_list, wait_until

Factory = Callable[..., Supd]

HIERARCHY = cgroups.detect()
CGROUPS_WRITABLE = HIERARCHY is not None and os.access(HIERARCHY.own, os.W_OK)
NO_CGROUPS = "no writable cgroup v2 hierarchy here (needs root and a cgroup2 mount)"
MEMORY_ON_V2 = CGROUPS_WRITABLE and "memory" in cgroups.controllers_for_programs(HIERARCHY)


@pytest.fixture(params=["cgroups", "sessions"])
def mode(request: pytest.FixtureRequest) -> str:
    if request.param == "cgroups" and not CGROUPS_WRITABLE:
        pytest.skip(NO_CGROUPS)
    return str(request.param)


def supervisor_table(mode: str) -> str:
    cgroups_option = '"auto"' if mode == "cgroups" else '"off"'
    return f"""
        [supervisor]
        log_format = "json"
        log_level = "debug"
        cgroups = {cgroups_option}
    """


@pytest.fixture
def strays() -> Iterator[list[int]]:
    """Pids a test saw; whatever of them still lives at the end is killed."""
    seen: list[int] = []
    yield seen
    for pid in seen:
        kill_quietly(pid)


def proc_comm(pid: int | None) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except (FileNotFoundError, TypeError):
        return ""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


# -- the reproduction: a SIGKILLed supd's grandchild holding a port -------------------------


def test_a_sigkilled_supds_grandchild_is_gone_before_the_new_supd_binds_its_port(
    supd: Factory, tmp_path: Path, mode: str, strays: list[int]
) -> None:
    port = free_port()
    server = f"{PY} -m http.server {port} --bind 127.0.0.1"
    config = f"""
        {supervisor_table(mode)}
        [programs.web]
        command = ["/bin/sh", "-c", "{server}; echo done"]
        startsecs = 1
    """
    first = supd(config)
    sh = int(first.wait_state("web", "RUNNING")["pid"])
    wait_until(lambda: listening(port), describe=f"http.server on {port}")
    [grandchild] = wait_until(lambda: children_of(sh), describe="http.server under sh")
    strays.append(grandchild)
    first.signal(signal.SIGKILL)
    first.wait_exit()
    # The bug's premise: sh had the parent-death signal, its child did not.
    wait_until(lambda: not pid_alive(sh), describe="sh ended by its parent-death signal")
    assert pid_alive(grandchild) and listening(port)

    first_lines = len(first.events())  # both write to one log file
    second = supd(config)
    entry = second.wait_state("web", "RUNNING")
    events = second.events()[first_lines:]
    # Killed (and gone) before anything started: the new server bound its port at once.
    killed = [e for e in events if e["event"] == "leftover_killed" and e["pid"] == grandchild]
    assert killed and "http.server" in killed[0]["command"], second.describe()
    assert not pid_alive(grandchild)
    assert entry["restarts"] == 0 and entry["pid"] != sh
    changes = [e["to_state"] for e in events if e["event"] == "state_changed"]
    assert changes == ["STARTING", "RUNNING"], second.describe()
    wait_until(lambda: listening(port))
    errors = tmp_path / "logs" / "web.err.log"  # made at the first write only
    assert not errors.exists() or b"Address already in use" not in errors.read_bytes()


# -- programs that leave things behind -------------------------------------------------------

# A background sleep, a double-forked one (re-parented away at once) and one in a session
# of its own (setsid), each recording its pid; then the main process runs `then`.
ESCAPERS = (
    "sleep 1000001 & echo background $! >> {pids}; "
    "( ( sleep 1000002 & echo double-forked $! >> {pids} ) & ); "
    "setsid sleep 1000003 & echo setsid $! >> {pids}; "
    "while [ $(wc -l < {pids}) -lt 3 ]; do sleep 0.01; done; "
    "{then}"
)


def escapers(pids: Path, then: str) -> str:
    return toml_list(["/bin/sh", "-c", ESCAPERS.format(pids=pids, then=then)])


def recorded(pids: Path, strays: list[int]) -> dict[str, int]:
    """The three escapers' pids by kind, once all three are written."""
    lines = wait_until(
        lambda: pids.exists() and len(lines := pids.read_text().splitlines()) == 3 and lines
    )
    found = {kind: int(pid) for kind, pid in (line.split() for line in lines)}  # in any order
    strays.extend(found.values())
    # The shell writes $! as soon as it forked: the setsid one may not have left the
    # session yet (under load), and a stop then would rightly take it along.
    setsid = found["setsid"]
    wait_until(
        lambda: session_of(setsid) == setsid,
        describe=lambda: f"setsid escaper {setsid} in session {session_of(setsid)}",
    )
    return found


def session_of(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except ProcessLookupError:
        return None


def expect_all_gone(found: dict[str, int], mode: str) -> None:
    """Every escaper gone with cgroups; all but the setsid one without (it escapes)."""
    caught = found if mode == "cgroups" else {k: v for k, v in found.items() if k != "setsid"}
    wait_until(
        lambda: not any(pid_alive(pid) for pid in caught.values()),
        describe=lambda: f"{[k for k, p in caught.items() if pid_alive(p)]} still alive",
    )
    if mode == "sessions":
        assert pid_alive(found["setsid"]), "the fallback cannot see a new session"


def test_stop_leaves_nothing_behind(
    supd: Factory, tmp_path: Path, mode: str, spawn_env: dict[str, str], strays: list[int]
) -> None:
    pids = tmp_path / "pids"
    d = supd(
        f"""
        {supervisor_table(mode)}
        [programs.esc]
        command = {escapers(pids, "exec sleep 1000004")}
        startsecs = 0
        """,
        env=spawn_env,
    )
    main = int(d.wait_state("esc", "RUNNING")["pid"])
    found = recorded(pids, strays)
    if mode == "cgroups":
        cgroup = cgroup_of(d, "esc")
        # Every one joined. The shell's short-lived helpers (the `wc` of its wait loop, the
        # subshell that double-forked) may still be in the cgroup for a moment: wait them out.
        expected = set(found.values()) | {main}
        wait_until(
            lambda: set(cgroup.pids()) == expected,
            describe=lambda: f"cgroup holds {sorted(cgroup.pids())}, expected {sorted(expected)}",
        )
    [stopped] = d.rpc("stop", {"names": ["esc"]})
    assert stopped["ok"] and stopped["state"] == "STOPPED"
    if mode == "cgroups":  # answered only once the cgroup was empty
        assert not any(pid_alive(pid) for pid in found.values())
        assert cgroup_of(d, "esc").pids() == []
    expect_all_gone(found, mode)


def test_a_program_that_exits_leaves_nothing_behind(
    supd: Factory, tmp_path: Path, mode: str, strays: list[int]
) -> None:
    pids = tmp_path / "pids"
    d = supd(f"""
        {supervisor_table(mode)}
        [programs.esc]
        command = {escapers(pids, "exit 3")}
        startsecs = 0
        autorestart = "never"
    """)
    found = recorded(pids, strays)
    assert d.wait_state("esc", "EXITED")["exit_code"] == 3
    if mode == "cgroups":  # EXITED is reported once the cgroup is empty
        assert not any(pid_alive(pid) for pid in found.values())
    expect_all_gone(found, mode)


def test_the_next_run_after_its_leftovers_were_killed_lives(
    supd: Factory, tmp_path: Path, mode: str, strays: list[int]
) -> None:
    """The first run exits leaving a background sleep, which supd kills (cgroup.kill);
    the restart must then run normally. Linux SIGKILLs children born by clone3 into a
    cgroup that was once killed, so supd gives the next run a fresh one."""
    marker = tmp_path / "first-run-done"
    script = f"sleep 100031 & if [ -e {marker} ]; then exec sleep 100032; fi; touch {marker}"
    d = supd(f"""
        {supervisor_table(mode)}
        [programs.again]
        command = {json.dumps(["/bin/sh", "-c", script])}
        startsecs = 0
        autorestart = "always"
        backoff_initial = 0
    """)
    wait_until(marker.exists)
    entry = d.wait_state("again", "RUNNING")
    wait_until(lambda: proc_comm(d.status()["again"]["pid"]) == "sleep")
    pid = d.status()["again"]["pid"]
    strays.append(pid)
    assert d.status()["again"]["state"] == "RUNNING" and pid_alive(pid), entry
    deaths = d.rpc("deaths", {"name": "again"})["deaths"]
    assert [death["cause"] for death in deaths] == ["exited"], deaths  # nothing killed it


def test_shutdown_leaves_nothing_behind(
    supd: Factory, tmp_path: Path, mode: str, strays: list[int]
) -> None:
    pids = tmp_path / "pids"
    d = supd(f"""
        {supervisor_table(mode)}
        [programs.esc]
        command = {escapers(pids, "exec sleep 1000004")}
        startsecs = 0
    """)
    found = recorded(pids, strays)
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    if mode == "cgroups":  # supd exited after its programs' cgroups were empty
        assert not any(pid_alive(pid) for pid in found.values())
        assert HIERARCHY is not None
        root = cgroups.tree_root(HIERARCHY, os.path.realpath(d.config_path))
        assert not root.exists(), "a clean exit removes supd's cgroup tree"
    expect_all_gone(found, mode)
    assert not sessions.journal_path(d.socket).exists()


def test_leftovers_keep_leaves_them_running(
    supd: Factory, tmp_path: Path, mode: str, strays: list[int]
) -> None:
    pids = tmp_path / "pids"
    d = supd(f"""
        {supervisor_table(mode)}
        [programs.esc]
        command = {escapers(pids, "exit 0")}
        startsecs = 0
        autorestart = "never"
        leftovers = "keep"
    """)
    found = recorded(pids, strays)
    d.wait_state("esc", "EXITED")
    assert all(pid_alive(pid) for pid in found.values())
    assert not d.events("cgroup_killed") and not d.events("leftovers_killed")


def test_a_sigkilled_supds_leftovers_are_killed_and_logged_at_start(
    supd: Factory, tmp_path: Path, mode: str, strays: list[int]
) -> None:
    pids = tmp_path / "pids"
    config = f"""
        {supervisor_table(mode)}
        [programs.esc]
        command = {escapers(pids, "exec sleep 1000004")}
        startsecs = 0
    """
    first = supd(config)
    main = int(first.wait_state("esc", "RUNNING")["pid"])
    found = recorded(pids, strays)
    first.signal(signal.SIGKILL)
    first.wait_exit()
    wait_until(lambda: not pid_alive(main), describe="main ended by its parent-death signal")
    pids.unlink()
    second = supd(config)
    recorded(pids, strays)  # the program started again, after:
    killed = {e["pid"] for e in second.events("leftover_killed")}
    expected = found if mode == "cgroups" else {k: v for k, v in found.items() if k != "setsid"}
    assert set(expected.values()) <= killed, second.describe()
    assert not any(pid_alive(pid) for pid in expected.values())


# -- cgroups only ---------------------------------------------------------------------------


def cgroup_of(d: Supd, name: str) -> cgroups.ProcessCgroup:
    assert HIERARCHY is not None
    root = cgroups.tree_root(HIERARCHY, os.path.realpath(d.config_path))
    return cgroups.ProcessCgroup(root / "programs" / cgroups.cgroup_name(name))


needs_cgroups = pytest.mark.skipif(not CGROUPS_WRITABLE, reason=NO_CGROUPS)


@needs_cgroups
def test_cgroup_events_wake_the_loop_when_the_last_leftover_is_gone(
    supd: Factory, tmp_path: Path, strays: list[int]
) -> None:
    """No timer: stopwaitsecs is an hour, and the stop completes as soon as the last of
    many leftovers (each slow to die: 32 MB to tear down) has left the cgroup."""
    ready = tmp_path / "ready"
    leftover = "x = b'x' * (32 << 20); import time; time.sleep(1000)"
    code = (
        "import subprocess, sys;"
        f"[subprocess.Popen([sys.executable, '-c', {leftover!r}]) for _ in range(16)];"
        f"open({str(ready)!r}, 'w').close(); import time; time.sleep(1000)"
    )
    d = supd(f"""
        {supervisor_table("cgroups")}
        [programs.many]
        command = {toml_list([PY, "-c", code])}
        startsecs = 0
        stopwaitsecs = 3600
    """)
    d.wait_state("many", "RUNNING")
    wait_until(ready.exists)
    cgroup = cgroup_of(d, "many")
    strays.extend(cgroup.pids())
    [stopped] = d.rpc("stop", {"names": ["many"]})
    assert stopped["ok"] and stopped["state"] == "STOPPED"
    assert cgroup.pids() == []
    [empty] = d.events("cgroup_empty")
    wakeups = d.events("cgroup_events")
    # Emptied after the kill: seen through EPOLLPRI on cgroup.events, never by a timer.
    assert empty["woken"] and wakeups and not wakeups[-1]["populated"], (empty, wakeups)


@needs_cgroups
def test_status_reports_cgroup_accounting(supd: Factory) -> None:
    d = supd(f"""
        {supervisor_table("cgroups")}
        [programs.busy]
        command = {toml_list([PY, "-c", "while True: pass"])}
        startsecs = 0
    """)
    d.wait_state("busy", "RUNNING")
    assert "cpu_seconds" not in d.status()["busy"]  # asked for, not sent by default

    def accounted() -> dict[str, Any]:
        [entry] = d.rpc("status", {"names": ["busy"], "accounting": True})
        return dict(entry)

    entry = wait_until(lambda: (e := accounted())["cpu_seconds"] > 0.05 and e)
    assert "survivors" not in entry  # nothing was killed
    controllers = cgroups.controllers_for_programs(HIERARCHY) if HIERARCHY else set()
    if "memory" not in controllers:  # None, not 0: there is no memory accounting here
        assert entry["memory_bytes"] is None and entry["oom_kills"] is None


@needs_cgroups
def test_limits_are_written_or_warned_about_never_refused(supd: Factory, tmp_path: Path) -> None:
    config = f"""
        {supervisor_table("cgroups")}
        [programs.limited]
        command = "/bin/sleep 1000"
        startsecs = 0
        memory_max = "64MB"
        cpu_max = "50%"
        pids_max = 10
    """
    d = supd(config)
    d.wait_state("limited", "RUNNING")  # started, whatever the controllers
    assert HIERARCHY is not None
    available = cgroups.controllers_for_programs(HIERARCHY)
    cgroup = cgroup_of(d, "limited")
    warned = {e["problem"].split()[0] for e in d.events("cgroup_limit_not_set")}
    checked = subprocess.run(
        [PY, "-m", "supd", "-c", str(d.config_path), "--check"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert checked.returncode == 0
    for option, controller, file, value in (
        ("memory_max", "memory", "memory.max", "67108864"),
        ("cpu_max", "cpu", "cpu.max", "50000 100000"),
        ("pids_max", "pids", "pids.max", "10"),
    ):
        if controller in available:
            assert (cgroup.path / file).read_text().strip() == value
            assert option not in warned
        else:
            assert option in warned, d.describe()
            assert f"programs.limited: {option} is not applied" in checked.stderr


def test_oom_kills_are_counted_from_memory_events(tmp_path: Path) -> None:
    """memory.events' oom_kill (a sample file: the memory controller is on cgroup v1 on
    this machine, so no real OOM kill can be caused in a cgroup v2 memory.max here)."""
    (tmp_path / "cpu.stat").write_text("usage_usec 250000\nuser_usec 200000\n")
    (tmp_path / "memory.current").write_text("1048576\n")
    (tmp_path / "memory.events").write_text("low 0\nhigh 0\nmax 12\noom 2\noom_kill 2\n")
    stats = cgroups.ProcessCgroup(tmp_path).stats()
    assert stats == cgroups.CgroupStats(cpu_seconds=0.25, memory_bytes=1048576, oom_kills=2)
    assert cgroups.ProcessCgroup(tmp_path).stats(memory_controller=False).oom_kills is None


@pytest.mark.skipif(
    not MEMORY_ON_V2,
    reason="the memory controller is not available on cgroup v2 here (it is on cgroup v1)",
)
def test_an_oom_kill_in_a_limited_cgroup_is_counted(supd: Factory) -> None:
    d = supd(f"""
        {supervisor_table("cgroups")}
        [programs.hog]
        command = {toml_list([PY, "-c", "x = b'x' * (256 << 20)"])}
        startsecs = 0
        autorestart = "never"
        memory_max = "32MB"
    """)
    d.wait_state("hog", "EXITED")
    assert d.status()["hog"]["oom_kills"] >= 1


def test_limits_without_cgroups_are_a_warning_not_a_refusal(supd: Factory) -> None:
    d = supd(f"""
        {supervisor_table("sessions")}
        [programs.limited]
        command = "/bin/sleep 1000"
        startsecs = 0
        pids_max = 10
    """)
    d.wait_state("limited", "RUNNING")
    [warning] = d.events("cgroup_limit_not_set")
    assert warning["problem"] == 'pids_max is not applied: cgroups = "off"'
    checked = subprocess.run(
        [sys.executable, "-m", "supd", "-c", str(d.config_path), "--check"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert checked.returncode == 0
    assert 'programs.limited: pids_max is not applied: cgroups = "off"' in checked.stderr


def test_the_journal_lists_live_sessions_and_is_removed_on_a_clean_exit(
    supd: Factory, strays: list[int]
) -> None:
    d = supd(f"""
        {supervisor_table("sessions")}
        [programs.one]
        command = "/bin/sleep 1000"
        startsecs = 0
    """)
    pid = int(d.wait_state("one", "RUNNING")["pid"])
    journal = sessions.journal_path(d.socket)
    stat = sessions.read_stat(pid)
    assert stat is not None
    assert sessions.SessionJournal(journal).load() == {pid: stat.start_time}
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    assert not journal.exists()


FREEZER_V1 = Path("/sys/fs/cgroup/freezer")


@needs_cgroups
@pytest.mark.skipif(
    not (FREEZER_V1 / "cgroup.procs").exists() or not os.access(FREEZER_V1, os.W_OK),
    reason="needs the cgroup v1 freezer (writable) to hold a process in D state",
)
def test_survivors_of_sigkill_are_reported_while_supd_serves_everything_else(
    supd: Factory, tmp_path: Path, strays: list[int]
) -> None:
    """A process frozen by the v1 freezer sleeps in D state and survives SIGKILL until
    thawed: the stop waits for it, status names it, and supd goes on serving."""
    pidfile = tmp_path / "leftover"
    d = supd(f"""
        {supervisor_table("cgroups")}
        [programs.esc]
        command = ["/bin/sh", "-c", "sleep 1000005 & echo $! > {pidfile}; exec sleep 1000"]
        startsecs = 0
        stopwaitsecs = 0.2
        [programs.other]
        command = "/bin/sleep 1000"
        autostart = false
        startsecs = 0
    """)
    d.wait_state("esc", "RUNNING")
    leftover = int(wait_until(lambda: pidfile.exists() and pidfile.read_text().strip()))
    strays.append(leftover)
    freezer = FREEZER_V1 / f"supd-test-{os.getpid()}-{leftover}"
    freezer.mkdir()
    try:
        (freezer / "cgroup.procs").write_text(str(leftover))
        (freezer / "freezer.state").write_text("FROZEN")
        wait_until(lambda: (freezer / "freezer.state").read_text().strip() == "FROZEN")
        [accepted] = d.rpc("stop", {"names": ["esc"], "wait": False})
        assert accepted["ok"]

        def survivors() -> list[dict[str, object]]:
            entry = d.status()["esc"]
            return list(entry.get("survivors") or []) if entry["state"] == "STOPPING" else []

        [survivor] = wait_until(survivors, describe=lambda: f"{d.status()['esc']}")
        assert survivor["pid"] == leftover and survivor["state"] == "D"
        assert survivor["wchan"] not in ("", "?") and "sleep 1000005" in str(survivor["command"])
        assert f"survived SIGKILL: pid {leftover} D" in d.status()["esc"]["description"]
        [started] = d.rpc("start", {"names": ["other"]})  # everything else is served
        assert started["ok"] and started["state"] == "RUNNING"
        assert d.state("esc") == "STOPPING"  # not stopped while part of it lives
        (freezer / "freezer.state").write_text("THAWED")
        d.wait_state("esc", "STOPPED")
        assert not pid_alive(leftover)
    finally:
        with contextlib.suppress(OSError):
            (freezer / "freezer.state").write_text("THAWED")
        kill_quietly(leftover)
        wait_until(lambda: not (freezer / "cgroup.procs").read_text().split())
        freezer.rmdir()


# -- exec probes: in the program's cgroup, and gone with it ---------------------------------

# A hung exec probe: it records its pid, a background child's and (with cgroups) a
# setsid'd one's, and its own cgroup (/proc/$$/cgroup), then sleeps "forever". ($$$$:
# the config's "$$" is a literal "$".)
PROBE = (
    "sleep 1000006 & bg=$!; {escape}"
    "cat /proc/$$$$/cgroup > {dir}/probe.cgroup; "
    "echo $$$$ $bg $sid > {dir}/probe.tmp; mv {dir}/probe.tmp {dir}/probe.pids; "
    "exec sleep 1000007"
)


def hung_probe(tmp_path: Path, mode: str) -> list[str]:
    # Without cgroups a probe that leaves its session is out of reach (as a program's
    # would be): the fallback's scenario has none.
    escape = "setsid sleep 1000008 & sid=$!; " if mode == "cgroups" else ""
    return ["/bin/sh", "-c", PROBE.format(escape=escape, dir=tmp_path)]


def probe_pids(tmp_path: Path, strays: list[int]) -> list[int]:
    pids = tmp_path / "probe.pids"
    found = [int(pid) for pid in wait_until(lambda: pids.exists() and pids.read_text().split())]
    strays.extend(found)
    return found


def health_table(probe: list[str], on_unhealthy: str, interval: float = 0.05) -> str:
    # timeout: an hour, so anything waiting on the probe would hang the test.
    return f"""
        [programs.web.health]
        exec = {toml_list(probe)}
        interval = {interval}
        timeout = 3600
        failures = 1
        start_grace = 0
        on_unhealthy = "{on_unhealthy}"
    """


def cgroup_line(text: str) -> str:
    return next(line for line in text.splitlines() if line.startswith("0::"))


def test_an_exec_probe_runs_in_the_programs_cgroup_and_a_stop_takes_a_hung_one_along(
    supd: Factory, tmp_path: Path, mode: str, spawn_env: dict[str, str], strays: list[int]
) -> None:
    d = supd(
        f"""
        {supervisor_table(mode)}
        [programs.web]
        command = "/bin/sleep 1000"
        startsecs = 0
        {health_table(hung_probe(tmp_path, mode), "ignore")}
        """,
        env=spawn_env,
    )
    main = int(d.wait_state("web", "RUNNING")["pid"])
    found = probe_pids(tmp_path, strays)
    probe = found[0]
    seen_from_probe = cgroup_line((tmp_path / "probe.cgroup").read_text())
    if mode == "cgroups":
        cgroup = cgroup_of(d, "web")
        assert seen_from_probe.endswith("/programs/web"), seen_from_probe
        assert {main, *found} <= set(cgroup.pids()), (found, cgroup.pids())
    else:  # unchanged: where supd itself is
        assert seen_from_probe == cgroup_line(Path(f"/proc/{d.pid}/cgroup").read_text())
    assert pid_alive(probe) and d.status()["web"]["healthy"] is None  # still in flight

    [stopped] = d.rpc("stop", {"names": ["web"]})  # never waits for the hour
    assert stopped["ok"] and stopped["state"] == "STOPPED", stopped
    if mode == "cgroups":  # answered once the cgroup (probe included) was empty
        assert cgroup_of(d, "web").pids() == []
    wait_until(
        lambda: not any(pid_alive(pid) for pid in found),
        describe=lambda: f"{[pid for pid in found if pid_alive(pid)]} still alive",
    )
    [death] = d.rpc("deaths", {"name": "web"})["deaths"]
    assert death["cause"] == "stopped", death
    assert not [e for e in d.events("health_changed") if not e["healthy"]]
    for killed in d.events("cgroup_killed"):  # the probe's are never the program's
        assert probe not in killed["pids"] and found[1] not in killed["pids"], killed


def test_a_program_that_exits_while_its_exec_probe_runs_is_not_blamed_on_the_probe(
    supd: Factory, tmp_path: Path, mode: str, spawn_env: dict[str, str], strays: list[int]
) -> None:
    """The probe in flight is ended with the program: with cgroups the exit is held back
    until the cgroup is empty, and a verdict on the dead program meanwhile would be a
    false failure, blamed for the death (on_unhealthy = restart)."""
    wait_for_probe = f"while [ ! -e {tmp_path}/probe.pids ]; do sleep 0.01; done"
    d = supd(
        f"""
        {supervisor_table(mode)}
        [programs.web]
        command = {toml_list(["/bin/sh", "-c", f"{wait_for_probe}; exit 3"])}
        startsecs = 0
        autorestart = "never"
        {health_table(hung_probe(tmp_path, mode), "restart")}
        """,
        env=spawn_env,
    )
    found = probe_pids(tmp_path, strays)
    exited = d.wait_state("web", "EXITED")
    assert exited["exit_code"] == 3, exited
    if mode == "cgroups":
        assert cgroup_of(d, "web").pids() == []
    wait_until(
        lambda: not any(pid_alive(pid) for pid in found),
        describe=lambda: f"{[pid for pid in found if pid_alive(pid)]} still alive",
    )
    [death] = d.rpc("deaths", {"name": "web"})["deaths"]
    assert death["cause"] == "exited" and death["exit_code"] == 3, death
    assert not [e for e in d.events("health_changed") if not e["healthy"]], d.describe()
    for killed in d.events("cgroup_killed"):
        assert found[0] not in killed["pids"] and found[1] not in killed["pids"], killed
        assert set(killed.get("probe_pids", [])) <= set(found), killed


@contextlib.contextmanager
def frozen(pid: int) -> Iterator[None]:
    """`pid` frozen by the v1 freezer (D state: it survives SIGKILL) until the end."""
    freezer = FREEZER_V1 / f"supd-test-{os.getpid()}-{pid}"
    freezer.mkdir()
    try:
        (freezer / "cgroup.procs").write_text(str(pid))
        (freezer / "freezer.state").write_text("FROZEN")
        wait_until(lambda: (freezer / "freezer.state").read_text().strip() == "FROZEN")
        yield
    finally:
        with contextlib.suppress(OSError):
            (freezer / "freezer.state").write_text("THAWED")
        kill_quietly(pid)
        wait_until(lambda: not (freezer / "cgroup.procs").read_text().split())
        freezer.rmdir()


def reaped(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


@needs_cgroups
@pytest.mark.skipif(
    not (FREEZER_V1 / "cgroup.procs").exists() or not os.access(FREEZER_V1, os.W_OK),
    reason="needs the cgroup v1 freezer (writable) to hold a process in D state",
)
@pytest.mark.parametrize("probe_kind", ["hung", "quick"])
def test_no_probe_verdict_while_an_exit_waits_for_the_cgroup_to_empty(
    supd: Factory, tmp_path: Path, spawn_env: dict[str, str], strays: list[int], probe_kind: str
) -> None:
    """The main process exited, and a frozen leftover keeps its cgroup populated: the
    fleet hears of the exit only once it is empty. Meanwhile the probe in flight (hung)
    ends without a verdict, and due probes (quick) do not run: a verdict on the dead
    program would be a failure, blamed for the death (on_unhealthy = restart)."""
    leftover_file, go, armed = tmp_path / "leftover", tmp_path / "go", tmp_path / "armed"
    # The quick probe, once armed, tells the program to exit (writing its pid to `go`);
    # the program exits once that probe is reaped, well before the next one is due (so
    # none is in flight then), which falls due while the exit waits. For the hung one,
    # the test says go.
    quick = ["/bin/sh", "-c", f"[ ! -e {armed} ] || [ -e {go} ] || echo $$$$ > {go}"]
    probe = hung_probe(tmp_path, "cgroups") if probe_kind == "hung" else quick
    interval = 0.05 if probe_kind == "hung" else 0.5
    script = (
        f"sleep 1000009 & echo $! > {leftover_file}; "
        f"while [ ! -s {go} ]; do sleep 0.01; done; "
        f"p=$(cat {go}); while [ -e /proc/$p ]; do sleep 0.01; done; exit 3"
    )
    d = supd(
        f"""
        {supervisor_table("cgroups")}
        [programs.web]
        command = {toml_list(["/bin/sh", "-c", script])}
        startsecs = 0
        autorestart = "never"
        {health_table(probe, "restart", interval)}
        """,
        env=spawn_env,
    )
    leftover = int(wait_until(lambda: leftover_file.exists() and leftover_file.read_text()))
    strays.append(leftover)
    if probe_kind == "hung":
        found = probe_pids(tmp_path, strays)
    else:
        wait_until(lambda: d.status()["web"]["healthy"] is True, describe=d.describe)
    with frozen(leftover):
        if probe_kind == "hung":
            go.write_text("0")
        else:
            armed.touch()
        if probe_kind == "hung":  # killed with the main process's end, and reaped
            wait_until(lambda: all(reaped(pid) for pid in found), describe=d.describe)
        else:  # the probe timer fired meanwhile, and nothing ran
            wait_until(lambda: d.events("probe_skipped"), describe=d.describe)
        entry = d.status()["web"]
        assert entry["state"] == "RUNNING" and entry["healthy"] is not False, entry
        assert cgroup_of(d, "web").pids() == [leftover]  # (no probe born there)
        [killed] = d.events("cgroup_killed")  # the probe's pids are never the program's
        assert leftover in killed["pids"], killed
        if probe_kind == "hung":  # (its setsid'd one left its group: it cannot be told)
            assert not set(found[:2]) & set(killed["pids"]), killed
            assert set(killed.get("probe_pids", [])) <= set(found), killed
    exited = d.wait_state("web", "EXITED")
    assert exited["exit_code"] == 3, exited
    [death] = d.rpc("deaths", {"name": "web"})["deaths"]
    assert death["cause"] == "exited", death
    assert not [e for e in d.events("health_changed") if not e["healthy"]], d.describe()


@pytest.mark.skipif(
    not MEMORY_ON_V2,
    reason="the memory controller is not available on cgroup v2 here (it is on cgroup v1)",
)
def test_an_exec_probe_counts_against_memory_max_and_its_oom_kill_is_not_the_programs(
    supd: Factory, tmp_path: Path, spawn_env: dict[str, str], strays: list[int]
) -> None:
    # Only the first run hogs (later ones fail at once): no OOM kill after the first.
    once = tmp_path / "hogged"
    hog = [PY, "-c", f"open({str(once)!r}, 'x'); x = b'x' * (256 << 20)"]
    d = supd(
        f"""
        {supervisor_table("cgroups")}
        [programs.web]
        command = "/bin/sleep 1000"
        startsecs = 0
        autorestart = "never"
        memory_max = "32MB"
        {health_table(hog, "ignore", 0.2)}
        """,
        env=spawn_env,
    )
    main = int(d.wait_state("web", "RUNNING")["pid"])
    strays.append(main)
    wait_until(lambda: d.status()["web"]["healthy"] is False, describe=d.describe)
    [failed] = [e for e in d.events("health_changed") if not e["healthy"]]
    assert "killed by SIGKILL (out of memory" in failed["message"], failed
    assert d.status()["web"]["oom_kills"] >= 1
    os.kill(main, signal.SIGKILL)  # a signal supd did not send: not the probe's OOM kill
    d.wait_state("web", "EXITED")
    death = d.rpc("deaths", {"name": "web"})["deaths"][0]
    assert death["cause"] == "killed", death
