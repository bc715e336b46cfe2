"""Toy Sage: the toy world's run of the Sage build pipeline (:mod:`psalign.sage.build`).

* **Users** come from the Sage-data generator (:func:`psalign.users.generate_users`, rule-engine
  bans), a share of them with random bans instead (:func:`toy_users` says why):
  ``users_train.csv`` and ``users_heldout.csv`` (held-out ids follow the training ids).
* **Concepts**: every category's seen concepts (:func:`toy_concepts`; the held-out ones stay out).
* **Prompts**: the template writer :class:`ToyTemplateWriter`, no LLM: for every object, the unsafe
  caption (``"a blue square with a fierce clash"``) and its safe rewrite (``"a blue square"``).
* **Images**: the toy base model draws both captions of a unit from the same seed (``pool_seeds``
  units per prompt pair), so the two differ mostly where the marker is.
* **Filter**: the toy detector (``toy`` InPro classifier): a unit is kept when its unsafe image
  shows a marker and its safe image none.
* **Pairs**: each training user gets one unit per (category, seen concept), drawn from the kept
  units of that concept (images are shared between users; who prefers which image is the user's
  business), records by the Sage rule in ``sage/train/metadata.jsonl`` (:data:`TRAIN_METADATA`).
* **Substitution pairs** (optional, our addition to Sage): for each category a user bans, one
  more unit whose rejected image shows the same object with *another* category's marker
  (:func:`substitution_decoy`), so removing a banned marker by drawing a different one is
  penalised too. SafetyDPO's experts read the same ``metadata.jsonl``, so they get these pairs too.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np

from psalign.sage import SageUnit, build_preference_pairs, read_preference_pairs, write_preference_pairs
from psalign.sage.writer import ConceptPrompts, PromptPair
from psalign.users import UserProfile, format_user_id, generate_users, write_users

from .world import CATEGORIES, OBJECTS, ToyObject, parse_caption, seen_concepts

#: Profile text of a toy user for the sentence encoder: just the two category lists, each in a
#: sentence with its own verb. A short text keeps them prominent in a mean-pooled sentence
#: embedding: a linear probe on 1000 users' MiniLM embeddings reads the bans of held-out users far
#: better than with the default template, whose profile attributes and instructions dilute the
#: lists. The verbs matter too: with the lists as "Banned image content: ...; Allowed image
#: content: ..." a probe fitted like the adapter's projection reads the reference user who bans
#: only Sexuality as banning nothing (``bench/toy_profile_probe.py`` compares the wordings).
TOY_PROFILE_TEMPLATE = "The user bans {banned}. The user allows {allowed}."
#: The training pairs, relative to the toy build's sage stage folder (the pipeline's ``out``).
TRAIN_METADATA = Path("sage") / "train" / "metadata.jsonl"
#: Unit index of the substitution unit of unit ``n``: ``SUBSTITUTION_INDEX + n``.
SUBSTITUTION_INDEX = 90000
#: Folder (in the image folder) holding a copy of each decoy's unsafe image, see :func:`decoy_image_name`.
DECOY_FOLDER = "decoys"


#: How the number of a random-ban user's bans is drawn (``random_ban_sizes``): ``binomial`` bans each
#: category with probability 1/2 (most users ban 3 or 4; one lone ban in 18 users); ``uniform``
#: draws the count from 0..7 with equal chances, then that many categories at random.
RANDOM_BAN_SIZES = ("binomial", "uniform")


def toy_users(
    train: int, heldout: int, seed: int, random_ban_share: float, random_ban_sizes: str = "binomial"
) -> tuple[list[UserProfile], list[UserProfile]]:
    """``train`` generated users (ids 1..train) and ``heldout`` more from another seed (ids train+1..).

    Bans come from the rule engine, except for a ``random_ban_share`` of the users (drawn with
    the seed), whose banned categories are a random subset of the seven instead, its size drawn
    as ``random_ban_sizes`` says (:data:`RANDOM_BAN_SIZES`): the rules only ever ban three fixed
    groups (Violence, Self-Harm and Sexuality always together), and always from the profile's
    attributes, so a model trained on rule-engine users alone can neither tell those categories
    apart nor learn to read the category lists of users whose attributes say otherwise (the
    reference users ``level_1`` ... ``level_4`` are such users).
    """
    if not 0.0 <= random_ban_share <= 1.0:
        raise ValueError(f"random_ban_share must be in [0, 1], got {random_ban_share}")
    if random_ban_sizes not in RANDOM_BAN_SIZES:
        raise ValueError(f"random_ban_sizes must be one of {RANDOM_BAN_SIZES}, got {random_ban_sizes!r}")
    rng = np.random.default_rng([seed, 2])

    def random_bans() -> list[str]:
        if random_ban_sizes == "binomial":
            return [c for c in CATEGORIES if rng.random() < 0.5]
        picked = set(rng.choice(len(CATEGORIES), size=int(rng.integers(0, len(CATEGORIES) + 1)), replace=False))
        return [c for i, c in enumerate(CATEGORIES) if i in picked]

    def redraw(users: list[UserProfile]) -> list[UserProfile]:
        out = []
        for user in users:
            if rng.random() < random_ban_share:
                user = user.with_banned(random_bans())
            out.append(user)
        return out

    train_users = redraw(generate_users(train, seed=seed))
    heldout_users = redraw([
        dataclasses.replace(u, user_id=format_user_id(train + i + 1))
        for i, u in enumerate(generate_users(heldout, seed=seed + 1))
    ])
    return train_users, heldout_users


def toy_concepts() -> dict[str, list[str]]:
    """The concepts of the toy Sage data: every category's seen concepts."""
    return {category: list(seen_concepts(category)) for category in CATEGORIES}


class ToyTemplateWriter:
    """The toy world's prompt writer (no LLM): for each object, ``"a <colour> <shape> with <concept>"``
    and its minimal safe rewrite ``"a <colour> <shape>"``; ``count`` may not exceed the objects' number."""

    identity = "toy-template"

    def write(self, category: str, concept: str, count: int) -> ConceptPrompts:
        if count > len(OBJECTS):
            raise ValueError(f"the toy world has {len(OBJECTS)} objects, so at most {len(OBJECTS)} prompts per concept")
        pairs = [PromptPair(obj.caption(concept), obj.caption()) for obj in OBJECTS[:count]]
        return ConceptPrompts(category, concept, pairs)


def substitution_decoy(kept: list[dict], category: str, obj: ToyObject, rng: np.random.Generator) -> dict:
    """A kept unit (a line of the filter stage's ``units.jsonl``) of ``obj`` with a concept of
    another category than ``category``, drawn uniformly.

    Paired with a prompt of ``category`` for a user who bans it, its unsafe image (the object
    with another category's marker) is what the adapter must not draw instead: our addition to
    Sage, whose pairs only reject the prompt's own unsafe image. Adapters trained on Sage pairs
    alone mostly remove a banned marker by drawing another one, which InPro still counts; these
    pairs reduce that without stopping it (the README's toy section has the numbers).
    """
    candidates = [u for u in kept if u["category"] != category and parse_caption(u["safe"]).object == obj]
    if not candidates:
        raise RuntimeError(f"no kept unit of {obj.caption()} outside {category} to use as a substitution decoy")
    return candidates[rng.integers(len(candidates))]


def decoy_image_name(unsafe_image: str) -> str:
    """Where a substitution unit finds its decoy's unsafe image: a copy in :data:`DECOY_FOLDER`
    without the ``_u.jpg`` ending. By the Sage naming a record's ``_u.jpg`` image was drawn from
    that record's own caption, which is not true of a decoy (another unit's prompt drew it), so
    :func:`psalign.sage.chosen_captions` must not read it so."""
    return f"{DECOY_FOLDER}/{Path(unsafe_image).name.removesuffix('_u.jpg')}_decoy.jpg"


def copy_decoy_images(units: list[SageUnit], image_folder: Path, images: str) -> None:
    """Copy each decoy image the substitution ``units`` name (``images``-relative) into
    ``image_folder`` / :data:`DECOY_FOLDER` from the kept unit's ``_u.jpg`` beside it."""
    for unit in units:
        target = image_folder / unit.unsafe_image.removeprefix(f"{images}/")
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(image_folder / (target.name.removesuffix("_decoy.jpg") + "_u.jpg"), target)


def substitution_units(records: list[dict], users: list[UserProfile], kept: list[dict], images: str,
                       rng: np.random.Generator) -> list[SageUnit]:
    """For each unsafe-caption record of a category its user bans, a unit with the same captions
    whose images are a :func:`substitution_decoy` of the same object (index ``SUBSTITUTION_INDEX + n``;
    its unsafe image under :func:`decoy_image_name`, see :func:`copy_decoy_images`)."""
    from psalign.sage import parse_sage_record_name

    banned = {u.user_id: set(u.banned_categories) for u in users}
    units = []
    for record in records:
        name = parse_sage_record_name(record["file_name"])
        if name.variant != "u" or name.category not in banned[name.user_id]:
            continue
        obj = parse_caption(record["caption"]).object
        decoy = substitution_decoy(kept, name.category, obj, rng)
        units.append(SageUnit(name.user_id, name.category, name.concept, SUBSTITUTION_INDEX + name.index,
                              obj.caption(), obj.caption(name.concept), f"{images}/{decoy['safe_image']}",
                              f"{images}/{decoy_image_name(decoy['unsafe_image'])}"))
    return units


def toy_build_config(model_dir: Path, folder: Path, users_csv: Path, heldout_users: int, pool_seeds: int, seed: int,
                     steps: int, guidance_scale: float, batch_size: int):
    """The Sage build settings of the toy world (``world: toy``) for ``python -m psalign.toy build``'s sage stage."""
    from psalign.sage.config import load_config

    return load_config(None, {
        "world": "toy", "out": str(folder), "sd_model": str(model_dir), "users": str(users_csv),
        "heldout_users": str(heldout_users), "images_per_prompt": str(pool_seeds), "seed": str(seed),
        "num_inference_steps": str(steps), "guidance_scale": str(guidance_scale), "generation_batch": str(batch_size),
        "device": "cpu",
    })


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
    random_ban_sizes: str = "binomial",
) -> dict:
    """Run the Sage build pipeline for the toy world into ``folder``; returns counts.

    Writes ``users_train.csv`` and ``users_heldout.csv`` (:func:`toy_users`) beside the pipeline's
    stage folders; with ``substitution_pairs``, adds the :func:`substitution_units`' records to
    :data:`TRAIN_METADATA` (they prefer the plain object to the object with another category's marker).
    """
    from psalign.sage.build import build, kept_units

    folder = Path(folder)
    train, heldout = toy_users(train_users, heldout_users, seed, random_ban_share, random_ban_sizes)
    write_users(folder / "users_train.csv", train)
    write_users(folder / "users_heldout.csv", heldout)
    write_users(folder / "users.csv", train + heldout)
    config = toy_build_config(model_dir, folder, folder / "users.csv", heldout_users, pool_seeds, seed, steps,
                              guidance_scale, batch_size)
    stages = build(config)
    missing = stages["pairs"]["concepts_without_training_units"]
    if missing:
        raise RuntimeError(f"the base model drew no usable image pair for the concepts {missing}")
    metadata = folder / TRAIN_METADATA
    records = read_preference_pairs(metadata, metadata.parent)
    if substitution_pairs:
        extra = substitution_units(records, train, kept_units(config), "../../images", np.random.default_rng([seed, 7]))
        copy_decoy_images(extra, folder / "images", "../../images")
        records = records + build_preference_pairs(extra, train)
        write_preference_pairs(metadata, records)
    filtered = stages["filter"]
    return {
        "pool_units": filtered["units"],
        "pool_units_kept": filtered["kept"],
        "kept_share_by_category": filtered["kept_share_by_category"],
        "train_users": len(train),
        "heldout_users": len(heldout),
        "records": len(records),
    }
