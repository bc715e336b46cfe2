r"""Train one SafetyDPO safety expert: a LoRA on the UNet attention projections, trained with
Diffusion-DPO (the PSA training loop, ``--trainable lora``) to prefer the safe image of each pair.

    accelerate launch train_safetydpo.py --category Violence --coprov2 coprov2/train.csv \
        --pretrained_model stable-diffusion-v1-5/stable-diffusion-v1-5 --output_dir runs/expert_violence

The category's pairs are written to <output_dir>/expert_pairs.jsonl, then trained on; the expert is
<output_dir>/pytorch_lora_weights.safetensors (load it with pipe.load_lora_weights). Every
train_psa.py option applies (--config, --lora_rank, --resume_from_checkpoint latest, ...).
Merge experts with python -m psalign.safetydpo.merge_experts.
"""

from __future__ import annotations

import argparse
import sys

from psalign.cli.common import EXIT_REFUSED, HelpFormatter
from psalign.cli.train_psa import run_training
from psalign.safetydpo.data import write_expert_data
from psalign.training import add_training_arguments, config_from_args


def build_parser() -> argparse.ArgumentParser:
    """The ``train_safetydpo.py`` parser: the expert's data sources, then every training option."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--config", help="YAML file of training arguments")
    parser.add_argument("--category", required=True, help="the expert's category (any known spelling)")
    parser.add_argument("--coprov2", help="CoProV2-format CSV (prompt, image, category)")
    parser.add_argument("--image_root", help="folder the CSV's image paths are relative to (default: the CSV's)")
    parser.add_argument("--sage", help="Sage metadata.jsonl (the safe image is always chosen)")
    return add_training_arguments(parser)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if "train_data" in vars(args) or "trainable" in vars(args):
        parser.error("--train_data and --trainable are set by this script (use --coprov2 / --sage)")
    if "output_dir" not in vars(args):
        parser.error("--output_dir is required")
    return args


def main(argv: list[str] | None = None) -> int:
    """Exit status as ``train_psa.py``'s: 0 done, 2 refused inputs or a stopped run, 130 interrupted."""
    args = parse_args(argv)
    try:  # ValueError (InputError included): an unknown category, no data source, bad data
        args.train_data = str(write_expert_data(args.output_dir, args.category, args.coprov2, args.image_root, args.sage))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_REFUSED
    except OSError as err:  # e.g. --output_dir is a file
        print(f"error: cannot write the expert pairs into {args.output_dir}: {err.strerror or err}", file=sys.stderr)
        return EXIT_REFUSED
    args.trainable = "lora"
    return run_training(lambda: config_from_args(args))


if __name__ == "__main__":
    sys.exit(main())
