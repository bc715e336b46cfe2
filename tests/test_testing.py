"""The tiny-model builders that the other tests rely on."""

from __future__ import annotations

import json

from psalign.testing import build_clip_tokenizer


def _vocab_and_merges(tokenizer) -> tuple[dict[str, int], list]:
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    return model["vocab"], model["merges"]


def test_clip_tokenizer_is_the_same_on_every_build():
    # The BPE trainer breaks frequency ties in hash order: unless the builder renumbers, ids (and
    # so every random tiny CLIP's outputs) change between builds, even in one process.
    first = _vocab_and_merges(build_clip_tokenizer())
    for _ in range(4):
        assert _vocab_and_merges(build_clip_tokenizer()) == first


def test_clip_tokenizer_merges_only_tokens_made_before():
    vocab, merges = _vocab_and_merges(build_clip_tokenizer())
    made = {token for token in vocab if len(token) == 1 or (token.endswith("</w>") and len(token) == 5)}
    for left, right in (m if isinstance(m, list) else m.split(" ") for m in merges):
        assert left in made and right in made, (left, right)
        made.add(left + right)
    tokenizer = build_clip_tokenizer()
    assert tokenizer.tokenize("a photo of a cat") == ["a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>"]
