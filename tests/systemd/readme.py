"""The README's systemd install commands, which the tier runs as they are written."""

from __future__ import annotations

import re

from tests.helpers import REPO


def systemd_blocks() -> list[str]:
    """The ```sh blocks of the README's "Running under systemd" section, in order."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Running under systemd", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", section, re.DOTALL)


def install_script() -> str:
    """The install: the section's first block."""
    blocks = systemd_blocks()
    assert blocks, "the README's systemd section has no ```sh block"
    return blocks[0]


def socket_activation_script() -> str:
    """Turning socket activation on: the section's second block."""
    blocks = systemd_blocks()
    assert len(blocks) >= 2, "the README's systemd section lacks the socket commands"
    return blocks[1]
