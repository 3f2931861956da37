"""supd, the daemon: ties the selector, the process state machines, the log capture and
the control server together. This is the only module with side effects on programs.

Data flow, one direction only:

    kernel fd -> Selector.select() -> ReadyKey(data=tag) -> Daemon._dispatch (one match)
      -> Process.handle(event, now) -> [effects] -> Daemon._apply (spawn, kill, timers, logs)

Everything the daemon waits for is an event from the one selector: child exits
(signalfd + waitid sweep), output pipes, timerfd timers (startsecs, backoff, stop
timeout), SIGTERM/SIGINT/SIGHUP/SIGUSR2 (and, as a subreaper, every SIGCHLD) through the
signalfd, and the control socket with its eventfd doorbell. There is no polling and no
sleep: with nothing to do the loop blocks in epoll_wait(-1).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from . import __version__, activation, daemonlog, linux, notify, spawn
from .commands import Commands
from .config import Config, ConfigError, ProgramConfig, Stream, load, summary
from .control import ControlServer, SocketUnusable
from .logs import LogSink, PipeReader
from .process import (
    DOWN_STATES,
    ArmTimer,
    CancelTimer,
    Effect,
    Exited,
    ForceKill,
    Ignored,
    Kill,
    Process,
    ProcessEvent,
    Spawn,
    Spawned,
    SpawnFailed,
    Start,
    State,
    Stop,
    Timer,
    TimerFired,
    Transitioned,
)
from .selector import Event, ReadyKey, Selector
from .signals import name as signal_name

EXIT_OK = 0
EXIT_CONFIG = 2  # a bad config, or another supd already serves the socket

# Signals the daemon reads through the signalfd.
SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT)
DAEMON_SIGNALS = (*SHUTDOWN_SIGNALS, signal.SIGHUP, signal.SIGUSR2)


# Output reads per pipe per wake-up: a flooding child cannot starve the others.
MAX_READS_PER_WAKEUP = 8


# -- registration tags: what a ready key means ------------------------------------------


@dataclass(frozen=True, slots=True)
class SignalTag:
    signum: int


@dataclass(frozen=True, slots=True)
class ChildTag:
    name: str
    pid: int


@dataclass(frozen=True, slots=True)
class TimerTag:
    name: str
    timer: Timer
    serial: int  # tells a stale expiry from the timer that replaced it


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
class OwnLogTag:
    """supd's own log fd is writable again while lines wait for it (see daemonlog)."""


# -- runtime state of one process ------------------------------------------------------


@dataclass(slots=True, eq=False)  # compared and hashed by identity
class Slot:
    """A process and everything the daemon holds for it: child, pipes, logs, timers."""

    process: Process
    program: str
    stdout: LogSink
    stderr: LogSink
    child: spawn.Child | None = None
    timers: dict[Timer, tuple[int, int]] = field(default_factory=dict)  # timer -> (fd, serial)
    readers: dict[int, PipeReader] = field(default_factory=dict)  # pipe fd -> reader
    retiring: bool = False  # removed or changed by a reload: dropped once down
    exec_error: str | None = None  # the child's report that its exec failed

    @property
    def name(self) -> str:
        return self.process.name

    @property
    def config(self) -> ProgramConfig:
        return self.process.config

    def is_down(self) -> bool:
        return self.process.state in DOWN_STATES and self.child is None

    def sink(self, stream: str) -> LogSink:
        return self.stdout if stream == "stdout" else self.stderr


@dataclass
class Waiter:
    """A control request waiting for processes to settle (start/stop/restart, wait=true)."""

    names: set[str]
    done: Callable[[str], bool]  # is this process settled?
    finish: Callable[[], None]


class Daemon:
    def __init__(
        self,
        config: Config,
        *,
        clock: Callable[[], float] = time.monotonic,
        notifier: notify.Notifier | None = None,
    ) -> None:
        self.config = config
        self.notifier = notifier or notify.Notifier.disabled()
        self.ready_sent = False
        self.state_counts: dict[State, int] = dict.fromkeys(State, 0)
        self.clock = clock
        self.log = daemonlog.get_logger()
        self.selector: Selector[Any] = Selector()
        self.slots: dict[str, Slot] = {}
        self.programs: dict[str, list[str]] = {}  # program -> its process names, in order
        self.replacements: dict[str, ProgramConfig] = {}  # changed programs awaiting their stop
        self.waiters: list[Waiter] = []
        self.output_listeners: list[Callable[[str, str, bytes], bool]] = []
        self.control: ControlServer | None = None
        # supd's environment as every child starts from it (minus systemd's variables)
        self.base_environment = spawn.child_environment(os.environ)
        self.subreaper = False
        self.shutting_down = False
        self.running = False
        self.exit_code = EXIT_OK
        self._timer_serial = 0
        self._stepping = False
        self._step_again = False
        self._stopping_group: dict[Slot, None] = {}  # shutdown: the group being stopped

    # -- lifecycle --------------------------------------------------------------------

    def setup(self, listen_fd: int | None = None) -> None:
        """Open the control socket, take over the signals, start the autostart programs.

        Raises SocketUnusable (AlreadyRunning when another supd serves the socket).
        """
        settings = self.config.supervisor
        self.control = ControlServer(
            self.selector,
            Commands(self),
            path=settings.socket,
            mode=settings.socket_mode,
            group=settings.socket_group,
            listen_fd=listen_fd,
            log=self.log,
        )
        self.control.open()
        if settings.subreaper or os.getpid() == 1:
            linux.set_child_subreaper(True)
            self.subreaper = True
            # Every SIGCHLD, also for orphans no PROCESS key will ever name.
            self.selector.register_signal(signal.SIGCHLD, SignalTag(signal.SIGCHLD))
        for signum in DAEMON_SIGNALS:
            self.selector.register_signal(signum, SignalTag(signum))
        self._watch_own_log()
        interval = self.notifier.watchdog_interval_ms()
        if interval is not None:
            self.selector.register_timer(interval, False, WatchdogTag())
        for program in self.config.programs.values():
            self._add_program(program)
        self._autostart(self.config.programs.values())
        self.running = True
        self._maybe_ready()
        self._release_memory()

    def run(self) -> int:
        """The loop: block in select until something happens, dispatch, repeat."""
        while self.running:
            for key in self.selector.select(-1):
                try:
                    self._dispatch(key)
                except Exception:
                    # A bug in handling one event must not take every program down with
                    # the daemon: log it loudly and carry on with the next event.
                    self.log.exception("event_failed", fd=key.fd, data=repr(key.data))
        return self.exit_code

    def _watch_own_log(self) -> None:
        """Flush supd's own buffered log lines when its stderr becomes writable."""
        fd = daemonlog.pollable_fd()
        if fd is None:
            return
        self.selector.register_handle(fd, Event(0), OwnLogTag())  # paused until needed
        daemonlog.watch(
            lambda waiting: self.selector.update_handle(fd, Event.WRITE if waiting else Event(0))
        )

    def _reap_orphans(self) -> None:
        """Reap adopted orphans (we are a subreaper or PID 1) without touching our own.

        waitid(P_ALL, WNOWAIT) only peeks at one exited child. An orphan is reaped at
        once; one of our programs is left alone (its PROCESS event is queued and its
        owner reaps it, keeping the exact exit status), and since the peek would keep
        naming it, the remaining orphans wait for the next loop iteration, which that
        queued event guarantees.
        """
        ours: set[int] | None = None
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None:
                return
            if ours is None:
                ours = {s.child.pid for s in self.slots.values() if s.child is not None}
            if info.si_pid in ours:
                return
            with contextlib.suppress(ChildProcessError):
                os.waitpid(info.si_pid, 0)
            self.log.debug("orphan_reaped", pid=info.si_pid, status=info.si_status)

    def close(self) -> None:
        if self.control is not None:
            self.control.close()
        for slot in list(self.slots.values()):
            self._drop_slot(slot)
        self.selector.close()
        self.notifier.close()

    def _autostart(self, programs: Iterable[ProgramConfig]) -> None:
        if self.shutting_down:
            return
        for program in sorted(programs, key=lambda p: p.priority):
            if program.autostart:
                for name in self.programs[program.name]:
                    self.send(name, Start())

    # -- the one dispatch -------------------------------------------------------------

    def _dispatch(self, key: ReadyKey[Any]) -> None:
        match key.data:
            case ChildTag(name=name, pid=pid):
                self.selector.unregister(key.fd)
                self._child_exited(name, pid)
            case OutputTag(name=name):
                self._output_ready(name, key)
            case ExecReportTag(name=name, pid=pid):
                self._exec_reported(name, pid)
            case TimerTag(name=name, timer=timer, serial=serial):
                self._timer_fired(name, timer, serial, key.fd)
            case SignalTag(signum=signum):
                self._signal_received(signum)
            case WatchdogTag():
                self.notifier.watchdog()
            case OwnLogTag():
                daemonlog.flush()
            case _:
                self.dispatch_other(key)

    def dispatch_other(self, key: ReadyKey[Any]) -> None:
        """Keys registered by the control server (and other extensions)."""
        if self.control is not None and self.control.owns(key.data):
            self.control.on_ready(key)
        else:
            self.log.warning("unknown_key", fd=key.fd, data=repr(key.data))

    def _signal_received(self, signum: int) -> None:
        if signum == signal.SIGCHLD:
            self._reap_orphans()
            return
        self.log.info("signal_received", signal=signal_name(signum))
        if signum in SHUTDOWN_SIGNALS:
            self.shutdown()
        elif signum == signal.SIGHUP:
            with contextlib.suppress(ConfigError):  # logged by reload(); nothing changed
                self.reload()
        elif signum == signal.SIGUSR2:
            self.reopen_logs()

    # -- events into the state machines -----------------------------------------------

    def send(self, name: str, event: ProcessEvent) -> None:
        slot = self.slots.get(name)
        if slot is not None:
            self._apply(slot, slot.process.handle(event, self.clock()))

    def _apply(self, slot: Slot, effects: list[Effect]) -> None:
        """The only place where state-machine decisions become side effects."""
        pending = list(effects)
        while pending:
            effect = pending.pop(0)
            match effect:
                case Spawn():
                    pending[:0] = self._spawn(slot)
                case Kill(signum=signum, group=group):
                    self.signal_process(slot, signum, group)
                case ArmTimer(timer=timer, delay_s=delay_s):
                    self._arm_timer(slot, timer, delay_s)
                case CancelTimer(timer=timer):
                    self._cancel_timer(slot, timer)
                case Transitioned():
                    self._transitioned(slot, effect)
                case Ignored(state=state, event=event):
                    self.log.debug(
                        "event_ignored", process=slot.name, state=state.value, ignored=repr(event)
                    )

    def _spawn(self, slot: Slot) -> list[Effect]:
        program = slot.config
        env = {
            **self.base_environment,
            **program.environment,
            "SUPD_PROCESS_NAME": slot.name,
            "SUPD_PROGRAM": slot.program,
        }
        spec = spawn.SpawnSpec(
            argv=program.command,
            environment=env,
            directory=program.directory,
            user=program.user,
            group=program.group,
            umask=program.umask,
            redirect_stderr=program.redirect_stderr,
        )
        now = self.clock()
        try:
            child = spawn.spawn(spec)
        except spawn.SpawnError as exc:
            self.log.error("spawn_failed", process=slot.name, error=str(exc))
            return slot.process.handle(SpawnFailed(str(exc)), now)
        slot.child = child
        slot.exec_error = None
        self.selector.register_process(child.pid, ChildTag(slot.name, child.pid))
        if child.exec_error_fd is not None:
            tag = ExecReportTag(slot.name, child.pid)
            self.selector.register_handle(child.exec_error_fd, Event.READ, tag)
        for stream, fd in (("stdout", child.stdout_fd), ("stderr", child.stderr_fd)):
            if fd is not None:
                slot.readers[fd] = PipeReader(
                    fd, slot.sink(stream), self._output_hook(slot, stream)
                )
                self.selector.register_handle(fd, Event.READ, OutputTag(slot.name, stream))
        self.log.info("spawned", process=slot.name, pid=child.pid)
        return slot.process.handle(Spawned(child.pid), now)

    def _exec_reported(self, name: str, pid: int) -> None:
        """The child's exec report: end of file if exec worked, else why it failed."""
        slot = self.slots.get(name)
        if slot is None or slot.child is None or slot.child.pid != pid:
            return
        self._take_exec_report(slot, slot.child)

    def _take_exec_report(self, slot: Slot, child: spawn.Child) -> None:
        if child.exec_error_fd is None:
            return
        self.selector.unregister(child.exec_error_fd)
        error = child.read_exec_error()
        if error is not None:
            slot.exec_error = error
            self.log.error("spawn_failed", process=slot.name, pid=child.pid, error=error)

    def _output_hook(self, slot: Slot, stream: str) -> Callable[[bytes], None] | None:
        """A reader's hook for `tail -f` followers; None keeps the hot path copy-free."""
        if not self.output_listeners:
            return None
        name = slot.name

        def forward(data: bytes) -> None:
            listeners = self.output_listeners
            listeners[:] = [listen for listen in listeners if listen(name, stream, data)]
            if not listeners:
                self._refresh_output_hooks()

        return forward

    def add_output_listener(self, listener: Callable[[str, str, bytes], bool]) -> None:
        """`listener(name, stream, data)` sees all output until it returns False."""
        self.output_listeners.append(listener)
        if len(self.output_listeners) == 1:
            self._refresh_output_hooks()

    def _refresh_output_hooks(self) -> None:
        for slot in self.slots.values():
            for reader in slot.readers.values():
                stream = "stdout" if reader.sink is slot.stdout else "stderr"
                reader.on_data = self._output_hook(slot, stream)

    def signal_process(self, slot: Slot, signum: int, group: bool) -> bool:
        """Send `signum` to a process (or its group); False if it is not running."""
        if slot.child is None:
            return False
        sent = spawn.send_signal(slot.child.pid, signum, group)
        self.log.info(
            "signal_sent",
            process=slot.name,
            pid=slot.child.pid,
            signal=signal_name(signum),
            sent=sent,
        )
        return sent

    def _arm_timer(self, slot: Slot, timer: Timer, delay_s: float) -> None:
        self._cancel_timer(slot, timer)
        self._timer_serial += 1
        delay_ms = max(1, round(delay_s * 1000))  # 0 would disarm a timerfd
        tag = TimerTag(slot.name, timer, self._timer_serial)
        fd = self.selector.register_timer(delay_ms, True, tag)
        slot.timers[timer] = (fd, self._timer_serial)

    def _cancel_timer(self, slot: Slot, timer: Timer) -> None:
        entry = slot.timers.pop(timer, None)
        if entry is not None:
            self.selector.unregister(entry[0])

    def _timer_fired(self, name: str, timer: Timer, serial: int, fd: int) -> None:
        slot = self.slots.get(name)
        if slot is None or slot.timers.get(timer) != (fd, serial):
            return  # cancelled after it expired, in the same batch
        self._cancel_timer(slot, timer)
        self._apply(slot, slot.process.handle(TimerFired(timer), self.clock()))

    def _child_exited(self, name: str, pid: int) -> None:
        slot = self.slots.get(name)
        if slot is None or slot.child is None or slot.child.pid != pid:
            # Cannot happen by design; if it does, at least leave no zombie behind.
            self.log.warning("unknown_child_exited", process=name, pid=pid, status=spawn.reap(pid))
            return
        child, slot.child = slot.child, None
        self._take_exec_report(slot, child)
        self._drain_output(slot)  # nothing the child wrote is lost to its exit
        exit_code, exit_signal = spawn.reap(pid)
        now = self.clock()
        if slot.exec_error is not None:
            self._apply(slot, slot.process.handle(SpawnFailed(slot.exec_error), now))
            return
        self.log.info(
            "exited",
            process=name,
            pid=pid,
            exit_code=exit_code,
            signal=signal_name(exit_signal) if exit_signal is not None else None,
        )
        self._apply(slot, slot.process.handle(Exited(exit_code, exit_signal), now))
        if self.subreaper:
            # Orphans that died with this child (a killed process group) were hidden
            # behind its zombie from _reap_orphans' peek; with it reaped, look again.
            self._reap_orphans()

    # -- output -----------------------------------------------------------------------

    def _output_ready(self, name: str, key: ReadyKey[Any]) -> None:
        slot = self.slots.get(name)
        reader = slot.readers.get(key.fd) if slot is not None else None
        if slot is None or reader is None:
            return
        if reader.pump(MAX_READS_PER_WAKEUP):
            self._close_reader(slot, key.fd)

    def _drain_output(self, slot: Slot) -> None:
        for fd, reader in list(slot.readers.items()):
            if reader.drain():
                self._close_reader(slot, fd)

    def _close_reader(self, slot: Slot, fd: int) -> None:
        del slot.readers[fd]
        self.selector.unregister(fd)
        os.close(fd)

    def reopen_logs(self) -> None:
        for slot in self.slots.values():
            slot.stdout.reopen()
            slot.stderr.reopen()
        self.log.info("logs_reopened", count=len(self.slots))

    # -- transitions ------------------------------------------------------------------

    def _transitioned(self, slot: Slot, change: Transitioned) -> None:
        process = slot.process
        self.state_counts[change.old] -= 1
        self.state_counts[change.new] += 1
        self.log.info(
            "state_changed",
            process=slot.name,
            pid=process.pid,
            from_state=change.old.value,
            to_state=change.new.value,
            reason=change.reason,
        )
        pid = process.last_pid
        if change.new is State.BACKOFF and process.backoff_until is not None:
            delay = round(process.backoff_until - self.clock(), 3)
            self.log.info(
                "backoff", process=slot.name, pid=pid, delay_s=delay, failures=process.failures
            )
        elif change.new is State.FATAL:
            self.log.error("fatal", process=slot.name, pid=pid, reason=change.reason)
        elif change.new is State.STOPPED and change.old is State.STOPPING:
            self.log.info("stopped", process=slot.name, pid=pid, reason=change.reason)
        self._settle(slot)
        if self.notifier.enabled:
            self._maybe_ready()
            self.notifier.status(self.status_line())

    def _settle(self, slot: Slot) -> None:
        """Follow-ups of a transition: waiters, reload replacements, shutdown progress."""
        for waiter in list(self.waiters):
            if slot.name in waiter.names and waiter.done(slot.name):
                waiter.names.discard(slot.name)
                if not waiter.names:
                    self.waiters.remove(waiter)
                    waiter.finish()
        if slot.retiring and slot.is_down():
            self._retire(slot)
        if self.shutting_down:
            self._shutdown_step()

    @staticmethod
    def _release_memory() -> None:
        """After a (re)load: free the parser's garbage and hand the pages back."""
        gc.collect()
        linux.malloc_trim()

    def status_line(self) -> str:
        return notify.status_line({state.value: n for state, n in self.state_counts.items()})

    def _maybe_ready(self) -> None:
        """READY=1 once the initial start has settled: nothing is STARTING any more.

        (Every autostart program is then RUNNING, in BACKOFF or FATAL, or has exited.)
        """
        if not self.ready_sent and self.running and not self.state_counts[State.STARTING]:
            self.ready_sent = True
            self.notifier.ready(self.status_line())
            self.log.info("ready", status=self.status_line())

    def wait_for(
        self, names: Iterable[str], done: Callable[[str], bool], finish: Callable[[], None]
    ) -> None:
        pending = {n for n in names if not done(n)}
        if not pending:
            finish()
            return
        self.waiters.append(Waiter(pending, done, finish))

    # -- programs ---------------------------------------------------------------------

    def _add_program(self, program: ProgramConfig) -> None:
        names = program.process_names()
        self.programs[program.name] = names
        for name in names:
            self.state_counts[State.STOPPED] += 1
            self.slots[name] = Slot(
                process=Process(name, program),
                program=program.name,
                stdout=self._sink(program, name, "stdout"),
                stderr=self._sink(program, name, "stderr"),
            )

    @staticmethod
    def _sink(program: ProgramConfig, name: str, stream: Stream) -> LogSink:
        return LogSink(
            program.log_path(name, stream),
            program.log_maxbytes(stream),
            program.log_backups(stream),
        )

    def _drop_slot(self, slot: Slot) -> None:
        for timer in list(slot.timers):
            self._cancel_timer(slot, timer)
        self._drain_output(slot)
        for fd in list(slot.readers):
            self._close_reader(slot, fd)
        slot.stdout.close()
        slot.stderr.close()
        if self.slots.pop(slot.name, None) is not None:
            self.state_counts[slot.process.state] -= 1

    def _retire_program(self, name: str) -> None:
        """Stop a program's processes; each is dropped once down (then its replacement)."""
        slots = [self.slots[n] for n in self.programs.get(name, []) if n in self.slots]
        for slot in slots:
            slot.retiring = True
            self.send(slot.name, Stop())
            if self.slots.get(slot.name) is slot and slot.is_down():
                self._retire(slot)

    def _retire(self, slot: Slot) -> None:
        program = slot.program
        self._drop_slot(slot)
        names = self.programs.get(program, [])
        if any(n in self.slots for n in names):
            return
        self.programs.pop(program, None)
        replacement = self.replacements.pop(program, None)
        if replacement is not None and not self.shutting_down:
            self._add_program(replacement)
            self._autostart([replacement])

    # -- reload -----------------------------------------------------------------------

    def reload(self) -> tuple[list[str], list[str], list[str]]:
        """SIGHUP: apply the config file's changes; raises ConfigError (nothing changed).

        A program whose old processes are still stopping (changed or removed by an
        earlier reload) is parked in `replacements` and created once they are gone.
        """
        if self.shutting_down:
            self.log.warning("reload_ignored", reason="shutting down")
            return [], [], []
        self.notifier.reloading(self.status_line())
        try:
            new = load(self.config.path)
        except ConfigError as exc:
            self.log.error("reload_failed", problems=[str(p) for p in exc.problems])
            self.notifier.ready(self.status_line())  # still running, on the old config
            raise
        old = self.config.programs
        added = [n for n in new.programs if n not in old]
        removed = [n for n in old if n not in new.programs]
        changed = [n for n in new.programs if n in old and new.programs[n] != old[n]]
        self.config = new
        for name in removed:
            self.replacements.pop(name, None)  # an earlier reload's pending version
        for name in changed:
            self.replacements[name] = new.programs[name]
        for name in removed + changed:
            self._retire_program(name)
        for name in added:
            if name in self.programs:  # removed earlier, still stopping: add it after
                self.replacements[name] = new.programs[name]
            else:
                self._add_program(new.programs[name])
        self._autostart(new.programs[n] for n in added if n not in self.replacements)
        self._release_memory()
        self.log.info("config_reloaded", added=added, changed=changed, removed=removed)
        self.notifier.ready(self.status_line())
        return added, changed, removed

    # -- shutdown ---------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop everything, highest priority number first; a second call kills."""
        if self.shutting_down:
            self.log.warning("shutdown_forced")
            for name in list(self.slots):
                self.send(name, Stop())  # BACKOFF and STARTING processes too
                self.send(name, ForceKill())
            return
        self.shutting_down = True
        self.notifier.stopping(self.status_line())
        self.log.info("shutdown_started")
        self._shutdown_step()

    def _shutdown_step(self) -> None:
        """Stop the next priority group once the previous one is down; exit when all are.

        Called after every transition during shutdown, so it does O(1) work until the
        current group is down. Stopping a process in BACKOFF settles at once and calls
        back here: a re-entrant call only asks the outer one to look again.
        """
        if self._stepping:
            self._step_again = True
            return
        self._stepping = True
        try:
            self._step_again = True
            while self._step_again:
                self._step_again = False
                self._stop_next_group()
        finally:
            self._stepping = False

    def _stop_next_group(self) -> None:
        group = self._stopping_group
        while group:  # the group's processes still alive, checked oldest first
            slot = next(iter(group))
            if self.slots.get(slot.name) is slot and not slot.is_down():
                return
            del group[slot]
        live = [s for s in self.slots.values() if not s.is_down()]
        if not live:
            self.running = False
            return
        top = max(s.config.priority for s in live)
        group.update(dict.fromkeys(s for s in live if s.config.priority == top))
        for slot in list(group):
            self.send(slot.name, Stop())


def reset_inherited_signals() -> None:
    """Start from known signal state whatever the launcher left us.

    A launcher that set SIGCHLD to SIG_IGN would make the kernel reap our children and
    lose their exit statuses; a blocked mask would hide signals from the signalfd.
    """
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
    for signum in (*DAEMON_SIGNALS, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="supd", description="supervise processes")
    parser.add_argument("-c", "--config", default="/etc/supd/supd.toml", help="config file")
    parser.add_argument("--check", action="store_true", help="validate the config and exit")
    parser.add_argument("--version", action="version", version=f"supd {__version__}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_CONFIG
    if args.check:
        print(summary(config))
        return EXIT_OK
    daemonlog.configure(config.supervisor.log_format, config.supervisor.log_level)
    reset_inherited_signals()
    systemd = notify.take_systemd_environment(os.environ)  # ours, never a child's
    listen_fd = activation.control_socket_fd(systemd, unset=False)
    spawn.mark_inherited_fds_cloexec()
    spawn.raise_fd_limit()
    daemon = Daemon(config, notifier=notify.Notifier.from_environ(systemd))
    try:
        daemon.setup(listen_fd)
        return daemon.run()
    except SocketUnusable as exc:  # another supd on the path, a file in the way...
        print(f"supd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    finally:
        daemon.close()


if __name__ == "__main__":
    raise SystemExit(main())
