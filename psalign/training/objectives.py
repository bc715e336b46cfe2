"""The loss of one micro-batch for each training objective (``--objective``).

Each function draws one noise and one timestep per pair from the global RNG (uniform timesteps,
or in proportion to ``timestep_weights``), runs the frozen reference passes first (adapter off,
no gradient; their memory is freed before the adapted pass's activations pile up), then the
adapted pass, and returns the objective's loss from :mod:`psalign.loss`:

* ``dpo`` (:func:`dpo_step_loss`): Diffusion-DPO on ``[chosen; rejected]``, the published loss
  (with ``chosen_weight``, the chosen-error anchor);
* ``safe_anchor`` (:func:`safe_anchor_step_loss`): at the chosen image's noisy latent, the
  adapted model (the pair's caption and user) regresses onto the frozen model's prediction for
  ``anchor_text``, the caption that drew the chosen image;
* ``dpo_safe_anchor`` (:func:`dpo_safe_anchor_step_loss`): both, on one noise and timestep per pair;
* ``dpo_chosen_target`` (:func:`dpo_chosen_target_step_loss`): Diffusion-DPO plus, at the rejected
  image's noisy latent, regression onto the prediction that denoises it to the chosen image
  (:func:`psalign.loss.chosen_target_loss`); it reuses the DPO passes, so it costs what ``dpo`` costs;
* ``kv_anchor`` (:func:`kv_anchor_step_loss`): for an adapter with a text edit, the keys and values
  every cross-attention layer computes from the edited caption regressed onto the frozen model's
  for ``anchor_text`` (:func:`psalign.loss.kv_anchor_loss`); no UNet pass at all, so a step costs
  a fraction of a DPO step.

``anchor_latents`` (:data:`ANCHOR_LATENTS`) says where the anchor term is taken: at the chosen
image's noisy latent only, or at the rejected image's too (same noise and timestep). For a banned
category the rejected latent shows the unsafe content, so the adapter learns to steer a trajectory
that has already started drawing it towards what the base model makes of the safe rewrite.

:data:`OBJECTIVES` names them for the trainer and the config (``--objective``): each
:class:`Objective` says whether it needs the caption that drew each chosen image and computes its
loss from one :class:`MicroBatch`. A new objective is one step function and one entry there.

Shapes: ``latents`` (2B, C, h, w) are ``[chosen; rejected]``; ``text`` and ``anchor_text`` have
B rows (after dropout), ``time_ids`` (B, 6) or None, ``user_embeds`` (B, D) and ``null_user``
(B,) bool (both None for trainable weights without a user, such as a LoRA).
``adapter_module`` is the (possibly DDP-wrapped) ``adapter``: calling it keeps gradients in sync.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from psalign.loss import (
    DPOLossOutput,
    LossOutput,
    chosen_target_loss,
    clean_target_prediction,
    diffusion_dpo_loss,
    dpo_chosen_target_loss,
    dpo_safe_anchor_loss,
    kv_anchor_loss,
    min_snr_weight,
    regression_target,
    safe_anchor_loss,
)

from .conditioning import TextConditioning, unet_conditioning
from .timesteps import sample_timesteps

if TYPE_CHECKING:
    from .config import TrainingConfig


#: ``anchor_latents`` values: the chosen image's noisy latent, or the chosen and the rejected image's.
ANCHOR_LATENTS = ("chosen", "both")


def _noisy(noise_scheduler, latents: torch.Tensor, timestep_weights: torch.Tensor | None, dtype: torch.dtype):
    """``(latents fp32, noise, timesteps, noisy latents)``: one noise and timestep per pair, shared by
    chosen and rejected."""
    pairs = latents.shape[0] // 2
    latents = latents.float().contiguous()
    noise = torch.randn(latents[:pairs].shape, device=latents.device).repeat(2, 1, 1, 1)
    timesteps = sample_timesteps(
        pairs, noise_scheduler.config.num_train_timesteps, timestep_weights, latents.device
    ).repeat(2)
    return latents, noise, timesteps, noise_scheduler.add_noise(latents, noise, timesteps).to(dtype)


def _kwargs(text: TextConditioning, time_ids: torch.Tensor | None, device, dtype, repeat: int) -> dict:
    return unet_conditioning(
        text.repeat(repeat).to(device, dtype), None if time_ids is None else time_ids.repeat(repeat, 1)
    )


def _activate(adapter_module, adapter, user_embeds, null_user, repeat: int) -> None:
    # The conditioning stays active after this call: gradient checkpointing recomputes the
    # adapted forward pass during the backward pass.
    users = () if user_embeds is None else (user_embeds.repeat(repeat, 1), null_user.repeat(repeat))
    adapter.activate(adapter_module(*users))


def _dpo_passes(
    unet: torch.nn.Module,
    adapter_module: torch.nn.Module,
    adapter,
    noise_scheduler,
    latents: torch.Tensor,
    text: TextConditioning,
    time_ids: torch.Tensor | None,
    user_embeds: torch.Tensor | None,
    null_user: torch.Tensor | None,
    timestep_weights: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Diffusion-DPO passes over ``[chosen; rejected]``, frozen first: ``(latents fp32, timesteps,
    noisy latents, adapted prediction fp32, reference prediction fp32, regression target fp32)``."""
    latents, noise, timesteps, noisy = _noisy(noise_scheduler, latents, timestep_weights, unet.dtype)
    kwargs = _kwargs(text, time_ids, latents.device, unet.dtype, 2)
    with adapter.disabled(), torch.no_grad():
        reference_pred = unet(noisy, timesteps, **kwargs).sample
    _activate(adapter_module, adapter, user_embeds, null_user, 2)
    model_pred = unet(noisy, timesteps, **kwargs).sample
    target = regression_target(noise_scheduler, latents, noise, timesteps)
    return latents, timesteps, noisy, model_pred.float(), reference_pred.float(), target.float()


def dpo_step_loss(
    unet: torch.nn.Module,
    adapter_module: torch.nn.Module,
    adapter,
    noise_scheduler,
    latents: torch.Tensor,
    text: TextConditioning,
    time_ids: torch.Tensor | None,
    user_embeds: torch.Tensor | None,
    null_user: torch.Tensor | None,
    beta: float,
    chosen_weight: float = 0.0,
    timestep_weights: torch.Tensor | None = None,
) -> DPOLossOutput:
    """Diffusion-DPO loss of one micro-batch of B pairs (:func:`psalign.loss.dpo_loss`'s ``beta`` and ``chosen_weight``)."""
    *_, model_pred, reference_pred, target = _dpo_passes(unet, adapter_module, adapter, noise_scheduler, latents, text,
                                                         time_ids, user_embeds, null_user, timestep_weights)
    return diffusion_dpo_loss(model_pred, reference_pred, target, beta=beta, chosen_weight=chosen_weight)


def safe_anchor_step_loss(
    unet: torch.nn.Module,
    adapter_module: torch.nn.Module,
    adapter,
    noise_scheduler,
    latents: torch.Tensor,
    text: TextConditioning,
    anchor_text: TextConditioning,
    time_ids: torch.Tensor | None,
    user_embeds: torch.Tensor | None,
    null_user: torch.Tensor | None,
    timestep_weights: torch.Tensor | None = None,
    anchor_latents: str = "chosen",
) -> LossOutput:
    """:func:`psalign.loss.safe_anchor_loss` of one micro-batch: the chosen half of ``latents``
    is denoised (B frozen and B adapted samples), or with ``anchor_latents="both"`` all 2B."""
    latents, _, timesteps, noisy = _noisy(noise_scheduler, latents, timestep_weights, unet.dtype)
    repeat = _anchor_repeat(anchor_latents)
    rows = latents.shape[0] // 2 * repeat
    noisy, timesteps = noisy[:rows], timesteps[:rows]
    with adapter.disabled(), torch.no_grad():
        anchor_pred = unet(noisy, timesteps, **_kwargs(anchor_text, time_ids, latents.device, unet.dtype, repeat)).sample
    _activate(adapter_module, adapter, user_embeds, null_user, repeat)
    model_pred = unet(noisy, timesteps, **_kwargs(text, time_ids, latents.device, unet.dtype, repeat)).sample
    return safe_anchor_loss(model_pred.float(), anchor_pred.float())


def _anchor_repeat(anchor_latents: str) -> int:
    """How many halves of ``[chosen; rejected]`` the anchor term sees."""
    if anchor_latents not in ANCHOR_LATENTS:
        raise ValueError(f"anchor_latents must be one of {ANCHOR_LATENTS}, got {anchor_latents!r}")
    return 1 if anchor_latents == "chosen" else 2


def dpo_safe_anchor_step_loss(
    unet: torch.nn.Module,
    adapter_module: torch.nn.Module,
    adapter,
    noise_scheduler,
    latents: torch.Tensor,
    text: TextConditioning,
    anchor_text: TextConditioning,
    time_ids: torch.Tensor | None,
    user_embeds: torch.Tensor | None,
    null_user: torch.Tensor | None,
    beta: float,
    chosen_weight: float,
    anchor_weight: float,
    timestep_weights: torch.Tensor | None = None,
    anchor_latents: str = "chosen",
) -> LossOutput:
    """:func:`psalign.loss.dpo_safe_anchor_loss`: the DPO passes on ``[chosen; rejected]`` plus one
    frozen pass with ``anchor_text`` on the chosen latents (``anchor_latents="both"``: on all 2B);
    the anchor term reuses the adapted predictions of those latents."""
    latents, noise, timesteps, noisy = _noisy(noise_scheduler, latents, timestep_weights, unet.dtype)
    repeat = _anchor_repeat(anchor_latents)
    rows = latents.shape[0] // 2 * repeat
    kwargs = _kwargs(text, time_ids, latents.device, unet.dtype, 2)
    with adapter.disabled(), torch.no_grad():
        reference_pred = unet(noisy, timesteps, **kwargs).sample
        anchor_kwargs = _kwargs(anchor_text, time_ids, latents.device, unet.dtype, repeat)
        anchor_pred = unet(noisy[:rows], timesteps[:rows], **anchor_kwargs).sample
    _activate(adapter_module, adapter, user_embeds, null_user, 2)
    model_pred = unet(noisy, timesteps, **kwargs).sample.float()
    target = regression_target(noise_scheduler, latents, noise, timesteps)
    dpo = diffusion_dpo_loss(model_pred, reference_pred.float(), target.float(), beta=beta, chosen_weight=chosen_weight)
    anchor = safe_anchor_loss(model_pred[:rows], anchor_pred.float())
    return dpo_safe_anchor_loss(dpo, anchor, anchor_weight)


def dpo_chosen_target_step_loss(
    unet: torch.nn.Module,
    adapter_module: torch.nn.Module,
    adapter,
    noise_scheduler,
    latents: torch.Tensor,
    text: TextConditioning,
    time_ids: torch.Tensor | None,
    user_embeds: torch.Tensor | None,
    null_user: torch.Tensor | None,
    drop_text: torch.Tensor,
    beta: float,
    chosen_weight: float,
    target_weight: float,
    snr_gamma: float,
    timestep_weights: torch.Tensor | None = None,
) -> LossOutput:
    """:func:`psalign.loss.dpo_chosen_target_loss` of one micro-batch: the DPO passes on
    ``[chosen; rejected]``, and the adapted prediction at each rejected latent regressed onto the
    one that denoises it to its pair's chosen image (min-SNR-``snr_gamma`` weighted; null-user and
    text-dropped pairs (``drop_text``, (B,) bool) left out of that term). Same timesteps as the
    DPO term: uniform unless ``timestep_weights`` bias them."""
    latents, timesteps, noisy, model_pred, reference_pred, target = _dpo_passes(
        unet, adapter_module, adapter, noise_scheduler, latents, text, time_ids, user_embeds, null_user, timestep_weights)
    dpo = diffusion_dpo_loss(model_pred, reference_pred, target, beta=beta, chosen_weight=chosen_weight)
    pairs = latents.shape[0] // 2
    prediction_type = noise_scheduler.config.prediction_type
    alphas = noise_scheduler.alphas_cumprod.to(latents.device)[timesteps[pairs:]]
    towards_chosen = clean_target_prediction(noisy[pairs:], latents[:pairs], alphas, prediction_type)
    counted = ~drop_text if null_user is None else ~(drop_text | null_user)
    term = chosen_target_loss(model_pred[pairs:], towards_chosen, min_snr_weight(alphas, snr_gamma, prediction_type),
                              counted)
    return dpo_chosen_target_loss(dpo, term, target_weight)


def cross_attention_kv(layers: list[torch.nn.Module], text: torch.Tensor) -> list[torch.Tensor]:
    """Keys and values (B, L, h_l) that each cross-attention layer computes from the text tokens
    ``text`` (B, L, d_c), in the projections' dtype: ``[k_1, v_1, k_2, v_2, ...]``."""
    projected = []
    for attn in layers:
        context = attn.norm_encoder_hidden_states(text) if attn.norm_cross else text
        context = context.to(attn.to_k.weight.dtype)
        projected += [attn.to_k(context), attn.to_v(context)]
    return projected


def kv_anchor_step_loss(
    adapter_module: torch.nn.Module,
    adapter,
    text: TextConditioning,
    anchor_text: TextConditioning,
    user_embeds: torch.Tensor,
    null_user: torch.Tensor,
) -> LossOutput:
    """:func:`psalign.loss.kv_anchor_loss` of one micro-batch of B pairs: the caption (B rows, after
    dropout) edited for each pair's user against ``anchor_text`` (:func:`anchor_conditioning`),
    through the frozen key/value projections of the cross-attention layers the adapter is attached
    to. Needs an adapter with a text edit; the latents are not used."""
    if getattr(adapter, "text_edit", None) is None or user_embeds is None:
        raise ValueError("the kv_anchor objective trains a PSA adapter's text edit: set text_edit_layers > 0")
    # the edit runs inside the (possibly DDP-wrapped) adapter's forward, where DDP sees its weights used
    edited = adapter_module(user_embeds, null_user, text=text.prompt_embeds).edited_text
    layers = adapter.attention_layers
    with torch.no_grad():
        anchor = cross_attention_kv(layers, anchor_text.prompt_embeds)
    return kv_anchor_loss(cross_attention_kv(layers, edited), anchor)


def anchor_conditioning(
    chosen_text: TextConditioning,
    prompt_text: TextConditioning,
    empty_text: TextConditioning,
    null_user: torch.Tensor | None,
    drop_text: torch.Tensor,
) -> TextConditioning:
    """The anchor's caption per pair (B rows): the one that drew the chosen image; the pair's own
    caption for a null-user pair (the null user stands for no personalization, so the target is
    the base model's own behaviour); the empty prompt for a text-dropped pair."""
    anchor = chosen_text
    if null_user is not None:
        anchor = anchor.where(null_user, prompt_text)
    return anchor.where(drop_text, empty_text)


@dataclass
class MicroBatch:
    """What every objective's loss is computed from (shapes as in the module docstring);
    ``anchor_text`` is None unless the objective needs the chosen image's caption."""

    unet: torch.nn.Module
    adapter_module: torch.nn.Module
    adapter: torch.nn.Module
    noise_scheduler: object
    latents: torch.Tensor
    text: TextConditioning
    anchor_text: TextConditioning | None
    time_ids: torch.Tensor | None
    user_embeds: torch.Tensor | None
    null_user: torch.Tensor | None
    timestep_weights: torch.Tensor | None
    drop_text: torch.Tensor

    @property
    def models(self) -> tuple:
        return self.unet, self.adapter_module, self.adapter, self.noise_scheduler, self.latents


@dataclass(frozen=True)
class Objective:
    """One ``--objective``: its micro-batch loss, and whether it needs the caption that drew each
    pair's chosen image (``anchor_text``; Sage's ``_s``/``_u`` names or an expert pair's
    ``chosen_caption``)."""

    loss: Callable[[MicroBatch, "TrainingConfig"], LossOutput]
    needs_chosen_caption: bool = False
    #: False when some trainable weights get no gradient (the additive user branch under
    #: ``kv_anchor``); DDP must then look for unused parameters.
    trains_every_weight: bool = True


def _dpo(batch: MicroBatch, config: "TrainingConfig") -> DPOLossOutput:
    return dpo_step_loss(*batch.models, batch.text, batch.time_ids, batch.user_embeds, batch.null_user,
                         config.beta_dpo, config.chosen_loss_weight, batch.timestep_weights)


def _safe_anchor(batch: MicroBatch, config: "TrainingConfig") -> LossOutput:
    return safe_anchor_step_loss(*batch.models, batch.text, batch.anchor_text, batch.time_ids, batch.user_embeds,
                                 batch.null_user, batch.timestep_weights, config.anchor_latents)


def _dpo_safe_anchor(batch: MicroBatch, config: "TrainingConfig") -> LossOutput:
    return dpo_safe_anchor_step_loss(*batch.models, batch.text, batch.anchor_text, batch.time_ids,
                                     batch.user_embeds, batch.null_user, config.beta_dpo, config.chosen_loss_weight,
                                     config.anchor_loss_weight, batch.timestep_weights, config.anchor_latents)


def _dpo_chosen_target(batch: MicroBatch, config: "TrainingConfig") -> LossOutput:
    return dpo_chosen_target_step_loss(*batch.models, batch.text, batch.time_ids, batch.user_embeds, batch.null_user,
                                       batch.drop_text, config.beta_dpo, config.chosen_loss_weight,
                                       config.chosen_target_weight, config.snr_gamma, batch.timestep_weights)


def _kv_anchor(batch: MicroBatch, config: "TrainingConfig") -> LossOutput:
    return kv_anchor_step_loss(batch.adapter_module, batch.adapter, batch.text, batch.anchor_text, batch.user_embeds,
                               batch.null_user)


#: Every ``--objective`` by name; ``dpo`` (the published loss) first, the default.
OBJECTIVES: dict[str, Objective] = {
    "dpo": Objective(_dpo),
    "safe_anchor": Objective(_safe_anchor, needs_chosen_caption=True),
    "dpo_safe_anchor": Objective(_dpo_safe_anchor, needs_chosen_caption=True),
    "dpo_chosen_target": Objective(_dpo_chosen_target),
    "kv_anchor": Objective(_kv_anchor, needs_chosen_caption=True, trains_every_weight=False),
}
