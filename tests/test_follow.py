"""`tail -f` fan-out: followers get output while they want it, and are dropped as soon
as their connection closes, not when the quiet program next writes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from supd.commands import Commands
from supd.fleet import UnknownNames
from supd.follow import Followers
from tests.helpers import wait_until
from tests.test_control import RpcClient, ServerLoop


def test_followers_forward_until_refused_and_hook_only_when_followed() -> None:
    changes: list[tuple[str, str]] = []
    followers = Followers(lambda name, stream: changes.append((name, stream)))
    assert followers.hook("web", "stdout") is None
    got: list[bytes] = []
    followers.add("web", "stdout", lambda data: got.append(data) or len(got) < 2)
    hook = followers.hook("web", "stdout")
    assert hook is not None and followers.hook("web", "stderr") is None
    hook(b"a")
    hook(b"b")  # the listener says it wants no more
    hook(b"c")
    assert got == [b"a", b"b"] and len(followers) == 0
    assert changes == [("web", "stdout"), ("web", "stdout")]  # first added, last gone


def test_unfollow_removes_one_listener() -> None:
    followers = Followers(lambda name, stream: None)
    stop_one = followers.add("web", "stdout", lambda data: True)
    followers.add("web", "stdout", lambda data: True)
    stop_one()
    stop_one()  # twice is harmless
    assert len(followers) == 1


class TailOnlyCore:
    """Just enough of commands.Core for `tail`."""

    def __init__(self) -> None:
        self.followers = Followers(lambda name, stream: None)

    def resolve(self, names: list[str] | None) -> list[str]:
        if names != ["web"]:
            raise UnknownNames(list(names or []))
        return ["web"]

    def tail(self, name: str, stream: str, nbytes: int | None, nlines: int | None) -> bytes:
        return b"hello\n"

    def follow(self, name: str, stream: str, listener: Any) -> Any:
        return self.followers.add(name, stream, listener)


def test_a_closed_tail_connection_drops_its_follower_at_once(tmp_path: Path) -> None:
    core = TailOnlyCore()
    with ServerLoop(tmp_path / "s.sock", handler=Commands(core)) as loop:  # type: ignore[arg-type]
        clients = [RpcClient(loop.path) for _ in range(20)]
        for client in clients:
            answer = client.call("tail", {"name": "web", "follow": True})
            assert answer["result"]["data"] == "hello\n"
        assert loop.call(lambda: len(core.followers)) == 20
        for client in clients:
            client.close()
        wait_until(lambda: loop.call(lambda: len(core.followers)) == 0)
    assert loop.error is None
