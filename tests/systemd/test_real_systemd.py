"""supd.service and supd.socket under a real systemd (252 on Debian 12), installed as
the README says: readiness, status, reload, stop, watchdog, crash recovery, socket
activation, journald priorities, the units' own checks and their hardening.

Every test starts from the same state (the `service` fixture): the shipped units and
/etc/supd/supd.toml, no drop-in, supd.socket disabled, supd.service stopped; the test
writes its programs to /etc/supd/conf.d/test.toml and starts supd.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Callable, Iterator

import pytest

from tests.helpers import REPO, wait_until
from tests.systemd import readme
from tests.systemd.machine import CHECKOUT, Machine

DROP_IN_DIR = "/etc/systemd/system/supd.service.d"
TEST_CONFIG = "/etc/supd/conf.d/test.toml"
SCRATCH = "/var/tmp/supd-test"  # programs leave their traces here
SECURITY_RE = re.compile(r"Overall exposure level for supd\.service: (\d+\.\d+) (\w+)")

# Variables systemd sets for supd that no program may inherit.
SYSTEMD_PRIVATE = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "INVOCATION_ID",
    "JOURNAL_STREAM",
    "RUNTIME_DIRECTORY",
    "STATE_DIRECTORY",
    "LOGS_DIRECTORY",
    "CACHE_DIRECTORY",
    "CONFIGURATION_DIRECTORY",
    "CREDENTIALS_DIRECTORY",
    "MAINPID",
)


class Service:
    """supd.service inside the container, seen through systemctl, supctl and journalctl."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.since = 0

    def run(self, *argv: str, **kw: object) -> str:
        return self.machine.run(*argv, **kw).stdout  # type: ignore[arg-type]

    def systemctl(self, *argv: str, check: bool = True, timeout: float = 60) -> str:
        return self.machine.run("systemctl", *argv, check=check, timeout=timeout).stdout

    def show(self, prop: str, unit: str = "supd.service") -> str:
        return self.systemctl("show", "-P", prop, unit).strip()

    def main_pid(self) -> int:
        return int(self.show("MainPID"))

    def is_active(self, unit: str = "supd.service") -> str:
        return self.systemctl("is-active", unit, check=False).strip()

    def supctl(self, *argv: str, check: bool = True) -> str:
        return self.machine.run("supctl", *argv, check=check, timeout=30).stdout

    def processes(self) -> dict[str, dict[str, object]]:
        """name -> status entry, from `supctl --json status`."""
        proc = self.machine.run("supctl", "--json", "status", check=False, timeout=30)
        assert proc.returncode in (0, 3), proc.stderr  # 3: something is not RUNNING
        data = json.loads(proc.stdout)
        entries = data["processes"] if isinstance(data, dict) else data
        return {entry["name"]: entry for entry in entries}

    def state(self, name: str) -> str:
        """The process's state, or "" while supd does not know it (yet)."""
        entry = self.processes().get(name)
        return "" if entry is None else str(entry["state"])

    def pid(self, name: str) -> int:
        return int(self.supctl("pid", name).strip())

    def configure(self, toml: str) -> None:
        self.machine.write(TEST_CONFIG, toml)

    def mark_journal(self) -> None:
        """Later journal() calls see only what was logged after this point."""
        self.since = int(self.run("date", "+%s%6N"))

    def journal(self, priority: int = 7) -> list[dict[str, str]]:
        """supd.service's journal entries since mark_journal() at `priority` or more
        urgent, as JSON objects. (Filtered here: journalctl's --after-cursor skips the
        first match when combined with -p.)"""
        out = self.run(
            "journalctl",
            "-u",
            "supd.service",
            "-o",
            "json",
            "--no-pager",
            f"--since=@{self.since // 1_000_000}",
        )
        entries = [json.loads(line) for line in out.splitlines() if line.strip()]
        return [
            entry
            for entry in entries
            if int(entry["__REALTIME_TIMESTAMP"]) >= self.since
            and int(entry.get("PRIORITY", 6)) <= priority
        ]

    def messages(self, priority: int = 7) -> list[str]:
        return [str(entry.get("MESSAGE", "")) for entry in self.journal(priority)]


def wait(predicate: Callable[[], object], what: str, timeout: float = 30) -> object:
    return wait_until(predicate, timeout=timeout, describe=what)


@pytest.fixture(scope="module")
def service_setup(installed: Machine) -> Service:
    installed.sh(f"mkdir -p {SCRATCH} && chmod 1777 {SCRATCH}")
    return Service(installed)


@pytest.fixture
def service(service_setup: Service) -> Iterator[Service]:
    """A known state: shipped units and config, no drop-in, socket disabled, supd
    stopped; the test configures its programs and starts supd."""
    svc = service_setup
    svc.machine.sh(
        f"""
        systemctl disable --now supd.socket >/dev/null 2>&1 || true
        systemctl stop supd.service
        systemctl reset-failed supd.service supd.socket 2>/dev/null || true
        rm -rf {DROP_IN_DIR} {TEST_CONFIG} {SCRATCH}/*
        cp {shlex.quote(CHECKOUT)}/config/system/supd.toml /etc/supd/supd.toml
        systemctl daemon-reload
        """
    )
    svc.mark_journal()
    yield svc


def sleeper(name: str, **options: object) -> str:
    """A [programs.NAME] table running `sleep 1000`; options override the defaults."""
    settings: dict[str, object] = {"command": ["sleep", "1000"], "startsecs": 0, **options}
    lines = [f"[programs.{name}]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"


# -- installation ------------------------------------------------------------------------


def test_readme_install_runs_supd_under_systemd(service: Service) -> None:
    service.systemctl("start", "supd.service")
    assert service.is_active() == "active"
    assert service.show("Type") == "notify"
    assert service.run("readlink", "-f", "/usr/local/bin/supd").strip() == "/opt/supd/bin/supd"
    # supctl finds the service with no option at all, and with the config.
    assert "supd" in service.supctl("version")
    assert "supd" in service.supctl("-c", "/etc/supd/supd.toml", "version")


def test_systemd_analyze_verify_accepts_the_installed_units(service: Service) -> None:
    proc = service.machine.run(
        "systemd-analyze",
        "verify",
        "--recursive-errors=no",
        "/etc/systemd/system/supd.service",
        "/etc/systemd/system/supd.socket",
        check=False,
    )
    complaints = [line for line in (proc.stdout + proc.stderr).splitlines() if "supd" in line]
    assert proc.returncode == 0 and complaints == [], proc.stdout + proc.stderr


# -- start, status, reload ---------------------------------------------------------------


def test_ready_only_once_the_programs_have_started(service: Service) -> None:
    service.configure(sleeper("slow", startsecs=3) + sleeper("quick"))
    service.systemctl("start", "supd.service")  # returns on READY=1
    # READY=1 came after `slow` had stayed up its 3 startsecs ...
    states = {name: entry["state"] for name, entry in service.processes().items()}
    assert states["slow"] == "RUNNING" and states["quick"] == "RUNNING", states
    started = int(service.show("ExecMainStartTimestampMonotonic"))
    active = int(service.show("ActiveEnterTimestampMonotonic"))
    assert active - started >= 3_000_000, (started, active)


def test_status_line_follows_the_process_states(service: Service) -> None:
    service.configure(
        sleeper("a")
        + sleeper("b")
        + '[programs.broken]\ncommand = ["false"]\nstartsecs = 1\nstartretries = 0\n'
    )
    service.systemctl("start", "supd.service")
    wait(lambda: service.show("StatusText") == "2 running, 1 fatal", "2 running, 1 fatal")
    service.supctl("stop", "b")
    wait(
        lambda: service.show("StatusText") == "1 running, 1 fatal, 1 stopped",
        "the status line after a stop",
    )
    assert "1 running, 1 fatal, 1 stopped" in service.systemctl("status", "supd", check=False)


def test_reload_applies_a_valid_config(service: Service) -> None:
    service.configure(sleeper("keep"))
    service.systemctl("start", "supd.service")
    main_pid, keep_pid = service.main_pid(), service.pid("keep")
    service.configure(sleeper("keep") + sleeper("added"))
    service.systemctl("reload", "supd.service")
    wait(lambda: service.state("added") == "RUNNING", "the added program running")
    assert (service.main_pid(), service.pid("keep")) == (main_pid, keep_pid)
    assert service.is_active() == "active"


def test_reload_with_a_bad_config_fails_loudly_and_changes_nothing(service: Service) -> None:
    service.configure(sleeper("keep"))
    service.systemctl("start", "supd.service")
    keep_pid = service.pid("keep")
    service.configure(sleeper("keep") + sleeper("added", startsecs="soon"))
    proc = service.machine.run("systemctl", "reload", "supd.service", check=False)
    assert proc.returncode != 0
    assert service.is_active() == "active"
    assert service.pid("keep") == keep_pid
    assert "added" not in service.processes()

    # Why it failed is an error, not only "Reload failed" (journald reads the check's
    # output asynchronously: wait for it).
    def reasons() -> list[str]:
        return [m for m in service.messages(3) if "programs.added.startsecs" in m]

    found = wait_until(
        reasons, timeout=10, describe=lambda: f"the reason at -p err in {service.journal()}"
    )
    assert isinstance(found, list) and found[0].startswith(f"{TEST_CONFIG}:"), found
    assert not any("config OK" in m for m in service.messages(4))
    # What an admin types:
    shown = service.run(
        "journalctl",
        "-u",
        "supd",
        "-p",
        "warning",
        "--no-pager",
        f"--since=@{service.since // 1_000_000}",
    )
    assert "programs.added.startsecs" in shown


# -- journald ----------------------------------------------------------------------------


def test_journal_priorities_follow_the_event_levels(service: Service) -> None:
    service.configure(
        sleeper("fine")
        + '[programs.missing]\ncommand = ["/nonexistent/program"]\nstartretries = 0\n'
    )
    service.systemctl("start", "supd.service")
    wait(lambda: service.state("missing") == "FATAL", "missing FATAL")

    def priorities(event: str) -> set[str]:
        return {
            entry["PRIORITY"]
            for entry in service.journal()
            if f'"event": "{event}"' in str(entry.get("MESSAGE", ""))
            or f'"event":"{event}"' in str(entry.get("MESSAGE", ""))
        }

    assert wait(lambda: priorities("spawned"), "a spawned event") == {"6"}
    assert wait(lambda: priorities("fatal"), "a fatal event") == {"3"}
    warnings = service.messages(4)
    assert any("fatal" in m for m in warnings)
    assert not any('"spawned"' in m for m in warnings)


# -- stopping, watchdog, crashes ---------------------------------------------------------


def recorder(name: str, priority: int) -> str:
    """A program that notes when SIGTERM arrives and when it is done with it."""
    script = (
        f"trap 'echo term {name} >> {SCRATCH}/order; sleep 0.3; "
        f"echo done {name} >> {SCRATCH}/order; kill $!; exit 0' TERM; "
        "sleep 1000 & wait"
    )
    return (
        f"[programs.{name}]\ncommand = {json.dumps(['/bin/sh', '-c', script])}\n"
        f"priority = {priority}\nstartsecs = 0\nkillasgroup = false\n"
    )


def test_stop_goes_by_priority_and_succeeds(service: Service) -> None:
    service.configure(recorder("db", 100) + recorder("app", 200) + recorder("web", 300))
    service.systemctl("start", "supd.service")
    service.systemctl("stop", "supd.service")
    order = service.run("cat", f"{SCRATCH}/order").split("\n")
    assert [line for line in order if line] == [
        "term web",
        "done web",
        "term app",
        "done app",
        "term db",
        "done db",
    ]
    assert service.show("Result") == "success"
    assert service.show("ExecMainStatus") == "0"


def restarted(service: Service, old_main: int) -> Callable[[], bool]:
    def check() -> bool:
        return service.is_active() == "active" and service.main_pid() not in (0, old_main)

    return check


def alive_in_container(service: Service, pid: int) -> bool:
    return service.machine.run("kill", "-0", str(pid), check=False).returncode == 0


def test_watchdog_restarts_a_hung_supd(service: Service) -> None:
    service.machine.write(f"{DROP_IN_DIR}/watchdog.conf", "[Service]\nWatchdogSec=3s\n")
    service.systemctl("daemon-reload")
    service.configure(sleeper("worker"))
    service.systemctl("start", "supd.service")
    main_pid, worker = service.main_pid(), service.pid("worker")
    restarts = int(service.show("NRestarts"))
    service.run("kill", "-STOP", str(main_pid))
    wait(restarted(service, main_pid), "supd restarted by the watchdog", timeout=30)
    assert int(service.show("NRestarts")) == restarts + 1
    wait(lambda: service.state("worker") == "RUNNING", "worker running again")
    assert service.pid("worker") != worker
    assert not alive_in_container(service, worker)
    wait(
        lambda: any("Watchdog timeout" in m for m in service.messages()),
        "systemd's watchdog message",
        timeout=10,
    )


def test_programs_get_a_cgroup_each_and_nothing_is_left_after_stop(service: Service) -> None:
    """Delegate=yes: supd in supd.service/daemon, each program in its own cgroup; what a
    program leaves (a double-forked daemon, a setsid'd child) goes with the stop."""
    escaper = "setsid sleep 1001 & ( ( sleep 1002 & ) & ); exec sleep 1000"
    service.configure(sleeper("worker", command=["/bin/sh", "-c", escaper]))
    service.systemctl("start", "supd.service")
    wait(lambda: service.state("worker") == "RUNNING", "worker running")
    messages = service.messages()
    assert any("cgroups_used" in m for m in messages), messages
    # Where cgroup2 is mounted in the container (/sys/fs/cgroup/unified when hybrid).
    mounts = service.run("cat", "/proc/self/mounts").splitlines()
    mount = next(line.split()[1] for line in mounts if line.split()[2] == "cgroup2")
    root = mount + service.show("ControlGroup")
    wait(
        lambda: len(service.run("cat", f"{root}/programs/worker/cgroup.procs").split()) == 3,
        "the program and both escapers in the program's cgroup",
    )
    daemon = service.run("cat", f"{root}/daemon/cgroup.procs").split()
    assert daemon == [str(service.main_pid())]
    # No process in the inner node. (Waited for: once a dying task of the service's
    # previous run was seen there for a moment, listed as pid 0.)
    wait(
        lambda: service.run("cat", f"{root}/cgroup.procs").split() == [],
        "no process in supd.service itself",
    )
    service.systemctl("stop", "supd.service")
    assert service.show("Result") == "success"
    # supd emptied every cgroup itself: nothing was left for systemd's SIGKILL.
    assert not any("Killing process" in m for m in service.messages())
    assert service.run("pgrep", "-c", "-f", "^sleep 100[0-2]$", check=False).strip() == "0"


def test_recovery_after_kill_9(service: Service) -> None:
    service.configure(sleeper("worker"))
    service.systemctl("start", "supd.service")
    main_pid, worker = service.main_pid(), service.pid("worker")
    service.run("kill", "-9", str(main_pid))
    wait(restarted(service, main_pid), "supd restarted after kill -9", timeout=30)
    wait(lambda: service.state("worker") == "RUNNING", "worker running again")
    # The old program went with the old supd: no second copy.
    assert not alive_in_container(service, worker)
    assert service.run("pgrep", "-c", "-x", "sleep").strip() == "1"


# -- socket activation -------------------------------------------------------------------


def test_socket_activation_in_the_documented_order(service: Service) -> None:
    service.configure(sleeper("worker"))
    service.systemctl("start", "supd.service")  # installed and running, as after install
    service.machine.sh(readme.socket_activation_script())
    assert service.is_active("supd.socket") == "active"
    assert service.is_active() == "active"
    inode = service.run("stat", "-c", "%i", "/run/supd/supd.sock").strip()
    # The first connection starts supd when it is not running ...
    service.systemctl("stop", "supd.service")
    assert service.is_active() == "inactive"
    assert "worker" in service.supctl("status")
    assert service.is_active() == "active"
    # ... on the socket systemd holds: the same inode across restarts.
    assert service.run("stat", "-c", "%i", "/run/supd/supd.sock").strip() == inode
    service.systemctl("restart", "supd.service")
    assert service.run("stat", "-c", "%i", "/run/supd/supd.sock").strip() == inode
    assert "worker" in service.supctl("status")


def test_bad_config_with_the_socket_is_no_start_limit_trap(service: Service) -> None:
    service.configure(sleeper("worker"))
    service.machine.sh("systemctl enable --now supd.socket supd.service")
    service.systemctl("stop", "supd.service")
    service.configure(sleeper("worker", startsecs="soon"))
    # supctl triggers a start, which fails on the config: the waiting connection is
    # dropped (not left to time out), and supd.socket keeps listening.
    proc = service.machine.run("supctl", "--timeout", "20", "status", check=False, timeout=60)
    assert proc.returncode == 4, (proc.stdout, proc.stderr)
    assert "connection lost" in proc.stderr, proc.stderr
    assert service.show("Result") == "exit-code"
    assert service.show("ExecMainStatus") == "2"
    assert service.is_active("supd.socket") == "active"
    assert int(service.show("NRestarts")) == 0
    # Fixing the config is all it takes: no reset-failed.
    service.configure(sleeper("worker"))
    assert "worker" in service.supctl("status")
    assert service.is_active() == "active"


# -- one supervisor per config -----------------------------------------------------------


def test_a_second_supd_on_the_same_config_refuses_to_start(service: Service) -> None:
    service.configure(sleeper("worker"))
    service.systemctl("start", "supd.service")
    worker = service.pid("worker")
    # An admin shell: no RUNTIME_DIRECTORY, so with the shipped config the socket is the
    # service's, and the live socket turns the second supd away ...
    proc = service.machine.run("supd", "-c", "/etc/supd/supd.toml", check=False, timeout=30)
    assert proc.returncode == 2, proc
    assert "already running" in proc.stderr
    assert str(service.main_pid()) in proc.stderr
    assert service.pid("worker") == worker
    # ... and supctl with the config reaches the service.
    assert "worker" in service.supctl("-c", "/etc/supd/supd.toml", "status")


def test_the_config_lock_holds_even_where_the_sockets_differ(service: Service) -> None:
    # A config without `socket`: the service listens on $RUNTIME_DIRECTORY/supd.sock, an
    # admin's supd would listen on /etc/supd/supd.sock. Only the lock stops it.
    service.machine.sh("sed -i '/^socket = /d' /etc/supd/supd.toml")
    service.configure(sleeper("worker"))
    service.systemctl("start", "supd.service")
    worker = service.pid("worker")
    proc = service.machine.run("supd", "-c", "/etc/supd/supd.toml", check=False, timeout=30)
    assert proc.returncode == 2, proc
    assert "another supd is already running on /etc/supd/supd.toml" in proc.stderr
    assert f"pid {service.main_pid()}" in proc.stderr
    assert service.machine.run("test", "-e", "/etc/supd/supd.sock", check=False).returncode == 1
    assert service.pid("worker") == worker
    assert service.run("pgrep", "-c", "-x", "sleep").strip() == "1"  # no second copy
    # Under systemd the refusal is an error in the journal, too.
    proc = service.machine.run(
        "systemd-run",
        "--wait",
        "--quiet",
        "--collect",
        "--unit=supd-second",
        "--property=Type=exec",
        "/usr/local/bin/supd",
        "-c",
        "/etc/supd/supd.toml",
        check=False,
        timeout=60,
    )
    assert proc.returncode != 0
    wait(
        lambda: (
            "another supd is already running"
            in service.run("journalctl", "-u", "supd-second", "-p", "err", "--no-pager")
        ),
        "the refusal in `journalctl -p err`",
        timeout=10,
    )


# -- what programs inherit, and the hardening --------------------------------------------


def test_programs_do_not_inherit_systemds_variables_for_supd(service: Service) -> None:
    service.machine.write(
        f"{DROP_IN_DIR}/directories.conf",
        "[Service]\nStateDirectory=supd\nCacheDirectory=supd\nConfigurationDirectory=supd\n"
        "LoadCredential=test:/etc/hostname\n",
    )
    service.systemctl("daemon-reload")
    service.configure(sleeper("worker"))
    service.systemctl("start", "supd.service")
    main_env = service.run("cat", f"/proc/{service.main_pid()}/environ").split("\0")
    assert {v.partition("=")[0] for v in main_env} >= {
        "INVOCATION_ID",
        "JOURNAL_STREAM",
        "RUNTIME_DIRECTORY",
        "CREDENTIALS_DIRECTORY",
    }
    env = service.run("cat", f"/proc/{service.pid('worker')}/environ").split("\0")
    names = {v.partition("=")[0] for v in env if v}
    assert names & set(SYSTEMD_PRIVATE) == set(), names
    assert {"PATH", "SUPD_PROCESS_NAME"} <= names


HARDENED_PROGRAM = r"""
import os, subprocess, sys

def write(path):
    with open(path, "w") as f:
        f.write("x")
    os.unlink(path)

def setuid_binary():
    out = subprocess.run(["/usr/local/bin/suid-id", "-u"], check=True,
                         capture_output=True, text=True).stdout
    assert out.strip() == "0", f"euid {out.strip()}: setuid did not take effect"

checks = {
    "write /tmp": lambda: write(f"/tmp/hardening-{os.getpid()}"),
    "write /var/tmp": lambda: write(f"/var/tmp/hardening-{os.getpid()}"),
    "read /proc/sys": lambda: open("/proc/sys/kernel/hostname").read(),
    "read /sys/fs/cgroup": lambda: os.listdir("/sys/fs/cgroup"),
    "run a setuid binary": setuid_binary,
    "nice": lambda: os.nice(1),
    "SCHED_BATCH": lambda: os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0)),
    "setarch native": lambda: subprocess.run(["setarch", os.uname().machine, "true"],
                                             check=True),
    "mkdir in a setgid directory": lambda: os.mkdir(f"/var/tmp/supd-test/sgid/{os.getpid()}"),
    "fork and exec": lambda: subprocess.run(["true"], check=True),
}
failed = 0
for name, check in checks.items():
    try:
        check()
        print(f"ok: {name}")
    except BaseException as exc:
        failed += 1
        print(f"FAILED: {name}: {type(exc).__name__}: {exc}")
sys.exit(1 if failed else 0)
"""

# What the hardening takes away, probed by a root program under the same unit: proof
# that the program above ran under it.
HARDENING_IN_EFFECT = r"""
import ctypes, errno, os, signal, subprocess, sys

INT80 = (  # a 32-bit system call from this 64-bit process: mov eax, 20 (getpid); int 0x80
    "import ctypes, mmap\n"
    "buf = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
    "buf.write(bytes([0xB8, 0x14, 0, 0, 0, 0xCD, 0x80, 0xC3]))\n"
    "print(ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(buf)))())\n"
)

def read_kallsyms():  # an empty, inaccessible file in its place when refused
    with open("/proc/kallsyms") as f:
        if not f.read(1):
            raise OSError("hidden")

def reboot_syscall():  # bad magic numbers: EINVAL when allowed, EPERM when filtered
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(169, 0, 0, 0, 0) != 0 and ctypes.get_errno() == errno.EPERM:  # x86-64
        raise OSError(errno.EPERM, "reboot")

def setarch_no_aslr():
    subprocess.run(["setarch", os.uname().machine, "-R", "true"], check=True,
                   stderr=subprocess.DEVNULL)

def syscall_32bit():  # killed by SIGSYS when refused
    run = subprocess.run([sys.executable, "-c", INT80], stdout=subprocess.DEVNULL)
    if run.returncode == -signal.SIGSYS:
        raise OSError("SIGSYS")

def write_usr():
    with open("/usr/local/supd-probe", "w"):
        pass
    os.unlink("/usr/local/supd-probe")

def mkdir_cgroup():  # in this process's own cgroup (v2)
    own = [line[3:] for line in open("/proc/self/cgroup").read().splitlines()
           if line.startswith("0::")][0]
    mounts = [line.split()[4] for line in open("/proc/self/mountinfo")
              if " - cgroup2 " in line]
    path = mounts[0] + own + "/supd-probe"
    os.mkdir(path)
    os.rmdir(path)

probes = {
    "write /usr": write_usr,
    "read /proc/kallsyms": read_kallsyms,
    "mkdir in a cgroup": mkdir_cgroup,
    "SCHED_FIFO": lambda: os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1)),
    "chmod u+s": lambda: os.chmod("/var/tmp/supd-test/suid-probe", 0o4755),
    "chmod g+s": lambda: os.chmod("/var/tmp/supd-test/suid-probe", 0o2755),
    "reboot()": reboot_syscall,
    "setarch -R": setarch_no_aslr,
    "32-bit syscall": syscall_32bit,
}
for name, probe in probes.items():
    try:
        probe()
        print(f"allowed: {name}")
    except (OSError, subprocess.CalledProcessError):
        print(f"refused: {name}")
"""


def test_hardening_leaves_programs_running_as_other_users_alone(service: Service) -> None:
    if os.uname().machine != "x86_64":
        pytest.skip("the probes use x86-64 system call numbers and instructions")
    service.machine.sh(
        f"""
        install -m 4755 /usr/bin/id /usr/local/bin/suid-id
        mkdir -p {SCRATCH}/sgid && chmod 2777 {SCRATCH}/sgid
        touch {SCRATCH}/suid-probe
        """
    )
    program = json.dumps(["python3", "-c", HARDENED_PROGRAM])
    probe = json.dumps(["python3", "-c", HARDENING_IN_EFFECT])
    # The probe is worth something: in a unit without the hardening, all is allowed.
    bare = service.run(
        "systemd-run", "--wait", "--pipe", "--quiet", "python3", "-c", HARDENING_IN_EFFECT
    ).splitlines()
    assert bare == [line.replace("refused", "allowed") for line in PROBED_UNDER_SUPD]
    service.run("chmod", "0644", f"{SCRATCH}/suid-probe")
    service.configure(
        f'[programs.as_nobody]\ncommand = {program}\nuser = "nobody"\n'
        'directory = "/"\nautorestart = "never"\nstartsecs = 0\n'
        f"[programs.as_root]\ncommand = {program}\n"
        'autorestart = "never"\nstartsecs = 0\n'
        f"[programs.probe]\ncommand = {probe}\n"
        'autorestart = "never"\nstartsecs = 0\n'
    )
    service.systemctl("start", "supd.service")
    for name in ("as_nobody", "as_root", "probe"):
        wait(lambda n=name: service.state(n) == "EXITED", f"{name} done")  # type: ignore[misc]
    for name in ("as_nobody", "as_root"):
        log = service.run("cat", f"/var/log/supd/{name}.out.log")
        assert "FAILED" not in log and log.count("ok: ") == 10, (name, log)
        assert service.processes()[name]["exit_code"] == 0, log
    probed = service.run("cat", "/var/log/supd/probe.out.log").splitlines()
    assert probed == PROBED_UNDER_SUPD


PROBED_UNDER_SUPD = [
    "refused: write /usr",  # ProtectSystem=yes
    "refused: read /proc/kallsyms",  # ProtectKernelTunables
    "allowed: mkdir in a cgroup",  # Delegate=yes: a program's own cgroup is writable
    "refused: SCHED_FIFO",  # RestrictRealtime
    "refused: chmod u+s",  # RestrictSUIDSGID
    "refused: chmod g+s",
    "refused: reboot()",  # SystemCallFilter=~@reboot
    "refused: setarch -R",  # LockPersonality
    "refused: 32-bit syscall",  # SystemCallArchitectures=native
]


def test_security_score_is_the_one_in_the_readme(service: Service) -> None:
    proc = service.machine.run(
        "systemd-analyze", "security", "--no-pager", "supd.service", check=False
    )
    match = SECURITY_RE.search(proc.stdout + proc.stderr)
    assert match, proc.stdout + proc.stderr
    score = f"{match.group(1)} {match.group(2)}"
    text = (REPO / "README.md").read_text()
    assert f"`systemd-analyze security supd`: {score}" in text, score
