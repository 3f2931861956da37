"""The systemd tier: one container with a real systemd, booted once for all its tests
(a package-scoped fixture: powered off as soon as the tier is done, not at the end of
the whole run).

Skipped, with the reason, where the machine cannot boot it (not root, no overlayfs, no
systemd-nspawn); `make test-systemd` sets SUPD_REQUIRE_SYSTEMD=1, which turns that
skip into a failure.
"""

from __future__ import annotations

import os
import shlex
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import REPO
from tests.systemd import readme
from tests.systemd.machine import CHECKOUT, Machine, Unavailable, unavailable_reason


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.systemd)
            item.add_marker(pytest.mark.timeout(180))


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("SUPD_REQUIRE_SYSTEMD") == "1":
        pytest.fail(f"a real systemd is required here, but {reason}", pytrace=False)
    pytest.skip(f"no real systemd: {reason}")


@pytest.fixture(scope="package")
def machine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    reason = unavailable_reason()
    if reason:
        _skip_or_fail(reason)
    box = Machine(tmp_path_factory.mktemp("nspawn"), REPO, CHECKOUT)
    try:
        started = time.monotonic()
        try:
            box.boot()
        except Unavailable as exc:
            _skip_or_fail(str(exc))
        print(f"container {box.name} booted in {time.monotonic() - started:.1f} s")
        yield box
    finally:
        box.close()


@pytest.fixture(scope="package")
def installed(machine: Machine) -> Machine:
    """supd installed and started in the container exactly as the README says, run as a
    root shell would from the checkout."""
    script = readme.install_script()
    machine.run("sh", "-exc", f"cd {shlex.quote(CHECKOUT)}\n{script}", timeout=300)
    return machine


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "systemd: needs a real systemd (a booted container)")
