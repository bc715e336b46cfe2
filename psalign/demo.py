"""The README's main command: personalized generation with the bundled toy model, offline.

Writes a ``prompts.jsonl`` for three reference users (``level_0``: nothing banned, ``level_3``:
Violence, Self-Harm, Sexuality and Shocking banned, ``level_5``: everything banned), generates it
through ``infer.py``'s code path with the bundled toy model and PSA adapter, and writes the images
plus one contact sheet (rows = users with what they ban, columns = prompts, one seed per column,
a verdict under every image, a legend of the markers). Each unsafe toy prompt asks for its
category's marker (a coloured glyph in the top-right corner); the adapter should draw a marker
for the users who allow its category and remove it cleanly for those who ban it. The toy
detector's verdict on every image is printed too.

    python -m psalign.demo --output_dir demo_out
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from psalign.cli.common import HelpFormatter, run_program
from psalign.inference import InferenceConfig, run_inference, with_toy_defaults
from psalign.inference.grid import contact_sheet
from psalign.io import InputError, InputProblem, atomic_path, atomic_write
from psalign.levels import LEVEL_BANS
from psalign.toy.bundle import IncompleteBundleError
from psalign.toy.detect import Detection, detect, marker_outcome
from psalign.toy.world import BACKGROUND, EXAMPLE_CAPTIONS, MARKERS, parse_caption

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


def verdict(detection: Detection, caption: str, banned: Sequence[str]) -> tuple[str, bool]:
    """``(what became of the prompt's marker, whether that is what the user wants)``.

    The words are ``drawn``, ``removed cleanly``, ``replaced by <category>`` and ``blob`` (no
    marker, but the marker box is not clean), after :func:`~psalign.toy.detect.marker_outcome`;
    a safe prompt gives ``no marker`` or what was drawn instead. A banned marker is wanted
    removed cleanly, an allowed one drawn.
    """
    category = parse_caption(caption).category
    if category is None:
        if detection.box_clean:
            return "no marker", True
        return ("blob" if detection.smudged else "drew " + ", ".join(detection.markers)), False
    outcome = marker_outcome(detection, category)
    words = {"drawn": "drawn", "clean": "removed cleanly", "smudged": "blob",
             "replaced": "replaced by " + ", ".join(detection.markers)}[outcome]
    return words, outcome == ("clean" if category in banned else "drawn")


def describe(image: Image.Image, caption: str, banned: Sequence[str]) -> str:
    """One line of the printed report: ``"Violence marker (banned): removed cleanly, as wanted"``."""
    words, right = verdict(detect(image), caption, banned)
    category = parse_caption(caption).category
    subject = "safe prompt" if category is None else f"{category} marker ({'banned' if category in banned else 'allowed'})"
    return f"{subject}: {words}, {'as wanted' if right else 'NOT as wanted'}"


def marker_legend(cell: int = 48) -> Image.Image:
    """One tile per category: its marker glyph in its colour on the background, named below."""
    from psalign.toy.render import GLYPHS

    n = len(MARKERS)
    legend = Image.new("RGB", (n * (cell + 40), cell + 30), "white")
    draw = ImageDraw.Draw(legend)
    for k, (category, marker) in enumerate(MARKERS.items()):
        glyph = GLYPHS[marker.glyph]
        tile = np.empty((*glyph.shape, 3), dtype=np.uint8)
        tile[:] = BACKGROUND
        tile[glyph] = marker.colour
        left = k * (cell + 40) + 20
        legend.paste(Image.fromarray(tile).resize((cell, cell), Image.Resampling.NEAREST), (left, 4))
        draw.text((left + cell // 2 - 3 * len(category), cell + 10), category, fill="black")
    return legend


def run_demo(out: Path) -> Path:
    """Write the demo's prompts, images and contact sheet under ``out``; returns the sheet's path."""
    if out.exists() and not out.is_dir():
        raise InputError([InputProblem(str(out), 0, "exists and is not a folder", "--output_dir")],
                         header="cannot write the demo")
    prompts = out / "prompts.jsonl"
    with atomic_write(prompts) as handle:
        handle.writelines(json.dumps(r) + "\n" for r in demo_records())
    images_dir = out / "images"
    config = with_toy_defaults(
        InferenceConfig(meta_data=prompts, save_path=images_dir, load_psa=True, batch_size=16, device="cpu")
    )
    run_inference(config)
    rows = [[Image.open(images_dir / f"{level}/prompt_{p}.png") for p in range(len(DEMO_PROMPTS))] for level in DEMO_LEVELS]
    verdicts = []
    for level, row in zip(DEMO_LEVELS, rows):
        print(f"{level} (bans: {', '.join(LEVEL_BANS[level]) or 'nothing'})")
        verdicts.append([])
        for caption, image in zip(DEMO_PROMPTS, row):
            words, right = verdict(detect(image), caption, LEVEL_BANS[level])
            verdicts[-1].append(words + ("" if right else " (!)"))
            print(f"  {caption!r}: {describe(image, caption, LEVEL_BANS[level])}")
    row_labels = [f"{level}\nbans: {', '.join(LEVEL_BANS[level]) or 'nothing'}" for level in DEMO_LEVELS]
    # 32 px toy images, enlarged without smoothing so the markers stay crisp.
    sheet = contact_sheet(rows, row_labels, list(DEMO_PROMPTS), cell=128, label_width=150, cell_labels=verdicts,
                          resample=Image.Resampling.NEAREST)
    legend = marker_legend()
    page = Image.new("RGB", (max(sheet.width, legend.width), sheet.height + legend.height + 10), "white")
    page.paste(sheet, (0, 0))
    page.paste(legend, (0, sheet.height + 10))
    sheet_path = out / "contact_sheet.png"
    with atomic_path(sheet_path, suffix=".png") as tmp:
        page.save(tmp)
    print(f"model: {config.sd_model}\nimages: {images_dir}\ncontact sheet: {sheet_path}")
    return sheet_path


def main(argv: list[str] | None = None) -> int:
    """``python -m psalign.demo`` (``psalign-demo``); exit status 0 done, 2 refused (an incomplete
    toy bundle, an output folder that is a file), 130 interrupted (rerun to resume)."""
    parser = argparse.ArgumentParser(prog="python -m psalign.demo", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--output_dir", "--out", dest="out", type=Path, default=Path("demo_out"), help="output folder")
    out = parser.parse_args(argv).out

    def demo() -> None:
        run_demo(out)

    return run_program(demo, f"interrupted: the images in {out} are kept; rerun to resume",
                       refused=(IncompleteBundleError,))


if __name__ == "__main__":
    sys.exit(main())
