"""``python -m pipeline``: the CLI, and a process that ends as soon as its command has.

When the command returns, its files are closed and its output printed. What would follow is Ray's
exit hook (half a second of sleep, then Ray's processes stopped) and the interpreter tearing down
the thousands of modules Ray, pyarrow and pandas import (~0.6 s). Ray is stopped here without the
sleep, and ``os._exit`` skips the teardown, which has nothing left to do.
"""

import os
import sys

from .cli import main
from .cluster import release

code = main()
release()
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
