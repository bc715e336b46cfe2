"""CLIPScore: how well an image matches its caption, ``100 · max(cos(image, caption), 0)``.

This is the scaling used by common implementations (e.g. torchmetrics); Hessel et al.'s paper
uses ``2.5 · max(cos, 0)``. Negative cosines are clipped to 0 as in both definitions; with
``clamp=False`` they are kept (``100 · cos``), as the PSA and SafetyDPO evaluation scripts do,
which only matters for badly mismatched pairs. Captions longer than the text encoder's 77 tokens
are truncated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from psalign.metrics.clip import ClipEmbedder
from psalign.metrics.images import batched, load_images

#: Scale applied to the clipped cosine.
CLIP_SCORE_SCALE = 100.0


def clip_scores_from_embeddings(
    image_embeddings: np.ndarray, text_embeddings: np.ndarray, clamp: bool = True
) -> np.ndarray:
    """(N,) scores of row-aligned (N, D) image and text embeddings (any norm); negative cosines
    count as 0 when ``clamp``."""
    images = image_embeddings / np.linalg.norm(image_embeddings, axis=-1, keepdims=True)
    texts = text_embeddings / np.linalg.norm(text_embeddings, axis=-1, keepdims=True)
    cosine = np.sum(images.astype(np.float64) * texts.astype(np.float64), axis=-1)
    return CLIP_SCORE_SCALE * (np.clip(cosine, 0.0, None) if clamp else cosine)


def clip_scores(
    paths: Sequence[Path],
    captions: Sequence[str],
    embedder: ClipEmbedder,
    batch_size: int,
    desc: str = "CLIPScore",
    clamp: bool = True,
) -> np.ndarray:
    """(N,) CLIPScore of each image at ``paths`` with the caption at the same index (``clamp``:
    see :func:`clip_scores_from_embeddings`)."""
    if len(paths) != len(captions):
        raise ValueError(f"{len(paths)} images but {len(captions)} captions")
    scores = []
    pairs = list(zip(paths, captions))
    with tqdm(total=len(pairs), desc=desc, unit="img") as progress:
        for batch in batched(pairs, batch_size):
            batch_paths, batch_captions = zip(*batch)
            image_embeddings = embedder.embed_images(load_images(batch_paths))
            text_embeddings = embedder.embed_texts(batch_captions)
            scores.append(clip_scores_from_embeddings(image_embeddings, text_embeddings, clamp))
            progress.update(len(batch))
    return np.concatenate(scores)
