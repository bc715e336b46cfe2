r"""Merge per-category SafetyDPO experts (diffusers LoRAs) into one LoRA, or fuse them into the UNet.

    python -m psalign.safetydpo.merge_experts --experts runs/expert_hate runs/expert_violence \
        --categories Hate Violence --pretrained_model stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --method co_merge --rank 8 --output runs/safetydpo_merged

Co-Merge needs calibration prompts for each expert's category: from ``--calibration_prompts``
(a text file of ``<category><TAB><prompt>`` lines) or else the captions of the expert's own
``expert_pairs.jsonl`` (written by ``train_safetydpo.py``). Each expert's prompts are denoised with
that expert loaded, recording the mean |input| of every adapted layer. ``--calibration_scope all``
calibrates every expert on all experts' prompts instead of its own category's;
``--calibration_half conditional`` records only the conditional half of the classifier-free
guidance batch (by default the empty prompt's half counts too).

The merged LoRA (truncated SVD) goes to ``<output>/pytorch_lora_weights.safetensors`` and the
relative truncation error per module to ``<output>/merge_report.json``. Without ``--rank`` the rank
is the smallest that keeps every module's error within ``--max_truncation_error``;
a given ``--rank`` above that error is reported with a warning. With ``--fuse`` the output is
instead a whole pipeline with the merged update added to its UNet weights (no truncation).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from psalign.categories import canonical_category
from psalign.cli.common import HelpFormatter, default_text, given, run_program
from psalign.formats import LORA_WEIGHTS_NAME, MERGE_REPORT_NAME
from psalign.io import InputError, InputProblem, atomic_write

from .data import EXPERT_PAIRS_NAME, read_expert_pairs
from .lora import read_lora_deltas, save_lora_factors
from .merge import (
    MAX_TRUNCATION_ERROR,
    average_merge,
    co_merge,
    fuse_into_unet,
    record_input_activations,
    refactor_to_lora,
    ties_merge,
    truncation_rank,
)

METHODS = ("co_merge", "average", "ties")
#: Whose prompts calibrate each expert: its own category's (the default) or all experts'.
CALIBRATION_SCOPES = ("own", "all")
#: Which half of the classifier-free guidance batch is recorded: both (the default) or the conditional one.
CALIBRATION_HALVES = ("both", "conditional")
#: Guidance scale of the calibration denoising (> 1, so the batch has both halves).
CALIBRATION_GUIDANCE_SCALE = 7.5


@dataclass
class MergeJob:
    """Checked inputs: expert folders, their canonical categories and (Co-Merge) calibration prompts."""

    experts: list[Path]
    categories: list[str]
    prompts: list[list[str]]


def read_calibration_prompts(path: str | Path) -> dict[str, list[str]]:
    """``category -> prompts`` from ``<category><TAB><prompt>`` lines (blank lines and ``#`` comments skipped)."""
    path = Path(path)
    prompts: dict[str, list[str]] = {}
    problems = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        category, tab, prompt = line.partition("\t")
        if not tab or not prompt.strip():
            problems.append(InputProblem(str(path), line_no, "expected <category><TAB><prompt>"))
            continue
        try:
            prompts.setdefault(canonical_category(category, allow_extra=True), []).append(prompt.strip())
        except ValueError as err:
            problems.append(InputProblem(str(path), line_no, str(err), "category"))
    if problems:
        raise InputError(problems, header=f"{len(problems)} problem(s) in {path}")
    return prompts


def check_merge_inputs(
    experts: Sequence[str | Path], categories: Sequence[str], method: str,
    calibration_prompts: str | Path | None = None, calibration_count: int = 8, calibration_scope: str = "own",
) -> MergeJob:
    """Every problem with the experts, categories and calibration prompts, before any model is loaded.
    With ``calibration_scope="all"`` every expert's prompts are all experts' prompts (each expert's
    first ``calibration_count``, in expert order, repeats dropped)."""
    problems: list[InputProblem] = []
    if calibration_scope not in CALIBRATION_SCOPES:
        problems.append(InputProblem("--calibration_scope", 0, f"{calibration_scope!r} is not one of "
                                     f"{', '.join(CALIBRATION_SCOPES)}"))
    if len(experts) != len(categories):
        problems.append(InputProblem("--categories", 0, f"{len(categories)} categories for {len(experts)} experts"))
    names = []
    for category in categories:
        try:
            names.append(canonical_category(category, allow_extra=True))
        except ValueError as err:
            problems.append(InputProblem("--categories", 0, str(err)))
    for expert in experts:
        if not (Path(expert) / LORA_WEIGHTS_NAME).is_file():
            problems.append(InputProblem(str(expert), 0, f"no {LORA_WEIGHTS_NAME} (not a trained expert folder)"))
    if problems:
        raise InputError(problems, header=f"{len(problems)} problem(s) with the merge inputs")
    prompts: list[list[str]] = [[] for _ in experts]
    if method == "co_merge":
        table = read_calibration_prompts(calibration_prompts) if calibration_prompts else None
        for k, (expert, category) in enumerate(zip(experts, names)):
            if table is not None:
                prompts[k] = table.get(category, [])[:calibration_count]
                where = str(calibration_prompts)
            elif (Path(expert) / EXPERT_PAIRS_NAME).is_file():
                captions = [p.caption for p in read_expert_pairs(Path(expert) / EXPERT_PAIRS_NAME)]
                prompts[k] = list(dict.fromkeys(captions))[:calibration_count]
                where = str(Path(expert) / EXPERT_PAIRS_NAME)
            else:
                where = str(expert)
            if not prompts[k]:
                problems.append(InputProblem(where, 0, f"no calibration prompts for {category} (--calibration_prompts)"))
    if problems:
        raise InputError(problems, header=f"{len(problems)} problem(s) with the merge inputs")
    if method == "co_merge" and calibration_scope == "all":
        everyone = list(dict.fromkeys(prompt for own in prompts for prompt in own))
        prompts = [list(everyone) for _ in experts]
    return MergeJob([Path(e) for e in experts], names, prompts)


def calibration_activations(pipe, job: MergeJob, module_names: Sequence[str], steps: int, resolution: int,
                            seed: int = 0, conditional_only: bool = False) -> list[dict[str, torch.Tensor]]:
    """Per expert: mean |input| (in,) of each module while its prompts are denoised with it loaded
    (classifier-free guidance on; ``conditional_only``: its conditional half only)."""
    from tqdm.auto import tqdm

    activations = []
    for expert, prompts in zip(tqdm(job.experts, desc="calibration", unit="expert"), job.prompts):
        pipe.load_lora_weights(str(expert), adapter_name="calibration")

        def run(prompts=prompts):
            pipe(prompts, num_inference_steps=steps, height=resolution, width=resolution, output_type="latent",
                 guidance_scale=CALIBRATION_GUIDANCE_SCALE, generator=torch.Generator().manual_seed(seed))

        try:
            activations.append(record_input_activations(pipe.unet, module_names, run, conditional_only))
        finally:
            pipe.unload_lora_weights()
    return activations


def merge_experts(
    job: MergeJob, pretrained_model: str, method: str, output: str | Path, rank: int | None = None,
    fuse: bool = False, density: float = 0.2, steps: int = 10, resolution: int = 512, device: str = "cpu",
    calibration_half: str = "both", max_truncation_error: float = MAX_TRUNCATION_ERROR,
) -> dict:
    """Merge ``job``'s experts with ``method``; write a LoRA of ``rank`` (None: the smallest within
    ``max_truncation_error``) or, with ``fuse``, a pipeline to ``output``; return the report (also
    written as ``merge_report.json``)."""
    if calibration_half not in CALIBRATION_HALVES:
        raise ValueError(f"calibration_half must be one of {CALIBRATION_HALVES}, got {calibration_half!r}")
    from psalign.inference.pipeline import load_pipeline

    experts = [read_lora_deltas(e) for e in job.experts]
    if method == "co_merge":
        pipe = load_pipeline(pretrained_model, device=device)
        pipe.set_progress_bar_config(disable=True)
        activations = calibration_activations(pipe, job, sorted(experts[0]), steps, resolution,
                                              conditional_only=calibration_half == "conditional")
        merged = co_merge(experts, activations)
    elif method == "average":
        merged = average_merge(experts)
    else:
        merged = ties_merge(experts, density=density)
    report = {"method": method, "experts": [str(e) for e in job.experts], "categories": job.categories,
              "calibration_prompts": job.prompts if method == "co_merge" else None,
              "calibration_half": calibration_half if method == "co_merge" else None}
    output = Path(output)
    if fuse:
        pipe = load_pipeline(pretrained_model, device="cpu")
        fuse_into_unet(pipe.unet, merged)
        pipe.save_pretrained(output)
        report.update(fused=True, rank=None, max_truncation_error=max_truncation_error, mean_relative_error=0.0,
                      max_relative_error=0.0, within_max_truncation_error=True)  # fused: nothing truncated
    else:
        chosen = "given" if rank is not None else "smallest within max_truncation_error"
        rank = rank if rank is not None else truncation_rank(merged, max_truncation_error)
        factors, errors = refactor_to_lora(merged, rank)
        save_lora_factors(output, factors, rank)
        worst = max(errors.values())
        report.update(fused=False, rank=rank, rank_chosen=chosen, max_truncation_error=max_truncation_error,
                      relative_error=errors, mean_relative_error=sum(errors.values()) / len(errors),
                      max_relative_error=worst, within_max_truncation_error=worst <= max_truncation_error)
    with atomic_write(output / MERGE_REPORT_NAME) as handle:
        json.dump(report, handle, indent=2)
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; options left out are absent (their defaults are those of
    :func:`check_merge_inputs` and :func:`merge_experts`, shown in ``--help``)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter,
                                     argument_default=argparse.SUPPRESS)
    check, merge = check_merge_inputs, merge_experts
    parser.add_argument("--experts", nargs="+", required=True, metavar="DIR", help="expert folders (diffusers LoRAs)")
    parser.add_argument("--categories", nargs="+", required=True, metavar="CATEGORY",
                        help="each expert's category, in the order of --experts")
    parser.add_argument("--pretrained_model", required=True, help="the pipeline the experts were trained on")
    parser.add_argument("--method", choices=METHODS, default=METHODS[0], help="merge rule")
    parser.add_argument("--rank", type=int,
                        help="rank of the merged LoRA (truncated SVD; default: the smallest within "
                             "--max_truncation_error)")
    parser.add_argument("--max_truncation_error", type=float,
                        help="largest relative Frobenius error ||dW - BA|| / ||dW|| of any module that the default "
                             "rank allows, and above which a given --rank is warned about"
                             + default_text(merge, "max_truncation_error"))
    parser.add_argument("--output_dir", "--output", dest="output", required=True, help="output folder")
    parser.add_argument("--fuse", action="store_true", help="write a whole pipeline with the merge fused into its UNet")
    parser.add_argument("--calibration_prompts", help="text file of <category><TAB><prompt> lines (co_merge)")
    parser.add_argument("--calibration_count", type=int,
                        help="prompts per expert" + default_text(check, "calibration_count"))
    parser.add_argument("--calibration_scope", choices=CALIBRATION_SCOPES,
                        help="own: each expert on its category's prompts; all: every expert on all experts' prompts"
                             + default_text(check, "calibration_scope"))
    parser.add_argument("--calibration_half", choices=CALIBRATION_HALVES,
                        help="both: record the whole classifier-free guidance batch, the empty prompt's half included; "
                             "conditional: its conditional half only" + default_text(merge, "calibration_half"))
    parser.add_argument("--calibration_steps", dest="steps", type=int,
                        help="denoising steps per prompt" + default_text(merge, "steps"))
    parser.add_argument("--resolution", type=int, help="calibration image size in px" + default_text(merge, "resolution"))
    parser.add_argument("--density", type=float, help="TIES: fraction of entries kept" + default_text(merge, "density"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda when available, else cpu)")
    args = parser.parse_args(argv)
    if vars(args).get("rank", 1) < 1:
        parser.error("--rank must be >= 1")
    if not 0 <= vars(args).get("max_truncation_error", 0) < 1:
        parser.error("--max_truncation_error must be in [0, 1)")
    return args


def run_merge(args: argparse.Namespace) -> None:
    """Check every input (the experts, the calibration prompts, the base model), then merge."""
    from psalign.inference.pipeline import model_problems

    problems = model_problems(args.pretrained_model)
    try:
        job = check_merge_inputs(**given(args, check_merge_inputs))
    except InputError as err:
        problems = err.problems + problems
    if problems:
        raise InputError(problems, header=f"{len(problems)} problem(s) with the merge inputs")
    report = merge_experts(job, **given(args, merge_experts))
    if not report["fused"]:
        print(f"rank-{report['rank']} SVD relative error: mean {report['mean_relative_error']:.4f}, "
              f"max {report['max_relative_error']:.4f} (per module in {Path(args.output) / MERGE_REPORT_NAME})")
        if not report["within_max_truncation_error"]:
            print(f"warning: the rank-{report['rank']} LoRA loses more than {report['max_truncation_error']} of some "
                  "module's merged update; leave out --rank, raise it, or use --fuse", file=sys.stderr)
    print(f"merged {len(job.experts)} experts ({args.method}) into {args.output}")


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 2 refused inputs (nothing is loaded or written then)."""
    args = parse_args(argv)
    return run_program(lambda: run_merge(args))


if __name__ == "__main__":
    sys.exit(main())
