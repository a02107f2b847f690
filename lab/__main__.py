"""``python -m lab``: the same as the ``explore`` command."""

import sys

from lab.cli import main

sys.exit(main())
