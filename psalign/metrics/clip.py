"""CLIP image and text embeddings (transformers ``CLIPModel``), shared by Q16, CLIPScore and FD-CLIP."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

from psalign.io import InputError
from psalign.hub import pretrained_problem

#: Public CLIP ViT-L/14 (the model Q16's prompt vectors were learned for).
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
#: LAION's CLIP ViT-H/14 (laion2B), the CLIPScore model of the PSA paper's evaluation (1024-d).
LAION_CLIP_H14 = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def _pooled(output) -> torch.Tensor:
    """The projected embedding from ``get_*_features``: transformers v5 returns an output object
    whose ``pooler_output`` holds it, older versions the tensor itself."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipEmbedder:
    """Embeds images and texts into CLIP's joint space; returns float32 (N, D) arrays, D the
    projection dimension (768 for ViT-L/14)."""

    def __init__(self, model, image_processor, tokenizer, device: str | torch.device = "cpu", name: str = ""):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.name = name
        self.max_text_tokens = int(model.config.text_config.max_position_embeddings)

    @classmethod
    def from_pretrained(cls, name_or_path: str, device: str | torch.device = "cpu") -> "ClipEmbedder":
        """Load model, image processor and tokenizer from a hub id or local folder (float16 on
        CUDA, float32 elsewhere). A model that is neither local nor cached while the hub is offline
        fails at once with an :class:`InputError`."""
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        problem = pretrained_problem(name_or_path, "CLIP model")
        if problem is not None:
            raise InputError([problem])
        device = torch.device(device)
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        try:
            model = CLIPModel.from_pretrained(name_or_path, dtype=dtype)
            image_processor = AutoImageProcessor.from_pretrained(name_or_path)
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        except OSError as error:
            raise OSError(f"could not load CLIP model {name_or_path!r}: {error}") from error
        return cls(model, image_processor, tokenizer, device, name=name_or_path)

    @property
    def dim(self) -> int:
        """Projection dimension D."""
        return int(self.model.config.projection_dim)

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image], normalize: bool = True) -> np.ndarray:
        """(N, D) image embeddings, unit-norm when ``normalize``."""
        pixels = self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        pixels = pixels.to(self.device, dtype=self.model.dtype)
        features = _pooled(self.model.get_image_features(pixel_values=pixels)).float()
        if normalize:
            features = torch.nn.functional.normalize(features, dim=-1)
        return features.cpu().numpy()

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str], normalize: bool = True) -> np.ndarray:
        """(N, D) text embeddings (texts truncated to the model's 77 tokens), unit-norm when ``normalize``."""
        tokens = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_text_tokens, return_tensors="pt"
        ).to(self.device)
        output = self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        features = _pooled(output).float()
        if normalize:
            features = torch.nn.functional.normalize(features, dim=-1)
        return features.cpu().numpy()


class ClipImageFeatures:
    """FD-CLIP feature extractor: CLIP image embeddings before normalisation, (N, D)."""

    def __init__(self, embedder: ClipEmbedder):
        self.embedder = embedder
        self.name = f"clip:{embedder.name}"

    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.embedder.embed_images(images, normalize=False)
