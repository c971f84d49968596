"""``python -m launch.report``: see :mod:`launch.report.cli`."""

import sys

from .cli import main

sys.exit(main())
