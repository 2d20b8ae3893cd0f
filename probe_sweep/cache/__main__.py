"""``python -m probe_sweep.cache``: see ``cli.py``."""

import sys

from probe_sweep.cache.cli import main

sys.exit(main())
