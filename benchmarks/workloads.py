"""The workloads. Each runs one subject (supd, supervisord, or a reference such as the
bare-Python floor or `cat`) once and adds its figures to `Results`; __main__ runs the
subjects of a workload alternately, round after round, so that a slow spell of the
machine hits them alike.

Timing comes from the helper's own CLOCK_MONOTONIC stamps wherever a start or an exit is
involved (see helper.c), so the benchmark's polling never adds to a latency.
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import floor, procs
from benchmarks.daemons import Daemon, Program, Supd, Supervisord
from benchmarks.helper import LINE_BYTES
from supd.config import FD_RESERVE, METRICS_FD_RESERVE
from supd.metrics import SAMPLE_INTERVAL_S

MIB = 1 << 20
GIB = 1 << 30

SUPD = "supd"
SUPD_SESSIONS = "supd-sessions"  # supd with cgroups = "off" (the session fallback)
SUPERVISORD = "supervisord"
FLOOR = "floor"
CAT = "cat"
PYLOOP = "python loop"
DAEMONS = (SUPD, SUPERVISORD)


@dataclass(frozen=True)
class Sizes:
    respawn_restarts: int  # per round
    respawn_rounds: int
    respawn_lifetime_ms: int
    idle_programs: int
    idle_window_s: float
    fleet_programs: int  # memory, control, start-up
    fleet_rounds: int
    status_calls: int
    ctl_runs: int
    log_bytes: int
    log_rounds: int
    storm_programs: int
    storm_lifetime_ms: int
    storm_window_s: float
    storm_rounds: int
    selector_calls: int
    health_programs: int
    health_window_s: float
    churn_window_s: float


FULL = Sizes(
    respawn_restarts=100,
    respawn_rounds=2,
    respawn_lifetime_ms=50,
    idle_programs=100,
    idle_window_s=10.0,
    fleet_programs=1000,
    fleet_rounds=3,
    status_calls=20,
    ctl_runs=5,
    log_bytes=GIB,
    log_rounds=2,
    storm_programs=200,
    storm_lifetime_ms=100,
    storm_window_s=10.0,
    storm_rounds=2,
    selector_calls=20_000,
    health_programs=1000,
    health_window_s=10.0,
    churn_window_s=180.0,
)

QUICK = Sizes(
    respawn_restarts=20,
    respawn_rounds=1,
    respawn_lifetime_ms=50,
    idle_programs=20,
    idle_window_s=2.0,
    fleet_programs=100,
    fleet_rounds=1,
    status_calls=5,
    ctl_runs=2,
    log_bytes=64 * MIB,
    log_rounds=1,
    storm_programs=50,
    storm_lifetime_ms=100,
    storm_window_s=2.0,
    storm_rounds=1,
    selector_calls=5_000,
    health_programs=200,
    health_window_s=3.0,
    churn_window_s=20.0,
)

# Things seen settle: supd's exec reports and supervisord's first loop turns.
SETTLE_S = 1.0
# The most one subject may spend on one round of the respawn workload.
RESPAWN_BUDGET_S = 40.0
# The most one subject may spend on each kind of control call in one round (at least
# MIN_CALLS are made whatever it takes).
CONTROL_BUDGET_S = 5.0
MIN_CALLS = 3
# A storm's first second is its ramp-up, not its steady state.
STORM_WARMUP_S = 1.0
# Scrapes after the /proc samples went stale (metrics.SAMPLE_INTERVAL_S apart).
COLD_SCRAPES = 3


class Results:
    """Samples per (metric, subject). Latencies are pooled across rounds; other metrics
    get one sample per round."""

    def __init__(self) -> None:
        self.samples: dict[tuple[str, str], list[float]] = defaultdict(list)
        self.notes: list[str] = []

    def add(self, metric: str, subject: str, values: Iterable[float]) -> None:
        self.samples[metric, subject].extend(values)

    def get(self, metric: str, subject: str) -> list[float]:
        return self.samples.get((metric, subject), [])


@dataclass
class Session:
    """What every workload needs: the helper, the venv, a scratch folder, the sizes."""

    processes: procs.Processes
    helper: list[str]  # argv prefix that runs the helper
    bench_venv: Path
    scratch: Path
    sizes: Sizes
    results: Results = field(default_factory=Results)
    _runs: int = 0
    supd_configs: list[Path] = field(default_factory=list)  # their cgroup trees, to remove

    def workdir(self, name: str) -> Path:
        self._runs += 1
        path = self.scratch / f"{self._runs:03d}-{name}"
        path.mkdir()
        return path

    def daemon(self, kind: str, workdir: Path) -> Daemon:
        if kind in (SUPD, SUPD_SESSIONS):
            return self.supd(workdir, cgroups="off" if kind == SUPD_SESSIONS else "auto")
        return Supervisord(workdir, self.bench_venv)

    def supd(self, workdir: Path, cgroups: str = "auto") -> Supd:
        """A supd whose cgroup tree remove_cgroups() will find."""
        supd = Supd(workdir, cgroups=cgroups)
        self.supd_configs.append(supd.config_path)
        return supd

    def remove_cgroups(self) -> None:
        """supd is SIGKILLed after each round: remove the cgroup trees it leaves."""
        from supd import cgroups

        for config in self.supd_configs:
            cgroups.remove_tree(str(config))

    def stamps_env(self, stamps: Path) -> dict[str, str]:
        return {**os.environ, "HELPER_STAMPS": str(stamps)}


# -- stamps -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Respawn:
    ident: str
    exited_ns: int
    started_ns: int

    @property
    def latency_ms(self) -> float:
        return (self.started_ns - self.exited_ns) / 1e6


def read_stamps(path: Path) -> list[tuple[str, str, int]]:
    """(kind "S"/"E", helper id, ns) records, in file order."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        kind, ident, ns = line.split()
        records.append((kind, ident, int(ns)))
    return records


def starts(records: list[tuple[str, str, int]]) -> list[int]:
    return sorted(ns for kind, _ident, ns in records if kind == "S")


def respawns(records: list[tuple[str, str, int]]) -> list[Respawn]:
    """Each start paired with the previous exit of the same helper id, by time."""
    by_id: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for kind, ident, ns in records:
        by_id[ident].append((ns, kind))
    found = []
    for ident, events in by_id.items():
        events.sort()
        for (exit_ns, first), (start_ns, second) in itertools.pairwise(events):
            if first == "E" and second == "S":
                found.append(Respawn(ident, exit_ns, start_ns))
    return sorted(found, key=lambda r: r.started_ns)


def count_starts(path: Path) -> int:
    try:
        return path.read_bytes().count(b"S ")
    except FileNotFoundError:
        return 0


# -- shared steps -------------------------------------------------------------------------


def wait_until_all_running(
    daemon: Daemon, count: int, deadline_s: float, poll_s: float, prefix: str = ""
) -> None:
    """`count` programs (those named `prefix`..., when given) are all RUNNING."""

    def all_running() -> bool:
        try:
            states = daemon.states()
        except OSError:
            return False  # not listening yet
        states = {n: s for n, s in states.items() if n.startswith(prefix)}
        return len(states) == count and all(s == "RUNNING" for s in states.values())

    procs.wait_for(all_running, deadline_s, f"{daemon.kind}: {count} programs RUNNING", poll_s)


def wait_until_answering(daemon: Daemon, deadline_s: float) -> None:
    def answers() -> bool:
        try:
            daemon.states()
        except OSError:
            return False
        return True

    procs.wait_for(answers, deadline_s, f"{daemon.kind} answers status", 0.02)


def sleepers(helper: list[str], count: int) -> list[Program]:
    return [Program(f"p{i:04d}", [*helper, "sleep", str(i)]) for i in range(count)]


def exiters(helper: list[str], count: int, lifetime_ms: int) -> list[Program]:
    argv = [*helper, "exit-after", str(lifetime_ms)]
    return [Program(f"p{i:04d}", [*argv, str(i)]) for i in range(count)]


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile: p99 of 200 samples is the second largest."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * fraction // 1))
    return ordered[int(rank) - 1]


# -- 1. exit-to-respawn latency -----------------------------------------------------------


def respawn(session: Session, subject: str) -> str:
    sizes = session.sizes
    workdir = session.workdir(f"respawn-{subject}")
    stamps = workdir / "stamps"
    wanted_starts = sizes.respawn_restarts + 1
    argv = [*session.helper, "exit-after", str(sizes.respawn_lifetime_ms)]
    if subject == FLOOR:
        floor.respawn_loop(
            lambda i: [*argv, str(i)], 1, session.stamps_env(stamps), max_starts=wanted_starts + 1
        )
    else:
        daemon = session.daemon(subject, workdir)
        daemon.write_config(exiters(session.helper, 1, sizes.respawn_lifetime_ms))
        process = daemon.launch(session.processes, session.stamps_env(stamps))
        try:
            # supervisord needs about a second per restart: it gets a time budget, not
            # the full count, or it alone would take minutes.
            cut_off = time.monotonic() + RESPAWN_BUDGET_S
            procs.wait_for(
                lambda: count_starts(stamps) >= wanted_starts or time.monotonic() > cut_off,
                RESPAWN_BUDGET_S + 30,
                f"{subject}: {wanted_starts} starts",
                0.05,
            )
        finally:
            session.processes.kill(process)
    latencies = [r.latency_ms for r in respawns(read_stamps(stamps))][: sizes.respawn_restarts]
    session.results.add("respawn.latency_ms", subject, latencies)
    return f"median {statistics.median(latencies):.2f} ms over {len(latencies)}"


# -- 2 + 3. a fleet of sleeping programs: idle cost, memory, control, start-up -------------


def fleet(
    session: Session, subject: str, programs: int, *, idle_window_s: float = 0, control: bool
) -> str:
    """Launch `programs` sleepers; time until all are RUNNING, then measure what was
    asked for: RSS always, idle cost over a window, control round trips."""
    workdir = session.workdir(f"fleet{programs}-{subject}")
    stamps = workdir / "stamps"
    daemon = session.daemon(subject, workdir)
    daemon.write_config(sleepers(session.helper, programs))
    results = session.results
    launched = time.monotonic()
    process = daemon.launch(session.processes, session.stamps_env(stamps))
    try:
        # Status calls cost the daemon real work with many programs (supervisord: over a
        # second each), so they begin only once every helper has stamped its start.
        deadline_s = 60 + programs * 0.1
        procs.wait_for(
            lambda: count_starts(stamps) >= programs, deadline_s, f"{subject}: all started", 0.01
        )
        wait_until_all_running(daemon, programs, deadline_s, 0.02)
        startup_s = time.monotonic() - launched
        results.add(f"startup{programs}.s", subject, [startup_s])
        time.sleep(SETTLE_S)  # let the start-up's stragglers (exec reports, logs) pass
        results.add(f"rss{programs}.mib", subject, [procs.rss_bytes(process.pid) / MIB])
        summary = f"all RUNNING after {startup_s:.2f} s"
        if idle_window_s:
            summary += "; " + _idle(session, subject, process.pid, idle_window_s)
        if control:
            summary += "; " + _control(session, daemon, programs, process.pid)
    finally:
        session.processes.kill(process)
    return summary


def _idle(session: Session, subject: str, pid: int, window_s: float) -> str:
    switches, cpu_ns = procs.context_switches(pid), procs.on_cpu_ns(pid)
    time.sleep(window_s)  # the measurement itself: nothing may disturb the daemon
    switches = procs.context_switches(pid) - switches
    cpu_ms = (procs.on_cpu_ns(pid) - cpu_ns) / 1e6
    session.results.add("idle.wakeups", subject, [switches])
    session.results.add("idle.cpu_ms", subject, [cpu_ms])
    return f"{switches} wake-ups, {cpu_ms:.2f} ms CPU in {window_s:g} s idle"


def _control(session: Session, daemon: Daemon, programs: int, pid: int) -> str:
    raw_ms = _timed_calls(daemon.status_round_trip, session.sizes.status_calls)

    def ctl_status() -> None:
        subprocess.run(
            daemon.ctl_status_argv(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=True,  # both exit 0 only when every process is RUNNING
            timeout=60,
        )

    ctl_ms = _timed_calls(ctl_status, session.sizes.ctl_runs)
    session.results.add(f"status{programs}.raw_ms", daemon.kind, raw_ms)
    session.results.add(f"status{programs}.ctl_ms", daemon.kind, ctl_ms)
    summary = (
        f"raw status {statistics.median(raw_ms):.1f} ms, "
        f"ctl status {statistics.median(ctl_ms):.0f} ms"
    )
    scrape = getattr(daemon, "scrape", None)  # supd only
    if scrape is not None:
        summary += ", " + _scrapes(session, daemon.kind, scrape, programs, pid)
    return summary


def _scrapes(
    session: Session, kind: str, scrape: Callable[[], object], programs: int, pid: int
) -> str:
    """GET /metrics: cold scrapes, each after the /proc samples have gone stale (every
    process tree is read again, as for Prometheus scraping every 15 s), with the
    daemon's CPU time for each (schedstat: not inflated by a busy machine's waits);
    then scrapes within the sampling interval."""
    cold_ms: list[float] = []
    cold_cpu_ms: list[float] = []
    for _ in range(COLD_SCRAPES):
        time.sleep(SAMPLE_INTERVAL_S + 0.1)
        before = procs.on_cpu_ns(pid)
        cold_ms += _timed_calls(scrape, 1)
        cold_cpu_ms.append((procs.on_cpu_ns(pid) - before) / 1e6)
    warm_ms = _timed_calls(scrape, session.sizes.status_calls)
    session.results.add(f"scrape{programs}.cold_ms", kind, cold_ms)
    session.results.add(f"scrape{programs}.cold_cpu_ms", kind, cold_cpu_ms)
    session.results.add(f"scrape{programs}.warm_ms", kind, warm_ms)
    return (
        f"scrape {statistics.median(cold_ms):.1f} ms cold "
        f"({statistics.median(cold_cpu_ms):.1f} ms of supd's CPU), "
        f"{statistics.median(warm_ms):.1f} ms with fresh samples"
    )


def _timed_calls(call: Callable[[], object], count: int) -> list[float]:
    """Milliseconds per call: `count` calls, or fewer (MIN_CALLS at least) should they
    exceed CONTROL_BUDGET_S."""
    times_ms: list[float] = []
    cut_off = time.monotonic() + CONTROL_BUDGET_S
    while len(times_ms) < count and (len(times_ms) < MIN_CALLS or time.monotonic() < cut_off):
        started = time.perf_counter()
        call()
        times_ms.append((time.perf_counter() - started) * 1000)
    return times_ms


# -- 6. log throughput --------------------------------------------------------------------


def log_throughput(session: Session, subject: str) -> str:
    size = session.sizes.log_bytes
    workdir = session.workdir(f"log-{subject}")
    stamps = workdir / "stamps"
    logfile = workdir / "writer.log"
    env = session.stamps_env(stamps)
    writer = [*session.helper, "write", str(size), "0"]
    try:
        if subject == CAT:
            cpu_s = None
            pipeline = f"{shlex.join(writer)} | cat > {shlex.quote(str(logfile))}"
            process = session.processes.start(["sh", "-c", pipeline], env=env)
            if process.wait() != 0:
                raise RuntimeError(f"`{pipeline}` failed")
            finished = time.monotonic_ns()
            session.processes.kill(process)
        else:
            finished, cpu_s = _daemon_writes(session, subject, workdir, writer, logfile, env)
        elapsed_s = (finished - starts(read_stamps(stamps))[0]) / 1e9
        check = _verify(session, size, workdir, logfile.name)
    finally:
        for path in workdir.glob("writer.log*"):
            path.unlink()  # a GiB each: don't let rounds pile them up
    results = session.results
    results.add("log.mib_s", subject, [size / MIB / elapsed_s])
    results.add("log.complete", subject, [1.0 if check.startswith("ok") else 0.0])
    summary = f"{size / MIB / elapsed_s:.0f} MiB/s, {check}"
    if cpu_s is not None:
        results.add("log.cpu_s_per_gib", subject, [cpu_s / (size / GIB)])
        summary += f", daemon CPU {cpu_s:.2f} s"
    return summary


def _daemon_writes(
    session: Session,
    subject: str,
    workdir: Path,
    writer: list[str],
    logfile: Path,
    env: dict[str, str],
) -> tuple[int, float]:
    """Start the writer through the daemon; returns when its log holds every byte (ns)
    and the daemon's CPU seconds spent from the start request to the writer's exit."""
    daemon = session.daemon(subject, workdir)
    program = Program(
        "writer", writer, autostart=False, restart=False, stdout_logfile=logfile, stdout_maxbytes=0
    )
    daemon.write_config([program])
    size = session.sizes.log_bytes
    process = daemon.launch(session.processes, env)
    try:
        wait_until_answering(daemon, 30)
        cpu_before = procs.cpu_seconds(process.pid)
        daemon.start("writer")
        procs.wait_for(
            lambda: _size(logfile) >= size, 30 + size / MIB, f"{subject}: log complete", 0.005
        )
        finished = time.monotonic_ns()
        procs.wait_for(
            lambda: daemon.states().get("writer") == "EXITED", 30, f"{subject}: writer EXITED", 0.02
        )
        cpu_s = procs.cpu_seconds(process.pid) - cpu_before
    finally:
        session.processes.kill(process)
    return finished, cpu_s


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _verify(session: Session, size: int, workdir: Path, name: str) -> str:
    """Every numbered line present, in order: rotated backups (oldest first), then the
    live file."""
    backups = sorted(
        (p for p in workdir.glob(f"{name}.*") if p.suffix[1:].isdigit()),
        key=lambda p: -int(p.suffix[1:]),
    )
    files = [str(p) for p in [*backups, workdir / name]]
    verdict = subprocess.run(
        [*session.helper, "verify", str(size), *files],
        capture_output=True,
        text=True,
        timeout=600,
    )
    return verdict.stdout.strip() or verdict.stderr.strip()


# -- 6b. log throughput into supd's own stdout ---------------------------------------------

# The reference: a bare Python loop moving the same bytes from a pipe to a file, the
# least any Python supervisor must do. It reports its own CPU time on stderr.
PYTHON_LOOP = """
import os, resource, sys
while data := os.read(0, 1 << 18):
    view = memoryview(data)
    while view:
        view = view[os.write(1, view):]
usage = resource.getrusage(resource.RUSAGE_SELF)
print(usage.ru_utime + usage.ru_stime, file=sys.stderr)
"""


def stdout_throughput(session: Session, subject: str) -> str:
    """The writer's lines through supd into supd's own stdout (`stdout_logfile = "-"`,
    each line after its `writer | ` prefix), against the bare Python loop."""
    size = session.sizes.log_bytes
    workdir = session.workdir(f"stdout-{subject}")
    stamps = workdir / "stamps"
    output = workdir / "stdout.log"
    env = session.stamps_env(stamps)
    writer = [*session.helper, "write", str(size), "0"]
    try:
        if subject == PYLOOP:
            errors = workdir / "loop.cpu"
            pipeline = (
                f"{shlex.join(writer)} | {shlex.quote(sys.executable)} -c "
                f"{shlex.quote(PYTHON_LOOP)} > {shlex.quote(str(output))} "
                f"2> {shlex.quote(str(errors))}"
            )
            process = session.processes.start(["sh", "-c", pipeline], env=env)
            if process.wait() != 0:
                raise RuntimeError(f"`{pipeline}` failed")
            finished = time.monotonic_ns()
            session.processes.kill(process)
            cpu_s = float(errors.read_text().split()[-1])
            plain = output
        else:
            finished, cpu_s = _supd_to_stdout(session, workdir, writer, output, env)
            plain = workdir / "stripped.log"
            _strip_prefix(output, plain, b"writer | ")
        elapsed_s = (finished - starts(read_stamps(stamps))[0]) / 1e9
        check = _verify(session, size, workdir, plain.name)
    finally:
        for path in workdir.glob("*.log"):
            path.unlink()
    results = session.results
    results.add("stdout.mib_s", subject, [size / MIB / elapsed_s])
    results.add("stdout.complete", subject, [1.0 if check.startswith("ok") else 0.0])
    results.add("stdout.cpu_s_per_gib", subject, [cpu_s / (size / GIB)])
    return f"{size / MIB / elapsed_s:.0f} MiB/s, {check}, CPU {cpu_s:.2f} s"


def _supd_to_stdout(
    session: Session, workdir: Path, writer: list[str], output: Path, env: dict[str, str]
) -> tuple[int, float]:
    daemon = session.daemon(SUPD, workdir)
    program = Program("writer", writer, autostart=False, restart=False, stdout_logfile=Path("-"))
    daemon.write_config([program])
    size = session.sizes.log_bytes
    expected = size + (size // LINE_BYTES) * len(b"writer | ")
    argv = [sys.executable, "-m", "supd", "-c", str(daemon.config_path)]
    # supd's stdout (children's lines) and stderr (its own log, warnings only) to one file.
    process = session.processes.start(argv, env=env, output=output, cwd=workdir)
    try:
        wait_until_answering(daemon, 30)
        cpu_before = procs.cpu_seconds(process.pid)
        daemon.start("writer")
        procs.wait_for(
            lambda: _size(output) >= expected, 30 + size / MIB, "supd: stdout complete", 0.005
        )
        finished = time.monotonic_ns()
        procs.wait_for(
            lambda: daemon.states().get("writer") == "EXITED", 30, "supd: writer EXITED", 0.02
        )
        cpu_s = procs.cpu_seconds(process.pid) - cpu_before
    finally:
        session.processes.kill(process)
    return finished, cpu_s


def _strip_prefix(source: Path, target: Path, prefix: bytes) -> None:
    """The writer's own lines out of supd's stdout (its own log lines left out)."""
    with source.open("rb") as lines, target.open("wb") as plain:
        for line in lines:
            if line.startswith(prefix):
                plain.write(line[len(prefix) :])


# -- 8. re-exec with a fleet: every child kept ---------------------------------------------


def reexec(session: Session, subject: str) -> str:
    """supd only: `fleet_programs` sleepers RUNNING; then from the `reexec` request until a
    status shows every one RUNNING with the pid it had (supervisord cannot: its restart
    kills every child)."""
    programs = session.sizes.fleet_programs
    workdir = session.workdir(f"reexec{programs}-{subject}")
    stamps = workdir / "stamps"
    daemon = session.supd(workdir)
    daemon.write_config(sleepers(session.helper, programs))
    process = daemon.launch(session.processes, session.stamps_env(stamps))
    try:
        deadline_s = 60 + programs * 0.1
        procs.wait_for(
            lambda: count_starts(stamps) >= programs, deadline_s, f"{subject}: all started", 0.01
        )
        wait_until_all_running(daemon, programs, deadline_s, 0.02)
        time.sleep(SETTLE_S)  # let the start-up's stragglers (exec reports, logs) pass
        before = daemon.pids()
        requested = time.monotonic()
        daemon.reexec()

        def all_kept() -> bool:
            try:
                return daemon.generation() == 2 and daemon.pids() == before
            except (OSError, ConnectionError, RuntimeError, ValueError):
                return False

        procs.wait_for(all_kept, 60, f"{subject}: re-exec with every pid kept", 0.005)
        took = time.monotonic() - requested
        if process.poll() is not None:
            raise RuntimeError("supd is gone after the re-exec")
    finally:
        session.processes.kill(process)
    session.results.add(f"reexec{programs}.s", subject, [took])
    return f"re-exec to all {programs} RUNNING with the same pids: {took:.2f} s"


# -- 7. restart storm ---------------------------------------------------------------------


def storm(session: Session, subject: str) -> str:
    sizes = session.sizes
    workdir = session.workdir(f"storm-{subject}")
    stamps = workdir / "stamps"
    env = session.stamps_env(stamps)
    programs = exiters(session.helper, sizes.storm_programs, sizes.storm_lifetime_ms)
    run_s = STORM_WARMUP_S + sizes.storm_window_s
    if subject == FLOOR:
        until = time.monotonic() + run_s + 0.5
        floor.respawn_loop(lambda i: programs[i].argv, len(programs), env, until=until)
    else:
        daemon = session.daemon(subject, workdir)
        daemon.write_config(programs)
        process = daemon.launch(session.processes, env)
        try:
            procs.wait_for(lambda: count_starts(stamps) > 0, 30, f"{subject}: first start", 0.01)
            time.sleep(run_s + 0.5)  # the storm itself runs for this long
        finally:
            session.processes.kill(process)
    records = read_stamps(stamps)
    window_start = starts(records)[0] + int(STORM_WARMUP_S * 1e9)
    window_end = window_start + int(sizes.storm_window_s * 1e9)
    achieved = sum(1 for ns in starts(records) if window_start <= ns < window_end)
    latencies = [
        r.latency_ms for r in respawns(records) if window_start <= r.started_ns < window_end
    ]
    session.results.add("storm.restarts", subject, [achieved])
    session.results.add("storm.latency_ms", subject, latencies)
    ideal = ideal_storm_restarts(sizes)
    return (
        f"{achieved} starts in {sizes.storm_window_s:g} s ({achieved / ideal:.0%} of ideal), "
        f"latency median {statistics.median(latencies):.2f} ms"
    )


def ideal_storm_restarts(sizes: Sizes) -> float:
    """Starts in the window were every respawn instantaneous."""
    return sizes.storm_programs * sizes.storm_window_s * 1000 / sizes.storm_lifetime_ms


# -- M8: as many programs as the fd limit allows -------------------------------------------

SCALE_MAX_PROGRAMS = 10_000
SCALE_KILLS = 20


def scale_programs(quick: bool) -> int:
    """Each program holds two pipe fds in supd: as many as the hard fd limit allows
    beside supd's own (what `supd --check` counts)."""
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    reserve = FD_RESERVE + METRICS_FD_RESERVE  # supd's config here serves metrics
    fitting = (hard - reserve) // 2 if hard != resource.RLIM_INFINITY else 10**6
    return min(SCALE_MAX_PROGRAMS if not quick else 2_000, fitting)


def scale(session: Session, subject: str, quick: bool = False) -> str:
    """M8 (supd only): start-up, RSS, status, one exit handled, and shutdown, with every
    program the fd limit allows watched at once."""
    programs = scale_programs(quick)
    workdir = session.workdir(f"scale{programs}-{subject}")
    stamps = workdir / "stamps"
    daemon = session.daemon(subject, workdir)
    assert isinstance(daemon, Supd)
    daemon.timeout_s = 120.0
    daemon.write_config(sleepers(session.helper, programs))
    results = session.results
    results.add("scale.programs", subject, [programs])
    launched = time.monotonic()
    process = daemon.launch(session.processes, session.stamps_env(stamps))
    try:
        deadline_s = 120 + programs * 0.02

        def all_started() -> bool:
            if process.poll() is not None:  # e.g. a config it refused: fail now, not later
                raise RuntimeError(f"supd exited {process.returncode}: {workdir}/daemon.log")
            return count_starts(stamps) >= programs

        procs.wait_for(all_started, deadline_s, f"{subject}: all started", 0.05)
        wait_until_all_running(daemon, programs, deadline_s, 0.2)
        startup_s = time.monotonic() - launched
        results.add("scale.startup_ms_per_program", subject, [startup_s * 1000 / programs])
        time.sleep(SETTLE_S)
        results.add("scale.rss_mib", subject, [procs.rss_bytes(process.pid) / MIB])
        results.add("scale.status_ms", subject, _timed_calls(daemon.status_round_trip, 5))
        one = _timed_calls(lambda: daemon.call("status", {"names": ["p0001"]}), 20)
        results.add("scale.status_one_ms", subject, one)
        before = _exit_counters(daemon)
        results.add("scale.exit_ms", subject, _exit_to_restart(daemon, stamps, SCALE_KILLS))
        after = _exit_counters(daemon)
        exits = after["supd_exits_handled_total"] - before["supd_exits_handled_total"]
        if exits > 0:
            handling = (
                after["supd_exit_handling_seconds_total"]
                - before["supd_exit_handling_seconds_total"]
            )
            peeks = after["supd_exit_peek_seconds_total"] - before["supd_exit_peek_seconds_total"]
            results.add("scale.exit_loop_ms", subject, [handling * 1000 / exits])
            results.add("scale.exit_loop_peeks_ms", subject, [(handling + peeks) * 1000 / exits])
        stopping = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=600)
        shutdown_s = time.monotonic() - stopping
        results.add("scale.shutdown_s", subject, [shutdown_s])
    finally:
        session.processes.kill(process)
    return (
        f"{programs} programs RUNNING after {startup_s:.1f} s, "
        f"status {statistics.median(results.get('scale.status_ms', subject)):.1f} ms, "
        f"kill to restart in {statistics.median(results.get('scale.exit_ms', subject)):.2f} ms, "
        f"shutdown {shutdown_s:.1f} s"
    )


def _exit_counters(daemon: Supd) -> dict[str, float]:
    """supd's own count of the loop time child exits took (metrics: the scale config
    serves them), read around the kills."""
    wanted = (
        "supd_exits_handled_total",
        "supd_exit_handling_seconds_total",
        "supd_exit_peek_seconds_total",
    )
    found: dict[str, float] = {}
    for line in daemon.scrape().decode().splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            found[name] = float(value)
    return found


def _exit_to_restart(daemon: Supd, stamps: Path, kills: int) -> list[float]:
    """SIGKILL one program at a time; the time from the kill to its helper's next start
    stamp (both CLOCK_MONOTONIC) bounds what one exit costs the loop, spawn included."""
    latencies = []
    for index in range(kills):
        name = f"p{index:04d}"
        [row] = daemon.call("status", {"names": [name]})
        before = count_starts(stamps)
        killed_ns = time.monotonic_ns()
        os.kill(row["pid"], signal.SIGKILL)

        def restarted(before: int = before) -> bool:
            return count_starts(stamps) > before

        procs.wait_for(restarted, 30, f"{name} back", 0.001)
        started = [
            ns
            for kind, ident, ns in read_stamps(stamps)
            if kind == "S" and ident == str(index) and ns > killed_ns
        ]
        latencies.append((min(started) - killed_ns) / 1e6)
    return latencies


# -- selector micro-benchmark -------------------------------------------------------------


def selector(session: Session, subject: str) -> str:
    """benchmarks/selector.py, in a process of its own; parses its two per-call times."""
    output = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.selector",
            "--calls",
            str(session.sizes.selector_calls),
            "--rounds",
            "5",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
        cwd=Path(__file__).resolve().parent.parent,
    ).stdout
    bare = float(_field(output, r"bare epoll\.poll\(0\):\s+([\d.]+)"))
    ours = float(_field(output, r"Selector\.select\(0\):\s+([\d.]+)"))
    session.results.add("selector.us", "epoll", [bare])
    session.results.add("selector.us", SUPD, [ours])
    return f"Selector.select {ours:.2f} us/call, bare epoll {bare:.2f} us/call"


# -- 8. health checks: 1,000 programs, each with a 1 s tcp check ----------------------------

# A listener that accepts and closes every connection (the probes never send anything),
# in its own process so that it costs the daemon nothing; it counts what it accepted.
ACCEPTOR = """
import select, signal, socket, sys
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", 0))
listener.listen(4096)
listener.setblocking(False)
print(listener.getsockname()[1], flush=True)
count = 0
def report(*_):
    print(count, flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, report)
signal.signal(signal.SIGUSR1, lambda *_: print(count, flush=True))
poller = select.epoll()
poller.register(listener, select.EPOLLIN)
while True:
    for _ in poller.poll():
        while True:
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                break
            conn.close()
            count += 1
"""


def health(session: Session, subject: str) -> str:
    """The daemon's cost of `health_programs` tcp health checks a second, against one
    listening socket: CPU as a share of one core, and wake-ups per probe."""
    sizes = session.sizes
    workdir = session.workdir(f"health-{subject}")
    out = workdir / "acceptor.out"
    acceptor = session.processes.start([sys.executable, "-c", ACCEPTOR], output=out)
    try:
        procs.wait_for(lambda: out.read_text().strip() != "", 10, "acceptor listening", 0.01)
        port = int(out.read_text().split()[0])
        check = f'health = {{ tcp = "127.0.0.1:{port}", interval = 1, start_grace = 0 }}'
        programs = [
            Program(p.name, p.argv, supd_only=(check,))
            for p in sleepers(session.helper, sizes.health_programs)
        ]
        daemon = session.daemon(subject, workdir)
        daemon.write_config(programs)
        process = daemon.launch(session.processes, session.stamps_env(workdir / "stamps"))
        try:
            deadline_s = 60 + sizes.health_programs * 0.1
            wait_until_all_running(daemon, sizes.health_programs, deadline_s, 0.05)
            time.sleep(2 * SETTLE_S)  # the first probe of each is a second after RUNNING
            acceptor.send_signal(10)  # SIGUSR1: how many so far
            switches, cpu_ns = procs.context_switches(process.pid), procs.on_cpu_ns(process.pid)
            time.sleep(sizes.health_window_s)
            switches = procs.context_switches(process.pid) - switches
            cpu_ms = (procs.on_cpu_ns(process.pid) - cpu_ns) / 1e6
            acceptor.send_signal(10)
            procs.wait_for(lambda: len(out.read_text().split()) >= 3, 10, "acceptor count", 0.01)
            counts = [int(x) for x in out.read_text().split()[1:3]]
            probes = counts[1] - counts[0]
            healthy = sum(1 for state in daemon.states().values() if state == "RUNNING")
        finally:
            session.processes.kill(process)
    finally:
        session.processes.kill(acceptor)
    window = sizes.health_window_s
    cpu_share = cpu_ms / (window * 1000) * 100
    per_probe = switches / probes if probes else float("nan")
    results = session.results
    results.add("health.cpu_percent", subject, [cpu_share])
    results.add("health.wakeups_per_probe", subject, [per_probe])
    results.add("health.probes_per_s", subject, [probes / window])
    return (
        f"{probes} probes in {window:g} s ({probes / window:.0f}/s, {healthy} RUNNING), "
        f"{cpu_share:.1f}% of a core, {switches} wake-ups ({per_probe:.3f} per probe)"
    )


def _field(text: str, pattern: str) -> str:
    match = re.search(pattern, text)
    if match is None:
        raise RuntimeError(f"benchmarks.selector printed no {pattern!r}:\n{text}")
    return match[1]


def scratch_dir() -> Path:
    """Short, so that socket paths stay under the 107-byte limit of sun_path."""
    return Path(tempfile.mkdtemp(prefix="supd-bench-"))


Runner = Callable[[Session, str], str]


# -- 10. churn: RSS over time while everything that allocates keeps happening --------------

CHURN_SLEEPERS = 100
CHURN_EXITERS = 10  # each exits after CHURN_LIFETIME_MS and is restarted at once
CHURN_LIFETIME_MS = 100
CHURN_STATUS_PER_S = 50  # the hour: 10/s; here faster, over minutes
CHURN_RELOAD_EVERY_S = 5.0  # the hour: one a minute; each adds or removes one
CHURN_SAMPLE_EVERY_S = 2.0
CHURN_WARMUP_FRACTION = 0.25  # the first quarter: caches and the allocator settle


def churn(session: Session, subject: str) -> str:
    """supd only: RSS must stay flat while programs restart (~100 a second), `status` is
    called CHURN_STATUS_PER_S times a second and the config is reloaded every few
    seconds (a program added, then removed again). Reports the RSS slope after the
    warm-up, by least squares over the samples."""
    sizes = session.sizes
    workdir = session.workdir(f"churn-{subject}")
    daemon = session.supd(workdir)
    base = [
        *sleepers(session.helper, CHURN_SLEEPERS),
        *(
            Program(f"x{p.name}", p.argv)
            for p in exiters(session.helper, CHURN_EXITERS, CHURN_LIFETIME_MS)
        ),
    ]
    extra = Program("extra", [*session.helper, "sleep", "9999"])
    daemon.write_config(base)
    process = daemon.launch(session.processes, session.stamps_env(workdir / "stamps"))
    samples: list[tuple[float, float]] = []  # (seconds since start, MiB)
    reloads = calls = 0
    try:
        wait_until_all_running(daemon, CHURN_SLEEPERS, 60, 0.05, prefix="p")  # not the x...
        started = time.monotonic()
        next_sample = next_reload = started
        with_extra = False
        while (now := time.monotonic()) < started + sizes.churn_window_s:
            if now >= next_sample:
                samples.append((now - started, procs.rss_bytes(process.pid) / MIB))
                next_sample += CHURN_SAMPLE_EVERY_S
            if now >= next_reload and now > started:
                with_extra = not with_extra
                daemon.write_config([*base, extra] if with_extra else base)
                daemon.call("reload", {})
                reloads += 1
                next_reload += CHURN_RELOAD_EVERY_S
            daemon.status_round_trip()
            calls += 1
            time.sleep(max(0.0, 1 / CHURN_STATUS_PER_S - (time.monotonic() - now)))
        samples.append((time.monotonic() - started, procs.rss_bytes(process.pid) / MIB))
        if process.poll() is not None:
            raise RuntimeError("supd is gone during the churn")
    finally:
        session.processes.kill(process)
    steady = samples[int(len(samples) * CHURN_WARMUP_FRACTION) :]
    slope = _least_squares_slope(steady) * 60 * 1024  # KiB per minute
    results = session.results
    results.add("churn.slope_kib_per_min", subject, [slope])
    results.add("churn.rss_start_mib", subject, [steady[0][1]])
    results.add("churn.rss_end_mib", subject, [steady[-1][1]])
    window = sizes.churn_window_s
    return (
        f"{calls} status calls and {reloads} reloads in {window:g} s; RSS "
        f"{samples[0][1]:.1f} -> {steady[0][1]:.1f} (after warm-up) -> {samples[-1][1]:.1f} "
        f"MiB, slope {slope:+.1f} KiB/min"
    )


def _least_squares_slope(points: list[tuple[float, float]]) -> float:
    xs = [x for x, _ in points]
    ys = [y for _, y in points]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread if spread else 0.0
