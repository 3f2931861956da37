"""The fleet: every supervised process as one pure state machine. No I/O, no clock.

One level above `process.py`. The fleet owns the `Process` of every program, the
reload plan (what to add, stop, replace, keep), the shutdown plan (priority groups, in
order), the pending requests of clients, and every process timer (a deadline heap).
Its whole interface is `handle(event, now) -> effects`: the daemon turns what happened
(a child exited, the clock reached `next_deadline()`, a client asked for something)
into one `FleetEvent`, and carries out the effects, each tagged with the process it
concerns. Nothing here spawns, signals, logs or reads a clock, so every scenario is
tested as data with a fake clock (tests/test_fleet.py).

Requests are answered by the transitions they cause. Each start, stop or restart ends
in exactly one `Outcome` per process:

- it reached its target (RUNNING for start and restart; down for stop);
- or it failed: FATAL, a spawn error, or it exited and will not come back (BAD_STATE);
- or a later conflicting command took it over (SUPERSEDED): a stop after a start, a
  start or restart after a stop, a reload that replaces or removes the program, or
  shutdown, which answers every request that wants a process up.

A request never waits on a state it can no longer reach: what it waits for is a
transition, seen as it happens, not a state looked at later.
"""

from __future__ import annotations

import enum
import heapq
import itertools
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import assert_never

from . import process as proc
from .deaths import Death, DeathRing, no_jitter
from .facts import ErrorCode, State
from .names import ALL as ALL_NAMES
from .names import is_pattern
from .names import select as select_names
from .process import DOWN_STATES, Process, Timer, Want
from .reloadplan import (
    KeyChange,
    PlanEntry,
    ReloadPlan,
    Step,
    changed_keys,
    logs_changed,
    show,
    step_for_change,
    visible_changes,
)
from .settings import Program

# -- events: what happened ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Boot:
    """The daemon is up: create every program of the config and autostart them."""

    programs: tuple[Program, ...]


@dataclass(frozen=True, slots=True)
class ChildEvent:
    """Something happened to a process's child: spawned, failed to spawn, exited."""

    name: str
    event: proc.Spawned | proc.SpawnFailed | proc.Exited | proc.ProbeResult | proc.Notified


@dataclass(frozen=True, slots=True)
class Tick:
    """The clock reached `next_deadline()`: fire the timers that are due."""


class Action(enum.Enum):
    START = "start"
    STOP = "stop"
    RESTART = "restart"


@dataclass(frozen=True, slots=True)
class Submit:
    """A client's start, stop or restart of `names` (process names, resolved)."""

    request: int
    action: Action
    names: tuple[str, ...]
    wait: bool = True


@dataclass(frozen=True, slots=True)
class Reload:
    """The config's new programs (already loaded and valid)."""

    programs: tuple[Program, ...]


@dataclass(frozen=True, slots=True)
class Shutdown:
    """Stop everything by priority, then exit; a second one SIGKILLs what is left."""


@dataclass(frozen=True, slots=True)
class Await:
    """A client waits until each of `names` meets `condition` (`supctl wait`)."""

    request: int
    names: tuple[str, ...]
    condition: str


@dataclass(frozen=True, slots=True)
class Unawait:
    """The client that sent `Await(request)` has gone: forget it."""

    request: int


@dataclass(frozen=True, slots=True)
class ClearHistory:
    """`supctl clear`: forget these processes' deaths and failure counters."""

    names: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Adopt:
    """A re-exec'd daemon takes over what the old one ran: processes already in their
    states (with their children), timers at their deadlines, reload work under way."""

    programs: tuple[Program, ...]
    processes: tuple[Process, ...]
    timers: tuple[tuple[str, Timer, float], ...] = ()  # (process, timer, deadline)
    retiring: tuple[str, ...] = ()
    swaps: tuple[tuple[str, Program], ...] = ()


FleetEvent = (
    Boot | ChildEvent | Tick | Submit | Reload | Shutdown | ClearHistory | Await | Unawait | Adopt
)


# -- effects: what the daemon must do ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CreateSlot:
    """A new process: open its log sinks."""

    name: str
    program: Program


@dataclass(frozen=True, slots=True)
class DropSlot:
    """A process removed by a reload is down: close its logs and forget it."""

    name: str


@dataclass(frozen=True, slots=True)
class Spawn:
    name: str
    program: Program


@dataclass(frozen=True, slots=True)
class Kill:
    name: str
    signum: int
    group: bool


@dataclass(frozen=True, slots=True)
class Transitioned:
    name: str
    old: State
    new: State
    reason: str
    pid: int | None  # the process's latest pid (kept after it ends, for the logs)
    failures: int
    delay_s: float | None  # BACKOFF: seconds until the restart


@dataclass(frozen=True, slots=True)
class Ignored:
    name: str
    state: State
    event: proc.ProcessEvent


@dataclass(frozen=True, slots=True)
class Outcome:
    """One process's answer to a start, stop or restart."""

    name: str
    ok: bool
    state: State | None
    error: str | None = None
    code: ErrorCode | None = None  # BAD_STATE or SUPERSEDED when not ok


@dataclass(frozen=True, slots=True)
class Answer:
    request: int
    outcomes: tuple[Outcome, ...]


@dataclass(frozen=True, slots=True)
class Ready:
    """Every autostart process has settled (none is STARTING) for the first time."""


@dataclass(frozen=True, slots=True)
class Exit:
    """Shutdown is complete: every process is down."""


@dataclass(frozen=True, slots=True)
class RunProbe:
    """Run a ready or health probe for a process; answer with a ChildEvent(ProbeResult)."""

    name: str
    program: Program
    probe: proc.Probe


@dataclass(frozen=True, slots=True)
class CancelProbe:
    name: str


@dataclass(frozen=True, slots=True)
class HealthChanged:
    name: str
    healthy: bool
    message: str


@dataclass(frozen=True, slots=True)
class Died:
    """A process's run ended (or never began): its death record, classified."""

    name: str
    death: Death


@dataclass(frozen=True, slots=True)
class UpdateSlot:
    """A reload changed a live process's log settings: reopen its log sinks."""

    name: str
    program: Program


@dataclass(frozen=True, slots=True)
class ReadyProbeChanged:
    """A reload changed the ready probe of a process still waiting to be ready: the
    daemon watches its output for the new probe's line (`log`), or stops watching."""

    name: str


@dataclass(frozen=True, slots=True)
class ReloadPlanned:
    """What a reload does to each process; the fleet applies exactly this plan."""

    plan: ReloadPlan


FleetEffect = (
    CreateSlot
    | DropSlot
    | Spawn
    | Kill
    | Transitioned
    | Ignored
    | Answer
    | Ready
    | Exit
    | UpdateSlot
    | ReadyProbeChanged
    | ReloadPlanned
    | Died
    | RunProbe
    | CancelProbe
    | HealthChanged
)


@dataclass(frozen=True, slots=True)
class _Reconfigure:
    """For `_send`: a reload's new program for a live process (Process.reconfigure)."""

    config: Program


class UnknownNames(Exception):
    def __init__(self, names: list[str]) -> None:
        super().__init__(f"no such process: {', '.join(names)}")
        self.names = names


def reload_diff(
    old: Mapping[str, Program], new: Mapping[str, Program]
) -> tuple[list[str], list[str], list[str]]:
    """(added, changed, removed) program names, from the old config to the new."""
    added = [n for n in new if n not in old]
    changed = [n for n in new if n in old and new[n] != old[n]]
    removed = [n for n in old if n not in new]
    return added, changed, removed


# -- pending requests -------------------------------------------------------------------


class _Phase(enum.Enum):
    STOP_FIRST = "stop first"  # restart: waiting to be down before the start
    WAIT = "wait"  # waiting for the target


@dataclass(slots=True)
class _Part:
    """One process's share of a request."""

    up: bool  # the target: RUNNING (True) or down (False)
    phase: _Phase = _Phase.WAIT
    down: bool = False  # restart: it has been down since the request


@dataclass(slots=True)
class _Request:
    id: int
    action: Action
    names: tuple[str, ...]
    parts: dict[str, _Part] = field(default_factory=dict)  # not answered yet
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    replied: bool = False  # wait=false: answered at once, the plan still runs
    planning: bool = False  # restart: its stops and starts are not all sent yet
    stop_groups: list[list[str]] = field(default_factory=list)  # restart, next first
    stopping: deque[str] = field(default_factory=deque)  # restart: the group going down
    stop_after: list[str] = field(default_factory=list)  # stop: waiting for dependants


# -- the fleet ----------------------------------------------------------------------------


class Fleet:
    def __init__(self, draw: Callable[[], float] = no_jitter) -> None:
        """`draw`: backoff jitter's randomness, in [0, 1] (the daemon's is random.random;
        the default gives every delay its upper bound)."""
        self.draw = draw
        self.kept_deaths: dict[str, DeathRing] = {}  # a replaced program's, by process
        self.processes: dict[str, Process] = {}
        self.programs: dict[str, list[str]] = {}  # program -> its live process names
        self.configs: dict[str, Program] = {}  # the config's programs, as desired
        self.retiring: set[str] = set()  # stopping for a reload; dropped once down
        # Restarting for a reload: once down, the process takes this config and starts.
        self.swaps: dict[str, Program] = {}
        # New processes whose names a stopping process still holds: (program, names),
        # created together once every one of those names is free.
        self.parked: list[tuple[Program, list[str]]] = []
        self.state_counts: dict[State, int] = dict.fromkeys(State, 0)
        self.shutting_down = False
        self.exited = False
        self.booted = False
        self.ready = False
        self._requests: dict[int, _Request] = {}
        self._claims: dict[str, list[_Request]] = {}  # process -> requests waiting on it
        self._shutdown_group: deque[str] = deque()  # the priority group going down
        # Timers: a heap of (deadline, serial, process, timer); the live serial of each
        # (process, timer) is in _timers, and entries it no longer names are stale.
        self._heap: list[tuple[float, int, str, Timer]] = []
        self._timers: dict[tuple[str, Timer], int] = {}
        self._serials = itertools.count()
        self._out: list[FleetEffect] = []
        self._now = 0.0  # the `now` of the event being handled
        # Dependencies (issue 14): processes whose start waits for their dependencies
        # (insertion-ordered), and dependencies that left RUNNING during this event.
        self._held: dict[str, None] = {}
        self._left_running: list[str] = []
        self._unhealthy = 0  # processes with healthy False, kept by _send
        # program -> the programs that restart with it (on_dependency_restart = restart)
        self._restart_with: dict[str, list[str]] = {}
        # `supctl wait`: request -> (condition, names not met yet, outcomes so far)
        self._awaits: dict[int, tuple[str, tuple[str, ...], dict[str, Outcome]]] = {}

    # -- the interface -----------------------------------------------------------------

    def handle(self, event: FleetEvent, now: float) -> list[FleetEffect]:
        """Feed one event; returns what the daemon must do, in order."""
        out: list[FleetEffect] = []
        self._out = out
        self._now = now
        match event:
            case Boot(programs=programs):
                self.booted = True
                for program in programs:
                    self.configs[program.name] = program
                    self._add(program)
                self._index_restart_with()
                self._autostart(programs, now)
            case ChildEvent(name=name, event=child_event):
                if name in self.processes:
                    self._send(name, child_event, now)
            case Tick():
                self._fire_due_timers(now)
            case Submit():
                self._submit(event, now)
            case Reload(programs=programs):
                self._reload(programs, now)
            case Shutdown():
                self._shutdown(now)
            case Await(request=request, names=names, condition=condition):
                self._awaits[request] = (condition, names, {})
            case Unawait(request=request):
                self._awaits.pop(request, None)
            case ClearHistory(names=names):
                for name in names:
                    if name in self.processes:
                        self.processes[name].clear_history()
            case Adopt():
                self._adopt(event)
            case _:
                assert_never(event)
        self._follow_up(now)
        self._out = []
        return out

    def next_deadline(self) -> float | None:
        """When the daemon must send the next `Tick` (monotonic seconds), or None."""
        heap, timers = self._heap, self._timers
        while heap and timers.get((heap[0][2], heap[0][3])) != heap[0][1]:
            heapq.heappop(heap)  # cancelled or re-armed since
        return heap[0][0] if heap else None

    def resolve(self, names: Iterable[str] | None) -> list[str]:
        """Process names for `names`: processes, programs, groups, `NAME:*`, `NAME:`,
        shell-style patterns or "all" (names.py says how each is read)."""
        names = list(names or ())
        if not names:
            return list(self.processes)
        direct = self._resolve_directly(names)
        if direct is not None:
            return direct
        found, unknown = select_names(names, self._named_sets())
        if unknown:
            raise UnknownNames(unknown)
        return found

    def _resolve_directly(self, names: list[str]) -> list[str] | None:
        """`resolve` in O(len(names)) for the common names, None for the others.

        `_named_sets` costs O(programs) (4.9 ms for `status NAME` at 10,000 programs).
        A program's name means its processes before anything else but `all`; a name
        with a colon cannot be a program's or a group's (config.py's name rule), so a
        process named so means itself, and `PROGRAM:` / `PROGRAM:*` its program's.
        Anything else (`all`, patterns, groups, a process named without a colon) goes
        the long way, so the order of names.py's rules is kept."""
        found: list[str] = []
        for name in names:
            if name == ALL_NAMES:
                return None
            members = self.programs.get(name)
            if members is None:
                program, colon, rest = name.rpartition(":")
                if colon and rest in ("", "*"):
                    members = self.programs.get(program)
                elif colon and not is_pattern(name) and name in self.processes:
                    members = [name]
            if members is None:
                return None
            found += members
        return list(dict.fromkeys(found))

    def _named_sets(self) -> dict[str, list[str]]:
        """Every name that stands for several processes: programs, then groups."""
        named = dict(self.programs)
        for program, processes in self.programs.items():
            config = self.configs.get(program)
            group = config.group_name if config is not None else program
            if group != program and group not in self.programs:
                named.setdefault(group, []).extend(processes)
        return named

    def armed_timers(self) -> dict[str, list[tuple[Timer, float]]]:
        """Every armed timer and its deadline, by process (for a re-exec)."""
        out: dict[str, list[tuple[Timer, float]]] = {}
        for deadline, serial, name, timer in self._heap:
            if self._timers.get((name, timer)) == serial:
                out.setdefault(name, []).append((timer, deadline))
        return out

    def _adopt(self, adopt: Adopt) -> None:
        self.booted = self.ready = True  # the old daemon was; Ready is not said twice
        self.configs = {p.name: p for p in adopt.programs}
        for process in adopt.processes:
            self.processes[process.name] = process
            self.programs.setdefault(process.config.name, []).append(process.name)
            self.state_counts[process.state] += 1
            self._unhealthy += process.healthy is False
            if process.waiting_for is not None:  # held for its dependencies: still is
                self._held[process.name] = None
            self._out.append(CreateSlot(process.name, process.config))
        for name, timer, deadline in adopt.timers:
            if name not in self.processes:
                continue
            if timer is Timer.PROBE_TIMEOUT:  # its probe was the old image's: probe anew
                self._arm(name, Timer.PROBE, self._now)
            else:
                self._arm(name, timer, deadline)
        self.retiring = {n for n in adopt.retiring if n in self.processes}
        self.swaps = {n: p for n, p in adopt.swaps if n in self.processes}
        self._index_restart_with()

    def status_counts(self) -> dict[str, int]:
        return {state.value: n for state, n in self.state_counts.items()}

    def unhealthy_count(self) -> int:
        """Processes whose health check failed (UNHEALTHY) now."""
        return self._unhealthy

    # -- processes ---------------------------------------------------------------------

    def _add(self, program: Program) -> None:
        names = program.process_names()
        self.programs[program.name] = names
        for name in names:
            self.processes[name] = Process(name, program, draw=self.draw)
            kept = self.kept_deaths.pop(name, None)
            if kept is not None:  # deaths survive a reload that keeps the program
                self.processes[name].history.extend(kept)
            self.state_counts[State.STOPPED] += 1
            self._out.append(CreateSlot(name, program))

    def _autostart(self, programs: Iterable[Program], now: float) -> None:
        if self.shutting_down:
            return
        for program in sorted(programs, key=lambda p: p.start_order):
            if program.autostart:
                for name in self.programs.get(program.name, []):
                    self._start(name, now)

    def _send(self, name: str, event: proc.ProcessEvent | _Reconfigure, now: float) -> None:
        """Feed one process; turn its effects into fleet effects and settle requests."""
        process = self.processes[name]
        changes: list[State] = []
        if isinstance(event, proc.Stop):
            self._unhold(name)
        was_unhealthy = process.healthy is False
        last_death = process.history[-1] if process.history else None
        if isinstance(event, _Reconfigure):
            effects = process.reconfigure(event.config, now)
        else:
            effects = process.handle(event, now)
        if process.history and process.history[-1] is not last_death:
            self._out.append(Died(name, process.history[-1]))
        for effect in effects:
            match effect:
                case proc.Spawn():
                    self._out.append(Spawn(name, process.config))
                case proc.Kill(signum=signum, group=group):
                    self._out.append(Kill(name, signum, group))
                case proc.ArmTimer(timer=timer, delay_s=delay_s):
                    self._arm(name, timer, now + delay_s)
                case proc.CancelTimer(timer=timer):
                    self._timers.pop((name, timer), None)
                case proc.Transitioned(old=old, new=new, reason=reason):
                    self.state_counts[old] -= 1
                    self.state_counts[new] += 1
                    changes.append(new)
                    if old is State.RUNNING:
                        self._left_running.append(name)
                    delay = None
                    if new is State.BACKOFF and process.backoff_until is not None:
                        delay = process.backoff_until - now
                    self._out.append(
                        Transitioned(
                            name, old, new, reason, process.last_pid, process.failures, delay
                        )
                    )
                case proc.Ignored(state=state, event=ignored):
                    self._out.append(Ignored(name, state, ignored))
                case proc.RunProbe(probe=probe):
                    self._out.append(RunProbe(name, process.config, probe))
                case proc.CancelProbe():
                    self._out.append(CancelProbe(name))
                case proc.HealthChanged(healthy=healthy, message=message):
                    self._out.append(HealthChanged(name, healthy, message))
        self._unhealthy += (process.healthy is False) - was_unhealthy
        self._settle(name, changes)

    def _settle(self, name: str, changes: list[State]) -> None:
        """After a process moved: answer what it settled, drop it if it was retiring."""
        if name not in self._claims and name not in self.retiring and name not in self.swaps:
            return  # the common case (a probe, a timer): nothing waits on it
        process = self.processes[name]
        claims = list(self._claims.get(name, ()))
        # A restart still to bring it up: a start waiting meanwhile sees it go down on
        # the way, and is answered by where the restart takes it, not by the stop.
        restarting = any(
            r.parts[name].phase is _Phase.STOP_FIRST for r in claims if name in r.parts
        )
        for request in claims:
            part = request.parts.get(name)
            if part is None:
                continue
            if part.phase is _Phase.STOP_FIRST:
                if any(s in DOWN_STATES for s in changes):
                    part.down = True
                continue
            outcome = _judge(process, part.up, changes, restarting)
            if outcome is not None:
                self._resolve(request, name, outcome)
        if name in self.retiring and process.state in DOWN_STATES:
            self._drop(name)
        elif name in self.swaps and process.state in DOWN_STATES:
            self._swap(name)

    def _drop(self, name: str) -> None:
        process = self.processes.pop(name)
        self.retiring.discard(name)
        self._unhold(name)
        self._unhealthy -= process.healthy is False
        self.state_counts[process.state] -= 1
        for timer in Timer:
            self._timers.pop((name, timer), None)
        self._out.append(DropSlot(name))
        if any(name in names for _, names in self.parked) and process.history:
            self.kept_deaths[name] = process.history  # it comes back: its deaths too
        self._unlist(name, process.config.name)
        self._unpark()

    # -- timers ------------------------------------------------------------------------

    def _fire_due_timers(self, now: float) -> None:
        """Fire what is due now; timers armed meanwhile wait for the next Tick, so even
        a 0 s timer goes back through the daemon's loop."""
        due: list[tuple[float, int, str, Timer]] = []
        heap, timers = self._heap, self._timers
        while heap and heap[0][0] <= now:
            due.append(heapq.heappop(heap))
        for _, serial, name, timer in due:
            if timers.get((name, timer)) == serial:  # not cancelled, even by this Tick
                del timers[(name, timer)]
                self._send(name, proc.TimerFired(timer), now)

    def _arm(self, name: str, timer: Timer, deadline: float) -> None:
        serial = next(self._serials)
        self._timers[(name, timer)] = serial
        heap = self._heap
        heapq.heappush(heap, (deadline, serial, name, timer))
        if len(heap) > 2 * len(self._timers) + 64:  # mostly cancelled entries: compact
            self._heap = [e for e in heap if self._timers.get((e[2], e[3])) == e[1]]
            heapq.heapify(self._heap)

    # -- requests ----------------------------------------------------------------------

    def _submit(self, submit: Submit, now: float) -> None:
        up = submit.action is not Action.STOP
        request = _Request(submit.request, submit.action, submit.names)
        self._requests[request.id] = request
        for name in submit.names:
            self._claims.setdefault(name, []).append(request)
            request.parts[name] = _Part(
                up, _Phase.STOP_FIRST if submit.action is Action.RESTART else _Phase.WAIT
            )
        for name in submit.names:
            if name not in self.processes or name in self.retiring or name in self.swaps:
                why = "being replaced or removed by a reload"
                self._resolve(request, name, self._superseded(name, why))
            elif up and self.shutting_down:
                self._resolve(request, name, self._superseded(name, "supd is shutting down"))
            else:
                self._supersede_conflicts(name, up, request)
        request.replied = not submit.wait  # wait=false: the answer below, at once
        match submit.action:
            case Action.START:
                for name in list(request.parts):
                    if name in request.parts:
                        self._start(name, now)
            case Action.STOP:
                request.stop_after = list(request.parts)
                self._stop_dependants_first(request, now)
            case Action.RESTART:
                # Stop by priority groups, highest number first, each one down before
                # the next; then start them all, lowest first (as boot and shutdown do).
                by_priority: dict[tuple[int, int], list[str]] = {}
                for name in request.parts:
                    priority = self.processes[name].config.start_order
                    by_priority.setdefault(priority, []).append(name)
                request.stop_groups = [by_priority[p] for p in sorted(by_priority, reverse=True)]
                request.planning = True
        if not submit.wait:
            self._reply_accepted(request)
        self._finish_if_done(request)

    def _supersede_conflicts(self, name: str, up: bool, newer: _Request) -> None:
        for request in list(self._claims.get(name, ())):
            part = request.parts.get(name)
            if request is newer or part is None or part.up == up:
                continue
            by = "start" if up else "stop"
            by = "restart" if newer.action is Action.RESTART else by
            self._resolve(request, name, self._superseded(name, f"superseded by a later {by}"))

    def _superseded(self, name: str, why: str) -> Outcome:
        process = self.processes.get(name)
        state = process.state if process is not None else None
        return Outcome(name, False, state, why, ErrorCode.SUPERSEDED)

    def _reply_accepted(self, request: _Request) -> None:
        """wait=false: ok means "under way" (or the state it is already in)."""
        outcomes = []
        for name in request.names:
            done = request.outcomes.get(name)
            if done is not None:
                outcomes.append(done)
                continue
            process = self.processes[name]
            fatal = process.state is State.FATAL and request.action is not Action.STOP
            outcomes.append(_failed(process) if fatal else Outcome(name, True, process.state))
        self._out.append(Answer(request.id, tuple(outcomes)))
        if request.action is not Action.RESTART:  # nothing more to follow
            for name in list(request.parts):
                self._release(request, name)

    def _resolve(self, request: _Request, name: str, outcome: Outcome) -> None:
        if name not in request.parts:
            return
        request.outcomes[name] = outcome
        self._release(request, name)
        self._finish_if_done(request)

    def _release(self, request: _Request, name: str) -> None:
        request.parts.pop(name, None)
        claims = self._claims.get(name)
        if claims is not None and request in claims:
            claims.remove(request)
            if not claims:
                del self._claims[name]

    def _finish_if_done(self, request: _Request) -> None:
        if request.parts or request.id not in self._requests:
            return
        del self._requests[request.id]
        if not request.replied:
            request.replied = True
            outcomes = tuple(request.outcomes[n] for n in request.names)
            self._out.append(Answer(request.id, outcomes))

    def _advance_restart(self, request: _Request, now: float) -> None:
        """Stop the next group once the current one has been down; then start them all.
        Amortised O(1) per event: a name leaves `stopping` once, from the front."""
        parts, stopping = request.parts, request.stopping
        while request.planning and parts:
            while stopping and (stopping[0] not in parts or parts[stopping[0]].down):
                stopping.popleft()
            if stopping:
                return  # the current group is still going down
            if request.stop_groups:
                stopping.extend(n for n in request.stop_groups.pop(0) if n in parts)
                for name in list(stopping):
                    if name not in parts:
                        continue  # superseded by what stopping another one caused
                    if self.processes[name].state in DOWN_STATES:
                        parts[name].down = True
                    else:
                        self._send(name, proc.Stop(), now)
                continue
            request.planning = False
            waiting = [n for n, p in parts.items() if p.phase is _Phase.STOP_FIRST]
            for name in waiting:
                parts[name].phase = _Phase.WAIT
            for name in sorted(waiting, key=lambda n: self.processes[n].config.start_order):
                if name in parts:
                    self._start(name, now)

    # -- reload ------------------------------------------------------------------------

    def plan_reload(self, programs: Iterable[Program]) -> ReloadPlan:
        """What `Reload(programs)` would do now, changing nothing (a dry run)."""
        return self._plan({p.name: p for p in programs})

    def _plan(self, new: Mapping[str, Program]) -> ReloadPlan:
        desired: dict[str, Program] = {}  # process name -> its new program
        for program in new.values():
            for name in program.process_names():
                desired[name] = program
        entries: list[PlanEntry] = []
        stops: list[PlanEntry] = []
        for name, process in self.processes.items():
            if name in self.retiring:
                continue
            current = self.swaps.get(name, process.config)
            target = desired.get(name)
            if target is None:
                stops.append(PlanEntry(name, current.name, Step.STOP))
            elif target.name != current.name:  # the name passes to another program
                moved = KeyChange("program", show(current.name), show(target.name))
                shown = (moved, *visible_changes(changed_keys(current, target)))
                step = Step.RESTART if process.want is Want.UP else _new_step(target)
                entries.append(PlanEntry(name, target.name, step, shown))
            elif target == current:
                entries.append(PlanEntry(name, target.name, Step.UNCHANGED))
            else:
                changes = changed_keys(current, target)
                step = step_for_change(changes)
                if step is Step.RESTART and process.want is Want.DOWN and name not in self.swaps:
                    step = Step.UPDATE  # not meant to run: the new config is for its next start
                entries.append(PlanEntry(name, target.name, step, visible_changes(changes)))
        for name, target in desired.items():
            if name not in self.processes or name in self.retiring:
                entries.append(PlanEntry(name, target.name, _new_step(target)))
        # numprocs down and removed programs: the highest process numbers go first
        stops.reverse()
        return ReloadPlan((*stops, *entries))

    def _reload(self, programs: tuple[Program, ...], now: float) -> None:
        if self.shutting_down:
            return  # the daemon refuses it; a late one changes nothing
        new = {p.name: p for p in programs}
        plan = self._plan(new)
        self._out.append(ReloadPlanned(plan))
        held = {n: self.processes[n].config.depends_on for n in self._held if n in self.processes}
        self.configs = new
        self._index_restart_with()  # on_dependency_restart, from now on
        self.parked = []  # re-planned below from the newest config
        desired = {name: p for p in programs for name in p.process_names()}
        fresh: dict[str, list[str]] = {}
        for entry in plan.entries:
            name = entry.name
            match entry.step:
                case Step.STOP:
                    self.swaps.pop(name, None)
                    self._retire(name, now)
                case Step.START | Step.ADD if name in self.processes and name not in self.retiring:
                    self._retire(name, now)  # down, its name moves to another program
                    fresh.setdefault(entry.program, []).append(name)
                case Step.START | Step.ADD:
                    fresh.setdefault(entry.program, []).append(name)
                case Step.RESTART:
                    self._restart_for_reload(name, desired[name], now)
                case Step.UPDATE | Step.UNCHANGED:
                    self._update_in_place(name, desired[name])
        for program, names in fresh.items():
            self.parked.append((new[program], names))
        parked = {n for _, names in self.parked for n in names}
        self.kept_deaths = {n: h for n, h in self.kept_deaths.items() if n in parked}
        self._unpark()
        # A process held for its dependencies that a reload gave new ones waits for
        # those, started first as for any start (those it no longer has hold it back no
        # more). The others wait as they did: a reload restarts no FATAL dependency.
        for name, depends_on in held.items():
            process = self.processes.get(name)
            if process is None or name not in self._held or name in self.retiring:
                continue
            if process.is_down() and process.config.depends_on != depends_on:
                self._start(name, now)

    def _retire(self, name: str, now: float) -> None:
        """Stop a process for good; it is dropped once down."""
        self.retiring.add(name)
        self._supersede_for_reload(name)
        self._send(name, proc.Stop(by="reload"), now)

    def _restart_for_reload(self, name: str, target: Program, now: float) -> None:
        """Stop it; once down it takes `target` and starts again (see _swap)."""
        first = name not in self.swaps
        self.swaps[name] = target
        if first:
            self._supersede_for_reload(name)
            self._send(name, proc.Stop(by="reload"), now)

    def _supersede_for_reload(self, name: str) -> None:
        for request in list(self._claims.get(name, ())):
            why = "being replaced or removed by a reload"
            self._resolve(request, name, self._superseded(name, why))

    def _update_in_place(self, name: str, target: Program) -> None:
        if name in self.swaps:  # still restarting: it comes back with the newest config
            self.swaps[name] = target
            return
        process = self.processes[name]
        old = process.config
        if old is target or old == target:
            process.config = target
            return
        # The run under way follows the new readiness and health checks at once.
        starting = process.state is State.STARTING
        self._send(name, _Reconfigure(target), self._now)
        if starting and old.ready != target.ready:  # (RUNNING now, if ready was removed)
            self._out.append(ReadyProbeChanged(name))
        if logs_changed(old, target):
            self._out.append(UpdateSlot(name, target))

    def _swap(self, name: str) -> None:
        """A process restarted by a reload is down: give it its new config and start it
        again (a fresh Process: the new version's failure counters start from zero)."""
        target = self.swaps.pop(name)
        old = self.processes[name]
        if old.config.name != target.name:
            self._unlist(name, old.config.name)
            self.programs.setdefault(target.name, []).append(name)
        fresh = Process(name, target, draw=self.draw)
        fresh.history.extend(old.history)  # its deaths stay with its name
        self.state_counts[old.state] -= 1
        self.state_counts[fresh.state] += 1
        self.processes[name] = fresh
        for timer in Timer:
            self._timers.pop((name, timer), None)
        if logs_changed(old.config, target):
            self._out.append(UpdateSlot(name, target))
        if not self.shutting_down:  # only what was meant to be up is restarted
            self._send(name, proc.Start(), self._now)

    def _unlist(self, name: str, program: str) -> None:
        names = self.programs.get(program, [])
        if name in names:
            names.remove(name)
        if not names:
            self.programs.pop(program, None)

    def _unpark(self) -> None:
        """Create the parked processes whose names are all free now, and start them."""
        if self.shutting_down or not self.parked:
            return
        ready = [
            (p, names) for p, names in self.parked if not any(n in self.processes for n in names)
        ]
        if not ready:
            return
        self.parked = [entry for entry in self.parked if entry not in ready]
        for program, names in ready:
            listed = self.programs.setdefault(program.name, [])
            for name in names:
                listed.append(name)
                self.processes[name] = Process(name, program, draw=self.draw)
                kept = self.kept_deaths.pop(name, None)
                if kept is not None:  # removed and added back while stopping
                    self.processes[name].history.extend(kept)
                self.state_counts[State.STOPPED] += 1
                self._out.append(CreateSlot(name, program))
        for program, names in sorted(ready, key=lambda entry: entry[0].start_order):
            if program.autostart:
                for name in names:
                    self._send(name, proc.Start(), self._now)

    # -- shutdown ----------------------------------------------------------------------

    def _shutdown(self, now: float) -> None:
        if self.shutting_down:  # the second one: SIGKILL whatever is left
            for name in list(self.processes):
                if name in self.processes:
                    self._send(name, proc.Stop(by="shutdown"), now)  # BACKOFF, STARTING too
                if name in self.processes:
                    self._send(name, proc.ForceKill(), now)
            return
        self.shutting_down = True
        self.parked.clear()
        for name in list(self._held):
            self._unhold(name)
        for request in list(self._requests.values()):
            for name, part in list(request.parts.items()):
                if part.up:
                    self._resolve(request, name, self._superseded(name, "supd is shutting down"))

    def _shutdown_step(self, now: float) -> None:
        """Stop the next priority group once the previous one is down; exit when all are.
        Amortised O(1) per event until a group is down (a name leaves the group once)."""
        group, processes = self._shutdown_group, self.processes
        while not self.exited:
            while group and (group[0] not in processes or processes[group[0]].is_down()):
                group.popleft()
            if group:
                return
            live = [p for p in processes.values() if not p.is_down()]
            if not live:
                self.exited = True
                for request in list(self._requests.values()):
                    for name in list(request.parts):
                        self._resolve(request, name, self._now_outcome(name))
                self._out.append(Exit())
                return
            # Dependants before their dependencies, whatever the priorities say.
            needed = {d.program for p in live for d in p.config.depends_on}
            live = [p for p in live if p.config.name not in needed] or live
            top = max(p.config.start_order for p in live)
            group.extend(p.name for p in live if p.config.start_order == top)
            for name in list(group):
                self._send(name, proc.Stop(by="shutdown"), now)

    def _now_outcome(self, name: str) -> Outcome:
        process = self.processes.get(name)
        if process is None:
            return self._superseded(name, "removed")
        return Outcome(name, process.state in DOWN_STATES, process.state)

    # -- after every event -------------------------------------------------------------

    def _follow_up(self, now: float) -> None:
        self._dependencies_follow(now)
        for request in list(self._requests.values()):
            if request.planning:
                self._advance_restart(request, now)
                self._finish_if_done(request)
            if request.stop_after:
                self._stop_dependants_first(request, now)
        if self.shutting_down:
            self._shutdown_step(now)
        if self._awaits:
            self._answer_awaits()
        if (
            self.booted
            and not self.ready
            and not self.state_counts[State.STARTING]
            and all(self._stuck(name) for name in self._held)
        ):
            self.ready = True
            self._out.append(Ready())

    # -- dependencies (issue 14) -------------------------------------------------------
    #
    # A process starts only when every program it depends on meets its condition; until
    # then it is held (STOPPED, "waiting for db (ready)"). Starting a process starts what
    # it depends on first. After every event the held ones are looked at again: O(held)
    # per event, and nothing is held in a config without dependencies.

    def _start(self, name: str, now: float, seen: frozenset[str] = frozenset()) -> None:
        """Start a process once its dependencies are met; start them first if need be."""
        process = self.processes[name]
        for dependency in process.config.depends_on:
            for other in self.programs.get(dependency.program, []):
                target = self.processes[other]
                if other in seen or other in self._held or target.want is Want.UP:
                    continue
                if other in self.retiring or _condition_met(target, dependency.condition):
                    continue
                self._start(other, now, seen | {name})
        reason = self._unmet(process)
        if reason is None:
            self._unhold(name)
            self._send(name, proc.Start(), now)
        else:
            self._held[name] = None
            process.waiting_for = reason

    def _unhold(self, name: str) -> None:
        if self._held.pop(name, 0) is None:
            process = self.processes.get(name)
            if process is not None:
                process.waiting_for = None

    def _unmet(self, process: Process) -> str | None:
        """Why the process cannot start yet ("waiting for db (ready)"), or None."""
        for dependency in process.config.depends_on:
            waiting = f"waiting for {dependency.program} ({dependency.condition})"
            if not self.programs.get(dependency.program) and dependency.program in self.configs:
                return waiting  # being replaced by a reload: none of it is there now
            for other in self.programs.get(dependency.program, []):
                target = self.processes[other]
                if _condition_met(target, dependency.condition):
                    continue
                if target.state is State.FATAL:
                    return f"{waiting}: {other} is FATAL"
                return waiting
        return None

    def _stuck(self, name: str, seen: frozenset[str] = frozenset()) -> bool:
        """A held process that nothing will release without an operator: a dependency
        is FATAL or down for good, or is itself stuck."""
        process = self.processes.get(name)
        if process is None:
            return True
        for dependency in process.config.depends_on:
            for other in self.programs.get(dependency.program, []):
                target = self.processes[other]
                if _condition_met(target, dependency.condition) or other in seen:
                    continue
                if other in self._held:
                    if self._stuck(other, seen | {name}):
                        return True
                elif target.state is State.FATAL or target.want is Want.DOWN:
                    return True
        return False

    def _dependencies_follow(self, now: float) -> None:
        """Restart dependants that asked for it, then start the held processes whose
        dependencies are met now; a held one blocked by a FATAL dependency answers the
        starts waiting on it (it still starts once the dependency recovers)."""
        left, self._left_running = self._left_running, []
        if left and self._restart_with and not self.shutting_down:
            self._restart_dependants(left, now)
        for name in list(self._held):
            process = self.processes.get(name)
            if process is None or not process.is_down():
                continue  # a dependant restarting: held once it is down
            reason = self._unmet(process)
            process.waiting_for = reason
            if reason is None:
                self._unhold(name)
                self._send(name, proc.Start(), now)
                continue
            if "is FATAL" in reason:
                for request in list(self._claims.get(name, ())):
                    part = request.parts.get(name)
                    if part is not None and part.up and part.phase is _Phase.WAIT:
                        outcome = Outcome(name, False, process.state, reason, ErrorCode.BAD_STATE)
                        self._resolve(request, name, outcome)

    def _restart_dependants(self, left: list[str], now: float) -> None:
        """on_dependency_restart = "restart": a dependency left RUNNING, so its dependants
        stop now and start again once it meets their condition (systemd's PartOf)."""
        programs = {self.processes[n].config.name for n in left if n in self.processes}
        dependants = {d for p in programs for d in self._restart_with.get(p, ())}
        for program in dependants:
            for name in list(self.programs.get(program, ())):
                process = self.processes[name]
                if process.want is not Want.UP or name in self.retiring:
                    continue
                self._send(name, proc.Stop(), now)
                self._held[name] = None
                process.waiting_for = self._unmet(process)

    def _answer_awaits(self) -> None:
        """`supctl wait`: answer once every process met the condition; a process that
        can no longer meet it (FATAL; or, for completed, an exit it counts as failure)
        fails its part at once rather than at the client's timeout."""
        for request, (condition, names, outcomes) in list(self._awaits.items()):
            for name in names:
                if name in outcomes:
                    continue
                process = self.processes.get(name)
                if process is None:
                    outcome = self._superseded(name, "removed by a reload")
                elif _condition_met(process, condition):
                    outcome = Outcome(name, True, process.state)
                elif process.state is State.FATAL or (
                    condition == "completed" and process.state is State.EXITED
                ):
                    why = f"cannot become {condition}: {process.state.value}"
                    outcome = Outcome(name, False, process.state, why, ErrorCode.BAD_STATE)
                elif name in self._held and self._stuck(name):
                    why = f"cannot become {condition}: {process.waiting_for}"
                    outcome = Outcome(name, False, process.state, why, ErrorCode.BAD_STATE)
                else:
                    continue
                outcomes[name] = outcome
            if self.shutting_down:
                for name in names:
                    if name not in outcomes:
                        outcomes[name] = self._superseded(name, "supd is shutting down")
            if len(outcomes) == len(names):
                del self._awaits[request]
                self._out.append(Answer(request, tuple(outcomes[n] for n in names)))

    def _index_restart_with(self) -> None:
        self._restart_with = {}
        for config in self.configs.values():
            if config.on_dependency_restart == "restart":
                for dependency in config.depends_on:
                    self._restart_with.setdefault(dependency.program, []).append(config.name)

    def _stop_dependants_first(self, request: _Request, now: float) -> None:
        """A stop of several processes: each one once those that depend on it (in the
        same request) are down."""
        pending = [n for n in request.stop_after if n in request.parts]
        programs = {self.processes[n].config.name for n in pending if n in self.processes}
        busy = set()
        for name in request.parts:  # the request's processes not down yet
            process = self.processes.get(name)
            if process is None or process.is_down():
                continue
            busy |= {d.program for d in process.config.depends_on if d.program in programs}
        later = []
        for name in pending:
            process = self.processes.get(name)
            if process is not None and process.config.name in busy:
                later.append(name)
            elif name in request.parts:
                self._send(name, proc.Stop(), now)
        request.stop_after = later


def _judge(
    process: Process, up: bool, changes: list[State], restarting: bool = False
) -> Outcome | None:
    """A part's outcome after the process moved (or was asked), or None: still waiting."""
    state = process.state
    if not up:
        if state in DOWN_STATES or any(s in DOWN_STATES for s in changes):
            return Outcome(process.name, True, state)
        return None
    if state is State.RUNNING or State.RUNNING in changes:
        return Outcome(process.name, True, state)
    if restarting:
        return None
    if state is State.FATAL or (state in DOWN_STATES and process.want is Want.DOWN):
        return _failed(process)
    return None


def _new_step(program: Program) -> Step:
    return Step.START if program.autostart else Step.ADD


def _condition_met(process: Process, condition: str) -> bool:
    """Does this dependency process meet a dependant's `depends_on` condition?"""
    match condition:
        case "started" | "ready":  # RUNNING means ready: a probe keeps it STARTING
            return process.state is State.RUNNING
        case "healthy":
            healthy = process.config.health is None or process.healthy is True
            return process.state is State.RUNNING and healthy
        case "completed":
            return (
                process.state is State.EXITED
                and process.exit_signal is None
                and process.exit_code in process.config.exitcodes
            )
    return False


def _failed(process: Process) -> Outcome:
    if process.spawn_error:
        error = f"spawn error: {process.spawn_error}"
    elif process.state is State.FATAL:
        error = "exited too quickly (gave up)"
    else:
        error = f"not running ({process.state.value})"
    return Outcome(process.name, False, process.state, error, ErrorCode.BAD_STATE)
