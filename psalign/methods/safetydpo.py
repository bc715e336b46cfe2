"""``safetydpo``: a LoRA in diffusers format (a merged SafetyDPO expert, or any LoRA)."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from psalign.io import InputProblem, weights_sha256

from .base import Method, register_method


@register_method
class LoRAMethod(Method):
    """Load ``--lora_path`` with the pipeline's own ``load_lora_weights`` and generate at ``--lora_scale``."""

    name = "safetydpo"

    def __init__(self, lora_path: Path | None, scale: float = 1.0):
        self.lora_path = lora_path
        self.scale = scale

    @classmethod
    def from_config(cls, config) -> "LoRAMethod":
        return cls(config.lora_path, config.lora_scale)

    def check(self) -> list[InputProblem]:
        if self.lora_path is None:
            return [InputProblem("--lora_path", 0, "required by the safetydpo method")]
        if not Path(self.lora_path).exists():
            return [InputProblem(str(self.lora_path), 0, "LoRA weights not found")]
        return []

    def prepare(self, pipe, records, device):
        pipe.load_lora_weights(str(self.lora_path), adapter_name="safety")
        pipe.set_adapters(["safety"], adapter_weights=[self.scale])
        return pipe

    @cached_property
    def lora_sha256(self) -> str:
        """Digest of the LoRA weights, read once per run (see ``PSAMethod.adapter_sha256``)."""
        return weights_sha256(self.lora_path)

    def log_params(self) -> dict:
        return {"lora": str(self.lora_path), "lora_sha256": self.lora_sha256, "lora_scale": self.scale}
