"""How much does ``Selector.select()`` cost on top of a bare ``epoll.poll()``?

Registers 1,000 idle pipes plus one that always has data (level-triggered, never read),
then times ``select(0)`` against a bare ``select.epoll.poll(0)`` loop over the same
pipes, in the same run. The bare loop iterates its result, as any caller must; both ask
for the same maximum number of events. Best of several interleaved rounds, to shed scheduler noise.

Run: ``python -m benchmarks.selector [--pipes N] [--calls N] [--rounds N]``
"""

from __future__ import annotations

import argparse
import os
import resource
import select
import time
from collections.abc import Callable
from contextlib import ExitStack

from supd.selector import Event, Selector


def _raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise SystemExit(f"need {needed} fds, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def _open_pipes(stack: ExitStack, count: int) -> list[int]:
    readers = []
    for _ in range(count):
        r, w = os.pipe()
        stack.callback(os.close, r)
        stack.callback(os.close, w)
        readers.append(r)
        last_writer = w
    os.write(last_writer, b"x")  # the last pipe stays readable for the whole run
    return readers


def _time_per_call(loop: Callable[[int], None], calls: int) -> float:
    started = time.perf_counter()
    loop(calls)
    return (time.perf_counter() - started) / calls


def _best_of_interleaved(
    loops: list[Callable[[int], None]], calls: int, rounds: int
) -> list[float]:
    """Best seconds per call of each loop; rounds alternate between the loops so that
    a slow spell of the machine hits all of them alike."""
    best = [float("inf")] * len(loops)
    for _ in range(rounds):
        for i, loop in enumerate(loops):
            best[i] = min(best[i], _time_per_call(loop, calls))
    return best


def _bare_loop(epoll: select.epoll, max_events: int) -> Callable[[int], None]:
    poll = epoll.poll

    def loop(calls: int) -> None:
        for _ in range(calls):
            for _fd, _mask in poll(0, max_events):
                pass

    return loop


def _selector_loop(selector: Selector[int]) -> Callable[[int], None]:
    select_ = selector.select

    def loop(calls: int) -> None:
        for _ in range(calls):
            for _key in select_(0):
                pass

    return loop


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipes", type=int, default=1000, help="idle pipes (default 1000)")
    parser.add_argument("--calls", type=int, default=100_000, help="calls per round")
    parser.add_argument("--rounds", type=int, default=7, help="rounds; the best one counts")
    args = parser.parse_args(argv)

    _raise_fd_limit(2 * (args.pipes + 1) + 64)
    max_events = 256
    with ExitStack() as stack:
        readers = _open_pipes(stack, args.pipes + 1)
        selector = stack.enter_context(Selector[int](max_events=max_events))
        epoll = select.epoll(flags=select.EPOLL_CLOEXEC)
        stack.callback(epoll.close)
        for r in readers:
            selector.register_handle(r, Event.READ, r)
            epoll.register(r, select.EPOLLIN | select.EPOLLRDHUP)
        assert len(selector.select(0)) == 1 and len(epoll.poll(0)) == 1

        bare, ours = _best_of_interleaved(
            [_bare_loop(epoll, max_events), _selector_loop(selector)], args.calls, args.rounds
        )

    print(f"{args.pipes} idle pipes + 1 ready, {args.calls} calls x {args.rounds} rounds (best)")
    print(f"  bare epoll.poll(0):  {bare * 1e6:7.3f} us/call")
    print(f"  Selector.select(0):  {ours * 1e6:7.3f} us/call")
    print(f"  ratio:               {ours / bare:7.2f}x  (target <= 2x)")


if __name__ == "__main__":
    main()
