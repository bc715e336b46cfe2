"""SDXL micro-conditioning: training's add_time_ids follow ``sdxl_micro_conditioning`` (default:
``[R, R, 0, 0, R, R]``, what inference passes), the adapter config records the choice, and
inference warns when an adapter was trained with the source images' sizes and crops."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

from psalign.adapter import PSAAdapter, PSAAdapterConfig, micro_conditioning_warning
from psalign.io import InputError
from psalign.methods.psa import PSAMethod
from psalign.training import PSATrainer, train
from psalign.training.conditioning import sdxl_time_ids, training_time_ids
from psalign.training.data import collate_pairs

from .training_support import USER_DIM, tiny_config, write_training_set


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def training_set(tmp_path_factory):
    return write_training_set(tmp_path_factory.mktemp("pairs"))


def test_training_time_ids_by_hand():
    original, crop = torch.tensor([[600, 800], [512, 512]]), torch.tensor([[0, 144], [8, 0]])
    assert training_time_ids(original, crop, 512, "target_size").tolist() == [[512, 512, 0, 0, 512, 512]] * 2
    assert training_time_ids(original, crop, 512, "source_size").tolist() == [
        [600, 800, 0, 144, 512, 512], [512, 512, 8, 0, 512, 512]
    ]
    assert torch.equal(training_time_ids(original, crop, 512, "source_size"), sdxl_time_ids(original, crop, 512))
    with pytest.raises(ValueError, match="unknown sdxl_micro_conditioning 'both'"):
        training_time_ids(original, crop, 512, "both")


def test_the_training_default_is_what_inference_passes_and_bad_values_are_refused(tiny_sdxl_path, training_set,
                                                                                  tmp_path):
    data, embeds = training_set
    assert tiny_config(tiny_sdxl_path, data, embeds, tmp_path).sdxl_micro_conditioning == "target_size"
    with pytest.raises(InputError, match="--sdxl_micro_conditioning: 'crop' is not one of target_size, source_size"):
        tiny_config(tiny_sdxl_path, data, embeds, tmp_path, sdxl_micro_conditioning="crop")


@pytest.mark.parametrize("choice", ["target_size", "source_size"])
def test_the_trainer_conditions_and_records_as_configured(tiny_sdxl_path, training_set, tmp_path, choice):
    data, embeds = training_set
    trainer = PSATrainer(tiny_config(tiny_sdxl_path, data, embeds, tmp_path / "run", random_crop=True,
                                     sdxl_micro_conditioning=choice))
    assert trainer.adapter.config.sdxl_micro_conditioning == choice
    batch = collate_pairs([trainer.dataset[(0, i)] for i in range(4)])
    time_ids = trainer._batch_inputs(batch)[3]
    if choice == "target_size":
        assert time_ids.tolist() == [[16, 16, 0, 0, 16, 16]] * 4
    else:
        assert torch.equal(time_ids, sdxl_time_ids(batch["original_size"], batch["crop_top_left"], 16))
        assert time_ids[:, :2].tolist() != [[16, 16]] * 4  # the training images are not 16 px squares


def test_a_trained_adapter_records_the_choice_in_its_config(tiny_sdxl_path, training_set, tmp_path):
    data, embeds = training_set
    out = train(tiny_config(tiny_sdxl_path, data, embeds, tmp_path / "run", max_train_steps=1,
                            sdxl_micro_conditioning="source_size"))
    recorded = json.loads((out / "psa_config.json").read_text())
    assert recorded["sdxl_micro_conditioning"] == "source_size"
    assert PSAAdapter.from_pretrained(out).config.sdxl_micro_conditioning == "source_size"


def test_sd15_adapters_record_nothing_and_old_configs_load(tiny_sd15_path):
    unet = UNet2DConditionModel.from_pretrained(tiny_sd15_path, subfolder="unet")
    adapter = PSAAdapter.for_unet(unet, USER_DIM, sdxl_micro_conditioning="source_size")
    assert adapter.config.sdxl_micro_conditioning is None
    assert adapter.config.sdxl_micro_conditioning is None
    old = {k: v for k, v in adapter.config.to_dict().items() if k != "sdxl_micro_conditioning"}
    assert PSAAdapterConfig.from_dict(old).sdxl_micro_conditioning is None


def test_the_warning_by_hand():
    assert micro_conditioning_warning(None, None, (512, 512)) is None
    assert micro_conditioning_warning("target_size", 512, (512, 512)) is None
    assert micro_conditioning_warning("target_size", None, (768, 512)) is None  # resolution not recorded
    other = micro_conditioning_warning("target_size", 512, (768, 512))
    assert "trained at 512 px" in other and "[768, 512, 0, 0, 768, 512]" in other and "--height 512 --width 512" in other
    assert "source_size" in micro_conditioning_warning("source_size", 512, (512, 512))


def test_inference_warns_when_training_conditioning_differs(tiny_sdxl_path, tmp_path, capsys):
    from psalign.inference.generate import GenerationSettings
    from psalign.inference.run import _warn_micro_conditioning

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    for choice in ("source_size", "target_size"):
        adapter = PSAAdapter.for_unet(pipe.unet, USER_DIM, sdxl_micro_conditioning=choice)
        adapter.save_pretrained(tmp_path / choice, extra={"training_args": {"resolution": 32}})
    methods = {}
    for choice in ("source_size", "target_size"):
        methods[choice] = PSAMethod(tmp_path / choice)
        methods[choice].prepare(StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path), [], "cpu")
    assert methods["target_size"].sdxl_training_conditioning() == ("target_size", 32)
    _warn_micro_conditioning(pipe, methods["target_size"], GenerationSettings(height=32, width=32))
    assert "warning" not in capsys.readouterr().err
    _warn_micro_conditioning(pipe, methods["target_size"], GenerationSettings(height=64, width=32))
    assert "warning: psa: these weights were trained at 32 px" in capsys.readouterr().err
    _warn_micro_conditioning(pipe, methods["source_size"], GenerationSettings(height=32, width=32))
    err = capsys.readouterr().err
    assert "warning:" in err and "source_size" in err and "[H, W, 0, 0, H, W]" in err


def test_a_safetydpo_expert_reports_its_training_conditioning(tmp_path):
    from psalign.methods.safetydpo import LoRAMethod

    expert = tmp_path / "expert"
    expert.mkdir()
    (expert / "pytorch_lora_weights.safetensors").write_bytes(b"")
    assert LoRAMethod(expert).sdxl_training_conditioning() == (None, None)  # no training_info.json: a merged LoRA
    info = {"training_args": {"sdxl_micro_conditioning": "source_size", "resolution": 1024}, "global_step": 5}
    (expert / "training_info.json").write_text(json.dumps(info))
    method = LoRAMethod(expert / "pytorch_lora_weights.safetensors")
    assert method.check() == [] and method.sdxl_training_conditioning() == ("source_size", 1024)
    (expert / "training_info.json").write_text("{broken")
    problems = LoRAMethod(expert).check()
    assert [(p.file, p.line) for p in problems] == [(str(expert / "training_info.json"), 1)]
