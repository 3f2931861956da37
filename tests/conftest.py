"""Fixtures shared by the end-to-end tests."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from supd import clonespawn
from tests.helpers import Supd


@pytest.fixture(params=["clone", "python"])
def spawn_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """supd's environment choosing each spawn method in turn (SUPD_SPAWN)."""
    if request.param == "clone" and not clonespawn.available():
        pytest.skip("the C spawner (_spawn.c) was not built: no C compiler at install")
    return {**os.environ, "SUPD_SPAWN": request.param}


@pytest.fixture
def supd(tmp_path: Path) -> Iterator[Callable[..., Supd]]:
    """Factory: `supd(config_text)` starts a real daemon; all are killed at teardown."""
    started: list[Supd] = []

    def start(config: str, *extra: str, wait_ready: bool = True, **kw: Any) -> Supd:
        instance = Supd(tmp_path, config, **kw)
        started.append(instance)
        return instance.start(*extra, wait_ready=wait_ready)

    yield start
    for instance in started:
        instance.kill()
