"""A PEFT LoRA on the UNet as the training loop's trainable weights (a SafetyDPO safety expert).

It offers what the loop asks of the PSA adapter: calling it gives the conditioning to
``activate`` (none: a LoRA needs no user), ``disabled()`` gives the reference model (the same
UNet with the LoRA off), and its parameters are the fp32 LoRA factors.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch

from psalign.formats import LORA_WEIGHTS_NAME
from psalign.safetydpo.lora import DEFAULT_TARGET_MODULES

ADAPTER_NAME = "default"


class UNetLoRA(torch.nn.Module):
    """PEFT LoRA layers added to ``unet`` (rank ``rank``, scale ``alpha / rank``, B initialised to zero).

    The LoRA factors are registered here as well (shared with the UNet's LoRA layers), so the
    optimizer, Accelerate and checkpoints see only them; they are kept fp32 whatever the UNet's dtype.
    """

    def __init__(self, unet: torch.nn.Module, rank: int, alpha: float,
                 target_modules: Sequence[str] = DEFAULT_TARGET_MODULES):
        super().__init__()
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig

        self.lora_config = LoraConfig(
            r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(target_modules)
        )
        unet.add_adapter(self.lora_config, adapter_name=ADAPTER_NAME)
        cast_training_params(unet, dtype=torch.float32)
        self.factors = torch.nn.ParameterDict(
            {name.replace(".", "__"): p for name, p in unet.named_parameters() if p.requires_grad}
        )
        if not self.factors:
            raise ValueError(f"no UNet module matched the LoRA target modules {list(target_modules)}")
        self._unet = [unet]  # not a submodule: only the factors are this module's parameters

    def forward(self) -> None:
        """No conditioning: the LoRA acts on every input.

        Under DDP the call still matters: the wrapper's forward arms its gradient hooks on the
        factors, which then all-reduce their gradients when the UNet's backward reaches them
        (they are the same tensors). Skipping it leaves each process with its own gradients.
        """
        return None

    def activate(self, conditioning: None) -> None:
        """The LoRA is always on outside :meth:`disabled`."""

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """The reference model: the same UNet with the LoRA switched off."""
        unet = self._unet[0]
        unet.disable_adapters()
        try:
            yield
        finally:
            unet.enable_adapters()

    def save_pretrained(self, output_dir: str | Path, pipeline_class, state: dict[str, torch.Tensor]) -> Path:
        """Write ``state`` (this module's state dict) in the diffusers LoRA format, with the LoRA config
        as metadata, so that ``pipeline.load_lora_weights(output_dir)`` loads it."""
        import os
        import tempfile

        peft_state = {name.replace("__", ".").removeprefix("factors."): t.float() for name, t in state.items()}
        layers = {k.replace(f".{ADAPTER_NAME}.", "."): v for k, v in peft_state.items()}  # module.lora_A.weight
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        metadata = self.lora_config.to_dict()
        metadata["target_modules"] = sorted(metadata["target_modules"])
        with tempfile.TemporaryDirectory(dir=output_dir) as tmp:  # written whole, then moved into place
            pipeline_class.save_lora_weights(tmp, unet_lora_layers=layers, unet_lora_adapter_metadata=metadata)
            os.replace(Path(tmp) / LORA_WEIGHTS_NAME, output_dir / LORA_WEIGHTS_NAME)
        return output_dir / LORA_WEIGHTS_NAME
