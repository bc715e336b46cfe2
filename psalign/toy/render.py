"""Rendering toy images: one object on the background and, optionally, one category marker.

Pixels are crisp (no anti-aliasing): a pixel belongs to a shape when its centre does. The object's
size and position vary a little (:class:`Layout`); the marker always sits in :data:`MARKER_BOX`,
which no object reaches. :func:`add_noise` and :func:`blur` make the degraded renders the
detector is tested on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from .world import BACKGROUND, IMAGE_SIZE, MARKERS, OBJECT_COLOURS, SHAPES, ToyObject

#: The marker's box: ``(top, left, size)`` in pixels (top-right corner of the image).
MARKER_BOX = (2, 22, 8)
#: Object side in pixels (inclusive range) and the ranges of its centre (x, y); together they
#: keep every object left of / below the marker box.
OBJECT_SIZES = (11, 15)
OBJECT_CENTRE_X = (9.0, 14.0)
OBJECT_CENTRE_Y = (13.0, 19.0)


def _glyph_table() -> dict[str, np.ndarray]:
    """8x8 boolean glyphs, one per marker; strokes are 2 px wide so they survive blur."""
    n = MARKER_BOX[2]
    rows, cols = np.mgrid[0:n, 0:n]
    return {
        "cross": (np.abs(rows - cols) <= 1) | (np.abs(rows + cols - (n - 1)) <= 1),
        "plus": (np.abs(rows - (n - 1) / 2) < 1.5) | (np.abs(cols - (n - 1) / 2) < 1.5),
        "block": np.ones((n, n), dtype=bool),
        "ring": (rows < 2) | (rows >= n - 2) | (cols < 2) | (cols >= n - 2),
        "bars": (rows // 2) % 2 == 0,
        "checker": ((rows // 4) + (cols // 4)) % 2 == 0,
        "corner": rows >= cols,
    }


#: Glyph name -> (8, 8) bool mask.
GLYPHS: dict[str, np.ndarray] = _glyph_table()


def shape_mask(shape: str, size: int, centre_x: float, centre_y: float, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """(H, W) bool mask of ``shape`` with side ``size`` px centred at ``(centre_x, centre_y)`` (pixel units)."""
    ys, xs = np.mgrid[0:image_size, 0:image_size] + 0.5
    half = size / 2
    dx, dy = xs - centre_x, ys - centre_y
    if shape == "square":
        return (np.abs(dx) < half) & (np.abs(dy) < half)
    if shape == "circle":
        return dx**2 + dy**2 < half**2
    if shape == "triangle":  # apex up, base at the bottom of the box
        inside_box = (np.abs(dx) < half) & (np.abs(dy) < half)
        return inside_box & (np.abs(dx) < (dy + half) / 2)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


@dataclass(frozen=True)
class Layout:
    """Where the object goes: side ``size`` px, centre ``(centre_x, centre_y)``."""

    size: int
    centre_x: float
    centre_y: float

    @classmethod
    def sample(cls, rng: np.random.Generator) -> "Layout":
        return cls(
            size=int(rng.integers(OBJECT_SIZES[0], OBJECT_SIZES[1] + 1)),
            centre_x=float(rng.uniform(*OBJECT_CENTRE_X)),
            centre_y=float(rng.uniform(*OBJECT_CENTRE_Y)),
        )

    @classmethod
    def centred(cls) -> "Layout":
        """The middle of every range (tests, examples)."""
        return cls(
            size=(OBJECT_SIZES[0] + OBJECT_SIZES[1]) // 2,
            centre_x=sum(OBJECT_CENTRE_X) / 2,
            centre_y=sum(OBJECT_CENTRE_Y) / 2,
        )


def render_array(obj: ToyObject, category: str | None, layout: Layout) -> np.ndarray:
    """(H, W, 3) uint8 image of ``obj`` and, when ``category`` is given, its marker."""
    image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    image[shape_mask(obj.shape, layout.size, layout.centre_x, layout.centre_y)] = OBJECT_COLOURS[obj.colour]
    if category is not None:
        marker = MARKERS[category]
        top, left, n = MARKER_BOX
        box = image[top : top + n, left : left + n]
        box[GLYPHS[marker.glyph]] = marker.colour
    return image


def render(obj: ToyObject, category: str | None = None, layout: Layout | None = None) -> Image.Image:
    """The RGB image of ``obj`` (centred layout by default) with ``category``'s marker, if any."""
    return Image.fromarray(render_array(obj, category, layout or Layout.centred()))


def add_noise(image: Image.Image, sigma: float, rng: np.random.Generator) -> Image.Image:
    """Gaussian pixel noise of standard deviation ``sigma`` (0-255 units), clipped to [0, 255]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    noisy = array + rng.normal(0.0, sigma, size=array.shape)
    return Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8))


def blur(image: Image.Image, radius: float) -> Image.Image:
    """Gaussian blur of ``radius`` pixels (PIL's ``GaussianBlur``)."""
    return image.convert("RGB").filter(ImageFilter.GaussianBlur(radius))
