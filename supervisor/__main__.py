"""`python -m supervisor` runs the daemon."""

from supervisor.daemon import main

raise SystemExit(main())
