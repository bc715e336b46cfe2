"""The Diffusion-DPO loss used to train PSA adapters and SafetyDPO experts: pure functions of tensors."""

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

    def stacked(self) -> torch.Tensor:
        """The logged values as one float tensor (no host sync), in :data:`LOSS_METRICS` order."""
        values = (self.loss.detach(), self.implicit_accuracy, self.model_mse, self.reference_mse,
                  self.reward_margin, self.chosen_mse_gap)
        return torch.stack(values).float()

    def metrics(self) -> dict[str, float]:
        """All values as floats, keyed as they are logged."""
        return dict(zip(LOSS_METRICS, self.stacked().tolist()))


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


def regression_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet regresses for the scheduler's ``prediction_type``: ``noise`` (epsilon) or the velocity (v_prediction)."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported scheduler prediction_type {prediction_type!r}; expected 'epsilon' or 'v_prediction'")
