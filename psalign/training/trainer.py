"""PSA adapter training with Diffusion-DPO under Accelerate, for SD1.5- and SDXL-shaped pipelines.

One optimizer step, per process and micro-batch of B pairs:

1. latents of ``[chosen; rejected]`` (2B, C, h, w), from the VAE or the precomputed cache;
2. text dropout (rate ``proportion_empty_prompts``) replaces a pair's caption with the empty
   prompt, user dropout (rate ``user_dropout``) its user with the null user: drawn once per pair,
   shared by chosen and rejected;
3. one noise and one timestep per pair, shared by chosen and rejected;
4. the adapted UNet's prediction (adapter on, gradients to the adapter only) and the reference
   prediction (the same UNet with the adapter switched off, under no_grad);
5. :func:`psalign.loss.diffusion_dpo_loss`, a guard against non-finite values, backward,
   clipping and an AdamW step on the fp32 adapter weights.

The frozen UNet, VAE and text encoders run in the ``mixed_precision`` dtype; the adapter's
weights stay fp32 whatever it is.

With ``trainable: lora`` the same loop trains a SafetyDPO safety expert instead: a PEFT LoRA on
the UNet (:class:`psalign.training.lora.UNetLoRA`, the reference being the UNet with the LoRA
off) on expert pairs (:class:`psalign.safetydpo.data.ExpertPairDataset`); there is no user, so
no user dropout, and the result is a diffusers LoRA (``pytorch_lora_weights.safetensors``).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate.tracking import GeneralTracker

from psalign.adapter import PSAAdapter
from psalign.embeddings import load_embedding_stats, load_user_embedding
from psalign.io import InputError, InputProblem, atomic_write
from psalign.loss import LOSS_METRICS, DPOLossOutput, diffusion_dpo_loss, regression_target

from . import checkpoints
from .conditioning import (
    SDXL,
    FrozenTextEncoders,
    TextConditioning,
    resolve_model_type,
    sdxl_time_ids,
    unet_conditioning,
    vae_latents,
)
from .config import TrainingConfig
from .data import SeededPairs, micro_batches, resolve_train_data
from .precompute import (
    CachedPairs,
    cache_files,
    cache_info,
    check_cache_info,
    load_empty_conditioning,
    precompute_cache,
    write_cache_info,
)
from .timesteps import sample_timesteps, timestep_weights
from .validation import grid_array, save_grid, validation_grid, validation_pipeline

#: Every optimizer step logs :data:`psalign.loss.LOSS_METRICS` plus ``lr``, ``grad_norm`` and ``pairs_per_second``.
METRICS_FILE = Path("logs") / "metrics.jsonl"
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class NonFiniteLossError(RuntimeError):
    """The DPO loss became NaN or infinite; the run stopped before that step changed anything."""


@dataclass
class TrainingProgress:
    """Saved in every checkpoint (``register_for_checkpointing``): the optimizer steps done."""

    global_step: int = 0

    def state_dict(self) -> dict:
        return {"global_step": self.global_step}

    def load_state_dict(self, state: dict) -> None:
        self.global_step = int(state["global_step"])


@dataclass
class TrainingInputs:
    """Everything :func:`check_inputs` verified before any model is loaded."""

    metadata: Path
    model_type: str
    pairs: torch.utils.data.Dataset
    embed_mean: np.ndarray | None  # None for a LoRA (no user embeddings)
    embed_std: np.ndarray | None
    validation_users: list[str]
    validation_embeds: torch.Tensor
    resume: Path | None
    trackers: list[str]


def _requested_trackers(report_to: str) -> list[str]:
    names = [t.strip() for t in report_to.split(",") if t.strip()]
    return [] if names == ["none"] else names


def check_inputs(config: TrainingConfig) -> TrainingInputs:
    """Read and check every input (data, embeddings, model type, trackers, resume point, cache)
    without loading a model; every problem is reported at once as :class:`InputError`."""
    from accelerate.tracking import get_available_trackers

    from psalign.sage import PreferencePairDataset

    problems: list[InputProblem] = []

    def problem(where: str, reason: str, field: str | None = None) -> None:
        problems.append(InputProblem(where, 0, reason, field))

    metadata = image_root = model_type = resume = None
    lora = config.trainable == "lora"
    try:
        if lora:
            metadata = Path(config.train_data)
            if not metadata.is_file():
                raise FileNotFoundError(f"{metadata} not found: --train_data must be an expert_pairs.jsonl for a LoRA")
        else:
            metadata, image_root = resolve_train_data(config.train_data)
    except FileNotFoundError as err:
        problem(str(config.train_data), str(err), "train_data")
    try:
        model_type = resolve_model_type(config.pretrained_model, config.model_type)
    except (OSError, ValueError) as err:
        problem(str(config.pretrained_model), f"not a usable diffusers pipeline: {err}", "pretrained_model")
    stats = None
    if not lora and not Path(config.embeds_folder).is_dir():
        problem(str(config.embeds_folder), "embeddings folder not found", "embeds_folder")
    elif not lora:
        try:
            stats = load_embedding_stats(config.embeds_folder)
        except (OSError, ValueError) as err:
            problem(str(config.embeds_folder), str(err), "embeds_folder")
    try:
        resume = checkpoints.resolve_resume(config.resume_from_checkpoint, config.output_dir)
    except FileNotFoundError as err:
        problem(str(config.resume_from_checkpoint), str(err), "resume_from_checkpoint")
    trackers = _requested_trackers(config.report_to)
    available = {str(t) for t in get_available_trackers()}
    for name in trackers:
        if name != "all" and name not in available:
            shown = sorted(available) or "none"
            problem("--report_to", f"tracker {name!r} is not installed (available: {shown})", "report_to")
    if problems:
        raise InputError(problems, header=f"{len(problems)} problem(s) with the training inputs")

    if lora:
        from psalign.safetydpo.data import ExpertPairDataset

        pairs = ExpertPairDataset(
            metadata, resolution=config.resolution, random_crop=config.random_crop, random_flip=config.random_flip
        )
        return TrainingInputs(metadata, model_type, pairs, None, None, [], torch.empty(0), resume, trackers)
    pairs = PreferencePairDataset(
        metadata,
        image_root,
        config.embeds_folder,
        resolution=config.resolution,
        random_crop=config.random_crop,
        random_flip=config.random_flip,
    )
    dim = next(iter(pairs.user_embeds.values())).shape[0]
    mean, std = stats
    if mean.shape != (dim,):
        problem(
            str(Path(config.embeds_folder) / "embedding_stats.npz"),
            f"statistics have dimension {mean.shape[0]} but the user embeddings have {dim}",
        )
    users = list(config.validation_users) or list(dict.fromkeys(pairs.user_ids))[:2]
    embeds = []
    if config.validation_steps:
        for user_id in users:
            try:
                embeds.append(torch.from_numpy(load_user_embedding(config.embeds_folder, user_id)))
            except (OSError, ValueError) as err:
                problem(str(config.embeds_folder), str(err), "validation_users")
    if config.precompute:
        try:
            check_cache_info(_cache_dir(config), cache_info(config, model_type, metadata, len(pairs)))
        except ValueError as err:
            problem(str(_cache_dir(config)), str(err), "cache_dir")
    if problems:
        raise InputError(problems, header=f"{len(problems)} problem(s) with the training inputs")
    return TrainingInputs(
        metadata=metadata,
        model_type=model_type,
        pairs=pairs,
        embed_mean=mean,
        embed_std=std,
        validation_users=users if config.validation_steps else [],
        validation_embeds=torch.stack(embeds) if embeds else torch.empty(0, dim),
        resume=resume,
        trackers=trackers,
    )


def _cache_dir(config: TrainingConfig) -> Path:
    return Path(config.cache_dir) if config.cache_dir else Path(config.output_dir) / "cache"


def build_adapter(unet: torch.nn.Module, user_embed_dim: int, config: TrainingConfig) -> PSAAdapter:
    """A fresh fp32 adapter for ``unet``, initialised from ``config.seed`` (the global RNG is left alone)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return PSAAdapter.for_unet(unet, user_embed_dim, num_user_tokens=config.num_user_tokens)


def dpo_step_loss(
    unet: torch.nn.Module,
    adapter_module: torch.nn.Module,
    adapter: PSAAdapter,
    noise_scheduler,
    latents: torch.Tensor,
    text: TextConditioning,
    time_ids: torch.Tensor | None,
    user_embeds: torch.Tensor | None,
    null_user: torch.Tensor | None,
    beta: float,
    chosen_weight: float = 0.0,
    timestep_weights: torch.Tensor | None = None,
) -> DPOLossOutput:
    """Diffusion-DPO loss of one micro-batch of B pairs (:func:`psalign.loss.dpo_loss`'s ``beta`` and ``chosen_weight``).

    ``latents`` (2B, C, h, w) are ``[chosen; rejected]``; ``text`` (B rows, after dropout),
    ``time_ids`` (B, 6) or None, ``user_embeds`` (B, D) and ``null_user`` (B,) are per pair (both
    None for trainable weights without a user, such as :class:`~psalign.training.lora.UNetLoRA`).
    ``adapter_module`` is the (possibly DDP-wrapped) ``adapter``: calling it keeps gradients in sync.
    Noise and timesteps come from the global RNG, one per pair, shared by chosen and rejected;
    timesteps are uniform, or drawn in proportion to ``timestep_weights`` (:mod:`.timesteps`).
    """
    pairs = latents.shape[0] // 2
    latents = latents.float().contiguous()
    noise = torch.randn(latents[:pairs].shape, device=latents.device).repeat(2, 1, 1, 1)
    timesteps = sample_timesteps(
        pairs, noise_scheduler.config.num_train_timesteps, timestep_weights, latents.device
    ).repeat(2)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps).to(unet.dtype)
    kwargs = unet_conditioning(
        text.repeat(2).to(latents.device, unet.dtype), None if time_ids is None else time_ids.repeat(2, 1)
    )
    # The reference pass runs first, so its working memory is freed before the adapted pass's
    # saved activations pile up (peak: the larger of the two, not their sum).
    with adapter.disabled(), torch.no_grad():
        reference_pred = unet(noisy, timesteps, **kwargs).sample
    # The conditioning stays active after this call: gradient checkpointing recomputes the
    # adapted forward pass during the backward pass.
    users = () if user_embeds is None else (user_embeds.repeat(2, 1), null_user.repeat(2))
    adapter.activate(adapter_module(*users))
    model_pred = unet(noisy, timesteps, **kwargs).sample
    target = regression_target(noise_scheduler, latents, noise, timesteps)
    return diffusion_dpo_loss(
        model_pred.float(), reference_pred.float(), target.float(), beta=beta, chosen_weight=chosen_weight
    )


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
        from accelerate.utils import ProjectConfiguration

        self.config = config
        self.inputs = check_inputs(config)
        self.output_dir = Path(config.output_dir)
        self.accelerator = Accelerator(
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            mixed_precision=config.mixed_precision,
            log_with=[JSONLinesTracker(self.output_dir / METRICS_FILE), *self.inputs.trackers],
            project_config=ProjectConfiguration(
                project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")
            ),
        )
        self.dtype = DTYPES[config.mixed_precision]
        self.progress = TrainingProgress()
        self.vae = None
        self.text_encoders: FrozenTextEncoders | None = None
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
        if config.trainable == "lora":
            from .lora import UNetLoRA

            with torch.random.fork_rng(devices=[]):  # seeded LoRA init; the global RNG is left alone
                torch.manual_seed(config.seed)
                self.adapter = UNetLoRA(self.unet, config.lora_rank, config.lora_alpha)
            if not config.precompute:
                self._load_frozen_encoders()
            return
        dim = self.inputs.embed_mean.shape[0]
        self.adapter = build_adapter(self.unet, dim, config)
        self.adapter.set_embedding_stats(
            torch.from_numpy(self.inputs.embed_mean), torch.from_numpy(self.inputs.embed_std)
        )
        self.adapter.attach(self.unet)
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
        accelerator.register_for_checkpointing(self.progress)

    # ------------------------------------------------------------------ one micro-batch
    def _batch_inputs(self, batch: dict) -> tuple[torch.Tensor, TextConditioning, torch.Tensor | None, torch.Tensor]:
        """``(latents [chosen; rejected], text before dropout, time_ids or None, user_embeds)``."""
        device = self.accelerator.device
        if self.config.precompute:
            latents = torch.cat([batch["chosen_latents"], batch["rejected_latents"]]).to(device)
            text = TextConditioning(batch["prompt_embeds"], batch.get("pooled_embeds")).to(device, self.dtype)
        else:
            latents = vae_latents(self.vae, torch.cat([batch["chosen"], batch["rejected"]]))
            text = self.text_encoders.encode(batch["caption"])
        time_ids = None
        if self.is_sdxl:
            time_ids = sdxl_time_ids(batch["original_size"], batch["crop_top_left"], self.config.resolution).to(device)
        user_embeds = batch["user_embed"].to(device, torch.float32) if "user_embed" in batch else None
        return latents, text, time_ids, user_embeds

    def _empty_text(self) -> TextConditioning:
        return self.cached_empty if self.config.precompute else self.text_encoders.empty()

    def _micro_step(self, batch: dict) -> DPOLossOutput:
        config, device = self.config, self.accelerator.device
        latents, text, time_ids, user_embeds = self._batch_inputs(batch)
        pairs = latents.shape[0] // 2
        drop_text = torch.rand(pairs, device=device) < config.proportion_empty_prompts
        null_user = None if user_embeds is None else torch.rand(pairs, device=device) < config.user_dropout
        text = text.where(drop_text, self._empty_text())
        return dpo_step_loss(
            self.unet, self.adapter_module, self.adapter, self.noise_scheduler, latents, text, time_ids,
            user_embeds, null_user, config.beta_dpo, config.chosen_loss_weight, self.timestep_weights,
        )

    # ------------------------------------------------------------------ run
    def train(self) -> Path:
        """Run (or resume) to ``max_train_steps``; write the final adapter to ``output_dir``; return it."""
        from accelerate.utils import set_seed
        from tqdm.auto import tqdm

        config, accelerator = self.config, self.accelerator
        # Noise, timesteps and dropout draw from the global RNGs, seeded here (per process) so that
        # no setup work shifts them; a resumed run restores them from the checkpoint instead.
        set_seed(config.seed, device_specific=True)
        if self.inputs.resume is not None:
            accelerator.print(f"resuming from {self.inputs.resume}")
            accelerator.load_state(str(self.inputs.resume))
        elif config.resume_from_checkpoint == "latest":
            accelerator.print(f"no checkpoint in {self.output_dir} yet: starting a new run")
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
            total=config.max_train_steps, initial=self.progress.global_step, desc="PSA training" if config.trainable == "adapter" else "LoRA training", unit="step",
            disable=not accelerator.is_local_main_process,
        )
        sums, micro, started = torch.zeros(len(LOSS_METRICS), dtype=torch.float64), 0, time.perf_counter()
        while self.progress.global_step < config.max_train_steps:
            batch = next(stream)
            with accelerator.accumulate(self.adapter_module):
                out = self._micro_step(batch)
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
            sums += values.detach().cpu().double()
            if not accelerator.sync_gradients:
                continue
            self.progress.global_step += 1
            step = self.progress.global_step
            elapsed = time.perf_counter() - started
            logs = {name: float(v) for name, v in zip(LOSS_METRICS, sums / micro)}
            logs.update(
                lr=self.lr_scheduler.get_last_lr()[0],
                grad_norm=float(grad_norm),
                pairs_per_second=config.train_batch_size * accelerator.num_processes * micro / elapsed,
            )
            accelerator.log(logs, step=step)
            bar.update(1)
            bar.set_postfix(loss=f"{logs['loss']:.4f}", acc=f"{logs['implicit_acc']:.2f}")
            if step % config.checkpointing_steps == 0:
                self.save_checkpoint(step)
            if config.validation_steps and step % config.validation_steps == 0:
                self.validate(step)
            sums.zero_()
            micro, started = 0, time.perf_counter()
        bar.close()
        self._check_replicas_in_sync()
        accelerator.wait_for_everyone()
        # The full weights, gathered from every process when a plugin (FSDP, ZeRO-3) shards them.
        state = accelerator.get_state_dict(self.adapter_module)
        if accelerator.is_main_process and self.config.trainable == "lora":
            self._save_lora(state)
        elif accelerator.is_main_process:
            final = PSAAdapter(self.adapter.config)
            final.load_state_dict(state)
            final.save_pretrained(
                self.output_dir,
                extra={
                    "training_args": config.to_dict(),
                    "global_step": self.progress.global_step,
                    "model_type": self.inputs.model_type,
                },
            )
            accelerator.print(f"PSA adapter written to {self.output_dir}")
        accelerator.end_training()
        return self.output_dir

    def _save_lora(self, state: dict[str, torch.Tensor]) -> None:
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        pipeline_class = StableDiffusionXLPipeline if self.is_sdxl else StableDiffusionPipeline
        path = self.adapter.save_pretrained(self.output_dir, pipeline_class, state)
        info = {
            "training_args": self.config.to_dict(),
            "global_step": self.progress.global_step,
            "model_type": self.inputs.model_type,
        }
        with atomic_write(self.output_dir / "training_info.json") as handle:
            json.dump(info, handle, indent=2)
        self.accelerator.print(f"LoRA expert written to {path}")

    def _stop_non_finite(self, value: float, micro: int) -> None:
        step = self.progress.global_step + 1
        last = checkpoints.latest_checkpoint(self.output_dir)
        kept = f"the last good checkpoint {last} is intact" if last else "no checkpoint had been written yet"
        raise NonFiniteLossError(
            f"non-finite DPO loss ({value}) at optimizer step {step} (micro-batch {micro} of "
            f"{self.config.gradient_accumulation_steps}); stopped before the update, {kept}. Try a lower "
            "--learning_rate or --beta_dpo, or bf16 instead of fp16, and resume with --resume_from_checkpoint latest"
        )

    def save_checkpoint(self, step: int) -> Path:
        """The full Accelerate state (adapter, optimizer, LR scheduler, RNG states, step) as ``checkpoint-<step>``."""
        accelerator = self.accelerator
        partial = checkpoints.partial_path(self.output_dir, step)
        if accelerator.is_main_process and partial.exists():
            shutil.rmtree(partial)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(partial))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            checkpoints.finish_checkpoint(self.output_dir, step, self.config.checkpoints_total_limit)
        accelerator.wait_for_everyone()
        return checkpoints.checkpoint_path(self.output_dir, step)

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
                self.inputs.validation_embeds,
                self.inputs.validation_users,
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
