"""systemd/supd.service, systemd/supd.socket and the system config they point at.

Three layers: the directives supd's contract with systemd depends on (plain text, runs
everywhere); `systemd-analyze verify` on the real units where it is installed (skipped
elsewhere); and config/system/supd.toml (the /etc/supd/supd.toml example) passing
`supd --check` and agreeing with the units about paths.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from supd.config import load
from tests.helpers import PY, REPO
from tests.systemd.readme import install_script

SERVICE = REPO / "systemd" / "supd.service"
SOCKET = REPO / "systemd" / "supd.socket"
SYSTEM_CONFIG = REPO / "config" / "system" / "supd.toml"
INSTALLED_SUPD = "/usr/local/bin/supd"

Unit = dict[str, list[tuple[str, str]]]  # section -> (key, value) in file order


def parse_unit(text: str) -> Unit:
    """systemd's unit syntax, as far as these files use it: sections, repeated keys,
    comments. (configparser cannot keep repeated keys such as two ExecReload= lines.)"""
    unit: Unit = {}
    section: list[tuple[str, str]] | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], [])
            continue
        key, equals, value = line.partition("=")
        assert equals and section is not None, f"line {number} is not KEY=VALUE: {raw!r}"
        assert not value.endswith("\\"), f"line {number}: no continuation lines, please"
        section.append((key.strip(), value.strip()))
    return unit


def values(unit: Unit, section: str, key: str) -> list[str]:
    return [value for k, value in unit.get(section, []) if k == key]


def value(unit: Unit, section: str, key: str) -> str:
    found = values(unit, section, key)
    assert len(found) == 1, f"[{section}] {key}= should be set once, found {found}"
    return found[0]


@pytest.fixture(scope="module")
def service() -> Unit:
    return parse_unit(SERVICE.read_text())


@pytest.fixture(scope="module")
def socket_unit() -> Unit:
    return parse_unit(SOCKET.read_text())


# -- the contract, in plain text ---------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("KillMode", "mixed"),
        ("RuntimeDirectory", "supd"),
        ("WatchdogSec", "30s"),
        ("Restart", "on-failure"),
        ("RestartPreventExitStatus", "2"),  # supd's exit status for a bad config
    ],
)
def test_service_directive(service: Unit, key: str, expected: str) -> None:
    assert value(service, "Service", key) == expected


def test_service_runs_supd_on_the_system_config(service: Unit) -> None:
    assert value(service, "Service", "ExecStart") == f"{INSTALLED_SUPD} -c /etc/supd/supd.toml"


def test_reload_checks_the_config_then_sends_sighup(service: Unit) -> None:
    assert values(service, "Service", "ExecReload") == [
        f"{INSTALLED_SUPD} -c /etc/supd/supd.toml --check",
        "/bin/kill -HUP $MAINPID",
    ]


def test_service_gives_supd_time_and_room(service: Unit) -> None:
    def seconds(text: str) -> int:
        assert text.endswith("s") and text[:-1].isdigit(), text
        return int(text[:-1])

    # Ten priority groups at the default stopwaitsecs = 10 still stop in order.
    assert seconds(value(service, "Service", "TimeoutStopSec")) >= 100
    # supd raises its soft limit to the hard one; programs get the soft one back.
    soft, _, hard = value(service, "Service", "LimitNOFILE").partition(":")
    assert int(soft) == 1024 and int(hard) >= 65536


def test_hardening_leaves_programs_their_privileges(service: Unit) -> None:
    """Hardening applies to every program supd runs: nothing that breaks setuid
    binaries, home directories, /tmp sharing or /etc writes may be on."""
    settings = dict(service["Service"])
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices", "User"):
        assert key not in settings, f"{key}= gets in the way of supervised programs"
    assert settings.get("ProtectSystem") in (None, "yes")
    for key in (
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "RestrictRealtime",
        "LockPersonality",
        "RestrictSUIDSGID",
    ):
        assert settings.get(key) == "yes", key
    assert settings.get("SystemCallArchitectures") == "native"
    # A deny list only ("~"), and denied calls fail instead of killing the program.
    assert settings.get("SystemCallFilter", "").startswith("~")
    assert settings.get("SystemCallErrorNumber") == "EPERM"
    # The unit's cgroup is delegated to supd (a cgroup per process), which needs it
    # writable: ProtectControlGroups=yes and Delegate=yes do not go together.
    assert settings.get("Delegate") == "yes"
    assert settings.get("ProtectControlGroups", "no") == "no"


def test_a_failing_start_drops_the_waiting_connection(socket_unit: Unit) -> None:
    """FlushPending=yes: a supd that cannot start (bad config) is not retriggered by the
    same waiting connection until systemd's start limit fails supd.socket."""
    assert value(socket_unit, "Socket", "FlushPending") == "yes"


def test_the_units_install_steps_are_the_readmes() -> None:
    """The install commands in supd.service's header are the README's, line for line."""
    readme = install_script().splitlines()
    header = SERVICE.read_text().split("[Unit]", 1)[0]
    commands = [line.removeprefix("#").strip() for line in header.splitlines()]
    for line in readme:
        assert line in commands, f"supd.service's install comment lacks: {line}"
    assert "/opt/supd/venv" not in SERVICE.read_text()


def test_every_service_setting_is_explained() -> None:
    """Each [Service] setting sits in a paragraph that has a comment saying why."""
    paragraph_has_comment = False
    in_service = False
    unexplained = []
    for line in [*SERVICE.read_text().splitlines(), ""]:
        stripped = line.strip()
        if not stripped:
            paragraph_has_comment = False
        elif stripped.startswith("#"):
            paragraph_has_comment = True
        elif stripped.startswith("["):
            in_service = stripped == "[Service]"
            paragraph_has_comment = False
        elif in_service and not paragraph_has_comment:
            unexplained.append(stripped)
    assert unexplained == []


def test_socket_unit_listens_where_the_service_puts_the_socket(
    service: Unit, socket_unit: Unit
) -> None:
    runtime = "/run/" + value(service, "Service", "RuntimeDirectory")
    assert value(socket_unit, "Socket", "ListenStream") == f"{runtime}/supd.sock"
    assert value(socket_unit, "Socket", "SocketMode") == "0600"
    assert value(socket_unit, "Socket", "Service") == SERVICE.name
    assert value(socket_unit, "Install", "WantedBy") == "sockets.target"


# -- systemd's own check -----------------------------------------------------------------


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    return path


def installable_copies(tmp_path: Path, service_text: str | None = None) -> list[Path]:
    """The units in tmp_path, with ExecStart pointing at a supd that exists here:
    verify insists that every command is executable."""
    supd = Path(sys.executable).with_name("supd")
    if not os.access(supd, os.X_OK):  # not installed as a script: any executable will do
        supd = tmp_path / "supd"
        supd.write_text("#!/bin/sh\nexit 0\n")
        supd.chmod(0o755)
    text = service_text if service_text is not None else SERVICE.read_text()
    service = tmp_path / SERVICE.name
    service.write_text(text.replace(INSTALLED_SUPD, str(supd)))
    socket_copy = tmp_path / SOCKET.name
    socket_copy.write_text(SOCKET.read_text())
    return [service, socket_copy]


def verify(analyze: str, units: list[Path]) -> list[str]:
    """What `systemd-analyze verify` says about our units: errors and warnings alike
    (an unknown or unparsable directive is only a warning, with exit status 0)."""
    command = [analyze, "verify"]
    help_text = subprocess.run([analyze, "--help"], capture_output=True, text=True).stdout
    if "--recursive-errors" in help_text:  # systemd >= 250: ignore the rest of the system
        command.append("--recursive-errors=no")
    proc = subprocess.run(
        [*command, *map(str, units)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=units[0].parent,
    )
    names = [unit.name for unit in units]
    complaints = [
        line
        for line in (proc.stdout + proc.stderr).splitlines()
        if any(name in line for name in names)
    ]
    if proc.returncode != 0 and not complaints:
        complaints = [f"exit status {proc.returncode}", proc.stderr]
    return complaints


def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path) -> None:
    analyze = systemd_analyze()
    assert verify(analyze, installable_copies(tmp_path)) == []


def test_systemd_analyze_verify_would_catch_a_bad_directive(tmp_path: Path) -> None:
    """The check above is worth something: a typo in the unit does get reported."""
    analyze = systemd_analyze()
    broken = SERVICE.read_text().replace("KillMode=mixed", "KillMode=mixd\nWatchdogSecs=30s")
    complaints = verify(analyze, installable_copies(tmp_path, broken))
    assert any("mixd" in line for line in complaints), complaints
    assert any("WatchdogSecs" in line for line in complaints), complaints


# -- /etc/supd/supd.toml -----------------------------------------------------------------


def test_system_config_passes_check() -> None:
    env = {k: v for k, v in os.environ.items() if k != "RUNTIME_DIRECTORY"}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(
        [PY, "-m", "supd", "-c", str(SYSTEM_CONFIG), "--check"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("config OK: 1 program, 1 process"), proc.stdout
    assert "1 included file" in proc.stdout


def test_system_config_agrees_with_the_units(service: Unit, socket_unit: Unit) -> None:
    runtime = "/run/" + value(service, "Service", "RuntimeDirectory")
    config = load(SYSTEM_CONFIG, environ={"RUNTIME_DIRECTORY": runtime})
    assert str(config.supervisor.socket) == value(socket_unit, "Socket", "ListenStream")
    assert str(config.supervisor.log_dir) == "/var/log/" + value(
        service, "Service", "LogsDirectory"
    )
    # The example installs without starting anything.
    assert [p.autostart for p in config.programs.values()] == [False]
