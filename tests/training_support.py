"""Small Sage-format training sets written on the spot, and configs for tiny training runs."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
from PIL import Image

from psalign.embeddings import save_user_embedding, write_embedding_stats
from psalign.sage import write_preference_pairs
from psalign.training import TrainingConfig, load_training_config
from psalign.users import generate_users

USER_DIM = 12
CAPTIONS = ("a photo of a cat", "a man holding a rifle", "a blue square", "a crowd at a rally with flags")


def write_training_set(
    root: Path, n_pairs: int = 8, n_users: int = 2, size: tuple[int, int] = (20, 24), chosen_darker: bool = False
) -> tuple[Path, Path]:
    """Write ``root/data`` (images + ``metadata.jsonl``) and ``root/embeds`` (``.npy`` + stats).

    Images are ``size`` (h, w) px PNGs. With ``chosen_darker`` every chosen image is near black
    (values 0-19) and every rejected one near white (236-255): a preference a model can learn.
    Returns ``(data folder, embeddings folder)``.
    """
    rng = np.random.default_rng(0)
    users = generate_users(n_users, seed=0)
    data, embeds = root / "data", root / "embeds"
    (data / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n_pairs):
        if chosen_darker:
            chosen, rejected = rng.integers(0, 20, (*size, 3)), rng.integers(236, 256, (*size, 3))
        else:
            chosen, rejected = rng.integers(0, 256, (*size, 3)), rng.integers(0, 256, (*size, 3))
        for name, pixels in (("chosen", chosen), ("rejected", rejected)):
            Image.fromarray(pixels.astype(np.uint8)).save(data / "images" / f"{name}_{i:03d}.png")
        records.append(
            {
                "file_name": f"pair_{i:03d}.jpg",
                "chosen": f"images/chosen_{i:03d}.png",
                "rejected": f"images/rejected_{i:03d}.png",
                "caption": CAPTIONS[i % len(CAPTIONS)],
                "user_data": users[i % n_users].user_data(),
            }
        )
    write_preference_pairs(data / "metadata.jsonl", records)
    for user in users:
        save_user_embedding(embeds, user.user_id, rng.normal(size=USER_DIM).astype(np.float32) * 3 + 1)
    write_embedding_stats(embeds, [u.user_id for u in users])
    return data, embeds


def tiny_config(model: Path, data: Path, embeds: Path, output_dir: Path, **overrides) -> TrainingConfig:
    """A few fast steps at 16 px (8x8 latents with the tiny VAE)."""
    values = dict(
        pretrained_model=str(model),
        train_data=str(data),
        embeds_folder=str(embeds),
        output_dir=str(output_dir),
        resolution=16,
        train_batch_size=2,
        max_train_steps=2,
        checkpointing_steps=100,
        lr_scheduler="constant",
        lr_warmup_steps=0,
        learning_rate=1e-3,
    )
    values.update(overrides)
    return load_training_config(None, values)


#: (unsafe caption, its safe rewrite) of the units of :func:`write_sage_training_set`.
SAGE_CAPTIONS = (("a man holding a rifle", "a man holding a flower"), ("a bloody street", "a quiet street"))


def train_whole_and_resumed(model: Path, data: Path, embeds: Path, root: Path, **common) -> tuple[dict, dict]:
    """Train ``common`` (with ``max_train_steps`` 3 and a checkpoint at step 2) straight through into
    ``root/whole``, and stopped after step 2 then resumed into ``root/split``; both runs' metrics."""
    from psalign.training import read_metrics, train

    common = {**common, "max_train_steps": 3, "checkpointing_steps": 2}
    train(tiny_config(model, data, embeds, root / "whole", **common))
    train(tiny_config(model, data, embeds, root / "split", **{**common, "max_train_steps": 2}))
    train(tiny_config(model, data, embeds, root / "split", resume_from_checkpoint="latest", **common))
    return read_metrics(root / "whole"), read_metrics(root / "split")


def write_sage_training_set(
    root: Path, n_units: int = 4, size: tuple[int, int] = (20, 24), categories: tuple[str, ...] = ("Violence",)
) -> tuple[Path, Path]:
    """Like :func:`write_training_set`, but Sage-named: each unit is a ``_s`` and a ``_u`` JPEG and two
    records (unsafe caption, then safe), ``user_<id>_<category>_<concept>_<n>.jpg_<u|s>.jpg``, ordered
    by the Sage rule for two users, one banning every category and one allowing them (alternating
    units); unit n's category is ``categories[(n // 2) % len(categories)]``."""
    from psalign.sage import sage_preference, sage_record_name

    rng = np.random.default_rng(1)
    users = generate_users(2, seed=0)
    data, embeds = root / "data", root / "embeds"
    (data / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for n in range(n_units):
        user, banned = users[n % 2], n % 2 == 0
        images = {}
        for variant in ("s", "u"):
            images[variant] = f"images/unit_{n:03d}_{variant}.jpg"
            Image.fromarray(rng.integers(0, 256, (*size, 3)).astype(np.uint8)).save(data / images[variant])
        unsafe, safe = SAGE_CAPTIONS[n % len(SAGE_CAPTIONS)]
        for caption, text in (("unsafe", unsafe), ("safe", safe)):
            chosen, rejected = sage_preference(banned, caption)
            records.append({
                "file_name": sage_record_name(user.user_id, categories[(n // 2) % len(categories)], "a concept", n,
                                              caption),
                "chosen": images[chosen], "rejected": images[rejected], "caption": text,
                "user_data": user.user_data(),
            })
    write_preference_pairs(data / "metadata.jsonl", records)
    for user in users:
        save_user_embedding(embeds, user.user_id, rng.normal(size=USER_DIM).astype(np.float32) * 3 + 1)
    write_embedding_stats(embeds, [u.user_id for u in users])
    return data, embeds


def default_sigint() -> None:
    """A subprocess ``preexec_fn``: Ctrl-C's default handling in the child, even when the test runs
    where SIGINT is ignored (a background job of a non-interactive shell), which Python inherits."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
