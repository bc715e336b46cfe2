"""``safetydpo``: a LoRA in diffusers format (a merged SafetyDPO expert, or any LoRA)."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

from psalign.formats import TRAINING_INFO_NAME
from psalign.io import InputError, InputProblem, read_utf8_text, weights_sha256

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
        try:
            self.training_args
        except InputError as error:
            return error.problems
        return []

    @cached_property
    def training_args(self) -> dict:
        """The training arguments in ``training_info.json`` beside the LoRA weights (a trained
        SafetyDPO expert writes it); empty when there is none (a merged or foreign LoRA)."""
        folder = Path(self.lora_path) if Path(self.lora_path).is_dir() else Path(self.lora_path).parent
        path = folder / TRAINING_INFO_NAME
        if not path.is_file():
            return {}
        try:
            info = json.loads(read_utf8_text(path))
        except json.JSONDecodeError as error:
            raise InputError([InputProblem(str(path), error.lineno, f"invalid JSON ({error.msg})")]) from None
        args = info.get("training_args") if isinstance(info, dict) else None
        if not isinstance(args, dict):
            raise InputError([InputProblem(str(path), 1, "expected an object with training_args", "training_args")])
        return args

    def sdxl_training_conditioning(self) -> tuple[str | None, int | None]:
        return self.training_args.get("sdxl_micro_conditioning"), self.training_args.get("resolution")

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
