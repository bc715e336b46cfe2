"""Training pairs of one SafetyDPO safety expert: the safe image always chosen over the unsafe one.

Two sources, both filtered to one category:

* a CoProV2-format CSV (``prompt, image, category``): one row per image; an unsafe/safe pair is the
  images ``u_idx_<n>...`` and ``s_idx_<n>...`` sharing ``<n>``; the caption is the unsafe image's
  prompt; a pair listed under several categories belongs to each of them;
* Sage ``metadata.jsonl``: every record (both captions) with the ``_s`` image chosen, i.e.
  :func:`psalign.sage.sage_preference` for a user who bans the category.

Both give :class:`ExpertPair` records, written as ``expert_pairs.jsonl`` (absolute image paths)
and read by :class:`ExpertPairDataset`, the dataset the training loop uses for a LoRA expert.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import torch
from PIL import Image

from psalign.categories import canonical_category
from psalign.io import InputError, InputProblem, atomic_write
from psalign.sage import image_variant, paired_crop_flip, parse_sage_record_name, sage_preference

COPRO_COLUMNS = ("prompt", "image", "category")
_COPRO_IMAGE = re.compile(r"([us])_idx_(\d+)")


@dataclass(frozen=True)
class ExpertPair:
    """One preference pair: ``chosen`` (safe) and ``rejected`` (unsafe) image paths, the caption,
    the canonical categories it is listed under, and the caption that drew the chosen image (the
    safe prompt; None where the source does not say), the safe-anchor objectives' target."""

    chosen: str
    rejected: str
    caption: str
    categories: tuple[str, ...]
    chosen_caption: str | None = None


def read_coprov2_pairs(csv_path: str | Path, image_root: str | Path, category: str) -> list[ExpertPair]:
    """The pairs of ``category`` in a CoProV2 CSV; images are relative to ``image_root``.

    Every bad row (missing column, unknown category, image name without ``u_idx_<n>``/``s_idx_<n>``,
    missing image file, a pair lacking one side or with two images on one side) is reported
    as ``file:line`` in one :class:`InputError`.
    """
    path, root = Path(csv_path), Path(image_root)
    wanted = canonical_category(category, allow_extra=True)
    problems: list[InputProblem] = []
    sides: dict[str, dict[str, tuple[int, str, str]]] = {}  # n -> side -> (line, image, prompt)
    categories: dict[str, set[str]] = {}
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in COPRO_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError([InputProblem(str(path), 1, f"missing column(s) {', '.join(missing)}")])
        for row in reader:
            line = reader.line_num
            try:
                name = canonical_category(row["category"], allow_extra=True)
            except ValueError as err:
                problems.append(InputProblem(str(path), line, str(err), "category"))
                continue
            match = _COPRO_IMAGE.search(Path(row["image"]).name)
            if match is None:
                problems.append(InputProblem(str(path), line, f"{row['image']!r} has no u_idx_<n>/s_idx_<n>", "image"))
                continue
            if not (root / row["image"]).is_file():
                problems.append(InputProblem(str(path), line, f"missing image {root / row['image']}", "image"))
                continue
            side, index = match.groups()
            seen = sides.setdefault(index, {}).get(side)
            if seen is not None and seen[1] != row["image"]:
                problems.append(InputProblem(str(path), line, f"second {side}_idx_{index} image (line {seen[0]})", "image"))
                continue
            sides[index].setdefault(side, (line, row["image"], row["prompt"]))
            categories.setdefault(index, set()).add(name)
    pairs = []
    for index, found in sides.items():
        if set(found) != {"u", "s"}:
            line, image, _ = next(iter(found.values()))
            lacking = "s" if "u" in found else "u"
            problems.append(InputProblem(str(path), line, f"pair {index} has no {lacking}_idx_{index} image", "image"))
            continue
        if wanted in categories[index]:
            pairs.append(ExpertPair(
                chosen=str((root / found["s"][1]).resolve()),
                rejected=str((root / found["u"][1]).resolve()),
                caption=found["u"][2],
                categories=tuple(sorted(categories[index])),
                chosen_caption=found["s"][2],
            ))
    if problems:
        raise InputError(problems, header=f"{len(problems)} problem(s) in {path}")
    return pairs


def read_sage_pairs(metadata: str | Path, category: str) -> list[ExpertPair]:
    """Every Sage record of ``category`` (both captions), the ``_s`` image chosen whatever the user.

    The category and caption come from the record's ``file_name``; which image is which from the
    images' ``_s.jpg`` / ``_u.jpg`` endings (their stems may be anything, e.g. a pool shared by users).
    """
    from psalign.sage import read_preference_pairs

    path = Path(metadata)
    wanted = canonical_category(category)
    pairs, problems = [], []
    records = read_preference_pairs(path, path.parent)
    # A safe-caption record (``.jpg_s.jpg``) names the caption its unit's _s image was drawn from.
    safe_caption = {image: record["caption"] for record in records if record["file_name"].endswith("_s.jpg")
                    for image in (record["chosen"], record["rejected"]) if image.endswith("_s.jpg")}
    for line, record in _numbered(records, path):
        try:
            name = parse_sage_record_name(record["file_name"])
        except ValueError as err:
            problems.append(InputProblem(str(path), line, str(err), "file_name"))
            continue
        try:
            images = {image_variant(record[k]): record[k] for k in ("chosen", "rejected")}
        except ValueError as err:
            problems.append(InputProblem(str(path), line, str(err), "chosen"))
            continue
        if set(images) != {"s", "u"}:
            problems.append(InputProblem(str(path), line, "chosen and rejected must be one _s and one _u image"))
            continue
        if name.category != wanted:
            continue
        chosen, rejected = sage_preference(banned=True, caption="unsafe" if name.variant == "u" else "safe")
        pairs.append(ExpertPair(
            str((path.parent / images[chosen]).resolve()), str((path.parent / images[rejected]).resolve()),
            record["caption"], (name.category,), safe_caption.get(images["s"]),
        ))
    if problems:
        raise InputError(problems, header=f"{len(problems)} problem(s) in {path}")
    return pairs


def _numbered(records: list[dict], path: Path) -> Iterable[tuple[int, dict]]:
    """``(line, record)``: the 1-based line of each record (blank lines skipped, as the reader does)."""
    lines = [i for i, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if text.strip()]
    return zip(lines, records)


def write_expert_pairs(path: str | Path, pairs: Iterable[ExpertPair]) -> Path:
    """Write pairs as JSON lines (atomically)."""
    pairs = list(pairs)
    if not pairs:
        raise ValueError(f"no training pairs to write to {path}")
    with atomic_write(path) as handle:
        for pair in pairs:
            handle.write(json.dumps({**asdict(pair), "categories": list(pair.categories)}, ensure_ascii=False) + "\n")
    return Path(path)


def read_expert_pairs(path: str | Path) -> list[ExpertPair]:
    """Read :func:`write_expert_pairs` output; relative image paths are relative to the file's folder."""
    path = Path(path)
    pairs, problems = [], []
    for line, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
            pair = ExpertPair(row["chosen"], row["rejected"], row["caption"], tuple(row["categories"]),
                              row.get("chosen_caption"))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            problems.append(InputProblem(str(path), line, f"bad expert pair record: {err!r}"))
            continue
        for key in ("chosen", "rejected"):
            if not (path.parent / getattr(pair, key)).is_file():
                problems.append(InputProblem(str(path), line, f"missing image {path.parent / getattr(pair, key)}", key))
        pairs.append(pair)
    if problems or not pairs:
        raise InputError(problems or [InputProblem(str(path), 0, "no expert pairs")])
    return pairs


class ExpertPairDataset(torch.utils.data.Dataset):
    """Expert pairs as training items: the :class:`psalign.sage.PairPixels` of
    :func:`psalign.sage.paired_crop_flip` (``chosen``/``rejected`` float32 (3, R, R) in [-1, 1],
    ``original_size``, ``crop_top_left``) and the ``caption``; no user."""

    def __init__(self, path: str | Path, resolution: int = 512, random_crop: bool = False, random_flip: bool = False):
        self.root = Path(path).parent
        self.pairs = read_expert_pairs(path)
        self.resolution, self.random_crop, self.random_flip = resolution, random_crop, random_flip

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        pair = self.pairs[index]
        chosen, rejected = Image.open(self.root / pair.chosen), Image.open(self.root / pair.rejected)
        try:
            pixels = paired_crop_flip(chosen, rejected, self.resolution, self.random_crop, self.random_flip)
        except ValueError as err:
            raise ValueError(f"{pair.chosen} and {pair.rejected}: {err}") from None
        return {**pixels, "caption": pair.caption, "chosen_caption": pair.chosen_caption}


EXPERT_PAIRS_NAME = "expert_pairs.jsonl"


def write_expert_data(
    output_dir: str | Path,
    category: str,
    coprov2: str | Path | None = None,
    image_root: str | Path | None = None,
    sage: str | Path | None = None,
) -> Path:
    """Collect ``category``'s pairs from a CoProV2 CSV (images under ``image_root``, default: the
    CSV's folder) and/or Sage ``metadata.jsonl``; write ``output_dir/expert_pairs.jsonl``; return it."""
    if coprov2 is None and sage is None:
        raise ValueError("give a CoProV2 CSV, Sage metadata.jsonl, or both")
    pairs: list[ExpertPair] = []
    if coprov2 is not None:
        pairs += read_coprov2_pairs(coprov2, image_root if image_root is not None else Path(coprov2).parent, category)
    if sage is not None:
        pairs += read_sage_pairs(sage, category)
    if not pairs:
        raise InputError([InputProblem(str(coprov2 or sage), 0, f"no pairs of category {category!r}")])
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    return write_expert_pairs(Path(output_dir) / EXPERT_PAIRS_NAME, pairs)
