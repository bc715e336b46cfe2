"""LoRA weights in the diffusers format: read them as weight deltas, write factors back.

A LoRA on a linear layer ``W (out, in)`` adds ``dW = (alpha / r) * B @ A`` with ``A (r, in)``,
``B (out, r)``. Files are what ``pipeline.save_lora_weights`` writes and
``pipeline.load_lora_weights`` reads: ``pytorch_lora_weights.safetensors`` with keys
``unet.<module>.lora_A.weight`` / ``lora_B.weight`` and the PEFT ``LoraConfig`` as metadata.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from psalign.formats import LORA_WEIGHTS_NAME

#: The UNet attention projections SafetyDPO adapts.
DEFAULT_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")


def read_lora_deltas(path: str | Path) -> dict[str, torch.Tensor]:
    """``module name -> dW`` (float32, (out, in)) of a diffusers-format UNet LoRA (folder or file)."""
    from diffusers import StableDiffusionPipeline

    state, _, metadata = StableDiffusionPipeline.lora_state_dict(str(path), return_lora_metadata=True)
    metadata = metadata or {}
    patterns = (metadata.get("unet.rank_pattern"), metadata.get("unet.alpha_pattern"))
    if any(patterns):
        raise ValueError(f"{path}: per-module rank/alpha patterns are not supported")
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if not key.startswith("unet."):
            raise ValueError(f"{path}: only UNet LoRAs are supported, found {key!r}")
        module, _, which = key.removeprefix("unet.").rpartition(".lora_")
        factors.setdefault(module, {})[which.removesuffix(".weight")] = value.float()
    deltas = {}
    for module, pair in factors.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"{path}: module {module} lacks lora_A or lora_B")
        rank = pair["A"].shape[0]
        alpha = metadata.get("unet.lora_alpha", rank)
        deltas[module] = (alpha / rank) * pair["B"] @ pair["A"]
    return deltas


def save_lora_factors(path: str | Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int) -> Path:
    """Write ``module -> (A (r, in), B (out, r))`` as a diffusers LoRA with ``lora_alpha = r`` (scale 1)."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=sorted(factors)).to_dict()
    config["target_modules"] = sorted(config["target_modules"])
    state = {}
    for module, (a, b) in factors.items():
        state[f"{module}.lora_A.weight"] = a.contiguous().float()
        state[f"{module}.lora_B.weight"] = b.contiguous().float()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path) as tmp:  # written whole, then moved into place
        StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=state, unet_lora_adapter_metadata=config)
        os.replace(Path(tmp) / LORA_WEIGHTS_NAME, path / LORA_WEIGHTS_NAME)
    return path
