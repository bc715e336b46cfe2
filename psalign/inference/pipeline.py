"""Loading stock diffusers pipelines for personalized generation."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from psalign.io import InputError, InputProblem, read_utf8_text


def is_sdxl_model(model: str | Path) -> bool:
    """True when the pipeline folder (or hub id) has two text encoders, as SDXL does."""
    from diffusers import DiffusionPipeline

    local = Path(model) / "model_index.json"
    if local.is_file():
        index = json.loads(local.read_text())
    elif Path(model).exists():
        raise FileNotFoundError(f"{model} has no model_index.json: not a diffusers pipeline folder")
    else:
        index = DiffusionPipeline.load_config(str(model))
    return index.get("text_encoder_2") not in (None, [None, None])


def load_pipeline(model: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32, sdxl: bool | None = None):
    """A stock ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` (detected from the model).

    The built-in NSFW checker of SD1.5 checkpoints is not loaded: it blacks out images, which
    defeats safety evaluation; safety is what the adapter and the metrics are for.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    detected = is_sdxl_model(model)
    if sdxl and not detected:
        raise ValueError(f"--sdxl was given but {model} is not an SDXL pipeline (it has one text encoder)")
    if detected:
        pipe = StableDiffusionXLPipeline.from_pretrained(str(model), dtype=dtype)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(
            str(model), dtype=dtype, safety_checker=None, requires_safety_checker=False
        )
    return pipe.to(device)


#: The base models the published tables name, by pipeline class and the UNet's text width
#: (``cross_attention_dim``). SD1.4 and SD1.5 share an architecture, so an SD1.x pipeline reads as
#: ``sd15``; SD2.x (1024) and any other pipeline are not named.
BASE_MODEL_NAMES = {
    ("StableDiffusionPipeline", 768): "sd15",
    ("StableDiffusionXLPipeline", 2048): "sdxl",
}


def pipeline_signature(pipe) -> dict:
    """What a generation log records of a loaded pipeline: its class and its UNet's
    ``cross_attention_dim`` (together they tell the base model apart, :func:`base_model_name`)."""
    return {"pipeline": type(pipe).__name__, "cross_attention_dim": pipe.unet.config.cross_attention_dim}


def base_model_name(pipeline: object, cross_attention_dim: object) -> str | None:
    """``sd15`` or ``sdxl`` for a pipeline class and UNet text width of :data:`BASE_MODEL_NAMES`,
    else None."""
    if not isinstance(pipeline, str) or isinstance(cross_attention_dim, bool) or \
            not isinstance(cross_attention_dim, int):
        return None
    return BASE_MODEL_NAMES.get((pipeline, cross_attention_dim))


def folder_signature(model: str | Path) -> dict | None:
    """:func:`pipeline_signature` read off a local pipeline folder's ``model_index.json`` and
    ``unet/config.json`` without loading it; None for a hub id, a missing folder or unreadable configs."""
    root = Path(model)
    try:
        index = _read_config(root / "model_index.json")
        unet = _read_config(root / "unet" / "config.json")
    except (OSError, InputError):
        return None
    return {"pipeline": index.get("_class_name"), "cross_attention_dim": unet.get("cross_attention_dim")}


#: Stock Stable Diffusion pipelines refuse image sides that are not multiples of 8.
PIPELINE_SIZE_MULTIPLE = 8
#: Largest image side ``infer.py`` accepts, in pixels.
MAX_IMAGE_SIDE = 8192


@dataclass(frozen=True)
class ModelGeometry:
    """What a local pipeline folder's configs say about the images it draws and its sampler."""

    #: Image sides must be multiples of this: the pipelines' 8, and the VAE's downscaling.
    size_multiple: int
    #: Side of the images drawn when no size is given (the UNet's sample size times the VAE's factor).
    default_size: int | None
    #: Training timesteps of the scheduler: more sampling steps than this are refused.
    train_timesteps: int | None
    #: Whether the pipeline has two text encoders, as SDXL does.
    sdxl: bool = False


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(read_utf8_text(path))
    except json.JSONDecodeError as error:
        raise InputError([InputProblem(str(path), error.lineno, f"invalid JSON ({error.msg})")]) from None
    if not isinstance(config, dict):
        raise InputError([InputProblem(str(path), 0, "must be a JSON object")])
    return config


def model_problems(model: str | Path) -> list[InputProblem]:
    """Why ``model`` cannot be loaded as a diffusers pipeline, found without loading it: a missing
    folder, a folder without a readable ``model_index.json``, or a hub id that is neither cached nor
    reachable (:func:`psalign.hub.hub_problem`, a few seconds at most)."""
    from psalign.hub import hub_problem, looks_like_path

    path = Path(model)
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            return [InputProblem(str(path), 0, "not a diffusers pipeline folder (it has no model_index.json)")]
        try:
            _read_config(index)
        except InputError as error:
            return error.problems
        return []
    text = str(model)
    if looks_like_path(text):
        return [InputProblem(text, 0, "no such pipeline folder")]
    problem = hub_problem(text, "model_index.json", "diffusers pipeline")
    return [] if problem is None else [problem]


def model_geometry(model: str | Path) -> ModelGeometry | None:
    """The :class:`ModelGeometry` of a local pipeline folder (None for a hub id); :class:`InputError`
    when one of the configs it reads is corrupt."""
    root = Path(model)
    if not (root / "model_index.json").is_file():
        return None
    index = _read_config(root / "model_index.json")
    vae_factor, default, timesteps = 8, None, None
    if (root / "vae" / "config.json").is_file():
        channels = _read_config(root / "vae" / "config.json").get("block_out_channels")
        if isinstance(channels, list) and channels:
            vae_factor = 2 ** (len(channels) - 1)
    if (root / "unet" / "config.json").is_file():
        sample = _read_config(root / "unet" / "config.json").get("sample_size")
        if isinstance(sample, list) and sample:
            sample = sample[0]
        if isinstance(sample, int) and not isinstance(sample, bool):
            default = sample * vae_factor
    if (root / "scheduler" / "scheduler_config.json").is_file():
        steps = _read_config(root / "scheduler" / "scheduler_config.json").get("num_train_timesteps")
        timesteps = steps if isinstance(steps, int) and not isinstance(steps, bool) else None
    sdxl = index.get("text_encoder_2") not in (None, [None, None])
    return ModelGeometry(math.lcm(PIPELINE_SIZE_MULTIPLE, vae_factor), default, timesteps, sdxl)
