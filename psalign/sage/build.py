"""``python -m psalign.sage build``: Sage-style preference data for any model, in five stages.

Each stage has a folder under ``out``; its outputs are written atomically and its ``done.json``
records what it did (counts, seconds, the settings it used). A rerun skips finished stages (and
refuses one whose recorded settings differ from the config's) and resumes an unfinished one:

1. ``concepts``: ``concepts.yaml`` (category -> concepts) from the config's YAML (the toy world's
   seen concepts with ``world: toy``) plus, optionally, concepts the writer LLM proposes;
   duplicates are dropped and near-duplicates (within a category or across two) reported on
   stderr and in the record.
2. ``prompts``: ``prompts.jsonl``, k (unsafe prompt, minimal safe rewrite) pairs per concept from
   the writer (:mod:`psalign.sage.writer`); rejected pairs are retried, then counted.
   Finished concepts are appended to ``progress.jsonl`` and replies cached, so nothing is asked twice.
3. ``images``: both prompts of a unit drawn from the same seed by ``infer.py``'s generation code
   (:func:`psalign.inference.run.run_inference`, sharded over Accelerate processes), named
   ``<category token>_<concept>_<5-digit index>_{u,s}.jpg``; existing images are kept.
4. ``filter``: evaluate.py's InPro classifiers (and optionally the VLM judge) on every image; a
   unit is kept when its unsafe image is flagged and its safe image is not. Verdicts are appended
   to ``flags.jsonl`` as they come.
5. ``pairs``: users (a ``users.csv``, or ``generate_users`` with the rule engine or the LLM
   labeller), kept units split into train / val / test_seen / test_unseen under ``out/sage/``
   (``metadata.jsonl`` by the Sage rule and ``summary.json`` per split, the published layout), a
   CoProV2 CSV for SafetyDPO experts (``out/coprov2``) and evaluation prompt sets
   (``out/eval_data/sage_seen.csv``, ``sage_unseen.csv``: ``file_name,caption,user_id``).
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import yaml

from psalign.categories import CATEGORIES, category_token
from psalign.io import InputError, InputProblem, append_json_lines, atomic_write, read_json_lines

from .concepts import concept_problem, dedupe_concepts, near_duplicates_text, read_concepts
from .config import SageBuildConfig
from .pairs import SageUnit, build_preference_pairs, sage_image_name, write_preference_pairs
from .writer import (
    CONCEPT_TEMPLATE_FIELDS,
    DEFAULT_CONCEPT_TEMPLATE,
    DEFAULT_PROMPT_TEMPLATE,
    PROMPT_TEMPLATE_FIELDS,
    CausalLMChatBackend,
    ConceptPrompts,
    LLMPromptWriter,
    LLMWriter,
    PairRules,
    PromptWriter,
    propose_concepts,
    read_writer_template,
)

STAGES: tuple[str, ...] = ("concepts", "prompts", "images", "filter", "pairs")
DONE_FILE = "done.json"
SPLITS: tuple[str, ...] = ("train", "val", "test_seen", "test_unseen")
#: The splits' folder, in the published layout (``sage/<split>/metadata.jsonl``).
SPLITS_DIR = "sage"
JPEG_SUFFIX = ".jpg"
#: Images per ``flag_images`` call of the filter stage (each call's verdicts are appended at once).
FILTER_CHUNK = 512

#: The settings each stage depends on: a finished stage whose record differs in one is refused.
STAGE_KEYS: dict[str, tuple[str, ...]] = {
    "concepts": ("world", "concepts", "propose_concepts", "concept_template", "near_duplicate_ratio"),
    "prompts": ("world", "writer", "writer_model", "prompt_template", "prompts_per_concept", "rewrite_attempts",
                "min_prompt_words", "max_prompt_words"),
    "images": ("seed", "sd_model", "sdxl", "images_per_prompt", "num_inference_steps", "guidance_scale", "height", "width"),
    "filter": ("filter_classifiers", "q16_clip_model", "q16_threshold", "nudenet_min_score", "judge_model"),
    "pairs": ("seed", "users", "generate_users", "labeller", "labeller_model", "heldout_users", "units_per_concept",
              "val_share", "test_share", "heldout_concepts"),
}


# --------------------------------------------------------------------------------------------
# Bookkeeping


def stage_dir(config: SageBuildConfig, stage: str) -> Path:
    return Path(config.out) / stage


def stage_settings(config: SageBuildConfig, stage: str) -> dict:
    values = config.to_dict()
    settings = {key: values[key] for key in STAGE_KEYS[stage]}
    if stage == "images":
        settings["sd_model"] = str(resolved_model(config))
    if stage == "concepts" and config.propose_concepts:
        settings.update(writer=config.writer, writer_model=config.writer_model)
    return settings


def stage_record(config: SageBuildConfig, stage: str) -> dict | None:
    """The stage's ``done.json`` (None when it has not finished); ``InputError`` when it was made
    with other settings than ``config``'s."""
    path = stage_dir(config, stage) / DONE_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    now = stage_settings(config, stage)
    changed = [f"{key}: built with {record['settings'].get(key)!r}, now {value!r}"
               for key, value in now.items() if record["settings"].get(key) != value]
    if changed:
        raise InputError([InputProblem(str(path), 0, c) for c in changed],
                         header=f"the {stage} stage was built with other settings; delete {path.parent} "
                                "(and the stages after it) to rebuild it")
    return record


def _finish(config: SageBuildConfig, stage: str, started: float, results: dict) -> dict:
    record = {"stage": stage, "seconds": round(time.perf_counter() - started, 1),
              "settings": stage_settings(config, stage), **results}
    with atomic_write(stage_dir(config, stage) / DONE_FILE) as handle:
        json.dump(record, handle, indent=2)
    return record


def _write_jsonl(path: Path, values) -> None:
    with atomic_write(path, encoding="utf-8") as handle:
        for value in values:
            handle.write(json.dumps(value, ensure_ascii=False) + "\n")


def _read_jsonl(path: Path) -> list:
    found = read_json_lines(path)
    if found.problems:
        raise InputError(found.problems, header=f"{path} is damaged; delete it to redo its stage")
    return [value for _, value in found.entries]


def _need(config: SageBuildConfig, stage: str) -> dict:
    record = stage_record(config, stage)
    if record is None:
        raise InputError([InputProblem(str(stage_dir(config, stage)), 0, "stage not finished")],
                         header=f"run the {stage} stage first")
    return record


def resolved_model(config: SageBuildConfig) -> str:
    """The model to draw with: ``sd_model``, or the bundled toy model for ``world: toy``."""
    if config.sd_model is not None:
        return str(config.sd_model)
    from psalign.toy import bundled_model_path

    return str(bundled_model_path())


# --------------------------------------------------------------------------------------------
# Writers


def llm_writer(config: SageBuildConfig, cache: Path) -> LLMWriter:
    """The writer LLM of ``config`` behind the judge's client, its replies cached in ``cache``."""
    if config.writer == "openai":
        from psalign.metrics.judge import OpenAIChatBackend

        backend = OpenAIChatBackend(config.writer_base_url or "", config.writer_model or "",
                                    config.writer_api_key or os.environ.get("OPENAI_API_KEY"), config.writer_timeout_s)
        if not config.writer_base_url:
            raise InputError([InputProblem("config", 0, "required for writer: openai", "writer_base_url")])
    elif config.writer == "local":
        backend = CausalLMChatBackend(config.writer_model, config.device, config.writer_max_new_tokens,
                                      config.writer_batch_size)
    else:
        raise InputError([InputProblem("config", 0, f"writer {config.writer!r} is not an LLM", "writer")])
    return LLMWriter(backend, cache, attempts=config.writer_attempts, backoff_s=config.writer_backoff_s)


def prompt_writer(config: SageBuildConfig) -> PromptWriter:
    if config.writer == "toy_template":
        from psalign.toy.sage_data import ToyTemplateWriter

        return ToyTemplateWriter()
    template = read_writer_template(config.prompt_template or DEFAULT_PROMPT_TEMPLATE, PROMPT_TEMPLATE_FIELDS)
    rules = PairRules(config.min_prompt_words, config.max_prompt_words)
    writer = llm_writer(config, stage_dir(config, "prompts") / "writer_cache.jsonl")
    return LLMPromptWriter(writer, template, rules, config.rewrite_attempts)


# --------------------------------------------------------------------------------------------
# Stage 1: concepts


def run_concepts(config: SageBuildConfig) -> dict:
    started = time.perf_counter()
    if config.world == "toy":
        from psalign.toy.sage_data import toy_concepts

        concepts = toy_concepts()
    else:
        concepts = read_concepts(config.concepts) if config.concepts is not None else {}
    proposed, invalid = 0, []
    if config.propose_concepts:
        template = read_writer_template(config.concept_template or DEFAULT_CONCEPT_TEMPLATE, CONCEPT_TEMPLATE_FIELDS)
        writer = llm_writer(config, stage_dir(config, "concepts") / "writer_cache.jsonl")
        for category in list(concepts) or list(CATEGORIES):
            for concept in propose_concepts(writer, template, category, config.propose_concepts):
                if concept_problem(concept) is None:
                    concepts.setdefault(category, []).append(concept)
                    proposed += 1
                else:
                    invalid.append({"category": category, "concept": concept})
    kept, report = dedupe_concepts(concepts, config.near_duplicate_ratio)
    kept = {c: names for c, names in kept.items() if names}
    if report["near_duplicates"]:
        print(f"{len(report['near_duplicates'])} pair(s) of near-duplicate concepts, all kept (look at them; also in "
              f"{stage_dir(config, 'concepts') / DONE_FILE}):\n" + near_duplicates_text(report["near_duplicates"]),
              file=sys.stderr)
    if not kept:
        raise InputError([InputProblem(str(config.concepts or "config"), 0, "no concepts")])
    with atomic_write(stage_dir(config, "concepts") / "concepts.yaml", encoding="utf-8") as handle:
        yaml.safe_dump(kept, handle, sort_keys=False, allow_unicode=True)
    return _finish(config, "concepts", started, {
        "categories": len(kept), "concepts": sum(map(len, kept.values())),
        "per_category": {c: len(v) for c, v in kept.items()}, "proposed": proposed,
        "invalid_proposals": invalid, **report,
    })


def read_built_concepts(config: SageBuildConfig) -> dict[str, list[str]]:
    return read_concepts(stage_dir(config, "concepts") / "concepts.yaml")


def kept_units(config: SageBuildConfig) -> list[dict]:
    """The filter stage's kept units (lines of ``filter/units.jsonl``)."""
    return [u for u in _read_jsonl(stage_dir(config, "filter") / "units.jsonl") if u["kept"]]


# --------------------------------------------------------------------------------------------
# Stage 2: prompts


def _reason_kind(reason: str) -> str:
    for kind, start in (("malformed", "malformed"), ("length", "the unsafe prompt has"), ("length", "the rewrite has"),
                        ("same_as_unsafe", "the rewrite is the"), ("repeats_concept", "the rewrite repeats"),
                        ("duplicate", "the ")):
        if reason.startswith(start):
            return kind
    return "other"


def run_prompts(config: SageBuildConfig) -> dict:
    started = time.perf_counter()
    concepts = read_built_concepts(config)
    folder = stage_dir(config, "prompts")
    progress = folder / "progress.jsonl"
    done = {(v["category"], v["concept"]): ConceptPrompts.from_json(v)
            for v in (_read_jsonl(progress) if progress.is_file() else [])}
    todo = [(c, k) for c, names in concepts.items() for k in names if (c, k) not in done]
    writer = prompt_writer(config)
    from tqdm.auto import tqdm

    with tqdm(total=len(todo), desc="prompt pairs", unit="concept") as bar:
        for start in range(0, len(todo), config.writer_batch_size):
            batch = todo[start : start + config.writer_batch_size]
            if hasattr(writer, "prefetch"):
                writer.prefetch(batch, config.prompts_per_concept)
            for category, concept in batch:
                result = writer.write(category, concept, config.prompts_per_concept)
                append_json_lines(progress, [result.to_json()])
                done[(category, concept)] = result
                bar.update(1)
    results = [done[(c, k)] for c, names in concepts.items() for k in names]
    _write_jsonl(folder / "prompts.jsonl", (r.to_json() for r in results))
    rejected = Counter(_reason_kind(item["reason"]) for r in results for item in r.rejected)
    short = [{"category": r.category, "concept": r.concept, "pairs": len(r.pairs)}
             for r in results if len(r.pairs) < config.prompts_per_concept]
    if short:
        print(f"{len(short)} concept(s) got fewer than {config.prompts_per_concept} valid pairs (see "
              f"{folder / DONE_FILE}: short_concepts)", file=sys.stderr)
    return _finish(config, "prompts", started, {
        "writer": writer.identity, "concepts": len(results), "pairs": sum(len(r.pairs) for r in results),
        "llm_requests": sum(r.requests for r in results), "rejected": sum(rejected.values()),
        "rejected_by_reason": dict(sorted(rejected.items())), "short_concepts": short,
    })


# --------------------------------------------------------------------------------------------
# Stage 3: images


@dataclass(frozen=True)
class ImageUnit:
    """One unit: a prompt pair drawn from one seed; ``index`` = pair number x images_per_prompt + repeat."""

    category: str
    concept: str
    index: int
    unsafe: str
    safe: str

    @property
    def stem(self) -> str:
        return f"{category_token(self.category)}_{self.concept.replace(' ', '_')}_{self.index:05d}"

    def image(self, variant: str) -> str:
        """File name in the images folder: ``<stem>_u.jpg`` (unsafe prompt) or ``<stem>_s.jpg``."""
        return f"{self.stem}_{variant}{JPEG_SUFFIX}"


def image_units(config: SageBuildConfig) -> list[ImageUnit]:
    units = []
    for line in _read_jsonl(stage_dir(config, "prompts") / "prompts.jsonl"):
        for number, pair in enumerate(line["pairs"]):
            for repeat in range(config.images_per_prompt):
                units.append(ImageUnit(line["category"], line["concept"], number * config.images_per_prompt + repeat,
                                       pair["unsafe"], pair["safe"]))
    return units


def image_requests(config: SageBuildConfig, units: list[ImageUnit]) -> list[dict]:
    """``infer.py`` prompt lines: the two prompts of a unit share one seed (so the two images
    share their layout), derived from the build seed and the unit's stem."""
    from psalign.inference.generate import sample_seed

    lines = []
    for unit in units:
        seed = sample_seed(config.seed, unit.stem)
        lines.append({"file_name": unit.image("u"), "caption": unit.unsafe, "seed": seed})
        lines.append({"file_name": unit.image("s"), "caption": unit.safe, "seed": seed})
    return lines


def run_images(config: SageBuildConfig) -> dict:
    """Draw the missing images; in every Accelerate process (each draws its shard)."""
    from accelerate import PartialState

    from psalign.inference.generate import GenerationSettings
    from psalign.inference.run import InferenceConfig, run_inference

    started = time.perf_counter()
    state = PartialState(cpu=config.device == "cpu")
    folder = stage_dir(config, "images")
    units = image_units(config)
    requests = folder / "requests.jsonl"
    if state.is_main_process:
        _write_jsonl(requests, image_requests(config, units))
    state.wait_for_everyone()
    settings = GenerationSettings(seed=config.seed, num_inference_steps=config.num_inference_steps,
                                  guidance_scale=config.guidance_scale, height=config.height, width=config.width)
    inference = InferenceConfig(meta_data=requests, save_path=folder, sd_model=resolved_model(config),
                                sdxl=config.sdxl, batch_size=config.generation_batch, device=config.device,
                                dtype=config.dtype, settings=settings)
    written = run_inference(inference)
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        written = sum(gather_object([len(written)]))
    else:
        written = len(written)
    if not state.is_main_process:
        return {}
    return _finish(config, "images", started, {"units": len(units), "images": 2 * len(units),
                                               "drawn_now": int(written), "processes": state.num_processes})


# --------------------------------------------------------------------------------------------
# Stage 4: filter


class JudgeFlagger:
    """The VLM judge as a filter: an image is flagged when it fails for a user who bans the unit's category."""

    name = "judge"

    def __init__(self, config: SageBuildConfig):
        from psalign.metrics.judge import Judge, JudgeCache, OpenAIChatBackend

        backend = OpenAIChatBackend.from_options(config.judge_base_url, config.judge_model, config.judge_api_key)
        self.judge = Judge(backend, JudgeCache(stage_dir(config, "filter") / "judge_cache.jsonl"))

    def flag(self, path: Path, category: str, caption: str) -> bool:
        from psalign.metrics.judge import JudgeUser

        user = JudgeUser(banned=(category,), allowed=tuple(c for c in CATEGORIES if c != category))
        return not self.judge.judge_pass(path, user, caption)


def image_flaggers(config: SageBuildConfig) -> list:
    """evaluate.py's InPro classifiers named in ``filter_classifiers`` (the judge aside)."""
    from psalign.metrics.evaluation import EvaluationConfig, build_inpro_flaggers
    from psalign.toy import inpro_flaggers

    names = [c for c in config.filter_classifiers if c != "judge"]
    if not names:
        return []
    options = {k: v for k, v in (("q16_clip_model", config.q16_clip_model), ("q16_threshold", config.q16_threshold),
                                 ("nudenet_min_score", config.nudenet_min_score)) if v is not None}
    evaluation = EvaluationConfig(metrics=("inpro",), target_folders=(), output=stage_dir(config, "filter"),
                                  device=config.device or "cpu", batch_size=config.filter_batch,
                                  inpro_classifiers=names, extra_flaggers=inpro_flaggers(), **options)
    return build_inpro_flaggers(evaluation)


def run_filter(config: SageBuildConfig) -> dict:
    from psalign.metrics.inpro import flag_images

    started = time.perf_counter()
    units = image_units(config)
    images = stage_dir(config, "images")
    folder = stage_dir(config, "filter")
    flags_path = folder / "flags.jsonl"
    flags = {v["image"]: v["flags"] for v in (_read_jsonl(flags_path) if flags_path.is_file() else [])}
    captions = {u.image(v): (u.category, u.unsafe if v == "u" else u.safe) for u in units for v in "us"}
    todo = [name for name in captions if name not in flags]
    missing = [name for name in todo if not (images / name).is_file()]
    if missing:
        raise InputError([InputProblem(str(images / missing[0]), 0, f"missing image ({len(missing)} in all)")],
                         header="rerun the images stage")
    flaggers = image_flaggers(config) if todo else []
    judge = JudgeFlagger(config) if todo and "judge" in config.filter_classifiers else None
    for start in range(0, len(todo), FILTER_CHUNK):
        chunk = todo[start : start + FILTER_CHUNK]
        verdicts = {name: {} for name in chunk}
        if flaggers:
            table = flag_images([images / n for n in chunk], flaggers, config.filter_batch, desc="filter")
            for flagger, found in table.flags.items():
                for name, flagged in zip(chunk, found):
                    verdicts[name][flagger] = bool(flagged)
        if judge is not None:
            for name in chunk:
                verdicts[name]["judge"] = judge.flag(images / name, *captions[name])
        append_json_lines(flags_path, [{"image": n, "flags": verdicts[n]} for n in chunk])
        flags.update(verdicts)
    lines, kept = [], Counter()
    totals = Counter()
    for unit in units:
        unsafe_flagged = any(flags[unit.image("u")].values())
        safe_flagged = any(flags[unit.image("s")].values())
        keep = unsafe_flagged and not safe_flagged
        totals[(unit.category, unit.concept)] += 1
        kept[(unit.category, unit.concept)] += keep
        lines.append({"category": unit.category, "concept": unit.concept, "index": unit.index, "unsafe": unit.unsafe,
                      "safe": unit.safe, "unsafe_image": unit.image("u"), "safe_image": unit.image("s"),
                      "unsafe_flags": flags[unit.image("u")], "safe_flags": flags[unit.image("s")], "kept": keep})
    _write_jsonl(folder / "units.jsonl", lines)

    def share(keys) -> float:
        total = sum(totals[k] for k in keys)
        return round(sum(kept[k] for k in keys) / total, 4) if total else 0.0

    categories = list(dict.fromkeys(c for c, _ in totals))
    return _finish(config, "filter", started, {
        "units": len(units), "kept": sum(kept.values()),
        "kept_share_by_category": {c: share([k for k in totals if k[0] == c]) for c in categories},
        "kept_share_by_concept": {f"{c}: {k}": share([(c, k)]) for c, k in totals},
        "unsafe_flagged_share": round(np.mean([any(v["unsafe_flags"].values()) for v in lines]), 4) if lines else 0.0,
        "safe_flagged_share": round(np.mean([any(v["safe_flags"].values()) for v in lines]), 4) if lines else 0.0,
    })


# --------------------------------------------------------------------------------------------
# Stage 5: users, pairs, splits


def build_users(config: SageBuildConfig):
    from psalign.users import generate_users, read_users

    if config.users is not None:
        return read_users(config.users)
    users = generate_users(config.generate_users, seed=config.seed)
    if config.labeller == "llm":
        from psalign.labeller import LLMLabeller

        users = LLMLabeller(config.labeller_model, device=config.device).label(users)
    return users


Pools = dict[str, dict[tuple[str, str], list[dict]]]


def split_units(config: SageBuildConfig, kept: list[dict],
                concepts: dict[str, list[str]] | None = None) -> tuple[Pools, list[tuple[str, str]]]:
    """Kept units by split (``train``, ``val``, ``test``) and concept; held-out concepts go to ``test``
    whole; each other concept's units are shuffled (seeded) and cut by ``test_share`` and ``val_share``.

    Also returns the (category, concept) keys that are not held out yet have no training unit:
    those of ``kept`` whose units all went to other splits and, when ``concepts`` (the build's
    concepts) is given, those with no kept unit at all."""
    by_concept: dict[tuple[str, str], list[dict]] = {}
    for unit in kept:
        by_concept.setdefault((unit["category"], unit["concept"]), []).append(unit)
    rng = np.random.default_rng([config.seed, 5])
    pools: dict[str, dict[tuple[str, str], list[dict]]] = {"train": {}, "val": {}, "test": {}}
    for key in sorted(by_concept, key=lambda k: (CATEGORIES.index(k[0]), k[1])):
        units = sorted(by_concept[key], key=lambda u: u["index"])
        if key[1] in config.heldout_concepts:
            pools["test"][key] = units
            continue
        order = [units[i] for i in rng.permutation(len(units))]
        n_test, n_val = round(config.test_share * len(units)), round(config.val_share * len(units))
        for split, part in (("test", order[:n_test]), ("val", order[n_test : n_test + n_val]),
                            ("train", order[n_test + n_val :])):
            if part:
                pools[split][key] = sorted(part, key=lambda u: u["index"])
    keys = list(by_concept) + [(c, k) for c, names in (concepts or {}).items() for k in names]
    return pools, [key for key in dict.fromkeys(keys) if key[1] not in config.heldout_concepts
                   and key not in pools["train"]]


def assign(users, pool: dict[tuple[str, str], list[dict]], per_concept: int | None, rng: np.random.Generator,
           images: str) -> list[SageUnit]:
    """Each user's units: ``per_concept`` of each concept's pool drawn without replacement (all when
    None or when the pool is smaller); image paths are ``images``/<name>."""
    out = []
    for user in users:
        for (category, concept), units in pool.items():
            if per_concept is None or per_concept >= len(units):
                chosen = units
            elif per_concept == 1:
                chosen = [units[rng.integers(len(units))]]
            else:
                chosen = [units[i] for i in sorted(rng.choice(len(units), per_concept, replace=False))]
            out += [SageUnit(user.user_id, category, concept, u["index"], u["safe"], u["unsafe"],
                             f"{images}/{u['safe_image']}", f"{images}/{u['unsafe_image']}") for u in chosen]
    return out


def _link(source: Path, target: Path) -> str:
    """Hard-link ``source`` to ``target`` (a copy where the file system has no hard links); returns which."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        target.unlink()
    try:
        os.link(source, target)
        return "linked"
    except OSError:
        shutil.copy2(source, target)
        return "copied"


def write_coprov2(out: Path, images: Path, pool: dict[tuple[str, str], list[dict]]) -> dict:
    """``coprov2/train.csv`` (``prompt,image,category``) with ``images/u_idx_<n>.jpg`` and
    ``s_idx_<n>.jpg`` (links to the unit's images), as :func:`psalign.safetydpo.data.read_coprov2_pairs` reads."""
    rows, how = [], Counter()
    number = 0
    for (category, _), units in pool.items():
        for unit in units:
            for side, prompt, name in (("u", unit["unsafe"], unit["unsafe_image"]), ("s", unit["safe"], unit["safe_image"])):
                image = f"images/{side}_idx_{number}{JPEG_SUFFIX}"
                how[_link(images / name, out / image)] += 1
                rows.append((prompt, image, category))
            number += 1
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(("prompt", "image", "category"))
    writer.writerows(rows)
    with atomic_write(out / "train.csv", encoding="utf-8") as handle:
        handle.write(buffer.getvalue())
    return {"pairs": number, "images": dict(how)}


def write_eval_prompts(path: Path, units: list[SageUnit]) -> int:
    """An evaluation prompt set in the published ``file_name,caption,user_id`` layout: the unsafe prompt of each unit."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(("file_name", "caption", "user_id"))
    for unit in units:
        writer.writerow((sage_image_name(unit.user_id, unit.category, unit.concept, unit.index, "u"),
                         unit.unsafe_caption, int(unit.user_id)))
    with atomic_write(path, encoding="utf-8") as handle:
        handle.write(buffer.getvalue())
    return len(units)


def run_pairs(config: SageBuildConfig) -> dict:
    from psalign.users import write_users

    started = time.perf_counter()
    concepts = read_built_concepts(config)
    unknown = [c for c in config.heldout_concepts if not any(c in names for names in concepts.values())]
    if unknown:
        raise InputError([InputProblem("config", 0, f"{c!r} is not a concept of the build", "heldout_concepts")
                          for c in unknown])
    users = build_users(config)
    if config.heldout_users >= len(users):
        raise InputError([InputProblem(str(config.users or "config"), 0,
                                       f"{config.heldout_users} held-out users leave none of {len(users)} to train",
                                       "heldout_users")])
    train_users = users[: len(users) - config.heldout_users]
    heldout = users[len(users) - config.heldout_users :]
    kept = kept_units(config)
    pools, no_units = split_units(config, kept, concepts)
    if no_units or not pools["train"]:
        print(f"no kept unit for training in {len(no_units)} concept(s): {no_units}", file=sys.stderr)
    out = Path(config.out)
    splits_dir = out / SPLITS_DIR
    rng = np.random.default_rng([config.seed, 6])
    images = "../../images"  # from sage/<split>/ to the images stage's folder
    split_units_ = {
        "train": assign(train_users, pools["train"], config.units_per_concept, rng, images),
        "val": assign(train_users, pools["val"], config.units_per_concept, rng, images),
        "test_seen": assign(train_users, pools["test"], config.units_per_concept, rng, images),
        "test_unseen": assign(heldout, pools["test"] or pools["train"], config.units_per_concept, rng, images),
    }
    write_users(splits_dir / "users.csv", users)
    write_users(splits_dir / "users_train.csv", train_users)
    if heldout:
        write_users(splits_dir / "users_heldout.csv", heldout)
    counts = {}
    for split, units in split_units_.items():
        folder = splits_dir / split
        if not units:
            counts[split] = {"units": 0, "records": 0}
            continue
        records = build_preference_pairs(units, users)
        write_preference_pairs(folder / "metadata.jsonl", records)
        user_ids = list(dict.fromkeys(u.user_id for u in units))
        summary = {"user_ids": user_ids, "units": len(units), "records": len(records)}
        with atomic_write(folder / "summary.json") as handle:
            json.dump(summary, handle, indent=2)
        counts[split] = {"users": len(user_ids), "units": len(units), "records": len(records)}
    coprov2 = write_coprov2(out / "coprov2", stage_dir(config, "images"), pools["train"]) if pools["train"] else {}
    eval_sets = {}
    for name, split in (("sage_seen", "test_seen"), ("sage_unseen", "test_unseen")):
        if split_units_[split]:
            eval_sets[name] = write_eval_prompts(out / "eval_data" / f"{name}.csv", split_units_[split])
    return _finish(config, "pairs", started, {
        "users": len(users), "train_users": len(train_users), "heldout_users": len(heldout),
        "kept_units": len(kept), "units_by_split": {s: sum(map(len, p.values())) for s, p in pools.items()},
        "splits": counts, "coprov2": coprov2, "eval_prompts": eval_sets,
        "concepts_without_training_units": [f"{c}: {k}" for c, k in no_units],
    })


# --------------------------------------------------------------------------------------------
# Driver


RUNNERS: dict[str, Callable[[SageBuildConfig], dict]] = {
    "concepts": run_concepts,
    "prompts": run_prompts,
    "images": run_images,
    "filter": run_filter,
    "pairs": run_pairs,
}


def build(config: SageBuildConfig, until: str = STAGES[-1]) -> dict[str, dict]:
    """Run the stages up to ``until``, skipping finished ones; returns every stage's record.

    Under several Accelerate processes only the images stage runs (each process draws its shard);
    the stages before it must be finished, and the ones after it run in one process afterwards.
    """
    from accelerate import PartialState

    if until not in STAGES:
        raise ValueError(f"unknown stage {until!r}; stages: {', '.join(STAGES)}")
    state = PartialState(cpu=config.device == "cpu")
    pending = [s for s in STAGES[: STAGES.index(until) + 1] if stage_record(config, s) is None]
    if "images" in pending:  # before the writer spends anything
        from psalign.inference.pipeline import model_problems

        problems = model_problems(resolved_model(config))
        if problems:
            raise InputError(problems, header="sd_model: the model to align cannot be loaded")
    records: dict[str, dict] = {}
    for stage in STAGES[: STAGES.index(until) + 1]:
        record = stage_record(config, stage)
        if record is None and state.num_processes > 1:
            if stage != "images":
                raise InputError([InputProblem(str(stage_dir(config, stage)), 0, "stage not finished")],
                                 header=f"{state.num_processes} processes draw the images only: run the {stage} "
                                        "stage in one process (python -m psalign.sage build ...)")
            record = run_images(config)
            state.wait_for_everyone()
            return {**records, "images": record}
        if record is None:
            print(f"stage {stage} ...", file=sys.stderr)
            record = RUNNERS[stage](config)
        records[stage] = record
        if state.num_processes > 1 and stage == "images":
            return records
    return records
