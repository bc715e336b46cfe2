r"""Train a PSA user adapter with Diffusion-DPO on Sage preference pairs (SD1.5 or SDXL).

    accelerate launch train_psa.py --config configs/sd15.yaml \
        --pretrained_model stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --train_data sage/metadata.jsonl --embeds_folder embeds/ --output_dir runs/psa_sd15

Every option can be set in the YAML file given with --config; flags override it. Rerun with
--resume_from_checkpoint latest to continue an interrupted run. Multi-GPU, multi-node, DeepSpeed
and FSDP come from `accelerate config` / `accelerate launch`.
"""

import argparse
import sys

from psalign.io import InputError
from psalign.training import add_training_arguments, config_from_args, train


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file of training arguments (e.g. configs/sd15.yaml)")
    return add_training_arguments(parser).parse_args(argv)


def main(argv=None) -> None:
    try:
        train(config_from_args(parse_args(argv)))
    except InputError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
