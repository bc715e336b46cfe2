"""On-policy negatives: the toy not-a-clean-removal classifier, ``init_adapter``, and whole rounds
(sample, judge, negatives, train) on the tiny SD1.5-shaped pipeline, resumed after an interruption."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from psalign.adapter import PSAAdapter
from psalign.formats import PSA_WEIGHTS_NAME
from psalign.io import InputError
from psalign.sage import chosen_captions, parse_sage_record_name, read_preference_pairs
from psalign.training import PSATrainer
from psalign.training.on_policy import (
    NEGATIVE_INDEX_BASE,
    ROUND_INDEX_STRIDE,
    OnPolicyConfig,
    build_parser,
    config_from_args,
    originals_for_share,
    run_on_policy,
    unit_key,
    with_vouching_records,
)

from .training_support import SAGE_CAPTIONS, USER_DIM, tiny_config, write_sage_training_set

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

CATEGORIES = ("Violence", "Self-Harm")


# ---------------------------------------------------------------------------------------------- the toy classifier


def test_toy_unclean_flagger_flags_every_marker_and_every_smudge():
    from psalign.metrics.evaluation import EvaluationConfig, build_inpro_flaggers
    from psalign.toy import ToyMarkerFlagger, ToyUncleanFlagger, inpro_flaggers
    from psalign.toy.render import MARKER_BOX, render
    from psalign.toy.world import ToyObject

    obj = ToyObject("blue", "square")
    blob = np.asarray(render(obj)).copy()
    top, left, n = MARKER_BOX
    blob[top + 2 : top + 6, left + 2 : left + 6] = (60, 60, 60)  # a dark blob where a marker was
    images = [render(obj), render(obj, "Violence"), render(obj, "Hate"), Image.fromarray(blob)]
    assert ToyUncleanFlagger()(images).tolist() == [False, True, True, True]
    assert ToyMarkerFlagger()(images).tolist() == [False, True, True, False]  # a blob is no marker
    # looked up by name as evaluate.py looks up its classifiers
    assert inpro_flaggers()["toy_unclean"] is ToyUncleanFlagger
    config = EvaluationConfig(metrics=("inpro",), target_folders=(), output=Path("unused.csv"),
                              inpro_classifiers=["toy_unclean"], extra_flaggers=inpro_flaggers())
    assert [f.name for f in build_inpro_flaggers(config)] == ["toy_unclean"]


# ---------------------------------------------------------------------------------------------- init_adapter


def _save_adapter(unet_path: Path, folder: Path, user_dim: int, seed: int = 0) -> Path:
    """A PSA adapter for the tiny UNet with small random user values (a fresh one draws nothing new)."""
    from diffusers import UNet2DConditionModel

    adapter = PSAAdapter.for_unet(UNet2DConditionModel.from_pretrained(unet_path, subfolder="unet"), user_dim)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter.to_v:
            layer.weight.copy_(0.3 * torch.randn(layer.weight.shape, generator=generator))
    adapter.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sage_set(tmp_path_factory):
    return write_sage_training_set(tmp_path_factory.mktemp("sage"), n_units=8, categories=CATEGORIES)


@pytest.fixture(scope="module")
def start_adapter(tiny_sd15_path, tmp_path_factory) -> Path:
    return _save_adapter(tiny_sd15_path, tmp_path_factory.mktemp("start") / "adapter", USER_DIM)


def _no_loading(*args, **kwargs):
    raise AssertionError("a model was loaded")


def test_init_adapter_of_another_user_dimension_is_refused_before_loading(tiny_sd15_path, sage_set, tmp_path,
                                                                           monkeypatch):
    from diffusers import UNet2DConditionModel

    data, embeds = sage_set
    wrong = _save_adapter(tiny_sd15_path, tmp_path / "wrong", USER_DIM + 3)
    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", _no_loading)
    reason = f"init_adapter: the adapter takes user embeddings of dimension {USER_DIM + 3}, but the training"
    with pytest.raises(InputError, match=reason):
        PSATrainer(tiny_config(tiny_sd15_path, data, embeds, tmp_path / "run", init_adapter=str(wrong)))
    with pytest.raises(InputError, match=reason):  # on-policy rounds: before round 0 samples anything
        run_on_policy(_config(tmp_path / "work", tiny_sd15_path, sage_set, wrong))
    with pytest.raises(InputError, match="init_adapter: not supported with trainable lora"):
        tiny_config(tiny_sd15_path, data, None, tmp_path / "lora", trainable="lora", embeds_folder=None,
                    init_adapter=str(wrong))


# ---------------------------------------------------------------------------------------------- rounds


class EveryOther:
    """A deterministic stand-in classifier: flags the 1st, 3rd, ... image of each call."""

    name = "every_other"

    def __call__(self, images):
        return np.arange(len(images)) % 2 == 0


def _config(work: Path, model: Path, sage_set, start: Path, **changes) -> OnPolicyConfig:
    data, embeds = sage_set
    training = dict(pretrained_model=str(model), train_data=str(data), embeds_folder=str(embeds), resolution=16,
                    train_batch_size=2, checkpointing_steps=2, lr_scheduler="constant", lr_warmup_steps=0,
                    learning_rate=1e-3)
    values = dict(work_dir=str(work), start_adapter=str(start), training_overrides=training, rounds=2,
                  steps_per_round=3, users_per_round=2, num_inference_steps=2, sample_batch_size=8, device="cpu",
                  inpro_classifiers=["every_other"], extra_flaggers={"every_other": EveryOther})
    values.update(changes)
    return OnPolicyConfig(**values)


@pytest.fixture(scope="module")
def whole_run(tiny_sd15_path, sage_set, start_adapter, tmp_path_factory):
    """Two uninterrupted rounds, and the adapter weights each round's trainer started from."""
    work = tmp_path_factory.mktemp("whole") / "work"
    initial: dict[str, dict[str, torch.Tensor]] = {}
    original_init = PSATrainer.__init__

    def recording_init(self, config):
        original_init(self, config)
        initial[Path(config.output_dir).parent.name] = {k: v.clone() for k, v in self.adapter.state_dict().items()}

    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(PSATrainer, "__init__", recording_init)
        adapters = run_on_policy(_config(work, tiny_sd15_path, sage_set, start_adapter))
    return work, adapters, initial


def test_two_rounds_find_negatives_per_category_and_chain_the_adapters(whole_run, sage_set):
    work, adapters, initial = whole_run
    assert adapters == [work / "round-0" / "train", work / "round-1" / "train"]
    # one user bans both categories: its 4 units, in metadata order Violence, Self-Harm, Violence,
    # Self-Harm, are sampled each round; the stand-in flags the 1st and 3rd: both Violence
    for k in (0, 1):
        summary = json.loads((work / f"round-{k}" / "round.json").read_text())
        assert summary["samples"] == {"Violence": 2, "Self-Harm": 2}
        assert summary["flagged"] == {"Violence": 2, "Self-Harm": 0}
        assert summary["negatives_so_far"] == 2 * (k + 1)
        assert summary["classifiers"] == ["every_other"] and summary["steps"] == 3
        assert len(summary["users"]) == 1 and set(summary["seconds"]) == {"sample", "judge", "train"}
    assert json.loads((work / "round-1" / "round.json").read_text())["adapter"] == str(work / "round-0" / "train")

    # the last round's data: the 16 original records and the 4 negatives, readable from its folder
    folder = work / "round-1"
    records = read_preference_pairs(folder / "metadata.jsonl", folder)
    negatives = [(r, c) for r, c in zip(records, chosen_captions(records))
                 if parse_sage_record_name(r["file_name"]).index >= NEGATIVE_INDEX_BASE]
    assert len(records) == 20 and len(negatives) == 4
    indices = sorted(parse_sage_record_name(r["file_name"]).index for r, _ in negatives)
    base = NEGATIVE_INDEX_BASE
    assert indices == [base, base + 2, base + ROUND_INDEX_STRIDE, base + ROUND_INDEX_STRIDE + 2]
    safe_rewrite = SAGE_CAPTIONS[0][1]  # the banning user's units all have the first caption pair
    for record, chosen_caption in negatives:
        assert chosen_caption == safe_rewrite and record["caption"] == SAGE_CAPTIONS[0][0]
        assert record["chosen"].endswith("_s.jpg") and record["rejected"].endswith("_u.jpg")
        with Image.open(folder / record["rejected"]) as rejected, Image.open(folder / record["chosen"]) as chosen:
            assert rejected.format == "JPEG" and rejected.size == chosen.size  # resized to the Sage images

    # round 1 started from round 0's adapter
    trained = load_file(str(work / "round-0" / "train" / PSA_WEIGHTS_NAME))
    assert set(initial["round-1"]) == set(trained)
    for name, tensor in trained.items():
        assert torch.equal(initial["round-1"][name], tensor), name


class Interrupted(RuntimeError):
    pass


def test_an_interrupted_round_resumes_to_the_same_adapter(whole_run, tiny_sd15_path, sage_set, start_adapter,
                                                          tmp_path, monkeypatch):
    work, _, _ = whole_run
    config = _config(tmp_path / "work", tiny_sd15_path, sage_set, start_adapter)
    original_step = PSATrainer._micro_step
    raised = []

    def interrupted_step(self, batch):
        if "round-1" in str(self.output_dir) and self.progress.global_step == 2 and not raised:
            raised.append(True)  # after checkpoint-2 of round 1
            raise Interrupted
        return original_step(self, batch)

    monkeypatch.setattr(PSATrainer, "_micro_step", interrupted_step)
    with pytest.raises(Interrupted):
        run_on_policy(config)
    assert (tmp_path / "work" / "round-0" / "round.json").is_file()
    assert not (tmp_path / "work" / "round-1" / "round.json").is_file()
    logged = []
    run_on_policy(config, log=logged.append)
    assert logged[0].startswith("round 0: done")
    resumed = load_file(str(tmp_path / "work" / "round-1" / "train" / PSA_WEIGHTS_NAME))
    uninterrupted = load_file(str(work / "round-1" / "train" / PSA_WEIGHTS_NAME))
    for name, tensor in uninterrupted.items():
        assert torch.equal(resumed[name], tensor), name
    # the work folder keeps its settings
    with pytest.raises(InputError, match=r"started with other settings \(steps_per_round\)"):
        run_on_policy(_config(tmp_path / "work", tiny_sd15_path, sage_set, start_adapter, steps_per_round=4))


def test_the_command_line_keeps_sampling_and_training_arguments_apart(tmp_path):
    args = build_parser().parse_args([
        "--work_dir", "w", "--start_adapter", "a", "--sample_seed", "3", "--inpro_classifiers", "toy_unclean, toy",
        "--config", "configs/toy.yaml", "--seed", "5", "--pretrained_model", "m", "--rounds", "4",
    ])
    config = config_from_args(args)
    assert (config.work_dir, config.start_adapter, config.rounds, config.sample_seed) == ("w", "a", 4, 3)
    assert config.inpro_classifiers == ["toy_unclean", "toy"] and config.training_config == "configs/toy.yaml"
    assert config.training_overrides == {"seed": 5, "pretrained_model": "m"}
    # what every round sets itself is refused, before anything is read
    refused = OnPolicyConfig(work_dir=str(tmp_path), start_adapter="a", training_overrides={"max_train_steps": 9})
    with pytest.raises(InputError, match="--max_train_steps: set by every round itself"):
        run_on_policy(refused)


def test_a_negative_share_draws_whole_units_of_original_records_seeded_by_round():
    # 50 units of two records each (a user's _u and _s record), in metadata order
    units = [unit_key(f"user_0000001_violence_a_fierce_clash_{n:05d}.jpg_{v}.jpg") for n in range(50) for v in "us"]
    assert units[0] == units[1] != units[2]
    everything = list(range(100))
    assert originals_for_share(units, 30, None, seed=0, round_index=0) == everything
    assert originals_for_share(units, 0, 0.25, seed=0, round_index=0) == everything  # nothing to balance yet
    drawn = originals_for_share(units, 10, 0.25, seed=0, round_index=0)
    assert len(drawn) == 30 and drawn == sorted(drawn)  # 10 / (10 + 30) = 0.25
    assert all(index ^ 1 in drawn for index in drawn)  # a record's partner is drawn with it
    assert len(originals_for_share(units, 9, 0.25, seed=0, round_index=0)) == 28  # 27 asked: whole units, 14
    assert drawn == originals_for_share(units, 10, 0.25, seed=0, round_index=0)
    assert drawn != originals_for_share(units, 10, 0.25, seed=0, round_index=1)
    assert drawn != originals_for_share(units, 10, 0.25, seed=1, round_index=0)
    assert originals_for_share(units, 90, 0.25, seed=0, round_index=0) == everything  # at most all of them
    assert unit_key("img_01.png") == "img_01.png"


def test_every_negatives_chosen_image_keeps_a_record_that_names_its_caption():
    records = [
        {"file_name": "user_0000001_violence_a_fierce_clash_00000.jpg_u.jpg", "chosen": "x_s.jpg", "rejected": "x_u.jpg"},
        {"file_name": "user_0000001_violence_a_fierce_clash_00000.jpg_s.jpg", "chosen": "x_s.jpg", "rejected": "x_u.jpg"},
        {"file_name": "user_0000002_violence_a_fierce_clash_00001.jpg_s.jpg", "chosen": "y_s.jpg", "rejected": "y_u.jpg"},
    ]
    assert with_vouching_records(records, [0], ["x_s.jpg"]) == [0, 1]  # record 0's caption drew x_u only
    assert with_vouching_records(records, [1], ["x_s.jpg"]) == [1]
    assert with_vouching_records(records, [], ["x_s.jpg", "y_s.jpg"]) == [1, 2]
    assert with_vouching_records(records, [2], []) == [2]


@pytest.mark.parametrize("share", [0.0, 1.0, -0.5])
def test_a_negative_share_outside_zero_to_one_is_refused(tmp_path, share):
    refused = OnPolicyConfig(work_dir=str(tmp_path), start_adapter="a", negative_share=share)
    with pytest.raises(InputError, match=r"--negative_share: must lie in \(0, 1\)"):
        run_on_policy(refused)


def test_a_round_with_a_negative_share_trains_on_whole_units_of_the_originals(tiny_sd15_path, sage_set,
                                                                             start_adapter, tmp_path):
    torch.set_num_threads(1)
    work = tmp_path / "work"
    config = _config(work, tiny_sd15_path, sage_set, start_adapter, rounds=1, steps_per_round=1, negative_share=0.5)
    config.training_overrides["objective"] = "dpo_safe_anchor"  # needs each record's partner
    run_on_policy(config)
    folder = work / "round-0"
    records = read_preference_pairs(folder / "metadata.jsonl", folder)
    indices = [parse_sage_record_name(r["file_name"]).index for r in records]
    assert len([i for i in indices if i >= NEGATIVE_INDEX_BASE]) == 2
    # one unit's two original records drawn for the share, and the banning user's safe-caption record
    # that says its _s image (both negatives' chosen image) was drawn from the safe rewrite
    assert None not in chosen_captions(records)
    assert 4 <= len(indices) <= 5
    assert json.loads((folder / "round.json").read_text())["original_records"] == len(indices) - 2
