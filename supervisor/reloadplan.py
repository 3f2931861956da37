"""What a reload does to each process, decided from data alone. Pure: no I/O, no clock.

A reload compares every live process with the new config and gives it one step:

- `start`: a new process (a new program, or `numprocs` up) that autostarts;
- `add`: a new process that does not autostart (it is created, and stays STOPPED);
- `stop`: a process whose program was removed, or `numprocs` down (highest first);
- `restart`: a key that shapes the running process changed (`command`, `environment`,
  `directory`, `user`, ...): it is stopped, then started again with the new config;
- `update in place`: only keys that apply without a restart changed (stop settings,
  backoff, priority, log files, readiness, health, dependencies...): same pid, same
  pipes;
- `unchanged`.

Which key does what is one table, `KEY_EFFECTS`. A key the table does not know restarts
the process: the safe default for an option added later by someone who forgot the table.

The fleet computes the plan (it knows the live processes) and applies exactly it, so a
dry run and the real reload agree by construction (tests/test_reloadplan.py).
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .settings import PROGRAM_KEYS, SUPERVISOR_KEYS, Program, toml_data

# Not a program key: whether the child's environment gets NOTIFY_SOCKET, which three keys
# decide (Program.wants_notify_socket). changed_keys shows it when it changes.
NOTIFY_SOCKET = "NOTIFY_SOCKET"


class KeyEffect(enum.Enum):
    IN_PLACE = "in place"  # the new value is used from the next time it matters
    LOGS = "logs"  # in place: the log files are reopened with the new settings
    NAMES = "names"  # decides which processes exist: compared by process name instead
    RESTART = "restart"  # shapes the running process: stop, then start with the new value


# The one table. Add new program keys here; a key missing from it restarts.
KEY_EFFECTS: dict[str, KeyEffect] = {
    # identity and naming: which processes exist is compared name by name
    "name": KeyEffect.NAMES,
    "numprocs": KeyEffect.NAMES,
    "numprocs_start": KeyEffect.NAMES,
    "process_name": KeyEffect.NAMES,
    "process_group": KeyEffect.IN_PLACE,
    "group_priority": KeyEffect.IN_PLACE,
    # what the process is: a new one is needed
    "command": KeyEffect.RESTART,
    "environment": KeyEffect.RESTART,
    "env_files": KeyEffect.RESTART,
    "directory": KeyEffect.RESTART,
    "user": KeyEffect.RESTART,
    "group": KeyEffect.RESTART,
    "umask": KeyEffect.RESTART,
    "redirect_stderr": KeyEffect.RESTART,
    # supervision policy: read when next needed
    "priority": KeyEffect.IN_PLACE,
    "autostart": KeyEffect.IN_PLACE,
    "autorestart": KeyEffect.IN_PLACE,
    "exitcodes": KeyEffect.IN_PLACE,
    "startsecs": KeyEffect.IN_PLACE,
    "startretries": KeyEffect.IN_PLACE,
    "backoff_initial": KeyEffect.IN_PLACE,
    "backoff_factor": KeyEffect.IN_PLACE,
    "backoff_max": KeyEffect.IN_PLACE,
    "backoff_reset": KeyEffect.IN_PLACE,
    "backoff_jitter": KeyEffect.IN_PLACE,
    # crash loops (docs: deaths.py): read at the next death
    "max_restarts": KeyEffect.IN_PLACE,
    "restart_window": KeyEffect.IN_PLACE,
    "revive_after": KeyEffect.IN_PLACE,
    "stopsignal": KeyEffect.IN_PLACE,
    "stopwaitsecs": KeyEffect.IN_PLACE,
    "killasgroup": KeyEffect.IN_PLACE,
    # log files: reopened
    "stdout_logfile": KeyEffect.LOGS,
    "stdout_logfile_maxbytes": KeyEffect.LOGS,
    "stdout_logfile_backups": KeyEffect.LOGS,
    "stderr_logfile": KeyEffect.LOGS,
    "stderr_logfile_maxbytes": KeyEffect.LOGS,
    "stderr_logfile_backups": KeyEffect.LOGS,
    "log_prefix": KeyEffect.LOGS,
    "log_timestamps": KeyEffect.LOGS,
    "rotate_every": KeyEffect.LOGS,
    "max_total_size": KeyEffect.LOGS,
    "compress": KeyEffect.LOGS,
    # containment: the cgroup and its limits are made at spawn, and what is left of a
    # process when it ends is decided from its spawn's settings
    "memory_max": KeyEffect.RESTART,
    "cpu_max": KeyEffect.RESTART,
    "pids_max": KeyEffect.RESTART,
    "leftovers": KeyEffect.RESTART,
    # readiness, health, dependencies (issue 14): applied in place, to the run under
    # way too (Process.reconfigure says how: a STARTING process waits on the new ready
    # probe, a RUNNING one is checked by the new health check from the reload on);
    # dependencies order the starts and stops from now on
    "ready": KeyEffect.IN_PLACE,
    "health": KeyEffect.IN_PLACE,
    "depends_on": KeyEffect.IN_PLACE,
    "on_dependency_restart": KeyEffect.IN_PLACE,
    # sd_notify: what the child's environment holds is fixed at its spawn. WATCHDOG_USEC
    # is watchdog_sec (the program feeds at the rate it was told). `notify` (and `ready`)
    # decide whether the child gets NOTIFY_SOCKET: a change that gives or takes it away
    # shows as the derived key NOTIFY_SOCKET (see changed_keys), which restarts; one
    # that does not (another key already gives it) has nothing to change in the child.
    "watchdog_sec": KeyEffect.RESTART,
    "notify": KeyEffect.IN_PLACE,
    NOTIFY_SOCKET: KeyEffect.RESTART,
}


def key_effect(key: str) -> KeyEffect:
    return KEY_EFFECTS.get(key, KeyEffect.RESTART)


class Step(enum.Enum):
    START = "start"
    ADD = "add"
    STOP = "stop"
    RESTART = "restart"
    UPDATE = "update in place"
    UNCHANGED = "unchanged"


@dataclass(frozen=True, slots=True)
class KeyChange:
    """One changed key, its values as JSON text (what the operator would write)."""

    key: str
    old: str
    new: str

    def __str__(self) -> str:
        return f"{self.key}: {self.old} → {self.new}"


@dataclass(frozen=True, slots=True)
class PlanEntry:
    name: str  # the process
    program: str  # its program (the new one for start/restart, the old one for stop)
    step: Step
    changes: tuple[KeyChange, ...] = ()


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    entries: tuple[PlanEntry, ...]

    def by_step(self, step: Step) -> list[str]:
        return [e.name for e in self.entries if e.step is step]

    def changed(self) -> bool:
        return any(e.step is not Step.UNCHANGED for e in self.entries)


def show(value: Any) -> str:
    """A config value as the operator reads it: JSON (sets sorted, paths as text, a
    table such as `ready` as the keys set in it)."""
    if isinstance(value, frozenset | set):
        value = sorted(value)
    return json.dumps(value, default=_as_data, ensure_ascii=False, sort_keys=True)


def _as_data(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return toml_data(value)  # a table: `ready`, `health`, a dependency
    dump = getattr(value, "model_dump", None)  # the same, as config.py's model
    if dump is not None:
        return dump(mode="json", by_alias=True, exclude_defaults=True)
    return str(value)


def changed_keys(old: Program, new: Program) -> list[KeyChange]:
    """Every key whose value differs (naming keys included), in the model's order; then
    NOTIFY_SOCKET (true/false: whether the child gets it) if that changes."""
    changes = []
    for key in PROGRAM_KEYS:
        if key == "name":
            continue
        before, after = getattr(old, key), getattr(new, key)
        if before != after:
            changes.append(KeyChange(key, show(before), show(after)))
    if old.wants_notify_socket != new.wants_notify_socket:
        changes.append(
            KeyChange(NOTIFY_SOCKET, show(old.wants_notify_socket), show(new.wants_notify_socket))
        )
    return changes


def step_for_change(changes: Iterable[KeyChange]) -> Step:
    """What a process whose program changed these keys needs (its name still exists)."""
    effects = {key_effect(c.key) for c in changes}
    if KeyEffect.RESTART in effects:
        return Step.RESTART
    if effects - {KeyEffect.NAMES}:
        return Step.UPDATE
    return Step.UNCHANGED


def visible_changes(changes: Iterable[KeyChange]) -> tuple[KeyChange, ...]:
    """The changes worth showing beside a process that keeps its name: not the naming
    keys, which say nothing about this process (numprocs 4 -> 2 leaves web:0 as it is)."""
    return tuple(c for c in changes if key_effect(c.key) is not KeyEffect.NAMES)


def logs_changed(old: Program, new: Program) -> bool:
    return any(key_effect(c.key) is KeyEffect.LOGS for c in changed_keys(old, new))


def programs_diff(
    old: Mapping[str, Program], new: Mapping[str, Program]
) -> tuple[list[str], list[str], list[str]]:
    """(added, changed, removed) program names, from the old config to the new."""
    added = [n for n in new if n not in old]
    changed = [n for n in new if n in old and new[n] != old[n]]
    removed = [n for n in old if n not in new]
    return added, changed, removed


# [supervisor] keys a reload applies live; the others are reported as not applied.
LIVE_SUPERVISOR_KEYS = frozenset(
    {
        "log_level",
        "log_format",
        "socket",
        "socket_mode",
        "socket_group",
        "subreaper",
        "log_dir",  # through the programs' log paths, which derive from it
        "log_timestamps",  # through the programs' log_timestamps, whose default it is
        "environment",  # through the programs' environments, which include it
        "include",  # through which programs the config has
    }
)


@dataclass(frozen=True, slots=True)
class ReloadReport:
    """What a reload did (or, dry, would do): the same for the result, the log event
    and supctl."""

    plan: ReloadPlan
    added: list[str]  # programs
    changed: list[str]
    removed: list[str]
    supervisor: list[KeyChange]  # [supervisor] keys that changed and were applied
    not_applied: list[str]  # "KEY: why" for what cannot change without a restart
    dry_run: bool = False

    def changed_anything(self) -> bool:
        return bool(self.plan.changed() or self.supervisor or self.not_applied)


def supervisor_changes(old: Any, new: Any) -> tuple[list[KeyChange], list[str]]:
    """(changes a reload applies, "KEY: why" for those it cannot) between two
    [supervisor] tables."""
    live, not_live = [], []
    for key in SUPERVISOR_KEYS:
        before, after = getattr(old, key), getattr(new, key)
        if before == after:
            continue
        if key in LIVE_SUPERVISOR_KEYS:
            live.append(KeyChange(key, show(before), show(after)))
        else:
            not_live.append(f"{key}: {show(before)} → {show(after)} needs `supctl reexec`")
    return live, not_live


def entry_data(entry: PlanEntry) -> dict[str, Any]:
    return {
        "name": entry.name,
        "program": entry.program,
        "step": entry.step.value,
        "changes": [change_data(c) for c in entry.changes],
    }


def change_data(change: KeyChange) -> dict[str, str]:
    return {"key": change.key, "old": change.old, "new": change.new}


def report_data(report: ReloadReport) -> dict[str, Any]:
    """The report as the reload result carries it (and supctl --json prints it)."""
    return {
        "added": report.added,
        "changed": report.changed,
        "removed": report.removed,
        "plan": [entry_data(e) for e in report.plan.entries],
        "supervisor": [change_data(c) for c in report.supervisor],
        "not_applied": report.not_applied,
        "dry_run": report.dry_run,
    }


def reload_event(report: ReloadReport) -> dict[str, Any]:
    """The `config_reloaded` event's fields: the same plan, without the unchanged
    processes (which a 1,000-program config would otherwise repeat on every reload)."""
    data = report_data(report)
    data["plan"] = [e for e in data["plan"] if e["step"] != Step.UNCHANGED.value]
    data["unchanged"] = len(report.plan.by_step(Step.UNCHANGED))
    del data["dry_run"]
    return data
