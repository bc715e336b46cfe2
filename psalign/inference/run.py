"""``infer.py``'s work: validate the prompts, load the pipeline and adapter, generate this process's share."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from psalign.embeddings import find_user_embedding
from psalign.io import InputError, InputProblem

from .generate import GenerationSettings, generate_images, merge_generation_logs, shard, user_embeddings, write_grids
from .records import PromptRecord, read_prompt_records


@dataclass
class InferenceConfig:
    meta_data: Path
    save_path: Path
    sd_model: str
    psa_path: Path | None = None
    load_psa: bool = False
    sdxl: bool = False
    embeds_folder: Path | None = None
    llm_model: str | None = None
    user_encoder: str = "llm"
    batch_size: int = 1
    device: str | None = None
    dtype: str | None = None
    overwrite: bool = False
    skip_invalid: bool = False
    grid: str | None = None
    settings: GenerationSettings = field(default_factory=GenerationSettings)


def _adapter_embed_dim(psa_path: Path) -> int | None:
    """D_user of an adapter folder, read from its small JSON config (None for published checkpoints)."""
    config = Path(psa_path) / "psa_config.json"
    return json.loads(config.read_text())["user_embed_dim"] if config.is_file() else None


def validate(config: InferenceConfig) -> tuple[list[PromptRecord], list[InputProblem]]:
    """Every problem with the inputs, found without loading any model."""
    problems: list[InputProblem] = []
    if config.load_psa:
        if config.psa_path is None:
            problems.append(InputProblem("--psa_path", 0, "required with --load_psa"))
        elif not Path(config.psa_path).exists():
            problems.append(InputProblem(str(config.psa_path), 0, "PSA adapter not found"))
    if config.embeds_folder is not None and not Path(config.embeds_folder).is_dir() and not config.llm_model:
        problems.append(InputProblem(str(config.embeds_folder), 0, "embeddings folder not found"))
    can_encode = config.llm_model is not None or config.user_encoder == "sentence"
    records, record_problems = read_prompt_records(
        config.meta_data, config.embeds_folder, need_users=config.load_psa, can_encode=can_encode
    )
    problems += record_problems
    expected_dim = _adapter_embed_dim(config.psa_path) if config.load_psa and config.psa_path else None
    if expected_dim is not None and config.embeds_folder is not None:
        valid = []
        for record in records:
            stored = record.user.user_id and find_user_embedding(config.embeds_folder, record.user.user_id)
            dim = np.load(stored, mmap_mode="r").shape[-1] if stored else expected_dim
            if dim != expected_dim:
                problems.append(InputProblem(
                    str(config.meta_data), record.line,
                    f"embedding {stored} has dimension {dim}; the adapter expects {expected_dim}", "user_data",
                ))
            else:
                valid.append(record)
        records = valid
    return records, problems


def _make_encoder(config: InferenceConfig, device: str):
    from psalign.embeddings import CausalLMUserEncoder, SentenceUserEncoder

    if config.user_encoder == "sentence":
        return SentenceUserEncoder(config.llm_model, device=device)
    return CausalLMUserEncoder(config.llm_model, device=device)


def run_inference(config: InferenceConfig) -> list[str]:
    """Generate every valid record not yet on disk; returns the file names this process wrote."""
    from accelerate import PartialState

    records, problems = validate(config)
    if problems:
        error = InputError(problems, header=f"{len(problems)} problem(s) in the inputs")
        if not config.skip_invalid:
            raise error
        print(f"{error}\n(--skip_invalid: going on with the {len(records)} valid record(s))", file=sys.stderr)
    state = PartialState(cpu=config.device == "cpu")
    device = config.device or str(state.device)
    dtype = getattr(torch, config.dtype) if config.dtype else (torch.float16 if device.startswith("cuda") else torch.float32)
    mine = shard(records, state.process_index, state.num_processes)

    from .pipeline import load_pipeline

    pipe = load_pipeline(config.sd_model, device=device, dtype=dtype, sdxl=config.sdxl or None)
    pipe.set_progress_bar_config(disable=True)
    adapter, embeddings = None, None
    run_info = {"model": str(config.sd_model), "adapter": None}
    if config.load_psa:
        from psalign.adapter import load_adapter

        adapter = load_adapter(config.psa_path, pipe.unet).to(device)
        embeddings = user_embeddings(
            mine,
            config.embeds_folder,
            (lambda: _make_encoder(config, device)),
        )
        run_info["adapter"] = str(config.psa_path)
    part = f"generation_log.rank{state.process_index}.jsonl"
    written = generate_images(
        pipe,
        mine,
        config.save_path,
        config.settings,
        batch_size=config.batch_size,
        adapter=adapter,
        embeddings=embeddings,
        overwrite=config.overwrite,
        run_info=run_info,
        log_name=part,
        progress=state.is_main_process,
    )
    state.wait_for_everyone()
    if state.is_main_process:
        merge_generation_logs(config.save_path, [f"generation_log.rank{i}.jsonl" for i in range(state.num_processes)])
        if config.grid:
            write_grids(config.save_path, records, config.grid)
    return written
