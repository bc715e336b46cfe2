"""Personalized generation from prompt records: seeds, user embeddings, batches, resumable output."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from psalign.embeddings import (
    DEFAULT_PROFILE_TEMPLATE,
    UserEncoder,
    find_user_embedding,
    load_user_embedding,
    profile_text,
    read_embedding_info,
    save_user_embedding,
)
from psalign.io import InputError, InputProblem, atomic_path, atomic_write

from .grid import contact_sheet
from .records import PromptRecord

if TYPE_CHECKING:
    from psalign.methods import Method

LOG_NAME = "generation_log.jsonl"


@dataclass
class GenerationSettings:
    """Sampling settings shared by every record of a run (logged with each image)."""

    seed: int = 0
    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    negative_prompt: str | None = None
    height: int | None = None
    width: int | None = None


def sample_seed(seed: int, file_name: str) -> int:
    """A per-image seed from the run seed and the record's file name: independent of batch size,
    batch position and number of processes."""
    digest = hashlib.sha256(f"{seed}:{file_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


def record_seed(seed: int, record: PromptRecord) -> int:
    """The seed ``record`` is drawn from: its own ``seed`` if the line gives one, else :func:`sample_seed`."""
    return record.seed if record.seed is not None else sample_seed(seed, record.file_name)


def user_embeddings(
    records: Sequence[PromptRecord],
    embeds_folder: str | Path | None,
    make_encoder: Callable[[], UserEncoder] | None,
    save_new: bool = True,
) -> dict[str, np.ndarray]:
    """One float32 (D,) embedding per distinct user of ``records`` (keyed by ``RecordUser.key``).

    Stored embeddings are read from ``embeds_folder``; the others are computed from their profiles
    with the encoder (made only when needed, batched), with the profile template recorded in the
    folder's ``embedding_info.json`` (the default template without one), and, with ``save_new``,
    written to ``embeds_folder`` when the user has an id.
    """
    users = {r.user.key: r.user for r in records if r.user is not None}
    out: dict[str, np.ndarray] = {}
    to_encode = []
    for key, user in users.items():
        if embeds_folder is not None and user.user_id and find_user_embedding(embeds_folder, user.user_id):
            out[key] = load_user_embedding(embeds_folder, user.user_id)
        else:
            to_encode.append(user)
    if to_encode:
        if make_encoder is None:
            raise ValueError(f"{len(to_encode)} user(s) need an embedding computed but no encoder was given")
        info = read_embedding_info(embeds_folder) if embeds_folder is not None else None
        template = info["template"] if info and "template" in info else DEFAULT_PROFILE_TEMPLATE
        encoder = make_encoder()
        vectors = encoder.encode([profile_text(u.profile, template) for u in to_encode])
        for user, vector in zip(to_encode, vectors):
            out[user.key] = np.asarray(vector, dtype=np.float32)
            if save_new and embeds_folder is not None and user.user_id:
                save_user_embedding(embeds_folder, user.user_id, vector)
    dims = {v.shape for v in out.values()}
    if len(dims) > 1:
        raise ValueError(f"user embeddings differ in shape: {sorted(dims)}")
    return out


def shard(records: Sequence[PromptRecord], process_index: int, num_processes: int) -> list[PromptRecord]:
    """This process's records: every ``num_processes``-th, starting at ``process_index``."""
    return list(records[process_index::num_processes])


def generate_images(
    pipe,
    records: Sequence[PromptRecord],
    save_path: str | Path,
    settings: GenerationSettings,
    method: "Method | None" = None,
    batch_size: int = 1,
    overwrite: bool = False,
    run_info: dict | None = None,
    log_name: str = LOG_NAME,
    progress: bool = True,
) -> list[str]:
    """Generate ``records`` in batches with ``method`` (default: the plain pipeline) and write each
    image atomically under ``save_path``.

    Existing images are skipped unless ``overwrite`` (an interrupted run resumes where it
    stopped; :func:`check_resumable` first makes sure they were made the same way). One JSON
    line per image (file, caption, user, seed, sampling settings, method and its parameters,
    ``run_info``) is appended to ``log_name`` in ``save_path``. Returns the file names written.
    """
    from psalign.methods import get_method

    method = method or get_method("base")()
    save_path = Path(save_path)
    log_fields = generation_log_fields(settings, method, run_info)
    if not overwrite:
        check_resumable(save_path, records, log_fields)
    todo = [r for r in records if overwrite or not (save_path / r.file_name).exists()]
    written = []
    size = {k: v for k, v in (("height", settings.height), ("width", settings.width)) if v is not None}
    with tqdm(total=len(todo), desc="images", unit="img", disable=not progress) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            seeds = [record_seed(settings.seed, r) for r in batch]
            kwargs = dict(
                prompt=[r.caption for r in batch],
                negative_prompt=[settings.negative_prompt] * len(batch) if settings.negative_prompt else None,
                num_inference_steps=settings.num_inference_steps,
                guidance_scale=settings.guidance_scale,
                generator=[torch.Generator().manual_seed(s) for s in seeds],
                **size,
            )
            images = method.generate(pipe, batch, kwargs)
            for record, image in zip(batch, images):
                target = save_path / record.file_name
                with atomic_path(target, suffix=target.suffix) as tmp:
                    image.save(tmp)
                written.append(record.file_name)
            _append_log(save_path / log_name, batch, seeds, log_fields)
            bar.update(len(batch))
    return written


def generation_log_fields(settings: GenerationSettings, method: "Method", run_info: dict | None = None) -> dict:
    """What every log line of a run records besides the file's own name, caption, user and seed."""
    return {**asdict(settings), "run_seed": settings.seed, "method": method.name, **method.log_params(),
            **(run_info or {})}


def check_resumable(save_path: str | Path, records: Sequence[PromptRecord], log_fields: dict) -> None:
    """Raise :class:`InputError` when an image of ``records`` already in ``save_path`` was logged
    with another caption or seed than its record, or other settings, method parameters or model
    than ``log_fields`` (resuming would mix two runs in one folder). Reads
    ``generation_log.jsonl`` and unmerged per-process parts.

    A weights path whose ``<key>_sha256`` digest matches is the same weights in a moved or renamed
    folder, and is not a difference."""
    save_path = Path(save_path)
    kept = {r.file_name: {"caption": r.caption, "seed": record_seed(log_fields["run_seed"], r)}
            for r in records if (save_path / r.file_name).exists()}
    if not kept:
        return
    expected = json.loads(json.dumps({k: v for k, v in log_fields.items() if k != "seed"}))  # as logged
    hashed = [k for k in expected if f"{k}_sha256" in expected]
    problems = []
    for path in sorted(save_path.glob("generation_log*.jsonl")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            entry = json.loads(line) if line.strip() else {}
            if entry.get("file_name") not in kept:
                continue
            moved = {k for k in hashed if entry.get(f"{k}_sha256") == expected[f"{k}_sha256"]}
            for key, value in {**expected, **kept[entry["file_name"]]}.items():
                if key in entry and key not in moved and entry[key] != value:
                    problems.append(InputProblem(
                        str(path), number, f"{entry['file_name']} was made with {entry[key]!r}; this run uses {value!r}",
                        key,
                    ))
    if problems:
        shown = problems[:10] + ([InputProblem(str(save_path), 0, f"... and {len(problems) - 10} more")]
                                 if len(problems) > 10 else [])
        raise InputError(shown, header=(
            f"{save_path} holds images made with other settings: resuming would mix two runs "
            "(use another --save_path, or --overwrite to redraw them)"
        ))


def _append_log(path: Path, batch: Sequence[PromptRecord], seeds: Sequence[int], fields: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        for record, seed in zip(batch, seeds):
            entry = {
                "file_name": record.file_name,
                "caption": record.caption,
                "user": record.user.label if record.user else None,
                "user_data": record.data.get("user_data"),
                **fields,
                "seed": seed,
            }
            handle.write(json.dumps(entry) + "\n")


def merge_generation_logs(save_path: str | Path, part_names: Sequence[str]) -> Path:
    """Fold the per-process log parts into ``generation_log.jsonl`` (one line per file name, latest
    wins, sorted), atomically, then delete the parts."""
    save_path = Path(save_path)
    final = save_path / LOG_NAME
    entries = {entry["file_name"]: entry for entry in read_generation_log(save_path)}
    for path in (save_path / p for p in part_names):
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    entry = json.loads(line)
                    entries[entry["file_name"]] = entry
    with atomic_write(final) as handle:
        for name in sorted(entries):
            handle.write(json.dumps(entries[name]) + "\n")
    for part in part_names:
        (save_path / part).unlink(missing_ok=True)
    return final


def read_generation_log(save_path: str | Path) -> list[dict]:
    """The entries of ``<save_path>/generation_log.jsonl`` (empty when there is none)."""
    path = Path(save_path) / LOG_NAME
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_grids(save_path: str | Path, records: Sequence[PromptRecord], by: str) -> list[Path]:
    """One contact sheet per user (``by="user"``: its prompts side by side) or per prompt
    (``by="prompt"``: its users side by side), written to ``<save_path>/grids/``."""
    if by not in ("user", "prompt"):
        raise ValueError(f"grid must be 'user' or 'prompt', got {by!r}")
    save_path = Path(save_path)
    groups: dict[str, list[PromptRecord]] = {}
    for record in records:
        label = record.user.label if record.user else "base"
        groups.setdefault(label if by == "user" else record.caption, []).append(record)
    paths = []
    for index, (name, members) in enumerate(groups.items()):
        images = [Image.open(save_path / r.file_name) for r in members]
        labels = [(r.caption if by == "user" else (r.user.label if r.user else "base")) for r in members]
        sheet = contact_sheet([images], [name], labels)
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)[:60]
        target = save_path / "grids" / f"{by}_{index:03d}_{safe}.png"
        with atomic_path(target, suffix=".png") as tmp:
            sheet.save(tmp)
        paths.append(target)
    return paths
