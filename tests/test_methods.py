"""Plug-and-play alignment methods behind one interface."""

import json
from pathlib import Path
import sys
import textwrap

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image, ImageOps
from safetensors.torch import load_file, save_file

import infer
from psalign.inference import InferenceConfig, run_inference, sample_seed
from psalign.methods import Method, get_method, method_names, register_method
from psalign.methods.prompt import engineer_prompt

from .test_infer import pixels, write_prompts

STEPS = ["--num_inference_steps", "2", "--guidance_scale", "3.0"]
PROMPTS = [
    {"file_name": "a.png", "caption": "a man holding a rifle", "user_data": {"safety_level": "strict"}},
    {"file_name": "b.png", "caption": "a cat", "user_data": {"safety_level": "permissive"}},
]


@pytest.fixture(scope="module")
def base_images(tmp_path_factory, tiny_sd15_path):
    out = tmp_path_factory.mktemp("base")
    prompts = write_prompts(out / "p.jsonl", PROMPTS)
    assert infer.main(["--sd_model", str(tiny_sd15_path), "--meta_data", str(prompts), "--save_path", str(out),
                       *STEPS]) == 0
    return out


def run_method(tiny_sd15_path, tmp_path, *extra, prompts=PROMPTS):
    out = tmp_path / "out"
    code = infer.main(["--sd_model", str(tiny_sd15_path), "--meta_data", str(write_prompts(tmp_path / "p.jsonl", prompts)),
                       "--save_path", str(out), *STEPS, *extra])
    assert code == 0
    log = {e["file_name"]: e for e in map(json.loads, (out / "generation_log.jsonl").read_text().splitlines())}
    return out, log


def test_builtin_methods_are_registered():
    assert {"base", "psa", "safetydpo", "prompt", "erased_unet", "sld"} <= set(method_names())
    with pytest.raises(ValueError, match="unknown method 'nope'; available: base"):
        get_method("nope")


def test_prompt_engineering_text_is_exactly_as_documented():
    banned = ("Violence", "Sexuality")
    assert engineer_prompt("a cat", None, banned, "instruction") == (
        "a cat, without violence or weapons, nudity or sexual content", None)
    assert engineer_prompt("a cat", "blurry", banned, "negative") == (
        "a cat", "blurry, violence or weapons, nudity or sexual content")
    assert engineer_prompt("a cat", None, banned, "both") == (
        "a cat, without violence or weapons, nudity or sexual content", "violence or weapons, nudity or sexual content")
    assert engineer_prompt("a cat", "blurry", (), "both") == ("a cat", "blurry")


def test_prompt_method_changes_the_text_condition_and_only_that(tiny_sd15_path, tmp_path, base_images):
    out, log = run_method(tiny_sd15_path, tmp_path, "--method", "prompt", "--prompt_mode", "both")
    assert log["a.png"]["method"] == "prompt" and log["a.png"]["prompt_mode"] == "both"
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15_path, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    prompt, negative = engineer_prompt("a man holding a rifle", None, tuple(
        ["Hate", "Harassment", "Violence", "Self-Harm", "Sexuality", "Shocking", "Propaganda"]), "both")
    expected = pipe([prompt], negative_prompt=[negative], num_inference_steps=2, guidance_scale=3.0,
                    generator=[torch.Generator().manual_seed(sample_seed(0, "a.png"))]).images[0]
    assert (np.asarray(expected, dtype=np.int16) == pixels(out / "a.png")).all()
    # the permissive user bans nothing: same image as the base model
    assert (pixels(out / "b.png") == pixels(base_images / "b.png")).all()


def test_prompt_method_needs_users_with_banned_categories(tiny_sd15_path, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "p.jsonl", [{"file_name": "a.png", "caption": "c",
                                                   "user_data": {"User_ID": "0000001"}}])
    code = infer.main(["--sd_model", str(tiny_sd15_path), "--meta_data", str(prompts), "--save_path",
                       str(tmp_path / "o"), "--method", "prompt"])
    assert code == 2 and "p.jsonl:1: user_data: user 0000001 has no profile here" in capsys.readouterr().err


def test_safetydpo_method_loads_a_diffusers_lora(tiny_sd15_path, tmp_path, base_images):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15_path, safety_checker=None)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.3)
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    out, log = run_method(tiny_sd15_path, tmp_path, "--lora_path", str(tmp_path / "lora"))
    assert log["a.png"]["method"] == "safetydpo" and log["a.png"]["lora"] == str(tmp_path / "lora")
    assert not (pixels(out / "a.png") == pixels(base_images / "a.png")).all()


def test_erased_unet_round_trip_and_mismatch(tiny_sd15_path, tmp_path, base_images):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd15_path, subfolder="unet")
    state = {k: v.clone() for k, v in unet.state_dict().items() if ".attn2.to_k" in k or ".attn2.to_v" in k}
    gen = torch.Generator().manual_seed(0)
    for key in state:
        state[key] += 0.5 * torch.randn(state[key].shape, generator=gen)
    save_file(state, str(tmp_path / "erased.safetensors"))
    method = get_method("erased_unet")(tmp_path / "erased.safetensors")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15_path, safety_checker=None)
    method.prepare(pipe, [], "cpu")
    assert method.replaced == len(state) > 0
    for key, value in load_file(str(tmp_path / "erased.safetensors")).items():
        assert torch.equal(pipe.unet.state_dict()[key], value)
    out, log = run_method(tiny_sd15_path, tmp_path, "--method", "erased_unet",
                          "--unet_weights", str(tmp_path / "erased.safetensors"))
    assert log["a.png"]["method"] == "erased_unet"
    assert not (pixels(out / "a.png") == pixels(base_images / "a.png")).all()

    state["not.a.unet.key"] = torch.zeros(1)
    state[next(iter(state))] = torch.zeros(3, 3)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"unknown key not\.a\.unet\.key(.|\n)*shape mismatch"):
        get_method("erased_unet")(tmp_path / "bad.safetensors").prepare(pipe, [], "cpu")


def test_sld_generates_on_sd15_and_refuses_sdxl(tiny_sd15_path, tiny_sdxl_path, tmp_path, base_images):
    out, log = run_method(tiny_sd15_path, tmp_path, "--method", "sld", "--sld_preset", "strong")
    assert log["a.png"]["method"] == "sld" and log["a.png"]["sld_guidance_scale"] == 2000
    assert Image.open(out / "a.png").size == (32, 32)
    from diffusers import StableDiffusionXLPipeline

    with pytest.raises(ValueError, match="SD1.x pipelines only"):
        get_method("sld")().prepare(StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path), [], "cpu")


def test_sld_concept_replaces_diffusers_default_and_steers_the_images(tiny_sd15_path, tmp_path, capsys):
    concept = "NSFW, Hate, Harassment, Violence, Self-Harm, Sexuality, Shocking, Propaganda"
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15_path, safety_checker=None)
    default = get_method("sld")("max").prepare(pipe, [], "cpu")
    custom = get_method("sld")("max", concept).prepare(pipe, [], "cpu")
    assert custom.safety_concept == concept and default.safety_concept not in (concept, None)
    # through infer.py: the concept is logged (None: diffusers' own) and changes what is drawn
    common = ["--method", "sld", "--sld_preset", "max"]  # max: safety guidance from the first step
    (tmp_path / "default").mkdir()
    (tmp_path / "custom").mkdir()
    out_default, log_default = run_method(tiny_sd15_path, tmp_path / "default", *common)
    out_custom, log_custom = run_method(tiny_sd15_path, tmp_path / "custom", *common, "--sld_concept", concept)
    assert log_default["a.png"]["sld_concept"] is None and log_custom["a.png"]["sld_concept"] == concept
    assert not (pixels(out_default / "a.png") == pixels(out_custom / "a.png")).all()
    with pytest.raises(ValueError, match="SLD concept must be a non-empty text"):
        get_method("sld")("medium", "  ")
    code = infer.main(["--sd_model", str(tiny_sd15_path), "--meta_data", str(tmp_path / "default" / "p.jsonl"),
                       "--save_path", str(tmp_path / "blank"), *common, "--sld_concept", ""])
    assert code == 2 and "SLD concept must be a non-empty text" in capsys.readouterr().err


@register_method
class MirrorMethod(Method):
    """A plug-in defined outside the library: the base image, mirrored."""

    name = "test_mirror"

    def generate(self, pipe, batch, call_kwargs):
        return [ImageOps.mirror(image) for image in pipe(**call_kwargs).images]

    def log_params(self):
        return {"mirrored": True}


def test_a_method_defined_in_a_test_module_plugs_in(tiny_sd15_path, tmp_path, base_images):
    out = tmp_path / "mirror"
    run_inference(InferenceConfig(meta_data=write_prompts(tmp_path / "p.jsonl", PROMPTS), save_path=out,
                                  sd_model=str(tiny_sd15_path), method="test_mirror", device="cpu",
                                  settings=infer.parse_args(["--meta_data", "x", "--save_path", "y", "--sd_model", "z",
                                                             *STEPS]).settings))
    assert (pixels(out / "a.png") == pixels(base_images / "a.png")[:, ::-1]).all()
    assert json.loads((out / "generation_log.jsonl").read_text().splitlines()[0])["mirrored"] is True


def test_a_plugin_module_is_imported_by_name(tiny_sd15_path, tmp_path, monkeypatch):
    (tmp_path / "my_plugin.py").write_text(textwrap.dedent('''
        from psalign.methods import Method, register_method

        @register_method
        class Gray(Method):
            name = "gray_plugin"

            def generate(self, pipe, batch, call_kwargs):
                return [im.convert("L").convert("RGB") for im in pipe(**call_kwargs).images]
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    out, log = run_method(tiny_sd15_path, tmp_path, "--method", "my_plugin:gray_plugin")
    image = pixels(out / "a.png")
    assert log["a.png"]["method"] == "gray_plugin" and (image[..., 0] == image[..., 1]).all()
    sys.modules.pop("my_plugin", None)


def test_conflicting_method_flags_are_reported(tiny_sd15_path, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS)
    code = infer.main(["--sd_model", str(tiny_sd15_path), "--meta_data", str(prompts), "--save_path",
                       str(tmp_path / "o"), "--method", "base", "--load_psa"])
    assert code == 2 and "--method base conflicts with --load_psa" in capsys.readouterr().err


def test_evaluation_labels_folders_from_the_generation_log(tiny_sd15_path, tmp_path):
    from psalign.metrics.evaluation import EvaluationConfig, folder_labels

    prompts = [{"file_name": "a.png", "caption": "a cat", "user_data": {"safety_level": "moderate"}}]
    out, _ = run_method(tiny_sd15_path, tmp_path, "--method", "prompt", "--prompt_mode", "negative", prompts=prompts)
    (tmp_path / "plain").mkdir()
    labels = folder_labels(EvaluationConfig(metrics=["inpro"], target_folders=[out, tmp_path / "plain"],
                                            output=tmp_path / "r.csv"))
    assert (labels[0].method, labels[0].model, labels[0].level) == ("prompt", Path(tiny_sd15_path).name, "level_3")
    assert labels[1].method == "plain"
