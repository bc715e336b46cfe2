"""Sage preference pairs: the pair rule, file names, ``metadata.jsonl`` and the torch dataset.

A Sage unit is (user u, category c, concept k, index n) with two images, ``_s`` (generated from a
safe rewrite of the prompt) and ``_u`` (from the unsafe prompt), and gives two records, one per
caption. :func:`sage_preference` is the one place that decides which image is chosen.
"""

from __future__ import annotations

import json
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal, Mapping, TypedDict

import numpy as np
import torch
from PIL import Image

from psalign.categories import CATEGORY_TOKENS, canonical_category, category_token
from psalign.embeddings import load_user_embeddings
from psalign.io import InputError, InputProblem, atomic_write
from psalign.users import USER_ID_PATTERN, UserProfile, format_user_id, users_by_id

Variant = Literal["s", "u"]
Caption = Literal["safe", "unsafe"]

#: Keys every ``metadata.jsonl`` record has (``user_data`` holds ``User_ID`` and the profile).
RECORD_KEYS: tuple[str, ...] = ("file_name", "chosen", "rejected", "caption", "user_data")


def sage_preference(banned: bool, caption: Caption) -> tuple[Variant, Variant]:
    """The Sage rule: ``(chosen, rejected)`` image variants for a record.

    ==================  =======  ======  ========
    category banned?    caption  chosen  rejected
    ==================  =======  ======  ========
    yes                 unsafe   s       u
    yes                 safe     s       u
    no                  unsafe   u       s
    no                  safe     s       u
    ==================  =======  ======  ========

    A user who allows the category prefers the image that follows the unsafe caption.
    """
    if caption not in ("safe", "unsafe"):
        raise ValueError(f"caption must be 'safe' or 'unsafe', got {caption!r}")
    if not banned and caption == "unsafe":
        return "u", "s"
    return "s", "u"


# --------------------------------------------------------------------------------------------
# File names

_TOKEN_ALTERNATION = "|".join(re.escape(t) for t in sorted(CATEGORY_TOKENS.values(), key=len, reverse=True))
_IMAGE_NAME = re.compile(rf"user_(\d{{7}})_({_TOKEN_ALTERNATION})_(.+)_(\d{{5}})_([su])\.jpg")
_RECORD_NAME = re.compile(rf"user_(\d{{7}})_({_TOKEN_ALTERNATION})_(.+)_(\d{{5}})\.jpg_([su])\.jpg")


@dataclass(frozen=True)
class SageImageName:
    """The parts of a Sage image name; ``concept`` has spaces where the name has ``_``."""

    user_id: str
    category: str
    concept: str
    index: int
    variant: Variant


def sage_stem(user_id: str, category: str, concept: str, index: int) -> str:
    """``user_<7-digit id>_<category token>_<concept, spaces as _>_<5-digit index>``."""
    concept = concept.strip()
    if not concept or "/" in concept or "\\" in concept:
        raise ValueError(f"concept {concept!r} must be non-empty and contain no path separator")
    if not 0 <= index <= 99999:
        raise ValueError(f"index {index} does not fit 5 digits")
    return f"user_{format_user_id(user_id)}_{category_token(category)}_{concept.replace(' ', '_')}_{index:05d}"


def sage_image_name(user_id: str, category: str, concept: str, index: int, variant: Variant) -> str:
    """File name of a unit's image: ``<stem>_s.jpg`` (safe prompt) or ``<stem>_u.jpg`` (unsafe)."""
    if variant not in ("s", "u"):
        raise ValueError(f"variant must be 's' or 'u', got {variant!r}")
    return f"{sage_stem(user_id, category, concept, index)}_{variant}.jpg"


def sage_record_name(user_id: str, category: str, concept: str, index: int, caption: Caption) -> str:
    """``file_name`` of a record: ``<stem>.jpg_u.jpg`` (unsafe caption) or ``<stem>.jpg_s.jpg`` (safe)."""
    if caption not in ("safe", "unsafe"):
        raise ValueError(f"caption must be 'safe' or 'unsafe', got {caption!r}")
    return f"{sage_stem(user_id, category, concept, index)}.jpg_{caption[0]}.jpg"


def parse_sage_image_name(name: str) -> SageImageName:
    """Parse ``user_0000033_self-harm_cutting_scars_00012_u.jpg`` (a directory part is ignored)."""
    match = _IMAGE_NAME.fullmatch(Path(name).name)
    if match is None:
        raise ValueError(
            f"{name!r} is not a Sage image name user_<7 digits>_<category>_<concept>_<5 digits>_<s|u>.jpg"
        )
    user_id, token, concept, index, variant = match.groups()
    return SageImageName(user_id, canonical_category(token), concept.replace("_", " "), int(index), variant)


def parse_sage_record_name(name: str) -> SageImageName:
    """Parse a record's ``file_name``, ``user_0000033_self-harm_cutting_scars_00012.jpg_u.jpg``;
    ``variant`` is the record's caption (``u``: unsafe, ``s``: safe)."""
    match = _RECORD_NAME.fullmatch(Path(name).name)
    if match is None:
        raise ValueError(
            f"{name!r} is not a Sage record name user_<7 digits>_<category>_<concept>_<5 digits>.jpg_<s|u>.jpg"
        )
    user_id, token, concept, index, variant = match.groups()
    return SageImageName(user_id, canonical_category(token), concept.replace("_", " "), int(index), variant)


def image_variant(name: str) -> Variant:
    """Which image of a unit ``name`` is: ``s`` (drawn from the safe prompt) or ``u``, from its
    ``_s.jpg`` / ``_u.jpg`` ending (images shared between users may have any stem)."""
    for variant in ("s", "u"):
        if Path(name).name.endswith(f"_{variant}.jpg"):
            return variant
    raise ValueError(f"{name!r} does not end in _s.jpg or _u.jpg")


# --------------------------------------------------------------------------------------------
# Building and writing metadata.jsonl


@dataclass(frozen=True)
class SageUnit:
    """One unit of the inventory: two images (paths relative to the image root) and two captions."""

    user_id: str
    category: str
    concept: str
    index: int
    safe_caption: str
    unsafe_caption: str
    safe_image: str
    unsafe_image: str


def build_preference_pairs(
    units: Iterable[SageUnit], users: Iterable[UserProfile] | Mapping[str, UserProfile]
) -> list[dict]:
    """Two ``metadata.jsonl`` records per unit (unsafe caption first), ordered by :func:`sage_preference`.

    Raises ``ValueError`` naming the unit when its user is not in ``users``.
    """
    by_id = users_by_id(users)
    records = []
    for unit in units:
        profile = by_id.get(format_user_id(unit.user_id))
        if profile is None:
            raise ValueError(f"unit {unit}: user {unit.user_id} is not in the users file")
        banned = canonical_category(unit.category) in profile.banned_categories
        images = {"s": unit.safe_image, "u": unit.unsafe_image}
        for caption, text in (("unsafe", unit.unsafe_caption), ("safe", unit.safe_caption)):
            chosen, rejected = sage_preference(banned, caption)
            records.append(
                {
                    "file_name": sage_record_name(unit.user_id, unit.category, unit.concept, unit.index, caption),
                    "chosen": images[chosen],
                    "rejected": images[rejected],
                    "caption": text,
                    "user_data": profile.user_data(),
                }
            )
    return records


def write_preference_pairs(path: str | Path, records: Iterable[dict]) -> Path:
    """Write ``records`` atomically as JSON lines (UTF-8, one record per line)."""
    path = Path(path)
    with atomic_write(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


# --------------------------------------------------------------------------------------------
# Reading and validating


def _record_problems(
    record, path: str, line: int, image_root: Path, users: Mapping[str, UserProfile] | None
) -> list[InputProblem]:
    if not isinstance(record, dict):
        return [InputProblem(path, line, f"expected a JSON object, got {type(record).__name__}")]
    problems = [InputProblem(path, line, "missing key", field=k) for k in RECORD_KEYS if k not in record]
    for key in ("file_name", "chosen", "rejected", "caption"):
        if key in record and not isinstance(record[key], str):
            problems.append(InputProblem(path, line, f"expected a string, got {record[key]!r}", field=key))
    user_data = record.get("user_data")
    if "user_data" in record:
        if not isinstance(user_data, dict) or "User_ID" not in user_data:
            problems.append(InputProblem(path, line, "missing key", field="user_data.User_ID"))
        elif not isinstance(user_data["User_ID"], str) or not USER_ID_PATTERN.fullmatch(user_data["User_ID"]):
            problems.append(
                InputProblem(path, line, f"{user_data['User_ID']!r} is not a 7-digit string", "user_data.User_ID")
            )
        elif users is not None and user_data["User_ID"] not in users:
            problems.append(
                InputProblem(path, line, f"unknown user {user_data['User_ID']!r}", field="user_data.User_ID")
            )
    if problems:
        return problems
    if record["chosen"] == record["rejected"]:
        problems.append(InputProblem(path, line, f"chosen and rejected are the same image {record['chosen']!r}"))
    for key in ("chosen", "rejected"):
        if not (image_root / record[key]).is_file():
            problems.append(InputProblem(path, line, f"missing image {image_root / record[key]}", field=key))
    return problems


def read_preference_pairs(
    path: str | Path,
    image_root: str | Path,
    users: Iterable[UserProfile] | Mapping[str, UserProfile] | None = None,
    skip_invalid: bool = False,
) -> list[dict]:
    """Read and validate ``metadata.jsonl``; image paths are relative to ``image_root``.

    Every bad record is reported as ``file:line: reason`` (bad JSON, missing key, missing image,
    unknown user when ``users`` is given, chosen == rejected). By default they raise one
    ``InputError``; with ``skip_invalid`` they are reported in a warning and the valid records
    are returned. Blank lines are skipped. A file with no valid record is always an error.
    """
    path, image_root = Path(path), Path(image_root)
    known = users_by_id(users) if users is not None else None
    records, problems = [], []
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                problems.append(InputProblem(str(path), line_no, f"bad JSON: {err}"))
                continue
            found = _record_problems(record, str(path), line_no, image_root, known)
            if found:
                problems.extend(found)
            else:
                records.append(record)
    if problems:
        error = InputError(problems, header=f"{len(problems)} problem(s) in {path}")
        if not skip_invalid or not records:
            raise error
        warnings.warn(f"skipping invalid records: {error}", stacklevel=2)
    if not records:
        raise InputError([InputProblem(str(path), 0, "no preference records")])
    return records


def images_drawn_from_caption(record: Mapping) -> list[str]:
    """The images of ``record`` (``chosen`` / ``rejected``) that its caption drew: a Sage record
    (``file_name`` ending ``.jpg_u.jpg`` / ``.jpg_s.jpg``) vouches for its image of the same variant."""

    def variant(name: str) -> str | None:
        try:
            return image_variant(name)
        except ValueError:
            return None

    own = variant(record["file_name"])
    return [] if own is None else [image for image in (record["chosen"], record["rejected"]) if variant(image) == own]


def chosen_captions(records: Iterable[Mapping]) -> list[str | None]:
    """The caption that drew each record's chosen image, or None where the records do not say.

    A Sage record (``file_name`` ending ``.jpg_u.jpg`` or ``.jpg_s.jpg``) says that the one of its
    two images with the same variant (``..._u.jpg`` / ``..._s.jpg``) was drawn from its caption.
    So a record's chosen caption is its own caption, or that of the unit's other record. The
    safe-anchor objectives take it as their target caption.

    Raises ``ValueError`` when two records say one image was drawn from different captions.
    """

    records = list(records)
    drawn_from: dict[str, str] = {}
    for record in records:
        for image in images_drawn_from_caption(record):
            previous = drawn_from.setdefault(image, record["caption"])
            if previous != record["caption"]:
                raise ValueError(f"{record['file_name']}: image {image} was drawn from {previous!r} by another "
                                 f"record, but this record's caption is {record['caption']!r}")
    return [drawn_from.get(record["chosen"]) for record in records]


def load_preference_dataset(
    path: str | Path,
    image_root: str | Path,
    users: Iterable[UserProfile] | Mapping[str, UserProfile] | None = None,
    skip_invalid: bool = False,
):
    """The validated records as an in-memory HF ``datasets.Dataset`` loaded with the ``json``
    builder; ``chosen`` and ``rejected`` are ``Image`` columns decoded lazily (on access) from
    their absolute paths. Validation is :func:`read_preference_pairs`."""
    import datasets

    root = Path(image_root).resolve()
    records = read_preference_pairs(path, root, users=users, skip_invalid=skip_invalid)
    with tempfile.TemporaryDirectory(prefix="psalign_pairs_") as tmp:
        clean = Path(tmp) / "metadata.jsonl"
        write_preference_pairs(
            clean, ({**r, "chosen": str(root / r["chosen"]), "rejected": str(root / r["rejected"])} for r in records)
        )
        dataset = datasets.load_dataset(
            "json", data_files=str(clean), split="train", cache_dir=str(Path(tmp) / "cache"), keep_in_memory=True
        )
    for column in ("chosen", "rejected"):
        dataset = dataset.cast_column(column, datasets.Image(decode=True))
    return dataset


# --------------------------------------------------------------------------------------------
# Torch dataset


def _resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is ``size`` px (bilinear), keeping the aspect ratio."""
    w, h = image.size
    if min(w, h) == size:
        return image
    scale = size / min(w, h)
    return image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BILINEAR)


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 tensor (3, H, W) in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class PairPixels(TypedDict):
    """The two images of a pair after :func:`paired_crop_flip`."""

    chosen: torch.Tensor  # float32 (3, R, R) in [-1, 1]
    rejected: torch.Tensor  # float32 (3, R, R) in [-1, 1]
    original_size: tuple[int, int]  # (h, w) px of the source images
    crop_top_left: tuple[int, int]  # (top, left) px in the resized, possibly mirrored, image


def paired_crop_flip(
    chosen: Image.Image,
    rejected: Image.Image,
    resolution: int,
    random_crop: bool = False,
    random_flip: bool = False,
) -> PairPixels:
    """ONE resize, crop and flip shared by the two images of a preference pair.

    Both images (which must have the same size) are resized so their shorter side is R =
    ``resolution`` px (bilinear), optionally mirrored left-right (probability 0.5 with
    ``random_flip``), then cropped to R x R px at one origin (uniformly random with
    ``random_crop``, else centred). Drawing crop or flip per image would misalign the pair.
    ``crop_top_left`` is in the resized image's frame, mirrored when flipped, as SDXL's
    ``add_time_ids`` want it. Random draws use torch's default generator (seed it, or rely on the
    ``DataLoader``'s per-worker seeding).
    """
    chosen, rejected = chosen.convert("RGB"), rejected.convert("RGB")
    if chosen.size != rejected.size:
        raise ValueError(
            f"chosen is {chosen.width}x{chosen.height} px but rejected is {rejected.width}x{rejected.height} px; "
            "the two images of a pair must have the same size"
        )
    original_size = (chosen.height, chosen.width)
    chosen, rejected = _resize_shorter_side(chosen, resolution), _resize_shorter_side(rejected, resolution)
    if random_crop:
        top = int(torch.randint(0, chosen.height - resolution + 1, ()).item())
        left = int(torch.randint(0, chosen.width - resolution + 1, ()).item())
    else:
        top, left = (chosen.height - resolution) // 2, (chosen.width - resolution) // 2
    if random_flip and bool(torch.rand(()) < 0.5):
        chosen = chosen.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        rejected = rejected.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    box = (left, top, left + resolution, top + resolution)
    return PairPixels(
        chosen=_to_tensor(chosen.crop(box)),
        rejected=_to_tensor(rejected.crop(box)),
        original_size=original_size,
        crop_top_left=(top, left),
    )


class PreferencePairDataset(torch.utils.data.Dataset):
    """Sage preference pairs for Diffusion-DPO training.

    Each item is a dict: the :class:`PairPixels` of :func:`paired_crop_flip` (``chosen``,
    ``rejected``, ``original_size``, ``crop_top_left``: one resize, crop and flip shared by the
    pair), ``caption`` (str), ``chosen_caption`` (the caption that drew the chosen image, see
    :func:`chosen_captions`; None when the data does not say), ``user_id`` (str) and
    ``user_embed`` (float32 (D,)). Every user's embedding is loaded up front: a missing one fails
    here, naming the users.
    """

    def __init__(
        self,
        metadata_path: str | Path,
        image_root: str | Path,
        embeds_folder: str | Path,
        users: Iterable[UserProfile] | Mapping[str, UserProfile] | None = None,
        resolution: int = 512,
        random_crop: bool = False,
        random_flip: bool = False,
        skip_invalid: bool = False,
    ):
        self.pairs = load_preference_dataset(metadata_path, image_root, users=users, skip_invalid=skip_invalid)
        self.user_ids = [u["User_ID"] for u in self.pairs["user_data"]]
        self.chosen_captions = _dataset_chosen_captions(self.pairs)
        self.user_embeds = {
            uid: torch.from_numpy(vec) for uid, vec in load_user_embeddings(embeds_folder, self.user_ids).items()
        }
        self.resolution = resolution
        self.random_crop = random_crop
        self.random_flip = random_flip

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        row = self.pairs[index]
        try:
            pixels = paired_crop_flip(
                row["chosen"], row["rejected"], self.resolution, self.random_crop, self.random_flip
            )
        except ValueError as err:
            raise ValueError(f"{row['file_name']}: {err}") from None
        user_id = self.user_ids[index]
        return {
            **pixels,
            "caption": row["caption"],
            "chosen_caption": self.chosen_captions[index],
            "user_id": user_id,
            "user_embed": self.user_embeds[user_id].clone(),
        }


def _dataset_chosen_captions(pairs) -> list[str | None]:
    """:func:`chosen_captions` of a :func:`load_preference_dataset` dataset, without decoding images."""
    import datasets

    paths = pairs.cast_column("chosen", datasets.Image(decode=False)).cast_column(
        "rejected", datasets.Image(decode=False))
    columns = zip(paths["file_name"], paths["chosen"], paths["rejected"], paths["caption"])
    return chosen_captions({"file_name": f, "chosen": c["path"], "rejected": r["path"], "caption": text}
                           for f, c, r, text in columns)
