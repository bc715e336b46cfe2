"""Training objectives of PSA adapters and SafetyDPO experts, as pure functions of tensors.

* :func:`dpo_loss` / :func:`diffusion_dpo_loss`: the published Diffusion-DPO loss, optionally
  anchored on the chosen images' denoising error;
* :func:`safe_anchor_loss`: regression onto the frozen base model's prediction for the caption
  that drew the chosen image (for a banned category: the safe rewrite);
* :func:`dpo_safe_anchor_loss`: the two added.

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
    loss = dpo.loss + anchor_weight * anchor.loss
    dpo_logged = dict(dpo.logged)
    logged = {"loss": loss.detach(), "dpo_loss": dpo_logged.pop("loss"), **dpo_logged,
              "anchor_mse": anchor.logged["anchor_mse"]}
    return LossOutput(loss, logged)


def regression_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet regresses for the scheduler's ``prediction_type``: ``noise`` (epsilon) or the velocity (v_prediction)."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported scheduler prediction_type {prediction_type!r}; expected 'epsilon' or 'v_prediction'")
