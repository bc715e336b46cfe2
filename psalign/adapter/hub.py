"""PSA adapters on the Hugging Face Hub: loading from a repo id, and publishing with a model card.

A hub repository holds an adapter the way a folder does (``psa_config.json`` and
``psa_adapter.safetensors``, optionally under a ``subfolder``), or a published checkpoint file
named with ``weight_name`` (``psa_adapter.bin``), as ``load_ip_adapter`` names its weights::

    adapter = load_adapter("org/psa-sdxl", pipe.unet, subfolder="level_aware", revision="v1")
    adapter = PSAAdapter.from_pretrained("org/psa-sdxl")
    adapter.push_to_hub("org/psa-sdxl")     # adapter, README.md model card, embedding_stats.npz

Files come through the local Hugging Face cache (``HF_HUB_CACHE``), so offline mode
(``HF_HUB_OFFLINE=1``) loads whatever was downloaded before and nothing else.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..embeddings import EMBEDDING_STATS_FILE
from ..formats import PSA_CONFIG_NAME, PSA_WEIGHTS_NAME
from ..hub import hub_problem, looks_like_path

if TYPE_CHECKING:
    from .adapter import PSAAdapter

#: The model card's file name in a hub repository.
MODEL_CARD_NAME = "README.md"


def resolve_adapter_path(
    path_or_repo_id: str | Path,
    subfolder: str | None = None,
    revision: str | None = None,
    weight_name: str | None = None,
) -> Path:
    """A local path :func:`~psalign.adapter.load_adapter` can read: the adapter folder (or, with
    ``weight_name``, the checkpoint file) at ``path_or_repo_id`` / ``subfolder`` when that exists
    here, else the hub repository's files fetched into (or found in) the local cache.

    Raises ``FileNotFoundError`` with one sentence when neither works (an unreachable hub within
    :data:`psalign.hub.HUB_TIMEOUT_S` seconds)."""
    local = Path(path_or_repo_id).expanduser()
    local = local / subfolder if subfolder else local
    local = local / weight_name if weight_name else local
    text = str(path_or_repo_id)
    if local.exists() or looks_like_path(text):
        if not local.exists():
            raise FileNotFoundError(f"PSA adapter {local} not found")
        return local
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    names = [weight_name] if weight_name else [PSA_CONFIG_NAME, PSA_WEIGHTS_NAME]
    if (problem := hub_problem(text, names[0], "PSA adapter", subfolder, revision)) is not None:
        raise FileNotFoundError(str(problem))
    try:
        files = [Path(hf_hub_download(text, name, subfolder=subfolder, revision=revision)) for name in names]
    except (EntryNotFoundError, LocalEntryNotFoundError) as error:
        where = f"{text}/{subfolder}" if subfolder else text
        raise FileNotFoundError(f"{where} (hub) is not a PSA adapter: it has no {names[-1]} ({error})") from None
    return files[0] if weight_name else files[0].parent


def model_card(adapter: "PSAAdapter", repo_id: str) -> str:
    """The README.md of a published adapter: what it is, its shape, how it was trained, how to load it."""
    config = adapter.config
    training = config.extra.get("training_args", {})
    base = training.get("pretrained_model")
    front = ["---", "library_name: psalign", "tags:", "- psalign", "- personalized-safety-alignment",
             "- text-to-image", "- diffusers"]
    if base:
        front.append(f"base_model: {base}")
    front.append("---")
    rows = [("user embedding dimension", config.user_embed_dim), ("user tokens", config.num_user_tokens),
            ("cross-attention layers", len(config.layer_names)), ("cross-attention dimension", config.cross_attention_dim),
            ("user text edit blocks", config.text_edit_layers), ("parameters", sum(p.numel() for p in adapter.parameters()))]
    for key, label in (("model_type", "model type"), ("global_step", "training steps")):
        if key in config.extra:
            rows.append((label, config.extra[key]))
    for key in ("objective", "beta_dpo", "learning_rate", "resolution", "train_batch_size",
                "gradient_accumulation_steps", "mixed_precision", "seed"):
        if key in training:
            rows.append((key, training[key]))
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    edit_words = (" and a user text edit that rewrites the caption's tokens for each user before those layers"
                  if config.text_edit_layers else "")
    return "\n".join(front) + f"""

# PSA user adapter: `{repo_id}`

A personalized safety alignment (PSA) user adapter for {f"`{base}`" if base else "a Stable Diffusion UNet"}. It adds a
user branch to every cross-attention layer of the frozen UNet{edit_words}, conditioned on a user embedding, so
that what a user bans is left out of that user's images.

| | |
|---|---|
{table}

`{EMBEDDING_STATS_FILE}` holds the population mean and std (float32, shape (D,)) that user embeddings
are standardised with; the adapter carries the same values. Embed new users with the model and
template the training embeddings came from (`python -m psalign.embed`).

```python
from diffusers import DiffusionPipeline
from psalign import load_adapter

pipe = DiffusionPipeline.from_pretrained({json.dumps(base or "<base model>")})
adapter = load_adapter({json.dumps(repo_id)}, pipe.unet)
with adapter.users(user_embeddings):        # (B, {config.user_embed_dim}) float tensor
    images = pipe(prompts).images
```
"""


def push_adapter_to_hub(
    adapter: "PSAAdapter",
    repo_id: str,
    *,
    subfolder: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str = "Upload PSA adapter",
    card: str | None = None,
):
    """Upload ``adapter`` (its two files), a model card (``card``, or :func:`model_card`) and
    ``embedding_stats.npz`` to hub repository ``repo_id`` (created when missing); returns the
    commit info of ``HfApi.upload_folder``."""
    from huggingface_hub import HfApi

    from .serialization import save_adapter_dir

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        save_adapter_dir(adapter, root)
        projection = adapter.user_proj
        np.savez(root / EMBEDDING_STATS_FILE, mean=projection.embed_mean.detach().cpu().float().numpy(),
                 std=projection.embed_std.detach().cpu().float().numpy())
        (root / MODEL_CARD_NAME).write_text(card if card is not None else model_card(adapter, repo_id))
        return api.upload_folder(repo_id=repo_id, folder_path=root, path_in_repo=subfolder, revision=revision,
                                 commit_message=commit_message)
