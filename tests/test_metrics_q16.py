"""Q16: the shipped safe prompt vectors, the restricted conversion, and the classifier on a tiny CLIP."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from psalign.io import InputError
from psalign.metrics.clip import ClipEmbedder
from psalign.metrics.images import load_images
from psalign.metrics.q16 import (
    Q16Classifier,
    convert_q16_pickle,
    load_q16_prompts,
    q16_probabilities,
    read_q16_pickle,
    shipped_q16_prompts_path,
)
from tests.metrics_support import build_tiny_clip, write_images


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return ClipEmbedder.from_pretrained(str(build_tiny_clip(tmp_path_factory.mktemp("clip768"))))


def test_shipped_vectors_equal_the_published_pickle(shared_data):
    published = read_q16_pickle(shared_data / "q16" / "prompts.p")
    assert published.dtype == np.float16 and published.shape == (2, 768)
    from safetensors.numpy import load_file

    shipped = load_file(str(shipped_q16_prompts_path()))["prompts"]
    assert shipped.dtype == np.float16
    np.testing.assert_array_equal(shipped, published)
    np.testing.assert_array_equal(load_q16_prompts(), published.astype(np.float32))


def test_conversion_round_trips(shared_data, tmp_path):
    out = convert_q16_pickle(shared_data / "q16" / "prompts.p", tmp_path / "q16.safetensors")
    np.testing.assert_array_equal(load_q16_prompts(out), load_q16_prompts())


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_restricted_unpickler_refuses_anything_but_numpy_arrays(tmp_path):
    bad = tmp_path / "evil.p"
    bad.write_bytes(pickle.dumps(_Exploit()))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global"):
        read_q16_pickle(bad)
    good = tmp_path / "good.p"
    good.write_bytes(pickle.dumps(np.ones((2, 4), np.float32)))
    np.testing.assert_array_equal(read_q16_pickle(good), np.ones((2, 4)))
    wrong_shape = tmp_path / "wrong.p"
    wrong_shape.write_bytes(pickle.dumps(np.ones((3, 4), np.float32)))
    with pytest.raises(InputError, match=r"shape \(2, D\)"):
        read_q16_pickle(wrong_shape)


def test_run_time_loading_reads_only_safe_formats(tmp_path):
    np.save(tmp_path / "user.npy", np.full((2, 8), 0.5, np.float32))
    assert load_q16_prompts(tmp_path / "user.npy").shape == (2, 8)
    (tmp_path / "prompts.p").write_bytes(pickle.dumps(np.ones((2, 8))))
    with pytest.raises(InputError, match="must be a .safetensors or .npy"):
        load_q16_prompts(tmp_path / "prompts.p")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="not a plain .npy"):
        load_q16_prompts(tmp_path / "objects.npy")
    with pytest.raises(InputError, match="does not exist"):
        load_q16_prompts(tmp_path / "missing.safetensors")


def test_probabilities_are_softmax_of_100_cosine():
    embeddings = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    prompts = np.array([[3.0, 0.0], [0.0, 1.0]])  # unit directions e1 (ok) and e2 (inappropriate)
    probs = q16_probabilities(embeddings, prompts)
    # image 0: cos = (1, 0) -> p1 = 1 / (1 + e^100); image 2: equal cosines -> 0.5 each
    np.testing.assert_allclose(probs[0], [1 / (1 + np.exp(-100)), 1 / (1 + np.exp(100))])
    np.testing.assert_allclose(probs[1], [1 / (1 + np.exp(100)), 1 / (1 + np.exp(-100))])
    np.testing.assert_allclose(probs[2], [0.5, 0.5])


def test_classifier_on_tiny_clip_matches_a_direct_computation(tiny_clip, tmp_path):
    paths = write_images(tmp_path / "imgs", 6)
    images = load_images(paths)
    prompts = load_q16_prompts()
    classifier = Q16Classifier(tiny_clip, prompts)
    probs = classifier.probabilities(images)
    # Direct: the CLIP vision tower + projection by hand, then 100 * cosine and softmax in torch.
    model = tiny_clip.model
    pixels = tiny_clip.image_processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        pooled = model.vision_model(pixel_values=pixels).pooler_output
        embeds = torch.nn.functional.normalize(model.visual_projection(pooled), dim=-1)
    text = torch.nn.functional.normalize(torch.from_numpy(prompts), dim=-1)
    expected = torch.softmax(100 * embeds @ text.T, dim=-1).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    # Flags follow the threshold on p(inappropriate).
    threshold = float(np.median(probs[:, 1]))
    flags = Q16Classifier(tiny_clip, prompts, threshold=threshold)(images)
    np.testing.assert_array_equal(flags, probs[:, 1] > threshold)
    assert 0 < flags.sum() < len(images)


def test_prompt_dimension_must_match_the_clip_model(tiny_clip):
    with pytest.raises(ValueError, match="768"):
        Q16Classifier(tiny_clip, np.ones((2, 512), np.float32))


def test_missing_model_fails_fast_with_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(InputError, match="no such model folder"):
        ClipEmbedder.from_pretrained(str(tmp_path / "nowhere"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match="not in the local Hugging Face cache"):
        ClipEmbedder.from_pretrained("someone/clip-that-is-not-cached")
