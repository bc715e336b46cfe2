"""Saving and loading PSA adapters: our format, and import of the published PSA checkpoint layout.

Our format is a folder with two files:

* ``psa_config.json``: :class:`~psalign.adapter.adapter.PSAAdapterConfig` (D_user, N, d_c, layer
  names and widths, format name and version) plus ``extra`` (e.g. the training arguments);
* ``psa_adapter.safetensors``: the adapter's ``state_dict`` (``user_proj.*`` including the
  standardisation buffers, ``to_v.{l}.weight``, and ``to_k.{l}.weight`` only when N > 1).

The published layout (``psa_adapter.bin``, torch-pickled, or a ``.safetensors`` with key prefixes
``psa_adapter.`` / ``user_proj.``) numbers the cross-attention processors ``i`` in
``unet.attn_processors`` order and the user tokens ``j``: ``{i}.to_k_user.{j}.weight`` and
``{i}.to_v_user.{j}.weight`` are ``[h_i, d_c]``. In that layout every ``j`` is its own
single-token attention over user token ``j`` (softmax over one key), so with one token group it
is exactly our N = 1 adapter; its key projections have no effect and are dropped.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..formats import PSA_CONFIG_NAME, PSA_WEIGHTS_NAME
from ..io import atomic_path, atomic_write
from .adapter import PSAAdapter, PSAAdapterConfig, cross_attention_layers, describe_unet


def save_adapter_dir(adapter: PSAAdapter, path, extra: dict | None = None) -> None:
    """Write ``adapter`` to the folder ``path``: weights first, then the config, each atomically."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = adapter.config.to_dict()
    if extra:
        config["extra"] = {**config.get("extra", {}), **extra}
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in adapter.state_dict().items()}
    with atomic_path(path / PSA_WEIGHTS_NAME, suffix=".safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": config["format"], "format_version": str(config["format_version"])})
    with atomic_write(path / PSA_CONFIG_NAME) as handle:
        json.dump(config, handle, indent=2)


def load_adapter_dir(path) -> PSAAdapter:
    """Load an adapter folder written by :func:`save_adapter_dir`, checking every tensor's name and shape."""
    path = Path(path)
    config_file, weights_file = path / PSA_CONFIG_NAME, path / PSA_WEIGHTS_NAME
    for required in (config_file, weights_file):
        if not required.is_file():
            raise FileNotFoundError(f"{required} not found: {path} is not a psalign PSA adapter folder")
    with open(config_file) as handle:
        config = PSAAdapterConfig.from_dict(json.load(handle))
    adapter = PSAAdapter(config)
    _load_checked(adapter, load_file(str(weights_file)), source=str(weights_file))
    return adapter


def _load_checked(adapter: PSAAdapter, state: dict[str, torch.Tensor], source: str) -> None:
    expected = adapter.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k}: file {tuple(state[k].shape)} vs config {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        lines = [f"{source} does not match its adapter config:"]
        lines += [f"  missing tensor {k}" for k in missing[:10]]
        lines += [f"  unexpected tensor {k}" for k in unexpected[:10]]
        lines += [f"  shape mismatch {w}" for w in wrong[:10]]
        raise ValueError("\n".join(lines))
    adapter.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})


def read_published_checkpoint(path) -> dict[str, dict[str, torch.Tensor]]:
    """Read a published PSA checkpoint into ``{"psa_adapter": {...}, "user_proj": {...}}`` (no arbitrary unpickling)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        state: dict[str, dict[str, torch.Tensor]] = {"psa_adapter": {}, "user_proj": {}}
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                group, _, rest = key.partition(".")
                if group not in state:
                    raise ValueError(f"{path}: unexpected key {key!r} (expected prefixes psa_adapter. and user_proj.)")
                state[group][rest] = handle.get_tensor(key)
        return state
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not {"psa_adapter", "user_proj"} <= set(state):
        raise ValueError(f"{path}: expected a dict with keys 'psa_adapter' and 'user_proj'")
    return state


_PUBLISHED_KEY = re.compile(r"^(\d+)\.to_([kv])_user\.(\d+)\.weight$")


def convert_published_checkpoint(path, unet: torch.nn.Module) -> PSAAdapter:
    """Convert a published PSA checkpoint for ``unet`` into a :class:`PSAAdapter` (not attached)."""
    state = read_published_checkpoint(path)
    proj = state["user_proj"]
    for key in ("proj.weight", "proj.bias", "norm.weight", "norm.bias"):
        if key not in proj:
            raise ValueError(f"{path}: user_proj.{key} is missing")
    d_c = proj["norm.weight"].shape[0]
    num_tokens, user_dim = proj["proj.weight"].shape[0] // d_c, proj["proj.weight"].shape[1]

    values: dict[int, dict[int, torch.Tensor]] = {}
    for key, tensor in state["psa_adapter"].items():
        match = _PUBLISHED_KEY.match(key)
        if match is None:
            raise ValueError(f"{path}: unexpected adapter key {key!r}")
        layer, kind, token = int(match[1]), match[2], int(match[3])
        if kind == "v":
            values.setdefault(layer, {})[token] = tensor
    groups = {len(v) for v in values.values()}
    if groups != {1}:
        raise ValueError(
            f"{path}: {sorted(groups)} user-token groups per layer; only the published single-group "
            "layout (one to_v_user per layer) converts exactly to a psalign adapter"
        )
    layers = cross_attention_layers(unet)
    if len(values) != len(layers) or int(unet.config.cross_attention_dim) != d_c:
        raise ValueError(
            f"{path} was made for a UNet with {describe_unet(d_c, len(values))}; "
            f"this UNet has {describe_unet(int(unet.config.cross_attention_dim), len(layers))}"
        )
    adapter = PSAAdapter.for_unet(unet, user_embed_dim=user_dim, num_user_tokens=1)
    new_state = adapter.state_dict()
    # The published processors read user token 0 only; keep that token's rows of the projection.
    new_state["user_proj.proj.weight"] = proj["proj.weight"][:d_c]
    new_state["user_proj.proj.bias"] = proj["proj.bias"][:d_c]
    new_state["user_proj.norm.weight"] = proj["norm.weight"]
    new_state["user_proj.norm.bias"] = proj["norm.bias"]
    for index in range(len(layers)):
        new_state[f"to_v.{index}.weight"] = values[index][0]
    _load_checked(adapter, new_state, source=str(path))
    adapter.config.extra["converted_from"] = str(path)
    if num_tokens != 1:
        adapter.config.extra["published_num_tokens"] = num_tokens
    return adapter


def load_adapter(path, unet: torch.nn.Module) -> PSAAdapter:
    """Load an adapter from our folder format or a published checkpoint file and attach it to ``unet``."""
    path = Path(path)
    if path.is_dir():
        adapter = load_adapter_dir(path)
    elif path.is_file():
        adapter = convert_published_checkpoint(path, unet)
    else:
        raise FileNotFoundError(f"PSA adapter {path} not found")
    return adapter.attach(unet)
