"""CLIPScore: the formula on hand-made embeddings and the batched pipeline on a tiny CLIP."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from psalign.metrics.clip import ClipEmbedder
from psalign.metrics.clipscore import clip_scores, clip_scores_from_embeddings
from psalign.metrics.images import load_images
from tests.metrics_support import build_tiny_clip, write_images


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return ClipEmbedder.from_pretrained(str(build_tiny_clip(tmp_path_factory.mktemp("clip64"), projection_dim=64)))


def test_score_is_100_times_the_cosine_clipped_at_zero():
    images = np.array([[1.0, 0.0], [3.0, 4.0], [1.0, 0.0]])
    texts = np.array([[2.0, 0.0], [4.0, 3.0], [-1.0, 0.1]])
    scores = clip_scores_from_embeddings(images, texts)
    np.testing.assert_allclose(scores, [100.0, 100 * 24 / 25, 0.0])


def test_batched_scores_match_a_direct_computation(tiny_clip, tmp_path):
    paths = write_images(tmp_path / "imgs", 5)
    captions = [
        "a photo of a cat sitting on a mat",
        "a man holding a rifle in a field",
        "a blue square",
        "two people arguing loudly in the street " * 20,  # longer than 77 tokens: truncated
        "a green triangle and a yellow star",
    ]
    scores = clip_scores(paths, captions, tiny_clip, batch_size=2)
    assert scores.shape == (5,)
    np.testing.assert_allclose(clip_scores(paths, captions, tiny_clip, batch_size=5), scores, atol=1e-4)

    model, tokenizer = tiny_clip.model, tiny_clip.tokenizer
    pixels = tiny_clip.image_processor(images=load_images(paths), return_tensors="pt")["pixel_values"]
    expected = []
    with torch.no_grad():
        image_embeds = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        for index, caption in enumerate(captions):
            ids = tokenizer(caption, truncation=True, max_length=77, return_tensors="pt")
            text_embeds = model.text_projection(model.text_model(**ids).pooler_output)
            cosine = torch.nn.functional.cosine_similarity(image_embeds[index : index + 1], text_embeds).item()
            expected.append(100 * max(cosine, 0.0))
    np.testing.assert_allclose(scores, expected, atol=1e-4)


def test_images_and_captions_must_align(tiny_clip, tmp_path):
    paths = write_images(tmp_path / "imgs", 2)
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        clip_scores(paths, ["one caption"], tiny_clip, batch_size=2)
