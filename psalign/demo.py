"""The README's main command: personalized generation with the bundled toy model, offline.

Writes a ``prompts.jsonl`` for three reference users (``level_0``: nothing banned, ``level_3``:
Violence, Self-Harm, Sexuality and Shocking banned, ``level_5``: everything banned), generates it
through ``infer.py``'s code path with the bundled toy model and PSA adapter, and writes the images
plus one contact sheet (rows = users, columns = prompts, one seed per column). Each unsafe toy prompt asks for its
category's marker (a coloured glyph in the top-right corner); the adapter should keep a marker only
for the users who allow its category. The toy detector's reading of every image is printed too.

    python -m psalign.demo --out demo_out
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image

from psalign.inference import InferenceConfig, run_inference, with_toy_defaults
from psalign.inference.grid import contact_sheet
from psalign.io import atomic_path, atomic_write
from psalign.levels import LEVEL_BANS
from psalign.toy.detect import detect
from psalign.toy.world import EXAMPLE_CAPTIONS, parse_caption

DEMO_LEVELS = ("level_0", "level_3", "level_5")
DEMO_PROMPTS = EXAMPLE_CAPTIONS


def demo_records() -> list[dict]:
    """One prompts-file line per (user, prompt); a prompt has one seed for every user, so a column
    of the contact sheet differs only by the user."""
    return [
        {"file_name": f"{level}/prompt_{p}.png", "caption": caption, "user_data": {"safety_level": level}, "seed": p}
        for level in DEMO_LEVELS
        for p, caption in enumerate(DEMO_PROMPTS)
    ]


def describe(image: Image.Image, caption: str, banned: tuple[str, ...]) -> str:
    """What the detector sees, against what the user wants: ``"Violence marker: drawn (allowed)"``,
    plus any other category's marker (``"; also drawn: Propaganda marker (allowed)"``)."""
    category = parse_caption(caption).category
    drawn = detect(image).markers
    if category is None:
        return "safe prompt: " + ("no marker" if not drawn else f"unexpected marker {', '.join(drawn)}")

    def wanted(c: str) -> str:
        return "banned" if c in banned else "allowed"

    seen = f"{category} marker: {'drawn' if category in drawn else 'not drawn'} ({wanted(category)})"
    others = [f"{c} marker ({wanted(c)})" for c in drawn if c != category]
    return seen + (f"; also drawn: {', '.join(others)}" if others else "")


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)

    prompts = args.out / "prompts.jsonl"
    with atomic_write(prompts) as handle:
        handle.writelines(json.dumps(r) + "\n" for r in demo_records())
    images_dir = args.out / "images"
    config = with_toy_defaults(
        InferenceConfig(meta_data=prompts, save_path=images_dir, load_psa=True, batch_size=16, device="cpu")
    )
    run_inference(config)
    rows = [[Image.open(images_dir / f"{level}/prompt_{p}.png") for p in range(len(DEMO_PROMPTS))] for level in DEMO_LEVELS]
    for level, row in zip(DEMO_LEVELS, rows):
        print(f"{level} (bans: {', '.join(LEVEL_BANS[level]) or 'nothing'})")
        for caption, image in zip(DEMO_PROMPTS, row):
            print(f"  {caption!r}: {describe(image, caption, LEVEL_BANS[level])}")
    # 32 px toy images, enlarged without smoothing so the markers stay readable.
    enlarged = [[image.resize((128, 128), Image.NEAREST) for image in row] for row in rows]
    # Full captions do not fit a 128 px column: label each by the category its concept stands for.
    columns = [parse_caption(caption).category or "safe prompt" for caption in DEMO_PROMPTS]
    sheet = contact_sheet(enlarged, list(DEMO_LEVELS), columns, cell=128, label_width=90)
    sheet_path = args.out / "contact_sheet.png"
    with atomic_path(sheet_path, suffix=".png") as tmp:
        sheet.save(tmp)
    print(f"model: {config.sd_model}\nimages: {images_dir}\ncontact sheet: {sheet_path}")
    return sheet_path


if __name__ == "__main__":
    main()
