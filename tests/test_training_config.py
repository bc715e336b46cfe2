"""Training arguments (YAML + flags), the recipe configs and launchers, data order and checkpoint
bookkeeping: everything of psalign.training that needs no model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from psalign.io import InputError
from psalign.training import load_training_config
from psalign.training.checkpoints import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_FORMAT_VERSION,
    PROGRESS_FILE,
    finish_checkpoint,
    latest_checkpoint,
    partial_path,
    resolve_resume,
)
from psalign.training.conditioning import sdxl_time_ids
from psalign.training.data import SeededPairs, epoch_batches

REPO = Path(__file__).resolve().parents[1]
REQUIRED = dict(pretrained_model="m", train_data="d", embeds_folder="e", output_dir="o")


def parse(argv):
    import train_psa

    from psalign.training import config_from_args

    return config_from_args(train_psa.parse_args(argv))


def test_flags_override_the_yaml_file_which_overrides_the_defaults(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(
        "pretrained_model: some/model\nlearning_rate: 5e-6\nmax_train_steps: 7\ntrain_batch_size: 3\n"
        "random_flip: true\nvalidation_prompts: [a cat, a dog]\n"
    )
    config = parse([
        "--config", str(config_file), "--sd_model", "other/model", "--train_data", "d", "--embeds_folder", "e",
        "--output_dir", "o", "--max_train_steps", "9", "--no-random_flip", "--validation_users", "0000001",
    ])
    assert config.pretrained_model == "other/model"  # --sd_model is --pretrained_model
    assert config.learning_rate == 5e-6  # YAML 1.1 reads 5e-6 as a string; it is converted
    assert config.max_train_steps == 9 and config.train_batch_size == 3 and config.random_flip is False
    assert config.validation_prompts == ["a cat", "a dog"] and config.validation_users == ["0000001"]
    assert config.proportion_empty_prompts == 0.2 and config.user_dropout == 0.1  # defaults


def test_bad_yaml_values_are_reported_with_file_line_and_field(tmp_path):
    config_file = tmp_path / "bad.yaml"
    config_file.write_text("pretrained_model: m\nlearning_rte: 1.0e-5\nmax_train_steps: many\nresolution: 500\n")
    with pytest.raises(InputError) as err:
        load_training_config(config_file, {"train_data": "d", "embeds_folder": "e", "output_dir": "o"})
    text = str(err.value)
    assert f"{config_file}:2: learning_rte: unknown argument" in text
    assert f"{config_file}:3: max_train_steps: expected a whole number, got 'many'" in text
    config_file.write_text("seed: 1\nresolution: 500\n")
    with pytest.raises(InputError, match=rf"{re.escape(str(config_file))}:2: resolution: must be a multiple of 8"):
        load_training_config(config_file, REQUIRED)


def test_missing_and_out_of_range_arguments_name_their_flags():
    with pytest.raises(InputError) as err:
        load_training_config(None, {"proportion_empty_prompts": 1.5, "chosen_loss_weight": -1, "output_dir": "o"})
    text = str(err.value)
    for name in ("pretrained_model", "train_data", "embeds_folder"):
        assert f"defaults: {name}: required" in text
    assert "command line: --proportion_empty_prompts: must be in [0, 1), got 1.5" in text
    assert "command line: --chosen_loss_weight: must be >= 0, got -1.0" in text
    with pytest.raises(InputError, match="validation_prompts: validation_steps is set but there are no"):
        load_training_config(None, {**REQUIRED, "validation_steps": 10})


def test_timestep_bias_arguments_are_checked_before_training():
    with pytest.raises(InputError) as err:
        load_training_config(None, {**REQUIRED, "timestep_bias_strategy": "middle", "timestep_bias_multiplier": -1,
                                    "timestep_bias_portion": 0, "timestep_bias_begin": 5, "timestep_bias_end": 5})
    text = str(err.value)
    assert "--timestep_bias_strategy: 'middle' is not one of none, earlier, later, range" in text
    assert "--timestep_bias_multiplier: must be >= 0, got -1.0" in text
    assert "--timestep_bias_portion: must be in (0, 1], got 0.0" in text
    assert "--timestep_bias_end: must be > timestep_bias_begin (5), got 5" in text
    config = load_training_config(None, {**REQUIRED, "timestep_bias_strategy": "earlier", "timestep_bias_multiplier": 0})
    assert (config.timestep_bias_strategy, config.timestep_bias_multiplier, config.timestep_bias_end) == ("earlier", 0.0, None)


@pytest.mark.parametrize(
    "kind, model, resolution, batch, accumulation, pairs_per_step",
    [
        ("sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5", 512, 6, 8, 192),
        ("sdxl", "stabilityai/stable-diffusion-xl-base-1.0", 1024, 2, 16, 128),
    ],
)
def test_recipe_configs_and_launchers(kind, model, resolution, batch, accumulation, pairs_per_step):
    flags = {k: v for k, v in REQUIRED.items() if k != "pretrained_model"}
    config = load_training_config(REPO / "configs" / f"{kind}.yaml", flags)
    assert config.pretrained_model == model and config.resolution == resolution
    assert (config.train_batch_size, config.gradient_accumulation_steps) == (batch, accumulation)
    assert config.learning_rate == 5e-6 and config.lr_scheduler == "constant_with_warmup"
    assert config.lr_warmup_steps == 500 and config.max_train_steps == 5000 and config.checkpointing_steps == 500
    assert config.mixed_precision == "bf16" and config.beta_dpo == 5000.0
    launcher = (REPO / "launchers" / f"train_psa_{kind}.sh").read_text()
    gpus = int(re.search(r'NUM_GPUS="\$\{NUM_GPUS:-(\d+)\}"', launcher)[1])
    assert gpus * batch * accumulation == pairs_per_step
    assert "python -m psalign.cli.launch" in launcher and f'--config "$ROOT/configs/{kind}.yaml"' in launcher


def test_help_lists_every_documented_flag(capsys):
    import train_psa

    with pytest.raises(SystemExit):
        train_psa.parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in (
        "--pretrained_model", "--sd_model", "--train_data", "--embeds_folder", "--output_dir", "--resolution",
        "--train_batch_size", "--gradient_accumulation_steps", "--learning_rate", "--lr_scheduler",
        "--lr_warmup_steps", "--max_train_steps", "--checkpointing_steps", "--checkpoints_total_limit",
        "--resume_from_checkpoint", "--mixed_precision", "--gradient_checkpointing", "--report_to", "--seed",
        "--beta_dpo", "--proportion_empty_prompts", "--user_dropout", "--num_user_tokens",
        "--dataloader_num_workers", "--precompute", "--config",
    ):
        assert flag in text, flag


def test_help_shows_the_option_groups_and_no_empty_defaults(capsys):
    import train_psa
    from psalign.training.config import OPTION_GROUPS

    with pytest.raises(SystemExit):
        train_psa.parse_args(["--help"])
    text = capsys.readouterr().out
    starts = [text.index(f"\n{title}:\n") for title in OPTION_GROUPS.values()]
    assert starts == sorted(starts)
    for first, start, end in zip(OPTION_GROUPS, starts, [*starts[1:], len(text)]):
        assert f"\n  --{first} " in text[start:end], first
    assert "(default: False)" not in text and "(default: None)" not in text


# ---------------------------------------------------------------------------------------------- data order


def test_epoch_batches_split_each_epoch_between_processes_without_overlap():
    per_process = [epoch_batches(23, 3, epoch=0, seed=5, process_index=r, num_processes=2) for r in range(2)]
    keys = [k for batches in per_process for batch in batches for k in batch]
    assert all(len(b) == 3 for batches in per_process for b in batches) and len(per_process[0]) == 3
    assert len(keys) == len(set(keys)) == 18  # 23 // (3 x 2) global batches, the rest dropped
    assert per_process[0] == epoch_batches(23, 3, epoch=0, seed=5, process_index=0, num_processes=2)
    assert per_process[0] != epoch_batches(23, 3, epoch=1, seed=5, process_index=0, num_processes=2)


class RandomItems(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        return {"draw": torch.rand(3)}


def test_seeded_items_do_not_depend_on_or_touch_the_global_rng():
    pairs = SeededPairs(RandomItems(), seed=1)
    torch.manual_seed(0)
    first = pairs[(0, 2)]["draw"]
    state = torch.get_rng_state()
    torch.rand(100)  # whatever happened before
    again = pairs[(0, 2)]["draw"]
    assert torch.equal(first, again) and not torch.equal(first, pairs[(1, 2)]["draw"])
    before = torch.get_rng_state()
    pairs[(0, 3)]
    assert torch.equal(before, torch.get_rng_state()) and not torch.equal(state, before)


def test_sdxl_time_ids_are_original_size_crop_and_target():
    ids = sdxl_time_ids(torch.tensor([[600, 800], [512, 512]]), torch.tensor([[0, 144], [0, 0]]), 512)
    assert ids.tolist() == [[600.0, 800.0, 0.0, 144.0, 512.0, 512.0], [512.0, 512.0, 0.0, 0.0, 512.0, 512.0]]


# ---------------------------------------------------------------------------------------------- checkpoints


def _checkpoint_of_run(folder: Path, run_id: str) -> None:
    """A checkpoint folder holding only its progress record (enough for rotation)."""
    folder.mkdir()
    record = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_FORMAT_VERSION, "global_step": 1,
              "run_id": run_id, "num_processes": 1}
    (folder / PROGRESS_FILE).write_text(json.dumps(record))


def test_latest_ignores_partial_checkpoints_and_the_limit_keeps_the_newest_of_this_run(tmp_path):
    for step in (2, 10, 4):
        _checkpoint_of_run(tmp_path / f"checkpoint-{step}", "this-run")
    _checkpoint_of_run(partial_path(tmp_path, 12), "this-run")
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    assert resolve_resume("latest", tmp_path) == tmp_path / "checkpoint-10"
    assert resolve_resume("latest", tmp_path / "empty") is None  # a fresh run
    with pytest.raises(FileNotFoundError, match="nowhere"):
        resolve_resume(str(tmp_path / "nowhere"), tmp_path)
    _checkpoint_of_run(tmp_path / "checkpoint-30", "another-run")  # older steps would sort it last
    (tmp_path / "checkpoint-1").mkdir()  # no progress record: not this run's either
    finish_checkpoint(tmp_path, 12, total_limit=2, run_id="this-run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-10", "checkpoint-12",
                                                          "checkpoint-30"]


def test_train_psa_exits_with_the_located_problems(capsys):
    import train_psa

    assert train_psa.main(["--train_data", "d", "--resolution", "12"]) == 2
    message = capsys.readouterr().err
    assert message.startswith("error: ") and "defaults: pretrained_model: required" in message
    assert "command line: --resolution: must be a multiple of 8" in message
