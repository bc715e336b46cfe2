"""The toy text-to-image model: SD1.5's architecture at toy size, saved as a stock pipeline folder.

======================  ======================================================================
tokenizer               CLIP byte-level BPE trained on the toy captions (every word one token),
                        ``model_max_length`` :data:`MAX_TOKENS`
text encoder            ``CLIPTextModel``: 2 layers, width :data:`TEXT_WIDTH`
VAE                     ``AutoencoderKL``: 32x32x3 px <-> 4x8x8 latents (3 levels)
UNet                    ``UNet2DConditionModel``: 8x8 latents, 2 cross-attention levels + a
                        cross-attention mid block (7 cross-attention layers)
scheduler               DDPM noise schedule (cosine) for training; the saved pipeline samples
                        with DDIM, ``leading`` spacing: the first step is t=951, not t=999 where
                        the cosine schedule has no signal left and an epsilon model's clean-image
                        estimate blows up
======================  ======================================================================

Everything is built from these configs with random weights and trained by
:mod:`psalign.toy.build`; :func:`save_pipeline` writes a normal ``StableDiffusionPipeline`` folder
that ``StableDiffusionPipeline.from_pretrained`` (and ``infer.py --pretrained_model``) loads.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .world import vocabulary_corpus

#: Tokens per caption (the longest toy caption has 8 words, plus start and end tokens).
MAX_TOKENS = 16
#: Width of the text encoder = the UNet's cross-attention dimension.
TEXT_WIDTH = 64
LATENT_CHANNELS = 4
#: Denoising steps the toy model samples with by default.
DEFAULT_STEPS = 20
#: Classifier-free guidance scale the toy model samples with by default.
DEFAULT_GUIDANCE = 3.0


def build_tokenizer():
    """A ``CLIPTokenizer`` whose merges make every word of the toy vocabulary a single token."""
    from psalign.testing import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(vocabulary_corpus())
    tokenizer.model_max_length = MAX_TOKENS
    return tokenizer


def build_text_encoder(vocab_size: int):
    """A randomly initialised 2-layer ``CLIPTextModel`` of width :data:`TEXT_WIDTH`."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_WIDTH,
        intermediate_size=2 * TEXT_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_act="quick_gelu",
    )
    return CLIPTextModel(config)


def build_vae():
    """A randomly initialised ``AutoencoderKL``: (B, 3, 32, 32) in [-1, 1] <-> (B, 4, 8, 8)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=16,
        sample_size=32,
    )


def build_unet():
    """A randomly initialised cross-attention ``UNet2DConditionModel`` on 4x8x8 latents."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(48, 96),
        layers_per_block=1,
        attention_head_dim=16,
        cross_attention_dim=TEXT_WIDTH,
        norm_num_groups=16,
    )


def scheduler_config() -> dict:
    """The noise schedule shared by training (DDPM) and sampling (DDIM)."""
    return dict(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="epsilon",
        clip_sample=False,
        timestep_spacing="leading",
        steps_offset=1,
    )


def build_training_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**scheduler_config())


def save_pipeline(path: str | Path, vae, text_encoder, tokenizer, unet) -> Path:
    """Write the components as a ``StableDiffusionPipeline`` folder (DDIM sampler, no safety checker)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**scheduler_config(), set_alpha_to_one=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return Path(path)


def load_pipeline(path: str | Path, device: str = "cpu"):
    """The saved toy pipeline in fp32 with its progress bar off."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        str(path), safety_checker=None, requires_safety_checker=False
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixels_to_tensor(images) -> torch.Tensor:
    """(N, H, W, 3) uint8 array -> float32 (N, 3, H, W) in [-1, 1]."""
    array = torch.as_tensor(images)
    return array.permute(0, 3, 1, 2).float() / 127.5 - 1.0
