"""Personalized generation from prompt records: seeds, user embeddings, batches, resumable output."""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
from dataclasses import asdict, dataclass, replace
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
    profile_record,
    profile_text,
    read_embedding_info,
    record_embedding_profiles,
    save_user_embedding,
)
from psalign.io import InputError, InputProblem, append_json_lines, atomic_path, atomic_write, read_json_lines

from .grid import contact_sheet
from .records import GRIDS_FOLDER, LABEL_KEYS, PromptRecord

if TYPE_CHECKING:
    from psalign.methods import Method

LOG_NAME = "generation_log.jsonl"
#: How ``.jpg`` images are saved: PIL's default (quality 75, 4:2:0 chroma) smears small coloured
#: details, e.g. half of the toy world's Sexuality markers become unreadable.
JPEG_OPTIONS = {"quality": 95, "subsampling": 0}


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
    written to ``embeds_folder`` when the user has an id, with the profile they were made from
    recorded in its ``embedding_profiles.jsonl`` (see :data:`~psalign.inference.records.USER_RULE`).
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
        texts = [profile_text(u.profile, template) for u in to_encode]
        vectors = encoder.encode(texts)
        saved = [(user, text, vector) for user, text, vector in zip(to_encode, texts, vectors)
                 if save_new and embeds_folder is not None and user.user_id]
        if saved:
            record_embedding_profiles(embeds_folder, [profile_record(u.profile, text) for u, text, _ in saved])
        for user, vector in zip(to_encode, vectors):
            out[user.key] = np.asarray(vector, dtype=np.float32)
        for user, _, vector in saved:
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
    ``run_info``) is appended to ``log_name`` in ``save_path``.

    An image and its log line are one unit: a batch's images are written to temporary files, its
    log lines are appended and synced, and only then are the images renamed into place. An
    interruption therefore never leaves an image without its log line (a log line whose image is
    missing is harmless: the image is drawn again and logged anew). Returns the file names written.
    """
    from psalign.methods import get_method

    method = method or get_method("base")()
    save_path = Path(save_path)
    settings = with_image_size(settings, pipe)
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
            with contextlib.ExitStack() as renames:  # leaving it renames every image into place
                for record, image in zip(batch, images):
                    if size and image.size != (size["width"], size["height"]):
                        raise RuntimeError(f"{method.name} drew {record.file_name} at {image.width}x{image.height} px, "
                                           f"not the {size['width']}x{size['height']} px asked for")
                    target = save_path / record.file_name
                    options = JPEG_OPTIONS if target.suffix.lower() in (".jpg", ".jpeg") else {}
                    image.save(renames.enter_context(atomic_path(target, suffix=target.suffix)), **options)
                _append_log(save_path / log_name, batch, seeds, log_fields)
            written += [record.file_name for record in batch]
            bar.update(len(batch))
    return written


def with_image_size(settings: GenerationSettings, pipe) -> GenerationSettings:
    """``settings`` with both sides of the image set when only one is: the other is the model's
    default (stock pipelines ignore a height given without a width, and the log must say what was drawn)."""
    if (settings.height is None) == (settings.width is None):
        return settings
    default = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return replace(settings, height=settings.height or default, width=settings.width or default)


def generation_log_fields(settings: GenerationSettings, method: "Method", run_info: dict | None = None) -> dict:
    """What every log line of a run records besides the file's own name, caption, user and seed."""
    return {**asdict(settings), "run_seed": settings.seed, "method": method.name, **method.log_params(),
            **(run_info or {})}


def read_log_file(path: str | Path) -> list[tuple[int, dict]]:
    """The ``(line, entry)`` pairs of one generation log file; :class:`InputError` naming each line
    that is not a JSON object with a ``file_name``. A last line cut short by an interrupted append
    is ignored with a notice: its images were never renamed into place (see :func:`generate_images`)."""
    lines = read_json_lines(path)
    problems = list(lines.problems)
    entries = []
    for number, entry in lines.entries:
        if isinstance(entry, dict) and isinstance(entry.get("file_name"), str):
            entries.append((number, entry))
        else:
            problems.append(InputProblem(str(path), number, "not a log entry (a JSON object with a file_name)"))
    if problems:
        raise InputError(problems, header=f"{path} is corrupt: fix the lines named, or delete them and their images")
    if lines.torn_line is not None:
        print(f"notice: {path}:{lines.torn_line}: ignoring a last line cut short by an interrupted run "
              "(its image was not written)", file=sys.stderr)
    return entries


def check_resumable(save_path: str | Path, records: Sequence[PromptRecord], log_fields: dict) -> None:
    """Raise :class:`InputError` when an image of ``records`` already in ``save_path`` was logged
    with another caption, user or seed than its record, or other settings, method parameters or model
    than ``log_fields`` (resuming would mix two runs in one folder), or was not logged at all (an
    image from elsewhere, or one an older version left unlogged when interrupted). Reads
    ``generation_log.jsonl`` and unmerged per-process parts.

    A weights path whose ``<key>_sha256`` digest matches is the same weights in a moved or renamed
    folder, and is not a difference."""
    save_path = Path(save_path)
    kept = {r.file_name: {"caption": r.caption, "user_data": json.loads(json.dumps(r.data.get("user_data"))),
                          "seed": record_seed(log_fields["run_seed"], r)}
            for r in records if (save_path / r.file_name).exists()}
    if not kept:
        return
    expected = json.loads(json.dumps({k: v for k, v in log_fields.items() if k != "seed"}))  # as logged
    hashed = [k for k in expected if f"{k}_sha256" in expected]
    problems = []
    logged = set()
    for path in sorted(save_path.glob("generation_log*.jsonl")):
        for number, entry in read_log_file(path):
            if entry["file_name"] not in kept:
                continue
            logged.add(entry["file_name"])
            moved = {k for k in hashed if entry.get(f"{k}_sha256") == expected[f"{k}_sha256"]}
            for key, value in {**expected, **kept[entry["file_name"]]}.items():
                if key in entry and key not in moved and entry[key] != value:
                    problems.append(InputProblem(
                        str(path), number, f"{entry['file_name']} was made with {entry[key]!r}; this run uses {value!r}",
                        key,
                    ))
    problems += [
        InputProblem(str(save_path / name), 0, "exists but no generation log here records how it was made")
        for name in kept if name not in logged
    ]
    if problems:
        shown = problems[:10] + ([InputProblem(str(save_path), 0, f"... and {len(problems) - 10} more")]
                                 if len(problems) > 10 else [])
        raise InputError(shown, header=(
            f"{save_path} holds images made with other settings or not logged: resuming would mix two runs "
            "(use another --output_dir, or --overwrite to redraw them)"
        ))


def _append_log(path: Path, batch: Sequence[PromptRecord], seeds: Sequence[int], fields: dict) -> None:
    """Append the batch's log lines in one synced write (see :func:`psalign.io.append_json_lines`)."""
    append_json_lines(path, [
        {
            "file_name": record.file_name,
            "caption": record.caption,
            "user": record.user.label if record.user else None,
            "user_data": record.data.get("user_data"),
            **{key: record.data[key] for key in LABEL_KEYS if key in record.data},
            **fields,
            "seed": seed,
        }
        for record, seed in zip(batch, seeds)
    ])


def merge_generation_logs(save_path: str | Path, part_names: Sequence[str]) -> Path:
    """Fold the per-process log parts into ``generation_log.jsonl`` (one line per file name, latest
    wins, sorted), atomically, then delete the parts."""
    save_path = Path(save_path)
    final = save_path / LOG_NAME
    entries = {entry["file_name"]: entry for entry in read_generation_log(save_path)}
    for path in (save_path / p for p in part_names):
        if path.is_file():
            entries.update((entry["file_name"], entry) for _, entry in read_log_file(path))
    with atomic_write(final) as handle:
        for name in sorted(entries):
            handle.write(json.dumps(entries[name]) + "\n")
    for part in part_names:
        (save_path / part).unlink(missing_ok=True)
    return final


def read_generation_log(save_path: str | Path) -> list[dict]:
    """The entries of ``<save_path>/generation_log.jsonl`` (empty when there is none); :class:`InputError`
    naming each corrupt line."""
    path = Path(save_path) / LOG_NAME
    if not path.is_file():
        return []
    return [entry for _, entry in read_log_file(path)]


def logged_entries(folder: str | Path) -> list[dict]:
    """The generation-log entries of the images in ``folder``: its own ``generation_log.jsonl``,
    or, for a subfolder of an output folder (``out/level_3`` of a log that names ``level_3/x.png``),
    the parent log's entries under it, their ``file_name`` relative to ``folder``."""
    folder = Path(folder)
    if (folder / LOG_NAME).is_file():
        return read_generation_log(folder)
    prefix = f"{folder.name}/"
    return [{**entry, "file_name": entry["file_name"][len(prefix):]} for entry in read_generation_log(folder.parent)
            if str(entry.get("file_name", "")).startswith(prefix)]


def _read_image(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def write_grids(save_path: str | Path, records: Sequence[PromptRecord], by: str) -> list[Path]:
    """One contact sheet per user (``by="user"``: its prompts side by side) or per prompt
    (``by="prompt"``: its users side by side), written to ``<save_path>/grids/`` (a folder no
    record may write to: :func:`~psalign.inference.records.file_name_problem`)."""
    if by not in ("user", "prompt"):
        raise ValueError(f"grid must be 'user' or 'prompt', got {by!r}")
    save_path = Path(save_path)
    groups: dict[str, list[PromptRecord]] = {}
    for record in records:
        label = record.user.label if record.user else "base"
        groups.setdefault(label if by == "user" else record.caption, []).append(record)
    paths = []
    for index, (name, members) in enumerate(groups.items()):
        images = [_read_image(save_path / r.file_name) for r in members]
        labels = [(r.caption if by == "user" else (r.user.label if r.user else "base")) for r in members]
        sheet = contact_sheet([images], [name], labels)
        safe = "".join(ch if (ch.isascii() and ch.isalnum()) or ch in "-_" else "_" for ch in name)[:60]
        target = save_path / GRIDS_FOLDER / f"{by}_{index:03d}_{safe}.png"
        with atomic_path(target, suffix=".png") as tmp:
            sheet.save(tmp)
        paths.append(target)
    return paths
