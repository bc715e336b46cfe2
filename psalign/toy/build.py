"""``python -m psalign.toy build``: make the toy model, its Sage data, the PSA adapter and the bundle.

Stages, in order, each in its own folder under ``--work_dir`` (default ``toy_build/``), each skipped
when its ``done.json`` exists (it records the stage's seconds and results); the two long training
stages checkpoint, so an interrupted build resumes where it stopped:

1. ``vae``: train the ``AutoencoderKL`` on renders (reconstruction + a tiny KL term); set its
   ``scaling_factor`` to 1 / the latents' standard deviation;
2. ``base``: train the UNet and the text encoder from scratch on renders (noise prediction, 10%
   empty captions for classifier-free guidance, EMA weights), save ``model/`` as a stock
   ``StableDiffusionPipeline`` folder and measure its prompt following with the detector;
3. ``sage``: toy Sage data, made by the Sage build pipeline (:mod:`psalign.sage.build`, see
   :mod:`psalign.toy.sage_data`): users from the Sage-data generator (rule-engine bans; 80% of
   them with random bans instead, see :func:`psalign.toy.sage_data.toy_users`), training and
   held-out; the template writer's prompts for every (seen concept, object) drawn by the base
   model itself, the safe and unsafe image of a unit from the same seed, kept when the detector
   flags the unsafe image only; ``sage/train/metadata.jsonl`` by the Sage rule;
4. ``embeds``: user embeddings with the offline sentence encoder over the profile text
   (:data:`~psalign.toy.sage_data.TOY_PROFILE_TEMPLATE`: the banned and allowed categories) for
   training, held-out and reference users; statistics over the training users;
5. ``psa``: the PSA adapter, trained with ``train_psa.py``'s library entry point and
   ``configs/toy_kv_anchor.yaml`` (a user text edit trained with ``kv_anchor``; ``--psa_config
   configs/toy.yaml`` for the published Diffusion-DPO loss, ``configs/toy_chosen_target.yaml`` for
   ``dpo_chosen_target``; paths overridden to this build's folders); with
   ``--psa_finetune_config`` (e.g. ``configs/toy_safe_anchor.yaml``) then fine-tuned from that
   adapter into ``psa/finetune``, which is the one bundled;
6. ``safetydpo``: the SafetyDPO baseline: one LoRA expert per category (``configs/toy_safetydpo.yaml``,
   ``train_safetydpo.py``'s path), merged with Co-Merge into one LoRA;
7. ``bundle``: copy model, adapter, merged LoRA, embeddings and users into ``--output_dir`` (default:
   ``<work_dir>/bundle``; pass ``--output_dir psalign/assets/toy`` to replace the bundled model) with a model card.

``--base_from BUNDLE`` skips the two model stages: it copies an existing bundle's ``model/`` into
the work folder and records that bundle's ``vae`` and ``base`` stage records, so the later stages
(new data, a new adapter) run on exactly the bundled base model.

Everything is seeded (``--seed``); torch runs on ``--threads`` CPU threads (1 by default: on a
machine with few cores, and other work on them, a second thread often makes each step slower,
not faster).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from psalign.io import InputError, InputProblem, atomic_path, atomic_write
from psalign.safe_load import TensorFileError, load_weights_only

from . import model as toy_model
from .data import RenderedSet, render_set
from .sage_data import RANDOM_BAN_SIZES, TOY_PROFILE_TEMPLATE, TRAIN_METADATA

STAGES: tuple[str, ...] = ("vae", "base", "sage", "embeds", "psa", "safetydpo", "bundle")
DONE_FILE = "done.json"
#: The toy PSA recipe with the published Diffusion-DPO loss (the control of the objective comparisons).
DPO_PSA_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "toy.yaml"
#: Default PSA training config, the bundled adapter's: a user text edit trained with ``kv_anchor``.
DEFAULT_PSA_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "toy_kv_anchor.yaml"
#: The safe-anchor fine-tune config, for ``--psa_finetune_config`` (the bundled adapter has no second stage).
SAFE_ANCHOR_FINETUNE_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "toy_safe_anchor.yaml"
#: Default SafetyDPO expert training config.
DEFAULT_SAFETYDPO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "toy_safetydpo.yaml"


@dataclass
class BuildConfig:
    """Every knob of the build (the model card records them)."""

    work: Path = Path("toy_build")
    #: The bundle folder; None: ``<work>/bundle``.
    out: Path | None = None
    seed: int = 0
    threads: int = 1
    # vae
    vae_images: int = 20000
    vae_steps: int = 500
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    # base UNet + text encoder
    base_images: int = 24000
    base_steps: int = 2400
    base_batch: int = 64
    base_lr: float = 7e-4
    base_warmup: int = 150
    base_text_dropout: float = 0.1
    base_ema_decay: float = 0.998
    checkpoint_every: int = 200
    # sage
    train_users: int = 1000
    heldout_users: int = 50
    random_ban_share: float = 0.8
    random_ban_sizes: str = "binomial"
    substitution_pairs: bool = False
    pool_seeds: int = 4
    sample_steps: int = toy_model.DEFAULT_STEPS
    guidance_scale: float = toy_model.DEFAULT_GUIDANCE
    generation_batch: int = 128
    # embeds
    profile_template: str = TOY_PROFILE_TEMPLATE
    # psa
    psa_config: Path = DEFAULT_PSA_CONFIG
    #: A second PSA run from the first one's adapter (e.g. :data:`SAFE_ANCHOR_FINETUNE_CONFIG`); None: none.
    psa_finetune_config: Path | None = None
    # safetydpo: one expert per category, merged with Co-Merge into a LoRA of this rank
    safetydpo_config: Path = DEFAULT_SAFETYDPO_CONFIG
    merge_rank: int = 32
    merge_calibration_prompts: int = 8

    def __post_init__(self) -> None:
        # Checked here, not in their stages, which run after an hour of model training.
        from psalign.embeddings import PROFILE_TEMPLATE_FIELDS
        from psalign.users import check_template

        if not 0.0 <= self.random_ban_share <= 1.0:
            raise InputError([InputProblem("build config", 0, f"must be in [0, 1], got {self.random_ban_share}",
                                           "random_ban_share")], header="bad build settings")
        if self.random_ban_sizes not in RANDOM_BAN_SIZES:
            raise InputError([InputProblem("build config", 0, f"must be one of {', '.join(RANDOM_BAN_SIZES)}, got "
                                           f"{self.random_ban_sizes!r}", "random_ban_sizes")], header="bad build settings")
        check_template(self.profile_template, PROFILE_TEMPLATE_FIELDS, source="profile_template")

        if self.out is None:
            self.out = Path(self.work) / "bundle"

    def to_dict(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}


# --------------------------------------------------------------------------------------------
# Stage bookkeeping


def stage_dir(config: BuildConfig, stage: str) -> Path:
    return Path(config.work) / stage


def stage_done(config: BuildConfig, stage: str) -> dict | None:
    """The stage's recorded results, or None when it has not finished."""
    path = stage_dir(config, stage) / DONE_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _finish(config: BuildConfig, stage: str, started: float, results: dict) -> dict:
    """Write the stage's ``done.json``: its results, the torch CPU ``threads`` it ran on and ``seconds``,
    the wall time of the process that finished it plus, for a resumed training stage, the training
    time of earlier processes."""
    seconds = time.perf_counter() - started + results.pop("earlier_seconds", 0.0)
    record = {"stage": stage, "seconds": round(seconds, 1), "threads": config.threads, **results}
    with atomic_write(stage_dir(config, stage) / DONE_FILE) as handle:
        json.dump(record, handle, indent=2)
    return record


def _save_checkpoint(path: Path, state: dict) -> None:
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(state, tmp)


def _load_checkpoint(path: Path) -> dict | None:
    """A stage checkpoint written by :func:`_save_checkpoint` (None when there is none), read without
    unpickling objects; a file that is not one raises ``TensorFileError`` saying how to restart the stage."""
    if not path.is_file():
        return None
    try:
        state = load_weights_only(path)
    except TensorFileError as error:
        raise TensorFileError(f"{error}; delete it to restart this stage from step 0") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise TensorFileError(f"{path} is not a stage checkpoint of this build; delete it to restart this stage")
    return state


def _step_rng(seed: int, stage: int, step: int) -> np.random.Generator:
    """The RNG of one training step: resumed runs draw exactly what the uninterrupted run drew."""
    return np.random.default_rng([seed, stage, step])


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _train(
    name: str,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[int], torch.Tensor],
    steps: int,
    checkpoint: Path,
    every: int,
    schedule: Callable[[int], float],
    after_step: Callable[[int], None] = lambda step: None,
    extra_state: dict[str, torch.nn.Module] | None = None,
) -> list[dict]:
    """Run ``loss_fn(step)`` + AdamW steps to ``steps``, checkpointing every ``every`` steps.

    Returns ``(log, earlier_seconds)``: the loss log (one entry per 50 steps) and the training
    seconds spent by earlier, interrupted processes. A checkpoint holds ``modules``,
    ``extra_state`` (e.g. EMA weights), the optimizer, the step, the log and the seconds so far.
    """
    extra_state = extra_state or {}
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    state = _load_checkpoint(checkpoint)
    start, log, earlier = 0, [], 0.0
    if state is not None:
        for key, module in {**modules, **extra_state}.items():
            module.load_state_dict(state[key])
        optimizer.load_state_dict(state["optimizer"])
        start, log, earlier = state["step"], state["log"], state["seconds"]
        print(f"{name}: resuming at step {start} from {checkpoint}")
    window, started, began = [], time.perf_counter(), time.perf_counter()
    for step in tqdm(range(start, steps), initial=start, total=steps, desc=name, unit="step"):
        for group, lr in zip(optimizer.param_groups, base_lrs):
            group["lr"] = lr * schedule(step)
        loss = loss_fn(step)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{name}: non-finite loss at step {step}; last checkpoint: {checkpoint}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
        optimizer.step()
        after_step(step)
        window.append(loss.item())
        done = step + 1
        if done % 50 == 0 or done == steps:
            seconds = time.perf_counter() - started
            log.append({"step": done, "loss": float(np.mean(window)), "seconds_per_step": seconds / len(window)})
            window, started = [], time.perf_counter()
        if done % every == 0 or done == steps:
            state = {key: m.state_dict() for key, m in {**modules, **extra_state}.items()}
            seconds = earlier + time.perf_counter() - began
            _save_checkpoint(checkpoint, {**state, "optimizer": optimizer.state_dict(), "step": done, "log": log,
                                          "seconds": seconds})
    return log, earlier


# --------------------------------------------------------------------------------------------
# Stage 1: VAE


def _vae_latents(vae, images: np.ndarray, batch: int = 256) -> torch.Tensor:
    """Posterior means (N, 4, 8, 8) of uint8 images (N, 32, 32, 3), unscaled."""
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            pixels = toy_model.pixels_to_tensor(images[start : start + batch])
            out.append(vae.encode(pixels).latent_dist.mode())
    return torch.cat(out)


def run_vae(config: BuildConfig) -> dict:
    started = time.perf_counter()
    folder = stage_dir(config, "vae")
    data = render_set(config.vae_images, seed=config.seed * 1000 + 1)
    torch.manual_seed(config.seed)
    vae = toy_model.build_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)

    def loss_fn(step: int) -> torch.Tensor:
        rng = _step_rng(config.seed, 1, step)
        pixels = toy_model.pixels_to_tensor(data.images[rng.integers(len(data), size=config.vae_batch)])
        torch.manual_seed(int(rng.integers(2**31)))
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        return torch.nn.functional.mse_loss(reconstruction, pixels) + config.vae_kl_weight * posterior.kl().mean()

    log, earlier = _train(
        "vae", {"vae": vae}, optimizer, loss_fn, config.vae_steps, folder / "checkpoint.pt",
        config.checkpoint_every, lambda step: _lr_factor(step, 50, config.vae_steps),
    )
    vae.eval()
    latents = _vae_latents(vae, data.images[:4096])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    # How faithful is the round trip? Detector agreement on held-out renders.
    test = render_set(500, seed=config.seed * 1000 + 2)
    with torch.no_grad():
        decoded = vae.decode(_vae_latents(vae, test.images)).sample
    agree = _detector_agreement(test, _to_uint8(decoded))
    vae.save_pretrained(folder / "vae")
    return _finish(config, "vae", started, {"scaling_factor": vae.config.scaling_factor, "reconstruction": agree,
                                            "final_loss": log[-1]["loss"], "earlier_seconds": earlier})


def _to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """float (N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3)."""
    return ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _detector_agreement(data: RenderedSet, images: np.ndarray) -> dict:
    """Shares of ``images`` whose detected object / markers match ``data``'s labels."""
    from .detect import detect
    from .world import CATEGORIES, OBJECTS

    objects = markers = 0
    for image, obj, category in zip(images, data.objects, data.categories):
        found = detect(image)
        objects += found.shows(OBJECTS[obj])
        markers += found.markers == ((CATEGORIES[category],) if category >= 0 else ())
    return {"object_right": objects / len(images), "markers_right": markers / len(images), "n": len(images)}


# --------------------------------------------------------------------------------------------
# Stage 2: base UNet + text encoder


class _EMA:
    """Exponential moving average of a module's parameters (kept as a module copy)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        import copy

        self.decay = decay
        self.shadow = copy.deepcopy(module).requires_grad_(False)
        self.module = module

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for shadow, live in zip(self.shadow.parameters(), self.module.parameters()):
            shadow.lerp_(live, 1 - decay)


def run_base(config: BuildConfig) -> dict:
    from diffusers import AutoencoderKL

    started = time.perf_counter()
    folder = stage_dir(config, "base")
    vae = AutoencoderKL.from_pretrained(stage_dir(config, "vae") / "vae").eval()
    data = render_set(config.base_images, seed=config.seed * 1000 + 3)
    latents_file = folder / "latents.pt"
    if latents_file.is_file():
        latents = load_weights_only(latents_file)
    else:
        latents = _vae_latents(vae, data.images) * vae.config.scaling_factor
        with atomic_path(latents_file, suffix=".pt") as tmp:
            torch.save(latents, tmp)
    tokenizer = toy_model.build_tokenizer()
    torch.manual_seed(config.seed)
    text_encoder = toy_model.build_text_encoder(len(tokenizer))
    unet = toy_model.build_unet()
    scheduler = toy_model.build_training_scheduler()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.base_lr, weight_decay=1e-2)
    ema_unet, ema_text = _EMA(unet, config.base_ema_decay), _EMA(text_encoder, config.base_ema_decay)
    alphas = scheduler.alphas_cumprod

    def loss_fn(step: int) -> torch.Tensor:
        rng = _step_rng(config.seed, 2, step)
        index = rng.integers(len(data), size=config.base_batch)
        captions = data.captions(index, rng)
        captions = ["" if rng.random() < config.base_text_dropout else c for c in captions]
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        clean = latents[torch.from_numpy(index)]
        generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(index),), generator=generator)
        a = alphas[timesteps].view(-1, 1, 1, 1)
        noisy = a.sqrt() * clean + (1 - a).sqrt() * noise
        prediction = unet(noisy, timesteps, encoder_hidden_states=text_encoder(ids).last_hidden_state).sample
        return torch.nn.functional.mse_loss(prediction, noise)

    def after_step(step: int) -> None:
        ema_unet.update(step)
        ema_text.update(step)

    log, earlier = _train(
        "base", {"unet": unet, "text_encoder": text_encoder}, optimizer, loss_fn, config.base_steps,
        folder / "checkpoint.pt", config.checkpoint_every,
        lambda step: _lr_factor(step, config.base_warmup, config.base_steps), after_step,
        extra_state={"ema_unet": ema_unet.shadow, "ema_text_encoder": ema_text.shadow},
    )
    model_dir = Path(config.work) / "model"
    toy_model.save_pipeline(model_dir, vae, ema_text.shadow, tokenizer, ema_unet.shadow)
    from .benchmark import prompt_following

    following = prompt_following(toy_model.load_pipeline(model_dir), seed=config.seed,
                                 steps=config.sample_steps, guidance_scale=config.guidance_scale)
    return _finish(config, "base", started, {"prompt_following": following, "final_loss": log[-1]["loss"],
                                             "log": log, "earlier_seconds": earlier})


# --------------------------------------------------------------------------------------------
# Stage 3: toy Sage


def run_sage(config: BuildConfig) -> dict:
    from .sage_data import build_toy_sage

    started = time.perf_counter()
    results = build_toy_sage(
        Path(config.work) / "model",
        stage_dir(config, "sage"),
        train_users=config.train_users,
        heldout_users=config.heldout_users,
        random_ban_share=config.random_ban_share,
        random_ban_sizes=config.random_ban_sizes,
        substitution_pairs=config.substitution_pairs,
        pool_seeds=config.pool_seeds,
        seed=config.seed,
        steps=config.sample_steps,
        guidance_scale=config.guidance_scale,
        batch_size=config.generation_batch,
    )
    return _finish(config, "sage", started, results)


# --------------------------------------------------------------------------------------------
# Stage 4: user embeddings


def run_embeds(config: BuildConfig) -> dict:
    from psalign.embeddings import (
        DEFAULT_SENTENCE_MODEL_NAME,
        SentenceUserEncoder,
        claim_embedding_folder,
        embed_users,
        embedding_info,
        pending_users,
        write_embedding_stats,
    )
    from psalign.levels import LEVEL_BANS, reference_user
    from psalign.users import read_users

    started = time.perf_counter()
    sage = stage_dir(config, "sage")
    train = read_users(sage / "users_train.csv")
    heldout = read_users(sage / "users_heldout.csv")
    references = [reference_user(level) for level in LEVEL_BANS]
    folder = stage_dir(config, "embeds") / "embeds"
    everyone = train + heldout + references
    claim_embedding_folder(folder, embedding_info("sentence", DEFAULT_SENTENCE_MODEL_NAME, config.profile_template))
    todo = pending_users(everyone, folder)
    if todo:
        embed_users(SentenceUserEncoder(device="cpu"), todo, folder, config.profile_template)
    write_embedding_stats(folder, [u.user_id for u in train])
    return _finish(config, "embeds", started, {"users": len(everyone), "encoder": "all-MiniLM-L6-v2 (offline)",
                                               "template": config.profile_template})


# --------------------------------------------------------------------------------------------
# Stage 5: PSA adapter


#: The PSA training settings the model card states.
PSA_OBJECTIVE = ("objective", "beta_dpo", "chosen_loss_weight", "anchor_loss_weight", "chosen_target_weight",
                 "snr_gamma", "num_user_tokens", "text_edit_layers", "learning_rate", "max_train_steps",
                 "train_batch_size")


def psa_overrides(config: BuildConfig, run: str = "run") -> dict:
    """The path arguments of a PSA training run inside this build (``psa/<run>``)."""
    work = Path(config.work)
    return {
        "pretrained_model": str(work / "model"),
        "train_data": str(stage_dir(config, "sage") / TRAIN_METADATA),
        "embeds_folder": str(stage_dir(config, "embeds") / "embeds"),
        "output_dir": str(stage_dir(config, "psa") / run),
        "resume_from_checkpoint": "latest",
    }


def psa_adapter_dir(config: BuildConfig) -> Path:
    """The folder of the adapter the build bundles: the fine-tune's when there is one."""
    return stage_dir(config, "psa") / ("finetune" if config.psa_finetune_config else "run")


def run_psa(config: BuildConfig) -> dict:
    """Train the adapter with ``psa_config``; then, with ``psa_finetune_config``, fine-tune it
    (``init_adapter``: the first run's adapter) into ``psa/finetune``."""
    from psalign.training import load_training_config, read_metrics, train

    started = time.perf_counter()
    runs = [("run", config.psa_config, {})]
    if config.psa_finetune_config:
        runs.append(("finetune", config.psa_finetune_config, {"init_adapter": str(stage_dir(config, "psa") / "run")}))
    results: dict = {"config": str(config.psa_config)}
    for name, path, extra in runs:
        output = stage_dir(config, "psa") / name
        training = load_training_config(path, {**psa_overrides(config, name), **extra})
        if not (output / "psa_config.json").is_file():  # a finished run is not trained again
            train(training)
        metrics = read_metrics(output)
        key = "" if name == "run" else "finetune_"
        results[f"{key}objective"] = {k: getattr(training, k) for k in PSA_OBJECTIVE}
        results[f"{key}final_metrics"] = metrics[max(metrics)] if metrics else {}
        if name == "finetune":
            results["finetune_config"] = str(path)
    return _finish(config, "psa", started, results)


# --------------------------------------------------------------------------------------------
# Stage 6: SafetyDPO experts and their Co-Merge


def safetydpo_overrides(config: BuildConfig, pairs: Path, output: Path) -> dict:
    """The arguments of one SafetyDPO expert's training run inside this build."""
    return {"pretrained_model": str(Path(config.work) / "model"), "train_data": str(pairs), "output_dir": str(output),
            "trainable": "lora", "resume_from_checkpoint": "latest"}


def run_safetydpo(config: BuildConfig) -> dict:
    """One expert per category (``train_safetydpo.py``'s path: the category's toy Sage pairs, safe
    image always chosen), then Co-Merge into ``safetydpo/merged`` (a diffusers LoRA)."""
    from psalign.categories import CATEGORIES, category_token
    from psalign.safetydpo.data import write_expert_data
    from psalign.safetydpo.merge_experts import check_merge_inputs, merge_experts
    from psalign.training import load_training_config, read_metrics, train

    from .world import IMAGE_SIZE

    started = time.perf_counter()
    folder = stage_dir(config, "safetydpo")
    model = str(Path(config.work) / "model")
    experts, final = [], {}
    for category in CATEGORIES:
        output = folder / f"expert_{category_token(category)}"
        pairs = write_expert_data(output, category, sage=stage_dir(config, "sage") / TRAIN_METADATA)
        training = load_training_config(config.safetydpo_config, safetydpo_overrides(config, pairs, output))
        train(training)
        metrics = read_metrics(output)
        final[category] = metrics[max(metrics)] if metrics else {}
        experts.append(output)
    job = check_merge_inputs(experts, list(CATEGORIES), "co_merge", calibration_count=config.merge_calibration_prompts)
    report = merge_experts(job, model, "co_merge", folder / "merged", rank=config.merge_rank,
                           steps=config.sample_steps, resolution=IMAGE_SIZE)
    summary = {k: report[k] for k in ("mean_relative_error", "max_relative_error") if k in report}
    return _finish(config, "safetydpo", started, {"config": str(config.safetydpo_config), "rank": config.merge_rank,
                                                  "final_metrics": final, "merge": summary})


# --------------------------------------------------------------------------------------------
# Stage 7: bundle


def run_bundle(config: BuildConfig) -> dict:
    from .bundle import write_bundle

    started = time.perf_counter()
    results = write_bundle(config, {stage: stage_done(config, stage) for stage in STAGES[:-1]})
    return _finish(config, "bundle", started, results)


RUNNERS: dict[str, Callable[[BuildConfig], dict]] = {
    "vae": run_vae,
    "base": run_base,
    "sage": run_sage,
    "embeds": run_embeds,
    "psa": run_psa,
    "safetydpo": run_safetydpo,
    "bundle": run_bundle,
}


def reuse_base_model(config: BuildConfig, bundle: str | Path, safetydpo: bool = False) -> None:
    """Start ``config.work`` from ``bundle``'s base model: copy its ``model/`` and record its ``vae``
    and ``base`` stages (with ``reused_from``) as finished; with ``safetydpo`` also its merged
    SafetyDPO LoRA and stage record (it depends only on the base model and the seeded Sage data,
    not on the PSA objective). Refused when the work folder already has a model or a finished
    model stage, so a trained model is never overwritten."""
    from .bundle import SAFETYDPO_FILES, bundled_paths

    source = bundled_paths(bundle)
    info = json.loads(source.build_info.read_text(encoding="utf-8"))
    work = Path(config.work)
    taken = [p for p in (work / "model", *(stage_dir(config, s) / DONE_FILE for s in ("vae", "base"))) if p.exists()]
    if taken:
        raise FileExistsError(f"{taken[0]} exists: --base_from starts a new work folder; use another --work_dir")
    partial = work / "model.partial"  # copied whole, then renamed into place
    if partial.exists():
        shutil.rmtree(partial)
    shutil.copytree(source.model, partial)
    partial.rename(work / "model")
    if safetydpo:
        merged = stage_dir(config, "safetydpo") / "merged"
        merged.mkdir(parents=True, exist_ok=True)
        for name in SAFETYDPO_FILES:
            shutil.copy2(source.safetydpo / name, merged / name)
    for stage in ("vae", "base", "safetydpo") if safetydpo else ("vae", "base"):
        record = {**info["stages"][stage], "reused_from": str(source.root)}
        stage_dir(config, stage).mkdir(parents=True, exist_ok=True)
        with atomic_write(stage_dir(config, stage) / DONE_FILE) as handle:
            json.dump(record, handle, indent=2)


def training_config_problems(
    config: BuildConfig, until: str = STAGES[-1], reused: tuple[str, ...] = ()
) -> list[InputProblem]:
    """The problems of the training configs that the stages up to ``until`` still to run (neither
    finished nor ``reused`` from a bundle) will read (``psa_config``, ``psa_finetune_config``,
    ``safetydpo_config``): a missing file, or one that is not a valid training config with this
    build's paths. Cheap (nothing is loaded), so that a bad config is found before the hour of
    model training that precedes its stage."""
    from psalign.training import load_training_config

    pending = {stage for stage in STAGES[: STAGES.index(until) + 1]
               if stage not in reused and stage_done(config, stage) is None}
    checks = []
    if "psa" in pending:
        checks.append(("psa_config", config.psa_config, psa_overrides(config)))
        if config.psa_finetune_config:
            first_run = str(stage_dir(config, "psa") / "run")
            checks.append(("psa_finetune_config", config.psa_finetune_config,
                           {**psa_overrides(config, "finetune"), "init_adapter": first_run}))
    if "safetydpo" in pending:
        folder = stage_dir(config, "safetydpo") / "expert"
        checks.append(("safetydpo_config", config.safetydpo_config,
                       safetydpo_overrides(config, folder / "expert_pairs.jsonl", folder)))
    problems = []
    for name, path, overrides in checks:
        if not Path(path).is_file():
            reason = "is a folder, not a training YAML file" if Path(path).is_dir() else "no such training YAML file"
            problems.append(InputProblem(str(path), 0, reason, f"--{name}"))
            continue
        try:
            load_training_config(path, overrides)
        except InputError as error:
            problems += error.problems
    return problems


def check_training_configs(config: BuildConfig, until: str = STAGES[-1], reused: tuple[str, ...] = ()) -> None:
    """:class:`InputError` listing :func:`training_config_problems`, if any."""
    problems = training_config_problems(config, until, reused)
    if problems:
        raise InputError(problems, header="bad training config(s) for the build (checked before any stage runs)")


def build(config: BuildConfig, until: str = STAGES[-1]) -> dict[str, dict]:
    """Run every stage up to ``until`` that has not finished; returns each stage's record. The
    training configs of the stages to run are checked first (:func:`check_training_configs`)."""
    if until not in STAGES:
        raise ValueError(f"unknown stage {until!r}; stages: {', '.join(STAGES)}")
    check_training_configs(config, until)
    torch.set_num_threads(config.threads)
    records = {}
    for stage in STAGES[: STAGES.index(until) + 1]:
        record = stage_done(config, stage)
        if record is None:
            print(f"== stage {stage}")
            record = RUNNERS[stage](config)
        print(f"== stage {stage}: done in {record['seconds']} s")
        records[stage] = record
    return records


def add_build_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    defaults = BuildConfig()
    parser.add_argument("--output_dir", "--out", dest="out", type=Path, default=None,
                        help="bundle folder (default: <work_dir>/bundle)")
    parser.add_argument("--base_from", type=Path, default=None,
                        help="reuse this bundle's base model instead of training the vae and base stages")
    parser.add_argument("--reuse_safetydpo", action="store_true",
                        help="with --base_from: reuse the bundle's merged SafetyDPO LoRA too (skips that stage)")
    parser.add_argument("--work_dir", "--work", dest="work", type=Path, default=defaults.work, metavar="DIR",
                        help="stage folders (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of every stage")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch CPU threads")
    parser.add_argument("--until", choices=STAGES, default=STAGES[-1], help="last stage to run")
    parser.add_argument("--psa_config", type=Path, default=defaults.psa_config, help="PSA training YAML (default: the bundled "
                        "recipe, configs/toy_kv_anchor.yaml; configs/toy.yaml for the published loss)")
    parser.add_argument("--psa_finetune_config", type=Path, default=None,
                        help="a second PSA training YAML run from the first run's adapter, whose result is bundled "
                             "(e.g. configs/toy_safe_anchor.yaml; default: none)")
    parser.add_argument("--safetydpo_config", type=Path, default=defaults.safetydpo_config,
                        help="SafetyDPO expert training YAML")
    parser.add_argument("--random_ban_share", type=float, default=defaults.random_ban_share,
                        help="share of the users whose bans are random instead of the rule engine's (default: %(default)s)")
    parser.add_argument("--random_ban_sizes", choices=RANDOM_BAN_SIZES, default=defaults.random_ban_sizes,
                        help="how many categories a random-ban user bans: binomial (each with probability 1/2) or "
                             "uniform (0 to 7 equally likely) (default: %(default)s)")
    parser.add_argument("--substitution_pairs", action="store_true",
                        help="add Sage pairs that reject another category's marker on a banned category's prompt")
    parser.add_argument("--profile_template", default=defaults.profile_template,
                        help="profile text the sentence encoder embeds (default: %(default)r)")
    return parser


def config_from_args(args: argparse.Namespace) -> BuildConfig:
    return BuildConfig(work=args.work, out=args.out, seed=args.seed, threads=args.threads, psa_config=args.psa_config,
                       psa_finetune_config=args.psa_finetune_config,
                       safetydpo_config=args.safetydpo_config, random_ban_share=args.random_ban_share,
                       random_ban_sizes=args.random_ban_sizes, substitution_pairs=args.substitution_pairs, profile_template=args.profile_template)
