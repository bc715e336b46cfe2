"""Loading stock diffusers pipelines for personalized generation."""

from __future__ import annotations

import json
from pathlib import Path

import torch


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
