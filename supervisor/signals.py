"""Signal names and numbers: one spelling for the config, the protocol and the logs.

Imports the standard library only (supctl's protocol constants and the config both use
it). Realtime signals, which `signal.Signals` does not name, read as "SIGRTMIN+N".
"""

from __future__ import annotations

import signal


def parse(value: str | int) -> int:
    """'TERM', 'SIGTERM', 'term', 'RTMIN+2', '15' or 15 -> the signal number.

    Raises ValueError for anything that is not a signal of this platform. Numbers are
    ASCII digits only: str.isdigit() and int() also take "\\u0661\\u0665" (Arabic-Indic 15).
    """
    if isinstance(value, int) or _is_ascii_number(value.strip()):
        number = int(value)
        if number not in signal.valid_signals():
            raise ValueError(f"unknown signal number {number}")
        return number
    text = value.strip().upper().removeprefix("SIG")
    base, plus, offset = text.partition("+")
    if base == "RTMIN" and plus and _is_ascii_number(offset):
        number = signal.SIGRTMIN + int(offset)
        if number <= signal.SIGRTMAX:
            return number
    try:
        return int(signal.Signals["SIG" + text])
    except KeyError:
        raise ValueError(f"unknown signal {value!r}") from None


def _is_ascii_number(text: str) -> bool:
    return text.isascii() and text.isdigit()


def name(signum: int) -> str:
    """15 -> 'SIGTERM'; a realtime signal -> 'SIGRTMIN+N'."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        if signal.SIGRTMIN < signum <= signal.SIGRTMAX:
            return f"SIGRTMIN+{signum - signal.SIGRTMIN}"
        return f"signal {signum}"
