"""A PNG contact sheet of interleaved documents: one row per document, its texts and images left to right.

Rows are either :class:`Document` objects (ground truth, rendered at ``image_size``) or interleaved lists
``[{"text": str}, {"image": PIL.Image}, ...]`` such as a model's output. Images are scaled up to ``cell`` pixels
with nearest-neighbour sampling so single pixels stay visible; text is wrapped into boxes ``text_width`` wide and
drawn with Pillow's default font.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from .generate import Document

BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)
FRAME = (160, 160, 160)
PAD = 6
LINE_SPACING = 2

Row = Document | Sequence[dict[str, Any]]


def _wrap(text: str, font: Any, width: int, draw: ImageDraw.ImageDraw) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and draw.textlength(candidate, font=font) <= width:
            lines[-1] = candidate
        else:
            lines.append(word)
    return lines


def _row_items(row: Row, image_size: int) -> list[dict[str, Any]]:
    items = row.to_interleaved(image_size) if isinstance(row, Document) else list(row)
    for item in items:
        if not (isinstance(item.get("text"), str) or isinstance(item.get("image"), Image.Image)):
            raise ValueError(f"each item must be {{'text': str}} or {{'image': PIL.Image}}, got keys {sorted(item)}")
    return items


def contact_sheet(
    rows: Sequence[Row],
    image_size: int = 32,
    cell: int = 64,
    text_width: int = 180,
    path: str | Path | None = None,
) -> Image.Image:
    """Lay ``rows`` out as one RGB image (and save it as PNG to ``path`` if given)."""
    if not rows:
        raise ValueError("contact_sheet needs at least one row")
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_height = measure.textbbox((0, 0), "Ag", font=font)[3] + LINE_SPACING

    laid_out: list[list[tuple[str, Any, int, int]]] = []  # per row: (kind, content, width, height)
    for row in rows:
        boxes = []
        for item in _row_items(row, image_size):
            if "image" in item:
                boxes.append(("image", item["image"].convert("RGB"), cell, cell))
            else:
                lines = _wrap(item["text"], font, text_width, measure)
                boxes.append(("text", lines, text_width, max(1, len(lines)) * line_height))
        laid_out.append(boxes)

    row_heights = [max((h for *_, h in boxes), default=line_height) + 2 * PAD for boxes in laid_out]
    width = max(sum(w + PAD for _, _, w, _ in boxes) + PAD for boxes in laid_out)
    sheet = Image.new("RGB", (width, sum(row_heights)), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    top = 0
    for boxes, height in zip(laid_out, row_heights):
        left = PAD
        for kind, content, box_width, box_height in boxes:
            y = top + (height - box_height) // 2
            if kind == "image":
                sheet.paste(content.resize((cell, cell), Image.Resampling.NEAREST), (left, y))
                draw.rectangle((left - 1, y - 1, left + cell, y + cell), outline=FRAME)
            else:
                for i, line in enumerate(content):
                    draw.text((left, y + i * line_height), line, fill=INK, font=font)
            left += box_width + PAD
        top += height
        draw.line((0, top - 1, width, top - 1), fill=FRAME)
    if path is not None:
        sheet.save(path, format="PNG")
    return sheet
