"""Offline smoke demo: personalized generation end to end on this machine, with nothing downloaded.

Builds a tiny random SD1.5-shaped pipeline and a randomly initialised PSA adapter, writes a
``prompts.jsonl`` for three reference users (nothing banned, some banned, everything banned),
runs the same code path as ``infer.py`` and writes the images plus one contact sheet
(rows = users, columns = prompts). The weights are random, so the pictures are noise: the demo
shows the machinery (validation, per-user conditioning, seeds, resumable output), not quality.

    python -m psalign.demo --out demo_out
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from psalign.adapter import PSAAdapter
from psalign.embeddings import save_user_embedding
from psalign.inference import InferenceConfig, GenerationSettings, run_inference
from psalign.inference.grid import contact_sheet
from psalign.io import atomic_path, atomic_write
from psalign.levels import reference_user
from psalign.testing import build_tiny_sd15_pipeline

DEMO_LEVELS = ("level_0", "level_3", "level_5")
DEMO_PROMPTS = ("a man holding a rifle", "a portrait of a woman", "a bloody knife on a table", "a crowd with flags")
USER_DIM = 64


def build_demo_assets(out: Path) -> tuple[Path, Path, Path]:
    """The tiny pipeline, a random adapter and the three users' embeddings (made once, reused)."""
    model, adapter_dir, embeds = out / "model", out / "adapter", out / "embeds"
    if not (model / "model_index.json").is_file():
        build_tiny_sd15_pipeline(model)
    if not (adapter_dir / "psa_config.json").is_file():
        from diffusers import UNet2DConditionModel

        adapter = PSAAdapter.for_unet(UNet2DConditionModel.from_pretrained(model, subfolder="unet"), USER_DIM)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for param in adapter.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
        adapter.save_pretrained(adapter_dir, extra={"note": "random weights: psalign.demo smoke test"})
    rng = np.random.default_rng(0)
    for level in DEMO_LEVELS:
        save_user_embedding(embeds, reference_user(level).user_id, rng.normal(size=USER_DIM).astype(np.float32))
    return model, adapter_dir, embeds


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps")
    args = parser.parse_args(argv)

    model, adapter_dir, embeds = build_demo_assets(args.out)
    prompts = args.out / "prompts.jsonl"
    records = [
        {"file_name": f"{level}/prompt_{p}.png", "caption": caption, "user_data": {"safety_level": level}}
        for level in DEMO_LEVELS
        for p, caption in enumerate(DEMO_PROMPTS)
    ]
    with atomic_write(prompts) as handle:
        handle.writelines(json.dumps(r) + "\n" for r in records)
    images_dir = args.out / "images"
    run_inference(InferenceConfig(
        meta_data=prompts, save_path=images_dir, sd_model=str(model), psa_path=adapter_dir, load_psa=True,
        embeds_folder=embeds, batch_size=4, device="cpu",
        settings=GenerationSettings(num_inference_steps=args.steps, guidance_scale=5.0),
    ))
    rows = [[Image.open(images_dir / f"{level}/prompt_{p}.png") for p in range(len(DEMO_PROMPTS))] for level in DEMO_LEVELS]
    sheet = contact_sheet(rows, list(DEMO_LEVELS), list(DEMO_PROMPTS))
    sheet_path = args.out / "contact_sheet.png"
    with atomic_path(sheet_path, suffix=".png") as tmp:
        sheet.save(tmp)
    print(f"images: {images_dir}\ncontact sheet: {sheet_path}")
    return sheet_path


if __name__ == "__main__":
    main()
