r"""Reproduce an evaluation grid in one command: datasets x methods x models x levels.

    python -m psalign.reproduce configs/reproduce_toy.yaml                # the toy world, offline, minutes
    python -m psalign.reproduce configs/reproduce_paper.yaml --data_root eval_data/ \
        --levels published --users_csv users.csv --embeds_folder embeds/ \
        --format published --compare eval_results.csv
    accelerate launch -m psalign.reproduce CONFIG.yaml                   # generation sharded over processes
    torchrun --nproc_per_node 2 -m psalign.reproduce CONFIG.yaml --device cpu   # the same without a GPU

For every cell of the grid the prompt set is turned into an ``infer.py`` prompts file
(:mod:`psalign.prompt_sets`; a method with levels gets one cell per level, whose user comes from
the level set, :func:`psalign.levels.level_users`), the images are generated with
:func:`psalign.inference.run_inference` and evaluated with
:func:`psalign.metrics.evaluation.run_evaluation`. Everything is checked before the first image
is drawn; a rerun of the same command resumes (images on disk and result rows already computed
are kept). The output folder holds::

    prompts/<model>/<method>/<level>/<dataset>.jsonl    the prompts of each cell (level: level_3@0000002, none)
    images/<model>/<method>/<dataset>/<level>/          its images and generation_log.jsonl
    results.csv                                          every result row (psalign layout, with n and 95% CI)
    results_published.csv                                with --format published: the headline rows, published layout
    results.md                                           the table in the paper's shape
    comparison.csv, comparison.md                        with --compare: each value beside the published one

The YAML grid (paths relative to the YAML's folder; ``data_root`` for the prompt sets)::

    output: runs/toy                  # --output overrides
    levels: reference                 # level set: reference | published (--levels overrides)
    users_csv: null                   # the published users.csv (published levels)
    embeds_folder: null               # user embeddings: published levels and Sage users
    data_root: .                      # folder of the prompt set files (--data_root overrides)
    limit: null                       # first N rows of each set (--limit overrides)
    seed: 0                           # run seed; rows with an evaluation_seed keep theirs
    sampling: {num_inference_steps: 30, guidance_scale: 7.5, height: null, width: null}
    batch_size: 1
    evaluation: {inpro_classifiers: [q16, nudenet], metric_preset: paper, ...}   # EvaluationConfig fields
    datasets:
      - {name: coco_10k, prompts: coco_10k.csv, metrics: [fid, clip], reference: coco_ref.npz}
      - {name: sage_unseen, prompts: sage_unseen.csv, metrics: [inpro], users: levels}  # or: file
      - {name: ringabell, prompts: ringabell.csv, metrics: [asr], attack: ringabell}
    models:
      - {name: sd15, sd_model: stable-diffusion-v1-5/stable-diffusion-v1-5}   # no sd_model: the toy model
    methods:
      - {name: base}
      - {name: esdu, method: erased_unet, models: [sd15], model_options: {sd15: {unet_weights: esdu.safetensors}}}
      - {name: psa, levels: [level_1, level_2, level_3, level_4, level_5], options: {psa_path: adapter/}}

A method with ``levels`` needs user embeddings (``psa``); a Sage set (``file_name, caption,
user_id``) gives it the rows' own users unless ``users: levels``. The level of a result row is
``level_3@0000002``: the level and the user it measured.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from psalign.io import InputError, InputProblem, atomic_write
from psalign.levels import LEVEL_SETS, LevelUser, level_users
from psalign.metrics.report import (
    PUBLISHED_COLUMNS,
    RESULT_LAYOUTS,
    ResultRow,
    current_published_rows,
    is_published_layout,
    read_published_rows,
    read_results,
    write_results,
)
from psalign.prompt_sets import LAYOUTS, MMA_PROMPT_COLUMNS, PromptSet, infer_lines, read_prompt_set

#: Keys of a dataset entry, a model entry, a method entry and the grid itself.
DATASET_KEYS = ("name", "prompts", "metrics", "layout", "users", "attack", "mma_prompt", "reference", "limit")
MODEL_KEYS = ("name", "sd_model", "sdxl")
METHOD_KEYS = ("name", "method", "levels", "models", "options", "model_options")
GRID_KEYS = ("output", "levels", "users_csv", "embeds_folder", "data_root", "limit", "seed", "sampling",
             "batch_size", "evaluation", "datasets", "models", "methods")
#: ``InferenceConfig`` fields a method entry's options may set (paths relative to the YAML).
METHOD_OPTIONS = ("psa_path", "psa_scale", "lora_path", "lora_scale", "prompt_mode", "unet_weights", "sld_preset",
                  "sld_concept", "embeds_folder", "llm_model", "encoder", "sentence_model", "dtype")
_PATH_OPTIONS = ("psa_path", "lora_path", "unet_weights", "embeds_folder")
SAMPLING_KEYS = ("num_inference_steps", "guidance_scale", "negative_prompt", "height", "width")
#: ``EvaluationConfig`` fields the grid's ``evaluation`` may set (paths relative to the YAML).
EVALUATION_OPTIONS = ("metric_preset", "inpro_classifiers", "q16_clip_model", "q16_prompts", "q16_threshold",
                      "nudenet_min_score", "clip_model", "clip_clamp", "fid_resize", "fid_features", "inception_model",
                      "fid_cache_dir", "judge", "judge_base_url", "judge_model", "judge_cache", "judge_attempts",
                      "judge_timeout_s", "batch_size", "device", "judge_mode")
_EVALUATION_PATHS = ("q16_prompts", "inception_model", "fid_cache_dir", "judge_cache")
#: The level folder and prompts file name of a cell without a level.
NO_LEVEL = "none"


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    prompts: Path
    metrics: tuple[str, ...]
    layout: str | None = None
    users: str | None = None  # "levels" or "file" (Sage sets); None: "file" for Sage sets
    attack: str | None = None
    mma_prompt: str = "adv_prompt"
    reference: Path | None = None
    limit: int | None = None


@dataclass(frozen=True)
class ModelSpec:
    name: str
    sd_model: str | None = None  # None: the bundled toy model
    sdxl: bool = False


@dataclass(frozen=True)
class MethodSpec:
    name: str
    method: str
    levels: tuple[str, ...] | None = None
    models: tuple[str, ...] | None = None
    options: dict = field(default_factory=dict)
    model_options: dict = field(default_factory=dict)


@dataclass
class Grid:
    """A parsed grid YAML (see the module docstring); paths resolved against the YAML's folder."""

    source: Path
    output: Path
    datasets: list[DatasetSpec]
    models: list[ModelSpec]
    methods: list[MethodSpec]
    levels: str = "reference"
    users_csv: Path | None = None
    embeds_folder: Path | None = None
    limit: int | None = None
    seed: int = 0
    sampling: dict = field(default_factory=dict)
    batch_size: int = 1
    evaluation: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Cell:
    """One generation and evaluation: a dataset for a model, a method and (maybe) a level."""

    dataset: DatasetSpec
    model: ModelSpec
    method: MethodSpec
    level: LevelUser | None
    prompt_set: PromptSet

    @property
    def level_label(self) -> str:
        return self.level.label if self.level else ""

    @property
    def parts(self) -> tuple[str, str, str, str]:
        """Model, method, dataset and level (with its user: a folder never mixes two users' images)."""
        return self.model.name, self.method.name, self.dataset.name, self.level_label or NO_LEVEL

    def prompts_path(self, output: Path) -> Path:
        """``prompts/<model>/<method>/<level>/<dataset>.jsonl`` (``evaluate.py`` names a dataset by
        its prompts file's stem)."""
        model, method, dataset, level = self.parts
        return output / "prompts" / model / method / level / f"{dataset}.jsonl"

    def images_path(self, output: Path) -> Path:
        return output.joinpath("images", *self.parts)


# --------------------------------------------------------------------------------------------
# Reading the grid


def _relative(base: Path, value: Any) -> Path | None:
    if value is None:
        return None
    path = Path(str(value)).expanduser()
    return path if path.is_absolute() else base / path


def _name_list(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"must be a non-empty list of names, got {value!r}")
    return tuple(value)


def _entries(data: dict, key: str, known: Sequence[str], source: str,
             problems: list[InputProblem]) -> list[tuple[str, dict]]:
    """The ``(field, entry)`` of each object in the list ``data[key]``; unknown keys, a missing or
    repeated name are problems."""
    items = data.get(key)
    if not isinstance(items, list) or not items:
        problems.append(InputProblem(source, 0, "must be a non-empty list", key))
        return []
    found, names = [], set()
    for index, entry in enumerate(items):
        where = f"{key}[{index}]"
        if not isinstance(entry, dict):
            problems.append(InputProblem(source, 0, "must be a mapping", where))
            continue
        unknown = sorted(set(entry) - set(known))
        if unknown:
            problems.append(InputProblem(source, 0, f"unknown key(s) {unknown}; known: {', '.join(known)}", where))
            continue
        name = entry.get("name")
        if not isinstance(name, str) or not name.strip() or any(c in name for c in "/\\:@") or name.startswith("."):
            problems.append(InputProblem(source, 0, "needs a name (text without / \\ : @, not starting with '.')",
                                         f"{where}.name"))
            continue
        if name in names:
            problems.append(InputProblem(source, 0, f"name {name!r} is used twice", f"{where}.name"))
            continue
        names.add(name)
        found.append((where, entry))
    return found


def _positive_int(value: Any, where: str, source: str, problems: list[InputProblem]) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        problems.append(InputProblem(source, 0, f"must be a positive integer, got {value!r}", where))
        return None
    return value


def load_grid(path: str | Path, data_root: str | Path | None = None) -> Grid:
    """Parse and check the structure of a grid YAML (files are checked by :func:`plan_cells`);
    :class:`InputError` naming every field at fault. ``data_root`` replaces the YAML's."""
    from psalign.metrics.evaluation import METRICS

    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise InputError([InputProblem(source, 0, "grid file not found")])
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise InputError([InputProblem(source, 0, f"not valid YAML: {error}")]) from None
    if not isinstance(data, dict):
        raise InputError([InputProblem(source, 0, "must be a YAML mapping (see python -m psalign.reproduce --help)")])
    base = path.resolve().parent
    problems: list[InputProblem] = []
    unknown = sorted(set(data) - set(GRID_KEYS))
    if unknown:
        problems.append(InputProblem(source, 0, f"unknown key(s) {unknown}; known: {', '.join(GRID_KEYS)}"))
    data_root = Path(data_root) if data_root is not None else _relative(base, data.get("data_root", "."))
    datasets = []
    for where, entry in _entries(data, "datasets", DATASET_KEYS, source, problems):
        try:
            metrics = _name_list(entry.get("metrics"))
            if metrics is None:
                raise ValueError("needs the metrics to compute")
            if bad := [m for m in metrics if m not in METRICS]:
                raise ValueError(f"unknown metric(s) {bad}; choose from {', '.join(METRICS)}")
        except ValueError as error:
            problems.append(InputProblem(source, 0, str(error), f"{where}.metrics"))
            continue
        if not isinstance(entry.get("prompts"), str):
            problems.append(InputProblem(source, 0, "needs the prompt set file", f"{where}.prompts"))
            continue
        checks = [("layout", LAYOUTS), ("users", ("levels", "file")), ("mma_prompt", MMA_PROMPT_COLUMNS)]
        bad = [(key, allowed) for key, allowed in checks if entry.get(key) is not None and entry[key] not in allowed]
        for key, allowed in bad:
            problems.append(InputProblem(source, 0, f"must be one of {', '.join(allowed)}, got {entry[key]!r}",
                                         f"{where}.{key}"))
        limit = _positive_int(entry.get("limit"), f"{where}.limit", source, problems)
        if bad:
            continue
        datasets.append(DatasetSpec(
            entry["name"], _relative(data_root, entry["prompts"]), metrics, entry.get("layout"), entry.get("users"),
            entry.get("attack"), entry.get("mma_prompt", "adv_prompt"), _relative(base, entry.get("reference")), limit,
        ))
    models = []
    for where, entry in _entries(data, "models", MODEL_KEYS, source, problems):
        sd_model = entry.get("sd_model")
        if sd_model is not None and not isinstance(sd_model, str):
            problems.append(InputProblem(source, 0, "must be a hub id or a folder", f"{where}.sd_model"))
            continue
        if sd_model is not None and (local := _relative(base, sd_model)).exists():
            sd_model = str(local)
        models.append(ModelSpec(entry["name"], sd_model, bool(entry.get("sdxl", False))))
    model_names = {m.name for m in models}
    methods = []
    for where, entry in _entries(data, "methods", METHOD_KEYS, source, problems):
        try:
            levels = _name_list(entry.get("levels"))
            only = _name_list(entry.get("models"))
        except ValueError as error:
            problems.append(InputProblem(source, 0, str(error), where))
            continue
        if only and (missing := [m for m in only if m not in model_names]):
            problems.append(InputProblem(source, 0, f"no model named {missing}", f"{where}.models"))
        options = entry.get("options") or {}
        per_model = entry.get("model_options") or {}
        if not isinstance(per_model, dict) or not all(isinstance(v, dict) for v in per_model.values()):
            problems.append(InputProblem(source, 0, "must map model names to options", f"{where}.model_options"))
            continue
        for label, given in [("options", options), *((f"model_options.{k}", v) for k, v in per_model.items())]:
            if not isinstance(given, dict) or (bad := sorted(set(given) - set(METHOD_OPTIONS))):
                shown = bad if isinstance(given, dict) else given
                known = ", ".join(METHOD_OPTIONS)
                problems.append(InputProblem(source, 0, f"unknown option(s) {shown}; known: {known}", f"{where}.{label}"))
        if bad := sorted(set(per_model) - model_names):
            problems.append(InputProblem(source, 0, f"no model named {bad}", f"{where}.model_options"))
        def resolve(given: dict) -> dict:
            return {key: (str(_relative(base, value)) if key in _PATH_OPTIONS and value is not None else value)
                    for key, value in given.items()}

        methods.append(MethodSpec(entry["name"], str(entry.get("method") or entry["name"]), levels, only,
                                  resolve(options) if isinstance(options, dict) else {},
                                  {k: resolve(v) for k, v in per_model.items()}))
    level_set = data.get("levels", "reference")
    if level_set not in LEVEL_SETS:
        problems.append(InputProblem(source, 0, f"must be one of {', '.join(LEVEL_SETS)}, got {level_set!r}", "levels"))
    sampling = data.get("sampling") or {}
    if not isinstance(sampling, dict) or (bad := sorted(set(sampling) - set(SAMPLING_KEYS))):
        problems.append(InputProblem(source, 0, f"known keys: {', '.join(SAMPLING_KEYS)}", "sampling"))
        sampling = {}
    evaluation = data.get("evaluation") or {}
    if not isinstance(evaluation, dict) or (bad := sorted(set(evaluation) - set(EVALUATION_OPTIONS))):
        problems.append(InputProblem(source, 0, f"known keys: {', '.join(EVALUATION_OPTIONS)}", "evaluation"))
        evaluation = {}
    evaluation = {k: (_relative(base, v) if k in _EVALUATION_PATHS else v) for k, v in evaluation.items()}
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        problems.append(InputProblem(source, 0, f"must be a non-negative integer, got {seed!r}", "seed"))
    limit = _positive_int(data.get("limit"), "limit", source, problems)
    batch_size = _positive_int(data.get("batch_size", 1), "batch_size", source, problems) or 1
    if problems:
        raise InputError(problems, header=f"{len(problems)} problem(s) in the grid {path}")
    return Grid(source=path, output=_relative(base, data.get("output", "reproduce_runs")), datasets=datasets,
                models=models, methods=methods, levels=level_set, users_csv=_relative(base, data.get("users_csv")),
                embeds_folder=_relative(base, data.get("embeds_folder")), limit=limit, seed=seed,
                sampling=dict(sampling), batch_size=batch_size, evaluation=evaluation)


def _needs_users(method: MethodSpec) -> bool:
    from psalign.methods import get_method

    return get_method(method.method).needs_user_embeddings


def plan_cells(grid: Grid) -> list[Cell]:
    """Every cell of the grid, in order (datasets, then models, methods, levels), with its prompt
    set read and its levels' users found; :class:`InputError` listing every problem."""
    from psalign.methods import get_method

    problems: list[InputProblem] = []
    sets: dict[str, PromptSet] = {}
    for dataset in grid.datasets:
        try:
            sets[dataset.name] = read_prompt_set(dataset.prompts, dataset.layout, dataset.attack, dataset.mma_prompt)
        except InputError as error:
            problems += error.problems
            continue
        if "asr" in dataset.metrics and not sets[dataset.name].is_attack:
            problems.append(InputProblem(str(grid.source), 0, f"asr needs an attack prompt set; {dataset.prompts} is "
                                         f"a {sets[dataset.name].layout} set", f"datasets.{dataset.name}.metrics"))
    levels: dict[str, list[LevelUser]] = {}
    for method in grid.methods:
        try:
            get_method(method.method)
        except ValueError as error:
            problems.append(InputProblem(str(grid.source), 0, str(error), f"methods.{method.name}.method"))
            continue
        if _needs_users(method) != (method.levels is not None):
            reason = ("needs levels (its images are made for a user)" if _needs_users(method)
                      else "takes no levels (it does not read users)")
            problems.append(InputProblem(str(grid.source), 0, f"{method.method} {reason}", f"methods.{method.name}"))
        elif method.levels is not None:
            try:
                levels[method.name] = level_users(grid.levels, method.levels, grid.users_csv, grid.embeds_folder)
            except InputError as error:
                problems += error.problems
    if problems:
        raise InputError(problems, header=f"{len(problems)} problem(s) in the grid's inputs")
    cells = []
    for dataset in grid.datasets:
        prompt_set = sets[dataset.name]
        own_users = prompt_set.has_users and (dataset.users or "file") == "file"
        for model in grid.models:
            for method in grid.methods:
                if method.models is not None and model.name not in method.models:
                    continue
                if method.name in levels and not own_users:
                    cells += [Cell(dataset, model, method, level, prompt_set) for level in levels[method.name]]
                else:
                    cells.append(Cell(dataset, model, method, None, prompt_set))
    return cells


# --------------------------------------------------------------------------------------------
# Running the cells


def _cell_lines(grid: Grid, cell: Cell) -> list[dict]:
    limit = min((n for n in (cell.dataset.limit, grid.limit) if n is not None), default=None)
    if cell.level is not None:
        return infer_lines(cell.prompt_set, cell.level.user_data, cell.level.level, limit)
    lines = infer_lines(cell.prompt_set, None, None, limit)
    if not _needs_users(cell.method):
        for line in lines:
            line.pop("user_data", None)
    return lines


def write_cell_prompts(grid: Grid, cell: Cell) -> Path:
    """Write the cell's ``infer.py`` prompts file (atomically) and return its path."""
    path = cell.prompts_path(grid.output)
    with atomic_write(path, encoding="utf-8") as handle:
        handle.writelines(json.dumps(line) + "\n" for line in _cell_lines(grid, cell))
    return path


def inference_config(grid: Grid, cell: Cell, device: str | None = None):
    """The :class:`~psalign.inference.InferenceConfig` of a cell (the toy model's defaults when the
    model names no ``sd_model``; the bundled SafetyDPO LoRA for its ``safetydpo`` without a ``lora_path``)."""
    from psalign.inference import GenerationSettings, InferenceConfig, with_toy_defaults

    options = {**cell.method.options, **cell.method.model_options.get(cell.model.name, {})}
    for key in _PATH_OPTIONS:
        if options.get(key) is not None:
            options[key] = Path(options[key])
    if cell.method.levels is not None and grid.embeds_folder is not None and "embeds_folder" not in options:
        options["embeds_folder"] = grid.embeds_folder
    sampling = {k: v for k, v in grid.sampling.items() if v is not None}
    config = InferenceConfig(
        meta_data=cell.prompts_path(grid.output), save_path=cell.images_path(grid.output), sd_model=cell.model.sd_model,
        method=cell.method.method, sdxl=cell.model.sdxl, batch_size=grid.batch_size, device=device,
        settings=GenerationSettings(seed=grid.seed, **sampling), **options,
    )
    if config.sd_model is None:
        from psalign.toy import bundled_paths

        if config.method == "safetydpo" and config.lora_path is None:
            config = replace(config, lora_path=bundled_paths().safetydpo)
        config = with_toy_defaults(config, chosen_settings=sampling)
    return config


def evaluation_config(grid: Grid, cell: Cell, device: str | None = None):
    """The :class:`~psalign.metrics.evaluation.EvaluationConfig` of a cell: its folder and label,
    the grid's results file, the toy world's classifier when the model is the toy model."""
    from psalign.metrics.evaluation import EvaluationConfig, FolderLabel
    from psalign.toy import inpro_flaggers
    from psalign.toy.world import IMAGE_SIZE

    options = dict(grid.evaluation)
    if device is not None:
        options["device"] = device
    if "inpro_classifiers" not in options and cell.model.sd_model is None:
        options["inpro_classifiers"] = ["toy"]
    if "device" not in options:
        import torch

        options["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    return EvaluationConfig(
        metrics=list(cell.dataset.metrics), target_folders=[cell.images_path(grid.output)],
        labels=[FolderLabel(cell.method.name, cell.model.name, cell.level_label)], output=results_path(grid),
        dataset=cell.dataset.name, prompts=cell.prompts_path(grid.output), reference=cell.dataset.reference,
        extra_flaggers=inpro_flaggers(),
        flagger_image_sizes={name: (IMAGE_SIZE, IMAGE_SIZE) for name in inpro_flaggers()},
        **options,
    )


def results_path(grid: Grid) -> Path:
    return grid.output / "results.csv"


def check_cells(grid: Grid, cells: Sequence[Cell], device: str | None = None) -> None:
    """Write every cell's prompts and check every input of every cell as ``infer.py`` and
    ``evaluate.py`` would, without loading a model; one :class:`InputError` listing every problem."""
    from psalign.inference.run import method_name, validate
    from psalign.metrics.evaluation import problems_before_images
    from psalign.methods import get_method

    problems: list[InputProblem] = []
    for cell in cells:
        write_cell_prompts(grid, cell)
        config = inference_config(grid, cell, device)
        try:
            method = get_method(method_name(config)).from_config(config)
        except ValueError as error:
            problems.append(InputProblem(str(grid.source), 0, str(error), f"methods.{cell.method.name}"))
            continue
        problems += [p for p in validate(config, method)[1] if p not in problems]
        evaluation = evaluation_config(grid, cell, device)
        problems += [p for p in problems_before_images(evaluation) if p not in problems]
    if problems:
        raise InputError(problems, header=f"{len(problems)} problem(s) found before generating any image")


def run_grid(grid: Grid, device: str | None = None, log=print) -> list[ResultRow]:
    """Check every cell, generate every cell's images (sharded over the processes of an
    ``accelerate launch``), then evaluate every cell on the main process; what is done already
    (images on disk, rows in ``results.csv``) is kept. Returns the grid's rows in grid order (the
    main process's; the others return none)."""
    from accelerate import PartialState

    from psalign.inference import run_inference
    from psalign.metrics.evaluation import run_evaluation

    cells = plan_cells(grid)
    state = PartialState(cpu=device == "cpu")
    check_cells(grid, cells, device)  # in every process, so that each stops on a problem (identical atomic writes)
    for index, cell in enumerate(cells, start=1):
        if state.is_main_process:
            log(f"[{index}/{len(cells)}] generating {' / '.join(cell.parts)}")
        run_inference(inference_config(grid, cell, device))  # this process's share; waits for the others
    if not state.is_main_process:
        return []
    for index, cell in enumerate(cells, start=1):
        log(f"[{index}/{len(cells)}] evaluating {' / '.join(cell.parts)}")
        run_evaluation(evaluation_config(grid, cell, device), log=lambda text: None)
    return grid_rows(grid, cells)


def grid_rows(grid: Grid, cells: Sequence[Cell]) -> list[ResultRow]:
    """The rows of ``results.csv`` of the grid's cells, in cell order."""
    path = results_path(grid)
    rows = read_results(path) if path.is_file() else []
    order = {(c.dataset.name, c.method.name, c.model.name, c.level_label): i for i, c in enumerate(cells)}
    mine = [row for row in rows if (row.dataset, row.method, row.model, row.level) in order]
    return sorted(mine, key=lambda row: order[(row.dataset, row.method, row.model, row.level)])


# --------------------------------------------------------------------------------------------
# Tables


def _number(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def headline_metric(metric: str) -> bool:
    """Whether ``metric`` is a table column (not a per-category, per-classifier or per-attack detail)."""
    return ":" not in metric or metric.startswith(("win_rate", "tie_rate", "loss_rate"))


def paper_table(rows: Sequence[ResultRow]) -> str:
    """The rows in the paper's shape: one table per base model, a row per method (and level), a
    column per dataset and metric, in the order they first appear."""
    rows = [row for row in rows if headline_metric(row.metric)]
    columns = list(dict.fromkeys((row.dataset, row.metric) for row in rows))
    out = []
    for model in dict.fromkeys(row.model for row in rows):
        values = {(row.method, row.level, row.dataset, row.metric): row.value for row in rows if row.model == model}
        lines = [f"**{model}**", "",
                 "| method | level | " + " | ".join(f"{d} {m}" for d, m in columns) + " |",
                 "|---|---|" + "---:|" * len(columns)]
        for method, level in dict.fromkeys((row.method, row.level) for row in rows if row.model == model):
            cells = [_number(values.get((method, level, d, m))) for d, m in columns]
            lines.append(f"| {method} | {level or NO_LEVEL} | " + " | ".join(cells) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


@dataclass(frozen=True)
class Comparison:
    """One of our values beside the published one (``published`` None: the table has none)."""

    ours: ResultRow
    published: float | None
    note: str = ""

    @property
    def difference(self) -> float | None:
        return None if self.published is None else self.ours.value - self.published

    @property
    def within_ci(self) -> bool | None:
        if self.published is None or self.ours.ci_low is None:
            return None
        return self.ours.ci_low <= self.published <= self.ours.ci_high


COMPARISON_COLUMNS = ("dataset", "method", "model", "level", "metric", "ours", "ci_low", "ci_high", "n", "published",
                      "difference", "published_within_ci", "note")


def compare_results(ours: Sequence[ResultRow], published_csv: str | Path,
                    settings: Mapping[str, Mapping[str, Any]] | None = None) -> list[Comparison]:
    """Each headline row of ``ours`` beside the published value of the same dataset, method, base
    model, level and metric (the published file's current row where it has duplicates).

    A level measured on another user than the published level's, and an InPro of other classifiers
    than the published Q16 + NudeNet, are still put beside the published value, with a note. With
    ``settings`` (the results' settings record, metric -> settings), the note also names every
    choice behind our value that is not the paper's (CLIP model, clamping, FID resize, judge mode,
    NudeNet release), or says that no settings were recorded for the metric."""
    from psalign.levels import PUBLISHED_LEVEL_USERS
    from psalign.metrics.presets import paper_differences

    if not is_published_layout(published_csv):
        raise InputError([InputProblem(str(published_csv), 1, "is not a table in the published layout")])
    table = current_published_rows(read_published_rows(published_csv))
    found = []
    for row in ours:
        if not headline_metric(row.metric):
            continue
        notes = []
        level_name, _, user = row.level.partition("@")
        level = row.level
        if level_name in PUBLISHED_LEVEL_USERS and user != PUBLISHED_LEVEL_USERS[level_name]:
            level = f"{level_name}@{PUBLISHED_LEVEL_USERS[level_name]}"
            notes.append(f"ours measures user {user or '?'}, the published {level_name} user "
                         f"{PUBLISHED_LEVEL_USERS[level_name]}")
        metric = row.metric
        for family in ("inpro", "asr"):
            if metric.startswith(f"{family}(") and ":" not in metric:
                metric = family
                notes.append(f"ours uses the classifiers {row.metric[len(family) + 1:-1]}, the published q16+nudenet")
        entry = table.get((row.dataset, row.method, row.model, level, metric))
        if entry is None:
            notes = ["no published value"]
        elif settings is not None:
            recorded = settings.get(row.metric)
            notes += ["no settings recorded"] if recorded is None else paper_differences(recorded)
        found.append(Comparison(row, None if entry is None else entry.row.value, "; ".join(notes)))
    return found


def write_comparison(comparisons: Sequence[Comparison], folder: Path) -> tuple[Path, Path]:
    """``comparison.csv`` and ``comparison.md`` in ``folder``."""
    import csv

    def cells(c: Comparison) -> list[str]:
        r = c.ours
        inside = c.within_ci
        return [r.dataset, r.method, r.model, r.level or NO_LEVEL, r.metric, _number(r.value), _number(r.ci_low),
                _number(r.ci_high), str(r.n), _number(c.published), _number(c.difference),
                "" if inside is None else ("yes" if inside else "no"), c.note]

    csv_path, md_path = folder / "comparison.csv", folder / "comparison.md"
    with atomic_write(csv_path, newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(COMPARISON_COLUMNS)
        writer.writerows(cells(c) for c in comparisons)
    lines = ["| " + " | ".join(COMPARISON_COLUMNS) + " |", "|" + "---|" * len(COMPARISON_COLUMNS)]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in cells(c)) + " |" for c in comparisons]
    with atomic_write(md_path, encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    return csv_path, md_path


def write_tables(grid: Grid, rows: Sequence[ResultRow], layout: str = "psalign",
                 compare: Path | None = None) -> list[Path]:
    """``results.md`` (and ``results_published.csv`` for the published layout, the comparison
    files with ``compare``) in the output folder; returns the paths written."""
    from psalign.metrics.presets import read_settings, settings_path

    settings = read_settings(settings_path(results_path(grid)))
    written = []
    md = grid.output / "results.md"
    with atomic_write(md, encoding="utf-8") as handle:
        handle.write(paper_table(rows) + "\n" + settings_table(rows, settings))
    written.append(md)
    if layout == "published":
        headline = [row for row in rows if headline_metric(row.metric)]
        written.append(write_results(grid.output / "results_published.csv", headline, layout="published"))
    if compare is not None:
        written += write_comparison(compare_results(rows, compare, settings), grid.output)
    return written


def settings_table(rows: Sequence[ResultRow], settings: Mapping[str, Mapping[str, Any]]) -> str:
    """How each headline metric of ``rows`` was computed, from the settings record, as a
    markdown list under a heading."""
    lines = ["Settings behind each metric (results.settings.json):", ""]
    for metric in dict.fromkeys(row.metric for row in rows if headline_metric(row.metric)):
        recorded = settings.get(metric)
        shown = "not recorded" if recorded is None else ", ".join(f"{k} {v}" for k, v in sorted(recorded.items()))
        lines.append(f"- `{metric}`: {shown}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m psalign.reproduce", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grid", type=Path, help="grid YAML (configs/reproduce_toy.yaml, configs/reproduce_paper.yaml)")
    parser.add_argument("--output_dir", "--output", dest="output", type=Path,
                        help="output folder (default: the grid's output)")
    parser.add_argument("--levels", choices=LEVEL_SETS, help="level set (default: the grid's levels)")
    parser.add_argument("--users_csv", type=Path, help="the published users.csv (for --levels published)")
    parser.add_argument("--embeds_folder", type=Path, help="user embeddings (<User_ID>.npy or embedding_<User_ID>.npy)")
    parser.add_argument("--data_root", type=Path, help="folder of the prompt set files (default: the grid's data_root)")
    parser.add_argument("--limit", type=int, help="first N rows of each prompt set (a quick partial run)")
    parser.add_argument("--format", choices=RESULT_LAYOUTS, default="psalign",
                        help="also write results_published.csv in the published layout")
    parser.add_argument("--compare", type=Path, help="published eval_results.csv: write comparison.csv/.md")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: Accelerate's choice)")
    parser.add_argument("--dry_run", action="store_true",
                        help="check every input and list the cells; generate nothing")
    parser.add_argument("--tables_only", action="store_true",
                        help="only rebuild the tables from the results already in the output folder")
    return parser


def check_published_table(path: Path) -> None:
    """:class:`InputError` unless ``path`` is a readable table in the published layout, every line
    of it well formed (the problems named by file and line)."""
    if not Path(path).is_file():
        raise InputError([InputProblem(str(path), 0, "file not found", "--compare")])
    if not is_published_layout(path):
        raise InputError([InputProblem(str(path), 1, "not a table in the published layout (header "
                                       f"{', '.join(PUBLISHED_COLUMNS)}[, state, timestamp])", "--compare")])
    read_published_rows(path)


def grid_from_args(args: argparse.Namespace) -> Grid:
    """The grid YAML with the command line's overrides."""
    grid = load_grid(args.grid, data_root=args.data_root)
    changes: dict[str, Any] = {}
    for key in ("output", "levels", "users_csv", "embeds_folder", "limit"):
        if getattr(args, key) is not None:
            changes[key] = getattr(args, key)
    if args.limit is not None and args.limit < 1:
        raise InputError([InputProblem("--limit", 0, f"must be >= 1, got {args.limit}")])
    return replace(grid, **changes)


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 done, 2 a problem in the inputs, 130 interrupted (rerun to resume)."""
    args = build_parser().parse_args(argv)
    try:
        grid = grid_from_args(args)
        if args.compare is not None:
            check_published_table(args.compare)  # before hours of generation, not after
        cells = plan_cells(grid)
        if args.dry_run:
            check_cells(grid, cells, args.device)
            for cell in cells:
                print(" / ".join(cell.parts), f"({len(_cell_lines(grid, cell))} prompts)")
            print(f"{len(cells)} cell(s); nothing generated")
            return 0
        if args.tables_only:
            rows = grid_rows(grid, cells)
        else:
            from accelerate import PartialState

            rows = run_grid(grid, args.device)
            if not PartialState().is_main_process:
                return 0
        for path in write_tables(grid, rows, args.format, args.compare):
            print(f"wrote {path}")
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: images and result rows finished so far are kept; run the same command again to resume",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
