r"""Train a PSA user adapter with Diffusion-DPO on Sage preference pairs (SD1.5 or SDXL).

    accelerate launch train_psa.py --config configs/sd15.yaml \
        --pretrained_model stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --train_data sage/metadata.jsonl --embeds_folder embeds/ --output_dir runs/psa_sd15

Every option can be set in the YAML file given with --config; flags override it. Rerun with
--resume_from_checkpoint latest to continue an interrupted run; a fresh run into a folder holding
an earlier one is refused unless --overwrite_output_dir. Multi-GPU and multi-node come from
`accelerate config` / `accelerate launch` (DDP; DeepSpeed and FSDP are refused, as their
checkpoints are pickles). Exit status: 0 done, 2 refused inputs or a stopped run, 130 Ctrl-C.
"""

import argparse
import sys

from psalign.training import add_training_arguments, config_from_args
from psalign.training.cli import run_training


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file of training arguments (e.g. configs/sd15.yaml)")
    return add_training_arguments(parser).parse_args(argv)


def main(argv=None) -> int:
    """Exit status: 0 done, 2 refused inputs or a stopped run (one message), 130 interrupted."""
    return run_training(lambda: config_from_args(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
