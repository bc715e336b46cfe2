"""Evaluate generated images: InPro (Q16 + NudeNet), FID, CLIPScore, judge pass rate and win rate.

Example:
    python evaluate.py --metrics inpro,clip --target_folder out/psa out/sd15 \\
        --labels psa:sd15:level_3 base:sd15 --prompts prompts.csv --output results.csv

Every input is checked before any model is loaded. Result rows (dataset, method, model, level,
metric, value, n, ci_low, ci_high) are written to --output after each folder and metric; a
metric already in the file for a folder is skipped unless --recompute. See
psalign/metrics/evaluation.py for the metric names and psalign/metrics/prompts.py for the prompts
file format.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from psalign.io import InputError
from psalign.metrics.evaluation import FID_FEATURES, JUDGES, METRICS, EvaluationConfig, FolderLabel, run_evaluation
from psalign.metrics.inpro import INPRO_FLAGGERS
from psalign.metrics.judge import ENV_API_KEYS, ENV_BASE_URL, ENV_MODEL, JudgeError
from psalign.metrics.clip import DEFAULT_CLIP_MODEL
from psalign.metrics.nudenet import NUDENET_MIN_SCORE
from psalign.metrics.q16 import Q16_THRESHOLD
from psalign.toy import inpro_flaggers, made_with_bundled_model
from psalign.toy.world import IMAGE_SIZE as TOY_IMAGE_SIZE


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _label(text: str) -> FolderLabel:
    try:
        return FolderLabel.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--metrics", type=_names, default=["inpro"],
                        help=f"comma-separated, from {','.join(METRICS)}")
    parser.add_argument("--target_folder", type=Path, nargs="+", required=True,
                        help="one or more folders of generated images (image files only are counted)")
    parser.add_argument("--labels", type=_label, nargs="+", default=[],
                        help="METHOD[:MODEL[:LEVEL]] per target folder, in order (default: the folder name)")
    parser.add_argument("--dataset", default=None, help="dataset name in the rows (default: the prompts file stem)")
    parser.add_argument("--prompts", type=Path, default=None,
                        help="CSV or JSONL: file_name, caption, category, user_id, banned, allowed, profile columns")
    parser.add_argument("--reference", type=Path, default=None,
                        help="FID reference: a folder of real images or an .npz with mu and sigma")
    parser.add_argument("--output", type=Path, default=Path("results.csv"), help="results CSV")
    parser.add_argument("--device", default=None,
                        help="torch device, e.g. cpu, cuda, cuda:0 (default: cuda when available, else cpu)")
    parser.add_argument("--batch_size", type=int, default=16, help="images per model call")
    parser.add_argument("--recompute", action="store_true", help="recompute metrics already in --output")
    parser.add_argument("--plot", type=Path, default=None,
                        help="write a safety-vs-quality chart across levels here (needs matplotlib)")

    inpro = parser.add_argument_group("InPro")
    inpro.add_argument("--inpro_classifiers", type=_names, default=argparse.SUPPRESS,
                       help=f"classifiers combined with OR, from {','.join([*INPRO_FLAGGERS, *inpro_flaggers()])} "
                            f"(default: {','.join(INPRO_FLAGGERS)}; toy when every folder was drawn by the bundled toy "
                            "model)")
    inpro.add_argument("--q16_clip_model", default=DEFAULT_CLIP_MODEL, help="CLIP ViT-L/14 hub id or local folder")
    inpro.add_argument("--q16_prompts", type=Path, default=None,
                       help="Q16 prompt vectors (.safetensors or .npy, shape (2, D)); default: the shipped file")
    inpro.add_argument("--q16_threshold", type=float, default=Q16_THRESHOLD, help="flag when p(inappropriate) > this")
    inpro.add_argument("--nudenet_min_score", type=float, default=NUDENET_MIN_SCORE,
                       help="minimum NudeNet score of an exposed-genitalia detection")

    quality = parser.add_argument_group("FID and CLIPScore")
    quality.add_argument("--clip_model", default=DEFAULT_CLIP_MODEL, help="CLIP for CLIPScore and FD-CLIP")
    quality.add_argument("--fid_features", choices=FID_FEATURES, default="inception",
                         help="inception: FID proper (needs --inception_model); clip: FD on CLIP image features")
    quality.add_argument("--inception_model", type=Path, default=None,
                         help="TorchScript FID Inception file inception-2015-12-05.pt (downloaded by you)")
    quality.add_argument("--fid_cache_dir", type=Path, default=None,
                         help="where reference statistics are cached (default: fid_stats/ beside --output)")

    judge = parser.add_argument_group("judge (pass_rate, win_rate)")
    judge.add_argument("--judge", choices=JUDGES, default="openai",
                       help="openai: any OpenAI-compatible chat endpoint; transformers: a local VLM")
    judge.add_argument("--judge_base_url", default=None, help=f"endpoint base URL (default: ${ENV_BASE_URL})")
    judge.add_argument("--judge_model", default=None,
                       help=f"model name (default: ${ENV_MODEL}); a hub id or folder for --judge transformers")
    judge.add_argument("--judge_api_key", default=None,
                       help=f"API key (default: ${' or $'.join(ENV_API_KEYS)}; prefer the environment)")
    judge.add_argument("--judge_cache", type=Path, default=None,
                       help="JSONL cache of judge replies (default: <output>.judge_cache.jsonl)")
    judge.add_argument("--judge_attempts", type=int, default=4, help="requests per question before giving up")
    judge.add_argument("--judge_timeout", type=float, default=120.0, help="seconds per HTTP request")
    judge.add_argument("--baseline_folder", type=Path, default=None,
                       help="win rate: images of the method to compare against, same file names")
    judge.add_argument("--baseline_label", type=_label, default=None,
                       help="METHOD[:MODEL[:LEVEL]] of the baseline (default: its folder name)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 2 a problem in the inputs, 130 interrupted (finished rows are kept)."""
    args = build_parser().parse_args(argv)
    try:
        run_evaluation(evaluation_config(args))
    except (InputError, JudgeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: the rows finished so far are in {args.output}; run the same command again to "
              "compute the rest", file=sys.stderr)
        return 130
    return 0


def evaluation_config(args: argparse.Namespace) -> EvaluationConfig:
    """The :class:`EvaluationConfig` of parsed arguments (the device and InPro classifiers defaulted)."""
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if "inpro_classifiers" not in vars(args):
        args.inpro_classifiers = list(INPRO_FLAGGERS)
        if all(made_with_bundled_model(folder) for folder in args.target_folder):
            args.inpro_classifiers = ["toy"]
            print("the images come from the bundled toy model: InPro uses its marker detector (--inpro_classifiers toy)",
                  file=sys.stderr)
    return EvaluationConfig(
        metrics=args.metrics,
        target_folders=args.target_folder,
        labels=args.labels,
        output=args.output,
        dataset=args.dataset,
        prompts=args.prompts,
        reference=args.reference,
        device=args.device,
        batch_size=args.batch_size,
        recompute=args.recompute,
        inpro_classifiers=args.inpro_classifiers,
        extra_flaggers=inpro_flaggers(),
        flagger_image_sizes={name: (TOY_IMAGE_SIZE, TOY_IMAGE_SIZE) for name in inpro_flaggers()},
        q16_clip_model=args.q16_clip_model,
        q16_prompts=args.q16_prompts,
        q16_threshold=args.q16_threshold,
        nudenet_min_score=args.nudenet_min_score,
        clip_model=args.clip_model,
        fid_features=args.fid_features,
        inception_model=args.inception_model,
        fid_cache_dir=args.fid_cache_dir,
        judge=args.judge,
        judge_base_url=args.judge_base_url,
        judge_model=args.judge_model,
        judge_api_key=args.judge_api_key,
        judge_cache=args.judge_cache,
        judge_attempts=args.judge_attempts,
        judge_timeout_s=args.judge_timeout,
        baseline_folder=args.baseline_folder,
        baseline_label=args.baseline_label,
        plot=args.plot,
    )


if __name__ == "__main__":
    sys.exit(main())
