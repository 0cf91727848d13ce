"""``python -m metarobust``: the command line, for when the console script is not on PATH."""

import sys

from metarobust.cli import main

sys.exit(main())
