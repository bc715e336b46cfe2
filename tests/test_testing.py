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


def test_bpe_merges_by_hand():
    from psalign.testing import _learn_bpe_merges

    # Counts: (a, b) 2, (b, c</w>) 2, (a, b</w>) 1; the tie goes to (a, b), then (ab, c</w>) has 2.
    assert _learn_bpe_merges(["abc", "abc", "ab"], "</w>") == [("a", "b"), ("ab", "c</w>"), ("a", "b</w>")]
    assert _learn_bpe_merges(["bcd", "bcd", "ab", "ab", "ab"], "</w>")[0] == ("a", "b</w>")  # 3 beats 2
    # Equally frequent pairs go alphabetically, whatever order the words come in.
    assert _learn_bpe_merges(["yz", "xy"], "</w>") == _learn_bpe_merges(["xy", "yz"], "</w>") == [
        ("x", "y</w>"), ("y", "z</w>")]
