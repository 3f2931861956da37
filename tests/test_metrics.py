"""Metrics: the OpenMetrics text (checked with prometheus_client's own parser), counters
that only go up across restarts and reloads, /proc tree sampling, and GET /metrics with
its limits. Real daemons, real processes, real sockets."""

from __future__ import annotations

import http.client
import itertools
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from supd import __version__ as supd_version
from supd.config import ConfigError, load
from supd.facts import State
from supd.fleet import Transitioned
from supd.httpmetrics import MetricsServer
from supd.metrics import NO_COUNTS, Metrics, ProcSampler
from supd.selector import Selector
from tests.helpers import SLEEP, Supd, cmd, kill_quietly, python_command, wait_until

Factory = Callable[..., Supd]

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

ISSUE_METRICS = {
    "supd_process_state",
    "supd_process_up",
    "supd_process_start_time_seconds",
    "supd_process_restarts_total",
    "supd_process_last_exit_code",
    "supd_process_backoff_seconds",
    "supd_process_cpu_seconds_total",
    "supd_process_resident_memory_bytes",
    "supd_process_log_bytes_total",
    "supd_process_log_dropped_bytes_total",
    "supd_up",
    "supd_info",
    "supd_reloads_total",
    "supd_cpu_seconds_total",
    "supd_resident_memory_bytes",
    "supd_control_requests_total",
    "supd_exits_handled_total",
    "supd_exit_handling_seconds_total",
    "supd_exit_peeks_total",
    "supd_exit_peek_seconds_total",
}


def parse(text: str) -> Samples:
    """Every sample, by (name, sorted labels); the official parser raises on bad text."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def scrape(d: Supd) -> Samples:
    result = d.rpc("metrics")
    assert result["content_type"].startswith("application/openmetrics-text")
    return parse(result["text"])


def counters(samples: Samples) -> Samples:
    return {key: v for key, v in samples.items() if key[0].endswith("_total")}


# A program that burns a little CPU, writes a line, and runs until stopped.
BUSY = cmd("""
    import sys, time
    end = time.process_time() + 0.05
    while time.process_time() < end:
        pass
    print("hello", flush=True)
    print("oops", file=sys.stderr, flush=True)
    time.sleep(1000)
""")


def config(environment: str = "one") -> str:
    return f"""
        [supervisor]
        metrics = "127.0.0.1:0"
        [programs.busy]
        command = {BUSY}
        startsecs = 0
        backoff_initial = 0
        environment = {{ VERSION = "{environment}" }}
        [programs.idle]
        command = {SLEEP}
        autostart = false
    """


def metrics_port(d: Supd) -> int:
    wait_until(lambda: d.events("metrics_listening"), describe=d.describe)
    address = d.events("metrics_listening")[0]["address"]
    return int(address.rsplit(":", 1)[1])


# --------------------------------------------------------------------------- the text


def test_the_text_parses_and_has_every_metric_of_the_issue(supd: Factory) -> None:
    d = supd(config())
    d.wait_state("busy", "RUNNING")
    wait_until(lambda: value(scrape(d), "supd_process_log_bytes_total", **LABELS, stream="stdout"))
    samples = scrape(d)
    # (supd_process_last_exit_code appears once a process has exited: see below.)
    assert ISSUE_METRICS - {"supd_process_last_exit_code"} <= {name for name, _ in samples}
    assert value(samples, "supd_process_state", **LABELS, state="RUNNING") == 1
    assert value(samples, "supd_process_state", **LABELS, state="STOPPED") == 0
    assert value(samples, "supd_process_up", **LABELS) == 1
    assert value(samples, "supd_process_up", process="idle", program="idle") == 0
    assert value(samples, "supd_process_log_bytes_total", **LABELS, stream="stdout") == 6
    assert value(samples, "supd_process_log_bytes_total", **LABELS, stream="stderr") == 5
    assert value(samples, "supd_process_resident_memory_bytes", **LABELS) > 1 << 20
    assert value(samples, "supd_up") == 1
    assert value(samples, "supd_info", version=supd_version) == 1
    assert value(samples, "supd_control_requests_total", method="metrics") >= 1
    assert value(samples, "supd_resident_memory_bytes") > 1 << 20


LABELS = {"process": "busy", "program": "busy"}


def test_counters_only_go_up_across_restarts_and_reloads(supd: Factory) -> None:
    d = supd(config("one"))
    greeted = wait_for_hellos(d, 1)  # each run says hello once it has burnt its CPU
    before = scrape(d)

    os.kill(greeted, signal.SIGKILL)  # an automatic restart after an exit
    greeted = wait_for_hellos(d, 2)
    after_crash = scrape(d)
    assert value(after_crash, "supd_process_restarts_total", **LABELS, reason="exited") == 1
    assert value(after_crash, "supd_process_last_exit_code", **LABELS) == 128 + signal.SIGKILL
    # The loop time of that exit, reaped and its restart armed, is counted.
    assert (
        value(after_crash, "supd_exits_handled_total")
        == value(before, "supd_exits_handled_total") + 1
    )
    assert value(after_crash, "supd_exit_handling_seconds_total") > value(
        before, "supd_exit_handling_seconds_total"
    )

    d.rpc("restart", {"names": ["busy"]})  # a requested restart
    wait_for_hellos(d, 3)
    after_restart = scrape(d)
    assert value(after_restart, "supd_process_restarts_total", **LABELS, reason="requested") == 1

    d.write_config(config("two"))  # a changed program: a new process and new log sinks
    d.rpc("reload")
    wait_for_hellos(d, 4)
    after_reload = scrape(d)
    assert value(after_reload, "supd_reloads_total") == 1
    # Four runs of "hello\n": every byte counted once, none lost with the old slots.
    assert value(after_reload, "supd_process_log_bytes_total", **LABELS, stream="stdout") == 24

    scrapes = [before, after_crash, after_restart, after_reload]
    for earlier, later in itertools.pairwise(scrapes):
        for key, count in counters(earlier).items():
            assert counters(later)[key] >= count, key
    # Each run burnt 0.05 s of CPU: the earlier runs still count.
    assert value(after_reload, "supd_process_cpu_seconds_total", **LABELS) >= 0.15


def wait_for_hellos(d: Supd, runs: int) -> int:
    """Wait until `runs` runs of busy have said hello; the pid of the latest."""

    def greeted() -> bool:
        samples = scrape(d)
        return value(samples, "supd_process_log_bytes_total", **LABELS, stream="stdout") >= (
            6 * runs
        )

    wait_until(greeted, describe=d.describe)
    return int(d.wait_state("busy", "RUNNING")["pid"])


def test_restart_reasons_from_transitions() -> None:
    metrics = Metrics()

    def change(old: State, new: State) -> None:
        metrics.transitioned(Transitioned("web", old, new, "", None, 0, None))

    change(State.STOPPED, State.STARTING)  # the first start is no restart
    change(State.STARTING, State.BACKOFF)  # a failed start...
    change(State.BACKOFF, State.STARTING)  # ...retried
    change(State.STARTING, State.RUNNING)
    change(State.RUNNING, State.BACKOFF)  # an exit...
    change(State.BACKOFF, State.STARTING)  # ...restarted
    change(State.RUNNING, State.STOPPING)
    change(State.STOPPING, State.STOPPED)
    change(State.STOPPED, State.STARTING)  # started again by the operator
    assert metrics.counters("web").restarts == {"failed_start": 1, "exited": 1, "requested": 1}
    # A process that never restarted shares the one empty Counter, which stays empty.
    change_other = Transitioned("db", State.STOPPED, State.STARTING, "", None, 0, None)
    metrics.transitioned(change_other)
    assert metrics.counters("db").restarts is NO_COUNTS and not NO_COUNTS


# --------------------------------------------------------------------------- /proc


@pytest.fixture
def tree() -> Iterator[subprocess.Popen[bytes]]:
    """sh with two sleeping children: a tree of three."""
    proc = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60 & wait"])
    yield proc
    for child in _children(proc.pid):
        kill_quietly(child)
    proc.kill()
    proc.wait()


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as file:
        return [int(p) for p in file.read().split()]


def test_a_tree_is_the_process_and_its_descendants(tree: subprocess.Popen[bytes]) -> None:
    wait_until(lambda: len(_children(tree.pid)) == 2)
    sample = ProcSampler().sample([tree.pid])[tree.pid]
    assert sample.processes == 3
    assert sample.rss_bytes > 3 * 100_000


def test_a_tree_is_sampled_at_most_once_per_interval(tree: subprocess.Popen[bytes]) -> None:
    now = [100.0]
    sampler = ProcSampler(interval=2.0, clock=lambda: now[0])
    first = sampler.sample([tree.pid])[tree.pid]
    now[0] += 1.0
    assert sampler.sample([tree.pid])[tree.pid] is first  # cached
    now[0] += 1.5
    second = sampler.sample([tree.pid])[tree.pid]
    assert second is not first and second.at == 102.5
    assert sampler.previous(tree.pid) is first  # for CPU%


def test_a_gone_root_is_left_out() -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert ProcSampler().sample([proc.pid]) == {}


# --------------------------------------------------------------------------- supctl


def supctl(d: Supd, *args: str) -> subprocess.CompletedProcess[str]:
    from tests.test_e2e_control import supctl as run

    return run(d, *args)


def test_supctl_metrics_status_long_usage_and_avail(supd: Factory) -> None:
    d = supd(config())
    d.wait_state("busy", "RUNNING")
    text = supctl(d, "metrics").stdout
    assert text.endswith("# EOF\n")
    parse(text)
    lines = supctl(d, "status", "-l").stdout.splitlines()
    assert lines[0].split() == ["NAME", "STATE", "CPU%", "RSS", "INFO"]
    busy = next(line for line in lines if line.startswith("busy"))
    assert busy.split()[1] == "RUNNING" and busy.split()[3].endswith("M")
    idle = next(line for line in lines if line.startswith("idle"))
    assert idle.split()[1:4] == ["STOPPED", "-", "-"]
    usage = {row["name"]: row for row in d.rpc("usage")}
    assert usage["busy"]["processes"] == 1 and usage["busy"]["rss_bytes"] > 1 << 20
    assert usage["idle"]["pid"] is None
    avail = supctl(d, "avail").stdout.splitlines()
    assert [line.split()[:5] for line in avail] == [
        ["busy", "in", "use", "active", "auto"],
        ["idle", "in", "use", "inactive", "manual"],
    ]


def test_update_applies_and_reread_changes_nothing(supd: Factory) -> None:
    d = supd(config())
    pid = d.wait_state("busy", "RUNNING")["pid"]
    d.write_config(config("two"))
    reread = supctl(d, "reread")
    assert d.status()["busy"]["pid"] == pid  # nothing applied
    from supd.protocol_models import ReloadParams

    if "dry_run" in ReloadParams.model_fields:
        assert reread.returncode == 0, reread.stderr
        assert "busy" in reread.stdout
    else:
        assert reread.returncode == 2
        assert "cannot show what a reload would change without applying it" in reread.stderr
    assert value(scrape(d), "supd_reloads_total") == 0
    update = supctl(d, "update")
    assert update.returncode == 0, update.stderr
    assert "busy" in update.stdout
    assert value(scrape(d), "supd_reloads_total") == 1


def test_fg_follows_both_streams_and_says_input_is_not_forwarded(supd: Factory) -> None:
    d = supd(config())
    d.wait_state("busy", "RUNNING")
    from tests.helpers import PY, REPO

    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [PY, "-m", "supd.ctl", "-s", str(d.socket), "fg", "busy"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    try:
        seen = b""
        assert proc.stdout is not None
        while b"hello" not in seen or b"oops" not in seen:
            chunk = os.read(proc.stdout.fileno(), 4096)
            assert chunk, "fg ended"
            seen += chunk
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=10)
    assert b"Input is not forwarded: supd gives its programs /dev/null as stdin" in err


# --------------------------------------------------------------------------- completion


def test_completion_scripts_are_valid_shell(tmp_path: Path) -> None:
    from supd import completion, ctl

    bash = tmp_path / "supctl.bash"
    bash.write_text(completion.script("bash", ctl.COMMANDS))
    assert subprocess.run(["bash", "-n", str(bash)], capture_output=True).returncode == 0
    zsh_path = next((p for p in ("/usr/bin/zsh", "/bin/zsh") if os.path.exists(p)), None)
    if zsh_path is not None:
        zsh = tmp_path / "_supctl"
        zsh.write_text(completion.script("zsh", ctl.COMMANDS))
        ran = subprocess.run([zsh_path, "-n", str(zsh)], capture_output=True, text=True)
        assert ran.returncode == 0, ran.stderr


def complete(script: Path, line: str, tmp_path: Path) -> list[str]:
    """Drive the bash completion function as bash would, for `line` (cursor at its end)."""
    from tests.helpers import PY, REPO

    shim = tmp_path / "bin" / "supctl"
    shim.parent.mkdir(exist_ok=True)
    shim.write_text(f'#!/bin/sh\nPYTHONPATH={REPO} exec {PY} -m supd.ctl "$@"\n')
    shim.chmod(0o755)
    driver = f"""
        source {script}
        COMP_LINE={_quote(line)}
        COMP_POINT=${{#COMP_LINE}}
        read -r -a COMP_WORDS <<< "$COMP_LINE"
        COMP_CWORD=${{#COMP_WORDS[@]}}
        _supctl
        printf '%s\\n' "${{COMPREPLY[@]}}"
    """
    env = dict(os.environ, PATH=f"{shim.parent}:{os.environ['PATH']}")
    ran = subprocess.run(["bash", "-c", driver], capture_output=True, text=True, env=env)
    assert ran.returncode == 0, ran.stderr
    return [word for word in ran.stdout.splitlines() if word]


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def test_bash_completes_commands_and_process_names(supd: Factory, tmp_path: Path) -> None:
    d = supd(f"""
        [programs.web]
        command = {SLEEP}
        numprocs = 2
        autostart = false
        [programs.worker]
        command = {SLEEP}
        autostart = false
    """)
    from supd import completion, ctl

    script = tmp_path / "supctl.bash"
    script.write_text(completion.script("bash", ctl.COMMANDS))
    sock = str(d.socket)
    assert sorted(complete(script, "supctl re", tmp_path)) == [
        "reexec",
        "reload",
        "reread",
        "restart",
    ]
    assert sorted(complete(script, f"supctl -s {sock} stop w", tmp_path)) == [
        "web",
        "web:*",
        "web:0",
        "web:1",
        "worker",
    ]
    # bash splits words at ":": the reply holds what follows the last colon.
    assert sorted(complete(script, f"supctl -s {sock} start web:", tmp_path)) == ["*", "0", "1"]
    assert complete(script, f"supctl -s {sock} tail worker s", tmp_path) == ["stdout", "stderr"]
    for command in ("why", "clear", "wait", "logs"):
        assert "worker" in complete(script, f"supctl -s {sock} {command} wo", tmp_path), command
    assert complete(script, "supctl signal H", tmp_path) == ["HUP"]
    assert complete(script, "supctl status --l", tmp_path) == ["--long"]


# --------------------------------------------------------------------------- HTTP


def http_get(port: int, path: str = "/metrics", method: str = "GET") -> http.client.HTTPResponse:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request(method, path)
    return connection.getresponse()


def test_get_metrics_over_http_and_nothing_else(supd: Factory) -> None:
    d = supd(config())
    d.wait_state("busy", "RUNNING")
    port = metrics_port(d)
    answer = http_get(port)
    assert answer.status == 200
    assert answer.getheader("Content-Type", "").startswith("application/openmetrics-text")
    samples = parse(answer.read().decode())
    assert value(samples, "supd_process_up", **LABELS) == 1
    head = http_get(port, method="HEAD")
    assert head.status == 200 and head.read() == b""
    for method in ("POST", "PUT", "DELETE"):
        refused = http_get(port, method=method)
        assert refused.status == 405 and refused.getheader("Allow") == "GET, HEAD"
    for path in ("/", "/metrics/x", "/debug"):
        assert http_get(port, path).status == 404
    assert http_get(port, "/metrics?name[]=x").status == 200  # a query is ignored
    events = d.events("metrics_listening")
    assert events[0]["address"].startswith("127.0.0.1:")
    assert not d.events("metrics_not_loopback")


def test_metrics_on_a_unix_socket(supd: Factory, tmp_path: Path) -> None:
    d = supd(f"""
        [supervisor]
        metrics = "./metrics.sock"
        [programs.idle]
        command = {SLEEP}
        autostart = false
    """)
    path = tmp_path / "metrics.sock"
    wait_until(path.exists, describe=d.describe)
    assert path.stat().st_mode & 0o777 == 0o600
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        answer = _read_all(sock)
    head, body = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 OK")
    parse(body.decode())


def test_a_non_loopback_address_is_served_and_logged(supd: Factory) -> None:
    d = supd(f"""
        [supervisor]
        metrics = "0.0.0.0:0"
        [programs.idle]
        command = {SLEEP}
        autostart = false
    """)
    wait_until(lambda: d.events("metrics_not_loopback"), describe=d.describe)
    assert http_get(metrics_port(d)).status == 200


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("9129", 'should be "HOST:PORT"'),
        ("127.0.0.1:99999", 'should be "HOST:PORT"'),
        ("example.com:9129", "the host should be an IP address or localhost"),
    ],
)
def test_a_bad_metrics_address_is_a_config_error(
    tmp_path: Path, address: str, problem: str
) -> None:
    path = tmp_path / "supd.toml"
    path.write_text(f'[supervisor]\nmetrics = "{address}"\n')
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert problem in str(caught.value.problems[0])
    assert "supd.toml:2" in str(caught.value.problems[0])


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


class Loop:
    """A MetricsServer on its own selector, run by a thread until stopped."""

    def __init__(self, **limits: Any) -> None:
        self.selector: Selector[Any] = Selector()
        self.server = MetricsServer(self.selector, "127.0.0.1:0", lambda: b"# EOF\n", **limits)
        self.server.open()
        self.port = int(self.server.bound.rsplit(":", 1)[1])
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping:
            for key in self.selector.select(20):
                self.server.on_ready(key)

    def close(self) -> None:
        self.stopping = True
        self.thread.join(10)
        self.server.close()
        self.selector.close()

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        return sock


@pytest.fixture
def loop() -> Iterator[Callable[..., Loop]]:
    made: list[Loop] = []

    def make(**limits: Any) -> Loop:
        made.append(Loop(**limits))
        return made[-1]

    yield make
    for each in made:
        each.close()


def test_an_oversized_request_gets_431_and_is_closed(loop: Callable[..., Loop]) -> None:
    server = loop(max_request=1024)
    with server.connect() as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nX-Padding: " + b"x" * 4096)
        answer = _read_all(sock)
    assert answer.startswith(b"HTTP/1.1 431 ")
    wait_until(lambda: server.server.connection_count == 0)


def test_a_slow_request_is_closed_at_the_timeout(loop: Callable[..., Loop]) -> None:
    server = loop(timeout=0.3)
    with server.connect() as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\n")  # ...and never the end of the headers
        assert _read_all(sock) == b""  # closed by the server, without an answer
    wait_until(lambda: server.server.connection_count == 0)
    with server.connect() as sock:  # the server is fine
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _read_all(sock).startswith(b"HTTP/1.1 200 OK")


def test_connections_beyond_the_cap_get_503(loop: Callable[..., Loop]) -> None:
    server = loop(max_connections=2)
    idle = [server.connect(), server.connect()]
    try:
        wait_until(lambda: server.server.connection_count == 2)
        with server.connect() as sock:
            assert _read_all(sock).startswith(b"HTTP/1.1 503 ")
    finally:
        for sock in idle:
            sock.close()
    wait_until(lambda: server.server.connection_count == 0)
    with server.connect() as sock:
        sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        assert _read_all(sock).startswith(b"HTTP/1.1 200 OK")


@pytest.mark.parametrize(
    ("request_line", "status"),
    [
        (b"GARBAGE\r\n\r\n", b"400"),
        (b"GET /metrics HTTP/2.0\r\n\r\n", b"505"),
        (b"OPTIONS * HTTP/1.1\r\n\r\n", b"405"),
    ],
)
def test_bad_requests_are_refused(
    loop: Callable[..., Loop], request_line: bytes, status: bytes
) -> None:
    server = loop()
    with server.connect() as sock:
        sock.sendall(request_line)
        assert _read_all(sock).startswith(b"HTTP/1.1 " + status)


def test_bytes_that_cannot_be_written_are_counted_as_dropped(supd: Factory) -> None:
    d = supd(f"""
        [programs.busy]
        command = {BUSY}
        startsecs = 0
        stdout_logfile = "/dev/full"
    """)
    d.wait_state("busy", "RUNNING")

    def dropped() -> float:
        samples = scrape(d)
        return value(samples, "supd_process_log_dropped_bytes_total", **LABELS, stream="stdout")

    wait_until(lambda: dropped() == 6, describe=d.describe)
    samples = scrape(d)
    assert value(samples, "supd_process_log_bytes_total", **LABELS, stream="stdout") == 6
    assert value(samples, "supd_process_log_dropped_bytes_total", **LABELS, stream="stderr") == 0


def test_without_children_files_one_pass_over_proc_finds_the_tree(
    tree: subprocess.Popen[bytes],
) -> None:
    wait_until(lambda: len(_children(tree.pid)) == 2)
    sampler = ProcSampler()
    sampler._children_files = False  # as on a kernel without CONFIG_PROC_CHILDREN
    assert sampler.sample([tree.pid])[tree.pid].processes == 3


def test_a_reload_that_moves_the_metrics_address_says_it_needs_a_restart(
    supd: Factory,
) -> None:
    d = supd(config())
    port = metrics_port(d)
    d.write_config(config().replace('"127.0.0.1:0"', '"127.0.0.1:1"'))
    d.rpc("reload")
    [warning] = d.events("metrics_address_unchanged")
    assert warning["running"] == "127.0.0.1:0" and warning["configured"] == "127.0.0.1:1"
    assert http_get(port).status == 200  # still served where it was


def test_a_children_list_longer_than_one_read_is_read_whole() -> None:
    # A root with children until their pids fill more than one 4 KiB read.
    root = subprocess.Popen(
        python_command("""
            import os, subprocess, time
            me = os.getpid()
            kids = []
            while len(open(f"/proc/{me}/task/{me}/children").read()) <= 4200:
                kids.append(subprocess.Popen(["sleep", "60"]))
            print(len(kids), flush=True)
            time.sleep(60)
        """),
        stdout=subprocess.PIPE,
    )
    try:
        assert root.stdout is not None
        count = int(root.stdout.readline())
        assert len(_children(root.pid)) == count
        assert ProcSampler().sample([root.pid])[root.pid].processes == count + 1
    finally:
        for child in _children(root.pid):
            kill_quietly(child)
        root.kill()
        root.wait()


def test_the_fd_budget_counts_the_metrics_server(tmp_path: Path) -> None:
    from supd.config import FD_RESERVE, METRICS_FD_RESERVE
    from tests.test_daemon import run_supd

    # 28 processes with one pipe each: 28 + 37 fit under 120, 28 + 104 do not.
    config = tmp_path / "supd.toml"
    program = '[programs.few]\ncommand = "true"\nnumprocs = 28\nredirect_stderr = true\n'
    limited = ("prlimit", "--nofile=120:120", "--")
    config.write_text(program)
    assert run_supd("-c", str(config), "--check", cwd=tmp_path, prefix=limited).returncode == 0
    config.write_text('[supervisor]\nmetrics = "127.0.0.1:0"\n' + program)
    refused = run_supd("-c", str(config), "--check", cwd=tmp_path, prefix=limited)
    assert refused.returncode == 2
    own = FD_RESERVE + METRICS_FD_RESERVE
    assert f"supd's own {own}, more than the hard limit of 120" in refused.stderr


def test_sampling_some_trees_keeps_the_others_samples(tree: subprocess.Popen[bytes]) -> None:
    other = subprocess.Popen(["sleep", "60"])
    try:
        now = [0.0]
        sampler = ProcSampler(interval=1.0, clock=lambda: now[0])
        sampler.sample([tree.pid, other.pid], prune=True)
        now[0] = 5.0
        sampler.sample([other.pid])  # `status -l other`
        assert tree.pid in sampler.sample([tree.pid])  # still known, and sampled afresh
        assert sampler.previous(tree.pid) is not None  # CPU% has its earlier sample
        now[0] = 10.0
        sampler.sample([other.pid], prune=True)  # a scrape: tree's root is gone
        assert sampler.previous(tree.pid) is None
    finally:
        other.kill()
        other.wait()
