"""The results table: supd and supervisord side by side, their ratio, the reference
(bare-Python floor, `cat`, bare epoll) and each target with its verdict, all from the
same run. Also the machine description that RESULTS.md starts with."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks.workloads import (
    CAT,
    FLOOR,
    PYLOOP,
    SUPD,
    SUPD_SESSIONS,
    SUPERVISORD,
    Results,
    Sizes,
    ideal_storm_restarts,
    percentile,
)

Statistic = Callable[[list[float]], float]


def median(values: list[float]) -> float:
    return statistics.median(values)


def p99(values: list[float]) -> float:
    return percentile(values, 0.99)


@dataclass(frozen=True)
class Row:
    workload: str
    metric: str
    supd: float | None
    supervisord: float | None
    reference: str = ""
    target: str = ""
    passed: bool | None = None  # None: no target, or not measured
    digits: int = 2

    def cells(self) -> list[str]:
        ratio = ""
        if self.supd is not None and self.supervisord:
            ratio = f"{self.supd / self.supervisord:.2g}x"
        verdict = {True: "PASS", False: "**FAIL**", None: ""}[self.passed]
        return [
            self.workload,
            self.metric,
            _number(self.supd, self.digits),
            _number(self.supervisord, self.digits),
            ratio,
            self.reference,
            self.target,
            verdict,
        ]


HEADER = ["Workload", "Metric", "supd", "supervisord", "supd/sd", "Reference", "Target", ""]


def _number(value: float | None, digits: int) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


class _Figures:
    """Looks figures up in Results; None for whatever was not measured."""

    def __init__(self, results: Results) -> None:
        self.results = results

    def get(self, metric: str, subject: str, statistic: Statistic = median) -> float | None:
        values = self.results.get(metric, subject)
        return statistic(values) if values else None


def _ratio_target(
    value: float | None, reference: float | None, limit: float, text: str, higher: bool = False
) -> tuple[str, bool | None]:
    """A target of the form value <= limit * reference (or >= when `higher`)."""
    if value is None or not reference:
        return text, None
    ratio = value / reference
    passed = ratio >= limit if higher else ratio <= limit
    return f"{text} (is {ratio:.2f}x)", passed


def build_rows(results: Results, sizes: Sizes) -> list[Row]:
    rows: list[Row] = []
    builders = (
        _respawn, _idle, _memory, _control, _startup, _log, _stdout, _storm, _selector, _scale,
        _reexec,
        _health,
        _churn,
    )  # fmt: skip
    for builder in builders:
        rows += builder(_Figures(results), sizes)
    return rows


def _respawn(f: _Figures, sizes: Sizes) -> list[Row]:
    metric = "respawn.latency_ms"
    if f.get(metric, SUPD) is None and f.get(metric, SUPERVISORD) is None:
        return []
    counts = ", ".join(
        f"{subject} {len(f.results.get(metric, subject))}" for subject in (SUPD, SUPERVISORD, FLOOR)
    )
    name = f"respawn (exit after {sizes.respawn_lifetime_ms} ms; restarts measured: {counts})"
    supd, floor = f.get(metric, SUPD), f.get(metric, FLOOR)
    target, passed = _ratio_target(supd, floor, 2, "<= 2x floor")
    floor_p99 = f.get(metric, FLOOR, p99)
    sessions = f.get(metric, SUPD_SESSIONS)
    # The cost of joining a cgroup at each spawn (and of waiting for it to be empty at
    # each exit): supd with cgroups = "auto" against the same supd with "off".
    without = (
        []
        if sessions is None
        else [
            Row(
                name,
                "latency median (ms), supd without cgroups",
                sessions,
                None,
                _ref("with cgroups", supd),
                digits=3,
            ),
            Row(
                name,
                "latency p99 (ms), supd without cgroups",
                f.get(metric, SUPD_SESSIONS, p99),
                None,
                _ref("with cgroups", f.get(metric, SUPD, p99)),
                digits=3,
            ),
        ]
    )
    return [
        Row(
            name,
            "latency median (ms)",
            supd,
            f.get(metric, SUPERVISORD),
            _ref("floor", floor),
            target,
            passed,
            3,
        ),
        Row(
            name,
            "latency p99 (ms)",
            f.get(metric, SUPD, p99),
            f.get(metric, SUPERVISORD, p99),
            _ref("floor", floor_p99),
            digits=3,
        ),
        *without,
    ]


def _ref(label: str, value: float | None, digits: int = 3) -> str:
    return "" if value is None else f"{label} {value:,.{digits}f}"


def _idle(f: _Figures, sizes: Sizes) -> list[Row]:
    supd = f.get("idle.wakeups", SUPD)
    if supd is None and f.get("idle.wakeups", SUPERVISORD) is None:
        return []
    name = f"idle ({sizes.idle_programs} sleeping programs, {sizes.idle_window_s:g} s)"
    return [
        Row(
            name,
            "daemon wake-ups",
            supd,
            f.get("idle.wakeups", SUPERVISORD),
            "",
            "0",
            None if supd is None else supd == 0,
            0,
        ),
        Row(
            name,
            "daemon CPU (ms)",
            f.get("idle.cpu_ms", SUPD),
            f.get("idle.cpu_ms", SUPERVISORD),
            digits=2,
        ),
    ]


def _memory(f: _Figures, sizes: Sizes) -> list[Row]:
    rows = []
    for programs in sorted({sizes.idle_programs, sizes.fleet_programs}):
        metric = f"rss{programs}.mib"
        supd, supervisord = f.get(metric, SUPD), f.get(metric, SUPERVISORD)
        if supd is None and supervisord is None:
            continue
        target, passed = "", None
        if programs == sizes.fleet_programs:
            target, passed = _ratio_target(supd, supervisord, 1, "<= supervisord")
        rows.append(
            Row(
                "memory",
                f"RSS with {programs} programs (MiB)",
                supd,
                supervisord,
                "",
                target,
                passed,
                1,
            )
        )
    return rows


def _control(f: _Figures, sizes: Sizes) -> list[Row]:
    n = sizes.fleet_programs
    raw, ctl = f"status{n}.raw_ms", f"status{n}.ctl_ms"
    if f.get(raw, SUPD) is None and f.get(raw, SUPERVISORD) is None:
        return []
    name = f"control ({n} programs)"
    supd_raw, supd_ctl = f.get(raw, SUPD), f.get(ctl, SUPD)
    return [
        Row(
            name,
            "raw status round trip, median (ms)",
            supd_raw,
            f.get(raw, SUPERVISORD),
            "",
            "< 10 ms",
            None if supd_raw is None else supd_raw < 10,
        ),
        Row(
            name,
            "supctl / supervisorctl status, median (ms)",
            supd_ctl,
            f.get(ctl, SUPERVISORD),
            "",
            "< 200 ms",
            None if supd_ctl is None else supd_ctl < 200,
            0,
        ),
        *_scrape_rows(f, n),
    ]


def _scrape_rows(f: _Figures, n: int) -> list[Row]:
    """GET /metrics: cold (every /proc sample stale) and with fresh samples."""
    cold, warm = f.get(f"scrape{n}.cold_ms", SUPD), f.get(f"scrape{n}.warm_ms", SUPD)
    cpu = f.get(f"scrape{n}.cold_cpu_ms", SUPD)
    if cold is None:
        return []
    name = f"metrics ({n} programs, GET /metrics)"
    return [
        Row(name, "scrape, every tree read, median (ms)", cold, None, "", "< 50 ms", cold < 50),
        Row(name, "supd CPU per such scrape, median (ms)", cpu, None, "", "", None),
        Row(name, "scrape, samples fresh, median (ms)", warm, None, "", "", None),
    ]


def _startup(f: _Figures, sizes: Sizes) -> list[Row]:
    n = sizes.fleet_programs
    metric = f"startup{n}.s"
    supd, supervisord = f.get(metric, SUPD), f.get(metric, SUPERVISORD)
    if supd is None and supervisord is None:
        return []
    target, passed = _ratio_target(supd, supervisord, 0.25, "< 1/4 of supervisord")
    return [
        Row(
            f"start-up ({n} programs)",
            "launch to all RUNNING, median (s)",
            supd,
            supervisord,
            "",
            target,
            passed,
        )
    ]


def _log(f: _Figures, sizes: Sizes) -> list[Row]:
    supd, supervisord = f.get("log.mib_s", SUPD), f.get("log.mib_s", SUPERVISORD)
    if supd is None and supervisord is None:
        return []
    name = f"log throughput ({sizes.log_bytes / (1 << 20):,.0f} MiB of lines)"
    cat = f.get("log.mib_s", CAT)
    speed_target, speed_passed = _ratio_target(supd, cat, 0.8, ">= 80% of cat", higher=True)
    cpu_supd = f.get("log.cpu_s_per_gib", SUPD)
    cpu_sd = f.get("log.cpu_s_per_gib", SUPERVISORD)
    cpu_target, cpu_passed = _ratio_target(cpu_supd, cpu_sd, 1, "< supervisord")
    complete = {s: f.results.get("log.complete", s) for s in (SUPD, SUPERVISORD, CAT)}
    return [
        Row(
            name,
            "MiB/s, median",
            supd,
            supervisord,
            _ref("cat", cat, 0),
            speed_target,
            speed_passed,
            0,
        ),
        Row(name, "daemon CPU (s per GiB), median", cpu_supd, cpu_sd, "", cpu_target, cpu_passed),
        Row(
            name,
            "runs with every line intact",
            sum(complete[SUPD]),
            sum(complete[SUPERVISORD]),
            _ref("cat", sum(complete[CAT]), 0),
            f"all {len(complete[SUPD])}",
            None if not complete[SUPD] else all(complete[SUPD]),
            0,
        ),
    ]


def _stdout(f: _Figures, sizes: Sizes) -> list[Row]:
    supd = f.get("stdout.mib_s", SUPD)
    if supd is None:
        return []
    name = f"into supd's stdout ({sizes.log_bytes / (1 << 20):,.0f} MiB of lines, prefixed)"
    loop = f.get("stdout.mib_s", PYLOOP)
    cpu_supd = f.get("stdout.cpu_s_per_gib", SUPD)
    cpu_loop = f.get("stdout.cpu_s_per_gib", PYLOOP)
    cpu_target, cpu_passed = _ratio_target(cpu_supd, cpu_loop, 1.5, "<= 1.5x python loop")
    complete = f.results.get("stdout.complete", SUPD)
    return [
        Row(name, "MiB/s, median", supd, None, _ref("python loop", loop, 0), "", None, 0),
        Row(
            name,
            "daemon CPU (s per GiB), median",
            cpu_supd,
            None,
            _ref("python loop", cpu_loop, 2),
            cpu_target,
            cpu_passed,
        ),
        Row(
            name,
            "runs with every line intact",
            sum(complete),
            None,
            "",
            f"all {len(complete)}",
            None if not complete else all(complete),
            0,
        ),
    ]


def _storm(f: _Figures, sizes: Sizes) -> list[Row]:
    supd, supervisord = f.get("storm.restarts", SUPD), f.get("storm.restarts", SUPERVISORD)
    if supd is None and supervisord is None:
        return []
    name = (
        f"restart storm ({sizes.storm_programs} programs exiting every "
        f"{sizes.storm_lifetime_ms} ms, {sizes.storm_window_s:g} s)"
    )
    floor = f.get("storm.restarts", FLOOR)
    ideal = ideal_storm_restarts(sizes)
    target, passed = _ratio_target(supd, floor, 0.8, ">= 80% of floor", higher=True)
    lat = "storm.latency_ms"
    return [
        Row(
            name,
            f"starts in the window (ideal {ideal:,.0f})",
            supd,
            supervisord,
            _ref("floor", floor, 0),
            target,
            passed,
            0,
        ),
        Row(
            name,
            "respawn latency median (ms)",
            f.get(lat, SUPD),
            f.get(lat, SUPERVISORD),
            _ref("floor", f.get(lat, FLOOR)),
            digits=3,
        ),
        Row(
            name,
            "respawn latency p99 (ms)",
            f.get(lat, SUPD, p99),
            f.get(lat, SUPERVISORD, p99),
            _ref("floor", f.get(lat, FLOOR, p99)),
            digits=3,
        ),
    ]


def _selector(f: _Figures, sizes: Sizes) -> list[Row]:
    ours, bare = f.get("selector.us", SUPD), f.get("selector.us", "epoll")
    if ours is None:
        return []
    target, passed = _ratio_target(ours, bare, 2, "<= 2x bare epoll")
    return [
        Row(
            "selector (1,000 idle pipes + 1 ready)",
            "select(0) (us/call)",
            ours,
            None,
            _ref("bare epoll.poll", bare),
            target,
            passed,
            3,
        )
    ]


def _reexec(f: _Figures, sizes: Sizes) -> list[Row]:
    n = sizes.fleet_programs
    supd = f.get(f"reexec{n}.s", SUPD)
    if supd is None:
        return []
    return [
        Row(
            f"re-exec ({n} programs kept)",
            "request to all RUNNING, same pids, median (s)",
            supd,
            None,
            "supervisord: kills every child",
            "< 2 s",
            supd < 2,
        )
    ]


def _health(f: _Figures, sizes: Sizes) -> list[Row]:
    cpu = f.get("health.cpu_percent", SUPD)
    if cpu is None:
        return []
    workload = f"health ({sizes.health_programs:,} tcp checks every 1 s)"
    rate = f.get("health.probes_per_s", SUPD)
    return [
        Row(workload, "daemon CPU (% of one core)", cpu, None, "", "< 5%", cpu < 5, 1),
        Row(
            workload,
            "wake-ups per probe",
            f.get("health.wakeups_per_probe", SUPD),
            None,
            _ref("probes/s", rate, 0),
            "",
            None,
            3,
        ),
    ]


def markdown_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for row in rows:
        lines.append("| " + " | ".join(row.cells()) + " |")
    return "\n".join(lines)


def verdict_summary(rows: list[Row]) -> str:
    judged = [r for r in rows if r.passed is not None]
    failed = [f"{r.workload}: {r.metric}" for r in judged if not r.passed]
    text = f"{len(judged) - len(failed)} of {len(judged)} targets met."
    if failed:
        text += " Missed: " + "; ".join(failed) + "."
    return text


# -- the machine ----------------------------------------------------------------------


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            memory_kib = int(line.split()[1])
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"machine: {cpu}, {os.cpu_count()} cores, {memory_kib / (1 << 20):.0f} GiB RAM; "
        f"Linux {platform.release()}; Python {platform.python_version()}; "
        f"load average before the run {load}"
    )


def git_revision(repo: Path) -> str:
    """The commit, and the daemon's files that differ from it (others may be editing
    them while the benchmark runs: the figures are of the files as they were)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True
        ).stdout

    try:
        revision = git("rev-parse", "--short", "HEAD").strip()
        changed = git("status", "--porcelain", "--", "supervisor").splitlines()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    if changed:
        files = ", ".join(line[3:] for line in changed)
        revision += f" with uncommitted changes to {files}"
    return revision


def now_utc() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _scale(f: _Figures, sizes: Sizes) -> list[Row]:
    """M8: supd alone, with every program the fd limit allows (issue 19's targets)."""
    programs = f.get("scale.programs", SUPD)
    if programs is None:
        return []
    name = f"M8: {programs:,.0f} sleeping programs (as many as the fd limit allows)"
    per_program = f.get("scale.startup_ms_per_program", SUPD)
    at_1000 = f.get(f"startup{sizes.fleet_programs}.s", SUPD)
    per_program_1000 = at_1000 * 1000 / sizes.fleet_programs if at_1000 else None
    start_target, start_passed = _ratio_target(
        per_program, per_program_1000, 1.0, f"<= per program at {sizes.fleet_programs:,}"
    )

    def under(value: float | None, limit: float) -> bool | None:
        return None if value is None else value < limit

    rss = f.get("scale.rss_mib", SUPD)
    status = f.get("scale.status_ms", SUPD)
    exit_ms = f.get("scale.exit_ms", SUPD)
    exit_loop = f.get("scale.exit_loop_ms", SUPD)
    shutdown = f.get("scale.shutdown_s", SUPD)
    return [
        Row(name, "start-up per program (ms)", per_program, None, "", start_target,
            start_passed, 3),
        Row(name, "RSS (MiB)", rss, None, "", "< 80 MiB", under(rss, 80), 1),
        Row(name, "full status round trip (ms)", status, None, "", "< 50 ms",
            under(status, 50), 1),
        Row(name, "status of one name (ms)", f.get("scale.status_one_ms", SUPD), None, "",
            digits=2),
        Row(name, "loop time of one exit, until its restart is armed (ms)", exit_loop, None,
            "", "< 2 ms", under(exit_loop, 2), 3),
        Row(name, "the same with its share of collapsed-SIGCHLD peeks (ms)",
            f.get("scale.exit_loop_peeks_ms", SUPD), None, "", digits=3),
        Row(name, "kill to restart of one program, respawn included (ms)", exit_ms, None, "",
            digits=2),
        Row(name, "SIGTERM shutdown of all (s)", shutdown, None, "", "< 10 s",
            under(shutdown, 10), 1),
    ]  # fmt: skip


def _churn(f: _Figures, sizes: Sizes) -> list[Row]:
    slope = f.get("churn.slope_kib_per_min", SUPD)
    start, end = f.get("churn.rss_start_mib", SUPD), f.get("churn.rss_end_mib", SUPD)
    if slope is None or start is None or end is None:
        return []
    workload = (
        f"churn ({sizes.churn_window_s:g} s: ~100 restarts/s, 50 status/s, a reload every 5 s)"
    )
    # Flat: the steady part of the run (after the warm-up) ends within 1% of where it
    # began. The slope is shown too, but over minutes it mostly measures the allocator's
    # steps (pymalloc takes memory 256 KiB at a time), not a trend.
    growth = (end - start) / start * 100
    return [
        Row(
            workload,
            "RSS growth after warm-up (%)",
            growth,
            None,
            f"RSS {start:.1f} -> {end:.1f} MiB",
            "< 1%",
            growth < 1,
            2,
        ),
        Row(workload, "RSS slope after warm-up (KiB/min)", slope, None, "", "", None, 1),
    ]
