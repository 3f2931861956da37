"""`tail -f` fan-out: who follows which process's output stream.

A listener gets every chunk a process writes to one stream, and returns False once it
wants no more (its client is gone). Listeners are also removed explicitly when their
connection closes, so a quiet program does not keep thousands of dead followers (and
their connections' buffers) alive until it next writes.

Readers only copy output when somebody follows it: `hook()` is None otherwise, and
`on_change` tells the daemon when a stream gains its first or loses its last follower.
"""

from __future__ import annotations

from collections.abc import Callable

Listener = Callable[[bytes], bool]
Hook = Callable[[bytes], None]


class Followers:
    def __init__(self, on_change: Callable[[str, str], None]) -> None:
        self._listeners: dict[tuple[str, str], list[Listener]] = {}
        self._on_change = on_change

    def __len__(self) -> int:
        return sum(len(listeners) for listeners in self._listeners.values())

    def add(self, name: str, stream: str, listener: Listener) -> Callable[[], None]:
        """Follow `name`'s `stream`; returns the function that stops following."""
        key = (name, stream)
        listeners = self._listeners.setdefault(key, [])
        listeners.append(listener)
        if len(listeners) == 1:
            self._on_change(name, stream)

        def remove() -> None:
            current = self._listeners.get(key)
            if current is not None and listener in current:
                current.remove(listener)
                self._forget_if_empty(key)

        return remove

    def hook(self, name: str, stream: str) -> Hook | None:
        """What a reader of `name`'s `stream` calls with each chunk; None if unfollowed."""
        key = (name, stream)
        if key not in self._listeners:
            return None

        def forward(data: bytes) -> None:
            listeners = self._listeners.get(key)
            if listeners is None:
                return
            listeners[:] = [listen for listen in listeners if listen(data)]
            self._forget_if_empty(key)

        return forward

    def _forget_if_empty(self, key: tuple[str, str]) -> None:
        if not self._listeners.get(key, True):
            del self._listeners[key]
            self._on_change(*key)
