"""``erased_unet``: a UNet edited by a concept-erasure method (ESD-u, UCE, ...), loaded over the base UNet."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from psalign.io import InputProblem

from .base import Method, register_method


#: The results name of each erasure method a weights file's name can reveal (the published tables'
#: ``esdu`` and ``uce``), and the pattern that reveals it: a word of the name, apart from letters and digits.
ERASURE_NAMES = {
    "esdu": re.compile(r"(?<![a-z0-9])esd[-_ ]?u(?![a-z0-9])"),
    "uce": re.compile(r"(?<![a-z0-9])uce(?![a-z0-9])"),
}


def erasure_name(weights: str | Path | None) -> str | None:
    """``esdu`` (ESD-u) or ``uce`` when the weights file's name, else its folder's name, names
    exactly one of them (``...-esdu.safetensors``, ``nsfw_uce_sd.safetensors``,
    ``uce/unet.safetensors``); None otherwise."""
    if not weights:
        return None
    path = Path(str(weights))
    for name in (path.stem, path.parent.name):
        found = [key for key, pattern in ERASURE_NAMES.items() if pattern.search(name.lower())]
        if found:
            return found[0] if len(found) == 1 else None
    return None


def load_unet_weights(unet: torch.nn.Module, path: str | Path) -> int:
    """Copy a safetensors UNet state dict (diffusers key names, optionally prefixed ``unet.``) over
    ``unet``; a subset of the weights is fine. Every key must exist with the same shape, else a
    ``ValueError`` lists the offenders. Returns the number of tensors replaced."""
    state = {k.removeprefix("unet."): v for k, v in load_file(str(path)).items()}
    own = unet.state_dict()
    unknown = [k for k in state if k not in own]
    wrong = [f"{k}: file {tuple(v.shape)} vs UNet {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and v.shape != own[k].shape]
    if unknown or wrong:
        hint = " (original-format keys: convert the checkpoint to diffusers names first)" if any(
            k.startswith("model.diffusion_model.") for k in unknown) else ""
        lines = [f"{path} does not fit this UNet{hint}:"]
        lines += [f"  unknown key {k}" for k in unknown[:10]] + [f"  shape mismatch {w}" for w in wrong[:10]]
        if len(unknown) + len(wrong) > 20:
            lines.append(f"  ... {len(unknown) + len(wrong) - 20} more")
        raise ValueError("\n".join(lines))
    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value.to(own[key].dtype))
    return len(state)


@register_method
class ErasedUNetMethod(Method):
    """Generate with UNet weights from ``--unet_weights`` (a concept-erased UNet) over the base model."""

    name = "erased_unet"

    def __init__(self, weights: Path | None):
        self.weights = weights
        self.replaced = 0

    @classmethod
    def from_config(cls, config) -> "ErasedUNetMethod":
        return cls(config.unet_weights)

    def check(self) -> list[InputProblem]:
        if self.weights is None:
            return [InputProblem("--unet_weights", 0, "required by the erased_unet method")]
        if not Path(self.weights).is_file() or Path(self.weights).suffix != ".safetensors":
            return [InputProblem(str(self.weights), 0, "must be an existing .safetensors file")]
        return []

    def prepare(self, pipe, records, device):
        self.replaced = load_unet_weights(pipe.unet, self.weights)
        return pipe

    def log_params(self) -> dict:
        return {"unet_weights": str(self.weights)}
