"""Training checkpoints: ``<output_dir>/checkpoint-<step>`` folders of the full Accelerate state.

A checkpoint is written to ``checkpoint-<step>.partial`` and renamed when every process has
finished writing, so a crash while saving never leaves a folder that ``latest`` would pick.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

PREFIX = "checkpoint-"
_NAME = re.compile(rf"{PREFIX}(\d+)")


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"{PREFIX}{step}"


def partial_path(output_dir: str | Path, step: int) -> Path:
    """Where checkpoint ``step`` is written before it is complete."""
    return Path(output_dir) / f"{PREFIX}{step}.partial"


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


def finish_checkpoint(output_dir: str | Path, step: int, total_limit: int | None) -> Path:
    """Rename the written ``.partial`` folder to ``checkpoint-<step>``, then delete the oldest
    checkpoints beyond ``total_limit`` (the new one always stays). Main process only."""
    final = checkpoint_path(output_dir, step)
    if final.exists():  # saved at this step by an earlier, interrupted attempt
        shutil.rmtree(final)
    os.replace(partial_path(output_dir, step), final)
    if total_limit is not None:
        found = list_checkpoints(output_dir)
        for _, old in found[: max(len(found) - total_limit, 0)]:
            shutil.rmtree(old)
    return final
