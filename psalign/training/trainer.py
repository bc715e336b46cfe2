"""PSA adapter training under Accelerate (Diffusion-DPO or a safe-anchor objective), for SD1.5- and SDXL-shaped pipelines.

One optimizer step, per process and micro-batch of B pairs:

1. latents of ``[chosen; rejected]`` (2B, C, h, w), from the VAE or the precomputed cache;
2. text dropout (rate ``proportion_empty_prompts``) replaces a pair's caption with the empty
   prompt, user dropout (rate ``user_dropout``) its user with the null user: drawn once per pair,
   shared by chosen and rejected;
3. one noise and one timestep per pair, shared by chosen and rejected;
4. the adapted UNet's prediction (adapter on, gradients to the adapter only) and the reference
   prediction (the same UNet with the adapter switched off, under no_grad), as the
   ``objective`` asks (:mod:`.objectives`);
5. the objective's loss (:mod:`psalign.loss`), a guard against non-finite values, backward,
   clipping and an AdamW step on the fp32 adapter weights.

The frozen UNet, VAE and text encoders run in the ``mixed_precision`` dtype; the adapter's
weights stay fp32 whatever it is.

With ``trainable: lora`` the same loop trains a SafetyDPO safety expert instead: a PEFT LoRA on
the UNet (:class:`psalign.training.lora.UNetLoRA`, the reference being the UNet with the LoRA
off) on expert pairs (:class:`psalign.safetydpo.data.ExpertPairDataset`); there is no user, so
no user dropout, and the result is a diffusers LoRA (``pytorch_lora_weights.safetensors``).
Everything that depends on what is trained (its data, its checks, building and saving it) is
asked of its :class:`~.trainables.TrainableKind`; the loop itself has no branch on it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from accelerate.tracking import GeneralTracker

from psalign.io import InputError, InputProblem
from psalign.loss import DPOLossOutput, LossOutput

from . import checkpoints
from .conditioning import (
    SDXL,
    FrozenTextEncoders,
    TextConditioning,
    resolve_model_type,
    training_time_ids,
    vae_latents,
)
from .config import TrainingConfig
from .data import SeededPairs, micro_batches
from .precompute import (
    CachedPairs,
    cache_files,
    cache_info,
    check_cache_info,
    load_empty_conditioning,
    precompute_cache,
    write_cache_info,
)
from .objectives import OBJECTIVES, MicroBatch, anchor_conditioning
from .timesteps import timestep_weights
from .trainables import TRAINABLE_KINDS, TrainableData
from .validation import grid_array, save_grid, validation_grid, validation_pipeline

#: Every optimizer step logs its objective's values (``logged`` of :mod:`psalign.loss`'s outputs) plus ``lr``,
#: ``grad_norm`` and ``pairs_per_second``.
METRICS_FILE = checkpoints.METRICS_FILE
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped before that step changed anything."""


class NonFiniteWeightsError(NonFiniteLossError):
    """The trained weights became NaN or infinite; the run stopped without writing them to a checkpoint."""


@dataclass
class TrainingProgress:
    """The optimizer steps done and the run's id, written to every checkpoint's ``training_progress.json``."""

    global_step: int = 0
    run_id: str = field(default_factory=checkpoints.new_run_id)


@dataclass
class TrainingInputs:
    """Everything :func:`check_inputs` verified before any model is loaded."""

    metadata: Path
    model_type: str
    data: TrainableData  # the pairs, and the user embeddings when the trainable has users
    resume: checkpoints.CheckpointInfo | None
    trackers: list[str]

    @property
    def pairs(self) -> torch.utils.data.Dataset:
        return self.data.pairs


def _requested_trackers(report_to: str) -> list[str]:
    names = [t.strip() for t in report_to.split(",") if t.strip()]
    return [] if names == ["none"] else names


def check_inputs(config: TrainingConfig) -> TrainingInputs:
    """Read and check every input (data, embeddings, model type, trackers, resume point, cache)
    without loading a model; every problem is reported at once as :class:`InputError`. What
    depends on the kind of trainable weights is asked of its :class:`~.trainables.TrainableKind`."""
    from accelerate.tracking import get_available_trackers

    from psalign.inference.pipeline import model_problems

    problems: list[InputProblem] = []
    kind = TRAINABLE_KINDS[config.trainable]
    location = kind.locate_data(config, problems)
    model_type = None
    if model_issues := model_problems(config.pretrained_model):  # before a hub id could be downloaded
        problems += [replace(issue, field="pretrained_model") for issue in model_issues]
    else:
        try:
            model_type = resolve_model_type(config.pretrained_model, config.model_type)
        except (OSError, ValueError) as err:
            problems.append(InputProblem(str(config.pretrained_model), 0, f"not a usable diffusers pipeline: {err}",
                                         "pretrained_model"))
    resume, resume_problems = _resume_problems(config)
    problems += resume_problems + _launch_problems()
    trackers = _requested_trackers(config.report_to)
    available = {str(t) for t in get_available_trackers()}
    for name in trackers:
        if name != "all" and name not in available:
            shown = sorted(available) or "none"
            problems.append(InputProblem("--report_to", 0, f"tracker {name!r} is not installed (available: {shown})",
                                         "report_to"))
    if problems:
        raise InputError(problems, header=f"{len(problems)} problem(s) with the training inputs")

    data = kind.read_data(config, location, resume, problems)
    problems += _anchor_caption_problems(config, data.chosen_captions, location.metadata)
    if config.precompute:
        try:
            check_cache_info(_cache_dir(config), cache_info(config, model_type, location.metadata, len(data.pairs)))
        except ValueError as err:
            problems.append(InputProblem(str(_cache_dir(config)), 0, str(err), "cache_dir"))
    if problems:
        raise InputError(problems, header=f"{len(problems)} problem(s) with the training inputs")
    return TrainingInputs(location.metadata, model_type, data, resume, trackers)


def _resume_problems(config: TrainingConfig) -> tuple[checkpoints.CheckpointInfo | None, list[InputProblem]]:
    """The checkpoint to resume from (checked file by file, nothing loaded) and the problems of the
    resume point and the output folder: a file, an earlier run a fresh start would overwrite, or
    checkpoints of another run than the resumed one."""
    where = str(config.resume_from_checkpoint)
    try:
        path = checkpoints.resolve_resume(config.resume_from_checkpoint, config.output_dir)
        resume = checkpoints.inspect_checkpoint(path) if path is not None else None
    except (FileNotFoundError, checkpoints.CheckpointError) as err:
        return None, [InputProblem(where, 0, str(err), "resume_from_checkpoint")]
    problems = []
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if resume is not None and resume.num_processes != processes:
        problems.append(InputProblem(where, 0, f"{resume.path} was written by {resume.num_processes} process(es); "
                                               f"resume it with as many (this launch has {processes})",
                                     "resume_from_checkpoint"))
    reason = checkpoints.output_dir_problem(config.output_dir, resume, config.overwrite_output_dir)
    if reason:
        problems.append(InputProblem(str(config.output_dir), 0, reason, "output_dir"))
    return resume, problems


def _launch_problems() -> list[InputProblem]:
    """DeepSpeed and FSDP keep their training state in pickles that psalign does not load."""
    from accelerate.utils import parse_flag_from_env

    plugins = [name for name, flag in (("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"), ("FSDP", "ACCELERATE_USE_FSDP"))
               if parse_flag_from_env(flag)]
    return [InputProblem("accelerate launch", 0, f"{name} is not supported: its checkpoints are pickles that psalign "
                                                 "does not load; train with DDP (the adapter is small)")
            for name in plugins]


def _anchor_caption_problems(config: TrainingConfig, captions: list[str | None], metadata: Path) -> list[InputProblem]:
    """A safe-anchor objective needs the caption that drew every pair's chosen image."""
    if not OBJECTIVES[config.objective].needs_chosen_caption:
        return []
    missing = [i for i, caption in enumerate(captions) if caption is None]
    if not missing:
        return []
    return [InputProblem(str(metadata), 0, f"{len(missing)} of {len(captions)} pairs do not say which caption drew "
                                           f"their chosen image (the first is pair {missing[0] + 1}); the "
                                           f"{config.objective} objective needs it: Sage records named "
                                           "<stem>.jpg_u.jpg / .jpg_s.jpg with _u.jpg / _s.jpg images, or expert "
                                           "pairs with a chosen_caption", "objective")]


def _cache_dir(config: TrainingConfig) -> Path:
    return Path(config.cache_dir) if config.cache_dir else Path(config.output_dir) / "cache"


class JSONLinesTracker(GeneralTracker):
    """An Accelerate tracker appending ``{"step": ..., <metric>: ...}`` lines to a file (always on)."""

    name = "jsonl"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, path: Path):
        super().__init__()
        self.path = Path(path)

    @property
    def tracker(self) -> Path:
        return self.path

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, **values}) + "\n")


def read_metrics(output_dir: str | Path) -> dict[int, dict]:
    """The logged metrics of a run by step (for a step logged twice, the last line wins)."""
    path = Path(output_dir) / METRICS_FILE
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {row["step"]: row for row in rows}


def _tracker_config(config: TrainingConfig) -> dict:
    """The config with values every tracker accepts (lists joined, None as "")."""
    flat = {}
    for key, value in config.to_dict().items():
        flat[key] = ", ".join(value) if isinstance(value, list) else ("" if value is None else value)
    return flat


class PSATrainer:
    """Builds everything for one run from a :class:`TrainingConfig`; :meth:`train` runs it."""

    def __init__(self, config: TrainingConfig):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

        self.config = config
        self.kind = TRAINABLE_KINDS[config.trainable]
        self.inputs = check_inputs(config)
        self.output_dir = Path(config.output_dir)
        self.accelerator = Accelerator(
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            mixed_precision=config.mixed_precision,
            log_with=[JSONLinesTracker(self.output_dir / METRICS_FILE), *self.inputs.trackers],
            project_config=ProjectConfiguration(
                project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")
            ),
            kwargs_handlers=[DistributedDataParallelKwargs(
                find_unused_parameters=not OBJECTIVES[config.objective].trains_every_weight)],
        )
        self.dtype = DTYPES[config.mixed_precision]
        self.progress = TrainingProgress()
        self.vae = None
        self.text_encoders: FrozenTextEncoders | None = None
        self.accelerator.print(f"inputs checked ({len(self.inputs.pairs)} pairs); loading the models from "
                               f"{config.pretrained_model}")
        self._load_models()
        self._build_data()
        self._build_optimizer()

    # ------------------------------------------------------------------ setup
    @property
    def is_sdxl(self) -> bool:
        return self.inputs.model_type == SDXL

    def _load_frozen_encoders(self) -> None:
        from diffusers import AutoencoderKL

        device, model = self.accelerator.device, self.config.pretrained_model
        vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
        # SDXL's VAE overflows in fp16 (``force_upcast``): keep it fp32 then.
        upcast = self.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
        self.vae = vae.requires_grad_(False).eval().to(device, torch.float32 if upcast else self.dtype)
        self.text_encoders = FrozenTextEncoders.from_pretrained(model, self.inputs.model_type, self.dtype, device)

    def _load_models(self) -> None:
        from diffusers import DDPMScheduler, UNet2DConditionModel

        config, device = self.config, self.accelerator.device
        self.noise_scheduler = DDPMScheduler.from_pretrained(config.pretrained_model, subfolder="scheduler")
        try:
            self.timestep_weights = timestep_weights(
                self.noise_scheduler.config.num_train_timesteps, config.timestep_bias_strategy,
                config.timestep_bias_multiplier, config.timestep_bias_portion, config.timestep_bias_begin,
                config.timestep_bias_end,
            )
        except ValueError as error:  # the bounds that depend on the scheduler's number of timesteps
            field, _, reason = str(error).partition(": ")
            raise InputError([InputProblem(f"{config.pretrained_model} (scheduler)", 0, reason, field)]) from None
        self.unet = UNet2DConditionModel.from_pretrained(config.pretrained_model, subfolder="unet")
        self.unet.requires_grad_(False).eval().to(device, self.dtype)
        if config.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.adapter = self.kind.build(self.unet, config, self.inputs.data)
        if not config.precompute:
            self._load_frozen_encoders()

    def _build_data(self) -> None:
        config, accelerator, pairs = self.config, self.accelerator, self.inputs.pairs
        if not config.precompute:
            self.dataset = SeededPairs(pairs, config.seed)
            return
        cache_dir = _cache_dir(config)
        if accelerator.is_main_process:
            write_cache_info(cache_dir, cache_info(config, self.inputs.model_type, self.inputs.metadata, len(pairs)))
        accelerator.wait_for_everyone()
        if not all(f.is_file() for f in cache_files(cache_dir, len(pairs))):
            if self.vae is None:
                self._load_frozen_encoders()
            precompute_cache(
                cache_dir,
                SeededPairs(pairs, config.seed),
                self.vae,
                self.text_encoders,
                accelerator.process_index,
                accelerator.num_processes,
                batch_size=config.train_batch_size,
                num_workers=config.dataloader_num_workers,
                chosen_captions=self.uses_anchor,
            )
        accelerator.wait_for_everyone()
        self.vae = self.text_encoders = None  # the loop reads the cache; validation loads its own
        self.dataset = SeededPairs(CachedPairs(cache_dir, pairs.user_ids, pairs.user_embeds), config.seed)
        self.cached_empty = load_empty_conditioning(cache_dir).to(accelerator.device, self.dtype)

    def _build_optimizer(self) -> None:
        from diffusers.optimization import get_scheduler

        config, accelerator = self.config, self.accelerator
        optimizer = torch.optim.AdamW(
            self.adapter.parameters(), lr=config.learning_rate, weight_decay=config.adam_weight_decay
        )
        # The prepared scheduler steps once per process at every optimizer step.
        lr_scheduler = get_scheduler(
            config.lr_scheduler,
            optimizer,
            num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
            num_training_steps=config.max_train_steps * accelerator.num_processes,
        )
        self.adapter_module, self.optimizer, self.lr_scheduler = accelerator.prepare(
            self.adapter, optimizer, lr_scheduler
        )

    # ------------------------------------------------------------------ one micro-batch
    def _batch_inputs(
        self, batch: dict
    ) -> tuple[torch.Tensor, TextConditioning, TextConditioning | None, torch.Tensor | None, torch.Tensor | None]:
        """``(latents [chosen; rejected], text before dropout, the chosen image's caption's
        conditioning (safe-anchor objectives) or None, time_ids or None, user_embeds or None)``."""
        device = self.accelerator.device
        chosen_text = None
        if self.config.precompute:
            latents = torch.cat([batch["chosen_latents"], batch["rejected_latents"]]).to(device)
            text = TextConditioning(batch["prompt_embeds"], batch.get("pooled_embeds")).to(device, self.dtype)
            if self.uses_anchor:
                chosen_text = TextConditioning(
                    batch["chosen_prompt_embeds"], batch.get("chosen_pooled_embeds")).to(device, self.dtype)
        else:
            latents = vae_latents(self.vae, torch.cat([batch["chosen"], batch["rejected"]]))
            text = self.text_encoders.encode(batch["caption"])
            if self.uses_anchor:
                chosen_text = self.text_encoders.encode(batch["chosen_caption"])
        time_ids = None
        if self.is_sdxl:
            time_ids = training_time_ids(batch["original_size"], batch["crop_top_left"], self.config.resolution,
                                         self.config.sdxl_micro_conditioning).to(device)
        user_embeds = batch["user_embed"].to(device, torch.float32) if "user_embed" in batch else None
        return latents, text, chosen_text, time_ids, user_embeds

    def _empty_text(self) -> TextConditioning:
        return self.cached_empty if self.config.precompute else self.text_encoders.empty()

    @property
    def uses_anchor(self) -> bool:
        """Whether the objective needs the chosen image's caption (a safe-anchor term)."""
        return OBJECTIVES[self.config.objective].needs_chosen_caption

    def _micro_step(self, batch: dict) -> DPOLossOutput | LossOutput:
        config, device = self.config, self.accelerator.device
        latents, prompt_text, chosen_text, time_ids, user_embeds = self._batch_inputs(batch)
        pairs = latents.shape[0] // 2
        drop_text = torch.rand(pairs, device=device) < config.proportion_empty_prompts
        null_user = None if user_embeds is None else torch.rand(pairs, device=device) < config.user_dropout
        text = prompt_text.where(drop_text, self._empty_text())
        anchor_text = None
        if self.uses_anchor:
            anchor_text = anchor_conditioning(chosen_text, prompt_text, self._empty_text(), null_user, drop_text)
        batch = MicroBatch(self.unet, self.adapter_module, self.adapter, self.noise_scheduler, latents, text,
                           anchor_text, time_ids, user_embeds, null_user, self.timestep_weights, drop_text)
        return OBJECTIVES[config.objective].loss(batch, config)

    # ------------------------------------------------------------------ run
    def train(self) -> Path:
        """Run (or resume) to ``max_train_steps``; write the final adapter to ``output_dir``; return it."""
        from accelerate.utils import set_seed
        from tqdm.auto import tqdm

        config, accelerator = self.config, self.accelerator
        # Noise, timesteps and dropout draw from the global RNGs, seeded here (per process) so that
        # no setup work shifts them; a resumed run restores them from the checkpoint instead.
        set_seed(config.seed, device_specific=True)
        resume = self.inputs.resume
        if resume is not None:
            accelerator.print(f"resuming from {resume.path} (optimizer step {resume.global_step})")
            self._load_checkpoint(resume)
        else:
            if config.resume_from_checkpoint == "latest":
                accelerator.print(f"no checkpoint in {self.output_dir} yet: starting a new run")
            if config.overwrite_output_dir:
                self._remove_earlier_run()
        accelerator.init_trackers(config.tracker_project_name, config=_tracker_config(config))
        accum = config.gradient_accumulation_steps
        stream = micro_batches(
            self.dataset,
            config.train_batch_size,
            config.seed,
            accelerator.process_index,
            accelerator.num_processes,
            start=self.progress.global_step * accum,
            num_workers=config.dataloader_num_workers,
        )
        bar = tqdm(
            total=config.max_train_steps, initial=self.progress.global_step, desc=f"{self.kind.label} training", unit="step",
            disable=not accelerator.is_local_main_process,
        )
        sums, names, micro, started = None, (), 0, time.perf_counter()
        while self.progress.global_step < config.max_train_steps:
            batch = next(stream)
            with accelerator.accumulate(self.adapter_module):
                out = self._micro_step(batch)
                names = tuple(out.logged)
                values = accelerator.reduce(out.stacked(), reduction="mean")
                micro += 1
                if not torch.isfinite(values[0]):
                    self._stop_non_finite(float(values[0]), micro)
                accelerator.backward(out.loss)
                grad_norm = None
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(self.adapter_module.parameters(), config.max_grad_norm)
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad()
            sums = values.detach().cpu().double() + (0 if sums is None else sums)
            if not accelerator.sync_gradients:
                continue
            self.progress.global_step += 1
            step = self.progress.global_step
            elapsed = time.perf_counter() - started
            logs = {name: float(v) for name, v in zip(names, sums / micro)}
            logs.update(
                lr=self.lr_scheduler.get_last_lr()[0],
                grad_norm=float(grad_norm),
                pairs_per_second=config.train_batch_size * accelerator.num_processes * micro / elapsed,
            )
            accelerator.log(logs, step=step)
            bar.update(1)
            bar.set_postfix(loss=f"{logs['loss']:.4f}")
            if step % config.checkpointing_steps == 0:
                self.save_checkpoint(step)
            if config.validation_steps and step % config.validation_steps == 0:
                self.validate(step)
            sums, micro, started = None, 0, time.perf_counter()
        bar.close()
        self._check_replicas_in_sync()
        accelerator.wait_for_everyone()
        # The full weights, gathered from every process when a plugin (FSDP, ZeRO-3) shards them.
        state = accelerator.get_state_dict(self.adapter_module)
        if accelerator.is_main_process:
            info = {"training_args": config.to_dict(), "global_step": self.progress.global_step,
                    "model_type": self.inputs.model_type}
            path = self.kind.save(self.adapter, state, self.output_dir, info, self.is_sdxl)
            accelerator.print(f"{self.kind.written} written to {path}")
        # Every process leaves together, none tearing its process group down while another still
        # works (a loaded two-process CPU run once hung in the gloo teardown after the save).
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return self.output_dir

    def _last_good_checkpoint_advice(self) -> str:
        """Names this run's newest checkpoint with finite weights, and how to resume from it."""
        last = checkpoints.last_good_checkpoint(self.output_dir, self.progress.run_id)
        if last is None:
            return "no good checkpoint had been written yet"
        resume = "latest" if last == checkpoints.latest_checkpoint(self.output_dir) else str(last)
        return f"the last good checkpoint {last} is intact (resume with --resume_from_checkpoint {resume})"

    def _stop_non_finite(self, value: float, micro: int) -> None:
        step = self.progress.global_step + 1
        raise NonFiniteLossError(
            f"non-finite DPO loss ({value}) at optimizer step {step} (micro-batch {micro} of "
            f"{self.config.gradient_accumulation_steps}); stopped before the update, "
            f"{self._last_good_checkpoint_advice()}. Try a lower --learning_rate or --beta_dpo, or bf16 instead of fp16"
        )

    def _non_finite_weights(self) -> list[str]:
        return [name for name, param in self.adapter.named_parameters() if not torch.isfinite(param).all()]

    def save_checkpoint(self, step: int) -> Path:
        """Write ``checkpoint-<step>`` (:mod:`.checkpoints`: trainable weights, optimizer, LR scheduler,
        gradient scaler, every process's RNG states, the step and run id). Weights that are not finite
        are never written: :class:`NonFiniteWeightsError` names the last good checkpoint instead."""
        accelerator = self.accelerator
        bad = self._non_finite_weights()
        if bad:
            raise NonFiniteWeightsError(
                f"the trained weights are not finite after optimizer step {step} ({', '.join(bad[:3])}); "
                f"checkpoint-{step} was not written, {self._last_good_checkpoint_advice()}. Try a lower "
                "--learning_rate or --max_grad_norm"
            )
        partial = checkpoints.partial_path(self.output_dir, step)
        if accelerator.is_main_process and partial.exists():
            shutil.rmtree(partial)
        accelerator.wait_for_everyone()
        partial.mkdir(parents=True, exist_ok=True)
        # The full weights, gathered from every process when a plugin shards them.
        weights = accelerator.get_state_dict(self.adapter_module)
        checkpoints.write_rng_state(partial, accelerator.process_index)
        if accelerator.is_main_process:
            scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
            checkpoints.write_checkpoint_files(
                partial, weights, self.optimizer.state_dict(), self.lr_scheduler.state_dict(), scaler, step,
                self.progress.run_id, accelerator.num_processes,
            )
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            checkpoints.finish_checkpoint(
                self.output_dir, step, self.config.checkpoints_total_limit, self.progress.run_id
            )
        accelerator.wait_for_everyone()
        return checkpoints.checkpoint_path(self.output_dir, step)

    def _load_checkpoint(self, info: checkpoints.CheckpointInfo) -> None:
        """Restore every state :meth:`save_checkpoint` wrote, on this process, through safe loaders only."""
        accelerator = self.accelerator
        state = checkpoints.read_training_state(info.path, accelerator.process_index, accelerator.num_processes)
        try:
            self.adapter.load_state_dict(state.model)
            self.optimizer.load_state_dict(state.optimizer)
            self.lr_scheduler.load_state_dict(state.scheduler)
        except (RuntimeError, ValueError, KeyError) as error:
            reason = (str(error).splitlines() or [type(error).__name__])[0]
            raise checkpoints.CheckpointError(
                f"{info.path} does not fit this run's trainable weights ({reason})"
            ) from None
        if accelerator.scaler is not None and state.scaler is not None:
            accelerator.scaler.load_state_dict(state.scaler)
        checkpoints.restore_rng_state(state.rng)
        self.progress = TrainingProgress(info.global_step, info.run_id)

    def _remove_earlier_run(self) -> None:
        """``--overwrite_output_dir``: delete what an earlier run left in the output folder (main process)."""
        accelerator = self.accelerator
        if accelerator.is_main_process:
            removed = checkpoints.remove_earlier_run(self.output_dir)
            if removed:
                accelerator.print(f"--overwrite_output_dir: deleted the earlier run's "
                                  f"{checkpoints.describe_paths(removed, self.output_dir)}")
        accelerator.wait_for_everyone()

    def validate(self, step: int) -> None:
        """Write ``validation/step-<step>.png`` (users x prompts) and log it to image-capable trackers."""
        accelerator, config = self.accelerator, self.config
        if accelerator.is_main_process:
            components = {}  # reuse what is in memory; with the cache, the pipeline loads the rest
            if self.vae is not None:
                components["vae"] = self.vae
                encoders = zip(("", "_2"), self.text_encoders.tokenizers, self.text_encoders.encoders)
                for suffix, tokenizer, encoder in encoders:
                    components[f"tokenizer{suffix}"] = tokenizer
                    components[f"text_encoder{suffix}"] = encoder
            pipe = validation_pipeline(
                config.pretrained_model, self.inputs.model_type, self.unet, self.dtype, accelerator.device, **components
            )
            grid = validation_grid(
                pipe,
                self.adapter,
                self.inputs.data.validation_embeds,
                self.inputs.data.validation_users,
                config.validation_prompts,
                config.resolution,
                config.validation_num_inference_steps,
                config.validation_guidance_scale,
                config.seed,
            )
            del pipe
            save_grid(grid, self.output_dir / "validation" / f"step-{step:06d}.png")
            for tracker in accelerator.trackers:
                if tracker.name == "tensorboard":
                    tracker.log_images({"validation": grid_array(grid)[None]}, step=step, dataformats="NHWC")
        accelerator.wait_for_everyone()

    def _check_replicas_in_sync(self) -> None:
        """With DDP every process must end with the same adapter weights (gradient sync worked)."""
        accelerator = self.accelerator
        if not isinstance(self.adapter_module, torch.nn.parallel.DistributedDataParallel):
            return
        checksum = torch.stack([p.detach().double().sum() for p in self.adapter.parameters()]).sum()
        sums = accelerator.gather(checksum.reshape(1).to(accelerator.device))
        if not torch.all(sums == sums[0]):
            raise RuntimeError(f"the adapter replicas diverged across processes (weight sums {sums.tolist()})")
        accelerator.print(f"trained weights in sync: equal weight sums on all {accelerator.num_processes} processes")


def train(config: TrainingConfig) -> Path:
    """Train a PSA adapter as ``config`` says; returns the output folder holding the final adapter."""
    return PSATrainer(config).train()
