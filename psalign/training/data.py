"""Training data order and batches: reproducible whatever the process count, workers or resume point.

* The order of epoch ``e`` is a permutation seeded by ``(seed, e)``; each global batch of
  ``batch_size x num_processes`` pairs is split between the processes (the last incomplete
  global batch of an epoch is dropped).
* Pair ``i`` in epoch ``e`` is loaded with torch's generator seeded by ``(seed, e, i)`` (the
  dataset's random crop and flip), inside ``fork_rng``, so the training RNG is never touched.

A run resumed at optimizer step ``s`` therefore sees exactly the pairs, crops and flips that
the uninterrupted run saw after step ``s``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

METADATA_NAME = "metadata.jsonl"


def resolve_train_data(train_data: str | Path) -> tuple[Path, Path]:
    """``(metadata.jsonl, image root)`` of ``--train_data`` (the file, or a folder holding it)."""
    path = Path(train_data)
    metadata = path / METADATA_NAME if path.is_dir() else path
    if not metadata.is_file():
        raise FileNotFoundError(f"{metadata} not found: --train_data must be a metadata.jsonl or a folder holding one")
    return metadata, metadata.parent


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of pair ``index`` in ``epoch`` (a 63-bit mix of the three)."""
    mixed = (seed * 1_000_003 + epoch) * 998_244_353 + index
    return mixed % (2**63 - 1)


class SeededPairs(Dataset):
    """Wraps a pair dataset; item ``(epoch, index)`` is ``dataset[index]`` drawn under :func:`item_seed`."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(item_seed(self.seed, epoch, index))
            item = self.dataset[index]
        return {**item, "index": index}


def batches_per_epoch(num_items: int, batch_size: int, num_processes: int) -> int:
    """Micro-batches each process gets per epoch."""
    return num_items // (batch_size * num_processes)


def epoch_batches(
    num_items: int, batch_size: int, epoch: int, seed: int, process_index: int, num_processes: int
) -> list[list[tuple[int, int]]]:
    """This process's micro-batches of ``epoch``: lists of ``(epoch, index)`` keys."""
    generator = torch.Generator().manual_seed(item_seed(seed, epoch, -1) % (2**63 - 1))
    order = torch.randperm(num_items, generator=generator).tolist()
    step = batch_size * num_processes
    batches = []
    for start in range(0, batches_per_epoch(num_items, batch_size, num_processes) * step, step):
        mine = order[start + process_index * batch_size : start + (process_index + 1) * batch_size]
        batches.append([(epoch, i) for i in mine])
    return batches


def collate_pairs(items: list[dict]) -> dict:
    """Stack dataset items: tensors along a new batch dim; strings as lists; sizes as (B, 2) int64."""
    batch: dict = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if torch.is_tensor(values[0]):
            batch[key] = torch.stack(values)
        elif key in ("original_size", "crop_top_left", "index"):
            batch[key] = torch.tensor(values, dtype=torch.int64)
        else:
            batch[key] = values
    return batch


def micro_batches(
    dataset: SeededPairs,
    batch_size: int,
    seed: int,
    process_index: int,
    num_processes: int,
    start: int,
    num_workers: int = 0,
) -> Iterator[dict]:
    """Endless stream of this process's collated micro-batches, from micro-batch ``start`` on."""
    per_epoch = batches_per_epoch(len(dataset), batch_size, num_processes)
    if per_epoch == 0:
        raise ValueError(
            f"{len(dataset)} pairs are fewer than one global batch "
            f"({batch_size} per process x {num_processes} processes)"
        )
    epoch, offset = divmod(start, per_epoch)
    while True:
        batches = epoch_batches(len(dataset), batch_size, epoch, seed, process_index, num_processes)[offset:]
        loader = DataLoader(
            dataset,
            batch_sampler=batches,
            num_workers=num_workers,
            collate_fn=collate_pairs,
            generator=torch.Generator().manual_seed(seed),  # keeps the DataLoader off the global RNG
        )
        yield from loader
        epoch, offset = epoch + 1, 0
