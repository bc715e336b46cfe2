"""Training objectives of PSA adapters and SafetyDPO experts, as pure functions of tensors.

* :func:`dpo_loss` / :func:`diffusion_dpo_loss`: the published Diffusion-DPO loss, optionally
  anchored on the chosen images' denoising error;
* :func:`safe_anchor_loss`: regression onto the frozen base model's prediction for the caption
  that drew the chosen image (for a banned category: the safe rewrite);
* :func:`dpo_safe_anchor_loss`: the two added;
* :func:`chosen_target_loss`: at the *rejected* image's noisy latent, regression onto the prediction
  that denoises it to the *chosen* image (:func:`clean_target_prediction`), min-SNR weighted;
  :func:`dpo_chosen_target_loss` adds it to the Diffusion-DPO loss;
* :func:`kv_anchor_loss`: the cross-attention keys and values of the adapted model's (edited)
  caption regressed onto the frozen model's for the caption that drew the chosen image.

Every output has ``loss`` (the scalar to backpropagate) and ``logged`` (detached scalars by name).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


#: Names of :meth:`DPOLossOutput.stacked` values, as they are logged.
LOSS_METRICS = ("loss", "implicit_acc", "model_mse", "ref_mse", "reward_margin", "chosen_mse_gap")


@dataclass
class DPOLossOutput:
    """``loss`` is the scalar to backpropagate; the rest are detached scalars to log.

    ``implicit_accuracy``: fraction of pairs with ``-beta/2 * delta > 0`` (the model prefers the
    chosen image more than the reference does). ``model_mse`` / ``reference_mse``: mean squared
    error of the adapted / reference model over chosen and rejected. ``reward_margin``: mean of
    ``-beta/2 * delta``, the implicit reward of chosen minus that of rejected. ``chosen_mse_gap``:
    mean of ``m_w - r_w``, how much worse (> 0) than the reference the model denoises the chosen images.
    """

    loss: torch.Tensor
    implicit_accuracy: torch.Tensor
    model_mse: torch.Tensor
    reference_mse: torch.Tensor
    reward_margin: torch.Tensor
    chosen_mse_gap: torch.Tensor

    @property
    def logged(self) -> dict[str, torch.Tensor]:
        """The values to log, keyed by :data:`LOSS_METRICS`."""
        values = (self.loss.detach(), self.implicit_accuracy, self.model_mse, self.reference_mse,
                  self.reward_margin, self.chosen_mse_gap)
        return dict(zip(LOSS_METRICS, values))

    def stacked(self) -> torch.Tensor:
        return _stacked(self.logged)

    def metrics(self) -> dict[str, float]:
        return _as_floats(self.logged)


@dataclass
class LossOutput:
    """A training objective's result: ``loss`` to backpropagate and ``logged``, detached scalars
    by name (``loss`` first), in a fixed order for a given objective."""

    loss: torch.Tensor
    logged: dict[str, torch.Tensor]

    def stacked(self) -> torch.Tensor:
        return _stacked(self.logged)

    def metrics(self) -> dict[str, float]:
        return _as_floats(self.logged)


def _stacked(logged: dict[str, torch.Tensor]) -> torch.Tensor:
    """The logged values as one float tensor (no host sync), in ``logged``'s order."""
    return torch.stack([value.detach().float() for value in logged.values()])


def _as_floats(logged: dict[str, torch.Tensor]) -> dict[str, float]:
    return dict(zip(logged, _stacked(logged).tolist()))


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over every non-batch dimension of the squared error, in fp32: (B, C, H, W) -> (B,)."""
    error = (prediction.float() - target.float()) ** 2
    return error.reshape(error.shape[0], -1).mean(dim=1)


def dpo_loss(
    model_mse_chosen: torch.Tensor,
    model_mse_rejected: torch.Tensor,
    reference_mse_chosen: torch.Tensor,
    reference_mse_rejected: torch.Tensor,
    beta: float = 5000.0,
    chosen_weight: float = 0.0,
) -> DPOLossOutput:
    """Diffusion-DPO loss from per-sample errors (each (B,)), optionally anchored on the chosen images.

    ``delta = (m_w - m_l) - (r_w - r_l)``;
    ``loss = mean(-logsigmoid(-beta / 2 * delta)) + chosen_weight * mean(m_w - r_w)``.
    The DPO term only sees the difference between chosen and rejected, so it lets both errors
    rise together (the model "wins" by denoising the rejected image worse, not the chosen one
    better); ``chosen_weight > 0`` charges for the chosen error rising above the reference's.
    ``chosen_weight = 0`` is the published Diffusion-DPO loss, which equals ln 2 when the model
    and the reference agree (e.g. at step 0 with a zero-initialised adapter).
    """
    reference_mse_chosen = reference_mse_chosen.detach()
    delta = (model_mse_chosen - model_mse_rejected) - (reference_mse_chosen - reference_mse_rejected.detach())
    inside = -0.5 * beta * delta
    chosen_gap = model_mse_chosen - reference_mse_chosen
    loss = -F.logsigmoid(inside).mean()
    if chosen_weight:
        loss = loss + chosen_weight * chosen_gap.mean()
    with torch.no_grad():
        return DPOLossOutput(
            loss=loss,
            implicit_accuracy=(inside > 0).float().mean(),
            model_mse=0.5 * (model_mse_chosen + model_mse_rejected).mean(),
            reference_mse=0.5 * (reference_mse_chosen + reference_mse_rejected).mean(),
            reward_margin=inside.mean(),
            chosen_mse_gap=chosen_gap.mean(),
        )


def diffusion_dpo_loss(
    model_pred: torch.Tensor,
    reference_pred: torch.Tensor,
    target: torch.Tensor,
    beta: float = 5000.0,
    chosen_weight: float = 0.0,
) -> DPOLossOutput:
    """:func:`dpo_loss` for predictions stacked as ``[chosen; rejected]`` along the batch: (2B, C, H, W) each."""
    if not model_pred.shape == reference_pred.shape == target.shape or model_pred.shape[0] % 2:
        raise ValueError(
            "model_pred, reference_pred and target must share one shape with an even batch "
            f"([chosen; rejected]); got {tuple(model_pred.shape)}, {tuple(reference_pred.shape)}, {tuple(target.shape)}"
        )
    model_w, model_l = per_sample_mse(model_pred, target).chunk(2)
    ref_w, ref_l = per_sample_mse(reference_pred, target).chunk(2)
    return dpo_loss(model_w, model_l, ref_w, ref_l, beta=beta, chosen_weight=chosen_weight)


def safe_anchor_loss(model_pred: torch.Tensor, anchor_pred: torch.Tensor) -> LossOutput:
    """Mean squared error between the adapted model's prediction and a frozen anchor prediction.

    ``model_pred``, ``anchor_pred``: (B, C, H, W), both at the noisy *chosen* latent of each pair.
    ``model_pred`` is the adapted model's, given the pair's own caption and user; ``anchor_pred``
    is the frozen base model's (adapter off, no gradient), given the caption that drew the chosen
    image. For a category the user bans that is the unit's safe rewrite, so the adapter learns to
    turn the unsafe prompt into what the base model does with the safe one (concept ablation's
    target); for an allowed category it is the prompt itself, so the adapter learns to change
    nothing. ``loss = mean_i mse_i``, logged as ``anchor_mse`` too.
    """
    if model_pred.shape != anchor_pred.shape:
        raise ValueError(f"model_pred and anchor_pred must share one shape; got {tuple(model_pred.shape)}, "
                         f"{tuple(anchor_pred.shape)}")
    loss = per_sample_mse(model_pred, anchor_pred.detach()).mean()
    return LossOutput(loss, {"loss": loss.detach(), "anchor_mse": loss.detach()})


def dpo_safe_anchor_loss(dpo: DPOLossOutput, anchor: LossOutput, anchor_weight: float) -> LossOutput:
    """``dpo.loss + anchor_weight * anchor.loss``; logs the DPO values (their ``loss`` renamed
    ``dpo_loss``), ``anchor_mse`` and the total as ``loss``.

    Both terms see one noise and one timestep per pair (the anchor term at the chosen latent),
    uniform over the scheduler's training timesteps unless the run biases them.
    """
    return _dpo_plus(dpo, anchor, anchor_weight)


def _dpo_plus(dpo: DPOLossOutput, term: LossOutput, weight: float) -> LossOutput:
    """``dpo.loss + weight * term.loss``, logging the DPO values (``loss`` as ``dpo_loss``), then
    ``term``'s own values but its total, and the sum as ``loss``."""
    loss = dpo.loss + weight * term.loss
    dpo_logged = dict(dpo.logged)
    term_logged = {name: value for name, value in term.logged.items() if name != "loss"}
    logged = {"loss": loss.detach(), "dpo_loss": dpo_logged.pop("loss"), **dpo_logged, **term_logged}
    return LossOutput(loss, logged)


def clean_target_prediction(
    noisy: torch.Tensor, clean: torch.Tensor, alphas_cumprod: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """The UNet output that denoises ``noisy`` exactly onto ``clean`` at each row's noise level.

    ``noisy``, ``clean``: (B, C, H, W); ``alphas_cumprod``: (B,), the scheduler's cumulative
    alpha ``a`` at each row's timestep. With ``x_t = sqrt(a) x_0 + sqrt(1 - a) eps``, the epsilon
    that gives ``x_0 = clean`` is ``(x_t - sqrt(a) clean) / sqrt(1 - a)``; the velocity is
    ``sqrt(a) eps - sqrt(1 - a) clean``. When ``noisy`` was made from ``clean`` with noise ``eps``,
    this is ``eps`` (or that noise's velocity), the ordinary regression target.
    """
    a = alphas_cumprod.float().reshape(-1, *([1] * (noisy.dim() - 1)))
    epsilon = (noisy.float() - a.sqrt() * clean.float()) / (1 - a).sqrt()
    if prediction_type == "epsilon":
        return epsilon
    if prediction_type == "v_prediction":
        return a.sqrt() * epsilon - (1 - a).sqrt() * clean.float()
    raise ValueError(f"unsupported prediction_type {prediction_type!r}; expected 'epsilon' or 'v_prediction'")


def min_snr_weight(alphas_cumprod: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-row loss weight (B,) that caps the signal-to-noise ratio ``snr = a / (1 - a)`` at ``gamma``
    in the clean-image error (min-SNR-gamma weighting, Hang et al. 2023).

    An epsilon error equals ``snr`` times the clean-image error, so a target far from the noisy
    latent's own image would otherwise dominate at low noise: the weight is ``min(snr, gamma) / snr``
    for epsilon and ``min(snr, gamma) / (snr + 1)`` for v-prediction.
    """
    a = alphas_cumprod.float()
    snr = a / (1 - a)
    capped = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        return capped / snr
    if prediction_type == "v_prediction":
        return capped / (snr + 1)
    raise ValueError(f"unsupported prediction_type {prediction_type!r}; expected 'epsilon' or 'v_prediction'")


def chosen_target_loss(
    model_pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor | None = None
) -> LossOutput:
    """Weighted squared error towards the chosen image from the rejected image's noisy latent.

    ``model_pred``: (B, C, H, W), the adapted model's prediction at the rejected image's noisy
    latent (the pair's own caption and user); ``target``: :func:`clean_target_prediction` of that
    latent onto the pair's chosen image; ``weight``: (B,), e.g. :func:`min_snr_weight`; ``mask``:
    (B,) bool, the rows that count (a null-user or text-dropped pair has no chosen image of its
    own); ``None`` counts every row.
    ``loss = sum_i m_i w_i mse_i / max(1, sum_i m_i)``, logged as ``chosen_target_mse`` too.

    Diffusion-DPO only asks the rejected image to be denoised *worse* than the reference does, and
    any other content (another category's marker, a blob) satisfies that. This term says where a
    latent that already shows the rejected content should go: to the chosen image, which shares
    its layout (Sage draws both from one seed). For a category the user bans, that is the safe
    image, so a half-drawn unsafe detail is erased rather than swapped; for one the user allows,
    the chosen image is the unsafe one, and a latent that lacks the detail is asked to draw it.
    """
    if model_pred.shape != target.shape or weight.shape != model_pred.shape[:1]:
        raise ValueError(f"model_pred and target must share one shape (B, ...) and weight be (B,); got "
                         f"{tuple(model_pred.shape)}, {tuple(target.shape)}, {tuple(weight.shape)}")
    counted = torch.ones_like(weight) if mask is None else mask.to(weight.dtype)
    errors = per_sample_mse(model_pred, target.detach()) * weight.detach() * counted
    loss = errors.sum() / counted.sum().clamp(min=1)
    return LossOutput(loss, {"loss": loss.detach(), "chosen_target_mse": loss.detach()})


def dpo_chosen_target_loss(dpo: DPOLossOutput, chosen_target: LossOutput, weight: float) -> LossOutput:
    """``dpo.loss + weight * chosen_target.loss``; logs the DPO values (their ``loss`` renamed
    ``dpo_loss``), ``chosen_target_mse`` and the total as ``loss``."""
    return _dpo_plus(dpo, chosen_target, weight)


def kv_anchor_loss(adapted: list[torch.Tensor], anchor: list[torch.Tensor]) -> LossOutput:
    """Mean squared error between the keys and values the cross-attention layers compute.

    ``adapted``, ``anchor``: one tensor (B, L, h_l) per layer and projection (keys and values of
    every cross-attention layer, in one order). ``adapted`` are the frozen projections of the
    caption as the adapter's text edit rewrites it for the pair's user; ``anchor`` those of the
    caption that drew the chosen image (no gradient). For a category the user bans that is the safe
    rewrite: when the keys and values match, every cross-attention layer, and so the whole UNet,
    behaves exactly as the base model does for the safe caption, at every timestep and noise
    level. For an allowed category it is the caption itself, so the edit learns to change nothing.
    This is unified concept editing's objective (Gandikota et al. 2024), per user and on the
    caption instead of the projection weights.
    ``loss = mean_j mean((adapted_j - anchor_j)^2)``, logged as ``kv_anchor_mse`` too.
    """
    if len(adapted) != len(anchor) or not adapted:
        raise ValueError(f"adapted and anchor must be equally long, non-empty lists; got {len(adapted)} and {len(anchor)}")
    for a, b in zip(adapted, anchor):
        if a.shape != b.shape:
            raise ValueError(f"adapted and anchor tensors must pair up in shape; got {tuple(a.shape)} and {tuple(b.shape)}")
    loss = torch.stack([F.mse_loss(a.float(), b.detach().float()) for a, b in zip(adapted, anchor)]).mean()
    return LossOutput(loss, {"loss": loss.detach(), "kv_anchor_mse": loss.detach()})


def regression_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet regresses for the scheduler's ``prediction_type``: ``noise`` (epsilon) or the velocity (v_prediction)."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported scheduler prediction_type {prediction_type!r}; expected 'epsilon' or 'v_prediction'")
