"""Latents, text and size conditioning of the frozen UNet, for SD1.5- and SDXL-shaped pipelines.

* Latents: the VAE posterior's mean (deterministic, so a cached latent equals one computed on
  the fly), shifted and scaled as the pipeline expects.

* SD1.5: the last hidden states of the one CLIP text encoder, (B, 77, d_c).
* SDXL: the penultimate hidden states of both text encoders concatenated, (B, 77, d_1 + d_2);
  the pooled (projected) output of the second, (B, d_p); and ``add_time_ids`` (B, 6) = original
  size (h, w), crop top-left (top, left) and target size (h, w) in pixels. Training's
  ``sdxl_micro_conditioning`` chooses them (:func:`training_time_ids`): ``target_size`` (the
  default) passes ``[R, R, 0, 0, R, R]``, what the SDXL pipeline passes at inference, and
  ``source_size`` each source image's size and crop; the adapter config records the choice.

The empty prompt (text dropout, and the unconditional branch of classifier-free guidance) is what
the stock pipeline uses for its unconditional branch: SDXL pipelines with
``force_zeros_for_empty_prompt`` (the default) use zeros, SD1.5 the encoding of ``""``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

SD15, SDXL = "sd15", "sdxl"


@dataclass
class TextConditioning:
    """``prompt_embeds`` (B, L, d_c); ``pooled_embeds`` (B, d_p) for SDXL, else None."""

    prompt_embeds: torch.Tensor
    pooled_embeds: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def where(self, mask: torch.Tensor, other: "TextConditioning") -> "TextConditioning":
        """Rows with ``mask`` (B,) True taken from ``other`` (one row, broadcast, or B rows)."""
        mask = mask.to(self.prompt_embeds.device, torch.bool)
        prompt = torch.where(mask[:, None, None], other.prompt_embeds.to(self.prompt_embeds), self.prompt_embeds)
        pooled = None
        if self.pooled_embeds is not None:
            pooled = torch.where(mask[:, None], other.pooled_embeds.to(self.pooled_embeds), self.pooled_embeds)
        return TextConditioning(prompt, pooled)

    def repeat(self, times: int) -> "TextConditioning":
        """The batch ``times`` times over along dim 0 (``[x; x]`` for chosen and rejected)."""
        pooled = None if self.pooled_embeds is None else self.pooled_embeds.repeat(times, 1)
        return TextConditioning(self.prompt_embeds.repeat(times, 1, 1), pooled)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "TextConditioning":
        pooled = None if self.pooled_embeds is None else self.pooled_embeds.to(device, dtype)
        return TextConditioning(self.prompt_embeds.to(device, dtype), pooled)


@torch.no_grad()
def vae_latents(vae: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] -> scaled latents (B, C, H/8, W/8) in the VAE's dtype."""
    latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def resolve_model_type(pretrained_model: str, requested: str = "auto") -> str:
    """``sd15`` or ``sdxl`` from the pipeline's ``model_index.json`` (two text encoders: SDXL).

    ``requested`` (``auto``, ``sd15``, ``sdxl``) must agree with the model; ``ValueError`` otherwise,
    ``FileNotFoundError``/``OSError`` when there is no pipeline at ``pretrained_model``.
    """
    from psalign.inference.pipeline import is_sdxl_model

    detected = SDXL if is_sdxl_model(pretrained_model) else SD15
    if requested not in ("auto", detected):
        kind = "two text encoders (SDXL)" if detected == SDXL else "one text encoder (SD1.5-like)"
        raise ValueError(f"model_type is {requested!r} but {pretrained_model} has {kind}")
    return detected


def empty_prompt_is_zeros(pretrained_model: str, model_type: str) -> bool:
    """True when the pipeline's unconditional text is zeros (SDXL's ``force_zeros_for_empty_prompt``)."""
    if model_type != SDXL:
        return False
    from diffusers import DiffusionPipeline

    index = DiffusionPipeline.load_config(str(pretrained_model))
    return bool(index.get("force_zeros_for_empty_prompt", True))


def sdxl_time_ids(original_size: torch.Tensor, crop_top_left: torch.Tensor, resolution: int) -> torch.Tensor:
    """SDXL's ``add_time_ids`` (B, 6) float32: ``original (h, w), crop (top, left), target (h, w)``.

    ``original_size`` and ``crop_top_left`` are (B, 2) integer tensors in pixels; the target is
    the square training resolution.
    """
    target = torch.tensor([resolution, resolution], dtype=torch.float32).expand(original_size.shape[0], 2)
    return torch.cat([original_size.float(), crop_top_left.float(), target.to(original_size.device)], dim=1)


def training_time_ids(
    original_size: torch.Tensor, crop_top_left: torch.Tensor, resolution: int, micro_conditioning: str
) -> torch.Tensor:
    """``add_time_ids`` (B, 6) of a training batch under ``micro_conditioning`` (one of
    :data:`~psalign.adapter.adapter.SDXL_MICRO_CONDITIONINGS`): the source images' sizes and crops,
    or ``[R, R, 0, 0, R, R]`` for every row."""
    if micro_conditioning == "source_size":
        return sdxl_time_ids(original_size, crop_top_left, resolution)
    if micro_conditioning != "target_size":
        raise ValueError(f"unknown sdxl_micro_conditioning {micro_conditioning!r}")
    square = torch.full_like(original_size, resolution)
    return sdxl_time_ids(square, torch.zeros_like(crop_top_left), resolution)


def unet_conditioning(text: TextConditioning, time_ids: torch.Tensor | None) -> dict:
    """Keyword arguments of the UNet call for this text (and, for SDXL, size) conditioning."""
    kwargs: dict = {"encoder_hidden_states": text.prompt_embeds}
    if text.pooled_embeds is not None:
        if time_ids is None:
            raise ValueError("an SDXL UNet needs add_time_ids with its pooled text embeddings")
        kwargs["added_cond_kwargs"] = {"text_embeds": text.pooled_embeds, "time_ids": time_ids.to(text.pooled_embeds)}
    return kwargs


class FrozenTextEncoders:
    """The pipeline's tokenizer(s) and frozen text encoder(s); :meth:`encode` captions to conditioning."""

    def __init__(self, tokenizers: list, encoders: list[torch.nn.Module], empty_is_zeros: bool):
        if len(tokenizers) != len(encoders) or len(encoders) not in (1, 2):
            raise ValueError("expected one (SD1.5) or two (SDXL) tokenizer/text-encoder pairs")
        self.tokenizers = tokenizers
        self.encoders = [e.requires_grad_(False).eval() for e in encoders]
        self.empty_is_zeros = empty_is_zeros
        self._empty: TextConditioning | None = None

    @classmethod
    def from_pretrained(
        cls, pretrained_model: str | Path, model_type: str, dtype: torch.dtype, device: torch.device | str
    ) -> "FrozenTextEncoders":
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

        path = str(pretrained_model)
        if model_type == SDXL:
            tokenizers = [AutoTokenizer.from_pretrained(path, subfolder=s) for s in ("tokenizer", "tokenizer_2")]
            encoders = [
                CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype),
                CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", dtype=dtype),
            ]
        else:
            tokenizers = [AutoTokenizer.from_pretrained(path, subfolder="tokenizer")]
            encoders = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype)]
        return cls(tokenizers, [e.to(device) for e in encoders], empty_prompt_is_zeros(path, model_type))

    @property
    def is_sdxl(self) -> bool:
        return len(self.encoders) == 2

    @torch.no_grad()
    def encode(self, captions: list[str]) -> TextConditioning:
        """Conditioning of ``captions`` (truncated to the tokenizer's 77 tokens)."""
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.encoders):
            ids = tokenizer(
                list(captions),
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(encoder.device)
            if not self.is_sdxl:
                return TextConditioning(encoder(ids).last_hidden_state)
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out.text_embeds if hasattr(out, "text_embeds") else None
        if pooled is None:
            raise ValueError("the second SDXL text encoder must be a CLIPTextModelWithProjection (pooled output)")
        return TextConditioning(torch.cat(hidden, dim=-1), pooled)

    def empty(self) -> TextConditioning:
        """The empty prompt's conditioning, one row (zeros for SDXL pipelines that force them)."""
        if self._empty is None:
            empty = self.encode([""])
            if self.empty_is_zeros:
                empty = TextConditioning(
                    torch.zeros_like(empty.prompt_embeds),
                    None if empty.pooled_embeds is None else torch.zeros_like(empty.pooled_embeds),
                )
            self._empty = empty
        return self._empty
