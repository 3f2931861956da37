"""The `supd` command: a small launcher in front of supd.daemon.

supd never speaks TLS and never needs OpenSSL's hashes, but its dependencies import
both at start-up (pydantic -> secrets -> hmac -> hashlib; asyncio -> ssl, should
anything import asyncio again),
which maps OpenSSL's libcrypto into a daemon that should stay small: about 4 MB of RSS,
a tenth of the whole. Marking the two OpenSSL bindings as unavailable before anything
is imported keeps them out; both importers already handle their absence (asyncio runs
without ssl, hashlib falls back to its built-in implementations). This is done here and
not in the package, so that supctl, the tests and library users are not affected.
"""

from __future__ import annotations

import sys

_UNUSED_EXTENSIONS = ("_ssl", "_hashlib")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["import"]:  # `supd import FILE`: a converter, not the daemon
        from . import importer

        return importer.main(args[1:])
    for name in _UNUSED_EXTENSIONS:
        if name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]  # "not importable"
    from . import daemon

    return daemon.main(args)
