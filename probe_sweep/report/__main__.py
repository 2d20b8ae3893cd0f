"""``python -m probe_sweep.report <sweep dir>``: write a sweep's report again."""

import sys

from probe_sweep.report.sweep import main

sys.exit(main())
