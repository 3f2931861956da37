"""The daemon's own log: structlog, one event per line on stderr.

On a terminal: key=value lines with colours. Otherwise JSON (log_format = "auto"), so a
collector can parse it. Under systemd (stderr is the journal stream named by
$JOURNAL_STREAM) each line starts with an sd-daemon priority prefix (`<3>`, `<4>`, `<6>`)
and carries no timestamp of its own: the journal adds one.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
LEVELS["error"] = logging.ERROR

# sd-daemon(3) priorities.
_SYSLOG_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}


def stderr_is_journal(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """True when $JOURNAL_STREAM names the device and inode of our stderr."""
    value = environ.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (ValueError, OSError):
        return False


def _add_journal_priority(
    _logger: Any, method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    event_dict["_priority"] = _SYSLOG_PRIORITY.get(method, 6)
    return event_dict


class _JournalRenderer:
    """Wrap a renderer so its line starts with the `<N>` priority prefix."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> str:
        priority = event_dict.pop("_priority", 6)
        return f"<{priority}>{self.inner(logger, method, event_dict)}"


def configure(
    log_format: str = "auto",
    log_level: str = "info",
    stream: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
) -> None:
    stream = stream or sys.stderr
    environ = os.environ if environ is None else environ
    journal = stderr_is_journal(stream, environ)
    if log_format == "auto":
        log_format = "console" if stream.isatty() else "json"
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
    ]
    if not journal:
        processors.append(structlog.processors.TimeStamper(fmt="iso", utc=False))
    if log_format == "console":
        renderer: Any = structlog.dev.ConsoleRenderer(colors=stream.isatty() and not journal)
    else:
        processors.append(structlog.processors.format_exc_info)
        renderer = structlog.processors.JSONRenderer()
    if journal:
        processors.append(_add_journal_priority)
        renderer = _JournalRenderer(renderer)
    processors.append(renderer)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(log_level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


def get_logger(**context: Any) -> Any:
    return structlog.get_logger("supd").bind(**context)
