r"""Train a PSA user adapter with Diffusion-DPO on Sage preference pairs (SD1.5 or SDXL).

    accelerate launch train_psa.py --config configs/sd15.yaml \
        --pretrained_model stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --train_data sage/metadata.jsonl --embeds_folder embeds/ --output_dir runs/psa_sd15

Every option can be set in the YAML file given with --config; flags override it. Rerun with
--resume_from_checkpoint latest to continue an interrupted run; a fresh run into a folder holding
an earlier one is refused unless --overwrite_output_dir. Multi-GPU and multi-node come from
`accelerate config` / `accelerate launch` (DDP; DeepSpeed and FSDP are refused, as their
checkpoints are pickles), or from the launchers (bash launchers/train_psa_sdxl.sh), which check the
GPUs and the inputs before starting any process.

Exit status: 0 done; 2 refused inputs (file:line: field: reason lines, before any model is loaded),
a checkpoint that cannot be resumed, or a loss or weights that stopped being finite (the message
names the last good checkpoint); 130 Ctrl-C (one line says how to resume).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from psalign.cli.common import EXIT_INTERRUPTED, EXIT_REFUSED, HelpFormatter
from psalign.io import InputError
from psalign.training import add_training_arguments, checkpoints, config_from_args
from psalign.training.config import TrainingConfig
from psalign.training.trainer import NonFiniteLossError, train


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


def build_parser() -> argparse.ArgumentParser:
    """The ``train_psa.py`` parser: ``--config`` and one flag per :class:`TrainingConfig` field."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--config", help="YAML file of training arguments (e.g. configs/sd15.yaml)")
    return add_training_arguments(parser)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 2 refused inputs or a stopped run (one message), 130 interrupted."""
    return run_training(lambda: config_from_args(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
