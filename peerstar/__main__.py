"""`python -m peerstar` runs the command-line interface."""

from peerstar.cli import main

raise SystemExit(main())
