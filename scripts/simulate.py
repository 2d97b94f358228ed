"""The fleet simulation (``pdkit bench-fleet``): kept under its old name for the commands in docs/fleet-sim.md."""

import sys

from pdkit.bench.fleet import main

if __name__ == "__main__":
    sys.exit(main())
