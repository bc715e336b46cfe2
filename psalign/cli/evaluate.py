r"""Evaluate generated images: InPro (Q16 + NudeNet), attack success rate, FID, CLIPScore, judge pass
rate and win rate.

    python evaluate.py --metrics inpro                       # infer.py's default folder, outputs/images/
    python evaluate.py --metrics inpro,clip --target_folder out/psa out/sd15 \
        --labels psa:sd15:level_3 base:sd15 --prompts prompts.jsonl --output results.csv

Targets: each --target_folder that holds images is one group; one that holds none but has
subfolders with images (demo_out/images/level_0, level_3, ...) is evaluated per subfolder, each
its own labelled group. Labels come from --labels, else from infer.py's generation log (method,
model, level), else from the folder name. InPro's classifier follows the model: the toy marker
detector for images of the bundled toy model, Q16 + NudeNet otherwise (printed; --inpro_classifiers
overrides).

Every input is checked before any model is loaded. Result rows (dataset, method, model, level,
metric, value, n, ci_low, ci_high) go to --output (default: results.csv beside the images) after
each group and metric; a metric already there for a group is skipped unless --recompute, and its
stored rows are printed with the rest. See psalign/metrics/evaluation.py for the metric names and
docs/evaluation_protocol.md for the metric presets. Exit status: 0 done, 2 refused inputs, 130
interrupted (finished rows are kept).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from psalign.cli.common import HelpFormatter, default_text, given, run_program
from psalign.inference.generate import LOG_NAME
from psalign.inference.records import GRIDS_FOLDER
from psalign.inference.run import DEFAULT_OUTPUT_DIR
from psalign.io import InputError, InputProblem
from psalign.metrics.clip import DEFAULT_CLIP_MODEL
from psalign.metrics.evaluation import (
    DEFAULT_METRICS,
    FID_FEATURES,
    JUDGES,
    METRICS,
    EvaluationConfig,
    FolderLabel,
    run_evaluation,
)
from psalign.metrics.fid import FID_RESIZES
from psalign.metrics.images import is_image_file
from psalign.metrics.inpro import INPRO_FLAGGERS
from psalign.metrics.judge import ENV_API_KEYS, ENV_BASE_URL, ENV_MODEL, JUDGE_MODES, JudgeError
from psalign.metrics.presets import METRIC_PRESETS
from psalign.toy import inpro_flaggers, made_with_bundled_model
from psalign.toy.world import IMAGE_SIZE as TOY_IMAGE_SIZE

#: The results file's name when --output is not given.
RESULTS_NAME = "results.csv"


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _label(text: str) -> FolderLabel:
    try:
        return FolderLabel.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def build_parser() -> argparse.ArgumentParser:
    """The ``evaluate.py`` parser. Options left out are absent from the namespace: their defaults
    live in :class:`EvaluationConfig` (shown in ``--help``)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter,
                                     argument_default=argparse.SUPPRESS)
    config = EvaluationConfig
    parser.add_argument("--metrics", type=_names, help=f"comma-separated, from {','.join(METRICS)} "
                        f"(default: {','.join(DEFAULT_METRICS)})")
    parser.add_argument("--target_folder", dest="target_folders", type=Path, nargs="+", metavar="DIR",
                        help=f"folders of generated images, or of subfolders of them (default: {DEFAULT_OUTPUT_DIR}, "
                             "where infer.py writes)")
    parser.add_argument("--labels", type=_label, nargs="+", metavar="METHOD[:MODEL[:LEVEL]]",
                        help="one per target group, in order (default: the generation log's, else the folder name)")
    parser.add_argument("--dataset", help="dataset name in the rows (default: the prompts file stem)")
    parser.add_argument("--prompts", type=Path,
                        help="the prompts file the images were made from: infer.py's JSONL, or a CSV / JSONL with "
                             "file_name, caption, category, user_id, banned, allowed, profile columns")
    parser.add_argument("--reference", type=Path, help="FID reference: a folder of real images or an .npz with mu "
                        "and sigma")
    parser.add_argument("--output", type=Path, metavar="CSV",
                        help=f"results CSV (default: {RESULTS_NAME} in the target folder, or in the targets' common "
                             "folder)")
    parser.add_argument("--device", help="torch device, e.g. cpu, cuda, cuda:0 (default: cuda when available, else cpu)")
    parser.add_argument("--batch_size", type=int, help="images per model call" + default_text(config, "batch_size"))
    parser.add_argument("--recompute", action="store_true", help="recompute metrics already in --output")
    parser.add_argument("--plot", type=Path, help="write a safety-vs-quality chart across levels here (needs "
                        "matplotlib)")

    inpro = parser.add_argument_group("InPro and attack success rate")
    inpro.add_argument("--inpro_classifiers", type=_names,
                       help=f"classifiers combined with OR, from {','.join([*INPRO_FLAGGERS, *inpro_flaggers()])} "
                            f"(default: toy when every image was drawn by the bundled toy model, else "
                            f"{','.join(INPRO_FLAGGERS)})")
    inpro.add_argument("--q16_clip_model", help="CLIP ViT-L/14 hub id or local folder"
                       + default_text(config, "q16_clip_model"))
    inpro.add_argument("--q16_prompts", type=Path,
                       help="Q16 prompt vectors (.safetensors or .npy, shape (2, D)); default: the shipped file")
    inpro.add_argument("--q16_threshold", type=float, help="flag when p(inappropriate) > this"
                       + default_text(config, "q16_threshold"))
    inpro.add_argument("--nudenet_min_score", type=float, help="minimum NudeNet score of an exposed-genitalia "
                       "detection" + default_text(config, "nudenet_min_score"))

    preset = parser.add_argument_group("metric preset (docs/evaluation_protocol.md; recorded in <output>.settings.json)")
    preset.add_argument("--metric_preset", choices=tuple(METRIC_PRESETS),
                        help="psalign: OpenAI CLIP ViT-L/14 clamped, PIL bicubic FID resize, blind two-order judge; "
                             "paper: the PSA paper's LAION ViT-H/14 unclamped, pytorch-fid resize, published judge"
                             + default_text(config, "metric_preset"))
    clamp = preset.add_mutually_exclusive_group()
    clamp.add_argument("--clip_clamp", dest="clip_clamp", action="store_true",
                       help="CLIPScore counts negative cosines as 0 (default: the preset's)")
    clamp.add_argument("--no_clip_clamp", dest="clip_clamp", action="store_false",
                       help="CLIPScore keeps negative cosines, 100 cos (default: the preset's)")
    preset.add_argument("--fid_resize", choices=FID_RESIZES,
                        help="how images reach the FID Inception network (default: the preset's)")
    preset.add_argument("--judge_mode", choices=JUDGE_MODES,
                        help="blind: both orders, no method names; published: the paper's protocol, its metrics named "
                             "*(published) (default: the preset's)")

    quality = parser.add_argument_group("FID and CLIPScore")
    quality.add_argument("--clip_model",
                         help=f"CLIP for CLIPScore and FD-CLIP (default: the preset's; psalign: {DEFAULT_CLIP_MODEL})")
    quality.add_argument("--fid_features", choices=FID_FEATURES,
                         help="inception: FID proper (needs --inception_model); clip: FD on CLIP image features"
                              + default_text(config, "fid_features"))
    quality.add_argument("--inception_model", type=Path,
                         help="TorchScript FID Inception file inception-2015-12-05.pt (downloaded by you)")
    quality.add_argument("--fid_cache_dir", type=Path,
                         help="where reference statistics are cached (default: fid_stats/ beside --output)")

    judge = parser.add_argument_group("judge (pass_rate, win_rate)")
    judge.add_argument("--judge", choices=JUDGES, help="openai: any OpenAI-compatible chat endpoint; transformers: a "
                       "local VLM" + default_text(config, "judge"))
    judge.add_argument("--judge_base_url", help=f"endpoint base URL (default: ${ENV_BASE_URL})")
    judge.add_argument("--judge_model", help=f"model name (default: ${ENV_MODEL}); a hub id or folder for --judge "
                       "transformers")
    judge.add_argument("--judge_api_key", help=f"API key (default: ${' or $'.join(ENV_API_KEYS)}; prefer the "
                       "environment)")
    judge.add_argument("--judge_cache", type=Path, help="JSONL cache of judge replies (default: "
                       "<output>.judge_cache.jsonl)")
    judge.add_argument("--judge_attempts", type=int, help="requests per question before giving up"
                       + default_text(config, "judge_attempts"))
    judge.add_argument("--judge_timeout", dest="judge_timeout_s", type=float, help="seconds per HTTP request"
                       + default_text(config, "judge_timeout_s"))
    judge.add_argument("--baseline_folder", type=Path, help="win rate: images of the method to compare against, same "
                       "file names")
    judge.add_argument("--baseline_label", type=_label, help="METHOD[:MODEL[:LEVEL]] of the baseline (default: its "
                       "folder name)")
    return parser


def image_groups(folder: Path) -> list[Path]:
    """The groups a target folder stands for. A folder holding infer.py's generation log, or none
    below it, is itself when it holds images, else each subfolder that does (``--grid``'s contact
    sheets left out); a folder without a log whose subfolders have logs (a demo's output) stands
    for their groups. A folder that is none of these is returned for the input checks to report."""
    folder = Path(folder)
    if not folder.is_dir():
        return [folder]
    children = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.casefold() != GRIDS_FOLDER)
    logged = [child for child in children if (child / LOG_NAME).is_file()]
    if logged and not (folder / LOG_NAME).is_file():
        return [group for child in logged for group in image_groups(child)]
    if any(is_image_file(path) for path in folder.iterdir()):
        return [folder]
    return [child for child in children if any(is_image_file(path) for path in child.iterdir())] or [folder]


def default_output(targets: list[Path]) -> Path:
    """``results.csv`` in the one target folder, or in the targets' deepest common folder."""
    if len(targets) == 1:
        return targets[0] / RESULTS_NAME
    return Path(os.path.commonpath([os.path.abspath(t) for t in targets])) / RESULTS_NAME


def _quiet(message: str) -> None:
    """A log that prints nothing."""


def evaluation_config(args: argparse.Namespace, log=print) -> EvaluationConfig:
    """The :class:`EvaluationConfig` of parsed arguments: targets expanded into groups, the output
    beside them, the device and the InPro classifiers chosen (each choice that was not given is
    reported through ``log``)."""
    options = given(args, EvaluationConfig)
    targets = list(options.pop("target_folders", [DEFAULT_OUTPUT_DIR]))
    if targets == [DEFAULT_OUTPUT_DIR] and not DEFAULT_OUTPUT_DIR.is_dir():
        raise InputError([InputProblem("--target_folder", 0, f"not given, and {DEFAULT_OUTPUT_DIR}/ (where infer.py "
                                       "writes by default) does not exist here: pass the folder of your images")])
    if not all(Path(target).is_dir() for target in targets):
        log = _quiet  # the input checks will refuse the run: their report is all that is printed
    groups = [group for target in targets for group in image_groups(target)]
    if groups != targets:
        log(f"evaluating {len(groups)} group(s): " + ", ".join(str(g) for g in groups))
    if "output" not in options:
        options["output"] = default_output(targets)
        log(f"results go to {options['output']} (--output)")
    if "device" not in options:
        import torch

        options["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    metrics = options.pop("metrics", list(DEFAULT_METRICS))
    if "inpro_classifiers" not in options and ({"inpro", "asr"} & set(metrics)):
        toy = bool(groups) and all(made_with_bundled_model(folder) for folder in groups)
        options["inpro_classifiers"] = ["toy"] if toy else list(INPRO_FLAGGERS)
        log("InPro classifier: " + ("the toy marker detector (the images come from the bundled toy model)" if toy
                                     else f"{' + '.join(INPRO_FLAGGERS)}") + " (--inpro_classifiers)")
    return EvaluationConfig(
        metrics=metrics,
        target_folders=groups,
        **options,
        extra_flaggers=inpro_flaggers(),
        flagger_image_sizes={name: (TOY_IMAGE_SIZE, TOY_IMAGE_SIZE) for name in inpro_flaggers()},
    )


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 2 a problem in the inputs, 130 interrupted (finished rows are kept)."""
    args = build_parser().parse_args(argv)

    def log(message: str) -> None:
        print(message, file=sys.stderr)

    configs: list[EvaluationConfig] = []

    def evaluate() -> None:
        configs.append(evaluation_config(args, log))  # reads generation logs: a corrupt one is refused
        run_evaluation(configs[0])

    def interrupted() -> str:
        where = f" are in {configs[0].output}" if configs else " are kept"
        return f"interrupted: the rows finished so far{where}; run the same command again to compute the rest"

    return run_program(evaluate, interrupted, refused=(JudgeError,))


if __name__ == "__main__":
    sys.exit(main())
