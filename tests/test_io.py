"""Atomic writes: all or nothing, with ordinary file permissions."""

import os

import pytest
import torch
from safetensors.torch import save_file

from psalign.io import (
    InputError, InputProblem, atomic_path, atomic_write, file_sha256, model_sha256, weights_sha256,
)


def test_atomic_write_keeps_the_old_file_when_the_block_fails(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as handle:
            handle.write("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["out.txt"]


def test_atomic_files_get_umask_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "a.txt") as handle:
            handle.write("x")
        with atomic_path(tmp_path / "b.bin") as tmp:
            tmp.write_bytes(b"x")
        with atomic_path(tmp_path / "c.safetensors", suffix=".safetensors") as tmp:
            save_file({"x": torch.zeros(1)}, str(tmp))  # writes a new file of its own, owner-only
    finally:
        os.umask(mask)
    for name in ("a.txt", "b.bin", "c.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name


def test_input_error_lists_every_problem_with_its_location():
    error = InputError([InputProblem("p.jsonl", 3, "missing", "caption"), InputProblem("u.csv", 0, "not found")])
    assert str(error).splitlines()[1:] == ["  p.jsonl:3: caption: missing", "  u.csv: not found"]


def test_weights_sha256_names_a_file_or_the_weight_files_directly_in_a_folder(tmp_path):
    weights = tmp_path / "adapter" / "psa_adapter.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"weights v1")
    assert weights_sha256(weights) == file_sha256(weights)
    folder = weights_sha256(weights.parent)
    (weights.parent / "psa_config.json").write_text("{}")  # not a weight file
    (weights.parent / "checkpoint-500").mkdir()  # training leftovers are not read
    (weights.parent / "checkpoint-500" / "model.safetensors").write_bytes(b"old")
    assert weights_sha256(weights.parent) == folder
    weights.write_bytes(b"weights v2")
    assert weights_sha256(weights.parent) != folder
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no weight file"):
        weights_sha256(tmp_path / "empty")


def test_model_sha256_samples_big_files_but_sees_a_change_anywhere_in_them(tmp_path):
    import shutil

    import numpy as np

    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True)
    (model / "model_index.json").write_text('{"unet": ["diffusers", "UNet2DConditionModel"]}')
    weights = np.random.default_rng(0).integers(0, 256, 3_000_000, dtype=np.uint8)  # > 32 samples x 32 KiB
    (model / "unet" / "weights.safetensors").write_bytes(weights.tobytes())
    digest = model_sha256(model)
    assert model_sha256(shutil.copytree(model, tmp_path / "moved")) == digest  # another place, same model
    (model / ".cache").mkdir()
    (model / ".cache" / "download.metadata").write_text("fetched at noon")  # hub bookkeeping: ignored
    assert model_sha256(model) == digest
    # Samples are 32 KiB about every 93 KiB here: a changed run longer than the gap between two
    # samples (about 61 KiB) shows wherever it lies; so does a change to the first or last byte.
    for start, length in ((0, 1), (2_999_999, 1), (1_469_000, 64_000), (700_000, 64_000)):
        changed = weights.copy()
        changed[start:start + length] ^= 1
        (model / "unet" / "weights.safetensors").write_bytes(changed.tobytes())
        assert model_sha256(model) != digest, start
    (model / "unet" / "weights.safetensors").write_bytes(weights.tobytes())
    (model / "model_index.json").write_text('{"unet": ["diffusers", "UNet2DModel"]}')  # small files: all bytes
    assert model_sha256(model) != digest
    assert model_sha256("stable-diffusion-v1-5/stable-diffusion-v1-5") is None  # a hub id, not a folder
