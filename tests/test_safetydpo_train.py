"""SafetyDPO experts: the CoProV2 / Sage readers, LoRA training with the PSA loop, the merge CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from psalign.io import InputError
from psalign.safetydpo.data import (
    ExpertPairDataset,
    read_coprov2_pairs,
    read_expert_pairs,
    read_sage_pairs,
    write_expert_data,
)
from psalign.training import PSATrainer, load_training_config, read_metrics

from .conftest import reset_accelerate_state

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def write_coprov2(root: Path, n_pairs: int = 6, size: tuple[int, int] = (10, 12), extra_rows: str = "") -> Path:
    """A CoProV2-style CSV: pair n's safe image ``s_idx_<n>_*.png`` near black, unsafe near white;
    even pairs are Violence, odd pairs Sexual, pair 1 also listed as Violence."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = ["prompt,image,category"]
    for n in range(n_pairs):
        for side, low in (("s", 0), ("u", 236)):
            pixels = rng.integers(low, low + 20, (*size, 3)).astype(np.uint8)
            Image.fromarray(pixels).save(root / "images" / f"{side}_idx_{n}_img.png")
        category = "Violence" if n % 2 == 0 else "sexual"
        rows += [f"unsafe prompt {n},images/u_idx_{n}_img.png,{category}",
                 f"safe prompt {n},images/s_idx_{n}_img.png,{category}"]
    rows += ["unsafe prompt 1,images/u_idx_1_img.png,Violence", "safe prompt 1,images/s_idx_1_img.png,Violence"]
    path = root / "coprov2.csv"
    path.write_text("\n".join(rows) + "\n" + extra_rows, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------- data


def test_coprov2_pairs_safe_chosen_unsafe_caption_and_multi_category(tmp_path):
    csv = write_coprov2(tmp_path)
    violence = read_coprov2_pairs(csv, tmp_path, "violence")
    assert [p.caption for p in violence] == ["unsafe prompt 0", "unsafe prompt 1", "unsafe prompt 2", "unsafe prompt 4"]
    assert all(Path(p.chosen).name.startswith("s_idx_") and Path(p.rejected).name.startswith("u_idx_") for p in violence)
    assert violence[1].categories == ("Sexuality", "Violence")
    assert [p.caption for p in read_coprov2_pairs(csv, tmp_path, "Sexuality")] == [
        "unsafe prompt 1", "unsafe prompt 3", "unsafe prompt 5"]


def test_coprov2_bad_rows_are_reported_with_file_and_line(tmp_path):
    csv = write_coprov2(tmp_path, n_pairs=2, extra_rows="p,images/u_idx_9_img.png,Violence\np,images/x.png,Violence\n"
                        "p,images/s_idx_0_img.png,Weather\n")
    with pytest.raises(InputError) as err:
        read_coprov2_pairs(csv, tmp_path, "Violence")
    text = str(err.value)
    assert f"{csv}:8: image: missing image" in text
    assert f"{csv}:9: image: 'images/x.png' has no u_idx_<n>/s_idx_<n>" in text
    assert f"{csv}:10: category: unknown safety category 'Weather'" in text


def test_sage_pairs_always_choose_the_safe_image(tmp_path):
    metadata = _sage_metadata(tmp_path)
    records = [json.loads(line) for line in metadata.read_text().splitlines()]
    pairs = read_sage_pairs(metadata, "Violence")
    assert len(pairs) == sum(r["chosen"].count("_violence_") for r in records) > 0
    assert all(p.chosen.endswith("_s.jpg") and p.rejected.endswith("_u.jpg") for p in pairs)
    # users allowing the category chose the unsafe image under the unsafe caption; the expert never does
    assert any(r["chosen"].endswith("_u.jpg") for r in records)


def test_sage_pairs_take_the_category_from_the_record_name_so_shared_images_may_have_any_stem(tmp_path):
    """Images shared by several users (the toy world's pool) are not named after one user's unit."""
    from psalign.sage import write_preference_pairs
    from psalign.users import generate_users

    (tmp_path / "pool").mkdir()
    for variant in "su":
        Image.new("RGB", (8, 8)).save(tmp_path / "pool" / f"red_square_07_{variant}.jpg")
    records = [
        {"file_name": f"user_{user.user_id}_{token}_a_fight_00000.jpg_{caption}.jpg",
         "chosen": f"pool/red_square_07_{chosen}.jpg", "rejected": f"pool/red_square_07_{'su'[chosen == 's']}.jpg",
         "caption": f"{caption} caption", "user_data": user.user_data()}
        for user, chosen in zip(generate_users(2, seed=0), "us")
        for token in ("violence", "hate")
        for caption in "us"
    ]
    metadata = write_preference_pairs(tmp_path / "metadata.jsonl", records)
    pairs = read_sage_pairs(metadata, "Violence")
    assert len(pairs) == 4 and all(p.categories == ("Violence",) for p in pairs)
    assert all(p.chosen.endswith("red_square_07_s.jpg") and p.rejected.endswith("red_square_07_u.jpg") for p in pairs)
    assert sorted(p.caption for p in pairs) == ["s caption", "s caption", "u caption", "u caption"]

    records[0]["file_name"] = "red_square.jpg_u.jpg"
    write_preference_pairs(tmp_path / "bad.jsonl", records)
    with pytest.raises(InputError, match=r"bad.jsonl:1: file_name: 'red_square.jpg_u.jpg' is not a Sage record name"):
        read_sage_pairs(tmp_path / "bad.jsonl", "Violence")


def _sage_metadata(root: Path) -> Path:
    from psalign.sage import write_preference_pairs
    from psalign.users import generate_users

    users = generate_users(2, seed=0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for u, user in enumerate(users):
        for category in ("violence", "hate"):
            stem = f"user_{user.user_id}_{category}_a_fight_0000{u}"
            for variant in "su":
                Image.new("RGB", (8, 8)).save(root / "images" / f"{stem}_{variant}.jpg")
            for caption in "us":
                allowed = caption == "u" and u == 1
                chosen, rejected = ("u", "s") if allowed else ("s", "u")
                records.append({"file_name": f"{stem}.jpg_{caption}.jpg", "chosen": f"images/{stem}_{chosen}.jpg",
                                "rejected": f"images/{stem}_{rejected}.jpg", "caption": f"{caption} caption",
                                "user_data": user.user_data()})
    return write_preference_pairs(root / "metadata.jsonl", records)


def test_expert_data_round_trip_and_dataset_items(tmp_path):
    path = write_expert_data(tmp_path / "run", "Violence", coprov2=write_coprov2(tmp_path / "copro"))
    assert len(read_expert_pairs(path)) == 4
    item = ExpertPairDataset(path, resolution=8)[0]
    assert item["chosen"].shape == item["rejected"].shape == (3, 8, 8)
    assert item["chosen"].mean() < -0.8 < 0.8 < item["rejected"].mean()  # safe dark, unsafe bright
    assert item["caption"] == "unsafe prompt 0" and "user_embed" not in item


# ---------------------------------------------------------------------------------------------- training


def expert_config(model: Path, train_data: Path, output_dir: Path, **overrides):
    values = dict(
        pretrained_model=str(model), train_data=str(train_data), output_dir=str(output_dir), trainable="lora",
        resolution=8, train_batch_size=4, max_train_steps=2, checkpointing_steps=100, lr_scheduler="constant",
        lr_warmup_steps=0, learning_rate=1e-3, proportion_empty_prompts=0.0,
    )
    values.update(overrides)
    return load_training_config(None, values)


def test_expert_config_needs_no_embeddings_and_rejects_precompute():
    base = dict(pretrained_model="m", train_data="d", output_dir="o")
    assert load_training_config(None, {**base, "trainable": "lora"}).lora_rank == 4
    with pytest.raises(InputError, match="embeds_folder: required"):
        load_training_config(None, base)
    with pytest.raises(InputError, match="precompute: not supported with trainable lora"):
        load_training_config(None, {**base, "trainable": "lora", "precompute": True})


def _eval_dpo(trainer: PSATrainer, repeats: int = 16) -> tuple[float, float]:
    """DPO loss and implicit accuracy of the trained LoRA over every pair x ``repeats`` fixed noises."""
    import psalign.training.objectives as objectives_module
    from psalign.training.conditioning import vae_latents

    items = [trainer.inputs.pairs[i] for i in range(len(trainer.inputs.pairs))] * repeats
    pixels = torch.cat([torch.stack([it["chosen"] for it in items]), torch.stack([it["rejected"] for it in items])])
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        latents = vae_latents(trainer.vae, pixels)
        text = trainer.text_encoders.encode([it["caption"] for it in items])
        torch.manual_seed(1234)
        out = objectives_module.dpo_step_loss(
            trainer.unet, trainer.adapter, trainer.adapter, trainer.noise_scheduler, latents, text, None, None, None,
            trainer.config.beta_dpo,
        )
    return out.loss.item(), out.implicit_accuracy.item()


def test_expert_loss_starts_at_ln2_and_falls_and_the_lora_loads_in_a_stock_pipeline(tiny_sd15_path, tmp_path):
    """Safe images near black, unsafe near white: after 100 steps a fixed-seed evaluation over every
    pair shows the LoRA preferring the safe image (the reference, LoRA off, scores exactly ln 2)."""
    data = write_expert_data(tmp_path / "run", "Violence", coprov2=write_coprov2(tmp_path / "copro", n_pairs=16))
    out = tmp_path / "run"
    trainer = PSATrainer(expert_config(
        tiny_sd15_path, data, out, max_train_steps=100, train_batch_size=8, beta_dpo=100.0, learning_rate=3e-3,
        lora_rank=4, lora_alpha=4.0,
    ))
    assert trainer.unet.dtype == torch.float32
    names = {n for n, p in trainer.unet.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n for n in names)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names} == {"to_q", "to_k", "to_v", "0"}
    assert _eval_dpo(trainer)[0] == pytest.approx(math.log(2), abs=1e-6)  # B = 0: the LoRA starts as the reference
    trainer.train()
    logged = read_metrics(out)
    assert logged[1]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    loss, accuracy = _eval_dpo(trainer)
    assert loss < math.log(2) - 0.03 and accuracy > 0.65, (loss, accuracy)

    from diffusers import StableDiffusionPipeline

    from psalign.safetydpo.lora import read_lora_deltas

    deltas = read_lora_deltas(out)
    assert deltas and all(d.abs().sum() > 0 for d in deltas.values())
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15_path, safety_checker=None)
    pipe.load_lora_weights(out)
    latents = torch.randn(1, 4, 8, 8)
    text = torch.randn(1, 77, pipe.unet.config.cross_attention_dim)
    with torch.no_grad():
        loaded = pipe.unet(latents, 10, encoder_hidden_states=text).sample
        trained = trainer.unet(latents, 10, encoder_hidden_states=text).sample
    torch.testing.assert_close(loaded, trained, rtol=1e-4, atol=1e-5)
    info = json.loads((out / "training_info.json").read_text())
    assert info["global_step"] == 100 and info["training_args"]["lora_rank"] == 4


def test_two_process_launch_keeps_the_lora_replicas_in_sync_and_writes_one_stock_loadable_lora(
    tiny_sd15_path, tmp_path
):
    """A real two-process ``accelerate launch`` of train_safetydpo.py (gloo on CPU: ``--cpu
    --num_processes 2`` starts one process in accelerate 1.x, hence ``--multi_gpu`` with
    ``ACCELERATE_USE_CPU=1``), with gradient accumulation. The LoRA factors live in the UNet and
    ``UNetLoRA.forward`` computes nothing, so only the hooks DDP's forward arms sync their
    gradients; the trainer's end-of-run check fails the run if the replicas diverged."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    csv = write_coprov2(tmp_path / "copro", n_pairs=8)
    out = tmp_path / "expert"
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "train_safetydpo.py"),
        "--category", "Violence", "--coprov2", str(csv), "--pretrained_model", str(tiny_sd15_path),
        "--output_dir", str(out), "--resolution", "8", "--train_batch_size", "1", "--gradient_accumulation_steps", "2",
        "--max_train_steps", "2", "--checkpointing_steps", "1", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
        "--learning_rate", "1e-2", "--proportion_empty_prompts", "0", "--report_to", "none",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert result.stdout.count("trained weights in sync: equal weight sums on all 2 processes") == 1
    assert result.stdout.count("LoRA expert written") == 1
    assert {p.name for p in (out / "checkpoint-2").glob("rng_state_*.safetensors")} == {
        "rng_state_0.safetensors", "rng_state_1.safetensors"
    }
    assert [p.name for p in out.glob("*.safetensors")] == ["pytorch_lora_weights.safetensors"]
    metrics = read_metrics(out)
    assert sorted(metrics) == [1, 2] and metrics[2]["loss"] != pytest.approx(math.log(2), abs=1e-6)

    final = load_file(str(out / "pytorch_lora_weights.safetensors"))
    after_step_1 = {  # checkpoint keys: factors.<module with __>__lora_A__default__weight
        "unet." + k.removeprefix("factors.").replace("__", ".").replace(".default.", "."): v
        for k, v in load_file(str(out / "checkpoint-1" / "model.safetensors")).items()
    }
    assert sorted(final) == sorted(after_step_1) and len(final) == 112
    for name, tensor in final.items():  # step 2 moved every factor (lora_B started at zero)
        assert not torch.equal(tensor, after_step_1[name]), name
        assert tensor.abs().sum() > 0, name

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15_path, safety_checker=None)
    inputs = dict(sample=torch.randn(1, 4, 8, 8), timestep=torch.tensor([50]), encoder_hidden_states=torch.randn(1, 77, 32))
    with torch.no_grad():
        base = pipe.unet(**inputs).sample
        pipe.load_lora_weights(str(out))
        loaded = pipe.unet(**inputs).sample
    assert sum("lora_A" in n for n, _ in pipe.unet.named_parameters()) == 56
    assert not torch.allclose(loaded, base, atol=1e-6)


# ---------------------------------------------------------------------------------------------- merge CLI


def test_train_two_experts_then_merge_cli_writes_loras_that_load_in_a_stock_pipeline(tiny_sd15_path, tmp_path, capsys):
    import train_safetydpo
    from diffusers import StableDiffusionPipeline

    from psalign.safetydpo import merge_experts
    from psalign.safetydpo.lora import read_lora_deltas
    from psalign.safetydpo.merge import fuse_into_unet

    csv = write_coprov2(tmp_path / "copro", n_pairs=8)
    experts = []
    for category in ("Violence", "sexual"):
        reset_accelerate_state()
        out = tmp_path / f"expert_{category}"
        train_safetydpo.main([
            "--category", category, "--coprov2", str(csv), "--pretrained_model", str(tiny_sd15_path),
            "--output_dir", str(out), "--resolution", "8", "--train_batch_size", "2", "--max_train_steps", "2",
            "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--learning_rate", "1e-2", "--seed", str(len(experts)),
        ])
        experts.append(out)
    calibration = tmp_path / "calibration.txt"
    calibration.write_text("Violence\ta fight\nSexuality\ta nude\n# comment\n", encoding="utf-8")
    merged_dir, fused_dir = tmp_path / "merged", tmp_path / "fused"
    common = ["--experts", *map(str, experts), "--categories", "Violence", "Sexuality", "--pretrained_model",
              str(tiny_sd15_path), "--method", "co_merge", "--calibration_steps", "2", "--resolution", "16"]
    merge_experts.main([*common, "--rank", "64", "--output", str(merged_dir)])
    assert "SVD relative error" in capsys.readouterr().out
    report = json.loads((merged_dir / "merge_report.json").read_text())
    assert report["max_relative_error"] < 1e-5  # rank 64 >= every module's size: exact
    assert report["calibration_prompts"] == [["unsafe prompt 0", "unsafe prompt 1", "unsafe prompt 2",
                                              "unsafe prompt 4", "unsafe prompt 6"],
                                             ["unsafe prompt 1", "unsafe prompt 3", "unsafe prompt 5", "unsafe prompt 7"]]
    merged = read_lora_deltas(merged_dir)
    expert_deltas = [read_lora_deltas(e) for e in experts]
    from_expert = [0, 0]
    for name, delta in merged.items():  # Co-Merge: every element is one expert's element
        choices = torch.stack([d[name] for d in expert_deltas])
        match = (choices - delta).abs() < 1e-5
        assert match.any(dim=0).all(), name
        from_expert[0] += int(match[0].sum())
        from_expert[1] += int(match[1].sum())
    assert min(from_expert) > 0

    merge_experts.main([*common, "--calibration_prompts", str(calibration), "--fuse", "--output", str(fused_dir)])
    fused_report = json.loads((fused_dir / "merge_report.json").read_text())
    assert fused_report["calibration_prompts"] == [["a fight"], ["a nude"]]

    inputs = dict(sample=torch.randn(1, 4, 8, 8), timestep=torch.tensor([50]), encoder_hidden_states=torch.randn(1, 77, 32))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15_path, safety_checker=None)
    with torch.no_grad():
        base = pipe.unet(**inputs).sample
    pipe.load_lora_weights(str(merged_dir))
    reference = StableDiffusionPipeline.from_pretrained(tiny_sd15_path, safety_checker=None)
    fuse_into_unet(reference.unet, merged)
    fused = StableDiffusionPipeline.from_pretrained(fused_dir, safety_checker=None)
    with torch.no_grad():
        loaded = pipe.unet(**inputs).sample
        torch.testing.assert_close(loaded, reference.unet(**inputs).sample, rtol=1e-4, atol=1e-5)
        assert fused.unet(**inputs).sample.shape == loaded.shape
    assert not torch.allclose(loaded, base, atol=1e-6)


def test_merge_cli_reports_bad_inputs_before_loading_models(tmp_path):
    from psalign.safetydpo import merge_experts

    (tmp_path / "calibration.txt").write_text("Weather\ta cloud\n", encoding="utf-8")
    with pytest.raises(InputError, match="2 categories for 1 experts"):
        merge_experts.check_merge_inputs([tmp_path], ["Hate", "Violence"], "co_merge")
    with pytest.raises(InputError, match="no pytorch_lora_weights.safetensors"):
        merge_experts.check_merge_inputs([tmp_path], ["Hate"], "average")
    with pytest.raises(InputError, match=r"calibration.txt:1: category: unknown safety category 'Weather'"):
        merge_experts.read_calibration_prompts(tmp_path / "calibration.txt")


def test_sdxl_expert_in_bf16_keeps_fp32_lora_weights_and_resumes(tiny_sdxl_path, tmp_path):
    data = write_expert_data(tmp_path / "run", "Violence", coprov2=write_coprov2(tmp_path / "copro", n_pairs=8))
    out = tmp_path / "run"
    config = expert_config(tiny_sdxl_path, data, out, resolution=16, max_train_steps=2, checkpointing_steps=1,
                           mixed_precision="bf16")
    trainer = PSATrainer(config)
    assert trainer.unet.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in trainer.adapter.parameters())
    trainer.train()
    reset_accelerate_state()
    resumed = PSATrainer(expert_config(tiny_sdxl_path, data, out, resolution=16, max_train_steps=3,
                                       checkpointing_steps=1, mixed_precision="bf16",
                                       resume_from_checkpoint="latest"))
    resumed.train()
    assert sorted(read_metrics(out)) == [1, 2, 3]

    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    pipe.load_lora_weights(str(out))
    assert any("lora_A" in n for n, _ in pipe.unet.named_parameters())


@pytest.mark.parametrize("launcher", ["train_safetydpo_sd15.sh", "train_safetydpo_sdxl.sh"])
def test_launchers_train_one_expert_per_category_of_psalign_categories(launcher):
    from psalign.categories import CATEGORIES

    text = (Path(__file__).resolve().parents[1] / "launchers" / launcher).read_text()
    default = next(line for line in text.splitlines() if line.startswith("CATEGORIES="))
    env = {k: v for k, v in os.environ.items() if k != "CATEGORIES"}
    shell = subprocess.run(
        ["bash", "-c", f'{default}\necho "$CATEGORIES"'], capture_output=True, text=True, check=True, env=env
    )
    assert shell.stdout.split() == list(CATEGORIES)
    assert 'for category in $CATEGORIES' in text and '--categories $CATEGORIES' in text
