"""``python -m lab``: the same as the ``explore`` command."""

import sys

from lab.cli import main

if __name__ == "__main__":  # `explore sweep --workers N` spawns processes that import this
    sys.exit(main())
