"""Image folders: list the image files of a folder, check that they decode, load them in batches.

Only files whose extension is in :data:`IMAGE_EXTENSIONS` count as images, so captions, metadata
files and the like beside the images never enter a metric's denominator; hidden files (such as the
temporary file of a write cut short) are not images either.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

from PIL import Image, UnidentifiedImageError

from psalign.io import InputError, InputProblem

#: Lower-case file extensions treated as images.
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})


def is_image_file(path: Path) -> bool:
    """Whether ``path`` is a regular, not hidden file with an image extension (case-insensitive)."""
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def list_images(folder: str | Path) -> list[Path]:
    """The image files directly inside ``folder``, sorted by name (sub-folders are not searched).

    Raises :class:`InputError` when the folder does not exist or holds no image.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError([InputProblem(str(folder), 0, "image folder does not exist")])
    paths = sorted(p for p in folder.iterdir() if is_image_file(p))
    if not paths:
        known = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise InputError([InputProblem(str(folder), 0, f"no image files ({known}) in the folder")])
    return paths


def image_problems(paths: Sequence[Path]) -> list[InputProblem]:
    """One :class:`InputProblem` per file that PIL cannot identify or whose data is corrupt.

    This reads every file once without decoding pixels into memory, so it is cheap enough to run on
    all inputs before any model is loaded.
    """
    problems = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.verify()
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
            problems.append(InputProblem(str(path), 0, f"unreadable image: {error}"))
    return problems


def image_size_problems(paths: Sequence[Path], size: tuple[int, int], what: str) -> list[InputProblem]:
    """One :class:`InputProblem` per image whose (width, height) is not ``size``, which ``what``
    (e.g. a classifier) needs; only the file headers are read."""
    problems = []
    for path in paths:
        try:
            with Image.open(path) as image:
                found = image.size
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError):
            continue  # reported by image_problems
        if found != tuple(size):
            problems.append(InputProblem(str(path), 0, f"is {found[0]}x{found[1]} px; {what} reads only "
                                                       f"{size[0]}x{size[1]} px images"))
    return problems


def load_image(path: str | Path) -> Image.Image:
    """Decode ``path`` into an RGB image; raises :class:`InputError` naming the file when it cannot."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
        raise InputError([InputProblem(str(path), 0, f"unreadable image: {error}")]) from error


def load_images(paths: Sequence[Path]) -> list[Image.Image]:
    """Decode every path into an RGB image (see :func:`load_image`)."""
    return [load_image(path) for path in paths]


def batched(items: Sequence, batch_size: int) -> Iterator[Sequence]:
    """Consecutive slices of ``items`` of length ``batch_size`` (the last one may be shorter)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]
