"""supd's metrics: counters the daemon keeps, process trees sampled from /proc, and the
OpenMetrics text that `supctl metrics` and `GET /metrics` serve.

Counters live here, in one `Metrics` object the daemon owns for its whole life, never
in per-spawn objects (a `Process` run, a log `Slot`): a restart or a reload that
replaces a program's slot keeps them, so every `_total` only goes up while supd runs.

Resource usage of a process means the process and its descendants. Finding the
descendants never walks all of /proc: from the process's pid, `/proc/PID/stat` gives
its CPU times, resident set and thread count, and `/proc/PID/task/TID/children` (one
file for a single-threaded process) names its children; the tree is followed down
from there. That is two small reads per process in the tree. Where the kernel lacks
the children files (CONFIG_PROC_CHILDREN), one shared pass over /proc/*/stat builds a
parent map for every tree at once. Either way a tree is sampled at most once every
`SAMPLE_INTERVAL_S`, and only when someone asks (a scrape, `status -l`): supd never
wakes up to sample.

A tree's CPU time is `utime + stime + cutime + cstime` of each live member: the c*
times hold the children each member has already reaped, and those are no longer in the
tree, so nothing counts twice. A member that dies before its parent reaps it leaves the
sum for a moment, so the counter keeps the run's high-water mark; the run's last figure
is read from the zombie before supd reaps it.

Must not import `daemon`.
"""

from __future__ import annotations

import os
import resource
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final, Protocol

from . import __version__
from .facts import State
from .fleet import Transitioned
from .process import Process, backoff_delay

SAMPLE_INTERVAL_S: Final = 2.0
CONTENT_TYPE: Final = "application/openmetrics-text; version=1.0.0; charset=utf-8"
RESTART_REASONS: Final = ("exited", "failed_start", "requested")

_TICKS: Final = os.sysconf("SC_CLK_TCK")
_PAGE: Final = os.sysconf("SC_PAGE_SIZE")
_STATE_NAMES: Final = tuple(state.value for state in State)
_CHUNK: Final = 4096


# --------------------------------------------------------------------------- /proc


@dataclass(frozen=True, slots=True)
class TreeSample:
    """A process and its descendants at one moment."""

    at: float  # monotonic
    cpu_seconds: float
    rss_bytes: int
    processes: int


def _read(path: str) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        chunk = data = os.read(fd, _CHUNK)
        # A read ends at a record's end (a pid in a children list: at most 8 bytes), so
        # only a nearly full read can have more behind it: read on then, to the end.
        while len(chunk) > _CHUNK - 16:
            chunk = os.read(fd, _CHUNK)
            data += chunk
        return data
    except OSError:
        return None
    finally:
        os.close(fd)


def _parse_stat(raw: bytes) -> tuple[int, int, int, int] | None:
    """(ppid, cpu ticks including reaped children, rss pages, threads) from /proc/PID/stat."""
    # The command name may hold spaces and parentheses: the fields follow the last ")".
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        ticks = int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
        return int(fields[1]), ticks, int(fields[21]), int(fields[17])
    except (IndexError, ValueError):
        return None


class ProcSampler:
    """Samples process trees from /proc, each at most once per `interval` seconds."""

    def __init__(
        self,
        *,
        interval: float = SAMPLE_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        proc: str = "/proc",
    ) -> None:
        self.interval = interval
        self.clock = clock
        self.proc = proc
        self._latest: dict[int, TreeSample] = {}
        self._previous: dict[int, TreeSample] = {}  # for CPU%: the sample before
        self._children_files: bool | None = None  # does the kernel have them?

    def sample(self, pids: Iterable[int], *, prune: bool = False) -> dict[int, TreeSample]:
        """The trees rooted at `pids` (roots that are gone are left out). With `prune`,
        `pids` are every root there is: forget the samples of any other."""
        now = self.clock()
        wanted = list(pids)
        stale = [
            pid
            for pid in wanted
            if (cached := self._latest.get(pid)) is None or now - cached.at >= self.interval
        ]
        if stale:
            parents = None if self._has_children_files(stale[0]) else self._parent_map()
            for pid in stale:
                tree = self._tree(pid, now, parents)
                if tree is None:
                    self._latest.pop(pid, None)
                    continue
                old = self._latest.get(pid)
                if old is not None:
                    self._previous[pid] = old
                self._latest[pid] = tree
        if prune:
            keep = set(wanted)
            for cache in (self._latest, self._previous):
                for pid in [p for p in cache if p not in keep]:
                    del cache[pid]
        return {pid: self._latest[pid] for pid in wanted if pid in self._latest}

    def previous(self, pid: int) -> TreeSample | None:
        return self._previous.get(pid)

    def forget(self, pid: int) -> None:
        self._latest.pop(pid, None)
        self._previous.pop(pid, None)

    def _has_children_files(self, pid: int) -> bool:
        if self._children_files is None:
            # Probe on supd itself: the file exists (maybe empty) where the kernel has it.
            me = os.getpid()
            self._children_files = os.path.exists(f"{self.proc}/{me}/task/{me}/children")
        return self._children_files

    def _parent_map(self) -> dict[int, list[int]]:
        """Fallback without children files: one pass over /proc for every tree."""
        children: dict[int, list[int]] = {}
        for entry in os.listdir(self.proc):
            if not entry.isdigit():
                continue
            raw = _read(f"{self.proc}/{entry}/stat")
            parsed = None if raw is None else _parse_stat(raw)
            if parsed is not None:
                children.setdefault(parsed[0], []).append(int(entry))
        return children

    def _tree(
        self, root: int, now: float, parents: dict[int, list[int]] | None
    ) -> TreeSample | None:
        proc = self.proc
        ticks = pages = count = 0
        todo = [root]
        seen: set[int] = set()
        while todo:
            pid = todo.pop()
            if pid in seen:  # a reused pid could make a cycle; never loop
                continue
            seen.add(pid)
            raw = _read(f"{proc}/{pid}/stat")
            parsed = None if raw is None else _parse_stat(raw)
            if parsed is None:
                if pid == root:
                    return None
                continue  # exited meanwhile
            _ppid, cpu, rss, threads = parsed
            ticks += cpu
            pages += rss
            count += 1
            if parents is not None:
                todo.extend(parents.get(pid, ()))
                continue
            tids = [str(pid)] if threads == 1 else self._tids(pid)
            for tid in tids:
                listed = _read(f"{proc}/{pid}/task/{tid}/children")
                if listed:
                    todo.extend(int(child) for child in listed.split())
        return TreeSample(now, ticks / _TICKS, pages * _PAGE, count)

    def _tids(self, pid: int) -> list[str]:
        try:
            return os.listdir(f"{self.proc}/{pid}/task")
        except OSError:
            return []


def own_usage() -> tuple[float, int]:
    """supd's own (CPU seconds, resident bytes)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    raw = _read("/proc/self/statm")
    rss = int(raw.split()[1]) * _PAGE if raw else usage.ru_maxrss * 1024
    return usage.ru_utime + usage.ru_stime, rss


# --------------------------------------------------------------------------- counters


NO_COUNTS: Counter[str] = Counter()  # shared and never written to (see ProcessCounters)


def owned(counts: Counter[str]) -> Counter[str]:
    """`counts`, or a new Counter of its own in place of the shared empty one."""
    return Counter() if counts is NO_COUNTS else counts


@dataclass(slots=True)
class ProcessCounters:
    """What one process name has done while this supd runs, across runs and reloads."""

    # The three Counters start as one shared empty Counter, replaced by the process's
    # own at its first count (`owned`): three empty ones per process were 0.25 KiB.
    restarts: Counter[str] = field(default_factory=lambda: NO_COUNTS)
    backoff_cause: str = "exited"  # why the pending automatic restart happens
    started: bool = False  # spawned at least once (a later spawn is a restart)
    cpu_earlier: float = 0.0  # CPU seconds of the runs before the current one
    cpu_pid: int | None = None  # the run the high-water mark belongs to
    cpu_high: float = 0.0
    log_bytes: Counter[str] = field(default_factory=lambda: NO_COUNTS)  # of dropped slots
    log_dropped: Counter[str] = field(default_factory=lambda: NO_COUNTS)
    last_exit: int | None = None  # of the latest exit, kept while the next run runs

    def cpu_seen(self, pid: int, seconds: float) -> None:
        if pid != self.cpu_pid:
            self.cpu_earlier += self.cpu_high
            self.cpu_pid, self.cpu_high = pid, 0.0
        self.cpu_high = max(self.cpu_high, seconds)

    @property
    def cpu_total(self) -> float:
        return self.cpu_earlier + self.cpu_high


class LogCounts(Protocol):
    """A log sink's byte counts (logs.LogSink has both attributes)."""

    bytes_written: int
    dropped_bytes: int


@dataclass(frozen=True, slots=True)
class ProcessView:
    """What a scrape needs of one process: its state machine and its log sinks."""

    process: Process
    stdout: LogCounts | None
    stderr: LogCounts | None


@dataclass(frozen=True, slots=True)
class Usage:
    """One process tree's resource use, as `status -l` shows it."""

    name: str
    pid: int | None
    cpu_seconds: float  # this run's tree, as last sampled
    cpu_percent: float | None  # since the previous sample (the run's average at first)
    rss_bytes: int | None
    processes: int  # in the tree


class Metrics:
    """The daemon's counters and the scrape."""

    def __init__(self, sampler: ProcSampler | None = None) -> None:
        self.sampler = sampler or ProcSampler()
        self.processes: dict[str, ProcessCounters] = {}
        self.requests: Counter[str] = Counter()
        self.reloads = 0
        self.reload_failures = 0
        self.started_wall = time.time()
        # Loop time spent on child exits: from the exit's ready key until what the
        # fleet answered (a restart armed, a state changed) was carried out; and the
        # selector's peeks for exits whose SIGCHLD collapsed (copied in at a scrape).
        self.exits_handled = 0
        self.exit_handling_seconds = 0.0
        self.exit_peeks = 0
        self.exit_peek_seconds = 0.0

    def counters(self, name: str) -> ProcessCounters:
        found = self.processes.get(name)
        if found is None:
            found = self.processes[name] = ProcessCounters()
        return found

    # -- what the daemon reports ------------------------------------------------------

    def exit_handled(self, seconds: float) -> None:
        self.exits_handled += 1
        self.exit_handling_seconds += seconds

    def transitioned(self, change: Transitioned) -> None:
        counters = self.counters(change.name)
        if change.new is State.BACKOFF:
            counters.backoff_cause = "exited" if change.old is State.RUNNING else "failed_start"
        elif change.new is State.STARTING:
            if change.old is State.BACKOFF:
                counters.restarts = owned(counters.restarts)
                counters.restarts[counters.backoff_cause] += 1
            elif counters.started:
                counters.restarts = owned(counters.restarts)
                counters.restarts["requested"] += 1
            counters.started = True

    def child_reaped(self, name: str, pid: int, cpu_seconds: float | None) -> None:
        """`pid` was reaped: its run's last CPU figure (wait4's, from the zombie)."""
        if cpu_seconds is not None:
            self.counters(name).cpu_seen(pid, cpu_seconds)
        self.sampler.forget(pid)

    def exited(self, name: str, exit_code: int | None, exit_signal: int | None) -> None:
        """A run ended: its exit status, 128 + N for signal N (as shells report it)."""
        status = 128 + exit_signal if exit_signal is not None else exit_code
        if status is not None:
            self.counters(name).last_exit = status

    def slot_dropped(self, name: str, stdout: LogCounts, stderr: LogCounts) -> None:
        """A process's log sinks are closed (reload, removal): keep their counts."""
        counters = self.counters(name)
        counters.log_bytes = owned(counters.log_bytes)
        counters.log_dropped = owned(counters.log_dropped)
        for stream, sink in (("stdout", stdout), ("stderr", stderr)):
            counters.log_bytes[stream] += sink.bytes_written
            counters.log_dropped[stream] += sink.dropped_bytes

    # -- sampling -----------------------------------------------------------------------

    def _sample(self, processes: Iterable[Process], *, every: bool) -> dict[int, TreeSample]:
        running = [(p.name, p.pid) for p in processes if p.pid is not None]
        trees = self.sampler.sample((pid for _, pid in running), prune=every)
        for name, pid in running:
            tree = trees.get(pid)
            if tree is not None:
                self.counters(name).cpu_seen(pid, tree.cpu_seconds)
        return trees

    def usage(self, processes: list[Process], now: float) -> list[Usage]:
        trees = self._sample(processes, every=False)
        rows = []
        for process in processes:
            pid = process.pid
            tree = trees.get(pid) if pid is not None else None
            if tree is None:
                rows.append(Usage(process.name, pid, 0.0, None, None, 0))
                continue
            before = self.sampler.previous(pid) if pid is not None else None
            if before is not None and tree.at > before.at:
                spent, elapsed = tree.cpu_seconds - before.cpu_seconds, tree.at - before.at
            else:
                spent, elapsed = tree.cpu_seconds, process.uptime(now)
            percent = round(max(0.0, spent) / elapsed * 100, 1) if elapsed > 0 else 0.0
            rows.append(
                Usage(process.name, pid, tree.cpu_seconds, percent, tree.rss_bytes, tree.processes)
            )
        return rows

    # -- the scrape ---------------------------------------------------------------------

    def render(self, views: list[ProcessView], now: float, wall: float) -> str:
        """The OpenMetrics exposition of every process and of supd itself."""
        trees = self._sample((v.process for v in views), every=True)
        out: list[str] = []
        add = out.append
        labels = [
            f'process="{_escape(v.process.name)}",program="{_escape(v.process.config.name)}"'
            for v in views
        ]
        counters = [self.counters(v.process.name) for v in views]

        _family(out, "supd_process_state", "gauge", "1 for the state the process is in")
        for label, view in zip(labels, views, strict=True):
            current = view.process.state.value
            # 7 lines a process, the bulk of a scrape: plain strings, no enum lookups.
            out.extend(
                [
                    f'supd_process_state{{{label},state="{state}"}} {1 if state == current else 0}'
                    for state in _STATE_NAMES
                ]
            )
        _family(out, "supd_process_up", "gauge", "1 when the process is RUNNING")
        for label, view in zip(labels, views, strict=True):
            add(f"supd_process_up{{{label}}} {1 if view.process.state is State.RUNNING else 0}")
        _family(
            out,
            "supd_process_start_time_seconds",
            "gauge",
            "Unix time of the process's latest spawn",
        )
        for label, view in zip(labels, views, strict=True):
            started = view.process.started_at
            if started is not None:
                add(f"supd_process_start_time_seconds{{{label}}} {wall - (now - started):.3f}")
        _family(
            out,
            "supd_process_restarts",
            "counter",
            "Restarts: automatic after an exit or a failed start, or requested",
        )
        for label, count in zip(labels, counters, strict=True):
            for reason in RESTART_REASONS:
                add(
                    f'supd_process_restarts_total{{{label},reason="{reason}"}} '
                    f"{count.restarts[reason]}"
                )
        _family(
            out,
            "supd_process_last_exit_code",
            "gauge",
            "Exit status of the latest run (128 + N when killed by signal N)",
        )
        for label, count in zip(labels, counters, strict=True):
            if count.last_exit is not None:
                add(f"supd_process_last_exit_code{{{label}}} {count.last_exit}")
        _family(
            out,
            "supd_process_backoff_seconds",
            "gauge",
            "Delay of the pending automatic restart (0 outside BACKOFF)",
        )
        for label, view in zip(labels, views, strict=True):
            process = view.process
            delay = (
                backoff_delay(process.failures, process.config)
                if process.state is State.BACKOFF
                else 0.0
            )
            add(f"supd_process_backoff_seconds{{{label}}} {delay:g}")
        _family(
            out,
            "supd_process_cpu_seconds",
            "counter",
            "CPU time of the process and its descendants, over every run",
        )
        for label, count in zip(labels, counters, strict=True):
            add(f"supd_process_cpu_seconds_total{{{label}}} {count.cpu_total:.2f}")
        _family(
            out,
            "supd_process_resident_memory_bytes",
            "gauge",
            "Resident memory of the process and its descendants",
        )
        for label, view in zip(labels, views, strict=True):
            pid = view.process.pid
            tree = trees.get(pid) if pid is not None else None
            add(f"supd_process_resident_memory_bytes{{{label}}} {tree.rss_bytes if tree else 0}")
        _family(out, "supd_process_log_bytes", "counter", "Output bytes captured, per stream")
        for label, view, count in zip(labels, views, counters, strict=True):
            for stream, sink in (("stdout", view.stdout), ("stderr", view.stderr)):
                total = count.log_bytes[stream] + (sink.bytes_written if sink else 0)
                add(f'supd_process_log_bytes_total{{{label},stream="{stream}"}} {total}')
        _family(
            out,
            "supd_process_log_dropped_bytes",
            "counter",
            "Output bytes that could not be written to the log file (disk full, ...)",
        )
        for label, view, count in zip(labels, views, counters, strict=True):
            for stream, sink in (("stdout", view.stdout), ("stderr", view.stderr)):
                total = count.log_dropped[stream] + (sink.dropped_bytes if sink else 0)
                add(f'supd_process_log_dropped_bytes_total{{{label},stream="{stream}"}} {total}')

        cpu, rss = own_usage()
        _family(out, "supd_up", "gauge", "1: supd is running")
        add("supd_up 1")
        _family(out, "supd", "info", "supd's version")
        add(f'supd_info{{version="{_escape(__version__)}"}} 1')
        _family(out, "supd_start_time_seconds", "gauge", "Unix time supd started")
        add(f"supd_start_time_seconds {self.started_wall:.3f}")
        _family(out, "supd_reloads", "counter", "Config reloads applied")
        add(f"supd_reloads_total {self.reloads}")
        _family(out, "supd_reload_failures", "counter", "Reloads refused (invalid config)")
        add(f"supd_reload_failures_total {self.reload_failures}")
        _family(out, "supd_cpu_seconds", "counter", "CPU time of supd itself")
        add(f"supd_cpu_seconds_total {cpu:.2f}")
        _family(out, "supd_resident_memory_bytes", "gauge", "Resident memory of supd itself")
        add(f"supd_resident_memory_bytes {rss}")
        _family(out, "supd_exits_handled", "counter", "Child exits the loop handled")
        add(f"supd_exits_handled_total {self.exits_handled}")
        _family(
            out,
            "supd_exit_handling_seconds",
            "counter",
            "Loop time from a child's exit event until what it caused was carried out",
        )
        add(f"supd_exit_handling_seconds_total {self.exit_handling_seconds:.6f}")
        _family(out, "supd_exit_peeks", "counter", "Looks for exits whose SIGCHLD collapsed")
        add(f"supd_exit_peeks_total {self.exit_peeks}")
        _family(out, "supd_exit_peek_seconds", "counter", "Loop time those looks took")
        add(f"supd_exit_peek_seconds_total {self.exit_peek_seconds:.6f}")
        _family(out, "supd_control_requests", "counter", "Control requests, per method")
        for method in sorted(self.requests):
            add(
                f'supd_control_requests_total{{method="{_escape(method)}"}} {self.requests[method]}'
            )
        add("# EOF")
        out.append("")
        return "\n".join(out)


def _family(out: list[str], name: str, kind: str, help_text: str) -> None:
    out.append(f"# TYPE {name} {kind}")
    out.append(f"# HELP {name} {help_text}")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
