"""The daemon's side of `supd --check --emit-json`: a config loaded in a child.

pydantic validates the config (config.py), but once loaded into the daemon it would
stay there for the daemon's whole life: about 16 MiB of RSS for something done once per
load. So the daemon never imports config.py: it runs the checker, `python -m supd
--check --emit-json -c FILE`, and builds plain objects (settings.py) from the one JSON
line the checker prints last:

    {"config": {...}}          the validated config, each table without its defaults
    {"problems": [{...}, ...]} every problem, with its file, line, column and key

At start-up the daemon waits for it (`load`; nothing runs yet). A reload and the reload
that ends a re-exec must not block the loop: the daemon spawns the checker like any
helper child (empty signal mask, fds 0-2 only), reads its stdout through the selector,
watches its exit and a deadline, and completes the reload when all of it is in
(`Check`, `result`). A checker that crashes, prints garbage or misses its deadline is a
failed reload whose one problem says so; the running config stays.

This module imports only the standard library and settings.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .facts import EXIT_CONFIG, EXIT_OK, EXIT_USAGE
from .settings import (
    ConfigError,
    Problem,
    Settings,
    problems_from_data,
    settings_from_data,
    unknown_keys,
)

EMIT_JSON_ARG = "--emit-json"
DEFAULT_CONFIG = "/etc/supd/supd.toml"
# Validating 10,000 programs takes a few seconds on a loaded machine; a checker that
# needs more than this is stuck (an include glob matching a FIFO, say).
DEFAULT_TIMEOUT_S = 60.0
# Overrides DEFAULT_TIMEOUT_S (tests; a very slow machine).
TIMEOUT_ENV = "SUPD_CHECK_TIMEOUT_S"
# The longest it may say (`inf`, meant as no limit, means this): the start-up wait goes
# through epoll, which waits at most 2**31 ms (24.8 days).
MAX_TIMEOUT_S = 7 * 24 * 3600.0
# What the daemon keeps of a checker's output: the JSON of 10,000 programs is a few MB.
MAX_OUTPUT_BYTES = 256 << 20


def timeout(environ: Mapping[str, str]) -> float:
    try:
        value = float(environ.get(TIMEOUT_ENV, ""))
    except ValueError:
        return DEFAULT_TIMEOUT_S
    return min(value, MAX_TIMEOUT_S) if value > 0 else DEFAULT_TIMEOUT_S  # (nan > 0: no)


def argv(path: Path | str) -> list[str]:
    """The checker: this interpreter, this package (`python -m supd`)."""
    package = __package__ or "supd"
    return [sys.executable, "-m", package, "--check", EMIT_JSON_ARG, "-c", str(path)]


def emit_json_main(args: list[str]) -> int:
    """`supd --check --emit-json -c FILE` as the daemon runs it: one JSON line, and the
    exit status of `supd --check` (2 for a config with problems). Only here, in this
    short-lived process, is the validator (pydantic) imported."""
    from . import config as validator

    if len(args) != 1:
        print(f"usage: supd --check {EMIT_JSON_ARG} -c FILE", file=sys.stderr)
        return EXIT_USAGE
    answer = validator.check_result(args[0])
    print(json.dumps(answer, separators=(",", ":")))
    return EXIT_CONFIG if "problems" in answer else EXIT_OK


def result(path: Path | str, output: bytes, exit_status: str | None) -> Settings:
    """The checker's answer: Settings, or raises ConfigError (the config's problems, or
    one problem saying the checker failed). `exit_status` is None for a normal exit
    (0, or the config error status), else how it ended ("killed by SIGKILL", "exit
    status 1"...)."""
    lines = output.decode(errors="replace").strip().splitlines()
    answer: object = None
    if exit_status is None and lines:
        try:
            answer = json.loads(lines[-1])
        except (ValueError, RecursionError):  # (nested deeper than json recurses)
            answer = None
    # Whatever its shape, an answer that cannot be read is a failed check, never an
    # exception in the daemon (which would leave the reloads waiting on it unanswered):
    # the checker on disk may even be another version of supd than the daemon.
    if isinstance(answer, dict) and isinstance(answer.get("config"), dict):
        try:
            unknown = unknown_keys(answer["config"])
            settings = settings_from_data(answer["config"])
        except Exception as exc:
            raise failed(path, f"unreadable answer ({type(exc).__name__}: {exc})") from None
        if unknown:
            raise ConfigError([_unknown(path, settings, *where) for where in unknown])
        return settings
    if isinstance(answer, dict) and isinstance(answer.get("problems"), list):
        try:
            problems = problems_from_data(answer["problems"])
        except Exception as exc:
            raise failed(path, f"unreadable answer ({type(exc).__name__}: {exc})") from None
        raise ConfigError(problems)
    said = next((line for line in reversed(lines) if line.strip()), "no output")
    raise failed(path, f"{exit_status or 'no answer'}: {said[:500]}")


def _unknown(path: Path | str, settings: Settings, program: str, key: str) -> Problem:
    file = settings.sources.get(program, Path(path))
    why = "this running supd does not know it (the supd on disk is newer): `supctl reexec`"
    return Problem(file, None, None, key, f"{why}, then reload")


def failed(path: Path | str, why: str) -> ConfigError:
    return ConfigError([Problem(Path(path), None, None, "", f"the config check failed: {why}")])


# The start-up checker, started by entry.py before the daemon's modules are imported
# (the two then overlap: about 140 ms less until supd answers); the config path it checks.
_early: tuple[str, subprocess.Popen[bytes]] | None = None


def _spawn(path: Path | str, environ: Mapping[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        argv(path),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(environ),
    )


def start_early(path: str) -> None:
    """Start the start-up checker now; `load(path)` collects it (a failure to start
    here is left for `load` to meet and report)."""
    global _early
    try:
        _early = (path, _spawn(path, os.environ))
    except OSError:
        _early = None


def discard_early() -> None:
    """The command line did not start the daemon after all: stop the early checker."""
    global _early
    if _early is not None:
        _path, process = _early
        _early = None
        process.kill()
        process.communicate()


def load(path: Path | str, environ: Mapping[str, str] | None = None) -> Settings:
    """Run the checker and wait for it (start-up: nothing runs yet); raises ConfigError."""
    global _early
    environ = os.environ if environ is None else environ
    limit = timeout(environ)
    early, _early = _early, None
    try:
        if early is not None and early[0] == str(path):
            process = early[1]
        else:
            if early is not None:
                early[1].kill()
                early[1].communicate()
            process = _spawn(path, environ)
    except OSError as exc:
        raise failed(path, f"cannot run {sys.executable}: {exc.strerror or exc}") from None
    try:
        stdout, stderr = process.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise failed(path, f"no answer within {limit:g} s") from None
    code = process.returncode
    status = None if code >= 0 else f"killed by signal {-code}"
    if code > 0 and not stdout.strip():
        status = f"exit status {code}"
    return result(path, stdout if stdout.strip() else stderr, status)


class Cancelled(Exception):
    """A reload's check was cut short: supd is shutting down, or re-executing."""

    def __init__(self, why: str, shutdown: bool) -> None:
        super().__init__(why)
        self.shutdown = shutdown


# A reload waiting for a check: dry run or not, and where its outcome goes (a report,
# or the ConfigError, SocketUnusable or Cancelled after which nothing changed).
Reload = tuple[bool, Callable[[Any], None]]


@dataclass(slots=True, eq=False)
class Check:
    """One checker child in flight, as the daemon tracks it."""

    path: Path
    pid: int
    output_fd: int | None  # its stdout (and stderr), until EOF
    exit_key: int | None = None  # the selector's process key
    deadline_fd: int | None = None  # the selector's oneshot timer
    reloads: list[Reload] = field(default_factory=list)
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    exit_status: str | None = None  # None: exited normally, or not yet
    exited: bool = False
    timed_out: bool = False

    def take(self, data: bytes) -> None:
        if self.size < MAX_OUTPUT_BYTES:
            self.chunks.append(data)
            self.size += len(data)

    @property
    def done(self) -> bool:
        return self.exited and self.output_fd is None

    def outcome(self, limit: float) -> Settings | ConfigError:
        if self.timed_out:
            return failed(self.path, f"no answer within {limit:g} s")
        try:
            return result(self.path, b"".join(self.chunks), self.exit_status)
        except ConfigError as exc:
            return exc
