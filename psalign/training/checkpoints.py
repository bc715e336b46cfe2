"""Training checkpoints (``<output_dir>/checkpoint-<step>``) in psalign's own format, and the run folder.

A checkpoint folder holds only these files, none of which is read with a full unpickle:

* ``training_progress.json``: format and version, optimizer steps done, the run id and the
  number of processes that wrote it;
* ``model.safetensors``: the trainable weights;
* ``optimizer.pt``, ``scheduler.pt`` (and ``scaler.pt`` under fp16): state dicts of tensors and
  numbers, written with ``torch.save`` and read with the weights-only unpickler
  (:func:`psalign.safe_load.load_weights_only`);
* ``rng_state_<process>.safetensors``: each process's Python, NumPy, torch CPU and CUDA RNG states.

:func:`inspect_checkpoint` refuses a folder holding any other file (an Accelerate
``custom_checkpoint_0.pkl`` or ``random_states_0.pkl``, say) before anything is loaded.

A checkpoint is written to ``checkpoint-<step>.partial`` and renamed when every process has
finished writing, so a crash while saving never leaves a folder that ``latest`` would pick. Each
checkpoint records its run's id; rotation (``checkpoints_total_limit``) deletes only checkpoints
of the current run.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from psalign.formats import LORA_WEIGHTS_NAME, PSA_CONFIG_NAME, PSA_WEIGHTS_NAME, TRAINING_INFO_NAME
from psalign.io import atomic_path, atomic_write
from psalign.safe_load import TensorFileError, load_weights_only

PREFIX = "checkpoint-"
_NAME = re.compile(rf"{PREFIX}(\d+)")
_PARTIAL_NAME = re.compile(rf"{PREFIX}(\d+)\.partial")

PROGRESS_FILE = "training_progress.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
SCALER_FILE = "scaler.pt"
_RNG_NAME = re.compile(r"rng_state_(\d+)\.safetensors")
CHECKPOINT_FORMAT = "psalign-training-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1

#: The run's metrics log, one JSON line per optimizer step.
METRICS_FILE = Path("logs") / "metrics.jsonl"
#: What a run writes into its output folder besides checkpoints and validation grids.
RUN_OUTPUT_FILES = (METRICS_FILE, Path(PSA_CONFIG_NAME), Path(PSA_WEIGHTS_NAME), Path(LORA_WEIGHTS_NAME),
                    Path(TRAINING_INFO_NAME))
VALIDATION_DIR = "validation"


class CheckpointError(ValueError):
    """A checkpoint folder psalign does not load: a foreign or unsafe file, or a missing or corrupt one."""


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"{PREFIX}{step}"


def partial_path(output_dir: str | Path, step: int) -> Path:
    """Where checkpoint ``step`` is written before it is complete."""
    return Path(output_dir) / f"{PREFIX}{step}.partial"


def rng_state_name(process_index: int) -> str:
    return f"rng_state_{process_index}.safetensors"


def new_run_id() -> str:
    """A fresh run's id (recorded in each of its checkpoints)."""
    return uuid.uuid4().hex


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``output_dir`` as ``(step, path)``, oldest first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        match = _NAME.fullmatch(child.name)
        if match and child.is_dir():
            found.append((int(match[1]), child))
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def resolve_resume(resume_from_checkpoint: str | None, output_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: None (fresh run), ``latest`` (None when there is none yet),
    or a folder, which must exist (``FileNotFoundError``)."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        return latest_checkpoint(output_dir)
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder {path} not found")
    return path


# --------------------------------------------------------------------------------------------
# Writing


#: The RNG states every ``rng_state_<process>.safetensors`` holds (plus ``cuda_<device>`` on GPUs).
RNG_STATE_KEYS = ("python", "python_gauss_next", "numpy_keys", "numpy_position", "numpy_cached_gaussian", "torch")


def _rng_tensors() -> dict[str, torch.Tensor]:
    """This process's RNG states (Python, NumPy, torch CPU, every CUDA device) as tensors."""
    version, internal, gauss_next = random.getstate()
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    if kind != "MT19937":
        raise ValueError(f"NumPy's global RNG is {kind}; checkpoints store MT19937 states only")
    tensors = {
        "python": torch.tensor([version, *internal], dtype=torch.int64),
        "python_gauss_next": torch.tensor([] if gauss_next is None else [gauss_next], dtype=torch.float64),
        "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
        "numpy_position": torch.tensor([position, has_gauss], dtype=torch.int64),
        "numpy_cached_gaussian": torch.tensor([cached_gaussian], dtype=torch.float64),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{index}"] = state
    return tensors


def write_rng_state(folder: str | Path, process_index: int) -> None:
    """Write this process's RNG states into the checkpoint folder (every process calls it)."""
    with atomic_path(Path(folder) / rng_state_name(process_index), suffix=".safetensors") as tmp:
        save_file(_rng_tensors(), str(tmp))


def restore_rng_state(tensors: dict[str, torch.Tensor]) -> None:
    """Set this process's RNGs to the states :func:`write_rng_state` stored."""
    python = tensors["python"].tolist()
    gauss = tensors["python_gauss_next"].tolist()
    random.setstate((python[0], tuple(python[1:]), gauss[0] if gauss else None))
    position, has_gauss = tensors["numpy_position"].tolist()
    np.random.set_state(("MT19937", tensors["numpy_keys"].numpy().astype(np.uint32), position, has_gauss,
                         float(tensors["numpy_cached_gaussian"][0])))
    torch.set_rng_state(tensors["torch"])
    cuda = sorted((int(name.removeprefix("cuda_")), state) for name, state in tensors.items()
                  if name.startswith("cuda_"))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([state for _, state in cuda][: torch.cuda.device_count()])


def write_checkpoint_files(
    folder: str | Path,
    model: dict[str, torch.Tensor],
    optimizer: dict,
    scheduler: dict,
    scaler: dict | None,
    global_step: int,
    run_id: str,
    num_processes: int,
) -> None:
    """Write the shared part of a checkpoint (the main process calls it; RNG states are per process)."""
    folder = Path(folder)
    with atomic_path(folder / MODEL_FILE, suffix=".safetensors") as tmp:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in model.items()}, str(tmp))
    for name, state in ((OPTIMIZER_FILE, optimizer), (SCHEDULER_FILE, scheduler), (SCALER_FILE, scaler)):
        if state is not None:
            with atomic_path(folder / name, suffix=".pt") as tmp:
                torch.save(state, tmp)
    progress = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "global_step": global_step,
        "run_id": run_id,
        "num_processes": num_processes,
    }
    with atomic_write(folder / PROGRESS_FILE) as handle:
        json.dump(progress, handle, indent=2)


def finish_checkpoint(output_dir: str | Path, step: int, total_limit: int | None, run_id: str) -> Path:
    """Rename the written ``.partial`` folder to ``checkpoint-<step>``, then delete this run's oldest
    checkpoints beyond ``total_limit`` (the new one always stays; other runs' are never touched).
    Main process only."""
    final = checkpoint_path(output_dir, step)
    if final.exists():  # saved at this step by an earlier, interrupted attempt
        shutil.rmtree(final)
    os.replace(partial_path(output_dir, step), final)
    if total_limit is not None:
        mine = [path for _, path in list_checkpoints(output_dir) if checkpoint_run_id(path) == run_id]
        for old in mine[: max(len(mine) - total_limit, 0)]:
            shutil.rmtree(old)
    return final


# --------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class CheckpointInfo:
    """What :func:`inspect_checkpoint` found in a checkpoint folder."""

    path: Path
    global_step: int
    run_id: str
    num_processes: int
    model_shapes: dict[str, tuple[int, ...]]


@dataclass
class TrainingState:
    """A checkpoint read back for one process: every state to restore."""

    info: CheckpointInfo
    model: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    scaler: dict | None
    rng: dict[str, torch.Tensor]


def _read_progress(folder: Path) -> dict:
    path = folder / PROGRESS_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {PROGRESS_FILE}: psalign did not write it")
    try:
        progress = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(progress, dict) or progress.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a psalign training checkpoint record")
    if progress.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {progress.get('format_version')!r} is not "
                              f"the one this psalign reads ({CHECKPOINT_FORMAT_VERSION})")
    for key in ("global_step", "num_processes"):
        if isinstance(progress.get(key), bool) or not isinstance(progress.get(key), int) or progress[key] < 0:
            raise CheckpointError(f"{path}: {key} must be a whole number >= 0, got {progress.get(key)!r}")
    if not isinstance(progress.get("run_id"), str) or not progress["run_id"]:
        raise CheckpointError(f"{path}: run_id must be a non-empty string")
    return progress


def checkpoint_run_id(folder: str | Path) -> str | None:
    """The run id a checkpoint records, or None when it has no readable progress record."""
    try:
        return _read_progress(Path(folder))["run_id"]
    except CheckpointError:
        return None


def _expected_files(num_processes: int) -> set[str]:
    return {PROGRESS_FILE, MODEL_FILE, OPTIMIZER_FILE, SCHEDULER_FILE, SCALER_FILE,
            *(rng_state_name(i) for i in range(num_processes))}


def _load_model_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file ({error})") from None


def _load_rng_file(path: Path) -> dict[str, torch.Tensor]:
    tensors = _load_model_file(path)
    missing = sorted(set(RNG_STATE_KEYS) - set(tensors))
    if missing:
        raise CheckpointError(f"{path} lacks the RNG states {', '.join(missing)}")
    return tensors


def _load_state_file(path: Path, mmap: bool) -> Any:
    try:
        state = load_weights_only(path, mmap=mmap)
    except TensorFileError as error:
        raise CheckpointError(str(error)) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    return state


def _shown(names: list[str], limit: int = 3) -> str:
    """Up to ``limit`` file names, pickles first."""
    pickles_first = sorted(names, key=lambda name: Path(name).suffix not in (".pkl", ".pickle", ".bin", ".pt", ".pth"))
    if not pickles_first:
        return "nothing"
    return ", ".join(pickles_first[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def inspect_checkpoint(folder: str | Path) -> CheckpointInfo:
    """Check a checkpoint folder without loading any model: only psalign's files, each readable with a
    safe loader, a progress record, finite weights and one RNG state per process that wrote it.

    Raises :class:`CheckpointError` with one sentence naming the file.
    """
    folder = Path(folder)
    names = sorted(p.name for p in folder.iterdir())
    if PROGRESS_FILE not in names:
        raise CheckpointError(
            f"{folder} was not written by psalign (it has no {PROGRESS_FILE}; it holds {_shown(names)}); "
            "psalign loads only its own checkpoint files and never unpickles any other file"
        )
    progress = _read_progress(folder)
    expected = _expected_files(progress["num_processes"])
    foreign = [name for name in names if name not in expected]
    if foreign:
        raise CheckpointError(
            f"{folder} holds {_shown(foreign)}, which psalign does not write; psalign loads only its own "
            "checkpoint files and never unpickles any other file"
        )
    missing = sorted(name for name in expected - {SCALER_FILE} if not (folder / name).is_file())
    if missing:
        raise CheckpointError(f"{folder} is incomplete: {', '.join(missing)} missing")
    model = _load_model_file(folder / MODEL_FILE)
    bad = sorted(name for name, tensor in model.items() if not torch.isfinite(tensor).all())
    if bad:
        raise CheckpointError(f"{folder / MODEL_FILE}: the weights are not finite ({', '.join(bad[:3])})")
    for name in (OPTIMIZER_FILE, SCHEDULER_FILE, SCALER_FILE):
        if (folder / name).is_file():
            _load_state_file(folder / name, mmap=True)
    for index in range(progress["num_processes"]):
        _load_rng_file(folder / rng_state_name(index))
    return CheckpointInfo(folder, progress["global_step"], progress["run_id"], progress["num_processes"],
                          {name: tuple(tensor.shape) for name, tensor in model.items()})


def read_training_state(folder: str | Path, process_index: int, num_processes: int) -> TrainingState:
    """Every state of a checkpoint for process ``process_index`` of ``num_processes``, through safe
    loaders only (:func:`inspect_checkpoint` first)."""
    info = inspect_checkpoint(folder)
    if info.num_processes != num_processes:
        raise CheckpointError(
            f"{info.path} was written by {info.num_processes} process(es); resume it with as many "
            f"(this run has {num_processes}), or the data order and random draws would differ"
        )
    scaler = info.path / SCALER_FILE
    return TrainingState(
        info=info,
        model=_load_model_file(info.path / MODEL_FILE),
        optimizer=_load_state_file(info.path / OPTIMIZER_FILE, mmap=False),
        scheduler=_load_state_file(info.path / SCHEDULER_FILE, mmap=False),
        scaler=_load_state_file(scaler, mmap=False) if scaler.is_file() else None,
        rng=_load_rng_file(info.path / rng_state_name(process_index)),
    )


def _is_good_checkpoint(folder: Path, run_id: str) -> bool:
    try:
        return inspect_checkpoint(folder).run_id == run_id
    except CheckpointError:
        return False


def last_good_checkpoint(output_dir: str | Path, run_id: str) -> Path | None:
    """The newest checkpoint of run ``run_id`` that :func:`inspect_checkpoint` accepts (finite weights
    included), or None."""
    return next((path for _, path in reversed(list_checkpoints(output_dir)) if _is_good_checkpoint(path, run_id)), None)


# --------------------------------------------------------------------------------------------
# The run folder


def earlier_run_outputs(output_dir: str | Path) -> list[Path]:
    """What an earlier run left in ``output_dir``: checkpoints (complete or partial), the metrics log,
    validation grids and final weights. Inputs and the precompute cache are not counted."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [child for child in sorted(folder.iterdir())
             if _NAME.fullmatch(child.name) or _PARTIAL_NAME.fullmatch(child.name)]
    found += [folder / name for name in RUN_OUTPUT_FILES if (folder / name).exists()]
    found += sorted((folder / VALIDATION_DIR).glob("step-*.png"))
    return found


def remove_earlier_run(output_dir: str | Path) -> list[Path]:
    """Delete :func:`earlier_run_outputs` (``--overwrite_output_dir``); returns what was deleted."""
    removed = earlier_run_outputs(output_dir)
    for path in removed:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return removed


def describe_paths(paths: list[Path], root: str | Path, limit: int = 3) -> str:
    """``a, b, c and N more``: paths relative to ``root``."""
    names = [str(p.relative_to(root)) for p in paths[:limit]]
    return ", ".join(names) + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def output_dir_problem(output_dir: str | Path, resume: CheckpointInfo | None, overwrite: bool) -> str | None:
    """Why a run may not write into ``output_dir`` (one sentence), or None.

    Refused: a file, or a folder that cannot be created or written; for a fresh start (``resume``
    None), a folder holding an earlier run unless ``overwrite``; when resuming, a folder holding
    checkpoints of another run.
    """
    folder = Path(output_dir)
    if folder.exists() and not folder.is_dir():
        return f"{folder} is a file, not a folder"
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        return f"{existing} is a file, so {folder} cannot be created"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    if resume is None:
        earlier = earlier_run_outputs(folder)
        if not earlier or overwrite:
            return None
        found = describe_paths(earlier, folder)
        if list_checkpoints(folder):
            return (f"{folder} holds an earlier run ({found}); resume it with --resume_from_checkpoint latest, "
                    "start afresh with --overwrite_output_dir (deletes that run), or choose another --output_dir")
        return (f"{folder} holds an earlier run with no checkpoint to resume ({found}); start afresh with "
                "--overwrite_output_dir (deletes that run) or choose another --output_dir")
    others = [path for _, path in list_checkpoints(folder) if checkpoint_run_id(path) != resume.run_id]
    if others:
        return (f"{folder} holds checkpoints of another run than {resume.path} ({describe_paths(others, folder)}); "
                "resume into that run's own output folder, or choose another --output_dir")
    return None
