"""Validation grids during training: a few fixed users (rows) x fixed prompts (columns)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from psalign.adapter import PSAAdapter
from psalign.inference.grid import contact_sheet
from psalign.io import atomic_path

from .conditioning import SDXL


def validation_pipeline(pretrained_model: str, model_type: str, unet, dtype: torch.dtype, device, **components):
    """A stock pipeline around the training ``unet`` (adapter attached); ``components`` already in
    memory (vae, text_encoder, tokenizer, ...) are reused, the others are loaded for this call."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if model_type == SDXL:
        pipe = StableDiffusionXLPipeline.from_pretrained(pretrained_model, unet=unet, dtype=dtype, **components)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(
            pretrained_model, unet=unet, dtype=dtype, safety_checker=None, requires_safety_checker=False, **components
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@torch.no_grad()
def validation_grid(
    pipe,
    adapter: PSAAdapter,
    user_embeds: torch.Tensor,
    user_labels: list[str],
    prompts: list[str],
    resolution: int,
    num_inference_steps: int,
    guidance_scale: float,
    seed: int,
) -> Image.Image:
    """One image per (user, prompt); prompt ``j`` uses seed ``seed + j`` for every user, so rows
    differ only by the user. ``user_embeds``: (U, D)."""
    guided = guidance_scale > 1.0
    rows = []
    for embed in user_embeds:
        with adapter.users(embed[None].expand(len(prompts), -1), classifier_free_guidance=guided):
            images = pipe(
                list(prompts),
                height=resolution,
                width=resolution,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=[torch.Generator().manual_seed(seed + j) for j in range(len(prompts))],
            ).images
        rows.append(images)
    return contact_sheet(rows, user_labels, list(prompts))


def save_grid(grid: Image.Image, path: str | Path) -> Path:
    with atomic_path(path, suffix=".png") as tmp:
        grid.save(tmp)
    return Path(path)


def grid_array(grid: Image.Image) -> np.ndarray:
    """uint8 (H, W, 3), as image trackers take it."""
    return np.asarray(grid.convert("RGB"))
