"""Cheap checks that a Hugging Face model can be loaded, run before any model is loaded."""

from __future__ import annotations

from pathlib import Path

from psalign.io import InputProblem


def pretrained_problem(name_or_path: str, what: str) -> InputProblem | None:
    """Why ``from_pretrained(name_or_path)`` cannot work, or ``None`` when it may.

    A local folder must hold a ``config.json``; a hub id must already be in the local cache when
    the hub is offline (``HF_HUB_OFFLINE=1``), otherwise it would be downloaded. ``what`` names
    the model's role in the message (``"Q16 CLIP model"``).
    """
    from huggingface_hub import constants, try_to_load_from_cache

    path = Path(name_or_path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            return InputProblem(str(path), 0, f"{what}: the folder has no config.json")
        return None
    looks_like_path = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_like_path:
        return InputProblem(name_or_path, 0, f"{what}: no such model folder")
    if constants.is_offline_mode() and not isinstance(try_to_load_from_cache(name_or_path, "config.json"), str):
        return InputProblem(
            name_or_path,
            0,
            f"{what}: not in the local Hugging Face cache and the hub is offline (HF_HUB_OFFLINE=1); "
            "pass a local model folder instead",
        )
    return None
