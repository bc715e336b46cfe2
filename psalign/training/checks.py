"""Checks of the training data beyond its records, run before any model is loaded.

:func:`pair_data_problems` (Sage pairs) and :func:`expert_data_problems` (SafetyDPO expert pairs)
read every user's embedding and every image's header, so that a missing or non-finite embedding,
mixed embedding dimensions, an unreadable image or a pair of two sizes is reported as
``file:line: field: reason`` at the start rather than as a traceback mid-run.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from psalign.embeddings import EMBEDDING_STATS_FILE, find_user_embedding, load_user_embedding
from psalign.io import InputError, InputProblem

#: At most this many problems are listed one by one; the rest are counted.
MAX_LISTED_PROBLEMS = 50
#: A JPEG's last bytes must hold its end-of-image marker (a cut-off file lacks it; PIL's header read does not tell).
_JPEG_TAIL_BYTES = 1024


def numbered_json_lines(path: str | Path) -> Iterator[tuple[int, object]]:
    """``(line number, parsed value)`` of every non-blank line of a file its record reader accepted."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                yield number, json.loads(line)


def image_problem(path: Path) -> tuple[tuple[int, int] | None, str | None]:
    """``(size, None)`` for a readable image, ``(None, reason)`` otherwise. Reads the header and, for
    PNG, every chunk's checksum; a JPEG must end with its end-of-image marker. Pixels are not decoded."""
    try:
        with Image.open(path) as image:
            size, image_format = image.size, image.format
            image.verify()
        if image_format == "JPEG":
            with open(path, "rb") as handle:
                handle.seek(max(path.stat().st_size - _JPEG_TAIL_BYTES, 0))
                if b"\xff\xd9" not in handle.read():
                    return None, "the JPEG file is cut off (no end-of-image marker)"
    except UnidentifiedImageError:
        return None, "not an image file PIL can read"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        return None, f"corrupt image ({error})"
    return size, None


def pair_image_problems(metadata: Path, pairs: list[tuple[int, Path, Path]]) -> list[InputProblem]:
    """Problems of each ``(line, chosen image, rejected image)``: an unreadable image, or chosen and
    rejected of different sizes (they share one crop). Each distinct image is read once."""
    checked: dict[Path, tuple[tuple[int, int] | None, str | None]] = {}
    problems = []
    for line, chosen, rejected in pairs:
        sizes = {}
        for field, image in (("chosen", chosen), ("rejected", rejected)):
            if image not in checked:
                checked[image] = image_problem(image)
            sizes[field], reason = checked[image]
            if reason:
                problems.append(InputProblem(str(metadata), line, f"{image}: {reason}", field))
        if sizes["chosen"] and sizes["rejected"] and sizes["chosen"] != sizes["rejected"]:
            (cw, ch), (rw, rh) = sizes["chosen"], sizes["rejected"]
            problems.append(InputProblem(
                str(metadata), line,
                f"{rejected} is {rw}x{rh} px but the chosen image {chosen} is {cw}x{ch} px; "
                "the two images of a pair must have the same size", "rejected",
            ))
    return problems


def embedding_problems(
    metadata: Path, first_lines: dict[str, int], embeds_folder: Path, stats: tuple[np.ndarray, np.ndarray] | None
) -> list[InputProblem]:
    """Problems of the users' embeddings (``first_lines``: each user's first metadata line): a missing,
    unreadable or non-finite one, dimensions that differ from each other or from the statistics,
    and non-finite statistics."""
    problems, dims = [], {}
    for user_id, line in first_lines.items():
        if find_user_embedding(embeds_folder, user_id) is None:
            problems.append(InputProblem(
                str(metadata), line, f"user {user_id} has no embedding in {embeds_folder}; "
                "make it with `python -m psalign.embed`", "user_data.User_ID",
            ))
            continue
        try:
            dims[user_id] = load_user_embedding(embeds_folder, user_id).shape[0]
        except (OSError, ValueError) as error:
            problems.append(InputProblem(str(metadata), line, f"user {user_id}: {error}", "user_data.User_ID"))
    stats_file = embeds_folder / EMBEDDING_STATS_FILE
    if stats is not None:
        mean, std = stats
        if not (np.isfinite(mean).all() and np.isfinite(std).all()):
            problems.append(InputProblem(str(stats_file), 0, "the mean or std is not finite"))
    if not dims:
        return problems
    expected = stats[0].shape[0] if stats is not None else Counter(dims.values()).most_common(1)[0][0]
    source = f"{stats_file.name}" if stats is not None else "most users' embeddings"
    for user_id, dim in dims.items():
        if dim != expected:
            problems.append(InputProblem(
                str(metadata), first_lines[user_id],
                f"the embedding of user {user_id} has dimension {dim}, but {source} has {expected}",
                "user_data.User_ID",
            ))
    return problems


def _not_utf8(path: Path, error: UnicodeDecodeError) -> InputProblem:
    return InputProblem(str(path), 0, f"not UTF-8 text ({error.reason} at byte {error.start})")


def _bounded(problems: list[InputProblem], where: Path) -> list[InputProblem]:
    if len(problems) <= MAX_LISTED_PROBLEMS:
        return problems
    more = len(problems) - MAX_LISTED_PROBLEMS
    return [*problems[:MAX_LISTED_PROBLEMS], InputProblem(str(where), 0, f"and {more} more problem(s) like these")]


def pair_data_problems(
    metadata: Path, image_root: Path, embeds_folder: str | Path | None, stats: tuple[np.ndarray, np.ndarray] | None
) -> list[InputProblem]:
    """Every problem of Sage training pairs: their records (:func:`psalign.sage.read_preference_pairs`),
    then the users' embeddings (unless ``embeds_folder`` is None: none to check) and the images, as
    ``metadata:line`` problems."""
    from psalign.sage import read_preference_pairs

    try:
        read_preference_pairs(metadata, image_root)
    except InputError as error:
        return _bounded(error.problems, metadata)
    except UnicodeDecodeError as error:
        return [_not_utf8(metadata, error)]
    first_lines: dict[str, int] = {}
    pairs = []
    for line, record in numbered_json_lines(metadata):
        first_lines.setdefault(record["user_data"]["User_ID"], line)
        pairs.append((line, image_root / record["chosen"], image_root / record["rejected"]))
    problems = [] if embeds_folder is None else embedding_problems(metadata, first_lines, Path(embeds_folder), stats)
    problems += pair_image_problems(metadata, pairs)
    return _bounded(problems, metadata)


def expert_data_problems(path: Path) -> list[InputProblem]:
    """Every problem of SafetyDPO expert pairs: their records, then the images (paths relative to the file)."""
    from psalign.safetydpo.data import read_expert_pairs

    try:
        read_expert_pairs(path)
    except InputError as error:
        return _bounded(error.problems, path)
    except UnicodeDecodeError as error:
        return [_not_utf8(path, error)]
    pairs = [(line, path.parent / row["chosen"], path.parent / row["rejected"])
             for line, row in numbered_json_lines(path)]
    return _bounded(pair_image_problems(path, pairs), path)
