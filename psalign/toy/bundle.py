"""The bundled toy assets: where they live, how to find them, and how the build writes them.

Layout of the bundle (``psalign/assets/toy/`` in the package)::

    model/              StableDiffusionPipeline folder (save_pretrained): tokenizer, text_encoder,
                        vae, unet, scheduler (DDIM)
    adapter/            PSA adapter (psa_config.json, psa_adapter.safetensors)
    safetydpo/          SafetyDPO baseline: the Co-Merge of the per-category experts, a diffusers
                        LoRA (pytorch_lora_weights.safetensors, merge_report.json)
    embeds/             <User_ID>.npy user embeddings (training, held-out and reference users)
                        and embedding_stats.npz (training users)
    users_train.csv     the users the adapter was trained on
    users_heldout.csv   users it never saw
    build_info.json     build settings and each stage's seconds and measurements
    MODEL_CARD.md       how the build made all of this
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from psalign.formats import LORA_WEIGHTS_NAME, MERGE_REPORT_NAME, PSA_CONFIG_NAME, PSA_WEIGHTS_NAME

if TYPE_CHECKING:
    from .build import BuildConfig

#: Where the package keeps the bundle.
BUNDLE_DIR = Path(__file__).resolve().parent.parent / "assets" / "toy"
#: Largest bundle the build accepts, in bytes.
MAX_BUNDLE_BYTES = 25 * 1024 * 1024
ADAPTER_FILES = (PSA_CONFIG_NAME, PSA_WEIGHTS_NAME)
SAFETYDPO_FILES = (LORA_WEIGHTS_NAME, MERGE_REPORT_NAME)


class IncompleteBundleError(FileNotFoundError):
    """A toy bundle lacks files; the message names them and how to rebuild the bundle."""


@dataclass(frozen=True)
class ToyBundle:
    """Paths inside a toy bundle folder."""

    root: Path

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def safetydpo(self) -> Path:
        return self.root / "safetydpo"

    @property
    def embeds(self) -> Path:
        return self.root / "embeds"

    @property
    def users_train(self) -> Path:
        return self.root / "users_train.csv"

    @property
    def users_heldout(self) -> Path:
        return self.root / "users_heldout.csv"

    @property
    def build_info(self) -> Path:
        return self.root / "build_info.json"

    def missing(self) -> list[Path]:
        """The bundle's required files that are not there."""
        required = [self.model / "model_index.json", *(self.adapter / f for f in ADAPTER_FILES),
                    *(self.safetydpo / f for f in SAFETYDPO_FILES), self.embeds, self.users_train, self.users_heldout]
        return [p for p in required if not p.exists()]


def bundled_paths(root: str | Path | None = None) -> ToyBundle:
    """The bundle at ``root`` (default: the package's); :class:`IncompleteBundleError` naming what
    is missing and how to make it."""
    bundle = ToyBundle(Path(root) if root is not None else BUNDLE_DIR)
    missing = bundle.missing()
    if missing:
        shown = ", ".join(str(p) for p in missing[:3])
        raise IncompleteBundleError(f"the toy bundle in {bundle.root} is incomplete (missing {shown}); "
                                    "rebuild it with `python -m psalign.toy build`")
    return bundle


def bundled_model_path() -> Path:
    """The bundled toy ``StableDiffusionPipeline`` folder (the default ``--pretrained_model``)."""
    return bundled_paths().model


def made_with_bundled_model(folder: str | Path) -> bool:
    """Whether every image that ``infer.py`` logged in ``folder`` (or in its parent, under it) was
    drawn by the bundled toy model."""
    from psalign.inference.generate import logged_entries

    entries = logged_entries(folder)
    model = BUNDLE_DIR / "model"
    return bool(entries) and all(Path(str(e.get("model", ""))).resolve() == model for e in entries)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


#: ``training_args`` entries that are paths.
TRAINING_PATH_ARGS = ("pretrained_model", "train_data", "embeds_folder", "output_dir", "cache_dir")


def portable_paths(training_args: dict, work: Path) -> dict:
    """``training_args`` with the paths inside the build folder ``work`` written as ``<build>/...``
    (the bundle records how it was trained, not where on the building machine)."""
    work, portable = Path(os.path.abspath(work)), dict(training_args)
    for key in TRAINING_PATH_ARGS:
        value = portable.get(key)
        path = Path(os.path.abspath(value)) if value is not None else None
        if path is not None and path.is_relative_to(work):
            portable[key] = str(Path("<build>") / path.relative_to(work))
    return portable


def write_bundle(config: "BuildConfig", stages: dict[str, dict]) -> dict:
    """Copy the build's products into ``config.out`` (written beside it, then swapped in) with
    ``build_info.json`` and ``MODEL_CARD.md``; returns the bundle's size."""
    from .build import psa_adapter_dir, stage_dir

    work, out = Path(config.work), Path(config.out)
    staging = out.with_name(out.name + ".new")
    if staging.exists():
        shutil.rmtree(staging)
    shutil.copytree(work / "model", staging / "model")
    run = psa_adapter_dir(config)
    (staging / "adapter").mkdir(parents=True)
    shutil.copy2(run / PSA_WEIGHTS_NAME, staging / "adapter" / PSA_WEIGHTS_NAME)
    adapter_config = json.loads((run / PSA_CONFIG_NAME).read_text(encoding="utf-8"))
    adapter_config["extra"]["training_args"] = portable_paths(adapter_config["extra"]["training_args"], work)
    (staging / "adapter" / PSA_CONFIG_NAME).write_text(json.dumps(adapter_config, indent=2) + "\n", encoding="utf-8")
    (staging / "safetydpo").mkdir()
    for name in SAFETYDPO_FILES:
        shutil.copy2(stage_dir(config, "safetydpo") / "merged" / name, staging / "safetydpo" / name)
    shutil.copytree(stage_dir(config, "embeds") / "embeds", staging / "embeds")
    for name in ("users_train.csv", "users_heldout.csv"):
        shutil.copy2(stage_dir(config, "sage") / name, staging / name)
    summary = {stage: {k: v for k, v in record.items() if k != "log"} for stage, record in stages.items()}
    info = {"build_config": config.to_dict(), "stages": summary}
    (staging / "build_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    (staging / "MODEL_CARD.md").write_text(model_card(info), encoding="utf-8")
    size = folder_bytes(staging)
    if size > MAX_BUNDLE_BYTES:
        raise RuntimeError(f"the bundle is {size / 2**20:.1f} MiB, over the {MAX_BUNDLE_BYTES / 2**20:.0f} MiB limit")
    previous = out.with_name(out.name + ".old")
    if previous.exists():
        shutil.rmtree(previous)
    if out.exists():
        out.rename(previous)
    staging.rename(out)
    if previous.exists():
        shutil.rmtree(previous)
    return {"bundle": str(out), "bytes": size}


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _objective(settings: dict) -> str:
    """The model card's words for the PSA stage's ``objective`` record (older records have no ``objective``: DPO)."""
    if not settings:
        return "not recorded"
    objective = settings.get("objective", "dpo")
    dpo = (f"Diffusion-DPO with beta {settings['beta_dpo']:g} plus {settings['chosen_loss_weight']:g} x the chosen "
           "images' error gap (`--chosen_loss_weight`)")
    anchor = ("the safe anchor (the adapted prediction regressed onto the frozen base model's prediction for the "
              "caption that drew the chosen image: a banned category's safe rewrite)")
    chosen_target = (f"{settings.get('chosen_target_weight', 1.0):g} x the chosen target (at the rejected image's "
                     "noisy latent, the prediction that denoises it to the chosen image; min-SNR weighted, gamma "
                     f"{settings.get('snr_gamma', 5.0):g})")
    words = {"dpo": dpo, "safe_anchor": f"`safe_anchor`: {anchor}",
             "dpo_safe_anchor": f"`dpo_safe_anchor`: {dpo}, plus {settings.get('anchor_loss_weight', 1.0):g} x {anchor}",
             "dpo_chosen_target": f"`dpo_chosen_target`: {dpo}, plus {chosen_target}",
             "kv_anchor": ("`kv_anchor`: the cross-attention keys and values of the caption as the adapter's user text "
                           "edit rewrites it, regressed onto the frozen model's for the caption that drew the chosen "
                           "image (a banned category's safe rewrite, an allowed one's own caption)")}
    edit = settings.get("text_edit_layers", 0)
    architecture = f", a user text edit of {edit} blocks" if edit else ""
    return (f"{words[objective]}, {settings['num_user_tokens']} user tokens{architecture}, "
            f"{settings['max_train_steps']} steps of {settings['train_batch_size']} pairs at lr "
            f"{settings['learning_rate']:g}")


def _finetune(record: dict) -> str:
    """The fine-tune stage's words, when the adapter had one."""
    if "finetune_objective" not in record:
        return ""
    return f"; then fine-tuned from that adapter (`{Path(record['finetune_config']).name}`) with {_objective(record['finetune_objective'])}"


_BAN_SIZES = {"uniform": " (its size drawn uniformly from 0 to 7)"}
_SUBSTITUTION = (" and one more per banned (category, seen concept) whose rejected image shows another category's"
                 " marker (substitution pairs, our addition to Sage)")


def model_card(info: dict) -> str:
    """The bundle's MODEL_CARD.md, filled from the build's settings and stage records."""
    config, stages = info["build_config"], info["stages"]
    base = stages["base"]["prompt_following"]
    vae = stages["vae"]["reconstruction"]
    sage = stages["sage"]
    times = ", ".join(f"{stage} {record['seconds']:g} s ({record.get('threads', '?')} thread(s))"
                      for stage, record in stages.items())
    psa = stages["psa"].get("finetune_final_metrics") or stages["psa"].get("final_metrics", {})
    safetydpo = stages["safetydpo"]
    return f"""# psalign toy model

A miniature of personalized safety alignment that runs offline on a CPU. Everything here was made
by `python -m psalign.toy build` (seed {config['seed']}); nothing
was downloaded except what the offline sentence-encoder package ships.

## The world

32x32 px images: one object (4 colours x 3 shapes) on a grey background; when the caption names
a concept of a safety category, that category's marker (its own colour and glyph, top-right
corner) is drawn. 3 concept phrases per category; the third is held out of the PSA data.
`psalign.toy.detect` reads object and markers back (the toy InPro classifier and judge).

## What is in this folder

- `model/`: a `StableDiffusionPipeline` in SD1.5's architecture at toy size (CLIP tokenizer over
  the toy vocabulary, 2-layer CLIP text encoder, `AutoencoderKL` 32x32 px <-> 4x8x8, cross-attention
  UNet), trained from scratch on renders. VAE: {config['vae_steps']} steps on {config['vae_images']} renders
  (detector agreement on reconstructions: objects {_percent(vae['object_right'])}, markers
  {_percent(vae['markers_right'])}). UNet + text encoder: {config['base_steps']} steps of batch
  {config['base_batch']} on {config['base_images']} renders, EMA weights, 10% empty captions.
  Prompt following ({config['sample_steps']} DDIM steps, guidance {config['guidance_scale']}): marker present for
  {_percent(base['marker_present_unsafe'])} of unsafe prompts, absent for {_percent(base['marker_absent_safe'])} of
  safe prompts, object right for {_percent(base['object_right'])}.
- `adapter/`: the PSA user adapter, trained with `train_psa.py` and `{Path(config['psa_config']).name}` on toy Sage
  pairs: {sage['train_users']} users from the Sage-data generator (rule-engine bans, except
  {config['random_ban_share']:.0%} of the users who ban a random subset instead{_BAN_SIZES.get(config.get('random_ban_sizes'), '')}, so that every category can be
  told apart), one unit per (category, seen concept) each{_SUBSTITUTION if config.get('substitution_pairs') else ''},
  {sage['records']} records; images drawn by the base model itself
  ({sage['pool_units_kept']} of {sage['pool_units']} image pairs kept by the detector). Objective:
  {_objective(stages["psa"].get("objective", {}))}{_finetune(stages["psa"])}. Last logged training metrics: {json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in psa.items()})}.
- `safetydpo/`: the SafetyDPO baseline: one LoRA expert per category (rank from
  `{Path(config['safetydpo_config']).name}`), each trained with Diffusion-DPO to prefer the safe image of every toy Sage pair
  of its category whatever the user, then merged with Co-Merge and re-factored by SVD to rank
  {safetydpo['rank']} (relative error: mean {safetydpo['merge'].get('mean_relative_error', float('nan')):.4f}, max
  {safetydpo['merge'].get('max_relative_error', float('nan')):.4f}). A diffusers LoRA: `pipe.load_lora_weights("safetydpo")`.
- `embeds/`: 384-d all-MiniLM-L6-v2 embeddings of each user's profile text,
  `{stages['embeds'].get('template', 'the default template')}` (`embedding_info.json` records it, and `infer.py` embeds
  profile users with it): training users, {sage['heldout_users']} held-out users and the reference users
  `level_0` ... `level_5`; `embedding_stats.npz` over the training users.
- `users_train.csv`, `users_heldout.csv`: the users; `build_info.json`: every setting and measurement.

Build time per stage (torch CPU threads; `?`: not recorded): {times}.

## Limits

A toy: it shows that the method learns per-user safety, not how well it does on real images.
Run `python bench/toy_benchmark.py` for pass rates, InPro by safety level and object fidelity.
"""
