"""supd against supervisord 4.3.0 on the same workloads, in one run, one table.

    python -m benchmarks                      # everything (about 5 minutes)
    python -m benchmarks respawn idle         # just these workloads
    python -m benchmarks --quick              # smaller sizes: a smoke run of a minute
    python -m benchmarks --write-results      # also rewrite benchmarks/RESULTS.md

Supervisor 4.3.0 is installed from PyPI into .bench-venv (made on first use). The
stand-in for every supervised program is benchmarks/helper.c, compiled into
benchmarks/build/ (benchmarks/helper.py when there is no gcc). Subjects alternate within
each workload, round after round; figures are medians (latencies: median and p99 of all
samples). Every process the benchmark starts is killed before it exits, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks import procs, report, workloads
from benchmarks.daemons import SUPERVISOR_VERSION
from benchmarks.workloads import (
    CAT,
    DAEMONS,
    FLOOR,
    PYLOOP,
    SUPD,
    SUPD_SESSIONS,
    SUPERVISORD,
    Session,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BENCH_VENV = REPO / ".bench-venv"
BUILD = HERE / "build"
RESULTS_MD = HERE / "RESULTS.md"

WORKLOADS = (
    "respawn",
    "idle",
    "memory",
    "control",
    "startup",
    "log",
    "stdout",
    "storm",
    "selector",
    "health",
    "scale",
    "reexec",
    "churn",
)


# -- set-up -------------------------------------------------------------------------------


def ensure_supervisor(venv: Path) -> None:
    """A venv holding exactly supervisor==SUPERVISOR_VERSION, made or repaired as needed."""
    supervisord = venv / "bin" / "supervisord"
    if supervisord.exists() and _installed_version(venv) == SUPERVISOR_VERSION:
        return
    python = shutil.which("python3") or sys.executable
    if not (venv / "bin" / "python").exists():
        _progress(f"creating {venv} with {python} -m venv")
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
    _progress(f"installing supervisor=={SUPERVISOR_VERSION} into {venv}")
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
         f"supervisor=={SUPERVISOR_VERSION}"],
        check=True,
    )  # fmt: skip


def _installed_version(venv: Path) -> str | None:
    probe = "import importlib.metadata as m; print(m.version('supervisor'))"
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-c", probe], capture_output=True, text=True
    )
    return done.stdout.strip() if done.returncode == 0 else None


def build_helper() -> list[str]:
    """The argv prefix that runs the helper: compiled if gcc can, else the Python twin."""
    source, binary = HERE / "helper.c", BUILD / "helper"
    if binary.exists() and binary.stat().st_mtime >= source.stat().st_mtime:
        return [str(binary)]
    gcc = shutil.which("gcc")
    if gcc is not None:
        BUILD.mkdir(exist_ok=True)
        # Static when the C library allows it: no dynamic loader work in each exec.
        for extra in (["-static"], []):
            command = [gcc, "-O2", "-Wall", *extra, "-o", str(binary), str(source)]
            if subprocess.run(command, capture_output=True).returncode == 0:
                return [str(binary)]
    _progress("no working gcc: using benchmarks/helper.py (latencies include its start-up)")
    return [sys.executable, str(HERE / "helper.py")]


# -- the plan -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    name: str
    subjects: tuple[str, ...]
    rounds: int
    run: Callable[[Session, str], str]


def plan(selected: list[str], sizes: workloads.Sizes, subjects: set[str]) -> list[Step]:
    wanted = set(selected)
    steps = []
    if "respawn" in wanted:
        steps.append(
            Step(
                "respawn",
                (SUPD, SUPD_SESSIONS, SUPERVISORD, FLOOR),
                sizes.respawn_rounds,
                workloads.respawn,
            )
        )
    if wanted & {"idle", "memory"}:
        window = sizes.idle_window_s if "idle" in wanted else 0.0
        idle = functools.partial(
            workloads.fleet, programs=sizes.idle_programs, idle_window_s=window, control=False
        )
        steps.append(Step("idle" if window else "memory", DAEMONS, 1, idle))
    if wanted & {"memory", "control", "startup"}:
        rounds = sizes.fleet_rounds if wanted & {"control", "startup"} else 1
        big = functools.partial(
            workloads.fleet, programs=sizes.fleet_programs, control="control" in wanted
        )
        steps.append(Step(f"fleet of {sizes.fleet_programs}", DAEMONS, rounds, big))
    if "log" in wanted:
        steps.append(
            Step("log", (CAT, SUPD, SUPERVISORD), sizes.log_rounds, workloads.log_throughput)
        )
    if "stdout" in wanted:
        steps.append(Step("stdout", (PYLOOP, SUPD), sizes.log_rounds, workloads.stdout_throughput))
    if "storm" in wanted:
        steps.append(Step("storm", (SUPD, SUPERVISORD, FLOOR), sizes.storm_rounds, workloads.storm))
    if "selector" in wanted:
        steps.append(Step("selector", (SUPD,), 1, workloads.selector))
    if "health" in wanted:  # supd only: supervisord has no health checks
        steps.append(Step(f"health of {sizes.health_programs}", (SUPD,), 1, workloads.health))
    if "scale" in wanted:
        quick = sizes is workloads.QUICK
        run = functools.partial(workloads.scale, quick=quick)
        steps.append(Step("scale (M8)", (SUPD,), 1, run))
    if "reexec" in wanted:
        name = f"reexec of {sizes.fleet_programs}"
        steps.append(Step(name, (SUPD,), sizes.fleet_rounds, workloads.reexec))
    if "churn" in wanted:  # supd only: its RSS over time, under restarts, status, reloads
        steps.append(Step("churn", (SUPD,), 1, workloads.churn))
    kept = [
        Step(s.name, tuple(x for x in s.subjects if x in subjects), s.rounds, s.run) for s in steps
    ]
    return [s for s in kept if s.subjects]


def run_step(session: Session, step: Step) -> None:
    """Rounds of every subject; each round starts with the next subject in turn."""
    for round_index in range(step.rounds):
        shift = round_index % len(step.subjects)
        order = step.subjects[shift:] + step.subjects[:shift]
        for subject in order:
            label = f"{step.name} [{round_index + 1}/{step.rounds}] {subject}"
            started = time.monotonic()
            try:
                summary = step.run(session, subject)
            except Exception as exc:  # one broken run must not lose the others' figures
                summary = f"FAILED: {exc!r}"
                session.results.notes.append(f"{label}: {exc}")
            _progress(f"{label}: {summary} ({time.monotonic() - started:.1f} s)")


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- output -------------------------------------------------------------------------------


def results_markdown(
    table: str, summary: str, notes: list[str], args: argparse.Namespace, setting: str
) -> str:
    options = [*(["--quick"] if args.quick else []), *(["--only", args.only] if args.only else [])]
    command = " ".join(["python -m benchmarks", *options, *args.workloads])
    parts = [
        "# supd benchmark results",
        "",
        f"Last {'quick' if args.quick else 'full'} run: `{command}` against supervisor "
        f"{SUPERVISOR_VERSION}, {setting}.",
        "",
        table,
        "",
        summary,
        "",
        "How to read it: *supd/sd* is supd's figure divided by supervisord's. The reference",
        "column is what the machine allows without a supervisor: *floor* is a bare Python",
        "loop (os.posix_spawn + pidfd + epoll, nothing else) respawning the same helper;",
        "*cat* is `helper write | cat > file`. Latencies are a helper's start stamp minus",
        "its previous exit stamp (CLOCK_MONOTONIC, taken by the helper); supervisord gets",
        f"{workloads.RESPAWN_BUDGET_S:g} s per respawn round instead of the full count.",
        "Wake-ups are the daemon's voluntary + involuntary context switches over the idle",
        "window, CPU its schedstat time. Raw status is one fresh unix-socket connection per",
        "call (supd: JSON-RPC `status`; supervisord: XML-RPC `getAllProcessInfo`); the",
        "ctl row runs the whole `supctl status` / `supervisorctl status` process. Start-up",
        "is launch until a status call shows every program RUNNING. Log throughput runs",
        "from the writer's start stamp until the log file holds every byte; daemon CPU is",
        "utime + stime from the start request to the writer's exit. The storm counts",
        f"starts in a {workloads.FULL.storm_window_s:g} s window after "
        f"{workloads.STORM_WARMUP_S:g} s of warm-up. Rounds alternate between subjects;",
        "figures are medians. Both daemons log at warning level; both start programs",
        "with startsecs = 0; supd restarts with backoff_initial = 0, supervisord with",
        "autorestart = true. `python -m benchmarks --help` lists the workloads.",
    ]
    if notes:
        parts += ["", "Problems during the run:", "", *[f"- {note}" for note in notes]]
    return "\n".join(parts) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="workloads: " + ", ".join(WORKLOADS),
    )
    parser.add_argument("workloads", nargs="*", metavar="WORKLOAD", help="default: all")
    parser.add_argument("--quick", action="store_true", help="small sizes, one round")
    parser.add_argument(
        "--write-results", action="store_true", help=f"write the table to {RESULTS_MD.name}"
    )
    parser.add_argument(
        "--only", choices=[SUPD, SUPERVISORD], help="run one daemon (references still run)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parser.parse_args(argv)
    unknown = [w for w in args.workloads if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload {unknown[0]!r}; choose from {', '.join(WORKLOADS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = workloads.QUICK if args.quick else workloads.FULL
    subjects = {FLOOR, CAT, PYLOOP, *([args.only] if args.only else DAEMONS)}
    if SUPD in subjects:  # supd once more, without cgroups (respawn only)
        subjects.add(SUPD_SESSIONS)
    steps = plan(args.workloads or list(WORKLOADS), sizes, subjects)
    machine = report.machine()
    # Taken before the run: others may commit while it goes on.
    setting = f"started {report.now_utc()} at commit {report.git_revision(REPO)}"
    if SUPERVISORD in subjects:
        ensure_supervisor(BENCH_VENV)
    helper = build_helper()
    scratch = workloads.scratch_dir()
    started = time.monotonic()
    with procs.exit_on_signals():
        processes = procs.Processes()
        session = Session(processes, helper, BENCH_VENV, scratch, sizes)
        try:
            for step in steps:
                run_step(session, step)
        finally:
            processes.close()
            session.remove_cgroups()
            if not args.keep:
                shutil.rmtree(scratch, ignore_errors=True)
    rows = report.build_rows(session.results, sizes)
    table = report.markdown_table(rows)
    summary = report.verdict_summary(rows)
    print(f"\n{machine}\n\n{table}\n\n{summary}")
    for note in session.results.notes:
        print(f"problem: {note}")
    _progress(f"total {time.monotonic() - started:.0f} s")
    if args.keep:
        _progress(f"scratch folder kept: {scratch}")
    if args.write_results:
        RESULTS_MD.write_text(
            results_markdown(table, summary, session.results.notes, args, f"{setting}; {machine}")
        )
        _progress(f"wrote {RESULTS_MD}")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        _progress("interrupted: every process the benchmark started is gone")
        raise SystemExit(130) from None
