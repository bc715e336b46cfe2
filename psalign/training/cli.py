"""How ``train_psa.py`` and ``train_safetydpo.py`` end: the exit status and one message, never a traceback
for an expected problem.

* 0: the run finished;
* 2 (:data:`EXIT_REFUSED`): the inputs were refused (``file:line: field: reason`` lines, before
  any model is loaded), a checkpoint could not be resumed, or the loss or weights stopped being
  finite (the message names the last good checkpoint);
* 130 (:data:`EXIT_INTERRUPTED`): Ctrl-C; one line says how to resume.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

from psalign.io import InputError

from . import checkpoints
from .config import TrainingConfig
from .trainer import NonFiniteLossError, train

EXIT_REFUSED = 2
EXIT_INTERRUPTED = 130


def _interrupted_message(config: TrainingConfig | None) -> str:
    if config is None:
        return "interrupted before the run started"
    last = checkpoints.latest_checkpoint(config.output_dir)
    if last is None:
        return (f"interrupted before the first checkpoint of {config.output_dir}: rerun with "
                "--overwrite_output_dir to start it again")
    return f"interrupted: rerun with --resume_from_checkpoint latest to continue from {last}"


def run_training(make_config: Callable[[], TrainingConfig]) -> int:
    """Build the config with ``make_config`` and train; the exit status (module docstring), with
    the reason written to stderr."""
    config, interrupted = None, False
    try:
        config = make_config()
        train(config)
    except (InputError, checkpoints.CheckpointError, NonFiniteLossError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        interrupted = True
    if not interrupted:
        return 0
    # Printed once the interrupted frames are gone, so that their progress bars have closed before it.
    if os.environ.get("RANK", "0") == "0":  # one line, not one per process
        print(_interrupted_message(config), file=sys.stderr)
    return EXIT_INTERRUPTED
