"""``psa``: the personalized user adapter, one user per record."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from psalign.io import InputProblem, weights_sha256

from .base import Method, register_method


@register_method
class PSAMethod(Method):
    """Condition every image on its record's user through a PSA adapter (``--adapter``, ``--psa_scale``)."""

    name = "psa"
    needs_user_embeddings = True

    def __init__(
        self, psa_path: Path | None, scale: float = 1.0, embeds_folder=None, make_encoder=None, save_new_embeddings=True
    ):
        self.psa_path = psa_path
        self.scale = scale
        self.embeds_folder = embeds_folder
        self.make_encoder = make_encoder
        self.save_new_embeddings = save_new_embeddings
        self.adapter = None
        self.embeddings: dict[str, np.ndarray] = {}

    @classmethod
    def from_config(cls, config) -> "PSAMethod":
        from psalign.inference.run import encoder_factory

        return cls(config.psa_path, config.psa_scale, config.embeds_folder, encoder_factory(config),
                   config.save_new_embeddings)

    def check(self) -> list[InputProblem]:
        if self.psa_path is None:
            return [InputProblem("--adapter", 0, "required by the psa method (--load_psa)")]
        if not Path(self.psa_path).exists():
            return [InputProblem(str(self.psa_path), 0, "PSA adapter not found")]
        from psalign.adapter import inspect_adapter

        try:  # headers only: a bad, unsafe or foreign adapter is reported before any model loads
            inspect_adapter(self.psa_path)
        except (OSError, ValueError) as error:
            return [InputProblem("--adapter", 0, str(error))]
        return []

    def prepare(self, pipe, records, device):
        from psalign.adapter import load_adapter
        from psalign.inference.generate import user_embeddings

        self.adapter = load_adapter(self.psa_path, pipe.unet).to(device)
        self.embeddings = user_embeddings(records, self.embeds_folder, self.make_encoder, self.save_new_embeddings)
        return pipe

    def sdxl_training_conditioning(self) -> tuple[str | None, int | None]:
        config = self.adapter.config
        return config.sdxl_micro_conditioning, config.extra.get("training_args", {}).get("resolution")

    def generate(self, pipe, batch, call_kwargs):
        embeds = torch.from_numpy(np.stack([self.embeddings[r.user.key] for r in batch]))
        guidance = call_kwargs.get("guidance_scale", 7.5) > 1.0
        with self.adapter.users(embeds, scale=self.scale, classifier_free_guidance=guidance):
            return pipe(**call_kwargs).images

    @cached_property
    def adapter_sha256(self) -> str:
        """Digest of the adapter weights, read once per run: it tells a retrained adapter at the same
        path apart (a resumed run must not mix the two) and the same adapter in a moved folder alike."""
        return weights_sha256(self.psa_path)

    def log_params(self) -> dict:
        return {"adapter": str(self.psa_path), "adapter_sha256": self.adapter_sha256, "psa_scale": self.scale}
