"""train_psa.py under bad inputs, crafted checkpoints, earlier runs, divergence and Ctrl-C.

Each refusal must exit 2 with ``file:line: field: reason`` lines or one clear sentence, show no
traceback, lose nothing that was there, and, where the problem is in the inputs, come before any
model is loaded (the trainer prints :data:`LOADING` just before it loads one).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from psalign.io import InputError
from psalign.training import PSATrainer, checkpoints, read_metrics, train
from psalign.training.trainer import NonFiniteWeightsError, check_inputs

from .training_support import USER_DIM, default_sigint, tiny_config, write_training_set

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

REPO = Path(__file__).resolve().parents[1]
LOADING = "loading the models from"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


@pytest.fixture(scope="module")
def training_set(tmp_path_factory):
    return write_training_set(tmp_path_factory.mktemp("pairs"))


class WritesAFileWhenUnpickled:
    """Unpickling this object opens ``marker`` for writing (creating it): the way a crafted pickle runs code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def train_args(model: Path, data: Path, embeds: Path, output_dir: Path, *extra: str) -> list[str]:
    """A two-step run at 16 px (the flags of :func:`tiny_config`), then ``extra``."""
    return [
        "--pretrained_model", str(model), "--train_data", str(data), "--embeds_folder", str(embeds),
        "--output_dir", str(output_dir), "--resolution", "16", "--train_batch_size", "2", "--max_train_steps", "2",
        "--checkpointing_steps", "100", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
        "--learning_rate", "1e-3", *extra,
    ]


def run_train_psa(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "train_psa.py"), *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def assert_refused(result: subprocess.CompletedProcess, *expected: str, before_loading: bool = True) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    for text in expected:
        assert text in result.stderr, (text, result.stderr[-3000:])
    if before_loading:
        assert LOADING not in output, output[-3000:]


def tree_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------- inputs


def test_every_data_problem_is_reported_by_line_before_any_model_loads(tiny_sd15_path, tmp_path):
    """Users 1-4 (line i is pair i-1, user (i-1) % 4 + 1): a NaN embedding, one of another dimension and
    a missing one; an image that is not one, a cut-off PNG, and a pair of two sizes."""
    data, embeds = write_training_set(tmp_path / "pairs", n_pairs=8, n_users=4)
    np.save(embeds / "0000001.npy", np.full(USER_DIM, np.nan, dtype=np.float32))
    np.save(embeds / "0000002.npy", np.ones(8, dtype=np.float32))
    (embeds / "0000003.npy").unlink()
    (data / "images" / "chosen_000.png").write_bytes(b"not an image at all")
    cut = data / "images" / "rejected_001.png"
    cut.write_bytes(cut.read_bytes()[:-40])
    Image.new("RGB", (30, 20)).save(data / "images" / "rejected_002.png")
    metadata = data / "metadata.jsonl"

    result = run_train_psa(train_args(tiny_sd15_path, data, embeds, tmp_path / "out"))
    assert_refused(
        result,
        f"{metadata}:1: user_data.User_ID: user 0000001: ",
        f"{metadata}:2: user_data.User_ID: the embedding of user 0000002 has dimension 8, "
        "but embedding_stats.npz has 12",
        f"{metadata}:3: user_data.User_ID: user 0000003 has no embedding in {embeds}",
        f"{metadata}:1: chosen: {data / 'images' / 'chosen_000.png'}: not an image file",
        f"{metadata}:2: rejected: {cut}: corrupt image",
        f"{metadata}:3: rejected: {data / 'images' / 'rejected_002.png'} is 30x20 px but the chosen image",
    )
    assert "finite" in result.stderr.split(f"{metadata}:1: user_data.User_ID: user 0000001: ")[1].splitlines()[0]
    assert not (tmp_path / "out").exists()


def test_an_output_folder_that_is_a_file_and_metadata_that_is_not_utf8(tiny_sd15_path, training_set, tmp_path):
    data, embeds = training_set
    broken = tmp_path / "data"
    shutil.copytree(data, broken)
    (broken / "metadata.jsonl").write_bytes((data / "metadata.jsonl").read_bytes().replace(b"a photo", b"\xff photo"))
    output = tmp_path / "out"
    output.write_text("a file, not a folder")
    result = run_train_psa(train_args(tiny_sd15_path, broken, embeds, output))
    assert_refused(result, f"{output}: output_dir: {output} is a file, not a folder",
                   f"{broken / 'metadata.jsonl'}: not UTF-8 text")
    assert output.read_text() == "a file, not a folder"


def test_a_fresh_run_into_a_folder_holding_an_earlier_run_is_refused_and_loses_nothing(
    tiny_sd15_path, training_set, tmp_path
):
    data, embeds = training_set
    output = tmp_path / "out"
    for name in ("psa_config.json", "psa_adapter.safetensors", "logs/metrics.jsonl", "checkpoint-4/model.safetensors"):
        (output / name).parent.mkdir(parents=True, exist_ok=True)
        (output / name).write_text(f"the earlier run's {name}")
    before = tree_hashes(output)
    result = run_train_psa(train_args(tiny_sd15_path, data, embeds, output))
    assert_refused(result, f"{output} holds an earlier run (checkpoint-4, ", "--resume_from_checkpoint latest",
                   "--overwrite_output_dir", "another --output_dir")
    assert tree_hashes(output) == before


# ---------------------------------------------------------------------------------------------- crafted checkpoints


def test_a_crafted_accelerate_checkpoint_is_refused_without_unpickling_it(tiny_sd15_path, training_set, tmp_path):
    data, embeds = training_set
    output, marker = tmp_path / "out", tmp_path / "code_ran"
    crafted = output / "checkpoint-2"
    crafted.mkdir(parents=True)
    torch.save({"global_step": WritesAFileWhenUnpickled(marker)}, crafted / "custom_checkpoint_0.pkl")
    torch.save({"step": WritesAFileWhenUnpickled(marker)}, crafted / "random_states_0.pkl")
    result = run_train_psa(train_args(tiny_sd15_path, data, embeds, output, "--resume_from_checkpoint", "latest"))
    assert_refused(result, f"{crafted} was not written by psalign", "custom_checkpoint_0.pkl", "never unpickles")
    assert not marker.exists()


def write_crafted_psalign_checkpoint(folder: Path, marker: Path) -> None:
    """A checkpoint in psalign's layout whose optimizer state is a pickle that runs code."""
    folder.mkdir(parents=True)
    save_file({"user_proj.proj.weight": torch.zeros(32, USER_DIM)}, str(folder / checkpoints.MODEL_FILE))
    torch.save({"state": WritesAFileWhenUnpickled(marker), "param_groups": []}, folder / checkpoints.OPTIMIZER_FILE)
    torch.save({"last_epoch": 2}, folder / checkpoints.SCHEDULER_FILE)
    checkpoints.write_rng_state(folder, 0)
    record = {"format": checkpoints.CHECKPOINT_FORMAT, "format_version": checkpoints.CHECKPOINT_FORMAT_VERSION,
              "global_step": 2, "run_id": "crafted", "num_processes": 1}
    (folder / checkpoints.PROGRESS_FILE).write_text(json.dumps(record))


def test_a_checkpoint_whose_optimizer_state_runs_code_is_refused(tiny_sd15_path, training_set, tmp_path):
    data, embeds = training_set
    crafted, marker = tmp_path / "elsewhere" / "checkpoint-2", tmp_path / "code_ran"
    write_crafted_psalign_checkpoint(crafted, marker)
    result = run_train_psa(train_args(tiny_sd15_path, data, embeds, tmp_path / "out",
                                      "--resume_from_checkpoint", str(crafted)))
    assert_refused(result, f"{crafted / 'optimizer.pt'} holds more than tensors and plain values (it calls ",
                   "so psalign refuses to unpickle it")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- runs


def test_overwrite_output_dir_replaces_the_earlier_run(tiny_sd15_path, training_set, tmp_path):
    data, embeds = training_set
    output = tmp_path / "out"
    train(tiny_config(tiny_sd15_path, data, embeds, output, max_train_steps=3, checkpointing_steps=1))
    first_run = checkpoints.inspect_checkpoint(output / "checkpoint-3").run_id
    train(tiny_config(tiny_sd15_path, data, embeds, output, max_train_steps=1, checkpointing_steps=1,
                      checkpoints_total_limit=1, overwrite_output_dir=True))
    assert [p.name for _, p in checkpoints.list_checkpoints(output)] == ["checkpoint-1"]
    assert checkpoints.inspect_checkpoint(output / "checkpoint-1").run_id != first_run
    assert sorted(read_metrics(output)) == [1]
    assert json.loads((output / "psa_config.json").read_text())["extra"]["global_step"] == 1


def test_weights_that_stop_being_finite_are_never_checkpointed(tiny_sd15_path, training_set, tmp_path, monkeypatch):
    """Weights poisoned after step 3: checkpoint-3 is not written and the message names checkpoint-2,
    which really is good (its weights are finite and it resumes)."""
    data, embeds = training_set
    output = tmp_path / "out"
    real_save = PSATrainer.save_checkpoint

    def save_poisoned_at_step_3(self, step):
        if step == 3:
            with torch.no_grad():
                next(self.adapter.parameters()).fill_(float("inf"))
        return real_save(self, step)

    monkeypatch.setattr(PSATrainer, "save_checkpoint", save_poisoned_at_step_3)
    expected = (r"not finite after optimizer step 3 .*checkpoint-3 was not written, the last good checkpoint "
                r".*checkpoint-2 is intact \(resume with --resume_from_checkpoint latest\)")
    with pytest.raises(NonFiniteWeightsError, match=expected):
        train(tiny_config(tiny_sd15_path, data, embeds, output, max_train_steps=4, checkpointing_steps=1))
    assert [p.name for _, p in checkpoints.list_checkpoints(output)] == ["checkpoint-1", "checkpoint-2"]
    assert not checkpoints.partial_path(output, 3).exists()
    assert checkpoints.inspect_checkpoint(output / "checkpoint-2").global_step == 2


def test_checkpoints_that_cannot_resume_this_run_are_refused_before_loading(tiny_sd15_path, training_set, tmp_path):
    """A checkpoint with non-finite weights is not the last good one, and neither it nor one whose
    adapter takes another user dimension is resumed: both are refused by :func:`check_inputs`."""
    data, embeds = training_set
    output = tmp_path / "out"
    train(tiny_config(tiny_sd15_path, data, embeds, output, max_train_steps=2, checkpointing_steps=1))
    run_id = checkpoints.inspect_checkpoint(output / "checkpoint-2").run_id
    weights = {step: output / f"checkpoint-{step}" / checkpoints.MODEL_FILE for step in (1, 2)}
    state = load_file(str(weights[2]))
    save_file({k: torch.full_like(v, float("nan")) for k, v in state.items()}, str(weights[2]))
    assert checkpoints.last_good_checkpoint(output, run_id) == output / "checkpoint-1"
    with pytest.raises(InputError, match="checkpoint-2/model.safetensors: the weights are not finite"):
        check_inputs(tiny_config(tiny_sd15_path, data, embeds, output, resume_from_checkpoint="latest"))
    state["user_proj.proj.weight"] = torch.zeros(state["user_proj.proj.weight"].shape[0], USER_DIM + 1)
    save_file(state, str(weights[1]))
    with pytest.raises(InputError, match=f"takes user embeddings of dimension {USER_DIM + 1}, but the training "
                                         f"embeddings have {USER_DIM}"):
        check_inputs(tiny_config(tiny_sd15_path, data, embeds, output,
                                 resume_from_checkpoint=str(output / "checkpoint-1")))


@pytest.mark.parametrize("plugin", ["DEEPSPEED", "FSDP"])
def test_deepspeed_and_fsdp_launches_are_refused_before_loading(tiny_sd15_path, training_set, tmp_path, monkeypatch,
                                                                 plugin):
    data, embeds = training_set
    monkeypatch.setenv(f"ACCELERATE_USE_{plugin}", "true")
    with pytest.raises(InputError, match="is not supported: its checkpoints are pickles"):
        check_inputs(tiny_config(tiny_sd15_path, data, embeds, tmp_path / "out"))


@pytest.mark.slow
def test_an_infinite_learning_rate_stops_before_writing_a_poisoned_checkpoint(tiny_sd15_path, training_set, tmp_path):
    data, embeds = training_set
    output = tmp_path / "out"
    args = train_args(tiny_sd15_path, data, embeds, output, "--learning_rate", "inf", "--checkpointing_steps", "1")
    result = run_train_psa(args)
    assert_refused(result, "the trained weights are not finite after optimizer step 1",
                   "checkpoint-1 was not written, no good checkpoint had been written yet", before_loading=False)
    assert checkpoints.list_checkpoints(output) == []



@pytest.mark.slow
def test_ctrl_c_ends_with_one_line_and_the_run_resumes(tiny_sd15_path, training_set, tmp_path):
    data, embeds = training_set
    output = tmp_path / "out"
    args = train_args(tiny_sd15_path, data, embeds, output, "--max_train_steps", "1000", "--checkpointing_steps", "1")
    process = subprocess.Popen([sys.executable, str(REPO / "train_psa.py"), *args], cwd=REPO, env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=default_sigint)
    deadline = time.monotonic() + 240
    while not (output / "checkpoint-2").is_dir() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    last_line = stderr.replace("\r", "\n").strip().splitlines()[-1]
    assert last_line.startswith("interrupted: rerun with --resume_from_checkpoint latest to continue from ")
    latest = checkpoints.latest_checkpoint(output)
    step = checkpoints.inspect_checkpoint(latest).global_step
    resumed = run_train_psa(train_args(tiny_sd15_path, data, embeds, output, "--max_train_steps", str(step + 1),
                                       "--resume_from_checkpoint", "latest"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {latest}" in resumed.stdout
    assert json.loads((output / "psa_config.json").read_text())["extra"]["global_step"] == step + 1
