"""The PSA user adapter: user projection, per-layer user key/value projections, attach/condition."""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .processor import UserCrossAttnProcessor
from .text_edit import UserTextEdit, text_edit_heads

#: Version of the saved adapter format (``psa_config.json`` + ``psa_adapter.safetensors``). Version 2
#: added the user text edit; an adapter without one is still written as version 1.
FORMAT_VERSION = 2
FORMAT_NAME = "psalign-psa-adapter"
#: SDXL ``add_time_ids`` (original size, crop top-left, target size) an adapter was trained with:
#: ``target_size`` is ``[R, R, 0, 0, R, R]`` at resolution R (what diffusers' SDXL pipelines pass by
#: default at inference, and what the published PSA code trains with); ``source_size`` is each
#: training image's own size before resizing and its crop offset.
SDXL_MICRO_CONDITIONINGS = ("target_size", "source_size")


@dataclass
class PSAAdapterConfig:
    """Everything needed to rebuild an adapter and to check it against a UNet.

    ``layer_names``: processor names (``unet.attn_processors`` keys) of the cross-attention layers,
    in ``unet.attn_processors`` order; ``layer_dims``: each layer's width before its output
    projection (heads x head_dim).
    """

    user_embed_dim: int
    cross_attention_dim: int
    layer_names: list[str]
    layer_dims: list[int]
    num_user_tokens: int = 1
    sdxl_micro_conditioning: str | None = None
    """One of :data:`SDXL_MICRO_CONDITIONINGS` for an SDXL adapter; None for SD1.5 or when not recorded."""
    text_edit_layers: int = 0
    """Blocks of the user text edit (:mod:`psalign.adapter.text_edit`); 0: none (the published architecture)."""
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The saved form, with the oldest format version that can read it."""
        return {**asdict(self), "format_version": FORMAT_VERSION if self.text_edit_layers else 1}

    @classmethod
    def from_dict(cls, data: dict) -> "PSAAdapterConfig":
        if data.get("format") != FORMAT_NAME:
            raise ValueError(f"not a psalign PSA adapter config (format={data.get('format')!r})")
        if data.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(
                f"adapter format version {data['format_version']} is newer than this psalign supports ({FORMAT_VERSION})"
            )
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def is_sdxl_unet(unet: nn.Module) -> bool:
    """Whether ``unet`` takes SDXL's size conditioning (``addition_embed_type`` ``text_time``)."""
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


def micro_conditioning_warning(micro_conditioning: str | None, resolution: int | None,
                               size: tuple[int, int]) -> str | None:
    """Why the SDXL ``add_time_ids`` that trained a set of weights differ from what the pipeline
    passes when drawing at ``size`` (H, W) px, ``[H, W, 0, 0, H, W]``; None when they agree or
    nothing was recorded. ``micro_conditioning``: one of :data:`SDXL_MICRO_CONDITIONINGS`;
    ``resolution``: the training resolution R in px."""
    if micro_conditioning == "source_size":
        return ("these weights were trained with each source image's size and crop in SDXL's add_time_ids "
                "(sdxl_micro_conditioning: source_size), but the pipeline conditions on [H, W, 0, 0, H, W]; "
                "retrain with sdxl_micro_conditioning: target_size to match")
    if micro_conditioning == "target_size" and resolution is not None and tuple(size) != (resolution, resolution):
        height, width = size
        return (f"these weights were trained at {resolution} px with add_time_ids [{resolution}, {resolution}, 0, 0, "
                f"{resolution}, {resolution}], but this run draws at {height}x{width} px, where the pipeline passes "
                f"[{height}, {width}, 0, 0, {height}, {width}]; draw at --height {resolution} --width {resolution} "
                "to match")
    return None


class UserProjection(nn.Module):
    """User embedding (B, D) -> N user tokens (B, N, d_c): standardise, ``Linear(D, N*d_c)``, ``LayerNorm(d_c)``.

    Standardisation uses the buffers ``embed_mean``/``embed_std`` (identity until
    :meth:`set_embedding_stats` is called); LLM user embeddings are dominated by a few huge
    dimensions (cosine similarity ~0.995 between users), and standardising removes that.
    The **null user** (classifier-free guidance's unconditional branch, and user dropout in
    training) is the projection of a zero vector in standardised space: ``LayerNorm(proj.bias)``.
    """

    def __init__(self, user_embed_dim: int, num_tokens: int, cross_attention_dim: int):
        super().__init__()
        self.num_tokens = num_tokens
        self.cross_attention_dim = cross_attention_dim
        self.proj = nn.Linear(user_embed_dim, num_tokens * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)
        self.register_buffer("embed_mean", torch.zeros(user_embed_dim))
        self.register_buffer("embed_std", torch.ones(user_embed_dim))

    @torch.no_grad()
    def set_embedding_stats(self, mean: torch.Tensor, std: torch.Tensor, min_std: float = 1e-6) -> None:
        """Set the population statistics used to standardise embeddings (dims with std < ``min_std`` are left unscaled)."""
        mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        std = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        if mean.shape != self.embed_mean.shape or std.shape != self.embed_std.shape:
            raise ValueError(
                f"embedding stats have shapes {tuple(mean.shape)}/{tuple(std.shape)}, "
                f"expected ({self.embed_mean.numel()},) for this adapter's user_embed_dim"
            )
        self.embed_mean.copy_(mean)
        self.embed_std.copy_(torch.where(std < min_std, torch.ones_like(std), std))

    def forward(self, user_embeds: torch.Tensor, null_user: torch.Tensor | None = None) -> torch.Tensor:
        """``user_embeds``: (B, D); ``null_user``: optional bool (B,), True rows become the null user."""
        expected = self.embed_mean.numel()
        if user_embeds.ndim != 2 or user_embeds.shape[1] != expected:
            raise ValueError(f"user embeddings must have shape (batch, {expected}), got {tuple(user_embeds.shape)}")
        x = (user_embeds.to(self.proj.weight.dtype) - self.embed_mean) / self.embed_std
        if null_user is not None:
            x = x.masked_fill(null_user.to(device=x.device, dtype=torch.bool)[:, None], 0.0)
        tokens = self.proj(x).view(x.shape[0], self.num_tokens, self.cross_attention_dim)
        return self.norm(tokens)


@dataclass
class UserConditioning:
    """Per-layer user tensors for one batch, computed once per user set (not per denoising step).

    Fast path (one token): ``output_offsets[l]`` (B, C_out) = ``W_o^l (scale W_v^l u)`` / rescale.
    General path: ``user_keys[l]``, ``user_values[l]`` (B, N, inner_dim) and ``scale``.
    With a text edit: ``user_tokens`` (B, N, d_c), which the edit reads beside the text. Only
    ``user_tokens`` and ``edited_text`` (B, L, d_c) when :meth:`PSAAdapter.forward` was given the text.
    """

    batch_size: int
    scale: float
    output_offsets: list[torch.Tensor] | None = None
    user_keys: list[torch.Tensor] | None = None
    user_values: list[torch.Tensor] | None = None
    user_tokens: torch.Tensor | None = None
    edited_text: torch.Tensor | None = None

    def check_batch(self, unet_batch: int) -> None:
        if unet_batch != self.batch_size:
            raise ValueError(
                f"the user conditioning has {self.batch_size} rows but the UNet batch has {unet_batch}; "
                "build it for the call's batch (PSAAdapter.set_users: classifier_free_guidance and "
                "num_images_per_prompt must match the pipeline call)"
            )


def cross_attention_layers(unet: nn.Module) -> dict[str, nn.Module]:
    """Processor name -> ``Attention`` module of every cross-attention layer, in ``unet.attn_processors`` order."""
    layers = {}
    for name in unet.attn_processors:
        module = unet.get_submodule(name.removesuffix(".processor"))
        if getattr(module, "is_cross_attention", False):
            layers[name] = module
    return layers


def _linear_no_bias(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The linear part of an affine layer applied to ``x`` (the output projection, maybe LoRA-wrapped)."""
    if type(module) is nn.Linear:
        return F.linear(x.to(module.weight.dtype), module.weight)
    x = x.to(next(module.parameters()).dtype)
    return module(x) - module(torch.zeros_like(x))


def describe_unet(cross_attention_dim: int, num_layers: int) -> str:
    """A human label for error messages: ``cross_attention_dim 768, 16 cross-attention layers (SD1.5-like)``."""
    family = {768: " (SD1.5-like)", 1024: " (SD2-like)", 2048: " (SDXL-like)"}.get(cross_attention_dim, "")
    return f"cross_attention_dim {cross_attention_dim}, {num_layers} cross-attention layers{family}"


class PSAAdapter(nn.Module):
    """Personalized Safety Alignment adapter for a diffusers ``UNet2DConditionModel``.

    Parameters: ``user_proj`` (:class:`UserProjection`), ``to_v[l]`` = ``Linear(d_c, h_l)`` per
    cross-attention layer (zero-initialised, so a fresh adapter leaves the UNet output unchanged)
    and, only for N > 1 user tokens, ``to_k[l]`` (with one token the key cannot matter); with
    ``text_edit_layers`` > 0, ``text_edit`` (:class:`UserTextEdit`, zero-initialised output), which
    rewrites the text tokens every cross-attention layer sees.

    Typical use with a stock pipeline::

        adapter = PSAAdapter.from_pretrained("adapter_dir").attach(pipe.unet)
        with adapter.users(embeds, scale=1.0, classifier_free_guidance=True):
            images = pipe(prompts, guidance_scale=7.5).images

    In training, ``cond = adapter(embeds, null_user)`` (through the DDP wrapper), then
    ``adapter.activate(cond)`` before the UNet call and ``with adapter.disabled():`` for the reference.
    """

    def __init__(self, config: PSAAdapterConfig):
        super().__init__()
        if config.num_user_tokens < 1:
            raise ValueError("num_user_tokens must be >= 1")
        if len(config.layer_names) != len(config.layer_dims):
            raise ValueError("layer_names and layer_dims must have the same length")
        self.config = config
        d_c = config.cross_attention_dim
        self.user_proj = UserProjection(config.user_embed_dim, config.num_user_tokens, d_c)
        self.to_v = nn.ModuleList(nn.Linear(d_c, h, bias=False) for h in config.layer_dims)
        for layer in self.to_v:
            nn.init.zeros_(layer.weight)
        self.to_k = (
            nn.ModuleList(nn.Linear(d_c, h, bias=False) for h in config.layer_dims)
            if config.num_user_tokens > 1
            else None
        )
        self.text_edit = (
            UserTextEdit(d_c, config.text_edit_layers, text_edit_heads(d_c)) if config.text_edit_layers > 0 else None
        )
        #: One token uses the exact constant-vector fast path; False forces real attention (tests, benchmarks).
        self.fast_path = True
        self._attention_layers: list[nn.Module] = []
        self._text_edit_hook: torch.utils.hooks.RemovableHandle | None = None
        self._active: UserConditioning | None = None
        self._enabled = True

    # ------------------------------------------------------------------ construction
    @classmethod
    def for_unet(
        cls, unet: nn.Module, user_embed_dim: int, num_user_tokens: int = 1, sdxl_micro_conditioning: str | None = None,
        text_edit_layers: int = 0,
    ) -> "PSAAdapter":
        """A fresh adapter shaped for ``unet``: ``user_embed_dim`` comes from the data (3584 Qwen2.5-7B, 384 MiniLM).
        ``sdxl_micro_conditioning`` is recorded for an SDXL UNet only; ``text_edit_layers`` > 0 adds a text edit."""
        layers = cross_attention_layers(unet)
        if not layers:
            raise ValueError("this UNet has no cross-attention layers to adapt")
        if sdxl_micro_conditioning not in (None, *SDXL_MICRO_CONDITIONINGS):
            raise ValueError(f"sdxl_micro_conditioning must be one of {SDXL_MICRO_CONDITIONINGS}, "
                             f"got {sdxl_micro_conditioning!r}")
        config = PSAAdapterConfig(
            user_embed_dim=int(user_embed_dim),
            cross_attention_dim=int(unet.config.cross_attention_dim),
            layer_names=list(layers),
            layer_dims=[int(m.to_out[0].in_features) for m in layers.values()],
            num_user_tokens=int(num_user_tokens),
            sdxl_micro_conditioning=sdxl_micro_conditioning if is_sdxl_unet(unet) else None,
            text_edit_layers=int(text_edit_layers),
        )
        adapter = cls(config)
        if adapter.to_k is not None:  # start the user keys from the layers' text keys (same d_c -> h_l shape)
            with torch.no_grad():
                for to_k, module in zip(adapter.to_k, layers.values()):
                    to_k.weight.copy_(module.to_k.weight.float())
        return adapter

    @classmethod
    def from_pretrained(cls, path, subfolder: str | None = None, revision: str | None = None) -> "PSAAdapter":
        """Load an adapter saved with :meth:`save_pretrained` from a folder, or from a hub repo id
        (``subfolder``, ``revision``: see :mod:`psalign.adapter.hub`)."""
        from .hub import resolve_adapter_path
        from .serialization import load_adapter_dir

        return load_adapter_dir(resolve_adapter_path(path, subfolder, revision))

    def push_to_hub(self, repo_id: str, **kwargs):
        """Upload this adapter, a model card and its embedding statistics to hub repository
        ``repo_id`` (keyword arguments: :func:`psalign.adapter.hub.push_adapter_to_hub`)."""
        from .hub import push_adapter_to_hub

        return push_adapter_to_hub(self, repo_id, **kwargs)

    def save_pretrained(self, path, extra: dict | None = None) -> None:
        """Write ``psa_config.json`` and ``psa_adapter.safetensors`` to the folder ``path`` (atomically)."""
        from .serialization import save_adapter_dir

        save_adapter_dir(self, path, extra=extra)

    # ------------------------------------------------------------------ attaching
    def check_unet(self, unet: nn.Module) -> dict[str, nn.Module]:
        """Return the UNet's cross-attention layers, or raise a clear error if they do not match this adapter."""
        layers = cross_attention_layers(unet)
        cfg = self.config
        ours = describe_unet(cfg.cross_attention_dim, len(cfg.layer_names))
        theirs = describe_unet(int(unet.config.cross_attention_dim), len(layers))
        if ours != theirs:
            raise ValueError(f"this PSA adapter was made for a UNet with {ours}; this UNet has {theirs}")
        for name, dim, (unet_name, module) in zip(cfg.layer_names, cfg.layer_dims, layers.items()):
            if name != unet_name:
                raise ValueError(f"adapter layer {name!r} does not match the UNet's cross-attention layer {unet_name!r}")
            if int(module.to_out[0].in_features) != dim:
                raise ValueError(
                    f"adapter layer {name!r} has width {dim}, the UNet's layer has {module.to_out[0].in_features}"
                )
        return layers

    def attach(self, unet: nn.Module) -> "PSAAdapter":
        """Install a :class:`UserCrossAttnProcessor` on every cross-attention layer of ``unet``; returns self.

        Self-attention processors are left untouched. With a text edit, a forward pre-hook on the
        UNet edits ``encoder_hidden_states`` once per call (every cross-attention layer reads it).
        The adapter's weights stay outside the UNet, so move it with ``adapter.to(device)`` (keep
        it in fp32 for training).
        """
        layers = self.check_unet(unet)
        if self.text_edit is not None and getattr(unet, "encoder_hid_proj", None) is not None:
            raise ValueError("this UNet projects the text before its cross-attention layers (encoder_hid_proj); "
                             "a PSA text edit needs one whose layers read the text encoder's output directly")
        processors = dict(unet.attn_processors)
        for index, name in enumerate(layers):
            base = processors[name]
            if isinstance(base, UserCrossAttnProcessor):
                raise ValueError(f"{name} already has a PSA adapter attached; detach it first")
            processors[name] = UserCrossAttnProcessor(self, index, base)
        unet.set_attn_processor(processors)
        self._attention_layers = list(layers.values())
        if self.text_edit is not None:
            self._text_edit_hook = unet.register_forward_pre_hook(self._edit_unet_text, with_kwargs=True)
        return self

    def detach(self, unet: nn.Module) -> None:
        """Restore the processors that were in place before :meth:`attach`."""
        processors = {
            name: proc.base_processor if isinstance(proc, UserCrossAttnProcessor) else proc
            for name, proc in unet.attn_processors.items()
        }
        unet.set_attn_processor(processors)
        self._attention_layers = []
        self._active = None
        if self._text_edit_hook is not None:
            self._text_edit_hook.remove()
            self._text_edit_hook = None

    @property
    def attention_layers(self) -> list[nn.Module]:
        """The attached UNet's cross-attention modules, in :attr:`PSAAdapterConfig.layer_names` order."""
        if not self._attention_layers:
            raise RuntimeError("attach the adapter to a UNet (adapter.attach(unet)) first")
        return self._attention_layers

    # ------------------------------------------------------------------ conditioning
    @property
    def uses_fast_path(self) -> bool:
        return self.config.num_user_tokens == 1 and self.fast_path

    def forward(
        self, user_embeds: torch.Tensor, null_user: torch.Tensor | None = None, scale: float = 1.0,
        text: torch.Tensor | None = None,
    ) -> UserConditioning:
        """Per-layer user tensors for a batch of users (B, D); rows with ``null_user`` True get the null user.

        ``text`` (B, L, d_c), for an adapter with a text edit: return only that text edited for these
        users (``edited_text``, with ``user_tokens``), not the per-layer tensors. Computed in this call
        and nothing else, a DDP wrapper sees the edit's weights used and the additive branch unused.
        """
        if not self._attention_layers:
            raise RuntimeError("attach the adapter to a UNet (adapter.attach(unet)) before conditioning it")
        tokens = self.user_proj(user_embeds.to(self.user_proj.proj.weight.device), null_user)  # (B, N, d_c)
        conditioning = UserConditioning(batch_size=tokens.shape[0], scale=scale,
                                        user_tokens=tokens if self.text_edit is not None else None)
        if text is not None:
            if self.text_edit is None:
                raise ValueError("this adapter has no text edit to apply to the text")
            conditioning.edited_text = self.edit_text(text, conditioning)
            return conditioning
        if self.uses_fast_path:
            conditioning.output_offsets = []
            for to_v, attn in zip(self.to_v, self._attention_layers):
                offset = _linear_no_bias(attn.to_out[0], scale * to_v(tokens[:, 0]))
                conditioning.output_offsets.append(offset / attn.rescale_output_factor)
        else:
            to_k = self.to_k if self.to_k is not None else self.to_v  # N=1 general path: key is irrelevant
            conditioning.user_keys = [k(tokens) for k in to_k]
            conditioning.user_values = [v(tokens) for v in self.to_v]
        return conditioning

    def _edit_unet_text(self, unet: nn.Module, args: tuple, kwargs: dict):
        """UNet forward pre-hook: the call's ``encoder_hidden_states`` (keyword, or the third
        positional argument) edited for the active users; nothing when the adapter is off."""
        conditioning = self.active_conditioning()
        if conditioning is None:
            return None
        if kwargs.get("encoder_hidden_states") is not None:
            text = kwargs["encoder_hidden_states"]
            conditioning.check_batch(text.shape[0])
            return args, {**kwargs, "encoder_hidden_states": self.edit_text(text, conditioning)}
        if len(args) > 2 and args[2] is not None:
            conditioning.check_batch(args[2].shape[0])
            return (*args[:2], self.edit_text(args[2], conditioning), *args[3:]), kwargs
        return None

    def edit_text(self, text: torch.Tensor, conditioning: UserConditioning) -> torch.Tensor:
        """The text tokens (B, L, d_c) the cross-attention layers see under ``conditioning``: edited by
        the text edit (the edit times the user scale), or unchanged for an adapter without one."""
        if self.text_edit is None or conditioning.user_tokens is None:
            return text
        edited = self.text_edit(text, conditioning.user_tokens)
        return edited if conditioning.scale == 1.0 else text + conditioning.scale * (edited - text)

    def activate(self, conditioning: UserConditioning | None) -> None:
        """Make ``conditioning`` the one the attached processors use (None: no users set)."""
        self._active = conditioning

    def active_conditioning(self) -> UserConditioning | None:
        """What the processors use now: None when disabled; an error when enabled with no users set."""
        if not self._enabled:
            return None
        if self._active is None:
            raise RuntimeError(
                "the PSA adapter is attached but no users are set: call adapter.set_users(...) "
                "(or use `with adapter.users(...)`), or switch it off with `with adapter.disabled():`"
            )
        return self._active

    def pipeline_batch(
        self, user_embeds: torch.Tensor, classifier_free_guidance: bool, num_images_per_prompt: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows in a diffusers pipeline's UNet batch order: each user repeated ``num_images_per_prompt``
        times; with guidance, the unconditional half (null users) first, as pipelines concatenate it.
        Returns ``(embeds (B', D), null_user (B',))``."""
        embeds = torch.as_tensor(user_embeds, dtype=torch.float32)
        if embeds.ndim == 1:
            embeds = embeds[None]
        embeds = embeds.repeat_interleave(num_images_per_prompt, dim=0)
        null = torch.zeros(embeds.shape[0], dtype=torch.bool)
        if classifier_free_guidance:
            embeds = torch.cat([embeds, embeds])
            null = torch.cat([torch.ones_like(null), null])
        return embeds, null

    @torch.no_grad()
    def set_users(
        self,
        user_embeds: torch.Tensor,
        scale: float = 1.0,
        classifier_free_guidance: bool = True,
        num_images_per_prompt: int = 1,
    ) -> None:
        """Condition the next UNet calls on these users, one per prompt (B, D) or one for all (D,).

        ``classifier_free_guidance`` must say whether the pipeline call uses guidance
        (``guidance_scale > 1`` for SD/SDXL pipelines): the unconditional half gets the null user.
        """
        embeds, null = self.pipeline_batch(user_embeds, classifier_free_guidance, num_images_per_prompt)
        self.activate(self(embeds, null, scale=scale))

    @contextlib.contextmanager
    def users(self, user_embeds: torch.Tensor, **kwargs) -> Iterator["PSAAdapter"]:
        """``with adapter.users(embeds, scale=..., classifier_free_guidance=...):`` set users for the block only."""
        previous = self._active
        self.set_users(user_embeds, **kwargs)
        try:
            yield self
        finally:
            self._active = previous

    @contextlib.contextmanager
    def disabled(self) -> Iterator["PSAAdapter"]:
        """Switch the adapter off inside the block: the UNet behaves exactly as without it (DPO reference, base images)."""
        previous = self._enabled
        self._enabled = False
        try:
            yield self
        finally:
            self._enabled = previous

    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._enabled = bool(value)

    def set_embedding_stats(self, mean, std) -> None:
        """Standardise user embeddings with these population statistics (saved with the adapter)."""
        self.user_proj.set_embedding_stats(mean, std)
