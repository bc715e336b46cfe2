"""Optional cache of VAE latents and text conditioning, computed once and reused every epoch.

Layout of ``cache_dir``:

* ``cache_info.json``: what the cache was made from (model, resolution, augmentation, seed, the
  metadata file's SHA-256, ...); a cache made from anything else is refused, never mixed;
* ``pairs-<k>-of-<n>.safetensors``: pairs ``[k*P, (k+1)*P)`` (``P`` = :data:`PAIRS_PER_FILE`):
  ``chosen_latents``, ``rejected_latents`` (P, C, h, w), ``prompt_embeds`` (P, L, d_c),
  ``pooled_embeds`` (P, d_p, SDXL only), ``original_size`` and ``crop_top_left`` (P, 2) int64;
  for the safe-anchor objectives also ``chosen_prompt_embeds`` (and ``chosen_pooled_embeds``),
  the conditioning of the caption that drew the chosen image;
* ``empty.safetensors``: the empty prompt's conditioning (one row).

File ``k`` is written by process ``k mod num_processes``, atomically, and skipped when present,
so an interrupted precompute resumes. Each pair keeps the crop/flip it was drawn with in epoch 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from psalign.io import atomic_path, atomic_write, file_sha256

from .conditioning import FrozenTextEncoders, TextConditioning, vae_latents
from .objectives import OBJECTIVES
from .data import SeededPairs, collate_pairs

CACHE_INFO = "cache_info.json"
EMPTY_FILE = "empty.safetensors"
#: Pairs per cache file (the unit of sharding and of resuming).
PAIRS_PER_FILE = 32
CACHE_FORMAT_VERSION = 1



def cache_files(cache_dir: str | Path, num_pairs: int) -> list[Path]:
    """The pair files of a cache of ``num_pairs`` pairs, in order."""
    count = -(-num_pairs // PAIRS_PER_FILE)
    return [Path(cache_dir) / f"pairs-{k:05d}-of-{count:05d}.safetensors" for k in range(count)]


def check_cache_info(cache_dir: str | Path, info: dict) -> None:
    """Raise ``ValueError`` naming the differences when ``cache_dir`` was made from other inputs."""
    path = Path(cache_dir) / CACHE_INFO
    if not path.is_file():
        return
    stored = json.loads(path.read_text(encoding="utf-8"))
    differs = sorted(k for k in set(stored) | set(info) if stored.get(k) != info.get(k))
    if differs:
        shown = "; ".join(f"{k}: cache {stored.get(k)!r}, now {info.get(k)!r}" for k in differs)
        raise ValueError(f"the cache {cache_dir} was made from other inputs ({shown}); delete it or set --cache_dir")


def write_cache_info(cache_dir: str | Path, info: dict) -> None:
    with atomic_write(Path(cache_dir) / CACHE_INFO) as handle:
        json.dump(info, handle, indent=2)


def cache_info(config, model_type: str, metadata: Path, num_pairs: int) -> dict:
    """What a cache depends on (compared with :func:`check_cache_info`)."""
    info = {
        "format_version": CACHE_FORMAT_VERSION,
        "pretrained_model": str(config.pretrained_model),
        "model_type": model_type,
        "mixed_precision": config.mixed_precision,
        "resolution": config.resolution,
        "random_crop": config.random_crop,
        "random_flip": config.random_flip,
        "seed": config.seed,
        "metadata_sha256": file_sha256(metadata),
        "num_pairs": num_pairs,
    }
    if OBJECTIVES[config.objective].needs_chosen_caption:
        info["chosen_caption_embeds"] = True
    return info


@torch.no_grad()
def precompute_cache(
    cache_dir: str | Path,
    pairs: SeededPairs,
    vae: torch.nn.Module,
    text_encoders: FrozenTextEncoders,
    process_index: int,
    num_processes: int,
    batch_size: int,
    num_workers: int = 0,
    chosen_captions: bool = False,
) -> int:
    """Write this process's missing cache files (and, on process 0, ``empty.safetensors``);
    ``chosen_captions``: also encode each pair's ``chosen_caption``.

    Returns the number of files written. The caller waits for every process afterwards.
    """
    cache_dir = Path(cache_dir)
    files = cache_files(cache_dir, len(pairs))
    mine = [k for k in range(len(files)) if k % num_processes == process_index and not files[k].is_file()]
    if process_index == 0 and not (cache_dir / EMPTY_FILE).is_file():
        empty = text_encoders.empty()
        _save(cache_dir / EMPTY_FILE, _text_tensors(empty))
    for k in tqdm(mine, desc=f"precompute (process {process_index})", unit="file", disable=not mine):
        indices = list(range(k * PAIRS_PER_FILE, min((k + 1) * PAIRS_PER_FILE, len(pairs))))
        chunks = [[(0, i) for i in indices[s : s + batch_size]] for s in range(0, len(indices), batch_size)]
        loader = DataLoader(
            pairs,
            batch_sampler=chunks,
            collate_fn=collate_pairs,
            num_workers=num_workers,
            generator=torch.Generator().manual_seed(k),  # keeps the DataLoader off the global RNG
        )
        parts: dict[str, list[torch.Tensor]] = {}
        for batch in loader:
            tensors = {
                "chosen_latents": vae_latents(vae, batch["chosen"]),
                "rejected_latents": vae_latents(vae, batch["rejected"]),
                **_text_tensors(text_encoders.encode(batch["caption"])),
                "original_size": batch["original_size"],
                "crop_top_left": batch["crop_top_left"],
            }
            if chosen_captions:
                chosen = _text_tensors(text_encoders.encode(batch["chosen_caption"]))
                tensors.update({f"chosen_{name}": tensor for name, tensor in chosen.items()})
            for name, tensor in tensors.items():
                parts.setdefault(name, []).append(tensor.cpu())
        _save(files[k], {name: torch.cat(values) for name, values in parts.items()})
    return len(mine)


def _text_tensors(text: TextConditioning) -> dict[str, torch.Tensor]:
    tensors = {"prompt_embeds": text.prompt_embeds}
    if text.pooled_embeds is not None:
        tensors["pooled_embeds"] = text.pooled_embeds
    return tensors


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))


def load_empty_conditioning(cache_dir: str | Path) -> TextConditioning:
    """The empty prompt's conditioning stored in the cache."""
    with safe_open(str(Path(cache_dir) / EMPTY_FILE), framework="pt") as handle:
        names = set(handle.keys())
        pooled = handle.get_tensor("pooled_embeds") if "pooled_embeds" in names else None
        return TextConditioning(handle.get_tensor("prompt_embeds"), pooled)


class CachedPairs(Dataset):
    """Cached pairs with their users: item ``index`` holds the cache tensors of that pair plus
    ``user_id`` and ``user_embed`` (D,). Files are opened lazily (memory-mapped) in each process."""

    def __init__(self, cache_dir: str | Path, user_ids: list[str], user_embeds: dict[str, torch.Tensor]):
        self.files = cache_files(cache_dir, len(user_ids))
        missing = [str(f) for f in self.files if not f.is_file()]
        if not (Path(cache_dir) / EMPTY_FILE).is_file():
            missing.append(str(Path(cache_dir) / EMPTY_FILE))
        if missing:
            raise FileNotFoundError(f"the cache in {cache_dir} is incomplete; missing: {', '.join(missing[:5])}")
        self.user_ids = user_ids
        self.user_embeds = user_embeds
        self._handles: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.user_ids)

    def __getitem__(self, index: int) -> dict:
        k, row = divmod(index, PAIRS_PER_FILE)
        if k not in self._handles:
            self._handles[k] = safe_open(str(self.files[k]), framework="pt")
        handle = self._handles[k]
        item = {name: handle.get_slice(name)[row] for name in handle.keys()}
        item["original_size"] = tuple(item["original_size"].tolist())
        item["crop_top_left"] = tuple(item["crop_top_left"].tolist())
        user_id = self.user_ids[index]
        return {**item, "user_id": user_id, "user_embed": self.user_embeds[user_id]}
