"""``python -m proponents``: the same command line as the ``proponents`` script."""

from __future__ import annotations

import sys

from proponents.cli import main

if __name__ == "__main__":
    sys.exit(main())
