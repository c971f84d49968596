"""``python -m shards``: the dataset-building CLI (see ``shards.cli``)."""

import sys

from shards.cli import main

sys.exit(main())
