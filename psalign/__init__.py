"""psalign: personalized safety alignment (PSA) for text-to-image diffusion models.

The main objects are importable from the package itself::

    from psalign import PSAAdapter, load_adapter, dpo_loss, diffusion_dpo_loss, TrainingConfig, train

Each is imported from its module on first use (module ``__getattr__``), and so are the
subpackages (``psalign.adapter``, ``psalign.toy``, ...), so ``import psalign`` stays cheap: it
imports neither torch nor diffusers. ``psalign.__version__`` is the installed distribution's
version (or, in a source tree without package metadata, the one in ``pyproject.toml``).
"""

from __future__ import annotations

import importlib
from typing import Any

#: Public name -> module that defines it. Everything here is imported lazily.
_EXPORTS: dict[str, str] = {
    # the PSA user adapter
    "PSAAdapter": "psalign.adapter",
    "PSAAdapterConfig": "psalign.adapter",
    "UserCrossAttnProcessor": "psalign.adapter",
    "load_adapter": "psalign.adapter",
    "convert_published_checkpoint": "psalign.adapter",
    # the Diffusion-DPO loss
    "dpo_loss": "psalign.loss",
    "diffusion_dpo_loss": "psalign.loss",
    "regression_target": "psalign.loss",
    "DPOLossOutput": "psalign.loss",
    # training (train_psa.py, train_safetydpo.py)
    "TrainingConfig": "psalign.training",
    "load_training_config": "psalign.training",
    "train": "psalign.training",
    # personalized generation (infer.py)
    "InferenceConfig": "psalign.inference",
    "run_inference": "psalign.inference",
    "load_pipeline": "psalign.inference",
    "read_prompt_records": "psalign.inference",
    # alignment methods behind one interface
    "Method": "psalign.methods",
    "register_method": "psalign.methods",
    "get_method": "psalign.methods",
    # evaluation (evaluate.py)
    "EvaluationConfig": "psalign.metrics.evaluation",
    "run_evaluation": "psalign.metrics.evaluation",
    "read_results": "psalign.metrics.report",
    "read_prompt_set": "psalign.prompt_sets",
    "load_grid": "psalign.reproduce",
    "run_grid": "psalign.reproduce",
    # SafetyDPO
    "merge_experts": "psalign.safetydpo.merge_experts",
    # data: categories, users, reference users, Sage pairs
    "CATEGORIES": "psalign.categories",
    "canonical_category": "psalign.categories",
    "UserProfile": "psalign.users",
    "read_users": "psalign.users",
    "write_users": "psalign.users",
    "generate_users": "psalign.users",
    "rule_banned_categories": "psalign.users",
    "reference_user": "psalign.levels",
    "LEVEL_BANS": "psalign.levels",
    "level_users": "psalign.levels",
    "PUBLISHED_LEVEL_USERS": "psalign.levels",
    "sage_preference": "psalign.sage",
    "build_preference_pairs": "psalign.sage",
    "read_preference_pairs": "psalign.sage",
    "PreferencePairDataset": "psalign.sage",
    # user embeddings
    "CausalLMUserEncoder": "psalign.embeddings",
    "SentenceUserEncoder": "psalign.embeddings",
    "embed_users": "psalign.embeddings",
    "load_user_embedding": "psalign.embeddings",
    "load_user_embeddings": "psalign.embeddings",
    "load_embedding_stats": "psalign.embeddings",
    "BanProbe": "psalign.embeddings",
}

#: Subpackages and modules reachable as attributes (``psalign.toy``) without importing them first.
_SUBMODULES: frozenset[str] = frozenset(
    {
        "adapter",
        "categories",
        "demo",
        "embed",
        "embeddings",
        "formats",
        "inference",
        "io",
        "labeller",
        "levels",
        "loss",
        "methods",
        "metrics",
        "probe_bans",
        "prompt_sets",
        "reproduce",
        "safetydpo",
        "sage",
        "testing",
        "toy",
        "training",
        "users",
    }
)

__all__ = sorted(_EXPORTS) + ["__version__"]

_DISTRIBUTION = "psalign"


def _read_version() -> str:
    """The installed distribution's version; without package metadata (a source tree on
    ``sys.path``), the ``[project]`` version of the ``pyproject.toml`` beside the package."""
    from importlib import metadata

    try:
        return metadata.version(_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        pass
    from pathlib import Path

    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:
        text = pyproject.read_text(encoding="utf-8")
    except OSError:
        return "0+unknown"
    try:
        import tomllib
    except ImportError:  # Python 3.10: read the [project] table's version line
        import re

        table = re.search(r"(?ms)^\[project\][ \t]*$(.*?)(?=^\[|\Z)", text)
        line = re.search(r'(?m)^version\s*=\s*"([^"]+)"', table.group(1)) if table else None
        return line.group(1) if line else "0+unknown"
    try:
        return str(tomllib.loads(text)["project"]["version"])
    except (tomllib.TOMLDecodeError, KeyError):
        return "0+unknown"


def __getattr__(name: str) -> Any:
    if name == "__version__":
        value = _read_version()
    elif name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | _SUBMODULES | {"__version__"})
