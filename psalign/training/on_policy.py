r"""On-policy negatives: rounds in which the current PSA adapter draws the training users' banned
prompts, an InPro classifier judges the samples, and every flagged sample becomes a rejected image.

    python -m psalign.training.on_policy --config configs/toy.yaml --work_dir runs/on_policy \
        --start_adapter runs/psa --rounds 3 --steps_per_round 500 --inpro_classifiers toy_unclean

Round ``k`` works in ``<work_dir>/round-<k>/``:

1. **sample** (``samples/``): for a seeded draw of ``users_per_round`` training users (those of
   the Sage metadata with a unit of a category they ban), the adapter of the round (round 0: the
   start adapter; round k: the one round k-1 trained) draws the unsafe caption of each of the
   user's units of a banned category, through infer.py's generation code: one image per prompt,
   its seed derived from the run seed and its file name, resumable through the generation log;
2. **judge**: the classifiers, named as evaluate.py's ``--inpro_classifiers`` (combined with
   OR), flag the samples: ``toy_unclean`` flags everything that is not a clean removal in the toy
   world, ``q16``/``nudenet`` judge real images;
3. **negatives** (``negatives/``, ``negatives.jsonl``): each flagged sample becomes a Sage record
   of its user: chosen = the unit's safe (``_s``) image, rejected = the sample as a JPEG named
   ``<stem>_u.jpg`` (resized to the safe image's size when they differ), caption = the unsafe
   caption, ``file_name`` a Sage record name with index :data:`NEGATIVE_INDEX_BASE` +
   :data:`ROUND_INDEX_STRIDE` x k + the prompt's number in its user's list (never an original
   record's). ``metadata.jsonl`` = the original records + the negatives of rounds 0..k, image
   paths relative to its folder, so ``chosen_captions`` gives every negative the safe rewrite;
   with ``--negative_share s``, a seeded draw of the original records instead, so many that the
   negatives are a share s of the round's records;
4. **train** (``train/``): ``steps_per_round`` optimizer steps of the training config on that
   metadata, the adapter initialised from the round's sampling adapter (``init_adapter``; a
   fresh optimizer and LR schedule each round), resumed from its latest checkpoint when interrupted;
5. ``round.json``: samples and flagged samples per category, the classifiers, the adapter used,
   the steps and the seconds of each stage. A round with its ``round.json`` is done and skipped.

The settings of a work folder are kept in ``on_policy.json``; a rerun with other settings is
refused (the number of rounds may grow). Everything runs in one process on one device.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from psalign.adapter import inspect_adapter
from psalign.categories import CATEGORIES
from psalign.io import InputError, InputProblem, atomic_path, atomic_write, read_json_lines, weights_sha256
from psalign.metrics.inpro import INPRO_FLAGGERS, ImageFlagger
from psalign.sage import (
    images_drawn_from_caption,
    parse_sage_record_name,
    read_preference_pairs,
    sage_record_name,
    sage_stem,
    write_preference_pairs,
)

from .config import COMMAND_LINE, TrainingConfig, add_training_arguments, load_training_config

#: Sage index of round 0's first negative; round k's use NEGATIVE_INDEX_BASE + ROUND_INDEX_STRIDE * k + n.
NEGATIVE_INDEX_BASE = 50000
#: Most prompts one user gets in a round (the width of a round's index block).
ROUND_INDEX_STRIDE = 1000
#: Rounds whose indices fit Sage's 5 digits.
MAX_ROUNDS = (100000 - NEGATIVE_INDEX_BASE) // ROUND_INDEX_STRIDE
#: Training fields each round sets itself.
ROUND_FIELDS = ("output_dir", "init_adapter", "max_train_steps", "resume_from_checkpoint", "overwrite_output_dir",
                "cache_dir")
SETTINGS_FILE = "on_policy.json"
ROUND_FILE = "round.json"
SAMPLES_DIR = "samples"
NEGATIVES_DIR = "negatives"
NEGATIVES_FILE = "negatives.jsonl"
METADATA_FILE = "metadata.jsonl"
TRAIN_DIR = "train"
JPEG_QUALITY = 95


@dataclass
class OnPolicyConfig:
    """Everything a run of on-policy rounds needs (see ``python -m psalign.training.on_policy --help``).

    The training config (``training_config`` YAML, then ``training_overrides``) names the model
    (``pretrained_model``), the original Sage data (``train_data``) and the user embeddings
    (``embeds_folder``) that sampling uses too; :data:`ROUND_FIELDS` are set per round.
    """

    work_dir: str
    start_adapter: str
    training_config: str | None = None
    training_overrides: dict[str, Any] = field(default_factory=dict)
    rounds: int = 2
    steps_per_round: int = 500
    users_per_round: int = 16
    prompts_per_user: int | None = None  # None: every banned unit of the user
    sample_seed: int = 0
    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    sample_batch_size: int = 8
    device: str | None = None  # default: cuda when available
    negative_share: float | None = None
    """Share of a round's training records that are negatives (0 < share < 1): the round trains on
    every negative so far and a seeded draw of original records that makes up the rest. None: on
    every original record, where a few hundred negatives are a small fraction of the data."""
    inpro_classifiers: Sequence[str] = INPRO_FLAGGERS
    q16_clip_model: str | None = None  # None: evaluate.py's default
    q16_prompts: str | None = None
    q16_threshold: float | None = None
    nudenet_min_score: float | None = None
    extra_flaggers: dict[str, Callable[[], ImageFlagger]] = field(default_factory=dict)
    """Classifiers by name beside evaluate.py's (the toy world's are always there)."""

    def settings(self) -> dict:
        """What makes the rounds' results: every field but ``work_dir``, ``rounds``, ``device``,
        ``sample_batch_size`` (images do not depend on the batch) and the classifier factories."""
        skipped = {"work_dir", "rounds", "device", "sample_batch_size", "extra_flaggers"}
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name not in skipped}


def _plain(value: Any) -> Any:
    """``value`` as JSON gives it back (tuples as lists)."""
    return json.loads(json.dumps(value))


@dataclass(frozen=True)
class BannedUnit:
    """A Sage unit whose user bans its category, read from its unsafe-caption record."""

    user_id: str
    user_data: dict
    category: str
    concept: str
    unsafe_caption: str
    safe_image: Path  # absolute


@dataclass(frozen=True)
class NegativePrompt:
    """One sample of a round: ``unit``'s unsafe caption for its user, under Sage index ``index``."""

    unit: BannedUnit
    index: int

    @property
    def stem(self) -> str:
        return sage_stem(self.unit.user_id, self.unit.category, self.unit.concept, self.index)

    @property
    def sample_name(self) -> str:
        """File name of the sample under ``samples/`` (its seed derives from it)."""
        return f"{self.stem}.png"

    @property
    def negative_name(self) -> str:
        """File name of the rejected JPEG under ``negatives/``."""
        return f"{self.stem}_u.jpg"


def banned_units(records: Sequence[dict], image_root: Path, source: str) -> dict[str, list[BannedUnit]]:
    """Each user's units of a category they ban (in metadata order), by User_ID.

    The Sage rule read backwards: a unit's unsafe-caption record (``<stem>.jpg_u.jpg``) whose chosen
    image is its ``_s`` image says that the user bans the unit's category. Records that are not
    Sage-named are kept in the training data but sampled from never. ``InputError`` when a Sage
    record's index lies in the negatives' range (``source`` names the file).
    """
    units: dict[str, list[BannedUnit]] = {}
    problems = []
    for record in records:
        try:
            name = parse_sage_record_name(record["file_name"])
        except ValueError:
            continue
        if name.index >= NEGATIVE_INDEX_BASE:
            problems.append(InputProblem(source, 0, f"record {record['file_name']} has index {name.index}, in the "
                                                    f"range of on-policy negatives (>= {NEGATIVE_INDEX_BASE})",
                                         "file_name"))
        banned = record["chosen"].endswith("_s.jpg") and record["rejected"].endswith("_u.jpg")  # sage_preference
        if name.variant != "u" or not banned:
            continue
        units.setdefault(name.user_id, []).append(BannedUnit(
            name.user_id, record["user_data"], name.category, name.concept, record["caption"],
            (image_root / record["chosen"]).resolve(),
        ))
    if problems:
        raise InputError(problems, header=f"{len(problems)} problem(s) in {source}")
    return units


def round_prompts(units: dict[str, list[BannedUnit]], round_index: int, users_per_round: int,
                  prompts_per_user: int | None, seed: int) -> list[NegativePrompt]:
    """Round ``round_index``'s prompts: ``users_per_round`` users drawn without replacement (seeded by
    ``seed`` and the round), each with ``prompts_per_user`` of its banned units drawn alike (all by
    default); users in User_ID order, each user's units in metadata order. Indices: :class:`NegativePrompt`."""
    rng = np.random.default_rng([seed, round_index])
    user_ids = sorted(units)
    chosen = sorted(rng.choice(len(user_ids), size=min(users_per_round, len(user_ids)), replace=False))
    prompts = []
    for position in chosen:
        own = units[user_ids[position]]
        count = len(own) if prompts_per_user is None else min(prompts_per_user, len(own))
        picked = sorted(rng.choice(len(own), size=count, replace=False))
        base = NEGATIVE_INDEX_BASE + ROUND_INDEX_STRIDE * round_index
        prompts += [NegativePrompt(own[i], base + n) for n, i in enumerate(picked)]
    return prompts


def unit_key(file_name: str) -> str:
    """The unit a Sage record belongs to: its ``file_name`` without the caption ending (``_u.jpg`` /
    ``_s.jpg`` after ``.jpg``), shared by a user's two records of one unit; any other name is its own unit."""
    for ending in (".jpg_u.jpg", ".jpg_s.jpg"):
        if file_name.endswith(ending):
            return file_name[: -len("_u.jpg")]
    return file_name


def originals_for_share(units: Sequence[str], negatives: int, share: float | None, seed: int,
                        round_index: int) -> list[int]:
    """Indices (sorted) of the original records a round trains on beside ``negatives`` negatives;
    ``units[i]`` is record i's :func:`unit_key`. All records when ``share`` is None or there are no
    negatives yet; else whole units in a seeded order (by ``seed`` and the round) until at least
    ``round(negatives * (1 - share) / share)`` records are drawn, so that a record's partner, which
    says which caption drew its chosen image, is always drawn with it."""
    wanted = 0 if share is None or negatives == 0 else round(negatives * (1 - share) / share)
    if share is None or negatives == 0 or wanted >= len(units):
        return list(range(len(units)))
    members: dict[str, list[int]] = {}
    for index, unit in enumerate(units):
        members.setdefault(unit, []).append(index)
    order = list(members)
    picked: list[int] = []
    for position in np.random.default_rng([seed, round_index, 1]).permutation(len(order)):
        if len(picked) >= wanted:
            break
        picked += members[order[position]]
    return sorted(picked)


def with_vouching_records(records: Sequence[dict], drawn: Sequence[int], images: Iterable[str]) -> list[int]:
    """``drawn`` (indices into ``records``) and, for each of ``images`` that no drawn record says its
    caption drew (:func:`images_drawn_from_caption`), the first record that does: so every
    negative's chosen (safe) image keeps a record that names the caption it was drawn from."""
    picked = set(drawn)
    vouched = {image for i in picked for image in images_drawn_from_caption(records[i])}
    missing = set(images) - vouched
    for index, record in enumerate(records):
        if not missing:
            break
        found = missing.intersection(images_drawn_from_caption(record))
        if found:
            picked.add(index)
            missing -= found
    return sorted(picked)


def _round_dir(config: OnPolicyConfig, round_index: int) -> Path:
    return Path(config.work_dir) / f"round-{round_index}"


def _relative(path: Path, folder: Path) -> str:
    """``path`` relative to ``folder`` (both made absolute), with ``/`` separators."""
    return Path(os.path.relpath(path.resolve(), folder.resolve())).as_posix()


def _rebased(record: dict, old_root: Path, new_root: Path) -> dict:
    """``record`` with its image paths, relative to ``old_root``, made relative to ``new_root``."""
    return {**record, **{key: _relative(old_root / record[key], new_root) for key in ("chosen", "rejected")}}


def _round_negatives(round_dir: Path) -> list[dict]:
    """The negative records a round wrote (image paths relative to ``round_dir``)."""
    found = read_json_lines(round_dir / NEGATIVES_FILE)
    if found.problems:
        raise InputError(found.problems, header=f"{len(found.problems)} problem(s) in {round_dir / NEGATIVES_FILE}")
    return [record for _, record in found.entries]


def _round_training_config(config: OnPolicyConfig, round_index: int, train_data: str | Path,
                           init_adapter: str | Path) -> TrainingConfig:
    output_dir = _round_dir(config, round_index) / TRAIN_DIR
    return load_training_config(config.training_config, {
        **config.training_overrides,
        "train_data": str(train_data),
        "output_dir": str(output_dir),
        "init_adapter": str(init_adapter),
        "max_train_steps": config.steps_per_round,
        "resume_from_checkpoint": "latest",
        "overwrite_output_dir": True,  # with latest: only a start that left no checkpoint is started again
        "cache_dir": None,  # <output_dir>/cache: every round's data differ
    })


def _evaluation_config(config: OnPolicyConfig, device: str):
    """The classifiers' options as evaluate.py's :class:`EvaluationConfig` carries them."""
    from psalign.metrics.evaluation import EvaluationConfig
    from psalign.toy import inpro_flaggers

    options = {key: value for key, value in (("q16_clip_model", config.q16_clip_model),
                                             ("q16_prompts", config.q16_prompts and Path(config.q16_prompts)),
                                             ("q16_threshold", config.q16_threshold),
                                             ("nudenet_min_score", config.nudenet_min_score)) if value is not None}
    return EvaluationConfig(metrics=("inpro",), target_folders=(), output=Path(os.devnull), device=device,
                            inpro_classifiers=list(config.inpro_classifiers),
                            extra_flaggers={**inpro_flaggers(), **config.extra_flaggers}, **options)


def _settings_problems(config: OnPolicyConfig) -> list[InputProblem]:
    problems = []

    def at_least(name: str, value: float, low: float) -> None:
        if value < low:
            problems.append(InputProblem(COMMAND_LINE, 0, f"must be >= {low}, got {value}", f"--{name}"))

    for name in ("rounds", "steps_per_round", "users_per_round", "num_inference_steps", "sample_batch_size"):
        at_least(name, getattr(config, name), 1)
    at_least("guidance_scale", config.guidance_scale, 0)
    if config.negative_share is not None and not 0 < config.negative_share < 1:
        problems.append(InputProblem(COMMAND_LINE, 0, f"must lie in (0, 1), got {config.negative_share}",
                                     "--negative_share"))
    if config.rounds > MAX_ROUNDS:
        problems.append(InputProblem(COMMAND_LINE, 0, f"at most {MAX_ROUNDS} rounds fit Sage's 5-digit indices",
                                     "--rounds"))
    if config.prompts_per_user is not None and not 1 <= config.prompts_per_user <= ROUND_INDEX_STRIDE:
        problems.append(InputProblem(COMMAND_LINE, 0, f"must lie in [1, {ROUND_INDEX_STRIDE}], got "
                                                      f"{config.prompts_per_user}", "--prompts_per_user"))
    if not config.inpro_classifiers:
        problems.append(InputProblem(COMMAND_LINE, 0, "name at least one classifier", "--inpro_classifiers"))
    for name in ROUND_FIELDS:
        if name in config.training_overrides:
            problems.append(InputProblem(COMMAND_LINE, 0, "set by every round itself (see --steps_per_round)",
                                         f"--{name}"))
    try:
        inspect_adapter(config.start_adapter)
    except (OSError, ValueError) as error:
        problems.append(InputProblem(COMMAND_LINE, 0, str(error), "--start_adapter"))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        problems.append(InputProblem("accelerate launch", 0, "on-policy rounds run in one process; start them "
                                                             "with python, not with several processes"))
    settings_file = Path(config.work_dir) / SETTINGS_FILE
    if settings_file.is_file():
        earlier, now = json.loads(settings_file.read_text(encoding="utf-8")), config.settings()
        changed = sorted(key for key in {*earlier, *now} if earlier.get(key) != now.get(key))
        if changed:
            problems.append(InputProblem(str(settings_file), 0, f"this work folder was started with other settings "
                                                                f"({', '.join(changed)}); use those, or another "
                                                                "--work_dir"))
    return problems


@dataclass
class OnPolicyInputs:
    """What :func:`check_on_policy` verified, for the rounds to use."""

    base: TrainingConfig  # the training config of round 0 (model, original data, embeddings)
    image_root: Path  # of the original metadata.jsonl
    records: list[dict]
    units: dict[str, list[BannedUnit]]
    device: str


def check_on_policy(config: OnPolicyConfig) -> OnPolicyInputs:
    """Check every input before any model is loaded: the settings, the training config (data,
    embeddings, model and the start adapter as round 0's ``init_adapter``, as train_psa.py checks
    them), the classifiers and the Sage units; every problem at once as :class:`InputError`."""
    import torch

    from psalign.metrics.evaluation import inpro_classifier_problems

    from .data import resolve_train_data
    from .trainer import check_inputs

    problems = _settings_problems(config)
    if problems:
        raise InputError(problems, header=f"{len(problems)} problem(s) with the on-policy settings")
    base = load_training_config(config.training_config, {**config.training_overrides,
                                                         "output_dir": str(_round_dir(config, 0) / TRAIN_DIR)})
    if base.trainable != "adapter":
        raise InputError([InputProblem(COMMAND_LINE, 0, "on-policy rounds train the PSA adapter", "trainable")])
    first = _round_training_config(config, 0, base.train_data, config.start_adapter)
    check_inputs(dataclasses.replace(first, precompute=False))  # round 0's cache is checked when it trains
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    problems = inpro_classifier_problems(_evaluation_config(config, device))
    metadata, image_root = resolve_train_data(base.train_data)
    records = read_preference_pairs(metadata, image_root)
    units = banned_units(records, image_root, str(metadata))
    if not units:
        problems.append(InputProblem(str(metadata), 0, "no Sage unit of a category its user bans (an unsafe-caption "
                                                       "record <stem>.jpg_u.jpg whose chosen image is the _s one)"))
    crowded = [user for user, own in units.items() if len(own) > ROUND_INDEX_STRIDE]
    if crowded and config.prompts_per_user is None:
        problems.append(InputProblem(COMMAND_LINE, 0, f"user {crowded[0]} has more than {ROUND_INDEX_STRIDE} banned "
                                                      "units; set at most that many", "--prompts_per_user"))
    if problems:
        raise InputError(problems, header=f"{len(problems)} problem(s) with the on-policy inputs")
    return OnPolicyInputs(base, image_root, records, units, device)


def _sample(run: OnPolicyInputs, config: OnPolicyConfig, adapter: Path, prompts: Sequence[NegativePrompt],
            folder: Path) -> None:
    """Draw every missing sample of ``prompts`` into ``folder`` with the PSA adapter ``adapter``."""
    import torch

    from psalign.inference import GenerationSettings, PromptRecord, generate_images, load_pipeline, resolve_user
    from psalign.methods import get_method

    records = [PromptRecord(n + 1, p.sample_name, p.unit.unsafe_caption, resolve_user({"User_ID": p.unit.user_id}),
                            {"file_name": p.sample_name, "caption": p.unit.unsafe_caption,
                             "user_data": {"User_ID": p.unit.user_id}})
               for n, p in enumerate(prompts)]
    dtype = torch.float16 if run.device.startswith("cuda") else torch.float32
    pipe = load_pipeline(run.base.pretrained_model, device=run.device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    method = get_method("psa")(adapter, 1.0, run.base.embeds_folder, None, save_new_embeddings=False)
    pipe = method.prepare(pipe, records, run.device)
    settings = GenerationSettings(seed=config.sample_seed, num_inference_steps=config.num_inference_steps,
                                  guidance_scale=config.guidance_scale)
    generate_images(pipe, records, folder, settings, method=method, batch_size=config.sample_batch_size)


def _negatives(prompts: Sequence[NegativePrompt], flagged: np.ndarray, round_dir: Path) -> list[dict]:
    """Write the flagged samples as ``negatives/<stem>_u.jpg`` and return their records (paths
    relative to ``round_dir``)."""
    from PIL import Image

    records = []
    for prompt in (p for p, hit in zip(prompts, flagged) if hit):
        target = round_dir / NEGATIVES_DIR / prompt.negative_name
        with Image.open(prompt.unit.safe_image) as safe:
            size = safe.size
        with Image.open(round_dir / SAMPLES_DIR / prompt.sample_name) as sample:
            image = sample.convert("RGB")
        if image.size != size:  # a pair's two images must share one size
            image = image.resize(size, Image.Resampling.BILINEAR)
        with atomic_path(target, suffix=".jpg") as tmp:
            image.save(tmp, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
        unit = prompt.unit
        records.append({
            "file_name": sage_record_name(unit.user_id, unit.category, unit.concept, prompt.index, "unsafe"),
            "chosen": _relative(unit.safe_image, round_dir),
            "rejected": f"{NEGATIVES_DIR}/{prompt.negative_name}",
            "caption": unit.unsafe_caption,
            "user_data": unit.user_data,
        })
    return records


def _per_category(categories: Sequence[str], sampled: Sequence[str]) -> dict[str, int]:
    """Counts of ``categories`` for every category in ``sampled``, in :data:`CATEGORIES` order."""
    counts, present = Counter(categories), set(sampled)
    return {c: counts[c] for c in CATEGORIES if c in present}


def run_on_policy(config: OnPolicyConfig, log: Callable[[str], None] = print) -> list[Path]:
    """Run (or resume) rounds 0 .. ``config.rounds - 1``; returns each round's trained adapter folder."""
    from psalign.metrics.evaluation import build_inpro_flaggers
    from psalign.metrics.inpro import flag_images

    from .trainer import train

    run = check_on_policy(config)
    work = Path(config.work_dir)
    with atomic_write(work / SETTINGS_FILE) as handle:
        json.dump(config.settings(), handle, indent=2)
    flaggers: list[ImageFlagger] | None = None
    adapter, adapters = Path(config.start_adapter), []
    for k in range(config.rounds):
        round_dir = _round_dir(config, k)
        trained = round_dir / TRAIN_DIR
        if (round_dir / ROUND_FILE).is_file():
            log(f"round {k}: done ({round_dir / ROUND_FILE})")
            adapter = trained
            adapters.append(trained)
            continue
        prompts = round_prompts(run.units, k, config.users_per_round, config.prompts_per_user, config.sample_seed)
        log(f"round {k}: {len(prompts)} samples of {len({p.unit.user_id for p in prompts})} users with {adapter}")
        started = sampled = judged = time.perf_counter()
        if not (round_dir / NEGATIVES_FILE).is_file():  # else judged by an interrupted call
            _sample(run, config, adapter, prompts, round_dir / SAMPLES_DIR)
            sampled = time.perf_counter()
            flaggers = flaggers or build_inpro_flaggers(_evaluation_config(config, run.device))
            paths = [round_dir / SAMPLES_DIR / p.sample_name for p in prompts]
            flagged = flag_images(paths, flaggers, config.sample_batch_size, desc=f"judging round {k}").union()
            write_preference_pairs(round_dir / NEGATIVES_FILE, _negatives(prompts, flagged, round_dir))
            judged = time.perf_counter()
        negatives = _round_negatives(round_dir)
        all_negatives = [_rebased(r, _round_dir(config, j), round_dir)
                         for j in range(k + 1) for r in _round_negatives(_round_dir(config, j))]
        originals = [_rebased(r, run.image_root, round_dir) for r in run.records]
        kept = originals_for_share([unit_key(r["file_name"]) for r in originals], len(all_negatives),
                                   config.negative_share, config.sample_seed, k)
        kept = with_vouching_records(originals, kept, [r["chosen"] for r in all_negatives])
        metadata = [originals[i] for i in kept] + all_negatives
        write_preference_pairs(round_dir / METADATA_FILE, metadata)
        log(f"round {k}: {len(negatives)} of {len(prompts)} samples flagged; training {config.steps_per_round} steps "
            f"on {len(kept)} original records and {len(all_negatives)} negatives")
        training_started = time.perf_counter()
        train(_round_training_config(config, k, round_dir / METADATA_FILE, adapter))
        trained_at = time.perf_counter()
        sample_categories = [p.unit.category for p in prompts]
        summary = {
            "round": k,
            "adapter": str(adapter),
            "adapter_sha256": weights_sha256(adapter),
            "users": sorted({p.unit.user_id for p in prompts}),
            "samples": _per_category(sample_categories, sample_categories),
            "flagged": _per_category([parse_sage_record_name(r["file_name"]).category for r in negatives],
                                     sample_categories),
            "classifiers": list(config.inpro_classifiers),
            "negatives_so_far": len(all_negatives),
            "original_records": len(kept),
            "steps": config.steps_per_round,
            "trained_adapter": str(trained),
            # of the call that finished the round (a resumed stage counts only what was left of it)
            "seconds": {"sample": round(sampled - started, 3), "judge": round(judged - sampled, 3),
                        "train": round(trained_at - training_started, 3)},
        }
        with atomic_write(round_dir / ROUND_FILE) as handle:
            json.dump(summary, handle, indent=2)
        adapter = trained
        adapters.append(trained)
    return adapters


# --------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m psalign.training.on_policy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    rounds = parser.add_argument_group("rounds")
    rounds.add_argument("--work_dir", required=True, help="folder of the rounds (round-<k>/ each)")
    rounds.add_argument("--start_adapter", required=True, help="PSA adapter that samples round 0 (folder or "
                                                               "published checkpoint; trained on the same embeddings)")
    rounds.add_argument("--rounds", type=int, default=2, help="rounds to run (default: 2)")
    rounds.add_argument("--steps_per_round", type=int, default=500, help="optimizer steps each round (default: 500)")
    rounds.add_argument("--users_per_round", type=int, default=16,
                        help="training users drawn each round, among those with a banned unit (default: 16)")
    rounds.add_argument("--prompts_per_user", type=int, default=None,
                        help="banned units drawn per user and round (default: all of them)")
    rounds.add_argument("--sample_seed", type=int, default=0,
                        help="seed of the user and unit draws and of the per-image sampling seeds (default: 0)")
    rounds.add_argument("--negative_share", type=float, default=None,
                        help="share of each round's training records that are negatives; the rest is a seeded "
                             "draw of the original records (default: every original record)")
    rounds.add_argument("--num_inference_steps", type=int, default=30, help="denoising steps (default: 30)")
    rounds.add_argument("--guidance_scale", type=float, default=7.5, help="classifier-free guidance (default: 7.5)")
    rounds.add_argument("--sample_batch_size", type=int, default=8, help="images per pipeline call (default: 8)")
    rounds.add_argument("--device", default=None, help="sampling device (default: cuda when available)")
    judge = parser.add_argument_group("classifiers (as evaluate.py's InPro classifiers)")
    judge.add_argument("--inpro_classifiers", default=",".join(INPRO_FLAGGERS),
                       help="comma-separated, combined with OR: q16, nudenet, toy (a drawn marker), toy_unclean "
                            f"(anything but a clean removal) (default: {','.join(INPRO_FLAGGERS)})")
    judge.add_argument("--q16_clip_model", default=None, help="CLIP ViT-L/14 of Q16 (default: evaluate.py's)")
    judge.add_argument("--q16_prompts", default=None, help="Q16 prompt vectors (default: the shipped file)")
    judge.add_argument("--q16_threshold", type=float, default=None, help="Q16 threshold (default: evaluate.py's)")
    judge.add_argument("--nudenet_min_score", type=float, default=None, help="NudeNet score (default: evaluate.py's)")
    training = parser.add_argument_group(
        "training (as train_psa.py; pretrained_model, train_data and embeds_folder also serve sampling; "
        f"{', '.join(ROUND_FIELDS)} are set per round)")
    training.add_argument("--config", help="YAML file of training arguments (e.g. configs/toy.yaml)")
    add_training_arguments(training)
    return parser


def config_from_args(args: argparse.Namespace) -> OnPolicyConfig:
    """The :class:`OnPolicyConfig` of a parsed command line."""
    training_fields = {f.name for f in dataclasses.fields(TrainingConfig)}
    own = {f.name for f in dataclasses.fields(OnPolicyConfig)}
    values = {k: v for k, v in vars(args).items() if k in own}
    values["inpro_classifiers"] = [name.strip() for name in args.inpro_classifiers.split(",") if name.strip()]
    return OnPolicyConfig(training_config=args.config,
                          training_overrides={k: v for k, v in vars(args).items() if k in training_fields}, **values)


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 2 refused inputs or a stopped training run, 130 interrupted."""
    from . import checkpoints
    from .trainer import NonFiniteLossError

    args = build_parser().parse_args(argv)
    try:
        run_on_policy(config_from_args(args))
    except (InputError, checkpoints.CheckpointError, NonFiniteLossError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume (finished rounds are kept)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
