"""The fixed rules of ShapeStories: vocabulary, palette, geometry and the attribute record of one image.

Everything that generator, renderer and scorer must agree on lives here (see SHAPESTORIES.md):

- shapes ``circle``, ``square``, ``triangle``; with radius ``r`` and centre ``(cx, cy)`` (fractions of the image
  side): a circle of radius ``r``; a square of half-side ``0.85 r``; a triangle with vertices ``(cx, cy - r)``,
  ``(cx - 0.95 r, cy + 0.75 r)``, ``(cx + 0.95 r, cy + 0.75 r)``;
- six palette colours; black background;
- sizes ``small`` (r uniform in [0.10, 0.13]) and ``large`` (r uniform in [0.17, 0.21]);
- a 3 x 3 grid: rows ``top``/``middle``/``bottom`` at y = 0.25/0.50/0.75, columns ``left``/``center``/``right`` at
  x = 0.25/0.50/0.75, each centre jittered uniformly by up to +-0.04 on both axes.

The four scored attributes of an image are colour, shape, size and position (``"{row} {column}"``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "yellow": (230, 220, 40),
    "green": (40, 200, 40),
    "cyan": (40, 210, 220),
    "blue": (50, 60, 235),
    "magenta": (220, 40, 220),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
RADIUS_RANGES: dict[str, tuple[float, float]] = {"small": (0.10, 0.13), "large": (0.17, 0.21)}
SIZES: tuple[str, ...] = tuple(RADIUS_RANGES)
ROW_CENTRES: dict[str, float] = {"top": 0.25, "middle": 0.50, "bottom": 0.75}
COLUMN_CENTRES: dict[str, float] = {"left": 0.25, "center": 0.50, "right": 0.75}
ROWS: tuple[str, ...] = tuple(ROW_CENTRES)
COLUMNS: tuple[str, ...] = tuple(COLUMN_CENTRES)
MAX_JITTER = 0.04
ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "size", "position")

SQUARE_HALF_SIDE = 0.85  # x r
TRIANGLE_APEX_UP = 1.0  # apex at cy - r
TRIANGLE_HALF_BASE = 0.95  # x r
TRIANGLE_BASE_DOWN = 0.75  # base at cy + 0.75 r

# Area of each shape divided by r**2.
AREA_PER_RADIUS2: dict[str, float] = {
    "circle": float(np.pi),
    "square": (2 * SQUARE_HALF_SIDE) ** 2,
    "triangle": 0.5 * (2 * TRIANGLE_HALF_BASE) * (TRIANGLE_APEX_UP + TRIANGLE_BASE_DOWN),
}


def check_choice(value: str, choices: tuple[str, ...], what: str) -> str:
    """Return ``value`` if it is one of ``choices``, else raise a ValueError naming the allowed values."""
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(choices)}")
    return value


def expected_area(shape: str, size: str) -> float:
    """Mean area (fraction of the image) of ``shape`` with r uniform in the ``size`` range: k (a^2 + ab + b^2) / 3."""
    low, high = RADIUS_RANGES[check_choice(size, SIZES, "size")]
    return AREA_PER_RADIUS2[check_choice(shape, SHAPES, "shape")] * (low * low + low * high + high * high) / 3.0


def shape_contains(shape: str, x: np.ndarray, y: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    """Boolean mask of the points ``(x, y)`` (fractions of the side) inside the shape centred at ``(cx, cy)``."""
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        half = SQUARE_HALF_SIDE * r
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "triangle":
        top, bottom = -TRIANGLE_APEX_UP * r, TRIANGLE_BASE_DOWN * r
        # The half-width grows linearly from 0 at the apex to 0.95 r at the base.
        half_width = TRIANGLE_HALF_BASE * r * (dy - top) / (bottom - top)
        return (dy >= top) & (dy <= bottom) & (np.abs(dx) <= half_width)
    raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")


class Labelled:
    """The four scored labels of anything with ``shape``, ``colour``, ``size``, ``row`` and ``column`` fields."""

    shape: str
    colour: str
    size: str
    row: str
    column: str

    @property
    def position(self) -> str:
        return f"{self.row} {self.column}"

    def labels(self) -> dict[str, str]:
        """The four scored attributes: colour, shape, size, position."""
        return {"colour": self.colour, "shape": self.shape, "size": self.size, "position": self.position}


@dataclass(frozen=True)
class Attributes(Labelled):
    """Everything that fixes one ShapeStories image: the four labels plus the exact radius and jitter."""

    shape: str
    colour: str
    size: str
    row: str
    column: str
    radius: float  # fraction of the image side, inside RADIUS_RANGES[size]
    jitter: tuple[float, float]  # (dx, dy) offset of the centre from its grid cell centre, each in [-0.04, 0.04]

    def __post_init__(self) -> None:
        check_choice(self.shape, SHAPES, "shape")
        check_choice(self.colour, COLOURS, "colour")
        check_choice(self.size, SIZES, "size")
        check_choice(self.row, ROWS, "row")
        check_choice(self.column, COLUMNS, "column")
        low, high = RADIUS_RANGES[self.size]
        if not low <= self.radius <= high:
            raise ValueError(f"radius {self.radius} is outside the {self.size} range [{low}, {high}]")
        if len(self.jitter) != 2 or any(abs(j) > MAX_JITTER for j in self.jitter):
            raise ValueError(f"jitter must be a pair (dx, dy) with |dx|, |dy| <= {MAX_JITTER}, got {self.jitter}")

    @property
    def centre(self) -> tuple[float, float]:
        """(cx, cy) as fractions of the image side."""
        return COLUMN_CENTRES[self.column] + self.jitter[0], ROW_CENTRES[self.row] + self.jitter[1]

    def to_dict(self) -> dict[str, object]:
        return {
            "shape": self.shape,
            "colour": self.colour,
            "size": self.size,
            "row": self.row,
            "column": self.column,
            "radius": self.radius,
            "jitter": list(self.jitter),
        }
