"""`python -m supd` runs the daemon, exactly like the `supd` command."""

from .entry import main

raise SystemExit(main())
