"""``python -m probe_sweep.training model=<option> [model.training.steps=N ...]``: train the
model a ``conf/model`` option describes (its ``training`` and ``architecture``) and save it at
its ``model.path``, where ``python -m probe_sweep model=<option>`` loads it. Overrides use the
main command's syntax. Ctrl-C saves a checkpoint; the same command resumes from it."""

from __future__ import annotations

import logging
import sys

from probe_sweep import threads
from probe_sweep.config import compose_config
from probe_sweep.errors import UserError
from probe_sweep.extraction.hidden_states import pick_device
from probe_sweep.interrupt import die_of_sigint
from probe_sweep.training.decoder import Interrupted, train_decoder

log = logging.getLogger("probe_sweep")


def main(overrides: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(name)s][%(levelname)s] - %(message)s")
    try:
        config = compose_config(overrides)
        threads.configure_threads()
        train_decoder(config.model, pick_device(config.device))
    except UserError as exc:
        log.error("error: %s", exc)
        return 2
    except Interrupted as stop:
        print(
            f"Interrupted at step {stop.step}. The checkpoint {stop.checkpoint} is kept; run the "
            "same command to resume.",
            file=sys.stderr,
        )
        die_of_sigint()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
