"""A dependency-free line chart (PIL only) for training reports: no matplotlib needed."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

WIDTH, HEIGHT, MARGIN = 640, 360, 48


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average over ``window`` points."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def line_chart(points: Sequence[tuple[int, float]], title: str, path: str | Path) -> Path:
    """Plot (step, value) points (raw in grey, moving average in blue) with labelled axes; save a PNG."""
    if not points:
        raise ValueError("line_chart needs at least one point")
    steps = [p[0] for p in points]
    values = [p[1] for p in points]
    averaged = smooth(values, max(1, len(values) // 50))
    lo, hi = min(values), max(values)
    hi = hi if hi > lo else lo + 1.0
    x0, x1 = min(steps), max(steps) if max(steps) > min(steps) else min(steps) + 1
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)

    def xy(step: int, value: float) -> tuple[float, float]:
        x = MARGIN + (step - x0) / (x1 - x0) * (WIDTH - 2 * MARGIN)
        y = HEIGHT - MARGIN - (value - lo) / (hi - lo) * (HEIGHT - 2 * MARGIN)
        return x, y

    draw.rectangle([MARGIN, MARGIN, WIDTH - MARGIN, HEIGHT - MARGIN], outline="black")
    draw.line([xy(s, v) for s, v in zip(steps, values)], fill=(190, 190, 190), width=1)
    draw.line([xy(s, v) for s, v in zip(steps, averaged)], fill=(30, 80, 200), width=2)
    draw.text((MARGIN, 12), title, fill="black")
    draw.text((4, MARGIN - 6), f"{hi:.4g}", fill="black")
    draw.text((4, HEIGHT - MARGIN - 6), f"{lo:.4g}", fill="black")
    draw.text((MARGIN, HEIGHT - MARGIN + 8), f"step {x0}", fill="black")
    draw.text((WIDTH - MARGIN - 60, HEIGHT - MARGIN + 8), f"step {x1}", fill="black")
    image.save(path)
    return Path(path)
