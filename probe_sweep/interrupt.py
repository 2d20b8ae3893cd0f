"""Ending a process on Ctrl-C as Python does for an uncaught KeyboardInterrupt (status 130 in a
shell, and a shell loop around the command stops too), but after the caller's one line on what
is kept instead of a traceback. Imports nothing heavy: ``__main__`` uses it before torch loads."""

import os
import signal
import sys
import time
from typing import NoReturn


def die_of_sigint() -> NoReturn:
    """Flush the standard streams and die of SIGINT (exit status 130 where signals are not
    posix)."""
    sys.stdout.flush()
    sys.stderr.flush()
    if os.name == "posix":
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)  # another thread may take the signal a moment later
    os._exit(130)
