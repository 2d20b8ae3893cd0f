"""``python -m probe_sweep``: the Hydra entry in ``cli.py``.

The libraries take seconds to import; Ctrl-C meanwhile would show a traceback from inside one
of them (or leave torch half imported, and the next import of it fails). Until they are loaded
Ctrl-C says, on one line, that nothing was run, and the process dies of SIGINT as Python's does.
"""

import signal
import sys

from probe_sweep.interrupt import die_of_sigint


def interrupted_while_starting(signum: int, frame: object) -> None:
    sys.stderr.write("Interrupted while starting: nothing was run or written.\n")
    die_of_sigint()


if __name__ == "__main__":
    signal.signal(signal.SIGINT, interrupted_while_starting)
    from probe_sweep import cli

    signal.signal(signal.SIGINT, signal.default_int_handler)
    cli.run()
