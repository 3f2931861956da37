"""supd, the daemon: the loop and the effects. The only module with side effects on programs.

Data flow, one direction only:

    kernel fd -> Selector.select() -> ReadyKey(data=tag) -> Daemon._dispatch (one match)
      -> FleetEvent on the queue -> Fleet.handle(event, now) -> [effects]
      -> Daemon._perform (one match: spawn, kill, log sinks, answers)
      -> events the effects cause (a spawn that worked or failed) back on the queue

Everything the daemon waits for is an event from the one selector: child exits
(signalfd, then waitid: see the selector's notes), output pipes, one timerfd for every
process timer (armed for the fleet's next deadline), SIGTERM/SIGINT/SIGHUP/SIGUSR2
(and, as a subreaper, every SIGCHLD) through the signalfd, and the control socket with
its eventfd doorbell. There is no polling and no sleep: with nothing to do the loop
blocks in epoll_wait(-1).

The queue is drained by the loop after every ready key (and after each control command,
so pipelined commands see each other's effects), never from inside a drain: nothing
here calls back into itself. Deciding is the fleet's job (fleet.py); this module owns
the fds: children, pipes, log files, the control server, the timer.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import gc
import heapq
import itertools
import math
import os
import random
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, assert_never

from . import (
    __version__,
    activation,
    cgroups,
    childnotify,
    configcheck,
    daemonlog,
    envfile,
    instancelock,
    linux,
    notify,
    probes,
    reexec,
    sessions,
    spawn,
    status,
)
from .commands import Commands, Snapshot
from .control import ControlServer, Responder, SocketUnusable
from .deaths import TAIL_BYTES, Cause, Death, Ending
from .facts import EXIT_CONFIG, EXIT_OK, ErrorCode, State
from .fleet import (
    Action,
    Adopt,
    Answer,
    Await,
    Boot,
    CancelProbe,
    ChildEvent,
    ClearHistory,
    CreateSlot,
    Died,
    DropSlot,
    Exit,
    Fleet,
    FleetEffect,
    FleetEvent,
    HealthChanged,
    Ignored,
    Kill,
    Outcome,
    Ready,
    ReadyProbeChanged,
    Reload,
    ReloadPlanned,
    RunProbe,
    Shutdown,
    Spawn,
    Submit,
    Tick,
    Transitioned,
    Unawait,
    UpdateSlot,
    reload_diff,
)
from .follow import Followers, Listener
from .httpmetrics import MetricsServer
from .logs import (
    FLUSH_AFTER_S,
    JournalTarget,
    LineSink,
    LogSink,
    PipeReader,
    StreamTarget,
    journal_socket,
)
from .metrics import Metrics, ProcessView
from .process import Exited, Probe, ProbeResult, Process, Spawned, SpawnFailed, Timer
from .protocol import MAX_TAIL_BYTES, Request
from .reloadplan import ReloadPlan, ReloadReport, reload_event, supervisor_changes
from .selector import Event, ReadyKey, Selector
from .settings import (
    JOURNAL,
    ConfigError,
    Program,
    Settings,
    Stream,
    Supervisor,
    dump,
)
from .signals import name as signal_name

# How long a re-exec gives a slow reader of supd's stdout/stderr for what waits.
EXEC_FLUSH_S = 1.0

# [supervisor] keys the control server applies (or, for systemd's socket, cannot).
SOCKET_KEYS = frozenset({"socket", "socket_mode", "socket_group"})

# `supd --reexec-probe`: the new code cannot adopt the state (the old supd carries on).
EXIT_REEXEC_PROBE = 3

T = TypeVar("T")

# Signals the daemon reads through the signalfd.
SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT)
DAEMON_SIGNALS = (*SHUTDOWN_SIGNALS, signal.SIGHUP, signal.SIGUSR2, signal.SIGUSR1)


# How much of a child's stderr to look at for setpriv's own exec failure message.
SETPRIV_MESSAGE_BYTES = 4096

# Output reads per pipe per wake-up: a flooding child cannot starve the others.
MAX_READS_PER_WAKEUP = 8

# How long programs writing to supd's stdout wait for a reader that takes nothing; then
# their lines are dropped (counted) until it reads again.
STREAM_STALL_S = 3.0

# Without cgroups, an exit's leftovers are found in /proc; when that cannot be read (no
# fd left: EMFILE), the exit is reported anyway and the scan is tried again this often.
LEFTOVER_SCAN_RETRY_S = 1.0


# -- registration tags: what a ready key means ------------------------------------------


@dataclass(frozen=True, slots=True)
class SignalTag:
    signum: int


@dataclass(frozen=True, slots=True)
class ChildTag:
    name: str
    pid: int


@dataclass(frozen=True, slots=True)
class ClockTag:
    """The one timer: the fleet's next deadline."""


@dataclass(frozen=True, slots=True)
class ExecReportTag:
    name: str
    pid: int


@dataclass(frozen=True, slots=True)
class WatchdogTag:
    pass


@dataclass(frozen=True, slots=True)
class OutputTag:
    name: str
    stream: str


@dataclass(frozen=True, slots=True)
class ProbeTag:
    """A probe's socket (`serial` tells a probe from a later one of the same process)."""

    name: str
    serial: int


@dataclass(frozen=True, slots=True)
class ProbeChildTag:
    """An exec probe's child."""

    name: str
    pid: int


@dataclass(slots=True, eq=False)
class ProbeRun:
    """The one probe in flight for a process: a socket, or an exec probe's child."""

    probe: Probe
    serial: int
    sock: probes.SocketProbe | None = None
    child: spawn.Child | None = None


@dataclass(frozen=True, slots=True)
class ChildNotifyTag:
    """The socket programs send their sd_notify datagrams to."""


@dataclass(frozen=True, slots=True)
class CgroupTag:
    """A process's cgroup.events changed (EPOLLPRI): is it empty now?"""

    name: str


@dataclass(frozen=True, slots=True)
class OwnLogTag:
    """supd's own log fd is writable again while lines wait for it (see daemonlog)."""


@dataclass(frozen=True, slots=True)
class StreamTag:
    """supd's stdout (children's lines, when not the own log's stream) is writable."""

    fd: int


@dataclass(frozen=True, slots=True)
class FlushTag:
    """The timer of partial lines waiting for their end on a shared stream."""


@dataclass(frozen=True, slots=True)
class CompressTag:
    """A gzip helper: NAME.1 of `sink` (as it was after rotation number `rotation`),
    open in supd as `source_fd` until the helper is done."""

    pid: int
    source: str
    source_fd: int
    temporary: str
    rotation: int


@dataclass(frozen=True, slots=True)
class CheckTag:
    """The config checker child of a reload (configcheck.py): its exit ("exit"), its
    stdout ("output") and its deadline ("deadline")."""

    pid: int
    what: str


Sink = LogSink | LineSink

# The gzip helper, a short-lived child: stdlib only, lowest priority. It reads the
# backup through supd's own fd for it (opened right after the rename, so later
# rotations that move the name cannot make it read another file), writes a temporary
# file, keeps the backup's mtime (rotate_every reads the age of the last rotation from
# it) and exits with the errno of what failed (its stdout and stderr are closed).
GZIP_SCRIPT = """
import gzip, os, shutil, sys
try:
    os.nice(19)
    source, target = sys.argv[1], sys.argv[2]
    with open(source, "rb") as plain, gzip.open(target, "wb", compresslevel=6) as packed:
        shutil.copyfileobj(plain, packed, 1 << 20)
        st = os.fstat(plain.fileno())
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
except OSError as exc:
    os._exit(exc.errno or 1)
except BaseException:
    os._exit(1)
os._exit(0)
"""


# What a child got from `supctl signal` before any: one shared object (frozenset() is
# not a singleton, and 10,000 slots would each hold one).
NO_SIGNALS: frozenset[int] = frozenset()

# `status` of at most this many names asks each pid whether it is stopped.
ASK_EACH_IF_STOPPED = 8


# -- what the daemon holds for one process ------------------------------------------------


@dataclass(slots=True, eq=False)
class Slot:
    """A process's fds: its child, output pipes and log files."""

    name: str
    stdout: Sink
    stderr: Sink
    child: spawn.Child | None = None
    readers: dict[int, PipeReader] = field(default_factory=dict)  # pipe fd -> reader
    exec_error: str | None = None  # the child's report that its exec failed
    probe: ProbeRun | None = None  # the ready or health probe in flight
    matcher: probes.LineMatcher | None = None  # ready = { log = ... } until it matched
    last_output_at: float | None = None  # monotonic: health = { log-silence = ... }
    # supctl signal, this child; a shared empty frozenset until then (a set is 216 bytes)
    operator_signals: frozenset[int] = NO_SIGNALS
    oom_kills_at_spawn: int | None = None  # the cgroup's oom_kill counter then
    written_at_spawn: int = 0  # the death's stream's byte count then: its tail is this run's
    leftovers: str = "kill"  # the program's `leftovers`
    cgroup: cgroups.ProcessCgroup | None = None  # None: the session fallback
    # The main process's end, held back until its cgroup is empty (leftovers = kill):
    # the fleet only learns that a process is gone once all of it is.
    pending_exit: SpawnFailed | Exited | None = None
    cgroup_killed: bool = False  # cgroup.kill sent since the last spawn
    # The process group of this run's last exec probe (its pid), which ran in the
    # cgroup: what of it a cgroup.kill finds is logged as the probe's, not the program's.
    probe_group: int | None = None

    def sink(self, stream: str) -> Sink:
        return self.stdout if stream == "stdout" else self.stderr


class Daemon:
    def __init__(
        self,
        config: Settings,
        *,
        clock: Callable[[], float] = time.monotonic,
        notifier: notify.Notifier | None = None,
    ) -> None:
        self.config = config
        self.notifier = notifier or notify.Notifier.disabled()
        self.clock = clock
        self.log = daemonlog.get_logger()
        # A supervisor spawns children all its life: SIGCHLD stays ours between a last
        # exit and the respawn that follows (no mask churn per respawn).
        self.selector: Selector[Any] = Selector(keep_sigchld=True)
        self.fleet = Fleet(draw=random.random)  # backoff jitter
        # The OOM hook: the oom_kill count of a process's cgroup (memory.events), or
        # None where there is none to read. Cgroup support sets it; until then an
        # unexplained SIGKILL is reported as "possibly OOM", never as a confirmed one.
        self.oom_kills: Callable[[str], int | None] = lambda name: None
        self.queue: deque[FleetEvent] = deque()
        self.slots: dict[str, Slot] = {}
        self.replies: dict[int, Callable[[tuple[Outcome, ...]], None]] = {}
        self._request_ids = 0
        self.followers = Followers(self._refresh_hooks)
        self.commands = Commands(self)
        self.control: ControlServer | None = None
        self.metrics = Metrics()  # counters for the daemon's whole life
        self.metrics_server: MetricsServer | None = None
        # supd's environment as every child starts from it (minus systemd's variables)
        self.base_environment = spawn.child_environment(os.environ)
        self.subreaper = False
        # _reap_orphans' peek stopped at one of our own zombies: orphans may wait behind it.
        self._orphans_hidden = False
        self._sigchld_key: int | None = None  # as a subreaper: every SIGCHLD
        self.cgroup_tree: cgroups.CgroupTree | None = None  # None: the session fallback
        self.journal: sessions.SessionJournal | None = None  # the fallback's record
        # A select's session scan, by leader pid, until each exit takes its share.
        self._scanned_sessions: dict[int, list[sessions.ProcStat]] = {}
        self._spare_fd: int | None = None  # see _with_spare_fd (with cgroups only)
        self.running = False
        self.exit_code = EXIT_OK
        self._clock_fd: int | None = None
        self._armed_for: float | None = None
        self._due_now = False  # a deadline is due already: poll, then tick
        # Re-exec (reexec.py): asked for, and what to tell whoever asked once it failed.
        self._reexec_wanted: list[Callable[[str | None], None]] = []
        self._generation = 1  # 1 + how many re-execs this daemon has been through
        self.systemd: dict[str, str] = {}  # systemd's variables for supd (NOTIFY_SOCKET...)
        self.lock: instancelock.InstanceLock | None = None
        self._probe_serials = 0
        # sd_notify from programs (issue 14): the socket, made once some program asks;
        # pid -> process for crediting (children, and the MAINPID each declared).
        self.child_notify: childnotify.NotifySocket | None = None
        self._notify_owners: dict[int, str] = {}
        self._main_pids: dict[str, int] = {}
        self._notify_strangers: set[int] = set()
        # Partial lines held for a shared stream: (deadline, serial, sink, hold number).
        # Deadlines of output work (partial-line flushes, stalled-stdout checks), on the
        # flush timer: (deadline, serial, what to do then).
        self._partials: list[tuple[float, int, Callable[[], None]]] = []
        # supd's stdout/stderr writers that made no progress for STREAM_STALL_S: their
        # programs are read again and lines that do not fit are dropped, counted.
        self._overflowing: set[int] = set()
        self._partial_serial = itertools.count()
        self._flush_fd: int | None = None
        self._flush_armed_for = math.inf
        self._watched_streams: set[int] = set()
        # Pipes not read while supd's stdout catches up: writer fd -> {(process, pipe fd)}.
        self._paused: dict[int, set[tuple[str, int]]] = {}
        self._journal_warned = False
        # The gzip helpers running: pid -> (its tag, its sink, its selector key).
        self.compressing: dict[int, tuple[CompressTag, LogSink, int]] = {}
        # Reloads: the config checker in flight, the reloads waiting for the next one.
        self._check: configcheck.Check | None = None
        self._reloads_waiting: list[tuple[bool, Callable[[ReloadReport | Exception], None]]] = []
        self._check_timeout = configcheck.timeout(os.environ)
        self._metrics_after_check = False  # adopted: the file's metrics address, once read

    # -- lifecycle --------------------------------------------------------------------

    def setup(self, listen_fd: int | None = None) -> None:
        """Open the control socket, take over the signals, start the autostart programs.

        Raises SocketUnusable (AlreadyRunning when another supd serves the socket).
        """
        settings = self.config.supervisor
        self.control = ControlServer(
            self.selector,
            self,
            path=settings.socket,
            mode=settings.socket_mode,
            group=settings.socket_group,
            listen_fd=listen_fd,
            log=self.log,
        )
        self.control.open()
        # After the socket is ours (no live supd uses it) and before anything starts.
        self._contain()
        self._open_metrics(settings)
        self._open_loop_sources()
        self.running = True
        self._open_child_notify(self.config)
        self.queue.append(Boot(tuple(self.config.programs.values())))
        self._drain()
        self._release_memory()

    def _open_metrics(self, settings: Supervisor) -> None:
        if settings.metrics is not None:
            self.metrics_server = MetricsServer(
                self.selector,
                settings.metrics,
                self._scrape,
                mode=settings.socket_mode,
                group=settings.socket_group,
                log=self.log,
            )
            self.metrics_server.open()

    def _open_loop_sources(self) -> None:
        """Signals, the subreaper, the timers, supd's own log, the watchdog."""
        settings = self.config.supervisor
        if settings.subreaper or os.getpid() == 1:
            linux.set_child_subreaper(True)
            self.subreaper = True
            # Every SIGCHLD, also for orphans no PROCESS key will ever name.
            self._sigchld_key = self.selector.register_signal(
                signal.SIGCHLD, SignalTag(signal.SIGCHLD)
            )
        for signum in DAEMON_SIGNALS:
            self.selector.register_signal(signum, SignalTag(signum))
        # Made now, once: every process timer runs on it, so no stop, restart or
        # shutdown ever needs a new fd (at EMFILE there would be none).
        self._clock_fd = self.selector.register_timer(1, True, ClockTag())
        self._flush_fd = self.selector.register_timer(1, True, FlushTag())
        self._watch_own_log()
        interval = self.notifier.watchdog_interval_ms()
        if interval is not None:
            self.selector.register_timer(interval, False, WatchdogTag())

    def run(self) -> int:
        """The loop: block until something happens, turn it into events, drain the queue."""
        while self.running:
            self._due_now = False
            self._guarded(self._arm_clock)
            # A deadline already due (a 0 s retry): look at what else is ready first,
            # without waiting, then tick; the timerfd is for deadlines still ahead.
            ready = self.selector.select(0 if self._due_now else -1)
            self._guarded(self._scan_sessions_of, ready)
            for key in ready:
                exited = type(key.data) is ChildTag
                started = time.perf_counter() if exited else 0.0
                self._guarded(self._dispatch, key)
                self._guarded(self._drain)
                if exited:  # the exit reaped, told to the fleet, its answer carried out
                    self.metrics.exit_handled(time.perf_counter() - started)
            self._scanned_sessions.clear()  # a share not taken must not outlive its pid
            if not self._due_now and self.running:
                # What this turn handled may have set a deadline that is due at once (an
                # exit with a restart delay of 0): the select above has just served what
                # else was ready, so tick now instead of after one more epoll turn. Still
                # one select between two ticks, so a start that fails at once and is
                # retried at once goes back through the loop each time. (Not once the
                # fleet said Exit: nothing is ticked after the end of a shutdown.)
                self._guarded(self._arm_clock)
            if self._due_now:
                self.queue.append(Tick())
                self._guarded(self._drain)
            if self._reexec_wanted:
                self._guarded(self._reexec)
        return self.exit_code

    def _guarded(self, action: Callable[..., None], *args: Any) -> None:
        """The last line of defence: a bug in handling one event must not take every
        program down with the daemon. Log it loudly and go on with the next one."""
        try:
            action(*args)
        except Exception:
            with contextlib.suppress(Exception):
                self.log.exception("event_failed", action=action.__name__, args=repr(args))

    def close(self) -> None:
        self._cancel_check("supd is exiting")  # answered while the socket is still open
        if self.control is not None:
            self.control.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
        for slot in list(self.slots.values()):
            self._drop_slot(slot)
        if self.cgroup_tree is not None:
            with contextlib.suppress(OSError):
                self.cgroup_tree.teardown()
        if self.journal is not None:
            self.journal.close(remove=not self.journal.live)
        if self._spare_fd is not None:
            os.close(self._spare_fd)
        self._cancel_compressions()
        self.selector.close()
        self.notifier.close()
        if self.child_notify is not None:
            self.child_notify.close()

    # -- ready keys into fleet events ---------------------------------------------------

    def _dispatch(self, key: ReadyKey[Any]) -> None:
        match key.data:
            case ChildTag(name=name, pid=pid):
                self.selector.unregister(key.fd)
                self._child_exited(name, pid)
            case OutputTag(name=name):
                self._output_ready(name, key)
            case ExecReportTag(name=name, pid=pid):
                self._exec_reported(name, pid)
            case ClockTag():
                self._armed_for = None
                self.queue.append(Tick())
            case SignalTag(signum=signum):
                self._signal_received(signum)
            case WatchdogTag():
                self.notifier.watchdog()
            case CgroupTag(name=name):
                self._cgroup_changed(name, woken=True)
            case OwnLogTag():
                daemonlog.flush()
            case ChildNotifyTag():
                self._child_notifications()
            case ProbeTag(name=name, serial=serial):
                self._probe_ready(name, serial)
            case ProbeChildTag(name=name, pid=pid):
                self.selector.unregister(key.fd)
                self._probe_child_exited(name, pid)
            case StreamTag(fd=fd):
                for made in daemonlog.stream_writers():
                    if made.fd == fd:
                        made.flush()
            case FlushTag():
                self._flush_partials()
            case CompressTag() as job:
                self.selector.unregister(key.fd)
                self._compressed(job)
            case CheckTag() as tag:
                self._check_event(tag, key)
            case data if self.control is not None and self.control.owns(data):
                self.control.on_ready(key)
            case data if self.metrics_server is not None and self.metrics_server.owns(data):
                self.metrics_server.on_ready(key)
            case _:
                self.log.warning("unknown_key", fd=key.fd, data=repr(key.data))
        if self._orphans_hidden and key.events & Event.PROCESS:
            # Orphans that died with this child (a killed process group), or meanwhile,
            # were hidden from _reap_orphans' peek behind a zombie of ours (a main
            # process's, a probe's, the checker's...): with one reaped, look again.
            self._reap_orphans()

    def _signal_received(self, signum: int) -> None:
        if signum == signal.SIGCHLD:
            self._reap_orphans()
            return
        self.log.info("signal_received", signal=signal_name(signum))
        if signum in SHUTDOWN_SIGNALS:
            self.shutdown()
        elif signum == signal.SIGHUP:
            self.reload()  # a failure is logged by the reload; nothing changes
        elif signum == signal.SIGUSR2:
            self.reopen_logs()
        elif signum == signal.SIGUSR1:
            self.request_reexec()

    def _child_exited(self, name: str, pid: int) -> None:
        slot = self.slots.get(name)
        if slot is None or slot.child is None or slot.child.pid != pid:
            # Cannot happen by design; if it does, at least leave no zombie behind.
            self.log.warning("unknown_child_exited", process=name, pid=pid, status=spawn.reap(pid))
            return
        child, slot.child = slot.child, None
        self._forget_notify_pids(name, child.pid)
        try:
            self._take_exec_report(slot, child)
            self._drain_output(slot)  # nothing the child wrote is lost to its exit
            for sink in (slot.stdout, slot.stderr):
                if isinstance(sink, LineSink) and not slot.readers:
                    sink.flush_partial()  # its last line, without a newline
        except Exception:  # whatever happens, the exit is reaped and reported
            self.log.exception("output_drain_failed", process=name, pid=pid)
        if slot.cgroup is None and slot.leftovers == "kill":
            # Before the reap: the zombie keeps the pid (and so the session) ours.
            self._kill_session(slot, pid)
        exit_code, exit_signal, core_dumped, cpu_seconds = spawn.reap_status(pid)
        self.metrics.child_reaped(name, pid, cpu_seconds)  # the run's last CPU figure
        self.metrics.exited(name, exit_code, exit_signal)
        if slot.exec_error is None and child.via_setpriv:  # (its tail only then)
            process = self.fleet.processes.get(name)
            redirected = process is not None and process.config.redirect_stderr
            stream = "stdout" if redirected else "stderr"
            slot.exec_error = spawn.setpriv_exec_failure(
                child, exit_code, slot.sink(stream).tail(SETPRIV_MESSAGE_BYTES)
            )
            if slot.exec_error is not None:
                self.log.error("spawn_failed", process=name, pid=pid, error=slot.exec_error)
        if slot.exec_error is not None:
            self._gone_when_empty(slot, SpawnFailed(slot.exec_error, time.time()))
        else:
            # The `exited` log event comes with the fleet's classification (Died).
            ending = self._ending(slot, core_dumped)
            self._gone_when_empty(slot, Exited(exit_code, exit_signal, ending))

    # -- leaving nothing behind (cgroups.py; sessions.py without cgroups) ----------------

    def _contain(self, adopting: bool = False) -> None:
        """Choose cgroups or the session fallback; kill what a dead supd left behind.

        Start-up only, before any program starts: the ports the leftovers hold must be
        free when the programs start again, so the waits here are bounded blocking ones.
        After a re-exec (`adopting`) the same tree and journal are taken over instead:
        what is in them is ours, adopted, not a dead supd's leftovers.
        """
        settings = self.config.supervisor
        keep = {
            name
            for program in self.config.programs.values()
            if program.leftovers == "keep"
            for name in program.process_names()
        }
        journal = sessions.SessionJournal(sessions.journal_path(settings.socket))
        if adopting:
            journal.live = journal.load()  # the sessions of the adopted children
        else:
            self._kill_journal_leftovers(journal)
        reason = 'cgroups = "off"'
        if settings.cgroups == "auto":
            hierarchy = cgroups.detect()
            reason = "no cgroup v2 hierarchy mounted"
            if hierarchy is not None:
                try:
                    instance = os.path.realpath(
                        self.config.path
                    )  # one file, one tree (as the lock)
                    self.cgroup_tree = cgroups.CgroupTree.setup(hierarchy, instance)
                except cgroups.CgroupUnavailable as exc:
                    reason = str(exc)
        tree = self.cgroup_tree
        if tree is None:
            self.log.info("cgroups_unused", reason=reason, fallback="sessions")
            for program in self.config.programs.values():
                for option in program.cgroup_limits():
                    problem = f"{option} is not applied: {reason}"
                    self.log.warning("cgroup_limit_not_set", program=program.name, problem=problem)
            journal.open()
            self.journal = journal
            return
        self.log.info("cgroups_used", root=str(tree.root), controllers=sorted(tree.controllers))
        self._spare_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        if "memory" in tree.controllers:  # an unexplained SIGKILL can be confirmed as OOM
            self.oom_kills = self._cgroup_oom_kills
        if adopting:
            return
        for leftover in tree.kill_leftovers(keep={cgroups.cgroup_name(n) for n in keep}):
            self.log.warning(
                "leftover_killed",
                cgroup=leftover.cgroup,
                pid=leftover.pid,
                command=leftover.command,
            )

    def _kill_journal_leftovers(self, journal: sessions.SessionJournal) -> None:
        """The sessions a dead supd's journal lists: kill what still lives in them."""
        killed: list[int] = []
        for session, start in journal.load().items():
            for member in sessions.kill_session(session, start):
                killed.append(member.pid)
                self.log.warning(
                    "leftover_killed", session=session, pid=member.pid, command=member.command
                )
        if killed and not sessions.wait_gone(killed, timeout=5.0):
            self.log.warning("leftovers_survive", pids=[p for p in killed if sessions.alive(p)])

    def _scan_sessions_of(self, ready: list[ReadyKey[Any]]) -> None:
        """Without cgroups: the leftovers of every exit this select found, with one /proc
        scan for all of them (`_kill_session` takes its share). A scan costs O(processes
        on the host), ~0.1 s at 10,000: one per exit made a shutdown of that many take
        hours. The zombies are not reaped yet, so each session id is still ours."""
        leaders: dict[int, int | None] = {}
        for key in ready:
            if type(key.data) is not ChildTag:
                continue
            slot = self.slots.get(key.data.name)
            pid = key.data.pid
            if slot is None or slot.child is None or slot.child.pid != pid:
                continue
            if slot.cgroup is None and slot.leftovers == "kill":
                with contextlib.suppress(OSError):
                    os.killpg(pid, signal.SIGKILL)
                leaders[pid] = self._session_start(pid)
        if leaders:
            # OSError: no fd for /proc (EMFILE); each exit's _kill_session deals with it.
            with contextlib.suppress(OSError):
                self._scanned_sessions = sessions.kill_sessions(leaders)

    def _session_start(self, pid: int) -> int | None:
        start = self.journal.live.get(pid) if self.journal is not None else None
        if start is None:
            stat = sessions.read_stat(pid)
            start = stat.start_time if stat is not None else None
        return start

    def _kill_session(self, slot: Slot, pid: int) -> None:
        """Without cgroups: the exited leader's process group, then its session's members
        (found by this select's scan, or one /proc scan of its own). Escapes what called
        setsid() again; cgroups catch those."""
        members = self._scanned_sessions.pop(pid, None)
        if members is None:
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)
            start = self._session_start(pid)
            try:
                members = sessions.kill_session(pid, start)
            except OSError as exc:
                # No fd for /proc (EMFILE): the exit must still be reaped and reported
                # (the caller does that next), so the session waits for a later scan.
                self.log.warning("leftovers_unchecked", process=slot.name, pid=pid, error=str(exc))
                self._scan_session_later(slot.name, pid, start)
                return
        self._session_ended(slot.name, pid, members)

    def _session_ended(
        self, name: str, pid: int, members: list[sessions.ProcStat], journal: bool = True
    ) -> None:
        if members:
            pids = [m.pid for m in members]
            self.log.info("leftovers_killed", process=name, pid=pid, pids=pids)
        if journal and self.journal is not None:
            self.journal.ended(pid)

    def _scan_session_later(self, name: str, pid: int, start: int | None) -> None:
        """Kill the session of reaped leader `pid` once /proc can be read. Only with its
        start time known: the pid may be reused by then, and the start time is what
        tells its members from a stranger's (they stay in the journal otherwise)."""
        if start is None:
            return

        def scan() -> None:
            try:
                members = sessions.kill_session(pid, start)
            except OSError:
                self._after(LEFTOVER_SCAN_RETRY_S, scan)
                return
            # The pid may lead a newer session of ours by now: then its entry stays.
            newer = self.journal is not None and self.journal.live.get(pid, start) != start
            self._session_ended(name, pid, members, journal=not newer)

        self._after(LEFTOVER_SCAN_RETRY_S, scan)

    def _gone_when_empty(self, slot: Slot, event: SpawnFailed | Exited) -> None:
        """Report the main process's end once nothing of it is left in its cgroup."""
        cgroup = slot.cgroup
        if self._contained(slot):
            # The fleet learns of the exit only once the cgroup is empty: a probe in
            # flight until then would judge a dead program (a false failure, which
            # would be blamed for the death), and an exec probe is in the cgroup.
            self._end_probe(slot)
        try:
            if not self._contained(slot) or cgroup is None or not cgroup.populated():
                self.queue.append(ChildEvent(slot.name, event))
                return
            self._kill_cgroup(slot, reason="main process exited")
            fd = self._with_spare_fd(cgroup.open_events)
            self.selector.register_handle(fd, Event.PRIORITY, CgroupTag(slot.name))
        except OSError as exc:
            # No fd to watch with (EMFILE) or the cgroup is gone: what is left was sent
            # SIGKILL (or could not be), and the process is reported gone now.
            cgroup_close(cgroup, self.selector)
            self.log.warning("cgroup_wait_failed", process=slot.name, error=exc.strerror)
            self.queue.append(ChildEvent(slot.name, event))
            return
        slot.pending_exit = event
        self._cgroup_changed(slot.name)  # emptied already? (the read re-arms the event)

    def _cgroup_changed(self, name: str, woken: bool = False) -> None:
        """Empty yet? Asked once right after the kill, then on each EPOLLPRI wake-up."""
        slot = self.slots.get(name)
        cgroup = slot.cgroup if slot is not None else None
        if slot is None or cgroup is None or cgroup.events_fd is None:
            return
        populated = cgroup.populated()
        if woken:
            self.log.debug("cgroup_events", process=name, populated=populated)
        if populated:
            return  # wait for the next change
        cgroup_close(cgroup, self.selector)
        event, slot.pending_exit = slot.pending_exit, None
        if event is not None:
            self.log.info("cgroup_empty", process=name, woken=woken)
            self.queue.append(ChildEvent(name, event))

    def _with_spare_fd(self, opener: Callable[[], T]) -> T:
        """Open something even at EMFILE: one fd is held in reserve for that (the kill of
        a stop, the watch of its end), given up for the call and taken back after."""
        try:
            return opener()
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE) or self._spare_fd is None:
                raise
        os.close(self._spare_fd)
        self._spare_fd = None
        try:
            return opener()
        finally:
            with contextlib.suppress(OSError):
                self._spare_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)

    def _cgroup_oom_kills(self, name: str) -> int | None:
        slot = self.slots.get(name)
        return slot.cgroup.oom_kills() if slot is not None and slot.cgroup is not None else None

    @staticmethod
    def _contained(slot: Slot) -> bool:
        """Whether this process's end means its whole cgroup's (leftovers = kill)."""
        return slot.cgroup is not None and slot.leftovers == "kill"

    def _kill_cgroup(self, slot: Slot, reason: str) -> None:
        assert slot.cgroup is not None
        cgroup = slot.cgroup
        found: list[int] | None = None
        with contextlib.suppress(OSError):  # for the log only (at EMFILE, none)
            found = cgroup.pids()
        # An exec probe's, dying: not the program's leftovers.
        probe_pids = _members_of(slot.probe_group, found or [])
        pids = "?" if found is None else [pid for pid in found if pid not in probe_pids]
        self._with_spare_fd(cgroup.kill)
        slot.cgroup_killed = True
        if probe_pids:
            self.log.info(
                "cgroup_killed", process=slot.name, pids=pids, probe_pids=probe_pids, reason=reason
            )
        else:
            self.log.info("cgroup_killed", process=slot.name, pids=pids, reason=reason)

    def _open_cgroup(self, slot: Slot, program: Program) -> None:
        """The process's cgroup, its events fd (paused until a wait), and its limits."""
        tree = self.cgroup_tree
        if tree is None:
            return
        try:
            cgroup = tree.process(slot.name)
        except OSError as exc:
            self.log.error("cgroup_failed", process=slot.name, error=exc.strerror or str(exc))
            return
        slot.cgroup = cgroup
        for problem in cgroup.set_limits(program.cgroup_limits()):
            self.log.warning("cgroup_limit_not_set", process=slot.name, problem=problem)

    def _renew_cgroup(self, slot: Slot, program: Program) -> None:
        """A fresh cgroup for the next run of a process whose cgroup was killed.

        Linux (seen on 6.18) SIGKILLs every child later born into a cgroup that once got
        `cgroup.kill` through clone3's CLONE_INTO_CGROUP: the fork compares the target's
        kill count with the parent's. A new cgroup has never been killed. The old one is
        empty by now (a run starts only once the previous one's cgroup emptied).
        """
        try:
            self._close_cgroup(slot)
        except OSError as exc:  # (not EBUSY: that one returns False)
            self.log.error("cgroup_failed", process=slot.name, error=exc.strerror or str(exc))
        slot.cgroup_killed = False
        self._open_cgroup(slot, program)

    def _close_cgroup(self, slot: Slot) -> None:
        cgroup, slot.cgroup = slot.cgroup, None
        if cgroup is None:
            return
        cgroup_close(cgroup, self.selector)
        if not cgroup.remove():  # leftovers = keep: they stay, in it
            self.log.info("cgroup_kept", process=slot.name, pids=cgroup.pids())

    def survivors(self, name: str) -> list[sessions.ProcStat] | None:
        """What SIGKILL did not end (D state...), for `status`; None: nothing was killed."""
        slot = self.slots.get(name)
        if slot is None or not slot.cgroup_killed or slot.cgroup is None:
            return None
        found = [sessions.read_stat(pid) for pid in slot.cgroup.pids()]
        return [stat for stat in found if stat is not None]

    def _ending(self, slot: Slot, core_dumped: bool) -> Ending:
        """What the death record needs besides the exit status."""
        process = self.fleet.processes.get(slot.name)
        redirected = process is not None and process.config.redirect_stderr
        sink = slot.sink("stdout" if redirected else "stderr")
        tail = sink.tail(min(TAIL_BYTES, max(0, sink.bytes_written - slot.written_at_spawn)))
        oom = None
        if slot.oom_kills_at_spawn is not None:
            now = self.oom_kills(slot.name)
            oom = now is not None and now > slot.oom_kills_at_spawn
        return Ending(
            wall=time.time(),
            core_dumped=core_dumped,
            operator_signals=frozenset(slot.operator_signals),
            oom_killed=oom,
            tail=tail.decode(errors="replace"),
        )

    def _exec_reported(self, name: str, pid: int) -> None:
        """The child's exec report: end of file if exec worked, else why it failed."""
        slot = self.slots.get(name)
        if slot is not None and slot.child is not None and slot.child.pid == pid:
            self._take_exec_report(slot, slot.child)

    def _take_exec_report(self, slot: Slot, child: spawn.Child) -> None:
        if child.exec_error_fd is None:
            return
        self.selector.unregister(child.exec_error_fd)
        error = child.read_exec_error()
        if error is not None:
            slot.exec_error = error
            self.log.error("spawn_failed", process=slot.name, pid=child.pid, error=error)

    def _watch_own_log(self) -> None:
        """Flush supd's own buffered log lines when its stderr becomes writable."""
        fd = daemonlog.pollable_fd()
        if fd is None:
            return
        self.selector.register_handle(fd, Event(0), OwnLogTag())  # paused until needed
        daemonlog.watch(lambda waiting: self._writer_waiting(fd, fd, waiting))

    def _reap_orphans(self) -> None:
        """Reap adopted orphans (we are a subreaper or PID 1) without touching our own.

        waitid(P_ALL, WNOWAIT) only peeks at one exited child. An orphan is reaped at
        once; one of our programs is left alone (its PROCESS event is queued and its
        owner reaps it, keeping the exact exit status), and since the peek would keep
        naming it, the remaining orphans wait until that child's exit is dispatched
        (which looks again, whatever the child was).
        """
        self._orphans_hidden = False
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None:
                return
            if self.selector.watches_pid(info.si_pid):  # one of ours: O(1), not O(slots)
                self._orphans_hidden = True
                return
            with contextlib.suppress(ChildProcessError):
                os.waitpid(info.si_pid, 0)
            self.log.debug("orphan_reaped", pid=info.si_pid, status=info.si_status)

    # -- the fleet and its effects ------------------------------------------------------

    def _drain(self) -> None:
        """Hand every queued event to the fleet and carry out what it decides."""
        while self.queue:
            event = self.queue.popleft()
            try:
                effects = self.fleet.handle(event, self.clock())
            except Exception as exc:
                self._event_failed(event, exc)
                continue
            self._perform(effects)

    def _event_failed(self, event: FleetEvent, exc: Exception) -> None:
        """A bug in the fleet: log it, answer the request that met it, go on."""
        with contextlib.suppress(Exception):
            self.log.exception("event_failed", fleet_event=repr(event))
        if isinstance(event, Submit):
            reply = self.replies.pop(event.request, None)
            if reply is not None:
                error, code = f"internal error: {exc}", ErrorCode.INTERNAL_ERROR
                reply(tuple(Outcome(name, False, None, error, code) for name in event.names))

    def _perform(self, effects: list[FleetEffect]) -> None:
        for effect in effects:
            try:
                self._perform_one(effect)
            except Exception:  # one failed effect must not cost the others
                with contextlib.suppress(Exception):
                    self.log.exception("effect_failed", effect=repr(effect))

    def _perform_one(self, effect: FleetEffect) -> None:
        """The only place where the fleet's decisions become side effects."""
        match effect:
            case Spawn(name=name, program=program):
                self._spawn(name, program)
            case Kill(name=name, signum=signum, group=group):
                self._kill(name, signum, group)
            case Transitioned():
                self.metrics.transitioned(effect)
                self._log_transition(effect)
            case Ignored(name=name, state=state, event=event):
                self.log.debug(
                    "event_ignored", process=name, state=state.value, ignored=repr(event)
                )
            case CreateSlot(name=name, program=program):
                self.slots[name] = Slot(
                    name,
                    self._sink(program, name, "stdout"),
                    self._sink(program, name, "stderr"),
                    leftovers=program.leftovers,
                )
                self._open_cgroup(self.slots[name], program)
            case DropSlot(name=name):
                slot = self.slots.get(name)
                if slot is not None:
                    self._drop_slot(slot)
            case Answer(request=request, outcomes=outcomes):
                reply = self.replies.pop(request, None)
                if reply is not None:
                    reply(outcomes)
            case Ready():
                self.notifier.ready(self.status_line())
                self.log.info("ready", status=self.status_line())
            case Exit():
                self.running = False
            case RunProbe(name=name, program=program, probe=probe):
                self._run_probe(name, program, probe)
            case CancelProbe(name=name):
                slot = self.slots.get(name)
                if slot is not None:
                    self._end_probe(slot)
            case HealthChanged(name=name, healthy=healthy, message=message):
                level = self.log.info if healthy else self.log.warning
                level("health_changed", process=name, healthy=healthy, message=message)
                if self.notifier.enabled:
                    self.notifier.status(self.status_line())
            case Died(name=name, death=death):
                self._log_death(name, death)
            case UpdateSlot(name=name, program=program):
                self._update_slot(name, program)
            case ReadyProbeChanged(name=name):
                slot = self.slots.get(name)
                process = self.fleet.processes.get(name)
                if slot is not None and process is not None:
                    self._watch_ready_line(slot, process)
            case ReloadPlanned():
                pass  # reported by reload(), which made it
            case _:
                assert_never(effect)

    def _spawn(self, name: str, program: Program) -> None:
        slot = self.slots[name]
        env = {
            **self.base_environment,
            **program.environment,
            "SUPD_PROCESS_NAME": name,
            "SUPD_PROGRAM": program.name,
        }
        if self.child_notify is not None and program.wants_notify_socket:
            env["NOTIFY_SOCKET"] = self.child_notify.address
            if program.watchdog_sec is not None:
                env["WATCHDOG_USEC"] = str(round(program.watchdog_sec * 1_000_000))
        if program.env_files:  # read at each start: a file changed since is seen now
            try:
                from_files = envfile.load(program.env_files)
            except envfile.EnvFileError as exc:
                self.log.error("spawn_failed", process=name, error=str(exc))
                self.queue.append(ChildEvent(name, SpawnFailed(str(exc), time.time())))
                return
            # systemd's rule: the files override the configured environment.
            env = {**env, **from_files, "SUPD_PROCESS_NAME": name, "SUPD_PROGRAM": program.name}
        if slot.cgroup is not None and slot.cgroup_killed:
            self._renew_cgroup(slot, program)
        cgroup_fd: int | None = None
        try:
            if slot.cgroup is not None:
                cgroup_fd = slot.cgroup.open_dir()
            spec = spawn.SpawnSpec(
                argv=program.command,
                environment=env,
                directory=program.directory,
                user=program.user,
                group=program.group,
                umask=program.umask,
                redirect_stderr=program.redirect_stderr,
                configured_environment=frozenset(program.environment),
                cgroup_fd=cgroup_fd,
            )
            child = spawn.spawn(spec)
        except (spawn.SpawnError, OSError) as exc:
            self.log.error("spawn_failed", process=name, error=str(exc))
            self.queue.append(ChildEvent(name, SpawnFailed(str(exc), time.time())))
            return
        except Exception as exc:  # a bug of ours: the process must still get a state
            self.log.exception("spawn_failed", process=name, error=repr(exc))
            reason = f"internal error: {type(exc).__name__}: {exc}"
            self.queue.append(ChildEvent(name, SpawnFailed(reason, time.time())))
            return
        finally:
            if cgroup_fd is not None:
                os.close(cgroup_fd)
        slot.child = child
        slot.exec_error = None
        self._notify_owners[child.pid] = name
        for sink in (slot.stdout, slot.stderr):
            if isinstance(sink, LineSink) and isinstance(sink.target, JournalTarget):
                sink.target.pid = child.pid
        slot.operator_signals = NO_SIGNALS
        slot.oom_kills_at_spawn = self.oom_kills(name)
        slot.written_at_spawn = slot.sink(
            "stdout" if program.redirect_stderr else "stderr"
        ).bytes_written
        slot.cgroup_killed = False
        slot.probe_group = None
        if self.journal is not None and slot.leftovers == "kill":
            self.journal.started(child.pid)
        self.selector.register_process(child.pid, ChildTag(name, child.pid))
        if child.exec_error_fd is not None:
            tag = ExecReportTag(name, child.pid)
            self.selector.register_handle(child.exec_error_fd, Event.READ, tag)
        ready = program.ready
        slot.matcher = None
        if ready is not None and ready.kind == "log":
            slot.matcher = probes.LineMatcher(ready.log_pattern)
        for stream, fd in (("stdout", child.stdout_fd), ("stderr", child.stderr_fd)):
            if fd is not None:
                hook = self._output_hook(name, stream)
                slot.readers[fd] = PipeReader(fd, slot.sink(stream), hook)
                self.selector.register_handle(fd, Event.READ, OutputTag(name, stream))
        self.log.info("spawned", process=name, pid=child.pid)
        self.queue.append(ChildEvent(name, Spawned(child.pid)))

    def _kill(self, name: str, signum: int, group: bool) -> None:
        """The fleet's stop signal, or its SIGKILL escalation, which with a cgroup (and
        leftovers = kill) reaches everything in it, whatever session it made."""
        slot = self.slots.get(name)
        if signum == signal.SIGKILL and slot is not None and self._contained(slot):
            try:
                self._kill_cgroup(slot, reason="SIGKILL")
                return
            except OSError as exc:  # the cgroup is gone, or no fd even with the spare
                self.log.error("cgroup_kill_failed", process=name, error=exc.strerror)
        self._signal(name, signum, group)

    def _signal(self, name: str, signum: int, group: bool) -> bool:
        """Send `signum` to a process (or its group); False if it is not running."""
        slot = self.slots.get(name)
        if slot is None or slot.child is None:
            return False
        sent = spawn.send_signal(slot.child.pid, signum, group)
        self.log.info(
            "signal_sent", process=name, pid=slot.child.pid, signal=signal_name(signum), sent=sent
        )
        return sent

    def _log_transition(self, change: Transitioned) -> None:
        name, pid = change.name, change.pid
        self.log.info(
            "state_changed",
            process=name,
            pid=pid,
            from_state=change.old.value,
            to_state=change.new.value,
            reason=change.reason,
        )
        if change.new is State.BACKOFF and change.delay_s:  # (none for an immediate retry)
            delay = round(change.delay_s, 3)
            self.log.info("backoff", process=name, pid=pid, delay_s=delay, failures=change.failures)
        elif change.new is State.FATAL:
            self.log.error("fatal", process=name, pid=pid, reason=change.reason)
        elif change.new is State.STOPPED and change.old is State.STOPPING:
            self.log.info("stopped", process=name, pid=pid, reason=change.reason)
        if self.notifier.enabled:
            self.notifier.status(self.status_line())

    def _log_death(self, name: str, death: Death) -> None:
        """The `exited` event, with the cause supd found (a spawn error has its own)."""
        if death.pid is None or death.cause is Cause.SPAWN_ERROR:
            return
        self.log.info(
            "exited",
            process=name,
            pid=death.pid,
            exit_code=death.exit_code,
            signal=signal_name(death.exit_signal) if death.exit_signal is not None else None,
            core_dumped=death.core_dumped,
            cause=death.cause.value,
            why=death.summary,
            sender=death.sender,
            uptime_s=None if death.uptime is None else round(death.uptime, 3),
        )

    def _arm_clock(self) -> None:
        """Point the one timer at the fleet's next deadline, or note that it is due now."""
        deadline = self.fleet.next_deadline()
        if deadline is not None and deadline <= self.clock():
            self._due_now = True
            return
        if deadline == self._armed_for or self._clock_fd is None:
            return
        if deadline is None:
            linux.timerfd_settime_ns(self._clock_fd, initial=0)  # disarm: idle means idle
        else:
            delay_ms = max(0, math.ceil((deadline - self.clock()) * 1000))
            self.selector.rearm_timer(self._clock_fd, delay_ms, True)
        self._armed_for = deadline

    # -- output -----------------------------------------------------------------------

    def _output_ready(self, name: str, key: ReadyKey[Any]) -> None:
        slot = self.slots.get(name)
        reader = slot.readers.get(key.fd) if slot is not None else None
        if slot is None or reader is None:
            return
        slot.last_output_at = self.clock()
        reads = MAX_READS_PER_WAKEUP
        sink = reader.sink
        if isinstance(sink, LineSink) and isinstance(sink.target, StreamTarget):
            writer = sink.target.writer
            stalled = isinstance(writer, daemonlog.LogWriter) and writer.fd in self._overflowing
            if isinstance(writer, daemonlog.LogWriter) and writer.pending and not stalled:
                # supd's stdout is slower than its programs: leave their output in their
                # pipes (they wait, as on a slow terminal) until it has taken what waits.
                self.selector.update_handle(key.fd, Event(0))
                paused = self._paused.setdefault(writer.fd, set())
                if not paused:
                    self._watch_for_stall(writer, writer.written)
                paused.add((name, key.fd))
                return
            if isinstance(writer, daemonlog.LogWriter) and writer.pollable:
                reads = 1  # one read's worth at a time, so what waits stays small
        if reader.pump(reads):
            self._close_reader(slot, key.fd)
            if not slot.readers and slot.child is not None:
                # Usually the child's exit: asked now, in case its SIGCHLD collapsed
                # into another's and the selector's next peek is a while off.
                self.selector.hint_exit(slot.child.pid)

    def _watch_for_stall(self, writer: daemonlog.LogWriter, mark: int) -> None:
        """In STREAM_STALL_S, if supd's stdout took nothing meanwhile, stop waiting for
        it: its programs must not hang on a reader that is gone for good."""

        def check() -> None:
            if writer.fd not in self._paused or writer.fd in self._overflowing:
                return
            if writer.written != mark:
                self._watch_for_stall(writer, writer.written)  # slow, but moving
                return
            self._overflowing.add(writer.fd)
            self.log.warning("log_stream_stalled", fd=writer.fd, waited_s=STREAM_STALL_S)
            self._resume_readers(writer.fd)

        self._after(STREAM_STALL_S, check)

    def _resume_readers(self, writer_fd: int) -> None:
        """supd's stdout took what waited: read the pipes paused for it again."""
        for name, fd in self._paused.pop(writer_fd, ()):
            slot = self.slots.get(name)
            if slot is not None and fd in slot.readers:
                self.selector.update_handle(fd, Event.READ)

    def _writer_waiting(self, fd: int, writer_fd: int, waiting: bool) -> None:
        self.selector.update_handle(fd, Event.WRITE if waiting else Event(0))
        if not waiting:
            if writer_fd in self._overflowing:
                self._overflowing.discard(writer_fd)
                self.log.info("log_stream_recovered", fd=writer_fd)
            self._resume_readers(writer_fd)

    def _drain_output(self, slot: Slot) -> None:
        for fd, reader in list(slot.readers.items()):
            if reader.drain():
                self._close_reader(slot, fd)

    def _close_reader(self, slot: Slot, fd: int) -> None:
        for paused in self._paused.values():
            paused.discard((slot.name, fd))
        del slot.readers[fd]
        self.selector.unregister(fd)
        os.close(fd)

    def _refresh_hooks(self, name: str, stream: str) -> None:
        """A stream gained its first follower or lost its last: (un)hook its reader."""
        slot = self.slots.get(name)
        if slot is None:
            return
        sink = slot.sink(stream)
        for reader in slot.readers.values():
            if reader.sink is sink:
                reader.on_data = self._output_hook(name, stream)

    def _sink(self, program: Program, name: str, stream: Stream) -> Sink:
        destination = program.log_destination(name, stream)
        if isinstance(destination, int):
            writer = daemonlog.stream_writer(destination)
            if writer is not None:
                self._watch_stream(writer)
                sink = LineSink(
                    StreamTarget(writer),
                    program.prefix(name, stream).encode(),
                    f"/dev/{'stdout' if destination == 1 else 'stderr'}",
                    timestamps=program.log_timestamps,
                )
                sink.on_partial = self._partial_held
                return sink
            self.log.warning("log_stream_unavailable", process=name, fd=destination)
            destination = None
        if destination == JOURNAL:
            path = self.config.supervisor.journal_socket
            sock = journal_socket(path)
            if sock is not None:
                priority = 6 if stream == "stdout" else 3
                target = JournalTarget(sock, path, program.name, name, priority)
                sink = LineSink(target, b"", "journal")
                sink.on_partial = self._partial_held
                return sink
            if not self._journal_warned:
                self._journal_warned = True
                self.log.warning("journal_unavailable", socket=str(path), fallback="log files")
            suffix = "out" if stream == "stdout" else "err"
            destination = self.config.supervisor.log_dir / f"{name}.{suffix}.log"
        assert destination is None or isinstance(destination, Path)
        file_sink = LogSink(
            destination,
            program.log_maxbytes(stream),
            program.log_backups(stream),
            timestamps=program.log_timestamps,
            rotate_every=program.rotate_every,
            max_total_size=program.max_total_size,
            compress=program.compress,
        )
        if file_sink.compress:  # (a bound method per sink otherwise: 10,000s of them)
            file_sink.on_rotated = self._compress
        return file_sink

    def _watch_stream(self, writer: daemonlog.LogWriter) -> None:
        """Flush children's lines waiting for supd's stdout when it becomes writable."""
        if writer is daemonlog.writer() or not writer.pollable:
            return
        fd = writer.fd
        if fd in self._watched_streams:
            return
        self._watched_streams.add(fd)
        self.selector.register_handle(fd, Event(0), StreamTag(fd))
        writer.watch(lambda waiting: self._writer_waiting(fd, fd, waiting))

    # -- partial lines on shared streams: flushed after FLUSH_AFTER_S ------------------

    def _partial_held(self, sink: LineSink) -> None:
        holds = sink.holds

        def flush() -> None:
            if sink.holds == holds:  # still the partial line it was armed for
                sink.flush_partial()

        self._after(FLUSH_AFTER_S, flush)

    def _after(self, delay_s: float, action: Callable[[], None]) -> None:
        deadline = self.clock() + delay_s
        heapq.heappush(self._partials, (deadline, next(self._partial_serial), action))
        self._arm_flush()

    def _arm_flush(self) -> None:
        if self._flush_fd is None:
            return
        deadline = self._partials[0][0] if self._partials else math.inf
        if deadline == self._flush_armed_for:
            return
        self._flush_armed_for = deadline
        if deadline == math.inf:
            linux.timerfd_settime_ns(self._flush_fd, initial=0)
            return
        delay_ms = max(1, math.ceil((deadline - self.clock()) * 1000))
        self.selector.rearm_timer(self._flush_fd, delay_ms, True)

    def _flush_partials(self) -> None:
        self._flush_armed_for = math.inf
        now = self.clock()
        while self._partials and self._partials[0][0] <= now:
            _deadline, _serial, action = heapq.heappop(self._partials)
            action()
        self._arm_flush()

    # -- compression of rotated backups, in a helper child ------------------------------

    def _compress(self, sink: LogSink) -> None:
        """gzip the NAME.1 `sink` just made, off the loop, in a low-priority child."""
        assert sink.path is not None
        source = sink.path.with_name(f"{sink.path.name}.1")
        temporary = sink.path.with_name(f".{sink.path.name}.{sink.rotations}.gz-partial")
        try:
            source_fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            self.log.warning("log_compress_failed", path=str(source), error=str(exc))
            return
        spec = spawn.SpawnSpec(
            argv=(
                sys.executable, "-I", "-c", GZIP_SCRIPT,
                f"/proc/{os.getpid()}/fd/{source_fd}", str(temporary),
            ),
            environment=self.base_environment,
            redirect_stderr=True,
        )  # fmt: skip
        try:
            child = spawn.spawn(spec)
        except (spawn.SpawnError, OSError) as exc:
            os.close(source_fd)
            self.log.warning("log_compress_failed", path=str(source), error=str(exc))
            return
        for fd in (child.stdout_fd, child.stderr_fd, child.exec_error_fd):
            if fd is not None:
                os.close(fd)
        job = CompressTag(child.pid, str(source), source_fd, str(temporary), sink.rotations)
        key = self.selector.register_process(child.pid, job)
        self.compressing[child.pid] = (job, sink, key)
        self.log.debug("log_compress_started", path=str(source), pid=child.pid)

    def _cancel_compressions(self) -> None:
        """Exit or re-exec: end the gzip helpers (the new image would not know them: no
        reap, a zombie) and drop their partial results; the plain backups stay."""
        for pid, (job, _sink, key) in list(self.compressing.items()):
            self.selector.unregister(key)  # (if the exec fails, no stale event comes)
            spawn.send_signal(pid, signal.SIGKILL, False)
            spawn.reap(pid)
            os.close(job.source_fd)
            with contextlib.suppress(OSError):
                os.unlink(job.temporary)
        self.compressing.clear()

    def _compressed(self, job: CompressTag) -> None:
        """The helper is done: put NAME.N.gz where NAME.N now is (later rotations moved it
        on), then drop the plain copy. Renames only: cheap enough for the loop."""
        _job, sink, _key = self.compressing.pop(job.pid)
        exit_code, exit_signal = spawn.reap(job.pid)
        assert sink.path is not None
        number = 1 + sink.rotations - job.rotation
        source = sink.path.with_name(f"{sink.path.name}.{number}")
        try:
            compressed = os.fstat(job.source_fd)
            current = os.stat(source)
            same = (compressed.st_dev, compressed.st_ino) == (current.st_dev, current.st_ino)
        except OSError:
            same = False  # deleted since (retention): nothing to replace
        finally:
            os.close(job.source_fd)
        if exit_code != 0 or not same:
            with contextlib.suppress(OSError):
                os.unlink(job.temporary)
            if exit_code != 0:
                error = os.strerror(exit_code) if exit_code else None
                self.log.warning(
                    "log_compress_failed", path=str(source), exit_code=exit_code, error=error,
                    signal=signal_name(exit_signal) if exit_signal is not None else None,
                )  # fmt: skip
            return
        try:
            os.rename(job.temporary, source.with_name(source.name + ".gz"))
            os.unlink(source)
        except OSError as exc:
            self.log.warning("log_compress_failed", path=str(source), error=str(exc))
            return
        sink.enforce_total_size()
        self.log.info("log_compressed", path=f"{source}.gz")

    def _drop_slot(self, slot: Slot) -> None:
        self._end_probe(slot)
        self._drain_output(slot)
        for fd in list(slot.readers):
            self._close_reader(slot, fd)
        slot.stdout.close()
        slot.stderr.close()
        self._close_cgroup(slot)
        self.metrics.slot_dropped(slot.name, slot.stdout, slot.stderr)
        self.slots.pop(slot.name, None)

    def _update_slot(self, name: str, program: Program) -> None:
        """A reload changed a process's log settings: new sinks, the pipes kept."""
        slot = self.slots.get(name)
        if slot is None:
            return
        old = {"stdout": slot.stdout, "stderr": slot.stderr}
        slot.stdout = self._sink(program, name, "stdout")
        slot.stderr = self._sink(program, name, "stderr")
        for reader in slot.readers.values():
            for stream, sink in old.items():
                if reader.sink is sink:
                    reader.sink = slot.sink(stream)
        for sink in old.values():
            sink.close()

    # -- readiness and health probes (issue 14) ------------------------------------------

    def _output_hook(self, name: str, stream: str) -> Callable[[bytes], None] | None:
        """What sees a stream's bytes besides its log: `tail -f` followers, and the
        ready line matcher until it matched (then no hook costs anything again)."""
        follow = self.followers.hook(name, stream)
        slot = self.slots.get(name)
        if slot is None or slot.matcher is None:
            return follow

        def scan(data: bytes) -> None:
            if follow is not None:
                follow(data)
            matcher = slot.matcher
            if matcher is None:
                return
            line = matcher.feed(data)
            if line is not None:
                slot.matcher = None
                self._refresh_hooks(name, "stdout")
                self._refresh_hooks(name, "stderr")
                self.queue.append(ChildEvent(name, ProbeResult(Probe.READY, True, line)))

        return scan

    def _watch_ready_line(self, slot: Slot, process: Process) -> None:
        """Scan the output for a `log` ready probe's line while the process waits for
        it: set after a re-exec (the matcher of the old image is gone) and after a
        reload that changed the probe; the readers' hooks follow."""
        ready = process.config.ready
        waits = (
            process.state is State.STARTING
            and process.pid is not None
            and not process.ready
            and ready is not None
            and ready.kind == "log"
        )
        if not waits or ready is None:
            slot.matcher = None
        elif slot.matcher is None or slot.matcher.pattern != ready.log_pattern:
            slot.matcher = probes.LineMatcher(ready.log_pattern)
        self._refresh_hooks(slot.name, "stdout")
        self._refresh_hooks(slot.name, "stderr")

    def _run_probe(self, name: str, program: Program, probe: Probe) -> None:
        slot = self.slots.get(name)
        config = program.ready if probe is Probe.READY else program.health
        if slot is None or config is None:
            return
        self._end_probe(slot)
        if slot.pending_exit is not None:
            # The main process is gone; its end waits for the cgroup to empty, and the
            # fleet learns of it next: nothing to probe (a verdict would be false).
            self.log.debug("probe_skipped", process=name, probe=probe.value)
            return
        self._probe_serials += 1
        run = ProbeRun(probe, self._probe_serials)
        kind = config.kind
        if kind == "file":
            verdict = probes.file_verdict((program.ready.file if program.ready else None) or "")
            self.queue.append(ChildEvent(name, ProbeResult(probe, verdict.ok, verdict.message)))
            return
        if kind == "log_silence":
            self._log_silence_verdict(name, slot, program, probe)
            return
        if kind == "exec":
            self._run_exec_probe(name, slot, run, program, config.exec or ())
            return
        try:
            sock: probes.SocketProbe = (
                probes.TcpProbe(config.tcp or "")
                if kind == "tcp"
                else probes.HttpProbe(config.http or "")
            )
        except OSError as exc:  # EMFILE, say: a failed check, never a daemon error
            self.queue.append(ChildEvent(name, ProbeResult(probe, False, f"probe: {exc}")))
            return
        if sock.verdict is not None:
            sock.close()
            verdict = sock.verdict
            self.queue.append(ChildEvent(name, ProbeResult(probe, verdict.ok, verdict.message)))
            return
        run.sock = sock
        slot.probe = run
        events = Event.WRITE if sock.wants_write else Event.READ
        self.selector.register_handle(sock.fd, events, ProbeTag(name, run.serial))

    def _probe_ready(self, name: str, serial: int) -> None:
        slot = self.slots.get(name)
        run = slot.probe if slot is not None else None
        if slot is None or run is None or run.serial != serial or run.sock is None:
            return
        sock = run.sock
        wanted_write = sock.wants_write
        try:
            verdict = sock.on_ready()
        except OSError as exc:
            verdict = probes.Verdict(False, f"{sock.what}: {exc}")
        if verdict is None:
            if sock.wants_write != wanted_write:
                events = Event.WRITE if sock.wants_write else Event.READ
                self.selector.update_handle(sock.fd, events)
            return
        self._end_probe(slot)
        self.queue.append(ChildEvent(name, ProbeResult(run.probe, verdict.ok, verdict.message)))

    def _run_exec_probe(
        self, name: str, slot: Slot, run: ProbeRun, program: Program, argv: tuple[str, ...]
    ) -> None:
        """Spawned like the program (same clean slate, user, directory, environment)
        and, with cgroups, in the program's cgroup (as systemd runs ExecStartPost): its
        memory and pids count against the program's limits, and the program's stop
        (cgroup.kill) takes it along. Its output is not kept, and the fleet's
        PROBE_TIMEOUT kills it (CancelProbe)."""
        env = {**self.base_environment, **program.environment, "SUPD_PROCESS_NAME": name}
        spec = spawn.SpawnSpec(
            argv=argv,
            environment=env,
            directory=program.directory,
            user=program.user,
            group=program.group,
            umask=program.umask,
            redirect_stderr=True,
            configured_environment=frozenset(program.environment),
        )
        what = f"exec {' '.join(argv)}"
        cgroup = slot.cgroup
        if cgroup is not None and (slot.child is None or slot.cgroup_killed):
            # No program left to probe, and a cgroup that got cgroup.kill kills what
            # clone3 starts in it: the fleet hears of the exit next.
            self.log.debug("probe_skipped", process=name, probe=run.probe.value)
            return
        cgroup_fd: int | None = None
        try:
            if cgroup is not None:
                cgroup_fd = cgroup.open_dir()
                spec = dataclasses.replace(spec, cgroup_fd=cgroup_fd)
            child = spawn.spawn(spec)
        except (spawn.SpawnError, OSError) as exc:
            self.queue.append(ChildEvent(name, ProbeResult(run.probe, False, f"{what}: {exc}")))
            return
        finally:
            if cgroup_fd is not None:
                os.close(cgroup_fd)
        if cgroup is not None:
            slot.probe_group = child.pid
        for fd in (child.stdout_fd, child.stderr_fd):
            if fd is not None:
                os.close(fd)  # the probe writes into a closed pipe: EPIPE, never a block
        child.stdout_fd = child.stderr_fd = None
        run.child = child
        slot.probe = run
        self.selector.register_process(child.pid, ProbeChildTag(name, child.pid))

    def _probe_child_exited(self, name: str, pid: int) -> None:
        slot = self.slots.get(name)
        if slot is not None and slot.probe_group == pid:
            # In the program's cgroup, what the probe left in its process group would
            # count against the program's limits until the program's end: killed now,
            # before the reap (the zombie keeps the group's id ours).
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)
        exit_code, exit_signal = spawn.reap(pid)
        run = slot.probe if slot is not None else None
        if slot is None or run is None or run.child is None or run.child.pid != pid:
            return
        if run.child.exec_error_fd is not None:
            error = run.child.read_exec_error()
            if error is not None:
                exit_code, exit_signal = 127, None
        run.child = None
        slot.probe = None
        argv = self.fleet.processes[name].config if name in self.fleet.processes else None
        command = ""
        if argv is not None:
            config = argv.ready if run.probe is Probe.READY else argv.health
            command = " ".join(config.exec or ()) if config is not None else ""
        if exit_signal is not None:
            message = f"exec {command}: killed by {signal_name(exit_signal)}"
            if exit_signal == signal.SIGKILL and self._probe_oom_killed(slot):
                message += " (out of memory: the probe runs in the program's cgroup)"
        else:
            message = f"exec {command}: exit status {exit_code}"
        self.queue.append(ChildEvent(name, ProbeResult(run.probe, exit_code == 0, message)))

    def _probe_oom_killed(self, slot: Slot) -> bool:
        """Whether the cgroup's OOM killer took a probe: then the OOM kill is the
        probe's, and the program's next death is not blamed on it."""
        before = slot.oom_kills_at_spawn
        now = self.oom_kills(slot.name) if before is not None else None
        if before is None or now is None or now <= before:
            return False
        slot.oom_kills_at_spawn = now
        return True

    def _log_silence_verdict(self, name: str, slot: Slot, program: Program, probe: Probe) -> None:
        silence = program.health.log_silence if program.health else None
        process = self.fleet.processes.get(name)
        if silence is None or process is None:
            return
        now = self.clock()
        last = max(slot.last_output_at or 0.0, process.started_at or now)
        quiet = now - last
        if quiet >= silence:
            message = f"printed nothing for {quiet:.0f} s (log-silence = {silence:g})"
            self.queue.append(ChildEvent(name, ProbeResult(probe, False, message)))
        else:
            self.queue.append(ChildEvent(name, ProbeResult(probe, True, "printing")))

    def _end_probe(self, slot: Slot) -> None:
        run, slot.probe = slot.probe, None
        if run is None:
            return
        if run.sock is not None:
            self.selector.unregister(run.sock.fd)
            run.sock.close()
        if run.child is not None:
            pid = run.child.pid
            spawn.send_signal(pid, signal.SIGKILL, True)
            # Its process key stays: _probe_child_exited reaps it once it is gone.
            if run.child.exec_error_fd is not None:
                os.close(run.child.exec_error_fd)
                run.child.exec_error_fd = None

    # -- sd_notify from programs (issue 14) ---------------------------------------------

    def _open_child_notify(self, config: Settings, inherited: int | None = None) -> None:
        """Make the notify socket the first time a program of the config asks for it;
        after a re-exec, take over the old image's (`inherited`), asked for or not now:
        adopted children may still use it."""
        if self.child_notify is not None:
            return
        event = "notify_socket_open"
        if inherited is not None:
            try:
                self.child_notify = childnotify.NotifySocket(inherited)
                event = "notify_socket_adopted"
            except OSError as exc:  # then a new one, as if none had been passed
                self.log.error("notify_socket_not_adopted", fd=inherited, error=str(exc))
        if self.child_notify is None:
            if not any(p.wants_notify_socket for p in config.programs.values()):
                return
            try:
                self.child_notify = childnotify.NotifySocket()
            except OSError as exc:  # its programs then never get NOTIFY_SOCKET: logged
                self.log.error("notify_socket_failed", error=str(exc))
                return
        self.selector.register_handle(self.child_notify.fd, Event.READ, ChildNotifyTag())
        self.log.info(event, address=self.child_notify.address)

    def _child_notifications(self) -> None:
        if self.child_notify is None:
            return
        for pid, data in self.child_notify.receive():
            name = None if pid is None else childnotify.credit(pid, self._notify_owners)
            process = self.fleet.processes.get(name) if name is not None else None
            if process is None or not process.config.wants_notify_socket:
                self._stranger(pid, data)
                continue
            notified = childnotify.parse(data)
            if notified is None:
                continue
            assert name is not None
            if notified.main_pid is not None:
                old = self._main_pids.pop(name, None)
                if old is not None and self._notify_owners.get(old) == name:
                    del self._notify_owners[old]
                self._main_pids[name] = notified.main_pid
                self._notify_owners.setdefault(notified.main_pid, name)
            self.log.debug(
                "notified", process=name, pid=pid, message=data[:200].decode(errors="replace")
            )
            self.queue.append(ChildEvent(name, notified))

    def _stranger(self, pid: int | None, data: bytes) -> None:
        """A datagram from a process supd does not supervise (or that did not ask):
        ignored, and logged once per sender."""
        key = -1 if pid is None else pid
        if key in self._notify_strangers or len(self._notify_strangers) >= 1024:
            return
        self._notify_strangers.add(key)
        message = data[:200].decode(errors="replace")
        self.log.warning(
            "notify_ignored",
            pid=pid,
            message=message,
            reason="not a supervised process that asked for NOTIFY_SOCKET",
        )

    def _forget_notify_pids(self, name: str, pid: int) -> None:
        if self._notify_owners.get(pid) == name:
            del self._notify_owners[pid]
        main = self._main_pids.pop(name, None)
        if main is not None and self._notify_owners.get(main) == name:
            del self._notify_owners[main]

    def rotate_logs(self, names: list[str]) -> list[tuple[str, str, bool]]:
        """Rotate the log files of these processes now: (process, stream, rotated)."""
        done = []
        for name in names:
            slot = self.slots.get(name)
            if slot is None:
                continue
            for stream in ("stdout", "stderr"):
                rotated = slot.sink(stream).rotate_now()
                done.append((name, stream, rotated))
        self.log.info("logs_rotated", processes=names)
        return done

    def log_files(self, names: list[str]) -> list[dict[str, Any]]:
        """Each process's log destinations, files and their sizes (`supctl logs`)."""
        entries: list[dict[str, Any]] = []
        for name in names:
            slot = self.slots.get(name)
            if slot is None:
                continue
            for stream in ("stdout", "stderr"):
                sink = slot.sink(stream)
                where = (
                    sink.description
                    if isinstance(sink, LineSink)
                    else (str(sink.path) if sink.path is not None else "none")
                )
                files = [{"path": str(path), "size": size} for path, size in sink.files()]
                entries.append(
                    {
                        "name": name,
                        "stream": stream,
                        "destination": where,
                        "files": files,
                        "dropped_bytes": sink.dropped_bytes,
                    }
                )
        return entries

    def reopen_logs(self) -> None:
        for slot in self.slots.values():
            slot.stdout.reopen()
            slot.stderr.reopen()
        self.log.info("logs_reopened", count=len(self.slots))

    @staticmethod
    def _release_memory() -> None:
        """After a (re)load: free the parser's garbage and hand the pages back."""
        gc.collect()
        linux.malloc_trim()

    def status_line(self) -> str:
        """STATUS= for systemd: processes by state (RUNNING ones are ready: a ready
        probe keeps a process STARTING), and how many are unhealthy."""
        counts = self.fleet.status_counts()
        counts["unhealthy"] = self.fleet.unhealthy_count()
        return notify.status_line(counts)

    # -- the core commands.py talks to (commands.Core) ------------------------------------

    def handle_command(self, request: Request, responder: Responder) -> None:
        """The control server's handler: run the command, then settle what it queued, so
        the next command (pipelined on a connection, say) sees its effect."""
        self.metrics.requests[request.method] += 1
        self.commands.handle_command(request, responder)
        self._drain()

    @property
    def shutting_down(self) -> bool:
        return self.fleet.shutting_down

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def config_path(self) -> str:
        return str(self.config.path)

    def resolve(self, names: list[str] | None) -> list[str]:
        return self.fleet.resolve(names)

    def snapshot(self, names: list[str], accounting: bool = False) -> Snapshot:
        processes = self.fleet.processes
        # any_stopped is one syscall, but the kernel walks every child for it (0.25 ms
        # with 10,000): a few names are asked about one by one instead, each O(1).
        check = len(names) <= ASK_EACH_IF_STOPPED or spawn.any_stopped()
        entries = []
        for name in names:
            process = processes[name]
            pid = process.pid
            entries.append((process, spawn.stopped_by(pid) if check and pid else None))
        extra = {}
        if self.cgroup_tree is not None:
            memory = "memory" in self.cgroup_tree.controllers
            slots = self.slots
            for name in names:
                slot = slots.get(name)
                if slot is None or slot.cgroup is None:
                    continue
                if not accounting and not slot.cgroup_killed:
                    continue  # no survivors to show (the common case, 10,000 times)
                survivors = self.survivors(name)  # (no file read unless it was killed)
                if accounting or survivors:
                    stats = slot.cgroup.stats(memory) if accounting else None
                    extra[name] = status.cgroup_extra(stats, survivors)
        return Snapshot(self.clock(), time.time(), entries, extra)

    def submit(
        self,
        action: Action,
        names: list[str],
        wait: bool,
        reply: Callable[[tuple[Outcome, ...]], None],
    ) -> None:
        self._request_ids += 1
        self.replies[self._request_ids] = reply
        self.queue.append(Submit(self._request_ids, action, tuple(names), wait))

    def await_condition(
        self, names: list[str], condition: str, reply: Callable[[tuple[Outcome, ...]], None]
    ) -> Callable[[], None]:
        self._request_ids += 1
        request = self._request_ids
        self.replies[request] = reply
        self.queue.append(Await(request, tuple(names), condition))

        def cancel() -> None:
            if self.replies.pop(request, None) is not None:
                self.queue.append(Unawait(request))

        return cancel

    def reload(
        self, dry_run: bool = False, done: Callable[[ReloadReport | Exception], None] | None = None
    ) -> None:
        """SIGHUP / `supctl reload`: apply the config file's changes, exactly as planned.
        The file is checked in a child (configcheck.py) while the loop goes on; `done`
        gets the report, or the ConfigError or SocketUnusable after which nothing
        changed. A dry run only says what a reload would do then. Reloads asked for
        while a check runs share the next check (so each sees the file as it is after
        it was asked)."""
        answer = done or (lambda outcome: None)
        if self.fleet.shutting_down:
            self.log.warning("reload_ignored", reason="shutting down")
            answer(ReloadReport(ReloadPlan(()), [], [], [], [], [], dry_run))
            return
        self._reloads_waiting.append((dry_run, answer))
        if self._check is None:
            self._start_check()

    def _start_check(self) -> None:
        reloads, self._reloads_waiting = self._reloads_waiting, []
        if not all(dry for dry, _ in reloads):
            self.notifier.reloading(self.status_line())
        path = self.config.path
        spec = spawn.SpawnSpec(
            argv=tuple(configcheck.argv(path)),
            environment=dict(os.environ),
            redirect_stderr=True,
        )
        try:
            child = spawn.spawn(spec)
        except (spawn.SpawnError, OSError) as exc:
            problem = configcheck.failed(path, f"cannot run {sys.executable}: {exc}")
            self._finish_reloads(reloads, problem)
            return
        for fd in (child.stderr_fd, child.exec_error_fd):
            if fd is not None:
                os.close(fd)
        check = configcheck.Check(path, child.pid, child.stdout_fd, reloads=reloads)
        self._check = check
        check.exit_key = self.selector.register_process(child.pid, CheckTag(child.pid, "exit"))
        if check.output_fd is not None:
            os.set_blocking(check.output_fd, False)
            tag = CheckTag(child.pid, "output")
            self.selector.register_handle(check.output_fd, Event.READ, tag)
        check.deadline_fd = self.selector.register_timer(
            max(1, round(self._check_timeout * 1000)), True, CheckTag(child.pid, "deadline")
        )
        self.log.debug("config_check_started", pid=child.pid)

    def _finish_reloads(
        self, reloads: list[configcheck.Reload], outcome: Settings | ConfigError
    ) -> None:
        for dry_run, answer in reloads:
            try:
                answer(self._reload_with(outcome, dry_run))
            except (ConfigError, SocketUnusable) as exc:
                answer(exc)

    def _check_event(self, tag: CheckTag, key: ReadyKey[Any]) -> None:
        check = self._check
        if check is None or check.pid != tag.pid:
            return
        match tag.what:
            case "exit":
                self.selector.unregister(key.fd)
                check.exit_key = None
                code, signum = spawn.reap(check.pid)
                check.exited = True
                if signum is not None:
                    check.exit_status = f"killed by {signal_name(signum)}"
                elif code not in (None, EXIT_OK, EXIT_CONFIG):  # not emit_json_main's end
                    check.exit_status = f"exit status {code}"
                self._read_check_output(check)  # what it wrote before it exited
            case "output":
                self._read_check_output(check)
            case "deadline":
                check.timed_out = True
                spawn.send_signal(check.pid, signal.SIGKILL, False)
                return  # its exit comes next
        if check.done:
            self._end_check(check)

    def _read_check_output(self, check: configcheck.Check) -> None:
        fd = check.output_fd
        if fd is None:
            return
        while True:
            try:
                data = os.read(fd, 1 << 16)
            except BlockingIOError:
                if not check.exited:
                    return
                data = b""  # exited, yet the pipe is open: a grandchild holds it
            except OSError:
                data = b""
            if not data:
                self.selector.unregister(fd)
                os.close(fd)
                check.output_fd = None
                return
            check.take(data)

    def _end_check(self, check: configcheck.Check) -> None:
        if check.deadline_fd is not None:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self.selector.unregister(check.deadline_fd)
            check.deadline_fd = None
        self._check = None
        self._finish_reloads(check.reloads, check.outcome(self._check_timeout))
        if self._metrics_after_check:  # after a re-exec: the address the file names now
            self._metrics_after_check = False
            try:
                self._open_metrics(self.config.supervisor)
            except SocketUnusable as exc:  # the programs matter more than their metrics
                self.log.error("metrics_unavailable", problem=str(exc))
        self._release_memory()  # the checker's output, parsed and dropped
        if self._reloads_waiting and not self.fleet.shutting_down:
            self._start_check()

    def _cancel_check(self, why: str, shutdown: bool = True) -> None:
        """Shutdown or re-exec with a check in flight: kill it, answer its reloads."""
        check, self._check = self._check, None
        reloads, self._reloads_waiting = self._reloads_waiting, []
        if check is not None:
            reloads = check.reloads + reloads
            for key in (check.exit_key, check.output_fd, check.deadline_fd):
                if key is not None:
                    with contextlib.suppress(KeyError, ValueError, OSError):
                        self.selector.unregister(key)
            if check.exit_key is not None:  # not reaped yet
                spawn.send_signal(check.pid, signal.SIGKILL, False)
                spawn.reap(check.pid)
            if check.output_fd is not None:
                os.close(check.output_fd)
        if reloads:
            self.log.warning("reload_cancelled", reason=why, reloads=len(reloads))
        for _dry_run, answer in reloads:
            answer(configcheck.Cancelled(why, shutdown))

    def _reload_with(self, outcome: Settings | ConfigError, dry_run: bool) -> ReloadReport:
        """Apply (or, dry, only plan) the checked config; raises ConfigError or
        SocketUnusable, and then nothing changed."""
        if isinstance(outcome, ConfigError):
            self.log.error("reload_failed", problems=[str(p) for p in outcome.problems])
            self.metrics.reload_failures += 1
            if not dry_run:
                self.notifier.ready(self.status_line())  # still running, on the old config
            raise outcome
        new = outcome
        if self.fleet.shutting_down:
            self.log.warning("reload_ignored", reason="shutting down")
            return ReloadReport(ReloadPlan(()), [], [], [], [], [], dry_run)
        self._drain()  # the plan is made and applied on the same fleet state
        live, not_live = supervisor_changes(self.config.supervisor, new.supervisor)
        if self.control is not None and self.control.listening()[1] is None:
            # Known before applying anything, so that a dry run says it too.
            for change in [c for c in live if c.key in SOCKET_KEYS]:
                live.remove(change)  # a socket systemd passed: its settings are systemd's
                not_live.append(f"{change}: the socket is systemd's (socket activation)")
        added, changed, removed = reload_diff(self.fleet.configs, new.programs)
        programs = tuple(new.programs.values())
        if dry_run:
            plan = self.fleet.plan_reload(programs)
            return ReloadReport(plan, added, changed, removed, live, not_live, True)
        try:
            applied = self._apply_supervisor(new)  # the socket first: all that can fail
        except (SocketUnusable, OSError) as exc:
            self.log.error("reload_failed", problems=[str(exc)])
            self.notifier.ready(self.status_line())
            if isinstance(exc, SocketUnusable):
                raise
            raise SocketUnusable(f"cannot apply the control socket settings: {exc}") from exc
        for change in [c for c in live if c.key in SOCKET_KEYS and c.key not in applied]:
            live.remove(change)  # a socket systemd passed: its settings are systemd's
            not_live.append(f"{change}: the socket is systemd's (socket activation)")
        old_settings, self.config = self.config.supervisor, new
        self._open_child_notify(new)
        self.metrics.reloads += 1
        if self._metrics_after_check:  # after a re-exec: opened at the new address next
            not_live = [entry for entry in not_live if not entry.startswith("metrics:")]
        elif new.supervisor.metrics != settings_metrics(self):
            self.log.warning(
                "metrics_address_unchanged",
                reason="the metrics address is set at start; `supctl reexec` applies it",
                running=settings_metrics(self),
                configured=new.supervisor.metrics,
            )
        effects = self.fleet.handle(Reload(programs), self.clock())
        plans = [e.plan for e in effects if isinstance(e, ReloadPlanned)]
        plan = plans[0] if plans else ReloadPlan(())
        self._perform(effects)
        if (old_settings.log_format, old_settings.log_level) != (
            new.supervisor.log_format,
            new.supervisor.log_level,
        ):
            daemonlog.configure(new.supervisor.log_format, new.supervisor.log_level)
            self.log = daemonlog.get_logger()
        self._release_memory()
        report = ReloadReport(plan, added, changed, removed, live, not_live)
        self.log.info("config_reloaded", **reload_event(report))
        self.notifier.ready(self.status_line())
        return report

    def _apply_supervisor(self, new: Settings) -> list[str]:
        """The [supervisor] keys a reload applies live, the socket first; returns the
        socket keys applied."""
        settings = new.supervisor
        applied: list[str] = []
        if self.control is not None:
            applied = self.control.reconfigure(
                settings.socket, settings.socket_mode, settings.socket_group
            )
        want_subreaper = settings.subreaper or os.getpid() == 1
        if want_subreaper != self.subreaper:
            linux.set_child_subreaper(want_subreaper)
            if want_subreaper:
                self._sigchld_key = self.selector.register_signal(
                    signal.SIGCHLD, SignalTag(signal.SIGCHLD)
                )
            elif self._sigchld_key is not None:
                self.selector.unregister(self._sigchld_key)
                self._sigchld_key = None
            self.subreaper = want_subreaper
        return applied

    def shutdown(self) -> None:
        """Stop everything, highest priority number first; a second call kills."""
        if self.fleet.shutting_down:
            self.log.warning("shutdown_forced")
        else:
            self.notifier.stopping(self.status_line())
            self.log.info("shutdown_started")
            self._cancel_check("supd is shutting down")
        self.queue.append(Shutdown())

    def signal(self, name: str, signum: int) -> bool:
        sent = self._signal(name, signum, group=False)
        slot = self.slots.get(name)
        if sent and slot is not None:  # a death by it is the operator's, not unexplained
            slot.operator_signals |= {signum}
        return sent

    def clear(self, names: list[str]) -> None:
        self.queue.append(ClearHistory(tuple(names)))

    def tail(
        self,
        name: str,
        stream: str,
        nbytes: int | None,
        nlines: int | None,
        since: float | None = None,
    ) -> bytes:
        sink = self.slots[name].sink(stream)
        if since is not None:
            return sink.read_since(time.time() - since, limit=MAX_TAIL_BYTES)
        return sink.read_back(nbytes=nbytes, nlines=nlines, limit=MAX_TAIL_BYTES)

    def follow(self, name: str, stream: str, listener: Listener) -> Callable[[], None]:
        return self.followers.add(name, stream, listener)

    # -- re-exec (see reexec.py) -------------------------------------------------------

    def request_reexec(self, done: Callable[[str | None], None] | None = None) -> None:
        """Replace this daemon with a freshly exec'd one at the end of this loop iteration
        (after the answer that asked for it is sent). `done(problem)` is called only if it
        does not happen."""
        self._reexec_wanted.append(done or (lambda problem: None))

    def _reexec(self) -> None:
        waiting, self._reexec_wanted = self._reexec_wanted, []
        problem = self._try_reexec(waiting)
        self.log.error("reexec_failed", problem=problem)
        for done in waiting:
            done(problem)

    def _try_reexec(self, waiting: list[Callable[[str | None], None]]) -> str:
        """Serialise, probe the new code, exec. Returns only on failure, with the
        reason; then nothing has changed."""
        if self.fleet.shutting_down:
            return "supd is shutting down"
        self._drain()
        state, fds = self._export_state()
        data = reexec.encode(state)
        probing = time.monotonic()
        problem = _probe_new_code(data)
        if problem is not None:  # a reload being checked goes on: nothing replaced it
            return f"the new supd failed its check, so this one carries on: {problem}"
        # The new supd reads the file again once it has adopted everything.
        self._cancel_check("supd is re-executing; reload again after it", shutdown=False)
        self.log.info(
            "reexec",
            generation=state.generation,
            processes=len(state.processes),
            fds=len(fds),
            state_bytes=len(data),
            probe_s=round(time.monotonic() - probing, 3),
        )
        self.notifier.reloading(self.status_line())
        self._cancel_compressions()
        memfd = reexec.write_memfd(data)
        os.environ[reexec.ENV_STATE_FD] = str(memfd)
        os.environ[spawn.ENV_ORIGINAL_NOFILE] = ",".join(map(str, spawn.original_fd_limit()))
        for fd in fds:
            os.set_inheritable(fd, True)
        for done in waiting:
            with contextlib.suppress(Exception):
                done(None)  # the answer goes out now; the connection closes at exec
        self._flush_output_for_exec()
        try:
            os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
        except OSError as exc:
            settings = self.config.supervisor
            daemonlog.configure(settings.log_format, settings.log_level)
            self.log = daemonlog.get_logger()
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.set_inheritable(fd, False)
            os.close(memfd)
            os.environ.pop(reexec.ENV_STATE_FD, None)
            os.environ.pop(spawn.ENV_ORIGINAL_NOFILE, None)
            self.notifier.ready(self.status_line())
            waiting.clear()  # already answered
            return f"cannot exec {sys.executable}: {exc.strerror or exc}"
        raise AssertionError("unreachable")  # pragma: no cover

    def _flush_output_for_exec(self) -> None:
        """No line lost to the exec: partial lines held for a shared stream go out now,
        and what waits for supd's stdout/stderr (children's lines, supd's own log) gets
        a moment to be written; the fds' flags are restored for the new image."""
        for slot in self.slots.values():
            for sink in (slot.stdout, slot.stderr):
                if isinstance(sink, LineSink):
                    with contextlib.suppress(Exception):
                        sink.flush_partial()
        for writer in daemonlog.stream_writers():
            with contextlib.suppress(Exception):
                writer.close(wait_s=EXEC_FLUSH_S)
        daemonlog.shutdown()

    def _export_state(self) -> tuple[reexec.DaemonState, list[int]]:
        """The state the new supd adopts, and exactly the fds it must inherit."""
        now = self.clock()
        fleet = self.fleet
        armed = fleet.armed_timers()
        fds: list[int] = []
        # Programs by index: the config's first (state.programs), then any other a
        # process still runs with (state.process_programs).
        program_index = {id(p): i for i, p in enumerate(fleet.configs.values())}
        process_programs: list[dict[str, Any]] = []
        processes = []
        for name, process in fleet.processes.items():
            key = id(process.config)
            if key not in program_index:
                program_index[key] = len(fleet.configs) + len(process_programs)
                process_programs.append(reexec.program_data(process.config))
            slot = self.slots.get(name)
            saved = reexec.ProcessState(
                name=name,
                program=process.config.name,
                config=program_index[key],
                fields=reexec.process_fields(process, now),
                timers=reexec.timers_data(armed.get(name, ()), now),
            )
            if slot is not None:
                for fd, reader in slot.readers.items():
                    if reader.sink is slot.stdout:
                        saved.stdout_fd = fd
                    else:
                        saved.stderr_fd = fd
                    fds.append(fd)
                if slot.probe is not None and slot.probe.child is not None:
                    saved.probe_pid = slot.probe.child.pid
                if slot.last_output_at is not None:
                    saved.last_output = slot.last_output_at - now
                if slot.child is not None:
                    saved.child_pid = slot.child.pid
                    saved.via_setpriv = slot.child.via_setpriv
                    if slot.child.exec_error_fd is not None:
                        saved.exec_error_fd = slot.child.exec_error_fd
                        fds.append(slot.child.exec_error_fd)
            processes.append(saved)
        listen_fd, inode = None, None
        if self.control is not None:
            listen_fd, inode = self.control.listening()
            if listen_fd is not None:
                fds.append(listen_fd)
        lock_fd, lock_path = None, None
        if self.lock is not None:
            lock_fd, lock_path = self.lock.fd_and_path()
            if lock_fd is not None:
                fds.append(lock_fd)
        child_notify_fd = None
        if self.child_notify is not None:
            child_notify_fd = self.child_notify.fd
            fds.append(child_notify_fd)
        state = reexec.DaemonState(
            version=reexec.STATE_VERSION,
            generation=self._generation + 1,
            config_path=str(self.config.path),
            supervisor=dump(self.config.supervisor),
            programs=[reexec.program_data(p) for p in fleet.configs.values()],
            process_programs=process_programs,
            sources={k: str(v) for k, v in self.config.sources.items()},
            processes=processes,
            retiring=sorted(fleet.retiring),
            swaps={n: reexec.program_data(p) for n, p in fleet.swaps.items()},
            listen_fd=listen_fd,
            socket_inode=inode,
            lock_fd=lock_fd,
            lock_path=lock_path,
            child_notify_fd=child_notify_fd,
            systemd=self.systemd,
            subreaper=self.subreaper,
            fd_limit=spawn.original_fd_limit(),
            clock_at=now,
        )
        return state, fds

    def adopt(
        self,
        state: reexec.DaemonState,
        configs: list[Program],
    ) -> None:
        """The new supd's setup: take over the socket, the children, their pipes and the
        timers, then reload the config file (a changed program is handled like a reload)."""
        settings = self.config.supervisor
        self._generation = state.generation
        self.control = ControlServer(
            self.selector,
            self,
            path=settings.socket,
            mode=settings.socket_mode,
            group=settings.socket_group,
            listen_fd=state.listen_fd,
            log=self.log,
        )
        self.control.adopt(state.socket_inode)
        self.control.open()
        # Closed by the exec (it keeps no state a client needs): opened afresh, at the
        # address the config file names now, once the reload below has read it.
        self._metrics_after_check = True
        self._open_loop_sources()
        self.running = True
        # The same socket: adopted children keep its address, and what they sent during
        # the exec waits in it (docs/reexec.md).
        self._open_child_notify(self.config, inherited=state.child_notify_fd)
        self._contain(adopting=True)  # before the slots: each gets its cgroup back
        now = self.clock()
        base = reexec.time_base(state, now)
        processes: list[Process] = []
        timers: list[tuple[str, Timer, float]] = []
        for saved in state.processes:
            if not 0 <= saved.config < len(configs):
                self.log.error("adopt_failed", process=saved.name, problem="no program saved")
                continue
            processes.append(
                reexec.restore_process(
                    saved.name, configs[saved.config], saved.fields, base, draw=self.fleet.draw
                )
            )
            for kind, left in saved.timers.items():
                with contextlib.suppress(ValueError):
                    timers.append((saved.name, Timer(kind), base + left))
        swaps = tuple((n, reexec.program_from(d)) for n, d in state.swaps.items())
        adopt = Adopt(
            tuple(self.config.programs.values()),
            tuple(processes),
            tuple(timers),
            tuple(state.retiring),
            swaps,
        )
        self._perform(self.fleet.handle(adopt, now))
        for saved in state.processes:
            self._adopt_fds(saved)
            slot = self.slots.get(saved.name)
            if slot is not None and saved.last_output is not None:
                # From now, not `base`: supd read nothing during the exec, and what the
                # child printed meanwhile waits in its pipe; that time is no silence.
                slot.last_output_at = now + saved.last_output
        self.log.info("adopted", generation=self._generation, processes=len(processes))
        # What the children sent while supd was being replaced first, then the timers:
        # a WATCHDOG=1 waiting in the socket is not a missed watchdog.
        self._child_notifications()
        self._drain()
        self.reload()  # checked in a child; a failure is logged and the old config stays
        self.notifier.ready(self.status_line())

    def _adopt_fds(self, saved: reexec.ProcessState) -> None:
        if saved.probe_pid is not None:  # the old image's exec probe: no zombie left
            spawn.send_signal(saved.probe_pid, signal.SIGKILL, True)
            self.selector.register_process(
                saved.probe_pid, ProbeChildTag(saved.name, saved.probe_pid)
            )
        slot = self.slots.get(saved.name)
        if slot is not None and saved.probe_pid is not None and slot.cgroup is not None:
            slot.probe_group = saved.probe_pid
        if slot is None:
            for fd in (saved.stdout_fd, saved.stderr_fd, saved.exec_error_fd):
                if fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            return
        name = saved.name
        if saved.child_pid is not None:
            child = spawn.Child(
                saved.child_pid, saved.stdout_fd, saved.stderr_fd, saved.exec_error_fd
            )
            child.via_setpriv = saved.via_setpriv
            slot.child = child
            self._notify_owners[child.pid] = name  # sd_notify: its messages are its own
            # Registration looks once: a child that exited during the exec is reported now,
            # and reaped with its real status.
            self.selector.register_process(child.pid, ChildTag(name, child.pid))
            if child.exec_error_fd is not None:
                tag = ExecReportTag(name, child.pid)
                self.selector.register_handle(child.exec_error_fd, Event.READ, tag)
        process = self.fleet.processes.get(name)
        if process is not None and process.main_pid is not None:  # MAINPID= it sent
            self._main_pids[name] = process.main_pid
            self._notify_owners.setdefault(process.main_pid, name)
        if process is not None:
            self._watch_ready_line(slot, process)  # a `log` ready probe still waiting
        for stream, fd in (("stdout", saved.stdout_fd), ("stderr", saved.stderr_fd)):
            if fd is not None:
                os.set_blocking(fd, False)
                hook = self._output_hook(name, stream)
                slot.readers[fd] = PipeReader(fd, slot.sink(stream), hook)
                self.selector.register_handle(fd, Event.READ, OutputTag(name, stream))

    def metrics_text(self) -> str:
        views = []
        for name, process in self.fleet.processes.items():
            slot = self.slots.get(name)
            views.append(
                ProcessView(process, slot.stdout if slot else None, slot.stderr if slot else None)
            )
        self.metrics.exit_peeks = self.selector.peeks
        self.metrics.exit_peek_seconds = self.selector.peek_seconds
        return self.metrics.render(views, self.clock(), time.time())

    def _scrape(self) -> bytes:
        return self.metrics_text().encode()

    def usage(self, names: list[str]) -> list[dict[str, Any]]:
        processes = [self.fleet.processes[name] for name in names]
        rows = self.metrics.usage(processes, self.clock())
        return [
            {
                "name": row.name,
                "pid": row.pid,
                "cpu_seconds": round(row.cpu_seconds, 2),
                "cpu_percent": row.cpu_percent,
                "rss_bytes": row.rss_bytes,
                "processes": row.processes,
            }
            for row in rows
        ]

    def avail(self) -> list[dict[str, Any]]:
        by_program: dict[str, list[Process]] = {}
        for process in self.fleet.processes.values():
            by_program.setdefault(process.config.name, []).append(process)
        rows = []
        for program in self.fleet.configs.values():
            members = by_program.get(program.name, [])
            rows.append(
                {
                    "program": program.name,
                    "group": program.group_name,
                    "autostart": program.autostart,
                    "processes": [p.name for p in members],
                    "running": sum(p.state is State.RUNNING for p in members),
                    "active": any(not p.is_down() for p in members),
                }
            )
        return rows


def settings_metrics(daemon: Daemon) -> str | None:
    """The metrics address supd serves (set at start)."""
    server = daemon.metrics_server
    return None if server is None else server.configured


def _probe_new_code(data: bytes) -> str | None:
    """Run the new code on this state in a child first: None if it can adopt it."""
    argv = [sys.executable, *sys.orig_argv[1:], reexec.PROBE_ARG]
    try:
        ran = subprocess.run(
            argv,
            input=data,
            capture_output=True,
            timeout=reexec.PROBE_TIMEOUT_S,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        )
    except subprocess.TimeoutExpired:
        return f"no answer within {reexec.PROBE_TIMEOUT_S:g} s"
    except OSError as exc:
        return f"cannot run {sys.executable}: {exc.strerror or exc}"
    if ran.returncode == 0 and ran.stdout.strip() == reexec.PROBE_ANSWER.encode():
        return None
    lines = (ran.stderr or ran.stdout).decode(errors="replace").strip().splitlines()
    return f"exit status {ran.returncode}: {lines[-1] if lines else 'no message'}"


def _members_of(group: int | None, pids: list[int]) -> list[int]:
    """Those of `pids` in process group `group` (an exec probe's, dying in the cgroup)."""
    if group is None:
        return []
    found = []
    for pid in pids:
        with contextlib.suppress(OSError):
            if os.getpgid(pid) == group:
                found.append(pid)
    return found


def cgroup_close(cgroup: cgroups.ProcessCgroup | None, selector: Selector[Any]) -> None:
    """Stop watching a cgroup's events and close its fd (if it was being watched)."""
    if cgroup is not None and cgroup.events_fd is not None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            selector.unregister(cgroup.events_fd)
        cgroup.close()


def limit_warnings(config: Settings) -> list[str]:
    """The limits (memory_max, cpu_max, pids_max) this machine will not apply, per
    program: `--check` prints them; supd starts the programs all the same."""
    enabled = config.supervisor.cgroups != "off"
    hierarchy = cgroups.detect() if enabled else None
    return [
        f"programs.{program.name}: {problem}"
        for program in config.programs.values()
        for problem in cgroups.limit_problems(hierarchy, program.cgroup_limits(), enabled)
    ]


def reset_inherited_signals() -> None:
    """Start from known signal state whatever the launcher left us.

    A launcher that set SIGCHLD to SIG_IGN would make the kernel reap our children and
    lose their exit statuses; a blocked mask would hide signals from the signalfd.
    """
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
    for signum in (*DAEMON_SIGNALS, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="supd",
        description="supervise processes",
        epilog="supd import FILE [-o OUT]: convert a supervisord config to supd's TOML "
        "(supd import --help)",
    )
    parser.add_argument("-c", "--config", default=configcheck.DEFAULT_CONFIG, help="config file")
    parser.add_argument("--check", action="store_true", help="validate the config and exit")
    # With --check: print the validated config (or its problems) as one JSON line, for
    # the daemon, which never imports the validator itself (configcheck.py).
    parser.add_argument(configcheck.EMIT_JSON_ARG, action="store_true", help=argparse.SUPPRESS)
    # The new code's check before a re-exec: reads the state on stdin (reexec.py).
    parser.add_argument(reexec.PROBE_ARG, action="store_true", help=argparse.SUPPRESS)
    version = f"supd {__version__} (spawn method: {spawn.method()})"
    parser.add_argument("--version", action="version", version=version)
    args = parser.parse_args(argv)
    if args.emit_json and not args.check:
        parser.error(f"{configcheck.EMIT_JSON_ARG} goes with --check")
    return args


def main(argv: list[str] | None = None) -> int:
    state_fd = reexec.take_state_fd(os.environ)  # set by the supd we replace
    try:
        args = parse_args(argv)
    except SystemExit:  # --help, --version, a usage error
        configcheck.discard_early()
        raise
    if args.check or args.reexec_probe or state_fd is not None:
        configcheck.discard_early()  # (entry.py only starts it for a plain start)
    if args.reexec_probe:
        return probe_main()
    if state_fd is not None:
        return adopt_main(state_fd)
    # In the journal (ExecReload's --check too), errors must be errors: "<3>".
    error = "<3>" if daemonlog.stderr_is_journal(sys.stderr, os.environ) else ""
    if args.check:
        return check_main(args.config, args.emit_json, error)
    try:
        config = configcheck.load(args.config)  # in a child: pydantic stays out of supd
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"{error}{problem}", file=sys.stderr)
        return EXIT_CONFIG
    spawn.reserve_spawn_slots()  # before the lock, the log, the sockets: lowest fds
    try:
        lock = instancelock.InstanceLock.acquire(args.config)  # held until supd exits
    except instancelock.AlreadyLocked as exc:
        print(f"{error}supd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    daemonlog.configure(config.supervisor.log_format, config.supervisor.log_level)
    reset_inherited_signals()
    systemd = notify.take_systemd_environment(os.environ)  # ours, never a child's
    listen_fd = activation.control_socket_fd(systemd, unset=False)
    spawn.mark_inherited_fds_cloexec()
    spawn.raise_fd_limit()
    daemon = Daemon(config, notifier=notify.Notifier.from_environ(systemd))
    daemon.systemd, daemon.lock = systemd, lock
    try:
        daemon.setup(listen_fd)
        return daemon.run()
    except SocketUnusable as exc:  # another supd on the path, a file in the way...
        print(f"{error}supd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    finally:
        daemon.close()
        lock.release()


def check_main(path: str, emit_json: bool, error: str) -> int:
    """`supd --check`: validate, say so (and warn of limits this machine won't apply).
    With --emit-json, one JSON line for the daemon instead (configcheck.py)."""
    if emit_json:
        return configcheck.emit_json_main([path])
    from . import config as validator  # pydantic: only in this short-lived process

    try:
        config = validator.load(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"{error}{problem}", file=sys.stderr)
        return EXIT_CONFIG
    print(validator.summary(config))
    warning = "<4>" if error else ""
    for warned in limit_warnings(validator.to_settings(config)):
        print(f"{warning}warning: {warned}", file=sys.stderr)
    return EXIT_OK


def probe_main() -> int:
    """`supd --reexec-probe`: can this code adopt the state on stdin? Exit 0 and print
    PROBE_ANSWER if so; exit 3 with the reason otherwise (then nothing is exec'd)."""
    try:
        state = reexec.decode(sys.stdin.buffer.read())
        config, programs = reexec.rebuild(state)
        for saved in state.processes:
            reexec.restore_process(saved.name, programs[saved.config], saved.fields, 0.0)
        Daemon(config)  # everything the daemon imports, imported
    except Exception as exc:
        print(f"supd: cannot adopt the running state: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_REEXEC_PROBE
    print(reexec.PROBE_ANSWER)
    return EXIT_OK


def adopt_main(state_fd: int) -> int:
    """The new supd after a re-exec: same pid, the old one's children, fds and timers."""
    try:
        state = reexec.decode(reexec.read_fd(state_fd))
    finally:
        with contextlib.suppress(OSError):
            os.close(state_fd)
    spawn.reserve_spawn_slots()  # in the holes the old image's slots left
    config, programs = reexec.rebuild(state)
    daemonlog.configure(config.supervisor.log_format, config.supervisor.log_level)
    keep_daemon_signals_blocked()
    spawn.mark_inherited_fds_cloexec()  # the adopted fds too: no child may inherit them
    spawn.raise_fd_limit()
    lock = None
    if state.lock_fd is not None and state.lock_path is not None:
        lock = instancelock.InstanceLock(state.lock_fd, Path(state.lock_path))
    daemon = Daemon(config, notifier=notify.Notifier.from_environ(state.systemd))
    daemon.systemd, daemon.lock = state.systemd, lock
    try:
        daemon.adopt(state, programs)
        return daemon.run()
    finally:
        daemon.close()
        if lock is not None:
            lock.release()


def keep_daemon_signals_blocked() -> None:
    """After a re-exec: default dispositions, but the daemon's signals stay blocked
    (as the old image left them), so one sent during the exec waits in the signalfd
    instead of killing the new supd with its default action."""
    signal.pthread_sigmask(signal.SIG_SETMASK, (*DAEMON_SIGNALS, signal.SIGCHLD))
    for signum in (*DAEMON_SIGNALS, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)


if __name__ == "__main__":
    raise SystemExit(main())
