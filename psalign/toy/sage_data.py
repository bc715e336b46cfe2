"""Toy Sage: users, base-model images checked by the detector, and Sage preference pairs.

* **Users** come from the Sage-data generator (:func:`psalign.users.generate_users`, rule-engine
  bans), a share of them with random bans instead (:func:`toy_users` says why):
  ``users_train.csv`` and ``users_heldout.csv`` (held-out ids follow the training ids).
* **Image pool**: for every seen concept, every object and ``pool_seeds`` seeds, the base model
  draws the unsafe caption (``"a blue square with a fierce clash"``, the ``_u`` image) and its
  safe rewrite (``"a blue square"``, ``_s``) from the same initial noise, so the two differ mostly
  where the marker is. A pool unit is kept only when the detector agrees with both prompts (the
  unsafe image shows the object and exactly its category's marker, the safe one the object and
  no marker), as Sage keeps only images that match their prompt.
* **Units**: each training user gets one unit per (category, seen concept), drawn from the kept
  pool units of that concept (images are shared between users; who prefers which image is the
  user's business). :func:`psalign.sage.build_preference_pairs` turns units into records with the
  Sage rule; ``metadata.jsonl`` sits beside ``pool/``.
* **Substitution pairs** (optional, our addition to Sage): for each category a user bans, one
  more unit whose rejected image shows the same object with *another* category's marker
  (:func:`substitution_decoy`), so removing a banned marker by drawing a different one is
  penalised too. SafetyDPO's experts read the same ``metadata.jsonl``, so they get these pairs too.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter
from pathlib import Path

import numpy as np

from psalign.io import atomic_path
from psalign.sage import SageUnit, build_preference_pairs, write_preference_pairs
from psalign.users import UserProfile, format_user_id, generate_users, write_users

from .benchmark import sample
from .detect import detect
from .model import load_pipeline
from .world import CATEGORIES, OBJECTS, ToyObject, seen_concepts

#: Profile text of a toy user for the sentence encoder: just the two category lists, each in a
#: sentence with its own verb. A short text keeps them prominent in a mean-pooled sentence
#: embedding: a linear probe on 1000 users' MiniLM embeddings reads the bans of held-out users far
#: better than with the default template, whose profile attributes and instructions dilute the
#: lists. The verbs matter too: with the lists as "Banned image content: ...; Allowed image
#: content: ..." a probe fitted like the adapter's projection reads the reference user who bans
#: only Sexuality as banning nothing (``bench/toy_profile_probe.py`` compares the wordings).
TOY_PROFILE_TEMPLATE = "The user bans {banned}. The user allows {allowed}."
POOL_DIR = "pool"
METADATA = "metadata.jsonl"
JPEG_QUALITY = 95


def toy_users(
    train: int, heldout: int, seed: int, random_ban_share: float
) -> tuple[list[UserProfile], list[UserProfile]]:
    """``train`` generated users (ids 1..train) and ``heldout`` more from another seed (ids train+1..).

    Bans come from the rule engine, except for a ``random_ban_share`` of the users (drawn with
    the seed), whose banned categories are a uniformly random subset of the seven instead: the
    rules only ever ban three fixed groups (Violence, Self-Harm and Sexuality always together),
    and always from the profile's attributes, so a model trained on rule-engine users alone can
    neither tell those categories apart nor learn to read the category lists of users whose
    attributes say otherwise (the reference users ``level_1`` ... ``level_4`` are such users).
    """
    if not 0.0 <= random_ban_share <= 1.0:
        raise ValueError(f"random_ban_share must be in [0, 1], got {random_ban_share}")
    rng = np.random.default_rng([seed, 2])

    def redraw(users: list[UserProfile]) -> list[UserProfile]:
        out = []
        for user in users:
            if rng.random() < random_ban_share:
                user = user.with_banned([c for c in CATEGORIES if rng.random() < 0.5])
            out.append(user)
        return out

    train_users = redraw(generate_users(train, seed=seed))
    heldout_users = redraw([
        dataclasses.replace(u, user_id=format_user_id(train + i + 1))
        for i, u in enumerate(generate_users(heldout, seed=seed + 1))
    ])
    return train_users, heldout_users


@dataclasses.dataclass(frozen=True)
class PoolUnit:
    """One (concept, object, repeat) of the pool: two images drawn from one seed."""

    category: str
    concept: str
    object: ToyObject
    repeat: int

    @property
    def stem(self) -> str:
        concept = self.concept.replace(" ", "_")
        return f"{concept}_{self.object.colour}_{self.object.shape}_{self.repeat:02d}"

    def image(self, variant: str) -> str:
        """Path relative to the data folder: ``pool/<stem>_s.jpg`` or ``_u.jpg``."""
        return f"{POOL_DIR}/{self.stem}_{variant}.jpg"

    def seed(self, seed: int) -> int:
        digest = hashlib.sha256(f"{seed}:{self.stem}".encode()).digest()
        return int.from_bytes(digest[:8], "little") % (2**63)


def pool_units(pool_seeds: int) -> list[PoolUnit]:
    return [
        PoolUnit(category, concept, obj, repeat)
        for category in CATEGORIES
        for concept in seen_concepts(category)
        for obj in OBJECTS
        for repeat in range(pool_seeds)
    ]


def generate_pool(pipe, units: list[PoolUnit], folder: Path, seed: int, steps: int, guidance_scale: float,
                  batch_size: int) -> None:
    """Draw the missing images of ``units`` (both variants of a unit in the same batch, same seed)."""
    from tqdm.auto import tqdm

    todo = [u for u in units if not all((folder / u.image(v)).is_file() for v in "su")]
    per_batch = max(batch_size // 2, 1)
    for start in tqdm(range(0, len(todo), per_batch), desc="toy Sage images", unit="batch"):
        batch = todo[start : start + per_batch]
        captions = [u.object.caption(u.concept) for u in batch] + [u.object.caption() for u in batch]
        seeds = [u.seed(seed) for u in batch] * 2
        images = sample(pipe, captions, seeds, steps, guidance_scale, batch_size=len(captions))
        for unit, unsafe, safe in zip(batch, images[: len(batch)], images[len(batch) :]):
            for variant, image in (("u", unsafe), ("s", safe)):
                target = folder / unit.image(variant)
                with atomic_path(target, suffix=".jpg") as tmp:
                    image.save(tmp, quality=JPEG_QUALITY, subsampling=0)


def unit_agrees(folder: Path, unit: PoolUnit) -> bool:
    """Whether the detector agrees with both prompts of ``unit``."""
    from PIL import Image

    with Image.open(folder / unit.image("u")) as unsafe, Image.open(folder / unit.image("s")) as safe:
        found_u, found_s = detect(unsafe), detect(safe)
    return (
        found_u.shows(unit.object)
        and found_u.markers == (unit.category,)
        and found_s.shows(unit.object)
        and found_s.markers == ()
    )


def sage_unit(user_id: str, category: str, concept: str, index: int, images: PoolUnit) -> SageUnit:
    """The Sage unit of (user, category, concept, index): captions of ``concept`` on the object of
    the pool unit ``images``, and its two images."""
    return SageUnit(
        user_id=user_id,
        category=category,
        concept=concept,
        index=index,
        safe_caption=images.object.caption(),
        unsafe_caption=images.object.caption(concept),
        safe_image=images.image("s"),
        unsafe_image=images.image("u"),
    )


def substitution_decoy(
    kept: dict[str, list[PoolUnit]], category: str, obj: ToyObject, rng: np.random.Generator
) -> PoolUnit:
    """A kept pool unit of ``obj`` with a concept of another category than ``category``, drawn uniformly.

    Paired with a prompt of ``category`` for a user who bans it, its unsafe image (the object
    with another category's marker) is what the adapter must not draw instead: our addition to
    Sage, whose pairs only reject the prompt's own unsafe image. Adapters trained on Sage pairs
    alone mostly remove a banned marker by drawing another one, which InPro still counts; these
    pairs reduce that without stopping it (the README's toy section has the numbers).
    """
    candidates = [
        unit for units in kept.values() for unit in units if unit.category != category and unit.object == obj
    ]
    if not candidates:
        raise RuntimeError(f"no kept pool unit of {obj.caption()} outside {category} to use as a substitution decoy")
    return candidates[rng.integers(len(candidates))]


def assign_units(
    users: list[UserProfile], kept: dict[str, list[PoolUnit]], substitution_pairs: bool, rng: np.random.Generator
) -> list[SageUnit]:
    """Each user's Sage units: one per (category, seen concept), its images a kept pool unit of
    that concept drawn uniformly; with ``substitution_pairs``, a second one (index 1) for each
    category the user bans, whose images are a :func:`substitution_decoy` of the same object."""
    units = []
    for user in users:
        for category in CATEGORIES:
            for concept in seen_concepts(category):
                drawn = kept[concept][rng.integers(len(kept[concept]))]
                units.append(sage_unit(user.user_id, category, concept, 0, drawn))
                if substitution_pairs and category in user.banned_categories:
                    decoy = substitution_decoy(kept, category, drawn.object, rng)
                    units.append(sage_unit(user.user_id, category, concept, 1, decoy))
    return units


def build_toy_sage(
    model_dir: Path,
    folder: Path,
    train_users: int,
    heldout_users: int,
    random_ban_share: float,
    substitution_pairs: bool,
    pool_seeds: int,
    seed: int,
    steps: int,
    guidance_scale: float,
    batch_size: int,
) -> dict:
    """Write users, the image pool and ``metadata.jsonl`` into ``folder``; returns counts.

    Units are :func:`assign_units`' (with ``substitution_pairs``, decoy units whose records, by
    the Sage rule, prefer the plain object to the object with another category's marker).
    """
    folder = Path(folder)
    train, heldout = toy_users(train_users, heldout_users, seed, random_ban_share)
    write_users(folder / "users_train.csv", train)
    write_users(folder / "users_heldout.csv", heldout)
    units = pool_units(pool_seeds)
    generate_pool(load_pipeline(model_dir), units, folder, seed, steps, guidance_scale, batch_size)
    kept: dict[str, list[PoolUnit]] = {}
    for unit in units:
        if unit_agrees(folder, unit):
            kept.setdefault(unit.concept, []).append(unit)
    missing = [c for cat in CATEGORIES for c in seen_concepts(cat) if not kept.get(c)]
    if missing:
        raise RuntimeError(f"the base model drew no usable image pair for the concepts {missing}")
    sage_units = assign_units(train, kept, substitution_pairs, np.random.default_rng(seed))
    records = build_preference_pairs(sage_units, train)
    write_preference_pairs(folder / METADATA, records)
    kept_by_category = Counter(u.category for units_ in kept.values() for u in units_)
    per_category = len(units) // len(CATEGORIES)
    return {
        "pool_units": len(units),
        "pool_units_kept": sum(kept_by_category.values()),
        "kept_share_by_category": {c: kept_by_category[c] / per_category for c in CATEGORIES},
        "train_users": len(train),
        "heldout_users": len(heldout),
        "records": len(records),
    }
