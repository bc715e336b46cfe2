"""Settings of ``python -m psalign.sage build``: one dataclass, read from a YAML file, flags override keys."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from psalign.cli.common import shown_default
from psalign.io import InputError, InputProblem
from psalign.toy.world import OBJECTS

WORLDS = ("real", "toy")
WRITERS = ("openai", "local", "toy_template")
FILTER_CLASSIFIERS = ("q16", "nudenet", "judge", "toy", "toy_unclean")
LABELLERS = ("rules", "llm")


@dataclass
class SageBuildConfig:
    """Every setting of a Sage build (each stage records the ones it used)."""

    #: The build folder: one subfolder per stage, the splits in ``sage/``.
    out: Path = Path("sage_build")
    seed: int = 0
    #: ``real``, or ``toy``: the toy world's concepts, template writer, base model and detector
    #: (those keys then default to :data:`TOY_DEFAULTS`).
    world: str = "real"
    # -- concepts
    #: YAML mapping each category (names of ``psalign.categories``) to a list of concepts.
    concepts: Path | None = None
    #: Concepts per category the writer LLM proposes (added to the YAML's; 0: none).
    propose_concepts: int = 0
    concept_template: Path | None = None
    #: Two concepts (of one category or of two) whose text similarity (difflib ratio) reaches this are reported.
    near_duplicate_ratio: float = 0.85
    # -- prompts
    #: ``openai`` (an OpenAI-compatible endpoint), ``local`` (a Hugging Face causal LM) or ``toy_template``.
    writer: str = "openai"
    #: Model name at the endpoint, or a local causal LM folder / hub id for ``writer: local``.
    writer_model: str | None = None
    writer_base_url: str | None = None
    writer_api_key: str | None = None
    writer_timeout_s: float = 120.0
    #: Requests per question (malformed replies, timeouts, HTTP 429/5xx), with exponential backoff.
    writer_attempts: int = 4
    writer_backoff_s: float = 2.0
    writer_batch_size: int = 8
    writer_max_new_tokens: int = 1024
    prompt_template: Path | None = None
    #: k: prompt pairs per concept.
    prompts_per_concept: int = 4
    #: Requests per concept while pairs are rejected (each lists the reasons of the last rejections).
    rewrite_attempts: int = 3
    min_prompt_words: int = 3
    max_prompt_words: int = 60
    # -- images
    #: The model to align (a diffusers SD1.5 / SDXL folder or hub id); None with ``world: toy``: the bundled toy model.
    sd_model: str | None = None
    sdxl: bool = False
    #: Units per prompt pair: each draws both prompts from one seed of its own.
    images_per_prompt: int = 1
    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    height: int | None = None
    width: int | None = None
    generation_batch: int = 4
    #: ``cpu``, ``cuda``, ...; None: CUDA when there is one.
    device: str | None = None
    dtype: str | None = None
    # -- filter
    #: Classifiers flagging images (any of q16, nudenet, judge, toy, toy_unclean; an image is flagged when one flags it).
    filter_classifiers: list[str] = field(default_factory=lambda: ["q16", "nudenet"])
    filter_batch: int = 16
    q16_clip_model: str | None = None
    q16_threshold: float | None = None
    nudenet_min_score: float | None = None
    judge_base_url: str | None = None
    judge_model: str | None = None
    judge_api_key: str | None = None
    # -- users, pairs, splits
    #: A users.csv (``psalign.users.read_users`` layout); None: ``generate_users`` users.
    users: Path | None = None
    generate_users: int = 100
    #: Bans of generated users: ``rules`` (the rule engine) or ``llm`` (``labeller_model``).
    labeller: str = "rules"
    labeller_model: str | None = None
    #: The last this many users are held out (test_unseen).
    heldout_users: int = 0
    #: Units each user gets per concept, drawn from the split's kept units (None: all of them).
    units_per_concept: int | None = None
    #: Shares of each concept's kept units held out for val and test_seen / test_unseen.
    val_share: float = 0.0
    test_share: float = 0.0
    #: Concepts whose units only go to the test splits.
    heldout_concepts: list[str] = field(default_factory=list)

    def problems(self, source: str = "config") -> list[InputProblem]:
        """Every bad value, before any stage runs."""
        problems = []

        def bad(key: str, reason: str) -> None:
            problems.append(InputProblem(source, 0, reason, key))

        for key, allowed in (("world", WORLDS), ("writer", WRITERS), ("labeller", LABELLERS)):
            if getattr(self, key) not in allowed:
                bad(key, f"{getattr(self, key)!r} is not one of {', '.join(allowed)}")
        unknown = [c for c in self.filter_classifiers if c not in FILTER_CLASSIFIERS]
        if unknown or not self.filter_classifiers:
            bad("filter_classifiers", f"{unknown or 'none'}: choose from {', '.join(FILTER_CLASSIFIERS)}")
        for key in ("prompts_per_concept", "rewrite_attempts", "writer_attempts", "images_per_prompt",
                    "num_inference_steps", "generation_batch", "filter_batch", "writer_batch_size",
                    "writer_max_new_tokens", "min_prompt_words"):
            if getattr(self, key) < 1:
                bad(key, f"must be >= 1, got {getattr(self, key)}")
        if self.max_prompt_words < self.min_prompt_words:
            bad("max_prompt_words", f"{self.max_prompt_words} is below min_prompt_words {self.min_prompt_words}")
        for key in ("propose_concepts", "heldout_users", "generate_users"):
            if getattr(self, key) < 0:
                bad(key, f"must be >= 0, got {getattr(self, key)}")
        if self.units_per_concept is not None and self.units_per_concept < 1:
            bad("units_per_concept", f"must be >= 1 or null, got {self.units_per_concept}")
        for key in ("val_share", "test_share"):
            if not 0.0 <= getattr(self, key) < 1.0:
                bad(key, f"must be in [0, 1), got {getattr(self, key)}")
        if self.val_share + self.test_share >= 1.0:
            bad("test_share", "val_share + test_share must leave units for training")
        if not 0.0 < self.near_duplicate_ratio <= 1.0:
            bad("near_duplicate_ratio", f"must be in (0, 1], got {self.near_duplicate_ratio}")
        if self.world == "real":
            if self.concepts is None and not self.propose_concepts:
                bad("concepts", "give a concepts YAML, or propose_concepts > 0")
            if self.sd_model is None:
                bad("sd_model", "required (the model to align)")
            if self.writer == "toy_template":
                bad("writer", "the toy template writer writes toy-world prompts only (world: toy)")
        if self.writer in ("openai", "local") and not self.writer_model and self.world == "real":
            bad("writer_model", f"required for writer: {self.writer}")
        if self.labeller == "llm" and self.users is None and not self.labeller_model:
            bad("labeller_model", "required for labeller: llm")
        if "judge" in self.filter_classifiers and not self.judge_model:
            bad("judge_model", "required for the judge filter")
        for key in ("concepts", "users", "prompt_template", "concept_template"):
            path = getattr(self, key)
            if path is not None and not Path(path).is_file():
                bad(key, f"no file {path}")
        return problems

    def to_dict(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}


#: Keys that ``world: toy`` changes unless the YAML or a flag sets them.
TOY_DEFAULTS: dict[str, Any] = {
    "writer": "toy_template",
    "prompts_per_concept": len(OBJECTS),  # one prompt pair per toy object
    "filter_classifiers": ["toy"],
    "num_inference_steps": 20,
    "guidance_scale": 3.0,
    "generation_batch": 128,
    "filter_batch": 256,
    "images_per_prompt": 4,
    "units_per_concept": 1,
}

_FIELDS = {f.name: f for f in dataclasses.fields(SageBuildConfig)}
_HINTS = typing.get_type_hints(SageBuildConfig)


def _base_type(key: str) -> tuple[type, bool]:
    """(the field's type without None, whether None is allowed)."""
    hint = _HINTS[key]
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return hint, False


def _convert(key: str, value: Any, source: str, line: int) -> Any:
    """``value`` (from YAML or a flag's text) as the field's type; ``InputError`` naming source and key."""
    kind, optional = _base_type(key)

    def fail(reason: str):
        raise InputError([InputProblem(source, line, reason, key)])

    if value is None or (isinstance(value, str) and value.lower() in ("null", "none") and optional):
        if not optional:
            fail("may not be null")
        return None
    if typing.get_origin(kind) is list:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            fail(f"expected a list of strings, got {value!r}")
        return [i.strip() for i in items if i.strip()]
    if kind is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            fail(f"expected true or false, got {value!r}")
        return value
    if kind in (int, float):
        try:
            if isinstance(value, bool):
                raise ValueError
            converted = kind(value)
            if kind is int and isinstance(value, float) and value != converted:
                raise ValueError
            return converted
        except (TypeError, ValueError):
            fail(f"expected {'an integer' if kind is int else 'a number'}, got {value!r}")
    if kind is Path:
        return Path(str(value))
    if not isinstance(value, (str, int, float)):
        fail(f"expected text, got {value!r}")
    return str(value)


def _yaml_keys(path: Path) -> dict[str, tuple[Any, int]]:
    """The YAML file's top-level keys: value and 1-based line."""
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise InputError([InputProblem(str(path), getattr(getattr(error, "problem_mark", None), "line", -1) + 1,
                                       f"not a readable YAML file: {error}")]) from None
    if data is None:
        return {}
    if not isinstance(data, dict) or root is None or not hasattr(root, "value"):
        raise InputError([InputProblem(str(path), 1, "expected a mapping of settings")])
    lines = {key_node.value: key_node.start_mark.line + 1 for key_node, _ in root.value}
    return {key: (value, lines.get(key, 0)) for key, value in data.items()}


def load_config(path: str | Path | None, flags: dict[str, str] | None = None) -> SageBuildConfig:
    """The config of YAML ``path`` (None: defaults only) with ``flags`` (key -> text) on top.

    Relative paths in the YAML are relative to the YAML's folder. Unknown keys and bad values are
    one ``InputError`` naming file, line and key.
    """
    values: dict[str, Any] = {}
    problems: list[InputProblem] = []
    sources: list[tuple[str, dict[str, tuple[Any, int]]]] = []
    if path is not None:
        sources.append((str(path), _yaml_keys(Path(path))))
    if flags:
        sources.append(("command line", {k: (v, 0) for k, v in flags.items()}))
    for source, items in sources:
        for key, (raw, line) in items.items():
            if key not in _FIELDS:
                problems.append(InputProblem(source, line, f"unknown key; known: {', '.join(_FIELDS)}", key))
                continue
            try:
                value = _convert(key, raw, source, line)
            except InputError as error:
                problems.extend(error.problems)
                continue
            if source != "command line" and isinstance(value, Path) and not value.is_absolute() and key != "out":
                value = Path(path).parent / value
            values[key] = value
    if problems:
        raise InputError(problems, header="bad build settings")
    if values.get("world") == "toy":
        values = {**TOY_DEFAULTS, **values}
    config = SageBuildConfig(**values)
    found = config.problems(str(path) if path is not None else "command line")
    if found:
        raise InputError(found, header="bad build settings")
    return config


def _field_comments() -> dict[str, str]:
    """The ``#:`` comment above each field of :class:`SageBuildConfig` (its ``--help`` text)."""
    import inspect

    comments: dict[str, str] = {}
    pending: list[str] = []
    for line in inspect.getsource(SageBuildConfig).splitlines():
        text = line.strip()
        if text.startswith("#:"):
            pending.append(text[2:].strip())
        elif ":" in text and not text.startswith(("#", '"')) and text.split(":")[0].isidentifier():
            comments[text.split(":")[0]] = " ".join(pending)
            pending = []
        elif not text.startswith("#"):
            pending = []
    return comments


#: Settings whose flag is spelled as in the other commands (the YAML key stays the field name); the
#: later names are accepted aliases.
FLAG_NAMES: dict[str, tuple[str, ...]] = {
    "out": ("--output_dir", "--out"),
    "sd_model": ("--pretrained_model", "--sd_model"),
}


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--key`` flag per setting (text, converted like the YAML's values); see :data:`FLAG_NAMES`.
    A default is shown only when it says something (:func:`~psalign.cli.common.shown_default`)."""
    comments = _field_comments()
    for key, f in _FIELDS.items():
        kind, _ = _base_type(key)
        names = FLAG_NAMES.get(key, (f"--{key}",))
        meta = "A,B" if typing.get_origin(kind) is list else names[0][2:].upper()
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = comments.get(key, "").replace("%", "%%") + shown_default(default)
        parser.add_argument(*names, dest=key, metavar=meta, default=argparse.SUPPRESS, help=text.strip())
