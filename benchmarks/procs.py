"""Processes the benchmark starts, and what /proc says about them.

Every process the benchmark starts goes through `Processes`, which kills it (by pid)
when its workload ends and again, as a last resort, when the benchmark exits, however it
exits: an exception, Ctrl-C or SIGTERM (turned into SystemExit by `exit_on_signals`).

Supervised programs are not our children but the daemon's. supd's die with it
(PR_SET_PDEATHSIG); supervisord's may not. So the benchmark makes itself a child
subreaper: a daemon killed with SIGKILL leaves its children orphaned, the kernel hands
them to us, and `kill_orphans` finds them as our own children in /proc, kills them and
reaps them. Nothing else is needed to find a dead daemon's descendants, and no process
of anyone else running on the machine can be hit by mistake.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType

from supd import linux

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


class Timeout(Exception):
    """A condition the benchmark waited for did not come true in time."""


def wait_for(condition: Callable[[], bool], deadline_s: float, what: str, poll_s: float) -> None:
    """Poll `condition` every `poll_s` until it holds; Timeout after `deadline_s`."""
    deadline = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > deadline:
            raise Timeout(f"{what}: still not true after {deadline_s:g} s")
        time.sleep(poll_s)


# -- /proc readers ------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name (which may hold spaces)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process (all its threads, not its children)."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # fields 14 and 15 of stat


def parent_pid(pid: int) -> int:
    return int(_stat_fields(pid)[1])


def _tasks(pid: int) -> list[Path]:
    return list(Path(f"/proc/{pid}/task").iterdir())


def on_cpu_ns(pid: int) -> int:
    """Nanoseconds on a CPU (schedstat), summed over threads: far finer than ticks."""
    return sum(int((task / "schedstat").read_text().split()[0]) for task in _tasks(pid))


def context_switches(pid: int) -> int:
    """Voluntary plus involuntary context switches, summed over threads: every time the
    process went to sleep and woke again (or was preempted) counts one."""
    total = 0
    for task in _tasks(pid):
        for line in (task / "status").read_text().splitlines():
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                total += int(line.split()[1])
    return total


def rss_bytes(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE_BYTES


def own_children() -> list[int]:
    """Our live children, found by their parent pid in /proc (orphans we adopted too)."""
    me = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                if parent_pid(int(entry.name)) == me:
                    found.append(int(entry.name))
    return found


# -- starting and stopping ----------------------------------------------------------------


def _die_with_us() -> None:
    # Runs in the child between fork and exec: should the benchmark itself be killed
    # with SIGKILL, its daemons go too (supd's children follow them by their own
    # PDEATHSIG; supervisord's end up with init, the one leak nothing here can prevent).
    linux.set_pdeathsig(signal.SIGKILL)


class Processes:
    """Starts processes and guarantees they are gone afterwards."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []
        linux.set_child_subreaper(True)

    def start(
        self,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        output: Path | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start `argv` in its own session (a Ctrl-C at the terminal reaches only us),
        stdout and stderr to `output` (or /dev/null)."""
        with contextlib.ExitStack() as stack:
            sink = (
                stack.enter_context(output.open("wb")) if output is not None else subprocess.DEVNULL
            )
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=_die_with_us,
            )
        self.started.append(process)
        return process

    def kill(self, process: subprocess.Popen[bytes]) -> None:
        """SIGKILL the process and its process group, reap it, then kill and reap the
        orphans it left us (a supervisor's programs)."""
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # its session leader: pgid == pid
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        process.wait()
        with contextlib.suppress(ValueError):
            self.started.remove(process)
        self.kill_orphans()

    def kill_orphans(self) -> None:
        """Kill every child of ours that is not a process we track, until none is left."""
        tracked = {p.pid for p in self.started}
        deadline = time.monotonic() + 30
        while True:
            orphans = [pid for pid in own_children() if pid not in tracked]
            reap_untracked(tracked)
            if not orphans:
                return
            for pid in orphans:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                raise Timeout(f"orphans {orphans[:10]} survive SIGKILL")
            time.sleep(0.01)

    def close(self) -> None:
        for process in list(self.started):
            self.kill(process)
        self.kill_orphans()


def reap_untracked(tracked: set[int]) -> None:
    """Collect the exit status of dead adopted orphans (zombies), leaving tracked ones
    to their Popen objects."""
    for pid in own_children():
        if pid in tracked:
            continue
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


@contextlib.contextmanager
def exit_on_signals() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP end the benchmark through every finally. SIGINT is
    caught even when inherited as ignored (as by a background job of a shell)."""

    def leave(signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, leave) for s in signals}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
