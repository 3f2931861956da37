"""The `supd` command: a small launcher in front of supd.daemon.

supd never speaks TLS and never needs OpenSSL's hashes, but its dependencies import
both at start-up (pydantic -> secrets -> hmac -> hashlib in the config checker;
asyncio -> ssl, should anything import asyncio: daemonlog keeps structlog from it),
which maps OpenSSL's libcrypto into a daemon that should stay small: about 4 MB of RSS,
a tenth of the whole. Marking the two OpenSSL bindings as unavailable before anything
is imported keeps them out; both importers already handle their absence (asyncio runs
without ssl, hashlib falls back to its built-in implementations). This is done here and
not in the package, so that supctl, the tests and library users are not affected.
"""

from __future__ import annotations

import os
import sys

_UNUSED_EXTENSIONS = ("_ssl", "_hashlib")


def main(argv: list[str] | None = None) -> int:
    _open_standard_fds()
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["import"]:  # `supd import FILE`: a converter, not the daemon
        from . import importer

        return importer.main(args[1:])
    for name in _UNUSED_EXTENSIONS:
        if name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]  # "not importable"
    from . import configcheck

    if args[:2] == ["--check", configcheck.EMIT_JSON_ARG] and args[2:3] == ["-c"]:
        # The daemon's own checker (configcheck.argv): the validator only, not the daemon.
        return configcheck.emit_json_main(args[3:])
    path = _daemon_config(args, configcheck.DEFAULT_CONFIG)
    if path is not None:  # the config is checked in a child: meanwhile, import the daemon
        configcheck.start_early(path)
    from . import daemon

    return daemon.main(args)


def _open_standard_fds() -> None:
    """/dev/null as fd 0, 1 or 2 where supd was started without it (an init, a shell's
    `2>&-`): else the first files supd opens take those numbers (stray writes to
    stderr would land in a socket or a lock file), and Python, which found no stderr,
    leaves sys.stderr None, which supd's logging cannot write to."""
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        try:
            os.fstat(fd)
        except OSError:
            os.set_inheritable(os.open(os.devnull, os.O_RDWR), True)  # the lowest: `fd`
        if getattr(sys, name) is None:
            stream = open(fd, mode, closefd=False, errors="backslashreplace")  # noqa: SIM115
            setattr(sys, name, stream)  # for as long as supd runs


# reexec.ENV_STATE_FD (not imported here: this runs before the daemon's modules load).
_REEXEC_STATE = "SUPD_REEXEC_STATE"


def _daemon_config(args: list[str], default: str) -> str | None:
    """The config file, if this command line plainly starts the daemon (`-c FILE`,
    `--config FILE`, `--config=FILE` or nothing); None for anything else (--check,
    --version, a re-exec...), which argparse in daemon.py then reads as ever."""
    if _REEXEC_STATE in os.environ:
        return None
    path = default
    rest = iter(args)
    for arg in rest:
        if arg in ("-c", "--config"):
            following = next(rest, None)
            if following is None:
                return None
            path = following
        elif arg.startswith("--config="):
            path = arg.removeprefix("--config=")
        elif arg.startswith("-c") and not arg.startswith("--"):
            path = arg[2:]
        else:
            return None
    return path
