"""Saving and loading PSA adapters: our format, and import of the published PSA checkpoint layout.

Our format is a folder with two files:

* ``psa_config.json``: :class:`~psalign.adapter.adapter.PSAAdapterConfig` (D_user, N, d_c, layer
  names and widths, format name and version) plus ``extra`` (e.g. the training arguments);
* ``psa_adapter.safetensors``: the adapter's ``state_dict`` (``user_proj.*`` including the
  standardisation buffers, ``to_v.{l}.weight``, and ``to_k.{l}.weight`` only when N > 1).

Either can also live in a hub repository (:mod:`psalign.adapter.hub`).

The published layout (``psa_adapter.bin``, torch-pickled, or a ``.safetensors`` with key prefixes
``psa_adapter.`` / ``user_proj.``) numbers the cross-attention processors ``i`` in
``unet.attn_processors`` order and the user tokens ``j``: ``{i}.to_k_user.{j}.weight`` and
``{i}.to_v_user.{j}.weight`` are ``[h_i, d_c]``. In that layout every ``j`` is its own
single-token attention over user token ``j`` (softmax over one key), so with one token group it
is exactly our N = 1 adapter; its key projections have no effect and are dropped. A ``.bin`` is
read through the weights-only unpickler only (:func:`psalign.safe_load.load_weights_only`).

:func:`inspect_adapter` checks either kind of path from its config and tensor headers, without a
model, so that a bad adapter is reported before anything is loaded.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..formats import PSA_CONFIG_NAME, PSA_WEIGHTS_NAME
from ..io import atomic_path, atomic_write
from ..safe_load import load_weights_only
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


def read_published_checkpoint(path, mmap: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """Read a published PSA checkpoint into ``{"psa_adapter": {...}, "user_proj": {...}}`` (no arbitrary
    unpickling; ``mmap`` maps a ``.bin``'s tensor data instead of reading it)."""
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
    state = load_weights_only(path, mmap=mmap)
    if not isinstance(state, dict) or not {"psa_adapter", "user_proj"} <= set(state):
        raise ValueError(f"{path}: expected a dict with keys 'psa_adapter' and 'user_proj'")
    for group in ("psa_adapter", "user_proj"):
        if not isinstance(state[group], dict) or not all(torch.is_tensor(t) for t in state[group].values()):
            raise ValueError(f"{path}: {group} must map names to tensors")
    return state


_PUBLISHED_KEY = re.compile(r"^(\d+)\.to_([kv])_user\.(\d+)\.weight$")
_PUBLISHED_PROJECTION = ("proj.weight", "proj.bias", "norm.weight", "norm.bias")
#: Suffixes of published checkpoint files that ``load_adapter`` converts.
PUBLISHED_SUFFIXES = (".bin", ".safetensors")


@dataclass(frozen=True)
class AdapterSummary:
    """What an adapter path holds, read from its config and tensor headers (no model, no weights)."""

    path: Path
    layout: str  # "psalign" (our folder) or "published" (a published checkpoint file)
    user_embed_dim: int
    num_user_tokens: int
    cross_attention_dim: int
    num_layers: int
    text_edit_layers: int = 0


def _published_summary(path: Path, shapes: dict[str, dict[str, tuple[int, ...]]]) -> AdapterSummary:
    """Check the published layout from its tensor shapes; ``ValueError`` naming the first problem."""
    proj = shapes["user_proj"]
    for key in _PUBLISHED_PROJECTION:
        if key not in proj:
            raise ValueError(f"{path}: user_proj.{key} is missing")
    if len(proj["norm.weight"]) != 1 or len(proj["proj.weight"]) != 2 or proj["norm.weight"][0] == 0:
        raise ValueError(f"{path}: user_proj.proj.weight must be 2-D and user_proj.norm.weight 1-D")
    d_c = proj["norm.weight"][0]
    rows, user_dim = proj["proj.weight"]
    if rows % d_c or rows == 0 or proj["proj.bias"] != (rows,):
        raise ValueError(f"{path}: user_proj.proj has {rows} rows, not a multiple of the token width {d_c}")
    values: dict[int, dict[int, tuple[int, ...]]] = {}
    for key, shape in shapes["psa_adapter"].items():
        match = _PUBLISHED_KEY.match(key)
        if match is None:
            raise ValueError(f"{path}: unexpected adapter key {key!r}")
        if len(shape) != 2 or shape[1] != d_c:
            raise ValueError(f"{path}: adapter tensor {key!r} has shape {shape}; expected (width, {d_c})")
        if match[2] == "v":
            values.setdefault(int(match[1]), {})[int(match[3])] = shape
    groups = {len(v) for v in values.values()}
    if groups != {1}:
        raise ValueError(
            f"{path}: {sorted(groups)} user-token groups per layer; only the published single-group "
            "layout (one to_v_user per layer) converts exactly to a psalign adapter"
        )
    if sorted(values) != list(range(len(values))) or any(0 not in v for v in values.values()):
        raise ValueError(f"{path}: the to_v_user layers must be numbered 0..{len(values) - 1}, each with token 0")
    return AdapterSummary(path, "published", user_dim, rows // d_c, d_c, len(values))


def _published_shapes(path: Path) -> dict[str, dict[str, tuple[int, ...]]]:
    """The tensor shapes of a published checkpoint: from its header (``.safetensors``) or memory-mapped (``.bin``)."""
    if path.suffix == ".safetensors":
        shapes: dict[str, dict[str, tuple[int, ...]]] = {"psa_adapter": {}, "user_proj": {}}
        for key, shape in _safetensors_shapes(path).items():
            group, _, rest = key.partition(".")
            if group not in shapes:
                raise ValueError(f"{path}: unexpected key {key!r} (expected prefixes psa_adapter. and user_proj.)")
            shapes[group][rest] = shape
        return shapes
    state = read_published_checkpoint(path, mmap=True)
    return {group: {k: tuple(t.shape) for k, t in state[group].items()} for group in ("psa_adapter", "user_proj")}


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from a safetensors header; ``ValueError`` when the file is not one."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error})") from None


def _inspect_adapter_dir(path: Path) -> AdapterSummary:
    config_file, weights_file = path / PSA_CONFIG_NAME, path / PSA_WEIGHTS_NAME
    for required in (config_file, weights_file):
        if not required.is_file():
            published = sorted(p.name for p in path.iterdir() if p.is_file() and p.suffix in PUBLISHED_SUFFIXES)
            hint = f"; to use its {published[0]}, pass that file as the adapter path" if published else ""
            raise FileNotFoundError(f"{required} not found: {path} is not a psalign PSA adapter folder{hint}")
    try:
        config = PSAAdapterConfig.from_dict(json.loads(config_file.read_text(encoding="utf-8")))
        with torch.device("meta"):  # the expected names and shapes, without allocating the weights
            expected = {k: tuple(v.shape) for k, v in PSAAdapter(config).state_dict().items()}
    except (ValueError, TypeError, AttributeError, RuntimeError) as error:
        raise ValueError(f"{config_file} is not a valid PSA adapter config ({error})") from None
    found = _safetensors_shapes(weights_file)
    differences = [f"missing tensor {k}" for k in sorted(set(expected) - set(found))]
    differences += [f"unexpected tensor {k}" for k in sorted(set(found) - set(expected))]
    differences += [
        f"shape mismatch {k}: file {found[k]} vs config {shape}"
        for k, shape in expected.items()
        if k in found and found[k] != shape
    ]
    if differences:
        shown = "; ".join(differences[:3]) + (f"; and {len(differences) - 3} more" if len(differences) > 3 else "")
        raise ValueError(f"{weights_file} does not match its adapter config: {shown}")
    return AdapterSummary(
        path, "psalign", config.user_embed_dim, config.num_user_tokens, config.cross_attention_dim,
        len(config.layer_names), config.text_edit_layers,
    )


def inspect_adapter(path) -> AdapterSummary:
    """Check an adapter path the way :func:`load_adapter` reads it, without loading a model or any
    weights: a psalign folder (config, tensor names and shapes) or a published checkpoint file
    (layout and shapes; a ``.bin`` through the weights-only unpickler, never a full unpickle).

    Raises ``FileNotFoundError`` or ``ValueError`` with one sentence naming the file; the summary's
    ``user_embed_dim`` is what the user embeddings must match.
    """
    path = Path(path)
    if path.is_dir():
        return _inspect_adapter_dir(path)
    if not path.is_file():
        raise FileNotFoundError(f"PSA adapter {path} not found")
    if path.suffix not in PUBLISHED_SUFFIXES:
        raise ValueError(
            f"{path}: a PSA adapter is a psalign adapter folder or a published checkpoint "
            f"({' or '.join(PUBLISHED_SUFFIXES)} file)"
        )
    return _published_summary(path, _published_shapes(path))


def convert_published_checkpoint(path, unet: torch.nn.Module) -> PSAAdapter:
    """Convert a published PSA checkpoint for ``unet`` into a :class:`PSAAdapter` (not attached)."""
    path = Path(path)
    state = read_published_checkpoint(path)
    summary = _published_summary(path, {g: {k: tuple(t.shape) for k, t in state[g].items()} for g in state})
    proj, d_c = state["user_proj"], summary.cross_attention_dim
    layers = cross_attention_layers(unet)
    if summary.num_layers != len(layers) or int(unet.config.cross_attention_dim) != d_c:
        raise ValueError(
            f"{path} was made for a UNet with {describe_unet(d_c, summary.num_layers)}; "
            f"this UNet has {describe_unet(int(unet.config.cross_attention_dim), len(layers))}"
        )
    # the published training code conditions SDXL on [R, R, 0, 0, R, R]
    adapter = PSAAdapter.for_unet(unet, user_embed_dim=summary.user_embed_dim, num_user_tokens=1,
                                  sdxl_micro_conditioning="target_size")
    new_state = adapter.state_dict()
    # The published processors read user token 0 only; keep that token's rows of the projection.
    new_state["user_proj.proj.weight"] = proj["proj.weight"][:d_c]
    new_state["user_proj.proj.bias"] = proj["proj.bias"][:d_c]
    new_state["user_proj.norm.weight"] = proj["norm.weight"]
    new_state["user_proj.norm.bias"] = proj["norm.bias"]
    for index in range(len(layers)):
        new_state[f"to_v.{index}.weight"] = state["psa_adapter"][f"{index}.to_v_user.0.weight"]
    _load_checked(adapter, new_state, source=str(path))
    adapter.config.extra["converted_from"] = str(path)
    if summary.num_user_tokens != 1:
        adapter.config.extra["published_num_tokens"] = summary.num_user_tokens
    return adapter


def load_adapter(
    path, unet: torch.nn.Module, subfolder: str | None = None, revision: str | None = None,
    weight_name: str | None = None,
) -> PSAAdapter:
    """Load an adapter from our folder format or a published checkpoint file and attach it to ``unet``.

    ``path`` is a local folder or file, or a hub repo id (with ``subfolder``, ``revision``, and
    ``weight_name`` for a published checkpoint file; see :mod:`psalign.adapter.hub`). The path is
    checked first with :func:`inspect_adapter`, so every problem reads the same as there."""
    from .hub import resolve_adapter_path

    summary = inspect_adapter(resolve_adapter_path(path, subfolder, revision, weight_name))
    if summary.layout == "psalign":
        adapter = load_adapter_dir(summary.path)
    else:
        adapter = convert_published_checkpoint(summary.path, unet)
    return adapter.attach(unet)
