"""A real systemd, booted in a container made of this machine's own root filesystem.

The host's `/` is bind-mounted read-only and covered by an overlayfs whose upper layer
is a tmpfs; systemd-nspawn boots it (systemd as PID 1 in its own namespaces) and
commands run inside through `nsenter` with a clean environment. Nothing is written to
the host: every change lives in the tmpfs and vanishes with the container.

Cleanup cannot be forgotten: the three mounts are made in a private mount namespace
(`unshare --mount`) that only systemd-nspawn lives in, so they disappear when it exits,
whatever happened to the tests. systemd-nspawn gets SIGTERM (a clean poweroff of the
container) if the test process dies (`setpriv --pdeathsig`), and `Machine.close()`
powers the container off, or kills its init (and with it every process in the
container's PID namespace) when that does not happen in time.

Each container gets a cgroup of its own (named after the machine) in the hierarchies
systemd uses, which `Machine.close()` removes: without it, two test runs on one host
booted two systemds over the same cgroup, and one supd's cgroup.kill reached the other
container's programs.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

# The environment of every command run inside: nothing of the test run's own.
CLEAN_ENVIRONMENT = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
}

# Left out of the copy of the checkout: build products and caches of the host.
COPY_EXCLUDES = (
    ".git",
    ".venv",
    ".bench-venv",
    "build",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".mypy_cache",
    ".ruff_cache",
    "logs",
    "run",
)

CHECKOUT = "/root/supd"  # where the container gets its copy of the checkout
BOOT_TIMEOUT = 90.0
CANNOT_MOUNT = 77  # the launcher's exit status when the machine refuses the mounts
POWEROFF_TIMEOUT = 30.0

# Runs as the container's launcher, inside `unshare --mount --propagation private`:
# builds the root filesystem, prepares it, then becomes systemd-nspawn.
_LAUNCH = r"""
set -eu
work=$1 name=$2 checkout=$3 dest=$4; shift 4
lower=$work/lower layers=$work/layers root=$work/root
mkdir -p "$lower" "$layers" "$root"
# A machine that does not allow these mounts cannot run the tier: exit 77 says so.
mount --bind / "$lower" && mount -o remount,bind,ro "$lower" \
  && mount -t tmpfs -o mode=0755 tmpfs "$layers" \
  && mkdir "$layers/upper" "$layers/work" \
  && mount -t overlay overlay \
       -o "lowerdir=$lower,upperdir=$layers/upper,workdir=$layers/work" "$root" \
  || exit 77
# Services enabled on the host image (databases, timers, a getty) have no business in
# a test container: masked.
for unit in "$@"; do ln -sf /dev/null "$root/etc/systemd/system/$unit"; done
# A machine of its own: journald and systemd key things on the machine id.
cat /proc/sys/kernel/random/uuid | tr -d '-' > "$root/etc/machine-id"
mkdir -p "$root$dest"
set -f  # the --exclude=PATTERN words are for tar, not for the shell
tar -C "$checkout" $TAR_EXCLUDES -cf - . | tar -C "$root$dest" -xf -
set +f
echo "launcher: root filesystem ready" >&2
# A cgroup of its own in the hierarchies systemd uses: the container's systemd builds its
# tree there, never where the container of another test run, at the same time, builds one.
for dir in $JOIN_CGROUPS; do echo $$ > "$dir/cgroup.procs"; done
exec systemd-nspawn -D "$root" --machine="$name" --boot --register=no --keep-unit \
  --tmpfs=/tmp --console=read-only --link-journal=no
"""


class Unavailable(Exception):
    """This machine cannot boot the container; the message says why."""


def unavailable_reason() -> str | None:
    """Why a container cannot be booted here, or None if it should work."""
    if os.geteuid() != 0:
        return "needs root (mounts and systemd-nspawn)"
    missing = [
        tool
        for tool in ("systemd-nspawn", "nsenter", "unshare", "setpriv")
        if shutil.which(tool) is None
    ]
    if missing:
        return (
            f"{', '.join(missing)} not installed "
            "(Debian: systemd-container has systemd-nspawn, `make test` installs it as "
            "root; util-linux has the others)"
        )
    try:
        filesystems = Path("/proc/filesystems").read_text()
    except OSError as exc:
        return f"cannot read /proc/filesystems: {exc}"
    if "\toverlay\n" not in filesystems:
        return "the kernel has no overlayfs"
    if not any(Path(p).exists() for p in ("/usr/lib/systemd/systemd", "/lib/systemd/systemd")):
        return "systemd is not installed (nothing to boot)"
    # The README's install runs the system python3's venv inside the container.
    python = "/usr/bin/python3"
    probe = [python, "-c", "import ensurepip, venv"]
    if not Path(python).exists() or subprocess.run(probe, capture_output=True).returncode:
        return f"{python} with venv is needed (Debian: apt-get install python3-venv)"
    return None


def enabled_host_units() -> list[str]:
    """Services and timers the host image enables (links in /etc/systemd/system/*.wants)."""
    names = {
        link.name
        for link in Path("/etc/systemd/system").glob("*.wants/*")
        if link.suffix in (".service", ".timer", ".socket", ".path")
    }
    return sorted(names)


def own_cgroup_dirs() -> list[Path]:
    """This process's cgroup folders in the hierarchies systemd keeps its tree in: cgroup
    v2's and, on a hybrid host, v1's name=systemd one."""
    own: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0":
            own["cgroup2"] = path
        elif controllers == "name=systemd":
            own["name=systemd"] = path
    dirs = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mount, _, source = line.partition(" - ")
        root, mount_point = mount.split()[3:5]
        fstype, _device, options = source.split()[:3]
        if fstype == "cgroup2":
            key = "cgroup2"
        elif fstype == "cgroup" and "name=systemd" in options.split(","):
            key = "name=systemd"
        else:
            continue
        if key in own and root == "/":  # a mount of the whole hierarchy
            dirs.append(Path(mount_point) / own.pop(key).lstrip("/"))
    return dirs


class Machine:
    """One booted container. `run()` executes a command inside it."""

    def __init__(self, work: Path, checkout: Path, dest: str = CHECKOUT) -> None:
        self.work = work
        self.checkout = checkout
        self.dest = dest
        self.name = f"supd-test-{uuid.uuid4().hex[:8]}"
        self.console = work / "console.log"
        self.launcher: subprocess.Popen[bytes] | None = None
        self.init_pid = 0
        self.cgroups: list[Path] = []  # made for the launcher, removed by close()

    # -- life cycle ---------------------------------------------------------------------

    def boot(self) -> None:
        reason = unavailable_reason()
        if reason:
            raise Unavailable(reason)
        self.work.mkdir(parents=True, exist_ok=True)
        excludes = " ".join(f"--exclude={pattern}" for pattern in COPY_EXCLUDES)
        for parent in own_cgroup_dirs():
            with contextlib.suppress(OSError):  # not writable: the container shares it
                (parent / self.name).mkdir()
                self.cgroups.append(parent / self.name)
        with self.console.open("wb") as console:
            self.launcher = subprocess.Popen(
                [
                    "unshare",
                    "--mount",
                    "--propagation",
                    "private",
                    "setpriv",
                    "--pdeathsig",
                    "TERM",
                    "sh",
                    "-c",
                    _LAUNCH,
                    "launch",
                    str(self.work),
                    self.name,
                    str(self.checkout),
                    self.dest,
                    *enabled_host_units(),
                ],
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                env={
                    **CLEAN_ENVIRONMENT,
                    "TAR_EXCLUDES": excludes,
                    "JOIN_CGROUPS": " ".join(map(str, self.cgroups)),
                },
                start_new_session=True,
            )
        deadline = time.monotonic() + BOOT_TIMEOUT
        self.init_pid = self._wait(deadline, self._find_init, "the container's init")
        self._wait(deadline, self._booted, "`systemctl is-system-running` = running/degraded")

    def close(self) -> None:
        """Power off; kill what is left. Safe to call more than once, or after a failed boot."""
        launcher, self.launcher = self.launcher, None
        if launcher is None:
            self._remove_cgroups()
            return
        if launcher.poll() is None and self.init_pid:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                self.run("systemctl", "--no-block", "poweroff", timeout=10, check=False)
            with contextlib.suppress(subprocess.TimeoutExpired):
                launcher.wait(POWEROFF_TIMEOUT)
        if launcher.poll() is None:
            # SIGKILL to a PID namespace's init kills every process in it.
            if self.init_pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.init_pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                launcher.kill()
            launcher.wait(30)
        self._remove_cgroups()

    def _remove_cgroups(self) -> None:
        """The launcher's cgroups, with whatever the container's systemd left in them."""
        for top in self.cgroups:
            for folder, _dirs, _files in sorted(os.walk(top), key=lambda w: -len(w[0])):
                with contextlib.suppress(OSError):
                    os.rmdir(folder)
        self.cgroups = []

    def _wait(self, deadline: float, probe: Callable[[], T | None], what: str) -> T:
        while True:
            found = probe()
            if found:
                return found
            if self.launcher is not None and self.launcher.poll() is not None:
                if self.launcher.returncode == CANNOT_MOUNT:
                    raise Unavailable(
                        "cannot make the overlay root (mounts refused):\n" + self.console_tail(5)
                    )
                raise RuntimeError(
                    f"the container exited ({self.launcher.returncode}) before {what}:\n"
                    + self.console_tail()
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}:\n" + self.console_tail())
            time.sleep(0.1)

    def _find_init(self) -> int | None:
        """The host pid of the container's PID 1: a descendant of systemd-nspawn whose
        innermost pid is 1."""
        assert self.launcher is not None
        pending = [self.launcher.pid]
        while pending:
            parent = pending.pop()
            try:
                children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                try:
                    status = Path(f"/proc/{child}/status").read_text()
                except OSError:
                    continue
                for line in status.splitlines():
                    if line.startswith("NSpid:"):
                        pids = line.split()[1:]
                        if len(pids) > 1 and pids[-1] == "1":
                            return child
                pending.append(child)
        return None

    def _booted(self) -> bool:
        proc = self.run("systemctl", "is-system-running", check=False, timeout=10)
        return proc.stdout.strip() in ("running", "degraded")

    def console_tail(self, lines: int = 40) -> str:
        try:
            text = self.console.read_text(errors="replace")
        except OSError:
            return "(no console output)"
        return "\n".join(text.splitlines()[-lines:])

    # -- commands inside ----------------------------------------------------------------

    def run(
        self,
        *argv: str,
        check: bool = True,
        timeout: float = 60,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run argv inside the container as root, from /, with CLEAN_ENVIRONMENT."""
        command = [
            "nsenter",
            "-t",
            str(self.init_pid),
            "-a",
            "-r",
            "-w",
            "env",
            "-i",
            *(f"{k}={v}" for k, v in CLEAN_ENVIRONMENT.items()),
            *argv,
        ]
        proc = subprocess.run(
            command,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{shlex.join(argv)} exited {proc.returncode}\n"
                f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
            )
        return proc

    def sh(self, script: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run a shell script inside (sh -ec)."""
        return self.run("sh", "-ec", script, **kw)

    def write(self, path: str, text: str) -> None:
        self.run("sh", "-ec", 'mkdir -p "$(dirname "$1")" && cat > "$1"', "write", path, input=text)
