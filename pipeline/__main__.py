"""``python -m pipeline``: the CLI, and a process that ends as soon as its command has.

When the command returns, its files are closed and its output printed. What would follow is Ray's
exit hook (half a second of sleep, then Ray's processes stopped) and the interpreter tearing down
the thousands of modules Ray, pyarrow and pandas import (~0.6 s). Ray is stopped here without the
sleep, and ``os._exit`` skips the teardown, which has nothing left to do.
"""

import os
import sys

from . import local

local.prestart(sys.argv[1:])  # before the imports below: the workers' fork server imports torch meanwhile

from .cli import main  # noqa: E402
from .cluster import release  # noqa: E402

try:
    code = main()
finally:  # not left to finish its import after a command that ended early (bad input, --help)
    local.stop_fork_server()
release()
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
