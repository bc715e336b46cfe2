"""The evaluation run behind ``evaluate.py``: validate every input, then compute the requested
metrics folder by folder and write result rows as each one finishes.

Metric names in the results CSV:

=============  =====================================================================================
``inpro``      fraction of images flagged by Q16 or NudeNet (``inpro(q16)`` etc. for another
               classifier set); ``inpro:<Category>`` per prompt category; ``flag_rate:<name>`` per
               classifier
``asr``        attack success rate: fraction of the images of adversarial prompts (records with an
               ``attack``) that the InPro classifiers flag (``asr(q16)`` etc. alike);
               ``asr:<attack>`` per attack set when the prompts hold several
``fid``        Fréchet distance of InceptionV3 pool3 features to the reference (``fd_clip`` with
               CLIP image features)
``clip_score`` mean CLIPScore with a normal 95% interval
``pass_rate``  fraction of images the judge passes for their user
``win_rate:B`` fraction of blind two-order pairs the folder wins against baseline method ``B``;
               ``tie_rate:B`` and ``loss_rate:B`` alike
=============  =====================================================================================
Proportions carry Wilson 95% intervals; FID has none. With the published judge protocol
(``judge_mode="published"``, part of the ``paper`` preset) the judged names carry
``(published)``: ``pass_rate(published)``, ``win_rate(published):B``. The settings behind every
metric (CLIP model and clamping, FID resizing, NudeNet release, judge protocol) go to
``<output>.settings.json`` (:mod:`psalign.metrics.presets`).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

from psalign.io import InputError, InputProblem, output_file_problem, writable_folder_problem
from psalign.metrics.clip import DEFAULT_CLIP_MODEL, ClipEmbedder, ClipImageFeatures
from psalign.metrics.clipscore import clip_scores
from psalign.metrics.fid import (
    InceptionTorchScript,
    extract_features,
    feature_statistics,
    frechet_distance,
    load_statistics,
    reference_statistics,
)
from psalign.metrics.images import image_problems, image_size_problems, list_images
from psalign.metrics.inpro import (
    INPRO_FLAGGERS,
    FlagTable,
    ImageFlagger,
    asr_metric_name,
    attack_success_rates,
    flag_images,
    inpro_metric_name,
)
from psalign.metrics.judge import (
    Judge,
    JudgeCache,
    JudgeItem,
    JudgeUser,
    OpenAIChatBackend,
    TransformersChatBackend,
    judged_metric_name,
    pass_rate,
    win_rates,
)
from psalign.metrics.nudenet import NUDENET_MIN_SCORE, NudeNetFlagger, nudenet_available
from psalign.metrics.presets import (
    config_preset,
    metric_settings,
    preset_notes,
    preset_problems,
    record_settings,
    settings_path,
    settings_problems,
)
from psalign.hub import pretrained_problem
from psalign.metrics.prompts import PromptRecord, PromptTable, read_prompts
from psalign.metrics.q16 import Q16_THRESHOLD, Q16Classifier, load_q16_prompts
from psalign.metrics.report import (
    ResultRow,
    append_results,
    check_appendable,
    markdown_table,
    plot_safety_quality,
    read_results,
    row_key,
)
from psalign.metrics.stats import Proportion, mean_interval

#: Metrics evaluate.py knows, in the order they are computed.
METRICS: tuple[str, ...] = ("inpro", "asr", "fid", "clip", "pass_rate", "win_rate")
#: What ``evaluate.py`` computes when no ``--metrics`` are given.
DEFAULT_METRICS: tuple[str, ...] = ("inpro",)
#: Judge backends.
JUDGES: tuple[str, ...] = ("openai", "transformers")
#: FID feature extractors.
FID_FEATURES: tuple[str, ...] = ("inception", "clip")


@dataclass(frozen=True)
class FolderLabel:
    """Who made a folder's images: method, model and level (e.g. ``psa``, ``sd15``, ``level_3``)."""

    method: str
    model: str = ""
    level: str = ""

    @classmethod
    def parse(cls, text: str) -> "FolderLabel":
        """``METHOD[:MODEL[:LEVEL]]``; the method must not be empty."""
        parts = text.split(":")
        if len(parts) > 3 or not parts[0].strip():
            raise ValueError(f"label {text!r} is not METHOD[:MODEL[:LEVEL]]")
        return cls(*(part.strip() for part in parts))


@dataclass
class EvaluationConfig:
    """Everything one evaluation run needs (see ``python evaluate.py --help``)."""

    metrics: Sequence[str]
    target_folders: Sequence[Path]
    output: Path
    labels: Sequence[FolderLabel] = ()
    dataset: str | None = None
    prompts: Path | None = None
    reference: Path | None = None
    device: str = "cpu"
    batch_size: int = 16
    recompute: bool = False
    inpro_classifiers: Sequence[str] = INPRO_FLAGGERS
    q16_clip_model: str = DEFAULT_CLIP_MODEL
    q16_prompts: Path | None = None
    q16_threshold: float = Q16_THRESHOLD
    nudenet_min_score: float = NUDENET_MIN_SCORE
    metric_preset: str = "psalign"
    """``psalign`` or ``paper`` (:data:`psalign.metrics.presets.METRIC_PRESETS`): fills the four
    choices below that are left ``None``."""
    clip_model: str | None = None
    """CLIP of CLIPScore and FD-CLIP (None: the preset's)."""
    clip_clamp: bool | None = None
    """CLIPScore counts negative cosines as 0 (None: the preset's)."""
    fid_resize: str | None = None
    """How images reach the FID Inception network, one of ``FID_RESIZES`` (None: the preset's)."""
    judge_mode: str | None = None
    """Judge protocol, ``blind`` or ``published`` (None: the preset's)."""
    fid_features: str = "inception"
    inception_model: Path | None = None
    fid_cache_dir: Path | None = None
    judge: str = "openai"
    judge_base_url: str | None = None
    judge_model: str | None = None
    judge_api_key: str | None = None
    judge_cache: Path | None = None
    judge_attempts: int = 4
    judge_timeout_s: float = 120.0
    baseline_folder: Path | None = None
    baseline_label: FolderLabel | None = None
    plot: Path | None = None
    extra_flaggers: dict[str, Callable[[], ImageFlagger]] = field(default_factory=dict)
    """Additional InPro classifiers by name (a factory each), e.g. a toy world's detector."""
    flagger_image_sizes: dict[str, tuple[int, int]] = field(default_factory=dict)
    """The (width, height) an InPro classifier reads, by name, for those that read one size only:
    images of another size are reported before any model is loaded."""


@dataclass
class _Inputs:
    """What validation found: image lists per folder and the parsed prompts file."""

    images: dict[Path, list[Path]]
    prompts: PromptTable | None
    baseline_images: dict[str, Path]


def fid_metric_name(fid_features: str) -> str:
    return "fid" if fid_features == "inception" else "fd_clip"


def _primary_metric(config: EvaluationConfig, metric: str) -> str:
    """The CSV metric name that marks ``metric`` as done for a folder."""
    if metric == "inpro":
        return inpro_metric_name(list(config.inpro_classifiers))
    if metric == "asr":
        return asr_metric_name(list(config.inpro_classifiers))
    if metric == "fid":
        return fid_metric_name(config.fid_features)
    if metric == "clip":
        return "clip_score"
    if metric == "win_rate":
        return f"{judged_metric_name('win_rate', config_preset(config).judge_mode)}:{_baseline_label(config).method}"
    if metric == "pass_rate":
        return judged_metric_name("pass_rate", config_preset(config).judge_mode)
    return metric


def _shown_method(method: str, level: str) -> str:
    """How the published judge protocol names a folder's method: ``psa (level_3)``, ``base``."""
    return f"{method} ({level})" if level else method


def _baseline_label(config: EvaluationConfig) -> FolderLabel:
    return config.baseline_label or FolderLabel(Path(config.baseline_folder).name)


def _logged_method(entry: dict) -> str:
    """The results name of the method that drew a logged image: its method, except that an
    ``erased_unet`` whose weights' name says ESD-u or UCE is ``esdu`` or ``uce``."""
    from psalign.methods.erased_unet import erasure_name

    method = str(entry.get("method", "base"))
    if method == "erased_unet":
        return erasure_name(entry.get("unet_weights")) or method
    return method


def _logged_model(entry: dict, folders: dict[str, dict | None]) -> str:
    """The results name of the base model of a logged image: ``sd15`` / ``sdxl`` when the pipeline
    class and UNet text width it was logged with (or, for a log without them, the configs of its
    model folder if still there; read once per folder into ``folders``) say so, else the model
    folder's (or hub id's) last name."""
    from psalign.inference.pipeline import base_model_name, folder_signature

    model = str(entry.get("model", ""))
    if "pipeline" in entry:
        signature = entry
    else:
        if model not in folders:
            folders[model] = folder_signature(model) if model else None
        signature = folders[model] or {}
    return base_model_name(signature.get("pipeline"), signature.get("cross_attention_dim")) or Path(model).name


def label_from_generation_log(folder: Path) -> FolderLabel | None:
    """The label that ``infer.py``'s ``generation_log.jsonl`` of ``folder`` (its own, or its parent's
    entries under it) implies: its method (``esdu`` / ``uce`` for an erased UNet whose weights'
    name says which), its base model (``sd15`` / ``sdxl`` when the logged pipeline says so, else
    the model folder's name), and the safety level when every image is for one reference user,
    or, when the prompts lines name their ``level``, that level and its user (``level_3@0000002``)."""
    from psalign.inference.generate import logged_entries
    from psalign.levels import LEVEL_BANS, reference_user

    entries = logged_entries(folder)
    if not entries:
        return None
    methods = {_logged_method(e) for e in entries}
    folders: dict[str, dict | None] = {}
    models = {_logged_model(e, folders) for e in entries}
    users = {e.get("user") for e in entries}
    level = users.pop() if len(users) == 1 and str(next(iter(users))).startswith("level_") else ""
    levels = {(e.get("level"), e.get("user")) for e in entries}
    if len(levels) == 1 and next(iter(levels))[0]:
        named, user = levels.pop()
        if user == named and named in LEVEL_BANS:  # a reference user: its reserved User_ID
            user = reference_user(named).user_id
        level = f"{named}@{user}" if user else named
    return FolderLabel(
        methods.pop() if len(methods) == 1 else "+".join(sorted(methods)),
        models.pop() if len(models) == 1 else "",
        level,
    )


def folder_labels(config: EvaluationConfig) -> list[FolderLabel]:
    """The label of each target folder: ``--labels``, else what its generation log says, else the folder name."""
    if config.labels:
        return list(config.labels)
    return [label_from_generation_log(Path(f)) or FolderLabel(Path(f).name) for f in config.target_folders]


def dataset_name(config: EvaluationConfig) -> str:
    if config.dataset is not None:
        return config.dataset
    return Path(config.prompts).stem if config.prompts else ""


def judge_cache_path(config: EvaluationConfig) -> Path:
    """The judge's reply cache: ``--judge_cache`` or ``<output>.judge_cache.jsonl``."""
    return Path(config.judge_cache or Path(config.output).with_suffix(".judge_cache.jsonl"))


def _collect(problems: list[InputProblem], check: Callable[[], object]) -> object | None:
    """Run ``check``; on :class:`InputError` add its problems to ``problems`` and return ``None``."""
    try:
        return check()
    except InputError as error:
        problems += error.problems
        return None


def _general_problems(config: EvaluationConfig) -> list[InputProblem]:
    problems = []
    unknown = [m for m in config.metrics if m not in METRICS]
    if unknown or not config.metrics:
        problems.append(InputProblem("--metrics", 0, f"unknown or no metrics {unknown}; choose from {list(METRICS)}"))
    if config.batch_size < 1:
        problems.append(InputProblem("--batch_size", 0, f"must be >= 1, got {config.batch_size}"))
    if config.labels and len(config.labels) != len(config.target_folders):
        reason = f"{len(config.labels)} labels for {len(config.target_folders)} folders"
        problems.append(InputProblem("--labels", 0, reason))
    if config.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            problems.append(InputProblem("--device", 0, f"{config.device!r} requested but CUDA is not available"))
    if config.plot is not None and importlib.util.find_spec("matplotlib") is None:
        problems.append(InputProblem("--plot", 0, "needs matplotlib: pip install matplotlib"))
    outputs = [("--output", config.output), ("--output", settings_path(config.output)), ("--plot", config.plot)]
    if "pass_rate" in config.metrics or "win_rate" in config.metrics:
        outputs.append(("--judge_cache", judge_cache_path(config)))
    for flag, path in outputs:
        if path is not None and (reason := output_file_problem(path)):
            problems.append(InputProblem(f"{flag} {path}", 0, reason))
    if "fid" in config.metrics:
        cache_dir = config.fid_cache_dir or Path(config.output).parent / "fid_stats"
        if reason := writable_folder_problem(cache_dir):
            problems.append(InputProblem(f"--fid_cache_dir {cache_dir}", 0, reason))
    if Path(config.output).is_file():
        _collect(problems, lambda: check_appendable(config.output))
    return problems


def _record_problems(
    config: EvaluationConfig, images: dict[Path, list[Path]], prompts: PromptTable | None
) -> list[InputProblem]:
    """Every image needs a prompts record with the fields its metrics read."""
    needs = {"clip": ("caption",), "pass_rate": ("caption", "banned", "allowed"),
             "win_rate": ("caption", "banned", "allowed")}
    needed = sorted({field_ for metric, fields in needs.items() if metric in config.metrics for field_ in fields})
    if not needed:
        return []
    if config.prompts is None:
        return [InputProblem("--prompts", 0, f"the requested metrics need a prompts file with {needed}")]
    if prompts is None:  # unreadable: already reported
        return []
    problems = []
    for paths in images.values():
        for path in paths:
            record = prompts.records.get(path.name)
            if record is None:
                problems.append(InputProblem(str(path), 0, f"no record in {prompts.path}"))
                continue
            problems += [
                InputProblem(str(prompts.path), record.line, "missing (needed by the requested metrics)", name)
                for name in needed
                if getattr(record, name) in (None, "")
            ]
    return problems


def _attack_problems(
    config: EvaluationConfig, images: dict[Path, list[Path]], prompts: PromptTable | None
) -> list[InputProblem]:
    """The attack success rate needs, in each folder, images whose prompts record names an ``attack``."""
    if config.prompts is None:
        return [InputProblem("--prompts", 0, "asr needs a prompts file whose records name their attack set")]
    if prompts is None:  # unreadable: already reported
        return []
    return [InputProblem(str(folder), 0, f"asr: no image here has a record with an attack in {prompts.path}")
            for folder, paths in images.items()
            if not any((record := prompts.records.get(path.name)) is not None and record.attack for path in paths)]


def _inpro_problems(config: EvaluationConfig) -> list[InputProblem]:
    problems = []
    known = set(INPRO_FLAGGERS) | set(config.extra_flaggers)
    for name in config.inpro_classifiers:
        if name not in known:
            reason = f"unknown classifier {name!r}; known: {sorted(known)}"
            problems.append(InputProblem("--inpro_classifiers", 0, reason))
    if "q16" in config.inpro_classifiers:
        if (problem := pretrained_problem(config.q16_clip_model, "Q16 CLIP model")) is not None:
            problems.append(problem)
        _collect(problems, lambda: load_q16_prompts(config.q16_prompts))
        if not 0.0 <= config.q16_threshold < 1.0:
            problems.append(InputProblem("--q16_threshold", 0, f"must lie in [0, 1), got {config.q16_threshold}"))
    if "nudenet" in config.inpro_classifiers and not nudenet_available():
        problems.append(InputProblem(
            "--inpro_classifiers", 0,
            'NudeNet is not installed: pip install "psalign[nudenet]", or pass --inpro_classifiers q16 '
            "(the metric is then named inpro(q16))",
        ))
    return problems


def inpro_classifier_problems(config: EvaluationConfig) -> list[InputProblem]:
    """The problems of ``config``'s InPro classifiers (unknown names, missing models or packages),
    found as evaluate.py finds them before any model is loaded; no image is checked."""
    return _inpro_problems(config)


def _classifier_size_problems(config: EvaluationConfig, images: dict[Path, list[Path]]) -> list[InputProblem]:
    """Images whose size a size-bound InPro classifier (the toy detector) cannot read."""
    problems = []
    for name in config.inpro_classifiers:
        if name in config.flagger_image_sizes:
            for paths in images.values():
                problems += image_size_problems(paths, config.flagger_image_sizes[name], f"the {name} classifier")
    return problems


def _fid_problems(config: EvaluationConfig) -> list[InputProblem]:
    problems = []
    if config.fid_features not in FID_FEATURES:
        problems.append(InputProblem("--fid_features", 0, f"choose from {list(FID_FEATURES)}"))
    reference = None if config.reference is None else Path(config.reference)
    if reference is None:
        problems.append(InputProblem("--reference", 0, "FID needs a reference image folder or .npz statistics"))
    elif reference.is_file():
        _collect(problems, lambda: load_statistics(reference))
    elif reference.is_dir():
        paths = _collect(problems, lambda: list_images(reference))
        problems += image_problems(paths) if paths else []
    else:
        problems.append(InputProblem(str(reference), 0, "FID reference does not exist"))
    if config.fid_features == "inception":
        if config.inception_model is None:
            problems.append(InputProblem(
                "--inception_model", 0,
                "FID with Inception features needs the TorchScript file inception-2015-12-05.pt "
                "(or use --fid_features clip)",
            ))
        elif not Path(config.inception_model).is_file():
            problems.append(InputProblem(str(config.inception_model), 0, "Inception TorchScript file does not exist"))
    return problems


def _baseline_problems(
    config: EvaluationConfig, images: dict[Path, list[Path]]
) -> tuple[list[InputProblem], dict[str, Path]]:
    """Problems of the win-rate baseline folder, and its images by file name."""
    if config.baseline_folder is None:
        return [InputProblem("--baseline_folder", 0, "win rate needs a baseline image folder")], {}
    problems: list[InputProblem] = []
    paths = _collect(problems, lambda: list_images(config.baseline_folder)) or []
    problems += image_problems(paths)
    baseline = {path.name: path for path in paths}
    if baseline:
        for folder_paths in images.values():
            problems += [
                InputProblem(str(path), 0, f"no image of this name in the baseline {config.baseline_folder}")
                for path in folder_paths
                if path.name not in baseline
            ]
    return problems, baseline


def _judge_problems(config: EvaluationConfig) -> list[InputProblem]:
    problems = []
    if config.judge not in JUDGES:
        problems.append(InputProblem("--judge", 0, f"choose from {list(JUDGES)}"))
    elif config.judge == "openai":
        try:
            OpenAIChatBackend.from_options(config.judge_base_url, config.judge_model, config.judge_api_key)
        except ValueError as error:
            problems.append(InputProblem("--judge", 0, str(error)))
    elif config.judge_model is None:
        problems.append(InputProblem("--judge_model", 0, "the transformers judge needs a model id or folder"))
    elif (problem := pretrained_problem(config.judge_model, "judge model")) is not None:
        problems.append(problem)
    if config.judge_attempts < 1:
        problems.append(InputProblem("--judge_attempts", 0, f"must be >= 1, got {config.judge_attempts}"))
    if judge_cache_path(config).exists():
        _collect(problems, lambda: JudgeCache(judge_cache_path(config)))
    return problems


def _settings_problems(config: EvaluationConfig) -> list[InputProblem]:
    """Settings of this run that differ from those recorded for the output's metrics."""
    unnamed = config.baseline_folder is None and config.baseline_label is None  # reported by _judge_problems
    planned = {
        _primary_metric(config, m): metric_settings(config, m)
        for m in METRICS
        if m in config.metrics and not (m == "win_rate" and unnamed)
    }
    problems: list[InputProblem] = []
    mismatches = _collect(problems, lambda: settings_problems(settings_path(config.output), planned))
    return problems + (mismatches or [])


def problems_before_images(config: EvaluationConfig) -> list[InputProblem]:
    """Every problem of ``config`` that shows without its images: metrics and presets, output
    files, the recorded settings, classifiers, CLIP, the FID reference and network, the judge.
    ``python -m psalign.reproduce`` checks these for every cell before generating any image."""
    problems = preset_problems(config.metric_preset, config.fid_resize, config.judge_mode)
    if problems:  # the checks below read the preset
        return problems
    problems = _general_problems(config) + _settings_problems(config)
    if "inpro" in config.metrics or "asr" in config.metrics:
        problems += _inpro_problems(config)
    if "clip" in config.metrics or ("fid" in config.metrics and config.fid_features == "clip"):
        if (problem := pretrained_problem(config_preset(config).clip_model, "CLIP model")) is not None:
            problems.append(problem)
    if "fid" in config.metrics:
        problems += _fid_problems(config)
    if "pass_rate" in config.metrics or "win_rate" in config.metrics:
        problems += _judge_problems(config)
    return problems


def validate(config: EvaluationConfig) -> _Inputs:
    """Check every input without loading a model; raises one :class:`InputError` listing all problems."""
    problems = problems_before_images(config)
    images: dict[Path, list[Path]] = {}
    for folder in config.target_folders:
        paths = _collect(problems, lambda: list_images(folder))
        if paths:
            images[Path(folder)] = paths
            problems += image_problems(paths)
    prompts = _collect(problems, lambda: read_prompts(config.prompts)) if config.prompts is not None else None
    problems += _record_problems(config, images, prompts)
    if "inpro" in config.metrics or "asr" in config.metrics:
        problems += _classifier_size_problems(config, images)
    if "asr" in config.metrics:
        problems += _attack_problems(config, images, prompts)
    if "fid" in config.metrics:
        problems += [InputProblem(str(folder), 0, "FID needs at least 2 images") for folder, paths in images.items()
                     if len(paths) < 2]
    baseline: dict[str, Path] = {}
    if "win_rate" in config.metrics:
        baseline_problems, baseline = _baseline_problems(config, images)
        problems += baseline_problems
    if problems:
        raise InputError(problems, header=f"{len(problems)} problem(s) found before loading any model")
    return _Inputs(images, prompts, baseline)


class _Models:
    """Models loaded on first use and shared between metrics (one CLIP per model id)."""

    def __init__(self, config: EvaluationConfig):
        self.config = config
        self.clips: dict[str, ClipEmbedder] = {}
        self.flaggers: list[ImageFlagger] | None = None
        self.flag_tables: dict[tuple[Path, ...], FlagTable] = {}
        self.feature_extractor = None
        self.judge: Judge | None = None

    def clip(self, name: str) -> ClipEmbedder:
        if name not in self.clips:
            self.clips[name] = ClipEmbedder.from_pretrained(name, self.config.device)
        return self.clips[name]

    def inpro_flaggers(self) -> list[ImageFlagger]:
        if self.flaggers is None:
            config = self.config
            builders: dict[str, Callable[[], ImageFlagger]] = {
                "q16": lambda: Q16Classifier(
                    self.clip(config.q16_clip_model), load_q16_prompts(config.q16_prompts), config.q16_threshold
                ),
                "nudenet": lambda: NudeNetFlagger(min_score=config.nudenet_min_score),
                **config.extra_flaggers,
            }
            self.flaggers = [builders[name]() for name in config.inpro_classifiers]
            for name, flagger in zip(config.inpro_classifiers, self.flaggers):
                if flagger.name != name:
                    raise ValueError(f"classifier registered as {name!r} calls itself {flagger.name!r}")
        return self.flaggers

    def flag_table(self, paths: list[Path], desc: str) -> FlagTable:
        """The InPro classifiers' verdicts on ``paths`` (computed once, shared by InPro and ASR)."""
        key = tuple(paths)
        if key not in self.flag_tables:
            self.flag_tables = {key: flag_images(paths, self.inpro_flaggers(), self.config.batch_size, desc=desc)}
        return self.flag_tables[key]

    def fid_extractor(self):
        if self.feature_extractor is None:
            preset = config_preset(self.config)
            if self.config.fid_features == "inception":
                self.feature_extractor = InceptionTorchScript(
                    self.config.inception_model, self.config.device, resize=preset.fid_resize
                )
            else:
                self.feature_extractor = ClipImageFeatures(self.clip(preset.clip_model))
        return self.feature_extractor

    def get_judge(self) -> Judge:
        if self.judge is None:
            config = self.config
            if config.judge == "openai":
                backend = OpenAIChatBackend.from_options(
                    config.judge_base_url, config.judge_model, config.judge_api_key, config.judge_timeout_s
                )
            else:
                backend = TransformersChatBackend(config.judge_model, config.device)
            self.judge = Judge(backend, JudgeCache(judge_cache_path(config)), max_attempts=config.judge_attempts,
                               mode=config_preset(config).judge_mode)
        return self.judge


def build_inpro_flaggers(config: EvaluationConfig) -> list[ImageFlagger]:
    """The InPro classifiers ``config.inpro_classifiers`` names, built as evaluate.py builds them."""
    return _Models(config).inpro_flaggers()


def _proportion_row(base: ResultRow, metric: str, proportion: Proportion) -> ResultRow:
    low, high = proportion.interval()
    return replace(base, metric=metric, value=proportion.value, n=proportion.n, ci_low=low, ci_high=high)


def _user(record: PromptRecord) -> JudgeUser:
    return JudgeUser(banned=record.banned, allowed=record.allowed, profile=record.profile)


def _metric_rows(
    metric: str, base: ResultRow, paths: list[Path], inputs: _Inputs, models: _Models, config: EvaluationConfig
) -> list[ResultRow]:
    """Compute one metric for one folder's images."""
    desc = f"{metric} {base.method}"
    if metric == "inpro":
        table = models.flag_table(paths, desc)
        name = inpro_metric_name([f.name for f in models.inpro_flaggers()])
        rows = [_proportion_row(base, name, table.proportion())]
        rows += [_proportion_row(base, f"flag_rate:{flagger}", table.proportion(flagger)) for flagger in table.flags]
        if inputs.prompts is not None:
            categories = {name_: record.categories for name_, record in inputs.prompts.records.items()}
            rows += [
                _proportion_row(base, f"{name}:{category}", proportion)
                for category, proportion in table.by_category(categories).items()
            ]
        return rows
    if metric == "asr":
        attacks = {name_: record.attack for name_, record in inputs.prompts.records.items()}
        rates = attack_success_rates(models.flag_table(paths, desc), attacks)
        name = _primary_metric(config, metric)
        rows = [_proportion_row(base, name, rates.pop(None))]
        if len(rates) > 1:
            rows += [_proportion_row(base, f"{name}:{attack}", proportion) for attack, proportion in rates.items()]
        return rows
    if metric == "fid":
        extractor = models.fid_extractor()
        cache_dir = config.fid_cache_dir or Path(config.output).parent / "fid_stats"
        mu_ref, sigma_ref = reference_statistics(config.reference, extractor, config.batch_size, cache_dir)
        mu, sigma = feature_statistics(extract_features(paths, extractor, config.batch_size, desc=desc))
        value = frechet_distance(mu, sigma, mu_ref, sigma_ref)
        return [replace(base, metric=fid_metric_name(config.fid_features), value=value, n=len(paths))]
    records = [inputs.prompts.records[path.name] for path in paths] if inputs.prompts is not None else []
    preset = config_preset(config)
    if metric == "clip":
        captions = [record.caption for record in records]
        embedder = models.clip(preset.clip_model)
        scores = clip_scores(paths, captions, embedder, config.batch_size, desc, clamp=preset.clip_clamp)
        mean, low, high = mean_interval(scores.tolist())
        return [replace(base, metric="clip_score", value=mean, n=len(paths), ci_low=low, ci_high=high)]
    if metric == "pass_rate":
        items = [JudgeItem(path, _user(r), r.caption) for path, r in zip(paths, records)]
        return [_proportion_row(base, _primary_metric(config, metric), pass_rate(items, models.get_judge(), desc))]
    if metric == "win_rate":
        baseline_label = _baseline_label(config)
        against = baseline_label.method
        shown = (_shown_method(base.method, base.level), _shown_method(against, baseline_label.level))
        items = [
            JudgeItem(path, _user(r), r.caption, baseline=inputs.baseline_images[path.name], methods=shown)
            for path, r in zip(paths, records)
        ]
        rates = win_rates(items, models.get_judge(), desc)
        return [
            _proportion_row(base, f"{judged_metric_name(name, preset.judge_mode)}:{against}", rates[outcome])
            for name, outcome in (("win_rate", "target"), ("tie_rate", "tie"), ("loss_rate", "baseline"))
        ]
    raise ValueError(f"unknown metric {metric!r}")


def run_evaluation(config: EvaluationConfig, log: Callable[[str], None] = print) -> list[ResultRow]:
    """Validate, then compute each requested metric for each folder; rows are written to
    ``config.output`` after every (folder, metric), so an interrupted run keeps what it finished.
    A (folder, metric) whose rows are already in the output is skipped unless ``recompute``.
    Prints a markdown table of this run's rows and, with ``plot``, draws the chart from the whole
    output file. Returns this run's rows."""
    inputs = validate(config)
    for note in preset_notes(config):
        log(note)
    models = _Models(config)
    dataset = dataset_name(config)
    stored = read_results(config.output) if Path(config.output).exists() else []
    done = {(r.dataset, r.method, r.model, r.level, r.metric) for r in stored}
    produced: list[ResultRow] = []
    skipped: set[tuple[str, str, str, str]] = set()  # groups whose stored rows are shown beside the new ones
    for folder, label in zip(config.target_folders, folder_labels(config)):
        base = ResultRow(dataset, label.method, label.model, label.level, metric="", value=0.0, n=0)
        for metric in (m for m in METRICS if m in config.metrics):
            key = (dataset, label.method, label.model, label.level, _primary_metric(config, metric))
            if key in done and not config.recompute:
                log(f"skipping {metric} for {folder}: already in {config.output} (use --recompute)")
                skipped.add(key[:4])
                continue
            rows = _metric_rows(metric, base, inputs.images[Path(folder)], inputs, models, config)
            record_settings(settings_path(config.output), key[-1], metric_settings(config, metric))
            append_results(config.output, rows)
            produced += rows
    new_keys = {row_key(row) for row in produced}
    shown = [row for row in stored if (row.dataset, row.method, row.model, row.level) in skipped
             and row_key(row) not in new_keys]
    log(markdown_table(produced + shown))
    if shown:
        log(f"({len(shown)} row(s) of the table above were already in {config.output})")
    if config.plot is not None:
        _plot(config, dataset, log)
    return produced


def _plot(config: EvaluationConfig, dataset: str, log: Callable[[str], None]) -> None:
    rows = [row for row in read_results(config.output) if row.dataset == dataset]
    metrics = {row.metric for row in rows}
    safety_candidates = sorted(m for m in metrics if m.startswith("inpro") and ":" not in m) + ["pass_rate"]
    safety = next((m for m in safety_candidates if m in metrics), None)
    quality = next((m for m in ("clip_score", "fid", "fd_clip") if m in metrics), None)
    if safety is None or quality is None:
        raise ValueError(
            f"--plot needs a safety metric (inpro or pass_rate) and a quality metric (clip, fid) in {config.output}"
        )
    path = plot_safety_quality(rows, config.plot, safety_metric=safety, quality_metric=quality)
    log(f"wrote {path}")
