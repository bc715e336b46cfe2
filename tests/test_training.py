"""PSA adapter training (train_psa.py / psalign.training) on tiny SD1.5- and SDXL-shaped pipelines."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import psalign.training.objectives as objectives_module
from psalign.adapter import PSAAdapter, load_adapter
from psalign.embeddings import load_embedding_stats
from psalign.io import InputError
from psalign.training import NonFiniteLossError, PSATrainer, read_metrics, train
from psalign.training.conditioning import TextConditioning
from psalign.training.data import collate_pairs
from psalign.training.precompute import cache_files

from .training_support import USER_DIM, tiny_config, write_training_set

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def training_set(tmp_path_factory):
    return write_training_set(tmp_path_factory.mktemp("pairs"))


def adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def file_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


# ---------------------------------------------------------------------------------------------- runs


def test_sd15_run_writes_a_loadable_adapter_checkpoints_and_a_validation_grid(tiny_sd15_path, training_set, tmp_path):
    data, embeds = training_set
    out = tmp_path / "run"
    config = tiny_config(
        tiny_sd15_path, data, embeds, out,
        max_train_steps=3, checkpointing_steps=1, checkpoints_total_limit=2,
        validation_steps=3, validation_prompts=["a cat", "a dog"], validation_num_inference_steps=2,
    )
    assert train(config) == out

    adapter = PSAAdapter.from_pretrained(out)
    assert adapter.config.extra["training_args"] == config.to_dict()
    assert adapter.config.extra["global_step"] == 3 and adapter.config.extra["model_type"] == "sd15"
    mean, std = load_embedding_stats(embeds)
    assert torch.equal(adapter.user_proj.embed_mean, torch.from_numpy(mean))
    assert torch.equal(adapter.user_proj.embed_std, torch.from_numpy(std))
    assert any(v.abs().sum() > 0 for v in adapter.to_v.parameters())  # trained away from the zero init

    from diffusers import UNet2DConditionModel

    load_adapter(out, UNet2DConditionModel.from_pretrained(tiny_sd15_path, subfolder="unet"))
    metrics = read_metrics(out)
    assert sorted(metrics) == [1, 2, 3]
    for row in metrics.values():
        assert all(math.isfinite(row[k]) for k in ("loss", "implicit_acc", "model_mse", "ref_mse", "reward_margin",
                                                    "chosen_mse_gap", "lr", "grad_norm", "pairs_per_second"))
    assert metrics[1]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # zero-initialised adapter = reference
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-2", "checkpoint-3"]
    from PIL import Image

    grid = Image.open(out / "validation" / "step-000003.png")
    assert grid.size == (140 + 2 * 128, 28 + 2 * 128)  # 2 prompts x 2 users (the data's first two)


def test_sdxl_cached_run_matches_the_on_the_fly_run(tiny_sdxl_path, training_set, tmp_path):
    """SDXL end to end, with and without the precompute cache: identical inputs give identical losses."""
    data, embeds = training_set
    common = dict(max_train_steps=2, random_crop=True, random_flip=True, proportion_empty_prompts=0.5)
    train(tiny_config(tiny_sdxl_path, data, embeds, tmp_path / "direct", **common))

    cached = PSATrainer(tiny_config(tiny_sdxl_path, data, embeds, tmp_path / "cached", precompute=True, **common))
    assert cached.is_sdxl and cached.vae is None and cached.text_encoders is None  # the loop holds neither
    cached.train()
    assert all(f.is_file() for f in cache_files(tmp_path / "cached" / "cache", 8))

    direct, from_cache = read_metrics(tmp_path / "direct"), read_metrics(tmp_path / "cached")
    for step in (1, 2):
        for key in ("loss", "model_mse", "ref_mse", "reward_margin"):
            assert from_cache[step][key] == pytest.approx(direct[step][key], rel=1e-5, abs=1e-7), (step, key)
    assert direct[2]["loss"] != pytest.approx(math.log(2), abs=1e-6)  # the second step saw a trained adapter
    assert PSAAdapter.from_pretrained(tmp_path / "cached").config.extra["model_type"] == "sdxl"


class Interrupted(Exception):
    pass


def test_resumed_run_gives_the_same_losses_as_an_uninterrupted_one(tiny_sd15_path, training_set, tmp_path, monkeypatch):
    data, embeds = training_set
    common = dict(
        max_train_steps=4, checkpointing_steps=2, gradient_accumulation_steps=2, lr_scheduler="constant_with_warmup",
        lr_warmup_steps=3, random_crop=True, random_flip=True, proportion_empty_prompts=0.5, user_dropout=0.5,
    )
    train(tiny_config(tiny_sd15_path, data, embeds, tmp_path / "whole", **common))

    real_step = PSATrainer._micro_step
    calls = []

    def interrupted_step(self, batch):
        calls.append(1)
        if len(calls) == 6:  # optimizer step 3, second micro-batch: after checkpoint-2
            raise Interrupted
        return real_step(self, batch)

    monkeypatch.setattr(PSATrainer, "_micro_step", interrupted_step)
    split = tmp_path / "split"
    with pytest.raises(Interrupted):
        train(tiny_config(tiny_sd15_path, data, embeds, split, **common))
    assert (split / "checkpoint-2").is_dir() and not (split / "psa_config.json").exists()
    monkeypatch.setattr(PSATrainer, "_micro_step", real_step)
    train(tiny_config(tiny_sd15_path, data, embeds, split, resume_from_checkpoint="latest", **common))

    whole, resumed = read_metrics(tmp_path / "whole"), read_metrics(split)
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        for key in ("loss", "implicit_acc", "model_mse", "ref_mse", "lr", "grad_norm"):
            assert resumed[step][key] == whole[step][key], (step, key)
    final_whole = adapter_tensors(tmp_path / "whole" / "psa_adapter.safetensors")
    final_split = adapter_tensors(split / "psa_adapter.safetensors")
    assert all(torch.equal(final_whole[k], final_split[k]) for k in final_whole)


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(
    tiny_sd15_path, training_set, tmp_path, monkeypatch
):
    data, embeds = training_set
    out = tmp_path / "run"
    real_loss = objectives_module.dpo_step_loss
    calls, hashes = [], {}

    def loss_going_nan(*args, **kwargs):
        out_ = real_loss(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            hashes.update(file_hashes(out / "checkpoint-2"))
            return dataclasses.replace(out_, loss=out_.loss * float("nan"))
        return out_

    monkeypatch.setattr(objectives_module, "dpo_step_loss", loss_going_nan)
    expected = r"non-finite DPO loss \(nan\) at optimizer step 3 .*checkpoint-2 is intact"
    with pytest.raises(NonFiniteLossError, match=expected):
        train(tiny_config(tiny_sd15_path, data, embeds, out, max_train_steps=4, checkpointing_steps=2))
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-2"]
    assert file_hashes(out / "checkpoint-2") == hashes
    assert not (out / "psa_adapter.safetensors").exists()
    assert sorted(read_metrics(out)) == [1, 2]


def test_bf16_frozen_models_with_fp32_adapter_weights_that_all_move_at_lr_5e_6(tiny_sd15_path, training_set, tmp_path):
    """Also with gradient checkpointing: gradients reach every adapter tensor through recomputed blocks."""
    data, embeds = training_set
    out = tmp_path / "run"
    trainer = PSATrainer(tiny_config(
        tiny_sd15_path, data, embeds, out, mixed_precision="bf16", learning_rate=5e-6, max_train_steps=4,
        checkpointing_steps=1, gradient_checkpointing=True,
    ))
    assert trainer.unet.is_gradient_checkpointing
    assert trainer.unet.dtype == trainer.vae.dtype == torch.bfloat16
    assert all(e.dtype == torch.bfloat16 for e in trainer.text_encoders.encoders)
    assert all(p.dtype == torch.float32 for p in trainer.adapter.parameters())
    trainer.train()

    # Step 1 moves only the zero-initialised value projections (they block every other gradient);
    # from then on every trainable tensor gets gradients.
    before = load_file(str(out / "checkpoint-1" / "model.safetensors"))
    after = load_file(str(out / "checkpoint-4" / "model.safetensors"))
    trainable = {name for name, _ in trainer.adapter.named_parameters()}
    assert trainable == {k for k in after if "embed_" not in k}
    for name in trainable:
        assert after[name].dtype == torch.float32
        moved = (after[name] != before[name]).float().mean().item()
        # An element whose gradient happens to be exactly zero in all 3 steps stays put (a small
        # LayerNorm vector can have one); in bf16 storage most elements could not move at all.
        assert moved > 0.9, f"{name}: only {moved:.0%} of the weights moved"
    # Stored in bf16, most of the projection weights could not have moved at this learning rate.
    weight = "user_proj.proj.weight"
    bf16_moved = (after[weight].bfloat16() != before[weight].bfloat16()).float().mean().item()
    assert bf16_moved < 0.5


def _eval_dpo(trainer: PSATrainer, state: dict[str, torch.Tensor], repeats: int = 16) -> tuple[float, float]:
    """DPO loss and implicit accuracy of an adapter state over every cached pair x ``repeats`` noises."""
    adapter = trainer.adapter
    adapter.load_state_dict(state)
    items = [trainer.dataset.dataset[i] for i in range(len(trainer.dataset))] * repeats
    latents = torch.cat([torch.stack([it["chosen_latents"] for it in items]),
                         torch.stack([it["rejected_latents"] for it in items])])
    text = TextConditioning(torch.stack([it["prompt_embeds"] for it in items]))
    users = torch.stack([it["user_embed"] for it in items])
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(1234)
        out = objectives_module.dpo_step_loss(
            trainer.unet, adapter, adapter, trainer.noise_scheduler, latents, text, None, users,
            torch.zeros(len(items), dtype=torch.bool), trainer.config.beta_dpo,
        )
    return out.loss.item(), out.implicit_accuracy.item()


@pytest.mark.slow
def test_loss_falls_and_implicit_accuracy_rises_when_chosen_images_are_darker(tiny_sd15_path, tmp_path):
    """Chosen images near black, rejected near white: a held-out evaluation (every pair x 16 noises,
    fixed seed) of the checkpoints at steps 20, 60 and 100 shows the loss falling and the accuracy rising."""
    data, embeds = write_training_set(tmp_path / "pairs", n_pairs=64, size=(10, 12), chosen_darker=True)
    out = tmp_path / "run"
    trainer = PSATrainer(tiny_config(
        tiny_sd15_path, data, embeds, out, resolution=8, precompute=True, train_batch_size=32, max_train_steps=100,
        checkpointing_steps=20, beta_dpo=100.0, learning_rate=3e-3, proportion_empty_prompts=0.0, user_dropout=0.0,
    ))
    trainer.train()
    evals = {
        step: _eval_dpo(trainer, load_file(str(out / f"checkpoint-{step}" / "model.safetensors")))
        for step in (20, 60, 100)
    }
    losses, accuracies = [evals[s][0] for s in sorted(evals)], [evals[s][1] for s in sorted(evals)]
    assert losses == sorted(losses, reverse=True) and losses[-1] < math.log(2) - 0.03, evals
    assert accuracies[-1] > accuracies[0] and accuracies[-1] > 0.7, evals  # chance: 0.5
    logged = read_metrics(out)
    first, last = range(1, 21), range(81, 101)
    def mean(key, steps):
        return np.mean([logged[s][key] for s in steps])

    assert mean("loss", last) < mean("loss", first) - 0.02
    assert mean("implicit_acc", last) > mean("implicit_acc", first) + 0.1


# ---------------------------------------------------------------------------------------------- dropout and sharing


def test_text_and_user_dropout_are_drawn_once_per_pair_at_their_rates(
    tiny_sdxl_path, training_set, tmp_path, monkeypatch
):
    data, embeds = training_set
    trainer = PSATrainer(tiny_config(
        tiny_sdxl_path, data, embeds, tmp_path / "run", proportion_empty_prompts=0.3, user_dropout=0.1,
    ))
    captured = []
    monkeypatch.setattr(objectives_module, "dpo_step_loss", lambda *args: captured.append(args))
    batch = collate_pairs([trainer.dataset[(0, i)] for i in range(8)])
    inputs = trainer._batch_inputs(batch)
    monkeypatch.setattr(trainer, "_batch_inputs", lambda batch: inputs)  # encode once, draw dropout 50 times
    for _ in range(50):
        trainer._micro_step(batch)
    texts = [args[5] for args in captured]
    null_users = torch.cat([args[8] for args in captured])
    empty_rows = torch.cat([(t.prompt_embeds == 0).flatten(1).all(1) for t in texts])  # SDXL: zeros
    zero_pooled = torch.cat([(t.pooled_embeds == 0).all(1) for t in texts])
    assert torch.equal(empty_rows, zero_pooled)  # prompt and pooled embeddings drop together
    assert len(empty_rows) == 400 and 0.22 < empty_rows.float().mean() < 0.38
    assert 0.05 < null_users.float().mean() < 0.15
    assert all(len(t) == 8 for t in texts)  # one draw per pair; chosen and rejected reuse it


def unet_with_random_adapter(model_path: Path):
    """The tiny UNet (frozen), its scheduler and an attached adapter with random (trained-like) weights."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model_path, subfolder="unet").requires_grad_(False)
    scheduler = DDPMScheduler.from_pretrained(model_path, subfolder="scheduler")
    adapter = PSAAdapter.for_unet(unet, USER_DIM).attach(unet)
    with torch.no_grad():
        for param in adapter.parameters():
            param.normal_(0, 0.3)
    return unet, scheduler, adapter


def test_chosen_and_rejected_share_noise_and_timestep(tiny_sd15_path):
    """Identical chosen and rejected latents give identical errors (loss ln 2) only if their noise
    and timesteps are shared, even with a trained (random) adapter."""
    unet, scheduler, adapter = unet_with_random_adapter(tiny_sd15_path)
    latents = torch.randn(3, 4, 8, 8)
    out = objectives_module.dpo_step_loss(
        unet, adapter, adapter, scheduler, torch.cat([latents, latents]), TextConditioning(torch.randn(3, 77, 32)),
        None, torch.randn(3, USER_DIM), torch.zeros(3, dtype=torch.bool), beta=1.0,
    )
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)  # unshared noise: off by ~1e-2
    assert out.model_mse.item() != pytest.approx(out.reference_mse.item(), abs=1e-6)  # the adapter acts


def test_reference_pass_runs_first_without_adapter_or_autograd(tiny_sd15_path):
    """The no-grad reference pass comes before the adapted pass, so its working memory is freed
    before the adapted pass's saved activations are held (peak memory: the larger, not the sum)."""
    unet, scheduler, adapter = unet_with_random_adapter(tiny_sd15_path)
    calls = []
    unet.register_forward_pre_hook(lambda module, args: calls.append((adapter.enabled, torch.is_grad_enabled())))
    objectives_module.dpo_step_loss(
        unet, adapter, adapter, scheduler, torch.randn(4, 4, 8, 8), TextConditioning(torch.randn(2, 77, 32)),
        None, torch.randn(2, USER_DIM), torch.zeros(2, dtype=torch.bool), beta=1.0,
    )
    assert calls == [(False, False), (True, True)]


def test_timestep_bias_decides_which_timesteps_the_unet_sees(tiny_sd15_path, training_set, tmp_path):
    from psalign.training.timesteps import timestep_weights

    unet, scheduler, adapter = unet_with_random_adapter(tiny_sd15_path)
    seen = []
    unet.register_forward_pre_hook(lambda module, args: seen.append(args[1].clone()))
    inputs = (torch.randn(64, 4, 8, 8), TextConditioning(torch.randn(32, 77, 32)), None,
              torch.randn(32, USER_DIM), torch.zeros(32, dtype=torch.bool))
    weights = timestep_weights(scheduler.config.num_train_timesteps, "earlier", multiplier=0.0, portion=0.5)
    objectives_module.dpo_step_loss(unet, adapter, adapter, scheduler, *inputs, 1.0, 0.0, weights)
    model_t, reference_t = seen
    assert torch.equal(model_t, reference_t) and torch.equal(model_t[:32], model_t[32:])  # shared per pair
    assert model_t.min() >= 500 and len(set(model_t.tolist())) > 10
    seen.clear()
    torch.manual_seed(3)
    objectives_module.dpo_step_loss(unet, adapter, adapter, scheduler, *inputs, 1.0)
    torch.manual_seed(3)
    torch.randn(32, 4, 8, 8)  # the step draws its noise first
    assert torch.equal(seen[0][:32], torch.randint(0, 1000, (32,)))  # no bias: the draws of before

    data, embeds = training_set  # the trainer builds the weights from its config, with the scheduler's length
    trainer = PSATrainer(tiny_config(tiny_sd15_path, data, embeds, tmp_path / "run", timestep_bias_strategy="later",
                                     timestep_bias_portion=0.1, timestep_bias_multiplier=3.0))
    assert trainer.timestep_weights.tolist() == [1.0] * 900 + [3.0] * 100
    with pytest.raises(InputError, match="timestep_bias_begin/end: need 0 <= begin < end <= 1000"):
        PSATrainer(tiny_config(tiny_sd15_path, data, embeds, tmp_path / "bad", timestep_bias_strategy="range",
                               timestep_bias_begin=10, timestep_bias_end=2000))


def test_chosen_loss_weight_adds_the_chosen_error_gap_to_the_step_loss(
    tiny_sd15_path, training_set, tmp_path, monkeypatch
):
    unet, scheduler, adapter = unet_with_random_adapter(tiny_sd15_path)
    inputs = (torch.randn(6, 4, 8, 8), TextConditioning(torch.randn(3, 77, 32)), None,
              torch.randn(3, USER_DIM), torch.zeros(3, dtype=torch.bool))
    losses = {}
    for weight in (0.0, 4.0):
        torch.manual_seed(1)  # the same noise and timesteps for both weights
        losses[weight] = objectives_module.dpo_step_loss(unet, adapter, adapter, scheduler, *inputs, 1.0, weight)
    gap = losses[0.0].chosen_mse_gap.item()
    assert gap != pytest.approx(0.0, abs=1e-6)
    assert losses[4.0].loss.item() == pytest.approx(losses[0.0].loss.item() + 4.0 * gap, rel=1e-6)

    data, embeds = training_set  # the trainer passes the configured weight to every step
    trainer = PSATrainer(tiny_config(tiny_sd15_path, data, embeds, tmp_path / "run", chosen_loss_weight=2.5))
    captured = []
    monkeypatch.setattr(objectives_module, "dpo_step_loss", lambda *args: captured.append(args))
    trainer._micro_step(collate_pairs([trainer.dataset[(0, i)] for i in range(2)]))
    assert captured[0][9:] == (trainer.config.beta_dpo, 2.5, None)  # None: uniform timesteps


# ---------------------------------------------------------------------------------------------- inputs


def test_bad_inputs_fail_before_any_model_is_loaded(tiny_sd15_path, tmp_path, monkeypatch):
    from diffusers import UNet2DConditionModel

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", no_loading)
    data, embeds = write_training_set(tmp_path / "pairs")
    (embeds / "embedding_stats.npz").unlink()
    with pytest.raises(InputError) as err:
        PSATrainer(tiny_config(
            tiny_sd15_path, data, embeds, tmp_path / "out", model_type="sdxl", report_to="tensorboard_that_is_missing",
            resume_from_checkpoint=str(tmp_path / "nowhere"),
        ))
    text = str(err.value)
    assert "model_type is 'sdxl'" in text and "one text encoder" in text
    assert "embedding_stats.npz" in text
    assert "tensorboard_that_is_missing" in text
    assert "nowhere" in text and "resume_from_checkpoint" in text

    data, embeds = write_training_set(tmp_path / "pairs2")
    next(embeds.glob("0*.npy")).unlink()
    with pytest.raises(InputError, match="has no embedding"):
        PSATrainer(tiny_config(tiny_sd15_path, data, embeds, tmp_path / "out"))


# ---------------------------------------------------------------------------------------------- multi-process


@pytest.mark.slow
def test_two_process_accelerate_launch_writes_one_adapter(tiny_sd15_path, tmp_path):
    """A real two-process ``accelerate launch`` of train_psa.py (gloo on CPU) with the SD1.5 config,
    sharded precompute, checkpoints and validation. ``--cpu --num_processes 2`` starts a single
    process unless MPI is set up (accelerate 1.x), so the CPU run goes through torchrun with
    ``ACCELERATE_USE_CPU=1``."""
    data, embeds = write_training_set(tmp_path / "pairs", n_pairs=72)
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "train_psa.py"),
        "--config", str(REPO / "configs" / "sd15.yaml"),
        "--pretrained_model", str(tiny_sd15_path), "--train_data", str(data), "--embeds_folder", str(embeds),
        "--output_dir", str(out), "--resolution", "16", "--train_batch_size", "1", "--gradient_accumulation_steps", "2",
        "--max_train_steps", "2", "--checkpointing_steps", "1", "--mixed_precision", "no", "--report_to", "none",
        "--precompute", "--validation_steps", "2", "--validation_num_inference_steps", "1",
        "--learning_rate", "1e-3", "--lr_warmup_steps", "0",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert sorted(p.name for p in out.glob("psa_*")) == ["psa_adapter.safetensors", "psa_config.json"]
    adapter = PSAAdapter.from_pretrained(out)
    assert adapter.config.extra["global_step"] == 2
    assert adapter.config.extra["training_args"]["beta_dpo"] == 5000.0  # from configs/sd15.yaml
    assert len(cache_files(out / "cache", 72)) == 3 and all(f.is_file() for f in cache_files(out / "cache", 72))
    assert {p.name for p in (out / "checkpoint-2").glob("rng_state_*.safetensors")} == {
        "rng_state_0.safetensors", "rng_state_1.safetensors"
    }
    assert (out / "validation" / "step-000002.png").is_file()
    metrics = read_metrics(out)
    assert sorted(metrics) == [1, 2] and metrics[2]["loss"] != pytest.approx(math.log(2), abs=1e-6)
    assert result.stdout.count("equal weight sums on all 2 processes") == 1  # the replica check ran
    assert result.stdout.count("PSA adapter written") == 1
