"""supd installs under its own import name, so it shares an environment with Supervisor.

The source folder is supervisor/, but the installed package is `supd`: a supervisord
user migrating installs both, then uninstalls Supervisor, and neither step may break
the other program.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.helpers import REPO

SUPERVISOR = "supervisor==4.3.0"


def run(*argv: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def venv(tmp_path: Path) -> Path:
    """A fresh venv whose dependencies (pydantic, structlog) come from the test venv.

    Only supd and Supervisor are installed into it, with --no-deps, which keeps this
    test to a couple of seconds.
    """
    folder = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", folder], check=True)
    site = Path(
        run(
            folder / "bin" / "python",
            "-c",
            "import site; print(site.getsitepackages()[0])",
            cwd=tmp_path,
        ).stdout.strip()
    )
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return folder


def pip(venv: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run(sys.executable, "-m", "pip", "--python", venv / "bin" / "python", *args, cwd=venv)


def test_supd_and_supervisor_share_one_environment(venv: Path, tmp_path: Path) -> None:
    installed = pip(venv, "install", "--quiet", "--no-deps", str(REPO), SUPERVISOR)
    if installed.returncode != 0 and "No matching distribution" in installed.stderr:
        pytest.skip(f"{SUPERVISOR} cannot be installed here: {installed.stderr.strip()}")
    assert installed.returncode == 0, installed.stderr
    supd = run(venv / "bin" / "supd", "--version", cwd=tmp_path)
    assert supd.returncode == 0, supd.stderr
    assert supd.stdout.startswith("supd ")
    supervisord = run(venv / "bin" / "supervisord", "--version", cwd=tmp_path)
    assert supervisord.returncode == 0, supervisord.stderr
    assert supervisord.stdout.strip() == "4.3.0"
    # Each import name is its own package (from a folder that is not the checkout).
    where = run(
        venv / "bin" / "python",
        "-c",
        "import supd, supervisor; print(supd.__file__); print(supervisor.__file__)",
        cwd=tmp_path,
    )
    supd_file, supervisor_file = where.stdout.split()
    assert Path(supd_file).parent.name == "supd"
    assert Path(supervisor_file).parent.name == "supervisor"
    assert not supervisor_file.startswith(str(REPO))

    # The last step of a migration: uninstalling Supervisor leaves supd working.
    removed = pip(venv, "uninstall", "--yes", "supervisor")
    assert removed.returncode == 0, removed.stderr
    assert run(venv / "bin" / "supd", "--version", cwd=tmp_path).returncode == 0
    assert run(venv / "bin" / "supctl", "--version", cwd=tmp_path).returncode == 0
