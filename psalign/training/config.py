"""Training arguments: one dataclass, read from a YAML file with command-line overrides.

Every field of :class:`TrainingConfig` is a YAML key and a ``--flag`` of ``train_psa.py`` (the
help text lives here, once). Values from the command line win over the YAML file, which wins
over the defaults. Every bad value is reported at once as :class:`~psalign.io.InputError`
naming the YAML file and line, or the command-line flag, before anything is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from psalign.adapter.adapter import SDXL_MICRO_CONDITIONINGS
from psalign.cli.common import shown_default
from psalign.io import InputError, InputProblem
from .timesteps import TIMESTEP_BIAS_STRATEGIES
from .objectives import ANCHOR_LATENTS
from .objectives import OBJECTIVES as OBJECTIVE_REGISTRY
from .trainables import TRAINABLE_KINDS

#: ``--model_type`` values; ``auto`` detects SDXL from the model's two text encoders.
MODEL_TYPES = ("auto", "sd15", "sdxl")
MIXED_PRECISION = ("no", "fp16", "bf16")
#: ``--trainable`` values: the PSA user adapter, or a PEFT LoRA on the UNet (a SafetyDPO expert).
TRAINABLES = tuple(TRAINABLE_KINDS)
#: ``--objective`` values (see :mod:`psalign.training.objectives`); ``dpo`` is the published loss.
OBJECTIVES = tuple(OBJECTIVE_REGISTRY)
#: Learning-rate schedules of ``diffusers.optimization.get_scheduler`` usable from a config.
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
#: Where a command-line value came from, in error messages.
COMMAND_LINE = "command line"


def _arg(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field with its ``--help`` text (and optional ``choices``/``aliases``) as metadata."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainingConfig:
    """All arguments of a PSA adapter training run (see ``train_psa.py --help``)."""

    pretrained_model: str | None = _arg(
        None,
        "Stable Diffusion pipeline: local folder or hub id. SDXL is detected from its two text encoders.",
        aliases=("--sd_model",),
    )
    model_type: str = _arg("auto", "auto (detect), sd15 or sdxl; sd15/sdxl must match the model", choices=MODEL_TYPES)
    train_data: str | None = _arg(
        None, "Sage preference pairs: metadata.jsonl, or a folder holding it; image paths are relative to its folder"
    )
    embeds_folder: str | None = _arg(
        None, "folder of <User_ID>.npy user embeddings and embedding_stats.npz (python -m psalign.embed)"
    )
    output_dir: str | None = _arg(None, "run folder: checkpoints, logs, validation grids and the final adapter")
    resolution: int = _arg(512, "training resolution in pixels (images: shorter side resized, then cropped)")
    random_crop: bool = _arg(False, "random instead of centred crop (one crop shared by chosen and rejected)")
    random_flip: bool = _arg(False, "random horizontal flip (one flip shared by chosen and rejected)")
    sdxl_micro_conditioning: str = _arg(
        "target_size",
        "SDXL add_time_ids in training: target_size = [R, R, 0, 0, R, R], what the SDXL pipeline passes at inference "
        "(and the published code trains with); source_size = each source image's size and crop (recorded in the "
        "adapter, warned about at inference)",
        choices=SDXL_MICRO_CONDITIONINGS,
    )
    dataloader_num_workers: int = _arg(0, "data loading worker processes per training process")
    precompute: bool = _arg(
        False,
        "encode every image (VAE) and caption (text encoders) once into a safetensors cache, sharded over processes; "
        "the loop then holds no VAE or text encoder (each pair keeps one crop/flip)",
    )
    cache_dir: str | None = _arg(None, "cache folder for --precompute (default: <output_dir>/cache)")
    trainable: str = _arg(
        "adapter",
        "adapter: the PSA user adapter (needs embeds_folder); lora: a PEFT LoRA on the UNet attention projections "
        "(a SafetyDPO expert; train_data is an expert_pairs.jsonl, see train_safetydpo.py)",
        choices=TRAINABLES,
    )
    lora_rank: int = _arg(4, "LoRA rank (trainable lora)")
    lora_alpha: float = _arg(4.0, "LoRA alpha; the update is scaled by alpha / rank (trainable lora)")
    init_adapter: str | None = _arg(
        None,
        "PSA adapter folder (or published checkpoint) whose weights initialise the adapter (its architecture must "
        "match: user embedding dim, tokens; its embedding statistics give way to embeds_folder's); default: a fresh "
        "zero-initialised adapter",
    )
    num_user_tokens: int = _arg(1, "user tokens per user embedding (1: the exact fast path)")
    text_edit_layers: int = _arg(
        0, "blocks of the adapter's user text edit, which rewrites the caption's tokens for each user before every "
        "cross-attention layer (0: none, the published architecture; the kv_anchor objective trains it)"
    )
    objective: str = _arg(
        "dpo",
        "dpo: Diffusion-DPO (the published loss, with chosen_loss_weight); safe_anchor: regress the adapted "
        "prediction onto the frozen base model's prediction for the caption that drew the chosen image (a banned "
        "category's safe rewrite); dpo_safe_anchor: the two added, the anchor weighted by anchor_loss_weight; "
        "dpo_chosen_target: Diffusion-DPO plus, at the rejected image's noisy latent, regression onto the prediction "
        "that denoises it to the chosen image (weighted by chosen_target_weight, min-SNR snr_gamma); kv_anchor: the "
        "cross-attention keys and values of the caption as the text edit rewrites it, regressed onto the frozen "
        "model's for the caption that drew the chosen image (needs text_edit_layers > 0; no UNet pass)",
        choices=OBJECTIVES,
    )
    anchor_loss_weight: float = _arg(1.0, "weight of the safe-anchor term in dpo_safe_anchor")
    anchor_latents: str = _arg(
        "chosen",
        "noisy latents the safe-anchor term is taken at: chosen (the chosen image's) or both (the chosen and the "
        "rejected image's, so the adapter also learns to steer a latent that already shows the rejected content)",
        choices=ANCHOR_LATENTS,
    )
    chosen_target_weight: float = _arg(1.0, "weight of the chosen-target term in dpo_chosen_target")
    snr_gamma: float = _arg(
        5.0, "min-SNR-gamma weighting of the chosen-target term: the signal-to-noise ratio that weighs its "
        "clean-image error is capped at snr_gamma"
    )
    beta_dpo: float = _arg(5000.0, "Diffusion-DPO beta")
    chosen_loss_weight: float = _arg(
        0.0,
        "weight of the chosen images' denoising error (model minus reference) added to the Diffusion-DPO loss; "
        "keeps the model from winning by denoising both images worse (0: the published loss)",
    )
    timestep_bias_strategy: str = _arg(
        "none",
        "draw training timesteps uniformly (none) or bias a block of them: earlier (the least noisy "
        "timestep_bias_portion), later (the noisiest), range ([timestep_bias_begin, timestep_bias_end))",
        choices=TIMESTEP_BIAS_STRATEGIES,
    )
    timestep_bias_multiplier: float = _arg(1.0, "sampling weight of the biased timesteps (0: never drawn)")
    timestep_bias_portion: float = _arg(0.25, "fraction of the timesteps biased by earlier / later")
    timestep_bias_begin: int = _arg(0, "first biased timestep of range")
    timestep_bias_end: int | None = _arg(None, "end (excluded) of range (default: the scheduler's number of timesteps)")
    proportion_empty_prompts: float = _arg(0.2, "fraction of pairs trained with the empty prompt (text dropout)")
    user_dropout: float = _arg(0.1, "fraction of pairs trained with the null user (the guidance branch's user)")
    train_batch_size: int = _arg(1, "preference pairs per process per micro-batch")
    gradient_accumulation_steps: int = _arg(1, "micro-batches per optimizer step")
    learning_rate: float = _arg(5e-6, "AdamW learning rate (not scaled by batch size)")
    lr_scheduler: str = _arg("constant_with_warmup", "learning-rate schedule", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = _arg(500, "warm-up optimizer steps")
    max_train_steps: int = _arg(5000, "optimizer steps of the whole run")
    adam_weight_decay: float = _arg(1e-2, "AdamW weight decay")
    max_grad_norm: float = _arg(1.0, "gradient clipping norm")
    mixed_precision: str = _arg(
        "no",
        "precision of the frozen UNet, VAE and text encoders; trainable weights stay fp32",
        choices=MIXED_PRECISION,
    )
    gradient_checkpointing: bool = _arg(False, "recompute UNet activations in the backward pass (less memory)")
    seed: int = _arg(0, "seed of the adapter initialisation, data order, augmentation, noise and dropout")
    checkpointing_steps: int = _arg(500, "save the full training state every N optimizer steps")
    checkpoints_total_limit: int | None = _arg(
        None, "keep at most this many checkpoints of this run (default: all; other runs' are never deleted)"
    )
    resume_from_checkpoint: str | None = _arg(
        None, "a checkpoint folder, or 'latest' (the newest in output_dir; a fresh start when there is none)"
    )
    overwrite_output_dir: bool = _arg(
        False,
        "start afresh in an output_dir holding an earlier run, deleting its checkpoints, metrics log, validation "
        "grids and final weights (without it, such a fresh start is refused); with resume_from_checkpoint latest, "
        "only when there is no checkpoint to resume",
    )
    report_to: str = _arg(
        "none",
        "extra Accelerate trackers: tensorboard, wandb, ... comma-separated, or none (logs/metrics.jsonl always)",
    )
    tracker_project_name: str = _arg("psa", "tracker project / run name")
    validation_steps: int = _arg(0, "write a validation grid every N optimizer steps (0: never)")
    validation_prompts: list[str] = _arg([], "validation prompts (grid columns)", metavar="PROMPT")
    validation_users: list[str] = _arg(
        [], "validation User_IDs (grid rows; default: the first two users of the data)", metavar="USER_ID"
    )
    validation_num_inference_steps: int = _arg(25, "denoising steps of validation images")
    validation_guidance_scale: float = _arg(7.5, "classifier-free guidance scale of validation images")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_FIELDS = {f.name: f for f in dataclasses.fields(TrainingConfig)}
_TYPES = typing.get_type_hints(TrainingConfig)
#: Fields with no usable default: a run needs them from the YAML file or the command line.
REQUIRED = ("pretrained_model", "train_data", "output_dir")


def _base_type(name: str) -> tuple[type, bool]:
    """``(type, optional)`` of a field: ``int | None`` -> ``(int, True)``; ``list[str]`` -> ``(list, False)``."""
    hint = _TYPES[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = type(None) in typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin is list:
        return list, False
    return (args[0] if optional else hint), optional


def _coerce(name: str, value: Any) -> Any:
    """``value`` (from YAML) as the field's type; ``ValueError`` saying what was expected."""
    kind, optional = _base_type(name)
    if value is None:
        if optional:
            return None
        raise ValueError("must not be empty")
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected a whole number, got {value!r}")
        return value
    if kind is float:  # YAML 1.1 reads 5e-6 (no dot) as a string
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {value!r}") from None
    if kind is list:
        if not isinstance(value, list) or not all(isinstance(v, (str, int)) for v in value):
            raise ValueError(f"expected a list of strings, got {value!r}")
        return [str(v) for v in value]
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ValueError(f"expected a string, got {value!r}")
    return str(value)


def _range_problems(config: TrainingConfig) -> list[tuple[str, str]]:
    """``(field, reason)`` for every value out of its range or missing."""
    problems = [(name, "required (in the YAML file or on the command line)") for name in REQUIRED
                if getattr(config, name) in (None, "")]
    if config.trainable in TRAINABLE_KINDS:  # the trainable's own needs
        problems += TRAINABLE_KINDS[config.trainable].config_problems(config)
    for name in _FIELDS:
        choices = _FIELDS[name].metadata.get("choices")
        if choices and getattr(config, name) not in choices:
            problems.append((name, f"{getattr(config, name)!r} is not one of {', '.join(choices)}"))
    positive = ("resolution", "train_batch_size", "gradient_accumulation_steps", "max_train_steps",
                "checkpointing_steps", "num_user_tokens", "validation_num_inference_steps", "lora_rank")
    for name in positive:
        if getattr(config, name) < 1:
            problems.append((name, f"must be >= 1, got {getattr(config, name)}"))
    if config.text_edit_layers < 0:
        problems.append(("text_edit_layers", f"must be >= 0, got {config.text_edit_layers}"))
    if config.objective == "kv_anchor" and config.trainable == "adapter" and config.text_edit_layers < 1:
        problems.append(("text_edit_layers", "the kv_anchor objective trains the adapter's text edit: set it >= 1"))
    for name in ("lr_warmup_steps", "validation_steps", "dataloader_num_workers", "chosen_loss_weight", "anchor_loss_weight",
                 "chosen_target_weight", "timestep_bias_multiplier", "timestep_bias_begin"):
        if getattr(config, name) < 0:
            problems.append((name, f"must be >= 0, got {getattr(config, name)}"))
    for name in ("learning_rate", "beta_dpo", "max_grad_norm", "lora_alpha", "snr_gamma"):
        if not getattr(config, name) > 0:
            problems.append((name, f"must be > 0, got {getattr(config, name)}"))
    for name in ("proportion_empty_prompts", "user_dropout"):
        if not 0.0 <= getattr(config, name) < 1.0:
            problems.append((name, f"must be in [0, 1), got {getattr(config, name)}"))
    if not 0.0 < config.timestep_bias_portion <= 1.0:
        problems.append(("timestep_bias_portion", f"must be in (0, 1], got {config.timestep_bias_portion}"))
    if config.timestep_bias_end is not None and config.timestep_bias_end <= config.timestep_bias_begin:
        problems.append(("timestep_bias_end", f"must be > timestep_bias_begin ({config.timestep_bias_begin}), "
                                              f"got {config.timestep_bias_end}"))
    if config.resolution % 8:
        problems.append(("resolution", f"must be a multiple of 8 (the VAE's downsampling), got {config.resolution}"))
    if config.checkpoints_total_limit is not None and config.checkpoints_total_limit < 1:
        problems.append(("checkpoints_total_limit", f"must be >= 1, got {config.checkpoints_total_limit}"))
    if config.overwrite_output_dir and config.resume_from_checkpoint not in (None, "latest"):
        problems.append(("overwrite_output_dir", "starts a new run, so it cannot be combined with resuming "
                                                 f"from {config.resume_from_checkpoint!r}"))
    if config.validation_steps and not config.validation_prompts:
        problems.append(("validation_prompts", "validation_steps is set but there are no validation prompts"))
    return problems


def _yaml_values(path: Path) -> tuple[dict[str, Any], dict[str, int], list[InputProblem]]:
    """Values, 1-based key lines and problems (unknown keys, bad YAML) of a config file."""
    text = path.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        return {}, {}, [InputProblem(str(path), mark.line + 1 if mark else 0, f"bad YAML: {err}")]
    if data is None:
        return {}, {}, []
    if not isinstance(data, dict):
        return {}, {}, [InputProblem(str(path), 1, "expected a mapping of argument names to values")]
    lines = {key.value: key.start_mark.line + 1 for key, _ in node.value}
    problems = [
        InputProblem(str(path), lines.get(key, 0), f"unknown argument; known: {', '.join(_FIELDS)}", field=str(key))
        for key in data
        if key not in _FIELDS
    ]
    return {k: v for k, v in data.items() if k in _FIELDS}, lines, problems


def load_training_config(
    config_file: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> TrainingConfig:
    """Defaults, then the YAML ``config_file``, then ``overrides`` (already typed, e.g. parsed flags).

    Raises :class:`InputError` listing every problem (``file:line: field: reason`` for the YAML
    file, ``command line: --field: reason`` for overrides).
    """
    values: dict[str, Any] = {}
    where: dict[str, tuple[str, int]] = {}
    problems: list[InputProblem] = []
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise InputError([InputProblem(str(path), 0, "config file not found")])
        raw, lines, problems = _yaml_values(path)
        for key, value in raw.items():
            try:
                values[key] = _coerce(key, value)
                where[key] = (str(path), lines.get(key, 0))
            except ValueError as err:
                problems.append(InputProblem(str(path), lines.get(key, 0), str(err), field=key))
    for key, value in (overrides or {}).items():
        if key not in _FIELDS:
            raise TypeError(f"unknown training argument {key!r}")
        try:
            values[key] = _coerce(key, value)
            where[key] = (COMMAND_LINE, 0)
        except ValueError as err:
            problems.append(InputProblem(COMMAND_LINE, 0, str(err), field=f"--{key}"))
    if problems:
        raise InputError(problems, header=f"{len(problems)} problem(s) in the training arguments")
    config = TrainingConfig(**values)
    problems = []
    for name, reason in _range_problems(config):
        source, line = where.get(name, ("defaults", 0))
        shown = f"--{name}" if source == COMMAND_LINE else name
        problems.append(InputProblem(source, line, reason, field=shown))
    if problems:
        raise InputError(problems, header=f"{len(problems)} problem(s) in the training arguments")
    return config


#: ``--help`` sections: the first field of each, in declaration order; fields up to the next first field belong to it.
OPTION_GROUPS: dict[str, str] = {
    "pretrained_model": "model and data",
    "trainable": "adapter and objective",
    "train_batch_size": "optimisation",
    "checkpointing_steps": "checkpoints",
    "report_to": "logging and validation",
}


def add_training_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
) -> argparse.ArgumentParser | argparse._ArgumentGroup:
    """Add one ``--flag`` per :class:`TrainingConfig` field, in the sections of :data:`OPTION_GROUPS`;
    unset flags stay out of the namespace. Given an argument group rather than a parser, every flag
    goes into that group (argparse does not nest groups)."""
    defaults = TrainingConfig()
    group = parser
    for name, spec in _FIELDS.items():
        if name in OPTION_GROUPS and isinstance(parser, argparse.ArgumentParser):
            group = parser.add_argument_group(OPTION_GROUPS[name])
        kind, _ = _base_type(name)
        shown = shown_default(getattr(defaults, name))
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": spec.metadata["help"] + shown}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind is list:
            kwargs.update(nargs="+", metavar=spec.metadata["metavar"])
        else:
            kwargs["type"] = kind
            if spec.metadata.get("choices"):
                kwargs["choices"] = spec.metadata["choices"]
        group.add_argument(f"--{name}", *spec.metadata.get("aliases", ()), **kwargs)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainingConfig:
    """The config of a parsed ``train_psa.py`` command line (``args.config``: the optional YAML file)."""
    overrides = {k: v for k, v in vars(args).items() if k in _FIELDS}
    return load_training_config(getattr(args, "config", None), overrides)
