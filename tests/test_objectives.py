"""The safe-anchor and chosen-target objectives: pure losses by hand, the target captions, the step functions and
whole training runs on tiny SD1.5- and SDXL-shaped pipelines."""

from __future__ import annotations

import pytest
import torch

from psalign.io import InputError
from psalign.loss import (
    chosen_target_loss,
    clean_target_prediction,
    diffusion_dpo_loss,
    dpo_safe_anchor_loss,
    min_snr_weight,
    safe_anchor_loss,
)
from psalign.sage import PreferencePairDataset, chosen_captions
from psalign.training import PSATrainer, read_metrics, train
from psalign.training.conditioning import TextConditioning
from psalign.training.data import collate_pairs
from psalign.training.objectives import (
    anchor_conditioning,
    dpo_chosen_target_step_loss,
    dpo_safe_anchor_step_loss,
    dpo_step_loss,
    safe_anchor_step_loss,
)

from .test_training import unet_with_random_adapter  # noqa: F401 (fixture)
from .training_support import (
    SAGE_CAPTIONS, USER_DIM, tiny_config, train_whole_and_resumed, write_sage_training_set, write_training_set,
)

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


# ---------------------------------------------------------------------------------------------- pure losses


def test_safe_anchor_loss_is_the_mean_squared_error_to_the_frozen_prediction():
    model = torch.tensor([[[[1.0, 3.0]]], [[[0.0, 0.0]]]], requires_grad=True)  # (2, 1, 1, 2)
    anchor = torch.tensor([[[[0.0, 1.0]]], [[[2.0, 0.0]]]], requires_grad=True)
    out = safe_anchor_loss(model, anchor)
    # sample 0: (1 + 4) / 2 = 2.5; sample 1: (4 + 0) / 2 = 2; mean 2.25
    assert out.loss.item() == pytest.approx(2.25)
    assert list(out.logged) == ["loss", "anchor_mse"] and out.metrics() == {"loss": 2.25, "anchor_mse": 2.25}
    out.loss.backward()
    # d/dm of mean_i mean_j (m - a)^2 = 2 (m - a) / (2 samples * 2 values)
    assert model.grad.flatten().tolist() == pytest.approx([0.5, 1.0, -1.0, 0.0])
    assert anchor.grad is None  # the frozen prediction is a target, not trained
    with pytest.raises(ValueError, match="share one shape"):
        safe_anchor_loss(torch.zeros(2, 1, 1, 2), torch.zeros(1, 1, 1, 2))


def test_dpo_safe_anchor_loss_adds_the_weighted_anchor_to_the_dpo_loss():
    torch.manual_seed(0)
    model, reference, target = torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2)
    dpo = diffusion_dpo_loss(model, reference, target, beta=10.0)
    anchor = safe_anchor_loss(model[:2], torch.zeros(2, 1, 2, 2))
    out = dpo_safe_anchor_loss(dpo, anchor, anchor_weight=3.0)
    assert out.loss.item() == pytest.approx(dpo.loss.item() + 3.0 * anchor.loss.item())
    assert list(out.logged) == ["loss", "dpo_loss", "implicit_acc", "model_mse", "ref_mse", "reward_margin",
                                "chosen_mse_gap", "anchor_mse"]
    assert out.metrics()["dpo_loss"] == pytest.approx(dpo.loss.item())
    assert out.metrics()["anchor_mse"] == pytest.approx(anchor.loss.item())


# ---------------------------------------------------------------------------------------------- target captions


def test_chosen_captions_follow_the_sage_rule():
    unit = ("user_0000001_violence_a_fight_00000", "pool/fight_s.jpg", "pool/fight_u.jpg")
    stem, safe, unsafe = unit
    records = [
        # a user who bans Violence: the safe image is chosen for both captions
        {"file_name": f"{stem}.jpg_u.jpg", "chosen": safe, "rejected": unsafe, "caption": "a fight"},
        {"file_name": f"{stem}.jpg_s.jpg", "chosen": safe, "rejected": unsafe, "caption": "a handshake"},
        # a user who allows it: the unsafe image is chosen for the unsafe caption
        {"file_name": "user_0000002_violence_a_fight_00000.jpg_u.jpg", "chosen": unsafe, "rejected": safe,
         "caption": "a fight"},
        {"file_name": "pair_7.jpg", "chosen": "images/a.png", "rejected": "images/b.png", "caption": "a cat"},
    ]
    assert chosen_captions(records) == ["a handshake", "a handshake", "a fight", None]
    # only the unsafe record of a unit: its chosen safe image's caption is unknown
    assert chosen_captions(records[:1]) == [None]
    clash = [records[1], {**records[1], "file_name": "user_0000003_violence_a_fight_00000.jpg_s.jpg",
                          "caption": "a hug"}]
    with pytest.raises(ValueError, match="drawn from 'a handshake'"):
        chosen_captions(clash)


def test_anchor_conditioning_uses_the_prompt_for_null_users_and_the_empty_prompt_when_dropped():
    chosen, prompt, empty = (TextConditioning(torch.full((3, 1, 1), v)) for v in (1.0, 2.0, 0.0))
    null_user, dropped = torch.tensor([False, True, False]), torch.tensor([False, False, True])
    anchor = anchor_conditioning(chosen, prompt, empty, null_user, dropped)
    assert anchor.prompt_embeds.flatten().tolist() == [1.0, 2.0, 0.0]
    no_users = anchor_conditioning(chosen, prompt, empty, None, torch.tensor([False, False, False]))
    assert no_users.prompt_embeds.flatten().tolist() == [1.0, 1.0, 1.0]


def test_the_dataset_gives_each_pair_its_chosen_caption(tmp_path):
    data, embeds = write_sage_training_set(tmp_path)
    pairs = PreferencePairDataset(data / "metadata.jsonl", data, embeds, resolution=16)
    unsafe, safe = SAGE_CAPTIONS[0]
    # unit 0: the user bans Violence, so the safe image (drawn from the rewrite) is chosen for both captions;
    # unit 1: the user allows it, so the unsafe caption's chosen image is the unsafe one
    assert pairs.chosen_captions[:4] == [safe, safe, SAGE_CAPTIONS[1][0], SAGE_CAPTIONS[1][1]]
    assert pairs[0]["caption"] == unsafe and pairs[0]["chosen_caption"] == safe


# ---------------------------------------------------------------------------------------------- steps


def _step_inputs(pairs: int = 3):
    torch.manual_seed(0)
    latents = torch.randn(2 * pairs, 4, 8, 8)
    text, anchor = TextConditioning(torch.randn(pairs, 77, 32)), TextConditioning(torch.randn(pairs, 77, 32))
    return latents, text, anchor, torch.randn(pairs, USER_DIM), torch.zeros(pairs, dtype=torch.bool)


def test_safe_anchor_step_denoises_the_chosen_half_frozen_first(tiny_sd15_path):
    unet, scheduler, adapter = unet_with_random_adapter(tiny_sd15_path)
    latents, text, anchor, users, null = _step_inputs()
    calls = []
    unet.register_forward_pre_hook(
        lambda module, args: calls.append((adapter.enabled, torch.is_grad_enabled(), args[0].shape[0])))
    out = safe_anchor_step_loss(unet, adapter, adapter, scheduler, latents, text, anchor, None, users, null)
    assert calls == [(False, False, 3), (True, True, 3)]  # frozen anchor pass, then the adapted one
    assert out.loss.item() > 0 and out.loss.requires_grad
    out.loss.backward()
    assert all(p.grad is not None for p in adapter.parameters() if p.requires_grad)


def test_safe_anchor_step_is_zero_for_an_untrained_adapter_and_the_prompt_as_anchor(tiny_sd15_path):
    """The adapter starts as the identity, so anchoring a pair to its own caption costs nothing."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from psalign.adapter import PSAAdapter

    unet = UNet2DConditionModel.from_pretrained(tiny_sd15_path, subfolder="unet").requires_grad_(False)
    scheduler = DDPMScheduler.from_pretrained(tiny_sd15_path, subfolder="scheduler")
    adapter = PSAAdapter.for_unet(unet, USER_DIM).attach(unet)
    latents, text, anchor, users, null = _step_inputs()
    assert safe_anchor_step_loss(unet, adapter, adapter, scheduler, latents, text, text, None, users, null).loss == 0
    assert safe_anchor_step_loss(unet, adapter, adapter, scheduler, latents, text, anchor, None, users, null).loss > 0


def test_dpo_safe_anchor_step_is_the_dpo_step_plus_the_weighted_anchor(tiny_sd15_path):
    unet, scheduler, adapter = unet_with_random_adapter(tiny_sd15_path)
    latents, text, anchor, users, null = _step_inputs()
    torch.manual_seed(5)
    dpo = dpo_step_loss(unet, adapter, adapter, scheduler, latents, text, None, users, null, 30.0, 2.0)
    torch.manual_seed(5)
    only_anchor = safe_anchor_step_loss(unet, adapter, adapter, scheduler, latents, text, anchor, None, users, null)
    torch.manual_seed(5)  # the same noise and timesteps for all three
    both = dpo_safe_anchor_step_loss(unet, adapter, adapter, scheduler, latents, text, anchor, None, users, null,
                                     30.0, 2.0, 0.5)
    assert both.loss.item() == pytest.approx(dpo.loss.item() + 0.5 * only_anchor.loss.item(), rel=1e-5)
    assert both.metrics()["implicit_acc"] == dpo.implicit_accuracy.item()


def test_the_anchor_at_both_latents_is_the_mean_of_the_chosen_and_rejected_terms(tiny_sd15_path):
    """With ``anchor_latents="both"`` the anchor sees all 2B noisy latents (chosen and rejected, one
    noise and timestep per pair), with the pair's anchor caption at both."""
    unet, scheduler, adapter = unet_with_random_adapter(tiny_sd15_path)
    latents, text, anchor, users, null = _step_inputs()
    calls = []
    hook = unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    torch.manual_seed(5)
    both = safe_anchor_step_loss(unet, adapter, adapter, scheduler, latents, text, anchor, None, users, null,
                                 anchor_latents="both")
    assert calls == [6, 6]
    hook.remove()
    swapped = torch.cat([latents[3:], latents[:3]])  # the rejected half as the chosen one
    torch.manual_seed(5)
    chosen = safe_anchor_step_loss(unet, adapter, adapter, scheduler, latents, text, anchor, None, users, null)
    torch.manual_seed(5)
    rejected = safe_anchor_step_loss(unet, adapter, adapter, scheduler, swapped, text, anchor, None, users, null)
    assert both.loss.item() == pytest.approx((chosen.loss.item() + rejected.loss.item()) / 2, rel=1e-5)
    torch.manual_seed(5)
    dpo = dpo_step_loss(unet, adapter, adapter, scheduler, latents, text, None, users, null, 30.0, 2.0)
    torch.manual_seed(5)
    combined = dpo_safe_anchor_step_loss(unet, adapter, adapter, scheduler, latents, text, anchor, None, users, null,
                                         30.0, 2.0, 0.5, anchor_latents="both")
    assert combined.loss.item() == pytest.approx(dpo.loss.item() + 0.5 * both.loss.item(), rel=1e-5)
    with pytest.raises(ValueError, match="anchor_latents must be one of"):
        safe_anchor_step_loss(unet, adapter, adapter, scheduler, latents, text, anchor, None, users, null,
                              anchor_latents="rejected")


# ---------------------------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def sage_set(tmp_path_factory):
    return write_sage_training_set(tmp_path_factory.mktemp("sage_pairs"))


@pytest.mark.parametrize("objective", ["safe_anchor", "dpo_safe_anchor"])
def test_sd15_runs_log_each_objectives_values_and_resume(objective, tiny_sd15_path, sage_set, tmp_path):
    data, embeds = sage_set
    # every pair in each batch: the banned unit's unsafe-caption pair, whose anchor is its safe
    # rewrite, is always there (the other pairs' anchor is their own caption)
    common = dict(objective=objective, max_train_steps=3, checkpointing_steps=2, train_batch_size=8,
                  user_dropout=0.25, proportion_empty_prompts=0.25, anchor_loss_weight=2.0)
    train(tiny_config(tiny_sd15_path, data, embeds, tmp_path / "whole", **common))
    whole = read_metrics(tmp_path / "whole")
    names = {"safe_anchor": {"loss", "anchor_mse"}, "dpo_safe_anchor": {"loss", "dpo_loss", "anchor_mse"}}[objective]
    assert names <= set(whole[3]) and whole[3]["anchor_mse"] > 0

    # a run stopped after its step-2 checkpoint and resumed logs the same step 3
    train(tiny_config(tiny_sd15_path, data, embeds, tmp_path / "split", **{**common, "max_train_steps": 2}))
    train(tiny_config(tiny_sd15_path, data, embeds, tmp_path / "split", resume_from_checkpoint="latest", **common))
    assert read_metrics(tmp_path / "split")[3]["loss"] == pytest.approx(whole[3]["loss"], rel=1e-6)


def test_sdxl_cached_anchor_run_matches_the_on_the_fly_run(tiny_sdxl_path, sage_set, tmp_path):
    data, embeds = sage_set
    common = dict(objective="dpo_safe_anchor", max_train_steps=2, train_batch_size=4, proportion_empty_prompts=0.25)
    train(tiny_config(tiny_sdxl_path, data, embeds, tmp_path / "direct", **common))
    train(tiny_config(tiny_sdxl_path, data, embeds, tmp_path / "cached", precompute=True, **common))
    direct, cached = read_metrics(tmp_path / "direct"), read_metrics(tmp_path / "cached")
    for step in (1, 2):
        for key in ("loss", "dpo_loss", "anchor_mse"):
            assert cached[step][key] == pytest.approx(direct[step][key], rel=1e-5, abs=1e-7), (step, key)
    # a cache made for the DPO objective holds no chosen captions: refused, not silently reused
    with pytest.raises(InputError, match="chosen_caption_embeds"):
        PSATrainer(tiny_config(tiny_sdxl_path, data, embeds, tmp_path / "other", precompute=True,
                               cache_dir=str(tmp_path / "cached" / "cache"), max_train_steps=2))


def test_anchor_objective_refuses_data_without_chosen_captions_before_loading(tiny_sd15_path, tmp_path, monkeypatch):
    from diffusers import UNet2DConditionModel

    data, embeds = write_training_set(tmp_path)  # not Sage-named: nothing says which caption drew an image

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", no_loading)
    with pytest.raises(InputError, match="objective: 8 of 8 pairs do not say which caption drew"):
        PSATrainer(tiny_config(tiny_sd15_path, data, embeds, tmp_path / "run", objective="safe_anchor"))


def test_safetydpo_expert_trains_with_the_safe_anchor(tiny_sd15_path, sage_set, tmp_path):
    from psalign.safetydpo.data import read_expert_pairs, write_expert_data

    data, _ = sage_set
    pairs = write_expert_data(tmp_path / "expert", "Violence", sage=data / "metadata.jsonl")
    assert {p.chosen_caption for p in read_expert_pairs(pairs)} == {safe for _, safe in SAGE_CAPTIONS}
    out = tmp_path / "expert"
    train(tiny_config(tiny_sd15_path, pairs, None, out, trainable="lora", objective="safe_anchor", embeds_folder=None))
    assert read_metrics(out)[2]["anchor_mse"] > 0 and (out / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize("objective", ["dpo", "safe_anchor"])
def test_the_trainer_takes_each_objective_and_trainable_from_its_registry(
        objective, tiny_sd15_path, sage_set, tmp_path, monkeypatch):
    """One module per extension point: the config's choices are the registries' names, and the
    trainer calls the registered objective with one MicroBatch (and the chosen caption when asked)."""
    from psalign.training import config as config_module
    from psalign.training.objectives import OBJECTIVES, MicroBatch, Objective
    from psalign.training.trainables import TRAINABLE_KINDS

    assert config_module.OBJECTIVES == tuple(OBJECTIVES) and config_module.TRAINABLES == tuple(TRAINABLE_KINDS)
    data, embeds = sage_set
    trainer = PSATrainer(tiny_config(tiny_sd15_path, data, embeds, tmp_path / "run", objective=objective))
    assert trainer.adapter.__class__.__name__ == "PSAAdapter"
    seen = []
    needs_caption = OBJECTIVES[objective].needs_chosen_caption
    monkeypatch.setitem(OBJECTIVES, objective, Objective(lambda batch, config: seen.append(batch) or "loss",
                                                         needs_chosen_caption=needs_caption))
    assert trainer._micro_step(collate_pairs([trainer.dataset[(0, i)] for i in range(2)])) == "loss"
    (batch,) = seen
    assert isinstance(batch, MicroBatch) and batch.latents.shape[0] == 4 and batch.user_embeds.shape[0] == 2
    assert (batch.anchor_text is not None) == needs_caption


# ---------------------------------------------------------------------------------------------- chosen target


def test_clean_target_prediction_by_hand_and_against_the_scheduler():
    from diffusers import DDPMScheduler

    # a = 0.25: x_t = 2, x_0 = 1 -> eps = (2 - 0.5 * 1) / sqrt(0.75) = sqrt(3); v = 0.5 sqrt(3) - sqrt(0.75) * 1 = 0
    noisy, clean, alphas = torch.full((1, 1, 1, 1), 2.0), torch.ones(1, 1, 1, 1), torch.tensor([0.25])
    assert clean_target_prediction(noisy, clean, alphas, "epsilon").item() == pytest.approx(3 ** 0.5)
    assert clean_target_prediction(noisy, clean, alphas, "v_prediction").item() == pytest.approx(0.0, abs=1e-6)
    # a latent noised from its own image: the ordinary regression target (the noise, or its velocity)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    torch.manual_seed(0)
    clean, noise, steps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.tensor([10, 500, 990])
    noisy, alphas = scheduler.add_noise(clean, noise, steps), scheduler.alphas_cumprod[steps]
    assert torch.allclose(clean_target_prediction(noisy, clean, alphas, "epsilon"), noise, atol=1e-4)
    assert torch.allclose(clean_target_prediction(noisy, clean, alphas, "v_prediction"),
                          scheduler.get_velocity(clean, noise, steps), atol=1e-4)
    with pytest.raises(ValueError, match="prediction_type"):
        clean_target_prediction(noisy, clean, alphas, "sample")


def test_min_snr_weight_by_hand():
    alphas = torch.tensor([0.75, 0.9])  # snr 3 and 9
    assert min_snr_weight(alphas, 5.0, "epsilon").tolist() == pytest.approx([1.0, 5 / 9])
    assert min_snr_weight(alphas, 5.0, "v_prediction").tolist() == pytest.approx([3 / 4, 5 / 10])


def test_chosen_target_loss_weights_and_masks_rows_by_hand():
    model = torch.tensor([[[[1.0, 3.0]]], [[[0.0, 0.0]]], [[[5.0, 5.0]]]], requires_grad=True)  # (3, 1, 1, 2)
    target = torch.tensor([[[[0.0, 1.0]]], [[[2.0, 0.0]]], [[[0.0, 0.0]]]])
    weight, mask = torch.tensor([2.0, 0.5, 1.0]), torch.tensor([True, True, False])
    out = chosen_target_loss(model, target, weight, mask)
    # mse 2.5 and 2 (row 2 masked out): (2 * 2.5 + 0.5 * 2) / 2 rows = 3
    assert out.loss.item() == pytest.approx(3.0)
    assert out.metrics() == {"loss": 3.0, "chosen_target_mse": 3.0}
    out.loss.backward()
    # d/dm of w (m - t)^2 / 2 values / 2 rows = w (m - t) / 2
    assert model.grad.flatten().tolist() == pytest.approx([1.0, 2.0, -0.5, 0.0, 0.0, 0.0])
    assert chosen_target_loss(model, target, weight).loss.item() == pytest.approx((5 + 1 + 25) / 3)
    assert chosen_target_loss(model, target, weight, torch.zeros(3, dtype=torch.bool)).loss.item() == 0
    with pytest.raises(ValueError, match="weight be"):
        chosen_target_loss(model, target, torch.ones(2))


def test_dpo_chosen_target_step_is_the_dpo_step_plus_the_weighted_term(tiny_sd15_path):
    """The term reuses the DPO step's passes: one frozen and one adapted pass over [chosen; rejected]."""
    unet, scheduler, adapter = unet_with_random_adapter(tiny_sd15_path)
    latents, text, _, users, null = _step_inputs()
    dropped = torch.zeros(3, dtype=torch.bool)
    calls = []
    hook = unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    torch.manual_seed(5)
    both = dpo_chosen_target_step_loss(unet, adapter, adapter, scheduler, latents, text, None, users, null, dropped,
                                       30.0, 2.0, 0.5, 5.0)
    hook.remove()
    assert calls == [6, 6]
    torch.manual_seed(5)
    dpo = dpo_step_loss(unet, adapter, adapter, scheduler, latents, text, None, users, null, 30.0, 2.0)
    term = both.metrics()["chosen_target_mse"]
    assert term > 0 and both.loss.item() == pytest.approx(dpo.loss.item() + 0.5 * term, rel=1e-5)
    # a pair whose chosen and rejected image are one image: the term is the weighted error to the noise
    same = torch.cat([latents[:3], latents[:3]])
    torch.manual_seed(5)
    plain = dpo_chosen_target_step_loss(unet, adapter, adapter, scheduler, same, text, None, users, null, dropped,
                                        30.0, 0.0, 1.0, 1e9)  # no SNR cap: weight 1
    assert plain.metrics()["chosen_target_mse"] == pytest.approx(plain.metrics()["model_mse"], rel=1e-4)
    # null-user and text-dropped pairs are left out of the term
    torch.manual_seed(5)
    none_counted = dpo_chosen_target_step_loss(unet, adapter, adapter, scheduler, latents, text, None, users,
                                               torch.tensor([True, False, True]), torch.tensor([False, True, False]),
                                               30.0, 2.0, 0.5, 5.0)
    assert none_counted.metrics()["chosen_target_mse"] == 0


def test_sd15_chosen_target_run_resumes_exactly(tiny_sd15_path, sage_set, tmp_path):
    data, embeds = sage_set
    whole, split = train_whole_and_resumed(tiny_sd15_path, data, embeds, tmp_path, objective="dpo_chosen_target",
                                           train_batch_size=8, user_dropout=0.25, proportion_empty_prompts=0.25,
                                           chosen_target_weight=2.0)
    assert {"loss", "dpo_loss", "chosen_target_mse"} <= set(whole[3]) and whole[3]["chosen_target_mse"] > 0
    assert split[3]["loss"] == pytest.approx(whole[3]["loss"], rel=1e-6)
