"""Scoring of ShapeStories outputs: reading an image back into attributes, parsing captions, and the metrics.

Reading an image (the rules of SHAPESTORIES.md):

- foreground = pixels whose largest channel exceeds 80; its 8-connected blobs of meaningful size (at least a
  quarter of the smallest expected shape, a small triangle: ``MIN_BLOB_AREA`` of the image) are counted; smaller
  specks are ignored. No meaningful blob, or more than one, makes the image wrong on every attribute (``None``);
- colour = the palette colour nearest (Euclidean RGB) to the mean colour of the blob's pixels;
- position = the grid cell nearest to the blob's centroid (row from y, column from x);
- shape = the ideal shape fitted to the blob's bounding box (circle inscribed in the box and centred in it; square
  = the box; triangle with its apex at the top centre and its base on the bottom edge) with the highest
  intersection-over-union with the blob. Each fitted shape is rasterised the way the foreground arises: drawn at
  4x, box-filtered, and a pixel is in where its coverage would lift the read colour's largest channel over 80.
  The box is the blob's pixel box grown by ``BOX_MARGIN_PIXELS`` (0.15 px) on every side, because the
  thresholded raster of a curved or pointed edge stops short of the true edge; without this margin small
  circles read as squares at 32 px (97 % instead of 99.8 % of ground-truth renders read right);
- size = ``small`` if the blob covers less than the midpoint between the expected areas of the small and large
  ranges for the read shape (area = k r^2 with the shape's own k, r uniform in the range), else ``large``.

Metrics (each a :class:`Tally` of correct / total with its ratio):

- caption accuracy: the generated caption equals the true caption sentence exactly (surrounding whitespace
  ignored); per-attribute accuracy from a lenient parse is reported beside it;
- generation accuracy: all four attributes of the generated image right (and each attribute on its own);
- story consistency: for each generated step image, the changed attribute has its new value and every other
  attribute equals the one read from the previous image (the given first image, or the previous generated one);
  by step index, by changed attribute, and overall.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from .generate import Change, caption_sentence
from .render import SUPERSAMPLE, box_downsample, check_image_size, subpixel_centres
from .rules import (
    AREA_PER_RADIUS2,
    ATTRIBUTES,
    COLOURS,
    COLUMN_CENTRES,
    COLUMNS,
    PALETTE,
    RADIUS_RANGES,
    ROW_CENTRES,
    ROWS,
    SHAPES,
    SIZES,
    Attributes,
    Labelled,
    expected_area,
)

FOREGROUND_THRESHOLD = 80
BOX_MARGIN_PIXELS = 0.15
MIN_BLOB_AREA = 0.25 * AREA_PER_RADIUS2["triangle"] * RADIUS_RANGES["small"][0] ** 2  # fraction of the image

ImageLike = Image.Image | np.ndarray


def as_rgb_array(image: ImageLike) -> np.ndarray:
    """A square RGB image as [S, S, 3] uint8: a PIL image (converted to RGB) or a uint8 numpy array."""
    if isinstance(image, Image.Image):
        array = np.asarray(image.convert("RGB"))
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected a [S, S, 3] uint8 array, got shape {image.shape} dtype {image.dtype}")
        array = image
    else:
        raise TypeError(f"expected a PIL image or a uint8 numpy array, got {type(image).__name__}")
    if array.shape[0] != array.shape[1]:
        raise ValueError(f"ShapeStories images are square, got {array.shape[1]}x{array.shape[0]} (width x height)")
    check_image_size(array.shape[0])
    return array


def blobs(mask: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """The 8-connected components of a boolean [H, W] mask as (rows, cols) index arrays, largest first."""
    height, width = mask.shape
    unvisited = mask.copy()
    components = []
    for start in zip(*np.nonzero(mask)):
        if not unvisited[start]:
            continue
        unvisited[start] = False
        stack, pixels = [start], []
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for ny in range(max(y - 1, 0), min(y + 2, height)):
                for nx in range(max(x - 1, 0), min(x + 2, width)):
                    if unvisited[ny, nx]:
                        unvisited[ny, nx] = False
                        stack.append((ny, nx))
        rows, cols = np.array(pixels).T
        components.append((rows, cols))
    return sorted(components, key=lambda c: -len(c[0]))


def _nearest(value: float, centres: dict[str, float]) -> str:
    return min(centres, key=lambda name: abs(centres[name] - value))


def _fitted_shape(shape: str, x: np.ndarray, y: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """Boolean mask of the points inside ``shape`` fitted to ``box`` = (x0, y0, x1, y1) (fractions)."""
    x0, y0, x1, y1 = box
    centre_x, width, height = (x0 + x1) / 2, x1 - x0, y1 - y0
    if shape == "circle":
        radius = min(width, height) / 2
        return (x - centre_x) ** 2 + (y - (y0 + y1) / 2) ** 2 <= radius * radius
    if shape == "square":
        return (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)
    half_width = (width / 2) * (y - y0) / height  # apex (centre_x, y0), base from x0 to x1 at y1
    return (y >= y0) & (y <= y1) & (np.abs(x - centre_x) <= half_width)


@dataclass(frozen=True)
class Reading(Labelled):
    """The attributes read from one image, with the measurements behind them (fractions of the side)."""

    colour: str
    shape: str
    size: str
    row: str
    column: str
    area: float
    centroid: tuple[float, float]
    box: tuple[float, float, float, float]
    shape_iou: dict[str, float]


def read_image(image: ImageLike) -> Reading | None:
    """Read colour, shape, size and position from an image; ``None`` if it has no or several meaningful blobs."""
    pixels = as_rgb_array(image)
    side = pixels.shape[0]
    found = [b for b in blobs(pixels.max(axis=2) > FOREGROUND_THRESHOLD) if len(b[0]) >= MIN_BLOB_AREA * side * side]
    if len(found) != 1:
        return None
    rows, cols = found[0]

    mean_colour = pixels[rows, cols].astype(np.float64).mean(axis=0)
    colour = min(COLOURS, key=lambda name: float(np.sum((mean_colour - PALETTE[name]) ** 2)))

    centroid = (float((cols + 0.5).mean() / side), float((rows + 0.5).mean() / side))

    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    margin = BOX_MARGIN_PIXELS / side
    box = (left / side - margin, top / side - margin, right / side + margin, bottom / side + margin)
    blob = np.zeros((bottom - top, right - left), dtype=bool)  # the blob inside its pixel box
    blob[rows - top, cols - left] = True
    x, y = subpixel_centres(side)
    x, y = x[:, left * SUPERSAMPLE : right * SUPERSAMPLE], y[top * SUPERSAMPLE : bottom * SUPERSAMPLE]
    inside = FOREGROUND_THRESHOLD / max(PALETTE[colour])  # coverage that lifts the colour over the threshold
    shape_iou = {}
    for shape in SHAPES:
        fitted = box_downsample(_fitted_shape(shape, x, y, box)) > inside
        shape_iou[shape] = float((blob & fitted).sum() / (blob | fitted).sum())
    shape = max(SHAPES, key=lambda s: shape_iou[s])

    area = len(rows) / (side * side)
    size = "small" if area < (expected_area(shape, "small") + expected_area(shape, "large")) / 2 else "large"
    return Reading(
        colour=colour,
        shape=shape,
        size=size,
        row=_nearest(centroid[1], ROW_CENTRES),
        column=_nearest(centroid[0], COLUMN_CENTRES),
        area=area,
        centroid=centroid,
        box=box,
        shape_iou=shape_iou,
    )


def attribute_matches(reading: Reading | None, expected: dict[str, str]) -> dict[str, bool]:
    """For each of the four attributes, whether the reading has the expected label (all False if unreadable)."""
    if reading is None:
        return {name: False for name in ATTRIBUTES}
    labels = reading.labels()
    return {name: labels[name] == expected[name] for name in ATTRIBUTES}


POSITION_PARTS = ("row", "column")


def position_part_matches(reading: Reading | None, expected_position: str) -> dict[str, bool]:
    """Whether the reading's row and its column (``"top left"`` -> ``top``, ``left``) are the expected ones."""
    if reading is None:
        return {part: False for part in POSITION_PARTS}
    drawn = reading.labels()["position"].split()
    return {part: got == want for part, got, want in zip(POSITION_PARTS, drawn, expected_position.split())}


# ---- captions ------------------------------------------------------------------------------------------------

_WORDS = {name: "|".join(values) for name, values in {"size": SIZES, "colour": COLOURS, "shape": SHAPES}.items()}
_CAPTION = (
    rf"a (?P<size>{_WORDS['size']}) (?P<colour>{_WORDS['colour']}) (?P<shape>{_WORDS['shape']}) "
    rf"at (?P<row>{'|'.join(ROWS)}) (?P<column>{'|'.join(COLUMNS)})"
)
_STRICT_CAPTION = re.compile(_CAPTION + r"\.")
_WORD = {name: re.compile(rf"\b({_WORDS[name]})\b") for name in _WORDS}
_POSITION = re.compile(rf"\b({'|'.join(ROWS)})\s+({'|'.join(COLUMNS)})\b")


def parse_caption(text: str, strict: bool = True) -> dict[str, str] | None:
    """The four labels of a caption, or ``None``.

    ``strict``: ``text`` must be exactly a caption sentence (``a small red circle at top left.``). Otherwise each
    attribute is taken from its first word anywhere in the lower-cased text; a missing one is left out.
    """
    if strict:
        match = _STRICT_CAPTION.fullmatch(text)
        if match is None:
            return None
        return {
            "colour": match["colour"],
            "shape": match["shape"],
            "size": match["size"],
            "position": f"{match['row']} {match['column']}",
        }
    text = text.lower()
    labels = {name: m.group(1) for name, pattern in _WORD.items() if (m := pattern.search(text))}
    if position := _POSITION.search(text):
        labels["position"] = f"{position.group(1)} {position.group(2)}"
    return labels


# ---- metrics -------------------------------------------------------------------------------------------------


@dataclass
class Tally:
    """``correct`` out of ``total``; ``ratio`` is None when nothing was counted."""

    correct: int = 0
    total: int = 0

    def add(self, ok: bool) -> None:
        self.correct += int(ok)
        self.total += 1

    @property
    def ratio(self) -> float | None:
        return self.correct / self.total if self.total else None

    def to_dict(self) -> dict[str, Any]:
        return {"correct": self.correct, "total": self.total, "ratio": self.ratio}


def _tallies(names: Sequence[str]) -> dict[str, Tally]:
    return {name: Tally() for name in names}


def _to_dict(value: Any) -> Any:
    if isinstance(value, Tally):
        return value.to_dict()
    if isinstance(value, dict):
        return {str(k): _to_dict(v) for k, v in value.items()}
    if hasattr(value, "__dataclass_fields__"):
        return {name: _to_dict(getattr(value, name)) for name in value.__dataclass_fields__}
    return value


@dataclass
class CaptionMetrics:
    exact: Tally = field(default_factory=Tally)
    attributes: dict[str, Tally] = field(default_factory=lambda: _tallies(ATTRIBUTES))


@dataclass
class GenerationMetrics:
    all_correct: Tally = field(default_factory=Tally)
    attributes: dict[str, Tally] = field(default_factory=lambda: _tallies(ATTRIBUTES))
    position_parts: dict[str, Tally] = field(default_factory=lambda: _tallies(POSITION_PARTS))
    unreadable: int = 0


@dataclass
class StoryMetrics:
    overall: Tally = field(default_factory=Tally)
    by_step: dict[int, Tally] = field(default_factory=dict)
    by_change: dict[str, Tally] = field(default_factory=lambda: _tallies(ATTRIBUTES))
    changed_right: Tally = field(default_factory=Tally)
    others_kept: Tally = field(default_factory=Tally)


def caption_accuracy(predictions: Sequence[str], truths: Sequence[Attributes]) -> CaptionMetrics:
    """Exact-match caption accuracy (surrounding whitespace ignored) and per-attribute accuracy (lenient parse)."""
    _check_lengths(predictions, truths, "predictions", "truths")
    metrics = CaptionMetrics()
    for prediction, truth in zip(predictions, truths):
        metrics.exact.add(prediction.strip() == caption_sentence(truth))
        parsed = parse_caption(prediction, strict=False)
        for name, label in truth.labels().items():
            metrics.attributes[name].add(parsed.get(name) == label)
    return metrics


def generation_accuracy(images: Sequence[ImageLike], truths: Sequence[Attributes]) -> GenerationMetrics:
    """How many generated images show all four prompted attributes, each attribute on its own, and the position's
    row and column on their own (``position_parts``)."""
    _check_lengths(images, truths, "images", "truths")
    metrics = GenerationMetrics()
    for image, truth in zip(images, truths):
        reading = read_image(image)
        metrics.unreadable += reading is None
        expected = truth.labels()
        matches = attribute_matches(reading, expected)
        for name, ok in matches.items():
            metrics.attributes[name].add(ok)
        metrics.all_correct.add(all(matches.values()))
        for part, ok in position_part_matches(reading, expected["position"]).items():
            metrics.position_parts[part].add(ok)
    return metrics


class StoryOutput(NamedTuple):
    """One story to score: its changes and its images (the given first image, then one generated per change)."""

    changes: Sequence[Change]
    images: Sequence[ImageLike]


def story_consistency(stories: Sequence[StoryOutput]) -> StoryMetrics:
    """Per step: the changed attribute has its new value and all others equal those of the previous image."""
    metrics = StoryMetrics()
    for story in stories:
        if len(story.images) != len(story.changes) + 1:
            raise ValueError(
                f"a story with {len(story.changes)} changes needs {len(story.changes) + 1} images "
                f"(the first image, then one per change), got {len(story.images)}"
            )
        previous = read_image(story.images[0])
        for step, (change, image) in enumerate(zip(story.changes, story.images[1:]), start=1):
            current = read_image(image)
            if previous is None or current is None:
                changed_right = kept = False
            else:
                expected = {**previous.labels(), change.attribute: change.value}
                matches = attribute_matches(current, expected)
                changed_right = matches.pop(change.attribute)
                kept = all(matches.values())
            metrics.changed_right.add(changed_right)
            metrics.others_kept.add(kept)
            metrics.overall.add(changed_right and kept)
            metrics.by_step.setdefault(step, Tally()).add(changed_right and kept)
            metrics.by_change[change.attribute].add(changed_right and kept)
            previous = current
    return metrics


def _check_lengths(first: Sequence[Any], second: Sequence[Any], first_name: str, second_name: str) -> None:
    if len(first) != len(second):
        raise ValueError(f"{first_name} and {second_name} must pair up, got {len(first)} and {len(second)}")


@dataclass
class ShapeStoriesReport:
    """Scores of one evaluation run; ``settings`` records what was run (checkpoint, image size, guidance...)."""

    caption: CaptionMetrics | None = None
    generation: GenerationMetrics | None = None
    story: StoryMetrics | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)
