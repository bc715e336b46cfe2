"""The Diffusion-DPO loss against hand computations."""

import math

import pytest
import torch
from diffusers import DDPMScheduler

from psalign.loss import diffusion_dpo_loss, dpo_loss, per_sample_mse, regression_target


def test_per_sample_mse_is_the_mean_over_chw():
    pred = torch.zeros(2, 1, 2, 2)
    target = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]]], [[[2.0, 0.0], [0.0, 0.0]]]])
    assert per_sample_mse(pred, target).tolist() == [1.0, 1.0]


def test_dpo_loss_equals_a_hand_computation():
    m_w, m_l = torch.tensor([0.10, 0.30]), torch.tensor([0.20, 0.10])
    r_w, r_l = torch.tensor([0.15, 0.20]), torch.tensor([0.15, 0.20])
    beta = 10.0
    # delta = (m_w - m_l) - (r_w - r_l) = [-0.1, 0.2]; inside = -beta/2 * delta = [0.5, -1.0]
    expected_loss = 0.5 * (math.log(1 + math.exp(-0.5)) + math.log(1 + math.exp(1.0)))
    out = dpo_loss(m_w, m_l, r_w, r_l, beta=beta)
    assert out.loss.item() == pytest.approx(expected_loss, rel=1e-6)
    assert out.implicit_accuracy.item() == 0.5
    assert out.reward_margin.item() == pytest.approx(-0.25)
    assert out.model_mse.item() == pytest.approx(0.175)
    assert out.reference_mse.item() == pytest.approx(0.175)


def test_dpo_loss_gradient_lowers_the_chosen_error():
    m_w = torch.tensor([0.2], requires_grad=True)
    m_l = torch.tensor([0.2], requires_grad=True)
    dpo_loss(m_w, m_l, torch.tensor([0.2]), torch.tensor([0.2]), beta=4.0).loss.backward()
    # d/dm_w of -logsigmoid(-beta/2 (m_w - m_l)) at 0 = beta/2 * sigmoid(0) = 1
    assert m_w.grad.item() == pytest.approx(1.0) and m_l.grad.item() == pytest.approx(-1.0)


def test_chosen_weight_adds_the_chosen_error_gap():
    m_w, m_l = torch.tensor([0.10, 0.30]), torch.tensor([0.20, 0.10])
    r_w, r_l = torch.tensor([0.15, 0.20]), torch.tensor([0.15, 0.20])
    # as in the hand computation above, plus 2.0 * mean(m_w - r_w) = 2.0 * mean([-0.05, 0.10]) = 0.05
    expected_loss = 0.5 * (math.log(1 + math.exp(-0.5)) + math.log(1 + math.exp(1.0))) + 0.05
    out = dpo_loss(m_w, m_l, r_w, r_l, beta=10.0, chosen_weight=2.0)
    assert out.loss.item() == pytest.approx(expected_loss, rel=1e-6)
    assert out.chosen_mse_gap.item() == pytest.approx(0.025)
    assert out.metrics()["chosen_mse_gap"] == pytest.approx(0.025)
    assert dpo_loss(m_w, m_l, r_w, r_l, beta=10.0).chosen_mse_gap.item() == pytest.approx(0.025)


def test_chosen_weight_resists_both_errors_rising_together():
    # DPO alone cannot tell a common rise of both errors from no change; the anchor can
    for weight, chosen_grad in ((0.0, 1.0), (3.0, 4.0)):
        m_w = torch.tensor([0.2], requires_grad=True)
        m_l = torch.tensor([0.2], requires_grad=True)
        dpo_loss(m_w, m_l, torch.tensor([0.2]), torch.tensor([0.2]), beta=4.0, chosen_weight=weight).loss.backward()
        assert m_w.grad.item() == pytest.approx(chosen_grad) and m_l.grad.item() == pytest.approx(-1.0)
        assert (m_w.grad + m_l.grad).item() == pytest.approx(weight)


def test_loss_is_ln2_when_model_equals_reference():
    pred = torch.randn(6, 4, 8, 8)
    out = diffusion_dpo_loss(pred, pred.clone(), torch.randn_like(pred), beta=5000.0)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert out.implicit_accuracy.item() == 0.0 and out.reward_margin.item() == 0.0


def test_stacked_loss_splits_chosen_then_rejected():
    target = torch.zeros(4, 1, 1, 1)
    model = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(4, 1, 1, 1)  # chosen mse [1, 4], rejected [9, 16]
    ref = torch.zeros(4, 1, 1, 1)
    out = diffusion_dpo_loss(model, ref, target, beta=0.1)
    direct = dpo_loss(torch.tensor([1.0, 4.0]), torch.tensor([9.0, 16.0]), torch.zeros(2), torch.zeros(2), beta=0.1)
    assert out.loss.item() == pytest.approx(direct.loss.item())
    with pytest.raises(ValueError, match="even batch"):
        diffusion_dpo_loss(model[:3], ref[:3], target[:3])


def test_regression_target_follows_prediction_type():
    latents, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    eps = DDPMScheduler(prediction_type="epsilon")
    assert regression_target(eps, latents, noise, t) is noise
    v = DDPMScheduler(prediction_type="v_prediction")
    alpha = v.alphas_cumprod[t].sqrt().view(2, 1, 1, 1)
    sigma = (1 - v.alphas_cumprod[t]).sqrt().view(2, 1, 1, 1)
    torch.testing.assert_close(regression_target(v, latents, noise, t), alpha * noise - sigma * latents)
    with pytest.raises(ValueError, match="unsupported scheduler prediction_type 'sample'"):
        regression_target(DDPMScheduler(prediction_type="sample"), latents, noise, t)
