"""Contact sheets: a labelled grid of images."""

from __future__ import annotations

from typing import Sequence

from PIL import Image, ImageDraw


def contact_sheet(
    rows: Sequence[Sequence[Image.Image | None]],
    row_labels: Sequence[str],
    column_labels: Sequence[str],
    cell: int = 128,
    label_width: int = 140,
    label_height: int = 28,
) -> Image.Image:
    """Images in a grid with a label per row (left) and per column (top); ``None`` leaves a cell blank.

    Each image is resized to ``cell`` x ``cell`` pixels; labels are cut to fit their cell.
    """
    n_cols = max((len(r) for r in rows), default=0)
    sheet = Image.new("RGB", (label_width + n_cols * cell, label_height + len(rows) * cell), "white")
    draw = ImageDraw.Draw(sheet)
    char_width = 6  # PIL's default bitmap font
    for c, text in enumerate(column_labels):
        draw.text((label_width + c * cell + 4, 8), text[: cell // char_width - 1], fill="black")
    for r, (label, images) in enumerate(zip(row_labels, rows)):
        top = label_height + r * cell
        draw.text((4, top + cell // 2 - 6), label[: label_width // char_width - 1], fill="black")
        for c, image in enumerate(images):
            if image is not None:
                sheet.paste(image.convert("RGB").resize((cell, cell)), (label_width + c * cell, top))
    return sheet
