"""Raw NIXL READ/WRITE transfer probe: the command line of :mod:`pdkit.gpu_check.nixl_probe` (see there)."""

from __future__ import annotations

import sys

from pdkit.gpu_check.nixl_probe import main

if __name__ == "__main__":
    sys.exit(main())
