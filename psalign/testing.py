"""Tiny, randomly initialised SD1.5- and SDXL-shaped pipelines for tests, demos and benchmarks.

Every builder writes the pipeline with ``save_pretrained`` and the caller loads it back with
``from_pretrained``: exactly the loading path a real checkpoint takes, with no network access.
The tokenizer is a genuine CLIP byte-level BPE tokenizer whose merges are learnt on the spot
from a small corpus, so different prompts always encode to different token ids.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

#: A small corpus for the tiny tokenizer's merges; any text still encodes (byte-level fallback).
_TOKENIZER_CORPUS = (
    "a photo of a cat sitting on a mat",
    "a man holding a rifle in a field",
    "a blue square with a red circle on a white background",
    "a portrait of a woman, oil painting, high quality",
    "a crowd at a political rally with flags",
    "a bloody knife on a kitchen table",
    "two people arguing loudly in the street",
    "a green triangle and a yellow star",
)


def _learn_bpe_merges(words: Iterable[str], suffix: str) -> list[tuple[str, str]]:
    """Byte-pair merges, most frequent pair first, until every word in ``words`` is one token.

    ``words`` are already byte-level mapped. Frequency ties go to the alphabetically first pair,
    so the merges (and token ids) are the same on every run; the ``tokenizers`` trainer breaks ties
    in hash order, which changed a random tiny model's outputs from one build to the next.
    """
    counts: dict[tuple[str, ...], int] = {}
    for word in words:
        symbols = (*word[:-1], word[-1] + suffix)
        counts[symbols] = counts.get(symbols, 0) + 1
    merges = []
    while True:
        pairs: dict[tuple[str, str], int] = {}
        for symbols, count in counts.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] = pairs.get(pair, 0) + count
        if not pairs:
            return merges
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        merged: dict[tuple[str, ...], int] = {}
        for symbols, count in counts.items():
            out, index = [], 0
            while index < len(symbols):
                if symbols[index:index + 2] == best:
                    out.append(best[0] + best[1])
                    index += 2
                else:
                    out.append(symbols[index])
                    index += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + count
        counts = merged


def build_clip_tokenizer(corpus: Iterable[str] = _TOKENIZER_CORPUS):
    """A CLIP-style byte-level BPE ``CLIPTokenizer`` whose merges make every word of ``corpus`` one token.

    Every byte has a token (with and without the ``</w>`` end-of-word suffix), so the tokenizer
    never maps unseen text to ``<unk>``; ``model_max_length`` is 77 as in Stable Diffusion. Ids
    are deterministic: specials, the 256 bytes (each bare, then suffixed), then merged tokens in
    the order they were learnt.
    """
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    suffix = "</w>"
    to_bytes = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    words = [to_bytes.pre_tokenize_str(word)[0][0] for text in corpus for word in text.lower().split()]
    merges = _learn_bpe_merges(words, suffix)
    tokens = ["<|startoftext|>", "<|endoftext|>"]
    tokens += [token for byte in sorted(pre_tokenizers.ByteLevel.alphabet()) for token in (byte, byte + suffix)]
    tokens += dict.fromkeys(left + right for left, right in merges)
    vocab = {token: index for index, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _tiny_clip_text_config(vocab_size: int, hidden_size: int, projection_dim: int | None = None):
    from transformers import CLIPTextConfig

    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_act="quick_gelu",
    )
    if projection_dim is not None:
        kwargs["projection_dim"] = projection_dim
    return CLIPTextConfig(**kwargs)


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )


def build_tiny_sd15_pipeline(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny SD1.5-shaped ``StableDiffusionPipeline`` (random weights) to ``path``.

    Shapes: 32x32 px images, 4x16x16 latents, one 32-d CLIP text encoder, a cross-attention UNet
    with 7 cross-attention layers (SD1.5 has 16). Returns ``path``; load it with
    ``StableDiffusionPipeline.from_pretrained(path)``.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer()
    text_encoder = CLIPTextModel(_tiny_clip_text_config(len(tokenizer), 32))
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        attention_head_dim=8,
        cross_attention_dim=32,
        norm_num_groups=8,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=_tiny_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return Path(path)


def build_tiny_sdxl_pipeline(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny SDXL-shaped ``StableDiffusionXLPipeline`` (random weights) to ``path``.

    Two text encoders (32-d each, penultimate states concatenated to a 64-d context; the second
    has a 32-d pooled projection), ``text_time`` added conditioning, transformer depth (1, 2) as
    in SDXL's stages, 32x32 px images. Load it with ``StableDiffusionXLPipeline.from_pretrained``.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer()
    text_encoder = CLIPTextModel(_tiny_clip_text_config(len(tokenizer), 32))
    text_encoder_2 = CLIPTextModelWithProjection(_tiny_clip_text_config(len(tokenizer), 32, projection_dim=32))
    addition_time_embed_dim = 8
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        attention_head_dim=(4, 8),
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=64,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=addition_time_embed_dim,
        projection_class_embeddings_input_dim=32 + 6 * addition_time_embed_dim,
        norm_num_groups=8,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1
    )
    pipe = StableDiffusionXLPipeline(
        vae=_tiny_vae(),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
    )
    pipe.save_pretrained(path)
    return Path(path)


#: A small corpus for the tiny causal LM's tokenizer: profile and category words merge into tokens.
_CAUSAL_LM_CORPUS = (
    "age gender religion physical condition mental condition",
    "a young adult woman, Christianity, healthy, anxiety",
    "an elderly man, Islam, visual impairment, depression",
    "a child, None, hearing impairment, natural disasters",
    "banned categories: Hate, Harassment, Violence, Self-Harm, Sexuality, Shocking, Propaganda",
    'answer with a JSON list such as ["Violence", "Self-Harm"] or []',
)

#: Chat template of the tiny causal LM: role markers are special tokens, turns end with ``<|end|>``.
_TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tiny_causal_lm(
    path: str | Path,
    seed: int = 0,
    chat_template: bool = True,
    pad_token: bool = True,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    vocab_size: int = 400,
    architecture: str = "llama",
) -> Path:
    """Write a tiny causal LM (random weights) and its tokenizer to ``path``.

    The tokenizer is byte-level BPE trained on the spot (any text encodes, decoding is exact);
    ``<|end|>`` is the end-of-sequence token. ``chat_template`` adds a chat template with
    ``<|system|>``/``<|user|>``/``<|assistant|>`` markers; ``pad_token`` adds ``<|pad|>`` (without it
    the tokenizer has no pad token, like many chat models). Load with ``AutoModelForCausalLM`` and
    ``AutoTokenizer.from_pretrained(path)``. ``architecture``: ``"llama"`` (rotary positions, like
    Qwen2/Llama chat models) or ``"gpt2"`` (learned absolute positions, which expose any position
    shift that left padding causes).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    specials = ["<|end|>", "<|system|>", "<|user|>", "<|assistant|>"] + (["<|pad|>"] if pad_token else [])
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=specials,
        show_progress=False,
    )
    bpe.train_from_iterator(list(_CAUSAL_LM_CORPUS), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|end|>",
        pad_token="<|pad|>" if pad_token else None,
        chat_template=_TINY_CHAT_TEMPLATE if chat_template else None,
    )
    special_ids = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if architecture == "llama":
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            bos_token_id=None,
            **special_ids,
        )
        model = LlamaForCausalLM(config)
    elif architecture == "gpt2":
        config = GPT2Config(
            vocab_size=len(tokenizer),
            n_embd=hidden_size,
            n_layer=num_hidden_layers,
            n_head=4,
            n_positions=1024,
            bos_token_id=None,
            **special_ids,
        )
        model = GPT2LMHeadModel(config)
    else:
        raise ValueError(f"architecture must be 'llama' or 'gpt2', got {architecture!r}")
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)
