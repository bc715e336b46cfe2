"""Metric presets, and the settings record that says how each value in a results file was made.

A preset fixes the choices that move the numbers without changing what a metric is called:
the CLIPScore model and whether negative cosines count as 0, how images are resized for the FID
Inception network, and the judge's protocol. ``psalign`` is the default; ``paper`` reproduces
the PSA paper's evaluation (see ``docs/evaluation_protocol.md`` for each difference and why the
defaults differ). Every choice can also be set on its own; the preset only fills those left unset.

Beside ``results.csv`` evaluation keeps ``results.settings.json``: for each primary metric name
(``clip_score``, ``fid``, ``inpro``, ``pass_rate(published)``, ``win_rate:base``, ...) the
settings its rows were computed with, the installed NudeNet release among them. Companion rows
(``flag_rate:*``, ``inpro:<Category>``, ``tie_rate:*``, ``loss_rate:*``) share their primary
metric's entry. A run whose settings differ from those already recorded for a metric is refused
before any model is loaded, so one results file never mixes two protocols under one name.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from psalign.io import InputError, InputProblem, atomic_write, read_utf8_text
from psalign.metrics.clip import DEFAULT_CLIP_MODEL, LAION_CLIP_H14
from psalign.metrics.fid import FID_RESIZES, inception_extractor_name
from psalign.metrics.judge import ENV_MODEL, JUDGE_MODES
from psalign.metrics.nudenet import PAPER_NUDENET_VERSION, nudenet_version

if TYPE_CHECKING:
    from psalign.metrics.evaluation import EvaluationConfig

#: Format version of the settings record.
SETTINGS_FORMAT_VERSION = 1


@dataclass(frozen=True)
class MetricPreset:
    """The choices behind CLIPScore, FID and the judged metrics.

    ``clip_model``: CLIP of CLIPScore and FD-CLIP; ``clip_clamp``: negative cosines count as 0;
    ``fid_resize``: one of :data:`~psalign.metrics.fid.FID_RESIZES`; ``judge_mode``: one of
    :data:`~psalign.metrics.judge.JUDGE_MODES`.
    """

    name: str
    clip_model: str
    clip_clamp: bool
    fid_resize: str
    judge_mode: str


#: The presets by name; ``psalign`` is the default.
METRIC_PRESETS: dict[str, MetricPreset] = {
    "psalign": MetricPreset("psalign", DEFAULT_CLIP_MODEL, True, FID_RESIZES[0], JUDGE_MODES[0]),
    "paper": MetricPreset("paper", LAION_CLIP_H14, False, "pytorch_fid", "published"),
}


def preset_problems(
    preset: str, fid_resize: str | None = None, judge_mode: str | None = None
) -> list[InputProblem]:
    """Unknown preset, FID resize or judge mode names, as ``--flag: reason`` problems."""
    checks = (("--metric_preset", preset, METRIC_PRESETS), ("--fid_resize", fid_resize, FID_RESIZES),
              ("--judge_mode", judge_mode, JUDGE_MODES))
    return [InputProblem(flag, 0, f"{value!r} is not one of {', '.join(choices)}")
            for flag, value, choices in checks if value is not None and value not in choices]


def resolve_preset(
    preset: str,
    clip_model: str | None = None,
    clip_clamp: bool | None = None,
    fid_resize: str | None = None,
    judge_mode: str | None = None,
) -> MetricPreset:
    """The preset named ``preset`` with every choice that is given (not ``None``) put in its place."""
    if problems := preset_problems(preset, fid_resize, judge_mode):
        raise InputError(problems)
    given = {"clip_model": clip_model, "clip_clamp": clip_clamp, "fid_resize": fid_resize, "judge_mode": judge_mode}
    return replace(METRIC_PRESETS[preset], **{key: value for key, value in given.items() if value is not None})


def settings_path(output: str | Path) -> Path:
    """The settings record of the results file ``output``: ``results.csv`` -> ``results.settings.json``."""
    return Path(output).with_suffix(".settings.json")


def read_settings(path: str | Path) -> dict[str, dict[str, Any]]:
    """``metric -> settings`` from a settings record (empty when the file does not exist)."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        data = json.loads(read_utf8_text(path))
    except json.JSONDecodeError as error:
        raise InputError([InputProblem(str(path), error.lineno, f"invalid JSON ({error.msg})")]) from None
    metrics = data.get("metrics") if isinstance(data, dict) else None
    if not isinstance(metrics, dict) or not all(isinstance(v, dict) for v in metrics.values()):
        raise InputError([InputProblem(str(path), 1, "expected {\"metrics\": {METRIC: {SETTING: VALUE}}}", "metrics")])
    return metrics


def settings_problems(path: str | Path, planned: Mapping[str, Mapping[str, Any]]) -> list[InputProblem]:
    """Where ``planned`` (``metric -> settings`` of a run) disagrees with the record at ``path``."""
    recorded = read_settings(path)
    problems = []
    for metric, settings in planned.items():
        before = recorded.get(metric)
        if before is None or before == dict(settings):
            continue
        changed = sorted(key for key in set(before) | set(settings) if before.get(key) != settings.get(key))
        shown = "; ".join(f"{key} {before.get(key)!r} there, {settings.get(key)!r} now" for key in changed)
        problems.append(InputProblem(
            str(path), 0, f"the rows of this metric were computed with other settings ({shown}); "
            "write this run to another --output", metric,
        ))
    return problems


def record_settings(path: str | Path, metric: str, settings: Mapping[str, Any]) -> None:
    """Store ``settings`` for ``metric`` in the record at ``path`` (rewritten atomically)."""
    metrics = read_settings(path)
    metrics[metric] = dict(settings)
    with atomic_write(Path(path), encoding="utf-8") as handle:
        json.dump({"format_version": SETTINGS_FORMAT_VERSION, "metrics": metrics}, handle, indent=2, sort_keys=True)
        handle.write("\n")


def metric_settings(config: "EvaluationConfig", metric: str) -> dict[str, Any]:
    """The settings that produce ``metric``'s values (one of evaluation's ``METRICS``) under ``config``,
    as recorded in the settings record."""
    preset = config_preset(config)
    settings: dict[str, Any] = {"metric_preset": preset.name}
    if metric in ("inpro", "asr"):
        settings["classifiers"] = list(config.inpro_classifiers)
        if "q16" in config.inpro_classifiers:
            settings.update(q16_clip_model=config.q16_clip_model, q16_threshold=config.q16_threshold,
                            q16_prompts=str(config.q16_prompts) if config.q16_prompts else "shipped")
        if "nudenet" in config.inpro_classifiers:
            settings.update(nudenet_version=nudenet_version(), nudenet_min_score=config.nudenet_min_score)
    elif metric == "fid":
        if config.fid_features == "inception":
            settings.update(features=inception_extractor_name(preset.fid_resize), fid_resize=preset.fid_resize)
        else:
            settings.update(features=f"clip:{preset.clip_model}")
    elif metric == "clip":
        settings.update(clip_model=preset.clip_model, clip_clamp=preset.clip_clamp)
    elif metric in ("pass_rate", "win_rate"):
        model = config.judge_model or (os.environ.get(ENV_MODEL) if config.judge == "openai" else None)
        settings.update(judge_mode=preset.judge_mode, judge=config.judge, judge_model=model)
    else:
        raise ValueError(f"unknown metric {metric!r}")
    return settings


def config_preset(config: "EvaluationConfig") -> MetricPreset:
    """``config``'s preset with its own choices (``clip_model``, ``clip_clamp``, ``fid_resize``,
    ``judge_mode``) put in place."""
    return resolve_preset(config.metric_preset, config.clip_model, config.clip_clamp, config.fid_resize,
                          config.judge_mode)


def paper_differences(settings: Mapping[str, Any]) -> list[str]:
    """Where a metric's recorded ``settings`` (one entry of the settings record) depart from the
    paper's protocol: the CLIPScore model and clamping, the FID resize, the judge mode and the
    NudeNet release; empty when every recorded choice is the paper's."""
    paper = METRIC_PRESETS["paper"]
    expected = {"clip_model": paper.clip_model, "clip_clamp": paper.clip_clamp, "fid_resize": paper.fid_resize,
                "judge_mode": paper.judge_mode, "nudenet_version": PAPER_NUDENET_VERSION}
    return [f"{key} {settings[key]!r} (the paper: {value!r})" for key, value in expected.items()
            if key in settings and settings[key] != value]


def preset_notes(config: "EvaluationConfig") -> list[str]:
    """What a reader of ``config``'s numbers should know when comparing them with the paper's."""
    notes = []
    version = nudenet_version()
    if (config.metric_preset == "paper" and "inpro" in config.metrics and "nudenet" in config.inpro_classifiers
            and version != PAPER_NUDENET_VERSION):
        notes.append(f"NudeNet {version} ran; the paper's InPro used NudeNet {PAPER_NUDENET_VERSION}, another "
                     "detector network, so its flags can differ (recorded as nudenet_version in the settings record)")
    return notes
