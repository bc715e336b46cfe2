"""What the training loop trains, behind one interface: the PSA user adapter, or a LoRA on the UNet.

The loop (:mod:`.trainer`) never asks which kind it trains. A :class:`TrainableKind` answers
everything that depends on it, all before any model is loaded except :meth:`~TrainableKind.build`
and :meth:`~TrainableKind.save`:

* :meth:`~TrainableKind.config_problems`: the options this kind cannot use, or needs;
* :meth:`~TrainableKind.locate_data`: where its training data is, and its quick checks;
* :meth:`~TrainableKind.read_data`: the dataset and the user embeddings it needs, and whether a
  resumed checkpoint (or an initial adapter) holds weights of this kind;
* :meth:`~TrainableKind.build`: the trainable module on a loaded UNet (seeded from
  ``config.seed``), which offers what the loop and the objectives use: ``activate(conditioning)``,
  ``disabled()`` (the reference model: the same UNet without it), calling it for the conditioning,
  fp32 ``parameters()`` and ``state_dict``/``load_state_dict``;
* :meth:`~TrainableKind.save`: the final weights in the kind's own format.

:class:`~psalign.adapter.PSAAdapter` and :class:`~psalign.training.lora.UNetLoRA` are the two
modules. A new kind is one subclass here and its entry in :data:`TRAINABLE_KINDS`.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

from psalign.formats import TRAINING_INFO_NAME
from psalign.io import InputProblem, atomic_write

from . import checkpoints
from .checks import expert_data_problems, pair_data_problems
from .data import resolve_train_data

if TYPE_CHECKING:
    from psalign.adapter import PSAAdapter

    from .config import TrainingConfig


@dataclass
class TrainableData:
    """What :meth:`TrainableKind.read_data` read: the pairs, and the user embeddings when the kind has users."""

    pairs: torch.utils.data.Dataset
    chosen_captions: list[str | None]
    embed_mean: np.ndarray | None = None
    embed_std: np.ndarray | None = None
    validation_users: list[str] = field(default_factory=list)
    validation_embeds: torch.Tensor = field(default_factory=lambda: torch.empty(0))


@dataclass
class DataLocation:
    """Where :meth:`TrainableKind.locate_data` found the data (``metadata`` None: not found)."""

    metadata: Path | None
    image_root: Path | None = None
    embedding_stats: tuple[np.ndarray, np.ndarray] | None = None


class TrainableKind:
    """One kind of trainable weights (see the module docstring)."""

    #: The ``trainable`` config value.
    name: ClassVar[str] = ""
    #: How progress bars call it, and what the final message says was written.
    label: ClassVar[str] = ""
    written: ClassVar[str] = ""

    def config_problems(self, config: "TrainingConfig") -> list[tuple[str, str]]:
        """``(field, reason)`` for options this kind cannot use or needs."""
        return []

    def locate_data(self, config: "TrainingConfig", problems: list[InputProblem]) -> DataLocation:
        raise NotImplementedError

    def read_data(self, config: "TrainingConfig", location: DataLocation,
                  resume: checkpoints.CheckpointInfo | None, problems: list[InputProblem]) -> TrainableData:
        raise NotImplementedError

    def build(self, unet: torch.nn.Module, config: "TrainingConfig", data: TrainableData) -> torch.nn.Module:
        raise NotImplementedError

    def save(self, module: torch.nn.Module, state: dict[str, torch.Tensor], output_dir: Path, info: dict,
             sdxl: bool) -> Path:
        """Write the final ``state`` (``module``'s state dict) with ``info`` (training arguments,
        step, model type) to ``output_dir``; returns the weights file's path."""
        raise NotImplementedError


def _problem(problems: list[InputProblem], where: str, reason: str, field_name: str | None = None) -> None:
    problems.append(InputProblem(where, 0, reason, field_name))


class AdapterKind(TrainableKind):
    """The PSA user adapter, on Sage preference pairs with user embeddings."""

    name = "adapter"
    label = "PSA"
    written = "PSA adapter"

    def config_problems(self, config):
        if config.embeds_folder in (None, ""):
            return [("embeds_folder", "required for the PSA adapter (in the YAML file or on the command line)")]
        return []

    def locate_data(self, config, problems):
        from psalign.embeddings import load_embedding_stats

        location = DataLocation(None)
        try:
            location.metadata, location.image_root = resolve_train_data(config.train_data)
        except FileNotFoundError as err:
            _problem(problems, str(config.train_data), str(err), "train_data")
        if not Path(config.embeds_folder).is_dir():
            _problem(problems, str(config.embeds_folder), "embeddings folder not found", "embeds_folder")
        else:
            try:
                location.embedding_stats = load_embedding_stats(config.embeds_folder)
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
                _problem(problems, str(config.embeds_folder), f"unreadable embedding statistics: {err}", "embeds_folder")
        if location.metadata is not None:
            embeds_folder = config.embeds_folder if Path(config.embeds_folder).is_dir() else None
            problems += pair_data_problems(location.metadata, location.image_root, embeds_folder,
                                           location.embedding_stats)
        return location

    def read_data(self, config, location, resume, problems):
        from psalign.embeddings import load_user_embedding
        from psalign.sage import PreferencePairDataset

        pairs = PreferencePairDataset(location.metadata, location.image_root, config.embeds_folder,
                                      resolution=config.resolution, random_crop=config.random_crop,
                                      random_flip=config.random_flip)
        dim = next(iter(pairs.user_embeds.values())).shape[0]
        mean, std = location.embedding_stats
        if mean.shape != (dim,):
            _problem(problems, str(Path(config.embeds_folder) / "embedding_stats.npz"),
                     f"statistics have dimension {mean.shape[0]} but the user embeddings have {dim}")
        problems += adapter_checkpoint_problems(resume, dim, config.text_edit_layers)
        problems += init_adapter_problems(config, dim)
        users = list(config.validation_users) or list(dict.fromkeys(pairs.user_ids))[:2]
        embeds = []
        if config.validation_steps:
            for user_id in users:
                try:
                    embeds.append(torch.from_numpy(load_user_embedding(config.embeds_folder, user_id)))
                except (OSError, ValueError) as err:
                    _problem(problems, str(config.embeds_folder), str(err), "validation_users")
        return TrainableData(pairs, pairs.chosen_captions, mean, std,
                             validation_users=users if config.validation_steps else [],
                             validation_embeds=torch.stack(embeds) if embeds else torch.empty(0, dim))

    def build(self, unet, config, data):
        adapter = build_adapter(unet, data.embed_mean.shape[0], config)
        if config.init_adapter is not None:  # a resumed checkpoint's weights replace these in train()
            # an adapter without a text edit may start one that has it: the edit keeps its fresh identity init
            adapter.load_state_dict({**adapter.state_dict(), **init_adapter_state(config.init_adapter, unet)})
        adapter.set_embedding_stats(torch.from_numpy(data.embed_mean), torch.from_numpy(data.embed_std))
        return adapter.attach(unet)

    def save(self, module, state, output_dir, info, sdxl):
        from psalign.adapter import PSAAdapter
        from psalign.formats import PSA_WEIGHTS_NAME

        final = PSAAdapter(module.config)
        final.load_state_dict(state)
        final.save_pretrained(output_dir, extra=info)
        return Path(output_dir) / PSA_WEIGHTS_NAME


class LoRAKind(TrainableKind):
    """A PEFT LoRA on the UNet (a SafetyDPO safety expert), on expert pairs without users."""

    name = "lora"
    label = "LoRA"
    written = "LoRA expert"

    def config_problems(self, config):
        problems = [(name, "not supported with trainable lora")
                    for name in ("precompute", "validation_steps", "init_adapter", "text_edit_layers")
                    if getattr(config, name)]
        if config.objective == "kv_anchor":
            problems.append(("objective", "kv_anchor trains a PSA adapter's user text edit; not supported with "
                                          "trainable lora"))
        return problems

    def locate_data(self, config, problems):
        metadata = Path(config.train_data)
        if not metadata.is_file():
            _problem(problems, str(config.train_data),
                     f"{metadata} not found: --train_data must be an expert_pairs.jsonl for a LoRA", "train_data")
            return DataLocation(None)
        problems += expert_data_problems(metadata)
        return DataLocation(metadata)

    def read_data(self, config, location, resume, problems):
        from psalign.safetydpo.data import ExpertPairDataset

        pairs = ExpertPairDataset(location.metadata, resolution=config.resolution, random_crop=config.random_crop,
                                  random_flip=config.random_flip)
        problems += lora_checkpoint_problems(resume)
        return TrainableData(pairs, [pair.chosen_caption for pair in pairs.pairs])

    def build(self, unet, config, data):
        from .lora import UNetLoRA

        with torch.random.fork_rng(devices=[]):  # seeded LoRA init; the global RNG is left alone
            torch.manual_seed(config.seed)
            return UNetLoRA(unet, config.lora_rank, config.lora_alpha)

    def save(self, module, state, output_dir, info, sdxl):
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        path = module.save_pretrained(output_dir, StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline, state)
        with atomic_write(Path(output_dir) / TRAINING_INFO_NAME) as handle:
            json.dump(info, handle, indent=2)
        return path


#: Every kind of trainable weights, by its ``trainable`` config value.
TRAINABLE_KINDS: dict[str, TrainableKind] = {kind.name: kind for kind in (AdapterKind(), LoRAKind())}


# -------------------------------------------------------------------------------- the adapter's checks


def lora_checkpoint_problems(resume: checkpoints.CheckpointInfo | None) -> list[InputProblem]:
    """A resumed checkpoint that holds other weights than LoRA factors."""
    if resume is None:
        return []
    if any(not name.startswith("factors.") for name in resume.model_shapes):
        return [InputProblem(str(resume.path / checkpoints.MODEL_FILE), 0, "holds no LoRA factors (a PSA adapter "
                             "checkpoint?)", "resume_from_checkpoint")]
    return []


def adapter_checkpoint_problems(resume: checkpoints.CheckpointInfo | None, user_embed_dim: int,
                                text_edit_layers: int) -> list[InputProblem]:
    """A resumed checkpoint that holds no PSA adapter, or one for another user embedding dimension
    or with another number of text edit blocks."""
    if resume is None:
        return []
    where, shapes = str(resume.path / checkpoints.MODEL_FILE), resume.model_shapes
    projection = shapes.get("user_proj.proj.weight")
    if projection is None or len(projection) != 2:
        return [InputProblem(where, 0, "holds no PSA adapter weights (a LoRA checkpoint?)", "resume_from_checkpoint")]
    if projection[1] != user_embed_dim:
        return [InputProblem(where, 0, f"the adapter takes user embeddings of dimension {projection[1]}, but the "
                                       f"training embeddings have {user_embed_dim}", "resume_from_checkpoint")]
    saved_blocks = len({key.split(".")[2] for key in shapes if key.startswith("text_edit.blocks.")})
    if saved_blocks != text_edit_layers:
        return [InputProblem(where, 0, f"the adapter has a text edit of {saved_blocks} block(s), but "
                                       f"text_edit_layers is {text_edit_layers}", "resume_from_checkpoint")]
    return []


def init_adapter_problems(config: "TrainingConfig", user_embed_dim: int) -> list[InputProblem]:
    """An ``init_adapter`` that cannot initialise this run's adapter: unreadable, or another user
    embedding dimension or number of user tokens (read from its headers; nothing is loaded)."""
    from psalign.adapter import inspect_adapter

    if config.init_adapter is None:
        return []
    where = str(config.init_adapter)
    try:
        summary = inspect_adapter(config.init_adapter)
    except (OSError, ValueError) as error:
        return [InputProblem(where, 0, str(error), "init_adapter")]
    problems = []
    if summary.user_embed_dim != user_embed_dim:
        problems.append(InputProblem(where, 0, f"the adapter takes user embeddings of dimension "
                                               f"{summary.user_embed_dim}, but the training embeddings have "
                                               f"{user_embed_dim}", "init_adapter"))
    if summary.num_user_tokens != config.num_user_tokens:
        problems.append(InputProblem(where, 0, f"the adapter has {summary.num_user_tokens} user token(s), but "
                                               f"num_user_tokens is {config.num_user_tokens}", "init_adapter"))
    if summary.text_edit_layers not in (0, config.text_edit_layers):
        problems.append(InputProblem(where, 0, f"the adapter has a text edit of {summary.text_edit_layers} layer(s), "
                                               f"but text_edit_layers is {config.text_edit_layers}", "init_adapter"))
    return problems


def init_adapter_state(path: str | Path, unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights of the adapter at ``path`` (a psalign folder or a published checkpoint), checked
    against ``unet``'s cross-attention layers; :class:`InputError` naming ``init_adapter`` when they differ."""
    from psalign.adapter import PSAAdapter, convert_published_checkpoint, inspect_adapter
    from psalign.io import InputError

    summary = inspect_adapter(path)
    try:
        if summary.layout == "psalign":
            source = PSAAdapter.from_pretrained(path)
        else:
            source = convert_published_checkpoint(path, unet)
        source.check_unet(unet)
    except ValueError as error:
        raise InputError([InputProblem(str(path), 0, str(error), "init_adapter")]) from None
    return source.state_dict()


def build_adapter(unet: torch.nn.Module, user_embed_dim: int, config: "TrainingConfig") -> "PSAAdapter":
    """A fresh fp32 adapter for ``unet``, initialised from ``config.seed`` (the global RNG is left alone)."""
    from psalign.adapter import PSAAdapter

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return PSAAdapter.for_unet(unet, user_embed_dim, num_user_tokens=config.num_user_tokens,
                                   sdxl_micro_conditioning=config.sdxl_micro_conditioning,
                                   text_edit_layers=config.text_edit_layers)
