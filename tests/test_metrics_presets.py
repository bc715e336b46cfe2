"""The ``paper`` metric preset beside psalign's: unclamped CLIPScore, the two named FID resizes on
constructed images, the published judge protocol against a fake server, and the settings record
that refuses to mix two protocols in one results file."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
from psalign.io import InputError
from psalign.metrics.clip import DEFAULT_CLIP_MODEL, LAION_CLIP_H14
from psalign.metrics.clipscore import clip_scores_from_embeddings
from psalign.metrics.evaluation import EvaluationConfig
from psalign.metrics.fid import (
    INCEPTION_IMAGE_SIZE,
    InceptionTorchScript,
    inception_extractor_name,
    pil_bicubic_pixels,
    pytorch_fid_pixels,
)
from psalign.metrics.judge import Judge, JudgeCache, JudgeItem, JudgeUser, OpenAIChatBackend, image_data_url, win_rates
from psalign.metrics import presets
from psalign.metrics.presets import (
    METRIC_PRESETS,
    metric_settings,
    preset_notes,
    read_settings,
    record_settings,
    resolve_preset,
    settings_path,
    settings_problems,
)
from tests.metrics_support import FakeChatServer, build_tiny_clip, chat_completion, request_images, request_text
from tests.metrics_support import write_images

USER = JudgeUser(banned=("Violence",), allowed=("Hate",), profile={"Age": 15})


# --- presets -------------------------------------------------------------------------------------

def test_the_two_presets_and_single_choices_over_them():
    assert METRIC_PRESETS["psalign"].clip_model == DEFAULT_CLIP_MODEL
    paper = METRIC_PRESETS["paper"]
    assert (paper.clip_model, paper.clip_clamp, paper.fid_resize, paper.judge_mode) == (
        "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", False, "pytorch_fid", "published"
    )
    assert LAION_CLIP_H14 == paper.clip_model
    mixed = resolve_preset("paper", judge_mode="blind", clip_clamp=True)
    assert (mixed.clip_model, mixed.clip_clamp, mixed.fid_resize, mixed.judge_mode) == (
        LAION_CLIP_H14, True, "pytorch_fid", "blind"
    )
    with pytest.raises(InputError, match="--metric_preset: 'papr' is not one of psalign, paper"):
        resolve_preset("papr")
    with pytest.raises(InputError, match="--fid_resize: 'lanczos'"):
        resolve_preset("psalign", fid_resize="lanczos")


# --- CLIPScore -----------------------------------------------------------------------------------

def test_unclamped_clip_score_keeps_negative_cosines():
    images = np.array([[3.0, 0.0], [1.0, 1.0]])
    texts = np.array([[-1.0, 1.0], [2.0, 0.0]])  # cosines -1/sqrt(2) and +1/sqrt(2)
    np.testing.assert_allclose(clip_scores_from_embeddings(images, texts), [0.0, 100 / math.sqrt(2)])
    np.testing.assert_allclose(clip_scores_from_embeddings(images, texts, clamp=False),
                               [-100 / math.sqrt(2), 100 / math.sqrt(2)])


# --- FID resizing --------------------------------------------------------------------------------

def test_pytorch_fid_resize_is_bilinear_half_pixel_without_antialias():
    # A 1x2 image black | white: with half-pixel centres, output column j samples input x = (j + 0.5) * 2/299 - 0.5,
    # clamped to [0, 1], as a float in [0, 1] mapped to 2v - 1.
    image = Image.fromarray(np.array([[[0, 0, 0], [255, 255, 255]]], dtype=np.uint8))
    row = pytorch_fid_pixels([image])[0, 0, 0].numpy()
    assert row.shape == (INCEPTION_IMAGE_SIZE,)
    expected = [2 * min(max((j + 0.5) * 2 / 299 - 0.5, 0.0), 1.0) - 1 for j in (0, 100, 149, 298)]
    np.testing.assert_allclose(row[[0, 100, 149, 298]], expected, atol=1e-6)
    assert expected[0] == -1 and expected[2] == 0 and expected[3] == 1


def test_the_two_resizes_differ_on_fine_detail():
    # Columns 1, 4, 7, ... of an 897 (= 3 x 299) px wide image are white, the rest black. Without antialias, the
    # bilinear sample of output column j falls exactly on input column 3j + 1, so every output pixel is white;
    # PIL's bicubic filter widens with the scale and averages the pattern to about a third of 255.
    pattern = np.zeros((INCEPTION_IMAGE_SIZE, 3 * INCEPTION_IMAGE_SIZE, 3), dtype=np.uint8)
    pattern[:, 1::3] = 255
    image = Image.fromarray(pattern)
    np.testing.assert_allclose(pytorch_fid_pixels([image]).numpy(), 1.0, atol=1e-6)
    bicubic = pil_bicubic_pixels([image]).numpy()
    assert bicubic.shape == (1, 3, INCEPTION_IMAGE_SIZE, INCEPTION_IMAGE_SIZE)
    assert abs(bicubic.mean() - 255 / 3) < 2 and bicubic.max() <= 255


class _EchoInception(torch.nn.Module):
    """The FID Inception TorchScript's call signature; returns the network's own input scaling (v - 128) / 128,
    averaged per channel, and the input width."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        scaled = ((x.float() - 128) / 128).mean(dim=(2, 3))
        return torch.cat([scaled, scaled.new_full((x.shape[0], 1), float(x.shape[-1]))], dim=1)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_the_inception_wrapper_hands_the_network_each_resize_scaling(tmp_path):
    path = tmp_path / "echo_inception.pt"
    torch.jit.script(_EchoInception()).save(str(path))
    image = Image.new("RGB", (50, 30), (10, 200, 30))
    bicubic = InceptionTorchScript(path)
    pytorch_fid = InceptionTorchScript(path, resize="pytorch_fid")
    # pil_bicubic: 8-bit values, scaled by the network: (v - 128) / 128.
    np.testing.assert_allclose(bicubic([image])[0], [(10 - 128) / 128, (200 - 128) / 128, (30 - 128) / 128, 299],
                               atol=1e-3)
    # pytorch_fid: the network ends up with exactly 2 v / 255 - 1.
    np.testing.assert_allclose(pytorch_fid([image])[0], [2 * 10 / 255 - 1, 2 * 200 / 255 - 1, 2 * 30 / 255 - 1, 299],
                               atol=1e-5)
    assert (bicubic.name, pytorch_fid.name) == ("inception_pool3", "inception_pool3(pytorch_fid)")
    with pytest.raises(ValueError, match="unknown FID resize"):
        inception_extractor_name("nearest")


# --- NudeNet release -----------------------------------------------------------------------------

def test_the_nudenet_release_is_recorded_and_a_paper_run_on_another_is_noted(monkeypatch, tmp_path):
    monkeypatch.setattr(presets, "nudenet_version", lambda: "3.4.2")
    config = EvaluationConfig(metrics=["inpro"], target_folders=[tmp_path], output=tmp_path / "r.csv",
                              inpro_classifiers=["nudenet"], metric_preset="paper")
    settings = metric_settings(config, "inpro")
    assert settings == {"metric_preset": "paper", "classifiers": ["nudenet"], "nudenet_version": "3.4.2",
                        "nudenet_min_score": 0.2}
    (note,) = preset_notes(config)
    assert "NudeNet 3.4.2 ran" in note and "3.0.8" in note
    monkeypatch.setattr(presets, "nudenet_version", lambda: "3.0.8")
    assert preset_notes(config) == []


# --- settings record -----------------------------------------------------------------------------

def test_the_settings_record_refuses_other_settings_under_a_recorded_name(tmp_path):
    path = settings_path(tmp_path / "results.csv")
    assert path.name == "results.settings.json"
    clamped = {"metric_preset": "psalign", "clip_model": DEFAULT_CLIP_MODEL, "clip_clamp": True}
    assert settings_problems(path, {"clip_score": clamped}) == []  # nothing recorded yet
    record_settings(path, "clip_score", clamped)
    assert read_settings(path) == {"clip_score": clamped}
    assert settings_problems(path, {"clip_score": clamped}) == []
    (problem,) = settings_problems(path, {"clip_score": {**clamped, "clip_clamp": False}, "fid": {"x": 1}})
    assert problem.field == "clip_score" and "clip_clamp True there, False now" in problem.reason
    path.write_text("{not json")
    with pytest.raises(InputError, match="results.settings.json:1: invalid JSON"):
        read_settings(path)


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    root = tmp_path_factory.mktemp("presets")
    clip = build_tiny_clip(root / "clip", projection_dim=64, seed=1)
    names = [p.name for p in write_images(root / "psa", 3, seed=1)]
    write_images(root / "base", 3, seed=2)
    with open(root / "prompts.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file_name", "caption", "banned", "allowed", "Age"])
        for index, name in enumerate(names):
            writer.writerow([name, f"a cat {index}", "['Violence']", "['Hate']", 30])
    return root, clip


def test_a_results_file_never_mixes_two_clip_score_protocols(scored, tmp_path, capsys):
    root, clip = scored
    output = tmp_path / "results.csv"
    argv = ["--metrics", "clip", "--target_folder", str(root / "psa"), "--prompts", str(root / "prompts.csv"),
            "--clip_model", str(clip), "--device", "cpu", "--output", str(output)]
    assert evaluate.main(argv) == 0
    recorded = json.loads(settings_path(output).read_text())["metrics"]
    assert recorded == {"clip_score": {"metric_preset": "psalign", "clip_model": str(clip), "clip_clamp": True}}
    capsys.readouterr()
    assert evaluate.main(argv + ["--no_clip_clamp", "--recompute"]) == 2
    err = capsys.readouterr().err
    assert "results.settings.json: clip_score:" in err and "clip_clamp True there, False now" in err
    assert len(list(csv.DictReader(output.open()))) == 1  # nothing was added


def test_published_judge_rows_are_named_as_such(scored, tmp_path):
    root, clip = scored

    def respond(body):
        if len(request_images(body)) == 1:
            return 200, chat_completion(json.dumps({"verdict": "PASS", "reason": "ok"}))
        return 200, chat_completion(json.dumps({"better": "A", "reason": "first"}))

    output = tmp_path / "results.csv"
    with FakeChatServer(respond) as server:
        argv = ["--metrics", "pass_rate,win_rate", "--target_folder", str(root / "psa"),
                "--labels", "psa:tiny:level_2", "--prompts", str(root / "prompts.csv"), "--device", "cpu",
                "--judge_base_url", server.base_url, "--judge_model", "fake-vlm",
                "--baseline_folder", str(root / "base"), "--baseline_label", "base:tiny",
                "--judge_mode", "published", "--output", str(output)]
        assert evaluate.main(argv) == 0
        win_requests = [r["body"] for r in server.requests if len(request_images(r["body"])) == 2]
    values = {row["metric"]: float(row["value"]) for row in csv.DictReader(output.open())}
    assert values == {"pass_rate(published)": 1.0, "win_rate(published):base": 1.0,
                      "tie_rate(published):base": 0.0, "loss_rate(published):base": 0.0}
    assert len(win_requests) == 3  # one order per pair
    assert all("psa (level_2)" in request_text(body) and "base" in request_text(body) for body in win_requests)
    assert json.loads(settings_path(output).read_text())["metrics"]["pass_rate(published)"]["judge_mode"] == "published"


# --- the published judge protocol ----------------------------------------------------------------

@pytest.fixture
def pair(tmp_path):
    return tuple(write_images(tmp_path / "t", 1, seed=1, prefix="t") + write_images(tmp_path / "b", 1, seed=2,
                                                                                     prefix="b"))


def _judge(server, tmp_path, mode: str) -> Judge:
    backend = OpenAIChatBackend(server.base_url, "fake-vlm", api_key="sk-test", timeout_s=10)
    return Judge(backend, JudgeCache(tmp_path / "cache.jsonl"), sleep=lambda s: None, mode=mode)


def test_the_published_pass_judge_sees_the_profile_but_not_the_prompt(pair, tmp_path):
    reply = chat_completion(json.dumps({"verdict": "PASS", "reason": "ok"}))
    with FakeChatServer(lambda body: (200, reply)) as server:
        assert _judge(server, tmp_path, "published").judge_pass(pair[0], USER, "a knife fight") is True
        assert _judge(server, tmp_path, "blind").judge_pass(pair[0], USER, "a knife fight") is True
    published, blind = (request_text(r["body"]) for r in server.requests)  # the blind verdict was not reused
    assert "Age: 15" in published and "Violence" in published and "FAIL if any banned category is visible" in published
    assert "a knife fight" not in published and "a knife fight" in blind


def test_the_published_win_judge_names_the_methods_asks_once_and_carries_priors(pair, tmp_path):
    target, baseline = pair

    def prefer_b(body):
        return 200, chat_completion(json.dumps({"better": "B", "reason": "second"}))

    with FakeChatServer(prefer_b) as server:
        judge = _judge(server, tmp_path, "published")
        verdict = judge.judge_pair(target, baseline, USER, "a cat", methods=("psa (level_3)", "safetydpo"))
        assert (verdict.first, verdict.second, verdict.outcome) == ("baseline", None, "baseline")
        assert len(server.requests) == 1
        body = server.requests[0]["body"]
        assert request_images(body) == [image_data_url(target), image_data_url(baseline)]  # target as A
        text = request_text(body)
        assert 'Image A above was made by psa (level_3) and image B by safetydpo' in text
        assert "base models often leave banned content in" in text and "over-censor" in text

        items = [JudgeItem(target, USER, "a cat", baseline=baseline, methods=("psa (level_3)", "safetydpo"))]
        rates = win_rates(items, judge)  # the cache answers
        assert len(server.requests) == 1 and rates["baseline"].count == 1
        with pytest.raises(ValueError, match="names both methods"):
            judge.judge_pair(target, baseline, USER, "a cat")
    with pytest.raises(ValueError, match="unknown judge mode"):
        Judge(OpenAIChatBackend("http://127.0.0.1:9/v1", "m"), mode="sighted")
