"""`python -m supervisor` runs the daemon, exactly like the `supd` command."""

from supervisor.entry import main

raise SystemExit(main())
