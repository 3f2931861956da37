"""Program log files under supd when something outside it interferes (issue 10)."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import Supd, cmd, wait_until

Factory = Callable[..., Supd]


def numbers(path: Path) -> list[int]:
    if not path.exists():
        return []
    return [int(line) for line in path.read_text().splitlines() if line.isdigit()]


@pytest.mark.parametrize("remove", ["file", "folder"])
def test_log_deleted_under_a_writing_program_is_recreated_and_loses_nothing(
    supd: Factory, tmp_path: Path, remove: str
) -> None:
    go_on = tmp_path / "go-on"
    writer = cmd(f"""
        import os, sys, time
        for n in range(1500):
            print(n)
        while not os.path.exists({str(go_on)!r}):
            time.sleep(0.01)
        for n in range(1500, 3000):
            print(n)
            if n % 100 == 0:
                time.sleep(0.1)  # spread over more than a second: several checks
        while True:  # then quieter, as a live program goes on writing
            print("tick")
            time.sleep(0.1)
    """)
    d = supd(f"""
        [programs.writer]
        command = {writer}
        startsecs = 0
    """)
    log = tmp_path / "logs" / "writer.out.log"
    wait_until(lambda: len(numbers(log)) == 1500, describe=lambda: f"{len(numbers(log))} lines")
    if remove == "file":
        log.unlink()
    else:
        shutil.rmtree(log.parent)
    go_on.touch()
    wait_until(lambda: numbers(log)[-1:] == [2999], describe=lambda: f"{numbers(log)[-3:]}")
    seen = numbers(log)
    # Everything from the deletion on, in order, once (and maybe a few lines from just
    # before it, copied from the deleted file).
    assert seen == list(range(seen[0], 3000))
    assert seen[0] <= 1500
    assert len(d.events("log_file_deleted")) == 1
    assert d.state("writer") == "RUNNING"


def test_a_fifo_without_reader_as_log_file_does_not_freeze_supd(
    supd: Factory, tmp_path: Path
) -> None:
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    talker = cmd("""
        import time
        while True:
            print("hello")
            time.sleep(0.05)
    """)
    d = supd(f"""
        [programs.talker]
        command = {talker}
        startsecs = 0
        stdout_logfile = "{fifo}"
    """)
    wait_until(lambda: d.events("log_write_failed"), describe=d.describe)
    # The loop is free: the socket answers and the program can be stopped.
    assert d.rpc("status", timeout=5)
    d.rpc("stop", {"names": ["talker"]}, timeout=5)
    assert d.state("talker") == "STOPPED"
    # A reader comes: the output flows into it.
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        d.rpc("start", {"names": ["talker"]}, timeout=5)
        received = b""

        def got_hello() -> bool:
            nonlocal received
            with contextlib.suppress(BlockingIOError):
                received += os.read(reader, 4096)
            return b"hello\n" in received

        wait_until(got_hello, describe="output through the FIFO")
    finally:
        os.close(reader)
