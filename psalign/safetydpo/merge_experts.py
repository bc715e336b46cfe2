r"""Merge per-category SafetyDPO experts (diffusers LoRAs) into one LoRA, or fuse them into the UNet.

    python -m psalign.safetydpo.merge_experts --experts runs/expert_hate runs/expert_violence \
        --categories Hate Violence --pretrained_model stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --method co_merge --rank 8 --output runs/safetydpo_merged

Co-Merge needs calibration prompts for each expert's category: from ``--calibration_prompts``
(a text file of ``<category><TAB><prompt>`` lines) or else the captions of the expert's own
``expert_pairs.jsonl`` (written by ``train_safetydpo.py``). Each expert's prompts are denoised with
that expert loaded, recording the mean |input| of every adapted layer. The merged LoRA (truncated
SVD at ``--rank``) goes to ``<output>/pytorch_lora_weights.safetensors``, the SVD approximation
error per module to ``<output>/merge_report.json``; with ``--fuse`` the output is instead a whole
pipeline with the merged update added to its UNet weights.
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
from psalign.formats import LORA_WEIGHTS_NAME, MERGE_REPORT_NAME
from psalign.io import InputError, InputProblem, atomic_write

from .data import EXPERT_PAIRS_NAME, read_expert_pairs
from .lora import read_lora_deltas, save_lora_factors
from .merge import average_merge, co_merge, fuse_into_unet, record_input_activations, refactor_to_lora, ties_merge

METHODS = ("co_merge", "average", "ties")


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
    calibration_prompts: str | Path | None = None, calibration_count: int = 8,
) -> MergeJob:
    """Every problem with the experts, categories and calibration prompts, before any model is loaded."""
    problems: list[InputProblem] = []
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
    return MergeJob([Path(e) for e in experts], names, prompts)


def calibration_activations(pipe, job: MergeJob, module_names: Sequence[str], steps: int, resolution: int,
                            seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Per expert: mean |input| (in,) of each module while its prompts are denoised with it loaded."""
    from tqdm.auto import tqdm

    activations = []
    for expert, prompts in zip(tqdm(job.experts, desc="calibration", unit="expert"), job.prompts):
        pipe.load_lora_weights(str(expert), adapter_name="calibration")

        def run(prompts=prompts):
            pipe(prompts, num_inference_steps=steps, height=resolution, width=resolution, output_type="latent",
                 generator=torch.Generator().manual_seed(seed))

        try:
            activations.append(record_input_activations(pipe.unet, module_names, run))
        finally:
            pipe.unload_lora_weights()
    return activations


def merge_experts(
    job: MergeJob, pretrained_model: str, method: str, output: str | Path, rank: int | None = None,
    fuse: bool = False, density: float = 0.2, steps: int = 10, resolution: int = 512, device: str = "cpu",
) -> dict:
    """Merge ``job``'s experts with ``method``; write a LoRA of ``rank`` (or, with ``fuse``, a pipeline)
    to ``output``; return the report (also written as ``merge_report.json``)."""
    from psalign.inference.pipeline import load_pipeline

    experts = [read_lora_deltas(e) for e in job.experts]
    if method == "co_merge":
        pipe = load_pipeline(pretrained_model, device=device)
        pipe.set_progress_bar_config(disable=True)
        activations = calibration_activations(pipe, job, sorted(experts[0]), steps, resolution)
        merged = co_merge(experts, activations)
    elif method == "average":
        merged = average_merge(experts)
    else:
        merged = ties_merge(experts, density=density)
    report = {"method": method, "experts": [str(e) for e in job.experts], "categories": job.categories,
              "calibration_prompts": job.prompts if method == "co_merge" else None}
    output = Path(output)
    if fuse:
        pipe = load_pipeline(pretrained_model, device="cpu")
        fuse_into_unet(pipe.unet, merged)
        pipe.save_pretrained(output)
        report["fused"] = True
    else:
        factors, errors = refactor_to_lora(merged, rank)
        save_lora_factors(output, factors, rank)
        report.update(rank=rank, relative_error=errors, mean_relative_error=sum(errors.values()) / len(errors),
                      max_relative_error=max(errors.values()))
    with atomic_write(output / MERGE_REPORT_NAME) as handle:
        json.dump(report, handle, indent=2)
    return report


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", nargs="+", required=True, metavar="DIR", help="expert folders (diffusers LoRAs)")
    parser.add_argument("--categories", nargs="+", required=True, metavar="CATEGORY",
                        help="each expert's category, in the order of --experts")
    parser.add_argument("--pretrained_model", required=True, help="the pipeline the experts were trained on")
    parser.add_argument("--method", choices=METHODS, default="co_merge", help="merge rule (default: co_merge)")
    parser.add_argument("--rank", type=int, help="rank of the merged LoRA (truncated SVD); required without --fuse")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--fuse", action="store_true", help="write a whole pipeline with the merge fused into its UNet")
    parser.add_argument("--calibration_prompts", help="text file of <category><TAB><prompt> lines (co_merge)")
    parser.add_argument("--calibration_count", type=int, default=8, help="prompts per expert (default: 8)")
    parser.add_argument("--calibration_steps", type=int, default=10, help="denoising steps per prompt (default: 10)")
    parser.add_argument("--resolution", type=int, default=512, help="calibration image size in px (default: 512)")
    parser.add_argument("--density", type=float, default=0.2, help="TIES: fraction of entries kept (default: 0.2)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.rank is None and not args.fuse:
        parser.error("--rank is required unless --fuse is given")
    if args.rank is not None and args.rank < 1:
        parser.error("--rank must be >= 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        job = check_merge_inputs(args.experts, args.categories, args.method, args.calibration_prompts,
                                 args.calibration_count)
    except InputError as err:
        sys.exit(f"error: {err}")
    report = merge_experts(job, args.pretrained_model, args.method, args.output, rank=args.rank, fuse=args.fuse,
                           density=args.density, steps=args.calibration_steps, resolution=args.resolution,
                           device=args.device)
    if "max_relative_error" in report:
        print(f"rank-{args.rank} SVD relative error: mean {report['mean_relative_error']:.4f}, "
              f"max {report['max_relative_error']:.4f} (per module in {Path(args.output) / MERGE_REPORT_NAME})")
    print(f"merged {len(job.experts)} experts ({args.method}) into {args.output}")


if __name__ == "__main__":
    main()
