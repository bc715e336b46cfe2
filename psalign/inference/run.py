"""``infer.py``'s work: validate the prompts, load the pipeline and adapter, generate this process's share."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from psalign.embeddings import EMBEDDING_INFO_FILE, find_user_embedding, read_embedding_info
from psalign.formats import PSA_CONFIG_NAME
from psalign.io import InputError, InputProblem, model_sha256
from psalign.methods import Method, get_method

from .generate import (
    GenerationSettings,
    check_resumable,
    generate_images,
    generation_log_fields,
    merge_generation_logs,
    shard,
    user_embeddings,
    write_grids,
)
from .records import PromptRecord, read_prompt_records


@dataclass
class InferenceConfig:
    """Everything ``infer.py`` takes. ``method`` None picks ``psa`` with ``load_psa``, ``safetydpo``
    with ``lora_path``, else ``base``; each method reads its own options from here."""

    meta_data: Path
    save_path: Path
    #: None: the bundled toy model (see :func:`with_toy_defaults`).
    sd_model: str | None = None
    method: str | None = None
    psa_path: Path | None = None
    load_psa: bool = False
    psa_scale: float = 1.0
    lora_path: Path | None = None
    lora_scale: float = 1.0
    prompt_mode: str = "both"
    unet_weights: Path | None = None
    sld_preset: str = "medium"
    sdxl: bool = False
    embeds_folder: Path | None = None
    #: Whether embeddings computed from profiles are written to ``embeds_folder``.
    save_new_embeddings: bool = True
    llm_model: str | None = None
    encoder: str = "llm"
    sentence_model: str | None = None
    batch_size: int = 1
    device: str | None = None
    dtype: str | None = None
    overwrite: bool = False
    skip_invalid: bool = False
    grid: str | None = None
    settings: GenerationSettings = field(default_factory=GenerationSettings)


def method_name(config: InferenceConfig) -> str:
    """The method to run: ``--method``, else the shorthands ``--load_psa`` (psa) and ``--lora_path`` (safetydpo)."""
    implied = "psa" if config.load_psa else "safetydpo" if config.lora_path else None
    if config.method and implied and config.method != implied:
        flag = "--load_psa" if config.load_psa else "--lora_path"
        raise ValueError(f"--method {config.method} conflicts with {flag} (which means --method {implied})")
    return config.method or implied or "base"


def with_toy_defaults(config: InferenceConfig, chosen_settings: Iterable[str] = ()) -> InferenceConfig:
    """``config`` with the bundled toy model filled in when ``sd_model`` is None.

    For the psa method also the bundled adapter (unless ``psa_path`` is given), the bundled user
    embeddings (read only: profile users are embedded on the fly and not written into the package)
    and the sentence encoder the toy adapter was trained with. ``num_inference_steps`` and
    ``guidance_scale`` become the toy model's unless named in ``chosen_settings`` (set by the user).
    """
    if config.sd_model is not None:
        return config
    from psalign.toy import bundled_paths
    from psalign.toy.model import DEFAULT_GUIDANCE, DEFAULT_STEPS

    bundle = bundled_paths()
    changes: dict = {"sd_model": str(bundle.model)}
    if method_name(config) == "psa":
        if config.psa_path is None:
            changes["psa_path"] = bundle.adapter
        if config.embeds_folder is None:
            changes.update(embeds_folder=bundle.embeds, save_new_embeddings=False)
        if config.llm_model is None:
            changes["encoder"] = "sentence"
    toy_sampling = {"num_inference_steps": DEFAULT_STEPS, "guidance_scale": DEFAULT_GUIDANCE}
    chosen = set(chosen_settings)
    changes["settings"] = replace(config.settings, **{k: v for k, v in toy_sampling.items() if k not in chosen})
    return replace(config, **changes)


def encoder_factory(config: InferenceConfig):
    """A function making the user encoder for profile users, or None when none was configured."""
    if config.llm_model is None and config.encoder != "sentence":
        return None

    def make():
        from psalign.embeddings import CausalLMUserEncoder, SentenceUserEncoder

        device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if config.encoder == "sentence":
            return SentenceUserEncoder(config.sentence_model, device=device)
        return CausalLMUserEncoder(config.llm_model, device=device)

    return make


def _adapter_embed_dim(psa_path: Path | None) -> int | None:
    """D_user of an adapter folder, read from its small JSON config (None for published checkpoints)."""
    config = Path(psa_path) / PSA_CONFIG_NAME if psa_path else None
    return json.loads(config.read_text())["user_embed_dim"] if config and config.is_file() else None


def validate(config: InferenceConfig, method: Method) -> tuple[list[PromptRecord], list[InputProblem]]:
    """Every problem with the inputs, found without loading any model."""
    problems = list(method.check())
    if config.embeds_folder is not None and not Path(config.embeds_folder).is_dir() and not config.llm_model:
        problems.append(InputProblem(str(config.embeds_folder), 0, "embeddings folder not found"))
    info = read_embedding_info(config.embeds_folder) if config.embeds_folder is not None else None
    if method.needs_user_embeddings and info and info.get("encoder") != config.encoder and encoder_factory(config):
        problems.append(InputProblem(
            str(Path(config.embeds_folder) / EMBEDDING_INFO_FILE), 0,
            f"the stored embeddings come from the {info.get('encoder')} encoder, but profile users would be embedded "
            f"with --encoder {config.encoder}", "encoder",
        ))
    records, record_problems = read_prompt_records(
        config.meta_data,
        config.embeds_folder,
        need_users=method.needs_user_embeddings,
        can_encode=encoder_factory(config) is not None,
        need_profiles=method.needs_user_profiles,
    )
    problems += record_problems
    expected_dim = _adapter_embed_dim(config.psa_path) if method.needs_user_embeddings else None
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


def run_inference(config: InferenceConfig) -> list[str]:
    """Generate every valid record not yet on disk; returns the file names this process wrote."""
    from accelerate import PartialState

    if config.sd_model is None:
        raise ValueError("no sd_model: pass with_toy_defaults(config) to use the bundled toy model")
    try:
        method = get_method(method_name(config)).from_config(config)
    except ValueError as error:  # unknown method, conflicting shorthands, bad method option
        raise InputError([InputProblem("--method", 0, str(error))], header="bad method options") from None
    records, problems = validate(config, method)
    run_info = {"model": str(config.sd_model)}
    digest = model_sha256(config.sd_model)  # a local folder: tells a retrained model at the same path apart
    if digest is not None:
        run_info["model_sha256"] = digest
    if problems:
        error = InputError(problems, header=f"{len(problems)} problem(s) in the inputs")
        if not config.skip_invalid:
            raise error
        print(f"{error}\n(--skip_invalid: going on with the {len(records)} valid record(s))", file=sys.stderr)
    if not config.overwrite:  # before any model is loaded
        check_resumable(config.save_path, records, generation_log_fields(config.settings, method, run_info))
    state = PartialState(cpu=config.device == "cpu")
    device = config.device or str(state.device)
    dtype = getattr(torch, config.dtype) if config.dtype else (torch.float16 if device.startswith("cuda") else torch.float32)
    mine = shard(records, state.process_index, state.num_processes)

    from .pipeline import load_pipeline

    pipe = load_pipeline(config.sd_model, device=device, dtype=dtype, sdxl=config.sdxl or None)
    pipe = method.prepare(pipe, mine, device)
    pipe.set_progress_bar_config(disable=True)
    part = f"generation_log.rank{state.process_index}.jsonl"
    written = generate_images(
        pipe,
        mine,
        config.save_path,
        config.settings,
        batch_size=config.batch_size,
        method=method,
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
