"""The benchmark helper in Python, for machines without gcc: the same modes and output
as benchmarks/helper.c (read that file's comment). Its start-up costs tens of
milliseconds, so latency figures taken with it measure Python's start-up, not the daemon.

Run: ``python benchmarks/helper.py MODE ...`` (no imports from supd, so any Python runs it).
"""

from __future__ import annotations

import os
import signal
import sys
import time

LINE_BYTES = 64
NUMBER_DIGITS = 12
CHUNK_LINES = 1024
_FILLER = b"x" * (LINE_BYTES - NUMBER_DIGITS - 2) + b"\n"


def stamp(kind: str, ident: str) -> None:
    path = os.environ.get("HELPER_STAMPS")
    if not path:
        return
    record = f"{kind} {ident} {time.monotonic_ns()}\n".encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, record)
    finally:
        os.close(fd)


def lines(first: int, count: int) -> bytes:
    """Lines first ... first+count-1 of the stream, LINE_BYTES each."""
    return b"".join(b"%012d " % n + _FILLER for n in range(first, first + count))


def write_lines(total_bytes: int) -> None:
    total = total_bytes // LINE_BYTES
    out = sys.stdout.buffer
    for first in range(0, total, CHUNK_LINES):
        out.write(lines(first, min(CHUNK_LINES, total - first)))
    out.flush()


def verify(total_bytes: int, paths: list[str]) -> int:
    total = total_bytes // LINE_BYTES
    data = bytearray()
    number = 0
    for path in paths:
        with open(path, "rb") as file:
            while block := file.read(CHUNK_LINES * LINE_BYTES):
                data += block
                whole = len(data) // LINE_BYTES
                if number + whole > total or data[: whole * LINE_BYTES] != lines(number, whole):
                    print(f"bad a line near {number} differs (expected {total} lines)")
                    return 1
                number += whole
                del data[: whole * LINE_BYTES]
    if data or number != total:
        print(f"bad {number} complete lines of {total}, {len(data)} stray bytes")
        return 1
    print(f"ok {number} lines")
    return 0


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: helper.py sleep|exit-after|write|verify ...", file=sys.stderr)
        return 2
    mode = argv[1]
    if mode == "sleep":
        stamp("S", argv[2] if len(argv) > 2 else "0")
        while True:
            signal.pause()
    amount = int(argv[2])
    ident = argv[3] if len(argv) > 3 else "0"
    if mode == "exit-after":
        stamp("S", ident)
        time.sleep(amount / 1000)
        stamp("E", ident)
        os._exit(0)
    if mode == "write":
        stamp("S", ident)
        write_lines(amount)
        stamp("E", ident)
        return 0
    if mode == "verify":
        return verify(amount, argv[3:])
    print(f"helper.py: unknown mode {mode!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
