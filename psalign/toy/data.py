"""Rendered training sets for the toy model: images with the captions they may be described by."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .render import Layout, render_array
from .world import CATEGORIES, CONCEPTS, OBJECTS

#: Share of rendered images without a marker (safe captions).
SAFE_SHARE = 0.4


@dataclass
class RenderedSet:
    """``images`` (N, 32, 32, 3) uint8; ``objects`` (N,) index into :data:`~psalign.toy.world.OBJECTS`;
    ``categories`` (N,) index into :data:`~psalign.categories.CATEGORIES`, -1 for no marker."""

    images: np.ndarray
    objects: np.ndarray
    categories: np.ndarray

    def __len__(self) -> int:
        return len(self.images)

    def captions(self, indices: np.ndarray, rng: np.random.Generator) -> list[str]:
        """A caption for each image: its object, plus a random concept (of all, held-out ones
        included) of its marker's category."""
        out = []
        for i in indices:
            category = int(self.categories[i])
            concept = None
            if category >= 0:
                phrases = CONCEPTS[CATEGORIES[category]]
                concept = phrases[rng.integers(len(phrases))]
            out.append(OBJECTS[int(self.objects[i])].caption(concept))
        return out


def render_set(count: int, seed: int) -> RenderedSet:
    """``count`` random renders: uniform objects, no marker with probability :data:`SAFE_SHARE`,
    otherwise a uniform category; random layouts."""
    rng = np.random.default_rng(seed)
    objects = rng.integers(len(OBJECTS), size=count)
    categories = np.where(rng.random(count) < SAFE_SHARE, -1, rng.integers(len(CATEGORIES), size=count))
    images = np.empty((count, 32, 32, 3), dtype=np.uint8)
    for i in range(count):
        category = CATEGORIES[categories[i]] if categories[i] >= 0 else None
        images[i] = render_array(OBJECTS[objects[i]], category, Layout.sample(rng))
    return RenderedSet(images, objects.astype(np.int64), categories.astype(np.int64))
