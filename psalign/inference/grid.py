"""Contact sheets: a labelled grid of images."""

from __future__ import annotations

import textwrap
from typing import Sequence

from PIL import Image, ImageDraw

#: Width and line height, in pixels, of PIL's default bitmap font.
CHAR_WIDTH, LINE_HEIGHT = 6, 11


def wrap_label(text: str, width_px: int) -> list[str]:
    """``text`` wrapped into lines that fit ``width_px`` pixels (explicit newlines kept); a word
    longer than a line is broken, never cut off."""
    columns = max(1, width_px // CHAR_WIDTH - 1)
    return [line for part in text.split("\n") for line in (textwrap.wrap(part, columns) or [""])]


def contact_sheet(
    rows: Sequence[Sequence[Image.Image | None]],
    row_labels: Sequence[str],
    column_labels: Sequence[str],
    cell: int = 128,
    label_width: int = 140,
    label_height: int = 28,
    cell_labels: Sequence[Sequence[str]] | None = None,
    resample: Image.Resampling = Image.Resampling.BICUBIC,
) -> Image.Image:
    """Images in a grid with a label per row (left), per column (top) and, optionally, per cell
    (under the image); ``None`` leaves a cell blank. ``label_height``: the least height of the
    column labels' band.

    Each image is resized to ``cell`` x ``cell`` pixels with ``resample`` (``NEAREST`` keeps small
    images' pixels crisp). Labels wrap over as many lines as they need: nothing is cut off.
    """
    n_cols = max((len(r) for r in rows), default=0)
    heading = [wrap_label(text, cell) for text in column_labels]
    heading_height = max(label_height, LINE_HEIGHT * max((len(lines) for lines in heading), default=0) + 8)
    under = [[wrap_label(text, cell) for text in labels] for labels in (cell_labels or [])]
    under_height = LINE_HEIGHT * max((len(lines) for labels in under for lines in labels), default=0)
    row_height = cell + (under_height + 6 if under_height else 0)
    sides = [wrap_label(text, label_width) for text in row_labels]
    row_height = max([row_height] + [LINE_HEIGHT * len(lines) + 8 for lines in sides])
    sheet = Image.new("RGB", (label_width + n_cols * cell, heading_height + len(rows) * row_height), "white")
    draw = ImageDraw.Draw(sheet)

    def write(lines: list[str], left: int, top: int) -> None:
        for k, line in enumerate(lines):
            draw.text((left, top + k * LINE_HEIGHT), line, fill="black")

    for c, lines in enumerate(heading):
        write(lines, label_width + c * cell + 4, 4)
    for r, (lines, images) in enumerate(zip(sides, rows)):
        top = heading_height + r * row_height
        text_top = top + max(0, (cell - LINE_HEIGHT * len(lines)) // 2)
        write(lines, 4, text_top)
        for c, image in enumerate(images):
            left = label_width + c * cell
            if image is not None:
                sheet.paste(image.convert("RGB").resize((cell, cell), resample), (left, top))
            if r < len(under) and c < len(under[r]):
                write(under[r][c], left + 4, top + cell + 3)
    return sheet
